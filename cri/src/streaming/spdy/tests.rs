//! The SPDY codec against frames written out byte by byte from the spec,
//! against plain zlib, and against hostile input.

use bytes::{Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio_util::codec::{Decoder, Encoder};

use super::frame::*;
use super::headers::{HeaderCodec, HeaderError, Headers, MAX_HEADER_BLOCK};
use super::{DICTIONARY, DICTIONARY_ID};

/// An uncompressed header block, written from the spec.
fn raw_block(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut raw = (pairs.len() as u32).to_be_bytes().to_vec();
    for (name, value) in pairs {
        raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
        raw.extend_from_slice(name);
        raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
        raw.extend_from_slice(value);
    }
    raw
}

/// A zlib stream piece carrying `raw` in a non-final stored block, which is
/// what a sync flush looks like; the first piece of a session starts with
/// the zlib header naming the SPDY dictionary (FDICT, DICTID 0xe3c6a7c2).
fn stored(first: bool, raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if first {
        out.extend_from_slice(&[0x78, 0xbb, 0xe3, 0xc6, 0xa7, 0xc2]);
    }
    let len = u16::try_from(raw.len()).expect("stored block fits");
    out.push(0x00);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(raw);
    out
}

/// A control frame: C=1, version 3, type, flags, 24-bit length, payload.
fn control(frame_type: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![0x80, 0x03];
    out.extend_from_slice(&frame_type.to_be_bytes());
    out.push(flags);
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(payload);
    out
}

fn headers(pairs: &[(&str, &str)]) -> Headers {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn codec() -> Codec {
    Codec::new()
}

/// A plain SYN_STREAM: priority 0, no flags.
fn syn(stream_id: u32, pairs: &[(&str, &str)]) -> Frame {
    Frame::SynStream {
        stream_id,
        associated_to: 0,
        priority: 0,
        fin: false,
        unidirectional: false,
        headers: headers(pairs),
    }
}

/// Decodes every frame in `bytes`, which must end on a frame boundary.
fn decode_all(codec: &mut Codec, bytes: &[u8]) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(frame) = codec.decode(&mut buf).expect("decode") {
        frames.push(frame);
    }
    assert!(buf.is_empty(), "{} bytes left", buf.len());
    frames
}

fn decode_err(bytes: &[u8]) -> FrameError {
    let mut codec = codec();
    let mut buf = BytesMut::from(bytes);
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("no error; {} bytes left", buf.len()),
            Err(e) => return e,
        }
    }
}

fn encode_all(codec: &mut Codec, frames: &[Frame]) -> BytesMut {
    let mut buf = BytesMut::new();
    for frame in frames {
        codec.encode(frame.clone(), &mut buf).expect("encode");
    }
    buf
}

/// Inflates with plain zlib, supplying the dictionary when asked.
fn plain_inflate(zlib: &mut Decompress, block: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 << 16);
    let mut pos = 0;
    while pos < block.len() {
        let before = zlib.total_in();
        if let Err(e) = zlib.decompress_vec(&block[pos..], &mut out, FlushDecompress::Sync) {
            assert_eq!(e.needs_dictionary(), Some(0xe3c6a7c2), "{e}");
            zlib.set_dictionary(DICTIONARY).expect("set_dictionary");
        }
        pos += (zlib.total_in() - before) as usize;
    }
    out
}

/// Deflates with plain zlib and a sync flush.
fn plain_deflate(zlib: &mut Compress, raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 1024);
    let before = zlib.total_in();
    zlib.compress_vec(raw, &mut out, FlushCompress::Sync)
        .expect("compress");
    assert_eq!((zlib.total_in() - before) as usize, raw.len());
    assert!(out.len() < out.capacity(), "flush incomplete");
    out
}

fn plain_compressor() -> Compress {
    let mut zlib = Compress::new(Compression::best(), true);
    let id = zlib.set_dictionary(DICTIONARY).expect("set_dictionary");
    assert_eq!(id, DICTIONARY_ID);
    zlib
}

