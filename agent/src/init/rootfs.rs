//! The container's root: mounts, devices, pivot_root, masked and
//! read-only paths.

use super::*;

pub(super) fn setup_rootfs(rootfs: &Path, spec: &Spec) -> Result<(), Error> {
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

    let mounts = spec.mounts().clone().unwrap_or_default();
    let mut dev_is_tmpfs = false;
    for m in &mounts {
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs") {
            dev_is_tmpfs = true;
        }
        mount_one(rootfs, m)?;
    }
    if dev_is_tmpfs {
        create_default_devices(rootfs)?;
    }
    for device in linux.devices().iter().flatten() {
        create_device(rootfs, device)?;
    }
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

/// `path` (absolute, as the container sees it) below `root`, resolving
/// symlinks as if `root` were `/`, so a link in the image cannot point a
/// mount outside the container's root.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, Error> {
    let mut resolved = PathBuf::new();
    let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
    let mut links = 0;
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    // Expand into a stack of components to walk.
    while let Some(p) = pending.pop() {
        for c in p.components().rev() {
            match c {
                Component::Normal(name) => parts.push(name.to_os_string()),
                Component::ParentDir => parts.push("..".into()),
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
    }
    while let Some(name) = parts.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&name);
        let on_disk = root.join(&candidate);
        match fs::symlink_metadata(&on_disk) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(Error::Invalid(format!(
                        "too many symlinks in {}",
                        path.display()
                    )));
                }
                let target = fs::read_link(&on_disk)
                    .map_err(Error::io(format!("readlink {}", on_disk.display())))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => parts.push(n.to_os_string()),
                        Component::ParentDir => parts.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved = candidate,
        }
    }
    Ok(root.join(resolved))
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

pub(super) fn mount_one(rootfs: &Path, m: &Mount) -> Result<(), Error> {
    let destination = m.destination();
    if !destination.is_absolute() {
        return Err(Error::Invalid(format!(
            "mount destination {} is not absolute",
            destination.display()
        )));
    }
    let target = resolve_in_root(rootfs, destination)?;
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
    // The mount point: a file for a bind of a file, else a directory.
    if is_bind && fs::metadata(&source).is_ok_and(|meta| !meta.is_dir()) {
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .map_err(Error::io(format!("cannot create {}", parent.display())))?;
        }
        if !target.exists() {
            fs::File::create(&target)
                .map_err(Error::io(format!("cannot create {}", target.display())))?;
        }
    } else {
        fs::create_dir_all(&target)
            .map_err(Error::io(format!("cannot create {}", target.display())))?;
    }
    let data = options.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    let what = || {
        format!(
            "cannot mount {} on {}",
            source.display(),
            destination.display()
        )
    };
    if is_bind {
        let rec = options.flags & MsFlags::MS_REC;
        if !source.exists() {
            return Err(Error::Invalid(format!(
                "bind mount source {} does not exist",
                source.display()
            )));
        }
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | rec,
            None::<&str>,
        )
        .map_err(Error::sys(what()))?;
        let extra = options.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None::<&str>,
            )
            .map_err(Error::sys(what()))?;
        }
    } else {
        let flags = options.flags;
        match mount(Some(&source), &target, Some(typ.as_str()), flags, data) {
            Ok(()) => {}
            // sysfs without a network namespace of our own may be refused;
            // fall back to a read-only bind of the agent's.
            Err(Errno::EPERM | Errno::EBUSY) if typ == "sysfs" => {
                mount(
                    Some("/sys"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(Error::sys(what()))?;
                mount(
                    None::<&str>,
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
                    None::<&str>,
                )
                .map_err(Error::sys(what()))?;
            }
            Err(e) => return Err(Error::sys(what())(e)),
        }
    }
    if !options.propagation.is_empty() {
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            options.propagation,
            None::<&str>,
        )
        .map_err(Error::sys(what()))?;
    }
    Ok(())
}

/// The devices every container gets on a tmpfs /dev (as runc does).
pub(super) fn create_default_devices(rootfs: &Path) -> Result<(), Error> {
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = rootfs.join("dev").join(name);
        make_node(
            &path,
            SFlag::S_IFCHR,
            major,
            minor,
            0o666,
            Path::new("/dev").join(name),
        )?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let path = rootfs.join("dev").join(link);
        match std::os::unix::fs::symlink(target, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("cannot create {}", path.display()))(e)),
        }
    }
    Ok(())
}

/// mknod, or a bind of the agent's node where mknod is not allowed.
pub(super) fn make_node(
    path: &Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    fallback: PathBuf,
) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(Error::io(format!("cannot create {}", parent.display())))?;
    }
    let _ = fs::remove_file(path);
    match mknod(
        path,
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    ) {
        Ok(()) => {
            // mknod is subject to the umask.
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(Error::io(format!("chmod {}", path.display())))
        }
        Err(Errno::EPERM) => {
            fs::File::create(path)
                .map_err(Error::io(format!("cannot create {}", path.display())))?;
            mount(
                Some(&fallback),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(Error::sys(format!("cannot bind {}", fallback.display())))
        }
        Err(e) => Err(Error::sys(format!("mknod {}", path.display()))(e)),
    }
}

pub(super) fn create_device(rootfs: &Path, device: &LinuxDevice) -> Result<(), Error> {
    let kind = match device.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(Error::Invalid("device type 'a' is not a node".into()));
        }
    };
    let (major, minor) = device_numbers(device.major(), device.minor())?;
    let path = resolve_in_root(rootfs, device.path())?;
    let mode = device.file_mode().unwrap_or(0o666) & 0o7777;
    make_node(&path, kind, major, minor, mode, device.path().clone())?;
    let uid = device.uid().map(nix::unistd::Uid::from_raw);
    let gid = device.gid().map(nix::unistd::Gid::from_raw);
    nix::unistd::chown(&path, uid, gid).map_err(Error::sys(format!("chown {}", path.display())))
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
    let check = |value: i64, bits: u32, field: &str| {
        u64::try_from(value)
            .ok()
            .filter(|v| *v < 1 << bits)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "linux.devices[].{field} {value} is not a device {field} (0 to {})",
                    (1u64 << bits) - 1
                ))
            })
    };
    Ok((check(major, 12, "major")?, check(minor, 20, "minor")?))
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
