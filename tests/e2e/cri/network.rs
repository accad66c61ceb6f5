//! Pod networks (issue 15) with Debian's CNI plugins in L1: pods on a
//! bridge reach each other, L1 and are reached from it; ptp and dual-stack
//! configurations; a hostPort; a configuration change is used without a
//! restart; DEL after a daemon restart and its retry; failing, hanging,
//! garbling and missing plugins fail RunPodSandbox with their message and
//! leave nothing; ten pods in parallel leave no namespace,
//! tap, veth or IPAM allocation.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_cri::v1 as cri;
use libtest_mimic::Trial;
use sha2::Digest;

use super::harness::*;

/// The daemon's CNI flags: conf dir, namespaces and fake plugins in its dir.
const CNI: &[&str] = &[
    "--cni-conf-dir",
    "{dir}/net.d",
    "--netns-dir",
    "{dir}/netns",
    "--cni-bin-dir",
    "{dir}/cni-bin,/usr/lib/cni",
    "--cni-plugin-timeout",
    "5",
];

pub fn tests() -> Vec<Trial> {
    vec![
        Trial::test("network::pods_on_a_bridge_reach_each_other_and_l1", || {
            with_daemon(CNI, bridge)
        }),
        Trial::test("network::config_changes_ptp_and_dual_stack", || {
            with_daemon(CNI, changes)
        }),
        Trial::test(
            "network::bad_plugins_fail_the_pod_and_leave_nothing",
            || with_daemon(CNI, bad_plugins),
        ),
        Trial::test(
            "network::del_after_a_restart_and_retried_when_it_fails",
            || with_daemon(CNI, restart_and_retry),
        ),
        Trial::test("network::ten_pods_in_parallel_leave_nothing", || {
            with_daemon(CNI, ten_pods)
        }),
    ]
}

fn bridge_config(name: &str, bridge: &str, ranges: &str, ipam_dir: &Path) -> String {
    format!(
        r#"{{"cniVersion": "1.0.0", "name": "{name}", "plugins": [
            {{"type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": false,
              "ipam": {{"type": "host-local", "ranges": {ranges},
                       "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{}"}}}},
            {{"type": "portmap", "capabilities": {{"portMappings": true}}}}]}}"#,
        ipam_dir.display()
    )
}

/// The hostPort pod b's web server is published on.
const HOST_PORT: u16 = 18080;

/// Writes `text` as the conf dir's only file, atomically (as network
/// add-ons do).
fn install_config(daemon: &Daemon, file: &str, text: &str) -> anyhow::Result<()> {
    let dir = daemon.dir.path().join("net.d");
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(&dir)? {
        std::fs::remove_file(entry?.path())?;
    }
    let temp = daemon.dir.path().join(".config.tmp");
    std::fs::write(&temp, text)?;
    std::fs::rename(&temp, dir.join(file))?;
    Ok(())
}

async fn network_ready(c: &mut Runtime) -> anyhow::Result<cri::RuntimeCondition> {
    let status = c
        .status(cri::StatusRequest { verbose: false })
        .await?
        .into_inner()
        .status
        .context("no status")?;
    status
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .context("no NetworkReady condition")
}

async fn wait_network_ready(c: &mut Runtime) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let condition = network_ready(c).await?;
        if condition.status {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "network not ready: {condition:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn pod_ips(c: &mut Runtime, pod: &str) -> anyhow::Result<Vec<String>> {
    let network = pod_status(c, pod, false)
        .await?
        .status
        .and_then(|s| s.network)
        .context("no network status")?;
    let mut ips = vec![network.ip];
    ips.extend(network.additional_ips.into_iter().map(|ip| ip.ip));
    Ok(ips)
}

