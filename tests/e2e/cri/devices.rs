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

/// A loop device over a sparse file; detached when dropped.
struct Loop {
    device: PathBuf,
    file: PathBuf,
}

impl Loop {
    fn new(dir: &Path, name: &str, mib: u64) -> anyhow::Result<Loop> {
        let file = dir.join(name);
        std::fs::File::create(&file)?.set_len(mib << 20)?;
        let out = Command::new("losetup").arg("-f").output()?;
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        ensure!(
            out.status.success() && device.starts_with("/dev/"),
            "losetup -f: {out:?}"
        );
        let status = Command::new("losetup").arg(&device).arg(&file).status()?;
        ensure!(status.success(), "losetup {} failed", device.display());
        Ok(Loop { device, file })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// An empty ext4 filesystem on `device` (the lab's mke2fs).
fn mkfs_ext4(device: &Path) -> anyhow::Result<()> {
    let mke2fs = std::env::var(frakti_lab::guest::MKE2FS_ENV).unwrap_or_else(|_| "mke2fs".into());
    let status = Command::new(&mke2fs)
        .args(["-q", "-t", "ext4"])
        .arg(device)
        .status()?;
    ensure!(status.success(), "mke2fs {} failed", device.display());
    Ok(())
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
    let disk = Loop::new(&work, "disk.img", 64)?;
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

    // Refusals: a device mounted on L1, a missing one, a file that is no
    // device. None takes a slot.
    let mounted = Loop::new(&work, "mounted.img", 32)?;
    mkfs_ext4(&mounted.device)?;
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
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
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
    let disk = Loop::new(&work, "pv.img", 64)?;
    mkfs_ext4(&disk.device)?;
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
    let (ok, text) = volume_cli(
        daemon,
        &[
            "add",
            "--path",
            &volume_arg,
            "--device",
            &device_arg,
            "--fstype",
            "ext4",
            "--options",
            "noatime",
        ],
    )?;
    ensure!(ok, "volume add: {text}");

    let mut c = daemon.runtime().await?;
    let pod = run_pod(&mut c, pod_config("pv-writer", &daemon.log_dir())).await?;
    let writer = run_with_mounts(
        &mut c,
        &pod,
        "writer",
        &[
            "sh",
            "-c",
            "echo direct-volume-bytes > /data/hello && sleep 1000",
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
    let (ok, text) = volume_cli(daemon, &["remove", "--path", &volume_arg])?;
    ensure!(ok, "volume remove: {text}");
    ensure_no_leaks(daemon)
}
