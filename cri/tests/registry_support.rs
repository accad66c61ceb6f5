//! Tests of the test support itself (tests/support): real registries on
//! 127.0.0.1 (plain, TLS + htpasswd, token auth), images built from
//! scratch and pushed with skopeo, their expected trees checked against an
//! independent unpacker (umoci). Needs the Debian packages docker-registry, skopeo,
//! umoci, openssl, busybox-static and curl; a missing one fails the test
//! with the package to install. Runs as root (umoci must create devices and
//! set owners and capabilities).

mod support;

use std::io::Read;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};
use support::images::{self, Kind, PushOptions};
use support::pki::TestCa;
use support::registry::{Registry, RegistryOptions, sha256_digest};
use support::token::TokenServer;
use support::{require_tool, run, try_run};

const USER: &str = "frakti";
const PASS: &str = "s3cret-pass";

/// Runs curl with `args`; returns (exit code, stdout, stderr).
fn curl(args: &[&str]) -> (i32, String, String) {
    require_tool("curl", "curl");
    let out = try_run(
        Command::new("curl")
            .args(["-sS", "--max-time", "20"])
            .args(args),
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The HTTP status of GET `url` with extra curl `args` ("000" if none).
fn http_status(url: &str, args: &[&str]) -> (i32, String) {
    let mut a = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    a.extend_from_slice(args);
    a.push(url);
    let (code, stdout, _) = curl(&a);
    (code, stdout)
}

fn layer_media_types(manifest: &serde_json::Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn plain_registry_serves_pushed_images() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg"), RegistryOptions::default());
    assert!(reg.host().starts_with("127.0.0.1:"));
    assert_eq!(http_status(&reg.url("/v2/"), &[]), (0, "200".to_string()));

    let imgs = tmp.path().join("images");

    // busybox, OCI manifest, pushed byte for byte.
    let bb = images::busybox_image(&imgs);
    assert_eq!(bb.images.len(), 1);
    assert_eq!(bb.layout, imgs.join("busybox"));
    let pushed = images::push(&bb, &reg, "library/busybox:latest", &PushOptions::default());
    assert_eq!(
        pushed.reference,
        format!("{}/library/busybox:latest", reg.host())
    );
    assert_eq!(pushed.manifest_digest, bb.manifest_digest);
    assert_eq!(pushed.media_type, images::MEDIA_TYPE_MANIFEST);
    let m = reg.manifest("library/busybox:latest");
    assert_eq!(m.json["config"]["digest"], bb.config_digest());
    assert_eq!(layer_media_types(&m.json), [images::MEDIA_TYPE_LAYER_GZIP]);
    assert_eq!(
        m.json["layers"][0]["digest"],
        bb.images[0].layers[0].digest.as_str()
    );
    let (config_digest, config) = reg.config("library/busybox:latest");
    assert_eq!(config_digest, bb.config_digest());
    assert_eq!(config["architecture"], images::host_arch());
    assert_eq!(config["os"], "linux");
    assert_eq!(
        config["config"]["Env"],
        serde_json::json!(["PATH=/usr/bin:/bin"])
    );
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["sh"]));
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        bb.images[0].layers[0].diff_id.as_str()
    );
    // By digest too.
    assert_eq!(
        reg.manifest(&format!("library/busybox@{}", bb.manifest_digest))
            .digest,
        bb.manifest_digest
    );
    assert_eq!(
        pushed.digest_reference,
        format!("{}/library/busybox@{}", reg.host(), bb.manifest_digest)
    );

    // The same image as a Docker schema 2 manifest: other manifest digest,
    // same config (image id) and layer blobs.
    let v2 = images::push(&bb, &reg, "busybox-v2s2:1.0", &PushOptions::v2s2());
    assert_eq!(v2.media_type, images::DOCKER_MEDIA_TYPE_MANIFEST);
    assert_ne!(v2.manifest_digest, bb.manifest_digest);
    let m = reg.manifest("busybox-v2s2:1.0");
    assert_eq!(
        m.json["config"]["mediaType"],
        images::DOCKER_MEDIA_TYPE_CONFIG
    );
    assert_eq!(m.json["config"]["digest"], bb.config_digest());
    assert_eq!(
        layer_media_types(&m.json),
        [images::DOCKER_MEDIA_TYPE_LAYER_GZIP]
    );
    assert_eq!(
        m.json["layers"][0]["digest"],
        bb.images[0].layers[0].digest.as_str()
    );

    // A custom config (User, StopSignal) changes only the config.
    let custom = images::busybox_image_with(
        &imgs,
        "busybox-user",
        &images::ImageConfig {
            user: Some("1000:1000".into()),
            stop_signal: Some("SIGINT".into()),
            ..Default::default()
        },
    );
    assert_ne!(custom.config_digest(), bb.config_digest());
    assert_eq!(custom.images[0].layers, bb.images[0].layers);
    images::push(
        &custom,
        &reg,
        "busybox-user:latest",
        &PushOptions::default(),
    );
    let (_, config) = reg.config("busybox-user:latest");
    assert_eq!(config["config"]["User"], "1000:1000");
    assert_eq!(config["config"]["StopSignal"], "SIGINT");

    // The layered image: gzip, uncompressed and zstd layers kept as they are.
    let layered = images::layered_image(&imgs);
    let pushed = images::push(&layered, &reg, "layered:latest", &PushOptions::default());
    assert_eq!(pushed.manifest_digest, layered.manifest_digest);
    let m = reg.manifest("layered:latest");
    assert_eq!(
        layer_media_types(&m.json),
        [
            images::MEDIA_TYPE_LAYER_GZIP,
            images::MEDIA_TYPE_LAYER,
            images::MEDIA_TYPE_LAYER_ZSTD
        ]
    );
    assert_eq!(reg.config("layered:latest").0, layered.config_digest());

    // The multi-arch index, with both images.
    let multi = images::multi_arch_index(&imgs);
    assert!(multi.is_index());
    let pushed = images::push(&multi, &reg, "multi:latest", &PushOptions::default());
    assert_eq!(pushed.manifest_digest, multi.manifest_digest);
    assert_eq!(pushed.media_type, images::MEDIA_TYPE_INDEX);
    let index = reg.manifest("multi:latest").json;
    let platforms: Vec<(String, String, Option<String>)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let p = &d["platform"];
            (
                p["os"].as_str().unwrap().to_string(),
                p["architecture"].as_str().unwrap().to_string(),
                p["variant"].as_str().map(String::from),
            )
        })
        .collect();
    assert_eq!(
        platforms,
        [
            ("linux".into(), "amd64".into(), None),
            ("linux".into(), "arm64".into(), Some("v8".into()))
        ]
    );
    for arch in ["amd64", "arm64"] {
        let image = multi.platform(arch).unwrap();
        let m = reg.manifest(&format!("multi@{}", image.manifest_digest));
        assert_eq!(m.digest, image.manifest_digest);
        assert_eq!(m.json["config"]["digest"], image.config_digest.as_str());
    }
    assert_eq!(multi.platform("amd64").unwrap().layers, bb.images[0].layers);
    assert_ne!(multi.platform("arm64").unwrap().layers, bb.images[0].layers);
    // A host-platform lookup through the index picks amd64 (on amd64).
    if images::host_arch() == "amd64" {
        assert_eq!(reg.config("multi:latest").0, multi.config_digest());
        assert_eq!(multi.config_digest(), bb.config_digest());
    }

    let arm = images::arm64_only_index(&imgs);
    let pushed = images::push(&arm, &reg, "arm64-only:latest", &PushOptions::default());
    assert_eq!(pushed.manifest_digest, arm.manifest_digest);
    let index = reg.manifest("arm64-only:latest").json;
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(index["manifests"][0]["platform"]["architecture"], "arm64");
    if images::host_arch() == "amd64" {
        let out = try_run(reg.skopeo_inspect("arm64-only:latest").arg("--config"));
        assert!(
            !out.status.success(),
            "no amd64 image in the arm64-only index"
        );
    }

    // Unknown names are 404s.
    let (_, code) = http_status(&reg.url("/v2/nothing/manifests/latest"), &[]);
    assert_eq!(code, "404");
}

