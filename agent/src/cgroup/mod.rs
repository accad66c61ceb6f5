//! cgroup v2 for containers: one cgroup per container under
//! /sys/fs/cgroup/frakti (the guest's), limits written as cgroup v2 files,
//! usage read back for stats. On a host whose /sys/fs/cgroup is not cgroup2
//! (host mode on a cgroup v1 machine) every operation is a logged no-op.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxDevice, LinuxDeviceCgroup, LinuxResources};

mod block_io;
pub mod devices;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{what}")]
    Devices {
        what: String,
        #[source]
        source: io::Error,
    },
}

pub const ROOT: &str = "/sys/fs/cgroup";
const CONTROLLERS: &str = "+cpu +cpuset +memory +pids +io";

/// Whether `root` is a cgroup2 filesystem.
pub fn is_cgroup2(root: &Path) -> bool {
    nix::sys::statfs::statfs(root)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// The cgroup v2 files and values that express `resources`, in the order
/// to write them. Fields left out produce no file (unchanged).
pub fn resource_files(resources: &LinuxResources) -> Result<Vec<(String, String)>, Error> {
    let mut files = Vec::new();
    if let Some(cpu) = resources.cpu() {
        if cpu.quota().is_some() || cpu.period().is_some() {
            let period = cpu.period().unwrap_or(100_000);
            if period == 0 {
                return Err(Error::Invalid("cpu period must not be 0".into()));
            }
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            files.push(("cpu.max".into(), format!("{quota} {period}")));
        }
        if let Some(shares) = cpu.shares()
            && shares > 0
        {
            files.push(("cpu.weight".into(), shares_to_weight(shares).to_string()));
        }
        if let Some(cpus) = cpu.cpus()
            && !cpus.is_empty()
        {
            files.push(("cpuset.cpus".into(), cpus.clone()));
        }
        if let Some(mems) = cpu.mems()
            && !mems.is_empty()
        {
            files.push(("cpuset.mems".into(), mems.clone()));
        }
    }
    if let Some(memory) = resources.memory() {
        if let Some(limit) = memory.limit() {
            files.push(("memory.max".into(), limit_value(limit)));
        }
        if let Some(reservation) = memory.reservation() {
            files.push(("memory.low".into(), limit_value(reservation)));
        }
        // OCI swap is memory + swap; cgroup v2 counts swap alone.
        if let Some(swap) = memory.swap() {
            let value = match (swap, memory.limit()) {
                (s, _) if s < 0 => "max".into(),
                (s, Some(l)) if l > 0 => {
                    if s < l {
                        return Err(Error::Invalid(format!(
                            "memory swap {s} is below the memory limit {l}"
                        )));
                    }
                    (s - l).to_string()
                }
                (s, _) => s.to_string(),
            };
            files.push(("memory.swap.max".into(), value));
        }
    }
    if let Some(pids) = resources.pids() {
        files.push(("pids.max".into(), limit_value(pids.limit())));
    }
    if let Some(block_io) = resources.block_io() {
        files.extend(block_io::io_files(block_io)?);
    }
    if let Some(unified) = resources.unified() {
        let mut keys: Vec<_> = unified.keys().collect();
        keys.sort();
        for key in keys {
            if key.contains('/') || key.starts_with('.') || key.is_empty() {
                return Err(Error::Invalid(format!("bad cgroup file name '{key}'")));
            }
            files.push((key.clone(), unified[key].clone()));
        }
    }
    Ok(files)
}

fn limit_value(limit: i64) -> String {
    if limit > 0 {
        limit.to_string()
    } else {
        "max".into()
    }
}

/// cgroup v1 cpu.shares [2, 262144] to cgroup v2 cpu.weight [1, 10000], the
/// conversion runc and the kubelet use.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// A container's cgroup. `None` path: cgroups are unavailable (logged once
/// at creation) and every call does nothing. Its file writes can block
/// (memory.max reclaims, io files wait on the disk's queue): callers on
/// the async runtime use a clone in `spawn_blocking`.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: Option<PathBuf>,
}

