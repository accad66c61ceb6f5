//! Small files copied in from the host (CopyFile, RemoveFile, ReadFile),
//! below the files directory, never following a container's symlinks.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;

use super::{Error, Storage, io_error, relative_path};

impl Storage {
    /// Writes a file, directory or symlink below the files directory
    /// unless a newer version is there; returns (guest path, written).
    pub fn copy_file(&self, file: &CopyFile) -> Result<(PathBuf, bool), Error> {
        let relative = relative_path(&file.path)?;
        let target = self.files_dir().join(&relative);
        let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        if file.version != 0 && versions.get(&relative).is_some_and(|v| *v >= file.version) {
            return Ok((target, false));
        }
        if file.mode & !0o7777 != 0 {
            return Err(Error::Invalid(format!("bad mode {:o}", file.mode)));
        }
        let parent = target.parent().unwrap_or(&target).to_path_buf();
        fs::create_dir_all(&parent).map_err(io_error("cannot create", &parent))?;
        let owner = |path: &Path| {
            std::os::unix::fs::lchown(path, Some(file.uid), Some(file.gid))
                .map_err(io_error("cannot chown", path))
        };
        let chmod = |path: &Path| {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(path, fs::Permissions::from_mode(file.mode))
                .map_err(io_error("cannot chmod", path))
        };
        match file.kind {
            FileKind::Directory => {
                fs::create_dir_all(&target).map_err(io_error("cannot create", &target))?;
                chmod(&target)?;
                owner(&target)?;
            }
            // Binds of the file see the change (a rename would not).
            FileKind::File if file.in_place && write_in_place(&target, file)? => {}
            FileKind::File | FileKind::Symlink => {
                // Written beside the target and renamed over it: a reader
                // sees the old or the new content, never a mix.
                let name = relative
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
                let temp = parent.join(format!(".{}.frakti-tmp", name.unwrap_or_default()));
                let _ = fs::remove_file(&temp);
                if file.kind == FileKind::File {
                    fs::write(&temp, &file.data).map_err(io_error("cannot write", &temp))?;
                    chmod(&temp)?;
                } else {
                    let link = std::ffi::OsStr::from_bytes(&file.data);
                    std::os::unix::fs::symlink(link, &temp)
                        .map_err(io_error("cannot create symlink", &temp))?;
                }
                owner(&temp)?;
                if target.is_dir() && !target.is_symlink() {
                    return Err(Error::Precondition(format!("{} is a directory", file.path)));
                }
                fs::rename(&temp, &target).map_err(io_error("cannot rename to", &target))?;
            }
        }
        versions.insert(relative, file.version);
        Ok((target, true))
    }

    pub fn remove_file(&self, path: &str) -> Result<(), Error> {
        let relative = relative_path(path)?;
        let target = self.files_dir().join(&relative);
        let meta =
            fs::symlink_metadata(&target).map_err(|_| Error::NotFound(format!("file {path}")))?;
        if meta.is_dir() {
            fs::remove_dir_all(&target).map_err(io_error("cannot remove", &target))?;
        } else {
            fs::remove_file(&target).map_err(io_error("cannot remove", &target))?;
        }
        let mut versions = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        versions.retain(|p, _| !p.starts_with(&relative));
        Ok(())
    }

    /// Reads a regular file below the files directory (what a container
    /// wrote to a copied file), at most `limit` bytes; returns (data,
    /// truncated). No symlink is followed, even one that stays inside.
    pub fn read_file(&self, path: &str, limit: usize) -> Result<(Vec<u8>, bool), Error> {
        let relative = relative_path(path)?;
        let target = self.files_dir().join(&relative);
        let file = open_beneath(&self.files_dir(), &relative, path)?;
        let meta = file.metadata().map_err(io_error("cannot stat", &target))?;
        if !meta.is_file() {
            return Err(Error::Precondition(format!("{path} is not a regular file")));
        }
        let mut data = Vec::new();
        let wanted = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
        file.take(wanted)
            .read_to_end(&mut data)
            .map_err(io_error("cannot read", &target))?;
        let truncated = data.len() > limit;
        data.truncate(limit);
        Ok((data, truncated))
    }
}

