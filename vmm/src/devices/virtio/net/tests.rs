//! The net device end to end on plain guest memory: frames through both
//! queues and its event loop against a real kernel backend (one end of an
//! AF_UNIX datagram socketpair: one frame per read or write, like a tap),
//! back-pressure both ways, hostile chains; and a real tap in a private
//! network namespace.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

use virtio_bindings::virtio_mmio as reg;
use vm_memory::{Bytes, GuestAddress};

use super::backend::GuestBuffers;
use super::chain::{HEADER_LEN, MAX_TX_LEN};
use super::*;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::test_utils::{
    self, Buffer, DESC_F_NEXT, DESC_F_WRITE, TestEventLoop, TestQueue, guest_memory, read_reg,
    write_reg,
};
use crate::devices::virtio::{INTERRUPT_VRING, VIRTIO_F_VERSION_1};

const MEM_SIZE: usize = 0x40_0000;
const RXQ: u64 = 0x0;
const TXQ: u64 = 0x4000;
/// Receive buffers, 0x1000 apart.
const RX_BUF: u64 = 0x10000;
/// Transmit buffers.
const TX_BUF: u64 = 0x10_0000;
/// Receive chain size a driver without offloads uses: header + 1514.
const RX_LEN: u32 = 1526;
const MAC: MacAddr = MacAddr::new([0x02, 0x00, 0x00, 0xaa, 0xbb, 0xcc]);

/// One end of a datagram socketpair as a backend.
#[derive(Debug)]
struct SocketBackend {
    socket: UnixDatagram,
    /// Read with recvmsg(MSG_TRUNC), which reports a datagram's full
    /// length as a tap does; else with readv, as the tap does.
    msg_trunc: bool,
    /// The offloads the device asked for, in order.
    offloads: Arc<Mutex<Vec<u32>>>,
}

impl AsRawFd for SocketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl Backend for SocketBackend {
    fn read_frame(&mut self, buffers: &mut GuestBuffers<'_>) -> io::Result<usize> {
        if !self.msg_trunc {
            return backend::readv(self.socket.as_raw_fd(), buffers);
        }
        // SAFETY: msghdr is plain data for which all zeroes is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = buffers.iovecs().as_ptr().cast_mut();
        msg.msg_iovlen = buffers.iovecs().len();
        // SAFETY: the iovecs map guest RAM kept mapped by `buffers`; the
        // kernel writes only inside them and `msg` outlives the call.
        let n = unsafe { libc::recvmsg(self.socket.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn write_frame(&mut self, buffers: &GuestBuffers<'_>) -> io::Result<usize> {
        backend::writev(self.socket.as_raw_fd(), buffers)
    }

    fn set_offloads(&mut self, tun_flags: u32) -> io::Result<()> {
        self.offloads.lock().unwrap().push(tun_flags);
        Ok(())
    }
}

fn socket_pair() -> (SocketBackend, UnixDatagram) {
    let (device, peer) = UnixDatagram::pair().unwrap();
    device.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let backend = SocketBackend {
        socket: device,
        msg_trunc: true,
        offloads: Arc::default(),
    };
    (backend, peer)
}

/// An Ethernet frame of `len` bytes: broadcast, from `MAC`, ethertype
/// 0x88b5 (local experimental), then bytes counting from `seed`.
fn frame(seed: u8, len: usize) -> Vec<u8> {
    let mut bytes = vec![0xff; 6];
    bytes.extend_from_slice(&MAC.octets());
    bytes.extend_from_slice(&[0x88, 0xb5]);
    bytes.extend((0..len.saturating_sub(14)).map(|i| seed.wrapping_add(i as u8)));
    bytes.truncate(len);
    bytes
}

/// A header as a guest without offloads sends it, with a num_buffers
/// (unused on transmit) to show it is passed through untouched.
const TX_HEADER: [u8; HEADER_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x34, 0x12];

/// What the guest finds in front of every received frame.
fn rx_header() -> Vec<u8> {
    let mut header = vec![0u8; HEADER_LEN];
    header[10] = 1;
    header
}

fn guest_bytes(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(at)).unwrap();
    bytes
}

/// A net device activated on two test queues, with its event loop.
struct Device<B: Backend + 'static> {
    net: Arc<Mutex<Net<B>>>,
    interrupt: Arc<VirtioInterrupt>,
    rx_evt: Arc<EventFd>,
    tx_evt: Arc<EventFd>,
    events: TestEventLoop<Net<B>>,
}

impl<B: Backend + 'static> Device<B> {
    fn new(mem: &GuestMemoryMmap, rxq: &TestQueue, txq: &TestQueue, backend: B) -> Self {
        Self::with_queues(mem, rxq.create_queue(), txq.create_queue(), backend)
    }

