//! Direct-assigned filesystem volumes: a volume driver (a CSI node
//! plugin's NodePublishVolume) registers the block device (or image file)
//! behind a kubelet volume path with `frakti volume add` instead of
//! mounting it on the host. The record lives under the state dir,
//! `<root>/volumes/<sha256 of the volume path>.json`; at CreateContainer a
//! CRI mount whose host path has one becomes a disk of the pod's VM that
//! the agent mounts with the recorded filesystem type and options.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::runtime::state;

/// Filesystems a direct volume may have (the guest kernel's).
pub const FS_TYPES: &[&str] = &["ext4", "ext3", "ext2", "xfs"];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("no direct volume is registered for {0}")]
    NotFound(PathBuf),
    #[error("the direct volume {path} is in use by pod sandbox {pod}: stop the pod first")]
    InUse { path: PathBuf, pod: String },
    #[error(transparent)]
    State(#[from] state::Error),
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What `frakti volume add` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The kubelet volume path (the CRI mount's host path).
    pub path: PathBuf,
    /// A block device or a filesystem image file.
    pub device: PathBuf,
    pub fs_type: String,
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub read_only: bool,
}

impl VolumeRecord {
    /// Checks a record before it is written.
    pub fn validate(&self) -> Result<(), Error> {
        if !self.path.is_absolute() {
            return Err(Error::Invalid(format!(
                "--path {} must be absolute (kubelet's volume path)",
                self.path.display()
            )));
        }
        if !FS_TYPES.contains(&self.fs_type.as_str()) {
            return Err(Error::Invalid(format!(
                "--fstype {:?} is not one of {}",
                self.fs_type,
                FS_TYPES.join(", ")
            )));
        }
        for option in &self.options {
            if option.is_empty() || option.contains(',') || option.contains('\0') {
                return Err(Error::Invalid(format!(
                    "--options: {option:?} is not one mount option"
                )));
            }
        }
        let meta = std::fs::metadata(&self.device)
            .map_err(|e| Error::Invalid(format!("--device {}: {e}", self.device.display())))?;
        if !meta.file_type().is_block_device() && !meta.is_file() {
            return Err(Error::Invalid(format!(
                "--device {} is neither a block device nor a filesystem image file",
                self.device.display()
            )));
        }
        Ok(())
    }
}

/// The records under `<root>/volumes`.
#[derive(Debug, Clone)]
pub struct VolumeStore {
    dir: PathBuf,
}

impl VolumeStore {
    pub fn new(root: &Path) -> VolumeStore {
        VolumeStore {
            dir: root.join("volumes"),
        }
    }

    fn file(&self, path: &Path) -> PathBuf {
        let key = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
        self.dir.join(format!("{}.json", hex(&key)))
    }

    /// Registers (or replaces) the record of its volume path.
    pub fn add(&self, record: &VolumeRecord) -> Result<(), Error> {
        record.validate()?;
        std::fs::create_dir_all(&self.dir).map_err(|source| Error::Io {
            what: "create",
            path: self.dir.clone(),
            source,
        })?;
        let device = std::fs::canonicalize(&record.device).map_err(|source| Error::Io {
            what: "resolve",
            path: record.device.clone(),
            source,
        })?;
        let record = VolumeRecord {
            device,
            ..record.clone()
        };
        state::write_json(&self.file(&record.path), &record)?;
        Ok(())
    }

    /// The record of volume path `path`, if one was added.
    pub fn get(&self, path: &Path) -> Result<Option<VolumeRecord>, Error> {
        let file = self.file(path);
        if !file.exists() {
            return Ok(None);
        }
        Ok(Some(state::read_json(&file)?))
    }

    pub fn remove(&self, path: &Path) -> Result<VolumeRecord, Error> {
        let record = self
            .get(path)?
            .ok_or_else(|| Error::NotFound(path.to_path_buf()))?;
        let file = self.file(path);
        std::fs::remove_file(&file).map_err(|source| Error::Io {
            what: "remove",
            path: file,
            source,
        })?;
        Ok(record)
    }

    /// Every record, by volume path.
    pub fn list(&self) -> Result<Vec<VolumeRecord>, Error> {
        let mut records = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(records);
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                match state::read_json::<VolumeRecord>(&path) {
                    Ok(record) => records.push(record),
                    Err(e) => tracing::warn!("{}", crate::error_chain(&e)),
                }
            }
        }
        records.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(records)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &Path) -> VolumeRecord {
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        VolumeRecord {
            path: "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pv1/mount".into(),
            device: image,
            fs_type: "ext4".into(),
            options: vec!["noatime".into()],
            read_only: false,
        }
    }

    #[test]
    fn records_are_added_found_listed_and_removed_by_volume_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::new(dir.path());
        assert!(store.list().unwrap().is_empty());
        let r = record(dir.path());
        store.add(&r).unwrap();
        assert_eq!(store.get(&r.path).unwrap().unwrap().fs_type, "ext4");
        assert_eq!(store.get(Path::new("/other")).unwrap(), None);
        assert_eq!(store.list().unwrap().len(), 1);
        store.remove(&r.path).unwrap();
        assert!(matches!(store.remove(&r.path), Err(Error::NotFound(_))));
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn bad_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = record(dir.path());
        let cases = [
            VolumeRecord {
                path: "relative".into(),
                ..good.clone()
            },
            VolumeRecord {
                fs_type: "nfs".into(),
                ..good.clone()
            },
            VolumeRecord {
                options: vec!["ro,exec".into()],
                ..good.clone()
            },
            VolumeRecord {
                options: vec![String::new()],
                ..good.clone()
            },
            VolumeRecord {
                device: "/nonexistent".into(),
                ..good.clone()
            },
            VolumeRecord {
                device: dir.path().to_path_buf(),
                ..good.clone()
            },
            VolumeRecord {
                device: "/dev/null".into(),
                ..good.clone()
            },
        ];
        for case in cases {
            assert!(case.validate().is_err(), "{case:?}");
        }
        good.validate().unwrap();
    }
}
