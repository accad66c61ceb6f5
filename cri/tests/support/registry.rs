//! A real OCI registry (`docker-registry serve`, distribution 2.8, Debian
//! package `docker-registry`) on 127.0.0.1, one process per [`Registry`],
//! storing its blobs under the directory it is given. Dropping the
//! [`Registry`] (also while a failing test unwinds) kills the process.
//!
//! Files under the registry's directory: `config.yml`, `registry.log` (its
//! stdout and stderr, shown in panics), `htpasswd` and `storage/`.
//!
//! Auth is htpasswd (HTTP Basic) or token (Bearer, with a
//! [`super::token::TokenServer`] as the realm), never both: distribution
//! accepts one auth provider.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::pki::TestCa;
use super::{require_tool, run, try_run};

/// How to start a [`Registry`].
#[derive(Debug, Clone, Copy, Default)]
pub struct RegistryOptions<'a> {
    /// Serve HTTPS with this CA's server certificate (else plain HTTP).
    pub tls: Option<&'a TestCa>,
    /// Require HTTP basic auth with this one (user, password).
    pub htpasswd: Option<(&'a str, &'a str)>,
    /// Require Bearer tokens from a token server (`auth: token:`).
    pub token: Option<TokenAuth<'a>>,
    /// With `tls`: require a client certificate signed by that CA (mTLS).
    pub client_certs: bool,
}

/// The registry's `auth: token:` settings.
#[derive(Debug, Clone, Copy)]
pub struct TokenAuth<'a> {
    /// Where clients get tokens, e.g. "http://127.0.0.1:PORT/token".
    pub realm: &'a str,
    /// The `service` of the challenge; tokens must name it as `aud`.
    pub service: &'a str,
    /// The `iss` the registry trusts.
    pub issuer: &'a str,
    /// PEM certificates the tokens' `x5c` chains must verify against.
    pub root_cert_bundle: &'a Path,
    /// The (user, password) the realm takes: [`Registry::creds`], so
    /// pushes and inspects (skopeo speaks the token flow) work.
    pub creds: (&'a str, &'a str),
}

/// The realm the registry names in its `WWW-Authenticate` challenge.
pub const REALM: &str = "frakti-test";

/// A running `docker-registry` process.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    creds: Option<(String, String)>,
    ca: Option<TestCa>,
}

/// A manifest (or index) as the registry serves it.
#[derive(Debug, Clone)]
pub struct RawManifest {
    /// The exact bytes served.
    pub bytes: Vec<u8>,
    /// `sha256:` digest of `bytes`: the digest a pull by tag resolves to.
    pub digest: String,
    /// The parsed JSON.
    pub json: serde_json::Value,
    /// Its `mediaType` field ("" if absent).
    pub media_type: String,
}