    fn with_queues(mem: &GuestMemoryMmap, rx: Queue, tx: Queue, backend: B) -> Self {
        Self::with_features(mem, rx, tx, backend, 0)
    }

    /// Activated with `acked` features (offloads, for one).
    fn with_features(mem: &GuestMemoryMmap, rx: Queue, tx: Queue, backend: B, acked: u64) -> Self {
        let net = Arc::new(Mutex::new(Net::new(backend, MAC).unwrap()));
        let mut events = TestEventLoop::new(&net);
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let rx_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let tx_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        net.lock()
            .unwrap()
            .activate(
                mem.clone(),
                interrupt.clone(),
                vec![rx, tx],
                vec![rx_evt.clone(), tx_evt.clone()],
                acked,
            )
            .unwrap();
        events.settle();
        Device {
            net,
            interrupt,
            rx_evt,
            tx_evt,
            events,
        }
    }

    fn kick_tx(&mut self) {
        self.tx_evt.write(1).unwrap();
        self.events.settle();
    }

    fn kick_rx(&mut self) {
        self.rx_evt.write(1).unwrap();
        self.events.settle();
    }

    fn counters(&self) -> NetCounters {
        self.net.lock().unwrap().counters()
    }
}

struct Setup {
    mem: GuestMemoryMmap,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            mem: guest_memory(MEM_SIZE),
        }
    }

    fn queues(&self) -> (TestQueue<'_>, TestQueue<'_>) {
        (
            TestQueue::new(&self.mem, GuestAddress(RXQ), QUEUE_SIZE),
            TestQueue::new(&self.mem, GuestAddress(TXQ), QUEUE_SIZE),
        )
    }
}

/// Puts `header` + `frame` at `at` and queues it as one readable buffer.
fn send(mem: &GuestMemoryMmap, txq: &mut TestQueue, at: u64, frame: &[u8]) -> u16 {
    mem.write_slice(&TX_HEADER, GuestAddress(at)).unwrap();
    mem.write_slice(frame, GuestAddress(at + HEADER_LEN as u64))
        .unwrap();
    txq.add_chain(&[Buffer::readable(at, (HEADER_LEN + frame.len()) as u32)])
}

/// Offers receive chain number `n` (one writable buffer of `RX_LEN`).
fn offer(rxq: &mut TestQueue, n: u64) -> u16 {
    rxq.add_chain(&[Buffer::writable(RX_BUF + n * 0x1000, RX_LEN)])
}

/// A datagram as the backend would carry it: header + frame.
fn datagram(frame: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0xee; HEADER_LEN];
    bytes.extend_from_slice(frame);
    bytes
}

fn recv_all(peer: &UnixDatagram) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 70000];
    while let Ok(n) = peer.recv(&mut buf) {
        frames.push(buf[..n].to_vec());
    }
    frames
}

#[test]
fn tx_frames_arrive_intact_on_the_backend() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (rxq, mut txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    // Header alone, then the frame split over two pages.
    let eth = frame(7, 1514);
    mem.write_slice(&TX_HEADER, GuestAddress(TX_BUF)).unwrap();
    mem.write_slice(&eth[..1000], GuestAddress(TX_BUF + 0x1000))
        .unwrap();
    mem.write_slice(&eth[1000..], GuestAddress(TX_BUF + 0x3000))
        .unwrap();
    let head = txq.add_chain(&[
        Buffer::readable(TX_BUF, 12),
        Buffer::readable(TX_BUF + 0x1000, 1000),
        Buffer::readable(TX_BUF + 0x3000, 514),
    ]);
    dev.kick_tx();
    let mut want = TX_HEADER.to_vec();
    want.extend_from_slice(&eth);
    assert_eq!(recv_all(&peer), vec![want]);
    assert_eq!(txq.used_idx(), 1);
    assert_eq!(txq.used_elem(0), (u32::from(head), 0));
    assert_eq!(dev.interrupt.take_count(), 1);
    assert_eq!(dev.interrupt.status(), INTERRUPT_VRING);
    let counters = dev.counters();
    assert_eq!((counters.tx_frames, counters.tx_bytes), (1, 1514));
    assert_eq!(txq.used_flags(), 0, "notifications enabled again when idle");
}

