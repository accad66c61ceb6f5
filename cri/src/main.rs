//! `frakti`: the CRI daemon kubelet talks to, and a CLI for its images.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use frakti_cri::config::{FileConfig, NetworkMode};
use frakti_cri::daemon;
use frakti_cri::image::StoreConfig;
use frakti_cri::image::disk::{DiskFormat, ErofsCompression};
use frakti_cri::network::NetworkSettings;
use frakti_cri::runtime::RuntimeConfig;
use frakti_cri::runtime::sizing::SizingDefaults;
use frakti_cri::sandbox::vmm::VmAssets;

mod cli;
mod cli_image;
mod cli_volume;
mod cli_volume_stats;

const DEFAULT_SOCKET: &str = "/run/frakti/frakti.sock";
const DEFAULT_STATE: &str = "/var/lib/frakti";
const DEFAULT_CONFIG: &str = "/etc/frakti/config.toml";
/// Where packages install the VMM, the guest kernel and the agent's initrd.
const DEFAULT_ASSETS: &str = "/usr/lib/frakti";
const DEFAULT_CPUS: u32 = 1;
const DEFAULT_MEMORY_MIB: u64 = 128;
const DEFAULT_EMPTY_DIR_MIB: u64 = 10 << 10;
/// What the guest kernel and agent take besides the containers: measured
/// in the lab (MemTotal - MemAvailable of an idle 128 MiB guest, rounded
/// up; see docs/runtime.md).
const GUEST_RESERVE_MIB: u64 = 64;

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
    /// Example: frakti daemon --root /var/lib/frakti --kernel /usr/lib/frakti/vmlinux
    Daemon(Box<DaemonArgs>),
    /// Pull, list, remove, import and export images.
    #[command(subcommand)]
    Image(cli_image::ImageCommand),
    /// Direct-assigned volumes: block devices a volume driver hands to pods' VMs instead of
    /// mounting them on the host.
    Volume {
        /// The daemon's state dir (its --root).
        #[arg(long, default_value = DEFAULT_STATE)]
        root: PathBuf,
        #[command(subcommand)]
        command: cli_volume::VolumeCommand,
    },
    /// Run a command in a new container, in a VM of its own.
    Run(Box<cli::run::RunArgs>),
    /// List containers (running ones; -a for all), or pods with --pods.
    ///
    /// Example: frakti ps -a --format json
    Ps {
        /// All containers, not only running ones.
        #[arg(short, long)]
        all: bool,
        /// Only ids.
        #[arg(short, long)]
        quiet: bool,
        /// List pods (VMs) instead of containers.
        #[arg(long)]
        pods: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: cli::Format,
    },
    /// Show a container's output (stdout to stdout, stderr to stderr).
    ///
    /// Example: frakti logs -f --tail 20 web
    Logs {
        /// Keep following the output until the container exits.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Start each line with its timestamp (RFC 3339, nanoseconds).
        #[arg(short, long)]
        timestamps: bool,
        /// Container id, unique id prefix or name.
        container: String,
    },
    /// Run a command in a running container.
    ///
    /// Example: frakti exec -it web sh
    Exec {
        /// Keep stdin open and send it to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Give the command a terminal (Ctrl-P Ctrl-Q detaches).
        #[arg(short, long)]
        tty: bool,
        /// Container id, unique id prefix or name.
        container: String,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Stop containers: their stop signal, then SIGKILL after the timeout (a container of
    /// `frakti run` has its VM stopped too).
    Stop {
        /// Seconds to wait before SIGKILL.
        #[arg(short = 't', long, default_value_t = cli::containers::DEFAULT_STOP_TIMEOUT)]
        time: i64,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Remove containers (a container of `frakti run` with its VM).
    Rm {
        /// Also running ones (killed first).
        #[arg(short, long)]
        force: bool,
        /// The daemon's state dir (its --root), where `run --volume-device` registered devices.
        #[arg(long, default_value = DEFAULT_STATE)]
        root: PathBuf,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Show a container and its pod as JSON.
    Inspect { container: String },
    /// Live CPU and memory use of running containers.
    Stats {
        /// One sample, then exit.
        #[arg(long)]
        no_stream: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: cli::Format,
    },
    /// Pull an image, with progress per layer (same as `frakti image pull`).
    Pull { image: String },
    /// List images (same as `frakti image ls`).
    Images {
        /// Only image ids.
        #[arg(short, long)]
        quiet: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: cli::Format,
    },
    /// Remove images (same as `frakti image rm`).
    Rmi {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Print a shell completion script.
    ///
    /// Example: frakti completion bash > /etc/bash_completion.d/frakti
    Completion { shell: clap_complete::Shell },
}

#[derive(Args)]
struct DaemonArgs {
    /// A TOML file whose keys are these flags' names (e.g. `root = "/var/lib/frakti"`); flags win
    /// [default: /etc/frakti/config.toml if it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// The socket to serve on [default: /run/frakti/frakti.sock].
    #[arg(long)]
    listen: Option<PathBuf>,
    /// Where images, disks, pods and their state live [default: /var/lib/frakti]. Keep it short:
    /// each pod's sockets live below it (unix socket paths are limited to 107 bytes).
    #[arg(long, alias = "state-dir")]
    root: Option<PathBuf>,
    /// The guest kernel every pod VM boots [default: /usr/lib/frakti/vmlinux].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The guest's initrd, holding frakti-agent [default: /usr/lib/frakti/initrd.cpio].
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Other guest kernels a pod may choose by file name (annotation io.frakti.vm.kernel,
    /// `frakti run --kernel NAME`) [default: /usr/lib/frakti/kernels].
    #[arg(long)]
    kernels_dir: Option<PathBuf>,
    /// The VMM binary [default: /usr/lib/frakti/frakti-vmm].
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// vCPUs of a pod VM without CPU limits, and the least any gets [default: 1].
    #[arg(long, alias = "defaultCPUNum")]
    default_cpus: Option<u32>,
    /// MiB of a pod VM without memory limits, and the least any gets [default: 128].
    #[arg(long, alias = "defaultMemoryMB")]
    default_memory: Option<u64>,
    /// Unsafe sysctls pods may set, comma-separated; `prefix*` allowed (kubelet's
    /// --allowed-unsafe-sysctls).
    #[arg(long, value_delimiter = ',')]
    allowed_unsafe_sysctls: Option<Vec<String>>,
    /// Address of the streaming server (exec, attach, port-forward) [default: 127.0.0.1:0].
    #[arg(long)]
    streaming_addr: Option<String>,
    /// PEM certificate chain of the streaming server: it then serves HTTPS (with
    /// --streaming-tls-key).
    #[arg(long, requires = "streaming_tls_key")]
    streaming_tls_cert: Option<PathBuf>,
    /// PEM private key of the streaming server's certificate.
    #[arg(long, requires = "streaming_tls_cert")]
    streaming_tls_key: Option<PathBuf>,
    /// MiB of each disk-backed emptyDir volume (a sparse ext4 file per volume, made at first
    /// use); 0 keeps emptyDirs in guest memory [default: 10240].
    #[arg(long)]
    empty_dir_size: Option<u64>,
    /// Group owning the CRI socket (mode 0660), by name or gid [default: root].
    #[arg(long)]
    socket_group: Option<String>,
    /// containerd-style registry hosts: <dir>/<host>/hosts.toml [default: /etc/frakti/certs.d].
    #[arg(long)]
    certs_dir: Option<PathBuf>,
    /// A Docker config.json with the node's registry credentials [default: Docker's].
    #[arg(long)]
    docker_config: Option<PathBuf>,
    /// The image disks' filesystem: erofs or ext4 [default: erofs].
    #[arg(long)]
    image_disk_format: Option<DiskFormat>,
    /// EROFS data compression: none, lz4 or lz4hc [default: none; see docs/performance.md].
    #[arg(long)]
    erofs_compression: Option<ErofsCompression>,
    /// Image pulls running at once [default: 3].
    #[arg(long)]
    max_parallel_pulls: Option<usize>,
    /// Log level: error, warn, info, debug, trace [default: info].
    #[arg(long)]
    log_level: Option<String>,
    /// Pod networks: cni (the node's CNI configuration, as kubelet expects) or none (pods
    /// get a loopback only) [default: cni].
    #[arg(long)]
    network: Option<NetworkMode>,
    /// CNI configuration dir: its first file in lexical order (.conflist, .conf, .json) is
    /// used, reloaded when the dir changes [default: /etc/cni/net.d].
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    /// CNI plugin dirs, searched in order [default: /opt/cni/bin,/usr/lib/cni].
    #[arg(long, value_delimiter = ',')]
    cni_bin_dir: Option<Vec<PathBuf>>,
    /// Seconds a CNI plugin may run before it is killed [default: 60].
    #[arg(long)]
    cni_plugin_timeout: Option<u64>,
    /// Where pod network namespaces are bind-mounted [default: /run/frakti/netns].
    #[arg(long)]
    netns_dir: Option<PathBuf>,
}

fn init_logs(level: &str) -> anyhow::Result<()> {
    let level: tracing::Level = level.parse().map_err(|_| {
        anyhow::anyhow!("unknown log level '{level}' (error, warn, info, debug, trace)")
    })?;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // The HTTP/2 stack's debug lines (every frame) drown ours.
    let quiet = level.min(tracing::Level::INFO);
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(level)
        .with_target("h2", quiet)
        .with_target("hyper", quiet)
        .with_target("hyper_util", quiet)
        .with_target("tower", quiet)
        .with_target("rustls", quiet)
        .with_target("reqwest", quiet);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .finish()
        .with(filter)
        .init();
    Ok(())
}

fn daemon_options(args: DaemonArgs) -> anyhow::Result<(daemon::Options, String)> {
    let default_config = Path::new(DEFAULT_CONFIG);
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None if default_config.exists() => FileConfig::load(default_config)?,
        None => FileConfig::default(),
    };
    let state_dir = args
        .root
        .or(file.root)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE));
    let assets = Path::new(DEFAULT_ASSETS);
    let runtime = RuntimeConfig {
        root: state_dir.clone(),
        assets: VmAssets {
            vmm: args
                .vmm
                .or(file.vmm)
                .unwrap_or_else(|| assets.join("frakti-vmm")),
            kernel: args
                .kernel
                .or(file.kernel)
                .unwrap_or_else(|| assets.join("vmlinux")),
            initrd: args
                .initrd
                .or(file.initrd)
                .unwrap_or_else(|| assets.join("initrd.cpio")),
            kernels_dir: args
                .kernels_dir
                .or(file.kernels_dir)
                .unwrap_or_else(|| assets.join("kernels")),
        },
        sizing: SizingDefaults {
            cpus: args
                .default_cpus
                .or(file.default_cpus)
                .unwrap_or(DEFAULT_CPUS),
            memory_mib: args
                .default_memory
                .or(file.default_memory)
                .unwrap_or(DEFAULT_MEMORY_MIB),
            host_cpus: std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                .unwrap_or(1),
            guest_reserve_mib: GUEST_RESERVE_MIB,
        },
        boot_timeout: std::time::Duration::from_secs(120),
        allowed_unsafe_sysctls: args
            .allowed_unsafe_sysctls
            .or(file.allowed_unsafe_sysctls)
            .unwrap_or_default(),
        streaming_addr: args
            .streaming_addr
            .or(file.streaming_addr)
            .unwrap_or_else(|| "127.0.0.1:0".into()),
        empty_dir_bytes: args
            .empty_dir_size
            .or(file.empty_dir_size)
            .unwrap_or(DEFAULT_EMPTY_DIR_MIB)
            .checked_mul(1 << 20)
            .ok_or_else(|| anyhow::anyhow!("empty-dir-size is too large"))?,
        network: NetworkSettings {
            enabled: args.network.or(file.network).unwrap_or(NetworkMode::Cni) == NetworkMode::Cni,
            conf_dir: args
                .cni_conf_dir
                .or(file.cni_conf_dir)
                .unwrap_or_else(|| "/etc/cni/net.d".into()),
            bin_dirs: args
                .cni_bin_dir
                .or(file.cni_bin_dir)
                .unwrap_or_else(|| vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()]),
            plugin_timeout: std::time::Duration::from_secs(
                args.cni_plugin_timeout
                    .or(file.cni_plugin_timeout)
                    .unwrap_or(60),
            ),
            netns_dir: args
                .netns_dir
                .or(file.netns_dir)
                .unwrap_or_else(|| "/run/frakti/netns".into()),
        },
    };
    anyhow::ensure!(
        runtime.network.plugin_timeout > std::time::Duration::ZERO,
        "cni-plugin-timeout must be at least 1 (second)"
    );
    anyhow::ensure!(runtime.sizing.cpus > 0, "default-cpus must be at least 1");
    anyhow::ensure!(
        runtime.sizing.memory_mib >= 32,
        "default-memory must be at least 32 (MiB)"
    );
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
    let streaming_tls = match (
        args.streaming_tls_cert.or(file.streaming_tls_cert),
        args.streaming_tls_key.or(file.streaming_tls_key),
    ) {
        (Some(cert), Some(key)) => Some(frakti_cri::streaming::TlsFiles { cert, key }),
        (None, None) => None,
        _ => anyhow::bail!("streaming-tls-cert and streaming-tls-key go together"),
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    Ok((
        daemon::Options {
            listen,
            state_dir,
            store,
            runtime,
            socket_group: args.socket_group.or(file.socket_group),
            streaming_tls,
        },
        log,
    ))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let endpoint = cli.endpoint;
    let ok = |()| ExitCode::SUCCESS;
    match cli.command {
        Command::Daemon(args) => {
            let (options, log) = daemon_options(*args)?;
            init_logs(&log)?;
            daemon::run(options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Image(command) => cli_image::run(&endpoint, command).await.map(ok),
        Command::Volume { root, command } => {
            cli_volume::run(&root, &endpoint, command).await.map(ok)
        }
        Command::Pull { image } => {
            let mut clients = cli::Clients::connect(&endpoint).await?;
            cli_image::pull(&mut clients.images_admin, &image, true)
                .await
                .map(ok)
        }
        Command::Images { quiet, format } => {
            let command = cli_image::ImageCommand::List {
                quiet,
                format: format!("{format:?}").to_lowercase(),
            };
            cli_image::run(&endpoint, command).await.map(ok)
        }
        Command::Rmi { images } => {
            let command = cli_image::ImageCommand::Rm { images };
            cli_image::run(&endpoint, command).await.map(ok)
        }
        Command::Completion { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "frakti", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        command => {
            let mut clients = cli::Clients::connect(&endpoint).await?;
            container_command(&mut clients, command).await
        }
    }
}

/// The container commands; `run` and `exec` exit with the container's code.
async fn container_command(
    clients: &mut cli::Clients,
    command: Command,
) -> anyhow::Result<ExitCode> {
    use cli::containers;
    let code = match command {
        Command::Run(args) => cli::run::run(clients, *args).await?,
        Command::Exec {
            interactive,
            tty,
            container,
            command,
        } => cli::exec::exec(clients, &container, command, interactive, tty).await?,
        Command::Ps {
            all,
            quiet,
            pods,
            format,
        } => containers::ps(clients, all, quiet, pods, format)
            .await
            .map(|()| 0)?,
        Command::Logs {
            follow,
            tail,
            timestamps,
            container,
        } => {
            let options = cli::logs::Options {
                follow,
                tail,
                timestamps,
            };
            cli::logs::show(clients, &container, &options)
                .await
                .map(|()| 0)?
        }
        Command::Stop { time, containers } => containers::stop(clients, &containers, time)
            .await
            .map(|()| 0)?,
        Command::Rm {
            force,
            root,
            containers,
        } => containers::rm(clients, &containers, force, &root)
            .await
            .map(|()| 0)?,
        Command::Inspect { container } => {
            containers::inspect(clients, &container).await.map(|()| 0)?
        }
        Command::Stats { no_stream, format } => containers::stats(clients, no_stream, format)
            .await
            .map(|()| 0)?,
        _ => anyhow::bail!("not a container command"),
    };
    // Exit codes are 0-255; a signal's 128+n fits.
    Ok(ExitCode::from((code & 0xff) as u8))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, as every other error: clap's first, without its prefix.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("frakti: error: {first} (see frakti --help)");
            return ExitCode::from(2);
        }
    };
    // `run` and `exec` fail with 125, as docker's do, so their own codes stay theirs.
    let failure = match cli.command {
        Command::Run(_) | Command::Exec { .. } => ExitCode::from(125),
        _ => ExitCode::FAILURE,
    };
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
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("frakti: error: {}", frakti_cri::error_chain(e.as_ref()));
            failure
        }
    };
    // A read of stdin may still block a thread: do not wait for it.
    runtime.shutdown_background();
    code
}

/// Paths sent to the daemon are absolute: it resolves them on the node.
pub(crate) fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(std::path::absolute(path)?)
}
