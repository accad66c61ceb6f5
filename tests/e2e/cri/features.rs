//! Logs (long lines, rotation), live resource updates, OOM kills, events,
//! emptyDir volumes, stats, and bad requests — one pod VM for all.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_cri::v1 as cri;
use libtest_mimic::Trial;
use tokio_stream::StreamExt;

use super::harness::*;

pub fn tests() -> Vec<Trial> {
    vec![
        Trial::test("cri::logs_resources_events_and_volumes", || {
            with_daemon(&[], features)
        }),
        Trial::test("cri::bad_requests_get_the_right_codes", || {
            with_daemon(&[], bad_requests)
        }),
    ]
}

/// CRI log records of `path`: (stream, tag, content).
fn records(path: &std::path::Path) -> anyhow::Result<Vec<(String, String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    text.lines()
        .map(|line| {
            let mut parts = line.splitn(4, ' ');
            let (_time, stream, tag) = (parts.next(), parts.next(), parts.next());
            let content = parts.next().unwrap_or("");
            match (stream, tag) {
                (Some(s), Some(t)) => Ok((s.to_string(), t.to_string(), content.to_string())),
                _ => anyhow::bail!("malformed CRI log line {line:?}"),
            }
        })
        .collect()
}

async fn features(daemon: &mut Daemon) -> anyhow::Result<()> {
    let mut c = daemon.runtime().await?;
    // Events from the start: kubelet's evented PLEG.
    let mut events = c
        .get_container_events(cri::GetEventsRequest {})
        .await?
        .into_inner();
    let mut config = pod_config("features", &daemon.log_dir());
    config.annotations = [("io.frakti.vm.memory".to_string(), "512".to_string())].into();
    let pod = run_pod(&mut c, config).await?;

    // A 128 KiB line: cut at 16 KiB into P records and a final F.
    let long = create(
        &mut c,
        &pod,
        container_config(
            "long",
            &[
                "sh",
                "-c",
                "s=a; i=0; while [ $i -lt 17 ]; do s=$s$s; i=$((i+1)); done; echo $s; echo after",
            ],
        ),
    )
    .await?;
    start(&mut c, &long).await?;
    wait_exited(&mut c, &long, Duration::from_secs(30)).await?;
    let log = daemon.log_dir().join("long.log");
    wait_for_text(&log, " stdout F after\n", Duration::from_secs(10)).await?;
    let recs = records(&log)?;
    let partial = recs.iter().filter(|(_, tag, _)| tag == "P").count();
    let line: String = recs
        .iter()
        .take_while(|(_, _, content)| content != "after")
        .map(|(_, _, content)| content.as_str())
        .collect();
    ensure!(
        line.len() == 131072 && line.bytes().all(|b| b == b'a'),
        "line of {} bytes",
        line.len()
    );
    ensure!(
        partial == 7 && recs.iter().all(|(_, _, c)| c.len() <= 16384),
        "{partial} P records"
    );

    // ReopenContainerLog: kubelet renames the file, the runtime reopens.
    let ticker = run_container(
        &mut c,
        &pod,
        "ticker",
        &[
            "sh",
            "-c",
            "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.2; done",
        ],
    )
    .await?;
    let log = daemon.log_dir().join("ticker.log");
    wait_for_text(&log, "line 3\n", Duration::from_secs(20)).await?;
    let rotated = daemon.log_dir().join("ticker.log.1");
    std::fs::rename(&log, &rotated)?;
    c.reopen_container_log(cri::ReopenContainerLogRequest {
        container_id: ticker.clone(),
    })
    .await?;
    let fresh = wait_for_text(&log, "line", Duration::from_secs(10)).await?;
    let old = std::fs::read_to_string(&rotated)?;
    let last_old: u64 = old
        .lines()
        .last()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .context("old log")?;
    let first_new: u64 = fresh
        .lines()
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .context("new log")?;
    ensure!(
        first_new == last_old + 1,
        "lost lines across the rotation: {last_old} then {first_new}"
    );

    // UpdateContainerResources lands in the container's cgroup.
    c.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: ticker.clone(),
        linux: Some(cri::LinuxContainerResources {
            cpu_period: 100_000,
            cpu_quota: 50_000,
            memory_limit_in_bytes: 100 << 20,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    let out = exec(
        &mut c,
        &ticker,
        &["cat", "/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/memory.max"],
        10,
    )
    .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("50000 100000") && text.contains(&(100u64 << 20).to_string()),
        "cgroup: {text} (stderr: {})",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = status(&mut c, &ticker).await?;
    let memory = status
        .resources
        .and_then(|r| r.linux)
        .map(|l| l.memory_limit_in_bytes);
    ensure!(memory == Some(100 << 20), "status resources {memory:?}");
    // Beyond the VM: refused, naming both sizes.
    let too_big = c
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: ticker.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 4 << 30,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    let err = too_big.err().context("a 4 GiB limit in a 512 MiB VM")?;
    ensure!(
        err.code() == tonic::Code::FailedPrecondition && err.message().contains("512 MiB"),
        "{err:?}"
    );

    // Stats are non-zero and plausible.
    let stats = c
        .list_container_stats(cri::ListContainerStatsRequest {
            filter: Some(cri::ContainerStatsFilter {
                id: ticker.clone(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .stats;
    let cpu = stats
        .first()
        .and_then(|s| s.cpu.as_ref())
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map(|v| v.value);
    ensure!(cpu.is_some_and(|ns| ns > 0), "cpu {cpu:?}");
    let pod_stats = c
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?
        .into_inner()
        .stats
        .and_then(|s| s.linux)
        .context("no pod stats")?;
    let working_set = pod_stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value);
    ensure!(
        working_set.is_some_and(|b| b > 1 << 20 && b < 512 << 20),
        "pod memory {working_set:?}"
    );
    ensure!(
        pod_stats.containers.len() == 2,
        "{} container stats",
        pod_stats.containers.len()
    );

    // The OOM killer: exit 137, reason OOMKilled.
    let mut hog = container_config("hog", &["sh", "-c", "s=a; while true; do s=$s$s; done"]);
    hog.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 32 << 20,
            ..Default::default()
        }),
        security_context: None,
    });
    let hog = create(&mut c, &pod, hog).await?;
    start(&mut c, &hog).await?;
    let st = wait_exited(&mut c, &hog, Duration::from_secs(60)).await?;
    ensure!(st.reason == "OOMKilled" && st.exit_code == 137, "{st:?}");

    // An emptyDir is shared by the pod's containers.
    let volume = daemon
        .dir
        .path()
        .join("kubelet/pods/uid-features/volumes/kubernetes.io~empty-dir/shared");
    // As kubelet does before it creates the containers.
    std::fs::create_dir_all(&volume)?;
    let mount = cri::Mount {
        container_path: "/shared".into(),
        host_path: volume.to_string_lossy().into_owned(),
        ..Default::default()
    };
    let mut writer = container_config(
        "writer",
        &["sh", "-c", "echo from-writer > /shared/note; sleep 1000"],
    );
    writer.mounts = vec![mount.clone()];
    let writer = create(&mut c, &pod, writer).await?;
    start(&mut c, &writer).await?;
    let mut reader = container_config("reader", &["sleep", "1000"]);
    reader.mounts = vec![mount];
    let reader = create(&mut c, &pod, reader).await?;
    start(&mut c, &reader).await?;
    let mut seen = String::new();
    for _ in 0..50 {
        let out = exec(&mut c, &reader, &["cat", "/shared/note"], 10).await?;
        seen = String::from_utf8_lossy(&out.stdout).into_owned();
        if seen == "from-writer\n" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(seen == "from-writer\n", "the reader sees {seen:?}");
    // On a disk of its own (ext4), not in guest memory.
    let mounts = exec(&mut c, &reader, &["cat", "/proc/self/mounts"], 10).await?;
    let mounts = String::from_utf8_lossy(&mounts.stdout);
    ensure!(
        mounts.contains(" /shared ext4 "),
        "the emptyDir is not on a disk: {mounts}"
    );
    // Its usage shows where kubelet measures it: the blocks its disk file
    // takes in the volume's directory on the node.
    let disk = volume.join(".frakti-emptydir.ext4");
    let used = |disk: &std::path::Path| -> anyhow::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata(disk)?.blocks() * 512)
    };
    let before = used(&disk)?;
    let fill = exec(
        &mut c,
        &reader,
        &[
            "sh",
            "-c",
            "head -c 20971520 /dev/zero > /shared/big && busybox sync",
        ],
        60,
    )
    .await?;
    ensure!(fill.exit_code == 0, "filling the emptyDir: {fill:?}");
    let after = used(&disk)?;
    ensure!(
        after >= before + (20 << 20),
        "the emptyDir's disk grew from {before} to {after} bytes for 20 MiB written"
    );
    eprintln!(
        "cri: emptyDir usage seen on the node: {:.1} MiB before, {:.1} MiB after 20 MiB written",
        before as f64 / f64::from(1 << 20),
        after as f64 / f64::from(1 << 20)
    );

    // A configmap-like volume follows kubelet's `..data` swap within 2 s,
    // and a termination message comes back to the host at exit.
    configmap_and_termination_message(daemon, &mut c, &pod).await?;

    // run_as_username resolves in the image's /etc/passwd; RuntimeDefault
    // seccomp is a filter (mode 2), Unconfined none.
    let mut user = container_config("user", &["sh", "-c", "id -u; id -g; cat /proc/self/status"]);
    let profile = |kind: cri::security_profile::ProfileType| cri::SecurityProfile {
        profile_type: kind as i32,
        localhost_ref: String::new(),
    };
    user.linux = Some(cri::LinuxContainerConfig {
        resources: None,
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_username: "frakti".into(),
            seccomp: Some(profile(cri::security_profile::ProfileType::RuntimeDefault)),
            ..Default::default()
        }),
    });
    let user = create(&mut c, &pod, user).await?;
    start(&mut c, &user).await?;
    wait_exited(&mut c, &user, Duration::from_secs(30)).await?;
    let out = records(&daemon.log_dir().join("user.log"))?;
    let lines: Vec<&str> = out.iter().map(|(_, _, content)| content.as_str()).collect();
    ensure!(lines.first() == Some(&"1000"), "uid: {lines:?}");
    ensure!(
        lines
            .iter()
            .any(|l| l.starts_with("Seccomp:") && l.ends_with('2')),
        "no seccomp filter: {lines:?}"
    );

    // A mount with a relative container path is a malformed request.
    let mut bad = container_config("bad", &["true"]);
    bad.mounts = vec![cri::Mount {
        container_path: "relative".into(),
        host_path: "/tmp".into(),
        ..Default::default()
    }];
    let (code, message) = code_of(create(&mut c, &pod, bad).await);
    ensure!(
        code == tonic::Code::InvalidArgument && message.contains("relative"),
        "{code:?} {message}"
    );

    // Events, in order, for the container that ran to the end.
    c.remove_container(cri::RemoveContainerRequest {
        container_id: long.clone(),
    })
    .await?;
    let mut kinds: Vec<i32> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while kinds.len() < 4 {
        let next = tokio::time::timeout_at(deadline, events.next()).await;
        let Ok(Some(event)) = next else { break };
        let event = event?;
        if event.container_id == long {
            ensure!(
                event.pod_sandbox_status.is_some(),
                "an event without the pod's status"
            );
            kinds.push(event.container_event_type);
        }
    }
    let expected: Vec<i32> = [
        cri::ContainerEventType::ContainerCreatedEvent,
        cri::ContainerEventType::ContainerStartedEvent,
        cri::ContainerEventType::ContainerStoppedEvent,
        cri::ContainerEventType::ContainerDeletedEvent,
    ]
    .iter()
    .map(|k| *k as i32)
    .collect();
    ensure!(kinds == expected, "events {kinds:?}");

    remove_pod_without_leaks(daemon, &mut c, &pod).await?;
    Ok(())
}

