//! CRI mounts in a VM: the host's files cannot be bound into the guest, so
//! a mount's content is copied in with the agent's CopyFile (configmaps,
//! secrets, tokens, /etc/hosts, hostPath files: small), and an emptyDir
//! becomes a directory inside the guest that the pod's containers share.
//! Mounts above [`MAX_COPY_BYTES`] or with a propagation other than
//! private are refused.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use frakti_proto::agent::v1 as pb;
use k8s_cri::v1 as cri;

use super::pod::Pod;
use super::spec::{GuestMount, GuestMountKind};
use super::{Error, Result, agent_call};
use crate::sandbox::agent::AgentClient;

/// The most a container's copied mounts may hold, together.
pub const MAX_COPY_BYTES: u64 = 64 * 1024 * 1024;
/// The most entries they may have.
const MAX_COPY_ENTRIES: usize = 10_000;
/// kubelet's emptyDir volumes live under this path component.
const EMPTY_DIR_MARKER: &str = "/volumes/kubernetes.io~empty-dir/";

/// One entry to copy: its path relative to the mount's root.
struct Entry {
    relative: PathBuf,
    kind: pb::FileKind,
    data: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// Walks `source` (a file, a directory or a symlink), depth first, parents
/// before children; symlinks are copied as links (kubelet's `..data` swap).
fn collect(source: &Path, budget: &mut u64, entries: &mut Vec<Entry>) -> Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        if entries.len() >= MAX_COPY_ENTRIES {
            return Err(Error::FailedPrecondition(format!(
                "mount {} has more than {MAX_COPY_ENTRIES} entries: too many to copy into the pod VM",
                source.display()
            )));
        }
        let path = source.join(&relative);
        let io = |what| {
            let path = path.clone();
            move |source| Error::Io { what, path, source }
        };
        let meta = fs::symlink_metadata(&path).map_err(io("cannot read"))?;
        let (kind, data) = if meta.file_type().is_symlink() {
            let target = fs::read_link(&path).map_err(io("cannot read link"))?;
            (pb::FileKind::Symlink, target.into_os_string().into_encoded_bytes())
        } else if meta.is_dir() {
            let mut children: Vec<PathBuf> = fs::read_dir(&path)
                .map_err(io("cannot list"))?
                .flatten()
                .map(|e| relative.join(e.file_name()))
                .collect();
            children.sort();
            stack.extend(children.into_iter().rev());
            (pb::FileKind::Directory, Vec::new())
        } else if meta.is_file() {
            *budget = budget.checked_sub(meta.len()).ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "mount {} holds more than {} MiB: too much to copy into the pod VM \
                     (use a block volume)",
                    source.display(),
                    MAX_COPY_BYTES >> 20
                ))
            })?;
            (pb::FileKind::File, fs::read(&path).map_err(io("cannot read"))?)
        } else {
            // Sockets, FIFOs and devices do not cross into a VM.
            continue;
        };
        entries.push(Entry {
            relative,
            kind,
            data,
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        });
    }
    Ok(())
}

fn check(mount: &cri::Mount) -> Result<()> {
    if !mount.container_path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "mounts: container_path {:?} must be absolute",
            mount.container_path
        )));
    }
    if !mount.host_path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "mounts: host_path {:?} of {} must be absolute",
            mount.host_path, mount.container_path
        )));
    }
    if mount.propagation != cri::MountPropagation::PropagationPrivate as i32 {
        return Err(Error::FailedPrecondition(format!(
            "mounts: {} asks for mount propagation, which cannot cross into a pod VM",
            mount.container_path
        )));
    }
    if mount.image.is_some() {
        return Err(Error::FailedPrecondition(format!(
            "mounts: {} is an image volume, which frakti does not support yet",
            mount.container_path
        )));
    }
    Ok(())
}

async fn copy(agent: &mut AgentClient, base: &str, entry: Entry) -> Result<String> {
    let path = if entry.relative.as_os_str().is_empty() {
        base.to_string()
    } else {
        format!("{base}/{}", entry.relative.to_string_lossy())
    };
    let request = pb::CopyFileRequest {
        path,
        kind: entry.kind as i32,
        data: entry.data,
        mode: entry.mode,
        uid: entry.uid,
        gid: entry.gid,
        version: 0,
    };
    Ok(agent_call("CopyFile", agent.copy_file(request)).await?.guest_path)
}

