//! A SPDY/3.1 client as Kubernetes' clients speak it (moby's spdystream
//! in kubectl and client-go), on frakti's own frame codec: the HTTP
//! upgrade, streams with odd ids opened by SYN_STREAM, DATA routed to
//! each stream by id, the server's PINGs answered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use frakti_cri::streaming::spdy::frame::{self, Codec, Frame};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};

/// DATA frames we send carry at most this much (as the server's).
const CHUNK: usize = 32 * 1024;

/// What happened on one stream, in order.
#[derive(Debug)]
pub enum Event {
    Reply,
    Data(Bytes),
    Fin,
    Reset(u32),
}

type Routes = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Event>>>>;

/// Why the session ended, once it did.
type Ended = Arc<Mutex<Option<String>>>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The host and path of an `http://HOST/PATH` URL.
pub fn split_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http URL: {url}"))?;
    let slash = rest
        .find('/')
        .with_context(|| format!("no path in {url}"))?;
    Ok(rest.split_at(slash))
}

/// POSTs an upgrade to SPDY/3.1 offering `protocol`; checks the `101`
/// and the protocol in it. Returns the socket, the bytes that came after
/// the response head, and the head.
pub async fn upgrade(url: &str, protocol: &str) -> anyhow::Result<(TcpStream, Vec<u8>, String)> {
    let (host, path) = split_url(url)?;
    let mut socket = TcpStream::connect(host)
        .await
        .with_context(|| format!("connect {host}"))?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         X-Stream-Protocol-Version: {protocol}\r\nContent-Length: 0\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await?;
    let mut buffer = Vec::new();
    let read_head = async {
        loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                return anyhow::Ok(end + 4);
            }
            ensure!(
                buffer.len() < 64 * 1024,
                "a response head of more than 64 KiB"
            );
            let mut chunk = [0u8; 4096];
            let n = socket.read(&mut chunk).await?;
            ensure!(
                n > 0,
                "the server closed the connection before its response head"
            );
            buffer.extend_from_slice(&chunk[..n]);
        }
    };
    let end = tokio::time::timeout(Duration::from_secs(30), read_head)
        .await
        .with_context(|| {
            format!(
                "no response head within 30 s; read {:?}",
                String::from_utf8_lossy(&buffer)
            )
        })?
        .with_context(|| {
            format!(
                "reading the response head; read {:?}",
                String::from_utf8_lossy(&buffer)
            )
        })?;
    let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
    ensure!(
        head.starts_with("HTTP/1.1 101"),
        "upgrade to SPDY/3.1 refused:\n{head}"
    );
    let chosen = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("x-stream-protocol-version")
            .then(|| value.trim().to_string())
    });
    ensure!(
        chosen.as_deref() == Some(protocol),
        "the server chose protocol {chosen:?}, not {protocol:?}:\n{head}"
    );
    Ok((socket, buffer.split_off(end), head))
}

/// One client session.
pub struct SpdyClient {
    out: mpsc::UnboundedSender<Frame>,
    routes: Routes,
    ended: Ended,
    /// The status of the server's GOAWAY, if it sent one.
    goaway: Arc<Mutex<Option<u32>>>,
    next_id: u32,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl SpdyClient {
    /// Upgrades a connection to `url` (see [`upgrade`]) and starts the
    /// frame pump.
    pub async fn upgrade(url: &str, protocol: &str) -> anyhow::Result<SpdyClient> {
        let (socket, rest, _head) = upgrade(url, protocol).await?;
        let (read, write) = socket.into_split();
        let mut frames = FramedRead::new(read, Codec::new());
        frames.read_buffer_mut().extend_from_slice(&rest);
        let (out, queue) = mpsc::unbounded_channel();
        let routes = Routes::default();
        let ended = Ended::default();
        let goaway = Arc::new(Mutex::new(None));
        let writer = tokio::spawn(write_frames(
            FramedWrite::new(write, Codec::new()),
            queue,
            ended.clone(),
        ));
        let pump = Pump {
            out: out.clone(),
            routes: routes.clone(),
            ended: ended.clone(),
            goaway: goaway.clone(),
        };
        let reader = tokio::spawn(pump.run(frames));
        Ok(SpdyClient {
            out,
            routes,
            ended,
            goaway,
            next_id: 1,
            reader,
            writer,
        })
    }

    /// Opens a stream (SYN_STREAM with the next odd id) with `headers`.
    pub fn open(&mut self, headers: &[(&str, &str)]) -> anyhow::Result<SpdyStream> {
        let id = self.next_id;
        self.next_id += 2;
        let (sender, events) = mpsc::unbounded_channel();
        lock(&self.routes).insert(id, sender);
        self.frame(Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            fin: false,
            unidirectional: false,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        })?;
        Ok(SpdyStream {
            id,
            events,
            ended: self.ended.clone(),
        })
    }

    /// Sends `data` on stream `id` in DATA frames; `fin` ends our side
    /// (on an empty frame of its own when `data` is empty).
    pub fn send(&self, id: u32, data: &[u8], fin: bool) -> anyhow::Result<()> {
        let mut chunks = data.chunks(CHUNK).peekable();
        if chunks.peek().is_none() {
            return self.frame(Frame::Data {
                stream_id: id,
                fin,
                data: Bytes::new(),
            });
        }
        while let Some(chunk) = chunks.next() {
            self.frame(Frame::Data {
                stream_id: id,
                fin: fin && chunks.peek().is_none(),
                data: Bytes::copy_from_slice(chunk),
            })?;
        }
        Ok(())
    }

