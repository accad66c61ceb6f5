//! `blockio FILE MODE BLOCK_SIZE BYTES`: fio-style I/O on one file with
//! O_DIRECT (the page cache would otherwise measure memory, not the block
//! path): sequential or random, read or write, timed inside the caller so
//! the exec that started it does not count. Random offsets are aligned to
//! the block size and spread over the whole file ([`Pattern`] 1);
//! writes end with fdatasync, which is timed too.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use crate::Pattern;

/// O_DIRECT needs buffers, offsets and lengths aligned to the device's
/// logical block; 4 KiB covers every device we use.
pub const ALIGN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    SeqWrite,
    SeqRead,
    RandWrite,
    RandRead,
}

impl Mode {
    pub fn parse(text: &str) -> io::Result<Mode> {
        Ok(match text {
            "seq-write" => Mode::SeqWrite,
            "seq-read" => Mode::SeqRead,
            "rand-write" => Mode::RandWrite,
            "rand-read" => Mode::RandRead,
            _ => {
                return Err(io::Error::other(format!(
                    "mode {text:?} is not seq-write, seq-read, rand-write or rand-read"
                )));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::SeqWrite => "seq-write",
            Mode::SeqRead => "seq-read",
            Mode::RandWrite => "rand-write",
            Mode::RandRead => "rand-read",
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub mode: Mode,
    pub block_size: usize,
    pub bytes: u64,
    pub ops: u64,
    pub secs: f64,
}

impl Report {
    /// One JSON line (the tool's result line).
    pub fn json(&self) -> String {
        format!(
            "{{\"mode\":\"{}\",\"block_size\":{},\"bytes\":{},\"ops\":{},\"secs\":{:.6}}}",
            self.mode.name(),
            self.block_size,
            self.bytes,
            self.ops,
            self.secs
        )
    }
}

/// A `len`-byte buffer aligned to [`ALIGN`], of pattern bytes, carved
/// out of a larger allocation (no unsafe allocation needed).
struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    fn new(len: usize) -> io::Result<AlignedBuffer> {
        let total = len
            .checked_add(ALIGN)
            .ok_or_else(|| io::Error::other("block size too large"))?;
        let mut storage = vec![0u8; total];
        let start = storage.as_ptr().align_offset(ALIGN);
        Pattern::new(0).fill(&mut storage[start..start + len]);
        Ok(AlignedBuffer {
            storage,
            start,
            len,
        })
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

fn check_sizes(block_size: usize, bytes: u64) -> io::Result<u64> {
    if block_size == 0 || block_size % ALIGN != 0 {
        return Err(io::Error::other(format!(
            "block size {block_size} is not a positive multiple of {ALIGN}"
        )));
    }
    let block = block_size as u64;
    if bytes == 0 || bytes % block != 0 {
        return Err(io::Error::other(format!(
            "bytes {bytes} is not a positive multiple of the block size {block_size}"
        )));
    }
    Ok(bytes / block)
}

fn open(path: &Path, mode: Mode) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.custom_flags(libc::O_DIRECT);
    match mode {
        Mode::SeqWrite => options.write(true).create(true).truncate(true),
        Mode::RandWrite => options.write(true),
        Mode::SeqRead | Mode::RandRead => options.read(true),
    };
    options
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Runs `mode` on `path`: `bytes` in `block_size` operations. Random modes
/// need the file to exist with at least one block (a seq-write makes it).
pub fn run(path: &Path, mode: Mode, block_size: usize, bytes: u64) -> io::Result<Report> {
    let ops = check_sizes(block_size, bytes)?;
    let file = open(path, mode)?;
    let block = block_size as u64;
    let blocks_in_file = file.metadata()?.len() / block;
    if matches!(mode, Mode::RandRead | Mode::RandWrite | Mode::SeqRead) && blocks_in_file == 0 {
        return Err(io::Error::other(format!(
            "{} has no whole block of {block_size} bytes to {}",
            path.display(),
            mode.name()
        )));
    }
    let mut buffer = AlignedBuffer::new(block_size)?;
    let mut offsets = Pattern::new(1);
    let started = Instant::now();
    for op in 0..ops {
        let offset = match mode {
            // A sequential read wraps around a file shorter than `bytes`.
            Mode::SeqWrite => op * block,
            Mode::SeqRead => (op % blocks_in_file) * block,
            Mode::RandWrite | Mode::RandRead => (offsets.next_word() % blocks_in_file) * block,
        };
        match mode {
            Mode::SeqWrite | Mode::RandWrite => file.write_all_at(buffer.bytes(), offset)?,
            Mode::SeqRead | Mode::RandRead => file.read_exact_at(buffer.bytes_mut(), offset)?,
        }
    }
    if matches!(mode, Mode::SeqWrite | Mode::RandWrite) {
        file.sync_data()?;
    }
    Ok(Report {
        mode,
        block_size,
        bytes,
        ops,
        secs: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dir on a filesystem that takes O_DIRECT (the build's target dir;
    /// tmpfs refuses it on older kernels).
    fn dir() -> tempfile::TempDir {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&target).unwrap();
        tempfile::tempdir_in(target).unwrap()
    }

    #[test]
    fn every_mode_moves_the_bytes_it_reports() {
        let dir = dir();
        let file = dir.path().join("f");
        let written = run(&file, Mode::SeqWrite, 8192, 64 * 1024).unwrap();
        assert_eq!((written.ops, written.bytes), (8, 64 * 1024));
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 64 * 1024);
        for mode in [Mode::SeqRead, Mode::RandWrite, Mode::RandRead] {
            let report = run(&file, mode, 4096, 32 * 1024).unwrap();
            assert_eq!(report.ops, 8, "{mode:?}");
            assert!(
                report
                    .json()
                    .starts_with(&format!("{{\"mode\":\"{}\"", mode.name()))
            );
        }
        // Random writes stay inside the file.
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 64 * 1024);
    }

    #[test]
    fn bad_sizes_modes_and_files_are_errors() {
        let dir = dir();
        let file = dir.path().join("f");
        assert!(run(&file, Mode::SeqWrite, 1000, 4000).is_err());
        assert!(run(&file, Mode::SeqWrite, 0, 4096).is_err());
        assert!(run(&file, Mode::SeqWrite, 4096, 5000).is_err());
        assert!(run(&file, Mode::SeqWrite, 4096, 0).is_err());
        assert!(Mode::parse("randwrite").is_err());
        let missing = run(&dir.path().join("none"), Mode::RandRead, 4096, 4096).unwrap_err();
        assert!(missing.to_string().contains("none"), "{missing}");
        std::fs::write(&file, b"short").unwrap();
        let short = run(&file, Mode::RandRead, 4096, 4096).unwrap_err();
        assert!(short.to_string().contains("no whole block"), "{short}");
    }
}
