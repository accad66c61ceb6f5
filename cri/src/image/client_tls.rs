//! Client certificates (mTLS) for registry endpoints (hosts.toml `client`,
//! or `*.cert` + `*.key` in the Docker layout).
//!
//! oci-client 0.18 builds its HTTP client itself and takes no client
//! identity, so a pull from such an endpoint goes through a forwarder of
//! our own: a loopback HTTP listener that lives as long as the pull, answers
//! only under a random path prefix (another local process cannot guess it
//! and borrow our certificate), and replays each GET or HEAD to the
//! endpoint over TLS with the client certificate, streaming the answer
//! back. A redirect or a token realm on the endpoint's own origin is
//! rewritten to come back through it; one elsewhere (a blob store, a token
//! server) is reached directly, without the certificate, as oci-client
//! would.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use super::hosts::Endpoint;

type Body = BoxBody<Bytes, std::io::Error>;

/// A running forwarder; stops (with its connections) when dropped.
pub struct Forwarder {
    /// What oci-client addresses as the registry: `127.0.0.1:PORT/SECRET`.
    pub registry: String,
    task: JoinHandle<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct State {
    client: reqwest::Client,
    /// `https://host[:port]` of the endpoint.
    origin: String,
    /// `/SECRET`: the only path the forwarder answers under.
    prefix: String,
    /// `http://127.0.0.1:PORT/SECRET`: the origin as clients see it.
    local: String,
}

/// Starts a forwarder to `endpoint` with its first client certificate.
pub async fn start(endpoint: &Endpoint) -> Result<Forwarder, String> {
    let client = client(endpoint)?;
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .await
        .map_err(|e| format!("cannot listen for the client-certificate forwarder: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("client-certificate forwarder: {e}"))?
        .port();
    let secret = secret()?;
    let state = Arc::new(State {
        client,
        origin: format!("https://{}", endpoint.host),
        prefix: format!("/{secret}"),
        local: format!("http://127.0.0.1:{port}/{secret}"),
    });
    let task = tokio::spawn(serve(listener, state));
    Ok(Forwarder {
        registry: format!("127.0.0.1:{port}/{secret}"),
        task,
    })
}

/// 128 random bits, hex.
fn secret() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    crate::fill_random(&mut bytes).map_err(|e| format!("no randomness for the forwarder: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The HTTP client that presents the certificate: the endpoint's CAs on top
/// of the system's, `skip_verify` honoured, redirects left to oci-client.
fn client(endpoint: &Endpoint) -> Result<reqwest::Client, String> {
    let Some((cert, key)) = endpoint.client.first() else {
        return Err("no client certificate".into());
    };
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
    };
    let mut pem = read(cert, "client certificate")?;
    if let Some(key) = key {
        pem.push(b'\n');
        pem.extend(read(key, "client key")?);
    }
    let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
        format!(
            "client certificate {}: not a PEM certificate with its private key: {}",
            cert.display(),
            crate::error_chain(&e)
        )
    })?;
    let mut roots = Vec::new();
    for path in &endpoint.ca {
        let certs = reqwest::Certificate::from_pem_bundle(&read(path, "CA")?)
            .map_err(|e| format!("CA {}: {}", path.display(), crate::error_chain(&e)))?;
        roots.extend(certs);
    }
    reqwest::Client::builder()
        .identity(identity)
        .tls_certs_merge(roots)
        .danger_accept_invalid_certs(endpoint.skip_verify)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("frakti/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("client-certificate forwarder: {}", crate::error_chain(&e)))
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    // Dropped with this task: every connection stops with the forwarder.
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors, say: wait instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let state = state.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| forward(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response
}

/// Headers that describe one hop, not the message.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
    )
}

async fn forward(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    // A pull only reads.
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "the client-certificate forwarder only pulls".into(),
        ));
    }
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let Some(rest) = path
        .strip_prefix(state.prefix.as_str())
        .filter(|r| r.starts_with('/'))
    else {
        return Ok(plain(StatusCode::NOT_FOUND, "not found".into()));
    };
    let mut upstream = state
        .client
        .request(req.method().clone(), format!("{}{rest}", state.origin));
    for (name, value) in req.headers() {
        if !hop_by_hop(name) {
            upstream = upstream.header(name, value);
        }
    }
    let answer = match upstream.send().await {
        Ok(answer) => answer,
        // oci-client shows this text in its error: the operator sees why
        // (a handshake the registry refused, an untrusted certificate).
        Err(e) => {
            return Ok(plain(
                StatusCode::BAD_GATEWAY,
                format!(
                    "{}: TLS with a client certificate failed: {}",
                    state.origin,
                    crate::error_chain(&e)
                ),
            ));
        }
    };
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if hop_by_hop(name) {
            continue;
        }
        let value = if name == header::LOCATION || name == header::WWW_AUTHENTICATE {
            rewrite(&state, value)
        } else {
            value.clone()
        };
        response = response.header(name, value);
    }
    let body = StreamBody::new(
        answer
            .bytes_stream()
            .map_ok(Frame::data)
            .map_err(std::io::Error::other),
    );
    Ok(response
        .body(BodyExt::boxed(body))
        .unwrap_or_else(|e| plain(StatusCode::BAD_GATEWAY, e.to_string())))
}

