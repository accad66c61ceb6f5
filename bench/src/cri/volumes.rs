//! Block I/O on a volume (issue 16): the price of the VM for a pod's block
//! storage. Each runtime gets the same kind of device — a loop device in L1
//! over a sparse file, ext4 on it — used the way each delivers volumes:
//! frakti as a direct-assigned volume (`frakti volume add`, a virtio-blk
//! disk of the pod's VM, mounted by the guest), containerd + runc with the
//! filesystem mounted on the node and bind-mounted into the container.
//! `frakti-guest-tool blockio` (O_DIRECT, timed inside the container, so
//! the exec's own cost does not count) runs sequential 1 MiB writes and
//! reads, then random 4 KiB writes and reads, on one file of the volume.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use k8s_cri::v1 as cri;

use super::Target;
use super::network::{exec, outcome};
use super::prepare::{self, env_path};
use super::runtime::{self, Client, Pod};
use crate::support::loopdev::LoopDevice;

/// The runs, in order: (mode, block size); the sequential ones move
/// `--io-mib`, the random ones `--io-rand-ops` blocks.
pub const MODES: [(&str, usize); 4] = [
    ("seq-write", 1 << 20),
    ("seq-read", 1 << 20),
    ("rand-write", 4096),
    ("rand-read", 4096),
];
/// The volume's size.
const VOLUME_MIB: u64 = 256;
const FILE: &str = "/data/blockio";

/// Per mode, one figure per run: MiB/s for the sequential modes, IOPS for
/// the random ones.
pub struct Measured {
    pub rates: Vec<Vec<f64>>,
}

/// A fresh `VOLUME_MIB` loop device over `file` with an empty ext4; the
/// file goes when the device does.
struct Volume(LoopDevice);

impl Volume {
    fn new(file: PathBuf) -> anyhow::Result<Volume> {
        let device = LoopDevice::new(&file, VOLUME_MIB)?;
        let mke2fs =
            std::env::var_os(frakti_lab::guest::MKE2FS_ENV).unwrap_or_else(|| "mke2fs".into());
        device.mkfs_ext4(&mke2fs)?;
        Ok(Volume(device))
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0.file);
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// How the runtime under test gets the device to its container.
pub enum Delivery<'a> {
    /// `frakti volume add` against the daemon's root.
    Direct { root: &'a Path },
    /// Mounted on the node, bind-mounted in.
    HostMount,
}

/// The device delivered at `path` (a kubelet-like volume path); undone by
/// [`withdraw`].
fn deliver(delivery: &Delivery<'_>, volume: &Volume, path: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(path)?;
    match delivery {
        Delivery::Direct { root } => run(Command::new(env_path(prepare::FRAKTI_ENV)?)
            .args(["volume", "--root"])
            .arg(root)
            .args(["add", "--path"])
            .arg(path)
            .arg("--device")
            .arg(&volume.0.device)
            .args(["--fstype", "ext4"])),
        Delivery::HostMount => run(Command::new("mount").arg(&volume.0.device).arg(path)),
    }
}

fn withdraw(delivery: &Delivery<'_>, path: &Path) -> anyhow::Result<()> {
    match delivery {
        Delivery::Direct { root } => run(Command::new(env_path(prepare::FRAKTI_ENV)?)
            .args(["volume", "--root"])
            .arg(root)
            .args(["remove", "--path"])
            .arg(path)),
        Delivery::HostMount => run(Command::new("umount").arg(path)),
    }
}

/// The `io` container: the blockio image, the volume at /data.
async fn start_io_container(
    client: &mut Client,
    pod: &Pod,
    logs: &Path,
    volume_path: &Path,
) -> anyhow::Result<String> {
    let mut config = runtime::container_config("io", prepare::BLOCKIO_IMAGE, &["sleep", "3600"]);
    config.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: volume_path.display().to_string(),
        ..Default::default()
    }];
    runtime::add_container(client, pod, "blockio", logs, config).await
}

