//! Fuzz targets for Frakti's virtio devices and control API, as plain functions: the
//! cargo-fuzz targets (`fuzz_targets/`) and the stable-Rust `replay` binary
//! both call them.
//!
//! Guest RAM is two 64 KiB regions with a hole between them
//! (`[0, 0x10000)` and `[0x20000, 0x30000)`); a split queue of 16 entries
//! lives at [`DESC_TABLE`], [`AVAIL_RING`] and [`USED_RING`].

pub mod api;
pub mod net;
pub mod seeds;

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventManager, SubscriberOps};
use frakti_vmm::devices::bus::BusDevice;
use frakti_vmm::devices::virtio::block::disk::Disk;
use frakti_vmm::devices::virtio::block::request::{self, MAX_REQUEST_BYTES, ParseError, Request};
use frakti_vmm::devices::virtio::block::{Block, BlockQueue};
use frakti_vmm::devices::virtio::mmio::MmioTransport;
use frakti_vmm::devices::virtio::vsock::Vsock;
use frakti_vmm::devices::virtio::vsock::packet::{self, HEADER_LEN, MAX_PAYLOAD, RxBuffer};
use frakti_vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_SIZE: u16 = 16;
pub const DESC_TABLE: u64 = 0x0;
pub const AVAIL_RING: u64 = 0x100;
pub const USED_RING: u64 = 0x200;
pub const LOW_RAM_SIZE: usize = 0x1_0000;
pub const HIGH_RAM_START: u64 = 0x2_0000;
pub const HIGH_RAM_SIZE: usize = 0x1_0000;
pub const DISK_SECTORS: u64 = 8;

/// `block_request` flags (first input byte).
pub const FLAG_EVENT_IDX: u8 = 1;
pub const FLAG_READ_ONLY: u8 = 2;
pub const FLAG_EMPTY_SLOT: u8 = 4;
/// `vsock_packet`: the rx queue's rings, in the high region.
pub const VSOCK_RX_DESC_TABLE: u64 = HIGH_RAM_START + 0xe000;
pub const VSOCK_RX_AVAIL_RING: u64 = HIGH_RAM_START + 0xe100;
pub const VSOCK_RX_USED_RING: u64 = HIGH_RAM_START + 0xe200;
/// `mmio_transport` flags (first input byte).
pub const FLAG_INIT_DRIVER: u8 = 1;

/// Parses every chain the input's queue offers, checks what the parser
/// promises, then lets a block device serve the same queue.
///
/// Input: a flags byte, then the guest RAM image from address 0 (spilling
/// into the high region past 64 KiB).
pub fn block_request(data: &[u8]) {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let mem = guest_memory();
    load(&mem, image);
    let mut parsed = queue(flags & FLAG_EVENT_IDX != 0);
    for _ in 0..2 * QUEUE_SIZE {
        let Some(chain) = parsed.iter(&mem).ok().and_then(|mut chains| chains.next()) else {
            break;
        };
        check_parsed(&mem, request::parse(&mem, chain));
    }
    serve_queue(&mem, flags);
}

/// A block device (as `flags` say) serves the queue in `mem` until idle.
pub fn serve_queue(mem: &GuestMemoryMmap, flags: u8) {
    let block = Arc::new(Mutex::new(block(flags)));
    let mut events = EventManager::<Arc<Mutex<BlockQueue>>>::new().expect("event manager");
    events.add_subscriber(lock(&block).queue_handler());
    let interrupt = Arc::new(VirtioInterrupt::new().expect("eventfd"));
    let notify = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    let activated = lock(&block).activate(
        mem.clone(),
        interrupt,
        vec![queue(flags & FLAG_EVENT_IDX != 0)],
        vec![notify.clone()],
        0,
    );
    assert!(activated.is_ok(), "a valid queue must activate");
    notify.write(1).expect("eventfd");
    run_until_idle(&mut events);
}

