//! One vsock stream between a guest port and a host unix socket, with
//! virtio-vsock's credit-based flow control.
//!
//! Guest → host: the guest may have at most [`BUF_ALLOC`] bytes in flight
//! that we have not yet written to the unix socket (we advertise that
//! buffer and count what we forwarded in `fwd_cnt`); what the socket does
//! not take at once waits in `pending`, which therefore never grows past
//! `BUF_ALLOC`. A guest that sends beyond its credit gets the connection
//! reset. Host → guest: we read from the socket only as much as the guest
//! has announced room for (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`), so
//! a guest that stops reading stops us reading, and the host peer's writes
//! block in the kernel. Nothing is buffered without bound in either
//! direction.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vm_memory::VolatileSlice;

use super::packet::{Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};

/// Receive buffer we advertise to the guest per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Most host data read ahead for the guest: one socket read fills several
/// of the guest's (4 KiB) rx buffers. Never more than the guest's credit.
const STAGE_MAX: usize = 64 * 1024;
/// Send a credit update once this many bytes were forwarded since the last
/// packet that told the guest our `fwd_cnt`.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A host client asked for `CONNECT <port>`; our REQUEST awaits the
    /// guest's RESPONSE.
    HostConnecting,
    /// Data flows.
    Established,
}

/// Which end of a connection the ports are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// The host side's port.
    pub local_port: u32,
    /// The guest side's port.
    pub peer_port: u32,
}

/// Control packets owed to the guest, sent as soon as an rx buffer is free.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Owed {
    pub request: bool,
    pub response: bool,
    pub credit_update: bool,
    /// SHUTDOWN with these flags (0: none owed).
    pub shutdown: u32,
}

/// What went wrong with a connection: it must be reset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the guest sent {len} bytes with only {credit} of credit")]
    CreditExceeded { len: usize, credit: u32 },
    #[error("the host socket failed")]
    Socket(#[source] io::Error),
    #[error("a packet with op {0} arrived in state {1:?}")]
    UnexpectedOp(u16, State),
}

/// One stream.
#[derive(Debug)]
pub struct Connection {
    pub key: ConnKey,
    pub stream: UnixStream,
    pub state: State,
    pub owed: Owed,
    /// Guest data the socket did not take yet (≤ BUF_ALLOC).
    pending: VecDeque<u8>,
    /// Bytes of guest data written to the socket (wrapping).
    fwd_cnt: u32,
    /// `fwd_cnt` as of the last packet we sent the guest.
    fwd_cnt_told: u32,
    /// Bytes of host data sent to the guest (wrapping).
    rx_cnt: u32,
    /// Host data read ahead for the guest (`staged[staged_at..]`), within
    /// its credit when read.
    staged: Vec<u8>,
    staged_at: usize,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The socket had data (or EOF) when we last looked (edge-triggered).
    pub readable: bool,
    /// The socket took everything we wrote last time.
    pub writable: bool,
    /// The guest will send no more; shut the socket's write side once
    /// `pending` drained.
    peer_done_sending: bool,
    /// The guest will read no more.
    peer_done_receiving: bool,
    /// The host peer sent EOF.
    host_done_sending: bool,
    /// The socket's write side is shut.
    write_shut: bool,
}

impl Connection {
    pub fn new(key: ConnKey, stream: UnixStream, state: State) -> Connection {
        Connection {
            key,
            stream,
            state,
            owed: Owed::default(),
            pending: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            rx_cnt: 0,
            staged: Vec::new(),
            staged_at: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            // Edge-triggered: data that arrived before we watched the
            // socket gives no event, so look once.
            readable: true,
            writable: true,
            peer_done_sending: false,
            peer_done_receiving: false,
            host_done_sending: false,
            write_shut: false,
        }
    }

