//! The i8042 keyboard controller (ports 0x60-0x64), emulated only as far as
//! Frakti needs it:
//! - **reset**: the guest writing 0xfe to the command port resets the
//!   machine, which the VMM treats as "the guest is done" (`reboot=k`);
//! - **Ctrl-Alt-Del**: the VMM can press it (scancode set 2 on IRQ 1) to ask
//!   the guest to shut down; the agent, having disabled the kernel's own
//!   reboot on C-A-D, gets SIGINT and shuts down gracefully.
//!
//! Enough of the controller's protocol is answered (control register,
//! output port, keyboard ACKs) for Linux's i8042/atkbd drivers to probe it
//! quickly with `i8042.noaux i8042.nomux i8042.dumbkbd`.

use std::collections::VecDeque;

use vm_superio::Trigger;

use super::super::EventFdTrigger;
use crate::devices::bus::BusDevice;

pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
pub const KEYBOARD_IRQ: u32 = 1;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

const CMD_READ_CONTROL: u8 = 0x20;
const CMD_WRITE_CONTROL: u8 = 0x60;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_COMMAND_DATA: u8 = 0x08;
const STATUS_KEYBOARD_UNLOCKED: u8 = 0x10;

const CONTROL_KEYBOARD_INTERRUPT: u8 = 0x01;
const CONTROL_SYSTEM_FLAG: u8 = 0x04;

const KEYBOARD_ACK: u8 = 0xfa;
/// Ctrl, Alt, Delete key presses in scancode set 2.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
const BUFFER_SIZE: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("the i8042 output buffer is full: the guest does not read its keyboard")]
    BufferFull,
    #[error("the guest disabled keyboard interrupts")]
    InterruptDisabled,
}

pub struct I8042 {
    reset: EventFdTrigger,
    keyboard_irq: EventFdTrigger,
    status: u8,
    control: u8,
    output_port: u8,
    /// A command waiting for its parameter on the data port.
    pending_command: Option<u8>,
    output: VecDeque<u8>,
}

impl I8042 {
    /// `reset` is written when the guest resets the machine; `keyboard_irq`
    /// is the irqfd of IRQ 1.
    pub fn new(reset: EventFdTrigger, keyboard_irq: EventFdTrigger) -> Self {
        I8042 {
            reset,
            keyboard_irq,
            status: STATUS_KEYBOARD_UNLOCKED | STATUS_SYSTEM_FLAG,
            control: CONTROL_KEYBOARD_INTERRUPT | CONTROL_SYSTEM_FLAG,
            output_port: 0,
            pending_command: None,
            output: VecDeque::with_capacity(BUFFER_SIZE),
        }
    }

    /// Presses Ctrl-Alt-Del on the keyboard.
    pub fn press_ctrl_alt_del(&mut self) -> Result<(), Error> {
        if self.control & CONTROL_KEYBOARD_INTERRUPT == 0 {
            return Err(Error::InterruptDisabled);
        }
        if BUFFER_SIZE - self.output.len() < CTRL_ALT_DEL.len() {
            return Err(Error::BufferFull);
        }
        for byte in CTRL_ALT_DEL {
            self.push(byte);
        }
        self.interrupt();
        Ok(())
    }

    fn push(&mut self, byte: u8) {
        if self.output.len() < BUFFER_SIZE {
            self.output.push_back(byte);
        }
        self.status |= STATUS_OUTPUT_FULL;
    }

    fn pop(&mut self) -> u8 {
        let byte = self.output.pop_front().unwrap_or(0);
        if self.output.is_empty() {
            self.status &= !STATUS_OUTPUT_FULL;
        }
        byte
    }

    /// Answers a controller command with one byte, replacing older output.
    fn reply(&mut self, byte: u8) {
        self.output.clear();
        self.push(byte);
    }

    fn interrupt(&self) {
        if self.control & CONTROL_KEYBOARD_INTERRUPT != 0 {
            if let Err(e) = self.keyboard_irq.trigger() {
                tracing::warn!("cannot raise the keyboard interrupt: {e}");
            }
        }
    }

