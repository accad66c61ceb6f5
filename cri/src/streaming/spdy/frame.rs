//! SPDY/3 frames and their codec (draft-mbelshe-httpbis-spdy-00, section 2),
//! as a `tokio_util` [`Decoder`] and [`Encoder`] over a byte stream.
//!
//! Every frame has an 8-byte head. A control frame: C=1 (1 bit), version
//! (15 bits, 3), type (16), flags (8), length (24). A data frame: C=0, stream
//! id (31 bits), flags (8), length (24). The payload follows.
//!
//! The decoder trusts nothing: lengths are bounded before anything is
//! buffered, fixed-size frames must have their size, and once it has
//! returned an error it refuses to go on (the shared header zlib context may
//! be out of step with the peer's, so nothing after can be trusted).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::headers::{HeaderCodec, HeaderError, Headers};

/// The only version spoken.
pub const VERSION: u16 = 3;

/// Bytes in a frame head.
pub const HEADER_LEN: usize = 8;

/// Largest length the 24-bit field can carry.
pub const MAX_LENGTH: usize = 0xFF_FFFF;

/// Largest control frame accepted or sent (header blocks inflate to at most
/// 64 KiB, so legitimate ones are far smaller).
pub const MAX_FRAME_LENGTH: usize = 1 << 20;

/// Largest data frame accepted (the protocol allows up to [`MAX_LENGTH`]);
/// senders should split data well below it.
pub const MAX_DATA_LENGTH: usize = 1 << 20;

pub const TYPE_SYN_STREAM: u16 = 1;
pub const TYPE_SYN_REPLY: u16 = 2;
pub const TYPE_RST_STREAM: u16 = 3;
pub const TYPE_SETTINGS: u16 = 4;
pub const TYPE_PING: u16 = 6;
pub const TYPE_GOAWAY: u16 = 7;
pub const TYPE_HEADERS: u16 = 8;
pub const TYPE_WINDOW_UPDATE: u16 = 9;

/// Last frame of its sender on the stream (SYN_STREAM, SYN_REPLY, HEADERS,
/// DATA).
pub const FLAG_FIN: u8 = 0x01;
/// SYN_STREAM: the receiver sends nothing on the stream.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// SETTINGS: forget persisted settings.
pub const FLAG_SETTINGS_CLEAR: u8 = 0x01;

/// Per-entry flags of SETTINGS.
pub const FLAG_SETTINGS_PERSIST_VALUE: u8 = 0x01;
pub const FLAG_SETTINGS_PERSISTED: u8 = 0x02;

/// SETTINGS ids.
pub const SETTINGS_UPLOAD_BANDWIDTH: u32 = 1;
pub const SETTINGS_DOWNLOAD_BANDWIDTH: u32 = 2;
pub const SETTINGS_ROUND_TRIP_TIME: u32 = 3;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u32 = 4;
pub const SETTINGS_CURRENT_CWND: u32 = 5;
pub const SETTINGS_DOWNLOAD_RETRANS_RATE: u32 = 6;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;
pub const SETTINGS_CLIENT_CERTIFICATE_VECTOR_SIZE: u32 = 8;

/// RST_STREAM status codes.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_INVALID_STREAM: u32 = 2;
pub const RST_REFUSED_STREAM: u32 = 3;
pub const RST_UNSUPPORTED_VERSION: u32 = 4;
pub const RST_CANCEL: u32 = 5;
pub const RST_INTERNAL_ERROR: u32 = 6;
pub const RST_FLOW_CONTROL_ERROR: u32 = 7;
pub const RST_STREAM_IN_USE: u32 = 8;
pub const RST_STREAM_ALREADY_CLOSED: u32 = 9;
pub const RST_FRAME_TOO_LARGE: u32 = 11;

/// GOAWAY status codes.
pub const GOAWAY_OK: u32 = 0;
pub const GOAWAY_PROTOCOL_ERROR: u32 = 1;
pub const GOAWAY_INTERNAL_ERROR: u32 = 2;

/// Stream ids and window deltas are 31 bits; the top bit is reserved.
const ID_MASK: u32 = 0x7FFF_FFFF;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        /// 0 (highest) to 7.
        priority: u8,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        clear: bool,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    /// Stream 0 is the session's window (SPDY/3.1).
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        fin: bool,
        data: Bytes,
    },
}

