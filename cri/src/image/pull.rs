//! PullImage: resolve through the registry's endpoints, fetch manifest,
//! config and layers into the content store (each blob once, even under
//! concurrent pulls), build the image's disk, write its record last.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::{StreamExt, TryStreamExt};

use super::auth::{self, RequestAuth};
use super::build;
use super::content::Digest;
use super::hosts;
use super::manifest::{self, Descriptor, Manifest, Parsed};
use super::records::{ImageConfig, ImageRecord, Layer};
use super::reference::ImageRef;
use super::registry::{self, Session};
use super::store::{Error, ImageStore, Progress, lock};

pub(super) type SharedPull = Shared<BoxFuture<'static, Result<ImageRecord, Arc<Error>>>>;

/// Image configs are small JSON documents; refuse absurd ones.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// An image whose blobs are all in the content store, ready to become a
/// disk and a record (from a pull or an import).
pub(super) struct NewImage {
    pub id: Digest,
    pub manifest: Digest,
    pub index: Option<Digest>,
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub size: u64,
}

/// Pairs the manifest's layers with the config's diff_ids.
pub(super) fn layers_of(manifest: &Manifest, config: &ImageConfig) -> Result<Vec<Layer>, Error> {
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers.len() {
        return Err(super::records::Error::LayerCount {
            diff_ids: diff_ids.len(),
            layers: manifest.layers.len(),
        }
        .into());
    }
    manifest
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(layer, diff_id)| {
            Ok(Layer {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
                size: layer.size,
                diff_id: Digest::parse(diff_id)?,
            })
        })
        .collect()
}

