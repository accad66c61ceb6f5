//! `frakti volume …`: what a volume driver (a CSI node plugin) calls
//! instead of mounting a block device on the host. Records live under the
//! daemon's state dir; the daemon reads them at CreateContainer, so these
//! commands work whether it runs or not.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use frakti_cri::runtime::state::{self, PodRecord};
use frakti_cri::volume::{Error, VolumeRecord, VolumeStore};

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Register a block device (or filesystem image) for a kubelet volume path: pods that
    /// mount the path get the device as a disk of their VM, mounted inside it.
    ///
    /// Example (NodePublishVolume): frakti volume add --path
    /// /var/lib/kubelet/pods/UID/volumes/kubernetes.io~csi/PV/mount --device /dev/rbd0
    /// --fstype ext4 --options noatime
    Add {
        /// kubelet's volume path (the target path NodePublishVolume gets).
        #[arg(long)]
        path: PathBuf,
        /// The block device, or a filesystem image file.
        #[arg(long)]
        device: PathBuf,
        /// ext4, ext3, ext2 or xfs.
        #[arg(long)]
        fstype: String,
        /// Mount options inside the VM, comma-separated (e.g. noatime,discard).
        #[arg(long, value_delimiter = ',')]
        options: Vec<String>,
        /// Mount it read-only (and attach the disk read-only).
        #[arg(long)]
        readonly: bool,
    },
    /// Forget a volume path (NodeUnpublishVolume); refused while a pod uses it.
    ///
    /// Example: frakti volume remove --path /var/lib/kubelet/pods/UID/volumes/kubernetes.io~csi/PV/mount
    #[command(alias = "rm")]
    Remove {
        #[arg(long)]
        path: PathBuf,
    },
    /// List registered volumes and the pods using them.
    #[command(alias = "ls")]
    List {
        /// json for scripts.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Usage of direct volumes, measured inside the VM that mounts each one (statfs in the
    /// guest, through the daemon): what a CSI node plugin answers NodeGetVolumeStats with.
    /// A volume no running pod mounts has no usage to report (an error with --path).
    ///
    /// Example: frakti volume stats --path /var/lib/kubelet/pods/UID/volumes/kubernetes.io~csi/PV/mount --format json
    Stats {
        /// One volume path; without it, every registered volume.
        #[arg(long)]
        path: Option<PathBuf>,
        /// json for scripts (one object with --path, a list without).
        #[arg(long, default_value = "table")]
        format: String,
    },
}

/// The pods (by id) whose VM has `device` attached, from their records.
fn users(root: &Path, device: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root.join("pods")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|pod| {
            state::read_json::<PodRecord>(&pod.path().join("pod.json")).is_ok_and(|record| {
                record
                    .volumes
                    .iter()
                    .any(|slot| slot.device.as_deref() == Some(device))
            })
        })
        .map(|pod| pod.file_name().to_string_lossy().into_owned())
        .collect()
}

pub async fn run(root: &Path, endpoint: &Path, command: VolumeCommand) -> anyhow::Result<()> {
    let store = VolumeStore::new(root);
    match command {
        VolumeCommand::Stats { path, format } => {
            crate::cli_volume_stats::run(&store, endpoint, path, &format).await
        }
        VolumeCommand::Add {
            path,
            device,
            fstype,
            options,
            readonly,
        } => {
            let record = VolumeRecord {
                path,
                device,
                fs_type: fstype,
                options,
                read_only: readonly,
            };
            store.add(&record)?;
            Ok(())
        }
        VolumeCommand::Remove { path } => {
            let record = store
                .get(&path)?
                .ok_or_else(|| Error::NotFound(path.clone()))?;
            let device = std::fs::canonicalize(&record.device).unwrap_or(record.device);
            if let Some(pod) = users(root, &device).into_iter().next() {
                return Err(Error::InUse { path, pod }.into());
            }
            store.remove(&path)?;
            Ok(())
        }
        VolumeCommand::List { format } => {
            let records = store.list()?;
            if format == "json" {
                let list: Vec<serde_json::Value> = records
                    .iter()
                    .map(|r| {
                        let mut value = serde_json::to_value(r).unwrap_or_default();
                        value["pods"] = users(root, &r.device).into();
                        value
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            anyhow::ensure!(
                format == "table",
                "--format is table or json, not {format:?}"
            );
            println!(
                "{:<16} {:<6} {:<4} {:<14} PATH",
                "DEVICE", "FSTYPE", "RO", "PODS"
            );
            for r in records {
                let pods: Vec<String> = users(root, &r.device)
                    .iter()
                    .map(|p| p.chars().take(12).collect())
                    .collect();
                println!(
                    "{:<16} {:<6} {:<4} {:<14} {}",
                    r.device.display(),
                    r.fs_type,
                    if r.read_only { "yes" } else { "no" },
                    if pods.is_empty() {
                        "-".to_string()
                    } else {
                        pods.join(",")
                    },
                    r.path.display()
                );
            }
            Ok(())
        }
    }
}
