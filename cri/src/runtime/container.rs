//! Containers: CreateContainer turns the CRI config and the image into an
//! OCI spec on the pod's (shared) image disk; StartContainer lets it run and
//! starts its log pumps and exit watcher; StopContainer signals (the
//! image's StopSignal, then SIGKILL); RemoveContainer forgets it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use frakti_proto::agent::v1 as pb;
use k8s_cri::v1 as cri;
use tokio::sync::{broadcast, watch};

use super::logs::{ContainerLog, StreamKind};
use super::pod::Pod;
use super::spec::{self, SpecInput};
use super::state::{self, ContainerPhase, ContainerRecord};
use super::sync::{self, SyncHandle, SyncedMount};
use super::{Error, Result, Runtime, agent_call, lock, mounts, now_ns, sizing};
use crate::sandbox::agent::AgentClient;

/// After SIGKILL, how long the exit may take to be reported.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Where SetupSandbox leaves the pod's resolv.conf and hostname.
const GUEST_RESOLV_CONF: &str = "/run/frakti/sandbox/resolv.conf";
const GUEST_HOSTNAME: &str = "/run/frakti/sandbox/hostname";

pub struct Container {
    pub id: String,
    pub pod_id: String,
    pub config: cri::ContainerConfig,
    pub dir: PathBuf,
    /// The reserved name: container name, pod name, attempt.
    pub name: String,
    pub(crate) record: Mutex<ContainerRecord>,
    /// Resources as last set (create or UpdateContainerResources).
    pub(crate) resources: Mutex<Option<cri::LinuxContainerResources>>,
    pub(crate) log: Mutex<Option<Arc<ContainerLog>>>,
    /// Keeps its copied mounts in sync with the host until it exits.
    pub(crate) sync: Mutex<Option<SyncHandle>>,
    /// Set once the container has exited.
    pub(crate) exited: watch::Sender<bool>,
    /// The init process's output as the log pumps read it, for attach
    /// clients; one that lags loses chunks rather than stalling the logs.
    pub(crate) output: broadcast::Sender<(StreamKind, Bytes)>,
    /// The log pumps, awaited (briefly) before the exit is recorded so that
    /// whoever sees the exit finds all of the output in the log.
    pub(crate) pumps: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// How long the exit waits for the log pumps: a process that left a child
/// holding its stdout open would keep them going.
const PUMP_DRAIN_WAIT: Duration = Duration::from_secs(2);

/// Output chunks an attach client may lag behind before it loses some.
const ATTACH_BACKLOG: usize = 64;

fn exit_reason(status: &pb::ExitStatus) -> &'static str {
    if status.oom_killed {
        "OOMKilled"
    } else if status.exit_code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

impl Container {
    pub(crate) fn new(
        record: ContainerRecord,
        config: cri::ContainerConfig,
        dir: PathBuf,
        pod: &Pod,
    ) -> Container {
        let metadata = config.metadata.clone().unwrap_or_default();
        let exited = record.phase == ContainerPhase::Exited;
        Container {
            id: record.id.clone(),
            pod_id: record.pod_id.clone(),
            name: format!("{}_{}_{}", metadata.name, pod.name, metadata.attempt),
            resources: Mutex::new(config.linux.as_ref().and_then(|l| l.resources.clone())),
            config,
            dir,
            record: Mutex::new(record),
            log: Mutex::new(None),
            sync: Mutex::new(None),
            exited: watch::channel(exited).0,
            output: broadcast::channel(ATTACH_BACKLOG).0,
            pumps: Mutex::new(Vec::new()),
        }
    }

    pub fn phase(&self) -> ContainerPhase {
        lock(&self.record).phase
    }

    pub fn record(&self) -> ContainerRecord {
        lock(&self.record).clone()
    }

    /// Where the log pumps save how far the log has each stream.
    pub(crate) fn log_progress_path(&self) -> PathBuf {
        self.dir.join("log-progress")
    }

    pub(crate) fn save(&self) {
        let record = self.record();
        if let Err(e) = state::write_json(&self.dir.join("container.json"), &record) {
            tracing::warn!(container = %self.id, "{}", crate::error_chain(&e));
        }
    }

