//! COM1 (8250 UART at 0x3f8, IRQ 4) via vm-superio, with console output to
//! a file or stdout and input queued from stdin. The output is also watched
//! for a guest kernel panic, so the VMM can report it when the guest resets.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::Serial;
use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::EventFd;

use super::super::EventFdTrigger;
use crate::devices::bus::{BusDevice, lock};

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// Bound on input queued while the guest does not read the UART.
const MAX_PENDING_INPUT: usize = 64 * 1024;

/// Where the console goes, scanning it for a kernel panic line.
pub struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    panic: Arc<Mutex<Option<String>>>,
}

impl ConsoleOutput {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        ConsoleOutput {
            out,
            line: Vec::new(),
            panic: Arc::new(Mutex::new(None)),
        }
    }

    /// The first kernel panic line seen on the console, if any.
    pub fn panic_watch(&self) -> Arc<Mutex<Option<String>>> {
        self.panic.clone()
    }

    fn scan(&mut self, byte: u8) {
        if byte == b'\n' {
            let text = String::from_utf8_lossy(&self.line);
            if let Some(at) = text.find(PANIC_MARKER) {
                let mut seen = lock(&self.panic);
                if seen.is_none() {
                    *seen = Some(text[at..].trim_end().to_string());
                }
            }
            self.line.clear();
        } else if self.line.len() < 4096 {
            self.line.push(byte);
        }
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.scan(b);
        }
        // A console nobody reads (closed stdout) must not stop the guest.
        let _ = self.out.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// Signals the VMM loop when the guest has drained the UART's input FIFO.
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

pub struct SerialDevice {
    serial: Serial<EventFdTrigger, InputDrained, ConsoleOutput>,
    pending: VecDeque<u8>,
}

impl SerialDevice {
    /// `irq` is the irqfd for COM1's interrupt; `drained` is signalled when
    /// the guest can take more input.
    pub fn new(irq: EventFdTrigger, drained: EventFd, out: ConsoleOutput) -> Self {
        SerialDevice {
            serial: Serial::with_events(irq, InputDrained(drained), out),
            pending: VecDeque::new(),
        }
    }

    /// Queues console input for the guest; input beyond the bound is dropped.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        self.pending.extend(&bytes[..bytes.len().min(room)]);
        self.flush_input();
    }

    /// Moves queued input into the UART's FIFO as far as it has room.
    pub fn flush_input(&mut self) {
        while !self.pending.is_empty() && self.serial.fifo_capacity() > 0 {
            let chunk: Vec<u8> = self
                .pending
                .iter()
                .take(self.serial.fifo_capacity())
                .copied()
                .collect();
            match self.serial.enqueue_raw_bytes(&chunk) {
                Ok(n) => drop(self.pending.drain(..n)),
                Err(_) => break,
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.serial.write(offset, *byte) {
                tracing::debug!("serial write: {}", frakti_proto::error_chain(&e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, SharedBuf, Arc<Mutex<Option<String>>>) {
        let buf = SharedBuf::default();
        let out = ConsoleOutput::new(Box::new(buf.clone()));
        let panic = out.panic_watch();
        let dev = SerialDevice::new(
            EventFdTrigger::new().unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            out,
        );
        (dev, buf, panic)
    }

    #[test]
    fn guest_writes_reach_the_console_and_panics_are_noticed() {
        let (mut dev, buf, panic) = device();
        for b in b"hello\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n" {
            dev.write(0, &[*b]);
        }
        assert!(buf.0.lock().unwrap().starts_with(b"hello\n"));
        assert_eq!(
            panic.lock().unwrap().as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init!")
        );
    }

    #[test]
    fn input_is_queued_beyond_the_fifo_and_delivered_in_order() {
        let (mut dev, _, _) = device();
        let input: Vec<u8> = (0..200u8).collect();
        dev.queue_input(&input);
        let mut received = Vec::new();
        for _ in 0..4 {
            // Line status bit 0: data ready.
            let mut lsr = [0u8];
            loop {
                dev.read(5, &mut lsr);
                if lsr[0] & 1 == 0 {
                    break;
                }
                let mut byte = [0u8];
                dev.read(0, &mut byte);
                received.push(byte[0]);
            }
            dev.flush_input();
        }
        assert_eq!(received, input);
    }

    #[test]
    fn odd_access_sizes_are_ignored() {
        let (mut dev, buf, _) = device();
        dev.write(0, b"ab");
        let mut data = [7u8; 2];
        dev.read(0, &mut data);
        assert_eq!(data, [7, 7]);
        assert!(buf.0.lock().unwrap().is_empty());
    }
}
