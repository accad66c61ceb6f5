//! A gRPC channel to the daemon's unix socket, for the CLI and the tests.

use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "nothing listens on {path}: start the daemon with `frakti daemon` (as root), or pass --endpoint"
    )]
    NotRunning {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
}

pub async fn connect(socket: &Path) -> Result<Channel, Error> {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://frakti.daemon")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|source| Error::NotRunning {
            path: socket.display().to_string(),
            source,
        })
}
