//! The `ip gantry` nftables table: outbound NAT for the containers' subnet
//! and DNAT for published ports. Generated as a whole by [`ruleset`] (pure)
//! and loaded by [`apply`] in one `nft -f -` transaction that deletes and
//! recreates the table, so the table is always exactly what the containers'
//! records say: no stale DNAT entry survives a resync, and rules Gantry does
//! not own (other tables) are never touched.

use super::{NetworkConfig, NetworkError, PortBinding};
use crate::engine::spec::PortProtocol;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// The nftables table Gantry owns (family `ip`).
pub const TABLE: &str = "gantry";

/// The `nft` binary.
const NFT: &str = "nft";

/// The ruleset that makes the table hold exactly `bindings`' DNAT rules and
/// the subnet's NAT. Starts with the add-then-delete idiom so that loading it
/// replaces any previous table atomically whether or not one existed (nft
/// 1.0.6 has no `destroy`). `bridge_netfilter`: whether bridged traffic
/// passes the `ip` hooks ([`super::link::bridge_netfilter`]).
pub fn ruleset(config: &NetworkConfig, bindings: &[PortBinding], bridge_netfilter: bool) -> String {
    let subnet = config.subnet;
    let bridge = &config.bridge;
    // On a cluster node, traffic to other nodes' containers crosses the
    // overlay with its own source address (networks are enforced by it,
    // and a replica sees who called): only what leaves the cluster CIDR is
    // masqueraded.
    let outside = match config.cluster_cidr {
        Some(cluster) => format!("ip daddr != {cluster} "),
        None => String::new(),
    };
    // A container reaching a published port of its own node whose
    // container is on the bridge. With br_netfilter the DNATed packet is
    // bridged and the reply, bridged back, un-NATed by conntrack on the
    // bridge: only a container reaching itself is masqueraded (its own
    // address arriving on its eth0 would be a martian); the others keep
    // their address. Without it the reply would bypass conntrack: every
    // such flow is masqueraded (routed).
    let hairpin = if !bridge_netfilter {
        format!("\t\toifname \"{bridge}\" ip saddr {subnet} ct status dnat masquerade\n")
    } else if bindings.is_empty() {
        String::new()
    } else {
        let mut ips: Vec<_> = bindings.iter().map(|b| b.ip).collect();
        ips.sort();
        ips.dedup();
        let pairs: Vec<String> = ips.iter().map(|ip| format!("{ip} . {ip}")).collect();
        format!(
            "\t\toifname \"{bridge}\" ct status dnat ip saddr . ip daddr {{ {} }} masquerade\n",
            pairs.join(", ")
        )
    };
    let mut dnat = String::new();
    for b in bindings {
        let proto = match b.port.protocol {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        };
        let daddr = match b.port.host_ip {
            Some(ip) => format!("ip daddr {ip} "),
            None => String::new(),
        };
        // The comment lets an operator tell whose rule it is (`nft list`).
        let _ = writeln!(
            dnat,
            "\t\t{daddr}{proto} dport {hp} dnat to {ip}:{cp} comment \"{id}\"",
            hp = b.port.host_port,
            ip = b.ip,
            cp = b.port.container_port,
            id = &b.container[..b.container.len().min(12)],
        );
    }
    format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain published {{\n\
         {dnat}\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tfib daddr type local jump published\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tfib daddr type local jump published\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} {outside}oifname != \"{bridge}\" masquerade\n\
         {hairpin}\
         \t\toifname \"{bridge}\" ip saddr 127.0.0.0/8 masquerade\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname != \"lo\" ip daddr 127.0.0.0/8 ct status & dnat == 0 drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tip saddr {subnet} accept\n\
         \t\tip daddr {subnet} accept\n\
         \t}}\n\
         }}\n"
    )
}

/// Loads `ruleset` with `nft -f -` (one transaction).
pub fn apply(ruleset: &str) -> Result<(), NetworkError> {
    run_nft("load nftables table ip gantry", ruleset)
}

/// Deletes the table; a missing one is fine.
pub fn delete_table() -> Result<(), NetworkError> {
    run_nft(
        "delete nftables table ip gantry",
        &format!("table ip {TABLE}\ndelete table ip {TABLE}\n"),
    )
}

