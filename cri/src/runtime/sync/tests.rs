use std::fs::File;

use super::*;

fn tree(root: &Path) -> Tree {
    walk_stable(root, &mut mounts::MAX_COPY_BYTES.clone()).unwrap()
}

/// What the guest holds after `tree` was sent, read long after its
/// mtimes (`settled`) or just now.
fn sent(tree: &Tree, settled: bool) -> Snapshot {
    let read_at = if settled {
        SystemTime::now() + Duration::from_secs(60)
    } else {
        SystemTime::now()
    };
    let mut snapshot = Snapshot::default();
    for (path, meta) in tree {
        snapshot.insert(path.clone(), meta.clone(), read_at);
    }
    snapshot
}

fn copy(path: &str) -> Change {
    Change::Copy(PathBuf::from(path))
}

fn remove(path: &str) -> Change {
    Change::Remove(PathBuf::from(path))
}

fn set_mtime(path: &Path, ago: Duration) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() - ago)
        .unwrap();
}

#[test]
fn new_changed_and_removed_entries() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::write(root.join("a"), "1").unwrap();
    fs::write(root.join("b"), "2").unwrap();
    fs::create_dir(root.join("d")).unwrap();
    fs::write(root.join("d/x"), "x").unwrap();
    let synced = sent(&tree(root), true);
    assert_eq!(diff(&synced, &tree(root)), []);
    fs::write(root.join("a"), "changed").unwrap();
    fs::remove_file(root.join("b")).unwrap();
    fs::write(root.join("c"), "new").unwrap();
    fs::remove_dir_all(root.join("d")).unwrap();
    assert_eq!(
        diff(&synced, &tree(root)),
        [copy("a"), copy("c"), remove("b"), remove("d")]
    );
}

#[test]
fn same_size_changes_and_recent_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a");
    fs::write(&file, "v1").unwrap();
    set_mtime(&file, Duration::from_secs(3600));
    let before = tree(dir.path());
    let synced = sent(&before, true);
    // Same size, another mtime.
    fs::write(&file, "v2").unwrap();
    set_mtime(&file, Duration::from_secs(1800));
    assert_eq!(diff(&synced, &tree(dir.path())), [copy("a")]);
    // Content read too soon after its mtime is sent again until a read
    // comes late enough; mode and owner changes show too.
    fs::write(&file, "v3").unwrap();
    let now = tree(dir.path());
    assert_eq!(diff(&sent(&now, false), &now), [copy("a")]);
    assert_eq!(diff(&sent(&now, true), &now), []);
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(diff(&sent(&now, true), &tree(dir.path())), [copy("a")]);
}

#[test]
fn kubelet_data_swap_is_sent_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir(root.join("..2024_01")).unwrap();
    fs::write(root.join("..2024_01/key"), "v1").unwrap();
    std::os::unix::fs::symlink("..2024_01", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/key", root.join("key")).unwrap();
    let synced = sent(&tree(root), true);
    // kubelet's AtomicWriter.
    fs::create_dir(root.join("..2024_02")).unwrap();
    fs::write(root.join("..2024_02/key"), "v2").unwrap();
    std::os::unix::fs::symlink("..2024_02", root.join("..data_tmp")).unwrap();
    fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    fs::remove_dir_all(root.join("..2024_01")).unwrap();
    assert_eq!(
        diff(&synced, &tree(root)),
        [
            copy("..2024_02"),
            copy("..2024_02/key"),
            copy("..data"),
            remove("..2024_01"),
        ]
    );
}

#[test]
fn kind_changes_remove_first() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir(root.join("d")).unwrap();
    fs::write(root.join("d/x"), "x").unwrap();
    fs::write(root.join("e"), "e").unwrap();
    std::os::unix::fs::symlink("e", root.join("l")).unwrap();
    let synced = sent(&tree(root), true);
    fs::remove_dir_all(root.join("d")).unwrap();
    fs::write(root.join("d"), "now a file").unwrap();
    fs::remove_file(root.join("e")).unwrap();
    fs::create_dir(root.join("e")).unwrap();
    fs::write(root.join("e/y"), "y").unwrap();
    // A link replaced by a file is simply overwritten.
    fs::remove_file(root.join("l")).unwrap();
    fs::write(root.join("l"), "l").unwrap();
    assert_eq!(
        diff(&synced, &tree(root)),
        [
            remove("d"),
            copy("d"),
            remove("e"),
            copy("e"),
            copy("e/y"),
            copy("l"),
        ]
    );
}

