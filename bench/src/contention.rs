//! Disk and vsock at once (issue 18): does one device's traffic slow the
//! other's? One frakti-vmm guest with a read-only disk and a vsock device,
//! in one boot: the disk read alone (`dd bs=1M`, timed by the guest), a
//! host → guest vsock stream alone (timed by the host), then both at once —
//! the host streams while the guest reads the disk, and the stream's rate
//! is taken over exactly the time the read ran (the guest prints when it
//! starts and ends; the host notes when it sees those lines). Prints each
//! rate alone and together, and together/alone (goal: at least 0.8 each).
//! The guest has two vCPUs and L1 two CPUs (`FRAKTI_LAB_CPUS`), so the
//! reader and the sink do not simply take turns on one CPU.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use frakti_bench::{Entered, VmBench, frakti_command, median};
use frakti_lab::guest;
use frakti_lab::process::{ChildGuard, FileTail, read_log};
use frakti_lab::runner::CPUS_ENV;
use frakti_lab::vsock::hybrid_connect;

/// Disk and vsock throughput, each alone and both at once (ratios).
#[derive(Debug, Parser)]
struct Args {
    /// Boots, each measuring all four figures (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Disk size in MiB (read whole, alone and again with the stream).
    #[arg(long, default_value_t = 512)]
    disk: u64,
    /// MiB of the stream measured alone.
    #[arg(long, default_value_t = 128)]
    stream: u64,
}

const TOOL: &str = "/bin/frakti-guest-tool";
const SOLO_PORT: u32 = 5201;
const BUSY_PORT: u32 = 5202;
const CHUNK: usize = 256 * 1024;
/// The goal: each keeps at least this share of its rate alone.
const GOAL: f64 = 0.8;

/// The guest: read the disk alone; take the solo stream; then read the
/// disk again while the busy stream (a sink in the background) runs.
fn guest_script() -> String {
    let timed_read = r#"start=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null
end=$(cut -d' ' -f1 /proc/uptime)
secs=$(echo "$start $end" | awk '{print $2 - $1}')"#;
    format!(
        "{timed_read}\necho \"@@ disk-alone $secs\"\n\
         {TOOL} vsock-sink {SOLO_PORT} 1\n\
         {TOOL} vsock-sink {BUSY_PORT} 1 &\n\
         sleep 2\n\
         echo \"@@ disk-busy-start\"\n\
         {timed_read}\necho \"@@ disk-busy $secs\"\n\
         sleep 1000\n"
    )
}

/// One boot's figures, MiB/s.
#[derive(Debug, Default)]
struct Figures {
    disk_alone: f64,
    disk_busy: f64,
    stream_alone: f64,
    stream_busy: f64,
}