/// Drives a block device's register window with arbitrary accesses.
///
/// Input: a flags byte, the number of operations `n`, `n` operations of 8
/// bytes (`kind`, `size`, `offset: u16`, `value: u32`), then the guest RAM
/// image. `kind` bit 0 writes (else reads), bit 7 swaps the slot's backing;
/// `size` selects 1, 2, 4 or 8 bytes; offsets go up to 0x1fff, past the
/// window. With [`FLAG_INIT_DRIVER`] a well-behaved driver first brings the
/// device to DRIVER_OK with the queue at [`DESC_TABLE`].
pub fn mmio_transport(data: &[u8]) {
    let [flags, count, rest @ ..] = data else {
        return;
    };
    let ops_len = (usize::from(*count) * 8).min(rest.len());
    let (ops, image) = rest.split_at(ops_len);
    let mem = guest_memory();
    load(&mem, image);

    let block = Arc::new(Mutex::new(block(0)));
    let mut events = EventManager::<Arc<Mutex<BlockQueue>>>::new().expect("event manager");
    events.add_subscriber(lock(&block).queue_handler());
    let mut transport = MmioTransport::new(mem.clone(), block.clone()).expect("transport");
    if flags & FLAG_INIT_DRIVER != 0 {
        init_driver(&mut transport);
        run_until_idle(&mut events);
    }
    for op in ops.chunks_exact(8) {
        let size = [1, 2, 4, 8][usize::from(op[1] & 3)];
        let offset = u64::from(u16::from_le_bytes([op[2], op[3]]) & 0x1fff);
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&op[4..8]);
        if op[0] & 0x80 != 0 {
            let mut block = lock(&block);
            let disk = block.disk().is_none().then(|| disk(false));
            block.set_disk(disk);
        }
        if op[0] & 1 == 0 {
            transport.read(offset, &mut bytes[..size]);
        } else {
            transport.write(offset, &bytes[..size]);
            run_until_idle(&mut events);
        }
    }
    // Whatever happened, a reset brings the device back.
    transport.write(u64::from(reg::VIRTIO_MMIO_STATUS), &0u32.to_le_bytes());
    run_until_idle(&mut events);
    assert!(!lock(&block).is_active());
    let mut status = [0u8; 4];
    transport.read(u64::from(reg::VIRTIO_MMIO_STATUS), &mut status);
    assert_eq!(status, [0; 4]);
}

/// Reads every chain of the input's queue as a vsock tx packet and as an
/// rx buffer, checks what the parser promises, then lets a vsock device
/// take the queue as its tx queue (with a second fuzzed queue as rx).
///
/// Input: a flags byte (bit 0: EVENT_IDX), then the guest RAM image.
pub fn vsock_packet(data: &[u8]) {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let event_idx = flags & FLAG_EVENT_IDX != 0;
    let mem = guest_memory();
    load(&mem, image);
    let mut parsed = queue(event_idx);
    let mut payload = Vec::new();
    for _ in 0..2 * QUEUE_SIZE {
        let Some(chain) = parsed.iter(&mem).ok().and_then(|mut chains| chains.next()) else {
            break;
        };
        if let Ok(header) = packet::read_tx(&mem, chain.clone(), &mut payload) {
            assert_eq!(payload.len(), header.len as usize);
            assert!(payload.len() <= MAX_PAYLOAD);
        }
        if let Ok(buffer) = RxBuffer::new(&mem, chain) {
            if let Some(area) = buffer.contiguous_payload(&mem) {
                assert_eq!(area.len(), buffer.payload_capacity());
                let len = area.len().min(64);
                let written = buffer.write_header(&mem, &packet::Header::default(), len);
                assert_eq!(written, Ok((HEADER_LEN + len) as u32));
            }
            let room = buffer.payload_capacity().min(64);
            let written = buffer.write(&mem, &packet::Header::default(), &[0xa5; 64][..room]);
            assert_eq!(written, Ok((HEADER_LEN + room) as u32));
        }
    }
    serve_vsock(&mem, event_idx);
}

/// The tx packets a vsock device took from the input's queue (the seeds'
/// check: they must reach the device, not stop at the parser).
pub fn vsock_tx_packets(data: &[u8]) -> u64 {
    let Some((&flags, image)) = data.split_first() else {
        return 0;
    };
    let mem = guest_memory();
    load(&mem, image);
    serve_vsock(&mem, flags & FLAG_EVENT_IDX != 0)
}

