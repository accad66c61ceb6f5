//! `frakti-agent`: PID 1 of a Frakti pod VM (see the library docs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use frakti_agent::container::Containers;
use frakti_agent::sandbox::Sandbox;
use frakti_agent::server::{self, Agent, Listener};
use frakti_agent::storage::Storage;
use frakti_agent::{cgroup, init, pid1, process, sysinfo};
use frakti_proto::ready::ReadyLine;

/// frakti-agent: PID 1 of a Frakti pod VM.
///
/// As /init of the guest initrd (PID 1, no arguments) it mounts /proc, /sys,
/// /dev and friends, serves the agent API on vsock port 1024, prints a ready
/// line on the console (uptime, vCPUs, memory) and tells the VMM it is ready
/// (boot-done port). Then it either resets the VM at once
/// (frakti_after_ready=reset on the kernel command line) or serves until
/// Ctrl-Alt-Del, SIGTERM, SIGPWR or the Shutdown RPC asks it to stop
/// (frakti_after_ready=wait, the default): it stops the containers and
/// resets the VM.
///
/// `frakti-agent serve` runs the same API as an ordinary root process on a
/// unix socket (host mode, for tests).
#[derive(Parser)]
#[command(name = "frakti-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the agent API as an ordinary root process (host mode).
    Serve {
        /// Where to listen: unix:/path/to.sock, or vsock (port 1024).
        #[arg(long)]
        listen: String,
        /// Where container state, disks and copied files live.
        #[arg(long, default_value = "/run/frakti")]
        state_dir: PathBuf,
    },
}

/// Grace period for containers when a signal asks the guest to stop.
const SIGNAL_GRACE: Duration = Duration::from_secs(10);
const GUEST_STATE_DIR: &str = "/run/frakti";

