//! Capabilities, namespaces, privileged mode, masked and read-only paths.

use k8s_cri::v1 as cri;
use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities};

use super::{Error, invalid, precondition, unsupported};

const NAMESPACE_OPTIONS: &str = "linux.security_context.namespace_options";
const CAPABILITIES: &str = "linux.security_context.capabilities";

/// Every capability the OCI runtime spec names.
pub(super) const ALL_CAPABILITIES: [Capability; 41] = [
    Capability::AuditControl,
    Capability::AuditRead,
    Capability::AuditWrite,
    Capability::BlockSuspend,
    Capability::Bpf,
    Capability::CheckpointRestore,
    Capability::Chown,
    Capability::DacOverride,
    Capability::DacReadSearch,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::IpcLock,
    Capability::IpcOwner,
    Capability::Kill,
    Capability::Lease,
    Capability::LinuxImmutable,
    Capability::MacAdmin,
    Capability::MacOverride,
    Capability::Mknod,
    Capability::NetAdmin,
    Capability::NetBindService,
    Capability::NetBroadcast,
    Capability::NetRaw,
    Capability::Perfmon,
    Capability::Setgid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::Setuid,
    Capability::SysAdmin,
    Capability::SysBoot,
    Capability::SysChroot,
    Capability::SysModule,
    Capability::SysNice,
    Capability::SysPacct,
    Capability::SysPtrace,
    Capability::SysRawio,
    Capability::SysResource,
    Capability::SysTime,
    Capability::SysTtyConfig,
    Capability::Syslog,
    Capability::WakeAlarm,
];

/// containerd's (and Docker's) default set for unprivileged containers.
pub(super) const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// containerd's defaults when the CRI config gives no masked paths.
pub(super) const DEFAULT_MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// containerd's defaults when the CRI config gives no read-only paths.
pub(super) const DEFAULT_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// A capability name as kubelet and users spell it: `NET_ADMIN`,
/// `CAP_NET_ADMIN`, `net_admin`.
pub(super) fn parse_capability(field: &str, name: &str) -> Result<Capability, Error> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    ALL_CAPABILITIES
        .iter()
        .copied()
        .find(|c| c.to_string() == bare)
        .ok_or_else(|| invalid(field, format!("unknown capability {name:?}")))
}

fn is_all(name: &str) -> bool {
    name.trim().eq_ignore_ascii_case("ALL")
}

/// The process's capabilities, as containerd's `WithCapabilities`:
/// privileged gets every one; otherwise start from the default set, "ALL"
/// in add gives every one, then "ALL" in drop removes every one, then the
/// named adds, then the named drops. Bounding = effective = permitted;
/// ambient capabilities join every set (the kernel wants an ambient one
/// permitted and inheritable); inheritable holds only the ambient ones.
pub(super) fn capabilities(
    sc: &cri::LinuxContainerSecurityContext,
    privileged: bool,
) -> Result<LinuxCapabilities, Error> {
    let mut set: Capabilities = if privileged {
        ALL_CAPABILITIES.into_iter().collect()
    } else {
        DEFAULT_CAPABILITIES.into_iter().collect()
    };
    let mut ambient = Capabilities::new();
    if let Some(caps) = &sc.capabilities {
        let add = &caps.add_capabilities;
        let drop = &caps.drop_capabilities;
        // Parse everything first: an unknown name is an error even when
        // privileged makes the lists moot.
        let mut added = Vec::new();
        for (i, name) in add.iter().enumerate() {
            if !is_all(name) {
                added.push(parse_capability(
                    &format!("{CAPABILITIES}.add_capabilities[{i}]"),
                    name,
                )?);
            }
        }
        let mut dropped = Vec::new();
        for (i, name) in drop.iter().enumerate() {
            if !is_all(name) {
                dropped.push(parse_capability(
                    &format!("{CAPABILITIES}.drop_capabilities[{i}]"),
                    name,
                )?);
            }
        }
        for (i, name) in caps.add_ambient_capabilities.iter().enumerate() {
            let field = format!("{CAPABILITIES}.add_ambient_capabilities[{i}]");
            if is_all(name) {
                return Err(invalid(
                    field,
                    "ALL cannot be ambient: name each capability",
                ));
            }
            ambient.insert(parse_capability(&field, name)?);
        }
        if !privileged {
            if add.iter().any(|n| is_all(n)) {
                set = ALL_CAPABILITIES.into_iter().collect();
            }
            if drop.iter().any(|n| is_all(n)) {
                set.clear();
            }
            set.extend(added);
            for cap in &dropped {
                set.remove(cap);
            }
        }
    }
    set.extend(ambient.iter().copied());

    let mut out = LinuxCapabilities::default();
    out.set_bounding(Some(set.clone()));
    out.set_effective(Some(set.clone()));
    out.set_permitted(Some(set));
    out.set_inheritable(Some(ambient.clone()));
    out.set_ambient(Some(ambient));
    Ok(out)
}