impl Frame {
    /// The stream a frame belongs to (0 for the session's WINDOW_UPDATE);
    /// `None` for frames about the whole session.
    pub fn stream_id(&self) -> Option<u32> {
        match self {
            Frame::SynStream { stream_id, .. }
            | Frame::SynReply { stream_id, .. }
            | Frame::RstStream { stream_id, .. }
            | Frame::Headers { stream_id, .. }
            | Frame::WindowUpdate { stream_id, .. }
            | Frame::Data { stream_id, .. } => Some(*stream_id),
            Frame::Settings { .. } | Frame::Ping { .. } | Frame::GoAway { .. } => None,
        }
    }
}

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    /// 24 bits.
    pub id: u32,
    pub value: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("reading or writing frames: {0}")]
    Io(#[from] std::io::Error),
    #[error("SPDY version {0}, only 3 is spoken")]
    UnsupportedVersion(u16),
    #[error("{kind} frame of {length} bytes is larger than accepted")]
    TooLarge { kind: &'static str, length: usize },
    #[error("{kind} frame with a length of {length} bytes")]
    BadLength { kind: &'static str, length: usize },
    #[error("{0} frame on stream 0")]
    ZeroStreamId(&'static str),
    #[error("SETTINGS declares {count} entries in {length} bytes")]
    SettingsCount { count: u32, length: usize },
    #[error("header block: {0}")]
    Headers(#[from] HeaderError),
    #[error("cannot send the frame: {0}")]
    Invalid(&'static str),
    #[error("the session's frame stream failed earlier")]
    Broken,
}

/// The frame codec of one session (either end): the header compression
/// contexts, and the decoder's position in the byte stream.
#[derive(Debug)]
pub struct Codec {
    headers: HeaderCodec,
    /// Bytes of an ignored (unknown type) control frame still to drop.
    skip: usize,
    /// Set once decoding failed: the stream cannot be resynchronised.
    failed: bool,
}

impl Default for Codec {
    fn default() -> Self {
        Self::new()
    }
}

impl Codec {
    pub fn new() -> Self {
        Self {
            headers: HeaderCodec::new(),
            skip: 0,
            failed: false,
        }
    }

    fn decode_frame(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(src.len());
                src.advance(n);
                self.skip -= n;
                if self.skip > 0 {
                    return Ok(None);
                }
            }
            let Some(&head) = src.first_chunk::<HEADER_LEN>() else {
                src.reserve(HEADER_LEN - src.len());
                return Ok(None);
            };
            let word = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            let flags = head[4];
            let length = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;

            if word & 0x8000_0000 == 0 {
                // Data frame: the stream id is the whole first word.
                if word == 0 {
                    return Err(FrameError::ZeroStreamId("DATA"));
                }
                if length > MAX_DATA_LENGTH {
                    return Err(FrameError::TooLarge {
                        kind: "DATA",
                        length,
                    });
                }
                if !wait_for(src, HEADER_LEN + length) {
                    return Ok(None);
                }
                src.advance(HEADER_LEN);
                let data = src.split_to(length).freeze();
                return Ok(Some(Frame::Data {
                    stream_id: word,
                    fin: flags & FLAG_FIN != 0,
                    data,
                }));
            }

            let version = ((word >> 16) & 0x7FFF) as u16;
            if version != VERSION {
                return Err(FrameError::UnsupportedVersion(version));
            }
            let frame_type = (word & 0xFFFF) as u16;
            let Some(kind) = type_name(frame_type) else {
                // SPDY: unknown control frames are ignored, unbuffered.
                src.advance(HEADER_LEN);
                self.skip = length;
                continue;
            };
            if length > MAX_FRAME_LENGTH {
                return Err(FrameError::TooLarge { kind, length });
            }
            let fits = match frame_type {
                TYPE_SYN_STREAM => length >= 10,
                TYPE_SYN_REPLY | TYPE_HEADERS => length >= 4,
                TYPE_SETTINGS => length >= 4 && (length - 4) % 8 == 0,
                TYPE_PING => length == 4,
                _ => length == 8,
            };
            if !fits {
                return Err(FrameError::BadLength { kind, length });
            }
            let total = HEADER_LEN + length;
            if !wait_for(src, total) {
                return Ok(None);
            }
            // Consumed even when it fails: header blocks go through the
            // zlib context exactly once.
            let payload = src.get(HEADER_LEN..total).unwrap_or_default();
            let frame = self.control(frame_type, flags, payload);
            src.advance(total);
            return frame.map(Some);
        }
    }

    /// Parses a control frame's payload, whose length is already checked.
    fn control(&mut self, frame_type: u16, flags: u8, payload: &[u8]) -> Result<Frame, FrameError> {
        let mut p = Payload(payload);
        let fin = flags & FLAG_FIN != 0;
        let frame = match frame_type {
            TYPE_SYN_STREAM => {
                let stream_id = p.id()?;
                let associated_to = p.id()?;
                let priority = p.u8()? >> 5;
                let _slot = p.u8()?;
                let headers = self.headers.decode(p.0)?;
                nonzero(stream_id, "SYN_STREAM")?;
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    fin,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers,
                }
            }
            TYPE_SYN_REPLY => {
                let stream_id = p.id()?;
                let headers = self.headers.decode(p.0)?;
                nonzero(stream_id, "SYN_REPLY")?;
                Frame::SynReply {
                    stream_id,
                    fin,
                    headers,
                }
            }
            TYPE_HEADERS => {
                let stream_id = p.id()?;
                let headers = self.headers.decode(p.0)?;
                nonzero(stream_id, "HEADERS")?;
                Frame::Headers {
                    stream_id,
                    fin,
                    headers,
                }
            }
            TYPE_RST_STREAM => {
                let stream_id = nonzero(p.id()?, "RST_STREAM")?;
                Frame::RstStream {
                    stream_id,
                    status: p.u32()?,
                }
            }
            TYPE_SETTINGS => {
                let count = p.u32()?;
                let length = payload.len();
                if usize::try_from(count).ok() != Some(p.0.len() / 8) || p.0.len() % 8 != 0 {
                    return Err(FrameError::SettingsCount { count, length });
                }
                let mut entries = Vec::with_capacity(p.0.len() / 8);
                while !p.0.is_empty() {
                    let word = p.u32()?;
                    entries.push(Setting {
                        flags: (word >> 24) as u8,
                        id: word & 0xFF_FFFF,
                        value: p.u32()?,
                    });
                }
                Frame::Settings {
                    clear: flags & FLAG_SETTINGS_CLEAR != 0,
                    entries,
                }
            }
            TYPE_PING => Frame::Ping { id: p.u32()? },
            TYPE_GOAWAY => Frame::GoAway {
                last_good_stream_id: p.id()?,
                status: p.u32()?,
            },
            TYPE_WINDOW_UPDATE => Frame::WindowUpdate {
                stream_id: p.id()?,
                delta: p.id()?,
            },
            _ => {
                return Err(FrameError::BadLength {
                    kind: "unknown",
                    length: payload.len(),
                });
            }
        };
        Ok(frame)
    }
}

impl Decoder for Codec {
    type Item = Frame;
    type Error = FrameError;

    /// One frame once all of it has arrived; unknown control frames are
    /// dropped on the way. Reserves only what the current frame lacks.
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if self.failed {
            return Err(FrameError::Broken);
        }
        let result = self.decode_frame(src);
        self.failed = result.is_err();
        result
    }
}

impl Encoder<Frame> for Codec {
    type Error = FrameError;

    /// Appends one frame to `dst`. Frames are checked before their header
    /// block is compressed, so a refused frame leaves the context intact;
    /// header blocks must be sent in the order they were encoded.
    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                fin,
                unidirectional,
                headers,
            } => {
                let stream_id = stream(stream_id, "SYN_STREAM")?;
                let associated_to = id31(associated_to)?;
                if priority > 7 {
                    return Err(FrameError::Invalid("priority above 7"));
                }
                let block = self.headers.encode(&headers)?;
                let flags =
                    (u8::from(fin) * FLAG_FIN) | (u8::from(unidirectional) * FLAG_UNIDIRECTIONAL);
                control(dst, TYPE_SYN_STREAM, flags, 10 + block.len())?;
                dst.put_u32(stream_id);
                dst.put_u32(associated_to);
                dst.put_u8(priority << 5);
                dst.put_u8(0);
                dst.put_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            } => header_frame(self, dst, TYPE_SYN_REPLY, stream_id, fin, &headers)?,
            Frame::Headers {
                stream_id,
                fin,
                headers,
            } => header_frame(self, dst, TYPE_HEADERS, stream_id, fin, &headers)?,
            Frame::RstStream { stream_id, status } => {
                let stream_id = stream(stream_id, "RST_STREAM")?;
                control(dst, TYPE_RST_STREAM, 0, 8)?;
                dst.put_u32(stream_id);
                dst.put_u32(status);
            }
            Frame::Settings { clear, entries } => {
                let length = entries
                    .len()
                    .checked_mul(8)
                    .and_then(|n| n.checked_add(4))
                    .ok_or(FrameError::Invalid("too many settings"))?;
                let count = u32::try_from(entries.len())
                    .map_err(|_| FrameError::Invalid("too many settings"))?;
                if entries.iter().any(|e| e.id > 0xFF_FFFF) {
                    return Err(FrameError::Invalid("setting id above 24 bits"));
                }
                control(
                    dst,
                    TYPE_SETTINGS,
                    u8::from(clear) * FLAG_SETTINGS_CLEAR,
                    length,
                )?;
                dst.put_u32(count);
                for entry in entries {
                    dst.put_u32(u32::from(entry.flags) << 24 | entry.id);
                    dst.put_u32(entry.value);
                }
            }
            Frame::Ping { id } => {
                control(dst, TYPE_PING, 0, 4)?;
                dst.put_u32(id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                let last = id31(last_good_stream_id)?;
                control(dst, TYPE_GOAWAY, 0, 8)?;
                dst.put_u32(last);
                dst.put_u32(status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                let (stream_id, delta) = (id31(stream_id)?, id31(delta)?);
                control(dst, TYPE_WINDOW_UPDATE, 0, 8)?;
                dst.put_u32(stream_id);
                dst.put_u32(delta);
            }
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                // A set top bit would turn the frame into a control frame.
                let stream_id = stream(stream_id, "DATA")?;
                if data.len() > MAX_LENGTH {
                    return Err(FrameError::TooLarge {
                        kind: "DATA",
                        length: data.len(),
                    });
                }
                dst.reserve(HEADER_LEN + data.len());
                dst.put_u32(stream_id);
                dst.put_u8(u8::from(fin) * FLAG_FIN);
                dst.put_uint(data.len() as u64, 3);
                dst.put_slice(&data);
            }
        }
        Ok(())
    }
}

