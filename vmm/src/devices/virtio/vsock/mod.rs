//! virtio-vsock: the guest's sockets to the host, ending in unix sockets
//! (Firecracker's hybrid vsock, see [`muxer`]).
//!
//! Three queues: rx (packets to the guest), tx (packets from it) and event
//! (transport resets, which we never send). The device runs on the device
//! event loop: a tx notification feeds the guest's packets to the
//! [`muxer::Muxer`], which may owe it replies; a socket becoming readable,
//! or the guest adding rx buffers, moves host data into rx buffers. Payload
//! goes through one bounded scratch buffer per direction; flow control
//! (see [`connection`]) keeps every per-connection buffer bounded too.

pub mod connection;
pub mod muxer;
pub mod packet;

use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use self::muxer::{Muxer, Payload};
use self::packet::{Header, MAX_PAYLOAD, RxBuffer};
use super::drain::{DrainEnd, Handled, drain};
use super::{
    ActivateError, QueueEvents, VIRTIO_RING_F_EVENT_IDX, VirtioDevice, VirtioInterrupt, feature,
    read_config_space,
};

/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// Packets moved per queue per wake-up before yielding to other devices.
const MAX_PACKETS_PER_WAKE: usize = 256;
/// Most rx buffers one socket read fills (a stream's data in 4 KiB
/// buffers: 64 KiB per readv).
const RX_BULK: usize = 16;
/// CIDs 0–2 are reserved (hypervisor, local, host) and `u32::MAX` is
/// VMADDR_CID_ANY; Linux takes a 32-bit CID.
pub const MIN_GUEST_CID: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest CID {0} is reserved or too large (use 3 ..= 4294967294)")]
    BadCid(u64),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Muxer(#[from] muxer::Error),
}

/// What the device did, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockCounters {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Chains that broke the rules, returned unused.
    pub malformed: u64,
}

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: [Queue; 3],
    queue_evts: [Arc<EventFd>; 3],
    /// A ring is corrupt: nothing more until a reset.
    broken: bool,
    /// Tx stopped because replies pile up; resume once rx moved.
    tx_stalled: bool,
}

/// A virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    active: Option<Active>,
    events: QueueEvents,
    counters: VsockCounters,
    tx_payload: Vec<u8>,
}

