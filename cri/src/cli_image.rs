//! `frakti image …`: the CLI side of the image store, over the daemon's
//! socket (CRI ImageService, and frakti's Images API for import, export and
//! pulls with progress).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use frakti_proto::images::v1 as pb;
use frakti_proto::images::v1::images_client::ImagesClient;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image from its registry (or a mirror), with progress per layer.
    ///
    /// Example: frakti image pull busybox:1.36
    Pull { image: String },
    /// List images.
    #[command(alias = "ls")]
    List {
        /// Only image ids.
        #[arg(short, long)]
        quiet: bool,
        /// json for scripts.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Remove images (by id, tag or digest).
    #[command(alias = "rmi")]
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Show an image (JSON, with its config).
    Inspect { image: String },
    /// Import an OCI image layout (dir or tar) or a `docker save` tarball.
    ///
    /// Example: frakti image import busybox.tar --name example.com/busybox
    Import {
        path: PathBuf,
        /// Names layout entries that carry only a tag: NAME:TAG.
        #[arg(long)]
        name: Option<String>,
    },
    /// Export an image as an OCI image layout tar.
    ///
    /// Example: frakti image export busybox:latest busybox.tar
    Export { image: String, path: PathBuf },
}

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", e.message(), e.code())
}

pub async fn run(endpoint: &Path, command: ImageCommand) -> anyhow::Result<()> {
    let channel = frakti_cri::client::connect(endpoint).await?;
    let mut images = ImageServiceClient::new(channel.clone());
    let mut admin = ImagesClient::new(channel);
    match command {
        ImageCommand::Pull { image } => pull(&mut admin, &image, true).await,
        ImageCommand::List { quiet, format } => {
            let list = images
                .list_images(cri::ListImagesRequest::default())
                .await
                .map_err(status_error)?
                .into_inner()
                .images;
            print_images(&list, quiet, &format)
        }
        ImageCommand::Rm { images: names } => {
            for name in names {
                images
                    .remove_image(cri::RemoveImageRequest { image: spec(&name) })
                    .await
                    .map_err(status_error)?;
                println!("removed {name}");
            }
            Ok(())
        }
        ImageCommand::Inspect { image } => {
            let status = images
                .image_status(cri::ImageStatusRequest {
                    image: spec(&image),
                    verbose: true,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let Some(found) = status.image else {
                anyhow::bail!("no such image: {image}");
            };
            let info: serde_json::Value = status
                .info
                .get("info")
                .and_then(|i| serde_json::from_str(i).ok())
                .unwrap_or_default();
            let out = serde_json::json!({
                "id": found.id, "repoTags": found.repo_tags, "repoDigests": found.repo_digests,
                "size": found.size, "uid": found.uid.map(|u| u.value), "username": found.username,
                "info": info,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        ImageCommand::Import { path, name } => {
            let response = admin
                .import(pb::ImportRequest {
                    path: crate::absolute(&path)?.to_string_lossy().into_owned(),
                    base_name: name.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            for image in response.images {
                println!("imported {} {}", image.id, image.repo_tags.join(" "));
            }
            Ok(())
        }
        ImageCommand::Export { image, path } => {
            admin
                .export(pb::ExportRequest {
                    image: image.clone(),
                    path: crate::absolute(&path)?.to_string_lossy().into_owned(),
                })
                .await
                .map_err(status_error)?;
            println!("exported {image} to {}", path.display());
            Ok(())
        }
    }
}

/// Pulls with a progress bar per blob on stderr (drawn only on a
/// terminal); the image's id goes to stdout when `announce`, else to stderr.
pub(crate) async fn pull(
    admin: &mut ImagesClient<tonic::transport::Channel>,
    image: &str,
    announce: bool,
) -> anyhow::Result<()> {
    let mut events = admin
        .pull(pb::PullRequest {
            image: image.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .progress_chars("=> ");
    let mut by_blob: HashMap<String, ProgressBar> = HashMap::new();
    while let Some(event) = events.message().await.map_err(status_error)? {
        match event.event {
            Some(pb::pull_event::Event::Progress(p)) => {
                let bar = by_blob.entry(p.digest.clone()).or_insert_with(|| {
                    let bar = bars.add(ProgressBar::new(p.total));
                    bar.set_style(style.clone());
                    let short = p.digest.trim_start_matches("sha256:");
                    bar.set_prefix(short.chars().take(12).collect::<String>());
                    bar
                });
                bar.set_position(p.done);
                if p.done >= p.total {
                    bar.finish();
                }
            }
            Some(pb::pull_event::Event::ImageId(id)) => {
                for bar in by_blob.values() {
                    bar.finish();
                }
                if announce {
                    println!("{image}: {id}");
                } else {
                    eprintln!("{image}: {id}");
                }
                return Ok(());
            }
            None => {}
        }
    }
    anyhow::bail!("the daemon ended the pull without a result")
}

pub(crate) fn print_images(list: &[cri::Image], quiet: bool, format: &str) -> anyhow::Result<()> {
    if quiet {
        for image in list {
            println!("{}", image.id);
        }
        return Ok(());
    }
    match format {
        "json" => {
            let rows: Vec<_> = list
                .iter()
                .map(|i| serde_json::json!({"id": i.id, "repoTags": i.repo_tags, "repoDigests": i.repo_digests, "size": i.size}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        "table" => {
            println!(
                "{:<50} {:<20} {:<14} {:>10}",
                "IMAGE", "TAG", "IMAGE ID", "SIZE"
            );
            for image in list {
                let id = image.id.trim_start_matches("sha256:");
                let short: String = id.chars().take(12).collect();
                let size = format!("{:.1}MB", image.size as f64 / 1e6);
                let names: Vec<(String, String)> = if image.repo_tags.is_empty() {
                    vec![("<none>".into(), "<none>".into())]
                } else {
                    image
                        .repo_tags
                        .iter()
                        .map(|t| match t.rsplit_once(':') {
                            Some((repo, tag)) => (repo.to_string(), tag.to_string()),
                            None => (t.clone(), String::new()),
                        })
                        .collect()
                };
                for (repo, tag) in names {
                    println!("{repo:<50} {tag:<20} {short:<14} {size:>10}");
                }
            }
        }
        other => anyhow::bail!("unknown format '{other}' (table or json)"),
    }
    Ok(())
}
