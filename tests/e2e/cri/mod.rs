//! The CRI daemon for real (issue 13): `frakti daemon` runs in the lab's
//! L1 with our VMM, kernel and agent, and a CRI client built from k8s-cri
//! drives it as kubelet would. The image store is filled on the host (mkfs
//! runs there) and unpacked into each daemon's root.

mod cli;
pub mod devices;
mod features;
pub mod harness;
mod lifecycle;
mod network;
mod recovery;
mod userns;

use libtest_mimic::Trial;

pub use harness::prepare;

pub fn tests() -> Vec<Trial> {
    let mut tests = lifecycle::tests();
    tests.extend(features::tests());
    tests.extend(recovery::tests());
    tests.extend(network::tests());
    tests.extend(devices::tests());
    tests.extend(cli::tests());
    tests.extend(userns::tests());
    tests
}
