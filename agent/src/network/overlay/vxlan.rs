//! The VXLAN device and its peers, flannel's `vxlan` backend: no multicast,
//! no learning; every remote node gets a route to its subnet via its VTEP
//! address, a permanent neighbour entry for that address and an FDB entry
//! sending its VTEP MAC to its underlay IP.
//!
//! **VTEP addresses and MACs are derived, not exchanged**: a node's VTEP
//! address is its subnet's network address (`10.42.3.0`, set as a /32 on the
//! device, as flannel does) and its MAC is `0a:58:` followed by that
//! address's four bytes (`0a:58:0a:2a:03:00`). `0a` has the locally
//! administered bit set and the multicast bit clear, so it is a valid
//! unicast MAC that no vendor assigns; the same `0a:58` + IPv4 rule is what
//! ovn-kubernetes uses for pod MACs. Both ends compute it from the node list.
//!
//! Kernel objects are driven with `ip -batch` and `bridge -batch` (FDB
//! entries are the `bridge` tool's), like the rest of `network`.

use super::run_tool;
use crate::network::{NetworkError, Subnet, link};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// The VXLAN device's name.
pub const DEVICE: &str = "gantry.vx";

/// The VXLAN network identifier (one flat overlay).
pub const VNI: u32 = 1;

/// The IANA VXLAN port.
pub const PORT: u16 = 4789;

/// VXLAN's overhead over IPv4: outer IP 20 + UDP 8 + VXLAN 8 + inner
/// Ethernet 14.
pub const OVERHEAD: u32 = 50;

/// A node's VTEP address: its subnet's network address.
pub fn vtep_ip(subnet: &Subnet) -> Ipv4Addr {
    subnet.network()
}

/// A node's VTEP MAC: `0a:58:` and the VTEP address's bytes.
pub fn vtep_mac(subnet: &Subnet) -> String {
    let [a, b, c, d] = vtep_ip(subnet).octets();
    format!("0a:58:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// The remote nodes as programmed: subnet → underlay IP.
pub type Peers = BTreeMap<Subnet, Ipv4Addr>;

/// What changes between two peer sets, as `bridge` and `ip` batch input.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerPlan {
    /// FDB changes (`bridge -batch`).
    pub fdb: String,
    /// Neighbour and route changes (`ip -batch`).
    pub ip: String,
    /// Deletions (tolerant of entries already gone: `-force`).
    pub fdb_del: String,
    /// Deletions of routes and neighbours.
    pub ip_del: String,
}

impl PeerPlan {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self == &PeerPlan::default()
    }
}

/// The batch lines turning `old` into `new`: entries of nodes that left are
/// deleted, entries of new nodes or nodes whose underlay IP changed are
/// replaced (`replace` is idempotent, so an unchanged peer is left alone
/// and an agent restart that replays them disturbs nothing).
pub fn plan(old: &Peers, new: &Peers) -> PeerPlan {
    let mut p = PeerPlan::default();
    for (subnet, underlay) in new {
        if old.get(subnet) == Some(underlay) {
            continue;
        }
        let (ip, mac) = (vtep_ip(subnet), vtep_mac(subnet));
        let _ = writeln!(
            p.fdb,
            "fdb replace {mac} dev {DEVICE} dst {underlay} self permanent"
        );
        let _ = writeln!(
            p.ip,
            "neigh replace {ip} lladdr {mac} dev {DEVICE} nud permanent"
        );
        let _ = writeln!(p.ip, "route replace {subnet} via {ip} dev {DEVICE} onlink");
    }
    for subnet in old.keys().filter(|s| !new.contains_key(*s)) {
        let (ip, mac) = (vtep_ip(subnet), vtep_mac(subnet));
        let _ = writeln!(p.ip_del, "route del {subnet} dev {DEVICE}");
        let _ = writeln!(p.ip_del, "neigh del {ip} dev {DEVICE}");
        let _ = writeln!(p.fdb_del, "fdb del {mac} dev {DEVICE} self");
    }
    p
}

