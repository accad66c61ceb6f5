//! The control API's HTTP/1.1: hyper's server on a current-thread runtime
//! in the API thread, so no client can crash or stall the VMM:
//!
//! - request heads over [`MAX_HEAD_BYTES`] are refused by hyper (431), as
//!   are malformed ones (400); bodies over [`MAX_BODY_BYTES`] get 413 —
//!   whatever Content-Length claims, even 2^64 - 1;
//! - each connection is served on its own task: a client that sends a
//!   request slowly (or nothing at all) is cut off after
//!   [`HEAD_TIMEOUT`] / [`BODY_TIMEOUT`] and does not hold up anyone else;
//! - at most [`MAX_CONNECTIONS`] connections at once; the next ones get a
//!   503 straight away;
//! - one request per connection (`Connection: close`).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

/// Request line and headers; hyper's smallest allowed read buffer.
pub const MAX_HEAD_BYTES: usize = 8192;
pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const MAX_CONNECTIONS: usize = 16;
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole connection, answer included (a client that never reads it).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);

/// The answer to a request, when it is ready: status and JSON.
pub type Answer = Pin<Box<dyn Future<Output = (u16, Value)>>>;
/// method, path, body → the answer.
pub type Handler = dyn Fn(&str, &str, Vec<u8>) -> Answer;

/// The API thread's runtime: one thread, I/O and timers. Built before the
/// thread's seccomp filter is installed: building it makes what it needs
/// (an epoll, an eventfd, with tokio's signal feature — which the
/// workspace turns on — a socketpair) and the filter allows none of that.
pub fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
}

/// Serves `listener` on `runtime` until the process ends; an error only
/// if the listener cannot join the runtime.
pub fn serve(
    runtime: &tokio::runtime::Runtime,
    listener: std::os::unix::net::UnixListener,
    handler: impl Fn(&str, &str, Vec<u8>) -> Answer + 'static,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let local = tokio::task::LocalSet::new();
    local.block_on(runtime, accept_loop(listener, Rc::new(handler)))
}

async fn accept_loop(
    listener: std::os::unix::net::UnixListener,
    handler: Rc<Handler>,
) -> io::Result<()> {
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let permits = std::sync::Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning.
                tracing::warn!("API accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let handler = handler.clone();
                tokio::task::spawn_local(async move {
                    serve_connection(stream, handler).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::task::spawn_local(refuse_busy(stream));
            }
        }
    }
}

/// 503 to a connection over the limit, without reading its request.
async fn refuse_busy(mut stream: tokio::net::UnixStream) {
    let body = json!({
        "error": format!("too many API connections (at most {MAX_CONNECTIONS}); retry")
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = stream.write_all(response.as_bytes());
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// One connection, from any byte stream (the fuzz target feeds memory).
pub async fn serve_connection<I>(io: I, handler: Rc<Handler>)
where
    I: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(answer(request, &*handler).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(false)
        // A client may shut down its write side once the request is sent
        // (`nc -N`, the fuzz target): it still gets its answer.
        .half_close(true)
        .serve_connection(TokioIo::new(io), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("API connection: {e}"),
        Err(_) => tracing::debug!("API connection cut off after {CONNECTION_TIMEOUT:?}"),
    }
}

fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(status: u16, message: String) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": message }))
}

/// Reads the body (bounded in size and time) and asks the handler.
async fn answer(request: Request<Incoming>, handler: &Handler) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let declared = body.size_hint().lower();
    if declared > MAX_BODY_BYTES as u64 {
        return error_response(
            413,
            format!("request body of {declared} bytes is over the limit of {MAX_BODY_BYTES}"),
        );
    }
    let collected =
        tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY_BYTES).collect());
    let bytes = match collected.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return error_response(
                413,
                format!("request body over the limit of {MAX_BODY_BYTES} bytes"),
            );
        }
        Ok(Err(e)) => return error_response(400, format!("cannot read the request body: {e}")),
        Err(_) => {
            return error_response(
                408,
                format!("request body not received within {BODY_TIMEOUT:?}"),
            );
        }
    };
    let (status, value) = handler(parts.method.as_str(), parts.uri.path(), bytes.to_vec()).await;
    json_response(status, &value)
}
