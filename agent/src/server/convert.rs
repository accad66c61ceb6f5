//! Figures and messages built for the answers: guest stats, exit
//! statuses, timestamps, id checks.

use super::*;

/// Guest memory and per-interface counters, from /proc; the usage of the
/// mounted disks.
pub(super) fn sandbox_stats(disks: Vec<storage::DiskUsage>) -> pb::StatsSandboxResponse {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let netdev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    let interfaces = netdev
        .lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let name = name.trim();
            if name == "lo" {
                return None;
            }
            let v: Vec<u64> = counters
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect();
            (v.len() >= 12).then(|| pb::InterfaceStats {
                name: name.into(),
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
                tx_dropped: v[11],
            })
        })
        .collect();
    pb::StatsSandboxResponse {
        mem_total_bytes: kib("MemTotal") * 1024,
        mem_available_bytes: kib("MemAvailable") * 1024,
        interfaces,
        timestamp_ns: unix_ns(SystemTime::now()),
        disks: disks.into_iter().map(disk_usage).collect(),
    }
}

fn disk_usage(d: storage::DiskUsage) -> pb::DiskUsage {
    pb::DiskUsage {
        disk_id: d.id,
        fs_type: d.fs_type,
        capacity_bytes: d.capacity_bytes,
        used_bytes: d.used_bytes,
        available_bytes: d.available_bytes,
        inodes_total: d.inodes_total,
        inodes_free: d.inodes_free,
    }
}

pub(super) fn unix_ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub(super) fn exit_status(exit: Exit, oom_killed: bool) -> pb::ExitStatus {
    pb::ExitStatus {
        exit_code: exit.code,
        signal: exit.signal,
        oom_killed,
        exited_at_ns: unix_ns(exit.at),
    }
}

pub(super) fn require_id(what: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is empty")));
    }
    Ok(())
}
