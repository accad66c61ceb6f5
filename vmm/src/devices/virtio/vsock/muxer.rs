//! The host side of virtio-vsock: Firecracker's hybrid convention over unix
//! sockets.
//!
//! - A host client connects to the device's socket (`uds_path`) and writes
//!   `CONNECT <port>\n`; we send the guest a REQUEST for that port from a
//!   fresh host port, and when the guest answers RESPONSE the client reads
//!   `OK <host port>\n`, then bytes flow. A RST (nobody listening in the
//!   guest) closes the client's socket.
//! - A guest connection to host port `P` (CID 2) is a connection to the unix
//!   socket `<uds_path>_P`; nobody listening there means a RST.
//!
//! Every socket is non-blocking and watched edge-triggered on the device
//! event loop; [`Connection`] does the flow control. Packets for the guest
//! wait until it gives us rx buffers: per-connection control packets as
//! flags, resets for unknown connections in a bounded queue (when that is
//! full we stop taking tx packets, which pushes back on the guest).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events};
use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, accept4, connect, socket};
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::EventSet;

use super::connection::{self, ConnKey, Connection, State};
use super::packet::{HOST_CID, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};

/// Where [`Muxer::next_rx`] puts a packet: into a guest rx buffer.
pub type Deliver<'a> = &'a mut dyn FnMut(&Header, Payload);

/// A packet's payload as [`Muxer::next_rx`] hands it over.
#[derive(Debug)]
pub enum Payload<'a> {
    /// Bytes to write behind the header.
    Bytes(&'a [u8]),
    /// This many bytes already read into the rx buffer's payload area.
    InPlace(usize),
}

/// What a connection gave for the guest.
enum Got {
    InPlace(usize),
    Staged(std::ops::Range<usize>),
}

impl Got {
    fn is_empty(&self) -> bool {
        match self {
            Got::InPlace(n) => *n == 0,
            Got::Staged(range) => range.is_empty(),
        }
    }
}

/// Most connections per VM (guest- and host-initiated together).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients that have not sent their `CONNECT` line yet.
const MAX_HANDSHAKES: usize = 64;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Resets owed to the guest before we stop reading its tx queue.
const MAX_OWED_RESETS: usize = 256;
/// Host ports for host-initiated connections start here (guests usually
/// listen on small ports).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("{0} is in use: another process listens on it")]
    InUse(PathBuf),
}

/// A host client that has not sent its full `CONNECT` line yet.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What a handshake read gave.
enum LineRead {
    Port(u32),
    NotYet,
    Bad(String),
}

/// All connections of one device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Connections that may have something for the guest, in turn.
    ready: VecDeque<ConnKey>,
    queued: HashSet<ConnKey>,
    /// RSTs for connections we do not (or no longer) have.
    resets: VecDeque<Header>,
    next_local_port: u32,
}

fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

