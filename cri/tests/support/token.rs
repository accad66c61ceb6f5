//! A tiny token server (the Docker Hub "Bearer" flow) for a
//! [`super::registry::Registry`] started with token auth: the registry
//! answers 401 with `WWW-Authenticate: Bearer realm=…,service=…,scope=…`,
//! the client asks the realm (`GET /token?service=…&scope=…`, HTTP Basic
//! credentials) and retries with `Authorization: Bearer <JWT>`.
//!
//! The JWTs are ES256, signed with `ring` by a key the `openssl` CLI makes
//! next to a self-signed certificate. The header carries that certificate
//! as its `x5c` chain, and the same certificate is the registry's
//! `rootcertbundle`, so distribution 2.8 trusts the tokens
//! (`registry/auth/token/token.go`: the x5c leaf must verify against the
//! bundle; libtrust checks the signature as raw r||s).
//!
//! Plain HTTP on 127.0.0.1: clients fetch the realm with any scheme. The
//! server runs in a thread and stops when the [`TokenServer`] drops.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use super::registry::TokenAuth;
use super::{require_tool, run};

/// The `service` the registry names in its challenge (the tokens' `aud`).
pub const SERVICE: &str = "frakti-test-registry";
/// The tokens' `iss`, which the registry trusts.
pub const ISSUER: &str = "frakti-test-token-issuer";
/// How long a token is valid, in seconds.
pub const EXPIRES_IN: u64 = 300;
/// The actions a token may grant.
const GRANTABLE: [&str; 2] = ["pull", "push"];

/// Signs JWTs for the registry: an ES256 key and its self-signed
/// certificate (the `x5c` of every token, and the registry's root bundle).
pub struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    /// base64 (standard) of the certificate's DER: the `x5c` entry.
    x5c: String,
    /// The certificate (PEM): the registry's `rootcertbundle`.
    pub cert: PathBuf,
    minted: AtomicUsize,
}

