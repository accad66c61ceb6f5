//! Unit tests for `hosts`.

use super::*;

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
    fs::write(path, text).expect("write");
}

fn urls(eps: &[Endpoint]) -> Vec<String> {
    eps.iter().map(Endpoint::url).collect()
}

fn config_error(root: &Path, registry: &str) -> String {
    match endpoints(root, registry) {
        Err(e @ Error::Config { .. }) => e.to_string(),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn no_config_is_https_upstream() {
    let root = tempfile::tempdir().expect("tempdir");
    let eps = endpoints(root.path(), "registry.k8s.io").expect("endpoints");
    assert_eq!(eps, vec![Endpoint::upstream("registry.k8s.io")]);
    assert_eq!(eps[0].url(), "https://registry.k8s.io/v2");
    assert!(!eps[0].mirror && eps[0].capabilities == Capabilities::ALL);
    // A missing certs dir is no configuration.
    let eps = endpoints(&root.path().join("absent"), "quay.io").expect("endpoints");
    assert_eq!(urls(&eps), ["https://quay.io/v2"]);
}

#[test]
fn docker_io_upstream_is_registry_1() {
    let root = tempfile::tempdir().expect("tempdir");
    let eps = endpoints(root.path(), "docker.io").expect("endpoints");
    assert_eq!(urls(&eps), ["https://registry-1.docker.io/v2"]);
}

#[test]
fn loopback_defaults_to_https() {
    let root = tempfile::tempdir().expect("tempdir");
    for registry in [
        "localhost",
        "localhost:5000",
        "127.0.0.1:5000",
        "[::1]",
        "[::1]:5000",
    ] {
        let eps = endpoints(root.path(), registry).expect("endpoints");
        assert_eq!(urls(&eps), [format!("https://{registry}/v2")]);
        assert!(!eps[0].skip_verify);
    }
}

#[test]
fn mirrors_in_file_order_then_server() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "docker.io/hosts.toml",
        r#"
server = "https://registry-1.docker.io"
[host."https://zz.example"]
  capabilities = ["pull"]
[host."http://aa.example:5000"]
[host."mm.example"]
  capabilities = ["pull", "resolve"]
[host."https://zz.example".header]
  x-late = "subtable after others"
"#,
    );
    let eps = endpoints(root.path(), "docker.io").expect("endpoints");
    assert_eq!(
        urls(&eps),
        [
            "https://zz.example/v2",
            "http://aa.example:5000/v2",
            "https://mm.example/v2",
            "https://registry-1.docker.io/v2",
        ]
    );
    assert_eq!(
        eps.iter().map(|e| e.mirror).collect::<Vec<_>>(),
        [true, true, true, false]
    );
    assert_eq!(
        eps[0].headers,
        [("x-late".to_string(), "subtable after others".to_string())]
    );
    assert_eq!(eps[1].scheme, Scheme::Http);
}

#[test]
fn mirrors_then_default_upstream_without_server() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "docker.io/hosts.toml",
        "[host.\"https://mirror.internal\"]\n",
    );
    let eps = endpoints(root.path(), "docker.io").expect("endpoints");
    assert_eq!(
        urls(&eps),
        [
            "https://mirror.internal/v2",
            "https://registry-1.docker.io/v2"
        ]
    );
}

#[test]
fn dotted_keys_and_inline_tables_keep_order() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "quay.io/hosts.toml",
        r#"host."https://b.example".capabilities = ["pull"]
host."https://a.example" = { skip_verify = true }
"#,
    );
    let eps = endpoints(root.path(), "quay.io").expect("endpoints");
    assert_eq!(
        urls(&eps),
        [
            "https://b.example/v2",
            "https://a.example/v2",
            "https://quay.io/v2"
        ]
    );
    assert!(eps[1].skip_verify);
}

