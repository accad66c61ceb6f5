//! The i8042 controller's reset line (ports 0x60-0x64): a guest writing
//! 0xfe to the command port resets the machine, which the VMM treats as
//! "the guest is done" (`reboot=k`).

use vm_superio::I8042Device;

use super::super::EventFdTrigger;
use crate::devices::bus::BusDevice;

pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

pub struct I8042(I8042Device<EventFdTrigger>);

impl I8042 {
    /// `reset` is written when the guest resets the machine.
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042(I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.0.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.0.write(offset, *byte) {
                tracing::error!("cannot signal the guest's reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_the_reset_event() {
        let reset = EventFdTrigger::new().unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap());
        dev.write(4, &[0xaa]);
        assert!(reset.0.read().is_err(), "no reset expected yet");
        dev.write(4, &[0xfe]);
        assert_eq!(reset.0.read().unwrap(), 1);
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status, [0], "input buffer empty: kb_wait() passes at once");
    }
}
