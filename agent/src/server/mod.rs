//! The gRPC service: each RPC checks its request, calls the module that
//! does the work and maps that module's error to a status code.
//!
//! Here: the server and its listeners; `rpc.rs` has the RPCs, `status.rs`
//! the error mapping, `convert.rs` the figures and messages they build.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use frakti_proto::agent::v1 as pb;
use frakti_proto::agent::v1::agent_server::{Agent as AgentApi, AgentServer};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::container::{self, Containers, CreateRequest, EventKind, Exit};
use crate::network::{self, Netlink};
use crate::port_forward;
use crate::sandbox::{self, Sandbox, SandboxConfig};
use crate::storage::{self, RootfsSource, Storage};
use crate::sysinfo;
use frakti_proto::error_chain as chain;

mod convert;
mod rpc;
mod status;

use convert::*;
use status::*;

/// Everything the service works on.
pub struct Agent {
    pub containers: Containers,
    pub storage: Storage,
    pub sandbox: Sandbox,
    /// Held while the network is changed: one change at a time.
    network: std::sync::Mutex<()>,
    /// Set to the grace period when a shutdown is requested.
    shutdown: watch::Sender<Option<Duration>>,
}

impl Agent {
    pub fn new(containers: Containers, storage: Storage, sandbox: Sandbox) -> Arc<Self> {
        let (shutdown, _) = watch::channel(None);
        Arc::new(Self {
            containers,
            storage,
            sandbox,
            network: std::sync::Mutex::new(()),
            shutdown,
        })
    }

    /// Asks the server to stop; [`serve`] then stops the containers.
    pub fn request_shutdown(&self, grace: Duration) {
        self.shutdown.send_replace(Some(grace));
    }

    /// Runs `work` on a netlink socket, on the blocking pool, one network
    /// request at a time.
    async fn network<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&mut Netlink) -> Result<T, network::Error> + Send + 'static,
    ) -> Result<T, Status> {
        let agent = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = agent.network.lock().unwrap_or_else(|e| e.into_inner());
            work(&mut Netlink::open()?)
        })
        .await
        .map_err(join_error)?;
        Ok(result?)
    }

    fn shutdown_requested(&self) -> watch::Receiver<Option<Duration>> {
        self.shutdown.subscribe()
    }
}

/// Where the server listens.
pub enum Listener {
    Unix(tokio::net::UnixListener),
    Vsock(tokio_vsock::VsockListener),
}

/// Serves `listeners` until a shutdown is requested (Shutdown RPC or
/// [`Agent::request_shutdown`]), then stops every container.
pub async fn serve(agent: Arc<Agent>, listeners: Vec<Listener>) {
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        let service = AgentServer::new(Service {
            agent: agent.clone(),
        });
        let mut stop = agent.shutdown_requested();
        let stopped = async move {
            let _ = stop.wait_for(|s| s.is_some()).await;
        };
        // One service: no router needed, AgentServer answers unknown
        // methods itself.
        // Larger than HTTP/2's default 64 KiB windows: bulk input (stdin,
        // port-forward, copied files) would wait a round trip per window.
        let server = tonic::transport::Server::builder()
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20);
        match listener {
            Listener::Unix(l) => {
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(l);
                servers.spawn(server.serve_with_incoming_shutdown(service, incoming, stopped));
            }
            Listener::Vsock(l) => {
                let incoming =
                    tokio_stream::StreamExt::map(l.incoming(), |c| c.map(VsockConnection));
                servers.spawn(server.serve_with_incoming_shutdown(service, incoming, stopped));
            }
        }
    }
    let mut stop = agent.shutdown_requested();
    let grace = match stop.wait_for(|s| s.is_some()).await {
        Ok(grace) => grace.unwrap_or_default(),
        Err(_) => Duration::ZERO,
    };
    tracing::info!("shutting down: stopping containers (grace {grace:?})");
    agent.containers.remove_all(grace).await;
    // Servers end once their open streams are done; do not wait forever.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while servers.join_next().await.is_some() {}
    })
    .await;
}

