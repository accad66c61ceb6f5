//! The gRPC service: each RPC checks its request, calls the module that
//! does the work and maps that module's error to a status code.

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
        let server = tonic::transport::Server::builder();
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
    /// spec's linux.devices.
    fn with_devices(
        &self,
        spec_json: &[u8],
        devices: &[pb::BlockDevice],
    ) -> Result<Vec<u8>, Status> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let mut spec: serde_json::Value = serde_json::from_slice(spec_json)
            .map_err(|e| Status::invalid_argument(format!("malformed OCI spec JSON: {e}")))?;
        let mut nodes = Vec::new();
        for device in devices {
            let path = device.container_path.as_str();
            if !path.starts_with("/dev/") || path.contains("..") {
                return Err(Status::invalid_argument(format!(
                    "device path '{path}' must be below /dev"
                )));
            }
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
            nodes.push(serde_json::json!({
                "path": path,
                "type": "b",
                "major": nix::sys::stat::major(rdev),
                "minor": nix::sys::stat::minor(rdev),
                "fileMode": 0o660,
                "uid": 0,
                "gid": 0,
            }));
        }
        let Some(root) = spec.as_object_mut() else {
            return Err(Status::invalid_argument(
                "the OCI spec is not a JSON object",
            ));
        };
        let linux = root.entry("linux").or_insert_with(|| serde_json::json!({}));
        let Some(linux) = linux.as_object_mut() else {
            return Err(Status::invalid_argument("linux is not an object"));
        };
        let list = linux
            .entry("devices")
            .or_insert_with(|| serde_json::json!([]));
        let Some(list) = list.as_array_mut() else {
            return Err(Status::invalid_argument("linux.devices is not a list"));
        };
        list.extend(nodes);
        serde_json::to_vec(&spec).map_err(|e| Status::internal(e.to_string()))
    }
}

impl From<container::Error> for Status {
    fn from(e: container::Error) -> Status {
        use container::Error as E;
        let message = chain(&e);
        match e {
            E::NotFound(_) | E::ProcessNotFound { .. } => Status::not_found(message),
            E::Exists(_) | E::ProcessExists { .. } => Status::already_exists(message),
            E::Invalid(_) | E::Cgroup(crate::cgroup::Error::Invalid(_)) => {
                Status::invalid_argument(message)
            }
            E::Storage(storage::Error::Invalid(_)) => Status::invalid_argument(message),
            E::Storage(storage::Error::NotFound(_)) => Status::not_found(message),
            E::Precondition(_) | E::Storage(storage::Error::Precondition(_)) => {
                Status::failed_precondition(message)
            }
            _ => Status::internal(message),
        }
    }
}

impl From<storage::Error> for Status {
    fn from(e: storage::Error) -> Status {
        let message = chain(&e);
        match e {
            storage::Error::Invalid(_) => Status::invalid_argument(message),
            storage::Error::NotFound(_) => Status::not_found(message),
            storage::Error::Precondition(_) => Status::failed_precondition(message),
            storage::Error::Exists(_) => Status::already_exists(message),
            _ => Status::internal(message),
        }
    }
}

impl From<sandbox::Error> for Status {
    fn from(e: sandbox::Error) -> Status {
        let message = chain(&e);
        match e {
            sandbox::Error::Invalid(_)
            | sandbox::Error::Cgroup(crate::cgroup::Error::Invalid(_)) => {
                Status::invalid_argument(message)
            }
            sandbox::Error::AlreadySetUp => Status::failed_precondition(message),
            _ => Status::internal(message),
        }
    }
}

impl From<network::Error> for Status {
    fn from(e: network::Error) -> Status {
        let message = chain(&e);
        match e {
            network::Error::Invalid(_) => Status::invalid_argument(message),
            network::Error::NotFound(_) => Status::not_found(message),
            network::Error::Exists(_) => Status::already_exists(message),
            _ if e.is_refused_argument() => Status::invalid_argument(message),
            _ => Status::internal(message),
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("a blocking task failed: {e}"))
}

/// Guest memory and per-interface counters, from /proc.
fn sandbox_stats() -> pb::StatsSandboxResponse {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let netdev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    let interfaces = netdev
        .lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let name = name.trim();
            if name == "lo" {
                return None;
            }
            let v: Vec<u64> = counters
                .split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect();
            (v.len() >= 12).then(|| pb::InterfaceStats {
                name: name.into(),
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
                tx_dropped: v[11],
            })
        })
        .collect();
    pb::StatsSandboxResponse {
        mem_total_bytes: kib("MemTotal") * 1024,
        mem_available_bytes: kib("MemAvailable") * 1024,
        interfaces,
        timestamp_ns: unix_ns(SystemTime::now()),
    }
}

