//! VM configuration: plain data from flags or a TOML/JSON file, validated
//! before any KVM call.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;

pub const MAX_VCPUS: u8 = 32;
/// Disks (and empty slots) per VM: each takes one of the IRQs 5-23.
pub const MAX_DISKS: usize = 16;
/// virtio-blk serials are at most 20 bytes (VIRTIO_BLK_ID_BYTES).
pub const MAX_SERIAL_LEN: usize = 20;
pub const MIN_MEMORY_MIB: u32 = 32;
/// 1 TiB: beyond anything a pod sandbox needs; catches unit mistakes.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;

/// The command line every guest gets before the user's additions.
/// `i8042.*` keep the keyboard driver's probe to what our i8042 answers.
/// Two boot-time savings, as Kata Containers passes them too:
/// `noreplace-smp` keeps the lock prefixes of a 1-vCPU guest instead of
/// rewriting each (thousands of text pokes), and `no_timer_check` skips
/// waiting several timer ticks to prove the IO-APIC timer works.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule \
                                i8042.noaux i8042.nomux i8042.dumbkbd \
                                noreplace-smp no_timer_check";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    /// The guest console goes to the VMM's stdout.
    #[default]
    Stdout,
    /// The guest console is discarded.
    None,
    /// The guest console is appended to this file.
    #[serde(untagged)]
    File(PathBuf),
}

/// A virtio-blk disk, or an empty slot whose backing file is set later
/// through the control API (how images and volumes reach a running pod).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The name the guest finds the disk by (its virtio-blk serial).
    pub serial: String,
    /// Raw image file or host block device; none for an empty slot.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// `serial=NAME[,path=FILE][,ro]`, as given to `--disk`.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut disk = DiskConfig {
            serial: String::new(),
            path: None,
            read_only: false,
        };
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("serial", v)) => disk.serial = v.to_string(),
                Some(("path", v)) => disk.path = Some(PathBuf::from(v)),
                None if part == "ro" => disk.read_only = true,
                _ => {
                    return Err(format!(
                        "'{part}' in '{text}': expected serial=NAME[,path=FILE][,ro]"
                    ));
                }
            }
        }
        if disk.serial.is_empty() {
            return Err(format!("'{text}' has no serial=NAME"));
        }
        Ok(disk)
    }
}

/// The VM's vsock device: the guest's CID and the unix socket its host side
/// listens on (Firecracker's hybrid vsock: host clients connect there and
/// write `CONNECT <port>\n`; guest connections to host port P go to
/// `<uds>_P`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest context ID, 3 and up.
    pub cid: u64,
    pub uds: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = String;

    /// `cid=N,uds=PATH`, as given to `--vsock`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (mut cid, mut uds) = (None, None);
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(
                        v.parse()
                            .map_err(|_| format!("cid {v:?} is not a number"))?,
                    )
                }
                Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
                _ => return Err(format!("'{part}' in '{text}': expected cid=N,uds=PATH")),
            }
        }
        match (cid, uds) {
            (Some(cid), Some(uds)) => Ok(VsockConfig { cid, uds }),
            _ => Err(format!("'{text}' needs both cid=N and uds=PATH")),
        }
    }
}

