//! The container's mounts: the standard ones (containerd's), the pod's
//! /etc/resolv.conf and /etc/hostname, then the runtime's guest mounts.

use std::path::PathBuf;

use oci_spec::runtime::Mount;

use super::{Error, GuestMount, GuestMountKind, SpecInput, invalid, precondition};

fn mount(destination: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(destination));
    m.set_typ(Some(typ.to_string()));
    m.set_source(Some(PathBuf::from(source)));
    m.set_options(Some(options.iter().map(|o| o.to_string()).collect()));
    m
}

/// containerd's default mounts; /sys and /sys/fs/cgroup are writable only
/// for privileged containers.
fn standard(privileged: bool) -> Vec<Mount> {
    let sys = if privileged {
        &["nosuid", "noexec", "nodev"][..]
    } else {
        &["nosuid", "noexec", "nodev", "ro"][..]
    };
    let cgroup = if privileged {
        &["nosuid", "noexec", "nodev", "relatime"][..]
    } else {
        &["nosuid", "noexec", "nodev", "relatime", "ro"][..]
    };
    vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount("/sys", "sysfs", "sysfs", sys),
        mount("/sys/fs/cgroup", "cgroup", "cgroup", cgroup),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
    ]
}

/// `path` made canonical for comparison: absolute, no `.`, no empty
/// components, no trailing '/'. `..` is refused: a destination must not
/// climb out of what it names.
fn clean_destination(path: &str) -> Result<String, Error> {
    let bad = |why: &str| invalid("mounts", format!("container_path {path:?} {why}"));
    if !path.starts_with('/') {
        return Err(bad("is not an absolute path"));
    }
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let mut clean = String::with_capacity(path.len());
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return Err(bad("contains '..'"));
        }
        clean.push('/');
        clean.push_str(part);
    }
    if clean.is_empty() {
        return Err(bad("is the container's root"));
    }
    Ok(clean)
}

fn is_under(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir)
        .is_some_and(|rest| rest.starts_with('/'))
}

/// The mount list being built: a later mount on a destination replaces an
/// earlier one; replacing a standard mount also drops the standard mounts
/// under it (a CRI mount at /dev takes /dev/pts and /dev/shm with it).
struct MountList {
    mounts: Vec<(String, Mount, bool)>,
}

impl MountList {
    fn push(&mut self, destination: String, mount: Mount, standard: bool) {
        let replaces_standard = self
            .mounts
            .iter()
            .any(|(d, _, std)| *std && *d == destination);
        self.mounts.retain(|(d, _, std)| {
            let same = *d == destination;
            let standard_child = replaces_standard && *std && is_under(d, &destination);
            !same && !standard_child
        });
        self.mounts.push((destination, mount, standard));
    }
}

fn bind(destination: &str, source: &str, readonly: bool) -> Mount {
    let rw = if readonly { "ro" } else { "rw" };
    mount(destination, "bind", source, &["rbind", "rprivate", rw])
}

fn guest_source(path: &str) -> Result<&str, Error> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(precondition(
            "mounts",
            format!("guest source {path:?} is not an absolute path"),
        ));
    }
    Ok(path)
}

fn guest_mount(destination: &str, m: &GuestMount) -> Result<Mount, Error> {
    match m.kind {
        GuestMountKind::Bind => Ok(bind(
            destination,
            guest_source(&m.guest_source)?,
            m.readonly,
        )),
        GuestMountKind::Tmpfs { size_bytes } => {
            let mut options = vec!["nosuid".to_string(), "nodev".to_string()];
            if let Some(size) = size_bytes {
                options.push(format!("size={size}"));
            }
            if m.readonly {
                options.push("ro".to_string());
            }
            let mut tmpfs = mount(destination, "tmpfs", "tmpfs", &[]);
            tmpfs.set_options(Some(options));
            Ok(tmpfs)
        }
    }
}

pub(super) fn build(
    input: &SpecInput,
    readonly_rootfs: bool,
    privileged: bool,
) -> Result<Vec<Mount>, Error> {
    let guest = input
        .mounts
        .iter()
        .map(|m| Ok((clean_destination(&m.container_path)?, m)))
        .collect::<Result<Vec<_>, Error>>()?;
    let targeted = |path: &str| guest.iter().any(|(d, _)| d == path);

    let mut list = MountList { mounts: Vec::new() };
    for m in standard(privileged) {
        let destination = m.destination().to_string_lossy().into_owned();
        list.push(destination, m, true);
    }
    let pod_files = [
        ("/etc/resolv.conf", input.resolv_conf),
        ("/etc/hostname", input.hostname_file),
    ];
    for (destination, source) in pod_files {
        if let (Some(source), false) = (source, targeted(destination)) {
            let m = bind(destination, guest_source(source)?, readonly_rootfs);
            list.push(destination.to_string(), m, false);
        }
    }
    for (destination, m) in &guest {
        let oci = guest_mount(destination, m)?;
        list.push(destination.clone(), oci, false);
    }
    Ok(list.mounts.into_iter().map(|(_, m, _)| m).collect())
}