#[test]
fn hand_built_header_frames_share_one_zlib_stream() {
    let error = raw_block(&[(b"streamtype", b"error")]);
    // SYN_STREAM 1, FIN|UNIDIRECTIONAL, X bit set (ignored), priority 3.
    let mut syn = vec![0x80, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x60, 0x00];
    syn.extend(stored(true, &error));
    let mut bytes = control(TYPE_SYN_STREAM, 0x03, &syn);
    // SYN_REPLY 2, the next block of the same zlib stream (no zlib header).
    let mut reply = vec![0x00, 0x00, 0x00, 0x02];
    reply.extend(stored(false, &raw_block(&[(b"a", b"x\0y"), (b"b", b"")])));
    bytes.extend(control(TYPE_SYN_REPLY, 0x01, &reply));
    // HEADERS 3, no flags.
    let mut hdrs = vec![0x00, 0x00, 0x00, 0x03];
    hdrs.extend(stored(false, &raw_block(&[(b"port", b"8080")])));
    bytes.extend(control(TYPE_HEADERS, 0x00, &hdrs));

    assert_eq!(
        decode_all(&mut codec(), &bytes),
        [
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 3,
                fin: true,
                unidirectional: true,
                headers: headers(&[("streamtype", "error")]),
            },
            Frame::SynReply {
                stream_id: 2,
                fin: true,
                headers: headers(&[("a", "x\0y"), ("b", "")]),
            },
            Frame::Headers {
                stream_id: 3,
                fin: false,
                headers: headers(&[("port", "8080")]),
            },
        ]
    );
}

#[test]
fn hand_built_fixed_frames() {
    #[rustfmt::skip]
    let bytes: &[u8] = &[
        // RST_STREAM stream 5, CANCEL.
        0x80, 0x03, 0x00, 0x03, 0x00, 0x00, 0x00, 0x08,
        0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x05,
        // SETTINGS, CLEAR, 2 entries: persist MAX_CONCURRENT_STREAMS=100,
        // INITIAL_WINDOW_SIZE=65536.
        0x80, 0x03, 0x00, 0x04, 0x01, 0x00, 0x00, 0x14,
        0x00, 0x00, 0x00, 0x02,
        0x01, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x64,
        0x00, 0x00, 0x00, 0x07, 0x00, 0x01, 0x00, 0x00,
        // PING 42.
        0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04,
        0x00, 0x00, 0x00, 0x2a,
        // GOAWAY last good 7, PROTOCOL_ERROR.
        0x80, 0x03, 0x00, 0x07, 0x00, 0x00, 0x00, 0x08,
        0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x01,
        // WINDOW_UPDATE session (stream 0), delta 65536.
        0x80, 0x03, 0x00, 0x09, 0x00, 0x00, 0x00, 0x08,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
        // WINDOW_UPDATE stream 3, delta 1 with the reserved bit set.
        0x80, 0x03, 0x00, 0x09, 0x00, 0x00, 0x00, 0x08,
        0x00, 0x00, 0x00, 0x03, 0x80, 0x00, 0x00, 0x01,
        // DATA stream 1, FIN, "hello".
        0x00, 0x00, 0x00, 0x01, 0x01, 0x00, 0x00, 0x05,
        b'h', b'e', b'l', b'l', b'o',
        // DATA stream 3, empty.
        0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00,
    ];
    assert_eq!(
        decode_all(&mut codec(), bytes),
        [
            Frame::RstStream {
                stream_id: 5,
                status: RST_CANCEL
            },
            Frame::Settings {
                clear: true,
                entries: vec![
                    Setting {
                        flags: FLAG_SETTINGS_PERSIST_VALUE,
                        id: SETTINGS_MAX_CONCURRENT_STREAMS,
                        value: 100
                    },
                    Setting {
                        flags: 0,
                        id: SETTINGS_INITIAL_WINDOW_SIZE,
                        value: 65536
                    },
                ],
            },
            Frame::Ping { id: 42 },
            Frame::GoAway {
                last_good_stream_id: 7,
                status: GOAWAY_PROTOCOL_ERROR
            },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 65536
            },
            Frame::WindowUpdate {
                stream_id: 3,
                delta: 1
            },
            Frame::Data {
                stream_id: 1,
                fin: true,
                data: Bytes::from_static(b"hello")
            },
            Frame::Data {
                stream_id: 3,
                fin: false,
                data: Bytes::new()
            },
        ]
    );
}