/// The VM's network device: a tap created or attached by name, or one
/// already open and inherited as a file descriptor (how frakti hands over a
/// tap it made in the pod's network namespace), and the guest's MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    #[serde(default)]
    pub tap: Option<String>,
    /// An inherited tap (opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).
    #[serde(default)]
    pub fd: Option<i32>,
    /// `aa:bb:cc:dd:ee:ff`; a random locally administered one if absent.
    #[serde(default)]
    pub mac: Option<String>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `tap=NAME|fd=N[,mac=MAC]`, as given to `--net`.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut net = NetConfig {
            tap: None,
            fd: None,
            mac: None,
        };
        for part in text.split(',') {
            match part.split_once('=') {
                Some(("tap", v)) => net.tap = Some(v.to_string()),
                Some(("fd", v)) => {
                    net.fd = Some(v.parse().map_err(|_| format!("fd {v:?} is not a number"))?)
                }
                Some(("mac", v)) => net.mac = Some(v.to_string()),
                _ => {
                    return Err(format!(
                        "'{part}' in '{text}': expected tap=NAME|fd=N[,mac=MAC]"
                    ));
                }
            }
        }
        Ok(net)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs, 1..=32.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// ELF vmlinux (PVH or 64-bit entry) or bzImage.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Appended to [`BASE_CMDLINE`].
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub serial: SerialOutput,
    /// Feed the VMM's stdin to the guest console.
    #[serde(default)]
    pub console_input: bool,
    /// Unix socket for the control API.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Per-thread seccomp filters (turn off only to debug).
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// virtio-blk disks and empty slots, in order (vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// The vsock device, if any.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// The network device, if any.
    #[serde(default)]
    pub net: Option<NetConfig>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    #[error("memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {0}")]
    Memory(u32),
    #[error("{what} {path} is not a readable file")]
    File { what: &'static str, path: PathBuf },
    #[error("kernel command line is {0} bytes, more than {CMDLINE_MAX_SIZE}")]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL or newline")]
    CmdlineChars,
    #[error("directory of {what} {path} does not exist")]
    NoParentDir { what: &'static str, path: PathBuf },
    #[error("at most {MAX_DISKS} disks, got {0}")]
    TooManyDisks(usize),
    #[error("disk serial {0:?} must be 1-{MAX_SERIAL_LEN} characters of [A-Za-z0-9._-]")]
    BadSerial(String),
    #[error("two disks have the serial {0:?}")]
    DuplicateSerial(String),
    #[error("disk {serial:?}: {path} is not a readable file or block device")]
    DiskPath { serial: String, path: PathBuf },
    #[error("vsock CID {0} is reserved or too large (use 3 ..= 4294967294)")]
    VsockCid(u64),
    #[error("net: give exactly one of tap=NAME and fd=N")]
    NetBackend,
    #[error("net: tap name {0:?} must be 1-15 bytes without '/', ':' or spaces")]
    TapName(String),
    #[error("net: fd {0} is not an open file descriptor")]
    TapFd(i32),
    #[error("net: fd {0} is a standard stream, not an inherited tap")]
    StdioFd(i32),
    #[error("net: fd {fd} is not a usable tap: {reason}")]
    NotATap { fd: i32, reason: String },
    #[error("net: MAC {0:?} is not a unicast aa:bb:cc:dd:ee:ff")]
    Mac(String),
    #[error("cannot read config file {path}: {reason}")]
    ReadFile { path: PathBuf, reason: String },
    #[error("config file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
}

impl VmConfig {
    /// One vCPU, 128 MiB, console on stdout, seccomp on: the defaults for
    /// everything but the kernel.
    pub fn with_kernel(kernel: PathBuf) -> VmConfig {
        VmConfig {
            vcpus: 1,
            memory_mib: 128,
            kernel,
            initrd: None,
            cmdline: String::new(),
            serial: SerialOutput::Stdout,
            console_input: false,
            api_socket: None,
            seccomp: true,
            disks: Vec::new(),
            vsock: None,
            net: None,
        }
    }

    /// Reads a config from a `.toml` or `.json` file (by extension; TOML
    /// otherwise). Not yet validated.
    pub fn from_file(path: &Path) -> Result<VmConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ReadFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let parse_err = |reason: String| Error::Parse {
            path: path.to_path_buf(),
            reason,
        };
        if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| parse_err(e.to_string()))
        } else {
            toml::from_str(&text).map_err(|e| parse_err(e.to_string()))
        }
    }

    /// Checks every value; the first problem is returned.
    pub fn validate(&self) -> Result<(), Error> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(Error::Memory(self.memory_mib));
        }
        readable_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            readable_file("initrd", initrd)?;
        }
        let cmdline = self.full_cmdline();
        // The kernel wants room for the terminating NUL.
        if cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(Error::CmdlineTooLong(cmdline.len()));
        }
        if cmdline.contains(['\0', '\n']) {
            return Err(Error::CmdlineChars);
        }
        if let SerialOutput::File(path) = &self.serial {
            parent_exists("serial output file", path)?;
        }
        if let Some(socket) = &self.api_socket {
            parent_exists("API socket", socket)?;
        }
        if let Some(vsock) = &self.vsock {
            if !(3..u64::from(u32::MAX)).contains(&vsock.cid) {
                return Err(Error::VsockCid(vsock.cid));
            }
            parent_exists("vsock socket", &vsock.uds)?;
        }
        if let Some(net) = &self.net {
            validate_net(net)?;
        }
        self.validate_disks()
    }

    fn validate_disks(&self) -> Result<(), Error> {
        if self.disks.len() > MAX_DISKS {
            return Err(Error::TooManyDisks(self.disks.len()));
        }
        let mut seen = std::collections::HashSet::new();
        for disk in &self.disks {
            validate_serial(&disk.serial)?;
            if !seen.insert(disk.serial.as_str()) {
                return Err(Error::DuplicateSerial(disk.serial.clone()));
            }
            if let Some(path) = &disk.path {
                if !is_disk_file(path) {
                    return Err(Error::DiskPath {
                        serial: disk.serial.clone(),
                        path: path.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn full_cmdline(&self) -> String {
        let extra = self.cmdline.trim();
        if extra.is_empty() {
            BASE_CMDLINE.to_string()
        } else {
            format!("{BASE_CMDLINE} {extra}")
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

/// An inherited `fd=N` must be a tap, checked before the VMM opens
/// anything (validation runs before the API socket is bound), so N can
/// never be one of the VMM's own descriptors. Standard streams are refused.
fn check_inherited_tap(fd: i32) -> Result<(), Error> {
    if (0..=2).contains(&fd) {
        return Err(Error::StdioFd(fd));
    }
    // SAFETY: F_GETFD only asks whether `fd` is open.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Error::TapFd(fd));
    }
    // SAFETY: `fd` is open (checked above) and stays open for the check:
    // nothing in the process closes descriptors it does not own.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    crate::devices::virtio::net::tap::check_tap_fd(borrowed)
        .map(drop)
        .map_err(|e| Error::NotATap {
            fd,
            reason: frakti_proto::error_chain(&e),
        })
}

fn validate_net(net: &NetConfig) -> Result<(), Error> {
    match (&net.tap, net.fd) {
        (Some(name), None) => {
            let plain = !name.is_empty()
                && name.len() < libc::IFNAMSIZ
                && !name.contains(['/', ':', ' ', '\0']);
            if !plain {
                return Err(Error::TapName(name.clone()));
            }
        }
        (None, Some(fd)) => check_inherited_tap(fd)?,
        _ => return Err(Error::NetBackend),
    }
    if let Some(mac) = &net.mac {
        mac.parse::<crate::devices::virtio::net::mac::MacAddr>()
            .map_err(|_| Error::Mac(mac.clone()))?;
    }
    Ok(())
}

fn readable_file(what: &'static str, path: &Path) -> Result<(), Error> {
    let ok = std::fs::File::open(path)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.is_file());
    if ok {
        Ok(())
    } else {
        Err(Error::File {
            what,
            path: path.to_path_buf(),
        })
    }
}

/// Serials name disks in the API and in the guest: keep them plain.
pub fn validate_serial(serial: &str) -> Result<(), Error> {
    let plain = serial
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if plain && (1..=MAX_SERIAL_LEN).contains(&serial.len()) {
        Ok(())
    } else {
        Err(Error::BadSerial(serial.to_string()))
    }
}

/// A regular file or a block device we can open.
pub fn is_disk_file(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::File::open(path)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.is_file() || m.file_type().is_block_device())
}

fn parent_exists(what: &'static str, path: &Path) -> Result<(), Error> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(Error::NoParentDir {
            what,
            path: path.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"x").unwrap();
        VmConfig {
            vcpus: 2,
            memory_mib: 256,
            ..VmConfig::with_kernel(kernel)
        }
    }

    #[test]
    fn bad_values_are_rejected_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let ok = valid(dir.path());
        assert_eq!(ok.validate(), Ok(()));
        let check = |f: &dyn Fn(&mut VmConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(check(&|c| c.vcpus = 0), Error::Vcpus(0));
        assert_eq!(check(&|c| c.vcpus = 33), Error::Vcpus(33));
        assert_eq!(check(&|c| c.memory_mib = 8), Error::Memory(8));
        assert_eq!(check(&|c| c.memory_mib = u32::MAX), Error::Memory(u32::MAX));
        assert!(matches!(
            check(&|c| c.kernel = "/nonexistent".into()),
            Error::File { what: "kernel", .. }
        ));
        assert!(matches!(
            check(&|c| c.initrd = Some(dir.path().to_path_buf())),
            Error::File { what: "initrd", .. }
        ));
        assert!(matches!(
            check(&|c| c.cmdline = "x".repeat(CMDLINE_MAX_SIZE)),
            Error::CmdlineTooLong(_)
        ));
        assert_eq!(check(&|c| c.cmdline = "a\nb".into()), Error::CmdlineChars);
        assert!(matches!(
            check(&|c| c.api_socket = Some("/nonexistent/dir/api.sock".into())),
            Error::NoParentDir { .. }
        ));
    }

    #[test]
    fn net_from_flags_and_its_checks() {
        let net: NetConfig = "tap=tap0,mac=52:54:00:12:34:56".parse().unwrap();
        assert_eq!(net.tap.as_deref(), Some("tap0"));
        assert_eq!(net.mac.as_deref(), Some("52:54:00:12:34:56"));
        assert!("tap=x,bogus".parse::<NetConfig>().is_err());
        assert!("fd=x".parse::<NetConfig>().is_err());
        let dir = tempfile::tempdir().unwrap();
        let mut c = valid(dir.path());
        let mut check = |net: &str| {
            c.net = Some(net.parse().unwrap());
            c.validate()
        };
        assert_eq!(check("tap=tap0"), Ok(()));
        assert_eq!(check("fd=2"), Err(Error::StdioFd(2)));
        // An open descriptor that is no tap (e.g. what would have been the
        // API socket) is refused, not adopted and closed.
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        match check(&format!("fd={fd}")) {
            Err(Error::NotATap {
                fd: refused,
                reason,
            }) => {
                assert_eq!(refused, fd);
                assert!(reason.contains("not an attached tun/tap"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(file.metadata().is_ok(), "the refused fd was closed");
        assert_eq!(check("mac=52:54:00:12:34:56"), Err(Error::NetBackend));
        assert_eq!(check("tap=a,fd=2"), Err(Error::NetBackend));
        assert_eq!(
            check("tap=averyveryverylongname"),
            Err(Error::TapName("averyveryverylongname".into()))
        );
        assert_eq!(check("tap=a/b"), Err(Error::TapName("a/b".into())));
        assert_eq!(check("fd=999999"), Err(Error::TapFd(999999)));
        assert_eq!(
            check("tap=t,mac=01:00:00:00:00:01"),
            Err(Error::Mac("01:00:00:00:00:01".into()))
        );
        assert_eq!(check("tap=t,mac=zz"), Err(Error::Mac("zz".into())));
    }

    #[test]
    fn vsock_from_flags_and_its_checks() {
        let vsock: VsockConfig = "cid=3,uds=/run/v.sock".parse().unwrap();
        assert_eq!(vsock.cid, 3);
        assert_eq!(vsock.uds, PathBuf::from("/run/v.sock"));
        for bad in [
            "cid=3",
            "uds=/x",
            "cid=x,uds=/x",
            "cid=3,uds=",
            "cid=3,uds=/x,z",
        ] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let mut c = valid(dir.path());
        c.vsock = Some(VsockConfig {
            cid: 2,
            uds: dir.path().join("v.sock"),
        });
        assert_eq!(c.validate(), Err(Error::VsockCid(2)));
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds: dir.path().join("no/such/dir/v.sock"),
        });
        assert!(matches!(c.validate(), Err(Error::NoParentDir { .. })));
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds: dir.path().join("v.sock"),
        });
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn disks_from_flags_and_their_checks() {
        let disk: DiskConfig = "serial=rootfs,path=/img,ro".parse().unwrap();
        assert_eq!(disk.serial, "rootfs");
        assert_eq!(disk.path, Some(PathBuf::from("/img")));
        assert!(disk.read_only);
        let slot: DiskConfig = "serial=vol0".parse().unwrap();
        assert_eq!((slot.path, slot.read_only), (None, false));
        assert!("path=/img".parse::<DiskConfig>().is_err());
        assert!("serial=a,bogus".parse::<DiskConfig>().is_err());

        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::write(&image, vec![0u8; 4096]).unwrap();
        let mut c = valid(dir.path());
        c.disks = vec![
            DiskConfig {
                serial: "a".into(),
                path: Some(image.clone()),
                read_only: false,
            },
            DiskConfig {
                serial: "b".into(),
                path: None,
                read_only: true,
            },
        ];
        assert_eq!(c.validate(), Ok(()));
        let mut dup = c.clone();
        dup.disks[1].serial = "a".into();
        assert_eq!(dup.validate(), Err(Error::DuplicateSerial("a".into())));
        let mut bad = c.clone();
        bad.disks[0].serial = "x".repeat(21);
        assert!(matches!(bad.validate(), Err(Error::BadSerial(_))));
        bad.disks[0].serial = "a b".into();
        assert!(matches!(bad.validate(), Err(Error::BadSerial(_))));
        let mut missing = c.clone();
        missing.disks[0].path = Some(dir.path().join("nope"));
        assert!(matches!(missing.validate(), Err(Error::DiskPath { .. })));
        let mut many = c.clone();
        many.disks = (0..17)
            .map(|i| DiskConfig {
                serial: format!("d{i}"),
                path: None,
                read_only: false,
            })
            .collect();
        assert_eq!(many.validate(), Err(Error::TooManyDisks(17)));
    }

    #[test]
    fn files_in_toml_and_json() {
        let dir = tempfile::tempdir().unwrap();
        let toml_path = dir.path().join("vm.toml");
        std::fs::write(
            &toml_path,
            "vcpus = 2\nmemory_mib = 512\nkernel = \"/k\"\nserial = \"/tmp/console.log\"\n",
        )
        .unwrap();
        let c = VmConfig::from_file(&toml_path).unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (2, 512));
        assert_eq!(c.serial, SerialOutput::File("/tmp/console.log".into()));
        assert!(c.seccomp);

        let json_path = dir.path().join("vm.json");
        std::fs::write(
            &json_path,
            r#"{"vcpus": 1, "memory_mib": 128, "kernel": "/k", "serial": "none", "seccomp": false}"#,
        )
        .unwrap();
        let c = VmConfig::from_file(&json_path).unwrap();
        assert_eq!(c.serial, SerialOutput::None);
        assert!(!c.seccomp);

        std::fs::write(
            &json_path,
            r#"{"vcpus": 1, "memory_mib": 128, "kernel": "/k", "bogus": 1}"#,
        )
        .unwrap();
        let err = VmConfig::from_file(&json_path).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn cmdline_is_base_plus_extra() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = valid(dir.path());
        assert_eq!(c.full_cmdline(), BASE_CMDLINE);
        c.cmdline = " quiet ".into();
        assert_eq!(c.full_cmdline(), format!("{BASE_CMDLINE} quiet"));
    }
}
