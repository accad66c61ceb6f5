//! One `frakti-vmm` per pod: how it is started (sized, with empty disk
//! slots, its sockets and logs in the pod's directory), found again after a
//! daemon restart, watched and stopped.
//!
//! The VMM runs in its own session so that it outlives the daemon (a
//! restarted daemon finds it by pid and checks that the pid still runs our
//! VMM with this pod's control socket, so a reused pid is never taken for
//! it). Its exit is noticed through a pidfd, which works for processes that
//! are not our children too.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tokio::io::unix::AsyncFd;

use crate::runtime::sizing::VmSize;

/// Serials of the read-only slots for image disks: `img0`, `img1`, ...
pub const IMAGE_SLOT_PREFIX: &str = "img";
/// Serials of the writable slots (scratch, block volumes): `vol0`, ...
pub const VOLUME_SLOT_PREFIX: &str = "vol";
/// frakti-vmm's limit is 16 disks; images get most of them.
pub const IMAGE_SLOTS: usize = 10;
pub const VOLUME_SLOTS: usize = 6;
/// The guest's vsock CID: hybrid vsock is per VM, so every VM may use 3.
const GUEST_CID: u64 = 3;
/// A unix socket path has at most 107 bytes; the longest one a pod uses is
/// the vsock socket plus the `_<port>` of guest-initiated connections.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {vmm}")]
    Spawn {
        vmm: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the pod directory {0} is too long for unix socket paths (use a shorter --root)")]
    PathTooLong(PathBuf),
    #[error("cannot watch process {pid}")]
    Watch {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

/// The programs every pod VM runs.
#[derive(Debug, Clone)]
pub struct VmAssets {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Other kernels a pod may choose by name (annotation
    /// `io.frakti.vm.kernel`): only files in this directory.
    pub kernels_dir: PathBuf,
}

/// The pod annotation naming the kernel of its VM in `kernels_dir`.
pub const ANNOTATION_KERNEL: &str = "io.frakti.vm.kernel";

impl VmAssets {
    /// The assets of a pod whose annotations may name another kernel: a
    /// plain file name in `kernels_dir` (no path: a pod's annotations come
    /// from whoever writes the pod, and must not pick any file of the node).
    pub fn for_pod(
        &self,
        annotations: &std::collections::HashMap<String, String>,
    ) -> Result<VmAssets, String> {
        let Some(name) = annotations.get(ANNOTATION_KERNEL) else {
            return Ok(self.clone());
        };
        let plain = !name.is_empty()
            && name.len() <= 255
            && name != "."
            && name != ".."
            && !name.contains(['/', '\0']);
        if !plain {
            return Err(format!(
                "annotation {ANNOTATION_KERNEL}={name:?}: a kernel's file name in {} (no path)",
                self.kernels_dir.display()
            ));
        }
        let kernel = self.kernels_dir.join(name);
        if !kernel.is_file() {
            return Err(format!(
                "annotation {ANNOTATION_KERNEL}={name:?}: no such kernel in {}",
                self.kernels_dir.display()
            ));
        }
        Ok(VmAssets {
            kernel,
            ..self.clone()
        })
    }
}

/// Where a pod VM keeps its sockets and logs (the pod's directory).
#[derive(Debug, Clone)]
pub struct VmFiles {
    dir: PathBuf,
}

impl VmFiles {
    pub fn new(dir: &Path) -> VmFiles {
        VmFiles {
            dir: dir.to_path_buf(),
        }
    }

    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api")
    }

    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock")
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }

    /// Removes the sockets a VMM left (it does not unlink them itself).
    pub fn remove_sockets(&self) {
        for path in [self.api_socket(), self.vsock_socket()] {
            let _ = fs::remove_file(path);
        }
    }

    /// The last `lines` lines of the guest console (why a VM died).
    pub fn console_tail(&self, lines: usize) -> String {
        tail(&self.console_log(), lines)
    }
}

fn tail(path: &Path, lines: usize) -> String {
    const MAX_READ: u64 = 64 * 1024;
    let Ok(data) = read_end(path, MAX_READ) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&data);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn read_end(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut data = Vec::new();
    file.take(max).read_to_end(&mut data)?;
    Ok(data)
}

fn slot_args(command: &mut Command) {
    for i in 0..IMAGE_SLOTS {
        command
            .arg("--disk")
            .arg(format!("serial={IMAGE_SLOT_PREFIX}{i},ro"));
    }
    for i in 0..VOLUME_SLOTS {
        command
            .arg("--disk")
            .arg(format!("serial={VOLUME_SLOT_PREFIX}{i}"));
    }
}

/// The descriptor number the VMM inherits the pod's tap on.
const TAP_FD: RawFd = 3;

/// The VM's NIC: a tap the daemon opened (in the pod's network namespace)
/// and the MAC address the guest's interface gets.
pub struct Nic<'a> {
    pub tap: BorrowedFd<'a>,
    pub mac: [u8; 6],
}

