//! `frakti exec`: a command in a running container, its stdio attached and
//! its exit code ours.

use k8s_cri::v1 as cri;

use super::attach::{self, Ended};
use super::terminal::{self, RawMode};
use super::{Clients, resolve, status_error};

/// Runs `cmd` in the container; returns its exit code.
pub async fn exec(
    clients: &mut Clients,
    reference: &str,
    cmd: Vec<String>,
    stdin: bool,
    tty: bool,
) -> anyhow::Result<i32> {
    anyhow::ensure!(
        !tty || terminal::stdin_is_terminal(),
        "-t needs a terminal on stdin (drop -t to pipe input)"
    );
    let found = resolve::container(clients, reference).await?;
    let url = clients
        .runtime
        .exec(cri::ExecRequest {
            container_id: found.id().to_string(),
            cmd,
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .url;
    let ws = attach::connect(&url).await?;
    let raw = if tty { Some(RawMode::enter()?) } else { None };
    let ended = attach::run(ws, attach::Options { stdin, tty }).await;
    drop(raw);
    match ended? {
        Ended::Exited(code) => Ok(code),
        Ended::Detached => {
            eprintln!("frakti: detached; the command goes on");
            Ok(0)
        }
        Ended::Closed => anyhow::bail!("the daemon ended the session without an exit status"),
    }
}
