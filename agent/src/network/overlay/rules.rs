//! The overlay's nftables table, `ip gantry_overlay`: service VIPs, the
//! routing mesh and network isolation, in the manner of kube-proxy's
//! nftables mode.
//!
//! The desired state is first projected onto a [`Model`] (pure): named sets,
//! maps and per-service chains. A whole table is rendered by [`full`]
//! (start-up, a changed CIDR) and a change by [`diff`], which names only
//! what differs between two models: one endpoint change at 1,000 services is
//! one `flush chain` and one `add rule`. Either is loaded in one `nft -f -`
//! transaction, so a reader never sees half a change.
//!
//! Layout (see `docs/network.md`):
//! - `vips` map `VIP . proto . port : goto svc_<id>_<proto>_<port>`;
//!   `mesh` map `proto . published : goto svc_…` for ingress ports, looked
//!   up only for traffic to the node's own addresses (`fib daddr type local`).
//! - `svc_…` chain: one rule, `dnat ip to numgen random mod N map { i :
//!   addr . port }` over the ready endpoints (even spreading; conntrack keeps
//!   an established flow on its backend since NAT runs on a flow's first
//!   packet only). No ready endpoint: an empty chain, and the VIP is
//!   rejected by the forward/output filter instead of leaking to the default
//!   route.
//! - `postrouting`: DNATed traffic leaving through the VXLAN device from a
//!   source outside the cluster CIDR (a routing-mesh client, or the node
//!   itself) is masqueraded to the node's VTEP address, so the reply comes
//!   back through this node's conntrack; traffic delivered to a local
//!   replica keeps the client's source address (moby/moby#25526).
//! - `isolate`: forwarded traffic between two cluster addresses passes only
//!   if both are in one network's set (`net_<name>`), or comes from a node's
//!   VTEP address (masqueraded mesh traffic).

use super::state::DesiredState;
use crate::engine::spec::PortProtocol;
use crate::network::{NetworkError, Subnet};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// The nftables table of the overlay (family `ip`). Separate from the
/// bridge's `ip gantry`, which is regenerated as a whole on container starts.
pub const TABLE: &str = "gantry_overlay";

/// What the table is rendered against, beside the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The node's bridge.
    pub bridge: String,
    /// The VXLAN device.
    pub vxlan: String,
}

/// The fixed part of the table: a change here is a full reload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    cluster: Subnet,
    services: Subnet,
    node: Option<Subnet>,
    bridge: String,
    vxlan: String,
}

/// The table as named objects, so that two can be compared cheaply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    header: Header,
    /// Set name → addresses (`net_…` per network, and `vteps`).
    sets: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    /// The `net_…` sets, in the order of the isolate chain.
    networks: Vec<String>,
    /// `vips` map: key → chain.
    vips: BTreeMap<String, String>,
    /// `mesh` map: key → chain.
    mesh: BTreeMap<String, String>,
    /// Service chains: name → its one rule (empty: no ready endpoint).
    chains: BTreeMap<String, String>,
}

/// Keeps the characters nft accepts in an identifier.
fn ident(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The set holding network `name`'s member addresses.
pub fn network_set(name: &str) -> String {
    format!("net_{}", ident(name))
}

fn proto_word(p: PortProtocol) -> &'static str {
    match p {
        PortProtocol::Tcp => "tcp",
        PortProtocol::Udp => "udp",
    }
}

/// Projects `state` onto the table; `None` until the state has both CIDRs
/// (before the first full update there is nothing to program).
pub fn model(state: &DesiredState, ctx: &Context) -> Option<Model> {
    let header = Header {
        cluster: state.cluster_cidr?,
        services: state.service_cidr?,
        node: state.node_subnet,
        bridge: ctx.bridge.clone(),
        vxlan: ctx.vxlan.clone(),
    };
    let mut sets: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    let mut networks = Vec::new();
    for (name, members) in state.members() {
        let set = network_set(&name);
        networks.push(set.clone());
        sets.insert(set, members);
    }
    sets.insert(
        "vteps".into(),
        state.nodes.values().map(|n| n.subnet.network()).collect(),
    );
    let mut vips = BTreeMap::new();
    let mut mesh = BTreeMap::new();
    let mut chains = BTreeMap::new();
    for s in state.services.values() {
        let ready = s.ready_addresses();
        for p in &s.ports {
            let proto = proto_word(p.protocol);
            let chain = format!("svc_{}_{proto}_{}", ident(&s.id), p.target);
            let mesh_key = p
                .published
                .filter(|_| p.ingress)
                .map(|n| format!("{proto} . {n}"));
            if s.vip.is_none() && mesh_key.is_none() {
                continue;
            }
            if let Some(vip) = s.vip {
                vips.insert(format!("{vip} . {proto} . {}", p.target), chain.clone());
            }
            if let Some(key) = mesh_key {
                // Two services cannot publish one port (the controller
                // refuses it); if they do, the first by id keeps it.
                mesh.entry(key).or_insert_with(|| chain.clone());
            }
            let rule = if ready.is_empty() {
                String::new()
            } else {
                let mut elems = String::new();
                for (i, a) in ready.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ", " };
                    let _ = write!(elems, "{sep}{i} : {a} . {}", p.target);
                }
                format!(
                    "meta l4proto {proto} dnat ip to numgen random mod {} map {{ {elems} }}",
                    ready.len()
                )
            };
            chains.insert(chain, rule);
        }
    }
    Some(Model {
        header,
        sets,
        networks,
        vips,
        mesh,
        chains,
    })
}

