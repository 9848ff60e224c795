//! Per-node bridge networking for containers, until the overlay lands.
//!
//! A container with [`NetworkMode::Bridge`](crate::engine::spec::NetworkMode)
//! gets its own network namespace, kept as a bind-mounted file under the data
//! directory's runtime area so that it outlives the container's processes
//! (restarts keep their namespace and address), a veth pair whose host side is
//! enslaved to the node's bridge (`gantry0`) and whose peer is `eth0` inside,
//! an IPv4 address from the node's subnet and a default route via the bridge.
//! Published ports and outbound NAT are one nftables table, `ip gantry`,
//! regenerated as a whole from the containers' records.
//!
//! - [`subnet`]: the IPv4 subnet type (pure).
//! - [`ipam`]: address leases in a small locked file, stable per container.
//! - [`netns`]: persistent network namespace files.
//! - [`link`]: the bridge, veths, addresses and routes (via iproute2's `ip`).
//! - [`nft`]: the `ip gantry` ruleset (generated purely, applied with `nft -f -`).
//! - [`overlay`]: the cluster overlay (VXLAN, service VIPs and routing mesh,
//!   network isolation, DNS), programmed from the controller's updates.
//!
//! Decisions are in `docs/network.md`. The short version: kernel objects are
//! driven through `ip` and `nft` (no netlink crate is in the dependency graph
//! yet, and both tools are in every node's base install); every step is
//! idempotent so that a step repeated after a crash converges; every teardown
//! step tolerates "already gone".

pub mod ipam;
pub mod link;
pub mod netns;
pub mod nft;
pub mod overlay;
pub mod subnet;

use crate::engine::spec::PublishedPort;
use crate::paths::DataDir;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
pub use subnet::Subnet;

/// The name of the node's bridge when none is configured.
pub const DEFAULT_BRIDGE: &str = "gantry0";

/// The node's container subnet when none is configured.
pub const DEFAULT_SUBNET: &str = "10.89.0.0/24";

/// The network config file, under [`network_dir`].
pub const CONFIG_FILE: &str = "config.json";

/// Errors of bridge networking. Each names the step that failed, so that a
/// failed create says what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A file of the network state could not be used.
    #[error("network: {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// A network state file is malformed.
    #[error("network: {path}: {source}")]
    Record {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The configured subnet is invalid.
    #[error("network: invalid subnet {0:?}: {1}")]
    InvalidSubnet(String, String),
    /// An address given for a container cannot be leased.
    #[error("network: address {ip} cannot be used: {reason}")]
    AddressUnusable {
        /// The address.
        ip: Ipv4Addr,
        /// Why.
        reason: String,
    },
    /// Every address of the subnet is leased.
    #[error("network: no free address in subnet {0}")]
    SubnetFull(Subnet),
    /// The subnet changed while containers still hold leases in the old one.
    #[error(
        "network: subnet changed from {old} to {new} while {leases} container(s) hold addresses"
    )]
    SubnetChanged {
        /// The subnet the leases are in.
        old: Subnet,
        /// The configured subnet.
        new: Subnet,
        /// How many leases there are.
        leases: usize,
    },
    /// A system call failed.
    #[error("network: {step}: {source}")]
    Sys {
        /// What was being done, e.g. `create netns /var/lib/gantry/runtime/netns/ab…`.
        step: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A command (`ip`, `nft`) could not be run or failed.
    #[error("network: {step}: {message}")]
    Command {
        /// What was being done, e.g. `create veth gv0123456789a`.
        step: String,
        /// The tool's error output, or why it did not run.
        message: String,
    },
    /// Two running containers publish the same host port.
    #[error("network: host port {port} is already published by container {container}")]
    PortInUse {
        /// The port, e.g. `0.0.0.0:8080/tcp`.
        port: String,
        /// The container that has it.
        container: String,
    },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NetworkError {
    let path = path.to_path_buf();
    move |source| NetworkError::Io { path, source }
}

/// A node's bridge network: which bridge, which subnet. Read from
/// `<data dir>/network/config.json` when it exists (the overlay work will
/// write each node's share of the cluster CIDR there), else the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkConfig {
    /// The bridge's name (at most 15 bytes).
    pub bridge: String,
    /// The containers' subnet; the bridge has its first host address (the
    /// gateway), containers get the others. On a cluster node, the node's
    /// share of the cluster CIDR (written by the agent's overlay).
    pub subnet: Subnet,
    /// The cluster CIDR on a cluster node: traffic to it is not
    /// masqueraded (it crosses the overlay with its own source address),
    /// and containers resolve names through the node's DNS responder.
    pub cluster_cidr: Option<Subnet>,
    /// The MTU of the bridge and the veths (the overlay's: the underlay's
    /// minus VXLAN's 50 bytes); the kernel's default when absent.
    pub mtu: Option<u32>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: DEFAULT_BRIDGE.to_string(),
            // The constant is a valid subnet, checked by a unit test.
            subnet: DEFAULT_SUBNET.parse().unwrap_or(Subnet::DEFAULT),
            cluster_cidr: None,
            mtu: None,
        }
    }
}