    /// Records the init process's exit; false if it was already recorded.
    pub(crate) fn record_exit(&self, status: &pb::ExitStatus) -> bool {
        self.finish(status.exit_code, exit_reason(status), None)
    }

    /// The container's VM is gone (or stopped): it exited, with `message`.
    pub(crate) fn mark_lost(&self, message: &str) -> bool {
        self.finish(137, "Error", Some(message))
    }

    /// Makes the container EXITED (once: false if it already was), saves
    /// the record and wakes those waiting for the exit.
    fn finish(&self, exit_code: i32, reason: &str, message: Option<&str>) -> bool {
        {
            let mut record = lock(&self.record);
            if record.phase == ContainerPhase::Exited {
                return false;
            }
            record.phase = ContainerPhase::Exited;
            record.exit_code = exit_code;
            // The guest's clock is not the host's (kubelet compares these
            // with started_at): the host's time of hearing of the exit.
            record.finished_at = now_ns().max(record.started_at);
            record.reason = reason.to_string();
            if let Some(message) = message {
                record.message = message.to_string();
            }
        }
        self.save();
        self.exited.send_replace(true);
        true
    }

    /// Lets the log pumps write the last output (for a while).
    async fn drain_pumps(&self) {
        let pumps = std::mem::take(&mut *lock(&self.pumps));
        let all = futures_util::future::join_all(pumps);
        if tokio::time::timeout(PUMP_DRAIN_WAIT, all).await.is_err() {
            tracing::debug!(container = %self.id, "output still open {PUMP_DRAIN_WAIT:?} after the exit");
        }
    }

    async fn wait_exited(&self, timeout: Duration) -> bool {
        let mut exited = self.exited.subscribe();
        tokio::time::timeout(timeout, exited.wait_for(|done| *done))
            .await
            .is_ok()
    }

    async fn signal(&self, agent: &mut AgentClient, signal: i32, all: bool) -> Result<()> {
        let request = pb::SignalProcessRequest {
            container_id: self.id.clone(),
            exec_id: String::new(),
            signal,
            all,
        };
        agent_call("SignalProcess", agent.signal_process(request)).await?;
        Ok(())
    }

    /// The stop signal, then SIGKILL to everything in the container once
    /// `grace` has passed; returns once the exit is recorded (or given up).
    pub(crate) async fn kill_and_wait(&self, mut agent: AgentClient, grace: Duration) {
        let stop_signal = lock(&self.record).stop_signal;
        if !grace.is_zero() {
            match self.signal(&mut agent, stop_signal, false).await {
                Ok(()) if self.wait_exited(grace).await => return,
                Ok(()) => {}
                Err(e) => tracing::debug!(container = %self.id, "{}", crate::error_chain(&e)),
            }
        }
        if let Err(e) = self.signal(&mut agent, libc::SIGKILL, true).await {
            tracing::debug!(container = %self.id, "{}", crate::error_chain(&e));
        }
        if !self.wait_exited(KILL_WAIT).await {
            tracing::warn!(container = %self.id, "no exit reported {KILL_WAIT:?} after SIGKILL");
        }
    }

    pub fn summary(&self) -> cri::Container {
        let record = self.record();
        cri::Container {
            id: self.id.clone(),
            pod_sandbox_id: self.pod_id.clone(),
            metadata: self.config.metadata.clone(),
            image: Some(image_spec(&record, &self.config)),
            image_ref: record.image_ref.clone(),
            state: cri_state(record.phase) as i32,
            created_at: record.created_at,
            labels: self.config.labels.clone(),
            annotations: self.config.annotations.clone(),
            image_id: record.image_id.clone(),
        }
    }

