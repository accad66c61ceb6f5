//! Creating and starting containers: the init's namespaces, cgroup and
//! setup helper.

use super::*;

impl Containers {
    /// Creates a container whose init waits for [`Containers::start`];
    /// returns its pid.
    pub async fn create(&self, request: CreateRequest) -> Result<i32, Error> {
        let id = request.id;
        if !storage::valid_id(&id) {
            return Err(Error::Invalid(format!(
                "bad container id '{id}': use 1 to 128 of [A-Za-z0-9._-]"
            )));
        }
        let spec: Spec = serde_json::from_slice(&request.spec_json)
            .map_err(|e| Error::Invalid(format!("malformed OCI spec JSON: {e}")))?;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| Error::Invalid("the OCI spec has no process".into()))?;
        check_process(process)?;
        unsupported::check_spec(&spec)?;
        let plan = self.namespace_plan(&spec)?;
        let _creating = self.create_lock.lock().await;
        if self.map().contains_key(&id) {
            return Err(Error::Exists(id));
        }
        let userns = match &plan.userns {
            Some(map) => Some(self.pod_userns(map).await?),
            None => None,
        };
        let dir = self.state_dir.join("containers").join(&id);
        let rootfs_source = request.rootfs;
        let prepare_dir = dir.clone();
        let rootfs_userns = userns.clone();
        let rootfs = tokio::task::spawn_blocking(move || {
            let idmap = rootfs_userns.as_deref().map(|u| (&u.fd, &u.map));
            storage::prepare_rootfs(&rootfs_source, &prepare_dir, idmap)
        })
        .await??;
        let cleanup = |mounts: Vec<PathBuf>, dir: PathBuf| async move {
            let _ = tokio::task::spawn_blocking(move || {
                storage::unmount_all(&mounts);
                let _ = fs::remove_dir_all(&dir);
            })
            .await;
        };
        let result = self
            .create_init(&id, &spec, &rootfs.path, plan, userns.as_deref())
            .await;
        match result {
            Ok((init, sync, namespaces, cgroup)) => {
                let container = Arc::new(Container {
                    id: id.clone(),
                    dir,
                    mounts: rootfs.mounts,
                    init: init.clone(),
                    start: tokio::sync::Mutex::new(Some(sync)),
                    execs: tokio::sync::Mutex::new(HashMap::new()),
                    namespaces,
                    cgroup,
                    seccomp: spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
                    userns,
                });
                self.map().insert(id.clone(), container.clone());
                self.watch_exit(&container, String::new(), &init);
                self.watch_oom(&container);
                tracing::info!(container = %id, pid = init.pid, "container created");
                Ok(init.pid)
            }
            Err(e) => {
                cleanup(rootfs.mounts, dir).await;
                Err(e)
            }
        }
    }

    pub(super) async fn create_init(
        &self,
        id: &str,
        spec: &Spec,
        rootfs: &Path,
        plan: NamespacePlan,
        userns: Option<&PodUserns>,
    ) -> Result<(Arc<Process>, UnixStream, Namespaces, Cgroup), Error> {
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| Error::Invalid("no process".into()))?;
        let (stdio, child) = open_stdio(process)?;
        let (ours, theirs) = UnixStream::pair().map_err(Error::Helper)?;
        let cgroup_root = self.cgroup_root.clone();
        let cgroup_name = id.to_string();
        let cgroup =
            tokio::task::spawn_blocking(move || Cgroup::create(&cgroup_root, &cgroup_name))
                .await??;
        // The cgroup namespace comes later (see InitConfig::new_cgroup_ns).
        let new_cgroup_ns = plan.new.contains(CloneFlags::CLONE_NEWCGROUP);
        let mut child_fds = vec![child.stdin, child.stdout, child.stderr, theirs.into()];
        if let Some(userns) = userns {
            // At init::INIT_USER_NS_FD: entered last, once the root is built.
            child_fds.push(userns.fd.try_clone().map_err(Error::Helper)?);
        }
        let spawn = SpawnSpec {
            new_namespaces: plan.new - CloneFlags::CLONE_NEWCGROUP,
            join: plan.join,
            child_fds,
        };
        let spawned = self.spawn(spawn).await?;
        let init = Arc::new(Process {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            exit: spawned.exit,
            stdio,
        });
        let kill = |init: Arc<Process>| async move {
            let _ = init.signal(libc::SIGKILL);
            let _ = tokio::time::timeout(KILL_TIMEOUT, init.wait()).await;
        };
        let setup = async {
            let linux = spec.linux().clone().unwrap_or_default();
            let (cg, pid) = (cgroup.clone(), init.pid);
            tokio::task::spawn_blocking(move || {
                let resources = linux.resources().as_ref();
                // Devices first: the init's set-up already opens some.
                cg.restrict_devices(
                    linux.devices().as_deref().unwrap_or_default(),
                    resources
                        .and_then(|r| r.devices().as_deref())
                        .unwrap_or_default(),
                )?;
                cg.add_process(pid)?;
                match resources {
                    Some(resources) => cg.apply(resources),
                    None => Ok(()),
                }
            })
            .await??;
            let config = ToHelper::Init(Box::new(InitConfig {
                rootfs: rootfs.to_path_buf(),
                spec: spec.clone(),
                new_uts: plan.new_uts,
                new_cgroup_ns,
                userns: userns.map(|u| u.map.clone()),
            }));
            let sync = ours.try_clone().map_err(Error::Helper)?;
            let reply =
                tokio::task::spawn_blocking(move || exchange(&sync, Some(&config))).await??;
            match reply {
                Some(FromHelper::Ready) => {}
                Some(FromHelper::Failed { invalid, message }) => {
                    return Err(helper_error(invalid, message));
                }
                None => {
                    return Err(Error::Setup(
                        "the setup helper exited without an answer".into(),
                    ));
                }
            }
            let namespaces = open_namespaces(init.pid, plan.new_pid_joined)?;
            Ok(namespaces)
        };
        match setup.await {
            Ok(namespaces) => Ok((init, ours, namespaces, cgroup)),
            Err(e) => {
                kill(init).await;
                let _ = tokio::task::spawn_blocking(move || cgroup.remove()).await;
                Err(e)
            }
        }
    }

    pub(super) async fn spawn(&self, spec: SpawnSpec) -> Result<process::Spawned, Error> {
        // The reaper and the binary live as long as the agent; the thread
        // that clones is scoped inside spawn_helper.
        let reaper = self.reaper.clone();
        let exe = self.exe.try_clone()?;
        Ok(
            tokio::task::spawn_blocking(move || process::spawn_helper(&reaper, &exe, spec))
                .await??,
        )
    }

    pub(super) fn namespace_plan(&self, spec: &Spec) -> Result<NamespacePlan, Error> {
        let mut plan = NamespacePlan {
            new: CloneFlags::CLONE_NEWNS,
            join: vec![],
            new_uts: false,
            new_pid_joined: true,
            userns: userns::spec_userns(spec)?,
        };
        let shared_pid = self
            .shared_pid_ns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let linux = spec.linux().clone().unwrap_or_default();
        for ns in linux.namespaces().iter().flatten() {
            let flag = match ns.typ() {
                LinuxNamespaceType::Mount => {
                    if ns.path().is_some() {
                        return Err(Error::Invalid(
                            "joining a mount namespace is not supported".into(),
                        ));
                    }
                    continue;
                }
                LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
                LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
                LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
                LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
                // Every container of the pod shares the guest's network.
                LinuxNamespaceType::Network => continue,
                // Entered last by the helper (see userns.rs).
                LinuxNamespaceType::User => continue,
                LinuxNamespaceType::Time => {
                    return Err(Error::Invalid("time namespaces are not supported".into()));
                }
            };
            if flag == CloneFlags::CLONE_NEWPID && shared_pid.is_some() {
                continue;
            }
            match ns.path() {
                Some(path) => {
                    let fd = fs::File::open(path).map_err(|e| {
                        Error::Invalid(format!("cannot open namespace {}: {e}", path.display()))
                    })?;
                    plan.join.push((fd.into(), flag));
                }
                None => {
                    plan.new |= flag;
                    if flag == CloneFlags::CLONE_NEWUTS {
                        plan.new_uts = true;
                    }
                }
            }
        }
        if let Some(ns) = shared_pid {
            let fd = ns.try_clone().map_err(Error::Helper)?;
            plan.join.push((fd, CloneFlags::CLONE_NEWPID));
        }
        if !plan.new.contains(CloneFlags::CLONE_NEWPID) {
            plan.new_pid_joined = false;
        }
        if let Some(profile) = linux.seccomp() {
            seccomp::compile(profile).map_err(|e| Error::Invalid(frakti_proto::error_chain(&e)))?;
        }
        Ok(plan)
    }

    /// Lets a created container's init execute its process.
    pub async fn start(&self, id: &str) -> Result<(), Error> {
        let container = self.get(id)?;
        let mut start = container.start.lock().await;
        if container.init.exited().is_some() {
            return Err(Error::Precondition(format!(
                "container {id} has stopped; it cannot be started"
            )));
        }
        let Some(sync) = start.take() else {
            return Err(Error::Precondition(format!(
                "container {id} was already started"
            )));
        };
        drop(start);
        let reply =
            tokio::task::spawn_blocking(move || exchange(&sync, Some(&ToHelper::Start))).await??;
        match reply {
            None => {
                tracing::info!(container = %id, "container started");
                Ok(())
            }
            Some(FromHelper::Failed { invalid, message }) => Err(helper_error(invalid, message)),
            Some(FromHelper::Ready) => {
                Err(Error::Setup("unexpected answer from the helper".into()))
            }
        }
    }
}

