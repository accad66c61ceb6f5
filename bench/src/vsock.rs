//! vsock benchmark: the host streams data to a sink in the guest,
//! frakti-vmm (virtio-vsock, host side a unix socket through `CONNECT`)
//! against `qemu-system-x86_64 -M microvm` with `vhost-vsock-device` (host
//! side the kernel's AF_VSOCK), same kernel and test guest, alternating, in
//! one run (inside the lab where the host needs it). Prints MiB/s and the
//! ratio.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use frakti_bench::{Entered, VmBench, alternate_medians, frakti_command, qemu_command};
use frakti_lab::guest;
use frakti_lab::process::{ChildGuard, read_log};
use frakti_lab::vsock::{hybrid_connect, kernel_connect};

/// Host-to-guest vsock throughput: frakti-vmm vs QEMU microvm (ratio).
#[derive(Debug, Parser)]
struct Args {
    /// Transfers with each VMM, alternating (the lab's rates swing by
    /// +-10% from run to run; nine make a steadier median).
    #[arg(long, default_value_t = 9)]
    runs: usize,
    /// MiB sent per transfer.
    #[arg(long, default_value_t = 256)]
    size: u64,
}

const PORT: u32 = 5201;
const CID: u32 = 3;
const TOOL: &str = "/bin/frakti-guest-tool";
const CHUNK: usize = 256 * 1024;

fn main() -> ExitCode {
    frakti_bench::exit(run(&Args::parse()))
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let VmBench { guest, vmm, tool } = match VmBench::enter()? {
        Entered::Here(bench) => bench,
        Entered::RanInLab(code) => return Ok(code),
    };
    let dir = tempfile::tempdir()?;
    let initrd = dir.path().join("sink-initrd.cpio");
    let script = format!("{TOOL} vsock-sink {PORT} 1\n");
    guest::build_script_initrd_with(&script, &[(TOOL, &tool)], &initrd)?;

    let (ours, qemu) = alternate_medians(args.runs, |i, frakti| {
        let console = dir.path().join(format!("console-{i}-{frakti}.log"));
        let uds = dir.path().join(format!("vsock-{i}.sock"));
        let mut command = if frakti {
            let mut c = frakti_command(&vmm, &guest.kernel, &initrd, &console);
            c.arg("--vsock")
                .arg(format!("cid={CID},uds={}", uds.display()));
            c
        } else {
            let mut c = qemu_command(&guest.kernel, &initrd, &console);
            c.args(["-device", &format!("vhost-vsock-device,guest-cid={CID}")]);
            c
        };
        let connect = || {
            if frakti {
                hybrid_connect(&uds, PORT)
            } else {
                kernel_connect(CID, PORT)
            }
        };
        transfer_once(&mut command, &console, connect, args.size)
    })?;
    println!(
        "host -> guest vsock stream of {} MiB (guest reads and discards), median of {}:",
        args.size, args.runs
    );
    println!("  frakti-vmm (virtio-vsock, hybrid unix socket)  {ours:8.1} MiB/s");
    println!("  qemu -M microvm (vhost-vsock, AF_VSOCK)        {qemu:8.1} MiB/s");
    println!("ratio frakti/qemu: {:.2}x (target >= 1.0x)", ours / qemu);
    Ok(ExitCode::SUCCESS)
}

/// Boots, waits for the sink, sends `size_mib`, returns MiB/s from the
/// first byte sent to the guest's count arriving.
fn transfer_once(
    command: &mut Command,
    console: &Path,
    connect: impl Fn() -> std::io::Result<UnixStream>,
    size_mib: u64,
) -> anyhow::Result<f64> {
    let log_path = console.with_extension("vmm.log");
    let vmm_log = std::fs::File::create(&log_path)?;
    command
        .stdin(Stdio::null())
        .stdout(vmm_log.try_clone()?)
        .stderr(vmm_log);
    let mut vmm = ChildGuard::spawn(command).context("starting the VMM")?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !read_log(console).contains(&format!("vsock sink listening on {PORT}")) {
        if let Some(status) = vmm.try_wait()? {
            bail!(
                "{:?} exited ({status}) before the sink listened:\n{}\n{}",
                command.get_program(),
                read_log(console),
                read_log(&log_path)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the sink did not listen within 300 s:\n{}",
                read_log(console)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stream = connect().context("connecting to the guest")?;
    let chunk = vec![0x5au8; CHUNK];
    let bytes = size_mib << 20;
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        stream.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let seconds = started.elapsed().as_secs_f64();
    vmm.kill()?;
    let received: u64 = answer.trim().parse().context("sink's answer")?;
    if received != bytes {
        bail!("the guest received {received} of {bytes} bytes");
    }
    Ok(size_mib as f64 / seconds.max(1e-3))
}
