//! The dev cluster's network plumbing: one bridge in the root network
//! namespace, one named network namespace per host with a veth to it, and the
//! nftables table that cuts a host's link.
//!
//! Links and addresses are made with iproute2 (`ip`), the same tool an
//! operator uses to look at them, and nftables rules with `nft`; both are run
//! as child processes so that nothing here changes the calling thread's
//! namespaces. Commands meant to run *inside* a host are started with
//! `setns(CLONE_NEWNET)` in the child ([`command_in`]), never with `ip netns
//! exec`, which also gives the child a private mount namespace with a fresh
//! `/sys` (that would hide the cgroup mounts and the agent's container mounts).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::str::FromStr;

/// Where iproute2 keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The nftables table that partitions a host (inside the host's netns).
pub const PARTITION_TABLE: &str = "gantry-dev";

/// The interface name of a host's uplink inside its netns.
pub const UPLINK: &str = "eth0";

/// Errors of building and tearing down the network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A command could not be started at all (e.g. `ip` or `nft` missing).
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// What exec said.
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A named network namespace could not be opened.
    #[error("cannot open network namespace {path}: {source}")]
    OpenNetns {
        /// `/run/netns/<name>`.
        path: String,
        /// What open said.
        #[source]
        source: std::io::Error,
    },
    /// A sysctl inside a namespace could not be written.
    #[error("cannot set {key} in network namespace {netns}: {reason}")]
    Sysctl {
        /// The namespace.
        netns: String,
        /// The sysctl, e.g. `net.ipv4.ip_forward`.
        key: String,
        /// Why.
        reason: String,
    },
    /// A subnet string did not parse or is unusable.
    #[error("invalid subnet {subnet:?}: {reason}")]
    Subnet {
        /// What was given.
        subnet: String,
        /// Why it is refused.
        reason: String,
    },
}

/// An IPv4 subnet, `a.b.c.d/len`, whose first address is the bridge and the
/// following ones the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    /// The network address (host bits zero).
    pub network: Ipv4Addr,
    /// The prefix length, 8 to 30.
    pub prefix: u8,
}

impl Subnet {
    /// The `index`-th address after the network address (1 = the bridge).
    /// `None` past the last usable address.
    pub fn nth(&self, index: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        // The last address is the broadcast address.
        if u64::from(index) == 0 || u64::from(index) >= size - 1 {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.network) + index))
    }

    /// Whether two subnets share any address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let shorter = self.prefix.min(other.prefix);
        let mask = mask(shorter);
        u32::from(self.network) & mask == u32::from(other.network) & mask
    }

    /// Whether `addr` lies in this subnet.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.network)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl FromStr for Subnet {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = |reason: &str| NetError::Subnet {
            subnet: s.to_string(),
            reason: reason.to_string(),
        };
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| bad("expected a.b.c.d/len"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = len
            .parse()
            .map_err(|_| bad("prefix length is not a number"))?;
        if !(8..=30).contains(&prefix) {
            return Err(bad("prefix length must be between 8 and 30"));
        }
        if u32::from(addr) & !mask(prefix) != 0 {
            return Err(bad("host bits are set"));
        }
        Ok(Subnet {
            network: addr,
            prefix,
        })
    }
}

impl TryFrom<String> for Subnet {
    type Error = NetError;
    fn try_from(s: String) -> Result<Self, NetError> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Runs `program args` and returns its stdout, or the failure with stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetError::Spawn {
            program: program.to_string(),
            source,
        })?;
    check(program, args, output)
}