pub(super) fn content_size(manifest: &Manifest, manifest_len: usize) -> u64 {
    manifest
        .layers
        .iter()
        .fold(manifest.config.size, |acc, l| acc.saturating_add(l.size))
        .saturating_add(manifest_len as u64)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl ImageStore {
    /// Pulls `image` (tag, digest or short name) unless a pull of the same
    /// reference is running, in which case its result is shared.
    pub async fn pull(&self, image: &str, auth: Option<RequestAuth>) -> Result<ImageRecord, Error> {
        let image = ImageRef::parse(image)?;
        let key = image.name();
        let pull = {
            let mut inflight = lock(&self.inner.inflight);
            inflight
                .entry(key.clone())
                .or_insert_with(|| {
                    // Its own task: a client that gives up does not stop
                    // the download others (or a retry) will want.
                    let store = self.clone();
                    let task = tokio::spawn(async move {
                        let result = store.pull_once(&image, auth).await.map_err(Arc::new);
                        lock(&store.inner.inflight).remove(&image.name());
                        result
                    });
                    async move { task.await.unwrap_or_else(|_| Err(Arc::new(Error::Closed))) }
                        .boxed()
                        .shared()
                })
                .clone()
        };
        pull.await.map_err(Error::Shared)
    }

    async fn pull_once(
        &self,
        image: &ImageRef,
        auth: Option<RequestAuth>,
    ) -> Result<ImageRecord, Error> {
        let _permit = self
            .inner
            .pulls
            .acquire()
            .await
            .map_err(|_| Error::Closed)?;
        let config = &self.inner.config;
        let endpoints = hosts::endpoints(&config.certs_dir, &image.registry)?;
        // A credential helper is a process to run: off the async threads.
        let (docker_config, registry) = (config.docker_config.clone(), image.registry.clone());
        let credential = tokio::task::spawn_blocking(move || {
            auth::credential(auth.as_ref(), docker_config.as_deref(), &registry)
        })
        .await
        .map_err(|_| Error::Closed)??;
        let resolved = registry::resolve(image, &endpoints, &credential.to_registry_auth()).await?;
        let session = &resolved.session;
        let top = resolved.digest.clone();
        self.inner.content.put(&top, &resolved.body)?;
        let (index, manifest_digest, manifest, manifest_len) =
            match manifest::parse(&resolved.body, "")? {
                Parsed::Manifest(m) => (None, top.clone(), m, resolved.body.len()),
                Parsed::Index(platform) => {
                    let body = session.manifest(&platform.digest).await?;
                    self.inner.content.put(&platform.digest, &body)?;
                    match manifest::parse(&body, &platform.media_type)? {
                        Parsed::Manifest(m) => (Some(top.clone()), platform.digest, m, body.len()),
                        Parsed::Index(_) => {
                            return Err(manifest::Error::Malformed(
                                "an index inside an index".into(),
                            )
                            .into());
                        }
                    }
                }
            };
        let name = image.name();
        if manifest.config.size > MAX_CONFIG_BYTES {
            return Err(manifest::Error::Malformed(format!(
                "config of {} bytes",
                manifest.config.size
            ))
            .into());
        }
        self.fetch_blob(session, &manifest.config, &name).await?;
        let image_config = ImageConfig::parse(&self.inner.content.read(&manifest.config.digest)?)?;
        image_config.check_platform()?;
        let layers = layers_of(&manifest, &image_config)?;
        let new = NewImage {
            id: manifest.config.digest.clone(),
            manifest: manifest_digest,
            index,
            config: image_config,
            size: content_size(&manifest, manifest_len),
            repo_tags: image
                .tag
                .as_ref()
                .map(|_| name.clone())
                .into_iter()
                .collect(),
            repo_digests: vec![image.with_digest(&top)],
            layers,
        };
        if let Some(record) = self.add_names_if_present(&new)? {
            tracing::info!(image = %name, id = %record.id, "image already present");
            return Ok(record);
        }
        let name = &name;
        // Owned descriptors: a closure over borrowed ones is not `Send`
        // for every lifetime, which tokio::spawn needs.
        futures_util::stream::iter(manifest.layers.clone())
            .map(|layer| async move { self.fetch_blob(session, &layer, name).await })
            .buffer_unordered(config.max_parallel_layers.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        let record = self.finish(new).await?;
        tracing::info!(image = %name, id = %record.id, disk_size = record.disk_size, "pulled");
        Ok(record)
    }

    /// Downloads one blob unless the store has it; concurrent callers for
    /// the same digest wait for the first.
    async fn fetch_blob(
        &self,
        session: &Session,
        blob: &Descriptor,
        image: &str,
    ) -> Result<(), Error> {
        let _guard = self.inner.blob_locks.lock(&blob.digest).await;
        if self.inner.content.contains(&blob.digest) {
            return Ok(());
        }
        let ingest = self.inner.content.ingest(&blob.digest, blob.size)?;
        let sender = self.inner.progress.clone();
        let (image_name, digest, total) = (image.to_string(), blob.digest.to_string(), blob.size);
        let progress = move |done: u64| {
            // Nobody listening is fine.
            let _ = sender.send(Progress {
                image: image_name.clone(),
                digest: digest.clone(),
                done,
                total,
            });
        };
        session.blob(blob, ingest, &progress).await?;
        tracing::info!(image, digest = %blob.digest, bytes = blob.size, "blob fetched");
        Ok(())
    }

    /// When the image exists with its disk, only its references change.
    fn add_names_if_present(&self, new: &NewImage) -> Result<Option<ImageRecord>, Error> {
        let mut records = lock(&self.inner.records);
        let Some(existing) = records.get(&new.id).cloned() else {
            return Ok(None);
        };
        if !self
            .inner
            .config
            .root
            .join("disks")
            .join(&existing.disk)
            .is_file()
        {
            return Ok(None);
        }
        let mut record = existing;
        for tag in &new.repo_tags {
            if !record.repo_tags.contains(tag) {
                record.repo_tags.push(tag.clone());
            }
        }
        for digest in &new.repo_digests {
            if !record.repo_digests.contains(digest) {
                record.repo_digests.push(digest.clone());
            }
        }
        records.put(record.clone())?;
        Ok(Some(record))
    }

    /// Builds the disk (off the async threads) and writes the record.
    pub(super) async fn finish(&self, new: NewImage) -> Result<ImageRecord, Error> {
        // One build per image id, even when two tags of it arrive at once.
        let _guard = self.inner.blob_locks.lock(&new.id).await;
        if let Some(record) = self.add_names_if_present(&new)? {
            return Ok(record);
        }
        let format = self.inner.config.disk_format;
        let compression = self.inner.config.erofs_compression;
        let out = self.inner.disk_path(&new.id, format);
        let inner = self.inner.clone();
        let layers = new.layers.clone();
        let hex = new.id.hex().to_string();
        let disk_size = tokio::task::spawn_blocking(move || {
            let scratch = inner.tmp.join(format!("build-{hex}"));
            let partial = inner.tmp.join(format!("{hex}.disk"));
            let size = build::build_disk(
                &inner.content,
                &layers,
                format,
                compression,
                &scratch,
                &partial,
            )?;
            build::commit_account_files(&partial, &out).map_err(super::store::io_error(
                "cannot commit account files of",
                &out,
            ))?;
            super::content::commit_rename(&partial, &out)
                .map_err(super::store::io_error("cannot commit", &out))?;
            Ok::<u64, Error>(size)
        })
        .await
        .map_err(|_| Error::Closed)??;
        let disk = self
            .inner
            .disk_path(&new.id, format)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let record = ImageRecord {
            id: new.id,
            manifest: new.manifest,
            index: new.index,
            config: new.config,
            layers: new.layers,
            repo_tags: new.repo_tags,
            repo_digests: new.repo_digests,
            size: new.size,
            disk,
            disk_size,
            created: now(),
        };
        lock(&self.inner.records).put(record.clone())?;
        Ok(record)
    }
}
