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

#[tokio::test]
async fn health_and_version() {
    let mut agent = Agent::start().await;
    assert!(
        agent
            .client
            .check(pb::CheckRequest {})
            .await
            .unwrap()
            .into_inner()
            .serving
    );
    let version = agent
        .client
        .get_version(pb::GetVersionRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.api_version, frakti_proto::AGENT_API_VERSION);
    assert!(version.cpus >= 1);
}

#[tokio::test]
async fn output_and_exit_code() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(
        c,
        "echo",
        &spec(&["sh", "-c", "echo hello; echo oops >&2; exit 3"]),
    )
    .await;
    assert_eq!(
        read_all(c, "echo", "", pb::OutputStream::Stdout).await,
        "hello\n"
    );
    assert_eq!(
        read_all(c, "echo", "", pb::OutputStream::Stderr).await,
        "oops\n"
    );
    let status = wait(c, "echo", "").await;
    assert_eq!(
        (status.exit_code, status.signal, status.oom_killed),
        (3, 0, false)
    );
    // A second wait answers at once with the same status.
    assert_eq!(wait(c, "echo", "").await.exit_code, 3);
    let list = c
        .list_containers(pb::ListContainersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.containers.len(), 1);
    assert_eq!(list.containers[0].state, pb::ContainerState::Stopped as i32);
    assert_eq!(
        list.containers[0].exit_status.as_ref().unwrap().exit_code,
        3
    );
}