impl Muxer {
    /// Listens on `uds_path` (a stale socket file there is replaced).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Muxer, Error> {
        remove_stale_socket(uds_path)?;
        let listen_err = |source| Error::Listen {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            ready: VecDeque::new(),
            queued: HashSet::new(),
            resets: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Subscriber `init`: watch the listening socket.
    pub fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!(
                "vsock: cannot watch {}: {}",
                self.uds_path.display(),
                frakti_proto::error_chain(&e)
            );
        }
    }

    /// Whether `fd` is one of ours.
    pub fn owns(&self, fd: RawFd) -> bool {
        fd == self.listener.as_raw_fd()
            || self.handshakes.contains_key(&fd)
            || self.by_fd.contains_key(&fd)
    }

    /// Something is waiting for an rx buffer.
    pub fn has_rx(&self) -> bool {
        !self.resets.is_empty() || !self.ready.is_empty()
    }

    /// Too many resets owed: take no more tx packets until the guest gives
    /// rx buffers.
    pub fn tx_blocked(&self) -> bool {
        self.resets.len() >= MAX_OWED_RESETS
    }

    /// Handles readiness on one of our sockets. `active`: whether the guest
    /// driver is up (host clients are refused while it is not).
    pub fn handle_event(&mut self, events: &Events, ops: &mut EventOps, active: bool) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept_clients(ops, active);
        } else if self.handshakes.contains_key(&fd) {
            self.continue_handshake(fd, ops, active);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            self.socket_ready(key, events.event_set(), ops);
        }
    }

    fn accept_clients(&mut self, ops: &mut EventOps, active: bool) {
        loop {
            // Non-blocking from the start: no ioctl on the device thread.
            let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
            let stream = match accept4(self.listener.as_raw_fd(), flags) {
                // SAFETY: accept4 just returned this descriptor; nothing
                // else owns it.
                Ok(fd) => UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }),
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => return tracing::warn!("vsock: accept failed: {e}"),
            };
            if self.handshakes.len() >= MAX_HANDSHAKES || self.conns.len() >= MAX_CONNECTIONS {
                tracing::warn!("vsock: refusing a host client (too many connections)");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = ops.add(Events::new(&stream, stream_events())) {
                tracing::warn!(
                    "vsock: cannot watch a host client: {}",
                    frakti_proto::error_chain(&e)
                );
                continue;
            }
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::new(),
                },
            );
            // Its line may already be there (edge-triggered: no event for it).
            self.continue_handshake(fd, ops, active);
        }
    }

    fn continue_handshake(&mut self, fd: RawFd, ops: &mut EventOps, active: bool) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = match read_connect_line(handshake) {
            LineRead::NotYet => return,
            LineRead::Bad(why) => {
                tracing::debug!("vsock: host client dropped: {why}");
                return self.drop_handshake(fd, ops);
            }
            LineRead::Port(port) => port,
        };
        if !active {
            tracing::debug!("vsock: host client for port {port} refused: guest driver not ready");
            return self.drop_handshake(fd, ops);
        }
        let Some(local_port) = self.allocate_local_port(port) else {
            return self.drop_handshake(fd, ops);
        };
        let Some(handshake) = self.handshakes.remove(&fd) else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let mut conn = Connection::new(key, handshake.stream, State::HostConnecting);
        conn.owed.request = true;
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    fn drop_handshake(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(handshake) = self.handshakes.remove(&fd) {
            let _ = ops.remove(Events::new(&handshake.stream, stream_events()));
        }
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = match port.checked_add(1) {
                Some(next) => next,
                None => FIRST_LOCAL_PORT,
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    fn socket_ready(&mut self, key: ConnKey, set: EventSet, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let hang_up = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if set.contains(EventSet::IN) || set.contains(EventSet::READ_HANG_UP) || hang_up {
            conn.readable = true;
        }
        if set.contains(EventSet::OUT) || hang_up {
            conn.writable = true;
        }
        let flushed = conn.flush();
        self.after_io(key, flushed, ops);
    }

    /// After any I/O on a connection: reset it on error, retire it when
    /// finished, else give it a turn for the guest.
    fn after_io(
        &mut self,
        key: ConnKey,
        result: Result<(), connection::Error>,
        ops: &mut EventOps,
    ) {
        if let Err(e) = result {
            tracing::debug!(?key, "vsock: connection reset: {e}");
            self.reset(key, ops);
            return;
        }
        let finished = self.conns.get(&key).is_some_and(Connection::is_finished);
        if finished {
            self.reset(key, ops);
        } else {
            self.schedule(key);
        }
    }

    fn schedule(&mut self, key: ConnKey) {
        let wants = self.conns.get(&key).is_some_and(Connection::wants_rx);
        if wants && self.queued.insert(key) {
            self.ready.push_back(key);
        }
    }

    /// Closes a connection and owes the guest an RST for it.
    fn reset(&mut self, key: ConnKey, ops: &mut EventOps) {
        if self.remove(key, ops) {
            self.owe_reset(key);
        }
    }

    /// Closes a connection without telling the guest (it reset it).
    fn remove(&mut self, key: ConnKey, ops: &mut EventOps) -> bool {
        let Some(conn) = self.conns.remove(&key) else {
            return false;
        };
        let _ = ops.remove(Events::new(&conn.stream, stream_events()));
        self.by_fd.remove(&conn.stream.as_raw_fd());
        true
    }

    fn owe_reset(&mut self, key: ConnKey) {
        if self.resets.len() >= MAX_OWED_RESETS * 2 {
            // Only a guest ignoring its rx queue gets here; its peers are
            // gone anyway.
            return;
        }
        self.resets.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        });
    }

    /// Handles one packet from the guest.
    pub fn handle_packet(&mut self, header: &Header, payload: &[u8], ops: &mut EventOps) {
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if header.src_cid != self.guest_cid
            || header.dst_cid != HOST_CID
            || header.type_ != TYPE_STREAM
        {
            tracing::debug!(?header, "vsock: packet not for a host stream");
            if header.op != op::RST {
                self.owe_reset(key);
            }
            return;
        }
        if header.op == op::REQUEST {
            return self.guest_connects(key, header, ops);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if header.op != op::RST {
                self.owe_reset(key);
            }
            return;
        };
        conn.update_peer_credit(header);
        let result = match header.op {
            op::RST => {
                self.remove(key, ops);
                return;
            }
            op::RESPONSE => conn.established(),
            op::RW if conn.state == State::Established => conn.write_from_guest(payload),
            op::CREDIT_UPDATE => Ok(()),
            op::CREDIT_REQUEST => {
                conn.owed.credit_update = true;
                Ok(())
            }
            op::SHUTDOWN => conn.peer_shutdown(header.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)),
            other => Err(connection::Error::UnexpectedOp(other, conn.state)),
        };
        self.after_io(key, result, ops);
    }

    /// A guest REQUEST for host port `key.local_port`: connect to
    /// `<uds_path>_<port>`.
    fn guest_connects(&mut self, key: ConnKey, header: &Header, ops: &mut EventOps) {
        if self.conns.contains_key(&key) {
            tracing::debug!(?key, "vsock: duplicate REQUEST");
            self.reset(key, ops);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            return self.owe_reset(key);
        }
        let path = format!("{}_{}", self.uds_path.display(), key.local_port);
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!("vsock: guest connection to {path} refused: {e}");
                return self.owe_reset(key);
            }
        };
        if let Err(e) = ops.add(Events::new(&stream, stream_events())) {
            tracing::warn!(
                "vsock: cannot watch {path}: {}",
                frakti_proto::error_chain(&e)
            );
            return self.owe_reset(key);
        }
        let mut conn = Connection::new(key, stream, State::Established);
        conn.update_peer_credit(header);
        conn.owed.response = true;
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    /// Whether the next packets for the guest are plain data of one
    /// connection, for [`Muxer::next_rx_bulk`].
    pub fn next_is_bulk_data(&self) -> bool {
        self.resets.is_empty()
            && self
                .ready
                .front()
                .and_then(|key| self.conns.get(key))
                .is_some_and(Connection::bulk_ready)
    }

    /// Reads data of the next connection straight into `dsts` (rx payload
    /// areas, filled in order) with one readv: the packets' header (its
    /// length aside) and the bytes read. `None`: nothing read.
    pub fn next_rx_bulk(
        &mut self,
        dsts: &[VolatileSlice],
        ops: &mut EventOps,
    ) -> Option<(Header, usize)> {
        let key = self.ready.pop_front()?;
        self.queued.remove(&key);
        let guest_cid = self.guest_cid;
        let conn = self.conns.get_mut(&key)?;
        match conn.readv_for_guest(dsts) {
            Ok(0) => {
                // Waits for the socket, or owes a SHUTDOWN after EOF.
                self.after_io(key, Ok(()), ops);
                None
            }
            Ok(n) => {
                let header = conn.header(guest_cid, op::RW, 0);
                self.schedule(key);
                Some((header, n))
            }
            Err(e) => {
                self.after_io(key, Err(e), ops);
                None
            }
        }
    }

    /// Hands the next packet for the guest to `deliver`: its header and
    /// payload (at most `room` bytes, the rx buffer's room). The payload is
    /// read straight into `direct` (the rx buffer's payload area) when
    /// there is one, else borrowed from the connection's read-ahead.
    /// False: nothing to send now.
    pub fn next_rx(
        &mut self,
        room: usize,
        direct: Option<&VolatileSlice>,
        ops: &mut EventOps,
        deliver: Deliver,
    ) -> bool {
        if let Some(header) = self.resets.pop_front() {
            deliver(&header, Payload::Bytes(&[]));
            return true;
        }
        while let Some(key) = self.ready.pop_front() {
            self.queued.remove(&key);
            if self.packet_from(key, room, direct, ops, deliver) {
                // Round robin: it goes to the back if it has more.
                self.schedule(key);
                return true;
            }
            if let Some(header) = self.resets.pop_front() {
                deliver(&header, Payload::Bytes(&[]));
                return true;
            }
        }
        false
    }

    fn packet_from(
        &mut self,
        key: ConnKey,
        room: usize,
        direct: Option<&VolatileSlice>,
        ops: &mut EventOps,
        deliver: Deliver,
    ) -> bool {
        let guest_cid = self.guest_cid;
        let Some(conn) = self.conns.get_mut(&key) else {
            return false;
        };
        if let Some((op, flags)) = take_owed_control(conn) {
            deliver(&conn.header(guest_cid, op, flags), Payload::Bytes(&[]));
            return true;
        }
        if !conn.can_send_data() {
            return false;
        }
        let got = match direct {
            Some(dst) => conn.read_for_guest_into(dst).map(Got::InPlace),
            None => conn.read_for_guest(room).map(Got::Staged),
        };
        match got {
            Ok(got) if got.is_empty() => {
                // EOF owes a SHUTDOWN; otherwise wait for the socket.
                let shutdown = take_owed_control(conn);
                if let Some((op, flags)) = shutdown {
                    deliver(&conn.header(guest_cid, op, flags), Payload::Bytes(&[]));
                }
                self.after_io(key, Ok(()), ops);
                shutdown.is_some()
            }
            Ok(Got::InPlace(n)) => {
                deliver(&conn.header(guest_cid, op::RW, 0), Payload::InPlace(n));
                true
            }
            Ok(Got::Staged(range)) => {
                let header = conn.header(guest_cid, op::RW, 0);
                deliver(&header, Payload::Bytes(conn.staged(range)));
                true
            }
            Err(e) => {
                self.after_io(key, Err(e), ops);
                match self.resets.pop_front() {
                    Some(header) => {
                        deliver(&header, Payload::Bytes(&[]));
                        true
                    }
                    None => false,
                }
            }
        }
    }

    /// Drops every connection (device reset): host clients see their
    /// sockets close.
    pub fn clear(&mut self, ops: &mut EventOps) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key, ops);
        }
        let fds: Vec<RawFd> = self.handshakes.keys().copied().collect();
        for fd in fds {
            self.drop_handshake(fd, ops);
        }
        self.ready.clear();
        self.queued.clear();
        self.resets.clear();
    }
}

