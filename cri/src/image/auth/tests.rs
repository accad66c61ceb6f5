//! Unit tests for `auth`.

use super::*;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn basic(u: &str, p: &str) -> Credential {
    Credential::Basic {
        username: u.to_string(),
        password: p.to_string(),
    }
}

/// A config.json in a temp dir; keep the dir alive while using the path.
fn config(json: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.json");
    fs::write(&path, json).expect("write");
    (dir, path)
}

fn from_file(json: &str, registry: &str) -> Result<Credential, Error> {
    let (_dir, path) = config(json);
    credential(None, Some(&path), registry)
}

#[test]
fn request_wins_over_config() {
    let (_dir, path) = config(&format!(
        r#"{{"auths": {{"quay.io": {{"auth": "{}"}}}}}}"#,
        b64("node:nodepw")
    ));
    let req = RequestAuth {
        username: "pod".into(),
        password: "podpw".into(),
        ..Default::default()
    };
    let got = credential(Some(&req), Some(&path), "quay.io").expect("credential");
    assert_eq!(got, basic("pod", "podpw"));
    // An empty AuthConfig (or a password alone) falls back to the node.
    for req in [
        RequestAuth::default(),
        RequestAuth {
            password: "x".into(),
            ..Default::default()
        },
    ] {
        let got = credential(Some(&req), Some(&path), "quay.io").expect("credential");
        assert_eq!(got, basic("node", "nodepw"));
    }
}

#[test]
fn request_auth_field_decoded() {
    for encoded in [
        b64("user:pa:ss"),
        b64("user:pa:ss").trim_end_matches('=').to_string(),
    ] {
        let req = RequestAuth {
            auth: encoded,
            ..Default::default()
        };
        let got = credential(Some(&req), None, "quay.io").expect("credential");
        assert_eq!(got, basic("user", "pa:ss"));
    }
    let req = RequestAuth {
        auth: b64("user:pw\0\0"),
        ..Default::default()
    };
    assert_eq!(
        credential(Some(&req), None, "r").expect("nul"),
        basic("user", "pw")
    );
}

#[test]
fn request_tokens() {
    let req = RequestAuth {
        identity_token: "idtok".into(),
        auth: b64("user:"),
        ..Default::default()
    };
    let got = credential(Some(&req), None, "r.example").expect("credential");
    assert_eq!(got, Credential::Bearer("idtok".into()));
    let req = RequestAuth {
        registry_token: "regtok".into(),
        identity_token: "idtok".into(),
        ..Default::default()
    };
    let got = credential(Some(&req), None, "r.example").expect("credential");
    assert_eq!(got, Credential::Bearer("regtok".into()));
}

#[test]
fn malformed_request_auth_hides_secret() {
    for (auth, want) in [
        ("!!not-base64-s3cret!!".to_string(), "not valid base64"),
        (b64("s3cretwithoutcolon"), "no ':'"),
    ] {
        let req = RequestAuth {
            auth: auth.clone(),
            ..Default::default()
        };
        let err = credential(Some(&req), None, "quay.io").expect_err("malformed");
        let msg = err.to_string();
        assert!(msg.contains("quay.io") && msg.contains(want), "{msg}");
        assert!(!msg.contains("s3cret") && !msg.contains(&auth), "{msg}");
    }
}

#[test]
fn config_by_host_key() {
    let json = format!(
        r#"{{"auths": {{"quay.io": {{"auth": "{}"}}, "127.0.0.1:5443": {{"username": "u", "password": "p"}}}}}}"#,
        b64("q:qpw")
    );
    assert_eq!(
        from_file(&json, "quay.io").expect("quay"),
        basic("q", "qpw")
    );
    assert_eq!(
        from_file(&json, "127.0.0.1:5443").expect("local"),
        basic("u", "p")
    );
    assert_eq!(
        from_file(&json, "ghcr.io").expect("other"),
        Credential::Anonymous
    );
}

#[test]
fn config_by_url_key() {
    let json = format!(
        r#"{{"auths": {{"https://r.example:5000/v1/": {{"auth": "{}"}}, "http://plain.example": {{"auth": "{}"}}}}}}"#,
        b64("a:1"),
        b64("b:2")
    );
    assert_eq!(
        from_file(&json, "r.example:5000").expect("r"),
        basic("a", "1")
    );
    assert_eq!(
        from_file(&json, "plain.example").expect("plain"),
        basic("b", "2")
    );
    assert_eq!(
        from_file(&json, "r.example").expect("no port"),
        Credential::Anonymous
    );
}

#[test]
fn docker_hub_key() {
    let json = format!(
        r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{}"}}}}}}"#,
        b64("hub:hubpw")
    );
    for registry in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
        assert_eq!(
            from_file(&json, registry).expect(registry),
            basic("hub", "hubpw")
        );
    }
    // A bare "docker.io" key works too.
    let json = format!(
        r#"{{"auths": {{"docker.io": {{"auth": "{}"}}}}}}"#,
        b64("d:dpw")
    );
    assert_eq!(
        from_file(&json, "docker.io").expect("bare"),
        basic("d", "dpw")
    );
}

