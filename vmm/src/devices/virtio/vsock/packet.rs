//! virtio-vsock packets: the 44-byte header, reading a packet the guest
//! sent (a tx chain) and writing one to the guest (an rx chain).
//!
//! Every descriptor is checked: direction, and that its whole range lies in
//! guest RAM. A chain's total size is bounded before anything is copied.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Size of `struct virtio_vsock_hdr`.
pub const HEADER_LEN: usize = 44;
/// Largest payload of one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most descriptors in one packet's chain (Linux uses 1–2, more only for
/// zero-copy sends); more means a looping or absurd chain.
pub const MAX_DESCRIPTORS: usize = 64;
/// The only socket type virtio-vsock carries here.
pub const TYPE_STREAM: u16 = 1;
/// The host's CID, where guest connections to the VMM's sockets go.
pub const HOST_CID: u64 = 2;

/// Packet operations (`VIRTIO_VSOCK_OP_*`).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("a tx descriptor is device-writable")]
    WritableInTx,
    #[error("an rx descriptor is device-readable")]
    ReadableInRx,
    #[error("descriptor [{addr:#x}, +{len}) is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("chain of {0} bytes is shorter than the header")]
    TooShort(usize),
    #[error("chain is longer than a header and {MAX_PAYLOAD} bytes of payload")]
    TooLong,
    #[error("header says {header} payload bytes, chain holds {chain}")]
    LengthMismatch { header: u32, chain: usize },
    #[error("chain has more than {MAX_DESCRIPTORS} descriptors (a loop?)")]
    TooManyDescriptors,
    #[error("guest memory access failed")]
    Memory,
}

/// `struct virtio_vsock_hdr`, little-endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or_default());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// One checked buffer of a chain.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// Collects a chain's buffers, all in the direction `writable`, each inside
/// guest memory, at most `limit` bytes in all.
fn segments(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    writable: bool,
    limit: usize,
) -> Result<(Vec<Segment>, usize), Error> {
    let mut segments = Vec::new();
    let mut total = 0usize;
    for (index, desc) in chain.enumerate() {
        if index >= MAX_DESCRIPTORS {
            return Err(Error::TooManyDescriptors);
        }
        if desc.is_write_only() != writable {
            return Err(if writable {
                Error::ReadableInRx
            } else {
                Error::WritableInTx
            });
        }
        let (addr, len) = (desc.addr(), desc.len());
        if len == 0 {
            continue;
        }
        if !mem.check_range(addr, len as usize) {
            return Err(Error::OutOfMemory { addr: addr.0, len });
        }
        total = total.saturating_add(len as usize);
        if total > limit {
            // Only the bytes up to the limit would be used; more is an
            // oversized packet (tx) or simply spare room (rx).
            if !writable {
                return Err(Error::TooLong);
            }
            let keep = len as usize - (total - limit);
            segments.push(Segment { addr, len: keep });
            return Ok((segments, limit));
        }
        segments.push(Segment {
            addr,
            len: len as usize,
        });
    }
    Ok((segments, total))
}

/// Reads the packet of a tx chain: returns its header and leaves exactly
/// `header.len` payload bytes in `payload`.
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    payload: &mut Vec<u8>,
) -> Result<Header, Error> {
    let (segments, total) = segments(mem, chain, false, HEADER_LEN + MAX_PAYLOAD)?;
    if total < HEADER_LEN {
        return Err(Error::TooShort(total));
    }
    // The header and the payload go to their own places as they are read
    // (the header may span descriptors), with no second copy.
    let mut header_bytes = [0u8; HEADER_LEN];
    payload.clear();
    payload.resize(total - HEADER_LEN, 0);
    let mut at = 0;
    for segment in &segments {
        let in_header = HEADER_LEN.saturating_sub(at).min(segment.len);
        if in_header > 0 {
            mem.read_slice(&mut header_bytes[at..at + in_header], segment.addr)
                .map_err(|_| Error::Memory)?;
        }
        let rest = segment.len - in_header;
        if rest > 0 {
            let from = at + in_header - HEADER_LEN;
            let addr = segment.addr.unchecked_add(in_header as u64);
            mem.read_slice(&mut payload[from..from + rest], addr)
                .map_err(|_| Error::Memory)?;
        }
        at += segment.len;
    }
    let header = Header::from_bytes(&header_bytes);
    let chain_payload = total - HEADER_LEN;
    if header.len as usize > chain_payload {
        return Err(Error::LengthMismatch {
            header: header.len,
            chain: chain_payload,
        });
    }
    payload.truncate(header.len as usize);
    Ok(header)
}

