//! Image records: what the store knows about each image (config,
//! manifest, layers, references, disk), one JSON file per image id under
//! `images/`, written atomically. A record is written last in a pull or an
//! import, so its presence means the image is complete.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::content::{Digest, write_atomic};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("image config: {0}")]
    BadConfig(#[source] serde_json::Error),
    #[error("image config lists {diff_ids} layers but the manifest {layers}")]
    LayerCount { diff_ids: usize, layers: usize },
    #[error("image is for {os}/{architecture}, not linux/amd64")]
    Platform { os: String, architecture: String },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The parts of an OCI image config the runtime uses. Unknown fields are
/// ignored; every field may be missing (hostile or minimal configs).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: RunConfig,
    #[serde(default)]
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "StopSignal", default)]
    pub stop_signal: Option<String>,
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "Volumes", default)]
    pub volumes: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl ImageConfig {
    pub fn parse(data: &[u8]) -> Result<ImageConfig, Error> {
        serde_json::from_slice(data).map_err(Error::BadConfig)
    }

    /// Refuses images that cannot run in our amd64 Linux guests. An empty
    /// platform (some hand-made images) is taken as linux/amd64.
    pub fn check_platform(&self) -> Result<(), Error> {
        let os_ok = self.os.is_empty() || self.os == "linux";
        let arch_ok = self.architecture.is_empty() || self.architecture == "amd64";
        if os_ok && arch_ok {
            return Ok(());
        }
        Err(Error::Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
        })
    }

    /// CRI's `uid` and `username` from the config's `User` (`uid`,
    /// `uid:gid`, `name` or `name:group`): a numeric user is a uid.
    pub fn user(&self) -> (Option<i64>, String) {
        let user = self.config.user.as_deref().unwrap_or("");
        let name = user.split(':').next().unwrap_or("");
        match name.parse::<i64>() {
            Ok(uid) => (Some(uid), String::new()),
            Err(_) => (None, name.to_string()),
        }
    }
}

/// One layer as the manifest lists it, with its uncompressed digest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Layer {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub diff_id: Digest,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    /// The config digest.
    pub id: Digest,
    /// The platform manifest's digest.
    pub manifest: Digest,
    /// The index (manifest list) the manifest was chosen from, if any.
    #[serde(default)]
    pub index: Option<Digest>,
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
    /// `repo:tag` references, as containerd reports them.
    pub repo_tags: Vec<String>,
    /// `repo@digest` references (the digest a tag resolved to: an index's
    /// or a manifest's).
    pub repo_digests: Vec<String>,
    /// Content size: manifest, config and compressed layers.
    pub size: u64,
    /// The image's disk, relative to the store's `disks/`.
    pub disk: String,
    pub disk_size: u64,
    /// Seconds since the epoch when the record was first written.
    pub created: i64,
}

impl ImageRecord {
    pub fn references(&self) -> impl Iterator<Item = &String> {
        self.repo_tags.iter().chain(self.repo_digests.iter())
    }
}

