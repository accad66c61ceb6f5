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

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

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
        ThreadKind::Vmm => vmm_thread_rules(),
        ThreadKind::Vcpu => vcpu_thread_rules(),
        ThreadKind::Api => api_thread_rules(),
        ThreadKind::Device => device_thread_rules(),
        ThreadKind::Console => console_thread_rules(),
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

// ---------------------------------------------------------------------------
// Allow-lists, one function per thread kind.
// ---------------------------------------------------------------------------

/// What every thread needs: Rust std and glibc (allocation, locks, thread-locals,
/// signal frames, the stack-overflow handler's alternate stack, thread exit),
/// clocks and sleeps, and `tracing` output to stderr.
///
/// `mmap`, `mprotect` and `fcntl` are in [`runtime_rules`], restricted by
/// argument.
fn runtime_syscalls() -> &'static [i64] {
    &[
        // Heap and thread stacks (munmap/madvise also free a thread's stack
        // at exit, mremap grows large allocations).
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        // Mutexes, condvars, joins, once-cells.
        libc::SYS_futex,
        // Signals: return from a handler, masks (glibc blocks all signals
        // around thread creation and exit), std's alternate signal stack, and
        // `pthread_kill`/`raise`/`abort`.
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_tgkill,
        // A signal may interrupt a sleep; the kernel resumes it with this.
        libc::SYS_restart_syscall,
        libc::SYS_sched_yield,
        // Clocks (normally vDSO, the syscall is the fallback) and sleeps.
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        // HashMap seeds.
        libc::SYS_getrandom,
        // Identity, for logs and `raise`.
        libc::SYS_gettid,
        libc::SYS_getpid,
        // glibc registers restartable sequences per thread.
        libc::SYS_rseq,
        // `tracing` to stderr, and closing descriptors the thread owns.
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_close,
        // File metadata of open descriptors (std uses statx, glibc's fstat
        // is newfstatat(fd, "", AT_EMPTY_PATH)).
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        // Thread and process exit.
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
}

/// [`runtime_syscalls`] plus the runtime's calls allowed only with some
/// arguments.
fn runtime_rules(allow: &mut AllowList) -> Result<(), BackendError> {
    allow.syscalls(runtime_syscalls());
    // mmap(addr, len, prot, ...) and mprotect(addr, len, prot) only without
    // PROT_EXEC (prot is arg 2): the VMM never creates executable memory at
    // runtime, so a compromised thread cannot either.
    let prot_exec = u64::from(libc::PROT_EXEC.unsigned_abs());
    allow.syscall_if(libc::SYS_mmap, vec![arg_masked_eq(2, prot_exec, 0u64)?]);
    allow.syscall_if(libc::SYS_mprotect, vec![arg_masked_eq(2, prot_exec, 0u64)?]);
    // fcntl(fd, F_GETFD): std's debug builds check that a descriptor is
    // still open before closing it (dropping a File or an EventFd).
    allow.syscall_if(
        libc::SYS_fcntl,
        vec![arg_eq(1, libc::F_GETFD.unsigned_abs())?],
    );
    Ok(())
}

/// A vCPU thread: `KVM_RUN` and exit handling on descriptors opened before
/// the filter (eventfds, the serial output file or stdout, disk files), and
/// the real-time "kick" signal. No `open`, `socket`, `execve` or `clone`.
fn vcpu_syscalls() -> &'static [i64] {
    &[
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_lseek,
        // The kick signal's handler may be (re)installed on this thread.
        libc::SYS_rt_sigaction,
    ]
}

/// The vCPU ioctls, on the vCPU fd: run, and save/restore of its state.
fn vcpu_ioctls() -> Vec<libc::c_ulong> {
    use kvm_nr::*;
    vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_SET_SREGS(),
        KVM_GET_LAPIC(),
        KVM_SET_LAPIC(),
        KVM_GET_MSRS(),
        KVM_SET_MSRS(),
        KVM_GET_FPU(),
        KVM_SET_FPU(),
        KVM_GET_MP_STATE(),
        KVM_SET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_KVMCLOCK_CTRL(),
    ]
}

fn vcpu_thread_rules() -> Result<AllowList, BackendError> {
    let mut allow = AllowList::default();
    runtime_rules(&mut allow)?;
    allow.syscalls(vcpu_syscalls());
    allow.syscall_if(libc::SYS_ioctl, ioctl_requests(vcpu_ioctls())?);
    Ok(allow)
}

