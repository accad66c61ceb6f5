//! Port forwarding over a channel protocol: one connection to the pod per
//! requested port, its bytes on channel 2i, its errors on 2i+1.

use std::fmt::Display;
use std::future::Future;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;

use super::{
    ClientMessage, Kind, NORMAL, POLICY, PROTOCOL, WsError, close, decode_client_message,
    encode_message, message_bytes, refuse,
};
use crate::runtime::Runtime;
use crate::streaming::io::{PortConnection, STREAM_QUEUE};

/// Serves a port-forward of `ports` (in this order: port i is on channels
/// 2i and 2i+1) to pod `pod_id` on `socket`, which negotiated `protocol`
/// (one of [`super::PORT_FORWARD_PROTOCOLS`], or `""` when the client
/// named none).
pub async fn serve_port_forward(
    socket: WebSocket,
    protocol: &str,
    runtime: Runtime,
    pod_id: String,
    ports: Vec<u16>,
) {
    let (mut tx, mut rx) = socket.split();
    let kind = match Kind::port_forward(protocol) {
        Ok(kind) => kind,
        Err(e) => return refuse(&mut tx, &mut rx, PROTOCOL, &e).await,
    };
    let connect = |port| crate::streaming::portforward::connect(&runtime, &pod_id, port);
    port_forward_session(tx, rx, kind, &pod_id, &ports, connect).await;
}

/// [`serve_port_forward`] on any message sink and stream, with `connect`
/// for the connections (its error: the whole message for the client).
pub(super) async fn port_forward_session<Tx, Rx, E, F, Fut>(
    mut tx: Tx,
    mut rx: Rx,
    kind: Kind,
    pod_id: &str,
    ports: &[u16],
    connect: F,
) where
    Tx: Sink<Message> + Unpin,
    Rx: Stream<Item = Result<Message, E>> + Unpin,
    E: Display,
    F: Fn(u16) -> Fut,
    Fut: Future<Output = Result<PortConnection, String>>,
{
    if ports.len() > kind.max_ports() {
        let error = WsError::TooManyPorts {
            count: ports.len(),
            max: kind.max_ports(),
        };
        return refuse(&mut tx, &mut rx, POLICY, &error).await;
    }
    // Kubelet names each channel's port first, data and error alike.
    for (index, port) in ports.iter().enumerate() {
        let (data, error) = channels(index);
        for channel in [data, error] {
            let msg = encode_message(kind, channel, &port.to_le_bytes());
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    }
    let (inbound_tx, inbound_rx): (Vec<_>, Vec<_>) = ports
        .iter()
        .map(|_| {
            let (tx, rx) = mpsc::channel::<Bytes>(STREAM_QUEUE);
            (Some(tx), rx)
        })
        .unzip();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(STREAM_QUEUE);
    let ended = {
        let forwards =
            futures_util::future::join_all(ports.iter().zip(inbound_rx).enumerate().map(
                |(index, (&port, inbound))| {
                    let forward = Forward {
                        kind,
                        pod_id,
                        index,
                        port,
                        out: out_tx.clone(),
                    };
                    forward.run(&connect, inbound)
                },
            ));
        drop(out_tx);
        let sink = &mut tx;
        let writer = async move {
            while let Some(msg) = out_rx.recv().await {
                if sink.send(msg).await.is_err() {
                    return false;
                }
            }
            true
        };
        // Every connection ended (or the client stopped taking bytes).
        let work = async { tokio::join!(forwards, writer).1 };
        let reader = read_input(&mut rx, kind, inbound_tx);
        tokio::pin!(work, reader);
        tokio::select! {
            delivered = &mut work => Some(delivered),
            () = &mut reader => None,
        }
    };
    match ended {
        Some(true) => close(&mut tx, &mut rx, NORMAL, "").await,
        // The client closed: our close frame answers its own.
        None => {
            let _ = tx.send(Message::Close(None)).await;
        }
        Some(false) => {}
    }
}

/// The data and error channels of the port at `index` (< 128).
fn channels(index: usize) -> (u8, u8) {
    let data = u8::try_from(index * 2).unwrap_or(u8::MAX - 1);
    (data, data + 1)
}

/// Where a decoded message goes: the index of the port whose data
/// channel it is on, with the bytes for the pod.
pub(super) fn route_port(msg: ClientMessage, ports: usize) -> Result<(usize, Bytes), WsError> {
    match msg {
        ClientMessage::Data { channel, payload } => {
            let index = usize::from(channel / 2);
            if index >= ports {
                Err(WsError::UnknownChannel(channel))
            } else if channel % 2 == 1 {
                Err(WsError::WriteOnly(channel))
            } else {
                Ok((index, payload))
            }
        }
        // No port-forward protocol has the close signal.
        ClientMessage::Close { channel } => Err(WsError::UnknownChannel(channel)),
    }
}

/// The client's bytes to the ports until it closes the connection.
async fn read_input<Rx, E>(rx: &mut Rx, kind: Kind, mut inbound: Vec<Option<mpsc::Sender<Bytes>>>)
where
    Rx: Stream<Item = Result<Message, E>> + Unpin,
    E: Display,
{
    while let Some(item) = rx.next().await {
        let msg = match item {
            Ok(Message::Close(_)) => break,
            Ok(msg) => msg,
            Err(e) => {
                tracing::debug!("websocket port-forward: {e}");
                break;
            }
        };
        let Some(bytes) = message_bytes(&msg) else {
            continue;
        };
        let routed = decode_client_message(kind, bytes).and_then(|m| route_port(m, inbound.len()));
        let (index, data) = match routed {
            Ok(routed) => routed,
            Err(e) => {
                tracing::debug!("websocket port-forward: message ignored: {e}");
                continue;
            }
        };
        let Some(slot) = inbound.get_mut(index) else {
            continue;
        };
        if let Some(sender) = slot {
            // A connection that ended takes no more bytes.
            if !data.is_empty() && sender.send(data).await.is_err() {
                *slot = None;
            }
        }
    }
}

/// One port of the session.
struct Forward<'a> {
    kind: Kind,
    pod_id: &'a str,
    index: usize,
    port: u16,
    out: mpsc::Sender<Message>,
}