    pub fn status(&self, verbose: bool) -> cri::ContainerStatus {
        let record = self.record();
        let _ = verbose;
        let user = record
            .spec
            .pointer("/process/user")
            .map(|user| cri::ContainerUser {
                linux: Some(cri::LinuxContainerUser {
                    uid: user.get("uid").and_then(|v| v.as_i64()).unwrap_or(0),
                    gid: user.get("gid").and_then(|v| v.as_i64()).unwrap_or(0),
                    supplemental_groups: user
                        .get("additionalGids")
                        .and_then(|v| v.as_array())
                        .map(|gids| gids.iter().filter_map(|g| g.as_i64()).collect())
                        .unwrap_or_default(),
                }),
            });
        cri::ContainerStatus {
            id: self.id.clone(),
            metadata: self.config.metadata.clone(),
            state: cri_state(record.phase) as i32,
            created_at: record.created_at,
            started_at: record.started_at,
            finished_at: record.finished_at,
            exit_code: record.exit_code,
            image: Some(image_spec(&record, &self.config)),
            image_ref: record.image_ref.clone(),
            reason: record.reason.clone(),
            message: record.message.clone(),
            labels: self.config.labels.clone(),
            annotations: self.config.annotations.clone(),
            mounts: self.config.mounts.clone(),
            log_path: record.log_path.clone(),
            resources: lock(&self.resources)
                .clone()
                .map(|linux| cri::ContainerResources {
                    linux: Some(linux),
                    windows: None,
                }),
            image_id: record.image_id.clone(),
            user,
        }
    }

    /// Verbose info (`crictl inspect`): the record as JSON.
    pub fn info(&self) -> String {
        serde_json::to_string(&self.record()).unwrap_or_default()
    }
}

/// What the guest made of a container: its spec and its mounts.
struct Created {
    spec: serde_json::Value,
    stop_signal: i32,
    synced: Vec<SyncedMount>,
    copy_back: Vec<(String, std::path::PathBuf)>,
}

fn image_spec(record: &ContainerRecord, config: &cri::ContainerConfig) -> cri::ImageSpec {
    let requested = config.image.clone().unwrap_or_default();
    cri::ImageSpec {
        image: record.image.clone(),
        user_specified_image: requested.user_specified_image,
        annotations: requested.annotations,
        runtime_handler: requested.runtime_handler,
    }
}

fn cri_state(phase: ContainerPhase) -> cri::ContainerState {
    match phase {
        ContainerPhase::Created => cri::ContainerState::ContainerCreated,
        ContainerPhase::Running => cri::ContainerState::ContainerRunning,
        ContainerPhase::Exited => cri::ContainerState::ContainerExited,
    }
}

/// The CRI log file: the pod's log directory joined with the container's
/// log path (kubelet sends both); none when either is missing.
fn log_path(pod: &Pod, config: &cri::ContainerConfig) -> String {
    if pod.config.log_directory.is_empty() || config.log_path.is_empty() {
        return String::new();
    }
    Path::new(&pod.config.log_directory)
        .join(&config.log_path)
        .to_string_lossy()
        .into_owned()
}

impl Runtime {
    /// CreateContainer: the container exists in the guest, stopped before
    /// its process runs.
    pub async fn create_container(
        &self,
        pod_id: &str,
        config: cri::ContainerConfig,
    ) -> Result<String> {
        let pod = self.pod(pod_id)?;
        let metadata = config
            .metadata
            .clone()
            .filter(|m| !m.name.is_empty())
            .ok_or_else(|| Error::InvalidArgument("config.metadata.name is required".into()))?;
        let image = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| Error::InvalidArgument("config.image.image is required".into()))?;
        let _ops = pod.ops.lock().await;
        pod.agent()?;
        if let Some(resources) = config.linux.as_ref().and_then(|l| l.resources.as_ref()) {
            let size = pod.record().size;
            sizing::check_fits(&size, self.inner.config.sizing.guest_reserve_mib, resources)
                .map_err(Error::TooBig)?;
        }
        let id = state::new_id()?;
        let name = format!("{}_{}_{}", metadata.name, pod.name, metadata.attempt);
        self.reserve_name(&name, &id)?;
        match self.create_in(&pod, &id, config, &image).await {
            Ok(container) => {
                tracing::info!(container = %id, pod = %pod.id, name = %name, "container created");
                self.emit(&container, cri::ContainerEventType::ContainerCreatedEvent);
                Ok(id)
            }
            Err(e) => {
                self.release_name(&name, &id);
                let _ = std::fs::remove_dir_all(self.inner.layout.container_dir(&pod.id, &id));
                Err(e)
            }
        }
    }

