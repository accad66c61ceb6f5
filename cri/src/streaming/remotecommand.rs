//! Kubernetes' remotecommand protocol over SPDY (exec and attach), and the
//! exit status every version reports on the error stream.
//!
//! The client opens one SPDY stream per standard stream, naming it in the
//! `streamtype` header: `error` (always), `stdin`, `stdout`, `stderr` (not
//! with a TTY) and, from v3 on with a TTY, `resize` (JSON window sizes one
//! after the other). When the process ends the server closes the output
//! streams, writes the outcome to the error stream (v4: a metav1.Status
//! JSON; before: the error text, nothing on success) and closes the
//! connection.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::json;
use tokio::sync::mpsc;

use super::io::{Outcome, ProcessIo, STREAM_QUEUE, TermSize};
use super::process;
use super::request::ProcessRequest;
use super::spdy::frame::RST_PROTOCOL_ERROR;
use super::spdy::session::{Session, Stream, StreamWriter};
use crate::runtime::Runtime;

/// What we speak, preferred first (kubelet's list).
pub const SPDY_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// How long the client has to open its streams (kubelet's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// A resize message larger than this is not a window size.
const MAX_RESIZE_BUFFER: usize = 4096;

/// The metav1.Status JSON of the v4 error stream: `Success`, or
/// `Failure` with reason `NonZeroExitCode` and an `ExitCode` cause (what
/// kubectl turns into its own exit code).
pub fn status_json(outcome: &Outcome) -> Vec<u8> {
    let status = match outcome {
        Outcome::Exited(0) => json!({"metadata": {}, "status": "Success"}),
        Outcome::Exited(code) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Outcome::Failed(message) => json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "code": 500,
            "details": {"causes": [{"message": message}]},
        }),
    };
    status.to_string().into_bytes()
}

/// The error text of the protocols before v4 (they cannot carry an exit
/// code): nothing on success.
pub fn legacy_error(outcome: &Outcome) -> Option<Vec<u8>> {
    match outcome {
        Outcome::Exited(0) => None,
        Outcome::Exited(code) => Some(
            format!("command terminated with non-zero exit code: exit status {code}").into_bytes(),
        ),
        Outcome::Failed(message) => Some(message.clone().into_bytes()),
    }
}

