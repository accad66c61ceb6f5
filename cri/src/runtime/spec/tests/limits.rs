//! Mounts, resources and the stop signal.

use std::collections::HashMap;

use k8s_cri::v1 as cri;
use oci_spec::runtime::{Mount, Spec};

use super::{Case, process};
use crate::runtime::spec::signal::{SIGTERM, stop_signal};
use crate::runtime::spec::{GuestMount, GuestMountKind, resources};

// --- Mounts ----------------------------------------------------------------

fn mounts(spec: &Spec) -> Vec<Mount> {
    spec.mounts().clone().unwrap_or_default()
}

fn destinations(spec: &Spec) -> Vec<String> {
    mounts(spec)
        .iter()
        .map(|m| m.destination().to_string_lossy().into_owned())
        .collect()
}

fn find(spec: &Spec, destination: &str) -> Mount {
    mounts(spec)
        .into_iter()
        .find(|m| m.destination().to_str() == Some(destination))
        .unwrap_or_else(|| panic!("no mount at {destination}"))
}

fn options(m: &Mount) -> Vec<String> {
    m.options().clone().unwrap_or_default()
}

fn bind(container_path: &str, guest_source: &str, readonly: bool) -> GuestMount {
    GuestMount {
        container_path: container_path.to_string(),
        guest_source: guest_source.to_string(),
        readonly,
        kind: GuestMountKind::Bind,
    }
}

const STANDARD: [&str; 7] = [
    "/proc",
    "/dev",
    "/dev/pts",
    "/dev/mqueue",
    "/sys",
    "/sys/fs/cgroup",
    "/dev/shm",
];

#[test]
fn mount_order() {
    let mut case = Case::new();
    case.mounts = vec![
        bind("/etc/hosts", "/run/frakti/sandbox/hosts", false),
        bind("/var/log/nginx", "/run/frakti/disks/vol0/logs", false),
        bind("/etc/nginx/conf.d", "/run/frakti/files/c0ffee/config", true),
        GuestMount {
            container_path: "/cache".to_string(),
            guest_source: "tmpfs".to_string(),
            readonly: false,
            kind: GuestMountKind::Tmpfs {
                size_bytes: Some(64 << 20),
            },
        },
    ];
    let spec = case.spec();
    let mut want: Vec<String> = STANDARD.iter().map(|s| s.to_string()).collect();
    want.extend(
        [
            "/etc/resolv.conf",
            "/etc/hostname",
            "/etc/hosts",
            "/var/log/nginx",
            "/etc/nginx/conf.d",
            "/cache",
        ]
        .map(String::from),
    );
    assert_eq!(destinations(&spec), want);

    let resolv = find(&spec, "/etc/resolv.conf");
    assert_eq!(resolv.typ().as_deref(), Some("bind"));
    assert_eq!(
        resolv.source().as_ref().and_then(|s| s.to_str()),
        Some("/run/frakti/sandbox/resolv.conf")
    );
    assert_eq!(options(&resolv), ["rbind", "rprivate", "rw"]);

    let conf = find(&spec, "/etc/nginx/conf.d");
    assert_eq!(options(&conf), ["rbind", "rprivate", "ro"]);
    assert_eq!(
        conf.source().as_ref().and_then(|s| s.to_str()),
        Some("/run/frakti/files/c0ffee/config")
    );

    let cache = find(&spec, "/cache");
    assert_eq!(cache.typ().as_deref(), Some("tmpfs"));
    assert_eq!(
        cache.source().as_ref().and_then(|s| s.to_str()),
        Some("tmpfs")
    );
    assert_eq!(options(&cache), ["nosuid", "nodev", "size=67108864"]);

    let shm = find(&spec, "/dev/shm");
    assert_eq!(
        options(&shm),
        ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
    );
    let pts = find(&spec, "/dev/pts");
    assert!(options(&pts).contains(&"ptmxmode=0666".to_string()));
    let cgroup = find(&spec, "/sys/fs/cgroup");
    assert_eq!(cgroup.typ().as_deref(), Some("cgroup"));
    assert!(options(&cgroup).contains(&"ro".to_string()));
}

#[test]
fn pod_files_follow_readonly_rootfs_and_absence() {
    let mut case = Case::new();
    case.sc().readonly_rootfs = true;
    case.hostname_file = None;
    let spec = case.spec();
    assert_eq!(
        options(&find(&spec, "/etc/resolv.conf")),
        ["rbind", "rprivate", "ro"]
    );
    assert!(!destinations(&spec).contains(&"/etc/hostname".to_string()));

    // A readonly tmpfs says so.
    let mut case = Case::new();
    case.mounts = vec![GuestMount {
        container_path: "/scratch".to_string(),
        guest_source: "tmpfs".to_string(),
        readonly: true,
        kind: GuestMountKind::Tmpfs { size_bytes: None },
    }];
    assert_eq!(
        options(&find(&case.spec(), "/scratch")),
        ["nosuid", "nodev", "ro"]
    );
}