/// Serves the queues until idle, resets the device; the tx packets it took.
fn serve_vsock(mem: &GuestMemoryMmap, event_idx: bool) -> u64 {
    let dir = tempfile::tempdir().expect("temporary directory");
    let vsock = Vsock::new(3, &dir.path().join("v.sock")).expect("vsock");
    let vsock = Arc::new(Mutex::new(vsock));
    let mut events = EventManager::<Arc<Mutex<Vsock>>>::new().expect("event manager");
    events.add_subscriber(vsock.clone());
    let interrupt = Arc::new(VirtioInterrupt::new().expect("eventfd"));
    let evts: Vec<_> = (0..3)
        .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")))
        .collect();
    let mut rx = Queue::new(QUEUE_SIZE).expect("queue");
    rx.set_desc_table_address(Some(VSOCK_RX_DESC_TABLE as u32), Some(0));
    rx.set_avail_ring_address(Some(VSOCK_RX_AVAIL_RING as u32), Some(0));
    rx.set_used_ring_address(Some(VSOCK_RX_USED_RING as u32), Some(0));
    rx.set_event_idx(event_idx);
    rx.set_ready(true);
    let activated = lock(&vsock).activate(
        mem.clone(),
        interrupt,
        vec![rx, queue(event_idx), queue(event_idx)],
        evts.clone(),
        0,
    );
    assert!(activated.is_ok(), "valid queues must activate");
    evts[1].write(1).expect("eventfd");
    for _ in 0..16 {
        if events.run_with_timeout(0).expect("event loop") == 0 {
            break;
        }
    }
    let tx_packets = lock(&vsock).counters().tx_packets;
    lock(&vsock).reset();
    let _ = events.run_with_timeout(0);
    assert_eq!(lock(&vsock).connection_count(), 0);
    tx_packets
}

/// What `request::parse` promises about its result.
fn check_parsed(mem: &GuestMemoryMmap, parsed: Result<Request, ParseError>) {
    match parsed {
        Ok(request) => {
            assert!(u64::from(request.data_len) <= MAX_REQUEST_BYTES);
            let total: u64 = request.data.iter().map(|s| u64::from(s.len)).sum();
            assert_eq!(total, u64::from(request.data_len));
            for segment in &request.data {
                assert!(segment.len > 0);
                assert!(mem.check_range(segment.addr, segment.len as usize));
            }
            assert!(mem.address_in_range(request.status));
        }
        Err(ParseError {
            status: Some(status),
            ..
        }) => assert!(mem.address_in_range(status)),
        Err(_) => {}
    }
}

/// Runs the event loop until nothing is pending, for a bounded number of
/// rounds: a guest can make a device feed itself work (say, reads whose
/// data lands on the available ring), and the device then yields after
/// each batch instead of going idle. A hang within one round is what
/// libFuzzer's `-timeout` catches.
fn run_until_idle(events: &mut EventManager<Arc<Mutex<BlockQueue>>>) {
    for _ in 0..16 {
        if events.run_with_timeout(0).expect("event loop") == 0 {
            return;
        }
    }
}

/// ACKNOWLEDGE, DRIVER, every offered feature, FEATURES_OK, queue 0 at
/// the fixed rings, DRIVER_OK.
fn init_driver(transport: &mut MmioTransport) {
    let features = lock(transport.device()).avail_features() | 1 << 32;
    let mut write =
        |offset: u32, value: u32| transport.write(u64::from(offset), &value.to_le_bytes());
    write(reg::VIRTIO_MMIO_STATUS, 1);
    write(reg::VIRTIO_MMIO_STATUS, 3);
    for page in 0..2u32 {
        write(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, page);
        write(
            reg::VIRTIO_MMIO_DRIVER_FEATURES,
            (features >> (32 * page)) as u32,
        );
    }
    write(reg::VIRTIO_MMIO_STATUS, 11);
    write(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    write(reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
    write(reg::VIRTIO_MMIO_QUEUE_DESC_LOW, DESC_TABLE as u32);
    write(reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL_RING as u32);
    write(reg::VIRTIO_MMIO_QUEUE_USED_LOW, USED_RING as u32);
    write(reg::VIRTIO_MMIO_QUEUE_READY, 1);
    write(reg::VIRTIO_MMIO_STATUS, 15);
}

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW_RAM_SIZE),
        (GuestAddress(HIGH_RAM_START), HIGH_RAM_SIZE),
    ])
    .expect("guest memory")
}