/// Records what it is sent; fails the call numbered `fail_at`.
#[derive(Default)]
struct Recorder {
    sent: Vec<String>,
    requests: Vec<pb::CopyFileRequest>,
    fail_at: Option<usize>,
}

impl Recorder {
    fn check(&mut self) -> Result<()> {
        if self.fail_at == Some(self.sent.len()) {
            self.fail_at = None;
            return Err(Error::AgentTimeout("CopyFile"));
        }
        Ok(())
    }

    fn take(&mut self) -> Vec<String> {
        std::mem::take(&mut self.sent)
    }
}

impl Guest for Recorder {
    async fn copy(&mut self, request: pb::CopyFileRequest) -> Result<()> {
        self.check()?;
        self.sent.push(format!("copy {}", request.path));
        self.requests.push(request);
        Ok(())
    }

    async fn remove(&mut self, path: String) -> Result<()> {
        self.check()?;
        self.sent.push(format!("remove {path}"));
        Ok(())
    }
}

fn tracked(root: &Path, base: &str) -> Tracked {
    Tracked::from(SyncedMount {
        host_path: root.to_path_buf(),
        guest_base: base.to_string(),
        snapshot: None,
        writable: false,
    })
}

#[tokio::test]
async fn polls_send_differences_and_resume_after_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for name in ["a", "b"] {
        fs::write(root.join(name), name).unwrap();
        set_mtime(&root.join(name), Duration::from_secs(60));
    }
    let mut mounts = vec![tracked(root, "containers/c/0")];
    let mut guest = Recorder {
        fail_at: Some(1),
        ..Default::default()
    };
    let result = poll(&mut guest, "c", &mut mounts).await.unwrap();
    assert!(matches!(result, Err(Error::AgentTimeout(_))));
    assert_eq!(guest.take(), ["copy containers/c/0"]);
    poll(&mut guest, "c", &mut mounts).await.unwrap().unwrap();
    assert_eq!(
        guest.take(),
        ["copy containers/c/0/a", "copy containers/c/0/b"]
    );
    assert!(guest.requests.iter().all(|r| !r.in_place));
    assert_eq!(guest.requests[1].data, b"a");
    poll(&mut guest, "c", &mut mounts).await.unwrap().unwrap();
    assert_eq!(guest.take(), Vec::<String>::new());
    fs::remove_file(root.join("a")).unwrap();
    poll(&mut guest, "c", &mut mounts).await.unwrap().unwrap();
    assert_eq!(guest.take(), ["remove containers/c/0/a"]);
}

#[tokio::test]
async fn single_file_mounts_are_written_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hosts");
    fs::write(&file, "127.0.0.1 localhost\n").unwrap();
    set_mtime(&file, Duration::from_secs(60));
    let mut mounts = vec![tracked(&file, "containers/c/1")];
    let mut guest = Recorder::default();
    poll(&mut guest, "c", &mut mounts).await.unwrap().unwrap();
    assert_eq!(guest.take(), ["copy containers/c/1"]);
    assert!(guest.requests[0].in_place);
    // Gone for a while: the guest keeps its copy.
    fs::remove_file(&file).unwrap();
    poll(&mut guest, "c", &mut mounts).await.unwrap().unwrap();
    assert_eq!(guest.take(), Vec::<String>::new());
    assert!(!mounts[0].stopped);
    // Back as a directory: the container's bind is of a file.
    fs::create_dir(&file).unwrap();
    assert!(poll(&mut guest, "c", &mut mounts).await.is_none());
    assert_eq!(guest.take(), Vec::<String>::new());
}

