//! `frakti run`: one pod VM, one container, as `docker run` behaves: the
//! image pulled if missing, stdio attached, signals forwarded, the exit
//! code ours, `--rm` leaving nothing behind.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use frakti_cri::sandbox::vmm::ANNOTATION_KERNEL;
use frakti_proto::containers::v1 as admin;
use k8s_cri::v1 as cri;
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::attach::{self, Ended};
use super::terminal::{self, RawMode};
use super::{
    CLI_LABEL, CLI_NAMESPACE, Clients, has_exited, logs, run_spec, status_error, status_of,
};

/// Where the pods of `frakti run` keep their logs.
const LOG_ROOT: &str = "/var/log/frakti";

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    frakti run --rm busybox echo hello\n  \
    frakti run -it --rm busybox sh\n  \
    echo hi | frakti run -i --rm busybox cat\n  \
    frakti run -d --name web --memory 256m -p 8080:80 nginx")]
pub struct RunArgs {
    /// The container's name (also the VM's hostname) [default: IMAGE-<random>].
    #[arg(long)]
    pub name: Option<String>,
    /// Run in the background and print the container's id.
    #[arg(short, long)]
    pub detach: bool,
    /// Remove the container and its VM when it exits (also after Ctrl-C).
    #[arg(long)]
    pub rm: bool,
    /// Keep stdin open and send it to the container.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the container a terminal (with -i: yours, in raw mode; Ctrl-P Ctrl-Q detaches).
    #[arg(short, long)]
    pub tty: bool,
    /// Environment variable NAME=VALUE (NAME alone passes yours on); repeatable.
    #[arg(short, long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// User to run as: UID[:GID] or NAME[:GID].
    #[arg(short, long)]
    pub user: Option<String>,
    /// CPUs for the container (e.g. 0.5, 2); the VM gets as many vCPUs as this rounds up to.
    #[arg(long)]
    pub cpus: Option<String>,
    /// Memory limit (e.g. 256m, 1g); the VM is sized for it.
    #[arg(short, long)]
    pub memory: Option<String>,
    /// Bind a host path: HOST:CONTAINER[:ro]; repeatable.
    #[arg(short, long = "volume", value_name = "HOST:CONTAINER[:ro]")]
    pub volume: Vec<String>,
    /// Give a host device to the container: DEVICE[:CONTAINER[:rwm]]; repeatable.
    #[arg(long = "device", value_name = "DEVICE[:CONTAINER[:rwm]]")]
    pub device: Vec<String>,
    /// Give a block device (or filesystem image) to the VM and mount its filesystem in the
    /// container: DEVICE:CONTAINER[:ext4|ext3|ext2|xfs]; repeatable. The host never mounts it.
    #[arg(long = "volume-device", value_name = "DEVICE:CONTAINER[:FSTYPE]")]
    pub volume_device: Vec<String>,
    /// Boot the VM with this kernel: a file name in the daemon's --kernels-dir.
    #[arg(long, value_name = "NAME")]
    pub kernel: Option<String>,
    /// The daemon's state dir (its --root), where --volume-device registers the devices.
    #[arg(long, default_value = super::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Publish a port: [IP:]HOSTPORT:PORT[/tcp|udp|sctp]; repeatable (needs the CNI portmap plugin).
    #[arg(short, long = "publish", value_name = "[IP:]HOSTPORT:PORT")]
    pub publish: Vec<String>,
    /// The image (pulled if missing).
    pub image: String,
    /// The command and its arguments (replacing the image's CMD; its ENTRYPOINT stays).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Runs the container; returns the exit code `frakti run` exits with.
pub async fn run(clients: &mut Clients, args: RunArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        !(args.rm && args.detach),
        "--rm with -d is not supported: remove it with `frakti rm -f` once done"
    );
    anyhow::ensure!(
        !(args.interactive && args.tty) || terminal::stdin_is_terminal(),
        "-it needs a terminal on stdin (drop -t to pipe input)"
    );
    let random = random_hex();
    let name = match &args.name {
        Some(name) => name.clone(),
        None => run_spec::generated_name(&args.image, &random),
    };
    anyhow::ensure!(
        run_spec::valid_name(&name),
        "--name {name:?}: 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"
    );
    let (pod_config, mut container_config) = configs(&args, &name, &random)?;
    ensure_image(clients, &args.image).await?;
    // Registered under the pod's uid; unregistered with the pod.
    let volumes = super::volumes::register(&args.root, &random, &args.volume_device)?;
    container_config.mounts.extend(volumes);

