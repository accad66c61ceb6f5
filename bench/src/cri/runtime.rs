//! What the benchmark does through the CRI, the same code for both
//! runtimes: start a pod with one container (timed), remove it, measure the
//! memory its processes hold; and the `frakti daemon` it runs.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use frakti_lab::process::ChildGuard;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use super::network;
use super::prepare::{self, env_path};

pub type Client = RuntimeServiceClient<Channel>;

const START_TIMEOUT: Duration = Duration::from_secs(60);
/// From StartContainer's answer to ContainerStatus saying RUNNING.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);

/// How a [`Frakti`] daemon networks its pods.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Networking {
    /// The bench's CNI configuration ([`network::bridge_config`], frakti's
    /// range of the bridge both runtimes share) and plugins, in its dir.
    Cni,
    /// `--network none`: pods get a loopback only.
    None,
}

/// A `frakti daemon` on a root holding the prepared image store.
pub struct Frakti {
    dir: PathBuf,
    daemon: ChildGuard,
}

impl Frakti {
    pub async fn start(dir: &Path, networking: Networking) -> anyhow::Result<Frakti> {
        let images = dir.join("r/images");
        fs::create_dir_all(&images)?;
        fs::create_dir_all(dir.join("logs"))?;
        let status = Command::new("tar")
            .arg("-C")
            .arg(&images)
            .arg("-xf")
            .arg(env_path(prepare::STORE_ENV)?)
            .status()
            .context("cannot run tar")?;
        ensure!(
            status.success(),
            "untar of frakti's image store failed ({status})"
        );
        let log = dir.join("daemon.log");
        let mut command = Command::new(env_path(prepare::FRAKTI_ENV)?);
        command
            .arg("daemon")
            .arg("--listen")
            .arg(dir.join("frakti.sock"))
            .arg("--root")
            .arg(dir.join("r"))
            .arg("--kernel")
            .arg(env_path(frakti_lab::guest::KERNEL_ENV)?)
            .arg("--initrd")
            .arg(env_path(frakti_lab::guest::INITRD_ENV)?)
            .arg("--vmm")
            .arg(env_path(frakti_lab::guest::VMM_ENV)?)
            .args(["--log-level", "info"]);
        match networking {
            Networking::Cni => {
                let (conf, bin) = (dir.join("cni-conf"), dir.join("cni-bin"));
                network::link_plugins(&bin)?;
                fs::create_dir_all(&conf)?;
                fs::write(
                    conf.join("10-bench.conflist"),
                    network::bridge_config(&dir.join("cni-ipam"), network::FRAKTI_RANGE),
                )?;
                command
                    .args(["--network", "cni", "--cni-conf-dir"])
                    .arg(&conf)
                    .arg("--cni-bin-dir")
                    .arg(&bin)
                    .arg("--netns-dir")
                    .arg(dir.join("netns"));
            }
            Networking::None => {
                command.args(["--network", "none"]);
            }
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        let mut daemon = ChildGuard::spawn(&mut command).context("starting frakti daemon")?;
        wait_until_serving(&mut daemon, &dir.join("frakti.sock"), &log).await?;
        Ok(Frakti {
            dir: dir.to_path_buf(),
            daemon,
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("frakti.sock")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Its `--root` (state dir).
    pub fn root(&self) -> PathBuf {
        self.dir.join("r")
    }

    pub fn pid(&self) -> u32 {
        self.daemon.id()
    }
}

impl Drop for Frakti {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        // Pod VMs outlive the daemon; theirs name its root.
        kill_processes_naming(&self.dir.join("r"));
        frakti_bench::unmount_under(&self.dir);
    }
}

pub async fn connect(socket: &Path) -> anyhow::Result<Client> {
    Ok(RuntimeServiceClient::new(
        frakti_cri::client::connect(socket).await?,
    ))
}

/// Waits until the daemon answers CRI Version on `socket`.
pub async fn wait_until_serving(
    daemon: &mut ChildGuard,
    socket: &Path,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if UnixStream::connect(socket).is_ok() {
            if let Ok(mut client) = connect(socket).await {
                if client.version(cri::VersionRequest::default()).await.is_ok() {
                    return Ok(());
                }
            }
        }
        if let Some(status) = daemon.try_wait()? {
            bail!("the daemon exited ({status}):\n{}", log_tail(log, 40));
        }
        ensure!(
            Instant::now() < deadline,
            "no CRI on {} within {START_TIMEOUT:?}:\n{}",
            socket.display(),
            log_tail(log, 40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `n` lines of a log.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A pod started and timed.
pub struct Pod {
    pub id: String,
    pub container: String,
    /// From RunPodSandbox to the container RUNNING.
    pub secs: f64,
    /// RunPodSandbox alone.
    pub sandbox_secs: f64,
}

pub fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    let uid = format!("uid-{name}");
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: uid.clone(),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.to_string_lossy().into_owned(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["bench.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: [("app".to_string(), name.to_string())].into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            // kubelet's, with its cgroupfs driver.
            cgroup_parent: format!("/kubepods/besteffort/pod{uid}"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container `name` of `image` running `command`, logging to `<name>.log`.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|a| a.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// RunPodSandbox → CreateContainer → StartContainer → ContainerStatus
/// RUNNING, timed from the first call to the RUNNING answer. The pod's log
/// directory is made before (kubelet makes it).
pub async fn start_pod(client: &mut Client, name: &str, logs: &Path) -> anyhow::Result<Pod> {
    let log_dir = logs.join(name);
    fs::create_dir_all(&log_dir)?;
    let config = pod_config(name, &log_dir);
    let started = Instant::now();
    let id = client
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .with_context(|| format!("RunPodSandbox {name}"))?
        .into_inner()
        .pod_sandbox_id;
    let sandbox_secs = started.elapsed().as_secs_f64();
    let container = client
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: id.clone(),
            config: Some(container_config("main", prepare::IMAGE, &["sleep", "3600"])),
            sandbox_config: Some(config),
        })
        .await
        .with_context(|| format!("CreateContainer in {name}"))?
        .into_inner()
        .container_id;
    client
        .start_container(cri::StartContainerRequest {
            container_id: container.clone(),
        })
        .await
        .with_context(|| format!("StartContainer in {name}"))?;
    let running = Instant::now();
    loop {
        let state = container_status(client, &container, false).await?.0.state;
        if state == cri::ContainerState::ContainerRunning as i32 {
            break;
        }
        ensure!(
            state != cri::ContainerState::ContainerExited as i32,
            "the container of {name} exited instead of running"
        );
        ensure!(
            running.elapsed() < RUNNING_TIMEOUT,
            "the container of {name} is not RUNNING {RUNNING_TIMEOUT:?} after StartContainer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(Pod {
        id,
        container,
        secs: started.elapsed().as_secs_f64(),
        sandbox_secs,
    })
}

/// Creates and starts a second container, `config`, in `pod` (started as
/// `name` with `logs`, as [`start_pod`] did); its id.
pub async fn add_container(
    client: &mut Client,
    pod: &Pod,
    name: &str,
    logs: &Path,
    config: cri::ContainerConfig,
) -> anyhow::Result<String> {
    let container = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = client
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod_config(name, &logs.join(name))),
        })
        .await
        .with_context(|| format!("CreateContainer {container} in {name}"))?
        .into_inner()
        .container_id;
    client
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .with_context(|| format!("StartContainer {container} in {name}"))?;
    Ok(id)
}

/// The pod's IPv4 address (PodSandboxStatus `network.ip`).
pub async fn pod_ip(client: &mut Client, id: &str) -> anyhow::Result<String> {
    let ip = client
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        })
        .await
        .context("PodSandboxStatus")?
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    ensure!(!ip.is_empty(), "PodSandboxStatus of {id} shows no pod IP");
    Ok(ip)
}

/// StopContainer (no grace), StopPodSandbox, RemovePodSandbox.
pub async fn remove_pod(client: &mut Client, pod: &Pod) -> anyhow::Result<()> {
    client
        .stop_container(cri::StopContainerRequest {
            container_id: pod.container.clone(),
            timeout: 0,
        })
        .await
        .context("StopContainer")?;
    client
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .context("StopPodSandbox")?;
    client
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .context("RemovePodSandbox")?;
    Ok(())
}

/// Pods the runtime still lists.
pub async fn pods_left(client: &mut Client) -> anyhow::Result<usize> {
    Ok(client
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .context("ListPodSandbox")?
        .into_inner()
        .items
        .len())
}

/// The status and the verbose `info["info"]` JSON (null without one).
async fn container_status(
    client: &mut Client,
    id: &str,
    verbose: bool,
) -> anyhow::Result<(cri::ContainerStatus, serde_json::Value)> {
    let answer = client
        .container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose,
        })
        .await
        .context("ContainerStatus")?
        .into_inner();
    let status = answer
        .status
        .ok_or_else(|| anyhow!("ContainerStatus without a status"))?;
    Ok((status, info_json(&answer.info)?))
}

