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

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
const MAX_NAME: usize = 15;

/// Parses "52:54:00:12:34:56".
pub fn parse_mac(text: &str) -> Result<[u8; 6], Error> {
    let bad = || Error::Invalid(format!("bad MAC address '{text}'"));
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_ip(what: &str, text: &str) -> Result<IpAddr, Error> {
    text.parse()
        .map_err(|_| Error::Invalid(format!("bad {what} '{text}'")))
}

fn max_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn check_prefix(what: &str, ip: &IpAddr, prefix_len: u32) -> Result<u8, Error> {
    match u8::try_from(prefix_len) {
        Ok(len) if len <= max_prefix(ip) => Ok(len),
        _ => Err(Error::Invalid(format!(
            "bad prefix length {prefix_len} for {what} {ip}"
        ))),
    }
}

/// An address with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub ip: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// Parses "10.88.0.0/16" or "fd00::/64"; the address must have no bits
    /// set past the prefix.
    pub fn parse_network(text: &str) -> Result<Cidr, Error> {
        let bad = || Error::Invalid(format!("bad destination '{text}': expected address/prefix"));
        let (ip, len) = text.split_once('/').ok_or_else(bad)?;
        let ip = parse_ip("destination", ip)?;
        let prefix_len = match len.parse::<u8>() {
            Ok(len) if len <= max_prefix(&ip) => len,
            _ => {
                return Err(Error::Invalid(format!(
                    "bad destination '{text}': bad prefix length"
                )));
            }
        };
        let cidr = Cidr { ip, prefix_len };
        if cidr.network() != ip {
            return Err(Error::Invalid(format!(
                "bad destination '{text}': host bits are set (the network is {}/{prefix_len})",
                cidr.network()
            )));
        }
        Ok(cidr)
    }

    /// The address with the bits past the prefix cleared.
    pub fn network(&self) -> IpAddr {
        match self.ip {
            IpAddr::V4(ip) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(ip) & mask))
            }
            IpAddr::V6(ip) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(ip) & mask))
            }
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix_len)
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b <= b' ' || b >= 0x7f);
    if !valid {
        return Err(Error::Invalid(format!("bad interface name '{name}'")));
    }
    Ok(())
}

fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

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

