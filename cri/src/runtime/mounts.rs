//! CRI mounts in a VM: the host's files cannot be bound into the guest, so
//! a mount's content is copied in with the agent's CopyFile (configmaps,
//! secrets, tokens, /etc/hosts, hostPath files: small), and an emptyDir
//! becomes a directory inside the guest that the pod's containers share.
//! Mounts above [`MAX_COPY_BYTES`] or with a propagation other than
//! private are refused. The tree walker here ([`walk`], [`read`]) is also
//! what `sync` uses to keep the copies up to date.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use frakti_proto::agent::v1 as pb;
use k8s_cri::v1 as cri;

use super::pod::Pod;
use super::spec::{GuestMount, GuestMountKind};
use super::sync::{Snapshot, SyncedMount};
use super::{Error, Result, agent_call, scratch};
use crate::sandbox::agent::AgentClient;

/// The most a container's copied mounts may hold, together.
pub const MAX_COPY_BYTES: u64 = 64 * 1024 * 1024;
/// The most entries one mount may have.
pub(crate) const MAX_COPY_ENTRIES: usize = 10_000;

/// What a walk saw of one entry: metadata only, the content is read when
/// the entry is copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    pub kind: pb::FileKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// A symlink's target; empty otherwise.
    pub target: Vec<u8>,
}

/// One entry of a walked tree: its path relative to the mount's root
/// (empty for the root).
#[derive(Debug)]
pub(crate) struct Entry {
    pub relative: PathBuf,
    pub meta: Meta,
}

/// Why a mount's tree could not be walked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WalkError {
    #[error("mount {0} has more than {MAX_COPY_ENTRIES} entries: too many to copy into the pod VM")]
    TooMany(PathBuf),
    #[error(
        "mount {0} holds more than {mib} MiB: too much to copy into the pod VM (use a block volume)",
        mib = MAX_COPY_BYTES >> 20
    )]
    TooBig(PathBuf),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<WalkError> for Error {
    fn from(e: WalkError) -> Error {
        match e {
            WalkError::TooMany(_) | WalkError::TooBig(_) => {
                Error::FailedPrecondition(e.to_string())
            }
            WalkError::Io { what, path, source } => Error::Io { what, path, source },
        }
    }
}

/// Walks `source` (a file, a directory or a symlink), depth first, parents
/// before children; symlinks are kept as links (kubelet's `..data` swap).
/// Regular files' sizes are taken from `budget`; at most
/// [`MAX_COPY_ENTRIES`] entries. An entry that vanishes during the walk
/// (kubelet removing an old `..<timestamp>` directory) is left out; the
/// root vanishing is an error.
pub(crate) fn walk(source: &Path, budget: &mut u64) -> Result<Vec<Entry>, WalkError> {
    let mut entries = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        if entries.len() >= MAX_COPY_ENTRIES {
            return Err(WalkError::TooMany(source.to_path_buf()));
        }
        let is_root = relative.as_os_str().is_empty();
        let path = entry_path(source, &relative);
        let io = |what| {
            let path = path.clone();
            move |source| WalkError::Io { what, path, source }
        };
        let vanished = |e: &io::Error| !is_root && e.kind() == io::ErrorKind::NotFound;
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(io("cannot read")(e)),
        };
        let mut target = Vec::new();
        let kind = if meta.file_type().is_symlink() {
            match fs::read_link(&path) {
                Ok(link) => target = link.into_os_string().into_encoded_bytes(),
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(io("cannot read link")(e)),
            }
            pb::FileKind::Symlink
        } else if meta.is_dir() {
            let listing = match fs::read_dir(&path) {
                Ok(listing) => listing,
                Err(e) if vanished(&e) => continue,
                Err(e) => return Err(io("cannot list")(e)),
            };
            let mut children: Vec<PathBuf> = listing
                .flatten()
                .map(|e| relative.join(e.file_name()))
                .collect();
            children.sort();
            stack.extend(children.into_iter().rev());
            pb::FileKind::Directory
        } else if meta.is_file() {
            *budget = budget
                .checked_sub(meta.len())
                .ok_or_else(|| WalkError::TooBig(source.to_path_buf()))?;
            pb::FileKind::File
        } else {
            // Sockets, FIFOs and devices do not cross into a VM.
            continue;
        };
        entries.push(Entry {
            relative,
            meta: Meta {
                kind,
                size: meta.len(),
                mtime_ns: time_ns(meta.mtime(), meta.mtime_nsec()),
                ctime_ns: time_ns(meta.ctime(), meta.ctime_nsec()),
                ino: meta.ino(),
                mode: meta.permissions().mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                target,
            },
        });
    }
    Ok(entries)
}

pub(crate) fn time_ns(secs: i64, nsecs: i64) -> i64 {
    secs.checked_mul(1_000_000_000)
        .and_then(|ns| ns.checked_add(nsecs))
        .unwrap_or(i64::MAX)
}

