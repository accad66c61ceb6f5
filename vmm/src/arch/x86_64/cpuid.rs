//! Guest CPUID.
//!
//! KVM tells what it can virtualise through `KVM_GET_SUPPORTED_CPUID`
//! ([`supported`]); that table still describes the host's topology and a few
//! host-only features. [`configure`] turns a copy of it into the table one
//! vCPU of our VM sees (`KVM_SET_CPUID2`):
//!
//! * one package of `vcpu_count` cores with one thread each; the vCPU with
//!   index `vcpu_id` has (x2)APIC ID `vcpu_id`, which is also what the MP
//!   table ([`super::mptable`]) announces;
//! * the hypervisor bit set, so the guest knows it is virtualised;
//! * no thermal/power management, debug store, VMX/SMX or MONITOR/MWAIT,
//!   and no performance monitoring unit (leaf 0xa zeroed).
//!
//! Leaves are only rewritten where KVM reported them (except the subleaves
//! of the extended topology leaves 0xb/0x1f, which are added when the leaf
//! is there). The KVM signature leaves (0x4000_0000..) and AMD's feature
//! leaf 0x8000_0001 are left as KVM reported them.

use kvm_bindings::{
    CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2,
};
use kvm_ioctls::{Cap, Kvm};

/// Errors from building the guest CPUID.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `vcpu_count` is 0 or `vcpu_id` is not below it.
    #[error("vCPU {vcpu_id} does not exist in a VM with {vcpu_count} vCPUs")]
    InvalidVcpu {
        /// The vCPU index asked for.
        vcpu_id: u8,
        /// The number of vCPUs of the VM.
        vcpu_count: u8,
    },
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(kvm_ioctls::Error),
    /// The CPUID table is full: a missing subleaf could not be added.
    #[error("no room in the CPUID table for leaf {function:#x} subleaf {index}")]
    TooManyEntries {
        /// Leaf of the entry that could not be added.
        function: u32,
        /// Subleaf of the entry that could not be added.
        index: u32,
    },
}

// Leaf 0x1: EBX fields.
const LEAF1_EBX_CLFLUSH_SHIFT: u32 = 8;
const LEAF1_EBX_CPU_COUNT_SHIFT: u32 = 16;
const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
/// CLFLUSH line size, in 8-byte units (64 bytes).
const CLFLUSH_LINE_SIZE: u32 = 8;

// Leaf 0x1: ECX feature bits.
const LEAF1_ECX_DTES64: u32 = 2;
const LEAF1_ECX_MONITOR: u32 = 3;
const LEAF1_ECX_DS_CPL: u32 = 4;
const LEAF1_ECX_VMX: u32 = 5;
const LEAF1_ECX_SMX: u32 = 6;
const LEAF1_ECX_EST: u32 = 7;
const LEAF1_ECX_TM2: u32 = 8;
const LEAF1_ECX_PDCM: u32 = 15;
const LEAF1_ECX_TSC_DEADLINE: u32 = 24;
const LEAF1_ECX_HYPERVISOR: u32 = 31;

// Leaf 0x1: EDX feature bits.
const LEAF1_EDX_DS: u32 = 21;
const LEAF1_EDX_ACPI: u32 = 22;
const LEAF1_EDX_HTT: u32 = 28;
const LEAF1_EDX_TM: u32 = 29;
const LEAF1_EDX_PBE: u32 = 31;

/// Leaf 0x1 ECX bits that describe host-only features.
const LEAF1_ECX_CLEAR: [u32; 8] = [
    LEAF1_ECX_DTES64,
    LEAF1_ECX_MONITOR,
    LEAF1_ECX_DS_CPL,
    LEAF1_ECX_VMX,
    LEAF1_ECX_SMX,
    LEAF1_ECX_EST,
    LEAF1_ECX_TM2,
    LEAF1_ECX_PDCM,
];
/// Leaf 0x1 EDX bits that describe host-only features.
const LEAF1_EDX_CLEAR: [u32; 4] = [LEAF1_EDX_DS, LEAF1_EDX_ACPI, LEAF1_EDX_TM, LEAF1_EDX_PBE];

