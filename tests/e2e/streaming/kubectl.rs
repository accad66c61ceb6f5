//! kubectl 1.20 (an independent SPDY/3.1 client) through the fake API
//! server to frakti's streaming server, against one pod VM: exec (exit
//! codes, stdin, 64 MiB in, a TTY's size, a missing binary, 20 at once, a
//! client that goes away), attach (two clients on one container, stdin)
//! and port-forward (64 MiB both ways, several ports and connections, a
//! port nobody listens on).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_cri::v1 as cri;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::apiserver::{self, ApiServer, ContainerSpec, PodSpec, Subresource};
use crate::cri::harness::{
    self, Daemon, Runtime, container_config, create, exec, pod_config, remove_pod_without_leaks,
    run_pod, start,
};

/// Bytes sent through stdin and through a port-forward.
const PAYLOAD: usize = 64 << 20;

/// Containers of the test pod, by name.
pub(super) type Containers = Arc<HashMap<String, String>>;

/// Runs kubectl against the fake API server.
#[derive(Clone)]
struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    fn command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut command = Command::from(apiserver::kubectl_command(&self.kubeconfig, &self.cache)?);
        command.args(args).kill_on_drop(true);
        Ok(command)
    }

    /// Runs to the end with `stdin`; (exit code, stdout, stderr).
    async fn run(
        &self,
        args: &[&str],
        stdin: Option<Vec<u8>>,
        limit: Duration,
    ) -> anyhow::Result<(i32, Vec<u8>, String)> {
        let mut command = self.command(args)?;
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("kubectl")?;
        if let Some(data) = stdin {
            let mut pipe = child.stdin.take().context("no stdin pipe")?;
            tokio::spawn(async move {
                let _ = pipe.write_all(&data).await;
            });
        }
        let output = tokio::time::timeout(limit, child.wait_with_output())
            .await
            .with_context(|| format!("kubectl {args:?} still runs after {limit:?}"))??;
        Ok((
            output.status.code().unwrap_or(-1),
            output.stdout,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }
}

pub async fn kubectl_streaming(daemon: &mut Daemon) -> anyhow::Result<()> {
    {
        let mut c = daemon.runtime().await?;
        let pod = run_pod(&mut c, pod_config("stream", &daemon.log_dir())).await?;
        let mut ids = HashMap::new();
        let specs = [
            ("main", &["sleep", "100000"][..], false),
            (
                "echo",
                &["busybox", "nc", "-ll", "-p", "8080", "-e", "cat"][..],
                false,
            ),
            (
                "echo2",
                &["busybox", "nc", "-ll", "-p", "8081", "-e", "cat"][..],
                false,
            ),
            (
                "ticker",
                &[
                    "sh",
                    "-c",
                    "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done",
                ][..],
                false,
            ),
            (
                "talk",
                &["sh", "-c", "while read line; do echo \"got $line\"; done"][..],
                true,
            ),
        ];
        for (name, command, stdin) in specs {
            let mut config = container_config(name, command);
            config.stdin = stdin;
            let id = create(&mut c, &pod, config).await?;
            start(&mut c, &id).await?;
            ids.insert(name.to_string(), id);
        }
        let ids: Containers = Arc::new(ids);
        let containers = ["main", "echo", "echo2", "ticker", "talk"].map(|name| {
            let spec = ContainerSpec::new(name);
            if name == "talk" {
                ContainerSpec {
                    stdin: true,
                    ..spec
                }
            } else {
                spec
            }
        });
        let server = ApiServer::start(
            [PodSpec::with("stream", containers)],
            apiserver::handler({
                let c = c.clone();
                let ids = ids.clone();
                let pod = pod.clone();
                move |sub| streaming_url(c.clone(), ids.clone(), pod.clone(), sub)
            }),
        )
        .await?;
        let dir = tempfile::tempdir()?;
        let kubectl = Kubectl {
            kubeconfig: server.kubeconfig(dir.path())?,
            cache: dir.path().join("cache"),
        };

        let pid = daemon.pid().context("the daemon is not running")?;
        let peak_before = peak_rss_kib(pid)?;
        let cases = async {
            let step = Instant::now();
            exec_cases(&kubectl, &mut c, &ids).await?;
            eprintln!(
                "streaming: exec cases took {:.1} s",
                step.elapsed().as_secs_f64()
            );
            let step = Instant::now();
            attach_cases(&kubectl).await?;
            eprintln!(
                "streaming: attach cases took {:.1} s",
                step.elapsed().as_secs_f64()
            );
            let step = Instant::now();
            port_forward_cases(&kubectl).await?;
            eprintln!(
                "streaming: port-forward cases took {:.1} s",
                step.elapsed().as_secs_f64()
            );
            let step = Instant::now();
            token_and_request_checks(&mut c, &pod, &ids).await?;
            eprintln!(
                "streaming: token checks took {:.1} s",
                step.elapsed().as_secs_f64()
            );
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = cases {
            return Err(e.context(format!("the API server saw: {:#?}", server.requests())));
        }

        // 64 MiB went in through stdin and 64 MiB each way through a
        // port-forward: with back-pressure, none of it piled up.
        let growth = peak_rss_kib(pid)?.saturating_sub(peak_before);
        eprintln!(
            "  the daemon's peak RSS grew by {} KiB over all cases",
            growth
        );
        ensure!(
            growth < 32 * 1024,
            "the daemon's peak RSS grew by {growth} KiB: streamed data was buffered"
        );
        drop(server);
        remove_pod_without_leaks(daemon, &mut c, &pod).await
    }
}

/// A process's peak resident set (VmHWM), KiB.
fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

/// What kubelet does for the API server: the CRI call whose answer is the
/// URL to proxy to.
pub(super) async fn streaming_url(
    mut c: Runtime,
    ids: Containers,
    pod: String,
    sub: Subresource,
) -> anyhow::Result<String> {
    let id = |name: &str| {
        ids.get(name)
            .cloned()
            .with_context(|| format!("no container {name}"))
    };
    Ok(match sub {
        Subresource::Exec {
            container,
            command,
            stdin,
            stdout,
            stderr,
            tty,
            ..
        } => {
            c.exec(cri::ExecRequest {
                container_id: id(&container)?,
                cmd: command,
                tty,
                stdin,
                stdout,
                stderr,
            })
            .await?
            .into_inner()
            .url
        }
        Subresource::Attach {
            container,
            stdin,
            stdout,
            stderr,
            tty,
            ..
        } => {
            c.attach(cri::AttachRequest {
                container_id: id(&container)?,
                stdin,
                tty,
                stdout,
                stderr,
            })
            .await?
            .into_inner()
            .url
        }
        Subresource::PortForward { ports, .. } => {
            c.port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod,
                port: ports.into_iter().map(i32::from).collect(),
            })
            .await?
            .into_inner()
            .url
        }
    })
}