#[test]
fn cri_mount_replaces_standard_and_pod_files() {
    let mut case = Case::new();
    case.mounts = vec![
        bind("/dev/shm/", "/run/frakti/sandbox/shm", false),
        bind(
            "/etc/resolv.conf",
            "/run/frakti/disks/vol1/resolv.conf",
            true,
        ),
    ];
    let spec = case.spec();
    let dests = destinations(&spec);
    assert_eq!(dests.iter().filter(|d| *d == "/dev/shm").count(), 1);
    assert_eq!(dests.iter().filter(|d| *d == "/etc/resolv.conf").count(), 1);
    assert_eq!(dests.last().map(String::as_str), Some("/etc/resolv.conf"));
    let shm = find(&spec, "/dev/shm");
    assert_eq!(shm.typ().as_deref(), Some("bind"));
    let resolv = find(&spec, "/etc/resolv.conf");
    assert_eq!(
        resolv.source().as_ref().and_then(|s| s.to_str()),
        Some("/run/frakti/disks/vol1/resolv.conf")
    );

    // A mount over /dev takes the standard mounts under /dev with it.
    let mut case = Case::new();
    case.mounts = vec![bind("/dev", "/run/frakti/disks/vol2", false)];
    let dests = destinations(&case.spec());
    for gone in ["/dev/pts", "/dev/mqueue", "/dev/shm"] {
        assert!(!dests.contains(&gone.to_string()), "{gone}");
    }
    assert!(dests.contains(&"/sys".to_string()));

    // Two CRI mounts on one destination: the later one wins.
    let mut case = Case::new();
    case.mounts = vec![bind("/data", "/a", false), bind("/data/./", "/b", false)];
    let spec = case.spec();
    assert_eq!(
        destinations(&spec).iter().filter(|d| *d == "/data").count(),
        1
    );
    assert_eq!(
        find(&spec, "/data")
            .source()
            .as_ref()
            .and_then(|s| s.to_str()),
        Some("/b")
    );
}

#[test]
fn bad_mount_paths_are_invalid() {
    for path in ["data", "", "/", "//", "/data/../etc", "/x\0y"] {
        let mut case = Case::new();
        case.mounts = vec![bind(path, "/run/frakti/disks/vol0", false)];
        let err = case.error("mounts");
        assert!(err.is_invalid_argument(), "{path:?}");
        assert!(err.to_string().contains(&format!("{path:?}")), "{err}");
    }
    // A relative guest source is the runtime's own bug, not the request's.
    let mut case = Case::new();
    case.mounts = vec![bind("/data", "relative", false)];
    assert!(!case.error("mounts").is_invalid_argument());
}

// --- Resources -------------------------------------------------------------

#[test]
fn resources_mapping() {
    let r = cri::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 150_000,
        cpu_shares: 1536,
        memory_limit_in_bytes: 512 << 20,
        memory_swap_limit_in_bytes: 1 << 30,
        oom_score_adj: -997,
        cpuset_cpus: "0-1,3".to_string(),
        cpuset_mems: "0".to_string(),
        hugepage_limits: vec![cri::HugepageLimit {
            page_size: "2MB".to_string(),
            limit: 1 << 30,
        }],
        unified: HashMap::from([("memory.high".to_string(), "400M".to_string())]),
    };
    let out = resources(&r).expect("resources");
    let json = serde_json::to_value(&out).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "cpu": {"period": 100000, "quota": 150000, "shares": 1536, "cpus": "0-1,3", "mems": "0"},
            "memory": {"limit": 536870912, "swap": 1073741824},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 1073741824}],
            "unified": {"memory.high": "400M"}
        })
    );

    let mut case = Case::new();
    *case.res() = r;
    let spec = case.spec();
    assert_eq!(process(&spec).oom_score_adj(), Some(-997));
    let linux = spec.linux().as_ref().expect("linux");
    assert_eq!(linux.resources(), &Some(out));
}

