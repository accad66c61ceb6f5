//! Talking to registries with oci-client: the endpoints of a registry
//! (mirrors first, from hosts.toml) are tried in order; the first that
//! resolves the reference serves the image's manifests and blobs. Blobs
//! stream into the content store (resumable, digest-verified).

use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{
    BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::client_tls::{self, Forwarder};
use super::content::{self, Digest, Ingest};
use super::hosts::{Endpoint, Scheme};
use super::manifest::{self, Descriptor};
use super::reference::ImageRef;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{image}: no endpoint could serve it: {}", .attempts.join("; "))]
    AllEndpointsFailed {
        image: String,
        attempts: Vec<String>,
    },
    #[error("{image}: not found at {}", .attempts.join("; "))]
    NotFound {
        image: String,
        attempts: Vec<String>,
    },
    #[error("{endpoint}: {what}: {reason}")]
    Fetch {
        endpoint: String,
        what: String,
        reason: String,
    },
    #[error("{endpoint}: {0}", endpoint = .1)]
    Content(#[source] content::Error, String),
}

/// Why one endpoint failed, in words an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    NotFound,
    Auth,
    Tls,
    Connection,
    Other,
}

fn classify(err: &OciDistributionError) -> (Failure, String) {
    let chain = crate::error_chain(err);
    let lower = chain.to_ascii_lowercase();
    let kind = match err {
        OciDistributionError::ImageManifestNotFoundError(_) => Failure::NotFound,
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => Failure::Auth,
        OciDistributionError::ServerError { code: 404, .. } => Failure::NotFound,
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => Failure::Auth,
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown
                        | oci_client::errors::OciErrorCode::NameUnknown
                        | oci_client::errors::OciErrorCode::BlobUnknown
                )
            }) =>
        {
            Failure::NotFound
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    oci_client::errors::OciErrorCode::Unauthorized
                        | oci_client::errors::OciErrorCode::Denied
                )
            }) =>
        {
            Failure::Auth
        }
        _ if lower.contains("certificate")
            || lower.contains("tls")
            || lower.contains("handshake") =>
        {
            Failure::Tls
        }
        _ if lower.contains("connection refused")
            || lower.contains("error sending request")
            || lower.contains("dns error")
            || lower.contains("timed out") =>
        {
            Failure::Connection
        }
        _ => Failure::Other,
    };
    let label = match kind {
        Failure::NotFound => "not found",
        Failure::Auth => "unauthorized (bad or missing credentials)",
        Failure::Tls => "TLS error",
        Failure::Connection => "connection failed",
        Failure::Other => "failed",
    };
    (kind, format!("{label}: {chain}"))
}

/// An endpoint with its client, able to fetch the image's content.
pub struct Session {
    client: Client,
    reference: Reference,
    pub endpoint: String,
    /// The forwarder that presents the endpoint's client certificate, for
    /// as long as the session fetches through it.
    _forwarder: Option<Forwarder>,
}

/// What a reference resolved to at one endpoint.
pub struct Resolved {
    pub session: Session,
    /// The manifest or index the reference names, and its digest.
    pub body: Vec<u8>,
    pub digest: Digest,
}

/// The endpoint's session: oci-client straight to it, or, with a client
/// certificate, through a forwarder that presents it (client_tls.rs).
async fn session_for(image: &ImageRef, endpoint: &Endpoint) -> Result<Session, String> {
    let endpoint_url = endpoint.url();
    if endpoint.client.is_empty() {
        return Ok(Session {
            client: client_for(endpoint)?,
            reference: reference_for(image, endpoint, None)?,
            endpoint: endpoint_url,
            _forwarder: None,
        });
    }
    if endpoint.scheme == Scheme::Http {
        return Err("client certificates need https, not http".into());
    }
    let forwarder = client_tls::start(endpoint).await?;
    // oci-client speaks plain http to the loopback forwarder, which does
    // the TLS (with the endpoint's CAs and skip_verify).
    let plain = Endpoint {
        scheme: Scheme::Http,
        ca: Vec::new(),
        client: Vec::new(),
        skip_verify: false,
        ..endpoint.clone()
    };
    Ok(Session {
        client: client_for(&plain)?,
        reference: reference_for(image, endpoint, Some(&forwarder.registry))?,
        endpoint: endpoint_url,
        _forwarder: Some(forwarder),
    })
}

fn client_for(endpoint: &Endpoint) -> Result<Client, String> {
    let mut certs = Vec::new();
    for path in &endpoint.ca {
        let data = std::fs::read(path).map_err(|e| format!("CA {}: {e}", path.display()))?;
        certs.push(Certificate {
            encoding: CertificateEncoding::Pem,
            data,
        });
    }
    let config = ClientConfig {
        protocol: match endpoint.scheme {
            Scheme::Http => ClientProtocol::Http,
            Scheme::Https => ClientProtocol::Https,
        },
        accept_invalid_certificates: endpoint.skip_verify,
        extra_root_certificates: certs,
        // We resolve indexes ourselves (we need the index's bytes).
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        user_agent: concat!("frakti/", env!("CARGO_PKG_VERSION")),
        ..ClientConfig::default()
    };
    Client::try_from(config).map_err(|e| e.to_string())
}

/// The reference as this endpoint serves it: a mirror (or an upstream
/// other than the registry's name) is addressed with containerd's `ns`
/// convention; a path prefix before `/v2` becomes part of its host, which
/// is `via` (a forwarder) when one stands in for the endpoint.
fn reference_for(
    image: &ImageRef,
    endpoint: &Endpoint,
    via: Option<&str>,
) -> Result<Reference, String> {
    let mut reference = image.to_oci();
    let prefix = endpoint
        .path
        .strip_suffix("/v2")
        .or_else(|| endpoint.path.strip_suffix("/v2/"))
        .ok_or_else(|| {
            format!(
                "path '{}' does not end in /v2, which oci-client cannot address",
                endpoint.path
            )
        })?;
    let host = format!(
        "{}{}",
        via.unwrap_or(&endpoint.host),
        prefix.trim_end_matches('/')
    );
    if host != image.registry {
        reference.set_mirror_registry(host);
    }
    Ok(reference)
}