    /// Learns the guest's buffer space from any of its packets.
    pub fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
    }

    /// Bytes the guest has room for.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes the guest may still send us.
    fn our_credit(&self) -> u32 {
        BUF_ALLOC - self.pending.len() as u32
    }

    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// A packet header from us to the guest for this connection.
    pub fn header(&mut self, guest_cid: u64, op: u16, flags: u32) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        Header {
            src_cid: super::packet::HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Whether we could send the guest a data packet now.
    pub fn can_send_data(&self) -> bool {
        let has_data =
            self.staged_at < self.staged.len() || (self.readable && !self.host_done_sending);
        self.state == State::Established
            && has_data
            && !self.peer_done_receiving
            && self.peer_credit() > 0
    }

    /// Whether the connection has something for the guest.
    pub fn wants_rx(&self) -> bool {
        self.owed != Owed::default() || self.can_send_data()
    }

    /// Takes up to `room` bytes (an rx buffer's room) of host data for
    /// the guest, from what was read ahead or else from one socket read of
    /// up to [`STAGE_MAX`] within its credit; the guest's rx buffer is
    /// filled from [`Connection::staged`] with that range, with no copy in
    /// between. An empty range means nothing now; EOF becomes an owed
    /// SHUTDOWN.
    pub fn read_for_guest(&mut self, room: usize) -> Result<Range<usize>, Error> {
        let limit = room.min(self.peer_credit() as usize);
        if limit == 0 {
            return Ok(0..0);
        }
        if self.staged_at == self.staged.len() && !self.fill_stage()? {
            return Ok(0..0);
        }
        let start = self.staged_at;
        let n = (self.staged.len() - start).min(limit);
        self.staged_at += n;
        self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
        Ok(start..start + n)
    }

    /// Read-ahead data that [`Connection::read_for_guest`] handed out.
    pub fn staged(&self, range: Range<usize>) -> &[u8] {
        self.staged.get(range).unwrap_or_default()
    }

    /// Whether the next packets for the guest are plain data to read
    /// straight from the socket: no control packet owed, nothing read
    /// ahead.
    pub fn bulk_ready(&self) -> bool {
        self.owed == Owed::default() && self.staged_at == self.staged.len() && self.can_send_data()
    }

    /// Reads host data straight into several rx payload areas in guest
    /// memory with one readv, within the guest's credit; the bytes fill
    /// `dsts` in order. `Ok(0)` means nothing now; EOF becomes an owed
    /// SHUTDOWN. Only when nothing is read ahead (it would come first).
    pub fn readv_for_guest(&mut self, dsts: &[VolatileSlice]) -> Result<usize, Error> {
        let mut credit = self.peer_credit() as usize;
        let guards: Vec<_> = dsts.iter().map(|d| (d.ptr_guard_mut(), d.len())).collect();
        let mut iovecs = Vec::with_capacity(guards.len());
        for (guard, len) in &guards {
            if credit == 0 {
                break;
            }
            let len = (*len).min(credit);
            credit -= len;
            iovecs.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: len,
            });
        }
        if iovecs.is_empty() {
            return Ok(0);
        }
        // SAFETY: each iovec is a range of guest memory inside a checked
        // VolatileSlice whose guard lives across the call; readv writes at
        // most `iov_len` bytes into each.
        let ret = unsafe {
            libc::readv(
                self.stream.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        };
        let result = usize::try_from(ret).map_err(|_| io::Error::last_os_error());
        let n = self.socket_read(result)?;
        self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
        Ok(n)
    }

    /// What a read of the socket for the guest means: bytes, nothing now
    /// (the socket is drained), or EOF (an owed SHUTDOWN).
    fn socket_read(&mut self, result: io::Result<usize>) -> Result<usize, Error> {
        match result {
            Ok(0) => {
                self.readable = false;
                self.host_done_sending = true;
                self.owed.shutdown |= SHUTDOWN_SEND;
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                Ok(0)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(Error::Socket(e)),
        }
    }

    /// Puts host data for the guest straight into `dst` (an rx buffer's
    /// payload area in guest memory): what was read ahead, else one socket
    /// read, within the guest's credit. `Ok(0)` means nothing now; EOF
    /// becomes an owed SHUTDOWN.
    pub fn read_for_guest_into(&mut self, dst: &VolatileSlice) -> Result<usize, Error> {
        if self.staged_at == self.staged.len() {
            return self.readv_for_guest(std::slice::from_ref(dst));
        }
        let limit = dst.len().min(self.peer_credit() as usize);
        let range = self.staged_at..self.staged.len().min(self.staged_at + limit);
        self.staged_at = range.end;
        dst.copy_from(&self.staged[range.clone()]);
        self.rx_cnt = self.rx_cnt.wrapping_add(range.len() as u32);
        Ok(range.len())
    }

    /// Reads ahead as much as the guest has room for; false when the socket
    /// had nothing (or ended).
    fn fill_stage(&mut self) -> Result<bool, Error> {
        let want = STAGE_MAX.min(self.peer_credit() as usize);
        self.staged.resize(want, 0);
        self.staged_at = 0;
        let result = self.stream.read(&mut self.staged);
        let got = self
            .socket_read(result)
            .inspect_err(|_| self.staged.clear())?;
        if got == 0 {
            // An idle connection holds no read-ahead memory.
            self.staged = Vec::new();
        } else {
            self.staged.truncate(got);
        }
        Ok(got > 0)
    }

    /// Takes guest data: straight to the socket when it can, the rest into
    /// `pending`. Fails when the guest overran its credit.
    pub fn write_from_guest(&mut self, data: &[u8]) -> Result<(), Error> {
        let credit = self.our_credit();
        if data.len() > credit as usize {
            return Err(Error::CreditExceeded {
                len: data.len(),
                credit,
            });
        }
        if self.peer_done_sending || self.write_shut {
            // Data after the guest's own SHUTDOWN(SEND): ignore it.
            return Ok(());
        }
        let mut rest = data;
        if self.pending.is_empty() && self.writable {
            let written = self.write_some(&[IoSlice::new(data)])?;
            rest = &data[written..];
        }
        self.pending.extend(rest);
        self.after_forwarding();
        Ok(())
    }

    /// Writes as much of `pending` as the socket takes; then shuts the
    /// write side if the guest is done sending.
    pub fn flush(&mut self) -> Result<(), Error> {
        while !self.pending.is_empty() && self.writable {
            let (a, b) = self.pending.as_slices();
            let Some(written) =
                write_nonblocking(&mut self.stream, &[IoSlice::new(a), IoSlice::new(b)])?
            else {
                self.writable = false;
                break;
            };
            self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
            self.pending.drain(..written);
        }
        self.after_forwarding();
        Ok(())
    }

    fn write_some(&mut self, slices: &[IoSlice]) -> Result<usize, Error> {
        match write_nonblocking(&mut self.stream, slices)? {
            Some(n) => {
                self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                Ok(n)
            }
            None => {
                self.writable = false;
                Ok(0)
            }
        }
    }

    fn after_forwarding(&mut self) {
        if self.fwd_cnt.wrapping_sub(self.fwd_cnt_told) >= CREDIT_UPDATE_THRESHOLD {
            self.owed.credit_update = true;
        }
        if self.peer_done_sending && self.pending.is_empty() && !self.write_shut {
            // The host reader sees EOF.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.write_shut = true;
        }
    }

    /// The guest's SHUTDOWN.
    pub fn peer_shutdown(&mut self, flags: u32) -> Result<(), Error> {
        if flags & SHUTDOWN_RCV != 0 {
            self.peer_done_receiving = true;
        }
        if flags & SHUTDOWN_SEND != 0 {
            self.peer_done_sending = true;
        }
        self.flush()
    }

    /// Both sides are done: the connection can go (with an RST to the
    /// guest, which waits for one after a full shutdown).
    pub fn is_finished(&self) -> bool {
        let guest_done = self.peer_done_sending && self.peer_done_receiving;
        let both_ways_closed = self.write_shut && self.host_done_sending;
        (guest_done && self.pending.is_empty()) || (both_ways_closed && self.owed.shutdown == 0)
    }

    /// The guest's RESPONSE to our REQUEST: tell the host client.
    pub fn established(&mut self) -> Result<(), Error> {
        if self.state != State::HostConnecting {
            return Err(Error::UnexpectedOp(op::RESPONSE, self.state));
        }
        self.state = State::Established;
        let line = format!("OK {}\n", self.key.local_port);
        // A fresh socket takes a few bytes; a client that cannot take them
        // is broken.
        match self.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => Ok(()),
            Ok(_) => Err(Error::Socket(io::ErrorKind::WriteZero.into())),
            Err(e) => Err(Error::Socket(e)),
        }
    }
}

