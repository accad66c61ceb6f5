//! emptyDir volumes. kubelet makes `…/volumes/kubernetes.io~empty-dir/NAME`
//! on the node; in a pod VM the volume lives inside the guest, shared by
//! the pod's containers:
//!
//! - medium Memory (kubelet mounted a tmpfs there): a directory in the
//!   guest's memory, like the node's tmpfs;
//! - otherwise: a disk of its own, a sparse ext4 file in one of the VM's
//!   writable slots (`--empty-dir-size`, made at first use), so that the
//!   volume's data does not take guest memory. The file lives in kubelet's
//!   own volume directory: kubelet measures an emptyDir's usage (its
//!   `sizeLimit`, ephemeral-storage eviction, the summary API) by what is
//!   allocated there, and a sparse file's blocks are what the volume holds.
//!   The container binds the disk's `data/` directory (mode 0777, as
//!   kubelet makes emptyDirs; `lost+found` stays out of sight).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use frakti_proto::agent::v1 as pb;

use super::pod::Pod;
use super::state::SlotRecord;
use super::{Error, Result, agent_call, lock};
use crate::sandbox::agent::AgentClient;
use crate::sandbox::api;

/// kubelet's emptyDir volumes live under this path component.
pub const EMPTY_DIR_MARKER: &str = "/volumes/kubernetes.io~empty-dir/";

/// A disk-backed emptyDir's file, in kubelet's directory of the volume.
pub const DISK_FILE: &str = ".frakti-emptydir.ext4";

/// The volume name of an emptyDir host path, if it is one.
pub fn empty_dir_volume(host_path: &str) -> Option<&str> {
    let (_, volume) = host_path.split_once(EMPTY_DIR_MARKER)?;
    let valid = !volume.is_empty()
        && volume
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    valid.then_some(volume)
}

