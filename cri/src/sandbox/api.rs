//! A client of frakti-vmm's control API (HTTP/1.1 + JSON on the pod's
//! unix socket): what the daemon changes in a running VM (disk slots).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// The VMM's answers are small JSON objects; anything bigger is hostile.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the VMM's control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control API request {0}")]
    Http(String, #[source] hyper::Error),
    #[error("control API: {method} {path} answered {status}: {message}")]
    Refused {
        method: &'static str,
        path: String,
        status: u16,
        message: String,
    },
    #[error("control API: {0}")]
    BadAnswer(String),
}

/// Sends one request; returns the JSON answer of a 2xx status.
async fn request(
    socket: &Path,
    method: &'static str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Error> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| Error::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::Http("handshake".into(), e))?;
    tokio::spawn(connection);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "frakti-vmm")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Error::BadAnswer(format!("cannot build the request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Error::Http(format!("{method} {path}"), e))?;
    let status = response.status().as_u16();
    let limited = http_body_util::Limited::new(response.into_body(), MAX_ANSWER);
    let bytes = limited
        .collect()
        .await
        .map_err(|e| Error::BadAnswer(format!("{method} {path}: {e}")))?
        .to_bytes();
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("(no message)")
            .to_string();
        return Err(Error::Refused {
            method,
            path: path.to_string(),
            status,
            message,
        });
    }
    Ok(value)
}

/// Puts `file` behind the empty slot `serial` (the guest sees a new disk),
/// read-only if asked (writes fail at the device).
pub async fn attach_disk(
    socket: &Path,
    serial: &str,
    file: &Path,
    read_only: bool,
) -> Result<(), Error> {
    let path = file
        .to_str()
        .ok_or_else(|| Error::BadAnswer(format!("{} is not UTF-8", file.display())))?;
    request(
        socket,
        "PUT",
        &format!("/disks/{serial}"),
        Some(json!({ "path": path, "read_only": read_only })),
    )
    .await
    .map(drop)
}

/// Empties slot `serial` (the guest's disk shrinks to nothing).
pub async fn detach_disk(socket: &Path, serial: &str) -> Result<(), Error> {
    request(socket, "DELETE", &format!("/disks/{serial}"), None)
        .await
        .map(drop)
}

/// The VMM's counters (`GET /metrics`), for stats.
pub async fn metrics(socket: &Path) -> Result<Value, Error> {
    request(socket, "GET", "/metrics", None).await
}
