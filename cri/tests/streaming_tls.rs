//! The streaming server over TLS (`--streaming-tls-cert/--streaming-tls-key`):
//! URLs are https, a client trusting the CA reaches it, plain HTTP does
//! not, and tokens stay one-time. No VM needed: what is checked ends before
//! any process would start. The client is curl (an independent TLS stack).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use frakti_cri::image::{ImageStore, StoreConfig};
use frakti_cri::network::NetworkSettings;
use frakti_cri::runtime::sizing::SizingDefaults;
use frakti_cri::runtime::{Runtime, RuntimeConfig};
use frakti_cri::sandbox::vmm::VmAssets;
use frakti_cri::streaming::request::StreamRequest;
use frakti_cri::streaming::{Streaming, TlsFiles};
use support::pki::TestCa;

fn config(root: &Path) -> RuntimeConfig {
    RuntimeConfig {
        root: root.join("state"),
        assets: VmAssets {
            vmm: "/nonexistent/frakti-vmm".into(),
            kernel: "/nonexistent/vmlinux".into(),
            initrd: "/nonexistent/initrd".into(),
            kernels_dir: "/nonexistent/kernels".into(),
        },
        sizing: SizingDefaults {
            cpus: 1,
            memory_mib: 128,
            host_cpus: 1,
            guest_reserve_mib: 64,
        },
        boot_timeout: Duration::from_secs(1),
        allowed_unsafe_sysctls: Vec::new(),
        streaming_addr: "127.0.0.1:0".into(),
        empty_dir_bytes: 0,
        network: NetworkSettings {
            enabled: false,
            conf_dir: root.join("net.d"),
            bin_dirs: Vec::new(),
            plugin_timeout: Duration::from_secs(1),
            netns_dir: root.join("netns"),
        },
    }
}

/// `curl` of `url` trusting `ca`: (HTTP code or 0, curl's exit code).
fn curl(url: &str, ca: Option<&Path>) -> (String, i32) {
    let mut command = Command::new("curl");
    command.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "20",
    ]);
    if let Some(ca) = ca {
        command.arg("--cacert").arg(ca);
    }
    let output = command.arg(url).output().expect("run curl");
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        output.status.code().unwrap_or(-1),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_urls_are_https_and_tokens_one_time() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("pki"));
    let store = ImageStore::open(StoreConfig::new(&dir.path().join("images"))).unwrap();
    let runtime = Runtime::open(config(dir.path()), store).await.unwrap();
    let tls = TlsFiles {
        cert: ca.server_cert.clone(),
        key: ca.server_key.clone(),
    };
    let streaming = Streaming::start("127.0.0.1:0", Some(&tls), runtime.clone())
        .await
        .unwrap();
    let request = || StreamRequest::PortForward {
        pod_id: "0".repeat(64),
        ports: vec![80],
    };
    let url = streaming.url(request()).unwrap();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    // Reached over TLS: not an upgrade, so 400 — and the token is used.
    let ca_cert = ca.ca_cert.clone();
    let first = {
        let url = url.clone();
        let ca_cert = ca_cert.clone();
        tokio::task::spawn_blocking(move || curl(&url, Some(&ca_cert)))
            .await
            .unwrap()
    };
    assert_eq!(first, ("400".to_string(), 0));
    let again = {
        let url = url.clone();
        let ca_cert = ca_cert.clone();
        tokio::task::spawn_blocking(move || curl(&url, Some(&ca_cert)))
            .await
            .unwrap()
    };
    assert_eq!(again.0, "404", "a used token");

    // A client that does not trust the CA, or speaks plain HTTP, fails.
    let other = streaming.url(request()).unwrap();
    let untrusted = {
        let other = other.clone();
        tokio::task::spawn_blocking(move || curl(&other, None))
            .await
            .unwrap()
    };
    assert_ne!(untrusted.1, 0, "curl without the CA");
    let plain = other.replacen("https://", "http://", 1);
    let plain = tokio::task::spawn_blocking(move || curl(&plain, None))
        .await
        .unwrap();
    assert_ne!(plain.0, "400", "plain HTTP on the TLS port");

    // A key that does not parse is a clear error, not a panic.
    let bad_key = dir.path().join("bad.key");
    std::fs::write(&bad_key, "not a key").unwrap();
    let broken = TlsFiles {
        cert: ca.server_cert.clone(),
        key: bad_key,
    };
    let error = Streaming::start("127.0.0.1:0", Some(&broken), runtime)
        .await
        .err()
        .expect("a bad key is refused");
    assert!(error.to_string().contains("bad.key"), "{error}");
}
