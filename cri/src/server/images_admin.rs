//! frakti's own image API (`frakti.images.v1.Images`): import, export and
//! pulls with progress for the CLI, on the same socket as CRI.

use std::path::Path;
use std::pin::Pin;

use frakti_proto::images::v1 as pb;
use frakti_proto::images::v1::images_server::Images;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::status::image_status;
use crate::image::ImageStore;

pub struct ImagesAdmin {
    store: ImageStore,
}

impl ImagesAdmin {
    pub fn new(store: ImageStore) -> ImagesAdmin {
        ImagesAdmin { store }
    }
}

fn absolute(path: &str) -> Result<&Path, Status> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "path '{path}' must be absolute (the daemon reads it on the node)"
        )));
    }
    Ok(p)
}

type PullStream = Pin<Box<dyn Stream<Item = Result<pb::PullEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Images for ImagesAdmin {
    async fn import(
        &self,
        request: Request<pb::ImportRequest>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        let request = request.into_inner();
        let path = absolute(&request.path)?;
        let base = Some(request.base_name.as_str()).filter(|b| !b.is_empty());
        let records = self.store.import(path, base).await.map_err(image_status)?;
        Ok(Response::new(pb::ImportResponse {
            images: records
                .into_iter()
                .map(|r| pb::ImportedImage {
                    id: r.id.to_string(),
                    repo_tags: r.repo_tags,
                    disk_size: r.disk_size,
                })
                .collect(),
        }))
    }

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ExportResponse>, Status> {
        let request = request.into_inner();
        let path = absolute(&request.path)?.to_path_buf();
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.export(&request.image, &path))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(image_status)?;
        Ok(Response::new(pb::ExportResponse {}))
    }

    type PullStream = PullStream;

    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<PullStream>, Status> {
        let image = request.into_inner().image;
        let name = crate::image::reference::ImageRef::parse(&image)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .name();
        let mut progress = self.store.subscribe();
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let pull = store.pull(&image, None);
            tokio::pin!(pull);
            loop {
                tokio::select! {
                    result = &mut pull => {
                        let event = result
                            .map(|r| pb::PullEvent { event: Some(pb::pull_event::Event::ImageId(r.id.to_string())) })
                            .map_err(image_status);
                        let _ = tx.send(event).await;
                        return;
                    }
                    Ok(p) = progress.recv() => {
                        if p.image != name { continue; }
                        let event = pb::PullEvent {
                            event: Some(pb::pull_event::Event::Progress(pb::BlobProgress {
                                digest: p.digest, done: p.done, total: p.total,
                            })),
                        };
                        // A client that went away does not stop the pull.
                        let _ = tx.try_send(Ok(event));
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