    let pod_id = clients
        .runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map_err(status_error)
        .context("starting the container's VM");
    let pod_id = match pod_id {
        Ok(response) => response.into_inner().pod_sandbox_id,
        Err(e) => {
            super::volumes::unregister(&args.root, &random);
            return Err(e);
        }
    };
    let result = create_and_run(clients, &args, &pod_id, pod_config, container_config).await;
    let remove = args.rm || result.is_err();
    if remove && !matches!(result, Ok(Outcome::Detached)) {
        if let Err(e) = super::containers::remove_pod(clients, &pod_id).await {
            eprintln!("frakti: error: removing the container's VM: {e:#}");
        }
        super::volumes::unregister(&args.root, &random);
    }
    match result? {
        Outcome::Exited(code) => Ok(code),
        Outcome::Detached => Ok(0),
    }
}

enum Outcome {
    Exited(i32),
    /// Running on (-d, or detached from the terminal).
    Detached,
}

async fn create_and_run(
    clients: &mut Clients,
    args: &RunArgs,
    pod_id: &str,
    pod_config: cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> anyhow::Result<Outcome> {
    let id = clients
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config),
            sandbox_config: Some(pod_config),
        })
        .await
        .map_err(status_error)
        .context("creating the container")?
        .into_inner()
        .container_id;
    if args.detach {
        start(clients, &id).await?;
        println!("{id}");
        return Ok(Outcome::Detached);
    }
    // Listening before the container starts: a Ctrl-C right after its
    // first output must reach it, not kill us (and leave a --rm pod).
    let signals = listen_for_signals();
    if args.tty {
        return run_with_terminal(clients, args, &id, signals).await;
    }
    start(clients, &id).await?;
    run_piped(clients, args, &id, signals).await
}

async fn start(clients: &mut Clients, id: &str) -> anyhow::Result<()> {
    clients
        .runtime
        .start_container(cri::StartContainerRequest {
            container_id: id.to_string(),
        })
        .await
        .map_err(status_error)
        .context("starting the container")?;
    Ok(())
}

/// `-t`: attached before it starts (so nothing of its output is missed),
/// our terminal raw while it runs.
async fn run_with_terminal(
    clients: &mut Clients,
    args: &RunArgs,
    id: &str,
    signals: Vec<(Signal, i32)>,
) -> anyhow::Result<Outcome> {
    let request = cri::AttachRequest {
        container_id: id.to_string(),
        stdin: args.interactive,
        tty: true,
        stdout: true,
        stderr: false,
    };
    let ws = attach_to(clients, request).await?;
    start(clients, id).await?;
    // Raw mode makes no SIGINT of Ctrl-C; SIGTERM and SIGHUP still come.
    let signals = tokio::spawn(forward_signals(clients.clone(), id.to_string(), signals));
    let raw = if args.interactive {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let options = attach::Options {
        stdin: args.interactive,
        tty: true,
    };
    let ended = attach::run(ws, options).await;
    drop(raw);
    signals.abort();
    if ended? == Ended::Detached {
        eprintln!("frakti: detached from {}; it goes on", super::short_id(id));
        return Ok(Outcome::Detached);
    }
    Ok(Outcome::Exited(wait_exit(clients, id).await?))
}

/// Attach, then its session's WebSocket.
async fn attach_to(
    clients: &mut Clients,
    request: cri::AttachRequest,
) -> anyhow::Result<attach::Ws> {
    let url = clients
        .runtime
        .attach(request)
        .await
        .map_err(status_error)?
        .into_inner()
        .url;
    attach::connect(&url).await
}

/// Without a terminal: its stdout and stderr from its log (complete and
/// separate), our stdin attached with `-i`, our signals forwarded (a
/// second Ctrl-C kills it).
async fn run_piped(
    clients: &mut Clients,
    args: &RunArgs,
    id: &str,
    signals: Vec<(Signal, i32)>,
) -> anyhow::Result<Outcome> {
    let status = status_of(clients, id).await?;
    let stdin_task = if args.interactive {
        let request = cri::AttachRequest {
            container_id: id.to_string(),
            stdin: true,
            ..Default::default()
        };
        let ws = attach_to(clients, request).await?;
        let options = attach::Options {
            stdin: true,
            tty: false,
        };
        Some(tokio::spawn(attach::run(ws, options)))
    } else {
        None
    };
    let signals = tokio::spawn(forward_signals(clients.clone(), id.to_string(), signals));
    let options = logs::Options {
        follow: true,
        ..Default::default()
    };
    let mut poller = clients.clone();
    let copied = logs::copy(
        std::path::Path::new(&status.log_path),
        &options,
        async || {
            status_of(&mut poller, id)
                .await
                .map_or(true, |s| has_exited(&s))
        },
    )
    .await;
    signals.abort();
    if let Some(task) = stdin_task {
        task.abort();
    }
    copied?;
    Ok(Outcome::Exited(wait_exit(clients, id).await?))
}

/// Our handlers for SIGINT, SIGTERM, SIGHUP and SIGQUIT, installed now
/// (from then on these signals no longer end the process).
fn listen_for_signals() -> Vec<(Signal, i32)> {
    [
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
        (SignalKind::quit(), libc::SIGQUIT),
    ]
    .into_iter()
    .filter_map(|(kind, number)| signal(kind).ok().map(|stream| (stream, number)))
    .collect()
}

/// The signals of [`listen_for_signals`] go to the container; the second
/// SIGINT stops it (SIGKILL at once), as an impatient user means.
async fn forward_signals(mut clients: Clients, id: String, signals: Vec<(Signal, i32)>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<i32>(8);
    for (mut stream, number) in signals {
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(number).await.is_err() {
                    return;
                }
            }
        });
    }
    let mut interrupts = 0;
    while let Some(number) = rx.recv().await {
        if number == libc::SIGINT {
            interrupts += 1;
        }
        if interrupts >= 2 {
            eprintln!("frakti: killing the container");
            let _ = clients
                .runtime
                .stop_container(cri::StopContainerRequest {
                    container_id: id.clone(),
                    timeout: 0,
                })
                .await;
            continue;
        }
        let request = admin::SignalRequest {
            container_id: id.clone(),
            signal: number,
        };
        if let Err(e) = clients.containers.signal(request).await {
            eprintln!("frakti: error: forwarding signal {number}: {}", e.message());
        }
    }
}

