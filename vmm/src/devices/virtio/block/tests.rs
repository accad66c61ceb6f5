//! The block device end to end on plain guest memory: requests through its
//! queue, its event loop, slots, and hostile chains.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Mutex;

use tempfile::NamedTempFile;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_mmio as reg;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_utils::{
    self, Buffer, DESC_F_NEXT, DESC_F_WRITE, TestEventLoop, TestQueue, guest_memory, read_reg,
    write_reg,
};
use crate::devices::virtio::{INTERRUPT_CONFIG, INTERRUPT_VRING, VIRTIO_F_VERSION_1};

const HEADER: u64 = 0x10000;
const STATUS: u64 = 0x18000;
const DATA: u64 = 0x20000;
const MEM_SIZE: usize = 0x40_0000;
const DISK_SECTORS: u64 = 16;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// A disk image whose sector `n` is filled with byte `n`.
fn disk_image(sectors: u64) -> NamedTempFile {
    let mut file = NamedTempFile::new().unwrap();
    for n in 0..sectors {
        file.write_all(&[n as u8; 512]).unwrap();
    }
    file
}

fn file_bytes(file: &NamedTempFile) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut f = file.reopen().unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut bytes).unwrap();
    bytes
}

/// A block device activated on `vq`, with its event loop.
struct Device {
    block: Arc<Mutex<Block>>,
    interrupt: Arc<VirtioInterrupt>,
    queue_evt: Arc<EventFd>,
    events: TestEventLoop<BlockQueue>,
}

impl Device {
    fn new(mem: &GuestMemoryMmap, vq: &TestQueue, block: Block) -> Device {
        Device::with_queue(mem, vq.create_queue(), block)
    }

    fn with_queue(mem: &GuestMemoryMmap, queue: Queue, block: Block) -> Device {
        let mut events = TestEventLoop::new(&block.queue_handler());
        let block = Arc::new(Mutex::new(block));
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let queue_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        block
            .lock()
            .unwrap()
            .activate(
                mem.clone(),
                interrupt.clone(),
                vec![queue],
                vec![queue_evt.clone()],
                0,
            )
            .unwrap();
        events.settle();
        Device {
            block,
            interrupt,
            queue_evt,
            events,
        }
    }

    /// The driver's doorbell, then the event loop runs dry.
    fn kick(&mut self) {
        self.queue_evt.write(1).unwrap();
        self.events.settle();
    }

    fn counters(&self) -> BlockCounters {
        self.block.lock().unwrap().counters()
    }
}

fn write_header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&kind.to_le_bytes());
    bytes[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(HEADER)).unwrap();
}

/// Queues header, `data` and a status byte (set to 0xff beforehand).
fn submit(
    mem: &GuestMemoryMmap,
    vq: &mut TestQueue,
    kind: u32,
    sector: u64,
    data: &[Buffer],
) -> u16 {
    write_header(mem, kind, sector);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut chain = vec![Buffer::readable(HEADER, 16)];
    chain.extend_from_slice(data);
    chain.push(Buffer::writable(STATUS, 1));
    vq.add_chain(&chain)
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn guest_bytes(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(at)).unwrap();
    bytes
}

fn setup() -> (GuestMemoryMmap, NamedTempFile) {
    (guest_memory(MEM_SIZE), disk_image(DISK_SECTORS))
}

#[test]
fn reads_sectors_into_guest_buffers() {
    let (mem, file) = setup();
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    // Two buffers, the second in another page.
    let head = submit(
        &mem,
        &mut vq,
        VIRTIO_BLK_T_IN,
        2,
        &[
            Buffer::writable(DATA, 512),
            Buffer::writable(DATA + 0x3000, 1024),
        ],
    );
    dev.kick();
    assert_eq!(status(&mem), S_OK);
    assert_eq!(vq.used_idx(), 1);
    assert_eq!(vq.used_elem(0), (u32::from(head), 1536 + 1));
    assert_eq!(guest_bytes(&mem, DATA, 512), vec![2; 512]);
    let second = guest_bytes(&mem, DATA + 0x3000, 1024);
    assert_eq!(&second[..512], &[3; 512][..]);
    assert_eq!(&second[512..], &[4; 512][..]);
    assert_eq!(dev.interrupt.take_count(), 1);
    assert_eq!(dev.interrupt.status(), INTERRUPT_VRING);
    assert_eq!(dev.counters().read_bytes, 1536);
    assert_eq!(vq.used_flags(), 0, "notifications enabled again when idle");
}

