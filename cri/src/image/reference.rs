//! Image names as kubelet and users write them, normalized the way
//! containerd reports them: `busybox` is `docker.io/library/busybox:latest`,
//! a digest reference is `REPO@sha256:…`.

use oci_client::Reference;

use super::content::Digest;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("image reference is empty")]
    Empty,
    #[error("invalid image reference '{reference}': {reason}")]
    Invalid { reference: String, reason: String },
}

/// A normalized image reference: a repository plus a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `registry/repository`, e.g. `docker.io/library/busybox`.
    pub repo: String,
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl ImageRef {
    pub fn parse(input: &str) -> Result<ImageRef, Error> {
        let input = input.trim();
        if input.is_empty() {
            return Err(Error::Empty);
        }
        let invalid = |reason: String| Error::Invalid {
            reference: input.to_string(),
            reason,
        };
        // oci-spec's parser accepts a repository path only in lower case,
        // as the distribution spec does; it also normalizes docker.io.
        let parsed = Reference::try_from(input).map_err(|e| invalid(e.to_string()))?;
        // oci-spec files a first component with capitals ("Ab/c") under
        // docker.io as part of the repository, which the spec forbids
        // (found by the registry_documents fuzz target).
        if parsed.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("the repository must be lower case".into()));
        }
        let digest = parsed
            .digest()
            .map(|d| Digest::parse(d).map_err(|e| invalid(e.to_string())))
            .transpose()?;
        // With a digest, the tag is only decoration (containerd drops it).
        let tag = match digest {
            Some(_) => None,
            None => Some(parsed.tag().unwrap_or("latest").to_string()),
        };
        Ok(ImageRef {
            repo: format!("{}/{}", parsed.registry(), parsed.repository()),
            registry: parsed.registry().to_string(),
            repository: parsed.repository().to_string(),
            tag,
            digest,
        })
    }

    /// The reference as stored and reported: `repo:tag` or `repo@digest`.
    pub fn name(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => format!("{}@{digest}", self.repo),
            (None, Some(tag)) => format!("{}:{tag}", self.repo),
            (None, None) => self.repo.clone(),
        }
    }

    /// `repo@digest` for a manifest digest (a repo digest in CRI terms).
    pub fn with_digest(&self, digest: &Digest) -> String {
        format!("{}@{digest}", self.repo)
    }

    /// The reference oci-client pulls with.
    pub fn to_oci(&self) -> Reference {
        match (&self.digest, &self.tag) {
            (Some(d), _) => Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                d.to_string(),
            ),
            (None, tag) => Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                tag.clone().unwrap_or_else(|| "latest".into()),
            ),
        }
    }
}

/// What a CRI ImageSpec names: an image id (config digest, with or without
/// `sha256:`) or a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Id(Digest),
    Ref(ImageRef),
}

impl Lookup {
    pub fn parse(input: &str) -> Result<Lookup, Error> {
        let input = input.trim();
        if let Ok(digest) = Digest::parse(input) {
            return Ok(Lookup::Id(digest));
        }
        if input.len() == 64 && input.bytes().all(|b| b.is_ascii_hexdigit()) {
            if let Ok(digest) = Digest::parse(&format!("sha256:{}", input.to_ascii_lowercase())) {
                return Ok(Lookup::Id(digest));
            }
        }
        ImageRef::parse(input).map(Lookup::Ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_normalized_as_containerd_does() {
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(r.name(), "docker.io/library/busybox:latest");
        assert_eq!(r.registry, "docker.io");
        let r = ImageRef::parse("user/app:1.0").unwrap();
        assert_eq!(r.name(), "docker.io/user/app:1.0");
        let r = ImageRef::parse("registry.k8s.io/e2e-test-images/busybox:1.29-2").unwrap();
        assert_eq!(r.repo, "registry.k8s.io/e2e-test-images/busybox");
        assert_eq!(r.tag.as_deref(), Some("1.29-2"));
        let r = ImageRef::parse("127.0.0.1:5000/x/y").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.name(), "127.0.0.1:5000/x/y:latest");
    }

    #[test]
    fn digests_win_over_tags() {
        let hex = "a".repeat(64);
        let r = ImageRef::parse(&format!("busybox:1.0@sha256:{hex}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.name(), format!("docker.io/library/busybox@sha256:{hex}"));
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "",
            "   ",
            "upper/CASE",
            "I44/b7b",
            "a b",
            "busybox@sha256:short",
            "busybox@md5:0123456789abcdef0123456789abcdef",
            ":tag",
            "x:/",
            &"a".repeat(300),
            "busybox:tag with space",
            "\0",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn lookups_take_ids_and_references() {
        let hex = "b".repeat(64);
        let id = Digest::parse(&format!("sha256:{hex}")).unwrap();
        assert_eq!(
            Lookup::parse(&format!("sha256:{hex}")).unwrap(),
            Lookup::Id(id.clone())
        );
        assert_eq!(Lookup::parse(&hex).unwrap(), Lookup::Id(id));
        assert!(matches!(Lookup::parse("busybox").unwrap(), Lookup::Ref(_)));
    }
}
