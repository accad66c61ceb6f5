//! Disk benchmark: sequential read of a 256 MiB virtio-blk disk inside the
//! guest, then 4 KiB random reads at queue depth 32 (`frakti-guest-tool
//! blockio`, O_DIRECT on /dev/vda, 32 threads), frakti-vmm against
//! `qemu-system-x86_64 -M microvm` (virtio-mmio block device, `aio=io_uring`),
//! same kernel and test guest, alternating, in one run (inside the lab where
//! the host needs it). Prints MiB/s, IOPS and the ratios.

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::Parser;
use frakti_bench::{
    Entered, VmBench, alternate_medians, boot_until_line, frakti_command, median, qemu_command,
};
use frakti_lab::guest;

/// Sequential disk read in the guest: frakti-vmm vs QEMU microvm (ratio).
#[derive(Debug, Parser)]
struct Args {
    /// Reads with each VMM, alternating.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Disk size in MiB.
    #[arg(long, default_value_t = 256)]
    size: u64,
}

const TOOL: &str = "/bin/frakti-guest-tool";
/// 4 KiB random reads per measurement, and how many are in flight.
const RANDOM_READS: u64 = 8192;
const DEPTH: u64 = 32;

/// Reads the whole disk with 1 MiB requests, then [`RANDOM_READS`] random
/// 4 KiB blocks [`DEPTH`] at a time, timed by the guest itself; one line.
fn guest_script() -> String {
    let bytes = RANDOM_READS * 4096;
    format!(
        r#"
start=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null
end=$(cut -d' ' -f1 /proc/uptime)
random=$({TOOL} blockio /dev/vda rand-read 4096 {bytes} {DEPTH})
echo "@@ read_seconds $(echo "$start $end" | awk '{{print $2 - $1}}') bytes $(($(cat /sys/block/vda/size) * 512)) $random"
"#
    )
}

fn main() -> ExitCode {
    frakti_bench::exit(run(&Args::parse()))
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let VmBench { guest, vmm, tool } = match VmBench::enter()? {
        Entered::Here(bench) => bench,
        Entered::RanInLab(code) => return Ok(code),
    };
    let dir = tempfile::tempdir()?;
    let initrd = dir.path().join("read-initrd.cpio");
    guest::build_script_initrd_with(&guest_script(), &[(TOOL, &tool)], &initrd)?;
    let disk = frakti_bench::written_disk(dir.path(), args.size)?;

    // IOPS per VMM (frakti-vmm, QEMU), beside the MiB/s the medians take.
    let (mut our_iops, mut qemu_iops) = (Vec::new(), Vec::new());
    let (ours, qemu) = alternate_medians(args.runs, |i, frakti| {
        let console = dir.path().join(format!("console-{i}-{frakti}.log"));
        let mut command = if frakti {
            let mut c = frakti_command(&vmm, &guest.kernel, &initrd, &console);
            c.arg("--disk")
                .arg(format!("serial=bench,path={},ro", disk.display()));
            c
        } else {
            let mut c = qemu_command(&guest.kernel, &initrd, &console);
            c.arg("-drive")
                .arg(format!(
                    "file={},if=none,id=d0,format=raw,readonly=on,cache=writeback,aio=io_uring",
                    disk.display()
                ))
                .args(["-device", "virtio-blk-device,drive=d0"]);
            c
        };
        let (mib_s, iops) = read_once(&mut command, &console, args.size)?;
        if frakti {
            &mut our_iops
        } else {
            &mut qemu_iops
        }
        .push(iops);
        Ok(mib_s)
    })?;
    let (our_iops, qemu_iops) = (median(&mut our_iops), median(&mut qemu_iops));
    println!(
        "sequential read of a {} MiB virtio-blk disk in the guest (dd bs=1M), median of {}:",
        args.size, args.runs
    );
    println!("  frakti-vmm       {ours:8.1} MiB/s");
    println!("  qemu -M microvm  {qemu:8.1} MiB/s");
    println!("ratio frakti/qemu: {:.2}x (target >= 1.0x)", ours / qemu);
    println!(
        "4 KiB random reads of the disk, {DEPTH} in flight (O_DIRECT, {DEPTH} threads), {RANDOM_READS} reads, median of {}:",
        args.runs
    );
    println!("  frakti-vmm                    {our_iops:8.0} IOPS");
    println!("  qemu -M microvm, aio=io_uring {qemu_iops:8.0} IOPS");
    println!("ratio frakti/qemu: {:.2}x", our_iops / qemu_iops);
    Ok(ExitCode::SUCCESS)
}

/// Boots, waits for the guest's result line; (sequential MiB/s, random
/// read IOPS).
fn read_once(command: &mut Command, console: &Path, size_mib: u64) -> anyhow::Result<(f64, f64)> {
    let line = boot_until_line(command, console, "@@ read_seconds")?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let seconds: f64 = fields
        .get(2)
        .and_then(|s| s.parse().ok())
        .context("no seconds")?;
    let bytes: u64 = fields
        .get(4)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no size in {line:?}"))?;
    if bytes != size_mib << 20 {
        bail!("guest saw {bytes} bytes, not {} MiB", size_mib);
    }
    let report: serde_json::Value = line
        .find('{')
        .and_then(|at| serde_json::from_str(&line[at..]).ok())
        .with_context(|| format!("no blockio report in {line:?}"))?;
    let (ops, secs) = (report["ops"].as_u64(), report["secs"].as_f64());
    let iops = match (ops, secs) {
        (Some(ops), Some(secs)) if ops == RANDOM_READS && secs > 0.0 => ops as f64 / secs,
        _ => bail!("implausible blockio report {report}"),
    };
    Ok((size_mib as f64 / seconds.max(1e-3), iops))
}
