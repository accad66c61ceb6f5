//! SPDY/3 header blocks (name/value pairs in SYN_STREAM, SYN_REPLY and
//! HEADERS frames), compressed with one zlib stream per direction.
//!
//! The zlib streams live as long as the session: every block is compressed
//! after the previous ones and ends with a sync flush, so blocks must be
//! encoded in the order they are sent and decoded in the order they arrive,
//! and a block that fails to decode leaves the session unusable.

use std::collections::HashSet;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::{DICTIONARY, DICTIONARY_ID};

/// Name/value pairs in wire order. Names are lowercase; several values of
/// one name are joined by NUL bytes inside one value, as SPDY sends them.
pub type Headers = Vec<(String, String)>;

/// Most bytes a header block may inflate to: stops zlib bombs.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// Most name/value pairs in one block.
pub const MAX_HEADERS: usize = 128;

/// Bytes of zlib output produced per inflate call.
const INFLATE_CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("header block is not a valid zlib stream: {0}")]
    Zlib(String),
    #[error("header block compressed with dictionary {0:#010x}, not SPDY/3's")]
    WrongDictionary(u32),
    #[error("peer ended its header zlib stream")]
    StreamEnded,
    #[error("header block larger than {MAX_HEADER_BLOCK} bytes")]
    TooLarge,
    #[error("header block has {0} pairs, more than {MAX_HEADERS}")]
    TooManyHeaders(u64),
    #[error("header block truncated")]
    Truncated,
    #[error("{0} bytes after the last header pair")]
    TrailingBytes(usize),
    #[error("empty header name")]
    EmptyName,
    #[error("header name is not lowercase")]
    UppercaseName,
    #[error("header name or value is not UTF-8")]
    InvalidUtf8,
    #[error("header name appears twice")]
    DuplicateName,
    #[error("header compression failed: {0}")]
    Compress(String),
}

/// The header compression state of one session: our compressor for what we
/// send, the peer's decompressor for what we receive.
pub struct HeaderCodec {
    compress: Compress,
    decompress: Decompress,
    /// The compressor takes the dictionary before its first block.
    primed: bool,
}

impl std::fmt::Debug for HeaderCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderCodec")
            .field("sent", &self.compress.total_in())
            .field("received", &self.decompress.total_out())
            .finish()
    }
}

impl Default for HeaderCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderCodec {
    pub fn new() -> Self {
        Self {
            compress: Compress::new(Compression::default(), true),
            decompress: Decompress::new(true),
            primed: false,
        }
    }

    /// Compresses one header block; the output ends with a sync flush, so the
    /// peer can decode it without waiting for later blocks. Invalid headers
    /// are refused before anything reaches the compressor.
    pub fn encode(&mut self, headers: &[(String, String)]) -> Result<Vec<u8>, HeaderError> {
        let raw = serialize(headers)?;
        if !self.primed {
            self.compress
                .set_dictionary(DICTIONARY)
                .map_err(|e| HeaderError::Compress(e.to_string()))?;
            self.primed = true;
        }
        let mut out = Vec::with_capacity(raw.len() / 2 + 64);
        let mut consumed = 0usize;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(64));
            }
            let input = raw.get(consumed..).unwrap_or_default();
            let before = self.compress.total_in();
            self.compress
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| HeaderError::Compress(e.to_string()))?;
            let read = self.compress.total_in().saturating_sub(before);
            consumed = consumed.saturating_add(usize::try_from(read).unwrap_or(usize::MAX));
            // Room left after a sync flush means the flush is complete.
            if consumed >= raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }

    /// Inflates and parses one header block from the peer.
    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, HeaderError> {
        let raw = self.inflate(block)?;
        parse(&raw)
    }

    /// Inflates `block` into at most [`MAX_HEADER_BLOCK`] bytes, supplying
    /// the dictionary when the stream's header asks for it.
    fn inflate(&mut self, block: &[u8]) -> Result<Vec<u8>, HeaderError> {
        let mut raw = Vec::new();
        let mut chunk = [0u8; INFLATE_CHUNK];
        let mut consumed = 0usize;
        loop {
            let input = block.get(consumed..).unwrap_or_default();
            let (in_before, out_before) = (self.decompress.total_in(), self.decompress.total_out());
            let result = self
                .decompress
                .decompress(input, &mut chunk, FlushDecompress::Sync);
            let read = self.decompress.total_in().saturating_sub(in_before);
            let written = self.decompress.total_out().saturating_sub(out_before);
            let read = usize::try_from(read).unwrap_or(usize::MAX);
            let written = usize::try_from(written).unwrap_or(usize::MAX);
            consumed = consumed.saturating_add(read);
            let produced = chunk.get(..written).ok_or(HeaderError::TooLarge)?;
            if raw.len().saturating_add(produced.len()) > MAX_HEADER_BLOCK {
                return Err(HeaderError::TooLarge);
            }
            raw.extend_from_slice(produced);
            match result {
                Ok(Status::StreamEnd) => return Err(HeaderError::StreamEnded),
                Ok(Status::Ok | Status::BufError) => {}
                Err(e) => match e.needs_dictionary() {
                    Some(DICTIONARY_ID) => {
                        self.decompress
                            .set_dictionary(DICTIONARY)
                            .map_err(|e| HeaderError::Zlib(e.to_string()))?;
                        continue;
                    }
                    Some(other) => return Err(HeaderError::WrongDictionary(other)),
                    None => return Err(HeaderError::Zlib(e.to_string())),
                },
            }
            // Input used up and room left over: zlib has given all it can.
            if consumed >= block.len() && written < chunk.len() {
                return Ok(raw);
            }
            // No progress with input left and room to write: a stuck stream.
            if read == 0 && written == 0 {
                return Err(HeaderError::Zlib("no progress".into()));
            }
        }
    }
}

