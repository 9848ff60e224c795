//! The overlay's desired state on one node: what the controller's
//! `NetworkUpdate`s say, as plain Rust. Pure: [`DesiredState::apply`] folds
//! a full or incremental [`Update`] in, and the appliers (`vxlan`, `rules`,
//! `dns`) diff two states. Only the daemon's conversion knows protobuf.

use crate::engine::spec::PortProtocol;
use crate::network::Subnet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// A node of the overlay: where its VXLAN endpoint is and what it routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayNode {
    /// The node's id.
    pub id: String,
    /// Its underlay address (VXLAN packets go there).
    pub underlay: Ipv4Addr,
    /// Its slice of the cluster CIDR.
    pub subnet: Subnet,
}

/// A port of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServicePort {
    /// TCP or UDP.
    pub protocol: PortProtocol,
    /// The port the tasks listen on, also the VIP's port.
    pub target: u16,
    /// The node port, if published.
    pub published: Option<u16>,
    /// Published on every node (routing mesh) rather than only where a task
    /// runs (`mode: host`, which the engine publishes per container).
    pub ingress: bool,
}

/// A task behind a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The task's id.
    pub task: String,
    /// The node it runs on.
    pub node: String,
    /// Its address on its node's subnet.
    pub address: Ipv4Addr,
    /// Running and healthy: receives new connections.
    pub ready: bool,
}

/// A service as the data plane and DNS need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRecord {
    /// The service's id.
    pub id: String,
    /// Its short name in its stack.
    pub name: String,
    /// Its stack.
    pub stack: String,
    /// Its virtual IP; `None` for DNS round robin (or host networking).
    pub vip: Option<Ipv4Addr>,
    /// Its ports.
    pub ports: Vec<ServicePort>,
    /// The networks it joins (full names).
    pub networks: Vec<String>,
    /// Its tasks that have an address and are not finished.
    pub endpoints: Vec<Endpoint>,
}

impl ServiceRecord {
    /// The addresses of the ready endpoints, sorted (so rules and answers do
    /// not change when only the order of the update's list does).
    pub fn ready_addresses(&self) -> Vec<Ipv4Addr> {
        let set: BTreeSet<Ipv4Addr> = self
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .map(|e| e.address)
            .collect();
        set.into_iter().collect()
    }
}

/// A cluster network: a scope for reachability and names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNetwork {
    /// Full name, `<stack>_<network>`.
    pub name: String,
    /// The stack that declared it.
    pub stack: String,
}

/// One `NetworkUpdate` from the controller, converted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// The whole state (replaces everything) or a change.
    pub full: bool,
    /// The store revision it reflects.
    pub revision: u64,
    /// The cluster CIDR, when the update carries it.
    pub cluster_cidr: Option<Subnet>,
    /// The service CIDR, when the update carries it.
    pub service_cidr: Option<Subnet>,
    /// This node's subnet, when the update carries it.
    pub node_subnet: Option<Subnet>,
    /// Nodes added or changed.
    pub nodes: Vec<OverlayNode>,
    /// Nodes removed, by id.
    pub removed_nodes: Vec<String>,
    /// Services added or changed.
    pub services: Vec<ServiceRecord>,
    /// Services removed, by id.
    pub removed_services: Vec<String>,
    /// Networks added.
    pub networks: Vec<ClusterNetwork>,
    /// Networks removed, by name.
    pub removed_networks: Vec<String>,
}

/// What the node's data plane should be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// The revision of the last update folded in.
    pub revision: u64,
    /// The cluster CIDR (`10.42.0.0/16`).
    pub cluster_cidr: Option<Subnet>,
    /// The service CIDR (`10.43.0.0/16`).
    pub service_cidr: Option<Subnet>,
    /// This node's subnet.
    pub node_subnet: Option<Subnet>,
    /// Every node, this one included, by id.
    pub nodes: BTreeMap<String, OverlayNode>,
    /// Every service, by id.
    pub services: BTreeMap<String, ServiceRecord>,
    /// Every network, by name.
    pub networks: BTreeMap<String, ClusterNetwork>,
}

impl DesiredState {
    /// Folds `update` in: a full one replaces everything, an incremental
    /// one upserts and removes by key. An update older than the state is
    /// ignored (the revision only grows; a reconnect starts with a full one)
    /// and `false` is returned.
    pub fn apply(&mut self, update: Update) -> bool {
        if update.full {
            *self = DesiredState::default();
        } else if update.revision < self.revision {
            return false;
        }
        self.revision = update.revision;
        if update.cluster_cidr.is_some() {
            self.cluster_cidr = update.cluster_cidr;
        }
        if update.service_cidr.is_some() {
            self.service_cidr = update.service_cidr;
        }
        if update.node_subnet.is_some() {
            self.node_subnet = update.node_subnet;
        }
        for id in update.removed_nodes {
            self.nodes.remove(&id);
        }
        for n in update.nodes {
            self.nodes.insert(n.id.clone(), n);
        }
        for id in update.removed_services {
            self.services.remove(&id);
        }
        for s in update.services {
            self.services.insert(s.id.clone(), s);
        }
        for name in update.removed_networks {
            self.networks.remove(&name);
        }
        for n in update.networks {
            self.networks.insert(n.name.clone(), n);
        }
        true
    }

    /// Whether any service needs the data plane: one with a VIP or a task
    /// with an address (host-network services have neither).
    pub fn has_overlay_services(&self) -> bool {
        self.services
            .values()
            .any(|s| s.vip.is_some() || !s.endpoints.is_empty())
    }

