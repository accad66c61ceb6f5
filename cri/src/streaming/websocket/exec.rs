//! Exec and attach over a channel protocol: the client's messages to the
//! process's stdin and terminal, its output to the client, its outcome on
//! the error channel.

use std::fmt::Display;
use std::future::Future;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::{
    ClientMessage, ERROR, Kind, NORMAL, PROTOCOL, RESIZE, STDERR, STDIN, STDOUT, WsError, close,
    decode_client_message, encode_message, message_bytes, refuse,
};
use crate::runtime::Runtime;
use crate::streaming::io::{Outcome, ProcessIo, STREAM_QUEUE, TermSize};
use crate::streaming::remotecommand::{legacy_error, status_json};
use crate::streaming::request::ProcessRequest;

/// Buffered bytes of an incomplete resize message, at most.
pub(super) const MAX_RESIZE: usize = 4096;

/// Serves an exec or attach on `socket`, which negotiated `protocol` (one
/// of [`super::EXEC_PROTOCOLS`], or `""` when the client named none).
pub async fn serve_process(
    socket: WebSocket,
    protocol: &str,
    runtime: Runtime,
    request: ProcessRequest,
) {
    let (mut tx, mut rx) = socket.split();
    let kind = match Kind::exec(protocol) {
        Ok(kind) => kind,
        Err(e) => return refuse(&mut tx, &mut rx, PROTOCOL, &e).await,
    };
    let run = |io| crate::streaming::process::run(&runtime, &request, io);
    process_session(tx, rx, kind, &request, run).await;
}

/// [`serve_process`] on any message sink and stream, with `run` for the
/// process.
pub(super) async fn process_session<Tx, Rx, E, F, Fut>(
    mut tx: Tx,
    mut rx: Rx,
    kind: Kind,
    request: &ProcessRequest,
    run: F,
) where
    Tx: Sink<Message> + Unpin,
    Rx: Stream<Item = Result<Message, E>> + Unpin,
    E: Display,
    F: FnOnce(ProcessIo) -> Fut,
    Fut: Future<Output = Outcome>,
{
    // Kubelet's "connected" signal: an empty message on the lowest
    // channel the server writes.
    let open = if request.stdout {
        STDOUT
    } else if request.stderr {
        STDERR
    } else {
        ERROR
    };
    if tx.send(encode_message(kind, open, &[])).await.is_err() {
        return;
    }
    let (stdin_tx, stdin_rx) = bounded(request.stdin);
    let (stdout_tx, stdout_rx) = bounded(request.stdout);
    // With a TTY the terminal merges stderr into stdout.
    let (stderr_tx, stderr_rx) = bounded(request.stderr && !request.tty);
    let (resize_tx, resize_rx) = bounded(request.tty);
    let io = ProcessIo {
        stdin: stdin_rx,
        stdout: stdout_tx,
        stderr: stderr_tx,
        resize: resize_rx,
    };
    let outcome = {
        // Dropped when the client is gone: the output stops at once (the
        // process sees its output closed, not just its stdin).
        let (gone_tx, gone_rx) = oneshot::channel::<()>();
        let input = async {
            read_input(&mut rx, kind, stdin_tx, resize_tx).await;
            drop(gone_tx);
        };
        let output = write_output(&mut tx, kind, stdout_rx, stderr_rx, gone_rx);
        let work = async { tokio::join!(run(io), output).0 };
        tokio::pin!(input, work);
        tokio::select! {
            outcome = &mut work => Some(outcome),
            () = &mut input => {
                // Let the runner finish (it sees the client's streams end).
                (&mut work).await;
                None
            }
        }
    };
    let Some(outcome) = outcome else {
        return;
    };
    let status = if kind.has_status() {
        Some(status_json(&outcome))
    } else {
        legacy_error(&outcome)
    };
    if let Some(status) = status {
        if tx.send(encode_message(kind, ERROR, &status)).await.is_err() {
            return;
        }
    }
    close(&mut tx, &mut rx, NORMAL, "").await;
}

/// A bounded channel if `wanted`.
fn bounded<T>(wanted: bool) -> (Option<mpsc::Sender<T>>, Option<mpsc::Receiver<T>>) {
    if wanted {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    }
}

/// What a client message means for an exec or attach.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ExecInput {
    Stdin(Bytes),
    CloseStdin,
    Resize(Bytes),
    CloseResize,
}

/// Where a decoded message goes; unknown channels and the server's own
/// are errors (to ignore, as kubelet does).
pub(super) fn route_exec(msg: ClientMessage) -> Result<ExecInput, WsError> {
    match msg {
        ClientMessage::Data {
            channel: STDIN,
            payload,
        } => Ok(ExecInput::Stdin(payload)),
        ClientMessage::Data {
            channel: RESIZE,
            payload,
        } => Ok(ExecInput::Resize(payload)),
        ClientMessage::Close { channel: STDIN } => Ok(ExecInput::CloseStdin),
        ClientMessage::Close { channel: RESIZE } => Ok(ExecInput::CloseResize),
        ClientMessage::Data { channel, .. } | ClientMessage::Close { channel } => {
            if (STDOUT..=ERROR).contains(&channel) {
                Err(WsError::WriteOnly(channel))
            } else {
                Err(WsError::UnknownChannel(channel))
            }
        }
    }
}

