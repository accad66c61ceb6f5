use std::convert::Infallible;
use std::time::Duration;

use futures_util::stream;

use super::*;

fn at(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

/// 2023-11-14T22:13:20Z.
const T: u64 = 1_700_000_000;
const TS: &str = "2023-11-14T22:13:20Z";

fn record(stream: &str, tag: char, content: &[u8]) -> Vec<u8> {
    let mut r = format!("{TS} {stream} {tag} ").into_bytes();
    r.extend_from_slice(content);
    r.push(b'\n');
    r
}

/// The (tag, content) of each record of a log, checking each is well-formed.
fn parse(log: &[u8], stream: &str) -> Vec<(char, Vec<u8>)> {
    let mut records = Vec::new();
    let mut rest = log;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .expect("record without its newline");
        let line = &rest[..end];
        rest = &rest[end + 1..];
        let mut fields = line.splitn(4, |&b| b == b' ');
        let ts = fields.next().unwrap();
        assert!(
            ts.starts_with(b"20") && ts.ends_with(b"Z"),
            "{:?}",
            String::from_utf8_lossy(line)
        );
        assert_eq!(fields.next().unwrap(), stream.as_bytes());
        let tag = match fields.next().unwrap() {
            b"F" => 'F',
            b"P" => 'P',
            other => panic!("tag {other:?}"),
        };
        records.push((tag, fields.next().unwrap().to_vec()));
    }
    records
}

/// Records with a content length, timestamp-independent.
fn strip(records: &[Vec<u8>], stream: &str) -> Vec<(char, Vec<u8>)> {
    parse(&records.concat(), stream)
}

#[test]
fn timestamps_are_go_rfc3339nano() {
    let cases = [
        (at(0, 0), "1970-01-01T00:00:00Z"),
        (at(0, 1), "1970-01-01T00:00:00.000000001Z"),
        (at(T, 0), TS),
        (at(T, 120_000_000), "2023-11-14T22:13:20.12Z"),
        (at(T, 100_000_000), "2023-11-14T22:13:20.1Z"),
        (at(T, 999_999_999), "2023-11-14T22:13:20.999999999Z"),
        (at(T, 123_456_000), "2023-11-14T22:13:20.123456Z"),
        (at(951_782_400, 0), "2000-02-29T00:00:00Z"),
        (at(951_868_799, 0), "2000-02-29T23:59:59Z"),
        (at(951_868_800, 0), "2000-03-01T00:00:00Z"),
        (at(4_107_542_400, 0), "2100-03-01T00:00:00Z"),
        (at(253_402_300_799, 0), "9999-12-31T23:59:59Z"),
        (
            UNIX_EPOCH - Duration::new(0, 1),
            "1969-12-31T23:59:59.999999999Z",
        ),
        (
            UNIX_EPOCH - Duration::new(86_400, 0),
            "1969-12-31T00:00:00Z",
        ),
        (
            UNIX_EPOCH - Duration::new(62_135_596_800, 0),
            "0001-01-01T00:00:00Z",
        ),
    ];
    for (t, want) in cases {
        assert_eq!(format_timestamp(t), want, "{t:?}");
    }
}

#[test]
fn simple_lines_give_exact_records() {
    let mut enc = LineEncoder::new(StreamKind::Stdout);
    let records = enc.push(b"hello\nworld\npart", at(T, 0));
    assert_eq!(
        records,
        [
            record("stdout", 'F', b"hello"),
            record("stdout", 'F', b"world")
        ]
    );
    assert_eq!(
        records[0],
        b"2023-11-14T22:13:20Z stdout F hello\n".to_vec(),
    );
    assert_eq!(
        enc.push(b"ial\n", at(T, 0)),
        [record("stdout", 'F', b"partial")]
    );
    assert_eq!(enc.finish(at(T, 0)), None);

    let mut enc = LineEncoder::new(StreamKind::Stderr);
    assert_eq!(
        enc.push(b"oops\n", at(T, 120_000_000)),
        [b"2023-11-14T22:13:20.12Z stderr F oops\n".to_vec()]
    );
}

