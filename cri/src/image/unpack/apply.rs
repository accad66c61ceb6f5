//! Turns archive members into tree changes, as containerd's applier does.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, makedev, mkdirat, mknodat};
use nix::unistd::{UnlinkatFlags, linkat, symlinkat, unlinkat};

use super::archive::{Kind, Member, TarReader, Time};
use super::tree::{self, Node, Tree};
use super::{Error, LayerStats, Limits, at};

const WHITEOUT: &[u8] = b".wh.";
/// `.wh..wh..opq` with `WHITEOUT` stripped.
const OPAQUE: &[u8] = b".wh..opq";

pub(super) struct Applier<'a> {
    tree: Tree,
    limits: &'a Limits,
    stats: LayerStats,
    /// What this layer made, as (parent's device, parent's inode, name
    /// hash): an opaque whiteout keeps these, whatever the entry order.
    made: HashSet<(u64, u64, u64)>,
    /// Directories whose times are set last, as adding children changes
    /// them; and the bytes of their paths.
    dir_times: Vec<(PathBuf, Time)>,
    dir_path_bytes: u64,
}

impl<'a> Applier<'a> {
    pub fn new(root: &Path, limits: &'a Limits) -> Result<Self, Error> {
        Ok(Applier {
            tree: Tree::open(root).map_err(at(root, "opening the root"))?,
            limits,
            stats: LayerStats::default(),
            made: HashSet::new(),
            dir_times: Vec::new(),
            dir_path_bytes: 0,
        })
    }

    pub fn apply<R: Read>(
        &mut self,
        member: Member,
        reader: &mut TarReader<R>,
    ) -> Result<(), Error> {
        self.stats.entries = self.stats.entries.saturating_add(1);
        if self.stats.entries > self.limits.max_entries {
            return Err(Error::Limit {
                what: "entries",
                limit: self.limits.max_entries,
            });
        }
        let path = clean_path(&member.path, self.limits)?;
        let Some(name) = path.file_name() else {
            return self.root(&path, &member);
        };
        if let Some(target) = name.as_bytes().strip_prefix(WHITEOUT) {
            return self.whiteout(&path, target);
        }
        let parent = self
            .tree
            .make_dir_all(parent_of(&path))
            .map_err(at(&path, "making its parent"))?;
        match member.kind {
            Kind::File => self.file(&parent, name, &path, &member, reader)?,
            Kind::Dir => self.dir(&parent, name, &path, &member)?,
            Kind::Symlink => self.symlink(&parent, name, &path, &member)?,
            Kind::HardLink => self.hard_link(&parent, name, &path, &member)?,
            Kind::Char | Kind::Block | Kind::Fifo => self.node(&parent, name, &path, &member)?,
        }
        let parent_stat = fstat(&parent).map_err(at(&path, "inspecting its parent"))?;
        self.made.insert(key(&parent_stat, name));
        Ok(())
    }

    /// Sets the deferred directory times; the layer is done.
    pub fn finish(self) -> Result<LayerStats, Error> {
        for (path, time) in &self.dir_times {
            // Gone, or no longer a directory: a later entry replaced it.
            let dir = match self.tree.open_dir(path) {
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => continue,
                dir => dir.map_err(at(path, "opening"))?,
            };
            Node::Fd(&dir)
                .set_times(*time)
                .map_err(at(path, "setting times"))?;
        }
        Ok(self.stats)
    }

    /// The entry for the root itself ("." or "/"): only its metadata.
    fn root(&mut self, path: &Path, member: &Member) -> Result<(), Error> {
        if member.kind != Kind::Dir {
            return Err(refused(&member.path, "the root must be a directory"));
        }
        let root = self.tree.open_dir(path).map_err(at(path, "opening"))?;
        self.set_metadata(&Node::Fd(&root), path, member)?;
        self.defer_times(path, member.mtime)
    }

    fn file<R: Read>(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
        member: &Member,
        reader: &mut TarReader<R>,
    ) -> Result<(), Error> {
        clear(parent, name, path, false)?;
        let flags =
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(parent, name, flags, Mode::S_IRUSR | Mode::S_IWUSR)
            .map_err(at(path, "creating"))?;
        let mut file = File::from(fd);
        let written = reader.copy_data(&mut file, path)?;
        self.stats.bytes = self.stats.bytes.saturating_add(written);
        let fd = OwnedFd::from(file);
        let node = Node::Fd(&fd);
        self.set_metadata(&node, path, member)?;
        node.set_times(member.mtime)
            .map_err(at(path, "setting times"))
    }

