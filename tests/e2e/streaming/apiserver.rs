//! A fake Kubernetes API server for `kubectl exec`, `attach` and
//! `port-forward`: just enough of the API (discovery, pods) for kubectl
//! 1.20, and the exec/attach/portforward subresources, which it turns into
//! a call of the test's [`Handler`] (the test calls frakti's CRI
//! Exec/Attach/PortForward there) and then proxies, as kubelet does: the
//! client's request head goes to the runtime's streaming URL, then bytes
//! are copied both ways, untouched, so the client's SPDY (or WebSocket)
//! upgrade is answered by frakti's streaming server itself.
//!
//! Plain HTTP/1.1 on 127.0.0.1, read by hand over TCP (the proxying must
//! be byte-exact). kubectl finds it through [`ApiServer::kubeconfig`].

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow, bail, ensure};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// The kubectl the streaming tests run (set by the e2e main, in the lab:
/// `/lab/bin/kubectl`).
pub const KUBECTL_ENV: &str = "FRAKTI_KUBECTL";
/// Where `scripts/deps.sh` unpacks Debian's kubernetes-client (1.20).
pub const KUBECTL_DEFAULT: &str = "/usr/local/lib/frakti-test/kubectl-1.20/usr/bin/kubectl";
/// The image pods report when a test names none.
pub const DEFAULT_IMAGE: &str = "frakti.test/busybox:latest";

/// Longest request head we read.
const MAX_HEAD: usize = 64 << 10;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
/// Turns a subresource request into the runtime's streaming URL. A failure
/// becomes a Status for the client: a `tonic::Status` in the error's chain
/// picks the HTTP code (NotFound 404, InvalidArgument 400, ...), anything
/// else is a 500; the message is the whole chain.
pub type Handler = Arc<dyn Fn(Subresource) -> BoxFuture<anyhow::Result<String>> + Send + Sync>;

/// A [`Handler`] from an async closure-like function.
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Subresource) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<String>> + Send + 'static,
{
    Arc::new(move |sub| Box::pin(f(sub)))
}

/// What the client asked for, with the container resolved and validated
/// against the registered pod as the API server does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subresource {
    Exec {
        pod: String,
        container: String,
        command: Vec<String>,
        stdin: bool,
        stdout: bool,
        stderr: bool,
        tty: bool,
    },
    Attach {
        pod: String,
        container: String,
        stdin: bool,
        stdout: bool,
        stderr: bool,
        tty: bool,
    },
    /// `ports` are those of the query (`port=`), which WebSocket clients
    /// send; SPDY clients (kubectl) name them in stream headers instead,
    /// so the list is often empty, as in kubelet's CRI PortForward call.
    PortForward { pod: String, ports: Vec<u16> },
}

/// A container as the pod's spec shows it. kubectl attach follows the
/// spec's `tty` (it forces a TTY on, or drops `-t` with a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub stdin: bool,
    pub tty: bool,
}

impl ContainerSpec {
    pub fn new(name: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            image: DEFAULT_IMAGE.into(),
            stdin: false,
            tty: false,
        }
    }
}

/// A running pod the API server knows (in namespace `default` unless set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub containers: Vec<ContainerSpec>,
}

impl PodSpec {
    pub fn with(name: &str, containers: impl IntoIterator<Item = ContainerSpec>) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: "default".into(),
            containers: containers.into_iter().collect(),
        }
    }
}

type Pods = Arc<Mutex<HashMap<(String, String), PodSpec>>>;

struct Shared {
    pods: Pods,
    handler: Handler,
    addr: SocketAddr,
    /// `METHOD target -> code` of every request, for failure messages.
    log: Mutex<Vec<String>>,
}

/// The fake API server; dropping it stops it and every connection.
pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl ApiServer {
    /// Listens on 127.0.0.1 (an ephemeral port) with `pods` registered.
    /// Must be called inside a tokio runtime.
    pub async fn start(
        pods: impl IntoIterator<Item = PodSpec>,
        handler: Handler,
    ) -> anyhow::Result<ApiServer> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("the fake API server cannot listen on 127.0.0.1")?;
        let addr = listener.local_addr()?;
        // The probe's connection waits in the backlog; the accept loop
        // sees it closed.
        loopback_up(addr).await?;
        let shared = Arc::new(Shared {
            pods: Arc::default(),
            handler,
            addr,
            log: Mutex::default(),
        });
        let server = ApiServer {
            addr,
            shared: shared.clone(),
            task: tokio::spawn(accept_loop(listener, shared)),
        };
        for pod in pods {
            server.add_pod(pod);
        }
        eprintln!("apiserver: listening on http://{addr}");
        Ok(server)
    }

    /// Registers (or replaces) a pod.
    pub fn add_pod(&self, pod: PodSpec) {
        self.shared
            .pods
            .lock()
            .unwrap()
            .insert((pod.namespace.clone(), pod.name.clone()), pod);
    }

    /// `METHOD target -> code` of the requests so far, oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The server's URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `dir/kubeconfig`: this server as the cluster, a user without
    /// credentials, namespace `default`, and that context current.
    pub fn kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "frakti-test", "cluster": {"server": self.url()}}],
            "users": [{"name": "frakti-test", "user": {}}],
            "contexts": [{
                "name": "frakti-test",
                "context": {"cluster": "frakti-test", "user": "frakti-test", "namespace": "default"},
            }],
            "current-context": "frakti-test",
            "preferences": {},
        });
        let path = dir.join("kubeconfig");
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // The connections are in the task's JoinSet: they go with it.
        self.task.abort();
    }
}

