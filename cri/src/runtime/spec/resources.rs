//! CRI LinuxContainerResources -> OCI LinuxResources (cgroup v2 in the
//! guest; the agent translates shares to weights and swap to swap.max).

use std::collections::HashMap;

use k8s_cri::v1 as cri;
use oci_spec::runtime::{LinuxCpu, LinuxHugepageLimit, LinuxMemory, LinuxResources};

use super::{Error, invalid};

const RESOURCES: &str = "linux.resources";

/// The kernel's range for /proc/<pid>/oom_score_adj.
const OOM_SCORE_ADJ_MIN: i64 = -1000;
const OOM_SCORE_ADJ_MAX: i64 = 1000;

/// CRI resources as the OCI spec's. Zero means "not set" (CRI's
/// convention) and leaves the field out; cpu_quota -1 means unlimited and
/// is kept as -1 (OCI's "max"), so that UpdateContainerResources can lift
/// a quota. Any other negative value is refused.
pub fn resources(r: &cri::LinuxContainerResources) -> Result<LinuxResources, Error> {
    let field = |name: &str| format!("{RESOURCES}.{name}");

    let period = positive(&field("cpu_period"), r.cpu_period)?;
    let quota = match r.cpu_quota {
        0 => None,
        -1 => Some(-1),
        q if q > 0 => Some(q),
        q => {
            return Err(invalid(
                field("cpu_quota"),
                format!("{q} is negative (-1 means unlimited)"),
            ));
        }
    };
    let shares = positive(&field("cpu_shares"), r.cpu_shares)?;
    let cpus = cpu_list(&field("cpuset_cpus"), &r.cpuset_cpus)?;
    let mems = cpu_list(&field("cpuset_mems"), &r.cpuset_mems)?;

    let limit = positive(&field("memory_limit_in_bytes"), r.memory_limit_in_bytes)?;
    let swap = match r.memory_swap_limit_in_bytes {
        // -1: unlimited swap, which is the default in the guest.
        0 | -1 => None,
        s if s > 0 => Some(s),
        s => {
            return Err(invalid(
                field("memory_swap_limit_in_bytes"),
                format!("{s} is negative"),
            ));
        }
    };
    if let (Some(limit), Some(swap)) = (limit, swap) {
        // CRI's swap limit is memory + swap, as OCI's.
        if swap < limit {
            return Err(invalid(
                field("memory_swap_limit_in_bytes"),
                format!("{swap} is below memory_limit_in_bytes {limit} (it counts memory + swap)"),
            ));
        }
    }

    let mut out = LinuxResources::default();
    if period.is_some() || quota.is_some() || shares.is_some() || cpus.is_some() || mems.is_some() {
        let mut cpu = LinuxCpu::default();
        cpu.set_period(period.and_then(|p| u64::try_from(p).ok()));
        cpu.set_quota(quota);
        cpu.set_shares(shares.and_then(|s| u64::try_from(s).ok()));
        cpu.set_cpus(cpus);
        cpu.set_mems(mems);
        out.set_cpu(Some(cpu));
    }
    if limit.is_some() || swap.is_some() {
        let mut memory = LinuxMemory::default();
        memory.set_limit(limit);
        memory.set_swap(swap);
        out.set_memory(Some(memory));
    }

    let mut hugepages = Vec::with_capacity(r.hugepage_limits.len());
    for (i, h) in r.hugepage_limits.iter().enumerate() {
        let f = field(&format!("hugepage_limits[{i}]"));
        if !is_page_size(&h.page_size) {
            return Err(invalid(
                format!("{f}.page_size"),
                format!("{:?} is not a page size such as 2MB or 1GB", h.page_size),
            ));
        }
        let limit = i64::try_from(h.limit)
            .map_err(|_| invalid(format!("{f}.limit"), format!("{} is too large", h.limit)))?;
        let mut hugepage = LinuxHugepageLimit::default();
        hugepage.set_page_size(h.page_size.clone());
        hugepage.set_limit(limit);
        hugepages.push(hugepage);
    }
    if !hugepages.is_empty() {
        out.set_hugepage_limits(Some(hugepages));
    }

    if !r.unified.is_empty() {
        let mut unified = HashMap::with_capacity(r.unified.len());
        for (key, value) in &r.unified {
            check_unified(key, value)?;
            unified.insert(key.clone(), value.clone());
        }
        out.set_unified(Some(unified));
    }
    Ok(out)
}

/// process.oomScoreAdj from the CRI value, which must be in the kernel's
/// range.
pub(super) fn oom_score_adj(value: i64) -> Result<i32, Error> {
    if !(OOM_SCORE_ADJ_MIN..=OOM_SCORE_ADJ_MAX).contains(&value) {
        return Err(invalid(
            format!("{RESOURCES}.oom_score_adj"),
            format!("{value} is outside {OOM_SCORE_ADJ_MIN}..={OOM_SCORE_ADJ_MAX}"),
        ));
    }
    i32::try_from(value).map_err(|_| invalid(format!("{RESOURCES}.oom_score_adj"), "out of range"))
}

/// 0 -> not set; a positive value as is; negative -> error.
fn positive(field: &str, value: i64) -> Result<Option<i64>, Error> {
    match value {
        0 => Ok(None),
        v if v > 0 => Ok(Some(v)),
        v => Err(invalid(field, format!("{v} is negative"))),
    }
}

/// A cpuset list ("0-3,6"); empty -> not set.
fn cpu_list(field: &str, list: &str) -> Result<Option<String>, Error> {
    if list.is_empty() {
        return Ok(None);
    }
    let item_ok = |item: &str| -> bool {
        let number =
            |s: &str| !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
        match item.split_once('-') {
            None => number(item),
            Some((lo, hi)) => {
                number(lo)
                    && number(hi)
                    && matches!((lo.parse::<u32>(), hi.parse::<u32>()), (Ok(l), Ok(h)) if l <= h)
            }
        }
    };
    if list.len() > 4096 || !list.split(',').all(item_ok) {
        return Err(invalid(
            field,
            format!("{list:?} is not a CPU or node list such as 0-3,6"),
        ));
    }
    Ok(Some(list.to_string()))
}

/// A hugepage size as cgroups name them: digits then KB, MB or GB.
fn is_page_size(size: &str) -> bool {
    let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = size.get(digits.len()..).unwrap_or("");
    !digits.is_empty()
        && digits.len() <= 10
        && digits.bytes().all(|b| b.is_ascii_digit())
        && matches!(unit, "KB" | "MB" | "GB")
}

/// A `unified` entry names a cgroup v2 interface file of the container's
/// cgroup ("memory.high"): the agent writes `value` to it, so the key must
/// stay a plain file name.
fn check_unified(key: &str, value: &str) -> Result<(), Error> {
    let field = format!("{RESOURCES}.unified[{key:?}]");
    let plain = !key.is_empty()
        && key.len() <= 255
        && key.contains('.')
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !plain {
        return Err(invalid(
            field,
            "is not a cgroup interface file name such as memory.high",
        ));
    }
    if value.contains('\0') || value.len() > 4096 {
        return Err(invalid(
            field,
            "the value contains a NUL byte or is too long",
        ));
    }
    Ok(())
}
