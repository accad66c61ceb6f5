//! CRI container config + image config -> OCI runtime spec for the agent.
//!
//! `build` follows containerd's CRI plugin (`container_create_linux.go`,
//! `pkg/oci/spec_opts.go`) wherever a pod being a VM changes nothing, and
//! departs from it where it does: no network, UTS or IPC namespace (the
//! guest is the pod), no host devices, no AppArmor or SELinux (the guest has
//! neither), no sysctls (pod sysctls go to the agent's SetupSandbox).
//!
//! Each rule lives in its own file: `user.rs` (/etc/passwd and /etc/group),
//! `security.rs` (capabilities, namespaces, privileged), `seccomp.rs`,
//! `mounts.rs`, `resources.rs` (cgroup limits) and `signal.rs` (StopSignal).

mod mounts;
mod resources;
mod seccomp;
mod security;
mod signal;
mod user;
pub mod userns;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;

use k8s_cri::v1 as cri;
use oci_spec::runtime::{Linux, LinuxNamespace, LinuxNamespaceType, Process, Root, Spec, VERSION};

use crate::image::records::ImageConfig;

pub use resources::resources;
pub use seccomp::runtime_default_seccomp;

/// PATH when neither the image nor the CRI config sets one (containerd's).
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed request (gRPC InvalidArgument).
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// A well-formed request a pod VM cannot honour (gRPC FailedPrecondition).
    #[error("{field}: {reason}")]
    Unsupported { field: String, reason: String },
    /// A well-formed request the image or the pod cannot satisfy (gRPC
    /// FailedPrecondition): an unknown user, a privileged container in an
    /// unprivileged pod.
    #[error("{field}: {reason}")]
    Precondition { field: String, reason: String },
    #[error("{field}: cannot read seccomp profile {path}")]
    SeccompRead {
        field: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{field}: {path} is not an OCI seccomp profile")]
    SeccompParse {
        field: &'static str,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("spec.process: the container's spec has no process")]
    NoProcess,
}

impl Error {
    /// True for malformed requests (-> gRPC InvalidArgument), false for
    /// valid requests that are unsupported or cannot be satisfied here
    /// (-> gRPC FailedPrecondition).
    pub fn is_invalid_argument(&self) -> bool {
        match self {
            Error::Invalid { .. } | Error::SeccompParse { .. } => true,
            Error::SeccompRead { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            Error::Unsupported { .. } | Error::Precondition { .. } | Error::NoProcess => false,
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn unsupported(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Unsupported {
        field: field.into(),
        reason: reason.into(),
    }
}

fn precondition(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Precondition {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A CRI mount the runtime already placed in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMount {
    pub container_path: String,
    pub guest_source: String,
    pub readonly: bool,
    pub kind: GuestMountKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMountKind {
    Bind,
    Tmpfs { size_bytes: Option<u64> },
}

pub struct SpecInput<'a> {
    pub container_id: &'a str,
    pub config: &'a cri::ContainerConfig,
    pub sandbox: &'a cri::PodSandboxConfig,
    pub image: &'a ImageConfig,
    /// The image's /etc/passwd and /etc/group, when it has them.
    pub passwd: Option<&'a str>,
    pub group: Option<&'a str>,
    /// Mounts resolved by the runtime (CRI `mounts` + /etc/hosts etc.), in order.
    pub mounts: &'a [GuestMount],
    /// Guest path of the pod's resolv.conf (bound at /etc/resolv.conf unless
    /// a CRI mount targets it), if any.
    pub resolv_conf: Option<&'a str>,
    /// Guest path of the pod's hostname file (bound at /etc/hostname), if any.
    pub hostname_file: Option<&'a str>,
}

pub struct BuiltSpec {
    pub spec: Spec,
    /// The signal StopContainer sends first: the image's StopSignal
    /// ("SIGQUIT", "QUIT", "3", "SIGRTMIN+3"), else SIGTERM (15).
    pub stop_signal: i32,
}

pub fn build(input: &SpecInput) -> Result<BuiltSpec, Error> {
    let config = input.config;
    let default_sc = cri::LinuxContainerSecurityContext::default();
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .unwrap_or(&default_sc);

    // What a pod VM cannot do at all comes first: nothing is worth
    // computing for a request that will be refused anyway.
    // Block devices become disks of the VM (runtime::devices); other
    // host devices cannot cross into it.
    if !config.cdi_devices.is_empty() {
        return Err(unsupported(
            "cdi_devices",
            "host devices cannot be passed into a pod VM",
        ));
    }
    security::check_namespaces(sc)?;
    let userns = userns::of_container(sc, input.sandbox)?;
    let privileged = security::privileged(sc, input.sandbox)?;

    let process = process(input, sc, privileged)?;
    let mounts = mounts::build(input, sc.readonly_rootfs, privileged)?;

    let mut linux = Linux::default();
    linux.set_net_devices(None);
    let mut namespaces = namespaces();
    match &userns {
        Some(mappings) => {
            let (ns, uids, gids) = userns::oci(mappings)?;
            namespaces.push(ns);
            linux.set_uid_mappings(Some(uids));
            linux.set_gid_mappings(Some(gids));
        }
        None => {
            linux.set_uid_mappings(None);
            linux.set_gid_mappings(None);
        }
    }
    linux.set_sysctl(None);
    let mut resources = config
        .linux
        .as_ref()
        .and_then(|l| l.resources.as_ref())
        .map(resources)
        .transpose()?;
    if privileged {
        // The agent denies every device but a default list and the
        // container's own; a privileged container may use all of the VM's.
        resources
            .get_or_insert_with(Default::default)
            .set_devices(Some(vec![security::all_devices_allowed()]));
    }
    linux.set_resources(resources);
    linux.set_cgroups_path(None);
    linux.set_namespaces(Some(namespaces));
    linux.set_devices(None);
    linux.set_seccomp(if privileged {
        None
    } else {
        seccomp::profile(sc)?
    });
    linux.set_rootfs_propagation(None);
    let (masked, readonly) = security::masked_and_readonly_paths(sc, privileged)?;
    linux.set_masked_paths(masked);
    linux.set_readonly_paths(readonly);
    linux.set_mount_label(None);
    linux.set_intel_rdt(None);
    linux.set_memory_policy(None);
    linux.set_personality(None);
    linux.set_time_offsets(None);

    let mut root = Root::default();
    root.set_path(PathBuf::from("rootfs"));
    root.set_readonly(Some(sc.readonly_rootfs));

    let annotations: HashMap<String, String> = config.annotations.clone();

    let mut spec = Spec::default();
    spec.set_version(VERSION.to_string());
    spec.set_root(Some(root));
    spec.set_mounts(Some(mounts));
    spec.set_process(Some(process));
    // The pod's hostname is the guest's: containers share its UTS namespace.
    spec.set_hostname(None);
    spec.set_domainname(None);
    spec.set_hooks(None);
    spec.set_annotations(if annotations.is_empty() {
        None
    } else {
        Some(annotations)
    });
    spec.set_linux(Some(linux));
    spec.set_solaris(None);
    spec.set_windows(None);
    spec.set_vm(None);
    spec.set_zos(None);

    Ok(BuiltSpec {
        spec,
        stop_signal: signal::stop_signal(input.image.config.stop_signal.as_deref()),
    })
}

/// The process for an exec (ExecSync / Exec) into the container whose spec
/// is `spec`: same env, cwd, user, capabilities, no_new_privileges,
/// apparmor etc. as the container's process, with `cmd` as args;
/// terminal = tty. Empty cmd -> Error (invalid argument).
pub fn exec_process(spec: &Spec, cmd: &[String], tty: bool) -> Result<Process, Error> {
    if cmd.is_empty() {
        return Err(invalid("cmd", "no command to run"));
    }
    for (i, arg) in cmd.iter().enumerate() {
        if arg.contains('\0') {
            return Err(invalid(format!("cmd[{i}]"), "contains a NUL byte"));
        }
    }
    let mut process = spec.process().clone().ok_or(Error::NoProcess)?;
    process.set_args(Some(cmd.to_vec()));
    process.set_terminal(Some(tty));
    process.set_console_size(None);
    if tty {
        let mut env = process.env().clone().unwrap_or_default();
        if !env.iter().any(|e| env_key(e) == "TERM") {
            env.push("TERM=xterm".to_string());
        }
        process.set_env(Some(env));
    }
    Ok(process)
}

/// Namespaces of every container: its own mount namespace, a PID
/// namespace (the agent puts the pod's shared one in its place when the
/// sandbox shares PIDs) and, as containerd gives on cgroup v2, a cgroup
/// namespace (its /sys/fs/cgroup is its own cgroup). No network, UTS, IPC:
/// the VM is the pod, so containers share the guest's.
fn namespaces() -> Vec<LinuxNamespace> {
    [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Cgroup,
    ]
    .into_iter()
    .map(|typ| {
        let mut ns = LinuxNamespace::default();
        ns.set_typ(typ);
        ns.set_path(None);
        ns
    })
    .collect()
}

fn process(
    input: &SpecInput,
    sc: &cri::LinuxContainerSecurityContext,
    privileged: bool,
) -> Result<Process, Error> {
    let config = input.config;
    let oom_score_adj = match config.linux.as_ref().and_then(|l| l.resources.as_ref()) {
        Some(r) => Some(resources::oom_score_adj(r.oom_score_adj)?),
        None => None,
    };

    let mut process = Process::default();
    process.set_terminal(Some(config.tty));
    process.set_console_size(None);
    process.set_user(user::resolve(sc, input.image, input.passwd, input.group)?);
    process.set_args(Some(command(config, input.image)?));
    process.set_command_line(None);
    process.set_env(Some(environment(config, input.image, input.sandbox)?));
    process.set_cwd(working_dir(config, input.image)?);
    process.set_capabilities(Some(security::capabilities(sc, privileged)?));
    process.set_rlimits(None);
    process.set_no_new_privileges(Some(sc.no_new_privs));
    // The guest has no AppArmor nor SELinux: the CRI's profiles are ignored.
    process.set_apparmor_profile(None);
    process.set_oom_score_adj(oom_score_adj);
    process.set_selinux_label(None);
    process.set_io_priority(None);
    process.set_scheduler(None);
    process.set_exec_cpu_affinity(None);
    Ok(process)
}

/// containerd's rule: a CRI `command` replaces the image's Entrypoint and
/// drops its Cmd; CRI `args` replace the image's Cmd.
fn command(config: &cri::ContainerConfig, image: &ImageConfig) -> Result<Vec<String>, Error> {
    check_strings("command", &config.command)?;
    check_strings("args", &config.args)?;
    let image_entrypoint = image.config.entrypoint.as_deref().unwrap_or_default();
    let image_cmd = image.config.cmd.as_deref().unwrap_or_default();

    let (entrypoint, cmd) = if !config.command.is_empty() {
        (config.command.as_slice(), config.args.as_slice())
    } else if !config.args.is_empty() {
        (image_entrypoint, config.args.as_slice())
    } else {
        (image_entrypoint, image_cmd)
    };
    let args: Vec<String> = entrypoint.iter().chain(cmd).cloned().collect();
    if args.is_empty() {
        return Err(invalid(
            "command",
            "no command specified: the config has no command or args and the image \
             no Entrypoint or Cmd",
        ));
    }
    if let Some(arg) = args.iter().find(|a| a.contains('\0')) {
        return Err(precondition(
            "image",
            format!("the image's Entrypoint or Cmd {arg:?} contains a NUL byte"),
        ));
    }
    Ok(args)
}

fn check_strings(field: &str, values: &[String]) -> Result<(), Error> {
    match values.iter().position(|v| v.contains('\0')) {
        Some(i) => Err(invalid(format!("{field}[{i}]"), "contains a NUL byte")),
        None => Ok(()),
    }
}

fn env_key(entry: &str) -> &str {
    entry.split_once('=').map_or(entry, |(key, _)| key)
}

/// Sets `entry` in `env`: replaces the entry with the same key in place,
/// or appends it.
fn set_env(env: &mut Vec<String>, entry: String) {
    let key = env_key(&entry);
    match env.iter().position(|e| env_key(e) == key) {
        Some(i) => env[i] = entry,
        None => env.push(entry),
    }
}

/// containerd's order: the default PATH, HOSTNAME, the image's Env, the
/// CRI envs; each later entry replaces an earlier one with its key in
/// place. TERM=xterm with a TTY unless something set TERM.
fn environment(
    config: &cri::ContainerConfig,
    image: &ImageConfig,
    sandbox: &cri::PodSandboxConfig,
) -> Result<Vec<String>, Error> {
    let mut env = vec![DEFAULT_PATH.to_string()];
    if !sandbox.hostname.is_empty() {
        if sandbox.hostname.contains('\0') {
            return Err(invalid("hostname", "contains a NUL byte"));
        }
        env.push(format!("HOSTNAME={}", sandbox.hostname));
    }
    for entry in image.config.env.as_deref().unwrap_or_default() {
        if entry.contains('\0') {
            return Err(precondition(
                "image",
                format!("the image's Env entry {entry:?} contains a NUL byte"),
            ));
        }
        // An entry without a name cannot be set; Docker refuses it too.
        if env_key(entry).is_empty() {
            continue;
        }
        set_env(&mut env, entry.clone());
    }
    for (i, kv) in config.envs.iter().enumerate() {
        if kv.key.is_empty() {
            return Err(invalid(format!("envs[{i}].key"), "is empty"));
        }
        if kv.key.contains('=') || kv.key.contains('\0') {
            return Err(invalid(
                format!("envs[{i}].key"),
                format!("{:?} contains '=' or a NUL byte", kv.key),
            ));
        }
        if kv.value.contains('\0') {
            return Err(invalid(format!("envs[{i}].value"), "contains a NUL byte"));
        }
        set_env(&mut env, format!("{}={}", kv.key, kv.value));
    }
    if config.tty && !env.iter().any(|e| env_key(e) == "TERM") {
        env.push("TERM=xterm".to_string());
    }
    Ok(env)
}

/// The CRI working_dir, else the image's WorkingDir, else "/".
fn working_dir(config: &cri::ContainerConfig, image: &ImageConfig) -> Result<PathBuf, Error> {
    if !config.working_dir.is_empty() {
        let dir = &config.working_dir;
        if !dir.starts_with('/') || dir.contains('\0') {
            return Err(invalid(
                "working_dir",
                format!("{dir:?} is not an absolute path"),
            ));
        }
        return Ok(PathBuf::from(dir));
    }
    match image.config.working_dir.as_deref() {
        None | Some("") => Ok(PathBuf::from("/")),
        Some(dir) if dir.starts_with('/') && !dir.contains('\0') => Ok(PathBuf::from(dir)),
        Some(dir) => Err(precondition(
            "image",
            format!("the image's WorkingDir {dir:?} is not an absolute path"),
        )),
    }
}