/// Makes 127.0.0.1 reachable: the lab's L1 starts with `lo` down, where
/// 127.0.0.1 binds but connecting gives "Network is unreachable".
/// Probes with `addr` (a listener on 127.0.0.1) and brings `lo` up if so.
pub async fn loopback_up(addr: SocketAddr) -> anyhow::Result<()> {
    match TcpStream::connect(addr).await {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NetworkUnreachable => {}
        Err(e) => return Err(e).with_context(|| format!("connect to {addr}")),
    }
    eprintln!("apiserver: 127.0.0.1 is unreachable: bringing lo up");
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("run ip link set lo up")?;
    ensure!(status.success(), "ip link set lo up: {status}");
    TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr} with lo up"))?;
    Ok(())
}

/// The kubectl to run: [`KUBECTL_ENV`] if set, else [`KUBECTL_DEFAULT`].
pub fn kubectl() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os(KUBECTL_ENV) {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(KUBECTL_DEFAULT),
    };
    ensure!(
        path.is_file(),
        "kubectl {} is missing: run scripts/deps.sh as root (it unpacks Debian's \
         kubernetes-client 1.20 to {KUBECTL_DEFAULT}), or set {KUBECTL_ENV}",
        path.display()
    );
    Ok(path)
}

/// kubectl with `--kubeconfig`, its discovery cache and HOME below `cache`
/// (a directory the test owns), a request timeout, and none of the
/// caller's KUBECONFIG or proxy settings. Add the subcommand's arguments.
pub fn kubectl_command(kubeconfig: &Path, cache: &Path) -> anyhow::Result<Command> {
    let home = cache.join("home");
    let discovery = cache.join("discovery");
    for dir in [&home, &discovery] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let mut command = Command::new(kubectl()?);
    command
        .env("HOME", &home)
        .env_remove("KUBECONFIG")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(&discovery)
        .arg("--request-timeout=60s");
    Ok(command)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("apiserver: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        connections.spawn(async move {
            if let Err(e) = serve_connection(stream, &shared).await {
                eprintln!("apiserver: connection from {peer}: {e:#}");
            }
        });
    }
}

/// One request head, as read.
struct Head {
    method: String,
    target: String,
    version: String,
    /// The header lines, verbatim (without their CRLF).
    lines: Vec<String>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.lines.iter().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    fn keep_alive(&self) -> bool {
        let close = self
            .header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        self.version == "HTTP/1.1" && !close
    }
}

/// Reads a request head; `buf` holds what was read before and keeps the
/// bytes past the head. `None` at a clean end of the connection.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<Option<Head>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let raw: Vec<u8> = buf.drain(..end + 4).collect();
            let text = std::str::from_utf8(&raw[..end]).context("request head is not UTF-8")?;
            let mut lines = text.split("\r\n");
            let request_line = lines.next().unwrap_or_default();
            let mut parts = request_line.split(' ');
            let (Some(method), Some(target), Some(version), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                bail!("bad request line {request_line:?}");
            };
            return Ok(Some(Head {
                method: method.into(),
                target: target.into(),
                version: version.into(),
                lines: lines.map(String::from).collect(),
            }));
        }
        ensure!(buf.len() <= MAX_HEAD, "request head over {MAX_HEAD} bytes");
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            ensure!(buf.is_empty(), "connection closed inside a request head");
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve_connection(mut stream: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut stream, &mut buf).await? {
        ensure!(
            head.header("transfer-encoding").is_none(),
            "chunked request bodies are not supported ({} {})",
            head.method,
            head.target
        );
        if let Some(sub) = subresource_route(head.path()) {
            // The client's connection becomes the stream's (or the error's).
            return serve_subresource(stream, buf, head, sub, shared).await;
        }
        // Bodies (none expected from kubectl here) are skipped.
        let length: usize = head
            .header("content-length")
            .map(str::parse)
            .transpose()
            .context("bad Content-Length")?
            .unwrap_or(0);
        while buf.len() < length {
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await?;
            ensure!(n > 0, "connection closed inside a request body");
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.drain(..length);
        let (code, body) = route(&head, shared);
        shared.record(&head, code);
        if code == 404 {
            eprintln!("apiserver: {} {} -> 404", head.method, head.target);
        }
        let keep_alive = head.keep_alive();
        write_response(&mut stream, code, &body, keep_alive).await?;
        if !keep_alive {
            return Ok(());
        }
    }
    Ok(())
}

