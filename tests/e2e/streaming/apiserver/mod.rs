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

//!
//! Its parts: [`api`] answers the API (discovery, pods, Status bodies),
//! [`proxy`] hands the exec/attach/portforward subresources to the
//! runtime's streaming server, [`http`] reads request heads and writes
//! responses, [`client`] is the kubectl that talks to it.

mod api;
mod client;
mod http;
mod proxy;

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::{Context, ensure};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

pub use client::{KUBECTL_ENV, kubectl, kubectl_command};
use http::{Head, read_head, write_response};

/// The image pods report when a test names none.
pub const DEFAULT_IMAGE: &str = "frakti.test/busybox:latest";

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

async fn serve_connection(mut stream: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut stream, &mut buf).await? {
        ensure!(
            head.header("transfer-encoding").is_none(),
            "chunked request bodies are not supported ({} {})",
            head.method,
            head.target
        );
        if let Some(sub) = proxy::subresource_route(head.path()) {
            // The client's connection becomes the stream's (or the error's).
            return proxy::serve_subresource(stream, buf, head, sub, shared).await;
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
        let (code, body) = api::route(&head, shared);
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
