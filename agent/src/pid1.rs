//! The duties of PID 1 in the guest: kernel filesystems and VM reset.

use std::fs;
use std::io;

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot, set_cad_enabled};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
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
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

const KERNEL_FILESYSTEMS: &[KernelFs] = &[
    KernelFs {
        fstype: "proc",
        path: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
    },
    KernelFs {
        fstype: "sysfs",
        path: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
    },
    KernelFs {
        fstype: "devtmpfs",
        path: "/dev",
        flags: MsFlags::MS_NOSUID,
    },
];

/// Mounts /proc, /sys and /dev. A filesystem that is already mounted
/// (the kernel may mount devtmpfs itself) is left as it is.
pub fn mount_kernel_filesystems() -> Result<(), Error> {
    for fs in KERNEL_FILESYSTEMS {
        fs::create_dir_all(fs.path).map_err(|source| Error::MountPoint {
            path: fs.path,
            source,
        })?;
        match mount(
            Some(fs.fstype),
            fs.path,
            Some(fs.fstype),
            fs.flags,
            None::<&str>,
        ) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(source) => {
                return Err(Error::Mount {
                    fstype: fs.fstype,
                    path: fs.path,
                    source,
                });
            }
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

fn init_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    for signal in SHUTDOWN_SIGNALS {
        set.add(signal);
    }
    set
}

/// Blocks the signals init waits for, so that one arriving before
/// [`wait_for_shutdown`] stays pending instead of being dropped (PID 1
/// ignores signals it has no handler for). Call before announcing readiness.
pub fn block_init_signals() -> Result<(), Error> {
    init_signals().thread_block().map_err(Error::Signals)
}

/// Serves as init until asked to shut down: reaps every orphan that dies
/// and returns the signal that asked for the shutdown. The signals must
/// have been blocked with [`block_init_signals`].
pub fn wait_for_shutdown() -> Result<Signal, Error> {
    let set = init_signals();
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => reap_children(),
            Ok(signal) => return Ok(signal),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::Signals(e)),
        }
    }
}

/// Collects every exited child without blocking.
pub fn reap_children() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}