/// The exit code, once the daemon has recorded the exit.
async fn wait_exit(clients: &mut Clients, id: &str) -> anyhow::Result<i32> {
    loop {
        let status = status_of(clients, id).await?;
        if has_exited(&status) {
            return Ok(status.exit_code);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pulls the image (progress on stderr) unless the store has it.
async fn ensure_image(clients: &mut Clients, image: &str) -> anyhow::Result<()> {
    let present = clients
        .images
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .image
        .is_some();
    if !present {
        eprintln!("frakti: {image} is not here: pulling it");
        crate::cli_image::pull(&mut clients.images_admin, image, false).await?;
    }
    Ok(())
}

/// The pod (VM) and the container `args` ask for.
fn configs(
    args: &RunArgs,
    name: &str,
    random: &str,
) -> anyhow::Result<(cri::PodSandboxConfig, cri::ContainerConfig)> {
    let mut resources = cri::LinuxContainerResources::default();
    if let Some(cpus) = &args.cpus {
        let (period, quota) = run_spec::cpu_quota(cpus)?;
        resources.cpu_period = period;
        resources.cpu_quota = quota;
    }
    if let Some(memory) = &args.memory {
        resources.memory_limit_in_bytes = run_spec::memory_bytes(memory)?;
    }
    let mut security = cri::LinuxContainerSecurityContext::default();
    if let Some(user) = &args.user {
        run_spec::user(user, &mut security)?;
    }
    let cwd = std::env::current_dir().context("the current directory")?;
    let mounts = args
        .volume
        .iter()
        .map(|v| run_spec::volume(v, &cwd))
        .collect::<Result<Vec<_>, _>>()?;
    let devices = args
        .device
        .iter()
        .map(|d| run_spec::device(d))
        .collect::<Result<Vec<_>, _>>()?;
    let port_mappings = args
        .publish
        .iter()
        .map(|p| run_spec::port(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut envs = Vec::new();
    for e in &args.env {
        envs.extend(run_spec::env(e, |k| std::env::var(k).ok())?);
    }
    let uid = random.to_string();
    let labels = HashMap::from([(CLI_LABEL.to_string(), "1".to_string())]);
    let annotations = args
        .kernel
        .iter()
        .map(|k| (ANNOTATION_KERNEL.to_string(), k.clone()))
        .collect();
    let pod = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.clone(),
            namespace: CLI_NAMESPACE.to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: format!("{LOG_ROOT}/{name}_{uid}"),
        dns_config: host_dns(),
        port_mappings,
        labels: labels.clone(),
        annotations,
        linux: Some(cri::LinuxPodSandboxConfig {
            resources: Some(resources.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let container = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: args.image.clone(),
            user_specified_image: args.image.clone(),
            ..Default::default()
        }),
        args: args.command.clone(),
        working_dir: args.workdir.clone().unwrap_or_default(),
        envs,
        mounts,
        devices,
        labels,
        log_path: format!("{name}.log"),
        stdin: args.interactive,
        stdin_once: args.interactive,
        tty: args.tty,
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(resources),
            security_context: Some(security),
        }),
        ..Default::default()
    };
    Ok((pod, container))
}

/// The host's DNS settings for the VM (without loopback resolvers); none
/// when that leaves no nameserver (the image's resolv.conf stays).
fn host_dns() -> Option<cri::DnsConfig> {
    let text = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    Some(run_spec::dns_from_resolv_conf(&text)).filter(|dns| !dns.servers.is_empty())
}

/// 32 random hex digits (the pod's uid; names take the first 6).
fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // No /dev/urandom: the time and pid still make it unique enough.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes[..8].copy_from_slice(&(nanos as u64).to_le_bytes());
        bytes[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