#[test]
fn tls_htpasswd_registry_requires_ca_and_creds() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&tmp.path().join("pki"));
    run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&ca.ca_cert)
        .arg(&ca.server_cert));
    let other_ca = TestCa::new(&tmp.path().join("other-pki"));

    let reg = Registry::start(
        &tmp.path().join("reg"),
        RegistryOptions {
            tls: Some(&ca),
            htpasswd: Some((USER, PASS)),
            ..Default::default()
        },
    );
    assert_eq!(reg.scheme(), "https");
    assert_eq!(reg.creds(), Some((USER, PASS)));
    let v2 = reg.url("/v2/");
    let cacert = ca.ca_cert.to_str().unwrap();
    let good = format!("{USER}:{PASS}");
    let bad = format!("{USER}:wrong");

    // TLS: trusted only with the CA.
    let (code, _, err) = curl(&["-o", "/dev/null", &v2]);
    assert_eq!(
        code, 60,
        "curl without the CA must fail verification: {err}"
    );
    let (code, _, _) = curl(&[
        "-o",
        "/dev/null",
        "--cacert",
        other_ca.ca_cert.to_str().unwrap(),
        &v2,
    ]);
    assert_eq!(code, 60, "another CA must not verify the registry");
    assert_eq!(
        http_status(&v2, &["--cacert", cacert]),
        (0, "401".to_string())
    );
    let localhost = v2.replace("127.0.0.1", "localhost");
    assert_eq!(
        http_status(&localhost, &["--cacert", cacert]),
        (0, "401".to_string())
    );

    // Basic auth: the challenge, right and wrong creds.
    let (code, headers, _) = curl(&["-D", "-", "-o", "/dev/null", "--cacert", cacert, &v2]);
    assert_eq!(code, 0);
    assert!(
        headers.to_ascii_lowercase().contains(&format!(
            "www-authenticate: basic realm=\"{}\"",
            support::registry::REALM
        )),
        "no basic challenge in {headers}"
    );
    assert_eq!(
        http_status(&v2, &["--cacert", cacert, "-u", &good]),
        (0, "200".to_string())
    );
    assert_eq!(
        http_status(&v2, &["--cacert", cacert, "-u", &bad]),
        (0, "401".to_string())
    );

    // skopeo: pushing needs the creds; the Go client verifies with the CA
    // dir and fails without it.
    let bb = images::busybox_image(&tmp.path().join("images"));
    let err = images::try_push(
        &bb,
        &reg,
        "busybox:latest",
        &PushOptions {
            creds: Some((USER.into(), "wrong".into())),
            ..Default::default()
        },
    )
    .expect_err("push with wrong creds must fail");
    assert!(
        err.contains("401") || err.to_lowercase().contains("unauthorized"),
        "{err}"
    );
    images::try_push(
        &bb,
        &reg,
        "busybox:latest",
        &PushOptions {
            anonymous: true,
            ..Default::default()
        },
    )
    .expect_err("anonymous push must fail");

    let pushed = images::push(&bb, &reg, "busybox:latest", &PushOptions::default());
    assert_eq!(pushed.manifest_digest, bb.manifest_digest);
    let v2s2 = images::push(&bb, &reg, "busybox:v2s2", &PushOptions::v2s2());
    assert_eq!(v2s2.media_type, images::DOCKER_MEDIA_TYPE_MANIFEST);
    let layered = images::layered_image(&tmp.path().join("images"));
    assert_eq!(
        images::push(&layered, &reg, "layered:latest", &PushOptions::default()).manifest_digest,
        layered.manifest_digest
    );
    let multi = images::multi_arch_index(&tmp.path().join("images"));
    assert_eq!(
        images::push(&multi, &reg, "multi:latest", &PushOptions::default()).manifest_digest,
        multi.manifest_digest
    );

    reg.inspect_with_creds("busybox:latest", Some((USER, PASS)))
        .expect("inspect with creds");
    let err = reg
        .inspect_with_creds("busybox:latest", Some((USER, "wrong")))
        .expect_err("wrong creds must be refused");
    assert!(
        err.contains("401") || err.to_lowercase().contains("unauthorized"),
        "{err}"
    );
    reg.inspect_with_creds("busybox:latest", None)
        .expect_err("anonymous must be refused");
    let out = try_run(
        support::registry::skopeo()
            .args(["inspect", "--raw", "--tls-verify=true"])
            .arg(format!("--creds={good}"))
            .arg(format!("docker://{}", reg.reference("busybox:latest"))),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("x509"),
        "no CA must fail TLS: {stderr}"
    );

    // The manifest as served over HTTPS with creds is the pushed one.
    let (code, body, _) = curl(&[
        "--cacert",
        cacert,
        "-u",
        &good,
        "-H",
        &format!("Accept: {}", images::MEDIA_TYPE_MANIFEST),
        &reg.url("/v2/busybox/manifests/latest"),
    ]);
    assert_eq!(code, 0);
    assert_eq!(sha256_digest(body.as_bytes()), bb.manifest_digest);
}

