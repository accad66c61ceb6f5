//! Processes the agent starts: the one reaper that collects every child's
//! exit status and hands it to whoever waits for that pid, and the spawn
//! primitive that clones a child into new (or a container's) namespaces and
//! re-executes the agent binary there as the setup helper (`init.rs`).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::sync::watch;

/// The first argument that makes the agent binary run as the setup helper
/// in a freshly cloned child (see `init.rs`).
pub const HELPER_ARG: &str = "__frakti-helper";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the agent binary (/proc/self/exe)")]
    Exe(#[source] io::Error),
    #[error("cannot join the {kind} namespace")]
    Setns {
        kind: &'static str,
        #[source]
        source: Errno,
    },
    #[error("cannot duplicate a file descriptor")]
    Dup(#[source] Errno),
    #[error("clone failed")]
    Clone(#[source] Errno),
    #[error("the spawning thread failed")]
    Thread,
    #[error("cannot send signal {signal} to pid {pid}")]
    Signal {
        pid: i32,
        signal: i32,
        #[source]
        source: Errno,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal number.
    pub code: i32,
    /// The signal that killed it, 0 if it exited.
    pub signal: i32,
    pub at: SystemTime,
}

impl Exit {
    fn from_status(status: WaitStatus) -> Option<(i32, Exit)> {
        let at = SystemTime::now();
        match status {
            WaitStatus::Exited(pid, code) => Some((
                pid.as_raw(),
                Exit {
                    code,
                    signal: 0,
                    at,
                },
            )),
            WaitStatus::Signaled(pid, signal, _) => Some((
                pid.as_raw(),
                Exit {
                    code: 128 + signal as i32,
                    signal: signal as i32,
                    at,
                },
            )),
            _ => None,
        }
    }
}

/// Receives a process's exit once the reaper has collected it.
pub type ExitWatch = watch::Receiver<Option<Exit>>;

/// The only place that calls `waitpid`: collects every exited child (the
/// agent's own and, as PID 1, every orphan of the guest) and dispatches the
/// status by pid to the process that was registered for it, so no waiter
/// loses an exit status to a global reaper.
#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, watch::Sender<Option<Exit>>>>,
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<i32, watch::Sender<Option<Exit>>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Collects every exited child without blocking (call on SIGCHLD).
    pub fn reap(&self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    if let Some((pid, exit)) = Exit::from_status(status) {
                        // Blocks while a spawn is registering: a child that
                        // exits at once still finds its waiter.
                        if let Some(tx) = self.waiters().remove(&pid) {
                            tracing::debug!(pid, code = exit.code, "process exited");
                            let _ = tx.send(Some(exit));
                        }
                    }
                }
            }
        }
    }

    /// Runs `spawn` (which starts a child and returns its pid) with the
    /// waiter table locked, and registers the child before the reaper can
    /// dispatch its exit.
    fn register<T>(
        &self,
        spawn: impl FnOnce() -> Result<(i32, T), Error>,
    ) -> Result<(i32, T, ExitWatch), Error> {
        let mut waiters = self.waiters();
        let (pid, extra) = spawn()?;
        let (tx, rx) = watch::channel(None);
        waiters.insert(pid, tx);
        Ok((pid, extra, rx))
    }
}

/// What to clone and how: namespaces to create, namespaces to join, and
/// which of the agent's descriptors become the child's 0, 1, 2, ...
pub struct SpawnSpec {
    /// CLONE_NEW* flags for namespaces the child gets fresh.
    pub new_namespaces: CloneFlags,
    /// Namespaces (pid, ipc, uts, cgroup; never mnt) the child joins: the
    /// spawning thread enters them before it clones.
    pub join: Vec<(OwnedFd, CloneFlags)>,
    /// The child's descriptors 0..n, in order.
    pub child_fds: Vec<OwnedFd>,
}

/// A child spawned by [`spawn_helper`].
pub struct Spawned {
    pub pid: i32,
    /// pidfd of the child: signals can never hit a recycled pid.
    pub pidfd: OwnedFd,
    pub exit: ExitWatch,
}

/// The agent binary, opened once so that a helper can be executed whatever
/// mount namespace or root the spawning thread is in.
pub struct AgentExe(File);

impl AgentExe {
    pub fn open() -> Result<Self, Error> {
        File::open("/proc/self/exe").map(Self).map_err(Error::Exe)
    }

    pub fn try_clone(&self) -> Result<Self, Error> {
        self.0.try_clone().map(Self).map_err(Error::Exe)
    }
}

fn ns_name(flag: CloneFlags) -> &'static str {
    match flag {
        CloneFlags::CLONE_NEWPID => "pid",
        CloneFlags::CLONE_NEWIPC => "ipc",
        CloneFlags::CLONE_NEWUTS => "uts",
        CloneFlags::CLONE_NEWNS => "mount",
        CloneFlags::CLONE_NEWCGROUP => "cgroup",
        _ => "other",
    }
}

/// Clones a child that runs the agent binary as the setup helper
/// (`frakti-agent __frakti-helper`), with `spec`'s namespaces and
/// descriptors. The clone happens on a short-lived thread of its own, so the
/// namespaces it joins never leak into the tokio workers; the child only
/// duplicates descriptors and executes, which is safe after cloning a
/// multi-threaded process. Blocks: call from a blocking context.
pub fn spawn_helper(reaper: &Reaper, exe: &AgentExe, spec: SpawnSpec) -> Result<Spawned, Error> {
    let exe_fd = exe.0.as_raw_fd();
    std::thread::scope(|scope| {
        scope
            .spawn(move || spawn_on_this_thread(reaper, exe_fd, spec))
            .join()
            .map_err(|_| Error::Thread)?
    })
}

