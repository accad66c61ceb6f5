//! `net_tx`: a net device serves a guest-written transmit queue (and a
//! receive queue) against a real socketpair backend.
//!
//! Input: a flags byte ([`crate::FLAG_EVENT_IDX`]), then the guest RAM
//! image. The transmit queue is the usual one at [`DESC_TABLE`]; the
//! receive queue sits at [`RX_DESC_TABLE`]. Two frames wait in the
//! backend, so receive chains are exercised too. Checks: every transmit
//! chain `chain::parse` accepts lies in RAM within the frame limits; every
//! frame that reaches the backend is one of those sizes; the device goes
//! idle; a reset stops it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use frakti_vmm::devices::virtio::net::backend::{self, Backend, GuestBuffers};
use frakti_vmm::devices::virtio::net::chain::{self, Direction, HEADER_LEN, MAX_TX_LEN};
use frakti_vmm::devices::virtio::net::{MacAddr, Net};
use frakti_vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    AVAIL_RING, DESC_TABLE, FLAG_EVENT_IDX, FLAG_READ_ONLY, QUEUE_SIZE, USED_RING, guest_memory,
    load,
};

pub const RX_DESC_TABLE: u64 = 0x400;
pub const RX_AVAIL_RING: u64 = 0x500;
pub const RX_USED_RING: u64 = 0x600;

/// One end of a datagram socketpair.
pub struct Socket(UnixDatagram);

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Backend for Socket {
    fn read_frame(&mut self, buffers: &mut GuestBuffers<'_>) -> io::Result<usize> {
        backend::readv(self.0.as_raw_fd(), buffers)
    }

    fn write_frame(&mut self, buffers: &GuestBuffers<'_>) -> io::Result<usize> {
        backend::writev(self.0.as_raw_fd(), buffers)
    }
}

pub fn net_tx(data: &[u8]) {
    let Some((&flags, image)) = data.split_first() else {
        return;
    };
    let event_idx = flags & FLAG_EVENT_IDX != 0;
    // The read-only flag means nothing to a net device: it picks the
    // offloads (headers from the backend then pass to the guest).
    let offloads = flags & FLAG_READ_ONLY != 0;
    let mem = guest_memory();
    load(&mem, image);
    let mut parsed = queue(DESC_TABLE, AVAIL_RING, USED_RING, event_idx);
    for _ in 0..2 * QUEUE_SIZE {
        let Some(chain) = parsed.iter(&mem).ok().and_then(|mut chains| chains.next()) else {
            break;
        };
        check_parsed(&mem, chain::parse(&mem, chain, Direction::Tx));
    }
    serve(&mem, event_idx, offloads);
}

fn check_parsed(mem: &GuestMemoryMmap, parsed: Result<Vec<chain::Segment>, chain::Error>) {
    let Ok(segments) = parsed else {
        return;
    };
    let total: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
    assert!((HEADER_LEN as u64..=MAX_TX_LEN as u64).contains(&total));
    for segment in &segments {
        assert!(segment.len > 0);
        assert!(mem.check_range(segment.addr, segment.len as usize));
    }
}

fn serve(mem: &GuestMemoryMmap, event_idx: bool, offloads: bool) {
    serve_counting(mem, event_idx, offloads);
}

