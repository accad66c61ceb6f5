//! The boot-done port: the agent writes `BOOT_DONE_VALUE` to
//! `BOOT_DONE_PORT` once it serves, and the VMM records the time since its
//! own start (reported in metrics).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use frakti_proto::BOOT_DONE_VALUE;

use crate::devices::bus::BusDevice;

pub struct BootDone {
    vmm_start: Instant,
    done: Arc<OnceLock<Duration>>,
}

impl BootDone {
    pub fn new(vmm_start: Instant) -> Self {
        BootDone {
            vmm_start,
            done: Arc::new(OnceLock::new()),
        }
    }

    /// Time from VMM start to the agent's signal, once it came.
    pub fn watch(&self) -> Arc<OnceLock<Duration>> {
        self.done.clone()
    }
}

impl BusDevice for BootDone {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&BOOT_DONE_VALUE) {
            let elapsed = self.vmm_start.elapsed();
            if self.done.set(elapsed).is_ok() {
                tracing::info!(
                    boot_done_ms = elapsed.as_millis() as u64,
                    "guest agent is ready"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_signal_is_recorded_once() {
        let mut dev = BootDone::new(Instant::now());
        let watch = dev.watch();
        dev.write(0, &[0x00]);
        assert!(watch.get().is_none());
        dev.write(0, &[BOOT_DONE_VALUE]);
        let first = *watch.get().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        dev.write(0, &[BOOT_DONE_VALUE]);
        assert_eq!(*watch.get().unwrap(), first);
    }
}
