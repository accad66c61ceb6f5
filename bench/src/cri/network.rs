//! Pod networks (issue 15): both runtimes' pods on one CNI bridge (the
//! same bridge and subnet, disjoint host-local ranges), and what each
//! runtime's pods get from it, measured the same way through the CRI.
//!
//! - Pod-to-pod TCP throughput: a sink in one pod (`busybox nc -ll -e`,
//!   counting what it receives), the other pod's ExecSync sends
//!   `--net-bytes` zeros to it with `busybox nc`. The command returns when
//!   the sink has read everything and closed, so its wall time covers the
//!   whole transfer; the wall time of an ExecSync of `true` (the exec's own
//!   cost) is taken off: bytes / (median transfer - median no-op).
//! - Round-trip latency: `busybox ping -i 0.2` from one pod to the other,
//!   the average busybox reports.
//! - What the network adds to RunPodSandbox: frakti with its CNI network
//!   against a second frakti daemon with `--network none`, pods started
//!   alternately on both.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_cri::v1 as cri;

use super::Target;
use super::percentile;
use super::prepare::{self, env_path};
use super::runtime::{self, Client, Pod};

/// The bridge both runtimes' pods are on.
pub const BRIDGE: &str = "bench0";
pub const POD_SUBNET: &str = "10.88.0.0/16";
/// host-local's range for each runtime's pods: disjoint parts of
/// [`POD_SUBNET`], so each runtime keeps its own IPAM state.
pub const FRAKTI_RANGE: (&str, &str) = ("10.88.0.10", "10.88.0.120");
pub const CONTAINERD_RANGE: (&str, &str) = ("10.88.0.130", "10.88.0.250");
/// Where the sink listens.
const PORT: u16 = 5001;
/// What the sink last received, in bytes (`wc -c`), in its container.
const RECEIVED: &str = "/tmp/received";

/// The bench's CNI configuration: the bridge (the gateway on it, no
/// masquerading: no iptables needed) with host-local IPAM in `range` of
/// [`POD_SUBNET`], its state in `ipam_dir`.
pub fn bridge_config(ipam_dir: &Path, (start, end): (&str, &str)) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "bench",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_SUBNET, "rangeStart": start, "rangeEnd": end}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": ipam_dir.display().to_string(),
            },
        }],
    })
    .to_string()
}

/// The CNI plugins the bench was given, in `dir` under their own names
/// (CNI looks a plugin up by its type in the bin dir).
pub fn link_plugins(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    for (env, name) in [
        (prepare::CNI_BRIDGE_ENV, "bridge"),
        (prepare::CNI_LOOPBACK_ENV, "loopback"),
        (prepare::CNI_HOST_LOCAL_ENV, "host-local"),
    ] {
        symlink(env_path(env)?, dir.join(name))?;
    }
    Ok(())
}

/// What one runtime's pods measured on the bridge.
pub struct Measured {
    /// The sink's pod IP and the sender's.
    pub ips: (String, String),
    /// ExecSync wall times of `true` and of the transfers.
    pub noop_secs: Vec<f64>,
    pub transfer_secs: Vec<f64>,
    /// bytes / (median transfer - median no-op), MiB/s.
    pub mib_s: f64,
    /// busybox ping's average round trip, ms.
    pub rtt_ms: f64,
}

/// Two pods (`net-sink`, `net-send`), `runs` transfers of `bytes` and
/// `pings` pings between them; the pods are removed afterwards.
pub async fn measure(
    target: &mut Target,
    bytes: u64,
    runs: usize,
    pings: usize,
) -> anyhow::Result<Measured> {
    let sink = target.start("net-sink").await?;
    let sender = match target.start("net-send").await {
        Ok(pod) => pod,
        Err(e) => {
            let _ = runtime::remove_pod(&mut target.client, &sink).await;
            return Err(e);
        }
    };
    let measured = measure_pods(
        target.name,
        &mut target.client,
        &target.logs,
        &sink,
        &sender,
        bytes,
        runs,
        pings,
    )
    .await;
    let measured = match measured {
        Ok(m) => m,
        Err(e) => {
            for pod in [&sink, &sender] {
                let _ = runtime::remove_pod(&mut target.client, pod).await;
            }
            return Err(target.failed(e));
        }
    };
    for pod in [&sink, &sender] {
        target.remove(pod).await?;
    }
    Ok(measured)
}