/// Opens `relative` (checked with [`relative_path`]) below `root` one
/// component at a time, refusing symlinks: what a container put in a
/// copied directory cannot lead the agent elsewhere. `shown` names the
/// path in errors.
fn open_beneath(root: &Path, relative: &Path, shown: &str) -> Result<fs::File, Error> {
    let names: Vec<&OsStr> = relative
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name),
            _ => None,
        })
        .collect();
    let Some((last, parents)) = names.split_last() else {
        return Err(Error::Invalid(format!("path '{shown}' names no file")));
    };
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let mut dir: OwnedFd = fs::File::open(root)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NotFound(format!("file {shown}")),
            _ => Error::Io {
                what: "cannot open",
                path: root.to_path_buf(),
                source: e,
            },
        })?
        .into();
    let mut walked = root.to_path_buf();
    for name in parents {
        walked.push(name);
        dir = openat(&dir, *name, flags | OFlag::O_DIRECTORY, Mode::empty())
            .map_err(|errno| open_error(errno, &walked, shown))?;
    }
    walked.push(last);
    // Non-blocking: a FIFO put there must not hang the call.
    let fd = openat(&dir, *last, flags | OFlag::O_NONBLOCK, Mode::empty())
        .map_err(|errno| open_error(errno, &walked, shown))?;
    Ok(fs::File::from(fd))
}

fn open_error(errno: Errno, path: &Path, shown: &str) -> Error {
    let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    match errno {
        Errno::ELOOP | Errno::ENOTDIR if is_link => {
            Error::Invalid(format!("path '{shown}' goes through a symlink"))
        }
        Errno::ENOENT | Errno::ENOTDIR => Error::NotFound(format!("file {shown}")),
        _ => Error::Io {
            what: "cannot open",
            path: path.to_path_buf(),
            source: errno.into(),
        },
    }
}

/// Writes `file` into the regular file already at `target` (same inode,
/// so binds of it see the change); false when there is none to write
/// into (absent, a symlink or not a regular file).
fn write_in_place(target: &Path, file: &CopyFile) -> Result<bool, Error> {
    // Absent, a symlink (O_NOFOLLOW), a directory, a FIFO without a
    // reader: nothing to write into; the replacing path decides.
    let Ok(mut out) = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(target)
    else {
        return Ok(false);
    };
    if !out
        .metadata()
        .map_err(io_error("cannot stat", target))?
        .is_file()
    {
        return Ok(false);
    }
    use std::os::unix::fs::PermissionsExt;
    out.set_len(0)
        .map_err(io_error("cannot truncate", target))?;
    out.write_all(&file.data)
        .map_err(io_error("cannot write", target))?;
    out.set_permissions(fs::Permissions::from_mode(file.mode))
        .map_err(io_error("cannot chmod", target))?;
    std::os::unix::fs::fchown(&out, Some(file.uid), Some(file.gid))
        .map_err(io_error("cannot chown", target))?;
    Ok(true)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
}

/// A validated-on-use CopyFile request.
pub struct CopyFile {
    pub path: String,
    pub kind: FileKind,
    pub data: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub version: u64,
    /// Write into an existing regular file rather than replace it.
    pub in_place: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(path: &str, data: &str, version: u64) -> CopyFile {
        CopyFile {
            path: path.into(),
            kind: FileKind::File,
            data: data.as_bytes().to_vec(),
            mode: 0o640,
            uid: 0,
            gid: 0,
            version,
            in_place: false,
        }
    }

    #[test]
    fn copy_file_versions_modes_and_removal() {
        use std::os::unix::fs::PermissionsExt;
        let state = tempfile::tempdir().unwrap();
        let storage = Storage::new(state.path().to_path_buf());
        let (path, written) = storage.copy_file(&copy("cm/app.conf", "v1", 5)).unwrap();
        assert!(written);
        assert_eq!(path, state.path().join("files/cm/app.conf"));
        assert_eq!(fs::read_to_string(&path).unwrap(), "v1");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        // Older or equal versions are ignored; newer ones replace.
        assert!(!storage.copy_file(&copy("cm/app.conf", "old", 4)).unwrap().1);
        assert!(
            !storage
                .copy_file(&copy("cm/app.conf", "same", 5))
                .unwrap()
                .1
        );
        assert!(storage.copy_file(&copy("cm/app.conf", "v2", 6)).unwrap().1);
        assert_eq!(fs::read_to_string(&path).unwrap(), "v2");
        let link = CopyFile {
            kind: FileKind::Symlink,
            data: b"app.conf".to_vec(),
            ..copy("cm/link", "", 0)
        };
        storage.copy_file(&link).unwrap();
        assert_eq!(
            fs::read_to_string(state.path().join("files/cm/link")).unwrap(),
            "v2"
        );
        assert!(matches!(
            storage.copy_file(&copy("../x", "", 0)),
            Err(Error::Invalid(_))
        ));
        storage.remove_file("cm").unwrap();
        assert!(!state.path().join("files/cm").exists());
        assert!(matches!(storage.remove_file("cm"), Err(Error::NotFound(_))));
        // After removal, any version writes again.
        assert!(storage.copy_file(&copy("cm/app.conf", "v1", 1)).unwrap().1);
    }

