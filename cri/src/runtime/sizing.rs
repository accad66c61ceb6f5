//! The pod VM's size.
//!
//! A pod's VM gets its size once, at RunPodSandbox, by one rule:
//!
//! - **vCPUs** = ⌈CPU limit + overhead CPU⌉, where a CPU amount is
//!   `cpu_quota / cpu_period` (a period of 0 means 100000 µs; a quota of 0 or
//!   -1 means no limit, 0 CPUs), at least the default vCPUs (and 1), at most
//!   min(host CPUs, 32) (the upper bound wins).
//! - **memory** = memory limit + overhead memory + the guest's reserve (its
//!   kernel and agent), at least the default memory, at most 1 TiB, rounded
//!   up to a multiple of 2 MiB.
//!
//! The limits come from the first of these that applies:
//!
//! 1. **Resources**: `linux.resources` of the PodSandboxConfig (the sum of the
//!    containers' limits that kubelet sends), when it has a CPU quota > 0 or a
//!    memory limit > 0; `linux.overhead` (the RuntimeClass's pod overhead) is
//!    added when present. An overhead alone does not size the VM.
//! 2. **Annotations**, each one independent (a missing one takes the default):
//!    - `io.frakti.vm.cpus`: a positive number of CPUs, `2`, `1.5` (→ 2 after
//!      rounding up) or millicores `1500m` (→ 2);
//!    - `io.frakti.vm.memory`: the guest's total memory, either MiB as a plain
//!      integer (`512`), or a Kubernetes quantity in bytes with one of the
//!      suffixes `Ki`, `Mi`, `Gi`, `Ti` (powers of 1024) or `k`, `M`, `G`, `T`
//!      (powers of 1000), e.g. `512Mi`, `1.5Gi`, `1G` (→ 954 MiB). The guest's
//!      reserve is *not* added (the annotation is the total); the value is
//!      still rounded up to 2 MiB and at least the default.
//!
//!    They are read only when (1) does not apply.
//! 3. **Defaults**: the daemon's default vCPUs and memory.
//!
//! A malformed, zero or negative annotation, a negative resource field (other
//! than a quota of -1) or a size whose arithmetic overflows is an error naming
//! the annotation or field and its value; the pod is not created.
//!
//! The size is fixed for the VM's life: [`check_fits`] rejects a container
//! (CreateContainer, UpdateContainerResources) whose limits do not fit in it.

use std::collections::HashMap;

use k8s_cri::v1 as cri;

pub const ANNOTATION_CPUS: &str = "io.frakti.vm.cpus";
pub const ANNOTATION_MEMORY: &str = "io.frakti.vm.memory";
/// frakti-vmm's limit.
pub const MAX_VCPUS: u32 = 32;
/// frakti-vmm's limit (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

const MIB: u64 = 1 << 20;
/// The CFS period the kernel uses when none is given, in µs.
const DEFAULT_CPU_PERIOD: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("annotation {name}={value:?}: {reason}")]
    Annotation {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{field} = {value}: must not be negative")]
    Negative { field: &'static str, value: i64 },
    #[error("{0} overflows")]
    Overflow(String),
    #[error(
        "the pod VM has {vm_vcpus} vCPUs and {vm_memory_mib} MiB (of which {guest_reserve_mib} MiB \
         for the guest); the container asks for {cpus} CPUs / {memory_mib} MiB"
    )]
    TooBig {
        vm_vcpus: u32,
        vm_memory_mib: u64,
        guest_reserve_mib: u64,
        cpus: u128,
        memory_mib: u64,
    },
}

/// The daemon's settings the rule uses.
#[derive(Debug, Clone)]
pub struct SizingDefaults {
    /// vCPUs of a VM without limits, and the least any VM gets.
    pub cpus: u32,
    /// Memory of a VM without limits, and the least any VM gets.
    pub memory_mib: u64,
    /// The host's CPUs: no VM gets more vCPUs.
    pub host_cpus: u32,
    /// Memory the guest's kernel and agent need besides the containers.
    pub guest_reserve_mib: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// Which input sized the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSource {
    Resources,
    Annotations,
    Defaults,
}