#[test]
fn layered_image_unpacks_to_its_expected_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let img = images::layered_image(&tmp.path().join("images"));
    let expected = img.expected_tree();

    // The tree by hand: what the OCI layer rules must give.
    for gone in [
        "data/gone",
        "data/dir",
        "data/dir/a",
        "data/dir/b",
        "data/opq/lower1",
        "data/opq/lower2",
    ] {
        assert!(!expected.contains(gone), "{gone} must be deleted");
    }
    for path in [
        "data/opq",
        "data/opq/upper",
        "data/late",
        "bin/busybox",
        "bin/sh",
        "etc/passwd",
        "tmp",
    ] {
        assert!(expected.contains(path), "{path} missing");
    }
    let e = |p: &str| expected.get(p).unwrap();
    let keep_sha = sha256_digest(b"keep v2\n");
    assert_eq!(e("data/keep").sha256.as_deref(), Some(keep_sha.as_str()));
    assert_eq!(e("data/keep").nlink, Some(2));
    assert_eq!(e("data/keep").hardlinks, ["data/hard"]);
    assert_eq!(e("data/hard").hardlinks, ["data/keep"]);
    assert_eq!(e("data/hard").sha256.as_deref(), Some(keep_sha.as_str()));
    assert_eq!(
        (e("data/rel").kind, e("data/rel").link.as_deref()),
        (Kind::Symlink, Some("keep"))
    );
    assert_eq!(e("data/abs").link.as_deref(), Some("/data/keep"));
    assert_eq!((e("data/suid").mode, e("data/suid").uid), (0o4755, 0));
    assert_eq!(
        e("data/cap").xattrs["security.capability"],
        images::CAP_NET_RAW_EP
    );
    assert_eq!(
        (
            e("data/owned").uid,
            e("data/owned").gid,
            e("data/owned").mode
        ),
        (1000, 1000, 0o640)
    );
    assert_eq!(
        (e("dev/null2").kind, e("dev/null2").rdev),
        (Kind::CharDevice, Some((1, 3)))
    );
    assert_eq!(e("data/fifo").kind, Kind::Fifo);
    assert_eq!(e("data/old").mtime, Some(images::OLD_MTIME as i64));
    assert_eq!(e("tmp").mode, 0o1777);
    assert_eq!(e("bin/sh").link.as_deref(), Some("busybox"));

    // The layers as written: media types, and diff ids = sha256 of the
    // decompressed blobs.
    let image = &img.images[0];
    assert_eq!(
        image.config["rootfs"]["diff_ids"].as_array().unwrap().len(),
        3
    );
    for (i, layer) in image.layers.iter().enumerate() {
        let blob = std::fs::read(img.layout.join("blobs/sha256").join(&layer.digest[7..])).unwrap();
        assert_eq!(sha256_digest(&blob), layer.digest);
        assert_eq!(blob.len() as u64, layer.size);
        let mut tar = Vec::new();
        match layer.media_type.as_str() {
            images::MEDIA_TYPE_LAYER_GZIP => {
                flate2::read::GzDecoder::new(&blob[..])
                    .read_to_end(&mut tar)
                    .unwrap();
            }
            images::MEDIA_TYPE_LAYER_ZSTD => tar = zstd::decode_all(&blob[..]).unwrap(),
            images::MEDIA_TYPE_LAYER => tar = blob,
            other => panic!("layer {i}: media type {other}"),
        }
        assert_eq!(sha256_digest(&tar), layer.diff_id);
        assert_eq!(
            image.config["rootfs"]["diff_ids"][i],
            layer.diff_id.as_str()
        );
    }
    // The xattr is a PAX record the tar crate reads back.
    let blob = std::fs::read(
        img.layout
            .join("blobs/sha256")
            .join(&image.layers[1].digest[7..]),
    )
    .unwrap();
    let mut archive = tar::Archive::new(&blob[..]);
    let mut found = false;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap() == Path::new("data/cap") {
            let exts = entry.pax_extensions().unwrap().expect("pax header");
            for ext in exts {
                let ext = ext.unwrap();
                if ext.key().unwrap() == "SCHILY.xattr.security.capability" {
                    assert_eq!(ext.value_bytes(), images::CAP_NET_RAW_EP);
                    found = true;
                }
            }
        }
    }
    assert!(found, "no security.capability PAX record on data/cap");

    // An independent unpacker gives exactly the expected tree. umoci 0.4.7
    // has no zstd: it unpacks the same layers with the last one gzipped
    // (same tars, so same diff ids and tree).
    let mut layers = images::layered_layers();
    layers[2].compression = images::Compression::Gzip;
    let gz = images::build_image(
        &tmp.path().join("images"),
        "layered-gz",
        &images::ImageConfig::default(),
        &layers,
    );
    assert_eq!(gz.images[0].layers[2].diff_id, image.layers[2].diff_id);
    assert_eq!(
        gz.config_digest(),
        img.config_digest(),
        "same diff ids, same config"
    );
    let rootfs = umoci_unpack(&gz, &tmp.path().join("bundle"));
    expected.assert_matches(&images::scan_tree(&rootfs));
}

