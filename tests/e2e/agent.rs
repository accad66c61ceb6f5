//! The agent in a real VM (issue 6): frakti-vmm boots our guest with an ext4
//! image disk (a busybox rootfs) and a vsock device, and the test drives the
//! agent with the generated gRPC client through the hybrid vsock socket:
//! it mounts the image, runs containers on writable overlays over it
//! (output and exit code; exec; a memory.max that OOM-kills; a cpu.max that
//! throttles), removes them, and shuts the VM down through the agent.

use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use frakti_lab::guest::{self, GuestAssets};
use frakti_lab::process::{ChildGuard, read_log, seccomp_kills};
use frakti_lab::vsock::{AgentClient, wait_for_agent};
use frakti_proto::agent::v1 as pb;
use libtest_mimic::{Failed, Trial};
use serde_json::{Value, json};
use tokio::sync::mpsc;

mod limits;
use limits::*;

pub fn tests() -> Vec<Trial> {
    vec![Trial::test(
        "agent::containers_from_an_image_disk_over_vsock",
        containers_from_an_image_disk_over_vsock,
    )]
}

const GUEST_CID: u32 = 3;
/// The image disk's virtio serial, and the id it is mounted under.
const IMAGE: &str = "image";
/// A writable ext4 disk (overlay uppers), same convention.
const SCRATCH: &str = "scratch";
/// Busybox applets the containers use.
const APPLETS: &[&str] = &["sh", "cat", "dd", "grep", "sleep", "fsfreeze"];
/// Boot to a serving agent; generous for the nested lab.
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Any single RPC or awaited process.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// From the Shutdown RPC to the VMM's exit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// A busybox root filesystem in an ext4 image of `size_mib`, made with
/// mke2fs -d (the lab passes mke2fs in; L1 has no mkfs).
fn busybox_image(dir: &Path, size_mib: u32) -> Result<PathBuf, Failed> {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .map_err(|e| format!("/bin/busybox (busybox-static): {e}"))?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::fs::write(root.join("etc/hostname"), "image\n")?;
    let image = dir.join("image.ext4");
    let label_and_tree = [
        "-L".as_ref(),
        "frakti-image".as_ref(),
        "-d".as_ref(),
        root.as_os_str(),
    ];
    mke2fs(&image, size_mib, &label_and_tree)?;
    Ok(image)
}

/// An empty ext4 filesystem of `size_mib` in `dir/name`.
fn empty_ext4(dir: &Path, name: &str, size_mib: u32) -> Result<PathBuf, Failed> {
    let path = dir.join(name);
    mke2fs(&path, size_mib, &[])?;
    Ok(path)
}

