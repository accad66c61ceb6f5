//! The setup helper: the agent binary re-executed in a freshly cloned child
//! (`frakti-agent __frakti-helper`), single-threaded, before it becomes a
//! container's process. For a container's init it builds the container's
//! root (mounts, devices, pivot_root, masked and read-only paths), then for
//! every process it applies cwd, rlimits, user, capabilities,
//! no_new_privs and the seccomp profile, and executes the process.
//!
//! It talks to the agent over a socket on descriptor 3 (length-prefixed
//! JSON frames): the agent sends the configuration; the helper answers
//! `Ready` (an init, before it waits for `Start`) or `Failed`; a successful
//! exec closes the socket (close-on-exec), which the agent reads as success.

use std::collections::HashSet;
use std::convert::Infallible;
use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use frakti_proto::error_chain;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::CloneFlags;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use oci_spec::runtime::{
    LinuxDevice, LinuxDeviceType, LinuxSeccomp, Mount, PosixRlimitType, Process, Spec,
};
use serde::{Deserialize, Serialize};

use crate::seccomp;

/// Descriptor of the socket to the agent in the helper.
pub const SYNC_FD: RawFd = 3;
/// Descriptor of the container's mount namespace in an exec helper.
pub const MNT_NS_FD: RawFd = 4;

/// The agent's messages to the helper.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToHelper {
    /// Build a container's root, then wait for `Start`.
    Init(Box<InitConfig>),
    /// Enter the container's mount namespace (descriptor 4) and execute.
    Exec(Box<ExecConfig>),
    /// Let the prepared init execute its process.
    Start,
    /// Hold a PID namespace for the sandbox (containers share it): reap
    /// orphans forever.
    Pause,
}

/// The helper's answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromHelper {
    Ready,
    Failed {
        /// The request was at fault (bad spec, missing executable or cwd),
        /// not the guest.
        invalid: bool,
        message: String,
    },
}

/// A process executed in a running container.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExecConfig {
    pub process: Process,
    /// The container's seccomp profile, which its every process gets.
    pub seccomp: Option<LinuxSeccomp>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InitConfig {
    /// The container's root directory, prepared by the agent (in the
    /// agent's mount namespace, which the container's starts as a copy of).
    pub rootfs: PathBuf,
    pub spec: Spec,
    /// The container has a UTS namespace of its own (hostname applies).
    pub new_uts: bool,
    /// Make the container's cgroup namespace here, once the agent has put
    /// this process in the container's cgroup: made at clone time it would
    /// be rooted at the agent's cgroup, and the container's /sys/fs/cgroup
    /// would show the guest's root instead of its own limits.
    #[serde(default)]
    pub new_cgroup_ns: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}")]
    Sys {
        what: String,
        #[source]
        source: Errno,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("bad frame from the agent")]
    Frame(#[source] serde_json::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
}

