//! Ethernet MAC addresses: parsing `aa:bb:cc:dd:ee:ff`, formatting, and a
//! random locally administered address for a device given none.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes in a MAC address.
pub const MAC_LEN: usize = 6;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("MAC address {0:?} is not six hex pairs separated by ':'")]
    Syntax(String),
    #[error("MAC address {0} is a multicast address")]
    Multicast(String),
}

/// An Ethernet address as the guest sees it in its config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; MAC_LEN]);

impl MacAddr {
    pub const fn new(bytes: [u8; MAC_LEN]) -> MacAddr {
        MacAddr(bytes)
    }

    pub const fn octets(&self) -> [u8; MAC_LEN] {
        self.0
    }

    /// A random unicast, locally administered address (first octet `x2`,
    /// `x6`, `xa` or `xe`), so it never clashes with a vendor's.
    ///
    /// The randomness is SipHash keyed by std's `RandomState` (whose keys
    /// come from the OS random source once per thread) over a process-wide
    /// counter, the pid and the time: distinct across calls and processes,
    /// with no extra dependency or system call. Not for cryptography.
    pub fn random_local() -> MacAddr {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u32(std::process::id());
        if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            hasher.write_u128(now.as_nanos());
        }
        let random = hasher.finish().to_le_bytes();
        let mut bytes = [0u8; MAC_LEN];
        bytes.copy_from_slice(&random[..MAC_LEN]);
        // Bit 0: unicast; bit 1: locally administered.
        bytes[0] = (bytes[0] & !0x01) | 0x02;
        MacAddr(bytes)
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl From<[u8; MAC_LEN]> for MacAddr {
    fn from(bytes: [u8; MAC_LEN]) -> MacAddr {
        MacAddr(bytes)
    }
}

impl FromStr for MacAddr {
    type Err = Error;

    /// Six pairs of hex digits (either case) separated by `:`. A multicast
    /// address is refused: a NIC cannot own one.
    fn from_str(s: &str) -> Result<MacAddr, Error> {
        let syntax = || Error::Syntax(s.to_string());
        let mut bytes = [0u8; MAC_LEN];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(syntax)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        let mac = MacAddr(bytes);
        if mac.is_multicast() {
            return Err(Error::Multicast(mac.to_string()));
        }
        Ok(mac)
    }
}

impl fmt::Display for MacAddr {
    /// Lower-case `aa:bb:cc:dd:ee:ff`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_round_trip() {
        let mac: MacAddr = "02:AB:cd:00:ff:09".parse().unwrap();
        assert_eq!(mac.octets(), [0x02, 0xab, 0xcd, 0x00, 0xff, 0x09]);
        assert_eq!(mac.to_string(), "02:ab:cd:00:ff:09");
        assert_eq!(mac.to_string().parse::<MacAddr>(), Ok(mac));
    }

    #[test]
    fn malformed_addresses_are_refused() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02:00:00:00:00:0",
            "02:00:00:00:00:000",
            "02-00-00-00-00-00",
            "02:00:00:00:00:0g",
            "02:00:00:00:00:+1",
            "02:00:00:00:00:00:",
            "020000000000",
            " 02:00:00:00:00:00",
            "02:00:00:00:00:é0",
        ] {
            assert_eq!(
                bad.parse::<MacAddr>(),
                Err(Error::Syntax(bad.to_string())),
                "{bad:?}"
            );
        }
        assert_eq!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(Error::Multicast("01:00:5e:00:00:01".to_string()))
        );
    }

    #[test]
    fn random_addresses_are_local_unicast_and_differ() {
        let macs: Vec<MacAddr> = (0..32).map(|_| MacAddr::random_local()).collect();
        for mac in &macs {
            assert!(mac.is_local() && !mac.is_multicast(), "{mac}");
        }
        let mut unique = macs.clone();
        unique.sort_by_key(|m| m.octets());
        unique.dedup();
        assert_eq!(unique.len(), macs.len());
    }
}
