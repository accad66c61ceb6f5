//! A block device's backing: a raw image file or a host block device.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use super::request::{SECTOR_SHIFT, Segment};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open disk {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find the size of disk {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Most iovecs one preadv/pwritev takes (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

#[derive(Debug, Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// Drops `done` bytes from the front of `iovecs`; returns how many iovecs
/// were used up completely.
fn advance(iovecs: &mut [libc::iovec], mut done: usize) -> usize {
    let mut used = 0;
    for iov in iovecs {
        if done >= iov.iov_len {
            done -= iov.iov_len;
            used += 1;
        } else {
            // SAFETY: `done` is less than the iovec's length, so the new
            // base stays inside the same buffer.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(done) }.cast();
            iov.iov_len -= done;
            break;
        }
    }
    used
}

/// An open backing file and its size in 512-byte sectors. A trailing
/// partial sector is not accessible.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    sectors: u64,
    read_only: bool,
}

impl Disk {
    /// Opens `path` (a regular file or a block device), read-only or
    /// read-write.
    pub fn open(path: &Path, read_only: bool) -> Result<Disk, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Disk::from_file(file, path, read_only)
    }

    /// Wraps an already open file; `path` is for messages only.
    pub fn from_file(mut file: File, path: &Path, read_only: bool) -> Result<Disk, Error> {
        // Seeking to the end gives the size of block devices too, whose
        // metadata says 0.
        let bytes = file.seek(SeekFrom::End(0)).map_err(|source| Error::Size {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Disk {
            file,
            path: path.to_path_buf(),
            sectors: bytes >> SECTOR_SHIFT,
            read_only,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The byte offset of `sector`, if `len` bytes from there fit the disk.
    pub fn offset_of(&self, sector: u64, len: u32) -> Option<u64> {
        let sectors = u64::from(len).div_ceil(1 << SECTOR_SHIFT);
        let end = sector.checked_add(sectors)?;
        (end <= self.sectors).then_some(sector << SECTOR_SHIFT)
    }

    /// Reads from `offset` into the guest buffers `segments`.
    pub fn read_into(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[Segment],
    ) -> std::io::Result<()> {
        self.transfer(mem, offset, segments, Direction::Read)
    }

    /// Writes the guest buffers `segments` to `offset`.
    pub fn write_from(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[Segment],
    ) -> std::io::Result<()> {
        self.transfer(mem, offset, segments, Direction::Write)
    }

    /// Moves a whole request between the file and guest memory with
    /// positional vectored I/O: one syscall for all its segments (the
    /// guest splits a 1 MiB read into 4 KiB segments), short transfers
    /// continued where they stopped.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[Segment],
        direction: Direction,
    ) -> std::io::Result<()> {
        let mut slices = Vec::with_capacity(segments.len());
        for segment in segments {
            for slice in mem.get_slices(segment.addr, segment.len as usize) {
                slices.push(slice.map_err(std::io::Error::other)?);
            }
        }
        // The guards keep the host pointers valid while the kernel uses them.
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
        let mut iovecs: Vec<libc::iovec> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: g.len(),
            })
            .collect();
        let fd = self.file.as_raw_fd();
        let mut position = offset;
        let mut first = 0;
        while first < iovecs.len() {
            let pending = &iovecs[first..iovecs.len().min(first + IOV_MAX)];
            let offset = libc::off_t::try_from(position).map_err(std::io::Error::other)?;
            // SAFETY: every iovec points into guest memory that `guards`
            // keep mapped, with the length vm-memory checked for it.
            let done = unsafe {
                match direction {
                    Direction::Read => {
                        libc::preadv(fd, pending.as_ptr(), pending.len() as i32, offset)
                    }
                    Direction::Write => {
                        libc::pwritev(fd, pending.as_ptr(), pending.len() as i32, offset)
                    }
                }
            };
            if done < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            if done == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            position += done as u64;
            first += advance(&mut iovecs[first..], done as usize);
        }
        Ok(())
    }

    /// Makes written data durable (fdatasync).
    pub fn flush(&self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_transfers_resume_mid_iovec() {
        let mut buffer = [0u8; 12];
        let base = buffer.as_mut_ptr();
        let mut iovecs: Vec<libc::iovec> = buffer
            .chunks_mut(4)
            .map(|c| libc::iovec {
                iov_base: c.as_mut_ptr().cast(),
                iov_len: c.len(),
            })
            .collect();
        assert_eq!(advance(&mut iovecs, 6), 1);
        assert_eq!(iovecs[1].iov_len, 2);
        assert_eq!(iovecs[1].iov_base.cast::<u8>(), base.wrapping_add(6));
        assert_eq!(advance(&mut iovecs[1..], 2), 1);
        assert_eq!(advance(&mut iovecs[2..], 4), 1);
    }
}