    fn dir(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
        member: &Member,
    ) -> Result<(), Error> {
        if !clear(parent, name, path, true)? {
            mkdirat(parent, name, Mode::S_IRWXU).map_err(at(path, "creating"))?;
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(parent, name, flags, Mode::empty()).map_err(at(path, "opening"))?;
        self.set_metadata(&Node::Fd(&fd), path, member)?;
        self.defer_times(path, member.mtime)
    }

    /// The target is stored as given: any target is allowed, as nothing
    /// here follows it.
    fn symlink(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
        member: &Member,
    ) -> Result<(), Error> {
        check_link(member, self.limits)?;
        clear(parent, name, path, false)?;
        symlinkat(OsStr::from_bytes(&member.link), parent, name).map_err(at(path, "creating"))?;
        let node = Node::At {
            parent,
            name,
            symlink: true,
        };
        self.set_metadata(&node, path, member)?;
        node.set_times(member.mtime)
            .map_err(at(path, "setting times"))
    }

    /// Links the target itself (a symlink, not what it points to), found
    /// like any path in the tree. Its metadata is the target's.
    fn hard_link(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
        member: &Member,
    ) -> Result<(), Error> {
        check_link(member, self.limits)?;
        let target = clean_path(&member.link, self.limits)?;
        let Some(target_name) = target.file_name() else {
            return Err(refused(&member.path, "hard link to a directory"));
        };
        let target_parent = match self.tree.find_dir(parent_of(&target)) {
            Err(Errno::ENOENT | Errno::ENOTDIR) => {
                return Err(refused(&member.path, "hard link target missing"));
            }
            found => found.map_err(at(&target, "resolving"))?,
        };
        match tree::lstat(&target_parent, target_name).map_err(at(&target, "inspecting"))? {
            None => return Err(refused(&member.path, "hard link target missing")),
            Some(stat) if tree::is_dir(&stat) => {
                return Err(refused(&member.path, "hard link to a directory"));
            }
            Some(_) => {}
        }
        let same_parent = fstat(&target_parent).ok().zip(fstat(parent).ok());
        if same_parent.is_some_and(|(a, b)| a.st_dev == b.st_dev && a.st_ino == b.st_ino)
            && target_name == name
        {
            return Ok(()); // A link to itself.
        }
        clear(parent, name, path, false)?;
        linkat(&target_parent, target_name, parent, name, AtFlags::empty())
            .map_err(at(path, "linking"))
    }

    /// Devices and FIFOs.
    fn node(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
        member: &Member,
    ) -> Result<(), Error> {
        let (kind, device) = match member.kind {
            Kind::Char => (
                SFlag::S_IFCHR,
                makedev(member.device.0.into(), member.device.1.into()),
            ),
            Kind::Block => (
                SFlag::S_IFBLK,
                makedev(member.device.0.into(), member.device.1.into()),
            ),
            _ => (SFlag::S_IFIFO, 0),
        };
        clear(parent, name, path, false)?;
        mknodat(parent, name, kind, Mode::S_IRUSR | Mode::S_IWUSR, device)
            .map_err(at(path, "creating"))?;
        let node = Node::At {
            parent,
            name,
            symlink: false,
        };
        self.set_metadata(&node, path, member)?;
        node.set_times(member.mtime)
            .map_err(at(path, "setting times"))
    }

    /// Owner, then mode (chown clears setuid/setgid), then xattrs (chown
    /// clears `security.capability`).
    fn set_metadata(&self, node: &Node, path: &Path, member: &Member) -> Result<(), Error> {
        node.chown(member.uid, member.gid)
            .map_err(at(path, "changing owner"))?;
        node.chmod(member.mode).map_err(at(path, "changing mode"))?;
        for (name, value) in &member.xattrs {
            set_xattr(node, path, name, value)?;
        }
        Ok(())
    }

    fn defer_times(&mut self, path: &Path, time: Time) -> Result<(), Error> {
        let bytes = u64::try_from(path.as_os_str().len()).unwrap_or(u64::MAX);
        self.dir_path_bytes = self.dir_path_bytes.saturating_add(bytes);
        if self.dir_path_bytes > self.limits.max_dir_path_bytes {
            return Err(Error::Limit {
                what: "directory path bytes",
                limit: self.limits.max_dir_path_bytes,
            });
        }
        self.dir_times.push((path.to_path_buf(), time));
        Ok(())
    }

    /// `.wh.NAME` removes NAME; `.wh..wh..opq` removes what lower layers
    /// put in the directory; other `.wh..wh.*` (aufs metadata) are skipped.
    fn whiteout(&mut self, path: &Path, target: &[u8]) -> Result<(), Error> {
        if target.starts_with(WHITEOUT) && target != OPAQUE {
            return Ok(());
        }
        if matches!(target, b"" | b"." | b"..") {
            return Err(refused(
                path.as_os_str().as_bytes(),
                "whiteout of an invalid name",
            ));
        }
        let dir = match self.tree.find_dir(parent_of(path)) {
            Err(Errno::ENOENT | Errno::ENOTDIR) => None,
            found => Some(found.map_err(at(path, "resolving its parent"))?),
        };
        if let Some(dir) = dir {
            let result = if target == OPAQUE {
                self.remove_lower(&dir, 0).map(drop)
            } else {
                tree::remove_all(&dir, OsStr::from_bytes(target), 0)
            };
            result.map_err(at(path, "applying the whiteout"))?;
        }
        self.stats.whiteouts = self.stats.whiteouts.saturating_add(1);
        Ok(())
    }

    /// Removes what lower layers put in `dir`, keeping what this layer made
    /// and the directories leading to it. Returns whether anything stays.
    fn remove_lower(&self, dir: &OwnedFd, depth: usize) -> std::io::Result<bool> {
        tree::check_depth(depth)?;
        let dir_stat = fstat(dir)?;
        let mut kept = false;
        for name in tree::list(dir)? {
            let made = self.made.contains(&key(&dir_stat, &name));
            let Some(stat) = tree::lstat(dir, &name)? else {
                continue;
            };
            if !tree::is_dir(&stat) {
                if made {
                    kept = true;
                } else {
                    unlinkat(dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir)?;
                }
                continue;
            }
            let child = tree::open_child_dir(dir, &name)?;
            if self.remove_lower(&child, depth + 1)? || made {
                kept = true;
            } else {
                unlinkat(dir, name.as_os_str(), UnlinkatFlags::RemoveDir)?;
            }
        }
        Ok(kept)
    }
}

/// Makes room for a new entry at `parent/name`: removes what is there (a
/// directory with all it holds), but keeps a directory if `keep_dir`.
/// Returns whether a directory was kept.
fn clear(parent: &OwnedFd, name: &OsStr, path: &Path, keep_dir: bool) -> Result<bool, Error> {
    match tree::lstat(parent, name).map_err(at(path, "inspecting"))? {
        None => Ok(false),
        Some(stat) if tree::is_dir(&stat) && keep_dir => Ok(true),
        Some(stat) if tree::is_dir(&stat) => {
            tree::remove_all(parent, name, 0).map_err(at(path, "removing"))?;
            Ok(false)
        }
        Some(_) => {
            unlinkat(parent, name, UnlinkatFlags::NoRemoveDir).map_err(at(path, "removing"))?;
            Ok(false)
        }
    }
}

/// Sets one xattr from the layer, if its namespace is one an image may set.
/// Like containerd, goes on without it where the filesystem refuses it.
fn set_xattr(node: &Node, path: &Path, name: &[u8], value: &[u8]) -> Result<(), Error> {
    let allowed = [b"user.".as_slice(), b"security.", b"trusted."].iter().any(|p| name.starts_with(p))
        // The tree may become an overlayfs layer, where these would mean
        // something to the kernel.
        && !name.starts_with(b"trusted.overlay.");
    let shown = String::from_utf8_lossy(name);
    let Some(cname) = allowed.then(|| CString::new(name).ok()).flatten() else {
        tracing::warn!(path = %path.display(), xattr = %shown, "skipping xattr from layer");
        return Ok(());
    };
    match node.set_xattr(&cname, value) {
        Err(e)
            if matches!(
                Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                Errno::EOPNOTSUPP | Errno::EPERM
            ) =>
        {
            tracing::warn!(path = %path.display(), xattr = %shown, error = %e, "filesystem refused xattr");
            Ok(())
        }
        result => result.map_err(at(path, "setting an xattr")),
    }
}

/// The path an entry names, inside the tree: leading "/" and "./" are
/// dropped, as are empty and "." components. Refuses NUL, "..", and paths
/// over the limit (a layer with these is malicious or broken).
fn clean_path(raw: &[u8], limits: &Limits) -> Result<PathBuf, Error> {
    if raw.len() > limits.max_path_bytes {
        return Err(refused(raw, "path too long"));
    }
    if raw.contains(&0) {
        return Err(refused(raw, "NUL in path"));
    }
    let mut path = PathBuf::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(refused(raw, "\"..\" in path")),
            part => path.push(OsStr::from_bytes(part)),
        }
    }
    Ok(path)
}

fn check_link(member: &Member, limits: &Limits) -> Result<(), Error> {
    if member.link.len() > limits.max_path_bytes {
        return Err(refused(&member.path, "link target too long"));
    }
    if member.link.is_empty() || member.link.contains(&0) {
        return Err(refused(&member.path, "empty link target or NUL in it"));
    }
    Ok(())
}

fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new(""))
}

fn key(parent: &FileStat, name: &OsStr) -> (u64, u64, u64) {
    let mut hasher = DefaultHasher::new();
    name.as_bytes().hash(&mut hasher);
    (parent.st_dev, parent.st_ino, hasher.finish())
}

fn refused(path: &[u8], reason: &'static str) -> Error {
    Error::Refused {
        path: String::from_utf8_lossy(path).into_owned(),
        reason,
    }
}
