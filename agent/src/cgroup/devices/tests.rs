use super::*;

fn oci(json: serde_json::Value) -> Vec<LinuxDeviceCgroup> {
    serde_json::from_value(json).unwrap()
}

fn invalid(result: Result<Vec<Rule>, Error>) -> String {
    match result {
        Err(Error::Invalid(message)) => message,
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn defaults_allow_the_usual_nodes_and_nothing_else() {
    let rules = rules(&[], &[]).unwrap();
    assert!(allowed(&rules, Kind::Char, 1, 3, READ | WRITE)); // null
    assert!(allowed(&rules, Kind::Char, 136, 7, READ | WRITE)); // pts/7
    assert!(allowed(&rules, Kind::Block, 254, 0, MKNOD)); // mknod is fine…
    assert!(!allowed(&rules, Kind::Block, 254, 0, READ)); // …opening is not
    assert!(!allowed(&rules, Kind::Char, 1, 1, READ)); // mem
    assert!(!allowed(&rules, Kind::Char, 10, 237, READ)); // loop-control
    assert!(!allowed(&rules, Kind::Char, 5, 1, MKNOD | READ)); // console: rw only
}

#[test]
fn nodes_and_spec_rules_come_after_the_defaults() {
    let node: LinuxDevice = serde_json::from_value(serde_json::json!(
        {"path": "/dev/vdb", "type": "b", "major": 254, "minor": 16}
    ))
    .unwrap();
    let read_only = oci(serde_json::json!([
        {"allow": false, "type": "b", "major": 254, "minor": 16, "access": "w"},
    ]));
    let rules = rules(std::slice::from_ref(&node), &read_only).unwrap();
    assert!(allowed(&rules, Kind::Block, 254, 16, READ));
    assert!(!allowed(&rules, Kind::Block, 254, 16, READ | WRITE));
    assert!(!allowed(&rules, Kind::Block, 254, 0, READ)); // another disk
    let rules = super::rules(&[node], &[]).unwrap();
    assert!(allowed(&rules, Kind::Block, 254, 16, READ | WRITE));

    // A privileged container's rule opens everything; a deny-all in the
    // spec closes even the defaults.
    let all = oci(serde_json::json!([{"allow": true, "access": "rwm"}]));
    assert!(allowed(
        &super::rules(&[], &all).unwrap(),
        Kind::Block,
        8,
        0,
        RWM
    ));
    let none = oci(serde_json::json!([{"allow": false, "type": "a"}]));
    assert!(!allowed(
        &super::rules(&[], &none).unwrap(),
        Kind::Char,
        1,
        3,
        READ
    ));
    // Wildcards as -1 or absent.
    let any_minor = oci(
        serde_json::json!([{"allow": true, "type": "c", "major": 10, "minor": -1, "access": "r"}]),
    );
    let rules = super::rules(&[], &any_minor).unwrap();
    assert!(allowed(&rules, Kind::Char, 10, 237, READ));
    assert!(!allowed(&rules, Kind::Char, 10, 237, WRITE));
}

#[test]
fn malformed_rules_are_refused_by_field() {
    let bad = |json| invalid(rules(&[], &oci(json)));
    assert!(
        bad(serde_json::json!([{"allow": true, "type": "c", "major": 4096}]))
            .starts_with("linux.resources.devices[0].major: 4096 is out of range")
    );
    assert!(
        bad(serde_json::json!([{"allow": true}, {"allow": true, "minor": -2}]))
            .starts_with("linux.resources.devices[1].minor: -2")
    );
    assert!(
        bad(serde_json::json!([{"allow": true, "access": "rwx"}]))
            .starts_with("linux.resources.devices[0].access: \"rwx\"")
    );
    assert!(bad(serde_json::json!([{"allow": true, "type": "p"}])).contains("FIFO"));
    let node: LinuxDevice = serde_json::from_value(serde_json::json!(
        {"path": "/dev/x", "type": "c", "major": 1, "minor": 1048576}
    ))
    .unwrap();
    assert!(invalid(rules(&[node], &[])).starts_with("linux.devices[0].minor"));
}

#[test]
fn the_program_answers_as_the_rules_do() {
    let node: LinuxDevice = serde_json::from_value(serde_json::json!(
        {"path": "/dev/vdb", "type": "b", "major": 254, "minor": 16}
    ))
    .unwrap();
    let spec_rules = [
        serde_json::json!([]),
        serde_json::json!([{"allow": false, "type": "b", "major": 254, "minor": 16, "access": "w"}]),
        serde_json::json!([{"allow": true, "access": "rwm"}]),
        serde_json::json!([{"allow": false}, {"allow": true, "type": "c", "major": 1, "access": "r"}]),
    ];
    for spec in spec_rules {
        let rules = rules(std::slice::from_ref(&node), &oci(spec.clone())).unwrap();
        let code = program(&rules);
        for (kind, ctx_type) in [(Kind::Char, DEV_CHAR), (Kind::Block, DEV_BLOCK)] {
            for (major, minor) in [
                (1, 3),
                (1, 1),
                (5, 1),
                (136, 4),
                (254, 0),
                (254, 16),
                (10, 200),
            ] {
                for access in 1..=RWM {
                    let ctx = [access << 16 | ctx_type as u32, major, minor];
                    let want = allowed(&rules, kind, major, minor, access);
                    assert_eq!(
                        run_program(&code, ctx) == 1,
                        want,
                        "{spec} {kind:?} {major}:{minor} access {access}"
                    );
                }
            }
        }
    }
}

/// A cgroup2 directory to try programs in: below /sys/fs/cgroup where it
/// is cgroup2, else on a cgroup2 mounted for the test (a cgroup v1 host
/// such as CI's also has the unified hierarchy).
struct TestCgroups {
    root: tempfile::TempDir,
    mounted: bool,
    base: std::path::PathBuf,
}

impl TestCgroups {
    fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "loading device programs needs root: run the agent's unit tests as root"
        );
        let root = tempfile::tempdir().unwrap();
        let system = Path::new(super::super::ROOT);
        let (base, mounted) = if super::super::is_cgroup2(system) {
            (
                system.join(format!("frakti-devices-test-{}", std::process::id())),
                false,
            )
        } else {
            nix::mount::mount(
                Some("cgroup2"),
                root.path(),
                Some("cgroup2"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .expect("mount cgroup2 for the test");
            (
                root.path()
                    .join(format!("frakti-devices-test-{}", std::process::id())),
                true,
            )
        };
        std::fs::create_dir(&base).unwrap();
        Self {
            root,
            mounted,
            base,
        }
    }

    /// Runs `script` in a shell inside a new cgroup with `rules`; its
    /// exit status and stderr.
    fn run_in(&self, name: &str, rules: &[Rule], script: &str) -> (bool, String) {
        let dir = self.base.join(name);
        std::fs::create_dir(&dir).unwrap();
        attach(&dir, rules).unwrap();
        let procs = dir.join("cgroup.procs");
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("echo $$ > {} && {script}", procs.display()))
            .output()
            .unwrap();
        std::fs::remove_dir(&dir).unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.base);
        if self.mounted {
            let _ = nix::mount::umount(self.root.path());
        }
    }
}

