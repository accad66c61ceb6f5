//! Seccomp: the RuntimeDefault profile and the choice of profile from the
//! CRI security context.

use std::fs::File;
use std::io::Read;

use k8s_cri::v1 as cri;
use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSyscall};

use super::{Error, invalid};

/// Largest Localhost profile read, in bytes.
pub(super) const MAX_PROFILE: u64 = 1 << 20;

const SECCOMP: &str = "linux.security_context.seccomp";
const LOCALHOST_REF: &str = "linux.security_context.seccomp.localhost_ref";
const PROFILE_PATH: &str = "linux.security_context.seccomp_profile_path";

/// EPERM, what a blocked syscall returns.
const EPERM: u32 = 1;

/// The syscalls the RuntimeDefault profile refuses.
///
/// Why a deny-list, where Docker ships an allow-list: the kernel these
/// containers talk to is the pod's own guest kernel, and the VM is the
/// security boundary between the pod and the node. What is left to guard
/// is the pod's kernel-wide state, shared by all its containers: modules,
/// clocks, keyrings, reboot, swap, accounting, other processes' memory.
/// This list is what Docker's default profile refuses to a container
/// without extra capabilities; `mount`, `umount2`, `unshare`, `setns` and
/// the new mount API among them, as Docker does without CAP_SYS_ADMIN.
/// `personality` is left allowed (Docker only filters its arguments).
///
/// Some names exist only on 32-bit x86 (`vm86`, `vm86old`, `stime`): the
/// agent skips names that do not exist for an architecture, as runc does
/// with libseccomp.
pub(super) const RUNTIME_DEFAULT_DENIED: [&str; 57] = [
    "_sysctl",
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "clock_settime64",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// The default seccomp profile for `RuntimeDefault` (and the deprecated
/// "runtime/default", "docker/default" profile path spellings): allow
/// everything but `RUNTIME_DEFAULT_DENIED`, which fails with EPERM.
pub fn runtime_default_seccomp() -> LinuxSeccomp {
    let mut denied = LinuxSyscall::default();
    denied.set_names(
        RUNTIME_DEFAULT_DENIED
            .iter()
            .map(|s| s.to_string())
            .collect(),
    );
    denied.set_action(LinuxSeccompAction::ScmpActErrno);
    denied.set_errno_ret(Some(EPERM));
    denied.set_args(None);

    let mut seccomp = LinuxSeccomp::default();
    seccomp.set_default_action(LinuxSeccompAction::ScmpActAllow);
    seccomp.set_default_errno_ret(None);
    seccomp.set_architectures(Some(vec![
        Arch::ScmpArchX86_64,
        Arch::ScmpArchX86,
        Arch::ScmpArchX32,
    ]));
    seccomp.set_flags(None);
    seccomp.set_listener_path(None);
    seccomp.set_listener_metadata(None);
    seccomp.set_syscalls(Some(vec![denied]));
    seccomp
}

/// The container's seccomp profile, None for unconfined: the `seccomp`
/// field, else the deprecated `seccomp_profile_path`, else unconfined (the
/// CRI default; kubelet asks for RuntimeDefault explicitly).
pub(super) fn profile(
    sc: &cri::LinuxContainerSecurityContext,
) -> Result<Option<LinuxSeccomp>, Error> {
    use cri::security_profile::ProfileType;

    if let Some(p) = &sc.seccomp {
        return match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Ok(Some(runtime_default_seccomp())),
            Ok(ProfileType::Unconfined) => Ok(None),
            Ok(ProfileType::Localhost) => load(LOCALHOST_REF, &p.localhost_ref).map(Some),
            Err(_) => Err(invalid(
                format!("{SECCOMP}.profile_type"),
                format!("unknown profile type {}", p.profile_type),
            )),
        };
    }
    #[allow(deprecated)]
    let path = sc.seccomp_profile_path.as_str();
    match path {
        "" | "unconfined" => Ok(None),
        "runtime/default" | "docker/default" => Ok(Some(runtime_default_seccomp())),
        _ => match path.strip_prefix("localhost/") {
            Some(file) => load(PROFILE_PATH, file).map(Some),
            None => Err(invalid(
                PROFILE_PATH,
                format!(
                    "unknown profile {path:?}: expected runtime/default, unconfined or localhost/<path>"
                ),
            )),
        },
    }
}

/// Reads a Localhost profile: a JSON file on this host, in the OCI format
/// (Docker's profiles parse too; their `archMap`, `includes` and
/// `excludes` are ignored).
fn load(field: &'static str, path: &str) -> Result<LinuxSeccomp, Error> {
    if path.is_empty() {
        return Err(invalid(field, "no profile path given"));
    }
    if !path.starts_with('/') || path.contains('\0') {
        return Err(invalid(field, format!("{path:?} is not an absolute path")));
    }
    let read_error = |source| Error::SeccompRead {
        field,
        path: path.to_string(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut data = Vec::new();
    file.take(MAX_PROFILE.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(read_error)?;
    if u64::try_from(data.len()).map_or(true, |n| n > MAX_PROFILE) {
        return Err(invalid(
            field,
            format!("{path}: larger than {MAX_PROFILE} bytes"),
        ));
    }
    serde_json::from_slice(&data).map_err(|source| Error::SeccompParse {
        field,
        path: path.to_string(),
        source,
    })
}