/// The guest paths of the container's mounts, their content copied in.
pub(crate) async fn prepare(
    pod: &Pod,
    container_id: &str,
    mounts: &[cri::Mount],
    agent: &mut AgentClient,
) -> Result<Vec<GuestMount>> {
    let mut budget = MAX_COPY_BYTES;
    let mut guest = Vec::new();
    for (index, mount) in mounts.iter().enumerate() {
        check(mount)?;
        let base = match mount.host_path.split_once(EMPTY_DIR_MARKER) {
            Some((_, volume)) if !volume.is_empty() && !volume.contains('/') => {
                // Shared by the pod's containers: made once, never copied.
                format!("emptydir/{volume}")
            }
            _ => format!("containers/{container_id}/{index}"),
        };
        let mut entries = Vec::new();
        if base.starts_with("emptydir/") {
            entries.push(Entry {
                relative: PathBuf::new(),
                kind: pb::FileKind::Directory,
                data: Vec::new(),
                mode: 0o777,
                uid: 0,
                gid: 0,
            });
        } else {
            let source = Path::new(&mount.host_path);
            if fs::symlink_metadata(source).is_err() {
                // As containerd does: a missing host path becomes a directory.
                fs::create_dir_all(source).map_err(|e| Error::Io {
                    what: "cannot create the mount source",
                    path: source.to_path_buf(),
                    source: e,
                })?;
            }
            // The mount's root is what the path names, links followed.
            let resolved = fs::canonicalize(source).map_err(|e| Error::Io {
                what: "cannot resolve",
                path: source.to_path_buf(),
                source: e,
            })?;
            collect(&resolved, &mut budget, &mut entries)?;
        }
        let mut root = None;
        for entry in entries {
            let is_root = entry.relative.as_os_str().is_empty();
            let guest_path = copy(agent, &base, entry).await?;
            if is_root {
                root = Some(guest_path);
            }
        }
        let guest_source = root.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "mounts: {} is not a file or directory",
                mount.host_path
            ))
        })?;
        tracing::debug!(pod = %pod.id, container = %container_id, host = %mount.host_path, guest = %guest_source, "mount copied in");
        guest.push(GuestMount {
            container_path: mount.container_path.clone(),
            guest_source,
            readonly: mount.readonly || mount.recursive_read_only,
            kind: GuestMountKind::Bind,
        });
    }
    Ok(guest)
}

/// Removes what [`prepare`] copied for the container (emptyDirs stay with
/// the pod).
pub(crate) async fn remove(pod: &Pod, container_id: &str) {
    let Ok(mut agent) = pod.agent() else {
        return;
    };
    let request = pb::RemoveFileRequest {
        path: format!("containers/{container_id}"),
    };
    if let Err(e) = agent_call("RemoveFile", agent.remove_file(request)).await {
        tracing::debug!(pod = %pod.id, "{}", crate::error_chain(&e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_are_walked_parents_first_with_links_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("..2024_01")).unwrap();
        fs::write(root.join("..2024_01/key"), "value").unwrap();
        std::os::unix::fs::symlink("..2024_01", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/key", root.join("key")).unwrap();
        let mut budget = MAX_COPY_BYTES;
        let mut entries = Vec::new();
        collect(root, &mut budget, &mut entries).unwrap();
        let names: Vec<String> = entries
            .iter()
            .map(|e| e.relative.to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["", "..2024_01", "..2024_01/key", "..data", "key"]);
        assert_eq!(entries[2].data, b"value");
        assert_eq!(entries[3].kind, pb::FileKind::Symlink);
        assert_eq!(entries[3].data, b"..2024_01");
        assert_eq!(budget, MAX_COPY_BYTES - 5);
    }

    #[test]
    fn too_much_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("big"), vec![0u8; 100]).unwrap();
        let mut budget = 99;
        let err = collect(dir.path(), &mut budget, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    }

    #[test]
    fn mounts_are_checked() {
        let mount = |container: &str, propagation| cri::Mount {
            container_path: container.into(),
            host_path: "/tmp/x".into(),
            propagation,
            ..Default::default()
        };
        check(&mount("/data", 0)).unwrap();
        let err = check(&mount("data", 0)).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let err = check(&mount("/data", cri::MountPropagation::PropagationBidirectional as i32))
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    }
}
