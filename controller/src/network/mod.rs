//! Cluster addressing: the cluster and service CIDRs, node subnets, task
//! addresses and service virtual IPs, and the network state agents program.
//!
//! The overlay is a flat L3 network (the Kubernetes/Calico model rather than
//! Swarm's one subnet per network): the cluster CIDR is cut into one `/24`
//! per node, every task gets one address from its node's subnet, and Compose
//! networks are *scopes* that decide who may reach and resolve whom, not
//! separate address spaces. Service virtual IPs come from the service CIDR.
//!
//! Everything here is pure: the allocation rules are applied by the store's
//! state machine (so every replica allocates the same addresses from the same
//! log) and [`update`] computes what the dispatcher streams to agents.
//!
//! **Invariant:** an address (subnet, task address, VIP) is handed out again
//! only after the object holding it left the store; a task's address is held
//! until the task itself is deleted, so a stopped task that may still run
//! never shares its address.

pub mod update;

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The default cluster CIDR (k3s's default too).
pub const DEFAULT_CLUSTER_CIDR: &str = "10.42.0.0/16";

/// The default service CIDR (k3s's default too).
pub const DEFAULT_SERVICE_CIDR: &str = "10.43.0.0/16";

/// The prefix length of a node's subnet.
pub const NODE_SUBNET_PREFIX: u8 = 24;

/// The longest cluster CIDR prefix: a `/22` holds four node subnets.
pub const MAX_CLUSTER_PREFIX: u8 = 22;

/// The longest service CIDR prefix: a `/28` holds 14 virtual IPs.
pub const MAX_SERVICE_PREFIX: u8 = 28;

/// Errors about CIDRs and the addressing configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    /// A CIDR does not parse or is not a network address.
    #[error("{field} {value:?}: {reason}")]
    InvalidCidr {
        /// The flag or field (`--cluster-cidr`).
        field: String,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The cluster and service CIDRs overlap.
    #[error("{cluster_field} {cluster} overlaps {service_field} {service}")]
    Overlap {
        /// The cluster CIDR's flag or field.
        cluster_field: String,
        /// The cluster CIDR.
        cluster: Ipv4Cidr,
        /// The service CIDR's flag or field.
        service_field: String,
        /// The service CIDR.
        service: Ipv4Cidr,
    },
}

/// An IPv4 network: an address with its host bits zero, and a prefix length.
/// Written and read as `10.42.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// The network `network/prefix`; host bits must be zero.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Ipv4Cidr, String> {
        if prefix > 32 {
            return Err(format!("prefix /{prefix} is longer than 32"));
        }
        let cidr = Ipv4Cidr { network, prefix };
        if u32::from(network) & !cidr.mask() != 0 {
            return Err(format!(
                "host bits are set (the network is {}/{prefix})",
                Ipv4Addr::from(u32::from(network) & cidr.mask())
            ));
        }
        Ok(cidr)
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The number of addresses (2^(32-prefix)), network and broadcast included.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// The first address (the network address).
    pub fn first(&self) -> Ipv4Addr {
        self.network
    }

    /// The last address (the broadcast address).
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    /// The address at `offset` from the network address, if inside.
    pub fn nth(&self, offset: u64) -> Option<Ipv4Addr> {
        (offset < self.size()).then(|| Ipv4Addr::from(u32::from(self.network) + offset as u32))
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network)
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    /// The `index`-th subnet of length `prefix` inside this network.
    pub fn subnet(&self, prefix: u8, index: u64) -> Option<Ipv4Cidr> {
        if prefix < self.prefix || prefix > 32 {
            return None;
        }
        let count = 1u64 << (prefix - self.prefix);
        if index >= count {
            return None;
        }
        let step = 1u64 << (32 - u32::from(prefix));
        let network = Ipv4Addr::from(u32::from(self.network) + (index * step) as u32);
        Some(Ipv4Cidr { network, prefix })
    }

    /// How many subnets of length `prefix` fit.
    pub fn subnet_count(&self, prefix: u8) -> u64 {
        if prefix < self.prefix || prefix > 32 {
            0
        } else {
            1u64 << (prefix - self.prefix)
        }
    }

    /// The gateway of a node subnet: its first host address, `.1`, which the
    /// node's bridge holds (and its DNS responder listens on).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| "expected an IPv4 network like 10.42.0.0/16".to_string())?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address (only IPv4 is supported)"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("prefix {prefix:?} is not a number from 0 to 32"))?;
        Ipv4Cidr::new(addr, prefix)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> String {
        c.to_string()
    }
}

