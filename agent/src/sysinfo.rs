//! Facts about the guest read from procfs and sysfs.

use std::fs;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Read {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot parse {path}: {reason}")]
    Parse {
        path: &'static str,
        reason: &'static str,
    },
    #[error("cannot read {what} from /proc")]
    Proc {
        what: &'static str,
        #[source]
        source: procfs::ProcError,
    },
}

const CPUS_ONLINE: &str = "/sys/devices/system/cpu/online";

fn read(path: &'static str) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Read { path, source })
}

pub fn uptime_secs() -> Result<f64, Error> {
    use procfs::Current;
    procfs::Uptime::current()
        .map(|u| u.uptime)
        .map_err(|source| Error::Proc {
            what: "the uptime",
            source,
        })
}

pub fn mem_total_kib() -> Result<u64, Error> {
    use procfs::Current;
    procfs::Meminfo::current()
        .map(|m| m.mem_total / 1024)
        .map_err(|source| Error::Proc {
            what: "MemTotal",
            source,
        })
}

pub fn online_cpus() -> Result<u32, Error> {
    count_cpu_list(&read(CPUS_ONLINE)?).ok_or(Error::Parse {
        path: CPUS_ONLINE,
        reason: "expected a CPU list such as '0-3,5'",
    })
}

/// The kernel log so far as `[seconds] message` lines, from /dev/kmsg.
pub fn kernel_log() -> io::Result<Vec<String>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut kmsg = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")?;
    let mut lines = Vec::new();
    let mut record = vec![0u8; 8192];
    loop {
        // One read returns one record; EAGAIN means the log is drained.
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => lines.extend(format_kmsg_record(&String::from_utf8_lossy(&record[..n]))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            // EPIPE: records were overwritten before we read them.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(lines)
}

/// `6,123,811234,-;message` → `[    0.811234] message`.
fn format_kmsg_record(record: &str) -> Option<String> {
    let (header, message) = record.split_once(';')?;
    let usec: u64 = header.split(',').nth(2)?.parse().ok()?;
    let message = message.lines().next().unwrap_or("");
    Some(format!(
        "[{:5}.{:06}] {message}",
        usec / 1_000_000,
        usec % 1_000_000
    ))
}

fn count_cpu_list(text: &str) -> Option<u32> {
    let mut count = 0u32;
    for range in text.trim().split(',') {
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let cpu = range.parse::<u32>().ok()?;
                (cpu, cpu)
            }
        };
        count = count.checked_add(last.checked_sub(first)? + 1)?;
    }
    Some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-1"), Some(2));
        assert_eq!(count_cpu_list("0-3,5,7-8\n"), Some(7));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("a"), None);
    }

    #[test]
    fn kmsg_records() {
        assert_eq!(
            format_kmsg_record("6,123,811234,-;Run /init as init process\n"),
            Some("[    0.811234] Run /init as init process".into())
        );
        assert_eq!(format_kmsg_record("garbage"), None);
    }

    #[test]
    fn reads_this_machine() {
        assert!(uptime_secs().unwrap() > 0.0);
        assert!(online_cpus().unwrap() >= 1);
        assert!(mem_total_kib().unwrap() > 0);
    }
}