/// Sizes a pod's VM by the rule of this module.
pub fn size_pod(
    config: &cri::PodSandboxConfig,
    defaults: &SizingDefaults,
) -> Result<(VmSize, SizeSource), Error> {
    let linux = config.linux.as_ref();
    let resources = linux.and_then(|l| l.resources.as_ref());
    let overhead = linux.and_then(|l| l.overhead.as_ref());
    let resources = resources
        .map(|r| Limits::of(r, &POD_RESOURCES))
        .transpose()?;
    let overhead = overhead.map(|r| Limits::of(r, &POD_OVERHEAD)).transpose()?;

    if let Some(resources) = resources.filter(Limits::is_limited) {
        let overhead = overhead.unwrap_or(Limits::NONE);
        let cpus = resources.cpus.add(overhead.cpus).ceil();
        let reserve = mib_to_bytes(defaults.guest_reserve_mib, "the guest reserve")?;
        let bytes = resources
            .memory
            .checked_add(overhead.memory)
            .and_then(|b| b.checked_add(reserve))
            .ok_or_else(|| {
                Error::Overflow(format!(
                    "memory limit {} + overhead {} bytes + guest reserve {} MiB",
                    resources.memory, overhead.memory, defaults.guest_reserve_mib
                ))
            })?;
        let size = VmSize {
            vcpus: clamp_vcpus(cpus, defaults),
            memory_mib: clamp_memory(bytes.div_ceil(MIB), defaults),
        };
        return Ok((size, SizeSource::Resources));
    }

    let cpus = annotation(&config.annotations, ANNOTATION_CPUS, parse_cpus)?;
    let memory = annotation(&config.annotations, ANNOTATION_MEMORY, parse_memory_mib)?;
    let source = if cpus.is_some() || memory.is_some() {
        SizeSource::Annotations
    } else {
        SizeSource::Defaults
    };
    let size = VmSize {
        vcpus: clamp_vcpus(u128::from(cpus.unwrap_or(0)), defaults),
        memory_mib: clamp_memory(memory.unwrap_or(0), defaults),
    };
    Ok((size, source))
}

/// UpdateContainerResources / CreateContainer check: a container's limits must
/// fit the VM: ⌈quota / period⌉ ≤ its vCPUs, and memory limit + the guest's
/// reserve ≤ its memory (no limit always fits).
pub fn check_fits(
    vm: &VmSize,
    guest_reserve_mib: u64,
    resources: &cri::LinuxContainerResources,
) -> Result<(), Error> {
    let limits = Limits::of(resources, &CONTAINER_RESOURCES)?;
    let cpus = limits.cpus.ceil();
    // In u128: neither sum can overflow.
    let needed = u128::from(limits.memory) + u128::from(guest_reserve_mib) * u128::from(MIB);
    let available = u128::from(vm.memory_mib) * u128::from(MIB);
    if cpus > u128::from(vm.vcpus) || (limits.memory > 0 && needed > available) {
        return Err(Error::TooBig {
            vm_vcpus: vm.vcpus,
            vm_memory_mib: vm.memory_mib,
            guest_reserve_mib,
            cpus,
            memory_mib: limits.memory.div_ceil(MIB),
        });
    }
    Ok(())
}

/// The names of one `LinuxContainerResources`' fields, for errors.
struct FieldNames {
    cpu_quota: &'static str,
    cpu_period: &'static str,
    memory: &'static str,
}

const POD_RESOURCES: FieldNames = FieldNames {
    cpu_quota: "linux.resources.cpu_quota",
    cpu_period: "linux.resources.cpu_period",
    memory: "linux.resources.memory_limit_in_bytes",
};
const POD_OVERHEAD: FieldNames = FieldNames {
    cpu_quota: "linux.overhead.cpu_quota",
    cpu_period: "linux.overhead.cpu_period",
    memory: "linux.overhead.memory_limit_in_bytes",
};
const CONTAINER_RESOURCES: FieldNames = FieldNames {
    cpu_quota: "resources.cpu_quota",
    cpu_period: "resources.cpu_period",
    memory: "resources.memory_limit_in_bytes",
};

/// A CPU amount as an exact fraction (`num / den`, `den > 0`).
#[derive(Clone, Copy, Debug)]
struct Cpus {
    num: u128,
    den: u128,
}

impl Cpus {
    /// The exact sum: numerators and denominators come from i64 fields, so
    /// are below 2^63; the products stay below 2^126 and their sum below 2^127.
    fn add(self, other: Cpus) -> Cpus {
        Cpus {
            num: self.num * other.den + other.num * self.den,
            den: self.den * other.den,
        }
    }

    fn ceil(self) -> u128 {
        self.num.div_ceil(self.den)
    }
}

/// The limits of one `LinuxContainerResources`, checked.
#[derive(Clone, Copy, Debug)]
struct Limits {
    cpus: Cpus,
    /// Bytes; 0 for no limit.
    memory: u64,
}

impl Limits {
    const NONE: Limits = Limits {
        cpus: Cpus { num: 0, den: 1 },
        memory: 0,
    };