impl Forward<'_> {
    /// Connects, then copies both ways until the pod's side ends, the
    /// connection fails, or the client stops taking bytes.
    async fn run<F, Fut>(self, connect: &F, mut inbound: mpsc::Receiver<Bytes>)
    where
        F: Fn(u16) -> Fut,
        Fut: Future<Output = Result<PortConnection, String>>,
    {
        let PortConnection {
            to_pod,
            mut from_pod,
            mut error,
        } = match connect(self.port).await {
            Ok(connection) => connection,
            Err(message) => {
                tracing::debug!(pod = %self.pod_id, port = self.port, "{message}");
                self.report(message).await;
                return;
            }
        };
        let (data_channel, _) = channels(self.index);
        let upload = async move {
            while let Some(data) = inbound.recv().await {
                if to_pod.send(data).await.is_err() {
                    break;
                }
            }
            // Dropping `to_pod` half-closes the connection.
        };
        let download = async {
            let mut error_open = true;
            loop {
                // Biased: the bytes that came before a failure go first.
                tokio::select! {
                    biased;
                    chunk = from_pod.recv() => match chunk {
                        Some(data) if data.is_empty() => {}
                        Some(data) => {
                            let msg = encode_message(self.kind, data_channel, &data);
                            if self.out.send(msg).await.is_err() {
                                return;
                            }
                        }
                        None => break,
                    },
                    failure = &mut error, if error_open => match failure {
                        Ok(message) => return self.report_failure(message).await,
                        Err(_) => error_open = false,
                    },
                }
            }
            // The failure is sent before the pod's side closes.
            if error_open {
                if let Ok(message) = error.try_recv() {
                    self.report_failure(message).await;
                }
            }
        };
        tokio::pin!(upload, download);
        tokio::select! {
            () = &mut download => {}
            // The client's side ended: the pod's may still have bytes.
            () = &mut upload => (&mut download).await,
        }
    }

    /// A connection that failed after it was made.
    async fn report_failure(&self, message: String) {
        let message = format!(
            "error forwarding port {} to pod {}: {message}",
            self.port, self.pod_id
        );
        tracing::debug!("{message}");
        self.report(message).await;
    }

    async fn report(&self, message: String) {
        let (_, error_channel) = channels(self.index);
        let msg = encode_message(self.kind, error_channel, message.as_bytes());
        let _ = self.out.send(msg).await;
    }
}