/// The cluster's address plan, set once (the controller's first start) and
/// kept in replicated state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addressing {
    /// Cut into one `/24` per node.
    pub cluster_cidr: Ipv4Cidr,
    /// Where service virtual IPs come from.
    pub service_cidr: Ipv4Cidr,
}

impl Default for Addressing {
    fn default() -> Addressing {
        Addressing {
            cluster_cidr: Ipv4Cidr {
                network: Ipv4Addr::new(10, 42, 0, 0),
                prefix: 16,
            },
            service_cidr: Ipv4Cidr {
                network: Ipv4Addr::new(10, 43, 0, 0),
                prefix: 16,
            },
        }
    }
}

impl Addressing {
    /// Parses and validates the controller's `--cluster-cidr` and
    /// `--service-cidr`; errors name the flag and the value.
    pub fn from_flags(cluster: &str, service: &str) -> Result<Addressing, NetworkError> {
        let parse = |field: &str, value: &str| {
            value
                .parse::<Ipv4Cidr>()
                .map_err(|reason| NetworkError::InvalidCidr {
                    field: field.into(),
                    value: value.into(),
                    reason,
                })
        };
        let addressing = Addressing {
            cluster_cidr: parse("--cluster-cidr", cluster)?,
            service_cidr: parse("--service-cidr", service)?,
        };
        addressing.check("--cluster-cidr", "--service-cidr")?;
        Ok(addressing)
    }

    /// Checks the plan; errors name the fields as `cluster_field` and
    /// `service_field`.
    pub fn check(&self, cluster_field: &str, service_field: &str) -> Result<(), NetworkError> {
        if self.cluster_cidr.prefix > MAX_CLUSTER_PREFIX {
            return Err(NetworkError::InvalidCidr {
                field: cluster_field.into(),
                value: self.cluster_cidr.to_string(),
                reason: format!(
                    "the prefix must be /{MAX_CLUSTER_PREFIX} or shorter, so that it holds at least \
                     four /{NODE_SUBNET_PREFIX} node subnets"
                ),
            });
        }
        if self.service_cidr.prefix > MAX_SERVICE_PREFIX {
            return Err(NetworkError::InvalidCidr {
                field: service_field.into(),
                value: self.service_cidr.to_string(),
                reason: format!("the prefix must be /{MAX_SERVICE_PREFIX} or shorter"),
            });
        }
        if self.cluster_cidr.overlaps(&self.service_cidr) {
            return Err(NetworkError::Overlap {
                cluster_field: cluster_field.into(),
                cluster: self.cluster_cidr,
                service_field: service_field.into(),
                service: self.service_cidr,
            });
        }
        Ok(())
    }

    /// How many node subnets the cluster CIDR holds.
    pub fn node_subnets(&self) -> u64 {
        self.cluster_cidr.subnet_count(NODE_SUBNET_PREFIX)
    }
}

/// The first and last address a task may get in a node subnet: `.0` is the
/// network, `.1` the node's bridge (gateway and DNS), `.255` the broadcast.
pub fn task_address_range(subnet: &Ipv4Cidr) -> (Ipv4Addr, Ipv4Addr) {
    let first = u32::from(subnet.first()) + 2;
    let last = u32::from(subnet.last()) - 1;
    (Ipv4Addr::from(first), Ipv4Addr::from(last))
}

