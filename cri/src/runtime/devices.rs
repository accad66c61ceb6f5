//! Block storage straight into the VM, in kubelet's two shapes: raw block
//! volumes (`volumeMode: Block`), delivered as CRI `devices`, whose node
//! the agent makes at the container path; and direct-assigned filesystem
//! volumes ([`crate::volume`]), CRI mounts whose host path a volume driver
//! registered, which the agent mounts. Each device becomes a virtio-blk
//! disk in a free volume slot of the pod's VM (read-only at the device
//! when the permissions lack `w` or the volume is read-only). A device
//! mounted on the host, or attached to another pod's VM (unless both only
//! read it), is refused with who holds it. Containers of one pod share the
//! disk; the last one removed detaches it after the guest unmounted or
//! flushed it.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use frakti_proto::agent::v1 as pb;
use k8s_cri::v1 as cri;

use super::pod::Pod;
use super::state::SlotRecord;
use super::{Error, Result, Runtime, agent_call, lock};
use crate::sandbox::agent::AgentClient;
use crate::sandbox::{api, vmm};
use crate::volume::VolumeRecord;

/// A host block device (or, for a direct volume, an image file).
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostDevice {
    /// The device node or file, symlinks resolved.
    path: PathBuf,
    /// A block device's number; `None` for a file.
    rdev: Option<u64>,
}

/// How the guest takes a disk: a raw device, or a filesystem to mount.
struct Use<'a> {
    read_only: bool,
    /// `(fs_type, options)` of a direct volume.
    filesystem: Option<(&'a str, &'a [String])>,
}

/// The CRI permissions: letters of "rwm", empty meaning all of them.
fn permissions(device: &cri::Device) -> Result<String> {
    let permissions = if device.permissions.is_empty() {
        "rwm"
    } else {
        device.permissions.as_str()
    };
    if !permissions.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
        return Err(Error::InvalidArgument(format!(
            "devices: permissions {:?} of {} must be letters of \"rwm\"",
            device.permissions, device.container_path
        )));
    }
    Ok(permissions.to_string())
}

fn resolve(device: &cri::Device) -> Result<HostDevice> {
    if !device.container_path.starts_with("/dev/") || device.container_path.contains("..") {
        return Err(Error::InvalidArgument(format!(
            "devices: container_path {:?} must be a path below /dev",
            device.container_path
        )));
    }
    let host = Path::new(&device.host_path);
    if !host.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "devices: host_path {:?} must be absolute",
            device.host_path
        )));
    }
    let path = std::fs::canonicalize(host).map_err(|e| Error::NotFound {
        kind: "device",
        id: format!("{} ({e})", device.host_path),
    })?;
    let meta = std::fs::metadata(&path).map_err(|source| Error::Io {
        what: "cannot stat",
        path: path.clone(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(Error::InvalidArgument(format!(
            "devices: {} is not a block device: only block devices can be passed into a pod VM",
            path.display()
        )));
    }
    Ok(HostDevice {
        path,
        rdev: Some(meta.rdev()),
    })
}

/// Where the host has `rdev` mounted, if it does (by major:minor, so any
/// name of the device counts).
fn host_mount(rdev: u64, mountinfo: &str) -> Option<String> {
    let wanted = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let device = fields.nth(2)?;
        let mount_point = fields.next().and_then(|_| fields.next())?;
        (device == wanted).then(|| mount_point.to_string())
    })
}

fn disk_id(serial: &str) -> String {
    format!("blk-{serial}")
}

impl Runtime {
    /// Attaches the container's `devices` (or finds them attached for
    /// another container of the pod); the agent's view of them.
    pub(crate) async fn attach_devices(
        &self,
        pod: &Pod,
        container_id: &str,
        devices: &[cri::Device],
        agent: &mut AgentClient,
    ) -> Result<Vec<pb::BlockDevice>> {
        let mut attached = Vec::new();
        for device in devices {
            match self.attach_device(pod, container_id, device, agent).await {
                Ok(block) => attached.push(block),
                Err(e) => {
                    self.detach_devices(pod, container_id).await;
                    return Err(e);
                }
            }
        }
        Ok(attached)
    }

    async fn attach_device(
        &self,
        pod: &Pod,
        container_id: &str,
        device: &cri::Device,
        agent: &mut AgentClient,
    ) -> Result<pb::BlockDevice> {
        let permissions = permissions(device)?;
        let host = resolve(device)?;
        let usage = Use {
            read_only: !permissions.contains('w'),
            filesystem: None,
        };
        let disk_id = self
            .attach_host(pod, container_id, &host, usage, agent)
            .await?;
        Ok(pb::BlockDevice {
            disk_id,
            container_path: device.container_path.clone(),
            permissions,
        })
    }

