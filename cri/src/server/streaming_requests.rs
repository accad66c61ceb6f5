//! Exec, Attach and PortForward: the request is checked here (container
//! or pod, streams, ports) and, when it can be served, kept by the
//! streaming server, whose one-time URL is the answer.

use k8s_cri::v1 as cri;
use tonic::Status;

use super::status::runtime_status;
use crate::runtime::Runtime;
use crate::runtime::state::{ContainerPhase, PodPhase};
use crate::streaming::Streaming;
use crate::streaming::request::{CacheError, ProcessRequest, StreamRequest};

/// The full id and the config of a running container.
fn running_container(
    runtime: &Runtime,
    id: &str,
) -> Result<(String, cri::ContainerConfig), Status> {
    container_in(runtime, id, &[ContainerPhase::Running], "is not running")
}

/// The full id and the config of a created or running container.
fn attachable_container(
    runtime: &Runtime,
    id: &str,
) -> Result<(String, cri::ContainerConfig), Status> {
    let phases = [ContainerPhase::Created, ContainerPhase::Running];
    container_in(runtime, id, &phases, "has exited")
}

/// The container `id` if it is in one of `phases`, else FailedPrecondition
/// saying it `otherwise`.
fn container_in(
    runtime: &Runtime,
    id: &str,
    phases: &[ContainerPhase],
    otherwise: &str,
) -> Result<(String, cri::ContainerConfig), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("container_id is required"));
    }
    let container = runtime.container(id).map_err(runtime_status)?;
    if !phases.contains(&container.phase()) {
        return Err(Status::failed_precondition(format!(
            "container {} {otherwise}",
            container.id
        )));
    }
    Ok((container.id.clone(), container.config.clone()))
}

fn streams_requested(stdin: bool, stdout: bool, stderr: bool) -> Result<(), Status> {
    if !(stdin || stdout || stderr) {
        return Err(Status::invalid_argument(
            "one of stdin, stdout or stderr must be requested",
        ));
    }
    Ok(())
}

pub fn exec(runtime: &Runtime, request: cri::ExecRequest) -> Result<StreamRequest, Status> {
    let (container_id, _) = running_container(runtime, &request.container_id)?;
    if request.cmd.is_empty() {
        return Err(Status::invalid_argument("cmd is required"));
    }
    if request.cmd.iter().any(|arg| arg.contains('\0')) {
        return Err(Status::invalid_argument("cmd contains a NUL byte"));
    }
    streams_requested(request.stdin, request.stdout, request.stderr)?;
    if request.tty && request.stderr {
        return Err(Status::invalid_argument(
            "tty and stderr cannot both be requested (a terminal merges stderr into stdout)",
        ));
    }
    Ok(StreamRequest::Exec(ProcessRequest {
        container_id,
        cmd: request.cmd,
        tty: request.tty,
        stdin: request.stdin,
        stdout: request.stdout,
        stderr: request.stderr,
    }))
}

/// Attach also takes a container that is created but not started yet (as
/// `docker run` attaches before it starts): its client then gets all of its
/// output. containerd refuses that; kubelet only attaches to running ones.
pub fn attach(runtime: &Runtime, request: cri::AttachRequest) -> Result<StreamRequest, Status> {
    let (container_id, config) = attachable_container(runtime, &request.container_id)?;
    streams_requested(request.stdin, request.stdout, request.stderr)?;
    if request.stdin && !config.stdin {
        return Err(Status::invalid_argument(
            "the container was not created with stdin: nothing to attach stdin to",
        ));
    }
    // The terminal is the container's: a TTY container has no stderr.
    Ok(StreamRequest::Attach(ProcessRequest {
        container_id,
        cmd: Vec::new(),
        tty: config.tty,
        stdin: request.stdin,
        stdout: request.stdout,
        stderr: request.stderr && !config.tty,
    }))
}

pub fn port_forward(
    runtime: &Runtime,
    request: cri::PortForwardRequest,
) -> Result<StreamRequest, Status> {
    if request.pod_sandbox_id.is_empty() {
        return Err(Status::invalid_argument("pod_sandbox_id is required"));
    }
    let pod = runtime
        .pod(&request.pod_sandbox_id)
        .map_err(runtime_status)?;
    if pod.phase() != PodPhase::Ready {
        return Err(Status::failed_precondition(format!(
            "pod sandbox {} is not ready",
            pod.id
        )));
    }
    let ports = request
        .port
        .iter()
        .map(|&port| {
            u16::try_from(port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| Status::invalid_argument(format!("invalid port {port}: 1 to 65535")))
        })
        .collect::<Result<Vec<u16>, Status>>()?;
    Ok(StreamRequest::PortForward {
        pod_id: pod.id.clone(),
        ports,
    })
}

/// The URL for a checked request.
pub fn url(streaming: &Streaming, request: StreamRequest) -> Result<String, Status> {
    streaming.url(request).map_err(|e| match e {
        CacheError::Full => Status::resource_exhausted(e.to_string()),
        CacheError::Random(_) => Status::internal(e.to_string()),
    })
}
