//! The content store: blobs (manifests, configs, layers) addressed by their
//! sha256 digest. A blob becomes visible under `blobs/sha256/<hex>` only
//! once all its bytes are written, fsynced and verified; a download in
//! progress lives under `ingest/` and can be resumed from where it stopped.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("'{0}' is not a sha256 digest")]
    BadDigest(String),
    #[error("blob {0} not found")]
    NotFound(String),
    #[error("digest mismatch: expected {expected}, got {actual}")]
    Mismatch { expected: String, actual: String },
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// A validated `sha256:<64 lowercase hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Digest(String);

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, Error> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| Error::BadDigest(s.to_string()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::BadDigest(s.to_string()));
        }
        Ok(Digest(s.to_string()))
    }

    pub fn of(data: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(data))
    }

    pub fn from_hasher(hasher: Sha256) -> Digest {
        let hex: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Digest(format!("sha256:{hex}"))
    }

    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Writes `data` to `path` atomically: a temp file beside it, fsync,
/// rename, fsync of the directory. A crash leaves the old file or the new
/// one, never a torn one.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // A unique temporary name: two writers of one path never share it.
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(data)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

/// Renames `from` to `to` and fsyncs the target directory.
pub fn commit_rename(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    File::open(to.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Names of `add_file`'s temporary copies in `ingest/`.
const ADD_PREFIX: &str = "add-";

pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
}

impl ContentStore {
    pub fn open(root: &Path) -> Result<ContentStore, Error> {
        let blobs = root.join("blobs/sha256");
        let ingest = root.join("ingest");
        for dir in [&blobs, &ingest] {
            fs::create_dir_all(dir).map_err(io_error("cannot create", dir))?;
        }
        // Downloads (`<hex>.partial`) are kept to be resumed; copies of
        // files by `add_file` cannot be, so a crash's leftovers go.
        for entry in fs::read_dir(&ingest)
            .map_err(io_error("cannot list", &ingest))?
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(ADD_PREFIX) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(ContentStore { blobs, ingest })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, Error> {
        let path = self.path(digest);
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NotFound(digest.to_string()),
            _ => Error::Io {
                what: "cannot read",
                path,
                source: e,
            },
        })
    }

    pub fn open_blob(&self, digest: &Digest) -> Result<File, Error> {
        let path = self.path(digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NotFound(digest.to_string()),
            _ => Error::Io {
                what: "cannot open",
                path,
                source: e,
            },
        })
    }

    /// Stores a small blob held in memory (manifests, configs), verifying
    /// its digest.
    pub fn put(&self, expected: &Digest, data: &[u8]) -> Result<(), Error> {
        let actual = Digest::of(data);
        if &actual != expected {
            return Err(Error::Mismatch {
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        let path = self.path(expected);
        if path.is_file() {
            return Ok(());
        }
        write_atomic(&path, data).map_err(io_error("cannot write", &path))
    }

    /// Copies a file whose digest is not known yet into the store, hashing
    /// it on the way (one read); returns its digest and size.
    pub fn add_file(&self, src: &Path) -> Result<(Digest, u64), Error> {
        let mut from = File::open(src).map_err(io_error("cannot open", src))?;
        let tmp = self.ingest.join(format!(
            "add-{}-{:?}.partial",
            std::process::id(),
            std::thread::current().id()
        ));
        let result = (|| {
            let mut to = File::create(&tmp).map_err(io_error("cannot create", &tmp))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0; 1 << 20];
            let mut size = 0u64;
            loop {
                let n = from.read(&mut buf).map_err(io_error("cannot read", src))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                to.write_all(&buf[..n])
                    .map_err(io_error("cannot write", &tmp))?;
                size = size.saturating_add(n as u64);
            }
            to.sync_all().map_err(io_error("cannot sync", &tmp))?;
            let digest = Digest::from_hasher(hasher);
            let target = self.path(&digest);
            commit_rename(&tmp, &target).map_err(io_error("cannot commit", &target))?;
            Ok((digest, size))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Starts or resumes writing the blob `digest` of `size` bytes.
    pub fn ingest(&self, digest: &Digest, size: u64) -> Result<Ingest, Error> {
        let path = self.ingest.join(format!("{}.partial", digest.hex()));
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_error("cannot open", &path))?;
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        let mut buf = vec![0; 256 * 1024];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(io_error("cannot read", &path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            offset = offset.saturating_add(n as u64);
        }
        if offset > size {
            // Longer than the blob: not a prefix of it; start over.
            file.set_len(0)
                .map_err(io_error("cannot truncate", &path))?;
            hasher = Sha256::new();
            offset = 0;
        }
        Ok(Ingest {
            digest: digest.clone(),
            size,
            offset,
            hasher,
            file,
            path,
            target: self.path(digest),
        })
    }

    /// Blobs present, with their sizes.
    pub fn list(&self) -> Result<Vec<(Digest, u64)>, Error> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.blobs).map_err(io_error("cannot list", &self.blobs))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
                continue;
            };
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((digest, size));
        }
        Ok(out)
    }

    pub fn remove(&self, digest: &Digest) -> Result<(), Error> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io {
                what: "cannot remove",
                path,
                source,
            }),
        }
    }
}