fn main() -> ExitCode {
    frakti_bench::exit(run(&Args::parse()))
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    ensure!(
        args.runs >= 1 && args.disk >= 1 && args.stream >= 1,
        "sizes and runs must be at least 1"
    );
    if std::env::var_os(CPUS_ENV).is_none() {
        // Two L1 CPUs: with one, the guest's vCPUs, the VMM's device
        // threads and the host's streamer all take turns on it, and the
        // figures measure that, not the devices.
        // SAFETY: no other thread runs yet.
        unsafe { std::env::set_var(CPUS_ENV, "2") };
    }
    let VmBench { guest, vmm, tool } = match VmBench::enter()? {
        Entered::Here(bench) => bench,
        Entered::RanInLab(code) => return Ok(code),
    };
    let dir = tempfile::tempdir()?;
    let initrd = dir.path().join("contention-initrd.cpio");
    guest::build_script_initrd_with(&guest_script(), &[(TOOL, &tool)], &initrd)?;
    let disk = frakti_bench::written_disk(dir.path(), args.disk)?;

    let mut all = Vec::new();
    for i in 0..args.runs {
        let console = dir.path().join(format!("console-{i}.log"));
        let uds = dir.path().join(format!("vsock-{i}.sock"));
        let mut command = frakti_command(&vmm, &guest.kernel, &initrd, &console);
        // One guest vCPU for the reader, one for the sink.
        command
            .args(["--vcpus", "2"])
            .arg("--disk")
            .arg(format!("serial=bench,path={},ro", disk.display()))
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", uds.display()));
        // A boot that fails shows why: the guest's console and the VMM's log.
        let figures = measure_boot(&mut command, &console, &uds, args).with_context(|| {
            format!(
                "boot {i}; console:\n{}\nvmm log:\n{}",
                read_log(&console),
                read_log(&console.with_extension("vmm.log"))
            )
        })?;
        eprintln!("bench: boot {i}: {figures:?}");
        all.push(figures);
    }
    let med = |f: fn(&Figures) -> f64| median(&mut all.iter().map(f).collect::<Vec<_>>());
    let (disk_alone, disk_busy) = (med(|f| f.disk_alone), med(|f| f.disk_busy));
    let (stream_alone, stream_busy) = (med(|f| f.stream_alone), med(|f| f.stream_busy));
    println!(
        "frakti-vmm, one guest: {} MiB disk read (dd bs=1M) and a host -> guest vsock stream, \
         each alone and both at once; medians of {} boots, MiB/s",
        args.disk, args.runs
    );
    for (what, alone, busy) in [
        ("disk read", disk_alone, disk_busy),
        ("vsock stream", stream_alone, stream_busy),
    ] {
        let ratio = busy / alone;
        println!(
            "  {what:<14} alone {alone:8.1}  with the other {busy:8.1}  ratio {ratio:.2}x ({})",
            if ratio >= GOAL {
                "meets the goal of >= 0.8"
            } else {
                "BELOW the goal of 0.8"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Boots, measures the four figures, kills the VMM.
fn measure_boot(
    command: &mut Command,
    console: &Path,
    uds: &Path,
    args: &Args,
) -> anyhow::Result<Figures> {
    let log = console.with_extension("vmm.log");
    let vmm_log = std::fs::File::create(&log)?;
    command
        .stdin(Stdio::null())
        .stdout(vmm_log.try_clone()?)
        .stderr(vmm_log);
    let mut vmm = ChildGuard::spawn(command).context("starting the VMM")?;
    let mut tail = FileTail::new(console);
    let mut wait_for = |prefix: &str, vmm: &mut ChildGuard| -> anyhow::Result<(String, Instant)> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Some(line) = tail
                .new_lines()?
                .into_iter()
                .find(|l| l.starts_with(prefix))
            {
                return Ok((line, Instant::now()));
            }
            if let Some(status) = vmm.try_wait()? {
                bail!(
                    "the VMM exited ({status}) before {prefix:?}:\n{}\n{}",
                    read_log(console),
                    read_log(&log)
                );
            }
            ensure!(
                Instant::now() < deadline,
                "no {prefix:?} within 600 s:\n{}",
                read_log(console)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let disk_mib = args.disk as f64;
    let secs = |line: &str| -> anyhow::Result<f64> {
        line.split_whitespace()
            .nth(2)
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .with_context(|| format!("no time in {line:?}"))
    };
    let (line, _) = wait_for("@@ disk-alone", &mut vmm)?;
    let disk_alone = disk_mib / secs(&line)?;

    wait_for(&format!("@@ vsock sink listening on {SOLO_PORT}"), &mut vmm)?;
    let mut stream = hybrid_connect(uds, SOLO_PORT).context("connecting the solo stream")?;
    let chunk = vec![0x5au8; CHUNK];
    let started = Instant::now();
    for _ in 0..(args.stream << 20) / CHUNK as u64 {
        stream.write_all(&chunk)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer)?;
    let stream_alone = args.stream as f64 / started.elapsed().as_secs_f64();

    wait_for(&format!("@@ vsock sink listening on {BUSY_PORT}"), &mut vmm)?;
    let busy = hybrid_connect(uds, BUSY_PORT).context("connecting the busy stream")?;
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let streamer = {
        let (sent, stop) = (sent.clone(), stop.clone());
        std::thread::spawn(move || stream_until(busy, &sent, &stop))
    };
    let (_, read_started) = wait_for("@@ disk-busy-start", &mut vmm)?;
    let bytes_at_start = sent.load(Ordering::Relaxed);
    let (line, read_ended) = wait_for("@@ disk-busy ", &mut vmm)?;
    let bytes_at_end = sent.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let _ = vmm.kill();
    let _ = streamer.join();
    let disk_busy = disk_mib / secs(&line)?;
    let window = read_ended.duration_since(read_started).as_secs_f64();
    ensure!(
        bytes_at_end > bytes_at_start,
        "the stream stalled while the disk was read"
    );
    let stream_busy = (bytes_at_end - bytes_at_start) as f64 / (1024.0 * 1024.0) / window.max(1e-3);
    Ok(Figures {
        disk_alone,
        disk_busy,
        stream_alone,
        stream_busy,
    })
}

/// Streams to the guest until told to stop (or the guest goes), counting.
fn stream_until(mut stream: UnixStream, sent: &AtomicU64, stop: &AtomicBool) {
    let chunk = vec![0xa5u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if stream.write_all(&chunk).is_err() {
            return;
        }
        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
}