fn unix_ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn exit_status(exit: Exit, oom_killed: bool) -> pb::ExitStatus {
    pb::ExitStatus {
        exit_code: exit.code,
        signal: exit.signal,
        oom_killed,
        exited_at_ns: unix_ns(exit.at),
    }
}

fn require_id(what: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is empty")));
    }
    Ok(())
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Largest output chunk sent in one message.
const OUTPUT_CHUNK: usize = 32 * 1024;

#[tonic::async_trait]
impl AgentApi for Service {
    async fn check(
        &self,
        _: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        Ok(Response::new(pb::CheckResponse { serving: true }))
    }

    async fn get_version(
        &self,
        _: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::GetVersionResponse>, Status> {
        Ok(Response::new(pb::GetVersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            api_version: frakti_proto::AGENT_API_VERSION,
            cpus: sysinfo::online_cpus().unwrap_or(0),
            mem_total_kib: sysinfo::mem_total_kib().unwrap_or(0),
            uptime_secs: sysinfo::uptime_secs().unwrap_or(0.0),
        }))
    }

    async fn setup_sandbox(
        &self,
        request: Request<pb::SetupSandboxRequest>,
    ) -> Result<Response<pb::SetupSandboxResponse>, Status> {
        let r = request.into_inner();
        let config = SandboxConfig {
            hostname: r.hostname,
            resolv_conf: r.resolv_conf,
            sysctls: r.sysctls,
            resources_json: r.resources_json,
        };
        let agent = self.agent.clone();
        tokio::task::spawn_blocking(move || agent.sandbox.setup(&config))
            .await
            .map_err(join_error)??;
        if r.shared_pid_namespace {
            self.containers().share_pid_namespace().await?;
        }
        Ok(Response::new(pb::SetupSandboxResponse {}))
    }

    async fn stats_sandbox(
        &self,
        _: Request<pb::StatsSandboxRequest>,
    ) -> Result<Response<pb::StatsSandboxResponse>, Status> {
        Ok(Response::new(sandbox_stats()))
    }

    async fn mount_disk(
        &self,
        request: Request<pb::MountDiskRequest>,
    ) -> Result<Response<pb::MountDiskResponse>, Status> {
        let r = request.into_inner();
        let timeout = match r.timeout_ms {
            0 => Duration::from_secs(5),
            ms => Duration::from_millis(ms.into()),
        };
        let disk = storage::DiskRequest {
            id: r.disk_id,
            serial: r.serial,
            fs_type: r.fs_type,
            options: r.options,
            read_only: r.read_only,
            timeout,
        };
        let agent = self.agent.clone();
        let (path, device) = tokio::task::spawn_blocking(move || agent.storage.mount_disk(&disk))
            .await
            .map_err(join_error)??;
        Ok(Response::new(pb::MountDiskResponse {
            guest_path: path.display().to_string(),
            device: device.display().to_string(),
        }))
    }

    async fn unmount_disk(
        &self,
        request: Request<pb::UnmountDiskRequest>,
    ) -> Result<Response<pb::UnmountDiskResponse>, Status> {
        let id = request.into_inner().disk_id;
        let agent = self.agent.clone();
        tokio::task::spawn_blocking(move || agent.storage.unmount_disk(&id))
            .await
            .map_err(join_error)??;
        Ok(Response::new(pb::UnmountDiskResponse {}))
    }

