//! The container's root: mounts, devices, pivot_root, masked and
//! read-only paths.

use super::*;

/// Builds the container's root as guest root. In a user namespace
/// (`userns`) binds are idmapped where their filesystem allows it, and
/// tmpfs, devpts and device nodes get the container's ids mapped to guest
/// ids, so the container's root owns what a runc container's root would.
pub(super) fn setup_rootfs(
    rootfs: &Path,
    spec: &Spec,
    userns: Option<&Userns>,
) -> Result<(), Error> {
    let linux = spec.linux().clone().unwrap_or_default();
    // Nothing the container mounts may propagate back to the agent.
    let propagation = match linux.rootfs_propagation().as_deref() {
        None | Some("") | Some("rprivate") | Some("private") => MsFlags::MS_PRIVATE,
        Some("rslave") | Some("slave") => MsFlags::MS_SLAVE,
        Some(other) => {
            return Err(Error::Invalid(format!(
                "rootfsPropagation '{other}' is not supported"
            )));
        }
    };
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | propagation,
        None::<&str>,
    )
    .map_err(Error::sys("cannot make / private"))?;
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(Error::sys(format!("cannot bind {}", rootfs.display())))?;

    // Opened after the bind: mounts go onto the new mount's tree.
    let root = Root::open(rootfs)?;
    let mounts = spec.mounts().clone().unwrap_or_default();
    let mut dev_is_tmpfs = false;
    for m in &mounts {
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs") {
            dev_is_tmpfs = true;
        }
        mount_one(&root, m, userns)?;
    }
    if dev_is_tmpfs {
        create_default_devices(&root)?;
    }
    let map = userns.and_then(|u| u.map.as_ref());
    for device in linux.devices().iter().flatten() {
        create_device(&root, device, map)?;
    }
    drop(root);
    pivot_root(rootfs)?;

    for path in linux.masked_paths().iter().flatten() {
        mask_path(path)?;
    }
    for path in linux.readonly_paths().iter().flatten() {
        readonly_path(path)?;
    }
    if spec
        .root()
        .as_ref()
        .is_some_and(|r| r.readonly() == Some(true))
    {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(Error::sys("cannot make the root read-only"))?;
    }
    Ok(())
}

/// mount(8)-style options: flags, propagation flags and the data string.
#[derive(Debug, PartialEq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub propagation: MsFlags,
    pub data: Vec<String>,
}

pub fn parse_mount_options(options: &[String]) -> MountOptions {
    let mut parsed = MountOptions {
        flags: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: vec![],
    };
    for option in options {
        let (set, clear, propagation) = match option.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty(), MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty(), MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty(), MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty(), MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty(), MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty(), MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty(), MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty(), MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty(), MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty(), MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty(), MsFlags::empty()),
            "rbind" => (
                MsFlags::MS_BIND | MsFlags::MS_REC,
                MsFlags::empty(),
                MsFlags::empty(),
            ),
            "private" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_PRIVATE),
            "rprivate" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            ),
            "shared" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SHARED),
            "rshared" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SHARED | MsFlags::MS_REC,
            ),
            "slave" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SLAVE),
            "rslave" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
            ),
            "unbindable" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_UNBINDABLE),
            "runbindable" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
            ),
            data => {
                parsed.data.push(data.to_string());
                continue;
            }
        };
        parsed.flags = (parsed.flags | set) & !clear;
        parsed.propagation |= propagation;
    }
    parsed
}

pub(super) fn is_cgroup2(path: &str) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

