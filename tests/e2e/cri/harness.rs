//! A `frakti daemon` under test: its root (with the prepared image store),
//! its socket, its log; CRI clients; and the leak check that runs when a
//! test is done.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use frakti_cri::image::{ImageStore, StoreConfig};
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use crate::support::images;
use crate::support::registry::Registry;

/// The tarred image store the host prepared, and the frakti binary.
pub const STORE_ENV: &str = "FRAKTI_TEST_CRI_STORE";
pub const FRAKTI_ENV: &str = "FRAKTI_BIN";
/// The image every test runs (busybox with /etc/passwd and /etc/group).
pub const IMAGE: &str = "frakti.test/busybox:latest";
/// The same image pulled by this name through a mirror of registry.k8s.io
/// (a plain-http registry on 127.0.0.1, containerd's hosts.toml).
pub const MIRRORED_IMAGE: &str = "registry.k8s.io/e2e-test-images/busybox:1.29-2";

pub type Runtime = RuntimeServiceClient<Channel>;

/// Imports the busybox test image into an image store on the host and
/// tars the store; returns `(env var, file)` pairs for the lab.
pub fn prepare(dir: &Path) -> anyhow::Result<Vec<(&'static str, PathBuf)>> {
    let built = images::busybox_image(&dir.join("layouts"));
    let store_root = dir.join("cri-store");
    // The mirror lives while the store pulls from it.
    let mirror = Registry::start(&dir.join("mirror"), Default::default());
    images::push(
        &built,
        &mirror,
        "e2e-test-images/busybox:1.29-2",
        &images::PushOptions::default(),
    );
    let certs = dir.join("certs.d");
    std::fs::create_dir_all(certs.join("registry.k8s.io"))?;
    std::fs::write(
        certs.join("registry.k8s.io/hosts.toml"),
        format!(
            "server = \"https://registry.k8s.io\"\n[host.\"http://{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
            mirror.host()
        ),
    )?;
    let mut config = StoreConfig::new(&store_root);
    config.certs_dir = certs;
    let store = ImageStore::open(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        store
            .import(&built.layout, Some("frakti.test/busybox"))
            .await?;
        store.pull(MIRRORED_IMAGE, None).await
    })?;
    drop(store);
    drop(mirror);
    let tar = dir.join("cri-store.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&store_root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()?;
    ensure!(status.success(), "tar of the image store failed");
    let frakti = frakti_binary()?;
    Ok(vec![(STORE_ENV, tar), (FRAKTI_ENV, frakti)])
}

/// `frakti` as `make e2e` builds it: FRAKTI_BIN, else beside this test
/// binary's directory (target/<profile>/frakti).
fn frakti_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(FRAKTI_ENV) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("frakti"))
        .ok_or_else(|| anyhow!("no directory above {}", exe.display()))?;
    ensure!(
        candidate.exists(),
        "{} is missing: run `cargo build -p frakti-cri --bin frakti` (make e2e does)",
        candidate.display()
    );
    Ok(candidate)
}