/// SYN_REPLY and HEADERS: a stream id, then a header block.
fn header_frame(
    codec: &mut Codec,
    dst: &mut BytesMut,
    frame_type: u16,
    stream_id: u32,
    fin: bool,
    headers: &[(String, String)],
) -> Result<(), FrameError> {
    let kind = type_name(frame_type).unwrap_or("control");
    let stream_id = stream(stream_id, kind)?;
    let block = codec.headers.encode(headers)?;
    control(dst, frame_type, u8::from(fin) * FLAG_FIN, 4 + block.len())?;
    dst.put_u32(stream_id);
    dst.put_slice(&block);
    Ok(())
}

/// Writes a control frame's head, once its length is known to be sendable.
fn control(
    dst: &mut BytesMut,
    frame_type: u16,
    flags: u8,
    length: usize,
) -> Result<(), FrameError> {
    if length > MAX_FRAME_LENGTH {
        return Err(FrameError::TooLarge {
            kind: type_name(frame_type).unwrap_or("control"),
            length,
        });
    }
    dst.reserve(HEADER_LEN + length);
    dst.put_u16(0x8000 | VERSION);
    dst.put_u16(frame_type);
    dst.put_u8(flags);
    dst.put_uint(length as u64, 3);
    Ok(())
}

fn type_name(frame_type: u16) -> Option<&'static str> {
    Some(match frame_type {
        TYPE_SYN_STREAM => "SYN_STREAM",
        TYPE_SYN_REPLY => "SYN_REPLY",
        TYPE_RST_STREAM => "RST_STREAM",
        TYPE_SETTINGS => "SETTINGS",
        TYPE_PING => "PING",
        TYPE_GOAWAY => "GOAWAY",
        TYPE_HEADERS => "HEADERS",
        TYPE_WINDOW_UPDATE => "WINDOW_UPDATE",
        _ => return None,
    })
}

