//! PortForward: one TCP connection from the agent to a port on the
//! guest's loopback (the pod's containers share the VM's network
//! namespace), carried over a bidirectional gRPC stream.
//!
//! The first client message names the port; the agent connects to
//! `127.0.0.1:port` before it answers, so a refused connection is the
//! RPC's status. Then bytes flow both ways: client chunks are written to
//! the socket in order; an empty chunk (or the end of the client's
//! stream) shuts the socket's write side down. The socket is read in
//! chunks of at most [`CHUNK`] bytes into a queue of [`QUEUE`] messages,
//! so a slow client holds the reads back instead of growing memory; when
//! the peer closes its side the response stream ends once every byte
//! read is sent.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use frakti_proto::agent::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

/// Largest chunk read from the socket and sent in one message.
pub const CHUNK: usize = 32 * 1024;
/// Messages queued towards the client before socket reads wait.
pub const QUEUE: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("nothing listens on {0} in the sandbox")]
    Refused(SocketAddr),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The connection broke after it was set up (`what` names the step).
    #[error("cannot {what} {addr}")]
    Io {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The client's request stream failed.
    #[error("the client's stream failed: {0}")]
    Client(Status),
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = frakti_proto::error_chain(&e);
        match e {
            Error::Invalid(_) => Status::invalid_argument(message),
            Error::Refused(_) | Error::Io { .. } => Status::unavailable(message),
            Error::Connect { .. } => Status::internal(message),
            Error::Client(status) => status,
        }
    }
}

/// The response stream of one forwarded connection.
pub type Responses = ReceiverStream<Result<pb::PortForwardData, Status>>;

/// Reads the first message of `incoming`, connects to its port on
/// 127.0.0.1 and starts moving bytes both ways.
pub async fn open<S>(mut incoming: S) -> Result<Responses, Error>
where
    S: Stream<Item = Result<pb::PortForwardData, Status>> + Unpin + Send + 'static,
{
    let first = match incoming.next().await {
        Some(Ok(first)) => first,
        Some(Err(status)) => return Err(Error::Client(status)),
        None => {
            return Err(Error::Invalid(
                "the stream ended before its first message (which names the port)".into(),
            ));
        }
    };
    let port = match u16::try_from(first.port) {
        Ok(0) | Err(_) => {
            return Err(Error::Invalid(format!(
                "port {} is not a TCP port (1 to 65535)",
                first.port
            )));
        }
        Ok(port) => port,
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let socket = TcpStream::connect(addr).await.map_err(|source| {
        if source.kind() == io::ErrorKind::ConnectionRefused {
            Error::Refused(addr)
        } else {
            Error::Connect { addr, source }
        }
    })?;
    // Latency over batching: chunks are forwarded as they come.
    let _ = socket.set_nodelay(true);
    let (reader, mut writer) = socket.into_split();
    let (tx, rx) = mpsc::channel(QUEUE);
    tracing::debug!(%addr, "port forward: connected");
    tokio::spawn(async move {
        // Only the socket-to-client half holds a strong sender: the
        // response stream ends when the peer closes, whatever the client
        // still sends.
        let errors = tx.downgrade();
        let upstream = tokio::spawn(async move {
            if let Err(e) = to_socket(first.data, incoming, &mut writer, addr).await
                && let Some(tx) = errors.upgrade()
            {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        if let Err(e) = to_client(reader, &tx, addr).await {
            let _ = tx.send(Err(e.into())).await;
        }
        // The RPC is over: stop forwarding the client's bytes (dropping
        // the write half shuts it down).
        upstream.abort();
        tracing::debug!(%addr, "port forward: done");
    });
    Ok(ReceiverStream::new(rx))
}

/// Writes the client's chunks to the socket until an empty chunk or the
/// end of the client's stream, then shuts the write side down.
async fn to_socket<S>(
    first: Vec<u8>,
    mut incoming: S,
    writer: &mut OwnedWriteHalf,
    addr: SocketAddr,
) -> Result<(), Error>
where
    S: Stream<Item = Result<pb::PortForwardData, Status>> + Unpin,
{
    let io = |what| move |source| Error::Io { what, addr, source };
    writer.write_all(&first).await.map_err(io("write to"))?;
    loop {
        match incoming.next().await {
            Some(Ok(message)) if !message.data.is_empty() => {
                writer
                    .write_all(&message.data)
                    .await
                    .map_err(io("write to"))?;
            }
            Some(Ok(_)) | None => break,
            Some(Err(status)) => return Err(Error::Client(status)),
        }
    }
    writer.shutdown().await.map_err(io("half-close"))?;
    // Nothing may follow the half-close but the end of the stream.
    while let Some(message) = incoming.next().await {
        match message {
            Ok(m) if m.data.is_empty() => {}
            Ok(_) => {
                return Err(Error::Invalid(format!(
                    "data after the half-close of {addr}"
                )));
            }
            Err(status) => return Err(Error::Client(status)),
        }
    }
    Ok(())
}

/// Sends what the socket reads to the client until the peer closes its
/// side (or the client goes away).
async fn to_client(
    mut reader: OwnedReadHalf,
    tx: &mpsc::Sender<Result<pb::PortForwardData, Status>>,
    addr: SocketAddr,
) -> Result<(), Error> {
    loop {
        let mut data = vec![0; CHUNK];
        let n = tokio::select! {
            read = reader.read(&mut data) => read.map_err(|source| Error::Io {
                what: "read from",
                addr,
                source,
            })?,
            () = tx.closed() => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        data.truncate(n);
        let message = pb::PortForwardData { port: 0, data };
        if tx.send(Ok(message)).await.is_err() {
            return Ok(());
        }
    }
}
