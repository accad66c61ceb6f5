//! Tests of the lab itself, on the host: one L1 boot runs a batch of
//! commands; a hung boot times out, kills QEMU and shows the console.

use std::path::Path;
use std::time::Duration;

use frakti_lab::initramfs::Initramfs;
use frakti_lab::runner::{self, CommandResult, LabConfig};

#[test]
fn one_boot_runs_a_batch_and_returns_outputs_and_statuses() {
    let mut payload = Initramfs::new();
    payload.bytes("/payload/hello.txt", "hello from the host\n", 0o644);
    let commands = [
        "cat /payload/hello.txt".to_string(),
        "echo to-stdout; echo to-stderr >&2; exit 3".to_string(),
        // L1 must have hardware-style KVM: SVM in the CPU and /dev/kvm.
        "grep -q svm /proc/cpuinfo && test -c /dev/kvm && echo kvm-ok".to_string(),
    ];
    let config = LabConfig {
        timeout: Duration::from_secs(600),
        ..LabConfig::default()
    };
    let results = runner::run(&config, payload, &commands).expect("lab run");
    assert_eq!(
        results,
        vec![
            CommandResult {
                output: "hello from the host\n".into(),
                status: 0
            },
            CommandResult {
                output: "to-stdout\nto-stderr\n".into(),
                status: 3
            },
            CommandResult {
                output: "kvm-ok\n".into(),
                status: 0
            },
        ]
    );
}

#[test]
fn a_hung_lab_times_out_kills_qemu_and_shows_the_console() {
    let work = tempfile::tempdir().unwrap();
    let config = LabConfig {
        timeout: Duration::from_secs(3),
        work_dir: Some(work.path().to_path_buf()),
        ..LabConfig::default()
    };
    // `sleep` outlives the timeout, as a hung test would.
    let err = runner::run(&config, Initramfs::new(), &["sleep 1000".to_string()])
        .expect_err("must time out");
    let text = err.to_string();
    assert!(
        matches!(err, runner::Error::Timeout { secs: 3, .. }),
        "{text}"
    );
    assert!(
        text.contains("QEMU killed") && text.contains("L1 console"),
        "{text}"
    );
    assert!(
        !qemu_running_in(work.path()),
        "a QEMU process still uses {}",
        work.path().display()
    );
}

/// Whether any process's command line mentions `dir`.
fn qemu_running_in(dir: &Path) -> bool {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
}