/// ExecSync that must exit 0; its stdout.
async fn run(c: &mut Runtime, id: &str, cmd: &[&str]) -> anyhow::Result<String> {
    let out = exec(c, id, cmd, 60).await?;
    ensure!(
        out.exit_code == 0,
        "{cmd:?} exited {}: {}{}",
        out.exit_code,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A pod with one long-running container; returns (pod, container).
async fn pod_with(
    c: &mut Runtime,
    daemon: &Daemon,
    name: &str,
    command: &[&str],
) -> anyhow::Result<(String, String)> {
    let pod = run_pod(c, pod_config(name, &daemon.log_dir())).await?;
    let id = run_container(c, &pod, "main", command).await?;
    Ok((pod, id))
}

/// A web server in the pod serving 1 MiB of random bytes as /blob.
const WEB: &[&str] = &[
    "sh",
    "-c",
    "mkdir -p /www && head -c 1048576 /dev/urandom > /www/blob && exec busybox httpd -f -p 8080 -h /www",
];

/// What L1 shows of pod networking: namespaces, interfaces, IPAM files.
fn network_traces(daemon: &Daemon) -> Vec<String> {
    let mut traces = Vec::new();
    if let Ok(entries) = std::fs::read_dir(daemon.dir.path().join("netns")) {
        traces.extend(
            entries
                .flatten()
                .map(|e| format!("netns {}", e.path().display())),
        );
    }
    if let Ok(out) = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
    {
        traces.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("veth") || l.contains("tap"))
                .map(|l| format!("link {l}")),
        );
    }
    let ipam = daemon.dir.path().join("ipam");
    for network in std::fs::read_dir(&ipam).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(network.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = file.file_name().to_string_lossy().into_owned();
            // host-local's own bookkeeping stays; allocations are named by IP.
            if name.parse::<std::net::IpAddr>().is_ok() {
                traces.push(format!("IPAM allocation {}", file.path().display()));
            }
        }
    }
    // portmap's per-pod chains and the jumps to them (its top-level
    // chains stay, as with every runtime).
    if let Ok(out) = std::process::Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()
    {
        traces.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("CNI-DN-") || l.contains("CNI-SN-"))
                .map(|l| format!("iptables {l}")),
        );
    }
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
        traces.extend(
            mounts
                .lines()
                .filter(|l| l.contains("/netns/"))
                .map(|l| format!("mount {l}")),
        );
    }
    traces
}

fn ensure_no_network_traces(daemon: &Daemon) -> anyhow::Result<()> {
    let traces = network_traces(daemon);
    ensure!(traces.is_empty(), "left behind: {traces:#?}");
    ensure_no_leaks(daemon)
}

async fn remove_all(c: &mut Runtime, pods: &[String]) -> anyhow::Result<()> {
    for pod in pods {
        stop_and_remove(c, pod).await?;
    }
    Ok(())
}

/// A one-shot HTTP server on L1: answers every GET with `body`.
fn serve_on_l1(body: &'static str) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("0.0.0.0:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(port)
}

/// GET http://ip:port/path from L1; the body.
fn http_get(ip: &str, port: u16, path: &str) -> anyhow::Result<Vec<u8>> {
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header end")?;
    ensure!(
        response.starts_with(b"HTTP/1.0 200") || response.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response[..split])
    );
    Ok(response[split + 4..].to_vec())
}

