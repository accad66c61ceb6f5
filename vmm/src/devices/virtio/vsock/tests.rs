//! The vsock device end to end on plain guest memory: the test plays the
//! guest driver (queues in guest memory) and the host peers (real unix
//! sockets), with the device's event loop in between.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;
use vm_memory::{Bytes, GuestAddress};

use super::packet::{HEADER_LEN, HOST_CID, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};
use super::*;
use crate::devices::virtio::test_utils::{
    Buffer, DESC_F_NEXT, TestEventLoop, TestQueue, guest_memory,
};

const CID: u64 = 42;
const MEM_SIZE: usize = 0x100_0000;
/// Packet buffers live from here on, handed out round robin.
const BUFFERS: u64 = 0x10_0000;
const BUFFER_SIZE: u64 = 0x1_1000;
const BUFFER_COUNT: u64 = 64;
const RX_BUF: u32 = 4096 + HEADER_LEN as u32;
const GUEST_PORT: u32 = 5000;

/// A guest driver with its three queues, the device and its event loop.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    device: Arc<Mutex<Vsock>>,
    interrupt: Arc<VirtioInterrupt>,
    evts: Vec<Arc<EventFd>>,
    events: TestEventLoop<Vsock>,
    next_buffer: u64,
    rx_seen: u16,
    rx_buffers: Vec<(u16, u64)>,
    /// Our receive side, as the guest tells the device.
    fwd_cnt: u32,
    _dir: TempDir,
    uds: std::path::PathBuf,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Guest<'a> {
        let dir = TempDir::new().unwrap();
        let uds = dir.path().join("vsock.sock");
        let device = Vsock::new(CID, &uds).unwrap();
        Guest::with_device(mem, device, dir, uds)
    }

    fn with_device(
        mem: &'a GuestMemoryMmap,
        device: Vsock,
        dir: TempDir,
        uds: std::path::PathBuf,
    ) -> Guest<'a> {
        let rx = TestQueue::new(mem, GuestAddress(0), QUEUE_SIZE);
        let tx = TestQueue::new(mem, GuestAddress((rx.end().0 + 15) & !15), QUEUE_SIZE);
        let ev = TestQueue::new(mem, GuestAddress((tx.end().0 + 15) & !15), QUEUE_SIZE);
        assert!(ev.end().0 < BUFFERS);
        let device = Arc::new(Mutex::new(device));
        let mut events = TestEventLoop::new(&device);
        let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
        let evts: Vec<_> = (0..3)
            .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
            .collect();
        device
            .lock()
            .unwrap()
            .activate(
                mem.clone(),
                interrupt.clone(),
                vec![rx.create_queue(), tx.create_queue(), ev.create_queue()],
                evts.clone(),
                0,
            )
            .unwrap();
        events.settle();
        Guest {
            mem,
            rx,
            tx,
            device,
            interrupt,
            evts,
            events,
            next_buffer: 0,
            rx_seen: 0,
            rx_buffers: Vec::new(),
            fwd_cnt: 0,
            _dir: dir,
            uds,
        }
    }

    fn buffer(&mut self) -> u64 {
        let addr = BUFFERS + (self.next_buffer % BUFFER_COUNT) * BUFFER_SIZE;
        self.next_buffer += 1;
        addr
    }

    fn header(&self, op: u16, dst_port: u32, len: usize) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: GUEST_PORT,
            dst_port,
            len: len as u32,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Puts a packet on the tx queue (header and payload in two
    /// descriptors, as Linux does) and kicks the device.
    fn send(&mut self, header: Header, payload: &[u8]) {
        let addr = self.buffer();
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(addr))
            .unwrap();
        let data = addr + HEADER_LEN as u64;
        self.mem.write_slice(payload, GuestAddress(data)).unwrap();
        let mut chain = vec![Buffer::readable(addr, HEADER_LEN as u32)];
        if !payload.is_empty() {
            chain.push(Buffer::readable(data, payload.len() as u32));
        }
        self.tx.add_chain(&chain);
        self.kick(TX);
    }

    fn kick(&mut self, queue: usize) {
        self.evts[queue].write(1).unwrap();
        self.events.settle();
    }

    /// Gives the device `n` rx buffers.
    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = self.buffer();
            let head = self.rx.add_chain(&[Buffer::writable(addr, RX_BUF)]);
            self.rx_buffers.push((head, addr));
        }
        self.kick(RX);
    }

    /// Gives the device `n` rx buffers whose header and payload are two
    /// descriptors (next to each other in memory).
    fn give_split_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = self.buffer();
            let head = self.rx.add_chain(&[
                Buffer::writable(addr, HEADER_LEN as u32),
                Buffer::writable(addr + HEADER_LEN as u64, RX_BUF - HEADER_LEN as u32),
            ]);
            self.rx_buffers.push((head, addr));
        }
        self.kick(RX);
    }

    /// Packets the device put in rx buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut packets = Vec::new();
        while self.rx_seen != self.rx.used_idx() {
            let (id, len) = self.rx.used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let position = self
                .rx_buffers
                .iter()
                .position(|(head, _)| u32::from(*head) == id)
                .expect("used id is one of our buffers");
            let (_, addr) = self.rx_buffers.remove(position);
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            let header = Header::from_bytes(bytes[..HEADER_LEN].try_into().unwrap());
            assert_eq!(header.len as usize, bytes.len() - HEADER_LEN);
            self.fwd_cnt += header.len;
            packets.push((header, bytes[HEADER_LEN..].to_vec()));
        }
        packets
    }

    /// Runs the event loop until `done` or a timeout (sockets are
    /// asynchronous to the test).
    fn run_until(&mut self, mut done: impl FnMut(&mut Guest<'a>) -> bool) {
        for _ in 0..200 {
            if done(self) {
                return;
            }
            self.events.wait(10);
        }
        panic!("timed out");
    }

    fn counters(&self) -> VsockCounters {
        self.device.lock().unwrap().counters()
    }

    fn connections(&self) -> usize {
        self.device.lock().unwrap().connection_count()
    }

    /// A host client connects and the guest accepts; returns the client and
    /// the host port the device chose.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.uds).unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        self.give_rx(4);
        let mut request = None;
        self.run_until(|g| {
            request = g.received().into_iter().next();
            request.is_some()
        });
        let (request, _) = request.unwrap();
        assert_eq!(request.op, op::REQUEST);
        assert_eq!((request.src_cid, request.dst_cid), (HOST_CID, CID));
        assert_eq!(request.dst_port, port);
        let mut response = self.header(op::RESPONSE, request.src_port, 0);
        response.src_port = port;
        self.send(response, &[]);
        let mut line = String::new();
        let mut byte = [0u8; 1];
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        while !line.ends_with('\n') {
            client.read_exact(&mut byte).unwrap();
            line.push(byte[0] as char);
        }
        assert_eq!(line, format!("OK {}\n", request.src_port));
        (client, request.src_port)
    }
}