/// The main thread: an epoll event loop over eventfds, signalfd, timerfds and
/// the terminal; disk back ends (files may be opened at runtime); signalling
/// vCPU threads; spawning helper threads; removing the API socket at exit.
fn vmm_syscalls() -> &'static [i64] {
    &[
        // Event loop.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_signalfd4,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_accept4,
        // I/O on descriptors and disk back ends.
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_lseek,
        libc::SYS_openat,
        libc::SYS_fcntl,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        // Signals: handlers, and kicking vCPU threads.
        libc::SYS_rt_sigaction,
        libc::SYS_kill,
        // std::thread::spawn after the filter: glibc's pthread_create uses
        // clone3 (clone as fallback). clone3's flags live in user memory,
        // which a BPF filter cannot read, so both are allowed whole; with
        // execve denied a forked child could only run this same filtered code.
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_sched_getaffinity,
    ]
}

/// VM-wide KVM ioctls used after boot, and the terminal's.
fn vmm_ioctls() -> Vec<libc::c_ulong> {
    use kvm_nr::*;
    vec![
        KVM_IRQFD(),
        KVM_IOEVENTFD(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_IRQ_LINE(),
        KVM_GET_CLOCK(),
        KVM_SET_CLOCK(),
        // Raw mode on the console, its size, and non-blocking stdin.
        libc::TCGETS,
        libc::TCSETS,
        libc::TIOCGWINSZ,
        libc::FIONBIO,
    ]
}

/// `prctl` only for naming threads and for a spawned thread to install its
/// own, narrower filter (`seccomp` with `SECCOMP_SET_MODE_FILTER`).
fn vmm_thread_control_rules(allow: &mut AllowList) -> Result<(), BackendError> {
    let prctl_options = [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_SET_NO_NEW_PRIVS,
        libc::PR_GET_NO_NEW_PRIVS,
    ];
    let prctl = prctl_options
        .iter()
        .map(|&option| arg_eq(0, option.unsigned_abs()))
        .collect::<Result<Vec<_>, _>>()?;
    allow.syscall_if(libc::SYS_prctl, prctl);
    allow.syscall_if(
        libc::SYS_seccomp,
        vec![arg_eq(0, libc::SECCOMP_SET_MODE_FILTER)?],
    );
    Ok(())
}

fn vmm_thread_rules() -> Result<AllowList, BackendError> {
    let mut allow = AllowList::default();
    runtime_rules(&mut allow)?;
    allow.syscalls(vmm_syscalls());
    allow.syscall_if(libc::SYS_ioctl, ioctl_requests(vmm_ioctls())?);
    vmm_thread_control_rules(&mut allow)?;
    Ok(allow)
}

/// The API thread: accept and serve connections on the listening socket it
/// was handed (no `socket`/`bind`/`connect`, no `open`: the VMM thread acts
/// on its requests), poll them, and wake the VMM thread through an eventfd
/// (a write).
fn api_syscalls() -> &'static [i64] {
    &[
        libc::SYS_accept4,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_fcntl,
        // Its runtime (tokio) is built before the filter: it only polls.
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
    ]
}

/// Device thread: an event loop over queue eventfds, guest memory copies
/// and disk I/O on files that are already open. No opens, no ioctls.
fn device_syscalls() -> &'static [i64] {
    &[
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_lseek,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        // vsock: host clients on the listening socket, streams to them.
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_shutdown,
        // std reads sockets with recv() and writes them with
        // send(MSG_NOSIGNAL).
        libc::SYS_recvfrom,
        libc::SYS_sendto,
    ]
}

fn device_thread_rules() -> Result<AllowList, BackendError> {
    let mut allow = AllowList::default();
    runtime_rules(&mut allow)?;
    allow.syscalls(device_syscalls());
    // vsock: a guest connection to host port P opens a unix socket.
    allow.syscall_if(libc::SYS_socket, vec![arg_eq(0, libc::AF_UNIX as u64)?]);
    Ok(allow)
}

/// The runtime's basics cover it: write/writev to open descriptors, futex.
fn console_thread_rules() -> Result<AllowList, BackendError> {
    let mut allow = AllowList::default();
    runtime_rules(&mut allow)?;
    Ok(allow)
}

fn api_thread_rules() -> Result<AllowList, BackendError> {
    let mut allow = AllowList::default();
    runtime_rules(&mut allow)?;
    allow.syscalls(api_syscalls());
    // std's set_nonblocking on sockets is ioctl(FIONBIO).
    allow.syscall_if(libc::SYS_ioctl, ioctl_requests(vec![libc::FIONBIO])?);
    Ok(allow)
}

