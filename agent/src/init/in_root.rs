//! Paths inside a container's root, resolved without races. The path is
//! walked one component at a time from a descriptor of the root, each step
//! an `openat2(root, found/name, O_PATH | O_NOFOLLOW, RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)`: `..` stops at the root, and a symlink (a magic
//! one of a mounted /proc included) is read as text and its target walked
//! the same way, as if the root were `/`. What comes back is an O_PATH
//! descriptor, and mounts go through `/proc/self/fd/<n>` of it, so a
//! container that swaps a directory for a symlink after the lookup (a
//! shared volume, a second container) changes nothing: the mount lands on
//! the object that was found, inside the root.
//!
//! Missing components are created on the way (directories, and the last
//! one as a directory or an empty file) with `mkdirat`/`openat` relative to
//! a parent found the same way; a dangling symlink is followed to where it
//! points, inside the root, and that is created.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2, readlinkat};
use nix::sys::stat::{Mode, SFlag, fstat, mkdirat};

use super::*;

/// Symlinks followed in one lookup, as the kernel's limit.
const MAX_LINKS: usize = 40;
/// Lookups in one resolution: a container that keeps removing what we
/// create makes it fail rather than spin.
const MAX_STEPS: usize = 4096;
/// How often a lookup is retried when the kernel reports a racing mount or
/// rename (EAGAIN); each retry is cheap, and a real attack cannot make it
/// spin for ever.
const MAX_RACE_RETRIES: u32 = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Only open: a missing component is an error.
    Nothing,
    /// Missing components become directories.
    Dir,
    /// Missing parents become directories, a missing last component an
    /// empty file (the mount point of a bind of a file).
    File,
}

/// A directory serving as a container's root.
pub struct Root {
    fd: OwnedFd,
}

/// Something found below a root: its O_PATH descriptor.
pub struct Found {
    fd: OwnedFd,
}

impl Found {
    /// The path that reaches exactly this object (a magic link).
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    pub fn is_symlink(&self) -> bool {
        self.kind() == Some(SFlag::S_IFLNK)
    }

    /// `name` in this directory, as it is (a symlink is not followed).
    pub fn child(&self, name: &OsStr) -> Result<Found, Error> {
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(&self.fd, name, flags, Mode::empty()).map_err(Error::sys(format!(
            "cannot open {} in the container",
            Path::new(name).display()
        )))?;
        Ok(Found { fd })
    }

    fn kind(&self) -> Option<SFlag> {
        fstat(&self.fd)
            .ok()
            .map(|st| SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT))
    }
}

impl AsFd for Found {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Root {
    pub fn open(path: &Path) -> Result<Self, Error> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(Error::sys(format!(
            "cannot open the root {}",
            path.display()
        )))?;
        Ok(Self { fd })
    }

    /// `path` (as the container sees it) below the root, the last component
    /// followed if it is a symlink; what is missing is created as `create`
    /// says.
    pub fn resolve(&self, path: &Path, create: Create) -> Result<Found, Error> {
        let shown = path.display();
        let mut pending: Vec<OsString> = Vec::new();
        push_components(&mut pending, path);
        // The components found so far, as a path relative to the root.
        let mut found = PathBuf::from(".");
        let mut current = self.lookup(&found, false)?;
        let mut links = 0;
        let mut steps = 0;
        while let Some(name) = pending.pop() {
            steps += 1;
            if steps > MAX_STEPS {
                return Err(Error::Invalid(format!(
                    "{shown} keeps changing under the lookup"
                )));
            }
            let candidate = found.join(&name);
            match self.lookup(&candidate, true) {
                Ok(next) if next.is_symlink() => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(Error::Invalid(format!("too many symlinks in {shown}")));
                    }
                    let target = readlinkat(&next.fd, "")
                        .map_err(Error::sys(format!("readlink in {shown}")))?;
                    if Path::new(&target).is_absolute() {
                        found = PathBuf::from(".");
                        current = self.lookup(&found, false)?;
                    }
                    push_components(&mut pending, Path::new(&target));
                }
                Ok(next) => {
                    found = candidate;
                    current = next;
                }
                Err(Error::Sys {
                    source: Errno::ENOENT,
                    ..
                }) if create != Create::Nothing => {
                    let last = pending.is_empty();
                    make(&current, &name, last && create == Create::File).map_err(Error::sys(
                        format!("cannot create {shown} in the container"),
                    ))?;
                    // Looked up again next round, as anything else.
                    pending.push(name);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(current)
    }

    /// One lookup below the root; `nofollow`: a final symlink is returned
    /// as itself.
    fn lookup(&self, path: &Path, nofollow: bool) -> Result<Found, Error> {
        let mut flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
        if nofollow {
            flags |= OFlag::O_NOFOLLOW;
        }
        let how = OpenHow::new()
            .flags(flags)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        // EAGAIN: a mount or rename anywhere in the system raced with a
        // `..` lookup and the kernel could not prove it stayed inside; it
        // asks the caller to retry. Busy hosts (tests mounting in parallel)
        // hit this now and then.
        let mut retries = 0;
        let fd = loop {
            match openat2(&self.fd, path, how) {
                Err(Errno::EAGAIN) if retries < MAX_RACE_RETRIES => retries += 1,
                result => {
                    break result.map_err(Error::sys(format!(
                        "cannot open {} in the container",
                        path.display()
                    )))?;
                }
            }
        };
        Ok(Found { fd })
    }
}

/// The path's components onto a stack (the first on top); `/` and `.`
/// vanish, `..` stays for the kernel to stop at the root.
fn push_components(stack: &mut Vec<OsString>, path: &Path) {
    for c in path.components().rev() {
        match c {
            Component::Normal(name) => stack.push(name.to_os_string()),
            Component::ParentDir => stack.push("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

/// Creates `name` in `parent`: a directory, or an empty file. Someone
/// creating it first is fine: the next lookup sees theirs.
fn make(parent: &Found, name: &OsStr, file: bool) -> Result<(), Errno> {
    if name.as_bytes() == b".." {
        return Err(Errno::ENOENT);
    }
    let made = if file {
        openat(
            &parent.fd,
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map(drop)
    } else {
        mkdirat(&parent.fd, name, Mode::from_bits_truncate(0o755))
    };
    match made {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