#[test]
fn encoder_writes_the_spec_bytes() {
    let mut codec = codec();
    let buf = encode_all(
        &mut codec,
        &[
            Frame::Ping { id: 42 },
            Frame::Data {
                stream_id: 1,
                fin: true,
                data: Bytes::from_static(b"hi"),
            },
            Frame::RstStream {
                stream_id: 3,
                status: RST_REFUSED_STREAM,
            },
        ],
    );
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x2a,
        0x00, 0x00, 0x00, 0x01, 0x01, 0x00, 0x00, 0x02, b'h', b'i',
        0x80, 0x03, 0x00, 0x03, 0x00, 0x00, 0x00, 0x08,
        0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x03,
    ];
    assert_eq!(&buf[..], expected);

    let mut buf = BytesMut::new();
    let syn = Frame::SynStream {
        stream_id: 5,
        associated_to: 1,
        priority: 7,
        fin: false,
        unidirectional: true,
        headers: headers(&[("streamtype", "stdin")]),
    };
    codec.encode(syn, &mut buf).expect("encode");
    assert_eq!(&buf[..4], &[0x80, 0x03, 0x00, 0x01]);
    assert_eq!(buf[4], FLAG_UNIDIRECTIONAL);
    let length = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
    assert_eq!(length, buf.len() - 8);
    assert_eq!(&buf[8..18], &[0, 0, 0, 5, 0, 0, 0, 1, 0xe0, 0]);
    // The block starts the zlib stream: header with FDICT and the DICTID.
    assert_eq!(&buf[18..24], &[0x78, 0xbb, 0xe3, 0xc6, 0xa7, 0xc2]);
}

/// Every frame type, several header blocks in a row, both directions, each
/// side with its own codec.
#[test]
fn round_trip_every_frame_type() {
    let (mut client, mut server) = (codec(), codec());
    let to_server = vec![
        syn(
            1,
            &[
                ("streamtype", "error"),
                ("port", "8080"),
                ("requestid", "0"),
            ],
        ),
        syn(
            3,
            &[("streamtype", "data"), ("port", "8080"), ("requestid", "0")],
        ),
        Frame::SynStream {
            stream_id: 5,
            associated_to: 3,
            priority: 7,
            fin: true,
            unidirectional: true,
            headers: headers(&[("streamtype", "stdout"), ("x", "a\0b\0c")]),
        },
        Frame::Data {
            stream_id: 3,
            fin: false,
            data: Bytes::from(vec![0xa5; 70_000]),
        },
        Frame::Data {
            stream_id: 3,
            fin: true,
            data: Bytes::new(),
        },
        Frame::Headers {
            stream_id: 3,
            fin: false,
            headers: headers(&[("trailer", "yes")]),
        },
        Frame::Settings {
            clear: false,
            entries: vec![Setting {
                flags: FLAG_SETTINGS_PERSISTED,
                id: 0xff_ffff,
                value: u32::MAX,
            }],
        },
        Frame::Settings {
            clear: true,
            entries: vec![],
        },
        Frame::WindowUpdate {
            stream_id: 0,
            delta: 0x7fff_ffff,
        },
        Frame::Ping { id: 1 },
        Frame::RstStream {
            stream_id: 0x7fff_ffff,
            status: RST_FRAME_TOO_LARGE,
        },
        Frame::GoAway {
            last_good_stream_id: 5,
            status: GOAWAY_OK,
        },
    ];
    let bytes = encode_all(&mut client, &to_server);
    assert_eq!(decode_all(&mut server, &bytes), to_server);

    let to_client = vec![
        Frame::SynReply {
            stream_id: 1,
            fin: false,
            headers: vec![],
        },
        Frame::SynReply {
            stream_id: 3,
            fin: false,
            headers: headers(&[("streamtype", "data")]),
        },
        Frame::SynReply {
            stream_id: 5,
            fin: true,
            headers: headers(&[("streamtype", "stdout")]),
        },
        Frame::Headers {
            stream_id: 5,
            fin: true,
            headers: headers(&[("streamtype", "stdout")]),
        },
        Frame::Ping { id: 1 },
        Frame::Data {
            stream_id: 1,
            fin: true,
            data: Bytes::from_static(b"{\"status\":\"Success\"}"),
        },
    ];
    let bytes = encode_all(&mut server, &to_client);
    assert_eq!(decode_all(&mut client, &bytes), to_client);

    // And the contexts keep going after the other direction was used.
    let more = vec![Frame::SynStream {
        stream_id: 7,
        associated_to: 0,
        priority: 2,
        fin: false,
        unidirectional: false,
        headers: headers(&[("streamtype", "resize")]),
    }];
    let bytes = encode_all(&mut client, &more);
    assert_eq!(decode_all(&mut server, &bytes), more);
}