impl Registry {
    /// Starts a registry storing under `dir` (created if missing) on a free
    /// port of 127.0.0.1, and waits (up to 30 s) until `GET /v2/` answers.
    /// Panics, with the registry's log, if it does not come up; panics naming
    /// the package if `docker-registry` is not installed.
    pub fn start(dir: &Path, opts: RegistryOptions<'_>) -> Registry {
        require_tool("docker-registry", "docker-registry");
        assert!(
            opts.htpasswd.is_none() || opts.token.is_none(),
            "distribution takes one auth provider: htpasswd or token"
        );
        std::fs::create_dir_all(dir.join("storage")).expect("create the registry directory");
        let htpasswd = opts.htpasswd.map(|(user, pass)| {
            let path = dir.join("htpasswd");
            // distribution's htpasswd accepts only bcrypt; cost 4 keeps the
            // registry's per-request check fast.
            let hash = bcrypt::hash_with_salt(pass, 4, *b"frakti-test-salt")
                .expect("bcrypt")
                .format_for_version(bcrypt::Version::TwoA);
            std::fs::write(&path, format!("{user}:{hash}\n")).expect("write htpasswd");
            path
        });
        let log = dir.join("registry.log");

        let mut last_failure = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let config = dir.join("config.yml");
            std::fs::write(&config, config_yaml(dir, port, &opts, htpasswd.as_deref()))
                .expect("write config.yml");
            let logf = std::fs::File::create(&log).expect("create registry.log");
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .env_remove("REGISTRY_HTTP_ADDR")
                .stdin(Stdio::null())
                .stdout(logf.try_clone().expect("dup log fd"))
                .stderr(logf)
                .spawn()
                .expect("spawn docker-registry");
            let mut reg = Registry {
                child,
                port,
                dir: dir.to_path_buf(),
                log: log.clone(),
                creds: opts
                    .htpasswd
                    .or(opts.token.map(|t| t.creds))
                    .map(|(u, p)| (u.to_string(), p.to_string())),
                ca: opts.tls.cloned(),
            };
            match reg.wait_ready(Duration::from_secs(30)) {
                Ok(()) => return reg,
                Err(e) => {
                    let text = reg.log_text();
                    // `reg` is dropped here: the process is killed.
                    if text.contains("address already in use") {
                        last_failure = format!("{e}\n--- registry.log:\n{text}");
                        continue; // someone took the port between probe and bind
                    }
                    panic!(
                        "registry did not start: {e}\n--- {}:\n{text}",
                        log.display()
                    );
                }
            }
        }
        panic!("registry did not start after 5 ports: {last_failure}");
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("docker-registry exited: {status}"));
            }
            match probe_v2(self.port) {
                Some(code) if code == 200 || code == 401 => return Ok(()),
                // Plain HTTP to the TLS port: Go answers 400 "Client sent an
                // HTTP request to an HTTPS server", so the server is serving.
                Some(400) if self.ca.is_some() => return Ok(()),
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "GET /v2/ on port {} did not answer in {timeout:?}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// "127.0.0.1:PORT": the registry part of an image reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// "http" or "https".
    pub fn scheme(&self) -> &'static str {
        if self.ca.is_some() { "https" } else { "http" }
    }

    /// The URL of `path` on this registry, e.g. `url("/v2/")`.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme(), self.host(), path)
    }

    /// "HOST/REPO_AND_TAG": a full image reference on this registry, e.g.
    /// `reference("busybox:latest")`.
    pub fn reference(&self, name: &str) -> String {
        format!("{}/{name}", self.host())
    }

    /// The (user, password) the registry requires, if any.
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The CA that signed the registry's certificate, if it serves TLS.
    pub fn ca(&self) -> Option<&TestCa> {
        self.ca.as_ref()
    }

    /// The registry's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The registry's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// skopeo options to reach this registry as the *source* of a command
    /// (`inspect`, or `copy`'s source): TLS through the CA's cert dir
    /// (verified), or plain HTTP; the registry's creds if any.
    pub fn skopeo_src_args(&self) -> Vec<String> {
        self.skopeo_args("src-", self.creds())
    }

    /// skopeo options to reach this registry as the *destination* of a
    /// `copy`, with `creds` (None: anonymous).
    pub fn skopeo_dest_args(&self, creds: Option<(&str, &str)>) -> Vec<String> {
        self.skopeo_args("dest-", creds)
    }

    /// skopeo options with a prefix: "" for `inspect`, "src-"/"dest-" for
    /// `copy`.
    pub fn skopeo_args(&self, prefix: &str, creds: Option<(&str, &str)>) -> Vec<String> {
        let mut args = Vec::new();
        match &self.ca {
            Some(ca) => {
                args.push(format!("--{prefix}tls-verify=true"));
                args.push(format!("--{prefix}cert-dir={}", ca.cert_dir.display()));
            }
            None => args.push(format!("--{prefix}tls-verify=false")),
        }
        match creds {
            Some((u, p)) => args.push(format!("--{prefix}creds={u}:{p}")),
            None => args.push(format!("--{prefix}no-creds")),
        }
        args
    }

    /// The manifest or index that `name` ("repo:tag" or "repo@sha256:...")
    /// resolves to, fetched with `skopeo inspect --raw` (with the registry's
    /// creds and CA). Panics if it cannot be fetched.
    pub fn manifest(&self, name: &str) -> RawManifest {
        let out = run(self.skopeo_inspect(name).arg("--raw"));
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("manifest is not JSON");
        RawManifest {
            digest: sha256_digest(&out.stdout),
            media_type: json["mediaType"].as_str().unwrap_or("").to_string(),
            json,
            bytes: out.stdout,
        }
    }

    /// The image config blob of `name` (for an index: the host platform's),
    /// via `skopeo inspect --config --raw`, and its digest.
    pub fn config(&self, name: &str) -> (String, serde_json::Value) {
        let out = run(self.skopeo_inspect(name).args(["--config", "--raw"]));
        let json = serde_json::from_slice(&out.stdout).expect("config is not JSON");
        (sha256_digest(&out.stdout), json)
    }

    /// `skopeo inspect` on `name` with this registry's TLS settings and
    /// creds, not yet run: add arguments, then [`run`] or [`try_run`] it.
    pub fn skopeo_inspect(&self, name: &str) -> Command {
        let mut cmd = skopeo();
        cmd.arg("inspect")
            .args(self.skopeo_args("", self.creds()))
            .arg(format!("docker://{}", self.reference(name)));
        cmd
    }

    /// Whether `skopeo inspect` of `name` succeeds with `creds` (None:
    /// anonymous); returns skopeo's stderr on failure.
    pub fn inspect_with_creds(
        &self,
        name: &str,
        creds: Option<(&str, &str)>,
    ) -> Result<(), String> {
        let mut cmd = skopeo();
        cmd.arg("inspect")
            .args(self.skopeo_args("", creds))
            .arg("--raw")
            .arg(format!("docker://{}", self.reference(name)));
        let out = try_run(&mut cmd);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `skopeo` command with the global options the support uses (no signature
/// policy needed), panicking with the package name if skopeo is missing.
pub fn skopeo() -> Command {
    require_tool("skopeo", "skopeo");
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy");
    cmd
}

/// "sha256:<hex>" of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn free_port() -> u16 {
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind port 0");
    l.local_addr().expect("local_addr").port()
}

/// Sends `GET /v2/` over plain HTTP and returns the status code, if any.
fn probe_v2(port: u16) -> Option<u16> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => break,
        }
        if buf[..n].contains(&b'\n') {
            break;
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    // "HTTP/1.1 401 Unauthorized"
    line.split_whitespace().nth(1)?.parse().ok()
}

