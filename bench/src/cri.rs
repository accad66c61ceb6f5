//! CRI benchmark (issue 13): pod + container start and memory per pod,
//! `frakti daemon` against containerd 1.6 + runc, in one run (inside the
//! lab where the host needs it), with the same CRI client code and image.
//!
//! Timed per pod: RunPodSandbox → CreateContainer → StartContainer →
//! ContainerStatus RUNNING (the container runs `sleep 3600`); the pod is
//! removed afterwards, untimed. N pods one after another, then N pods
//! `--concurrency` at a time; the runtimes alternate which goes first. With
//! the first concurrent batch running: memory per pod (frakti: VMM outside
//! guest RAM, guest RAM resident, daemon RSS / pods; containerd: shim +
//! pause + container RSS, containerd RSS / pods). Prints p50/p95 and
//! ratios frakti/containerd.
//!
//! Then exec and port-forward through each runtime's streaming server
//! (`streaming.rs`), and pod networking (issue 15, `network.rs`): both
//! runtimes' pods are on one CNI bridge (same bridge and subnet, disjoint
//! host-local ranges); pod-to-pod TCP throughput and ping round trip per
//! runtime, and what frakti's CNI network adds to RunPodSandbox (against a
//! second frakti daemon with `--network none`).
//!
//! Last, block I/O on a volume (issue 16, `volumes.rs`): frakti's direct
//! volume against the same kind of device mounted on the node and
//! bind-mounted into a runc container. `--only` runs a subset of the parts.

#[path = "../../cri/tests/support/mod.rs"]
mod support;

#[path = "cri/containerd.rs"]
mod containerd;
#[path = "cri/network.rs"]
mod network;
#[path = "cri/prepare.rs"]
mod prepare;
#[path = "cri/runtime.rs"]
mod runtime;
// Shared with the e2e suite, which uses more of it.
#[allow(dead_code)]
#[path = "../../tests/e2e/streaming/spdy_client.rs"]
mod spdy_client;
#[path = "cri/streaming.rs"]
mod streaming;
#[path = "cri/volumes.rs"]
mod volumes;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, ensure};
use clap::Parser;
use frakti_lab::guest::{self, GuestAssets};
use frakti_lab::mode::{IN_LAB_ENV, Mode};
use frakti_lab::runner::TIMEOUT_ENV;
use runtime::{Client, Memory, Pod};

/// Pod + container start time and memory per pod: frakti vs containerd +
/// runc through the CRI (ratios).
#[derive(Debug, Parser)]
struct Args {
    /// Pods each runtime starts one after another, and again `--concurrency` at a time.
    #[arg(long, default_value_t = 20)]
    pods: usize,
    /// Pods started at once in the concurrent round (memory is measured with this many running).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Untimed pods each runtime starts and removes first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Exec round trips (`true` over SPDY) timed per runtime.
    #[arg(long, default_value_t = 30)]
    execs: usize,
    /// Bytes each pod-to-pod TCP transfer sends. (In the lab, 32 MiB between two
    /// frakti pods, about 3 minutes of virtio-net traffic under nested SVM in TCG,
    /// froze L1 every time: no heartbeat, no kernel message; 4 MiB did not.)
    #[arg(long, default_value_t = 4 << 20)]
    net_bytes: u64,
    /// Pod-to-pod transfers timed per runtime (the median is reported).
    #[arg(long, default_value_t = 3)]
    net_runs: usize,
    /// Pings (0.2 s apart) from one pod to the other per runtime.
    #[arg(long, default_value_t = 20)]
    pings: usize,
    /// MiB each sequential volume run writes and reads (1 MiB blocks).
    #[arg(long, default_value_t = 32)]
    io_mib: u64,
    /// 4 KiB operations each random volume run does.
    #[arg(long, default_value_t = 1024)]
    io_rand_ops: u64,
    /// Rounds of the four volume runs per runtime (the median is reported).
    #[arg(long, default_value_t = 3)]
    io_runs: usize,
    /// Only these parts (comma-separated); all of them by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
}

/// The benchmark's parts, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Pod + container start times and memory per pod.
    Start,
    /// Exec and port-forward through the streaming servers.
    Streaming,
    /// Pod-to-pod throughput and latency, and what CNI adds to RunPodSandbox.
    Network,
    /// Block I/O on a volume.
    Volumes,
}

