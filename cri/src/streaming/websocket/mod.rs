//! Exec, attach and port-forward over WebSocket: Kubernetes' channel
//! protocols, as kubelet's streaming server speaks them.
//!
//! SPDY gives every standard stream its own stream; a WebSocket has one
//! message stream, so these protocols put a channel number in front of
//! every message:
//!
//! - `channel.k8s.io` (also what a client naming no subprotocol gets) and
//!   the `v4.`/`v5.` versions: binary messages, the first byte is the
//!   channel, the rest the payload.
//! - `base64.channel.k8s.io` and `v4.base64.channel.k8s.io`, for clients
//!   (browsers) that handle text better: text messages, the first
//!   character is the channel as a digit (`'0' + channel`), the rest the
//!   payload in standard base64.
//!
//! Kubelet reads a client's message the same way whether its frame is
//! text or binary (older Python clients send the binary protocol in text
//! frames), so we do too.
//!
//! Exec and attach ([`serve_process`]) use channels 0 stdin, 1 stdout,
//! 2 stderr, 3 error and 4 resize (JSON terminal sizes). Once connected,
//! the server sends an empty message on the lowest output channel the
//! request has (stdout, else stderr, else error) so that the client knows
//! the session is up. When the process ends the error channel gets the
//! outcome: v4 and v5 a metav1.Status JSON, the older protocols the error
//! text (nothing on success); then the server closes the connection.
//! Only v5 lets the client end stdin without closing the connection: the
//! message `[255, channel]` closes that channel.
//!
//! Port forwarding ([`serve_port_forward`]) uses two channels per port,
//! in the order of the request's ports: port i sends and receives bytes
//! on channel 2i and gets its errors (text) on channel 2i+1. The server's
//! first message on each of these channels is the port number (2 bytes,
//! little-endian); the client sends its bytes without any prefix. A port
//! whose connection fails gets the message on its error channel while the
//! others go on; when every port's connection has ended the server
//! closes the WebSocket, as kubelet does.
//!
//! Back-pressure: a client message is handed on with a bounded channel's
//! `send().await` (a process that does not read stdin slows the client
//! down) and output goes straight to the socket (a slow client slows the
//! process).

mod exec;
mod portforward;
#[cfg(test)]
mod tests;

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, close_code};
use base64::Engine;
use base64::engine::{GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};

pub use exec::serve_process;
pub use portforward::serve_port_forward;

/// Exec and attach subprotocols, preferred first.
pub const EXEC_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

/// Port-forward subprotocols, preferred first: kubelet's list (its
/// `portforward.k8s.io` is the SPDY protocol, and it has no v5 here).
/// kubelet's names first; the `portforward` spellings are accepted too (the
/// same protocol, as some clients name it).
pub const PORT_FORWARD_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "v4.portforward.k8s.io",
    "v4.base64.portforward.k8s.io",
];

/// Channel numbers of exec and attach.
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
/// v5: a client message starting with this byte closes the channel in
/// its second byte.
pub const CLOSE_SIGNAL: u8 = 255;

/// How long the client may take to answer our close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Go's `base64.StdEncoding` as kubelet decodes with it: padding
/// required, non-zero trailing bits accepted.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

/// A channel protocol, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `v5.channel.k8s.io`: v4 with the close signal.
    V5,
    /// `v4.channel.k8s.io`: binary, metav1.Status on the error channel.
    V4,
    /// `v4.base64.channel.k8s.io`.
    V4Base64,
    /// `channel.k8s.io`, or no subprotocol: binary, error text.
    V1,
    /// `base64.channel.k8s.io`.
    V1Base64,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::V5, Kind::V4, Kind::V4Base64, Kind::V1, Kind::V1Base64];

    /// The exec/attach protocol of a negotiated subprotocol (`""`: the
    /// client named none).
    pub fn exec(protocol: &str) -> Result<Kind, WsError> {
        match protocol {
            "v5.channel.k8s.io" => Ok(Kind::V5),
            "v4.channel.k8s.io" => Ok(Kind::V4),
            "v4.base64.channel.k8s.io" => Ok(Kind::V4Base64),
            "channel.k8s.io" | "" => Ok(Kind::V1),
            "base64.channel.k8s.io" => Ok(Kind::V1Base64),
            other => Err(WsError::Protocol(other.to_string())),
        }
    }

    /// The port-forward protocol of a negotiated subprotocol (`""`: the
    /// client named none, binary).
    pub fn port_forward(protocol: &str) -> Result<Kind, WsError> {
        match protocol {
            "v4.channel.k8s.io" | "v4.portforward.k8s.io" => Ok(Kind::V4),
            "v4.base64.channel.k8s.io" | "v4.base64.portforward.k8s.io" => Ok(Kind::V4Base64),
            "" => Ok(Kind::V1),
            other => Err(WsError::Protocol(other.to_string())),
        }
    }

    /// Text messages with base64 payloads.
    pub fn is_base64(self) -> bool {
        matches!(self, Kind::V4Base64 | Kind::V1Base64)
    }

    /// The error channel carries a metav1.Status (else the error text).
    pub fn has_status(self) -> bool {
        matches!(self, Kind::V5 | Kind::V4 | Kind::V4Base64)
    }

    /// The client may close a channel with [`CLOSE_SIGNAL`].
    pub fn has_close_signal(self) -> bool {
        self == Kind::V5
    }

    /// How many ports one connection can forward: two channels each, and
    /// a base64 channel digit must stay ASCII (`'0' + 79` is DEL) for the
    /// client's first byte to be the whole digit.
    pub fn max_ports(self) -> usize {
        if self.is_base64() { 40 } else { 128 }
    }
}

