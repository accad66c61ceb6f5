//! The Frakti lab: runs end-to-end work where a real Linux guest can boot.
//!
//! On a host whose `/dev/kvm` is hardware KVM (`kvm_intel`/`kvm_amd`) the work
//! runs directly. Elsewhere (PVM, no KVM) it runs inside an L1 Linux VM under
//! QEMU TCG with an emulated AMD CPU with SVM+NPT, where `/dev/kvm` is real
//! SVM KVM: see [`mode`] for the choice and [`runner`] for the L1 VM.

pub mod demo;
pub mod guest;
pub mod initramfs;
pub mod l1;
pub mod mode;
pub mod process;
pub mod rerun;
pub mod runner;
pub mod vsock;

use std::path::PathBuf;

/// Root of Frakti's caches: `$FRAKTI_CACHE`, else `~/.cache/frakti`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FRAKTI_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/frakti")
}

/// Quotes `arg` for a POSIX shell.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The last `n` lines of `text`, for error messages.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc-1/x.y"), "abc-1/x.y");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn tails() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(tail_lines("", 5), "");
    }
}
