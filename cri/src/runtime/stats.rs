//! Container and pod statistics, from the agent (the guest's cgroups and
//! /proc) — what kubelet's summary API and `kubectl top` show.

use frakti_proto::agent::v1 as pb;
use k8s_cri::v1 as cri;

use super::container::Container;
use super::pod::Pod;
use super::state::ContainerPhase;
use super::{Result, Runtime, agent_call};

fn value(v: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value: v })
}

fn attributes(container: &Container) -> cri::ContainerAttributes {
    cri::ContainerAttributes {
        id: container.id.clone(),
        metadata: container.config.metadata.clone(),
        labels: container.config.labels.clone(),
        annotations: container.config.annotations.clone(),
    }
}

fn container_stats(
    container: &Container,
    stats: Option<pb::StatsContainerResponse>,
) -> cri::ContainerStats {
    let mut out = cri::ContainerStats {
        attributes: Some(attributes(container)),
        ..Default::default()
    };
    let Some(stats) = stats else {
        return out;
    };
    let at = stats.timestamp_ns;
    if let Some(cpu) = stats.cpu {
        out.cpu = Some(cri::CpuUsage {
            timestamp: at,
            usage_core_nano_seconds: value(cpu.usage_ns),
            usage_nano_cores: None,
        });
    }
    if let Some(memory) = stats.memory {
        let available = memory.limit_bytes.saturating_sub(memory.working_set_bytes);
        out.memory = Some(cri::MemoryUsage {
            timestamp: at,
            working_set_bytes: value(memory.working_set_bytes),
            available_bytes: (memory.limit_bytes > 0)
                .then_some(available)
                .and_then(value),
            usage_bytes: value(memory.usage_bytes),
            rss_bytes: value(memory.rss_bytes),
            page_faults: value(memory.page_faults),
            major_page_faults: value(memory.major_page_faults),
        });
    }
    // The writable layer is an overlay upper in guest memory: its bytes
    // count in the memory figures, not as node disk.
    out.writable_layer = Some(cri::FilesystemUsage {
        timestamp: at,
        fs_id: Some(cri::FilesystemIdentifier {
            mountpoint: "/".into(),
        }),
        used_bytes: value(0),
        inodes_used: value(0),
    });
    out
}

impl Runtime {
    /// Stats of one container; a container that is not running has its
    /// attributes only.
    pub async fn container_stats(&self, container: &Container) -> Result<cri::ContainerStats> {
        let raw = self.raw_stats(container).await?;
        Ok(container_stats(container, raw))
    }

    async fn raw_stats(&self, container: &Container) -> Result<Option<pb::StatsContainerResponse>> {
        if container.phase() != ContainerPhase::Running {
            return Ok(None);
        }
        let Ok(mut agent) = self.pod(&container.pod_id).and_then(|p| p.agent()) else {
            return Ok(None);
        };
        let request = pb::StatsContainerRequest {
            container_id: container.id.clone(),
        };
        Ok(Some(
            agent_call("StatsContainer", agent.stats_container(request)).await?,
        ))
    }

    /// Pod-wide stats: the guest's memory and network, and its containers.
    pub async fn pod_stats(&self, pod: &Pod) -> Result<cri::PodSandboxStats> {
        let attributes = cri::PodSandboxAttributes {
            id: pod.id.clone(),
            metadata: pod.config.metadata.clone(),
            labels: pod.config.labels.clone(),
            annotations: pod.config.annotations.clone(),
        };
        let mut linux = cri::LinuxPodSandboxStats::default();
        let mut cpu_total = 0u64;
        let mut processes = 0u64;
        for container in self.containers_of(&pod.id) {
            let raw = self.raw_stats(&container).await?;
            if let Some(raw) = &raw {
                let cpu = raw.cpu.as_ref().map_or(0, |c| c.usage_ns);
                cpu_total = cpu_total.saturating_add(cpu);
                let pids = raw.pids.as_ref().map_or(0, |p| p.current);
                processes = processes.saturating_add(pids);
            }
            linux.containers.push(container_stats(&container, raw));
        }
        if let Ok(mut agent) = pod.agent() {
            let guest = agent_call(
                "StatsSandbox",
                agent.stats_sandbox(pb::StatsSandboxRequest {}),
            )
            .await?;
            let at = guest.timestamp_ns;
            let used = guest
                .mem_total_bytes
                .saturating_sub(guest.mem_available_bytes);
            linux.memory = Some(cri::MemoryUsage {
                timestamp: at,
                working_set_bytes: value(used),
                available_bytes: value(guest.mem_available_bytes),
                usage_bytes: value(used),
                ..Default::default()
            });
            linux.cpu = Some(cri::CpuUsage {
                timestamp: at,
                usage_core_nano_seconds: value(cpu_total),
                usage_nano_cores: None,
            });
            let interfaces: Vec<cri::NetworkInterfaceUsage> = guest
                .interfaces
                .iter()
                .map(|i| cri::NetworkInterfaceUsage {
                    name: i.name.clone(),
                    rx_bytes: value(i.rx_bytes),
                    rx_errors: value(i.rx_errors),
                    tx_bytes: value(i.tx_bytes),
                    tx_errors: value(i.tx_errors),
                })
                .collect();
            linux.network = Some(cri::NetworkUsage {
                timestamp: at,
                default_interface: interfaces.first().cloned(),
                interfaces,
            });
            linux.process = Some(cri::ProcessUsage {
                timestamp: at,
                process_count: value(processes),
            });
        }
        Ok(cri::PodSandboxStats {
            attributes: Some(attributes),
            linux: Some(linux),
            windows: None,
        })
    }
}
