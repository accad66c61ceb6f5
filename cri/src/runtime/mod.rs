//! The CRI RuntimeService's core: pods, one VM each, and their containers,
//! run by the agent inside. The gRPC layer (`server::runtime_service`) is a
//! thin translation of this module's operations:
//!
//! - `pod`: RunPodSandbox, StopPodSandbox, RemovePodSandbox, the VM's death;
//! - `container`: Create/Start/Stop/RemoveContainer, exits, logs;
//! - `mounts`: CRI mounts copied into the guest; `exec`: ExecSync;
//! - `stats`, `recover` (after a daemon restart), `state` (records on disk),
//!   `sizing` (the VM's size), `spec` (the OCI spec), `logs` (CRI format).

pub mod logs;
pub mod sizing;
pub mod spec;
pub mod state;

mod container;
mod devices;
mod exec;
mod guest_network;
pub mod metrics;
mod mounts;
mod pod;
mod pumps;
mod recover;
mod scratch;
mod stats;
mod sync;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_cri::v1 as cri;
use tokio::sync::broadcast;

use crate::image::ImageStore;
use crate::sandbox::{agent, api, vmm};

pub use container::Container;
pub use exec::ExecOutput;
pub use pod::Pod;

/// How long one agent call may take before the daemon gives up on it (a
/// hung guest must not hang kubelet).
const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error(transparent)]
    Spec(#[from] spec::Error),
    #[error(transparent)]
    Sizing(#[from] sizing::Error),
    #[error("the pod VM cannot hold the container: {0}")]
    TooBig(#[source] sizing::Error),
    #[error(transparent)]
    State(#[from] state::Error),
    #[error(transparent)]
    Vmm(#[from] vmm::Error),
    #[error(transparent)]
    VmmApi(#[from] api::Error),
    #[error("the pod's agent")]
    AgentConnect(#[from] agent::Error),
    #[error("agent {call}: {}", status.message())]
    Agent {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("agent {0}: no answer within {AGENT_CALL_TIMEOUT:?}")]
    AgentTimeout(&'static str),
    #[error(transparent)]
    Image(#[from] crate::image::store::Error),
    #[error(transparent)]
    Log(#[from] logs::Error),
    #[error(transparent)]
    Network(#[from] crate::network::Error),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One agent call with the daemon's timeout.
pub(crate) async fn agent_call<T>(
    call: &'static str,
    future: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(AGENT_CALL_TIMEOUT, future).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(Error::Agent { call, status }),
        Err(_) => Err(Error::AgentTimeout(call)),
    }
}

/// The daemon's runtime settings (flags / config file).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// State root (`--root`): pods live in `<root>/pods`.
    pub root: PathBuf,
    pub assets: vmm::VmAssets,
    pub sizing: sizing::SizingDefaults,
    /// How long a new VM may take until its agent answers.
    pub boot_timeout: Duration,
    /// Sysctls outside the safe set are refused unless listed here
    /// (kubelet's --allowed-unsafe-sysctls).
    pub allowed_unsafe_sysctls: Vec<String>,
    /// `ip:port` of the streaming server (exec/attach/port-forward URLs).
    pub streaming_addr: String,
    /// Size of each disk-backed emptyDir volume (sparse); 0 keeps every
    /// emptyDir in guest memory.
    pub empty_dir_bytes: u64,
    pub network: crate::network::NetworkSettings,
}

pub(crate) use crate::lock;

/// Nanoseconds since the epoch, as CRI timestamps are.
pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Names in use: kubelet's pod and container names are unique until the
/// object that holds one is removed.
#[derive(Default)]
struct Names(HashMap<String, String>);

impl Names {
    fn reserve(&mut self, name: &str, id: &str) -> Result<()> {
        match self.0.get(name) {
            Some(holder) if holder != id => Err(Error::AlreadyExists(format!(
                "the name {name:?} is reserved for {holder}"
            ))),
            _ => {
                self.0.insert(name.to_string(), id.to_string());
                Ok(())
            }
        }
    }

    fn release(&mut self, name: &str, id: &str) {
        if self.0.get(name).is_some_and(|holder| holder == id) {
            self.0.remove(name);
        }
    }
}

/// The pod name kubelet's naming makes unique: name, namespace, uid and
/// attempt.
pub(crate) fn pod_name(metadata: &cri::PodSandboxMetadata) -> String {
    format!(
        "{}_{}_{}_{}",
        metadata.name, metadata.namespace, metadata.uid, metadata.attempt
    )
}

pub(crate) struct Inner {
    pub(crate) config: RuntimeConfig,
    pub(crate) layout: state::Layout,
    pub(crate) images: ImageStore,
    pods: Mutex<HashMap<String, Arc<Pod>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    names: Mutex<Names>,
    events: broadcast::Sender<cri::ContainerEventResponse>,
    /// The pod CIDR kubelet last set (UpdateRuntimeConfig).
    pub(crate) pod_cidr: Mutex<String>,
    pub(crate) network: crate::network::Network,
    /// Direct-assigned volumes (`frakti volume add`).
    pub(crate) volumes: crate::volume::VolumeStore,
}

/// The runtime: cheap to clone, shared by the gRPC services.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<Inner>,
}

impl Runtime {
    /// Opens the state under `config.root` and recovers what a previous
    /// daemon left: running pods are found again, half-made ones removed.
    pub async fn open(config: RuntimeConfig, images: ImageStore) -> Result<Runtime> {
        let network = config.network.clone();
        let volumes = crate::volume::VolumeStore::new(&config.root);
        let layout = state::Layout::new(&config.root);
        layout.create()?;
        let (events, _) = broadcast::channel(1024);
        let runtime = Runtime {
            inner: Arc::new(Inner {
                config,
                layout,
                images,
                pods: Mutex::default(),
                containers: Mutex::default(),
                names: Mutex::default(),
                events,
                pod_cidr: Mutex::default(),
                network: crate::network::Network::new(network),
                volumes,
            }),
        };
        recover::recover(&runtime).await;
        Ok(runtime)
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    pub fn pod(&self, id: &str) -> Result<Arc<Pod>> {
        let pods = lock(&self.inner.pods);
        find(&pods, id).ok_or_else(|| Error::NotFound {
            kind: "pod sandbox",
            id: id.to_string(),
        })
    }

    pub fn pods(&self) -> Vec<Arc<Pod>> {
        lock(&self.inner.pods).values().cloned().collect()
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>> {
        let containers = lock(&self.inner.containers);
        find(&containers, id).ok_or_else(|| Error::NotFound {
            kind: "container",
            id: id.to_string(),
        })
    }

    pub fn containers(&self) -> Vec<Arc<Container>> {
        lock(&self.inner.containers).values().cloned().collect()
    }

    pub fn containers_of(&self, pod: &str) -> Vec<Arc<Container>> {
        lock(&self.inner.containers)
            .values()
            .filter(|c| c.pod_id == pod)
            .cloned()
            .collect()
    }

    /// Kubelet's evented PLEG stream.
    pub fn subscribe(&self) -> broadcast::Receiver<cri::ContainerEventResponse> {
        self.inner.events.subscribe()
    }

    pub(crate) fn emit(&self, container: &Container, kind: cri::ContainerEventType) {
        let Ok(pod) = self.pod(&container.pod_id) else {
            return;
        };
        let statuses = self
            .containers_of(&pod.id)
            .iter()
            .map(|c| c.status(false))
            .collect();
        let event = cri::ContainerEventResponse {
            container_id: container.id.clone(),
            container_event_type: kind as i32,
            created_at: now_ns(),
            pod_sandbox_status: Some(pod.status()),
            containers_statuses: statuses,
        };
        // Nobody listening is fine.
        let _ = self.inner.events.send(event);
    }

    fn reserve_name(&self, name: &str, id: &str) -> Result<()> {
        lock(&self.inner.names).reserve(name, id)
    }

    fn release_name(&self, name: &str, id: &str) {
        lock(&self.inner.names).release(name, id);
    }
}

/// By full id, or by a unique prefix (as `crictl` users type them).
fn find<T: Clone>(map: &HashMap<String, T>, id: &str) -> Option<T> {
    if let Some(found) = map.get(id) {
        return Some(found.clone());
    }
    if id.is_empty() {
        return None;
    }
    let mut matches = map.iter().filter(|(k, _)| k.starts_with(id));
    match (matches.next(), matches.next()) {
        (Some((_, found)), None) => Some(found.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_held_until_released_by_their_holder() {
        let mut names = Names::default();
        names.reserve("web_default_u1_0", "a").unwrap();
        names.reserve("web_default_u1_0", "a").unwrap();
        let err = names.reserve("web_default_u1_0", "b").unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        names.release("web_default_u1_0", "b");
        assert!(names.reserve("web_default_u1_0", "b").is_err());
        names.release("web_default_u1_0", "a");
        names.reserve("web_default_u1_0", "b").unwrap();
    }

    #[test]
    fn ids_match_whole_or_by_unique_prefix() {
        let map: HashMap<String, u32> = [("abc1".to_string(), 1), ("abd2".to_string(), 2)]
            .into_iter()
            .collect();
        assert_eq!(find(&map, "abc1"), Some(1));
        assert_eq!(find(&map, "abd"), Some(2));
        assert_eq!(find(&map, "ab"), None);
        assert_eq!(find(&map, ""), None);
        assert_eq!(find(&map, "x"), None);
    }
}