/// The compressor remembers earlier blocks: a repeated block is smaller the
/// second time and cannot be decoded by a fresh context.
#[test]
fn header_context_persists_across_blocks() {
    let mut ours = HeaderCodec::new();
    let mut theirs = HeaderCodec::new();
    let block = headers(&[
        ("streamtype", "stdout"),
        ("requestid", "a-long-request-id-0123456789"),
    ]);
    let blocks: Vec<Vec<u8>> = (0..3)
        .map(|_| ours.encode(&block).expect("encode"))
        .collect();
    assert!(blocks[1].len() < blocks[0].len(), "{blocks:?}");
    for encoded in &blocks {
        assert_eq!(theirs.decode(encoded).expect("decode"), block);
    }
    let fresh = HeaderCodec::new().decode(&blocks[1]);
    assert!(fresh.is_err(), "{fresh:?}");
}

#[test]
fn frames_split_byte_by_byte() {
    let frames = vec![
        syn(1, &[("streamtype", "stdin")]),
        Frame::Data {
            stream_id: 1,
            fin: false,
            data: Bytes::from_static(b"ls -l\n"),
        },
        Frame::Ping { id: 3 },
    ];
    let mut bytes = encode_all(&mut codec(), &frames[..1]).to_vec();
    // An unknown control frame between them is skipped, also in pieces.
    bytes.extend(control(10, 0, b"credential, ignored"));
    bytes.extend(encode_all(&mut codec(), &frames[1..]));

    let mut server = codec();
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    for (i, byte) in bytes.iter().enumerate() {
        buf.extend_from_slice(&[*byte]);
        if let Some(frame) = server.decode(&mut buf).expect("decode") {
            decoded.push((i, frame));
        }
        assert_eq!(server.decode(&mut buf).expect("decode"), None);
    }
    assert!(buf.is_empty());
    let ends: Vec<usize> = decoded.iter().map(|(i, _)| *i).collect();
    assert_eq!(*ends.last().expect("frames"), bytes.len() - 1);
    let decoded: Vec<Frame> = decoded.into_iter().map(|(_, f)| f).collect();
    assert_eq!(decoded, frames);
}

#[test]
fn unknown_control_frames_are_skipped() {
    let mut bytes = control(10, 0xff, &[1, 2, 3]);
    bytes.extend(control(0xffff, 0, &[]));
    bytes.extend(control(5, 0, &[0; 4])); // SPDY/2's NOOP
    bytes.extend([0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 9]);
    assert_eq!(decode_all(&mut codec(), &bytes), [Frame::Ping { id: 9 }]);
}

