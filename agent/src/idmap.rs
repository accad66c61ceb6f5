//! User namespaces of pods: the id mappings a container's user namespace
//! gets (validated here, where the guest meets the daemon's input) and the
//! idmapped mounts that make a filesystem owned by guest root look owned by
//! the container's root.
//!
//! A pod with `userns_options` has one user namespace in the guest; its
//! "host" ids are guest ids. The agent builds the container's root as guest
//! root and enters the user namespace last, so the container's mount, PID
//! and network namespaces stay owned by the guest: a container root can do
//! nothing there that needs a capability over them.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use frakti_proto::id_ranges::{Range, check, to_host};
use nix::errno::Errno;
use oci_spec::runtime::{Linux, LinuxIdMapping};
use serde::{Deserialize, Serialize};

/// A mapping or mount option the kernel would refuse (the syscall
/// wrappers below return their `Errno` as it is).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
}

/// A user namespace's uid and gid mappings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub uids: Vec<Range>,
    pub gids: Vec<Range>,
}

impl IdMap {
    /// The mappings of a spec that asks for a user namespace (checked), or
    /// `None` without one.
    pub fn from_spec(linux: &Linux, wants_userns: bool) -> Result<Option<IdMap>, Error> {
        let convert = |m: &Option<Vec<LinuxIdMapping>>| -> Vec<Range> {
            m.iter()
                .flatten()
                .map(|r| Range {
                    container: r.container_id(),
                    host: r.host_id(),
                    size: r.size(),
                })
                .collect()
        };
        let map = IdMap {
            uids: convert(linux.uid_mappings()),
            gids: convert(linux.gid_mappings()),
        };
        if !wants_userns {
            if !map.uids.is_empty() || !map.gids.is_empty() {
                return Err(Error::Invalid(
                    "linux.uidMappings/gidMappings need a user namespace in linux.namespaces"
                        .into(),
                ));
            }
            return Ok(None);
        }
        for (ranges, field) in [(&map.uids, "uidMappings"), (&map.gids, "gidMappings")] {
            check(ranges).map_err(|why| Error::Invalid(format!("linux.{field}: {why}")))?;
        }
        Ok(Some(map))
    }

    /// The guest uid of the container's `uid`.
    pub fn host_uid(&self, uid: u32) -> Result<u32, Error> {
        to_host(&self.uids, uid)
            .ok_or_else(|| Error::Invalid(format!("uid {uid} is not mapped in the user namespace")))
    }

    /// The guest gid of the container's `gid`.
    pub fn host_gid(&self, gid: u32) -> Result<u32, Error> {
        to_host(&self.gids, gid)
            .ok_or_else(|| Error::Invalid(format!("gid {gid} is not mapped in the user namespace")))
    }

    /// `/proc/<pid>/uid_map` content.
    pub fn uid_map_text(&self) -> String {
        map_text(&self.uids)
    }

    /// `/proc/<pid>/gid_map` content.
    pub fn gid_map_text(&self) -> String {
        map_text(&self.gids)
    }
}

fn map_text(ranges: &[Range]) -> String {
    ranges
        .iter()
        .map(|r| format!("{} {} {}\n", r.container, r.host, r.size))
        .collect()
}

/// A filesystem's mount options for a container in a user namespace:
/// `uid=`/`gid=` are the container's ids and become guest ids; a tmpfs
/// without them is owned by the container's root, as one the container
/// mounted itself would be.
pub fn translate_mount_data(typ: &str, data: &[String], map: &IdMap) -> Result<Vec<String>, Error> {
    let mut out = Vec::with_capacity(data.len() + 2);
    let (mut has_uid, mut has_gid) = (false, false);
    let parse = |value: &str, option: &str| {
        value
            .parse::<u32>()
            .map_err(|_| Error::Invalid(format!("mount option {option} is not a number")))
    };
    for option in data {
        if let Some(value) = option.strip_prefix("uid=") {
            has_uid = true;
            out.push(format!("uid={}", map.host_uid(parse(value, option)?)?));
        } else if let Some(value) = option.strip_prefix("gid=") {
            has_gid = true;
            out.push(format!("gid={}", map.host_gid(parse(value, option)?)?));
        } else {
            out.push(option.clone());
        }
    }
    if typ == "tmpfs" {
        if !has_uid {
            out.push(format!("uid={}", map.host_uid(0)?));
        }
        if !has_gid {
            out.push(format!("gid={}", map.host_gid(0)?));
        }
    }
    Ok(out)
}

