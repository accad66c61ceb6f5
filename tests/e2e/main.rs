//! Frakti's end-to-end suite. On hardware KVM the tests run here; anywhere
//! else this binary re-runs itself inside the lab's L1 (one boot for the
//! whole selection), so `cargo test --test e2e [FILTER]` works everywhere.

mod disks;
mod qemu_baseline;
mod vmm;

use std::process::ExitCode;

use frakti_lab::guest::{self, GuestAssets};
use frakti_lab::mode::Mode;
use frakti_lab::rerun::run_self_in_lab;
use frakti_lab::runner::LabConfig;
use libtest_mimic::{Arguments, Trial};

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let mode = match Mode::detect() {
        Ok(mode) => mode,
        Err(e) => {
            eprintln!("e2e: {e}");
            return ExitCode::FAILURE;
        }
    };
    if mode.is_nested() && !args.list {
        eprintln!("e2e: running in the {mode}");
        return rerun_in_lab();
    }
    eprintln!("e2e: running here ({mode})");
    libtest_mimic::run(&args, tests()).exit_code()
}

fn tests() -> Vec<Trial> {
    let mut tests = qemu_baseline::tests();
    tests.extend(vmm::tests());
    tests.extend(disks::tests());
    tests
}

fn rerun_in_lab() -> ExitCode {
    let (guest, vmm) = match GuestAssets::locate().and_then(|g| Ok((g, guest::vmm_binary()?))) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("e2e: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = LabConfig {
        echo: true,
        ..LabConfig::default()
    };
    match run_self_in_lab(&args, &guest, &[(guest::VMM_ENV, vmm)], &config) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("e2e: the suite failed inside the lab (exit {status})");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("e2e: lab run failed: {e}");
            ExitCode::FAILURE
        }
    }
}
