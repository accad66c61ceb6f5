//! Test helpers shared by every virtio device: split virtqueues laid out in
//! plain guest memory as a driver would, and a driver that walks a
//! virtio-mmio transport through its initialisation. No VM needed.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::MmioTransport;
use crate::devices::bus::BusDevice;

pub const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// Guest RAM of `size` bytes at address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Buffer {
    /// A buffer the device reads (driver to device).
    pub fn readable(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes (device to driver).
    pub fn writable(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr,
            len,
            writable: true,
        }
    }
}

/// A split virtqueue in guest memory, seen from the driver's side:
/// descriptor table, available ring (with `used_event`) and used ring (with
/// `avail_event`), one after the other from `start`.
pub struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    size: u16,
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
    next_desc: u16,
}

impl<'a> TestQueue<'a> {
    /// Lays out an empty queue of `size` entries at `start` (16-aligned).
    pub fn new(mem: &'a GuestMemoryMmap, start: GuestAddress, size: u16) -> Self {
        assert!(size.is_power_of_two());
        assert_eq!(start.raw_value() % 16, 0);
        let n = u64::from(size);
        let desc_table = start;
        let avail_ring = desc_table.unchecked_add(16 * n);
        let used_ring = GuestAddress((avail_ring.raw_value() + 6 + 2 * n + 3) & !3);
        let queue = TestQueue {
            mem,
            size,
            desc_table,
            avail_ring,
            used_ring,
            next_desc: 0,
        };
        let len = queue.end().raw_value() - start.raw_value();
        mem.write_slice(&vec![0; len as usize], start)
            .expect("queue inside guest memory");
        queue
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// First address after the used ring.
    pub fn end(&self) -> GuestAddress {
        self.used_ring.unchecked_add(6 + 8 * u64::from(self.size))
    }

    /// A ready [`Queue`] on these rings, as a transport would hand it over.
    pub fn create_queue(&self) -> Queue {
        let mut queue = Queue::new(self.size).expect("queue size");
        queue.set_desc_table_address(
            Some(self.desc_table.raw_value() as u32),
            Some((self.desc_table.raw_value() >> 32) as u32),
        );
        queue.set_avail_ring_address(
            Some(self.avail_ring.raw_value() as u32),
            Some((self.avail_ring.raw_value() >> 32) as u32),
        );
        queue.set_used_ring_address(
            Some(self.used_ring.raw_value() as u32),
            Some((self.used_ring.raw_value() >> 32) as u32),
        );
        queue.set_ready(true);
        assert!(queue.is_valid(self.mem));
        queue
    }

    /// Writes descriptor `index` as is (for malformed chains).
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc_table.unchecked_add(16 * u64::from(index));
        self.mem.write_obj(addr.to_le(), at).expect("desc addr");
        self.mem
            .write_obj(len.to_le(), at.unchecked_add(8))
            .expect("desc len");
        self.mem
            .write_obj(flags.to_le(), at.unchecked_add(12))
            .expect("desc flags");
        self.mem
            .write_obj(next.to_le(), at.unchecked_add(14))
            .expect("desc next");
    }

