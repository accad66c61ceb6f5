//! Virtio-blk disks found by serial: mounted with a filesystem, or
//! registered raw (block volumes); synced or flushed before they go.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::{Error, Storage, io_error, valid_id};

/// Finds the block device whose virtio serial is `serial` under
/// `sys_block` (normally /sys/block); returns its name, e.g. "vdb".
pub fn find_by_serial(sys_block: &Path, serial: &str) -> Option<String> {
    let entries = fs::read_dir(sys_block).ok()?;
    entries.flatten().find_map(|entry| {
        let found = fs::read_to_string(entry.path().join("serial")).ok()?;
        (found.trim_end_matches(['\n', '\0']) == serial)
            .then(|| entry.file_name().to_string_lossy().into_owned())
    })
}

/// A request to mount a disk.
pub struct DiskRequest {
    pub id: String,
    pub serial: String,
    pub fs_type: String,
    pub options: Vec<String>,
    pub read_only: bool,
    pub timeout: std::time::Duration,
}

pub(super) struct Disk {
    device: PathBuf,
    /// Where it is mounted; `None` for a raw block device.
    mount: Option<PathBuf>,
    fs_type: String,
}

/// statfs of a mounted disk, in bytes and inodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskUsage {
    pub id: String,
    pub fs_type: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
}

/// Usage of the filesystem mounted at `target`.
fn filesystem_usage(id: &str, fs_type: &str, target: &Path) -> Result<DiskUsage, Error> {
    let stat = nix::sys::statvfs::statvfs(target).map_err(|source| {
        io_error("cannot statfs", target)(io::Error::from_raw_os_error(source as i32))
    })?;
    let fragment = stat.fragment_size();
    let bytes = |blocks: u64| blocks.saturating_mul(fragment);
    let blocks = stat.blocks();
    Ok(DiskUsage {
        id: id.to_string(),
        fs_type: fs_type.to_string(),
        capacity_bytes: bytes(blocks),
        used_bytes: bytes(blocks.saturating_sub(stat.blocks_free())),
        available_bytes: bytes(stat.blocks_available()),
        inodes_total: stat.files(),
        inodes_free: stat.files_free(),
    })
}

impl Storage {
    /// The device node of a disk mounted (or registered raw) earlier.
    pub fn device(&self, id: &str) -> Result<PathBuf, Error> {
        let disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        disks
            .get(id)
            .map(|d| d.device.clone())
            .ok_or_else(|| Error::NotFound(format!("disk {id}")))
    }

