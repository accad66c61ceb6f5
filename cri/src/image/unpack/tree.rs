//! The directory tree a layer is applied to. Directories are resolved with
//! `openat2(RESOLVE_IN_ROOT)` from the root's fd, so symlinks in the tree
//! resolve inside it as if it were `/`; the final component of an entry is
//! then handled with *at() calls that never follow it. Only when a
//! directory is missing does a walk of our own (same rules) create it.

use std::collections::VecDeque;
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2, readlinkat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens,
    mkdirat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, unlinkat};

use super::archive::Time;

/// How deep removals and opaque whiteouts descend (each level holds an fd).
const MAX_DEPTH: usize = 1024;
/// As the kernel's limit on symlinks followed in one lookup.
const MAX_SYMLINKS: usize = 40;
/// Retries of a lookup the kernel refused for a racing rename or mount
/// (EAGAIN): a busy host (a node unpacking and renaming all the time)
/// must not fail a pull.
const MAX_RACE_RETRIES: u32 = 128;

pub(super) struct Tree {
    /// `O_PATH` fd of the root: every lookup starts here.
    root: OwnedFd,
}

impl Tree {
    pub fn open(root: &Path) -> nix::Result<Self> {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        Ok(Tree {
            root: openat(AT_FDCWD, root, flags, Mode::empty())?,
        })
    }

    /// The directory at `path` (relative, no `..`), resolved in the tree.
    pub fn find_dir(&self, path: &Path) -> nix::Result<OwnedFd> {
        self.open_in_root(path, OFlag::O_PATH | OFlag::O_DIRECTORY)
    }

    /// The directory at `path`, opened for reading its entries and setting
    /// its metadata; never a symlink in the final component.
    pub fn open_dir(&self, path: &Path) -> nix::Result<OwnedFd> {
        self.open_in_root(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        )
    }

    fn open_in_root(&self, path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
        let path = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        // EAGAIN: a rename or mount anywhere raced with a ".." lookup; the
        // kernel asks to retry.
        let mut tries = 0;
        loop {
            match openat2(&self.root, path, how) {
                Err(Errno::EAGAIN) if tries < MAX_RACE_RETRIES => tries += 1,
                result => return result,
            }
        }
    }

    /// The directory at `path`, made as `mkdir -p` would: missing
    /// directories are created (0755, root-owned) and a symlink whose target
    /// is missing leads to its target being created, all inside the tree.
    pub fn make_dir_all(&self, path: &Path) -> nix::Result<OwnedFd> {
        match self.find_dir(path) {
            Err(Errno::ENOENT) => self.walk_creating(path),
            found => found,
        }
    }

    /// Slow path of `make_dir_all`: walks one component at a time, as
    /// `RESOLVE_IN_ROOT` would, creating what is missing. Each step opens a
    /// single name without following it; symlinks are expanded here, an
    /// absolute one from the root, and `..` never goes above the root. The
    /// walk only descends through real directories, so it knows its depth
    /// below the root, and a directory below the root has its parent there.
    fn walk_creating(&self, path: &Path) -> nix::Result<OwnedFd> {
        let mut todo: VecDeque<OsString> = path.iter().map(OsStr::to_os_string).collect();
        let mut dir = self.find_dir(Path::new(""))?;
        let mut depth = 0usize;
        let mut symlinks = 0;
        while let Some(name) = todo.pop_front() {
            if name == ".." {
                if depth > 0 {
                    dir = open_child_dir(&dir, &name)?;
                    depth -= 1;
                }
                continue;
            }
            let stat = lstat(&dir, &name)?;
            match stat.map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT) {
                None => {
                    let mode = Mode::from_bits_truncate(0o755);
                    mkdirat(&dir, name.as_os_str(), mode)?;
                    // Whatever the umask; the directory was just made.
                    fchmodat(&dir, name.as_os_str(), mode, FchmodatFlags::FollowSymlink)?;
                    todo.push_front(name);
                }
                Some(SFlag::S_IFDIR) => {
                    dir = open_child_dir(&dir, &name)?;
                    depth += 1;
                }
                Some(SFlag::S_IFLNK) => {
                    symlinks += 1;
                    if symlinks > MAX_SYMLINKS {
                        return Err(Errno::ELOOP);
                    }
                    let target = PathBuf::from(readlinkat(&dir, name.as_os_str())?);
                    if target.is_absolute() {
                        dir = self.find_dir(Path::new(""))?;
                        depth = 0;
                    }
                    for part in target.components().rev() {
                        match part {
                            Component::Normal(part) => todo.push_front(part.to_os_string()),
                            Component::ParentDir => todo.push_front("..".into()),
                            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                        }
                    }
                }
                Some(_) => return Err(Errno::ENOTDIR),
            }
        }
        Ok(dir)
    }
}