#[test]
fn rx_frames_land_in_guest_memory_behind_a_clean_header() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (mut rxq, txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    mem.write_slice(&[0x55; 0x2000], GuestAddress(RX_BUF))
        .unwrap();
    // Header split over two buffers, the second also holding the frame.
    let head = rxq.add_chain(&[
        Buffer::writable(RX_BUF, 5),
        Buffer::writable(RX_BUF + 0x1000, 2000),
    ]);
    dev.kick_rx();
    let eth = frame(3, 100);
    peer.send(&datagram(&eth)).unwrap();
    dev.events.settle();
    assert_eq!(rxq.used_idx(), 1);
    assert_eq!(rxq.used_elem(0), (u32::from(head), 112));
    let mut got = guest_bytes(mem, RX_BUF, 5);
    got.extend(guest_bytes(mem, RX_BUF + 0x1000, 107));
    let mut want = rx_header();
    want.extend_from_slice(&eth);
    assert_eq!(got, want);
    assert_eq!(guest_bytes(mem, RX_BUF + 0x1000 + 107, 1), [0x55]);
    assert_eq!(dev.interrupt.take_count(), 1);
    let counters = dev.counters();
    assert_eq!((counters.rx_frames, counters.rx_bytes), (1, 100));
}

/// What a Linux driver acknowledges when offered every offload.
const OFFLOADS: u64 = 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6;

