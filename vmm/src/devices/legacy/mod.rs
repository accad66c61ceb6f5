//! Legacy PC devices on the I/O port bus.

pub mod boot_done;
pub mod console_writer;
pub mod i8042;
pub mod serial;

pub use boot_done::BootDone;
pub use i8042::I8042;
pub use serial::{ConsoleOutput, SerialDevice};
