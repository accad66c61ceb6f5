//! Storage in the guest: container root filesystems ([`rootfs`]),
//! virtio-blk disks found by serial ([`disks`]), and small files copied in
//! from the host ([`files`]). This file holds what they share: the errors,
//! the path checks and the [`Storage`] they hang off.

mod disks;
mod files;
mod rootfs;

use std::collections::HashMap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;

pub use disks::{DiskRequest, DiskUsage, find_by_serial};
pub use files::{CopyFile, FileKind};
pub use rootfs::{PreparedRootfs, RootfsSource, prepare_rootfs, unmount_all};

/// The most ReadFile returns of a file.
pub const MAX_READ_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// Checks a name used as one path component (container, exec, disk ids).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A relative path without `..`, for paths the host names below a root.
pub fn relative_path(path: &str) -> Result<PathBuf, Error> {
    let p = Path::new(path);
    if path.is_empty()
        || path.contains('\0')
        || !p
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(Error::Invalid(format!(
            "path '{path}' must be relative, without '..'"
        )));
    }
    Ok(p.to_path_buf())
}

/// Disks and copied files of the guest.
pub struct Storage {
    state_dir: PathBuf,
    sys_block: PathBuf,
    dev: PathBuf,
    disks: Mutex<HashMap<String, disks::Disk>>,
    /// Version last written per copied path.
    versions: Mutex<HashMap<PathBuf, u64>>,
}

impl Storage {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            sys_block: PathBuf::from("/sys/block"),
            dev: PathBuf::from("/dev"),
            disks: Default::default(),
            versions: Default::default(),
        }
    }

    pub fn disks_dir(&self) -> PathBuf {
        self.state_dir.join("disks")
    }

    pub fn files_dir(&self) -> PathBuf {
        self.state_dir.join("files")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("c1"));
        assert!(valid_id("a.b_c-D9"));
        assert!(!valid_id(""));
        assert!(!valid_id(".."));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"x".repeat(129)));
    }

    #[test]
    fn relative_paths() {
        assert!(relative_path("a/b").is_ok());
        assert!(relative_path("/a").is_err());
        assert!(relative_path("a/../b").is_err());
        assert!(relative_path("").is_err());
    }
}
