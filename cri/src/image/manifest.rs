//! OCI and Docker schema 2 manifests and indexes, as registries and image
//! archives send them (hostile input: parsed strictly, bounded, fuzzed).

use serde::Deserialize;

use super::content::Digest;

/// Larger manifests are refused (containerd's limit is 4 MiB as well).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Every manifest media type we accept when resolving a reference.
pub const ACCEPTED: &[&str] = &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("manifest larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge,
    #[error("malformed manifest: {0}")]
    Malformed(String),
    #[error("unsupported manifest type '{0}'")]
    Unsupported(String),
    #[error("no linux/amd64 image in the index (it has: {0})")]
    NoPlatform(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// An image manifest: the config and the layers, bottom first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// What a reference resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Manifest(Manifest),
    /// An index or manifest list, already narrowed to linux/amd64.
    Index(Descriptor),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
}

impl RawDescriptor {
    fn validate(self) -> Result<Descriptor, Error> {
        let digest = Digest::parse(&self.digest).map_err(|e| Error::Malformed(e.to_string()))?;
        let size = u64::try_from(self.size)
            .map_err(|_| Error::Malformed(format!("negative size for {digest}")))?;
        Ok(Descriptor {
            media_type: self.media_type,
            digest,
            size,
        })
    }
}

/// Parses a manifest or index; `content_type` is the HTTP Content-Type or
/// the descriptor's media type (may be empty: then the body's own
/// `mediaType`, or its shape, decides).
pub fn parse(data: &[u8], content_type: &str) -> Result<Parsed, Error> {
    if data.len() > MAX_MANIFEST_BYTES {
        return Err(Error::TooLarge);
    }
    let raw: RawManifest =
        serde_json::from_slice(data).map_err(|e| Error::Malformed(e.to_string()))?;
    if raw.schema_version.is_some_and(|v| v != 2) {
        return Err(Error::Unsupported(format!(
            "schema version {}",
            raw.schema_version.unwrap_or_default()
        )));
    }
    let kind = raw
        .media_type
        .clone()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| content_type.to_string());
    let is_index = match kind.as_str() {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        "" => raw.manifests.is_some(),
        other => return Err(Error::Unsupported(other.to_string())),
    };
    if is_index {
        return select_platform(raw.manifests.unwrap_or_default()).map(Parsed::Index);
    }
    let config = raw
        .config
        .ok_or_else(|| Error::Malformed("no config".into()))?
        .validate()?;
    let layers = raw
        .layers
        .unwrap_or_default()
        .into_iter()
        .map(RawDescriptor::validate)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Parsed::Manifest(Manifest { config, layers }))
}

/// The linux/amd64 entry of an index (the guest is x86_64 Linux).
fn select_platform(entries: Vec<RawDescriptor>) -> Result<Descriptor, Error> {
    let mut seen = Vec::new();
    for entry in entries {
        let (os, arch) = entry
            .platform
            .as_ref()
            .map(|p| (p.os.clone(), p.architecture.clone()))
            .unwrap_or_default();
        if os == "linux" && arch == "amd64" {
            return entry.validate();
        }
        seen.push(format!("{os}/{arch}"));
    }
    Err(Error::NoPlatform(if seen.is_empty() {
        "nothing".into()
    } else {
        seen.join(", ")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn manifests_of_both_kinds_parse() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
               "config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{}","size":5}},
               "layers":[{{"mediaType":"x","digest":"{}","size":7}}]}}"#,
            hex('a'),
            hex('b')
        );
        let Parsed::Manifest(m) = parse(body.as_bytes(), "").unwrap() else {
            panic!("not a manifest")
        };
        assert_eq!(m.config.size, 5);
        assert_eq!(m.layers[0].digest.as_str(), hex('b'));
        let oci = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}","size":5}},"layers":[]}}"#,
            hex('c')
        );
        assert!(matches!(
            parse(oci.as_bytes(), OCI_MANIFEST),
            Ok(Parsed::Manifest(_))
        ));
    }

    #[test]
    fn indexes_resolve_to_linux_amd64() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
                {{"digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
                {{"digest":"{}","size":2,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            hex('a'),
            hex('d')
        );
        let Parsed::Index(d) = parse(body.as_bytes(), "").unwrap() else {
            panic!("not an index")
        };
        assert_eq!(d.digest.as_str(), hex('d'));
        let arm_only = format!(
            r#"{{"manifests":[{{"digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}}]}}"#,
            hex('a')
        );
        let err = parse(arm_only.as_bytes(), OCI_INDEX).unwrap_err();
        assert!(err.to_string().contains("linux/arm64"), "{err}");
    }

    #[test]
    fn malformed_manifests_are_refused() {
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), ""),
            (b"{".to_vec(), ""),
            (b"[]".to_vec(), ""),
            (br#"{"schemaVersion":1}"#.to_vec(), ""),
            (br#"{"mediaType":"text/html"}"#.to_vec(), ""),
            (
                br#"{"config":{"digest":"sha256:zz","size":1}}"#.to_vec(),
                OCI_MANIFEST,
            ),
            (
                format!(r#"{{"config":{{"digest":"{}","size":-1}}}}"#, hex('a')).into_bytes(),
                OCI_MANIFEST,
            ),
            (br#"{"layers":[]}"#.to_vec(), OCI_MANIFEST),
            (big, ""),
        ];
        for (body, kind) in cases {
            assert!(
                parse(&body, kind).is_err(),
                "{:?}",
                String::from_utf8_lossy(&body[..body.len().min(80)])
            );
        }
    }
}
