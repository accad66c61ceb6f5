//! virtio-net: one receive and one transmit queue, frames carried on the
//! host by a tap ([`tap::Tap`]) or, in tests, any [`backend::Backend`].
//!
//! The device offers `VIRTIO_NET_F_MAC`, `VIRTIO_NET_F_STATUS` (link
//! always up), EVENT_IDX, indirect descriptors, and checksum and TCP
//! segmentation offloads both ways (`CSUM`, `HOST_TSO4/6`; `GUEST_CSUM`,
//! `GUEST_TSO4/6`): a frame is a 12-byte `virtio_net_hdr_v1` and an
//! Ethernet frame of up to 64 KiB whose checksum may be partial. Headers
//! the guest sends pass through to the tap unchanged (the kernel segments
//! and checksums what needs it). What the tap may hand us is set at
//! activation from what the guest acknowledged (`TUNSETOFFLOAD`, applied
//! on the device thread); the tap's headers then pass through to the
//! guest, `num_buffers` set to 1. A guest that negotiated none gets
//! complete, checksummed frames of at most the MTU behind a zero header.
//! Without MRG_RXBUF a Linux driver that negotiated GUEST_TSO gives
//! receive chains of 64 KiB + header ("big packets").
//!
//! Frames move with one readv/writev each, straight between the backend
//! and guest buffers ([`backend::GuestBuffers`]), on the device event loop
//! (the device is an `event_manager::MutEventSubscriber`; never on a vCPU
//! thread). Besides its queue eventfds the loop watches the backend's
//! descriptor, for exactly what the device waits for:
//!
//! * **Receive back-pressure.** The backend is watched for EPOLLIN while
//!   the guest has receive buffers. A chain is taken from the ring only
//!   when a frame was read into it, so the device holds no frame of its
//!   own. When the ring runs dry the device stops watching the backend and
//!   turns on queue notifications; frames then wait in the tap's own
//!   bounded queue (txqueuelen, beyond which the kernel drops them, as a
//!   full NIC would) until the driver adds buffers and kicks the queue.
//! * **Transmit back-pressure.** When the backend refuses a frame with
//!   EAGAIN or ENOBUFS the chain stays in the ring (not consumed, not
//!   dropped), transmission pauses and the backend is watched for EPOLLOUT;
//!   writability resumes it with that same frame. Other write errors (a
//!   tap that is down, a header the kernel refuses) drop that one frame.
//!
//! One wake-up handles at most [`MAX_FRAMES_PER_WAKE`] chains per queue,
//! then yields to other devices. A bad chain goes back to the driver with
//! used length 0 and is counted ([`NetCounters`]); a corrupt ring (a
//! descriptor loop, an available index beyond the queue size) stops the
//! device and sets DEVICE_NEEDS_RESET, see [`chain`].
//!
//! A frame larger than the receive chain is dropped (`rx_truncated`): a tap
//! reports a frame's full length even when it cut it to the buffers, and
//! without MRG_RXBUF or guest offloads a driver gives 1526-byte (or
//! larger) chains, which hold any frame of a 1500-byte MTU.

pub mod backend;
pub mod chain;
pub mod mac;
mod rx;
pub mod tap;
mod tx;

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use self::backend::Backend;
pub use self::mac::MacAddr;
use self::rx::RxStop;
pub use self::tap::Tap;
use self::tx::TxStop;
use super::{
    ActivateError, QueueEvents, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice,
    VirtioInterrupt, feature, read_config_space,
};

/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Chains handled per queue and event-loop wake-up before yielding.
pub const MAX_FRAMES_PER_WAKE: usize = 64;
/// Bytes of config space: the MAC, then the link status.
const CONFIG_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// A queue the device cannot go on with.
#[derive(Debug, thiserror::Error)]
enum RingError {
    #[error(transparent)]
    Queue(#[from] virtio_queue::Error),
    #[error(transparent)]
    Chain(#[from] chain::Error),
}

/// What the device did, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames (and their bytes, headers excluded) given to the guest.
    pub rx_frames: u64,
    pub rx_bytes: u64,
    /// Frames (and their bytes, headers excluded) sent to the backend.
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames longer than the receive chain they were read into, lost.
    pub rx_truncated: u64,
    /// Frames from the backend too short to carry a header, lost.
    pub rx_dropped: u64,
    /// Frames the backend refused (other than for back-pressure), lost.
    pub tx_dropped: u64,
    /// Chains returned unused with length 0 because they were malformed.
    pub rx_malformed: u64,
    pub tx_malformed: u64,
    /// Times reception stopped because the guest gave no buffers.
    pub rx_no_buffers: u64,
    /// Times transmission paused because the backend was full.
    pub tx_blocked: u64,
}

/// The device once the driver activated it.
#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    rx: Queue,
    tx: Queue,
    /// Eventfds of the receive and transmit queues, in that order.
    queue_evts: Vec<Arc<EventFd>>,
    /// The ring is corrupt: nothing more is done until a reset.
    broken: bool,
    /// The guest has no receive buffers: the backend is not read until it
    /// kicks the receive queue.
    rx_starved: bool,
    /// The backend refused a frame: transmission waits for EPOLLOUT.
    tx_blocked: bool,
    /// The guest negotiated receive offloads: backend headers pass through.
    guest_offloads: bool,
}