impl Args {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }

    fn io(&self) -> (u64, u64, usize) {
        (self.io_mib, self.io_rand_ops, self.io_runs)
    }
}

/// Issue 13's goal: pod start at most this times containerd + runc's.
const GOAL: f64 = 1.5;

fn main() -> ExitCode {
    frakti_bench::exit(run(&Args::parse()))
}

fn run(args: &Args) -> anyhow::Result<ExitCode> {
    ensure!(args.pods >= 1, "--pods must be at least 1");
    ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    ensure!(args.net_runs >= 1, "--net-runs must be at least 1");
    ensure!(args.pings >= 1, "--pings must be at least 1");
    ensure!(
        args.io_mib >= 1 && args.io_rand_ops >= 1 && args.io_runs >= 1,
        "--io-mib, --io-rand-ops and --io-runs must be at least 1"
    );
    let in_lab = std::env::var_os(IN_LAB_ENV).is_some();
    // Holds what the host prepares until the run is over.
    let host_dir = tempfile::Builder::new()
        .prefix("frakti-bench-cri")
        .tempdir()?;
    let mut programs = vec![(guest::VMM_ENV, guest::vmm_binary()?)];
    if !in_lab {
        let nested = Mode::detect()?.is_nested();
        programs.extend(prepare::prepare(host_dir.path(), nested)?);
        if nested && std::env::var_os(TIMEOUT_ENV).is_none() {
            // Two runtimes, each warm-up + 2 x pods starts and removals;
            // the network part: 2 pods per runtime and warm-up + 2 x pods
            // frakti pods.
            let secs = 1500
                + 150 * (args.pods + args.warmup)
                + 30 * args.net_runs
                + args.pings
                + 120 * args.io_runs;
            // SAFETY: no other thread runs yet.
            unsafe { std::env::set_var(TIMEOUT_ENV, secs.to_string()) };
        }
    }
    if let Some(code) = frakti_bench::here_or_in_lab(&programs)? {
        return Ok(code);
    }
    let assets = GuestAssets::locate()?;
    programs.push((guest::KERNEL_ENV, assets.kernel));
    programs.push((guest::INITRD_ENV, assets.initrd));
    for (env, path) in &programs {
        // SAFETY: no other thread runs yet (the runtime starts below).
        unsafe { std::env::set_var(env, path) };
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench(args, in_lab))?;
    Ok(ExitCode::SUCCESS)
}

/// One runtime under test and what it measured.
struct Target {
    name: &'static str,
    client: Client,
    /// Where pods' log directories go.
    logs: PathBuf,
    /// The daemon's own log.
    log: PathBuf,
    pid: u32,
    sequential: Vec<f64>,
    /// RunPodSandbox alone, in the sequential round.
    sandbox: Vec<f64>,
    concurrent: Vec<f64>,
    memory: Option<Memory>,
    streaming: Option<streaming::Streaming>,
    network: Option<network::Measured>,
    volumes: Option<volumes::Measured>,
}

impl Target {
    /// A runtime serving CRI on `socket`, nothing measured yet.
    async fn new(
        name: &'static str,
        socket: &std::path::Path,
        logs: PathBuf,
        log: PathBuf,
        pid: u32,
    ) -> anyhow::Result<Target> {
        Ok(Target {
            name,
            client: runtime::connect(socket).await?,
            logs,
            log,
            pid,
            sequential: Vec::new(),
            sandbox: Vec::new(),
            concurrent: Vec::new(),
            memory: None,
            streaming: None,
            network: None,
            volumes: None,
        })
    }

    /// `e` with the tail of the daemon's log.
    fn failed(&self, e: anyhow::Error) -> anyhow::Error {
        anyhow!(
            "{}: {e:#}\n--- {} log (tail) ---\n{}",
            self.name,
            self.name,
            runtime::log_tail(&self.log, 60)
        )
    }

    async fn start(&mut self, name: &str) -> anyhow::Result<Pod> {
        let result = runtime::start_pod(&mut self.client, name, &self.logs).await;
        result.map_err(|e| self.failed(e))
    }

    async fn remove(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let result = runtime::remove_pod(&mut self.client, pod).await;
        result.map_err(|e| self.failed(e))
    }

