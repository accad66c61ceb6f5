//! Pods and containers through the CRI, as kubelet drives them.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_cri::v1 as cri;
use libtest_mimic::Trial;

use super::harness::*;

pub fn tests() -> Vec<Trial> {
    vec![
        Trial::test("cri::pod_and_container_lifecycle", || {
            with_daemon(&[], lifecycle)
        }),
        Trial::test("cri::a_killed_vmm_makes_the_pod_notready", || {
            with_daemon(&[], vm_death)
        }),
    ]
}

async fn lifecycle(daemon: &mut Daemon) -> anyhow::Result<()> {
    let mut c = daemon.runtime().await?;
    let version = c
        .version(cri::VersionRequest::default())
        .await?
        .into_inner();
    ensure!(
        version.runtime_name == "frakti" && version.runtime_api_version == "v1",
        "{version:?}"
    );

    let config = pod_config("web", &daemon.log_dir());
    let pod = run_pod(&mut c, config.clone()).await?;
    let pod_st = pod_status(&mut c, &pod, true).await?;
    let state = pod_st.status.as_ref().map(|s| s.state);
    ensure!(
        state == Some(cri::PodSandboxState::SandboxReady as i32),
        "{pod_st:?}"
    );
    ensure!(
        pod_st.info.contains_key("info"),
        "verbose info missing: {pod_st:?}"
    );

    // The guest reserve (kernel + agent, docs/runtime.md): what an idle 128 MiB
    // guest does not leave available must fit in the 64 MiB the sizing
    // rule adds.
    let stats = c
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?
        .into_inner();
    let memory = stats
        .stats
        .and_then(|s| s.linux)
        .and_then(|l| l.memory)
        .context("no pod memory")?;
    let available = memory
        .available_bytes
        .map(|v| v.value)
        .context("no available bytes")?;
    let used = memory
        .working_set_bytes
        .map(|v| v.value)
        .context("no working set")?;
    let reserve_mib = (128u64 << 20).saturating_sub(available) >> 20;
    eprintln!(
        "cri: idle 128 MiB guest: {} MiB used, {} MiB not available to containers (guest reserve 64 MiB)",
        used >> 20,
        reserve_mib
    );
    ensure!(
        reserve_mib <= 64,
        "the guest takes {reserve_mib} MiB, more than its 64 MiB reserve"
    );

    // The name is kubelet's until the pod is removed.
    let again = c
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await;
    ensure!(
        code(again) == tonic::Code::AlreadyExists,
        "a second pod with the same name"
    );

    // List filters: id, state, labels.
    let list = |filter: cri::PodSandboxFilter| cri::ListPodSandboxRequest {
        filter: Some(filter),
    };
    let by_label = c
        .list_pod_sandbox(list(cri::PodSandboxFilter {
            label_selector: [("app".to_string(), "web".to_string())].into(),
            ..Default::default()
        }))
        .await?
        .into_inner()
        .items;
    ensure!(by_label.len() == 1 && by_label[0].id == pod, "{by_label:?}");
    let not_ready = c
        .list_pod_sandbox(list(cri::PodSandboxFilter {
            state: Some(cri::PodSandboxStateValue {
                state: cri::PodSandboxState::SandboxNotready as i32,
            }),
            ..Default::default()
        }))
        .await?
        .into_inner()
        .items;
    ensure!(not_ready.is_empty(), "{not_ready:?}");

    // A long-running container writing to both streams.
    let cid = create(
        &mut c,
        &pod,
        container_config(
            "main",
            &[
                "sh",
                "-c",
                "trap '' TERM; echo hello; echo oops >&2; exec sleep 1000",
            ],
        ),
    )
    .await?;
    ensure!(status(&mut c, &cid).await?.state == cri::ContainerState::ContainerCreated as i32);
    start(&mut c, &cid).await?;
    let st = status(&mut c, &cid).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerRunning as i32,
        "{st:?}"
    );
    ensure!(
        st.started_at >= st.created_at && st.created_at > 0,
        "{st:?}"
    );
    ensure!(
        st.image_ref.contains("sha256:"),
        "image_ref {:?}",
        st.image_ref
    );
    let log_path = daemon.log_dir().join("main.log");
    let log = wait_for_text(&log_path, " stdout F hello\n", Duration::from_secs(20)).await?;
    wait_for_text(&log_path, " stderr F oops\n", Duration::from_secs(20)).await?;
    ensure!(
        log.starts_with("20"),
        "CRI log lines start with an RFC 3339 time: {log:?}"
    );

    // ExecSync: output, exit code, and the pod's DNS and hostname.
    let out = exec(
        &mut c,
        &cid,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        10,
    )
    .await?;
    ensure!(
        out.stdout == b"out\n" && out.stderr == b"err\n" && out.exit_code == 3,
        "{out:?}"
    );
    let out = exec(
        &mut c,
        &cid,
        &["cat", "/etc/resolv.conf", "/etc/hostname"],
        10,
    )
    .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("nameserver 10.96.0.10") && text.contains("web"),
        "{text}"
    );
    // A timeout kills the command: the RPC says so and it is gone after.
    let started = Instant::now();
    let timed_out = exec(&mut c, &cid, &["sleep", "77"], 1).await;
    ensure!(
        code(timed_out) == tonic::Code::DeadlineExceeded,
        "ExecSync past its timeout"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(15),
        "the timeout took {:?}",
        started.elapsed()
    );
    let ps = exec(
        &mut c,
        &cid,
        &["sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"],
        10,
    )
    .await?;
    ensure!(
        !String::from_utf8_lossy(&ps.stdout).contains("sleep 77"),
        "the timed-out exec still runs"
    );
    // A background child holding the output pipe does not hold the RPC.
    let started = Instant::now();
    let out = exec(&mut c, &cid, &["sh", "-c", "sleep 60 & echo started"], 0).await?;
    ensure!(out.stdout == b"started\n", "{out:?}");
    ensure!(
        started.elapsed() < Duration::from_secs(15),
        "ExecSync waited {:?} for a background child",
        started.elapsed()
    );

    // Exit codes and reasons.
    let failing = run_container(&mut c, &pod, "fails", &["sh", "-c", "exit 7"]).await?;
    let st = wait_exited(&mut c, &failing, Duration::from_secs(30)).await?;
    ensure!(
        st.exit_code == 7 && st.reason == "Error" && st.finished_at >= st.started_at,
        "{st:?}"
    );
    let done = run_container(&mut c, &pod, "done", &["true"]).await?;
    let st = wait_exited(&mut c, &done, Duration::from_secs(30)).await?;
    ensure!(st.exit_code == 0 && st.reason == "Completed", "{st:?}");
    // A name in use, and starting twice.
    let dup = create(&mut c, &pod, container_config("done", &["true"])).await;
    ensure!(
        code_of(dup).0 == tonic::Code::AlreadyExists,
        "two containers named done"
    );
    let twice = start(&mut c, &done).await;
    ensure!(twice.is_err(), "started an exited container");

    // List filters.
    let running = c
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers;
    ensure!(running.len() == 1 && running[0].id == cid, "{running:?}");

    // Stats of a running container are plausible.
    let stats = c
        .container_stats(cri::ContainerStatsRequest {
            container_id: cid.clone(),
        })
        .await?
        .into_inner()
        .stats
        .context("no stats")?;
    let memory = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value);
    ensure!(
        memory.is_some_and(|m| m > 0 && m < 512 << 20),
        "memory {memory:?}"
    );

    // StopContainer: `sleep` ignores SIGTERM (trap '' TERM), so SIGKILL
    // follows once the timeout has passed.
    let started = Instant::now();
    c.stop_container(cri::StopContainerRequest {
        container_id: cid.clone(),
        timeout: 2,
    })
    .await?;
    let waited = started.elapsed();
    let st = status(&mut c, &cid).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerExited as i32 && st.exit_code == 137,
        "{st:?}"
    );
    ensure!(
        waited >= Duration::from_secs(2),
        "SIGKILL came after {waited:?}"
    );
    // Idempotent: stop and remove twice, unknown ids too.
    c.stop_container(cri::StopContainerRequest {
        container_id: cid.clone(),
        timeout: 0,
    })
    .await?;
    for id in [&cid, &cid, &"0".repeat(64)] {
        c.remove_container(cri::RemoveContainerRequest {
            container_id: id.to_string(),
        })
        .await?;
    }
    ensure!(
        code_of(status(&mut c, &cid).await).0 == tonic::Code::NotFound,
        "a removed container"
    );
    let malformed = c
        .start_container(cri::StartContainerRequest::default())
        .await;
    ensure!(
        code(malformed) == tonic::Code::InvalidArgument,
        "an empty id"
    );

    // An image pulled through a registry.k8s.io mirror (on the host, by
    // harness::prepare) runs by its original name.
    let mut mirrored = container_config("mirrored", &["sh", "-c", "echo from the mirror"]);
    mirrored.image = Some(cri::ImageSpec {
        image: MIRRORED_IMAGE.into(),
        ..Default::default()
    });
    let mid = create(&mut c, &pod, mirrored).await?;
    start(&mut c, &mid).await?;
    let st = wait_exited(&mut c, &mid, Duration::from_secs(30)).await?;
    ensure!(
        st.exit_code == 0 && st.image.as_ref().map(|i| i.image.as_str()) == Some(MIRRORED_IMAGE),
        "{st:?}"
    );
    let log_path = daemon.log_dir().join("mirrored.log");
    wait_for_text(
        &log_path,
        " stdout F from the mirror\n",
        Duration::from_secs(20),
    )
    .await?;

    // The pod: stop (twice), remove (twice), then it is unknown.
    for _ in 0..2 {
        c.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?;
    }
    let st = pod_status(&mut c, &pod, false).await?;
    ensure!(st.status.map(|s| s.state) == Some(cri::PodSandboxState::SandboxNotready as i32));
    for _ in 0..2 {
        c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?;
    }
    let gone = c
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await;
    ensure!(code(gone) == tonic::Code::NotFound, "a removed pod");
    ensure_no_leaks(daemon)?;
    // The name is free again.
    let pod = run_pod(&mut c, config).await?;
    remove_pod_without_leaks(daemon, &mut c, &pod).await?;
    Ok(())
}

