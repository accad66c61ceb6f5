//! Hostile and broken chains, corrupt rings, resets mid-traffic: counted, returned, or a reset asked for; the device goes on where it can.

use super::*;

#[test]
fn malformed_tx_chains_are_returned_and_counted() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (rxq, mut txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    let beyond = MEM_SIZE as u64;
    let cases: Vec<Vec<Buffer>> = vec![
        // A writable buffer in a transmit chain.
        vec![
            Buffer::readable(TX_BUF, 12),
            Buffer::writable(TX_BUF + 0x1000, 60),
        ],
        // Outside guest memory, and straddling its end.
        vec![Buffer::readable(beyond, 100)],
        vec![Buffer::readable(beyond - 50, 100)],
        vec![Buffer::readable(u64::MAX - 10, 100)],
        // Zero-length only.
        vec![Buffer::readable(TX_BUF, 0)],
        // Shorter than the header.
        vec![
            Buffer::readable(TX_BUF, 4),
            Buffer::readable(TX_BUF + 0x1000, 7),
        ],
        // Longer than any frame.
        vec![Buffer::readable(TX_BUF, MAX_TX_LEN as u32 + 1)],
        vec![
            Buffer::readable(TX_BUF, 60000),
            Buffer::readable(TX_BUF + 0x10000, 6000),
        ],
    ];
    let count = cases.len();
    for (i, chain) in cases.into_iter().enumerate() {
        let head = txq.add_chain(&chain);
        dev.kick_tx();
        assert_eq!(txq.used_idx() as usize, i + 1, "{chain:?}");
        assert_eq!(txq.used_elem(i as u16), (u32::from(head), 0), "{chain:?}");
        assert!(!dev.interrupt.needs_reset());
    }
    assert_eq!(dev.counters().tx_malformed, count as u64);
    assert!(recv_all(&peer).is_empty(), "nothing reached the backend");

    // Zero-length descriptors inside a good chain are skipped; the device
    // goes on.
    mem.write_slice(&TX_HEADER, GuestAddress(TX_BUF)).unwrap();
    let eth = frame(1, 60);
    mem.write_slice(&eth, GuestAddress(TX_BUF + 0x1000))
        .unwrap();
    txq.add_chain(&[
        Buffer::readable(TX_BUF, 12),
        Buffer::readable(beyond, 0),
        Buffer::readable(TX_BUF + 0x1000, 60),
    ]);
    dev.kick_tx();
    let mut want = TX_HEADER.to_vec();
    want.extend_from_slice(&eth);
    assert_eq!(recv_all(&peer), vec![want]);
    assert_eq!(dev.counters().tx_frames, 1);
}

#[test]
fn a_frame_the_backend_refuses_is_dropped_and_counted() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (rxq, mut txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    // The peer is gone: writes fail with ECONNREFUSED, not back-pressure.
    drop(peer);
    let head = send(mem, &mut txq, TX_BUF, &frame(1, 60));
    dev.kick_tx();
    assert_eq!(txq.used_elem(0), (u32::from(head), 0));
    let counters = dev.counters();
    assert_eq!((counters.tx_dropped, counters.tx_frames), (1, 0));
}

#[test]
fn malformed_rx_chains_are_returned_and_the_frame_kept() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (mut rxq, txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    let eth = frame(5, 80);
    peer.send(&datagram(&eth)).unwrap();
    dev.events.settle();
    let beyond = MEM_SIZE as u64;
    let cases: Vec<Vec<Buffer>> = vec![
        // A readable buffer in a receive chain.
        vec![
            Buffer::readable(RX_BUF, 12),
            Buffer::writable(RX_BUF + 0x1000, 1514),
        ],
        vec![Buffer::writable(beyond, RX_LEN)],
        vec![Buffer::writable(beyond - 100, RX_LEN)],
        vec![Buffer::writable(RX_BUF, 0)],
        vec![Buffer::writable(RX_BUF, 11)],
    ];
    let count = cases.len();
    for chain in &cases {
        rxq.add_chain(chain);
    }
    let good = offer(&mut rxq, 4);
    dev.kick_rx();
    assert_eq!(rxq.used_idx() as usize, count + 1);
    for (i, chain) in (0u16..).zip(&cases) {
        assert_eq!(rxq.used_elem(i).1, 0, "{chain:?}");
    }
    assert_eq!(dev.counters().rx_malformed, count as u64);
    // The frame was not lost to the bad chains.
    assert_eq!(
        rxq.used_elem(count as u16),
        (u32::from(good), (HEADER_LEN + 80) as u32)
    );
    assert_eq!(
        guest_bytes(mem, RX_BUF + 4 * 0x1000 + HEADER_LEN as u64, 80),
        eth
    );
    assert!(!dev.interrupt.needs_reset());
}