/// Starts the pod's VMM; returns its pid. The VMM is not waited for by
/// anyone but [`wait_exit`]: it must survive the daemon.
pub fn spawn(
    assets: &VmAssets,
    files: &VmFiles,
    size: VmSize,
    nic: Option<Nic<'_>>,
) -> Result<u32, Error> {
    let vsock = files.vsock_socket();
    if vsock.as_os_str().len() + "_65535".len() > MAX_SOCKET_PATH {
        return Err(Error::PathTooLong(files.dir.clone()));
    }
    let io_err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    };
    fs::create_dir_all(&files.dir).map_err(io_err("cannot create", &files.dir))?;
    files.remove_sockets();
    let log = File::create(files.vmm_log()).map_err(io_err("cannot create", &files.vmm_log()))?;
    let mut command = Command::new(&assets.vmm);
    command
        .arg("--kernel")
        .arg(&assets.kernel)
        .arg("--initrd")
        .arg(&assets.initrd)
        .arg("--vcpus")
        .arg(size.vcpus.to_string())
        .arg("--memory")
        .arg(size.memory_mib.to_string())
        .arg("--cmdline")
        .arg("quiet")
        .arg("--serial")
        .arg(files.console_log())
        .arg("--vsock")
        .arg(format!("cid={GUEST_CID},uds={}", vsock.display()))
        .arg("--api-socket")
        .arg(files.api_socket())
        .arg("--log")
        .arg("warn");
    slot_args(&mut command);
    if let Some(nic) = &nic {
        let mac = nic.mac.map(|b| format!("{b:02x}")).join(":");
        command.arg("--net").arg(format!("fd={TAP_FD},mac={mac}"));
        let tap = nic.tap.as_raw_fd();
        // SAFETY: dup2 and fcntl are async-signal-safe and only act on
        // descriptors; `tap` stays open in the parent until spawn returns.
        unsafe {
            command.pre_exec(move || inherit_fd(tap, TAP_FD));
        }
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    // Its own session: the daemon's signals and death do not reach it.
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
    }
    let child = command.spawn().map_err(|source| Error::Spawn {
        vmm: assets.vmm.clone(),
        source,
    })?;
    // Dropping a std Child neither kills nor waits: wait_exit reaps it.
    Ok(child.id())
}

/// In the child before exec: `fd` becomes `target`, without close-on-exec.
fn inherit_fd(fd: RawFd, target: RawFd) -> io::Result<()> {
    if fd == target {
        // SAFETY: F_SETFD on our own descriptor; no memory is passed.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(());
    }
    // SAFETY: dup2 only acts on descriptors (the copy has no
    // close-on-exec flag); no memory is passed.
    if unsafe { libc::dup2(fd, target) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `pid` still runs a VMM serving this pod's control socket
/// (`kill -0` alone would accept a reused pid).
pub fn is_our_vmm(pid: u32, files: &VmFiles) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let socket = files.api_socket();
    let wanted = socket.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == wanted)
}

/// A pidfd of `pid` (readable once the process has exited).
fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the syscall just returned this descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How a VMM ended, as far as we can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmExit {
    /// Our child: its exit code.
    Code(i32),
    /// Our child: the signal that killed it.
    Signal(i32),
    /// Not our child (found again after a restart): it is gone.
    Gone,
}

