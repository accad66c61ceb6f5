//! `frakti-vmm` rejects bad configuration with a clear message and exit
//! code 2, before it touches KVM.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_frakti-vmm"))
        .args(args)
        .output()
        .expect("run frakti-vmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_values_are_refused_with_reasons() {
    let kernel = "/etc/hostname"; // any readable file passes the file check
    let cases: &[(&[&str], &str)] = &[
        (
            &["--kernel", kernel, "--vcpus", "0"],
            "vcpus must be between 1 and 32",
        ),
        (
            &["--kernel", kernel, "--vcpus", "33"],
            "vcpus must be between 1 and 32",
        ),
        (
            &["--kernel", kernel, "--memory", "4"],
            "memory must be between",
        ),
        (
            &["--kernel", "/nonexistent/vmlinux"],
            "kernel /nonexistent/vmlinux is not a readable file",
        ),
        (
            &["--kernel", kernel, "--initrd", "/nonexistent"],
            "initrd /nonexistent",
        ),
        (
            &["--kernel", kernel, "--api-socket", "/nonexistent/x.sock"],
            "API socket",
        ),
        (&[], "--kernel is required"),
        (
            &["--config", "/nonexistent.toml"],
            "cannot read config file",
        ),
    ];
    for (args, expected) in cases {
        let (code, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn unknown_config_fields_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.toml");
    std::fs::write(
        &path,
        "vcpus = 1\nmemory_mib = 128\nkernel = \"/k\"\ncpus = 4\n",
    )
    .unwrap();
    let (code, stderr) = run(&["--config", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(stderr.contains("unknown field `cpus`"), "{stderr}");
}

#[test]
fn help_explains_the_vmm() {
    let out = Command::new(env!("CARGO_BIN_EXE_frakti-vmm"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("control API") && text.contains("--api-socket"),
        "{text}"
    );
}
