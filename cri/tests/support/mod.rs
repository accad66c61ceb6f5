//! Test support for frakti-cri's integration tests: real OCI registries on
//! 127.0.0.1 serving images that the tests build themselves, without docker.
//!
//! - [`pki`]: a throwaway CA and a server certificate for 127.0.0.1
//!   (`openssl` CLI).
//! - [`registry`]: a `docker-registry` (distribution 2.8) process, plain HTTP
//!   or TLS, optionally behind htpasswd basic auth or token (Bearer) auth;
//!   killed on drop.
//! - [`token`]: a token server (the realm of token auth) signing ES256 JWTs
//!   the registry trusts; counts its requests; stopped on drop.
//! - [`loopdev`]: loop devices over sparse files (block volume tests).
//! - [`images`]: OCI image layouts written from scratch (layers built with the
//!   `tar` crate, gzip/zstd/uncompressed), the expected unpacked tree of each
//!   image, a scanner of real trees to compare with, and pushing with
//!   `skopeo` (OCI or Docker schema 2 manifests, single images or indexes).
//!
//! Use it from a test file with `mod support;`. A tool that is missing makes
//! the test panic with the Debian package to install (never a silent pass):
//! `docker-registry skopeo openssl busybox-static` (and `umoci`, `curl` for
//! some checks; `gzip` and `coreutils` for big layers); `scripts/deps.sh`
//! installs most of them.
//!
//! One [`registry::Registry`] per test: the process is killed when the value
//! drops (a registry in a `static` would never be).
//!
//! Typical use:
//!
//! ```ignore
//! let tmp = tempfile::tempdir().unwrap();
//! let reg = support::registry::Registry::start(&tmp.path().join("reg"), Default::default());
//! let img = support::images::busybox_image(&tmp.path().join("images"));
//! let pushed = support::images::push(&img, &reg, "busybox:latest", &Default::default());
//! // pull `pushed.reference` ("127.0.0.1:PORT/busybox:latest") with the code under test;
//! // the image id is `img.config_digest()`.
//! ```

#![allow(dead_code)]

pub mod images;
pub mod loopdev;
pub mod pki;
pub mod registry;
pub mod token;

use std::path::PathBuf;
use std::process::{Command, Output};

/// Finds `tool` on PATH, or panics saying which Debian package provides it.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    if let Some(found) = find_tool(tool) {
        return found;
    }
    panic!(
        "required tool `{tool}` is not installed: install the Debian package `{package}` \
         (apt-get install -y {package}; scripts/deps.sh installs the project's test tools)"
    );
}

/// `tool`'s path if it is an executable file on PATH (or an absolute path).
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &std::path::Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| is_exec(p))
}

/// Runs `cmd` to completion and returns its output; panics with the command
/// line, exit status, stdout and stderr if it fails to start or exits
/// non-zero.
pub fn run(cmd: &mut Command) -> Output {
    let out = try_run(cmd);
    if !out.status.success() {
        panic!(
            "command failed ({}): {}\n--- stdout:\n{}\n--- stderr:\n{}",
            out.status,
            describe(cmd),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs `cmd` to completion and returns its output whatever its exit status;
/// panics only if it cannot be started.
pub fn try_run(cmd: &mut Command) -> Output {
    cmd.stdin(std::process::Stdio::null());
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)))
}

/// A command line as a string, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}