    /// The CRI mounts whose host path is a registered direct volume,
    /// attached and mounted in the guest: mount index → guest path.
    pub(crate) async fn attach_direct_volumes(
        &self,
        pod: &Pod,
        container_id: &str,
        mounts: &[cri::Mount],
        agent: &mut AgentClient,
    ) -> Result<HashMap<usize, String>> {
        let mut attached = HashMap::new();
        for (index, mount) in mounts.iter().enumerate() {
            let record = self
                .inner
                .volumes
                .get(Path::new(&mount.host_path))
                .map_err(|e| Error::FailedPrecondition(e.to_string()))?;
            let Some(record) = record else {
                continue;
            };
            let result = self
                .attach_direct_volume(pod, container_id, &record, agent)
                .await;
            match result {
                Ok(guest_path) => {
                    attached.insert(index, guest_path);
                }
                Err(e) => {
                    self.detach_devices(pod, container_id).await;
                    return Err(e);
                }
            }
        }
        Ok(attached)
    }

    async fn attach_direct_volume(
        &self,
        pod: &Pod,
        container_id: &str,
        record: &VolumeRecord,
        agent: &mut AgentClient,
    ) -> Result<String> {
        let meta = std::fs::metadata(&record.device).map_err(|e| Error::NotFound {
            kind: "direct volume device",
            id: format!(
                "{} of {} ({e})",
                record.device.display(),
                record.path.display()
            ),
        })?;
        let host = HostDevice {
            path: record.device.clone(),
            rdev: meta.file_type().is_block_device().then(|| meta.rdev()),
        };
        let usage = Use {
            read_only: record.read_only,
            filesystem: Some((&record.fs_type, &record.options)),
        };
        let disk_id = self
            .attach_host(pod, container_id, &host, usage, agent)
            .await?;
        Ok(format!("/run/frakti/disks/{disk_id}"))
    }

