//! Frakti's end-to-end suite. On hardware KVM the tests run here; anywhere
//! else this binary re-runs itself inside the lab's L1 (one boot for the
//! whole selection), so `cargo test --test e2e [FILTER]` works everywhere.

mod agent;
mod disks;
mod net;
mod qemu_baseline;
mod test_vm;
mod vmm;
mod vsock;

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
        Ok([
            (guest::VMM_ENV, vmm),
            (guest::GUEST_TOOL_ENV, guest::guest_tool_binary()?),
            (guest::MKE2FS_ENV, guest::mke2fs_binary()?),
        ])
    });
    let placement = programs
        .map_err(rerun::Error::from)
        .and_then(|programs| rerun::run_here_or_in_lab(&programs));
    match placement {
        Ok(Placement::Here(mode)) => {
            eprintln!("e2e: running here ({mode})");
            libtest_mimic::run(&args, tests()).exit_code()
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

fn tests() -> Vec<Trial> {
    let mut tests = qemu_baseline::tests();
    tests.extend(vmm::tests());
    tests.extend(disks::tests());
    tests.extend(vsock::tests());
    tests.extend(net::tests());
    tests.extend(agent::tests());
    tests
}
