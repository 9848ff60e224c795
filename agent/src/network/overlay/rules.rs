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

use super::state::{DesiredState, ServiceRecord};
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
    /// Whether bridged IPv4 traffic passes the `ip` hooks
    /// (`bridge-nf-call-iptables`, see [`crate::network::link::bridge_netfilter`]):
    /// then a reply bridged straight back from a replica is un-NATed by
    /// conntrack on the bridge, and only a task reaching itself through a
    /// VIP needs the hairpin masquerade.
    pub bridge_netfilter: bool,
}

/// The fixed part of the table: a change here is a full reload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    cluster: Subnet,
    services: Subnet,
    node: Option<Subnet>,
    bridge: String,
    vxlan: String,
    bridge_netfilter: bool,
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
    /// `mesh` map: key → chain (the first claim by service id).
    mesh: BTreeMap<String, String>,
    /// Service chains: name → its one rule (empty: no ready endpoint).
    chains: BTreeMap<String, String>,
    /// What each service contributes, by id: what [`Model::patch`] takes
    /// out when the service changes.
    services: BTreeMap<String, Fragment>,
    /// Per set, how many services put each address there (an address may
    /// be in one network through several services).
    refs: BTreeMap<String, BTreeMap<Ipv4Addr, u32>>,
    /// Per mesh key, the services claiming it and their chains.
    claims: BTreeMap<String, BTreeMap<String, String>>,
}

/// One service's share of the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Fragment {
    vips: Vec<(String, String)>,
    mesh: Vec<(String, String)>,
    chains: Vec<(String, String)>,
    /// (set, address) for every endpoint on every network of the service.
    members: Vec<(String, Ipv4Addr)>,
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

/// What service `s` puts in the table.
fn fragment(s: &ServiceRecord) -> Fragment {
    let mut f = Fragment::default();
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
            f.vips
                .push((format!("{vip} . {proto} . {}", p.target), chain.clone()));
        }
        if let Some(key) = mesh_key {
            f.mesh.push((key, chain.clone()));
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
        f.chains.push((chain, rule));
    }
    for net in &s.networks {
        let set = network_set(net);
        for e in &s.endpoints {
            f.members.push((set.clone(), e.address));
        }
    }
    f
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
        bridge_netfilter: ctx.bridge_netfilter,
    };
    let mut m = Model {
        header,
        sets: BTreeMap::new(),
        networks: Vec::new(),
        vips: BTreeMap::new(),
        mesh: BTreeMap::new(),
        chains: BTreeMap::new(),
        services: BTreeMap::new(),
        refs: BTreeMap::new(),
        claims: BTreeMap::new(),
    };
    // Every declared network and every network a service joins has a set.
    let mut names: BTreeSet<String> = state.networks.keys().map(|n| network_set(n)).collect();
    for s in state.services.values() {
        names.extend(s.networks.iter().map(|n| network_set(n)));
    }
    for name in names {
        m.networks.push(name.clone());
        m.sets.insert(name, BTreeSet::new());
    }
    m.sets.insert(
        "vteps".into(),
        state.nodes.values().map(|n| n.subnet.network()).collect(),
    );
    for s in state.services.values() {
        m.insert(s.id.clone(), fragment(s));
    }
    Some(m)
}

impl Model {
    /// Adds service `id`'s fragment (in memory only).
    fn insert(&mut self, id: String, f: Fragment) {
        for (name, rule) in &f.chains {
            self.chains.insert(name.clone(), rule.clone());
        }
        for (key, chain) in &f.vips {
            self.vips.insert(key.clone(), chain.clone());
        }
        for (key, chain) in &f.mesh {
            let claims = self.claims.entry(key.clone()).or_default();
            claims.insert(id.clone(), chain.clone());
            self.refresh_mesh(key);
        }
        for (set, addr) in &f.members {
            let count = self
                .refs
                .entry(set.clone())
                .or_default()
                .entry(*addr)
                .or_insert(0);
            *count += 1;
            if *count == 1 {
                self.sets.entry(set.clone()).or_default().insert(*addr);
            }
        }
        self.services.insert(id, f);
    }