pub(super) fn mount_one(root: &Root, m: &Mount, userns: Option<&Userns>) -> Result<(), Error> {
    let destination = m.destination();
    if !destination.is_absolute() {
        return Err(Error::Invalid(format!(
            "mount destination {} is not absolute",
            destination.display()
        )));
    }
    let options = parse_mount_options(m.options().as_deref().unwrap_or_default());
    let mut typ = m.typ().clone().unwrap_or_default();
    let is_bind = options.flags.contains(MsFlags::MS_BIND) || typ == "bind";
    if typ == "cgroup" || typ == "cgroup2" {
        // Containers get the guest's cgroup2 hierarchy; a host-mode agent on
        // a cgroup v1 host gives them none.
        if !is_cgroup2("/sys/fs/cgroup") {
            return Ok(());
        }
        typ = "cgroup2".into();
    }
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(&typ));
    if is_bind && !source.exists() {
        return Err(Error::Invalid(format!(
            "bind mount source {} does not exist",
            source.display()
        )));
    }
    // The mount point: a file for a bind of a file, else a directory.
    let create = if is_bind && fs::metadata(&source).is_ok_and(|meta| !meta.is_dir()) {
        Create::File
    } else {
        Create::Dir
    };
    let target = root.resolve(destination, create)?;
    let mut data = options.data.clone();
    if let Some(map) = userns.and_then(|u| u.map.as_ref())
        && (typ == "tmpfs" || typ == "devpts")
    {
        data = idmap::translate_mount_data(&typ, &data, map)?;
    }
    let data = data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    let what = || {
        format!(
            "cannot mount {} on {}",
            source.display(),
            destination.display()
        )
    };
    // Remounts act on the new mount: found again, now that it is there.
    let remount = |flags: MsFlags| -> Result<(), Error> {
        let mounted = root.resolve(destination, Create::Nothing)?;
        mount(
            None::<&str>,
            &mounted.proc_path(),
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(Error::sys(what()))
    };
    if is_bind {
        let rec = options.flags & MsFlags::MS_REC;
        let idmapped = match userns {
            Some(userns) => idmapped_bind(&source, &target, !rec.is_empty(), userns)
                .map_err(Error::sys(what()))?,
            None => false,
        };
        if !idmapped {
            mount(
                Some(&source),
                &target.proc_path(),
                None::<&str>,
                MsFlags::MS_BIND | rec,
                None::<&str>,
            )
            .map_err(Error::sys(what()))?;
        }
        let extra = options.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            remount(MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra)?;
        }
    } else {
        let flags = options.flags;
        match mount(
            Some(&source),
            &target.proc_path(),
            Some(typ.as_str()),
            flags,
            data,
        ) {
            Ok(()) => {}
            // sysfs without a network namespace of our own may be refused;
            // fall back to a read-only bind of the agent's.
            Err(Errno::EPERM | Errno::EBUSY) if typ == "sysfs" => {
                mount(
                    Some("/sys"),
                    &target.proc_path(),
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(Error::sys(what()))?;
                remount(MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags)?;
            }
            Err(e) => return Err(Error::sys(what())(e)),
        }
    }
    if !options.propagation.is_empty() {
        remount(options.propagation)?;
    }
    Ok(())
}

/// Binds `source` on `target` seen through the user namespace; false when
/// its filesystem cannot be idmapped (proc, sysfs, devpts, ...), which is
/// then bound as it is: its files keep guest owners, and mode bits decide
/// what the container may do with them.
fn idmapped_bind(
    source: &Path,
    target: &Found,
    recursive: bool,
    userns: &Userns,
) -> Result<bool, Errno> {
    match idmap::idmapped_tree(source, recursive, userns.fd.as_fd()) {
        Ok(tree) => idmap::attach(tree.as_fd(), target.as_fd()).map(|()| true),
        Err(Errno::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The devices every container gets on a tmpfs /dev (as runc does).
pub(super) fn create_default_devices(root: &Root) -> Result<(), Error> {
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = Path::new("/dev").join(name);
        make_node(root, &path, SFlag::S_IFCHR, makedev(major, minor), 0o666)?;
    }
    let dev = root.resolve(Path::new("/dev"), Create::Dir)?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        match nix::unistd::symlinkat(target, &dev, link) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(Error::sys(format!("cannot create /dev/{link}"))(e)),
        }
    }
    Ok(())
}

