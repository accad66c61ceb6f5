//! The protocol between Frakti's host side (VMM, daemon, tests) and the
//! in-guest agent: how the agent announces readiness, on the console (the
//! ready line) and to the VMM (the boot-done I/O port), and the agent's gRPC
//! API (`proto/agent.proto`, package `frakti.agent.v1`), served on vsock port
//! [`AGENT_VSOCK_PORT`].

pub mod id_ranges;
pub mod ready;

/// The agent API, generated from `proto/agent.proto`: the client
/// (`agent_client::AgentClient`), the server trait (`agent_server::Agent`)
/// and the messages.
pub mod agent {
    /// Version 1 of the API; see the comments in `agent.proto`.
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("frakti.agent.v1");
    }
}

/// The daemon's own image API (`proto/images.proto`, package
/// `frakti.images.v1`): import, export and pulls with progress, for the CLI.
pub mod images {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("frakti.images.v1");
    }
}

/// The daemon's own container API (`proto/containers.proto`, package
/// `frakti.containers.v1`): what the CLI needs beyond CRI (signals).
pub mod containers {
    pub mod v1 {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("frakti.containers.v1");
    }
}

/// An error with its sources, `: `-separated: what went wrong down to the
/// root cause, in one line (tonic's transport error, for one, says only
/// "transport error" by itself). A source whose text the line already ends
/// with (common in reqwest and oci-client errors) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The vsock port the agent serves its API on (the guest's CID is the one
/// the VMM gives the vsock device).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The minor version of the v1 agent API this crate defines; bumped when an
/// RPC or a field is added (reported by `GetVersion`).
pub const AGENT_API_VERSION: u32 = 3;

/// The agent writes [`BOOT_DONE_VALUE`] to this x86 I/O port once it is ready;
/// the VMM records the time since its own start. Elsewhere (QEMU) the write
/// goes to an unassigned port and is ignored.
pub const BOOT_DONE_PORT: u16 = 0x0ff0;
/// The byte written to [`BOOT_DONE_PORT`].
pub const BOOT_DONE_VALUE: u8 = 0x7b;

/// Kernel command-line parameter (passed to the agent as an environment
/// variable) that says what the agent does after its ready line:
/// `reset` (reset the VM at once, for boot tests and benchmarks) or `wait`
/// (stay up until asked to shut down; the default).
pub const AFTER_READY_PARAM: &str = "frakti_after_ready";

/// Kernel command-line parameter: `frakti_dump_kmsg=1` makes the agent print
/// the kernel log (with timestamps) after its ready line, for boot profiling
/// with `quiet`, where the console prints nothing while booting.
pub const DUMP_KMSG_PARAM: &str = "frakti_dump_kmsg";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_names_every_cause() {
        let inner = std::io::Error::other("disk on fire");
        let outer = std::io::Error::new(std::io::ErrorKind::NotFound, inner);
        assert_eq!(error_chain(&outer), "disk on fire");
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("cannot start")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let wrapped = Wrapper(std::io::Error::other("no space"));
        assert_eq!(error_chain(&wrapped), "cannot start: no space");
        // A parent that already quotes its source does not repeat it.
        #[derive(Debug)]
        struct Quoting(std::io::Error);
        impl std::fmt::Display for Quoting {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "transport error: {}", self.0)
            }
        }
        impl std::error::Error for Quoting {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let quoting = Quoting(std::io::Error::other("refused"));
        assert_eq!(error_chain(&quoting), "transport error: refused");
    }

    use prost::Message;

    use super::agent::v1::{CreateContainerRequest, Rootfs, rootfs};

    #[test]
    fn messages_round_trip() {
        let request = CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec_json: b"{}".to_vec(),
            rootfs: Some(Rootfs {
                source: Some(rootfs::Source::DiskId("image0".into())),
                writable_overlay: true,
                ..Default::default()
            }),
            devices: vec![],
        };
        let bytes = request.encode_to_vec();
        assert_eq!(CreateContainerRequest::decode(&*bytes).unwrap(), request);
    }

    #[test]
    fn service_path_is_versioned() {
        assert_eq!(
            <super::agent::v1::agent_server::AgentServer<()> as tonic::server::NamedService>::NAME,
            "frakti.agent.v1.Agent"
        );
    }
}
