//! Containers and their processes: output, exit codes, signals, terminals,
//! users, refusals, removal, events, shutdown.

use super::*;

#[tokio::test]
async fn health_and_version() {
    let mut agent = Agent::start().await;
    assert!(
        agent
            .client
            .check(pb::CheckRequest {})
            .await
            .unwrap()
            .into_inner()
            .serving
    );
    let version = agent
        .client
        .get_version(pb::GetVersionRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.api_version, frakti_proto::AGENT_API_VERSION);
    assert!(version.cpus >= 1);
}

#[tokio::test]
async fn output_and_exit_code() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(
        c,
        "echo",
        &spec(&["sh", "-c", "echo hello; echo oops >&2; exit 3"]),
    )
    .await;
    assert_eq!(
        read_all(c, "echo", "", pb::OutputStream::Stdout).await,
        "hello\n"
    );
    assert_eq!(
        read_all(c, "echo", "", pb::OutputStream::Stderr).await,
        "oops\n"
    );
    let status = wait(c, "echo", "").await;
    assert_eq!(
        (status.exit_code, status.signal, status.oom_killed),
        (3, 0, false)
    );
    // A second wait answers at once with the same status.
    assert_eq!(wait(c, "echo", "").await.exit_code, 3);
    let list = c
        .list_containers(pb::ListContainersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.containers.len(), 1);
    assert_eq!(list.containers[0].state, pb::ContainerState::Stopped as i32);
    assert_eq!(
        list.containers[0].exit_status.as_ref().unwrap().exit_code,
        3
    );
}

