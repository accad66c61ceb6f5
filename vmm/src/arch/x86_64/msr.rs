//! Model-specific registers a vCPU starts with.
//!
//! KVM resets most MSRs to their architectural values; [`setup`] only writes
//! the ones a 64-bit kernel expects a firmware to have left in a known state:
//! the `SYSENTER`/`SYSCALL` entry points (cleared), the TSC (0), fast string
//! operations enabled and the MTRRs on with write-back as the default memory
//! type (otherwise the guest treats all RAM as uncached).

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;

/// Errors from writing the boot MSRs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MSR list does not fit in a `kvm_msrs` structure.
    #[error("cannot build the MSR list: {0}")]
    Create(vmm_sys_util::fam::Error),
    /// `KVM_SET_MSRS` failed.
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(kvm_ioctls::Error),
    /// KVM stopped at an MSR it refused: `set` of `requested` were written.
    #[error("KVM refused MSR {index:#x} ({set} of {requested} MSRs set)")]
    Refused {
        /// Index of the first MSR that was not set.
        index: u32,
        /// How many MSRs KVM set (those before `index`).
        set: usize,
        /// How many MSRs were asked for.
        requested: usize,
    },
}

/// Time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `SYSENTER` code segment selector.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `SYSENTER` stack pointer.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `SYSENTER` instruction pointer.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// Miscellaneous processor features.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MISC_ENABLE` bit 0: fast string operations (`rep movs`/`stos`).
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// Default memory type and global enable of the MTRRs.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `MTRRdefType` bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back, for `MTRRdefType` bits 7:0.
pub const MTRR_MEM_TYPE_WB: u64 = 6;
/// `SYSCALL` segment selectors (and legacy-mode target).
pub const MSR_STAR: u32 = 0xc000_0081;
/// 64-bit `SYSCALL` target.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// Compatibility-mode `SYSCALL` target.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// RFLAGS mask applied by `SYSCALL`.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// GS base swapped in by `SWAPGS`.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The MSRs written at boot, in the order they are written.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Writes [`boot_msr_entries`] to `vcpu` (`KVM_SET_MSRS`).
///
/// Fails with [`Error::Refused`], naming the MSR, if KVM did not set them
/// all.
pub fn setup(vcpu: &VcpuFd) -> Result<(), Error> {
    set_entries(vcpu, &boot_msr_entries())
}

fn set_entries(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), Error> {
    let msrs = Msrs::from_entries(entries).map_err(Error::Create)?;
    let set = vcpu.set_msrs(&msrs).map_err(Error::SetMsrs)?;
    // KVM sets MSRs in order and stops at the first one it refuses.
    match entries.get(set) {
        Some(refused) => Err(Error::Refused {
            index: refused.index,
            set,
            requested: entries.len(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use kvm_ioctls::Kvm;

    use super::*;

    #[test]
    fn boot_entries() {
        let entries = boot_msr_entries();
        let indices: Vec<u32> = entries.iter().map(|e| e.index).collect();
        assert_eq!(
            indices,
            [
                0x174,
                0x175,
                0x176,
                0xc000_0081,
                0xc000_0083,
                0xc000_0102,
                0xc000_0084,
                0xc000_0082,
                0x10,
                0x1a0,
                0x2ff
            ]
        );
        assert_eq!(
            indices.iter().collect::<HashSet<_>>().len(),
            entries.len(),
            "no MSR twice"
        );
        for e in &entries {
            let expected = match e.index {
                MSR_IA32_MISC_ENABLE => 1,
                MSR_MTRR_DEF_TYPE => 0x806,
                _ => 0,
            };
            assert_eq!(e.data, expected, "MSR {:#x}", e.index);
            assert_eq!(e.reserved, 0);
        }
    }

    #[test]
    fn mtrr_default_type_value() {
        assert_eq!(MTRR_ENABLE | MTRR_MEM_TYPE_WB, (1 << 11) | 6);
        assert_eq!(MISC_ENABLE_FAST_STRING, 1);
    }

    fn vcpu() -> (Kvm, kvm_ioctls::VmFd, VcpuFd) {
        let kvm = Kvm::new().expect("open /dev/kvm (these tests need KVM)");
        let vm = kvm.create_vm().expect("create VM");
        let vcpu = vm.create_vcpu(0).expect("create vCPU");
        (kvm, vm, vcpu)
    }

    #[test]
    fn kvm_setup_sets_all() {
        let (_kvm, _vm, vcpu) = vcpu();
        setup(&vcpu).expect("set boot MSRs");

        // Read them back (all but the TSC, which has moved on).
        let entries: Vec<kvm_msr_entry> = boot_msr_entries()
            .into_iter()
            .filter(|e| e.index != MSR_IA32_TSC)
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("msrs");
        let read = vcpu.get_msrs(&mut msrs).expect("KVM_GET_MSRS");
        assert_eq!(read, entries.len());
        for (got, want) in msrs.as_slice().iter().zip(&entries) {
            assert_eq!(got.index, want.index);
            match got.index {
                // KVM may add bits of its own to IA32_MISC_ENABLE.
                MSR_IA32_MISC_ENABLE => assert_ne!(got.data & MISC_ENABLE_FAST_STRING, 0),
                _ => assert_eq!(got.data, want.data, "MSR {:#x}", got.index),
            }
        }
    }

    #[test]
    fn kvm_refused_msr_is_named() {
        let (_kvm, _vm, vcpu) = vcpu();
        // An MSR that does not exist, after two good ones.
        let bogus = 0xdead_beef;
        let entries = [
            entry(MSR_IA32_SYSENTER_CS, 0),
            entry(MSR_LSTAR, 0),
            entry(bogus, 1),
            entry(MSR_CSTAR, 0),
        ];
        match set_entries(&vcpu, &entries) {
            Err(Error::Refused {
                index,
                set,
                requested,
            }) => {
                assert_eq!(index, bogus);
                assert_eq!(set, 2);
                assert_eq!(requested, 4);
            }
            other => panic!("expected Refused, got {other:?}"),
        }
    }
}
