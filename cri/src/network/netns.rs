//! Named network namespaces, one per pod.
//!
//! A namespace is kept alive by a bind mount of its nsfs file onto a plain
//! file (as `ip netns add` does), so it outlives every process in it and
//! the daemon itself; CNI plugins and the tap setup enter it by that path.
//!
//! Everything here is blocking (a thread is spawned and joined): async
//! callers use `tokio::task::spawn_blocking`. Namespaces are entered on
//! dedicated short-lived threads, never the caller's: a thread whose
//! network namespace changed must not go back to a pool or runtime.

use std::any::Any;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread;

use nix::errno::Errno;
use nix::mount::{self, MntFlags, MsFlags};
use nix::sched::{self, CloneFlags};

/// The calling thread's own network namespace (not the process's).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start a thread to work in the network namespace {path}")]
    Thread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the thread working in the network namespace {path} panicked: {message}")]
    Panicked { path: PathBuf, message: String },
    #[error("cannot create a network namespace for {path}")]
    Unshare {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot create the directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the network namespace {path}: the path already exists")]
    Exists { path: PathBuf },
    #[error("cannot create the mount point {path}")]
    CreateFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind-mount the network namespace onto {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot unmount the network namespace at {path}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot remove the mount point {path}")]
    RemoveFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter the network namespace {path}")]
    Enter {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

/// A named network namespace, pinned by a bind mount at `path`. Dropping
/// it leaves the namespace in place: [`remove`] deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    path: PathBuf,
}

impl NetNs {
    /// Creates a new, empty network namespace pinned at `path` (whose
    /// parent directories are created, mode 0755). `path` must not exist.
    /// Its `lo` stays down: CNI's `loopback` plugin brings it up.
    pub fn create(path: &Path) -> Result<NetNs, Error> {
        let owned = path.to_path_buf();
        on_thread(path, move || create_here(&owned))??;
        Ok(NetNs {
            path: path.to_path_buf(),
        })
    }

    /// Where the namespace is mounted, for `CNI_NETNS` and [`run_in`].
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The same as [`NetNs::create`].
pub fn create(path: &Path) -> Result<NetNs, Error> {
    NetNs::create(path)
}

/// Runs on a thread of its own, which dies right after.
fn create_here(path: &Path) -> Result<(), Error> {
    sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|source| Error::Unshare {
        path: path.to_path_buf(),
        source,
    })?;
    create_mount_point(path)?;
    let flags = MsFlags::MS_BIND;
    let mounted = mount::mount(Some(THREAD_NETNS), path, None::<&str>, flags, None::<&str>);
    if let Err(source) = mounted {
        // Ours (create_new), so ours to remove; the mount error matters more.
        let _ = fs::remove_file(path);
        return Err(Error::Mount {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(())
}

/// The empty file the namespace is mounted on; refuses to reuse one.
fn create_mount_point(path: &Path) -> Result<(), Error> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|source| Error::CreateDir {
                path: parent.to_path_buf(),
                source,
            })?;
    }
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path);
    match created {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(Error::Exists {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(Error::CreateFile {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Deletes the namespace pinned at `path`: unmounts it (lazily: whoever
/// still has it open or is in it keeps it until done) and removes the
/// file. Succeeds if either is already gone, so it can be retried.
pub fn remove(path: &Path) -> Result<(), Error> {
    match mount::umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point; ENOENT: no such path.
        Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
        Err(source) => {
            return Err(Error::Unmount {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::RemoveFile {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Runs `f` inside the network namespace pinned at `path`, on a new thread
/// (sockets and devices it creates belong to that namespace), and returns
/// its result. A panic in `f` becomes [`Error::Panicked`]. `f`'s error type
/// only needs to take a namespace [`Error`], e.g. `Error` itself.
pub fn run_in<T, E>(path: &Path, f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<Error> + Send + 'static,
{
    let file = File::open(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let owned = path.to_path_buf();
    on_thread(path, move || {
        sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| Error::Enter {
            path: owned,
            source,
        })?;
        drop(file);
        f()
    })?
}

/// Runs `f` on a new thread and waits for it.
fn on_thread<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    let thread = thread::Builder::new()
        .name("frakti-netns".to_string())
        .spawn(f)
        .map_err(|source| Error::Thread {
            path: path.to_path_buf(),
            source,
        })?;
    thread.join().map_err(|panic| Error::Panicked {
        path: path.to_path_buf(),
        message: panic_message(panic.as_ref()),
    })
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// These tests create namespaces and mounts: they need root, and must
    /// fail (not pass vacuously) without it.
    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "network namespace tests need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
        );
    }

    /// Removes the namespace even when a test fails half-way.
    struct Cleanup(PathBuf);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = remove(&self.0);
        }
    }

    fn netns_inode() -> Result<u64, Error> {
        let meta = fs::metadata(THREAD_NETNS).map_err(|source| Error::Open {
            path: PathBuf::from(THREAD_NETNS),
            source,
        })?;
        Ok(meta.ino())
    }

    /// Whether `path` is a mount point in /proc/self/mountinfo (field 5).
    fn is_mount_point(path: &Path) -> bool {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let wanted = path.to_str().unwrap();
        mountinfo
            .lines()
            .any(|line| line.split(' ').nth(4) == Some(wanted))
    }

    #[test]
    fn create_enter_remove() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let path = dir.join("netns").join("pod-a");

        let ns = create(&path).unwrap();
        let _cleanup = Cleanup(path.clone());
        assert_eq!(ns.path(), path);
        assert!(is_mount_point(&path), "{} is not mounted", path.display());
        let mode = fs::metadata(path.parent().unwrap()).unwrap().mode();
        assert_eq!(mode & 0o777, 0o755);

        let inside = run_in(&path, netns_inode).unwrap();
        let outside = netns_inode().unwrap();
        assert_ne!(inside, outside, "run_in did not enter the namespace");
        // The pinned file is the namespace itself.
        assert_eq!(fs::metadata(&path).unwrap().ino(), inside);
        // Entering again lands in the same namespace.
        assert_eq!(run_in(&path, netns_inode).unwrap(), inside);
        // The caller's thread never moved.
        assert_eq!(netns_inode().unwrap(), outside);
        // Other processes enter it by path too; its lo is left to CNI.
        let lo = std::process::Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .args(["ip", "-o", "link", "show", "lo"])
            .output()
            .unwrap();
        let lo = String::from_utf8_lossy(&lo.stdout);
        assert!(
            lo.contains("<LOOPBACK>") && lo.contains("state DOWN"),
            "{lo}"
        );

        remove(&path).unwrap();
        assert!(!is_mount_point(&path));
        assert!(!path.exists());
        remove(&path).unwrap();
    }

    #[test]
    fn create_refuses_an_existing_path() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken");
        fs::write(&path, b"someone's").unwrap();

        let err = create(&path).unwrap_err();
        assert!(matches!(err, Error::Exists { .. }), "{err:?}");
        assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
        // Not ours: left alone.
        assert_eq!(fs::read(&path).unwrap(), b"someone's");
        assert!(!is_mount_point(&path));
    }

    #[test]
    fn run_in_reports_errors_and_panics() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = run_in(&missing, || Ok::<(), Error>(())).unwrap_err();
        assert!(matches!(err, Error::Open { .. }), "{err:?}");

        // A file that is not a namespace cannot be entered.
        let plain = dir.path().join("plain");
        fs::write(&plain, b"").unwrap();
        let err = run_in(&plain, || Ok::<(), Error>(())).unwrap_err();
        assert!(matches!(err, Error::Enter { .. }), "{err:?}");

        let path = dir.path().join("ns");
        create(&path).unwrap();
        let _cleanup = Cleanup(path.clone());
        let err = run_in(&path, || -> Result<(), Error> { panic!("boom") }).unwrap_err();
        assert!(
            matches!(&err, Error::Panicked { message, .. } if message == "boom"),
            "{err:?}"
        );
        remove(&path).unwrap();
    }
}
