//! Capabilities, privileged mode, masked paths, seccomp, namespaces.

use std::collections::BTreeSet;
use std::io::Write;

use k8s_cri::v1 as cri;
use oci_spec::runtime::{Capability, LinuxSeccompAction, Spec};

use super::{Case, process};
use crate::runtime::spec::runtime_default_seccomp;
use crate::runtime::spec::security::{ALL_CAPABILITIES, DEFAULT_CAPABILITIES, parse_capability};

fn caps(spec: &Spec) -> BTreeSet<String> {
    let c = process(spec).capabilities().as_ref().expect("capabilities");
    let set: BTreeSet<String> = c
        .bounding()
        .iter()
        .flatten()
        .map(|c| c.to_string())
        .collect();
    for other in [c.effective(), c.permitted()] {
        let other: BTreeSet<String> = other.iter().flatten().map(|c| c.to_string()).collect();
        assert_eq!(other, set, "bounding = effective = permitted");
    }
    set
}

fn names(caps: &[Capability]) -> BTreeSet<String> {
    caps.iter().map(|c| c.to_string()).collect()
}

fn with_caps(add: &[&str], drop: &[&str]) -> Case {
    let mut case = Case::new();
    case.sc().capabilities = Some(cri::Capability {
        add_capabilities: super::strings(add),
        drop_capabilities: super::strings(drop),
        add_ambient_capabilities: Vec::new(),
    });
    case
}

fn privileged_pod(case: &mut Case) {
    case.sandbox
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .privileged = true;
}

// --- Capabilities ----------------------------------------------------------

#[test]
fn default_capabilities() {
    let spec = Case::new().spec();
    let want = names(&DEFAULT_CAPABILITIES);
    assert_eq!(want.len(), 14);
    assert!(want.contains("NET_RAW") && want.contains("AUDIT_WRITE"));
    assert_eq!(caps(&spec), want);
    let c = process(&spec).capabilities().clone().expect("capabilities");
    assert_eq!(c.inheritable().as_ref().map(|s| s.len()), Some(0));
    assert_eq!(c.ambient().as_ref().map(|s| s.len()), Some(0));

    let json = serde_json::to_value(&c).expect("json");
    assert!(
        json["bounding"]
            .as_array()
            .expect("array")
            .contains(&"CAP_CHOWN".into())
    );
}

#[test]
fn add_and_drop() {
    let spec = with_caps(
        &["NET_ADMIN", "cap_sys_ptrace", "Sys_Time"],
        &["CHOWN", "CAP_MKNOD"],
    )
    .spec();
    let got = caps(&spec);
    for want in ["NET_ADMIN", "SYS_PTRACE", "SYS_TIME", "KILL"] {
        assert!(got.contains(want), "{want}");
    }
    assert!(!got.contains("CHOWN") && !got.contains("MKNOD"));
    assert_eq!(got.len(), 14 + 3 - 2);
}

#[test]
fn all_in_add_and_drop() {
    // ALL in add: every capability, then the named drops.
    assert_eq!(caps(&with_caps(&["ALL"], &[]).spec()).len(), 41);
    let got = caps(&with_caps(&["all"], &["CHOWN"]).spec());
    assert_eq!(got.len(), 40);
    assert!(!got.contains("CHOWN"));
    // ALL in drop: nothing but the named adds (kubelet's hardened pods).
    let got = caps(&with_caps(&["NET_BIND_SERVICE"], &["ALL"]).spec());
    assert_eq!(got, names(&[Capability::NetBindService]));
    // Both: drop ALL wins over add ALL, as in containerd.
    assert!(caps(&with_caps(&["ALL"], &["ALL"]).spec()).is_empty());
}

#[test]
fn unknown_capability_is_invalid() {
    let err = with_caps(&["NET_ADMIN", "CAP_FLY"], &[]).error("add_capabilities[1]");
    assert!(err.is_invalid_argument());
    assert!(err.to_string().contains("CAP_FLY"));
    let err = with_caps(&[], &["WIZARDRY"]).error("drop_capabilities[0]");
    assert!(err.is_invalid_argument());
}

