//! Raw block volumes (issue 16) as kubelet sends them, CRI `devices`: a
//! loop device of L1 goes into a pod's VM as its own disk; what a container
//! writes with dd is on the device once the pod is gone and a second pod
//! reads it; without `w` a write fails; a device held by another pod, one
//! mounted on L1 and a missing one are refused and leave no slot taken.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
use k8s_cri::v1 as cri;
use libtest_mimic::Trial;

use super::harness::*;

pub fn tests() -> Vec<Trial> {
    vec![Trial::test(
        "devices::raw_block_volumes_go_into_the_vm",
        || with_daemon(&[], raw_block),
    )]
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
    remove_pod_without_leaks_of(&mut c, &writer).await?;
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
    let mke2fs = std::env::var("FRAKTI_MKE2FS").unwrap_or_else(|_| "mke2fs".into());
    let status = Command::new(&mke2fs)
        .args(["-q", "-t", "ext4"])
        .arg(&mounted.device)
        .status()?;
    ensure!(status.success(), "mke2fs failed");
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
    remove_pod_without_leaks_of(&mut c, &other)
        .await
        .context("removing the reader pod")?;
    Ok(())
}

async fn remove_pod_without_leaks_of(c: &mut Runtime, pod: &str) -> anyhow::Result<()> {
    c.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await?;
    c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await?;
    Ok(())
}
