//! frakti, the CRI daemon: kubelet's remote runtime where every pod is a VM.
//! This library holds the daemon's parts; `main.rs` is the `frakti` binary.

pub mod client;
pub mod config;
pub mod daemon;
pub mod image;
pub mod server;

/// An error and its sources in one line, `: `-separated; a source whose
/// text its parent already ends with (common in reqwest and oci-client
/// errors) is not repeated.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}