/// The control packet a connection owes, if any, as (op, flags).
fn take_owed_control(conn: &mut Connection) -> Option<(u16, u32)> {
    let owed = &mut conn.owed;
    if owed.request {
        owed.request = false;
        return Some((op::REQUEST, 0));
    }
    if owed.response {
        owed.response = false;
        return Some((op::RESPONSE, 0));
    }
    if owed.shutdown != 0 {
        let flags = owed.shutdown;
        owed.shutdown = 0;
        owed.credit_update = false;
        return Some((op::SHUTDOWN, flags));
    }
    if owed.credit_update {
        owed.credit_update = false;
        return Some((op::CREDIT_UPDATE, 0));
    }
    None
}

/// Reads what has arrived of a `CONNECT <port>\n` line, byte by byte so
/// that data after the line stays in the socket for the guest.
fn read_connect_line(handshake: &mut Handshake) -> LineRead {
    let mut byte = [0u8; 1];
    loop {
        match handshake.stream.read(&mut byte) {
            Ok(0) => return LineRead::Bad("closed before CONNECT".into()),
            Ok(_) if byte[0] == b'\n' => return parse_connect_line(&handshake.line),
            Ok(_) if handshake.line.len() >= MAX_CONNECT_LINE => {
                return LineRead::Bad("CONNECT line too long".into());
            }
            Ok(_) => handshake.line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineRead::NotYet,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return LineRead::Bad(e.to_string()),
        }
    }
}

fn parse_connect_line(line: &[u8]) -> LineRead {
    let text = String::from_utf8_lossy(line);
    let port = text
        .trim_end_matches('\r')
        .strip_prefix("CONNECT ")
        .and_then(|port| port.trim().parse::<u32>().ok());
    match port {
        Some(port) => LineRead::Port(port),
        None => LineRead::Bad(format!("expected `CONNECT <port>`, got {text:?}")),
    }
}

/// Connects without ever blocking the event loop: a listener whose backlog
/// is full refuses (EAGAIN) instead.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

fn remove_stale_socket(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A live listener is another VM's: never take its socket.
            if UnixStream::connect(path).is_ok() {
                return Err(Error::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
            Ok(())
        }
        Ok(_) => Err(Error::NotASocket(path.to_path_buf())),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert!(matches!(
            parse_connect_line(b"CONNECT 1024"),
            LineRead::Port(1024)
        ));
        assert!(matches!(
            parse_connect_line(b"CONNECT 52\r"),
            LineRead::Port(52)
        ));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT -1",
            b"connect 5",
            b"CONNECT 99999999999",
            b"",
        ] {
            assert!(
                matches!(parse_connect_line(bad), LineRead::Bad(_)),
                "{bad:?}"
            );
        }
    }
}
