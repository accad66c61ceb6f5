//! Registry credentials for a pull: the CRI request's `AuthConfig` (from
//! the pod's image pull secrets), else the node's Docker `config.json`.
//!
//! Secrets never appear in errors, logs or `Debug` output.

use std::collections::{BTreeMap, HashMap};
use std::env;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use docker_credential::{CredentialRetrievalError, DockerCredential};
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// The node's config when neither a path nor `$DOCKER_CONFIG` is given
/// (the daemon runs as root).
pub const DEFAULT_DOCKER_CONFIG: &str = "/root/.docker/config.json";
/// Docker Hub's key in config.json and for credential helpers.
pub const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";
/// What a Docker credential helper prints when it has nothing for a host.
const HELPER_NOT_FOUND: &str = "credentials not found";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pull request credentials for {registry}: {what}")]
    Request {
        registry: String,
        what: &'static str,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {what}", path.display())]
    Config { path: PathBuf, what: String },
    #[error("credential helper {helper:?} for {registry}: {what}")]
    Helper {
        helper: String,
        registry: String,
        what: &'static str,
    },
}

#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    /// An identity token or a registry token, sent as `Bearer`.
    Bearer(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Anonymous => f.write_str("Anonymous"),
            Credential::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credential::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

impl Credential {
    /// oci-client sends a `Bearer` token to the registry as-is, without the
    /// OAuth2 refresh-token exchange an identity token is meant for: registry
    /// tokens work, identity tokens only where the registry accepts them
    /// directly.
    pub fn to_registry_auth(&self) -> RegistryAuth {
        match self {
            Credential::Anonymous => RegistryAuth::Anonymous,
            Credential::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Credential::Bearer(token) => RegistryAuth::Bearer(token.clone()),
        }
    }
}

/// CRI's `AuthConfig` (its `server_address` is not used: kubelet already
/// picked the secret for the image's registry).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RequestAuth {
    pub username: String,
    pub password: String,
    /// base64 of "user:password".
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl fmt::Debug for RequestAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |s: &String| if s.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("RequestAuth")
            .field("username", &self.username)
            .field("password", &set(&self.password))
            .field("auth", &set(&self.auth))
            .field("identity_token", &set(&self.identity_token))
            .field("registry_token", &set(&self.registry_token))
            .finish()
    }
}

impl From<&k8s_cri::v1::AuthConfig> for RequestAuth {
    fn from(a: &k8s_cri::v1::AuthConfig) -> Self {
        RequestAuth {
            username: a.username.clone(),
            password: a.password.clone(),
            auth: a.auth.clone(),
            identity_token: a.identity_token.clone(),
            registry_token: a.registry_token.clone(),
        }
    }
}

impl RequestAuth {
    /// kubelet may send an empty AuthConfig when the pod has no secret.
    fn has_credential(&self) -> bool {
        [
            &self.username,
            &self.auth,
            &self.identity_token,
            &self.registry_token,
        ]
        .iter()
        .any(|s| !s.is_empty())
    }
}

/// Credentials for `registry` (e.g. "docker.io", "127.0.0.1:5443"): the
/// request's when it carries any, else the Docker config at
/// `docker_config` (default: `$DOCKER_CONFIG/config.json`, else
/// [`DEFAULT_DOCKER_CONFIG`]). No config file means anonymous.
///
/// May run a Docker credential helper (`credHelpers`, `credsStore`): a
/// blocking call.
pub fn credential(
    request: Option<&RequestAuth>,
    docker_config: Option<&Path>,
    registry: &str,
) -> Result<Credential, Error> {
    if let Some(request) = request.filter(|r| r.has_credential()) {
        return from_request(request).map_err(|what| Error::Request {
            registry: registry.to_string(),
            what,
        });
    }
    let path = match docker_config {
        Some(p) => p.to_path_buf(),
        None => default_config_path(env::var_os("DOCKER_CONFIG")),
    };
    from_docker_config(&path, registry)
}

fn default_config_path(docker_config_dir: Option<OsString>) -> PathBuf {
    match docker_config_dir {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("config.json"),
        _ => PathBuf::from(DEFAULT_DOCKER_CONFIG),
    }
}

/// Tokens first, as Docker does: next to an identity token, `auth` holds
/// only "user:" and the token is the real secret.
fn from_request(r: &RequestAuth) -> Result<Credential, &'static str> {
    if !r.registry_token.is_empty() {
        return Ok(Credential::Bearer(r.registry_token.clone()));
    }
    if !r.identity_token.is_empty() {
        return Ok(Credential::Bearer(r.identity_token.clone()));
    }
    if !r.username.is_empty() {
        return Ok(Credential::Basic {
            username: r.username.clone(),
            password: r.password.clone(),
        });
    }
    decode_auth(&r.auth)
}

/// `auth`: base64 (padded or not) of "user:password".
fn decode_auth(encoded: &str) -> Result<Credential, &'static str> {
    let engine = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(encoded.trim())
        .map_err(|_| "auth is not valid base64")?;
    let text = String::from_utf8(bytes).map_err(|_| "auth is not UTF-8")?;
    let (username, password) = text
        .split_once(':')
        .ok_or("auth has no ':' between user name and password")?;
    Ok(Credential::Basic {
        username: username.to_string(),
        // Some tools pad with NULs (Docker trims them too).
        password: password.trim_end_matches('\0').to_string(),
    })
}

