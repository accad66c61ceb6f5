//! The image store's front: the operations the ImageService and the
//! runtime call (pull, import, list, status, remove, usage, disk leases),
//! over the content store, the records and the disks under one root
//! (`/var/lib/frakti/images` by default):
//!
//! ```text
//! blobs/sha256/<hex>   content (manifests, configs, layers)
//! ingest/              downloads in progress (resumable)
//! images/<id>.json     image records (written last: an image is complete)
//! disks/<id>.<fs>      one read-only disk per image
//! tmp/                 scratch trees and archives being imported
//! ```

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::content::{self, ContentStore, Digest};
use super::disk::{DiskFormat, ErofsCompression};
use super::records::{self, ImageRecord, Records};
use super::reference::{self, Lookup};
use super::{auth, build, hosts, manifest, registry};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Reference(#[from] reference::Error),
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error(transparent)]
    Hosts(#[from] hosts::Error),
    #[error(transparent)]
    Auth(#[from] auth::Error),
    #[error(transparent)]
    Manifest(#[from] manifest::Error),
    #[error(transparent)]
    Content(#[from] content::Error),
    #[error(transparent)]
    Record(#[from] records::Error),
    #[error("cannot build the image disk")]
    Build(#[from] build::Error),
    #[error("image {0} not found")]
    NotFound(String),
    #[error("{0}")]
    InvalidArchive(String),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Shared(Arc<Error>),
    #[error("the store is shutting down")]
    Closed,
}

pub(super) fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The store's root, e.g. `/var/lib/frakti/images`.
    pub root: PathBuf,
    /// containerd-style registry hosts (`<dir>/<host>/hosts.toml`).
    pub certs_dir: PathBuf,
    /// A Docker config.json with node credentials (None: Docker's default).
    pub docker_config: Option<PathBuf>,
    pub disk_format: DiskFormat,
    pub erofs_compression: ErofsCompression,
    /// Pulls of different images running at once.
    pub max_parallel_pulls: usize,
    /// Layer downloads running at once within one pull.
    pub max_parallel_layers: usize,
}

impl StoreConfig {
    pub fn new(root: &Path) -> StoreConfig {
        StoreConfig {
            root: root.to_path_buf(),
            certs_dir: PathBuf::from(super::hosts::DEFAULT_CERTS_DIR),
            docker_config: None,
            disk_format: DiskFormat::Erofs,
            erofs_compression: ErofsCompression::None,
            max_parallel_pulls: 3,
            max_parallel_layers: 3,
        }
    }
}

/// Progress of one blob of a pull, for logs and the CLI's bars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub image: String,
    pub digest: String,
    pub done: u64,
    pub total: u64,
}

/// A disk in use by a container: the disk stays on the host (even if the
/// image is removed) until the last lease is dropped.
pub struct DiskLease {
    pub image: Digest,
    pub path: PathBuf,
    pub format: DiskFormat,
    store: Arc<Inner>,
}

impl DiskLease {
    /// The image's /etc/`name` ("passwd" or "group") as kept at build time.
    pub fn account_file(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.path.with_extension(name)).ok()
    }
}

impl Drop for DiskLease {
    fn drop(&mut self) {
        self.store.release(&self.image);
    }
}

/// Usage of the store's filesystem for ImageFsInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsUsage {
    pub mountpoint: PathBuf,
    pub used_bytes: u64,
    pub inodes_used: u64,
}

pub(super) struct Inner {
    pub(super) config: StoreConfig,
    pub(super) content: ContentStore,
    pub(super) records: Mutex<Records>,
    pub(super) disks: PathBuf,
    pub(super) tmp: PathBuf,
    /// Pulls in flight by reference: a second pull of the same reference
    /// waits for the first one's result instead of fetching again.
    pub(super) inflight: Mutex<HashMap<String, super::pull::SharedPull>>,
    /// One download per blob, one disk build per image, across pulls.
    pub(super) blob_locks: KeyedLocks,
    pub(super) pulls: tokio::sync::Semaphore,
    pub(super) progress: tokio::sync::broadcast::Sender<Progress>,
    /// Disk leases by image id.
    leases: Mutex<HashMap<Digest, usize>>,
}

/// One async lock per digest, in the map only while someone holds or
/// waits for it (a long-running daemon sees many digests).
#[derive(Default)]
pub(super) struct KeyedLocks(Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>);

pub(super) struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: Digest,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub(super) async fn lock(&self, key: &Digest) -> KeyedGuard<'_> {
        let mutex = lock(&self.0).entry(key.clone()).or_default().clone();
        KeyedGuard {
            locks: self,
            key: key.clone(),
            guard: Some(mutex.lock_owned().await),
        }
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = lock(&self.locks.0);
        // Only the map's own reference left: nobody waits.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

pub(super) use crate::lock;

impl Inner {
    fn release(&self, id: &Digest) {
        let last = {
            let mut leases = lock(&self.leases);
            match leases.get_mut(id) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => {
                    leases.remove(id);
                    true
                }
            }
        };
        // A removed image's disk goes with its last user.
        if last && lock(&self.records).get(id).is_none() {
            self.remove_disk_files(id);
        }
    }

    pub(super) fn disk_path(&self, id: &Digest, format: DiskFormat) -> PathBuf {
        self.disks
            .join(format!("{}.{}", id.hex(), format.fs_type()))
    }

    fn remove_disk_files(&self, id: &Digest) {
        let disks = [DiskFormat::Erofs, DiskFormat::Ext4].map(|f| self.disk_path(id, f));
        let accounts = build::ACCOUNT_FILES.map(|name| disks[0].with_extension(name));
        for path in disks.into_iter().chain(accounts) {
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), "cannot remove disk: {e}");
                }
            }
        }
    }

    pub(super) fn find(&self, lookup: &Lookup) -> Option<ImageRecord> {
        let records = lock(&self.records);
        match lookup {
            Lookup::Id(id) => records.get(id).cloned(),
            Lookup::Ref(r) => records.by_reference(&r.name()).cloned(),
        }
    }
}

