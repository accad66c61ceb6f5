//! A process's output stream, read all the time by the agent into a
//! bounded backlog, whoever reads it (ReadOutput) or not.
//!
//! Every byte has a stream offset (a gap the agent dropped takes up the
//! offsets of the bytes it stands for), and every piece a reader gets says
//! where it starts, so a reader that comes back knows what it has.
//!
//! While a reader is attached, the backlog is back-pressure: the agent
//! stops reading the pipe once [`MAX_BACKLOG`] bytes wait, so a slow
//! reader slows the process. While nobody reads (the frakti daemon is
//! restarting) the process keeps running: what it writes waits here, up
//! to the bound; beyond it the bytes are dropped and counted, and the next
//! reader gets a [`Piece::Lost`] at the place of the gap, before what
//! followed it.
//!
//! An *acknowledging* reader (the daemon's log pump) confirms how far it
//! has kept the stream for good; until then what it was sent stays here
//! (within the same bound) and is sent again to the reader that resumes
//! from the confirmed offset. So output in flight when the daemon is
//! killed (in the connection, or read but not yet written to the log) is
//! not lost. Other readers (exec, attach) forget what they were sent.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};

use crate::io::FdIo;

/// Bytes that may wait for a reader or for its confirmation.
pub const MAX_BACKLOG: usize = 1 << 20;
/// The most read from the pipe at once (and sent in one OutputChunk).
pub const CHUNK: usize = 32 * 1024;

/// What a reader gets, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Data(Vec<u8>),
    /// This many bytes were dropped here while nobody read.
    Lost(u64),
}

impl Piece {
    /// How many stream offsets the piece spans.
    fn span(&self) -> u64 {
        match self {
            Piece::Data(data) => data.len() as u64,
            Piece::Lost(n) => *n,
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Piece::Data(data) => data.len(),
            Piece::Lost(_) => 0,
        }
    }

    /// Drops the first `n` offsets (n < span).
    fn skip(&mut self, n: u64) {
        match self {
            // n < data.len(), which is a usize.
            Piece::Data(data) => drop(data.drain(..n as usize)),
            Piece::Lost(lost) => *lost -= n,
        }
    }
}

/// A piece and the stream offset of its first byte.
pub type Placed = (u64, Piece);

/// How a reader attaches.
#[derive(Debug, Clone, Copy)]
pub struct Attach {
    /// The reader has the stream before this offset.
    pub from: u64,
    /// The reader confirms what it keeps ([`Output::acknowledge`]); it
    /// replaces a reader still attached (the connection of a killed daemon
    /// may not be noticed as gone yet).
    pub acknowledging: bool,
}

/// The attached reader.
#[derive(Debug, Clone, Copy)]
struct Reader {
    generation: u64,
    acknowledging: bool,
}

#[derive(Debug, Default)]
struct Backlog {
    /// Not sent yet.
    pieces: VecDeque<Piece>,
    /// Sent to an acknowledging reader, not confirmed yet.
    sent: VecDeque<Piece>,
    /// The stream offset of the first byte of `sent` (or of `pieces` when
    /// nothing waits for confirmation).
    start: u64,
    /// The offsets `sent` spans.
    sent_span: u64,
    /// Data bytes in `pieces` and `sent`.
    bytes: usize,
    /// The pipe reached its end (or failed): nothing more will come.
    ended: bool,
    reader: Option<Reader>,
    /// Counts attachments, so a replaced reader knows it was.
    generation: u64,
}

impl Backlog {
    /// Keeps `data`, or counts it as lost when the backlog is full.
    fn push(&mut self, data: Vec<u8>) {
        if self.bytes.saturating_add(data.len()) <= MAX_BACKLOG {
            self.bytes += data.len();
            self.pieces.push_back(Piece::Data(data));
            return;
        }
        let lost = data.len() as u64;
        if let Some(Piece::Lost(n)) = self.pieces.back_mut() {
            *n = n.saturating_add(lost);
        } else {
            self.pieces.push_back(Piece::Lost(lost));
        }
    }

    /// The offset just past everything kept.
    fn end(&self) -> u64 {
        self.pieces
            .iter()
            .fold(self.start.saturating_add(self.sent_span), |end, p| {
                end.saturating_add(p.span())
            })
    }

    fn attach(&mut self, how: Attach) -> Result<u64, AttachError> {
        match self.reader {
            Some(_) if !how.acknowledging => return Err(AttachError::AlreadyRead),
            _ => {}
        }
        let end = self.end();
        if how.from > end {
            return Err(AttachError::Beyond {
                from: how.from,
                end,
            });
        }
        // What the last reader was sent and did not confirm comes again.
        while let Some(piece) = self.sent.pop_back() {
            self.pieces.push_front(piece);
        }
        self.sent_span = 0;
        self.forget_until(how.from, false);
        self.generation += 1;
        self.reader = Some(Reader {
            generation: self.generation,
            acknowledging: how.acknowledging,
        });
        Ok(self.generation)
    }

    /// Forgets what lies before `offset`, in `sent` or else in `pieces`.
    fn forget_until(&mut self, offset: u64, in_sent: bool) {
        let queue = if in_sent {
            &mut self.sent
        } else {
            &mut self.pieces
        };
        while self.start < offset {
            let Some(front) = queue.front_mut() else {
                return;
            };
            let span = front.span();
            let wanted = offset - self.start;
            if span > wanted {
                self.bytes -= front.data_len();
                front.skip(wanted);
                self.bytes += front.data_len();
                self.start = offset;
                if in_sent {
                    self.sent_span -= wanted;
                }
                return;
            }
            self.bytes -= front.data_len();
            queue.pop_front();
            self.start += span;
            if in_sent {
                self.sent_span -= span;
            }
        }
    }