fn run_nft(step: &str, input: &str) -> Result<(), NetworkError> {
    let mut child = Command::new(NFT)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetworkError::Command {
            step: step.to_string(),
            message: format!("cannot run {NFT}: {e}"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows up as nft's own failure below.
        let _ = stdin.write_all(input.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|e| NetworkError::Command {
            step: step.to_string(),
            message: format!("waiting for {NFT}: {e}"),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Command {
            step: step.to_string(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::spec::PublishedPort;
    use std::net::Ipv4Addr;

    #[test]
    fn ruleset_has_nat_and_one_dnat_per_binding() {
        let config = NetworkConfig::default();
        let bindings = [
            PortBinding {
                container: "0123456789abcdef".into(),
                ip: Ipv4Addr::new(10, 89, 0, 2),
                port: PublishedPort {
                    host_ip: None,
                    host_port: 8080,
                    container_port: 80,
                    protocol: PortProtocol::Tcp,
                },
            },
            PortBinding {
                container: "fedcba9876543210".into(),
                ip: Ipv4Addr::new(10, 89, 0, 3),
                port: PublishedPort {
                    host_ip: Some(Ipv4Addr::new(192, 0, 2, 1)),
                    host_port: 53,
                    container_port: 5353,
                    protocol: PortProtocol::Udp,
                },
            },
        ];
        let rules = ruleset(&config, &bindings, true);
        assert!(rules.starts_with("table ip gantry\ndelete table ip gantry\n"));
        assert!(
            rules.contains("\t\ttcp dport 8080 dnat to 10.89.0.2:80 comment \"0123456789ab\"\n")
        );
        assert!(rules.contains(
            "\t\tip daddr 192.0.2.1 udp dport 53 dnat to 10.89.0.3:5353 comment \"fedcba987654\"\n"
        ));
        assert!(rules.contains("ip saddr 10.89.0.0/24 oifname != \"gantry0\" masquerade"));
        // route_localnet's guard: nothing but DNATed traffic reaches 127/8 from outside lo.
        assert!(
            rules.contains("iifname != \"lo\" ip daddr 127.0.0.0/8 ct status & dnat == 0 drop")
        );
        assert_eq!(rules.matches("dnat to").count(), 2);
        let cluster = NetworkConfig {
            cluster_cidr: Some("10.42.0.0/16".parse().unwrap()),
            ..NetworkConfig::default()
        };
        assert!(ruleset(&cluster, &[], true).contains(
            "ip saddr 10.89.0.0/24 ip daddr != 10.42.0.0/16 oifname != \"gantry0\" masquerade"
        ));
        let empty = ruleset(&config, &[], true);
        assert!(!empty.contains("dnat to"));
        assert!(empty.contains("masquerade"));
    }

    #[test]
    fn hairpin_masquerades_only_self_with_bridge_netfilter() {
        let config = NetworkConfig::default();
        let bindings = [PortBinding {
            container: "0123456789abcdef".into(),
            ip: Ipv4Addr::new(10, 89, 0, 2),
            port: PublishedPort {
                host_ip: None,
                host_port: 8080,
                container_port: 80,
                protocol: PortProtocol::Tcp,
            },
        }];
        // Bridged replies are un-NATed on the bridge: only a container
        // reaching itself is masqueraded.
        let rules = ruleset(&config, &bindings, true);
        assert!(rules.contains(
            "oifname \"gantry0\" ct status dnat ip saddr . ip daddr { 10.89.0.2 . 10.89.0.2 } masquerade\n"
        ));
        assert!(!rules.contains("ip saddr 10.89.0.0/24 ct status dnat masquerade"));
        assert!(!ruleset(&config, &[], true).contains("ct status dnat"));
        // Without br_netfilter every hairpin is routed and masqueraded.
        let routed = ruleset(&config, &bindings, false);
        assert!(
            routed
                .contains("oifname \"gantry0\" ip saddr 10.89.0.0/24 ct status dnat masquerade\n")
        );
        assert!(!routed.contains("ip saddr . ip daddr"));
    }
}
