//! Container logs in the CRI format.
//!
//! kubelet (its log rotation, `kubectl logs`) reads a container's log file as
//! records of the form
//!
//! ```text
//! <timestamp> <stream> <tag> <content>\n
//! ```
//!
//! - `timestamp`: UTC, as Go's `time.RFC3339Nano` formats it
//!   (`2006-01-02T15:04:05.999999999Z07:00`: trailing zeros of the fraction
//!   trimmed, no fraction at all when it is 0, `Z` for UTC);
//! - `stream`: `stdout` or `stderr`;
//! - `tag`: `F` for a full line, `P` for a partial one that the next record of
//!   the same stream continues;
//! - `content`: the line without its `\n`, bytes as they are (no UTF-8
//!   requirement, a `\r` stays).
//!
//! The rules are containerd's: a line longer than [`MAX_LINE`] bytes is cut
//! into `MAX_LINE` pieces written as `P`, its last piece as `F` (a line of
//! exactly `MAX_LINE` bytes is one `F` record); at the end of a stream, an
//! unterminated remainder is written as `F`. [`LineEncoder`] applies them to a
//! byte stream whatever its chunking.
//!
//! The stdout and stderr of one container go, through two concurrent pumps
//! ([`ContainerLog::pump`]), into one file ([`ContainerLog`]); each record is
//! written whole under a mutex. The writes are plain synchronous `std::fs`
//! writes made from the pump's task: a record is at most `MAX_LINE` bytes plus
//! a 50-byte header, which the page cache takes at once, so going through
//! `spawn_blocking` would cost more than it saves.
//!
//! Nothing is lost or repeated when the daemon is killed: after each chunk
//! the pump saves how far the log has its stream ([`progress`]) and only
//! then confirms that offset to the agent, which keeps what it sent until
//! confirmed; the restarted daemon cuts the file back to the saved size
//! and resumes each stream from its saved offset.

use std::fmt::{self, Display};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use progress::Progress;

mod progress;

/// The longest content of one record, in bytes.
pub const MAX_LINE: usize = 16 * 1024;

/// Mode of a log file created here (kubelet's readers run as root; the group
/// may read, like containerd's 0640).
const FILE_MODE: u32 = 0o640;
/// Mode of the missing parent directories created here.
const DIR_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating the log directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening the log file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the log's progress file {path}")]
    Progress {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing to the log file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Which of a container's output streams a record comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Stdout,
    Stderr,
}

impl StreamKind {
    /// The stream's name in a record.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }
}

impl Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record's tag.
#[derive(Clone, Copy)]
enum Tag {
    Full,
    Partial,
}

/// What a log pump copies: output, or a gap in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    Data(Bytes),
    /// This many bytes of output are missing here (the agent dropped them).
    Lost(u64),
}

impl From<Bytes> for Chunk {
    fn from(data: Bytes) -> Chunk {
        Chunk::Data(data)
    }
}

/// Splits a byte stream into CRI records.
///
/// It holds at most [`MAX_LINE`] bytes of an unfinished line between calls.
#[derive(Debug)]
pub struct LineEncoder {
    stream: StreamKind,
    pending: Vec<u8>,
}

impl LineEncoder {
    pub fn new(stream: StreamKind) -> Self {
        LineEncoder {
            stream,
            pending: Vec::new(),
        }
    }

    /// Records for the complete lines (and 16 KiB pieces) in `data`; keeps the rest.
    /// All records of one call carry the timestamp `now`.
    pub fn push(&mut self, data: &[u8], now: SystemTime) -> Vec<Vec<u8>> {
        let mut records = Vec::new();
        self.push_each(data, now, |record, _| records.push(record));
        records
    }

    /// The record for what is left at the end of the stream, if anything
    /// (an `F` record: the stream ended, so the line did too).
    pub fn finish(&mut self, now: SystemTime) -> Option<Vec<u8>> {
        self.take_pending(Tag::Full, now).map(|(record, _)| record)
    }

    /// The record for what is left when the stream broke off and may be
    /// resumed (a `P` record: the resumed stream's next record continues it).
    pub fn flush_partial(&mut self, now: SystemTime) -> Option<Vec<u8>> {
        self.take_pending(Tag::Partial, now)
            .map(|(record, _)| record)
    }