/// The data to send for a walked entry: a file's content (at most the
/// size the walk saw; a change since shows in its metadata next time), a
/// link's target, nothing for a directory. Links are not followed.
pub(crate) fn read(root: &Path, relative: &Path, meta: &Meta) -> io::Result<Vec<u8>> {
    match meta.kind {
        pb::FileKind::Directory => Ok(Vec::new()),
        pb::FileKind::Symlink => Ok(meta.target.clone()),
        pb::FileKind::File => {
            // Non-blocking: a FIFO swapped in must not hang the daemon.
            let file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(entry_path(root, relative))?;
            if !file.metadata()?.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no longer a regular file",
                ));
            }
            let mut data = Vec::new();
            file.take(meta.size).read_to_end(&mut data)?;
            Ok(data)
        }
    }
}

/// The host path of an entry: `root` itself for the root (`join` would
/// add a `/`, which a file's path cannot end with).
pub(crate) fn entry_path(root: &Path, relative: &Path) -> PathBuf {
    if relative.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(relative)
    }
}

/// The CopyFile path of an entry of the mount copied to `base`.
pub(crate) fn guest_path(base: &str, relative: &Path) -> String {
    if relative.as_os_str().is_empty() {
        base.to_string()
    } else {
        format!("{base}/{}", relative.to_string_lossy())
    }
}

