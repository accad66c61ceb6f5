//! Raw block volumes (issue 16) as kubelet sends them, CRI `devices`: a
//! loop device of L1 goes into a pod's VM as its own disk; what a container
//! writes with dd is on the device once the pod is gone and a second pod
//! reads it; without `w` a write fails; a device held by another pod, one
//! mounted on L1 and a missing one are refused and leave no slot taken.
//! Direct-assigned filesystem volumes registered with `frakti volume add`
//! are mounted inside the VM, shared by a pod's containers, kept across
//! pods and a daemon crash, read-only where asked, and left clean (e2fsck).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
use k8s_cri::v1 as cri;
use libtest_mimic::Trial;

use super::harness::*;
use crate::support::loopdev::LoopDevice;

/// examples/csi-loop-volume.sh, docs/volumes.md's CSI driver example: the
/// direct volume test publishes, measures and unpublishes through it.
pub const CSI_EXAMPLE_ENV: &str = "FRAKTI_CSI_EXAMPLE";

/// The script: where the lab put it (inside L1), else the repository's.
pub fn csi_example_script() -> PathBuf {
    std::env::var_os(CSI_EXAMPLE_ENV).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/csi-loop-volume.sh"),
        PathBuf::from,
    )
}

pub fn tests() -> Vec<Trial> {
    vec![
        Trial::test("devices::raw_block_volumes_go_into_the_vm", || {
            with_daemon(&[], raw_block)
        }),
        Trial::test("devices::direct_volumes_are_mounted_in_the_vm", || {
            with_daemon(&[], direct_volume)
        }),
    ]
}

/// A loop device over a sparse `mib` MiB file `dir/name`.
pub fn loop_device(dir: &Path, name: &str, mib: u64) -> anyhow::Result<LoopDevice> {
    Ok(LoopDevice::new(&dir.join(name), mib)?)
}

/// An empty ext4 filesystem on `disk` (the lab's mke2fs).
pub fn mkfs_ext4(disk: &LoopDevice) -> anyhow::Result<()> {
    let mke2fs = std::env::var_os(frakti_lab::guest::MKE2FS_ENV).unwrap_or_else(|| "mke2fs".into());
    Ok(disk.mkfs_ext4(&mke2fs)?)
}

fn device(host: &Path, permissions: &str) -> cri::Device {
    cri::Device {
        host_path: host.to_string_lossy().into_owned(),
        container_path: "/dev/xvda".into(),
        permissions: permissions.into(),
    }
}

async fn container_with(
    c: &mut Runtime,
    pod: &str,
    name: &str,
    devices: Vec<cri::Device>,
) -> anyhow::Result<String> {
    let mut config = container_config(name, &["sleep", "1000"]);
    config.devices = devices;
    let id = create(c, pod, config).await?;
    start(c, &id).await?;
    Ok(id)
}

/// The device slots a pod's record holds.
fn device_slots(daemon: &Daemon, pod: &str) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(daemon.root().join("pods").join(pod).join("pod.json"))?;
    let record: serde_json::Value = serde_json::from_str(&text)?;
    Ok(record["volumes"].as_array().map_or(0, |v| {
        v.iter().filter(|s| s.get("device").is_some()).count()
    }))
}

