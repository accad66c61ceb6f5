//! The daemon crashes (kill -9) and comes back: running pods and
//! containers are found again, exits that happened meanwhile are reported
//! with their codes, logs go on, nothing leaks.

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_cri::v1 as cri;
use libtest_mimic::Trial;

use super::harness::*;

pub fn tests() -> Vec<Trial> {
    vec![
        Trial::test("cri::a_restarted_daemon_finds_its_pods", || {
            with_daemon(&[], restart)
        }),
        Trial::test("cri::a_daemon_killed_mid_run_pod_sandbox_cleans_up", || {
            with_daemon(&[], killed_mid_run)
        }),
        Trial::test("cri::ten_pods_start_and_go_in_parallel", || {
            with_daemon(&[], ten_pods)
        }),
    ]
}

/// kill -9 while a pod boots: the restarted daemon removes the half-made
/// pod (its VMM, directory and name) and the name can be used again.
async fn killed_mid_run(daemon: &mut Daemon) -> anyhow::Result<()> {
    let c = daemon.runtime().await?;
    let config = pod_config("interrupted", &daemon.log_dir());
    let pending = {
        let mut c = c.clone();
        let config = config.clone();
        tokio::spawn(async move { run_pod(&mut c, config).await })
    };
    // Until the VMM is up and booting.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while processes_named(daemon, "frakti-vmm").is_empty() {
        ensure!(std::time::Instant::now() < deadline, "no VMM started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.kill();
    let _ = pending.await;
    daemon.spawn().await?;
    let mut c2 = daemon.runtime().await?;
    let pods = c2
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    ensure!(pods.is_empty(), "a half-made pod survived: {pods:?}");
    ensure_no_leaks(daemon)?;
    let pod = run_pod(&mut c2, config).await?;
    drop((c, c2));
    // A VMM whose pod record is gone (its directory removed while the
    // daemon was down) is killed when the daemon starts.
    daemon.kill();
    std::fs::remove_dir_all(daemon.root().join("pods").join(&pod))?;
    ensure!(
        !processes_named(daemon, "frakti-vmm").is_empty(),
        "the VMM should still run"
    );
    daemon.spawn().await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !processes_named(daemon, "frakti-vmm").is_empty() {
        ensure!(
            std::time::Instant::now() < deadline,
            "the orphan VMM still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure_no_leaks(daemon)?;
    Ok(())
}

/// Ten pods with a container each, started at once, then removed at once:
/// nothing is left (processes, pod directories, mounts).
async fn ten_pods(daemon: &mut Daemon) -> anyhow::Result<()> {
    let c = daemon.runtime().await?;
    let log_dir = daemon.log_dir();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut c = c.clone();
        let mut config = pod_config(&format!("p{i}"), &log_dir);
        // As kubelet sends a pod with limits: the VM is sized from them
        // (half a CPU: 1 vCPU; 40 MiB + the 64 MiB reserve: 104 MiB, below
        // the 128 MiB default) and the pod's cgroup in the guest gets them.
        config.linux = Some(cri::LinuxPodSandboxConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 50_000,
                memory_limit_in_bytes: 40 << 20,
                ..Default::default()
            }),
            ..Default::default()
        });
        tasks.push(tokio::spawn(async move {
            let pod = run_pod(&mut c, config).await?;
            let id = create(&mut c, &pod, container_config("main", &["sleep", "1000"])).await?;
            start(&mut c, &id).await?;
            anyhow::Ok(pod)
        }));
    }
    let mut pods = Vec::new();
    for task in tasks {
        pods.push(task.await??);
    }
    let info = pod_status(&mut c.clone(), &pods[0], true)
        .await?
        .info
        .remove("info")
        .context("no verbose info")?;
    let info: serde_json::Value = serde_json::from_str(&info)?;
    ensure!(
        info["vm"]["vcpus"] == 1 && info["vm"]["memory_mib"] == 128,
        "a pod sized from its resources: {info}"
    );
    let running = c
        .clone()
        .list_containers(cri::ListContainersRequest::default())
        .await?
        .into_inner()
        .containers
        .iter()
        .filter(|c| c.state == cri::ContainerState::ContainerRunning as i32)
        .count();
    ensure!(running == 10, "{running} containers running");
    remove_in_parallel(&c, pods).await?;
    ensure_no_leaks(daemon)?;
    Ok(())
}