impl Error {
    fn sys(what: impl Into<String>) -> impl FnOnce(Errno) -> Error {
        let what = what.into();
        move |source| Error::Sys { what, source }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// Largest frame accepted (a spec with many mounts is a few KiB).
const MAX_FRAME: usize = 4 << 20;

/// Writes one length-prefixed JSON frame.
pub fn write_frame<T: Serialize>(mut out: impl Write, message: &T) -> io::Result<()> {
    let body = serde_json::to_vec(message).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    let mut frame = len.to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    out.write_all(&frame)
}

/// Reads one frame; `None` at end of file.
pub fn read_frame<T: for<'de> Deserialize<'de>>(mut input: impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::other(format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(io::Error::other)
}

/// Entry point of `frakti-agent __frakti-helper`. Never returns: it either
/// executes the container's process or exits after reporting why not.
pub fn main() -> ! {
    // SAFETY: the agent put the sync socket at SYNC_FD before executing us;
    // nothing else in this fresh process owns that descriptor.
    let sync = unsafe { OwnedFd::from_raw_fd(SYNC_FD) };
    let _ = set_cloexec(SYNC_FD);
    let result = match read_frame::<ToHelper>(fs::File::from(
        sync.try_clone().unwrap_or_else(|_| std::process::exit(125)),
    )) {
        Ok(Some(ToHelper::Init(config))) => run_init(&sync, *config),
        Ok(Some(ToHelper::Exec(config))) => run_exec(*config),
        Ok(Some(ToHelper::Pause)) => {
            drop(sync);
            run_pause()
        }
        Ok(_) => std::process::exit(125),
        Err(e) => Err(Error::io("cannot read the configuration")(e)),
    };
    let Err(error) = result;
    let message = FromHelper::Failed {
        invalid: matches!(
            error,
            Error::Invalid(_)
                | Error::Seccomp(seccomp::Error::Invalid(_) | seccomp::Error::Filter(_))
        ),
        message: error_chain(&error),
    };
    let _ = write_frame(fs::File::from(sync), &message);
    std::process::exit(127)
}

fn set_cloexec(fd: RawFd) -> Result<(), Errno> {
    // SAFETY: F_SETFD on a descriptor number; no memory involved.
    Errno::result(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) }).map(drop)
}

fn run_init(sync: &OwnedFd, config: InitConfig) -> Result<Infallible, Error> {
    let spec = &config.spec;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::Invalid("the spec has no process".into()))?;
    if config.new_cgroup_ns {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
            .map_err(Error::sys("cannot create the cgroup namespace"))?;
    }
    setup_rootfs(&config.rootfs, spec)?;
    if config.new_uts
        && let Some(hostname) = spec.hostname()
    {
        nix::unistd::sethostname(hostname).map_err(Error::sys("cannot set the hostname"))?;
    }
    if let Some(linux) = spec.linux()
        && let Some(sysctls) = linux.sysctl()
    {
        for (key, value) in sysctls {
            write_sysctl(key, value)?;
        }
    }
    let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref());
    let prepared = prepare_process(process, seccomp)?;
    let mut out = fs::File::from(sync.try_clone().map_err(Error::io("dup"))?);
    write_frame(&mut out, &FromHelper::Ready).map_err(Error::io("cannot tell the agent"))?;
    match read_frame::<ToHelper>(&mut out) {
        Ok(Some(ToHelper::Start)) => prepared.exec(),
        // The agent removed the container before starting it.
        _ => std::process::exit(0),
    }
}

/// PID 1 of the sandbox's shared PID namespace: orphans of every
/// container end up here and are reaped.
fn run_pause() -> ! {
    reset_signals();
    loop {
        if let Err(Errno::ECHILD) = nix::sys::wait::waitpid(None, None) {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
}

fn run_exec(config: ExecConfig) -> Result<Infallible, Error> {
    // SAFETY: the agent put the container's mount namespace at MNT_NS_FD.
    let mnt = unsafe { OwnedFd::from_raw_fd(MNT_NS_FD) };
    nix::sched::setns(mnt.as_fd(), CloneFlags::CLONE_NEWNS)
        .map_err(Error::sys("cannot enter the container's mount namespace"))?;
    drop(mnt);
    nix::unistd::chdir("/").map_err(Error::sys("chdir /"))?;
    prepare_process(&config.process, config.seccomp.as_ref())?.exec()
}

fn write_sysctl(key: &str, value: &str) -> Result<(), Error> {
    if key.is_empty() || key.contains("..") || key.contains('/') {
        return Err(Error::Invalid(format!("bad sysctl name '{key}'")));
    }
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    fs::write(&path, value).map_err(Error::io(format!("cannot set sysctl {key}")))
}

// --- The root filesystem ------------------------------------------------

fn setup_rootfs(rootfs: &Path, spec: &Spec) -> Result<(), Error> {
    let linux = spec.linux().clone().unwrap_or_default();
    // Nothing the container mounts may propagate back to the agent.
    let propagation = match linux.rootfs_propagation().as_deref() {
        None | Some("") | Some("rprivate") | Some("private") => MsFlags::MS_PRIVATE,
        Some("rslave") | Some("slave") => MsFlags::MS_SLAVE,
        Some(other) => {
            return Err(Error::Invalid(format!(
                "rootfsPropagation '{other}' is not supported"
            )));
        }
    };
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | propagation,
        None::<&str>,
    )
    .map_err(Error::sys("cannot make / private"))?;
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(Error::sys(format!("cannot bind {}", rootfs.display())))?;

    let mounts = spec.mounts().clone().unwrap_or_default();
    let mut dev_is_tmpfs = false;
    for m in &mounts {
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs") {
            dev_is_tmpfs = true;
        }
        mount_one(rootfs, m)?;
    }
    if dev_is_tmpfs {
        create_default_devices(rootfs)?;
    }
    for device in linux.devices().iter().flatten() {
        create_device(rootfs, device)?;
    }
    pivot_root(rootfs)?;

    for path in linux.masked_paths().iter().flatten() {
        mask_path(path)?;
    }
    for path in linux.readonly_paths().iter().flatten() {
        readonly_path(path)?;
    }
    if spec
        .root()
        .as_ref()
        .is_some_and(|r| r.readonly() == Some(true))
    {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(Error::sys("cannot make the root read-only"))?;
    }
    Ok(())
}