/// Unpacks `img` with umoci (as root: owners, devices, xattrs kept) and
/// returns the rootfs.
fn umoci_unpack(img: &images::BuiltImage, bundle: &Path) -> std::path::PathBuf {
    require_tool("umoci", "umoci");
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test unpacks with owners and devices: run it as root"
    );
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{}", img.layout.display(), img.tag))
        .arg(bundle));
    bundle.join("rootfs")
}

#[test]
fn big_and_many_files_images() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("images");
    // 17 MiB: above images::BIG, so built with gzip and sha256sum.
    let big = images::big_layer_image(&imgs, 17);
    let layer = &big.images[0].layers[1];
    assert_eq!(layer.media_type, images::MEDIA_TYPE_LAYER_GZIP);
    assert!(
        layer.size > 17 << 20,
        "pseudo-random data must not compress: {} bytes",
        layer.size
    );
    let expected = big.expected_tree();
    assert_eq!(expected.get("data/big").unwrap().size, Some(17 << 20));
    // Deterministic: built again elsewhere, same digests.
    let again = images::big_layer_image(&tmp.path().join("again"), 17);
    assert_eq!(again.manifest_digest, big.manifest_digest);
    // Uncompressed: the blob is the tar.
    let plain = images::big_layer_image_with(&imgs, 20, images::Compression::None);
    let plain_layer = &plain.images[0].layers[1];
    assert_eq!(plain_layer.media_type, images::MEDIA_TYPE_LAYER);
    assert_eq!(plain_layer.digest, plain_layer.diff_id);
    let out = run(Command::new("sha256sum").arg(
        plain
            .layout
            .join("blobs/sha256")
            .join(&plain_layer.digest[7..]),
    ));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&plain_layer.digest[7..]));

    let many = images::many_files_image(&imgs, 1234);
    let expected_many = many.expected_tree();
    let files = expected_many
        .entries
        .values()
        .filter(|e| e.path.starts_with("many/") && e.kind == Kind::File)
        .count();
    assert_eq!(files, 1234);
    assert_eq!(
        expected_many.get("many/d01/d2/f001233").unwrap().sha256,
        Some(sha256_digest(b"file 1233\n"))
    );

    let reg = Registry::start(&tmp.path().join("reg"), RegistryOptions::default());
    assert_eq!(
        images::push(&big, &reg, "big:latest", &PushOptions::default()).manifest_digest,
        big.manifest_digest
    );
    assert_eq!(
        images::push(&many, &reg, "many:latest", &PushOptions::default()).manifest_digest,
        many.manifest_digest
    );
    // The big blob as served is the one written.
    let (code, body) = {
        let out = try_run(
            Command::new("curl")
                .args(["-sS", "-f"])
                .arg(reg.url(&format!("/v2/big/blobs/{}", layer.digest))),
        );
        (out.status.code(), out.stdout)
    };
    assert_eq!(code, Some(0));
    assert_eq!(format!("sha256:{:x}", Sha256::digest(&body)), layer.digest);

    let rootfs = umoci_unpack(&big, &tmp.path().join("bundle-big"));
    expected.assert_matches(&images::scan_tree(&rootfs));
    let rootfs = umoci_unpack(&many, &tmp.path().join("bundle-many"));
    expected_many.assert_matches(&images::scan_tree(&rootfs));
}

