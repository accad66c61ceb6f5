//! Copied mounts kept in sync, host to guest, and termination messages
//! copied back, guest to host.
//!
//! [`super::mounts::prepare`] copies a container's mounts into its pod VM
//! once; configmaps, secrets, projected tokens, /etc/hosts and hostPath
//! files change afterwards on the host. [`spawn`] starts a task that polls
//! those trees every [`POLL_INTERVAL`], compares what it sees with what the
//! guest was sent (a [`Snapshot`]) and sends only the differences with
//! CopyFile and RemoveFile. emptyDirs live in the guest and are not synced.
//! A writable mount's files are sent again only when the host changes
//! them: the guest's copy may hold what the container wrote.
//!
//! Polling rather than inotify: the trees are a handful of small
//! directories per container, so a poll is a few dozen `lstat`s, cheaper
//! than it sounds and far simpler than inotify here. inotify watches one
//! directory, not a tree (each new `..<timestamp>` directory of kubelet's
//! swap would need a new watch, racing with its content), its queue can
//! overflow (and then a full walk is needed anyway), and it says nothing
//! about a hostPath changed through another mount namespace or over NFS.
//!
//! [`copy_back`] is the other direction: what a container wrote to a
//! writable file mount (its termination message) is read back with
//! ReadFile once it exits and written over the host file kubelet reads.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use frakti_proto::agent::v1 as pb;
use tokio::task::JoinHandle;

use super::mounts::{self, Meta, WalkError};
use super::{Error, Result, agent_call};
use crate::sandbox::agent::AgentClient;

/// How often the copied mounts are compared with the host (a change must
/// show in the container within 2 s).
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// File timestamps are coarse (a kernel tick; more on some filesystems):
/// a write in the same tick as an earlier one that keeps the size leaves
/// the metadata as it was. So a file whose content was read less than this
/// after its mtime is not trusted yet: it is resent at each poll until a
/// read comes late enough to have seen every write with that mtime. A
/// recently changed file is sent a few times more; no content is hashed.
const SETTLE: Duration = Duration::from_secs(1);
/// Walks of a tree that changed while they ran are retried this often.
const WALK_TRIES: usize = 3;
/// The most of a termination message copied back.
const MAX_COPY_BACK_BYTES: usize = 1024 * 1024;

/// One copied mount to keep in sync.
pub struct SyncedMount {
    /// The mount's root as `prepare` copied it (canonicalized).
    pub host_path: PathBuf,
    /// The CopyFile path of its root, e.g. "containers/<id>/0".
    pub guest_base: String,
    /// What the guest holds, as copied; `None` when unknown (say, after a
    /// daemon restart): the first poll then sends everything again, the
    /// host's content wins, unless the mount is writable.
    pub snapshot: Option<Snapshot>,
    /// The container may write to it: what the guest holds may be newer
    /// than what it was sent, so only a change on the host is sent (an
    /// unchanged file resent would undo the container's write), and an
    /// unknown snapshot is taken to be the host's tree at the first poll.
    pub writable: bool,
}

/// What the guest was sent of a mount, per path relative to its root.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(BTreeMap<PathBuf, Synced>);

#[derive(Debug, Clone)]
struct Synced {
    meta: Meta,
    /// Its content was read at least [`SETTLE`] after its mtime.
    settled: bool,
}

impl Snapshot {
    /// Records an entry sent with content read at `read_at`.
    pub(crate) fn insert(&mut self, relative: PathBuf, meta: Meta, read_at: SystemTime) {
        let read_ns = read_at
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_nanos()).ok())
            .unwrap_or(0);
        let settle_ns = i64::try_from(SETTLE.as_nanos()).unwrap_or(i64::MAX);
        let settled = read_ns
            .checked_sub(meta.mtime_ns)
            .is_some_and(|age| age >= settle_ns);
        self.0.insert(relative, Synced { meta, settled });
    }

    /// Trusts every entry as sent: only a change of the host's metadata
    /// sends it again.
    fn settle_all(&mut self) {
        for entry in self.0.values_mut() {
            entry.settled = true;
        }
    }

    /// What the guest holds when it is taken to match the host's `tree`.
    fn adopted(tree: &Tree) -> Snapshot {
        let entries = tree.iter().map(|(path, meta)| {
            let synced = Synced {
                meta: meta.clone(),
                settled: true,
            };
            (path.clone(), synced)
        });
        Snapshot(entries.collect())
    }

    /// Forgets an entry and everything below it.
    fn remove_tree(&mut self, relative: &Path) {
        self.0.retain(|path, _| !path.starts_with(relative));
    }
}

/// A walked tree: metadata per relative path, parents before children.
type Tree = BTreeMap<PathBuf, Meta>;

