//! After a restart (even a `kill -9`), the daemon finds its pods again from
//! their records: a VMM still running (checked by pid and control socket)
//! gets its agent reconnected, its containers' states re-read from the
//! agent (exits that happened meanwhile keep their real codes), their logs
//! and exit watchers restarted. Half-created pods are removed, and VMMs
//! whose pod record is gone are killed.

use std::sync::Arc;
use std::time::Duration;

use frakti_proto::agent::v1 as pb;
use k8s_cri::v1 as cri;

use super::container::Container;
use super::logs::ContainerLog;
use super::pod::{MountedImage, Pod};
use super::state::{self, ContainerPhase, PodPhase, PodRecord};
use super::sync::{self, SyncedMount};
use super::{Result, Runtime, agent_call, lock};
use crate::network::Network;
use crate::sandbox::agent::{self, AgentClient};
use crate::sandbox::vmm;

/// A running VM's agent answers at once; this bounds a hung one.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn recover(runtime: &Runtime) {
    let pods_dir = runtime.inner.layout.pods().to_path_buf();
    for id in state::Layout::ids_in(&pods_dir) {
        if let Err(e) = recover_pod(runtime, &id).await {
            tracing::warn!(pod = %id, "cannot recover the pod: {}", crate::error_chain(&e));
        }
    }
    kill_orphan_vmms(runtime);
    // What plugins hold for pods the daemon no longer has (1.1.0 lists).
    let known: Vec<_> = runtime
        .pods()
        .iter()
        .filter_map(|pod| Some(lock(&pod.state).network.as_ref()?.attachment.clone()))
        .collect();
    runtime.inner.network.collect_garbage(&known).await;
}

async fn recover_pod(runtime: &Runtime, id: &str) -> Result<()> {
    let dir = runtime.inner.layout.pod_dir(id);
    let loaded = state::read_record::<PodRecord, cri::PodSandboxConfig>(&dir, "pod.json");
    let (record, config) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            // Killed before RunPodSandbox wrote its records: nothing to keep.
            tracing::warn!(pod = %id, "removing a pod without usable records: {}", crate::error_chain(&e));
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(());
        }
    };
    let pod = Arc::new(Pod::new(record.clone(), config, dir));
    match Network::cached(&pod.dir) {
        Ok(network) => lock(&pod.state).network = network,
        Err(e) => tracing::warn!(pod = %id, "{}", crate::error_chain(&e)),
    }
    if record.phase == PodPhase::Creating {
        tracing::info!(pod = %id, "removing a pod whose RunPodSandbox did not finish");
        let files = pod.files.clone();
        let alive = record.vmm_pid.filter(|pid| vmm::is_our_vmm(*pid, &files));
        if let Some(pid) = alive {
            runtime.watch_vm(pod.clone(), pid);
        } else {
            pod.vm_exited.send_replace(true);
        }
        runtime.discard_pod(&pod).await;
        return Ok(());
    }
    runtime.reserve_name(&pod.name, &pod.id)?;
    lock(&runtime.inner.pods).insert(pod.id.clone(), pod.clone());
    let agent = if record.phase == PodPhase::Ready {
        reconnect(runtime, &pod, &record).await
    } else {
        pod.vm_exited.send_replace(true);
        None
    };
    let containers = load_containers(runtime, &pod);
    match agent {
        Some(agent) => resume(runtime, &pod, agent, containers).await,
        None => {
            for container in containers {
                container.mark_lost("the pod VM exited while the daemon was down");
            }
        }
    }
    tracing::info!(pod = %pod.id, phase = ?pod.phase(), "pod recovered");
    Ok(())
}

/// The running VM's agent, or None (the pod is then NOTREADY).
async fn reconnect(runtime: &Runtime, pod: &Arc<Pod>, record: &PodRecord) -> Option<AgentClient> {
    let pid = record
        .vmm_pid
        .filter(|pid| vmm::is_our_vmm(*pid, &pod.files));
    let reason = match pid {
        Some(pid) => {
            runtime.watch_vm(pod.clone(), pid);
            match agent::wait_for_agent(&pod.files.vsock_socket(), RECONNECT_TIMEOUT, || Ok(()))
                .await
            {
                Ok(agent) => {
                    let mut st = lock(&pod.state);
                    st.agent = Some(agent.clone());
                    return Some(agent);
                }
                Err(e) => {
                    // A VM we cannot drive is of no use: power it off.
                    vmm::kill(pid);
                    format!("its agent does not answer: {}", crate::error_chain(&e))
                }
            }
        }
        None => {
            pod.vm_exited.send_replace(true);
            "the pod VM exited while the daemon was down".to_string()
        }
    };
    tracing::warn!(pod = %pod.id, "pod is NOTREADY: {reason}");
    {
        let mut st = lock(&pod.state);
        st.record.phase = PodPhase::NotReady;
        st.record.message = reason;
        st.record.images.clear();
    }
    let _ = pod.save();
    None
}