    /// Writes `buffers` as a chain of consecutive free descriptors and
    /// makes it available; returns its head index.
    pub fn add_chain(&mut self, buffers: &[Buffer]) -> u16 {
        assert!(!buffers.is_empty() && buffers.len() <= usize::from(self.size));
        let head = self.next_desc;
        for (i, buffer) in buffers.iter().enumerate() {
            let index = self.next_desc;
            let next = (index + 1) % self.size;
            let mut flags = if buffer.writable { DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(index, buffer.addr, buffer.len, flags, next);
            self.next_desc = next;
        }
        self.publish(head);
        head
    }

    /// Puts `head` in the available ring and bumps its index.
    pub fn publish(&self, head: u16) {
        let idx: u16 = self.read(self.avail_ring.unchecked_add(2));
        let slot = u64::from(idx % self.size);
        self.write(self.avail_ring.unchecked_add(4 + 2 * slot), head);
        self.write(self.avail_ring.unchecked_add(2), idx.wrapping_add(1));
    }

    /// Sets the available ring's index directly (for corrupt rings).
    pub fn set_avail_idx(&self, idx: u16) {
        self.write(self.avail_ring.unchecked_add(2), idx);
    }

    pub fn used_idx(&self) -> u16 {
        self.read(self.used_ring.unchecked_add(2))
    }

    /// Used ring entry `index`: (descriptor id, bytes written).
    pub fn used_elem(&self, index: u16) -> (u32, u32) {
        let at = self
            .used_ring
            .unchecked_add(4 + 8 * u64::from(index % self.size));
        (self.read(at), self.read(at.unchecked_add(4)))
    }

    /// `used_event` (EVENT_IDX): interrupt me once this entry is used.
    pub fn set_used_event(&self, value: u16) {
        let at = self.avail_ring.unchecked_add(4 + 2 * u64::from(self.size));
        self.write(at, value);
    }

    /// `avail_event` (EVENT_IDX): where the device wants the next notify.
    pub fn avail_event(&self) -> u16 {
        self.read(self.used_ring.unchecked_add(4 + 8 * u64::from(self.size)))
    }

    /// Used ring flags (VRING_USED_F_NO_NOTIFY).
    pub fn used_flags(&self) -> u16 {
        self.read(self.used_ring)
    }

    fn read<T: vm_memory::ByteValued>(&self, at: GuestAddress) -> T {
        self.mem.read_obj(at).expect("ring inside guest memory")
    }

    fn write<T: vm_memory::ByteValued>(&self, at: GuestAddress, value: T) {
        self.mem
            .write_obj(value, at)
            .expect("ring inside guest memory")
    }
}

/// 32-bit register access to a transport, as a driver does it.
pub fn read_reg(transport: &mut MmioTransport, offset: u32) -> u32 {
    let mut data = [0u8; 4];
    transport.read(u64::from(offset), &mut data);
    u32::from_le_bytes(data)
}

pub fn write_reg(transport: &mut MmioTransport, offset: u32, value: u32) {
    transport.write(u64::from(offset), &value.to_le_bytes());
}

/// Writes QueueNum and the ring addresses of queue `index`, then QueueReady.
pub fn setup_queue(transport: &mut MmioTransport, index: u32, queue: &TestQueue) {
    write_reg(transport, reg::VIRTIO_MMIO_QUEUE_SEL, index);
    write_reg(
        transport,
        reg::VIRTIO_MMIO_QUEUE_NUM,
        u32::from(queue.size()),
    );
    let addresses = [
        (reg::VIRTIO_MMIO_QUEUE_DESC_LOW, queue.desc_table),
        (reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, queue.avail_ring),
        (reg::VIRTIO_MMIO_QUEUE_USED_LOW, queue.used_ring),
    ];
    for (low, address) in addresses {
        write_reg(transport, low, address.raw_value() as u32);
        write_reg(transport, low + 4, (address.raw_value() >> 32) as u32);
    }
    write_reg(transport, reg::VIRTIO_MMIO_QUEUE_READY, 1);
}

/// Status ACKNOWLEDGE, DRIVER, accepts `features`, FEATURES_OK.
pub fn negotiate(transport: &mut MmioTransport, features: u64) {
    write_reg(transport, reg::VIRTIO_MMIO_STATUS, 0);
    let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    write_reg(transport, reg::VIRTIO_MMIO_STATUS, status);
    status |= VIRTIO_CONFIG_S_DRIVER;
    write_reg(transport, reg::VIRTIO_MMIO_STATUS, status);
    for page in 0..2 {
        write_reg(transport, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, page);
        let bits = (features >> (32 * page)) as u32;
        write_reg(transport, reg::VIRTIO_MMIO_DRIVER_FEATURES, bits);
    }
    status |= VIRTIO_CONFIG_S_FEATURES_OK;
    write_reg(transport, reg::VIRTIO_MMIO_STATUS, status);
}

/// A full driver initialisation: negotiate, set up `queues`, DRIVER_OK.
pub fn activate(transport: &mut MmioTransport, features: u64, queues: &[&TestQueue]) {
    negotiate(transport, features);
    for (index, queue) in (0u32..).zip(queues) {
        setup_queue(transport, index, queue);
    }
    let status = read_reg(transport, reg::VIRTIO_MMIO_STATUS);
    write_reg(
        transport,
        reg::VIRTIO_MMIO_STATUS,
        status | VIRTIO_CONFIG_S_DRIVER_OK,
    );
}

/// An event loop for a device under test, run on the test's thread.
pub struct TestEventLoop<T: MutEventSubscriber + Send + 'static> {
    manager: EventManager<Arc<Mutex<T>>>,
}

impl<T: MutEventSubscriber + Send + 'static> TestEventLoop<T> {
    pub fn new(device: &Arc<Mutex<T>>) -> Self {
        use event_manager::SubscriberOps;
        let mut manager = EventManager::new().expect("event manager");
        manager.add_subscriber(device.clone());
        TestEventLoop { manager }
    }

    /// Handles whatever is pending, without waiting; returns how many
    /// events were handled.
    pub fn poll(&mut self) -> usize {
        self.manager.run_with_timeout(0).expect("event loop")
    }

    /// Waits up to `timeout_ms` for events and handles them.
    pub fn wait(&mut self, timeout_ms: i32) -> usize {
        self.manager
            .run_with_timeout(timeout_ms)
            .expect("event loop")
    }

    /// Polls until nothing is pending (bounded, so a device that keeps
    /// waking itself fails the test instead of hanging it).
    pub fn settle(&mut self) {
        for _ in 0..1000 {
            if self.poll() == 0 {
                return;
            }
        }
        panic!("the device never went idle");
    }
}