/// One step towards the host's tree, in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Copy(PathBuf),
    /// Removes the path and what is below it.
    Remove(PathBuf),
}

/// Whether the guest's copy of an entry must be sent again.
fn stale(synced: &Synced, now: &Meta) -> bool {
    let was = &synced.meta;
    if was.kind != now.kind {
        return true;
    }
    match now.kind {
        // A directory's size and times change with its entries, which are
        // compared themselves.
        pb::FileKind::Directory => (was.mode, was.uid, was.gid) != (now.mode, now.uid, now.gid),
        pb::FileKind::File => was != now || !synced.settled,
        pb::FileKind::Symlink => was != now,
    }
}

/// What to send to turn `synced` into `now`: changed and new entries,
/// directories and files first (parents before children), then symlinks
/// (which may point at what was just copied: kubelet's `..data`), then
/// what went away (kubelet's old `..<timestamp>` directory, no longer
/// linked), a removed directory taking its content with it. An entry that
/// turns from a directory into something else, or back, is removed first.
fn diff(synced: &Snapshot, now: &Tree) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut removed = BTreeSet::new();
    for links in [false, true] {
        for (path, meta) in now {
            if (meta.kind == pb::FileKind::Symlink) != links {
                continue;
            }
            match synced.0.get(path) {
                None => changes.push(Change::Copy(path.clone())),
                Some(was) if stale(was, meta) => {
                    let is_dir = |kind| kind == pb::FileKind::Directory;
                    if is_dir(was.meta.kind) != is_dir(meta.kind) {
                        changes.push(Change::Remove(path.clone()));
                        removed.insert(path.as_path());
                    }
                    changes.push(Change::Copy(path.clone()));
                }
                Some(_) => {}
            }
        }
    }
    for path in synced.0.keys() {
        let implied = path.ancestors().skip(1).any(|a| removed.contains(a));
        if !now.contains_key(path) && !implied {
            changes.push(Change::Remove(path.clone()));
            removed.insert(path.as_path());
        }
    }
    changes
}

/// Walks `root` again while a directory changed during the walk (a walk
/// that crossed kubelet's swap would see `..data` point at a directory it
/// listed the root too early to see); after [`WALK_TRIES`] walks, the last
/// one stands (the next poll corrects it). Takes the sizes from `budget`
/// only when the walk succeeds.
fn walk_stable(root: &Path, budget: &mut u64) -> Result<Tree, WalkError> {
    let mut tries = 0;
    loop {
        let mut left = *budget;
        let entries = mounts::walk(root, &mut left)?;
        tries += 1;
        if tries >= WALK_TRIES || dirs_unchanged(root, &entries) {
            *budget = left;
            return Ok(entries.into_iter().map(|e| (e.relative, e.meta)).collect());
        }
    }
}

fn dirs_unchanged(root: &Path, entries: &[mounts::Entry]) -> bool {
    entries
        .iter()
        .filter(|e| e.meta.kind == pb::FileKind::Directory)
        .all(|e| {
            fs::symlink_metadata(mounts::entry_path(root, &e.relative)).is_ok_and(|m| {
                m.ino() == e.meta.ino
                    && mounts::time_ns(m.mtime(), m.mtime_nsec()) == e.meta.mtime_ns
                    && mounts::time_ns(m.ctime(), m.ctime_nsec()) == e.meta.ctime_ns
            })
        })
}

/// Runs until dropped: then the sync task is aborted.
pub struct SyncHandle {
    task: Option<JoinHandle<()>>,
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Starts keeping `mounts` (as `prepare` copied them) in sync with the
/// host, polling every [`POLL_INTERVAL`] until the handle is dropped.
pub fn spawn(agent: AgentClient, container_id: String, mounts: Vec<SyncedMount>) -> SyncHandle {
    if mounts.is_empty() {
        return SyncHandle { task: None };
    }
    let tracked = mounts.into_iter().map(Tracked::from).collect();
    SyncHandle {
        task: Some(tokio::spawn(run(agent, container_id, tracked))),
    }
}

/// Where changes are sent: the agent (a recording fake in tests).
trait Guest {
    async fn copy(&mut self, request: pb::CopyFileRequest) -> Result<()>;
    /// Removes a path; one already gone is fine.
    async fn remove(&mut self, path: String) -> Result<()>;
}

impl Guest for AgentClient {
    async fn copy(&mut self, request: pb::CopyFileRequest) -> Result<()> {
        agent_call("CopyFile", self.copy_file(request))
            .await
            .map(drop)
    }