    fn of(r: &cri::LinuxContainerResources, names: &FieldNames) -> Result<Limits, Error> {
        let non_negative =
            |field, value: i64| u64::try_from(value).map_err(|_| Error::Negative { field, value });
        let period = match non_negative(names.cpu_period, r.cpu_period)? {
            0 => DEFAULT_CPU_PERIOD,
            period => period,
        };
        let quota = match r.cpu_quota {
            -1 => 0,
            quota => non_negative(names.cpu_quota, quota)?,
        };
        Ok(Limits {
            cpus: Cpus {
                num: u128::from(quota),
                den: u128::from(period),
            },
            memory: non_negative(names.memory, r.memory_limit_in_bytes)?,
        })
    }

    fn is_limited(&self) -> bool {
        self.cpus.num > 0 || self.memory > 0
    }
}

/// At least the default (and 1), at most min(host CPUs, MAX_VCPUS).
fn clamp_vcpus(cpus: u128, defaults: &SizingDefaults) -> u32 {
    let most = defaults.host_cpus.clamp(1, MAX_VCPUS);
    let least = defaults.cpus.max(1);
    // Not `clamp`: `least` may exceed `most`, and then `most` wins.
    let vcpus = cpus.max(u128::from(least)).min(u128::from(most));
    u32::try_from(vcpus).unwrap_or(most)
}

/// At least the default, at most MAX_MEMORY_MIB, rounded up to 2 MiB (which
/// cannot overflow, nor pass MAX_MEMORY_MIB, an even number).
fn clamp_memory(mib: u64, defaults: &SizingDefaults) -> u64 {
    let mib = mib.max(defaults.memory_mib).min(MAX_MEMORY_MIB);
    mib + mib % 2
}

fn mib_to_bytes(mib: u64, what: &str) -> Result<u64, Error> {
    mib.checked_mul(MIB)
        .ok_or_else(|| Error::Overflow(format!("{what} of {mib} MiB")))
}

/// The parsed annotation `name`, if present.
fn annotation(
    annotations: &HashMap<String, String>,
    name: &'static str,
    parse: fn(&str) -> Result<u64, &'static str>,
) -> Result<Option<u64>, Error> {
    annotations
        .get(name)
        .map(|value| {
            parse(value).map_err(|reason| Error::Annotation {
                name,
                value: value.clone(),
                reason,
            })
        })
        .transpose()
}

const NOT_CPUS: &str = "not a number of CPUs (e.g. 2, 1.5, 1500m)";
const NOT_MEMORY: &str =
    "not a memory size (MiB as a plain integer, or a quantity like 512Mi, 1.5Gi, 1G)";
const NOT_POSITIVE: &str = "must be positive";
const TOO_LARGE: &str = "too large";

/// `io.frakti.vm.cpus`: the CPUs, rounded up.
fn parse_cpus(value: &str) -> Result<u64, &'static str> {
    if let Some(millis) = value.strip_suffix('m') {
        let millis = parse_integer(millis)
            .ok_or(NOT_CPUS)?
            .map_err(|_| TOO_LARGE)?;
        return positive(millis.div_ceil(1000));
    }
    let (whole, fraction) = parse_decimal(value).ok_or(NOT_CPUS)?;
    let whole = whole.map_err(|_| TOO_LARGE)?;
    let round_up = fraction.bytes().any(|d| d != b'0');
    positive(whole.checked_add(u64::from(round_up)).ok_or(TOO_LARGE)?)
}

/// `io.frakti.vm.memory`: MiB, rounded up.
fn parse_memory_mib(value: &str) -> Result<u64, &'static str> {
    const SUFFIXES: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let Some((number, scale)) = SUFFIXES
        .iter()
        .find_map(|&(suffix, scale)| value.strip_suffix(suffix).map(|n| (n, scale)))
    else {
        // A plain integer: MiB.
        let mib = parse_integer(value)
            .ok_or(NOT_MEMORY)?
            .map_err(|_| TOO_LARGE)?;
        return positive(mib);
    };
    let (whole, fraction) = parse_decimal(number).ok_or(NOT_MEMORY)?;
    let whole = whole.map_err(|_| TOO_LARGE)?;
    // Bytes = ⌈whole.fraction × scale⌉, exactly, in u128: whole < 2^64 and
    // scale < 2^40; the fraction has at most 18 digits, so 10^18 × 2^40 < 2^100.
    if fraction.len() > 18 {
        return Err(NOT_MEMORY);
    }
    let digits: u128 = fraction.parse().unwrap_or(0);
    let denominator = 10u128.pow(fraction.len() as u32);
    let scale = u128::from(scale);
    let bytes = u128::from(whole) * scale + (digits * scale).div_ceil(denominator);
    let mib = u64::try_from(bytes.div_ceil(u128::from(MIB))).map_err(|_| TOO_LARGE)?;
    positive(mib)
}