    /// [`push`](Self::push), handing each record and its content length to `emit`.
    fn push_each(&mut self, data: &[u8], now: SystemTime, mut emit: impl FnMut(Vec<u8>, usize)) {
        let mut timestamp = None;
        let mut rest = data;
        while !rest.is_empty() {
            let room = MAX_LINE - self.pending.len();
            // A newline right after `room` bytes still ends a full line.
            let window = &rest[..rest.len().min(room + 1)];
            let (tag, content_end, consumed) =
                if let Some(at) = window.iter().position(|&b| b == b'\n') {
                    (Tag::Full, at, at + 1)
                } else if rest.len() > room {
                    (Tag::Partial, room, room)
                } else {
                    self.pending.extend_from_slice(rest);
                    return;
                };
            let timestamp = timestamp.get_or_insert_with(|| format_timestamp(now));
            let content_len = self.pending.len() + content_end;
            emit(
                self.record(timestamp, tag, &rest[..content_end]),
                content_len,
            );
            self.pending.clear();
            rest = &rest[consumed..];
        }
    }

    /// The record for the pending bytes, if any, and their length.
    fn take_pending(&mut self, tag: Tag, now: SystemTime) -> Option<(Vec<u8>, usize)> {
        if self.pending.is_empty() {
            return None;
        }
        let record = self.record(&format_timestamp(now), tag, &[]);
        let content_len = self.pending.len();
        self.pending.clear();
        Some((record, content_len))
    }

    /// One record whose content is the pending bytes followed by `tail`.
    fn record(&self, timestamp: &str, tag: Tag, tail: &[u8]) -> Vec<u8> {
        encode_record(timestamp, self.stream, tag, &[&self.pending, tail])
    }
}

fn encode_record(timestamp: &str, stream: StreamKind, tag: Tag, content: &[&[u8]]) -> Vec<u8> {
    let stream = stream.as_str();
    let tag = match tag {
        Tag::Full => b'F',
        Tag::Partial => b'P',
    };
    let content_len: usize = content.iter().map(|part| part.len()).sum();
    let mut record = Vec::with_capacity(timestamp.len() + stream.len() + content_len + 5);
    record.extend_from_slice(timestamp.as_bytes());
    record.push(b' ');
    record.extend_from_slice(stream.as_bytes());
    record.push(b' ');
    record.push(tag);
    record.push(b' ');
    for part in content {
        record.extend_from_slice(part);
    }
    record.push(b'\n');
    record
}

/// `t` in UTC as Go's `time.RFC3339Nano` formats it, e.g.
/// `2023-11-14T22:13:20.12Z`.
pub fn format_timestamp(t: SystemTime) -> String {
    // Seconds since the epoch (floored) and the nanoseconds past them.
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(before) => {
            let d = before.duration();
            let secs = i64::try_from(d.as_secs()).map_or(i64::MIN, |s| -s);
            match d.subsec_nanos() {
                0 => (secs, 0),
                n => (secs.saturating_sub(1), 1_000_000_000 - n),
            }
        }
    };
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    );
    if nanos != 0 {
        let fraction = format!("{nanos:09}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

/// The (year, month, day) of the proleptic Gregorian calendar `days` days
/// after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift to an era starting on 0000-03-01, so leap days end the year.
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // [0, 146096]
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11]
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era.saturating_mul(400) + i64::from(month <= 2);
    // In range by construction: month in [1, 12], day in [1, 31].
    (year, month as u32, day as u32)
}

/// How a pump ended.
#[derive(Debug, PartialEq)]
pub enum PumpEnd {
    /// The source ended; its unterminated remainder, if any, was written as
    /// an `F` record.
    Eof,
    /// The source failed (e.g. the agent connection broke), with its error.
    /// The unterminated remainder, if any, was written as a `P` record, so a
    /// pump resumed on a new source continues the line.
    Failed(String),
}

/// A chunk of output and the stream offset of its first byte (a gap spans
/// the offsets of the bytes it stands for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub offset: u64,
    pub chunk: Chunk,
}

impl Placed {
    /// The offset just past the chunk.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.chunk.span())
    }
}

impl Chunk {
    /// How many stream offsets the chunk spans.
    pub fn span(&self) -> u64 {
        match self {
            Chunk::Data(data) => data.len() as u64,
            Chunk::Lost(n) => *n,
        }
    }

    /// Without its first `n` offsets (n < span).
    fn skip(self, n: u64) -> Chunk {
        match self {
            // n < data.len(), a usize.
            Chunk::Data(data) => Chunk::Data(data.slice(n as usize..)),
            Chunk::Lost(lost) => Chunk::Lost(lost - n),
        }
    }
}

/// Fits a chunk to the stream position the log has reached (`expected`;
/// `None`: wherever the source starts): what the log has already is
/// skipped, what the source no longer has is a gap before the rest.
fn align(expected: &mut Option<u64>, placed: Placed) -> Vec<Chunk> {
    let Placed { offset, chunk } = placed;
    let at = *expected.get_or_insert(offset);
    let end = offset.saturating_add(chunk.span());
    if end <= at {
        return Vec::new();
    }
    *expected = Some(end);
    if offset < at {
        return vec![chunk.skip(at - offset)];
    }
    match offset - at {
        0 => vec![chunk],
        gap => vec![Chunk::Lost(gap), chunk],
    }
}