/// The CopyFile request that writes an entry. `in_place`: into the file
/// already there (a file bound into a container as is).
pub(crate) fn copy_request(
    base: &str,
    relative: &Path,
    meta: &Meta,
    data: Vec<u8>,
    in_place: bool,
) -> pb::CopyFileRequest {
    pb::CopyFileRequest {
        path: guest_path(base, relative),
        kind: meta.kind as i32,
        data,
        mode: meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        version: 0,
        in_place,
    }
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

/// What [`prepare`] made of a container's mounts.
pub(crate) struct Prepared {
    /// The guest paths to bind, in the order of the CRI mounts.
    pub mounts: Vec<GuestMount>,
    /// The copied mounts (all but emptyDirs), to keep in sync with
    /// [`super::sync::spawn`].
    pub synced: Vec<SyncedMount>,
    /// Writable mounts of a regular file (the termination message), as
    /// (guest CopyFile path, host path) pairs for [`super::sync::copy_back`].
    pub copy_back: Vec<(String, PathBuf)>,
}

/// The guest paths of the container's mounts, their content copied in.
pub(crate) async fn prepare(
    pod: &Pod,
    container_id: &str,
    mounts: &[cri::Mount],
    direct: &HashMap<usize, String>,
    agent: &mut AgentClient,
    empty_dir_bytes: u64,
) -> Result<Prepared> {
    let mut budget = MAX_COPY_BYTES;
    let mut prepared = Prepared {
        mounts: Vec::new(),
        synced: Vec::new(),
        copy_back: Vec::new(),
    };
    for (index, mount) in mounts.iter().enumerate() {
        check(mount)?;
        let readonly = mount.readonly || mount.recursive_read_only;
        if let Some(guest_source) = direct.get(&index) {
            // A direct-assigned volume: its disk is mounted in the guest.
            prepared.mounts.push(GuestMount {
                container_path: mount.container_path.clone(),
                guest_source: guest_source.clone(),
                readonly,
                kind: GuestMountKind::Bind,
            });
            continue;
        }
        let guest_source = match scratch::empty_dir_volume(&mount.host_path) {
            // Shared by the pod's containers: made once, never copied.
            Some(volume) => {
                let host = Path::new(&mount.host_path);
                scratch::empty_dir(pod, volume, host, agent, empty_dir_bytes).await?
            }
            _ => {
                let base = format!("containers/{container_id}/{index}");
                let copied = copy_in(agent, &mount.host_path, &base, &mut budget).await?;
                if !readonly && copied.root_kind == pb::FileKind::File {
                    prepared
                        .copy_back
                        .push((base.clone(), copied.host_path.clone()));
                }
                prepared.synced.push(SyncedMount {
                    host_path: copied.host_path,
                    guest_base: base,
                    snapshot: Some(copied.snapshot),
                    writable: !readonly,
                });
                copied.guest_path
            }
        };
        tracing::debug!(pod = %pod.id, container = %container_id, host = %mount.host_path, guest = %guest_source, "mount copied in");
        prepared.mounts.push(GuestMount {
            container_path: mount.container_path.clone(),
            guest_source,
            readonly,
            kind: GuestMountKind::Bind,
        });
    }
    Ok(prepared)
}

/// A mount's tree as [`copy_in`] copied it.
struct Copied {
    /// The mount's root: what the host path names, links followed.
    host_path: PathBuf,
    guest_path: String,
    root_kind: pb::FileKind,
    snapshot: Snapshot,
}

/// Copies the tree at `host_path` to `base` in the guest.
async fn copy_in(
    agent: &mut AgentClient,
    host_path: &str,
    base: &str,
    budget: &mut u64,
) -> Result<Copied> {
    let source = Path::new(host_path);
    if fs::symlink_metadata(source).is_err() {
        // As containerd does: a missing host path becomes a directory.
        fs::create_dir_all(source).map_err(|e| Error::Io {
            what: "cannot create the mount source",
            path: source.to_path_buf(),
            source: e,
        })?;
    }
    let root = fs::canonicalize(source).map_err(|e| Error::Io {
        what: "cannot resolve",
        path: source.to_path_buf(),
        source: e,
    })?;
    let walk_root = root.clone();
    let mut walk_budget = *budget;
    let (entries, walk_budget) = tokio::task::spawn_blocking(move || {
        walk(&walk_root, &mut walk_budget).map(|entries| (entries, walk_budget))
    })
    .await
    .map_err(|e| Error::FailedPrecondition(format!("mounts: walking {host_path}: {e}")))??;
    *budget = walk_budget;
    let mut snapshot = Snapshot::default();
    let mut guest_root = None;
    for entry in entries {
        let read_at = std::time::SystemTime::now();
        let data = match read(&root, &entry.relative, &entry.meta) {
            Ok(data) => data,
            // Gone since the walk (kubelet's swap): the sync catches up.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && !entry.relative.as_os_str().is_empty() =>
            {
                continue;
            }
            Err(e) => {
                return Err(Error::Io {
                    what: "cannot read",
                    path: entry_path(&root, &entry.relative),
                    source: e,
                });
            }
        };
        let request = copy_request(base, &entry.relative, &entry.meta, data, false);
        let guest_path = agent_call("CopyFile", agent.copy_file(request))
            .await?
            .guest_path;
        if entry.relative.as_os_str().is_empty() {
            guest_root = Some((guest_path, entry.meta.kind));
        }
        snapshot.insert(entry.relative, entry.meta, read_at);
    }
    let (guest_path, root_kind) = guest_root.ok_or_else(|| {
        Error::FailedPrecondition(format!("mounts: {host_path} is not a file or directory"))
    })?;
    Ok(Copied {
        host_path: root,
        guest_path,
        root_kind,
        snapshot,
    })
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
        let entries = walk(root, &mut budget).unwrap();
        let names: Vec<String> = entries
            .iter()
            .map(|e| e.relative.to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["", "..2024_01", "..2024_01/key", "..data", "key"]);
        assert_eq!(
            read(root, &entries[2].relative, &entries[2].meta).unwrap(),
            b"value"
        );
        assert_eq!(entries[3].meta.kind, pb::FileKind::Symlink);
        assert_eq!(entries[3].meta.target, b"..2024_01");
        assert_eq!(
            read(root, &entries[3].relative, &entries[3].meta).unwrap(),
            b"..2024_01"
        );
        assert_eq!(budget, MAX_COPY_BYTES - 5);
        assert_eq!(
            guest_path("containers/c/0", &entries[0].relative),
            "containers/c/0"
        );
        assert_eq!(
            guest_path("containers/c/0", &entries[2].relative),
            "containers/c/0/..2024_01/key"
        );
    }

    #[test]
    fn too_much_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("big"), vec![0u8; 100]).unwrap();
        let mut budget = 99;
        let err = walk(dir.path(), &mut budget).unwrap_err();
        assert!(matches!(err, WalkError::TooBig(_)), "{err}");
        let err = Error::from(err);
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    }

    #[test]
    fn too_many_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..MAX_COPY_ENTRIES {
            fs::write(dir.path().join(i.to_string()), "").unwrap();
        }
        // The root and MAX_COPY_ENTRIES files.
        let err = walk(dir.path(), &mut MAX_COPY_BYTES.clone()).unwrap_err();
        assert!(matches!(err, WalkError::TooMany(_)), "{err}");
        fs::remove_file(dir.path().join("0")).unwrap();
        assert_eq!(
            walk(dir.path(), &mut MAX_COPY_BYTES.clone()).unwrap().len(),
            MAX_COPY_ENTRIES
        );
    }

    #[test]
    fn a_file_is_a_tree_of_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts");
        fs::write(&file, "127.0.0.1 localhost").unwrap();
        let entries = walk(&file, &mut MAX_COPY_BYTES.clone()).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].meta.kind, pb::FileKind::File);
        assert_eq!(
            read(&file, &entries[0].relative, &entries[0].meta).unwrap(),
            b"127.0.0.1 localhost"
        );
    }

    #[test]
    fn files_are_read_as_walked() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), "short").unwrap();
        let entries = walk(dir.path(), &mut MAX_COPY_BYTES.clone()).unwrap();
        // Grown since the walk: what the walk saw is sent, the next walk
        // sees the rest.
        fs::write(dir.path().join("f"), "much longer").unwrap();
        assert_eq!(
            read(dir.path(), &entries[1].relative, &entries[1].meta).unwrap(),
            b"much "
        );
        // A link swapped in is not followed.
        fs::remove_file(dir.path().join("f")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("f")).unwrap();
        assert!(read(dir.path(), &entries[1].relative, &entries[1].meta).is_err());
        // Gone: NotFound, which callers skip.
        fs::remove_file(dir.path().join("f")).unwrap();
        let err = read(dir.path(), &entries[1].relative, &entries[1].meta).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        // The root gone is an error.
        let gone = dir.path().join("nothing");
        assert!(matches!(walk(&gone, &mut 0), Err(WalkError::Io { .. })));
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
        let err = check(&mount(
            "/data",
            cri::MountPropagation::PropagationBidirectional as i32,
        ))
        .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    }
}
