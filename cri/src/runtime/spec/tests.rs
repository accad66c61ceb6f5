//! Unit tests of the spec builder: realistic CRI configs (as kubelet and
//! critest send them) against the spec they must give.
//!
//! This file holds the shared fixtures and the tests of the spec as a
//! whole (command, env, cwd, the spec's fixed parts, exec); `tests/` holds
//! users, security (capabilities, seccomp, namespaces) and mounts plus
//! resources.

mod limits;
mod security;
mod user;

use k8s_cri::v1 as cri;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
use serde_json::json;

use super::*;

/// A CreateContainer request as kubelet builds it, with what each test
/// changes.
pub(super) struct Case {
    pub config: cri::ContainerConfig,
    pub sandbox: cri::PodSandboxConfig,
    pub image: ImageConfig,
    pub passwd: Option<String>,
    pub group: Option<String>,
    pub mounts: Vec<GuestMount>,
    pub resolv_conf: Option<String>,
    pub hostname_file: Option<String>,
}

pub(super) fn image(json: serde_json::Value) -> ImageConfig {
    serde_json::from_value(json).expect("test image config")
}

impl Case {
    pub fn new() -> Case {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "app".to_string(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: "docker.io/library/nginx:1.27".to_string(),
                ..Default::default()
            }),
            log_path: "app/0.log".to_string(),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_quota: 50_000,
                    cpu_shares: 512,
                    memory_limit_in_bytes: 256 << 20,
                    oom_score_adj: 936,
                    ..Default::default()
                }),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        target_id: String::new(),
                        userns_options: Some(cri::UserNamespace {
                            mode: cri::NamespaceMode::Node as i32,
                            ..Default::default()
                        }),
                    }),
                    seccomp: Some(cri::SecurityProfile {
                        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                        localhost_ref: String::new(),
                    }),
                    masked_paths: vec!["/proc/kcore".to_string(), "/sys/firmware".to_string()],
                    readonly_paths: vec!["/proc/sys".to_string()],
                    ..Default::default()
                }),
            }),
            annotations: [(
                "io.kubernetes.container.hash".to_string(),
                "1a2b".to_string(),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let sandbox = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web-0".to_string(),
                uid: "0b3f".to_string(),
                namespace: "default".to_string(),
                attempt: 0,
            }),
            hostname: "web-0".to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext::default()),
                ..Default::default()
            }),
            ..Default::default()
        };
        Case {
            config,
            sandbox,
            image: image(json!({
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                            "NGINX_VERSION=1.27.0"],
                    "Entrypoint": ["/docker-entrypoint.sh"],
                    "Cmd": ["nginx", "-g", "daemon off;"],
                    "StopSignal": "SIGQUIT"
                }
            })),
            passwd: Some(
                "root:x:0:0:root:/root:/bin/sh\nnginx:x:101:101:nginx:/nonexistent:/bin/false\n"
                    .to_string(),
            ),
            group: Some("root:x:0:\nnginx:x:101:\n".to_string()),
            mounts: Vec::new(),
            resolv_conf: Some("/run/frakti/sandbox/resolv.conf".to_string()),
            hostname_file: Some("/run/frakti/sandbox/hostname".to_string()),
        }
    }

    pub fn build(&self) -> Result<BuiltSpec, Error> {
        build(&SpecInput {
            container_id: "c0ffee",
            config: &self.config,
            sandbox: &self.sandbox,
            image: &self.image,
            passwd: self.passwd.as_deref(),
            group: self.group.as_deref(),
            mounts: &self.mounts,
            resolv_conf: self.resolv_conf.as_deref(),
            hostname_file: self.hostname_file.as_deref(),
        })
    }

    pub fn spec(&self) -> Spec {
        self.build().expect("spec builds").spec
    }

    /// The error `build` gives, which must name `field`.
    pub fn error(&self, field: &str) -> Error {
        let Err(err) = self.build() else {
            panic!("the spec built, expected an error naming {field}");
        };
        let message = err.to_string();
        assert!(message.contains(field), "{message:?} does not name {field}");
        err
    }

    pub fn sc(&mut self) -> &mut cri::LinuxContainerSecurityContext {
        self.config
            .linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default)
    }

    pub fn res(&mut self) -> &mut cri::LinuxContainerResources {
        self.config
            .linux
            .get_or_insert_with(Default::default)
            .resources
            .get_or_insert_with(Default::default)
    }

    pub fn env(&mut self, key: &str, value: &str) {
        self.config.envs.push(cri::KeyValue {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
}

pub(super) fn process(spec: &Spec) -> &Process {
    spec.process().as_ref().expect("process")
}

pub(super) fn args(spec: &Spec) -> Vec<String> {
    process(spec).args().clone().unwrap_or_default()
}

pub(super) fn env(spec: &Spec) -> Vec<String> {
    process(spec).env().clone().unwrap_or_default()
}

pub(super) fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

// --- Command ---------------------------------------------------------------

#[test]
fn command_table() {
    // (CRI command, CRI args, image Entrypoint, image Cmd) -> process args.
    type Row = (&'static [&'static str], &'static [&'static str]);
    let table: [(Row, Row, &[&str]); 7] = [
        // Neither CRI field: the image's Entrypoint + Cmd.
        (
            (&[], &[]),
            (&["/ep.sh"], &["nginx", "-g"]),
            &["/ep.sh", "nginx", "-g"],
        ),
        // CRI args replace the image's Cmd only.
        ((&[], &["-v"]), (&["/ep.sh"], &["nginx"]), &["/ep.sh", "-v"]),
        // CRI command replaces the Entrypoint and drops the image's Cmd.
        (
            (&["sh", "-c"], &[]),
            (&["/ep.sh"], &["nginx"]),
            &["sh", "-c"],
        ),
        // CRI command + args: exactly those.
        (
            (&["sh"], &["-c", "id"]),
            (&["/ep.sh"], &["nginx"]),
            &["sh", "-c", "id"],
        ),
        // Image Cmd alone (busybox).
        ((&[], &[]), (&[], &["sh"]), &["sh"]),
        // Image Entrypoint alone.
        ((&[], &[]), (&["/pause"], &[]), &["/pause"]),
        // CRI args with an image without Entrypoint.
        ((&[], &["top"]), (&[], &["sh"]), &["top"]),
    ];
    for ((command, cri_args), (entrypoint, cmd), want) in table {
        let mut case = Case::new();
        case.config.command = strings(command);
        case.config.args = strings(cri_args);
        case.image.config.entrypoint = Some(strings(entrypoint));
        case.image.config.cmd = Some(strings(cmd));
        assert_eq!(
            args(&case.spec()),
            strings(want),
            "{command:?} {cri_args:?}"
        );
    }
}

