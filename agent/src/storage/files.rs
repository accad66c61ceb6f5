//! Small files copied in from the host (CopyFile, RemoveFile, ReadFile),
//! below the files directory, never following a container's symlinks.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, fchmod, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, symlinkat, unlinkat};

use super::{Error, Storage, io_error, relative_path};

impl Storage {
    /// Writes a file, directory or symlink below the files directory
    /// unless a newer version is there; returns (guest path, written).
    /// Every step goes through a descriptor of the directory above, opened
    /// without following symlinks: a container that writes into a copied
    /// directory cannot redirect a later copy out of it.
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
        let files_dir = self.files_dir();
        fs::create_dir_all(&files_dir).map_err(io_error("cannot create", &files_dir))?;
        let (dir, last) = dir_beneath(&files_dir, &relative, &file.path, true)?;
        let mode = Mode::from_bits_truncate(file.mode);
        let owner = |fd: &OwnedFd| {
            fchownat(
                fd,
                "",
                Some(Uid::from_raw(file.uid)),
                Some(Gid::from_raw(file.gid)),
                AtFlags::AT_EMPTY_PATH,
            )
            .map_err(sys_error("cannot chown", &target))
        };
        match file.kind {
            FileKind::Directory => {
                match mkdirat(&dir, last, mode) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(sys_error("cannot create", &target)(e)),
                }
                let made = openat(&dir, last, DIR_FLAGS, Mode::empty())
                    .map_err(|errno| open_error(errno, &target, &file.path))?;
                fchmod(&made, mode).map_err(sys_error("cannot chmod", &target))?;
                owner(&made)?;
            }
            // Binds of the file see the change (a rename would not).
            FileKind::File if file.in_place && write_in_place(&dir, last, &target, file)? => {}
            FileKind::File | FileKind::Symlink => {
                // Written beside the target and renamed over it: a reader
                // sees the old or the new content, never a mix.
                let temp = format!(".{}.frakti-tmp", last.to_string_lossy());
                let _ = unlinkat(&dir, temp.as_str(), UnlinkatFlags::NoRemoveDir);
                if file.kind == FileKind::File {
                    let flags = OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_WRONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC;
                    let out = openat(&dir, temp.as_str(), flags, mode)
                        .map_err(sys_error("cannot create", &target))?;
                    fchmod(&out, mode).map_err(sys_error("cannot chmod", &target))?;
                    owner(&out)?;
                    fs::File::from(out)
                        .write_all(&file.data)
                        .map_err(io_error("cannot write", &target))?;
                } else {
                    symlinkat(OsStr::from_bytes(&file.data), &dir, temp.as_str())
                        .map_err(sys_error("cannot create symlink", &target))?;
                    fchownat(
                        &dir,
                        temp.as_str(),
                        Some(Uid::from_raw(file.uid)),
                        Some(Gid::from_raw(file.gid)),
                        AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(sys_error("cannot chown", &target))?;
                }
                if is_dir_at(&dir, last) {
                    let _ = unlinkat(&dir, temp.as_str(), UnlinkatFlags::NoRemoveDir);
                    return Err(Error::Precondition(format!("{} is a directory", file.path)));
                }
                renameat(&dir, temp.as_str(), &dir, last)
                    .map_err(sys_error("cannot rename to", &target))?;
            }
        }
        versions.insert(relative, file.version);
        Ok((target, true))
    }

    pub fn remove_file(&self, path: &str) -> Result<(), Error> {
        let relative = relative_path(path)?;
        let target = self.files_dir().join(&relative);
        let (dir, last) = dir_beneath(&self.files_dir(), &relative, path, false)?;
        if is_dir_at(&dir, last) {
            // Reached through the directory's descriptor; remove_dir_all
            // follows no symlink inside.
            let below = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(last);
            fs::remove_dir_all(&below).map_err(io_error("cannot remove", &target))?;
        } else {
            unlinkat(&dir, last, UnlinkatFlags::NoRemoveDir).map_err(|errno| match errno {
                Errno::ENOENT => Error::NotFound(format!("file {path}")),
                _ => sys_error("cannot remove", &target)(errno),
            })?;
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

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_DIRECTORY);

/// The directory holding `relative` (checked with [`relative_path`]) below
/// `root`, opened one component at a time, refusing symlinks (`create`:
/// missing directories are made), and the last component's name. `shown`
/// names the path in errors.
fn dir_beneath<'p>(
    root: &Path,
    relative: &'p Path,
    shown: &str,
    create: bool,
) -> Result<(OwnedFd, &'p OsStr), Error> {
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
        if create {
            match mkdirat(&dir, *name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(sys_error("cannot create", &walked)(e)),
            }
        }
        dir = openat(&dir, *name, DIR_FLAGS, Mode::empty())
            .map_err(|errno| open_error(errno, &walked, shown))?;
    }
    Ok((dir, last))
}

