//! Shared by `image_service.rs` and `image_service_tls.rs` (a module, not a
//! test target): a `frakti daemon` process for the image tests (its own
//! state, socket, certs.d and credentials file), and the CRI calls they
//! make. Each test file uses part of it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use frakti_proto::images::v1 as adminpb;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use tonic::transport::Channel;

use crate::support::registry::Registry;

/// A `frakti daemon` process with its own state, socket and certs.d.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, &[])
    }

    /// With extra `frakti daemon` flags.
    pub fn start_with(dir: &Path, flags: &[&str]) -> Daemon {
        std::fs::create_dir_all(dir.join("certs.d")).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_frakti"))
            .arg("daemon")
            .arg("--listen")
            .arg(dir.join("frakti.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--certs-dir")
            .arg(dir.join("certs.d"))
            .arg("--docker-config")
            // The node's credentials file: none until a test writes it.
            .arg(dir.join("docker-config.json"))
            .args(["--log-level", "debug"])
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start frakti daemon");
        let daemon = Daemon {
            child,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(daemon.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "daemon not serving:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("frakti.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn images_root(&self) -> PathBuf {
        self.dir.join("state/images")
    }

    /// `registry` as a plain-http upstream (no TLS on the test's loopback).
    pub fn plain_http(&self, registry: &Registry) {
        self.hosts(
            &registry.host(),
            &format!("server = \"http://{}\"\n", registry.host()),
        );
    }

    /// containerd's hosts.toml for `registry`.
    pub fn hosts(&self, registry: &str, toml: &str) {
        let dir = self.dir.join("certs.d").join(registry);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts.toml"), toml).unwrap();
    }

    pub async fn client(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(frakti_cri::client::connect(&self.socket()).await.unwrap())
    }

    pub async fn admin(&self) -> adminpb::images_client::ImagesClient<Channel> {
        adminpb::images_client::ImagesClient::new(
            frakti_cri::client::connect(&self.socket()).await.unwrap(),
        )
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Processes whose command line names `dir`, and mounts below it: what a
/// test must not leave behind once its daemons and registries are gone.
pub fn leaks_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut leaks = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            leaks.push(format!(
                "process {}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    leaks.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&needle))
            .map(|l| format!("mount: {l}")),
    );
    leaks
}

pub fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

pub async fn pull(
    c: &mut ImageServiceClient<Channel>,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> Result<String, tonic::Status> {
    c.pull_image(cri::PullImageRequest {
        image: spec(image),
        auth,
        sandbox_config: None,
    })
    .await
    .map(|r| r.into_inner().image_ref)
}

pub async fn status(c: &mut ImageServiceClient<Channel>, image: &str) -> Option<cri::Image> {
    c.image_status(cri::ImageStatusRequest {
        image: spec(image),
        verbose: false,
    })
    .await
    .unwrap()
    .into_inner()
    .image
}
