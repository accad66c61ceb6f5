//! ExecSync: a command in a running container, its output collected (up
//! to [`MAX_EXEC_OUTPUT`] per stream) and its exit code returned. With a
//! timeout, a command still running when it expires is killed, and the RPC
//! says it timed out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use frakti_proto::agent::v1 as pb;
use futures_util::StreamExt;

use super::state::{self, ContainerPhase};
use super::{Error, Result, Runtime, agent_call, lock, spec};
use crate::sandbox::agent::AgentClient;

/// What ExecSync keeps of each stream (kubelet's probes read little; a
/// runaway command must not exhaust the daemon).
pub const MAX_EXEC_OUTPUT: usize = 16 * 1024 * 1024;
/// After the kill of a timed-out command, how long its exit may take.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// After the command's exit, how long its output may take to drain.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

/// Collects one output stream into `output` until the stream ends.
async fn read_stream(
    mut agent: AgentClient,
    container_id: String,
    exec_id: String,
    stream: pb::OutputStream,
    output: Arc<Mutex<Vec<u8>>>,
) {
    let request = pb::ReadOutputRequest {
        container_id,
        exec_id,
        stream: stream as i32,
        ..Default::default()
    };
    let Ok(response) = agent.read_output(tokio_stream::once(request)).await else {
        return;
    };
    let mut chunks = response.into_inner();
    while let Some(Ok(chunk)) = chunks.next().await {
        let mut output = lock(&output);
        let room = MAX_EXEC_OUTPUT.saturating_sub(output.len());
        output.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
    }
}

/// A stream being read in the background.
struct Collector {
    task: tokio::task::JoinHandle<()>,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Collector {
    fn spawn(
        agent: &AgentClient,
        container_id: &str,
        exec_id: &str,
        stream: pb::OutputStream,
    ) -> Collector {
        let output = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(read_stream(
            agent.clone(),
            container_id.to_string(),
            exec_id.to_string(),
            stream,
            output.clone(),
        ));
        Collector { task, output }
    }

    /// What was read, once the stream ended or [`DRAIN_WAIT`] passed: a
    /// background child of the command may hold the pipe open forever.
    async fn finish(mut self) -> Vec<u8> {
        if tokio::time::timeout(DRAIN_WAIT, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        std::mem::take(&mut *lock(&self.output))
    }
}

impl Runtime {
    /// Starts `cmd` in the running container `id` (with a terminal when
    /// `tty`, of `console` rows and columns when known); returns the agent
    /// and the exec id to follow it with.
    pub async fn start_exec(
        &self,
        id: &str,
        cmd: &[String],
        tty: bool,
        console: Option<(u32, u32)>,
    ) -> Result<(AgentClient, String)> {
        let container = self.container(id)?;
        if container.phase() != ContainerPhase::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let mut agent = self.pod(&container.pod_id)?.agent()?;
        let spec: oci_spec::runtime::Spec = serde_json::from_value(container.record().spec)
            .map_err(|e| Error::FailedPrecondition(format!("container {id}'s spec: {e}")))?;
        let mut process = spec::exec_process(&spec, cmd, tty)?;
        if let (true, Some((rows, cols))) = (tty, console) {
            let size = oci_spec::runtime::BoxBuilder::default()
                .height(rows)
                .width(cols)
                .build()
                .map_err(|e| Error::InvalidArgument(format!("terminal size: {e}")))?;
            process.set_console_size(Some(size));
        }
        let process_json = serde_json::to_vec(&process)
            .map_err(|e| Error::InvalidArgument(format!("cannot encode the process: {e}")))?;
        let exec_id = format!("exec-{}", &state::new_id()?[..16]);
        let request = pb::ExecProcessRequest {
            container_id: container.id.clone(),
            exec_id: exec_id.clone(),
            process_json,
        };
        agent_call("ExecProcess", agent.exec_process(request)).await?;
        Ok((agent, exec_id))
    }

    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput> {
        let (mut agent, exec_id) = self.start_exec(id, &cmd, false, None).await?;
        let container = self.container(id)?;
        // ExecSync has no stdin: the command reads end of input.
        let close = pb::CloseStdinRequest {
            container_id: container.id.clone(),
            exec_id: exec_id.clone(),
        };
        if let Err(e) = agent_call("CloseStdin", agent.close_stdin(close)).await {
            tracing::debug!(container = %container.id, "{}", crate::error_chain(&e));
        }
        let stdout = Collector::spawn(&agent, &container.id, &exec_id, pb::OutputStream::Stdout);
        let stderr = Collector::spawn(&agent, &container.id, &exec_id, pb::OutputStream::Stderr);
        let wait_request = pb::WaitProcessRequest {
            container_id: container.id.clone(),
            exec_id: exec_id.clone(),
        };
        let mut waiter = agent.clone();
        let wait = waiter.wait_process(wait_request.clone());
        let status = match timeout {
            Some(limit) => match tokio::time::timeout(limit, wait).await {
                Ok(result) => result,
                Err(_) => {
                    self.kill_exec(&mut agent, &container.id, &exec_id, wait_request)
                        .await;
                    stdout.task.abort();
                    stderr.task.abort();
                    return Err(Error::DeadlineExceeded(format!(
                        "command {cmd:?} timed out after {}s and was killed",
                        limit.as_secs_f64()
                    )));
                }
            },
            None => wait.await,
        };
        let status = status
            .map_err(|status| Error::Agent {
                call: "WaitProcess",
                status,
            })?
            .into_inner()
            .status
            .unwrap_or_default();
        Ok(ExecOutput {
            stdout: stdout.finish().await,
            stderr: stderr.finish().await,
            exit_code: status.exit_code,
        })
    }

    /// SIGKILLs an exec (timed out, or its client went away) and waits
    /// until it is gone.
    pub(crate) async fn kill_exec(
        &self,
        agent: &mut AgentClient,
        container_id: &str,
        exec_id: &str,
        wait: pb::WaitProcessRequest,
    ) {
        let request = pb::SignalProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            signal: libc::SIGKILL,
            all: false,
        };
        if let Err(e) = agent_call("SignalProcess", agent.signal_process(request)).await {
            tracing::warn!(container = %container_id, exec = %exec_id, "{}", crate::error_chain(&e));
            return;
        }
        if tokio::time::timeout(KILL_WAIT, agent.wait_process(wait))
            .await
            .is_err()
        {
            tracing::warn!(container = %container_id, exec = %exec_id, "a killed exec did not exit");
        }
    }
}