/// The tap offloads (`TUN_F_*`) that match what the guest acknowledged:
/// partial checksums and TCP segments it can take.
pub fn tun_offloads(acked_features: u64) -> u32 {
    let acked = |bit: u32| acked_features & feature(bit) != 0;
    let mut flags = 0;
    if acked(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        // Segments need checksum offload too (virtio 1.2 §5.1.3.1).
        if acked(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if acked(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

/// A virtio-net device over a [`Backend`] (a [`Tap`] by default).
#[derive(Debug)]
pub struct Net<B: Backend = Tap> {
    backend: B,
    mac: MacAddr,
    active: Option<Active>,
    events: QueueEvents,
    /// What the event loop watches the backend for (empty: not at all).
    watched: EventSet,
    /// The backend failed (error, hang-up, end of file): it is no longer
    /// read or watched until the device is activated again.
    backend_failed: bool,
    /// Tap offloads to set on the device thread (activation runs on a
    /// vCPU thread, whose seccomp filter has no tap ioctls).
    pending_offloads: Option<u32>,
    counters: NetCounters,
}

impl<B: Backend> Net<B> {
    /// A device that carries frames through `backend` and shows `mac` to
    /// the guest (see [`MacAddr::random_local`] when there is none).
    pub fn new(backend: B, mac: MacAddr) -> Result<Net<B>, Error> {
        Ok(Net {
            backend,
            mac,
            active: None,
            events: QueueEvents::new().map_err(Error::EventFd)?,
            watched: EventSet::empty(),
            backend_failed: false,
            pending_offloads: None,
            counters: NetCounters::default(),
        })
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Whether the guest gets the backend's offloaded frames (it
    /// negotiated them and the backend took the setting).
    pub fn guest_offloads(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.guest_offloads)
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac.octets());
        config[6..].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config
    }

    /// Tells the backend which offloads the guest takes, before any frame
    /// is read for it. If the backend refuses, frames stay plain; the
    /// guest copes with those whatever it negotiated.
    fn apply_offloads(&mut self) {
        let Some(flags) = self.pending_offloads.take() else {
            return;
        };
        if let Err(e) = self.backend.set_offloads(flags) {
            tracing::warn!("net {}: cannot set tap offloads {flags:#x}: {e}", self.mac);
            if let Some(active) = self.active.as_mut() {
                active.guest_offloads = false;
            }
        }
    }

    /// Moves frames from the backend to the guest, within the budget.
    fn process_rx(&mut self) {
        if self.backend_failed {
            return;
        }
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        match rx::receive(
            &active.mem,
            &mut active.rx,
            &mut self.backend,
            &mut self.counters,
            active.guest_offloads,
        ) {
            Ok((used, stop)) => {
                match stop {
                    RxStop::NoBuffers => {
                        active.rx_starved = true;
                        self.counters.rx_no_buffers += 1;
                    }
                    RxStop::BackendFailed => self.backend_failed = true,
                    // More frames wake us again through the backend.
                    RxStop::BackendEmpty | RxStop::Budget => {}
                }
                if used > 0 {
                    signal_used(&active.interrupt, &mut active.rx, &active.mem);
                }
            }
            Err(e) => needs_reset(active, "rx", &e),
        }
    }

    /// Moves frames from the guest to the backend, within the budget.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        if active.tx_blocked {
            return;
        }
        let result = tx::transmit(
            &active.mem,
            &mut active.tx,
            &mut self.backend,
            &mut self.counters,
        );
        match result {
            Ok((used, stop)) => {
                match stop {
                    TxStop::Blocked => active.tx_blocked = true,
                    // Come back after the other devices had their turn.
                    TxStop::Budget => {
                        let _ = active.queue_evts[TX_QUEUE].write(1);
                    }
                    TxStop::Idle => {}
                }
                if used > 0 {
                    signal_used(&active.interrupt, &mut active.tx, &active.mem);
                }
            }
            Err(e) => needs_reset(active, "tx", &e),
        }
    }

    /// The backend is ready (or failed).
    fn process_backend(&mut self, events: EventSet) {
        if events.contains(EventSet::IN) {
            self.process_rx();
        }
        if events.contains(EventSet::OUT) {
            if let Some(active) = self.active.as_mut() {
                active.tx_blocked = false;
            }
            self.process_tx();
        }
        if events.intersects(EventSet::ERROR | EventSet::HANG_UP) && !self.backend_failed {
            tracing::warn!("net {}: the backend failed ({events:?})", self.mac);
            self.backend_failed = true;
            // It will never be writable: drop what waits rather than stall.
            if let Some(active) = self.active.as_mut() {
                active.tx_blocked = false;
            }
            self.process_tx();
        }
    }

    /// What the backend should be watched for now.
    fn wanted_backend_events(&self) -> EventSet {
        let mut wanted = EventSet::empty();
        if let Some(active) = self.active.as_ref().filter(|a| !a.broken) {
            if !active.rx_starved && !self.backend_failed {
                wanted |= EventSet::IN;
            }
            if active.tx_blocked && !self.backend_failed {
                wanted |= EventSet::OUT;
            }
        }
        wanted
    }

    /// Brings the event loop's interest in the backend up to date.
    fn watch_backend(&mut self, ops: &mut EventOps) {
        let wanted = self.wanted_backend_events();
        if wanted == self.watched {
            return;
        }
        let fd = self.backend.as_raw_fd();
        let result = if self.watched.is_empty() {
            ops.add(Events::new_raw(fd, wanted))
        } else if wanted.is_empty() {
            ops.remove(Events::new_raw(fd, self.watched))
        } else {
            ops.modify(Events::new_raw(fd, wanted))
        };
        match result {
            Ok(()) => self.watched = wanted,
            Err(e) => tracing::error!(
                "net {}: cannot watch the backend: {}",
                self.mac,
                frakti_proto::error_chain(&e)
            ),
        }
    }
}

fn signal_used(interrupt: &VirtioInterrupt, queue: &mut Queue, mem: &GuestMemoryMmap) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = interrupt.signal_used_queue() {
                tracing::warn!("net: cannot raise the queue interrupt: {e}");
            }
        }
    }
}