    async fn create_in(
        &self,
        pod: &Arc<Pod>,
        id: &str,
        config: cri::ContainerConfig,
        image: &str,
    ) -> Result<Arc<Container>> {
        let lease = self.inner.images.lease(image).map_err(|e| match e {
            crate::image::store::Error::NotFound(_) => Error::NotFound {
                kind: "image",
                id: image.to_string(),
            },
            e => Error::Image(e),
        })?;
        let image_id = lease.image.to_string();
        let record = self
            .inner
            .images
            .status(&image_id)?
            .ok_or_else(|| Error::NotFound {
                kind: "image",
                id: image.to_string(),
            })?;
        let (passwd, group) = (lease.account_file("passwd"), lease.account_file("group"));
        let started = std::time::Instant::now();
        let image_disk = self.mount_image(pod, lease).await?;
        let mounted = started.elapsed();
        let result = self
            .create_on_disk(pod, id, &config, &record, &image_disk, (passwd, group))
            .await;
        tracing::debug!(
            container = %id,
            image_ms = mounted.as_millis() as u64,
            create_ms = (started.elapsed() - mounted).as_millis() as u64,
            "container creation timing"
        );
        match result {
            Ok(created) => {
                let dir = self.inner.layout.container_dir(&pod.id, id);
                let record = ContainerRecord {
                    id: id.to_string(),
                    pod_id: pod.id.clone(),
                    phase: ContainerPhase::Created,
                    created_at: now_ns(),
                    started_at: 0,
                    finished_at: 0,
                    exit_code: 0,
                    reason: String::new(),
                    message: String::new(),
                    image: image.to_string(),
                    image_id,
                    image_ref: record
                        .repo_digests
                        .first()
                        .cloned()
                        .unwrap_or_else(|| record.id.to_string()),
                    image_disk,
                    log_path: log_path(pod, &config),
                    stop_signal: created.stop_signal,
                    spec: created.spec,
                    synced: created
                        .synced
                        .iter()
                        .map(|m| (m.host_path.clone(), m.guest_base.clone()))
                        .collect(),
                    writable_synced: created
                        .synced
                        .iter()
                        .filter(|m| m.writable)
                        .map(|m| m.guest_base.clone())
                        .collect(),
                    copy_back: created.copy_back,
                };
                let container = Arc::new(Container::new(record, config, dir, pod));
                std::fs::create_dir_all(&container.dir).map_err(|source| Error::Io {
                    what: "cannot create",
                    path: container.dir.clone(),
                    source,
                })?;
                state::write_proto(&container.dir.join("config.pb"), &container.config)?;
                container.save();
                if let Ok(agent) = pod.agent() {
                    *lock(&container.sync) =
                        Some(sync::spawn(agent, id.to_string(), created.synced));
                }
                lock(&self.inner.containers).insert(id.to_string(), container.clone());
                Ok(container)
            }
            Err(e) => {
                mounts::remove(pod, id).await;
                self.detach_devices(pod, id).await;
                self.unmount_image(pod, &image_id).await;
                Err(e)
            }
        }
    }

