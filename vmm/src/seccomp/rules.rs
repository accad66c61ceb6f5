//! Building blocks of the allow-lists: syscall → rules, argument
//! comparisons, ioctl requests, and the KVM ioctl numbers.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// Syscall number -> rules (any one matching allows the call); an empty rule
/// list allows the syscall whatever its arguments.
#[derive(Default)]
pub(super) struct AllowList(pub(super) BTreeMap<i64, Vec<SeccompRule>>);

impl AllowList {
    /// Allows `syscalls` whatever their arguments.
    pub(super) fn syscalls(&mut self, syscalls: &[i64]) {
        for &nr in syscalls {
            self.0.insert(nr, Vec::new());
        }
    }

    /// Allows `nr` when one of `rules` matches. A syscall already allowed
    /// unconditionally stays so.
    pub(super) fn syscall_if(&mut self, nr: i64, rules: Vec<SeccompRule>) {
        if rules.is_empty() {
            return;
        }
        match self.0.entry(nr) {
            Entry::Vacant(entry) => {
                entry.insert(rules);
            }
            Entry::Occupied(mut entry) => {
                if !entry.get().is_empty() {
                    entry.get_mut().extend(rules);
                }
            }
        }
    }
}

/// A rule matching when argument `index` equals `value`.
///
/// The comparison is on the low 32 bits, which is what the kernel looks at
/// for the `int`/`unsigned int` arguments this module filters (e.g. an
/// ioctl's request is `unsigned int cmd` in the kernel).
pub(super) fn arg_eq(index: u8, value: impl Into<u64>) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value.into(),
    )?])
}

/// A rule matching when argument `index`, masked with `mask`, equals `value`.
pub(super) fn arg_masked_eq(
    index: u8,
    mask: impl Into<u64>,
    value: impl Into<u64>,
) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask.into()),
        value.into(),
    )?])
}

/// `ioctl(fd, request, ...)` rules: one per allowed request (arg 1).
pub(super) fn ioctl_requests(
    requests: Vec<libc::c_ulong>,
) -> Result<Vec<SeccompRule>, BackendError> {
    requests
        .into_iter()
        .map(|request| arg_eq(1, request))
        .collect()
}

/// KVM ioctl request numbers (include/uapi/linux/kvm.h), computed with
/// vmm-sys-util's macros from the kvm-bindings structures, as kvm-ioctls does
/// (kvm-ioctls keeps its own copies private).
pub(super) mod kvm_nr {
    use kvm_bindings::{
        KVMIO, kvm_clock_data, kvm_fpu, kvm_ioeventfd, kvm_irq_level, kvm_irqfd, kvm_lapic_state,
        kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    // vCPU fd.
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);

    // VM fd.
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
    ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
    ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
    ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
}