#[test]
fn docker_save_tarball_keeps_the_image_id() {
    let tmp = tempfile::tempdir().unwrap();
    let bb = images::busybox_image(&tmp.path().join("images"));
    let file =
        images::docker_save_tarball(&bb, &tmp.path().join("busybox.tar"), "frakti/busybox:1.0");
    let mut archive = tar::Archive::new(std::fs::File::open(&file).unwrap());
    let mut manifest = None;
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        if name == "manifest.json" {
            let mut s = String::new();
            entry.read_to_string(&mut s).unwrap();
            manifest = Some(serde_json::from_str::<serde_json::Value>(&s).unwrap());
        }
        names.push(name);
    }
    let manifest = manifest.unwrap_or_else(|| panic!("no manifest.json in {names:?}"));
    let config = manifest[0]["Config"].as_str().unwrap();
    assert!(
        config.contains(&bb.config_digest()[7..]),
        "Config {config} is not the image id"
    );
    assert!(names.iter().any(|n| n == config));
    let tags = manifest[0]["RepoTags"].to_string();
    assert!(tags.contains("frakti/busybox:1.0"), "RepoTags {tags}");
    assert_eq!(manifest[0]["Layers"].as_array().unwrap().len(), 1);
}

#[test]
fn registry_is_killed_on_drop() {
    let tmp = tempfile::tempdir().unwrap();
    let mut reg = Registry::start(&tmp.path().join("reg"), RegistryOptions::default());
    assert!(reg.is_running());
    let addr: std::net::SocketAddr = reg.host().parse().unwrap();
    std::net::TcpStream::connect(addr).expect("the registry listens");
    assert!(
        reg.log_text().contains("listening on"),
        "log: {}",
        reg.log_text()
    );
    drop(reg);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "registry still listening after drop"
    );
}

