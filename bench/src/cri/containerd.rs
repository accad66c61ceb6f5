//! The baseline: containerd 1.6 with its CRI plugin, runc and CNI, on its
//! own config, root, state and socket; and what the node (L1) needs for it.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail, ensure};
use frakti_lab::process::ChildGuard;

use super::network;
use super::prepare::{self, env_path};
use super::runtime;

/// containerd's CRI namespace.
const NAMESPACE: &str = "k8s.io";

/// Sets the node up for containerd; returns what was done, for the report.
/// In the lab: loads the L1 kernel's modules (overlayfs, bridge, veth),
/// mounts cgroup v2 if nothing is mounted at /sys/fs/cgroup, brings `lo` up
/// and writes an /etc/hosts (containerd copies it into each pod).
pub fn prepare_node(in_lab: bool) -> anyhow::Result<String> {
    if in_lab {
        for (env, _) in prepare::MODULES {
            let Some(module) = std::env::var_os(env) else {
                continue;
            };
            let out = Command::new("insmod").arg(&module).output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            ensure!(
                out.status.success() || err.contains("exists"),
                "insmod {}: {}",
                Path::new(&module).display(),
                err.trim()
            );
        }
        run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
        if !Path::new("/etc/hosts").exists() {
            fs::write("/etc/hosts", "127.0.0.1 localhost\n::1 localhost\n")?;
        }
    }
    let cgroup_fs = |mounts: &str| {
        mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(1) == Some(&"/sys/fs/cgroup"))
            .and_then(|f| f.get(2).map(|t| t.to_string()))
    };
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    Ok(match cgroup_fs(&mounts).as_deref() {
        Some("cgroup2") => "cgroup v2 (as mounted)".to_string(),
        Some(other) => format!("the host's cgroups ({other} at /sys/fs/cgroup)"),
        None if in_lab => {
            run(Command::new("mount").args(["-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"]))?;
            "cgroup v2, mounted at /sys/fs/cgroup by the bench (L1 mounts no cgroups)".to_string()
        }
        None => bail!("nothing is mounted at /sys/fs/cgroup: runc needs cgroups"),
    })
}

pub struct Containerd {
    dir: PathBuf,
    pub socket: PathBuf,
    daemon: ChildGuard,
}

impl Containerd {
    /// Starts containerd with its CRI plugin under `dir` and imports the
    /// images into its CRI namespace.
    pub async fn start(dir: &Path) -> anyhow::Result<Containerd> {
        let bin = dir.join("bin");
        let cni_bin = dir.join("cni-bin");
        let cni_conf = dir.join("cni-conf");
        for d in [&bin, &cni_conf, &dir.join("logs")] {
            fs::create_dir_all(d)?;
        }
        // Under their own names: containerd looks the shim up on PATH.
        symlink(
            env_path(prepare::SHIM_ENV)?,
            bin.join("containerd-shim-runc-v2"),
        )?;
        symlink(env_path(prepare::RUNC_ENV)?, bin.join("runc"))?;
        network::link_plugins(&cni_bin)?;
        // containerd adds loopback itself.
        fs::write(
            cni_conf.join("10-bench.conflist"),
            network::bridge_config(&dir.join("cni-ipam"), network::CONTAINERD_RANGE),
        )?;
        let config = dir.join("config.toml");
        fs::write(&config, containerd_config(dir)?)?;

        let socket = dir.join("containerd.sock");
        let log = dir.join("containerd.log");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let mut command = Command::new(env_path(prepare::CONTAINERD_ENV)?);
        command
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        let mut daemon = ChildGuard::spawn(&mut command).context("starting containerd")?;
        runtime::wait_until_serving(&mut daemon, &socket, &log).await?;
        let containerd = Containerd {
            dir: dir.to_path_buf(),
            socket,
            daemon,
        };
        for (env, base) in [
            (prepare::PAUSE_OCI_ENV, prepare::PAUSE_BASE),
            (prepare::BUSYBOX_OCI_ENV, prepare::IMAGE_BASE),
            (prepare::BLOCKIO_OCI_ENV, prepare::BLOCKIO_BASE),
        ] {
            run(containerd
                .ctr()
                .args(["images", "import", "--base-name", base])
                .arg(env_path(env)?))?;
        }
        let listed = run(containerd.ctr().args(["images", "ls", "-q"]))?;
        for image in [prepare::PAUSE_IMAGE, prepare::IMAGE, prepare::BLOCKIO_IMAGE] {
            ensure!(
                listed.lines().any(|l| l == image),
                "containerd lacks {image} after import: {listed:?}"
            );
        }
        Ok(containerd)
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new(env_path(prepare::CTR_ENV).unwrap_or_else(|_| "ctr".into()));
        c.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE]);
        c
    }

    pub fn pid(&self) -> u32 {
        self.daemon.id()
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        // Shims outlive containerd (and hold the pods' processes): the
        // ones started for this root name its socket.
        runtime::kill_processes_naming(&self.dir);
        frakti_bench::unmount_under(&self.dir);
    }
}

/// "containerd 1.6.20~ds1 + runc 1.1.5+ds1".
pub fn versions() -> String {
    let version = |env: &str, word: usize| {
        env_path(env)
            .ok()
            .and_then(|p| Command::new(p).arg("--version").output().ok())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .and_then(|s| s.split_whitespace().nth(word).map(str::to_string))
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "containerd {} + runc {}",
        version(prepare::CONTAINERD_ENV, 2),
        version(prepare::RUNC_ENV, 2)
    )
}

/// containerd's config: everything under `dir`; the CRI plugin with the
/// overlayfs snapshotter, runc (cgroupfs driver) and our pause image; the
/// plugins that fail or touch the host are off.
fn containerd_config(dir: &Path) -> anyhow::Result<String> {
    let q = |p: PathBuf| serde_json::to_string(&p.display().to_string());
    Ok(format!(
        r#"version = 2
root = {root}
state = {state}
oom_score = 0
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = {socket}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = {runc}
        SystemdCgroup = false
        NoPivotRoot = {no_pivot}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {cni_bin}
    conf_dir = {cni_conf}
"#,
        root = q(dir.join("root"))?,
        state = q(dir.join("state"))?,
        socket = q(dir.join("containerd.sock"))?,
        pause = prepare::PAUSE_IMAGE,
        runc = q(dir.join("bin/runc"))?,
        cni_bin = q(dir.join("cni-bin"))?,
        cni_conf = q(dir.join("cni-conf"))?,
        no_pivot = root_is_initramfs(),
    ))
}

/// Whether `/` is the initial ramfs (L1's): pivot_root(2) refuses it, so
/// runc must move the container's root and chroot instead (`NoPivotRoot`).
pub fn root_is_initramfs() -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/") && matches!(f.get(2), Some(&"rootfs") | Some(&"ramfs"))
    })
}

/// Runs `cmd`; its stdout, or an error with its output.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let describe = crate::support::describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {describe}"))?;
    if !out.status.success() {
        bail!(
            "{describe} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
