//! The `frakti` CLI as a user drives it, against a real daemon and real
//! VMs: exit codes, stdout/stderr separation, piped stdin, -d with logs,
//! exec, stop and rm, signals, JSON output, one-line errors, and a real
//! pseudo-terminal for -it (raw mode, resize, Ctrl-C, the terminal given
//! back as it was).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use libtest_mimic::Trial;
use nix::pty::{Winsize, openpty};
use nix::sys::termios::{LocalFlags, tcgetattr};
use tokio::process::Command;

use super::harness::*;

pub fn tests() -> Vec<Trial> {
    vec![Trial::test(
        "cri::the_cli_runs_containers_like_docker",
        || with_daemon(&["--kernels-dir", "{dir}/kernels"], cli),
    )]
}

async fn cli(daemon: &mut Daemon) -> anyhow::Result<()> {
    let started = Instant::now();
    exit_codes_and_streams(daemon).await?;
    detached_lifecycle(daemon).await?;
    signals_and_errors(daemon).await?;
    terminal(daemon).await?;
    kernel_and_volume_device(daemon).await?;
    ensure!(
        frakti(daemon, &["ps", "-a", "-q"]).await?.stdout.is_empty(),
        "containers left"
    );
    ensure_no_leaks(daemon)?;
    eprintln!(
        "cli: all checks in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn command(daemon: &Daemon, args: &[&str]) -> anyhow::Result<Command> {
    let bin = std::env::var_os(FRAKTI_ENV).context("FRAKTI_BIN is not set")?;
    let mut command = Command::new(bin);
    command
        .arg("--endpoint")
        .arg(daemon.socket())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Ok(command)
}

async fn frakti(daemon: &Daemon, args: &[&str]) -> anyhow::Result<Output> {
    let output = tokio::time::timeout(Duration::from_secs(120), command(daemon, args)?.output())
        .await
        .with_context(|| format!("frakti {args:?} still ran after 120 s"))??;
    Ok(output)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The exit code and both streams, for messages.
fn describe(output: &Output) -> String {
    format!(
        "{:?}, stdout {:?}, stderr {:?}",
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    )
}

async fn exit_codes_and_streams(daemon: &Daemon) -> anyhow::Result<()> {
    let out = frakti(
        daemon,
        &[
            "run",
            "--rm",
            IMAGE,
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
    )
    .await?;
    ensure!(
        out.status.code() == Some(3) && out.stdout == b"out\n" && out.stderr == b"err\n",
        "run's exit code and streams: {}",
        describe(&out)
    );
    // Piped stdin reaches the container; its end ends cat.
    let mut child = command(daemon, &["run", "-i", "--rm", IMAGE, "cat"])?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"hi\nthere\n").await?;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await??;
    ensure!(
        out.status.success() && out.stdout == b"hi\nthere\n",
        "echo hi | frakti run -i cat: {}",
        describe(&out)
    );
    Ok(())
}

async fn detached_lifecycle(daemon: &Daemon) -> anyhow::Result<()> {
    let script = "echo started; trap 'echo bye; exit 0' TERM; while :; do sleep 1; done";
    let out = frakti(
        daemon,
        &[
            "run",
            "-d",
            "--name",
            "web",
            "-e",
            "GREETING=hello",
            IMAGE,
            "sh",
            "-c",
            script,
        ],
    )
    .await?;
    let id = text(&out.stdout).trim().to_string();
    ensure!(
        out.status.success() && id.len() == 64,
        "run -d prints the id: {}",
        describe(&out)
    );
    let ps = frakti(daemon, &["ps", "--format", "json"]).await?;
    let list: serde_json::Value = serde_json::from_slice(&ps.stdout)
        .with_context(|| format!("ps --format json: {}", describe(&ps)))?;
    ensure!(
        list.as_array().is_some_and(|l| l.len() == 1)
            && list[0]["name"] == "web"
            && list[0]["state"] == "running"
            && list[0]["command"][0] == "sh",
        "ps: {list}"
    );
    let table = text(&frakti(daemon, &["ps"]).await?.stdout);
    ensure!(
        table.starts_with("CONTAINER ID") && table.contains(&id[..12]) && table.contains("web"),
        "ps table: {table}"
    );
    wait_for_log(daemon, "web", "started").await?;
    let out = frakti(
        daemon,
        &["exec", "web", "sh", "-c", "echo $GREETING; exit 7"],
    )
    .await?;
    ensure!(
        out.status.code() == Some(7) && out.stdout == b"hello\n",
        "exec: {}",
        describe(&out)
    );
    // By a unique id prefix, as docker takes it.
    let out = frakti(daemon, &["exec", &id[..8], "true"]).await?;
    ensure!(out.status.success(), "exec by prefix: {}", describe(&out));
    let inspect = frakti(daemon, &["inspect", "web"]).await?;
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout)?;
    ensure!(
        inspect["id"] == id.as_str() && inspect["pod"]["frakti"] == true,
        "inspect: {inspect}"
    );
    let out = frakti(daemon, &["rm", "web"]).await?;
    ensure!(
        !out.status.success() && text(&out.stderr).contains("is running"),
        "rm of a running container: {}",
        describe(&out)
    );
    let stats = frakti(daemon, &["stats", "--no-stream", "--format", "json"]).await?;
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout)
        .with_context(|| format!("stats: {}", describe(&stats)))?;
    ensure!(
        stats[0]["name"] == "web" && stats[0]["memoryWorkingSetBytes"].as_u64() > Some(0),
        "stats --no-stream: {stats}"
    );
    // `logs -f` follows until the container exits.
    let follower = command(daemon, &["logs", "-f", "web"])?
        .stdout(Stdio::piped())
        .spawn()?;
    let out = frakti(daemon, &["stop", "web"]).await?;
    ensure!(out.status.success(), "stop: {}", describe(&out));
    let followed = tokio::time::timeout(Duration::from_secs(60), follower.wait_with_output())
        .await
        .context("logs -f did not end with the container")??;
    ensure!(
        followed.status.success() && text(&followed.stdout) == "started\nbye\n",
        "logs -f: {}",
        describe(&followed)
    );
    let logs = frakti(daemon, &["logs", "--timestamps", "--tail", "1", "web"]).await?;
    let last = text(&logs.stdout);
    ensure!(
        last.lines().count() == 1 && last.trim_end().ends_with(" bye") && last.starts_with("20"),
        "logs --timestamps --tail 1 after stop: {}",
        describe(&logs)
    );
    let ps = text(&frakti(daemon, &["ps", "-a"]).await?.stdout);
    ensure!(ps.contains("exited (0)"), "ps -a after stop: {ps}");
    let out = frakti(daemon, &["rm", "web"]).await?;
    ensure!(out.status.success(), "rm: {}", describe(&out));
    let pods = frakti(daemon, &["ps", "--pods", "-q"]).await?;
    ensure!(pods.stdout.is_empty(), "pods left: {}", describe(&pods));

    // rm -f takes a running container (and its VM) at once.
    let out = frakti(
        daemon,
        &["run", "-d", "--name", "victim", IMAGE, "sleep", "1000"],
    )
    .await?;
    ensure!(out.status.success(), "run -d: {}", describe(&out));
    let out = frakti(daemon, &["rm", "-f", "victim"]).await?;
    ensure!(out.status.success(), "rm -f: {}", describe(&out));
    let pods = frakti(daemon, &["ps", "--pods", "-q"]).await?;
    ensure!(
        pods.stdout.is_empty(),
        "rm -f left pods: {}",
        describe(&pods)
    );
    let out = frakti(daemon, &["completion", "bash"]).await?;
    ensure!(
        out.status.success() && text(&out.stdout).contains("_frakti()"),
        "completion bash: {}",
        describe(&out)
    );
    Ok(())
}