fn read_available(stream: &mut UnixStream) -> Vec<u8> {
    stream.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn config_space_holds_the_guest_cid() {
    let dir = TempDir::new().unwrap();
    let vsock = Vsock::new(CID, &dir.path().join("v.sock")).unwrap();
    let mut cid = [0u8; 8];
    vsock.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    let mut past = [0xffu8; 4];
    vsock.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
    assert_eq!(vsock.queue_max_sizes().len(), 3);
    for bad in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(bad, &dir.path().join("x")),
            Err(Error::BadCid(_))
        ));
    }
}

#[test]
fn a_path_that_is_not_a_socket_is_refused() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(
        Vsock::new(CID, &file),
        Err(Error::Muxer(muxer::Error::NotASocket(_)))
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn a_stale_socket_is_replaced_but_a_live_one_is_refused() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("v.sock");
    drop(UnixListener::bind(&path).unwrap());
    let first = Vsock::new(CID, &path).expect("a stale socket file is replaced");
    assert!(matches!(
        Vsock::new(CID + 1, &path),
        Err(Error::Muxer(muxer::Error::InUse(_)))
    ));
    drop(first);
}

#[test]
fn host_client_connects_and_data_flows_both_ways() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let (mut client, host_port) = guest.host_connect(1024);

    client.write_all(b"from the host").unwrap();
    let mut got = Vec::new();
    guest.run_until(|g| {
        got.extend(g.received());
        !got.is_empty()
    });
    let (header, payload) = &got[0];
    assert_eq!(header.op, op::RW);
    assert_eq!((header.src_port, header.dst_port), (host_port, 1024));
    assert_eq!(payload, b"from the host");

    let mut rw = guest.header(op::RW, host_port, 14);
    rw.src_port = 1024;
    guest.send(rw, b"from the guest");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reply = [0u8; 14];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"from the guest");

    // The guest closes: the client sees EOF, the guest gets its RST.
    let mut shutdown = guest.header(op::SHUTDOWN, host_port, 0);
    shutdown.src_port = 1024;
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    guest.send(shutdown, &[]);
    client.set_nonblocking(false).unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    guest.give_rx(1);
    let packets = guest.received();
    assert!(packets.iter().any(|(h, _)| h.op == op::RST), "{packets:?}");
    assert_eq!(guest.connections(), 0);
    assert!(guest.interrupt.take_count() > 0);
}

