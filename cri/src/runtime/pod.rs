//! Pods: RunPodSandbox starts the pod's VM and sets it up through the
//! agent; StopPodSandbox stops its containers and powers it off;
//! RemovePodSandbox forgets it. A VM that dies on its own is noticed at once
//! (pidfd): the pod becomes NOTREADY and its containers EXITED.
//!
//! Operations on one pod are ordered by its `ops` lock; pods are
//! independent of each other.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use frakti_proto::agent::v1 as pb;
use k8s_cri::v1 as cri;
use tokio::sync::watch;

use super::state::{self, ContainerPhase, PodPhase, PodRecord, SlotRecord};
use super::{
    Error, Result, Runtime, agent_call, guest_network, lock, now_ns, pod_name, sizing, spec,
};
use crate::image::DiskLease;
use crate::network::PodNetwork;
use crate::sandbox::agent::{self, AgentClient};
use crate::sandbox::api;
use crate::sandbox::vmm::{self, VmFiles};

/// How long a powered-off VM's VMM may take to exit before it is killed.
const VMM_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sysctls kubelet considers safe (its `--allowed-unsafe-sysctls` adds more).
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// An image disk in one of the VM's slots, shared by the pod's containers.
pub(crate) struct MountedImage {
    pub serial: String,
    pub disk_id: String,
    pub users: usize,
    /// Keeps the image's disk file while the pod uses it.
    pub _lease: DiskLease,
}

pub(crate) struct PodState {
    pub record: PodRecord,
    pub agent: Option<AgentClient>,
    /// By image id.
    pub images: HashMap<String, MountedImage>,
    /// StopPodSandbox is powering the VM off: its exit is expected.
    pub stopping: bool,
    /// The pod's CNI attachment (its IPs), until its teardown.
    pub network: Option<PodNetwork>,
}

pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
    pub runtime_handler: String,
    pub created_at: i64,
    pub dir: PathBuf,
    pub files: VmFiles,
    /// The reserved name (see [`pod_name`]).
    pub name: String,
    pub(crate) ops: tokio::sync::Mutex<()>,
    pub(crate) state: Mutex<PodState>,
    /// Set once the VMM has exited.
    pub(crate) vm_exited: watch::Sender<bool>,
}

impl Pod {
    pub(crate) fn new(record: PodRecord, config: cri::PodSandboxConfig, dir: PathBuf) -> Pod {
        let name = config.metadata.as_ref().map(pod_name).unwrap_or_default();
        Pod {
            id: record.id.clone(),
            created_at: record.created_at,
            files: VmFiles::new(&dir),
            dir,
            config,
            runtime_handler: record.runtime_handler.clone(),
            name,
            ops: tokio::sync::Mutex::new(()),
            state: Mutex::new(PodState {
                record,
                agent: None,
                images: HashMap::new(),
                stopping: false,
                network: None,
            }),
            vm_exited: watch::channel(false).0,
        }
    }

    pub fn phase(&self) -> PodPhase {
        lock(&self.state).record.phase
    }

    pub fn record(&self) -> PodRecord {
        lock(&self.state).record.clone()
    }

