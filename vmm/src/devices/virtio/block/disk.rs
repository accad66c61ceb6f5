//! A block device's backing: a raw image file or a host block device.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestMemoryMmap};

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
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[Segment],
    ) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        for segment in segments {
            mem.read_exact_volatile_from(segment.addr, &mut self.file, segment.len as usize)
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// Writes the guest buffers `segments` to `offset`.
    pub fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[Segment],
    ) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        for segment in segments {
            mem.write_all_volatile_to(segment.addr, &mut self.file, segment.len as usize)
                .map_err(std::io::Error::other)?;
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
