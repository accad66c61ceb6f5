//! Additional processes (exec) and the watchers of exits and OOM kills.

use super::*;

impl Containers {
    /// Runs an additional process in a running container; returns its pid.
    pub async fn exec(&self, id: &str, exec_id: &str, process_json: &[u8]) -> Result<i32, Error> {
        let container = self.get(id)?;
        if !storage::valid_id(exec_id) {
            return Err(Error::Invalid(format!(
                "bad exec id '{exec_id}': use 1 to 128 of [A-Za-z0-9._-]"
            )));
        }
        let process: OciProcess = serde_json::from_slice(process_json)
            .map_err(|e| Error::Invalid(format!("malformed OCI process JSON: {e}")))?;
        check_process(&process)?;
        let state = container.state().await;
        if state != State::Running {
            return Err(Error::Precondition(format!(
                "container {id} is {}; exec needs a running container",
                match state {
                    State::Created => "not started",
                    _ => "stopped",
                }
            )));
        }
        let mut execs = container.execs.lock().await;
        if execs.contains_key(exec_id) {
            return Err(Error::ProcessExists {
                id: id.into(),
                exec_id: exec_id.into(),
            });
        }
        let (stdio, child) = open_stdio(&process)?;
        let (ours, theirs) = UnixStream::pair().map_err(Error::Helper)?;
        let mut join = Vec::new();
        for (fd, kind) in &container.namespaces.others {
            join.push((fd.try_clone().map_err(Error::Helper)?, *kind));
        }
        let mnt = container
            .namespaces
            .mnt
            .try_clone()
            .map_err(Error::Helper)?;
        let mut child_fds = vec![child.stdin, child.stdout, child.stderr, theirs.into(), mnt];
        if let Some(userns) = &container.userns {
            // At init::EXEC_USER_NS_FD, entered after the mount namespace.
            child_fds.push(userns.fd.try_clone().map_err(Error::Helper)?);
        }
        let spawned = self
            .spawn(SpawnSpec {
                new_namespaces: CloneFlags::empty(),
                join,
                child_fds,
            })
            .await?;
        let proc = Arc::new(Process {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            exit: spawned.exit,
            stdio,
        });
        let run = async {
            container.cgroup.add_process(proc.pid)?;
            let message = ToHelper::Exec(Box::new(ExecConfig {
                process,
                seccomp: container.seccomp.clone(),
                userns: container.userns.is_some(),
            }));
            let reply =
                tokio::task::spawn_blocking(move || exchange(&ours, Some(&message))).await??;
            match reply {
                None => Ok(()),
                Some(FromHelper::Failed { invalid, message }) => {
                    Err(helper_error(invalid, message))
                }
                Some(FromHelper::Ready) => {
                    Err(Error::Setup("unexpected answer from the helper".into()))
                }
            }
        };
        if let Err(e) = run.await {
            let _ = proc.signal(libc::SIGKILL);
            let _ = tokio::time::timeout(KILL_TIMEOUT, proc.wait()).await;
            return Err(e);
        }
        execs.insert(exec_id.to_string(), proc.clone());
        drop(execs);
        self.watch_exit(&container, exec_id.to_string(), &proc);
        Ok(proc.pid)
    }

    pub(super) fn watch_exit(
        &self,
        container: &Arc<Container>,
        exec_id: String,
        process: &Arc<Process>,
    ) {
        let events = self.events.clone();
        let container = container.clone();
        let process = process.clone();
        tokio::spawn(async move {
            let (exit, oom_killed) = container.report(process.wait().await);
            let _ = events.send(Event {
                container_id: container.id.clone(),
                exec_id,
                kind: EventKind::Exited { exit, oom_killed },
            });
        });
    }

    /// Polls the container's memory.events for new OOM kills while it runs.
    pub(super) fn watch_oom(&self, container: &Arc<Container>) {
        if container.cgroup.path().is_none() {
            return;
        }
        let events = self.events.clone();
        let container = Arc::downgrade(container);
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(container) = container.upgrade() else {
                    return;
                };
                let kills = container.oom_kills();
                if kills > seen {
                    seen = kills;
                    let _ = events.send(Event {
                        container_id: container.id.clone(),
                        exec_id: String::new(),
                        kind: EventKind::Oom { oom_kills: kills },
                    });
                }
                if container.init.exited().is_some() {
                    return;
                }
            }
        });
    }
}
