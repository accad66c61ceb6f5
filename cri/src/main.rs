//! `frakti`: the CRI daemon kubelet talks to, and a CLI for its images.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use frakti_cri::config::FileConfig;
use frakti_cri::daemon;
use frakti_cri::image::StoreConfig;
use frakti_cri::image::disk::{DiskFormat, ErofsCompression};

mod cli_image;

const DEFAULT_SOCKET: &str = "/run/frakti/frakti.sock";
const DEFAULT_STATE: &str = "/var/lib/frakti";

#[derive(Parser)]
#[command(
    name = "frakti",
    version,
    about = "A hypervisor-based container runtime: every pod is a KVM virtual machine",
    long_about = "frakti serves kubelet's Container Runtime Interface (CRI) on a unix socket \
                  (`frakti daemon`), and manages its images from the command line."
)]
struct Cli {
    /// The daemon's socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET, env = "FRAKTI_ENDPOINT")]
    endpoint: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve CRI on a unix socket (kubelet: --container-runtime-endpoint=unix:///run/frakti/frakti.sock).
    ///
    /// Example: frakti daemon --config /etc/frakti/frakti.toml
    Daemon(DaemonArgs),
    /// Pull, list, remove, import and export images.
    #[command(subcommand)]
    Image(cli_image::ImageCommand),
}

#[derive(Args)]
struct DaemonArgs {
    /// A TOML file whose keys are these flags' names (e.g. `state-dir = "/var/lib/frakti"`); flags win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The socket to serve on [default: /run/frakti/frakti.sock].
    #[arg(long)]
    listen: Option<PathBuf>,
    /// Where images, disks and state live [default: /var/lib/frakti].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// containerd-style registry hosts: <dir>/<host>/hosts.toml [default: /etc/frakti/certs.d].
    #[arg(long)]
    certs_dir: Option<PathBuf>,
    /// A Docker config.json with the node's registry credentials [default: Docker's].
    #[arg(long)]
    docker_config: Option<PathBuf>,
    /// The image disks' filesystem: erofs or ext4 [default: erofs].
    #[arg(long)]
    image_disk_format: Option<DiskFormat>,
    /// EROFS data compression: none, lz4 or lz4hc [default: none; see the README's measurements].
    #[arg(long)]
    erofs_compression: Option<ErofsCompression>,
    /// Image pulls running at once [default: 3].
    #[arg(long)]
    max_parallel_pulls: Option<usize>,
    /// Log level: error, warn, info, debug, trace [default: info].
    #[arg(long)]
    log_level: Option<String>,
}

fn init_logs(level: &str) -> anyhow::Result<()> {
    let level: tracing::Level = level.parse().map_err(|_| {
        anyhow::anyhow!("unknown log level '{level}' (error, warn, info, debug, trace)")
    })?;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

fn daemon_options(args: DaemonArgs) -> anyhow::Result<(daemon::Options, String)> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let state_dir = args
        .state_dir
        .or(file.state_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE));
    let mut store = StoreConfig::new(&state_dir.join("images"));
    if let Some(dir) = args.certs_dir.or(file.certs_dir) {
        store.certs_dir = dir;
    }
    store.docker_config = args.docker_config.or(file.docker_config);
    if let Some(format) = args.image_disk_format.or(file.image_disk_format) {
        store.disk_format = format;
    }
    if let Some(c) = args.erofs_compression.or(file.erofs_compression) {
        store.erofs_compression = c;
    }
    if let Some(n) = args.max_parallel_pulls.or(file.max_parallel_pulls) {
        anyhow::ensure!(n > 0, "max-parallel-pulls must be at least 1");
        store.max_parallel_pulls = n;
    }
    let log = args
        .log_level
        .or(file.log_level)
        .unwrap_or_else(|| "info".into());
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    Ok((
        daemon::Options {
            listen,
            state_dir,
            store,
        },
        log,
    ))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Daemon(args) => {
            let (options, log) = daemon_options(args)?;
            init_logs(&log)?;
            daemon::run(options).await?;
            Ok(())
        }
        Command::Image(command) => cli_image::run(&cli.endpoint, command).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("frakti: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("frakti: error: {}", frakti_cri::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Paths sent to the daemon are absolute: it resolves them on the node.
pub(crate) fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(std::path::absolute(path)?)
}