#[test]
fn data_sent_with_the_connect_line_reaches_the_guest() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let mut client = UnixStream::connect(&guest.uds).unwrap();
    client.write_all(b"CONNECT 7\nearly bytes").unwrap();
    guest.give_rx(4);
    let mut request = None;
    guest.run_until(|g| {
        request = g.received().into_iter().next();
        request.is_some()
    });
    let (request, _) = request.unwrap();
    let mut response = guest.header(op::RESPONSE, request.src_port, 0);
    response.src_port = 7;
    guest.send(response, &[]);
    let mut got = Vec::new();
    guest.run_until(|g| {
        got.extend(g.received());
        !got.is_empty()
    });
    assert_eq!(got[0].1, b"early bytes");
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let listener = UnixListener::bind(format!("{}_9000", guest.uds.display())).unwrap();
    guest.give_rx(4);
    guest.send(guest.header(op::REQUEST, 9000, 0), &[]);
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, op::RESPONSE);
    assert_eq!(
        (packets[0].0.src_port, packets[0].0.dst_port),
        (9000, GUEST_PORT)
    );
    let (mut server, _) = listener.accept().unwrap();

    guest.send(guest.header(op::RW, 9000, 5), b"hello");
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut hello = [0u8; 5];
    server.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello");

    server.write_all(b"world").unwrap();
    drop(server);
    let mut got = Vec::new();
    guest.run_until(|g| {
        got.extend(g.received());
        got.iter().any(|(h, _)| h.op == op::SHUTDOWN)
    });
    assert_eq!(got[0].0.op, op::RW);
    assert_eq!(got[0].1, b"world");
    let shutdown = got.iter().find(|(h, _)| h.op == op::SHUTDOWN).unwrap();
    assert_eq!(shutdown.0.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
}

#[test]
fn nobody_listening_means_rst() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    guest.give_rx(2);
    guest.send(guest.header(op::REQUEST, 9999, 0), &[]);
    let packets = guest.received();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, op::RST);
    assert_eq!(guest.connections(), 0);
}

#[test]
fn host_connect_to_a_guest_port_without_listener_closes_the_client() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let mut client = UnixStream::connect(&guest.uds).unwrap();
    client.write_all(b"CONNECT 1234\n").unwrap();
    guest.give_rx(2);
    let mut request = None;
    guest.run_until(|g| {
        request = g.received().into_iter().next();
        request.is_some()
    });
    let (request, _) = request.unwrap();
    let mut rst = guest.header(op::RST, request.src_port, 0);
    rst.src_port = 1234;
    guest.send(rst, &[]);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no OK line for a refused connection");
    assert_eq!(guest.connections(), 0);
}

