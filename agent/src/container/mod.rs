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
//!
//! Here: the registry of containers and their types; `create.rs` (create,
//! start: namespaces, cgroup, setup helper), `exec.rs` (exec, exit and OOM
//! watchers), `signal.rs` (signals, /proc listing), `streams.rs` (stdio),
//! `stats.rs` (update, stats), `remove.rs` (stop, remove), `unsupported.rs`
//! (what a spec may ask for that the VM cannot honour: refused).

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
use crate::io::{self as stdio, Output, Stdio};
use crate::process::{self, AgentExe, ExitWatch, Reaper, SpawnSpec};
use crate::seccomp;
use crate::storage::{self, RootfsSource};

mod create;
use create::{check_process, exchange, helper_error, open_stdio};
mod exec;
mod remove;
mod signal;
mod stats;
mod streams;
mod unsupported;
mod userns;

pub use signal::ProcessInfo;
pub use stats::Stats;
pub use userns::PodUserns;

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

impl From<crate::idmap::Error> for Error {
    fn from(e: crate::idmap::Error) -> Self {
        let crate::idmap::Error::Invalid(message) = e;
        Error::Invalid(message)
    }
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
    /// The pod's user namespace when the container is in it (its execs
    /// enter it too).
    userns: Option<Arc<PodUserns>>,
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
    /// The pod's user namespace, once a container asked for one.
    userns: Mutex<Option<Arc<PodUserns>>>,
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
            userns: Mutex::new(None),
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
        let spawned = self
            .spawn(SpawnSpec {
                new_namespaces: CloneFlags::CLONE_NEWPID,
                join: vec![],
                child_fds: vec![dev_null()?, dev_null()?, dev_null()?, theirs.into()],
            })
            .await?;
        let pause = Arc::new(Process {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            exit: spawned.exit,
            stdio: Stdio {
                stdin: tokio::sync::Mutex::new(None),
                stdout: Output::ended(),
                stderr: Output::ended(),
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
}

/// /dev/null for a helper's stdio.
fn dev_null() -> Result<OwnedFd, Error> {
    fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(Error::Helper)
}
