//! Host mode: the agent as an ordinary root process in private mount and
//! PID namespaces (`unshare`), serving on a unix socket, driven with the
//! generated client. Containers run a busybox rootfs built from Debian's
//! busybox-static. No VM, no mocks.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use frakti_proto::agent::v1 as pb;
use frakti_proto::agent::v1::agent_client::AgentClient;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

type Client = AgentClient<Channel>;

/// A busybox root filesystem shared by every test (read-only use only:
/// containers that write get an overlay).
fn busybox_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "needs Debian's busybox-static (scripts/deps.sh installs it)"
        );
        let dir = tempfile::Builder::new()
            .prefix("frakti-busybox-")
            .tempdir()
            .unwrap()
            .keep();
        for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root", "work"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
        let list = Command::new(busybox).arg("--list").output().unwrap();
        for applet in String::from_utf8(list.stdout).unwrap().lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
            }
        }
        std::fs::write(dir.join("etc/hostname"), "image\n").unwrap();
        dir
    })
}

/// A running host-mode agent; killed (with everything in its PID
/// namespace) when dropped.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    client: Client,
}

impl Agent {
    async fn start() -> Agent {
        Agent::start_with(&[]).await
    }

    /// An agent in its own network namespace too (only loopback, down),
    /// where `setup` (an `sh -c` script) runs first.
    async fn start_in_netns(setup: &str) -> Agent {
        Agent::start_with(&[
            "--net",
            "sh",
            "-c",
            &format!("{setup} && exec \"$0\" \"$@\""),
        ])
        .await
    }

    /// `wrap`: extra `unshare` options, then what runs the agent binary
    /// (given as `$0`).
    async fn start_with(wrap: &[&str]) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("frakti-agent-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new("unshare")
            // Own UTS and IPC namespaces too: SetupSandbox sets the hostname
            // and IPC sysctls, which must not reach the host.
            .args([
                "--mount",
                "--pid",
                "--uts",
                "--ipc",
                "--fork",
                "--mount-proc",
                "--kill-child",
            ])
            .args(wrap)
            .arg(env!("CARGO_BIN_EXE_frakti-agent"))
            .arg("serve")
            .arg(format!("--listen=unix:{}", socket.display()))
            .arg(format!(
                "--state-dir={}",
                dir.path().join("state").display()
            ))
            .env("RUST_LOG", "frakti_agent=debug,info")
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot run unshare (util-linux)");
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = loop {
            if let Ok(client) = connect(&socket).await {
                break client;
            }
            assert!(Instant::now() < deadline, "agent did not start serving");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Agent { child, dir, client }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The agent's pid as this test sees it (the child of `unshare`).
    fn host_pid(&self) -> i32 {
        let unshare = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).unwrap();
        children.split_whitespace().next().unwrap().parse().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(socket: &Path) -> Result<Client, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::try_from("http://agent.invalid")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?;
    Ok(AgentClient::new(channel))
}

/// An OCI spec for a busybox container running `args`.
fn spec(args: &[&str]) -> Value {
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

fn rootfs(overlay: bool) -> pb::Rootfs {
    pb::Rootfs {
        source: Some(pb::rootfs::Source::GuestPath(
            busybox_rootfs().display().to_string(),
        )),
        writable_overlay: overlay,
        ..Default::default()
    }
}

async fn create(client: &mut Client, id: &str, spec: &Value) -> Result<u32, tonic::Status> {
    create_with(client, id, spec, true).await
}

async fn create_with(
    client: &mut Client,
    id: &str,
    spec: &Value,
    overlay: bool,
) -> Result<u32, tonic::Status> {
    client
        .create_container(pb::CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: serde_json::to_vec(spec).unwrap(),
            rootfs: Some(rootfs(overlay)),
            devices: vec![],
        })
        .await
        .map(|r| r.into_inner().pid)
}

async fn start(client: &mut Client, id: &str) -> Result<(), tonic::Status> {
    client
        .start_container(pb::StartContainerRequest {
            container_id: id.into(),
        })
        .await
        .map(drop)
}

async fn run(client: &mut Client, id: &str, spec: &Value) {
    create(client, id, spec).await.unwrap();
    start(client, id).await.unwrap();
}

async fn wait(client: &mut Client, id: &str, exec_id: &str) -> pb::ExitStatus {
    let request = pb::WaitProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
    };
    tokio::time::timeout(Duration::from_secs(20), client.wait_process(request))
        .await
        .expect("process did not exit")
        .unwrap()
        .into_inner()
        .status
        .unwrap()
}

/// Everything a stream carries until the process closes it.
async fn read_all(
    client: &mut Client,
    id: &str,
    exec_id: &str,
    stream: pb::OutputStream,
) -> String {
    let mut out = client
        .read_output(tokio_stream::once(pb::ReadOutputRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            stream: stream as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut data = Vec::new();
    let read = async {
        while let Some(chunk) = out.message().await.unwrap() {
            data.extend_from_slice(&chunk.data);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("output did not end");
    String::from_utf8_lossy(&data).into_owned()
}

/// Reads a stream until `needle` shows up.
async fn read_until(out: &mut tonic::Streaming<pb::OutputChunk>, needle: &str) -> String {
    let mut data = String::new();
    let read = async {
        while !data.contains(needle) {
            match out.message().await.unwrap() {
                Some(chunk) => data.push_str(&String::from_utf8_lossy(&chunk.data)),
                None => break,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} in output: {data:?}"));
    data
}

async fn exec(
    client: &mut Client,
    id: &str,
    exec_id: &str,
    process: Value,
) -> Result<u32, tonic::Status> {
    client
        .exec_process(pb::ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process_json: serde_json::to_vec(&process).unwrap(),
        })
        .await
        .map(|r| r.into_inner().pid)
}

fn process(args: &[&str]) -> Value {
    json!({"user": {"uid": 0, "gid": 0}, "args": args, "env": ["PATH=/bin"], "cwd": "/"})
}

async fn signal(
    client: &mut Client,
    id: &str,
    exec_id: &str,
    signal: i32,
) -> Result<(), tonic::Status> {
    client
        .signal_process(pb::SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all: false,
        })
        .await
        .map(drop)
}

mod network;
mod processes;
mod sandbox;
mod security;
mod userns;
