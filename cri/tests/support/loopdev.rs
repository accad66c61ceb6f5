//! Loop devices over sparse files: the block devices the volume tests and
//! the volume benchmark hand to pods (run as root, in L1 under the lab).

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a sparse file; detached when dropped (the file is
/// left to its directory's owner).
pub struct LoopDevice {
    pub device: PathBuf,
    pub file: PathBuf,
}

fn failed(what: String) -> io::Error {
    io::Error::other(what)
}

impl LoopDevice {
    /// A `mib` MiB sparse file `file`, attached to the first free loop device.
    pub fn new(file: &Path, mib: u64) -> io::Result<LoopDevice> {
        std::fs::File::create(file)?.set_len(mib << 20)?;
        // Busybox's losetup (the lab's) has no --show: find, then attach.
        let out = Command::new("losetup").arg("-f").output()?;
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !out.status.success() || !device.starts_with("/dev/") {
            return Err(failed(format!(
                "losetup -f: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let status = Command::new("losetup").arg(&device).arg(file).status()?;
        if !status.success() {
            return Err(failed(format!(
                "losetup {} {} failed ({status})",
                device.display(),
                file.display()
            )));
        }
        Ok(LoopDevice {
            device,
            file: file.to_path_buf(),
        })
    }

    /// An empty ext4 filesystem on the device, made by `mke2fs`.
    pub fn mkfs_ext4(&self, mke2fs: &OsStr) -> io::Result<()> {
        let status = Command::new(mke2fs)
            .args(["-q", "-t", "ext4"])
            .arg(&self.device)
            .status()?;
        if !status.success() {
            return Err(failed(format!(
                "mke2fs {} failed ({status})",
                self.device.display()
            )));
        }
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}