async fn bridge(daemon: &mut Daemon) -> anyhow::Result<()> {
    let ipam = daemon.dir.path().join("ipam");
    install_config(
        daemon,
        "10-bridge.conflist",
        &bridge_config(
            "frakti-br",
            "fbr0",
            r#"[[{"subnet": "10.77.0.0/24"}]]"#,
            &ipam,
        ),
    )?;
    let mut c = daemon.runtime().await?;
    wait_network_ready(&mut c).await?;
    let (a, a_main) = pod_with(&mut c, daemon, "a", &["sleep", "1000"]).await?;
    let mut b_config = pod_config("b", &daemon.log_dir());
    b_config.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: i32::from(HOST_PORT),
        host_ip: String::new(),
    }];
    let b = run_pod(&mut c, b_config).await?;
    let b_web = run_container(&mut c, &b, "main", WEB).await?;
    let a_ip = pod_ips(&mut c, &a).await?.remove(0);
    let b_ip = pod_ips(&mut c, &b).await?.remove(0);
    eprintln!("network: pod a {a_ip}, pod b {b_ip}");
    ensure!(
        a_ip.starts_with("10.77.0.") && b_ip.starts_with("10.77.0.") && a_ip != b_ip,
        "pod IPs {a_ip} {b_ip}"
    );
    // The guest's interface has the pod IP and the plugins' routes.
    let addr = run(&mut c, &a_main, &["busybox", "ip", "addr", "show", "eth0"]).await?;
    ensure!(addr.contains(&format!("inet {a_ip}/24")), "{addr}");
    let routes = run(&mut c, &a_main, &["busybox", "ip", "route"]).await?;
    ensure!(
        routes.contains("default via 10.77.0.1 dev eth0"),
        "{routes}"
    );
    // Pod to pod: ping and TCP (HTTP), bytes checked.
    run(
        &mut c,
        &a_main,
        &["busybox", "ping", "-c", "2", "-W", "5", &b_ip],
    )
    .await?;
    let want = run(&mut c, &b_web, &["sha256sum", "/www/blob"]).await?;
    let got = run(
        &mut c,
        &a_main,
        &[
            "sh",
            "-c",
            &format!("busybox wget -q -O - http://{b_ip}:8080/blob | sha256sum"),
        ],
    )
    .await?;
    ensure!(
        want.split_whitespace().next() == got.split_whitespace().next(),
        "pod a got {got}, pod b has {want}"
    );
    // L1 to the pod, by pod IP (as the CRI validation suite's HTTP check).
    let started = Instant::now();
    let body = http_get(&b_ip, 8080, "/blob")?;
    eprintln!(
        "network: 1 MiB from a pod to L1 in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let hex = format!("{:x}", sha2::Sha256::digest(&body));
    ensure!(want.starts_with(&hex), "L1 got {hex}, the pod has {want}");
    // The hostPort, from L1's loopback (portmap's DNAT), as kubelet's
    // users and the CRI validation suite reach it.
    let body = http_get("127.0.0.1", HOST_PORT, "/blob")?;
    let hex = format!("{:x}", sha2::Sha256::digest(&body));
    ensure!(
        want.starts_with(&hex),
        "hostPort gave {hex}, the pod has {want}"
    );
    // The pod to a server on L1 (the bridge's gateway address).
    let port = serve_on_l1("hello from L1")?;
    let got = run(
        &mut c,
        &a_main,
        &[
            "busybox",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://10.77.0.1:{port}/"),
        ],
    )
    .await?;
    ensure!(got == "hello from L1", "{got:?}");
    // kubelet's DNS config in the container.
    let resolv = run(&mut c, &a_main, &["cat", "/etc/resolv.conf"]).await?;
    ensure!(
        resolv.contains("nameserver 10.96.0.10")
            && resolv.contains("search default.svc.cluster.local")
            && resolv.contains("options ndots:5"),
        "{resolv}"
    );
    let before = network_traces(daemon);
    ensure!(
        before.iter().filter(|t| t.starts_with("netns ")).count() == 2,
        "two namespaces expected: {before:#?}"
    );
    remove_all(&mut c, &[a, b]).await?;
    ensure_no_network_traces(daemon)
}

