//! Well-formed inputs to start fuzzing from: valid requests in a valid
//! queue, and a driver's register sequence. `replay --write-seeds DIR`
//! writes them as `DIR/<target>/<name>`.

use crate::{AVAIL_RING, DESC_TABLE, FLAG_EVENT_IDX, FLAG_INIT_DRIVER};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// A guest RAM image being filled in.
struct Image(Vec<u8>);

impl Image {
    fn new() -> Image {
        Image(vec![0; 0x4000])
    }

    fn put(&mut self, addr: u64, bytes: &[u8]) {
        let at = addr as usize;
        if self.0.len() < at + bytes.len() {
            self.0.resize(at + bytes.len(), 0);
        }
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
    }

    fn desc(&mut self, table: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut bytes = Vec::with_capacity(16);
        bytes.extend_from_slice(&addr.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&next.to_le_bytes());
        self.put(table + 16 * u64::from(index), &bytes);
    }

    /// Makes `heads` available.
    fn avail(&mut self, heads: &[u16]) {
        self.put(AVAIL_RING + 2, &(heads.len() as u16).to_le_bytes());
        for (i, head) in heads.iter().enumerate() {
            self.put(AVAIL_RING + 4 + 2 * i as u64, &head.to_le_bytes());
        }
    }

    /// Request `k`: header, data, status in descriptors 3k..3k+2 (or
    /// header and status only without data); returns its head.
    fn request(&mut self, k: u16, kind: u32, sector: u64, data: Option<(u32, bool)>) -> u16 {
        let header = 0x1000 + 16 * u64::from(k);
        let status = 0x3000 + u64::from(k);
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        self.put(header, &bytes);
        let head = 3 * k;
        match data {
            Some((len, writable)) => {
                let flags = if writable { WRITE | NEXT } else { NEXT };
                self.desc(DESC_TABLE, head, header, 16, NEXT, head + 1);
                self.desc(
                    DESC_TABLE,
                    head + 1,
                    0x2000 + 0x200 * u64::from(k),
                    len,
                    flags,
                    head + 2,
                );
                self.desc(DESC_TABLE, head + 2, status, 1, WRITE, 0);
            }
            None => {
                self.desc(DESC_TABLE, head, header, 16, NEXT, head + 1);
                self.desc(DESC_TABLE, head + 1, status, 1, WRITE, 0);
            }
        }
        head
    }
}

fn input(flags: u8, image: Image) -> Vec<u8> {
    let mut bytes = vec![flags];
    bytes.extend_from_slice(&image.0);
    bytes
}

/// A queue holding a read, a write, a flush, a GET_ID and an unknown type.
fn mixed_image() -> Image {
    let mut image = Image::new();
    let heads = [
        image.request(0, T_IN, 1, Some((512, true))),
        image.request(1, T_OUT, 2, Some((512, false))),
        image.request(2, T_FLUSH, 0, None),
        image.request(3, T_GET_ID, 0, Some((20, true))),
        image.request(4, 0x1234, 0, None),
    ];
    image.avail(&heads);
    image
}

pub fn block_request() -> Vec<(&'static str, Vec<u8>)> {
    let single = |kind, sector, data| {
        let mut image = Image::new();
        let head = image.request(0, kind, sector, data);
        image.avail(&[head]);
        image
    };
    let mut indirect = Image::new();
    let table = 0x3800;
    indirect.request(0, T_IN, 3, Some((1024, true)));
    // Move request 0's descriptors into an indirect table.
    let direct = indirect.0[..48].to_vec();
    indirect.put(table, &direct);
    indirect.desc(DESC_TABLE, 0, table, 48, INDIRECT, 0);
    indirect.avail(&[0]);
    let mut high = single(T_IN, 0, Some((512, true)));
    high.desc(DESC_TABLE, 1, 0x2_0000, 4096, WRITE | NEXT, 2);

    vec![
        ("read", input(0, single(T_IN, 1, Some((512, true))))),
        ("write", input(0, single(T_OUT, 2, Some((512, false))))),
        ("flush", input(0, single(T_FLUSH, 0, None))),
        ("get_id", input(0, single(T_GET_ID, 0, Some((20, true))))),
        ("mixed", input(0, mixed_image())),
        ("mixed_event_idx", input(FLAG_EVENT_IDX, mixed_image())),
        ("indirect", input(0, indirect)),
        ("high_ram", input(0, high)),
    ]
}