impl Vsock {
    /// A device for guest `guest_cid` whose host side is the unix socket
    /// `uds_path` (and `<uds_path>_<port>` for guest-initiated streams).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, Error> {
        if !(MIN_GUEST_CID..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(Error::BadCid(guest_cid));
        }
        Ok(Vsock {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path)?,
            active: None,
            events: QueueEvents::new().map_err(Error::EventFd)?,
            counters: VsockCounters::default(),
            tx_payload: Vec::with_capacity(MAX_PAYLOAD),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    pub fn counters(&self) -> VsockCounters {
        self.counters
    }

    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Feeds the guest's packets to the muxer.
    fn process_tx(&mut self, ops: &mut EventOps) {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let mem = &active.mem;
        let (muxer, payload, counters) =
            (&mut self.muxer, &mut self.tx_payload, &mut self.counters);
        let mut stalled = false;
        let drained = drain(
            &mut active.queues[TX],
            mem,
            MAX_PACKETS_PER_WAKE,
            "vsock tx",
            || false,
            |chain| {
                // A host socket is full: the packet waits in the ring.
                if muxer.tx_blocked() {
                    stalled = true;
                    return Ok::<_, virtio_queue::Error>(Handled::Keep);
                }
                match packet::read_tx(mem, chain, payload) {
                    Ok(header) => {
                        counters.tx_packets += 1;
                        counters.tx_bytes += payload.len() as u64;
                        muxer.handle_packet(&header, payload, ops);
                    }
                    Err(e) => {
                        tracing::debug!("vsock: malformed tx chain: {e}");
                        counters.malformed += 1;
                    }
                }
                Ok(Handled::Used(0))
            },
        );
        active.tx_stalled |= stalled;
        let result = drained.map(|d| (d.used, d.end == DrainEnd::Budget));
        let used = result.as_ref().map_or(0, |(used, _)| *used);
        self.finish(TX, used, result.map(|(_, more)| more));
    }

    /// Moves packets the muxer has for the guest into rx buffers.
    fn process_rx(&mut self, ops: &mut EventOps) {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return;
        };
        let mut used = 0;
        let mut budget = MAX_PACKETS_PER_WAKE;
        let result: Result<bool, virtio_queue::Error> = (|| {
            let mem = &active.mem;
            while self.muxer.has_rx() {
                if budget == 0 {
                    return Ok(true);
                }
                if self.muxer.next_is_bulk_data() {
                    let queue = &mut active.queues[RX];
                    let max = budget.min(RX_BULK);
                    let bulk = rx_bulk(&mut self.muxer, queue, mem, max, &mut self.counters, ops)?;
                    if let Some(sent) = bulk {
                        used += sent;
                        budget -= sent;
                        continue;
                    }
                }
                budget -= 1;
                let Some(chain) = active.queues[RX].iter(mem)?.next() else {
                    // Out of buffers: the driver's next refill wakes us.
                    if active.queues[RX].enable_notification(mem)? {
                        continue;
                    }
                    return Ok(false);
                };
                let head = chain.head_index();
                let len = match RxBuffer::new(mem, chain) {
                    Ok(buffer) => {
                        let room = buffer.payload_capacity().min(MAX_PAYLOAD);
                        let direct = buffer.contiguous_payload(mem);
                        let mut written = None;
                        let mut deliver = |header: &Header, payload: Payload| {
                            written = Some(match payload {
                                Payload::Bytes(bytes) => {
                                    (buffer.write(mem, header, bytes), bytes.len())
                                }
                                Payload::InPlace(n) => (buffer.write_header(mem, header, n), n),
                            });
                        };
                        if !self.muxer.next_rx(room, direct.as_ref(), ops, &mut deliver) {
                            active.queues[RX].go_to_previous_position();
                            return Ok(false);
                        }
                        match written {
                            Some((result, n)) => self.counters.count_rx(result, n),
                            None => 0,
                        }
                    }
                    Err(e) => {
                        tracing::debug!("vsock: malformed rx chain: {e}");
                        self.counters.malformed += 1;
                        0
                    }
                };
                if active.queues[RX].add_used(mem, head, len).is_ok() {
                    used += 1;
                }
            }
            Ok(false)
        })();
        if active.tx_stalled && !self.muxer.tx_blocked() {
            active.tx_stalled = false;
            let _ = active.queue_evts[TX].write(1);
        }
        self.finish(RX, used, result);
    }

    /// After a queue pass: interrupt the guest for `used` buffers, come
    /// back later if the budget ran out, or mark a corrupt ring.
    fn finish(&mut self, queue: usize, used: usize, result: Result<bool, virtio_queue::Error>) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        match result {
            Ok(more) => {
                if more {
                    let _ = active.queue_evts[queue].write(1);
                }
                if used > 0
                    && active.queues[queue]
                        .needs_notification(&active.mem)
                        .unwrap_or(true)
                {
                    if let Err(e) = active.interrupt.signal_used_queue() {
                        tracing::warn!("vsock: cannot raise the queue interrupt: {e}");
                    }
                }
            }
            Err(e) => {
                tracing::warn!("vsock: queue {queue} is corrupt, needs reset: {e}");
                active.broken = true;
                let _ = active.interrupt.signal_needs_reset();
            }
        }
    }
}