    /// The whole state as one full update.
    pub fn to_full_update(&self) -> Update {
        Update {
            full: true,
            revision: self.revision,
            cluster_cidr: self.cluster_cidr,
            service_cidr: self.service_cidr,
            node_subnet: self.node_subnet,
            nodes: self.nodes.values().cloned().collect(),
            services: self.services.values().cloned().collect(),
            networks: self.networks.values().cloned().collect(),
            ..Update::default()
        }
    }

    /// The nodes other than this one (those with this node's subnet are
    /// this node): the VXLAN peers.
    pub fn peers(&self) -> BTreeMap<Subnet, Ipv4Addr> {
        self.nodes
            .values()
            .filter(|n| Some(n.subnet) != self.node_subnet)
            .map(|n| (n.subnet, n.underlay))
            .collect()
    }

    /// Each network's member addresses: every endpoint (ready or not: a
    /// task that is not ready may still finish its connections) of every
    /// service that joins it. A network no service joins has no members.
    pub fn members(&self) -> BTreeMap<String, BTreeSet<Ipv4Addr>> {
        let mut out: BTreeMap<String, BTreeSet<Ipv4Addr>> = self
            .networks
            .keys()
            .map(|n| (n.clone(), BTreeSet::new()))
            .collect();
        for s in self.services.values() {
            for net in &s.networks {
                let set = out.entry(net.clone()).or_default();
                set.extend(s.endpoints.iter().map(|e| e.address));
            }
        }
        out
    }

    /// The networks an address belongs to (the DNS scope of a container).
    pub fn networks_of(&self, address: Ipv4Addr) -> BTreeSet<&str> {
        self.services
            .values()
            .filter(|s| s.endpoints.iter().any(|e| e.address == address))
            .flat_map(|s| s.networks.iter().map(String::as_str))
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn node(id: &str, underlay: [u8; 4], subnet: &str) -> OverlayNode {
        OverlayNode {
            id: id.into(),
            underlay: underlay.into(),
            subnet: subnet.parse().unwrap(),
        }
    }

    pub(crate) fn service(
        id: &str,
        vip: Option<[u8; 4]>,
        eps: &[([u8; 4], bool)],
    ) -> ServiceRecord {
        ServiceRecord {
            id: id.into(),
            name: id.into(),
            stack: "st".into(),
            vip: vip.map(Ipv4Addr::from),
            ports: vec![ServicePort {
                protocol: PortProtocol::Tcp,
                target: 80,
                published: None,
                ingress: true,
            }],
            networks: vec!["st_default".into()],
            endpoints: eps
                .iter()
                .enumerate()
                .map(|(i, (a, ready))| Endpoint {
                    task: format!("{id}.{i}"),
                    node: "n".into(),
                    address: (*a).into(),
                    ready: *ready,
                })
                .collect(),
        }
    }

    #[test]
    fn full_replaces_and_incremental_upserts_and_removes() {
        let mut s = DesiredState::default();
        s.apply(Update {
            full: true,
            revision: 5,
            node_subnet: Some("10.42.1.0/24".parse().unwrap()),
            nodes: vec![
                node("a", [192, 0, 2, 1], "10.42.1.0/24"),
                node("b", [192, 0, 2, 2], "10.42.2.0/24"),
            ],
            services: vec![service(
                "web",
                Some([10, 43, 0, 2]),
                &[([10, 42, 1, 2], true)],
            )],
            ..Update::default()
        });
        // Only b is a peer: a is this node.
        assert_eq!(s.peers().len(), 1);
        assert!(s.apply(Update {
            revision: 6,
            nodes: vec![node("c", [192, 0, 2, 3], "10.42.3.0/24")],
            removed_nodes: vec!["b".into()],
            removed_services: vec!["web".into()],
            ..Update::default()
        }));
        assert_eq!(s.nodes.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert!(s.services.is_empty());
        // The node subnet stays when an incremental update does not carry it.
        assert_eq!(s.node_subnet, Some("10.42.1.0/24".parse().unwrap()));
        // A stale incremental update is ignored.
        assert!(!s.apply(Update {
            revision: 4,
            removed_nodes: vec!["c".into()],
            ..Update::default()
        }));
        assert!(s.nodes.contains_key("c"));
        // A full one forgets what it does not name.
        s.apply(Update {
            full: true,
            revision: 7,
            ..Update::default()
        });
        assert!(s.nodes.is_empty() && s.node_subnet.is_none());
        // A state handed over whole is the same state.
        let mut full = DesiredState::default();
        s.apply(Update {
            revision: 8,
            services: vec![service("web", None, &[])],
            ..Update::default()
        });
        assert!(!s.has_overlay_services(), "no VIP, no task address");
        full.apply(s.to_full_update());
        assert_eq!(full, s);
    }

    #[test]
    fn members_include_endpoints_that_are_not_ready() {
        let mut s = DesiredState::default();
        let mut other = service("db", None, &[([10, 42, 2, 9], true)]);
        other.networks = vec!["st_back".into()];
        s.apply(Update {
            full: true,
            services: vec![
                service(
                    "web",
                    None,
                    &[([10, 42, 1, 2], true), ([10, 42, 1, 3], false)],
                ),
                other,
            ],
            networks: vec![ClusterNetwork {
                name: "st_empty".into(),
                stack: "st".into(),
            }],
            ..Update::default()
        });
        let m = s.members();
        assert_eq!(m["st_default"].len(), 2);
        assert_eq!(m["st_back"].len(), 1);
        assert!(m["st_empty"].is_empty());
        assert_eq!(
            s.networks_of([10, 42, 2, 9].into())
                .into_iter()
                .collect::<Vec<_>>(),
            ["st_back"]
        );
        assert_eq!(
            s.services["web"].ready_addresses(),
            [Ipv4Addr::new(10, 42, 1, 2)]
        );
    }
}