/// Writes kubelet's atomic-writer layout: `..<version>/key`, `..data`
/// pointing at it, `key -> ..data/key`; a later version swaps `..data`.
fn write_configmap(dir: &std::path::Path, version: u32, value: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::symlink;
    let versioned = format!("..v{version}");
    std::fs::create_dir_all(dir.join(&versioned))?;
    std::fs::write(dir.join(&versioned).join("key"), value)?;
    symlink(&versioned, dir.join("..data_tmp"))?;
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
    if !dir.join("key").exists() {
        symlink("..data/key", dir.join("key"))?;
    }
    if version > 1 {
        std::fs::remove_dir_all(dir.join(format!("..v{}", version - 1)))?;
    }
    Ok(())
}

async fn configmap_and_termination_message(
    daemon: &Daemon,
    c: &mut Runtime,
    pod: &str,
) -> anyhow::Result<()> {
    let volume = daemon
        .dir
        .path()
        .join("kubelet/pods/uid-features/volumes/kubernetes.io~configmap/cm");
    write_configmap(&volume, 1, "v1")?;
    let mut config = container_config("cm", &["sleep", "1000"]);
    config.mounts = vec![cri::Mount {
        container_path: "/config".into(),
        host_path: volume.to_string_lossy().into_owned(),
        readonly: true,
        ..Default::default()
    }];
    let cm = create(c, pod, config).await?;
    start(c, &cm).await?;
    let out = exec(c, &cm, &["cat", "/config/key"], 10).await?;
    ensure!(
        out.stdout == b"v1",
        "before the swap: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let write = exec(c, &cm, &["sh", "-c", "echo x > /config/key"], 10).await?;
    ensure!(write.exit_code != 0, "a read-only configmap was writable");
    write_configmap(&volume, 2, "v2")?;
    let swapped = std::time::Instant::now();
    loop {
        let out = exec(c, &cm, &["cat", "/config/key"], 10).await?;
        if out.stdout == b"v2" {
            break;
        }
        ensure!(
            swapped.elapsed() < Duration::from_secs(2),
            "after {:?} the container still reads {:?}",
            swapped.elapsed(),
            String::from_utf8_lossy(&out.stdout)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "cri: the configmap change was seen after {:.2} s",
        swapped.elapsed().as_secs_f64()
    );

    let message = daemon
        .dir
        .path()
        .join("kubelet/pods/uid-features/containers/msg/termination-log");
    std::fs::create_dir_all(message.parent().context("no parent")?)?;
    std::fs::write(&message, "")?;
    // The host file was written just now (as kubelet does) and the
    // container lives on for two sync polls after writing: the sync must
    // not send the host's empty file over what the container wrote.
    let mut config = container_config(
        "msg",
        &["sh", "-c", "echo goodbye > /dev/termination-log; sleep 1"],
    );
    config.mounts = vec![cri::Mount {
        container_path: "/dev/termination-log".into(),
        host_path: message.to_string_lossy().into_owned(),
        ..Default::default()
    }];
    let msg = create(c, pod, config).await?;
    start(c, &msg).await?;
    wait_exited(c, &msg, Duration::from_secs(30)).await?;
    let text = std::fs::read_to_string(&message)?;
    ensure!(
        text == "goodbye\n",
        "the termination message on the host: {text:?}"
    );
    Ok(())
}

async fn bad_requests(daemon: &mut Daemon) -> anyhow::Result<()> {
    let mut c = daemon.runtime().await?;
    let unknown = "f".repeat(64);
    let status = c
        .container_status(cri::ContainerStatusRequest {
            container_id: unknown.clone(),
            verbose: false,
        })
        .await;
    ensure!(code(status) == tonic::Code::NotFound);
    let pod = c
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: unknown.clone(),
            verbose: false,
        })
        .await;
    ensure!(code(pod) == tonic::Code::NotFound);
    let exec = c
        .exec_sync(cri::ExecSyncRequest {
            container_id: unknown.clone(),
            cmd: vec!["true".into()],
            timeout: 0,
        })
        .await;
    ensure!(code(exec) == tonic::Code::NotFound);
    let (code_create, _) =
        code_of(create(&mut c, &unknown, container_config("x", &["true"])).await);
    ensure!(code_create == tonic::Code::NotFound, "{code_create:?}");
    let update = c
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: unknown.clone(),
            linux: Some(cri::LinuxContainerResources::default()),
            ..Default::default()
        })
        .await;
    ensure!(code(update) == tonic::Code::NotFound);
    // Idempotent on unknown ids.
    c.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: unknown.clone(),
    })
    .await?;
    c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: unknown.clone(),
    })
    .await?;
    c.stop_container(cri::StopContainerRequest {
        container_id: unknown.clone(),
        timeout: 1,
    })
    .await?;
    // Malformed: named fields.
    let mut nameless = pod_config("x", &daemon.log_dir());
    nameless.metadata = Some(cri::PodSandboxMetadata::default());
    let run = c
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(nameless),
            runtime_handler: String::new(),
        })
        .await;
    let err = run.err().context("a pod without a name")?;
    ensure!(
        err.code() == tonic::Code::InvalidArgument && err.message().contains("metadata.name"),
        "{err:?}"
    );
    let mut bad_annotation = pod_config("y", &daemon.log_dir());
    bad_annotation.annotations =
        HashMap::from([("io.frakti.vm.cpus".to_string(), "lots".to_string())]);
    let run = c
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(bad_annotation),
            runtime_handler: String::new(),
        })
        .await;
    let err = run.err().context("a pod with a bad cpus annotation")?;
    ensure!(
        err.code() == tonic::Code::InvalidArgument && err.message().contains("io.frakti.vm.cpus"),
        "{err:?}"
    );
    let empty = c
        .run_pod_sandbox(cri::RunPodSandboxRequest::default())
        .await;
    ensure!(code(empty) == tonic::Code::InvalidArgument);
    ensure_no_leaks(daemon)?;
    Ok(())
}
