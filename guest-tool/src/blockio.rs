//! `blockio FILE MODE BLOCK_SIZE BYTES [DEPTH]`: fio-style I/O on one file (or
//! block device) with
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
    run_at_depth(path, mode, block_size, bytes, 1)
}

/// [`run`] with `depth` operations in flight: that many threads, each
/// doing its share of the random operations with offsets of its own (a
/// queue depth the device sees without io_uring in the guest). Depths
/// above 1 are for the random modes only.
pub fn run_at_depth(
    path: &Path,
    mode: Mode,
    block_size: usize,
    bytes: u64,
    depth: u64,
) -> io::Result<Report> {
    let ops = check_sizes(block_size, bytes)?;
    if depth == 0 || depth > 256 || (depth > 1 && !matches!(mode, Mode::RandRead | Mode::RandWrite))
    {
        return Err(io::Error::other(format!(
            "depth {depth}: 1 for any mode, up to 256 for rand-read and rand-write"
        )));
    }
    let file = std::sync::Arc::new(open(path, mode)?);
    let block = block_size as u64;
    // Seeking to the end sizes block devices too (their metadata says 0).
    let blocks_in_file = io::Seek::seek(&mut &*file, io::SeekFrom::End(0))? / block;
    if mode != Mode::SeqWrite && blocks_in_file == 0 {
        return Err(io::Error::other(format!(
            "{} has no whole block of {block_size} bytes to {}",
            path.display(),
            mode.name()
        )));
    }
    let started = Instant::now();
    let workers: Vec<_> = (0..depth)
        .map(|worker| {
            let file = file.clone();
            // This worker's share: ops spread as evenly as they go.
            let share = ops / depth + u64::from(worker < ops % depth);
            std::thread::spawn(move || {
                do_ops(&file, mode, block, blocks_in_file, share, worker + 1)
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| io::Error::other("an I/O thread panicked"))??;
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

/// `ops` operations of `block` bytes; random offsets from pattern `stream`.
fn do_ops(
    file: &File,
    mode: Mode,
    block: u64,
    blocks_in_file: u64,
    ops: u64,
    stream: u64,
) -> io::Result<()> {
    let len = usize::try_from(block).map_err(io::Error::other)?;
    let mut buffer = AlignedBuffer::new(len)?;
    let mut offsets = Pattern::new(stream);
    for op in 0..ops {
        let offset = match mode {
            Mode::SeqWrite => op * block,
            // A sequential read wraps around a file shorter than `bytes`.
            Mode::SeqRead => (op % blocks_in_file) * block,
            Mode::RandWrite | Mode::RandRead => (offsets.next_word() % blocks_in_file) * block,
        };
        match mode {
            Mode::SeqWrite | Mode::RandWrite => file.write_all_at(buffer.bytes(), offset)?,
            Mode::SeqRead | Mode::RandRead => file.read_exact_at(buffer.bytes_mut(), offset)?,
        }
    }
    Ok(())
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
    fn random_reads_at_depth_split_the_operations() {
        let dir = dir();
        let file = dir.path().join("f");
        run(&file, Mode::SeqWrite, 4096, 256 * 1024).unwrap();
        let report = run_at_depth(&file, Mode::RandRead, 4096, 100 * 4096, 8).unwrap();
        assert_eq!(report.ops, 100);
        assert!(run_at_depth(&file, Mode::SeqRead, 4096, 4096, 2).is_err());
        assert!(run_at_depth(&file, Mode::RandRead, 4096, 4096, 0).is_err());
        assert!(run_at_depth(&file, Mode::RandRead, 4096, 4096, 257).is_err());
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
