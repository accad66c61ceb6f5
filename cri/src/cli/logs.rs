//! `frakti logs` and the output of `frakti run`: a container's CRI log file
//! (`<timestamp> <stream> <F|P> <content>`) read back as the container
//! wrote it, stdout to stdout and stderr to stderr, optionally followed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

/// How often a followed log is looked at again.
const POLL: Duration = Duration::from_millis(100);

/// One record of a CRI log.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub timestamp: &'a str,
    pub stderr: bool,
    /// A `P` record: the next record of the stream continues the line.
    pub partial: bool,
    pub content: &'a [u8],
}

/// Parses one line of a CRI log (without its `\n`); `None` if it is not a
/// record (a torn or foreign line).
pub fn parse_record(line: &[u8]) -> Option<Record<'_>> {
    let mut fields = line.splitn(4, |&b| b == b' ');
    let timestamp = std::str::from_utf8(fields.next()?).ok()?;
    if timestamp.is_empty() {
        return None;
    }
    let stderr = match fields.next()? {
        b"stdout" => false,
        b"stderr" => true,
        _ => return None,
    };
    let partial = match fields.next()? {
        b"F" => false,
        b"P" => true,
        _ => return None,
    };
    Some(Record {
        timestamp,
        stderr,
        partial,
        content: fields.next().unwrap_or_default(),
    })
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Keep reading as the container writes, until `done` says it exited.
    pub follow: bool,
    /// Only the last this many lines (of both streams).
    pub tail: Option<usize>,
    /// Each line starts with the record's timestamp.
    pub timestamps: bool,
}

/// Writes records to stdout and stderr, remembering where each stream's
/// line stands (for timestamps at line starts only).
struct Writer<O, E> {
    out: O,
    err: E,
    timestamps: bool,
    mid_line: [bool; 2],
    /// The reader of the output went away (`| head`): stop quietly.
    closed: bool,
}

impl<O: Write, E: Write> Writer<O, E> {
    fn write(&mut self, record: &Record<'_>) -> anyhow::Result<()> {
        let index = usize::from(record.stderr);
        let mut bytes = Vec::with_capacity(record.content.len() + 40);
        if self.timestamps && !self.mid_line[index] {
            bytes.extend_from_slice(record.timestamp.as_bytes());
            bytes.push(b' ');
        }
        bytes.extend_from_slice(record.content);
        if !record.partial {
            bytes.push(b'\n');
        }
        self.mid_line[index] = record.partial;
        let sink: &mut dyn Write = if record.stderr {
            &mut self.err
        } else {
            &mut self.out
        };
        match sink.write_all(&bytes).and_then(|()| sink.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => self.closed = true,
            other => other.context("writing the log out")?,
        }
        Ok(())
    }
}

/// The last `count` lines of `reader` (from where it is), each as its
/// records (a `P` record and those that continue it make one line),
/// in the order the lines began.
fn last_lines(reader: &mut impl BufRead, count: usize) -> anyhow::Result<VecDeque<Vec<u8>>> {
    let mut lines: VecDeque<Vec<u8>> = VecDeque::new();
    // Lines dropped from the front so far: a line's number minus this is
    // its place in `lines`.
    let mut dropped = 0usize;
    // Per stream, the number of the line its last record left open.
    let mut open: [Option<usize>; 2] = [None; 2];
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 || line.last() != Some(&b'\n') {
            return Ok(lines);
        }
        let Some(record) = parse_record(&line[..line.len() - 1]) else {
            continue;
        };
        let index = usize::from(record.stderr);
        let number = match open[index] {
            Some(number) => number,
            None => {
                lines.push_back(Vec::new());
                if lines.len() > count {
                    lines.pop_front();
                    dropped += 1;
                }
                dropped + lines.len() - 1
            }
        };
        if let Some(kept) = number.checked_sub(dropped).and_then(|i| lines.get_mut(i)) {
            kept.extend_from_slice(&line);
        }
        open[index] = record.partial.then_some(number);
    }
}

