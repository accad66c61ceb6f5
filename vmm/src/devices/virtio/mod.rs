//! Virtio devices on the MMIO transport.
//!
//! A device ([`VirtioDevice`]) knows its queues, features and config space
//! but nothing about registers; [`mmio::MmioTransport`] wraps any device
//! and implements the virtio-mmio register window (version 2, modern only)
//! on the MMIO bus. The device does its I/O on the VMM's device event loop,
//! never on a vCPU thread: it is also an `event_manager::MutEventSubscriber`
//! and watches its queue eventfds once the driver has activated it.
//!
//! # Wiring a device into a VM
//!
//! For the `n`-th virtio device, [`MmioSlot::nth`] gives its 4 KiB window in
//! the MMIO gap and its IRQ. The VMM then:
//!
//! 1. builds the device and `MmioTransport::new(memory, device)`;
//! 2. registers `transport.interrupt().irqfd()` with `KVM_IRQFD` on the
//!    slot's IRQ;
//! 3. registers each `(offset, queue, eventfd)` of `transport.ioeventfds()`
//!    with `KVM_IOEVENTFD` at `slot.base + offset`, datamatch `queue` (4
//!    bytes), so queue notifications never leave the kernel;
//! 4. inserts the transport on the MMIO bus at `slot.base`, length
//!    [`MMIO_WINDOW_SIZE`];
//! 5. appends [`MmioSlot::cmdline_param`] (`virtio_mmio.device=4K@0xd0000000:5`)
//!    to the kernel command line;
//! 6. adds the device (the same `Arc<Mutex<_>>`) to the device event loop.
//!
//! # Threads and locks
//!
//! Register accesses run on vCPU threads and lock the transport, then the
//! device; the event loop locks only its subscriber, and holds it while it
//! serves a bounded batch of requests ([`drain::drain`]). For net and vsock
//! the subscriber is the device; a disk's is its queue handler
//! ([`block::BlockQueue`]), so config reads never wait for disk I/O. Under the vCPU seccomp filter no file
//! descriptor may be created (not even `dup`), so activation and reset only
//! read and write eventfds made beforehand; the device starts and stops
//! watching its queue eventfds on the event-loop thread. Opening a new
//! backing file ([`block::Block::set_backing`]) needs `openat`: do it on the
//! VMM thread, or open the [`block::disk::Disk`] there and hand it over with
//! [`block::Block::set_disk`]. Likewise a net device's tap is opened
//! (`open`, `TUNSETIFF`, ...) or adopted on the VMM thread by
//! [`net::Tap::open`] / [`net::Tap::from_fd`]; at runtime the device
//! only reads, writes and re-arms its epoll interest on it.

pub mod block;
pub mod drain;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use event_manager::{EventOps, Events};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::VIRTIO_MMIO_START;

pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Size of one device's MMIO window: registers, then config space at 0x100.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// The first IRQ given to virtio devices (0, 1 and 4 are the PIT, the
/// i8042 and COM1); one IRQ per device up to the I/O APIC's last pin.
pub const FIRST_IRQ: u32 = 5;
pub const LAST_IRQ: u32 = 23;

/// Interrupt status bit: a queue has new used buffers.
pub const INTERRUPT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration space changed.
pub const INTERRUPT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Feature bit `bit` as a mask.
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// Copies the part of a device's config space `config` at `offset` into
/// `data`; bytes past its end read as zero.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(available) = usize::try_from(offset)
        .ok()
        .and_then(|offset| config.get(offset..))
    else {
        return;
    };
    let n = available.len().min(data.len());
    data[..n].copy_from_slice(&available[..n]);
}

/// Checks what `VirtioDevice::activate` was given: exactly `N` queues,
/// all ready, and their `N` eventfds.
pub fn exact_queues<const N: usize>(
    queues: Vec<Queue>,
    queue_evts: Vec<Arc<EventFd>>,
) -> Result<([Queue; N], [Arc<EventFd>; N]), ActivateError> {
    let got = queues.len().max(queue_evts.len());
    let (Ok(queues), Ok(queue_evts)) = (
        <[Queue; N]>::try_from(queues),
        <[Arc<EventFd>; N]>::try_from(queue_evts),
    ) else {
        return Err(ActivateError::QueueCount { expected: N, got });
    };
    if let Some(index) = queues.iter().position(|q| !q.ready()) {
        return Err(ActivateError::QueueNotReady(index));
    }
    Ok((queues, queue_evts))
}