impl std::fmt::Display for VmmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmmExit::Code(code) => write!(f, "exited with code {code}"),
            VmmExit::Signal(signal) => write!(f, "killed by signal {signal}"),
            VmmExit::Gone => write!(f, "is gone"),
        }
    }
}

/// Waits for the VMM's exit (and reaps it when it is our child).
pub async fn wait_exit(pid: u32) -> Result<VmmExit, Error> {
    match pidfd_open(pid) {
        Ok(fd) => {
            // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it
            // open (its number unchanged) for as long as it is registered.
            let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| Error::Watch {
                pid,
                source: e.into_parts().1,
            })?;
            let _ready = fd
                .readable()
                .await
                .map_err(|source| Error::Watch { pid, source })?;
        }
        // Already gone (and reaped, or not ours).
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
        Err(source) => return Err(Error::Watch { pid, source }),
    }
    Ok(reap(pid))
}

fn reap(pid: u32) -> VmmExit {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return VmmExit::Gone;
    };
    match waitpid(nix::unistd::Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => VmmExit::Code(code),
        Ok(WaitStatus::Signaled(_, signal, _)) => VmmExit::Signal(signal as i32),
        _ => VmmExit::Gone,
    }
}

/// SIGKILLs the VMM (the last resort of stopping a pod).
pub fn kill(pid: u32) {
    if let Ok(raw) = libc::pid_t::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Serial of writable slot `index`.
pub fn volume_slot(index: usize) -> String {
    format!("{VOLUME_SLOT_PREFIX}{index}")
}

/// Serial of image slot `index`.
pub fn image_slot(index: usize) -> String {
    format!("{IMAGE_SLOT_PREFIX}{index}")
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_pod_chooses_a_kernel_by_file_name_in_the_kernels_dir_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("alt"), b"kernel").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let assets = VmAssets {
            vmm: "/vmm".into(),
            kernel: "/default".into(),
            initrd: "/initrd".into(),
            kernels_dir: dir.path().to_path_buf(),
        };
        let pick = |name: &str| {
            let annotations = [(ANNOTATION_KERNEL.to_string(), name.to_string())].into();
            assets.for_pod(&annotations)
        };
        assert_eq!(
            assets.for_pod(&Default::default()).unwrap().kernel,
            Path::new("/default")
        );
        assert_eq!(pick("alt").unwrap().kernel, dir.path().join("alt"));
        for bad in [
            "",
            ".",
            "..",
            "../alt",
            "/etc/passwd",
            "sub",
            "missing",
            "a\0b",
        ] {
            let err = pick(bad).unwrap_err();
            assert!(err.contains(ANNOTATION_KERNEL), "{bad:?}: {err}");
        }
    }
    use super::*;

    #[test]
    fn console_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let files = VmFiles::new(dir.path());
        assert_eq!(files.console_tail(3), "");
        fs::write(files.console_log(), "a\nb\nc\nd\n").unwrap();
        assert_eq!(files.console_tail(2), "c\nd");
        assert_eq!(files.console_tail(10), "a\nb\nc\nd");
    }

    // wait_exit reaps the children (what the test checks).
    #[allow(clippy::zombie_processes)]
    #[tokio::test]
    async fn exits_are_seen_and_reaped() {
        let child = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
        assert_eq!(wait_exit(child.id()).await.unwrap(), VmmExit::Code(7));
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let waiter = tokio::spawn(wait_exit(pid));
        kill(pid);
        assert_eq!(waiter.await.unwrap().unwrap(), VmmExit::Signal(9));
        // Reaped: the pid is no longer ours to wait for.
        assert_eq!(wait_exit(pid).await.unwrap(), VmmExit::Gone);
    }

    #[test]
    fn a_reused_pid_is_not_taken_for_our_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let files = VmFiles::new(dir.path());
        assert!(!is_our_vmm(std::process::id(), &files));
        // `sh -c CMD NAME`: NAME is only $0, in the command line.
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30; true"])
            .arg(files.api_socket())
            .spawn()
            .unwrap();
        // Until the child has executed (before, it shows our command line).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !is_our_vmm(child.id(), &files) {
            assert!(std::time::Instant::now() < deadline, "never seen as ours");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
