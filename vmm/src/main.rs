//! `frakti-vmm`: runs one VM (see `--help`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use frakti_vmm::config::{SerialOutput, VmConfig};
use frakti_vmm::{api, vm};

/// Frakti's micro-VMM: boots one KVM virtual machine (a pod sandbox).
///
/// The guest gets COM1 as its console, an i8042 whose reset ends the VM (the
/// VMM then exits 0), and the agent's boot-done port. A guest kernel panic or
/// triple fault makes the VMM exit 1. SIGTERM or SIGINT stop the VM; the
/// optional control API (HTTP/1.1 + JSON on a unix socket) offers VM info,
/// pause/resume, shutdown and metrics.
///
/// Values come from flags, or from a TOML/JSON file (`--config`) whose values
/// the flags override.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// TOML (or .json) file with the VM configuration.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of vCPUs (1-32). Default 1.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB. Default 128.
    #[arg(long)]
    memory: Option<u32>,
    /// Guest kernel: ELF vmlinux (PVH) or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initrd (for Frakti: the agent's cpio archive).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command line, after the base one (see config::BASE_CMDLINE).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest console: "stdout", "none", or a file path.
    #[arg(long)]
    serial: Option<String>,
    /// Feed this process's stdin to the guest console.
    #[arg(long)]
    console_input: bool,
    /// A virtio-blk disk: serial=NAME[,path=FILE][,ro]. Without path, an empty
    /// slot whose backing file is set later through the API. Repeatable.
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<frakti_vmm::config::DiskConfig>,
    /// A vsock device: cid=N,uds=PATH. Host programs reach guest port P by
    /// connecting to PATH and writing "CONNECT P\n" (answer "OK <port>\n");
    /// guest connections to host port P go to the unix socket PATH_P.
    #[arg(long, value_name = "SPEC")]
    vsock: Option<frakti_vmm::config::VsockConfig>,
    /// A virtio-net device: tap=NAME (created if absent, as root) or fd=N (an
    /// inherited tap opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR), and
    /// optionally mac=aa:bb:cc:dd:ee:ff (else a random local one).
    #[arg(long, value_name = "SPEC")]
    net: Option<frakti_vmm::config::NetConfig>,
    /// Serve the control API on this unix socket.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Disable seccomp filters (debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Log level: error, warn, info, debug or trace (also RUST_LOG).
    #[arg(long, env = "RUST_LOG", default_value = "warn")]
    log: tracing::Level,
}

impl Cli {
    fn into_config(self) -> anyhow::Result<VmConfig> {
        let mut config = match &self.config {
            Some(path) => VmConfig::from_file(path)?,
            None => VmConfig::with_kernel(
                self.kernel
                    .clone()
                    .context("--kernel is required (or a --config file)")?,
            ),
        };
        if let Some(v) = self.vcpus {
            config.vcpus = v;
        }
        if let Some(m) = self.memory {
            config.memory_mib = m;
        }
        if let Some(k) = self.kernel {
            config.kernel = k;
        }
        if self.initrd.is_some() {
            config.initrd = self.initrd;
        }
        if let Some(c) = self.cmdline {
            config.cmdline = c;
        }
        if let Some(s) = self.serial {
            config.serial = match s.as_str() {
                "stdout" => SerialOutput::Stdout,
                "none" => SerialOutput::None,
                path => SerialOutput::File(path.into()),
            };
        }
        config.console_input |= self.console_input;
        config.disks.extend(self.disks);
        if self.vsock.is_some() {
            config.vsock = self.vsock;
        }
        if self.net.is_some() {
            config.net = self.net;
        }
        if self.api_socket.is_some() {
            config.api_socket = self.api_socket;
        }
        if self.no_seccomp {
            config.seccomp = false;
        }
        config.validate()?;
        Ok(config)
    }
}

/// glibc's malloc, when it first shrinks a thread arena's heap, opens
/// `/proc/sys/vm/overcommit_memory`; under the device and vCPU seccomp
/// filters (no `openat`) that kills the VMM. A fixed trim threshold far above
/// what those threads hold means arena heaps are never shrunk (large buffers
/// are mmap'ed and unmapped whole, as a fixed threshold also stops glibc from
/// moving the mmap threshold up).
fn keep_malloc_away_from_files() {
    const TRIM_THRESHOLD: libc::c_int = 64 << 20;
    // SAFETY: mallopt only changes malloc tunables; called before any
    // other thread exists.
    if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) } != 1 {
        eprintln!("frakti-vmm: mallopt(M_TRIM_THRESHOLD) failed");
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    keep_malloc_away_from_files();
    let cli = Cli::parse();
    // A plain level, not an EnvFilter: its regex engine costs RSS in every VM.
    tracing_subscriber::fmt()
        .with_max_level(cli.log)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match run(cli, start) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("frakti-vmm: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli, start: Instant) -> anyhow::Result<ExitCode> {
    let config = cli.into_config()?;
    let socket = config.api_socket.clone();
    let vsock_socket = config.vsock.as_ref().map(|v| v.uds.clone());
    let listener = socket.as_ref().map(api::bind).transpose()?;
    let result = boot_and_run(config, listener, start);
    if let Some(path) = &socket {
        let _ = std::fs::remove_file(path);
    }
    // The VM ran, so the vsock socket was ours (a live one of another VM
    // fails the build instead).
    if let (Some(path), Ok(_)) = (&vsock_socket, &result) {
        let _ = std::fs::remove_file(path);
    }
    let outcome = result?;
    match &outcome {
        vm::Outcome::GuestDone => tracing::info!("guest finished"),
        vm::Outcome::Stopped { reason, graceful } => {
            tracing::info!(graceful, "stopped: {reason}")
        }
        vm::Outcome::GuestPanic(msg) => eprintln!("frakti-vmm: guest kernel panic: {msg}"),
        vm::Outcome::Failed(reason) => eprintln!("frakti-vmm: guest failed: {reason:?}"),
    }
    Ok(ExitCode::from(outcome.exit_code() as u8))
}

fn boot_and_run(
    config: VmConfig,
    listener: Option<std::os::unix::net::UnixListener>,
    start: Instant,
) -> anyhow::Result<vm::Outcome> {
    let seccomp = config.seccomp;
    let mut vm = vm::build(config, start, usize::from(listener.is_some()))?;
    if let Some(listener) = listener {
        let (sender, inbox) =
            api::channel(api::ApiContext::of(&vm, start)).context("API channel")?;
        vm.serve_api(inbox);
        api::spawn(listener, sender, seccomp, vm.start_barrier())?;
    }
    Ok(vm.run()?)
}
