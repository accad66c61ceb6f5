//! OCI `blockIO` as cgroup v2 io files: throttles become `io.max` lines
//! (blk-throttle), weights `io.weight` lines (the iocost controller, which
//! weighs only on disks where it is enabled: `enable_weights` turns it on
//! for the pod's virtio disks when a container asks for weights).
//! `leafWeight` is a cgroup v1 notion with no v2 file: refused.

use std::fs;
use std::path::Path;

use oci_spec::runtime::{LinuxBlockIo, LinuxThrottleDevice};

use super::Error;
use super::devices::{MAX_MAJOR, MAX_MINOR, number};

const FIELD: &str = "linux.resources.blockIO";

/// The io files and values for `block_io`, in the order to write them.
pub fn io_files(block_io: &LinuxBlockIo) -> Result<Vec<(String, String)>, Error> {
    let mut files = Vec::new();
    if block_io.leaf_weight().is_some() {
        return Err(Error::Invalid(format!(
            "{FIELD}.leafWeight: a cgroup v1 setting; the guest has cgroup v2 only"
        )));
    }
    if let Some(weight) = block_io.weight() {
        let weight = io_weight(weight, &format!("{FIELD}.weight"))?;
        files.push(("io.weight".into(), format!("default {weight}")));
    }
    for (i, device) in block_io.weight_device().iter().flatten().enumerate() {
        let field = format!("{FIELD}.weightDevice[{i}]");
        if device.leaf_weight().is_some() {
            return Err(Error::Invalid(format!(
                "{field}.leafWeight: a cgroup v1 setting; the guest has cgroup v2 only"
            )));
        }
        let Some(weight) = device.weight() else {
            continue;
        };
        let (major, minor) = numbers(&field, device.major(), device.minor())?;
        let weight = io_weight(weight, &format!("{field}.weight"))?;
        files.push(("io.weight".into(), format!("{major}:{minor} {weight}")));
    }
    let throttles = [
        (
            "throttleReadBpsDevice",
            "rbps",
            block_io.throttle_read_bps_device(),
        ),
        (
            "throttleWriteBpsDevice",
            "wbps",
            block_io.throttle_write_bps_device(),
        ),
        (
            "throttleReadIOPSDevice",
            "riops",
            block_io.throttle_read_iops_device(),
        ),
        (
            "throttleWriteIOPSDevice",
            "wiops",
            block_io.throttle_write_iops_device(),
        ),
    ];
    for (name, key, list) in throttles {
        for (i, device) in list.iter().flatten().enumerate() {
            files.push((
                "io.max".into(),
                throttle(&format!("{FIELD}.{name}[{i}]"), key, device)?,
            ));
        }
    }
    Ok(files)
}

fn numbers(field: &str, major: i64, minor: i64) -> Result<(u32, u32), Error> {
    Ok((
        number(&format!("{field}.major"), major, MAX_MAJOR)?,
        number(&format!("{field}.minor"), minor, MAX_MINOR)?,
    ))
}

/// One `io.max` line; a rate of 0 lifts the limit (as runc reads it).
fn throttle(field: &str, key: &str, device: &LinuxThrottleDevice) -> Result<String, Error> {
    let (major, minor) = numbers(field, device.major(), device.minor())?;
    let rate = match device.rate() {
        0 => "max".to_string(),
        rate => rate.to_string(),
    };
    Ok(format!("{major}:{minor} {key}={rate}"))
}

/// OCI (cgroup v1) weight [10, 1000] to cgroup v2 io.weight [1, 10000],
/// the conversion runc uses.
fn io_weight(weight: u16, field: &str) -> Result<u32, Error> {
    if !(10..=1000).contains(&weight) {
        return Err(Error::Invalid(format!(
            "{field}: {weight} is not in [10, 1000]"
        )));
    }
    Ok(1 + (u32::from(weight) - 10) * 9999 / 990)
}

/// Turns iocost on for every virtio disk of the VM (`root` is the cgroup2
/// root, `sys_block` /sys/block), so io.weight lines weigh. Disks that
/// refuse are logged: their weights stay without effect.
pub fn enable_weights(root: &Path, sys_block: &Path) {
    let Ok(entries) = fs::read_dir(sys_block) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("vd") {
            continue;
        }
        let Ok(dev) = fs::read_to_string(entry.path().join("dev")) else {
            continue;
        };
        let line = format!("{} enable=1", dev.trim());
        if let Err(e) = fs::write(root.join("io.cost.qos"), &line) {
            tracing::warn!(disk = ?name, "cannot enable io weights ({line}): {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_io(json: serde_json::Value) -> LinuxBlockIo {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn throttles_and_weights_become_io_lines() {
        let files = io_files(&block_io(serde_json::json!({
            "weight": 500,
            "weightDevice": [{"major": 254, "minor": 16, "weight": 10}, {"major": 254, "minor": 32}],
            "throttleReadBpsDevice": [{"major": 254, "minor": 0, "rate": 1048576}],
            "throttleWriteBpsDevice": [{"major": 254, "minor": 0, "rate": 0}],
            "throttleReadIOPSDevice": [{"major": 254, "minor": 16, "rate": 100}],
            "throttleWriteIOPSDevice": [{"major": 254, "minor": 16, "rate": 50}],
        })))
        .unwrap();
        let lines: Vec<String> = files.iter().map(|(f, v)| format!("{f}: {v}")).collect();
        assert_eq!(
            lines,
            [
                "io.weight: default 4950",
                "io.weight: 254:16 1",
                "io.max: 254:0 rbps=1048576",
                "io.max: 254:0 wbps=max",
                "io.max: 254:16 riops=100",
                "io.max: 254:16 wiops=50",
            ]
        );
        assert_eq!(io_weight(1000, "w").unwrap(), 10000);
        assert!(
            io_files(&block_io(serde_json::json!({})))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn malformed_block_io_is_refused_by_field() {
        for (json, field) in [
            (serde_json::json!({"weight": 5}), "blockIO.weight: 5"),
            (serde_json::json!({"weight": 1001}), "blockIO.weight: 1001"),
            (serde_json::json!({"leafWeight": 100}), "blockIO.leafWeight"),
            (
                serde_json::json!({"weightDevice": [{"major": 1, "minor": 1, "leafWeight": 10}]}),
                "blockIO.weightDevice[0].leafWeight",
            ),
            (
                serde_json::json!({"throttleReadBpsDevice": [{"major": -1, "minor": 0, "rate": 1}]}),
                "blockIO.throttleReadBpsDevice[0].major",
            ),
            (
                serde_json::json!({"throttleWriteIOPSDevice": [{"major": 1, "minor": 2097152, "rate": 1}]}),
                "blockIO.throttleWriteIOPSDevice[0].minor",
            ),
        ] {
            match io_files(&block_io(json.clone())) {
                Err(Error::Invalid(message)) => {
                    assert!(
                        message.starts_with(&format!("linux.resources.{field}")),
                        "{json}: {message}"
                    )
                }
                other => panic!("{json}: not refused: {other:?}"),
            }
        }
    }
}