impl NetworkConfig {
    /// The config of `data`: its `network/config.json`, else the defaults.
    pub fn load(data: &DataDir) -> Result<NetworkConfig, NetworkError> {
        let path = network_dir(data).join(CONFIG_FILE);
        let config: NetworkConfig = match read_json_opt(&path)? {
            Some(c) => c,
            None => return Ok(NetworkConfig::default()),
        };
        if config.bridge.is_empty() || config.bridge.len() > 15 || config.bridge.contains('/') {
            return Err(NetworkError::Command {
                step: format!("read {}", path.display()),
                message: format!("invalid bridge name {:?}", config.bridge),
            });
        }
        Ok(config)
    }

    /// Writes this config as `data`'s network config (atomically).
    pub fn save(&self, data: &DataDir) -> Result<(), NetworkError> {
        let dir = network_dir(data);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        write_json_atomic(&dir.join(CONFIG_FILE), self)
    }
}

/// Where a container is attached: kept in its record so that teardown and
/// re-attachment after a reboot need nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The container's address on the bridge.
    pub ip: Ipv4Addr,
    /// The subnet it is in.
    pub subnet: Subnet,
    /// Its default gateway (the bridge's address).
    pub gateway: Ipv4Addr,
    /// The bridge.
    pub bridge: String,
    /// The host side of its veth pair.
    pub host_veth: String,
    /// Its persistent network namespace file.
    pub netns: PathBuf,
    /// The MTU of both ends of its veth (the overlay's), if not the
    /// kernel's default. Absent in records written before the overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// A published port of a running container, as the ruleset needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortBinding {
    /// The container's id (for error messages and rule comments).
    pub container: String,
    /// The container's address.
    pub ip: Ipv4Addr,
    /// What it publishes.
    pub port: PublishedPort,
}

/// `<data dir>/network/`: config, leases, lock.
pub fn network_dir(data: &DataDir) -> PathBuf {
    data.root().join("network")
}

/// The persistent netns file of container `id`.
pub fn netns_path(data: &DataDir, id: &str) -> PathBuf {
    data.runtime_root().join("netns").join(id)
}

/// The host-side veth name of container `id`: `gv` + 11 hex digits, within
/// the kernel's 15 bytes, unique enough per node (44 bits of the id).
pub fn host_veth_name(id: &str) -> String {
    format!("gv{}", &id[..id.len().min(11)])
}

/// Serializes network changes between processes (CLI invocations, the agent,
/// shims removing `--rm` containers): leases and the ruleset are read,
/// changed and written as a whole.
pub struct NetworkLock {
    _flock: nix::fcntl::Flock<File>,
}

/// Takes the data dir's network lock, creating the directory.
pub fn lock(data: &DataDir) -> Result<NetworkLock, NetworkError> {
    let dir = network_dir(data);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    let flock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(
        |(_, source)| NetworkError::Sys {
            step: format!("lock {}", path.display()),
            source,
        },
    )?;
    Ok(NetworkLock { _flock: flock })
}

/// Attaches container `id` to the bridge: lease an address (the same one it
/// had, if any; `address` when the controller allocated one, as for a
/// cluster task), create its netns, veth pair, address and routes. The bridge
/// and the host's forwarding are set up on first use. On error, everything
/// this call made is undone (the caller's own undo calls [`detach`] too,
/// which is idempotent).
pub fn attach(
    data: &DataDir,
    config: &NetworkConfig,
    id: &str,
    address: Option<Ipv4Addr>,
) -> Result<Attachment, NetworkError> {
    let _lock = lock(data)?;
    let result = attach_locked(data, config, id, address);
    if result.is_err() {
        // Best effort; the error that made us undo is the one to return.
        if let Err(e) = detach_locked(data, id) {
            tracing::warn!(id, "undo network attach: {e}");
        }
    }
    result
}

fn attach_locked(
    data: &DataDir,
    config: &NetworkConfig,
    id: &str,
    address: Option<Ipv4Addr>,
) -> Result<Attachment, NetworkError> {
    let ip = match address {
        Some(ip) => ipam::lease_fixed(data, &config.subnet, id, ip)?,
        None => ipam::lease(data, &config.subnet, id)?,
    };
    let attachment = Attachment {
        ip,
        subnet: config.subnet,
        gateway: config.subnet.gateway(),
        bridge: config.bridge.clone(),
        host_veth: host_veth_name(id),
        netns: netns_path(data, id),
        mtu: config.mtu,
    };
    netns::create(&attachment.netns)?;
    link::create_veth(&attachment)?;
    link::configure_inside(&attachment)?;
    Ok(attachment)
}