    /// Takes service `id`'s fragment out (in memory only); returns it.
    fn remove(&mut self, id: &str) -> Fragment {
        let Some(f) = self.services.remove(id) else {
            return Fragment::default();
        };
        for (key, _) in &f.vips {
            self.vips.remove(key);
        }
        for (name, _) in &f.chains {
            self.chains.remove(name);
        }
        for (key, _) in &f.mesh {
            if let Some(claims) = self.claims.get_mut(key) {
                claims.remove(id);
                if claims.is_empty() {
                    self.claims.remove(key);
                }
            }
            self.refresh_mesh(key);
        }
        for (set, addr) in &f.members {
            let Some(counts) = self.refs.get_mut(set) else {
                continue;
            };
            if let Some(count) = counts.get_mut(addr) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(addr);
                    if let Some(members) = self.sets.get_mut(set) {
                        members.remove(addr);
                    }
                }
            }
            if counts.is_empty() {
                self.refs.remove(set);
            }
        }
        f
    }

    /// Makes the mesh map's entry for `key` the first claim's (by id).
    fn refresh_mesh(&mut self, key: &str) {
        match self.claims.get(key).and_then(|c| c.values().next()) {
            Some(chain) => {
                self.mesh.insert(key.to_string(), chain.clone());
            }
            None => {
                self.mesh.remove(key);
            }
        }
    }

    /// Patches the model in place for services upserted (`changed`) and
    /// removed, and returns the commands (empty: nothing changed); `None`
    /// when a patch cannot do it (a service joins a network that has no set
    /// yet), and the caller diffs whole models instead. The work is in
    /// proportion to the services named, not to the table: one endpoint
    /// change at 1,000 services is one fragment rebuilt and two lines.
    pub fn patch(&mut self, changed: &[&ServiceRecord], removed: &[String]) -> Option<String> {
        if !changed.iter().all(|s| {
            s.networks
                .iter()
                .all(|n| self.sets.contains_key(&network_set(n)))
        }) {
            return None;
        }
        let mut work: Vec<(String, Option<Fragment>)> =
            removed.iter().map(|id| (id.clone(), None)).collect();
        work.extend(changed.iter().map(|s| (s.id.clone(), Some(fragment(s)))));
        let (mut chains, mut elements, mut map_del, mut map_add, mut chain_del) = (
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        );
        for (id, new) in work {
            if new.is_some() && self.services.get(&id) == new.as_ref() {
                continue;
            }
            let new = new.unwrap_or_default();
            let old = self.services.get(&id).cloned().unwrap_or_default();
            // What other services share with this one (mesh claims, set
            // members) is read before and after the swap, so only real
            // changes become commands.
            let mesh_keys: BTreeSet<String> = old
                .mesh
                .iter()
                .chain(&new.mesh)
                .map(|(k, _)| k.clone())
                .collect();
            let members: BTreeSet<(String, Ipv4Addr)> =
                old.members.iter().chain(&new.members).cloned().collect();
            let mesh_before: Vec<Option<String>> = mesh_keys
                .iter()
                .map(|k| self.mesh.get(k).cloned())
                .collect();
            let present_before: Vec<bool> = members
                .iter()
                .map(|(set, a)| self.sets.get(set).is_some_and(|m| m.contains(a)))
                .collect();
            self.remove(&id);
            if new != Fragment::default() {
                self.insert(id.clone(), new.clone());
            }
            for (name, rule) in &new.chains {
                match old.chains.iter().find(|(n, _)| n == name) {
                    Some((_, r)) if r == rule => continue,
                    Some(_) => {
                        let _ = writeln!(chains, "flush chain ip {TABLE} {name}");
                    }
                    None => {
                        let _ = writeln!(chains, "add chain ip {TABLE} {name}");
                    }
                }
                if !rule.is_empty() {
                    let _ = writeln!(chains, "add rule ip {TABLE} {name} {rule}");
                }
            }
            for (name, _) in &old.chains {
                if !new.chains.iter().any(|(n, _)| n == name) {
                    let _ = writeln!(chain_del, "delete chain ip {TABLE} {name}");
                }
            }
            for (key, chain) in &old.vips {
                if !new.vips.iter().any(|(k, c)| k == key && c == chain) {
                    let _ = writeln!(map_del, "delete element ip {TABLE} vips {{ {key} }}");
                }
            }
            for (key, chain) in &new.vips {
                if !old.vips.iter().any(|(k, c)| k == key && c == chain) {
                    let _ = writeln!(
                        map_add,
                        "add element ip {TABLE} vips {{ {key} : goto {chain} }}"
                    );
                }
            }
            for (key, before) in mesh_keys.iter().zip(mesh_before) {
                let after = self.mesh.get(key);
                if before.as_ref() == after {
                    continue;
                }
                if before.is_some() {
                    let _ = writeln!(map_del, "delete element ip {TABLE} mesh {{ {key} }}");
                }
                if let Some(chain) = after {
                    let _ = writeln!(
                        map_add,
                        "add element ip {TABLE} mesh {{ {key} : goto {chain} }}"
                    );
                }
            }
            for ((set, addr), before) in members.iter().zip(present_before) {
                let after = self.sets.get(set).is_some_and(|m| m.contains(addr));
                match (before, after) {
                    (false, true) => {
                        let _ = writeln!(elements, "add element ip {TABLE} {set} {{ {addr} }}");
                    }
                    (true, false) => {
                        let _ = writeln!(elements, "delete element ip {TABLE} {set} {{ {addr} }}");
                    }
                    _ => {}
                }
            }
        }
        // New chains exist before map elements name them; deleted ones are
        // no longer named when they go.
        Some(chains + &elements + &map_del + &map_add + &chain_del)
    }
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