/// `logs -f` until `needle` shows up.
async fn wait_for_log(daemon: &Daemon, container: &str, needle: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = frakti(daemon, &["logs", container]).await?;
        if text(&out.stdout).contains(needle) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "no {needle:?} in the logs of {container}: {}",
            describe(&out)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn signals_and_errors(daemon: &Daemon) -> anyhow::Result<()> {
    // Ctrl-C (SIGINT to frakti) reaches the container; --rm cleans up.
    let script = "trap 'echo got-INT; exit 130' INT; echo ready; while :; do sleep 1; done";
    let mut child = command(daemon, &["run", "--rm", IMAGE, "sh", "-c", script])?
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !text(&seen).contains("ready") {
        ensure!(
            Instant::now() < deadline,
            "no 'ready' from the container: {seen:?}"
        );
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::io::AsyncReadExt::read(&mut stdout, &mut buf),
        )
        .await??;
        ensure!(n > 0, "frakti run ended early: {}", text(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let pid = child.id().context("pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGINT,
    )?;
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stdout, &mut rest).await?;
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
    ensure!(
        status.code() == Some(130) && text(&rest).contains("got-INT"),
        "Ctrl-C: {:?}, output {:?}",
        status.code(),
        text(&rest)
    );
    let pods = frakti(daemon, &["ps", "--pods", "-q"]).await?;
    ensure!(
        pods.stdout.is_empty(),
        "--rm after Ctrl-C left pods: {}",
        describe(&pods)
    );

    // Bad input: one line on stderr, a non-zero exit.
    for (args, code, start) in [
        (
            vec!["logs", "nosuch"],
            1,
            "frakti: error: no such container: nosuch",
        ),
        (
            vec!["run", "--memory", "lots", IMAGE],
            125,
            "frakti: error: --memory lots",
        ),
        (
            vec!["run", "--bogus", IMAGE],
            2,
            "frakti: error: unexpected argument '--bogus'",
        ),
        (
            vec!["stop", "nosuch"],
            1,
            "frakti: error: nosuch: no such container",
        ),
        (
            vec!["run", "--rm", "-d", IMAGE],
            125,
            "frakti: error: --rm with -d",
        ),
    ] {
        let out = frakti(daemon, &args).await?;
        let stderr = text(&out.stderr);
        ensure!(
            out.status.code() == Some(code) && stderr.starts_with(start),
            "frakti {args:?}: {}",
            describe(&out)
        );
        // `stop` reports each failed id, then the summary: one line each.
        ensure!(
            stderr.lines().all(|l| l.starts_with("frakti: error: ")),
            "frakti {args:?}: {stderr:?}"
        );
    }
    Ok(())
}

/// A pseudo-terminal whose slave is frakti's stdin, stdout and stderr
/// (and controlling terminal, so that a resize sends it SIGWINCH).
struct Pty {
    master: OwnedFd,
    seen: Vec<u8>,
}

impl Pty {
    fn spawn(daemon: &Daemon, args: &[&str]) -> anyhow::Result<(Pty, tokio::process::Child)> {
        let size = Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&size), None)?;
        let slave = pty.slave;
        let mut command = command(daemon, args)?;
        command
            .stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        // SAFETY: between fork and exec the child calls only setsid and
        // ioctl, which are async-signal-safe, and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        Ok((
            Pty {
                master: pty.master,
                seen: Vec::new(),
            },
            child,
        ))
    }

    fn write(&self, bytes: &[u8]) -> anyhow::Result<()> {
        nix::unistd::write(&self.master, bytes)?;
        Ok(())
    }

    /// Reads until `needle` has appeared after what was read so far.
    fn expect(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let from = self.seen.len();
        let deadline = Instant::now() + timeout;
        while !text(&self.seen[from..]).contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "no {needle:?} on the terminal; it shows {:?}",
                text(&self.seen[from..])
            );
            let mut fds = [nix::poll::PollFd::new(
                self.master.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let wait = nix::poll::PollTimeout::try_from(left.min(Duration::from_millis(500)))
                .unwrap_or(nix::poll::PollTimeout::MAX);
            if nix::poll::poll(&mut fds, wait)? == 0 {
                continue;
            }
            let mut buf = [0u8; 1024];
            match nix::unistd::read(&self.master, &mut buf) {
                Ok(0) | Err(nix::errno::Errno::EIO) => {
                    anyhow::bail!(
                        "the terminal closed before {needle:?}: {:?}",
                        text(&self.seen[from..])
                    )
                }
                Ok(n) => self.seen.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn resize(&self, rows: u16, cols: u16) -> anyhow::Result<()> {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is
        // valid for the call; the master fd is open.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        ensure!(rc == 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// Whether the terminal is back in cooked mode (echo, line editing).
    fn cooked(&self) -> anyhow::Result<bool> {
        let flags = tcgetattr(&self.master)?.local_flags;
        Ok(flags.contains(LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG))
    }
}

async fn terminal(daemon: &Daemon) -> anyhow::Result<()> {
    let (mut pty, mut child) = Pty::spawn(daemon, &["run", "-it", "--rm", IMAGE, "sh"])?;
    let long = Duration::from_secs(90);
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        pty.expect("# ", long)?;
        ensure!(
            !pty.cooked()?,
            "the terminal is not raw while the container runs"
        );
        pty.write(b"busybox stty size\r")?;
        pty.expect("24 80", long)?;
        pty.resize(30, 100)?;
        std::thread::sleep(Duration::from_millis(500));
        pty.write(b"busybox stty size\r")?;
        pty.expect("30 100", long)?;
        pty.write(b"exit 5\r")?;
        Ok(())
    })?;
    let status = tokio::time::timeout(long, child.wait()).await??;
    ensure!(status.code() == Some(5), "-it exit code: {status}");
    ensure!(
        pty.cooked()?,
        "the terminal was not given back in cooked mode"
    );

    // Ctrl-C on the terminal goes to the container's terminal.
    let script = "trap 'echo got-INT; exit 130' INT; echo ready; while :; do sleep 1; done";
    let (mut pty, mut child) =
        Pty::spawn(daemon, &["run", "-it", "--rm", IMAGE, "sh", "-c", script])?;
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        pty.expect("ready", long)?;
        pty.write(b"\x03")?;
        pty.expect("got-INT", long)
    })?;
    let status = tokio::time::timeout(long, child.wait()).await??;
    ensure!(status.code() == Some(130), "Ctrl-C on -it: {status}");
    let pods = frakti(daemon, &["ps", "--pods", "-q"]).await?;
    ensure!(
        pods.stdout.is_empty(),
        "--rm after -it left pods: {}",
        describe(&pods)
    );
    Ok(())
}