fn env_path(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("{name} is not set (the e2e main sets it)"))
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl Daemon {
    /// A daemon on a fresh root holding the prepared image store.
    pub async fn start(extra: &[&str]) -> anyhow::Result<Daemon> {
        // Short: pod sockets live below the root.
        let dir = tempfile::Builder::new().prefix("c").tempdir_in("/tmp")?;
        let images = dir.path().join("r/images");
        std::fs::create_dir_all(&images)?;
        let status = Command::new("tar")
            .arg("-C")
            .arg(&images)
            .arg("-xf")
            .arg(env_path(STORE_ENV)?)
            .status()?;
        ensure!(status.success(), "untar of the image store failed");
        std::fs::create_dir_all(dir.path().join("logs"))?;
        let mut daemon = Daemon {
            child: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        daemon.spawn().await?;
        Ok(daemon)
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("r")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("frakti.sock")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// (Re)starts the daemon process on the same root.
    pub async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))?;
        let child = Command::new(env_path(FRAKTI_ENV)?)
            .env("PATH", self.tool_path()?)
            .arg("daemon")
            .arg("--listen")
            .arg(self.socket())
            .arg("--root")
            .arg(self.root())
            .arg("--kernel")
            .arg(env_path(frakti_lab::guest::KERNEL_ENV)?)
            .arg("--initrd")
            .arg(env_path(frakti_lab::guest::INITRD_ENV)?)
            .arg("--vmm")
            .arg(env_path(frakti_lab::guest::VMM_ENV)?)
            .args(["--log-level", "debug"])
            .args(self.extra_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start frakti daemon")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut client) = self.runtime().await {
                if client.version(cri::VersionRequest::default()).await.is_ok() {
                    return Ok(());
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("the daemon exited ({status}):\n{}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "the daemon does not serve:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The test's own flags, `{dir}` standing for the daemon's directory.
    /// Pods get a loopback only unless the test gives a CNI configuration.
    fn extra_args(&self) -> Vec<String> {
        let dir = self.dir.path().to_string_lossy();
        let mut args: Vec<String> = self
            .extra
            .iter()
            .map(|a| a.replace("{dir}", &dir))
            .collect();
        if !args.iter().any(|a| a == "--cni-conf-dir") {
            args.extend(["--network".to_string(), "none".to_string()]);
        }
        args
    }

    /// PATH for the daemon: the lab's mke2fs as `mkfs.ext4` (emptyDir
    /// disks) before the usual directories.
    fn tool_path(&self) -> anyhow::Result<std::ffi::OsString> {
        let bin = self.dir.path().join("bin");
        if let Some(mke2fs) = std::env::var_os(frakti_lab::guest::MKE2FS_ENV) {
            std::fs::create_dir_all(&bin)?;
            let link = bin.join("mkfs.ext4");
            if !link.exists() {
                std::os::unix::fs::symlink(mke2fs, &link)?;
            }
        }
        let mut dirs = vec![bin];
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        Ok(std::env::join_paths(dirs)?)
    }

    pub async fn runtime(&self) -> anyhow::Result<Runtime> {
        Ok(RuntimeServiceClient::new(
            frakti_cri::client::connect(&self.socket()).await?,
        ))
    }

    /// The last lines of the daemon's log (for failure messages).
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// kill -9, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What a hung test's daemon was doing: its processes (state, where
    /// they wait), each pod VM's console tail and the kernel's last words.
    pub fn stuck_report(&self) -> String {
        let mut report = String::from("--- processes naming the root ---\n");
        for pid in pids_naming(&self.root()) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat.rsplit_once(") ").map_or("?", |(_, rest)| &rest[..1]);
            let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
            report.push_str(&format!(
                "{} state {state} wchan {wchan}\n",
                describe_process(pid)
            ));
        }
        if let Ok(entries) = std::fs::read_dir(self.root().join("pods")) {
            for pod in entries.flatten() {
                let console =
                    std::fs::read_to_string(pod.path().join("console.log")).unwrap_or_default();
                report.push_str(&format!(
                    "--- console of pod {} (tail) ---\n{}\n",
                    pod.file_name().to_string_lossy(),
                    last_lines(&console, 15)
                ));
            }
        }
        report.push_str(&format!(
            "--- kernel log (tail) ---\n{}\n",
            last_lines(&kernel_log(), 30)
        ));
        report
    }

    /// What a test must not leave: VMM processes naming our root, pod
    /// directories, mounts below the root.
    pub fn leaks(&self) -> Vec<String> {
        let daemon = self.child.as_ref().map(Child::id);
        let mut leaks: Vec<String> = pids_naming(&self.root())
            .into_iter()
            .filter(|pid| u32::try_from(*pid).ok() != daemon)
            .map(describe_process)
            .collect();
        let pods = self.root().join("pods");
        if let Ok(entries) = std::fs::read_dir(&pods) {
            leaks.extend(
                entries
                    .flatten()
                    .map(|e| format!("pod dir {}", e.path().display())),
            );
        }
        let root = self.root().to_string_lossy().into_owned();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            leaks.extend(
                mounts
                    .lines()
                    .filter(|l| l.contains(&root))
                    .map(|l| format!("mount {l}")),
            );
        }
        leaks
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        // A failed test may leave VMs: kill them so later tests run.
        for pid in pids_naming(&self.root()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The kernel's ring buffer as far as it is kept (/dev/kmsg, read without
/// waiting for new records); empty where it cannot be read.
fn kernel_log() -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut kmsg) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return String::new();
    };
    let mut text = String::new();
    // One record per read; EPIPE when records were overwritten meanwhile,
    // EAGAIN at the end of the buffer.
    let mut record = [0u8; 8192];
    loop {
        let n = match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
            Err(_) => break,
        };
        let record = String::from_utf8_lossy(&record[..n]);
        // "level,seq,usec,flags;message"
        let message = record.split_once(';').map_or(&*record, |(_, m)| m);
        text.push_str(message.lines().next().unwrap_or_default());
        text.push('\n');
    }
    text
}