    /// The agent of a ready pod.
    pub(crate) fn agent(&self) -> Result<AgentClient> {
        let state = lock(&self.state);
        match (&state.agent, state.record.phase) {
            (Some(agent), PodPhase::Ready) => Ok(agent.clone()),
            _ => Err(Error::FailedPrecondition(format!(
                "pod sandbox {} is not ready{}",
                self.id,
                if state.record.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", state.record.message)
                }
            ))),
        }
    }

    /// Waits up to [`VMM_EXIT_TIMEOUT`] for the VMM's exit; whether it came.
    async fn wait_vm_exit(&self) -> bool {
        let mut exited = self.vm_exited.subscribe();
        tokio::time::timeout(VMM_EXIT_TIMEOUT, exited.wait_for(|gone| *gone))
            .await
            .is_ok()
    }

    /// SIGKILLs the pod's VMM if its pid still runs our VMM; whether it did.
    fn kill_vm(&self) -> bool {
        let ours = self
            .record()
            .vmm_pid
            .filter(|pid| vmm::is_our_vmm(*pid, &self.files));
        if let Some(pid) = ours {
            vmm::kill(pid);
        }
        ours.is_some()
    }

    pub(crate) fn save(&self) -> Result<()> {
        let record = self.record();
        state::write_json(&self.dir.join("pod.json"), &record)?;
        Ok(())
    }

    pub fn status(&self) -> cri::PodSandboxStatus {
        let ready = self.phase() == PodPhase::Ready;
        let options = self
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        cri::PodSandboxStatus {
            id: self.id.clone(),
            metadata: self.config.metadata.clone(),
            state: if ready {
                cri::PodSandboxState::SandboxReady
            } else {
                cri::PodSandboxState::SandboxNotready
            } as i32,
            created_at: self.created_at,
            network: Some(self.network_status()),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace { options }),
            }),
            labels: self.config.labels.clone(),
            annotations: self.config.annotations.clone(),
            runtime_handler: self.runtime_handler.clone(),
        }
    }
}

impl Pod {
    /// The pod's IPs: the first is kubelet's pod IP.
    fn network_status(&self) -> cri::PodSandboxNetworkStatus {
        let ips = lock(&self.state)
            .network
            .as_ref()
            .map(PodNetwork::ips)
            .unwrap_or_default();
        let mut ips = ips.into_iter();
        cri::PodSandboxNetworkStatus {
            ip: ips.next().unwrap_or_default(),
            additional_ips: ips.map(|ip| cri::PodIp { ip }).collect(),
        }
    }
}

/// The pod's DNS config as resolv.conf.
/// The resolv.conf of a pod's `dns_config`; one with nothing in it is a
/// comment, so that the file exists (containers bind-mount it) and says
/// why it is empty, as containerd writes one for any dns_config.
fn resolv_conf(dns: &cri::DnsConfig) -> Vec<u8> {
    let mut text = String::new();
    if dns.servers.is_empty() && dns.searches.is_empty() && dns.options.is_empty() {
        text.push_str("# the pod's dns_config has no servers, searches or options\n");
    }
    for server in &dns.servers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.searches.is_empty() {
        text.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    if !dns.options.is_empty() {
        text.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    text.into_bytes()
}

fn sysctl_allowed(name: &str, allowed: &[String]) -> bool {
    SAFE_SYSCTLS.contains(&name)
        || allowed
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => pattern == name,
            })
}

fn namespace_mode(mode: i32) -> cri::NamespaceMode {
    cri::NamespaceMode::try_from(mode).unwrap_or(cri::NamespaceMode::Pod)
}

/// Checks what a pod VM cannot do before anything is started.
fn validate(config: &cri::PodSandboxConfig, allowed_sysctls: &[String]) -> Result<()> {
    let metadata = config
        .metadata
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("config.metadata is required".into()))?;
    for (field, value) in [
        ("name", &metadata.name),
        ("namespace", &metadata.namespace),
        ("uid", &metadata.uid),
    ] {
        if value.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "config.metadata.{field} is required"
            )));
        }
    }
    let linux = config.linux.clone().unwrap_or_default();
    if let Some(options) = linux
        .security_context
        .as_ref()
        .and_then(|s| s.namespace_options.as_ref())
    {
        for (what, mode) in [
            ("network", options.network),
            ("pid", options.pid),
            ("ipc", options.ipc),
        ] {
            if namespace_mode(mode) == cri::NamespaceMode::Node {
                return Err(Error::FailedPrecondition(format!(
                    "linux.security_context.namespace_options.{what}: NODE is not supported: \
                     a frakti pod is a VM and cannot share the node's {what} namespace"
                )));
            }
        }
    }
    spec::userns::of_pod(config)?;
    for name in linux.sysctls.keys() {
        if !sysctl_allowed(name, allowed_sysctls) {
            return Err(Error::InvalidArgument(format!(
                "linux.sysctls: {name} is an unsafe sysctl that is not allowed \
                 (the daemon's allowed-unsafe-sysctls)"
            )));
        }
    }
    Ok(())
}