fn elements<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn isolate_rules(m: &Model) -> String {
    let mut out = format!("add rule ip {TABLE} isolate ip saddr @vteps accept\n");
    for set in &m.networks {
        let _ = writeln!(
            out,
            "add rule ip {TABLE} isolate ip saddr @{set} ip daddr @{set} accept"
        );
    }
    let _ = writeln!(out, "add rule ip {TABLE} isolate drop");
    out
}

/// The whole table for `m`, replacing any previous one in one transaction
/// (the add-then-delete idiom: nft 1.0.6 has no `destroy`). Deleting and
/// recreating NAT rules does not touch conntrack, so established flows keep
/// their backends across a reload.
pub fn full(m: &Model) -> String {
    let Header {
        cluster,
        services,
        node,
        bridge,
        vxlan,
    } = &m.header;
    // A container reaching a VIP whose chosen replica is on the same bridge
    // would get the reply straight from the replica's address (bridged, so
    // never un-NATed): masquerade that hairpin, as the bridge table does for
    // published ports. Replicas on other nodes and mesh clients keep the
    // client's address.
    let hairpin = match node {
        Some(subnet) => {
            format!("\t\toifname \"{bridge}\" ip saddr {subnet} ct status dnat masquerade\n")
        }
        None => String::new(),
    };
    let mut out = format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tmap vips {{ type ipv4_addr . inet_proto . inet_service : verdict; }}\n\
         \tmap mesh {{ type inet_proto . inet_service : verdict; }}\n\
         \tchain services {{\n\
         \t\tip daddr . meta l4proto . th dport vmap @vips\n\
         \t\tfib daddr type local meta l4proto . th dport vmap @mesh\n\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat - 1; policy accept;\n\
         \t\tjump services\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -101; policy accept;\n\
         \t\tjump services\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat - 1; policy accept;\n\
         \t\toifname \"{vxlan}\" ct status dnat ip saddr != {cluster} masquerade\n\
         {hairpin}\
         \t\tip saddr 127.0.0.0/8 ct status dnat masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter - 1; policy accept;\n\
         \t\tip daddr {services} reject\n\
         \t\tct state established,related accept\n\
         \t\tip saddr {cluster} ip daddr {cluster} jump isolate\n\
         \t}}\n\
         \tchain output_filter {{\n\
         \t\ttype filter hook output priority filter - 1; policy accept;\n\
         \t\tip daddr {services} reject\n\
         \t}}\n\
         \tchain isolate {{\n\
         \t}}\n\
         }}\n"
    );
    for (name, members) in &m.sets {
        let _ = writeln!(out, "add set ip {TABLE} {name} {{ type ipv4_addr; }}");
        if !members.is_empty() {
            let _ = writeln!(
                out,
                "add element ip {TABLE} {name} {{ {} }}",
                elements(members)
            );
        }
    }
    out.push_str(&isolate_rules(m));
    for (name, rule) in &m.chains {
        let _ = writeln!(out, "add chain ip {TABLE} {name}");
        if !rule.is_empty() {
            let _ = writeln!(out, "add rule ip {TABLE} {name} {rule}");
        }
    }
    for (map, entries) in [("vips", &m.vips), ("mesh", &m.mesh)] {
        if !entries.is_empty() {
            let _ = writeln!(
                out,
                "add element ip {TABLE} {map} {{ {} }}",
                elements(entries.iter().map(|(k, c)| format!("{k} : goto {c}")))
            );
        }
    }
    out
}

/// The commands that turn `old` into `new`, touching only what differs;
/// `None` when they are equal. A changed header (CIDRs, devices) is a full
/// reload.
pub fn diff(old: &Model, new: &Model) -> Option<String> {
    if old == new {
        return None;
    }
    if old.header != new.header {
        return Some(full(new));
    }
    let mut out = String::new();
    // New sets and chains first: the map elements and rules below name them.
    for name in new.sets.keys().filter(|n| !old.sets.contains_key(*n)) {
        let _ = writeln!(out, "add set ip {TABLE} {name} {{ type ipv4_addr; }}");
    }
    for (name, rule) in &new.chains {
        match old.chains.get(name) {
            Some(old_rule) if old_rule == rule => continue,
            Some(_) => {
                let _ = writeln!(out, "flush chain ip {TABLE} {name}");
            }
            None => {
                let _ = writeln!(out, "add chain ip {TABLE} {name}");
            }
        }
        if !rule.is_empty() {
            let _ = writeln!(out, "add rule ip {TABLE} {name} {rule}");
        }
    }
    let empty = BTreeSet::new();
    for (name, members) in &new.sets {
        let before = old.sets.get(name).unwrap_or(&empty);
        let gone: Vec<_> = before.difference(members).collect();
        let added: Vec<_> = members.difference(before).collect();
        if !gone.is_empty() {
            let _ = writeln!(
                out,
                "delete element ip {TABLE} {name} {{ {} }}",
                elements(gone)
            );
        }
        if !added.is_empty() {
            let _ = writeln!(
                out,
                "add element ip {TABLE} {name} {{ {} }}",
                elements(added)
            );
        }
    }
    for (map, before, after) in [
        ("vips", &old.vips, &new.vips),
        ("mesh", &old.mesh, &new.mesh),
    ] {
        let gone: Vec<_> = before
            .iter()
            .filter(|(k, c)| after.get(*k) != Some(*c))
            .map(|(k, _)| k)
            .collect();
        let added: Vec<_> = after
            .iter()
            .filter(|(k, c)| before.get(*k) != Some(*c))
            .map(|(k, c)| format!("{k} : goto {c}"))
            .collect();
        if !gone.is_empty() {
            let _ = writeln!(
                out,
                "delete element ip {TABLE} {map} {{ {} }}",
                elements(gone)
            );
        }
        if !added.is_empty() {
            let _ = writeln!(
                out,
                "add element ip {TABLE} {map} {{ {} }}",
                elements(added)
            );
        }
    }
    // The isolate chain names the network sets: rewritten (it is one rule
    // per network, and networks change rarely) before a set is deleted.
    if old.networks != new.networks {
        let _ = writeln!(out, "flush chain ip {TABLE} isolate");
        out.push_str(&isolate_rules(new));
    }
    for name in old.chains.keys().filter(|n| !new.chains.contains_key(*n)) {
        let _ = writeln!(out, "delete chain ip {TABLE} {name}");
    }
    for name in old.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
        let _ = writeln!(out, "delete set ip {TABLE} {name}");
    }
    Some(out)
}