fn load_containers(runtime: &Runtime, pod: &Arc<Pod>) -> Vec<Arc<Container>> {
    let dir = pod.dir.join("containers");
    let mut containers = Vec::new();
    for id in state::Layout::ids_in(&dir) {
        let cdir = dir.join(&id);
        let loaded = state::read_record::<_, cri::ContainerConfig>(&cdir, "container.json");
        let (record, config) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::warn!(container = %id, "dropping a container without usable records: {}", crate::error_chain(&e));
                let _ = std::fs::remove_dir_all(&cdir);
                continue;
            }
        };
        let container = Arc::new(Container::new(record, config, cdir, pod));
        if let Ok(resources) = state::read_proto(&container.dir.join("resources.pb")) {
            *lock(&container.resources) = Some(resources);
        }
        if let Err(e) = runtime.reserve_name(&container.name, &container.id) {
            tracing::warn!(container = %id, "{}", crate::error_chain(&e));
        }
        lock(&runtime.inner.containers).insert(container.id.clone(), container.clone());
        containers.push(container);
    }
    containers
}

/// Re-reads each container's state from the agent and restarts what a
/// running container needs.
async fn resume(
    runtime: &Runtime,
    pod: &Arc<Pod>,
    mut agent: AgentClient,
    containers: Vec<Arc<Container>>,
) {
    let known = match agent_call(
        "ListContainers",
        agent.list_containers(pb::ListContainersRequest {}),
    )
    .await
    {
        Ok(list) => list.containers,
        Err(e) => {
            tracing::warn!(pod = %pod.id, "{}", crate::error_chain(&e));
            Vec::new()
        }
    };
    relet_images(runtime, pod, &containers);
    for container in containers {
        if container.phase() == ContainerPhase::Exited {
            continue;
        }
        let Some(info) = known.iter().find(|c| c.container_id == container.id) else {
            container.mark_lost("the container is gone from the pod VM");
            continue;
        };

        match pb::ContainerState::try_from(info.state) {
            Ok(pb::ContainerState::Stopped) => {
                let status = info.exit_status.unwrap_or_default();
                let copy_back = container.record().copy_back;
                sync::copy_back(&mut agent, &copy_back).await;
                container.record_exit(&status);
            }
            Ok(pb::ContainerState::Running) if container.phase() == ContainerPhase::Running => {
                let log_path = container.record().log_path;
                let log = if log_path.is_empty() {
                    None
                } else {
                    ContainerLog::open(
                        std::path::Path::new(&log_path),
                        &container.log_progress_path(),
                    )
                    .map_err(
                        |e| tracing::warn!(container = %container.id, "{}", crate::error_chain(&e)),
                    )
                    .ok()
                };
                *lock(&container.log) = log.clone();
                // Unknown snapshots: the first poll sends the host's content
                // (a writable mount's is taken as the guest's instead).
                let record = container.record();
                let synced = record
                    .synced
                    .into_iter()
                    .map(|(host_path, guest_base)| SyncedMount {
                        writable: record.writable_synced.contains(&guest_base),
                        host_path,
                        guest_base,
                        snapshot: None,
                    })
                    .collect();
                *lock(&container.sync) =
                    Some(sync::spawn(agent.clone(), container.id.clone(), synced));
                runtime.start_pumps(&container, &agent, log);
                runtime.watch_exit(container.clone(), agent.clone());
            }
            _ => {}
        }
    }
}

/// Leases the images the pod's slots hold again (the store keeps a leased
/// image's disk even if the image is removed).
fn relet_images(runtime: &Runtime, pod: &Pod, containers: &[Arc<Container>]) {
    let slots = pod.record().images;
    let mut st = lock(&pod.state);
    for slot in slots {
        let users = containers
            .iter()
            .filter(|c| c.record().image_id == slot.image_id)
            .count();
        match runtime.inner.images.lease(&slot.image_id) {
            Ok(lease) => {
                st.images.insert(
                    slot.image_id.clone(),
                    MountedImage {
                        serial: slot.serial,
                        disk_id: slot.disk_id,
                        users: users.max(1),
                        _lease: lease,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(pod = %pod.id, image = %slot.image_id, "{}", crate::error_chain(&e))
            }
        }
    }
}

/// Kills frakti-vmm processes serving a socket under our pods directory
/// whose pod is not known (its record was removed, or never written).
fn kill_orphan_vmms(runtime: &Runtime) {
    let pods_dir = runtime.inner.layout.pods().to_path_buf();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let socket = args
            .windows(2)
            .find(|pair| pair[0] == b"--api-socket")
            .map(|pair| std::path::PathBuf::from(String::from_utf8_lossy(pair[1]).into_owned()));
        let Some(pod_dir) = socket.as_deref().and_then(|s| s.parent()) else {
            continue;
        };
        if pod_dir.parent() != Some(pods_dir.as_path()) {
            continue;
        }
        let id = pod_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if runtime.pod(&id).is_err() {
            tracing::warn!(pid, pod = %id, "killing a VMM whose pod is unknown");
            vmm::kill(pid);
        }
    }
}