async fn raw_block(daemon: &mut Daemon) -> anyhow::Result<()> {
    let work = daemon.dir.path().join("blk");
    std::fs::create_dir_all(&work)?;
    let disk = loop_device(&work, "disk.img", 64)?;
    // kubelet passes a symlink to the device (its volumeDevices map).
    let link = work.join("volume-device");
    std::os::unix::fs::symlink(&disk.device, &link)?;
    let mut c = daemon.runtime().await?;

    // A writer: dd onto the device, then the pod goes (flush, detach).
    let writer = run_pod(&mut c, pod_config("writer", &daemon.log_dir())).await?;
    let w = container_with(&mut c, &writer, "w", vec![device(&link, "rwm")]).await?;
    let out = exec(
        &mut c,
        &w,
        &["sh", "-c", "echo frakti-block-bytes | busybox dd of=/dev/xvda bs=512 conv=sync && busybox stat -c %t:%T /dev/xvda"],
        60,
    )
    .await?;
    ensure!(
        out.exit_code == 0,
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        device_slots(daemon, &writer)? == 1,
        "one device slot while in use"
    );
    // Held read-write by the writer: another pod may not have it.
    let other = run_pod(&mut c, pod_config("other", &daemon.log_dir())).await?;
    let (code, message) =
        code_of(container_with(&mut c, &other, "o", vec![device(&disk.device, "r")]).await);
    ensure!(
        code == tonic::Code::FailedPrecondition
            && message.contains("attached read-write to pod sandbox"),
        "{code:?} {message}"
    );
    ensure!(
        device_slots(daemon, &other)? == 0,
        "a refused device took a slot"
    );
    stop_and_remove(&mut c, &writer).await?;
    let head = std::fs::read(&disk.file)?;
    ensure!(
        head.starts_with(b"frakti-block-bytes\n"),
        "the device holds {:?} after the writer pod",
        String::from_utf8_lossy(&head[..32])
    );

    // A reader without `w`: it reads the bytes, its writes fail.
    let r = container_with(&mut c, &other, "r", vec![device(&link, "r")]).await?;
    let out = exec(
        &mut c,
        &r,
        &["busybox", "dd", "if=/dev/xvda", "bs=19", "count=1"],
        60,
    )
    .await?;
    ensure!(
        out.exit_code == 0 && out.stdout.starts_with(b"frakti-block-bytes"),
        "read: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = exec(
        &mut c,
        &r,
        &[
            "sh",
            "-c",
            "echo overwrite | busybox dd of=/dev/xvda conv=fsync",
        ],
        60,
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.exit_code != 0 && (stderr.contains("not permitted") || stderr.contains("Read-only")),
        "a write without w: exit {} {stderr}",
        out.exit_code
    );

    // Device rules: a container of the same pod without the device, with
    // CAP_MKNOD (a default capability), makes a node for the reader's disk
    // and for the first virtio disk (an image disk): mknod works, opening
    // them does not. Its own /dev/null still does.
    let numbers = exec(
        &mut c,
        &r,
        &["busybox", "stat", "-c", "%t %T", "/dev/xvda"],
        60,
    )
    .await?;
    let numbers = String::from_utf8_lossy(&numbers.stdout).trim().to_string();
    let (major, minor) = numbers
        .split_once(' ')
        .and_then(|(a, b)| {
            Some((
                u32::from_str_radix(a, 16).ok()?,
                u32::from_str_radix(b, 16).ok()?,
            ))
        })
        .with_context(|| format!("stat of /dev/xvda: {numbers:?}"))?;
    let n = container_with(&mut c, &other, "n", Vec::new()).await?;
    let script = format!(
        "busybox mknod /tmp/stolen b {major} {minor} && busybox mknod /tmp/image b {major} 0 && \
         for d in stolen image; do busybox dd if=/tmp/$d of=/dev/null count=1 2>&1 | busybox head -n1; done; \
         echo null > /dev/null && echo null-ok"
    );
    let out = exec(&mut c, &n, &["sh", "-c", &script], 60).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.exit_code == 0
            && text.matches("Operation not permitted").count() == 2
            && text.contains("null-ok"),
        "another container's disks must not open: exit {} {text} {}",
        out.exit_code,
        String::from_utf8_lossy(&out.stderr)
    );

    // Refusals: a device mounted on L1, a missing one, a file that is no
    // device. None takes a slot.
    let mounted = loop_device(&work, "mounted.img", 32)?;
    mkfs_ext4(&mounted)?;
    let mount_point = work.join("mnt");
    std::fs::create_dir_all(&mount_point)?;
    let status = Command::new("mount")
        .arg(&mounted.device)
        .arg(&mount_point)
        .status()?;
    ensure!(status.success(), "mount failed");
    let result = container_with(&mut c, &other, "m", vec![device(&mounted.device, "rw")]).await;
    let _ = Command::new("umount").arg(&mount_point).status();
    let (code, message) = code_of(result);
    ensure!(
        code == tonic::Code::FailedPrecondition && message.contains("is mounted on the host"),
        "{code:?} {message}"
    );
    let (code, message) = code_of(
        container_with(
            &mut c,
            &other,
            "x",
            vec![device(Path::new("/dev/nonexistent"), "rw")],
        )
        .await,
    );
    ensure!(code == tonic::Code::NotFound, "{code:?} {message}");
    let (code, message) =
        code_of(container_with(&mut c, &other, "f", vec![device(&disk.file, "rw")]).await);
    ensure!(
        code == tonic::Code::InvalidArgument && message.contains("not a block device"),
        "{code:?} {message}"
    );
    ensure!(device_slots(daemon, &other)? == 1, "only the reader's slot");
    stop_and_remove(&mut c, &other)
        .await
        .context("removing the reader pod")?;
    Ok(())
}