/// Where the `n`-th virtio-mmio device lives: its window and its IRQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub irq: u32,
}

impl MmioSlot {
    /// The `n`-th device's slot, or `None` when IRQs run out.
    pub fn nth(n: u32) -> Option<MmioSlot> {
        let irq = FIRST_IRQ.checked_add(n).filter(|irq| *irq <= LAST_IRQ)?;
        Some(MmioSlot {
            base: VIRTIO_MMIO_START + u64::from(n) * MMIO_WINDOW_SIZE,
            irq,
        })
    }

    /// The kernel parameter that declares this device to the guest
    /// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
    pub fn cmdline_param(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            MMIO_WINDOW_SIZE / 1024,
            self.base,
            self.irq
        )
    }
}

/// Why a device could not be activated; the transport then sets
/// DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    #[error("the device is already active")]
    AlreadyActive,
    #[error("cannot wake the device event loop")]
    EventFd(#[source] std::io::Error),
}

/// A virtio device, as the transport sees it.
pub trait VirtioDevice: Send {
    /// Virtio device ID (`virtio_ids`), e.g. 2 for a block device.
    fn device_type(&self) -> u32;
    /// Largest size of each queue (powers of two); the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device feature bits. The transport adds `VIRTIO_F_VERSION_1`.
    fn avail_features(&self) -> u64;
    /// Reads the device config space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device config space; the device ignores what it does not
    /// support.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Changes whenever the device changes its config space by itself, so a
    /// driver can tell a torn multi-register read.
    fn config_generation(&self) -> u32 {
        0
    }
    /// Starts the device once the driver set DRIVER_OK. `queues` are ready
    /// and validated against `mem`; `queue_evts[i]` fires when the driver
    /// notifies queue `i`; `acked_features` are what the driver accepted.
    ///
    /// Runs on a vCPU thread, whose seccomp filter allows no new file
    /// descriptors (not even `dup`): hence shared eventfds. Leave watching
    /// them to the event loop ([`QueueEvents`]).
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<Arc<EventFd>>,
        acked_features: u64,
    ) -> Result<(), ActivateError>;
    /// Stops the device (the driver wrote 0 to Status): from its return on,
    /// the device no longer touches guest memory.
    fn reset(&mut self);
}

/// A device's interrupt line: the InterruptStatus register bits, and the
/// irqfd that raises the IRQ in KVM. Shared by the transport (which reads
/// and acknowledges the status) and the active device (which triggers it).
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    pub fn new() -> std::io::Result<Self> {
        Ok(VirtioInterrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irqfd: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The eventfd to register with `KVM_IRQFD`.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Sets `bits` (`INTERRUPT_VRING`, `INTERRUPT_CONFIG`) in the status
    /// register and raises the IRQ.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// Used buffers are ready.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.trigger(INTERRUPT_VRING)
    }

    /// The config space changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.trigger(INTERRUPT_CONFIG)
    }

    /// The device hit an error it cannot recover from (e.g. a corrupt
    /// ring): the transport shows DEVICE_NEEDS_RESET, and the driver gets a
    /// config interrupt.
    pub fn signal_needs_reset(&self) -> std::io::Result<()> {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change()
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Device reset: no pending interrupt, no error.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// How often the IRQ was raised since the last call. Only meaningful
    /// when no KVM irqfd consumes the eventfd: in tests.
    pub fn take_count(&self) -> u64 {
        self.irqfd.read().unwrap_or(0)
    }
}

/// The queue eventfds a device watches in the event loop, kept in step with
/// its activation. `activate` and `reset` run on a vCPU thread, which cannot
/// touch the event loop; they call [`QueueEvents::request_sync`], and the
/// loop thread calls [`QueueEvents::sync`] when the control eventfd fires.
#[derive(Debug)]
pub struct QueueEvents {
    control: EventFd,
    watched: Vec<Arc<EventFd>>,
}

impl QueueEvents {
    pub fn new() -> std::io::Result<Self> {
        Ok(QueueEvents {
            control: EventFd::new(libc::EFD_NONBLOCK)?,
            watched: Vec::new(),
        })
    }

