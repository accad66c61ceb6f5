//! The exec/attach/portforward subresources: the test's handler
//! gives the runtime's streaming URL (as kubelet's CRI call does), then the
//! client's request goes there and the bytes are copied both ways.

use anyhow::{Context, anyhow, ensure};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use serde_json::Value;

use super::api::{pod_not_found, status};
use super::http::{Head, write_response};
use super::{Shared, Subresource};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Exec,
    Attach,
    PortForward,
}

/// `/api/v1/namespaces/{ns}/pods/{name}/{exec,attach,portforward}`.
pub(super) fn subresource_route(path: &str) -> Option<(String, String, Kind)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ["api", "v1", "namespaces", ns, "pods", name, sub] = segments.as_slice() else {
        return None;
    };
    let kind = match *sub {
        "exec" => Kind::Exec,
        "attach" => Kind::Attach,
        "portforward" => Kind::PortForward,
        _ => return None,
    };
    Some((ns.to_string(), name.to_string(), kind))
}

/// Validates the request as the API server would, asks the handler for
/// the runtime's URL and proxies the connection there.
pub(super) async fn serve_subresource(
    mut client: TcpStream,
    read_ahead: Vec<u8>,
    head: Head,
    (namespace, name, kind): (String, String, Kind),
    shared: &Shared,
) -> anyhow::Result<()> {
    let request = match subresource_request(&head, &namespace, &name, kind, shared) {
        Ok(request) => request,
        Err((code, body)) => {
            shared.record(&head, code);
            eprintln!(
                "apiserver: {} {} -> {code}: {}",
                head.method, head.target, body["message"]
            );
            return write_response(&mut client, code, &body, false).await;
        }
    };
    eprintln!("apiserver: {} {} -> {request:?}", head.method, head.target);
    let url = match (shared.handler)(request).await {
        Ok(url) => url,
        Err(e) => {
            let (code, body) = status(http_code(&e), &format!("{e:#}"));
            shared.record(&head, code);
            eprintln!("apiserver: the handler failed ({code}): {e:#}");
            return write_response(&mut client, code, &body, false).await;
        }
    };
    let (authority, path) = match split_url(&url) {
        Ok(parts) => parts,
        Err(e) => {
            let (code, body) = status(500, &format!("{e:#}"));
            shared.record(&head, code);
            return write_response(&mut client, code, &body, false).await;
        }
    };
    let mut upstream = match TcpStream::connect(authority.as_str()).await {
        Ok(upstream) => upstream,
        Err(e) => {
            let (code, body) = status(500, &format!("cannot connect to {url}: {e}"));
            shared.record(&head, code);
            eprintln!("apiserver: cannot connect to {url}: {e}");
            return write_response(&mut client, code, &body, false).await;
        }
    };
    shared.record(&head, 101);
    eprintln!("apiserver: proxying to {url}");
    // The client's head with the runtime's path and host, its other
    // headers verbatim; then what the client sent after it.
    let mut forwarded = format!("{} {path} {}\r\n", head.method, head.version);
    for line in &head.lines {
        let is_host = line
            .split_once(':')
            .is_some_and(|(n, _)| n.trim().eq_ignore_ascii_case("host"));
        if !is_host {
            forwarded.push_str(line);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str(&format!("Host: {authority}\r\n\r\n"));
    upstream.write_all(forwarded.as_bytes()).await?;
    upstream.write_all(&read_ahead).await?;
    let (up, down) = tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .with_context(|| format!("proxying to {url}"))?;
    eprintln!("apiserver: {url} done ({up} bytes up, {down} down)");
    Ok(())
}

fn subresource_request(
    head: &Head,
    namespace: &str,
    name: &str,
    kind: Kind,
    shared: &Shared,
) -> Result<Subresource, (u16, Value)> {
    if head.method != "GET" && head.method != "POST" {
        return Err(status(
            405,
            &format!("{} is not allowed on {}", head.method, head.path()),
        ));
    }
    let pod = shared
        .pod(namespace, name)
        .ok_or_else(|| pod_not_found(name))?;
    let query = crate::support::token::query_params(head.query());
    let values = |key: &str| -> Vec<&str> {
        query
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let flag = |key: &str| {
        values(key)
            .last()
            .is_some_and(|v| matches!(*v, "true" | "1" | "True" | "TRUE"))
    };
    if kind == Kind::PortForward {
        let ports = values("port")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|p| {
                p.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| status(400, &format!("invalid port {p:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Subresource::PortForward {
            pod: pod.name,
            ports,
        });
    }
    let container = match values("container").last() {
        Some(c) if !c.is_empty() => {
            if !pod.containers.iter().any(|s| s.name == *c) {
                return Err(status(
                    400,
                    &format!("container {c} is not valid for pod {}", pod.name),
                ));
            }
            c.to_string()
        }
        _ => match pod.containers.as_slice() {
            [only] => only.name.clone(),
            _ => {
                let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
                return Err(status(
                    400,
                    &format!(
                        "a container name must be specified for pod {}, choose one of: [{}]",
                        pod.name,
                        names.join(" ")
                    ),
                ));
            }
        },
    };
    let (stdin, stdout, stderr, tty) = (flag("stdin"), flag("stdout"), flag("stderr"), flag("tty"));
    if !(stdin || stdout || stderr) {
        return Err(status(
            400,
            "you must specify at least 1 of stdin, stdout, stderr",
        ));
    }
    if kind == Kind::Attach {
        return Ok(Subresource::Attach {
            pod: pod.name,
            container,
            stdin,
            stdout,
            stderr,
            tty,
        });
    }
    let command: Vec<String> = values("command").iter().map(|c| c.to_string()).collect();
    if command.is_empty() {
        return Err(status(
            400,
            "you must specify at least one command for the container",
        ));
    }
    Ok(Subresource::Exec {
        pod: pod.name,
        container,
        command,
        stdin,
        stdout,
        stderr,
        tty,
    })
}

/// The HTTP code for a handler's failure: from a `tonic::Status` in the
/// chain, else 500.
fn http_code(e: &anyhow::Error) -> u16 {
    let Some(s) = e.chain().find_map(|c| c.downcast_ref::<tonic::Status>()) else {
        return 500;
    };
    match s.code() {
        tonic::Code::NotFound => 404,
        tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition
        | tonic::Code::OutOfRange => 400,
        tonic::Code::AlreadyExists => 409,
        tonic::Code::Unimplemented => 501,
        tonic::Code::Unavailable => 503,
        tonic::Code::DeadlineExceeded => 504,
        _ => 500,
    }
}

/// `http://host:port/path?query` → (`host:port`, `/path?query`).
fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        anyhow!("the runtime's URL {url:?} is not http:// (https is not proxied)")
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    ensure!(
        !authority.is_empty(),
        "the runtime's URL {url:?} has no host"
    );
    // A port-less authority (`host` or `[v6]`) means port 80.
    let has_port = match authority.rfind(']') {
        Some(bracket) => authority[bracket..].contains(':'),
        None => authority.contains(':'),
    };
    let authority = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}