/// Copies the log at `path` out; with `follow`, goes on until `done()`
/// says the container exited (and what it wrote last was read).
pub async fn copy(
    path: &Path,
    options: &Options,
    mut done: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let mut writer = Writer {
        out: std::io::stdout(),
        err: std::io::stderr(),
        timestamps: options.timestamps,
        mid_line: [false; 2],
        closed: false,
    };
    let mut file = open(path)?;
    let mut ino = file.metadata()?.ino();
    let mut reader = BufReader::new(file.try_clone()?);
    if let Some(count) = options.tail {
        for lines in last_lines(&mut reader, count)? {
            for record_line in lines.split_inclusive(|&b| b == b'\n') {
                if let Some(record) = parse_record(&record_line[..record_line.len() - 1]) {
                    writer.write(&record)?;
                }
            }
        }
    }
    let mut line = Vec::new();
    loop {
        // Everything complete that is there now.
        loop {
            line.clear();
            let start = reader.stream_position()?;
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                // A record being written: read it whole next time.
                reader.seek(SeekFrom::Start(start))?;
                break;
            }
            if let Some(record) = parse_record(&line[..line.len() - 1]) {
                writer.write(&record)?;
                if writer.closed {
                    return Ok(());
                }
            }
        }
        if !options.follow {
            return Ok(());
        }
        if done().await {
            // The exit is recorded after the last output was written: one
            // more pass reads it.
            if drained(&mut reader)? {
                return Ok(());
            }
            continue;
        }
        tokio::time::sleep(POLL).await;
        // Rotated (renamed, a new file at the path): read the new one.
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.ino() != ino {
                file = open(path)?;
                ino = file.metadata()?.ino();
                reader = BufReader::new(file.try_clone()?);
            }
        }
    }
}

/// `frakti logs`: the container's log file, as the daemon reports its path.
pub async fn show(
    clients: &mut super::Clients,
    reference: &str,
    options: &Options,
) -> anyhow::Result<()> {
    let found = super::resolve::container(clients, reference).await?;
    let id = found.id().to_string();
    let path = super::status_of(clients, &id).await?.log_path;
    anyhow::ensure!(
        !path.is_empty(),
        "container {} has no log (it was created without a log path)",
        super::short_id(&id)
    );
    let mut poller = clients.clone();
    copy(Path::new(&path), options, async || {
        super::status_of(&mut poller, &id)
            .await
            .map_or(true, |s| super::has_exited(&s))
    })
    .await
}

/// Whether the reader is at the end of its file.
fn drained(reader: &mut BufReader<File>) -> anyhow::Result<bool> {
    let at = reader.stream_position()?;
    Ok(at >= reader.get_ref().metadata()?.len())
}

fn open(path: &Path) -> anyhow::Result<File> {
    File::open(path).with_context(|| format!("opening the container's log {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_and_malformed_lines_do_not() {
        assert_eq!(
            parse_record(b"2023-11-14T22:13:20Z stdout F hello world"),
            Some(Record {
                timestamp: "2023-11-14T22:13:20Z",
                stderr: false,
                partial: false,
                content: b"hello world",
            })
        );
        let empty = parse_record(b"t stderr P ").unwrap();
        assert!(empty.stderr && empty.partial && empty.content.is_empty());
        assert_eq!(parse_record(b"t stdout F").unwrap().content, b"");
        for bad in [
            &b""[..],
            b" stdout F x",
            b"t stdin F x",
            b"t stdout X x",
            b"t stdout",
            b"\xff stdout F x",
        ] {
            assert_eq!(parse_record(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn lines_are_rebuilt_with_timestamps_at_their_starts() {
        let mut writer = Writer {
            out: Vec::new(),
            err: Vec::new(),
            timestamps: true,
            mid_line: [false; 2],
            closed: false,
        };
        for line in [
            &b"t1 stdout P hel"[..],
            b"t2 stderr F oops",
            b"t3 stdout F lo",
            b"t4 stdout F again",
        ] {
            writer.write(&parse_record(line).unwrap()).unwrap();
        }
        assert_eq!(writer.out, b"t1 hello\nt4 again\n");
        assert_eq!(writer.err, b"t2 oops\n");
    }

    #[test]
    fn tail_counts_whole_lines_of_both_streams() {
        let log =
            b"t stdout F one\nt stdout P tw\nt stderr F err\nt stdout F o\nt stdout F three\ntorn";
        let lines: Vec<Vec<u8>> = last_lines(&mut &log[..], 3).unwrap().into();
        assert_eq!(
            lines,
            [
                b"t stdout P tw\nt stdout F o\n".to_vec(),
                b"t stderr F err\n".to_vec(),
                b"t stdout F three\n".to_vec()
            ]
        );
        // A line whose start fell out of the window loses its rest too.
        let lines: Vec<Vec<u8>> = last_lines(&mut &log[..], 2).unwrap().into();
        assert_eq!(
            lines,
            [b"t stderr F err\n".to_vec(), b"t stdout F three\n".to_vec()]
        );
        assert!(last_lines(&mut &log[..], 0).unwrap().is_empty());
        assert_eq!(last_lines(&mut &log[..], 10).unwrap().len(), 4);
    }
}
