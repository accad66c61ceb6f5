//! The server side of one SPDY/3.1 connection: streams the client opens
//! are answered (SYN_REPLY) and handed out; their data arrives on bounded
//! channels and is written back through one writer task.
//!
//! Flow control is the TCP connection's: Kubernetes' SPDY peer (moby's
//! spdystream, in kubectl, kubelet and client-go) neither sends nor reads
//! WINDOW_UPDATE frames, so a server that waited for send windows would
//! stall after 64 KiB. We send WINDOW_UPDATEs for what we consumed (a
//! stricter client keeps going) and never wait on windows ourselves. A
//! stream whose reader is slow blocks the frame reader, which stops
//! reading the socket: the client's writes slow down, nothing queues
//! without bound (the same head-of-line behaviour as spdystream).

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::frame::{self, Codec, Frame};
use super::headers::Headers;
use crate::streaming::io::STREAM_QUEUE;

/// Streams open at once on one connection (a port-forward opens two per
/// forwarded TCP connection).
pub const MAX_STREAMS: usize = 1024;
/// DATA frames we send carry at most this much.
pub const MAX_CHUNK: usize = 32 * 1024;
/// Frames queued for the writer.
const WRITE_QUEUE: usize = 32;

/// A stream the client opened.
#[derive(Debug)]
pub struct Stream {
    pub id: u32,
    pub headers: Headers,
    /// The client's data; `None` from `recv()` once it finished (FIN),
    /// reset the stream, or the connection ended.
    pub data: mpsc::Receiver<Bytes>,
    pub writer: StreamWriter,
}

impl Stream {
    /// The value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The connection is gone: nothing more can be written.
#[derive(Debug, thiserror::Error)]
#[error("the SPDY connection is closed")]
pub struct Closed;

enum Command {
    Frame(Frame),
    /// Flush, shut the socket's write side down and stop.
    Close,
}

/// Writes to one stream; clones write to the same stream.
#[derive(Debug, Clone)]
pub struct StreamWriter {
    id: u32,
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Frame(_) => f.write_str("Frame"),
            Command::Close => f.write_str("Close"),
        }
    }
}

impl StreamWriter {
    /// Sends `data` in DATA frames of at most [`MAX_CHUNK`] bytes; waits
    /// while the connection's write queue is full.
    pub async fn send(&self, mut data: Bytes) -> Result<(), Closed> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_CHUNK));
            self.frame(Frame::Data {
                stream_id: self.id,
                fin: false,
                data: chunk,
            })
            .await?;
        }
        Ok(())
    }

    /// Ends our side of the stream (an empty DATA frame with FIN).
    pub async fn finish(&self) -> Result<(), Closed> {
        self.frame(Frame::Data {
            stream_id: self.id,
            fin: true,
            data: Bytes::new(),
        })
        .await
    }

    /// Aborts the stream (RST_STREAM with `status`).
    pub async fn reset(&self, status: u32) -> Result<(), Closed> {
        self.frame(Frame::RstStream {
            stream_id: self.id,
            status,
        })
        .await
    }

    async fn frame(&self, frame: Frame) -> Result<(), Closed> {
        self.commands
            .send(Command::Frame(frame))
            .await
            .map_err(|_| Closed)
    }
}

/// One upgraded connection speaking SPDY/3.1, server side.
pub struct Session {
    incoming: mpsc::Receiver<Stream>,
    /// Set once the client's side of the connection ended.
    client_gone: watch::Receiver<bool>,
    commands: mpsc::Sender<Command>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Session {
    /// Starts reading and writing frames on `io` (after the HTTP upgrade).
    pub fn start<IO>(io: IO) -> Session
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(io);
        let (commands, queue) = mpsc::channel(WRITE_QUEUE);
        let (streams, incoming) = mpsc::channel(STREAM_QUEUE);
        let writer = tokio::spawn(write_frames(
            FramedWrite::new(write, Codec::default()),
            queue,
        ));
        let (gone, client_gone) = watch::channel(false);
        let reader = Reader {
            commands: commands.clone(),
            streams,
            open: HashMap::new(),
            last_id: 0,
            going_away: false,
        };
        let frames = FramedRead::new(read, Codec::default());
        let reader = tokio::spawn(async move {
            reader.run(frames).await;
            let _ = gone.send(true);
        });
        Session {
            incoming,
            client_gone,
            commands,
            reader,
            writer,
        }
    }

    /// The next stream the client opens; `None` once the connection ended.
    pub async fn accept(&mut self) -> Option<Stream> {
        self.incoming.recv().await
    }