async fn pod_info(client: &mut Client, id: &str) -> anyhow::Result<serde_json::Value> {
    let answer = client
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await
        .context("PodSandboxStatus")?
        .into_inner();
    info_json(&answer.info)
}

fn info_json(
    info: &std::collections::HashMap<String, String>,
) -> anyhow::Result<serde_json::Value> {
    match info.get("info") {
        Some(text) => serde_json::from_str(text).context("verbose info is not JSON"),
        None => Ok(serde_json::Value::Null),
    }
}

/// A pid field of verbose info.
fn pid_field(info: &serde_json::Value, field: &str, what: &str) -> anyhow::Result<u32> {
    info.get(field)
        .and_then(serde_json::Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| anyhow!("{what}: verbose info has no {field}: {info}"))
}

/// Memory of the running pods, in KiB per pod (means over the pods).
pub struct Memory {
    /// RSS of the pod's own processes (and guest RAM), by part.
    pub parts: Vec<(&'static str, f64)>,
    /// PSS of the pod's own processes: pages shared between processes
    /// (binaries' text, the busybox file) split among them.
    pub pss: f64,
    /// The daemon's RSS divided by the pods running.
    pub daemon_share: f64,
}

impl Memory {
    pub fn per_pod(&self) -> f64 {
        self.parts.iter().map(|(_, kib)| kib).sum()
    }
}

/// frakti: each pod's VMM RSS outside guest RAM (guest RAM: the mappings
/// at least 90% of the VM's memory size) and guest RAM resident, from
/// /proc/<vmm pid>/smaps; the daemon's RSS / pods.
pub async fn frakti_memory(
    client: &mut Client,
    pods: &[Pod],
    daemon: u32,
) -> anyhow::Result<Memory> {
    let (mut own, mut guest, mut pss) = (0.0, 0.0, 0.0);
    for pod in pods {
        let info = pod_info(client, &pod.id).await?;
        let pid = pid_field(&info, "vmm_pid", "frakti pod")?;
        let memory_mib = info
            .pointer("/vm/memory_mib")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| anyhow!("frakti pod: verbose info has no vm.memory_mib: {info}"))?;
        let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))
            .with_context(|| format!("reading the smaps of frakti-vmm {pid}"))?;
        let is_guest = |size_kib: u64| size_kib >= memory_mib * 1024 * 9 / 10;
        ensure!(
            sum_smaps(&smaps, "Size:", |size| !is_guest(size)) > 0,
            "frakti-vmm {pid} has no mapping of its {memory_mib} MiB guest RAM"
        );
        let outside = sum_smaps(&smaps, "Rss:", is_guest);
        let total = sum_smaps(&smaps, "Rss:", |_| false);
        eprintln!(
            "bench: frakti pod {}: frakti-vmm {pid} ({memory_mib} MiB VM): Rss KiB {total}, \
             outside guest RAM {outside}",
            short(&pod.id)
        );
        own += outside as f64;
        guest += total.saturating_sub(outside) as f64;
        pss += sum_smaps(&smaps, "Pss:", |_| false) as f64;
    }
    let n = pods.len().max(1) as f64;
    Ok(Memory {
        parts: vec![
            ("frakti-vmm outside guest RAM", own / n),
            ("guest RAM resident", guest / n),
        ],
        pss: pss / n,
        daemon_share: rollup(daemon)?.0 as f64 / n,
    })
}