/// Runs `plan`: deletions first (the route before its neighbour and FDB
/// entry), then the FDB entries before the neighbours and routes that use
/// them.
pub fn apply_plan(plan: &PeerPlan) -> Result<(), NetworkError> {
    if !plan.ip_del.is_empty() {
        // An entry already gone is fine: -force goes on, and the result is
        // checked by what remains, not by the exit status.
        let _ = run_tool(
            "ip",
            &["-force", "-batch", "-"],
            "delete vxlan peers",
            &plan.ip_del,
        );
    }
    if !plan.fdb_del.is_empty() {
        let _ = run_tool(
            "bridge",
            &["-force", "-batch", "-"],
            "delete vxlan fdb entries",
            &plan.fdb_del,
        );
    }
    if !plan.fdb.is_empty() {
        run_tool(
            "bridge",
            &["-batch", "-"],
            "add vxlan fdb entries",
            &plan.fdb,
        )?;
    }
    if !plan.ip.is_empty() {
        run_tool("ip", &["-batch", "-"], "add vxlan peers", &plan.ip)?;
    }
    Ok(())
}

/// The MTU of the interface holding `underlay` (the node's address), or
/// 1500 when none does (then the device gets 1450, flannel's default).
pub fn underlay_mtu(underlay: Ipv4Addr) -> Result<u32, NetworkError> {
    let addrs = run_tool("ip", &["-o", "-4", "addr", "show"], "list addresses", "")?;
    let dev = addrs.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        let _index = words.next()?;
        let dev = words.next()?;
        let _inet = words.next()?;
        let addr = words.next()?.split('/').next()?;
        (addr.parse::<Ipv4Addr>().ok()? == underlay).then(|| dev.to_string())
    });
    let Some(dev) = dev else {
        return Ok(1500);
    };
    let link = run_tool("ip", &["-o", "link", "show", "dev", &dev], "read mtu", "")?;
    let mtu = link
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or(1500);
    Ok(mtu)
}

/// What an existing device is: its local address, MAC and MTU.
#[derive(Debug, PartialEq, Eq)]
struct Device {
    local: Option<Ipv4Addr>,
    mac: String,
    mtu: u32,
}

/// Parses `ip -d -o link show` of the device.
fn parse_device(text: &str) -> Device {
    let after = |key: &str| {
        text.split_whitespace()
            .skip_while(|w| *w != key)
            .nth(1)
            .map(str::to_string)
    };
    Device {
        local: after("local").and_then(|a| a.parse().ok()),
        mac: after("link/ether").unwrap_or_default(),
        mtu: after("mtu").and_then(|m| m.parse().ok()).unwrap_or(0),
    }
}

/// The existing device, if there is one.
fn device() -> Result<Option<Device>, NetworkError> {
    if !link::exists(DEVICE)? {
        return Ok(None);
    }
    let out = run_tool(
        "ip",
        &["-d", "-o", "link", "show", "dev", DEVICE],
        "read vxlan device",
        "",
    )?;
    Ok(Some(parse_device(&out)))
}

/// Makes the device exist with `local` as its underlay address, this
/// node's VTEP MAC and address, `mtu`, and up. A device with another local
/// address (the node's address changed) is recreated. An existing one is
/// changed only where it differs: setting a link's MAC, even to the same
/// value, makes the kernel flush its neighbour entries, permanent ones
/// included, which would cut every peer until the next update.
pub fn ensure_device(local: Ipv4Addr, subnet: &Subnet, mtu: u32) -> Result<(), NetworkError> {
    let mac = vtep_mac(subnet);
    let mut batch = String::new();
    let add = format!(
        "link add {DEVICE} address {mac} mtu {mtu} type vxlan id {VNI} local {local} dstport {PORT} nolearning\n"
    );
    match device()? {
        Some(d) if d.local == Some(local) => {
            if d.mac != mac {
                let _ = writeln!(batch, "link set {DEVICE} address {mac}");
            }
            if d.mtu != mtu {
                let _ = writeln!(batch, "link set {DEVICE} mtu {mtu}");
            }
        }
        Some(_) => {
            let _ = writeln!(batch, "link del {DEVICE}");
            batch.push_str(&add);
        }
        None => batch.push_str(&add),
    }
    let _ = writeln!(
        batch,
        "addr replace {ip}/32 dev {DEVICE}\nlink set {DEVICE} up",
        ip = vtep_ip(subnet),
    );
    run_tool(
        "ip",
        &["-batch", "-"],
        "set up vxlan device gantry.vx",
        &batch,
    )
    .map(|_| ())
}