/// `path` (absolute, as the container sees it) below `root`, resolving
/// symlinks as if `root` were `/`, so a link in the image cannot point a
/// mount outside the container's root.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, Error> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
    let mut links = 0;
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    // Expand into a stack of components to walk.
    while let Some(p) = pending.pop() {
        for c in p.components().rev() {
            match c {
                Component::Normal(name) => parts.push(name.to_os_string()),
                Component::ParentDir => parts.push("..".into()),
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
    }
    while let Some(name) = parts.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&name);
        let on_disk = root.join(&candidate);
        match fs::symlink_metadata(&on_disk) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(Error::Invalid(format!(
                        "too many symlinks in {}",
                        path.display()
                    )));
                }
                let target = fs::read_link(&on_disk)
                    .map_err(Error::io(format!("readlink {}", on_disk.display())))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => parts.push(n.to_os_string()),
                        Component::ParentDir => parts.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved = candidate,
        }
    }
    Ok(root.join(resolved))
}

/// mount(8)-style options: flags, propagation flags and the data string.
#[derive(Debug, PartialEq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub propagation: MsFlags,
    pub data: Vec<String>,
}

pub fn parse_mount_options(options: &[String]) -> MountOptions {
    let mut parsed = MountOptions {
        flags: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: vec![],
    };
    for option in options {
        let (set, clear, propagation) = match option.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty(), MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty(), MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty(), MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty(), MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty(), MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty(), MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty(), MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty(), MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty(), MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty(), MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty(), MsFlags::empty()),
            "rbind" => (
                MsFlags::MS_BIND | MsFlags::MS_REC,
                MsFlags::empty(),
                MsFlags::empty(),
            ),
            "private" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_PRIVATE),
            "rprivate" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            ),
            "shared" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SHARED),
            "rshared" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SHARED | MsFlags::MS_REC,
            ),
            "slave" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SLAVE),
            "rslave" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
            ),
            "unbindable" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_UNBINDABLE),
            "runbindable" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
            ),
            data => {
                parsed.data.push(data.to_string());
                continue;
            }
        };
        parsed.flags = (parsed.flags | set) & !clear;
        parsed.propagation |= propagation;
    }
    parsed
}

fn is_cgroup2(path: &str) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