/// Makes sure an attached container's namespace and veth exist (they do not
/// after a reboot, or when someone deleted them) and recreates what is
/// missing with the same address. `running_pid` is the container's init when
/// it runs: its namespace is the one to keep (bound again to the file if the
/// file lost it), since its processes cannot move. Cheap when all is there
/// (no process is started).
pub fn ensure_attached(
    data: &DataDir,
    attachment: &Attachment,
    running_pid: Option<i32>,
) -> Result<(), NetworkError> {
    let _lock = lock(data)?;
    let netns_ok = netns::is_mounted(&attachment.netns);
    if netns_ok && link::exists(&attachment.host_veth)? {
        return Ok(());
    }
    // The veth, if only half of it is left, is remade with its namespace.
    link::delete_link(&attachment.host_veth)?;
    if !netns_ok {
        netns::remove(&attachment.netns)?;
        match running_pid {
            Some(pid) => netns::bind(pid, &attachment.netns)?,
            None => netns::create(&attachment.netns)?,
        }
    } else if running_pid.is_none() {
        // A stopped container's namespace may hold a stale eth0 whose host
        // side is gone: start from a fresh one.
        netns::remove(&attachment.netns)?;
        netns::create(&attachment.netns)?;
    }
    // A running container's namespace may still hold the peer of a veth
    // whose host side was deleted; deleting either end deletes both, so
    // there is no stale eth0 left to clash with.
    link::create_veth(attachment)?;
    link::configure_inside(attachment)
}

/// Detaches container `id`: deletes its veth, its netns file and its lease.
/// Idempotent: whatever is already gone is skipped.
pub fn detach(data: &DataDir, id: &str) -> Result<(), NetworkError> {
    let _lock = lock(data)?;
    detach_locked(data, id)
}

fn detach_locked(data: &DataDir, id: &str) -> Result<(), NetworkError> {
    // Every step runs even when an earlier one failed; the first error wins.
    let steps = [
        link::delete_link(&host_veth_name(id)),
        netns::remove(&netns_path(data, id)),
        ipam::release(data, id),
    ];
    steps
        .into_iter()
        .collect::<Result<Vec<()>, _>>()
        .map(|_| ())
}