/// The streams a client opened, by type.
#[derive(Default)]
struct Opened {
    error: Option<Stream>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

impl Opened {
    fn complete(&self, want: &Wanted) -> bool {
        self.error.is_some()
            && (!want.stdin || self.stdin.is_some())
            && (!want.stdout || self.stdout.is_some())
            && (!want.stderr || self.stderr.is_some())
            && (!want.resize || self.resize.is_some())
    }
}

/// Which streams the request needs, besides the error stream.
struct Wanted {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    resize: bool,
}

fn wanted(request: &ProcessRequest, protocol: &str) -> Wanted {
    Wanted {
        stdin: request.stdin,
        stdout: request.stdout,
        stderr: request.stderr && !request.tty,
        // v1 and v2 have no resize stream.
        resize: request.tty && matches!(protocol, "v4.channel.k8s.io" | "v3.channel.k8s.io"),
    }
}

/// Serves one exec or attach on an upgraded SPDY connection.
pub async fn serve_spdy(
    mut session: Session,
    protocol: &str,
    runtime: Runtime,
    request: ProcessRequest,
) {
    let want = wanted(&request, protocol);
    let opened = match accept_streams(&mut session, &want).await {
        Ok(opened) => opened,
        Err(message) => {
            tracing::info!(container = %request.container_id, "{message}");
            session.close().await;
            return;
        }
    };
    let Some(error) = opened.error else {
        session.close().await;
        return;
    };
    let mut io = ProcessIo {
        stdin: opened.stdin.map(|s| s.data),
        ..Default::default()
    };
    let mut pumps = Vec::new();
    for (stream, slot) in [
        (opened.stdout, &mut io.stdout),
        (opened.stderr, &mut io.stderr),
    ] {
        if let Some(stream) = stream {
            let (sender, receiver) = mpsc::channel(STREAM_QUEUE);
            *slot = Some(sender);
            let gone = session.client_gone();
            pumps.push(tokio::spawn(copy_out(receiver, stream.writer, gone)));
        }
    }
    if let Some(stream) = opened.resize {
        let (sender, receiver) = mpsc::channel(STREAM_QUEUE);
        io.resize = Some(receiver);
        tokio::spawn(read_sizes(stream.data, sender));
    }
    let outcome = process::run(&runtime, &request, io).await;
    tracing::debug!(container = %request.container_id, ?outcome, "streaming process ended");
    // The output streams end before the outcome is reported.
    for pump in pumps {
        let _ = pump.await;
    }
    let report = if protocol == "v4.channel.k8s.io" {
        Some(status_json(&outcome))
    } else {
        legacy_error(&outcome)
    };
    if let Some(report) = report {
        let _ = error.writer.send(Bytes::from(report)).await;
    }
    let _ = error.writer.finish().await;
    session.close().await;
}

/// Waits until the client opened every stream the request needs.
async fn accept_streams(session: &mut Session, want: &Wanted) -> Result<Opened, String> {
    let mut opened = Opened::default();
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while !opened.complete(want) {
        let stream = match tokio::time::timeout_at(deadline, session.accept()).await {
            Ok(Some(stream)) => stream,
            Ok(None) => return Err("the client left before opening its streams".into()),
            Err(_) => return Err("the client did not open its streams in time".into()),
        };
        let slot = match stream.header("streamtype") {
            Some("error") => &mut opened.error,
            Some("stdin") => &mut opened.stdin,
            Some("stdout") => &mut opened.stdout,
            Some("stderr") => &mut opened.stderr,
            Some("resize") => &mut opened.resize,
            other => {
                tracing::debug!(stream_type = ?other, "unknown stream type: reset");
                let _ = stream.writer.reset(RST_PROTOCOL_ERROR).await;
                continue;
            }
        };
        if slot.is_some() {
            let _ = stream.writer.reset(RST_PROTOCOL_ERROR).await;
            continue;
        }
        *slot = Some(stream);
    }
    Ok(opened)
}

/// Copies what the process wrote to the client's stream, then ends it.
/// Stops (dropping `output`, which tells the process side) when the
/// client's connection ends.
async fn copy_out(
    mut output: mpsc::Receiver<Bytes>,
    writer: StreamWriter,
    client_gone: impl Future<Output = ()>,
) {
    tokio::pin!(client_gone);
    loop {
        let data = tokio::select! {
            data = output.recv() => data,
            () = &mut client_gone => return,
        };
        let Some(data) = data else { break };
        if writer.send(data).await.is_err() {
            return;
        }
    }
    let _ = writer.finish().await;
}

/// Decodes the resize stream: JSON objects one after the other.
async fn read_sizes(mut data: mpsc::Receiver<Bytes>, sizes: mpsc::Sender<TermSize>) {
    let mut buffer = BytesMut::new();
    while let Some(chunk) = data.recv().await {
        buffer.extend_from_slice(&chunk);
        loop {
            let mut values = serde_json::Deserializer::from_slice(&buffer).into_iter::<TermSize>();
            match values.next() {
                Some(Ok(size)) => {
                    let used = values.byte_offset();
                    let _ = buffer.split_to(used);
                    if sizes.send(size).await.is_err() {
                        return;
                    }
                }
                // Incomplete: wait for more.
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    tracing::debug!("malformed resize message: {e}");
                    return;
                }
                None => break,
            }
        }
        if buffer.len() > MAX_RESIZE_BUFFER {
            tracing::debug!("resize stream: message too large");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_what_kubectl_reads() {
        let ok: serde_json::Value =
            serde_json::from_slice(&status_json(&Outcome::Exited(0))).unwrap();
        assert_eq!(ok["status"], "Success");
        let failed: serde_json::Value =
            serde_json::from_slice(&status_json(&Outcome::Exited(3))).unwrap();
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        let broken: serde_json::Value =
            serde_json::from_slice(&status_json(&Outcome::Failed("boom".into()))).unwrap();
        assert_eq!(broken["message"], "boom");
        assert_eq!(legacy_error(&Outcome::Exited(0)), None);
        assert!(legacy_error(&Outcome::Exited(2)).is_some());
    }

    #[tokio::test]
    async fn resize_messages_split_anywhere_are_decoded() {
        let (tx, rx) = mpsc::channel(8);
        let (sizes_tx, mut sizes) = mpsc::channel(8);
        let task = tokio::spawn(read_sizes(rx, sizes_tx));
        for piece in [
            &b"{\"Width\":80,"[..],
            b"\"Height\":24}{\"Width\"",
            b":100,\"Height\":40}",
        ] {
            tx.send(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        assert_eq!(
            sizes.recv().await,
            Some(TermSize {
                width: 80,
                height: 24
            })
        );
        assert_eq!(
            sizes.recv().await,
            Some(TermSize {
                width: 100,
                height: 40
            })
        );
        // Garbage ends the stream's decoding, without a panic.
        tx.send(Bytes::from_static(b"]]]")).await.unwrap();
        task.await.unwrap();
        assert_eq!(sizes.recv().await, None);
    }
}
