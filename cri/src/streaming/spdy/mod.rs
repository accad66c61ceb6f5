//! SPDY/3.1, as Kubernetes speaks it for `kubectl exec`, `attach` and
//! `port-forward` (kubelet proxies the client's connection to the runtime's
//! streaming server).
//!
//! Kubernetes uses SPDY only as a stream multiplexer, through Go's
//! `moby/spdystream` (its framer is the old `go.net/spdy` one):
//!
//! - The client sends an HTTP/1.1 request with `Connection: Upgrade`,
//!   `Upgrade: SPDY/3.1` and the subprotocols it offers in
//!   `X-Stream-Protocol-Version`; the server answers `101 Switching
//!   Protocols` with the one it chose, then both ends speak SPDY frames on
//!   the TCP connection. The client is the SPDY client: its streams have odd
//!   ids; the server's (it opens none) would be even.
//! - The client opens one stream per channel with SYN_STREAM; its header
//!   block says what the stream is: `streamtype` (`error`, `stdin`,
//!   `stdout`, `stderr`, `resize` for exec and attach; `data` and `error`
//!   plus `port` and `requestid` for port-forward). The server accepts a
//!   stream with SYN_REPLY, then both sides send DATA; FIN (on DATA, or on
//!   SYN_STREAM/SYN_REPLY) half-closes, RST_STREAM aborts a stream, GOAWAY
//!   ends the session. Streams the client only reads (stdout, stderr,
//!   error) are half-closed by the client right away.
//! - Header blocks are zlib-compressed with SPDY/3's [`dictionary`], one
//!   zlib stream per direction for the whole session, each block ending in
//!   a sync flush ([`headers`]). So every header block must be decoded, in
//!   order, even for a stream about to be refused. spdystream rejects
//!   uppercase header names.
//! - PING is answered by echoing it (ids of the other end's parity).
//!   spdystream neither sends nor honours WINDOW_UPDATE or SETTINGS, so flow
//!   control is in practice TCP's: a reader that stops reading stalls the
//!   whole connection.
//!
//! [`frame`] has the frames and their `tokio_util` codec; [`session`] (which
//! streams exist, replies, resets, pings) sits on top of it.

pub mod dictionary;
pub mod frame;
pub mod headers;
pub mod session;

pub use dictionary::{DICTIONARY, DICTIONARY_ID};
pub use frame::{Codec, Frame, FrameError, Setting};
pub use headers::{HeaderCodec, HeaderError, Headers};

#[cfg(test)]
mod tests;