#[test]
fn empty_lines_cr_and_raw_bytes_are_kept() {
    let mut enc = LineEncoder::new(StreamKind::Stdout);
    assert_eq!(
        enc.push(b"\n\n", at(T, 0)),
        [
            b"2023-11-14T22:13:20Z stdout F \n".to_vec(),
            record("stdout", 'F', b"")
        ]
    );
    assert_eq!(
        enc.push(b"dos\r\n\xff\xfe\0bin\n", at(T, 0)),
        [
            record("stdout", 'F', b"dos\r"),
            record("stdout", 'F', b"\xff\xfe\0bin")
        ]
    );
    assert!(enc.push(b"", at(T, 0)).is_empty());
}

#[test]
fn finish_with_and_without_remainder() {
    let mut enc = LineEncoder::new(StreamKind::Stdout);
    assert_eq!(enc.finish(at(T, 0)), None);
    assert!(enc.push(b"no newline", at(T, 0)).is_empty());
    assert_eq!(
        enc.finish(at(T, 0)),
        Some(record("stdout", 'F', b"no newline"))
    );
    assert_eq!(enc.finish(at(T, 0)), None, "finish takes the remainder");

    assert!(enc.push(b"cut", at(T, 0)).is_empty());
    assert_eq!(
        enc.flush_partial(at(T, 0)),
        Some(record("stdout", 'P', b"cut"))
    );
    assert_eq!(enc.flush_partial(at(T, 0)), None);
}

#[test]
fn long_line_is_cut_into_max_line_pieces() {
    let line: Vec<u8> = (0..100 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let mut input = line.clone();
    input.push(b'\n');
    let mut enc = LineEncoder::new(StreamKind::Stdout);
    let records = strip(&enc.push(&input, at(T, 0)), "stdout");
    let tags: String = records.iter().map(|(tag, _)| *tag).collect();
    assert_eq!(tags, "PPPPPPF");
    for (_, content) in &records[..6] {
        assert_eq!(content.len(), MAX_LINE);
    }
    assert_eq!(records[6].1.len(), 100 * 1024 - 6 * MAX_LINE);
    let joined: Vec<u8> = records.into_iter().flat_map(|(_, c)| c).collect();
    assert_eq!(joined, line);
}

#[test]
fn line_lengths_around_max_line() {
    // (content length, tags): a line of exactly MAX_LINE is one F record.
    let cases = [
        (MAX_LINE - 1, "F"),
        (MAX_LINE, "F"),
        (MAX_LINE + 1, "PF"),
        (2 * MAX_LINE, "PF"),
        (2 * MAX_LINE + 1, "PPF"),
    ];
    for (len, want) in cases {
        let mut input = vec![b'x'; len];
        input.extend_from_slice(b"\nnext\n");
        let mut enc = LineEncoder::new(StreamKind::Stdout);
        let records = strip(&enc.push(&input, at(T, 0)), "stdout");
        let tags: String = records.iter().map(|(tag, _)| *tag).collect();
        assert_eq!(tags, format!("{want}F"), "line of {len} bytes");
        assert_eq!(records.last().unwrap().1, b"next");
        let total: usize = records.iter().map(|(_, c)| c.len()).sum();
        assert_eq!(total, len + 4);

        // Unterminated at the end of the stream: the last piece is F too.
        let mut enc = LineEncoder::new(StreamKind::Stdout);
        let mut records = enc.push(&vec![b'x'; len], at(T, 0));
        records.extend(enc.finish(at(T, 0)));
        let tags: String = strip(&records, "stdout")
            .iter()
            .map(|(tag, _)| *tag)
            .collect();
        assert_eq!(tags, want, "unterminated line of {len} bytes");
    }
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// All records of `input` fed in chunks of the given sizes (cycled), finished.
fn encode_chunked(input: &[u8], sizes: &mut dyn FnMut() -> usize) -> Vec<Vec<u8>> {
    let mut enc = LineEncoder::new(StreamKind::Stderr);
    let mut records = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let n = sizes().clamp(1, rest.len());
        records.extend(enc.push(&rest[..n], at(T, 0)));
        rest = &rest[n..];
    }
    records.extend(enc.finish(at(T, 0)));
    records
}

#[test]
fn chunk_boundaries_do_not_change_records() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Short lines, empty lines, CRs, lines around MAX_LINE, no final newline.
    let mut input = Vec::new();
    for len in [
        0,
        1,
        5,
        0,
        MAX_LINE - 1,
        MAX_LINE,
        MAX_LINE + 1,
        3 * MAX_LINE + 7,
        2,
        40_000,
    ] {
        for _ in 0..len {
            input.push(b"abc\r xyz"[rng.below(8)]);
        }
        input.push(b'\n');
    }
    input.extend_from_slice(b"tail without newline");

    let whole = encode_chunked(&input, &mut || usize::MAX);
    let byte_by_byte = encode_chunked(&input, &mut || 1);
    assert_eq!(byte_by_byte, whole);
    for _ in 0..20 {
        let max = [2, 17, 1000, MAX_LINE + 3, 50_000][rng.below(5)];
        let random = encode_chunked(&input, &mut || 1 + rng.below(max));
        assert_eq!(random, whole);
    }
    // And the contents are the input, each P joined to what follows.
    let mut rebuilt = Vec::new();
    for (tag, content) in strip(&whole, "stderr") {
        rebuilt.extend_from_slice(&content);
        if tag == 'F' {
            rebuilt.push(b'\n');
        }
    }
    assert_eq!(
        rebuilt.pop(),
        Some(b'\n'),
        "the unterminated tail gets its F"
    );
    assert_eq!(rebuilt, input);
}

