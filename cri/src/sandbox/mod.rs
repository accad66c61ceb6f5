//! The pod VM supervisor's parts: the `frakti-vmm` process of each pod
//! (`vmm`), its control API (`api`: disk slots) and the agent inside it,
//! reached over the VMM's hybrid vsock socket (`agent`).

pub mod agent;
pub mod api;
pub mod vmm;
