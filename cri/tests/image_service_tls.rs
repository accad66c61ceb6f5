//! The CRI ImageService of a real `frakti daemon` against TLS registries on
//! 127.0.0.1 (Debian's docker-registry): a CA, skip_verify, htpasswd and
//! token (Bearer) auth and their failures, and client certificates (mTLS).
//! Runs as root.

mod image_daemon;
mod support;

use image_daemon::*;
use k8s_cri::v1 as cri;
use support::images::{self, PushOptions};
use support::pki::TestCa;
use support::registry::{Registry, RegistryOptions};
use support::token::TokenServer;

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_a_ca_and_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&tmp.path().join("pki"));
    let registry = Registry::start(
        &tmp.path().join("reg"),
        RegistryOptions {
            tls: Some(&ca),
            htpasswd: Some(("frakti", "s3cret")),
            ..Default::default()
        },
    );
    let image = images::busybox_image(&tmp.path().join("img"));
    images::push(
        &image,
        &registry,
        "secure/busybox:1",
        &PushOptions::default(),
    );
    let daemon = Daemon::start(&tmp.path().join("d"));
    let mut c = daemon.client().await;
    let name = format!("{}/secure/busybox:1", registry.host());
    let good = Some(cri::AuthConfig {
        username: "frakti".into(),
        password: "s3cret".into(),
        ..Default::default()
    });
    // No CA configured: the server's certificate is not trusted.
    let err = pull(&mut c, &name, good.clone()).await.unwrap_err();
    assert!(
        err.message()
            .contains(&format!("https://{}/v2: TLS error", registry.host())),
        "{err:?}"
    );
    std::fs::copy(&ca.ca_cert, daemon.dir.join("ca.pem")).unwrap();
    daemon.hosts(
        &registry.host(),
        &format!(
            "server = \"https://{}\"\nca = \"{}\"\n",
            registry.host(),
            daemon.dir.join("ca.pem").display()
        ),
    );
    let bad = Some(cri::AuthConfig {
        username: "frakti".into(),
        password: "wrong".into(),
        ..Default::default()
    });
    let err = pull(&mut c, &name, bad).await.unwrap_err();
    assert!(
        err.message()
            .contains(&format!("https://{}/v2: unauthorized", registry.host())),
        "{err:?}"
    );
    assert!(
        !err.message().contains("wrong"),
        "the password leaked: {err:?}"
    );
    let id = pull(&mut c, &name, good.clone())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", daemon.log()));
    assert_eq!(id, image.config_digest());
    // skip_verify instead of the CA: the handshake is not checked.
    images::push(
        &image,
        &registry,
        "secure/busybox:2",
        &PushOptions::default(),
    );
    daemon.hosts(
        &registry.host(),
        &format!(
            "server = \"https://{}\"\nskip_verify = true\n",
            registry.host()
        ),
    );
    let two = format!("{}/secure/busybox:2", registry.host());
    assert_eq!(pull(&mut c, &two, good).await.unwrap(), id);
    // No AuthConfig: the node's Docker config.json has the credentials
    // (read at each pull).
    images::push(
        &image,
        &registry,
        "secure/busybox:3",
        &PushOptions::default(),
    );
    let three = format!("{}/secure/busybox:3", registry.host());
    let err = pull(&mut c, &three, None).await.unwrap_err();
    assert!(err.message().contains("unauthorized"), "{err:?}");
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "frakti:s3cret");
    std::fs::write(
        daemon.dir.join("docker-config.json"),
        format!(
            "{{\"auths\": {{\"{}\": {{\"auth\": \"{auth}\"}}}}}}",
            registry.host()
        ),
    )
    .unwrap();
    assert_eq!(pull(&mut c, &three, None).await.unwrap(), id);
}

/// Token (Bearer) auth, the Docker Hub flow: the registry answers 401 with
/// a Bearer challenge naming a token server (the realm), which checks the
/// user's credentials and hands out a token for the repository.
#[tokio::test(flavor = "multi_thread")]
async fn token_auth_with_credentials_and_a_registry_token() {
    const PASSWORD: &str = "t0ken-s3cret";
    const WRONG: &str = "not-the-t0ken-s3cret";
    let tmp = tempfile::tempdir().unwrap();
    let tokens = TokenServer::start(&tmp.path().join("token"), "frakti", PASSWORD);
    let registry = Registry::start(
        &tmp.path().join("reg"),
        RegistryOptions {
            token: Some(tokens.registry_auth()),
            ..Default::default()
        },
    );
    let image = images::busybox_image(&tmp.path().join("img"));
    images::push(
        &image,
        &registry,
        "private/busybox:1",
        &PushOptions::default(),
    );
    let daemon = Daemon::start(&tmp.path().join("d"));
    daemon.plain_http(&registry);
    let mut c = daemon.client().await;
    let name = format!("{}/private/busybox:1", registry.host());
    let unauthorized = format!("http://{}/v2: unauthorized", registry.host());

    // User and password: frakti gets a token from the realm.
    let granted = tokens.granted();
    let good = cri::AuthConfig {
        username: "frakti".into(),
        password: PASSWORD.into(),
        ..Default::default()
    };
    let id = pull(&mut c, &name, Some(good))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", daemon.log()));
    assert_eq!(id, image.config_digest());
    assert!(tokens.granted() > granted, "the realm handed out a token");

    // A wrong password: the realm refuses it.
    let asked = tokens.requests();
    let bad = cri::AuthConfig {
        username: "frakti".into(),
        password: WRONG.into(),
        ..Default::default()
    };
    let err = pull(&mut c, &name, Some(bad)).await.unwrap_err();
    assert!(err.message().contains(&unauthorized), "{err:?}");
    assert!(
        !err.message().contains(WRONG),
        "the password leaked: {err:?}"
    );
    assert!(tokens.requests() > asked, "the realm was asked");

    // A registry token (CRI `registry_token`): sent as Bearer as it is,
    // for the manifest and every blob (the image is removed first), without
    // asking the realm.
    c.remove_image(cri::RemoveImageRequest { image: spec(&name) })
        .await
        .unwrap();
    let token = tokens.signer().mint_for("private/busybox", &["pull"]);
    let asked = tokens.requests();
    let with_token = |token: &str| cri::AuthConfig {
        registry_token: token.into(),
        ..Default::default()
    };
    let id = pull(&mut c, &name, Some(with_token(&token)))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", daemon.log()));
    assert_eq!(id, image.config_digest());
    assert_eq!(tokens.requests(), asked, "a registry token needs no realm");
    // A token for another repository does not open this one.
    let other = tokens.signer().mint_for("other/busybox", &["pull"]);
    let err = pull(&mut c, &name, Some(with_token(&other)))
        .await
        .unwrap_err();
    assert!(err.message().contains(&unauthorized), "{err:?}");

    // No credentials at all.
    let err = pull(&mut c, &name, None).await.unwrap_err();
    assert!(err.message().contains(&unauthorized), "{err:?}");
    let log = daemon.log();
    for secret in [PASSWORD, WRONG, &token, &other] {
        assert!(!log.contains(secret), "a secret is in the daemon's log");
    }
}

