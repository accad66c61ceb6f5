//! The streaming server's HTTP side: `/{exec,attach,portforward}/TOKEN`,
//! each upgraded to SPDY/3.1 (kubelet's proxy, kubectl) or to WebSocket.
//! Nothing else is served; a token works once, within a minute.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::request::{RequestCache, StreamRequest};
use super::spdy::session::Session;
use super::{portforward, remotecommand, websocket};
use crate::runtime::Runtime;

/// The largest WebSocket message a client may send.
const MAX_WEBSOCKET_MESSAGE: usize = 4 << 20;

/// What the handlers share.
#[derive(Clone)]
struct Shared {
    runtime: Runtime,
    cache: Arc<RequestCache>,
}

/// Serves streaming connections accepted on `listener` (through TLS when
/// `tls` is set) until the process ends.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    runtime: Runtime,
    cache: Arc<RequestCache>,
) {
    let router = axum::Router::new()
        .route("/{kind}/{token}", axum::routing::any(handle))
        .fallback(|| async { not_found("nothing is served here") })
        .with_state(Shared { runtime, cache });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin.
                tracing::warn!("streaming server: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => serve_connection(stream, router, peer).await,
                    Err(e) => tracing::debug!(%peer, "streaming server: TLS handshake: {e}"),
                },
                None => serve_connection(stream, router, peer).await,
            }
        });
    }
}

async fn serve_connection<IO>(io: IO, router: axum::Router, peer: SocketAddr)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(router);
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = connection.await {
        tracing::debug!(%peer, "streaming connection: {e}");
    }
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(Body::from(format!("{message}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn not_found(message: &str) -> Response<Body> {
    text(StatusCode::NOT_FOUND, message)
}

async fn handle(
    State(shared): State<Shared>,
    Path((kind, token)): Path<(String, String)>,
    request: Request<Body>,
) -> Response<Body> {
    let Some(stream_request) = shared.cache.take(&token) else {
        return not_found("unknown or expired streaming token");
    };
    if stream_request.kind() != kind {
        return not_found("unknown or expired streaming token");
    }
    let headers = request.headers();
    if upgrade_is(headers, "websocket") {
        return websocket_upgrade(shared.runtime, stream_request, request).await;
    }
    if upgrade_is(headers, "spdy/3.1") {
        return spdy_upgrade(shared.runtime, stream_request, request);
    }
    text(
        StatusCode::BAD_REQUEST,
        "a streaming request must upgrade to SPDY/3.1 or WebSocket",
    )
}

fn upgrade_is(headers: &HeaderMap, protocol: &str) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(protocol))
}

