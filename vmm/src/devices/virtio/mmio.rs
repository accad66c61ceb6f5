//! The virtio-mmio transport (virtio 1.2 §4.2, version 2 "modern" only):
//! the register window through which a driver discovers a device,
//! negotiates features, sets up queues and drives the status state machine.
//!
//! Every value a guest writes is checked: a queue becomes ready only with a
//! power-of-two size no larger than the device's maximum and rings that are
//! aligned and lie in guest RAM; the driver may accept only offered
//! features, and must accept `VIRTIO_F_VERSION_1`; an illegal status
//! transition or a failed activation sets DEVICE_NEEDS_RESET and raises a
//! config interrupt. Nothing a guest writes can make this code panic.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, MMIO_WINDOW_SIZE, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
    VirtioInterrupt, feature,
};
use crate::devices::bus::{BusDevice, lock};

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const VERSION: u32 = 2;
pub const VENDOR_ID: u32 = 0;
/// Offset of the QueueNotify register, where ioeventfds go.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device config space.
pub const CONFIG_SPACE_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("queue {index}: invalid maximum size {max_size} (a power of two up to 32768)")]
    QueueMaxSize { index: usize, max_size: u16 },
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] std::io::Error),
}

/// What the driver wrote for one queue. It becomes a [`Queue`] only when
/// the driver sets QueueReady and the values pass validation.
#[derive(Debug)]
struct QueueConfig {
    max_size: u16,
    size: u32,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    /// The validated queue, while QueueReady reads 1.
    ready: Option<Queue>,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: u32::from(max_size),
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            ready: None,
        }
    }

    /// The queue these values describe, if they are valid in `mem`.
    fn build(&self, mem: &GuestMemoryMmap) -> Result<Queue, &'static str> {
        let mut queue = Queue::new(self.max_size).map_err(|_| "maximum size")?;
        let size = u16::try_from(self.size).map_err(|_| "size")?;
        queue.try_set_size(size).map_err(|_| "size")?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|_| "descriptor table alignment")?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(|_| "available ring alignment")?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|_| "used ring alignment")?;
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err("rings outside guest memory");
        }
        Ok(queue)
    }
}

