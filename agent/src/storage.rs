//! Storage in the guest: container root filesystems (a directory or a
//! mounted disk, optionally under a writable overlay), virtio-blk disks
//! found by serial, and small files copied in from the host.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Precondition(String),
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// Checks a name used as one path component (container, exec, disk ids).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A relative path without `..`, for paths the host names below a root.
pub fn relative_path(path: &str) -> Result<PathBuf, Error> {
    let p = Path::new(path);
    if path.is_empty()
        || path.contains('\0')
        || !p
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(Error::Invalid(format!(
            "path '{path}' must be relative, without '..'"
        )));
    }
    Ok(p.to_path_buf())
}

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
pub fn prepare_rootfs(source: &RootfsSource, dir: &Path) -> Result<PreparedRootfs, Error> {
    if !source.lower.is_dir() {
        return Err(Error::NotFound(format!(
            "rootfs directory {}",
            source.lower.display()
        )));
    }
    fs::create_dir_all(dir).map_err(io_error("cannot create", dir))?;
    if !source.writable_overlay {
        return Ok(PreparedRootfs {
            path: source.lower.clone(),
            mounts: vec![],
        });
    }
    let mut mounts = Vec::new();
    let result = (|| {
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
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            overlay_escape(&source.lower),
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
    fn ids() {
        assert!(valid_id("c1"));
        assert!(valid_id("a.b_c-D9"));
        assert!(!valid_id(""));
        assert!(!valid_id(".."));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"x".repeat(129)));
    }

    #[test]
    fn relative_paths() {
        assert!(relative_path("a/b").is_ok());
        assert!(relative_path("/a").is_err());
        assert!(relative_path("a/../b").is_err());
        assert!(relative_path("").is_err());
    }

    #[test]
    fn overlay_options_are_escaped() {
        assert_eq!(overlay_escape(Path::new("/a,b:c")), "/a\\,b\\:c");
    }
}