/// The hairpin masquerade of the postrouting chain, and the declaration of
/// the set it names (both empty without a node subnet).
///
/// A container reaching a VIP whose chosen replica is on its own bridge:
/// - with `bridge-nf-call-iptables` on, the kernel bridges the DNATed packet
///   straight to the replica's port and passes the reply, bridged back,
///   through conntrack, which un-NATs it: no masquerade is needed, and none
///   is done, so the replica sees the caller's address and the reply path
///   skips a NAT step and a route lookup per packet (measured in
///   `docs/benchmarks.md`). Only a task that reaches *itself* (a replica
///   calling its own service) is masqueraded, to the gateway: a packet from
///   its own address arriving on its `eth0` would be dropped as a martian.
///   Kubernetes masquerades that same case (kube-proxy's `ip saddr <ep>`
///   mark per endpoint). The match is a static set of `a . a` pairs over the
///   node's /24 (nft cannot compare two fields of a packet).
/// - without it, the reply would be bridged straight back, never un-NATed:
///   every such flow is masqueraded (the routed hairpin, as kube-proxy does
///   without br_netfilter).
///
/// Replicas on other nodes and mesh clients keep the client's address.
fn hairpin(node: Option<Subnet>, bridge: &str, bridge_netfilter: bool) -> (String, String) {
    let Some(subnet) = node else {
        return (String::new(), String::new());
    };
    // A node subnet is a /24 (the controller's `NODE_SUBNET_PREFIX`); a
    // larger one would make the pair set large, and falls back to
    // masquerading every hairpin.
    if !bridge_netfilter || subnet.prefix() < 24 {
        return (
            format!("\t\toifname \"{bridge}\" ip saddr {subnet} ct status dnat masquerade\n"),
            String::new(),
        );
    }
    let pairs = elements(
        (u32::from(subnet.gateway())..=u32::from(subnet.broadcast()) - 1)
            .map(Ipv4Addr::from)
            .map(|a| format!("{a} . {a}")),
    );
    (
        format!(
            "\t\toifname \"{bridge}\" ct status dnat ip saddr . ip daddr @hairpin masquerade\n"
        ),
        format!("\tset hairpin {{ type ipv4_addr . ipv4_addr; elements = {{ {pairs} }}; }}\n"),
    )
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
        bridge_netfilter,
    } = &m.header;
    let (hairpin, hairpin_set) = hairpin(*node, bridge, *bridge_netfilter);
    let mut out = format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         {hairpin_set}\
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
            bridge_netfilter: true,
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
    fn hairpin_masquerades_only_a_task_reaching_itself() {
        let web = service("web", Some([10, 43, 0, 2]), &[([10, 42, 1, 2], true)]);
        let text = full(&model(&state(vec![web.clone()]), &ctx()).unwrap());
        // Declared in the table block, before the chain that names it.
        let set = text.find("\tset hairpin { type ipv4_addr . ipv4_addr; elements = { 10.42.1.1 . 10.42.1.1, 10.42.1.2 . 10.42.1.2,").unwrap();
        assert!(text.contains("10.42.1.254 . 10.42.1.254 }; }\n"));
        let rule = text
            .find("oifname \"gantry0\" ct status dnat ip saddr . ip daddr @hairpin masquerade\n")
            .unwrap();
        assert!(set < rule);
        assert!(!text.contains("ip saddr 10.42.1.0/24 ct status dnat masquerade"));
        // Without br_netfilter, every hairpin on the bridge is masqueraded.
        let routed = Context {
            bridge_netfilter: false,
            ..ctx()
        };
        let text = full(&model(&state(vec![web]), &routed).unwrap());
        assert!(
            text.contains("oifname \"gantry0\" ip saddr 10.42.1.0/24 ct status dnat masquerade\n")
        );
        assert!(!text.contains("@hairpin"));
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
    fn a_patch_matches_a_rebuild_and_names_only_the_change() {
        let mk = |eps: &[([u8; 4], bool)], published: Option<u16>| {
            let mut s = service("web", Some([10, 43, 0, 2]), eps);
            s.ports[0].published = published;
            s
        };
        let other = {
            let mut s = service("api", Some([10, 43, 0, 3]), &[([10, 42, 2, 9], true)]);
            s.ports[0].published = Some(8080);
            s
        };
        let web = mk(&[([10, 42, 1, 2], true), ([10, 42, 2, 2], true)], None);
        let mut m = model(&state(vec![web, other.clone()]), &ctx()).unwrap();
        // One endpoint not ready: a flush and a rule, nothing else.
        let down = mk(&[([10, 42, 1, 2], true), ([10, 42, 2, 2], false)], None);
        let d = m.patch(&[&down], &[]).unwrap();
        assert_eq!(
            d,
            "flush chain ip gantry_overlay svc_web_tcp_80\n\
             add rule ip gantry_overlay svc_web_tcp_80 meta l4proto tcp dnat ip to numgen random mod 1 map { 0 : 10.42.1.2 . 80 }\n"
        );
        assert_eq!(
            m,
            model(&state(vec![down.clone(), other.clone()]), &ctx()).unwrap()
        );
        // The same again: nothing.
        assert_eq!(m.patch(&[&down], &[]).unwrap(), "");
        // web claims api's published port too: api keeps it (first by id).
        let claim = mk(&[([10, 42, 1, 2], true)], Some(8080));
        let d = m.patch(&[&claim], &[]).unwrap();
        assert!(!d.contains("mesh"), "{d}");
        assert_eq!(
            m,
            model(&state(vec![claim.clone(), other.clone()]), &ctx()).unwrap()
        );
        // api goes: web takes the port over; api's chain, VIP and member go.
        let d = m.patch(&[], &["api".to_string()]).unwrap();
        assert!(
            d.contains("delete element ip gantry_overlay mesh { tcp . 8080 }\n"),
            "{d}"
        );
        assert!(
            d.contains("add element ip gantry_overlay mesh { tcp . 8080 : goto svc_web_tcp_80 }\n"),
            "{d}"
        );
        assert!(
            d.contains("delete element ip gantry_overlay net_st_default { 10.42.2.9 }\n"),
            "{d}"
        );
        assert!(
            d.ends_with("delete chain ip gantry_overlay svc_api_tcp_80\n"),
            "{d}"
        );
        assert_eq!(m, model(&state(vec![claim.clone()]), &ctx()).unwrap());
        // A network without a set: not a patch.
        let mut elsewhere = claim;
        elsewhere.networks = vec!["st_new".into()];
        assert_eq!(m.patch(&[&elsewhere], &[]), None);
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