#[test]
fn no_command_at_all_is_invalid() {
    let mut case = Case::new();
    case.image.config.entrypoint = None;
    case.image.config.cmd = Some(Vec::new());
    let err = case.error("command");
    assert!(err.is_invalid_argument());
    assert!(err.to_string().contains("no command specified"));
}

#[test]
fn nul_in_args_is_invalid() {
    let mut case = Case::new();
    case.config.args = strings(&["ok", "bad\0arg"]);
    assert!(case.error("args[1]").is_invalid_argument());
}

// --- Env -------------------------------------------------------------------

#[test]
fn env_image_then_cri_overrides_in_place() {
    let mut case = Case::new();
    case.image.config.env = Some(strings(&["PATH=/opt/bin:/bin", "FOO=image", "BAR=2"]));
    case.env("FOO", "cri");
    case.env("NEW", "4");
    case.env("EMPTY", "");
    assert_eq!(
        env(&case.spec()),
        strings(&[
            "PATH=/opt/bin:/bin",
            "HOSTNAME=web-0",
            "FOO=cri",
            "BAR=2",
            "NEW=4",
            "EMPTY=",
        ])
    );
}

#[test]
fn env_defaults() {
    let mut case = Case::new();
    case.image.config.env = None;
    assert_eq!(
        env(&case.spec()),
        strings(&[
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME=web-0",
        ])
    );

    // A TTY gets TERM=xterm unless something set TERM.
    case.config.tty = true;
    assert!(env(&case.spec()).contains(&"TERM=xterm".to_string()));
    case.env("TERM", "vt100");
    let with_term = env(&case.spec());
    assert!(with_term.contains(&"TERM=vt100".to_string()));
    assert!(!with_term.contains(&"TERM=xterm".to_string()));

    // The CRI may set HOSTNAME itself; the image may too.
    case.env("HOSTNAME", "custom");
    assert!(env(&case.spec()).contains(&"HOSTNAME=custom".to_string()));
    assert!(!env(&case.spec()).contains(&"HOSTNAME=web-0".to_string()));

    // No pod hostname: no HOSTNAME entry.
    let mut case = Case::new();
    case.sandbox.hostname.clear();
    assert!(!env(&case.spec()).iter().any(|e| e.starts_with("HOSTNAME=")));
}

