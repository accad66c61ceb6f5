//! Config-space reads while the disk is busy (issue 18): a vCPU that reads
//! a virtio-blk device's config space (the capacity, the config generation
//! around it) locks the device; it must not wait for the disk I/O the
//! device thread does. In process, with frakti-vmm's own device: a
//! "vCPU" thread reads the capacity as the MMIO transport does, every
//! 100 µs, once with the disk idle and once while the device thread serves
//! rounds of 64 reads of 12 MiB from a 2 GiB sparse file (page-cache
//! speed: the heaviest load a device thread can make). Prints the read
//! latencies (p50, p99, max) idle and busy, busy/idle, and the longest
//! busy read against one round of I/O: a device that held its lock during
//! the I/O (as frakti-vmm's did before) makes a reader wait up to a whole
//! round, about 1x; ours should be near 0.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use event_manager::{EventManager, SubscriberOps};
use frakti_vmm::devices::bus::lock;
use frakti_vmm::devices::virtio::block::{Block, BlockQueue};
use frakti_vmm::devices::virtio::{VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Config-space read latency, idle and during heavy disk I/O.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds of each phase (idle, busy).
    #[arg(long, default_value_t = 3)]
    seconds: u64,
}

const QUEUE_SIZE: u16 = 256;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const HEADER: u64 = 0x3000;
const STATUS: u64 = 0x4000;
const DATA: u64 = 0x10_0000;
const REQUESTS: u16 = 64;
const LEN: u32 = 12 << 20;
const DISK_BYTES: u64 = 2 << 30;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

fn main() -> ExitCode {
    frakti_bench::exit(run(Args::parse()))
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)])?;
    write_requests(&mem)?;
    let disk = tempfile::NamedTempFile::new()?;
    disk.as_file().set_len(DISK_BYTES)?;
    let block = Arc::new(Mutex::new(Block::with_backing("bench", disk.path(), true)?));
    let handler: Arc<Mutex<BlockQueue>> = lock(&block).queue_handler();
    let mut events = EventManager::<Arc<Mutex<BlockQueue>>>::new()?;
    events.add_subscriber(handler);
    let notify = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    lock(&block).activate(
        mem.clone(),
        Arc::new(VirtioInterrupt::new()?),
        vec![queue()],
        vec![notify.clone()],
        0,
    )?;
    events.run_with_timeout(0)?;

    let phase = Duration::from_secs(args.seconds);
    let idle = sample(&block, phase);
    let busy_flag = Arc::new(AtomicBool::new(true));
    let device_thread = {
        let (busy, mem, notify) = (busy_flag.clone(), mem.clone(), notify.clone());
        std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
            let mut rounds = Vec::new();
            while busy.load(Ordering::Acquire) {
                let started = Instant::now();
                offer_round(&mem, rounds.len() as u64)?;
                notify.write(1)?;
                // The handler yields after each batch of 64 and rings again.
                while events.run_with_timeout(0)? > 0 {}
                rounds.push(started.elapsed());
            }
            Ok(rounds)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let busy = sample(&block, phase);
    busy_flag.store(false, Ordering::Release);
    let mut rounds = device_thread
        .join()
        .map_err(|_| anyhow::anyhow!("device thread panicked"))??;
    let read = lock(&block).counters().read_bytes;
    ensure!(
        !rounds.is_empty() && read >= u64::from(LEN) * u64::from(REQUESTS),
        "the disk was not busy"
    );
    rounds.sort();
    let round = percentile(&rounds, 50);
    let gib = read as f64 / f64::from(1u32 << 30);
    println!(
        "config_latency: {gib:.1} GiB read by the device thread in {} rounds of {REQUESTS} x 12 MiB (median round {round:?})",
        rounds.len()
    );
    for (name, mut lat) in [("idle", idle.clone()), ("busy", busy.clone())] {
        lat.sort();
        println!(
            "config_latency: {name}: {} reads, p50 {:?}, p99 {:?}, max {:?}",
            lat.len(),
            percentile(&lat, 50),
            percentile(&lat, 99),
            lat.last().copied().unwrap_or_default()
        );
    }
    let (mut idle, mut busy) = (idle, busy);
    idle.sort();
    busy.sort();
    let ratio =
        |p| percentile(&busy, p).as_secs_f64() / percentile(&idle, p).as_secs_f64().max(1e-9);
    println!(
        "config_latency: busy/idle p50 {:.2}x, p99 {:.2}x; longest busy read / one round of I/O {:.4}x (a lock held over the I/O: ~1x)",
        ratio(50),
        ratio(99),
        busy.last().copied().unwrap_or_default().as_secs_f64() / round.as_secs_f64().max(1e-9)
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads the capacity as a vCPU's MMIO exit does, every 100 µs.
fn sample(block: &Mutex<Block>, phase: Duration) -> Vec<Duration> {
    let end = Instant::now() + phase;
    let mut latencies = Vec::new();
    while Instant::now() < end {
        let asked = Instant::now();
        let mut capacity = [0u8; 8];
        lock(block).read_config(0, &mut capacity);
        latencies.push(asked.elapsed());
        std::thread::sleep(Duration::from_micros(100));
    }
    latencies
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() - 1) * p / 100]
}

fn queue() -> Queue {
    let mut queue = Queue::new(QUEUE_SIZE).expect("a valid queue size");
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    queue
}

/// 64 requests (header, 12 MiB of data, status) as descriptors 3n..3n+2,
/// all reading sector 0 into the same buffer.
fn write_requests(mem: &GuestMemoryMmap) -> anyhow::Result<()> {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&0u32.to_le_bytes()); // VIRTIO_BLK_T_IN
    mem.write_slice(&header, GuestAddress(HEADER))?;
    for n in 0..REQUESTS {
        let first = 3 * n;
        let parts = [
            (HEADER, 16, VIRTQ_DESC_F_NEXT),
            (DATA, LEN, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE),
            (STATUS, 1, VIRTQ_DESC_F_WRITE),
        ];
        for (i, (addr, len, flags)) in parts.into_iter().enumerate() {
            let index = first + i as u16;
            let mut desc = [0u8; 16];
            desc[..8].copy_from_slice(&addr.to_le_bytes());
            desc[8..12].copy_from_slice(&len.to_le_bytes());
            desc[12..14].copy_from_slice(&flags.to_le_bytes());
            desc[14..16].copy_from_slice(&(index + 1).to_le_bytes());
            mem.write_slice(&desc, GuestAddress(DESC_TABLE + u64::from(index) * 16))
                .context("descriptor table")?;
        }
    }
    Ok(())
}

/// Puts the 64 requests on the available ring once more.
fn offer_round(mem: &GuestMemoryMmap, round: u64) -> anyhow::Result<()> {
    let base = (round * u64::from(REQUESTS)) as u16;
    for n in 0..REQUESTS {
        let slot = base.wrapping_add(n) % QUEUE_SIZE;
        let at = AVAIL_RING + 4 + u64::from(slot) * 2;
        mem.write_obj(3 * n, GuestAddress(at))?;
    }
    let idx = base.wrapping_add(REQUESTS);
    mem.write_obj(idx, GuestAddress(AVAIL_RING + 2))?;
    Ok(())
}
