//! Parsing a virtio-blk request out of a descriptor chain (virtio 1.2
//! §5.2.6): pure, no I/O, separately testable and fuzzed.
//!
//! A request is a 16-byte header (type, reserved, sector), data, and a
//! one-byte status, in that order in the chain's bytes; device-readable
//! descriptors come first, device-writable ones last (any layout: the header
//! may share a descriptor with data). The status byte is the last byte of
//! the last descriptor.
//!
//! Outcomes for a malformed chain, as [`ParseError::status`] tells:
//! * no trustworthy status byte (empty chain, a loop or a chain that does
//!   not end, more than [`MAX_DESCRIPTORS`], a readable descriptor after a
//!   writable one, a last descriptor that is not writable or is empty, or a
//!   status byte outside guest RAM): `status` is `None`; the device puts the
//!   chain in the used ring with length 0 and touches nothing else;
//! * anything else (short header, a buffer outside guest RAM, data in the
//!   wrong direction, a length that is not a multiple of 512 or exceeds
//!   [`MAX_REQUEST_BYTES`]): the device writes `VIRTIO_BLK_S_IOERR` there.
//!
//! Zero-length descriptors before the last one carry no bytes and are
//! skipped.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Sector size of the virtio-blk protocol, whatever the backing's.
pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;
/// Largest data transfer of one request: 16 MiB. The device advertises
/// SEG_MAX × SIZE_MAX below this, so a conforming driver never exceeds it
/// (Linux sends at most 1.25 MiB unless told otherwise); it bounds the time
/// one request holds the device.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Longest chain accepted (an indirect table may hold 65535 descriptors).
pub const MAX_DESCRIPTORS: usize = 1024;
/// Size of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(value: u32) -> RequestType {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A guest buffer, checked to lie in guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// The data buffers, in order: device-writable for In and GetId,
    /// device-readable for Out, empty otherwise.
    pub data: Vec<Segment>,
    /// Total length of `data` (at most [`MAX_REQUEST_BYTES`]).
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("empty descriptor chain")]
    EmptyChain,
    #[error("the descriptor chain loops or does not end")]
    Unterminated,
    #[error("more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the last descriptor is not a writable status byte")]
    NoStatus,
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("request header shorter than {HEADER_LEN} bytes")]
    ShortHeader,
    #[error("{0:?} request with data in the wrong direction")]
    WrongDirection(RequestType),
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    #[error("data length {0} exceeds {MAX_REQUEST_BYTES}")]
    TooLarge(u64),
}

/// A chain that is not a valid request, and where to report it, if anywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct ParseError {
    pub error: Error,
    /// The status byte to write `VIRTIO_BLK_S_IOERR` to; `None` when the
    /// chain's layout is too broken to trust one.
    pub status: Option<GuestAddress>,
}

/// The chain's bytes, split by direction, the status byte excluded.
struct Layout {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    status: GuestAddress,
}

/// Parses the request in `chain`, whose buffers live in `mem`.
pub fn parse(
    mem: &GuestMemoryMmap,
    chain: impl IntoIterator<Item = Descriptor>,
) -> Result<Request, ParseError> {
    let layout = split_chain(mem, chain).map_err(|error| ParseError {
        error,
        status: None,
    })?;
    let status = layout.status;
    request(mem, layout).map_err(|error| ParseError {
        error,
        status: Some(status),
    })
}