/// `--kernel NAME` boots a kernel of the daemon's --kernels-dir (and only
/// one of those); `--volume-device` puts a block device's filesystem into
/// the container through the VM, and `--rm` unregisters it.
async fn kernel_and_volume_device(daemon: &Daemon) -> anyhow::Result<()> {
    let kernels = daemon.dir.path().join("kernels");
    std::fs::create_dir_all(&kernels)?;
    let kernel = std::env::var_os(frakti_lab::guest::KERNEL_ENV).context("no guest kernel")?;
    std::fs::copy(&kernel, kernels.join("alt"))?;
    let disk = super::devices::loop_device(daemon.dir.path(), "vol.img", 32)?;
    super::devices::mkfs_ext4(&disk)?;
    let root = daemon.root();
    let root = root.to_string_lossy();
    let volume = format!("{}:/data", disk.device.display());
    let script = "echo kept > /data/f && cat /data/f && grep ' /data ' /proc/mounts";
    let out = frakti(
        daemon,
        &[
            "run",
            "--rm",
            "--kernel",
            "alt",
            "--root",
            &root,
            "--volume-device",
            &volume,
            IMAGE,
            "sh",
            "-c",
            script,
        ],
    )
    .await?;
    let stdout = text(&out.stdout);
    ensure!(
        out.status.success() && stdout.starts_with("kept\n") && stdout.contains(" /data ext4 "),
        "run --kernel --volume-device: {}",
        describe(&out)
    );
    let log = std::fs::read_to_string(daemon.dir.path().join("daemon.log"))?;
    ensure!(
        log.contains(&format!("kernel={}", kernels.join("alt").display())),
        "the VM did not boot the chosen kernel:\n{}",
        daemon.log()
    );
    let registered = frakti(
        daemon,
        &["volume", "--root", &root, "ls", "--format", "json"],
    )
    .await?;
    ensure!(
        text(&registered.stdout).trim() == "[]",
        "--rm left the device registered: {}",
        describe(&registered)
    );
    for (kernel, why) in [("../alt", "no path"), ("missing", "no such kernel")] {
        let out = frakti(daemon, &["run", "--rm", "--kernel", kernel, IMAGE, "true"]).await?;
        ensure!(
            out.status.code() == Some(125) && text(&out.stderr).contains(why),
            "--kernel {kernel}: {}",
            describe(&out)
        );
    }
    Ok(())
}
