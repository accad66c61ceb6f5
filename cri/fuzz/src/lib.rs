//! Fuzz targets of frakti-cri (the layer unpacker, the runtime's inputs,
//! SPDY frames), as plain functions: the cargo-fuzz targets
//! (`fuzz_targets/*.rs`) and `cargo test` (over the seeds, on stable Rust)
//! both call them.

use std::fs;
use std::path::Path;

use frakti_cri::image::unpack::{Compression, Limits, apply_layer};
use frakti_cri::streaming::spdy;
use tar::{EntryType, Header};
use tokio_util::codec::{Decoder, Encoder};

/// Applies `data` as an uncompressed layer to `TMP/root`, then checks that
/// nothing outside it appeared: `TMP` still holds only `root` and an empty
/// `outside` (which seed symlinks point at).
///
/// Header checksums are fixed first (see [`fix_checksums`]), so mutated
/// headers get past the checksum to the code behind it.
pub fn layer_tar(data: &[u8]) {
    let layer = fix_checksums(data);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
    fs::create_dir(&root).expect("root");
    fs::create_dir(&outside).expect("outside");
    let limits = Limits {
        max_entries: 512,
        max_extension_bytes: 64 << 10,
        max_total_bytes: 4 << 20,
        ..Limits::default()
    };
    // Errors are fine; escapes and panics are not.
    let _ = apply_layer(&root, &layer[..], Compression::None, &limits);
    assert_eq!(
        names(tmp.path()),
        ["outside", "root"],
        "something appeared next to the root"
    );
    assert!(
        names(&outside).is_empty(),
        "something appeared outside the root"
    );
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Rewrites the checksum of every header found walking the blocks as a tar
/// reader does (header, then the data its octal size field declares, none
/// for link, device, directory and FIFO entries), until a zero block or a
/// size it cannot read.
pub fn fix_checksums(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let mut offset = 0usize;
    while let Some(block) = offset
        .checked_add(512)
        .and_then(|end| out.get_mut(offset..end))
    {
        if block.iter().all(|&b| b == 0) {
            break;
        }
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:07o}\0").as_bytes());
        let Some(size) = octal(&block[124..136]) else {
            break;
        };
        let size = if (b'1'..=b'6').contains(&block[156]) {
            0
        } else {
            size
        };
        let Some(next) = size
            .checked_add(511)
            .map(|s| s & !511)
            .and_then(|s| usize::try_from(s).ok())
            .and_then(|s| offset.checked_add(512)?.checked_add(s))
        else {
            break;
        };
        offset = next;
    }
    out
}

fn octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c| c == ' ' || c == '\0');
    if text.is_empty() {
        Some(0)
    } else {
        u64::from_str_radix(text, 8).ok()
    }
}

/// Seed layers: one of each entry kind and extension header, whiteouts, and
/// the escapes the unpacker must stop.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut basic = Seed::default();
    basic
        .entry(EntryType::Directory, "etc/", "", b"")
        .entry(
            EntryType::Regular,
            "etc/hosts",
            "",
            b"127.0.0.1 localhost\n",
        )
        .entry(EntryType::Symlink, "bin/sh", "/bin/busybox", b"")
        .entry(EntryType::Link, "etc/hosts2", "etc/hosts", b"")
        .entry(EntryType::Char, "dev/null", "", b"")
        .entry(EntryType::Fifo, "run/fifo", "", b"")
        .pax(b"30 mtime=1600000000.123456789\n25 SCHILY.xattr.user.a=b\n")
        .entry(EntryType::Regular, "pax", "", b"data")
        .entry(EntryType::GNULongName, "././@LongLink", "", &[b'n'; 200])
        .entry(EntryType::Regular, "short", "", b"long name");
    let mut whiteouts = Seed::default();
    whiteouts
        .entry(EntryType::Regular, "d/a", "", b"a")
        .entry(EntryType::Regular, "d/sub/b", "", b"b")
        .entry(EntryType::Regular, "d/.wh..wh..opq", "", b"")
        .entry(EntryType::Regular, "d/c", "", b"c")
        .entry(EntryType::Regular, ".wh.d", "", b"")
        .entry(EntryType::Regular, "e/.wh..wh.plnk", "", b"");
    let mut escapes = Seed::default();
    escapes
        .entry(EntryType::Symlink, "a", "../../outside", b"")
        .entry(EntryType::Regular, "a/x", "", b"x")
        .entry(EntryType::Symlink, "b/c", "/../../../outside", b"")
        .entry(EntryType::Directory, "b/c/d", "", b"")
        .entry(EntryType::Link, "h", "b/c/d/../../a/x", b"")
        .entry(EntryType::Regular, "../outside/y", "", b"y");
    vec![
        ("basic", basic.finish()),
        ("whiteouts", whiteouts.finish()),
        ("escapes", escapes.finish()),
    ]
}