async fn changes(daemon: &mut Daemon) -> anyhow::Result<()> {
    let mut c = daemon.runtime().await?;
    // No configuration: not ready, and pods are refused with the reason.
    let condition = network_ready(&mut c).await?;
    ensure!(
        !condition.status && condition.reason == "NetworkPluginNotReady",
        "{condition:?}"
    );
    let (code, message) = code_of(run_pod(&mut c, pod_config("early", &daemon.log_dir())).await);
    ensure!(
        code == tonic::Code::FailedPrecondition && message.contains("no valid CNI network"),
        "{code:?} {message}"
    );
    ensure_no_network_traces(daemon)?;

    // A ptp configuration appears: used without a restart.
    let ipam = daemon.dir.path().join("ipam");
    let ptp = format!(
        r#"{{"cniVersion": "0.4.0", "name": "frakti-ptp", "plugins": [
            {{"type": "ptp", "ipMasq": false,
              "ipam": {{"type": "host-local", "subnet": "10.78.0.0/24",
                       "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{}"}}}}]}}"#,
        ipam.display()
    );
    install_config(daemon, "10-ptp.conflist", &ptp)?;
    wait_network_ready(&mut c).await?;
    let (p1, p1_main) = pod_with(&mut c, daemon, "p1", &["sleep", "1000"]).await?;
    let ip = pod_ips(&mut c, &p1).await?.remove(0);
    ensure!(ip.starts_with("10.78.0."), "ptp pod IP {ip}");
    // ptp's link route to its gateway came along: the gateway answers.
    run(
        &mut c,
        &p1_main,
        &["busybox", "ping", "-c", "1", "-W", "5", "10.78.0.1"],
    )
    .await?;

    // Then a dual-stack bridge: the next pod gets an IPv4 and an IPv6.
    install_config(
        daemon,
        "10-dual.conflist",
        &bridge_config(
            "frakti-dual",
            "fbr1",
            r#"[[{"subnet": "10.79.0.0/24"}], [{"subnet": "fd00:79::/64"}]]"#,
            &ipam,
        ),
    )?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    wait_network_ready(&mut c).await?;
    let (p2, p2_main) = pod_with(&mut c, daemon, "p2", &["sleep", "1000"]).await?;
    let ips = pod_ips(&mut c, &p2).await?;
    ensure!(
        ips.len() == 2 && ips[0].starts_with("10.79.0.") && ips[1].starts_with("fd00:79::"),
        "dual-stack pod IPs {ips:?}"
    );
    let addr = run(&mut c, &p2_main, &["busybox", "ip", "addr", "show", "eth0"]).await?;
    ensure!(addr.contains(&format!("inet6 {}/64", ips[1])), "{addr}");
    // The first pod keeps its ptp network; both go without leaving traces.
    remove_all(&mut c, &[p1, p2]).await?;
    ensure_no_network_traces(daemon)
}

/// Writes an executable fake plugin into the daemon's plugin dir.
fn fake_plugin(daemon: &Daemon, name: &str, body: &str) -> anyhow::Result<()> {
    let dir = daemon.dir.path().join("cni-bin");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

async fn bad_plugins(daemon: &mut Daemon) -> anyhow::Result<()> {
    let mut c = daemon.runtime().await?;
    let ipam = daemon.dir.path().join("ipam");
    // After a working bridge, a failing plugin: the bridge's ADD is undone.
    fake_plugin(
        daemon,
        "refuser",
        r#"cat >/dev/null; [ "$CNI_COMMAND" = DEL ] && exit 0
echo '{"cniVersion":"1.0.0","code":11,"msg":"no more addresses","details":"pool exhausted"}'; exit 1"#,
    )?;
    fake_plugin(
        daemon,
        "sleeper",
        "cat >/dev/null; [ \"$CNI_COMMAND\" = DEL ] && exit 0; sleep 60",
    )?;
    fake_plugin(daemon, "garbler", "cat >/dev/null; echo 'this is not JSON'")?;
    fake_plugin(
        daemon,
        "noaddr",
        r#"cat >/dev/null; echo '{"cniVersion":"1.0.0"}'"#,
    )?;
    let with_bridge = |second: &str| {
        format!(
            r#"{{"cniVersion": "1.0.0", "name": "frakti-bad", "plugins": [
                {{"type": "bridge", "bridge": "fbr2", "isGateway": true,
                  "ipam": {{"type": "host-local", "subnet": "10.81.0.0/24", "dataDir": "{}"}}}},
                {{"type": "{second}"}}]}}"#,
            ipam.display()
        )
    };
    let cases = [
        (
            "missing",
            with_bridge("nosuchplugin"),
            "\"nosuchplugin\" not found",
        ),
        (
            "refused",
            with_bridge("refuser"),
            "no more addresses: pool exhausted (code 11)",
        ),
        ("hung", with_bridge("sleeper"), "did not finish within 5 s"),
        (
            "garbled",
            with_bridge("garbler"),
            "returned an invalid result: not JSON",
        ),
        (
            "noaddr",
            r#"{"cniVersion": "1.0.0", "name": "frakti-noaddr", "plugins": [{"type": "noaddr"}]}"#
                .to_string(),
            "eth0",
        ),
    ];
    for (name, config, want) in cases {
        install_config(daemon, &format!("10-{name}.conflist"), &config)?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let (code, message) = code_of(run_pod(&mut c, pod_config(name, &daemon.log_dir())).await);
        eprintln!(
            "network: {name}: {code:?} after {:.1} s: {message}",
            started.elapsed().as_secs_f64()
        );
        ensure!(
            code != tonic::Code::Ok && message.contains(want),
            "{name}: {code:?} {message}"
        );
        ensure_no_network_traces(daemon).with_context(|| format!("after the {name} case"))?;
    }
    Ok(())
}