/// A detached copy of the mount at `source` (with the mounts below it when
/// `recursive`) whose files' owners are seen through `userns`: guest id
/// `host` shows as the container's id. Fails with EINVAL on a filesystem
/// that cannot be idmapped.
pub fn idmapped_tree(source: &Path, recursive: bool, userns: BorrowedFd) -> Result<OwnedFd, Errno> {
    let path = std::ffi::CString::new(source.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: open_tree reads a NUL-terminated path that outlives the call;
    // it returns a new descriptor or -1.
    let fd = Errno::result(unsafe {
        libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags)
    })?;
    let fd = i32::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just gave us this descriptor; no one else owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::try_from(userns.as_raw_fd()).map_err(|_| Errno::EBADF)?,
    };
    let mut at_flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        at_flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: mount_setattr reads `attr` (of the size passed) and an empty
    // NUL-terminated path; both outlive the call.
    Errno::result(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            at_flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    })?;
    Ok(tree)
}

/// Attaches a detached mount (from [`idmapped_tree`]) on the object `target`
/// refers to (an `O_PATH` descriptor: no path is looked up again).
pub fn attach(tree: BorrowedFd, target: BorrowedFd) -> Result<(), Errno> {
    let flags = libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH;
    // SAFETY: move_mount on two descriptors with empty NUL-terminated paths
    // that outlive the call.
    Errno::result(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            flags,
        )
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    use Range as R;

    fn kubelet_map() -> IdMap {
        IdMap {
            uids: vec![R::new(0, 65536, 65536)],
            gids: vec![R::new(0, 65536, 65536)],
        }
    }

    #[test]
    fn ids_map_to_the_guest_only_inside_ranges() {
        let map = IdMap {
            uids: vec![R::new(0, 100_000, 10), R::new(1000, 200_000, 5)],
            gids: vec![R::new(0, 300_000, 1)],
        };
        assert_eq!(map.host_uid(1004).unwrap(), 200_004);
        assert!(map.host_uid(10).is_err());
        assert!(map.host_gid(1).is_err());
        assert_eq!(map.uid_map_text(), "0 100000 10\n1000 200000 5\n");
    }

    #[test]
    fn mappings_come_from_the_spec_only_with_a_user_namespace() {
        let mut linux = Linux::default();
        linux.set_uid_mappings(Some(vec![LinuxIdMapping::default()]));
        let err = IdMap::from_spec(&linux, false).unwrap_err().to_string();
        assert!(err.contains("need a user namespace"), "{err}");
        let mut linux = Linux::default();
        linux.set_uid_mappings(None);
        linux.set_gid_mappings(None);
        assert!(IdMap::from_spec(&linux, false).unwrap().is_none());
        let err = IdMap::from_spec(&linux, true).unwrap_err().to_string();
        assert!(err.contains("uidMappings"), "{err}");
    }

    #[test]
    fn tmpfs_and_devpts_options_get_guest_ids() {
        let map = kubelet_map();
        let data = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            translate_mount_data("tmpfs", &data(&["mode=755", "size=65536k"]), &map).unwrap(),
            data(&["mode=755", "size=65536k", "uid=65536", "gid=65536"])
        );
        assert_eq!(
            translate_mount_data("devpts", &data(&["newinstance", "gid=5", "mode=620"]), &map)
                .unwrap(),
            data(&["newinstance", "gid=65541", "mode=620"])
        );
        assert_eq!(
            translate_mount_data("tmpfs", &data(&["uid=1000"]), &map).unwrap(),
            data(&["uid=66536", "gid=65536"])
        );
        for bad in ["uid=x", "gid=-1", "uid=70000"] {
            assert!(
                translate_mount_data("tmpfs", &data(&[bad]), &map).is_err(),
                "{bad}"
            );
        }
    }
}