fn payload(seed: u8) -> Vec<u8> {
    // Not compressible, not all alike: a 1 MiB pseudo-random block, each
    // copy of it changed by its index (a debug build generates it fast).
    const BLOCK: usize = 1 << 20;
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    let block: Vec<u8> = (0..BLOCK)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let mut data = Vec::with_capacity(PAYLOAD);
    for copy in 0..PAYLOAD / BLOCK {
        data.extend(block.iter().map(|b| b ^ (copy as u8)));
    }
    data
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn exec_cases(kubectl: &Kubectl, c: &mut Runtime, ids: &Containers) -> anyhow::Result<()> {
    let limit = Duration::from_secs(120);
    // A terminal: its size reaches the process.
    let (code, out) = exec_with_tty(kubectl, 33, 111).await?;
    ensure!(
        code == 0 && out.contains("33 111"),
        "stty size: {code} {out:?}"
    );
    eprintln!("  exec -it: stty size says 33 111, as the client's terminal");

    // Output on both streams, the exit code through the error stream.
    let (code, out, err) = kubectl
        .run(
            &[
                "exec",
                "stream",
                "-c",
                "main",
                "--",
                "sh",
                "-c",
                "echo out; echo err >&2; exit 3",
            ],
            None,
            limit,
        )
        .await?;
    ensure!(
        code == 3 && out == b"out\n" && err.contains("err"),
        "exit 3: code {code}, stdout {:?}, stderr {err:?}",
        String::from_utf8_lossy(&out)
    );
    eprintln!("  exec: stdout, stderr and exit code 3 as kubectl shows them");

    // stdin piped, and its end reaches the process.
    let (code, out, err) = kubectl
        .run(
            &["exec", "-i", "stream", "-c", "main", "--", "cat"],
            Some(b"piped\n".to_vec()),
            limit,
        )
        .await?;
    ensure!(code == 0 && out == b"piped\n", "cat: {code} {out:?} {err}");

    // 64 MiB through stdin.
    let data = payload(1);
    let expected = hex_sha256(&data);
    let started = Instant::now();
    let (code, out, err) = kubectl
        .run(
            &["exec", "-i", "stream", "-c", "main", "--", "sha256sum"],
            Some(data),
            Duration::from_secs(900),
        )
        .await?;
    let text = String::from_utf8_lossy(&out);
    ensure!(
        code == 0 && text.starts_with(&expected),
        "sha256sum of 64 MiB: code {code}, {text:?} (want {expected}), {err}"
    );
    eprintln!(
        "  exec: 64 MiB through stdin, sha256 matches, in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // A command that does not exist fails at once with 127.
    let started = Instant::now();
    let (code, _, err) = kubectl
        .run(
            &["exec", "stream", "-c", "main", "--", "/no/such/binary"],
            None,
            limit,
        )
        .await?;
    ensure!(
        code == 127 && err.contains("not found"),
        "missing binary: {code} {err}"
    );
    eprintln!(
        "  exec: a missing binary exits 127 in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        err.lines().next().unwrap_or("")
    );

    // 20 at once.
    let started = Instant::now();
    let runs: Vec<_> = (0..20)
        .map(|i| {
            let kubectl = kubectl.clone();
            let word = format!("exec-{i}");
            tokio::spawn(async move {
                let result = kubectl
                    .run(
                        &["exec", "stream", "-c", "main", "--", "echo", &word],
                        None,
                        Duration::from_secs(300),
                    )
                    .await;
                (word, result)
            })
        })
        .collect();
    for run in runs {
        let (word, result) = run.await?;
        let (code, out, err) = result?;
        ensure!(
            code == 0 && out == format!("{word}\n").as_bytes(),
            "concurrent exec {word}: {code} {out:?} {err}"
        );
    }
    eprintln!(
        "  exec: 20 at once in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // A client that goes away: its process goes too.
    let mut child = kubectl
        .command(&["exec", "stream", "-c", "main", "--", "sleep", "4242"])?
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let main = &ids["main"];
    wait_for_process(c, main, "sleep 4242", true).await?;
    child.kill().await?;
    wait_for_process(c, main, "sleep 4242", false).await?;
    eprintln!("  exec: the process of a client killed mid-exec is gone");
    Ok(())
}

/// Polls `ps` in the container until a process matching `needle` is (or
/// is no longer) there.
async fn wait_for_process(
    c: &mut Runtime,
    container: &str,
    needle: &str,
    present: bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = exec(c, container, &["busybox", "ps", "-o", "args"], 30).await?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let seen = text.lines().any(|l| l.trim() == needle);
        if seen == present {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{needle:?} present={seen} after 60 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `kubectl exec -it … stty size` on a pseudo-terminal of `rows`×`cols`.
async fn exec_with_tty(kubectl: &Kubectl, rows: u16, cols: u16) -> anyhow::Result<(i32, String)> {
    let size = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None)?;
    let slave = std::fs::File::from(pty.slave);
    let mut command = kubectl.command(&[
        "exec", "-it", "stream", "-c", "main", "--", "busybox", "stty", "size",
    ])?;
    command
        .stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave);
    let mut child = command.spawn()?;
    let master = std::fs::File::from(pty.master);
    let reader = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut master = master;
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once every slave descriptor is closed (kubectl exited).
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait())
        .await
        .context("kubectl exec -it still runs after 120 s")??;
    drop(command);
    let text = tokio::time::timeout(Duration::from_secs(10), reader).await??;
    Ok((status.code().unwrap_or(-1), text))
}

/// Spawns a long-running kubectl with its stdout as lines.
fn spawn_lines(
    kubectl: &Kubectl,
    args: &[&str],
    stdin: bool,
) -> anyhow::Result<(
    Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
)> {
    let mut child = kubectl
        .command(args)?
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    Ok((child, BufReader::new(stdout).lines()))
}

async fn next_line_with(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    needle: &str,
) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .with_context(|| format!("no line with {needle:?} within 120 s"))??;
        match line {
            Some(line) if line.contains(needle) => return Ok(line),
            Some(_) => {}
            None => bail!("output ended before a line with {needle:?}"),
        }
    }
}