/// A tar written with raw paths (the `tar` builder refuses `..`).
#[derive(Default)]
struct Seed(Vec<u8>);

impl Seed {
    fn entry(&mut self, kind: EntryType, path: &str, link: &str, data: &[u8]) -> &mut Self {
        let mut header = Header::new_ustar();
        header.set_entry_type(kind);
        header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_size(data.len() as u64);
        header.set_mode(0o755);
        header.set_uid(1000);
        header.set_gid(1000);
        header.set_mtime(1_600_000_000);
        header.set_cksum();
        self.0.extend_from_slice(header.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(512), 0);
        self
    }

    fn pax(&mut self, records: &[u8]) -> &mut Self {
        self.entry(EntryType::XHeader, "PaxHeaders/x", "", records)
    }

    fn finish(&mut self) -> Vec<u8> {
        let mut layer = std::mem::take(&mut self.0);
        layer.resize(layer.len() + 1024, 0);
        layer
    }
}

/// The runtime's hostile inputs (see `fuzz_targets/runtime_inputs.rs`):
/// `data` split at the first two NULs into passwd, group and the rest.
pub fn runtime_inputs(data: &[u8]) {
    use frakti_cri::image::records::ImageConfig;
    use frakti_cri::runtime::logs::{LineEncoder, MAX_LINE, StreamKind};
    use frakti_cri::runtime::sizing::{self, SizingDefaults};
    use frakti_cri::runtime::spec::{self, SpecInput};
    use k8s_cri::v1 as cri;

    let mut parts = data.splitn(3, |b| *b == 0);
    let passwd = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let group = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let rest = parts.next().unwrap_or_default();
    let text = String::from_utf8_lossy(rest);
    let mut line = text.lines();
    let user = line.next().unwrap_or_default().to_string();
    let username = line.next().unwrap_or_default().to_string();

    // Users and groups resolved in the image's files.
    let mut image = ImageConfig::default();
    image.config.user = Some(user.clone());
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "c".into(),
            attempt: 0,
        }),
        command: vec!["sh".into()],
        linux: Some(cri::LinuxContainerConfig {
            resources: None,
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_username: username,
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    let sandbox = cri::PodSandboxConfig::default();
    let _ = spec::build(&SpecInput {
        container_id: "c",
        config: &config,
        sandbox: &sandbox,
        image: &image,
        passwd: Some(&passwd),
        group: Some(&group),
        mounts: &[],
        resolv_conf: None,
        hostname_file: None,
    });

    // The container's output, in chunks: every byte but the line ends comes
    // back in the records' contents, in order, none longer than MAX_LINE.
    let mut encoder = LineEncoder::new(StreamKind::Stdout);
    let now = std::time::UNIX_EPOCH;
    let mut records = Vec::new();
    for chunk in rest.chunks(7) {
        records.extend(encoder.push(chunk, now));
    }
    records.extend(encoder.finish(now));
    let mut contents = Vec::new();
    for record in &records {
        let mut fields = record.splitn(4, |b| *b == b' ');
        let (_time, _stream, tag) = (fields.next(), fields.next(), fields.next());
        assert!(
            matches!(tag, Some(b"F") | Some(b"P")),
            "bad tag in {record:?}"
        );
        let content = fields.next().unwrap_or_default();
        let content = content.strip_suffix(b"\n").expect("a record ends its line");
        assert!(content.len() <= MAX_LINE);
        contents.extend_from_slice(content);
    }
    let expected: Vec<u8> = rest.iter().copied().filter(|b| *b != b'\n').collect();
    assert_eq!(contents, expected, "the log lost or changed bytes");

    // Annotations as an API client sends them.
    let mut pod = cri::PodSandboxConfig::default();
    pod.annotations = [
        (sizing::ANNOTATION_CPUS.to_string(), user),
        (sizing::ANNOTATION_MEMORY.to_string(), text.into_owned()),
    ]
    .into();
    let defaults = SizingDefaults {
        cpus: 1,
        memory_mib: 128,
        host_cpus: 4,
        guest_reserve_mib: 64,
    };
    if let Ok((size, _)) = sizing::size_pod(&pod, &defaults) {
        assert!(size.vcpus >= 1 && size.vcpus <= 4);
        assert!(size.memory_mib >= 128 && size.memory_mib % 2 == 0);
    }
}

/// A SPDY client's bytes (see `fuzz_targets/spdy_frames.rs`), decoded
/// whole and again in small pieces: both must give the same frames and the
/// same error, never buffer a whole frame, and every frame must re-encode
/// and decode to itself. `data` is also tried as one header block.
/// A WebSocket client's message to the streaming server, under each
/// channel protocol (the first byte picks it): decoded or refused, never
/// a panic; a decoded data message names a channel the protocol has.
pub fn websocket_messages(data: &[u8]) {
    use frakti_cri::streaming::websocket::{ClientMessage, Kind, decode_client_message};
    let Some((&first, message)) = data.split_first() else {
        return;
    };
    let kind = Kind::ALL[usize::from(first) % Kind::ALL.len()];
    if let Ok(ClientMessage::Data { payload, .. }) = decode_client_message(kind, message) {
        assert!(payload.len() <= message.len());
    }
}

/// What a CNI conf dir and plugins hand the daemon: a configuration file
/// (list or single; the first byte picks) and a plugin's ADD result or
/// error output. Parsed or refused, never a panic; a parsed configuration
/// names only plugin binaries inside the plugin dirs, and a parsed result's
/// IPs name interfaces it has.
pub fn cni_documents(data: &[u8]) {
    use frakti_cri::network::{config::NetworkConfig, plugin::parse_result};
    let Some((&first, document)) = data.split_first() else {
        return;
    };
    let path = std::path::Path::new("fuzz.conflist");
    if let Ok(config) = NetworkConfig::parse(path, document, first & 1 == 1) {
        for kind in config.plugin_types() {
            assert!(!kind.is_empty() && !kind.contains('/'), "{kind:?}");
        }
        let _ = config.to_list_json();
    }
    if let Ok(added) = parse_result("fuzz", document) {
        for ip in &added.result.ips {
            if let Some(index) = ip.interface {
                assert!((index as usize) < added.result.interfaces.len());
            }
        }
    }
}

pub fn spdy_frames(data: &[u8]) {
    use frakti_cri::streaming::spdy::HeaderCodec;
    use frakti_cri::streaming::spdy::headers::{MAX_HEADER_BLOCK, MAX_HEADERS};

    let whole = spdy_decode(data, &mut std::iter::once(data.len().max(1)));
    let pieces = spdy_decode(data, &mut (1..=13).cycle());
    assert_eq!(whole, pieces, "splitting the input changed the outcome");

    let (frames, _) = whole;
    let (mut encoder, mut decoder) = (spdy::Codec::new(), spdy::Codec::new());
    for frame in frames {
        let mut wire = bytes::BytesMut::new();
        encoder
            .encode(frame.clone(), &mut wire)
            .expect("a decoded frame re-encodes");
        let again = decoder.decode(&mut wire).expect("re-encoded frame decodes");
        assert_eq!(again.as_ref(), Some(&frame));
        assert!(wire.is_empty());
    }

    if let Ok(headers) = HeaderCodec::new().decode(data) {
        assert!(headers.len() <= MAX_HEADERS);
        let size: usize = headers.iter().map(|(n, v)| 8 + n.len() + v.len()).sum();
        assert!(size + 4 <= MAX_HEADER_BLOCK);
        for (name, _) in &headers {
            assert!(!name.is_empty() && name.chars().all(|c| !c.is_uppercase()));
        }
    }
}

/// The frames decoded from `data` fed in pieces of the given sizes, and the
/// error that stopped decoding, if any.
fn spdy_decode(
    data: &[u8],
    sizes: &mut dyn Iterator<Item = usize>,
) -> (Vec<spdy::Frame>, Option<String>) {
    use spdy::frame::{HEADER_LEN, MAX_DATA_LENGTH, MAX_FRAME_LENGTH};
    let mut codec = spdy::Codec::new();
    let mut buf = bytes::BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(sizes.next().unwrap_or(1).min(rest.len()));
        rest = tail;
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Some(e.to_string())),
            }
        }
        // What is left is part of one frame, never more.
        assert!(buf.len() < HEADER_LEN + MAX_FRAME_LENGTH.max(MAX_DATA_LENGTH));
    }
    (frames, None)
}