#[test]
fn the_kernel_enforces_the_program() {
    // loop0 (block 7:0) stands for a disk, loop-control (char 10:237) for
    // a device no container gets by default.
    let cgroups = TestCgroups::new();
    let defaults = rules(&[], &[]).unwrap();
    let (ok, err) = cgroups.run_in(
        "defaults-null",
        &defaults,
        "head -c 1 /dev/zero > /dev/null",
    );
    assert!(ok, "/dev/zero and /dev/null are allowed: {err}");
    for (name, script) in [
        ("defaults-disk", "exec 3< /dev/loop0"),
        ("defaults-char", "exec 3< /dev/loop-control"),
    ] {
        let (ok, err) = cgroups.run_in(name, &defaults, script);
        assert!(!ok && err.contains("not permitted"), "{script}: {err}");
    }

    let node: LinuxDevice = serde_json::from_value(serde_json::json!(
        {"path": "/dev/loop0", "type": "b", "major": 7, "minor": 0}
    ))
    .unwrap();
    let own_disk = rules(std::slice::from_ref(&node), &[]).unwrap();
    let (ok, err) = cgroups.run_in("own-disk", &own_disk, "exec 3<> /dev/loop0");
    assert!(ok, "the container's own disk opens read-write: {err}");
    let (ok, err) = cgroups.run_in("other-disk", &own_disk, "exec 3< /dev/loop1");
    assert!(
        !ok && err.contains("not permitted"),
        "another disk does not: {err}"
    );
    let read_only = oci(serde_json::json!(
        [{"allow": false, "type": "b", "major": 7, "minor": 0, "access": "w"}]
    ));
    let read_only = rules(&[node], &read_only).unwrap();
    let (ok, err) = cgroups.run_in("read-only-disk", &read_only, "exec 3< /dev/loop0");
    assert!(ok, "a disk handed over read-only reads: {err}");
    let (ok, err) = cgroups.run_in("read-only-write", &read_only, "exec 3<> /dev/loop0");
    assert!(
        !ok && err.contains("not permitted"),
        "but does not write: {err}"
    );
}
