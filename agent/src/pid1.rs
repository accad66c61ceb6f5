//! The duties of PID 1 in the guest: kernel filesystems and VM reset.

use std::fs;
use std::io;

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sys::reboot::{RebootMode, reboot};
use nix::unistd::sync;

#[derive(Debug, thiserror::Error)]
pub enum Error {
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