    async fn create_on_disk(
        &self,
        pod: &Pod,
        id: &str,
        config: &cri::ContainerConfig,
        image: &crate::image::records::ImageRecord,
        image_disk: &str,
        (passwd, group): (Option<String>, Option<String>),
    ) -> Result<Created> {
        let mut agent = pod.agent()?;
        let empty_dir_bytes = self.inner.config.empty_dir_bytes;
        let direct = self
            .attach_direct_volumes(pod, id, &config.mounts, &mut agent)
            .await?;
        let prepared = mounts::prepare(
            pod,
            id,
            &config.mounts,
            &direct,
            &mut agent,
            empty_dir_bytes,
        )
        .await?;
        let devices = self
            .attach_devices(pod, id, &config.devices, &mut agent)
            .await?;
        let built = spec::build(&SpecInput {
            container_id: id,
            config,
            sandbox: &pod.config,
            image: &image.config,
            passwd: passwd.as_deref(),
            group: group.as_deref(),
            mounts: &prepared.mounts,
            resolv_conf: pod.config.dns_config.is_some().then_some(GUEST_RESOLV_CONF),
            hostname_file: (!pod.config.hostname.is_empty()).then_some(GUEST_HOSTNAME),
        })?;
        let spec_json = serde_json::to_value(&built.spec)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode the OCI spec: {e}")))?;
        let readonly = built
            .spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false);
        let request = pb::CreateContainerRequest {
            container_id: id.to_string(),
            oci_spec_json: spec_json.to_string().into_bytes(),
            rootfs: Some(pb::Rootfs {
                source: Some(pb::rootfs::Source::DiskId(image_disk.to_string())),
                subpath: String::new(),
                writable_overlay: !readonly,
                upper_disk_id: String::new(),
            }),
            devices,
        };
        agent_call("CreateContainer", agent.create_container(request)).await?;
        Ok(Created {
            spec: spec_json,
            stop_signal: built.stop_signal,
            synced: prepared.synced,
            copy_back: prepared.copy_back,
        })
    }

    /// StartContainer: the process runs, its output goes to the CRI log.
    pub async fn start_container(&self, id: &str) -> Result<()> {
        let container = self.container(id)?;
        let pod = self.pod(&container.pod_id)?;
        let phase = container.phase();
        if phase != ContainerPhase::Created {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is {phase:?}, not created: it cannot be started"
            )));
        }
        let mut agent = pod.agent()?;
        let log_path = container.record().log_path;
        let log = if log_path.is_empty() {
            None
        } else {
            Some(ContainerLog::open(
                Path::new(&log_path),
                &container.log_progress_path(),
            )?)
        };
        let request = pb::StartContainerRequest {
            container_id: id.to_string(),
        };
        agent_call("StartContainer", agent.start_container(request)).await?;
        if !container.config.stdin && !container.config.tty {
            // Without stdin the process reads end of input, as under
            // containerd, rather than waiting on a pipe nobody writes.
            let request = pb::CloseStdinRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            };
            if let Err(e) = agent_call("CloseStdin", agent.close_stdin(request)).await {
                tracing::warn!(container = %id, "{}", crate::error_chain(&e));
            }
        }
        {
            let mut record = lock(&container.record);
            record.phase = ContainerPhase::Running;
            record.started_at = now_ns();
        }
        container.save();
        *lock(&container.log) = log.clone();
        self.start_pumps(&container, &agent, log);
        self.watch_exit(container.clone(), agent);
        self.emit(&container, cri::ContainerEventType::ContainerStartedEvent);
        Ok(())
    }

    /// Waits (in the agent) for the container's exit and records it.
    pub(crate) fn watch_exit(&self, container: Arc<Container>, mut agent: AgentClient) {
        let runtime = self.clone();
        tokio::spawn(async move {
            let request = pb::WaitProcessRequest {
                container_id: container.id.clone(),
                exec_id: String::new(),
            };
            match agent.wait_process(request).await {
                Ok(response) => {
                    let status = response.into_inner().status.unwrap_or_default();
                    lock(&container.sync).take();
                    let copy_back = container.record().copy_back;
                    if !copy_back.is_empty() {
                        sync::copy_back(&mut agent, &copy_back).await;
                    }
                    container.drain_pumps().await;
                    if container.record_exit(&status) {
                        tracing::info!(container = %container.id, code = status.exit_code, "container exited");
                        runtime.emit(&container, cri::ContainerEventType::ContainerStoppedEvent);
                    }
                }
                // The VM died or stopped: vm_gone / stop_pod record it.
                Err(status) => {
                    tracing::debug!(container = %container.id, "WaitProcess: {}", status.message())
                }
            }
        });
    }

    /// StopContainer: succeeds for a stopped or unknown container.
    pub async fn stop_container(&self, id: &str, timeout: Duration) -> Result<()> {
        let Ok(container) = self.container(id) else {
            return Ok(());
        };
        if container.phase() != ContainerPhase::Running {
            return Ok(());
        }
        let Ok(agent) = self.pod(&container.pod_id).and_then(|pod| pod.agent()) else {
            return Ok(());
        };
        container.kill_and_wait(agent, timeout).await;
        Ok(())
    }

    /// RemoveContainer: kills it if it runs; succeeds for an unknown id.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let Ok(container) = self.container(id) else {
            return Ok(());
        };
        let pod = self.pod(&container.pod_id)?;
        let _ops = pod.ops.lock().await;
        if let Ok(mut agent) = pod.agent() {
            let request = pb::RemoveContainerRequest {
                container_id: container.id.clone(),
                grace_period_secs: 0,
            };
            match agent_call("RemoveContainer", agent.remove_container(request)).await {
                Ok(_) => {}
                Err(Error::Agent { status, .. }) if status.code() == tonic::Code::NotFound => {}
                Err(e) => return Err(e),
            }
            container.mark_lost("removed while running");
            mounts::remove(&pod, &container.id).await;
            self.detach_devices(&pod, &container.id).await;
            self.unmount_image(&pod, &container.record().image_id).await;
        }
        self.forget_container(&container);
        Ok(())
    }

    /// Drops a container's record, directory and name.
    pub(crate) fn forget_container(&self, container: &Arc<Container>) {
        lock(&container.sync).take();
        if let Err(e) = std::fs::remove_dir_all(&container.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(container = %container.id, "cannot remove {}: {e}", container.dir.display());
            }
        }
        self.emit(container, cri::ContainerEventType::ContainerDeletedEvent);
        lock(&self.inner.containers).remove(&container.id);
        self.release_name(&container.name, &container.id);
    }

    /// UpdateContainerResources: applied live in the guest's cgroup.
    pub async fn update_container_resources(
        &self,
        id: &str,
        resources: cri::LinuxContainerResources,
    ) -> Result<()> {
        let container = self.container(id)?;
        let pod = self.pod(&container.pod_id)?;
        if container.phase() == ContainerPhase::Exited {
            return Err(Error::FailedPrecondition(format!(
                "container {id} has exited: its resources cannot change"
            )));
        }
        sizing::check_fits(
            &pod.record().size,
            self.inner.config.sizing.guest_reserve_mib,
            &resources,
        )
        .map_err(Error::TooBig)?;
        let oci = spec::resources(&resources)?;
        let json = serde_json::to_vec(&oci)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode resources: {e}")))?;
        let mut agent = pod.agent()?;
        let request = pb::UpdateContainerRequest {
            container_id: id.to_string(),
            resources_json: json,
        };
        agent_call("UpdateContainer", agent.update_container(request)).await?;
        state::write_proto(&container.dir.join("resources.pb"), &resources)?;
        *lock(&container.resources) = Some(resources);
        Ok(())
    }

    /// Sends `signal` to a running container's main process (the CLI's
    /// signal forwarding; CRI has no such RPC).
    pub async fn signal_container(&self, id: &str, signal: i32) -> Result<()> {
        if !(1..=64).contains(&signal) {
            return Err(Error::InvalidArgument(format!(
                "signal {signal} is not a signal number (1-64)"
            )));
        }
        let container = self.container(id)?;
        if container.phase() != ContainerPhase::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                container.id
            )));
        }
        let mut agent = self.pod(&container.pod_id)?.agent()?;
        container.signal(&mut agent, signal, false).await
    }

    /// ReopenContainerLog: kubelet rotated the file.
    pub fn reopen_container_log(&self, id: &str) -> Result<()> {
        let container = self.container(id)?;
        if container.phase() != ContainerPhase::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running: its log cannot be reopened"
            )));
        }
        match lock(&container.log).as_ref() {
            Some(log) => Ok(log.reopen()?),
            None => Err(Error::FailedPrecondition(format!(
                "container {id} has no log path"
            ))),
        }
    }
}