/// The writable buffers of an rx chain, ready to take one packet.
#[derive(Debug)]
pub struct RxBuffer {
    segments: Vec<Segment>,
    capacity: usize,
}

impl RxBuffer {
    /// Checks an rx chain; it must hold at least a header.
    pub fn new(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<RxBuffer, Error> {
        let (segments, capacity) = segments(mem, chain, true, HEADER_LEN + MAX_PAYLOAD)?;
        if capacity < HEADER_LEN {
            return Err(Error::TooShort(capacity));
        }
        Ok(RxBuffer { segments, capacity })
    }

    /// Room for payload after the header.
    pub fn payload_capacity(&self) -> usize {
        self.capacity - HEADER_LEN
    }

    /// The payload area when the header and the payload share the chain's
    /// only buffer, as Linux lays out its rx buffers: host data can then be
    /// read straight into guest memory.
    pub fn contiguous_payload<'m>(&self, mem: &'m GuestMemoryMmap) -> Option<VolatileSlice<'m>> {
        let [only] = self.segments.as_slice() else {
            return None;
        };
        let len = only.len.checked_sub(HEADER_LEN).filter(|l| *l > 0)?;
        let start = only.addr.checked_add(HEADER_LEN as u64)?;
        mem.get_slice(start, len).ok()
    }

    /// Writes `header` for `len` payload bytes already in place behind it
    /// (see [`RxBuffer::contiguous_payload`]); returns the used length.
    pub fn write_header(
        &self,
        mem: &GuestMemoryMmap,
        header: &Header,
        len: usize,
    ) -> Result<u32, Error> {
        let [only] = self.segments.as_slice() else {
            return Err(Error::Memory);
        };
        if len > self.payload_capacity() {
            return Err(Error::TooLong);
        }
        let mut header = *header;
        header.len = len as u32;
        mem.write_slice(&header.to_bytes(), only.addr)
            .map_err(|_| Error::Memory)?;
        Ok((HEADER_LEN + len) as u32)
    }

    /// Writes `header` (with `len` set to the payload's) and `payload`;
    /// returns the bytes written, the used length.
    pub fn write(
        &self,
        mem: &GuestMemoryMmap,
        header: &Header,
        payload: &[u8],
    ) -> Result<u32, Error> {
        if payload.len() > self.payload_capacity() {
            return Err(Error::TooLong);
        }
        let mut header = *header;
        header.len = payload.len() as u32;
        let header_bytes = header.to_bytes();
        let mut sources = [&header_bytes[..], payload];
        let mut written = 0usize;
        for segment in &self.segments {
            let mut offset = 0;
            while offset < segment.len {
                let Some(source) = sources.iter_mut().find(|s| !s.is_empty()) else {
                    return Ok(written as u32);
                };
                let n = source.len().min(segment.len - offset);
                mem.write_slice(&source[..n], segment.addr.unchecked_add(offset as u64))
                    .map_err(|_| Error::Memory)?;
                *source = &source[n..];
                offset += n;
                written += n;
            }
        }
        Ok(written as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_its_wire_format() {
        let header = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234_5678,
            dst_port: 1024,
            len: 77,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0xdead_beef,
        };
        let bytes = header.to_bytes();
        assert_eq!(bytes[0], 3);
        assert_eq!(&bytes[20..24], &1024u32.to_le_bytes());
        assert_eq!(&bytes[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&bytes), header);
    }
}