async fn ten_pods(daemon: &mut Daemon) -> anyhow::Result<()> {
    let ipam = daemon.dir.path().join("ipam");
    install_config(
        daemon,
        "10-bridge.conflist",
        &bridge_config(
            "frakti-ten",
            "fbr3",
            r#"[[{"subnet": "10.82.0.0/24"}]]"#,
            &ipam,
        ),
    )?;
    let c = daemon.runtime().await?;
    wait_network_ready(&mut c.clone()).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut c = c.clone();
        let config = pod_config(&format!("n{i}"), &daemon.log_dir());
        tasks.push(tokio::spawn(async move { run_pod(&mut c, config).await }));
    }
    let mut pods = Vec::new();
    for task in tasks {
        pods.push(task.await??);
    }
    eprintln!(
        "network: ten networked pods up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut ips = Vec::new();
    for pod in &pods {
        ips.push(pod_ips(&mut c.clone(), pod).await?.remove(0));
    }
    ips.sort();
    ips.dedup();
    ensure!(ips.len() == 10, "ten distinct IPs expected: {ips:?}");
    remove_in_parallel(&c, pods).await?;
    ensure_no_network_traces(daemon)
}

/// kill -9 of the daemon with a networked pod: the restarted daemon still
/// knows its IP and runs DEL with what ADD had; a DEL that fails fails
/// StopPodSandbox and is retried by RemovePodSandbox.
async fn restart_and_retry(daemon: &mut Daemon) -> anyhow::Result<()> {
    let marker = daemon.dir.path().join("fail-del");
    fake_plugin(
        daemon,
        "flaky",
        &format!(
            r#"cat >/dev/null
if [ "$CNI_COMMAND" = DEL ] && [ -e {} ]; then
  echo '{{"cniVersion":"1.0.0","code":999,"msg":"flaky DEL","details":"try again"}}'; exit 1
fi
echo '{{"cniVersion":"1.0.0"}}'"#,
            marker.display()
        ),
    )?;
    let ipam = daemon.dir.path().join("ipam");
    install_config(
        daemon,
        "10-flaky.conflist",
        &format!(
            r#"{{"cniVersion": "1.0.0", "name": "frakti-flaky", "plugins": [
                {{"type": "flaky"}},
                {{"type": "bridge", "bridge": "fbr4", "isGateway": true,
                  "ipam": {{"type": "host-local", "subnet": "10.83.0.0/24", "dataDir": "{}"}}}}]}}"#,
            ipam.display()
        ),
    )?;
    let mut c = daemon.runtime().await?;
    wait_network_ready(&mut c).await?;
    let pod = run_pod(&mut c, pod_config("survivor", &daemon.log_dir())).await?;
    let ip = pod_ips(&mut c, &pod).await?.remove(0);
    ensure!(ip.starts_with("10.83.0."), "pod IP {ip}");

    daemon.kill();
    // The configuration changes while the daemon is down: DEL must still
    // get the one ADD ran.
    install_config(
        daemon,
        "10-other.conflist",
        &bridge_config(
            "frakti-other",
            "fbr5",
            r#"[[{"subnet": "10.84.0.0/24"}]]"#,
            &ipam,
        ),
    )?;
    daemon.spawn().await?;
    let mut c = daemon.runtime().await?;
    let after = pod_ips(&mut c, &pod).await?;
    ensure!(
        after == [ip.clone()],
        "after the restart the pod has {after:?}, not {ip}"
    );

    std::fs::write(&marker, "")?;
    let stopped = c
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    let (code, message) = code_of(stopped.map_err(anyhow::Error::from));
    ensure!(
        code == tonic::Code::Unknown && message.contains("flaky DEL: try again"),
        "{code:?} {message}"
    );
    ensure!(
        network_traces(daemon)
            .iter()
            .any(|t| t.starts_with("netns ")),
        "a failed DEL keeps the namespace for its retry"
    );
    std::fs::remove_file(&marker)?;
    c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await?;
    ensure_no_network_traces(daemon)
}