    /// Queues a frame for the writer (frames go out in order: header
    /// blocks are compressed in the order they are sent).
    fn frame(&self, frame: Frame) -> anyhow::Result<()> {
        if self.out.send(frame).is_err() {
            bail!("cannot send: {}", self.why_ended());
        }
        Ok(())
    }

    /// Waits (up to `limit`) until the server closed the connection;
    /// returns why the session ended and the GOAWAY status, if any.
    pub async fn closed(mut self, limit: Duration) -> anyhow::Result<(String, Option<u32>)> {
        tokio::time::timeout(limit, &mut self.reader)
            .await
            .with_context(|| {
                format!("the server did not close the SPDY connection within {limit:?}")
            })??;
        Ok((self.why_ended(), *lock(&self.goaway)))
    }

    fn why_ended(&self) -> String {
        lock(&self.ended)
            .clone()
            .unwrap_or_else(|| "the session is still up".into())
    }
}

impl Drop for SpdyClient {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// One stream we opened: its events.
pub struct SpdyStream {
    pub id: u32,
    events: mpsc::UnboundedReceiver<Event>,
    ended: Ended,
}

impl SpdyStream {
    /// The next event, by `deadline`.
    pub async fn event(&mut self, deadline: Instant) -> anyhow::Result<Event> {
        match tokio::time::timeout_at(deadline, self.events.recv()).await {
            Err(_) => {
                let why = lock(&self.ended).clone();
                let why = why
                    .map(|w| format!(" (the session ended: {w})"))
                    .unwrap_or_default();
                bail!("stream {}: nothing from the server in time{why}", self.id)
            }
            Ok(Some(event)) => Ok(event),
            Ok(None) => {
                let why = lock(&self.ended).clone().unwrap_or_default();
                bail!("stream {}: the session ended: {why}", self.id)
            }
        }
    }

    /// Waits for the server's SYN_REPLY, which comes before anything else.
    pub async fn replied(&mut self, deadline: Instant) -> anyhow::Result<()> {
        match self.event(deadline).await? {
            Event::Reply => Ok(()),
            other => bail!("stream {}: {other:?} before the SYN_REPLY", self.id),
        }
    }

    /// The next data; `None` at the server's FIN. A reset is an error.
    pub async fn data(&mut self, deadline: Instant) -> anyhow::Result<Option<Bytes>> {
        loop {
            match self.event(deadline).await? {
                Event::Data(data) => return Ok(Some(data)),
                Event::Fin => return Ok(None),
                Event::Reply => {}
                Event::Reset(status) => {
                    bail!("stream {}: reset by the server (status {status})", self.id)
                }
            }
        }
    }

    /// Everything up to the server's FIN.
    pub async fn read_to_fin(&mut self, deadline: Instant) -> anyhow::Result<Vec<u8>> {
        let mut all = Vec::new();
        loop {
            match self.data(deadline).await {
                Ok(Some(data)) => all.extend_from_slice(&data),
                Ok(None) => return Ok(all),
                Err(e) => {
                    return Err(e.context(format!(
                        "{} bytes read before: {:?}",
                        all.len(),
                        String::from_utf8_lossy(&all[..all.len().min(300)])
                    )));
                }
            }
        }
    }
}

async fn write_frames(
    mut out: FramedWrite<tokio::net::tcp::OwnedWriteHalf, Codec>,
    mut queue: mpsc::UnboundedReceiver<Frame>,
    ended: Ended,
) {
    while let Some(frame) = queue.recv().await {
        let result = if queue.is_empty() {
            out.send(frame).await
        } else {
            out.feed(frame).await
        };
        if let Err(e) = result {
            lock(&ended).get_or_insert_with(|| format!("writing frames: {e}"));
            return;
        }
    }
}

/// Reads the server's frames and routes them to their streams.
struct Pump {
    out: mpsc::UnboundedSender<Frame>,
    routes: Routes,
    ended: Ended,
    goaway: Arc<Mutex<Option<u32>>>,
}

impl Pump {
    async fn run(self, mut frames: FramedRead<tokio::net::tcp::OwnedReadHalf, Codec>) {
        let why = loop {
            match frames.next().await {
                None => break "the server closed the connection".to_string(),
                Some(Err(e)) => break format!("a bad frame from the server: {e}"),
                Some(Ok(frame)) => self.route(frame),
            }
        };
        lock(&self.ended).get_or_insert(why);
        // The streams see the end.
        lock(&self.routes).clear();
    }

    fn route(&self, frame: Frame) {
        let (id, events) = match frame {
            Frame::SynReply { stream_id, fin, .. } => (
                stream_id,
                if fin {
                    vec![Event::Reply, Event::Fin]
                } else {
                    vec![Event::Reply]
                },
            ),
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                let mut events = Vec::new();
                if !data.is_empty() {
                    events.push(Event::Data(data));
                }
                if fin {
                    events.push(Event::Fin);
                }
                (stream_id, events)
            }
            Frame::RstStream { stream_id, status } => (stream_id, vec![Event::Reset(status)]),
            // The server's pings have even ids: echo them. Ours come back.
            Frame::Ping { id } => {
                if id % 2 == 0 {
                    let _ = self.out.send(Frame::Ping { id });
                }
                return;
            }
            Frame::GoAway { status, .. } => {
                *lock(&self.goaway) = Some(status);
                return;
            }
            // A server stream: not in these protocols.
            Frame::SynStream { stream_id, .. } => {
                let _ = self.out.send(Frame::RstStream {
                    stream_id,
                    status: frame::RST_REFUSED_STREAM,
                });
                return;
            }
            // Windows (spdystream ignores them too), settings, headers.
            _ => return,
        };
        let routes = lock(&self.routes);
        if let Some(route) = routes.get(&id) {
            for event in events {
                let _ = route.send(event);
            }
        }
    }
}