/// Whether kubelet made the volume a tmpfs (medium Memory): it mounts one
/// on the volume's directory (a directory that merely sits on a tmpfs, as
/// under a node's /tmp, is not such a volume).
fn on_tmpfs(host_path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let tmpfs = nix::sys::statfs::statfs(host_path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    let mount_point = match (host_path.metadata(), host_path.parent().map(Path::metadata)) {
        (Ok(dir), Some(Ok(parent))) => dir.dev() != parent.dev(),
        _ => false,
    };
    tmpfs && mount_point
}

/// The guest path the container binds for emptyDir `volume`.
pub(crate) async fn empty_dir(
    pod: &Pod,
    volume: &str,
    host_path: &Path,
    agent: &mut AgentClient,
    disk_bytes: u64,
) -> Result<String> {
    if disk_bytes == 0 || on_tmpfs(host_path) {
        return in_memory(volume, agent).await;
    }
    let disk_id = format!("emptydir-{volume}");
    let mounted = lock(&pod.state)
        .record
        .volumes
        .iter()
        .any(|slot| slot.disk_id == disk_id);
    if !mounted {
        // kubelet makes the directory before it creates containers; without
        // it (a client that is not kubelet) the disk stays in the pod's.
        let file = if host_path.is_dir() {
            host_path.join(DISK_FILE)
        } else {
            pod.dir.join(format!("{disk_id}.ext4"))
        };
        attach(pod, &disk_id, &file, agent, disk_bytes).await?;
    }
    Ok(format!("/run/frakti/disks/{disk_id}/data"))
}

async fn in_memory(volume: &str, agent: &mut AgentClient) -> Result<String> {
    let request = pb::CopyFileRequest {
        path: format!("emptydir/{volume}"),
        kind: pb::FileKind::Directory as i32,
        mode: 0o777,
        ..Default::default()
    };
    Ok(agent_call("CopyFile", agent.copy_file(request))
        .await?
        .guest_path)
}

/// Makes the volume's disk, puts it in a free writable slot and mounts it.
async fn attach(
    pod: &Pod,
    disk_id: &str,
    file: &Path,
    agent: &mut AgentClient,
    bytes: u64,
) -> Result<()> {
    let serial = super::devices::free_slot(pod)?;
    let file = file.to_path_buf();
    let made = file.clone();
    tokio::task::spawn_blocking(move || make_disk(&made, bytes))
        .await
        .map_err(|e| Error::FailedPrecondition(format!("emptyDir disk: {e}")))??;
    api::attach_disk(&pod.files.api_socket(), &serial, &file, false).await?;
    let request = pb::MountDiskRequest {
        disk_id: disk_id.to_string(),
        serial: serial.clone(),
        fs_type: "ext4".into(),
        options: Vec::new(),
        read_only: false,
        timeout_ms: 0,
    };
    if let Err(e) = agent_call("MountDisk", agent.mount_disk(request)).await {
        let _ = api::detach_disk(&pod.files.api_socket(), &serial).await;
        let _ = std::fs::remove_file(&file);
        return Err(e);
    }
    lock(&pod.state).record.volumes.push(SlotRecord {
        image_id: String::new(),
        serial,
        disk_id: disk_id.to_string(),
        file: Some(file),
        device: None,
        owners: Vec::new(),
        read_only: false,
    });
    pod.save()
}

/// A sparse ext4 file of `bytes` holding `data/` (0777).
fn make_disk(file: &Path, bytes: u64) -> Result<()> {
    let io = |what: &'static str, path: PathBuf| move |source| Error::Io { what, path, source };
    let tree = tempfile::Builder::new()
        .prefix(".emptydir-")
        .tempdir_in(file.parent().unwrap_or(Path::new("/tmp")))
        .map_err(io("cannot create a scratch tree in", file.to_path_buf()))?;
    let data = tree.path().join("data");
    std::fs::create_dir(&data).map_err(io("cannot create", data.clone()))?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777))
        .map_err(io("cannot chmod", data.clone()))?;
    let disk = std::fs::File::create(file).map_err(io("cannot create", file.to_path_buf()))?;
    disk.set_len(bytes)
        .map_err(io("cannot size", file.to_path_buf()))?;
    let output = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
        ])
        .arg("-d")
        .arg(tree.path())
        .arg(file)
        .output()
        .map_err(io("cannot run mkfs.ext4 for", file.to_path_buf()))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(file);
        return Err(Error::FailedPrecondition(format!(
            "mkfs.ext4 for the emptyDir disk {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_dir_volumes_are_recognised() {
        let path = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache";
        assert_eq!(empty_dir_volume(path), Some("cache"));
        assert_eq!(
            empty_dir_volume("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap/x"),
            None
        );
        assert_eq!(
            empty_dir_volume("/x/volumes/kubernetes.io~empty-dir/"),
            None
        );
        assert_eq!(
            empty_dir_volume("/x/volumes/kubernetes.io~empty-dir/a/b"),
            None
        );
        assert_eq!(
            empty_dir_volume("/x/volumes/kubernetes.io~empty-dir/a b"),
            None
        );
    }

    #[test]
    fn only_a_tmpfs_mounted_on_the_volume_keeps_it_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("cache");
        std::fs::create_dir(&volume).unwrap();
        assert!(!on_tmpfs(&volume), "a plain directory");
        nix::mount::mount(
            Some("tmpfs"),
            &volume,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount a tmpfs (the unit tests run as root)");
        let memory = on_tmpfs(&volume);
        nix::mount::umount(&volume).unwrap();
        assert!(memory, "kubelet's medium Memory volume");
    }

    #[test]
    fn disks_are_sparse_ext4_with_an_open_data_dir() {
        if which("mkfs.ext4").is_none() {
            panic!("mkfs.ext4 is missing: apt-get install e2fsprogs");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("emptydir-x.ext4");
        make_disk(&file, 64 << 20).unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 16 << 20,
            "not sparse: {} blocks",
            meta.blocks()
        );
        let listing = Command::new("debugfs")
            .args(["-R", "stat /data"])
            .arg(&file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&listing.stdout);
        assert!(
            text.contains("Mode:  0777") || text.contains("Mode: 0777"),
            "{text}"
        );
        // Only the scratch disk is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    fn which(tool: &str) -> Option<PathBuf> {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.is_file())
    }
}
