//! The API thread parses requests; the VMM thread acts on them. Requests
//! cross over a channel with an eventfd the VMM's event loop watches, and
//! each answer goes back on its own oneshot, as Firecracker's API and VMM
//! threads do: the VM's state has one owner, and no API call runs
//! concurrently with the VMM's own handling of the guest (a reset, a stop).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::mpsc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::Value;
use tokio::sync::oneshot;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{ApiContext, routes};
use frakti_proto::error_chain;

/// One request for the VMM thread and where its answer goes.
struct ApiRequest {
    method: String,
    path: String,
    body: Vec<u8>,
    reply: oneshot::Sender<(u16, Value)>,
}

/// The API thread's end.
#[derive(Clone)]
pub struct ApiSender {
    requests: mpsc::Sender<ApiRequest>,
    wake: Arc<EventFd>,
}

impl ApiSender {
    /// Hands a request to the VMM thread; `None` once the VMM's loop has
    /// ended (the VM is over).
    pub fn ask(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Option<oneshot::Receiver<(u16, Value)>> {
        let (reply, answer) = oneshot::channel();
        let request = ApiRequest {
            method: method.to_string(),
            path: path.to_string(),
            body,
            reply,
        };
        self.requests.send(request).ok()?;
        if let Err(e) = self.wake.write(1) {
            tracing::warn!("API: cannot wake the VMM thread: {e}");
        }
        Some(answer)
    }
}

/// The VMM thread's end: an event subscriber of its loop.
pub struct ApiInbox {
    requests: mpsc::Receiver<ApiRequest>,
    wake: Arc<EventFd>,
    ctx: ApiContext,
}

/// Both ends, the VMM thread's acting with `ctx`.
pub fn channel(ctx: ApiContext) -> std::io::Result<(ApiSender, ApiInbox)> {
    let (sender, requests) = mpsc::channel();
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    Ok((
        ApiSender {
            requests: sender,
            wake: wake.clone(),
        },
        ApiInbox {
            requests,
            wake,
            ctx,
        },
    ))
}

impl MutEventSubscriber for ApiInbox {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.wake.as_raw_fd(), EventSet::IN)) {
            tracing::error!(
                "the API is unanswered: cannot watch its eventfd: {}",
                error_chain(&e)
            );
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.wake.read();
        while let Ok(request) = self.requests.try_recv() {
            let answer = routes::route(&self.ctx, &request.method, &request.path, &request.body);
            // The client may have gone (timed out): nothing to do then.
            let _ = request.reply.send(answer);
        }
    }
}
