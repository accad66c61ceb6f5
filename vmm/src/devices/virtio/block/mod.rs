//! virtio-blk: one request queue, a raw image file or host block device
//! behind it, or nothing at all.
//!
//! A block device is a **slot**: it may be created empty (capacity 0) and
//! its backing set, replaced or removed while the guest runs
//! ([`Block::set_backing`]); the new capacity reaches the guest through a
//! config-change interrupt. Whether the guest sees a read-only disk
//! (`VIRTIO_BLK_F_RO`) is fixed when the device is created, because the
//! driver reads it only once; a read-only backing in a writable slot
//! refuses writes with `VIRTIO_BLK_S_IOERR`.
//!
//! Requests are handled on the disk's own device thread when the queue's
//! eventfd fires, never on a vCPU thread, by the device's queue handler
//! ([`BlockQueue`], the `event_manager::MutEventSubscriber`). The handler
//! has a lock of its own and takes nothing else while it does I/O: a vCPU
//! reading the config space locks only the [`Block`] (the transport's
//! view: serial, capacity, features, config generation), so it never
//! waits for a disk. The two share the backing (an `Arc<Disk>` swapped
//! under a lock held only to clone it) and the counters. A reset asks the
//! handler to stop between requests, then waits for the one in flight at
//! most. One wake-up handles at most [`MAX_REQUESTS_PER_WAKE`] requests,
//! then yields to the other devices.

pub mod disk;
mod handler;
pub mod request;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use self::disk::Disk;
use self::handler::RequestHandler;
use self::request::MAX_REQUEST_BYTES;
use super::drain::{DrainEnd, Drained, Handled, drain};
use super::{
    ActivateError, QueueEvents, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice,
    VirtioInterrupt, feature, read_config_space,
};
use crate::devices::bus::lock;

/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest data segment the driver may use (SIZE_MAX). With one page, the
/// guest split every 1 MiB read in two (254 segments of 4 KiB) and spent its
/// time building descriptor chains; 64 KiB lets contiguous pages merge.
pub const SEGMENT_MAX: u32 = 64 * 1024;
/// Most data segments per request (SEG_MAX): the queue less header and
/// status. SEGMENT_MAX × SEGMENTS_MAX stays below [`MAX_REQUEST_BYTES`].
pub const SEGMENTS_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Requests handled per event-loop wake-up before yielding.
pub const MAX_REQUESTS_PER_WAKE: usize = 64;
/// Longest serial (`VIRTIO_BLK_T_GET_ID`).
pub const SERIAL_MAX: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Bytes of config space: capacity, size_max, seg_max.
const CONFIG_LEN: usize = 16;

const _: () = assert!(SEGMENT_MAX as u64 * SEGMENTS_MAX as u64 <= MAX_REQUEST_BYTES);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("serial {0:?} is longer than {SERIAL_MAX} bytes")]
    SerialTooLong(String),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Disk(#[from] disk::Error),
}

/// What the device did, for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockCounters {
    pub requests: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub flushes: u64,
    /// Requests answered with VIRTIO_BLK_S_IOERR.
    pub io_errors: u64,
    /// Requests answered with VIRTIO_BLK_S_UNSUPP.
    pub unsupported: u64,
    /// Chains too broken to answer, returned with used length 0.
    pub dropped: u64,
}

impl BlockCounters {
    fn add(&mut self, other: &BlockCounters) {
        self.requests += other.requests;
        self.read_bytes += other.read_bytes;
        self.written_bytes += other.written_bytes;
        self.flushes += other.flushes;
        self.io_errors += other.io_errors;
        self.unsupported += other.unsupported;
        self.dropped += other.dropped;
    }
}

/// The device once the driver activated it.
#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queue: Queue,
    queue_evt: Arc<EventFd>,
    /// The ring is corrupt: nothing more is done until a reset.
    broken: bool,
}