fn positive(n: u64) -> Result<u64, &'static str> {
    if n == 0 { Err(NOT_POSITIVE) } else { Ok(n) }
}

/// A non-empty string of ASCII digits as a u64: `None` if it is not one,
/// `Some(Err)` if it does not fit.
fn parse_integer(s: &str) -> Option<Result<u64, std::num::ParseIntError>> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse())
}

/// `digits` or `digits.digits` as its whole part (as in [`parse_integer`]) and
/// its fraction's digits (possibly empty).
fn parse_decimal(s: &str) -> Option<(Result<u64, std::num::ParseIntError>, &str)> {
    let (whole, fraction) = match s.split_once('.') {
        Some((whole, fraction)) => {
            let digits = !fraction.is_empty() && fraction.bytes().all(|b| b.is_ascii_digit());
            (whole, digits.then_some(fraction)?)
        }
        None => (s, ""),
    };
    Some((parse_integer(whole)?, fraction))
}

#[cfg(test)]
mod tests {
    use super::SizeSource::{Annotations, Defaults, Resources};
    use super::*;

    const MI: i64 = 1 << 20;
    const MAX: i64 = i64::MAX;

    fn defaults() -> SizingDefaults {
        SizingDefaults {
            cpus: 1,
            memory_mib: 128,
            host_cpus: 8,
            guest_reserve_mib: 64,
        }
    }

    /// (cpu_quota, cpu_period, memory_limit_in_bytes)
    type Res = (i64, i64, i64);

    fn resources(
        (cpu_quota, cpu_period, memory_limit_in_bytes): Res,
    ) -> cri::LinuxContainerResources {
        cri::LinuxContainerResources {
            cpu_quota,
            cpu_period,
            memory_limit_in_bytes,
            ..Default::default()
        }
    }

