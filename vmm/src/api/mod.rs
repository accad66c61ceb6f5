//! The control API: HTTP/1.1 + JSON on a unix socket, one request per
//! connection. Its own thread parses requests (hyper on a current-thread
//! runtime, [`http`]) and hands them to the VMM thread, which acts and
//! answers ([`inbox`]), in the style of Firecracker's API.
//!
//! | method | path          | does |
//! |--------|---------------|------|
//! | GET    | `/vm`         | state, size, uptime, boot-done time |
//! | PUT    | `/vm/pause`   | pauses every vCPU |
//! | PUT    | `/vm/resume`  | resumes them |
//! | PUT    | `/vm/shutdown`| stops the VM; the VMM exits 0 |
//! | GET    | `/metrics`    | boot-done time, exits per kind, RSS, console bytes dropped |
//! | GET    | `/devices`    | virtio devices: disks and slots (backing, capacity), vsock (CID, socket, counters), net (tap, MAC, counters) |
//! | PUT    | `/disks/{serial}` | `{"path": FILE}`: sets or replaces a disk's backing file |
//! | DELETE | `/disks/{serial}` | empties the slot |

pub mod http;
pub mod inbox;
mod routes;

pub use inbox::{ApiInbox, ApiSender, channel};

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::devices::manager::DiskHandle;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::metrics::ExitCounters;
use crate::seccomp::{self, ThreadKind};
use crate::vcpu::VcpuRemote;
use crate::vm::{StopRequest, Vm};
use frakti_proto::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind the API socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    #[error("cannot start the API thread")]
    Spawn(#[source] std::io::Error),
}

/// What the API thread may see and do.
pub struct ApiContext {
    pub vcpus: VcpuRemote,
    pub vcpu_count: u8,
    pub memory_mib: u32,
    pub start: Instant,
    pub boot_done: Arc<OnceLock<Duration>>,
    pub counters: Arc<ExitCounters>,
    pub guest_ranges: Vec<(u64, u64)>,
    pub stop: Arc<StopRequest>,
    pub disks: Vec<DiskHandle>,
    pub vsock: Option<Arc<Mutex<Vsock>>>,
    pub net: Option<Arc<Mutex<Net>>>,
    pub console_dropped: Arc<AtomicU64>,
}

impl ApiContext {
    /// The API's view of `vm`, started at `start`.
    pub fn of(vm: &Vm, start: Instant) -> ApiContext {
        ApiContext {
            vcpus: vm.vcpus.remote(),
            vcpu_count: vm.config.vcpus,
            memory_mib: vm.config.memory_mib,
            start,
            boot_done: vm.boot_done.clone(),
            counters: vm.counters.clone(),
            guest_ranges: crate::memory::host_ranges(&vm.memory),
            stop: vm.stop_request.clone(),
            disks: vm.disks.clone(),
            vsock: vm.vsock.clone(),
            net: vm.net.clone(),
            console_dropped: vm.console_dropped.clone(),
        }
    }
}

/// Binds the socket (replacing a stale one left by a dead VMM).
pub fn bind(path: &PathBuf) -> Result<UnixListener, Error> {
    if UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|e| Error::Bind(path.clone(), e))
}

/// How long a client waits for the VMM thread's answer (a pause waits up
/// to 5 s for the vCPUs).
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Starts the API thread, which hands each request to the VMM thread
/// through `sender`. It installs its seccomp filter and waits at `start`
/// before serving.
pub fn spawn(
    listener: UnixListener,
    sender: ApiSender,
    with_seccomp: bool,
    start: Arc<Barrier>,
) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // The runtime first: the filter forbids what building it does.
            let runtime = http::runtime();
            let filtered = if with_seccomp {
                seccomp::apply(ThreadKind::Api)
            } else {
                Ok(())
            };
            start.wait();
            if let Err(e) = filtered {
                tracing::error!("the API is disabled: {}", error_chain(&e));
                return;
            }
            let runtime = match runtime {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!("the API is disabled: no runtime: {}", error_chain(&e));
                    return;
                }
            };
            let served = http::serve(&runtime, listener, move |method, path, body| {
                let answer = sender.ask(method, path, body);
                Box::pin(async move {
                    let Some(answer) = answer else {
                        return stopping();
                    };
                    match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
                        Ok(Ok(answer)) => answer,
                        Ok(Err(_)) => stopping(),
                        Err(_) => (
                            504,
                            serde_json::json!({
                                "error": format!("the VMM did not answer within {ANSWER_TIMEOUT:?}")
                            }),
                        ),
                    }
                })
            });
            if let Err(e) = served {
                tracing::error!("the API stopped: {}", error_chain(&e));
            }
        })
        .map(drop)
        .map_err(Error::Spawn)
}

fn stopping() -> (u16, serde_json::Value) {
    (
        503,
        serde_json::json!({ "error": "the VM has stopped; the VMM is exiting" }),
    )
}
