//! The runtime side of exec and attach: the client's streams (whatever the
//! protocol) pumped to and from a process in the pod VM.
//!
//! Back-pressure runs end to end: output is read from the agent only as
//! fast as the client takes it (each chunk waits for room in a bounded
//! channel), and stdin is written to the agent before the next chunk is
//! taken from the client.

use std::time::Duration;

use bytes::Bytes;
use frakti_proto::agent::v1 as pb;
use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use super::io::{Outcome, ProcessIo, TermSize, next_batch};
use super::request::ProcessRequest;
use crate::runtime::logs::StreamKind;
use crate::runtime::{Runtime, agent_call, state::ContainerPhase};
use crate::sandbox::agent::AgentClient;

/// After the process's exit, how long its output may take to drain (a
/// background child may hold the pipe open forever).
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// How long a TTY exec waits for the client's terminal size.
const FIRST_SIZE_WAIT: Duration = Duration::from_secs(1);

/// Runs an exec or an attach to its end.
pub async fn run(runtime: &Runtime, request: &ProcessRequest, io: ProcessIo) -> Outcome {
    let result = if request.is_attach() {
        attach(runtime, request, io).await
    } else {
        exec(runtime, request, io).await
    };
    result.unwrap_or_else(|e| Outcome::Failed(crate::error_chain(&e)))
}

/// The process an exec or attach talks to, as the agent names it.
#[derive(Clone)]
struct Target {
    agent: AgentClient,
    container_id: String,
    exec_id: String,
}

async fn exec(
    runtime: &Runtime,
    request: &ProcessRequest,
    mut io: ProcessIo,
) -> crate::runtime::Result<Outcome> {
    let console = first_size(request, &mut io).await;
    let started = runtime
        .start_exec(&request.container_id, &request.cmd, request.tty, console)
        .await;
    let (agent, exec_id) = match started {
        Ok(started) => started,
        Err(crate::runtime::Error::Agent { status, .. })
            if status.code() == tonic::Code::InvalidArgument =>
        {
            return Ok(cannot_start(&io, status.message()).await);
        }
        Err(e) => return Err(e),
    };
    let target = Target {
        agent,
        container_id: request.container_id.clone(),
        exec_id,
    };
    tracing::debug!(container = %target.container_id, exec = %target.exec_id, cmd = ?request.cmd, "streaming exec started");
    let mut outputs = vec![spawn_output(&target, pb::OutputStream::Stdout, io.stdout)];
    if !request.tty {
        outputs.push(spawn_output(&target, pb::OutputStream::Stderr, io.stderr));
    }
    let stdin = match io.stdin {
        Some(stdin) => Some(tokio::spawn(pump_stdin(target.clone(), stdin, true))),
        None => {
            if !request.tty {
                close_stdin(&target).await;
            }
            None
        }
    };
    let resize = io
        .resize
        .map(|r| tokio::spawn(pump_resize(target.clone(), r)));
    let wait = pb::WaitProcessRequest {
        container_id: target.container_id.clone(),
        exec_id: target.exec_id.clone(),
    };
    let mut waiter = target.agent.clone();
    let status = tokio::select! {
        status = waiter.wait_process(wait.clone()) => status,
        // Every output stream the client had is gone and so is its stdin:
        // the client left; the process goes too, as under containerd.
        () = client_gone(&outputs, stdin.as_ref()), if !outputs.is_empty() => {
            tracing::info!(container = %target.container_id, exec = %target.exec_id, "the exec's client went away: killing it");
            let mut agent = target.agent.clone();
            runtime
                .kill_exec(&mut agent, &target.container_id, &target.exec_id, wait)
                .await;
            abort_all(stdin, resize, outputs);
            return Ok(Outcome::Failed("the client went away".into()));
        }
    };
    let status = status.map_err(|status| crate::runtime::Error::Agent {
        call: "WaitProcess",
        status,
    })?;
    let code = status.into_inner().status.unwrap_or_default().exit_code;
    for output in outputs {
        drain(output.task).await;
    }
    abort_all(stdin, resize, Vec::new());
    Ok(Outcome::Exited(code))
}