impl Runtime {
    /// RunPodSandbox: returns once the pod's agent answers and the pod is
    /// set up; on any failure nothing is left behind.
    pub async fn run_pod(
        &self,
        config: cri::PodSandboxConfig,
        runtime_handler: String,
    ) -> Result<String> {
        validate(&config, &self.inner.config.allowed_unsafe_sysctls)?;
        self.inner
            .config
            .assets
            .for_pod(&config.annotations)
            .map_err(Error::InvalidArgument)?;
        let (size, source) = sizing::size_pod(&config, &self.inner.config.sizing)?;
        let id = state::new_id()?;
        let dir = self.inner.layout.pod_dir(&id);
        let record = PodRecord {
            id: id.clone(),
            phase: PodPhase::Creating,
            created_at: now_ns(),
            vmm_pid: None,
            size,
            message: String::new(),
            runtime_handler,
            images: Vec::new(),
            volumes: Vec::new(),
        };
        let pod = Arc::new(Pod::new(record, config, dir));
        self.reserve_name(&pod.name, &id)?;
        tracing::info!(pod = %id, name = %pod.name, vcpus = size.vcpus, memory_mib = size.memory_mib, ?source, "starting pod VM");
        lock(&self.inner.pods).insert(id.clone(), pod.clone());
        let _ops = pod.ops.lock().await;
        match self.start_vm(&pod).await {
            Ok(()) => {
                tracing::info!(pod = %id, "pod ready");
                Ok(id)
            }
            Err(e) => {
                tracing::warn!(pod = %id, "RunPodSandbox failed: {}", crate::error_chain(&e));
                self.discard_pod(&pod).await;
                Err(e)
            }
        }
    }

    async fn start_vm(&self, pod: &Arc<Pod>) -> Result<()> {
        std::fs::create_dir_all(&pod.dir).map_err(|source| Error::Io {
            what: "cannot create",
            path: pod.dir.clone(),
            source,
        })?;
        state::write_proto(&pod.dir.join("config.pb"), &pod.config)?;
        pod.save()?;
        let size = pod.record().size;
        let attached = self
            .inner
            .network
            .setup(&pod.id, &pod.dir, &pod.config)
            .await?;
        let (nic, guest_nic) = match attached {
            Some(a) => {
                lock(&pod.state).network = Some(a.record);
                (Some(a.tap), Some(a.guest))
            }
            None => (None, None),
        };
        let assets = (self.inner.config.assets)
            .for_pod(&pod.config.annotations)
            .map_err(Error::InvalidArgument)?;
        tracing::debug!(pod = %pod.id, kernel = %assets.kernel.display(), "VM kernel");
        let pid = vmm::spawn(
            &assets,
            &pod.files,
            size,
            nic.as_ref().map(|tap| vmm::Nic {
                tap: tap.fd.as_fd(),
                mac: tap.mac,
            }),
        )?;
        let mac_mtu = nic.as_ref().map(|tap| (tap.mac, tap.mtu));
        // The VMM has its copy: the tap goes away with the VMM.
        drop(nic);
        lock(&pod.state).record.vmm_pid = Some(pid);
        pod.save()?;
        self.watch_vm(pod.clone(), pid);
        let exited = pod.vm_exited.subscribe();
        let files = pod.files.clone();
        let client = agent::wait_for_agent(
            &files.vsock_socket(),
            self.inner.config.boot_timeout,
            move || match exited.has_changed() {
                Ok(false) if !*exited.borrow() => Ok(()),
                _ => Err(format!(
                    "the VM exited during boot; console:\n{}",
                    files.console_tail(20)
                )),
            },
        )
        .await?;
        if let (Some((mac, mtu)), Some(guest)) = (mac_mtu, guest_nic) {
            guest_network::configure(client.clone(), mac, mtu, &guest).await?;
        }
        self.setup_sandbox(pod, client.clone()).await?;
        {
            let mut st = lock(&pod.state);
            st.agent = Some(client);
            st.record.phase = PodPhase::Ready;
        }
        pod.save()
    }

