//! frakti-agent: PID 1 of a Frakti pod VM.
//!
//! For now the agent does the PID 1 basics: it mounts the kernel filesystems,
//! announces readiness on the console with a `frakti_proto::ready::ReadyLine`, and resets
//! the VM. The container runtime parts arrive with the agent API.

pub mod pid1;
pub mod sysinfo;