/// The uncompressed block: count, then length-prefixed names and values.
fn serialize(headers: &[(String, String)]) -> Result<Vec<u8>, HeaderError> {
    if headers.len() > MAX_HEADERS {
        return Err(HeaderError::TooManyHeaders(headers.len() as u64));
    }
    let mut seen = HashSet::with_capacity(headers.len());
    let mut size = 4usize;
    for (name, value) in headers {
        check_name(name)?;
        if !seen.insert(name.as_str()) {
            return Err(HeaderError::DuplicateName);
        }
        size = size
            .checked_add(8)
            .and_then(|s| s.checked_add(name.len()))
            .and_then(|s| s.checked_add(value.len()))
            .filter(|s| *s <= MAX_HEADER_BLOCK)
            .ok_or(HeaderError::TooLarge)?;
    }
    let mut raw = Vec::with_capacity(size);
    put_len(&mut raw, headers.len())?;
    for (name, value) in headers {
        put_len(&mut raw, name.len())?;
        raw.extend_from_slice(name.as_bytes());
        put_len(&mut raw, value.len())?;
        raw.extend_from_slice(value.as_bytes());
    }
    Ok(raw)
}

fn put_len(raw: &mut Vec<u8>, len: usize) -> Result<(), HeaderError> {
    let len = u32::try_from(len).map_err(|_| HeaderError::TooLarge)?;
    raw.extend_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Names as spdystream accepts them: non-empty and lowercase.
fn check_name(name: &str) -> Result<(), HeaderError> {
    if name.is_empty() {
        return Err(HeaderError::EmptyName);
    }
    if name.chars().any(char::is_uppercase) {
        return Err(HeaderError::UppercaseName);
    }
    Ok(())
}

/// Parses an inflated block; every length is checked against what remains.
fn parse(raw: &[u8]) -> Result<Headers, HeaderError> {
    let mut rest = raw;
    let count = take_u32(&mut rest)?;
    let count = usize::try_from(count)
        .ok()
        .filter(|c| *c <= MAX_HEADERS)
        .ok_or(HeaderError::TooManyHeaders(u64::from(count)))?;
    // Each pair takes at least two lengths and a one-byte name.
    if count.checked_mul(9).is_none_or(|least| least > rest.len()) {
        return Err(HeaderError::Truncated);
    }
    let mut headers = Vec::with_capacity(count);
    let mut seen = HashSet::with_capacity(count);
    for _ in 0..count {
        let name = take_str(&mut rest)?;
        check_name(name)?;
        if !seen.insert(name) {
            return Err(HeaderError::DuplicateName);
        }
        let value = take_str(&mut rest)?;
        headers.push((name.to_owned(), value.to_owned()));
    }
    if !rest.is_empty() {
        return Err(HeaderError::TrailingBytes(rest.len()));
    }
    Ok(headers)
}

fn take_u32(rest: &mut &[u8]) -> Result<u32, HeaderError> {
    let (head, tail) = rest
        .split_first_chunk::<4>()
        .ok_or(HeaderError::Truncated)?;
    *rest = tail;
    Ok(u32::from_be_bytes(*head))
}

fn take_str<'a>(rest: &mut &'a [u8]) -> Result<&'a str, HeaderError> {
    let len = usize::try_from(take_u32(rest)?).map_err(|_| HeaderError::Truncated)?;
    if len > rest.len() {
        return Err(HeaderError::Truncated);
    }
    let (bytes, tail) = rest.split_at(len);
    *rest = tail;
    std::str::from_utf8(bytes).map_err(|_| HeaderError::InvalidUtf8)
}