#[test]
fn server_only_replaces_upstream() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "_default/hosts.toml",
        "server = \"http://127.0.0.1:5000\"\n",
    );
    let eps = endpoints(root.path(), "ghcr.io").expect("endpoints");
    assert_eq!(urls(&eps), ["http://127.0.0.1:5000/v2"]);
    assert!(!eps[0].mirror);
}

#[test]
fn api_paths() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "r.example/hosts.toml",
        r#"
server = "https://r.example/"
[host."https://a.example/v2"]
[host."https://b.example/prefix/"]
[host."https://c.example/v2/upstream"]
  override_path = true
[host."https://d.example"]
  override_path = true
[host."https://e.example//x/./y/../v2"]
"#,
    );
    let eps = endpoints(root.path(), "r.example").expect("endpoints");
    assert_eq!(
        urls(&eps),
        [
            "https://a.example/v2",
            "https://b.example/prefix/v2",
            "https://c.example/v2/upstream",
            "https://d.example",
            "https://e.example/x/v2",
            "https://r.example/v2",
        ]
    );
    assert_eq!(eps[2].path, "/v2/upstream");
}

#[test]
fn capabilities_parsed() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "r.example/hosts.toml",
        r#"
server = "https://r.example"
capabilities = ["resolve"]
[host."https://a.example"]
  capabilities = ["pull"]
[host."https://b.example"]
  capabilities = ["Pull", "RESOLVE", "push"]
[host."https://c.example"]
  capabilities = ["push"]
[host."https://d.example"]
  capabilities = []
"#,
    );
    let eps = endpoints(root.path(), "r.example").expect("endpoints");
    let caps: Vec<_> = eps
        .iter()
        .map(|e| (e.capabilities.pull, e.capabilities.resolve))
        .collect();
    assert_eq!(
        caps,
        [
            (true, false),
            (true, true),
            (false, false),
            (true, true),
            (false, true)
        ]
    );
}

#[test]
fn top_level_fields_apply_to_server() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "r.example/hosts.toml",
        r#"
server = "https://r.example"
skip_verify = true
ca = "ca.pem"
[header]
  x-a = "1"
[host."https://m.example"]
"#,
    );
    let dir = root.path().join("r.example");
    let eps = endpoints(root.path(), "r.example").expect("endpoints");
    assert!(!eps[0].skip_verify && eps[0].ca.is_empty() && eps[0].headers.is_empty());
    assert!(eps[1].skip_verify);
    assert_eq!(eps[1].ca, [dir.join("ca.pem")]);
    assert_eq!(eps[1].headers, [("x-a".to_string(), "1".to_string())]);
}

#[test]
fn top_level_fields_apply_to_default_upstream() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "docker.io/hosts.toml",
        "skip_verify = true\ncapabilities = [\"pull\"]\noverride_path = true\nca = \"/abs/ca.pem\"\n",
    );
    let eps = endpoints(root.path(), "docker.io").expect("endpoints");
    assert_eq!(urls(&eps), ["https://registry-1.docker.io/v2"]);
    assert!(eps[0].skip_verify);
    assert_eq!(eps[0].ca, [PathBuf::from("/abs/ca.pem")]);
    // containerd keeps the default upstream's full capabilities.
    assert_eq!(eps[0].capabilities, Capabilities::ALL);
}

#[test]
fn ca_and_client_paths() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "r.example/hosts.toml",
        r#"
[host."https://a.example"]
  ca = ["a.pem", "/etc/ssl/b.pem", "sub/c.pem"]
  client = "client.pem"
[host."https://b.example"]
  client = ["c1.pem", "/abs/c2.pem"]
[host."https://c.example"]
  client = [["c.cert", "c.key"], ["/abs/both.pem", ""]]