#[test]
fn token_registry_takes_tokens_from_the_realm() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = TokenServer::start(&tmp.path().join("token"), USER, PASS);
    let reg = Registry::start(
        &tmp.path().join("reg"),
        RegistryOptions {
            token: Some(tokens.registry_auth()),
            ..Default::default()
        },
    );
    assert_eq!(reg.creds(), Some((USER, PASS)));

    // The Bearer challenge names the realm and service.
    let v2 = reg.url("/v2/");
    let (code, headers, _) = curl(&["-D", "-", "-o", "/dev/null", &v2]);
    assert_eq!(code, 0);
    let challenge = format!(
        "www-authenticate: bearer realm=\"{}\",service=\"{}\"",
        tokens.realm(),
        support::token::SERVICE
    );
    assert!(
        headers.to_ascii_lowercase().contains(&challenge),
        "no bearer challenge in {headers}"
    );

    // The realm: 401 without or with wrong credentials, a token with them.
    let scope = format!(
        "{}?service={}&scope=repository:busybox:pull",
        tokens.realm(),
        support::token::SERVICE
    );
    assert_eq!(http_status(&scope, &[]), (0, "401".to_string()));
    let bad = format!("{USER}:wrong");
    assert_eq!(http_status(&scope, &["-u", &bad]), (0, "401".to_string()));
    let good = format!("{USER}:{PASS}");
    let (_, body, _) = curl(&["-u", &good, &scope]);
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = answer["token"].as_str().unwrap();
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(http_status(&v2, &["-H", &bearer]), (0, "200".to_string()));

    // skopeo speaks the token flow: pushes need the realm's credentials.
    let bb = images::busybox_image(&tmp.path().join("images"));
    let err = images::try_push(
        &bb,
        &reg,
        "busybox:latest",
        &PushOptions {
            creds: Some((USER.into(), "wrong".into())),
            ..Default::default()
        },
    )
    .expect_err("push with wrong creds must fail");
    assert!(
        err.contains("401") || err.to_lowercase().contains("unauthorized"),
        "{err}"
    );
    let before = tokens.granted();
    let pushed = images::push(&bb, &reg, "busybox:latest", &PushOptions::default());
    assert_eq!(pushed.manifest_digest, bb.manifest_digest);
    assert!(
        tokens.granted() > before,
        "the push got its token from the realm"
    );
    reg.inspect_with_creds("busybox:latest", None)
        .expect_err("anonymous pulls are refused");

    // A token minted directly: good for its repository only.
    let manifest = reg.url("/v2/busybox/manifests/latest");
    let accept = format!("Accept: {}", images::MEDIA_TYPE_MANIFEST);
    let own = format!(
        "Authorization: Bearer {}",
        tokens.signer().mint_for("busybox", &["pull"])
    );
    assert_eq!(
        http_status(&manifest, &["-H", &own, "-H", &accept]),
        (0, "200".to_string())
    );
    let other = format!(
        "Authorization: Bearer {}",
        tokens.signer().mint_for("other", &["pull"])
    );
    assert_eq!(
        http_status(&manifest, &["-H", &other, "-H", &accept]),
        (0, "401".to_string())
    );
}