/// An acknowledging ReadOutput reader: its first request and a sender for
/// its confirmations.
async fn read_acknowledging(
    client: &mut Client,
    id: &str,
    from_offset: u64,
) -> Result<
    (
        tonic::Streaming<pb::OutputChunk>,
        tokio::sync::mpsc::Sender<pb::ReadOutputRequest>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ReadOutputRequest {
        container_id: id.into(),
        stream: pb::OutputStream::Stdout as i32,
        from_offset,
        acknowledge: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let out = client
        .read_output(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((out, tx))
}

#[tokio::test]
async fn a_resuming_reader_gets_what_was_not_confirmed_again() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(
        c,
        "resume",
        &spec(&["sh", "-c", "echo one; echo two; sleep 1000"]),
    )
    .await;
    let (mut out, confirm) = read_acknowledging(c, "resume", 0).await.unwrap();
    let first = out.message().await.unwrap().unwrap();
    assert_eq!(first.offset, 0);
    let mut text = String::from_utf8_lossy(&first.data).into_owned();
    // The two lines may come in one chunk or in two.
    if !text.contains("two") {
        text.push_str(&read_until(&mut out, "two").await);
    }
    assert_eq!(text, "one\ntwo\n");
    // The reader keeps "one\n" for good, then goes away.
    confirm
        .send(pb::ReadOutputRequest {
            kept: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    drop((out, confirm));

    let (mut out, _confirm) = read_acknowledging(c, "resume", 4).await.unwrap();
    let again = out.message().await.unwrap().unwrap();
    assert_eq!((again.offset, again.data.as_slice()), (4, &b"two\n"[..]));
    // Another acknowledging reader replaces it; a plain one may not, and
    // nobody may claim more than the stream has made.
    let err = c
        .read_output(tokio_stream::once(pb::ReadOutputRequest {
            container_id: "resume".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let err = read_acknowledging(c, "resume", 9).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    let (mut out, _confirm) = read_acknowledging(c, "resume", 8).await.unwrap();
    signal(c, "resume", "", 9).await.unwrap();
    assert!(
        out.message().await.unwrap().is_none(),
        "nothing after 8 bytes"
    );
}

#[tokio::test]
async fn sigkill_gives_137() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(c, "sleeper", &spec(&["sleep", "1000"])).await;
    let list = c
        .list_containers(pb::ListContainersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.containers[0].state, pb::ContainerState::Running as i32);
    signal(c, "sleeper", "", 9).await.unwrap();
    let status = wait(c, "sleeper", "").await;
    assert_eq!((status.exit_code, status.signal), (137, 9));
    // Signalling a process that has exited is not an error.
    signal(c, "sleeper", "", 9).await.unwrap();
}

#[tokio::test]
async fn sigterm_to_a_shell_with_a_trap() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    let mut out = {
        run(
            c,
            "trap",
            &spec(&[
                "sh",
                "-c",
                "trap 'echo got TERM; exit 7' TERM; echo armed; while true; do sleep 0.05; done",
            ]),
        )
        .await;
        c.read_output(tokio_stream::once(pb::ReadOutputRequest {
            container_id: "trap".into(),
            exec_id: String::new(),
            stream: pb::OutputStream::Stdout as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
    };
    read_until(&mut out, "armed").await;
    signal(c, "trap", "", 15).await.unwrap();
    read_until(&mut out, "got TERM").await;
    assert_eq!(wait(c, "trap", "").await.exit_code, 7);
}

#[tokio::test]
async fn exec_cat_echoes_stdin() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(c, "box", &spec(&["sleep", "1000"])).await;
    exec(c, "box", "cat", process(&["cat"])).await.unwrap();
    for data in ["ping\n", "pong\n"] {
        c.write_stdin(pb::WriteStdinRequest {
            container_id: "box".into(),
            exec_id: "cat".into(),
            data: data.as_bytes().to_vec(),
        })
        .await
        .unwrap();
    }
    c.close_stdin(pb::CloseStdinRequest {
        container_id: "box".into(),
        exec_id: "cat".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        read_all(c, "box", "cat", pb::OutputStream::Stdout).await,
        "ping\npong\n"
    );
    assert_eq!(wait(c, "box", "cat").await.exit_code, 0);
    // Writing after close is refused.
    let err = c
        .write_stdin(pb::WriteStdinRequest {
            container_id: "box".into(),
            exec_id: "cat".into(),
            data: b"x".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // The exec ran in the container's PID namespace: it sees the container's
    // init as PID 1.
    exec(
        c,
        "box",
        "ps",
        process(&["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"]),
    )
    .await
    .unwrap();
    assert_eq!(
        read_all(c, "box", "ps", pb::OutputStream::Stdout).await,
        "sleep 1000 "
    );
    // The container itself is still running.
    let list = c
        .list_containers(pb::ListContainersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.containers[0].state, pb::ContainerState::Running as i32);
    assert_eq!(list.containers[0].exec_ids, ["cat", "ps"]);
}

#[tokio::test]
async fn tty_exec_with_resize() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(c, "tty", &spec(&["sleep", "1000"])).await;
    let mut p = process(&[
        "sh",
        "-c",
        "stty size; echo ready; read line; stty size; test -t 0 && echo is-a-tty",
    ]);
    p["terminal"] = json!(true);
    p["consoleSize"] = json!({"height": 24, "width": 80});
    exec(c, "tty", "sh", p).await.unwrap();
    let mut out = c
        .read_output(tokio_stream::once(pb::ReadOutputRequest {
            container_id: "tty".into(),
            exec_id: "sh".into(),
            stream: pb::OutputStream::Stdout as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let first = read_until(&mut out, "ready").await;
    assert!(first.contains("24 80"), "{first:?}");
    c.resize_tty(pb::ResizeTtyRequest {
        container_id: "tty".into(),
        exec_id: "sh".into(),
        rows: 33,
        cols: 101,
    })
    .await
    .unwrap();
    c.write_stdin(pb::WriteStdinRequest {
        container_id: "tty".into(),
        exec_id: "sh".into(),
        data: b"go\n".to_vec(),
    })
    .await
    .unwrap();
    let rest = read_until(&mut out, "is-a-tty").await;
    assert!(rest.contains("33 101"), "{rest:?}");
    assert_eq!(wait(c, "tty", "sh").await.exit_code, 0);
    // A terminal has no separate stderr; a pipe process has no terminal.
    exec(c, "tty", "plain", process(&["true"])).await.unwrap();
    let err = c
        .resize_tty(pb::ResizeTtyRequest {
            container_id: "tty".into(),
            exec_id: "plain".into(),
            rows: 1,
            cols: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test]
async fn tty_close_stdin_sends_eof() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    let mut s = spec(&["sh", "-c", "cat; echo cat-done"]);
    s["process"]["terminal"] = json!(true);
    run(c, "ttycat", &s).await;
    c.write_stdin(pb::WriteStdinRequest {
        container_id: "ttycat".into(),
        exec_id: String::new(),
        data: b"typed\n".to_vec(),
    })
    .await
    .unwrap();
    c.close_stdin(pb::CloseStdinRequest {
        container_id: "ttycat".into(),
        exec_id: String::new(),
    })
    .await
    .unwrap();
    let out = read_all(c, "ttycat", "", pb::OutputStream::Stdout).await;
    assert!(out.contains("typed") && out.contains("cat-done"), "{out:?}");
    assert_eq!(wait(c, "ttycat", "").await.exit_code, 0);
}

#[tokio::test]
async fn env_cwd_user_and_hostname_apply() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    let mut s = spec(&[
        "sh",
        "-c",
        "echo $FOO; pwd; id -u; id -g; id -G; hostname; grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status; touch /probe 2>/dev/null && echo rw || echo ro; cat /proc/kcore | wc -c",
    ]);
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    s["process"]["cwd"] = json!("/work");
    s["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [10, 20]});
    s["process"]["capabilities"] =
        json!({"bounding": ["CAP_KILL"], "effective": [], "permitted": [], "inheritable": []});
    s["root"]["readonly"] = json!(true);
    create_with(c, "who", &s, false).await.unwrap();
    start(c, "who").await.unwrap();
    let out = read_all(c, "who", "", pb::OutputStream::Stdout).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "bar baz", "{out}");
    assert_eq!(lines[1], "/work");
    assert_eq!(lines[2], "1000");
    assert_eq!(lines[3], "1001");
    let groups: HashSet<&str> = lines[4].split_whitespace().collect();
    assert_eq!(groups, HashSet::from(["1001", "10", "20"]), "{out}");
    assert_eq!(lines[5], "pod-host");
    assert_eq!(
        lines[6].split_whitespace().nth(1),
        Some("0000000000000000"),
        "{out}"
    );
    assert_eq!(lines[7].split_whitespace().nth(1), Some("1"), "{out}");
    assert_eq!(lines[8], "ro");
    assert_eq!(
        lines[9].trim(),
        "0",
        "masked /proc/kcore reads empty: {out}"
    );
    assert_eq!(wait(c, "who", "").await.exit_code, 0);
}

#[tokio::test]
async fn bad_requests_are_refused_with_reasons() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;

    let err = start(c, "ghost").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("ghost"), "{err:?}");
    let err = wait_err(c, "ghost").await;
    assert_eq!(err.code(), Code::NotFound);

    let err = c
        .create_container(pb::CreateContainerRequest {
            container_id: "bad".into(),
            oci_spec_json: b"{not json".to_vec(),
            rootfs: Some(rootfs(false)),
            devices: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("malformed OCI spec"), "{err:?}");

    let err = create(c, "../evil", &spec(&["true"])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = create(c, "noargs", &spec(&[])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = create(c, "missing", &spec(&["/bin/no-such-program"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("no-such-program"), "{err:?}");
    let mut s = spec(&["true"]);
    s["process"]["cwd"] = json!("/no/such/dir");
    let err = create(c, "nocwd", &s).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c
        .create_container(pb::CreateContainerRequest {
            container_id: "noroot".into(),
            oci_spec_json: serde_json::to_vec(&spec(&["true"])).unwrap(),
            rootfs: Some(pb::Rootfs {
                source: Some(pb::rootfs::Source::GuestPath("/no/such/rootfs".into())),
                ..Default::default()
            }),
            devices: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // What the VM cannot honour is refused by name, not dropped.
    let mut s = spec(&["true"]);
    s["hooks"] = json!({"createRuntime": [{"path": "/bin/true"}]});
    let err = create(c, "hooked", &s).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("hooks: "), "{err:?}");
    let mut s = spec(&["true"]);
    s["linux"]["resources"] = json!({"hugepageLimits": [{"pageSize": "2MB", "limit": 4194304}]});
    let err = create(c, "huge", &s).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("hugepageLimits[0] (2MB)"), "{err:?}");

    run(c, "once", &spec(&["sleep", "1000"])).await;
    let err = c
        .update_container(pb::UpdateContainerRequest {
            container_id: "once".into(),
            resources_json: br#"{"cpu": {"idle": 1}}"#.to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("resources.cpu.idle: "), "{err:?}");
    let err = c
        .update_container(pb::UpdateContainerRequest {
            container_id: "once".into(),
            resources_json: br#"{"blockIO": {"weight": 5}}"#.to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("blockIO.weight: 5 is not in [10, 1000]"),
        "{err:?}"
    );
    let err = start(c, "once").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("already started"), "{err:?}");
    let err = create(c, "once", &spec(&["true"])).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = signal(c, "once", "", 12345).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = signal(c, "once", "nope", 9).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = exec(c, "once", "x", json!({"args": "not a list"}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = exec(c, "once", "x", process(&["no-such-tool"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    exec(c, "once", "dup", process(&["true"])).await.unwrap();
    let err = exec(c, "once", "dup", process(&["true"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    create(c, "created", &spec(&["true"])).await.unwrap();
    let err = exec(c, "created", "x", process(&["true"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // The agent is fine after all that.
    assert!(
        c.check(pb::CheckRequest {})
            .await
            .unwrap()
            .into_inner()
            .serving
    );
}

async fn wait_err(client: &mut Client, id: &str) -> tonic::Status {
    client
        .wait_process(pb::WaitProcessRequest {
            container_id: id.into(),
            exec_id: String::new(),
        })
        .await
        .unwrap_err()
}

#[tokio::test]
async fn one_container_failing_does_not_harm_another() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(c, "healthy", &spec(&["sleep", "1000"])).await;
    // One that cannot even be created, one that crashes, one killed.
    assert!(create(c, "broken", &spec(&["/nope"])).await.is_err());
    // (Not the container's init itself: PID 1 of a namespace ignores
    // signals it has no handler for.)
    run(
        c,
        "crasher",
        &spec(&["sh", "-c", "sh -c 'kill -SEGV $$'; exit $?"]),
    )
    .await;
    assert_eq!(wait(c, "crasher", "").await.exit_code, 128 + 11);
    run(c, "victim", &spec(&["sleep", "1000"])).await;
    signal(c, "victim", "", 9).await.unwrap();
    assert_eq!(wait(c, "victim", "").await.exit_code, 137);
    c.remove_container(pb::RemoveContainerRequest {
        container_id: "victim".into(),
        grace_period_secs: 0,
    })
    .await
    .unwrap();
    // The healthy one still runs and still execs.
    exec(c, "healthy", "hi", process(&["echo", "still here"]))
        .await
        .unwrap();
    assert_eq!(
        read_all(c, "healthy", "hi", pb::OutputStream::Stdout).await,
        "still here\n"
    );
    let list = c
        .list_containers(pb::ListContainersRequest {})
        .await
        .unwrap()
        .into_inner();
    let healthy = list
        .containers
        .iter()
        .find(|x| x.container_id == "healthy")
        .unwrap();
    assert_eq!(healthy.state, pb::ContainerState::Running as i32);
}

/// Processes below `pid` in the host's process tree.
fn descendants(pid: i32) -> Vec<i32> {
    let mut all = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for task in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                all.push(child);
                todo.push(child);
            }
        }
    }
    all
}

#[tokio::test]
async fn remove_cleans_up_processes_and_mounts() {
    let mut agent = Agent::start().await;
    let host_pid = agent.host_pid();
    let state = agent.state_dir();
    let c = &mut agent.client;
    run(c, "doomed", &spec(&["sh", "-c", "sleep 1000 & sleep 1000"])).await;
    exec(c, "doomed", "extra", process(&["sleep", "1000"]))
        .await
        .unwrap();
    // The shell starts its two sleeps (and the exec its one) in a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let processes = loop {
        let processes = c
            .list_processes(pb::ListProcessesRequest {
                container_id: "doomed".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .processes;
        let sleeps = processes
            .iter()
            .filter(|p| p.args == ["sleep", "1000"])
            .count();
        if sleeps == 3 || Instant::now() > deadline {
            break processes;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // (sh execs its last command: the init is a sleep with a sleep child.)
    assert_eq!(processes.len(), 3, "three sleeps: {processes:?}");
    assert!(
        processes.iter().any(|p| p.args == ["sleep", "1000"]),
        "{processes:?}"
    );
    assert!(!descendants(host_pid).is_empty());
    let mountinfo = std::fs::read_to_string(format!("/proc/{host_pid}/mountinfo")).unwrap();
    let container_dir = state.join("containers/doomed");
    assert!(
        mountinfo.contains(&container_dir.display().to_string()),
        "the overlay is mounted in the agent's namespace"
    );

    c.remove_container(pb::RemoveContainerRequest {
        container_id: "doomed".into(),
        grace_period_secs: 1,
    })
    .await
    .unwrap();
    assert_eq!(
        descendants(host_pid),
        Vec::<i32>::new(),
        "processes left behind"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{host_pid}/mountinfo")).unwrap();
    assert!(
        !mountinfo.contains(&container_dir.display().to_string()),
        "{mountinfo}"
    );
    assert!(!container_dir.exists());
    let list = c
        .list_containers(pb::ListContainersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.containers.is_empty());
    let err = c
        .list_processes(pb::ListProcessesRequest {
            container_id: "doomed".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn overlay_writes_stay_in_the_container() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(
        c,
        "writer",
        &spec(&["sh", "-c", "echo scribble > /etc/note && cat /etc/note"]),
    )
    .await;
    assert_eq!(
        read_all(c, "writer", "", pb::OutputStream::Stdout).await,
        "scribble\n"
    );
    assert_eq!(wait(c, "writer", "").await.exit_code, 0);
    assert!(
        !busybox_rootfs().join("etc/note").exists(),
        "the image was modified"
    );
}

#[tokio::test]
async fn events_report_exits() {
    let mut agent = Agent::start().await;
    let mut events = agent
        .client
        .events(pb::EventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let c = &mut agent.client;
    run(c, "short", &spec(&["sh", "-c", "exit 5"])).await;
    let event = tokio::time::timeout(Duration::from_secs(20), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.container_id, "short");
    match event.kind {
        Some(pb::event::Kind::Exited(status)) => assert_eq!(status.exit_code, 5),
        other => panic!("unexpected event {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_stops_containers_and_exits() {
    let mut agent = Agent::start().await;
    let host_pid = agent.host_pid();
    let c = &mut agent.client;
    run(
        c,
        "stubborn",
        &spec(&["sh", "-c", "trap '' TERM; while true; do sleep 0.05; done"]),
    )
    .await;
    run(c, "polite", &spec(&["sleep", "1000"])).await;
    c.shutdown(pb::ShutdownRequest {
        grace_period_secs: 1,
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(status.success(), "agent exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit: {:?}",
            descendants(host_pid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pod container: no UTS/IPC namespace of its own (it shares the
/// guest's, i.e. the pod's, as the host builds them).
fn pod_spec(args: &[&str]) -> Value {
    let mut s = spec(args);
    s["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "mount"}]);
    s.as_object_mut().unwrap().remove("hostname");
    s
}

#[tokio::test]
async fn sandbox_hostname_dns_sysctls_and_shared_pid_namespace() {
    let mut agent = Agent::start().await;
    let state = agent.state_dir();
    let c = &mut agent.client;
    c.setup_sandbox(pb::SetupSandboxRequest {
        hostname: "pod-a".into(),
        resolv_conf: b"nameserver 10.96.0.10\nsearch default.svc.cluster.local\n".to_vec(),
        sysctls: [("kernel.msgmax".to_string(), "4242".to_string())].into(),
        shared_pid_namespace: true,
        resources_json: vec![],
    })
    .await
    .unwrap();
    let err = c
        .setup_sandbox(pb::SetupSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    run(c, "a", &pod_spec(&["sleep", "1000"])).await;
    let mut s = pod_spec(&[
        "sh",
        "-c",
        "hostname; cat /proc/sys/kernel/msgmax; cat /etc/resolv.conf; for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done",
    ]);
    s["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/etc/resolv.conf", "type": "bind",
        "source": state.join("sandbox/resolv.conf"), "options": ["rbind", "ro"]
    }));
    run(c, "b", &s).await;
    let out = read_all(c, "b", "", pb::OutputStream::Stdout).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "pod-a", "{out}");
    assert_eq!(lines[1], "4242", "{out}");
    assert_eq!(lines[2], "nameserver 10.96.0.10", "{out}");
    assert!(
        lines.iter().any(|l| l.trim() == "sleep 1000"),
        "b sees a's process in the shared PID namespace: {out}"
    );
    assert_eq!(wait(c, "b", "").await.exit_code, 0);
    // Removing one container of a shared namespace leaves the other alone.
    c.remove_container(pb::RemoveContainerRequest {
        container_id: "a".into(),
        grace_period_secs: 0,
    })
    .await
    .unwrap();
    let err = c
        .setup_sandbox(pb::SetupSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn bad_sandbox_settings_are_refused() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    for request in [
        pb::SetupSandboxRequest {
            hostname: "bad_host".into(),
            ..Default::default()
        },
        pb::SetupSandboxRequest {
            sysctls: [("../../etc/x".to_string(), "1".to_string())].into(),
            ..Default::default()
        },
        pb::SetupSandboxRequest {
            sysctls: [("kernel.no_such_sysctl".to_string(), "1".to_string())].into(),
            ..Default::default()
        },
    ] {
        let err = c.setup_sandbox(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
}

async fn copy_file(c: &mut Client, path: &str, data: &str, version: u64) -> pb::CopyFileResponse {
    c.copy_file(pb::CopyFileRequest {
        path: path.into(),
        kind: pb::FileKind::File as i32,
        data: data.as_bytes().to_vec(),
        mode: 0o640,
        uid: 1000,
        gid: 2000,
        version,
        in_place: false,
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn copied_files_reach_containers_and_stay_in_sync() {
    let mut agent = Agent::start().await;
    let state = agent.state_dir();
    let c = &mut agent.client;
    let first = copy_file(c, "configmap/settings", "v1\n", 1).await;
    assert!(first.written);
    assert_eq!(
        first.guest_path,
        state.join("files/configmap/settings").display().to_string()
    );
    let mut s = spec(&["sleep", "1000"]);
    s["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/etc/config", "type": "bind",
        "source": state.join("files/configmap"), "options": ["rbind", "ro"]
    }));
    run(c, "reader", &s).await;
    exec(
        c,
        "reader",
        "cat1",
        process(&[
            "sh",
            "-c",
            "cat /etc/config/settings; stat -c '%u %g %a' /etc/config/settings",
        ]),
    )
    .await
    .unwrap();
    assert_eq!(
        read_all(c, "reader", "cat1", pb::OutputStream::Stdout).await,
        "v1\n1000 2000 640\n"
    );
    // An older version is ignored; a newer one shows up in the container.
    assert!(
        !copy_file(c, "configmap/settings", "stale\n", 1)
            .await
            .written
    );
    assert!(copy_file(c, "configmap/settings", "v2\n", 2).await.written);
    exec(
        c,
        "reader",
        "cat2",
        process(&["cat", "/etc/config/settings"]),
    )
    .await
    .unwrap();
    assert_eq!(
        read_all(c, "reader", "cat2", pb::OutputStream::Stdout).await,
        "v2\n"
    );
    c.remove_file(pb::RemoveFileRequest {
        path: "configmap/settings".into(),
    })
    .await
    .unwrap();
    exec(c, "reader", "ls", process(&["ls", "/etc/config"]))
        .await
        .unwrap();
    assert_eq!(
        read_all(c, "reader", "ls", pb::OutputStream::Stdout).await,
        ""
    );
    let err = c
        .copy_file(pb::CopyFileRequest {
            path: "../escape".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c
        .remove_file(pb::RemoveFileRequest {
            path: "nothing/here".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn file_binds_see_in_place_copies_and_writes_read_back() {
    let mut agent = Agent::start().await;
    let state = agent.state_dir();
    let c = &mut agent.client;
    copy_file(c, "containers/w/0", "host v1\n", 0).await;
    copy_file(c, "containers/w/1", "", 0).await;
    let mut s = spec(&[
        "sh",
        "-c",
        "echo 'it ended badly' > /dev/termination-log; sleep 1000",
    ]);
    let mounts = s["mounts"].as_array_mut().unwrap();
    mounts.push(json!({
        "destination": "/etc/hosts", "type": "bind",
        "source": state.join("files/containers/w/0"), "options": ["rbind", "ro"]
    }));
    mounts.push(json!({
        "destination": "/dev/termination-log", "type": "bind",
        "source": state.join("files/containers/w/1"), "options": ["rbind", "rw"]
    }));
    run(c, "writer", &s).await;
    // A file bind follows an in-place copy.
    c.copy_file(pb::CopyFileRequest {
        path: "containers/w/0".into(),
        kind: pb::FileKind::File as i32,
        data: b"host v2\n".to_vec(),
        mode: 0o644,
        in_place: true,
        ..Default::default()
    })
    .await
    .unwrap();
    exec(c, "writer", "cat", process(&["cat", "/etc/hosts"]))
        .await
        .unwrap();
    assert_eq!(
        read_all(c, "writer", "cat", pb::OutputStream::Stdout).await,
        "host v2\n"
    );
    // What the container wrote comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = c
            .read_file(pb::ReadFileRequest {
                path: "containers/w/1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if !read.data.is_empty() {
            assert_eq!(read.data, b"it ended badly\n");
            assert!(!read.truncated);
            break;
        }
        assert!(Instant::now() < deadline, "the container wrote nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = c
        .read_file(pb::ReadFileRequest {
            path: "containers/w/2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c
        .read_file(pb::ReadFileRequest {
            path: "../etc/passwd".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test]
async fn disks_that_do_not_exist_are_not_found() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    let err = c
        .mount_disk(pb::MountDiskRequest {
            disk_id: "image0".into(),
            serial: "frakti-no-such-disk".into(),
            fs_type: "ext4".into(),
            read_only: true,
            timeout_ms: 50,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("frakti-no-such-disk"), "{err:?}");
    let err = c
        .unmount_disk(pb::UnmountDiskRequest {
            disk_id: "image0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A rootfs on a disk that was never mounted.
    let err = c
        .create_container(pb::CreateContainerRequest {
            container_id: "c".into(),
            oci_spec_json: serde_json::to_vec(&spec(&["true"])).unwrap(),
            rootfs: Some(pb::Rootfs {
                source: Some(pb::rootfs::Source::DiskId("image0".into())),
                ..Default::default()
            }),
            devices: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn sandbox_stats_list_interfaces() {
    let mut agent = Agent::start().await;
    let stats = agent
        .client
        .stats_sandbox(pb::StatsSandboxRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(stats.mem_total_bytes > 0);
    assert!(stats.mem_available_bytes <= stats.mem_total_bytes);
    assert!(stats.interfaces.iter().all(|i| i.name != "lo"));
}

/// A veth pair in the agent's own network namespace: `tmp0` (MAC
/// 52:54:00:12:34:56, down) for the agent to configure, and its peer.
/// Loopback is up, as the guest's PID 1 leaves it.
const NETNS_SETUP: &str = "ip link set lo up && \
    ip link add tmp0 address 52:54:00:12:34:56 type veth peer name peer0 && \
    ip link set peer0 up";

const MAC: &str = "52:54:00:12:34:56";

/// `ip -j <args>` run in the agent's network namespace.
fn ip_json(agent: &Agent, args: &[&str]) -> Value {
    let output = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", agent.host_pid()))
        .args(["ip", "-j"])
        .args(args)
        .output()
        .expect("cannot run nsenter (util-linux)");
    assert!(output.status.success(), "ip {args:?}: {output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// "address/prefix" of each address `ip -j addr show dev <dev>` lists.
fn addresses(agent: &Agent, dev: &str) -> Vec<String> {
    ip_json(agent, &["addr", "show", "dev", dev])[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

fn addr(address: &str, prefix_len: u32) -> pb::IpAddress {
    pb::IpAddress {
        address: address.into(),
        prefix_len,
    }
}

fn route(destination: &str, gateway: &str, device: &str, metric: u32) -> pb::Route {
    pb::Route {
        destination: destination.into(),
        gateway: gateway.into(),
        device: device.into(),
        source: String::new(),
        metric,
    }
}

#[tokio::test]
async fn network_interfaces_routes_and_neighbours() {
    let mut agent = Agent::start_in_netns(NETNS_SETUP).await;
    let c = &mut agent.client;
    let interfaces = c
        .list_interfaces(pb::ListInterfacesRequest {})
        .await
        .unwrap()
        .into_inner()
        .interfaces;
    let tmp0 = interfaces.iter().find(|i| i.mac == MAC).unwrap();
    assert_eq!(tmp0.name, "tmp0");
    assert!(!tmp0.up);
    assert!(interfaces.iter().any(|i| i.name == "lo" && i.up));

    // Rename, MTU, IPv4 and IPv6 addresses, up.
    let eth0 = c
        .update_interface(pb::UpdateInterfaceRequest {
            interface: Some(pb::Interface {
                name: "eth0".into(),
                mac: MAC.to_uppercase(),
                mtu: 1400,
                addresses: vec![addr("10.88.0.5", 16), addr("fd00::5", 64)],
                up: true,
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .interface
        .unwrap();
    assert_eq!(
        (eth0.name.as_str(), eth0.mac.as_str(), eth0.mtu, eth0.up),
        ("eth0", MAC, 1400, true)
    );
    for a in ["10.88.0.5", "fd00::5"] {
        assert!(eth0.addresses.iter().any(|x| x.address == a), "{eth0:?}");
    }
    let link = &ip_json(&agent, &["link", "show", "dev", "eth0"])[0];
    assert_eq!(link["mtu"], 1400);
    assert_eq!(link["address"], MAC);
    assert!(
        link["flags"].as_array().unwrap().contains(&json!("UP")),
        "{link}"
    );
    let now = addresses(&agent, "eth0");
    assert!(now.contains(&"10.88.0.5/16".into()), "{now:?}");
    assert!(now.contains(&"fd00::5/64".into()), "{now:?}");

    // Addresses are replaced (the IPv6 link-local one stays); by name too.
    let c = &mut agent.client;
    c.update_interface(pb::UpdateInterfaceRequest {
        interface: Some(pb::Interface {
            name: "eth0".into(),
            addresses: vec![addr("10.88.0.6", 16), addr("fd00::5", 64)],
            up: true,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let now = addresses(&agent, "eth0");
    assert!(now.contains(&"10.88.0.6/16".into()), "{now:?}");
    assert!(!now.contains(&"10.88.0.5/16".into()), "{now:?}");
    assert!(now.contains(&"fd00::5/64".into()), "{now:?}");
    assert!(now.iter().any(|a| a.starts_with("fe80:")), "{now:?}");

    // Routes: a device route, default gateways of both families, a
    // gateway route with a metric.
    let c = &mut agent.client;
    let routes = c
        .update_routes(pb::UpdateRoutesRequest {
            routes: vec![
                route("10.88.0.0/16", "", "eth0", 0),
                route("", "10.88.0.1", "eth0", 0),
                route("192.168.10.0/24", "10.88.0.1", "eth0", 100),
                route("::/0", "fd00::1", "eth0", 0),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .routes;
    let has = |routes: &[pb::Route], dst: &str, gw: &str| {
        routes
            .iter()
            .any(|r| r.destination == dst && r.gateway == gw && r.device == "eth0")
    };
    assert!(has(&routes, "0.0.0.0/0", "10.88.0.1"), "{routes:?}");
    assert!(has(&routes, "192.168.10.0/24", "10.88.0.1"), "{routes:?}");
    assert!(has(&routes, "::/0", "fd00::1"), "{routes:?}");
    assert!(has(&routes, "10.88.0.0/16", ""), "{routes:?}");
    let v4 = ip_json(&agent, &["-4", "route"]);
    let v4 = v4.as_array().unwrap();
    assert!(
        v4.iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "10.88.0.1" && r["dev"] == "eth0"),
        "{v4:?}"
    );
    assert!(
        v4.iter()
            .any(|r| r["dst"] == "192.168.10.0/24" && r["metric"] == 100),
        "{v4:?}"
    );
    let v6 = ip_json(&agent, &["-6", "route"]);
    assert!(
        v6.as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "fd00::1"),
        "{v6:?}"
    );

    // Replacing drops the routes not asked for again; the kernel's routes
    // for the interface's own addresses stay.
    let c = &mut agent.client;
    c.update_routes(pb::UpdateRoutesRequest {
        routes: vec![route("", "10.88.0.1", "eth0", 0)],
    })
    .await
    .unwrap();
    let routes = c
        .list_routes(pb::ListRoutesRequest {})
        .await
        .unwrap()
        .into_inner()
        .routes;
    assert!(has(&routes, "0.0.0.0/0", "10.88.0.1"), "{routes:?}");
    assert!(has(&routes, "10.88.0.0/16", ""), "{routes:?}");
    assert!(!has(&routes, "192.168.10.0/24", "10.88.0.1"), "{routes:?}");
    assert!(!has(&routes, "::/0", "fd00::1"), "{routes:?}");
    let v4 = ip_json(&agent, &["-4", "route"]);
    assert!(
        !v4.as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "192.168.10.0/24"),
        "{v4:?}"
    );

    // Permanent neighbour entries, IPv4 and IPv6; adding again replaces.
    let neighbor = |ip: &str, mac: &str| pb::Neighbor {
        ip: ip.into(),
        mac: mac.into(),
        device: "eth0".into(),
    };
    let c = &mut agent.client;
    for mac in ["52:54:00:aa:bb:01", "52:54:00:aa:bb:cc"] {
        c.add_neighbors(pb::AddNeighborsRequest {
            neighbors: vec![neighbor("10.88.0.1", mac), neighbor("fd00::1", mac)],
        })
        .await
        .unwrap();
    }
    let neigh = ip_json(&agent, &["neigh", "show", "dev", "eth0"]);
    for dst in ["10.88.0.1", "fd00::1"] {
        assert!(
            neigh.as_array().unwrap().iter().any(|n| n["dst"] == dst
                && n["lladdr"] == "52:54:00:aa:bb:cc"
                && n["state"].as_array().unwrap().contains(&json!("PERMANENT"))),
            "{neigh:?}"
        );
    }

    // Loopback is left alone, and up.
    let lo = &ip_json(&agent, &["addr", "show", "dev", "lo"])[0];
    assert!(
        lo["flags"].as_array().unwrap().contains(&json!("UP")),
        "{lo}"
    );
    assert_eq!(lo["addr_info"][0]["local"], "127.0.0.1");
}

#[tokio::test]
async fn bad_network_requests_are_refused() {
    let mut agent = Agent::start_in_netns(NETNS_SETUP).await;
    let c = &mut agent.client;
    let interface = |mac: &str, addresses: Vec<pb::IpAddress>| pb::UpdateInterfaceRequest {
        interface: Some(pb::Interface {
            name: "eth0".into(),
            mac: mac.into(),
            mtu: 0,
            addresses,
            up: true,
        }),
    };
    let bad = [
        (
            interface("52:54:00:12:34", vec![]),
            Code::InvalidArgument,
            "52:54:00:12:34",
        ),
        (
            interface(MAC, vec![addr("10.88.0.300", 16)]),
            Code::InvalidArgument,
            "10.88.0.300",
        ),
        // Checked in full first: the good address is not added either.
        (
            interface(MAC, vec![addr("10.88.0.5", 16), addr("10.88.0.6", 33)]),
            Code::InvalidArgument,
            "33",
        ),
        (
            interface(MAC, vec![addr("fd00::5", 129)]),
            Code::InvalidArgument,
            "129",
        ),
        (
            interface("52:54:00:00:00:99", vec![]),
            Code::NotFound,
            "52:54:00:00:00:99",
        ),
        (
            pb::UpdateInterfaceRequest {
                interface: Some(pb::Interface {
                    name: "nope0".into(),
                    ..Default::default()
                }),
            },
            Code::NotFound,
            "nope0",
        ),
        (
            pb::UpdateInterfaceRequest {
                interface: Some(pb::Interface {
                    name: "lo".into(),
                    up: false,
                    ..Default::default()
                }),
            },
            Code::InvalidArgument,
            "loopback",
        ),
        (
            pb::UpdateInterfaceRequest {
                interface: Some(pb::Interface {
                    name: "peer0".into(),
                    mac: MAC.into(),
                    ..Default::default()
                }),
            },
            Code::AlreadyExists,
            "peer0",
        ),
        (
            pb::UpdateInterfaceRequest { interface: None },
            Code::InvalidArgument,
            "missing",
        ),
    ];
    for (request, code, text) in bad {
        let err = c.update_interface(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{request:?}: {err:?}");
        assert!(err.message().contains(text), "{request:?}: {err:?}");
    }
    assert_eq!(
        addresses(&agent, "tmp0")
            .iter()
            .filter(|a| !a.starts_with("fe80:"))
            .count(),
        0
    );
    let lo = &ip_json(&agent, &["link", "show", "dev", "lo"])[0];
    assert!(
        lo["flags"].as_array().unwrap().contains(&json!("UP")),
        "{lo}"
    );

    let c = &mut agent.client;
    let bad_routes = [
        (
            route("10.88.0.0/33", "", "tmp0", 0),
            Code::InvalidArgument,
            "10.88.0.0/33",
        ),
        (
            route("10.88.0.5/16", "", "tmp0", 0),
            Code::InvalidArgument,
            "host bits",
        ),
        (
            route("10.88.0.0", "", "tmp0", 0),
            Code::InvalidArgument,
            "10.88.0.0",
        ),
        (
            route("", "10.88.0.1.2", "tmp0", 0),
            Code::InvalidArgument,
            "10.88.0.1.2",
        ),
        (
            route("10.0.0.0/8", "fd00::1", "tmp0", 0),
            Code::InvalidArgument,
            "family",
        ),
        (
            route("10.0.0.0/8", "", "", 0),
            Code::InvalidArgument,
            "neither",
        ),
        (route("10.0.0.0/8", "", "nope0", 0), Code::NotFound, "nope0"),
    ];
    for (r, code, text) in bad_routes {
        let err = c
            .update_routes(pb::UpdateRoutesRequest {
                routes: vec![route("10.99.0.0/16", "", "tmp0", 0), r.clone()],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{r:?}: {err:?}");
        assert!(err.message().contains(text), "{r:?}: {err:?}");
    }
    // Nothing was added by the refused requests.
    let v4 = ip_json(&agent, &["-4", "route"]);
    assert_eq!(v4, json!([]), "{v4:?}");
    // A gateway the kernel cannot reach is the caller's mistake too.
    let c = &mut agent.client;
    let err = c
        .update_routes(pb::UpdateRoutesRequest {
            routes: vec![route("", "10.200.0.1", "tmp0", 0)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("10.200.0.1"), "{err:?}");

    let neighbor = |ip: &str, mac: &str, device: &str| pb::AddNeighborsRequest {
        neighbors: vec![pb::Neighbor {
            ip: ip.into(),
            mac: mac.into(),
            device: device.into(),
        }],
    };
    for (request, code, text) in [
        (
            neighbor("10.88.0.1", "52:54:00:aa:bb:cc", "nope0"),
            Code::NotFound,
            "nope0",
        ),
        (
            neighbor("10.88.0.1", "52:54:00:aa:bb", "tmp0"),
            Code::InvalidArgument,
            "52:54:00:aa:bb",
        ),
        (
            neighbor("10.88.1", "52:54:00:aa:bb:cc", "tmp0"),
            Code::InvalidArgument,
            "10.88.1",
        ),
    ] {
        let err = c.add_neighbors(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{request:?}: {err:?}");
        assert!(err.message().contains(text), "{request:?}: {err:?}");
    }
}

/// Opens a PortForward stream to `port`; the sender carries the data
/// chunks that follow the first message.
async fn port_forward(
    client: &mut Client,
    port: u32,
) -> Result<
    (
        tokio::sync::mpsc::Sender<pb::PortForwardData>,
        tonic::Streaming<pb::PortForwardData>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::PortForwardData { port, data: vec![] })
        .await
        .unwrap();
    let responses = client
        .port_forward(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, responses))
}

fn data(data: &[u8]) -> pb::PortForwardData {
    pb::PortForwardData {
        port: 0,
        data: data.to_vec(),
    }
}

/// The agent shares this test's network namespace (`Agent::start`), so a
/// listener on 127.0.0.1 here is one in the "sandbox".
#[tokio::test]
async fn port_forward_echoes_a_mebibyte_and_half_closes() {
    let mut agent = Agent::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Echoes until the client half-closes, then closes its own side.
    let echo = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let (mut rd, mut wr) = socket.into_split();
        let n = tokio::io::copy(&mut rd, &mut wr).await.unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut wr).await.unwrap();
        n
    });
    let (tx, mut responses) = port_forward(&mut agent.client, port.into()).await.unwrap();

    let sent: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect();
    let to_send = sent.clone();
    // Odd chunk sizes, so message and read boundaries never line up.
    let writer = tokio::spawn(async move {
        for chunk in to_send.chunks(10_007) {
            tx.send(data(chunk)).await.unwrap();
        }
        tx.send(data(&[])).await.unwrap();
        // Keep the request stream open: the half-close must come from the
        // empty chunk, and the server's stream must end on its own.
        tx
    });

    let mut received = Vec::with_capacity(sent.len());
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = responses.message().await.unwrap() {
            assert!(!message.data.is_empty());
            assert!(message.data.len() <= 32 * 1024);
            received.extend_from_slice(&message.data);
        }
    });
    read.await.expect("the forwarded stream did not end");
    let _tx = writer.await.unwrap();
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "the echoed bytes differ from those sent");
    assert_eq!(echo.await.unwrap(), sent.len() as u64);
}

#[tokio::test]
async fn port_forward_refusals() {
    // Own network namespace with loopback up: nothing listens anywhere.
    let mut agent = Agent::start_in_netns("ip link set lo up").await;
    let c = &mut agent.client;

    let e = port_forward(c, 8080).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message()
            .contains("nothing listens on 127.0.0.1:8080 in the sandbox"),
        "{e:?}"
    );

    for port in [0, 65536, u32::MAX] {
        let e = port_forward(c, port).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "port {port}: {e:?}");
        assert!(e.message().contains(&port.to_string()), "{e:?}");
    }

    let e = c
        .port_forward(tokio_stream::empty::<pb::PortForwardData>())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("first message"), "{e:?}");
}

#[tokio::test]
async fn port_forward_ends_when_the_guest_side_closes() {
    let mut agent = Agent::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Greets, reads one line and closes, whatever the client still sends.
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let (socket, _) = listener.accept().await.unwrap();
        let mut socket = tokio::io::BufReader::new(socket);
        socket.get_mut().write_all(b"hello\n").await.unwrap();
        let mut line = String::new();
        socket.read_line(&mut line).await.unwrap();
        socket.get_mut().write_all(b"bye\n").await.unwrap();
        line
    });
    let (tx, mut responses) = port_forward(&mut agent.client, port.into()).await.unwrap();
    tx.send(data(b"ping\n")).await.unwrap();
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(message) = responses.message().await.unwrap() {
            received.extend_from_slice(&message.data);
        }
    })
    .await
    .expect("the stream did not end when the guest side closed");
    assert_eq!(received, b"hello\nbye\n");
    assert_eq!(server.await.unwrap(), "ping\n");
    // The request stream is still open: the agent ended the RPC.
    drop(tx);
}

fn with_seccomp(mut spec: Value, profile: Value) -> Value {
    spec["linux"]["seccomp"] = profile;
    spec
}

#[tokio::test]
async fn seccomp_profiles_apply_to_init_and_exec() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    // With no_new_privs the filter goes on right before execve.
    let deny_mkdir = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let s = with_seccomp(
        spec(&[
            "sh",
            "-c",
            "mkdir /tmp/a 2>&1; echo rc=$?; touch /tmp/b && echo touched; sleep 1000",
        ]),
        deny_mkdir,
    );
    run(c, "filtered", &s).await;
    let mut out = c
        .read_output(tokio_stream::once(pb::ReadOutputRequest {
            container_id: "filtered".into(),
            exec_id: String::new(),
            stream: pb::OutputStream::Stdout as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let text = read_until(&mut out, "touched").await;
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(text.contains("rc=1"), "{text}");
    // A process exec'd into the container gets the container's profile.
    exec(c, "filtered", "mk", process(&["mkdir", "/tmp/c"]))
        .await
        .unwrap();
    assert_eq!(wait(c, "filtered", "mk").await.exit_code, 1);
    exec(c, "filtered", "ok", process(&["touch", "/tmp/d"]))
        .await
        .unwrap();
    assert_eq!(wait(c, "filtered", "ok").await.exit_code, 0);

    // Without no_new_privs the filter goes on before the change of user.
    let kill_mkdir = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_KILL_PROCESS"}]
    });
    let mut s = with_seccomp(spec(&["mkdir", "/tmp/a"]), kill_mkdir);
    s["process"]["noNewPrivileges"] = json!(false);
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    run(c, "killed", &s).await;
    let status = wait(c, "killed", "").await;
    assert_eq!(
        (status.signal, status.exit_code),
        (libc::SIGSYS, 128 + libc::SIGSYS),
        "{status:?}"
    );
}

#[tokio::test]
async fn bad_seccomp_profiles_are_refused() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    for (name, profile, expected) in [
        (
            "notify",
            json!({"defaultAction": "SCMP_ACT_NOTIFY"}),
            "SCMP_ACT_NOTIFY",
        ),
        (
            "badarg",
            json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"],
                   "action": "SCMP_ACT_ERRNO", "args": [{"index": 9, "value": 0, "op": "SCMP_CMP_EQ"}]}]}),
            "argument 9",
        ),
        (
            "badaction",
            json!({"defaultAction": "SCMP_ACT_EXPLODE"}),
            "malformed OCI spec",
        ),
    ] {
        let err = create(c, name, &with_seccomp(spec(&["true"]), profile))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(expected), "{err:?}");
    }
    run(c, "fine", &spec(&["true"])).await;
    assert_eq!(wait(c, "fine", "").await.exit_code, 0);
}

/// A hostile image: /etc and a mount target are symlinks that point out of
/// the root (through '..' and absolute paths). Mounts and nodes land inside
/// the container's root; nothing outside it is touched.
#[tokio::test]
async fn symlinks_in_the_image_do_not_lead_out_of_the_root() {
    let mut agent = Agent::start().await;
    let image = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let r = image.path();
    std::fs::create_dir_all(r.join("bin")).unwrap();
    std::fs::create_dir_all(r.join("proc")).unwrap();
    std::fs::copy(busybox_rootfs().join("bin/busybox"), r.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(applet)).unwrap();
    }
    let escape = |name: &str| format!("/../../../..{}/{name}", outside.path().display());
    std::fs::create_dir_all(outside.path().join("etc")).unwrap();
    std::fs::create_dir_all(outside.path().join("data")).unwrap();
    std::os::unix::fs::symlink(escape("etc"), r.join("etc")).unwrap();
    std::os::unix::fs::symlink(escape("data"), r.join("data")).unwrap();
    std::os::unix::fs::symlink("/../../..", r.join("devlink")).unwrap();
    let hosts = agent.dir.path().join("hosts-file");
    std::fs::write(&hosts, "10.0.0.1 pod\n").unwrap();

    let mut spec = spec(&[
        "sh",
        "-c",
        "cat /etc/hosts && ls /data/cache && ls /nodes/disk",
    ]);
    let mounts = spec["mounts"].as_array_mut().unwrap();
    mounts.retain(|m| m["destination"] == "/proc" || m["destination"] == "/dev");
    mounts.push(json!({"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "ro"]}));
    mounts.push(json!({"destination": "/data/cache", "type": "tmpfs", "source": "tmpfs"}));
    spec["linux"]["devices"] =
        json!([{"path": "/devlink/nodes/disk", "type": "c", "major": 1, "minor": 3}]);
    let c = &mut agent.client;
    c.create_container(pb::CreateContainerRequest {
        container_id: "hostile".into(),
        oci_spec_json: serde_json::to_vec(&spec).unwrap(),
        rootfs: Some(pb::Rootfs {
            source: Some(pb::rootfs::Source::GuestPath(r.display().to_string())),
            ..Default::default()
        }),
        devices: vec![],
    })
    .await
    .unwrap();
    start(c, "hostile").await.unwrap();
    let out = read_all(c, "hostile", "", pb::OutputStream::Stdout).await;
    let status = wait(c, "hostile", "").await;
    assert_eq!(status.exit_code, 0, "{out}");
    assert!(out.starts_with("10.0.0.1 pod\n"), "{out}");
    assert!(out.contains("/nodes/disk"), "{out}");

    let listing = |dir: &Path| -> Vec<String> {
        walk(dir)
            .into_iter()
            .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
            .collect()
    };
    assert_eq!(
        listing(outside.path()),
        ["data", "etc"],
        "outside the root, only what was there"
    );
    let inside = r.join(outside.path().strip_prefix("/").unwrap());
    assert!(
        inside.join("etc/hosts").is_file(),
        "the mount point is in the root"
    );
    assert!(inside.join("data/cache").is_dir());
    assert!(r.join("nodes/disk").exists(), "the node is in the root");
}

/// Every path below `dir`, sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            all.extend(walk(&path));
        }
        all.push(path);
    }
    all.sort();
    all
}