impl Cgroup {
    /// Creates `<root>/frakti/<name>` with the controllers enabled on the
    /// way down, or a no-op cgroup when `root` is not cgroup2.
    pub fn create(root: &Path, name: &str) -> Result<Self, Error> {
        if !is_cgroup2(root) {
            tracing::info!(
                root = %root.display(),
                "not a cgroup2 filesystem: container {name} gets no cgroup (limits and stats are no-ops)"
            );
            return Ok(Self { path: None });
        }
        let parent = root.join("frakti");
        for dir in [root, parent.as_path()] {
            if dir != root {
                create_dir(dir)?;
            }
            // Enable what the kernel offers; a controller in use elsewhere
            // may refuse, which only costs that controller's limits.
            let control = dir.join("cgroup.subtree_control");
            for controller in CONTROLLERS.split(' ') {
                let _ = fs::write(&control, controller);
            }
        }
        let path = parent.join(name);
        create_dir(&path)?;
        Ok(Self { path: Some(path) })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Lets the cgroup's processes use only the devices the rules allow
    /// (see `devices`): the default list, the container's `nodes`, then
    /// the spec's `rules`. Checked even without cgroups, enforced with.
    pub fn restrict_devices(
        &self,
        nodes: &[LinuxDevice],
        rules: &[LinuxDeviceCgroup],
    ) -> Result<(), Error> {
        let rules = devices::rules(nodes, rules)?;
        match &self.path {
            Some(dir) => devices::attach(dir, &rules),
            None => Ok(()),
        }
    }

    pub fn add_process(&self, pid: i32) -> Result<(), Error> {
        self.write("cgroup.procs", &pid.to_string())
    }

    pub fn apply(&self, resources: &LinuxResources) -> Result<(), Error> {
        let files = resource_files(resources)?;
        if self.path.is_none() {
            if !files.is_empty() {
                tracing::info!("no cgroup2: resource limits not applied");
            }
            return Ok(());
        }
        if files.iter().any(|(file, _)| file == "io.weight")
            && let Some(root) = self
                .path
                .as_ref()
                .and_then(|p| p.parent())
                .and_then(|p| p.parent())
        {
            block_io::enable_weights(root, Path::new("/sys/block"));
        }
        for (file, value) in files {
            self.write(&file, &value)?;
        }
        Ok(())
    }

    fn write(&self, file: &str, value: &str) -> Result<(), Error> {
        let Some(dir) = &self.path else { return Ok(()) };
        let path = dir.join(file);
        fs::write(&path, value).map_err(|source| Error::Write {
            path,
            value: value.into(),
            source,
        })
    }

    /// Reads a cgroup file; `None` without cgroups or when absent.
    pub fn read(&self, file: &str) -> Option<String> {
        fs::read_to_string(self.path.as_ref()?.join(file)).ok()
    }

    /// SIGKILLs every process in the cgroup at once: `cgroup.kill` (Linux
    /// 5.14+; the kernel also catches the processes forked meanwhile, so a
    /// fork bomb goes in one write), else each process of `cgroup.procs`
    /// through a pidfd. What a container started outlives its process tree
    /// when orphaned (an exec's background child is reparented away from the
    /// container's init), never its cgroup.
    pub fn kill_all(&self) {
        let Some(dir) = &self.path else { return };
        if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        self.signal_all(libc::SIGKILL);
    }

    /// The processes in the cgroup now; `None` without a cgroup.
    pub fn pids(&self) -> Option<Vec<i32>> {
        let procs = self.read("cgroup.procs")?;
        Some(
            procs
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
                .collect(),
        )
    }

    /// Sends `signal` to every process in the cgroup, each through a pidfd
    /// opened first and then checked to still be in this cgroup: a pid that
    /// was reused by another process (of another container) is never hit.
    pub fn signal_all(&self, signal: i32) {
        let Some(dir) = &self.path else { return };
        for pid in self.pids().unwrap_or_default() {
            let Ok(pidfd) = crate::process::pidfd_open(pid) else {
                continue; // Gone.
            };
            if in_cgroup(pid, dir) {
                let _ = crate::process::signal_pidfd(&pidfd, pid, signal);
            }
        }
    }

    /// Removes the (empty) cgroup.
    pub fn remove(&self) -> Result<(), Error> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        // Processes may take a moment to leave after they were killed.
        for _ in 0..50 {
            match fs::remove_dir(path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(source) => {
                    return Err(Error::Remove {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        Err(Error::Remove {
            path: path.clone(),
            source: io::Error::from_raw_os_error(libc::EBUSY),
        })
    }
}

/// Whether process `pid` is in the cgroup at `dir` (its cgroup2 entry
/// in /proc/<pid>/cgroup, a path below the cgroup2 root).
fn in_cgroup(pid: i32, dir: &Path) -> bool {
    let Ok(cgroups) = procfs::process::Process::new(pid).and_then(|p| p.cgroups()) else {
        return false;
    };
    cgroups
        .0
        .iter()
        .filter(|c| c.hierarchy == 0)
        .map(|c| c.pathname.trim_start_matches('/'))
        .any(|relative| !relative.is_empty() && dir.ends_with(relative))
}

fn create_dir(path: &Path) -> Result<(), Error> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(Error::Create {
            path: path.into(),
            source,
        }),
    }
}

/// `key value` lines (cpu.stat, memory.stat, memory.events) → value of `key`.
pub fn flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A single-value file ("123\n" or "max\n"); "max" is `None`.
pub fn single_value(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn cpu_max_from_quota_and_period() {
        let files =
            resource_files(&resources(r#"{"cpu": {"quota": 50000, "period": 100000}}"#)).unwrap();
        assert_eq!(files, [("cpu.max".to_string(), "50000 100000".to_string())]);
        let files =
            resource_files(&resources(r#"{"cpu": {"quota": -1, "period": 20000}}"#)).unwrap();
        assert_eq!(files, [("cpu.max".to_string(), "max 20000".to_string())]);
        let files = resource_files(&resources(r#"{"cpu": {"quota": 25000}}"#)).unwrap();
        assert_eq!(files, [("cpu.max".to_string(), "25000 100000".to_string())]);
        assert!(resource_files(&resources(r#"{"cpu": {"period": 0}}"#)).is_err());
    }

    #[test]
    fn weight_from_shares() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1), 1);
        let files = resource_files(&resources(
            r#"{"cpu": {"shares": 1024, "cpus": "0-1", "mems": "0"}}"#,
        ))
        .unwrap();
        assert_eq!(
            files,
            [
                ("cpu.weight".to_string(), "39".to_string()),
                ("cpuset.cpus".to_string(), "0-1".to_string()),
                ("cpuset.mems".to_string(), "0".to_string())
            ]
        );
    }

    #[test]
    fn memory_and_pids() {
        let files = resource_files(&resources(
            r#"{"memory": {"limit": 134217728, "swap": 268435456}, "pids": {"limit": 100}}"#,
        ))
        .unwrap();
        assert_eq!(
            files,
            [
                ("memory.max".to_string(), "134217728".to_string()),
                ("memory.swap.max".to_string(), "134217728".to_string()),
                ("pids.max".to_string(), "100".to_string())
            ]
        );
        let files = resource_files(&resources(
            r#"{"memory": {"limit": -1}, "pids": {"limit": 0}}"#,
        ))
        .unwrap();
        assert_eq!(
            files,
            [
                ("memory.max".to_string(), "max".to_string()),
                ("pids.max".to_string(), "max".to_string())
            ]
        );
        assert!(resource_files(&resources(r#"{"memory": {"limit": 200, "swap": 100}}"#)).is_err());
    }

    #[test]
    fn unified_is_passed_through_but_checked() {
        let files =
            resource_files(&resources(r#"{"unified": {"memory.high": "1000000"}}"#)).unwrap();
        assert_eq!(files, [("memory.high".to_string(), "1000000".to_string())]);
        assert!(resource_files(&resources(r#"{"unified": {"../x": "1"}}"#)).is_err());
    }

    #[test]
    fn stat_parsing() {
        let text = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n";
        assert_eq!(flat_keyed(text, "user_usec"), Some(1000));
        assert_eq!(flat_keyed(text, "nr_periods"), None);
        assert_eq!(single_value("42\n"), Some(42));
        assert_eq!(single_value("max\n"), None);
    }

    #[test]
    fn no_cgroup2_is_a_noop() {
        let dir = tempfile::tempdir().unwrap();
        let cgroup = Cgroup::create(dir.path(), "c1").unwrap();
        assert!(cgroup.path().is_none());
        cgroup.add_process(1).unwrap();
        cgroup
            .apply(&resources(r#"{"memory": {"limit": 1000000}}"#))
            .unwrap();
        assert!(cgroup.read("memory.current").is_none());
        cgroup.remove().unwrap();
        assert!(!dir.path().join("frakti").exists());
    }
}
