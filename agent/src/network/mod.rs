//! The guest's network: interfaces (name, MTU, addresses, link state),
//! routes and permanent neighbour entries, configured over rtnetlink.
//!
//! The host hands each interface over by MAC address (the VMM chose it);
//! the agent renames it, sets its MTU and addresses and brings it up. The
//! loopback interface is the agent's own: it stays up and is never
//! reconfigured. Every request is checked in full before anything
//! changes, so a bad address leaves the guest as it was.
//!
//! The netlink socket is a plain blocking one: each call sends one request
//! and reads until the kernel's acknowledgement (or the end of a dump);
//! the server runs these calls on the blocking pool.
//!
//! Here: errors, links and interfaces; `addr.rs` parses and checks MACs,
//! names and CIDRs, `netlink.rs` is the socket and its requests,
//! `routes.rs` and `neighbors.rs` the routing table and neighbour entries.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use frakti_proto::agent::v1 as pb;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("cannot open a netlink socket")]
    Socket(#[source] io::Error),
    /// The kernel refused a request (`what` names it).
    #[error("cannot {what}")]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The kernel found the request itself wrong (a gateway that is not
    /// on-link, an MTU the device cannot take...), as opposed to failing.
    pub fn is_refused_argument(&self) -> bool {
        match self {
            Error::Kernel { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::EINVAL | libc::ERANGE | libc::ENETUNREACH | libc::EADDRNOTAVAIL)
            ),
            _ => false,
        }
    }
}

fn kernel(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Kernel { what, source }
}

mod addr;
mod neighbors;
mod netlink;
mod routes;

use addr::*;
pub use addr::{Cidr, parse_mac};
pub use neighbors::add_neighbors;
pub use netlink::Netlink;
use netlink::*;
pub use routes::{list_routes, update_routes};

/// A link as the kernel reports it.
#[derive(Clone, Debug)]
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
    mtu: u32,
    up: bool,
    loopback: bool,
}

fn interface(link: &Link, addresses: &HashMap<u32, Vec<Cidr>>) -> pb::Interface {
    pb::Interface {
        name: link.name.clone(),
        mac: format_mac(&link.mac),
        mtu: link.mtu,
        addresses: addresses
            .get(&link.index)
            .into_iter()
            .flatten()
            .map(|c| pb::IpAddress {
                address: c.ip.to_string(),
                prefix_len: c.prefix_len.into(),
            })
            .collect(),
        up: link.up,
    }
}

/// Every interface, loopback included.
pub fn list_interfaces(netlink: &mut Netlink) -> Result<Vec<pb::Interface>, Error> {
    let links = netlink.links()?;
    let addresses = netlink.addresses()?;
    Ok(links.iter().map(|l| interface(l, &addresses)).collect())
}

/// Configures the interface with `wanted.mac` (or, without a MAC, the one
/// named `wanted.name`): name, MTU, addresses (replacing the old ones but
/// the IPv6 link-local one), link state. Gives the interface as it now is.
pub fn update_interface(
    netlink: &mut Netlink,
    wanted: &pb::Interface,
) -> Result<pb::Interface, Error> {
    let mac = match wanted.mac.as_str() {
        "" => None,
        mac => Some(parse_mac(mac)?),
    };
    if !wanted.name.is_empty() {
        check_name(&wanted.name)?;
    }
    let mut addresses = Vec::new();
    for a in &wanted.addresses {
        let ip = parse_ip("address", &a.address)?;
        let prefix_len = check_prefix("address", &ip, a.prefix_len)?;
        addresses.push(Cidr { ip, prefix_len });
    }
    let links = netlink.links()?;
    let mut link = match (mac, wanted.name.as_str()) {
        (Some(mac), _) => links
            .iter()
            .find(|l| l.mac == mac)
            .ok_or_else(|| Error::NotFound(format!("no interface has MAC {}", wanted.mac)))?,
        (None, "") => {
            return Err(Error::Invalid(
                "the interface has neither a MAC address nor a name".into(),
            ));
        }
        (None, name) => links
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| Error::NotFound(format!("no interface is named '{name}'")))?,
    }
    .clone();
    if link.loopback {
        return Err(Error::Invalid(format!(
            "{} is the loopback interface: the agent keeps it as it is",
            link.name
        )));
    }
    let rename = !wanted.name.is_empty() && wanted.name != link.name;
    if rename && links.iter().any(|l| l.name == wanted.name) {
        return Err(Error::Exists(format!(
            "another interface is already named '{}'",
            wanted.name
        )));
    }
    if rename {
        // Most drivers refuse to rename a running interface.
        if link.up {
            netlink.set_up(&link, false)?;
            link.up = false;
        }
        let name = wanted.name.clone();
        netlink.set_link(&link, &format!("rename to {name}"), |m| {
            m.attributes.push(LinkAttribute::IfName(name.clone()))
        })?;
        link.name = wanted.name.clone();
    }
    if wanted.mtu != 0 && wanted.mtu != link.mtu {
        let mtu = wanted.mtu;
        netlink.set_link(&link, &format!("set the MTU to {mtu}"), |m| {
            m.attributes.push(LinkAttribute::Mtu(mtu))
        })?;
    }
    let current = netlink.addresses()?.remove(&link.index).unwrap_or_default();
    for old in &current {
        if !addresses.contains(old) && !is_ipv6_link_local(&old.ip) {
            netlink.delete_address(&link, old)?;
        }
    }
    for new in &addresses {
        netlink.add_address(&link, new)?;
    }
    if wanted.up != link.up {
        netlink.set_up(&link, wanted.up)?;
    }
    let links = netlink.links()?;
    let link = links
        .iter()
        .find(|l| l.index == link.index)
        .ok_or_else(|| Error::NotFound(format!("interface {} went away", link.name)))?;
    Ok(interface(link, &netlink.addresses()?))
}
