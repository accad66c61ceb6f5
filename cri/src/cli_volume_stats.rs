//! `frakti volume stats`: the usage of direct volumes, measured by the
//! guest that mounts each one. The daemon serves it as CRI metrics
//! (`container_fs_*` labelled by device, see `runtime::metrics`); this reads
//! those and matches them to the registered volumes by device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use frakti_cri::runtime::metrics::LABEL_KEYS;
use frakti_cri::volume::{Error, VolumeRecord, VolumeStore};
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use serde::Serialize;

/// A volume's usage as the guest sees it.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
struct VolumeUsage {
    path: PathBuf,
    device: PathBuf,
    fs_type: String,
    pod: String,
    capacity_bytes: u64,
    used_bytes: u64,
    available_bytes: u64,
    inodes_total: u64,
    inodes_free: u64,
    inodes_used: u64,
}

/// Series values by device: (pod id, series name → value), the first
/// container's set for each device.
type ByDevice = HashMap<String, (String, HashMap<String, u64>)>;

fn by_device(metrics: &[cri::PodSandboxMetrics]) -> ByDevice {
    let device_index = LABEL_KEYS.iter().position(|k| *k == "device");
    let mut found: ByDevice = HashMap::new();
    for pod in metrics {
        for container in &pod.container_metrics {
            for metric in &container.metrics {
                let Some(device) = device_index.and_then(|i| metric.label_values.get(i)) else {
                    continue;
                };
                let Some(value) = &metric.value else {
                    continue;
                };
                let entry = found
                    .entry(device.clone())
                    .or_insert_with(|| (pod.pod_sandbox_id.clone(), HashMap::new()));
                if entry.0 == pod.pod_sandbox_id {
                    entry.1.entry(metric.name.clone()).or_insert(value.value);
                }
            }
        }
    }
    found
}

fn usage_of(record: &VolumeRecord, found: &ByDevice) -> Option<VolumeUsage> {
    let (pod, series) = found.get(&record.device.display().to_string())?;
    let get = |name: &str| series.get(name).copied().unwrap_or(0);
    let inodes_total = get("container_fs_inodes_total");
    let inodes_free = get("container_fs_inodes_free");
    Some(VolumeUsage {
        path: record.path.clone(),
        device: record.device.clone(),
        fs_type: record.fs_type.clone(),
        pod: pod.clone(),
        capacity_bytes: get("container_fs_limit_bytes"),
        used_bytes: get("container_fs_usage_bytes"),
        available_bytes: get("frakti_fs_available_bytes"),
        inodes_total,
        inodes_free,
        inodes_used: inodes_total.saturating_sub(inodes_free),
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn print_table(records: &[VolumeRecord], found: &ByDevice) {
    println!(
        "{:<12} {:>10} {:>10} {:>10} {:>5} {:>8} {:>8} {:<16} PATH",
        "POD", "SIZE", "USED", "AVAIL", "USE%", "INODES", "IUSED", "DEVICE"
    );
    for record in records {
        let Some(u) = usage_of(record, found) else {
            println!(
                "{:<12} {:>10} {:>10} {:>10} {:>5} {:>8} {:>8} {:<16} {}",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                record.device.display(),
                record.path.display()
            );
            continue;
        };
        let percent = (u.used_bytes.saturating_mul(100))
            .checked_div(u.capacity_bytes)
            .unwrap_or(0);
        let pod: String = u.pod.chars().take(12).collect();
        println!(
            "{:<12} {:>10} {:>10} {:>10} {:>4}% {:>8} {:>8} {:<16} {}",
            pod,
            mib(u.capacity_bytes),
            mib(u.used_bytes),
            mib(u.available_bytes),
            percent,
            u.inodes_total,
            u.inodes_used,
            u.device.display(),
            u.path.display()
        );
    }
}

pub async fn run(
    store: &VolumeStore,
    endpoint: &Path,
    path: Option<PathBuf>,
    format: &str,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        format == "table" || format == "json",
        "--format is table or json, not {format:?}"
    );
    let records = match &path {
        Some(path) => vec![
            store
                .get(path)?
                .ok_or_else(|| Error::NotFound(path.clone()))?,
        ],
        None => store.list()?,
    };
    let channel = frakti_cri::client::connect(endpoint).await?;
    let metrics = RuntimeServiceClient::new(channel)
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await
        .map_err(|e| anyhow::anyhow!("{} ({:?})", e.message(), e.code()))?
        .into_inner()
        .pod_metrics;
    let found = by_device(&metrics);
    if let Some(path) = path {
        let usage = records.first().and_then(|r| usage_of(r, &found));
        let Some(usage) = usage else {
            anyhow::bail!(
                "no running pod mounts the direct volume {}: its usage is measured inside the VM \
                 that mounts it",
                path.display()
            );
        };
        if format == "json" {
            println!("{}", serde_json::to_string_pretty(&usage)?);
        } else {
            print_table(&records, &found);
        }
        return Ok(());
    }
    if format == "json" {
        let list: Vec<VolumeUsage> = records.iter().filter_map(|r| usage_of(r, &found)).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print_table(&records, &found);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(name: &str, device: &str, value: u64) -> cri::Metric {
        let mut labels: Vec<String> = LABEL_KEYS.iter().map(|k| format!("{k}-value")).collect();
        labels[6] = device.into();
        cri::Metric {
            name: name.into(),
            label_values: labels,
            value: Some(cri::UInt64Value { value }),
            ..Default::default()
        }
    }

    #[test]
    fn series_are_matched_to_volumes_by_device() {
        let pods = vec![cri::PodSandboxMetrics {
            pod_sandbox_id: "pod1".into(),
            metrics: vec![],
            container_metrics: vec![cri::ContainerMetrics {
                container_id: "c1".into(),
                metrics: vec![
                    metric("container_fs_usage_bytes", "/dev/loop3", 4096),
                    metric("container_fs_limit_bytes", "/dev/loop3", 65536),
                    metric("container_fs_inodes_total", "/dev/loop3", 100),
                    metric("container_fs_inodes_free", "/dev/loop3", 90),
                    metric("frakti_fs_available_bytes", "/dev/loop3", 50000),
                    // A series without a device label is skipped.
                    cri::Metric {
                        name: "container_fs_usage_bytes".into(),
                        label_values: vec!["x".into()],
                        value: Some(cri::UInt64Value { value: 1 }),
                        ..Default::default()
                    },
                ],
            }],
        }];
        let found = by_device(&pods);
        let record = VolumeRecord {
            path: "/var/lib/kubelet/v".into(),
            device: "/dev/loop3".into(),
            fs_type: "ext4".into(),
            options: vec![],
            read_only: false,
        };
        let usage = usage_of(&record, &found).unwrap();
        assert_eq!(usage.pod, "pod1");
        assert_eq!(
            (
                usage.used_bytes,
                usage.capacity_bytes,
                usage.available_bytes
            ),
            (4096, 65536, 50000)
        );
        assert_eq!(usage.inodes_used, 10);
        let other = VolumeRecord {
            device: "/dev/loop4".into(),
            ..record
        };
        assert_eq!(usage_of(&other, &found), None);
    }
}