fn chunks(parts: &[&[u8]]) -> Vec<Result<Placed, Infallible>> {
    placed(
        parts
            .iter()
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect(),
    )
}

/// The items one after another in the stream, from offset 0.
fn placed<T: Into<Chunk>, E>(items: Vec<Result<T, E>>) -> Vec<Result<Placed, E>> {
    let mut offset = 0;
    items
        .into_iter()
        .map(|item| {
            item.map(|chunk| {
                let chunk = chunk.into();
                let placed = Placed { offset, chunk };
                offset = placed.end();
                placed
            })
        })
        .collect()
}

/// The log at `path`, its progress beside it.
fn open_log(path: &Path) -> Arc<ContainerLog> {
    ContainerLog::open(path, &progress_path(path)).unwrap()
}

fn progress_path(path: &Path) -> PathBuf {
    path.with_extension("progress")
}

fn is_data_starting_with(placed: &Result<Placed, impl Sized>, prefix: &[u8]) -> bool {
    matches!(placed, Ok(Placed { chunk: Chunk::Data(data), .. }) if data.starts_with(prefix))
}

#[tokio::test]
async fn open_creates_parents_and_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pod/ctr/0.log");
    let log = open_log(&path);
    assert_eq!(log.path(), path);
    let end = log
        .clone()
        .pump(
            StreamKind::Stdout,
            stream::iter(chunks(&[b"a\nb", b"c\n", b"end"])),
            None,
            |_| {},
        )
        .await;
    assert_eq!(end, PumpEnd::Eof);
    drop(log);

    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o640 & !umask());
    assert_eq!(mode(&dir.path().join("pod")), 0o755 & !umask());

    let log = open_log(&path);
    log.write_record(&record("stderr", 'F', b"again")).unwrap();
    let text = std::fs::read(&path).unwrap();
    let lines: Vec<_> = text.split(|&b| b == b'\n').collect();
    assert_eq!(lines.len(), 5);
    assert!(lines[0].ends_with(b" stdout F a"));
    assert!(lines[1].ends_with(b" stdout F bc"));
    assert!(lines[2].ends_with(b" stdout F end"));
    assert_eq!(lines[3], format!("{TS} stderr F again").as_bytes());
}

