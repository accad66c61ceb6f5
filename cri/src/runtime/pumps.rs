//! A container's log pumps: its stdout and stderr from the agent into its
//! CRI log (and to attach clients), confirming to the agent what the log
//! has for good.

use std::sync::Arc;

use bytes::Bytes;
use frakti_proto::agent::v1 as pb;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

use super::container::Container;
use super::logs::{Chunk, ContainerLog, Placed, StreamKind};
use super::{Runtime, lock};
use crate::sandbox::agent::AgentClient;

impl Runtime {
    /// Copies the container's stdout and stderr into its log (or drains
    /// them: a full pipe would block the container). The pumps confirm to
    /// the agent what the log has for good, so a daemon killed meanwhile
    /// resumes where the log is (`ContainerLog::resume_offset`) and no
    /// output in flight is lost.
    pub(crate) fn start_pumps(
        &self,
        container: &Container,
        agent: &AgentClient,
        log: Option<Arc<ContainerLog>>,
    ) {
        let mut streams = vec![(pb::OutputStream::Stdout, StreamKind::Stdout)];
        if !container.config.tty {
            streams.push((pb::OutputStream::Stderr, StreamKind::Stderr));
        }
        for (stream, kind) in streams {
            let mut agent = agent.clone();
            let id = container.id.clone();
            let log = log.clone();
            let attached = container.output.clone();
            let pump = tokio::spawn(async move {
                let from = log.as_ref().and_then(|log| log.resume_offset(kind));
                let request = pb::ReadOutputRequest {
                    container_id: id.clone(),
                    exec_id: String::new(),
                    stream: stream as i32,
                    from_offset: from.unwrap_or(0),
                    acknowledge: true,
                    kept: 0,
                };
                // Confirmations: only the latest matters.
                let (kept_tx, kept_rx) = watch::channel(0u64);
                let confirmations =
                    WatchStream::from_changes(kept_rx).map(|kept| pb::ReadOutputRequest {
                        kept,
                        ..Default::default()
                    });
                let requests = tokio_stream::once(request).chain(confirmations);
                let output = match agent.read_output(requests).await {
                    Ok(response) => response.into_inner(),
                    Err(status) => {
                        tracing::warn!(container = %id, ?kind, "ReadOutput: {}", status.message());
                        return;
                    }
                };
                let chunks = output.map(move |r| {
                    r.map(|chunk| {
                        let chunk_data = if chunk.lost_bytes > 0 {
                            Chunk::Lost(chunk.lost_bytes)
                        } else {
                            let data = Bytes::from(chunk.data);
                            // No attach client: the error is "no receiver".
                            let _ = attached.send((kind, data.clone()));
                            Chunk::Data(data)
                        };
                        Placed {
                            offset: chunk.offset,
                            chunk: chunk_data,
                        }
                    })
                });
                let confirm = |kept| {
                    let _ = kept_tx.send(kept);
                };
                match log {
                    Some(log) => {
                        let end = log.pump(kind, chunks, from, confirm).await;
                        tracing::debug!(container = %id, ?kind, ?end, "log pump ended");
                    }
                    None => {
                        chunks
                            .for_each(|placed| {
                                if let Ok(placed) = placed {
                                    confirm(placed.end());
                                }
                                async {}
                            })
                            .await
                    }
                }
            });
            lock(&container.pumps).push(pump);
        }
    }
}
