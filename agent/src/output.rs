//! A process's output stream, read all the time by the agent into a
//! bounded backlog, whoever reads it (ReadOutput) or not.
//!
//! While a reader is attached, the backlog is back-pressure: the agent
//! stops reading the pipe once [`MAX_BACKLOG`] bytes wait, so a slow
//! reader slows the process. While nobody reads (the frakti daemon is
//! restarting) the process keeps running: what it writes waits here, up
//! to the bound; beyond it the bytes are dropped and counted, and the next
//! reader gets a [`Piece::Lost`] at the place of the gap, before what
//! followed it. A chunk that a reader could not take (it went away) goes
//! back to the front: nothing read from the pipe is lost that way.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};

use crate::io::FdIo;

/// Bytes that may wait for a reader.
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

#[derive(Debug, Default)]
struct Backlog {
    pieces: VecDeque<Piece>,
    /// Data bytes in `pieces`.
    bytes: usize,
    /// The pipe reached its end (or failed): nothing more will come.
    ended: bool,
    /// A reader is attached.
    reading: bool,
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

    fn pop(&mut self) -> Option<Piece> {
        let piece = self.pieces.pop_front()?;
        if let Piece::Data(data) = &piece {
            self.bytes -= data.len();
        }
        Some(piece)
    }

    fn unpop(&mut self, piece: Piece) {
        if let Piece::Data(data) = &piece {
            self.bytes += data.len();
        }
        self.pieces.push_front(piece);
    }
}

#[derive(Debug, Default)]
struct Shared {
    backlog: Mutex<Backlog>,
    /// Something was added, taken, or a reader came or went.
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

    /// Sends the stream's pieces to `tx` until its end (then `tx` is
    /// dropped) or until `tx`'s receiver goes away. One reader at a time:
    /// `Err` when another is attached.
    pub fn drain(&self, tx: mpsc::Sender<Piece>) -> Result<(), AlreadyRead> {
        {
            let mut backlog = lock(&self.shared);
            if backlog.reading {
                return Err(AlreadyRead);
            }
            backlog.reading = true;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            read(&shared, tx).await;
            lock(&shared).reading = false;
            shared.changed.notify_waiters();
        });
        Ok(())
    }
}

/// Another reader is attached to the stream.
#[derive(Debug, thiserror::Error)]
#[error("the stream already has a reader")]
pub struct AlreadyRead;

async fn read(shared: &Shared, tx: mpsc::Sender<Piece>) {
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let next = {
            let mut backlog = lock(shared);
            match backlog.pop() {
                Some(piece) => Some(piece),
                None if backlog.ended => return,
                None => None,
            }
        };
        let Some(piece) = next else {
            tokio::select! {
                () = changed => continue,
                () = tx.closed() => return,
            }
        };
        shared.changed.notify_waiters();
        if let Err(mpsc::error::SendError(piece)) = tx.send(piece).await {
            lock(shared).unpop(piece);
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
                if !backlog.reading || backlog.bytes < MAX_BACKLOG {
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
mod tests {
    use super::*;

    #[test]
    fn a_full_backlog_counts_what_it_drops_in_place() {
        let mut backlog = Backlog::default();
        backlog.push(vec![1; MAX_BACKLOG - 10]);
        backlog.push(vec![2; 20]);
        backlog.push(vec![3; 30]);
        backlog.push(vec![4; 5]);
        assert_eq!(backlog.bytes, MAX_BACKLOG - 5);
        assert_eq!(backlog.pop(), Some(Piece::Data(vec![1; MAX_BACKLOG - 10])));
        assert_eq!(backlog.pop(), Some(Piece::Lost(50)));
        assert_eq!(backlog.pop(), Some(Piece::Data(vec![4; 5])));
        assert_eq!(backlog.pop(), None);
        assert_eq!(backlog.bytes, 0);
        backlog.unpop(Piece::Data(vec![9; 3]));
        assert_eq!(backlog.bytes, 3);
    }
}
