//! An IPv4 subnet (`10.89.0.0/24`): parsing, the gateway and the addresses
//! containers may get. Pure; serialized as its string form.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use super::NetworkError;

/// An IPv4 network: an address with its host bits zero, and a prefix length
/// from 8 to 30 (a smaller network has no room for a gateway and containers;
/// a larger one than /8 is surely a typo).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// `10.89.0.0/24`, the default node subnet.
    pub const DEFAULT: Subnet = Subnet {
        network: Ipv4Addr::new(10, 89, 0, 0),
        prefix: 24,
    };

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    /// The first host address, which the bridge takes (Docker's choice).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    /// Whether `ip` is in this subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// The addresses containers may get: every host address but the gateway.
    pub fn container_range(&self) -> std::ops::RangeInclusive<u32> {
        (u32::from(self.gateway()) + 1)..=(u32::from(self.broadcast()) - 1)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Subnet {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why: &str| NetworkError::InvalidSubnet(s.to_string(), why.to_string());
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| invalid("expected ADDRESS/PREFIX, e.g. 10.89.0.0/24"))?;
        let network: Ipv4Addr = addr.parse().map_err(|_| invalid("not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| invalid("the prefix is not a number"))?;
        if !(8..=30).contains(&prefix) {
            return Err(invalid("the prefix must be from 8 to 30"));
        }
        let subnet = Subnet { network, prefix };
        if u32::from(network) & !subnet.mask() != 0 {
            return Err(invalid("host bits are set"));
        }
        Ok(subnet)
    }
}

impl TryFrom<String> for Subnet {
    type Error = NetworkError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_derives_addresses() {
        let s: Subnet = "10.89.0.0/24".parse().unwrap();
        assert_eq!(s, Subnet::DEFAULT);
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 89, 0, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 89, 0, 255));
        assert!(s.contains(Ipv4Addr::new(10, 89, 0, 77)));
        assert!(!s.contains(Ipv4Addr::new(10, 89, 1, 1)));
        let r = s.container_range();
        assert_eq!(Ipv4Addr::from(*r.start()), Ipv4Addr::new(10, 89, 0, 2));
        assert_eq!(Ipv4Addr::from(*r.end()), Ipv4Addr::new(10, 89, 0, 254));
        let small: Subnet = "192.168.7.4/30".parse().unwrap();
        assert_eq!(small.container_range().count(), 1);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            "\"10.89.0.0/24\"".to_string()
        );
    }

    #[test]
    fn refuses_bad_subnets() {
        for bad in [
            "10.89.0.0",
            "10.89.0.1/24",
            "10.89.0.0/31",
            "x/24",
            "10.0.0.0/a",
        ] {
            let err = bad.parse::<Subnet>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert!(serde_json::from_str::<Subnet>("\"10.89.0.1/24\"").is_err());
    }
}