#[test]
fn env_odd_image_entries() {
    let mut case = Case::new();
    // No '=': kept as is (a name without value); no name: dropped.
    case.image.config.env = Some(strings(&["LONELY", "=nameless", "A=b=c"]));
    let env = env(&case.spec());
    assert!(env.contains(&"LONELY".to_string()));
    assert!(env.contains(&"A=b=c".to_string()));
    assert!(!env.iter().any(|e| e.starts_with('=')));
}

#[test]
fn env_bad_cri_keys_are_invalid() {
    let mut case = Case::new();
    case.env("", "x");
    assert!(case.error("envs[0].key").is_invalid_argument());

    let mut case = Case::new();
    case.env("OK", "1");
    case.env("A=B", "x");
    assert!(case.error("envs[1].key").is_invalid_argument());

    let mut case = Case::new();
    case.env("K", "nul\0");
    assert!(case.error("envs[0].value").is_invalid_argument());
}

// --- Working directory -----------------------------------------------------

#[test]
fn working_dir_precedence() {
    let mut case = Case::new();
    assert_eq!(process(&case.spec()).cwd().to_str(), Some("/"));
    case.image.config.working_dir = Some("/usr/share/nginx".to_string());
    assert_eq!(
        process(&case.spec()).cwd().to_str(),
        Some("/usr/share/nginx")
    );
    case.config.working_dir = "/srv".to_string();
    assert_eq!(process(&case.spec()).cwd().to_str(), Some("/srv"));
}

#[test]
fn relative_working_dir_is_invalid() {
    let mut case = Case::new();
    case.config.working_dir = "srv/app".to_string();
    let err = case.error("working_dir");
    assert!(err.is_invalid_argument());
    assert!(err.to_string().contains("srv/app"));

    // A relative image WorkingDir is the image's fault, not the request's.
    let mut case = Case::new();
    case.image.config.working_dir = Some("app".to_string());
    let err = case.error("WorkingDir");
    assert!(!err.is_invalid_argument());
}

// --- The spec's fixed parts ------------------------------------------------

#[test]
fn spec_shape() {
    let case = Case::new();
    let built = case.build().expect("builds");
    let spec = &built.spec;
    assert_eq!(built.stop_signal, 3, "the image's SIGQUIT");
    assert_eq!(spec.version(), "1.1.0");
    assert_eq!(spec.hostname(), &None, "the guest's hostname is shared");
    let root = spec.root().as_ref().expect("root");
    assert_eq!(root.path().to_str(), Some("rootfs"));
    assert_eq!(root.readonly(), Some(false));

    let p = process(spec);
    assert_eq!(p.terminal(), Some(false));
    assert_eq!(p.rlimits(), &None);
    assert_eq!(p.no_new_privileges(), Some(false));
    assert_eq!(p.oom_score_adj(), Some(936));
    assert_eq!(p.apparmor_profile(), &None);
    assert_eq!(p.selinux_label(), &None);

    let annotations = spec.annotations().as_ref().expect("annotations");
    assert_eq!(
        annotations
            .get("io.kubernetes.container.hash")
            .map(String::as_str),
        Some("1a2b")
    );

    let linux = spec.linux().as_ref().expect("linux");
    assert_eq!(linux.sysctl(), &None);
    assert_eq!(linux.devices(), &None);
    assert_eq!(
        linux.resources().as_ref().and_then(|r| r.devices().clone()),
        None,
        "the agent's default device rules"
    );
    assert_eq!(linux.uid_mappings(), &None);
    let namespaces: Vec<LinuxNamespaceType> = linux
        .namespaces()
        .iter()
        .flatten()
        .map(|n| n.typ())
        .collect();
    assert_eq!(
        namespaces,
        [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Cgroup
        ]
    );
    assert!(
        linux
            .namespaces()
            .iter()
            .flatten()
            .all(|n| n.path().is_none())
    );

    // It must travel as JSON and come back the same.
    let json = serde_json::to_string(spec).expect("serializes");
    let back: Spec = serde_json::from_str(&json).expect("parses");
    assert_eq!(&back, spec);
}

