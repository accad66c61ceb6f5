//! The agent's resource limits and robustness in a real VM: memory.max,
//! pids.max, cpu.max, io.max, and a frozen disk that must stall only the
//! calls that touch it. Driven from `agent.rs`'s one boot.

use super::*;

const MIB: i64 = 1 << 20;
/// The OOM container's memory.max, and what it tries to allocate.
const MEMORY_LIMIT: i64 = 16 * MIB;
const DD_BLOCK: &str = "bs=64M";
/// The throttled container's cpu.max: 10 % of a CPU.
const CPU_QUOTA_US: i64 = 10_000;
const CPU_PERIOD_US: u64 = 100_000;
/// Periods to observe the throttled busy loop for (2 s).
const CPU_PERIODS: u64 = 20;

/// dd with a 64 MiB buffer under a 16 MiB memory.max (no swap): the OOM
/// killer kills it, and the agent says so in WaitProcess, in the events
/// (an OOM event and the exit's flag) and in the stats.
pub(super) async fn memory_max_oom_kills(
    c: &mut AgentClient,
    events: &mut Events,
) -> anyhow::Result<()> {
    let mut s = spec(&["dd", "if=/dev/zero", "of=/dev/null", DD_BLOCK, "count=1"]);
    s["linux"]["resources"] = json!({"memory": {"limit": MEMORY_LIMIT, "swap": MEMORY_LIMIT}});
    create(c, "hog", &s).await?;
    start(c, "hog").await?;
    let status = wait(c, "hog", "").await?;
    ensure!(
        (status.exit_code, status.signal, status.oom_killed) == (137, 9, true),
        "hog should be OOM-killed: {status:?}"
    );
    let exited = events.exit("hog", "").await?;
    ensure!(
        exited.exit_code == 137 && exited.oom_killed,
        "hog's exit event: {exited:?}"
    );
    let oom = events
        .next_matching("an OOM event for hog", |e| {
            e.container_id == "hog" && matches!(e.kind, Some(pb::event::Kind::Oom(_)))
        })
        .await?;
    let Some(pb::event::Kind::Oom(oom)) = oom.kind else {
        unreachable!("matched an OOM event")
    };
    ensure!(oom.oom_kills >= 1, "{oom:?}");
    let stats = stats(c, "hog").await?;
    let memory = stats.memory.unwrap_or_default();
    ensure!(
        memory.limit_bytes == MEMORY_LIMIT as u64 && memory.oom_kills >= 1,
        "hog's memory stats: {memory:?}"
    );
    eprintln!(
        "  memory.max {} MiB: dd {DD_BLOCK} killed by SIGKILL (137), oom_killed in wait and exit event, oom_kills={}",
        MEMORY_LIMIT / MIB,
        memory.oom_kills
    );
    Ok(())
}