fn mount_one(rootfs: &Path, m: &Mount) -> Result<(), Error> {
    let destination = m.destination();
    if !destination.is_absolute() {
        return Err(Error::Invalid(format!(
            "mount destination {} is not absolute",
            destination.display()
        )));
    }
    let target = resolve_in_root(rootfs, destination)?;
    let options = parse_mount_options(m.options().as_deref().unwrap_or_default());
    let mut typ = m.typ().clone().unwrap_or_default();
    let is_bind = options.flags.contains(MsFlags::MS_BIND) || typ == "bind";
    if typ == "cgroup" || typ == "cgroup2" {
        // Containers get the guest's cgroup2 hierarchy; a host-mode agent on
        // a cgroup v1 host gives them none.
        if !is_cgroup2("/sys/fs/cgroup") {
            return Ok(());
        }
        typ = "cgroup2".into();
    }
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(&typ));
    // The mount point: a file for a bind of a file, else a directory.
    if is_bind && fs::metadata(&source).is_ok_and(|meta| !meta.is_dir()) {
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .map_err(Error::io(format!("cannot create {}", parent.display())))?;
        }
        if !target.exists() {
            fs::File::create(&target)
                .map_err(Error::io(format!("cannot create {}", target.display())))?;
        }
    } else {
        fs::create_dir_all(&target)
            .map_err(Error::io(format!("cannot create {}", target.display())))?;
    }
    let data = options.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    let what = || {
        format!(
            "cannot mount {} on {}",
            source.display(),
            destination.display()
        )
    };
    if is_bind {
        let rec = options.flags & MsFlags::MS_REC;
        if !source.exists() {
            return Err(Error::Invalid(format!(
                "bind mount source {} does not exist",
                source.display()
            )));
        }
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | rec,
            None::<&str>,
        )
        .map_err(Error::sys(what()))?;
        let extra = options.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None::<&str>,
            )
            .map_err(Error::sys(what()))?;
        }
    } else {
        let flags = options.flags;
        match mount(Some(&source), &target, Some(typ.as_str()), flags, data) {
            Ok(()) => {}
            // sysfs without a network namespace of our own may be refused;
            // fall back to a read-only bind of the agent's.
            Err(Errno::EPERM | Errno::EBUSY) if typ == "sysfs" => {
                mount(
                    Some("/sys"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(Error::sys(what()))?;
                mount(
                    None::<&str>,
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
                    None::<&str>,
                )
                .map_err(Error::sys(what()))?;
            }
            Err(e) => return Err(Error::sys(what())(e)),
        }
    }
    if !options.propagation.is_empty() {
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            options.propagation,
            None::<&str>,
        )
        .map_err(Error::sys(what()))?;
    }
    Ok(())
}

/// The devices every container gets on a tmpfs /dev (as runc does).
fn create_default_devices(rootfs: &Path) -> Result<(), Error> {
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = rootfs.join("dev").join(name);
        make_node(
            &path,
            SFlag::S_IFCHR,
            major,
            minor,
            0o666,
            Path::new("/dev").join(name),
        )?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let path = rootfs.join("dev").join(link);
        match std::os::unix::fs::symlink(target, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("cannot create {}", path.display()))(e)),
        }
    }
    Ok(())
}

/// mknod, or a bind of the agent's node where mknod is not allowed.
fn make_node(
    path: &Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    fallback: PathBuf,
) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(Error::io(format!("cannot create {}", parent.display())))?;
    }
    let _ = fs::remove_file(path);
    match mknod(
        path,
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    ) {
        Ok(()) => {
            // mknod is subject to the umask.
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(Error::io(format!("chmod {}", path.display())))
        }
        Err(Errno::EPERM) => {
            fs::File::create(path)
                .map_err(Error::io(format!("cannot create {}", path.display())))?;
            mount(
                Some(&fallback),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(Error::sys(format!("cannot bind {}", fallback.display())))
        }
        Err(e) => Err(Error::sys(format!("mknod {}", path.display()))(e)),
    }
}

fn create_device(rootfs: &Path, device: &LinuxDevice) -> Result<(), Error> {
    let kind = match device.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(Error::Invalid("device type 'a' is not a node".into()));
        }
    };
    let path = resolve_in_root(rootfs, device.path())?;
    let mode = device.file_mode().unwrap_or(0o666) & 0o7777;
    make_node(
        &path,
        kind,
        device.major() as u64,
        device.minor() as u64,
        mode,
        device.path().clone(),
    )?;
    let uid = device.uid().map(nix::unistd::Uid::from_raw);
    let gid = device.gid().map(nix::unistd::Gid::from_raw);
    nix::unistd::chown(&path, uid, gid).map_err(Error::sys(format!("chown {}", path.display())))
}

