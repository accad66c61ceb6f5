//! The zlib dictionary of SPDY/3 header blocks (draft-mbelshe-httpbis-spdy-00,
//! 2.6.10.1): both directions of every SPDY/3 session start their header
//! zlib stream with it, so a peer refuses blocks compressed without it.
//!
//! Written out as the spec defines it (length-prefixed words, then a text
//! tail) and assembled at compile time, rather than as an opaque blob.

/// Words of the dictionary, each preceded by its length (u32, big endian).
const WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The text after the words, without length prefixes (and no final NUL).
const TAIL: &[&str] = &[
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request\
     401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented\
     503 Service Unavailable",
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,\
     text/plain,text/javascript,public",
    "private",
    "max-age=",
    "gzip,deflate,sdch",
    "charset=utf-8",
    "charset=iso-8859-1,utf-,*,enq=0.",
];

const fn assembled_len() -> usize {
    let mut len = 0;
    let mut i = 0;
    while i < WORDS.len() {
        len += 4 + WORDS[i].len();
        i += 1;
    }
    let mut i = 0;
    while i < TAIL.len() {
        len += TAIL[i].len();
        i += 1;
    }
    len
}

/// Length of the dictionary: 1423 bytes.
pub const DICTIONARY_LEN: usize = assembled_len();
const _: () = assert!(DICTIONARY_LEN == 1423);

const fn assemble() -> [u8; DICTIONARY_LEN] {
    let mut out = [0u8; DICTIONARY_LEN];
    let mut at = 0;
    let mut i = 0;
    while i < WORDS.len() {
        let word = WORDS[i].as_bytes();
        let len = (word.len() as u32).to_be_bytes();
        let mut j = 0;
        while j < 4 {
            out[at] = len[j];
            at += 1;
            j += 1;
        }
        let mut j = 0;
        while j < word.len() {
            out[at] = word[j];
            at += 1;
            j += 1;
        }
        i += 1;
    }
    let mut i = 0;
    while i < TAIL.len() {
        let text = TAIL[i].as_bytes();
        let mut j = 0;
        while j < text.len() {
            out[at] = text[j];
            at += 1;
            j += 1;
        }
        i += 1;
    }
    out
}

static ASSEMBLED: [u8; DICTIONARY_LEN] = assemble();

/// The SPDY/3 header dictionary.
pub static DICTIONARY: &[u8] = &ASSEMBLED;

/// Adler-32 of [`DICTIONARY`]: the DICTID a zlib stream compressed with it
/// carries, which the decompressor checks before trusting the stream.
pub const DICTIONARY_ID: u32 = adler32(&assemble());

const fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    let (mut a, mut b) = (1u32, 0u32);
    let mut i = 0;
    while i < data.len() {
        a = (a + data[i] as u32) % MOD;
        b = (b + a) % MOD;
        i += 1;
    }
    (b << 16) | a
}

#[cfg(test)]
mod tests {
    use super::{DICTIONARY, DICTIONARY_ID};
    use sha2::{Digest, Sha256};

    #[test]
    fn dictionary_is_the_spdy3_one() {
        assert_eq!(DICTIONARY.len(), 1423);
        let digest = Sha256::digest(DICTIONARY);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
        );
        assert_eq!(DICTIONARY_ID, 0xe3c6a7c2);
        assert!(DICTIONARY.starts_with(b"\0\0\0\x07options\0\0\0\x04head"));
        assert!(DICTIONARY.ends_with(b"enq=0."));
    }

    #[test]
    fn zlib_agrees_on_the_dictionary_id() {
        let mut compress = flate2::Compress::new(flate2::Compression::default(), true);
        let id = compress.set_dictionary(DICTIONARY).expect("set_dictionary");
        assert_eq!(id, DICTIONARY_ID);
        let mut out = Vec::with_capacity(64);
        compress
            .compress_vec(b"x", &mut out, flate2::FlushCompress::Sync)
            .expect("compress");
        // CMF, FLG with FDICT set, then the DICTID.
        assert_eq!(out.get(1).map(|flg| flg & 0x20), Some(0x20));
        assert_eq!(out.get(2..6), Some(&DICTIONARY_ID.to_be_bytes()[..]));
    }
}