/// Loads `commands` in one `nft -f -` transaction.
pub fn apply(commands: &str) -> Result<(), NetworkError> {
    super::run_tool(
        "nft",
        &["-f", "-"],
        "load nftables table ip gantry_overlay",
        commands,
    )
    .map(|_| ())
}

/// Deletes the table; a missing one is fine.
pub fn delete_table() -> Result<(), NetworkError> {
    apply(&format!("table ip {TABLE}\ndelete table ip {TABLE}\n"))
}

#[cfg(test)]
mod tests {
    use super::super::state::tests::{node, service};
    use super::super::state::{ClusterNetwork, Update};
    use super::*;

    fn ctx() -> Context {
        Context {
            bridge: "gantry0".into(),
            vxlan: "gantry.vx".into(),
        }
    }

    fn state(services: Vec<super::super::state::ServiceRecord>) -> DesiredState {
        let mut s = DesiredState::default();
        s.apply(Update {
            full: true,
            cluster_cidr: Some("10.42.0.0/16".parse().unwrap()),
            service_cidr: Some("10.43.0.0/16".parse().unwrap()),
            node_subnet: Some("10.42.1.0/24".parse().unwrap()),
            nodes: vec![
                node("a", [192, 0, 2, 1], "10.42.1.0/24"),
                node("b", [192, 0, 2, 2], "10.42.2.0/24"),
            ],
            services,
            networks: vec![ClusterNetwork {
                name: "st_default".into(),
                stack: "st".into(),
            }],
            ..Update::default()
        });
        s
    }