/// A net device serves both queues until idle, then is reset. Returns the
/// frames it sent and received.
pub fn serve_counting(mem: &GuestMemoryMmap, event_idx: bool, offloads: bool) -> (u64, u64) {
    let (device_end, peer) = UnixDatagram::pair().expect("socketpair");
    device_end.set_nonblocking(true).expect("non-blocking");
    peer.set_nonblocking(true).expect("non-blocking");
    for len in [60, 1514] {
        let _ = peer.send(&vec![0x5a; HEADER_LEN + len]);
    }
    let mac = MacAddr::new([2, 0, 0, 0, 0, 1]);
    let net = Arc::new(Mutex::new(Net::new(Socket(device_end), mac).expect("net")));
    let mut events = EventManager::<Arc<Mutex<Net<Socket>>>>::new().expect("event manager");
    events.add_subscriber(net.clone());
    let interrupt = Arc::new(VirtioInterrupt::new().expect("eventfd"));
    let notify = [(); 2].map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
    let queues = vec![
        queue(RX_DESC_TABLE, RX_AVAIL_RING, RX_USED_RING, event_idx),
        queue(DESC_TABLE, AVAIL_RING, USED_RING, event_idx),
    ];
    // A Linux driver's acknowledgement when every offload is offered.
    let acked = if offloads {
        lock(&net).avail_features()
    } else {
        0
    };
    let activated = lock(&net).activate(mem.clone(), interrupt, queues, notify.to_vec(), acked);
    assert!(activated.is_ok(), "valid queues must activate");
    for evt in &notify {
        evt.write(1).expect("eventfd");
    }
    run_until_idle(&mut events);
    let mut buf = vec![0u8; 2 * MAX_TX_LEN];
    while let Ok(n) = peer.recv(&mut buf) {
        assert!((HEADER_LEN..=MAX_TX_LEN).contains(&n), "frame of {n} bytes");
    }
    let counters = lock(&net).counters();
    lock(&net).reset();
    run_until_idle(&mut events);
    assert!(!lock(&net).is_active());
    (counters.tx_frames, counters.rx_frames)
}

fn run_until_idle(events: &mut EventManager<Arc<Mutex<Net<Socket>>>>) {
    for _ in 0..16 {
        if events.run_with_timeout(0).expect("event loop") == 0 {
            return;
        }
    }
}

fn queue(desc: u64, avail: u64, used: u64, event_idx: bool) -> Queue {
    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Seeds: frames in one descriptor, split over three, through an indirect
/// table; receive buffers for the waiting frames.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    let mut image = vec![0u8; 0x8000];
    let put = |image: &mut Vec<u8>, addr: u64, bytes: &[u8]| {
        image[addr as usize..addr as usize + bytes.len()].copy_from_slice(bytes);
    };
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut bytes = Vec::with_capacity(16);
        bytes.extend_from_slice(&addr.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&next.to_le_bytes());
        bytes
    };
    // Frame data at 0x1000.. (header zero, broadcast Ethernet frame).
    let mut frame = vec![0u8; HEADER_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 2, 0x88, 0xb5]);
    frame.resize(HEADER_LEN + 60, 0x11);
    put(&mut image, 0x1000, &frame);
    // tx 0: one descriptor; tx 1..3: header, two halves; tx 4: indirect.
    let tx = [
        desc(0x1000, frame.len() as u32, 0, 0),
        desc(0x1000, 12, NEXT, 2),
        desc(0x100c, 30, NEXT, 3),
        desc(0x102a, 30, 0, 0),
        desc(0x2000, 32, INDIRECT, 0),
    ];
    for (i, d) in tx.iter().enumerate() {
        put(&mut image, DESC_TABLE + 16 * i as u64, d);
    }
    put(&mut image, 0x2000, &desc(0x1000, 12, NEXT, 1));
    put(&mut image, 0x2010, &desc(0x100c, 60, 0, 0));
    put(&mut image, AVAIL_RING + 2, &3u16.to_le_bytes());
    for (i, head) in [0u16, 1, 4].iter().enumerate() {
        put(
            &mut image,
            AVAIL_RING + 4 + 2 * i as u64,
            &head.to_le_bytes(),
        );
    }
    // Two receive buffers of 1526 bytes in the high region.
    for i in 0..2u16 {
        let d = desc(0x2_0000 + 0x800 * u64::from(i), 1526, WRITE, 0);
        put(&mut image, RX_DESC_TABLE + 16 * u64::from(i), &d);
        put(
            &mut image,
            RX_AVAIL_RING + 4 + 2 * u64::from(i),
            &i.to_le_bytes(),
        );
    }
    put(&mut image, RX_AVAIL_RING + 2, &2u16.to_le_bytes());
    let mut plain = vec![0u8];
    plain.extend_from_slice(&image);
    let mut event_idx = vec![FLAG_EVENT_IDX];
    event_idx.extend_from_slice(&image);
    vec![("frames", plain), ("frames_event_idx", event_idx)]
}