    /// Finds the disk by serial (waiting up to the timeout for it to
    /// appear) and mounts it; returns (guest path, device).
    pub fn mount_disk(&self, request: &DiskRequest) -> Result<(PathBuf, PathBuf), Error> {
        if !valid_id(&request.id) {
            return Err(Error::Invalid(format!("bad disk id '{}'", request.id)));
        }
        if request.serial.is_empty() || request.serial.contains(['/', '\0']) {
            return Err(Error::Invalid(format!("bad serial '{}'", request.serial)));
        }
        let mut disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        if disks.contains_key(&request.id) {
            return Err(Error::Exists(format!("disk {}", request.id)));
        }
        let deadline = std::time::Instant::now() + request.timeout;
        let name = loop {
            if let Some(name) = find_by_serial(&self.sys_block, &request.serial) {
                break name;
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::NotFound(format!(
                    "virtio-blk disk with serial '{}' (waited {:?})",
                    request.serial, request.timeout
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        // A slot filled at run time (an image disk, a block volume) shows
        // size 0 until the guest has handled the config-change interrupt:
        // wait for it.
        {
            let size = self.sys_block.join(&name).join("size");
            while fs::read_to_string(&size).is_ok_and(|s| s.trim() == "0") {
                if std::time::Instant::now() >= deadline {
                    return Err(Error::NotFound(format!(
                        "virtio-blk disk with serial '{}' has no backing file (waited {:?})",
                        request.serial, request.timeout
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let device = self.dev.join(&name);
        if request.fs_type.is_empty() && request.read_only {
            set_read_only(&device)?;
        }
        if request.fs_type.is_empty() {
            disks.insert(
                request.id.clone(),
                Disk {
                    device: device.clone(),
                    mount: None,
                    fs_type: String::new(),
                },
            );
            return Ok((device.clone(), device));
        }
        let options = crate::init::parse_mount_options(&request.options);
        let mut flags = options.flags;
        if request.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        let target = self.disks_dir().join(&request.id);
        fs::create_dir_all(&target).map_err(io_error("cannot create", &target))?;
        let data = options.data.join(",");
        mount(
            Some(&device),
            &target,
            Some(request.fs_type.as_str()),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|source| Error::Mount {
            what: device.display().to_string(),
            target: target.clone(),
            source,
        })?;
        disks.insert(
            request.id.clone(),
            Disk {
                device: device.clone(),
                mount: Some(target.clone()),
                fs_type: request.fs_type.clone(),
            },
        );
        Ok((target, device))
    }

    /// statfs of every mounted disk, by id (for volume stats); a disk whose
    /// statfs fails is left out and logged.
    pub fn disk_usage(&self) -> Vec<DiskUsage> {
        let disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        let mut usage: Vec<DiskUsage> = disks
            .iter()
            .filter_map(|(id, disk)| {
                let target = disk.mount.as_ref()?;
                filesystem_usage(id, &disk.fs_type, target)
                    .inspect_err(|e| tracing::warn!(disk = %id, "{e}"))
                    .ok()
            })
            .collect();
        usage.sort_by(|a, b| a.id.cmp(&b.id));
        usage
    }

    pub fn unmount_disk(&self, id: &str) -> Result<(), Error> {
        let mut disks = self.disks.lock().unwrap_or_else(|e| e.into_inner());
        let Some(disk) = disks.get(id) else {
            return Err(Error::NotFound(format!("disk {id}")));
        };
        if let Some(target) = &disk.mount {
            // Containers' mount namespaces may keep the filesystem alive
            // past this unmount (until their last process is reaped):
            // everything written reaches the disk now, before the host
            // detaches it.
            sync_filesystem(target)?;
            match umount2(target, MntFlags::empty()) {
                Ok(()) | Err(Errno::EINVAL) => {}
                Err(Errno::EBUSY) => {
                    return Err(Error::Precondition(format!("disk {id} is in use")));
                }
                Err(source) => {
                    return Err(Error::Mount {
                        what: "(unmount)".into(),
                        target: target.clone(),
                        source,
                    });
                }
            }
            let _ = fs::remove_dir(target);
        } else {
            // A raw block volume: what containers wrote through the guest's
            // page cache reaches the disk before the host detaches it.
            fs::File::open(&disk.device)
                .and_then(|f| f.sync_all())
                .map_err(io_error("cannot flush", &disk.device))?;
        }
        disks.remove(id);
        Ok(())
    }
}

/// syncfs(2) of the filesystem mounted at `target`.
fn sync_filesystem(target: &Path) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let dir = fs::File::open(target).map_err(io_error("cannot open", target))?;
    // SAFETY: syncfs takes a descriptor that stays open for the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } < 0 {
        return Err(io_error("cannot sync", target)(io::Error::last_os_error()));
    }
    Ok(())
}

/// `_IO(0x12, 93)` from linux/fs.h (the libc crate lacks it).
const BLKROSET: libc::c_ulong = 0x125d;

/// Marks a raw block device read-only in the guest (BLKROSET): a
/// container's writes fail with EPERM before they reach the device.
fn set_read_only(device: &Path) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let file = fs::File::open(device).map_err(io_error("cannot open", device))?;
    let read_only: libc::c_int = 1;
    // SAFETY: BLKROSET reads one int through the pointer, which points at
    // a live local; the descriptor is open for the call's duration.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKROSET, &read_only) };
    if ret < 0 {
        return Err(io_error("cannot make read-only", device)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_disks_by_serial() {
        let sys = tempfile::tempdir().unwrap();
        for (name, serial) in [("vda", "boot\n"), ("vdb", "image-abc"), ("loop0", "")] {
            fs::create_dir_all(sys.path().join(name)).unwrap();
            if !serial.is_empty() {
                fs::write(sys.path().join(name).join("serial"), serial).unwrap();
            }
        }
        assert_eq!(
            find_by_serial(sys.path(), "image-abc").as_deref(),
            Some("vdb")
        );
        assert_eq!(find_by_serial(sys.path(), "boot").as_deref(), Some("vda"));
        assert_eq!(find_by_serial(sys.path(), "nope"), None);
    }

    #[test]
    fn unknown_disks() {
        let state = tempfile::tempdir().unwrap();
        let storage = Storage::new(state.path().to_path_buf());
        let request = DiskRequest {
            id: "d1".into(),
            serial: "no-such-serial".into(),
            fs_type: "ext4".into(),
            options: vec![],
            read_only: true,
            timeout: std::time::Duration::from_millis(50),
        };
        assert!(matches!(
            storage.mount_disk(&request),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            storage.unmount_disk("d1"),
            Err(Error::NotFound(_))
        ));
        let bad = DiskRequest {
            id: "../d".into(),
            ..request
        };
        assert!(matches!(storage.mount_disk(&bad), Err(Error::Invalid(_))));
    }

    #[test]
    fn filesystem_usage_is_consistent_and_errors_on_missing_paths() {
        let dir = tempfile::tempdir().unwrap();
        let usage = filesystem_usage("d1", "tmpfs", dir.path()).unwrap();
        assert_eq!((usage.id.as_str(), usage.fs_type.as_str()), ("d1", "tmpfs"));
        assert!(usage.capacity_bytes > 0);
        assert!(usage.used_bytes <= usage.capacity_bytes);
        assert!(usage.available_bytes <= usage.capacity_bytes - usage.used_bytes);
        assert!(usage.inodes_free <= usage.inodes_total);
        let missing = dir.path().join("gone");
        let err = filesystem_usage("d2", "ext4", &missing).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
    }
}