/// Walks the chain: directions in order, a writable status byte last.
fn split_chain(
    mem: &GuestMemoryMmap,
    chain: impl IntoIterator<Item = Descriptor>,
) -> Result<Layout, Error> {
    let mut descriptors = Vec::new();
    for desc in chain {
        if descriptors.len() == MAX_DESCRIPTORS {
            return Err(Error::TooManyDescriptors);
        }
        descriptors.push(desc);
    }
    let last = descriptors.last().ok_or(Error::EmptyChain)?;
    // virtio-queue stops yielding at a loop, an index past the table, or
    // unreadable memory: the last descriptor then still says "next".
    if last.has_next() {
        return Err(Error::Unterminated);
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(Error::NoStatus);
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .filter(|addr| mem.address_in_range(*addr))
        .ok_or(Error::NoStatus)?;
    if descriptors
        .windows(2)
        .any(|pair| pair[0].is_write_only() && !pair[1].is_write_only())
    {
        return Err(Error::ReadableAfterWritable);
    }

    let mut layout = Layout {
        readable: Vec::new(),
        writable: Vec::new(),
        status,
    };
    let count = descriptors.len();
    for (i, desc) in descriptors.into_iter().enumerate() {
        // The status byte is not part of the data.
        let len = if i + 1 == count {
            desc.len() - 1
        } else {
            desc.len()
        };
        let segment = Segment {
            addr: desc.addr(),
            len,
        };
        if desc.is_write_only() {
            layout.writable.push(segment);
        } else {
            layout.readable.push(segment);
        }
    }
    Ok(layout)
}

/// Interprets the header and checks the data against the request type.
fn request(mem: &GuestMemoryMmap, layout: Layout) -> Result<Request, Error> {
    let readable = checked(mem, layout.readable)?;
    let writable = checked(mem, layout.writable)?;
    let (header, readable_data) = split_front(&readable, HEADER_LEN)?;
    let mut bytes = [0u8; HEADER_LEN];
    let mut filled = 0;
    for segment in header {
        let end = filled + segment.len as usize;
        mem.read_slice(&mut bytes[filled..end], segment.addr)
            .map_err(|_| out_of_memory(&segment))?;
        filled = end;
    }
    let kind = RequestType::from_raw(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
    let sector = u64::from_le_bytes([
        bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15],
    ]);

    let data = match kind {
        RequestType::In | RequestType::GetId if readable_data.is_empty() => writable,
        RequestType::Out if writable.is_empty() => readable_data,
        RequestType::Flush if readable_data.is_empty() && writable.is_empty() => Vec::new(),
        RequestType::Unsupported(_) => Vec::new(),
        _ => return Err(Error::WrongDirection(kind)),
    };
    let total: u64 = data.iter().map(|s| u64::from(s.len)).sum();
    if total > MAX_REQUEST_BYTES {
        return Err(Error::TooLarge(total));
    }
    if matches!(kind, RequestType::In | RequestType::Out) && total % SECTOR_SIZE != 0 {
        return Err(Error::UnalignedLength(total));
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len: total as u32,
        status: layout.status,
    })
}

/// Drops empty segments and checks the rest lie in guest RAM.
fn checked(mem: &GuestMemoryMmap, segments: Vec<Segment>) -> Result<Vec<Segment>, Error> {
    let segments: Vec<Segment> = segments.into_iter().filter(|s| s.len > 0).collect();
    for segment in &segments {
        if !mem.check_range(segment.addr, segment.len as usize) {
            return Err(out_of_memory(segment));
        }
    }
    Ok(segments)
}

fn out_of_memory(segment: &Segment) -> Error {
    Error::OutOfMemory {
        addr: segment.addr.raw_value(),
        len: segment.len,
    }
}

