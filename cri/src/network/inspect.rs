//! What the CNI plugins gave the pod's interface, read back from its
//! namespace: the addresses and routes the guest's interface must get.
//! Read from the kernel rather than from the CNI result because plugins
//! set up more than they report (ptp's and Calico's link routes to the
//! gateway, a /32 address with a route to a gateway outside it).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use super::tap;

/// The main routing table.
const MAIN_TABLE: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Netlink(#[from] tap::Error),
    #[error(transparent)]
    Netns(#[from] super::netns::Error),
}

/// The guest interface's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Addresses with their prefix lengths (IPv6 link-local left out: the
    /// guest makes its own).
    pub addresses: Vec<(IpAddr, u8)>,
    /// Routes through the interface, device routes first.
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None`: the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub metric: u32,
}

impl Route {
    /// "10.0.0.0/8", or "" for a default route.
    pub fn destination_text(&self) -> String {
        self.destination
            .map(|(ip, len)| format!("{ip}/{len}"))
            .unwrap_or_default()
    }
}

/// Reads `name`'s addresses and routes in the namespace at `netns`.
pub fn interface(netns: &Path, name: &str) -> Result<Interface, Error> {
    let owned = netns.to_path_buf();
    let name = name.to_string();
    super::netns::run_in(netns, move || {
        tap::with_netlink(&owned, |handle| read(handle, owned.clone(), name)).map_err(Error::from)
    })
}

async fn read(handle: Handle, netns: PathBuf, name: String) -> Result<Interface, tap::Error> {
    let Some((link, _)) = tap::find_link(&handle, &netns, &name).await? else {
        return Err(tap::Error::NotFound { name, netns });
    };
    let list_error = |what| {
        let (name, netns) = (name.clone(), netns.clone());
        move |source| tap::Error::Lookup {
            name: format!("{name}'s {what}"),
            netns,
            source: Box::new(source),
        }
    };
    let addresses: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute()
        .try_collect()
        .await
        .map_err(list_error("addresses"))?;
    let mut routes = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let request = match version {
            IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        let found: Vec<RouteMessage> = handle
            .route()
            .get(request)
            .execute()
            .try_collect()
            .await
            .map_err(list_error("routes"))?;
        routes.extend(found);
    }
    Ok(Interface {
        addresses: addresses
            .iter()
            .filter(|m| m.header.index == link.index)
            .filter_map(address)
            .collect(),
        routes: guest_routes(&routes, link.index),
    })
}

/// An address the guest should have.
fn address(message: &AddressMessage) -> Option<(IpAddr, u8)> {
    let ip = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })?;
    (!is_link_local_v6(&ip)).then_some((ip, message.header.prefix_len))
}

/// The main table's unicast routes out of interface `index` that the
/// plugins made (the kernel's own, from the addresses, the guest makes
/// itself), device routes before routes through a gateway (the gateway
/// must be reachable when its route is added).
fn guest_routes(messages: &[RouteMessage], index: u32) -> Vec<Route> {
    let mut routes: Vec<Route> = messages
        .iter()
        .filter(|m| table(m) == MAIN_TABLE)
        .filter(|m| m.header.kind == RouteType::Unicast)
        .filter(|m| m.header.protocol != RouteProtocol::Kernel)
        .filter(|m| oif(m) == Some(index))
        .filter_map(route)
        .collect();
    routes.sort_by_key(|r| r.gateway.is_some());
    routes
}

/// fe80::/10: each side makes its own.
fn is_link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

fn table(message: &RouteMessage) -> u32 {
    message
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(message.header.table))
}

fn oif(message: &RouteMessage) -> Option<u32> {
    message.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn route(message: &RouteMessage) -> Option<Route> {
    let mut destination = None;
    let mut gateway = None;
    let mut source = None;
    let mut metric = 0;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(a) => destination = ip(a),
            RouteAttribute::Gateway(a) => gateway = ip(a),
            RouteAttribute::PrefSource(a) => source = ip(a),
            RouteAttribute::Priority(p) => metric = *p,
            _ => {}
        }
    }
    let prefix = message.header.destination_prefix_length;
    let destination = match destination {
        Some(ip) if prefix > 0 => Some((ip, prefix)),
        // A default route has no destination (or 0.0.0.0/0).
        _ if prefix == 0 => None,
        _ => return None,
    };
    // IPv6 link-local and multicast routes are the guest kernel's own.
    if let Some((ip @ IpAddr::V6(v6), _)) = destination {
        if is_link_local_v6(&ip) || v6.is_multicast() {
            return None;
        }
    }
    Some(Route {
        destination,
        gateway,
        source,
        metric,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::RouteHeader;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn message(
        dst: Option<(IpAddr, u8)>,
        gw: Option<IpAddr>,
        oif: u32,
        protocol: RouteProtocol,
    ) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header = RouteHeader {
            table: MAIN_TABLE as u8,
            kind: RouteType::Unicast,
            protocol,
            destination_prefix_length: dst.map_or(0, |(_, l)| l),
            ..m.header
        };
        let address = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => RouteAddress::Inet(v4),
            IpAddr::V6(v6) => RouteAddress::Inet6(v6),
        };
        if let Some((ip, _)) = dst {
            m.attributes.push(RouteAttribute::Destination(address(ip)));
        }
        if let Some(ip) = gw {
            m.attributes.push(RouteAttribute::Gateway(address(ip)));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        m
    }

    #[test]
    fn the_plugins_routes_are_kept_device_routes_first() {
        let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
        let messages = [
            // ptp: default via the gateway, the gateway as a link route.
            message(None, Some(v4(10, 1, 1, 1)), 2, RouteProtocol::Boot),
            message(Some((v4(10, 1, 1, 1), 32)), None, 2, RouteProtocol::Boot),
            // The kernel's subnet route from the address: the guest's own.
            message(Some((v4(10, 1, 1, 0), 24)), None, 2, RouteProtocol::Kernel),
            // Another interface's.
            message(Some((v4(10, 2, 0, 0), 16)), None, 3, RouteProtocol::Boot),
            // IPv6 link-local: the guest's own.
            message(
                Some((IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 64)),
                None,
                2,
                RouteProtocol::Boot,
            ),
        ];
        let routes = guest_routes(&messages, 2);
        assert_eq!(
            routes,
            [
                Route {
                    destination: Some((v4(10, 1, 1, 1), 32)),
                    gateway: None,
                    source: None,
                    metric: 0
                },
                Route {
                    destination: None,
                    gateway: Some(v4(10, 1, 1, 1)),
                    source: None,
                    metric: 0
                },
            ]
        );
        assert_eq!(routes[0].destination_text(), "10.1.1.1/32");
        assert_eq!(routes[1].destination_text(), "");
    }
}