async fn vm_death(daemon: &mut Daemon) -> anyhow::Result<()> {
    let mut c = daemon.runtime().await?;
    let pod = run_pod(&mut c, pod_config("doomed", &daemon.log_dir())).await?;
    let cid = run_container(&mut c, &pod, "sleeper", &["sleep", "1000"]).await?;
    let info = pod_status(&mut c, &pod, true)
        .await?
        .info
        .remove("info")
        .context("no info")?;
    let info: serde_json::Value = serde_json::from_str(&info)?;
    let pid = info["vmm_pid"].as_i64().context("no vmm_pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let killed = Instant::now();
    let st = wait_exited(&mut c, &cid, Duration::from_secs(5)).await?;
    ensure!(
        killed.elapsed() < Duration::from_secs(2),
        "noticed after {:?}",
        killed.elapsed()
    );
    ensure!(st.message.contains("VM"), "{st:?}");
    let pod_state = pod_status(&mut c, &pod, false)
        .await?
        .status
        .map(|s| s.state);
    ensure!(pod_state == Some(cri::PodSandboxState::SandboxNotready as i32));
    let refused = create(&mut c, &pod, container_config("late", &["true"])).await;
    ensure!(refused.is_err(), "created a container in a dead pod");
    remove_pod_without_leaks(daemon, &mut c, &pod).await?;
    Ok(())
}