/// containerd: each pod's shim, pause and container processes (RSS);
/// containerd's RSS / pods.
pub async fn containerd_memory(
    client: &mut Client,
    pods: &[Pod],
    daemon: u32,
) -> anyhow::Result<Memory> {
    let (mut shim, mut pause, mut main, mut pss) = (0.0, 0.0, 0.0, 0.0);
    for pod in pods {
        let pause_pid = pid_field(
            &pod_info(client, &pod.id).await?,
            "pid",
            "containerd sandbox",
        )?;
        let (_, info) = container_status(client, &pod.container, true).await?;
        let main_pid = pid_field(&info, "pid", "containerd container")?;
        let shim_pid = shim_of(&pod.id)?;
        let m = [rollup(shim_pid)?, rollup(pause_pid)?, rollup(main_pid)?];
        eprintln!(
            "bench: containerd pod {}: Rss/Pss KiB shim {shim_pid}: {}/{}, pause {pause_pid}: \
             {}/{}, container {main_pid}: {}/{}",
            short(&pod.id),
            m[0].0,
            m[0].1,
            m[1].0,
            m[1].1,
            m[2].0,
            m[2].1
        );
        shim += m[0].0 as f64;
        pause += m[1].0 as f64;
        main += m[2].0 as f64;
        pss += m.iter().map(|(_, p)| *p as f64).sum::<f64>();
    }
    let n = pods.len().max(1) as f64;
    Ok(Memory {
        parts: vec![
            ("containerd-shim-runc-v2", shim / n),
            ("pause (busybox sleep)", pause / n),
            ("container (sleep 3600)", main / n),
        ],
        pss: pss / n,
        daemon_share: rollup(daemon)?.0 as f64 / n,
    })
}