#[test]
fn bad_connect_lines_and_an_inactive_driver_close_the_client() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'A'; 100]] {
        let mut client = UnixStream::connect(&guest.uds).unwrap();
        client.write_all(line).unwrap();
        guest.events.wait(50);
        guest.events.settle();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    guest.device.lock().unwrap().reset();
    guest.events.settle();
    let mut client = UnixStream::connect(&guest.uds).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    guest.events.wait(50);
    guest.events.settle();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(guest.connections(), 0);
}

#[test]
fn host_data_waits_for_guest_credit() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let listener = UnixListener::bind(format!("{}_9000", guest.uds.display())).unwrap();
    guest.give_rx(2);
    let mut request = guest.header(op::REQUEST, 9000, 0);
    request.buf_alloc = 1000;
    guest.send(request, &[]);
    assert_eq!(guest.received()[0].0.op, op::RESPONSE);
    let (mut server, _) = listener.accept().unwrap();
    server.write_all(&[9u8; 5000]).unwrap();
    guest.give_rx(8);
    guest.events.wait(50);
    guest.events.settle();
    let got: usize = guest.received().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(got, 1000, "no more than the guest's buffer");
    // The guest read it all: a credit update lets the rest come.
    guest.fwd_cnt = 1000;
    let mut update = guest.header(op::CREDIT_UPDATE, 9000, 0);
    update.buf_alloc = 1000;
    guest.send(update, &[]);
    let more: usize = guest.received().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(more, 1000);
}

#[test]
fn tx_packets_in_any_descriptor_layout_reach_the_host() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let (mut client, host_port) = guest.host_connect(1024);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rw = guest.header(op::RW, host_port, 10);
    rw.src_port = 1024;
    let packet: Vec<u8> = rw
        .to_bytes()
        .iter()
        .copied()
        .chain(*b"0123456789")
        .collect();
    // The header split over two descriptors, the third holding both the
    // header's end and the payload; then all of it in one descriptor.
    let layouts: [&[usize]; 2] = [&[20, 20, 14], &[54]];
    for layout in layouts {
        let addr = guest.buffer();
        mem.write_slice(&packet, GuestAddress(addr)).unwrap();
        let mut at = 0;
        let chain: Vec<Buffer> = layout
            .iter()
            .map(|len| {
                let buffer = Buffer::readable(addr + at as u64, *len as u32);
                at += len;
                buffer
            })
            .collect();
        guest.tx.add_chain(&chain);
        guest.kick(TX);
        let mut got = [0u8; 10];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"0123456789", "layout {layout:?}");
    }
}

#[test]
fn one_socket_read_fills_several_whole_rx_buffers_and_leaves_the_rest() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let (mut client, _) = guest.host_connect(1024);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    client.write_all(&data).unwrap();
    guest.give_rx(4);
    let mut got = Vec::new();
    guest.run_until(|g| {
        got.extend(g.received());
        got.iter().map(|(_, p)| p.len()).sum::<usize>() == data.len()
    });
    let sizes: Vec<usize> = got.iter().map(|(_, p)| p.len()).collect();
    assert_eq!(sizes, [4096, 4096, 1808]);
    assert!(
        got.iter()
            .flat_map(|(_, p)| p.iter().copied())
            .eq(data.iter().copied())
    );
    // The fourth buffer went back to the ring and takes the next data.
    client.write_all(b"more").unwrap();
    let mut next = Vec::new();
    guest.run_until(|g| {
        next.extend(g.received());
        !next.is_empty()
    });
    assert_eq!(next[0].1, b"more");
}

#[test]
fn host_data_reaches_split_and_whole_rx_buffers_in_order() {
    // Whole buffers take host data straight from the socket; split ones
    // through the connection's read-ahead. Mixed, the stream stays whole.
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let (mut client, _) = guest.host_connect(1024);
    let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    client.write_all(&data).unwrap();
    let mut got = Vec::new();
    guest.run_until(|g| {
        if g.rx_buffers.is_empty() {
            if g.next_buffer % 2 == 0 {
                g.give_split_rx(3);
            } else {
                g.give_rx(2);
            }
        }
        for (header, payload) in g.received() {
            assert_eq!(header.op, op::RW);
            got.extend_from_slice(&payload);
        }
        got.len() == data.len()
    });
    assert!(got == data, "the stream arrived out of order or altered");
}