#[test]
fn tap_offloads_follow_what_the_guest_acked() {
    let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    assert_eq!(tun_offloads(OFFLOADS), all);
    assert_eq!(tun_offloads(0), 0);
    // Transmit offloads alone: the tap still hands us plain frames.
    assert_eq!(
        tun_offloads(1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4),
        0
    );
    // Segments without checksum offload are not valid (virtio 1.2 §5.1.3.1).
    assert_eq!(tun_offloads(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
    assert_eq!(
        tun_offloads(1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO6),
        libc::TUN_F_CSUM | libc::TUN_F_TSO6
    );
    let (backend, _peer) = socket_pair();
    let offered = Net::new(backend, MAC).unwrap().avail_features();
    assert_eq!(offered & OFFLOADS, OFFLOADS, "every offload is offered");
}

/// With offloads the tap's header (checksum flags, GSO type and sizes)
/// reaches the guest as it is, `num_buffers` set to 1; the device asked
/// the backend for exactly what the guest acknowledged, once.
#[test]
fn with_offloads_the_backends_header_passes_through() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (mut rxq, txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let asked = backend.offloads.clone();
    let mut dev = Device::with_features(
        mem,
        rxq.create_queue(),
        txq.create_queue(),
        backend,
        OFFLOADS,
    );
    assert_eq!(
        *asked.lock().unwrap(),
        [libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6]
    );
    // NEEDS_CSUM, GSO TCPv4, hdr_len 54, gso_size 1448, csum at 34+16;
    // num_buffers left as garbage, as a tap leaves it.
    let header: [u8; HEADER_LEN] = [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0x77, 0x77];
    let big = frame(9, 9000);
    let mut datagram = header.to_vec();
    datagram.extend_from_slice(&big);
    let head = rxq.add_chain(&[Buffer::writable(RX_BUF, 0x4000)]);
    dev.kick_rx();
    peer.send(&datagram).unwrap();
    dev.events.settle();
    assert_eq!(rxq.used_elem(0), (u32::from(head), datagram.len() as u32));
    let mut want = header.to_vec();
    want[10..12].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(guest_bytes(mem, RX_BUF, HEADER_LEN), want);
    assert_eq!(guest_bytes(mem, RX_BUF + HEADER_LEN as u64, big.len()), big);
    assert!(dev.net.lock().unwrap().guest_offloads());
    // A reset and a new activation without offloads asks again.
    dev.net.lock().unwrap().reset();
    dev.events.settle();
    assert!(!dev.net.lock().unwrap().guest_offloads());
}

#[test]
fn rx_frames_wait_in_the_backend_until_buffers_arrive() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (mut rxq, txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    for seed in 0..3 {
        peer.send(&datagram(&frame(seed, 60 + usize::from(seed))))
            .unwrap();
    }
    // No buffers: the loop goes idle (settle would fail on a spin) and
    // asks the driver for a kick.
    dev.events.settle();
    assert_eq!(rxq.used_idx(), 0);
    assert_eq!(dev.counters().rx_no_buffers, 1);
    assert_eq!(rxq.used_flags(), 0, "notifications on while starved");
    assert_eq!(dev.events.poll(), 0, "the backend is not watched");

    offer(&mut rxq, 0);
    offer(&mut rxq, 1);
    dev.kick_rx();
    assert_eq!(rxq.used_idx(), 2);
    offer(&mut rxq, 2);
    dev.kick_rx();
    assert_eq!(rxq.used_idx(), 3);
    for seed in 0..3u8 {
        let len = 60 + usize::from(seed);
        assert_eq!(rxq.used_elem(u16::from(seed)).1, (HEADER_LEN + len) as u32);
        let at = RX_BUF + u64::from(seed) * 0x1000 + HEADER_LEN as u64;
        assert_eq!(guest_bytes(mem, at, len), frame(seed, len), "frame {seed}");
    }
    let counters = dev.counters();
    assert_eq!(counters.rx_frames, 3);
    assert_eq!(counters.rx_dropped + counters.rx_truncated, 0);
}

#[test]
fn tx_back_pressure_keeps_the_chain_until_the_peer_drains() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (rxq, mut txq) = setup.queues();
    let (backend, peer) = socket_pair();
    // Fill the socket until it refuses more.
    let filler = datagram(&frame(0xf0, 1000));
    let mut queued = 0;
    loop {
        match backend.socket.send(&filler) {
            Ok(_) => queued += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(queued > 0);
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    let eth = frame(9, 200);
    let head = send(mem, &mut txq, TX_BUF, &eth);
    dev.kick_tx();
    assert_eq!(txq.used_idx(), 0, "the chain is not consumed");
    assert_eq!(dev.counters().tx_blocked, 1);
    assert_eq!(dev.counters().tx_dropped, 0);
    // Kicks while blocked change nothing.
    send(mem, &mut txq, TX_BUF + 0x1000, &frame(10, 60));
    dev.kick_tx();
    assert_eq!(txq.used_idx(), 0);

    let drained = recv_all(&peer);
    assert_eq!(drained.len(), queued);
    assert!(dev.events.wait(1000) > 0, "writable again");
    dev.events.settle();
    assert_eq!(txq.used_idx(), 2);
    assert_eq!(txq.used_elem(0), (u32::from(head), 0));
    let mut want = TX_HEADER.to_vec();
    want.extend_from_slice(&eth);
    let sent = recv_all(&peer);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], want);
    assert_eq!(dev.counters().tx_frames, 2);
}

#[test]
fn indirect_descriptor_tables_are_followed() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (rxq, txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    let eth = frame(4, 90);
    mem.write_slice(&TX_HEADER, GuestAddress(TX_BUF)).unwrap();
    mem.write_slice(&eth, GuestAddress(TX_BUF + 0x1000))
        .unwrap();
    let table = TestQueue::new(mem, GuestAddress(0x30000), 2);
    table.write_desc(0, TX_BUF, 12, DESC_F_NEXT, 1);
    table.write_desc(1, TX_BUF + 0x1000, 90, 0, 0);
    let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
    txq.write_desc(0, 0x30000, 2 * 16, indirect, 0);
    txq.publish(0);
    dev.kick_tx();
    let mut want = TX_HEADER.to_vec();
    want.extend_from_slice(&eth);
    assert_eq!(recv_all(&peer), vec![want]);
    assert_eq!(txq.used_elem(0), (0, 0));
}

#[test]
fn a_busy_tx_queue_yields_and_resumes() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (rxq, mut txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    let total = 100u16;
    for i in 0..total {
        send(
            mem,
            &mut txq,
            TX_BUF + u64::from(i) * 0x100,
            &frame(i as u8, 60),
        );
    }
    dev.tx_evt.write(1).unwrap();
    dev.events.poll();
    assert_eq!(usize::from(txq.used_idx()), MAX_FRAMES_PER_WAKE);
    // Drain as we go, so the socket never pushes back.
    let mut received = recv_all(&peer).len();
    dev.events.settle();
    received += recv_all(&peer).len();
    assert_eq!(txq.used_idx(), total);
    assert_eq!(received, usize::from(total));
}

#[test]
fn event_idx_suppresses_interrupts() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (rxq, mut txq) = setup.queues();
    let mut tx = txq.create_queue();
    tx.set_event_idx(true);
    let mut rx = rxq.create_queue();
    rx.set_event_idx(true);
    let (backend, _peer) = socket_pair();
    let mut dev = Device::with_queues(mem, rx, tx, backend);
    // Interrupt me after the second frame.
    txq.set_used_event(1);
    send(mem, &mut txq, TX_BUF, &frame(1, 60));
    dev.kick_tx();
    assert_eq!(txq.used_idx(), 1);
    assert_eq!(dev.interrupt.take_count(), 0);
    assert_eq!(txq.avail_event(), 1, "notify me at the next frame");
    send(mem, &mut txq, TX_BUF + 0x1000, &frame(2, 60));
    dev.kick_tx();
    assert_eq!(txq.used_idx(), 2);
    assert_eq!(dev.interrupt.take_count(), 1);
}