#[tokio::test]
async fn writable_mounts_send_only_host_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("termination-log");
    // Written just now, as kubelet does before the container starts: an
    // unsettled file that a read-only mount would send again.
    fs::write(&file, "").unwrap();
    let mut budget = u64::MAX;
    let snapshot = mounts::walk(&file, &mut budget).unwrap().into_iter().fold(
        Snapshot::default(),
        |mut snapshot, entry| {
            snapshot.insert(entry.relative, entry.meta, SystemTime::now());
            snapshot
        },
    );
    let mut mounts = vec![Tracked::from(SyncedMount {
        host_path: file.clone(),
        guest_base: "containers/c/0".into(),
        snapshot: Some(snapshot),
        writable: true,
    })];
    let mut guest = Recorder::default();
    poll(&mut guest, "c", &mut mounts).await.unwrap().unwrap();
    assert_eq!(guest.take(), Vec::<String>::new());
    fs::write(&file, "from the host").unwrap();
    poll(&mut guest, "c", &mut mounts).await.unwrap().unwrap();
    assert_eq!(guest.take(), ["copy containers/c/0"]);

    // After a daemon restart the snapshot is unknown: the host's tree is
    // taken as what the guest holds, nothing is sent until it changes.
    let mut mounts = vec![Tracked::from(SyncedMount {
        host_path: file.clone(),
        guest_base: "containers/c/0".into(),
        snapshot: None,
        writable: true,
    })];
    poll(&mut guest, "c", &mut mounts).await.unwrap().unwrap();
    poll(&mut guest, "c", &mut mounts).await.unwrap().unwrap();
    assert_eq!(guest.take(), Vec::<String>::new());
    fs::write(&file, "changed").unwrap();
    poll(&mut guest, "c", &mut mounts).await.unwrap().unwrap();
    assert_eq!(guest.take(), ["copy containers/c/0"]);
}

#[tokio::test]
async fn mounts_beyond_the_bounds_stop_alone() {
    let small = tempfile::tempdir().unwrap();
    let growing = tempfile::tempdir().unwrap();
    let many = tempfile::tempdir().unwrap();
    fs::write(small.path().join("a"), "a").unwrap();
    for i in 0..mounts::MAX_COPY_ENTRIES {
        File::create(many.path().join(i.to_string())).unwrap();
    }
    let mut mounts = vec![
        tracked(small.path(), "containers/c/0"),
        tracked(growing.path(), "containers/c/1"),
        tracked(many.path(), "containers/c/2"),
    ];
    let mut guest = Recorder::default();
    poll(&mut guest, "c", &mut mounts).await.unwrap().unwrap();
    assert_eq!(
        guest.take(),
        [
            "copy containers/c/0",
            "copy containers/c/0/a",
            "copy containers/c/1"
        ]
    );
    assert!(!mounts[0].stopped && !mounts[1].stopped && mounts[2].stopped);
    // Together over the byte budget: the second mount stops, the first
    // goes on.
    fs::write(small.path().join("a"), "changed").unwrap();
    File::create(growing.path().join("big"))
        .unwrap()
        .set_len(mounts::MAX_COPY_BYTES)
        .unwrap();
    let result = poll(&mut guest, "c", &mut mounts).await.unwrap();
    result.unwrap();
    assert!(guest.take().contains(&"copy containers/c/0/a".to_string()));
    assert!(mounts[1].stopped);
    fs::write(growing.path().join("more"), "x").unwrap();
    poll(&mut guest, "c", &mut mounts).await.unwrap().unwrap();
    assert!(guest.take().iter().all(|s| !s.contains("containers/c/1")));
}

#[test]
fn write_back_replaces_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("termination-log");
    fs::write(&file, "").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();
    let inode = fs::metadata(&file).unwrap().ino();
    write_back(&file, b"it ended badly").unwrap();
    let meta = fs::metadata(&file).unwrap();
    assert_ne!(meta.ino(), inode, "renamed over, not written into");
    assert_eq!(meta.mode() & 0o7777, 0o666);
    assert_eq!(fs::read(&file).unwrap(), b"it ended badly");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp left");
    assert!(write_back(&dir.path().join("gone"), b"x").is_err());
    assert!(write_back(dir.path(), b"x").is_err());
    assert!(dir.path().is_dir());
}