/// The processes a fork bomb under pids.max 64 made go with one
/// RemoveContainer (cgroup.kill), in under a second; another container's
/// process is not hit.
pub(super) async fn fork_bomb_goes_at_once(c: &mut AgentClient) -> anyhow::Result<()> {
    const PIDS: i64 = 64;
    create(c, "bystander", &spec(&["sleep", "1000"])).await?;
    start(c, "bystander").await?;
    // The bomb is a child shell: busybox sh exits when a fork fails, and
    // the init of a PID namespace must stay (its exit would kill the rest).
    let bomb = "sh -c 'while :; do sleep 1000 & done' 2>/dev/null; exec sleep 1000";
    let mut s = spec(&["sh", "-c", bomb]);
    s["linux"]["resources"] = json!({"pids": {"limit": PIDS}});
    create(c, "bomb", &s).await?;
    start(c, "bomb").await?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let pids = stats(c, "bomb").await?.pids.unwrap_or_default();
        // Full: the init and the sleeps (the bomb shell is gone).
        if pids.current >= PIDS as u64 - 1 {
            break;
        }
        ensure!(Instant::now() < deadline, "the bomb reached only {pids:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asked = Instant::now();
    step(
        "RemoveContainer",
        c.remove_container(pb::RemoveContainerRequest {
            container_id: "bomb".into(),
            grace_period_secs: 0,
        }),
    )
    .await?;
    let took = asked.elapsed();
    ensure!(
        took < Duration::from_secs(1),
        "removing the bomb's {PIDS} processes took {took:?}"
    );
    let bystander = step(
        "ListProcesses",
        c.list_processes(pb::ListProcessesRequest {
            container_id: "bystander".into(),
        }),
    )
    .await?
    .into_inner();
    ensure!(
        bystander.processes.len() == 1,
        "the bystander's processes: {bystander:?}"
    );
    eprintln!(
        "  pids.max {PIDS}: a fork bomb at its limit removed in {:.0} ms (cgroup removed), the bystander untouched",
        took.as_secs_f64() * 1000.0
    );
    Ok(())
}

/// One slow disk must not stall the agent: the scratch disk's filesystem
/// is frozen (fsfreeze from a container that sees it), and two
/// CreateContainers whose writable layers live there hang, as many as the
/// agent's runtime has worker threads. Meanwhile an exec in another
/// container runs and answers, and stats and lists answer; after the thaw
/// both creations complete.
pub(super) async fn a_frozen_disk_stalls_only_its_callers(
    c: &mut AgentClient,
) -> anyhow::Result<()> {
    step(
        "MountDisk",
        c.mount_disk(pb::MountDiskRequest {
            disk_id: SCRATCH.into(),
            serial: SCRATCH.into(),
            fs_type: "ext4".into(),
            read_only: false,
            ..Default::default()
        }),
    )
    .await?;
    let mut s = spec(&["sleep", "1000"]);
    s["mounts"].as_array_mut().context("mounts")?.push(json!({
        "destination": "/scratch", "type": "bind",
        "source": format!("/run/frakti/disks/{SCRATCH}"), "options": ["rbind"]
    }));
    create(c, "freezer", &s).await?;
    start(c, "freezer").await?;
    let run_in_freezer =
        |c: &mut AgentClient, exec_id: &'static str, args: &'static [&'static str]| {
            let mut c = c.clone();
            async move {
                exec(&mut c, "freezer", exec_id, args).await?;
                let status = wait(&mut c, "freezer", exec_id).await?;
                ensure!(status.exit_code == 0, "{args:?}: exit {}", status.exit_code);
                Ok::<_, anyhow::Error>(())
            }
        };
    run_in_freezer(c, "freeze", &["fsfreeze", "--freeze", "/scratch"]).await?;
    let stuck: Vec<_> = ["stuck-1", "stuck-2"]
        .into_iter()
        .map(|id| {
            let mut c = c.clone();
            let request = pb::CreateContainerRequest {
                container_id: id.into(),
                oci_spec_json: serde_json::to_vec(&spec(&["sleep", "1000"])).unwrap_or_default(),
                rootfs: Some(pb::Rootfs {
                    upper_disk_id: SCRATCH.into(),
                    ..rootfs()
                }),
                devices: vec![],
            };
            tokio::spawn(async move { c.create_container(request).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(20), async {
        run_in_freezer(c, "alive", &["sh", "-c", "echo alive"]).await?;
        stats(c, "freezer").await?;
        step(
            "ListContainers",
            c.list_containers(pb::ListContainersRequest {}),
        )
        .await?;
        Ok::<_, anyhow::Error>(())
    })
    .await;
    let took = asked.elapsed();
    let still_stuck = stuck.iter().all(|task| !task.is_finished());
    // Thawed whatever happened, so that nothing stays hung.
    run_in_freezer(c, "thaw", &["fsfreeze", "--unfreeze", "/scratch"]).await?;
    answered.context("an exec, stats and a list during the freeze did not answer in 20 s")??;
    ensure!(
        still_stuck,
        "a creation on the frozen disk did not wait for it"
    );
    for task in stuck {
        tokio::time::timeout(STEP_TIMEOUT, task)
            .await
            .context("a creation hung after the thaw")??
            .context("a creation after the thaw")?;
    }
    eprintln!(
        "  frozen scratch disk: 2 creations waiting on it, exec + stats + list answered in {:.2} s",
        took.as_secs_f64()
    );
    Ok(())
}

/// Reads 3 MiB of the image disk's raw device with O_DIRECT, through a
/// node the container's spec gives it, with and without an io.max read
/// throttle of 1 MiB/s (and an io.weight, which the kernel must take).
pub(super) async fn block_io_throttles(c: &mut AgentClient, device: &str) -> anyhow::Result<()> {
    let name = device.trim_start_matches("/dev/");
    create(
        c,
        "probe",
        &spec(&["cat", &format!("/sys/block/{name}/dev")]),
    )
    .await?;
    start(c, "probe").await?;
    let numbers = read_all(c, "probe", "", pb::OutputStream::Stdout).await?;
    let (major, minor) = numbers
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<i64>().ok()?, b.parse::<i64>().ok()?)))
        .with_context(|| format!("{device}'s numbers: {numbers:?}"))?;
    let read = "dd if=/dev/image of=/dev/null bs=64k count=48 iflag=direct";
    let mut seconds = Vec::new();
    for (id, block_io) in [
        ("fast", json!({})),
        (
            "throttled",
            json!({"weight": 500, "throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 1 << 20}]}),
        ),
    ] {
        let mut s = spec(&["sh", "-c", read]);
        s["linux"]["devices"] =
            json!([{"path": "/dev/image", "type": "b", "major": major, "minor": minor}]);
        s["linux"]["resources"] = json!({"blockIO": block_io});
        create(c, id, &s).await?;
        // From the start to the exit: the read, and a process start.
        let started = Instant::now();
        start(c, id).await?;
        let stderr = read_all(c, id, "", pb::OutputStream::Stderr).await?;
        let status = wait(c, id, "").await?;
        seconds.push(started.elapsed().as_secs_f64());
        ensure!(
            status.exit_code == 0 && stderr.contains("48+0 records out"),
            "{id}: exit {} {stderr}",
            status.exit_code
        );
    }
    let (fast, throttled) = (seconds[0], seconds[1]);
    ensure!(
        throttled >= 2.0 && throttled > 2.0 * fast,
        "3 MiB under rbps=1MiB/s took {throttled:.2} s (unthrottled {fast:.2} s)"
    );
    eprintln!(
        "  io.max rbps=1MiB/s on {device} ({major}:{minor}): 3 MiB O_DIRECT read in {throttled:.2} s (unthrottled {fast:.2} s)"
    );
    Ok(())
}

/// A busy loop under cpu.max 10000/100000: the cgroup is throttled, and
/// over CPU_PERIODS periods it gets about a tenth of a CPU.
pub(super) async fn cpu_max_throttles(c: &mut AgentClient) -> anyhow::Result<()> {
    let mut s = spec(&["sh", "-c", "while :; do :; done"]);
    s["linux"]["resources"] = json!({"cpu": {"quota": CPU_QUOTA_US, "period": CPU_PERIOD_US}});
    create(c, "spin", &s).await?;
    start(c, "spin").await?;
    // Both samples come from the guest (cgroup counters, guest clock).
    let first = poll_cpu(c, "spin", |cpu| cpu.nr_periods >= 1).await?;
    let (cpu0, at0) = (first.cpu.unwrap_or_default(), first.timestamp_ns);
    let last = poll_cpu(c, "spin", |cpu| {
        cpu.nr_periods >= cpu0.nr_periods + CPU_PERIODS
    })
    .await?;
    let (cpu1, at1) = (last.cpu.unwrap_or_default(), last.timestamp_ns);
    let wall_ns = (at1 - at0).max(1) as f64;
    let share = (cpu1.usage_ns - cpu0.usage_ns) as f64 / wall_ns;
    ensure!(
        cpu1.nr_throttled > 0,
        "the busy loop was never throttled: {cpu1:?}"
    );
    // 10 % plus slack for the timer tick granularity of a 1-vCPU guest.
    ensure!(
        share < 0.2,
        "the busy loop got {:.0} % of a CPU under a 10 % cpu.max: {cpu0:?} → {cpu1:?}",
        share * 100.0
    );
    eprintln!(
        "  cpu.max {CPU_QUOTA_US} {CPU_PERIOD_US}: busy loop used {:.1} % of a CPU over {:.2} s, nr_throttled={} of nr_periods={}",
        share * 100.0,
        wall_ns / 1e9,
        cpu1.nr_throttled,
        cpu1.nr_periods
    );
    Ok(())
}

/// Polls the container's stats until its CPU counters satisfy `done`.
pub(super) async fn poll_cpu(
    c: &mut AgentClient,
    id: &str,
    done: impl Fn(&pb::CpuStats) -> bool,
) -> anyhow::Result<pb::StatsContainerResponse> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let sample = stats(c, id).await?;
        if done(&sample.cpu.unwrap_or_default()) {
            return Ok(sample);
        }
        ensure!(
            Instant::now() < deadline,
            "{id}'s CPU counters stopped short: {:?}",
            sample.cpu
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