fn needs_reset(active: &mut Active, queue: &str, error: &RingError) {
    tracing::warn!("net: {queue} queue is corrupt, needs reset: {error}");
    active.broken = true;
    let _ = active.interrupt.signal_needs_reset();
}

impl<B: Backend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        feature(VIRTIO_NET_F_MAC)
            | feature(VIRTIO_NET_F_STATUS)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_RING_F_INDIRECT_DESC)
            | feature(VIRTIO_NET_F_CSUM)
            | feature(VIRTIO_NET_F_HOST_TSO4)
            | feature(VIRTIO_NET_F_HOST_TSO6)
            | feature(VIRTIO_NET_F_GUEST_CSUM)
            | feature(VIRTIO_NET_F_GUEST_TSO4)
            | feature(VIRTIO_NET_F_GUEST_TSO6)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // VERSION_1 drivers never write the MAC (no CTRL_MAC_ADDR).
        tracing::debug!(
            "net: config write at {offset:#x} ({} bytes) ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<Arc<EventFd>>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        let offloads = tun_offloads(acked_features);
        self.events
            .activate(&mut self.active, queues, queue_evts, |[rx, tx], evts| {
                Active {
                    mem,
                    interrupt,
                    rx,
                    tx,
                    queue_evts: evts.to_vec(),
                    broken: false,
                    rx_starved: false,
                    tx_blocked: false,
                    guest_offloads: offloads != 0,
                }
            })?;
        self.pending_offloads = Some(offloads);
        self.backend_failed = false;
        tracing::debug!(mac = %self.mac, tun_offloads = offloads, "net device activated");
        Ok(())
    }

    fn reset(&mut self) {
        self.events
            .deactivate(&mut self.active, &format!("net {}", self.mac));
    }
}

impl<B: Backend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.events.is_control(&events) {
            let wanted = self
                .active
                .as_ref()
                .map(|a| a.queue_evts.as_slice())
                .unwrap_or_default();
            self.events.sync(ops, wanted);
            self.apply_offloads();
            self.process_rx();
            self.process_tx();
        } else if let Some(queue) = self.events.take_queue_event(&events) {
            if queue == RX_QUEUE {
                // Buffers were added: read the backend again.
                if let Some(active) = self.active.as_mut() {
                    active.rx_starved = false;
                }
                self.process_rx();
            } else {
                self.process_tx();
            }
        } else if events.fd() == self.backend.as_raw_fd() {
            self.process_backend(events.event_set());
        }
        self.watch_backend(ops);
    }
}

#[cfg(test)]
mod tests;
