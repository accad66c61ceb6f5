//! virtio-net benchmark (issue 18): TCP from the guest to L1 through the
//! same tap, frakti-vmm against `qemu-system-x86_64 -M microvm` with
//! `virtio-net-device` on that tap (`vnet_hdr`), same kernel and test guest,
//! alternating, in one run (inside the lab where the host needs it). The
//! guest sends `--size` MiB with `frakti-guest-tool tcp-send` and times it
//! itself; a sink here counts the bytes. Prints MiB/s and the ratio: is the
//! gap the issue-15 pod-to-pod figures showed our device, or the lab?

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use frakti_bench::{
    Entered, VmBench, alternate_medians, boot_until_line, frakti_command, qemu_command,
};
use frakti_lab::guest;

/// Guest → L1 TCP through a tap: frakti-vmm vs QEMU microvm (ratio).
#[derive(Debug, Parser)]
struct Args {
    /// Transfers with each VMM, alternating.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// MiB per transfer.
    #[arg(long, default_value_t = 32)]
    size: u64,
}

/// Made here, persistent, used by both VMMs in turn.
const TAP: &str = "frbench0";
const HOST_IP: &str = "10.0.3.1";
const GUEST_IP: &str = "10.0.3.15";
const PORT: u16 = 7001;
const TOOL: &str = "/bin/frakti-guest-tool";

fn guest_script(bytes: u64) -> String {
    format!(
        "ip link set lo up\n\
         ip link set eth0 up\n\
         ip addr add {GUEST_IP}/24 dev eth0\n\
         i=0; until ping -c 1 -W 1 {HOST_IP} >/dev/null 2>&1; do \
             i=$((i+1)); [ $i -gt 60 ] && break; done\n\
         echo \"@@ $({TOOL} tcp-send {HOST_IP}:{PORT} 1 {bytes})\"\n"
    )
}

fn main() -> ExitCode {
    frakti_bench::exit(run(&Args::parse()))
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    ensure!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The tap both VMMs attach to, with the address the guest sends to.
struct BenchTap;

impl BenchTap {
    fn create() -> anyhow::Result<BenchTap> {
        let _ = ip(&["link", "del", TAP]);
        ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"])?;
        let tap = BenchTap;
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])?;
        ip(&["link", "set", TAP, "up"])?;
        Ok(tap)
    }
}

impl Drop for BenchTap {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", TAP]);
    }
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    ensure!(
        args.runs >= 1 && args.size >= 1,
        "--runs and --size must be at least 1"
    );
    let VmBench { guest, vmm, tool } = match VmBench::enter()? {
        Entered::Here(bench) => bench,
        Entered::RanInLab(code) => return Ok(code),
    };
    let bytes = args.size << 20;
    let dir = tempfile::tempdir()?;
    let initrd = dir.path().join("net-initrd.cpio");
    guest::build_script_initrd_with(&guest_script(bytes), &[(TOOL, &tool)], &initrd)?;
    let _tap = BenchTap::create()?;
    let listener = TcpListener::bind((HOST_IP, PORT))?;

    let (ours, qemu) = alternate_medians(args.runs, |i, frakti| {
        let console = dir.path().join(format!("console-{i}-{frakti}.log"));
        let mut command = if frakti {
            let mut c = frakti_command(&vmm, &guest.kernel, &initrd, &console);
            c.arg("--net").arg(format!("tap={TAP}"));
            c
        } else {
            let mut c = qemu_command(&guest.kernel, &initrd, &console);
            c.arg("-netdev")
                .arg(format!(
                    "tap,id=n0,ifname={TAP},script=no,downscript=no,vnet_hdr=on"
                ))
                .args(["-device", "virtio-net-device,netdev=n0"]);
            c
        };
        let sink = {
            let listener = listener.try_clone()?;
            std::thread::spawn(move || sink_one(&listener))
        };
        let seconds = send_once(&mut command, &console, bytes)?;
        let received = sink
            .join()
            .map_err(|_| anyhow::anyhow!("the sink panicked"))??;
        ensure!(
            received == bytes,
            "the sink got {received} of {bytes} bytes"
        );
        Ok(args.size as f64 / seconds)
    })?;
    println!(
        "guest -> L1 TCP through a tap, {} MiB per transfer (guest-timed), median of {}:",
        args.size, args.runs
    );
    println!("  frakti-vmm (virtio-net, CSUM + TSO)     {ours:8.1} MiB/s");
    println!("  qemu -M microvm (virtio-net, vnet_hdr)  {qemu:8.1} MiB/s");
    println!("ratio frakti/qemu: {:.2}x", ours / qemu);
    Ok(ExitCode::SUCCESS)
}

/// One connection: counts its bytes, answers "ok N".
fn sink_one(listener: &TcpListener) -> anyhow::Result<u64> {
    let (mut stream, _) = listener.accept()?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    writeln!(stream, "ok {total}")?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(total)
}

/// Boots, waits for the guest's `tcp-send` line; its seconds.
fn send_once(command: &mut Command, console: &Path, bytes: u64) -> anyhow::Result<f64> {
    let line = boot_until_line(command, console, "@@ tcp-send")?;
    if !line.contains(&format!("tcp-send ok bytes={bytes}")) {
        bail!("the guest's transfer failed: {line:?}");
    }
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("seconds="))
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .with_context(|| format!("no seconds in {line:?}"))
}
