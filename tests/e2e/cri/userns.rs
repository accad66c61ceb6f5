//! Pods in a user namespace (kubelet's `hostUsers: false`): the pod's
//! containers run as a mapped, unprivileged guest id, with the image and
//! volumes owned by their root through idmapped mounts.

use std::time::Duration;

use anyhow::ensure;
use k8s_cri::v1 as cri;
use libtest_mimic::Trial;

use super::harness::*;

pub fn tests() -> Vec<Trial> {
    vec![Trial::test("cri::pods_in_a_user_namespace", || {
        with_daemon(&[], user_namespace)
    })]
}

/// The CRI validation suite's mapping (kubelet's are 65536 ids from a
/// multiple of 65536; the host-mode and unit tests use those).
const HOST_BASE: u32 = 1000;
const LENGTH: u32 = 100_000;

fn userns(mode: cri::NamespaceMode, host: u32) -> cri::UserNamespace {
    let range = cri::IdMapping {
        host_id: host,
        container_id: 0,
        length: LENGTH,
    };
    cri::UserNamespace {
        mode: mode as i32,
        uids: vec![range],
        gids: vec![range],
    }
}

fn namespace_options(userns: cri::UserNamespace) -> Option<cri::NamespaceOption> {
    Some(cri::NamespaceOption {
        userns_options: Some(userns),
        ..Default::default()
    })
}

fn pod_in(name: &str, daemon: &Daemon, userns: cri::UserNamespace) -> cri::PodSandboxConfig {
    let mut config = pod_config(name, &daemon.log_dir());
    config.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: namespace_options(userns),
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

fn container_in(name: &str, command: &[&str], userns: cri::UserNamespace) -> cri::ContainerConfig {
    let mut config = container_config(name, command);
    config.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            namespace_options: namespace_options(userns),
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

async fn user_namespace(daemon: &mut Daemon) -> anyhow::Result<()> {
    let mut c = daemon.runtime().await?;
    // kubelet runs hostUsers: false pods only on a runtime that says so.
    let status = c
        .status(cri::StatusRequest { verbose: false })
        .await?
        .into_inner();
    ensure!(
        status
            .runtime_handlers
            .iter()
            .any(|h| h.features.as_ref().is_some_and(|f| f.user_namespaces)),
        "no handler supports user namespaces: {:?}",
        status.runtime_handlers
    );

    // Malformed or unsupported options are refused before any VM starts
    // (the suite's "more than one mapping": two ranges for container id 0).
    let mut overlapping = userns(cri::NamespaceMode::Pod, HOST_BASE);
    overlapping.uids.push(cri::IdMapping {
        host_id: 2000,
        container_id: 0,
        length: LENGTH,
    });
    let bad = pod_in("overlap", daemon, overlapping);
    let (code, message) = code_of(run_pod(&mut c, bad).await);
    ensure!(
        code == tonic::Code::InvalidArgument && message.contains("userns_options.uids"),
        "{code:?} {message}"
    );
    let per_container = pod_in(
        "percontainer",
        daemon,
        userns(cri::NamespaceMode::Container, HOST_BASE),
    );
    let (code, message) = code_of(run_pod(&mut c, per_container).await);
    ensure!(
        code == tonic::Code::FailedPrecondition && message.contains("userns_options.mode"),
        "{code:?} {message}"
    );

    let mapped = userns(cri::NamespaceMode::Pod, HOST_BASE);
    let pod = run_pod(&mut c, pod_in("userns", daemon, mapped.clone())).await?;
    let volume = daemon
        .dir
        .path()
        .join("kubelet/pods/uid-userns/volumes/kubernetes.io~empty-dir/data");
    std::fs::create_dir_all(&volume)?;
    let mut app = container_in(
        "app",
        &[
            "sh",
            "-c",
            "cat /proc/self/uid_map /proc/self/gid_map; echo ids=$(id -u):$(id -g); \
             stat -c 'owner %n %u:%g' / /bin/busybox /data /etc/resolv.conf /proc/1; \
             touch /new && stat -c 'owner %n %u:%g' /new; \
             echo x > /data/f && stat -c 'owner %n %u:%g' /data/f; \
             (nc -l -p 80 2>&1 || echo bind failed) & sleep 2; echo ready; sleep 1000",
        ],
        mapped.clone(),
    );
    app.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: volume.to_string_lossy().into_owned(),
        ..Default::default()
    }];
    let app = create(&mut c, &pod, app).await?;
    start(&mut c, &app).await?;
    let log = wait_for_text(
        &daemon.log_dir().join("app.log"),
        "ready\n",
        Duration::from_secs(60),
    )
    .await?;
    let mapping = format!("0 {HOST_BASE} {LENGTH}");
    let map_lines = log
        .lines()
        .filter(|l| l.split_whitespace().skip(3).collect::<Vec<_>>().join(" ") == mapping)
        .count();
    ensure!(map_lines == 2, "uid_map and gid_map are {mapping}: {log}");
    ensure!(log.contains("ids=0:0"), "{log}");
    // The image (idmapped), the overlay's root, a file the container made,
    // the emptyDir (idmapped ext4), the pod's resolv.conf (an idmapped bind
    // from the guest's tmpfs) are its root's; the pod's pause process is
    // guest root, which the container sees as the overflow id.
    for path in [
        "/",
        "/bin/busybox",
        "/data",
        "/new",
        "/data/f",
        "/etc/resolv.conf",
    ] {
        ensure!(log.contains(&format!("owner {path} 0:0")), "{path}: {log}");
    }
    ensure!(log.contains("owner /proc/1 65534:65534"), "{log}");
    // Port 80 without a capability over the guest's network: the pod's
    // sysctl opens it.
    ensure!(
        !log.contains("bind failed") && !log.contains("denied"),
        "{log}"
    );

    // An exec and a second container are in the same user namespace.
    let own = exec(
        &mut c,
        &app,
        &["stat", "-L", "-c", "%i", "/proc/self/ns/user"],
        10,
    )
    .await?;
    let exec_map = exec(&mut c, &app, &["cat", "/proc/self/uid_map"], 10).await?;
    let exec_map = String::from_utf8_lossy(&exec_map.stdout);
    ensure!(
        exec_map.split_whitespace().collect::<Vec<_>>().join(" ") == mapping,
        "exec: {exec_map}"
    );
    let second = create(
        &mut c,
        &pod,
        container_in("second", &["sleep", "1000"], mapped.clone()),
    )
    .await?;
    start(&mut c, &second).await?;
    let theirs = exec(
        &mut c,
        &second,
        &["stat", "-L", "-c", "%i", "/proc/self/ns/user"],
        10,
    )
    .await?;
    ensure!(
        own.stdout == theirs.stdout && own.stdout.len() > 1,
        "{:?} vs {:?}",
        String::from_utf8_lossy(&own.stdout),
        String::from_utf8_lossy(&theirs.stdout)
    );
    let sysctl = exec(
        &mut c,
        &second,
        &["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"],
        10,
    )
    .await?;
    ensure!(sysctl.stdout == b"0\n", "{:?}", sysctl.stdout);

    // Other mappings than the pod's: refused, the pod unharmed.
    let other = container_in("other", &["true"], userns(cri::NamespaceMode::Pod, 200_000));
    let (code, message) = code_of(create(&mut c, &pod, other).await);
    ensure!(
        code == tonic::Code::InvalidArgument && message.contains("differ from its pod's"),
        "{code:?} {message}"
    );
    remove_pod_without_leaks(daemon, &mut c, &pod).await
}