/// The client's `X-Stream-Protocol-Version`s, in its order.
fn client_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// The first of our protocols (in our order of preference) the client
/// speaks.
fn negotiate(ours: &[&'static str], theirs: &[String]) -> Option<&'static str> {
    ours.iter().copied().find(|p| theirs.iter().any(|t| t == p))
}

fn spdy_upgrade(
    runtime: Runtime,
    stream_request: StreamRequest,
    mut request: Request<Body>,
) -> Response<Body> {
    let ours: &[&'static str] = match &stream_request {
        StreamRequest::PortForward { .. } => &[portforward::SPDY_PROTOCOL],
        _ => remotecommand::SPDY_PROTOCOLS,
    };
    let theirs = client_protocols(request.headers());
    let Some(protocol) = negotiate(ours, &theirs) else {
        return text(
            StatusCode::FORBIDDEN,
            &format!(
                "unable to upgrade: unable to negotiate protocol: client supports {theirs:?}, \
                 server supports {ours:?}"
            ),
        );
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!("SPDY upgrade failed: {e}");
                return;
            }
        };
        let session = Session::start(TokioIo::new(upgraded));
        match stream_request {
            StreamRequest::Exec(process) | StreamRequest::Attach(process) => {
                remotecommand::serve_spdy(session, protocol, runtime, process).await;
            }
            StreamRequest::PortForward { pod_id, .. } => {
                portforward::serve_spdy(session, runtime, pod_id).await;
            }
        }
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    headers.insert(
        "x-stream-protocol-version",
        HeaderValue::from_static(protocol),
    );
    response
}

async fn websocket_upgrade(
    runtime: Runtime,
    stream_request: StreamRequest,
    request: Request<Body>,
) -> Response<Body> {
    let query_ports = ports_from_query(request.uri().query());
    let (mut parts, _body) = request.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let ours: &[&'static str] = match &stream_request {
        StreamRequest::PortForward { .. } => websocket::PORT_FORWARD_PROTOCOLS,
        _ => websocket::EXEC_PROTOCOLS,
    };
    let theirs: Vec<String> = parts
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .collect();
    // A client naming no subprotocol speaks binary `channel.k8s.io`.
    let negotiated = if theirs.is_empty() {
        Some("")
    } else {
        negotiate(ours, &theirs)
    };
    let Some(protocol) = negotiated else {
        return text(
            StatusCode::BAD_REQUEST,
            &format!(
                "unable to negotiate a WebSocket protocol: client supports {theirs:?}, server \
                 supports {ours:?}"
            ),
        );
    };
    let upgrade = if protocol.is_empty() {
        upgrade
    } else {
        upgrade.protocols([protocol])
    };
    // Clients send chunks of at most a MiB (Python's port-forward).
    upgrade
        .max_message_size(MAX_WEBSOCKET_MESSAGE)
        .on_upgrade(move |socket| async move {
            match stream_request {
                StreamRequest::Exec(process) | StreamRequest::Attach(process) => {
                    websocket::serve_process(socket, protocol, runtime, process).await;
                }
                StreamRequest::PortForward { pod_id, ports } => {
                    // The CRI request's ports, as kubelet; a client
                    // may name them in the query instead.
                    let ports = if ports.is_empty() {
                        query_ports.unwrap_or_default()
                    } else {
                        ports
                    };
                    websocket::serve_port_forward(socket, protocol, runtime, pod_id, ports).await;
                }
            }
        })
        .into_response()
}

/// `port=80,443` (or `ports=80&port=443`) of a WebSocket port-forward;
/// `None` without any. Unparsable ports are left out (and then fail on
/// their own).
fn ports_from_query(query: Option<&str>) -> Option<Vec<u16>> {
    let ports: Vec<u16> = query?
        .split('&')
        .filter_map(|pair| {
            pair.strip_prefix("ports=")
                .or_else(|| pair.strip_prefix("port="))
        })
        .map(|list| list.replace("%2C", ",").replace("%2c", ","))
        .flat_map(|list| {
            list.split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect::<Vec<u16>>()
        })
        .collect();
    (!ports.is_empty()).then_some(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_negotiated_in_our_order() {
        let theirs = vec![
            "channel.k8s.io".to_string(),
            "v4.channel.k8s.io".to_string(),
        ];
        assert_eq!(
            negotiate(remotecommand::SPDY_PROTOCOLS, &theirs),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(
            negotiate(remotecommand::SPDY_PROTOCOLS, &["v9".into()]),
            None
        );
        let mut headers = HeaderMap::new();
        headers.append(
            "x-stream-protocol-version",
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        headers.append(
            "x-stream-protocol-version",
            HeaderValue::from_static("v3.channel.k8s.io, v2.channel.k8s.io"),
        );
        assert_eq!(
            client_protocols(&headers),
            [
                "v4.channel.k8s.io",
                "v3.channel.k8s.io",
                "v2.channel.k8s.io"
            ]
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        assert!(upgrade_is(&headers, "spdy/3.1"));
        assert!(!upgrade_is(&headers, "websocket"));
    }

    #[test]
    fn port_queries() {
        assert_eq!(ports_from_query(Some("ports=80,443")), Some(vec![80, 443]));
        assert_eq!(
            ports_from_query(Some("ports=80%2C443")),
            Some(vec![80, 443])
        );
        assert_eq!(
            ports_from_query(Some("ports=80&ports=81")),
            Some(vec![80, 81])
        );
        assert_eq!(ports_from_query(Some("x=1")), None);
        assert_eq!(ports_from_query(None), None);
    }
}