/// What the device and its queue handler share.
#[derive(Debug, Default)]
struct Shared {
    /// The backing; the handler clones it per request.
    disk: Mutex<Option<Arc<Disk>>>,
    counters: Mutex<BlockCounters>,
    /// A reset is under way: take no more requests.
    stop: AtomicBool,
}

/// A virtio-blk device (a slot that may be empty): what the transport and
/// the API see. Its requests are served by [`Block::queue_handler`].
#[derive(Debug)]
pub struct Block {
    serial: String,
    read_only: bool,
    disk: Option<Arc<Disk>>,
    config_generation: u32,
    /// The driver's interrupt while active (config changes go through it
    /// without waiting for the queue handler).
    interrupt: Option<Arc<VirtioInterrupt>>,
    shared: Arc<Shared>,
    queue: Arc<Mutex<BlockQueue>>,
}

/// The request queue of a [`Block`], served on the device thread.
#[derive(Debug)]
pub struct BlockQueue {
    serial: String,
    active: Option<Active>,
    events: QueueEvents,
    shared: Arc<Shared>,
}

impl Block {
    /// An empty slot named `serial` (at most 20 bytes, returned by
    /// GET_ID). With `read_only` the guest sees a read-only disk and every
    /// backing is opened read-only.
    pub fn new(serial: impl Into<String>, read_only: bool) -> Result<Block, Error> {
        let serial = serial.into();
        if serial.len() > SERIAL_MAX {
            return Err(Error::SerialTooLong(serial));
        }
        let shared = Arc::new(Shared::default());
        let queue = BlockQueue {
            serial: serial.clone(),
            active: None,
            events: QueueEvents::new().map_err(Error::EventFd)?,
            shared: shared.clone(),
        };
        Ok(Block {
            serial,
            read_only,
            disk: None,
            config_generation: 0,
            interrupt: None,
            shared,
            queue: Arc::new(Mutex::new(queue)),
        })
    }

    /// A device with `path` as its backing.
    pub fn with_backing(
        serial: impl Into<String>,
        path: &Path,
        read_only: bool,
    ) -> Result<Block, Error> {
        let mut block = Block::new(serial, read_only)?;
        block.set_backing(Some(path), read_only)?;
        Ok(block)
    }

    /// Opens `path` as the new backing (read-only if asked or if the
    /// device is), or removes the backing with `None`.
    pub fn set_backing(&mut self, path: Option<&Path>, read_only: bool) -> Result<(), Error> {
        let disk = match path {
            Some(path) => Some(Disk::open(path, read_only || self.read_only)?),
            None => None,
        };
        self.set_disk(disk);
        Ok(())
    }

    /// Replaces the backing with `disk` (opened by the caller), updates the
    /// capacity and tells an active driver its config changed.
    pub fn set_disk(&mut self, disk: Option<Disk>) {
        tracing::info!(
            serial = self.serial,
            disk = ?disk.as_ref().map(|d| d.path().display().to_string()),
            sectors = disk.as_ref().map_or(0, Disk::sectors),
            "block backing changed"
        );
        let disk = disk.map(Arc::new);
        // Requests already taken finish on the old file; the next get this.
        *lock(&self.shared.disk) = disk.clone();
        self.disk = disk;
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Some(interrupt) = &self.interrupt {
            if let Err(e) = interrupt.signal_config_change() {
                tracing::warn!(
                    "block {}: cannot raise a config interrupt: {e}",
                    self.serial
                );
            }
        }
    }

    /// The queue handler, to subscribe to the device thread's event loop.
    pub fn queue_handler(&self) -> Arc<Mutex<BlockQueue>> {
        self.queue.clone()
    }

    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Whether the guest sees a read-only disk (fixed at creation).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Capacity in 512-byte sectors (0 for an empty slot).
    pub fn capacity(&self) -> u64 {
        self.disk.as_deref().map_or(0, Disk::sectors)
    }

