#![no_main]

//! What registries, archives and API clients send besides layers:
//! manifests and indexes (under every media type), image configs and image
//! references, and the Location/WWW-Authenticate headers the
//! client-certificate forwarder rewrites. None may panic; what parses must
//! be self-consistent.

use frakti_cri::image::client_tls;
use frakti_cri::image::manifest::{self, Parsed};
use frakti_cri::image::records::ImageConfig;
use frakti_cri::image::reference::{ImageRef, Lookup};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for kind in ["", manifest::OCI_MANIFEST, manifest::OCI_INDEX, manifest::DOCKER_LIST] {
        if let Ok(Parsed::Manifest(m)) = manifest::parse(data, kind) {
            assert!(m.config.digest.as_str().starts_with("sha256:"));
        }
    }
    if let Ok(config) = ImageConfig::parse(data) {
        let _ = config.user();
        let _ = config.check_platform();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(r) = ImageRef::parse(text) {
            // A normalized name parses to itself.
            assert_eq!(ImageRef::parse(&r.name()).map(|again| again.name()).ok(), Some(r.name()));
        }
        let _ = Lookup::parse(text);
        // A rewrite only swaps the origin for the forwarder: undone, it
        // gives the header back.
        let (origin, local) = ("https://reg:5000", "http://127.0.0.1:1/s");
        if let Some(out) = client_tls::rewrite_value(text, origin, local) {
            if text.starts_with('/') {
                assert_eq!(out.strip_prefix(local), Some(text), "{out}");
            } else {
                assert_eq!(out.replace(local, origin), text.replace(local, origin), "{out}");
            }
        }
    }
});
