//! What the VMM counts and measures: vCPU exits per kind, the guest's
//! boot-done time, and the VMM's own memory outside guest RAM.

use std::fs;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// vCPU exits by kind, summed over all vCPUs.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub hlt: AtomicU64,
    pub shutdown: AtomicU64,
    pub system_event: AtomicU64,
    pub interrupted: AtomicU64,
    pub unhandled_port: AtomicU64,
    pub other: AtomicU64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ExitSnapshot {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
    pub hlt: u64,
    pub shutdown: u64,
    pub system_event: u64,
    pub interrupted: u64,
    pub unhandled_port: u64,
    pub other: u64,
}

impl ExitCounters {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ExitSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExitSnapshot {
            io_in: get(&self.io_in),
            io_out: get(&self.io_out),
            mmio_read: get(&self.mmio_read),
            mmio_write: get(&self.mmio_write),
            hlt: get(&self.hlt),
            shutdown: get(&self.shutdown),
            system_event: get(&self.system_event),
            interrupted: get(&self.interrupted),
            unhandled_port: get(&self.unhandled_port),
            other: get(&self.other),
        }
    }
}

/// Resident memory of this process in KiB: `(total, outside guest RAM)`,
/// from the `Rss` of every mapping in `/proc/self/smaps`.
pub fn rss_kib(guest_ranges: &[(u64, u64)]) -> io::Result<(u64, u64)> {
    let smaps = fs::read_to_string("/proc/self/smaps")?;
    let is_guest = |m: &Mapping| guest_ranges.iter().any(|(s, e)| m.start < *e && m.end > *s);
    Ok((sum_rss(&smaps, |_| false), sum_rss(&smaps, is_guest)))
}

/// One mapping of a `smaps` file, as far as RSS accounting needs it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub size_kib: u64,
}

/// Sums the `Rss` (KiB) of every mapping in `smaps` for which `skip` is
/// false.
pub fn sum_rss(smaps: &str, skip: impl Fn(&Mapping) -> bool) -> u64 {
    let mut total = 0;
    let mut current = Mapping::default();
    for line in smaps.lines() {
        if let Some((start, end)) = mapping_range(line) {
            current = Mapping {
                start,
                end,
                size_kib: 0,
            };
        } else if let Some(size) = line.strip_prefix("Size:") {
            current.size_kib = kib(size);
        } else if let Some(rss) = line.strip_prefix("Rss:") {
            if !skip(&current) {
                total += kib(rss);
            }
        }
    }
    total
}

/// `   123 kB` → 123.
fn kib(field: &str) -> u64 {
    field
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `7f00-7f10 rw-p ...` → (0x7f00, 0x7f10); None for field lines.
fn mapping_range(line: &str) -> Option<(u64, u64)> {
    let first = line.split_whitespace().next()?;
    let (start, end) = first.split_once('-')?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_outside_guest_ram() {
        let smaps = "\
1000-2000 r-xp 00000000 08:01 1 /usr/bin/frakti-vmm
Size:                  4 kB
Rss:                   4 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               51200 kB
7fff0000-7fff2000 rw-p 00000000 00:00 0 [stack]
Size:                  8 kB
Rss:                   8 kB
";
        assert_eq!(sum_rss(smaps, |_| false), 51212);
        let by_range = |m: &Mapping| m.start == 0x7f00_0000_0000 && m.end == 0x7f00_1000_0000;
        assert_eq!(sum_rss(smaps, by_range), 12);
        assert_eq!(sum_rss(smaps, |m| m.size_kib >= 200_000), 12);
    }

    #[test]
    fn reads_this_process() {
        let (total, vmm) = rss_kib(&[]).unwrap();
        assert!(total > 0 && total == vmm);
    }
}