    /// `n` pods started at once; all of them, or the first error.
    async fn start_batch(&mut self, prefix: &str, n: usize) -> anyhow::Result<Vec<Pod>> {
        let mut set = tokio::task::JoinSet::new();
        for j in 0..n {
            let (mut client, logs) = (self.client.clone(), self.logs.clone());
            let name = format!("{prefix}-{j}");
            set.spawn(async move { runtime::start_pod(&mut client, &name, &logs).await });
        }
        let (mut pods, mut error) = (Vec::new(), None);
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok(pod)) => pods.push(pod),
                Ok(Err(e)) => error = error.or(Some(e)),
                Err(e) => error = error.or(Some(anyhow!("a start task failed: {e}"))),
            }
        }
        match error {
            None => Ok(pods),
            Some(e) => {
                for pod in &pods {
                    let _ = runtime::remove_pod(&mut self.client, pod).await;
                }
                Err(self.failed(e))
            }
        }
    }

    async fn measure_memory(&mut self, pods: &[Pod]) -> anyhow::Result<Memory> {
        let result = if self.name == "frakti" {
            runtime::frakti_memory(&mut self.client, pods, self.pid).await
        } else {
            runtime::containerd_memory(&mut self.client, pods, self.pid).await
        };
        result.map_err(|e| self.failed(e))
    }
}

async fn bench(args: &Args, in_lab: bool) -> anyhow::Result<()> {
    let cgroups = containerd::prepare_node(in_lab)?;
    // Short: frakti's pod sockets live below its root.
    let work = tempfile::Builder::new().prefix("fb").tempdir_in("/tmp")?;
    eprintln!("bench: starting frakti daemon and containerd (importing the images)");
    let frakti = runtime::Frakti::start(&work.path().join("f"), runtime::Networking::Cni).await?;
    let containerd = containerd::Containerd::start(&work.path().join("c")).await?;
    let mut targets = [
        Target::new(
            "frakti",
            &frakti.socket(),
            frakti.log_dir(),
            frakti.log(),
            frakti.pid(),
        )
        .await?,
        Target::new(
            "containerd",
            &containerd.socket,
            containerd.log_dir(),
            containerd.log(),
            containerd.pid(),
        )
        .await?,
    ];

    if args.runs(Part::Start) {
        start_part(args, &mut targets).await?;
    }
    if args.runs(Part::Streaming) {
        streaming::part(&mut targets, args.execs).await?;
    }
    let mut sandbox = None;
    if args.runs(Part::Network) {
        sandbox = Some(network_part(args, &mut targets, work.path()).await?);
    }
    if args.runs(Part::Volumes) {
        volumes::part(&mut targets, &frakti.root(), work.path(), args.io()).await?;
    }
    print_warnings(&frakti.log());
    if args.runs(Part::Start) {
        report(args, &cgroups, &targets);
    }
    if args.runs(Part::Streaming) {
        report_streaming(&targets);
    }
    if let Some(sandbox) = &sandbox {
        report_network(args, &targets, sandbox);
    }
    if let [
        Target {
            volumes: Some(ours),
            ..
        },
        Target {
            volumes: Some(theirs),
            ..
        },
    ] = &targets
    {
        volumes::report(ours, theirs, args.io());
    }
    Ok(())
}

/// Which runtime goes first in round `i` (they alternate so drift hurts
/// both alike).
fn order(i: usize) -> [usize; 2] {
    if i % 2 == 0 { [0, 1] } else { [1, 0] }
}

