//! Boot benchmark: frakti-vmm against `qemu-system-x86_64 -M microvm`, same
//! kernel, initrd, vCPUs, memory and command line, serial console only,
//! alternating, in one run (inside the lab where the host needs it).
//!
//! Measures, per boot: time from spawning the VMM to the agent's ready line
//! on the console, and the VMM's own memory: the `Rss` of every mapping in
//! `/proc/PID/smaps` except guest RAM. Prints medians, p90s and ratios.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use frakti_lab::guest::{self, GuestAssets};
use frakti_vmm::metrics::sum_rss;

/// Boot time and memory: frakti-vmm vs QEMU microvm (ratios).
#[derive(Debug, Parser)]
struct Args {
    /// Boots of each VMM, alternating.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// What both VMMs pass to the kernel after their base command line.
const EXTRA_CMDLINE: &str = "quiet frakti_after_ready=wait";

fn main() -> ExitCode {
    frakti_bench::exit(run(&Args::parse()))
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let guest = GuestAssets::locate()?;
    let vmm = guest::vmm_binary()?;
    if let Some(code) = frakti_bench::here_or_in_lab(&[(guest::VMM_ENV, vmm.clone())])? {
        return Ok(code);
    }
    let mut frakti = Samples::default();
    let mut qemu = Samples::default();
    for i in 0..args.runs {
        // Alternate which goes first so drift hurts both alike.
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for ours in order {
            let boot = if ours {
                boot_once(&frakti_command(&vmm, &guest, args), args)?
            } else {
                boot_once(&qemu_command(&guest, args), args)?
            };
            let samples = if ours { &mut frakti } else { &mut qemu };
            samples.secs.push(boot.secs);
            samples.uptime.push(boot.uptime);
            samples.rss_kib.push(boot.rss_kib);
            if let Some(setup) = boot.setup {
                samples.setup.push(setup);
                samples.without_setup.push(boot.secs - setup);
            }
        }
    }
    report(args, &frakti, &qemu);
    Ok(ExitCode::SUCCESS)
}

#[derive(Default)]
struct Samples {
    secs: Vec<f64>,
    /// The guest kernel's uptime in the ready line: the rest of `secs` is
    /// the VMM's own start and any firmware.
    uptime: Vec<f64>,
    rss_kib: Vec<f64>,
    /// frakti-vmm only: its own setup, from its start to the vCPUs running,
    /// and the rest of the same boot's time to ready.
    setup: Vec<f64>,
    without_setup: Vec<f64>,
}

/// What one boot measured.
struct Boot {
    secs: f64,
    uptime: f64,
    rss_kib: f64,
    setup: Option<f64>,
}

/// Builds the command for a console file chosen by [`boot_once`].
type CommandFor = Box<dyn Fn(&Path) -> Command>;

fn frakti_command(vmm: &Path, guest: &GuestAssets, args: &Args) -> CommandFor {
    let (vmm, guest, cpus, memory) = (vmm.to_path_buf(), guest.clone(), args.cpus, args.memory);
    Box::new(move |console| {
        let mut c = Command::new(&vmm);
        c.arg("--kernel")
            .arg(&guest.kernel)
            .arg("--initrd")
            .arg(&guest.initrd)
            .args([
                "--vcpus",
                &cpus.to_string(),
                "--memory",
                &memory.to_string(),
            ])
            .args(["--cmdline", EXTRA_CMDLINE])
            // Its "guest started" line says how long its own setup took.
            .args(["--log", "info"])
            .arg("--serial")
            .arg(console);
        c
    })
}

fn qemu_command(guest: &GuestAssets, args: &Args) -> CommandFor {
    let (guest, cpus, memory) = (guest.clone(), args.cpus, args.memory);
    // Same kernel parameters as frakti-vmm's base line (see BASE_CMDLINE).
    let cmdline = format!(
        "{} {EXTRA_CMDLINE}",
        frakti_vmm::config::BASE_CMDLINE.replace("reboot=k", "reboot=t")
    );
    Box::new(move |console| guest::qemu_microvm_command(&guest, cpus, memory, &cmdline, console))
}

/// One boot: seconds to the ready line, the guest's uptime then, the VMM's
/// RSS outside guest RAM, and frakti-vmm's setup time if its log says it.
fn boot_once(command_for: &CommandFor, args: &Args) -> anyhow::Result<Boot> {
    let dir = tempfile::tempdir()?;
    let console = dir.path().join("console.log");
    let mut command = command_for(&console);
    let log = dir.path().join("vmm.log");
    let mut booted = guest::boot_until_ready(&mut command, &console, &log, BOOT_TIMEOUT)?;
    if booted.ready.cpus != args.cpus {
        bail!("guest saw {} vCPUs, not {}", booted.ready.cpus, args.cpus);
    }
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", booted.process.id()))
        .context("reading the VMM's smaps")?;
    booted.process.kill()?;
    let guest_ram_kib = u64::from(args.memory) * 1024;
    Ok(Boot {
        secs: booted.time_to_ready.as_secs_f64(),
        uptime: booted.ready.uptime_secs,
        rss_kib: rss_outside_guest_ram(&smaps, guest_ram_kib) as f64,
        setup: setup_secs(&std::fs::read_to_string(&log).unwrap_or_default()),
    })
}

/// frakti-vmm's setup time from its "guest started … setup_ms=N" log line.
fn setup_secs(log: &str) -> Option<f64> {
    let rest = log.split("setup_ms=").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse::<f64>().ok().map(|ms| ms / 1000.0)
}

/// The VMM's RSS outside guest RAM: the one mapping at least 90% of the
/// guest's size is its RAM (QEMU rounds it up a little).
fn rss_outside_guest_ram(smaps: &str, guest_ram_kib: u64) -> u64 {
    sum_rss(smaps, |m| m.size_kib >= guest_ram_kib * 9 / 10)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report(args: &Args, frakti: &Samples, qemu: &Samples) {
    let median = |v: &[f64]| percentile(v, 50.0);
    let p90 = |v: &[f64]| percentile(v, 90.0);
    println!(
        "boot to agent ready: {} runs each, {} vCPU, {} MiB, same kernel+initrd+cmdline",
        args.runs, args.cpus, args.memory
    );
    println!(
        "{:<22} {:>10} {:>10} {:>16} {:>14}",
        "", "median s", "p90 s", "guest uptime s", "own RSS MiB"
    );
    for (name, s) in [("frakti-vmm", frakti), ("qemu -M microvm", qemu)] {
        println!(
            "{:<22} {:>10.3} {:>10.3} {:>16.3} {:>14.2}",
            name,
            median(&s.secs),
            p90(&s.secs),
            median(&s.uptime),
            median(&s.rss_kib) / 1024.0
        );
    }
    let boot_ratio = median(&frakti.secs) / median(&qemu.secs);
    let p90_ratio = p90(&frakti.secs) / p90(&qemu.secs);
    let rss_ratio = median(&frakti.rss_kib) / median(&qemu.rss_kib);
    // Time to ready minus the guest's uptime then: the VMM's start and
    // setup, firmware, the kernel's first steps before its clock starts,
    // and (in the nested lab) time the guest's clock does not count, which
    // exits seem to be. Closer to what the VMM costs than the total.
    let outside_guest_clock = |s: &Samples| {
        let v: Vec<f64> = s.secs.iter().zip(&s.uptime).map(|(t, u)| t - u).collect();
        median(&v)
    };
    let (ours, theirs) = (outside_guest_clock(frakti), outside_guest_clock(qemu));
    println!(
        "ratio frakti/qemu: boot median {boot_ratio:.2}x (target <= 0.50x), p90 {p90_ratio:.2}x"
    );
    println!(
        "outside the guest's clock (time to ready - uptime): frakti-vmm {ours:.3} s, qemu {theirs:.3} s, ratio {:.2}x",
        ours / theirs
    );
    if !frakti.setup.is_empty() {
        // The rest of frakti's time is its exec and the guest, which QEMU's
        // run contains as well: what a VMM costing nothing would measure.
        let rest = &frakti.without_setup;
        println!(
            "frakti-vmm's own setup (start to vCPUs running) {:.3} s; without it {:.3} s, \
             {:.2}x of qemu: the floor for any VMM on this machine",
            median(&frakti.setup),
            median(rest),
            median(rest) / median(&qemu.secs)
        );
    }
    println!(
        "ratio frakti/qemu: own RSS {rss_ratio:.3}x; frakti-vmm {:.2} MiB (target < 3 MiB)",
        median(&frakti.rss_kib) / 1024.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_is_left_out_of_rss() {
        let smaps = "\
1000-2000 r-xp 0 0:0 0 /usr/bin/vmm
Size:                  4 kB
Rss:                   4 kB
7f0000000000-7f0010200000 rw-p 0 0:0 0
Size:             264192 kB
Rss:               51200 kB
7fff0000-7fff2000 rw-p 0 0:0 0 [stack]
Size:                  8 kB
Rss:                   8 kB
";
        assert_eq!(rss_outside_guest_ram(smaps, 256 * 1024), 12);
    }

    #[test]
    fn setup_time_comes_from_the_guest_started_line() {
        let log = "2026-11-29T16:11:02Z  INFO frakti_vmm::vm: guest started vcpus=1 \
                   memory_mib=256 setup_ms=87\n";
        assert_eq!(setup_secs(log), Some(0.087));
        assert_eq!(setup_secs("no such line"), None);
        assert_eq!(setup_secs("setup_ms=x"), None);
    }

    #[test]
    fn percentiles() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert_eq!(percentile(&v, 90.0), 5.0);
    }
}