impl Signer {
    /// Makes a P-256 key and a self-signed certificate for it under `dir`
    /// with `openssl` (panics naming the package if it is missing).
    pub fn new(dir: &Path) -> Signer {
        require_tool("openssl", "openssl");
        std::fs::create_dir_all(dir).expect("create the token signer directory");
        let key = dir.join("token-signer.key");
        let cert = dir.join("token-signer.crt");
        run(Command::new("openssl")
            .args(["req", "-x509", "-new", "-nodes", "-newkey", "ec"])
            .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-sha256"])
            .args(["-days", "2", "-subj", "/CN=frakti test token signer"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let rng = SystemRandom::new();
        // OpenSSL 3 writes the key as PKCS#8, which ring reads.
        let pkcs8 = pem_der(&key, "PRIVATE KEY");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .expect("ring reads openssl's P-256 key");
        Signer {
            key,
            rng,
            x5c: STANDARD.encode(pem_der(&cert, "CERTIFICATE")),
            cert,
            minted: AtomicUsize::new(0),
        }
    }

    /// A token for `subject` granting each `(repository, actions)`, valid
    /// for [`EXPIRES_IN`] seconds from now.
    pub fn mint(&self, subject: &str, access: &[(String, Vec<String>)]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let access: Vec<_> = access
            .iter()
            .map(|(name, actions)| {
                serde_json::json!({ "type": "repository", "name": name, "actions": actions })
            })
            .collect();
        let n = self.minted.fetch_add(1, Ordering::Relaxed);
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + EXPIRES_IN,
            "nbf": now,
            "iat": now,
            "jti": format!("frakti-test-{now}-{n}"),
            "access": access,
        });
        let header = serde_json::json!({ "typ": "JWT", "alg": "ES256", "x5c": [self.x5c] });
        let signed = format!("{}.{}", b64url_json(&header), b64url_json(&claims));
        let signature = self
            .key
            .sign(&self.rng, signed.as_bytes())
            .expect("ECDSA signing");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }

    /// A token granting `actions` on one repository, as a test hands it to
    /// a client directly (a CRI `registry_token`).
    pub fn mint_for(&self, repository: &str, actions: &[&str]) -> String {
        let actions = actions.iter().map(|a| a.to_string()).collect();
        self.mint("frakti-test", &[(repository.to_string(), actions)])
    }
}

/// The DER inside the first PEM block labelled `label` of `path`.
fn pem_der(path: &Path, label: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(path).expect("read a PEM file");
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body: String = text
        .lines()
        .skip_while(|l| l.trim() != begin)
        .skip(1)
        .take_while(|l| l.trim() != end)
        .map(str::trim)
        .collect();
    STANDARD.decode(body).expect("PEM body is base64")
}

fn b64url_json(value: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// What the server thread shares with [`TokenServer`].
struct State {
    signer: Signer,
    user: String,
    password: String,
    /// Requests for `/token`, whatever the answer.
    requests: AtomicUsize,
    /// Tokens handed out.
    granted: AtomicUsize,
    stop: AtomicBool,
}

/// A running token server: `GET /token` with the right Basic credentials
/// gets a JWT granting the requested `repository:NAME:ACTIONS` scopes (pull
/// and push only); anything else gets 401.
pub struct TokenServer {
    state: Arc<State>,
    addr: SocketAddr,
    realm: String,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    /// Starts a server accepting `(user, password)` on a free port of
    /// 127.0.0.1, its signing key and certificate under `dir`.
    pub fn start(dir: &Path, user: &str, password: &str) -> TokenServer {
        let listener =
            TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).expect("bind port 0");
        let addr = listener.local_addr().expect("local_addr");
        let state = Arc::new(State {
            signer: Signer::new(dir),
            user: user.to_string(),
            password: password.to_string(),
            requests: AtomicUsize::new(0),
            granted: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let shared = Arc::clone(&state);
        let thread = std::thread::spawn(move || accept_loop(listener, shared));
        TokenServer {
            state,
            addr,
            realm: format!("http://{addr}/token"),
            thread: Some(thread),
        }
    }

    /// "http://127.0.0.1:PORT/token".
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The signer, to mint tokens without asking the server.
    pub fn signer(&self) -> &Signer {
        &self.state.signer
    }

    /// How many `/token` requests were served so far (any answer).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// How many tokens were handed out so far.
    pub fn granted(&self) -> usize {
        self.state.granted.load(Ordering::SeqCst)
    }

    /// The registry's `auth: token:` settings for this server; pushes and
    /// inspects of the registry use its credentials.
    pub fn registry_auth(&self) -> TokenAuth<'_> {
        TokenAuth {
            realm: &self.realm,
            service: SERVICE,
            issuer: ISSUER,
            root_cert_bundle: &self.state.signer.cert,
            creds: (&self.state.user, &self.state.password),
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so the thread sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, state: Arc<State>) {
    for stream in listener.incoming() {
        if state.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let state = Arc::clone(&state);
        // One thread per connection: a client holding its connection open
        // does not stall the others.
        std::thread::spawn(move || serve(stream, &state));
    }
}

/// Answers one request and closes the connection.
fn serve(mut stream: TcpStream, state: &State) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Some(head) = read_head(&mut stream) else {
        return;
    };
    let (status, extra, body) = answer(&head, state);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

/// The request line and headers (a GET has no body), up to 64 KiB.
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 || buf.len() > 64 << 10 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).ok()
}

/// Status line, extra header lines and body for a request head.
fn answer(head: &str, state: &State) -> (&'static str, String, String) {
    let target = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/token" {
        return (
            "404 Not Found",
            String::new(),
            r#"{"details":"not found"}"#.into(),
        );
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    if basic_credentials(head) != Some((state.user.clone(), state.password.clone())) {
        return (
            "401 Unauthorized",
            "WWW-Authenticate: Basic realm=\"frakti-test-token\"\r\n".into(),
            r#"{"details":"incorrect username or password"}"#.into(),
        );
    }
    let params = query_params(query);
    if !params.iter().any(|(k, v)| k == "service" && v == SERVICE) {
        return (
            "400 Bad Request",
            String::new(),
            r#"{"details":"unknown service"}"#.into(),
        );
    }
    let access: Vec<_> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .filter_map(|(_, scope)| granted_scope(scope))
        .collect();
    let token = state.signer.mint(&state.user, &access);
    state.granted.fetch_add(1, Ordering::SeqCst);
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": EXPIRES_IN,
    });
    ("200 OK", String::new(), body.to_string())
}

/// The `(user, password)` of an `Authorization: Basic` header, if any.
fn basic_credentials(head: &str) -> Option<(String, String)> {
    let value = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("authorization")
            .then_some(value.trim())
    })?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// "repository:NAME:pull,push" → (NAME, the grantable actions asked for).
fn granted_scope(scope: &str) -> Option<(String, Vec<String>)> {
    let rest = scope.strip_prefix("repository:")?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions = actions
        .split(',')
        .filter(|a| GRANTABLE.contains(a))
        .map(str::to_string)
        .collect();
    Some((name.to_string(), actions))
}

/// The decoded `key=value` pairs of a query string, repeats kept (`%XX`
/// and Go's `+` for a space).
pub fn query_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
