//! The agent of a pod VM, reached through frakti-vmm's hybrid vsock socket:
//! connect to the unix socket, write `CONNECT <port>\n`, read `OK <port>\n`,
//! then the stream is the guest's vsock connection (HTTP/2 for gRPC).

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use frakti_proto::AGENT_VSOCK_PORT;
use frakti_proto::agent::v1 as pb;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint, Uri};

/// The generated agent client on a channel through the hybrid socket.
pub type AgentClient = pb::agent_client::AgentClient<Channel>;

/// How long frakti-vmm may take to answer `CONNECT` (it answers once the
/// guest accepted, or closes the socket when nothing listens on the port).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts while the agent is not serving yet.
const RETRY_INTERVAL: Duration = Duration::from_millis(20);
/// The longest `OK <port>\n` line (a hostile VMM could send forever).
const MAX_HANDSHAKE_LINE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the agent did not answer within {secs} s (last attempt: {last})")]
    Timeout { secs: u64, last: String },
    #[error("stopped waiting for the agent: {0}")]
    GaveUp(String),
    #[error("cannot connect to the agent")]
    Connect(#[from] tonic::transport::Error),
}

/// Opens a stream to guest `port` through the hybrid socket `uds`. The
/// `OK` line is read a byte at a time: what follows belongs to the stream.
pub async fn hybrid_connect(uds: &Path, port: u32) -> io::Result<tokio::net::UnixStream> {
    let mut stream = tokio::net::UnixStream::connect(uds).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut line = Vec::new();
    let handshake = async {
        while line.last() != Some(&b'\n') {
            if line.len() >= MAX_HANDSHAKE_LINE {
                return Err(io::Error::other("the CONNECT answer is too long"));
            }
            match stream.read_u8().await {
                Ok(byte) => line.push(byte),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!(
                            "closed before OK (got {:?}): nothing listens on port {port}",
                            String::from_utf8_lossy(&line)
                        ),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer to CONNECT"))??;
    if !line.starts_with(b"OK ") {
        return Err(io::Error::other(format!(
            "expected OK <port>, got {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    Ok(stream)
}

/// What one stream (and all of them) of the agent connection may have in
/// flight towards the daemon.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;

/// A client of the agent behind `uds` (one connection attempt). The
/// channel redoes the handshake whenever it reconnects.
pub async fn connect(uds: &Path) -> Result<AgentClient, Error> {
    let uds = uds.to_path_buf();
    let channel = Endpoint::from_static("http://frakti.agent")
        // HTTP/2's default 64 KiB windows hold bulk output (exec, logs,
        // port-forward) to one window per round trip to the VM.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let uds = uds.clone();
            async move {
                hybrid_connect(&uds, AGENT_VSOCK_PORT)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await?;
    Ok(pb::agent_client::AgentClient::new(channel))
}

/// Connects to the agent of a VM that is booting: retries until the agent
/// answers `Check` or `timeout` passes. Before each attempt `alive` may end
/// the wait with a reason (e.g. the VMM exited).
pub async fn wait_for_agent(
    uds: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<AgentClient, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        alive().map_err(Error::GaveUp)?;
        let attempt = async {
            let mut client = connect(uds)
                .await
                .map_err(|e| frakti_proto::error_chain(&e))?;
            let check = client.check(pb::CheckRequest {});
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, check).await {
                Ok(Ok(answer)) if answer.get_ref().serving => Ok(client),
                Ok(Ok(_)) => Err("Check answered serving=false".to_string()),
                Ok(Err(status)) => Err(format!("Check: {status}")),
                Err(_) => Err("Check did not answer".to_string()),
            }
        };
        match attempt.await {
            Ok(client) => return Ok(client),
            Err(last) if Instant::now() >= deadline => {
                return Err(Error::Timeout {
                    secs: timeout.as_secs(),
                    last,
                });
            }
            Err(_) => tokio::time::sleep(RETRY_INTERVAL).await,
        }
    }
}