/// `name` in `parent`, not following a symlink; `None` if missing.
pub(super) fn lstat(parent: &impl AsFd, name: &OsStr) -> nix::Result<Option<FileStat>> {
    match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(stat)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) fn is_dir(stat: &FileStat) -> bool {
    SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// Opens the directory `name` in `parent` as an `O_PATH` fd, not following
/// a symlink.
pub(super) fn open_child_dir(parent: &impl AsFd, name: &OsStr) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    openat(parent, name, flags, Mode::empty())
}

/// The names in directory `dir` (listed first: removing while reading a
/// directory may skip entries).
pub(super) fn list(dir: &impl AsFd) -> nix::Result<Vec<OsString>> {
    let mut handle = Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in handle.iter() {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name != "." && name != ".." {
            names.push(name.to_os_string());
        }
    }
    Ok(names)
}

/// Removes `name` from `parent`, with everything under it if a directory.
/// Missing is fine.
pub(super) fn remove_all(parent: &impl AsFd, name: &OsStr, depth: usize) -> io::Result<()> {
    match unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    if depth >= MAX_DEPTH {
        return Err(too_deep());
    }
    let dir = open_child_dir(parent, name)?;
    for child in list(&dir)? {
        remove_all(&dir, &child, depth + 1)?;
    }
    Ok(unlinkat(parent, name, UnlinkatFlags::RemoveDir)?)
}

pub(super) fn too_deep() -> io::Error {
    io::Error::other(format!("directory tree deeper than {MAX_DEPTH}"))
}

pub(super) fn check_depth(depth: usize) -> io::Result<()> {
    if depth >= MAX_DEPTH {
        Err(too_deep())
    } else {
        Ok(())
    }
}

/// Something whose metadata is set.
pub(super) enum Node<'a> {
    /// An open regular file or directory.
    Fd(&'a OwnedFd),
    /// A symlink, device or FIFO, by name in its parent: never opened, as
    /// opening a FIFO blocks and opening a device may act on it.
    At {
        parent: &'a OwnedFd,
        name: &'a OsStr,
        symlink: bool,
    },
}

impl Node<'_> {
    pub fn chown(&self, uid: u32, gid: u32) -> nix::Result<()> {
        let (uid, gid) = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
        match self {
            Node::Fd(fd) => fchown(fd, uid, gid),
            Node::At { parent, name, .. } => {
                fchownat(parent, *name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
            }
        }
    }

    /// Symlinks have no mode of their own on Linux: skipped.
    pub fn chmod(&self, mode: u32) -> nix::Result<()> {
        let mode = Mode::from_bits_truncate(mode);
        match self {
            Node::Fd(fd) => fchmod(fd, mode),
            Node::At { symlink: true, .. } => Ok(()),
            // Follows a symlink, but this is the device or FIFO just made.
            Node::At { parent, name, .. } => {
                fchmodat(parent, *name, mode, FchmodatFlags::FollowSymlink)
            }
        }
    }

    pub fn set_xattr(&self, name: &CString, value: &[u8]) -> io::Result<()> {
        let result = match self {
            // SAFETY: `fd` is an open fd, `name` a NUL-terminated string, and
            // `value` a live buffer of `value.len()` bytes; the kernel only
            // reads them during the call.
            Node::Fd(fd) => unsafe {
                libc::fsetxattr(
                    fd.as_raw_fd(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            },
            Node::At {
                parent, name: file, ..
            } => {
                // No fsetxattr on an O_PATH fd, so by path through the
                // parent's fd; lsetxattr does not follow the final symlink.
                let mut path = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
                path.extend_from_slice(file.as_bytes());
                let path = CString::new(path).map_err(io::Error::other)?;
                // SAFETY: `path` and `name` are NUL-terminated strings and
                // `value` a live buffer of `value.len()` bytes; the kernel
                // only reads them during the call.
                unsafe {
                    libc::lsetxattr(
                        path.as_ptr(),
                        name.as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        0,
                    )
                }
            }
        };
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Sets atime and mtime both to `time`.
    pub fn set_times(&self, time: Time) -> nix::Result<()> {
        let time = TimeSpec::new(time.secs, i64::from(time.nanos));
        match self {
            Node::Fd(fd) => futimens(fd, &time, &time),
            Node::At { parent, name, .. } => {
                utimensat(parent, *name, &time, &time, UtimensatFlags::NoFollowSymlink)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[test]
    fn lookups_through_dot_dot_survive_renames_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("../../..", dir.path().join("usr/up")).unwrap();
        let tree = Tree::open(dir.path()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let renamer = {
            let stop = stop.clone();
            let scratch = tempfile::tempdir().unwrap();
            std::thread::spawn(move || {
                let (a, b) = (scratch.path().join("a"), scratch.path().join("b"));
                std::fs::write(&a, b"").unwrap();
                while !stop.load(Ordering::Relaxed) {
                    std::fs::rename(&a, &b).unwrap();
                    std::fs::rename(&b, &a).unwrap();
                }
            })
        };
        for _ in 0..2000 {
            tree.find_dir(Path::new("usr/up/usr/lib")).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        renamer.join().unwrap();
    }
}
