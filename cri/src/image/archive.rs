//! Offline images: `frakti image import` takes an OCI image layout (a
//! directory or a tar of one, as `ctr export`/`skopeo copy oci-archive:`
//! write) or a `docker save` tarball; `frakti image export` writes an OCI
//! layout tar that `ctr import`, skopeo and frakti read back.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::json;

use super::content::{Digest, commit_rename};
use super::manifest::{self, Descriptor, Manifest, Parsed};
use super::pull::{NewImage, content_size, layers_of};
use super::records::{ImageConfig, ImageRecord};
use super::reference::{ImageRef, Lookup};
use super::store::{Error, ImageStore, io_error};

/// containerd's annotation for an image's full name in an OCI layout.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArchive(msg.into())
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// One entry of a `docker save` manifest.json.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A file of the archive by its path, never outside the archive's root.
fn member(root: &Path, name: &str) -> Result<PathBuf, Error> {
    let rel = Path::new(name);
    if !rel
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(invalid(format!("archive path '{name}' leaves the archive")));
    }
    Ok(root.join(rel))
}

impl ImageStore {
    /// Imports every image of `path` (a layout directory or a tar file);
    /// a bare tag in the layout is named `base:tag` when `base` is given.
    pub async fn import(&self, path: &Path, base: Option<&str>) -> Result<Vec<ImageRecord>, Error> {
        let meta = fs::metadata(path).map_err(io_error("cannot read", path))?;
        if meta.is_dir() {
            return self.import_dir(path, base).await;
        }
        let scratch = tempfile::Builder::new()
            .prefix("import-")
            .tempdir_in(&self.inner.tmp)
            .map_err(io_error("cannot create scratch dir in", &self.inner.tmp))?;
        let tar_path = path.to_path_buf();
        let dir = scratch.path().to_path_buf();
        tokio::task::spawn_blocking(move || extract_archive(&tar_path, &dir))
            .await
            .map_err(|_| Error::Closed)??;
        self.import_dir(scratch.path(), base).await
    }

    async fn import_dir(&self, dir: &Path, base: Option<&str>) -> Result<Vec<ImageRecord>, Error> {
        if dir.join("index.json").is_file() {
            self.import_oci_layout(dir, base).await
        } else if dir.join("manifest.json").is_file() {
            self.import_docker_save(dir).await
        } else {
            Err(invalid(format!(
                "{} is neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
                dir.display()
            )))
        }
    }

