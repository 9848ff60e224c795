//! Address leases: `<data dir>/network/ipam.json`, read and written under
//! the network lock (the caller holds it).
//!
//! A container keeps its lease from create to remove, so restarts keep the
//! address. New leases go round-robin after the last one handed out rather
//! than to the lowest free address (Docker's allocator does the same), so a
//! just-released address is not reused at once while peers may still have it
//! in their ARP caches or conntrack tables.

use super::{NetworkError, Subnet, read_json_opt, write_json_atomic};
use crate::paths::DataDir;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The lease file, under the network directory.
pub const IPAM_FILE: &str = "ipam.json";

/// The leases of one node's subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leases {
    /// The subnet the leases are in.
    pub subnet: Subnet,
    /// The address handed out last (round-robin start).
    pub last: Option<Ipv4Addr>,
    /// Address → container id.
    pub leases: BTreeMap<Ipv4Addr, String>,
}

impl Leases {
    /// No leases in `subnet`.
    pub fn new(subnet: Subnet) -> Leases {
        Leases {
            subnet,
            last: None,
            leases: BTreeMap::new(),
        }
    }

    /// The address of container `id`: its lease if it has one, else the next
    /// free one after the last handed out.
    pub fn lease(&mut self, id: &str) -> Result<Ipv4Addr, NetworkError> {
        if let Some((ip, _)) = self.leases.iter().find(|(_, owner)| *owner == id) {
            return Ok(*ip);
        }
        let range = self.subnet.container_range();
        let (first, last) = (*range.start(), *range.end());
        let size = last - first + 1;
        let start = match self.last {
            Some(ip) if self.subnet.contains(ip) && range.contains(&u32::from(ip)) => {
                u32::from(ip) - first + 1
            }
            _ => 0,
        };
        for i in 0..size {
            let ip = Ipv4Addr::from(first + (start + i) % size);
            if let std::collections::btree_map::Entry::Vacant(slot) = self.leases.entry(ip) {
                slot.insert(id.to_string());
                self.last = Some(ip);
                return Ok(ip);
            }
        }
        Err(NetworkError::SubnetFull(self.subnet))
    }

    /// Leases `ip` (allocated elsewhere: the controller's) to `id`, so
    /// that local leases skip it. Refused when it is outside the subnet or
    /// another container holds it.
    pub fn lease_fixed(&mut self, id: &str, ip: Ipv4Addr) -> Result<Ipv4Addr, NetworkError> {
        if !self.subnet.contains(ip) || !self.subnet.container_range().contains(&u32::from(ip)) {
            return Err(NetworkError::AddressUnusable {
                ip,
                reason: format!("not a container address of subnet {}", self.subnet),
            });
        }
        match self.leases.get(&ip) {
            Some(owner) if owner != id => Err(NetworkError::AddressUnusable {
                ip,
                reason: format!("held by container {owner}"),
            }),
            _ => {
                self.leases.retain(|_, owner| owner != id);
                self.leases.insert(ip, id.to_string());
                Ok(ip)
            }
        }
    }

    /// Releases every lease of container `id`.
    pub fn release(&mut self, id: &str) {
        self.leases.retain(|_, owner| owner != id);
    }
}

fn path(data: &DataDir) -> std::path::PathBuf {
    super::network_dir(data).join(IPAM_FILE)
}

/// Reads the leases of `data` (none yet: empty, in `subnet`). Leases in
/// another subnet are an error while any are held; with none, the file
/// simply moves to the new subnet.
pub fn load(data: &DataDir, subnet: &Subnet) -> Result<Leases, NetworkError> {
    match read_json_opt::<Leases>(&path(data))? {
        None => Ok(Leases::new(*subnet)),
        Some(l) if l.subnet == *subnet => Ok(l),
        Some(l) if l.leases.is_empty() => Ok(Leases::new(*subnet)),
        Some(l) => Err(NetworkError::SubnetChanged {
            old: l.subnet,
            new: *subnet,
            leases: l.leases.len(),
        }),
    }
}

/// Leases an address to container `id` (the one it has, if any) and saves.
/// Leases of containers whose directory is gone (a create or removal killed
/// half-way) are dropped first: the engine makes a container's directory
/// before attaching it and detaches before deleting it, so such a lease has
/// no owner left.
pub fn lease(data: &DataDir, subnet: &Subnet, id: &str) -> Result<Ipv4Addr, NetworkError> {
    let mut leases = load(data, subnet)?;
    let containers = data.containers();
    leases
        .leases
        .retain(|_, owner| owner == id || containers.join(owner.as_str()).exists());
    let ip = leases.lease(id)?;
    write_json_atomic(&path(data), &leases)?;
    Ok(ip)
}