/// Tries each endpoint in order; the first that has the image wins. Every
/// failure is kept for the error message.
pub async fn resolve(
    image: &ImageRef,
    endpoints: &[Endpoint],
    auth: &RegistryAuth,
) -> Result<Resolved, Error> {
    let mut attempts = Vec::new();
    let mut all_not_found = true;
    // A digest reference needs only "pull"; a tag must be resolved.
    let usable = endpoints
        .iter()
        .filter(|e| e.capabilities.pull && (image.digest.is_some() || e.capabilities.resolve));
    for endpoint in usable {
        let url = endpoint.url();
        let session = match session_for(image, endpoint).await {
            Ok(session) => session,
            Err(reason) => {
                all_not_found = false;
                attempts.push(format!("{url}: {reason}"));
                continue;
            }
        };
        match session
            .client
            .pull_manifest_raw(&session.reference, auth, manifest::ACCEPTED)
            .await
        {
            Ok((body, _)) => {
                let digest = Digest::of(&body);
                if let Some(expected) = &image.digest {
                    if &digest != expected {
                        all_not_found = false;
                        attempts.push(format!("{url}: manifest digest mismatch: got {digest}"));
                        continue;
                    }
                }
                tracing::info!(image = %image.name(), endpoint = %url, %digest, "resolved");
                return Ok(Resolved {
                    session,
                    body: body.to_vec(),
                    digest,
                });
            }
            Err(e) => {
                let (kind, reason) = classify(&e);
                tracing::warn!(image = %image.name(), endpoint = %url, "{reason}");
                all_not_found &= kind == Failure::NotFound;
                attempts.push(format!("{url}: {reason}"));
            }
        }
    }
    if attempts.is_empty() {
        attempts.push("no endpoint with pull and resolve capabilities".into());
        all_not_found = false;
    }
    let image = image.name();
    Err(if all_not_found {
        Error::NotFound { image, attempts }
    } else {
        Error::AllEndpointsFailed { image, attempts }
    })
}

fn descriptor(d: &Descriptor) -> OciDescriptor {
    OciDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: i64::try_from(d.size).unwrap_or(i64::MAX),
        urls: None,
        annotations: None,
        artifact_type: None,
    }
}

impl Session {
    fn fetch_error(&self, what: &str, e: &OciDistributionError) -> Error {
        Error::Fetch {
            endpoint: self.endpoint.clone(),
            what: what.to_string(),
            reason: classify(e).1,
        }
    }

    /// A manifest by digest (an index's platform entry), verified.
    pub async fn manifest(&self, digest: &Digest) -> Result<Vec<u8>, Error> {
        let reference = self.reference.clone_with_digest(digest.to_string());
        let (body, _) = self
            .client
            .pull_manifest_raw(&reference, &RegistryAuth::Anonymous, manifest::ACCEPTED)
            .await
            .map_err(|e| self.fetch_error(&format!("manifest {digest}"), &e))?;
        let actual = Digest::of(&body);
        if &actual != digest {
            return Err(Error::Content(
                content::Error::Mismatch {
                    expected: digest.to_string(),
                    actual: actual.to_string(),
                },
                self.endpoint.clone(),
            ));
        }
        Ok(body.to_vec())
    }

    /// Streams a blob into `ingest`, resuming at its offset when the
    /// registry honours ranges; `progress` gets the bytes written so far.
    pub async fn blob(
        &self,
        blob: &Descriptor,
        mut ingest: Ingest,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), Error> {
        let what = format!("blob {}", blob.digest);
        let desc = descriptor(blob);
        let offset = ingest.offset();
        let mut stream = if offset > 0 && offset < blob.size {
            match self
                .client
                .pull_blob_stream_partial(&self.reference, &desc, offset, None)
                .await
                .map_err(|e| self.fetch_error(&what, &e))?
            {
                BlobResponse::Partial(s) => {
                    tracing::info!(digest = %blob.digest, offset, "resuming download");
                    s.stream
                }
                BlobResponse::Full(s) => {
                    ingest
                        .restart()
                        .map_err(|e| Error::Content(e, self.endpoint.clone()))?;
                    s.stream
                }
            }
        } else {
            self.client
                .pull_blob_stream(&self.reference, &desc)
                .await
                .map_err(|e| self.fetch_error(&what, &e))?
                .stream
        };
        progress(ingest.offset());
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                // oci-client checks the digest at the stream's end; the
                // bytes written are worthless for a resume.
                Err(e) => {
                    if let Some(DigestError::VerificationError { expected, actual }) = e
                        .get_ref()
                        .and_then(|inner| inner.downcast_ref::<DigestError>())
                    {
                        let mismatch = content::Error::Mismatch {
                            expected: expected.clone(),
                            actual: actual.clone(),
                        };
                        ingest.discard();
                        return Err(Error::Content(mismatch, self.endpoint.clone()));
                    }
                    return Err(Error::Fetch {
                        endpoint: self.endpoint.clone(),
                        what: what.clone(),
                        reason: e.to_string(),
                    });
                }
            };
            // A blocking write of at most one chunk; the content store is
            // local disk.
            ingest
                .write(&chunk)
                .map_err(|e| Error::Content(e, self.endpoint.clone()))?;
            progress(ingest.offset());
        }
        ingest
            .commit()
            .map_err(|e| Error::Content(e, self.endpoint.clone()))
    }
}
