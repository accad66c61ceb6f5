//! Container root filesystems: a directory or a mounted disk, optionally
//! under a writable overlay.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::{Error, io_error};
use crate::idmap::{self, IdMap};

/// Where a container's root comes from (a validated `Rootfs` message).
pub struct RootfsSource {
    /// The directory whose content is the root.
    pub lower: PathBuf,
    pub writable_overlay: bool,
    /// Directory (on a disk) to hold the overlay's upper and work dirs;
    /// `None`: a tmpfs private to the container.
    pub upper_base: Option<PathBuf>,
}

/// A prepared root: the path to give the container, and the agent-side
/// mounts to undo when it is removed (innermost last).
pub struct PreparedRootfs {
    pub path: PathBuf,
    pub mounts: Vec<PathBuf>,
}

/// Prepares a container's root in `dir` (the container's state directory).
/// In a user namespace (`userns`: its descriptor and mappings) the image is
/// seen through an idmapped mount, so that its root-owned files are the
/// container root's, and the overlay's upper directory belongs to that root.
pub fn prepare_rootfs(
    source: &RootfsSource,
    dir: &Path,
    userns: Option<(&OwnedFd, &IdMap)>,
) -> Result<PreparedRootfs, Error> {
    if !source.lower.is_dir() {
        return Err(Error::NotFound(format!(
            "rootfs directory {}",
            source.lower.display()
        )));
    }
    fs::create_dir_all(dir).map_err(io_error("cannot create", dir))?;
    let mut mounts = Vec::new();
    let result = (|| {
        let lower = match userns {
            Some((fd, _)) => {
                let lower = dir.join("lower");
                idmapped_bind(&source.lower, &lower, fd)?;
                mounts.push(lower.clone());
                lower
            }
            None => source.lower.clone(),
        };
        if !source.writable_overlay {
            return Ok(lower);
        }
        let base = match &source.upper_base {
            Some(base) => base.clone(),
            None => {
                let rw = dir.join("rw");
                fs::create_dir_all(&rw).map_err(io_error("cannot create", &rw))?;
                mount(
                    Some("tmpfs"),
                    &rw,
                    Some("tmpfs"),
                    MsFlags::MS_NODEV,
                    Some("mode=0755"),
                )
                .map_err(|source| Error::Mount {
                    what: "tmpfs".into(),
                    target: rw.clone(),
                    source,
                })?;
                mounts.push(rw.clone());
                rw
            }
        };
        let upper = base.join("upper");
        let work = base.join("work");
        let root = dir.join("rootfs");
        for d in [&upper, &work, &root] {
            fs::create_dir_all(d).map_err(io_error("cannot create", d))?;
        }
        if let Some((_, map)) = userns {
            // The merged root shows the upper directory's owner.
            let uid = map.host_uid(0).map_err(|e| Error::Invalid(e.to_string()))?;
            let gid = map.host_gid(0).map_err(|e| Error::Invalid(e.to_string()))?;
            std::os::unix::fs::chown(&upper, Some(uid), Some(gid))
                .map_err(io_error("cannot chown", &upper))?;
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            overlay_escape(&lower),
            overlay_escape(&upper),
            overlay_escape(&work)
        );
        mount(
            Some("overlay"),
            &root,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|source| Error::Mount {
            what: "overlay".into(),
            target: root.clone(),
            source,
        })?;
        mounts.push(root.clone());
        Ok(root)
    })();
    match result {
        Ok(path) => Ok(PreparedRootfs { path, mounts }),
        Err(e) => {
            unmount_all(&mounts);
            Err(e)
        }
    }
}

/// Mounts `source` on `target` (made here) idmapped through `userns`.
fn idmapped_bind(source: &Path, target: &Path, userns: &OwnedFd) -> Result<(), Error> {
    fs::create_dir_all(target).map_err(io_error("cannot create", target))?;
    let mount_error = |source| Error::Mount {
        what: "an idmapped image".into(),
        target: target.to_path_buf(),
        source,
    };
    let tree = idmap::idmapped_tree(source, false, userns.as_fd()).map_err(mount_error)?;
    let at = fs::File::open(target).map_err(io_error("cannot open", target))?;
    idmap::attach(tree.as_fd(), at.as_fd()).map_err(mount_error)
}

/// Overlay options separate with ',' and ':'; escape them in paths.
fn overlay_escape(path: &Path) -> String {
    path.display()
        .to_string()
        .replace('\\', "\\\\")
        .replace(',', "\\,")
        .replace(':', "\\:")
}

/// Detaches mounts, innermost (last) first; a mount already gone is fine.
pub fn unmount_all(mounts: &[PathBuf]) {
    for target in mounts.iter().rev() {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => tracing::warn!(target = %target.display(), "cannot unmount: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_are_escaped() {
        assert_eq!(overlay_escape(Path::new("/a,b:c")), "/a\\,b\\:c");
    }
}
