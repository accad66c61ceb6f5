//! Containers: create from an OCI runtime spec, start, exec, signal, wait,
//! stdio, list, stats, update, remove.
//!
//! Hand-written on nix, not on youki's `libcontainer` (evaluated: 0.7 with
//! `default-features = false, features = ["v2"]`). libcontainer forks with a
//! raw clone3 and runs a lot of Rust (allocation, logging) in the child,
//! which is only sound in a single-threaded caller such as the youki CLI,
//! not in our multi-threaded tokio agent; it is built around the runc CLI
//! model (bundle directory with config.json, state.json, console socket);
//! its cgroup manager refuses a cgroup v1/hybrid host when built for v2
//! only, so host-mode tests could not run; and it pulls a second nix. What
//! we need is small: the agent clones a child into new namespaces (or, for
//! exec, into the container's: the spawning thread joins pid/ipc/uts, the
//! child joins mnt) and the child re-executes the agent binary as a
//! single-threaded setup helper (`init.rs`) that does the mounts,
//! pivot_root, user, capabilities and rlimits before executing the
//! container's process. See `process.rs` for the clone and the reaper.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sched::CloneFlags;
use oci_spec::runtime::{
    LinuxNamespaceType, LinuxResources, LinuxSeccomp, Process as OciProcess, Spec,
};
use tokio::sync::broadcast;

use crate::cgroup::{self, Cgroup};
use crate::init::{self, ExecConfig, FromHelper, InitConfig, ToHelper};
use crate::io::{self as stdio, FdIo, Output, Stdio};
use crate::process::{self, AgentExe, ExitWatch, Reaper, SpawnSpec};
use crate::seccomp;
use crate::storage::{self, RootfsSource};