/// The daemon's listening TCP sockets (`ss`): a forwarder must not outlive
/// its pull.
fn listening_sockets(daemon: &Daemon) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-Hltnp"])
        .output()
        .expect("ss (iproute2)");
    let pid = format!("pid={},", daemon.child.id());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&pid))
        .count()
}

/// A registry that wants a client certificate (mTLS): hosts.toml `client`
/// pairs and the Docker layout (`*.cert` + `*.key`) are presented; none,
/// or one from another CA, fails the handshake with a TLS error.
#[tokio::test(flavor = "multi_thread")]
async fn tls_with_client_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&tmp.path().join("pki"));
    // In skopeo's --cert-dir too: the push presents it.
    let (cert, key) = ca.client_cert("client", true);
    let registry = Registry::start(
        &tmp.path().join("reg"),
        RegistryOptions {
            tls: Some(&ca),
            client_certs: true,
            ..Default::default()
        },
    );
    let image = images::busybox_image(&tmp.path().join("img"));
    for tag in ["1", "2"] {
        images::push(
            &image,
            &registry,
            &format!("mtls/busybox:{tag}"),
            &PushOptions::default(),
        );
    }
    let daemon = Daemon::start(&tmp.path().join("d"));
    let mut c = daemon.client().await;
    let host = registry.host();
    let name = format!("{host}/mtls/busybox:1");
    let listening = listening_sockets(&daemon);
    let with_client = |client: &str| {
        format!(
            "server = \"https://{host}\"\nca = \"{}\"\n{client}",
            ca.ca_cert.display()
        )
    };

    // The CA alone: the registry wants a certificate.
    daemon.hosts(&host, &with_client(""));
    let err = pull(&mut c, &name, None).await.unwrap_err();
    assert!(err.message().contains("TLS error"), "{err:?}");
    // A certificate from another CA: refused in the handshake.
    let other = TestCa::new(&tmp.path().join("other"));
    let (bad_cert, bad_key) = other.client_cert("intruder", false);
    daemon.hosts(
        &host,
        &with_client(&format!(
            "client = [[\"{}\", \"{}\"]]\n",
            bad_cert.display(),
            bad_key.display()
        )),
    );
    let err = pull(&mut c, &name, None).await.unwrap_err();
    assert!(
        err.message().contains("TLS error")
            && err.message().contains(&format!("https://{host}/v2")),
        "{err:?}"
    );
    // A key that is not one: named in the error.
    daemon.hosts(
        &host,
        &with_client(&format!(
            "client = [[\"{}\", \"{}\"]]\n",
            cert.display(),
            ca.ca_cert.display()
        )),
    );
    let err = pull(&mut c, &name, None).await.unwrap_err();
    assert!(err.message().contains("client certificate"), "{err:?}");

    // The right pair in hosts.toml: pulled.
    daemon.hosts(
        &host,
        &with_client(&format!(
            "client = [[\"{}\", \"{}\"]]\n",
            cert.display(),
            key.display()
        )),
    );
    let id = pull(&mut c, &name, None)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", daemon.log()));
    assert_eq!(id, image.config_digest());

    // Docker's layout: ca.crt, client.cert and client.key in the host's
    // directory, no hosts.toml.
    let dir = daemon.dir.join("certs.d").join(&host);
    std::fs::remove_file(dir.join("hosts.toml")).unwrap();
    std::fs::copy(&ca.ca_cert, dir.join("ca.crt")).unwrap();
    std::fs::copy(&cert, dir.join("client.cert")).unwrap();
    std::fs::copy(&key, dir.join("client.key")).unwrap();
    let two = format!("{host}/mtls/busybox:2");
    assert_eq!(pull(&mut c, &two, None).await.unwrap(), id);

    // Every forwarder stopped with its pull.
    assert_eq!(
        listening_sockets(&daemon),
        listening,
        "a forwarder outlived its pull"
    );
}