#[test]
fn guest_overrunning_its_credit_is_reset_and_nothing_grows_unbounded() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let listener = UnixListener::bind(format!("{}_9000", guest.uds.display())).unwrap();
    guest.give_rx(4);
    guest.send(guest.header(op::REQUEST, 9000, 0), &[]);
    let (_server_not_reading, _) = listener.accept().unwrap();
    let chunk = vec![1u8; 64 * 1024];
    // The socket and our buffer take a bounded amount; then the guest is
    // out of credit, and one more packet resets the connection.
    for _ in 0..64 {
        if guest.connections() == 0 {
            break;
        }
        guest.send(guest.header(op::RW, 9000, chunk.len()), &chunk);
    }
    assert_eq!(guest.connections(), 0, "overrunning the credit resets");
    guest.give_rx(4);
    assert!(guest.received().iter().any(|(h, _)| h.op == op::RST));
}

#[test]
fn guest_rst_closes_the_host_socket() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let (mut client, host_port) = guest.host_connect(1024);
    let mut rst = guest.header(op::RST, host_port, 0);
    rst.src_port = 1024;
    guest.send(rst, &[]);
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert_eq!(guest.connections(), 0);
}

#[test]
fn device_reset_closes_every_connection() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let (mut a, _) = guest.host_connect(1);
    let (mut b, _) = guest.host_connect(2);
    assert_eq!(guest.connections(), 2);
    guest.device.lock().unwrap().reset();
    guest.events.settle();
    assert_eq!(guest.connections(), 0);
    for client in [&mut a, &mut b] {
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
    }
}

#[test]
fn packets_not_for_a_host_stream_are_answered_with_rst() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    guest.give_rx(8);
    let mut wrong_src = guest.header(op::REQUEST, 1, 0);
    wrong_src.src_cid = CID + 1;
    let mut wrong_dst = guest.header(op::REQUEST, 1, 0);
    wrong_dst.dst_cid = 7;
    let mut dgram = guest.header(op::REQUEST, 1, 0);
    dgram.type_ = 2;
    let unknown = guest.header(op::RW, 77, 3);
    for header in [wrong_src, wrong_dst, dgram] {
        guest.send(header, &[]);
    }
    guest.send(unknown, b"abc");
    // A RST for an unknown connection gets no answer (no RST storms).
    guest.send(guest.header(op::RST, 78, 0), &[]);
    let packets = guest.received();
    assert_eq!(packets.len(), 4);
    assert!(packets.iter().all(|(h, _)| h.op == op::RST));
}

#[test]
fn malformed_tx_chains_are_returned_unused_and_counted() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let addr = guest.buffer();
    let header = guest.header(op::RW, 9000, 100);
    mem.write_slice(&header.to_bytes(), GuestAddress(addr))
        .unwrap();
    let chains: Vec<Vec<Buffer>> = vec![
        // Writable buffer in a tx chain.
        vec![Buffer::writable(addr, HEADER_LEN as u32)],
        // Shorter than a header.
        vec![Buffer::readable(addr, 20)],
        // Header promises 100 bytes, chain has 10.
        vec![Buffer::readable(addr, HEADER_LEN as u32 + 10)],
        // Outside guest memory.
        vec![Buffer::readable(MEM_SIZE as u64 - 8, HEADER_LEN as u32)],
        // Larger than a header and 64 KiB.
        vec![
            Buffer::readable(addr, HEADER_LEN as u32),
            Buffer::readable(BUFFERS, 65 * 1024),
        ],
    ];
    let count = chains.len();
    for chain in &chains {
        guest.tx.add_chain(chain);
    }
    guest.kick(TX);
    assert_eq!(guest.counters().malformed, count as u64);
    assert_eq!(guest.tx.used_idx(), count as u16);
    for i in 0..count as u16 {
        assert_eq!(guest.tx.used_elem(i).1, 0);
    }
    assert!(!guest.interrupt.needs_reset());
}

