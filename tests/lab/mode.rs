//! Chooses where VMs run: directly on hardware KVM, or inside the nested lab.

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

/// Set to `direct` or `nested` to override detection (`auto` is the default).
pub const MODE_ENV: &str = "FRAKTI_LAB";
/// Set inside the lab's L1 so that nothing tries to nest a second time.
pub const IN_LAB_ENV: &str = "FRAKTI_IN_LAB";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// `/dev/kvm` can boot a Linux guest: run VMs here.
    Direct { reason: String },
    /// Run VMs inside the lab's L1 VM.
    Nested { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot open /dev/kvm read-write ({source}): run as root or add your user to the \
         'kvm' group (sudo usermod -aG kvm $USER, then log in again)"
    )]
    KvmPermission {
        #[source]
        source: io::Error,
    },
    #[error("{MODE_ENV}='{0}' is not one of auto, direct, nested")]
    BadOverride(String),
    #[error(
        "running inside the lab's L1 but /dev/kvm is not hardware KVM ({reason}); \
         the L1 kvm-amd module did not load (see the L1 console log)"
    )]
    NoKvmInLab { reason: String },
}

impl Mode {
    /// Detects the mode for this host, honouring `FRAKTI_LAB`.
    pub fn detect() -> Result<Mode, Error> {
        let choice = std::env::var(MODE_ENV).unwrap_or_default();
        let mode = detect_in(Path::new("/"), &choice)?;
        if let Mode::Nested { reason } = &mode {
            if std::env::var_os(IN_LAB_ENV).is_some() {
                return Err(Error::NoKvmInLab {
                    reason: reason.clone(),
                });
            }
        }
        Ok(mode)
    }

    pub fn is_nested(&self) -> bool {
        matches!(self, Mode::Nested { .. })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Direct { reason } => write!(f, "direct: {reason}"),
            Mode::Nested { reason } => write!(
                f,
                "nested lab (QEMU TCG, emulated AMD SVM+NPT, L1 Linux with kvm-amd): {reason}"
            ),
        }
    }
}

/// Detection against a filesystem root, so tests can fake `/sys` and `/dev`.
pub fn detect_in(root: &Path, choice: &str) -> Result<Mode, Error> {
    match choice {
        "" | "auto" => {}
        "direct" => {
            open_kvm(&root.join("dev/kvm"))?;
            return Ok(Mode::Direct {
                reason: format!("forced by {MODE_ENV}=direct"),
            });
        }
        "nested" => {
            return Ok(Mode::Nested {
                reason: format!("forced by {MODE_ENV}=nested"),
            });
        }
        other => return Err(Error::BadOverride(other.to_string())),
    }
    let kvm = root.join("dev/kvm");
    if !kvm.exists() {
        return Ok(Mode::Nested {
            reason: "this host has no /dev/kvm".into(),
        });
    }
    let module = |name: &str| -> PathBuf { root.join("sys/module").join(name) };
    if module("kvm_pvm").exists() {
        return Ok(Mode::Nested {
            reason: "/dev/kvm is PVM (kvm_pvm), a software hypervisor too slow and \
                     incomplete to boot a Linux guest"
                .into(),
        });
    }
    for hw in ["kvm_intel", "kvm_amd"] {
        if module(hw).exists() {
            open_kvm(&kvm)?;
            return Ok(Mode::Direct {
                reason: format!("/dev/kvm is hardware KVM ({hw})"),
            });
        }
    }
    Ok(Mode::Nested {
        reason: "/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded".into(),
    })
}

fn open_kvm(path: &Path) -> Result<(), Error> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|source| Error::KvmPermission { source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn fake_root(modules: &[&str], with_kvm: bool) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for m in modules {
            fs::create_dir_all(root.path().join("sys/module").join(m)).unwrap();
        }
        fs::create_dir_all(root.path().join("dev")).unwrap();
        if with_kvm {
            fs::write(root.path().join("dev/kvm"), "").unwrap();
        }
        root
    }

    #[test]
    fn pvm_runs_nested() {
        let root = fake_root(&["kvm", "kvm_pvm"], true);
        let mode = detect_in(root.path(), "").unwrap();
        assert!(mode.is_nested(), "{mode}");
        assert!(mode.to_string().contains("kvm_pvm"));
    }

    #[test]
    fn no_kvm_runs_nested() {
        let root = fake_root(&[], false);
        let mode = detect_in(root.path(), "auto").unwrap();
        assert!(mode.to_string().contains("no /dev/kvm"), "{mode}");
    }

    #[test]
    fn hardware_kvm_runs_direct() {
        for hw in ["kvm_intel", "kvm_amd"] {
            let root = fake_root(&["kvm", hw], true);
            let mode = detect_in(root.path(), "").unwrap();
            assert_eq!(
                mode,
                Mode::Direct {
                    reason: format!("/dev/kvm is hardware KVM ({hw})")
                }
            );
        }
    }

    #[test]
    fn unknown_kvm_backend_runs_nested() {
        let root = fake_root(&["kvm"], true);
        assert!(detect_in(root.path(), "").unwrap().is_nested());
    }

    #[test]
    fn overrides() {
        let root = fake_root(&["kvm_amd"], true);
        assert!(detect_in(root.path(), "nested").unwrap().is_nested());
        let pvm = fake_root(&["kvm_pvm"], true);
        assert!(!detect_in(pvm.path(), "direct").unwrap().is_nested());
        let err = detect_in(root.path(), "fast").unwrap_err();
        assert!(err.to_string().contains("'fast'"), "{err}");
    }

    #[test]
    fn unopenable_kvm_is_a_clear_error() {
        let root = fake_root(&["kvm_intel"], false);
        // A directory cannot be opened for writing, whoever we are.
        fs::create_dir(root.path().join("dev/kvm")).unwrap();
        let err = detect_in(root.path(), "").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/dev/kvm") && text.contains("kvm' group"),
            "{text}"
        );
    }
}