// Leaf 0x6 (thermal and power management).
const LEAF6_EAX_TURBO_BOOST: u32 = 1;
const LEAF6_ECX_EPB: u32 = 3;

// Extended topology (leaves 0xb and 0x1f): ECX[15:8] level types.
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;
/// Subleaves written for the extended topology leaves: SMT, core, and
/// the terminating invalid level.
const TOPOLOGY_SUBLEAVES: u32 = 3;

/// Largest value of the 6-bit "cores per package - 1" field of leaf 0x4.
const LEAF4_MAX_CORES_MINUS_ONE: u32 = 0x3f;

/// Cache level 3 in EAX[7:5] of leaves 0x4 and 0x8000_001d.
const CACHE_LEVEL_L3: u32 = 3;

/// Reads what KVM can virtualise (`KVM_GET_SUPPORTED_CPUID`).
///
/// KVM reports the TSC-deadline timer through `KVM_CAP_TSC_DEADLINE_TIMER`
/// rather than in leaf 0x1; when the capability is present its bit
/// (ECX bit 24) is set in the returned table.
pub fn supported(kvm: &Kvm) -> Result<CpuId, Error> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::Supported)?;
    if kvm.check_extension(Cap::TscDeadlineTimer) {
        for entry in cpuid
            .as_mut_slice()
            .iter_mut()
            .filter(|e| e.function == 0x1)
        {
            set_bit(&mut entry.ecx, LEAF1_ECX_TSC_DEADLINE, true);
        }
    }
    Ok(cpuid)
}

/// Adjusts `cpuid` (from [`supported`]) for the vCPU `vcpu_id` of a VM with
/// `vcpu_count` vCPUs.
///
/// Call it on a fresh copy of the supported table for each vCPU; calling it
/// twice on the same table gives the same result.
pub fn configure(cpuid: &mut CpuId, vcpu_id: u8, vcpu_count: u8) -> Result<(), Error> {
    if vcpu_count == 0 || vcpu_id >= vcpu_count {
        return Err(Error::InvalidVcpu {
            vcpu_id,
            vcpu_count,
        });
    }

    for leaf in [0xb, 0x1f] {
        if cpuid.as_slice().iter().any(|e| e.function == leaf) {
            add_missing_subleaves(cpuid, leaf, TOPOLOGY_SUBLEAVES)?;
        }
    }

    let vcpu_id = u32::from(vcpu_id);
    let vcpu_count = u32::from(vcpu_count);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => update_feature_info(entry, vcpu_id, vcpu_count),
            0x4 => update_deterministic_cache(entry, vcpu_count),
            0x6 => update_thermal_power(entry),
            0xa => clear_registers(entry),
            0xb | 0x1f => update_extended_topology(entry, vcpu_id, vcpu_count),
            0x8000_0008 => update_amd_core_count(entry, vcpu_count),
            0x8000_001d => update_amd_cache_topology(entry, vcpu_count),
            0x8000_001e => update_amd_extended_apic_id(entry, vcpu_id),
            _ => {}
        }
    }
    Ok(())
}

/// Number of bits needed to number `count` items (0 for a single one).
fn bits_for(count: u32) -> u32 {
    u32::BITS - count.saturating_sub(1).leading_zeros()
}

fn set_bit(reg: &mut u32, bit: u32, value: bool) {
    if value {
        *reg |= 1 << bit;
    } else {
        *reg &= !(1 << bit);
    }
}

/// Writes `value` into the `width` bits of `reg` starting at `shift`.
fn set_field(reg: &mut u32, shift: u32, width: u32, value: u32) {
    let mask = (u32::MAX >> (u32::BITS - width)) << shift;
    *reg = (*reg & !mask) | ((value << shift) & mask);
}

fn field(reg: u32, shift: u32, width: u32) -> u32 {
    (reg >> shift) & (u32::MAX >> (u32::BITS - width))
}

fn clear_registers(entry: &mut kvm_cpuid_entry2) {
    entry.eax = 0;
    entry.ebx = 0;
    entry.ecx = 0;
    entry.edx = 0;
}