#[test]
fn activation_needs_two_ready_queues() {
    let mem = guest_memory(0x10000);
    let (backend, _peer) = socket_pair();
    let mut net = Net::new(backend, MAC).unwrap();
    let irq = Arc::new(VirtioInterrupt::new().unwrap());
    let evt = || Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let vq = TestQueue::new(&mem, GuestAddress(0), 16);
    let vq2 = TestQueue::new(&mem, GuestAddress(0x2000), 16);
    let not_ready = Queue::new(QUEUE_SIZE).unwrap();
    assert!(matches!(
        net.activate(
            mem.clone(),
            irq.clone(),
            vec![vq.create_queue(), not_ready],
            vec![evt(), evt()],
            0
        ),
        Err(ActivateError::QueueNotReady(1))
    ));
    assert!(matches!(
        net.activate(
            mem.clone(),
            irq.clone(),
            vec![vq.create_queue()],
            vec![evt()],
            0
        ),
        Err(ActivateError::QueueCount {
            expected: 2,
            got: 1
        })
    ));
    assert!(matches!(
        net.activate(
            mem.clone(),
            irq.clone(),
            vec![vq.create_queue(), vq2.create_queue()],
            vec![evt()],
            0
        ),
        Err(ActivateError::QueueCount { expected: 2, .. })
    ));
    assert!(!net.is_active());
    net.activate(
        mem.clone(),
        irq.clone(),
        vec![vq.create_queue(), vq2.create_queue()],
        vec![evt(), evt()],
        0,
    )
    .unwrap();
    assert!(matches!(
        net.activate(
            mem.clone(),
            irq,
            vec![vq.create_queue(), vq2.create_queue()],
            vec![evt(), evt()],
            0
        ),
        Err(ActivateError::AlreadyActive)
    ));
}

#[test]
fn config_space_holds_the_mac_and_link_status() {
    let (backend, _peer) = socket_pair();
    let net = Net::new(backend, MAC).unwrap();
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    let features = net.avail_features();
    assert_ne!(features & feature(VIRTIO_NET_F_MAC), 0);
    assert_ne!(features & feature(VIRTIO_NET_F_STATUS), 0);
    // Checksums and TCP segments both ways (bits 0, 1, 7, 8, 11, 12);
    // no UFO (10, 14), ECN (9, 13) or mergeable buffers (15).
    for bit in [0, 1, 7, 8, 11, 12] {
        assert_ne!(features & feature(bit), 0, "feature bit {bit}");
    }
    for bit in [9, 10, 13, 14, 15] {
        assert_eq!(features & feature(bit), 0, "feature bit {bit}");
    }
    let mut config = [0xffu8; 12];
    net.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC.octets());
    assert_eq!(&config[6..8], &[1, 0], "link up");
    assert_eq!(&config[8..], &[0; 4]);
    let mut tail = [0xffu8; 4];
    net.read_config(4, &mut tail);
    assert_eq!(tail, [0xbb, 0xcc, 1, 0]);
    net.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 4]);
    assert_eq!(net.mac().to_string(), "02:00:00:aa:bb:cc");
}

