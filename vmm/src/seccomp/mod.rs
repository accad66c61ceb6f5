//! Per-thread seccomp filters.
//!
//! Every long-lived thread of the VMM installs, on itself, an allow-list of
//! the system calls its job needs ([`apply`]). Anything else ends the process
//! (`SECCOMP_RET_KILL_PROCESS`), so a guest that gains code execution inside,
//! say, device emulation on a vCPU thread cannot `execve`, open files, or
//! create sockets.
//!
//! The kinds of thread ([`ThreadKind`]):
//!
//! * [`ThreadKind::Vcpu`]: runs `KVM_RUN` and a fixed set of per-vCPU KVM
//!   ioctls, emulates port/MMIO exits (reads and writes on already-open
//!   descriptors), and is kicked out of `KVM_RUN` with a real-time signal.
//! * [`ThreadKind::Vmm`]: the main thread's epoll event loop, device back
//!   ends (eventfds, timers, disk files it may open at runtime), VM-wide KVM
//!   ioctls, the terminal, and signalling the vCPU threads.
//! * [`ThreadKind::Api`]: serves the control socket and reads `/proc/self/*`
//!   for metrics.
//! * [`ThreadKind::Device`]: virtio queues and disk I/O;
//!   [`ThreadKind::Console`]: writes the guest's console output.
//!
//! All three also get the runtime's basics (`runtime_syscalls`): what Rust's
//! std, glibc and `tracing` (to stderr) need on any thread.
//!
//! The allow-list of each kind is in `allow_lists.rs`, the rule building
//! blocks (argument comparisons, ioctl requests, KVM ioctl numbers) in
//! `rules.rs`, and the tests that run each filter on a real thread in
//! `tests.rs`.
//!
//! # Filters stack
//!
//! A seccomp filter is inherited by every thread the filtered thread spawns,
//! and a thread with several filters may only make calls that *all* of them
//! allow. So the main thread must spawn its vCPU and API threads *before* it
//! installs the [`ThreadKind::Vmm`] filter (the Vmm filter does not allow
//! `KVM_RUN`, for instance). Threads spawned later from the main thread (e.g.
//! helper workers) keep the Vmm filter and may narrow it further with their own
//! filter: the Vmm filter allows `prctl(PR_SET_NO_NEW_PRIVS)` and
//! `seccomp(SECCOMP_SET_MODE_FILTER)` for that.
//!
//! The filters target x86-64 (the only architecture Frakti runs on), and
//! `seccompiler::apply_filter` sets `PR_SET_NO_NEW_PRIVS` before installing
//! the program, so no privilege is needed.

use seccompiler::{BackendError, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The job of a thread, which selects its seccomp filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: event loop, device back ends, VM-wide KVM ioctls.
    Vmm,
    /// A vCPU thread: `KVM_RUN` and exit handling.
    Vcpu,
    /// The API thread: the control socket and metrics.
    Api,
    /// The device thread: virtio queue processing and disk I/O.
    Device,
    /// The console writer: writes what the guest printed to stdout or the
    /// console file, which are open already.
    Console,
}

/// Errors from building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A rule of the allow-list could not be expressed (a bug in this module).
    #[error("invalid seccomp rule in the {kind:?} thread's allow-list")]
    Rule {
        /// The thread kind whose allow-list was being built.
        kind: ThreadKind,
        /// The cause.
        #[source]
        source: BackendError,
    },
    /// The allow-list could not be compiled to BPF (e.g. the mismatch action
    /// is `Allow`, identical to the match action).
    #[error("failed to compile the {kind:?} thread's seccomp filter")]
    Compile {
        /// The thread kind whose filter was being compiled.
        kind: ThreadKind,
        /// The cause.
        #[source]
        source: BackendError,
    },
    /// The kernel refused the filter (`prctl` or `seccomp` failed).
    #[error("failed to install the {kind:?} thread's seccomp filter")]
    Install {
        /// The thread kind whose filter was being installed.
        kind: ThreadKind,
        /// The cause.
        #[source]
        source: seccompiler::Error,
    },
}

/// Builds the BPF program for `kind`; syscalls outside the list get `mismatch`.
pub fn filter(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, Error> {
    let allow = match kind {
        ThreadKind::Vmm => allow_lists::vmm_thread_rules(),
        ThreadKind::Vcpu => allow_lists::vcpu_thread_rules(),
        ThreadKind::Api => allow_lists::api_thread_rules(),
        ThreadKind::Device => allow_lists::device_thread_rules(),
        ThreadKind::Console => allow_lists::console_thread_rules(),
    }
    .map_err(|source| Error::Rule { kind, source })?;
    let filter = SeccompFilter::new(allow.0, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| Error::Compile { kind, source })?;
    BpfProgram::try_from(filter).map_err(|source| Error::Compile { kind, source })
}

/// Installs the production filter (mismatch = KillProcess) on the calling thread.
pub fn apply(kind: ThreadKind) -> Result<(), Error> {
    apply_with(kind, SeccompAction::KillProcess)
}

/// Installs a filter with a chosen mismatch action on the calling thread (tests, debugging).
///
/// `SeccompAction::Log` is handy to discover a missing syscall: the call goes
/// through and the kernel logs it to the audit log.
pub fn apply_with(kind: ThreadKind, mismatch: SeccompAction) -> Result<(), Error> {
    let program = filter(kind, mismatch)?;
    // `apply_filter` sets PR_SET_NO_NEW_PRIVS itself, then installs the
    // program on the calling thread only (no TSYNC).
    seccompiler::apply_filter(&program).map_err(|source| Error::Install { kind, source })
}

mod allow_lists;
mod rules;
#[cfg(test)]
mod tests;