/// The process umask (read from /proc: setting it to read it back would race
/// with the other tests).
fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .unwrap();
    u32::from_str_radix(line.trim(), 8).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pumps_write_whole_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    let log = open_log(&path);

    // Each pump writes numbered lines of varied lengths (some over MAX_LINE)
    // in chunks that cut them anywhere.
    fn output(stream: StreamKind, seed: u64) -> (Vec<u8>, Vec<Result<Bytes, Infallible>>) {
        let mut rng = Rng(seed);
        let mut text = Vec::new();
        for i in 0..400 {
            let len = [3, 100, 5000, MAX_LINE + 10][rng.below(4)];
            let line = format!("{stream}-{i:04}-");
            text.extend_from_slice(line.as_bytes());
            text.extend(std::iter::repeat_n(b'=', len));
            text.push(b'\n');
        }
        let mut parts = Vec::new();
        let mut rest = &text[..];
        while !rest.is_empty() {
            let n = (1 + rng.below(9000)).min(rest.len());
            parts.push(Ok(Bytes::copy_from_slice(&rest[..n])));
            rest = &rest[n..];
        }
        (text, parts)
    }
    let (out, out_parts) = output(StreamKind::Stdout, 1);
    let (err, err_parts) = output(StreamKind::Stderr, 2);
    // Yield between chunks so the two pumps really interleave.
    let slow = |parts: Vec<Result<Bytes, Infallible>>| {
        Box::pin(stream::iter(placed(parts)).then(|p| async move {
            tokio::task::yield_now().await;
            p
        }))
    };
    let a = tokio::spawn(
        log.clone()
            .pump(StreamKind::Stdout, slow(out_parts), None, |_| {}),
    );
    let b = tokio::spawn(
        log.clone()
            .pump(StreamKind::Stderr, slow(err_parts), None, |_| {}),
    );
    assert_eq!(a.await.unwrap(), PumpEnd::Eof);
    assert_eq!(b.await.unwrap(), PumpEnd::Eof);

    // Split the file by stream; each stream's records rebuild its output.
    let file = std::fs::read(&path).unwrap();
    let mut by_stream = [(Vec::new(), "stdout", out), (Vec::new(), "stderr", err)];
    for line in file.split_inclusive(|&b| b == b'\n') {
        let fields: Vec<_> = line.splitn(3, |&b| b == b' ').collect();
        let slot = by_stream
            .iter_mut()
            .find(|s| fields[1] == s.1.as_bytes())
            .expect("stream");
        slot.0.extend_from_slice(line);
    }
    let mut switches = 0;
    let mut last = None;
    for line in file.split_inclusive(|&b| b == b'\n') {
        let is_out = line.splitn(3, |&b| b == b' ').nth(1) == Some(&b"stdout"[..]);
        switches += usize::from(last.is_some_and(|l| l != is_out));
        last = Some(is_out);
    }
    assert!(switches > 0, "the pumps did not interleave");
    for (records, stream, text) in by_stream {
        let mut rebuilt = Vec::new();
        for (tag, content) in parse(&records, stream) {
            rebuilt.extend_from_slice(&content);
            if tag == 'F' {
                rebuilt.push(b'\n');
            }
        }
        assert_eq!(rebuilt, text, "{stream}");
    }
}

