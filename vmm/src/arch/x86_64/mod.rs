//! x86_64 specifics: memory layout, CPUID, MSRs, MP table, registers and
//! the two boot protocols (PVH and the 64-bit Linux boot protocol).

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