/// One container's log file, shared by its output pumps.
#[derive(Debug)]
pub struct ContainerLog {
    path: PathBuf,
    inner: Mutex<LogFile>,
    /// The progress found when the log was opened (a daemon restart).
    resumed: Option<Progress>,
}

#[derive(Debug)]
struct LogFile {
    file: File,
    progress: Progress,
    progress_file: File,
    /// Saving the progress failed (reported once).
    progress_failing: bool,
}

impl ContainerLog {
    /// Opens (creating, mode 0640, appending) the file at `path`, with its
    /// progress file at `progress_path`. kubelet makes the log's directory;
    /// missing parents are created with mode 0755 for the CLI.
    ///
    /// When the progress file says this log file was written past the last
    /// saved progress (the daemon was killed between a write and its save),
    /// the file is cut back: those records come again from the agent.
    pub fn open(path: &Path, progress_path: &Path) -> Result<Arc<ContainerLog>, Error> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(parent)
                .map_err(|source| Error::CreateDir {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        let progress_error = |source| Error::Progress {
            path: progress_path.to_path_buf(),
            source,
        };
        let resumed = progress::load(progress_path).map_err(progress_error)?;
        let file = open_file(path)?;
        let mut progress = resumed.unwrap_or_default();
        let meta = file.metadata().map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if resumed.is_some() && meta.ino() == progress.ino && meta.len() > progress.size {
            tracing::info!(
                "{}: dropping the last {} bytes, written after the last saved progress: \
                 the agent sends their output again",
                path.display(),
                meta.len() - progress.size
            );
            file.set_len(progress.size).map_err(|source| Error::Write {
                path: path.to_path_buf(),
                source,
            })?;
        }
        progress.set_file(&file).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let progress_file = progress::open(progress_path).map_err(progress_error)?;
        progress::save(&progress_file, &progress).map_err(progress_error)?;
        Ok(Arc::new(ContainerLog {
            path: path.to_path_buf(),
            inner: Mutex::new(LogFile {
                file,
                progress,
                progress_file,
                progress_failing: false,
            }),
            resumed,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where `stream` resumes: the saved offset when the log was opened
    /// after a restart, `None` for a new log (the stream starts wherever
    /// the agent has it).
    pub fn resume_offset(&self, stream: StreamKind) -> Option<u64> {
        self.resumed.map(|p| p.offset(stream))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogFile> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reopens the path (kubelet renamed the file for rotation): later records
    /// go to a new file at the same path. Safe while pumps run: a record is
    /// written whole to either the old file or the new one.
    pub fn reopen(&self) -> Result<(), Error> {
        let file = open_file(&self.path)?;
        let mut inner = self.lock();
        inner.file = file;
        self.save_progress(&mut inner);
        Ok(())
    }

    /// Writes one whole record. (A write that fails half-way, the disk being
    /// full, may leave part of it in the file, as with containerd.)
    pub fn write_record(&self, record: &[u8]) -> Result<(), Error> {
        write(&mut self.lock().file, &self.path, record)
    }

    /// Copies `source` (a stream of output chunks, e.g. the agent's
    /// `ReadOutput` stream) into the log until it ends; returns how it
    /// ended. `from` is where the log has the stream already ([`resume_offset`](Self::resume_offset)):
    /// what comes again before it is skipped. After each chunk the records
    /// are written, the progress saved, and `confirm` told the offset up to
    /// which the stream is in the log for good (an unfinished line is not).
    ///
    /// A write error (disk full) is logged and the pump keeps draining,
    /// dropping records, so the container never blocks on its log. Once
    /// writing works again, the first record written is an `F` record on this
    /// stream saying how much content was dropped:
    /// `[frakti] N bytes of stdout were lost: <error>` (N counts the contents
    /// of the dropped records, not their line ends).
    pub async fn pump<S, E>(
        self: Arc<Self>,
        stream: StreamKind,
        mut source: S,
        from: Option<u64>,
        mut confirm: impl FnMut(u64),
    ) -> PumpEnd
    where
        S: Stream<Item = Result<Placed, E>> + Unpin,
        E: Display,
    {
        let mut encoder = LineEncoder::new(stream);
        let mut loss = None;
        let mut expected = from;
        let end = loop {
            let mut batch = Vec::new();
            let mut emit = |record, len| batch.push((record, len));
            let end = match source.next().await {
                Some(Ok(placed)) => {
                    for chunk in align(&mut expected, placed) {
                        encode(&mut encoder, stream, chunk, &mut emit);
                    }
                    None
                }
                Some(Err(err)) => {
                    if let Some(pending) = encoder.take_pending(Tag::Partial, SystemTime::now()) {
                        emit(pending.0, pending.1);
                    }
                    Some(PumpEnd::Failed(err.to_string()))
                }
                None => {
                    if let Some(pending) = encoder.take_pending(Tag::Full, SystemTime::now()) {
                        emit(pending.0, pending.1);
                    }
                    Some(PumpEnd::Eof)
                }
            };
            let kept = expected.map(|at| at.saturating_sub(encoder.pending.len() as u64));
            self.deliver(stream, &batch, kept, &mut loss);
            if let Some(end) = end {
                break end;
            }
            if let Some(kept) = kept {
                confirm(kept);
            }
        };
        if let Some(loss) = loss {
            tracing::error!(
                "{}: the pump of {stream} ends with {} bytes lost ({})",
                self.path.display(),
                loss.bytes,
                loss.error
            );
        }
        end
    }

    /// Writes a pump's records (or counts them in `loss` when writing
    /// fails; the notice of an earlier loss goes first), then saves the
    /// stream's progress: `kept`, with the file's new size. One lock for all
    /// of it, so the saved size always matches the saved offsets.
    fn deliver(
        &self,
        stream: StreamKind,
        records: &[(Vec<u8>, usize)],
        kept: Option<u64>,
        loss: &mut Option<Loss>,
    ) {
        let mut inner = self.lock();
        for (record, content_len) in records {
            self.deliver_one(&mut inner.file, stream, record, *content_len, loss);
        }
        if let Some(kept) = kept.filter(|k| *k != inner.progress.offset(stream)) {
            inner.progress.set_offset(stream, kept);
            self.save_progress(&mut inner);
        } else if !records.is_empty() {
            self.save_progress(&mut inner);
        }
    }

    fn deliver_one(
        &self,
        file: &mut File,
        stream: StreamKind,
        record: &[u8],
        content_len: usize,
        loss: &mut Option<Loss>,
    ) {
        if let Some(lost) = loss {
            let notice = format!(
                "[frakti] {} bytes of {stream} were lost: {}",
                lost.bytes, lost.error
            );
            let notice = encode_record(
                &format_timestamp(SystemTime::now()),
                stream,
                Tag::Full,
                &[notice.as_bytes()],
            );
            if write(file, &self.path, &notice).is_err() {
                lost.bytes = lost.bytes.saturating_add(content_len as u64);
                return;
            }
            tracing::info!(
                "{}: writing {stream} works again after {} bytes were lost",
                self.path.display(),
                lost.bytes
            );
            *loss = None;
        }
        if let Err(err) = write(file, &self.path, record) {
            let error = crate::error_chain(&err);
            tracing::warn!("{error}: dropping {stream} records until writing works again");
            *loss = Some(Loss {
                bytes: content_len as u64,
                error,
            });
        }
    }

    /// Saves the progress with the file's current size; a failure is
    /// reported once (the log itself goes on).
    fn save_progress(&self, inner: &mut LogFile) {
        let LogFile {
            file,
            progress,
            progress_file,
            progress_failing,
        } = inner;
        let saved = progress
            .set_file(file)
            .and_then(|()| progress::save(progress_file, progress));
        match saved {
            Ok(()) => *progress_failing = false,
            Err(e) if !*progress_failing => {
                *progress_failing = true;
                tracing::warn!(
                    "{}: saving how far the log is: {e} (a restart may repeat some output)",
                    self.path.display()
                );
            }
            Err(_) => {}
        }
    }
}

/// Turns one aligned chunk into records for `emit`.
fn encode(
    encoder: &mut LineEncoder,
    stream: StreamKind,
    chunk: Chunk,
    emit: &mut impl FnMut(Vec<u8>, usize),
) {
    match chunk {
        Chunk::Data(data) => encoder.push_each(&data, SystemTime::now(), emit),
        Chunk::Lost(bytes) => {
            // The line the gap cut ends here; the notice follows.
            let now = SystemTime::now();
            if let Some((record, len)) = encoder.take_pending(Tag::Full, now) {
                emit(record, len);
            }
            let notice = format!(
                "[frakti] {bytes} bytes of {stream} were lost: written while the daemon \
                 was not reading, beyond what the agent keeps"
            );
            let record = encode_record(
                &format_timestamp(now),
                stream,
                Tag::Full,
                &[notice.as_bytes()],
            );
            emit(record, notice.len());
        }
    }
}

fn write(file: &mut File, path: &Path, record: &[u8]) -> Result<(), Error> {
    file.write_all(record).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn open_file(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// Content a pump dropped because writing failed.
struct Loss {
    bytes: u64,
    /// The first failure.
    error: String,
}

#[cfg(test)]
mod tests;