/// The terminal's size before the process starts: clients send it first
/// thing on the resize stream, and a process that asks at once (`stty
/// size`, a shell's first prompt) must not see 0×0.
async fn first_size(request: &ProcessRequest, io: &mut ProcessIo) -> Option<(u32, u32)> {
    let resize = io.resize.as_mut().filter(|_| request.tty)?;
    match tokio::time::timeout(FIRST_SIZE_WAIT, resize.recv()).await {
        Ok(Some(size)) => Some((u32::from(size.height), u32::from(size.width))),
        _ => None,
    }
}

/// A command that cannot start (not found, not executable) fails as a
/// shell reports it: the message on stderr, exit code 127 or 126.
async fn cannot_start(io: &ProcessIo, message: &str) -> Outcome {
    let code = if message.contains("not found") {
        127
    } else {
        126
    };
    if let Some(sink) = io.stderr.as_ref().or(io.stdout.as_ref()) {
        let _ = sink.send(Bytes::from(format!("{message}\n"))).await;
    }
    Outcome::Exited(code)
}

async fn attach(
    runtime: &Runtime,
    request: &ProcessRequest,
    io: ProcessIo,
) -> crate::runtime::Result<Outcome> {
    let container = runtime.container(&request.container_id)?;
    // A created container is attached to before it starts (`frakti run`).
    if container.phase() == ContainerPhase::Exited {
        return Ok(Outcome::Failed(format!(
            "container {} has exited",
            container.id
        )));
    }
    let target = Target {
        agent: runtime.pod(&container.pod_id)?.agent()?,
        container_id: container.id.clone(),
        exec_id: String::new(),
    };
    let mut exited = container.exited.subscribe();
    let output = container.output.subscribe();
    let mut forward = tokio::spawn(forward_attached(output, io.stdout, io.stderr));
    let stdin = io.stdin.map(|stdin| {
        let close_at_eof = container.config.stdin_once;
        tokio::spawn(pump_stdin(target.clone(), stdin, close_at_eof))
    });
    let resize = io
        .resize
        .map(|r| tokio::spawn(pump_resize(target.clone(), r)));
    let detached = tokio::select! {
        _ = exited.wait_for(|exited| *exited) => false,
        // The client stopped taking output: it detached.
        _ = &mut forward => true,
    };
    if detached {
        abort_all(stdin, resize, Vec::new());
        return Ok(Outcome::Exited(0));
    }
    // The last output follows the exit by a moment.
    drain(forward).await;
    abort_all(stdin, resize, Vec::new());
    Ok(Outcome::Exited(container.record().exit_code))
}