/// The parts of Docker's config.json used here; other fields are ignored.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

fn from_docker_config(path: &Path, registry: &str) -> Result<Credential, Error> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::debug!(path = %path.display(), "no docker config: anonymous");
            return Ok(Credential::Anonymous);
        }
        Err(source) => {
            return Err(Error::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    if text.trim().is_empty() {
        return Ok(Credential::Anonymous);
    }
    // serde_json's messages can quote values: keep the position only.
    let config: DockerConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        what: format!("malformed at line {} column {}", e.line(), e.column()),
    })?;
    lookup(&config, path, registry)
}

/// Docker's order: a per-registry helper, the `auths` entry, the store.
fn lookup(config: &DockerConfig, path: &Path, registry: &str) -> Result<Credential, Error> {
    let server = server_key(registry);
    if let Some(helper) = helper_for(config, registry, server) {
        return from_helper(helper, server, registry);
    }
    if let Some((key, entry)) = find_entry(&config.auths, registry, server) {
        let found = entry_credential(entry).map_err(|what| Error::Config {
            path: path.to_path_buf(),
            what: format!("auths {key:?}: {what}"),
        })?;
        if let Some(credential) = found {
            return Ok(credential);
        }
    }
    match config.creds_store.as_deref() {
        Some(store) if !store.is_empty() => from_helper(store, server, registry),
        _ => Ok(Credential::Anonymous),
    }
}

/// The name Docker files a registry under: Docker Hub has a URL.
fn server_key(registry: &str) -> &str {
    if normalize(registry) == "index.docker.io" {
        DOCKER_HUB_KEY
    } else {
        registry
    }
}

/// Docker Hub's aliases are one registry.
fn normalize(host: &str) -> &str {
    match host {
        "docker.io" | "registry-1.docker.io" | "index.docker.io" => "index.docker.io",
        _ => host,
    }
}

/// A config key ("quay.io", "https://quay.io", "https://index.docker.io/v1/")
/// as a registry host.
fn key_host(key: &str) -> &str {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    normalize(rest.split('/').next().unwrap_or(rest))
}

fn helper_for<'a>(config: &'a DockerConfig, registry: &str, server: &str) -> Option<&'a str> {
    [registry, server]
        .iter()
        .find_map(|k| config.cred_helpers.get(*k))
        .map(String::as_str)
        .filter(|h| !h.is_empty())
}

/// The exact key first, then any key naming the same host.
fn find_entry<'a>(
    auths: &'a BTreeMap<String, AuthEntry>,
    registry: &str,
    server: &str,
) -> Option<(&'a str, &'a AuthEntry)> {
    let exact = [registry, server]
        .into_iter()
        .find_map(|k| auths.get_key_value(k));
    let host = normalize(registry);
    exact
        .or_else(|| auths.iter().find(|(k, _)| key_host(k) == host))
        .map(|(k, e)| (k.as_str(), e))
}

/// `None`: the entry holds nothing usable (e.g. only an email, or `{}` next
/// to a credsStore).
fn entry_credential(entry: &AuthEntry) -> Result<Option<Credential>, &'static str> {
    let set = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
    if let Some(token) = set(&entry.registrytoken).or_else(|| set(&entry.identitytoken)) {
        return Ok(Some(Credential::Bearer(token)));
    }
    if let Some(auth) = set(&entry.auth) {
        return decode_auth(&auth).map(Some);
    }
    Ok(set(&entry.username).map(|username| Credential::Basic {
        username,
        password: entry.password.clone().unwrap_or_default(),
    }))
}

/// Runs `docker-credential-<helper> get` through the docker_credential
/// crate, which speaks the helper protocol.
fn from_helper(helper: &str, server: &str, registry: &str) -> Result<Credential, Error> {
    let fail = |what| Error::Helper {
        helper: helper.to_string(),
        registry: registry.to_string(),
        what,
    };
    // The name becomes a program name looked up in PATH: no paths.
    if !helper
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(fail("invalid helper name"));
    }
    // A config naming only this helper, so the crate runs it for `server`.
    let config = serde_json::json!({ "credHelpers": { server: helper } }).to_string();
    match docker_credential::get_credential_from_reader(config.as_bytes(), server) {
        Ok(DockerCredential::IdentityToken(token)) => Ok(Credential::Bearer(token)),
        Ok(DockerCredential::UsernamePassword(username, password)) => {
            Ok(Credential::Basic { username, password })
        }
        Err(CredentialRetrievalError::HelperFailure { stdout, .. })
            if stdout.contains(HELPER_NOT_FOUND) =>
        {
            Ok(Credential::Anonymous)
        }
        // Helper output is not quoted: it could hold a secret.
        Err(CredentialRetrievalError::HelperCommunicationError) => Err(fail("cannot run it")),
        Err(CredentialRetrievalError::MalformedHelperResponse) => Err(fail("malformed response")),
        Err(_) => Err(fail("failed")),
    }
}

#[cfg(test)]
mod tests;
