//! `frakti daemon`: serves CRI (RuntimeService and ImageService) and
//! frakti's own image API on a unix socket until SIGTERM or SIGINT. Pod VMs
//! outlive the daemon: a restarted daemon finds them again.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use frakti_proto::containers::v1::containers_server::ContainersServer;
use frakti_proto::images::v1::images_server::ImagesServer;
use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::image::{ImageStore, StoreConfig};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::server::containers_admin::ContainersAdmin;
use crate::server::image_service::ImageService;
use crate::server::images_admin::ImagesAdmin;
use crate::server::runtime_service::RuntimeService;
use crate::streaming::Streaming;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("another frakti daemon is using {0}")]
    Locked(PathBuf),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another process listens on {0}")]
    SocketInUse(PathBuf),
    #[error(transparent)]
    Store(#[from] crate::image::store::Error),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
    #[error("unknown group {0:?} for the socket (--socket-group)")]
    UnknownGroup(String),
    #[error("gRPC server")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Streaming(#[from] crate::streaming::Error),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

pub struct Options {
    pub listen: PathBuf,
    pub state_dir: PathBuf,
    pub store: StoreConfig,
    pub runtime: RuntimeConfig,
    /// Group that owns the socket (mode 0660); None: root.
    pub socket_group: Option<String>,
    /// The streaming server's certificate and key; None: plain HTTP.
    pub streaming_tls: Option<crate::streaming::TlsFiles>,
}

/// Holds the state dir for this process (released when it exits).
fn lock_state_dir(state_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
    std::fs::create_dir_all(state_dir).map_err(io_error("cannot create", state_dir))?;
    let path = state_dir.join("frakti.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error("cannot open", &path))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| Error::Locked(state_dir.to_path_buf()))
}

fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_error("cannot create", dir))?;
    }
    if path.exists() {
        // A socket nobody accepts on is left over from a daemon that died.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_error("cannot remove stale socket", path))?;
    }
    let listener = UnixListener::bind(path).map_err(io_error("cannot listen on", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_error("cannot chmod", path))?;
    if let Some(name) = group {
        let gid = match name.parse::<u32>() {
            Ok(gid) => nix::unistd::Gid::from_raw(gid),
            Err(_) => {
                nix::unistd::Group::from_name(name)
                    .ok()
                    .flatten()
                    .ok_or_else(|| Error::UnknownGroup(name.to_string()))?
                    .gid
            }
        };
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| Error::Io {
            what: "cannot chown",
            path: path.to_path_buf(),
            source: e.into(),
        })?;
    }
    Ok(listener)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

pub async fn run(options: Options) -> Result<(), Error> {
    let _lock = lock_state_dir(&options.state_dir)?;
    let store = ImageStore::open(options.store)?;
    match store.collect_garbage() {
        Ok(freed) if freed > 0 => tracing::info!(bytes = freed, "collected unreferenced content"),
        Ok(_) => {}
        Err(e) => tracing::warn!("garbage collection: {}", crate::error_chain(&e)),
    }
    let streaming_addr = options.runtime.streaming_addr.clone();
    let runtime = Runtime::open(options.runtime, store.clone()).await?;
    let streaming = Streaming::start(
        &streaming_addr,
        options.streaming_tls.as_ref(),
        runtime.clone(),
    )
    .await?;
    let listener = bind(&options.listen, options.socket_group.as_deref())?;
    tracing::info!(socket = %options.listen.display(), state = %options.state_dir.display(), "serving CRI");
    let result = tonic::transport::Server::builder()
        .add_service(ContainersServer::new(ContainersAdmin::new(runtime.clone())))
        .add_service(RuntimeServiceServer::new(RuntimeService::new(
            runtime, streaming,
        )))
        .add_service(ImageServiceServer::new(ImageService::new(store.clone())))
        .add_service(ImagesServer::new(ImagesAdmin::new(store)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown_signal())
        .await;
    let _ = std::fs::remove_file(&options.listen);
    Ok(result?)
}