/// A blob being written; `commit` verifies and publishes it.
pub struct Ingest {
    digest: Digest,
    size: u64,
    offset: u64,
    hasher: Sha256,
    file: File,
    path: PathBuf,
    target: PathBuf,
}

impl Ingest {
    /// Bytes already present (from an earlier, interrupted download).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Drops the partial blob: its bytes cannot become valid.
    pub fn discard(self) {
        let _ = fs::remove_file(&self.path);
    }

    /// Forgets what was written (the server would not resume).
    pub fn restart(&mut self) -> Result<(), Error> {
        self.file
            .set_len(0)
            .map_err(io_error("cannot truncate", &self.path))?;
        self.hasher = Sha256::new();
        self.offset = 0;
        Ok(())
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        let end = self.offset.saturating_add(data.len() as u64);
        if end > self.size {
            return Err(Error::SizeMismatch {
                digest: self.digest.to_string(),
                expected: self.size,
                actual: end,
            });
        }
        self.file
            .write_all(data)
            .map_err(io_error("cannot write", &self.path))?;
        self.hasher.update(data);
        self.offset = end;
        Ok(())
    }

    /// Verifies size and digest, then moves the blob into the store. A
    /// mismatch deletes the partial data: it can never become valid.
    pub fn commit(self) -> Result<(), Error> {
        if self.offset != self.size {
            let _ = fs::remove_file(&self.path);
            return Err(Error::SizeMismatch {
                digest: self.digest.to_string(),
                expected: self.size,
                actual: self.offset,
            });
        }
        let actual = Digest::from_hasher(self.hasher);
        if actual != self.digest {
            let _ = fs::remove_file(&self.path);
            return Err(Error::Mismatch {
                expected: self.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        self.file
            .sync_all()
            .map_err(io_error("cannot sync", &self.path))?;
        commit_rename(&self.path, &self.target).map_err(io_error("cannot commit", &self.target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_validated() {
        assert!(Digest::parse("sha256:abc").is_err());
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(64))).is_err());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(Digest::parse(&format!("sha256:{}/", "a".repeat(63))).is_err());
        let d = Digest::of(b"hello");
        assert_eq!(
            d.as_str(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(Digest::parse(d.as_str()).unwrap(), d);
    }

    #[test]
    fn ingest_resumes_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let data = b"0123456789".repeat(1000);
        let digest = Digest::of(&data);
        let mut ingest = store.ingest(&digest, data.len() as u64).unwrap();
        ingest.write(&data[..4000]).unwrap();
        drop(ingest);
        assert!(!store.contains(&digest), "a partial blob is not visible");
        let mut ingest = store.ingest(&digest, data.len() as u64).unwrap();
        assert_eq!(ingest.offset(), 4000);
        ingest.write(&data[4000..]).unwrap();
        ingest.commit().unwrap();
        assert_eq!(store.read(&digest).unwrap(), data);
    }

    #[test]
    fn files_of_unknown_digest_are_added_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(&dir.path().join("store")).unwrap();
        let src = dir.path().join("layer.tar");
        std::fs::write(&src, b"layer bytes").unwrap();
        let (digest, size) = store.add_file(&src).unwrap();
        assert_eq!((digest.clone(), size), (Digest::of(b"layer bytes"), 11));
        assert_eq!(store.read(&digest).unwrap(), b"layer bytes");
        assert!(store.add_file(&dir.path().join("missing")).is_err());
        assert_eq!(
            std::fs::read_dir(dir.path().join("store/ingest"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn bad_content_is_refused_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let digest = Digest::of(b"good");
        let mut ingest = store.ingest(&digest, 4).unwrap();
        ingest.write(b"evil").unwrap();
        assert!(matches!(ingest.commit(), Err(Error::Mismatch { .. })));
        assert!(!store.contains(&digest));
        assert_eq!(store.ingest(&digest, 4).unwrap().offset(), 0);
        let mut ingest = store.ingest(&digest, 4).unwrap();
        assert!(matches!(
            ingest.write(b"toolong"),
            Err(Error::SizeMismatch { .. })
        ));
        assert!(store.put(&digest, b"evil").is_err());
        store.put(&digest, b"good").unwrap();
        assert!(store.contains(&digest));
    }
}
