//! Live resource updates and usage statistics.

use super::*;

impl Containers {
    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), Error> {
        let container = self.get(id)?;
        let resources: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| Error::Invalid(format!("malformed OCI LinuxResources JSON: {e}")))?;
        super::unsupported::check_resources(&resources, "resources")?;
        let cgroup = container.cgroup.clone();
        Ok(tokio::task::spawn_blocking(move || cgroup.apply(&resources)).await??)
    }

    pub async fn stats(&self, id: &str) -> Result<Stats, Error> {
        let container = self.get(id)?;
        let cg = container.cgroup.clone();
        let files = [
            "cpu.stat",
            "memory.stat",
            "memory.current",
            "pids.current",
            "memory.max",
            "pids.max",
        ];
        let [cpu, mem, current, pids_current, memory_max, pids_max] =
            tokio::task::spawn_blocking(move || files.map(|f| cg.read(f))).await?;
        let (cpu, mem) = (cpu.unwrap_or_default(), mem.unwrap_or_default());
        let usage = current.and_then(|t| cgroup::single_value(&t));
        let inactive_file = cgroup::flat_keyed(&mem, "inactive_file").unwrap_or(0);
        let pids = match pids_current.and_then(|t| cgroup::single_value(&t)) {
            Some(n) => n,
            None => self.processes(&container).await.len() as u64,
        };
        let usec = |key| cgroup::flat_keyed(&cpu, key).unwrap_or(0) * 1000;
        Ok(Stats {
            cpu_usage_ns: usec("usage_usec"),
            cpu_user_ns: usec("user_usec"),
            cpu_system_ns: usec("system_usec"),
            nr_periods: cgroup::flat_keyed(&cpu, "nr_periods").unwrap_or(0),
            nr_throttled: cgroup::flat_keyed(&cpu, "nr_throttled").unwrap_or(0),
            throttled_ns: usec("throttled_usec"),
            memory_usage: usage.unwrap_or(0),
            working_set: usage.unwrap_or(0).saturating_sub(inactive_file),
            rss: cgroup::flat_keyed(&mem, "anon").unwrap_or(0),
            page_faults: cgroup::flat_keyed(&mem, "pgfault").unwrap_or(0),
            major_page_faults: cgroup::flat_keyed(&mem, "pgmajfault").unwrap_or(0),
            memory_limit: memory_max
                .and_then(|t| cgroup::single_value(&t))
                .unwrap_or(0),
            oom_kills: container.oom_kills(),
            pids,
            pids_limit: pids_max.and_then(|t| cgroup::single_value(&t)).unwrap_or(0),
        })
    }
}

/// Usage figures of a container (zero where cgroups are unavailable).
#[derive(Debug, Default)]
pub struct Stats {
    pub cpu_usage_ns: u64,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_ns: u64,
    pub memory_usage: u64,
    pub working_set: u64,
    pub rss: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
    pub memory_limit: u64,
    pub oom_kills: u64,
    pub pids: u64,
    pub pids_limit: u64,
}