    /// Subscriber `init`: watch the control eventfd.
    pub fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.control, EventSet::IN)) {
            tracing::error!(
                "cannot watch a device's control eventfd: {}",
                frakti_proto::error_chain(&e)
            );
        }
    }

    /// Asks the event loop to call [`QueueEvents::sync`].
    pub fn request_sync(&self) -> std::io::Result<()> {
        self.control.write(1)
    }

    /// `VirtioDevice::activate`, the part every device shares: a second
    /// activation is refused, exactly `N` ready queues are taken, the event
    /// loop is asked to watch them, and `slot` gets what `make` builds.
    pub fn activate<T, const N: usize>(
        &self,
        slot: &mut Option<T>,
        queues: Vec<Queue>,
        queue_evts: Vec<Arc<EventFd>>,
        make: impl FnOnce([Queue; N], [Arc<EventFd>; N]) -> T,
    ) -> Result<(), ActivateError> {
        if slot.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let (queues, queue_evts) = exact_queues::<N>(queues, queue_evts)?;
        self.request_sync().map_err(ActivateError::EventFd)?;
        *slot = Some(make(queues, queue_evts));
        Ok(())
    }

    /// `VirtioDevice::reset`, the shared part: the active state goes and
    /// the event loop stops watching the queues. Whether it was active.
    pub fn deactivate<T>(&self, slot: &mut Option<T>, what: &str) -> bool {
        if slot.take().is_none() {
            return false;
        }
        if let Err(e) = self.request_sync() {
            tracing::warn!("{what}: cannot wake the event loop: {e}");
        }
        true
    }

    pub fn is_control(&self, events: &Events) -> bool {
        events.fd() == self.control.as_raw_fd()
    }

    /// If `events` is a watched queue eventfd: consumes it and returns its
    /// index.
    pub fn take_queue_event(&self, events: &Events) -> Option<usize> {
        let index = self
            .watched
            .iter()
            .position(|evt| evt.as_raw_fd() == events.fd())?;
        let _ = self.watched[index].read();
        Some(index)
    }

    /// Consumes a control event, then watches exactly `wanted` (the queue
    /// eventfds of an active device) or nothing. Keeping a reference keeps
    /// each watched descriptor open until it is unwatched.
    pub fn sync(&mut self, ops: &mut EventOps, wanted: &[Arc<EventFd>]) {
        let _ = self.control.read();
        for evt in self.watched.drain(..) {
            if let Err(e) = ops.remove(Events::new(evt.as_ref(), EventSet::IN)) {
                tracing::warn!(
                    "cannot unwatch a queue eventfd: {}",
                    frakti_proto::error_chain(&e)
                );
            }
        }
        for evt in wanted {
            match ops.add(Events::new(evt.as_ref(), EventSet::IN)) {
                Ok(()) => self.watched.push(evt.clone()),
                Err(e) => tracing::error!(
                    "cannot watch a queue eventfd: {}",
                    frakti_proto::error_chain(&e)
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_each_other_until_irqs_run_out() {
        let first = MmioSlot::nth(0).unwrap();
        assert_eq!(
            first,
            MmioSlot {
                base: 0xd000_0000,
                irq: 5
            }
        );
        assert_eq!(first.cmdline_param(), "virtio_mmio.device=4K@0xd0000000:5");
        let second = MmioSlot::nth(1).unwrap();
        assert_eq!(second.base, 0xd000_1000);
        assert_eq!(second.irq, 6);
        assert_eq!(MmioSlot::nth(18).unwrap().irq, 23);
        assert_eq!(MmioSlot::nth(19), None);
        assert_eq!(MmioSlot::nth(u32::MAX), None);
    }

    #[test]
    fn interrupt_status_bits_are_set_counted_and_acknowledged() {
        let irq = VirtioInterrupt::new().unwrap();
        irq.signal_used_queue().unwrap();
        irq.signal_config_change().unwrap();
        assert_eq!(irq.status(), INTERRUPT_VRING | INTERRUPT_CONFIG);
        assert_eq!(irq.take_count(), 2);
        assert_eq!(irq.take_count(), 0);
        irq.acknowledge(INTERRUPT_VRING);
        assert_eq!(irq.status(), INTERRUPT_CONFIG);
        irq.signal_needs_reset().unwrap();
        assert!(irq.needs_reset());
        irq.reset();
        assert_eq!(irq.status(), 0);
        assert!(!irq.needs_reset());
    }
}