fn pids_naming(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| u32::try_from(*pid).ok() != Some(own))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Processes running `program` (argv[0]'s file name) whose command line
/// names the daemon's root.
pub fn processes_named(daemon: &Daemon, program: &str) -> Vec<String> {
    pids_naming(&daemon.root())
        .into_iter()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            Path::new(std::ffi::OsStr::from_bytes(argv0)).file_name()
                == Some(std::ffi::OsStr::new(program))
        })
        .map(describe_process)
        .collect()
}

fn describe_process(pid: i32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    format!(
        "process {pid}: {}",
        String::from_utf8_lossy(&cmdline).replace('\0', " ")
    )
}

pub fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.to_string_lossy().into_owned(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: [("app".to_string(), name.to_string())].into(),
        ..Default::default()
    }
}

pub fn container_config(name: &str, command: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: [("container".to_string(), name.to_string())].into(),
        ..Default::default()
    }
}

pub async fn run_pod(
    client: &mut Runtime,
    config: cri::PodSandboxConfig,
) -> anyhow::Result<String> {
    let started = Instant::now();
    let id = client
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    eprintln!(
        "cri: pod {} ready in {:.2} s",
        &id[..12],
        started.elapsed().as_secs_f64()
    );
    Ok(id)
}

pub async fn create(
    client: &mut Runtime,
    pod: &str,
    config: cri::ContainerConfig,
) -> anyhow::Result<String> {
    Ok(client
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: None,
        })
        .await
        .context("CreateContainer")?
        .into_inner()
        .container_id)
}

pub async fn start(client: &mut Runtime, id: &str) -> anyhow::Result<()> {
    client
        .start_container(cri::StartContainerRequest {
            container_id: id.into(),
        })
        .await
        .context("StartContainer")?;
    Ok(())
}

pub async fn status(client: &mut Runtime, id: &str) -> anyhow::Result<cri::ContainerStatus> {
    client
        .container_status(cri::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .context("ContainerStatus")?
        .into_inner()
        .status
        .ok_or_else(|| anyhow!("ContainerStatus without a status"))
}

pub async fn pod_status(
    client: &mut Runtime,
    id: &str,
    verbose: bool,
) -> anyhow::Result<cri::PodSandboxStatusResponse> {
    Ok(client
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose,
        })
        .await
        .context("PodSandboxStatus")?
        .into_inner())
}