pub(super) struct NamespacePlan {
    new: CloneFlags,
    join: Vec<(OwnedFd, CloneFlags)>,
    new_uts: bool,
    /// The container has a PID namespace of its own.
    new_pid_joined: bool,
    /// The pod's user namespace's mappings, when the container is in it.
    userns: Option<crate::idmap::IdMap>,
}

pub(super) fn check_process(process: &OciProcess) -> Result<(), Error> {
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(Error::Invalid("process.args is empty".into()));
    }
    if !process.cwd().is_absolute() {
        return Err(Error::Invalid(format!(
            "process.cwd {} is not absolute",
            process.cwd().display()
        )));
    }
    Ok(())
}

pub(super) fn open_stdio(process: &OciProcess) -> Result<(Stdio, stdio::ChildStdio), Error> {
    Ok(if process.terminal() == Some(true) {
        let (rows, cols) = match process.console_size() {
            Some(size) => console_size(size.height(), size.width())?,
            None => (0, 0),
        };
        stdio::pty(rows, cols)?
    } else {
        stdio::pipes()?
    })
}

pub(super) fn helper_error(invalid: bool, message: String) -> Error {
    if invalid {
        Error::Invalid(message)
    } else {
        Error::Setup(message)
    }
}

/// Sends `message` (if any) to a helper and reads its answer; `None` when
/// the helper closed the socket (it executed the process).
pub(super) fn exchange(
    sync: &UnixStream,
    message: Option<&ToHelper>,
) -> Result<Option<FromHelper>, Error> {
    sync.set_read_timeout(Some(HELPER_TIMEOUT))
        .map_err(Error::Helper)?;
    if let Some(message) = message {
        init::write_frame(sync, message).map_err(Error::Helper)?;
    }
    match init::read_frame(sync) {
        Ok(reply) => Ok(reply),
        // The helper executed the process or died: both close the socket.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(Error::Helper(e)),
    }
}