#[allow(clippy::too_many_arguments)]
async fn measure_pods(
    name: &str,
    client: &mut Client,
    logs: &Path,
    sink: &Pod,
    sender: &Pod,
    bytes: u64,
    runs: usize,
    pings: usize,
) -> anyhow::Result<Measured> {
    // `-ll -e`: a sink per connection, which reads to the sender's EOF and
    // closes (a plain `nc -l` would half-close at once on its own empty
    // stdin, and the sender would stop at that).
    let count = format!("wc -c > {RECEIVED}");
    let port = PORT.to_string();
    let command = [
        "busybox", "nc", "-ll", "-p", &port, "-e", "sh", "-c", &count,
    ];
    let config = runtime::container_config("sink", prepare::IMAGE, &command);
    let counter = runtime::add_container(client, sink, "net-sink", logs, config).await?;
    let sink_ip = runtime::pod_ip(client, &sink.id).await?;
    let sender_ip = runtime::pod_ip(client, &sender.id).await?;
    ensure!(sink_ip != sender_ip, "both pods have the IP {sink_ip}");
    eprintln!("bench: {name} network: pods {sink_ip} (sink) and {sender_ip} (sender) up");
    let sending =
        |bytes: u64| format!("head -c {bytes} /dev/zero | busybox nc -w 5 {sink_ip} {PORT}");
    let timeout = 300;
    // Untimed, 1 MiB: waits for the sink to listen, warms ARP and the path.
    let (warm, warm_bytes) = (sending(1 << 20), 1 << 20);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (out, _) = exec(client, &sender.container, &["sh", "-c", &warm], timeout).await?;
        if out.exit_code == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "sending to {sink_ip}:{PORT} from {sender_ip} still fails after 60 s: {}",
            outcome(&out)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    check_received(client, &counter, warm_bytes).await?;
    eprintln!("bench: {name} network: 1 MiB warm-up transfer done");
    let send = sending(bytes);
    let send = ["sh", "-c", &send];
    let (mut noop_secs, mut transfer_secs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (out, secs) = exec(client, &sender.container, &["sh", "-c", "true"], timeout).await?;
        ensure!(out.exit_code == 0, "`sh -c true`: {}", outcome(&out));
        noop_secs.push(secs);
        let (out, secs) = exec(client, &sender.container, &send, timeout).await?;
        ensure!(
            out.exit_code == 0,
            "sending {bytes} bytes to {sink_ip}:{PORT}: {}",
            outcome(&out)
        );
        check_received(client, &counter, bytes).await?;
        eprintln!("bench: {name} network: {bytes} bytes in {secs:.3} s");
        transfer_secs.push(secs);
    }
    let net = percentile(&transfer_secs, 50.0) - percentile(&noop_secs, 50.0);
    ensure!(
        net > 0.0,
        "the transfers ({transfer_secs:?} s) took no longer than `true` ({noop_secs:?} s): \
         raise --net-bytes"
    );
    let mib_s = bytes as f64 / f64::from(1u32 << 20) / net;

    let count = pings.to_string();
    let ping = ["busybox", "ping", "-c", &count, "-i", "0.2", &sink_ip];
    let ping_timeout = 30 + i64::try_from(pings).unwrap_or(i64::MAX / 2);
    let (out, _) = exec(client, &sender.container, &ping, ping_timeout).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.exit_code == 0,
        "ping {sink_ip} from {sender_ip}: {}",
        outcome(&out)
    );
    let rtt_ms = average_rtt(&text).with_context(|| format!("ping's output: {text}"))?;
    Ok(Measured {
        ips: (sink_ip, sender_ip),
        noop_secs,
        transfer_secs,
        mib_s,
        rtt_ms,
    })
}