/// `frakti volume ARGS` against the daemon's root; (success, stdout+stderr).
fn volume_cli(daemon: &Daemon, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let frakti = std::env::var(FRAKTI_ENV).context("FRAKTI_BIN")?;
    let out = Command::new(frakti)
        .arg("volume")
        .arg("--root")
        .arg(daemon.root())
        .arg("--endpoint")
        .arg(daemon.socket())
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// `sh examples/csi-loop-volume.sh ARGS` for the daemon; (success,
/// stdout, stderr).
fn csi_example(daemon: &Daemon, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let script = std::env::var(CSI_EXAMPLE_ENV).context(CSI_EXAMPLE_ENV)?;
    let out = Command::new("sh")
        .arg(script)
        .args(args)
        .env("FRAKTI", std::env::var(FRAKTI_ENV).context("FRAKTI_BIN")?)
        .env("FRAKTI_ROOT", daemon.root())
        .env("FRAKTI_ENDPOINT", daemon.socket())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn mount_of(path: &Path, container_path: &str, readonly: bool) -> cri::Mount {
    cri::Mount {
        container_path: container_path.into(),
        host_path: path.to_string_lossy().into_owned(),
        readonly,
        ..Default::default()
    }
}

async fn run_with_mounts(
    c: &mut Runtime,
    pod: &str,
    name: &str,
    command: &[&str],
    mounts: Vec<cri::Mount>,
) -> anyhow::Result<String> {
    let mut config = container_config(name, command);
    config.mounts = mounts;
    let id = create(c, pod, config).await?;
    start(c, &id).await?;
    Ok(id)
}

async fn direct_volume(daemon: &mut Daemon) -> anyhow::Result<()> {
    let work = daemon.dir.path().join("blk");
    std::fs::create_dir_all(&work)?;
    let disk = loop_device(&work, "pv.img", 64)?;
    mkfs_ext4(&disk)?;
    // kubelet's volume path for a CSI volume: the driver registers it.
    let volume = work.join("kubelet/pods/u1/volumes/kubernetes.io~csi/pv1/mount");
    std::fs::create_dir_all(&volume)?;
    let volume_arg = volume.to_string_lossy().into_owned();
    let device_arg = disk.device.to_string_lossy().into_owned();
    let (ok, text) = volume_cli(
        daemon,
        &[
            "add",
            "--path",
            &volume_arg,
            "--device",
            &device_arg,
            "--fstype",
            "nfs",
        ],
    )?;
    ensure!(
        !ok && text.contains("--fstype \"nfs\" is not one of"),
        "bad fstype: {text}"
    );
    // NodePublishVolume, as docs/volumes.md's example driver does it.
    let (ok, out, err) = csi_example(daemon, &["publish", &device_arg, &volume_arg])?;
    ensure!(ok, "csi-loop-volume.sh publish: {out}{err}");

    let mut c = daemon.runtime().await?;
    let pod = run_pod(&mut c, pod_config("pv-writer", &daemon.log_dir())).await?;
    let writer = run_with_mounts(
        &mut c,
        &pod,
        "writer",
        &[
            "sh",
            "-c",
            "echo direct-volume-bytes > /data/hello && \
             busybox dd if=/dev/urandom of=/data/blob bs=1M count=4 conv=fsync && sleep 1000",
        ],
        vec![mount_of(&volume, "/data", false)],
    )
    .await?;
    let reader = run_with_mounts(
        &mut c,
        &pod,
        "reader",
        &["sleep", "1000"],
        vec![mount_of(&volume, "/data", true)],
    )
    .await?;
    ensure!(device_slots(daemon, &pod)? == 1, "two containers, one disk");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = exec(&mut c, &reader, &["cat", "/data/hello"], 30).await?;
        if out.stdout == b"direct-volume-bytes\n" {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the reader never saw the file: {out:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    check_volume_usage(
        daemon,
        &mut c,
        &volume_arg,
        &disk.device,
        [&writer, &reader],
    )
    .await?;
    let mounts = exec(&mut c, &writer, &["cat", "/proc/mounts"], 30).await?;
    let mounts = String::from_utf8_lossy(&mounts.stdout).into_owned();
    ensure!(
        mounts
            .lines()
            .any(|l| l.contains(" /data ext4 ") && l.contains("noatime")),
        "the volume is an ext4 mount with its options inside: {mounts}"
    );
    let out = exec(&mut c, &reader, &["touch", "/data/nope"], 30).await?;
    ensure!(
        out.exit_code != 0,
        "a read-only mount of the volume was written"
    );
    // In use: the driver may not forget it.
    let (ok, text) = volume_cli(daemon, &["remove", "--path", &volume_arg])?;
    ensure!(
        !ok && text.contains("in use by pod sandbox"),
        "remove while in use: {text}"
    );
    let (ok, text) = volume_cli(daemon, &["list"])?;
    ensure!(
        ok && text.contains(&pod[..12]),
        "list names the pod: {text}"
    );
    // kill -9 of the daemon with the volume attached: the restarted one
    // still detaches it cleanly when the pod stops.
    daemon.kill();
    daemon.spawn().await?;
    let mut c = daemon.runtime().await?;
    ensure!(
        device_slots(daemon, &pod)? == 1,
        "the slot is known after the restart"
    );
    stop_and_remove(&mut c, &pod).await?;
    let (ok, text) = volume_cli(daemon, &["stats", "--path", &volume_arg])?;
    ensure!(
        !ok && text.contains("no running pod mounts"),
        "stats of a volume no pod mounts: {text}"
    );

    // The filesystem is clean and the data is there for the next pod.
    let out = Command::new("e2fsck")
        .args(["-n", "-f"])
        .arg(&disk.device)
        .output()?;
    ensure!(
        out.status.success(),
        "e2fsck after the pod: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let next = run_pod(&mut c, pod_config("pv-reader", &daemon.log_dir())).await?;
    let id = run_with_mounts(
        &mut c,
        &next,
        "r",
        &["sleep", "1000"],
        vec![mount_of(&volume, "/data", false)],
    )
    .await?;
    let out = exec(&mut c, &id, &["cat", "/data/hello"], 30).await?;
    ensure!(
        out.stdout == b"direct-volume-bytes\n",
        "the next pod reads {out:?}"
    );
    stop_and_remove(&mut c, &next).await?;
    let (ok, out, err) = csi_example(daemon, &["unpublish", &volume_arg])?;
    ensure!(ok, "csi-loop-volume.sh unpublish: {out}{err}");
    let (ok, text) = volume_cli(daemon, &["list", "--format", "json"])?;
    ensure!(ok && text.trim() == "[]", "left registered: {text}");
    ensure_no_leaks(daemon)
}

/// The volume's usage, measured in the guest: `frakti volume stats` sees
/// the writer's 4 MiB blob, and ListPodSandboxMetrics has the series for
/// both containers that mount it, labelled with the device.
async fn check_volume_usage(
    daemon: &Daemon,
    c: &mut Runtime,
    volume: &str,
    device: &Path,
    containers: [&str; 2],
) -> anyhow::Result<()> {
    const MIB: u64 = 1024 * 1024;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let usage = loop {
        // NodeGetVolumeStats, as docs/volumes.md's example driver answers it.
        let (ok, text, err) = csi_example(daemon, &["stats", volume])?;
        ensure!(ok, "csi-loop-volume.sh stats: {text}{err}");
        let usage: serde_json::Value = serde_json::from_str(&text).context(text.clone())?;
        if usage["used_bytes"].as_u64().unwrap_or(0) >= 4 * MIB {
            break usage;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the 4 MiB blob never showed in the usage: {usage}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    let field = |name: &str| usage[name].as_u64().unwrap_or(0);
    // A 64 MiB ext4 image: its metadata takes a few MiB of the capacity.
    ensure!(
        (48 * MIB..=64 * MIB).contains(&field("capacity_bytes"))
            && field("used_bytes") < field("capacity_bytes")
            && field("available_bytes") <= field("capacity_bytes") - field("used_bytes")
            && field("inodes_used") >= 2
            && field("inodes_used") < field("inodes_total"),
        "implausible usage: {usage}"
    );
    let device = std::fs::canonicalize(device)?.display().to_string();
    ensure!(usage["device"] == device.as_str(), "{usage}");

    let descriptors = c
        .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
        .await?
        .into_inner()
        .descriptors;
    let usage_descriptor = descriptors
        .iter()
        .find(|d| d.name == "container_fs_usage_bytes")
        .context("no container_fs_usage_bytes descriptor")?;
    let device_label = usage_descriptor
        .label_keys
        .iter()
        .position(|k| k == "device")
        .context("no device label")?;
    let metrics = c
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await?
        .into_inner()
        .pod_metrics;
    for id in containers {
        let series = metrics
            .iter()
            .flat_map(|p| &p.container_metrics)
            .filter(|m| m.container_id == id)
            .flat_map(|m| &m.metrics)
            .find(|m| m.name == "container_fs_usage_bytes")
            .with_context(|| format!("no volume series for container {id}: {metrics:?}"))?;
        ensure!(
            series.label_values.get(device_label) == Some(&device)
                && series.value.as_ref().map_or(0, |v| v.value) >= 4 * MIB,
            "{series:?}"
        );
    }
    Ok(())
}