/// The virtio-mmio register window of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<QueueConfig>,
    queue_evts: Vec<Arc<EventFd>>,
    status: u32,
    activated: bool,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    /// The driver set a feature bit beyond the 64 this transport knows.
    driver_features_unknown: bool,
    queue_select: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("activated", &self.activated)
            .field("driver_features", &self.driver_features)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wraps `device`; creates its interrupt and one eventfd per queue.
    pub fn new(mem: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> Result<Self, Error> {
        let max_sizes = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for (index, &max_size) in max_sizes.iter().enumerate() {
            if Queue::new(max_size).is_err() {
                return Err(Error::QueueMaxSize { index, max_size });
            }
            queues.push(QueueConfig::new(max_size));
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
            queue_evts.push(Arc::new(evt));
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new().map_err(Error::EventFd)?),
            queues,
            queue_evts,
            status: 0,
            activated: false,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            driver_features_unknown: false,
            queue_select: 0,
        })
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device's interrupt; register its `irqfd()` with KVM.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// `(offset of QueueNotify, queue index, eventfd)` for each queue: the
    /// VMM registers each as a KVM ioeventfd at `base + offset` with the
    /// queue index as its 4-byte datamatch.
    pub fn ioeventfds(&self) -> Vec<(u64, u32, &EventFd)> {
        (0u32..)
            .zip(&self.queue_evts)
            .map(|(index, evt)| (QUEUE_NOTIFY_OFFSET, index, evt.as_ref()))
            .collect()
    }

    /// The Status register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Whether the device runs (DRIVER_OK was accepted and not reset since).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Tells the driver the config space changed; only once it drives the
    /// device (DRIVER_OK).
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        if self.status & DRIVER_OK != 0 {
            self.interrupt.signal_config_change()
        } else {
            Ok(())
        }
    }

    fn offered_features(&self) -> u64 {
        lock(&self.device).avail_features() | feature(VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_select as usize)
    }

    fn read_register(&self, offset: u32) -> u32 {
        match offset {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            reg::VIRTIO_MMIO_VERSION => VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => {
                feature_page(self.offered_features(), self.device_features_select)
            }
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size))
            }
            reg::VIRTIO_MMIO_QUEUE_NUM => self.selected_queue().map_or(0, |q| q.size),
            reg::VIRTIO_MMIO_QUEUE_READY => self
                .selected_queue()
                .map_or(0, |q| u32::from(q.ready.is_some())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => self.status(),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => self.queue_address(|q| q.desc_table, false),
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => self.queue_address(|q| q.desc_table, true),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.queue_address(|q| q.avail_ring, false),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.queue_address(|q| q.avail_ring, true),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => self.queue_address(|q| q.used_ring, false),
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.queue_address(|q| q.used_ring, true),
            reg::VIRTIO_MMIO_CONFIG_GENERATION => lock(&self.device).config_generation(),
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn queue_address(&self, field: impl Fn(&QueueConfig) -> u64, high: bool) -> u32 {
        let value = self.selected_queue().map_or(0, field);
        if high {
            (value >> 32) as u32
        } else {
            value as u32
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            reg::VIRTIO_MMIO_QUEUE_NUM => self.update_queue(|q| q.size = value),
            reg::VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(value),
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::VIRTIO_MMIO_STATUS => self.write_status(value),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.update_queue(|q| set_low(&mut q.desc_table, value))
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.update_queue(|q| set_high(&mut q.desc_table, value))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.update_queue(|q| set_low(&mut q.avail_ring, value))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.update_queue(|q| set_high(&mut q.avail_ring, value))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.update_queue(|q| set_low(&mut q.used_ring, value))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.update_queue(|q| set_high(&mut q.used_ring, value))
            }
            _ => tracing::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    /// DriverFeatures is writable between DRIVER and FEATURES_OK only.
    fn write_driver_features(&mut self, value: u32) {
        if self.status != ACKNOWLEDGE | DRIVER || self.interrupt.needs_reset() {
            tracing::debug!(
                "virtio-mmio: driver features written in status {:#x}",
                self.status
            );
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => self.driver_features_unknown |= value != 0,
        }
    }

    /// The driver's features are a subset of ours and include VERSION_1.
    fn features_acceptable(&self) -> bool {
        let unoffered = self.driver_features & !self.offered_features();
        let modern = self.driver_features & feature(VIRTIO_F_VERSION_1) != 0;
        if unoffered != 0 || self.driver_features_unknown || !modern {
            tracing::debug!(
                unoffered = format!("{unoffered:#x}"),
                modern,
                "virtio-mmio: refusing the driver's features"
            );
            return false;
        }
        true
    }

    /// Queue registers are writable between FEATURES_OK and DRIVER_OK, for
    /// a queue that is not ready yet.
    fn update_queue(&mut self, update: impl FnOnce(&mut QueueConfig)) {
        if !self.queue_setup_allowed() {
            return;
        }
        match self.queues.get_mut(self.queue_select as usize) {
            Some(q) if q.ready.is_none() => update(q),
            Some(_) => tracing::debug!("virtio-mmio: queue changed while ready"),
            None => tracing::debug!("virtio-mmio: no queue {}", self.queue_select),
        }
    }

    fn queue_setup_allowed(&self) -> bool {
        let allowed = self.status & (FEATURES_OK | DRIVER_OK | FAILED) == FEATURES_OK
            && !self.interrupt.needs_reset();
        if !allowed {
            tracing::debug!("virtio-mmio: queue set up in status {:#x}", self.status);
        }
        allowed
    }

    fn write_queue_ready(&mut self, value: u32) {
        if !self.queue_setup_allowed() {
            return;
        }
        let index = self.queue_select as usize;
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        if value == 0 {
            q.ready = None;
            return;
        }
        if q.ready.is_some() {
            return;
        }
        let built = q.build(&self.mem).and_then(|queue| {
            let others = self.queues.iter().filter_map(|q| q.ready.as_ref());
            if rings_overlap(&queue, others) {
                Err("rings overlapping a used ring")
            } else {
                Ok(queue)
            }
        });
        match built {
            Ok(queue) => self.queues[index].ready = Some(queue),
            Err(reason) => {
                tracing::debug!(
                    queue = index,
                    "virtio-mmio: queue stays not ready: invalid {reason}"
                );
            }
        }
    }

    /// A QueueNotify write that reached us (no ioeventfd matched it).
    fn notify(&mut self, index: u32) {
        if !self.activated || self.interrupt.needs_reset() {
            tracing::debug!("virtio-mmio: notify before DRIVER_OK ignored");
            return;
        }
        match self.queue_evts.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::debug!("virtio-mmio: cannot signal queue {index}: {e}");
                }
            }
            None => tracing::debug!("virtio-mmio: notify of unknown queue {index}"),
        }
    }

    /// The device status state machine: ACKNOWLEDGE, DRIVER, FEATURES_OK,
    /// DRIVER_OK in that order, 0 resets, FAILED may be set any time.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if self.interrupt.needs_reset() {
            tracing::debug!("virtio-mmio: status {value:#x} ignored until reset");
            return;
        }
        if value == self.status {
            return;
        }
        if value & FAILED != 0 && value & !FAILED == self.status {
            tracing::debug!("virtio-mmio: the driver gave up on the device");
            self.status = value;
            return;
        }
        let next = self.status_transition(value);
        match next {
            Some(FEATURES_OK) => {
                if self.features_acceptable() {
                    self.status = value;
                }
            }
            Some(DRIVER_OK) => {
                self.status = value;
                if let Err(e) = self.activate() {
                    tracing::warn!("virtio-mmio: device activation failed: {e}");
                    self.set_needs_reset();
                }
            }
            Some(_) => self.status = value,
            None => {
                tracing::debug!(
                    "virtio-mmio: illegal status transition {:#x} -> {value:#x}",
                    self.status
                );
                self.set_needs_reset();
            }
        }
    }

    /// The bit a legal transition from the current status sets.
    fn status_transition(&self, value: u32) -> Option<u32> {
        const STEPS: [u32; 4] = [ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK];
        let mut reached = 0;
        for step in STEPS {
            if self.status == reached && value == reached | step {
                return Some(step);
            }
            reached |= step;
        }
        None
    }

    fn set_needs_reset(&self) {
        if let Err(e) = self.interrupt.signal_needs_reset() {
            tracing::warn!("virtio-mmio: cannot raise a config interrupt: {e}");
        }
    }

    /// Hands the ready queues and their eventfds to the device.
    fn activate(&mut self) -> Result<(), ActivateError> {
        let event_idx = self.driver_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            let mut queue = match &q.ready {
                // Checked again: QueueReady may have been set long ago.
                Some(_) => q
                    .build(&self.mem)
                    .map_err(|_| ActivateError::QueueNotReady(queues.len()))?,
                None => Queue::new(q.max_size)
                    .map_err(|_| ActivateError::QueueNotReady(queues.len()))?,
            };
            queue.set_event_idx(event_idx);
            queues.push(queue);
        }
        // Notifications before DRIVER_OK are ignored.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        lock(&self.device).activate(
            self.mem.clone(),
            self.interrupt.clone(),
            queues,
            self.queue_evts.clone(),
            self.driver_features,
        )?;
        self.activated = true;
        tracing::debug!(
            features = format!("{:#x}", self.driver_features),
            "virtio device activated"
        );
        Ok(())
    }

    /// Status 0: the device stops and every register returns to its
    /// initial value.
    fn reset(&mut self) {
        lock(&self.device).reset();
        self.activated = false;
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.driver_features_unknown = false;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.interrupt.reset();
    }
}