#[test]
fn every_capability_name_parses() {
    for cap in ALL_CAPABILITIES {
        let name = cap.to_string();
        assert_eq!(parse_capability("f", &name).ok(), Some(cap));
        assert_eq!(
            parse_capability("f", &format!("CAP_{name}")).ok(),
            Some(cap)
        );
        assert_eq!(parse_capability("f", &name.to_lowercase()).ok(), Some(cap));
    }
    assert_eq!(names(&ALL_CAPABILITIES).len(), 41, "no duplicates");
}

#[test]
fn ambient_capabilities() {
    let mut case = with_caps(&[], &["ALL"]);
    if let Some(c) = case.sc().capabilities.as_mut() {
        c.add_ambient_capabilities = super::strings(&["NET_BIND_SERVICE"]);
    }
    let spec = case.spec();
    assert_eq!(caps(&spec), names(&[Capability::NetBindService]));
    let c = process(&spec).capabilities().clone().expect("capabilities");
    let want = Some([Capability::NetBindService].into_iter().collect());
    assert_eq!(c.ambient(), &want);
    assert_eq!(c.inheritable(), &want);

    if let Some(c) = case.sc().capabilities.as_mut() {
        c.add_ambient_capabilities = super::strings(&["ALL"]);
    }
    assert!(
        case.error("add_ambient_capabilities[0]")
            .is_invalid_argument()
    );
}

// --- Privileged ------------------------------------------------------------

#[test]
fn privileged_container() {
    let mut case = Case::new();
    privileged_pod(&mut case);
    case.sc().privileged = true;
    let spec = case.spec();
    assert_eq!(caps(&spec).len(), 41);
    let linux = spec.linux().as_ref().expect("linux");
    assert_eq!(
        linux.seccomp(),
        &None,
        "RuntimeDefault does not apply to privileged"
    );
    assert_eq!(linux.masked_paths(), &None);
    assert_eq!(linux.readonly_paths(), &None);
    let device_rules = linux
        .resources()
        .as_ref()
        .and_then(|r| r.devices().clone())
        .expect("device rules");
    assert_eq!(
        serde_json::to_value(&device_rules).expect("json"),
        serde_json::json!([{"allow": true, "type": "a", "access": "rwm"}]),
        "every device of the VM"
    );
    for dir in ["/sys", "/sys/fs/cgroup"] {
        let m = spec
            .mounts()
            .iter()
            .flatten()
            .find(|m| m.destination().to_str() == Some(dir))
            .expect("mounted");
        assert!(
            !m.options().iter().flatten().any(|o| o == "ro"),
            "{dir} writable"
        );
    }
}

#[test]
fn unprivileged_container() {
    let spec = Case::new().spec();
    let linux = spec.linux().as_ref().expect("linux");
    assert!(linux.seccomp().is_some());
    // The CRI's lists when given (kubelet always sends them).
    assert_eq!(
        linux.masked_paths(),
        &Some(super::strings(&["/proc/kcore", "/sys/firmware"]))
    );
    assert_eq!(
        linux.readonly_paths(),
        &Some(super::strings(&["/proc/sys"]))
    );
    let sys = spec
        .mounts()
        .iter()
        .flatten()
        .find(|m| m.destination().to_str() == Some("/sys"))
        .expect("sysfs");
    assert!(sys.options().iter().flatten().any(|o| o == "ro"));

    // containerd's defaults otherwise.
    let mut case = Case::new();
    case.sc().masked_paths.clear();
    case.sc().readonly_paths.clear();
    let spec = case.spec();
    let linux = spec.linux().as_ref().expect("linux");
    let masked = linux.masked_paths().clone().unwrap_or_default();
    assert_eq!(masked.len(), 11);
    assert!(masked.contains(&"/sys/devices/virtual/powercap".to_string()));
    let readonly = linux.readonly_paths().clone().unwrap_or_default();
    assert_eq!(readonly.len(), 5);
    assert!(readonly.contains(&"/proc/sysrq-trigger".to_string()));

    let mut case = Case::new();
    case.sc().masked_paths = super::strings(&["proc/kcore"]);
    assert!(case.error("masked_paths[0]").is_invalid_argument());
}