    fn current(&self, generation: u64) -> Option<Reader> {
        self.reader.filter(|r| r.generation == generation)
    }

    /// The next piece for the reader of `generation`, kept until confirmed
    /// when it acknowledges.
    fn next(&mut self, reader: Reader) -> Option<Placed> {
        let piece = self.pieces.pop_front()?;
        let offset = self.start.saturating_add(self.sent_span);
        if reader.acknowledging {
            self.sent_span += piece.span();
            self.sent.push_back(piece.clone());
        } else {
            self.bytes -= piece.data_len();
            self.start += piece.span();
        }
        Some((offset, piece))
    }

    /// A piece a non-acknowledging reader could not take goes back.
    fn unpop(&mut self, piece: Piece) {
        self.bytes += piece.data_len();
        self.start -= piece.span();
        self.pieces.push_front(piece);
    }
}

#[derive(Debug, Default)]
struct Shared {
    backlog: Mutex<Backlog>,
    /// Something was added, taken or confirmed, or a reader came or went.
    changed: Notify,
}

/// One output stream of a process; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Output {
    shared: Arc<Shared>,
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Backlog> {
    shared.backlog.lock().unwrap_or_else(|e| e.into_inner())
}

impl Output {
    /// Starts reading `fd` into the backlog, `chunk` bytes at a time.
    /// Must be called within the tokio runtime.
    pub fn spawn(fd: FdIo, chunk: usize) -> Output {
        let output = Output::default();
        tokio::spawn(keep(fd, output.shared.clone(), chunk));
        output
    }

    /// A stream that has ended already (a terminal's stderr).
    pub fn ended() -> Output {
        let output = Output::default();
        lock(&output.shared).ended = true;
        output
    }

    /// Sends the stream's pieces from `how.from` to `tx` until its end
    /// (then `tx` is dropped), until `tx`'s receiver goes away or until
    /// another reader replaces this one. Returns the reader's generation,
    /// which its confirmations name.
    pub fn drain(&self, how: Attach, tx: mpsc::Sender<Placed>) -> Result<u64, AttachError> {
        let reader = {
            let mut backlog = lock(&self.shared);
            let generation = backlog.attach(how)?;
            Reader {
                generation,
                acknowledging: how.acknowledging,
            }
        };
        self.shared.changed.notify_waiters();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            read(&shared, reader, tx).await;
            let mut backlog = lock(&shared);
            if backlog.current(reader.generation).is_some() {
                backlog.reader = None;
            }
            drop(backlog);
            shared.changed.notify_waiters();
        });
        Ok(reader.generation)
    }

    /// The reader of `generation` has kept everything before `offset` for
    /// good: it need not come again.
    pub fn acknowledge(&self, generation: u64, offset: u64) {
        let mut backlog = lock(&self.shared);
        if backlog.current(generation).is_none() {
            return;
        }
        let confirmable = backlog.start.saturating_add(backlog.sent_span);
        backlog.forget_until(offset.min(confirmable), true);
        drop(backlog);
        self.shared.changed.notify_waiters();
    }
}

/// Why a reader cannot attach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the stream already has a reader")]
    AlreadyRead,
    #[error("the reader claims the stream up to offset {from}, but it has only reached {end}")]
    Beyond { from: u64, end: u64 },
}

async fn read(shared: &Shared, reader: Reader, tx: mpsc::Sender<Placed>) {
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let next = {
            let mut backlog = lock(shared);
            if backlog.current(reader.generation).is_none() {
                return; // Replaced.
            }
            match backlog.next(reader) {
                Some(placed) => Some(placed),
                None if backlog.ended => return,
                None => None,
            }
        };
        let Some(placed) = next else {
            tokio::select! {
                () = changed => continue,
                () = tx.closed() => return,
            }
        };
        shared.changed.notify_waiters();
        if let Err(mpsc::error::SendError((_, piece))) = tx.send(placed).await {
            // An acknowledging reader's piece waits in `sent` for the next.
            let mut backlog = lock(shared);
            if !reader.acknowledging && backlog.current(reader.generation).is_some() {
                backlog.unpop(piece);
            }
            return;
        }
    }
}

/// Reads the pipe into the backlog until its end.
async fn keep(fd: FdIo, shared: Arc<Shared>, chunk: usize) {
    let mut buf = vec![0u8; chunk];
    loop {
        // With a reader attached, a full backlog waits for it.
        loop {
            let changed = shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let backlog = lock(&shared);
                if backlog.reader.is_none() || backlog.bytes < MAX_BACKLOG {
                    break;
                }
            }
            changed.await;
        }
        let read = fd.read(&mut buf).await;
        let mut backlog = lock(&shared);
        match read {
            Ok(0) => backlog.ended = true,
            Ok(n) => backlog.push(buf[..n].to_vec()),
            Err(e) => {
                // EIO: a terminal whose every slave descriptor closed.
                if e.raw_os_error() != Some(libc::EIO) {
                    tracing::warn!("reading process output: {e}");
                }
                backlog.ended = true;
            }
        }
        let ended = backlog.ended;
        drop(backlog);
        shared.changed.notify_waiters();
        if ended {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
