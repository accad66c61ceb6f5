//! The filters on real threads: what each kind may and may not do.

use std::ffi::CStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::thread;

use super::allow_lists::vcpu_ioctls;
use super::rules::kvm_nr;
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
