//! Storage in the guest: container root filesystems (a directory or a
//! mounted disk, optionally under a writable overlay), virtio-blk disks
//! found by serial, and small files copied in from the host.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;

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

/// Where a container's root comes from (a validated `Rootfs` message).
pub struct RootfsSource {
    /// The directory whose content is the root.
    pub lower: PathBuf,
    pub writable_overlay: bool,
    /// Directory (on a disk) to hold the overlay's upper and work dirs;
    /// `None`: a tmpfs private to the container.
    pub upper_base: Option<PathBuf>,
}

/// A prepared root: the path to give the container, and the agent-side
/// mounts to undo when it is removed (innermost last).
pub struct PreparedRootfs {
    pub path: PathBuf,
    pub mounts: Vec<PathBuf>,
}

/// Prepares a container's root in `dir` (the container's state directory).
pub fn prepare_rootfs(source: &RootfsSource, dir: &Path) -> Result<PreparedRootfs, Error> {
    if !source.lower.is_dir() {
        return Err(Error::NotFound(format!(
            "rootfs directory {}",
            source.lower.display()
        )));
    }
    fs::create_dir_all(dir).map_err(io_error("cannot create", dir))?;
    if !source.writable_overlay {
        return Ok(PreparedRootfs {
            path: source.lower.clone(),
            mounts: vec![],
        });
    }
    let mut mounts = Vec::new();
    let result = (|| {
        let base = match &source.upper_base {
            Some(base) => base.clone(),
            None => {
                let rw = dir.join("rw");
                fs::create_dir_all(&rw).map_err(io_error("cannot create", &rw))?;
                mount(
                    Some("tmpfs"),
                    &rw,
                    Some("tmpfs"),
                    MsFlags::MS_NODEV,
                    Some("mode=0755"),
                )
                .map_err(|source| Error::Mount {
                    what: "tmpfs".into(),
                    target: rw.clone(),
                    source,
                })?;
                mounts.push(rw.clone());
                rw
            }
        };
        let upper = base.join("upper");
        let work = base.join("work");
        let root = dir.join("rootfs");
        for d in [&upper, &work, &root] {
            fs::create_dir_all(d).map_err(io_error("cannot create", d))?;
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            overlay_escape(&source.lower),
            overlay_escape(&upper),
            overlay_escape(&work)
        );
        mount(
            Some("overlay"),
            &root,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|source| Error::Mount {
            what: "overlay".into(),
            target: root.clone(),
            source,
        })?;
        mounts.push(root.clone());
        Ok(root)
    })();
    match result {
        Ok(path) => Ok(PreparedRootfs { path, mounts }),
        Err(e) => {
            unmount_all(&mounts);
            Err(e)
        }
    }
}

/// Overlay options separate with ',' and ':'; escape them in paths.
fn overlay_escape(path: &Path) -> String {
    path.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace(':', "\\:")
}

/// Detaches mounts, innermost (last) first; a mount already gone is fine.
pub fn unmount_all(mounts: &[PathBuf]) {
    for target in mounts.iter().rev() {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => tracing::warn!(target = %target.display(), "cannot unmount: {e}"),
        }
    }
}

/// Finds the block device whose virtio serial is `serial` under
/// `sys_block` (normally /sys/block); returns its name, e.g. "vdb".
pub fn find_by_serial(sys_block: &Path, serial: &str) -> Option<String> {
    let entries = fs::read_dir(sys_block).ok()?;
    entries.flatten().find_map(|entry| {
        let found = fs::read_to_string(entry.path().join("serial")).ok()?;
        (found.trim_end_matches(['\n', '\0']) == serial)
            .then(|| entry.file_name().to_string_lossy().into_owned())
    })
}

/// A request to mount a disk.
pub struct DiskRequest {
    pub id: String,
    pub serial: String,
    pub fs_type: String,
    pub options: Vec<String>,
    pub read_only: bool,
    pub timeout: std::time::Duration,
}

struct Disk {
    device: PathBuf,
    /// Where it is mounted; `None` for a raw block device.
    mount: Option<PathBuf>,
}

/// Disks and copied files of the guest.
pub struct Storage {
    state_dir: PathBuf,
    sys_block: PathBuf,
    dev: PathBuf,
    disks: std::sync::Mutex<std::collections::HashMap<String, Disk>>,
    /// Version last written per copied path.
    versions: std::sync::Mutex<std::collections::HashMap<PathBuf, u64>>,
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

    /// The device node of a disk mounted (or registered raw) earlier.
    pub fn device(&self, id: &str) -> Result<PathBuf, Error> {
        let disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        disks
            .get(id)
            .map(|d| d.device.clone())
            .ok_or_else(|| Error::NotFound(format!("disk {id}")))
    }