    async fn setup_sandbox(&self, pod: &Pod, mut client: AgentClient) -> Result<()> {
        let linux = pod.config.linux.clone().unwrap_or_default();
        let shared_pid = linux
            .security_context
            .as_ref()
            .and_then(|s| s.namespace_options.as_ref())
            .is_none_or(|o| namespace_mode(o.pid) == cri::NamespaceMode::Pod);
        // kubelet's pod-level limits (the sum of its containers') bound the
        // pod's cgroup in the guest, as its pod cgroup does on a node.
        let resources_json = match &linux.resources {
            Some(resources) => serde_json::to_vec(&spec::resources(resources)?)
                .map_err(|e| Error::InvalidArgument(format!("linux.resources: {e}")))?,
            None => Vec::new(),
        };
        let request = pb::SetupSandboxRequest {
            hostname: pod.config.hostname.clone(),
            resolv_conf: pod
                .config
                .dns_config
                .as_ref()
                .map(resolv_conf)
                .unwrap_or_default(),
            sysctls: spec::userns::sandbox_sysctls(
                &linux.sysctls,
                spec::userns::of_pod(&pod.config)?.is_some(),
            ),
            shared_pid_namespace: shared_pid,
            resources_json,
        };
        agent_call("SetupSandbox", client.setup_sandbox(request)).await?;
        Ok(())
    }

    /// Watches the VMM: its exit is either expected (StopPodSandbox) or the
    /// pod's death.
    pub(crate) fn watch_vm(&self, pod: Arc<Pod>, pid: u32) {
        let runtime = self.clone();
        tokio::spawn(async move {
            let how = match vmm::wait_exit(pid).await {
                Ok(exit) => exit.to_string(),
                Err(e) => crate::error_chain(&e),
            };
            pod.vm_exited.send_replace(true);
            runtime.vm_gone(&pod, &how);
        });
    }

    fn vm_gone(&self, pod: &Pod, how: &str) {
        let expected = {
            let mut st = lock(&pod.state);
            st.agent = None;
            let expected = st.stopping || st.record.phase != PodPhase::Ready;
            if !expected {
                st.record.phase = PodPhase::NotReady;
                st.record.message = format!("the pod VM {how}");
            }
            expected
        };
        pod.files.remove_sockets();
        if expected {
            return;
        }
        tracing::error!(
            pod = %pod.id,
            "the pod VM {how}; its console ended with:\n{}",
            pod.files.console_tail(20)
        );
        if let Err(e) = pod.save() {
            tracing::warn!(pod = %pod.id, "{}", crate::error_chain(&e));
        }
        let message = format!("the pod VM {how}");
        for container in self.containers_of(&pod.id) {
            if container.mark_lost(&message) {
                self.emit(&container, cri::ContainerEventType::ContainerStoppedEvent);
            }
        }
    }

    /// StopPodSandbox: kills the containers, powers the VM off. Stopping a
    /// stopped or unknown pod succeeds.
    pub async fn stop_pod(&self, id: &str) -> Result<()> {
        let Ok(pod) = self.pod(id) else {
            return Ok(());
        };
        let _ops = pod.ops.lock().await;
        self.stop_pod_locked(&pod).await
    }

    async fn stop_pod_locked(&self, pod: &Arc<Pod>) -> Result<()> {
        let agent = {
            let mut st = lock(&pod.state);
            let stopped = st.record.phase != PodPhase::Ready && *pod.vm_exited.borrow();
            if !stopped {
                st.stopping = true;
            }
            (!stopped).then(|| st.agent.clone())
        };
        let Some(agent) = agent else {
            // Stopped before, or its VM died: its network may remain (a
            // DEL that failed, a VM that died on its own).
            return self.teardown_network(pod).await;
        };
        if let Some(agent) = &agent {
            for container in self.containers_of(&pod.id) {
                if container.phase() == ContainerPhase::Running {
                    container.kill_and_wait(agent.clone(), Duration::ZERO).await;
                }
            }
            self.detach_all_devices(pod).await;
            let mut agent = agent.clone();
            let shutdown = pb::ShutdownRequest {
                grace_period_secs: 0,
            };
            if let Err(e) = agent_call("Shutdown", agent.shutdown(shutdown)).await {
                tracing::debug!(pod = %pod.id, "{}", crate::error_chain(&e));
            }
        }
        self.wait_vmm_gone(pod).await;
        let message = "stopped with its pod".to_string();
        for container in self.containers_of(&pod.id) {
            if container.mark_lost(&message) {
                self.emit(&container, cri::ContainerEventType::ContainerStoppedEvent);
            }
        }
        {
            let mut st = lock(&pod.state);
            st.agent = None;
            st.record.phase = PodPhase::NotReady;
            st.stopping = false;
            st.images.clear();
            st.record.images.clear();
            // Block devices left the VM with it (flushed by its shutdown).
            st.record.volumes.retain(|slot| slot.device.is_none());
        }
        pod.files.remove_sockets();
        pod.save()?;
        self.teardown_network(pod).await
    }