/// The peers the device has now (from its routes and FDB), for an agent
/// that starts with nothing in memory: what is there and no longer wanted
/// gets deleted. A peer whose FDB entry is missing reads as underlay
/// `0.0.0.0`, so that it is replaced.
pub fn kernel_peers() -> Result<Peers, NetworkError> {
    if !link::exists(DEVICE)? {
        return Ok(Peers::new());
    }
    let routes = run_tool(
        "ip",
        &["-o", "route", "show", "dev", DEVICE],
        "list vxlan routes",
        "",
    )?;
    let fdb = run_tool(
        "bridge",
        &["fdb", "show", "dev", DEVICE],
        "list vxlan fdb",
        "",
    )?;
    let mut macs: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
    for l in fdb.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if let (Some(mac), Some(i)) = (w.first(), w.iter().position(|x| *x == "dst"))
            && let Some(ip) = w.get(i + 1).and_then(|a| a.parse().ok())
        {
            macs.insert(mac.to_string(), ip);
        }
    }
    Ok(routes
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<Subnet>().ok())
        .map(|s| {
            let dst = macs.get(&vtep_mac(&s)).copied();
            (s, dst.unwrap_or(Ipv4Addr::UNSPECIFIED))
        })
        .collect())
}

/// Deletes the device (its routes, neighbours and FDB entries go with it);
/// a missing one is fine.
pub fn delete_device() -> Result<(), NetworkError> {
    link::delete_link(DEVICE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Subnet {
        x.parse().unwrap()
    }

    #[test]
    fn vtep_mac_is_local_unicast_and_follows_the_subnet() {
        assert_eq!(vtep_mac(&s("10.42.3.0/24")), "0a:58:0a:2a:03:00");
        assert_eq!(vtep_ip(&s("10.42.3.0/24")), Ipv4Addr::new(10, 42, 3, 0));
        // Bit 1 of the first byte set (local), bit 0 clear (unicast).
        assert_eq!(0x0a & 0b11, 0b10);
    }

    #[test]
    fn device_details_are_read_from_ip_output() {
        let text = "7: gantry.vx: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1450 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/ether 0a:58:0a:2a:01:00 brd ff:ff:ff:ff:ff:ff promiscuity 0 minmtu 68 maxmtu 65535 \\    vxlan id 1 local 10.250.0.1 srcport 0 0 dstport 4789 nolearning ttl auto ageing 300";
        assert_eq!(
            parse_device(text),
            Device {
                local: Some(Ipv4Addr::new(10, 250, 0, 1)),
                mac: "0a:58:0a:2a:01:00".into(),
                mtu: 1450,
            }
        );
    }

    #[test]
    fn plan_adds_changes_and_removes_exactly() {
        let old: Peers = [
            (s("10.42.2.0/24"), Ipv4Addr::new(192, 0, 2, 2)),
            (s("10.42.3.0/24"), Ipv4Addr::new(192, 0, 2, 3)),
        ]
        .into();
        let new: Peers = [
            (s("10.42.2.0/24"), Ipv4Addr::new(192, 0, 2, 2)),
            (s("10.42.3.0/24"), Ipv4Addr::new(192, 0, 2, 33)),
            (s("10.42.4.0/24"), Ipv4Addr::new(192, 0, 2, 4)),
        ]
        .into();
        let p = plan(&old, &new);
        assert_eq!(
            p.fdb,
            "fdb replace 0a:58:0a:2a:03:00 dev gantry.vx dst 192.0.2.33 self permanent\n\
             fdb replace 0a:58:0a:2a:04:00 dev gantry.vx dst 192.0.2.4 self permanent\n"
        );
        assert!(p.ip.contains("route replace 10.42.4.0/24 via 10.42.4.0 dev gantry.vx onlink\n"));
        assert!(p.ip.contains(
            "neigh replace 10.42.4.0 lladdr 0a:58:0a:2a:04:00 dev gantry.vx nud permanent\n"
        ));
        assert!(!p.ip.contains("10.42.2.0"));
        assert!(p.ip_del.is_empty() && p.fdb_del.is_empty());
        let gone = plan(&new, &old);
        assert_eq!(
            gone.fdb_del,
            "fdb del 0a:58:0a:2a:04:00 dev gantry.vx self\n"
        );
        assert_eq!(
            gone.ip_del,
            "route del 10.42.4.0/24 dev gantry.vx\nneigh del 10.42.4.0 dev gantry.vx\n"
        );
        assert!(plan(&new, &new).is_empty());
    }
}