/// The guest-physical ranges of a queue's rings: descriptor table,
/// available ring, used ring (all within guest RAM, so no overflow).
fn ring_ranges(queue: &Queue) -> [std::ops::Range<u64>; 3] {
    let size = u64::from(queue.size());
    let range = |start: u64, len: u64| start..start + len;
    [
        range(queue.desc_table(), 16 * size),
        range(queue.avail_ring(), 6 + 2 * size),
        range(queue.used_ring(), 6 + 8 * size),
    ]
}

/// Whether a used ring (which the device writes) overlaps another ring of
/// `new` or of the `ready` queues. A driver that does this could make the
/// device feed itself work by writing the used ring.
fn rings_overlap<'a>(new: &Queue, ready: impl Iterator<Item = &'a Queue>) -> bool {
    let overlap =
        |a: &std::ops::Range<u64>, b: &std::ops::Range<u64>| a.start < b.end && b.start < a.end;
    let [desc, avail, used] = ring_ranges(new);
    if overlap(&used, &desc) || overlap(&used, &avail) {
        return true;
    }
    ready.into_iter().any(|other| {
        let [other_desc, other_avail, other_used] = ring_ranges(other);
        [&other_desc, &other_avail, &other_used]
            .iter()
            .any(|ring| overlap(&used, ring))
            || overlap(&other_used, &desc)
            || overlap(&other_used, &avail)
    })
}

fn feature_page(features: u64, page: u32) -> u32 {
    match page {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

fn set_low(address: &mut u64, value: u32) {
    *address = (*address & !0xffff_ffff) | u64::from(value);
}

fn set_high(address: &mut u64, value: u32) {
    *address = (*address & 0xffff_ffff) | (u64::from(value) << 32);
}

/// Registers are 32 bits wide and aligned; anything else is ignored (reads
/// return zeros).
fn register_offset(offset: u64, len: usize) -> Option<u32> {
    (offset < CONFIG_SPACE_OFFSET && offset % 4 == 0 && len == 4).then_some(offset as u32)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if (CONFIG_SPACE_OFFSET..MMIO_WINDOW_SIZE).contains(&offset) {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match register_offset(offset, data.len()) {
            Some(offset) => data.copy_from_slice(&self.read_register(offset).to_le_bytes()),
            None => {
                tracing::debug!("virtio-mmio: bad read at {offset:#x} len {}", data.len());
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if (CONFIG_SPACE_OFFSET..MMIO_WINDOW_SIZE).contains(&offset) {
            if self.status & DRIVER != 0 && !self.interrupt.needs_reset() {
                lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        let value = <[u8; 4]>::try_from(data).map(u32::from_le_bytes);
        match (register_offset(offset, data.len()), value) {
            (Some(offset), Ok(value)) => self.write_register(offset, value),
            _ => tracing::debug!("virtio-mmio: bad write at {offset:#x} len {}", data.len()),
        }
    }
}

#[cfg(test)]
mod tests;
