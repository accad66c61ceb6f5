//! `frakti run --volume-device`: the devices are registered as direct
//! volumes (as `frakti volume add` does for a CSI driver) under a path of
//! the pod's own, `/run/frakti/cli-volumes/<pod uid>/<n>`, which the
//! container mounts; the daemon then attaches each device to the VM and
//! mounts its filesystem there. They are unregistered with the pod.

use std::path::{Path, PathBuf};

use frakti_cri::volume::{VolumeRecord, VolumeStore};
use k8s_cri::v1 as cri;

use super::run_spec;

const VOLUME_PATHS: &str = "/run/frakti/cli-volumes";

fn pod_dir(pod_uid: &str) -> PathBuf {
    Path::new(VOLUME_PATHS).join(pod_uid)
}

/// Registers each `--volume-device` for the pod `pod_uid`; returns the
/// container's mounts of them. Nothing stays registered on an error.
pub fn register(root: &Path, pod_uid: &str, specs: &[String]) -> anyhow::Result<Vec<cri::Mount>> {
    let store = VolumeStore::new(root);
    let mut mounts = Vec::new();
    for (n, spec) in specs.iter().enumerate() {
        let registered = run_spec::volume_device(spec)
            .map_err(anyhow::Error::from)
            .and_then(|(device, container_path, fs_type)| {
                let path = pod_dir(pod_uid).join(n.to_string());
                let record = VolumeRecord {
                    path: path.clone(),
                    device,
                    fs_type,
                    options: Vec::new(),
                    read_only: false,
                };
                store
                    .add(&record)
                    .map_err(|e| anyhow::anyhow!("--volume-device {spec}: {e}"))?;
                Ok(cri::Mount {
                    container_path,
                    host_path: path.to_string_lossy().into_owned(),
                    ..Default::default()
                })
            });
        match registered {
            Ok(mount) => mounts.push(mount),
            Err(e) => {
                unregister(root, pod_uid);
                return Err(e);
            }
        }
    }
    Ok(mounts)
}

/// Unregisters the pod's devices (a failure is reported, not fatal: the
/// pod is gone either way).
pub fn unregister(root: &Path, pod_uid: &str) {
    let store = VolumeStore::new(root);
    let Ok(records) = store.list() else {
        return;
    };
    let dir = pod_dir(pod_uid);
    for record in records.iter().filter(|r| r.path.starts_with(&dir)) {
        if let Err(e) = store.remove(&record.path) {
            eprintln!(
                "frakti: error: unregistering {}: {e}",
                record.device.display()
            );
        }
    }
}