    #[test]
    fn in_place_copies_keep_the_file() {
        use std::os::unix::fs::MetadataExt;
        let state = tempfile::tempdir().unwrap();
        let storage = Storage::new(state.path().to_path_buf());
        let (path, _) = storage.copy_file(&copy("c/0", "first", 0)).unwrap();
        let inode = fs::metadata(&path).unwrap().ino();
        let in_place = |data: &str| CopyFile {
            in_place: true,
            mode: 0o600,
            ..copy("c/0", data, 0)
        };
        storage.copy_file(&in_place("2nd")).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.ino(), inode);
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!(fs::read_to_string(&path).unwrap(), "2nd");
        // Nothing to write into: written as usual.
        storage.copy_file(&in_place_at("c/new", "x")).unwrap();
        assert_eq!(
            fs::read_to_string(state.path().join("files/c/new")).unwrap(),
            "x"
        );
        let link = CopyFile {
            kind: FileKind::Symlink,
            data: b"0".to_vec(),
            ..copy("c/link", "", 0)
        };
        storage.copy_file(&link).unwrap();
        storage.copy_file(&in_place_at("c/link", "y")).unwrap();
        let link_path = state.path().join("files/c/link");
        assert!(!fs::symlink_metadata(&link_path).unwrap().is_symlink());
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "2nd",
            "not written through the link"
        );
    }

    fn in_place_at(path: &str, data: &str) -> CopyFile {
        CopyFile {
            in_place: true,
            ..copy(path, data, 0)
        }
    }

    #[test]
    fn read_file_paths_limits_and_absence() {
        let state = tempfile::tempdir().unwrap();
        let storage = Storage::new(state.path().to_path_buf());
        // No files directory yet.
        assert!(matches!(
            storage.read_file("c/0", 10),
            Err(Error::NotFound(_))
        ));
        storage.copy_file(&copy("c/1/log", "message", 0)).unwrap();
        assert_eq!(
            storage.read_file("c/1/log", 10).unwrap(),
            (b"message".to_vec(), false)
        );
        assert_eq!(
            storage.read_file("./c/1/log", 7).unwrap(),
            (b"message".to_vec(), false)
        );
        assert_eq!(
            storage.read_file("c/1/log", 4).unwrap(),
            (b"mess".to_vec(), true)
        );
        assert_eq!(storage.read_file("c/1/log", 0).unwrap(), (vec![], true));
        for missing in ["c/1/nothing", "c/2/log", "c/1/log/below"] {
            assert!(
                matches!(storage.read_file(missing, 10), Err(Error::NotFound(_))),
                "{missing}"
            );
        }
        for bad in ["", "/etc/passwd", "../x", "c/../c/1/log", ".", "a\0b"] {
            assert!(
                matches!(storage.read_file(bad, 10), Err(Error::Invalid(_))),
                "{bad:?}"
            );
        }
        // Symlinks are not followed, not even to a file inside.
        let files = state.path().join("files");
        std::os::unix::fs::symlink("1/log", files.join("c/link")).unwrap();
        std::os::unix::fs::symlink("1", files.join("c/dir-link")).unwrap();
        std::os::unix::fs::symlink("/etc", files.join("c/out")).unwrap();
        for through_link in ["c/link", "c/dir-link/log", "c/out/passwd"] {
            assert!(
                matches!(storage.read_file(through_link, 10), Err(Error::Invalid(_))),
                "{through_link}"
            );
        }
        assert!(matches!(
            storage.read_file("c/1", 10),
            Err(Error::Precondition(_))
        ));
        nix::unistd::mkfifo(&files.join("c/fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            storage.read_file("c/fifo", 10),
            Err(Error::Precondition(_))
        ));
    }
}