"#,
    );
    let dir = root.path().join("r.example");
    let eps = endpoints(root.path(), "r.example").expect("endpoints");
    assert_eq!(
        eps[0].ca,
        [
            dir.join("a.pem"),
            PathBuf::from("/etc/ssl/b.pem"),
            dir.join("sub/c.pem")
        ]
    );
    assert_eq!(eps[0].client, [(dir.join("client.pem"), None)]);
    assert_eq!(
        eps[1].client,
        [
            (dir.join("c1.pem"), None),
            (PathBuf::from("/abs/c2.pem"), None)
        ]
    );
    assert_eq!(
        eps[2].client,
        [
            (dir.join("c.cert"), Some(dir.join("c.key"))),
            (PathBuf::from("/abs/both.pem"), None)
        ]
    );
}

#[test]
fn headers_strings_and_arrays() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "r.example/hosts.toml",
        r#"
[host."https://a.example".header]
  x-one = "1"
  x-many = ["a", "b"]
"#,
    );
    let eps = endpoints(root.path(), "r.example").expect("endpoints");
    let h = |n: &str, v: &str| (n.to_string(), v.to_string());
    assert_eq!(
        eps[0].headers,
        [h("x-one", "1"), h("x-many", "a"), h("x-many", "b")]
    );
}

#[test]
fn host_dir_lookup_order() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "_default/hosts.toml",
        "server = \"https://default.example\"\n",
    );
    let eps = endpoints(root.path(), "quay.io").expect("endpoints");
    assert_eq!(urls(&eps), ["https://default.example/v2"]);

    write(
        root.path(),
        "127.0.0.1:5000/hosts.toml",
        "server = \"http://colon.example\"\n",
    );
    let eps = endpoints(root.path(), "127.0.0.1:5000").expect("endpoints");
    assert_eq!(urls(&eps), ["http://colon.example/v2"]);

    // The underscore spelling wins over the colon one.
    write(
        root.path(),
        "127.0.0.1_5000_/hosts.toml",
        "server = \"http://under.example\"\n",
    );
    let eps = endpoints(root.path(), "127.0.0.1:5000").expect("endpoints");
    assert_eq!(urls(&eps), ["http://under.example/v2"]);

    write(
        root.path(),
        "[::1]_5000_/hosts.toml",
        "server = \"http://v6.example\"\n",
    );
    let eps = endpoints(root.path(), "[::1]:5000").expect("endpoints");
    assert_eq!(urls(&eps), ["http://v6.example/v2"]);
}

#[test]
fn host_dir_without_hosts_toml_hides_default() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "_default/hosts.toml",
        "server = \"https://default.example\"\n",
    );
    fs::create_dir(root.path().join("quay.io")).expect("mkdir");
    let eps = endpoints(root.path(), "quay.io").expect("endpoints");
    assert_eq!(eps, [Endpoint::upstream("quay.io")]);
}

#[test]
fn legacy_cert_files() {
    let root = tempfile::tempdir().expect("tempdir");
    for name in [
        "b.crt",
        "a.crt",
        "client.cert",
        "client.key",
        "lone.cert",
        "notes.txt",
    ] {
        write(root.path(), &format!("r.example:5443/{name}"), "x");
    }
    fs::create_dir(root.path().join("r.example:5443/dir.crt")).expect("mkdir");
    let dir = root.path().join("r.example:5443");
    let eps = endpoints(root.path(), "r.example:5443").expect("endpoints");
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].url(), "https://r.example:5443/v2");
    assert_eq!(eps[0].ca, [dir.join("a.crt"), dir.join("b.crt")]);
    assert_eq!(
        eps[0].client,
        [
            (dir.join("client.cert"), Some(dir.join("client.key"))),
            (dir.join("lone.cert"), None)
        ]
    );
    // An empty hosts.toml keeps the legacy reading (as containerd).
    write(root.path(), "r.example:5443/hosts.toml", "");
    let again = endpoints(root.path(), "r.example:5443").expect("endpoints");
    assert_eq!(again, eps);
}

#[test]
fn changes_apply_on_next_call() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "quay.io/hosts.toml",
        "server = \"https://one.example\"\n",
    );
    assert_eq!(
        urls(&endpoints(root.path(), "quay.io").expect("a")),
        ["https://one.example/v2"]
    );
    write(
        root.path(),
        "quay.io/hosts.toml",
        "server = \"https://two.example\"\n",
    );
    assert_eq!(
        urls(&endpoints(root.path(), "quay.io").expect("b")),
        ["https://two.example/v2"]
    );
}

