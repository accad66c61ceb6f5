//! The CLI's side of an attach or exec session: a WebSocket to the
//! daemon's streaming server speaking `v5.channel.k8s.io` (the channel
//! byte first: 0 stdin, 1 stdout, 2 stderr, 3 the outcome, 4 resize;
//! `[255, 0]` ends stdin).

use std::io::Write;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::terminal;

const PROTOCOL: &str = "v5.channel.k8s.io";
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;
/// Ctrl-P Ctrl-Q: docker's detach keys.
const DETACH: [u8; 2] = [0x10, 0x11];

/// What a session sends.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Our stdin goes to the process.
    pub stdin: bool,
    /// A terminal: resizes are sent and the detach keys work.
    pub tty: bool,
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The process exited with this code.
    Exited(i32),
    /// The user pressed the detach keys: the process goes on.
    Detached,
    /// The server closed the session without saying why (attach to a
    /// container whose exit the caller asks the daemon about).
    Closed,
}

pub type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Opens the session at the URL Exec or Attach answered.
pub async fn connect(url: &str) -> anyhow::Result<Ws> {
    let Some(rest) = url.strip_prefix("http://") else {
        anyhow::bail!(
            "the streaming server's URL {url} is not plain HTTP on this node: the CLI connects \
             only to a daemon started without --streaming-tls-cert"
        );
    };
    let host = rest.split('/').next().unwrap_or_default();
    let mut request = format!("ws://{rest}").into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(PROTOCOL));
    let socket = TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to the streaming server at {host}"))?;
    let (ws, _) = tokio_tungstenite::client_async(request, socket)
        .await
        .with_context(|| format!("the WebSocket handshake with {host}"))?;
    Ok(ws)
}

/// Runs a session until the process ends, the server closes it or the
/// user detaches: stdout and stderr are written as they come.
pub async fn run(ws: Ws, options: Options) -> anyhow::Result<Ended> {
    let (mut sink, mut source) = ws.split();
    let (to_server, mut outgoing) = mpsc::channel::<Vec<u8>>(16);
    let (detach_tx, mut detached) = mpsc::channel::<()>(1);
    let writer = tokio::spawn(async move {
        while let Some(message) = outgoing.recv().await {
            if sink.send(Message::binary(message)).await.is_err() {
                return;
            }
        }
        // Nothing more to send (stdin ended): the connection stays open
        // until the server ends the session with the process's outcome.
        std::future::pending::<()>().await;
        drop(sink);
    });
    let mut tasks = Vec::new();
    if options.stdin {
        tasks.push(tokio::spawn(forward_stdin(
            to_server.clone(),
            options.tty.then_some(detach_tx),
        )));
    }
    if options.tty {
        tasks.push(tokio::spawn(forward_resizes(to_server.clone())));
    }
    drop(to_server);
    let ended = loop {
        let message = tokio::select! {
            message = source.next() => message,
            // Without a terminal the sender is gone at once: not a detach.
            Some(()) = detached.recv() => break Ended::Detached,
        };
        let data = match message {
            None | Some(Ok(Message::Close(_))) => break Ended::Closed,
            Some(Err(e)) => return Err(e).context("the streaming session broke"),
            Some(Ok(Message::Binary(data))) => data,
            Some(Ok(Message::Text(text))) => text.as_bytes().to_vec().into(),
            Some(Ok(_)) => continue,
        };
        let Some((&channel, payload)) = data.split_first() else {
            continue;
        };
        match channel {
            STDOUT => write_out(&mut std::io::stdout(), payload)?,
            STDERR => write_out(&mut std::io::stderr(), payload)?,
            STATUS if !payload.is_empty() => break parse_status(payload)?,
            _ => {}
        }
    };
    for task in tasks {
        task.abort();
    }
    writer.abort();
    Ok(ended)
}

