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

/// Fills `buf` from the kernel's CSPRNG (tokens, secrets).
pub(crate) fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes
        // for the duration of the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // n >= 0 and at most rest.len(): the kernel's contract.
        filled += n.unsigned_abs();
    }
    Ok(())
}
