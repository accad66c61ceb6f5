//! CRI RuntimeService over the runtime (`crate::runtime`): each handler
//! checks the request, calls the runtime and maps its error in one place
//! (`status.rs`). List filters and status conversions live here.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService as CriRuntimeService;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tonic::{Request, Response, Status};

use super::status::runtime_status;
use super::streaming_requests;
use crate::runtime::Runtime;
use crate::runtime::state::PodPhase;
use crate::streaming::Streaming;

/// The CRI version this daemon implements (k8s-cri 0.11: Kubernetes 1.32).
const CRI_API_VERSION: &str = "v1";
const RUNTIME_NAME: &str = "frakti";

pub struct RuntimeService {
    runtime: Runtime,
    streaming: Arc<Streaming>,
}

impl RuntimeService {
    pub fn new(runtime: Runtime, streaming: Arc<Streaming>) -> RuntimeService {
        RuntimeService { runtime, streaming }
    }
}

type Reply<T> = Result<Response<T>, Status>;

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(value)
}

fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn id_matches(id: &str, wanted: &str) -> bool {
    wanted.is_empty() || id.starts_with(wanted)
}

fn pod_state(phase: PodPhase) -> cri::PodSandboxState {
    if phase == PodPhase::Ready {
        cri::PodSandboxState::SandboxReady
    } else {
        cri::PodSandboxState::SandboxNotready
    }
}

