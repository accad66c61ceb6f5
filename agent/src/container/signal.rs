//! Signals, and the container's processes as /proc shows them.

use super::*;

impl Containers {
    /// Signals one process, or every process of the container.
    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), Error> {
        if !process::valid_signal(signal) {
            return Err(Error::Invalid(format!("{signal} is not a signal number")));
        }
        let (container, process) = self.process(id, exec_id).await?;
        if all {
            // Everything in its cgroup, orphans included; by cgroup.kill or
            // pidfds, never by a pid that may have been reused.
            if signal == libc::SIGKILL {
                container.cgroup.kill_all();
            } else {
                container.cgroup.signal_all(signal);
            }
            if container.cgroup.path().is_none() {
                self.signal_descendants(&container, signal).await;
            }
        }
        process.signal(signal)
    }

    /// Without a cgroup (host mode only: the guest always has cgroup v2),
    /// the container's processes are found as descendants in /proc.
    pub(super) async fn signal_descendants(&self, container: &Container, signal: i32) {
        for info in self.processes(container).await {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(info.pid),
                nix::sys::signal::Signal::try_from(signal).ok(),
            );
        }
    }

    /// The processes of a container: those of its cgroup, or without one
    /// (host mode) its init, its execs and everything they started
    /// (descendants, read from /proc).
    pub async fn processes(&self, container: &Container) -> Vec<ProcessInfo> {
        if let Some(pids) = container.cgroup.pids() {
            return tokio::task::spawn_blocking(move || {
                let mut list: Vec<ProcessInfo> = pids
                    .into_iter()
                    .filter_map(read_process)
                    .filter(|p| p.state != "Z")
                    .collect();
                list.sort_by_key(|p| p.pid);
                list
            })
            .await
            .unwrap_or_default();
        }
        let mut roots = vec![container.init.pid];
        if container.init.exited().is_some() {
            roots.clear();
        }
        for p in container.execs.lock().await.values() {
            if p.exited().is_none() {
                roots.push(p.pid);
            }
        }
        tokio::task::spawn_blocking(move || descendants(&roots))
            .await
            .unwrap_or_default()
    }
}

/// One process as /proc shows it.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    pub pid: i32,
    pub ppid: i32,
    pub uid: u32,
    pub state: String,
    pub args: Vec<String>,
}

pub(super) fn read_process(pid: i32) -> Option<ProcessInfo> {
    process_info(&procfs::process::Process::new(pid).ok()?)
}

fn process_info(process: &procfs::process::Process) -> Option<ProcessInfo> {
    let stat = process.stat().ok()?;
    let uid = process.status().map_or(0, |s| s.ruid);
    Some(ProcessInfo {
        pid: stat.pid,
        ppid: stat.ppid,
        uid,
        state: stat.state.to_string(),
        args: process.cmdline().unwrap_or_default(),
    })
}

/// The living processes among `roots` and their descendants.
pub(super) fn descendants(roots: &[i32]) -> Vec<ProcessInfo> {
    let Ok(processes) = procfs::process::all_processes() else {
        return vec![];
    };
    let all: Vec<ProcessInfo> = processes
        .flatten()
        .filter_map(|p| process_info(&p))
        .filter(|p| p.state != "Z")
        .collect();
    let mut wanted: std::collections::HashSet<i32> = roots.iter().copied().collect();
    // Parents may have larger pids than children (pid wrap): iterate to a
    // fixed point.
    loop {
        let before = wanted.len();
        for p in &all {
            if wanted.contains(&p.ppid) {
                wanted.insert(p.pid);
            }
        }
        if wanted.len() == before {
            break;
        }
    }
    let mut list: Vec<ProcessInfo> = all
        .into_iter()
        .filter(|p| wanted.contains(&p.pid))
        .collect();
    list.sort_by_key(|p| p.pid);
    list
}