/// An ext4 filesystem of `size_mib` in the file `image`, made by the lab's
/// mke2fs with `args` (a label, a tree to copy in).
fn mke2fs(image: &Path, size_mib: u32, args: &[&OsStr]) -> Result<(), Failed> {
    let out = Command::new(guest::mke2fs_binary()?)
        .args(["-q", "-F", "-t", "ext4"])
        .args(args)
        .arg(image)
        .arg(format!("{size_mib}M"))
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "mke2fs: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// frakti-vmm running our guest with image disks and vsock.
pub(crate) struct Vm {
    pub(crate) child: ChildGuard,
    dir: PathBuf,
    pub(crate) started: Instant,
}

impl Vm {
    /// Boots with the image disk and a writable scratch disk.
    fn boot(dir: &Path, image: &Path, scratch: &Path) -> Result<Vm, Failed> {
        Vm::boot_with(dir, &[(IMAGE, image)], &[(SCRATCH, scratch)])
    }

    /// Boots with read-only disks, each `(serial, backing file)`.
    pub(crate) fn boot_with_disks(dir: &Path, disks: &[(&str, &Path)]) -> Result<Vm, Failed> {
        Vm::boot_with(dir, disks, &[])
    }

    /// Boots with read-only and writable disks, each `(serial, file)`.
    fn boot_with(
        dir: &Path,
        disks: &[(&str, &Path)],
        writable: &[(&str, &Path)],
    ) -> Result<Vm, Failed> {
        let assets = GuestAssets::locate()?;
        let mut command = Command::new(guest::vmm_binary()?);
        command
            .arg("--kernel")
            .arg(&assets.kernel)
            .arg("--initrd")
            .arg(&assets.initrd)
            .args(["--vcpus", "1", "--memory", "256", "--cmdline", "quiet"]);
        for (serial, path) in disks {
            command
                .arg("--disk")
                .arg(format!("serial={serial},path={},ro", path.display()));
        }
        for (serial, path) in writable {
            command
                .arg("--disk")
                .arg(format!("serial={serial},path={}", path.display()));
        }
        command
            .arg("--vsock")
            .arg(format!(
                "cid={GUEST_CID},uds={}",
                dir.join("vsock.sock").display()
            ))
            .arg("--serial")
            .arg(dir.join("console.log"))
            .arg("--api-socket")
            .arg(dir.join("api.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("vmm.log"))?);
        let started = Instant::now();
        let child = ChildGuard::spawn(&mut command)?;
        Ok(Vm {
            child,
            dir: dir.to_path_buf(),
            started,
        })
    }

    /// The agent's client once it serves (or the VMM's exit, as an error).
    pub(crate) async fn agent(&mut self) -> anyhow::Result<AgentClient> {
        let uds = self.uds();
        let child = &mut self.child;
        Ok(
            wait_for_agent(&uds, AGENT_TIMEOUT, || match child.try_wait() {
                Ok(None) => Ok(()),
                Ok(Some(status)) => Err(format!("the VMM exited ({status})")),
                Err(e) => Err(e.to_string()),
            })
            .await?,
        )
    }

    /// Shuts the guest down through the agent; the VMM must exit 0.
    pub(crate) async fn shutdown(&mut self, c: &mut AgentClient) -> anyhow::Result<()> {
        step(
            "Shutdown",
            c.shutdown(pb::ShutdownRequest {
                grace_period_secs: 1,
            }),
        )
        .await?;
        let status = self.exited_within(SHUTDOWN_TIMEOUT).await?;
        ensure!(status.success(), "VMM exit {status}");
        Ok(())
    }

    fn uds(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    pub(crate) fn diagnostics(&self) -> String {
        format!(
            "console:\n{}\nvmm log:\n{}\nseccomp: {}",
            read_log(&self.dir.join("console.log")),
            read_log(&self.dir.join("vmm.log")),
            seccomp_kills()
        )
    }

    /// Polls for the VMM's exit.
    async fn exited_within(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "the VMM still runs {timeout:?} later"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn containers_from_an_image_disk_over_vsock() -> Result<(), Failed> {
    let dir = tempfile::tempdir()?;
    let made = Instant::now();
    let image = busybox_image(dir.path(), 16)?;
    eprintln!(
        "  image: 16 MiB ext4 with busybox made in {:.2} s",
        made.elapsed().as_secs_f64()
    );
    let scratch = empty_ext4(dir.path(), "scratch.ext4", 16)?;
    let mut vm = Vm::boot(dir.path(), &image, &scratch)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(drive(&mut vm))
        .map_err(|e| format!("{e:#}\n{}", vm.diagnostics()).into())
}

async fn drive(vm: &mut Vm) -> anyhow::Result<()> {
    let mut client = vm.agent().await?;
    let serving = vm.started.elapsed();
    let c = &mut client;
    let version = step("GetVersion", c.get_version(pb::GetVersionRequest {}))
        .await?
        .into_inner();
    ensure!(
        version.api_version == frakti_proto::AGENT_API_VERSION && version.cpus == 1,
        "{version:?}"
    );
    eprintln!(
        "  agent serving over vsock {:.2} s after the VMM started (guest uptime {:.2} s at GetVersion, {} MiB)",
        serving.as_secs_f64(),
        version.uptime_secs,
        version.mem_total_kib >> 10
    );
    let mut events = Events::subscribe(c).await?;

    let mounted = step(
        "MountDisk",
        c.mount_disk(pb::MountDiskRequest {
            disk_id: IMAGE.into(),
            serial: IMAGE.into(),
            fs_type: "ext4".into(),
            read_only: true,
            ..Default::default()
        }),
    )
    .await?
    .into_inner();
    ensure!(
        mounted.guest_path == format!("/run/frakti/disks/{IMAGE}")
            && mounted.device.starts_with("/dev/vd"),
        "{mounted:?}"
    );

    run_to_completion(c, &mut events).await?;
    exec_into_running(c).await?;
    memory_max_oom_kills(c, &mut events).await?;
    cpu_max_throttles(c).await?;
    seccomp_profile_applies(c).await?;
    fork_bomb_goes_at_once(c).await?;
    block_io_throttles(c, &mounted.device).await?;
    a_frozen_disk_stalls_only_its_callers(c).await?;

    for id in [
        "hello",
        "box",
        "hog",
        "spin",
        "filtered",
        "bystander",
        "probe",
        "fast",
        "throttled",
        "stuck-1",
        "stuck-2",
        "freezer",
    ] {
        step(
            "RemoveContainer",
            c.remove_container(pb::RemoveContainerRequest {
                container_id: id.into(),
                grace_period_secs: 0,
            }),
        )
        .await
        .with_context(|| format!("remove {id}"))?;
    }
    let left = step(
        "ListContainers",
        c.list_containers(pb::ListContainersRequest {}),
    )
    .await?
    .into_inner();
    ensure!(left.containers.is_empty(), "left behind: {left:?}");
    // Nothing holds the disks any more.
    for disk in [IMAGE, SCRATCH] {
        step(
            "UnmountDisk",
            c.unmount_disk(pb::UnmountDiskRequest {
                disk_id: disk.into(),
            }),
        )
        .await
        .with_context(|| format!("unmount {disk}"))?;
    }

    // The agent's shutdown waits (at most 1 s) for open streams to end.
    drop(events);
    let asked = Instant::now();
    vm.shutdown(c).await?;
    eprintln!(
        "  shutdown: VMM exited 0 {:.2} s after the Shutdown RPC",
        asked.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `sh -c 'echo …; exit 7'`: its stdout, its exit code in WaitProcess and
/// in the events stream.
async fn run_to_completion(c: &mut AgentClient, events: &mut Events) -> anyhow::Result<()> {
    let t = Instant::now();
    let s = spec(&["sh", "-c", "echo hello from frakti; exit 7"]);
    let pid = create(c, "hello", &s).await?;
    start(c, "hello").await?;
    let out = read_all(c, "hello", "", pb::OutputStream::Stdout).await?;
    ensure!(out == "hello from frakti\n", "hello's stdout: {out:?}");
    let status = wait(c, "hello", "").await?;
    ensure!(
        (status.exit_code, status.signal, status.oom_killed) == (7, 0, false),
        "hello: {status:?}"
    );
    let exited = events.exit("hello", "").await?;
    ensure!(exited.exit_code == 7, "hello's exit event: {exited:?}");
    eprintln!(
        "  run: pid {pid}, stdout {out:?}, exit 7 in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A seccomp profile (the guest kernel's filters) refuses mkdir with EPERM
/// and lets the rest through.
async fn seccomp_profile_applies(c: &mut AgentClient) -> anyhow::Result<()> {
    let mut s = spec(&[
        "sh",
        "-c",
        "mkdir /tmp/a 2>&1; echo rc=$?; touch /tmp/b && echo touched",
    ]);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    create(c, "filtered", &s).await?;
    start(c, "filtered").await?;
    let out = read_all(c, "filtered", "", pb::OutputStream::Stdout).await?;
    ensure!(
        out.contains("Operation not permitted") && out.contains("rc=1") && out.contains("touched"),
        "filtered's stdout: {out:?}"
    );
    ensure!(wait(c, "filtered", "").await?.exit_code == 0);
    eprintln!("  seccomp: mkdir refused with EPERM, touch allowed");
    Ok(())
}

/// An exec into `sleep 1000`, and the container's writable overlay over
/// the read-only image.
async fn exec_into_running(c: &mut AgentClient) -> anyhow::Result<()> {
    let t = Instant::now();
    create(c, "box", &spec(&["sleep", "1000"])).await?;
    start(c, "box").await?;
    exec(c, "box", "answer", &["sh", "-c", "echo $((6*7))"]).await?;
    let out = read_all(c, "box", "answer", pb::OutputStream::Stdout).await?;
    ensure!(out == "42\n", "exec stdout: {out:?}");
    let status = wait(c, "box", "answer").await?;
    ensure!(status.exit_code == 0, "exec: {status:?}");
    let took = t.elapsed();

    exec(
        c,
        "box",
        "rootfs",
        &[
            "sh",
            "-c",
            "echo scribble > /etc/note && cat /etc/note && grep ' / ' /proc/mounts",
        ],
    )
    .await?;
    let out = read_all(c, "box", "rootfs", pb::OutputStream::Stdout).await?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(
        lines.first() == Some(&"scribble")
            && lines.get(1).is_some_and(|l| l.contains(" / overlay ")),
        "the rootfs should be a writable overlay: {out:?}"
    );
    ensure!(wait(c, "box", "rootfs").await?.exit_code == 0);
    let state = step(
        "ListContainers",
        c.list_containers(pb::ListContainersRequest {}),
    )
    .await?
    .into_inner();
    let info = state
        .containers
        .iter()
        .find(|i| i.container_id == "box")
        .ok_or_else(|| anyhow!("box is not listed: {state:?}"))?;
    ensure!(
        info.state == pb::ContainerState::Running as i32,
        "box after its execs: {info:?}"
    );
    eprintln!(
        "  exec: stdout \"42\", exit 0 in {:.2} s (container start included)",
        took.as_secs_f64()
    );
    Ok(())
}

/// A busybox container running `args`, its rootfs a writable overlay over
/// the image disk (see [`rootfs`]).
pub(crate) fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "HOME=/root"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "pod-host",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// The image disk (mounted read-only) under a writable overlay whose upper
/// layer is private to the container.
fn rootfs() -> pb::Rootfs {
    pb::Rootfs {
        source: Some(pb::rootfs::Source::DiskId(IMAGE.into())),
        writable_overlay: true,
        ..Default::default()
    }
}

/// An RPC (or any step) that must finish within STEP_TIMEOUT.
pub(crate) async fn step<T>(
    what: &str,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(STEP_TIMEOUT, call).await {
        Ok(result) => result.with_context(|| what.to_string()),
        Err(_) => Err(anyhow!("{what}: no answer within {STEP_TIMEOUT:?}")),
    }
}

pub(crate) async fn create(c: &mut AgentClient, id: &str, spec: &Value) -> anyhow::Result<u32> {
    let request = pb::CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: serde_json::to_vec(spec)?,
        rootfs: Some(rootfs()),
        devices: vec![],
    };
    let created = step("CreateContainer", c.create_container(request))
        .await
        .with_context(|| format!("create {id}"))?;
    Ok(created.into_inner().pid)
}

pub(crate) async fn start(c: &mut AgentClient, id: &str) -> anyhow::Result<()> {
    let request = pb::StartContainerRequest {
        container_id: id.into(),
    };
    step("StartContainer", c.start_container(request))
        .await
        .with_context(|| format!("start {id}"))?;
    Ok(())
}

async fn exec(c: &mut AgentClient, id: &str, exec_id: &str, args: &[&str]) -> anyhow::Result<()> {
    let process =
        json!({"user": {"uid": 0, "gid": 0}, "args": args, "env": ["PATH=/bin"], "cwd": "/"});
    let request = pb::ExecProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        process_json: serde_json::to_vec(&process)?,
    };
    step("ExecProcess", c.exec_process(request))
        .await
        .with_context(|| format!("exec {exec_id} in {id}"))?;
    Ok(())
}

pub(crate) async fn wait(
    c: &mut AgentClient,
    id: &str,
    exec_id: &str,
) -> anyhow::Result<pb::ExitStatus> {
    let request = pb::WaitProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
    };
    step("WaitProcess", c.wait_process(request))
        .await
        .with_context(|| format!("wait for {id}/{exec_id}"))?
        .into_inner()
        .status
        .ok_or_else(|| anyhow!("WaitProcess {id}/{exec_id} without a status"))
}

async fn stats(c: &mut AgentClient, id: &str) -> anyhow::Result<pb::StatsContainerResponse> {
    let request = pb::StatsContainerRequest {
        container_id: id.into(),
    };
    Ok(step("StatsContainer", c.stats_container(request))
        .await
        .with_context(|| format!("stats of {id}"))?
        .into_inner())
}

/// Everything a process writes to `stream` until it closes it.
pub(crate) async fn read_all(
    c: &mut AgentClient,
    id: &str,
    exec_id: &str,
    stream: pb::OutputStream,
) -> anyhow::Result<String> {
    let request = pb::ReadOutputRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        stream: stream as i32,
        ..Default::default()
    };
    let mut out = step("ReadOutput", c.read_output(tokio_stream::once(request)))
        .await?
        .into_inner();
    let mut data = Vec::new();
    let read = async {
        while let Some(chunk) = out.message().await? {
            data.extend_from_slice(&chunk.data);
        }
        Ok::<_, tonic::Status>(())
    };
    step("reading the output", read)
        .await
        .with_context(|| format!("{id}/{exec_id}"))?;
    Ok(String::from_utf8_lossy(&data).into_owned())
}

/// The agent's events stream, read by a task into a queue so that events
/// can be looked for in any order.
struct Events {
    queue: mpsc::UnboundedReceiver<Result<pb::Event, tonic::Status>>,
    seen: Vec<pb::Event>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Events {
    /// Ends the stream (the agent's graceful shutdown waits for open ones).
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Events {
    async fn subscribe(c: &mut AgentClient) -> anyhow::Result<Events> {
        let mut stream = step("Events", c.events(pb::EventsRequest {}))
            .await?
            .into_inner();
        let (tx, queue) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let next = stream.message().await.transpose();
                let end = !matches!(next, Some(Ok(_)));
                if let Some(item) = next
                    && tx.send(item).is_err()
                {
                    return;
                }
                if end {
                    return;
                }
            }
        });
        Ok(Events {
            queue,
            seen: Vec::new(),
            reader,
        })
    }

    /// The first event (already seen or still to come) that `wanted` picks.
    async fn next_matching(
        &mut self,
        what: &str,
        wanted: impl Fn(&pb::Event) -> bool,
    ) -> anyhow::Result<pb::Event> {
        if let Some(i) = self.seen.iter().position(&wanted) {
            return Ok(self.seen.remove(i));
        }
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.queue.recv()).await;
            let event = match next {
                Ok(Some(Ok(event))) => event,
                Ok(Some(Err(status))) => return Err(anyhow!("events stream: {status}")),
                Ok(None) => return Err(anyhow!("the events stream ended; no {what}")),
                Err(_) => {
                    return Err(anyhow!(
                        "no {what} within {STEP_TIMEOUT:?}; other events: {:?}",
                        self.seen
                    ));
                }
            };
            if wanted(&event) {
                return Ok(event);
            }
            self.seen.push(event);
        }
    }

    /// The exit event of a process.
    async fn exit(&mut self, id: &str, exec_id: &str) -> anyhow::Result<pb::ExitStatus> {
        let event = self
            .next_matching(&format!("exit event for {id}/{exec_id}"), |e| {
                e.container_id == id
                    && e.exec_id == exec_id
                    && matches!(e.kind, Some(pb::event::Kind::Exited(_)))
            })
            .await?;
        match event.kind {
            Some(pb::event::Kind::Exited(status)) => Ok(status),
            _ => unreachable!("matched an exit event"),
        }
    }
}