// ---------------------------------------------------------------------------
// Building blocks.
// ---------------------------------------------------------------------------

/// Syscall number -> rules (any one matching allows the call); an empty rule
/// list allows the syscall whatever its arguments.
#[derive(Default)]
struct AllowList(BTreeMap<i64, Vec<SeccompRule>>);

impl AllowList {
    /// Allows `syscalls` whatever their arguments.
    fn syscalls(&mut self, syscalls: &[i64]) {
        for &nr in syscalls {
            self.0.insert(nr, Vec::new());
        }
    }

    /// Allows `nr` when one of `rules` matches. A syscall already allowed
    /// unconditionally stays so.
    fn syscall_if(&mut self, nr: i64, rules: Vec<SeccompRule>) {
        if rules.is_empty() {
            return;
        }
        match self.0.entry(nr) {
            Entry::Vacant(entry) => {
                entry.insert(rules);
            }
            Entry::Occupied(mut entry) => {
                if !entry.get().is_empty() {
                    entry.get_mut().extend(rules);
                }
            }
        }
    }
}

/// A rule matching when argument `index` equals `value`.
///
/// The comparison is on the low 32 bits, which is what the kernel looks at
/// for the `int`/`unsigned int` arguments this module filters (e.g. an
/// ioctl's request is `unsigned int cmd` in the kernel).
fn arg_eq(index: u8, value: impl Into<u64>) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value.into(),
    )?])
}

/// A rule matching when argument `index`, masked with `mask`, equals `value`.
fn arg_masked_eq(
    index: u8,
    mask: impl Into<u64>,
    value: impl Into<u64>,
) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask.into()),
        value.into(),
    )?])
}

/// `ioctl(fd, request, ...)` rules: one per allowed request (arg 1).
fn ioctl_requests(requests: Vec<libc::c_ulong>) -> Result<Vec<SeccompRule>, BackendError> {
    requests
        .into_iter()
        .map(|request| arg_eq(1, request))
        .collect()
}

/// KVM ioctl request numbers (include/uapi/linux/kvm.h), computed with
/// vmm-sys-util's macros from the kvm-bindings structures, as kvm-ioctls does
/// (kvm-ioctls keeps its own copies private).
mod kvm_nr {
    use kvm_bindings::{
        KVMIO, kvm_clock_data, kvm_fpu, kvm_ioeventfd, kvm_irq_level, kvm_irqfd, kvm_lapic_state,
        kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    // vCPU fd.
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);

    // VM fd.
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
    ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
    ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
    ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::thread;

    use super::*;

    const EPERM: SeccompAction = SeccompAction::Errno(libc::EPERM as u32);

    /// A syscall's result: `Ok(return value)` or `Err(errno)`.
    type Sys = Result<i64, i32>;