/// Warm-up, then pods one after another, then `--concurrency` at a time
/// (memory measured with the first full batch running).
async fn start_part(args: &Args, targets: &mut [Target; 2]) -> anyhow::Result<()> {
    for target in targets.iter_mut() {
        for i in 0..args.warmup {
            let pod = target.start(&format!("warm-{i}")).await?;
            eprintln!("bench: {} warm-up pod {i}: {:.2} s", target.name, pod.secs);
            target.remove(&pod).await?;
        }
    }
    for i in 0..args.pods {
        for w in order(i) {
            let target = &mut targets[w];
            let pod = target.start(&format!("seq-{i}")).await?;
            eprintln!(
                "bench: {} sequential pod {i}: {:.2} s",
                target.name, pod.secs
            );
            target.remove(&pod).await?;
            target.sequential.push(pod.secs);
            target.sandbox.push(pod.sandbox_secs);
        }
    }
    let batch_size = args.concurrency.min(args.pods);
    for b in 0..args.pods.div_ceil(args.concurrency) {
        let n = args.concurrency.min(args.pods - b * args.concurrency);
        for w in order(b) {
            let target = &mut targets[w];
            let pods = target.start_batch(&format!("conc-{b}"), n).await?;
            let secs: Vec<String> = pods.iter().map(|p| format!("{:.2}", p.secs)).collect();
            eprintln!(
                "bench: {} concurrent batch {b}: {} s",
                target.name,
                secs.join(" ")
            );
            if target.memory.is_none() && n == batch_size {
                // Let the pods settle after their start.
                tokio::time::sleep(Duration::from_secs(2)).await;
                target.memory = Some(target.measure_memory(&pods).await?);
            }
            for pod in &pods {
                target.remove(pod).await?;
            }
            target.concurrent.extend(pods.iter().map(|p| p.secs));
        }
    }
    for target in targets.iter_mut() {
        let left = runtime::pods_left(&mut target.client).await?;
        if left > 0 {
            eprintln!(
                "bench: warning: {} still lists {left} pods after removal",
                target.name
            );
        }
    }
    Ok(())
}

/// Pod-to-pod traffic per runtime, then RunPodSandbox with and without
/// CNI (a second frakti daemon with `--network none`).
async fn network_part(
    args: &Args,
    targets: &mut [Target; 2],
    work: &std::path::Path,
) -> anyhow::Result<network::SandboxTimes> {
    for w in order(1) {
        let target = &mut targets[w];
        let measured = network::measure(target, args.net_bytes, args.net_runs, args.pings).await?;
        eprintln!(
            "bench: {} pods {} <- {}: TCP {:.2} MiB/s (transfer p50 {:.3} s, `true` p50 {:.3} s), \
             ping avg {:.3} ms",
            target.name,
            measured.ips.0,
            measured.ips.1,
            measured.mib_s,
            percentile(&measured.transfer_secs, 50.0),
            percentile(&measured.noop_secs, 50.0),
            measured.rtt_ms
        );
        target.network = Some(measured);
    }
    eprintln!("bench: starting a second frakti daemon with --network none");
    let bare = runtime::Frakti::start(&work.join("n"), runtime::Networking::None).await?;
    let mut without = Target::new(
        "frakti --network none",
        &bare.socket(),
        bare.log_dir(),
        bare.log(),
        bare.pid(),
    )
    .await?;
    let sandbox =
        network::sandbox_times(&mut targets[0], &mut without, args.pods, args.warmup).await?;
    drop(without);
    drop(bare);
    Ok(sandbox)
}

/// frakti daemon's WARN and ERROR lines, if any (to stderr).
fn print_warnings(log: &std::path::Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    if !lines.is_empty() {
        eprintln!(
            "bench: frakti daemon logged {} warnings/errors; the first:",
            lines.len()
        );
        for line in lines.iter().take(20) {
            eprintln!("  {line}");
        }
    }
}

