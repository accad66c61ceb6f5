//! Registry hosts: where to pull a registry's images from, configured the
//! way containerd does it (`hosts.toml`, see containerd's docs/hosts.md).
//!
//! Layout under the certs directory (default [`DEFAULT_CERTS_DIR`]):
//!
//! ```text
//! <certs_dir>/<host>_<port>_/hosts.toml   (tried first when the host has a port)
//! <certs_dir>/<host>[:<port>]/hosts.toml
//! <certs_dir>/_default/hosts.toml         (when no directory above exists)
//! ```
//!
//! The first of these *directories* that exists is used, as in containerd:
//! a `docker.io/` directory holding only certificates hides `_default/`.
//! A directory without `hosts.toml` (or with an empty one) is read in
//! Docker's certificate layout: `*.crt` are CAs, `*.cert` (+ `*.key`)
//! client certificates, all for the upstream server.
//!
//! Differences from containerd, on purpose:
//! - A malformed `hosts.toml` is an error; containerd logs it and falls back
//!   to the certificate files, which silently drops the mirrors and CAs.
//! - Without configuration, a loopback registry (`localhost:5000`,
//!   `127.0.0.1:5000`, `[::1]`) is `https` with verification, like any
//!   other. containerd instead tries https without verification and falls
//!   back to plain http when the port is not 443. Downgrading to plaintext
//!   is the operator's call: `server = "http://localhost:5000"`.
//! - An `http://` URL is plain http. containerd tries https first when the
//!   same host also has `ca`, `client` or `skip_verify` set.
//! - The newer containerd lookup by domain suffix (`.docker.io/`) is not
//!   supported, nor are `dial_timeout`, `proxy` and `dial_addr` (ignored).

use std::fs;
use std::io;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// Where operators put the per-registry directories.
pub const DEFAULT_CERTS_DIR: &str = "/etc/frakti/certs.d";
const HOSTS_FILE: &str = "hosts.toml";
const DEFAULT_DIR: &str = "_default";
/// docker.io is an alias: its registry API is served from here.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid registry host {0:?}")]
    Registry(String),
    #[error("cannot read {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {what}", path.display())]
    Config { path: PathBuf, what: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// What an endpoint may be used for. `resolve` (tag to digest) is a trusted
/// operation: a public mirror should have `pull` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub pull: bool,
    pub resolve: bool,
}

impl Capabilities {
    const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
    };
}

/// One place to pull from. Mirrors (`mirror == true`) serve the registry's
/// repositories under their own host; containerd tells them which registry
/// with a `?ns=<registry>` query parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub scheme: Scheme,
    /// host[:port] as in the URL.
    pub host: String,
    /// The API path, by default ending in "/v2"; with `override_path` the
    /// configured path as-is (may be empty).
    pub path: String,
    pub capabilities: Capabilities,
    pub skip_verify: bool,
    /// CA files, absolute when the certs directory is.
    pub ca: Vec<PathBuf>,
    /// Client certificate and key; no key: the key is in the cert file.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    pub headers: Vec<(String, String)>,
    /// A `[host]` entry rather than the upstream server.
    pub mirror: bool,
}

impl Endpoint {
    /// The API root, e.g. "http://127.0.0.1:5000/v2".
    pub fn url(&self) -> String {
        format!("{}://{}{}", self.scheme.as_str(), self.host, self.path)
    }

    /// The upstream used when nothing names a `server`.
    fn upstream(registry: &str) -> Endpoint {
        let host = if registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            registry
        };
        Endpoint {
            scheme: Scheme::Https,
            host: host.to_string(),
            path: "/v2".to_string(),
            capabilities: Capabilities::ALL,
            skip_verify: false,
            ca: Vec::new(),
            client: Vec::new(),
            headers: Vec::new(),
            mirror: false,
        }
    }
}

