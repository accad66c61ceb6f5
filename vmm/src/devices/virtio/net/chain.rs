//! Checking a descriptor chain that carries one frame (virtio 1.2 §5.1.6):
//! pure, no I/O, separately testable and fuzzed.
//!
//! A transmit chain is device-readable only, a receive chain
//! device-writable only; either starts with the 12-byte
//! `virtio_net_hdr_v1`, which may share a descriptor with the frame or be
//! split across several. Zero-length descriptors carry nothing and are
//! skipped. Outcomes for a bad chain:
//! * [`Error::Unterminated`] (the chain loops, points past its table or
//!   into unreadable memory): the descriptor table itself is corrupt; the
//!   device stops and asks for a reset;
//! * anything else: the chain goes back to the driver with used length 0
//!   and is counted as malformed; the device carries on.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Size of `virtio_net_hdr_v1` (with VERSION_1 the header always has
/// `num_buffers`).
pub const HEADER_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Longest transmit chain: header plus a 64 KiB frame (the size the spec
/// asks of receive buffers when TSO is negotiated; more than any frame
/// a guest without offloads sends).
pub const MAX_TX_LEN: usize = 65562;
/// Longest chain accepted (an indirect table may hold 65535 descriptors).
pub const MAX_DESCRIPTORS: usize = 1024;

/// Which way a chain's bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Guest to host: every descriptor device-readable.
    Tx,
    /// Host to guest: every descriptor device-writable.
    Rx,
}

/// A guest buffer, checked to lie in guest RAM and not empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the descriptor chain loops or does not end")]
    Unterminated,
    #[error("empty descriptor chain")]
    Empty,
    #[error("more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("a {0:?} chain has a descriptor in the wrong direction")]
    WrongDirection(Direction),
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("{0} bytes cannot hold the {HEADER_LEN}-byte header")]
    TooShort(u64),
    #[error("{0} bytes exceed the {MAX_TX_LEN}-byte limit")]
    TooLong(u64),
}

impl Error {
    /// Whether the ring is corrupt (rather than one chain being bad).
    pub fn is_corrupt_ring(&self) -> bool {
        matches!(self, Error::Unterminated)
    }
}

/// The non-empty buffers of `chain`, checked for `direction`.
pub fn parse(
    mem: &GuestMemoryMmap,
    chain: impl IntoIterator<Item = Descriptor>,
    direction: Direction,
) -> Result<Vec<Segment>, Error> {
    let mut segments = Vec::new();
    let mut total = 0u64;
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Err(Error::TooManyDescriptors);
        }
        last_has_next = desc.has_next();
        if desc.is_write_only() != (direction == Direction::Rx) {
            return Err(Error::WrongDirection(direction));
        }
        if desc.len() == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            return Err(Error::OutOfMemory {
                addr: desc.addr().raw_value(),
                len: desc.len(),
            });
        }
        total += u64::from(desc.len());
        segments.push(Segment {
            addr: desc.addr(),
            len: desc.len(),
        });
    }
    // virtio-queue stops yielding at a loop, an index past the table or
    // unreadable memory: the last descriptor then still says "next".
    if last_has_next {
        return Err(Error::Unterminated);
    }
    if count == 0 {
        return Err(Error::Empty);
    }
    if total < HEADER_LEN as u64 {
        return Err(Error::TooShort(total));
    }
    if direction == Direction::Tx && total > MAX_TX_LEN as u64 {
        return Err(Error::TooLong(total));
    }
    Ok(segments)
}

/// The header of a received frame when the guest negotiated no offloads:
/// no checksum or GSO flags, `num_buffers` 1 (no MRG_RXBUF).
pub fn rx_header() -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
    header
}