/// One `blockio` run; MiB/s (sequential) or IOPS (random).
async fn blockio(
    client: &mut Client,
    container: &str,
    (mode, block): (&str, usize),
    bytes: u64,
) -> anyhow::Result<f64> {
    let (block_text, bytes_text) = (block.to_string(), bytes.to_string());
    let cmd = [
        "/bin/frakti-guest-tool",
        "blockio",
        FILE,
        mode,
        &block_text,
        &bytes_text,
    ];
    let (out, _) = exec(client, container, &cmd, 600).await?;
    ensure!(out.exit_code == 0, "blockio {mode}: {}", outcome(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("blockio {mode} printed {}", outcome(&out)))?;
    let secs = report["secs"].as_f64().unwrap_or(0.0);
    let ops = report["ops"].as_u64().unwrap_or(0);
    if secs <= 0.0 || report["bytes"].as_u64() != Some(bytes) {
        bail!("blockio {mode}: implausible report {report}");
    }
    Ok(if mode.starts_with("seq") {
        bytes as f64 / (1024.0 * 1024.0) / secs
    } else {
        ops as f64 / secs
    })
}

/// `runs` rounds of [`MODES`] in one pod of `target` whose container has a
/// fresh volume delivered as `delivery`; everything is removed afterwards.
async fn measure(
    target: &mut Target,
    delivery: Delivery<'_>,
    work: &Path,
    (file_mib, rand_ops, runs): (u64, u64, usize),
) -> anyhow::Result<Measured> {
    let slug: String = target
        .name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let volume = Volume::new(work.join(format!("{slug}-volume.img")))?;
    let path = work.join(format!("{slug}-volume"));
    deliver(&delivery, &volume, &path)?;
    let pod = match target.start("blockio").await {
        Ok(pod) => pod,
        Err(e) => {
            let _ = withdraw(&delivery, &path);
            return Err(e);
        }
    };
    let measured = async {
        let io = start_io_container(&mut target.client, &pod, &target.logs, &path).await?;
        let mut rates = vec![Vec::new(); MODES.len()];
        for _ in 0..runs {
            for (i, mode) in MODES.iter().enumerate() {
                let bytes = if mode.0.starts_with("seq") {
                    file_mib << 20
                } else {
                    rand_ops * mode.1 as u64
                };
                rates[i].push(blockio(&mut target.client, &io, *mode, bytes).await?);
            }
        }
        anyhow::Ok(Measured { rates })
    }
    .await;
    let removed = runtime::remove_pod(&mut target.client, &pod).await;
    let withdrawn = withdraw(&delivery, &path);
    let measured = measured.map_err(|e| target.failed(e))?;
    removed?;
    withdrawn?;
    Ok(measured)
}

/// frakti's pod gets a direct volume (against the daemon's `root`),
/// containerd's a host mount; `io` is (MiB, random ops, runs).
pub async fn part(
    targets: &mut [Target; 2],
    root: &Path,
    work: &Path,
    io: (u64, u64, usize),
) -> anyhow::Result<()> {
    for w in super::order(0) {
        let delivery = if w == 0 {
            Delivery::Direct { root }
        } else {
            Delivery::HostMount
        };
        let target = &mut targets[w];
        let measured = measure(target, delivery, work, io).await?;
        eprintln!(
            "bench: {} block volume: {}",
            target.name,
            MODES
                .iter()
                .zip(&measured.rates)
                .map(|((mode, _), rates)| format!("{mode} {:.1}", super::percentile(rates, 50.0)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        target.volumes = Some(measured);
    }
    Ok(())
}

/// The table: medians per mode for both runtimes and their ratio.
pub fn report(
    frakti: &Measured,
    containerd: &Measured,
    (file_mib, rand_ops, runs): (u64, u64, usize),
) {
    println!();
    println!(
        "  block volume I/O (ext4 on an L1 loop device; frakti: direct volume, a virtio-blk disk \
         of the pod's VM; containerd: mounted on the node, bind-mounted into the runc container); \
         O_DIRECT, timed inside the container, medians of {runs} runs; sequential {file_mib} MiB \
         in 1 MiB blocks, random {rand_ops} x 4 KiB over that file"
    );
    println!(
        "  {:<28} {:>10} {:>13} {:>18}",
        "", "frakti", "containerd", "frakti/containerd"
    );
    for (i, (mode, _)) in MODES.iter().enumerate() {
        let unit = if mode.starts_with("seq") {
            "MiB/s"
        } else {
            "IOPS"
        };
        let (a, b) = (
            super::percentile(&frakti.rates[i], 50.0),
            super::percentile(&containerd.rates[i], 50.0),
        );
        println!(
            "  {:<28} {a:>10.1} {b:>13.1} {:>17.2}x",
            format!("{mode} ({unit})"),
            a / b
        );
    }
    println!("  (higher is better: a ratio below 1 is what the VM costs)");
}