/// The endpoints to try for `registry` (a reference's registry host, e.g.
/// "docker.io", "registry.k8s.io", "127.0.0.1:5000"), in order: the
/// `[host."..."]` mirrors in file order, then the upstream (`server`, or
/// the default upstream when absent). Never empty.
///
/// The files are read on every call, so edits apply without a restart;
/// this is blocking I/O on a few small files.
pub fn endpoints(certs_dir: &Path, registry: &str) -> Result<Vec<Endpoint>, Error> {
    if !valid_registry(registry) {
        return Err(Error::Registry(registry.to_string()));
    }
    let Some(dir) = host_dir(certs_dir, registry)? else {
        return Ok(vec![Endpoint::upstream(registry)]);
    };
    tracing::debug!(registry, dir = %dir.display(), "registry hosts directory");
    let file = dir.join(HOSTS_FILE);
    match read_optional(&file)? {
        // containerd: an empty file means "use the certificate files".
        Some(text) if !text.is_empty() => parse_hosts(&file, &dir, &text, registry),
        _ => legacy_endpoints(&dir, registry),
    }
}

/// The registry names a directory below the certs dir: it must be one
/// plain host[:port], never a path.
fn valid_registry(registry: &str) -> bool {
    !registry.is_empty()
        && !registry.contains(['/', '\\', '\0'])
        && !registry.contains("..")
        && !registry.starts_with('.')
        && valid_authority(registry)
}

/// host[:port], with a DNS name, an IPv4 or a bracketed IPv6 address.
fn valid_authority(authority: &str) -> bool {
    let (host, port) = split_port(authority);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        }
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
    });
    host_ok && port_ok
}

/// Splits "host:port" / "[v6]:port"; an unbracketed IPv6 has no port.
fn split_port(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.rfind("]:") {
            Some(i) => (&authority[..=i], Some(&authority[i + 2..])),
            None => (authority, None),
        };
    }
    match authority.split_once(':') {
        Some((host, port)) if !port.contains(':') => (host, Some(port)),
        _ => (authority, None),
    }
}

/// The first existing directory among the candidates for `registry`.
fn host_dir(certs_dir: &Path, registry: &str) -> Result<Option<PathBuf>, Error> {
    let mut names = Vec::with_capacity(3);
    // containerd's spelling for file systems that refuse ':' in names.
    if let (host, Some(port)) = split_port(registry) {
        names.push(format!("{host}_{port}_"));
    }
    names.push(registry.to_string());
    names.push(DEFAULT_DIR.to_string());
    for name in names {
        let path = certs_dir.join(name);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => return Ok(Some(path)),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Io { path, source }),
        }
    }
    Ok(None)
}

fn read_optional(path: &Path) -> Result<Option<String>, Error> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Docker's layout: `*.crt` CAs and `*.cert`/`*.key` pairs for the upstream.
fn legacy_endpoints(dir: &Path, registry: &str) -> Result<Vec<Endpoint>, Error> {
    let io_err = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        // Symlinks count: Kubernetes mounts secrets as symlinks.
        if entry.file_type().map_err(io_err)?.is_dir() {
            continue;
        }
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_string());
        }
    }
    names.sort();
    let mut upstream = Endpoint::upstream(registry);
    for name in &names {
        if name.ends_with(".crt") {
            upstream.ca.push(dir.join(name));
        } else if let Some(stem) = name.strip_suffix(".cert") {
            let key = dir.join(format!("{stem}.key"));
            let key = exists(&key)?.then_some(key);
            upstream.client.push((dir.join(name), key));
        }
    }
    Ok(vec![upstream])
}

fn exists(path: &Path) -> Result<bool, Error> {
    match fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Where a value came from, for error messages and relative paths.
struct Source<'a> {
    file: &'a Path,
    dir: &'a Path,
}

impl Source<'_> {
    fn error(&self, what: impl Into<String>) -> Error {
        Error::Config {
            path: self.file.to_path_buf(),
            what: what.into(),
        }
    }

    /// Relative paths in hosts.toml are relative to its directory.
    fn path(&self, field: &str, p: &str) -> Result<PathBuf, Error> {
        if p.is_empty() {
            return Err(self.error(format!("{field}: empty path")));
        }
        Ok(self.dir.join(p))
    }
}