/// Splits `len` bytes off the front of `segments` (the header).
fn split_front(segments: &[Segment], len: usize) -> Result<(Vec<Segment>, Vec<Segment>), Error> {
    let mut front = Vec::new();
    let mut rest = Vec::new();
    let mut wanted = len as u64;
    for segment in segments {
        let take = wanted.min(u64::from(segment.len));
        if take > 0 {
            front.push(Segment {
                addr: segment.addr,
                len: take as u32,
            });
            wanted -= take;
        }
        if take < u64::from(segment.len) {
            rest.push(Segment {
                // In guest RAM (checked), so this cannot overflow.
                addr: segment.addr.unchecked_add(take),
                len: segment.len - take as u32,
            });
        }
    }
    if wanted > 0 {
        return Err(Error::ShortHeader);
    }
    Ok((front, rest))
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

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    }

    #[test]
    fn read_request_in_three_descriptors() {
        let mem = guest_memory(0x10000);
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 7);
        let chain = [
            desc(0x1000, 16, N),
            desc(0x2000, 1024, W | N),
            desc(0x3000, 1, W),
        ];
        let request = parse(&mem, chain).unwrap();
        assert_eq!(request.kind, RequestType::In);
        assert_eq!(request.sector, 7);
        assert_eq!(request.data_len, 1024);
        assert_eq!(
            request.data,
            vec![Segment {
                addr: GuestAddress(0x2000),
                len: 1024
            }]
        );
        assert_eq!(request.status, GuestAddress(0x3000));
    }

    #[test]
    fn header_and_data_may_share_descriptors() {
        let mem = guest_memory(0x10000);
        // Header split over two descriptors, the second also holding data;
        // data and status share the last descriptor.
        header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 3);
        mem.write_slice(&[0u8; 8], GuestAddress(0x2000)).unwrap();
        let mut second = [0u8; 8];
        mem.read_slice(&mut second, GuestAddress(0x1008)).unwrap();
        mem.write_slice(&second, GuestAddress(0x2000)).unwrap();
        let chain = [
            desc(0x1000, 8, N),
            desc(0x2000, 8 + 512, N),
            desc(0x5000, 1, W),
        ];
        let request = parse(&mem, chain).unwrap();
        assert_eq!(request.kind, RequestType::Out);
        assert_eq!(request.sector, 3);
        assert_eq!(
            request.data,
            vec![Segment {
                addr: GuestAddress(0x2008),
                len: 512
            }]
        );

        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let chain = [desc(0x1000, 16, N), desc(0x6000, 513, W)];
        let request = parse(&mem, chain).unwrap();
        assert_eq!(request.data_len, 512);
        assert_eq!(request.status, GuestAddress(0x6200));
    }

    #[test]
    fn broken_layouts_have_no_status() {
        let mem = guest_memory(0x10000);
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        let cases: Vec<(Vec<Descriptor>, Error)> = vec![
            (vec![], Error::EmptyChain),
            (vec![desc(0x1000, 16, N)], Error::Unterminated),
            (vec![desc(0x1000, 16, 0)], Error::NoStatus),
            (
                vec![desc(0x1000, 16, N), desc(0x3000, 0, W)],
                Error::NoStatus,
            ),
            (
                vec![desc(0x1000, 16, N), desc(0xffff_0000, 1, W)],
                Error::NoStatus,
            ),
            (
                vec![desc(0x1000, 16, N), desc(u64::MAX, 2, W)],
                Error::NoStatus,
            ),
            (
                vec![
                    desc(0x2000, 512, W | N),
                    desc(0x1000, 16, N),
                    desc(0x3000, 1, W),
                ],
                Error::ReadableAfterWritable,
            ),
            (
                vec![desc(0x2000, 1, N); MAX_DESCRIPTORS + 1],
                Error::TooManyDescriptors,
            ),
        ];
        for (chain, error) in cases {
            let result = parse(&mem, chain.clone());
            assert_eq!(
                result,
                Err(ParseError {
                    error,
                    status: None
                }),
                "{chain:?}"
            );
        }
    }

    #[test]
    fn bad_requests_report_through_the_status_byte() {
        let mem = guest_memory(0x10000);
        let status = desc(0x3000, 1, W);
        let io_error = |error| {
            Err(ParseError {
                error,
                status: Some(GuestAddress(0x3000)),
            })
        };
        header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            parse(&mem, [desc(0x1000, 15, N), status]),
            io_error(Error::ShortHeader)
        );
        assert_eq!(
            parse(
                &mem,
                [desc(0x1000, 16, N), desc(0xf000, 0x2000, W | N), status]
            ),
            io_error(Error::OutOfMemory {
                addr: 0xf000,
                len: 0x2000
            })
        );
        assert_eq!(
            parse(&mem, [desc(0x1000, 16 + 512, N), status]),
            io_error(Error::WrongDirection(RequestType::In))
        );
        assert_eq!(
            parse(
                &mem,
                [desc(0x1000, 16, N), desc(0x2000, 100, W | N), status]
            ),
            io_error(Error::UnalignedLength(100))
        );
        let huge = (MAX_REQUEST_BYTES + 512) as u32;
        let mem_big = guest_memory(0x120_0000);
        header(&mem_big, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            parse(
                &mem_big,
                [
                    desc(0x1000, 16, N),
                    desc(0x10_0000, huge - 0x1000, W | N),
                    desc(0x2000, 0x1001, W)
                ]
            ),
            Err(ParseError {
                error: Error::TooLarge(u64::from(huge)),
                status: Some(GuestAddress(0x3000))
            })
        );
        header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            parse(
                &mem,
                [desc(0x1000, 16, N), desc(0x2000, 512, W | N), status]
            ),
            io_error(Error::WrongDirection(RequestType::Out))
        );
        header(&mem, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            parse(
                &mem,
                [desc(0x1000, 16, N), desc(0x2000, 512, W | N), status]
            ),
            io_error(Error::WrongDirection(RequestType::Flush))
        );
        // The header itself outside guest RAM.
        assert_eq!(
            parse(&mem, [desc(0x1_0000, 16, N), status]),
            io_error(Error::OutOfMemory {
                addr: 0x1_0000,
                len: 16
            })
        );
    }

    #[test]
    fn unknown_types_and_empty_descriptors() {
        let mem = guest_memory(0x10000);
        header(&mem, 0x1000, 0x1234, 9);
        let request = parse(
            &mem,
            [
                desc(0x1000, 16 + 40, N),
                desc(0x2000, 8, W | N),
                desc(0x3000, 1, W),
            ],
        )
        .unwrap();
        assert_eq!(request.kind, RequestType::Unsupported(0x1234));
        assert!(request.data.is_empty());

        header(&mem, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let request = parse(
            &mem,
            [
                desc(0x1000, 16, N),
                desc(0x9000_0000, 0, N),
                desc(0x2000, 20, W | N),
                desc(0x3000, 1, W),
            ],
        )
        .unwrap();
        assert_eq!(request.kind, RequestType::GetId);
        assert_eq!(request.data_len, 20);
    }
}
