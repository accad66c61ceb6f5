//! The sandbox: hostname, DNS, sysctls, the shared PID namespace, copied
//! files and disks.

use super::*;

/// A pod container: no UTS/IPC namespace of its own (it shares the
/// guest's, i.e. the pod's, as the host builds them).
fn pod_spec(args: &[&str]) -> Value {
    let mut s = spec(args);
    s["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "mount"}]);
    s.as_object_mut().unwrap().remove("hostname");
    s
}

#[tokio::test]
async fn sandbox_hostname_dns_sysctls_and_shared_pid_namespace() {
    let mut agent = Agent::start().await;
    let state = agent.state_dir();
    let c = &mut agent.client;
    c.setup_sandbox(pb::SetupSandboxRequest {
        hostname: "pod-a".into(),
        resolv_conf: b"nameserver 10.96.0.10\nsearch default.svc.cluster.local\n".to_vec(),
        sysctls: [("kernel.msgmax".to_string(), "4242".to_string())].into(),
        shared_pid_namespace: true,
        resources_json: vec![],
    })
    .await
    .unwrap();
    let err = c
        .setup_sandbox(pb::SetupSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    run(c, "a", &pod_spec(&["sleep", "1000"])).await;
    let mut s = pod_spec(&[
        "sh",
        "-c",
        "hostname; cat /proc/sys/kernel/msgmax; cat /etc/resolv.conf; for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done",
    ]);
    s["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/etc/resolv.conf", "type": "bind",
        "source": state.join("sandbox/resolv.conf"), "options": ["rbind", "ro"]
    }));
    run(c, "b", &s).await;
    let out = read_all(c, "b", "", pb::OutputStream::Stdout).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "pod-a", "{out}");
    assert_eq!(lines[1], "4242", "{out}");
    assert_eq!(lines[2], "nameserver 10.96.0.10", "{out}");
    assert!(
        lines.iter().any(|l| l.trim() == "sleep 1000"),
        "b sees a's process in the shared PID namespace: {out}"
    );
    assert_eq!(wait(c, "b", "").await.exit_code, 0);
    // Removing one container of a shared namespace leaves the other alone.
    c.remove_container(pb::RemoveContainerRequest {
        container_id: "a".into(),
        grace_period_secs: 0,
    })
    .await
    .unwrap();
    let err = c
        .setup_sandbox(pb::SetupSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn bad_sandbox_settings_are_refused() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    for request in [
        pb::SetupSandboxRequest {
            hostname: "bad_host".into(),
            ..Default::default()
        },
        pb::SetupSandboxRequest {
            sysctls: [("../../etc/x".to_string(), "1".to_string())].into(),
            ..Default::default()
        },
        pb::SetupSandboxRequest {
            sysctls: [("kernel.no_such_sysctl".to_string(), "1".to_string())].into(),
            ..Default::default()
        },
    ] {
        let err = c.setup_sandbox(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
}

async fn copy_file(c: &mut Client, path: &str, data: &str, version: u64) -> pb::CopyFileResponse {
    c.copy_file(pb::CopyFileRequest {
        path: path.into(),
        kind: pb::FileKind::File as i32,
        data: data.as_bytes().to_vec(),
        mode: 0o640,
        uid: 1000,
        gid: 2000,
        version,
        in_place: false,
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn copied_files_reach_containers_and_stay_in_sync() {
    let mut agent = Agent::start().await;
    let state = agent.state_dir();
    let c = &mut agent.client;
    let first = copy_file(c, "configmap/settings", "v1\n", 1).await;
    assert!(first.written);
    assert_eq!(
        first.guest_path,
        state.join("files/configmap/settings").display().to_string()
    );
    let mut s = spec(&["sleep", "1000"]);
    s["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/etc/config", "type": "bind",
        "source": state.join("files/configmap"), "options": ["rbind", "ro"]
    }));
    run(c, "reader", &s).await;
    exec(
        c,
        "reader",
        "cat1",
        process(&[
            "sh",
            "-c",
            "cat /etc/config/settings; stat -c '%u %g %a' /etc/config/settings",
        ]),
    )
    .await
    .unwrap();
    assert_eq!(
        read_all(c, "reader", "cat1", pb::OutputStream::Stdout).await,
        "v1\n1000 2000 640\n"
    );
    // An older version is ignored; a newer one shows up in the container.
    assert!(
        !copy_file(c, "configmap/settings", "stale\n", 1)
            .await
            .written
    );
    assert!(copy_file(c, "configmap/settings", "v2\n", 2).await.written);
    exec(
        c,
        "reader",
        "cat2",
        process(&["cat", "/etc/config/settings"]),
    )
    .await
    .unwrap();
    assert_eq!(
        read_all(c, "reader", "cat2", pb::OutputStream::Stdout).await,
        "v2\n"
    );
    c.remove_file(pb::RemoveFileRequest {
        path: "configmap/settings".into(),
    })
    .await
    .unwrap();
    exec(c, "reader", "ls", process(&["ls", "/etc/config"]))
        .await
        .unwrap();
    assert_eq!(
        read_all(c, "reader", "ls", pb::OutputStream::Stdout).await,
        ""
    );
    let err = c
        .copy_file(pb::CopyFileRequest {
            path: "../escape".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c
        .remove_file(pb::RemoveFileRequest {
            path: "nothing/here".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn file_binds_see_in_place_copies_and_writes_read_back() {
    let mut agent = Agent::start().await;
    let state = agent.state_dir();
    let c = &mut agent.client;
    copy_file(c, "containers/w/0", "host v1\n", 0).await;
    copy_file(c, "containers/w/1", "", 0).await;
    let mut s = spec(&[
        "sh",
        "-c",
        "echo 'it ended badly' > /dev/termination-log; sleep 1000",
    ]);
    let mounts = s["mounts"].as_array_mut().unwrap();
    mounts.push(json!({
        "destination": "/etc/hosts", "type": "bind",
        "source": state.join("files/containers/w/0"), "options": ["rbind", "ro"]
    }));
    mounts.push(json!({
        "destination": "/dev/termination-log", "type": "bind",
        "source": state.join("files/containers/w/1"), "options": ["rbind", "rw"]
    }));
    run(c, "writer", &s).await;
    // A file bind follows an in-place copy.
    c.copy_file(pb::CopyFileRequest {
        path: "containers/w/0".into(),
        kind: pb::FileKind::File as i32,
        data: b"host v2\n".to_vec(),
        mode: 0o644,
        in_place: true,
        ..Default::default()
    })
    .await
    .unwrap();
    exec(c, "writer", "cat", process(&["cat", "/etc/hosts"]))
        .await
        .unwrap();
    assert_eq!(
        read_all(c, "writer", "cat", pb::OutputStream::Stdout).await,
        "host v2\n"
    );
    // What the container wrote comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let read = c
            .read_file(pb::ReadFileRequest {
                path: "containers/w/1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if !read.data.is_empty() {
            assert_eq!(read.data, b"it ended badly\n");
            assert!(!read.truncated);
            break;
        }
        assert!(Instant::now() < deadline, "the container wrote nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = c
        .read_file(pb::ReadFileRequest {
            path: "containers/w/2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c
        .read_file(pb::ReadFileRequest {
            path: "../etc/passwd".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test]
async fn disks_that_do_not_exist_are_not_found() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    let err = c
        .mount_disk(pb::MountDiskRequest {
            disk_id: "image0".into(),
            serial: "frakti-no-such-disk".into(),
            fs_type: "ext4".into(),
            read_only: true,
            timeout_ms: 50,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("frakti-no-such-disk"), "{err:?}");
    let err = c
        .unmount_disk(pb::UnmountDiskRequest {
            disk_id: "image0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A rootfs on a disk that was never mounted.
    let err = c
        .create_container(pb::CreateContainerRequest {
            container_id: "c".into(),
            oci_spec_json: serde_json::to_vec(&spec(&["true"])).unwrap(),
            rootfs: Some(pb::Rootfs {
                source: Some(pb::rootfs::Source::DiskId("image0".into())),
                ..Default::default()
            }),
            devices: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn sandbox_stats_list_interfaces() {
    let mut agent = Agent::start().await;
    let stats = agent
        .client
        .stats_sandbox(pb::StatsSandboxRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(stats.mem_total_bytes > 0);
    assert!(stats.mem_available_bytes <= stats.mem_total_bytes);
    assert!(stats.interfaces.iter().all(|i| i.name != "lo"));
}