/// An acknowledging ReadOutput reader: its first request and a sender for
/// its confirmations.
async fn read_acknowledging(
    client: &mut Client,
    id: &str,
    from_offset: u64,
) -> Result<
    (
        tonic::Streaming<pb::OutputChunk>,
        tokio::sync::mpsc::Sender<pb::ReadOutputRequest>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ReadOutputRequest {
        container_id: id.into(),
        stream: pb::OutputStream::Stdout as i32,
        from_offset,
        acknowledge: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let out = client
        .read_output(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((out, tx))
}

#[tokio::test]
async fn a_resuming_reader_gets_what_was_not_confirmed_again() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(
        c,
        "resume",
        &spec(&["sh", "-c", "echo one; echo two; sleep 1000"]),
    )
    .await;
    let (mut out, confirm) = read_acknowledging(c, "resume", 0).await.unwrap();
    let first = out.message().await.unwrap().unwrap();
    assert_eq!(first.offset, 0);
    let mut text = String::from_utf8_lossy(&first.data).into_owned();
    // The two lines may come in one chunk or in two.
    if !text.contains("two") {
        text.push_str(&read_until(&mut out, "two").await);
    }
    assert_eq!(text, "one\ntwo\n");
    // The reader keeps "one\n" for good, then goes away.
    confirm
        .send(pb::ReadOutputRequest {
            kept: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    drop((out, confirm));

    let (mut out, _confirm) = read_acknowledging(c, "resume", 4).await.unwrap();
    let again = out.message().await.unwrap().unwrap();
    assert_eq!((again.offset, again.data.as_slice()), (4, &b"two\n"[..]));
    // Another acknowledging reader replaces it; a plain one may not, and
    // nobody may claim more than the stream has made.
    let err = c
        .read_output(tokio_stream::once(pb::ReadOutputRequest {
            container_id: "resume".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let err = read_acknowledging(c, "resume", 9).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    let (mut out, _confirm) = read_acknowledging(c, "resume", 8).await.unwrap();
    signal(c, "resume", "", 9).await.unwrap();
    assert!(
        out.message().await.unwrap().is_none(),
        "nothing after 8 bytes"
    );
}

#[tokio::test]
async fn sigkill_gives_137() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(c, "sleeper", &spec(&["sleep", "1000"])).await;
    let list = c
        .list_containers(pb::ListContainersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.containers[0].state, pb::ContainerState::Running as i32);
    signal(c, "sleeper", "", 9).await.unwrap();
    let status = wait(c, "sleeper", "").await;
    assert_eq!((status.exit_code, status.signal), (137, 9));
    // Signalling a process that has exited is not an error.
    signal(c, "sleeper", "", 9).await.unwrap();
}

#[tokio::test]
async fn sigterm_to_a_shell_with_a_trap() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    let mut out = {
        run(
            c,
            "trap",
            &spec(&[
                "sh",
                "-c",
                "trap 'echo got TERM; exit 7' TERM; echo armed; while true; do sleep 0.05; done",
            ]),
        )
        .await;
        c.read_output(tokio_stream::once(pb::ReadOutputRequest {
            container_id: "trap".into(),
            exec_id: String::new(),
            stream: pb::OutputStream::Stdout as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
    };
    read_until(&mut out, "armed").await;
    signal(c, "trap", "", 15).await.unwrap();
    read_until(&mut out, "got TERM").await;
    assert_eq!(wait(c, "trap", "").await.exit_code, 7);
}

#[tokio::test]
async fn exec_cat_echoes_stdin() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(c, "box", &spec(&["sleep", "1000"])).await;
    exec(c, "box", "cat", process(&["cat"])).await.unwrap();
    for data in ["ping\n", "pong\n"] {
        c.write_stdin(pb::WriteStdinRequest {
            container_id: "box".into(),
            exec_id: "cat".into(),
            data: data.as_bytes().to_vec(),
        })
        .await
        .unwrap();
    }
    c.close_stdin(pb::CloseStdinRequest {
        container_id: "box".into(),
        exec_id: "cat".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        read_all(c, "box", "cat", pb::OutputStream::Stdout).await,
        "ping\npong\n"
    );
    assert_eq!(wait(c, "box", "cat").await.exit_code, 0);
    // Writing after close is refused.
    let err = c
        .write_stdin(pb::WriteStdinRequest {
            container_id: "box".into(),
            exec_id: "cat".into(),
            data: b"x".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // The exec ran in the container's PID namespace: it sees the container's
    // init as PID 1.
    exec(
        c,
        "box",
        "ps",
        process(&["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '"]),
    )
    .await
    .unwrap();
    assert_eq!(
        read_all(c, "box", "ps", pb::OutputStream::Stdout).await,
        "sleep 1000 "
    );
    // The container itself is still running.
    let list = c
        .list_containers(pb::ListContainersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.containers[0].state, pb::ContainerState::Running as i32);
    assert_eq!(list.containers[0].exec_ids, ["cat", "ps"]);
}

#[tokio::test]
async fn tty_exec_with_resize() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(c, "tty", &spec(&["sleep", "1000"])).await;
    let mut p = process(&[
        "sh",
        "-c",
        "stty size; echo ready; read line; stty size; test -t 0 && echo is-a-tty",
    ]);
    p["terminal"] = json!(true);
    p["consoleSize"] = json!({"height": 24, "width": 80});
    exec(c, "tty", "sh", p).await.unwrap();
    let mut out = c
        .read_output(tokio_stream::once(pb::ReadOutputRequest {
            container_id: "tty".into(),
            exec_id: "sh".into(),
            stream: pb::OutputStream::Stdout as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let first = read_until(&mut out, "ready").await;
    assert!(first.contains("24 80"), "{first:?}");
    c.resize_tty(pb::ResizeTtyRequest {
        container_id: "tty".into(),
        exec_id: "sh".into(),
        rows: 33,
        cols: 101,
    })
    .await
    .unwrap();
    c.write_stdin(pb::WriteStdinRequest {
        container_id: "tty".into(),
        exec_id: "sh".into(),
        data: b"go\n".to_vec(),
    })
    .await
    .unwrap();
    let rest = read_until(&mut out, "is-a-tty").await;
    assert!(rest.contains("33 101"), "{rest:?}");
    assert_eq!(wait(c, "tty", "sh").await.exit_code, 0);
    // A terminal has no separate stderr; a pipe process has no terminal.
    exec(c, "tty", "plain", process(&["true"])).await.unwrap();
    let err = c
        .resize_tty(pb::ResizeTtyRequest {
            container_id: "tty".into(),
            exec_id: "plain".into(),
            rows: 1,
            cols: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test]
async fn tty_close_stdin_sends_eof() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    let mut s = spec(&["sh", "-c", "cat; echo cat-done"]);
    s["process"]["terminal"] = json!(true);
    run(c, "ttycat", &s).await;
    c.write_stdin(pb::WriteStdinRequest {
        container_id: "ttycat".into(),
        exec_id: String::new(),
        data: b"typed\n".to_vec(),
    })
    .await
    .unwrap();
    c.close_stdin(pb::CloseStdinRequest {
        container_id: "ttycat".into(),
        exec_id: String::new(),
    })
    .await
    .unwrap();
    let out = read_all(c, "ttycat", "", pb::OutputStream::Stdout).await;
    assert!(out.contains("typed") && out.contains("cat-done"), "{out:?}");
    assert_eq!(wait(c, "ttycat", "").await.exit_code, 0);
}

#[tokio::test]
async fn env_cwd_user_and_hostname_apply() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    let mut s = spec(&[
        "sh",
        "-c",
        "echo $FOO; pwd; id -u; id -g; id -G; hostname; grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status; touch /probe 2>/dev/null && echo rw || echo ro; cat /proc/kcore | wc -c",
    ]);
    s["process"]["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    s["process"]["cwd"] = json!("/work");
    s["process"]["user"] = json!({"uid": 1000, "gid": 1001, "additionalGids": [10, 20]});
    s["process"]["capabilities"] =
        json!({"bounding": ["CAP_KILL"], "effective": [], "permitted": [], "inheritable": []});
    s["root"]["readonly"] = json!(true);
    create_with(c, "who", &s, false).await.unwrap();
    start(c, "who").await.unwrap();
    let out = read_all(c, "who", "", pb::OutputStream::Stdout).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "bar baz", "{out}");
    assert_eq!(lines[1], "/work");
    assert_eq!(lines[2], "1000");
    assert_eq!(lines[3], "1001");
    let groups: HashSet<&str> = lines[4].split_whitespace().collect();
    assert_eq!(groups, HashSet::from(["1001", "10", "20"]), "{out}");
    assert_eq!(lines[5], "pod-host");
    assert_eq!(
        lines[6].split_whitespace().nth(1),
        Some("0000000000000000"),
        "{out}"
    );
    assert_eq!(lines[7].split_whitespace().nth(1), Some("1"), "{out}");
    assert_eq!(lines[8], "ro");
    assert_eq!(
        lines[9].trim(),
        "0",
        "masked /proc/kcore reads empty: {out}"
    );
    assert_eq!(wait(c, "who", "").await.exit_code, 0);
}

#[tokio::test]
async fn bad_requests_are_refused_with_reasons() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;

    let err = start(c, "ghost").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("ghost"), "{err:?}");
    let err = wait_err(c, "ghost").await;
    assert_eq!(err.code(), Code::NotFound);

    let err = c
        .create_container(pb::CreateContainerRequest {
            container_id: "bad".into(),
            oci_spec_json: b"{not json".to_vec(),
            rootfs: Some(rootfs(false)),
            devices: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("malformed OCI spec"), "{err:?}");

    let err = create(c, "../evil", &spec(&["true"])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = create(c, "noargs", &spec(&[])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = create(c, "missing", &spec(&["/bin/no-such-program"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("no-such-program"), "{err:?}");
    let mut s = spec(&["true"]);
    s["process"]["cwd"] = json!("/no/such/dir");
    let err = create(c, "nocwd", &s).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c
        .create_container(pb::CreateContainerRequest {
            container_id: "noroot".into(),
            oci_spec_json: serde_json::to_vec(&spec(&["true"])).unwrap(),
            rootfs: Some(pb::Rootfs {
                source: Some(pb::rootfs::Source::GuestPath("/no/such/rootfs".into())),
                ..Default::default()
            }),
            devices: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // What the VM cannot honour is refused by name, not dropped.
    let mut s = spec(&["true"]);
    s["hooks"] = json!({"createRuntime": [{"path": "/bin/true"}]});
    let err = create(c, "hooked", &s).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("hooks: "), "{err:?}");
    let mut s = spec(&["true"]);
    s["linux"]["resources"] = json!({"hugepageLimits": [{"pageSize": "2MB", "limit": 4194304}]});
    let err = create(c, "huge", &s).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("hugepageLimits[0] (2MB)"), "{err:?}");

    run(c, "once", &spec(&["sleep", "1000"])).await;
    let err = c
        .update_container(pb::UpdateContainerRequest {
            container_id: "once".into(),
            resources_json: br#"{"cpu": {"idle": 1}}"#.to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("resources.cpu.idle: "), "{err:?}");
    let err = c
        .update_container(pb::UpdateContainerRequest {
            container_id: "once".into(),
            resources_json: br#"{"blockIO": {"weight": 5}}"#.to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("blockIO.weight: 5 is not in [10, 1000]"),
        "{err:?}"
    );
    let err = start(c, "once").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("already started"), "{err:?}");
    let err = create(c, "once", &spec(&["true"])).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = signal(c, "once", "", 12345).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = signal(c, "once", "nope", 9).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = exec(c, "once", "x", json!({"args": "not a list"}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = exec(c, "once", "x", process(&["no-such-tool"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    exec(c, "once", "dup", process(&["true"])).await.unwrap();
    let err = exec(c, "once", "dup", process(&["true"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    create(c, "created", &spec(&["true"])).await.unwrap();
    let err = exec(c, "created", "x", process(&["true"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // The agent is fine after all that.
    assert!(
        c.check(pb::CheckRequest {})
            .await
            .unwrap()
            .into_inner()
            .serving
    );
}

async fn wait_err(client: &mut Client, id: &str) -> tonic::Status {
    client
        .wait_process(pb::WaitProcessRequest {
            container_id: id.into(),
            exec_id: String::new(),
        })
        .await
        .unwrap_err()
}

#[tokio::test]
async fn one_container_failing_does_not_harm_another() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(c, "healthy", &spec(&["sleep", "1000"])).await;
    // One that cannot even be created, one that crashes, one killed.
    assert!(create(c, "broken", &spec(&["/nope"])).await.is_err());
    // (Not the container's init itself: PID 1 of a namespace ignores
    // signals it has no handler for.)
    run(
        c,
        "crasher",
        &spec(&["sh", "-c", "sh -c 'kill -SEGV $$'; exit $?"]),
    )
    .await;
    assert_eq!(wait(c, "crasher", "").await.exit_code, 128 + 11);
    run(c, "victim", &spec(&["sleep", "1000"])).await;
    signal(c, "victim", "", 9).await.unwrap();
    assert_eq!(wait(c, "victim", "").await.exit_code, 137);
    c.remove_container(pb::RemoveContainerRequest {
        container_id: "victim".into(),
        grace_period_secs: 0,
    })
    .await
    .unwrap();
    // The healthy one still runs and still execs.
    exec(c, "healthy", "hi", process(&["echo", "still here"]))
        .await
        .unwrap();
    assert_eq!(
        read_all(c, "healthy", "hi", pb::OutputStream::Stdout).await,
        "still here\n"
    );
    let list = c
        .list_containers(pb::ListContainersRequest {})
        .await
        .unwrap()
        .into_inner();
    let healthy = list
        .containers
        .iter()
        .find(|x| x.container_id == "healthy")
        .unwrap();
    assert_eq!(healthy.state, pb::ContainerState::Running as i32);
}

/// Processes below `pid` in the host's process tree.
fn descendants(pid: i32) -> Vec<i32> {
    let mut all = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for task in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                all.push(child);
                todo.push(child);
            }
        }
    }
    all
}

#[tokio::test]
async fn remove_cleans_up_processes_and_mounts() {
    let mut agent = Agent::start().await;
    let host_pid = agent.host_pid();
    let state = agent.state_dir();
    let c = &mut agent.client;
    run(c, "doomed", &spec(&["sh", "-c", "sleep 1000 & sleep 1000"])).await;
    exec(c, "doomed", "extra", process(&["sleep", "1000"]))
        .await
        .unwrap();
    // The shell starts its two sleeps (and the exec its one) in a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let processes = loop {
        let processes = c
            .list_processes(pb::ListProcessesRequest {
                container_id: "doomed".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .processes;
        let sleeps = processes
            .iter()
            .filter(|p| p.args == ["sleep", "1000"])
            .count();
        if sleeps == 3 || Instant::now() > deadline {
            break processes;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // (sh execs its last command: the init is a sleep with a sleep child.)
    assert_eq!(processes.len(), 3, "three sleeps: {processes:?}");
    assert!(
        processes.iter().any(|p| p.args == ["sleep", "1000"]),
        "{processes:?}"
    );
    assert!(!descendants(host_pid).is_empty());
    let mountinfo = std::fs::read_to_string(format!("/proc/{host_pid}/mountinfo")).unwrap();
    let container_dir = state.join("containers/doomed");
    assert!(
        mountinfo.contains(&container_dir.display().to_string()),
        "the overlay is mounted in the agent's namespace"
    );

    c.remove_container(pb::RemoveContainerRequest {
        container_id: "doomed".into(),
        grace_period_secs: 1,
    })
    .await
    .unwrap();
    assert_eq!(
        descendants(host_pid),
        Vec::<i32>::new(),
        "processes left behind"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{host_pid}/mountinfo")).unwrap();
    assert!(
        !mountinfo.contains(&container_dir.display().to_string()),
        "{mountinfo}"
    );
    assert!(!container_dir.exists());
    let list = c
        .list_containers(pb::ListContainersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.containers.is_empty());
    let err = c
        .list_processes(pb::ListProcessesRequest {
            container_id: "doomed".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn overlay_writes_stay_in_the_container() {
    let mut agent = Agent::start().await;
    let c = &mut agent.client;
    run(
        c,
        "writer",
        &spec(&["sh", "-c", "echo scribble > /etc/note && cat /etc/note"]),
    )
    .await;
    assert_eq!(
        read_all(c, "writer", "", pb::OutputStream::Stdout).await,
        "scribble\n"
    );
    assert_eq!(wait(c, "writer", "").await.exit_code, 0);
    assert!(
        !busybox_rootfs().join("etc/note").exists(),
        "the image was modified"
    );
}

#[tokio::test]
async fn events_report_exits() {
    let mut agent = Agent::start().await;
    let mut events = agent
        .client
        .events(pb::EventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let c = &mut agent.client;
    run(c, "short", &spec(&["sh", "-c", "exit 5"])).await;
    let event = tokio::time::timeout(Duration::from_secs(20), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.container_id, "short");
    match event.kind {
        Some(pb::event::Kind::Exited(status)) => assert_eq!(status.exit_code, 5),
        other => panic!("unexpected event {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_stops_containers_and_exits() {
    let mut agent = Agent::start().await;
    let host_pid = agent.host_pid();
    let c = &mut agent.client;
    run(
        c,
        "stubborn",
        &spec(&["sh", "-c", "trap '' TERM; while true; do sleep 0.05; done"]),
    )
    .await;
    run(c, "polite", &spec(&["sleep", "1000"])).await;
    c.shutdown(pb::ShutdownRequest {
        grace_period_secs: 1,
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(status.success(), "agent exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit: {:?}",
            descendants(host_pid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