fn parse_hosts(
    file: &Path,
    dir: &Path,
    text: &str,
    registry: &str,
) -> Result<Vec<Endpoint>, Error> {
    let src = Source { file, dir };
    let table: Table = toml::from_str(text).map_err(|e| src.error(toml_error(text, &e)))?;
    let mut endpoints = Vec::new();
    if let Some(hosts) = table.get("host") {
        let hosts = hosts
            .as_table()
            .ok_or_else(|| src.error("host: expected [host.\"<url>\"] tables"))?;
        // The table keeps file order (toml's preserve_order feature).
        for (url, fields) in hosts {
            let fields = fields
                .as_table()
                .ok_or_else(|| src.error(format!("host {url:?}: expected a table")))?;
            let fields = parse_fields(&src, &format!("host {url:?}: "), fields)?;
            let url = parse_url(url).map_err(|what| src.error(format!("host {url:?}: {what}")))?;
            endpoints.push(fields.endpoint(url, true));
        }
    }
    endpoints.push(server_endpoint(&src, &table, registry)?);
    Ok(endpoints)
}

/// The top level: `server` plus the fields that apply to it.
fn server_endpoint(src: &Source, table: &Table, registry: &str) -> Result<Endpoint, Error> {
    let fields = parse_fields(src, "", table)?;
    match table.get("server") {
        Some(Value::String(server)) => {
            let url = parse_url(server)
                .map_err(|what| src.error(format!("server {server:?}: {what}")))?;
            Ok(fields.endpoint(url, false))
        }
        Some(_) => Err(src.error("server: expected a string")),
        None => {
            // As containerd: the default upstream takes the TLS settings
            // and headers, but always keeps its full capabilities and /v2.
            let mut upstream = Endpoint::upstream(registry);
            upstream.skip_verify = fields.skip_verify;
            upstream.ca = fields.ca;
            upstream.client = fields.client;
            upstream.headers = fields.headers;
            Ok(upstream)
        }
    }
}

/// A URL as written in hosts.toml, path not yet adjusted.
#[derive(Debug, PartialEq)]
struct Url {
    scheme: Scheme,
    host: String,
    path: String,
}

/// "[http[s]://]host[:port][/path]"; no scheme means https.
fn parse_url(raw: &str) -> Result<Url, String> {
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("URL contains whitespace".to_string());
    }
    let (scheme, rest) = match raw.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case("https") => (Scheme::Https, rest),
        Some((s, rest)) if s.eq_ignore_ascii_case("http") => (Scheme::Http, rest),
        Some((s, _)) => return Err(format!("unknown scheme {s:?} (http or https)")),
        None => (Scheme::Https, raw),
    };
    if rest.contains(['?', '#']) {
        return Err("query or fragment not supported".to_string());
    }
    let (host, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if host.contains('@') {
        return Err("user info not supported".to_string());
    }
    if !valid_authority(host) {
        return Err(format!("invalid host {host:?}"));
    }
    Ok(Url {
        scheme,
        host: host.to_string(),
        path: clean_path(path),
    })
}

/// Lexical cleanup like Go's path.Clean, without a trailing slash; "" for
/// the root.
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            _ => parts.push(part),
        }
    }
    parts.iter().map(|p| format!("/{p}")).collect()
}

/// The API root: "/v2" appended unless the path already ends in it or the
/// host says its path is the API root (`override_path`).
fn api_path(path: &str, override_path: bool) -> String {
    if override_path || path.ends_with("/v2") {
        path.to_string()
    } else {
        format!("{path}/v2")
    }
}

/// The per-host settings of one table (top level or `[host."..."]`).
struct Fields {
    capabilities: Capabilities,
    skip_verify: bool,
    ca: Vec<PathBuf>,
    client: Vec<(PathBuf, Option<PathBuf>)>,
    headers: Vec<(String, String)>,
    override_path: bool,
}

impl Fields {
    fn endpoint(self, url: Url, mirror: bool) -> Endpoint {
        Endpoint {
            scheme: url.scheme,
            host: url.host,
            path: api_path(&url.path, self.override_path),
            capabilities: self.capabilities,
            skip_verify: self.skip_verify,
            ca: self.ca,
            client: self.client,
            headers: self.headers,
            mirror,
        }
    }
}

