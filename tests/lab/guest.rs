//! Our guest (kernel + initrd with the agent as /init): where its files are,
//! how the initrd is built, and booting it under QEMU `-M microvm`, the
//! baseline every Frakti VMM figure is compared with.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use frakti_proto::ready::{self, READY_MARKER, ReadyLine};

use crate::initramfs::{self, Initramfs};
use crate::process::{ChildGuard, FileTail, read_log};
use crate::tail_lines;

pub const KERNEL_ENV: &str = "FRAKTI_GUEST_KERNEL";
/// The frakti-vmm binary the tests and benchmarks run.
pub const VMM_ENV: &str = "FRAKTI_VMM";
pub const INITRD_ENV: &str = "FRAKTI_GUEST_INITRD";
/// The static frakti-guest-tool binary that test guests run.
pub const GUEST_TOOL_ENV: &str = "FRAKTI_GUEST_TOOL";
/// mke2fs, which tests run to build ext4 images (L1 has no mkfs of its own).
pub const MKE2FS_ENV: &str = "FRAKTI_MKE2FS";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest {what} not found at {} (build it with `make assets`, or set {env})", path.display())]
    Missing {
        what: &'static str,
        path: PathBuf,
        env: &'static str,
    },
    #[error("{} not found (apt-get install {package}, or set {env})", path.display())]
    MissingTool {
        path: PathBuf,
        package: &'static str,
        env: &'static str,
    },
    #[error("cannot start the VMM (for QEMU: apt-get install qemu-system-x86)")]
    Spawn(#[source] std::io::Error),
    #[error("cannot read the guest console log")]
    Console(#[source] std::io::Error),
    #[error(
        "no ready line from the guest within {secs} s (QEMU killed); console tail:\n{console_tail}"
    )]
    Timeout { secs: u64, console_tail: String },
    #[error(
        "QEMU exited ({status}) before the guest was ready: {qemu_log}\nconsole tail:\n{console_tail}"
    )]
    Exited {
        status: String,
        qemu_log: String,
        console_tail: String,
    },
    #[error("bad ready line '{line}'")]
    BadReadyLine {
        line: String,
        #[source]
        source: ready::ParseError,
    },
}

/// The guest kernel and initrd to boot.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Where `make assets` puts the guest: `target/frakti/guest/`.
pub fn default_assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/frakti/guest")
}

impl GuestAssets {
    /// From `FRAKTI_GUEST_KERNEL`/`FRAKTI_GUEST_INITRD`, else the defaults.
    pub fn locate() -> Result<GuestAssets, Error> {
        let pick = |env: &'static str, file: &str, what: &'static str| {
            let path = std::env::var_os(env)
                .map(PathBuf::from)
                .unwrap_or_else(|| default_assets_dir().join(file));
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::Missing { what, path, env })
            }
        };
        Ok(GuestAssets {
            kernel: pick(KERNEL_ENV, "vmlinux", "kernel")?,
            initrd: pick(INITRD_ENV, "initrd.cpio", "initrd")?,
        })
    }
}

impl GuestAssets {
    /// Where [`GuestAssets::add_to`] puts the kernel and initrd in L1.
    pub const LAB_KERNEL: &str = "/lab/guest/vmlinux";
    pub const LAB_INITRD: &str = "/lab/guest/initrd.cpio";

    /// Adds the kernel and initrd to a lab payload.
    pub fn add_to(&self, payload: &mut Initramfs) {
        payload.host_file(Self::LAB_KERNEL, &self.kernel, 0o644);
        payload.host_file(Self::LAB_INITRD, &self.initrd, 0o644);
    }
}

/// The frakti-vmm binary: `$FRAKTI_VMM`, else where `make vmm` puts it.
pub fn vmm_binary() -> Result<PathBuf, Error> {
    static_binary(VMM_ENV, "frakti-vmm", "VMM binary")
}

/// The guest tool: `$FRAKTI_GUEST_TOOL`, else where `make guest-tool` puts it.
pub fn guest_tool_binary() -> Result<PathBuf, Error> {
    static_binary(GUEST_TOOL_ENV, "frakti-guest-tool", "guest tool binary")
}

/// mke2fs: `$FRAKTI_MKE2FS`, else Debian's /sbin/mke2fs (e2fsprogs). It is
/// linked dynamically: the lab copies it with its libraries.
pub fn mke2fs_binary() -> Result<PathBuf, Error> {
    let path =
        std::env::var_os(MKE2FS_ENV).map_or_else(|| PathBuf::from("/sbin/mke2fs"), PathBuf::from);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingTool {
            path,
            package: "e2fsprogs",
            env: MKE2FS_ENV,
        })
    }
}

fn static_binary(env: &'static str, name: &str, what: &'static str) -> Result<PathBuf, Error> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/x86_64-unknown-linux-gnu/release")
            .join(name)
    });
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Missing { what, path, env })
    }
}

/// Builds the guest initrd: the static agent as `/init`, and the
/// directories it mounts on. Uncompressed: the kernel only copies it into
/// its rootfs, where inflating gzip cost ~100 ms of every lab boot.
pub fn build_initrd(agent: &Path, out: &Path) -> Result<(), initramfs::Error> {
    let mut image = Initramfs::new();
    image.host_file("/init", agent, 0o755);
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", "/etc", "/root"] {
        image.dir(dir);
    }
    initramfs::create_parent(out)?;
    image.write(out, false)
}

