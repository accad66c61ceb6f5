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
//!
//! Here: the protocol and the helper's entry points; `rootfs.rs` builds the
//! container's root, `process.rs` prepares and executes its process.

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
use nix::sys::stat::{Mode, SFlag, makedev};
use oci_spec::runtime::{
    LinuxDevice, LinuxDeviceType, LinuxSeccomp, Mount, PosixRlimitType, Process, Spec,
};
use serde::{Deserialize, Serialize};

use crate::idmap::{self, IdMap};
use crate::seccomp;

pub mod in_root;
mod process;
mod rootfs;

use in_root::{Create, Found, Root};
use process::*;
use rootfs::*;
pub use rootfs::{MountOptions, parse_mount_options};

/// Descriptor of the socket to the agent in the helper.
pub const SYNC_FD: RawFd = 3;
/// Descriptor of the container's mount namespace in an exec helper.
pub const MNT_NS_FD: RawFd = 4;
/// Descriptor of the pod's user namespace in an init helper (when the
/// container is in one).
pub const INIT_USER_NS_FD: RawFd = 4;
/// Descriptor of the pod's user namespace in an exec helper.
pub const EXEC_USER_NS_FD: RawFd = 5;

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
    /// The container is in the pod's user namespace (at EXEC_USER_NS_FD).
    #[serde(default)]
    pub userns: bool,
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
    /// The pod's user namespace's mappings when the container is in it (its
    /// descriptor at INIT_USER_NS_FD): the root is built as guest root, with
    /// idmapped binds and mapped owners, then the namespace is entered.
    #[serde(default)]
    pub userns: Option<IdMap>,
}

/// The user namespace a helper enters last.
pub(crate) struct Userns {
    pub fd: OwnedFd,
    pub map: Option<IdMap>,
}

impl Userns {
    /// Takes the descriptor the agent put at `fd`.
    fn take(fd: RawFd, map: Option<IdMap>) -> Self {
        let _ = set_cloexec(fd);
        // SAFETY: the agent put the user namespace's descriptor at `fd`
        // before executing us; nothing else in this process owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Userns { fd, map }
    }

    fn enter(&self) -> Result<(), Error> {
        nix::sched::setns(self.fd.as_fd(), CloneFlags::CLONE_NEWUSER)
            .map_err(Error::sys("cannot enter the pod's user namespace"))
    }
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

impl From<idmap::Error> for Error {
    fn from(e: idmap::Error) -> Self {
        let idmap::Error::Invalid(message) = e;
        Error::Invalid(message)
    }
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
    let userns = config
        .userns
        .map(|map| Userns::take(INIT_USER_NS_FD, Some(map)));
    setup_rootfs(&config.rootfs, spec, userns.as_ref())?;
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
    let prepared = prepare_process(process, seccomp, userns.as_ref())?;
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
    let userns = config.userns.then(|| Userns::take(EXEC_USER_NS_FD, None));
    prepare_process(&config.process, config.seccomp.as_ref(), userns.as_ref())?.exec()
}

fn write_sysctl(key: &str, value: &str) -> Result<(), Error> {
    if key.is_empty() || key.contains("..") || key.contains('/') {
        return Err(Error::Invalid(format!("bad sysctl name '{key}'")));
    }
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    fs::write(&path, value).map_err(Error::io(format!("cannot set sysctl {key}")))
}

// --- The root filesystem ------------------------------------------------

#[cfg(test)]
mod tests;