fn write_out(out: &mut impl Write, data: &[u8]) -> anyhow::Result<()> {
    // A closed pipe downstream (`| head`) ends the session quietly.
    match out.write_all(data).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// The outcome the server sends on the status channel: a metav1.Status.
pub fn parse_status(payload: &[u8]) -> anyhow::Result<Ended> {
    let status: serde_json::Value = serde_json::from_slice(payload).with_context(|| {
        format!(
            "the session's outcome is not JSON: {:?}",
            String::from_utf8_lossy(payload)
        )
    })?;
    if status["status"] == "Success" {
        return Ok(Ended::Exited(0));
    }
    if status["reason"] == "NonZeroExitCode" {
        let code = status["details"]["causes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|cause| cause["reason"] == "ExitCode")
            .and_then(|cause| cause["message"].as_str())
            .and_then(|code| code.parse().ok());
        if let Some(code) = code {
            return Ok(Ended::Exited(code));
        }
    }
    let message = status["message"].as_str().unwrap_or("no message");
    anyhow::bail!("{message}")
}

/// Our stdin to the process; at its end, stdin is closed (v5). With a
/// terminal, the detach keys end the session instead of being sent.
async fn forward_stdin(to_server: mpsc::Sender<Vec<u8>>, detach: Option<mpsc::Sender<()>>) {
    let mut stdin = tokio::io::stdin();
    let mut keys = DetachKeys::default();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (data, detached) = match &detach {
            Some(_) => keys.filter(&buf[..n]),
            None => (buf[..n].to_vec(), false),
        };
        if !data.is_empty() && to_server.send(with_channel(STDIN, &data)).await.is_err() {
            return;
        }
        if detached {
            if let Some(detach) = &detach {
                let _ = detach.send(()).await;
            }
            return;
        }
    }
    let _ = to_server.send(vec![CLOSE, STDIN]).await;
}

/// The terminal's size now and at every SIGWINCH.
async fn forward_resizes(to_server: mpsc::Sender<Vec<u8>>) {
    let Ok(mut changes) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
    else {
        return;
    };
    loop {
        if let Some((cols, rows)) = terminal::size() {
            let size = serde_json::json!({"Width": cols, "Height": rows}).to_string();
            if to_server
                .send(with_channel(RESIZE, size.as_bytes()))
                .await
                .is_err()
            {
                return;
            }
        }
        if changes.recv().await.is_none() {
            return;
        }
    }
}

fn with_channel(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(data.len() + 1);
    message.push(channel);
    message.extend_from_slice(data);
    message
}

/// Spots Ctrl-P Ctrl-Q in typed bytes, across reads.
#[derive(Debug, Default)]
pub struct DetachKeys {
    /// A Ctrl-P was the last byte seen: held back until the next.
    held: bool,
}

impl DetachKeys {
    /// The bytes to send, and whether the detach keys were typed (what
    /// followed them is dropped).
    pub fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len() + 1);
        for &byte in input {
            if self.held {
                self.held = false;
                if byte == DETACH[1] {
                    return (out, true);
                }
                out.push(DETACH[0]);
            }
            if byte == DETACH[0] {
                self.held = true;
            } else {
                out.push(byte);
            }
        }
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys_are_found_across_reads_and_otherwise_pass() {
        let mut keys = DetachKeys::default();
        assert_eq!(keys.filter(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(keys.filter(&[b'a', 0x10]), (b"a".to_vec(), false));
        assert_eq!(keys.filter(&[0x11, b'z']), (Vec::new(), true));
        let mut keys = DetachKeys::default();
        // Ctrl-P followed by anything else is sent as typed.
        assert_eq!(
            keys.filter(&[0x10, b'x', 0x10, 0x10]),
            (vec![0x10, b'x', 0x10], false)
        );
        assert_eq!(keys.filter(&[0x11]), (Vec::new(), true));
    }

    #[test]
    fn outcomes_give_exit_codes_or_the_servers_message() {
        assert_eq!(
            parse_status(br#"{"metadata":{},"status":"Success"}"#).unwrap(),
            Ended::Exited(0)
        );
        let failure = br#"{"status":"Failure","reason":"NonZeroExitCode","message":"command terminated with non-zero exit code","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        assert_eq!(parse_status(failure).unwrap(), Ended::Exited(3));
        let err = parse_status(br#"{"status":"Failure","message":"container abc is not running"}"#)
            .unwrap_err();
        assert_eq!(err.to_string(), "container abc is not running");
        assert!(parse_status(b"not json").is_err());
        let odd = br#"{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"x"}]}}"#;
        assert!(parse_status(odd).is_err());
    }
}