/// A Location or WWW-Authenticate value pointing at the endpoint's origin
/// (a Location path, a URL on the origin, a `realm="…"` there) made to
/// point back at the forwarder; anything else is left as it is (a signed
/// blob-store URL must not change).
fn rewrite(state: &State, value: &HeaderValue) -> HeaderValue {
    let Ok(text) = value.to_str() else {
        return value.clone();
    };
    rewrite_value(text, &state.origin, &state.local)
        .and_then(|t| HeaderValue::from_str(&t).ok())
        .unwrap_or_else(|| value.clone())
}

/// The text of a Location or WWW-Authenticate header from `origin` as it
/// must reach the client of the forwarder at `local`; `None`: unchanged.
pub fn rewrite_value(text: &str, origin: &str, local: &str) -> Option<String> {
    if text.starts_with('/') {
        Some(format!("{local}{text}"))
    } else if let Some(url) = on_origin(text, origin, local) {
        Some(url)
    } else {
        rewrite_realm(text, origin, local)
    }
}

/// `url` on `origin` (the origin itself, or a path below it) as `local`.
fn on_origin(url: &str, origin: &str, local: &str) -> Option<String> {
    let rest = url.strip_prefix(origin)?;
    (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
        .then(|| format!("{local}{rest}"))
}

/// A Bearer/Basic challenge whose realm is on `origin`, with that realm
/// made `local`.
fn rewrite_realm(challenge: &str, origin: &str, local: &str) -> Option<String> {
    const KEY: &str = "realm=\"";
    let start = challenge.find(KEY)? + KEY.len();
    let len = challenge[start..].find('"')?;
    let realm = on_origin(&challenge[start..start + len], origin, local)?;
    Some(format!(
        "{}{realm}{}",
        &challenge[..start],
        &challenge[start + len..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_endpoints_own_origin_is_rewritten() {
        let (origin, local) = ("https://reg:5000", "http://127.0.0.1:9/s");
        assert_eq!(
            rewrite_realm(
                "Bearer realm=\"https://reg:5000/token\",service=\"reg:5000\"",
                origin,
                local
            )
            .as_deref(),
            Some("Bearer realm=\"http://127.0.0.1:9/s/token\",service=\"reg:5000\"")
        );
        assert_eq!(
            rewrite_realm("Bearer realm=\"https://reg:50000/token\"", origin, local),
            None
        );
        assert_eq!(
            rewrite_realm("Bearer realm=\"https://reg:5000", origin, local),
            None
        );
        assert_eq!(rewrite_realm("Basic", origin, local), None);
        assert_eq!(
            on_origin("https://reg:5000/v2/a/blobs/x?y=1", origin, local).as_deref(),
            Some("http://127.0.0.1:9/s/v2/a/blobs/x?y=1")
        );
        // A blob store elsewhere, even one naming the origin, is untouched.
        assert_eq!(
            on_origin("https://cdn.example/b?u=https://reg:5000", origin, local),
            None
        );
        assert_eq!(on_origin("https://reg:50000/v2/", origin, local), None);
    }
}
