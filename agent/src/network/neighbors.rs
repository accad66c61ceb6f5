//! Permanent neighbour entries.

use super::*;

/// Adds (or replaces) permanent neighbour entries; all are checked first.
pub fn add_neighbors(netlink: &mut Netlink, neighbors: &[pb::Neighbor]) -> Result<(), Error> {
    let links = netlink.links()?;
    let mut messages = Vec::new();
    for n in neighbors {
        let ip = parse_ip("neighbour address", &n.ip)?;
        let mac = parse_mac(&n.mac)?;
        if n.device.is_empty() {
            return Err(Error::Invalid(format!("neighbour {ip} has no device")));
        }
        let link = links.iter().find(|l| l.name == n.device).ok_or_else(|| {
            Error::NotFound(format!(
                "neighbour {ip}: no interface is named '{}'",
                n.device
            ))
        })?;
        let mut message = NeighbourMessage::default();
        message.header.family = family(&ip);
        message.header.ifindex = link.index;
        message.header.state = NeighbourState::Permanent;
        message
            .attributes
            .push(NeighbourAttribute::Destination(match ip {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        messages.push((format!("add neighbour {ip} on {}", n.device), message));
    }
    for (what, message) in messages {
        netlink
            .change(
                RouteNetlinkMessage::NewNeighbour(message),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .map_err(kernel(what))?;
    }
    Ok(())
}