/// A blocking rtnetlink socket.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    pub fn open() -> Result<Netlink, Error> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(Error::Socket)?;
        socket.bind_auto().map_err(Error::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(Error::Socket)?;
        Ok(Netlink {
            socket,
            sequence: 0,
        })
    }

    /// Sends one request; gives the messages of a dump, or nothing once the
    /// kernel acknowledges a change.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | flags;
        request.header.sequence_number = self.sequence;
        request.finalize();
        let mut buffer = vec![0; request.buffer_len()];
        request.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;
        let mut answers = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let bytes = &data[offset..];
                let length = NetlinkBuffer::new_checked(bytes)
                    .map_err(io::Error::other)?
                    .length() as usize;
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..length])
                    .map_err(io::Error::other)?;
                offset += length.next_multiple_of(4).max(4);
                if message.header.sequence_number != self.sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answers),
                            Some(_) => Err(e.to_io()),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends a change and waits for the acknowledgement.
    fn change(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.request(message, NLM_F_ACK | flags).map(drop)
    }

    fn dump(&mut self, message: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.request(message, NLM_F_DUMP)
    }

    fn links(&mut self) -> Result<Vec<Link>, Error> {
        let answers = self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
            .map_err(kernel("list the interfaces"))?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .map(|message| {
                let mut link = Link {
                    index: message.header.index,
                    name: String::new(),
                    mac: Vec::new(),
                    mtu: 0,
                    up: message.header.flags.contains(LinkFlags::Up),
                    loopback: message.header.flags.contains(LinkFlags::Loopback),
                };
                for attribute in message.attributes {
                    match attribute {
                        LinkAttribute::IfName(name) => link.name = name,
                        LinkAttribute::Address(mac) => link.mac = mac,
                        LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                        _ => {}
                    }
                }
                link
            })
            .collect())
    }

    /// The addresses of every interface, by interface index.
    fn addresses(&mut self) -> Result<HashMap<u32, Vec<Cidr>>, Error> {
        let answers = self
            .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
            .map_err(kernel("list the addresses"))?;
        let mut addresses: HashMap<u32, Vec<Cidr>> = HashMap::new();
        for answer in answers {
            let RouteNetlinkMessage::NewAddress(message) = answer else {
                continue;
            };
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the
            // peer's on point-to-point links); IPv6 has only IFA_ADDRESS.
            let mut local = None;
            let mut address = None;
            for attribute in &message.attributes {
                match attribute {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    _ => {}
                }
            }
            if let Some(ip) = local.or(address) {
                addresses
                    .entry(message.header.index)
                    .or_default()
                    .push(Cidr {
                        ip,
                        prefix_len: message.header.prefix_len,
                    });
            }
        }
        Ok(addresses)
    }

    fn set_link(
        &mut self,
        link: &Link,
        what: &str,
        change: impl FnOnce(&mut LinkMessage),
    ) -> Result<(), Error> {
        let mut message = LinkMessage::default();
        message.header.index = link.index;
        change(&mut message);
        self.change(RouteNetlinkMessage::SetLink(message), 0)
            .map_err(kernel(format!("{what} of {}", link.name)))
    }

    fn set_up(&mut self, link: &Link, up: bool) -> Result<(), Error> {
        let what = if up { "bring up" } else { "bring down" };
        self.set_link(link, &format!("{what} the link"), |m| {
            if up {
                m.header.flags |= LinkFlags::Up;
            }
            m.header.change_mask |= LinkFlags::Up;
        })
    }

    fn address_message(index: u32, cidr: &Cidr) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.index = index;
        message.header.prefix_len = cidr.prefix_len;
        message.header.family = family(&cidr.ip);
        message.attributes.push(AddressAttribute::Local(cidr.ip));
        message.attributes.push(AddressAttribute::Address(cidr.ip));
        message
    }

    fn add_address(&mut self, link: &Link, cidr: &Cidr) -> Result<(), Error> {
        let mut message = Self::address_message(link.index, cidr);
        match cidr.ip {
            IpAddr::V4(ip) if cidr.prefix_len < 31 => {
                let broadcast = u32::from(ip) | (u32::MAX >> cidr.prefix_len);
                message
                    .attributes
                    .push(AddressAttribute::Broadcast(Ipv4Addr::from(broadcast)));
            }
            // The host hands out unique addresses: no duplicate address
            // detection, so the address is usable at once.
            IpAddr::V6(_) => message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad)),
            _ => {}
        }
        self.change(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(kernel(format!("add {cidr} to {}", link.name)))
    }

    fn delete_address(&mut self, link: &Link, cidr: &Cidr) -> Result<(), Error> {
        let message = Self::address_message(link.index, cidr);
        self.change(RouteNetlinkMessage::DelAddress(message), 0)
            .map_err(kernel(format!("remove {cidr} from {}", link.name)))
    }

    fn route_messages(&mut self) -> Result<Vec<RouteMessage>, Error> {
        let answers = self
            .dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()))
            .map_err(kernel("list the routes"))?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewRoute(route) => Some(route),
                _ => None,
            })
            .filter(|route| table(route) == u32::from(RouteHeader::RT_TABLE_MAIN))
            .filter(|route| route.header.kind == RouteType::Unicast)
            .collect())
    }
}

fn family(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(route.header.table.into())
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:AB").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0xab]
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "5:54:00:12:34:566",
            "zz:54:00:12:34:56",
        ] {
            assert!(matches!(parse_mac(bad), Err(Error::Invalid(_))), "{bad}");
        }
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0x12, 0x34, 0xab]),
            "52:54:00:12:34:ab"
        );
    }

    #[test]
    fn networks() {
        let c = Cidr::parse_network("10.88.0.0/16").unwrap();
        assert_eq!(c.to_string(), "10.88.0.0/16");
        assert_eq!(Cidr::parse_network("0.0.0.0/0").unwrap().prefix_len, 0);
        assert_eq!(
            Cidr::parse_network("fd00::/64").unwrap().to_string(),
            "fd00::/64"
        );
        for bad in [
            "10.88.0.0",
            "10.88.0.0/33",
            "10.88.0.5/16",
            "fd00::1/64",
            "fd00::/129",
            "x/8",
            "10.88.0.0/-1",
        ] {
            assert!(
                matches!(Cidr::parse_network(bad), Err(Error::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn names() {
        assert!(check_name("eth0").is_ok());
        for bad in ["", "a/b", "a b", "..", "abcdefghijklmnop", "eth0:1"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn link_local() {
        assert!(is_ipv6_link_local(&"fe80::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"fd00::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"169.254.0.1".parse().unwrap()));
    }
}