/// Sums `field` ("Rss:", "Pss:", …) of a smaps file over the mappings
/// for which `skip(mapping size in KiB)` is false. (Each mapping's `Size:`
/// line comes before its other fields.)
fn sum_smaps(smaps: &str, field: &str, skip: impl Fn(u64) -> bool) -> u64 {
    let kib = |v: &str| {
        v.split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (mut total, mut size) = (0, 0);
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size = kib(v);
        }
        if let Some(v) = line.strip_prefix(field) {
            if !skip(size) {
                total += kib(v);
            }
        }
    }
    total
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The containerd-shim-runc-v2 serving sandbox `id` (`… -id <id> …`).
fn shim_of(id: &str) -> anyhow::Result<u32> {
    for (pid, args) in processes() {
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with("containerd-shim-runc-v2"));
        if is_shim && args.windows(2).any(|w| w[0] == "-id" && w[1] == id) {
            return Ok(pid);
        }
    }
    bail!("no containerd-shim-runc-v2 process for sandbox {id}")
}

/// Every process but this one, with its arguments.
fn processes() -> Vec<(u32, Vec<String>)> {
    let own = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own)
        .filter_map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some((pid, args))
        })
        .collect()
}

/// (RSS, PSS) of `pid` in KiB, from /proc/PID/smaps_rollup, which walks
/// the page tables. (VmRSS of /proc/PID/status is not used: kernels before
/// 6.2, L1's among them, count it per thread and fold it in every 64 page
/// faults, so a process that faulted little and sleeps shows a few KiB.)
fn rollup(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let rss = sum_smaps(&text, "Rss:", |_| false);
    ensure!(rss > 0, "{path} shows no Rss");
    Ok((rss, sum_smaps(&text, "Pss:", |_| false)))
}

/// SIGKILLs the processes whose command line names `dir` (what a runtime
/// started for the benchmark's root and left behind).
pub fn kill_processes_naming(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    for (pid, args) in processes() {
        if args.iter().any(|a| a.contains(&needle)) {
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: kill(2) with a pid and a signal number.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_fields_are_summed_per_mapping() {
        let smaps = "\
1000-2000 r-xp 0 0:0 0 /vmm
Size:                  4 kB
Rss:                   4 kB
Pss:                   2 kB
Pss_Anon:              9 kB
7f0000000000-7f0008000000 rw-p 0 0:0 0
Size:             131072 kB
Rss:               36864 kB
Pss:               36864 kB
";
        let guest = |size: u64| size >= 128 * 1024 * 9 / 10;
        assert_eq!(sum_smaps(smaps, "Rss:", guest), 4);
        assert_eq!(sum_smaps(smaps, "Rss:", |_| false), 36868);
        assert_eq!(sum_smaps(smaps, "Pss:", |_| false), 36866);
        assert_eq!(sum_smaps(smaps, "Size:", |s| !guest(s)), 131072);
    }
}