async fn attach_cases(kubectl: &Kubectl) -> anyhow::Result<()> {
    // Two clients watch one container.
    let (mut first, mut first_lines) =
        spawn_lines(kubectl, &["attach", "stream", "-c", "ticker"], false)?;
    let (mut second, mut second_lines) =
        spawn_lines(kubectl, &["attach", "stream", "-c", "ticker"], false)?;
    let a = next_line_with(&mut first_lines, "tick").await?;
    let b = next_line_with(&mut second_lines, "tick").await?;
    eprintln!("  attach: two clients on one container see {a:?} and {b:?}");
    first.kill().await?;
    second.kill().await?;

    // stdin through an attach.
    let (mut talk, mut lines) =
        spawn_lines(kubectl, &["attach", "-i", "stream", "-c", "talk"], true)?;
    let mut stdin = talk.stdin.take().context("no stdin")?;
    stdin.write_all(b"hello\n").await?;
    let line = next_line_with(&mut lines, "got").await?;
    ensure!(line == "got hello", "attach stdin: {line:?}");
    eprintln!("  attach -i: the container read what the client typed");
    talk.kill().await?;
    Ok(())
}

async fn port_forward_cases(kubectl: &Kubectl) -> anyhow::Result<()> {
    let (mut forward, mut lines) = spawn_lines(
        kubectl,
        &[
            "port-forward",
            "--address",
            "127.0.0.1",
            "pod/stream",
            "18080:8080",
            "18081:8081",
            "18082:8082",
        ],
        false,
    )?;
    next_line_with(&mut lines, "18082").await?;

    // 64 MiB both ways through the echo server.
    let data = payload(2);
    let started = Instant::now();
    let echoed = echo(18080, data.clone()).await?;
    ensure!(
        hex_sha256(&echoed) == hex_sha256(&data),
        "64 MiB echoed through port-forward: {} bytes back, hashes differ",
        echoed.len()
    );
    eprintln!(
        "  port-forward: 64 MiB each way, hashes match, in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Several connections at once, on two ports.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..6u8 {
        let port = if i % 2 == 0 { 18080 } else { 18081 };
        tasks.push(tokio::spawn(echo(
            port,
            vec![b'a' + i; 1000 + usize::from(i)],
        )));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let back = task.await??;
        let i = u8::try_from(i)?;
        ensure!(
            back == vec![b'a' + i; 1000 + usize::from(i)],
            "connection {i}"
        );
    }
    eprintln!(
        "  port-forward: 6 connections on 2 ports at once in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Nobody listens on 8082: the connection ends, kubectl says why.
    let started = Instant::now();
    let mut socket = TcpStream::connect(("127.0.0.1", 18082)).await?;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), socket.read_to_end(&mut rest))
        .await
        .context("a connection to a closed port hangs")??;
    ensure!(rest.is_empty(), "data from a closed port: {rest:?}");
    eprintln!(
        "  port-forward: a port nobody listens on closes the connection in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    forward.kill().await?;
    let output = forward.wait_with_output().await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        stderr.contains("8082"),
        "kubectl did not report the failed port: {stderr}"
    );
    Ok(())
}

