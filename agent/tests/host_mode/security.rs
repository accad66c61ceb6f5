//! Seccomp profiles and hostile images.

use super::*;

fn with_seccomp(mut spec: Value, profile: Value) -> Value {
    spec["linux"]["seccomp"] = profile;
    spec
}

#[tokio::test]
async fn seccomp_profiles_apply_to_init_and_exec() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    // With no_new_privs the filter goes on right before execve.
    let deny_mkdir = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let s = with_seccomp(
        spec(&[
            "sh",
            "-c",
            "mkdir /tmp/a 2>&1; echo rc=$?; touch /tmp/b && echo touched; sleep 1000",
        ]),
        deny_mkdir,
    );
    run(c, "filtered", &s).await;
    let mut out = c
        .read_output(tokio_stream::once(pb::ReadOutputRequest {
            container_id: "filtered".into(),
            exec_id: String::new(),
            stream: pb::OutputStream::Stdout as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let text = read_until(&mut out, "touched").await;
    assert!(text.contains("Operation not permitted"), "{text}");
    assert!(text.contains("rc=1"), "{text}");
    // A process exec'd into the container gets the container's profile.
    exec(c, "filtered", "mk", process(&["mkdir", "/tmp/c"]))
        .await
        .unwrap();
    assert_eq!(wait(c, "filtered", "mk").await.exit_code, 1);
    exec(c, "filtered", "ok", process(&["touch", "/tmp/d"]))
        .await
        .unwrap();
    assert_eq!(wait(c, "filtered", "ok").await.exit_code, 0);

    // Without no_new_privs the filter goes on before the change of user.
    let kill_mkdir = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_KILL_PROCESS"}]
    });
    let mut s = with_seccomp(spec(&["mkdir", "/tmp/a"]), kill_mkdir);
    s["process"]["noNewPrivileges"] = json!(false);
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000});
    run(c, "killed", &s).await;
    let status = wait(c, "killed", "").await;
    assert_eq!(
        (status.signal, status.exit_code),
        (libc::SIGSYS, 128 + libc::SIGSYS),
        "{status:?}"
    );
}

#[tokio::test]
async fn bad_seccomp_profiles_are_refused() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    for (name, profile, expected) in [
        (
            "notify",
            json!({"defaultAction": "SCMP_ACT_NOTIFY"}),
            "SCMP_ACT_NOTIFY",
        ),
        (
            "badarg",
            json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"],
                   "action": "SCMP_ACT_ERRNO", "args": [{"index": 9, "value": 0, "op": "SCMP_CMP_EQ"}]}]}),
            "argument 9",
        ),
        (
            "badaction",
            json!({"defaultAction": "SCMP_ACT_EXPLODE"}),
            "malformed OCI spec",
        ),
    ] {
        let err = create(c, name, &with_seccomp(spec(&["true"]), profile))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(expected), "{err:?}");
    }
    run(c, "fine", &spec(&["true"])).await;
    assert_eq!(wait(c, "fine", "").await.exit_code, 0);
}

/// A hostile image: /etc and a mount target are symlinks that point out of
/// the root (through '..' and absolute paths). Mounts and nodes land inside
/// the container's root; nothing outside it is touched.
#[tokio::test]
async fn symlinks_in_the_image_do_not_lead_out_of_the_root() {
    let mut agent = Agent::start().await;
    let image = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let r = image.path();
    std::fs::create_dir_all(r.join("bin")).unwrap();
    std::fs::create_dir_all(r.join("proc")).unwrap();
    std::fs::copy(busybox_rootfs().join("bin/busybox"), r.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(applet)).unwrap();
    }
    let escape = |name: &str| format!("/../../../..{}/{name}", outside.path().display());
    std::fs::create_dir_all(outside.path().join("etc")).unwrap();
    std::fs::create_dir_all(outside.path().join("data")).unwrap();
    std::os::unix::fs::symlink(escape("etc"), r.join("etc")).unwrap();
    std::os::unix::fs::symlink(escape("data"), r.join("data")).unwrap();
    std::os::unix::fs::symlink("/../../..", r.join("devlink")).unwrap();
    let hosts = agent.dir.path().join("hosts-file");
    std::fs::write(&hosts, "10.0.0.1 pod\n").unwrap();

    let mut spec = spec(&[
        "sh",
        "-c",
        "cat /etc/hosts && ls /data/cache && ls /nodes/disk",
    ]);
    let mounts = spec["mounts"].as_array_mut().unwrap();
    mounts.retain(|m| m["destination"] == "/proc" || m["destination"] == "/dev");
    mounts.push(json!({"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "ro"]}));
    mounts.push(json!({"destination": "/data/cache", "type": "tmpfs", "source": "tmpfs"}));
    spec["linux"]["devices"] =
        json!([{"path": "/devlink/nodes/disk", "type": "c", "major": 1, "minor": 3}]);
    let c = &mut agent.client;
    c.create_container(pb::CreateContainerRequest {
        container_id: "hostile".into(),
        oci_spec_json: serde_json::to_vec(&spec).unwrap(),
        rootfs: Some(pb::Rootfs {
            source: Some(pb::rootfs::Source::GuestPath(r.display().to_string())),
            ..Default::default()
        }),
        devices: vec![],
    })
    .await
    .unwrap();
    start(c, "hostile").await.unwrap();
    let out = read_all(c, "hostile", "", pb::OutputStream::Stdout).await;
    let status = wait(c, "hostile", "").await;
    assert_eq!(status.exit_code, 0, "{out}");
    assert!(out.starts_with("10.0.0.1 pod\n"), "{out}");
    assert!(out.contains("/nodes/disk"), "{out}");

    let listing = |dir: &Path| -> Vec<String> {
        walk(dir)
            .into_iter()
            .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
            .collect()
    };
    assert_eq!(
        listing(outside.path()),
        ["data", "etc"],
        "outside the root, only what was there"
    );
    let inside = r.join(outside.path().strip_prefix("/").unwrap());
    assert!(
        inside.join("etc/hosts").is_file(),
        "the mount point is in the root"
    );
    assert!(inside.join("data/cache").is_dir());
    assert!(r.join("nodes/disk").exists(), "the node is in the root");
}

/// Every path below `dir`, sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            all.extend(walk(&path));
        }
        all.push(path);
    }
    all.sort();
    all
}