    /// Resolves once the client's side of the connection has ended (it
    /// closed it, or sent something malformed): nothing more will come.
    pub fn client_gone(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut gone = self.client_gone.clone();
        async move {
            let _ = gone.wait_for(|gone| *gone).await;
        }
    }

    /// Says GOAWAY, sends what is queued, and closes the connection.
    pub async fn close(mut self) {
        let goaway = Frame::GoAway {
            last_good_stream_id: 0,
            status: frame::GOAWAY_OK,
        };
        let _ = self.commands.send(Command::Frame(goaway)).await;
        let _ = self.commands.send(Command::Close).await;
        self.reader.abort();
        let _ = (&mut self.writer).await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

async fn write_frames<W>(mut out: FramedWrite<W, Codec>, mut queue: mpsc::Receiver<Command>)
where
    W: AsyncWrite + Unpin,
{
    while let Some(command) = queue.recv().await {
        let frame = match command {
            Command::Frame(frame) => frame,
            Command::Close => break,
        };
        // Frames queued behind this one go out in the same write.
        let result = if queue.is_empty() {
            out.send(frame).await
        } else {
            out.feed(frame).await
        };
        if let Err(e) = result {
            tracing::debug!("SPDY write: {e}");
            return;
        }
    }
    let _ = out.flush().await;
    let _ = out.get_mut().shutdown().await;
}

/// The frame reader's state.
struct Reader {
    commands: mpsc::Sender<Command>,
    streams: mpsc::Sender<Stream>,
    /// Senders of the client streams whose data may still come.
    open: HashMap<u32, mpsc::Sender<Bytes>>,
    last_id: u32,
    going_away: bool,
}

impl Reader {
    async fn run<R>(mut self, mut frames: FramedRead<R, Codec>)
    where
        R: AsyncRead + Unpin,
    {
        while let Some(frame) = frames.next().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => {
                    tracing::debug!("SPDY: malformed frame from the client: {e}");
                    let goaway = Frame::GoAway {
                        last_good_stream_id: self.last_id,
                        status: frame::GOAWAY_PROTOCOL_ERROR,
                    };
                    let _ = self.commands.send(Command::Frame(goaway)).await;
                    return;
                }
            };
            if self.handle(frame).await.is_err() {
                return;
            }
        }
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), Closed> {
        match frame {
            Frame::SynStream {
                stream_id,
                fin,
                headers,
                ..
            } => self.open_stream(stream_id, fin, headers).await,
            Frame::Data {
                stream_id,
                fin,
                data,
            } => self.data(stream_id, fin, data).await,
            Frame::RstStream { stream_id, .. } => {
                self.open.remove(&stream_id);
                Ok(())
            }
            // Client pings are odd; answer them.
            Frame::Ping { id } if id % 2 == 1 => self.send(Frame::Ping { id }).await,
            Frame::GoAway { .. } => {
                self.going_away = true;
                Ok(())
            }
            // We open no streams (no SYN_REPLY to expect), take no
            // settings and, like spdystream, send without windows.
            _ => Ok(()),
        }
    }

    async fn open_stream(&mut self, id: u32, fin: bool, headers: Headers) -> Result<(), Closed> {
        // Client streams are odd and increasing.
        if id % 2 == 0 || id <= self.last_id {
            return self.reset(id, frame::RST_PROTOCOL_ERROR).await;
        }
        self.last_id = id;
        if self.going_away || self.open.len() >= MAX_STREAMS {
            return self.reset(id, frame::RST_REFUSED_STREAM).await;
        }
        let (sender, data) = mpsc::channel(STREAM_QUEUE);
        if !fin {
            self.open.insert(id, sender);
        }
        // The reply goes out before anything written to the stream.
        self.send(Frame::SynReply {
            stream_id: id,
            fin: false,
            headers: Vec::new(),
        })
        .await?;
        let stream = Stream {
            id,
            headers,
            data,
            writer: StreamWriter {
                id,
                commands: self.commands.clone(),
            },
        };
        if self.streams.send(stream).await.is_err() {
            // Nobody accepts streams any more.
            self.open.remove(&id);
            return self.reset(id, frame::RST_REFUSED_STREAM).await;
        }
        Ok(())
    }