#[test]
fn malformed_rx_chains_are_returned_unused() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    // Readable buffer, then one too small for a header.
    guest.rx.add_chain(&[Buffer::readable(BUFFERS, RX_BUF)]);
    guest.rx.add_chain(&[Buffer::writable(BUFFERS, 16)]);
    guest.send(guest.header(op::REQUEST, 9999, 0), &[]);
    assert_eq!(guest.counters().malformed, 2);
    assert_eq!(guest.rx.used_idx(), 2);
    // A good buffer still gets the RST.
    guest.rx_seen = 2;
    guest.give_rx(1);
    assert_eq!(guest.received()[0].0.op, op::RST);
}

#[test]
fn a_descriptor_loop_is_dropped_and_a_corrupt_ring_needs_a_reset() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    guest.tx.write_desc(0, BUFFERS, 64, DESC_F_NEXT, 1);
    guest.tx.write_desc(1, BUFFERS, 64, DESC_F_NEXT, 0);
    guest.tx.publish(0);
    guest.kick(TX);
    // virtio-queue ends a looping chain after a queue's worth of
    // descriptors; we refuse chains that long.
    assert_eq!(guest.counters().malformed, 1);
    assert_eq!(guest.tx.used_elem(0), (0, 0));
    assert!(!guest.interrupt.needs_reset());
    guest
        .tx
        .set_avail_idx(guest.tx.used_idx().wrapping_add(QUEUE_SIZE + 5));
    guest.kick(TX);
    assert!(
        guest.interrupt.needs_reset(),
        "an impossible avail index breaks the queue"
    );
}

#[test]
fn notifications_before_activation_do_nothing() {
    let dir = TempDir::new().unwrap();
    let device = Arc::new(Mutex::new(
        Vsock::new(CID, &dir.path().join("v.sock")).unwrap(),
    ));
    let mut events = TestEventLoop::new(&device);
    events.settle();
    assert!(!device.lock().unwrap().is_active());
    assert_eq!(device.lock().unwrap().counters(), VsockCounters::default());
}

#[test]
fn activation_needs_three_ready_queues() {
    let mem = guest_memory(MEM_SIZE);
    let dir = TempDir::new().unwrap();
    let mut vsock = Vsock::new(CID, &dir.path().join("v.sock")).unwrap();
    let q = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let evt = || Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let irq = Arc::new(VirtioInterrupt::new().unwrap());
    let err = vsock
        .activate(
            mem.clone(),
            irq.clone(),
            vec![q.create_queue()],
            vec![evt()],
            0,
        )
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 3,
            got: 1
        }
    ));
    let mut not_ready = q.create_queue();
    not_ready.set_ready(false);
    let err = vsock
        .activate(
            mem.clone(),
            irq,
            vec![q.create_queue(), not_ready, q.create_queue()],
            vec![evt(), evt(), evt()],
            0,
        )
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueNotReady(1)));
}

#[test]
fn many_streams_move_data_without_mixing_it_up() {
    let mem = guest_memory(MEM_SIZE);
    let mut guest = Guest::new(&mem);
    let mut clients = Vec::new();
    for port in 0..16u32 {
        let (client, host_port) = guest.host_connect(100 + port);
        clients.push((client, host_port, 100 + port));
    }
    for (client, _, port) in &mut clients {
        client.write_all(&vec![*port as u8; 10_000]).unwrap();
    }
    let mut per_port: std::collections::HashMap<u32, Vec<u8>> = Default::default();
    guest.run_until(|g| {
        if g.rx_buffers.len() < 8 {
            g.give_rx(32);
        }
        for (header, payload) in g.received() {
            if header.op == op::RW {
                per_port.entry(header.dst_port).or_default().extend(payload);
            } else if header.op == op::CREDIT_REQUEST {
                // Not expected: we advertise plenty.
                panic!("unexpected credit request");
            }
        }
        per_port.values().map(Vec::len).sum::<usize>() == 16 * 10_000
    });
    for (port, bytes) in per_port {
        assert!(
            bytes.iter().all(|b| *b == port as u8),
            "port {port} got foreign bytes"
        );
    }
    let _ = read_available(&mut clients[0].0);
}
