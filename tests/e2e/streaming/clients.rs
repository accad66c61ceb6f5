//! Our own SPDY/3.1 ([`super::spdy_client`]) and WebSocket
//! (tokio-tungstenite) clients against the streaming server, for what
//! kubectl 1.20 cannot do: terminal resizes mid-session, malformed SPDY,
//! the WebSocket protocols (v5 with its stdin close signal, base64,
//! port-forward) and many connections over one SPDY port-forward session.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use base64::Engine;
use bytes::BytesMut;
use frakti_cri::streaming::spdy::frame::{Codec, Frame};
use futures_util::{SinkExt, Stream, StreamExt};
use k8s_cri::v1 as cri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{WebSocketStream, client_async};
use tokio_util::codec::Decoder;

use super::spdy_client::{self, SpdyClient, split_url};
use crate::cri::harness::{
    Daemon, Runtime, exec, pod_config, remove_pod_without_leaks, run_container, run_pod,
};

/// How long any one wait may take.
const LIMIT: Duration = Duration::from_secs(120);

type Ws = WebSocketStream<TcpStream>;

pub async fn own_clients(daemon: &mut Daemon) -> anyhow::Result<()> {
    let mut c = daemon.runtime().await?;
    let pod = run_pod(&mut c, pod_config("clients", &daemon.log_dir())).await?;
    let main = run_container(&mut c, &pod, "main", &["sleep", "100000"]).await?;
    run_container(
        &mut c,
        &pod,
        "echo",
        &["busybox", "nc", "-ll", "-p", "8080", "-e", "cat"],
    )
    .await?;

    spdy_exec_with_resizes(&mut c, &main).await?;
    malformed_spdy(&mut c, &main).await?;
    websocket_v5_exec(&mut c, &main).await?;
    websocket_base64_exec(&mut c, &main).await?;
    websocket_port_forward(&mut c, &pod).await?;
    spdy_port_forward_session(&mut c, &pod).await?;

    remove_pod_without_leaks(daemon, &mut c, &pod).await
}