/// The whole path a guest takes: registers, QueueNotify, event loop; and
/// nothing before DRIVER_OK.
#[test]
fn through_the_mmio_transport() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (mut rxq, mut txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let net = Arc::new(Mutex::new(Net::new(backend, MAC).unwrap()));
    let mut events = TestEventLoop::new(&net);
    let mut transport = MmioTransport::new(mem.clone(), net.clone()).unwrap();
    let t = &mut transport;
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_DEVICE_ID), 1);
    assert_eq!(read_reg(t, 0x100), 0xaa00_0002);
    assert_eq!(read_reg(t, 0x104), 0x0001_ccbb);

    // Set up, frames pending both ways, but no DRIVER_OK yet.
    let features =
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_NET_F_MAC) | feature(VIRTIO_RING_F_EVENT_IDX);
    test_utils::negotiate(t, features);
    test_utils::setup_queue(t, 0, &rxq);
    test_utils::setup_queue(t, 1, &txq);
    offer(&mut rxq, 0);
    send(mem, &mut txq, TX_BUF, &frame(1, 60));
    peer.send(&datagram(&frame(2, 70))).unwrap();
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    for (_, _, evt) in t.ioeventfds() {
        evt.write(1).unwrap();
    }
    assert_eq!(events.poll(), 0, "nothing watched before DRIVER_OK");
    assert!(!net.lock().unwrap().is_active());
    assert_eq!((rxq.used_idx(), txq.used_idx()), (0, 0));

    let status = read_reg(t, reg::VIRTIO_MMIO_STATUS);
    write_reg(t, reg::VIRTIO_MMIO_STATUS, status | 4);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_STATUS), 0xf);
    events.settle();
    assert_eq!((rxq.used_idx(), txq.used_idx()), (1, 1));
    assert_eq!(recv_all(&peer).len(), 1);
    assert_eq!(
        guest_bytes(mem, RX_BUF + HEADER_LEN as u64, 70),
        frame(2, 70)
    );
    assert_eq!(
        read_reg(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_VRING
    );

    // Reset through the Status register.
    write_reg(t, reg::VIRTIO_MMIO_STATUS, 0);
    events.settle();
    assert!(!net.lock().unwrap().is_active());
    peer.send(&datagram(&frame(3, 70))).unwrap();
    t.ioeventfds()[1].2.write(1).unwrap();
    assert_eq!(events.poll(), 0);
}

/// The device thread's real seccomp filter: frames both ways with it on
/// (a call outside it fails with EPERM here instead of killing the test).
#[test]
fn runs_under_the_device_thread_seccomp_filter() {
    use seccompiler::SeccompAction;

    use crate::seccomp::{ThreadKind, apply_with};

    let setup = Setup::new();
    let mem = setup.mem.clone();
    let (mut backend, peer) = socket_pair();
    // The tap reads with readv; recvmsg is not in the filter.
    backend.msg_trunc = false;
    peer.send(&datagram(&frame(2, 70))).unwrap();
    let handle = std::thread::spawn(move || {
        let (mut rxq, mut txq) = (
            TestQueue::new(&mem, GuestAddress(RXQ), QUEUE_SIZE),
            TestQueue::new(&mem, GuestAddress(TXQ), QUEUE_SIZE),
        );
        let mut dev = Device::new(&mem, &rxq, &txq, backend);
        apply_with(ThreadKind::Device, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        offer(&mut rxq, 0);
        send(&mem, &mut txq, TX_BUF, &frame(1, 60));
        dev.kick_rx();
        dev.kick_tx();
        let counters = dev.counters();
        (rxq.used_idx(), txq.used_idx(), counters)
    });
    let (rx_used, tx_used, counters) = handle.join().unwrap();
    assert_eq!((rx_used, tx_used), (1, 1), "{counters:?}");
    assert_eq!((counters.rx_frames, counters.tx_frames), (1, 1));
    assert_eq!(recv_all(&peer).len(), 1);
}

mod hostile;
mod real_tap;