#[tokio::test]
async fn reopen_after_rename_writes_to_the_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    let rotated = dir.path().join("0.log.20231114-221320");
    let log = open_log(&path);
    let (log2, path2, rotated2) = (log.clone(), path.clone(), rotated.clone());
    // kubelet rotates between the second and the third chunk.
    let source = stream::iter(chunks(&[b"one\n", b"two\nthr", b"ee\nfour\n"])).map(move |chunk| {
        if is_data_starting_with(&chunk, b"ee") {
            std::fs::rename(&path2, &rotated2).unwrap();
            log2.reopen().unwrap();
        }
        chunk
    });
    assert_eq!(
        log.pump(StreamKind::Stdout, source, None, |_| {}).await,
        PumpEnd::Eof
    );

    let contents = |p: &Path| -> Vec<Vec<u8>> {
        parse(&std::fs::read(p).unwrap(), "stdout")
            .into_iter()
            .map(|(_, c)| c)
            .collect()
    };
    assert_eq!(contents(&rotated), [b"one".to_vec(), b"two".to_vec()]);
    assert_eq!(contents(&path), [b"three".to_vec(), b"four".to_vec()]);
}

#[tokio::test]
async fn failed_source_flushes_pending_as_partial() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    let log = open_log(&path);
    let source = stream::iter(placed(vec![
        Ok(Bytes::from_static(b"whole\nhal")),
        Err("connection reset"),
        Ok(Bytes::from_static(b"never read\n")),
    ]));
    let end = log
        .clone()
        .pump(StreamKind::Stderr, source, None, |_| {})
        .await;
    assert_eq!(end, PumpEnd::Failed("connection reset".to_string()));
    // A resumed pump continues the line.
    let end = log
        .clone()
        .pump(
            StreamKind::Stderr,
            stream::iter(chunks(&[b"f\n"])),
            None,
            |_| {},
        )
        .await;
    assert_eq!(end, PumpEnd::Eof);
    assert_eq!(
        parse(&std::fs::read(&path).unwrap(), "stderr"),
        [
            ('F', b"whole".to_vec()),
            ('P', b"hal".to_vec()),
            ('F', b"f".to_vec())
        ]
    );
}

#[tokio::test]
async fn write_errors_drop_records_and_are_reported_once_writing_works() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        eprintln!("skipped: no /dev/full");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    std::os::unix::fs::symlink(full, &path).unwrap();
    let log = open_log(&path);
    let (log2, path2) = (log.clone(), path.clone());
    // The disk is "full" for the first two chunks; then the path becomes a
    // regular file.
    let source =
        stream::iter(chunks(&[b"lost one\nlost", b" two\n", b"kept\n"])).map(move |chunk| {
            if is_data_starting_with(&chunk, b"kept") {
                std::fs::remove_file(&path2).unwrap();
                log2.reopen().unwrap();
            }
            chunk
        });
    assert_eq!(
        log.pump(StreamKind::Stdout, source, None, |_| {}).await,
        PumpEnd::Eof
    );

    let records = parse(&std::fs::read(&path).unwrap(), "stdout");
    assert_eq!(records.len(), 2);
    let notice = String::from_utf8(records[0].1.clone()).unwrap();
    assert_eq!(records[0].0, 'F');
    assert!(
        notice.starts_with(&format!(
            "[frakti] 16 bytes of stdout were lost: writing to the log file {}: ",
            path.display()
        )),
        "{notice}"
    );
    assert_eq!(records[1], ('F', b"kept".to_vec()));
}

#[tokio::test]
async fn a_gap_in_the_output_is_marked_where_it_happened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    let log = open_log(&path);
    let source = stream::iter(placed(vec![
        Ok::<_, Infallible>(Chunk::Data(Bytes::from_static(b"a\nbc"))),
        Ok(Chunk::Lost(100)),
        Ok(Chunk::Data(Bytes::from_static(b"d\n"))),
    ]));
    assert_eq!(
        log.pump(StreamKind::Stdout, source, None, |_| {}).await,
        PumpEnd::Eof
    );
    let contents: Vec<String> = parse(&std::fs::read(&path).unwrap(), "stdout")
        .into_iter()
        .map(|(_, c)| String::from_utf8(c).unwrap())
        .collect();
    assert_eq!(contents.len(), 4, "{contents:?}");
    assert_eq!(contents[0], "a");
    assert_eq!(contents[1], "bc");
    assert!(
        contents[2].starts_with("[frakti] 100 bytes of stdout were lost"),
        "{contents:?}"
    );
    assert_eq!(contents[3], "d");
}

