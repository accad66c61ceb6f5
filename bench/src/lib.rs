//! What the throughput benchmarks share: the two VMMs' command lines for
//! the same test guest, a boot that waits for the guest's result line, and
//! alternating runs reduced to medians.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use frakti_lab::guest::{self, GuestAssets};
use frakti_lab::process::{ChildGuard, FileTail, read_log};
use frakti_lab::rerun::{Placement, run_here_or_in_lab};

/// Boots `command` (its output to `<console>.vmm.log`) and waits up to
/// 300 s for the first complete console line starting with `prefix`; the
/// VM is killed and the line returned.
pub fn boot_until_line(
    command: &mut Command,
    console: &Path,
    prefix: &str,
) -> anyhow::Result<String> {
    let log_path = console.with_extension("vmm.log");
    let vmm_log = std::fs::File::create(&log_path)?;
    command
        .stdin(Stdio::null())
        .stdout(vmm_log.try_clone()?)
        .stderr(vmm_log);
    let mut vmm = ChildGuard::spawn(command).context("starting the VMM")?;
    let deadline = Instant::now() + Duration::from_secs(300);
    // Complete lines only: the console may hold half of the result line.
    let mut tail = FileTail::new(console);
    loop {
        if let Some(line) = tail
            .new_lines()?
            .into_iter()
            .find(|l| l.starts_with(prefix))
        {
            vmm.kill()?;
            return Ok(line);
        }
        if let Some(status) = vmm.try_wait()? {
            bail!(
                "{:?} exited ({status}) before its result line:\n{}\n{}",
                command.get_program(),
                read_log(console),
                read_log(&log_path)
            );
        }
        if Instant::now() > deadline {
            bail!("no result within 300 s:\n{}", read_log(console));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A benchmark's exit: its code, or `bench: error: …` and failure.
pub fn exit(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("bench: error: {e:#}");
        ExitCode::FAILURE
    })
}

/// What a VMM benchmark boots: the guest, frakti-vmm and the guest tool.
pub struct VmBench {
    pub guest: GuestAssets,
    pub vmm: PathBuf,
    pub tool: PathBuf,
}

/// Where [`VmBench::enter`] leaves the benchmark.
pub enum Entered {
    /// Go on here with these.
    Here(VmBench),
    /// The benchmark ran inside the lab; this is its exit code.
    RanInLab(ExitCode),
}

impl VmBench {
    /// Finds the guest, the VMM and the guest tool, then goes on here or
    /// runs the benchmark again inside the lab with them copied in.
    pub fn enter() -> anyhow::Result<Entered> {
        let guest = GuestAssets::locate()?;
        let vmm = guest::vmm_binary()?;
        let tool = guest::guest_tool_binary()?;
        let programs = [
            (guest::VMM_ENV, vmm.clone()),
            (guest::GUEST_TOOL_ENV, tool.clone()),
        ];
        Ok(match here_or_in_lab(&programs)? {
            Some(code) => Entered::RanInLab(code),
            None => Entered::Here(VmBench { guest, vmm, tool }),
        })
    }
}

/// Runs the benchmark here, or again inside the lab (with `programs`
/// copied in) where this host needs it: `Some(exit code)` once that lab
/// run is over, `None` to go on here.
pub fn here_or_in_lab(programs: &[(&str, PathBuf)]) -> anyhow::Result<Option<ExitCode>> {
    match run_here_or_in_lab(programs)? {
        Placement::Here(mode) => {
            eprintln!("bench: running here ({mode})");
            Ok(None)
        }
        Placement::RanInLab(status) => Ok(Some(ExitCode::from(u8::try_from(status).unwrap_or(1)))),
    }
}

/// A `mib` MiB disk image in `dir`, written rather than sparse so that a
/// VMM reads real data from the page cache.
pub fn written_disk(dir: &Path, mib: u64) -> anyhow::Result<PathBuf> {
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0x5au8; usize::try_from(mib << 20)?])?;
    Ok(disk)
}

/// frakti-vmm booting `kernel` + `initrd` with 256 MiB, console to
/// `console`; the caller adds its device.
pub fn frakti_command(vmm: &Path, kernel: &Path, initrd: &Path, console: &Path) -> Command {
    let mut c = Command::new(vmm);
    c.arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--memory", "256", "--cmdline", "quiet"])
        .arg("--serial")
        .arg(console);
    c
}

/// `qemu-system-x86_64 -M microvm` booting the same guest the same way;
/// the caller adds its device.
pub fn qemu_command(kernel: &Path, initrd: &Path, console: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    // acpi=off: virtio-mmio devices go on the kernel command line, as with
    // frakti-vmm.
    c.args([
        "-M",
        "microvm,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        "256",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", "console=ttyS0 reboot=t panic=-1 quiet"]);
    c
}

/// Runs `measure(run, frakti)` `runs` times for each VMM, alternating which
/// goes first; returns the medians (frakti-vmm, QEMU).
pub fn alternate_medians(
    runs: usize,
    mut measure: impl FnMut(usize, bool) -> anyhow::Result<f64>,
) -> anyhow::Result<(f64, f64)> {
    let (mut ours, mut qemu) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for frakti in order {
            let value = measure(i, frakti)?;
            if frakti { &mut ours } else { &mut qemu }.push(value);
        }
    }
    Ok((median(&mut ours), median(&mut qemu)))
}

/// The middle value (NaN for none).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Detaches every mount at or under `dir`, deepest first (what a killed
/// containerd may leave in its root before the temp dir is removed).
pub fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut found: Vec<std::path::PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        // /proc/self/mounts escapes spaces and the like as \040; the temp
        // dirs have none.
        .map(std::path::PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for mount in found {
        if let Ok(path) = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()) {
            // SAFETY: `path` is a valid NUL-terminated string that lives
            // across the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The `frakti` binary the benches drive: `$FRAKTI_BIN`, else
/// `target/release/frakti`, which the benches do not build themselves.
pub fn frakti_binary() -> anyhow::Result<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("FRAKTI_BIN") {
        return Ok(std::path::PathBuf::from(path));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let path = workspace.join("target/release/frakti");
    if !path.is_file() {
        bail!(
            "{} is missing: run `cargo build --release -p frakti-cri` first (make bench does)",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternates_and_takes_medians() {
        let mut order = Vec::new();
        let (ours, qemu) = alternate_medians(3, |i, frakti| {
            order.push(frakti);
            Ok(if frakti { 10.0 + i as f64 } else { 1.0 })
        })
        .unwrap();
        assert_eq!(order, [true, false, false, true, true, false]);
        assert_eq!((ours, qemu), (11.0, 1.0));
        assert!(alternate_medians(0, |_, _| Ok(1.0)).unwrap().0.is_nan());
    }
}
