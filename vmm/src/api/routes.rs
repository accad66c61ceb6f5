//! The control API's resources: what each method and path does, with the
//! JSON it answers (see the table in [`super`]).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use super::ApiContext;
use crate::devices::bus::lock;
use crate::devices::manager::DiskHandle;
use crate::metrics;
use crate::vcpu::VcpuState;
use crate::vm::DEFAULT_SHUTDOWN_GRACE;
use frakti_proto::error_chain;

/// Why a request body was refused (answered 400 with its whole chain).
#[derive(Debug, thiserror::Error)]
pub(super) enum BodyError {
    #[error("body must be JSON")]
    Json(#[source] serde_json::Error),
    #[error("{0}")]
    Invalid(String),
}

impl From<&str> for BodyError {
    fn from(message: &str) -> Self {
        BodyError::Invalid(message.to_string())
    }
}

impl From<String> for BodyError {
    fn from(message: String) -> Self {
        BodyError::Invalid(message)
    }
}

fn bad_request(e: &BodyError) -> (u16, Value) {
    (400, json!({ "error": error_chain(e) }))
}

/// Answers one request: the status and the JSON body.
pub(super) fn route(ctx: &ApiContext, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    match (method, path) {
        ("GET", "/vm") => (200, vm_info(ctx)),
        ("PUT", "/vm/pause") => state_change(ctx, ctx.vcpus.pause()),
        ("PUT", "/vm/resume") => state_change(ctx, ctx.vcpus.resume()),
        ("PUT", "/vm/shutdown") => shutdown(ctx, body),
        ("GET", "/metrics") => (200, metrics_json(ctx)),
        ("GET", "/devices") => (200, devices_json(ctx)),
        (method, path) if path.starts_with("/disks/") => {
            disk_request(ctx, method, &path["/disks/".len()..], body)
        }
        (_, "/vm" | "/vm/pause" | "/vm/resume" | "/vm/shutdown" | "/metrics" | "/devices") => (
            405,
            json!({ "error": format!("{method} is not allowed on {path}") }),
        ),
        _ => (404, json!({ "error": format!("no such resource: {path}") })),
    }
}

fn state_name(state: VcpuState) -> &'static str {
    match state {
        VcpuState::Running => "running",
        VcpuState::Paused => "paused",
        VcpuState::Exited => "exited",
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn vm_info(ctx: &ApiContext) -> Value {
    json!({
        "state": state_name(ctx.vcpus.state()),
        "vcpus": ctx.vcpu_count,
        "memory_mib": ctx.memory_mib,
        "uptime_ms": millis(ctx.start.elapsed()),
        "boot_done_ms": ctx.boot_done.get().copied().map(millis),
    })
}

fn state_change(ctx: &ApiContext, result: Result<(), crate::vcpu::Error>) -> (u16, Value) {
    match result {
        Ok(()) => (200, json!({ "state": state_name(ctx.vcpus.state()) })),
        Err(e) => (500, json!({ "error": error_chain(&e) })),
    }
}

/// `{"timeout_ms": N}` (optional, default 10000): the guest gets that long
/// to shut down after Ctrl-Alt-Del before it is stopped; 0 stops it at once.
fn shutdown(ctx: &ApiContext, body: &[u8]) -> (u16, Value) {
    let grace = match parse_shutdown(body) {
        Ok(grace) => grace,
        Err(e) => return bad_request(&e),
    };
    ctx.stop
        .request("shutdown requested through the API", grace);
    (
        202,
        json!({ "state": "stopping", "timeout_ms": millis(grace) }),
    )
}

fn parse_shutdown(body: &[u8]) -> Result<Duration, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DEFAULT_SHUTDOWN_GRACE);
    }
    let value: Value = serde_json::from_slice(body).map_err(BodyError::Json)?;
    let object = value
        .as_object()
        .ok_or("body must be a JSON object such as {\"timeout_ms\": 5000}")?;
    if let Some(key) = object.keys().find(|k| *k != "timeout_ms") {
        return Err(format!("unknown field '{key}' (only timeout_ms)").into());
    }
    match object.get("timeout_ms") {
        None => Ok(DEFAULT_SHUTDOWN_GRACE),
        Some(v) => v
            .as_u64()
            .filter(|ms| *ms <= 3_600_000)
            .map(Duration::from_millis)
            .ok_or_else(|| "timeout_ms must be an integer from 0 to 3600000".into()),
    }
}

fn devices_json(ctx: &ApiContext) -> Value {
    let disks: Vec<Value> = ctx.disks.iter().map(disk_json).collect();
    let vsock = ctx.vsock.as_ref().map(|vsock| {
        let vsock = lock(vsock);
        let counters = vsock.counters();
        json!({
            "type": "vsock",
            "cid": vsock.guest_cid(),
            "uds": vsock.uds_path().display().to_string(),
            "active": vsock.is_active(),
            "connections": vsock.connection_count(),
            "tx_packets": counters.tx_packets,
            "rx_packets": counters.rx_packets,
            "tx_bytes": counters.tx_bytes,
            "rx_bytes": counters.rx_bytes,
            "malformed": counters.malformed,
        })
    });
    let net = ctx.net.as_ref().map(|net| {
        let net = lock(net);
        let c = net.counters();
        json!({
            "type": "net",
            "tap": net.backend().name(),
            "mac": net.mac().to_string(),
            "active": net.is_active(),
            "rx_frames": c.rx_frames,
            "rx_bytes": c.rx_bytes,
            "tx_frames": c.tx_frames,
            "tx_bytes": c.tx_bytes,
            "rx_dropped": c.rx_dropped,
            "tx_dropped": c.tx_dropped,
        })
    });
    json!({ "disks": disks, "vsock": vsock, "net": net })
}