/// Writes `bytes` into `segments` from byte `offset` of the chain (the
/// segments hold at least `offset + bytes.len()` bytes): the whole header
/// of a frame, or only `num_buffers` of one whose header the backend wrote.
pub fn write_at(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    offset: usize,
    bytes: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut skip = offset;
    let mut rest = bytes;
    for segment in segments {
        if rest.is_empty() {
            break;
        }
        let len = segment.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = rest.len().min(len - skip);
        mem.write_slice(&rest[..n], segment.addr.unchecked_add(skip as u64))?;
        rest = &rest[n..];
        skip = 0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    use super::*;
    use crate::devices::virtio::test_utils::guest_memory;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn desc(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn good_chains_keep_their_non_empty_buffers() {
        let mem = guest_memory(0x20000);
        let tx = [desc(0x1000, 4, N), desc(0x5000, 0, N), desc(0x2000, 100, 0)];
        assert_eq!(
            parse(&mem, tx, Direction::Tx),
            Ok(vec![seg(0x1000, 4), seg(0x2000, 100)])
        );
        let rx = [desc(0x3000, 12, W | N), desc(0x4000, 1514, W)];
        assert_eq!(
            parse(&mem, rx, Direction::Rx),
            Ok(vec![seg(0x3000, 12), seg(0x4000, 1514)])
        );
        // A header alone is a (useless but) well-formed receive chain.
        assert!(parse(&mem, [desc(0x3000, 12, W)], Direction::Rx).is_ok());
    }

    #[test]
    fn bad_chains_have_defined_errors() {
        let mem = guest_memory(0x20000);
        let cases: Vec<(Vec<Descriptor>, Direction, Error)> = vec![
            (vec![], Direction::Tx, Error::Empty),
            (
                vec![desc(0x1000, 20, N)],
                Direction::Tx,
                Error::Unterminated,
            ),
            (
                vec![desc(0x1000, 20, W)],
                Direction::Tx,
                Error::WrongDirection(Direction::Tx),
            ),
            (
                vec![desc(0x1000, 20, W | N), desc(0x2000, 20, 0)],
                Direction::Rx,
                Error::WrongDirection(Direction::Rx),
            ),
            (
                vec![desc(0x1f000, 0x2000, 0)],
                Direction::Tx,
                Error::OutOfMemory {
                    addr: 0x1f000,
                    len: 0x2000,
                },
            ),
            (
                vec![desc(u64::MAX - 4, 20, W)],
                Direction::Rx,
                Error::OutOfMemory {
                    addr: u64::MAX - 4,
                    len: 20,
                },
            ),
            (vec![desc(0x1000, 0, 0)], Direction::Tx, Error::TooShort(0)),
            (
                vec![desc(0x1000, 4, N), desc(0x2000, 7, 0)],
                Direction::Tx,
                Error::TooShort(11),
            ),
            (
                vec![desc(0x1000, 11, W)],
                Direction::Rx,
                Error::TooShort(11),
            ),
            (
                vec![desc(0x1000, MAX_TX_LEN as u32 + 1, 0)],
                Direction::Tx,
                Error::TooLong(MAX_TX_LEN as u64 + 1),
            ),
            (
                vec![desc(0x1000, 1, N); MAX_DESCRIPTORS + 1],
                Direction::Tx,
                Error::TooManyDescriptors,
            ),
        ];
        for (chain, direction, error) in cases {
            assert_eq!(
                parse(&mem, chain.clone(), direction),
                Err(error),
                "{chain:?}"
            );
        }
        // Receive chains may be longer than any transmit frame.
        assert!(parse(&mem, [desc(0x1000, 0x10000, W)], Direction::Rx).is_ok());
        assert!(parse(&mem, [desc(0x1000, MAX_TX_LEN as u32, 0)], Direction::Tx).is_ok());
    }

    #[test]
    fn num_buffers_alone_is_written_across_buffers() {
        let mem = guest_memory(0x10000);
        mem.write_slice(&[0xee; 16], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xee; 16], GuestAddress(0x2000)).unwrap();
        // num_buffers straddles the two buffers: byte 10 in the first,
        // byte 11 in the second.
        let segments = [seg(0x1000, 11), seg(0x2000, 16)];
        write_at(&mem, &segments, NUM_BUFFERS_OFFSET, &1u16.to_le_bytes()).unwrap();
        let mut first = [0u8; 12];
        mem.read_slice(&mut first, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            first,
            [
                0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 1, 0xee
            ]
        );
        let mut second = [0u8; 2];
        mem.read_slice(&mut second, GuestAddress(0x2000)).unwrap();
        assert_eq!(second, [0, 0xee]);
    }

    #[test]
    fn the_header_is_written_across_buffers() {
        let mem = guest_memory(0x10000);
        mem.write_slice(&[0xee; 16], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xee; 16], GuestAddress(0x2000)).unwrap();
        let segments = [seg(0x1000, 5), seg(0x2000, 16)];
        write_at(&mem, &segments, 0, &rx_header()).unwrap();
        let mut first = [0u8; 6];
        mem.read_slice(&mut first, GuestAddress(0x1000)).unwrap();
        assert_eq!(first, [0, 0, 0, 0, 0, 0xee]);
        let mut second = [0u8; 8];
        mem.read_slice(&mut second, GuestAddress(0x2000)).unwrap();
        assert_eq!(second, [0, 0, 0, 0, 0, 1, 0, 0xee]);
    }
}
