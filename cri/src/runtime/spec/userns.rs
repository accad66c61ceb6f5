//! User namespaces (`userns_options`, kubelet's `hostUsers: false`). A pod
//! with mode POD gets one user namespace in the guest with kubelet's
//! mappings and every container of the pod is in it: the agent builds the
//! container's root as guest root, sees the image and the volumes through
//! idmapped mounts, then enters the namespace (agent `idmap.rs`). The
//! mappings' "host" ids are guest ids: the VM stays the boundary to the
//! node, the user namespace is a second one inside it.

use std::collections::HashMap;

use frakti_proto::id_ranges::{self, Range};
use k8s_cri::v1 as cri;
use oci_spec::runtime::{
    LinuxIdMapping, LinuxIdMappingBuilder, LinuxNamespace, LinuxNamespaceType,
};

use super::{Error, invalid, unsupported};

/// Where kubelet puts a pod's user namespace options.
pub const POD_FIELD: &str = "linux.security_context.namespace_options.userns_options";
/// And a container's.
const CONTAINER_FIELD: &str = "linux.security_context.namespace_options.userns_options";

/// A user namespace's mappings, checked as the agent and the kernel will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mappings {
    pub uids: Vec<Range>,
    pub gids: Vec<Range>,
}

/// The mappings `options` (at `field`) ask for: `None` for NODE or none.
pub fn mappings(
    options: Option<&cri::UserNamespace>,
    field: &str,
) -> Result<Option<Mappings>, Error> {
    let Some(options) = options else {
        return Ok(None);
    };
    let convert = |ranges: &[cri::IdMapping]| -> Vec<Range> {
        ranges
            .iter()
            .map(|m| Range {
                container: m.container_id,
                host: m.host_id,
                size: m.length,
            })
            .collect()
    };
    let mappings = Mappings {
        uids: convert(&options.uids),
        gids: convert(&options.gids),
    };
    let mode_field = format!("{field}.mode");
    match cri::NamespaceMode::try_from(options.mode) {
        Err(_) => Err(invalid(
            mode_field,
            format!("unknown namespace mode {}", options.mode),
        )),
        Ok(cri::NamespaceMode::Node) => {
            if mappings.uids.is_empty() && mappings.gids.is_empty() {
                Ok(None)
            } else {
                Err(invalid(
                    field,
                    "uids and gids are for mode POD; NODE (the guest's user namespace) takes none",
                ))
            }
        }
        Ok(cri::NamespaceMode::Pod) => {
            for (ranges, kind) in [(&mappings.uids, "uids"), (&mappings.gids, "gids")] {
                id_ranges::check(ranges).map_err(|why| invalid(format!("{field}.{kind}"), why))?;
            }
            Ok(Some(mappings))
        }
        Ok(cri::NamespaceMode::Container | cri::NamespaceMode::Target) => Err(unsupported(
            mode_field,
            "only POD (one user namespace for the pod) and NODE are supported",
        )),
    }
}

/// The pod's mappings, from its sandbox config.
pub fn of_pod(sandbox: &cri::PodSandboxConfig) -> Result<Option<Mappings>, Error> {
    let options = sandbox
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .and_then(|n| n.userns_options.as_ref());
    mappings(options, POD_FIELD)
}

/// The user namespace a container is in: the pod's. kubelet repeats the
/// pod's options in the container's; different ones are refused, as a pod
/// has one user namespace.
pub(super) fn of_container(
    sc: &cri::LinuxContainerSecurityContext,
    sandbox: &cri::PodSandboxConfig,
) -> Result<Option<Mappings>, Error> {
    let pod = of_pod(sandbox)?;
    let own = sc
        .namespace_options
        .as_ref()
        .and_then(|n| n.userns_options.as_ref());
    match (pod, mappings(own, CONTAINER_FIELD)?) {
        (Some(pod), Some(own)) if pod != own => Err(invalid(
            CONTAINER_FIELD,
            "the container's mappings differ from its pod's: a pod has one user namespace",
        )),
        (None, Some(_)) => Err(invalid(
            CONTAINER_FIELD,
            "the container asks for a user namespace its pod does not have \
             (the sandbox's userns_options)",
        )),
        (pod, _) => Ok(pod),
    }
}

/// The spec's user namespace entry and its mappings.
pub(super) fn oci(
    mappings: &Mappings,
) -> Result<(LinuxNamespace, Vec<LinuxIdMapping>, Vec<LinuxIdMapping>), Error> {
    let mut ns = LinuxNamespace::default();
    ns.set_typ(LinuxNamespaceType::User);
    ns.set_path(None);
    let convert = |ranges: &[Range]| -> Result<Vec<LinuxIdMapping>, Error> {
        ranges
            .iter()
            .map(|r| {
                LinuxIdMappingBuilder::default()
                    .container_id(r.container)
                    .host_id(r.host)
                    .size(r.size)
                    .build()
                    .map_err(|e| invalid(CONTAINER_FIELD, e.to_string()))
            })
            .collect()
    };
    Ok((ns, convert(&mappings.uids)?, convert(&mappings.gids)?))
}

/// The pod's sysctls for its guest. In a user namespace a container's root
/// has no capability over the guest's network namespace, so low ports and
/// ping are opened to every user (unless the pod sets them), as containerd
/// does for every pod (`enable_unprivileged_ports`/`_icmp`).
pub fn sandbox_sysctls(
    sysctls: &HashMap<String, String>,
    in_userns: bool,
) -> HashMap<String, String> {
    let mut out = sysctls.clone();
    if in_userns {
        for (key, value) in [
            ("net.ipv4.ip_unprivileged_port_start", "0"),
            ("net.ipv4.ping_group_range", "0 2147483647"),
        ] {
            out.entry(key.to_string())
                .or_insert_with(|| value.to_string());
        }
    }
    out
}