/// Writes what the socket takes now; `None` when it takes nothing.
fn write_nonblocking(stream: &mut UnixStream, slices: &[IoSlice]) -> Result<Option<usize>, Error> {
    loop {
        match stream.write_vectored(slices) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Socket(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        let key = ConnKey {
            local_port: 1024,
            peer_port: 5000,
        };
        (Connection::new(key, ours, State::Established), theirs)
    }

    fn credit_header(buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    #[test]
    fn reads_no_more_than_the_guest_has_room_for() {
        let (mut conn, mut host) = pair();
        host.write_all(&[7u8; 100]).unwrap();
        conn.readable = true;
        assert_eq!(conn.read_for_guest(64).unwrap().len(), 0, "no credit yet");
        conn.update_peer_credit(&credit_header(10, 0));
        assert!(conn.can_send_data());
        let range = conn.read_for_guest(64).unwrap();
        assert_eq!(conn.staged(range), [7u8; 10]);
        assert_eq!(conn.peer_credit(), 0);
        assert!(!conn.can_send_data());
        // The guest consumed 4 bytes.
        conn.update_peer_credit(&credit_header(10, 4));
        assert_eq!(conn.read_for_guest(64).unwrap().len(), 4);
    }

    #[test]
    fn read_ahead_fills_several_small_buffers_from_one_read_within_credit() {
        let (mut conn, mut host) = pair();
        let data: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        host.write_all(&data).unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        conn.update_peer_credit(&credit_header(10_000, 0));
        let mut got = Vec::new();
        loop {
            let range = conn.read_for_guest(4096).unwrap();
            if range.is_empty() {
                break;
            }
            assert!(range.len() <= 4096);
            got.extend_from_slice(conn.staged(range));
        }
        assert_eq!(got, data[..10_000], "no more than the credit");
        assert_eq!(conn.owed.shutdown, 0, "EOF is not reached before the data");
        // Room for the rest and then some: EOF is only seen by a read.
        conn.update_peer_credit(&credit_header(20_000, 10_000));
        loop {
            let range = conn.read_for_guest(4096).unwrap();
            if range.is_empty() {
                break;
            }
            got.extend_from_slice(conn.staged(range));
        }
        assert_eq!(got, data);
        assert_eq!(conn.owed.shutdown, SHUTDOWN_SEND, "EOF after all data");
    }

    #[test]
    fn host_eof_owes_the_guest_a_shutdown() {
        let (mut conn, host) = pair();
        conn.update_peer_credit(&credit_header(1000, 0));
        conn.readable = true;
        host.shutdown(Shutdown::Write).unwrap();
        assert!(conn.read_for_guest(64).unwrap().is_empty());
        assert_eq!(conn.owed.shutdown, SHUTDOWN_SEND);
        assert!(!conn.can_send_data());
    }

    #[test]
    fn guest_data_waits_when_the_host_stops_reading_and_credit_bounds_it() {
        let (mut conn, mut host) = pair();
        let chunk = vec![1u8; 64 * 1024];
        let mut sent = 0usize;
        // Send until the guest's credit runs out.
        loop {
            let credit = conn.our_credit() as usize;
            if credit == 0 {
                break;
            }
            let n = credit.min(chunk.len());
            conn.write_from_guest(&chunk[..n]).unwrap();
            sent += n;
            assert!(sent < 64 * 1024 * 1024, "credit never ran out");
        }
        assert_eq!(conn.pending_bytes(), BUF_ALLOC as usize);
        assert!(matches!(
            conn.write_from_guest(&[0u8; 1]),
            Err(Error::CreditExceeded { .. })
        ));
        // The host reads everything; a flush forwards the rest.
        let mut received = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        while received < sent {
            match host.read(&mut buf) {
                Ok(n) => received += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.writable = true;
                    conn.flush().unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(received, sent);
        assert_eq!(conn.pending_bytes(), 0);
        assert!(conn.owed.credit_update, "the guest must learn of the room");
        let header = conn.header(3, op::CREDIT_UPDATE, 0);
        assert_eq!(header.fwd_cnt, sent as u32);
        assert!(!conn.owed.credit_update || conn.fwd_cnt == conn.fwd_cnt_told);
    }

    #[test]
    fn guest_shutdown_send_reaches_the_host_as_eof_after_pending_data() {
        let (mut conn, mut host) = pair();
        conn.write_from_guest(b"last words").unwrap();
        conn.peer_shutdown(SHUTDOWN_SEND).unwrap();
        let mut all = Vec::new();
        host.set_nonblocking(false).unwrap();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"last words");
        conn.peer_shutdown(SHUTDOWN_RCV).unwrap();
        assert!(conn.is_finished());
    }

    #[test]
    fn response_tells_the_host_client_its_port() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let key = ConnKey {
            local_port: 1 << 30,
            peer_port: 1024,
        };
        let mut conn = Connection::new(key, ours, State::HostConnecting);
        conn.established().unwrap();
        let mut line = [0u8; 14];
        theirs.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        assert!(conn.established().is_err(), "a second RESPONSE is an error");
    }
}