fn disk_json(disk: &DiskHandle) -> Value {
    let block = lock(&disk.block);
    json!({
        "type": "block",
        "serial": block.serial(),
        "read_only": block.disk().map_or(block.read_only(), |d| d.read_only()),
        "path": block.disk().map(|d| d.path().display().to_string()),
        "capacity_sectors": block.capacity(),
        "active": block.is_active(),
        "mmio_base": format!("{:#x}", disk.slot.base),
        "irq": disk.slot.irq,
    })
}

/// PUT sets or replaces the backing file (`{"path": FILE}`), DELETE
/// empties the slot; the guest gets a config-change interrupt either way.
fn disk_request(ctx: &ApiContext, method: &str, serial: &str, body: &[u8]) -> (u16, Value) {
    let Some(disk) = ctx.disks.iter().find(|d| d.serial() == serial) else {
        return (
            404,
            json!({ "error": format!("no disk with serial {serial:?}") }),
        );
    };
    let (path, read_only) = match method {
        "DELETE" => (None, false),
        "PUT" => match parse_backing(body) {
            Ok((path, read_only)) => (Some(path), read_only),
            Err(e) => return bad_request(&e),
        },
        _ => {
            return (
                405,
                json!({ "error": format!("{method} is not allowed on /disks/{serial}") }),
            );
        }
    };
    match disk.set_backing(path.as_deref(), read_only) {
        Ok(()) => (200, disk_json(disk)),
        Err(e) => (400, json!({ "error": error_chain(&e) })),
    }
}

/// `{"path": FILE}` with an optional `"read_only": true` (a slot that is
/// read-only stays so whatever the body says).
fn parse_backing(body: &[u8]) -> Result<(PathBuf, bool), BodyError> {
    let value: Value = serde_json::from_slice(body).map_err(BodyError::Json)?;
    let object = value
        .as_object()
        .ok_or("body must be a JSON object such as {\"path\": \"/images/x.img\"}")?;
    if let Some(key) = object.keys().find(|k| *k != "path" && *k != "read_only") {
        return Err(format!("unknown field '{key}' (only path and read_only)").into());
    }
    let path = object
        .get("path")
        .and_then(Value::as_str)
        .ok_or("path must be a string")?;
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must be absolute").into());
    }
    let read_only = match object.get("read_only") {
        None => false,
        Some(value) => value.as_bool().ok_or("read_only must be true or false")?,
    };
    Ok((PathBuf::from(path), read_only))
}

fn metrics_json(ctx: &ApiContext) -> Value {
    let (rss_kib, vmm_rss_kib) = metrics::rss_kib(&ctx.guest_ranges).unwrap_or((0, 0));
    json!({
        "uptime_ms": millis(ctx.start.elapsed()),
        "boot_done_ms": ctx.boot_done.get().copied().map(millis),
        "exits": ctx.counters.snapshot(),
        "rss_kib": rss_kib,
        "vmm_rss_kib": vmm_rss_kib,
        "console_dropped_bytes": ctx.console_dropped.load(std::sync::atomic::Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_bodies() {
        assert_eq!(parse_shutdown(b"").ok(), Some(DEFAULT_SHUTDOWN_GRACE));
        assert_eq!(parse_shutdown(b"{}").ok(), Some(DEFAULT_SHUTDOWN_GRACE));
        assert_eq!(
            parse_shutdown(br#"{"timeout_ms": 250}"#).ok(),
            Some(Duration::from_millis(250))
        );
        assert!(parse_shutdown(br#"{"timeout_ms": -1}"#).is_err());
        assert!(parse_shutdown(br#"{"timeout": 1}"#).is_err());
        assert!(parse_shutdown(b"[1]").is_err());
        assert!(parse_shutdown(b"{").is_err());
    }

    #[test]
    fn backing_bodies() {
        assert_eq!(
            parse_backing(br#"{"path": "/img/a.raw"}"#).ok(),
            Some((PathBuf::from("/img/a.raw"), false))
        );
        assert_eq!(
            parse_backing(br#"{"path": "/dev/loop0", "read_only": true}"#).ok(),
            Some((PathBuf::from("/dev/loop0"), true))
        );
        assert!(parse_backing(br#"{"path": "relative.raw"}"#).is_err());
        assert!(parse_backing(br#"{"path": 3}"#).is_err());
        assert!(parse_backing(br#"{"path": "/a", "ro": true}"#).is_err());
        assert!(parse_backing(br#"{"path": "/a", "read_only": "yes"}"#).is_err());
        let err = parse_backing(b"").unwrap_err();
        // The JSON parser's own words are kept as the cause.
        assert!(
            error_chain(&err).starts_with("body must be JSON: "),
            "{err}"
        );
    }
}