#[test]
fn frames_larger_than_the_rx_chain_are_dropped() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (mut rxq, txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    let head = rxq.add_chain(&[Buffer::writable(RX_BUF, 12 + 50)]);
    offer(&mut rxq, 1);
    peer.send(&datagram(&frame(1, 100))).unwrap();
    peer.send(&datagram(&frame(2, 50))).unwrap();
    dev.kick_rx();
    assert_eq!(rxq.used_idx(), 2);
    assert_eq!(rxq.used_elem(0), (u32::from(head), 0));
    assert_eq!(rxq.used_elem(1).1, (HEADER_LEN + 50) as u32);
    let counters = dev.counters();
    assert_eq!((counters.rx_truncated, counters.rx_frames), (1, 1));
}

#[test]
fn a_descriptor_loop_needs_a_reset() {
    for queue in [RX_QUEUE, TX_QUEUE] {
        let setup = Setup::new();
        let mem = &setup.mem;
        let (rxq, txq) = setup.queues();
        let (backend, peer) = socket_pair();
        let mut dev = Device::new(mem, &rxq, &txq, backend);
        let (vq, flags) = if queue == RX_QUEUE {
            (&rxq, DESC_F_WRITE)
        } else {
            (&txq, 0)
        };
        // 0 -> 1 -> 0 ...
        vq.write_desc(0, TX_BUF, 100, flags | DESC_F_NEXT, 1);
        vq.write_desc(1, TX_BUF + 0x1000, 100, flags | DESC_F_NEXT, 0);
        vq.publish(0);
        if queue == RX_QUEUE {
            peer.send(&datagram(&frame(1, 60))).unwrap();
            dev.kick_rx();
        } else {
            dev.kick_tx();
        }
        assert!(dev.interrupt.needs_reset(), "queue {queue}");
        assert_eq!(vq.used_idx(), 0);
        // Nothing more happens, and nothing spins, until a reset.
        vq.write_desc(2, TX_BUF, 100, flags, 0);
        vq.publish(2);
        dev.kick_rx();
        dev.kick_tx();
        assert_eq!(vq.used_idx(), 0);
        assert!(recv_all(&peer).is_empty());
    }
}

#[test]
fn a_corrupt_avail_index_needs_a_reset() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (rxq, txq) = setup.queues();
    let (backend, _peer) = socket_pair();
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    txq.set_avail_idx(1000);
    dev.kick_tx();
    assert!(dev.interrupt.needs_reset());
    assert_eq!(txq.used_idx(), 0);
}

#[test]
fn a_head_past_the_table_is_dropped_and_the_device_goes_on() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (rxq, mut txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    txq.publish(QUEUE_SIZE + 3);
    dev.kick_tx();
    assert_eq!(txq.used_idx(), 0, "it cannot be returned");
    assert_eq!(dev.counters().tx_malformed, 1);
    send(mem, &mut txq, TX_BUF, &frame(1, 60));
    dev.kick_tx();
    assert_eq!(txq.used_idx(), 1);
    assert_eq!(recv_all(&peer).len(), 1);
}

#[test]
fn a_reset_mid_traffic_stops_touching_memory() {
    let setup = Setup::new();
    let mem = &setup.mem;
    let (mut rxq, mut txq) = setup.queues();
    let (backend, peer) = socket_pair();
    let mut dev = Device::new(mem, &rxq, &txq, backend);
    offer(&mut rxq, 0);
    dev.kick_rx();
    peer.send(&datagram(&frame(1, 60))).unwrap();
    send(mem, &mut txq, TX_BUF, &frame(2, 60));
    // Reset (on a vCPU thread) while both directions have work pending.
    dev.net.lock().unwrap().reset();
    assert!(!dev.net.lock().unwrap().is_active());
    dev.kick_tx();
    dev.kick_rx();
    assert_eq!((rxq.used_idx(), txq.used_idx()), (0, 0));
    assert!(recv_all(&peer).is_empty());
    // Neither the queue eventfds nor the backend are watched any more.
    dev.tx_evt.write(1).unwrap();
    peer.send(&datagram(&frame(3, 60))).unwrap();
    assert_eq!(dev.events.poll(), 0);

    // The frames waited in the backend: a new activation gets them.
    let (mut rxq, txq) = setup.queues();
    offer(&mut rxq, 0);
    offer(&mut rxq, 1);
    let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
    dev.net
        .lock()
        .unwrap()
        .activate(
            mem.clone(),
            interrupt,
            vec![rxq.create_queue(), txq.create_queue()],
            vec![dev.rx_evt.clone(), dev.tx_evt.clone()],
            0,
        )
        .unwrap();
    dev.events.settle();
    assert_eq!(rxq.used_idx(), 2);
    assert_eq!(
        guest_bytes(mem, RX_BUF + 0x1000 + HEADER_LEN as u64, 60),
        frame(3, 60)
    );
}