/// An exec request for `cmd` in `container`, no streams yet.
fn exec_request(container: &str, cmd: &[&str]) -> cri::ExecRequest {
    cri::ExecRequest {
        container_id: container.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn exec_url(c: &mut Runtime, request: cri::ExecRequest) -> anyhow::Result<String> {
    Ok(c.exec(request).await.context("Exec")?.into_inner().url)
}

async fn port_forward_url(c: &mut Runtime, pod: &str, ports: &[i32]) -> anyhow::Result<String> {
    let request = cri::PortForwardRequest {
        pod_sandbox_id: pod.into(),
        port: ports.to_vec(),
    };
    Ok(c.port_forward(request)
        .await
        .context("PortForward")?
        .into_inner()
        .url)
}

/// Checks the metav1.Status of a v4/v5 error stream: `Success` for 0,
/// else `NonZeroExitCode` with the code as its `ExitCode` cause.
fn check_status(raw: &[u8], code: i32) -> anyhow::Result<()> {
    let text = String::from_utf8_lossy(raw);
    let status: serde_json::Value = serde_json::from_slice(raw)
        .with_context(|| format!("the error stream holds no Status: {text:?}"))?;
    if code == 0 {
        ensure!(
            status["status"] == "Success",
            "want a Success status, got {text}"
        );
        return Ok(());
    }
    let cause = &status["details"]["causes"][0];
    // The code as text: a number there would not do.
    let code_text = code.to_string();
    ensure!(
        status["status"] == "Failure"
            && status["reason"] == "NonZeroExitCode"
            && cause["reason"] == "ExitCode"
            && cause["message"] == code_text.as_str(),
        "want a NonZeroExitCode status with exit code {code}, got {text}"
    );
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Incompressible, seed-dependent bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn lossy_tail(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(600)..]).into_owned()
}

/// 1. `sh` on a terminal over SPDY: two resizes reach it, `exit 3`
///    comes back as a Status on the error stream.
async fn spdy_exec_with_resizes(c: &mut Runtime, main: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let url = exec_url(
        c,
        cri::ExecRequest {
            tty: true,
            stdin: true,
            stdout: true,
            ..exec_request(main, &["sh"])
        },
    )
    .await?;
    let mut spdy = SpdyClient::upgrade(&url, "v4.channel.k8s.io").await?;
    let mut error = spdy.open(&[("streamtype", "error")])?;
    let mut stdin = spdy.open(&[("streamtype", "stdin")])?;
    let mut stdout = spdy.open(&[("streamtype", "stdout")])?;
    let mut resize = spdy.open(&[("streamtype", "resize")])?;
    let deadline = tokio::time::Instant::now() + LIMIT;
    for stream in [&mut error, &mut stdin, &mut stdout, &mut resize] {
        stream.replied(deadline).await?;
    }

    let mut output = Vec::new();
    spdy.send(resize.id, br#"{"Width":100,"Height":30}"#, false)?;
    let first = terminal_size(&spdy, stdin.id, &mut stdout, &mut output, "30 100").await?;
    spdy.send(resize.id, br#"{"Width":120,"Height":50}"#, false)?;
    let second = terminal_size(&spdy, stdin.id, &mut stdout, &mut output, "50 120").await?;

    spdy.send(stdin.id, b"exit 3\n", false)?;
    let status = error
        .read_to_fin(deadline)
        .await
        .context("the error stream")?;
    check_status(&status, 3)?;
    let rest = stdout.read_to_fin(deadline).await.with_context(|| {
        format!(
            "stdout after exit; the terminal showed: {:?}",
            lossy_tail(&output)
        )
    })?;
    output.extend_from_slice(&rest);
    let (why, goaway) = spdy.closed(Duration::from_secs(30)).await?;
    eprintln!(
        "  spdy exec -t: stty size says 30 100 then 50 120 after resizes ({first}+{second} \
         commands), exit 3 as a Status, then {why} (GOAWAY {goaway:?}), in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Types `busybox stty size` until the terminal shows `want` (the resize
/// and the command travel separately: a command may see the old size).
/// Returns how many commands it took.
async fn terminal_size(
    spdy: &SpdyClient,
    stdin: u32,
    stdout: &mut spdy_client::SpdyStream,
    output: &mut Vec<u8>,
    want: &str,
) -> anyhow::Result<u32> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    let from = output.len();
    let mut attempt = 0;
    loop {
        attempt += 1;
        spdy.send(stdin, b"busybox stty size\n", false)?;
        let retry = (tokio::time::Instant::now() + Duration::from_secs(3)).min(deadline);
        loop {
            if contains(&output[from..], want.as_bytes()) {
                return Ok(attempt);
            }
            match tokio::time::timeout_at(retry, stdout.data(deadline)).await {
                Err(_) => break,
                Ok(Ok(Some(data))) => output.extend_from_slice(&data),
                Ok(Ok(None)) => bail!(
                    "stdout ended before {want:?}; it showed: {:?}",
                    lossy_tail(output)
                ),
                Ok(Err(e)) => {
                    return Err(e.context(format!(
                        "waiting for {want:?}; the terminal showed: {:?}",
                        lossy_tail(output)
                    )));
                }
            }
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no {want:?} on the terminal within {LIMIT:?} ({attempt} commands); it showed: {:?}",
            lossy_tail(output)
        );
    }
}

/// 2. Malformed SPDY after a good upgrade: the server closes the
///    connection, and the daemon goes on.
async fn malformed_spdy(c: &mut Runtime, main: &str) -> anyhow::Result<()> {
    let cases: [(&str, &[u8]); 3] = [
        // A SYN_STREAM head of version 2.
        (
            "a version 2 control frame",
            &[0x80, 0x02, 0x00, 0x01, 0, 0, 0, 0],
        ),
        // DATA on stream 1 declaring 16 MiB.
        ("a 16 MiB DATA frame", &[0, 0, 0, 1, 0, 0xff, 0xff, 0xff]),
        // A whole SYN_STREAM whose header block is not zlib.
        (
            "a header block that is not zlib",
            &[
                0x80, 0x03, 0x00, 0x01, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xde, 0xad,
                0xbe, 0xef,
            ],
        ),
    ];
    for (name, garbage) in cases {
        let url = exec_url(
            c,
            cri::ExecRequest {
                stdout: true,
                ..exec_request(main, &["echo", "never"])
            },
        )
        .await?;
        let (mut socket, early, _head) = spdy_client::upgrade(&url, "v4.channel.k8s.io").await?;
        let started = Instant::now();
        socket.write_all(garbage).await?;
        let mut rest = early;
        let read =
            tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut rest)).await;
        let ending = match read {
            Err(_) => bail!("{name}: the connection is still open after 30 s (read {rest:?})"),
            Ok(Ok(_)) => "closed",
            // Closed with unread bytes: a reset, still a close.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
            Ok(Err(e)) => return Err(e).context(format!("{name}: reading to the end")),
        };
        let elapsed = started.elapsed().as_secs_f64();
        let mut codec = Codec::new();
        let mut buffer = BytesMut::from(&rest[..]);
        let mut frames = Vec::new();
        while let Ok(Some(frame)) = codec.decode(&mut buffer) {
            frames.push(frame);
        }
        let goaway = frames.iter().find_map(|f| match f {
            Frame::GoAway { status, .. } => Some(*status),
            _ => None,
        });
        ensure!(
            frames.iter().all(|f| matches!(f, Frame::GoAway { .. })),
            "{name}: frames other than GOAWAY before the end: {frames:?}"
        );
        eprintln!(
            "  spdy: {name} after the upgrade: connection {ending} in {elapsed:.2} s (GOAWAY {goaway:?})"
        );
    }
    let out = exec(c, main, &["echo", "alive"], 30)
        .await
        .context("ExecSync after malformed SPDY")?;
    ensure!(
        out.exit_code == 0 && out.stdout == b"alive\n",
        "ExecSync after malformed SPDY: exit {} stdout {:?} stderr {:?}",
        out.exit_code,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("  spdy: the daemon still answers ExecSync");
    Ok(())
}

/// Connects a WebSocket to the `http://` streaming `url` offering
/// `protocol`; the server must choose it.
async fn ws_connect(url: &str, protocol: &str) -> anyhow::Result<Ws> {
    let (host, _) = split_url(url)?;
    let ws_url = format!("ws://{}", url.trim_start_matches("http://"));
    let mut request = ws_url.as_str().into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(protocol)?);
    let socket = TcpStream::connect(host)
        .await
        .with_context(|| format!("connect {host}"))?;
    let (ws, response) =
        tokio::time::timeout(Duration::from_secs(30), client_async(request, socket))
            .await
            .context("no WebSocket handshake within 30 s")?
            .with_context(|| format!("WebSocket handshake with {ws_url} offering {protocol}"))?;
    let chosen = response
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok());
    ensure!(
        chosen == Some(protocol),
        "the server chose WebSocket protocol {chosen:?}, not {protocol:?}: {response:?}"
    );
    Ok(ws)
}

/// The next message by `deadline`; `None` once the connection ended.
async fn ws_next<S>(ws: &mut S, deadline: tokio::time::Instant) -> anyhow::Result<Option<Message>>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    match tokio::time::timeout_at(deadline, ws.next()).await {
        Err(_) => bail!("no WebSocket message in time"),
        Ok(None | Some(Err(WsError::ConnectionClosed))) => Ok(None),
        Ok(Some(Err(e))) => Err(e).context("reading the WebSocket"),
        Ok(Some(Ok(message))) => Ok(Some(message)),
    }
}