fn spawn_on_this_thread(reaper: &Reaper, exe_fd: RawFd, spec: SpawnSpec) -> Result<Spawned, Error> {
    for (fd, kind) in &spec.join {
        nix::sched::setns(fd.as_fd(), *kind).map_err(|source| Error::Setns {
            kind: ns_name(*kind),
            source,
        })?;
    }
    // Move the child's descriptors above the range they are duplicated
    // into, so no dup2 in the child overwrites a source not yet copied.
    let mut sources = Vec::with_capacity(spec.child_fds.len());
    for fd in &spec.child_fds {
        let high =
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(64)).map_err(Error::Dup)?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that we own.
        sources.push(unsafe { OwnedFd::from_raw_fd(high) });
    }
    let source_fds: Vec<RawFd> = sources.iter().map(|fd| fd.as_raw_fd()).collect();
    // Built before the clone: the child must not allocate.
    let argv0 = c"frakti-agent";
    let argv1 = CString::new(HELPER_ARG).map_err(|_| Error::Thread)?;
    let argv = [argv0.as_ptr(), argv1.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    let empty = c"";
    let flags = spec.new_namespaces.bits() as libc::c_ulong
        | libc::CLONE_PIDFD as libc::c_ulong
        | libc::SIGCHLD as libc::c_ulong;

    let (pid, pidfd, exit) = reaper.register(|| {
        let mut pidfd: libc::c_int = -1;
        // SAFETY: a fork-like clone (no new stack: the child runs on a
        // copy of this one). CLONE_PIDFD stores the pidfd into `pidfd`,
        // which outlives the call. In the child only async-signal-safe
        // calls follow (dup2, execveat via syscall, _exit) on memory
        // prepared before the clone.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone,
                flags,
                0usize,
                &mut pidfd as *mut libc::c_int,
                0usize,
                0usize,
            )
        };
        if ret < 0 {
            return Err(Error::Clone(Errno::last()));
        }
        if ret == 0 {
            // SAFETY: we are the child; see above.
            unsafe { exec_helper_in_child(&source_fds, exe_fd, empty.as_ptr(), &argv, &envp) }
        }
        // SAFETY: the kernel gave us this pidfd and nobody else owns it.
        Ok((ret as i32, unsafe { OwnedFd::from_raw_fd(pidfd) }))
    })?;
    drop(sources);
    Ok(Spawned { pid, pidfd, exit })
}

/// The child half of [`spawn_on_this_thread`].
///
/// # Safety
/// Only to be called in a freshly cloned child; the pointers must be valid.
unsafe fn exec_helper_in_child(
    fds: &[RawFd],
    exe_fd: RawFd,
    empty: *const libc::c_char,
    argv: &[*const libc::c_char; 3],
    envp: &[*const libc::c_char; 1],
) -> ! {
    for (target, source) in fds.iter().enumerate() {
        // SAFETY: dup2 on descriptors we own; async-signal-safe.
        if unsafe { libc::dup2(*source, target as RawFd) } < 0 {
            // SAFETY: _exit is async-signal-safe and never returns.
            unsafe { libc::_exit(126) };
        }
    }
    // SAFETY: execveat of the agent binary by descriptor with valid,
    // NULL-terminated argv/envp; on failure _exit.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            exe_fd,
            empty,
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
        libc::_exit(127)
    }
}

/// Sends `signal` through a pidfd (never reaches a recycled pid). A process
/// that has already exited is not an error.
/// A pidfd for `pid`: from then on it names that process only, even once
/// the pid is reused.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).map_err(|_| Errno::EINVAL)?;
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this new descriptor; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn signal_pidfd(pidfd: &OwnedFd, pid: i32, signal: i32) -> Result<(), Error> {
    // SAFETY: pidfd_send_signal with a valid pidfd and no siginfo.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    match ret {
        0 => Ok(()),
        _ => match Errno::last() {
            Errno::ESRCH => Ok(()),
            source => Err(Error::Signal {
                pid,
                signal,
                source,
            }),
        },
    }
}

/// Checks that `signal` is a signal number the kernel knows.
pub fn valid_signal(signal: i32) -> bool {
    Signal::try_from(signal).is_ok() || (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&signal)
}

/// Waits for an exit on a watch (returns at once when it has happened).
pub async fn wait_exit(exit: &ExitWatch) -> Exit {
    let mut rx = exit.clone();
    loop {
        if let Some(exit) = *rx.borrow_and_update() {
            return exit;
        }
        if rx.changed().await.is_err() {
            // The reaper dropped the sender without a status: cannot
            // happen, but never hang a caller on it.
            return Exit {
                code: 255,
                signal: 0,
                at: SystemTime::now(),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        let pid = nix::unistd::Pid::from_raw(7);
        let (_, exit) = Exit::from_status(WaitStatus::Exited(pid, 3)).unwrap();
        assert_eq!((exit.code, exit.signal), (3, 0));
        let (_, exit) =
            Exit::from_status(WaitStatus::Signaled(pid, Signal::SIGKILL, false)).unwrap();
        assert_eq!((exit.code, exit.signal), (137, 9));
        assert!(Exit::from_status(WaitStatus::StillAlive).is_none());
    }

    #[test]
    fn signals() {
        assert!(valid_signal(9));
        assert!(valid_signal(libc::SIGRTMIN() + 1));
        assert!(!valid_signal(0));
        assert!(!valid_signal(1000));
    }
}