    /// CNI DEL and the rest of the pod's network; kept for a retry when a
    /// plugin fails.
    async fn teardown_network(&self, pod: &Pod) -> Result<()> {
        self.inner.network.teardown(&pod.id, &pod.dir).await?;
        lock(&pod.state).network = None;
        Ok(())
    }

    async fn wait_vmm_gone(&self, pod: &Pod) {
        if pod.record().vmm_pid.is_none() || pod.wait_vm_exit().await {
            return;
        }
        tracing::warn!(pod = %pod.id, "the VMM did not exit after power-off: killing it");
        pod.kill_vm();
        pod.wait_vm_exit().await;
    }

    /// RemovePodSandbox: stops the pod if needed and forgets it and its
    /// containers. Removing an unknown pod succeeds.
    pub async fn remove_pod(&self, id: &str) -> Result<()> {
        let Ok(pod) = self.pod(id) else {
            return Ok(());
        };
        let _ops = pod.ops.lock().await;
        self.stop_pod_locked(&pod).await?;
        for container in self.containers_of(&pod.id) {
            self.forget_container(&container);
        }
        self.discard_pod(&pod).await;
        Ok(())
    }

    /// Kills the VM if it runs and removes every trace of the pod.
    pub(crate) async fn discard_pod(&self, pod: &Arc<Pod>) {
        let pid = {
            let mut st = lock(&pod.state);
            st.stopping = true;
            st.images.clear();
            st.record.vmm_pid
        };
        if pid.is_some() && !*pod.vm_exited.borrow() && pod.kill_vm() {
            pod.wait_vm_exit().await;
        }
        if let Err(e) = self.teardown_network(pod).await {
            // Its directory goes, and its namespace with it; what the
            // plugins hold (IPAM) is left to their GC.
            tracing::warn!(pod = %pod.id, "{}", crate::error_chain(&e));
            self.inner.network.release_namespace(&pod.dir).await;
        }
        let outside: Vec<PathBuf> = lock(&pod.state)
            .record
            .volumes
            .iter()
            .filter_map(|slot| slot.file.clone())
            .collect();
        for file in outside {
            if let Err(e) = std::fs::remove_file(&file) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(pod = %pod.id, "cannot remove {}: {e}", file.display());
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&pod.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(pod = %pod.id, "cannot remove {}: {e}", pod.dir.display());
            }
        }
        self.release_name(&pod.name, &pod.id);
        lock(&self.inner.pods).remove(&pod.id);
    }

    /// Puts the image of `lease` in a free slot of the pod's VM and mounts
    /// it (once per pod: later containers share it). Returns its disk id.
    pub(crate) async fn mount_image(&self, pod: &Pod, lease: DiskLease) -> Result<String> {
        let image_id = lease.image.to_string();
        let serial = {
            let mut st = lock(&pod.state);
            if let Some(mounted) = st.images.get_mut(&image_id) {
                mounted.users += 1;
                return Ok(mounted.disk_id.clone());
            }
            let used: Vec<&String> = st.images.values().map(|m| &m.serial).collect();
            (0..vmm::IMAGE_SLOTS)
                .map(vmm::image_slot)
                .find(|s| !used.contains(&s))
                .ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "pod sandbox {} already uses {} images, the most a pod VM holds",
                        pod.id,
                        vmm::IMAGE_SLOTS
                    ))
                })?
        };
        let disk_id = format!("image-{}", &lease.image.hex()[..12]);
        api::attach_disk(&pod.files.api_socket(), &serial, &lease.path, true).await?;
        let mut agent = pod.agent()?;
        let request = pb::MountDiskRequest {
            disk_id: disk_id.clone(),
            serial: serial.clone(),
            fs_type: lease.format.fs_type().to_string(),
            options: Vec::new(),
            read_only: true,
            timeout_ms: 0,
        };
        if let Err(e) = agent_call("MountDisk", agent.mount_disk(request)).await {
            let _ = api::detach_disk(&pod.files.api_socket(), &serial).await;
            return Err(e);
        }
        {
            let mut st = lock(&pod.state);
            st.record.images.push(SlotRecord {
                file: None,
                image_id: image_id.clone(),
                serial: serial.clone(),
                disk_id: disk_id.clone(),
                device: None,
                owners: Vec::new(),
                read_only: true,
            });
            st.images.insert(
                image_id,
                MountedImage {
                    serial,
                    disk_id: disk_id.clone(),
                    users: 1,
                    _lease: lease,
                },
            );
        }
        pod.save()?;
        Ok(disk_id)
    }

    /// A container of the pod no longer uses `image_id`: the last user
    /// unmounts it and frees its slot.
    pub(crate) async fn unmount_image(&self, pod: &Pod, image_id: &str) {
        let last = {
            let mut st = lock(&pod.state);
            match st.images.get_mut(image_id) {
                Some(mounted) if mounted.users > 1 => {
                    mounted.users -= 1;
                    None
                }
                Some(_) => {
                    st.record.images.retain(|slot| slot.image_id != image_id);
                    st.images.remove(image_id)
                }
                None => None,
            }
        };
        if let Err(e) = pod.save() {
            tracing::warn!(pod = %pod.id, "{}", crate::error_chain(&e));
        }
        let Some(mounted) = last else {
            return;
        };
        if let Ok(mut agent) = pod.agent() {
            let request = pb::UnmountDiskRequest {
                disk_id: mounted.disk_id.clone(),
            };
            if let Err(e) = agent_call("UnmountDisk", agent.unmount_disk(request)).await {
                tracing::warn!(pod = %pod.id, "{}", crate::error_chain(&e));
            }
            if let Err(e) = api::detach_disk(&pod.files.api_socket(), &mounted.serial).await {
                tracing::warn!(pod = %pod.id, "{}", crate::error_chain(&e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_config_becomes_resolv_conf() {
        let dns = cri::DnsConfig {
            servers: vec!["10.0.0.10".into(), "10.0.0.11".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            String::from_utf8(resolv_conf(&dns)).unwrap(),
            "nameserver 10.0.0.10\nnameserver 10.0.0.11\n\
             search default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        // An empty dns_config still makes the file containers mount.
        let empty = resolv_conf(&cri::DnsConfig::default());
        assert!(empty.starts_with(b"# ") && empty.ends_with(b"\n"));
    }

    fn config(name: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: "u1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn what_a_pod_vm_cannot_do_is_refused_up_front() {
        validate(&config("web"), &[]).unwrap();
        let err = validate(&config(""), &[]).unwrap_err().to_string();
        assert!(err.contains("metadata.name"), "{err}");
        let mut host_network = config("web");
        host_network.linux = Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let err = validate(&host_network, &[]).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert!(
            err.to_string().contains("namespace_options.network"),
            "{err}"
        );
        let mut sysctls = config("web");
        sysctls.linux = Some(cri::LinuxPodSandboxConfig {
            sysctls: [("kernel.msgmax".to_string(), "1".to_string())].into(),
            ..Default::default()
        });
        let err = validate(&sysctls, &[]).unwrap_err();
        assert!(err.to_string().contains("kernel.msgmax"), "{err}");
        validate(&sysctls, &["kernel.msg*".to_string()]).unwrap();
        validate(&sysctls, &["kernel.msgmax".to_string()]).unwrap();
    }
}
