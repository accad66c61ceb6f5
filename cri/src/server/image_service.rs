//! CRI ImageService over the image store: PullImage, ListImages,
//! ImageStatus, RemoveImage, ImageFsInfo.

use std::time::{SystemTime, UNIX_EPOCH};

use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_server::ImageService as CriImageService;
use tonic::{Request, Response, Status};

use super::status::image_status;
use crate::image::ImageStore;
use crate::image::auth::RequestAuth;
use crate::image::records::ImageRecord;

pub struct ImageService {
    store: ImageStore,
}

impl ImageService {
    pub fn new(store: ImageStore) -> ImageService {
        ImageService { store }
    }
}

fn image_name(spec: Option<&cri::ImageSpec>) -> Result<&str, Status> {
    let name = spec.map(|s| s.image.as_str()).unwrap_or("").trim();
    if name.is_empty() {
        return Err(Status::invalid_argument(
            "no image given (ImageSpec.image is empty)",
        ));
    }
    Ok(name)
}

/// The CRI view of a record, as containerd fills it.
pub fn to_cri(record: &ImageRecord) -> cri::Image {
    let (uid, username) = record.config.user();
    cri::Image {
        id: record.id.to_string(),
        repo_tags: record.repo_tags.clone(),
        repo_digests: record.repo_digests.clone(),
        size: record.size,
        uid: uid.map(|value| cri::Int64Value { value }),
        username,
        spec: Some(cri::ImageSpec {
            image: record.id.to_string(),
            ..Default::default()
        }),
        pinned: false,
    }
}

/// `verbose` ImageStatus info: the image config and where its disk is.
fn verbose_info(
    record: &ImageRecord,
    store: &ImageStore,
) -> std::collections::HashMap<String, String> {
    let info = serde_json::json!({
        "imageSpec": record.config,
        "manifest": record.manifest.to_string(),
        "index": record.index.as_ref().map(ToString::to_string),
        "disk": store.root().join("disks").join(&record.disk),
        "diskSize": record.disk_size,
        "layers": record.layers,
    });
    [("info".to_string(), info.to_string())]
        .into_iter()
        .collect()
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[tonic::async_trait]
impl CriImageService for ImageService {
    async fn list_images(
        &self,
        request: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let request = request.into_inner();
        let filter = request
            .filter
            .as_ref()
            .and_then(|f| f.image.as_ref())
            .map(|s| s.image.as_str());
        let images = self.store.list(filter).map_err(image_status)?;
        Ok(Response::new(cri::ListImagesResponse {
            images: images.iter().map(to_cri).collect(),
        }))
    }

    async fn image_status(
        &self,
        request: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        // Unknown images are an empty answer, not an error (kubelet asks
        // before pulling).
        let record = self.store.status(name).map_err(image_status)?;
        let info = match (&record, request.verbose) {
            (Some(r), true) => verbose_info(r, &self.store),
            _ => Default::default(),
        };
        Ok(Response::new(cri::ImageStatusResponse {
            image: record.as_ref().map(to_cri),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?.to_string();
        let auth = request.auth.as_ref().map(RequestAuth::from);
        let record = self.store.pull(&name, auth).await.map_err(image_status)?;
        Ok(Response::new(cri::PullImageResponse {
            image_ref: record.id.to_string(),
        }))
    }

    async fn remove_image(
        &self,
        request: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?.to_string();
        // Removal collects garbage: file system work, off the async threads.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.remove(&name))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(image_status)?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let store = self.store.clone();
        let usage = tokio::task::spawn_blocking(move || store.usage())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(image_status)?;
        let fs = cri::FilesystemUsage {
            timestamp: now_nanos(),
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: usage.mountpoint.to_string_lossy().into_owned(),
            }),
            used_bytes: Some(cri::UInt64Value {
                value: usage.used_bytes,
            }),
            inodes_used: Some(cri::UInt64Value {
                value: usage.inodes_used,
            }),
        };
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs],
            container_filesystems: Vec::new(),
        }))
    }
}
