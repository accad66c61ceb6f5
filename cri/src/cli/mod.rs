//! The `frakti` CLI for people without Kubernetes: a VM sandbox as easy as
//! `docker run`. Every command is a client of the daemon's socket (CRI,
//! plus frakti's own Images and Containers APIs) and of its streaming
//! server (attach, exec).
//!
//! A container made by `frakti run` lives in a pod (VM) of its own, made
//! for it and labelled [`CLI_LABEL`]; stopping or removing such a container
//! stops or removes its pod too. Containers kubelet made are listed and can
//! be inspected, followed and exec'd into; stop and rm act on the container
//! only.

pub mod attach;
pub mod containers;
pub mod exec;
pub mod logs;
pub mod resolve;
pub mod run;
pub mod run_spec;
pub mod table;
pub mod terminal;
pub mod volumes;

use std::path::Path;

use frakti_proto::containers::v1::containers_client::ContainersClient;
use frakti_proto::images::v1::images_client::ImagesClient;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

/// Label of the pods `frakti run` makes.
pub const CLI_LABEL: &str = "io.frakti.cli";
/// The daemon's default state dir (its --root).
pub const DEFAULT_ROOT: &str = "/var/lib/frakti";
/// Namespace of the pods `frakti run` makes.
pub const CLI_NAMESPACE: &str = "frakti";

/// The daemon's APIs on one connection.
#[derive(Clone)]
pub struct Clients {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
    pub images_admin: ImagesClient<Channel>,
    pub containers: ContainersClient<Channel>,
}

impl Clients {
    pub async fn connect(endpoint: &Path) -> anyhow::Result<Clients> {
        let channel = frakti_cri::client::connect(endpoint).await?;
        Ok(Clients {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel.clone()),
            images_admin: ImagesClient::new(channel.clone()),
            containers: ContainersClient::new(channel),
        })
    }
}

/// A daemon error as one line: its message and code.
pub fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

/// ContainerStatus of `id`, with its verbose info when `verbose`.
pub async fn container_status(
    clients: &mut Clients,
    id: &str,
    verbose: bool,
) -> anyhow::Result<k8s_cri::v1::ContainerStatusResponse> {
    Ok(clients
        .runtime
        .container_status(k8s_cri::v1::ContainerStatusRequest {
            container_id: id.to_string(),
            verbose,
        })
        .await
        .map_err(status_error)?
        .into_inner())
}

/// The status proper of container `id`.
pub async fn status_of(
    clients: &mut Clients,
    id: &str,
) -> anyhow::Result<k8s_cri::v1::ContainerStatus> {
    use anyhow::Context;
    container_status(clients, id, false)
        .await?
        .status
        .context("the daemon sent no container status")
}

/// Whether a status says the container has exited.
pub fn has_exited(status: &k8s_cri::v1::ContainerStatus) -> bool {
    status.state == k8s_cri::v1::ContainerState::ContainerExited as i32
}

/// Output formats of the listing commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, for people.
    Table,
    /// JSON, for scripts.
    Json,
}

/// The first 12 hex digits of an id, as docker shows them.
pub fn short_id(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    id.get(..12).unwrap_or(id)
}

/// "3 seconds ago"-style age of a CRI timestamp (nanoseconds).
pub fn ago(nanos: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let secs = now.saturating_sub(nanos / 1_000_000_000).max(0);
    let (n, unit) = match secs {
        0..60 => (secs, "second"),
        60..3600 => (secs / 60, "minute"),
        3600..86_400 => (secs / 3600, "hour"),
        _ => (secs / 86_400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_and_ages() {
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("abc"), "abc");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        assert_eq!(ago(now), "0 seconds ago");
        assert_eq!(ago(now - 61_000_000_000), "1 minute ago");
        assert_eq!(ago(now - 7_300_000_000_000), "2 hours ago");
    }
}
