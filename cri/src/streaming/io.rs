//! What a streaming protocol (SPDY or WebSocket) hands to the runtime side
//! and back: the client's streams as bounded channels, so that a slow
//! client slows the process and nothing buffers without bound.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Chunks queued per stream between a protocol adapter and the process.
pub const STREAM_QUEUE: usize = 8;
/// The most [`next_batch`] gathers into one message for the agent.
pub const BATCH: usize = 256 * 1024;

/// The next chunk from `rx` with whatever else is already queued behind
/// it, up to [`BATCH`] bytes: one agent call per chunk would make bulk
/// input (stdin, a port-forward's upload) crawl, one round trip to the VM
/// each. `None` once `rx` ended.
pub async fn next_batch(rx: &mut mpsc::Receiver<Bytes>) -> Option<Vec<u8>> {
    let mut data = rx.recv().await?.to_vec();
    while data.len() < BATCH {
        match rx.try_recv() {
            Ok(more) => data.extend_from_slice(&more),
            Err(_) => break,
        }
    }
    Some(data)
}

/// A terminal size as the resize stream carries it (`{"Width":80,"Height":24}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The streams of one exec or attach, from the process's point of view.
/// A `None` field is a stream the client did not open.
#[derive(Debug, Default)]
pub struct ProcessIo {
    /// What the client types; `recv()` giving `None` is end of input.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// Where the process's output goes; dropping a sender closes the stream.
    pub stdout: Option<mpsc::Sender<Bytes>>,
    /// Absent with a TTY (stderr is merged into stdout).
    pub stderr: Option<mpsc::Sender<Bytes>>,
    /// Terminal size changes, the first one as soon as the client knows it.
    pub resize: Option<mpsc::Receiver<TermSize>>,
}

/// How an exec or attach ended, for the error stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The process exited with this code (0: success).
    Exited(i32),
    /// It could not run, or the stream failed: the message says why.
    Failed(String),
}

/// One forwarded TCP connection to a port in the pod's network namespace.
#[derive(Debug)]
pub struct PortConnection {
    /// Bytes for the pod's port; dropping it half-closes the connection.
    pub to_pod: mpsc::Sender<Bytes>,
    /// Bytes the pod's port sent; `None` once it closed its side (or the
    /// connection failed: then `error` says why).
    pub from_pod: mpsc::Receiver<Bytes>,
    /// Receives at most one message: why the connection failed after it
    /// was established.
    pub error: tokio::sync::oneshot::Receiver<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_take_what_is_queued_up_to_the_bound() {
        let (tx, mut rx) = mpsc::channel(STREAM_QUEUE);
        let chunk = Bytes::from(vec![1u8; BATCH / 2]);
        for _ in 0..3 {
            tx.send(chunk.clone()).await.unwrap();
        }
        assert_eq!(next_batch(&mut rx).await.map(|d| d.len()), Some(BATCH));
        drop(tx);
        assert_eq!(next_batch(&mut rx).await.map(|d| d.len()), Some(BATCH / 2));
        assert_eq!(next_batch(&mut rx).await, None);
    }
}