    pub fn disk(&self) -> Option<&Disk> {
        self.disk.as_deref()
    }

    pub fn counters(&self) -> BlockCounters {
        *lock(&self.shared.counters)
    }

    pub fn is_active(&self) -> bool {
        self.interrupt.is_some()
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&self.capacity().to_le_bytes());
        config[8..12].copy_from_slice(&SEGMENT_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEGMENTS_MAX.to_le_bytes());
        config
    }
}

impl BlockQueue {
    /// Handles the available requests, within the per-wake budget.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.broken {
            return;
        }
        let mut handler = RequestHandler {
            shared: &self.shared,
            serial: self.serial.as_bytes(),
        };
        match drain_queue(active, &mut handler, &self.shared.stop) {
            Ok(Drained { used, end }) => {
                if end == DrainEnd::Budget {
                    // Come back after the other devices had their turn.
                    let _ = active.queue_evt.write(1);
                }
                if used > 0 {
                    signal_used(active);
                }
            }
            Err(e) => {
                tracing::warn!("block {}: queue is corrupt, needs reset: {e}", self.serial);
                active.broken = true;
                let _ = active.interrupt.signal_needs_reset();
            }
        }
    }
}

fn signal_used(active: &mut Active) {
    match active.queue.needs_notification(&active.mem) {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = active.interrupt.signal_used_queue() {
                tracing::warn!("block: cannot raise the queue interrupt: {e}");
            }
        }
    }
}

/// Pops, handles and returns chains until the ring is empty, the budget
/// is spent or a reset asks to stop.
fn drain_queue(
    active: &mut Active,
    handler: &mut RequestHandler,
    stop: &AtomicBool,
) -> Result<Drained, virtio_queue::Error> {
    let mem = &active.mem;
    drain(
        &mut active.queue,
        mem,
        MAX_REQUESTS_PER_WAKE,
        "block",
        || stop.load(Ordering::Acquire),
        |chain| Ok::<_, virtio_queue::Error>(Handled::Used(handler.handle(mem, chain))),
    )
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut features = feature(VIRTIO_BLK_F_SIZE_MAX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_FLUSH)
            | feature(VIRTIO_RING_F_EVENT_IDX)
            | feature(VIRTIO_RING_F_INDIRECT_DESC);
        if self.read_only {
            features |= feature(VIRTIO_BLK_F_RO);
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "block: config write at {offset:#x} ({} bytes) ignored",
            data.len()
        );
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<Arc<EventFd>>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        // Not active: the handler is idle and its lock free at once.
        let mut handler = lock(&self.queue);
        let BlockQueue { events, active, .. } = &mut *handler;
        events.activate(active, queues, queue_evts, |[queue], [queue_evt]| Active {
            mem,
            interrupt: interrupt.clone(),
            queue,
            queue_evt,
            broken: false,
        })?;
        self.shared.stop.store(false, Ordering::Release);
        self.interrupt = Some(interrupt);
        tracing::debug!(serial = self.serial, "block device activated");
        Ok(())
    }

    fn reset(&mut self) {
        // Stop between requests, then wait for the one in flight.
        self.shared.stop.store(true, Ordering::Release);
        self.interrupt = None;
        let mut handler = lock(&self.queue);
        let BlockQueue { events, active, .. } = &mut *handler;
        events.deactivate(active, &format!("block {}", self.serial));
    }
}

impl MutEventSubscriber for BlockQueue {
    fn init(&mut self, ops: &mut EventOps) {
        self.events.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.events.is_control(&events) {
            let wanted = self
                .active
                .as_ref()
                .map(|a| std::slice::from_ref(&a.queue_evt))
                .unwrap_or_default();
            self.events.sync(ops, wanted);
            self.process_queue();
        } else if self.events.take_queue_event(&events).is_some() {
            self.process_queue();
        }
    }
}

#[cfg(test)]
mod tests;