/// Builds a test guest initrd whose /init is a busybox shell script: the
/// kernel filesystems are mounted, `script` runs, then the VM resets. For
/// exercising devices from inside a guest before the agent can run
/// commands.
pub fn build_script_initrd(script: &str, out: &Path) -> Result<(), initramfs::Error> {
    build_script_initrd_with(script, &[], out)
}

/// [`build_script_initrd`] with static `programs` added, each as
/// `(path in the guest, host file)`.
pub fn build_script_initrd_with(
    script: &str,
    programs: &[(&str, &Path)],
    out: &Path,
) -> Result<(), initramfs::Error> {
    let mut image = Initramfs::new();
    image.host_file("/bin/busybox", Path::new("/bin/busybox"), 0o755);
    for (guest_path, host_path) in programs {
        image.host_file(guest_path, host_path, 0o755);
    }
    for dir in ["/proc", "/sys", "/dev", "/tmp"] {
        image.dir(dir);
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev 2>/dev/null\n\
         {script}\n\
         sync\n\
         reboot -f\n"
    );
    image.bytes("/init", init, 0o755);
    initramfs::create_parent(out)?;
    image.write(out, false)
}

/// Size of a QEMU microvm guest.
#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    pub cpus: u32,
    pub memory_mib: u32,
    pub timeout: Duration,
}

/// How a boot went.
#[derive(Debug, Clone)]
pub struct BootReport {
    pub ready: ReadyLine,
    /// From spawning QEMU to seeing the ready line on the console.
    pub time_to_ready: Duration,
    /// Whether QEMU exited by itself (guest reset) soon after the ready line.
    pub exited_after_ready: bool,
    pub console: String,
}

/// Time the guest gets to reset itself after its ready line.
const RESET_GRACE: Duration = Duration::from_secs(10);

/// The kernel command line for QEMU: what frakti-vmm gives its guests,
/// plus `extra`, so both boot the same way.
pub fn qemu_cmdline(extra: &str) -> String {
    format!("console=ttyS0 reboot=t panic=-1 pci=off nomodule {extra}")
}

/// A QEMU `-M microvm -enable-kvm` command for the guest, console to `console`.
pub fn qemu_microvm_command(
    guest: &GuestAssets,
    cpus: u32,
    memory_mib: u32,
    cmdline: &str,
    console: &Path,
) -> Command {
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args(["-M", "microvm", "-enable-kvm", "-cpu", "host"])
        .args(["-m", &memory_mib.to_string()])
        .args(["-smp", &cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", cmdline])
        .stdin(Stdio::null());
    command
}

/// A guest that printed its ready line, still running.
#[derive(Debug)]
pub struct ReadyGuest {
    pub process: ChildGuard,
    pub ready: ReadyLine,
    /// From spawning the VMM to seeing the ready line on the console.
    pub time_to_ready: Duration,
}

/// Spawns `command` (a VMM writing the guest console to `console`) and
/// waits for the agent's ready line. stdout/stderr go to `log`.
pub fn boot_until_ready(
    command: &mut Command,
    console: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<ReadyGuest, Error> {
    let log_file = std::fs::File::create(log).map_err(Error::Console)?;
    command
        .stdout(log_file.try_clone().map_err(Error::Console)?)
        .stderr(log_file);
    let start = Instant::now();
    let mut process = ChildGuard::spawn(command).map_err(Error::Spawn)?;
    let mut tail = FileTail::new(console);
    let console_tail = || tail_lines(&read_log(console), 30);
    loop {
        let exited = process.try_wait().map_err(Error::Console)?;
        let lines = tail.new_lines().map_err(Error::Console)?;
        if let Some(line) = lines.iter().find(|l| l.contains(READY_MARKER)) {
            let time_to_ready = start.elapsed();
            let ready = line.parse().map_err(|source| Error::BadReadyLine {
                line: line.clone(),
                source,
            })?;
            return Ok(ReadyGuest {
                process,
                ready,
                time_to_ready,
            });
        }
        if let Some(status) = exited {
            return Err(Error::Exited {
                status: status.to_string(),
                qemu_log: read_log(log).trim().to_string(),
                console_tail: console_tail(),
            });
        }
        if start.elapsed() > timeout {
            let _ = process.kill();
            return Err(Error::Timeout {
                secs: timeout.as_secs(),
                console_tail: console_tail(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Boots the guest under `qemu-system-x86_64 -M microvm -enable-kvm` and
/// waits for the agent's ready line. The kernel resets by triple fault
/// (`reboot=t`), since microvm has no i8042; with `-no-reboot` QEMU exits.
pub fn boot_qemu_microvm(guest: &GuestAssets, config: &MicrovmConfig) -> Result<BootReport, Error> {
    let dir = tempfile::tempdir().map_err(Error::Console)?;
    let console = dir.path().join("console.log");
    let cmdline = qemu_cmdline(&format!("quiet {}=reset", frakti_proto::AFTER_READY_PARAM));
    let mut command =
        qemu_microvm_command(guest, config.cpus, config.memory_mib, &cmdline, &console);
    let mut booted = boot_until_ready(
        &mut command,
        &console,
        &dir.path().join("qemu.log"),
        config.timeout,
    )?;
    let exited_after_ready = wait_for_exit(&mut booted.process, RESET_GRACE);
    Ok(BootReport {
        ready: booted.ready,
        time_to_ready: booted.time_to_ready,
        exited_after_ready,
        console: read_log(&console),
    })
}

fn wait_for_exit(child: &mut ChildGuard, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}