    #[test]
    fn full_table_has_vip_mesh_chain_and_isolation() {
        let mut web = service(
            "web",
            Some([10, 43, 0, 2]),
            &[
                ([10, 42, 1, 2], true),
                ([10, 42, 2, 2], true),
                ([10, 42, 2, 3], false),
            ],
        );
        web.ports[0].published = Some(8080);
        let m = model(&state(vec![web]), &ctx()).unwrap();
        let text = full(&m);
        assert!(text.starts_with("table ip gantry_overlay\ndelete table ip gantry_overlay\n"));
        assert!(text.contains(
            "add rule ip gantry_overlay svc_web_tcp_80 meta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 10.42.1.2 . 80, 1 : 10.42.2.2 . 80 }\n"
        ));
        assert!(text.contains(
            "add element ip gantry_overlay vips { 10.43.0.2 . tcp . 80 : goto svc_web_tcp_80 }"
        ));
        assert!(
            text.contains(
                "add element ip gantry_overlay mesh { tcp . 8080 : goto svc_web_tcp_80 }"
            )
        );
        // The member set holds the endpoint that is not ready too.
        assert!(text.contains(
            "add element ip gantry_overlay net_st_default { 10.42.1.2, 10.42.2.2, 10.42.2.3 }"
        ));
        assert!(text.contains("isolate ip saddr @net_st_default ip daddr @net_st_default accept"));
        assert!(text.contains("add element ip gantry_overlay vteps { 10.42.1.0, 10.42.2.0 }"));
        assert!(
            text.contains(
                "oifname \"gantry.vx\" ct status dnat ip saddr != 10.42.0.0/16 masquerade"
            )
        );
    }

    #[test]
    fn one_endpoint_change_touches_only_that_service() {
        let services: Vec<_> = (0..1000)
            .map(|i| {
                service(
                    &format!("s{i}"),
                    Some([10, 43, (i / 250) as u8, (i % 250) as u8 + 1]),
                    &[([10, 42, 1, 2], true), ([10, 42, 2, 2], true)],
                )
            })
            .collect();
        let before = model(&state(services.clone()), &ctx()).unwrap();
        let mut changed = services;
        changed[500].endpoints[1].ready = false;
        let after = model(&state(changed), &ctx()).unwrap();
        let d = diff(&before, &after).unwrap();
        assert_eq!(
            d,
            "flush chain ip gantry_overlay svc_s500_tcp_80\n\
             add rule ip gantry_overlay svc_s500_tcp_80 meta l4proto tcp dnat ip to numgen random mod 1 map { 0 : 10.42.1.2 . 80 }\n"
        );
        assert_eq!(diff(&after, &after), None);
    }

    #[test]
    fn removing_a_service_deletes_its_elements_then_its_chain() {
        let web = service("web", Some([10, 43, 0, 2]), &[([10, 42, 1, 2], true)]);
        let before = model(&state(vec![web]), &ctx()).unwrap();
        let after = model(&state(vec![]), &ctx()).unwrap();
        let d = diff(&before, &after).unwrap();
        let del_elem = d.find("delete element ip gantry_overlay vips").unwrap();
        let del_chain = d
            .find("delete chain ip gantry_overlay svc_web_tcp_80")
            .unwrap();
        assert!(del_elem < del_chain, "{d}");
        assert!(d.contains("delete element ip gantry_overlay net_st_default { 10.42.1.2 }"));
        // A dnsrr service without published ports has no chain at all.
        let rr = service("rr", None, &[([10, 42, 1, 2], true)]);
        assert!(model(&state(vec![rr]), &ctx()).unwrap().chains.is_empty());
    }

    #[test]
    fn a_removed_network_leaves_the_isolate_chain_before_its_set_goes() {
        let before = model(&state(vec![]), &ctx()).unwrap();
        let mut s = state(vec![]);
        s.networks.clear();
        let after = model(&s, &ctx()).unwrap();
        let d = diff(&before, &after).unwrap();
        let flush = d.find("flush chain ip gantry_overlay isolate").unwrap();
        let del = d
            .find("delete set ip gantry_overlay net_st_default")
            .unwrap();
        assert!(flush < del, "{d}");
        assert!(!d[flush..].contains("@net_st_default"), "{d}");
    }
}
