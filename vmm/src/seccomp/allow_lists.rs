//! The allow-list of each thread kind: what its job needs, and no more.

use seccompiler::BackendError;

use super::rules::{AllowList, arg_eq, arg_masked_eq, ioctl_requests, kvm_nr};

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
pub(super) fn vcpu_ioctls() -> Vec<libc::c_ulong> {
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

pub(super) fn vcpu_thread_rules() -> Result<AllowList, BackendError> {
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

pub(super) fn vmm_thread_rules() -> Result<AllowList, BackendError> {
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
/// and disk I/O on files that are already open. No opens; one ioctl.
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

pub(super) fn device_thread_rules() -> Result<AllowList, BackendError> {
    let mut allow = AllowList::default();
    runtime_rules(&mut allow)?;
    allow.syscalls(device_syscalls());
    // vsock: a guest connection to host port P opens a unix socket.
    allow.syscall_if(libc::SYS_socket, vec![arg_eq(0, libc::AF_UNIX as u64)?]);
    // net: the tap offloads the guest negotiated, set at activation.
    allow.syscall_if(
        libc::SYS_ioctl,
        ioctl_requests(vec![libc::TUNSETOFFLOAD as libc::c_ulong])?,
    );
    Ok(allow)
}

/// The runtime's basics cover it: write/writev to open descriptors, futex.
pub(super) fn console_thread_rules() -> Result<AllowList, BackendError> {
    let mut allow = AllowList::default();
    runtime_rules(&mut allow)?;
    Ok(allow)
}

pub(super) fn api_thread_rules() -> Result<AllowList, BackendError> {
    let mut allow = AllowList::default();
    runtime_rules(&mut allow)?;
    allow.syscalls(api_syscalls());
    // std's set_nonblocking on sockets is ioctl(FIONBIO).
    allow.syscall_if(libc::SYS_ioctl, ioctl_requests(vec![libc::FIONBIO])?);
    Ok(allow)
}