/// One register access: `kind` bit 0 writes; size 2 means 4 bytes.
fn op(kind: u8, offset: u16, value: u32) -> [u8; 8] {
    let mut bytes = [kind, 2, 0, 0, 0, 0, 0, 0];
    bytes[2..4].copy_from_slice(&offset.to_le_bytes());
    bytes[4..].copy_from_slice(&value.to_le_bytes());
    bytes
}

fn mmio_input(flags: u8, ops: &[[u8; 8]], image: Image) -> Vec<u8> {
    let mut bytes = vec![flags, ops.len() as u8];
    for op in ops {
        bytes.extend_from_slice(op);
    }
    bytes.extend_from_slice(&image.0);
    bytes
}

pub fn mmio_transport() -> Vec<(&'static str, Vec<u8>)> {
    let (read, write) = (0, 1);
    let driver = [
        op(write, 0x70, 1),
        op(write, 0x70, 3),
        op(write, 0x24, 1),
        op(write, 0x20, 1),
        op(write, 0x70, 11),
        op(write, 0x30, 0),
        op(write, 0x38, 16),
        op(write, 0x80, DESC_TABLE as u32),
        op(write, 0x90, AVAIL_RING as u32),
        op(write, 0xa0, crate::USED_RING as u32),
        op(write, 0x44, 1),
        op(write, 0x70, 15),
        op(write, 0x50, 0),
        op(read, 0x60, 0),
        op(write, 0x64, 1),
    ];
    let running = [
        op(write, 0x50, 0),
        op(read, 0x60, 0),
        op(write, 0x64, 3),
        op(read, 0x100, 0),
        op(read, 0xfc, 0),
        op(write | 0x80, 0x50, 0),
        op(read, 0x100, 0),
        op(write, 0x70, 0),
        op(read, 0x70, 0),
    ];
    vec![
        ("driver_init", mmio_input(0, &driver, mixed_image())),
        (
            "running",
            mmio_input(FLAG_INIT_DRIVER, &running, mixed_image()),
        ),
    ]
}

/// vsock packets in the tx queue: a REQUEST (header only, as Linux sends
/// it), and an RW with its payload in a second descriptor; the rx queue
/// (see `VSOCK_RX_*`) is left empty.
pub fn vsock_packet() -> Vec<(&'static str, Vec<u8>)> {
    let header = |op: u16, len: u32| {
        let mut h = [0u8; 44];
        h[0..8].copy_from_slice(&3u64.to_le_bytes());
        h[8..16].copy_from_slice(&2u64.to_le_bytes());
        h[16..20].copy_from_slice(&5000u32.to_le_bytes());
        h[20..24].copy_from_slice(&1024u32.to_le_bytes());
        h[24..28].copy_from_slice(&len.to_le_bytes());
        h[28..30].copy_from_slice(&1u16.to_le_bytes());
        h[30..32].copy_from_slice(&op.to_le_bytes());
        h[36..40].copy_from_slice(&(256u32 * 1024).to_le_bytes());
        h
    };
    let mut image = Image::new();
    image.put(0x1000, &header(1, 0));
    image.desc(DESC_TABLE, 0, 0x1000, 44, 0, 0);
    image.put(0x1100, &header(5, 5));
    image.put(0x1200, b"hello");
    image.desc(DESC_TABLE, 1, 0x1100, 44, NEXT, 2);
    image.desc(DESC_TABLE, 2, 0x1200, 5, 0, 0);
    image.avail(&[0, 1]);
    let mut plain = vec![0u8];
    plain.extend_from_slice(&image.0);
    let mut event_idx = vec![FLAG_EVENT_IDX];
    event_idx.extend_from_slice(&image.0);
    vec![
        ("request-and-rw", plain),
        ("request-and-rw-event-idx", event_idx),
    ]
}
