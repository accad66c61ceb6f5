//! Port forwarding: one TCP connection to a port in the pod, through the
//! agent's PortForward stream (the port on the VM's loopback, in the
//! pod's network namespace), and the `portforward.k8s.io` protocol over
//! SPDY that carries many of them on one client connection.
//!
//! Over SPDY the client opens two streams per forwarded connection, with
//! the headers `streamtype` (`error` or `data`), `port` and `requestid`
//! (pairing them). Bytes flow on the data stream both ways; a failure is
//! written as text on the error stream, which is then closed.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use frakti_proto::agent::v1 as pb;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::io::{PortConnection, STREAM_QUEUE, next_batch};
use super::spdy::frame::RST_PROTOCOL_ERROR;
use super::spdy::session::{Session, Stream};
use crate::runtime::Runtime;

/// The SPDY sub-protocol port-forward clients ask for.
pub const SPDY_PROTOCOL: &str = "portforward.k8s.io";
/// How long the second stream of a pair may take (kubelet's default).
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens one connection to `port` in pod `pod_id`; the error is the
/// message for the client (nothing listens there, the pod is gone…).
pub async fn connect(runtime: &Runtime, pod_id: &str, port: u16) -> Result<PortConnection, String> {
    let failed = |e: String| format!("error forwarding port {port} to pod {pod_id}: {e}");
    let pod = runtime
        .pod(pod_id)
        .map_err(|e| failed(crate::error_chain(&e)))?;
    let mut agent = pod.agent().map_err(|e| failed(crate::error_chain(&e)))?;
    if port == 0 {
        return Err(failed("port 0 is not a port".into()));
    }
    let (requests, outgoing) = mpsc::channel(STREAM_QUEUE);
    let first = pb::PortForwardData {
        port: u32::from(port),
        data: Vec::new(),
    };
    requests
        .send(first)
        .await
        .map_err(|_| failed("the forwarder stopped".into()))?;
    let response = agent
        .port_forward(ReceiverStream::new(outgoing))
        .await
        .map_err(|status| failed(status.message().to_string()))?;
    let mut incoming = response.into_inner();
    let (to_pod, mut to_pod_rx) = mpsc::channel::<Bytes>(STREAM_QUEUE);
    let (from_pod_tx, from_pod) = mpsc::channel(STREAM_QUEUE);
    let (error_tx, error) = oneshot::channel();
    tokio::spawn(async move {
        while let Some(data) = next_batch(&mut to_pod_rx).await {
            if data.is_empty() {
                continue;
            }
            let chunk = pb::PortForwardData { port: 0, data };
            if requests.send(chunk).await.is_err() {
                return;
            }
        }
        // Dropping `requests` ends the client stream: a half-close.
    });
    tokio::spawn(async move {
        while let Some(chunk) = incoming.next().await {
            match chunk {
                Ok(chunk) => {
                    if from_pod_tx.send(Bytes::from(chunk.data)).await.is_err() {
                        return;
                    }
                }
                Err(status) => {
                    let _ = error_tx.send(status.message().to_string());
                    return;
                }
            }
        }
    });
    Ok(PortConnection {
        to_pod,
        from_pod,
        error,
    })
}

/// Half of a forwarded connection's stream pair, waiting for the other.
struct Half {
    stream: Stream,
    since: tokio::time::Instant,
}

/// Serves a port-forward session: every stream pair the client opens
/// becomes one connection to the pod.
pub async fn serve_spdy(mut session: Session, runtime: Runtime, pod_id: String) {
    let mut errors: HashMap<String, Half> = HashMap::new();
    let mut datas: HashMap<String, Half> = HashMap::new();
    while let Some(stream) = session.accept().await {
        let kind = stream.header("streamtype").map(str::to_string);
        // Old clients send no request id: the data stream follows its
        // error stream (ids step by 2).
        let request_id = match stream.header("requestid") {
            Some(id) => id.to_string(),
            None if kind.as_deref() == Some("data") => stream.id.saturating_sub(2).to_string(),
            None => stream.id.to_string(),
        };
        let since = tokio::time::Instant::now();
        forget_stale(&mut errors, since).await;
        forget_stale(&mut datas, since).await;
        let (mine, other) = match kind.as_deref() {
            Some("error") => (&mut errors, &mut datas),
            Some("data") => (&mut datas, &mut errors),
            _ => {
                let _ = stream.writer.reset(RST_PROTOCOL_ERROR).await;
                continue;
            }
        };
        match other.remove(&request_id) {
            Some(half) => {
                let (error, data) = if kind.as_deref() == Some("error") {
                    (stream, half.stream)
                } else {
                    (half.stream, stream)
                };
                tokio::spawn(forward(runtime.clone(), pod_id.clone(), error, data));
            }
            None => {
                if mine.insert(request_id, Half { stream, since }).is_some() {
                    tracing::debug!("port-forward: a request id used twice");
                }
            }
        }
    }
}

/// Resets halves whose partner did not come in time.
async fn forget_stale(halves: &mut HashMap<String, Half>, now: tokio::time::Instant) {
    let stale: Vec<String> = halves
        .iter()
        .filter(|(_, half)| now.duration_since(half.since) > PAIR_TIMEOUT)
        .map(|(id, _)| id.clone())
        .collect();
    for id in stale {
        if let Some(half) = halves.remove(&id) {
            let _ = half.stream.writer.reset(RST_PROTOCOL_ERROR).await;
        }
    }
}

/// One forwarded connection: the data stream's bytes to the pod's port
/// and back; a failure as text on the error stream.
async fn forward(runtime: Runtime, pod_id: String, error: Stream, data: Stream) {
    let port = data
        .header("port")
        .or_else(|| error.header("port"))
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p > 0);
    let Some(port) = port else {
        let message = format!(
            "invalid port {:?}: a port is 1 to 65535",
            data.header("port").unwrap_or("")
        );
        report(&error, &message).await;
        let _ = data.writer.finish().await;
        return;
    };
    let connection = match connect(&runtime, &pod_id, port).await {
        Ok(connection) => connection,
        Err(message) => {
            tracing::debug!(pod = %pod_id, port, "{message}");
            report(&error, &message).await;
            let _ = data.writer.finish().await;
            return;
        }
    };
    let PortConnection {
        to_pod,
        mut from_pod,
        error: failure,
    } = connection;
    let Stream {
        data: mut client,
        writer,
        ..
    } = data;
    let upload = tokio::spawn(async move {
        while let Some(chunk) = client.recv().await {
            if to_pod.send(chunk).await.is_err() {
                return;
            }
        }
    });
    while let Some(chunk) = from_pod.recv().await {
        if writer.send(chunk).await.is_err() {
            break;
        }
    }
    let _ = writer.finish().await;
    if let Ok(message) = failure.await {
        report(
            &error,
            &format!("error forwarding port {port} to pod {pod_id}: {message}"),
        )
        .await;
    } else {
        let _ = error.writer.finish().await;
    }
    // The pod may still read what the client sends after closing its own
    // side; the upload ends with the client's side (or the session).
    let _ = upload.await;
}

async fn report(error: &Stream, message: &str) {
    let _ = error.writer.send(Bytes::from(message.to_string())).await;
    let _ = error.writer.finish().await;
}