/// The client's messages to stdin and resize until it closes the
/// connection; dropping the senders then is the end of input.
async fn read_input<Rx, E>(
    rx: &mut Rx,
    kind: Kind,
    mut stdin: Option<mpsc::Sender<Bytes>>,
    mut resize: Option<mpsc::Sender<TermSize>>,
) where
    Rx: Stream<Item = Result<Message, E>> + Unpin,
    E: Display,
{
    let mut sizes = ResizeDecoder::default();
    while let Some(item) = rx.next().await {
        let msg = match item {
            Ok(Message::Close(_)) => break,
            Ok(msg) => msg,
            Err(e) => {
                tracing::debug!("websocket exec: {e}");
                break;
            }
        };
        let Some(bytes) = message_bytes(&msg) else {
            continue;
        };
        let input = match decode_client_message(kind, bytes).and_then(route_exec) {
            Ok(input) => input,
            Err(e) => {
                tracing::debug!("websocket exec: message ignored: {e}");
                continue;
            }
        };
        match input {
            ExecInput::Stdin(data) => {
                if let Some(sender) = &stdin {
                    if !data.is_empty() && sender.send(data).await.is_err() {
                        stdin = None;
                    }
                }
            }
            ExecInput::CloseStdin => stdin = None,
            ExecInput::Resize(data) => {
                if resize.is_none() {
                    continue;
                }
                let decoded = match sizes.push(&data) {
                    Ok(decoded) => decoded,
                    Err(e) => {
                        tracing::debug!("websocket exec: {e}");
                        continue;
                    }
                };
                for size in decoded {
                    if let Some(sender) = &resize {
                        if sender.send(size).await.is_err() {
                            resize = None;
                        }
                    }
                }
            }
            ExecInput::CloseResize => resize = None,
        }
    }
}

/// The process's output to the client until both streams end, the
/// client fails to take it, or `gone` (the client left).
async fn write_output<Tx>(
    tx: &mut Tx,
    kind: Kind,
    mut stdout: Option<mpsc::Receiver<Bytes>>,
    mut stderr: Option<mpsc::Receiver<Bytes>>,
    mut gone: oneshot::Receiver<()>,
) where
    Tx: Sink<Message> + Unpin,
{
    while stdout.is_some() || stderr.is_some() {
        let (channel, chunk) = tokio::select! {
            _ = &mut gone => return,
            chunk = recv(&mut stdout) => (STDOUT, chunk),
            chunk = recv(&mut stderr) => (STDERR, chunk),
        };
        match chunk {
            None if channel == STDOUT => stdout = None,
            None => stderr = None,
            Some(data) if data.is_empty() => {}
            Some(data) => {
                if tx.send(encode_message(kind, channel, &data)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The next chunk of an open stream; never for a closed one.
async fn recv(rx: &mut Option<mpsc::Receiver<Bytes>>) -> Option<Bytes> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A terminal size as clients write it: kubelet's Go decoder matches the
/// names without case and takes a missing one as 0.
#[derive(Deserialize)]
struct WireSize {
    #[serde(rename = "Width", alias = "width", default)]
    width: u16,
    #[serde(rename = "Height", alias = "height", default)]
    height: u16,
}

/// The resize channel is a stream of JSON objects, as kubelet reads it: a
/// message may hold several, or part of one.
#[derive(Debug, Default)]
pub(super) struct ResizeDecoder {
    pending: Vec<u8>,
}

impl ResizeDecoder {
    /// The sizes complete with `bytes`; an invalid one is an error and
    /// drops what was buffered.
    pub(super) fn push(&mut self, bytes: &[u8]) -> Result<Vec<TermSize>, WsError> {
        self.pending.extend_from_slice(bytes);
        let mut sizes = Vec::new();
        let mut values =
            serde_json::Deserializer::from_slice(&self.pending).into_iter::<WireSize>();
        let failure = loop {
            match values.next() {
                None => break None,
                Some(Ok(size)) => sizes.push(TermSize {
                    width: size.width,
                    height: size.height,
                }),
                Some(Err(e)) if e.is_eof() => break None,
                Some(Err(e)) => break Some(e.to_string()),
            }
        };
        let used = values.byte_offset();
        if let Some(reason) = failure {
            self.pending.clear();
            return Err(WsError::Resize(reason));
        }
        self.pending.drain(..used);
        if self.pending.len() > MAX_RESIZE {
            self.pending.clear();
            return Err(WsError::ResizeTooLong(MAX_RESIZE));
        }
        Ok(sizes)
    }
}
