//! What the guest side and the host side of a traffic test agree on: the
//! bytes each stream carries, so either end can check them without
//! sending checksums around.

pub mod blockio;
pub mod tree;

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::thread;

/// A stream's bytes: a xorshift sequence seeded by the stream's number.
/// `fill` continues where the previous call stopped.
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
}

impl Pattern {
    pub fn new(stream: u64) -> Pattern {
        Pattern {
            // Never zero (xorshift's fixed point).
            state: stream.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        }
    }

    /// The next 8 bytes of the stream, as a number.
    pub fn next_word(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    /// Fills `buf` with the next bytes. Callers keep `buf` lengths a
    /// multiple of 8 except at a stream's end, so both ends cut the
    /// sequence the same way.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_word().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Checks received bytes against a stream's pattern, whatever sizes they
/// arrive in.
#[derive(Debug)]
pub struct Checker {
    pattern: Pattern,
    word: [u8; 8],
    used: usize,
    pub received: u64,
    pub mismatch_at: Option<u64>,
}

impl Checker {
    pub fn new(stream: u64) -> Checker {
        Checker {
            pattern: Pattern::new(stream),
            word: [0; 8],
            used: 8,
            received: 0,
            mismatch_at: None,
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        for &byte in data {
            if self.used == 8 {
                self.pattern.fill(&mut self.word);
                self.used = 0;
            }
            if byte != self.word[self.used] && self.mismatch_at.is_none() {
                self.mismatch_at = Some(self.received);
            }
            self.used += 1;
            self.received += 1;
        }
    }

    /// Whether exactly `expected` bytes arrived, all as the pattern says.
    pub fn is_complete(&self, expected: u64) -> bool {
        self.received == expected && self.mismatch_at.is_none()
    }
}

/// Bytes per write: a multiple of 8, see [`Pattern::fill`].
pub const CHUNK: usize = 64 * 1024;

/// Sends `bytes` of stream `seed`'s pattern on one thread while checking
/// the echo on this one.
pub fn send_and_check(stream: UnixStream, seed: u64, bytes: u64) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let sender = thread::spawn(move || -> io::Result<()> {
        send_pattern(&mut writer, seed, bytes)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut checker = Checker::new(seed);
    let mut reader = stream;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        checker.feed(&buf[..n]);
    }
    join(sender)?;
    if !checker.is_complete(bytes) {
        return Err(io::Error::other(format!(
            "stream {seed}: {} of {bytes} bytes back, first mismatch at {:?}",
            checker.received, checker.mismatch_at
        )));
    }
    Ok(())
}

pub fn send_pattern(out: &mut impl Write, seed: u64, bytes: u64) -> io::Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        pattern.fill(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Joins a worker, turning its panic into an error.
pub fn join<T>(worker: thread::JoinHandle<io::Result<T>>) -> io::Result<T> {
    worker
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("a worker thread panicked")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker_accepts_the_pattern_in_any_split_and_spots_changes() {
        let mut bytes = vec![0u8; 1000];
        Pattern::new(7).fill(&mut bytes);
        let mut checker = Checker::new(7);
        for piece in bytes.chunks(13) {
            checker.feed(piece);
        }
        assert!(checker.is_complete(1000));
        let mut other = Checker::new(8);
        other.feed(&bytes);
        assert!(!other.is_complete(1000));
        bytes[500] ^= 1;
        let mut checker = Checker::new(7);
        checker.feed(&bytes);
        assert_eq!(checker.mismatch_at, Some(500));
    }
}