/// True once `src` holds `total` bytes; otherwise reserves what is missing.
fn wait_for(src: &mut BytesMut, total: usize) -> bool {
    if src.len() >= total {
        return true;
    }
    src.reserve(total - src.len());
    false
}

fn nonzero(stream_id: u32, kind: &'static str) -> Result<u32, FrameError> {
    if stream_id == 0 {
        return Err(FrameError::ZeroStreamId(kind));
    }
    Ok(stream_id)
}

/// A stream id to send: 31 bits, not 0.
fn stream(stream_id: u32, kind: &'static str) -> Result<u32, FrameError> {
    nonzero(id31(stream_id)?, kind)
}

fn id31(id: u32) -> Result<u32, FrameError> {
    if id > ID_MASK {
        return Err(FrameError::Invalid("id or delta above 31 bits"));
    }
    Ok(id)
}

/// A control frame's payload being read; running short is an error.
struct Payload<'a>(&'a [u8]);

impl Payload<'_> {
    fn u8(&mut self) -> Result<u8, FrameError> {
        let (&byte, rest) = self.0.split_first().ok_or(self.short())?;
        self.0 = rest;
        Ok(byte)
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        let (word, rest) = self.0.split_first_chunk::<4>().ok_or(self.short())?;
        self.0 = rest;
        Ok(u32::from_be_bytes(*word))
    }

    /// A 31-bit id (or delta), the reserved top bit ignored.
    fn id(&mut self) -> Result<u32, FrameError> {
        Ok(self.u32()? & ID_MASK)
    }

    fn short(&self) -> FrameError {
        FrameError::BadLength {
            kind: "control",
            length: self.0.len(),
        }
    }
}