#[test]
fn resources_zero_and_unlimited() {
    let empty = resources(&cri::LinuxContainerResources::default()).expect("empty");
    assert_eq!(
        serde_json::to_value(&empty).expect("json"),
        serde_json::json!({})
    );

    let r = cri::LinuxContainerResources {
        cpu_quota: -1,
        memory_swap_limit_in_bytes: -1,
        ..Default::default()
    };
    let out = resources(&r).expect("unlimited");
    assert_eq!(
        serde_json::to_value(&out).expect("json"),
        serde_json::json!({"cpu": {"quota": -1}})
    );
}

#[test]
fn bad_resources_are_invalid() {
    type Set = fn(&mut cri::LinuxContainerResources);
    let cases: [(Set, &str); 13] = [
        (|r| r.cpu_period = -100_000, "linux.resources.cpu_period"),
        (|r| r.cpu_quota = -2, "linux.resources.cpu_quota"),
        (|r| r.cpu_shares = -1, "linux.resources.cpu_shares"),
        (
            |r| r.memory_limit_in_bytes = -1,
            "linux.resources.memory_limit_in_bytes",
        ),
        (
            |r| r.memory_swap_limit_in_bytes = -2,
            "linux.resources.memory_swap_limit_in_bytes",
        ),
        (
            |r| {
                r.memory_limit_in_bytes = 1 << 30;
                r.memory_swap_limit_in_bytes = 1 << 20;
            },
            "linux.resources.memory_swap_limit_in_bytes",
        ),
        (
            |r| r.cpuset_cpus = "0-".to_string(),
            "linux.resources.cpuset_cpus",
        ),
        (
            |r| r.cpuset_cpus = "3-1".to_string(),
            "linux.resources.cpuset_cpus",
        ),
        (
            |r| r.cpuset_mems = "a".to_string(),
            "linux.resources.cpuset_mems",
        ),
        (
            |r| {
                r.hugepage_limits = vec![cri::HugepageLimit {
                    page_size: "2XB".to_string(),
                    limit: 1,
                }]
            },
            "linux.resources.hugepage_limits[0].page_size",
        ),
        (
            |r| {
                r.hugepage_limits = vec![cri::HugepageLimit {
                    page_size: "1GB".to_string(),
                    limit: u64::MAX,
                }]
            },
            "linux.resources.hugepage_limits[0].limit",
        ),
        (
            |r| r.unified = HashMap::from([("../../cgroup.procs".to_string(), "1".to_string())]),
            "linux.resources.unified",
        ),
        (|r| r.oom_score_adj = 1001, "linux.resources.oom_score_adj"),
    ];
    for (set, field) in cases {
        let mut case = Case::new();
        set(case.res());
        let err = case.error(field);
        assert!(err.is_invalid_argument(), "{field}");
    }
    // UpdateContainerResources goes through `resources` alone.
    let r = cri::LinuxContainerResources {
        cpu_shares: -2,
        ..Default::default()
    };
    let err = resources(&r).expect_err("negative shares");
    assert!(err.to_string().contains("cpu_shares"));
}

// --- Stop signal -----------------------------------------------------------

#[test]
fn stop_signals() {
    let table: [(Option<&str>, i32); 18] = [
        (None, SIGTERM),
        (Some(""), SIGTERM),
        (Some("SIGQUIT"), 3),
        (Some("QUIT"), 3),
        (Some("sigint"), 2),
        (Some("3"), 3),
        (Some("9"), 9),
        (Some("SIGRTMIN"), 34),
        (Some("SIGRTMIN+3"), 37),
        (Some("RTMIN+30"), 64),
        (Some("SIGRTMAX"), 64),
        (Some("SIGRTMAX-2"), 62),
        (Some(" SIGWINCH "), 28),
        // Junk: SIGTERM.
        (Some("SIGFOO"), SIGTERM),
        (Some("0"), SIGTERM),
        (Some("65"), SIGTERM),
        (Some("SIGRTMIN+31"), SIGTERM),
        (Some("SIGRTMIN+99999999999999999999"), SIGTERM),
    ];
    for (name, want) in table {
        assert_eq!(stop_signal(name), want, "{name:?}");
    }
    for junk in [
        "-9",
        "+3",
        "SIGRTMIN-1",
        "RTMAX+1",
        "SIG",
        "SIGSIGTERM",
        "ＴＥＲＭ",
    ] {
        assert_eq!(stop_signal(Some(junk)), SIGTERM, "{junk:?}");
    }

    let mut case = Case::new();
    case.image.config.stop_signal = None;
    assert_eq!(case.build().expect("builds").stop_signal, SIGTERM);
    case.image.config.stop_signal = Some("SIGRTMIN+3".to_string());
    assert_eq!(case.build().expect("builds").stop_signal, 37);
}