/// Nearest-rank percentile (NaN for none).
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted
        .get(rank.min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

fn report(args: &Args, cgroups: &str, targets: &[Target; 2]) {
    let batch = args.concurrency.min(args.pods);
    let [frakti, containerd] = targets;
    println!(
        "CRI pod + container start: frakti vs {} (lab, ratios only)",
        containerd::versions()
    );
    println!(
        "  same CRI v1 client code (k8s-cri), same image {} (the busybox test image), \
         container `sleep 3600`",
        prepare::IMAGE
    );
    println!(
        "  timed per pod: RunPodSandbox -> CreateContainer -> StartContainer -> ContainerStatus \
         RUNNING; each pod removed after, untimed; {} untimed warm-up pod(s) per runtime; the \
         runtimes alternate which goes first",
        args.warmup
    );
    println!(
        "  containerd: CRI plugin, overlayfs snapshotter, runc (cgroupfs driver{}), {cgroups}; \
         sandbox image: busybox `sleep 2147483647` built here",
        if containerd::root_is_initramfs() {
            ", NoPivotRoot: / is an initramfs, which pivot_root refuses"
        } else {
            ""
        }
    );
    println!(
        "  both figures INCLUDE the CNI setup: one bridge {} for both runtimes' pods, host-local \
         IPAM {} (frakti {}-{}, containerd {}-{}), no masquerade; frakti's pods also get a tap \
         joined to the CNI interface by tc redirect",
        network::BRIDGE,
        network::POD_SUBNET,
        network::FRAKTI_RANGE.0,
        network::FRAKTI_RANGE.1,
        network::CONTAINERD_RANGE.0,
        network::CONTAINERD_RANGE.1,
    );
    println!(
        "  absolute times are the emulated lab's (QEMU TCG L1, nested KVM): quote the ratios only"
    );
    println!();
    println!(
        "  {:<28} {:>10} {:>13} {:>18}",
        "start time", "frakti s", "containerd s", "frakti/containerd"
    );
    let rounds = [
        (
            format!("sequential ({} pods)", args.pods),
            &frakti.sequential,
            &containerd.sequential,
        ),
        (
            format!("concurrency {} ({} pods)", args.concurrency, args.pods),
            &frakti.concurrent,
            &containerd.concurrent,
        ),
    ];
    let mut over = Vec::new();
    for (label, ours, theirs) in &rounds {
        for (name, p) in [("p50", 50.0), ("p95", 95.0)] {
            let (a, b) = (percentile(ours, p), percentile(theirs, p));
            let ratio = a / b;
            println!(
                "  {:<28} {a:>10.3} {b:>13.3} {ratio:>17.2}x",
                format!("{label} {name}")
            );
            if ratio.is_nan() || ratio > GOAL {
                over.push(format!("{label} {name} {ratio:.2}x"));
            }
        }
    }
    if over.is_empty() {
        println!(
            "  goal (issue 13): pod start <= {GOAL}x containerd+runc: HOLDS (p50 and p95, both rounds)"
        );
    } else {
        println!(
            "  goal (issue 13): pod start <= {GOAL}x containerd+runc: DOES NOT HOLD ({})",
            over.join(", ")
        );
    }
    println!();
    let (Some(ours), Some(theirs)) = (&frakti.memory, &containerd.memory) else {
        println!("  memory: not measured");
        return;
    };
    println!(
        "  memory per pod with {batch} pods running (RSS from smaps, MiB; means over the pods)"
    );
    let mib = |kib: f64| kib / 1024.0;
    for (name, memory, daemon) in [
        ("frakti", ours, "frakti daemon RSS / pods"),
        ("containerd", theirs, "containerd RSS / pods"),
    ] {
        for (part, kib) in &memory.parts {
            println!("    {name:<11} {part:<32} {:>8.2}", mib(*kib));
        }
        println!(
            "    {name:<11} {:<32} {:>8.2}",
            "= per pod",
            mib(memory.per_pod())
        );
        println!(
            "    {name:<11} {:<32} {:>8.2}",
            format!("+ {daemon}"),
            mib(memory.daemon_share)
        );
        let total = memory.per_pod() + memory.daemon_share;
        println!(
            "    {name:<11} {:<32} {:>8.2}",
            "= with the daemon's share",
            mib(total)
        );
    }
    println!(
        "  ratio frakti/containerd: per pod {:.2}x, with the daemon's share {:.2}x \
         (frakti's includes the guest's kernel and agent; containerd's pods share the host kernel)",
        ours.per_pod() / theirs.per_pod(),
        (ours.per_pod() + ours.daemon_share) / (theirs.per_pod() + theirs.daemon_share)
    );
    println!(
        "  PSS per pod (pages shared between processes split among them): frakti {:.2} MiB, \
         containerd {:.2} MiB, ratio {:.2}x",
        mib(ours.pss),
        mib(theirs.pss),
        ours.pss / theirs.pss
    );
}

fn report_streaming(targets: &[Target; 2]) {
    let [frakti, containerd] = targets;
    let (Some(ours), Some(theirs)) = (&frakti.streaming, &containerd.streaming) else {
        println!("  streaming: not measured");
        return;
    };
    println!();
    println!(
        "  streaming (one SPDY/3.1 client, the e2e suite's, against each runtime's streaming \
         server): exec of `true` from the CRI Exec call to the error stream's Success, {} times; \
         port-forward of 16 MiB to an echo server in the pod and back",
        ours.exec_secs.len()
    );
    for (name, p) in [("p50", 50.0), ("p95", 95.0)] {
        let (a, b) = (
            percentile(&ours.exec_secs, p),
            percentile(&theirs.exec_secs, p),
        );
        println!(
            "  {:<28} {a:>10.3} {b:>13.3} {:>17.2}x",
            format!("exec round trip {name}"),
            a / b
        );
    }
    println!(
        "  {:<28} {:>10.1} {:>13.1} {:>17.2}x  (MiB/s both ways; higher is better)",
        "port-forward throughput",
        ours.forward_mib_s,
        theirs.forward_mib_s,
        ours.forward_mib_s / theirs.forward_mib_s
    );
}

fn report_network(args: &Args, targets: &[Target; 2], sandbox: &network::SandboxTimes) {
    let [frakti, containerd] = targets;
    println!();
    let (Some(ours), Some(theirs)) = (&frakti.network, &containerd.network) else {
        println!("  pod networks: not measured");
        return;
    };
    println!(
        "  pod networks: two pods of each runtime on the bridge; TCP: {} MiB of zeros with \
         busybox nc from one pod to a sink in the other (bytes counted), ExecSync wall time \
         minus that of `true`, median of {}; ping: {} pings 0.2 s apart, busybox's average",
        args.net_bytes as f64 / f64::from(1u32 << 20),
        args.net_runs,
        args.pings
    );
    println!(
        "  {:<28} {:>10.2} {:>13.2} {:>17.2}x  (MiB/s; higher is better)",
        "pod-to-pod TCP throughput",
        ours.mib_s,
        theirs.mib_s,
        ours.mib_s / theirs.mib_s
    );
    println!(
        "  {:<28} {:>10.3} {:>13.3} {:>17.2}x  (ms)",
        "pod-to-pod ping round trip",
        ours.rtt_ms,
        theirs.rtt_ms,
        ours.rtt_ms / theirs.rtt_ms
    );
    let p50 = |v: &[f64]| percentile(v, 50.0);
    println!(
        "  RunPodSandbox p50, {} pods each, frakti with its CNI network and a second frakti \
         daemon with --network none, alternating:",
        sandbox.with.len()
    );
    println!(
        "  {:<28} {:>10} {:>13} {:>18}",
        "", "with s", "without s", "with/without"
    );
    for (label, with, without) in [
        ("frakti RunPodSandbox p50", &sandbox.with, &sandbox.without),
        (
            "frakti pod start p50",
            &sandbox.with_start,
            &sandbox.without_start,
        ),
    ] {
        let (a, b) = (p50(with), p50(without));
        println!("  {label:<28} {a:>10.3} {b:>13.3} {:>17.2}x", a / b);
    }
    let (a, b) = (p50(&frakti.sandbox), p50(&containerd.sandbox));
    println!(
        "  {:<28} {a:>10.3} {b:>13.3} {:>17.2}x  (frakti s, containerd s, frakti/containerd; \
         both with CNI)",
        "RunPodSandbox p50, seq round",
        a / b
    );
    println!(
        "bench: pod-to-pod TCP throughput: frakti {:.2} MiB/s, containerd {:.2} MiB/s, ratio \
         frakti/containerd {:.2}",
        ours.mib_s,
        theirs.mib_s,
        ours.mib_s / theirs.mib_s
    );
    println!(
        "bench: pod-to-pod round trip (ping avg): frakti {:.3} ms, containerd {:.3} ms, ratio \
         frakti/containerd {:.2}",
        ours.rtt_ms,
        theirs.rtt_ms,
        ours.rtt_ms / theirs.rtt_ms
    );
    println!(
        "bench: RunPodSandbox p50: frakti with CNI {:.3} s, without (--network none) {:.3} s, \
         ratio with/without {:.2}; containerd (with CNI, sequential round) {:.3} s, ratio \
         frakti/containerd {:.2}",
        p50(&sandbox.with),
        p50(&sandbox.without),
        p50(&sandbox.with) / p50(&sandbox.without),
        b,
        a / b
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 11.0);
        assert_eq!(percentile(&v, 95.0), 19.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