fn pivot_root(rootfs: &Path) -> Result<(), Error> {
    let old_root = fs::File::open("/").map_err(Error::io("open /"))?;
    nix::unistd::chdir(rootfs).map_err(Error::sys(format!("chdir {}", rootfs.display())))?;
    // pivot_root(".", "."): the old root ends up stacked under the new one
    // and is detached below, with no directory needed for it.
    nix::unistd::pivot_root(".", ".").map_err(Error::sys("pivot_root"))?;
    nix::unistd::fchdir(&old_root).map_err(Error::sys("fchdir"))?;
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(Error::sys("cannot make the old root a slave"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(Error::sys("cannot detach the old root"))?;
    nix::unistd::chdir("/").map_err(Error::sys("chdir /"))
}

fn mask_path(path: &str) -> Result<(), Error> {
    let result = match fs::metadata(path) {
        Err(_) => return Ok(()),
        Ok(meta) if meta.is_dir() => mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        ),
        Ok(_) => mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
    };
    result.map_err(Error::sys(format!("cannot mask {path}")))
}

fn readonly_path(path: &str) -> Result<(), Error> {
    match mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Err(Errno::ENOENT) => return Ok(()),
        other => other.map_err(Error::sys(format!("cannot bind {path}")))?,
    }
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(Error::sys(format!("cannot make {path} read-only")))
}

// --- The process ------------------------------------------------------------

/// A process ready to execute: everything applied but the exec itself.
struct Prepared {
    path: CString,
    args: Vec<CString>,
    env: Vec<CString>,
    /// A seccomp profile installed right before execve (no_new_privs).
    seccomp: Option<seccomp::Profile>,
}

impl Prepared {
    fn exec(self) -> Result<Infallible, Error> {
        reset_signals();
        if let Some(profile) = &self.seccomp {
            seccomp::install(profile)?;
        }
        let Err(e) = nix::unistd::execve(&self.path, &self.args, &self.env);
        Err(Error::sys(format!(
            "cannot execute {}",
            self.path.to_string_lossy()
        ))(e))
    }
}

/// Signals as a fresh process expects them: none blocked (the agent blocks
/// its init signals), none ignored (Rust ignores SIGPIPE).
fn reset_signals() {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal, sigprocmask};
    for sig in Signal::iterator() {
        if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
            // SAFETY: installing SIG_DFL, no handler code involved.
            let _ = unsafe { signal(sig, SigHandler::SigDfl) };
        }
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

fn cstring(what: &str, s: impl AsRef<[u8]>) -> Result<CString, Error> {
    CString::new(s.as_ref()).map_err(|_| Error::Invalid(format!("{what} contains a NUL byte")))
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Finds `name` like execvp does, with the PATH of the process's env.
fn find_executable(name: &str, env: &[String]) -> Result<PathBuf, Error> {
    let is_executable = |p: &Path| {
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let path = PathBuf::from(name);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(Error::Invalid(format!("executable {name} not found")))
        };
    }
    let path_var = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path_var
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| Error::Invalid(format!("executable file '{name}' not found in $PATH")))
}

