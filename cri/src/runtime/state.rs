//! What the daemon keeps on disk to find its pods and containers again
//! after a restart, under `<root>/pods`:
//!
//! ```text
//! pods/<pod id>/pod.json          PodRecord (state, VMM pid, VM size)
//! pods/<pod id>/config.pb         the CRI PodSandboxConfig (protobuf)
//! pods/<pod id>/api.sock ...      the VMM's sockets and logs (sandbox::vmm)
//! pods/<pod id>/containers/<id>/container.json   ContainerRecord
//! pods/<pod id>/containers/<id>/config.pb        the CRI ContainerConfig
//! pods/<pod id>/containers/<id>/resources.pb     resources last updated
//! ```
//!
//! Every file is written to a temporary name and renamed: a crash leaves
//! the old version or the new one, never half of one.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sizing::VmSize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodPhase {
    /// RunPodSandbox has not finished: cleaned up if found at start.
    Creating,
    Ready,
    /// Stopped, or its VM died.
    NotReady,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    pub id: String,
    pub phase: PodPhase,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    pub vmm_pid: Option<u32>,
    pub size: VmSize,
    /// Why the pod is NOTREADY when it was not stopped (its VM died).
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub runtime_handler: String,
    /// Image disks in the VM's slots (found again after a restart).
    #[serde(default)]
    pub images: Vec<SlotRecord>,
    /// Writable disks in the VM's slots (emptyDir volumes).
    #[serde(default)]
    pub volumes: Vec<SlotRecord>,
}

/// An image disk in one of the VM's slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub image_id: String,
    pub serial: String,
    pub disk_id: String,
    /// A disk file kept outside the pod's directory (an emptyDir's, in
    /// kubelet's volume directory), removed with the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// A host block device passed in as is (a raw block volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
    /// The containers using the device; it is detached after the last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owners: Vec<String>,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerPhase {
    Created,
    Running,
    Exited,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pod_id: String,
    pub phase: ContainerPhase,
    pub created_at: i64,
    #[serde(default)]
    pub started_at: i64,
    #[serde(default)]
    pub finished_at: i64,
    #[serde(default)]
    pub exit_code: i32,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// The image as the request named it, its id (config digest) and the
    /// digest reference it resolved to.
    pub image: String,
    pub image_id: String,
    pub image_ref: String,
    /// The guest disk id the image is mounted as in the pod's VM.
    pub image_disk: String,
    /// Full CRI log path (log directory + log path), empty without logs.
    pub log_path: String,
    pub stop_signal: i32,
    /// The OCI spec the agent got (exec processes inherit from it).
    pub spec: serde_json::Value,
    /// Copied mounts kept in sync: (host root, guest CopyFile path).
    #[serde(default)]
    pub synced: Vec<(PathBuf, String)>,
    /// The guest CopyFile paths of those the container may write to.
    #[serde(default)]
    pub writable_synced: Vec<String>,
    /// Writable file mounts copied back at exit: (guest path, host path).
    #[serde(default)]
    pub copy_back: Vec<(String, PathBuf)>,
}

/// Writes `data` to `path` atomically (the image store's writer: temp
/// file, fsync, rename, directory fsync).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    crate::image::content::write_atomic(path, data).map_err(io_error("cannot write", path))
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), Error> {
    let data = serde_json::to_vec_pretty(value).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomic(path, &data)
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, Error> {
    let data = fs::read(path).map_err(io_error("cannot read", path))?;
    serde_json::from_slice(&data).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

pub fn write_proto<M: prost::Message>(path: &Path, message: &M) -> Result<(), Error> {
    write_atomic(path, &message.encode_to_vec())
}

pub fn read_proto<M: prost::Message + Default>(path: &Path) -> Result<M, Error> {
    let data = fs::read(path).map_err(io_error("cannot read", path))?;
    M::decode(data.as_slice()).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A record (`dir/<record>`) and the CRI config beside it (`config.pb`).
pub fn read_record<R, C>(dir: &Path, record: &str) -> Result<(R, C), Error>
where
    R: for<'de> Deserialize<'de>,
    C: prost::Message + Default,
{
    Ok((
        read_json(&dir.join(record))?,
        read_proto(&dir.join("config.pb"))?,
    ))
}

/// The directories of the state tree.
#[derive(Debug, Clone)]
pub struct Layout {
    pods: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        Layout {
            pods: root.join("pods"),
        }
    }

    pub fn pods(&self) -> &Path {
        &self.pods
    }

    pub fn pod_dir(&self, pod: &str) -> PathBuf {
        self.pods.join(pod)
    }

    pub fn container_dir(&self, pod: &str, container: &str) -> PathBuf {
        self.pod_dir(pod).join("containers").join(container)
    }

    pub fn create(&self) -> Result<(), Error> {
        fs::create_dir_all(&self.pods).map_err(io_error("cannot create", &self.pods))
    }

    /// The entries of a directory that look like ids (anything else there
    /// is not ours and is left alone).
    pub fn ids_in(dir: &Path) -> Vec<String> {
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| is_id(name))
            .collect()
    }
}

/// Ids are 64 lowercase hex digits.
pub fn is_id(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A new random id (as containerd makes them: 32 random bytes in hex).
pub fn new_id() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    let path = Path::new("/dev/urandom");
    fs::File::open(path)
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut bytes))
        .map_err(io_error("cannot read", path))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_corruption_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod.json");
        let record = PodRecord {
            id: new_id().unwrap(),
            phase: PodPhase::Ready,
            created_at: 5,
            vmm_pid: Some(42),
            size: VmSize {
                vcpus: 1,
                memory_mib: 128,
            },
            message: String::new(),
            runtime_handler: String::new(),
            images: Vec::new(),
            volumes: Vec::new(),
        };
        write_json(&path, &record).unwrap();
        assert_eq!(read_json::<PodRecord>(&path).unwrap(), record);
        fs::write(&path, b"{\"id\": 3").unwrap();
        let err = read_json::<PodRecord>(&path).unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
        assert!(read_json::<PodRecord>(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn ids_are_64_hex_digits() {
        let id = new_id().unwrap();
        assert!(is_id(&id), "{id}");
        assert_ne!(id, new_id().unwrap());
        assert!(!is_id("abc"));
        assert!(!is_id(&id.to_uppercase()));
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(&id)).unwrap();
        fs::create_dir(dir.path().join("lost+found")).unwrap();
        assert_eq!(Layout::ids_in(dir.path()), vec![id]);
    }
}