/// ExecSync `cmd` in `container`; the answer and its wall time.
pub(super) async fn exec(
    client: &mut Client,
    container: &str,
    cmd: &[&str],
    timeout: i64,
) -> anyhow::Result<(cri::ExecSyncResponse, f64)> {
    let started = Instant::now();
    let out = client
        .exec_sync(cri::ExecSyncRequest {
            container_id: container.into(),
            cmd: cmd.iter().map(|a| a.to_string()).collect(),
            timeout,
        })
        .await
        .with_context(|| format!("ExecSync {cmd:?}"))?
        .into_inner();
    Ok((out, started.elapsed().as_secs_f64()))
}

pub(super) fn outcome(out: &cri::ExecSyncResponse) -> String {
    format!(
        "exit {}: {}{}",
        out.exit_code,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// The sink counted `bytes` for the last connection.
async fn check_received(client: &mut Client, counter: &str, bytes: u64) -> anyhow::Result<()> {
    let (out, _) = exec(client, counter, &["cat", RECEIVED], 30).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim().parse::<u64>() {
        Ok(n) if out.exit_code == 0 && n == bytes => Ok(()),
        _ => bail!(
            "the sink received {:?} bytes of {bytes} ({})",
            text.trim(),
            outcome(&out)
        ),
    }
}

/// The average of busybox ping's `round-trip min/avg/max = a/b/c ms`.
fn average_rtt(output: &str) -> anyhow::Result<f64> {
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("round-trip min/avg/max = "))
        .context("no round-trip line")?;
    let avg = line
        .trim_end_matches(" ms")
        .split('/')
        .nth(1)
        .context("no average in the round-trip line")?;
    avg.parse().with_context(|| format!("average {avg:?}"))
}

/// RunPodSandbox (and the whole pod start) with and without the network,
/// seconds.
#[derive(Default)]
pub struct SandboxTimes {
    pub with: Vec<f64>,
    pub without: Vec<f64>,
    pub with_start: Vec<f64>,
    pub without_start: Vec<f64>,
}

/// `pods` pods started and removed one after another on `with` (frakti
/// with its CNI network) and `without` (frakti with `--network none`),
/// alternating which goes first, after `warmup` untimed pods on `without`
/// (a fresh daemon).
pub async fn sandbox_times(
    with: &mut Target,
    without: &mut Target,
    pods: usize,
    warmup: usize,
) -> anyhow::Result<SandboxTimes> {
    for i in 0..warmup {
        let pod = without.start(&format!("bare-warm-{i}")).await?;
        without.remove(&pod).await?;
    }
    let mut times = SandboxTimes::default();
    for i in 0..pods {
        for networked in if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let target = if networked { &mut *with } else { &mut *without };
            let pod = target.start(&format!("sandbox-{i}")).await?;
            eprintln!(
                "bench: {} pod {i}: RunPodSandbox {:.2} s, start {:.2} s",
                target.name, pod.sandbox_secs, pod.secs
            );
            target.remove(&pod).await?;
            let (sandbox, start) = if networked {
                (&mut times.with, &mut times.with_start)
            } else {
                (&mut times.without, &mut times.without_start)
            };
            sandbox.push(pod.sandbox_secs);
            start.push(pod.secs);
        }
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_average() {
        let out = "PING 10.88.0.11 (10.88.0.11): 56 data bytes\n\
                   64 bytes from 10.88.0.11: seq=0 ttl=64 time=0.820 ms\n\n\
                   --- 10.88.0.11 ping statistics ---\n\
                   1 packets transmitted, 1 packets received, 0% packet loss\n\
                   round-trip min/avg/max = 0.077/0.340/0.820 ms\n";
        assert_eq!(average_rtt(out).unwrap(), 0.340);
        assert!(average_rtt("100% packet loss\n").is_err());
    }

    #[test]
    fn ranges_share_the_bridge() {
        let a: serde_json::Value =
            serde_json::from_str(&bridge_config(Path::new("/a"), FRAKTI_RANGE)).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(&bridge_config(Path::new("/b"), CONTAINERD_RANGE)).unwrap();
        for key in ["/plugins/0/bridge", "/plugins/0/ipam/ranges/0/0/subnet"] {
            assert_eq!(a.pointer(key), b.pointer(key));
        }
        assert_eq!(a["plugins"][0]["isGateway"], true);
        assert_eq!(a["plugins"][0]["ipMasq"], false);
    }
}
