//! VM configuration: plain data from flags or a TOML/JSON file, validated
//! before any KVM call.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;

pub const MAX_VCPUS: u8 = 32;
pub const MIN_MEMORY_MIB: u32 = 32;
/// 1 TiB: beyond anything a pod sandbox needs; catches unit mistakes.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;

/// The command line every guest gets before the user's additions.
/// `i8042.*` keep the keyboard driver's probe to what our i8042 answers.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule \
                                i8042.noaux i8042.nomux i8042.dumbkbd";

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
