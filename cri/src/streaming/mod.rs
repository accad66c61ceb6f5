//! The streaming server: `kubectl exec`, `attach` and `port-forward`.
//!
//! The CRI Exec/Attach/PortForward RPCs validate a request, keep it under
//! a one-time token ([`request`]) and answer with a URL on this server;
//! kubelet (or any client) connects there and upgrades the connection to
//! SPDY/3.1 ([`spdy`], the protocol kubelet speaks to runtimes) or to
//! WebSocket ([`websocket`]). [`remotecommand`] and [`portforward`] are the
//! Kubernetes protocols on top; [`process`] connects their streams to a
//! process in the pod VM, [`portforward::connect`] to a port in it.

pub mod io;
pub mod portforward;
pub mod process;
pub mod remotecommand;
pub mod request;
mod server;
pub mod spdy;
pub mod websocket;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use request::{CacheError, RequestCache, StreamRequest};

use crate::runtime::Runtime;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid streaming address {0:?} (expected ip:port, e.g. 127.0.0.1:0)")]
    Address(String),
    #[error("the streaming server cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("streaming TLS: {0}")]
    Tls(String),
}

/// The certificate chain and key of a TLS streaming server (PEM files).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A running streaming server: hands out URLs for validated requests.
pub struct Streaming {
    cache: Arc<RequestCache>,
    base_url: String,
}

impl Streaming {
    /// Listens on `addr` (`ip:port`; port 0 picks a free one) and serves
    /// in the background.
    pub async fn start(
        addr: &str,
        tls: Option<&TlsFiles>,
        runtime: Runtime,
    ) -> Result<Arc<Streaming>, Error> {
        let wanted: SocketAddr = addr.parse().map_err(|_| Error::Address(addr.into()))?;
        let acceptor = tls.map(tls_acceptor).transpose()?;
        let listener = tokio::net::TcpListener::bind(wanted)
            .await
            .map_err(|source| Error::Bind {
                addr: addr.into(),
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| Error::Bind {
            addr: addr.into(),
            source,
        })?;
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let base_url = format!("{scheme}://{}", reachable(bound));
        tracing::info!(url = %base_url, "streaming server listening");
        let cache = Arc::new(RequestCache::default());
        tokio::spawn(server::serve(listener, acceptor, runtime, cache.clone()));
        Ok(Arc::new(Streaming { cache, base_url }))
    }

    /// The URL a client connects to for `request`, valid once, for a
    /// minute.
    pub fn url(&self, request: StreamRequest) -> Result<String, CacheError> {
        let kind = request.kind();
        let token = self.cache.insert(request)?;
        Ok(format!("{}/{kind}/{token}", self.base_url))
    }
}

/// The address to put in URLs: kubelet runs on this node, so an
/// unspecified address is reached on loopback.
fn reachable(bound: SocketAddr) -> SocketAddr {
    match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bound.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), bound.port())
        }
        _ => bound,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no certificate in it",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|e| Error::Tls(format!("{}: {e}", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
