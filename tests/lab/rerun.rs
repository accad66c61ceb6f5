//! Re-runs the current program inside the lab: how the e2e suite and the
//! demo run on hosts whose /dev/kvm cannot boot a Linux guest.

use std::path::PathBuf;

use crate::guest::{self, GuestAssets};
use crate::initramfs::Initramfs;
use crate::mode::Mode;
use crate::runner::{self, LabConfig};
use crate::shell_quote;

/// Environment passed through to the program in L1.
const PASSED_ENV: &[&str] = &["RUST_LOG", "RUST_BACKTRACE"];

/// Runs this executable with `args` in one L1 boot, with the guest's kernel
/// and initrd and `programs` (each `(env var, host path)`: the program goes
/// to `/lab/bin/` and the variable points at it there) beside it, relaying
/// its output as it comes. Returns its exit status.
pub fn run_self_in_lab(
    args: &[String],
    guest: &GuestAssets,
    programs: &[(&str, PathBuf)],
    config: &LabConfig,
) -> Result<i32, runner::Error> {
    let exe = std::env::current_exe().map_err(|source| runner::Error::WorkDir {
        path: "/proc/self/exe".into(),
        source,
    })?;
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "program".into());
    let mut payload = Initramfs::new();
    payload.program(&format!("/lab/bin/{name}"), &exe)?;
    guest.add_to(&mut payload);
    let mut exports = Vec::new();
    for (env, path) in programs {
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        let in_lab = format!("/lab/bin/{file}");
        payload.program(&in_lab, path)?;
        exports.push(format!("export {env}={}\n", shell_quote(&in_lab)));
    }

    let mut script = format!(
        "export {}={} {}={}\n",
        guest::KERNEL_ENV,
        GuestAssets::LAB_KERNEL,
        guest::INITRD_ENV,
        GuestAssets::LAB_INITRD,
    );
    script.extend(exports);
    for var in PASSED_ENV {
        if let Ok(value) = std::env::var(var) {
            script.push_str(&format!("export {var}={}\n", shell_quote(&value)));
        }
    }
    script.push_str(&format!("exec /lab/bin/{}", shell_quote(&name)));
    for arg in args {
        script.push(' ');
        script.push_str(&shell_quote(arg));
    }
    let results = runner::run(config, payload, &[script])?;
    Ok(results.first().map_or(-1, |r| r.status))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Mode(#[from] crate::mode::Error),
    #[error(transparent)]
    Guest(#[from] guest::Error),
    #[error(transparent)]
    Lab(#[from] runner::Error),
}

/// Where a program that boots guests should do its work.
#[derive(Debug)]
pub enum Placement {
    /// This host can boot the guest: go on here.
    Here(Mode),
    /// This program was re-run inside the lab with the same arguments and
    /// exited with this status; its output was relayed.
    RanInLab(i32),
}

/// Detects the mode and, where the host needs the lab, re-runs this
/// program (with the same arguments, the guest and `programs`) in it.
pub fn run_here_or_in_lab(programs: &[(&str, PathBuf)]) -> Result<Placement, Error> {
    let mode = Mode::detect()?;
    if !mode.is_nested() {
        return Ok(Placement::Here(mode));
    }
    eprintln!("running in the {mode}");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = LabConfig {
        echo: true,
        ..LabConfig::default()
    };
    let status = run_self_in_lab(&args, &GuestAssets::locate()?, programs, &config)?;
    Ok(Placement::RanInLab(status))
}