/// Copies `image` to guest RAM from 0; what does not fit the low region
/// goes to the high one.
pub fn load(mem: &GuestMemoryMmap, image: &[u8]) {
    let (low, high) = image.split_at(image.len().min(LOW_RAM_SIZE));
    let high = &high[..high.len().min(HIGH_RAM_SIZE)];
    mem.write_slice(low, GuestAddress(0)).expect("low RAM");
    mem.write_slice(high, GuestAddress(HIGH_RAM_START))
        .expect("high RAM");
}

fn queue(event_idx: bool) -> Queue {
    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue
}

fn block(flags: u8) -> Block {
    let read_only = flags & FLAG_READ_ONLY != 0;
    let mut block = Block::new("fuzz", read_only).expect("block");
    if flags & FLAG_EMPTY_SLOT == 0 {
        block.set_disk(Some(disk(read_only)));
    }
    block
}

/// An anonymous temporary disk whose sector `n` holds byte `n`.
fn disk(read_only: bool) -> Disk {
    let mut file = tempfile::tempfile().expect("temporary disk");
    for n in 0..DISK_SECTORS {
        file.write_all(&[n as u8; 512]).expect("temporary disk");
    }
    Disk::from_file(file, std::path::Path::new("fuzz-disk"), read_only).expect("disk")
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_bytes(mem: &GuestMemoryMmap, count: usize) -> Vec<u8> {
        let mut bytes = vec![0; count];
        mem.read_slice(&mut bytes, GuestAddress(0x3000)).unwrap();
        bytes
    }

    /// The seeds are valid requests: the fuzzer starts from the paths that
    /// do real I/O.
    #[test]
    fn block_seeds_succeed() {
        for (name, input) in seeds::block_request() {
            let mem = guest_memory();
            load(&mem, &input[1..]);
            serve_queue(&mem, input[0]);
            let used_idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
            let (count, want) = if name.starts_with("mixed") {
                (5, vec![0, 0, 0, 0, 2])
            } else {
                (1, vec![0])
            };
            assert_eq!(used_idx, count as u16, "{name}");
            assert_eq!(status_bytes(&mem, count), want, "{name}");
            block_request(&input);
        }
    }

    /// Inputs that once failed (`regressions/<target>/`): every folder
    /// must name a target, and at least one input must run.
    #[test]
    fn regressions_pass() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
        let mut ran = 0;
        for folder in std::fs::read_dir(&dir).unwrap() {
            let folder = folder.unwrap().path();
            let name = folder.file_name().unwrap().to_string_lossy().into_owned();
            let run = match name.as_str() {
                "block_request" => block_request as fn(&[u8]),
                "mmio_transport" => mmio_transport,
                "vsock_packet" => vsock_packet,
                "net_tx" => net::net_tx,
                "api_request" => api::api_request,
                other => panic!("regressions/{other} names no fuzz target"),
            };
            for entry in std::fs::read_dir(&folder).unwrap() {
                run(&std::fs::read(entry.unwrap().path()).unwrap());
                ran += 1;
            }
        }
        assert!(ran > 0, "no regression input in {}", dir.display());
    }

    /// The net seeds send their three frames and receive the two waiting.
    #[test]
    fn net_seeds_carry_frames() {
        for (name, input) in net::seeds() {
            net::net_tx(&input);
            let mem = guest_memory();
            load(&mem, &input[1..]);
            for offloads in [false, true] {
                let (sent, received) =
                    net::serve_counting(&mem, input[0] & FLAG_EVENT_IDX != 0, offloads);
                assert_eq!((sent, received), (3, 2), "{name}, offloads {offloads}");
            }
        }
        net::net_tx(&[]);
        net::net_tx(&[0]);
    }

    #[test]
    fn vsock_seeds_reach_the_device() {
        for (name, input) in seeds::vsock_packet() {
            vsock_packet(&input);
            assert_eq!(vsock_tx_packets(&input), 2, "{name}: REQUEST and RW");
        }
        vsock_packet(&[]);
        vsock_packet(&[1]);
    }

    #[test]
    fn mmio_seeds_run() {
        for (_, input) in seeds::mmio_transport() {
            mmio_transport(&input);
        }
        mmio_transport(&[]);
        mmio_transport(&[1, 255]);
    }
}
