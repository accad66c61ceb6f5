//! The guest's side of a pod network: its virtio NIC gets the MAC of the
//! CNI interface (so the host's bridge and neighbours stay valid), the
//! addresses and MTU the plugins gave that interface, and its routes.

use frakti_proto::agent::v1 as pb;

use super::{Result, agent_call};
use crate::network::{POD_IFNAME, inspect};
use crate::sandbox::agent::AgentClient;

/// Applies `nic` to the guest interface whose MAC is `mac` (it becomes
/// [`POD_IFNAME`]), before any container runs.
pub(crate) async fn configure(
    mut agent: AgentClient,
    mac: [u8; 6],
    mtu: u32,
    nic: &inspect::Interface,
) -> Result<()> {
    let interface = pb::Interface {
        name: POD_IFNAME.to_string(),
        mac: mac.map(|b| format!("{b:02x}")).join(":"),
        mtu,
        addresses: nic
            .addresses
            .iter()
            .map(|(ip, prefix_len)| pb::IpAddress {
                address: ip.to_string(),
                prefix_len: u32::from(*prefix_len),
            })
            .collect(),
        up: true,
    };
    agent_call(
        "UpdateInterface",
        agent.update_interface(pb::UpdateInterfaceRequest {
            interface: Some(interface),
        }),
    )
    .await?;
    let routes = nic
        .routes
        .iter()
        .map(|r| pb::Route {
            destination: r.destination_text(),
            gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
            device: POD_IFNAME.to_string(),
            source: r.source.map(|s| s.to_string()).unwrap_or_default(),
            metric: r.metric,
        })
        .collect();
    agent_call(
        "UpdateRoutes",
        agent.update_routes(pb::UpdateRoutesRequest { routes }),
    )
    .await?;
    Ok(())
}