fn config_yaml(
    dir: &Path,
    port: u16,
    opts: &RegistryOptions<'_>,
    htpasswd: Option<&Path>,
) -> String {
    let q = |p: &Path| serde_json::to_string(&p.display().to_string()).expect("quote path");
    let mut y = format!(
        "version: 0.1\n\
         log:\n  level: info\n  formatter: text\n  fields:\n    service: frakti-test-registry\n\
         storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
         maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: frakti-test-registry-secret\n",
        storage = q(&dir.join("storage")),
    );
    if let Some(ca) = opts.tls {
        y.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            q(&ca.server_cert),
            q(&ca.server_key)
        ));
        if opts.client_certs {
            y.push_str(&format!("    clientcas:\n      - {}\n", q(&ca.ca_cert)));
        }
    }
    if let Some(path) = htpasswd {
        y.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: {REALM}\n    path: {}\n",
            q(path)
        ));
    }
    if let Some(token) = &opts.token {
        y.push_str(&token_yaml(token));
    }
    y
}

fn token_yaml(token: &TokenAuth<'_>) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("quote a string");
    format!(
        "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    \
         rootcertbundle: {}\n",
        q(token.realm),
        q(token.service),
        q(token.issuer),
        q(&token.root_cert_bundle.display().to_string())
    )
}