#[test]
fn privileged_container_needs_privileged_pod() {
    let mut case = Case::new();
    case.sc().privileged = true;
    let err = case.error("linux.security_context.privileged");
    assert!(!err.is_invalid_argument());
}

// --- Seccomp ---------------------------------------------------------------

fn seccomp(kind: cri::security_profile::ProfileType, localhost_ref: &str) -> Case {
    let mut case = Case::new();
    case.sc().seccomp = Some(cri::SecurityProfile {
        profile_type: kind as i32,
        localhost_ref: localhost_ref.to_string(),
    });
    case
}

fn denied(spec: &Spec) -> BTreeSet<String> {
    let profile = spec
        .linux()
        .as_ref()
        .and_then(|l| l.seccomp().clone())
        .expect("seccomp");
    profile
        .syscalls()
        .iter()
        .flatten()
        .filter(|s| s.action() == LinuxSeccompAction::ScmpActErrno)
        .flat_map(|s| s.names().clone())
        .collect()
}

#[test]
fn runtime_default_profile() {
    let profile = runtime_default_seccomp();
    assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActAllow);
    let arches = serde_json::to_value(profile.architectures()).expect("json");
    assert_eq!(
        arches,
        serde_json::json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
    );
    for s in profile.syscalls().iter().flatten() {
        assert_eq!(s.errno_ret(), Some(1), "EPERM");
    }

    use cri::security_profile::ProfileType;
    let spec = seccomp(ProfileType::RuntimeDefault, "").spec();
    let denied = denied(&spec);
    for name in [
        "mount",
        "umount2",
        "unshare",
        "setns",
        "ptrace",
        "bpf",
        "kexec_load",
        "open_tree",
    ] {
        assert!(denied.contains(name), "{name}");
    }
    for name in ["read", "clone", "personality", "execve"] {
        assert!(!denied.contains(name), "{name}");
    }
}

#[test]
fn unconfined_and_deprecated_paths() {
    use cri::security_profile::ProfileType;
    let spec = seccomp(ProfileType::Unconfined, "").spec();
    assert_eq!(
        spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
        None
    );

    for (path, confined) in [
        ("", false),
        ("unconfined", false),
        ("runtime/default", true),
        ("docker/default", true),
    ] {
        let mut case = Case::new();
        case.sc().seccomp = None;
        #[allow(deprecated)]
        {
            case.sc().seccomp_profile_path = path.to_string();
        }
        let spec = case.spec();
        let got = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        assert_eq!(got.is_some(), confined, "{path:?}");
    }

    let mut case = Case::new();
    case.sc().seccomp = None;
    #[allow(deprecated)]
    {
        case.sc().seccomp_profile_path = "apparmor/whatever".to_string();
    }
    assert!(case.error("seccomp_profile_path").is_invalid_argument());

    let mut case = Case::new();
    case.sc().seccomp = Some(cri::SecurityProfile {
        profile_type: 9,
        localhost_ref: String::new(),
    });
    assert!(case.error("seccomp.profile_type").is_invalid_argument());
}

const LOCAL_PROFILE: &str = r#"{
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 1,
    "architectures": ["SCMP_ARCH_X86_64"],
    "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]}],
    "syscalls": [
        {"names": ["read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW",
         "args": [], "comment": "", "includes": {}, "excludes": {}},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]}
    ]
}"#;

