//! MAC addresses, interface names, IPs and CIDRs: parsed and checked
//! before anything changes.

use super::*;

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

pub(super) fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub(super) fn parse_ip(what: &str, text: &str) -> Result<IpAddr, Error> {
    text.parse()
        .map_err(|_| Error::Invalid(format!("bad {what} '{text}'")))
}

pub(super) fn max_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

pub(super) fn check_prefix(what: &str, ip: &IpAddr, prefix_len: u32) -> Result<u8, Error> {
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

pub(super) fn check_name(name: &str) -> Result<(), Error> {
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

pub(super) fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
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