    fn config(
        res: Option<Res>,
        overhead: Option<Res>,
        annotations: &[(&str, &str)],
    ) -> cri::PodSandboxConfig {
        let linux = (res.is_some() || overhead.is_some()).then(|| cri::LinuxPodSandboxConfig {
            resources: res.map(resources),
            overhead: overhead.map(resources),
            ..Default::default()
        });
        cri::PodSandboxConfig {
            linux,
            annotations: annotations
                .iter()
                .map(|&(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    type Want = Result<(u32, u64, SizeSource), &'static str>;

    fn check(name: &str, config: &cri::PodSandboxConfig, defaults: &SizingDefaults, want: Want) {
        let got = size_pod(config, defaults)
            .map(|(size, source)| (size.vcpus, size.memory_mib, source))
            .map_err(|e| e.to_string());
        assert_eq!(got, want.map_err(str::to_string), "{name}");
    }

    #[test]
    fn resources_and_overhead() {
        let ann = &[(ANNOTATION_CPUS, "4"), (ANNOTATION_MEMORY, "bad")][..];
        #[rustfmt::skip]
        #[allow(clippy::type_complexity)] // a table: name, resources, overhead, annotations, result
        let cases: &[(&str, Option<Res>, Option<Res>, &[(&str, &str)], Want)] = &[
            ("nothing", None, None, &[], Ok((1, 128, Defaults))),
            ("resources without limits", Some((0, 100_000, 0)), None, &[], Ok((1, 128, Defaults))),
            ("quota -1 is no limit", Some((-1, 0, 0)), None, &[], Ok((1, 128, Defaults))),
            ("cpu and memory", Some((200_000, 100_000, 512 * MI)), None, &[], Ok((2, 576, Resources))),
            ("fraction rounds up", Some((150_000, 100_000, 0)), None, &[], Ok((2, 128, Resources))),
            ("quota without period", Some((150_000, 0, 0)), None, &[], Ok((2, 128, Resources))),
            ("tiny quota", Some((1, 100_000, 0)), None, &[], Ok((1, 128, Resources))),
            ("other period", Some((50_000, 25_000, 0)), None, &[], Ok((2, 128, Resources))),
            ("memory only", Some((0, 0, 512 * MI)), None, &[], Ok((1, 576, Resources))),
            ("memory exact 2 MiB multiple", Some((0, 0, 200 * MI)), None, &[], Ok((1, 264, Resources))),
            ("memory 1 byte over", Some((0, 0, 200 * MI + 1)), None, &[], Ok((1, 266, Resources))),
            ("memory odd MiB", Some((0, 0, 201 * MI)), None, &[], Ok((1, 266, Resources))),
            ("memory 1 byte under", Some((0, 0, 200 * MI - 1)), None, &[], Ok((1, 264, Resources))),
            ("memory below the default", Some((0, 0, MI)), None, &[], Ok((1, 128, Resources))),
            ("memory max clamp", Some((0, 0, MAX)), None, &[], Ok((1, 1 << 20, Resources))),
            ("memory just under max", Some((0, 0, ((1 << 20) - 64 - 1) * MI)), None, &[], Ok((1, 1 << 20, Resources))),
            ("host cpus clamp", Some((1_600_000, 100_000, 0)), None, &[], Ok((8, 128, Resources))),
            ("huge quota", Some((MAX, 1, 0)), None, &[], Ok((8, 128, Resources))),
            ("overhead added", Some((250_000, 100_000, 256 * MI)), Some((50_000, 100_000, 160 * MI)), &[], Ok((3, 480, Resources))),
            ("overhead fractions sum exactly", Some((33_333, 100_000, 0)), Some((66_667, 100_000, 0)), &[], Ok((1, 128, Resources))),
            ("overhead fractions 1 over", Some((33_334, 100_000, 0)), Some((66_667, 100_000, 0)), &[], Ok((2, 128, Resources))),
            ("overhead with its own period", Some((100_000, 0, 0)), Some((1, 3, 0)), &[], Ok((2, 128, Resources))),
            ("overhead bytes complete resources' bytes", Some((0, 0, 100 * MI + 1)), Some((0, 0, 100 * MI - 1)), &[], Ok((1, 264, Resources))),
            ("overhead only: defaults", None, Some((100_000, 0, 1024 * MI)), &[], Ok((1, 128, Defaults))),
            ("overhead and empty resources: defaults", Some((0, 0, 0)), Some((100_000, 0, MI)), &[], Ok((1, 128, Defaults))),
            ("overhead only: annotations", None, Some((400_000, 0, 1024 * MI)), &[(ANNOTATION_CPUS, "2")], Ok((2, 128, Annotations))),
            ("resources win over annotations", Some((100_000, 0, 0)), None, ann, Ok((1, 128, Resources))),
            ("max memory both", Some((0, 0, MAX)), Some((0, 0, MAX)), &[],
                Err("memory limit 9223372036854775807 + overhead 9223372036854775807 bytes + guest reserve 64 MiB overflows")),
            ("negative quota", Some((-2, 0, 0)), None, &[], Err("linux.resources.cpu_quota = -2: must not be negative")),
            ("negative period", Some((100_000, -1, 0)), None, &[], Err("linux.resources.cpu_period = -1: must not be negative")),
            ("negative memory", Some((0, 0, -5)), None, &[], Err("linux.resources.memory_limit_in_bytes = -5: must not be negative")),
            ("negative overhead quota", Some((100_000, 0, 0)), Some((-3, 0, 0)), &[], Err("linux.overhead.cpu_quota = -3: must not be negative")),
            ("negative overhead memory", None, Some((0, 0, -1)), &[], Err("linux.overhead.memory_limit_in_bytes = -1: must not be negative")),
            ("negative period, no quota", Some((0, -100, 0)), None, &[], Err("linux.resources.cpu_period = -100: must not be negative")),
        ];
        for (name, res, overhead, annotations, want) in cases {
            check(
                name,
                &config(*res, *overhead, annotations),
                &defaults(),
                *want,
            );
        }
    }

    #[test]
    fn annotations() {
        #[rustfmt::skip]
        let cases: &[(&str, Option<&str>, Option<&str>, Want)] = &[
            ("none", None, None, Ok((1, 128, Defaults))),
            ("cpus", Some("2"), None, Ok((2, 128, Annotations))),
            ("cpus decimal", Some("1.5"), None, Ok((2, 128, Annotations))),
            ("cpus decimal zeros", Some("3.000"), None, Ok((3, 128, Annotations))),
            ("cpus small decimal", Some("0.1"), None, Ok((1, 128, Annotations))),
            ("cpus millis", Some("1500m"), None, Ok((2, 128, Annotations))),
            ("cpus millis exact", Some("1000m"), None, Ok((1, 128, Annotations))),
            ("cpus millis 1 over", Some("1001m"), None, Ok((2, 128, Annotations))),
            ("cpus millis small", Some("1m"), None, Ok((1, 128, Annotations))),
            ("cpus over host", Some("64"), None, Ok((8, 128, Annotations))),
            ("cpus u64 max", Some("18446744073709551615"), None, Ok((8, 128, Annotations))),
            ("memory plain MiB", None, Some("512"), Ok((1, 512, Annotations))),
            ("memory plain odd MiB", None, Some("513"), Ok((1, 514, Annotations))),
            ("memory below default", None, Some("100"), Ok((1, 128, Annotations))),
            ("memory Mi", None, Some("512Mi"), Ok((1, 512, Annotations))),
            ("memory Gi", None, Some("1Gi"), Ok((1, 1024, Annotations))),
            ("memory decimal Gi", None, Some("1.5Gi"), Ok((1, 1536, Annotations))),
            ("memory G", None, Some("1G"), Ok((1, 954, Annotations))),
            ("memory decimal G", None, Some("1.5G"), Ok((1, 1432, Annotations))),
            ("memory M", None, Some("1000M"), Ok((1, 954, Annotations))),
            ("memory Ki", None, Some("262144Ki"), Ok((1, 256, Annotations))),
            ("memory Ki 1 over", None, Some("262145Ki"), Ok((1, 258, Annotations))),
            ("memory k", None, Some("1048576000k"), Ok((1, 1_000_000, Annotations))),
            ("memory Ti", None, Some("1Ti"), Ok((1, 1 << 20, Annotations))),
            ("memory T", None, Some("1T"), Ok((1, 953_676, Annotations))),
            ("memory over max", None, Some("2Ti"), Ok((1, 1 << 20, Annotations))),
            ("memory plain is MiB", None, Some("536870912"), Ok((1, 1 << 20, Annotations))),
            ("memory u64 max MiB", None, Some("18446744073709551615"), Ok((1, 1 << 20, Annotations))),
            ("memory tiny quantity", None, Some("1Ki"), Ok((1, 128, Annotations))),
            ("memory fraction of a byte", None, Some("0.0000001k"), Ok((1, 128, Annotations))),
            ("both", Some("2"), Some("1Gi"), Ok((2, 1024, Annotations))),
            ("cpus empty", Some(""), None, Err(r#"annotation io.frakti.vm.cpus="": not a number of CPUs (e.g. 2, 1.5, 1500m)"#)),
            ("cpus zero", Some("0"), None, Err(r#"annotation io.frakti.vm.cpus="0": must be positive"#)),
            ("cpus zero decimal", Some("0.0"), None, Err(r#"annotation io.frakti.vm.cpus="0.0": must be positive"#)),
            ("cpus zero millis", Some("0m"), None, Err(r#"annotation io.frakti.vm.cpus="0m": must be positive"#)),
            ("cpus negative", Some("-1"), None, Err(r#"annotation io.frakti.vm.cpus="-1": not a number of CPUs (e.g. 2, 1.5, 1500m)"#)),
            ("cpus plus", Some("+1"), None, Err(r#"annotation io.frakti.vm.cpus="+1": not a number of CPUs (e.g. 2, 1.5, 1500m)"#)),
            ("cpus word", Some("two"), None, Err(r#"annotation io.frakti.vm.cpus="two": not a number of CPUs (e.g. 2, 1.5, 1500m)"#)),
            ("cpus space", Some(" 2"), None, Err(r#"annotation io.frakti.vm.cpus=" 2": not a number of CPUs (e.g. 2, 1.5, 1500m)"#)),
            ("cpus exponent", Some("1e3"), None, Err(r#"annotation io.frakti.vm.cpus="1e3": not a number of CPUs (e.g. 2, 1.5, 1500m)"#)),
            ("cpus two dots", Some("1.5.1"), None, Err(r#"annotation io.frakti.vm.cpus="1.5.1": not a number of CPUs (e.g. 2, 1.5, 1500m)"#)),
            ("cpus leading dot", Some(".5"), None, Err(r#"annotation io.frakti.vm.cpus=".5": not a number of CPUs (e.g. 2, 1.5, 1500m)"#)),
            ("cpus trailing dot", Some("5."), None, Err(r#"annotation io.frakti.vm.cpus="5.": not a number of CPUs (e.g. 2, 1.5, 1500m)"#)),
            ("cpus decimal millis", Some("1.5m"), None, Err(r#"annotation io.frakti.vm.cpus="1.5m": not a number of CPUs (e.g. 2, 1.5, 1500m)"#)),
            ("cpus too large", Some("18446744073709551616"), None, Err(r#"annotation io.frakti.vm.cpus="18446744073709551616": too large"#)),
            ("cpus too large rounded", Some("18446744073709551615.5"), None, Err(r#"annotation io.frakti.vm.cpus="18446744073709551615.5": too large"#)),
            ("cpus millis too large", Some("18446744073709551616m"), None, Err(r#"annotation io.frakti.vm.cpus="18446744073709551616m": too large"#)),
            ("memory empty", None, Some(""), Err(r#"annotation io.frakti.vm.memory="": not a memory size (MiB as a plain integer, or a quantity like 512Mi, 1.5Gi, 1G)"#)),
            ("memory zero", None, Some("0"), Err(r#"annotation io.frakti.vm.memory="0": must be positive"#)),
            ("memory zero quantity", None, Some("0Mi"), Err(r#"annotation io.frakti.vm.memory="0Mi": must be positive"#)),
            ("memory negative", None, Some("-512"), Err(r#"annotation io.frakti.vm.memory="-512": not a memory size (MiB as a plain integer, or a quantity like 512Mi, 1.5Gi, 1G)"#)),
            ("memory MB", None, Some("512MB"), Err(r#"annotation io.frakti.vm.memory="512MB": not a memory size (MiB as a plain integer, or a quantity like 512Mi, 1.5Gi, 1G)"#)),
            ("memory milli", None, Some("512m"), Err(r#"annotation io.frakti.vm.memory="512m": not a memory size (MiB as a plain integer, or a quantity like 512Mi, 1.5Gi, 1G)"#)),
            ("memory plain decimal", None, Some("1.5"), Err(r#"annotation io.frakti.vm.memory="1.5": not a memory size (MiB as a plain integer, or a quantity like 512Mi, 1.5Gi, 1G)"#)),
            ("memory suffix only", None, Some("Mi"), Err(r#"annotation io.frakti.vm.memory="Mi": not a memory size (MiB as a plain integer, or a quantity like 512Mi, 1.5Gi, 1G)"#)),
            ("memory trailing dot", None, Some("1.Gi"), Err(r#"annotation io.frakti.vm.memory="1.Gi": not a memory size (MiB as a plain integer, or a quantity like 512Mi, 1.5Gi, 1G)"#)),
            ("memory space", None, Some("512 Mi"), Err(r#"annotation io.frakti.vm.memory="512 Mi": not a memory size (MiB as a plain integer, or a quantity like 512Mi, 1.5Gi, 1G)"#)),
            ("memory 19 decimals", None, Some("1.0000000000000000001Gi"), Err(r#"annotation io.frakti.vm.memory="1.0000000000000000001Gi": not a memory size (MiB as a plain integer, or a quantity like 512Mi, 1.5Gi, 1G)"#)),
            ("memory plain too large", None, Some("18446744073709551616"), Err(r#"annotation io.frakti.vm.memory="18446744073709551616": too large"#)),
            ("memory quantity too large", None, Some("18446744073709551615Ti"), Err(r#"annotation io.frakti.vm.memory="18446744073709551615Ti": too large"#)),
            ("memory whole too large", None, Some("18446744073709551616Ki"), Err(r#"annotation io.frakti.vm.memory="18446744073709551616Ki": too large"#)),
            ("good cpus, bad memory", Some("2"), Some("x"), Err(r#"annotation io.frakti.vm.memory="x": not a memory size (MiB as a plain integer, or a quantity like 512Mi, 1.5Gi, 1G)"#)),
        ];
        for (name, cpus, memory, want) in cases {
            let mut annotations = vec![("other.annotation", "1")];
            annotations.extend(cpus.map(|v| (ANNOTATION_CPUS, v)));
            annotations.extend(memory.map(|v| (ANNOTATION_MEMORY, v)));
            check(name, &config(None, None, &annotations), &defaults(), *want);
        }
    }

    #[test]
    fn defaults_bound_the_size() {
        let d = |cpus, memory_mib, host_cpus, guest_reserve_mib| SizingDefaults {
            cpus,
            memory_mib,
            host_cpus,
            guest_reserve_mib,
        };
        let no_limits = config(None, None, &[]);
        let two_cpus = config(Some((200_000, 0, 0)), None, &[]);
        let many_cpus = config(Some((100 * 100_000, 0, 0)), None, &[]);
        let ann_cpus = config(None, None, &[(ANNOTATION_CPUS, "40")]);
        let memory = config(Some((0, 0, 100 * MI)), None, &[]);
        let max_memory = config(Some((0, 0, MAX)), Some((0, 0, MAX)), &[]);
        #[rustfmt::skip]
        let cases: &[(&str, &cri::PodSandboxConfig, SizingDefaults, Want)] = &[
            ("default cpus", &no_limits, d(2, 256, 8, 64), Ok((2, 256, Defaults))),
            ("odd default memory rounds up", &no_limits, d(1, 255, 8, 64), Ok((1, 256, Defaults))),
            ("default cpus over host", &no_limits, d(16, 256, 8, 64), Ok((8, 256, Defaults))),
            ("default memory over max", &no_limits, d(1, u64::MAX, 8, 64), Ok((1, 1 << 20, Defaults))),
            ("zero default cpus: 1", &no_limits, d(0, 256, 8, 64), Ok((1, 256, Defaults))),
            ("zero host cpus: 1", &two_cpus, d(1, 256, 0, 64), Ok((1, 256, Resources))),
            ("default cpus floor", &two_cpus, d(4, 256, 8, 64), Ok((4, 256, Resources))),
            ("host cpus above MAX_VCPUS", &many_cpus, d(1, 256, 64, 64), Ok((32, 256, Resources))),
            ("host cpus below MAX_VCPUS", &many_cpus, d(1, 256, 12, 64), Ok((12, 256, Resources))),
            ("annotation over MAX_VCPUS", &ann_cpus, d(1, 256, 64, 64), Ok((32, 256, Annotations))),
            ("odd reserve", &memory, d(1, 0, 8, 1), Ok((1, 102, Resources))),
            ("no reserve", &memory, d(1, 0, 8, 0), Ok((1, 100, Resources))),
            ("reserve overflows", &memory, d(1, 0, 8, u64::MAX >> 19),
                Err("the guest reserve of 35184372088831 MiB overflows")),
            ("sum overflows", &max_memory, d(1, 0, 8, 1 << 20),
                Err("memory limit 9223372036854775807 + overhead 9223372036854775807 bytes + guest reserve 1048576 MiB overflows")),
            ("sum just fits", &max_memory, d(1, 0, 8, 0), Ok((1, 1 << 20, Resources))),
        ];
        for (name, config, defaults, want) in cases {
            check(name, config, defaults, *want);
        }
    }

    #[test]
    fn check_fits_limits() {
        let vm = VmSize {
            vcpus: 2,
            memory_mib: 256,
        };
        let too_big = |cpus: u128, mib: u64| {
            Err(format!(
                "the pod VM has 2 vCPUs and 256 MiB (of which 64 MiB for the guest); \
                 the container asks for {cpus} CPUs / {mib} MiB"
            ))
        };
        #[rustfmt::skip]
        let cases: &[(&str, Res, Result<(), String>)] = &[
            ("no limits", (0, 0, 0), Ok(())),
            ("quota -1", (-1, 100_000, 0), Ok(())),
            ("all cpus", (200_000, 100_000, 0), Ok(())),
            ("cpus 1 over", (200_001, 100_000, 0), too_big(3, 0)),
            ("quota without period", (150_000, 0, 0), Ok(())),
            ("quota without period over", (250_000, 0, 0), too_big(3, 0)),
            ("all memory", (0, 0, 192 * MI), Ok(())),
            ("memory 1 byte over", (0, 0, 192 * MI + 1), too_big(0, 193)),
            ("both over", (400_000, 100_000, 512 * MI), too_big(4, 512)),
            ("huge memory", (0, 0, MAX), too_big(0, 8_796_093_022_208)),
            ("huge quota", (MAX, 1, 0), too_big(9_223_372_036_854_775_807, 0)),
            ("negative quota", (-2, 0, 0), Err("resources.cpu_quota = -2: must not be negative".into())),
            ("negative period", (0, -1, 0), Err("resources.cpu_period = -1: must not be negative".into())),
            ("negative memory", (0, 0, -5), Err("resources.memory_limit_in_bytes = -5: must not be negative".into())),
        ];
        for (name, res, want) in cases {
            let got = check_fits(&vm, 64, &resources(*res)).map_err(|e| e.to_string());
            assert_eq!(&got, want, "{name}");
        }
        // The message of the brief, exactly.
        assert_eq!(
            check_fits(&vm, 64, &resources((400_000, 100_000, 512 * MI)))
                .unwrap_err()
                .to_string(),
            "the pod VM has 2 vCPUs and 256 MiB (of which 64 MiB for the guest); \
             the container asks for 4 CPUs / 512 MiB"
        );
        // A VM sized for the limits by size_pod fits them.
        let limits = (250_000, 0, 300 * MI + 1);
        let (vm, _) = size_pod(&config(Some(limits), None, &[]), &defaults()).unwrap();
        check_fits(&vm, 64, &resources(limits)).unwrap();
    }
}