/// The records on disk and in memory.
pub struct Records {
    dir: PathBuf,
    images: BTreeMap<Digest, ImageRecord>,
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

impl Records {
    /// Loads every record; unreadable ones are reported and skipped (they
    /// can only come from outside interference: writes are atomic).
    pub fn load(dir: &Path) -> Result<Records, Error> {
        fs::create_dir_all(dir).map_err(io_error("cannot create", dir))?;
        let mut images = BTreeMap::new();
        for entry in fs::read_dir(dir)
            .map_err(io_error("cannot list", dir))?
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let record = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|d| serde_json::from_slice::<ImageRecord>(&d).map_err(|e| e.to_string()));
            match record {
                Ok(record) => {
                    images.insert(record.id.clone(), record);
                }
                Err(e) => tracing::warn!(path = %path.display(), "skipping image record: {e}"),
            }
        }
        Ok(Records {
            dir: dir.to_path_buf(),
            images,
        })
    }

    fn path(&self, id: &Digest) -> PathBuf {
        self.dir.join(format!("{}.json", id.hex()))
    }

    pub fn get(&self, id: &Digest) -> Option<&ImageRecord> {
        self.images.get(id)
    }

    pub fn all(&self) -> impl Iterator<Item = &ImageRecord> {
        self.images.values()
    }

    /// The image a reference (`repo:tag` or `repo@digest`) points at.
    pub fn by_reference(&self, name: &str) -> Option<&ImageRecord> {
        self.images
            .values()
            .find(|r| r.references().any(|n| n == name))
    }

    /// Writes a record, first taking its references away from any other
    /// image (a tag names one image; an image left with no reference stays,
    /// reachable by id, as in containerd).
    pub fn put(&mut self, record: ImageRecord) -> Result<(), Error> {
        let names: Vec<String> = record.references().cloned().collect();
        let others: Vec<Digest> = self
            .images
            .values()
            .filter(|r| r.id != record.id && r.references().any(|n| names.contains(n)))
            .map(|r| r.id.clone())
            .collect();
        for id in others {
            if let Some(mut other) = self.images.get(&id).cloned() {
                other.repo_tags.retain(|n| !names.contains(n));
                other.repo_digests.retain(|n| !names.contains(n));
                self.write(other)?;
            }
        }
        self.write(record)
    }

    fn write(&mut self, record: ImageRecord) -> Result<(), Error> {
        let path = self.path(&record.id);
        let data = serde_json::to_vec_pretty(&record).map_err(Error::BadConfig)?;
        write_atomic(&path, &data).map_err(io_error("cannot write", &path))?;
        self.images.insert(record.id.clone(), record);
        Ok(())
    }

    pub fn remove(&mut self, id: &Digest) -> Result<Option<ImageRecord>, Error> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Io {
                    what: "cannot remove",
                    path,
                    source,
                });
            }
        }
        Ok(self.images.remove(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &[u8], tags: &[&str]) -> ImageRecord {
        ImageRecord {
            id: Digest::of(id),
            manifest: Digest::of(b"m"),
            index: None,
            config: ImageConfig::default(),
            layers: Vec::new(),
            repo_tags: tags.iter().map(|t| t.to_string()).collect(),
            repo_digests: Vec::new(),
            size: 1,
            disk: "x.erofs".into(),
            disk_size: 1,
            created: 0,
        }
    }

    #[test]
    fn users_come_from_the_config() {
        let mut config = ImageConfig::default();
        assert_eq!(config.user(), (None, String::new()));
        config.config.user = Some("1000:1000".into());
        assert_eq!(config.user(), (Some(1000), String::new()));
        config.config.user = Some("nobody".into());
        assert_eq!(config.user(), (None, "nobody".into()));
        config.config.user = Some("www:www".into());
        assert_eq!(config.user(), (None, "www".into()));
    }

    #[test]
    fn configs_are_parsed_leniently_and_platforms_checked() {
        let c = ImageConfig::parse(
            br#"{"architecture":"amd64","os":"linux","config":{"User":"5","Env":null}}"#,
        )
        .unwrap();
        assert_eq!(c.user().0, Some(5));
        assert!(c.check_platform().is_ok());
        let c = ImageConfig::parse(br#"{"architecture":"arm64","os":"linux"}"#).unwrap();
        assert!(c.check_platform().is_err());
        assert!(ImageConfig::parse(b"[1,2]").is_err());
        assert!(ImageConfig::parse(b"{\"config\": 5}").is_err());
    }

    #[test]
    fn a_tag_moves_to_the_new_image_and_records_survive_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut records = Records::load(dir.path()).unwrap();
        records.put(record(b"old", &["a:1", "a:2"])).unwrap();
        records.put(record(b"new", &["a:1"])).unwrap();
        assert_eq!(records.by_reference("a:1").unwrap().id, Digest::of(b"new"));
        assert_eq!(
            records.get(&Digest::of(b"old")).unwrap().repo_tags,
            vec!["a:2".to_string()]
        );
        std::fs::write(dir.path().join("junk.json"), b"{not json").unwrap();
        let reloaded = Records::load(dir.path()).unwrap();
        assert_eq!(reloaded.all().count(), 2);
        let mut reloaded = reloaded;
        assert!(reloaded.remove(&Digest::of(b"old")).unwrap().is_some());
        assert!(reloaded.remove(&Digest::of(b"old")).unwrap().is_none());
        assert_eq!(Records::load(dir.path()).unwrap().all().count(), 1);
    }
}