#[test]
fn localhost_profile() {
    use cri::security_profile::ProfileType;
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(LOCAL_PROFILE.as_bytes()).expect("write");
    let path = file.path().to_str().expect("utf-8 path").to_string();

    let spec = seccomp(ProfileType::Localhost, &path).spec();
    let profile = spec
        .linux()
        .as_ref()
        .and_then(|l| l.seccomp().clone())
        .expect("seccomp");
    assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActErrno);
    assert_eq!(profile.syscalls().as_ref().map(Vec::len), Some(2));

    // The deprecated spelling: "localhost/" + an absolute path.
    let mut case = Case::new();
    case.sc().seccomp = None;
    #[allow(deprecated)]
    {
        case.sc().seccomp_profile_path = format!("localhost/{path}");
    }
    let spec = case.spec();
    assert!(
        spec.linux()
            .as_ref()
            .and_then(|l| l.seccomp().clone())
            .is_some()
    );
}

#[test]
fn localhost_profile_errors() {
    use cri::security_profile::ProfileType;
    let field = "linux.security_context.seccomp.localhost_ref";

    let err = seccomp(ProfileType::Localhost, "/nonexistent/frakti/profile.json").error(field);
    assert!(err.is_invalid_argument());
    assert!(err.to_string().contains("/nonexistent/frakti/profile.json"));

    assert!(
        seccomp(ProfileType::Localhost, "")
            .error(field)
            .is_invalid_argument()
    );
    let err = seccomp(ProfileType::Localhost, "profiles/audit.json").error(field);
    assert!(err.is_invalid_argument());

    let mut bad = tempfile::NamedTempFile::new().expect("temp file");
    bad.write_all(b"{\"defaultAction\": \"SCMP_ACT_WHATEVER\"}")
        .expect("write");
    let bad_path = bad.path().to_str().expect("utf-8").to_string();
    let err = seccomp(ProfileType::Localhost, &bad_path).error(field);
    assert!(err.is_invalid_argument());
    assert!(err.to_string().contains(&bad_path));

    let mut big = tempfile::NamedTempFile::new().expect("temp file");
    big.write_all(&vec![b' '; (1 << 20) + 1]).expect("write");
    let big_path = big.path().to_str().expect("utf-8").to_string();
    let err = seccomp(ProfileType::Localhost, &big_path).error(field);
    assert!(err.is_invalid_argument());
    assert!(err.to_string().contains("larger than"));

    let dir = tempfile::tempdir().expect("temp dir");
    let dir_path = dir.path().to_str().expect("utf-8").to_string();
    // A directory opens but cannot be read: an error, never a panic.
    assert!(seccomp(ProfileType::Localhost, &dir_path).build().is_err());
}

// --- Namespaces ------------------------------------------------------------

#[test]
fn node_namespaces_are_unsupported() {
    let node = cri::NamespaceMode::Node as i32;
    let target = cri::NamespaceMode::Target as i32;
    type Set = fn(&mut cri::NamespaceOption, i32);
    let cases: [(Set, i32, &str); 4] = [
        (
            |n, m| n.pid = m,
            node,
            "namespace_options.pid: NODE is not supported",
        ),
        (
            |n, m| n.network = m,
            node,
            "namespace_options.network: NODE is not supported",
        ),
        (
            |n, m| n.ipc = m,
            node,
            "namespace_options.ipc: NODE is not supported",
        ),
        (
            |n, m| n.pid = m,
            target,
            "namespace_options.pid: TARGET is not supported",
        ),
    ];
    for (set, mode, message) in cases {
        let mut case = Case::new();
        if let Some(ns) = case.sc().namespace_options.as_mut() {
            set(ns, mode);
        }
        let err = case.error(message);
        assert!(!err.is_invalid_argument(), "{message}");
    }

    let mut case = Case::new();
    if let Some(ns) = case.sc().namespace_options.as_mut() {
        ns.ipc = 12;
    }
    assert!(case.error("namespace_options.ipc").is_invalid_argument());
}

fn kubelet_userns(host: u32) -> cri::UserNamespace {
    let range = cri::IdMapping {
        host_id: host,
        container_id: 0,
        length: 65536,
    };
    cri::UserNamespace {
        mode: cri::NamespaceMode::Pod as i32,
        uids: vec![range],
        gids: vec![range],
    }
}