#[test]
fn bad_versions_and_lengths_are_refused() {
    // SPDY/2 PING.
    let err = decode_err(&[0x80, 0x02, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 1]);
    assert!(matches!(err, FrameError::UnsupportedVersion(2)), "{err}");
    // Oversized frames are refused from their head, before buffering.
    for head in [
        [0x80, 0x03, 0x00, 0x01, 0x00, 0x10, 0x00, 0x01],
        [0x00, 0x00, 0x00, 0x01, 0x00, 0x10, 0x00, 0x01],
        [0x00, 0x00, 0x00, 0x01, 0x00, 0xff, 0xff, 0xff],
    ] {
        let mut buf = BytesMut::from(&head[..]);
        let err = codec().decode(&mut buf).expect_err("too large");
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        assert!(buf.capacity() < 4096);
    }
    // Fixed-size frames with another size.
    for bad in [
        control(TYPE_PING, 0, &[0; 5]),
        control(TYPE_RST_STREAM, 0, &[0, 0, 0, 1]),
        control(TYPE_GOAWAY, 0, &[0; 4]),
        control(TYPE_WINDOW_UPDATE, 0, &[0; 12]),
        control(TYPE_SETTINGS, 0, &[0; 3]),
        control(TYPE_SETTINGS, 0, &[0, 0, 0, 1, 0, 0, 0, 0]),
        control(TYPE_SYN_STREAM, 0, &[0, 0, 0, 1, 0, 0, 0, 0, 0]),
        control(TYPE_SYN_REPLY, 0, &[0, 0, 1]),
    ] {
        let err = decode_err(&bad);
        assert!(matches!(err, FrameError::BadLength { .. }), "{err}");
    }
    // A count that disagrees with the length.
    let err = decode_err(&control(
        TYPE_SETTINGS,
        0,
        &[0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 1],
    ));
    assert!(
        matches!(err, FrameError::SettingsCount { count: 2, .. }),
        "{err}"
    );
    let err = decode_err(&control(TYPE_SETTINGS, 0, &[0xff; 12]));
    assert!(matches!(err, FrameError::SettingsCount { .. }), "{err}");
}

#[test]
fn truncated_frames_wait_then_fail_at_eof() {
    let mut codec = codec();
    let mut buf = BytesMut::from(&[0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0][..]);
    assert_eq!(codec.decode(&mut buf).expect("waits"), None);
    assert!(buf.capacity() >= 12);
    let err = codec.decode_eof(&mut buf).expect_err("eof inside a frame");
    assert!(matches!(err, FrameError::Io(_)), "{err}");
}

#[test]
fn stream_zero_is_refused() {
    let block = stored(true, &raw_block(&[(b"a", b"b")]));
    let mut syn = vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    syn.extend(&block);
    let mut reply = vec![0, 0, 0, 0];
    reply.extend(&block);
    for bad in [
        vec![0, 0, 0, 0, 0, 0, 0, 1, b'x'],
        control(TYPE_RST_STREAM, 0, &[0, 0, 0, 0, 0, 0, 0, 1]),
        control(TYPE_SYN_STREAM, 0, &syn),
        control(TYPE_SYN_REPLY, 0, &reply),
        control(TYPE_HEADERS, 0, &reply),
    ] {
        let err = decode_err(&bad);
        assert!(matches!(err, FrameError::ZeroStreamId(_)), "{err}");
    }
}

/// A SYN_STREAM on stream 1 carrying `block`.
fn syn_with_block(block: &[u8]) -> Vec<u8> {
    let mut payload = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    payload.extend_from_slice(block);
    control(TYPE_SYN_STREAM, 0, &payload)
}

fn block_err(block: &[u8]) -> HeaderError {
    match decode_err(&syn_with_block(block)) {
        FrameError::Headers(e) => e,
        other => panic!("not a header error: {other}"),
    }
}