impl Shared {
    fn record(&self, head: &Head, code: u16) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} {} -> {code}", head.method, head.target));
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<PodSpec> {
        self.pods
            .lock()
            .unwrap()
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }
}

/// The answer to a plain (non-streaming) request.
fn route(head: &Head, shared: &Shared) -> (u16, Value) {
    if head.method != "GET" {
        return status(
            405,
            &format!(
                "the fake API server does not serve {} {}",
                head.method,
                head.path()
            ),
        );
    }
    let segments: Vec<&str> = head.path().trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api"] => (
            200,
            json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}
                ],
            }),
        ),
        ["apis"] => (
            200,
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        ),
        ["api", "v1"] => (200, core_v1_resources()),
        ["version"] => (
            200,
            json!({
                "major": "1", "minor": "20", "gitVersion": "v1.20.2",
                "gitCommit": "frakti-fake-apiserver", "gitTreeState": "clean",
                "buildDate": "2021-01-01T00:00:00Z", "goVersion": "go1.15",
                "compiler": "gc", "platform": "linux/amd64",
            }),
        ),
        ["api", "v1", "namespaces", ns, "pods"] => {
            let mut pods: Vec<PodSpec> = shared
                .pods
                .lock()
                .unwrap()
                .values()
                .filter(|p| p.namespace == *ns)
                .cloned()
                .collect();
            pods.sort_by(|a, b| a.name.cmp(&b.name));
            (
                200,
                json!({
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": "1"},
                    "items": pods.iter().map(pod_json).collect::<Vec<_>>(),
                }),
            )
        }
        ["api", "v1", "namespaces", ns, "pods", name] => match shared.pod(ns, name) {
            Some(pod) => (200, pod_json(&pod)),
            None => pod_not_found(name),
        },
        _ => status(
            404,
            &format!(
                "the server could not find the requested resource ({})",
                head.path()
            ),
        ),
    }
}

fn core_v1_resources() -> Value {
    let verbs = json!([
        "create", "delete", "get", "list", "patch", "update", "watch"
    ]);
    let sub = |name: &str, kind: &str| {
        json!({
            "name": name, "singularName": "", "namespaced": true,
            "kind": kind, "verbs": ["create", "get"],
        })
    };
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {
                "name": "pods", "singularName": "", "namespaced": true, "kind": "Pod",
                "verbs": verbs, "shortNames": ["po"], "categories": ["all"],
            },
            sub("pods/attach", "PodAttachOptions"),
            sub("pods/exec", "PodExecOptions"),
            sub("pods/portforward", "PodPortForwardOptions"),
            {
                "name": "namespaces", "singularName": "", "namespaced": false,
                "kind": "Namespace", "verbs": verbs, "shortNames": ["ns"],
            },
        ],
    })
}

const CREATED: &str = "2024-01-01T00:00:00Z";

fn pod_json(pod: &PodSpec) -> Value {
    let containers: Vec<Value> = pod
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "image": c.image, "stdin": c.stdin, "tty": c.tty,
                "imagePullPolicy": "IfNotPresent",
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
            })
        })
        .collect();
    let statuses: Vec<Value> = pod
        .containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "image": c.image, "imageID": "",
                "containerID": format!("frakti://{}", c.name),
                "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": CREATED}},
            })
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": format!("uid-{}", pod.name),
            "resourceVersion": "1",
            "creationTimestamp": CREATED,
        },
        "spec": {
            "containers": containers,
            "restartPolicy": "Always",
            "nodeName": "frakti-test",
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": CREATED},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": CREATED},
            ],
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": CREATED,
            "containerStatuses": statuses,
        },
    })
}

/// A metav1 Status.
fn status(code: u16, message: &str) -> (u16, Value) {
    let reason = match code {
        400 => "BadRequest",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "AlreadyExists",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    };
    (
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code,
        }),
    )
}

fn pod_not_found(name: &str) -> (u16, Value) {
    let (code, mut body) = status(404, &format!("pods \"{name}\" not found"));
    body["details"] = json!({"name": name, "kind": "pods"});
    (code, body)
}

async fn write_response(
    stream: &mut TcpStream,
    code: u16,
    body: &Value,
    keep_alive: bool,
) -> anyhow::Result<()> {
    let body = serde_json::to_vec(body)?;
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Internal Server Error",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Exec,
    Attach,
    PortForward,
}

/// `/api/v1/namespaces/{ns}/pods/{name}/{exec,attach,portforward}`.
fn subresource_route(path: &str) -> Option<(String, String, Kind)> {
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
async fn serve_subresource(
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
