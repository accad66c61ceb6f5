//! The rtnetlink socket: one request at a time, read until the kernel's
//! acknowledgement or the end of a dump.

use super::*;

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
    pub(super) fn request(
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
    pub(super) fn change(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.request(message, NLM_F_ACK | flags).map(drop)
    }

    pub(super) fn dump(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.request(message, NLM_F_DUMP)
    }

    pub(super) fn links(&mut self) -> Result<Vec<Link>, Error> {
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
    pub(super) fn addresses(&mut self) -> Result<HashMap<u32, Vec<Cidr>>, Error> {
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

    pub(super) fn set_link(
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

    pub(super) fn set_up(&mut self, link: &Link, up: bool) -> Result<(), Error> {
        let what = if up { "bring up" } else { "bring down" };
        self.set_link(link, &format!("{what} the link"), |m| {
            if up {
                m.header.flags |= LinkFlags::Up;
            }
            m.header.change_mask |= LinkFlags::Up;
        })
    }

    pub(super) fn address_message(index: u32, cidr: &Cidr) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header.index = index;
        message.header.prefix_len = cidr.prefix_len;
        message.header.family = family(&cidr.ip);
        message.attributes.push(AddressAttribute::Local(cidr.ip));
        message.attributes.push(AddressAttribute::Address(cidr.ip));
        message
    }

    pub(super) fn add_address(&mut self, link: &Link, cidr: &Cidr) -> Result<(), Error> {
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

    pub(super) fn delete_address(&mut self, link: &Link, cidr: &Cidr) -> Result<(), Error> {
        let message = Self::address_message(link.index, cidr);
        self.change(RouteNetlinkMessage::DelAddress(message), 0)
            .map_err(kernel(format!("remove {cidr} from {}", link.name)))
    }

    pub(super) fn route_messages(&mut self) -> Result<Vec<RouteMessage>, Error> {
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

pub(super) fn family(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

pub(super) fn table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(route.header.table.into())
}

pub(super) fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}
