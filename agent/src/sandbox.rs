//! The pod-wide settings: hostname, DNS, sysctls, the pod's cgroup.
//!
//! The guest is the pod: containers share its network, and (when their
//! spec asks for no UTS/IPC namespace of their own, which is how the host
//! builds pod containers) its hostname and IPC namespace, so the settings
//! here apply to every container. resolv.conf and hostname are also kept
//! as files under `<state dir>/sandbox/` for the host to bind into
//! containers.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

use oci_spec::runtime::LinuxResources;

use crate::cgroup;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("the sandbox is already set up")]
    AlreadySetUp,
    #[error("cannot set the hostname")]
    Hostname(#[source] nix::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
}

pub struct SandboxConfig {
    pub hostname: String,
    pub resolv_conf: Vec<u8>,
    pub sysctls: HashMap<String, String>,
    pub resources_json: Vec<u8>,
}

pub struct Sandbox {
    state_dir: PathBuf,
    /// Also write /etc/resolv.conf (only as the guest's PID 1, never on a
    /// host).
    guest: bool,
    cgroup_root: PathBuf,
    done: Mutex<bool>,
}

/// Checks a sysctl name and gives its /proc/sys path.
pub fn sysctl_path(key: &str) -> Result<PathBuf, Error> {
    let valid = !key.is_empty()
        && key.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if !valid {
        return Err(Error::Invalid(format!("bad sysctl name '{key}'")));
    }
    Ok(PathBuf::from("/proc/sys").join(key.replace('.', "/")))
}

/// Checks a hostname (RFC 1123 labels, at most 64 bytes as the kernel allows).
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Sandbox {
    pub fn new(state_dir: PathBuf, cgroup_root: PathBuf, guest: bool) -> Self {
        Self {
            state_dir,
            guest,
            cgroup_root,
            done: Mutex::new(false),
        }
    }

    fn write(&self, path: PathBuf, data: &[u8]) -> Result<(), Error> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|source| Error::Write {
                path: parent.into(),
                source,
            })?;
        }
        fs::write(&path, data).map_err(|source| Error::Write { path, source })
    }

    /// Applies the settings; only once.
    pub fn setup(&self, config: &SandboxConfig) -> Result<(), Error> {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return Err(Error::AlreadySetUp);
        }
        // Validate everything before changing anything.
        if !config.hostname.is_empty() && !valid_hostname(&config.hostname) {
            return Err(Error::Invalid(format!(
                "bad hostname '{}'",
                config.hostname
            )));
        }
        let mut sysctls = Vec::new();
        for (key, value) in &config.sysctls {
            if value.contains('\n') {
                return Err(Error::Invalid(format!("bad value for sysctl {key}")));
            }
            sysctls.push((sysctl_path(key)?, key, value));
        }
        sysctls.sort();
        let resources: Option<LinuxResources> =
            if config.resources_json.is_empty() {
                None
            } else {
                Some(serde_json::from_slice(&config.resources_json).map_err(|e| {
                    Error::Invalid(format!("malformed OCI LinuxResources JSON: {e}"))
                })?)
            };
        let sandbox_dir = self.state_dir.join("sandbox");
        if !config.hostname.is_empty() {
            nix::unistd::sethostname(&config.hostname).map_err(Error::Hostname)?;
            self.write(
                sandbox_dir.join("hostname"),
                format!("{}\n", config.hostname).as_bytes(),
            )?;
        }
        if !config.resolv_conf.is_empty() {
            self.write(sandbox_dir.join("resolv.conf"), &config.resolv_conf)?;
            if self.guest {
                self.write(PathBuf::from("/etc/resolv.conf"), &config.resolv_conf)?;
            }
        }
        for (path, key, value) in sysctls {
            fs::write(&path, value).map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => Error::Invalid(format!("unknown sysctl {key}")),
                _ => Error::Write {
                    path: path.clone(),
                    source,
                },
            })?;
        }
        if let Some(resources) = resources {
            let pod = cgroup::Cgroup::create(&self.cgroup_root, "")?;
            pod.apply(&resources)?;
        }
        *done = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_names() {
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
        assert!(sysctl_path("kernel.shm_rmid_forced").is_ok());
        assert!(sysctl_path("net..x").is_err());
        assert!(sysctl_path("../../etc").is_err());
        assert!(sysctl_path("net/ipv4").is_err());
    }

    #[test]
    fn hostnames() {
        assert!(valid_hostname("pod-1.example"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("-bad"));
        assert!(!valid_hostname("a_b"));
        assert!(!valid_hostname(&"a".repeat(65)));
    }

    #[test]
    fn bad_input_changes_nothing() {
        let state = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::new(state.path().into(), state.path().into(), false);
        let config = SandboxConfig {
            hostname: "bad_name".into(),
            resolv_conf: b"nameserver 10.0.0.10\n".to_vec(),
            sysctls: HashMap::new(),
            resources_json: vec![],
        };
        assert!(matches!(sandbox.setup(&config), Err(Error::Invalid(_))));
        assert!(!state.path().join("sandbox/resolv.conf").exists());
        let config = SandboxConfig {
            hostname: String::new(),
            resources_json: b"{bad".to_vec(),
            ..config
        };
        assert!(matches!(sandbox.setup(&config), Err(Error::Invalid(_))));
        let config = SandboxConfig {
            resources_json: vec![],
            ..config
        };
        sandbox.setup(&config).unwrap();
        assert_eq!(
            fs::read(state.path().join("sandbox/resolv.conf")).unwrap(),
            b"nameserver 10.0.0.10\n"
        );
        assert!(matches!(sandbox.setup(&config), Err(Error::AlreadySetUp)));
    }
}