/// The node at `path` in the root: mknod, or a bind of the agent's node
/// where mknod is not allowed. Whatever was at `path` goes first.
pub(super) fn make_node(
    root: &Root,
    path: &Path,
    kind: SFlag,
    dev: libc::dev_t,
    mode: u32,
) -> Result<Found, Error> {
    let (parent, name) = parent_and_name(root, path)?;
    let _ = nix::unistd::unlinkat(&parent, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
    match nix::sys::stat::mknodat(&parent, name, kind, Mode::from_bits_truncate(mode), dev) {
        Ok(()) => {
            let node = parent.child(name)?;
            if node.is_symlink() {
                return Err(Error::Invalid(format!(
                    "{} was replaced by a symlink",
                    path.display()
                )));
            }
            // mknod is subject to the umask; the magic link reaches the
            // node itself (no symlink, checked above).
            fs::set_permissions(node.proc_path(), fs::Permissions::from_mode(mode))
                .map_err(Error::io(format!("chmod {}", path.display())))?;
            Ok(node)
        }
        Err(Errno::EPERM) => {
            let node = root.resolve(path, Create::File)?;
            mount(
                Some(path),
                &node.proc_path(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(Error::sys(format!("cannot bind {}", path.display())))?;
            Ok(node)
        }
        Err(e) => Err(Error::sys(format!("mknod {}", path.display()))(e)),
    }
}

/// The directory holding `path` (created) and the last component's name.
fn parent_and_name<'p>(root: &Root, path: &'p Path) -> Result<(Found, &'p std::ffi::OsStr), Error> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} names no file", path.display())))?;
    let parent = root.resolve(path.parent().unwrap_or(Path::new("/")), Create::Dir)?;
    Ok((parent, name))
}

pub(super) fn create_device(
    root: &Root,
    device: &LinuxDevice,
    map: Option<&IdMap>,
) -> Result<(), Error> {
    let kind = match device.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(Error::Invalid("device type 'a' is not a node".into()));
        }
    };
    let (major, minor) = device_numbers(device.major(), device.minor())?;
    let path = device.path();
    if !path.is_absolute() {
        return Err(Error::Invalid(format!(
            "device path {} is not absolute",
            path.display()
        )));
    }
    let mode = device.file_mode().unwrap_or(0o666) & 0o7777;
    let node = make_node(root, path, kind, makedev(major, minor), mode)?;
    let (uid, gid) = match map {
        // In a user namespace the node's owner is the container's
        // (its root unless the spec says otherwise), as a guest id.
        Some(map) => (
            Some(map.host_uid(device.uid().unwrap_or(0))?),
            Some(map.host_gid(device.gid().unwrap_or(0))?),
        ),
        None => (device.uid(), device.gid()),
    };
    let uid = uid.map(nix::unistd::Uid::from_raw);
    let gid = gid.map(nix::unistd::Gid::from_raw);
    nix::unistd::fchownat(&node, "", uid, gid, nix::fcntl::AtFlags::AT_EMPTY_PATH)
        .map_err(Error::sys(format!("chown {}", path.display())))
}

pub(super) fn pivot_root(rootfs: &Path) -> Result<(), Error> {
    let old_root = fs::File::open("/").map_err(Error::io("open /"))?;
    nix::unistd::chdir(rootfs).map_err(Error::sys(format!("chdir {}", rootfs.display())))?;
    // pivot_root(".", "."): the old root ends up stacked under the new one
    // and is detached below, with no directory needed for it.
    nix::unistd::pivot_root(".", ".").map_err(Error::sys("pivot_root"))?;
    nix::unistd::fchdir(&old_root).map_err(Error::sys("fchdir"))?;
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(Error::sys("cannot make the old root a slave"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(Error::sys("cannot detach the old root"))?;
    nix::unistd::chdir("/").map_err(Error::sys("chdir /"))
}

pub(super) fn mask_path(path: &str) -> Result<(), Error> {
    let result = match fs::metadata(path) {
        Err(_) => return Ok(()),
        Ok(meta) if meta.is_dir() => mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        ),
        Ok(_) => mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
    };
    result.map_err(Error::sys(format!("cannot mask {path}")))
}

pub(super) fn readonly_path(path: &str) -> Result<(), Error> {
    match mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Err(Errno::ENOENT) => return Ok(()),
        other => other.map_err(Error::sys(format!("cannot bind {path}")))?,
    }
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(Error::sys(format!("cannot make {path} read-only")))
}

// --- The process ------------------------------------------------------------

/// A device's numbers as Linux takes them: a major below 2^12 and a minor
/// below 2^20 (dev_t's encoding); anything else (negative, too large) is
/// refused, not wrapped into another device's numbers.
pub(super) fn device_numbers(major: i64, minor: i64) -> Result<(u64, u64), Error> {
    use crate::cgroup::devices::{MAX_MAJOR, MAX_MINOR, number};
    let check = |field: &str, value: i64, max: i64| {
        number(field, value, max)
            .map(u64::from)
            .map_err(|e| Error::Invalid(e.to_string()))
    };
    Ok((
        check("linux.devices[].major", major, MAX_MAJOR)?,
        check("linux.devices[].minor", minor, MAX_MINOR)?,
    ))
}

#[cfg(test)]
mod device_number_tests {
    use super::*;

    #[test]
    fn device_numbers_are_checked_not_wrapped() {
        assert_eq!(device_numbers(1, 3).unwrap(), (1, 3));
        assert_eq!(
            device_numbers(4095, (1 << 20) - 1).unwrap(),
            (4095, (1 << 20) - 1)
        );
        for (major, minor) in [
            (-1, 0),
            (0, -1),
            (4096, 0),
            (0, 1 << 20),
            (i64::MIN, i64::MAX),
        ] {
            let err = device_numbers(major, minor).unwrap_err();
            assert!(matches!(err, Error::Invalid(_)), "{major}:{minor}: {err}");
        }
    }
}