fn contents(path: &Path, stream: &str) -> Vec<String> {
    parse(&std::fs::read(path).unwrap(), stream)
        .into_iter()
        .map(|(_, c)| String::from_utf8(c).unwrap())
        .collect()
}

fn at_offset(offset: u64, data: &'static [u8]) -> Result<Placed, Infallible> {
    Ok(Placed {
        offset,
        chunk: Chunk::Data(Bytes::from_static(data)),
    })
}

#[tokio::test]
async fn a_resumed_pump_skips_what_the_log_has_and_marks_what_the_source_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    let log = open_log(&path);
    let source = stream::iter(vec![
        at_offset(0, b"abcde"),
        at_offset(3, b"defgh\n"),
        at_offset(20, b"x\n"),
    ]);
    let end = log.pump(StreamKind::Stdout, source, Some(5), |_| {}).await;
    assert_eq!(end, PumpEnd::Eof);
    let lines = contents(&path, "stdout");
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0], "fgh");
    assert!(
        lines[1].starts_with("[frakti] 11 bytes of stdout were lost"),
        "{lines:?}"
    );
    assert_eq!(lines[2], "x");
}

#[tokio::test]
async fn confirmations_and_saved_progress_leave_out_an_unfinished_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    let log = open_log(&path);
    let mut confirmed = Vec::new();
    let source = stream::iter(chunks(&[b"a\nbc", b"d\nef"]));
    let end = log
        .clone()
        .pump(StreamKind::Stderr, source, None, |kept| {
            confirmed.push(kept)
        })
        .await;
    assert_eq!(end, PumpEnd::Eof);
    assert_eq!(confirmed, [2, 6]);
    // At the end of the stream the unfinished line is written too.
    let saved = progress::load(&progress_path(&path)).unwrap().unwrap();
    assert_eq!((saved.stdout, saved.stderr), (0, 8));
    assert_eq!(saved.size, std::fs::metadata(&path).unwrap().len());
}

/// A log at `path` whose stdout was "one\n", written and saved.
async fn write_one_line(path: &Path) {
    let end = open_log(path)
        .pump(
            StreamKind::Stdout,
            stream::iter(chunks(&[b"one\n"])),
            None,
            |_| {},
        )
        .await;
    assert_eq!(end, PumpEnd::Eof);
}

#[tokio::test]
async fn a_log_written_past_its_saved_progress_is_cut_back_when_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    write_one_line(&path).await;
    // A daemon killed between writing a record and saving its progress.
    let mut file = OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(&record("stdout", 'F', b"two")).unwrap();

    let log = open_log(&path);
    assert_eq!(log.resume_offset(StreamKind::Stdout), Some(4));
    assert_eq!(log.resume_offset(StreamKind::Stderr), Some(0));
    assert_eq!(contents(&path, "stdout"), ["one"]);
    // The agent sends what was not confirmed again (and some that was).
    let source = stream::iter(vec![at_offset(0, b"one\ntwo\n")]);
    let end = log.pump(StreamKind::Stdout, source, Some(4), |_| {}).await;
    assert_eq!(end, PumpEnd::Eof);
    assert_eq!(contents(&path, "stdout"), ["one", "two"]);
}

#[tokio::test]
async fn a_rotated_log_is_not_cut_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("0.log");
    write_one_line(&path).await;
    // Rotated while the daemon was away: another file at the path.
    std::fs::rename(&path, dir.path().join("0.log.1")).unwrap();
    std::fs::write(&path, record("stdout", 'F', b"somebody's")).unwrap();
    let log = open_log(&path);
    assert_eq!(log.resume_offset(StreamKind::Stdout), Some(4));
    assert_eq!(contents(&path, "stdout"), ["somebody's"]);
}
