//! Register semantics and the status state machine, with a fake device.

use vm_memory::Address;

use super::*;
use crate::devices::virtio::test_utils::{
    TestQueue, activate, guest_memory, negotiate, read_reg, setup_queue, write_reg,
};
use crate::devices::virtio::{INTERRUPT_CONFIG, INTERRUPT_VRING};

const STATUS: u32 = reg::VIRTIO_MMIO_STATUS;
const MODERN: u64 = feature(VIRTIO_F_VERSION_1);
const FAKE_FEATURE: u64 = feature(3);

/// Records what the transport does to it.
#[derive(Default)]
struct FakeDevice {
    config: [u8; 8],
    generation: u32,
    activations: Vec<(Vec<Queue>, u64)>,
    queue_evts: Vec<Arc<EventFd>>,
    interrupt: Option<Arc<VirtioInterrupt>>,
    resets: usize,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        42
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }

    fn avail_features(&self) -> u64 {
        FAKE_FEATURE | feature(VIRTIO_RING_F_EVENT_IDX)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, byte) in data.iter_mut().enumerate() {
            if let Some(v) = self.config.get(offset as usize + i) {
                *byte = *v;
            }
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            if let Some(slot) = self.config.get_mut(offset as usize + i) {
                *slot = *byte;
            }
        }
    }

    fn config_generation(&self) -> u32 {
        self.generation
    }

    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<Arc<EventFd>>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        if let Some(index) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(index));
        }
        self.activations.push((queues, acked_features));
        self.queue_evts = queue_evts;
        self.interrupt = Some(interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        self.resets += 1;
        self.interrupt = None;
    }
}

struct Setup {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<FakeDevice>>,
    transport: MmioTransport,
}

fn setup() -> Setup {
    let mem = guest_memory(0x10000);
    let device = Arc::new(Mutex::new(FakeDevice::default()));
    let transport = MmioTransport::new(mem.clone(), device.clone()).unwrap();
    Setup {
        mem,
        device,
        transport,
    }
}

fn queues(mem: &GuestMemoryMmap) -> (TestQueue<'_>, TestQueue<'_>) {
    let q0 = TestQueue::new(mem, GuestAddress(0x1000), 16);
    let q1 = TestQueue::new(mem, GuestAddress(0x2000), 8);
    (q0, q1)
}

fn status(t: &mut MmioTransport) -> u32 {
    read_reg(t, STATUS)
}

