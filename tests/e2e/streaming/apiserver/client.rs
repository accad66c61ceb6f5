//! The kubectl the streaming tests run: Debian's 1.20 (an independent
//! SPDY client), with a kubeconfig and caches of the test's own.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};

/// The kubectl the streaming tests run (set by the e2e main, in the lab:
/// `/lab/bin/kubectl`).
pub const KUBECTL_ENV: &str = "FRAKTI_KUBECTL";
/// Where `scripts/deps.sh` unpacks Debian's kubernetes-client (1.20).
pub const KUBECTL_DEFAULT: &str = "/usr/local/lib/frakti-test/kubectl-1.20/usr/bin/kubectl";

/// The kubectl to run: [`KUBECTL_ENV`] if set, else [`KUBECTL_DEFAULT`].
pub fn kubectl() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os(KUBECTL_ENV) {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(KUBECTL_DEFAULT),
    };
    ensure!(
        path.is_file(),
        "kubectl {} is missing: run scripts/deps.sh as root (it unpacks Debian's \
         kubernetes-client 1.20 to {KUBECTL_DEFAULT}), or set {KUBECTL_ENV}",
        path.display()
    );
    Ok(path)
}

/// kubectl with `--kubeconfig`, its discovery cache and HOME below `cache`
/// (a directory the test owns), a request timeout, and none of the
/// caller's KUBECONFIG or proxy settings. Add the subcommand's arguments.
pub fn kubectl_command(kubeconfig: &Path, cache: &Path) -> anyhow::Result<Command> {
    let home = cache.join("home");
    let discovery = cache.join("discovery");
    for dir in [&home, &discovery] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let mut command = Command::new(kubectl()?);
    command
        .env("HOME", &home)
        .env_remove("KUBECONFIG")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(&discovery)
        .arg("--request-timeout=60s");
    Ok(command)
}