    fn command(&mut self, command: u8) {
        match command {
            CMD_RESET_CPU => {
                if let Err(e) = self.reset.trigger() {
                    tracing::error!("cannot signal the guest's reset: {e}");
                }
            }
            CMD_READ_CONTROL => self.reply(self.control),
            CMD_READ_OUTPUT_PORT => self.reply(self.output_port),
            CMD_WRITE_CONTROL | CMD_WRITE_OUTPUT_PORT => {
                self.pending_command = Some(command);
                self.status |= STATUS_COMMAND_DATA;
            }
            // Self tests, enable/disable port: nothing to model.
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending_command.take() {
            Some(CMD_WRITE_CONTROL) => self.control = value,
            Some(_) => self.output_port = value,
            // A byte for the keyboard itself: a dumb keyboard ACKs anything.
            None => {
                self.reply(KEYBOARD_ACK);
                self.interrupt();
            }
        }
        self.status &= !STATUS_COMMAND_DATA;
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [byte] = data else { return };
        *byte = match offset {
            COMMAND => self.status,
            DATA => {
                let value = self.pop();
                if !self.output.is_empty() {
                    self.interrupt();
                }
                value
            }
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            COMMAND => self.command(*value),
            DATA => self.data(*value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042, EventFdTrigger, EventFdTrigger) {
        let reset = EventFdTrigger::new().unwrap();
        let irq = EventFdTrigger::new().unwrap();
        let dev = I8042::new(reset.try_clone().unwrap(), irq.try_clone().unwrap());
        (dev, reset, irq)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_the_reset_event() {
        let (mut dev, reset, _) = device();
        dev.write(COMMAND, &[0xaa]);
        assert!(reset.0.read().is_err(), "no reset expected yet");
        assert_eq!(
            read(&mut dev, COMMAND) & 0x02,
            0,
            "kb_wait() passes at once"
        );
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(reset.0.read().unwrap(), 1);
    }

    #[test]
    fn control_register_and_output_port_round_trip() {
        let (mut dev, _, _) = device();
        dev.write(COMMAND, &[CMD_WRITE_CONTROL]);
        assert_ne!(read(&mut dev, COMMAND) & STATUS_COMMAND_DATA, 0);
        dev.write(DATA, &[0x47]);
        dev.write(COMMAND, &[CMD_READ_CONTROL]);
        assert_ne!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA), 0x47);
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);

        dev.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA, &[0x03]);
        dev.write(COMMAND, &[CMD_READ_OUTPUT_PORT]);
        assert_eq!(read(&mut dev, DATA), 0x03);
    }

    #[test]
    fn keyboard_commands_are_acked_with_an_interrupt() {
        let (mut dev, _, irq) = device();
        dev.write(DATA, &[0xf4]);
        assert_eq!(irq.0.read().unwrap(), 1);
        assert_eq!(read(&mut dev, DATA), KEYBOARD_ACK);
        assert_eq!(read(&mut dev, DATA), 0, "empty buffer reads 0");
    }

    #[test]
    fn ctrl_alt_del_delivers_set2_scancodes() {
        let (mut dev, _, irq) = device();
        dev.press_ctrl_alt_del().unwrap();
        assert!(irq.0.read().unwrap() >= 1);
        let bytes: Vec<u8> = (0..4).map(|_| read(&mut dev, DATA)).collect();
        assert_eq!(bytes, CTRL_ALT_DEL);
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn ctrl_alt_del_fails_cleanly_when_the_guest_does_not_listen() {
        let (mut dev, _, _) = device();
        for _ in 0..4 {
            dev.press_ctrl_alt_del().unwrap();
        }
        assert_eq!(dev.press_ctrl_alt_del(), Err(Error::BufferFull));
        dev.write(COMMAND, &[CMD_WRITE_CONTROL]);
        dev.write(DATA, &[0]);
        assert_eq!(dev.press_ctrl_alt_del(), Err(Error::InterruptDisabled));
    }

    #[test]
    fn wide_and_unknown_accesses_are_ignored() {
        let (mut dev, reset, _) = device();
        dev.write(COMMAND, &[CMD_RESET_CPU, 0]);
        assert!(reset.0.read().is_err());
        let mut two = [7u8; 2];
        dev.read(DATA, &mut two);
        assert_eq!(two, [7, 7]);
        assert_eq!(read(&mut dev, 2), 0xff);
    }
}
