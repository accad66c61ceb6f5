//! The console's bytes leave the vCPU thread through a bounded buffer: a
//! writer thread of its own does the writes that may block (a stdout pipe
//! nobody reads, a slow disk), and when the buffer is full the guest's
//! bytes are dropped and counted, never waited for.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::seccomp::{self, ThreadKind};

/// Bytes the console holds while its writer is behind.
pub const CAPACITY: usize = 256 * 1024;
/// How long the VMM's exit waits for what is still buffered to be written.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Pending {
    bytes: VecDeque<u8>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
    dropped: Arc<AtomicU64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The vCPU's side: writes never block.
pub struct BoundedWriter {
    shared: Arc<Shared>,
    /// Says when the writer thread has written everything and ended.
    finished: mpsc::Receiver<()>,
}

impl BoundedWriter {
    /// Starts the writer thread over `out` (with its seccomp filter when
    /// `with_seccomp`).
    pub fn spawn(out: Box<dyn Write + Send>, with_seccomp: bool) -> io::Result<BoundedWriter> {
        let shared = Arc::new(Shared::default());
        let (done, finished) = mpsc::sync_channel(1);
        let theirs = shared.clone();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                if with_seccomp {
                    if let Err(e) = seccomp::apply(ThreadKind::Console) {
                        tracing::error!(
                            "console output stopped: {}",
                            frakti_proto::error_chain(&e)
                        );
                        return;
                    }
                }
                write_out(&theirs, out);
                let _ = done.send(());
            })?;
        Ok(BoundedWriter { shared, finished })
    }

    /// Console bytes dropped because the writer was behind.
    pub fn dropped(&self) -> Arc<AtomicU64> {
        self.shared.dropped.clone()
    }
}

/// The writer thread: what is pending, written out, until closed and empty.
fn write_out(shared: &Shared, mut out: Box<dyn Write + Send>) {
    loop {
        let chunk: Vec<u8> = {
            let mut pending = shared.lock();
            while pending.bytes.is_empty() && !pending.closed {
                pending = shared
                    .ready
                    .wait(pending)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if pending.bytes.is_empty() {
                return;
            }
            pending.bytes.drain(..).collect()
        };
        // A console nobody reads (closed stdout) must not stop anything.
        let _ = out.write_all(&chunk);
        let _ = out.flush();
    }
}

impl Write for BoundedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut pending = self.shared.lock();
        let room = CAPACITY.saturating_sub(pending.bytes.len());
        let kept = buf.len().min(room);
        pending.bytes.extend(&buf[..kept]);
        drop(pending);
        if kept < buf.len() {
            let lost = (buf.len() - kept) as u64;
            self.shared.dropped.fetch_add(lost, Ordering::Relaxed);
        }
        if kept > 0 {
            self.shared.ready.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BoundedWriter {
    /// Lets the writer finish what is buffered, for a bounded time (a
    /// stuck stdout must not keep the VMM from exiting).
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_one();
        if self.finished.recv_timeout(DRAIN_TIMEOUT).is_err() {
            let left = self.shared.lock().bytes.len();
            tracing::warn!("console: {left} bytes not written within {DRAIN_TIMEOUT:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Output that blocks every write until the gate opens.
    #[derive(Clone, Default)]
    struct Gated {
        open: Arc<(Mutex<bool>, Condvar)>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (open, changed) = &*self.open;
            let mut open = open.lock().unwrap();
            while !*open {
                open = changed.wait(open).unwrap();
            }
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_drops_and_counts_instead_of_blocking() {
        let out = Gated::default();
        let mut writer = BoundedWriter::spawn(Box::new(out.clone()), false).unwrap();
        let dropped = writer.dropped();
        let input: Vec<u8> = (0..4 * CAPACITY).map(|i| (i % 251) as u8).collect();
        let started = Instant::now();
        for chunk in input.chunks(1000) {
            assert_eq!(writer.write(chunk).unwrap(), chunk.len());
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the writes waited for the output"
        );
        let lost = dropped.load(Ordering::Relaxed) as usize;
        // The writer thread holds at most one buffer-full while it blocks.
        assert!(
            lost >= input.len() - 2 * CAPACITY && lost < input.len(),
            "{lost} dropped"
        );
        {
            let (open, changed) = &*out.open;
            *open.lock().unwrap() = true;
            changed.notify_all();
        }
        drop(writer);
        let written = out.written.lock().unwrap();
        assert_eq!(written.len() + lost, input.len());
        // What was kept is a prefix of the input, in order.
        assert_eq!(written[..], input[..written.len()]);
    }

    #[test]
    fn everything_is_written_when_the_output_keeps_up() {
        let out = Gated::default();
        *out.open.0.lock().unwrap() = true;
        let mut writer = BoundedWriter::spawn(Box::new(out.clone()), false).unwrap();
        writer.write_all(b"OK\n").unwrap();
        drop(writer);
        assert_eq!(&out.written.lock().unwrap()[..], b"OK\n");
    }
}
