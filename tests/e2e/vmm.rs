//! frakti-vmm boots our guest: vCPUs and memory as configured, the control
//! API (info, pause/resume, metrics, graceful shutdown), SIGTERM, and a
//! guest kernel panic.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use frakti_lab::guest::{self, GuestAssets};
use frakti_lab::process::{ChildGuard, FileTail, read_log};
use frakti_proto::ready::{READY_MARKER, ReadyLine};
use libtest_mimic::{Failed, Trial};
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

pub fn tests() -> Vec<Trial> {
    let mut tests: Vec<Trial> = [(1, 128), (2, 512)]
        .into_iter()
        .map(|(cpus, mib)| {
            Trial::test(
                format!("vmm::boots_guest_to_agent_{cpus}cpu_{mib}mib"),
                move || boots_guest_to_agent(cpus, mib),
            )
        })
        .collect();
    tests.push(Trial::test(
        "vmm::api_info_pause_resume_metrics_and_graceful_shutdown",
        api_info_pause_resume_metrics_and_graceful_shutdown,
    ));
    tests.push(Trial::test(
        "vmm::sigterm_shuts_the_guest_down_gracefully",
        sigterm_shuts_the_guest_down_gracefully,
    ));
    tests.push(Trial::test(
        "vmm::guest_kernel_panic_exits_non_zero",
        guest_kernel_panic_exits_non_zero,
    ));
    tests.push(Trial::test(
        "vmm::pause_resume_races_the_guests_reset_1000_times",
        pause_resume_races_the_guests_reset_1000_times,
    ));
    tests
}

/// frakti-vmm's tiny-guest test binary (`make e2e` builds it and sets this).
pub const TINY_GUEST_ENV: &str = "FRAKTI_TINY_GUEST_TEST";

/// The API's pause, resume and shutdown racing a guest that resets itself,
/// 1,000 rounds on real KVM: frakti-vmm's own test
/// (`vmm/tests/tiny_guest.rs`, 300 rounds on the host's /dev/kvm in
/// `make unit`) run here.
fn pause_resume_races_the_guests_reset_1000_times() -> Result<(), Failed> {
    let binary = std::env::var_os(TINY_GUEST_ENV)
        .ok_or_else(|| format!("{TINY_GUEST_ENV} is not set: run the suite through `make e2e`"))?;
    let started = Instant::now();
    let out = Command::new(&binary)
        .args([
            "--exact",
            "pause_and_resume_racing_the_guests_reset",
            "--nocapture",
        ])
        .env("FRAKTI_RACE_ROUNDS", "1000")
        .stdin(Stdio::null())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !text.contains("1 passed") || !text.contains("1000 rounds") {
        return Err(format!("{}: {}\n{text}", Path::new(&binary).display(), out.status).into());
    }
    let summary = text
        .lines()
        .find(|l| l.contains("each ended as asked"))
        .unwrap_or_default();
    eprintln!(
        "  on real KVM in {:.1} s: {summary}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A running frakti-vmm with its console in a file.
struct Vmm {
    child: ChildGuard,
    dir: tempfile::TempDir,
    console: PathBuf,
}

impl Vmm {
    fn start(cpus: u32, mib: u32, cmdline: &str, api: bool) -> Result<Vmm, Failed> {
        let assets = GuestAssets::locate()?;
        let dir = tempfile::tempdir()?;
        let console = dir.path().join("console.log");
        let mut command = Command::new(guest::vmm_binary()?);
        command
            .arg("--kernel")
            .arg(&assets.kernel)
            .arg("--initrd")
            .arg(&assets.initrd)
            .args(["--vcpus", &cpus.to_string(), "--memory", &mib.to_string()])
            .args(["--cmdline", cmdline])
            .arg("--serial")
            .arg(&console)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("vmm.log"))?);
        if api {
            command.arg("--api-socket").arg(dir.path().join("api.sock"));
        }
        let child = ChildGuard::spawn(&mut command)?;
        Ok(Vmm {
            child,
            dir,
            console,
        })
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    fn diagnostics(&self) -> String {
        format!(
            "console:\n{}\nvmm log:\n{}",
            frakti_lab::tail_lines(&read_log(&self.console), 20),
            read_log(&self.dir.path().join("vmm.log"))
        )
    }

    fn wait_ready(&mut self) -> Result<ReadyLine, Failed> {
        let mut tail = FileTail::new(&self.console);
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while Instant::now() < deadline {
            for line in tail.new_lines()? {
                if line.contains(READY_MARKER) {
                    return Ok(line.parse()?);
                }
            }
            if let Some(status) = self.child.try_wait()? {
                return Err(
                    format!("VMM exited ({status}) before ready\n{}", self.diagnostics()).into(),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "no ready line within {BOOT_TIMEOUT:?}\n{}",
            self.diagnostics()
        )
        .into())
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, Failed> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "VMM still running after {timeout:?}\n{}",
            self.diagnostics()
        )
        .into())
    }
}

/// One HTTP request on the API socket: (status code, JSON body).
fn api(socket: &Path, method: &str, path: &str, body: &str) -> Result<(u16, Value), Failed> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad HTTP response: {response:?}"))?;
    let json = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or("no HTTP body")?;
    Ok((status, serde_json::from_str(json)?))
}