/// Checks that no two bindings publish the same host address, port and
/// protocol (a wildcard address conflicts with every address).
pub fn check_conflicts(bindings: &[PortBinding]) -> Result<(), NetworkError> {
    for (i, a) in bindings.iter().enumerate() {
        for b in &bindings[..i] {
            let same_ip = match (a.port.host_ip, b.port.host_ip) {
                (Some(x), Some(y)) => x == y,
                _ => true,
            };
            if same_ip
                && a.port.host_port == b.port.host_port
                && a.port.protocol == b.port.protocol
                && a.container != b.container
            {
                return Err(NetworkError::PortInUse {
                    port: a.port.host_display(),
                    container: b.container.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Replaces the node's `ip gantry` table with the one for `bindings`, and
/// makes sure forwarding is on. Atomic (one `nft` transaction), so a
/// published port never disappears while another changes.
///
/// With [`Sync::IfChanged`] nothing runs when the ruleset is the one this
/// data dir last loaded (kept in `network/applied.nft`): every container
/// start syncs, and without published ports the table does not change, so
/// this saves an `nft` run per start (about a third of a bridged start's
/// network cost). [`Sync::Always`] loads it regardless, for agent start-up,
/// where the kernel's table may be gone (reboot) or edited by hand. Callers
/// hold [`lock`], so the record and the table change together.
pub fn sync_rules(
    data: &DataDir,
    config: &NetworkConfig,
    bindings: &[PortBinding],
    mode: Sync,
) -> Result<(), NetworkError> {
    let ruleset = nft::ruleset(config, bindings, link::bridge_netfilter());
    let applied_path = network_dir(data).join("applied.nft");
    // The record names the boot it was loaded in: after a reboot the table
    // is gone whatever the file says.
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let record = format!("# boot {}\n{ruleset}", boot_id.trim());
    if mode == Sync::IfChanged
        && !boot_id.is_empty()
        && std::fs::read_to_string(&applied_path).is_ok_and(|applied| applied == record)
    {
        return Ok(());
    }
    link::enable_forwarding(&config.bridge)?;
    // Forgotten first: if the load fails half-way the next sync loads again.
    match std::fs::remove_file(&applied_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&applied_path)(e)),
    }
    nft::apply(&ruleset)?;
    // A cache, so no fsync: after a crash it is at worst missing, and the
    // next sync loads again.
    let tmp = applied_path.with_extension("nft.tmp");
    std::fs::create_dir_all(network_dir(data)).map_err(io(&network_dir(data)))?;
    std::fs::write(&tmp, record.as_bytes()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &applied_path).map_err(io(&applied_path))
}

/// Whether [`sync_rules`] may skip a load that would change nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Skip when the ruleset equals the one last loaded from this data dir.
    IfChanged,
    /// Load it whatever was loaded before.
    Always,
}

/// Removes the node's bridge and the `ip gantry` table when no container is
/// attached to the bridge (no port on it): what the overlay made and the
/// engine's share of it, so that a node whose last networked task went is
/// as it was before the first one (`ip link`, `ip route`, `nft list
/// ruleset`), as Swarm deletes a network's sandbox on a node when its last
/// task on that network goes. `Ok(false)` when a container is still on it
/// (a stopped container keeps its veth): nothing is touched. Under
/// [`lock`], so no attach runs between the check and the deletion; the next
/// attach recreates the bridge, and forgetting `applied.nft` makes the next
/// sync load the table again.
pub fn remove_idle_bridge(data: &DataDir, bridge: &str) -> Result<bool, NetworkError> {
    let _lock = lock(data)?;
    if link::exists(bridge)? {
        let ports = overlay::run_tool(
            "ip",
            &["-o", "link", "show", "master", bridge],
            "list bridge ports",
            "",
        )?;
        if !ports.trim().is_empty() {
            return Ok(false);
        }
    }
    let applied_path = network_dir(data).join("applied.nft");
    match std::fs::remove_file(&applied_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&applied_path)(e)),
    }
    nft::delete_table()?;
    link::delete_link(bridge)?;
    Ok(true)
}

/// Removes the `ip gantry` table (for tests and node decommissioning).
pub fn remove_rules() -> Result<(), NetworkError> {
    nft::delete_table()
}

pub(crate) fn read_json_opt<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, NetworkError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| NetworkError::Record {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), NetworkError> {
    crate::engine::shim::write_json_atomic(path, value).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::spec::PortProtocol;

    fn binding(container: &str, host_ip: Option<[u8; 4]>, port: u16) -> PortBinding {
        PortBinding {
            container: container.into(),
            ip: Ipv4Addr::new(10, 89, 0, 2),
            port: PublishedPort {
                host_ip: host_ip.map(Ipv4Addr::from),
                host_port: port,
                container_port: 80,
                protocol: PortProtocol::Tcp,
            },
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = NetworkConfig::default();
        assert_eq!(c.bridge, "gantry0");
        assert_eq!(c.subnet.to_string(), "10.89.0.0/24");
        assert_eq!(c.subnet.gateway(), Ipv4Addr::new(10, 89, 0, 1));
    }

    #[test]
    fn config_loads_and_saves() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        assert_eq!(
            NetworkConfig::load(&data).unwrap(),
            NetworkConfig::default()
        );
        let c = NetworkConfig {
            bridge: "gbr1".into(),
            subnet: "10.90.3.0/24".parse().unwrap(),
            cluster_cidr: Some("10.90.0.0/16".parse().unwrap()),
            mtu: Some(1450),
        };
        c.save(&data).unwrap();
        assert_eq!(NetworkConfig::load(&data).unwrap(), c);
        std::fs::write(
            network_dir(&data).join(CONFIG_FILE),
            r#"{"bridge": "a-name-far-too-long"}"#,
        )
        .unwrap();
        assert!(NetworkConfig::load(&data).is_err());
    }

    #[test]
    fn veth_names_fit_the_kernel_limit() {
        let name = host_veth_name(&"ab".repeat(32));
        assert_eq!(name, "gvabababababa");
        assert!(name.len() <= 15);
    }

    #[test]
    fn conflicting_host_ports_are_refused() {
        check_conflicts(&[binding("a", None, 80), binding("b", None, 81)]).unwrap();
        check_conflicts(&[
            binding("a", Some([10, 0, 0, 1]), 80),
            binding("b", Some([10, 0, 0, 2]), 80),
        ])
        .unwrap();
        let err = check_conflicts(&[binding("a", None, 80), binding("b", Some([1, 2, 3, 4]), 80)])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "network: host port 1.2.3.4:80/tcp is already published by container a"
        );
        let mut udp = binding("b", None, 80);
        udp.port.protocol = PortProtocol::Udp;
        check_conflicts(&[binding("a", None, 80), udp]).unwrap();
    }
}
