//! Volume usage as CRI metrics (ListMetricDescriptors and
//! ListPodSandboxMetrics, what kubelet serves on /metrics/cadvisor when
//! stats come from the runtime). CRI v1's ContainerStats has no field for
//! volumes — its `writable_layer` is the container's own layer, which
//! kubelet counts against ephemeral-storage limits — so each container
//! that mounts a direct-assigned volume gets cadvisor's `container_fs_*`
//! series for it, labelled with the host device, from the guest's statfs
//! of the mount. `frakti volume stats` reads the same series.

use frakti_proto::agent::v1 as pb;
use k8s_cri::v1 as cri;

use super::pod::Pod;
use super::{Result, Runtime, agent_call, lock};

/// cadvisor's label keys for filesystem series, in this order.
pub const LABEL_KEYS: [&str; 7] = [
    "container",
    "id",
    "image",
    "name",
    "namespace",
    "pod",
    "device",
];

/// One filesystem series: name, help, and its figure of a disk.
struct FsSeries {
    name: &'static str,
    help: &'static str,
    value: fn(&pb::DiskUsage) -> u64,
}

const FS_SERIES: [FsSeries; 5] = [
    FsSeries {
        name: "container_fs_usage_bytes",
        help: "Number of bytes that are consumed by the container on this filesystem.",
        value: |d| d.used_bytes,
    },
    FsSeries {
        name: "container_fs_limit_bytes",
        help: "Number of bytes that can be consumed by the container on this filesystem.",
        value: |d| d.capacity_bytes,
    },
    FsSeries {
        name: "container_fs_inodes_total",
        help: "Number of available Inodes",
        value: |d| d.inodes_total,
    },
    FsSeries {
        name: "container_fs_inodes_free",
        help: "Number of available Inodes",
        value: |d| d.inodes_free,
    },
    FsSeries {
        name: "frakti_fs_available_bytes",
        help: "Number of bytes unprivileged writers may still use on this filesystem \
               (ext4 keeps its reserved blocks out of it).",
        value: |d| d.available_bytes,
    },
];

/// The descriptors of every series [`Runtime::pod_metrics`] reports.
pub fn descriptors() -> Vec<cri::MetricDescriptor> {
    FS_SERIES
        .iter()
        .map(|s| cri::MetricDescriptor {
            name: s.name.into(),
            help: s.help.into(),
            label_keys: LABEL_KEYS.iter().map(|k| k.to_string()).collect(),
        })
        .collect()
}

/// The label values of a container's series for `device`.
pub struct SeriesLabels<'a> {
    pub container_name: &'a str,
    pub container_id: &'a str,
    pub image: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub device: &'a str,
}

/// The filesystem series of one disk for one container.
fn fs_metrics(labels: &SeriesLabels<'_>, usage: &pb::DiskUsage) -> Vec<cri::Metric> {
    let values = [
        labels.container_name,
        labels.container_id,
        labels.image,
        labels.container_id,
        labels.namespace,
        labels.pod,
        labels.device,
    ];
    FS_SERIES
        .iter()
        .map(|s| cri::Metric {
            name: s.name.into(),
            // Gathered live.
            timestamp: 0,
            metric_type: cri::MetricType::Gauge as i32,
            label_values: values.iter().map(|v| v.to_string()).collect(),
            value: Some(cri::UInt64Value {
                value: (s.value)(usage),
            }),
        })
        .collect()
}

impl Runtime {
    /// The pod's series: for each of its containers, one set per mounted
    /// block device it uses. A pod whose VM is not up has none.
    pub async fn pod_metrics(&self, pod: &Pod) -> Result<cri::PodSandboxMetrics> {
        let mut out = cri::PodSandboxMetrics {
            pod_sandbox_id: pod.id.clone(),
            ..Default::default()
        };
        let slots: Vec<_> = lock(&pod.state)
            .record
            .volumes
            .iter()
            .filter(|slot| slot.device.is_some() && !slot.owners.is_empty())
            .cloned()
            .collect();
        if slots.is_empty() {
            return Ok(out);
        }
        let Ok(mut agent) = pod.agent() else {
            return Ok(out);
        };
        let guest = agent_call(
            "StatsSandbox",
            agent.stats_sandbox(pb::StatsSandboxRequest {}),
        )
        .await?;
        let metadata = pod.config.metadata.clone().unwrap_or_default();
        for container in self.containers_of(&pod.id) {
            let mut metrics = Vec::new();
            for slot in slots.iter().filter(|s| s.owners.contains(&container.id)) {
                let Some(usage) = guest.disks.iter().find(|d| d.disk_id == slot.disk_id) else {
                    continue;
                };
                let device = slot
                    .device
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                let labels = SeriesLabels {
                    container_name: container
                        .config
                        .metadata
                        .as_ref()
                        .map_or("", |m| m.name.as_str()),
                    container_id: &container.id,
                    image: container
                        .config
                        .image
                        .as_ref()
                        .map_or("", |i| i.image.as_str()),
                    namespace: &metadata.namespace,
                    pod: &metadata.name,
                    device: &device,
                };
                metrics.extend(fs_metrics(&labels, usage));
            }
            if !metrics.is_empty() {
                out.container_metrics.push(cri::ContainerMetrics {
                    container_id: container.id.clone(),
                    metrics,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_has_a_descriptor_and_one_value_per_label_key() {
        let names: Vec<String> = descriptors().into_iter().map(|d| d.name).collect();
        let usage = pb::DiskUsage {
            disk_id: "blk-vol0".into(),
            fs_type: "ext4".into(),
            capacity_bytes: 100,
            used_bytes: 40,
            available_bytes: 55,
            inodes_total: 10,
            inodes_free: 7,
        };
        let labels = SeriesLabels {
            container_name: "web",
            container_id: "c1",
            image: "busybox",
            namespace: "default",
            pod: "p",
            device: "/dev/loop3",
        };
        let metrics = fs_metrics(&labels, &usage);
        assert_eq!(metrics.len(), names.len());
        for metric in &metrics {
            assert!(names.contains(&metric.name), "{}", metric.name);
            assert_eq!(metric.label_values.len(), LABEL_KEYS.len());
            assert_eq!(metric.label_values[6], "/dev/loop3");
        }
        let value = |name: &str| {
            metrics
                .iter()
                .find(|m| m.name == name)
                .and_then(|m| m.value.as_ref())
                .map(|v| v.value)
        };
        assert_eq!(value("container_fs_usage_bytes"), Some(40));
        assert_eq!(value("container_fs_limit_bytes"), Some(100));
        assert_eq!(value("container_fs_inodes_free"), Some(7));
        assert_eq!(value("frakti_fs_available_bytes"), Some(55));
    }
}