    fn sys(rc: impl Into<i64>) -> Sys {
        let rc = rc.into();
        if rc < 0 {
            Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or_default())
        } else {
            Ok(rc)
        }
    }

    /// Runs `body` on a fresh thread after installing `kind`'s filter with
    /// EPERM as the mismatch action, and returns what it returned. The body
    /// only records results: assertions run on the test thread, after join.
    fn on_filtered_thread<T: Send + 'static>(
        kind: ThreadKind,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        thread::spawn(move || {
            apply_with(kind, EPERM)?;
            Ok::<T, Error>(body())
        })
        .join()
        .expect("filtered thread panicked")
        .expect("installing the filter failed")
    }

    /// execve of a path that does not exist: ENOENT if the call reaches the
    /// kernel, EPERM if the filter stops it. (A path that does exist would
    /// replace the test process if the filter were broken.)
    fn try_execve() -> Sys {
        let path: &CStr = c"/nonexistent/frakti-seccomp-test";
        let argv = [path.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: path, argv and envp are valid and NULL-terminated; the path
        // does not exist, so on success nothing would be executed anyway.
        sys(unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) })
    }

    fn try_socket() -> Sys {
        // SAFETY: plain syscall with integer arguments; a returned fd is
        // closed right away.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd >= 0 {
            // SAFETY: fd was just returned by socket() and is owned here.
            unsafe { libc::close(fd) };
        }
        sys(fd)
    }

    fn try_inet_socket() -> Sys {
        // SAFETY: plain syscall with integer arguments; a returned fd is
        // closed right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd >= 0 {
            // SAFETY: fd was just returned by socket() and is owned here.
            unsafe { libc::close(fd) };
        }
        sys(fd)
    }

    fn try_ioctl(fd: i32, request: libc::c_ulong) -> Sys {
        // A buffer larger than any structure these requests take, in case
        // the kernel copies to or from it.
        let mut buf = [0u8; 4096];
        // SAFETY: buf is valid for reads and writes of any of the structures
        // involved, and lives across the call.
        sys(unsafe { libc::ioctl(fd, request, buf.as_mut_ptr()) })
    }

    fn try_getpid() -> Sys {
        // SAFETY: getpid has no preconditions.
        sys(unsafe { libc::getpid() })
    }

    fn try_write_stderr() -> Sys {
        let msg = b"seccomp test: stderr is still writable under the filter\n";
        // SAFETY: msg is valid for msg.len() bytes.
        sys(unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) } as i64)
    }

    #[test]
    fn every_thread_kind_builds() {
        for kind in [
            ThreadKind::Vmm,
            ThreadKind::Vcpu,
            ThreadKind::Api,
            ThreadKind::Device,
            ThreadKind::Console,
        ] {
            for mismatch in [SeccompAction::KillProcess, SeccompAction::Trap, EPERM] {
                let program = filter(kind, mismatch).expect("filter builds");
                assert!(!program.is_empty(), "{kind:?}");
                // The kernel caps a program at BPF_MAXINSNS = 4096.
                assert!(program.len() < 4096, "{kind:?}: {}", program.len());
            }
            // Allow as the mismatch action would allow everything: refused.
            assert!(matches!(
                filter(kind, SeccompAction::Allow),
                Err(Error::Compile { .. })
            ));
        }
    }

    #[test]
    fn kvm_ioctl_numbers_match_the_kernel_abi() {
        // Values from the kernel's include/uapi/linux/kvm.h on x86-64.
        assert_eq!(kvm_nr::KVM_RUN(), 0xae80);
        assert_eq!(kvm_nr::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(kvm_nr::KVM_SET_SREGS(), 0x4138_ae84);
        assert_eq!(kvm_nr::KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(kvm_nr::KVM_GET_LAPIC(), 0x8400_ae8e);
        assert_eq!(kvm_nr::KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(kvm_nr::KVM_KVMCLOCK_CTRL(), 0xaead);
        assert_eq!(kvm_nr::KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(kvm_nr::KVM_IRQFD(), 0x4020_ae76);
        assert_eq!(kvm_nr::KVM_IOEVENTFD(), 0x4040_ae79);
        assert_eq!(kvm_nr::KVM_IRQ_LINE(), 0x4008_ae61);
        assert_eq!(kvm_nr::KVM_GET_CLOCK(), 0x8030_ae7c);
    }

    #[derive(Debug)]
    struct VcpuOutcome {
        execve: Sys,
        socket: Sys,
        open: Sys,
        getpid: Sys,
        stderr: Sys,
        read_dev_null: Sys,
        fcntl_getfd: Sys,
        fcntl_setfl: Sys,
    }

    #[test]
    fn vcpu_filter_denies_exec_socket_and_open_but_keeps_the_runtime() {
        // Without a filter, execve of the missing path reaches the kernel.
        assert_eq!(try_execve(), Err(libc::ENOENT));

        let dev_null = File::open("/dev/null").expect("open /dev/null");
        let outcome = on_filtered_thread(ThreadKind::Vcpu, move || {
            let mut dev_null = dev_null;
            let mut buf = [0u8; 8];
            let fd = dev_null.as_raw_fd();
            // SAFETY: fd is open (owned by dev_null); F_GETFD takes no
            // pointer and F_SETFL with the flags it has changes nothing.
            let fcntl_getfd = sys(unsafe { libc::fcntl(fd, libc::F_GETFD) });
            // SAFETY: as above.
            let fcntl_setfl = sys(unsafe { libc::fcntl(fd, libc::F_SETFL, 0) });
            VcpuOutcome {
                fcntl_getfd,
                fcntl_setfl,
                execve: try_execve(),
                socket: try_socket(),
                open: File::open("/dev/null")
                    .map(|_| 0)
                    .map_err(|e| e.raw_os_error().unwrap_or_default()),
                getpid: try_getpid(),
                stderr: try_write_stderr(),
                read_dev_null: dev_null
                    .read(&mut buf)
                    .map(|n| n as i64)
                    .map_err(|e| e.raw_os_error().unwrap_or_default()),
            }
            // dev_null is closed here, under the filter.
        });

        assert_eq!(outcome.execve, Err(libc::EPERM), "{outcome:?}");
        assert_eq!(outcome.socket, Err(libc::EPERM), "{outcome:?}");
        assert_eq!(outcome.open, Err(libc::EPERM), "{outcome:?}");
        assert_eq!(outcome.getpid, Ok(i64::from(std::process::id())));
        assert!(matches!(outcome.stderr, Ok(n) if n > 0), "{outcome:?}");
        assert_eq!(outcome.read_dev_null, Ok(0), "{outcome:?}");
        assert_eq!(outcome.fcntl_getfd, Ok(i64::from(libc::FD_CLOEXEC)));
        assert_eq!(outcome.fcntl_setfl, Err(libc::EPERM), "{outcome:?}");
    }

    #[test]
    fn vcpu_filter_allows_only_listed_ioctl_requests() {
        let dev_null = File::open("/dev/null").expect("open /dev/null");
        let fd = dev_null.as_raw_fd();
        let (unlisted, listed) = on_filtered_thread(ThreadKind::Vcpu, move || {
            let unlisted = try_ioctl(2, libc::TIOCGWINSZ);
            let listed: Vec<_> = vcpu_ioctls()
                .into_iter()
                .map(|request| (request, try_ioctl(fd, request)))
                .collect();
            (unlisted, listed)
        });
        drop(dev_null);

        assert_eq!(unlisted, Err(libc::EPERM));
        // Each listed request reaches the kernel, which rejects it on
        // /dev/null (ENOTTY) rather than seccomp refusing it (EPERM).
        for (request, result) in listed {
            assert_eq!(result, Err(libc::ENOTTY), "request {request:#x}");
        }
    }

    #[derive(Debug)]
    struct ApiOutcome {
        execve: Sys,
        socket: Sys,
        open_read: Sys,
        fionbio: Sys,
    }

    #[test]
    fn api_filter_denies_execve_sockets_and_opens() {
        let outcome = on_filtered_thread(ThreadKind::Api, || {
            // SAFETY: the path is a valid NUL-terminated string; a returned
            // fd is closed right away.
            let fd = unsafe {
                libc::open(
                    c"/proc/self/status".as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: fd was just returned by open() and is owned here.
                unsafe { libc::close(fd) };
            }
            let mut one = 1 as libc::c_int;
            // SAFETY: FIONBIO reads an int through a valid pointer; fd -1 is
            // no descriptor, so nothing is changed.
            let fionbio = sys(unsafe { libc::ioctl(-1, libc::FIONBIO, &mut one) });
            ApiOutcome {
                execve: try_execve(),
                socket: try_socket(),
                open_read: sys(fd),
                fionbio,
            }
        });

        assert_eq!(outcome.execve, Err(libc::EPERM), "{outcome:?}");
        assert_eq!(outcome.socket, Err(libc::EPERM), "{outcome:?}");
        // Not even /proc: metrics and disk files are the VMM thread's.
        assert_eq!(outcome.open_read, Err(libc::EPERM), "{outcome:?}");
        // FIONBIO is allowed: the kernel answers EBADF for fd -1.
        assert_eq!(outcome.fionbio, Err(libc::EBADF), "{outcome:?}");
    }

    #[test]
    fn device_filter_allows_disk_io_and_unix_sockets_only() {
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let outcome = on_filtered_thread(ThreadKind::Device, move || {
            let mut buf = [0u8; 4];
            // SAFETY: reads 4 bytes into a 4-byte stack buffer from an fd the
            // test keeps open.
            let pread = sys(unsafe { libc::pread64(fd, buf.as_mut_ptr().cast(), 4, 0) } as i32);
            // SAFETY: path is a valid NUL-terminated string.
            let open = sys(unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) });
            let mut size = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCGWINSZ writes a winsize through a valid pointer.
            let ioctl = sys(unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut size) });
            (
                pread,
                &buf == b"\x7fELF",
                open,
                ioctl,
                try_execve(),
                try_inet_socket(),
                try_socket().map(|_| 0),
            )
        });
        assert_eq!(outcome.0, Ok(4), "{outcome:?}");
        assert!(outcome.1, "{outcome:?}");
        assert_eq!(outcome.2, Err(libc::EPERM), "{outcome:?}");
        assert_eq!(outcome.3, Err(libc::EPERM), "{outcome:?}");
        assert_eq!(outcome.4, Err(libc::EPERM), "{outcome:?}");
        assert_eq!(outcome.5, Err(libc::EPERM), "{outcome:?}");
        // vsock streams to the host are unix sockets.
        assert_eq!(outcome.6, Ok(0), "{outcome:?}");
        drop(file);
    }

    #[derive(Debug)]
    struct VmmOutcome {
        execve: Sys,
        socket: Sys,
        no_new_privs: Sys,
        epoll: Sys,
        eventfd: Sys,
        open_rw: Sys,
        tty_ioctl: Sys,
        exec_mapping: Sys,
        vcpu_child: Result<(Sys, Sys), String>,
    }

    #[test]
    fn vmm_filter_runs_an_event_loop_and_spawns_filtered_threads() {
        let outcome = on_filtered_thread(ThreadKind::Vmm, || {
            // SAFETY: plain syscalls with integer arguments; returned fds are
            // closed below.
            let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            // SAFETY: as above.
            let evfd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            for fd in [epfd, evfd] {
                if fd >= 0 {
                    // SAFETY: fd was returned above and is owned here.
                    unsafe { libc::close(fd) };
                }
            }
            // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointer.
            let no_new_privs = sys(unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) });
            let open_rw = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(|_| 0)
                .map_err(|e| e.raw_os_error().unwrap_or_default());
            // SAFETY: an anonymous mapping; unmapped right away on success.
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            let exec_mapping = if map == libc::MAP_FAILED {
                sys(-1)
            } else {
                // SAFETY: map is a 4096-byte mapping created above.
                unsafe { libc::munmap(map, 4096) };
                Ok(0)
            };
            // A thread spawned now inherits the Vmm filter and narrows it.
            let vcpu_child = thread::Builder::new()
                .name("vcpu-test".into())
                .spawn(|| {
                    apply_with(ThreadKind::Vcpu, EPERM)?;
                    Ok::<_, Error>((try_getpid(), try_ioctl(-1, kvm_nr::KVM_RUN())))
                })
                .map_err(|e| e.to_string())
                .and_then(|child| child.join().map_err(|_| "panicked".to_string()))
                .and_then(|result| result.map_err(|e| format!("{e:?}")));
            VmmOutcome {
                execve: try_execve(),
                socket: try_socket(),
                no_new_privs,
                epoll: sys(epfd),
                eventfd: sys(evfd),
                open_rw,
                tty_ioctl: try_ioctl(-1, libc::TIOCGWINSZ),
                exec_mapping,
                vcpu_child,
            }
        });

        assert_eq!(outcome.execve, Err(libc::EPERM), "{outcome:?}");
        assert_eq!(outcome.socket, Err(libc::EPERM), "{outcome:?}");
        assert_eq!(outcome.no_new_privs, Ok(1), "{outcome:?}");
        assert!(outcome.epoll.is_ok(), "{outcome:?}");
        assert!(outcome.eventfd.is_ok(), "{outcome:?}");
        assert_eq!(outcome.open_rw, Ok(0), "{outcome:?}");
        // Allowed request: the kernel answers EBADF for fd -1.
        assert_eq!(outcome.tty_ioctl, Err(libc::EBADF), "{outcome:?}");
        assert_eq!(outcome.exec_mapping, Err(libc::EPERM), "{outcome:?}");
        // KVM_RUN is not in the Vmm filter, which the child inherited: the
        // stacked filters refuse it, which is why vCPU threads must be
        // spawned before the main thread installs its filter.
        let (getpid, kvm_run) = outcome.vcpu_child.expect("vcpu child thread");
        assert_eq!(getpid, Ok(i64::from(std::process::id())));
        assert_eq!(kvm_run, Err(libc::EPERM));
    }

    #[test]
    fn production_filter_kills_the_process_on_a_violation() {
        // Built before fork: the child must not allocate (other test threads
        // may hold the allocator's lock at fork time).
        let program = filter(ThreadKind::Vcpu, SeccompAction::KillProcess).expect("filter");
        let path = c"/nonexistent/frakti-seccomp-test";
        let argv = [path.as_ptr(), std::ptr::null()];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];

        // SAFETY: the child only makes async-signal-safe calls (setrlimit,
        // prctl, seccomp, execve, _exit) on memory prepared before fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: no_core is a valid rlimit; in the forked child, only
            // async-signal-safe calls are made, on memory prepared before fork.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                if seccompiler::apply_filter(&program).is_err() {
                    libc::_exit(3);
                }
                libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                // Not killed: the filter did not stop execve.
                libc::_exit(4);
            }
        }

        let mut status = 0;
        // SAFETY: pid is our child and status a valid out-pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "child status {status:#x}"
        );
    }
}