fn expect(cond: bool, what: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond { Ok(()) } else { Err(what().into()) }
}

fn boots_guest_to_agent(cpus: u32, mib: u32) -> Result<(), Failed> {
    let start = Instant::now();
    let mut vmm = Vmm::start(cpus, mib, "quiet frakti_after_ready=reset", false)?;
    let ready = vmm.wait_ready()?;
    let ready_after = start.elapsed();
    let status = vmm.wait_exit(Duration::from_secs(30))?;
    eprintln!(
        "  {ready} ({:.2} s from VMM start)",
        ready_after.as_secs_f64()
    );
    expect(status.success(), || {
        format!("VMM exit {status}\n{}", vmm.diagnostics())
    })?;
    expect(ready.cpus == cpus, || {
        format!("guest sees {} vCPUs, not {cpus}", ready.cpus)
    })?;
    let given = u64::from(mib) * 1024;
    expect(
        ready.mem_total_kib <= given && ready.mem_total_kib >= given * 3 / 4,
        || format!("MemTotal {} KiB for {mib} MiB", ready.mem_total_kib),
    )
}

fn api_info_pause_resume_metrics_and_graceful_shutdown() -> Result<(), Failed> {
    let mut vmm = Vmm::start(2, 256, "quiet frakti_after_ready=wait", true)?;
    vmm.wait_ready()?;
    let socket = vmm.socket();

    let (code, info) = api(&socket, "GET", "/vm", "")?;
    expect(code == 200 && info["state"] == "running", || {
        format!("{code} {info}")
    })?;
    expect(info["vcpus"] == 2 && info["memory_mib"] == 256, || {
        info.to_string()
    })?;
    // The agent signals boot-done right after its ready line.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut info = info;
    while info["boot_done_ms"].is_null() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        info = api(&socket, "GET", "/vm", "")?.1;
    }
    expect(
        info["boot_done_ms"].as_u64().is_some_and(|ms| ms > 0),
        || info.to_string(),
    )?;

    let (code, metrics) = api(&socket, "GET", "/metrics", "")?;
    expect(code == 200, || metrics.to_string())?;
    expect(metrics["exits"]["io_out"].as_u64() > Some(0), || {
        metrics.to_string()
    })?;
    let vmm_rss = metrics["vmm_rss_kib"].as_u64().unwrap_or(0);
    let rss = metrics["rss_kib"].as_u64().unwrap_or(0);
    expect(vmm_rss > 0 && rss > vmm_rss, || metrics.to_string())?;
    eprintln!(
        "  boot_done_ms={} vmm_rss_kib={vmm_rss} rss_kib={rss}",
        info["boot_done_ms"]
    );

    let (code, paused) = api(&socket, "PUT", "/vm/pause", "")?;
    expect(code == 200 && paused["state"] == "paused", || {
        paused.to_string()
    })?;
    expect(
        api(&socket, "GET", "/vm", "")?.1["state"] == "paused",
        || "not paused".into(),
    )?;
    let (code, resumed) = api(&socket, "PUT", "/vm/resume", "")?;
    expect(code == 200 && resumed["state"] == "running", || {
        resumed.to_string()
    })?;

    let (code, err) = api(&socket, "GET", "/nope", "")?;
    expect(code == 404 && err["error"].is_string(), || err.to_string())?;
    let (code, err) = api(&socket, "PUT", "/vm/shutdown", "{\"timeout_ms\": \"soon\"}")?;
    expect(code == 400, || err.to_string())?;

    let (code, stopping) = api(&socket, "PUT", "/vm/shutdown", "{\"timeout_ms\": 30000}")?;
    expect(code == 202, || stopping.to_string())?;
    let status = vmm.wait_exit(Duration::from_secs(40))?;
    expect(status.success(), || {
        format!("exit {status}\n{}", vmm.diagnostics())
    })?;
    let console = read_log(&vmm.console);
    expect(
        console.contains("frakti-agent: SIGINT: shutting down"),
        || {
            format!(
                "the agent was not asked to shut down\n{}",
                vmm.diagnostics()
            )
        },
    )?;
    expect(!socket.exists(), || "API socket left behind".into())
}

fn sigterm_shuts_the_guest_down_gracefully() -> Result<(), Failed> {
    let mut vmm = Vmm::start(1, 128, "quiet frakti_after_ready=wait", false)?;
    vmm.wait_ready()?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = vmm.wait_exit(Duration::from_secs(30))?;
    expect(status.success(), || {
        format!("exit {status}\n{}", vmm.diagnostics())
    })?;
    expect(read_log(&vmm.console).contains("shutting down"), || {
        format!("no graceful shutdown\n{}", vmm.diagnostics())
    })
}

fn guest_kernel_panic_exits_non_zero() -> Result<(), Failed> {
    // No init the kernel can run: it panics, and panic=-1 resets at once.
    let mut vmm = Vmm::start(1, 128, "rdinit=/nonexistent init=/nonexistent", false)?;
    let status = vmm.wait_exit(BOOT_TIMEOUT)?;
    expect(status.code() == Some(1), || {
        format!("exit {status}\n{}", vmm.diagnostics())
    })?;
    let log = read_log(&vmm.dir.path().join("vmm.log"));
    expect(log.contains("guest kernel panic"), || vmm.diagnostics())
}