/// Sends `data` to the local port and reads until the far end closes.
async fn echo(port: u16, data: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let socket = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut read, mut write) = socket.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(&data).await?;
        write.shutdown().await?;
        anyhow::Ok(())
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(900), read.read_to_end(&mut back))
        .await
        .context("echo did not end")??;
    writer.await??;
    Ok(back)
}

async fn token_and_request_checks(
    c: &mut Runtime,
    pod: &str,
    ids: &Containers,
) -> anyhow::Result<()> {
    let main = ids["main"].clone();
    let url = c
        .exec(cri::ExecRequest {
            container_id: main.clone(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .url;
    ensure!(
        url.starts_with("http://127.0.0.1:") && url.contains("/exec/"),
        "{url}"
    );
    // Used once (not upgraded: still refused next time), then unknown.
    let first = http_get(&url).await?;
    ensure!(
        first.starts_with("HTTP/1.1 400"),
        "first use without an upgrade: {first}"
    );
    let reused = http_get(&url).await?;
    ensure!(reused.starts_with("HTTP/1.1 404"), "reused token: {reused}");
    let base = url.rsplit_once('/').map(|(base, _)| base).unwrap_or(&url);
    let bad = http_get(&format!("{base}/not-a-token")).await?;
    ensure!(bad.starts_with("HTTP/1.1 404"), "bad token: {bad}");
    let root = url.split("/exec/").next().unwrap_or(&url);
    let other = http_get(&format!("{root}/metrics")).await?;
    ensure!(other.starts_with("HTTP/1.1 404"), "other paths: {other}");

    // Bad requests get the right codes.
    let code = |r: Result<tonic::Response<cri::ExecResponse>, tonic::Status>| harness::code(r);
    let empty = c
        .exec(cri::ExecRequest {
            container_id: main.clone(),
            stdout: true,
            ..Default::default()
        })
        .await;
    ensure!(
        code(empty) == tonic::Code::InvalidArgument,
        "an exec without a command"
    );
    let silent = c
        .exec(cri::ExecRequest {
            container_id: main.clone(),
            cmd: vec!["true".into()],
            ..Default::default()
        })
        .await;
    ensure!(
        code(silent) == tonic::Code::InvalidArgument,
        "an exec without streams"
    );
    let unknown = c
        .exec(cri::ExecRequest {
            container_id: "f".repeat(64),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
        .await;
    ensure!(
        code(unknown) == tonic::Code::NotFound,
        "an exec in an unknown container"
    );
    let stdin = c
        .attach(cri::AttachRequest {
            container_id: main.clone(),
            stdin: true,
            stdout: true,
            ..Default::default()
        })
        .await;
    ensure!(
        harness::code(stdin) == tonic::Code::InvalidArgument,
        "attach stdin without stdin"
    );
    let port = c
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![70000],
        })
        .await;
    ensure!(
        harness::code(port) == tonic::Code::InvalidArgument,
        "port 70000"
    );
    eprintln!("  tokens: used, reused and unknown ones refused; bad requests get their codes");
    Ok(())
}

/// A plain GET; returns the response head and body as text.
async fn http_get(url: &str) -> anyhow::Result<String> {
    let (host, path) = super::spdy_client::split_url(url)?;
    let mut socket = TcpStream::connect(host).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    socket.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut response)).await??;
    Ok(String::from_utf8_lossy(&response).into_owned())
}
