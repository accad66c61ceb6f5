//! frakti, the CRI daemon: kubelet's remote runtime where every pod is a VM.
//! This library holds the daemon's parts; `main.rs` is the `frakti` binary.

pub mod client;
pub mod config;
pub mod daemon;
pub mod image;
pub mod runtime;
pub mod sandbox;
pub mod server;

pub use frakti_proto::error_chain;