    /// Puts `host` in a free slot of the pod's VM for `container_id` (or
    /// shares the pod's disk of it); its disk id.
    async fn attach_host(
        &self,
        pod: &Pod,
        container_id: &str,
        host: &HostDevice,
        usage: Use<'_>,
        agent: &mut AgentClient,
    ) -> Result<String> {
        let read_only = usage.read_only;
        if let Some(disk_id) = self.share_device(pod, container_id, host, read_only)? {
            return Ok(disk_id);
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if let Some(mount_point) = host.rdev.and_then(|rdev| host_mount(rdev, &mountinfo)) {
            return Err(Error::FailedPrecondition(format!(
                "{} is mounted on the host at {mount_point}: a device goes into one \
                 VM, never mounted on the host as well",
                host.path.display()
            )));
        }
        self.check_other_pods(pod, host, read_only)?;
        let serial = free_slot(pod)?;
        let disk_id = disk_id(&serial);
        // The slot is taken before the first await: parallel creations in
        // the pod cannot pick it too.
        lock(&pod.state).record.volumes.push(SlotRecord {
            image_id: String::new(),
            serial: serial.clone(),
            disk_id: disk_id.clone(),
            file: None,
            device: Some(host.path.clone()),
            owners: vec![container_id.to_string()],
            read_only,
        });
        let attached = self
            .attach_slot(pod, &serial, &disk_id, host, usage, agent)
            .await;
        if let Err(e) = attached {
            lock(&pod.state)
                .record
                .volumes
                .retain(|slot| slot.serial != serial);
            return Err(e);
        }
        pod.save()?;
        tracing::info!(pod = %pod.id, container = %container_id, device = %host.path.display(), %serial, read_only, "disk attached");
        Ok(disk_id)
    }

    async fn attach_slot(
        &self,
        pod: &Pod,
        serial: &str,
        disk_id: &str,
        host: &HostDevice,
        usage: Use<'_>,
        agent: &mut AgentClient,
    ) -> Result<()> {
        let socket = pod.files.api_socket();
        api::attach_disk(&socket, serial, &host.path, usage.read_only).await?;
        let (fs_type, options) = usage.filesystem.unwrap_or(("", &[]));
        let request = pb::MountDiskRequest {
            disk_id: disk_id.to_string(),
            serial: serial.to_string(),
            fs_type: fs_type.to_string(),
            options: options.to_vec(),
            read_only: usage.read_only,
            timeout_ms: 0,
        };
        if let Err(e) = agent_call("MountDisk", agent.mount_disk(request)).await {
            let _ = api::detach_disk(&socket, serial).await;
            return Err(e);
        }
        Ok(())
    }

    /// The disk of `host` if this pod has it attached already (another
    /// container's): shared, with the stricter access of the two kept.
    fn share_device(
        &self,
        pod: &Pod,
        container_id: &str,
        host: &HostDevice,
        read_only: bool,
    ) -> Result<Option<String>> {
        let mut st = lock(&pod.state);
        let Some(slot) = st
            .record
            .volumes
            .iter_mut()
            .find(|slot| slot.device.as_ref() == Some(&host.path))
        else {
            return Ok(None);
        };
        if slot.read_only && !read_only {
            return Err(Error::FailedPrecondition(format!(
                "{} is attached read-only for another container of the pod; \
                 it cannot be written too",
                host.path.display()
            )));
        }
        slot.owners.push(container_id.to_string());
        Ok(Some(slot.disk_id.clone()))
    }

    /// Refuses a device another pod's VM holds, unless both only read it.
    fn check_other_pods(&self, pod: &Pod, host: &HostDevice, read_only: bool) -> Result<()> {
        for other in self.pods() {
            if other.id == pod.id {
                continue;
            }
            let holds = lock(&other.state)
                .record
                .volumes
                .iter()
                .find(|slot| slot.device.as_ref() == Some(&host.path))
                .map(|slot| slot.read_only);
            if let Some(other_read_only) = holds {
                if !(read_only && other_read_only) {
                    return Err(Error::FailedPrecondition(format!(
                        "{} is attached {} to pod sandbox {}",
                        host.path.display(),
                        if other_read_only {
                            "read-only"
                        } else {
                            "read-write"
                        },
                        other.id
                    )));
                }
            }
        }
        Ok(())
    }

    /// The container no longer uses its devices: the last user of each
    /// flushes and unregisters it in the guest, then the slot is emptied.
    pub(crate) async fn detach_devices(&self, pod: &Pod, container_id: &str) {
        self.release_devices(pod, |slot| {
            slot.owners.retain(|owner| owner != container_id);
            slot.owners.is_empty()
        })
        .await;
    }

    /// Before the VM powers off: every device is unmounted (or flushed)
    /// by the agent and detached, so filesystems are left clean.
    pub(crate) async fn detach_all_devices(&self, pod: &Pod) {
        self.release_devices(pod, |_| true).await;
    }

    async fn release_devices(&self, pod: &Pod, mut release: impl FnMut(&mut SlotRecord) -> bool) {
        let released: Vec<SlotRecord> = {
            let mut st = lock(&pod.state);
            let (mut released, mut kept) = (Vec::new(), Vec::new());
            for mut slot in st.record.volumes.drain(..) {
                if slot.device.is_some() && release(&mut slot) {
                    released.push(slot);
                } else {
                    kept.push(slot);
                }
            }
            st.record.volumes = kept;
            released
        };
        if released.is_empty() {
            return;
        }
        for slot in released {
            if let Ok(mut agent) = pod.agent() {
                let request = pb::UnmountDiskRequest {
                    disk_id: slot.disk_id.clone(),
                };
                if let Err(e) = agent_call("UnmountDisk", agent.unmount_disk(request)).await {
                    tracing::warn!(pod = %pod.id, "{}", crate::error_chain(&e));
                }
                if let Err(e) = api::detach_disk(&pod.files.api_socket(), &slot.serial).await {
                    tracing::warn!(pod = %pod.id, "{}", crate::error_chain(&e));
                }
            }
            tracing::info!(pod = %pod.id, serial = %slot.serial, "block device detached");
        }
        if let Err(e) = pod.save() {
            tracing::warn!(pod = %pod.id, "{}", crate::error_chain(&e));
        }
    }
}

/// A volume slot no disk of the pod uses.
pub(super) fn free_slot(pod: &Pod) -> Result<String> {
    let st = lock(&pod.state);
    let used: Vec<&String> = st.record.volumes.iter().map(|s| &s.serial).collect();
    (0..vmm::VOLUME_SLOTS)
        .map(vmm::volume_slot)
        .find(|s| !used.contains(&s))
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "pod sandbox {} has no free disk slot for another volume ({} in use)",
                pod.id,
                vmm::VOLUME_SLOTS
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(host: &str, container: &str, permissions: &str) -> cri::Device {
        cri::Device {
            host_path: host.into(),
            container_path: container.into(),
            permissions: permissions.into(),
        }
    }

    #[test]
    fn permissions_are_letters_of_rwm() {
        assert_eq!(permissions(&device("/dev/x", "/dev/y", "")).unwrap(), "rwm");
        assert_eq!(permissions(&device("/dev/x", "/dev/y", "r")).unwrap(), "r");
        assert_eq!(
            permissions(&device("/dev/x", "/dev/y", "mrw")).unwrap(),
            "mrw"
        );
        for bad in ["x", "rw ", "RW", "r,w"] {
            let err = permissions(&device("/dev/x", "/dev/y", bad)).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn only_block_devices_below_dev_are_taken() {
        let err = resolve(&device("/dev/null", "/dev/xvda", "rw")).unwrap_err();
        assert!(err.to_string().contains("not a block device"), "{err}");
        let err = resolve(&device("/nonexistent/disk", "/dev/xvda", "rw")).unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        let err = resolve(&device("relative", "/dev/xvda", "rw")).unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
        for path in ["/data/disk", "/dev/../etc/passwd", "dev/xvda"] {
            let err = resolve(&device("/dev/null", path, "rw")).unwrap_err();
            assert!(err.to_string().contains("below /dev"), "{path}: {err}");
        }
    }

    #[test]
    fn host_mounts_are_found_by_major_and_minor() {
        let mountinfo = "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
                         30 22 7:3 / /mnt/data rw - ext4 /dev/loop3 rw\n";
        let rdev = nix::sys::stat::makedev(7, 3);
        assert_eq!(host_mount(rdev, mountinfo).as_deref(), Some("/mnt/data"));
        assert_eq!(host_mount(nix::sys::stat::makedev(7, 4), mountinfo), None);
        assert_eq!(host_mount(rdev, "garbage\n\n1 2\n"), None);
    }
}