/// Fills up to `max` whole rx buffers (header and payload in one
/// descriptor) with one readv of the next connection's data. `None`: no
/// such buffer is next in the ring (the caller's packet-by-packet path
/// handles it); `Some(packets)` otherwise, 0 when nothing was read.
fn rx_bulk(
    muxer: &mut Muxer,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    max: usize,
    counters: &mut VsockCounters,
    ops: &mut EventOps,
) -> Result<Option<usize>, virtio_queue::Error> {
    let mut taken = Vec::with_capacity(max);
    while taken.len() < max {
        let Some(chain) = queue.iter(mem)?.next() else {
            break;
        };
        let head = chain.head_index();
        let whole = RxBuffer::new(mem, chain)
            .ok()
            .and_then(|b| Some((b.contiguous_payload(mem)?, b)));
        match whole {
            Some((payload, buffer)) => taken.push((head, buffer, payload)),
            None => {
                queue.go_to_previous_position();
                break;
            }
        }
    }
    if taken.is_empty() {
        return Ok(None);
    }
    let payloads: Vec<_> = taken.iter().map(|(_, _, p)| *p).collect();
    let Some((header, mut left)) = muxer.next_rx_bulk(&payloads, ops) else {
        taken.iter().for_each(|_| queue.go_to_previous_position());
        return Ok(Some(0));
    };
    let mut sent = 0;
    for (i, (head, buffer, payload)) in taken.iter().enumerate() {
        if left == 0 {
            // Unfilled buffers go back to the ring for later.
            (i..taken.len()).for_each(|_| queue.go_to_previous_position());
            break;
        }
        let len = left.min(payload.len());
        left -= len;
        let used_len = counters.count_rx(buffer.write_header(mem, &header, len), len);
        queue.add_used(mem, *head, used_len)?;
        sent += 1;
    }
    Ok(Some(sent))
}

impl VsockCounters {
    /// Counts an rx packet of `payload` bytes written to a guest buffer
    /// (or not); returns the buffer's used length.
    fn count_rx(&mut self, written: Result<u32, packet::Error>, payload: usize) -> u32 {
        match written {
            Ok(len) => {
                self.rx_packets += 1;
                self.rx_bytes += payload as u64;
                len
            }
            Err(e) => {
                tracing::debug!("vsock: cannot write an rx packet: {e}");
                self.malformed += 1;
                0
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn avail_features(&self) -> u64 {
        feature(VIRTIO_RING_F_EVENT_IDX)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "vsock: config write at {offset:#x} ({} bytes) ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<Arc<EventFd>>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        self.events.activate(
            &mut self.active,
            queues,
            queue_evts,
            |queues, queue_evts| Active {
                mem,
                interrupt,
                queues,
                queue_evts,
                broken: false,
                tx_stalled: false,
            },
        )?;
        tracing::debug!(cid = self.guest_cid, "vsock device activated");
        Ok(())
    }

    fn reset(&mut self) {
        // Connections are closed on the event loop (it owns their
        // registrations); guest memory is untouched from here on.
        self.events.deactivate(&mut self.active, "vsock");
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops);
        self.muxer.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.events.is_control(&events) {
            let wanted: &[Arc<EventFd>] = self
                .active
                .as_ref()
                .map(|a| &a.queue_evts[..])
                .unwrap_or_default();
            let wanted = wanted.to_vec();
            self.events.sync(ops, &wanted);
            if self.active.is_none() {
                self.muxer.clear(ops);
            }
            self.process_tx(ops);
            self.process_rx(ops);
            return;
        }
        match self.events.take_queue_event(&events) {
            Some(TX) => {
                self.process_tx(ops);
                self.process_rx(ops);
            }
            Some(RX) => self.process_rx(ops),
            Some(EVENT) | Some(_) => {}
            None if self.muxer.owns(events.fd()) => {
                let active = self.active.is_some();
                self.muxer.handle_event(&events, ops, active);
                self.process_rx(ops);
            }
            None => tracing::debug!("vsock: event for an unknown fd {}", events.fd()),
        }
    }
}

#[cfg(test)]
mod tests;
