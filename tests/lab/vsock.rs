//! Host ends of a VM's vsock: frakti-vmm's hybrid unix socket, the
//! kernel's AF_VSOCK (for QEMU's vhost-vsock baseline), and a gRPC client
//! of the guest's agent over the hybrid socket.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use frakti_proto::AGENT_VSOCK_PORT;
use frakti_proto::agent::v1 as pb;
use frakti_proto::error_chain;
use hyper_util::rt::TokioIo;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, connect, socket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint, Uri};

/// The generated agent client on a channel through the hybrid socket.
pub type AgentClient = pb::agent_client::AgentClient<Channel>;

/// How long frakti-vmm may take to answer `CONNECT` (it answers once the
/// guest accepted, or closes the socket if nothing listens on the port).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between attempts while the agent is not serving yet.
const RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// Opens a stream to guest `port` through the hybrid socket.
pub fn hybrid_connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        if stream.read(&mut byte)? == 0 {
            return Err(io::Error::other(format!(
                "closed before OK (got {:?})",
                String::from_utf8_lossy(&line)
            )));
        }
        line.push(byte[0]);
    }
    check_ok_line(&line)?;
    stream.set_read_timeout(None)?;
    Ok(stream)
}

fn check_ok_line(line: &[u8]) -> io::Result<()> {
    if line.starts_with(b"OK ") {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "expected OK <port>, got {:?}",
            String::from_utf8_lossy(line)
        )))
    }
}

/// [`hybrid_connect`] for async code. The `OK` line is read a byte at a
/// time: whatever follows it (an HTTP/2 server's first frames) belongs to
/// the stream.
pub async fn hybrid_connect_async(uds: &Path, port: u32) -> io::Result<tokio::net::UnixStream> {
    let mut stream = tokio::net::UnixStream::connect(uds).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut line = Vec::new();
    let handshake = async {
        while line.last() != Some(&b'\n') {
            match stream.read_u8().await {
                Ok(byte) => line.push(byte),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(io::Error::other(format!(
                        "closed before OK (got {:?})",
                        String::from_utf8_lossy(&line)
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer to CONNECT"))??;
    check_ok_line(&line)?;
    Ok(stream)
}

/// A client of the agent of the VM whose hybrid vsock socket is `uds`
/// (one attempt). The channel redoes the handshake whenever it reconnects.
pub async fn agent_client(uds: &Path) -> Result<AgentClient, tonic::transport::Error> {
    let uds = uds.to_path_buf();
    let channel = Endpoint::from_static("http://frakti.agent")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let uds = uds.clone();
            async move {
                hybrid_connect_async(&uds, AGENT_VSOCK_PORT)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await?;
    Ok(pb::agent_client::AgentClient::new(channel))
}

#[derive(Debug, thiserror::Error)]
pub enum AgentWaitError {
    #[error("the agent did not answer within {secs} s (last attempt: {last})")]
    Timeout { secs: u64, last: String },
    #[error("stopped waiting for the agent: {0}")]
    GaveUp(String),
}

/// Connects to the agent of a VM that is booting: retries [`agent_client`]
/// until the agent answers `Check` or `timeout` passes. Before each attempt
/// `alive` may end the wait with a reason (e.g. the VMM exited).
pub async fn wait_for_agent(
    uds: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<AgentClient, AgentWaitError> {
    let deadline = Instant::now() + timeout;
    loop {
        alive().map_err(AgentWaitError::GaveUp)?;
        let attempt = async {
            let mut client = agent_client(uds).await.map_err(|e| error_chain(&e))?;
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
                return Err(AgentWaitError::Timeout {
                    secs: timeout.as_secs(),
                    last,
                });
            }
            Err(_) => tokio::time::sleep(RETRY_INTERVAL).await,
        }
    }
}

/// Opens a stream to `port` of the VM with `cid` through AF_VSOCK (a
/// vhost-vsock device, as QEMU has). The stream is a plain socket; std
/// handles it as a `UnixStream`.
pub fn kernel_connect(cid: u32, port: u32) -> io::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
    Ok(UnixStream::from(fd))
}
