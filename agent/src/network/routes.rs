//! The main routing table: routes checked in full, then replaced.

use super::*;

/// A route checked and resolved to interface indexes.
struct NewRoute {
    text: String,
    destination: Cidr,
    gateway: Option<IpAddr>,
    device: Option<u32>,
    source: Option<IpAddr>,
    metric: u32,
}

fn check_route(route: &pb::Route, links: &[Link]) -> Result<NewRoute, Error> {
    let gateway = match route.gateway.as_str() {
        "" => None,
        gw => Some(parse_ip("gateway", gw)?),
    };
    let destination = match (route.destination.as_str(), gateway) {
        ("" | "default", Some(IpAddr::V4(_))) => Cidr {
            ip: Ipv4Addr::UNSPECIFIED.into(),
            prefix_len: 0,
        },
        ("" | "default", Some(IpAddr::V6(_))) => Cidr {
            ip: Ipv6Addr::UNSPECIFIED.into(),
            prefix_len: 0,
        },
        ("" | "default", None) => {
            return Err(Error::Invalid(
                "a route has neither a destination nor a gateway".into(),
            ));
        }
        (text, _) => Cidr::parse_network(text)?,
    };
    let source = match route.source.as_str() {
        "" => None,
        src => Some(parse_ip("source", src)?),
    };
    let text = format!(
        "{destination}{}{}",
        gateway.map(|g| format!(" via {g}")).unwrap_or_default(),
        if route.device.is_empty() {
            String::new()
        } else {
            format!(" dev {}", route.device)
        }
    );
    for ip in gateway.iter().chain(source.iter()) {
        if ip.is_ipv4() != destination.ip.is_ipv4() {
            return Err(Error::Invalid(format!(
                "route {text}: {ip} is not of the destination's family"
            )));
        }
    }
    let device = match route.device.as_str() {
        "" if gateway.is_none() => {
            return Err(Error::Invalid(format!(
                "route {text} has neither a gateway nor a device"
            )));
        }
        "" => None,
        name => Some(
            links
                .iter()
                .find(|l| l.name == name)
                .ok_or_else(|| {
                    Error::NotFound(format!("route {text}: no interface is named '{name}'"))
                })?
                .index,
        ),
    };
    Ok(NewRoute {
        text,
        destination,
        gateway,
        device,
        source,
        metric: route.metric,
    })
}

/// Replaces the routes of the main table on every interface but loopback
/// (the kernel's own routes for the interfaces' addresses stay) with
/// `routes`, added in order. Gives the routes as they now are.
pub fn update_routes(netlink: &mut Netlink, routes: &[pb::Route]) -> Result<Vec<pb::Route>, Error> {
    let links = netlink.links()?;
    let new = routes
        .iter()
        .map(|r| check_route(r, &links))
        .collect::<Result<Vec<_>, _>>()?;
    let loopback: Vec<u32> = links
        .iter()
        .filter(|l| l.loopback)
        .map(|l| l.index)
        .collect();
    // The kernel's own routes to the interfaces' subnets: (destination,
    // interface) of each.
    let mut connected = Vec::new();
    for old in netlink.route_messages()? {
        let oif = old.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if old.header.protocol == RouteProtocol::Kernel {
            let destination = old.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(d) => route_ip(d),
                _ => None,
            });
            if let (Some(ip), Some(oif)) = (destination, oif) {
                let prefix_len = old.header.destination_prefix_length;
                connected.push((Cidr { ip, prefix_len }, oif));
            }
            continue;
        }
        if oif.is_none_or(|i| loopback.contains(&i)) {
            continue;
        }
        let mut message = RouteMessage::default();
        message.header = old.header.clone();
        message.header.scope = RouteScope::NoWhere;
        message.attributes = old
            .attributes
            .into_iter()
            .filter(|a| {
                matches!(
                    a,
                    RouteAttribute::Destination(_)
                        | RouteAttribute::Gateway(_)
                        | RouteAttribute::Oif(_)
                        | RouteAttribute::Priority(_)
                        | RouteAttribute::Table(_)
                )
            })
            .collect();
        match netlink.change(RouteNetlinkMessage::DelRoute(message), 0) {
            // Gone with an earlier one.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            result => result.map_err(kernel("remove an old route"))?,
        }
    }
    for route in &new {
        // Asking for a route the kernel keeps anyway: replacing it would
        // make it ours, and the next update would remove it.
        if route.gateway.is_none()
            && route.source.is_none()
            && route
                .device
                .is_some_and(|oif| connected.contains(&(route.destination, oif)))
        {
            continue;
        }
        let mut message = RouteMessage::default();
        message.header.address_family = family(&route.destination.ip);
        message.header.destination_prefix_length = route.destination.prefix_len;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::Static;
        message.header.kind = RouteType::Unicast;
        message.header.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if route.destination.prefix_len > 0 {
            message
                .attributes
                .push(RouteAttribute::Destination(route.destination.ip.into()));
        }
        if let Some(gateway) = route.gateway {
            message
                .attributes
                .push(RouteAttribute::Gateway(gateway.into()));
        }
        if let Some(index) = route.device {
            message.attributes.push(RouteAttribute::Oif(index));
        }
        if let Some(source) = route.source {
            message
                .attributes
                .push(RouteAttribute::PrefSource(source.into()));
        }
        if route.metric != 0 {
            message
                .attributes
                .push(RouteAttribute::Priority(route.metric));
        }
        netlink
            .change(
                RouteNetlinkMessage::NewRoute(message),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .map_err(kernel(format!("add route {}", route.text)))?;
    }
    list_routes(netlink)
}

/// The unicast routes of the main table, IPv4 and IPv6.
pub fn list_routes(netlink: &mut Netlink) -> Result<Vec<pb::Route>, Error> {
    let names: HashMap<u32, String> = netlink
        .links()?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    Ok(netlink
        .route_messages()?
        .into_iter()
        .map(|message| {
            let unspecified: IpAddr = match message.header.address_family {
                AddressFamily::Inet6 => Ipv6Addr::UNSPECIFIED.into(),
                _ => Ipv4Addr::UNSPECIFIED.into(),
            };
            let mut route = pb::Route {
                destination: format!("{unspecified}/{}", message.header.destination_prefix_length),
                ..Default::default()
            };
            for attribute in &message.attributes {
                match attribute {
                    RouteAttribute::Destination(a) => {
                        if let Some(ip) = route_ip(a) {
                            route.destination =
                                format!("{ip}/{}", message.header.destination_prefix_length);
                        }
                    }
                    RouteAttribute::Gateway(a) => {
                        route.gateway = route_ip(a).map(|ip| ip.to_string()).unwrap_or_default()
                    }
                    RouteAttribute::PrefSource(a) => {
                        route.source = route_ip(a).map(|ip| ip.to_string()).unwrap_or_default()
                    }
                    RouteAttribute::Oif(i) => {
                        route.device = names.get(i).cloned().unwrap_or_default()
                    }
                    RouteAttribute::Priority(p) => route.metric = *p,
                    _ => {}
                }
            }
            route
        })
        .collect())
}