#[test]
fn identifies_a_modern_device() {
    let Setup { mut transport, .. } = setup();
    let t = &mut transport;
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_DEVICE_ID), 42);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    assert_eq!(
        read_reg(t, reg::VIRTIO_MMIO_DEVICE_FEATURES),
        1 << 3 | 1 << 29
    );
    write_reg(t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        read_reg(t, reg::VIRTIO_MMIO_DEVICE_FEATURES),
        1,
        "VERSION_1"
    );
    write_reg(t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 0);
    for (select, max) in [(0, 16), (1, 8), (2, 0), (u32::MAX, 0)] {
        write_reg(t, reg::VIRTIO_MMIO_QUEUE_SEL, select);
        assert_eq!(read_reg(t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), max);
        assert_eq!(read_reg(t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    }
    assert_eq!(status(t), 0);
    assert_eq!(read_reg(t, 0x0fc - 4), 0, "unknown register reads 0");
}

#[test]
fn odd_sized_or_unaligned_register_accesses_are_ignored() {
    let Setup { mut transport, .. } = setup();
    let mut two = [0xffu8; 2];
    transport.read(0, &mut two);
    assert_eq!(two, [0, 0]);
    let mut unaligned = [0xffu8; 4];
    transport.read(1, &mut unaligned);
    assert_eq!(unaligned, [0; 4]);
    let mut eight = [0xffu8; 8];
    transport.read(0, &mut eight);
    assert_eq!(eight, [0; 8]);
    transport.write(u64::from(STATUS), &[1]);
    transport.write(u64::from(STATUS) + 1, &[1, 0, 0, 0]);
    assert_eq!(status(&mut transport), 0);
    // Past the window (the bus never routes these, but still no panic).
    transport.read(0x2000, &mut unaligned);
    transport.write(u64::MAX - 3, &[1, 2, 3, 4]);
}

#[test]
fn full_initialisation_activates_the_device() {
    let Setup {
        mem,
        device,
        mut transport,
    } = setup();
    let (q0, q1) = queues(&mem);
    let features = MODERN | FAKE_FEATURE | feature(VIRTIO_RING_F_EVENT_IDX);
    activate(&mut transport, features, &[&q0, &q1]);
    assert_eq!(status(&mut transport), 0xf);
    assert!(transport.is_activated());
    let device = device.lock().unwrap();
    assert_eq!(device.activations.len(), 1);
    let (queues, acked) = &device.activations[0];
    assert_eq!(*acked, features);
    assert_eq!(queues.len(), 2);
    assert_eq!(queues[0].size(), 16);
    assert_eq!(queues[0].desc_table(), q0.desc_table.raw_value());
    assert_eq!(queues[0].avail_ring(), q0.avail_ring.raw_value());
    assert_eq!(queues[0].used_ring(), q0.used_ring.raw_value());
    assert!(queues[1].event_idx_enabled());
    assert_eq!(device.queue_evts.len(), 2);
}

#[test]
fn illegal_status_transitions_need_a_reset() {
    let Setup {
        device,
        mut transport,
        ..
    } = setup();
    let t = &mut transport;
    // DRIVER before ACKNOWLEDGE.
    write_reg(t, STATUS, VIRTIO_CONFIG_S_DRIVER);
    assert_eq!(status(t), NEEDS_RESET);
    assert_eq!(
        read_reg(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_CONFIG
    );
    assert_eq!(t.interrupt().take_count(), 1);
    // Ignored until reset.
    write_reg(t, STATUS, ACKNOWLEDGE);
    assert_eq!(status(t), NEEDS_RESET);
    write_reg(t, STATUS, 0);
    assert_eq!(status(t), 0);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(device.lock().unwrap().resets, 1);

    // Skipping FEATURES_OK, or clearing a bit, is illegal too.
    for bad in [
        ACKNOWLEDGE | DRIVER | DRIVER_OK,
        ACKNOWLEDGE | FEATURES_OK,
        0x100,
    ] {
        write_reg(t, STATUS, 0);
        write_reg(t, STATUS, ACKNOWLEDGE);
        write_reg(t, STATUS, ACKNOWLEDGE | DRIVER);
        write_reg(t, STATUS, bad);
        assert_eq!(status(t) & NEEDS_RESET, NEEDS_RESET, "{bad:#x}");
    }
    write_reg(t, STATUS, 0);
    write_reg(t, STATUS, ACKNOWLEDGE);
    write_reg(t, STATUS, ACKNOWLEDGE | DRIVER);
    write_reg(t, STATUS, ACKNOWLEDGE);
    assert_eq!(status(t), ACKNOWLEDGE | DRIVER | NEEDS_RESET);
}

#[test]
fn rewriting_the_status_or_failing_is_harmless() {
    let Setup { mut transport, .. } = setup();
    let t = &mut transport;
    write_reg(t, STATUS, ACKNOWLEDGE);
    write_reg(t, STATUS, ACKNOWLEDGE);
    assert_eq!(status(t), ACKNOWLEDGE);
    write_reg(t, STATUS, ACKNOWLEDGE | FAILED);
    assert_eq!(status(t), ACKNOWLEDGE | FAILED);
    // After FAILED only a reset helps.
    write_reg(t, STATUS, ACKNOWLEDGE | FAILED | DRIVER);
    assert_eq!(status(t) & NEEDS_RESET, NEEDS_RESET);
    write_reg(t, STATUS, 0);
    assert_eq!(status(t), 0);
}

#[test]
fn features_must_be_offered_and_modern() {
    let Setup { mut transport, .. } = setup();
    let t = &mut transport;
    let accepted = ACKNOWLEDGE | DRIVER | FEATURES_OK;
    for (features, ok) in [
        (MODERN | FAKE_FEATURE, true),
        (MODERN, true),
        (FAKE_FEATURE, false),
        (MODERN | feature(4), false),
        (MODERN | feature(63), false),
    ] {
        negotiate(t, features);
        let want = if ok { accepted } else { ACKNOWLEDGE | DRIVER };
        assert_eq!(status(t), want, "{features:#x}");
    }
    // A bit beyond 64 is not offered either.
    negotiate(t, MODERN);
    write_reg(t, STATUS, 0);
    write_reg(t, STATUS, ACKNOWLEDGE);
    write_reg(t, STATUS, ACKNOWLEDGE | DRIVER);
    write_reg(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write_reg(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    write_reg(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
    write_reg(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    write_reg(t, STATUS, accepted);
    assert_eq!(status(t), ACKNOWLEDGE | DRIVER);
}

#[test]
fn features_are_writable_only_between_driver_and_features_ok() {
    let Setup {
        mem,
        device,
        mut transport,
    } = setup();
    let (q0, q1) = queues(&mem);
    let t = &mut transport;
    // Before DRIVER: ignored.
    write_reg(t, STATUS, ACKNOWLEDGE);
    write_reg(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write_reg(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, FAKE_FEATURE as u32);
    write_reg(t, STATUS, ACKNOWLEDGE | DRIVER);
    write_reg(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write_reg(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, (MODERN >> 32) as u32);
    write_reg(t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    // After FEATURES_OK: ignored.
    write_reg(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write_reg(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, FAKE_FEATURE as u32);
    setup_queue(t, 0, &q0);
    setup_queue(t, 1, &q1);
    let current = status(t);
    write_reg(t, STATUS, current | DRIVER_OK);
    assert_eq!(device.lock().unwrap().activations[0].1, MODERN);
}

#[test]
fn invalid_queues_stay_not_ready() {
    let Setup {
        mem, mut transport, ..
    } = setup();
    let (q0, _) = queues(&mem);
    let t = &mut transport;
    let ready = |t: &mut MmioTransport| read_reg(t, reg::VIRTIO_MMIO_QUEUE_READY);
    let cases: [(&str, u32, u32); 6] = [
        ("not a power of two", reg::VIRTIO_MMIO_QUEUE_NUM, 12),
        ("above the maximum", reg::VIRTIO_MMIO_QUEUE_NUM, 32),
        ("zero", reg::VIRTIO_MMIO_QUEUE_NUM, 0),
        ("too wide", reg::VIRTIO_MMIO_QUEUE_NUM, 0x1_0000),
        (
            "misaligned descriptors",
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW,
            0x1008,
        ),
        (
            "used ring outside RAM",
            reg::VIRTIO_MMIO_QUEUE_USED_LOW,
            0xffff_fff0,
        ),
    ];
    for (what, register, value) in cases {
        negotiate(t, MODERN);
        setup_queue(t, 0, &q0);
        assert_eq!(ready(t), 1);
        write_reg(t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(ready(t), 0);
        write_reg(t, register, value);
        write_reg(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(ready(t), 0, "{what}");
    }
}

#[test]
fn used_rings_may_not_overlap_other_rings() {
    let Setup {
        mem, mut transport, ..
    } = setup();
    let (q0, q1) = queues(&mem);
    let t = &mut transport;
    let ready = |t: &mut MmioTransport| read_reg(t, reg::VIRTIO_MMIO_QUEUE_READY);
    // Used ring over the queue's own available ring.
    negotiate(t, MODERN);
    setup_queue(t, 0, &q0);
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
    write_reg(
        t,
        reg::VIRTIO_MMIO_QUEUE_USED_LOW,
        q0.avail_ring.raw_value() as u32 + 4,
    );
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(ready(t), 0);
    // Queue 1's used ring over queue 0's descriptors, and the reverse.
    let inside_used_ring = GuestAddress((q0.used_ring.raw_value() + 8) & !15);
    for (desc, used) in [
        (q1.desc_table, q0.desc_table),
        (inside_used_ring, q1.used_ring),
    ] {
        negotiate(t, MODERN);
        setup_queue(t, 0, &q0);
        write_reg(t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
        write_reg(t, reg::VIRTIO_MMIO_QUEUE_NUM, 8);
        write_reg(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, desc.raw_value() as u32);
        write_reg(
            t,
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            q1.avail_ring.raw_value() as u32,
        );
        write_reg(t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, used.raw_value() as u32);
        write_reg(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(ready(t), 0, "desc {desc:?} used {used:?}");
    }
    // Descriptor tables may share memory with an available ring: only the
    // driver writes those.
    negotiate(t, MODERN);
    setup_queue(t, 0, &q0);
    setup_queue(t, 1, &q1);
    assert_eq!(ready(t), 1);
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(ready(t), 1, "setting ready twice keeps the queue");
}

#[test]
fn activation_failure_needs_a_reset() {
    let Setup {
        mem,
        device,
        mut transport,
    } = setup();
    let (q0, _) = queues(&mem);
    let t = &mut transport;
    negotiate(t, MODERN);
    setup_queue(t, 0, &q0);
    // Queue 1 has a bad size, stays not ready; the device refuses.
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_NUM, 3);
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    write_reg(t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(status(t) & NEEDS_RESET, NEEDS_RESET);
    assert!(!t.is_activated());
    assert_eq!(
        read_reg(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_CONFIG
    );
    assert!(device.lock().unwrap().activations.is_empty());
    // Notifications are ignored.
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert!(t.queue_evts[0].read().is_err());
}

#[test]
fn queue_registers_are_locked_outside_setup() {
    let Setup {
        mem, mut transport, ..
    } = setup();
    let (q0, q1) = queues(&mem);
    let t = &mut transport;
    // Before FEATURES_OK.
    write_reg(t, STATUS, ACKNOWLEDGE);
    setup_queue(t, 0, &q0);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    // After DRIVER_OK.
    activate(t, MODERN, &[&q0, &q1]);
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_NUM, 2);
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_QUEUE_NUM), 16);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
    // A ready queue cannot be moved.
    negotiate(t, MODERN);
    setup_queue(t, 0, &q0);
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x4000);
    assert_eq!(
        read_reg(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW),
        q0.desc_table.raw_value() as u32
    );
}

#[test]
fn notifications_count_only_after_driver_ok() {
    let Setup {
        mem,
        device,
        mut transport,
    } = setup();
    let (q0, q1) = queues(&mem);
    let t = &mut transport;
    negotiate(t, MODERN);
    setup_queue(t, 0, &q0);
    setup_queue(t, 1, &q1);
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    // A notification through an ioeventfd before DRIVER_OK is dropped too.
    t.ioeventfds()[1].2.write(1).unwrap();
    write_reg(t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    let device = device.lock().unwrap();
    assert!(device.queue_evts[0].read().is_err(), "no early notify");
    assert!(device.queue_evts[1].read().is_err(), "no early notify");
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    assert!(device.queue_evts[0].read().is_err());
    assert_eq!(device.queue_evts[1].read().unwrap(), 1);
}

#[test]
fn ioeventfds_name_the_notify_register_and_queue() {
    let Setup { transport, .. } = setup();
    let fds = transport.ioeventfds();
    assert_eq!(fds.len(), 2);
    assert_eq!((fds[0].0, fds[0].1), (0x50, 0));
    assert_eq!((fds[1].0, fds[1].1), (0x50, 1));
}

#[test]
fn interrupts_are_read_and_acknowledged() {
    let Setup {
        mem,
        device,
        mut transport,
    } = setup();
    let (q0, q1) = queues(&mem);
    activate(&mut transport, MODERN, &[&q0, &q1]);
    let interrupt = device.lock().unwrap().interrupt.clone().unwrap();
    interrupt.signal_used_queue().unwrap();
    let t = &mut transport;
    assert_eq!(
        read_reg(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_VRING
    );
    assert_eq!(t.interrupt().take_count(), 1);
    t.signal_config_change().unwrap();
    assert_eq!(
        read_reg(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_VRING | INTERRUPT_CONFIG
    );
    write_reg(t, reg::VIRTIO_MMIO_INTERRUPT_ACK, INTERRUPT_VRING);
    assert_eq!(
        read_reg(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        INTERRUPT_CONFIG
    );
    write_reg(t, reg::VIRTIO_MMIO_INTERRUPT_ACK, u32::MAX);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn config_change_interrupts_wait_for_driver_ok() {
    let Setup { mut transport, .. } = setup();
    transport.signal_config_change().unwrap();
    assert_eq!(
        read_reg(&mut transport, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        0
    );
    assert_eq!(transport.interrupt().take_count(), 0);
}

#[test]
fn reset_returns_every_register_to_its_initial_value() {
    let Setup {
        mem,
        device,
        mut transport,
    } = setup();
    let (q0, q1) = queues(&mem);
    let t = &mut transport;
    activate(t, MODERN | FAKE_FEATURE, &[&q0, &q1]);
    t.interrupt().signal_used_queue().unwrap();
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
    write_reg(t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let resets = device.lock().unwrap().resets;
    write_reg(t, STATUS, 0);
    assert_eq!(status(t), 0);
    assert!(!t.is_activated());
    assert_eq!(device.lock().unwrap().resets, resets + 1);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(
        read_reg(t, reg::VIRTIO_MMIO_DEVICE_FEATURES),
        1 << 3 | 1 << 29
    );
    for queue in 0..2 {
        write_reg(t, reg::VIRTIO_MMIO_QUEUE_SEL, queue);
        assert_eq!(read_reg(t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(read_reg(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW), 0);
    }
    // Notifications stop counting; a second initialisation works.
    write_reg(t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert!(t.queue_evts[0].read().is_err());
    activate(t, MODERN, &[&q0, &q1]);
    assert_eq!(status(t), 0xf);
    assert_eq!(device.lock().unwrap().activations.len(), 2);
}

#[test]
fn config_space_goes_to_the_device() {
    let Setup {
        device,
        mut transport,
        ..
    } = setup();
    device.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8];
    device.lock().unwrap().generation = 7;
    let t = &mut transport;
    assert_eq!(read_reg(t, 0x100), 0x0403_0201);
    let mut byte = [0u8; 1];
    t.read(0x105, &mut byte);
    assert_eq!(byte, [6]);
    let mut past = [0xffu8; 4];
    t.read(0xffc, &mut past);
    assert_eq!(past, [0; 4]);
    assert_eq!(read_reg(t, reg::VIRTIO_MMIO_CONFIG_GENERATION), 7);
    // Writable once the driver is loaded.
    t.write(0x100, &[9]);
    assert_eq!(device.lock().unwrap().config[0], 1);
    write_reg(t, STATUS, ACKNOWLEDGE);
    write_reg(t, STATUS, ACKNOWLEDGE | DRIVER);
    t.write(0x100, &[9]);
    assert_eq!(device.lock().unwrap().config[0], 9);
}

#[test]
fn bad_queue_maximum_is_refused() {
    struct Odd;
    impl VirtioDevice for Odd {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[3]
        }
        fn avail_features(&self) -> u64 {
            0
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            _: Arc<VirtioInterrupt>,
            _: Vec<Queue>,
            _: Vec<Arc<EventFd>>,
            _: u64,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
    }
    let mem = guest_memory(0x1000);
    let result = MmioTransport::new(mem, Arc::new(Mutex::new(Odd)));
    assert!(matches!(
        result,
        Err(Error::QueueMaxSize {
            index: 0,
            max_size: 3
        })
    ));
}