/// The first and last address a VIP may get: everything but the service
/// CIDR's network and broadcast addresses.
pub fn vip_range(service_cidr: &Ipv4Cidr) -> (Ipv4Addr, Ipv4Addr) {
    (
        Ipv4Addr::from(u32::from(service_cidr.first()) + 1),
        Ipv4Addr::from(u32::from(service_cidr.last()) - 1),
    )
}

/// The lowest address in `first..=last` that `taken` does not hold.
/// `taken` yields the held addresses of that range in ascending order
/// (a `BTreeMap` range does).
pub fn lowest_free(
    first: Ipv4Addr,
    last: Ipv4Addr,
    taken: impl Iterator<Item = Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let mut candidate = u32::from(first);
    let last = u32::from(last);
    for t in taken {
        let t = u32::from(t);
        if t < candidate {
            continue;
        }
        if t > candidate {
            break;
        }
        candidate = candidate.checked_add(1)?;
    }
    (candidate <= last).then(|| Ipv4Addr::from(candidate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_print_and_split() {
        let c: Ipv4Cidr = "10.42.0.0/16".parse().expect("valid");
        assert_eq!(c.to_string(), "10.42.0.0/16");
        assert_eq!(c.subnet_count(24), 256);
        assert_eq!(
            c.subnet(24, 3).map(|s| s.to_string()),
            Some("10.42.3.0/24".into())
        );
        assert_eq!(c.subnet(24, 256), None);
        assert!(c.contains("10.42.255.1".parse().expect("ip")));
        assert!(!c.contains("10.43.0.1".parse().expect("ip")));
        assert_eq!(c.last().to_string(), "10.42.255.255");
        let err = "10.42.0.5/16".parse::<Ipv4Cidr>().expect_err("host bits");
        assert_eq!(err, "host bits are set (the network is 10.42.0.0/16)");
        assert!("fd00::/64".parse::<Ipv4Cidr>().is_err());
        assert!("10.42.0.0".parse::<Ipv4Cidr>().is_err());
        assert!("10.42.0.0/33".parse::<Ipv4Cidr>().is_err());
    }

    #[test]
    fn flags_are_validated_by_name() {
        assert_eq!(
            Addressing::from_flags(DEFAULT_CLUSTER_CIDR, DEFAULT_SERVICE_CIDR),
            Ok(Addressing::default())
        );
        let err = |c: &str, s: &str| {
            Addressing::from_flags(c, s)
                .expect_err("refused")
                .to_string()
        };
        assert_eq!(
            err("10.42.0.0/23", "10.43.0.0/16"),
            "--cluster-cidr \"10.42.0.0/23\": the prefix must be /22 or shorter, so that it holds \
             at least four /24 node subnets"
        );
        assert_eq!(
            err("10.42.0.0/16", "10.42.128.0/20"),
            "--cluster-cidr 10.42.0.0/16 overlaps --service-cidr 10.42.128.0/20"
        );
        assert!(err("nonsense", "10.43.0.0/16").starts_with("--cluster-cidr \"nonsense\": "));
        assert!(err("10.42.0.0/16", "fd00::/108").starts_with("--service-cidr \"fd00::/108\": "));
        assert!(err("10.42.0.0/16", "10.43.0.0/29").contains("/28 or shorter"));
    }

    #[test]
    fn lowest_free_skips_what_is_taken() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
        let subnet: Ipv4Cidr = "10.42.1.0/24".parse().expect("valid");
        let (first, last) = task_address_range(&subnet);
        assert_eq!((first, last), (ip("10.42.1.2"), ip("10.42.1.254")));
        assert_eq!(lowest_free(first, last, std::iter::empty()), Some(first));
        let taken = [ip("10.42.1.2"), ip("10.42.1.3"), ip("10.42.1.5")];
        assert_eq!(
            lowest_free(first, last, taken.into_iter()),
            Some(ip("10.42.1.4"))
        );
        assert_eq!(lowest_free(last, last, [last].into_iter()), None);
    }
}