    /// Copies a file into the content store, checking its digest and size.
    fn ingest_file(&self, src: &Path, digest: &Digest, size: u64) -> Result<(), Error> {
        if self.inner.content.contains(digest) {
            return Ok(());
        }
        let mut file = File::open(src).map_err(io_error("cannot open", src))?;
        let mut ingest = self.inner.content.ingest(digest, size)?;
        ingest.restart()?;
        let mut buf = vec![0; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io_error("cannot read", src))?;
            if n == 0 {
                break;
            }
            ingest.write(&buf[..n])?;
        }
        Ok(ingest.commit()?)
    }

    async fn import_oci_layout(
        &self,
        dir: &Path,
        base: Option<&str>,
    ) -> Result<Vec<ImageRecord>, Error> {
        let index_path = dir.join("index.json");
        let index: Index = read_json(&index_path)?;
        let blob = |d: &Digest| dir.join("blobs/sha256").join(d.hex());
        let mut imported = Vec::new();
        for entry in index.manifests {
            let top = Digest::parse(&entry.digest)?;
            let size =
                u64::try_from(entry.size).map_err(|_| invalid("negative size in index.json"))?;
            self.ingest_file(&blob(&top), &top, size)?;
            let body = self.inner.content.read(&top)?;
            let (index_digest, manifest_digest, manifest, len) =
                match manifest::parse(&body, &entry.media_type)? {
                    Parsed::Manifest(m) => (None, top.clone(), m, body.len()),
                    Parsed::Index(platform) => {
                        self.ingest_file(&blob(&platform.digest), &platform.digest, platform.size)?;
                        let inner = self.inner.content.read(&platform.digest)?;
                        let Parsed::Manifest(m) = manifest::parse(&inner, &platform.media_type)?
                        else {
                            return Err(invalid("an index inside an index"));
                        };
                        (Some(top.clone()), platform.digest, m, inner.len())
                    }
                };
            let name = image_name(&entry.annotations, base)?;
            let mut blobs: Vec<&Descriptor> = vec![&manifest.config];
            blobs.extend(manifest.layers.iter());
            for d in blobs {
                self.ingest_file(&blob(&d.digest), &d.digest, d.size)?;
            }
            let record = self
                .import_manifest(&manifest, len, manifest_digest, index_digest, &top, name)
                .await?;
            imported.push(record);
        }
        if imported.is_empty() {
            return Err(invalid("the layout's index.json lists no image"));
        }
        Ok(imported)
    }

    async fn import_docker_save(&self, dir: &Path) -> Result<Vec<ImageRecord>, Error> {
        let entries: Vec<DockerEntry> = read_json(&dir.join("manifest.json"))?;
        let mut imported = Vec::new();
        for entry in entries {
            let config_path = member(dir, &entry.config)?;
            let config_bytes =
                fs::read(&config_path).map_err(io_error("cannot read", &config_path))?;
            let config_digest = Digest::of(&config_bytes);
            self.inner.content.put(&config_digest, &config_bytes)?;
            let mut layers = Vec::new();
            for layer in &entry.layers {
                let path = member(dir, layer)?;
                let (digest, size) = self.inner.content.add_file(&path)?;
                layers.push(Descriptor {
                    // docker save layers are uncompressed tars.
                    media_type: "application/vnd.docker.image.rootfs.diff.tar".into(),
                    digest,
                    size,
                });
            }
            let manifest = Manifest {
                config: Descriptor {
                    media_type: manifest::DOCKER_CONFIG.into(),
                    digest: config_digest,
                    size: config_bytes.len() as u64,
                },
                layers,
            };
            // The manifest docker would have pushed, so the image has one.
            let body = serde_json::to_vec(&manifest_json(&manifest, manifest::DOCKER_MANIFEST))
                .map_err(|e| invalid(e.to_string()))?;
            let manifest_digest = Digest::of(&body);
            self.inner.content.put(&manifest_digest, &body)?;
            // One record; each tag adds its names (an untagged image is
            // imported by id).
            let mut names: Vec<Option<ImageRef>> = entry
                .repo_tags
                .unwrap_or_default()
                .iter()
                .map(|n| ImageRef::parse(n).map(Some))
                .collect::<Result<_, _>>()?;
            if names.is_empty() {
                names.push(None);
            }
            let mut record = None;
            for name in names {
                let top = manifest_digest.clone();
                record = Some(
                    self.import_manifest(&manifest, body.len(), top.clone(), None, &top, name)
                        .await?,
                );
            }
            let record = record.ok_or_else(|| invalid("docker save entry without an image"))?;
            imported.push(record);
        }
        Ok(imported)
    }

    async fn import_manifest(
        &self,
        manifest: &Manifest,
        manifest_len: usize,
        manifest_digest: Digest,
        index: Option<Digest>,
        top: &Digest,
        name: Option<ImageRef>,
    ) -> Result<ImageRecord, Error> {
        let config = ImageConfig::parse(&self.inner.content.read(&manifest.config.digest)?)?;
        config.check_platform()?;
        let layers = layers_of(manifest, &config)?;
        let record = self
            .finish(NewImage {
                id: manifest.config.digest.clone(),
                manifest: manifest_digest,
                index,
                config,
                layers,
                repo_tags: name
                    .iter()
                    .filter(|n| n.tag.is_some())
                    .map(ImageRef::name)
                    .collect(),
                repo_digests: name.iter().map(|n| n.with_digest(top)).collect(),
                size: content_size(manifest, manifest_len),
            })
            .await?;
        tracing::info!(id = %record.id, tags = ?record.repo_tags, "imported");
        Ok(record)
    }

    /// Writes `image` as an OCI image layout tar at `out`.
    pub fn export(&self, image: &str, out: &Path) -> Result<(), Error> {
        let record = self
            .inner
            .find(&Lookup::parse(image)?)
            .ok_or_else(|| Error::NotFound(image.to_string()))?;
        let manifest_body = self.inner.content.read(&record.manifest)?;
        let mut digests = vec![record.manifest.clone(), record.id.clone()];
        digests.extend(record.layers.iter().map(|l| l.digest.clone()));
        let mut annotations = serde_json::Map::new();
        if let Some(name) = record.repo_tags.first() {
            annotations.insert(CONTAINERD_NAME.into(), json!(name));
            let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
            annotations.insert(OCI_REF_NAME.into(), json!(tag));
        }
        let index = json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_INDEX,
            "manifests": [{
                "mediaType": media_type_of(&manifest_body),
                "digest": record.manifest.to_string(),
                "size": manifest_body.len(),
                "annotations": annotations,
            }],
        });
        let partial = out.with_extension("partial");
        let file = File::create(&partial).map_err(io_error("cannot create", &partial))?;
        let result = write_layout(file, &index, &digests, |d| self.inner.content.path(d));
        if let Err(e) = result {
            let _ = fs::remove_file(&partial);
            return Err(io_error("cannot write", out)(e));
        }
        commit_rename(&partial, out).map_err(io_error("cannot write", out))
    }
}

