//! What a spec may carry that the agent cannot honour: refused as
//! InvalidArgument naming the field, never silently dropped.
//!
//! - OCI hooks: they would run inside the VM (the runtime's side is the
//!   host, where the agent is not);
//! - cgroup v1 knobs without a v2 equivalent (`memory.kernel`,
//!   `memory.kernelTCP`, `memory.swappiness`, `memory.disableOOMKiller`,
//!   the realtime CPU budget) and `cpu.burst`/`cpu.idle`;
//! - hugepage limits above 0: the VM has no huge pages to give (kubelet
//!   sends a 0 limit for every hugepage size of the node: that one holds);
//!   (block I/O weights and throttles are applied: cgroup::block_io);
//! - `network` (classid/priorities are cgroup v1) and `rdma`.

use oci_spec::runtime::{LinuxResources, Spec};

use super::Error;

fn refuse(field: &str, why: &str) -> Error {
    Error::Invalid(format!("{field}: {why}"))
}

/// Whether a serialized part of the spec holds anything (an empty object,
/// list or null does not).
fn holds_anything(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Null => false,
        serde_json::Value::Array(items) => items.iter().any(holds_anything),
        serde_json::Value::Object(map) => map.values().any(holds_anything),
        _ => true,
    }
}

fn set<T: serde::Serialize>(part: &Option<T>) -> bool {
    part.as_ref()
        .and_then(|p| serde_json::to_value(p).ok())
        .is_some_and(|v| holds_anything(&v))
}

/// The spec's parts the agent refuses.
pub(super) fn check_spec(spec: &Spec) -> Result<(), Error> {
    if set(spec.hooks()) {
        return Err(refuse(
            "hooks",
            "OCI hooks are not supported: they would run inside the pod's VM, not on the host",
        ));
    }
    if let Some(resources) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
        check_resources(resources, "linux.resources")?;
    }
    Ok(())
}

/// The resources the agent refuses; `prefix` names where they are.
pub(super) fn check_resources(r: &LinuxResources, prefix: &str) -> Result<(), Error> {
    let field = |name: &str| format!("{prefix}.{name}");
    if let Some(memory) = r.memory() {
        let v1_only = [
            ("memory.kernel", memory.kernel().is_some()),
            ("memory.kernelTCP", memory.kernel_tcp().is_some()),
            ("memory.swappiness", memory.swappiness().is_some()),
            (
                "memory.disableOOMKiller",
                memory.disable_oom_killer() == Some(true),
            ),
        ];
        if let Some((name, _)) = v1_only.iter().find(|(_, used)| *used) {
            return Err(refuse(
                &field(name),
                "a cgroup v1 setting; the guest has cgroup v2 only",
            ));
        }
    }
    if let Some(cpu) = r.cpu() {
        let unsupported = [
            (
                "cpu.realtimeRuntime",
                cpu.realtime_runtime().is_some_and(|v| v != 0),
            ),
            (
                "cpu.realtimePeriod",
                cpu.realtime_period().is_some_and(|v| v != 0),
            ),
            ("cpu.burst", cpu.burst().is_some_and(|v| v != 0)),
            ("cpu.idle", cpu.idle().is_some_and(|v| v != 0)),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, used)| *used) {
            return Err(refuse(&field(name), "not supported in the pod's VM"));
        }
    }
    for (i, limit) in r.hugepage_limits().iter().flatten().enumerate() {
        if limit.limit() > 0 {
            return Err(refuse(
                &format!("{}[{i}] ({})", field("hugepageLimits"), limit.page_size()),
                "the pod's VM has no huge pages to give",
            ));
        }
    }
    if set(r.network()) {
        return Err(refuse(
            &field("network"),
            "classID and priorities are cgroup v1 settings",
        ));
    }
    if set(r.rdma()) {
        return Err(refuse(&field("rdma"), "the pod's VM has no RDMA devices"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        let mut base = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        });
        if let (Some(base), Some(extra)) = (base.as_object_mut(), json.as_object()) {
            base.extend(extra.clone());
        }
        serde_json::from_value(base).unwrap()
    }

    fn refused(json: serde_json::Value) -> String {
        match check_spec(&spec(json)) {
            Err(Error::Invalid(message)) => message,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn what_the_vm_cannot_honour_is_refused_by_name() {
        let hook = serde_json::json!({"hooks": {"prestart": [{"path": "/bin/true"}]}});
        assert!(refused(hook).starts_with("hooks: "));
        for (resources, field) in [
            (
                serde_json::json!({"memory": {"kernel": 1}}),
                "linux.resources.memory.kernel",
            ),
            (
                serde_json::json!({"memory": {"swappiness": 10}}),
                "linux.resources.memory.swappiness",
            ),
            (
                serde_json::json!({"memory": {"disableOOMKiller": true}}),
                "linux.resources.memory.disableOOMKiller",
            ),
            (
                serde_json::json!({"cpu": {"realtimeRuntime": 5}}),
                "linux.resources.cpu.realtimeRuntime",
            ),
            (
                serde_json::json!({"hugepageLimits": [{"pageSize": "1GB", "limit": 0}, {"pageSize": "2MB", "limit": 2097152}]}),
                "linux.resources.hugepageLimits[1] (2MB)",
            ),
            (
                serde_json::json!({"network": {"classID": 7}}),
                "linux.resources.network",
            ),
            (
                serde_json::json!({"rdma": {"mlx5_0": {"hcaHandles": 1}}}),
                "linux.resources.rdma",
            ),
        ] {
            let message = refused(serde_json::json!({"linux": {"resources": resources}}));
            assert!(message.starts_with(&format!("{field}: ")), "{message}");
        }
    }

    #[test]
    fn what_holds_or_is_empty_passes() {
        let fine = serde_json::json!({
            "hooks": {},
            "linux": {"resources": {
                "memory": {"limit": 1048576, "disableOOMKiller": false},
                "cpu": {"shares": 1024, "realtimeRuntime": 0},
                "blockIO": {},
                "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
                "network": {"priorities": []},
                "pids": {"limit": 10},
            }},
        });
        check_spec(&spec(fine)).unwrap();
        check_spec(&spec(serde_json::json!({}))).unwrap();
    }
}