fn set_pod_userns(case: &mut Case, userns: Option<cri::UserNamespace>) {
    let sc = case
        .sandbox
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default);
    sc.namespace_options
        .get_or_insert_with(Default::default)
        .userns_options = userns;
}

fn set_container_userns(case: &mut Case, userns: Option<cri::UserNamespace>) {
    if let Some(ns) = case.sc().namespace_options.as_mut() {
        ns.userns_options = userns;
    }
}

#[test]
fn user_namespaces_of_pods() {
    // As kubelet sends a hostUsers: false pod: the same options for the
    // pod and its containers.
    let mut case = Case::new();
    set_pod_userns(&mut case, Some(kubelet_userns(65536 * 3)));
    set_container_userns(&mut case, Some(kubelet_userns(65536 * 3)));
    let spec = case.build().unwrap().spec;
    let linux = spec.linux().as_ref().unwrap();
    assert!(
        linux
            .namespaces()
            .iter()
            .flatten()
            .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::User && n.path().is_none())
    );
    for mappings in [linux.uid_mappings(), linux.gid_mappings()] {
        let m = &mappings.as_ref().unwrap()[0];
        assert_eq!(
            (m.container_id(), m.host_id(), m.size()),
            (0, 196608, 65536)
        );
    }
    // A container without options of its own is in its pod's namespace.
    set_container_userns(&mut case, None);
    assert!(
        case.build()
            .unwrap()
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .uid_mappings()
            .is_some()
    );

    // A container with other mappings than its pod's, or with a user
    // namespace its pod lacks: refused.
    set_container_userns(&mut case, Some(kubelet_userns(65536)));
    let err = case.error("userns_options");
    assert!(err.is_invalid_argument() && err.to_string().contains("differ from its pod's"));
    set_pod_userns(&mut case, None);
    let err = case.error("userns_options");
    assert!(err.to_string().contains("its pod does not have"), "{err}");

    // Malformed mappings name the field; CONTAINER mode is not supported.
    let mut overlapping = kubelet_userns(65536);
    overlapping.uids.push(cri::IdMapping {
        host_id: 400_000,
        container_id: 100,
        length: 10,
    });
    set_pod_userns(&mut case, Some(overlapping));
    let err = case.error("userns_options.uids");
    assert!(
        err.is_invalid_argument() && err.to_string().contains("overlap"),
        "{err}"
    );
    let mut per_container = kubelet_userns(65536);
    per_container.mode = cri::NamespaceMode::Container as i32;
    set_pod_userns(&mut case, Some(per_container));
    let err = case.error("userns_options.mode");
    assert!(!err.is_invalid_argument());
    let mut node_with_ranges = kubelet_userns(65536);
    node_with_ranges.mode = cri::NamespaceMode::Node as i32;
    set_pod_userns(&mut case, Some(node_with_ranges));
    assert!(case.error("userns_options").is_invalid_argument());

    // NODE (kubelet's hostUsers default) and absent are fine, with no
    // user namespace.
    let mut case = Case::new();
    set_container_userns(&mut case, None);
    let spec = case.build().unwrap().spec;
    assert_eq!(spec.linux().as_ref().unwrap().uid_mappings(), &None);
}

#[test]
fn pods_in_a_user_namespace_may_bind_low_ports() {
    use super::super::userns::sandbox_sysctls;
    let own: std::collections::HashMap<String, String> =
        [("net.ipv4.ping_group_range".to_string(), "1 1".to_string())].into();
    let sysctls = sandbox_sysctls(&own, true);
    assert_eq!(sysctls["net.ipv4.ip_unprivileged_port_start"], "0");
    assert_eq!(
        sysctls["net.ipv4.ping_group_range"], "1 1",
        "the pod's own wins"
    );
    assert_eq!(sandbox_sysctls(&own, false), own);
}