async fn restart(daemon: &mut Daemon) -> anyhow::Result<()> {
    let mut c = daemon.runtime().await?;
    let pod = run_pod(&mut c, pod_config("survivor", &daemon.log_dir())).await?;
    let ticker = run_container(
        &mut c,
        &pod,
        "ticker",
        &[
            "sh",
            "-c",
            "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done",
        ],
    )
    .await?;
    let quitter = run_container(&mut c, &pod, "quitter", &["sh", "-c", "sleep 3; exit 42"]).await?;
    // Output as fast as the guest makes it: while the daemon is down, far
    // more than the agent keeps for it.
    let flood = [
        "sh",
        "-c",
        "while true; do head -c 1048576 /dev/zero; echo; done",
    ];
    let flooder = run_container(&mut c, &pod, "flooder", &flood).await?;
    // Numbered lines at up to ~20 KiB/s: far less than the agent keeps
    // while the daemon is away, so every line must be in the log once.
    let count = [
        "sh",
        "-c",
        "i=0; while true; do echo \"count $i ....................................\"; \
         i=$((i+1)); [ $((i % 50)) = 0 ] && sleep 0.1; done",
    ];
    run_container(&mut c, &pod, "counter", &count).await?;
    let log = daemon.log_dir().join("ticker.log");
    let count_log = daemon.log_dir().join("counter.log");
    wait_for_text(&log, "tick 2\n", Duration::from_secs(30)).await?;
    wait_for_text(&count_log, "count 100 ", Duration::from_secs(30)).await?;

    // Stopped first, so that output is in flight (in the connection, read
    // but not yet written) when the daemon dies.
    signal_process(daemon.pid().context("no daemon")?, "STOP")?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    daemon.kill();
    // The quitter exits while nobody watches.
    tokio::time::sleep(Duration::from_secs(4)).await;
    daemon.spawn().await?;
    let mut c = daemon.runtime().await?;

    let st = pod_status(&mut c, &pod, false)
        .await?
        .status
        .map(|s| s.state);
    ensure!(
        st == Some(cri::PodSandboxState::SandboxReady as i32),
        "pod state {st:?}"
    );
    let st = status(&mut c, &ticker).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerRunning as i32,
        "{st:?}"
    );
    let st = wait_exited(&mut c, &quitter, Duration::from_secs(10)).await?;
    ensure!(st.exit_code == 42, "{st:?}");
    // The log goes on after the restart.
    let before = std::fs::read_to_string(&log)?.lines().count();
    wait_for_text(
        &log,
        &format!("tick {}\n", before + 3),
        Duration::from_secs(30),
    )
    .await?;
    // Nothing was lost while the daemon was down: the ticks are all there.
    let text = std::fs::read_to_string(&log)?;
    let ticks: Vec<u64> = text
        .lines()
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    let gaps: Vec<(u64, u64)> = ticks
        .windows(2)
        .filter(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
        .collect();
    ensure!(
        ticks.first() == Some(&0) && gaps.is_empty(),
        "ticks missing or repeated: {gaps:?}"
    );
    // Nor was any output in flight when the daemon died, nor repeated.
    let at_restart = count_lines(&count_log)?.len();
    wait_for_text(
        &count_log,
        &format!("count {} ", at_restart + 200),
        Duration::from_secs(60),
    )
    .await?;
    let counts = count_lines(&count_log)?;
    let wrong: Vec<(usize, &String)> = counts
        .iter()
        .enumerate()
        .filter(|(i, line)| !line.starts_with(&format!("count {i} ")))
        .take(3)
        .collect();
    ensure!(
        wrong.is_empty(),
        "the counter's log is not every line once, in order ({} lines): first wrong {wrong:?}",
        counts.len()
    );
    eprintln!(
        "cri: the counter's {} lines are all in its log once across the restart ({} then)",
        counts.len(),
        at_restart
    );
    let out = exec(&mut c, &ticker, &["echo", "still here"], 10).await?;
    ensure!(out.stdout == b"still here\n", "{out:?}");
    // The flood's output flows again after the restart (its pumps took the
    // stream back); where the agent had to drop some while the daemon was
    // away, the log says so (the mark itself is unit-tested: how much the
    // nested lab guest writes meanwhile varies).
    let st = status(&mut c, &flooder).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerRunning as i32,
        "{st:?}"
    );
    let flood_log = daemon.log_dir().join("flooder.log");
    let size = || std::fs::metadata(&flood_log).map(|m| m.len()).unwrap_or(0);
    let resumed_at = size();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while size() < resumed_at + (256 << 10) {
        ensure!(
            std::time::Instant::now() < deadline,
            "the flood's log stopped at {} bytes after the restart",
            size()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = std::fs::read(&flood_log)?;
    let notice = String::from_utf8_lossy(&text)
        .lines()
        .find(|l| l.contains("were lost"))
        .map(str::to_string);
    eprintln!(
        "cri: the flood's log goes on after the restart; {}",
        notice
            .as_deref()
            .map_or("no loss was marked".to_string(), |l| {
                format!("marked: {}", l.split(" F ").nth(1).unwrap_or(l))
            })
    );

    remove_pod_without_leaks(daemon, &mut c, &pod).await?;
    Ok(())
}

/// The contents of the CRI records of a log (partial records joined).
fn count_lines(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)?;
    let mut lines = Vec::new();
    let mut line = String::new();
    for record in text.lines() {
        let mut fields = record.splitn(4, ' ');
        let (tag, content) = (fields.nth(2), fields.next().unwrap_or(""));
        line.push_str(content);
        if tag != Some("P") {
            lines.push(std::mem::take(&mut line));
        }
    }
    Ok(lines)
}

/// Sends `kill -SIGNAL` to `pid`.
fn signal_process(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    ensure!(status.success(), "kill -{signal} {pid}: {status}");
    Ok(())
}