#[test]
fn writes_and_flushes() {
    let (mem, file) = setup();
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
    let head = submit(
        &mem,
        &mut vq,
        VIRTIO_BLK_T_OUT,
        5,
        &[Buffer::readable(DATA, 1024)],
    );
    dev.kick();
    assert_eq!(status(&mem), S_OK);
    assert_eq!(vq.used_elem(0), (u32::from(head), 1));
    let bytes = file_bytes(&file);
    assert_eq!(&bytes[5 * 512..7 * 512], &[0xab; 1024][..]);
    assert_eq!(&bytes[4 * 512..5 * 512], &[4; 512][..]);
    assert_eq!(&bytes[7 * 512..8 * 512], &[7; 512][..]);

    submit(&mem, &mut vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    dev.kick();
    assert_eq!(status(&mem), S_OK);
    assert_eq!(vq.used_elem(1).1, 1);
    let counters = dev.counters();
    assert_eq!((counters.written_bytes, counters.flushes), (1024, 1));
}

#[test]
fn get_id_returns_the_padded_serial() {
    let (mem, file) = setup();
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::with_backing("rootfs", file.path(), true).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    mem.write_slice(&[0xee; 32], GuestAddress(DATA)).unwrap();
    submit(
        &mem,
        &mut vq,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[Buffer::writable(DATA, 32)],
    );
    dev.kick();
    assert_eq!(status(&mem), S_OK);
    assert_eq!(vq.used_elem(0).1, 20 + 1);
    let mut want = b"rootfs".to_vec();
    want.resize(20, 0);
    want.extend_from_slice(&[0xee; 12]);
    assert_eq!(guest_bytes(&mem, DATA, 32), want);

    // A short buffer gets the start of the serial.
    submit(
        &mem,
        &mut vq,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[Buffer::writable(DATA + 0x100, 4)],
    );
    dev.kick();
    assert_eq!(guest_bytes(&mem, DATA + 0x100, 4), b"root");
    assert_eq!(vq.used_elem(1).1, 5);
}

#[test]
fn serials_are_at_most_twenty_bytes() {
    assert!(Block::new("a".repeat(20), false).is_ok());
    assert!(matches!(
        Block::new("a".repeat(21), false),
        Err(Error::SerialTooLong(_))
    ));
}

#[test]
fn read_only_disks_refuse_writes() {
    let (mem, file) = setup();
    let before = file_bytes(&file);
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::with_backing("ro", file.path(), true).unwrap();
    assert_ne!(block.avail_features() & feature(VIRTIO_BLK_F_RO), 0);
    let mut dev = Device::new(&mem, &vq, block);
    submit(
        &mem,
        &mut vq,
        VIRTIO_BLK_T_OUT,
        0,
        &[Buffer::readable(DATA, 512)],
    );
    dev.kick();
    assert_eq!(status(&mem), S_IOERR);
    assert_eq!(file_bytes(&file), before);
    submit(
        &mem,
        &mut vq,
        VIRTIO_BLK_T_IN,
        0,
        &[Buffer::writable(DATA, 512)],
    );
    dev.kick();
    assert_eq!(status(&mem), S_OK);
    submit(&mem, &mut vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    dev.kick();
    assert_eq!(status(&mem), S_OK);
    assert_eq!(dev.counters().io_errors, 1);

    // A read-only backing in a writable slot: the guest sees a writable
    // disk, but writes fail.
    let writable = Block::with_backing("rw", file.path(), false).unwrap();
    assert_eq!(writable.avail_features() & feature(VIRTIO_BLK_F_RO), 0);
    let mut slot = Block::new("slot", false).unwrap();
    slot.set_backing(Some(file.path()), true).unwrap();
    assert!(slot.disk().unwrap().read_only());
}

#[test]
fn requests_past_the_end_fail() {
    let (mem, file) = setup();
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    let cases = [
        (VIRTIO_BLK_T_IN, DISK_SECTORS, 512),
        (VIRTIO_BLK_T_IN, DISK_SECTORS - 1, 1024),
        (VIRTIO_BLK_T_IN, u64::MAX, 512),
        (VIRTIO_BLK_T_OUT, DISK_SECTORS, 512),
        (VIRTIO_BLK_T_OUT, u64::MAX >> 9, 512),
    ];
    for (kind, sector, len) in cases {
        let buffer = if kind == VIRTIO_BLK_T_IN {
            Buffer::writable(DATA, len)
        } else {
            Buffer::readable(DATA, len)
        };
        submit(&mem, &mut vq, kind, sector, &[buffer]);
        dev.kick();
        assert_eq!(status(&mem), S_IOERR, "{kind} at {sector}");
    }
    // The last sector is fine.
    submit(
        &mem,
        &mut vq,
        VIRTIO_BLK_T_IN,
        DISK_SECTORS - 1,
        &[Buffer::writable(DATA, 512)],
    );
    dev.kick();
    assert_eq!(status(&mem), S_OK);
    assert_eq!(file_bytes(&file).len() as u64, DISK_SECTORS * 512);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let (mem, file) = setup();
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    for kind in [2, 11, 13, 0x8000_0000] {
        submit(&mem, &mut vq, kind, 0, &[]);
        dev.kick();
        assert_eq!(status(&mem), S_UNSUPP, "type {kind}");
    }
    assert_eq!(dev.counters().unsupported, 4);
}

#[test]
fn indirect_descriptor_tables_are_followed() {
    let (mem, file) = setup();
    let vq = TestQueue::new(&mem, GuestAddress(0), 16);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    write_header(&mem, VIRTIO_BLK_T_IN, 3);
    let table = TestQueue::new(&mem, GuestAddress(0x30000), 4);
    table.write_desc(0, HEADER, 16, DESC_F_NEXT, 1);
    table.write_desc(1, DATA, 512, DESC_F_WRITE | DESC_F_NEXT, 2);
    table.write_desc(2, STATUS, 1, DESC_F_WRITE, 0);
    let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
    vq.write_desc(0, 0x30000, 3 * 16, indirect, 0);
    vq.publish(0);
    dev.kick();
    assert_eq!(status(&mem), S_OK);
    assert_eq!(guest_bytes(&mem, DATA, 512), vec![3; 512]);

    // A table outside guest RAM, a misaligned table, a nested indirect
    // descriptor: nothing to answer, the chain comes back empty-handed.
    table.write_desc(1, 0x30000, 16, indirect, 0);
    let bad_tables = [(MEM_SIZE as u64, 48), (0x30000, 20), (0x30010, 16)];
    for (i, (addr, len)) in (1u16..).zip(bad_tables) {
        vq.write_desc(i, addr, len, indirect, 0);
        vq.publish(i);
        dev.kick();
        assert_eq!(vq.used_elem(i), (u32::from(i), 0), "table at {addr:#x}");
    }
    assert_eq!(dev.counters().dropped, 3);
}

#[test]
fn empty_slots_take_a_backing_at_runtime() {
    let mem = guest_memory(MEM_SIZE);
    let small = disk_image(4);
    let large = disk_image(64);
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::new("slot0", true).unwrap();
    assert_eq!(block.capacity(), 0);
    let mut config = [0xffu8; 8];
    block.read_config(0, &mut config);
    assert_eq!(config, [0; 8]);
    let mut dev = Device::new(&mem, &vq, block);

    submit(
        &mem,
        &mut vq,
        VIRTIO_BLK_T_IN,
        0,
        &[Buffer::writable(DATA, 512)],
    );
    dev.kick();
    assert_eq!(status(&mem), S_IOERR, "nothing to read yet");
    dev.interrupt.take_count();
    dev.interrupt.acknowledge(u32::MAX);

    let capacity = |dev: &Device| {
        let mut bytes = [0u8; 8];
        dev.block.lock().unwrap().read_config(0, &mut bytes);
        u64::from_le_bytes(bytes)
    };
    let generation = |dev: &Device| dev.block.lock().unwrap().config_generation();
    for (image, sectors) in [(&small, 4), (&large, 64)] {
        dev.interrupt.acknowledge(u32::MAX);
        dev.interrupt.take_count();
        let before = generation(&dev);
        dev.block
            .lock()
            .unwrap()
            .set_backing(Some(image.path()), true)
            .unwrap();
        assert_eq!(capacity(&dev), sectors);
        assert_ne!(generation(&dev), before);
        assert_eq!(dev.interrupt.status(), INTERRUPT_CONFIG);
        assert_eq!(dev.interrupt.take_count(), 1);
        submit(
            &mem,
            &mut vq,
            VIRTIO_BLK_T_IN,
            sectors - 1,
            &[Buffer::writable(DATA, 512)],
        );
        dev.kick();
        assert_eq!(status(&mem), S_OK);
        assert_eq!(guest_bytes(&mem, DATA, 512), vec![(sectors - 1) as u8; 512]);
    }

    dev.interrupt.acknowledge(u32::MAX);
    dev.block.lock().unwrap().set_backing(None, true).unwrap();
    assert_eq!(capacity(&dev), 0);
    assert_eq!(dev.interrupt.status(), INTERRUPT_CONFIG);
    submit(
        &mem,
        &mut vq,
        VIRTIO_BLK_T_IN,
        0,
        &[Buffer::writable(DATA, 512)],
    );
    dev.kick();
    assert_eq!(status(&mem), S_IOERR);

    assert!(
        dev.block
            .lock()
            .unwrap()
            .set_backing(Some(Path::new("/nonexistent/disk")), true)
            .is_err()
    );
}

#[test]
fn inactive_slots_change_quietly() {
    let file = disk_image(8);
    let mut block = Block::new("slot", false).unwrap();
    let generation = block.config_generation();
    block.set_backing(Some(file.path()), false).unwrap();
    assert_eq!(block.capacity(), 8);
    assert_ne!(block.config_generation(), generation);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let (mem, file) = setup();
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let mut queue = vq.create_queue();
    queue.set_event_idx(true);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::with_queue(&mem, queue, block);
    // Interrupt me after the second request.
    vq.set_used_event(1);
    submit(&mem, &mut vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    dev.kick();
    assert_eq!(vq.used_idx(), 1);
    assert_eq!(dev.interrupt.take_count(), 0);
    assert_eq!(vq.avail_event(), 1, "notify me at the next request");
    submit(&mem, &mut vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    dev.kick();
    assert_eq!(vq.used_idx(), 2);
    assert_eq!(dev.interrupt.take_count(), 1);
}

#[test]
fn a_busy_queue_yields_and_resumes() {
    let (mem, file) = setup();
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    let total = 100;
    for _ in 0..total {
        submit(&mem, &mut vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    }
    dev.queue_evt.write(1).unwrap();
    dev.events.poll();
    assert_eq!(usize::from(vq.used_idx()), MAX_REQUESTS_PER_WAKE);
    dev.events.settle();
    assert_eq!(vq.used_idx(), total);
}

#[test]
fn activation_needs_one_ready_queue() {
    let mem = guest_memory(0x10000);
    let mut block = Block::new("x", false).unwrap();
    let irq = Arc::new(VirtioInterrupt::new().unwrap());
    let evt = || Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let not_ready = Queue::new(QUEUE_SIZE).unwrap();
    assert!(matches!(
        block.activate(mem.clone(), irq.clone(), vec![not_ready], vec![evt()], 0),
        Err(ActivateError::QueueNotReady(0))
    ));
    assert!(matches!(
        block.activate(mem.clone(), irq.clone(), vec![], vec![], 0),
        Err(ActivateError::QueueCount {
            expected: 1,
            got: 0
        })
    ));
    let vq = TestQueue::new(&mem, GuestAddress(0), 16);
    block
        .activate(
            mem.clone(),
            irq.clone(),
            vec![vq.create_queue()],
            vec![evt()],
            0,
        )
        .unwrap();
    assert!(matches!(
        block.activate(mem.clone(), irq, vec![vq.create_queue()], vec![evt()], 0),
        Err(ActivateError::AlreadyActive)
    ));
}

#[test]
fn config_space_holds_capacity_and_segment_limits() {
    let file = disk_image(DISK_SECTORS);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut config = [0u8; 20];
    block.read_config(0, &mut config);
    assert_eq!(
        u64::from_le_bytes(config[0..8].try_into().unwrap()),
        DISK_SECTORS
    );
    assert_eq!(
        u32::from_le_bytes(config[8..12].try_into().unwrap()),
        SEGMENT_MAX
    );
    assert_eq!(
        u32::from_le_bytes(config[12..16].try_into().unwrap()),
        SEGMENTS_MAX
    );
    assert_eq!(&config[16..], &[0; 4]);
    let mut high = [0xffu8; 4];
    block.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
    block.read_config(u64::MAX, &mut high);
    assert_eq!(high, [0; 4]);
}

/// The whole path a guest takes: registers, QueueNotify, event loop.
#[test]
fn through_the_mmio_transport() {
    let mem = guest_memory(MEM_SIZE);
    let file = disk_image(DISK_SECTORS);
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Arc::new(Mutex::new(
        Block::with_backing("disk0", file.path(), false).unwrap(),
    ));
    let mut events = TestEventLoop::new(&block.lock().unwrap().queue_handler());
    let mut transport = MmioTransport::new(mem.clone(), block.clone()).unwrap();
    let t = &mut transport;
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_DEVICE_ID), 2);
    assert_eq!(read_reg(t, 0x100), DISK_SECTORS as u32);
    assert_eq!(read_reg(t, 0x104), 0);
    let features = feature(VIRTIO_F_VERSION_1)
        | feature(VIRTIO_BLK_F_FLUSH)
        | feature(VIRTIO_RING_F_EVENT_IDX);
    test_utils::activate(t, features, &[&vq]);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_STATUS), 0xf);
    events.settle();

    submit(
        &mem,
        &mut vq,
        VIRTIO_BLK_T_IN,
        1,
        &[Buffer::writable(DATA, 512)],
    );
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    events.settle();
    assert_eq!(status(&mem), S_OK);
    assert_eq!(guest_bytes(&mem, DATA, 512), vec![1; 512]);
    assert_eq!(
        read_reg(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_VRING
    );
    write_reg(t, reg::VIRTIO_MMIO_INTERRUPT_ACK, INTERRUPT_VRING);

    // A slot change shows up as a config interrupt and a new generation.
    let generation = read_reg(t, reg::VIRTIO_MMIO_CONFIG_GENERATION);
    block.lock().unwrap().set_backing(None, false).unwrap();
    assert_eq!(
        read_reg(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_CONFIG
    );
    assert_ne!(read_reg(t, reg::VIRTIO_MMIO_CONFIG_GENERATION), generation);
    let mut capacity = [0xffu8; 8];
    t.read(0x100, &mut capacity);
    assert_eq!(capacity, [0; 8]);

    // Reset, then the queue eventfd is no longer watched.
    write_reg(t, reg::VIRTIO_MMIO_STATUS, 0);
    events.settle();
    assert!(!block.lock().unwrap().is_active());
    submit(&mem, &mut vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    t.ioeventfds()[0].2.write(1).unwrap();
    assert_eq!(events.poll(), 0);
    assert_eq!(vq.used_idx(), 1);
}

/// The threads' real seccomp filters: the transport on a vCPU thread (no
/// new file descriptors there), the device on the event-loop thread. A
/// call outside a filter fails with EPERM here instead of killing the test.
#[test]
fn runs_under_the_vcpu_and_event_loop_seccomp_filters() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use seccompiler::SeccompAction;

    use crate::devices::bus::lock;
    use crate::seccomp::{ThreadKind, apply_with};

    let errno = || SeccompAction::Errno(libc::EPERM as u32);
    let mem = guest_memory(MEM_SIZE);
    let file = disk_image(DISK_SECTORS);
    let block = Arc::new(Mutex::new(
        Block::with_backing("disk0", file.path(), false).unwrap(),
    ));
    let transport = MmioTransport::new(mem.clone(), block.clone()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));

    let event_loop = {
        let (block, stop) = (block.clone(), stop.clone());
        std::thread::spawn(move || {
            apply_with(ThreadKind::Vmm, errno()).unwrap();
            let mut events = TestEventLoop::new(&block.lock().unwrap().queue_handler());
            while !stop.load(Ordering::SeqCst) {
                events.wait(10);
            }
        })
    };
    let block_counters = block.clone();
    let vcpu = std::thread::spawn(move || {
        apply_with(ThreadKind::Vcpu, errno()).unwrap();
        let mut transport = transport;
        let t = &mut transport;
        let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
        test_utils::activate(t, feature(VIRTIO_F_VERSION_1), &[&vq]);
        assert_eq!(read_reg(t, reg::VIRTIO_MMIO_STATUS), 0xf, "activated");
        // One request at a time (they share the header buffer). The event
        // loop may not watch the queue yet: notify until served.
        let serve = |t: &mut MmioTransport, vq: &TestQueue, n: u16| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while vq.used_idx() < n && Instant::now() < deadline {
                write_reg(t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
                std::thread::sleep(Duration::from_millis(2));
            }
            assert_eq!(vq.used_idx(), n);
            assert_eq!(status(&mem), S_OK, "request {n}");
        };
        submit(
            &mem,
            &mut vq,
            VIRTIO_BLK_T_IN,
            2,
            &[Buffer::writable(DATA, 512)],
        );
        serve(t, &vq, 1);
        assert_eq!(guest_bytes(&mem, DATA, 512), vec![2; 512]);
        submit(
            &mem,
            &mut vq,
            VIRTIO_BLK_T_OUT,
            3,
            &[Buffer::readable(DATA, 512)],
        );
        serve(t, &vq, 2);
        submit(&mem, &mut vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
        serve(t, &vq, 3);
        assert_eq!(lock(&block_counters).counters().io_errors, 0);
        assert_eq!(
            read_reg(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
            INTERRUPT_VRING
        );
        write_reg(t, reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read_reg(t, reg::VIRTIO_MMIO_STATUS), 0);
    });
    let vcpu_result = vcpu.join();
    stop.store(true, Ordering::SeqCst);
    event_loop.join().expect("event loop thread");
    vcpu_result.expect("vCPU thread");
    assert!(!lock(&block).is_active());
    assert_eq!(&file_bytes(&file)[3 * 512..4 * 512], &[2; 512][..]);
}

/// A vCPU reading the config space (which locks the device) does not wait
/// for the disk: the queue handler does its I/O under its own lock. Here
/// 64 reads of 12 MiB keep the handler busy while another thread reads the
/// capacity, as a vCPU would.
#[test]
fn config_reads_do_not_wait_for_disk_io() {
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    const REQUESTS: u16 = 64;
    const LEN: u32 = 12 << 20;
    let mem = guest_memory(0x200_0000);
    let file = NamedTempFile::new().unwrap();
    file.as_file().set_len(u64::from(LEN)).unwrap();
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    for _ in 0..REQUESTS {
        submit(
            &mem,
            &mut vq,
            VIRTIO_BLK_T_IN,
            0,
            &[Buffer::writable(0x40_0000, LEN)],
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (block, stop) = (dev.block.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut longest, mut reads) = (Duration::ZERO, 0u32);
            while !stop.load(Ordering::Acquire) {
                let asked = Instant::now();
                let mut capacity = [0u8; 8];
                block.lock().unwrap().read_config(0, &mut capacity);
                longest = longest.max(asked.elapsed());
                reads += 1;
                assert_eq!(u64::from_le_bytes(capacity), u64::from(LEN) / 512);
                std::thread::sleep(Duration::from_micros(200));
            }
            (longest, reads)
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    let started = Instant::now();
    dev.kick();
    let busy = started.elapsed();
    stop.store(true, Ordering::Release);
    let (longest, reads) = reader.join().unwrap();
    assert_eq!(vq.used_idx(), REQUESTS);
    assert_eq!(
        dev.counters().read_bytes,
        u64::from(REQUESTS) * u64::from(LEN)
    );
    assert!(reads > 10, "the reader ran {reads} times");
    assert!(
        busy > Duration::from_millis(40) && longest < busy / 2,
        "a config read waited {longest:?} while the disk was busy for {busy:?}"
    );
}

mod hostile;