struct Service {
    agent: Arc<Agent>,
}

/// A vsock connection for tonic (tokio-vsock's own tonic support would turn
/// on tonic's default features: router, client transport).
struct VsockConnection(tokio_vsock::VsockStream);

impl tonic::transport::server::Connected for VsockConnection {
    type ConnectInfo = ();

    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for VsockConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for VsockConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Service {
    fn containers(&self) -> &Containers {
        &self.agent.containers
    }

    /// Adds the block devices of disks registered with MountDisk to the
    /// spec's linux.devices, and device rules that give the container
    /// exactly the access its permissions name.
    fn with_devices(
        &self,
        spec_json: &[u8],
        devices: &[pb::BlockDevice],
    ) -> Result<Vec<u8>, Status> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let mut spec: serde_json::Value = serde_json::from_slice(spec_json)
            .map_err(|e| Status::invalid_argument(format!("malformed OCI spec JSON: {e}")))?;
        let mut nodes = Vec::new();
        let mut rules = Vec::new();
        for device in devices {
            let path = device.container_path.as_str();
            if !path.starts_with("/dev/") || path.contains("..") {
                return Err(Status::invalid_argument(format!(
                    "device path '{path}' must be below /dev"
                )));
            }
            let access = block_access(&device.permissions)?;
            let node = self.agent.storage.device(&device.disk_id)?;
            let meta = std::fs::metadata(&node)
                .map_err(|e| Status::internal(format!("cannot stat {}: {e}", node.display())))?;
            if !meta.file_type().is_block_device() {
                return Err(Status::failed_precondition(format!(
                    "{} is not a block device",
                    node.display()
                )));
            }
            let rdev = meta.rdev();
            let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
            nodes.push(serde_json::json!({
                "path": path,
                "type": "b",
                "major": major,
                "minor": minor,
                "fileMode": 0o660,
                "uid": 0,
                "gid": 0,
            }));
            // The last rule that matches decides (cgroup::devices); mknod
            // stays allowed (the default list) so the node can be made.
            rules.push(serde_json::json!(
                {"allow": false, "type": "b", "major": major, "minor": minor, "access": "rw"}
            ));
            rules.push(serde_json::json!(
                {"allow": true, "type": "b", "major": major, "minor": minor, "access": access}
            ));
        }
        let Some(root) = spec.as_object_mut() else {
            return Err(Status::invalid_argument(
                "the OCI spec is not a JSON object",
            ));
        };
        let linux = object_entry(root, "linux")?;
        list_entry(linux, "devices")?.extend(nodes);
        let resources = object_entry(linux, "resources")?;
        list_entry(resources, "devices")?.extend(rules);
        serde_json::to_vec(&spec).map_err(|e| Status::internal(e.to_string()))
    }
}

/// A CRI device's permissions ("r", "rw", "rwm"; empty: "rw") as OCI access.
fn block_access(permissions: &str) -> Result<&str, Status> {
    if permissions.is_empty() {
        return Ok("rw");
    }
    if !permissions.chars().all(|c| "rwm".contains(c)) {
        return Err(Status::invalid_argument(format!(
            "device permissions {permissions:?} must be letters of \"rwm\""
        )));
    }
    Ok(permissions)
}

/// `map[key]` as an object, created empty when absent.
fn object_entry<'a>(
    map: &'a mut serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<&'a mut serde_json::Map<String, serde_json::Value>, Status> {
    map.entry(key)
        .or_insert_with(|| serde_json::json!({}))
        .as_object_mut()
        .ok_or_else(|| Status::invalid_argument(format!("{key} in the OCI spec is not an object")))
}

/// `map[key]` as a list, created empty when absent.
fn list_entry<'a>(
    map: &'a mut serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<&'a mut Vec<serde_json::Value>, Status> {
    map.entry(key)
        .or_insert_with(|| serde_json::json!([]))
        .as_array_mut()
        .ok_or_else(|| Status::invalid_argument(format!("{key} in the OCI spec is not a list")))
}
