//! Internal errors to gRPC status codes: the one place that decides what a
//! client (kubelet, crictl, the CLI) sees. Messages carry the whole cause
//! chain, so "every endpoint tried and why" reaches the caller.

use std::io;

use tonic::{Code, Status};

use crate::image::store::Error as StoreError;
use crate::image::{build, content, manifest, records, registry, unpack};
use crate::runtime::Error as RuntimeError;

fn io_code(err: &(dyn std::error::Error + 'static)) -> Option<Code> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(match io.kind() {
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                    Code::ResourceExhausted
                }
                io::ErrorKind::NotFound => Code::NotFound,
                io::ErrorKind::PermissionDenied => Code::PermissionDenied,
                _ => Code::Internal,
            });
        }
        source = e.source();
    }
    None
}

pub fn image_code(err: &StoreError) -> Code {
    match err {
        StoreError::Shared(inner) => image_code(inner),
        StoreError::Reference(_) | StoreError::InvalidArchive(_) | StoreError::Auth(_) => {
            Code::InvalidArgument
        }
        StoreError::NotFound(_) => Code::NotFound,
        StoreError::Registry(registry::Error::NotFound { .. }) => Code::NotFound,
        StoreError::Registry(registry::Error::AllEndpointsFailed { .. }) => Code::Unavailable,
        StoreError::Registry(registry::Error::Content(content::Error::Mismatch { .. }, _))
        | StoreError::Content(
            content::Error::Mismatch { .. } | content::Error::SizeMismatch { .. },
        ) => Code::DataLoss,
        StoreError::Registry(_) => Code::Unavailable,
        StoreError::Hosts(_) => Code::FailedPrecondition,
        StoreError::Manifest(manifest::Error::NoPlatform(_))
        | StoreError::Record(records::Error::Platform { .. }) => Code::FailedPrecondition,
        StoreError::Manifest(_)
        | StoreError::Record(records::Error::BadConfig(_) | records::Error::LayerCount { .. }) => {
            Code::InvalidArgument
        }
        StoreError::Build(build::Error::Unpack {
            source: unpack_err, ..
        }) if !matches!(unpack_err, unpack::Error::Io { .. }) => {
            // A layer that tries to escape or is malformed: the image is bad.
            io_code(unpack_err)
                .filter(|c| *c == Code::ResourceExhausted)
                .unwrap_or(Code::FailedPrecondition)
        }
        StoreError::Build(build::Error::DiffId { .. }) => Code::DataLoss,
        StoreError::Closed => Code::Unavailable,
        other => io_code(other).unwrap_or(Code::Internal),
    }
}

pub fn image_status(err: StoreError) -> Status {
    let code = image_code(&err);
    if code == Code::Internal {
        tracing::error!("{}", crate::error_chain(&err));
    }
    Status::new(code, crate::error_chain(&err))
}

pub fn runtime_code(err: &RuntimeError) -> Code {
    match err {
        RuntimeError::NotFound { .. } => Code::NotFound,
        RuntimeError::InvalidArgument(_) => Code::InvalidArgument,
        RuntimeError::AlreadyExists(_) => Code::AlreadyExists,
        RuntimeError::FailedPrecondition(_) | RuntimeError::TooBig(_) => Code::FailedPrecondition,
        RuntimeError::DeadlineExceeded(_) => Code::DeadlineExceeded,
        RuntimeError::Spec(e) if e.is_invalid_argument() => Code::InvalidArgument,
        RuntimeError::Spec(_) => Code::FailedPrecondition,
        RuntimeError::Sizing(_) => Code::InvalidArgument,
        RuntimeError::Image(e) => image_code(e),
        // The guest said the request was wrong: so is the caller's.
        RuntimeError::Agent { status, .. } => match status.code() {
            Code::InvalidArgument => Code::InvalidArgument,
            Code::FailedPrecondition => Code::FailedPrecondition,
            _ => Code::Internal,
        },
        RuntimeError::AgentTimeout(_) => Code::DeadlineExceeded,
        RuntimeError::AgentConnect(_) => Code::Unavailable,
        // No configuration yet: kubelet waits for NetworkReady.
        RuntimeError::Network(crate::network::Error::NotReady(_)) => Code::FailedPrecondition,
        // A plugin's failure is the node's network set-up's, reported
        // with the plugin's message (as kubelet's other runtimes do).
        RuntimeError::Network(_) => Code::Unknown,
        other => io_code(other).unwrap_or(Code::Internal),
    }
}

pub fn runtime_status(err: RuntimeError) -> Status {
    let code = runtime_code(&err);
    if code == Code::Internal {
        tracing::error!("{}", crate::error_chain(&err));
    }
    Status::new(code, crate::error_chain(&err))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::reference::ImageRef;

    #[test]
    fn runtime_errors_map_to_their_codes() {
        let not_found = RuntimeError::NotFound {
            kind: "container",
            id: "abc".into(),
        };
        assert_eq!(runtime_code(&not_found), Code::NotFound);
        assert_eq!(
            runtime_status(not_found).message(),
            "container abc not found"
        );
        let exists = RuntimeError::AlreadyExists("name".into());
        assert_eq!(runtime_code(&exists), Code::AlreadyExists);
        let guest = RuntimeError::Agent {
            call: "CreateContainer",
            status: Status::invalid_argument("bad spec"),
        };
        assert_eq!(runtime_code(&guest), Code::InvalidArgument);
        let crash = RuntimeError::Agent {
            call: "CreateContainer",
            status: Status::internal("mount failed"),
        };
        assert_eq!(runtime_code(&crash), Code::Internal);
    }

    #[test]
    fn codes_follow_the_cause() {
        let bad_ref = StoreError::from(ImageRef::parse("UPPER").unwrap_err());
        assert_eq!(image_code(&bad_ref), Code::InvalidArgument);
        let not_found = StoreError::Registry(registry::Error::NotFound {
            image: "x".into(),
            attempts: vec!["http://a/v2: not found".into()],
        });
        assert_eq!(image_code(&not_found), Code::NotFound);
        let shared = StoreError::Shared(std::sync::Arc::new(not_found));
        assert_eq!(image_code(&shared), Code::NotFound);
        let full = StoreError::Io {
            what: "cannot write",
            path: "/x".into(),
            source: io::Error::from(io::ErrorKind::StorageFull),
        };
        assert_eq!(image_code(&full), Code::ResourceExhausted);
        let status = image_status(full);
        assert!(
            status.message().contains("cannot write /x"),
            "{}",
            status.message()
        );
    }
}