/// Adds subleaves `0..count` of `function` that the table lacks (KVM
/// may report only subleaf 0 of the topology leaves).
fn add_missing_subleaves(cpuid: &mut CpuId, function: u32, count: u32) -> Result<(), Error> {
    for index in 0..count {
        let present = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == function && e.index == index);
        if !present {
            cpuid
                .push(kvm_cpuid_entry2 {
                    function,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                })
                .map_err(|_| Error::TooManyEntries { function, index })?;
        }
    }
    Ok(())
}

/// Leaf 0x1: APIC ID, logical processor count, CLFLUSH size and features.
fn update_feature_info(entry: &mut kvm_cpuid_entry2, vcpu_id: u32, vcpu_count: u32) {
    // EBX[7:0] (brand index) is kept.
    set_field(
        &mut entry.ebx,
        LEAF1_EBX_CLFLUSH_SHIFT,
        8,
        CLFLUSH_LINE_SIZE,
    );
    set_field(&mut entry.ebx, LEAF1_EBX_CPU_COUNT_SHIFT, 8, vcpu_count);
    set_field(&mut entry.ebx, LEAF1_EBX_APIC_ID_SHIFT, 8, vcpu_id);

    set_bit(&mut entry.ecx, LEAF1_ECX_HYPERVISOR, true);
    for bit in LEAF1_ECX_CLEAR {
        set_bit(&mut entry.ecx, bit, false);
    }
    for bit in LEAF1_EDX_CLEAR {
        set_bit(&mut entry.edx, bit, false);
    }
    // HTT: EBX[23:16] is meaningful (more than one logical processor).
    set_bit(&mut entry.edx, LEAF1_EDX_HTT, vcpu_count > 1);
}

/// Leaf 0x4 (Intel deterministic cache parameters), one subleaf per cache.
fn update_deterministic_cache(entry: &mut kvm_cpuid_entry2, vcpu_count: u32) {
    // EAX[4:0] == 0: no more caches; the subleaf holds nothing.
    if field(entry.eax, 0, 5) == 0 {
        return;
    }
    // EAX[31:26]: cores per package - 1 (6 bits: saturates at 64 cores).
    let cores = (vcpu_count - 1).min(LEAF4_MAX_CORES_MINUS_ONE);
    set_field(&mut entry.eax, 26, 6, cores);
    set_cache_sharing(&mut entry.eax, vcpu_count);
}

/// EAX[25:14] of leaves 0x4 and 0x8000_001d: logical processors sharing the
/// cache - 1. One thread per core: L1 and L2 are private, L3 is shared by all.
fn set_cache_sharing(eax: &mut u32, vcpu_count: u32) {
    let sharing = if field(*eax, 5, 3) == CACHE_LEVEL_L3 {
        vcpu_count - 1
    } else {
        0
    };
    set_field(eax, 14, 12, sharing);
}

/// Leaf 0x6: no turbo boost, no energy/performance bias MSR.
fn update_thermal_power(entry: &mut kvm_cpuid_entry2) {
    set_bit(&mut entry.eax, LEAF6_EAX_TURBO_BOOST, false);
    set_bit(&mut entry.ecx, LEAF6_ECX_EPB, false);
}

/// Leaves 0xb and 0x1f (extended topology): one thread per core,
/// `vcpu_count` cores in one package.
fn update_extended_topology(entry: &mut kvm_cpuid_entry2, vcpu_id: u32, vcpu_count: u32) {
    entry.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    // EDX: x2APIC ID of this vCPU, on every subleaf.
    entry.edx = vcpu_id;
    // ECX[7:0]: the subleaf; ECX[15:8]: the level type (0: invalid).
    let (shift, processors, level_type) = match entry.index {
        // SMT level: one thread, the x2APIC ID is the core's.
        0 => (0, 1, TOPOLOGY_LEVEL_SMT),
        // Core level: all vCPUs; shifting the x2APIC ID right by enough bits
        // to number them gives the package ID (0).
        1 => (bits_for(vcpu_count), vcpu_count, TOPOLOGY_LEVEL_CORE),
        _ => (0, 0, 0),
    };
    entry.eax = shift;
    entry.ebx = processors;
    entry.ecx = (level_type << 8) | (entry.index & 0xff);
}