/// A message from the client, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// Bytes for a channel.
    Data { channel: u8, payload: Bytes },
    /// v5: the client closed its side of a channel.
    Close { channel: u8 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("unsupported WebSocket subprotocol {0:?}")]
    Protocol(String),
    #[error("empty message: no channel")]
    Empty,
    #[error("channel character {0:#04x} is not a digit")]
    ChannelChar(u8),
    #[error("a close signal names one channel, this one has {0} bytes after the signal")]
    CloseSignal(usize),
    #[error("channel {channel}: the payload is not base64: {reason}")]
    Base64 { channel: u8, reason: String },
    #[error("there is no channel {0}")]
    UnknownChannel(u8),
    #[error("channel {0} carries only the server's output")]
    WriteOnly(u8),
    #[error("a resize message is not a terminal size: {0}")]
    Resize(String),
    #[error("a resize message longer than {0} bytes")]
    ResizeTooLong(usize),
    #[error("{count} ports cannot be forwarded on one connection (at most {max})")]
    TooManyPorts { count: usize, max: usize },
}

/// Decodes a client's message (text or binary frame alike) into its
/// channel and payload, or a close signal.
pub fn decode_client_message(kind: Kind, msg: &[u8]) -> Result<ClientMessage, WsError> {
    let (&first, rest) = msg.split_first().ok_or(WsError::Empty)?;
    if kind.has_close_signal() && first == CLOSE_SIGNAL {
        return match rest {
            [channel] => Ok(ClientMessage::Close { channel: *channel }),
            _ => Err(WsError::CloseSignal(rest.len())),
        };
    }
    if !kind.is_base64() {
        return Ok(ClientMessage::Data {
            channel: first,
            payload: Bytes::copy_from_slice(rest),
        });
    }
    let channel = first.checked_sub(b'0').ok_or(WsError::ChannelChar(first))?;
    // Go's decoder skips line breaks.
    let decoded = if rest.iter().any(|b| matches!(b, b'\r' | b'\n')) {
        let joined: Vec<u8> = rest
            .iter()
            .copied()
            .filter(|b| !matches!(b, b'\r' | b'\n'))
            .collect();
        BASE64.decode(joined)
    } else {
        BASE64.decode(rest)
    };
    let payload = decoded.map_err(|e| WsError::Base64 {
        channel,
        reason: e.to_string(),
    })?;
    Ok(ClientMessage::Data {
        channel,
        payload: Bytes::from(payload),
    })
}

/// The message that carries `payload` on `channel`.
pub fn encode_message(kind: Kind, channel: u8, payload: &[u8]) -> Message {
    if kind.is_base64() {
        let mut text = String::with_capacity(1 + payload.len().div_ceil(3) * 4);
        // As kubelet: '0' + channel, wrapping, as a code point.
        text.push(char::from(b'0'.wrapping_add(channel)));
        BASE64.encode_string(payload, &mut text);
        Message::Text(Utf8Bytes::from(text))
    } else {
        let mut frame = Vec::with_capacity(1 + payload.len());
        frame.push(channel);
        frame.extend_from_slice(payload);
        Message::Binary(Bytes::from(frame))
    }
}

/// The bytes of a data message (text or binary); `None` for control
/// messages (axum answers pings itself).
fn message_bytes(msg: &Message) -> Option<&[u8]> {
    match msg {
        Message::Binary(bytes) => Some(bytes),
        Message::Text(text) => Some(text.as_bytes()),
        Message::Ping(_) | Message::Pong(_) | Message::Close(_) => None,
    }
}

/// Closes the connection with `code`: our close frame, then the client's
/// messages until its answer (or [`CLOSE_GRACE`]).
async fn close<Tx, Rx, E>(tx: &mut Tx, rx: &mut Rx, code: u16, reason: &str)
where
    Tx: Sink<Message> + Unpin,
    Rx: Stream<Item = Result<Message, E>> + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from(reason),
    };
    if tx.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let drain = async { while let Some(Ok(_)) = rx.next().await {} };
    let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
}

/// Refuses a session the server cannot serve (protocol, ports).
async fn refuse<Tx, Rx, E>(tx: &mut Tx, rx: &mut Rx, code: u16, error: &WsError)
where
    Tx: Sink<Message> + Unpin,
    Rx: Stream<Item = Result<Message, E>> + Unpin,
{
    tracing::debug!("websocket: {error}");
    // A close reason is at most 123 bytes.
    let mut reason = error.to_string();
    if reason.len() > 123 {
        let mut end = 123;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    close(tx, rx, code, &reason).await;
}

/// Close codes used here.
const NORMAL: u16 = close_code::NORMAL;
const PROTOCOL: u16 = close_code::PROTOCOL;
const POLICY: u16 = close_code::POLICY;
