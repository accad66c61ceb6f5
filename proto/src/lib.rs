//! The protocol between Frakti's host side (VMM, daemon, tests) and the
//! in-guest agent. Today: how the agent announces readiness, on the console
//! (the ready line) and to the VMM (the boot-done I/O port).

pub mod ready;

/// The agent writes [`BOOT_DONE_VALUE`] to this x86 I/O port once it is ready;
/// the VMM records the time since its own start. Elsewhere (QEMU) the write
/// goes to an unassigned port and is ignored.
pub const BOOT_DONE_PORT: u16 = 0x0ff0;
/// The byte written to [`BOOT_DONE_PORT`].
pub const BOOT_DONE_VALUE: u8 = 0x7b;

/// Kernel command-line parameter (passed to the agent as an environment
/// variable) that says what the agent does after its ready line:
/// `reset` (reset the VM at once, for boot tests and benchmarks) or `wait`
/// (stay up until asked to shut down; the default).
pub const AFTER_READY_PARAM: &str = "frakti_after_ready";

/// Kernel command-line parameter: `frakti_dump_kmsg=1` makes the agent print
/// the kernel log (with timestamps) after its ready line, for boot profiling
/// with `quiet`, where the console prints nothing while booting.
pub const DUMP_KMSG_PARAM: &str = "frakti_dump_kmsg";