/// `at` prefixes error messages ("host \"...\": " or "").
fn parse_fields(src: &Source, at: &str, t: &Table) -> Result<Fields, Error> {
    let err = |what: String| src.error(format!("{at}{what}"));
    Ok(Fields {
        capabilities: capabilities(t.get("capabilities")).map_err(err)?,
        skip_verify: bool_field(t, "skip_verify").map_err(err)?,
        override_path: bool_field(t, "override_path").map_err(err)?,
        ca: ca_paths(src, at, t.get("ca"))?,
        client: client_pairs(src, at, t.get("client"))?,
        headers: headers(t.get("header")).map_err(err)?,
    })
}

fn bool_field(t: &Table, name: &str) -> Result<bool, String> {
    match t.get(name) {
        None => Ok(false),
        Some(Value::Boolean(b)) => Ok(*b),
        Some(_) => Err(format!("{name}: expected true or false")),
    }
}

/// Absent or empty: everything. "push" is accepted and unused (no push).
fn capabilities(value: Option<&Value>) -> Result<Capabilities, String> {
    let names = match value {
        None => return Ok(Capabilities::ALL),
        Some(Value::Array(items)) => {
            str_array(items).ok_or("capabilities: expected an array of strings")?
        }
        Some(_) => return Err("capabilities: expected an array of strings".to_string()),
    };
    if names.is_empty() {
        return Ok(Capabilities::ALL);
    }
    let mut caps = Capabilities {
        pull: false,
        resolve: false,
    };
    for name in names {
        match name.to_ascii_lowercase().as_str() {
            "pull" => caps.pull = true,
            "resolve" => caps.resolve = true,
            "push" => {}
            _ => return Err(format!("capabilities: unknown {name:?}")),
        }
    }
    Ok(caps)
}

/// A string, or an array of strings.
fn strings(value: &Value) -> Option<Vec<&str>> {
    match value {
        Value::String(s) => Some(vec![s.as_str()]),
        Value::Array(items) => str_array(items),
        _ => None,
    }
}

fn str_array(items: &[Value]) -> Option<Vec<&str>> {
    items.iter().map(Value::as_str).collect()
}

fn ca_paths(src: &Source, at: &str, value: Option<&Value>) -> Result<Vec<PathBuf>, Error> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let paths =
        strings(value).ok_or_else(|| src.error(format!("{at}ca: expected a path or paths")))?;
    paths.into_iter().map(|p| src.path("ca", p)).collect()
}

/// "cert", ["cert", ...] or [["cert", "key"], ...]; an empty key: the key
/// is in the cert file.
fn client_pairs(
    src: &Source,
    at: &str,
    value: Option<&Value>,
) -> Result<Vec<(PathBuf, Option<PathBuf>)>, Error> {
    let bad = || src.error(format!("{at}client: expected paths or [cert, key] pairs"));
    let items = match value {
        None => return Ok(Vec::new()),
        Some(Value::String(cert)) => return Ok(vec![(src.path("client", cert)?, None)]),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad()),
    };
    let mut pairs = Vec::with_capacity(items.len());
    for item in items {
        let (cert, key) = match item {
            Value::String(cert) => (cert.as_str(), ""),
            Value::Array(pair) => match str_array(pair).as_deref() {
                Some([cert, key]) => (*cert, *key),
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        };
        let key = match key {
            "" => None,
            key => Some(src.path("client", key)?),
        };
        pairs.push((src.path("client", cert)?, key));
    }
    Ok(pairs)
}

/// `[header]`: name = "value" or name = ["value", ...], in file order.
fn headers(value: Option<&Value>) -> Result<Vec<(String, String)>, String> {
    let table = match value {
        None => return Ok(Vec::new()),
        Some(Value::Table(t)) => t,
        Some(_) => return Err("header: expected a table".to_string()),
    };
    let mut headers = Vec::new();
    for (name, value) in table {
        let values = strings(value)
            .ok_or_else(|| format!("header {name:?}: expected a string or strings"))?;
        if !valid_header_name(name) {
            return Err(format!("header {name:?}: invalid name"));
        }
        for v in values {
            // No CR/LF: a value must not smuggle in another header.
            if v.contains(['\r', '\n', '\0']) {
                return Err(format!("header {name:?}: invalid value"));
            }
            headers.push((name.clone(), v.to_string()));
        }
    }
    Ok(headers)
}

/// An HTTP token (RFC 9110).
fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// "line N: message", without the quoted source line: a header value in
/// the file may be a secret.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests;