fn check(program: &str, args: &[&str], output: Output) -> Result<String, NetError> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(NetError::Failed {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Runs `ip args`.
pub fn ip(args: &[&str]) -> Result<String, NetError> {
    run("ip", args)
}

/// Whether a link of this name exists in the root network namespace.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Whether a named network namespace exists.
pub fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// The named network namespaces on this machine.
pub fn netns_list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Creates the root-netns bridge with `addr/prefix` and brings it up.
pub fn create_bridge(name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
    ip(&["link", "add", name, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", name])?;
    ip(&["link", "set", name, "up"])?;
    Ok(())
}

/// Deletes a root-netns link if it exists.
pub fn delete_link(name: &str) -> Result<(), NetError> {
    if link_exists(name) {
        ip(&["link", "del", name])?;
    }
    Ok(())
}

/// What a host's network looks like.
pub struct HostNet<'a> {
    /// The named netns, e.g. `gantry-gantry-n1`.
    pub netns: &'a str,
    /// The root-side veth name.
    pub veth: &'a str,
    /// The root bridge the veth joins.
    pub bridge: &'a str,
    /// The host's address.
    pub address: Ipv4Addr,
    /// The bridge's address: the host's default gateway.
    pub gateway: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
    /// A human description set as the root veth's alias.
    pub alias: &'a str,
}

/// Creates a host: its netns with loopback up and forwarding on, and a veth
/// from the root bridge to `eth0` inside, addressed, with a default route.
pub fn create_host(h: &HostNet<'_>) -> Result<(), NetError> {
    ip(&["netns", "add", h.netns])?;
    ip(&[
        "link", "add", h.veth, "type", "veth", "peer", "name", UPLINK, "netns", h.netns,
    ])?;
    ip(&["link", "set", h.veth, "alias", h.alias])?;
    ip(&["link", "set", h.veth, "master", h.bridge, "up"])?;
    let addr = format!("{}/{}", h.address, h.prefix);
    ip(&["-n", h.netns, "link", "set", "lo", "up"])?;
    ip(&["-n", h.netns, "addr", "add", &addr, "dev", UPLINK])?;
    ip(&["-n", h.netns, "link", "set", UPLINK, "up"])?;
    ip(&[
        "-n",
        h.netns,
        "route",
        "add",
        "default",
        "via",
        &h.gateway.to_string(),
    ])?;
    // Agents route their containers' bridge through the host, as a real
    // machine with Docker or Gantry on it does.
    set_sysctl(h.netns, "net/ipv4/ip_forward", "1")?;
    Ok(())
}

/// Deletes a named netns if it exists. Its links (the veth pair, an agent's
/// bridge) and nftables tables go with it once no process holds it.
pub fn delete_netns(name: &str) -> Result<(), NetError> {
    if netns_exists(name) {
        ip(&["netns", "delete", name])?;
    }
    Ok(())
}

/// Opens `/run/netns/<name>` for `setns`.
pub fn open_netns(name: &str) -> Result<File, NetError> {
    let path = Path::new(NETNS_DIR).join(name);
    File::open(&path).map_err(|source| NetError::OpenNetns {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `/proc/sys/<key>` as seen from inside `netns`: `/proc/sys/net` is
/// per network namespace, resolved by the writing thread's namespace, so a
/// short-lived thread joins the namespace and writes it (network namespaces
/// are per thread; the calling thread is untouched).
pub fn set_sysctl(netns: &str, key: &str, value: &str) -> Result<(), NetError> {
    let ns = open_netns(netns)?;
    let path = Path::new("/proc/sys").join(key);
    let value = value.to_string();
    let result = std::thread::spawn(move || -> Result<(), String> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns: {e}"))?;
        std::fs::write(&path, value).map_err(|e| format!("write {}: {e}", path.display()))
    })
    .join()
    .unwrap_or_else(|_| Err("the sysctl thread panicked".to_string()));
    result.map_err(|reason| NetError::Sysctl {
        netns: netns.to_string(),
        key: key.replace('/', "."),
        reason,
    })
}

/// A command that runs inside `netns`: the child joins it with
/// `setns(CLONE_NEWNET)` before exec and keeps every other namespace of the
/// caller (mounts included). The returned command holds the namespace open.
pub fn command_in(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Result<Command, NetError> {
    let ns = open_netns(netns)?;
    let mut cmd = Command::new(program);
    // SAFETY: the closure only makes the async-signal-safe setns(2) system
    // call on a descriptor opened before the fork; the moved `File` keeps it
    // open until the command (and this closure) is dropped.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs `program args` inside `netns` and returns its stdout.
pub fn run_in(netns: &str, program: &str, args: &[&str], stdin: &str) -> Result<String, NetError> {
    use std::io::Write;
    let mut cmd = command_in(netns, program)?;
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |source| NetError::Spawn {
        program: program.to_string(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).map_err(spawn_err)?;
    }
    let output = child.wait_with_output().map_err(spawn_err)?;
    check(program, args, output)
}

/// The ruleset that cuts a host's link: every packet in or out of its uplink
/// is dropped, in both directions and for established connections too, as
/// when a cable is pulled. Loopback and the host's own container bridge keep
/// working, as they would on a real partitioned machine.
pub fn partition_ruleset() -> String {
    format!(
        "table inet {PARTITION_TABLE} {{\n\
         \tchain input {{ type filter hook input priority -300; policy accept; iifname \"{UPLINK}\" drop; }}\n\
         \tchain output {{ type filter hook output priority -300; policy accept; oifname \"{UPLINK}\" drop; }}\n\
         \tchain forward {{ type filter hook forward priority -300; policy accept; iifname \"{UPLINK}\" drop; oifname \"{UPLINK}\" drop; }}\n\
         }}\n"
    )
}

/// Installs the partition table in `netns` (idempotent).
pub fn partition(netns: &str) -> Result<(), NetError> {
    if is_partitioned(netns)? {
        return Ok(());
    }
    run_in(netns, "nft", &["-f", "-"], &partition_ruleset()).map(|_| ())
}

/// Removes the partition table from `netns` (idempotent).
pub fn heal(netns: &str) -> Result<(), NetError> {
    if !is_partitioned(netns)? {
        return Ok(());
    }
    run_in(
        netns,
        "nft",
        &["delete", "table", "inet", PARTITION_TABLE],
        "",
    )
    .map(|_| ())
}

/// Whether the partition table exists in `netns`.
pub fn is_partitioned(netns: &str) -> Result<bool, NetError> {
    let tables = run_in(netns, "nft", &["list", "tables", "inet"], "")?;
    Ok(tables
        .lines()
        .any(|l| l.trim() == format!("table inet {PARTITION_TABLE}")))
}

/// The IPv4 networks already in use in the root namespace: its addresses'
/// networks and its routes' destinations. A new cluster's subnet must not
/// overlap any of them.
pub fn used_subnets() -> Result<Vec<Subnet>, NetError> {
    let mut used = Vec::new();
    for line in ip(&["-4", "-o", "addr", "show"])?.lines() {
        // "3: eth0    inet 10.0.0.5/24 brd ... scope global eth0"
        let mut words = line.split_whitespace();
        if let Some(cidr) = words.find(|w| *w == "inet").and_then(|_| words.next()) {
            used.extend(network_of(cidr));
        }
    }
    for line in ip(&["-4", "route", "show", "table", "all"])?.lines() {
        let dest = line.split_whitespace().next().unwrap_or("");
        if dest == "default" || dest.is_empty() || !dest.contains('.') {
            continue;
        }
        let dest = if dest.contains('/') {
            dest.to_string()
        } else {
            format!("{dest}/32")
        };
        used.extend(network_of(&dest));
    }
    Ok(used)
}

/// `10.0.0.5/24` → `10.0.0.0/24` (prefixes outside 8..=32 are widened or
/// kept as /32 hosts; both only serve overlap checks).
fn network_of(cidr: &str) -> Option<Subnet> {
    let (addr, len) = cidr.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let prefix: u8 = len.parse().ok()?;
    let prefix = prefix.clamp(1, 32);
    Some(Subnet {
        network: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
        prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_number_hosts() {
        let s: Subnet = "10.251.0.0/24".parse().unwrap();
        assert_eq!(s.nth(1), Some(Ipv4Addr::new(10, 251, 0, 1)));
        assert_eq!(s.nth(254), Some(Ipv4Addr::new(10, 251, 0, 254)));
        assert_eq!(s.nth(255), None, "the broadcast address is not a host");
        assert_eq!(s.nth(0), None);
        assert_eq!(s.to_string(), "10.251.0.0/24");
        assert!("10.251.0.1/24".parse::<Subnet>().is_err(), "host bits set");
        assert!("10.251.0.0/31".parse::<Subnet>().is_err());
        assert!("10.251.0.0".parse::<Subnet>().is_err());
    }

    #[test]
    fn overlap_is_symmetric_and_respects_prefixes() {
        let a: Subnet = "10.251.0.0/24".parse().unwrap();
        let b: Subnet = "10.251.1.0/24".parse().unwrap();
        let wide: Subnet = "10.0.0.0/8".parse().unwrap();
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&wide) && wide.overlaps(&a));
        assert!(a.contains(Ipv4Addr::new(10, 251, 0, 9)));
        assert!(!b.contains(Ipv4Addr::new(10, 251, 0, 9)));
        assert_eq!(
            network_of("10.251.3.7/24"),
            Some("10.251.3.0/24".parse().unwrap())
        );
    }

    #[test]
    fn the_partition_drops_only_the_uplink() {
        let rules = partition_ruleset();
        assert!(rules.contains("table inet gantry-dev"));
        assert!(rules.contains("iifname \"eth0\" drop"));
        assert!(rules.contains("oifname \"eth0\" drop"));
        assert!(!rules.contains("policy drop"));
    }
}