fn media_type_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("mediaType")
                .and_then(|m| m.as_str())
                .map(String::from)
        })
        .unwrap_or_else(|| manifest::OCI_MANIFEST.into())
}

fn manifest_json(manifest: &Manifest, media_type: &str) -> serde_json::Value {
    let desc = |d: &Descriptor| json!({"mediaType": d.media_type, "digest": d.digest.to_string(), "size": d.size});
    json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": desc(&manifest.config),
        "layers": manifest.layers.iter().map(desc).collect::<Vec<_>>(),
    })
}

fn write_layout(
    file: File,
    index: &serde_json::Value,
    digests: &[Digest],
    path_of: impl Fn(&Digest) -> PathBuf,
) -> io::Result<()> {
    let mut tar = tar::Builder::new(io::BufWriter::new(file));
    let mut add = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, data)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", index.to_string().as_bytes())?;
    for digest in digests {
        tar.append_path_with_name(path_of(digest), format!("blobs/sha256/{}", digest.hex()))?;
    }
    let mut writer = tar.into_inner()?;
    writer.flush()?;
    writer.into_inner().map_err(|e| e.into_error())?.sync_all()
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, Error> {
    let data = fs::read(path).map_err(io_error("cannot read", path))?;
    if data.len() > manifest::MAX_MANIFEST_BYTES {
        return Err(invalid(format!("{} is too large", path.display())));
    }
    serde_json::from_slice(&data).map_err(|e| invalid(format!("{}: {e}", path.display())))
}

/// The name an OCI layout entry gets: containerd's full-name annotation,
/// else a ref.name that is a full reference, else `base:ref.name`.
fn image_name(
    annotations: &std::collections::BTreeMap<String, String>,
    base: Option<&str>,
) -> Result<Option<ImageRef>, Error> {
    if let Some(name) = annotations.get(CONTAINERD_NAME) {
        return Ok(Some(ImageRef::parse(name)?));
    }
    let Some(tag) = annotations.get(OCI_REF_NAME) else {
        return Ok(None);
    };
    if tag.contains('/') {
        return Ok(Some(ImageRef::parse(tag)?));
    }
    match base {
        Some(base) => Ok(Some(ImageRef::parse(&format!("{base}:{tag}"))?)),
        None => Ok(None),
    }
}

/// Extracts an archive of regular files and directories (all a layout or
/// docker save holds) into `dir`; links and devices are refused, paths
/// that leave `dir` too.
fn extract_archive(path: &Path, dir: &Path) -> Result<(), Error> {
    let file = File::open(path).map_err(io_error("cannot open", path))?;
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    let entries = archive.entries().map_err(io_error("cannot read", path))?;
    for entry in entries {
        let mut entry = entry.map_err(io_error("cannot read", path))?;
        let name = entry
            .path()
            .map_err(io_error("bad entry name in", path))?
            .to_string_lossy()
            .into_owned();
        let target = member(dir, name.trim_start_matches("./"))?;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&target).map_err(io_error("cannot create", &target))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(io_error("cannot create", parent))?;
                }
                let mut out = File::create(&target).map_err(io_error("cannot create", &target))?;
                io::copy(&mut entry, &mut out).map_err(io_error("cannot write", &target))?;
            }
            // docker save links duplicate layers; copy the target instead.
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(io_error("bad link in", path))?
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let rel_base = target
                    .parent()
                    .and_then(|p| p.strip_prefix(dir).ok())
                    .unwrap_or(Path::new(""));
                // Hard links name a path from the archive's root, symlinks
                // one relative to their directory.
                let joined = match entry.header().entry_type() {
                    tar::EntryType::Link => PathBuf::from(&link),
                    _ => rel_base.join(&link),
                };
                let source = resolve_dots(dir, &joined)?;
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(io_error("cannot create", parent))?;
                }
                fs::copy(&source, &target).map_err(io_error("cannot copy", &source))?;
            }
            other => {
                return Err(invalid(format!(
                    "archive entry {name}: unsupported type {other:?}"
                )));
            }
        }
    }
    Ok(())
}

/// A link target like `../abc/layer.tar` (relative to its entry) must
/// stay within the archive; we only ever create regular files there, so
/// the copy source is one of them.
fn resolve_dots(root: &Path, path: &Path) -> Result<PathBuf, Error> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::ParentDir if !out.pop() => {
                return Err(invalid(format!(
                    "link {} leaves the archive",
                    path.display()
                )));
            }
            _ => {}
        }
    }
    Ok(root.join(out))
}