pub(super) fn open_namespaces(pid: i32, _own_pid: bool) -> Result<Namespaces, Error> {
    let open = |name: &str| -> Result<OwnedFd, Error> {
        fs::File::open(format!("/proc/{pid}/ns/{name}"))
            .map(OwnedFd::from)
            .map_err(|source| Error::Namespaces { pid, source })
    };
    Ok(Namespaces {
        mnt: open("mnt")?,
        others: vec![
            (open("pid")?, CloneFlags::CLONE_NEWPID),
            (open("ipc")?, CloneFlags::CLONE_NEWIPC),
            (open("uts")?, CloneFlags::CLONE_NEWUTS),
            (open("cgroup")?, CloneFlags::CLONE_NEWCGROUP),
        ],
    })
}

/// A terminal's size as the kernel's winsize holds it (16 bits each).
pub(super) fn console_size(height: u64, width: u64) -> Result<(u16, u16), Error> {
    let check = |value: u64, field: &str| {
        u16::try_from(value).map_err(|_| {
            Error::Invalid(format!(
                "process.consoleSize.{field} {value} is beyond a terminal's 65535"
            ))
        })
    };
    Ok((check(height, "height")?, check(width, "width")?))
}

#[cfg(test)]
mod console_size_tests {
    use super::*;

    #[test]
    fn console_sizes_are_checked_not_truncated() {
        assert_eq!(console_size(24, 80).unwrap(), (24, 80));
        assert_eq!(console_size(65535, 0).unwrap(), (65535, 0));
        for (h, w) in [(65536, 80), (24, 1 << 40), (u64::MAX, u64::MAX)] {
            assert!(
                matches!(console_size(h, w), Err(Error::Invalid(_))),
                "{h}x{w}"
            );
        }
    }
}
