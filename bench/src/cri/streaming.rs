//! Streaming (issue 14): exec round trip and port-forward throughput,
//! with one SPDY/3.1 client (the e2e suite's) against each runtime's
//! streaming server, in the same run.
//!
//! Exec round trip: the CRI Exec call, the upgrade, the error and stdout
//! streams, `true` run, until the error stream ends (a Success status).
//! Port-forward: 16 MiB sent through one forwarded connection to an echo
//! server in the pod and read back.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_cri::v1 as cri;
use tokio::time::Instant as Deadline;

use super::Target;
use super::prepare;
use super::runtime::{self, Client, Pod};
use super::spdy_client::{Event, SpdyClient, SpdyStream};

/// Bytes through the port-forward, each way.
const FORWARDED: usize = 16 << 20;
/// Where the echo server listens in the pod.
const ECHO_PORT: u16 = 8080;
const LIMIT: Duration = Duration::from_secs(300);

/// What one runtime measured.
pub struct Streaming {
    pub exec_secs: Vec<f64>,
    /// MiB/s, both ways together.
    pub forward_mib_s: f64,
}

/// Starts the echo server beside the pod's container.
/// `name` and `logs` as the pod was started with.
pub async fn start_echo(
    client: &mut Client,
    pod: &Pod,
    name: &str,
    logs: &Path,
) -> anyhow::Result<String> {
    let echo = ["busybox", "nc", "-ll", "-p", "8080", "-e", "cat"];
    let config = runtime::container_config("echo", prepare::IMAGE, &echo);
    runtime::add_container(client, pod, name, logs, config).await
}

/// `rounds` exec round trips, then the port-forward.
pub async fn measure(client: &mut Client, pod: &Pod, rounds: usize) -> anyhow::Result<Streaming> {
    let mut exec_secs = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        exec_secs.push(exec_true(client, &pod.container).await?);
    }
    // The echo server may take a moment to listen.
    let mut throughput = forward(client, &pod.id).await;
    for _ in 0..20 {
        if throughput.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        throughput = forward(client, &pod.id).await;
    }
    Ok(Streaming {
        exec_secs,
        forward_mib_s: throughput?,
    })
}

async fn exec_true(client: &mut Client, container: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let url = client
        .exec(cri::ExecRequest {
            container_id: container.into(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .context("Exec")?
        .into_inner()
        .url;
    let deadline = Deadline::now() + LIMIT;
    let mut session = SpdyClient::upgrade(&url, "v4.channel.k8s.io").await?;
    let mut error = session.open(&[("streamtype", "error")])?;
    let mut stdout = session.open(&[("streamtype", "stdout")])?;
    let status = read_to_end(&mut error, deadline).await?;
    let secs = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&status);
    ensure!(text.contains("Success"), "exec of true: {text}");
    let _ = read_to_end(&mut stdout, deadline).await;
    Ok(secs)
}

/// A stream's data up to its end: a FIN, or (containerd's server, as
/// kubelet's library closes a connection) a reset after the data.
async fn read_to_end(stream: &mut SpdyStream, deadline: Deadline) -> anyhow::Result<Vec<u8>> {
    let mut all = Vec::new();
    loop {
        match stream.event(deadline).await? {
            Event::Data(data) => all.extend_from_slice(&data),
            Event::Fin | Event::Reset(_) => return Ok(all),
            Event::Reply => {}
        }
    }
}

/// MiB/s of [`FORWARDED`] bytes sent to the echo server and read back.
async fn forward(client: &mut Client, pod: &str) -> anyhow::Result<f64> {
    let url = client
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![i32::from(ECHO_PORT)],
        })
        .await
        .context("PortForward")?
        .into_inner()
        .url;
    let deadline = Deadline::now() + LIMIT;
    let mut session = SpdyClient::upgrade(&url, "portforward.k8s.io").await?;
    let port = ECHO_PORT.to_string();
    let mut error =
        session.open(&[("streamtype", "error"), ("port", &port), ("requestid", "0")])?;
    session.send(error.id, &[], true)?;
    let mut data = session.open(&[("streamtype", "data"), ("port", &port), ("requestid", "0")])?;
    let payload: Vec<u8> = (0..FORWARDED).map(|i| (i % 251) as u8).collect();
    let started = Instant::now();
    session.send(data.id, &payload, true)?;
    let back = read_to_end(&mut data, deadline).await?;
    let secs = started.elapsed().as_secs_f64();
    let failure = read_to_end(&mut error, deadline).await.unwrap_or_default();
    ensure!(
        back == payload,
        "port-forward echo: {} bytes back of {FORWARDED}: {}",
        back.len(),
        String::from_utf8_lossy(&failure)
    );
    Ok(2.0 * FORWARDED as f64 / f64::from(1u32 << 20) / secs)
}

/// Exec and port-forward through each runtime's streaming server, in one
/// pod each.
pub async fn part(targets: &mut [Target; 2], execs: usize) -> anyhow::Result<()> {
    for w in super::order(0) {
        let target = &mut targets[w];
        let pod = target.start("stream").await?;
        let measured = async {
            start_echo(&mut target.client, &pod, "stream", &target.logs).await?;
            measure(&mut target.client, &pod, execs).await
        }
        .await;
        let measured = measured.map_err(|e| target.failed(e))?;
        eprintln!(
            "bench: {} streaming: exec p50 {:.3} s, port-forward {:.1} MiB/s",
            target.name,
            super::percentile(&measured.exec_secs, 50.0),
            measured.forward_mib_s
        );
        target.streaming = Some(measured);
        target.remove(&pod).await?;
    }
    Ok(())
}