    async fn remove(&mut self, path: String) -> Result<()> {
        let request = pb::RemoveFileRequest { path };
        match agent_call("RemoveFile", self.remove_file(request)).await {
            Err(Error::Agent { status, .. }) if status.code() == tonic::Code::NotFound => Ok(()),
            result => result.map(drop),
        }
    }
}

/// A mount as the sync task follows it.
struct Tracked {
    host_path: PathBuf,
    guest_base: String,
    synced: Snapshot,
    writable: bool,
    /// Writable with an unknown snapshot: the first walk becomes it.
    adopt: bool,
    /// Beyond the bounds: no longer synced.
    stopped: bool,
}

impl From<SyncedMount> for Tracked {
    fn from(mount: SyncedMount) -> Tracked {
        Tracked {
            host_path: mount.host_path,
            guest_base: mount.guest_base,
            adopt: mount.writable && mount.snapshot.is_none(),
            synced: mount.snapshot.unwrap_or_default(),
            writable: mount.writable,
            stopped: false,
        }
    }
}

/// A change ready to send: a copy carries the data read for it.
enum Step {
    Copy {
        relative: PathBuf,
        meta: Meta,
        data: Vec<u8>,
        read_at: SystemTime,
    },
    Remove(PathBuf),
}

async fn run<G: Guest>(mut guest: G, container_id: String, mut tracked: Vec<Tracked>) {
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        interval.tick().await;
        let Some(result) = poll(&mut guest, &container_id, &mut tracked).await else {
            tracing::debug!(container = %container_id, "no mount left to sync");
            return;
        };
        match result {
            Ok(()) if failing => {
                tracing::info!(container = %container_id, "mount sync works again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if failing => {
                tracing::debug!(container = %container_id, "mount sync: {}", crate::error_chain(&e));
            }
            Err(e) => {
                tracing::warn!(container = %container_id, "mount sync: {} (retrying)", crate::error_chain(&e));
                failing = true;
            }
        }
    }
}

/// One poll: walks the mounts (on the blocking pool: a hostPath may be on
/// a slow filesystem) and sends what changed. `None` once every mount is
/// stopped; the first send error otherwise (the mounts after it are still
/// tried; what was not sent is sent at the next poll).
async fn poll<G: Guest>(
    guest: &mut G,
    container_id: &str,
    tracked: &mut Vec<Tracked>,
) -> Option<Result<()>> {
    let id = container_id.to_string();
    let mut mounts = std::mem::take(tracked);
    let planned = tokio::task::spawn_blocking(move || {
        let plans = plan(&id, &mut mounts);
        (mounts, plans)
    })
    .await;
    let plans = match planned {
        Ok((mounts, plans)) => {
            *tracked = mounts;
            plans
        }
        Err(e) => {
            tracing::error!(container = %container_id, "mount sync stopped: {e}");
            return None;
        }
    };
    let mut outcome = Ok(());
    for (index, steps) in plans {
        let Some(mount) = tracked.get_mut(index) else {
            continue;
        };
        if let Err(e) = apply(guest, mount, steps).await {
            if outcome.is_ok() {
                outcome = Err(e);
            }
        }
    }
    if tracked.iter().all(|m| m.stopped) {
        return None;
    }
    Some(outcome)
}

/// The steps for each mount that changed (by index), bounded like
/// `prepare`: a mount beyond them is stopped, with a warning.
fn plan(container_id: &str, tracked: &mut [Tracked]) -> Vec<(usize, Vec<Step>)> {
    let mut budget = mounts::MAX_COPY_BYTES;
    let mut plans = Vec::new();
    for (index, mount) in tracked.iter_mut().enumerate() {
        if mount.stopped {
            continue;
        }
        let now = match walk_stable(&mount.host_path, &mut budget) {
            Ok(now) => now,
            Err(e @ (WalkError::TooMany(_) | WalkError::TooBig(_))) => {
                tracing::warn!(container = %container_id, "{e}: no longer kept in sync");
                mount.stopped = true;
                continue;
            }
            // Gone or unreadable for now (a hostPath being replaced): the
            // guest keeps its copy; the next poll looks again.
            Err(e) => {
                tracing::debug!(container = %container_id, "mount sync: {}", crate::error_chain(&e));
                continue;
            }
        };
        let root = PathBuf::new();
        if let (Some(was), Some(is)) = (mount.synced.0.get(&root), now.get(&root)) {
            if was.meta.kind != is.kind {
                // The container binds the root as it was.
                tracing::warn!(
                    container = %container_id,
                    host = %mount.host_path.display(),
                    "mount changed from {:?} to {:?}: no longer kept in sync",
                    was.meta.kind,
                    is.kind
                );
                mount.stopped = true;
                continue;
            }
        }
        if mount.adopt {
            mount.synced = Snapshot::adopted(&now);
            mount.adopt = false;
            continue;
        }
        if mount.writable {
            mount.synced.settle_all();
        }
        let steps: Vec<Step> = diff(&mount.synced, &now)
            .into_iter()
            .filter_map(|change| match change {
                Change::Remove(relative) => Some(Step::Remove(relative)),
                Change::Copy(relative) => {
                    let meta = now.get(&relative)?.clone();
                    let read_at = SystemTime::now();
                    match mounts::read(&mount.host_path, &relative, &meta) {
                        Ok(data) => Some(Step::Copy {
                            relative,
                            meta,
                            data,
                            read_at,
                        }),
                        // Gone since the walk, or unreadable: the next
                        // poll tells.
                        Err(e) => {
                            tracing::debug!(
                                container = %container_id,
                                path = %mounts::entry_path(&mount.host_path, &relative).display(),
                                "mount sync: cannot read: {e}"
                            );
                            None
                        }
                    }
                }
            })
            .collect();
        if !steps.is_empty() {
            plans.push((index, steps));
        }
    }
    plans
}

/// Sends a mount's steps in order, recording each one the guest took; the
/// first error ends them (the rest depend on it).
async fn apply<G: Guest>(guest: &mut G, mount: &mut Tracked, steps: Vec<Step>) -> Result<()> {
    for step in steps {
        match step {
            Step::Copy {
                relative,
                meta,
                data,
                read_at,
            } => {
                // The container binds a file mount's root itself: written
                // in place, or the bind would keep the old file.
                let in_place = relative.as_os_str().is_empty() && meta.kind == pb::FileKind::File;
                let request =
                    mounts::copy_request(&mount.guest_base, &relative, &meta, data, in_place);
                guest.copy(request).await?;
                mount.synced.insert(relative, meta, read_at);
            }
            Step::Remove(relative) => {
                guest
                    .remove(mounts::guest_path(&mount.guest_base, &relative))
                    .await?;
                mount.synced.remove_tree(&relative);
            }
        }
    }
    Ok(())
}

/// Copies writable single-file mounts back from the guest (termination
/// messages): for each (guest CopyFile path, host path) pair, at most
/// 1 MiB, written atomically over the host file. Call it after the
/// container exited and before its copies are removed. Errors are logged.
pub async fn copy_back(agent: &mut AgentClient, files: &[(String, PathBuf)]) {
    for (guest_path, host_path) in files {
        let request = pb::ReadFileRequest {
            path: guest_path.clone(),
        };
        let response = match agent_call("ReadFile", agent.read_file(request)).await {
            Ok(response) => response,
            Err(Error::Agent { status, .. }) if status.code() == tonic::Code::NotFound => {
                tracing::debug!(guest = %guest_path, "nothing to copy back");
                continue;
            }
            Err(e) => {
                tracing::warn!(
                    host = %host_path.display(),
                    "cannot copy the file back: {}",
                    crate::error_chain(&e)
                );
                continue;
            }
        };
        let mut data = response.data;
        if response.truncated || data.len() > MAX_COPY_BACK_BYTES {
            tracing::warn!(
                host = %host_path.display(),
                "the container wrote more than {} MiB: only the start is copied back",
                MAX_COPY_BACK_BYTES >> 20
            );
            data.truncate(MAX_COPY_BACK_BYTES);
        }
        let host = host_path.clone();
        match tokio::task::spawn_blocking(move || write_back(&host, &data)).await {
            Ok(Ok(())) => tracing::debug!(host = %host_path.display(), "file copied back"),
            Ok(Err(e)) => tracing::warn!("cannot copy the file back: {}", crate::error_chain(&e)),
            Err(e) => tracing::warn!(host = %host_path.display(), "cannot copy the file back: {e}"),
        }
    }
}

/// Replaces the regular file at `path` with `data`: written beside it and
/// renamed over it (kubelet reads the old or the new content, never a
/// mix), with the old file's mode and owner. Anything but a regular file
/// there is left alone.
fn write_back(path: &Path, data: &[u8]) -> Result<()> {
    let io = |what| {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    };
    let meta = fs::symlink_metadata(path).map_err(io("cannot read"))?;
    if !meta.is_file() {
        return Err(Error::FailedPrecondition(format!(
            "{} is no longer a regular file",
            path.display()
        )));
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut temp = tempfile::Builder::new()
        .prefix(".frakti-copy-back")
        .tempfile_in(dir)
        .map_err(io("cannot create a file beside"))?;
    temp.write_all(data).map_err(io("cannot write beside"))?;
    let file = temp.as_file();
    file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(io("cannot set the mode beside"))?;
    std::os::unix::fs::fchown(file, Some(meta.uid()), Some(meta.gid()))
        .map_err(io("cannot set the owner beside"))?;
    temp.persist(path).map_err(|e| Error::Io {
        what: "cannot replace",
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests;