#[test]
fn hostile_header_blocks_are_refused() {
    let err = block_err(b"definitely not zlib");
    assert!(matches!(err, HeaderError::Zlib(_)), "{err}");

    // A zlib stream asking for another dictionary.
    let mut other = vec![0x78, 0xbb, 0x01, 0x02, 0x03, 0x04];
    other.extend(&stored(false, &raw_block(&[(b"a", b"b")])));
    let err = block_err(&other);
    assert!(
        matches!(err, HeaderError::WrongDictionary(0x0102_0304)),
        "{err}"
    );

    // A stream without a dictionary (FDICT clear) is still zlib, and Go's
    // reader takes it too.
    let mut plain = vec![0x78, 0x9c];
    plain.extend(&stored(false, &raw_block(&[(b"a", b"b")])));
    let frames = decode_all(&mut codec(), &syn_with_block(&plain));
    assert!(
        matches!(&frames[..], [Frame::SynStream { headers, .. }] if headers == &[("a".into(), "b".into())])
    );

    type Check = fn(&HeaderError) -> bool;
    let cases: [(&[u8], Check); 9] = [
        (&[0xff; 4], |e| {
            matches!(e, HeaderError::TooManyHeaders(0xffff_ffff))
        }),
        (&[0, 0, 0, 129], |e| {
            matches!(e, HeaderError::TooManyHeaders(129))
        }),
        (&[0, 0, 0, 100, 0, 0, 0, 1, b'a', 0, 0, 0, 0], |e| {
            matches!(e, HeaderError::Truncated)
        }),
        (&raw_block(&[(b"Port", b"1")]), |e| {
            matches!(e, HeaderError::UppercaseName)
        }),
        (&raw_block(&[(b"\xff", b"1")]), |e| {
            matches!(e, HeaderError::InvalidUtf8)
        }),
        (&raw_block(&[(b"a", b"\xc3\x28")]), |e| {
            matches!(e, HeaderError::InvalidUtf8)
        }),
        (&raw_block(&[(b"", b"1"), (b"a", b"")]), |e| {
            matches!(e, HeaderError::EmptyName)
        }),
        (&raw_block(&[(b"a", b"1"), (b"a", b"2")]), |e| {
            matches!(e, HeaderError::DuplicateName)
        }),
        (
            &[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, b'a', 0, 0, 0, 0],
            |e| matches!(e, HeaderError::Truncated),
        ),
    ];
    for (raw, expected) in cases {
        let err = block_err(&stored(true, raw));
        assert!(expected(&err), "{raw:?}: {err}");
    }
    let mut trailing = raw_block(&[(b"a", b"b")]);
    trailing.push(0);
    let err = block_err(&stored(true, &trailing));
    assert!(matches!(err, HeaderError::TrailingBytes(1)), "{err}");
}

#[test]
fn decompression_bombs_stop_at_the_limit() {
    // 16 MiB of value in a ~16 KiB block.
    let mut raw = raw_block(&[(b"a", b"")]);
    let value_len = 16usize << 20;
    raw.truncate(raw.len() - 4);
    raw.extend_from_slice(&(value_len as u32).to_be_bytes());
    let mut zlib = plain_compressor();
    let mut block = plain_deflate(&mut zlib, &raw);
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..16 {
        block.extend(plain_deflate(&mut zlib, &chunk));
    }
    assert!(block.len() < MAX_HEADER_BLOCK, "{}", block.len());
    let err = block_err(&block);
    assert!(matches!(err, HeaderError::TooLarge), "{err}");

    // Just over the limit also fails, just under decodes.
    let under = MAX_HEADER_BLOCK - raw_block(&[(b"a", b"")]).len();
    let value = "v".repeat(under);
    let raw = raw_block(&[(b"a", value.as_bytes())]);
    assert_eq!(raw.len(), MAX_HEADER_BLOCK);
    let mut ok = HeaderCodec::new();
    let fine = ok
        .decode(&plain_deflate(&mut plain_compressor(), &raw))
        .expect("at limit");
    assert_eq!(fine[0].1.len(), under);
    let raw = raw_block(&[(b"a", format!("{value}v").as_bytes())]);
    let err = block_err(&plain_deflate(&mut plain_compressor(), &raw));
    assert!(matches!(err, HeaderError::TooLarge), "{err}");
}

#[test]
fn a_failed_codec_stays_failed() {
    let mut codec = codec();
    let mut buf = BytesMut::from(&syn_with_block(b"not zlib")[..]);
    assert!(codec.decode(&mut buf).is_err());
    buf.extend_from_slice(&[0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 1]);
    let err = codec.decode(&mut buf).expect_err("broken");
    assert!(matches!(err, FrameError::Broken), "{err}");
}