/// Leases the given address to container `id` (see [`Leases::lease_fixed`]).
pub fn lease_fixed(
    data: &DataDir,
    subnet: &Subnet,
    id: &str,
    ip: Ipv4Addr,
) -> Result<Ipv4Addr, NetworkError> {
    let mut leases = load(data, subnet)?;
    let containers = data.containers();
    leases
        .leases
        .retain(|_, owner| owner == id || containers.join(owner.as_str()).exists());
    let ip = leases.lease_fixed(id, ip)?;
    write_json_atomic(&path(data), &leases)?;
    Ok(ip)
}

/// Releases container `id`'s lease, if it has one.
pub fn release(data: &DataDir, id: &str) -> Result<(), NetworkError> {
    let Some(mut leases) = read_json_opt::<Leases>(&path(data))? else {
        return Ok(());
    };
    let before = leases.leases.len();
    leases.release(id);
    if leases.leases.len() != before {
        write_json_atomic(&path(data), &leases)?;
    }
    Ok(())
}

/// The address leased to container `id`, if any.
pub fn lookup(data: &DataDir, id: &str) -> Result<Option<Ipv4Addr>, NetworkError> {
    Ok(read_json_opt::<Leases>(&path(data))?.and_then(|l| {
        l.leases
            .iter()
            .find(|(_, owner)| *owner == id)
            .map(|(ip, _)| *ip)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_stable_round_robin_and_bounded() {
        let mut l = Leases::new("10.0.0.0/29".parse().unwrap());
        // .1 is the gateway, .7 the broadcast: .2 to .6 are for containers.
        assert_eq!(l.lease("a").unwrap(), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(l.lease("b").unwrap(), Ipv4Addr::new(10, 0, 0, 3));
        assert_eq!(l.lease("a").unwrap(), Ipv4Addr::new(10, 0, 0, 2));
        l.release("a");
        // Not reused at once.
        assert_eq!(l.lease("c").unwrap(), Ipv4Addr::new(10, 0, 0, 4));
        assert_eq!(l.lease("d").unwrap(), Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(l.lease("e").unwrap(), Ipv4Addr::new(10, 0, 0, 6));
        // Wraps around to the released one.
        assert_eq!(l.lease("f").unwrap(), Ipv4Addr::new(10, 0, 0, 2));
        assert!(matches!(l.lease("g"), Err(NetworkError::SubnetFull(_))));
    }

    #[test]
    fn fixed_leases_are_kept_and_skipped_by_local_ones() {
        let mut l = Leases::new("10.0.0.0/29".parse().unwrap());
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        assert_eq!(l.lease_fixed("task", ip).unwrap(), ip);
        // Idempotent for its holder; refused to another; local leases skip it.
        assert_eq!(l.lease_fixed("task", ip).unwrap(), ip);
        let err = l.lease_fixed("other", ip).unwrap_err().to_string();
        assert_eq!(
            err,
            "network: address 10.0.0.2 cannot be used: held by container task"
        );
        assert_eq!(l.lease("local").unwrap(), Ipv4Addr::new(10, 0, 0, 3));
        for bad in [[10, 0, 0, 1], [10, 0, 0, 7], [10, 9, 0, 2]] {
            assert!(l.lease_fixed("x", bad.into()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn leases_persist_and_refuse_a_subnet_change() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        std::fs::create_dir_all(super::super::network_dir(&data)).unwrap();
        for id in ["a", "b"] {
            std::fs::create_dir_all(data.containers().join(id)).unwrap();
        }
        let s: Subnet = "10.89.0.0/24".parse().unwrap();
        assert_eq!(lease(&data, &s, "a").unwrap(), Ipv4Addr::new(10, 89, 0, 2));
        assert_eq!(lease(&data, &s, "a").unwrap(), Ipv4Addr::new(10, 89, 0, 2));
        assert_eq!(
            lookup(&data, "a").unwrap(),
            Some(Ipv4Addr::new(10, 89, 0, 2))
        );
        let other: Subnet = "10.90.0.0/24".parse().unwrap();
        let err = lease(&data, &other, "b").unwrap_err();
        assert!(err.to_string().contains("10.89.0.0/24"), "{err}");
        release(&data, "a").unwrap();
        release(&data, "a").unwrap();
        assert_eq!(lookup(&data, "a").unwrap(), None);
        assert_eq!(
            lease(&data, &other, "b").unwrap(),
            Ipv4Addr::new(10, 90, 0, 2)
        );
        // A lease whose container directory is gone is reclaimed.
        let gone = lease(&data, &other, "gone").unwrap();
        assert_eq!(gone, Ipv4Addr::new(10, 90, 0, 3));
        assert_eq!(
            lease(&data, &other, "c").unwrap(),
            Ipv4Addr::new(10, 90, 0, 4)
        );
        assert_eq!(lookup(&data, "gone").unwrap(), None);
        assert_eq!(
            lookup(&data, "b").unwrap(),
            Some(Ipv4Addr::new(10, 90, 0, 2))
        );
    }
}