fn namespace_mode(field: &str, value: i32) -> Result<cri::NamespaceMode, Error> {
    cri::NamespaceMode::try_from(value)
        .map_err(|_| invalid(field, format!("unknown namespace mode {value}")))
}

/// Refuses the namespace options a pod VM cannot give: the node's
/// namespaces are the host's, out of the VM's reach.
pub(super) fn check_namespaces(sc: &cri::LinuxContainerSecurityContext) -> Result<(), Error> {
    let Some(ns) = &sc.namespace_options else {
        return Ok(());
    };
    use cri::NamespaceMode::{Container, Node, Pod, Target};

    let field = format!("{NAMESPACE_OPTIONS}.network");
    match namespace_mode(&field, ns.network)? {
        Pod | Container => {}
        Node => {
            return Err(unsupported(
                field,
                "NODE is not supported: a pod is a VM with its own network",
            ));
        }
        Target => return Err(unsupported(field, "TARGET is not supported")),
    }

    let field = format!("{NAMESPACE_OPTIONS}.pid");
    match namespace_mode(&field, ns.pid)? {
        Pod | Container => {}
        Node => {
            return Err(unsupported(
                field,
                "NODE is not supported: a pod is a VM, the node's processes are out of reach",
            ));
        }
        Target => {
            return Err(unsupported(
                field,
                "TARGET is not supported: containers cannot join another container's PID namespace",
            ));
        }
    }

    let field = format!("{NAMESPACE_OPTIONS}.ipc");
    match namespace_mode(&field, ns.ipc)? {
        Pod | Container => {}
        Node => {
            return Err(unsupported(
                field,
                "NODE is not supported: a pod is a VM with its own IPC",
            ));
        }
        Target => return Err(unsupported(field, "TARGET is not supported")),
    }
    // userns_options: userns.rs.
    Ok(())
}

/// Whether the container is privileged; only a privileged pod may hold a
/// privileged container (containerd's rule).
pub(super) fn privileged(
    sc: &cri::LinuxContainerSecurityContext,
    sandbox: &cri::PodSandboxConfig,
) -> Result<bool, Error> {
    if !sc.privileged {
        return Ok(false);
    }
    let pod_privileged = sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .is_some_and(|s| s.privileged);
    if !pod_privileged {
        return Err(precondition(
            "linux.security_context.privileged",
            "a privileged container needs a privileged pod \
             (the sandbox's linux.security_context.privileged)",
        ));
    }
    Ok(true)
}

/// Masked and read-only paths: none when privileged, else the CRI's (which
/// kubelet always sends), else containerd's defaults.
#[allow(clippy::type_complexity)]
pub(super) fn masked_and_readonly_paths(
    sc: &cri::LinuxContainerSecurityContext,
    privileged: bool,
) -> Result<(Option<Vec<String>>, Option<Vec<String>>), Error> {
    if privileged {
        return Ok((None, None));
    }
    let pick = |field: &str, given: &[String], default: &[&str]| -> Result<Vec<String>, Error> {
        if given.is_empty() {
            return Ok(default.iter().map(|p| p.to_string()).collect());
        }
        for (i, path) in given.iter().enumerate() {
            if !path.starts_with('/') || path.contains('\0') {
                return Err(invalid(
                    format!("{field}[{i}]"),
                    format!("{path:?} is not an absolute path"),
                ));
            }
        }
        Ok(given.to_vec())
    };
    let masked = pick(
        "linux.security_context.masked_paths",
        &sc.masked_paths,
        &DEFAULT_MASKED_PATHS,
    )?;
    let readonly = pick(
        "linux.security_context.readonly_paths",
        &sc.readonly_paths,
        &DEFAULT_READONLY_PATHS,
    )?;
    Ok((Some(masked), Some(readonly)))
}

/// The device rule of a privileged container: every device, every access.
pub(super) fn all_devices_allowed() -> oci_spec::runtime::LinuxDeviceCgroup {
    let mut rule = oci_spec::runtime::LinuxDeviceCgroup::default();
    rule.set_allow(true);
    rule.set_typ(Some(oci_spec::runtime::LinuxDeviceType::A));
    rule.set_access(Some("rwm".into()));
    rule
}