#[derive(Clone)]
pub struct ImageStore {
    pub(super) inner: Arc<Inner>,
}

impl ImageStore {
    /// Opens (or creates) the store; downloads and scratch trees left by a
    /// daemon that died are dropped.
    pub fn open(config: StoreConfig) -> Result<ImageStore, Error> {
        let root = &config.root;
        let content = ContentStore::open(root)?;
        let records = Records::load(&root.join("images"))?;
        let disks = root.join("disks");
        let tmp = root.join("tmp");
        fs::create_dir_all(&disks).map_err(io_error("cannot create", &disks))?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_error("cannot clean", &tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_error("cannot create", &tmp))?;
        let (progress, _) = tokio::sync::broadcast::channel(1024);
        let pulls = tokio::sync::Semaphore::new(config.max_parallel_pulls.max(1));
        Ok(ImageStore {
            inner: Arc::new(Inner {
                config,
                content,
                records: Mutex::new(records),
                disks,
                tmp,
                inflight: Mutex::new(HashMap::new()),
                blob_locks: KeyedLocks::default(),
                pulls,
                progress,
                leases: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    pub fn root(&self) -> &Path {
        &self.inner.config.root
    }

    /// Progress events of every pull from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Progress> {
        self.inner.progress.subscribe()
    }

    /// Images, optionally only those a reference or id names.
    pub fn list(&self, filter: Option<&str>) -> Result<Vec<ImageRecord>, Error> {
        let filter = filter.map(str::trim).filter(|f| !f.is_empty());
        match filter {
            None => Ok(lock(&self.inner.records).all().cloned().collect()),
            Some(f) => Ok(self.status(f)?.into_iter().collect()),
        }
    }

    /// The image an id or reference names; `None` when unknown.
    pub fn status(&self, image: &str) -> Result<Option<ImageRecord>, Error> {
        Ok(self.inner.find(&Lookup::parse(image)?))
    }

    /// Removes the image with every reference to it; unknown images are
    /// not an error. Its disk stays while containers use it.
    pub fn remove(&self, image: &str) -> Result<(), Error> {
        let lookup = Lookup::parse(image)?;
        let Some(record) = self.inner.find(&lookup) else {
            return Ok(());
        };
        lock(&self.inner.records).remove(&record.id)?;
        tracing::info!(id = %record.id, "image removed");
        if !lock(&self.inner.leases).contains_key(&record.id) {
            self.inner.remove_disk_files(&record.id);
        }
        self.collect_garbage()?;
        Ok(())
    }

    /// A lease on an image's disk, for a container.
    pub fn lease(&self, image: &str) -> Result<DiskLease, Error> {
        let lookup = Lookup::parse(image)?;
        let record = self
            .inner
            .find(&lookup)
            .ok_or_else(|| Error::NotFound(image.to_string()))?;
        *lock(&self.inner.leases)
            .entry(record.id.clone())
            .or_insert(0) += 1;
        let format = self.inner.config.disk_format;
        Ok(DiskLease {
            path: self.inner.config.root.join("disks").join(&record.disk),
            image: record.id,
            format: if record.disk.ends_with(".ext4") {
                DiskFormat::Ext4
            } else {
                format
            },
            store: self.inner.clone(),
        })
    }

    /// Deletes blobs no image record references and disks of images that
    /// are gone and unleased.
    pub fn collect_garbage(&self) -> Result<u64, Error> {
        let (wanted, disks): (Vec<Digest>, Vec<String>) = {
            let records = lock(&self.inner.records);
            let mut wanted = Vec::new();
            let mut disks = Vec::new();
            for r in records.all() {
                wanted.push(r.id.clone());
                wanted.push(r.manifest.clone());
                wanted.extend(r.layers.iter().map(|l| l.digest.clone()));
                wanted.extend(r.index.iter().cloned());
                disks.push(r.disk.clone());
            }
            (wanted, disks)
        };
        // A pull in flight holds blobs no record names yet.
        if !lock(&self.inner.inflight).is_empty() {
            return Ok(0);
        }
        let mut freed = 0;
        for (digest, size) in self.inner.content.list()? {
            if !wanted.contains(&digest) {
                self.inner.content.remove(&digest)?;
                freed += size;
            }
        }
        let leased: Vec<Digest> = lock(&self.inner.leases).keys().cloned().collect();
        let entries =
            fs::read_dir(&self.inner.disks).map_err(io_error("cannot list", &self.inner.disks))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let hex = name.split('.').next().unwrap_or_default();
            let in_use = leased.iter().any(|d| d.hex() == hex);
            // A disk and its account files (`<hex>.passwd`) go together.
            let wanted = disks.iter().any(|d| d.split('.').next() == Some(hex));
            if !wanted && !in_use {
                freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(freed)
    }

    /// Bytes and inodes the store occupies, for ImageFsInfo.
    pub fn usage(&self) -> Result<FsUsage, Error> {
        let mut used_bytes = 0u64;
        let mut inodes_used = 0u64;
        let mut pending = vec![self.inner.config.root.clone()];
        while let Some(dir) = pending.pop() {
            inodes_used += 1;
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                // Scratch trees come and go under a running pull.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("cannot list", &dir)(e)),
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    pending.push(entry.path());
                } else {
                    inodes_used += 1;
                    used_bytes = used_bytes.saturating_add(
                        std::os::unix::fs::MetadataExt::blocks(&meta).saturating_mul(512),
                    );
                }
            }
        }
        Ok(FsUsage {
            mountpoint: self.inner.config.root.clone(),
            used_bytes,
            inodes_used,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::records::ImageConfig;

    #[tokio::test]
    async fn keyed_locks_serialize_per_key_and_forget_released_keys() {
        let locks = Arc::new(KeyedLocks::default());
        let key = Digest::of(b"k");
        let first = locks.lock(&key).await;
        let waiter = {
            let locks = locks.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let _second = locks.lock(&key).await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the second holder waits");
        let other = locks.lock(&Digest::of(b"other")).await;
        drop(other);
        drop(first);
        waiter.await.unwrap();
        assert!(lock(&locks.0).is_empty(), "released keys are forgotten");
    }

    fn store_with_image(dir: &Path) -> (ImageStore, Digest, PathBuf) {
        let store = ImageStore::open(StoreConfig::new(dir)).unwrap();
        let id = Digest::of(b"config");
        let disk = format!("{}.erofs", id.hex());
        let path = dir.join("disks").join(&disk);
        fs::write(&path, b"disk").unwrap();
        let record = ImageRecord {
            id: id.clone(),
            manifest: Digest::of(b"manifest"),
            index: None,
            config: ImageConfig::default(),
            layers: Vec::new(),
            repo_tags: vec!["docker.io/library/x:1".into()],
            repo_digests: Vec::new(),
            size: 4,
            disk,
            disk_size: 4,
            created: 0,
        };
        lock(&store.inner.records).put(record).unwrap();
        (store, id, path)
    }

    #[test]
    fn a_leased_disk_outlives_its_image_until_the_last_lease() {
        let dir = tempfile::tempdir().unwrap();
        let (store, id, disk) = store_with_image(dir.path());
        let first = store.lease("x:1").unwrap();
        let second = store.lease(id.as_str()).unwrap();
        assert_eq!(first.path, disk);
        store.remove("x:1").unwrap();
        assert!(store.status(id.as_str()).unwrap().is_none());
        assert!(disk.exists(), "in use: kept");
        drop(first);
        assert!(disk.exists(), "one lease left");
        drop(second);
        assert!(!disk.exists(), "the last user gone: deleted");
        assert!(store.lease("x:1").is_err());
    }

    #[test]
    fn an_unleased_disk_goes_with_its_image_and_records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (store, id, disk) = store_with_image(dir.path());
        drop(store);
        let store = ImageStore::open(StoreConfig::new(dir.path())).unwrap();
        assert_eq!(store.status("x:1").unwrap().map(|r| r.id), Some(id.clone()));
        assert_eq!(store.list(None).unwrap().len(), 1);
        assert!(store.usage().unwrap().used_bytes > 0);
        store.remove(id.hex()).unwrap();
        store.remove(id.hex()).unwrap();
        assert!(!disk.exists());
        assert!(store.list(None).unwrap().is_empty());
    }
}