    async fn data(&mut self, id: u32, fin: bool, data: Bytes) -> Result<(), Closed> {
        let Some(sender) = self.open.get(&id) else {
            // Unknown, finished or reset: spdystream drops such data too.
            return Ok(());
        };
        let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
        if !data.is_empty() && sender.send(data).await.is_err() {
            // The handler no longer reads this stream.
            self.open.remove(&id);
        }
        if fin {
            self.open.remove(&id);
        }
        if length > 0 {
            self.send(Frame::WindowUpdate {
                stream_id: id,
                delta: length,
            })
            .await?;
            self.send(Frame::WindowUpdate {
                stream_id: 0,
                delta: length,
            })
            .await?;
        }
        Ok(())
    }

    async fn reset(&mut self, id: u32, status: u32) -> Result<(), Closed> {
        self.send(Frame::RstStream {
            stream_id: id,
            status,
        })
        .await
    }

    async fn send(&self, frame: Frame) -> Result<(), Closed> {
        self.commands
            .send(Command::Frame(frame))
            .await
            .map_err(|_| Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Framed;

    fn syn(id: u32, fin: bool, kind: &str) -> Frame {
        Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            fin,
            unidirectional: false,
            headers: vec![("streamtype".into(), kind.into())],
        }
    }

    async fn next(client: &mut Framed<tokio::io::DuplexStream, Codec>) -> Frame {
        tokio::time::timeout(std::time::Duration::from_secs(5), client.next())
            .await
            .expect("a frame in time")
            .expect("the connection is open")
            .expect("a well-formed frame")
    }

    #[tokio::test]
    async fn streams_are_answered_routed_and_closed() {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let mut session = Session::start(ours);
        let mut client = Framed::new(theirs, Codec::default());
        client.send(syn(1, false, "stdin")).await.unwrap();
        assert!(matches!(
            next(&mut client).await,
            Frame::SynReply { stream_id: 1, .. }
        ));
        let mut stream = session.accept().await.unwrap();
        assert_eq!(stream.header("streamtype"), Some("stdin"));
        client
            .send(Frame::Data {
                stream_id: 1,
                fin: true,
                data: Bytes::from_static(b"typed"),
            })
            .await
            .unwrap();
        assert_eq!(stream.data.recv().await.unwrap(), &b"typed"[..]);
        assert!(
            stream.data.recv().await.is_none(),
            "FIN ends the stream's data"
        );
        // What we consumed is given back as window.
        assert!(matches!(
            next(&mut client).await,
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 5
            }
        ));
        assert!(matches!(
            next(&mut client).await,
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 5
            }
        ));

        // Our data, split into chunks, then our FIN.
        let big = Bytes::from(vec![7u8; MAX_CHUNK + 10]);
        stream.writer.send(big).await.unwrap();
        stream.writer.finish().await.unwrap();
        let mut got = 0;
        loop {
            match next(&mut client).await {
                Frame::Data {
                    stream_id: 1,
                    fin: false,
                    data,
                } => got += data.len(),
                Frame::Data {
                    stream_id: 1,
                    fin: true,
                    data,
                } => {
                    assert!(data.is_empty());
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, MAX_CHUNK + 10);

        // Pings are answered; even or repeated stream ids are refused.
        client.send(Frame::Ping { id: 7 }).await.unwrap();
        assert_eq!(next(&mut client).await, Frame::Ping { id: 7 });
        client.send(syn(4, false, "stdout")).await.unwrap();
        assert!(matches!(
            next(&mut client).await,
            Frame::RstStream {
                stream_id: 4,
                status: frame::RST_PROTOCOL_ERROR
            }
        ));
        client.send(syn(1, false, "stdout")).await.unwrap();
        assert!(matches!(
            next(&mut client).await,
            Frame::RstStream { stream_id: 1, .. }
        ));

        // Garbage: GOAWAY, and the session ends for the application.
        let gone = session.client_gone();
        client
            .get_mut()
            .write_all(&[0x80, 0x02, 0, 1, 0, 0, 0, 0])
            .await
            .unwrap();
        assert!(matches!(
            next(&mut client).await,
            Frame::GoAway {
                status: frame::GOAWAY_PROTOCOL_ERROR,
                ..
            }
        ));
        tokio::time::timeout(std::time::Duration::from_secs(5), gone)
            .await
            .expect("the session noticed");
        assert!(session.accept().await.is_none());
    }

    #[tokio::test]
    async fn close_sends_goaway_and_ends_the_connection() {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let session = Session::start(ours);
        let mut client = Framed::new(theirs, Codec::default());
        session.close().await;
        assert!(matches!(
            next(&mut client).await,
            Frame::GoAway {
                status: frame::GOAWAY_OK,
                ..
            }
        ));
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), client.next()).await;
        assert!(matches!(end, Ok(None)), "the connection is closed");
    }
}