    async fn copy_file(
        &self,
        request: Request<pb::CopyFileRequest>,
    ) -> Result<Response<pb::CopyFileResponse>, Status> {
        let r = request.into_inner();
        let kind = match pb::FileKind::try_from(r.kind) {
            Ok(pb::FileKind::File) => storage::FileKind::File,
            Ok(pb::FileKind::Directory) => storage::FileKind::Directory,
            Ok(pb::FileKind::Symlink) => storage::FileKind::Symlink,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown file kind {}",
                    r.kind
                )));
            }
        };
        let file = storage::CopyFile {
            path: r.path,
            kind,
            data: r.data,
            mode: r.mode,
            uid: r.uid,
            gid: r.gid,
            version: r.version,
            in_place: r.in_place,
        };
        let agent = self.agent.clone();
        let (path, written) = tokio::task::spawn_blocking(move || agent.storage.copy_file(&file))
            .await
            .map_err(join_error)??;
        Ok(Response::new(pb::CopyFileResponse {
            guest_path: path.display().to_string(),
            written,
        }))
    }

    async fn remove_file(
        &self,
        request: Request<pb::RemoveFileRequest>,
    ) -> Result<Response<pb::RemoveFileResponse>, Status> {
        let path = request.into_inner().path;
        let agent = self.agent.clone();
        tokio::task::spawn_blocking(move || agent.storage.remove_file(&path))
            .await
            .map_err(join_error)??;
        Ok(Response::new(pb::RemoveFileResponse {}))
    }

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<pb::ReadFileResponse>, Status> {
        let path = request.into_inner().path;
        let agent = self.agent.clone();
        let (data, truncated) = tokio::task::spawn_blocking(move || {
            agent.storage.read_file(&path, storage::MAX_READ_BYTES)
        })
        .await
        .map_err(join_error)??;
        Ok(Response::new(pb::ReadFileResponse { data, truncated }))
    }

    async fn create_container(
        &self,
        request: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::CreateContainerResponse>, Status> {
        let r = request.into_inner();
        let Some(rootfs) = r.rootfs else {
            return Err(Status::invalid_argument("rootfs is missing"));
        };
        let state_dir = self.containers().state_dir();
        let base = match rootfs.source {
            Some(pb::rootfs::Source::GuestPath(path)) => {
                let path = PathBuf::from(path);
                if !path.is_absolute() {
                    return Err(Status::invalid_argument(
                        "rootfs.guest_path must be absolute",
                    ));
                }
                path
            }
            Some(pb::rootfs::Source::DiskId(disk)) => {
                if !storage::valid_id(&disk) {
                    return Err(Status::invalid_argument(format!("bad disk id '{disk}'")));
                }
                state_dir.join("disks").join(disk)
            }
            None => return Err(Status::invalid_argument("rootfs has no source")),
        };
        let lower = if rootfs.subpath.is_empty() {
            base
        } else {
            base.join(storage::relative_path(&rootfs.subpath)?)
        };
        let upper_base = if rootfs.upper_disk_id.is_empty() {
            None
        } else if storage::valid_id(&rootfs.upper_disk_id) {
            Some(
                state_dir
                    .join("disks")
                    .join(&rootfs.upper_disk_id)
                    .join("containers")
                    .join(&r.container_id),
            )
        } else {
            return Err(Status::invalid_argument("bad upper_disk_id"));
        };
        let spec_json = if r.devices.is_empty() {
            r.oci_spec_json
        } else {
            self.with_devices(&r.oci_spec_json, &r.devices)?
        };
        let pid = self
            .containers()
            .create(CreateRequest {
                id: r.container_id,
                spec_json,
                rootfs: RootfsSource {
                    lower,
                    writable_overlay: rootfs.writable_overlay,
                    upper_base,
                },
            })
            .await?;
        Ok(Response::new(pb::CreateContainerResponse {
            pid: pid as u32,
        }))
    }

    async fn start_container(
        &self,
        request: Request<pb::StartContainerRequest>,
    ) -> Result<Response<pb::StartContainerResponse>, Status> {
        let r = request.into_inner();
        require_id("container_id", &r.container_id)?;
        self.containers().start(&r.container_id).await?;
        Ok(Response::new(pb::StartContainerResponse {}))
    }

    async fn exec_process(
        &self,
        request: Request<pb::ExecProcessRequest>,
    ) -> Result<Response<pb::ExecProcessResponse>, Status> {
        let r = request.into_inner();
        require_id("container_id", &r.container_id)?;
        let pid = self
            .containers()
            .exec(&r.container_id, &r.exec_id, &r.process_json)
            .await?;
        Ok(Response::new(pb::ExecProcessResponse { pid: pid as u32 }))
    }

    async fn wait_process(
        &self,
        request: Request<pb::WaitProcessRequest>,
    ) -> Result<Response<pb::WaitProcessResponse>, Status> {
        let r = request.into_inner();
        require_id("container_id", &r.container_id)?;
        let (container, process) = self
            .containers()
            .process(&r.container_id, &r.exec_id)
            .await?;
        let exit = process.wait().await;
        let (exit, oom) = container.report(exit);
        Ok(Response::new(pb::WaitProcessResponse {
            status: Some(exit_status(exit, oom)),
        }))
    }

    async fn signal_process(
        &self,
        request: Request<pb::SignalProcessRequest>,
    ) -> Result<Response<pb::SignalProcessResponse>, Status> {
        let r = request.into_inner();
        require_id("container_id", &r.container_id)?;
        self.containers()
            .signal(&r.container_id, &r.exec_id, r.signal, r.all)
            .await?;
        Ok(Response::new(pb::SignalProcessResponse {}))
    }

    async fn write_stdin(
        &self,
        request: Request<pb::WriteStdinRequest>,
    ) -> Result<Response<pb::WriteStdinResponse>, Status> {
        let r = request.into_inner();
        require_id("container_id", &r.container_id)?;
        self.containers()
            .write_stdin(&r.container_id, &r.exec_id, &r.data)
            .await?;
        Ok(Response::new(pb::WriteStdinResponse {
            written: r.data.len() as u64,
        }))
    }

    async fn close_stdin(
        &self,
        request: Request<pb::CloseStdinRequest>,
    ) -> Result<Response<pb::CloseStdinResponse>, Status> {
        let r = request.into_inner();
        require_id("container_id", &r.container_id)?;
        self.containers()
            .close_stdin(&r.container_id, &r.exec_id)
            .await?;
        Ok(Response::new(pb::CloseStdinResponse {}))
    }

    type ReadOutputStream = BoxStream<pb::OutputChunk>;

    async fn read_output(
        &self,
        request: Request<pb::ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        let r = request.into_inner();
        require_id("container_id", &r.container_id)?;
        let stream = match pb::OutputStream::try_from(r.stream) {
            Ok(pb::OutputStream::Stdout) => container::Stream::Stdout,
            Ok(pb::OutputStream::Stderr) => container::Stream::Stderr,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown stream {}",
                    r.stream
                )));
            }
        };
        let output = self
            .containers()
            .output(&r.container_id, &r.exec_id, stream)
            .await?;
        let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
        container::drain(output, OUTPUT_CHUNK, tx).await?;
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), |data| {
            Ok(pb::OutputChunk { data })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn resize_tty(
        &self,
        request: Request<pb::ResizeTtyRequest>,
    ) -> Result<Response<pb::ResizeTtyResponse>, Status> {
        let r = request.into_inner();
        require_id("container_id", &r.container_id)?;
        self.containers()
            .resize(&r.container_id, &r.exec_id, r.rows, r.cols)
            .await?;
        Ok(Response::new(pb::ResizeTtyResponse {}))
    }

    async fn list_processes(
        &self,
        request: Request<pb::ListProcessesRequest>,
    ) -> Result<Response<pb::ListProcessesResponse>, Status> {
        let r = request.into_inner();
        require_id("container_id", &r.container_id)?;
        let container = self.containers().get(&r.container_id)?;
        let processes = self
            .containers()
            .processes(&container)
            .await
            .into_iter()
            .map(|p| pb::ProcessInfo {
                pid: p.pid as u32,
                ppid: p.ppid as u32,
                uid: p.uid,
                args: p.args,
                state: p.state,
            })
            .collect();
        Ok(Response::new(pb::ListProcessesResponse { processes }))
    }

    async fn list_containers(
        &self,
        _: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        let mut containers = Vec::new();
        for c in self.containers().list() {
            let state = match c.state().await {
                container::State::Created => pb::ContainerState::Created,
                container::State::Running => pb::ContainerState::Running,
                container::State::Stopped => pb::ContainerState::Stopped,
            };
            let exit_status = c.init.exited().map(|e| {
                let (e, oom) = c.report(e);
                exit_status(e, oom)
            });
            containers.push(pb::ContainerInfo {
                container_id: c.id.clone(),
                state: state as i32,
                pid: c.init.pid as u32,
                exit_status,
                exec_ids: c.exec_ids().await,
            });
        }
        Ok(Response::new(pb::ListContainersResponse { containers }))
    }

    async fn update_container(
        &self,
        request: Request<pb::UpdateContainerRequest>,
    ) -> Result<Response<pb::UpdateContainerResponse>, Status> {
        let r = request.into_inner();
        require_id("container_id", &r.container_id)?;
        self.containers()
            .update(&r.container_id, &r.resources_json)
            .await?;
        Ok(Response::new(pb::UpdateContainerResponse {}))
    }

    async fn stats_container(
        &self,
        request: Request<pb::StatsContainerRequest>,
    ) -> Result<Response<pb::StatsContainerResponse>, Status> {
        let r = request.into_inner();
        require_id("container_id", &r.container_id)?;
        let s = self.containers().stats(&r.container_id).await?;
        Ok(Response::new(pb::StatsContainerResponse {
            timestamp_ns: unix_ns(SystemTime::now()),
            cpu: Some(pb::CpuStats {
                usage_ns: s.cpu_usage_ns,
                user_ns: s.cpu_user_ns,
                system_ns: s.cpu_system_ns,
                nr_periods: s.nr_periods,
                nr_throttled: s.nr_throttled,
                throttled_ns: s.throttled_ns,
            }),
            memory: Some(pb::MemoryStats {
                usage_bytes: s.memory_usage,
                working_set_bytes: s.working_set,
                rss_bytes: s.rss,
                page_faults: s.page_faults,
                major_page_faults: s.major_page_faults,
                limit_bytes: s.memory_limit,
                oom_kills: s.oom_kills,
            }),
            pids: Some(pb::PidsStats {
                current: s.pids,
                limit: s.pids_limit,
            }),
        }))
    }

    async fn remove_container(
        &self,
        request: Request<pb::RemoveContainerRequest>,
    ) -> Result<Response<pb::RemoveContainerResponse>, Status> {
        let r = request.into_inner();
        require_id("container_id", &r.container_id)?;
        self.containers()
            .remove(
                &r.container_id,
                Duration::from_secs(r.grace_period_secs.into()),
            )
            .await?;
        Ok(Response::new(pb::RemoveContainerResponse {}))
    }

    type EventsStream = BoxStream<pb::Event>;

    async fn events(
        &self,
        _: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let mut events = self.containers().subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("events stream lagged by {n}");
                        continue;
                    }
                    Err(_) => return,
                };
                let kind = match event.kind {
                    EventKind::Exited { exit, oom_killed } => {
                        pb::event::Kind::Exited(exit_status(exit, oom_killed))
                    }
                    EventKind::Oom { oom_kills } => {
                        pb::event::Kind::Oom(pb::OomEvent { oom_kills })
                    }
                };
                let message = pb::Event {
                    container_id: event.container_id,
                    exec_id: event.exec_id,
                    kind: Some(kind),
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn update_interface(
        &self,
        request: Request<pb::UpdateInterfaceRequest>,
    ) -> Result<Response<pb::UpdateInterfaceResponse>, Status> {
        let Some(interface) = request.into_inner().interface else {
            return Err(Status::invalid_argument("interface is missing"));
        };
        let interface = self
            .agent
            .network(move |nl| network::update_interface(nl, &interface))
            .await?;
        Ok(Response::new(pb::UpdateInterfaceResponse {
            interface: Some(interface),
        }))
    }

    async fn list_interfaces(
        &self,
        _: Request<pb::ListInterfacesRequest>,
    ) -> Result<Response<pb::ListInterfacesResponse>, Status> {
        let interfaces = self.agent.network(network::list_interfaces).await?;
        Ok(Response::new(pb::ListInterfacesResponse { interfaces }))
    }

    async fn update_routes(
        &self,
        request: Request<pb::UpdateRoutesRequest>,
    ) -> Result<Response<pb::UpdateRoutesResponse>, Status> {
        let routes = request.into_inner().routes;
        let routes = self
            .agent
            .network(move |nl| network::update_routes(nl, &routes))
            .await?;
        Ok(Response::new(pb::UpdateRoutesResponse { routes }))
    }

    async fn list_routes(
        &self,
        _: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let routes = self.agent.network(network::list_routes).await?;
        Ok(Response::new(pb::ListRoutesResponse { routes }))
    }

    async fn add_neighbors(
        &self,
        request: Request<pb::AddNeighborsRequest>,
    ) -> Result<Response<pb::AddNeighborsResponse>, Status> {
        let neighbors = request.into_inner().neighbors;
        self.agent
            .network(move |nl| network::add_neighbors(nl, &neighbors))
            .await?;
        Ok(Response::new(pb::AddNeighborsResponse {}))
    }

    type PortForwardStream = BoxStream<pb::PortForwardData>;

    async fn port_forward(
        &self,
        request: Request<tonic::Streaming<pb::PortForwardData>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        let responses = port_forward::open(request.into_inner()).await?;
        Ok(Response::new(Box::pin(responses)))
    }

    async fn shutdown(
        &self,
        request: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        let grace = Duration::from_secs(request.into_inner().grace_period_secs.into());
        let agent = self.agent.clone();
        // Answer first; the shutdown starts once the reply is on its way.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            agent.request_shutdown(grace);
        });
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}