pub use crate::process::Exit;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("container {0} not found")]
    NotFound(String),
    #[error("process '{exec_id}' not found in container {id}")]
    ProcessNotFound { id: String, exec_id: String },
    #[error("container {0} already exists")]
    Exists(String),
    #[error("process '{exec_id}' already exists in container {id}")]
    ProcessExists { id: String, exec_id: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    #[error("container setup failed: {0}")]
    Setup(String),
    #[error("cannot talk to the setup helper")]
    Helper(#[source] io::Error),
    #[error("cannot open the namespaces of pid {pid}")]
    Namespaces {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("container {0}: its processes did not exit after SIGKILL")]
    Unkillable(String),
    #[error("cannot write to stdin")]
    Stdin(#[source] io::Error),
    #[error("a blocking task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Process(#[from] process::Error),
    #[error(transparent)]
    Stdio(#[from] stdio::Error),
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error(transparent)]
    Storage(#[from] storage::Error),
}

/// What a container needs from the request besides the spec.
pub struct CreateRequest {
    pub id: String,
    pub spec_json: Vec<u8>,
    pub rootfs: RootfsSource,
}

/// Which of a container's streams.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Stopped,
}

/// Something that happened to a container.
#[derive(Debug, Clone)]
pub struct Event {
    pub container_id: String,
    pub exec_id: String,
    pub kind: EventKind,
}

#[derive(Debug, Clone)]
pub enum EventKind {
    /// `oom_killed` as in [`Container::report`].
    Exited {
        exit: Exit,
        oom_killed: bool,
    },
    Oom {
        oom_kills: u64,
    },
}

/// A process of a container (its init or an exec).
pub struct Process {
    pub pid: i32,
    pidfd: OwnedFd,
    exit: ExitWatch,
    pub stdio: Stdio,
}

impl Process {
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    pub async fn wait(&self) -> Exit {
        process::wait_exit(&self.exit).await
    }

    pub fn signal(&self, signal: i32) -> Result<(), Error> {
        Ok(process::signal_pidfd(&self.pidfd, self.pid, signal)?)
    }
}

/// The container's namespaces, held open so that exec can join them.
struct Namespaces {
    mnt: OwnedFd,
    /// (fd, kind) for pid, ipc, uts, cgroup: joined by the spawning thread.
    others: Vec<(OwnedFd, CloneFlags)>,
}

pub struct Container {
    pub id: String,
    dir: PathBuf,
    /// Agent-side mounts (overlay, tmpfs) undone at removal.
    mounts: Vec<PathBuf>,
    pub init: Arc<Process>,
    /// The socket to the waiting init helper until the container starts.
    start: tokio::sync::Mutex<Option<UnixStream>>,
    execs: tokio::sync::Mutex<HashMap<String, Arc<Process>>>,
    namespaces: Namespaces,
    cgroup: Cgroup,
    /// The spec's seccomp profile, for exec'd processes too.
    seccomp: Option<LinuxSeccomp>,
}

impl Container {
    pub async fn state(&self) -> State {
        if self.init.exited().is_some() {
            State::Stopped
        } else if self.start.lock().await.is_some() {
            State::Created
        } else {
            State::Running
        }
    }

    pub async fn exec_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.execs.lock().await.keys().cloned().collect();
        ids.sort();
        ids
    }

    fn oom_kills(&self) -> u64 {
        self.cgroup
            .read("memory.events")
            .and_then(|t| cgroup::flat_keyed(&t, "oom_kill"))
            .unwrap_or(0)
    }

    /// An exit as reported: with the OOM flag when the kernel's OOM killer
    /// killed a process of the container.
    pub fn report(&self, exit: Exit) -> (Exit, bool) {
        let oom = exit.signal == libc::SIGKILL && self.oom_kills() > 0;
        (exit, oom)
    }
}

/// The agent's containers.
pub struct Containers {
    reaper: Arc<Reaper>,
    exe: AgentExe,
    state_dir: PathBuf,
    cgroup_root: PathBuf,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Serializes creations (so an id is never taken twice).
    create_lock: tokio::sync::Mutex<()>,
    events: broadcast::Sender<Event>,
    /// The sandbox's PID namespace when containers share one.
    shared_pid_ns: Mutex<Option<Arc<OwnedFd>>>,
    /// The process holding that namespace.
    pause: Mutex<Option<Arc<Process>>>,
}

/// How long the agent waits for the setup helper to answer.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGKILLed container may take to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

impl Containers {
    pub fn new(
        reaper: Arc<Reaper>,
        state_dir: PathBuf,
        cgroup_root: PathBuf,
    ) -> Result<Self, Error> {
        let (events, _) = broadcast::channel(256);
        Ok(Self {
            reaper,
            exe: AgentExe::open()?,
            state_dir,
            cgroup_root,
            containers: Mutex::new(HashMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
            events,
            shared_pid_ns: Mutex::new(None),
            pause: Mutex::new(None),
        })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Creates the sandbox's PID namespace (held by a pause process) that
    /// every container created from now on joins.
    pub async fn share_pid_namespace(&self) -> Result<(), Error> {
        if self
            .pause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let (ours, theirs) = UnixStream::pair().map_err(Error::Helper)?;
        let null = || -> Result<OwnedFd, Error> {
            fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(Error::Helper)
        };
        let spawned = self
            .spawn(SpawnSpec {
                new_namespaces: CloneFlags::CLONE_NEWPID,
                join: vec![],
                child_fds: vec![null()?, null()?, null()?, theirs.into()],
            })
            .await?;
        let pause = Arc::new(Process {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            exit: spawned.exit,
            stdio: Stdio {
                stdin: tokio::sync::Mutex::new(None),
                stdout: Arc::new(tokio::sync::Mutex::new(None)),
                stderr: Arc::new(tokio::sync::Mutex::new(None)),
                tty: None,
            },
        });
        let sent =
            tokio::task::spawn_blocking(move || exchange(&ours, Some(&ToHelper::Pause))).await?;
        let ns = match sent {
            Ok(None) => fs::File::open(format!("/proc/{}/ns/pid", pause.pid))
                .map(OwnedFd::from)
                .map_err(|source| Error::Namespaces {
                    pid: pause.pid,
                    source,
                }),
            Ok(Some(_)) => Err(Error::Setup("unexpected answer from the helper".into())),
            Err(e) => Err(e),
        };
        let ns = match ns {
            Ok(ns) => ns,
            Err(e) => {
                let _ = pause.signal(libc::SIGKILL);
                return Err(e);
            }
        };
        *self.shared_pid_ns.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(ns));
        *self.pause.lock().unwrap_or_else(|e| e.into_inner()) = Some(pause);
        Ok(())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &str) -> Result<Arc<Container>, Error> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    pub fn list(&self) -> Vec<Arc<Container>> {
        let mut list: Vec<_> = self.map().values().cloned().collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    pub async fn process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Container>, Arc<Process>), Error> {
        let container = self.get(id)?;
        if exec_id.is_empty() {
            let init = container.init.clone();
            return Ok((container, init));
        }
        let process = container.execs.lock().await.get(exec_id).cloned();
        match process {
            Some(p) => Ok((container, p)),
            None => Err(Error::ProcessNotFound {
                id: id.into(),
                exec_id: exec_id.into(),
            }),
        }
    }

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
        let plan = self.namespace_plan(&spec)?;
        let _creating = self.create_lock.lock().await;
        if self.map().contains_key(&id) {
            return Err(Error::Exists(id));
        }
        let dir = self.state_dir.join("containers").join(&id);
        let rootfs_source = request.rootfs;
        let prepare_dir = dir.clone();
        let rootfs = tokio::task::spawn_blocking(move || {
            storage::prepare_rootfs(&rootfs_source, &prepare_dir)
        })
        .await??;
        let cleanup = |mounts: Vec<PathBuf>, dir: PathBuf| async move {
            let _ = tokio::task::spawn_blocking(move || {
                storage::unmount_all(&mounts);
                let _ = fs::remove_dir_all(&dir);
            })
            .await;
        };
        let result = self.create_init(&id, &spec, &rootfs.path, plan).await;
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

    async fn create_init(
        &self,
        id: &str,
        spec: &Spec,
        rootfs: &Path,
        plan: NamespacePlan,
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
        let spawn = SpawnSpec {
            new_namespaces: plan.new - CloneFlags::CLONE_NEWCGROUP,
            join: plan.join,
            child_fds: vec![child.stdin, child.stdout, child.stderr, theirs.into()],
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
            cgroup.add_process(init.pid)?;
            if let Some(resources) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
                cgroup.apply(resources)?;
            }
            let config = ToHelper::Init(Box::new(InitConfig {
                rootfs: rootfs.to_path_buf(),
                spec: spec.clone(),
                new_uts: plan.new_uts,
                new_cgroup_ns,
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

    async fn spawn(&self, spec: SpawnSpec) -> Result<process::Spawned, Error> {
        // The reaper and the binary live as long as the agent; the thread
        // that clones is scoped inside spawn_helper.
        let reaper = self.reaper.clone();
        let exe = self.exe.try_clone()?;
        Ok(
            tokio::task::spawn_blocking(move || process::spawn_helper(&reaper, &exe, spec))
                .await??,
        )
    }

    fn namespace_plan(&self, spec: &Spec) -> Result<NamespacePlan, Error> {
        let mut plan = NamespacePlan {
            new: CloneFlags::CLONE_NEWNS,
            join: vec![],
            new_uts: false,
            new_pid_joined: true,
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
                LinuxNamespaceType::User => {
                    return Err(Error::Invalid("user namespaces are not supported".into()));
                }
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
        let spawned = self
            .spawn(SpawnSpec {
                new_namespaces: CloneFlags::empty(),
                join,
                child_fds: vec![child.stdin, child.stdout, child.stderr, theirs.into(), mnt],
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

    fn watch_exit(&self, container: &Arc<Container>, exec_id: String, process: &Arc<Process>) {
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
    fn watch_oom(&self, container: &Arc<Container>) {
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

    /// Signals one process, or every process of the container.
    pub async fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), Error> {
        if !process::valid_signal(signal) {
            return Err(Error::Invalid(format!("{signal} is not a signal number")));
        }
        let (container, process) = self.process(id, exec_id).await?;
        if all && signal == libc::SIGKILL {
            // Everything in its cgroup, orphans included.
            container.cgroup.kill_all();
        }
        if all {
            for info in self.processes(&container).await {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(info.pid),
                    nix::sys::signal::Signal::try_from(signal).ok(),
                );
            }
        }
        process.signal(signal)
    }

    /// The processes of a container: its init, its execs and everything
    /// they started (descendants, read from /proc).
    pub async fn processes(&self, container: &Container) -> Vec<ProcessInfo> {
        let mut roots = vec![container.init.pid];
        if container.init.exited().is_some() {
            roots.clear();
        }
        for p in container.execs.lock().await.values() {
            if p.exited().is_none() {
                roots.push(p.pid);
            }
        }
        tokio::task::spawn_blocking(move || descendants(&roots))
            .await
            .unwrap_or_default()
    }

    pub async fn output(&self, id: &str, exec_id: &str, stream: Stream) -> Result<Output, Error> {
        let (_, process) = self.process(id, exec_id).await?;
        Ok(match stream {
            Stream::Stdout => process.stdio.stdout.clone(),
            Stream::Stderr => process.stdio.stderr.clone(),
        })
    }

    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<(), Error> {
        let (_, process) = self.process(id, exec_id).await?;
        let stdin = process.stdio.stdin.lock().await.clone();
        let Some(stdin) = stdin else {
            return Err(Error::Precondition("stdin is closed".into()));
        };
        stdin.write_all(data).await.map_err(Error::Stdin)
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), Error> {
        let (_, process) = self.process(id, exec_id).await?;
        let stdin = process.stdio.stdin.lock().await.take();
        if let (Some(stdin), Some(_)) = (stdin, &process.stdio.tty) {
            // A terminal stays open for output: send end-of-input instead.
            stdin
                .write_all(&[stdio::TTY_EOF])
                .await
                .map_err(Error::Stdin)?;
        }
        Ok(())
    }

    pub async fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<(), Error> {
        let (_, process) = self.process(id, exec_id).await?;
        let Some(tty) = &process.stdio.tty else {
            return Err(Error::Precondition("the process has no terminal".into()));
        };
        let (Ok(rows), Ok(cols)) = (u16::try_from(rows), u16::try_from(cols)) else {
            return Err(Error::Invalid("terminal size out of range".into()));
        };
        Ok(stdio::resize(tty, rows, cols)?)
    }

    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), Error> {
        let container = self.get(id)?;
        let resources: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| Error::Invalid(format!("malformed OCI LinuxResources JSON: {e}")))?;
        Ok(container.cgroup.apply(&resources)?)
    }

    pub async fn stats(&self, id: &str) -> Result<Stats, Error> {
        let container = self.get(id)?;
        let cg = &container.cgroup;
        let cpu = cg.read("cpu.stat").unwrap_or_default();
        let mem = cg.read("memory.stat").unwrap_or_default();
        let usage = cg
            .read("memory.current")
            .and_then(|t| cgroup::single_value(&t));
        let inactive_file = cgroup::flat_keyed(&mem, "inactive_file").unwrap_or(0);
        let pids = match cg
            .read("pids.current")
            .and_then(|t| cgroup::single_value(&t))
        {
            Some(n) => n,
            None => self.processes(&container).await.len() as u64,
        };
        let usec = |key| cgroup::flat_keyed(&cpu, key).unwrap_or(0) * 1000;
        Ok(Stats {
            cpu_usage_ns: usec("usage_usec"),
            cpu_user_ns: usec("user_usec"),
            cpu_system_ns: usec("system_usec"),
            nr_periods: cgroup::flat_keyed(&cpu, "nr_periods").unwrap_or(0),
            nr_throttled: cgroup::flat_keyed(&cpu, "nr_throttled").unwrap_or(0),
            throttled_ns: usec("throttled_usec"),
            memory_usage: usage.unwrap_or(0),
            working_set: usage.unwrap_or(0).saturating_sub(inactive_file),
            rss: cgroup::flat_keyed(&mem, "anon").unwrap_or(0),
            page_faults: cgroup::flat_keyed(&mem, "pgfault").unwrap_or(0),
            major_page_faults: cgroup::flat_keyed(&mem, "pgmajfault").unwrap_or(0),
            memory_limit: cg
                .read("memory.max")
                .and_then(|t| cgroup::single_value(&t))
                .unwrap_or(0),
            oom_kills: container.oom_kills(),
            pids,
            pids_limit: cg
                .read("pids.max")
                .and_then(|t| cgroup::single_value(&t))
                .unwrap_or(0),
        })
    }

    /// Stops whatever still runs in the container (SIGTERM, then SIGKILL
    /// after `grace`), undoes its mounts and cgroup, and forgets it.
    pub async fn remove(&self, id: &str, grace: Duration) -> Result<(), Error> {
        let container = self.get(id)?;
        self.stop(&container, grace).await?;
        // Created but never started: the helper is gone; drop its socket.
        container.start.lock().await.take();
        let mounts = container.mounts.clone();
        let dir = container.dir.clone();
        let c = container.clone();
        tokio::task::spawn_blocking(move || {
            storage::unmount_all(&mounts);
            let _ = fs::remove_dir_all(&dir);
            c.cgroup.remove()
        })
        .await??;
        self.map().remove(id);
        tracing::info!(container = %id, "container removed");
        Ok(())
    }

    async fn stop(&self, container: &Container, grace: Duration) -> Result<(), Error> {
        let init = &container.init;
        let started = container.start.lock().await.is_none();
        if init.exited().is_none() && started && !grace.is_zero() {
            let _ = init.signal(libc::SIGTERM);
            let _ = tokio::time::timeout(grace, init.wait()).await;
        }
        // Killing the init of a PID namespace kills everything in it; in a
        // shared namespace, kill the container's processes one by one.
        for info in self.processes(container).await {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(info.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = init.signal(libc::SIGKILL);
        container.cgroup.kill_all();
        let execs: Vec<_> = container.execs.lock().await.values().cloned().collect();
        for p in &execs {
            let _ = p.signal(libc::SIGKILL);
        }
        let all_dead = async {
            init.wait().await;
            for p in &execs {
                p.wait().await;
            }
        };
        tokio::time::timeout(KILL_TIMEOUT, all_dead)
            .await
            .map_err(|_| Error::Unkillable(container.id.clone()))
    }

    /// Stops and removes every container (guest shutdown).
    pub async fn remove_all(&self, grace: Duration) {
        let list = self.list();
        for c in &list {
            if c.init.exited().is_none() && c.start.lock().await.is_none() {
                let _ = c.init.signal(libc::SIGTERM);
            }
        }
        let _ = tokio::time::timeout(grace, async {
            for c in &list {
                c.init.wait().await;
            }
        })
        .await;
        for c in list {
            if let Err(e) = self.remove(&c.id, Duration::ZERO).await {
                tracing::warn!(container = %c.id, "cannot remove: {e}");
            }
        }
        let pause = self.pause.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(pause) = pause {
            let _ = pause.signal(libc::SIGKILL);
            let _ = tokio::time::timeout(KILL_TIMEOUT, pause.wait()).await;
        }
    }
}

/// Usage figures of a container (zero where cgroups are unavailable).
#[derive(Debug, Default)]
pub struct Stats {
    pub cpu_usage_ns: u64,
    pub cpu_user_ns: u64,
    pub cpu_system_ns: u64,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_ns: u64,
    pub memory_usage: u64,
    pub working_set: u64,
    pub rss: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
    pub memory_limit: u64,
    pub oom_kills: u64,
    pub pids: u64,
    pub pids_limit: u64,
}

struct NamespacePlan {
    new: CloneFlags,
    join: Vec<(OwnedFd, CloneFlags)>,
    new_uts: bool,
    /// The container has a PID namespace of its own.
    new_pid_joined: bool,
}

fn check_process(process: &OciProcess) -> Result<(), Error> {
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

fn open_stdio(process: &OciProcess) -> Result<(Stdio, stdio::ChildStdio), Error> {
    Ok(if process.terminal() == Some(true) {
        let (rows, cols) = process
            .console_size()
            .map(|s| (s.height() as u16, s.width() as u16))
            .unwrap_or((0, 0));
        stdio::pty(rows, cols)?
    } else {
        stdio::pipes()?
    })
}

fn helper_error(invalid: bool, message: String) -> Error {
    if invalid {
        Error::Invalid(message)
    } else {
        Error::Setup(message)
    }
}

/// Sends `message` (if any) to a helper and reads its answer; `None` when
/// the helper closed the socket (it executed the process).
fn exchange(sync: &UnixStream, message: Option<&ToHelper>) -> Result<Option<FromHelper>, Error> {
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

fn open_namespaces(pid: i32, _own_pid: bool) -> Result<Namespaces, Error> {
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

/// One process as /proc shows it.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    pub pid: i32,
    pub ppid: i32,
    pub uid: u32,
    pub state: String,
    pub args: Vec<String>,
}

fn read_process(pid: i32) -> Option<ProcessInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 2..];
    let mut fields = after.split(' ');
    let state = fields.next()?.to_string();
    let ppid = fields.next()?.parse().ok()?;
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap_or(0);
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(ProcessInfo {
        pid,
        ppid,
        uid,
        state,
        args,
    })
}

/// The living processes among `roots` and their descendants.
fn descendants(roots: &[i32]) -> Vec<ProcessInfo> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return vec![];
    };
    let all: Vec<ProcessInfo> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read_process)
        .filter(|p| p.state != "Z")
        .collect();
    let mut wanted: std::collections::HashSet<i32> = roots.iter().copied().collect();
    // Parents may have larger pids than children (pid wrap): iterate to a
    // fixed point.
    loop {
        let before = wanted.len();
        for p in &all {
            if wanted.contains(&p.ppid) {
                wanted.insert(p.pid);
            }
        }
        if wanted.len() == before {
            break;
        }
    }
    let mut list: Vec<ProcessInfo> = all
        .into_iter()
        .filter(|p| wanted.contains(&p.pid))
        .collect();
    list.sort_by_key(|p| p.pid);
    list
}

/// Sends what a stream has, in chunks, until EOF or until the receiver
/// goes away; one reader at a time.
pub async fn drain(
    output: Output,
    chunk: usize,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> Result<(), Error> {
    let Ok(mut guard) = output.try_lock_owned() else {
        return Err(Error::Precondition(
            "the stream already has a reader".into(),
        ));
    };
    tokio::spawn(async move {
        let mut buf = vec![0u8; chunk];
        loop {
            let Some(fd) = guard.as_ref() else { return };
            let fd: &FdIo = fd;
            let read = tokio::select! {
                read = fd.read(&mut buf) => read,
                () = tx.closed() => return,
            };
            match read {
                Ok(0) => {
                    // End of file: later readers get nothing either.
                    *guard = None;
                    return;
                }
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("reading process output: {e}");
                    *guard = None;
                    return;
                }
            }
        }
    });
    Ok(())
}