/// What an exec session sent, by channel, until the server closed it.
#[derive(Debug, Default)]
struct Channels {
    data: BTreeMap<u8, Vec<u8>>,
    /// The server's close code, once its close frame came.
    close: Option<u16>,
}

impl Channels {
    fn get(&self, channel: u8) -> &[u8] {
        self.data.get(&channel).map_or(&[], Vec::as_slice)
    }

    fn describe(&self) -> String {
        let mut text: Vec<String> = self
            .data
            .iter()
            .map(|(channel, bytes)| format!("channel {channel}: {:?}", lossy_tail(bytes)))
            .collect();
        text.push(format!("close {:?}", self.close));
        text.join("; ")
    }
}

/// Reads an exec session's messages to the end: binary `[channel,
/// payload…]`, or (`base64`) text `'0'+channel` then base64.
async fn read_channels(ws: &mut Ws, base64: bool) -> anyhow::Result<Channels> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut got = Channels::default();
    loop {
        let message = match ws_next(ws, deadline).await {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(got),
            // A reset after the close frame is still an end.
            Err(_) if got.close.is_some() => return Ok(got),
            Err(e) => return Err(e.context(format!("read so far: {}", got.describe()))),
        };
        let (channel, payload) = match message {
            Message::Binary(bytes) => {
                ensure!(!base64, "a binary message in a base64 session: {bytes:?}");
                // An empty message: the server's "connected" signal.
                let Some((&channel, payload)) = bytes.split_first() else {
                    continue;
                };
                (channel, payload.to_vec())
            }
            Message::Text(text) => {
                ensure!(
                    base64,
                    "a text message in a binary session: {:?}",
                    text.as_str()
                );
                let Some(digit) = text.as_bytes().first() else {
                    continue;
                };
                let channel = digit.checked_sub(b'0').with_context(|| {
                    format!(
                        "a text message without a channel digit: {:?}",
                        text.as_str()
                    )
                })?;
                let payload = base64::engine::general_purpose::STANDARD
                    .decode(&text.as_bytes()[1..])
                    .with_context(|| {
                        format!("channel {channel}: not base64: {:?}", text.as_str())
                    })?;
                (channel, payload)
            }
            Message::Close(frame) => {
                got.close = Some(frame.map_or(1005, |f| u16::from(f.code)));
                continue;
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        got.data
            .entry(channel)
            .or_default()
            .extend_from_slice(&payload);
    }
}

/// 3. WebSocket v5: stdin, then the close signal ends it; the exit code
///    comes back on the error channel.
async fn websocket_v5_exec(c: &mut Runtime, main: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let url = exec_url(
        c,
        cri::ExecRequest {
            stdin: true,
            stdout: true,
            stderr: true,
            ..exec_request(main, &["sh", "-c", "cat; exit 4"])
        },
    )
    .await?;
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await?;
    ws.send(Message::binary(b"\x00hello".to_vec())).await?;
    // v5's close signal for channel 0: the end of stdin.
    ws.send(Message::binary(vec![255, 0])).await?;
    let got = read_channels(&mut ws, false).await?;
    ensure!(
        got.get(1) == b"hello" && got.get(2).is_empty() && got.close.is_some(),
        "v5 exec of `cat; exit 4`: {}",
        got.describe()
    );
    check_status(got.get(3), 4).with_context(|| got.describe())?;
    eprintln!(
        "  websocket v5 exec: stdin echoed, closed by the close signal, exit 4 as a Status, close \
         {:?}, in {:.1} s",
        got.close,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// 4. WebSocket v4.base64: text messages, base64 payloads.
async fn websocket_base64_exec(c: &mut Runtime, main: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let url = exec_url(
        c,
        cri::ExecRequest {
            stdout: true,
            ..exec_request(main, &["echo", "b64"])
        },
    )
    .await?;
    let mut ws = ws_connect(&url, "v4.base64.channel.k8s.io").await?;
    let got = read_channels(&mut ws, true).await?;
    ensure!(
        got.get(1) == b"b64\n" && got.close.is_some(),
        "base64 exec of `echo b64`: {}",
        got.describe()
    );
    check_status(got.get(3), 0).with_context(|| got.describe())?;
    eprintln!(
        "  websocket v4.base64 exec: stdout and a Success status decoded, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The bytes of a data message (binary or text).
fn message_bytes(message: &Message) -> Option<&[u8]> {
    match message {
        Message::Binary(bytes) => Some(bytes),
        Message::Text(text) => Some(text.as_bytes()),
        _ => None,
    }
}

/// 5. WebSocket port-forward of 8080 (the echo server) and 8082 (nothing
///    there): the port numbers first, 1 MiB echoed, the error of 8082.
async fn websocket_port_forward(c: &mut Runtime, pod: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let url = port_forward_url(c, pod, &[8080, 8082]).await?;
    let ws = ws_connect(&url, "v4.channel.k8s.io").await?;
    let (mut tx, mut rx) = ws.split();
    let deadline = tokio::time::Instant::now() + LIMIT;
    for (channel, port) in [(0u8, 8080u16), (1, 8080), (2, 8082), (3, 8082)] {
        let message = ws_next(&mut rx, deadline)
            .await?
            .with_context(|| format!("the connection ended before channel {channel}'s port"))?;
        let [lo, hi] = port.to_le_bytes();
        ensure!(
            message_bytes(&message) == Some(&[channel, lo, hi][..]),
            "channel {channel} should first say port {port}: {message:?}"
        );
    }

    let data = noise(5, 1 << 20);
    let upload = tokio::spawn({
        let data = data.clone();
        async move {
            for chunk in data.chunks(64 * 1024) {
                let mut message = Vec::with_capacity(1 + chunk.len());
                message.push(0);
                message.extend_from_slice(chunk);
                tx.send(Message::binary(message))
                    .await
                    .context("sending to channel 0")?;
            }
            anyhow::Ok(tx)
        }
    });
    let mut echoed = Vec::new();
    let mut error = Vec::new();
    while echoed.len() < data.len() || error.is_empty() {
        let message = ws_next(&mut rx, deadline).await.with_context(|| {
            format!(
                "{} bytes echoed, error channel {:?}",
                echoed.len(),
                String::from_utf8_lossy(&error)
            )
        })?;
        let Some(message) = message else {
            bail!(
                "the connection ended with {} bytes echoed, error channel {:?}",
                echoed.len(),
                String::from_utf8_lossy(&error)
            );
        };
        let Some((&channel, payload)) = message_bytes(&message).and_then(<[u8]>::split_first)
        else {
            continue;
        };
        match channel {
            0 => echoed.extend_from_slice(payload),
            3 => error.extend_from_slice(payload),
            other => bail!(
                "a message on channel {other}: {:?}",
                String::from_utf8_lossy(payload)
            ),
        }
    }
    ensure!(
        echoed == data,
        "1 MiB through port 8080: {} bytes back, not the same",
        echoed.len()
    );
    let error = String::from_utf8_lossy(&error).into_owned();
    ensure!(
        error.contains("8082"),
        "the error of port 8082 does not name it: {error:?}"
    );
    let mut tx = upload.await??;
    tx.close().await.context("closing the WebSocket")?;
    // The server may answer our close frame, or just end the connection.
    let ending = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match rx.next().await {
                Some(Ok(_)) => {}
                None | Some(Err(WsError::ConnectionClosed)) => return "closed",
                Some(Err(_)) => return "reset",
            }
        }
    })
    .await
    .context("the connection is still open 30 s after our close")?;
    eprintln!(
        "  websocket port-forward: port numbers first, 1 MiB echoed, port 8082 reports {:?}, \
         connection {ending} after our close, in {:.1} s",
        error.lines().next().unwrap_or(""),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// 6. One SPDY port-forward session: five connections to the echo
///    server at once, and one to a port nobody listens on.
async fn spdy_port_forward_session(c: &mut Runtime, pod: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let url = port_forward_url(c, pod, &[]).await?;
    let mut spdy = SpdyClient::upgrade(&url, "portforward.k8s.io").await?;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut pairs = Vec::new();
    for request in 0..6u64 {
        let port = if request < 5 { "8080" } else { "8082" };
        let id = request.to_string();
        let mut error =
            spdy.open(&[("streamtype", "error"), ("port", port), ("requestid", &id)])?;
        // kubectl writes nothing on the error stream: it ends its side at once.
        spdy.send(error.id, &[], true)?;
        let mut data = spdy.open(&[("streamtype", "data"), ("port", port), ("requestid", &id)])?;
        error.replied(deadline).await?;
        data.replied(deadline).await?;
        pairs.push((request, error, data));
    }
    let mut tasks = Vec::new();
    for (request, mut error, mut data) in pairs {
        let payload = if request < 5 {
            noise(request, 200_000 + 1000 * request as usize)
        } else {
            Vec::new()
        };
        if !payload.is_empty() {
            spdy.send(data.id, &payload, false)?;
        }
        spdy.send(data.id, &[], true)?;
        tasks.push(tokio::spawn(async move {
            let back = data
                .read_to_fin(deadline)
                .await
                .with_context(|| format!("request {request}: the data stream"))?;
            let error = error
                .read_to_fin(deadline)
                .await
                .with_context(|| format!("request {request}: the error stream"))?;
            anyhow::Ok((
                request,
                payload,
                back,
                String::from_utf8_lossy(&error).into_owned(),
            ))
        }));
    }
    let mut refused = String::new();
    for task in tasks {
        let (request, sent, back, error) = task.await??;
        if request < 5 {
            ensure!(
                back == sent && error.is_empty(),
                "request {request} to 8080: {} bytes sent, {} back (same: {}), error {error:?}",
                sent.len(),
                back.len(),
                back == sent
            );
        } else {
            ensure!(
                back.is_empty() && error.contains("8082"),
                "request {request} to 8082: {} bytes back, error {error:?}",
                back.len()
            );
            refused = error;
        }
    }
    drop(spdy);
    eprintln!(
        "  spdy port-forward: 5 connections at once on one session echoed, 8082 reports {:?}, in \
         {:.1} s",
        refused.lines().next().unwrap_or(""),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
