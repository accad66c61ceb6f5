//! frakti, the CRI daemon: kubelet's remote runtime where every pod is a VM.
//! This library holds the daemon's parts; `main.rs` is the `frakti` binary.

pub mod client;
pub mod config;
pub mod daemon;
pub mod image;
pub mod network;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod streaming;
pub mod volume;

pub use frakti_proto::error_chain;

/// A mutex's guard; a panic elsewhere while it was held does not make the
/// data unusable here (every critical section leaves it consistent).
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
