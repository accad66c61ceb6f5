//! Frakti's end-to-end suite. On hardware KVM the tests run here; anywhere
//! else this binary re-runs itself inside the lab's L1 (one boot for the
//! whole selection), so `cargo test --test e2e [FILTER]` works everywhere.

mod agent;
mod cri;
mod disks;
mod images;
mod net;
mod qemu_baseline;
mod streaming;
mod test_vm;
mod vmm;
mod vsock;

/// frakti-cri's test images and registries (built on the host).
#[path = "../../cri/tests/support/mod.rs"]
mod support;

use std::process::ExitCode;

use frakti_lab::guest;
use frakti_lab::rerun::{self, Placement};
use libtest_mimic::{Arguments, Trial};

fn main() -> ExitCode {
    let args = Arguments::from_args();
    if args.list {
        return libtest_mimic::run(&args, tests()).exit_code();
    }
    let programs = guest::vmm_binary().and_then(|vmm| {
        Ok(vec![
            (guest::VMM_ENV, vmm),
            (guest::GUEST_TOOL_ENV, guest::guest_tool_binary()?),
            (guest::MKE2FS_ENV, guest::mke2fs_binary()?),
            (
                cri::devices::CSI_EXAMPLE_ENV,
                cri::devices::csi_example_script(),
            ),
        ])
    });
    let mut programs = match programs {
        Ok(programs) => programs,
        Err(e) => {
            eprintln!("e2e: {e}");
            return ExitCode::FAILURE;
        }
    };
    // frakti-vmm's tiny-guest tests (make e2e builds them), for the
    // pause/resume race on real KVM.
    match std::env::var_os(vmm::TINY_GUEST_ENV) {
        Some(path) => programs.push((vmm::TINY_GUEST_ENV, path.into())),
        None => eprintln!(
            "e2e: {} is not set (make e2e sets it): vmm::pause_resume_races_the_guests_reset_1000_times will fail",
            vmm::TINY_GUEST_ENV
        ),
    }
    // The streaming tests' client (scripts/deps.sh unpacks it).
    match streaming::apiserver::kubectl() {
        Ok(kubectl) => programs.push((streaming::apiserver::KUBECTL_ENV, kubectl)),
        Err(e) => {
            eprintln!("e2e: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    // Image disks are made where mkfs runs: on the host, once.
    let image_dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("e2e: temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    if std::env::var_os(images::EROFS_ENV).is_none() {
        let prepared = guest::guest_tool_binary()
            .map_err(anyhow::Error::from)
            .and_then(|tool| images::prepare(image_dir.path(), &tool));
        match prepared {
            Ok(prepared) => programs.extend(prepared.files),
            Err(e) => {
                eprintln!("e2e: preparing the image disks: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    if std::env::var_os(streaming::python::PYTHON_TREE_ENV).is_none() {
        match streaming::python::prepare(image_dir.path()) {
            Ok(files) => programs.extend(files),
            Err(e) => {
                eprintln!("e2e: preparing the Python client: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    if std::env::var_os(cri::harness::STORE_ENV).is_none() {
        match cri::prepare(image_dir.path()) {
            Ok(files) => programs.extend(files),
            Err(e) => {
                eprintln!("e2e: preparing the CRI tests' image store: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    let placement = rerun::run_here_or_in_lab(&programs);
    if matches!(placement, Ok(Placement::Here(_))) {
        for (env, path) in &programs {
            // SAFETY: no other thread runs yet (the tests start below), so
            // nothing reads the environment concurrently.
            unsafe { std::env::set_var(env, path) };
        }
    }
    match placement {
        Ok(Placement::Here(mode)) => {
            eprintln!("e2e: running here ({mode})");
            libtest_mimic::run(&args, not_yet_passed(tests())).exit_code()
        }
        Ok(Placement::RanInLab(0)) => ExitCode::SUCCESS,
        Ok(Placement::RanInLab(status)) => {
            eprintln!("e2e: the suite failed inside the lab (exit {status})");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("e2e: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The tests minus those that passed in an earlier boot of L1 for this
/// batch (L1 froze meanwhile: see frakti_lab::runner::PASSED_FILE).
fn not_yet_passed(tests: Vec<Trial>) -> Vec<Trial> {
    let Ok(list) = std::fs::read_to_string(frakti_lab::runner::PASSED_FILE) else {
        return tests;
    };
    let passed: std::collections::HashSet<&str> = list.lines().collect();
    let left: Vec<Trial> = tests
        .into_iter()
        .filter(|t| !passed.contains(t.name()))
        .collect();
    eprintln!(
        "e2e: {} test(s) passed in an earlier boot of L1 and are not run again",
        passed.len()
    );
    left
}

fn tests() -> Vec<Trial> {
    let mut tests = qemu_baseline::tests();
    tests.extend(vmm::tests());
    tests.extend(disks::tests());
    tests.extend(vsock::tests());
    tests.extend(net::tests());
    tests.extend(agent::tests());
    tests.extend(images::tests());
    tests.extend(cri::tests());
    tests.extend(streaming::tests());
    tests
}