/// Polls until the container has exited (or `timeout`).
pub async fn wait_exited(
    client: &mut Runtime,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<cri::ContainerStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = status(client, id).await?;
        if status.state == cri::ContainerState::ContainerExited as i32 {
            return Ok(status);
        }
        ensure!(
            Instant::now() < deadline,
            "container {id} still {:?} after {timeout:?}",
            status.state
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until `path` holds `needle` (or `timeout`); returns the text.
pub async fn wait_for_text(path: &Path, needle: &str, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        ensure!(
            Instant::now() < deadline,
            "{} lacks {needle:?} after {timeout:?}; it holds:\n{text}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn exec(
    client: &mut Runtime,
    id: &str,
    cmd: &[&str],
    timeout_secs: i64,
) -> Result<cri::ExecSyncResponse, tonic::Status> {
    client
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_secs,
        })
        .await
        .map(|r| r.into_inner())
}

/// Runs `body` on a fresh daemon; on failure, appends the daemon's log.
pub fn with_daemon<F>(extra: &'static [&'static str], body: F) -> Result<(), libtest_mimic::Failed>
where
    F: AsyncFnOnce(&mut Daemon) -> anyhow::Result<()>,
{
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut daemon = Daemon::start(extra).await.map_err(|e| format!("{e:#}"))?;
        let result = match tokio::time::timeout(TEST_LIMIT, body(&mut daemon)).await {
            Ok(result) => result,
            Err(_) => Err(anyhow!(
                "the test still ran after {} s (a hang): stopped it\n{}",
                TEST_LIMIT.as_secs(),
                daemon.stuck_report()
            )),
        };
        let log = daemon.log();
        eprintln!("cri: test took {:.1} s", started.elapsed().as_secs_f64());
        result.map_err(|e| format!("{e:#}\n--- daemon log (tail) ---\n{log}").into())
    })
}

/// The longest a daemon test may take (the slowest takes ~140 s in the
/// lab): a hang fails that test with a report instead of running into the
/// lab's timeout, which would lose the rest of the suite.
const TEST_LIMIT: Duration = Duration::from_secs(480);

/// CreateContainer + StartContainer of `command` in `pod`.
pub async fn run_container(
    client: &mut Runtime,
    pod: &str,
    name: &str,
    command: &[&str],
) -> anyhow::Result<String> {
    let id = create(client, pod, container_config(name, command)).await?;
    start(client, &id).await?;
    Ok(id)
}

/// RemovePodSandbox, then nothing of the daemon's may be left.
pub async fn remove_pod_without_leaks(
    daemon: &Daemon,
    client: &mut Runtime,
    pod: &str,
) -> anyhow::Result<()> {
    client
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await
        .context("RemovePodSandbox")?;
    ensure_no_leaks(daemon)
}

/// StopPodSandbox then RemovePodSandbox, as kubelet does.
pub async fn stop_and_remove(client: &mut Runtime, pod: &str) -> anyhow::Result<()> {
    client
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await?;
    client
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.into(),
        })
        .await?;
    Ok(())
}

/// RemovePodSandbox of every pod at once, as kubelet does when a node
/// drains.
pub async fn remove_in_parallel(client: &Runtime, pods: Vec<String>) -> anyhow::Result<()> {
    let mut removals = Vec::new();
    for pod in pods {
        let mut c = client.clone();
        removals.push(tokio::spawn(async move {
            c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await
        }));
    }
    for removal in removals {
        removal.await??;
    }
    Ok(())
}

pub fn ensure_no_leaks(daemon: &Daemon) -> anyhow::Result<()> {
    let leaks = daemon.leaks();
    ensure!(leaks.is_empty(), "left behind: {leaks:#?}");
    Ok(())
}

/// The gRPC code of an RPC's result.
pub fn code<T>(result: Result<T, tonic::Status>) -> tonic::Code {
    result.err().map_or(tonic::Code::Ok, |s| s.code())
}

/// The gRPC code and message behind a helper's error.
pub fn code_of<T>(result: anyhow::Result<T>) -> (tonic::Code, String) {
    match result {
        Ok(_) => (tonic::Code::Ok, String::new()),
        Err(e) => match e.downcast_ref::<tonic::Status>() {
            Some(s) => (s.code(), s.message().to_string()),
            None => (tonic::Code::Unknown, format!("{e:#}")),
        },
    }
}
