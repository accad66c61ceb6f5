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
    Ok(sum_rss(
        &fs::read_to_string("/proc/self/smaps")?,
        guest_ranges,
    ))
}

fn sum_rss(smaps: &str, guest_ranges: &[(u64, u64)]) -> (u64, u64) {
    let (mut total, mut vmm) = (0, 0);
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some((start, end)) = mapping_range(line) {
            in_guest = guest_ranges.iter().any(|(gs, ge)| start < *ge && end > *gs);
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            total += kib;
            if !in_guest {
                vmm += kib;
            }
        }
    }
    (total, vmm)
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
Rss:                   8 kB
";
        assert_eq!(
            sum_rss(smaps, &[(0x7f00_0000_0000, 0x7f00_1000_0000)]),
            (51212, 12)
        );
        assert_eq!(sum_rss(smaps, &[]), (51212, 51212));
    }

    #[test]
    fn reads_this_process() {
        let (total, vmm) = rss_kib(&[]).unwrap();
        assert!(total > 0 && total == vmm);
    }
}