    /// Finds the disk by serial (waiting up to the timeout for it to
    /// appear) and mounts it; returns (guest path, device).
    pub fn mount_disk(&self, request: &DiskRequest) -> Result<(PathBuf, PathBuf), Error> {
        if !valid_id(&request.id) {
            return Err(Error::Invalid(format!("bad disk id '{}'", request.id)));
        }
        if request.serial.is_empty() || request.serial.contains(['/', '\0']) {
            return Err(Error::Invalid(format!("bad serial '{}'", request.serial)));
        }
        let mut disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        if disks.contains_key(&request.id) {
            return Err(Error::Exists(format!("disk {}", request.id)));
        }
        let deadline = std::time::Instant::now() + request.timeout;
        let name = loop {
            if let Some(name) = find_by_serial(&self.sys_block, &request.serial) {
                break name;
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::NotFound(format!(
                    "virtio-blk disk with serial '{}' (waited {:?})",
                    request.serial, request.timeout
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        // A slot filled at run time (an image disk, a block volume) shows
        // size 0 until the guest has handled the config-change interrupt:
        // wait for it.
        {
            let size = self.sys_block.join(&name).join("size");
            while fs::read_to_string(&size).is_ok_and(|s| s.trim() == "0") {
                if std::time::Instant::now() >= deadline {
                    return Err(Error::NotFound(format!(
                        "virtio-blk disk with serial '{}' has no backing file (waited {:?})",
                        request.serial, request.timeout
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let device = self.dev.join(&name);
        if request.fs_type.is_empty() && request.read_only {
            set_read_only(&device)?;
        }
        if request.fs_type.is_empty() {
            disks.insert(
                request.id.clone(),
                Disk {
                    device: device.clone(),
                    mount: None,
                },
            );
            return Ok((device.clone(), device));
        }
        let options = crate::init::parse_mount_options(&request.options);
        let mut flags = options.flags;
        if request.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        let target = self.disks_dir().join(&request.id);
        fs::create_dir_all(&target).map_err(io_error("cannot create", &target))?;
        let data = options.data.join(",");
        mount(
            Some(&device),
            &target,
            Some(request.fs_type.as_str()),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|source| Error::Mount {
            what: device.display().to_string(),
            target: target.clone(),
            source,
        })?;
        disks.insert(
            request.id.clone(),
            Disk {
                device: device.clone(),
                mount: Some(target.clone()),
            },
        );
        Ok((target, device))
    }

    pub fn unmount_disk(&self, id: &str) -> Result<(), Error> {
        let mut disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        let Some(disk) = disks.get(id) else {
            return Err(Error::NotFound(format!("disk {id}")));
        };
        if let Some(target) = &disk.mount {
            // Containers' mount namespaces may keep the filesystem alive
            // past this unmount (until their last process is reaped):
            // everything written reaches the disk now, before the host
            // detaches it.
            sync_filesystem(target)?;
            match umount2(target, MntFlags::empty()) {
                Ok(()) | Err(Errno::EINVAL) => {}
                Err(Errno::EBUSY) => {
                    return Err(Error::Precondition(format!("disk {id} is in use")));
                }
                Err(source) => {
                    return Err(Error::Mount {
                        what: "(unmount)".into(),
                        target: target.clone(),
                        source,
                    });
                }
            }
            let _ = fs::remove_dir(target);
        } else {
            // A raw block volume: what containers wrote through the guest's
            // page cache reaches the disk before the host detaches it.
            fs::File::open(&disk.device)
                .and_then(|f| f.sync_all())
                .map_err(io_error("cannot flush", &disk.device))?;
        }
        disks.remove(id);
        Ok(())
    }

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

/// syncfs(2) of the filesystem mounted at `target`.
fn sync_filesystem(target: &Path) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let dir = fs::File::open(target).map_err(io_error("cannot open", target))?;
    // SAFETY: syncfs takes a descriptor that stays open for the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } < 0 {
        return Err(io_error("cannot sync", target)(io::Error::last_os_error()));
    }
    Ok(())
}

/// `_IO(0x12, 93)` from linux/fs.h (the libc crate lacks it).
const BLKROSET: libc::c_ulong = 0x125d;

/// Marks a raw block device read-only in the guest (BLKROSET): a
/// container's writes fail with EPERM before they reach the device.
fn set_read_only(device: &Path) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let file = fs::File::open(device).map_err(io_error("cannot open", device))?;
    let read_only: libc::c_int = 1;
    // SAFETY: BLKROSET reads one int through the pointer, which points at
    // a live local; the descriptor is open for the call's duration.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKROSET, &read_only) };
    if ret < 0 {
        return Err(io_error("cannot make read-only", device)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
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

    #[test]
    fn finds_disks_by_serial() {
        let sys = tempfile::tempdir().unwrap();
        for (name, serial) in [("vda", "boot\n"), ("vdb", "image-abc"), ("loop0", "")] {
            fs::create_dir_all(sys.path().join(name)).unwrap();
            if !serial.is_empty() {
                fs::write(sys.path().join(name).join("serial"), serial).unwrap();
            }
        }
        assert_eq!(
            find_by_serial(sys.path(), "image-abc").as_deref(),
            Some("vdb")
        );
        assert_eq!(find_by_serial(sys.path(), "boot").as_deref(), Some("vda"));
        assert_eq!(find_by_serial(sys.path(), "nope"), None);
    }

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

    #[test]
    fn unknown_disks() {
        let state = tempfile::tempdir().unwrap();
        let storage = Storage::new(state.path().to_path_buf());
        let request = DiskRequest {
            id: "d1".into(),
            serial: "no-such-serial".into(),
            fs_type: "ext4".into(),
            options: vec![],
            read_only: true,
            timeout: std::time::Duration::from_millis(50),
        };
        assert!(matches!(
            storage.mount_disk(&request),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            storage.unmount_disk("d1"),
            Err(Error::NotFound(_))
        ));
        let bad = DiskRequest {
            id: "../d".into(),
            ..request
        };
        assert!(matches!(storage.mount_disk(&bad), Err(Error::Invalid(_))));
    }

    #[test]
    fn overlay_options_are_escaped() {
        assert_eq!(overlay_escape(Path::new("/a,b:c")), "/a\\,b\\:c");
    }
}