/// 10 000 PINGs in small chunks: each is decoded as it completes and the
/// buffer never holds more than one frame.
#[test]
fn ping_flood_decodes_in_bounded_memory() {
    let mut flood = Vec::new();
    for id in 0..10_000u32 {
        flood.extend(control(TYPE_PING, 0, &id.to_be_bytes()));
    }
    let mut codec = codec();
    let mut buf = BytesMut::with_capacity(64);
    let mut next = 0u32;
    for chunk in flood.chunks(7) {
        buf.extend_from_slice(chunk);
        while let Some(frame) = codec.decode(&mut buf).expect("decode") {
            assert_eq!(frame, Frame::Ping { id: next });
            next += 1;
        }
        assert!(buf.len() < 12);
        assert!(buf.capacity() <= 4096, "{}", buf.capacity());
    }
    assert_eq!(next, 10_000);
}

/// What we compress is plain zlib with the SPDY dictionary.
#[test]
fn plain_zlib_inflates_our_blocks() {
    let mut ours = HeaderCodec::new();
    let mut zlib = Decompress::new(true);
    for pairs in [
        &[
            ("streamtype", "error"),
            ("port", "8080"),
            ("requestid", "0"),
        ][..],
        &[("streamtype", "data"), ("port", "8080"), ("requestid", "0")][..],
        &[][..],
    ] {
        let block = ours.encode(&headers(pairs)).expect("encode");
        let raw: Vec<(&[u8], &[u8])> = pairs
            .iter()
            .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
            .collect();
        assert_eq!(plain_inflate(&mut zlib, &block), raw_block(&raw));
    }
}

/// What plain zlib compresses with the SPDY dictionary, we decode.
#[test]
fn we_inflate_plain_zlib_blocks() {
    let mut zlib = plain_compressor();
    let mut ours = HeaderCodec::new();
    for _ in 0..3 {
        let raw = raw_block(&[
            (b"streamtype", b"error"),
            (b"port", b"8080"),
            (b"requestid", b"0"),
        ]);
        let block = plain_deflate(&mut zlib, &raw);
        assert_eq!(
            ours.decode(&block).expect("decode"),
            headers(&[
                ("streamtype", "error"),
                ("port", "8080"),
                ("requestid", "0")
            ])
        );
    }
}

#[test]
fn encoder_refuses_unsendable_frames_and_keeps_its_context() {
    let mut client = codec();
    let syn = |stream_id: u32, priority: u8, name: &str| {
        let mut frame = syn(stream_id, &[(name, "x")]);
        if let Frame::SynStream { priority: p, .. } = &mut frame {
            *p = priority;
        }
        frame
    };
    let mut buf = BytesMut::new();
    let refused = [
        syn(0, 0, "a"),
        syn(0x8000_0001, 0, "a"),
        syn(1, 8, "a"),
        syn(1, 0, "Upper"),
        syn(1, 0, ""),
        Frame::Data {
            stream_id: 0x8000_0001,
            fin: false,
            data: Bytes::new(),
        },
        Frame::Data {
            stream_id: 1,
            fin: false,
            data: Bytes::from(vec![0; MAX_LENGTH + 1]),
        },
        Frame::WindowUpdate {
            stream_id: 1,
            delta: 0x8000_0000,
        },
        Frame::RstStream {
            stream_id: 0,
            status: RST_CANCEL,
        },
        Frame::Settings {
            clear: false,
            entries: vec![Setting {
                flags: 0,
                id: 0x100_0000,
                value: 0,
            }],
        },
    ];
    for frame in refused {
        assert!(client.encode(frame.clone(), &mut buf).is_err(), "{frame:?}");
        assert!(buf.is_empty(), "{frame:?} left bytes");
    }
    let dup = Frame::SynReply {
        stream_id: 1,
        fin: false,
        headers: headers(&[("a", "1"), ("a", "2")]),
    };
    assert!(client.encode(dup, &mut buf).is_err());
    let big = "v".repeat(MAX_HEADER_BLOCK);
    assert!(client.encode(syn(1, 0, &big), &mut buf).is_err());
    // Nothing refused touched the compressor: the peer decodes what follows.
    client.encode(syn(1, 0, "ok"), &mut buf).expect("encode");
    assert_eq!(decode_all(&mut codec(), &buf), [syn(1, 0, "ok")]);
}
