//! How far each output stream of a container is in its log file, saved
//! after every write so that a daemon killed at any point resumes the
//! streams exactly: the log file is cut back to the size recorded with
//! the offsets (a record written after the last save is dropped: the agent
//! sends its bytes again, since they were never confirmed to it).
//!
//! The file is 40 bytes, rewritten in place with one `pwrite` (a process
//! killed during it cannot leave half of it): a magic, the stdout and
//! stderr offsets, the log file's inode and its size, little-endian.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::StreamKind;

const MAGIC: &[u8; 8] = b"frakti-L";
const LEN: usize = 40;

/// Where the streams stand in the log file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The stream offsets up to which stdout and stderr are in the file.
    pub stdout: u64,
    pub stderr: u64,
    /// The log file (inode) and its size once those offsets were written.
    pub ino: u64,
    pub size: u64,
}

impl Progress {
    pub fn offset(&self, stream: StreamKind) -> u64 {
        match stream {
            StreamKind::Stdout => self.stdout,
            StreamKind::Stderr => self.stderr,
        }
    }

    pub fn set_offset(&mut self, stream: StreamKind, offset: u64) {
        match stream {
            StreamKind::Stdout => self.stdout = offset,
            StreamKind::Stderr => self.stderr = offset,
        }
    }

    /// Records where `file` now ends.
    pub fn set_file(&mut self, file: &File) -> io::Result<()> {
        let meta = file.metadata()?;
        self.ino = meta.ino();
        self.size = meta.len();
        Ok(())
    }

    pub fn encode(&self) -> [u8; LEN] {
        let mut bytes = [0u8; LEN];
        bytes[..8].copy_from_slice(MAGIC);
        for (i, value) in [self.stdout, self.stderr, self.ino, self.size]
            .into_iter()
            .enumerate()
        {
            bytes[8 + 8 * i..16 + 8 * i].copy_from_slice(&value.to_le_bytes());
        }
        bytes
    }

    /// `None` unless `bytes` is exactly what [`encode`](Self::encode) makes.
    pub fn decode(bytes: &[u8]) -> Option<Progress> {
        if bytes.len() != LEN || &bytes[..8] != MAGIC {
            return None;
        }
        let word = |i: usize| -> Option<u64> {
            let field = bytes.get(8 + 8 * i..16 + 8 * i)?;
            Some(u64::from_le_bytes(field.try_into().ok()?))
        };
        Some(Progress {
            stdout: word(0)?,
            stderr: word(1)?,
            ino: word(2)?,
            size: word(3)?,
        })
    }
}

/// The saved progress at `path`: `Ok(None)` when there is none (a new
/// container) or it is unreadable as progress (then the streams resume
/// wherever the agent is).
pub fn load(path: &Path) -> io::Result<Option<Progress>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let progress = Progress::decode(&bytes);
            if progress.is_none() {
                tracing::warn!(
                    "{}: not a log progress file ({} bytes): ignored",
                    path.display(),
                    bytes.len()
                );
            }
            Ok(progress)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens (creating, mode 0600) the progress file at `path`.
pub fn open(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    file.set_len(LEN as u64)?;
    Ok(file)
}

pub fn save(file: &File, progress: &Progress) -> io::Result<()> {
    file.write_all_at(&progress.encode(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_round_trips_and_malformed_bytes_are_refused() {
        let progress = Progress {
            stdout: 1,
            stderr: u64::MAX,
            ino: 77,
            size: 4096,
        };
        let bytes = progress.encode();
        assert_eq!(Progress::decode(&bytes), Some(progress));
        assert_eq!(Progress::decode(&bytes[..39]), None);
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(Progress::decode(&longer), None);
        let mut bad_magic = bytes;
        bad_magic[0] ^= 1;
        assert_eq!(Progress::decode(&bad_magic), None);
        assert_eq!(Progress::decode(&[]), None);
    }

    #[test]
    fn load_tells_a_missing_file_from_a_garbled_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log-progress");
        assert_eq!(load(&path).unwrap(), None);
        std::fs::write(&path, b"garbage").unwrap();
        assert_eq!(load(&path).unwrap(), None);
        let file = open(&path).unwrap();
        let progress = Progress {
            stdout: 5,
            ..Progress::default()
        };
        save(&file, &progress).unwrap();
        assert_eq!(load(&path).unwrap(), Some(progress));
    }
}
