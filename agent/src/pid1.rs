//! The duties of PID 1 in the guest: kernel filesystems, loopback, signals
//! (the reaper thread and the shutdown wait) and VM reset. Synchronous and
//! small on purpose; the agent API runs on tokio beside it.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use crate::process::Reaper;

use frakti_proto::error_chain;
use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot, set_cad_enabled};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::sync;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot get access to I/O port {port:#x}")]
    IoPort {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("cannot hand Ctrl-Alt-Del to PID 1")]
    CtrlAltDel(#[source] Errno),
    #[error("cannot block signals")]
    Signals(#[source] Errno),
    #[error("cannot start the reaper thread")]
    Thread(#[source] io::Error),
    #[error("cannot bring the loopback interface up")]
    Loopback(#[source] io::Error),
    #[error("cannot move the initramfs onto a tmpfs")]
    LeaveInitramfs(#[source] Errno),
    #[error("cannot copy the initramfs")]
    Copy(#[source] io::Error),
    #[error("cannot create mount point {path}")]
    MountPoint {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount {fstype} on {path}")]
    Mount {
        fstype: &'static str,
        path: &'static str,
        #[source]
        source: Errno,
    },
}

struct KernelFs {
    fstype: &'static str,
    path: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
    /// Boot fails without it; the others only cost features (logged).
    required: bool,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

const KERNEL_FILESYSTEMS: &[KernelFs] = &[
    KernelFs {
        fstype: "proc",
        path: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        required: true,
        data: None,
    },
    KernelFs {
        fstype: "sysfs",
        path: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        required: true,
        data: None,
    },
    KernelFs {
        fstype: "devtmpfs",
        path: "/dev",
        flags: MsFlags::MS_NOSUID,
        required: true,
        data: None,
    },
    KernelFs {
        fstype: "devpts",
        path: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        required: false,
        data: Some("mode=0620,ptmxmode=0666,gid=5"),
    },
    KernelFs {
        fstype: "tmpfs",
        path: "/dev/shm",
        flags: NOSUID_NODEV_NOEXEC,
        required: false,
        data: Some("mode=1777"),
    },
    KernelFs {
        fstype: "tmpfs",
        path: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        required: false,
        data: Some("mode=0755"),
    },
    KernelFs {
        fstype: "cgroup2",
        path: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        required: false,
        data: None,
    },
];

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run and the cgroup2
/// hierarchy. A filesystem that is already mounted (the kernel may mount
/// devtmpfs itself) is left as it is.
pub fn mount_kernel_filesystems() -> Result<(), Error> {
    for fs in KERNEL_FILESYSTEMS {
        let result = fs::create_dir_all(fs.path)
            .map_err(|source| Error::MountPoint {
                path: fs.path,
                source,
            })
            .and_then(|()| {
                match mount(Some(fs.fstype), fs.path, Some(fs.fstype), fs.flags, fs.data) {
                    Ok(()) | Err(Errno::EBUSY) => Ok(()),
                    Err(source) => Err(Error::Mount {
                        fstype: fs.fstype,
                        path: fs.path,
                        source,
                    }),
                }
            });
        match result {
            Ok(()) => {}
            Err(e) if fs.required => return Err(e),
            Err(e) => eprintln!("frakti-agent: warning: {}", error_chain(&e)),
        }
    }
    Ok(())
}

/// Flushes filesystems and resets the VM. With `reboot=k` on the kernel
/// command line the reset goes through the i8042, which the VMM treats as
/// "the guest is done" (QEMU does the same with `-no-reboot`).
pub fn reset_vm() -> ! {
    sync();
    let Err(err) = reboot(RebootMode::RB_AUTOBOOT);
    // Only reached without CAP_SYS_BOOT; PID 1 must never return, so stop
    // here and let the kernel panic (panic=-1 resets the VM).
    eprintln!("frakti-agent: reboot failed: {err}");
    std::process::exit(1);
}

/// Tells the VMM the agent is ready: one byte to the boot-done port (see
/// `frakti_proto::BOOT_DONE_PORT`). Other hypervisors ignore the write.
pub fn signal_boot_done(port: u16, value: u8) -> Result<(), Error> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(libc::c_ulong::from(port), 1, 1) } != 0 {
        return Err(Error::IoPort {
            port,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `out` to a port this process was just granted; it touches no
    // memory, and the port is the VMM's boot-done register.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value,
            options(nomem, nostack, preserves_flags));
    }
    Ok(())
}

/// Ctrl-Alt-Del (how the VMM asks for a graceful shutdown) sends SIGINT to
/// PID 1 instead of rebooting at once.
pub fn hand_ctrl_alt_del_to_init() -> Result<(), Error> {
    set_cad_enabled(false).map_err(Error::CtrlAltDel)
}

/// Signals that end the guest: Ctrl-Alt-Del (SIGINT), SIGTERM, SIGPWR.
const SHUTDOWN_SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGPWR];

/// What the agent raises on itself once its shutdown work is done.
pub const SHUTDOWN_DONE: Signal = Signal::SIGUSR1;

fn shutdown_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in SHUTDOWN_SIGNALS {
        set.add(signal);
    }
    set.add(SHUTDOWN_DONE);
    set
}

fn child_signal() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set
}

/// Blocks the signals init waits for, so that one arriving before it waits
/// stays pending instead of being dropped (PID 1 ignores signals it has no
/// handler for). Call before announcing readiness and before starting any
/// thread: threads inherit the mask, so only the waiting threads ever take
/// these signals.
pub fn block_init_signals() -> Result<(), Error> {
    let mut set = shutdown_signals();
    set.add(Signal::SIGCHLD);
    set.thread_block().map_err(Error::Signals)
}

/// Starts the thread that reaps every child (and, as PID 1, every orphan)
/// on SIGCHLD and hands exit statuses to their waiters.
pub fn spawn_reaper(reaper: Arc<Reaper>) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || {
            let set = child_signal();
            loop {
                // Reap first: children may have exited before we waited.
                reaper.reap();
                match set.wait() {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => {
                        eprintln!("frakti-agent: sigwait: {e}");
                        return;
                    }
                }
            }
        })
        .map(drop)
        .map_err(Error::Thread)
}

/// Waits until a shutdown signal or [`SHUTDOWN_DONE`] arrives and returns
/// it. The signals must have been blocked with [`block_init_signals`].
pub fn wait_for_shutdown() -> Result<Signal, Error> {
    let set = shutdown_signals();
    loop {
        match set.wait() {
            Ok(signal) => return Ok(signal),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::Signals(e)),
        }
    }
}

/// Tells the thread in [`wait_for_shutdown`] that the shutdown work is done.
pub fn notify_shutdown_done() {
    // To the process, not this thread (raise would pend it on a thread
    // that blocks it and never waits for it).
    let _ = nix::sys::signal::kill(nix::unistd::getpid(), SHUTDOWN_DONE);
}

/// Brings the loopback interface up (the guest kernel leaves it down).
pub fn loopback_up() -> Result<(), Error> {
    // SAFETY: a plain socket() call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::Loopback(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(Error::Loopback(io::Error::last_os_error()));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(Error::Loopback(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Where the initramfs content moves to before it becomes the root.
const NEW_ROOT: &str = "/.frakti-root";
/// The agent's path in the initrd: what the kernel runs as PID 1.
const INITRAMFS_INIT: &str = "/init";

/// pivot_root(2) fails with EINVAL when the current root is the initramfs
/// (the kernel's rootfs, which has no parent mount), and every container
/// is set up with pivot_root. So PID 1 first moves the initramfs content
/// onto a tmpfs and makes that the root, as switch_root(8) does: copy,
/// delete the originals (frees their memory), move the tmpfs onto `/`,
/// chroot. Call before mounting anything. Unless the agent runs as `/init`
/// from a RAM filesystem, nothing happens.
///
/// `/init` itself stays behind: it is running, so deleting it would free
/// nothing and a copy would hold a second one in guest RAM (and cost
/// boot time). Helpers re-execute the agent through /proc/self/exe.
pub fn leave_initramfs() -> Result<(), Error> {
    use nix::sys::statfs::{FsType, TMPFS_MAGIC, statfs};
    // Only the kernel's /init of an initramfs: never copy a real root.
    if std::env::args_os()
        .next()
        .is_none_or(|arg0| arg0 != INITRAMFS_INIT)
    {
        return Ok(());
    }
    // linux/magic.h; libc does not name it.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    let root_type = statfs("/")
        .map_err(Error::LeaveInitramfs)?
        .filesystem_type();
    if root_type != RAMFS_MAGIC && root_type != TMPFS_MAGIC {
        return Ok(());
    }
    let root_dev = fs::metadata("/").map_err(Error::Copy)?.dev();
    fs::create_dir_all(NEW_ROOT).map_err(Error::Copy)?;
    mount(
        Some("tmpfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(Error::LeaveInitramfs)?;
    for entry in fs::read_dir("/").map_err(Error::Copy)? {
        let entry = entry.map_err(Error::Copy)?;
        let path = entry.path();
        if path == std::path::Path::new(NEW_ROOT) || path == std::path::Path::new(INITRAMFS_INIT) {
            continue;
        }
        copy_tree(
            &path,
            &std::path::Path::new(NEW_ROOT).join(entry.file_name()),
            root_dev,
        )?;
        let meta = fs::symlink_metadata(&path).map_err(Error::Copy)?;
        // Free the initramfs copy (never across a mount).
        if meta.dev() == root_dev {
            let _ = if meta.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
    }
    nix::unistd::chdir(NEW_ROOT).map_err(Error::LeaveInitramfs)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(Error::LeaveInitramfs)?;
    nix::unistd::chroot(".").map_err(Error::LeaveInitramfs)?;
    nix::unistd::chdir("/").map_err(Error::LeaveInitramfs)
}

/// Copies a file tree with modes, owners, symlinks and device nodes,
/// staying on the device `dev`.
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path, dev: u64) -> Result<(), Error> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = fs::symlink_metadata(from).map_err(Error::Copy)?;
    if meta.dev() != dev {
        return Ok(());
    }
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = fs::read_link(from).map_err(Error::Copy)?;
        std::os::unix::fs::symlink(target, to).map_err(Error::Copy)?;
    } else if kind.is_dir() {
        fs::create_dir_all(to).map_err(Error::Copy)?;
        for entry in fs::read_dir(from).map_err(Error::Copy)? {
            let entry = entry.map_err(Error::Copy)?;
            copy_tree(&entry.path(), &to.join(entry.file_name()), dev)?;
        }
    } else if kind.is_file() {
        fs::copy(from, to).map_err(Error::Copy)?;
    } else {
        nix::sys::stat::mknod(
            to,
            nix::sys::stat::SFlag::from_bits_truncate(meta.mode()),
            nix::sys::stat::Mode::from_bits_truncate(meta.mode()),
            meta.rdev(),
        )
        .map_err(Error::LeaveInitramfs)?;
    }
    if !kind.is_symlink() {
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(Error::Copy)?;
    }
    let _ = std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn copy_tree_keeps_modes_links_and_content() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::create_dir_all(s.join("a/b")).unwrap();
        fs::write(s.join("a/b/init"), b"binary").unwrap();
        fs::set_permissions(s.join("a/b/init"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("b/init", s.join("a/link")).unwrap();
        let dev = fs::metadata(s).unwrap().dev();
        copy_tree(s, &dst.path().join("copy"), dev).unwrap();
        let d = dst.path().join("copy");
        assert_eq!(fs::read(d.join("a/b/init")).unwrap(), b"binary");
        assert_eq!(
            fs::metadata(d.join("a/b/init"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_link(d.join("a/link")).unwrap().to_str(),
            Some("b/init")
        );
    }
}