/// Seeds for `spdy_frames`: what kubectl's exec, attach and port-forward
/// send (and a server's replies), each a session of its own.
pub fn spdy_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use bytes::Bytes;
    use spdy::Frame;
    use spdy::frame::{self, Setting};

    fn headers(pairs: &[(&str, &str)]) -> spdy::Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }
    fn syn(stream_id: u32, fin: bool, pairs: &[(&str, &str)]) -> Frame {
        Frame::SynStream {
            stream_id,
            associated_to: 0,
            priority: 0,
            fin,
            unidirectional: false,
            headers: headers(pairs),
        }
    }
    fn data(stream_id: u32, fin: bool, bytes: &'static [u8]) -> Frame {
        Frame::Data {
            stream_id,
            fin,
            data: Bytes::from_static(bytes),
        }
    }
    fn session(frames: Vec<Frame>) -> Vec<u8> {
        let mut codec = spdy::Codec::new();
        let mut wire = bytes::BytesMut::new();
        for frame in frames {
            codec.encode(frame, &mut wire).expect("seed frame");
        }
        wire.to_vec()
    }

    let exec = session(vec![
        syn(1, true, &[("streamtype", "error")]),
        syn(3, false, &[("streamtype", "stdin")]),
        syn(5, true, &[("streamtype", "stdout")]),
        syn(7, true, &[("streamtype", "stderr")]),
        syn(9, false, &[("streamtype", "resize")]),
        data(9, false, br#"{"Width":80,"Height":24}"#),
        data(3, false, b"ls -l\n"),
        data(3, true, b""),
        Frame::Ping { id: 1 },
        Frame::WindowUpdate {
            stream_id: 0,
            delta: 65_536,
        },
        Frame::RstStream {
            stream_id: 5,
            status: frame::RST_CANCEL,
        },
        Frame::GoAway {
            last_good_stream_id: 0,
            status: frame::GOAWAY_OK,
        },
    ]);
    let port_forward = session(vec![
        Frame::Settings {
            clear: false,
            entries: vec![Setting {
                flags: 0,
                id: frame::SETTINGS_INITIAL_WINDOW_SIZE,
                value: 1 << 20,
            }],
        },
        syn(
            1,
            true,
            &[
                ("streamtype", "error"),
                ("port", "8080"),
                ("requestid", "0"),
            ],
        ),
        syn(
            3,
            false,
            &[("streamtype", "data"), ("port", "8080"), ("requestid", "0")],
        ),
        data(3, false, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        Frame::WindowUpdate {
            stream_id: 3,
            delta: 1,
        },
        data(3, true, b""),
    ]);
    let replies = session(vec![
        Frame::SynReply {
            stream_id: 1,
            fin: false,
            headers: vec![],
        },
        Frame::SynReply {
            stream_id: 3,
            fin: true,
            headers: headers(&[("a", "x\0y")]),
        },
        Frame::Headers {
            stream_id: 1,
            fin: true,
            headers: headers(&[("status", "200")]),
        },
    ]);
    // An unknown control frame (SPDY/3's CREDENTIAL), skipped, then a PING.
    let mut unknown = vec![0x80, 0x03, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x02, 0xaa, 0xbb];
    unknown.extend(session(vec![Frame::Ping { id: 2 }]));
    // A bare header block, for the `HeaderCodec::decode` half.
    let block = spdy::HeaderCodec::new()
        .encode(&headers(&[("streamtype", "data"), ("port", "22")]))
        .expect("seed block");
    vec![
        ("exec", exec),
        ("port_forward", port_forward),
        ("replies", replies),
        ("unknown", unknown),
        ("block", block),
    ]
}

#[cfg(test)]
mod tests {
    use super::runtime_inputs;
    use frakti_cri::image::unpack::{Compression, Limits, apply_layer};

    #[test]
    fn runtime_inputs_take_hostile_bytes() {
        runtime_inputs(b"root:x:0:0::/:/bin/sh\nbad\0root:x:0:\n::::\0root\nnobody\n");
        runtime_inputs(b"\0\0");
        runtime_inputs(&[0xff; 40_000]);
        runtime_inputs(b"a:b:c\0x\0999999999999999999999:1\n\n1500m\n");
    }

    #[test]
    fn cni_documents_take_hostile_bytes() {
        let conflist = br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}"#;
        let result = br#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.0.0.2/24","interface":0}]}"#;
        for seed in [&conflist[..], &result[..]] {
            for first in [0u8, 1] {
                let mut input = vec![first];
                input.extend_from_slice(seed);
                for end in 0..=input.len() {
                    super::cni_documents(&input[..end]);
                }
                for at in 1..input.len() {
                    let mut mutated = input.clone();
                    mutated[at] ^= 0x20;
                    super::cni_documents(&mutated);
                }
            }
        }
        super::cni_documents(&[1; 5000]);
    }

    #[test]
    fn spdy_frames_take_hostile_bytes() {
        use frakti_cri::streaming::spdy;
        use tokio_util::codec::Decoder;

        for (name, seed) in super::spdy_seeds() {
            // Every session seed is whole, valid frames.
            if name != "block" {
                let mut codec = spdy::Codec::new();
                let mut buf = bytes::BytesMut::from(&seed[..]);
                while codec.decode(&mut buf).expect(name).is_some() {}
                assert!(buf.is_empty(), "{name}");
            }
            for end in 0..=seed.len() {
                super::spdy_frames(&seed[..end]);
            }
            for at in (0..seed.len()).step_by(3) {
                let mut mutated = seed.clone();
                mutated[at] ^= 0x41;
                super::spdy_frames(&mutated);
            }
        }
        super::spdy_frames(&[]);
        super::spdy_frames(&[0xff; 4096]);
        super::spdy_frames(&[
            0x80, 0x03, 0x00, 0x04, 0x00, 0x00, 0x00, 0x04, 0xff, 0xff, 0xff, 0xff,
        ]);
    }

    #[test]
    fn seeds_apply_and_stay_inside() {
        for (name, layer) in super::seeds() {
            let fixed = super::fix_checksums(&layer);
            let differs = fixed.iter().zip(&layer).position(|(a, b)| a != b);
            assert_eq!(differs, None, "{name}: checksums differ");
            super::layer_tar(&layer);
            // All but the escapes are valid layers.
            let tmp = tempfile::tempdir().unwrap();
            let applied = apply_layer(
                tmp.path(),
                &layer[..],
                Compression::None,
                &Limits::default(),
            );
            assert_eq!(applied.is_ok(), name != "escapes", "{name}: {applied:?}");
        }
    }
}