fn main() -> ExitCode {
    let started = Instant::now();
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == process::HELPER_ARG)
    {
        init::main();
    }
    // As PID 1, arguments come from the kernel command line: never refuse
    // to boot because of them.
    if std::process::id() == 1 && std::env::args().nth(1).as_deref() != Some("serve") {
        init_logging();
        if let Err(e) = guest_main(started) {
            eprintln!("frakti-agent: {e:#}");
        }
        pid1::reset_vm()
    }
    let cli = Cli::parse();
    let Some(Command::Serve { listen, state_dir }) = cli.command else {
        eprintln!("frakti-agent: must run as PID 1 (the init of a Frakti guest VM); see --help");
        return ExitCode::from(2);
    };
    init_logging();
    match host_main(started, &listen, &state_dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("frakti-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at the level RUST_LOG names ("debug", "warn"...; info
/// by default). A plain level, not an EnvFilter: its regex engine would
/// grow the agent, and every pod boots it.
fn init_logging() {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .init();
}

fn guest_main(started: Instant) -> anyhow::Result<()> {
    // Containers need a root that pivot_root can leave; a guest that
    // cannot move still boots and serves.
    if let Err(e) = pid1::leave_initramfs() {
        eprintln!("frakti-agent: warning: {:#}", anyhow::Error::from(e));
    }
    pid1::mount_kernel_filesystems()?;
    pid1::block_init_signals()?;
    pid1::hand_ctrl_alt_del_to_init()?;
    if let Err(e) = pid1::loopback_up() {
        tracing::warn!("{:#}", anyhow::Error::from(e));
    }
    let after_ready = std::env::var(frakti_proto::AFTER_READY_PARAM);
    let reset_at_once = match after_ready.as_deref() {
        Ok("reset") => true,
        Ok("wait") | Err(_) => false,
        Ok(other) => anyhow::bail!(
            "{}={other} is not 'reset' or 'wait'",
            frakti_proto::AFTER_READY_PARAM
        ),
    };
    run_agent(
        started,
        Path::new(GUEST_STATE_DIR),
        Bind::Vsock,
        true,
        || {
            let ready = ReadyLine {
                uptime_secs: sysinfo::uptime_secs()?,
                cpus: sysinfo::online_cpus()?,
                mem_total_kib: sysinfo::mem_total_kib()?,
            };
            println!("{ready}");
            if std::env::var(frakti_proto::DUMP_KMSG_PARAM).is_ok_and(|v| v == "1") {
                for line in sysinfo::kernel_log()? {
                    println!("{line}");
                }
            }
            // Only a metric for the VMM: a guest that cannot signal still serves.
            if let Err(e) =
                pid1::signal_boot_done(frakti_proto::BOOT_DONE_PORT, frakti_proto::BOOT_DONE_VALUE)
            {
                tracing::warn!("{:#}", anyhow::Error::from(e));
            }
            Ok(!reset_at_once)
        },
    )
}

fn host_main(started: Instant, listen: &str, state_dir: &Path) -> anyhow::Result<()> {
    let bind = match listen {
        "vsock" => Bind::Vsock,
        _ => match listen.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Bind::Unix(PathBuf::from(path)),
            _ => anyhow::bail!("--listen {listen}: expected unix:/path or vsock"),
        },
    };
    run_agent(started, state_dir, bind, false, || Ok(true))
}

enum Bind {
    Unix(PathBuf),
    Vsock,
}

/// Starts the reaper and the API server (`guest`: as the VM's PID 1,
/// allowed to change guest-wide files such as /etc/resolv.conf), calls `serving` once the server
/// listens (it returns whether to keep serving), then waits until a signal
/// or the Shutdown RPC ends the agent and the containers are stopped.
fn run_agent(
    started: Instant,
    state_dir: &Path,
    bind: Bind,
    guest: bool,
    serving: impl FnOnce() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    // Before any thread exists: every thread inherits the blocked mask.
    pid1::block_init_signals()?;
    let reaper = process::Reaper::new();
    pid1::spawn_reaper(reaper.clone())?;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let containers = Containers::new(reaper, state_dir.to_path_buf(), PathBuf::from(cgroup::ROOT))?;
    let storage = Storage::new(state_dir.to_path_buf());
    let sandbox = Sandbox::new(state_dir.to_path_buf(), PathBuf::from(cgroup::ROOT), guest);
    let agent = Agent::new(containers, storage, sandbox);
    let listeners = runtime.block_on(async { bind_listeners(&bind) })?;
    let served = agent.clone();
    runtime.spawn(async move {
        server::serve(served, listeners).await;
        pid1::notify_shutdown_done();
    });
    tracing::info!(
        "serving after {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    if !serving()? {
        return Ok(());
    }
    loop {
        let signal = pid1::wait_for_shutdown()?;
        if signal == pid1::SHUTDOWN_DONE {
            break;
        }
        println!("frakti-agent: {signal}: shutting down");
        agent.request_shutdown(SIGNAL_GRACE);
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn bind_listeners(bind: &Bind) -> anyhow::Result<Vec<Listener>> {
    match bind {
        Bind::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            tracing::info!("listening on unix:{}", path.display());
            Ok(vec![Listener::Unix(listener)])
        }
        Bind::Vsock => {
            let addr = tokio_vsock::VsockAddr::new(
                tokio_vsock::VMADDR_CID_ANY,
                frakti_proto::AGENT_VSOCK_PORT,
            );
            match tokio_vsock::VsockListener::bind(addr) {
                Ok(listener) => {
                    tracing::info!("listening on vsock port {}", frakti_proto::AGENT_VSOCK_PORT);
                    Ok(vec![Listener::Vsock(listener)])
                }
                // No vsock device (yet): still boot, serve nothing.
                Err(e) => {
                    tracing::warn!(
                        "cannot listen on vsock port {}: {e}; serving no API",
                        frakti_proto::AGENT_VSOCK_PORT
                    );
                    Ok(vec![])
                }
            }
        }
    }
}