/// Copies the container's output, as its log pumps read it, to the attach
/// client; ends when the client stops taking it.
async fn forward_attached(
    mut output: broadcast::Receiver<(StreamKind, Bytes)>,
    stdout: Option<mpsc::Sender<Bytes>>,
    stderr: Option<mpsc::Sender<Bytes>>,
) {
    let sinks: Vec<mpsc::Sender<Bytes>> = stdout.iter().chain(stderr.iter()).cloned().collect();
    if sinks.is_empty() {
        return std::future::pending().await;
    }
    let all_closed = async {
        for sink in &sinks {
            sink.closed().await;
        }
    };
    tokio::pin!(all_closed);
    loop {
        let received = tokio::select! {
            received = output.recv() => received,
            () = &mut all_closed => return,
        };
        let (kind, data) = match received {
            Ok(chunk) => chunk,
            Err(broadcast::error::RecvError::Lagged(lost)) => {
                tracing::debug!(lost, "a slow attach client lost output chunks");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let sink = match kind {
            StreamKind::Stdout => &stdout,
            StreamKind::Stderr => &stderr,
        };
        if let Some(sink) = sink {
            if sink.send(data).await.is_err() {
                return;
            }
        }
    }
}

struct Output {
    task: JoinHandle<()>,
    /// Set when the client's side of the stream is gone.
    closed: Option<mpsc::Sender<Bytes>>,
}

/// Reads one output stream of the exec into the client's stream; without
/// a client stream the output is read and dropped (a full pipe would
/// block the process).
fn spawn_output(
    target: &Target,
    stream: pb::OutputStream,
    sink: Option<mpsc::Sender<Bytes>>,
) -> Output {
    let mut agent = target.agent.clone();
    let request = pb::ReadOutputRequest {
        container_id: target.container_id.clone(),
        exec_id: target.exec_id.clone(),
        stream: stream as i32,
        ..Default::default()
    };
    let closed = sink.clone();
    let task = tokio::spawn(async move {
        let mut chunks = match agent.read_output(tokio_stream::once(request)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::debug!("ReadOutput: {}", status.message());
                return;
            }
        };
        let mut sink = sink;
        while let Some(Ok(chunk)) = chunks.next().await {
            if let Some(tx) = &sink {
                if tx.send(Bytes::from(chunk.data)).await.is_err() {
                    // The client closed this stream: keep draining.
                    sink = None;
                }
            }
        }
    });
    Output { task, closed }
}

/// Resolves once the client can no longer take any output and sends no
/// more input.
async fn client_gone(outputs: &[Output], stdin: Option<&JoinHandle<()>>) {
    let senders: Vec<&mpsc::Sender<Bytes>> =
        outputs.iter().filter_map(|o| o.closed.as_ref()).collect();
    if senders.is_empty() {
        return std::future::pending().await;
    }
    for sender in senders {
        sender.closed().await;
    }
    if let Some(stdin) = stdin {
        while !stdin.is_finished() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn drain(task: JoinHandle<()>) {
    let abort = task.abort_handle();
    if tokio::time::timeout(DRAIN_WAIT, task).await.is_err() {
        abort.abort();
    }
}

fn abort_all(stdin: Option<JoinHandle<()>>, resize: Option<JoinHandle<()>>, outputs: Vec<Output>) {
    for task in stdin.into_iter().chain(resize) {
        task.abort();
    }
    for output in outputs {
        output.task.abort();
    }
}

/// Writes what the client types; at its end of input, closes the
/// process's stdin when `close_at_eof` (an attach without stdinOnce leaves
/// it open for the next client).
async fn pump_stdin(target: Target, mut stdin: mpsc::Receiver<Bytes>, close_at_eof: bool) {
    let mut agent = target.agent.clone();
    while let Some(data) = next_batch(&mut stdin).await {
        if data.is_empty() {
            continue;
        }
        let request = pb::WriteStdinRequest {
            container_id: target.container_id.clone(),
            exec_id: target.exec_id.clone(),
            data,
        };
        if let Err(e) = agent_call("WriteStdin", agent.write_stdin(request)).await {
            tracing::debug!(container = %target.container_id, exec = %target.exec_id, "{}", crate::error_chain(&e));
            return;
        }
    }
    if close_at_eof {
        close_stdin(&target).await;
    }
}

async fn close_stdin(target: &Target) {
    let mut agent = target.agent.clone();
    let request = pb::CloseStdinRequest {
        container_id: target.container_id.clone(),
        exec_id: target.exec_id.clone(),
    };
    if let Err(e) = agent_call("CloseStdin", agent.close_stdin(request)).await {
        tracing::debug!(container = %target.container_id, exec = %target.exec_id, "{}", crate::error_chain(&e));
    }
}

async fn pump_resize(target: Target, mut sizes: mpsc::Receiver<TermSize>) {
    let mut agent = target.agent.clone();
    while let Some(size) = sizes.recv().await {
        let request = pb::ResizeTtyRequest {
            container_id: target.container_id.clone(),
            exec_id: target.exec_id.clone(),
            rows: u32::from(size.height),
            cols: u32::from(size.width),
        };
        if let Err(e) = agent_call("ResizeTty", agent.resize_tty(request)).await {
            tracing::debug!(container = %target.container_id, exec = %target.exec_id, "{}", crate::error_chain(&e));
        }
    }
}
