//! Hostile and broken requests: loops, buffers outside guest memory, malformed and oversized chains, corrupt rings and resets.

use super::*;

#[test]
fn descriptor_loops_are_dropped_and_the_device_goes_on() {
    let (mem, file) = setup();
    let vq = TestQueue::new(&mem, GuestAddress(0), 16);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    mem.write_obj(0x77u8, GuestAddress(STATUS)).unwrap();
    // 0 -> 1 -> 2 -> 1 ...
    vq.write_desc(0, HEADER, 16, DESC_F_NEXT, 1);
    vq.write_desc(1, DATA, 512, DESC_F_WRITE | DESC_F_NEXT, 2);
    vq.write_desc(2, STATUS, 1, DESC_F_WRITE | DESC_F_NEXT, 1);
    vq.publish(0);
    // A head past the table: an empty chain.
    vq.publish(40);
    dev.kick();
    assert_eq!(
        vq.used_idx(),
        1,
        "the head past the table cannot be returned"
    );
    assert_eq!(vq.used_elem(0), (0, 0));
    assert_eq!(status(&mem), 0x77, "status untouched");
    assert_eq!(dev.counters().dropped, 2);

    // The next, well-formed, request works.
    vq.write_desc(3, HEADER, 16, DESC_F_NEXT, 4);
    vq.write_desc(4, DATA, 512, DESC_F_WRITE | DESC_F_NEXT, 5);
    vq.write_desc(5, STATUS, 1, DESC_F_WRITE, 0);
    vq.publish(3);
    dev.kick();
    assert_eq!(vq.used_idx(), 2);
    assert_eq!(vq.used_elem(1), (3, 513));
    assert_eq!(status(&mem), S_OK);
}

#[test]
fn buffers_outside_guest_memory() {
    let (mem, file) = setup();
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    let beyond = MEM_SIZE as u64;
    // Data past the end of RAM, or straddling it: IOERR.
    for data in [
        Buffer::writable(beyond, 512),
        Buffer::writable(beyond - 256, 512),
        Buffer::writable(u64::MAX - 100, 512),
    ] {
        submit(&mem, &mut vq, VIRTIO_BLK_T_IN, 0, &[data]);
        dev.kick();
        assert_eq!(status(&mem), S_IOERR, "{data:?}");
    }
    // The header past RAM: IOERR too.
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    vq.add_chain(&[Buffer::readable(beyond, 16), Buffer::writable(STATUS, 1)]);
    dev.kick();
    assert_eq!(status(&mem), S_IOERR);
    // The status byte past RAM: dropped, used length 0.
    let head = vq.add_chain(&[Buffer::readable(HEADER, 16), Buffer::writable(beyond, 1)]);
    dev.kick();
    assert_eq!(vq.used_elem(vq.used_idx() - 1), (u32::from(head), 0));
    assert_eq!(dev.counters().dropped, 1);
}

#[test]
fn malformed_chains_have_defined_outcomes() {
    let (mem, file) = setup();
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    write_header(&mem, VIRTIO_BLK_T_IN, 0);
    let dropped = [
        // Zero-length status.
        vec![Buffer::readable(HEADER, 16), Buffer::writable(STATUS, 0)],
        // Status not writable.
        vec![Buffer::readable(HEADER, 16), Buffer::readable(STATUS, 1)],
        // Readable after writable.
        vec![
            Buffer::writable(DATA, 512),
            Buffer::readable(HEADER, 16),
            Buffer::writable(STATUS, 1),
        ],
    ];
    for chain in dropped {
        mem.write_obj(0x55u8, GuestAddress(STATUS)).unwrap();
        let head = vq.add_chain(&chain);
        dev.kick();
        assert_eq!(vq.used_elem(vq.used_idx() - 1), (u32::from(head), 0));
        assert_eq!(status(&mem), 0x55, "{chain:?}");
    }
    let io_errors = [
        // Header too short.
        vec![Buffer::readable(HEADER, 8), Buffer::writable(STATUS, 1)],
        // A read whose data is device-readable.
        vec![
            Buffer::readable(HEADER, 16),
            Buffer::readable(DATA, 512),
            Buffer::writable(STATUS, 1),
        ],
        // Not a whole sector.
        vec![
            Buffer::readable(HEADER, 16),
            Buffer::writable(DATA, 100),
            Buffer::writable(STATUS, 1),
        ],
    ];
    for chain in io_errors {
        let head = vq.add_chain(&chain);
        dev.kick();
        assert_eq!(vq.used_elem(vq.used_idx() - 1), (u32::from(head), 1));
        assert_eq!(status(&mem), S_IOERR, "{chain:?}");
    }
}

#[test]
fn oversized_requests_fail() {
    let (mem, file) = setup();
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    let len = (request::MAX_REQUEST_BYTES + 512) as u32;
    submit(
        &mem,
        &mut vq,
        VIRTIO_BLK_T_IN,
        0,
        &[Buffer::writable(0x10_0000, len)],
    );
    dev.kick();
    assert_eq!(status(&mem), S_IOERR);
    assert_eq!(vq.used_elem(0).1, 1);
}

#[test]
fn a_corrupt_avail_index_needs_a_reset() {
    let (mem, file) = setup();
    let vq = TestQueue::new(&mem, GuestAddress(0), 16);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    vq.set_avail_idx(100);
    dev.kick();
    assert!(dev.interrupt.needs_reset());
    assert_eq!(vq.used_idx(), 0);
    // Nothing more happens until a reset.
    vq.set_avail_idx(1);
    dev.kick();
    assert_eq!(vq.used_idx(), 0);
}

#[test]
fn a_reset_device_stops_touching_memory() {
    let (mem, file) = setup();
    let mut vq = TestQueue::new(&mem, GuestAddress(0), QUEUE_SIZE);
    let block = Block::with_backing("disk0", file.path(), false).unwrap();
    let mut dev = Device::new(&mem, &vq, block);
    dev.block.lock().unwrap().reset();
    assert!(!dev.block.lock().unwrap().is_active());
    submit(&mem, &mut vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    dev.kick();
    assert_eq!(vq.used_idx(), 0);
    // The loop no longer watches the queue eventfd.
    dev.queue_evt.write(1).unwrap();
    assert_eq!(dev.events.poll(), 0);
}