/// Leaf 0x8000_0008 (AMD): ECX[7:0] number of threads - 1, ECX[15:12]
/// bits of the APIC ID that number them.
fn update_amd_core_count(entry: &mut kvm_cpuid_entry2, vcpu_count: u32) {
    set_field(&mut entry.ecx, 0, 8, vcpu_count - 1);
    set_field(&mut entry.ecx, 12, 4, bits_for(vcpu_count));
}

/// Leaf 0x8000_001d (AMD cache topology), one subleaf per cache.
fn update_amd_cache_topology(entry: &mut kvm_cpuid_entry2, vcpu_count: u32) {
    if field(entry.eax, 0, 5) == 0 {
        return;
    }
    set_cache_sharing(&mut entry.eax, vcpu_count);
}

/// Leaf 0x8000_001e (AMD processor topology): extended APIC ID, core ID,
/// one thread per core, a single node.
fn update_amd_extended_apic_id(entry: &mut kvm_cpuid_entry2, vcpu_id: u32) {
    entry.eax = vcpu_id;
    // EBX[7:0] core ID, EBX[15:8] threads per core - 1 (0).
    entry.ebx = vcpu_id;
    // ECX[7:0] node ID (0), ECX[10:8] nodes per package - 1 (0).
    entry.ecx = 0;
    entry.edx = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let flags = match function {
            0x4 | 0x7 | 0xb | 0xd | 0x1f | 0x8000_001d => KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            _ => 0,
        };
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A host-like table: Intel-style leaves 0x4/0xb and AMD-style
    /// 0x8000_00xx ones, with every host-only feature bit set.
    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(0x0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            // Brand index 0x5, host APIC ID 0x2a, 16 logical processors.
            entry(0x1, 0, [0x0009_06ea, 0x2a10_0805, 0xffff_ffff, 0xffff_ffff]),
            // L1d, L1i, L2, L3, then the terminator; host: 8 cores, 2 threads.
            entry(0x4, 0, [0x1c00_4121, 0x01c0_003f, 0x3f, 0]),
            entry(0x4, 1, [0x1c00_4122, 0x01c0_003f, 0x3f, 0]),
            entry(0x4, 2, [0x1c00_4143, 0x01c0_003f, 0x3ff, 0]),
            entry(0x4, 3, [0x1c03_c163, 0x03c0_003f, 0x2fff, 6]),
            entry(0x4, 4, [0, 0, 0, 0]),
            entry(0x6, 0, [0x0000_0077, 0x2, 0x9, 0]),
            entry(0xa, 0, [0x0704_8304, 0, 0, 0x8603]),
            entry(0xb, 0, [0x1, 0x2, 0x100, 0x2a]),
            entry(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            entry(0x4000_0001, 0, [0x0100_7efb, 0, 0, 0]),
            entry(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            entry(
                0x8000_0001,
                0,
                [0x00b0_0f21, 0x4000_0000, 0x0040_0393, 0x23d3_fbff],
            ),
            entry(0x8000_0008, 0, [0x3030, 0x5002_0005, 0x0003_700f, 0]),
            entry(0x8000_001d, 0, [0x0000_4121, 0x01c0_003f, 0x3f, 0]),
            entry(0x8000_001d, 1, [0x0000_4122, 0x01c0_003f, 0x3f, 0]),
            entry(0x8000_001d, 2, [0x0000_4143, 0x03c0_003f, 0x3ff, 2]),
            entry(0x8000_001d, 3, [0x0003_c163, 0x03c0_003f, 0x7fff, 1]),
            entry(0x8000_001d, 4, [0, 0, 0, 0]),
            entry(0x8000_001e, 0, [0x2a, 0x0100, 0x0300, 0]),
        ])
        .expect("sample CPUID fits")
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x} subleaf {index} missing"))
    }

    fn configured(vcpu_id: u8, vcpu_count: u8) -> CpuId {
        let mut cpuid = sample();
        configure(&mut cpuid, vcpu_id, vcpu_count).expect("configure");
        cpuid
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(bits_for(0), 0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
        assert_eq!(bits_for(128), 7);
        assert_eq!(bits_for(129), 8);
        assert_eq!(bits_for(255), 8);
    }

    #[test]
    fn field_helpers() {
        let mut reg = 0xffff_ffff;
        set_field(&mut reg, 8, 8, 0x12);
        assert_eq!(reg, 0xffff_12ff);
        set_field(&mut reg, 26, 6, 0x7f); // too wide: truncated to 6 bits
        assert_eq!(reg, 0xffff_12ff);
        set_field(&mut reg, 0, 32, 7);
        assert_eq!(reg, 7);
        assert_eq!(field(0xabcd_1234, 16, 8), 0xcd);
        set_bit(&mut reg, 31, true);
        set_bit(&mut reg, 0, false);
        assert_eq!(reg, 0x8000_0006);
    }

    #[test]
    fn rejects_bad_vcpu() {
        let mut cpuid = sample();
        assert!(matches!(
            configure(&mut cpuid, 0, 0),
            Err(Error::InvalidVcpu {
                vcpu_id: 0,
                vcpu_count: 0
            })
        ));
        assert!(matches!(
            configure(&mut cpuid, 4, 4),
            Err(Error::InvalidVcpu { .. })
        ));
        assert!(matches!(
            configure(&mut cpuid, 255, 255),
            Err(Error::InvalidVcpu { .. })
        ));
        // Nothing was touched.
        assert_eq!(cpuid.as_slice(), sample().as_slice());
    }

    #[test]
    fn leaf1_topology_fields() {
        let cpuid = configured(3, 4);
        let leaf = find(&cpuid, 0x1, 0);
        assert_eq!(leaf.ebx >> 24, 3, "initial APIC ID");
        assert_eq!((leaf.ebx >> 16) & 0xff, 4, "logical processor count");
        assert_eq!((leaf.ebx >> 8) & 0xff, 8, "CLFLUSH line size");
        assert_eq!(leaf.ebx & 0xff, 5, "brand index kept");
        assert_eq!(leaf.eax, 0x0009_06ea, "signature kept");
        assert_ne!(leaf.edx & (1 << LEAF1_EDX_HTT), 0);

        let leaf = find(&configured(0, 1), 0x1, 0);
        assert_eq!(leaf.ebx >> 24, 0);
        assert_eq!((leaf.ebx >> 16) & 0xff, 1);
        assert_eq!(leaf.edx & (1 << LEAF1_EDX_HTT), 0, "no HTT with 1 vCPU");

        let leaf = find(&configured(253, 254), 0x1, 0);
        assert_eq!(leaf.ebx >> 24, 253);
        assert_eq!((leaf.ebx >> 16) & 0xff, 254);
    }

    #[test]
    fn leaf1_features() {
        let leaf = find(&configured(1, 2), 0x1, 0);
        assert_ne!(leaf.ecx & (1 << LEAF1_ECX_HYPERVISOR), 0, "hypervisor bit");
        for bit in LEAF1_ECX_CLEAR {
            assert_eq!(leaf.ecx & (1 << bit), 0, "ECX bit {bit} cleared");
        }
        for bit in LEAF1_EDX_CLEAR {
            assert_eq!(leaf.edx & (1 << bit), 0, "EDX bit {bit} cleared");
        }
        assert_eq!(leaf.ecx & (1 << LEAF1_ECX_MONITOR), 0);
        assert_eq!(leaf.ecx & (1 << LEAF1_ECX_VMX), 0);
        // Everything else is kept: SSE3 (0), x2APIC (21), TSC deadline (24),
        // FPU (EDX 0), APIC (EDX 9).
        for bit in [0, 21, LEAF1_ECX_TSC_DEADLINE] {
            assert_ne!(leaf.ecx & (1 << bit), 0, "ECX bit {bit} kept");
        }
        for bit in [0, 9] {
            assert_ne!(leaf.edx & (1 << bit), 0, "EDX bit {bit} kept");
        }
        let expected_ecx = !((1 << 2)
            | (1 << 3)
            | (1 << 4)
            | (1 << 5)
            | (1 << 6)
            | (1 << 7)
            | (1 << 8)
            | (1 << 15));
        assert_eq!(leaf.ecx, expected_ecx);
    }

    #[test]
    fn leaf1_hypervisor_bit_set_when_absent() {
        let mut cpuid = CpuId::from_entries(&[entry(0x1, 0, [0, 0, 0, 0])]).expect("cpuid");
        configure(&mut cpuid, 0, 1).expect("configure");
        let leaf = find(&cpuid, 0x1, 0);
        assert_eq!(leaf.ecx, 1 << LEAF1_ECX_HYPERVISOR);
        assert_eq!(leaf.ebx, (1 << 16) | (8 << 8));
    }

    #[test]
    fn leaf4_cores_and_sharing() {
        let cpuid = configured(2, 4);
        for index in 0..4 {
            let leaf = find(&cpuid, 0x4, index);
            assert_eq!(leaf.eax >> 26, 3, "subleaf {index}: cores per package - 1");
            let sharing = (leaf.eax >> 14) & 0xfff;
            let expected = if index == 3 { 3 } else { 0 };
            assert_eq!(sharing, expected, "subleaf {index}: sharing");
            // Cache type, level and the other registers are kept.
            let host = find(&sample(), 0x4, index);
            assert_eq!(leaf.eax & 0x3fff, host.eax & 0x3fff);
            assert_eq!(
                (leaf.ebx, leaf.ecx, leaf.edx),
                (host.ebx, host.ecx, host.edx)
            );
        }
        assert_eq!(find(&cpuid, 0x4, 4).eax, 0, "terminator untouched");
    }

    #[test]
    fn leaf4_cores_saturate() {
        let cpuid = configured(0, 100);
        assert_eq!(find(&cpuid, 0x4, 0).eax >> 26, 63);
        assert_eq!((find(&cpuid, 0x4, 3).eax >> 14) & 0xfff, 99);
        let cpuid = configured(0, 1);
        assert_eq!(find(&cpuid, 0x4, 0).eax >> 26, 0);
        assert_eq!((find(&cpuid, 0x4, 3).eax >> 14) & 0xfff, 0);
    }

    #[test]
    fn leaf6_no_turbo_no_epb() {
        let leaf = find(&configured(0, 1), 0x6, 0);
        assert_eq!(leaf.eax, 0x75, "turbo cleared, ARAT and the rest kept");
        assert_eq!(leaf.ecx, 0x1, "EPB cleared");
        assert_eq!(leaf.ebx, 0x2);
    }

    #[test]
    fn leafa_no_pmu() {
        let leaf = find(&configured(0, 2), 0xa, 0);
        assert_eq!((leaf.eax, leaf.ebx, leaf.ecx, leaf.edx), (0, 0, 0, 0));
    }

    #[test]
    fn leafb_topology() {
        let cpuid = configured(3, 4);
        let smt = find(&cpuid, 0xb, 0);
        assert_eq!(smt.eax, 0, "SMT shift");
        assert_eq!(smt.ebx, 1, "one thread per core");
        assert_eq!(smt.ecx, 0x100, "level 0, type SMT");
        assert_eq!(smt.edx, 3, "x2APIC ID");
        let core = find(&cpuid, 0xb, 1);
        assert_eq!(core.eax, 2, "core shift for 4 vCPUs");
        assert_eq!(core.ebx, 4);
        assert_eq!(core.ecx, 0x201, "level 1, type core");
        assert_eq!(core.edx, 3);
        let end = find(&cpuid, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 3));
        for index in 0..3 {
            assert_eq!(
                find(&cpuid, 0xb, index).flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            );
        }
        assert_eq!(cpuid.as_slice().len(), sample().as_slice().len() + 2);

        assert_eq!(find(&configured(4, 5), 0xb, 1).eax, 3);
        let single = configured(0, 1);
        assert_eq!(find(&single, 0xb, 1).eax, 0);
        assert_eq!(find(&single, 0xb, 1).ebx, 1);
    }

    #[test]
    fn leaf1f_topology_when_present() {
        let mut cpuid = CpuId::from_entries(&[
            entry(0x1f, 0, [1, 2, 0x100, 9]),
            entry(0x1f, 1, [4, 16, 0x201, 9]),
            entry(0x1f, 2, [6, 32, 0x502, 9]), // a die level: dropped
            entry(0x1f, 3, [0, 0, 3, 9]),
        ])
        .expect("cpuid");
        configure(&mut cpuid, 1, 2).expect("configure");
        assert_eq!(cpuid.as_slice().len(), 4);
        let core = find(&cpuid, 0x1f, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (1, 2, 0x201, 1));
        let dropped = find(&cpuid, 0x1f, 2);
        assert_eq!((dropped.eax, dropped.ebx, dropped.ecx), (0, 0, 2));
        assert_eq!(find(&cpuid, 0x1f, 3).ecx, 3);
        assert!(!cpuid.as_slice().iter().any(|e| e.function == 0xb));
    }

    #[test]
    fn amd_topology_leaves() {
        let cpuid = configured(5, 6);
        let leaf = find(&cpuid, 0x8000_0008, 0);
        assert_eq!(leaf.ecx & 0xff, 5, "NC");
        assert_eq!((leaf.ecx >> 12) & 0xf, 3, "APIC ID size");
        assert_eq!(leaf.ecx & !0xf0ff, 0x0003_0000, "other ECX bits kept");
        assert_eq!((leaf.eax, leaf.ebx), (0x3030, 0x5002_0005));

        for index in 0..4 {
            let sharing = (find(&cpuid, 0x8000_001d, index).eax >> 14) & 0xfff;
            assert_eq!(sharing, if index == 3 { 5 } else { 0 });
        }
        assert_eq!(find(&cpuid, 0x8000_001d, 4).eax, 0);

        let leaf = find(&cpuid, 0x8000_001e, 0);
        assert_eq!((leaf.eax, leaf.ebx, leaf.ecx, leaf.edx), (5, 5, 0, 0));
    }

    #[test]
    fn kvm_and_amd_feature_leaves_untouched() {
        let cpuid = configured(1, 3);
        let host = sample();
        for function in [0x0, 0x4000_0000, 0x4000_0001, 0x8000_0000, 0x8000_0001] {
            assert_eq!(find(&cpuid, function, 0), find(&host, function, 0));
        }
    }

    #[test]
    fn configure_is_idempotent() {
        let once = configured(2, 3);
        let mut twice = once.clone();
        configure(&mut twice, 2, 3).expect("configure");
        assert_eq!(once.as_slice(), twice.as_slice());
    }

    #[test]
    fn full_table_is_an_error() {
        let mut entries = vec![entry(0xb, 0, [0; 4])];
        entries.extend(
            (0..KVM_MAX_CPUID_ENTRIES as u32 - 1).map(|i| entry(0x4000_0100 + i, 0, [0; 4])),
        );
        let mut cpuid = CpuId::from_entries(&entries).expect("cpuid");
        assert!(matches!(
            configure(&mut cpuid, 0, 1),
            Err(Error::TooManyEntries {
                function: 0xb,
                index: 1
            })
        ));
    }

    fn open_kvm() -> Kvm {
        Kvm::new().expect("open /dev/kvm (these tests need KVM)")
    }

    #[test]
    fn kvm_supported_and_configured() {
        let kvm = open_kvm();
        let mut cpuid = supported(&kvm).expect("supported CPUID");
        assert!(cpuid.as_slice().len() > 10);
        let signature = find(&cpuid, 0x4000_0000, 0);
        assert_eq!(
            (signature.ebx, signature.ecx, signature.edx),
            (0x4b4d_564b, 0x564b_4d56, 0x4d),
            "KVMKVMKVM"
        );

        configure(&mut cpuid, 3, 4).expect("configure");
        let leaf = find(&cpuid, 0x1, 0);
        assert_eq!(leaf.ebx >> 24, 3);
        assert_eq!((leaf.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf.ecx & (1 << LEAF1_ECX_HYPERVISOR), 0);
        assert_eq!(leaf.ecx & (1 << LEAF1_ECX_MONITOR), 0);
        assert_eq!(find(&cpuid, 0x4000_0000, 0), signature);
        if let Some(topology) = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0xb && e.index == 1)
        {
            assert_eq!(topology.edx, 3);
            assert_eq!(topology.ebx, 4);
        }

        // KVM accepts the result for a vCPU.
        let vm = kvm.create_vm().expect("create VM");
        let vcpu = vm.create_vcpu(3).expect("create vCPU");
        vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
        let back = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_CPUID2");
        assert_eq!(find(&back, 0x1, 0).ebx >> 24, 3);
    }
}