/// Opens `relative` below `root` without following any symlink.
fn open_beneath(root: &Path, relative: &Path, shown: &str) -> Result<fs::File, Error> {
    let (dir, last) = dir_beneath(root, relative, shown, false)?;
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    // Non-blocking: a FIFO put there must not hang the call.
    let fd = openat(&dir, last, flags | OFlag::O_NONBLOCK, Mode::empty())
        .map_err(|errno| open_error(errno, &root.join(relative), shown))?;
    Ok(fs::File::from(fd))
}

/// Whether `name` in `dir` is a directory (not a symlink to one).
fn is_dir_at(dir: &OwnedFd, name: &OsStr) -> bool {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

fn sys_error(what: &'static str, path: &Path) -> impl FnOnce(Errno) -> Error {
    let path = path.to_path_buf();
    move |errno| Error::Io {
        what,
        path,
        source: errno.into(),
    }
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

/// Writes `file` into the regular file `name` already in `dir` (same
/// inode, so binds of it see the change); false when there is none to
/// write into (absent, a symlink or not a regular file).
fn write_in_place(
    dir: &OwnedFd,
    name: &OsStr,
    target: &Path,
    file: &CopyFile,
) -> Result<bool, Error> {
    // Absent, a symlink (O_NOFOLLOW), a directory, a FIFO without a
    // reader: nothing to write into; the replacing path decides.
    let flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let Ok(fd) = openat(dir, name, flags, Mode::empty()) else {
        return Ok(false);
    };
    let mut out = fs::File::from(fd);
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

    /// What a container can do to a copied directory it sees (a configMap
    /// volume): swap a directory for a symlink out of it. Copies and
    /// removals through it are refused; nothing outside is touched.
    #[test]
    fn copies_never_go_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let state = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), "precious").unwrap();
        let storage = Storage::new(state.path().to_path_buf());
        storage.copy_file(&copy("cm/sub/a", "1", 0)).unwrap();
        let files = state.path().join("files");
        fs::remove_dir_all(files.join("cm/sub")).unwrap();
        std::os::unix::fs::symlink(outside.path(), files.join("cm/sub")).unwrap();
        for (what, result) in [
            (
                "a file",
                storage
                    .copy_file(&copy("cm/sub/keep", "overwritten", 0))
                    .map(drop),
            ),
            (
                "in place",
                storage
                    .copy_file(&in_place_at("cm/sub/keep", "overwritten"))
                    .map(drop),
            ),
            (
                "a directory",
                storage
                    .copy_file(&CopyFile {
                        kind: FileKind::Directory,
                        ..copy("cm/sub/new", "", 0)
                    })
                    .map(drop),
            ),
            ("a removal", storage.remove_file("cm/sub/keep")),
        ] {
            assert!(
                matches!(result, Err(Error::Invalid(_))),
                "{what}: {result:?}"
            );
        }
        assert_eq!(
            fs::read_to_string(outside.path().join("keep")).unwrap(),
            "precious"
        );
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);
        // Removing the link removes the link, not what it points to.
        storage.remove_file("cm/sub").unwrap();
        assert!(outside.path().join("keep").exists());
        // A directory copied over a symlink is refused too.
        std::os::unix::fs::symlink(outside.path(), files.join("cm/dir")).unwrap();
        let over_link = storage.copy_file(&CopyFile {
            kind: FileKind::Directory,
            mode: 0o700,
            ..copy("cm/dir", "", 0)
        });
        assert!(matches!(over_link, Err(Error::Invalid(_))), "{over_link:?}");
        assert_ne!(
            fs::metadata(outside.path()).unwrap().permissions().mode() & 0o777,
            0o700
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