fn rlimit_resource(typ: PosixRlimitType) -> libc::__rlimit_resource_t {
    match typ {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

fn cap_set(
    names: &Option<oci_spec::runtime::Capabilities>,
) -> Result<Option<HashSet<caps::Capability>>, Error> {
    let Some(names) = names else { return Ok(None) };
    let mut set = HashSet::new();
    for name in names {
        let text = format!("CAP_{name}");
        let cap = caps::Capability::from_str(&text)
            .map_err(|_| Error::Invalid(format!("unknown capability {text}")))?;
        set.insert(cap);
    }
    Ok(Some(set))
}

fn caps_error(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> Error {
    move |e| Error::Io {
        what: what.into(),
        source: io::Error::other(e.to_string()),
    }
}

fn prepare_process(process: &Process, seccomp: Option<&LinuxSeccomp>) -> Result<Prepared, Error> {
    let profile = seccomp.map(seccomp::compile).transpose()?;
    let args = process.args().clone().unwrap_or_default();
    let Some(arg0) = args.first() else {
        return Err(Error::Invalid("process.args is empty".into()));
    };
    let env = process.env().clone().unwrap_or_default();
    let cwd = process.cwd();
    nix::unistd::chdir(cwd).map_err(|e| {
        Error::Invalid(format!(
            "cannot change to the working directory {}: {e}",
            cwd.display()
        ))
    })?;
    for rlimit in process.rlimits().iter().flatten() {
        let limit = libc::rlimit {
            rlim_cur: rlimit.soft(),
            rlim_max: rlimit.hard(),
        };
        // SAFETY: setrlimit reads one rlimit from a valid pointer.
        Errno::result(unsafe { libc::setrlimit(rlimit_resource(rlimit.typ()), &limit) })
            .map_err(Error::sys(format!("cannot set {:?}", rlimit.typ())))?;
    }
    nix::unistd::setsid().map_err(Error::sys("setsid"))?;
    if process.terminal() == Some(true) {
        // SAFETY: TIOCSCTTY on our stdin (the PTY slave); no memory.
        Errno::result(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) })
            .map_err(Error::sys("cannot make the terminal the controlling one"))?;
    }
    let user = process.user();
    if let Some(umask) = user.umask() {
        nix::sys::stat::umask(Mode::from_bits_truncate(umask));
    }
    let path = find_executable(arg0, &env)?;

    // The seccomp filter goes on as runc puts it: with no_new_privs last,
    // right before execve; without, installing it takes CAP_SYS_ADMIN, so
    // before the change of user and capabilities, whose syscalls (and the
    // init's last words with the agent) the profile must then allow.
    let no_new_privs = process.no_new_privileges() == Some(true);
    let mut seccomp_at_exec = None;
    if let Some(profile) = profile {
        if no_new_privs {
            seccomp_at_exec = Some(profile);
        } else {
            seccomp::install(&profile)?;
        }
    }

    // Capabilities around the change of user, as runc does: drop the
    // bounding set first, keep the permitted set across setuid, then set
    // the final sets. A cap the agent itself lacks cannot be granted, so
    // each set is limited to the agent's bounding set.
    let available = caps::read(None, caps::CapSet::Bounding).map_err(caps_error("read caps"))?;
    let capabilities = process.capabilities().clone();
    let wanted = |f: fn(
        &oci_spec::runtime::LinuxCapabilities,
    ) -> &Option<oci_spec::runtime::Capabilities>|
     -> Result<Option<HashSet<caps::Capability>>, Error> {
        match &capabilities {
            Some(c) => Ok(cap_set(f(c))?.map(|s| s.intersection(&available).copied().collect())),
            None => Ok(None),
        }
    };
    let bounding = wanted(|c| c.bounding())?;
    let effective = wanted(|c| c.effective())?;
    let permitted = wanted(|c| c.permitted())?;
    let inheritable = wanted(|c| c.inheritable())?;
    let ambient = wanted(|c| c.ambient())?;
    if let Some(bounding) = &bounding {
        for cap in available.difference(bounding) {
            caps::drop(None, caps::CapSet::Bounding, *cap)
                .map_err(caps_error("drop bounding cap"))?;
        }
    }
    // SAFETY: prctl with integer arguments only.
    Errno::result(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) })
        .map_err(Error::sys("PR_SET_KEEPCAPS"))?;
    let gids: Vec<nix::unistd::Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&gids).map_err(Error::sys("setgroups"))?;
    nix::unistd::setresgid(user.gid().into(), user.gid().into(), user.gid().into())
        .map_err(Error::sys(format!("cannot set gid {}", user.gid())))?;
    nix::unistd::setresuid(user.uid().into(), user.uid().into(), user.uid().into())
        .map_err(Error::sys(format!("cannot set uid {}", user.uid())))?;
    // SAFETY: as above.
    Errno::result(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) })
        .map_err(Error::sys("PR_SET_KEEPCAPS"))?;
    if capabilities.is_some() {
        let empty = HashSet::new();
        caps::set(
            None,
            caps::CapSet::Effective,
            effective.as_ref().unwrap_or(&empty),
        )
        .map_err(caps_error("cannot set the effective capabilities"))?;
        caps::set(
            None,
            caps::CapSet::Inheritable,
            inheritable.as_ref().unwrap_or(&empty),
        )
        .map_err(caps_error("cannot set the inheritable capabilities"))?;
        caps::set(
            None,
            caps::CapSet::Permitted,
            permitted.as_ref().unwrap_or(&empty),
        )
        .map_err(caps_error("cannot set the permitted capabilities"))?;
        caps::clear(None, caps::CapSet::Ambient)
            .map_err(caps_error("cannot clear ambient caps"))?;
        for cap in ambient.iter().flatten() {
            caps::raise(None, caps::CapSet::Ambient, *cap)
                .map_err(caps_error("cannot raise an ambient capability"))?;
        }
    } else if user.uid() != 0 {
        // Like execve for a non-root user: no capabilities.
        caps::clear(None, caps::CapSet::Effective).map_err(caps_error("clear caps"))?;
        caps::clear(None, caps::CapSet::Permitted).map_err(caps_error("clear caps"))?;
    }
    if no_new_privs {
        // SAFETY: prctl with integer arguments only.
        Errno::result(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
            .map_err(Error::sys("PR_SET_NO_NEW_PRIVS"))?;
    }
    Ok(Prepared {
        path: cstring("the executable path", path.as_os_str().as_bytes())?,
        args: args
            .iter()
            .map(|a| cstring("an argument", a))
            .collect::<Result<_, _>>()?,
        env: env
            .iter()
            .map(|e| cstring("an environment variable", e))
            .collect::<Result<_, _>>()?,
        seccomp: seccomp_at_exec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options() {
        let opts: Vec<String> = [
            "nosuid", "noexec", "rbind", "ro", "rprivate", "mode=755", "size=64k",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let parsed = parse_mount_options(&opts);
        assert_eq!(
            parsed.flags,
            MsFlags::MS_NOSUID
                | MsFlags::MS_NOEXEC
                | MsFlags::MS_BIND
                | MsFlags::MS_REC
                | MsFlags::MS_RDONLY
        );
        assert_eq!(parsed.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(parsed.data, ["mode=755", "size=64k"]);
        let parsed = parse_mount_options(&["ro".into(), "rw".into()]);
        assert_eq!(parsed.flags, MsFlags::empty());
    }

    #[test]
    fn resolve_stays_in_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        std::os::unix::fs::symlink("/etc", r.join("a/abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", r.join("a/b/up")).unwrap();
        assert_eq!(
            resolve_in_root(r, Path::new("/a/b/c")).unwrap(),
            r.join("a/b/c")
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/a/abs/x")).unwrap(),
            r.join("etc/x")
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/a/b/up/etc")).unwrap(),
            r.join("etc")
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/../../x")).unwrap(),
            r.join("x")
        );
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &FromHelper::Ready).unwrap();
        write_frame(
            &mut buf,
            &FromHelper::Failed {
                invalid: true,
                message: "no".into(),
            },
        )
        .unwrap();
        let mut input = &buf[..];
        assert!(matches!(
            read_frame(&mut input).unwrap(),
            Some(FromHelper::Ready)
        ));
        assert!(matches!(
            read_frame(&mut input).unwrap(),
            Some(FromHelper::Failed { invalid: true, .. })
        ));
        assert!(read_frame::<FromHelper>(&mut input).unwrap().is_none());
        let mut huge = &(u32::MAX.to_le_bytes())[..];
        assert!(read_frame::<FromHelper>(&mut huge).is_err());
    }
}