#[test]
fn no_new_privs_readonly_rootfs_tty() {
    let mut case = Case::new();
    case.sc().no_new_privs = true;
    case.sc().readonly_rootfs = true;
    case.config.tty = true;
    let spec = case.spec();
    assert_eq!(process(&spec).no_new_privileges(), Some(true));
    assert_eq!(process(&spec).terminal(), Some(true));
    assert_eq!(spec.root().as_ref().and_then(|r| r.readonly()), Some(true));
}

#[test]
fn minimal_config_builds() {
    // critest's smallest container: no linux section at all.
    let mut case = Case::new();
    case.config.linux = None;
    case.config.annotations.clear();
    case.sandbox = cri::PodSandboxConfig::default();
    case.passwd = None;
    case.group = None;
    let spec = case.spec();
    assert_eq!(spec.annotations(), &None);
    let linux = spec.linux().as_ref().expect("linux");
    assert_eq!(linux.resources(), &None);
    assert_eq!(linux.seccomp(), &None, "unconfined is the CRI default");
    assert_eq!(process(&spec).oom_score_adj(), None);
    let user = process(&spec).user();
    assert_eq!((user.uid(), user.gid()), (0, 0));
}

#[test]
fn cdi_devices_are_unsupported() {
    let mut case = Case::new();
    case.config.cdi_devices.push(cri::CdiDevice {
        name: "nvidia.com/gpu=0".to_string(),
    });
    assert!(!case.error("cdi_devices").is_invalid_argument());
}

#[test]
fn apparmor_and_selinux_are_ignored() {
    let mut case = Case::new();
    case.sc().apparmor = Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::Localhost as i32,
        localhost_ref: "k8s-nginx".to_string(),
    });
    case.sc().selinux_options = Some(cri::SeLinuxOption {
        level: "s0:c1,c2".to_string(),
        ..Default::default()
    });
    let spec = case.spec();
    assert_eq!(process(&spec).apparmor_profile(), &None);
}

// --- Exec ------------------------------------------------------------------

#[test]
fn exec_process_inherits_the_container() {
    let mut case = Case::new();
    case.sc().run_as_user = Some(cri::Int64Value { value: 101 });
    case.sc().no_new_privs = true;
    case.config.working_dir = "/srv".to_string();
    let spec = case.spec();
    let container = process(&spec);

    let exec = exec_process(&spec, &strings(&["cat", "/etc/os-release"]), false).expect("exec");
    assert_eq!(exec.args(), &Some(strings(&["cat", "/etc/os-release"])));
    assert_eq!(exec.terminal(), Some(false));
    assert_eq!(exec.env(), container.env());
    assert_eq!(exec.cwd(), container.cwd());
    assert_eq!(exec.user(), container.user());
    assert_eq!(exec.capabilities(), container.capabilities());
    assert_eq!(exec.no_new_privileges(), Some(true));

    let tty = exec_process(&spec, &strings(&["sh"]), true).expect("exec");
    assert_eq!(tty.terminal(), Some(true));
    let env = tty.env().clone().unwrap_or_default();
    assert_eq!(env.iter().filter(|e| e.starts_with("TERM=")).count(), 1);
}

#[test]
fn exec_process_errors() {
    let spec = Case::new().spec();
    let err = exec_process(&spec, &[], false).expect_err("empty cmd");
    assert!(err.is_invalid_argument());
    assert!(err.to_string().contains("cmd"));

    let err = exec_process(&spec, &strings(&["a\0b"]), false).expect_err("NUL");
    assert!(err.is_invalid_argument());
    assert!(err.to_string().contains("cmd[0]"));

    let mut bare = spec.clone();
    bare.set_process(None);
    let err = exec_process(&bare, &strings(&["sh"]), false).expect_err("no process");
    assert!(!err.is_invalid_argument());
    assert!(err.to_string().contains("spec.process"));
}
