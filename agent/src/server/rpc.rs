//! The Agent API, RPC by RPC.

use super::*;
use crate::output::{Attach, AttachError, Piece, Placed};

pub(super) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

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
        let agent = self.agent.clone();
        let disks = tokio::task::spawn_blocking(move || agent.storage.disk_usage())
            .await
            .map_err(join_error)?;
        Ok(Response::new(sandbox_stats(disks)))
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
        request: Request<tonic::Streaming<pb::ReadOutputRequest>>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        let mut requests = request.into_inner();
        let r = requests
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("ReadOutput: no request message"))?;
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
        let (tx, rx) = mpsc::channel::<Placed>(16);
        let how = Attach {
            from: r.from_offset,
            acknowledging: r.acknowledge,
        };
        let generation = output.drain(how, tx).map_err(|e| match e {
            AttachError::AlreadyRead => Status::failed_precondition(e.to_string()),
            AttachError::Beyond { .. } => Status::out_of_range(e.to_string()),
        })?;
        if r.acknowledge {
            tokio::spawn(async move {
                while let Ok(Some(message)) = requests.message().await {
                    output.acknowledge(generation, message.kept);
                }
            });
        }
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), |(offset, piece)| {
            Ok(match piece {
                Piece::Data(data) => pb::OutputChunk {
                    data,
                    lost_bytes: 0,
                    offset,
                },
                Piece::Lost(lost_bytes) => pb::OutputChunk {
                    data: Vec::new(),
                    lost_bytes,
                    offset,
                },
            })
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