fn timeout(seconds: i64) -> Option<Duration> {
    u64::try_from(seconds)
        .ok()
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

#[tonic::async_trait]
impl CriRuntimeService for RuntimeService {
    async fn version(&self, _: Request<cri::VersionRequest>) -> Reply<cri::VersionResponse> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: CRI_API_VERSION.into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Reply<cri::RunPodSandboxResponse> {
        let request = request.into_inner();
        let config = request
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        let id = self
            .runtime
            .run_pod(config, request.runtime_handler)
            .await
            .map_err(runtime_status)?;
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Reply<cri::StopPodSandboxResponse> {
        let id = request.into_inner().pod_sandbox_id;
        required(&id, "pod_sandbox_id")?;
        self.runtime.stop_pod(&id).await.map_err(runtime_status)?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Reply<cri::RemovePodSandboxResponse> {
        let id = request.into_inner().pod_sandbox_id;
        required(&id, "pod_sandbox_id")?;
        self.runtime.remove_pod(&id).await.map_err(runtime_status)?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Reply<cri::PodSandboxStatusResponse> {
        let request = request.into_inner();
        required(&request.pod_sandbox_id, "pod_sandbox_id")?;
        let pod = self
            .runtime
            .pod(&request.pod_sandbox_id)
            .map_err(runtime_status)?;
        let mut info = HashMap::new();
        if request.verbose {
            let record = pod.record();
            info.insert(
                "info".to_string(),
                serde_json::json!({
                    "vmm_pid": record.vmm_pid,
                    "vm": record.size,
                    "message": record.message,
                    "images": record.images,
                    "dir": pod.dir,
                })
                .to_string(),
            );
        }
        let containers_statuses = self
            .runtime
            .containers_of(&pod.id)
            .iter()
            .map(|c| c.status(false))
            .collect();
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(pod.status()),
            info,
            containers_statuses,
            timestamp: crate::runtime::now_ns(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> Reply<cri::ListPodSandboxResponse> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let mut items: Vec<cri::PodSandbox> = self
            .runtime
            .pods()
            .iter()
            .filter(|pod| id_matches(&pod.id, &filter.id))
            .filter(|pod| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == pod_state(pod.phase()) as i32)
            })
            .filter(|pod| labels_match(&pod.config.labels, &filter.label_selector))
            .map(|pod| cri::PodSandbox {
                id: pod.id.clone(),
                metadata: pod.config.metadata.clone(),
                state: pod_state(pod.phase()) as i32,
                created_at: pod.created_at,
                labels: pod.config.labels.clone(),
                annotations: pod.config.annotations.clone(),
                runtime_handler: pod.runtime_handler.clone(),
            })
            .collect();
        items.sort_by_key(|p| p.created_at);
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Reply<cri::CreateContainerResponse> {
        let request = request.into_inner();
        required(&request.pod_sandbox_id, "pod_sandbox_id")?;
        let config = request
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        let id = self
            .runtime
            .create_container(&request.pod_sandbox_id, config)
            .await
            .map_err(runtime_status)?;
        Ok(Response::new(cri::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> Reply<cri::StartContainerResponse> {
        let id = request.into_inner().container_id;
        required(&id, "container_id")?;
        self.runtime
            .start_container(&id)
            .await
            .map_err(runtime_status)?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> Reply<cri::StopContainerResponse> {
        let request = request.into_inner();
        required(&request.container_id, "container_id")?;
        let grace = timeout(request.timeout).unwrap_or(Duration::ZERO);
        self.runtime
            .stop_container(&request.container_id, grace)
            .await
            .map_err(runtime_status)?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> Reply<cri::RemoveContainerResponse> {
        let id = request.into_inner().container_id;
        required(&id, "container_id")?;
        self.runtime
            .remove_container(&id)
            .await
            .map_err(runtime_status)?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Reply<cri::ListContainersResponse> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let mut containers: Vec<cri::Container> = self
            .runtime
            .containers()
            .iter()
            .filter(|c| id_matches(&c.id, &filter.id))
            .filter(|c| id_matches(&c.pod_id, &filter.pod_sandbox_id))
            .filter(|c| labels_match(&c.config.labels, &filter.label_selector))
            .map(|c| c.summary())
            .filter(|c| filter.state.as_ref().is_none_or(|s| s.state == c.state))
            .collect();
        containers.sort_by_key(|c| c.created_at);
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Reply<cri::ContainerStatusResponse> {
        let request = request.into_inner();
        required(&request.container_id, "container_id")?;
        let container = self
            .runtime
            .container(&request.container_id)
            .map_err(runtime_status)?;
        let mut info = HashMap::new();
        if request.verbose {
            info.insert("info".to_string(), container.info());
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(container.status(request.verbose)),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Reply<cri::UpdateContainerResourcesResponse> {
        let request = request.into_inner();
        required(&request.container_id, "container_id")?;
        let linux = request
            .linux
            .ok_or_else(|| Status::invalid_argument("linux resources are required"))?;
        self.runtime
            .update_container_resources(&request.container_id, linux)
            .await
            .map_err(runtime_status)?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> Reply<cri::ReopenContainerLogResponse> {
        let id = request.into_inner().container_id;
        required(&id, "container_id")?;
        self.runtime
            .reopen_container_log(&id)
            .map_err(runtime_status)?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> Reply<cri::ExecSyncResponse> {
        let request = request.into_inner();
        required(&request.container_id, "container_id")?;
        if request.cmd.is_empty() {
            return Err(Status::invalid_argument("cmd is required"));
        }
        let output = self
            .runtime
            .exec_sync(&request.container_id, request.cmd, timeout(request.timeout))
            .await
            .map_err(runtime_status)?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: output.stdout,
            stderr: output.stderr,
            exit_code: output.exit_code,
        }))
    }

    async fn exec(&self, request: Request<cri::ExecRequest>) -> Reply<cri::ExecResponse> {
        let checked = streaming_requests::exec(&self.runtime, request.into_inner())?;
        let url = streaming_requests::url(&self.streaming, checked)?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(&self, request: Request<cri::AttachRequest>) -> Reply<cri::AttachResponse> {
        let checked = streaming_requests::attach(&self.runtime, request.into_inner())?;
        let url = streaming_requests::url(&self.streaming, checked)?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Reply<cri::PortForwardResponse> {
        let checked = streaming_requests::port_forward(&self.runtime, request.into_inner())?;
        let url = streaming_requests::url(&self.streaming, checked)?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> Reply<cri::ContainerStatsResponse> {
        let id = request.into_inner().container_id;
        required(&id, "container_id")?;
        let container = self.runtime.container(&id).map_err(runtime_status)?;
        let stats = self
            .runtime
            .container_stats(&container)
            .await
            .map_err(runtime_status)?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Reply<cri::ListContainerStatsResponse> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let mut stats = Vec::new();
        for container in self.runtime.containers() {
            let wanted = id_matches(&container.id, &filter.id)
                && id_matches(&container.pod_id, &filter.pod_sandbox_id)
                && labels_match(&container.config.labels, &filter.label_selector);
            if wanted {
                match self.runtime.container_stats(&container).await {
                    Ok(s) => stats.push(s),
                    Err(e) => {
                        tracing::debug!(container = %container.id, "stats: {}", crate::error_chain(&e))
                    }
                }
            }
        }
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> Reply<cri::PodSandboxStatsResponse> {
        let id = request.into_inner().pod_sandbox_id;
        required(&id, "pod_sandbox_id")?;
        let pod = self.runtime.pod(&id).map_err(runtime_status)?;
        let stats = self.runtime.pod_stats(&pod).await.map_err(runtime_status)?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Reply<cri::ListPodSandboxStatsResponse> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let mut stats = Vec::new();
        for pod in self.runtime.pods() {
            if id_matches(&pod.id, &filter.id)
                && labels_match(&pod.config.labels, &filter.label_selector)
            {
                match self.runtime.pod_stats(&pod).await {
                    Ok(s) => stats.push(s),
                    Err(e) => tracing::debug!(pod = %pod.id, "stats: {}", crate::error_chain(&e)),
                }
            }
        }
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        request: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Reply<cri::UpdateRuntimeConfigResponse> {
        let cidr = request
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        tracing::info!(pod_cidr = %cidr, "runtime config updated");
        *crate::runtime::lock(&self.runtime.inner.pod_cidr) = cidr;
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn status(&self, request: Request<cri::StatusRequest>) -> Reply<cri::StatusResponse> {
        let verbose = request.into_inner().verbose;
        let assets = &self.runtime.config().assets;
        let missing: Vec<String> = [&assets.vmm, &assets.kernel, &assets.initrd]
            .into_iter()
            .filter(|p| !p.exists())
            .map(|p| p.display().to_string())
            .collect();
        let runtime_ready = cri::RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status: missing.is_empty() && std::path::Path::new("/dev/kvm").exists(),
            reason: if missing.is_empty() {
                String::new()
            } else {
                "MissingVmAssets".into()
            },
            message: if missing.is_empty() {
                String::new()
            } else {
                format!("missing: {}", missing.join(", "))
            },
        };
        let network = self.runtime.inner.network.ready().await;
        let network_ready = cri::RuntimeCondition {
            r#type: "NetworkReady".into(),
            status: network.is_ok(),
            reason: if network.is_ok() {
                String::new()
            } else {
                "NetworkPluginNotReady".into()
            },
            message: network
                .err()
                .map(|e| format!("cni plugin not initialized: {e}"))
                .unwrap_or_default(),
        };
        let mut info = HashMap::new();
        if verbose {
            let config = self.runtime.config();
            info.insert(
                "config".to_string(),
                serde_json::json!({
                    "root": config.root,
                    "vmm": assets.vmm,
                    "kernel": assets.kernel,
                    "initrd": assets.initrd,
                    "default_cpus": config.sizing.cpus,
                    "default_memory_mib": config.sizing.memory_mib,
                    "guest_reserve_mib": config.sizing.guest_reserve_mib,
                })
                .to_string(),
            );
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![runtime_ready, network_ready],
            }),
            info,
            runtime_handlers: vec![cri::RuntimeHandler {
                name: String::new(),
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: true,
                    user_namespaces: true,
                }),
            }],
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: true,
            }),
        }))
    }

    async fn checkpoint_container(
        &self,
        _: Request<cri::CheckpointContainerRequest>,
    ) -> Reply<cri::CheckpointContainerResponse> {
        Err(Status::unimplemented(
            "frakti does not checkpoint containers",
        ))
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(
        &self,
        _: Request<cri::GetEventsRequest>,
    ) -> Reply<Self::GetContainerEventsStream> {
        let events = BroadcastStream::new(self.runtime.subscribe()).map(|event| {
            event.map_err(|BroadcastStreamRecvError::Lagged(n)| {
                Status::data_loss(format!("{n} container events were dropped: resync"))
            })
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn list_metric_descriptors(
        &self,
        _: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Reply<cri::ListMetricDescriptorsResponse> {
        // CPU, memory and network are in the stats RPCs; the metrics carry
        // what those cannot: the usage of direct-assigned volumes.
        Ok(Response::new(cri::ListMetricDescriptorsResponse {
            descriptors: crate::runtime::metrics::descriptors(),
        }))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Reply<cri::ListPodSandboxMetricsResponse> {
        let mut pod_metrics = Vec::new();
        for pod in self.runtime.pods() {
            match self.runtime.pod_metrics(&pod).await {
                Ok(m) => pod_metrics.push(m),
                Err(e) => tracing::debug!(pod = %pod.id, "metrics: {}", crate::error_chain(&e)),
            }
        }
        Ok(Response::new(cri::ListPodSandboxMetricsResponse {
            pod_metrics,
        }))
    }

    async fn runtime_config(
        &self,
        _: Request<cri::RuntimeConfigRequest>,
    ) -> Reply<cri::RuntimeConfigResponse> {
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_need_every_pair() {
        let labels: HashMap<String, String> = [
            ("app".into(), "web".into()),
            ("tier".into(), "front".into()),
        ]
        .into();
        assert!(labels_match(&labels, &HashMap::new()));
        assert!(labels_match(
            &labels,
            &[("app".into(), "web".into())].into()
        ));
        assert!(!labels_match(
            &labels,
            &[("app".into(), "db".into())].into()
        ));
        assert!(!labels_match(
            &labels,
            &[("zone".into(), "a".into())].into()
        ));
    }

    #[test]
    fn timeouts_of_zero_or_less_mean_none() {
        assert_eq!(timeout(0), None);
        assert_eq!(timeout(-3), None);
        assert_eq!(timeout(2), Some(Duration::from_secs(2)));
    }
}