#[test]
fn malformed_toml_names_file_and_line_not_content() {
    let root = tempfile::tempdir().expect("tempdir");
    write(
        root.path(),
        "quay.io/hosts.toml",
        "[header]\nauthorization = \"Basic s3cret\n",
    );
    let msg = config_error(root.path(), "quay.io");
    assert!(
        msg.contains("quay.io/hosts.toml") && msg.contains("line 2"),
        "{msg}"
    );
    assert!(!msg.contains("s3cret"), "{msg}");
}

#[test]
fn bad_urls_are_errors() {
    let cases = [
        ("server = \"ftp://r.example\"", "unknown scheme \"ftp\""),
        ("server = \"https://\"", "invalid host"),
        ("server = \"https://u:p@r.example\"", "user info"),
        ("server = \"https://r.example/v2?x=1\"", "query"),
        ("server = \"https://r.example:99999\"", "invalid host"),
        ("server = 5", "server: expected a string"),
        (
            "[host.\"gopher://m.example\"]",
            "host \"gopher://m.example\": unknown scheme",
        ),
    ];
    for (text, want) in cases {
        let root = tempfile::tempdir().expect("tempdir");
        write(root.path(), "quay.io/hosts.toml", text);
        let msg = config_error(root.path(), "quay.io");
        assert!(
            msg.contains("hosts.toml") && msg.contains(want),
            "{text}: {msg}"
        );
    }
}

#[test]
fn bad_fields_are_errors() {
    let cases = [
        (
            "capabilities = [\"pull\", \"fly\"]",
            "capabilities: unknown \"fly\"",
        ),
        ("capabilities = \"pull\"", "capabilities: expected"),
        ("skip_verify = \"yes\"", "skip_verify: expected"),
        ("ca = 1", "ca: expected"),
        ("ca = \"\"", "ca: empty path"),
        ("client = [[\"a\", \"b\", \"c\"]]", "client: expected"),
        ("client = [1]", "client: expected"),
        ("header = \"x\"", "header: expected a table"),
        ("[header]\n\"bad name\" = \"v\"", "invalid name"),
        ("[header]\nx-a = \"v\\r\\nx-b: injected\"", "invalid value"),
        ("[header]\nx-a = 1", "expected a string"),
        ("host = 1", "host: expected"),
        (
            "[host.\"https://m.example\"]\nca = 1",
            "host \"https://m.example\": ca: expected",
        ),
    ];
    for (text, want) in cases {
        let root = tempfile::tempdir().expect("tempdir");
        write(root.path(), "quay.io/hosts.toml", text);
        let msg = config_error(root.path(), "quay.io");
        assert!(msg.contains(want), "{text}: {msg}");
    }
}

#[test]
fn refuses_path_like_registries() {
    let root = tempfile::tempdir().expect("tempdir");
    for registry in [
        "", ".", ".hidden", "..", "a/b", "../etc", "a..b", "r\0x", "a\\b", "a b", "h:port", "h:",
    ] {
        assert!(
            matches!(endpoints(root.path(), registry), Err(Error::Registry(_))),
            "{registry:?}"
        );
    }
}

#[test]
fn url_parsing() {
    let url = |s| parse_url(s).expect("url");
    assert_eq!(
        url("mirror.example:5000/a"),
        Url {
            scheme: Scheme::Https,
            host: "mirror.example:5000".to_string(),
            path: "/a".to_string()
        }
    );
    assert_eq!(url("HTTP://[::1]:5000").scheme, Scheme::Http);
    assert_eq!(url("http://[::1]:5000").host, "[::1]:5000");
    assert!(parse_url("https://[zz]:1").is_err());
    assert!(parse_url("https://a b").is_err());
}