#[test]
fn config_identity_token() {
    let json = format!(
        r#"{{"auths": {{"r.example": {{"auth": "{}", "identitytoken": "idtok"}}}}}}"#,
        b64("user:")
    );
    assert_eq!(
        from_file(&json, "r.example").expect("id"),
        Credential::Bearer("idtok".into())
    );
}

#[test]
fn missing_or_empty_config_is_anonymous() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.json");
    assert_eq!(
        credential(None, Some(&path), "quay.io").expect("absent"),
        Credential::Anonymous
    );
    assert_eq!(
        from_file("  \n", "quay.io").expect("empty"),
        Credential::Anonymous
    );
    // Empty entries (Docker Desktop leaves `{}` next to a store).
    let json = r#"{"auths": {"quay.io": {}, "r.example": {"auth": ""}}}"#;
    assert_eq!(
        from_file(json, "quay.io").expect("{}"),
        Credential::Anonymous
    );
    assert_eq!(
        from_file(json, "r.example").expect("\"\""),
        Credential::Anonymous
    );
}

#[test]
fn unreadable_config_is_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = credential(None, Some(dir.path()), "quay.io").expect_err("a directory");
    assert!(matches!(err, Error::Read { .. }), "{err}");
    assert!(err.to_string().contains(&dir.path().display().to_string()));
}

#[test]
fn malformed_config_hides_secret() {
    let cases = [
        r#"{"auths": {"quay.io": {"auth": "s3cret"#.to_string(),
        r#"{"auths": {"quay.io": {"auth": 5, "password": "s3cret"}}}"#.to_string(),
        r#"{"auths": "s3cret"}"#.to_string(),
        format!(
            r#"{{"auths": {{"quay.io": {{"auth": "{}"}}}}}}"#,
            b64("s3cret")
        ),
        r#"{"auths": {"quay.io": {"auth": "s3cret!!"}}}"#.to_string(),
    ];
    for json in cases {
        let (_dir, path) = config(&json);
        let err = credential(None, Some(&path), "quay.io").expect_err(&json);
        let msg = err.to_string();
        assert!(msg.contains("config.json"), "{msg}");
        assert!(
            !msg.contains("s3cret") && !msg.contains(&b64("s3cret")),
            "{msg}"
        );
    }
}

#[test]
fn helpers_come_first_and_fail_without_secret() {
    let json = format!(
        r#"{{"credHelpers": {{"quay.io": "frakti-test-absent"}},
            "credsStore": "frakti-test-absent-store",
            "auths": {{"quay.io": {{"auth": "{0}"}}, "ghcr.io": {{"auth": "{0}"}}}}}}"#,
        b64("u:s3cret")
    );
    let err = from_file(&json, "quay.io").expect_err("helper is absent");
    let msg = err.to_string();
    assert!(
        msg.contains("frakti-test-absent") && msg.contains("quay.io"),
        "{msg}"
    );
    assert!(!msg.contains("s3cret"), "{msg}");
    // The auths entry comes before the store.
    assert_eq!(
        from_file(&json, "ghcr.io").expect("auths"),
        basic("u", "s3cret")
    );
    let err = from_file(&json, "r.example").expect_err("store is absent");
    assert!(
        err.to_string().contains("frakti-test-absent-store"),
        "{err}"
    );
}

#[test]
fn helper_names_are_not_paths() {
    let json = r#"{"credsStore": "../../tmp/evil"}"#;
    let err = from_file(json, "quay.io").expect_err("bad name");
    assert!(err.to_string().contains("invalid helper name"), "{err}");
}

#[test]
fn default_path() {
    assert_eq!(
        default_config_path(None),
        PathBuf::from(DEFAULT_DOCKER_CONFIG)
    );
    assert_eq!(
        default_config_path(Some("".into())),
        PathBuf::from(DEFAULT_DOCKER_CONFIG)
    );
    assert_eq!(
        default_config_path(Some("/etc/docker".into())),
        PathBuf::from("/etc/docker/config.json")
    );
}

#[test]
fn registry_auth_and_redaction() {
    let b = basic("u", "s3cret");
    assert_eq!(
        b.to_registry_auth(),
        RegistryAuth::Basic("u".into(), "s3cret".into())
    );
    let t = Credential::Bearer("s3cret".into());
    assert_eq!(t.to_registry_auth(), RegistryAuth::Bearer("s3cret".into()));
    assert_eq!(
        Credential::Anonymous.to_registry_auth(),
        RegistryAuth::Anonymous
    );
    let req = RequestAuth {
        username: "u".into(),
        password: "s3cret".into(),
        auth: "s3cret".into(),
        identity_token: "s3cret".into(),
        registry_token: "s3cret".into(),
    };
    for shown in [format!("{b:?}"), format!("{t:?}"), format!("{req:?}")] {
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
