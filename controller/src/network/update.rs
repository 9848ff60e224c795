//! The network state an agent programs (its VXLAN peers, VIP rules, DNS),
//! computed from the store: a full update when a session starts, then
//! incremental ones for what changed.
//!
//! Pure: [`full`] and [`incremental`] read a [`StateMachine`] and the
//! [`AgentView`] (what this agent was last sent) and return the update to
//! send; the dispatcher only batches store events and sends. An incremental
//! update carries, per changed key, the whole current record (a service with
//! all its endpoints) or its removal; records that did not change from what
//! the agent has are left out, so a status echo that changes nothing in the
//! network sends nothing.
//!
//! Decisions:
//! - Every node with a subnet and an underlay address is a peer, down or
//!   not: a node that comes back keeps its subnet, and an FDB entry for a
//!   silent node costs nothing. A removed node is removed.
//! - An endpoint is a task with an address that has not finished; it is
//!   `ready` (receives new connections) when observed running, desired
//!   running, and healthy if it has a health check (Swarm and Kubernetes
//!   readiness alike). Tasks that are starting or stopping stay in the
//!   record, not ready, so the agent keeps them in the service's networks.
//! - Networks exist while a service joins them (no network objects in the
//!   store): the set is derived from the services, so it can never hold a
//!   network no service uses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::{Addressing, Ipv4Cidr};
use crate::model::{
    DesiredState, EndpointMode, Health, HealthProbe, Node, NodeId, PortConfig, Service, ServiceId,
    Task, TaskId, TaskState,
};
use crate::store::{Event, Object, StateMachine};

/// A node as the overlay needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayNode {
    /// The node.
    pub node: NodeId,
    /// The IP of its agent address, where its VXLAN endpoint is.
    pub underlay_ip: IpAddr,
    /// The subnet it routes.
    pub subnet: Ipv4Cidr,
}

/// One task behind a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEndpoint {
    /// The task.
    pub task: TaskId,
    /// Its node.
    pub node: NodeId,
    /// Its address.
    pub address: Ipv4Addr,
    /// Receives new connections.
    pub ready: bool,
}

/// A service as the data plane and DNS need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    /// The service.
    pub service: ServiceId,
    /// Its name in its stack.
    pub name: String,
    /// Its stack.
    pub stack: String,
    /// Its VIP, if it has one.
    pub virtual_ip: Option<Ipv4Addr>,
    /// VIP or DNS round robin.
    pub endpoint_mode: EndpointMode,
    /// Its ports.
    pub ports: Vec<PortConfig>,
    /// The networks it joins (full names).
    pub networks: Vec<String>,
    /// Its tasks that have an address and have not finished, by task id.
    pub endpoints: Vec<ServiceEndpoint>,
}

/// A cluster network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNetwork {
    /// `<stack>_<network>`.
    pub name: String,
    /// The stack that declared it.
    pub stack: String,
}

/// What to send an agent; see `NetworkUpdate` in `proto/gantry.proto`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkUpdate {
    /// The whole state (replaces what the agent had).
    pub full: bool,
    /// The store revision it reflects.
    pub revision: u64,
    /// The address plan (none before the controller set it).
    pub addressing: Option<Addressing>,
    /// The receiving node's subnet.
    pub node_subnet: Option<Ipv4Cidr>,
    /// Nodes added or changed.
    pub nodes: Vec<OverlayNode>,
    /// Nodes removed.
    pub removed_nodes: Vec<NodeId>,
    /// Services added or changed.
    pub services: Vec<ServiceRecord>,
    /// Services removed.
    pub removed_services: Vec<ServiceId>,
    /// Networks added.
    pub networks: Vec<ClusterNetwork>,
    /// Networks removed (names).
    pub removed_networks: Vec<String>,
}

/// What one agent was last sent; [`full`] resets it, [`incremental`] keeps
/// it in step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentView {
    addressing: Option<Addressing>,
    node_subnet: Option<Ipv4Cidr>,
    nodes: BTreeMap<NodeId, OverlayNode>,
    services: BTreeMap<ServiceId, ServiceRecord>,
    networks: BTreeMap<String, ClusterNetwork>,
}

/// The objects store events touched, as far as the network cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Nodes created, changed or removed.
    pub nodes: BTreeSet<NodeId>,
    /// Services created, changed or removed, and services whose tasks
    /// changed.
    pub services: BTreeSet<ServiceId>,
}

impl Changes {
    /// Adds what `events` touched.
    pub fn add(&mut self, events: &[Event]) {
        for e in events {
            match &*e.object {
                Object::Node(n) => {
                    self.nodes.insert(n.id.clone());
                }
                Object::Service(s) => {
                    self.services.insert(s.id.clone());
                }
                // A task without an address is no endpoint, before or after:
                // it is only assigned an address once, and keeps it.
                Object::Task(t) if t.address.is_some() => {
                    self.services.insert(t.service.clone());
                }
                Object::Task(_) => {}
            }
        }
    }

    /// Whether nothing was touched.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.services.is_empty()
    }
}

/// The whole network state for `node`'s agent; resets `view` to it.
pub fn full(state: &StateMachine, node: &NodeId, view: &mut AgentView) -> NetworkUpdate {
    let nodes: BTreeMap<NodeId, OverlayNode> = state
        .nodes()
        .filter_map(overlay_node)
        .map(|n| (n.node.clone(), n))
        .collect();
    let services: BTreeMap<ServiceId, ServiceRecord> = state
        .services()
        .map(|s| (s.id.clone(), service_record(state, s)))
        .collect();
    let networks = networks(state);
    *view = AgentView {
        addressing: state.addressing().copied(),
        node_subnet: state.node(node).and_then(|n| n.subnet),
        nodes,
        services,
        networks,
    };
    NetworkUpdate {
        full: true,
        revision: state.applied_index(),
        addressing: view.addressing,
        node_subnet: view.node_subnet,
        nodes: view.nodes.values().cloned().collect(),
        removed_nodes: Vec::new(),
        services: view.services.values().cloned().collect(),
        removed_services: Vec::new(),
        networks: view.networks.values().cloned().collect(),
        removed_networks: Vec::new(),
    }
}

/// What changed for `node`'s agent since `view`, for the objects in
/// `changes`; `None` when nothing it has differs. A change of the address
/// plan or of the node's own subnet gives a full update.
pub fn incremental(
    state: &StateMachine,
    node: &NodeId,
    changes: &Changes,
    view: &mut AgentView,
) -> Option<NetworkUpdate> {
    let subnet = state.node(node).and_then(|n| n.subnet);
    if state.addressing().copied() != view.addressing || subnet != view.node_subnet {
        return Some(full(state, node, view));
    }
    let mut update = NetworkUpdate {
        full: false,
        revision: state.applied_index(),
        addressing: view.addressing,
        node_subnet: view.node_subnet,
        ..NetworkUpdate::default()
    };
    for id in &changes.nodes {
        match state.node(id).and_then(overlay_node) {
            Some(now) => {
                if view.nodes.get(id) != Some(&now) {
                    view.nodes.insert(id.clone(), now.clone());
                    update.nodes.push(now);
                }
            }
            None => {
                if view.nodes.remove(id).is_some() {
                    update.removed_nodes.push(id.clone());
                }
            }
        }
    }
    let mut networks_may_change = false;
    for id in &changes.services {
        match state.service(id) {
            Some(service) => {
                let now = service_record(state, service);
                let before = view.services.get(id);
                if before != Some(&now) {
                    networks_may_change |= before.is_none_or(|b| b.networks != now.networks);
                    view.services.insert(id.clone(), now.clone());
                    update.services.push(now);
                }
            }
            None => {
                if view.services.remove(id).is_some() {
                    networks_may_change = true;
                    update.removed_services.push(id.clone());
                }
            }
        }
    }
    if networks_may_change {
        let now = networks(state);
        for (name, network) in &now {
            if view.networks.get(name) != Some(network) {
                update.networks.push(network.clone());
            }
        }
        for name in view.networks.keys() {
            if !now.contains_key(name) {
                update.removed_networks.push(name.clone());
            }
        }
        view.networks = now;
    }
    let empty = update.nodes.is_empty()
        && update.removed_nodes.is_empty()
        && update.services.is_empty()
        && update.removed_services.is_empty()
        && update.networks.is_empty()
        && update.removed_networks.is_empty();
    (!empty).then_some(update)
}

/// The node as a VXLAN peer: it needs a subnet and an agent address whose
/// host part is an IP.
pub fn overlay_node(node: &Node) -> Option<OverlayNode> {
    let subnet = node.subnet?;
    Some(OverlayNode {
        node: node.id.clone(),
        underlay_ip: underlay_ip(&node.status.address)?,
        subnet,
    })
}

/// The IP of an agent address (`10.0.0.2:7071`, `10.0.0.2`, `[fd00::2]:7071`).
pub fn underlay_ip(address: &str) -> Option<IpAddr> {
    if let Ok(sa) = address.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    address.parse::<IpAddr>().ok()
}

/// Whether a task receives new connections: running, desired running, and
/// healthy when it has a health check. A check from the file must have
/// passed; without one, the reported health decides, since the image's own
/// `HEALTHCHECK` may run (reported `starting` until it passes) or none
/// (reported `none`).
pub fn ready(task: &Task) -> bool {
    let checked = task
        .spec
        .healthcheck
        .as_ref()
        .is_some_and(|h| h.probe != HealthProbe::None);
    task.status.state == TaskState::Running
        && task.desired_state == DesiredState::Running
        && match task.status.health {
            Health::Healthy => true,
            Health::None => !checked,
            Health::Starting | Health::Unhealthy => false,
        }
}

/// The service's record with its current endpoints.
pub fn service_record(state: &StateMachine, service: &Service) -> ServiceRecord {
    let endpoints = state
        .tasks_of_service(&service.id)
        .filter(|t| !t.status.state.is_terminal())
        .filter_map(|t| {
            Some(ServiceEndpoint {
                task: t.id.clone(),
                node: t.node.clone()?,
                address: t.address?,
                ready: ready(t),
            })
        })
        .collect();
    ServiceRecord {
        service: service.id.clone(),
        name: service.spec.name.clone(),
        stack: service.spec.stack.clone(),
        virtual_ip: service.virtual_ip,
        endpoint_mode: service.spec.endpoint_mode,
        ports: service.spec.task.ports.clone(),
        networks: service.spec.task.networks.clone(),
        endpoints,
    }
}

/// Every network some service joins. Its stack is the stack whose name
/// prefixes it (`examples_back` is `examples`'s); an external network used
/// only outside its stack gets the part before the first `_`.
pub fn networks(state: &StateMachine) -> BTreeMap<String, ClusterNetwork> {
    let mut out = BTreeMap::new();
    let mut foreign = BTreeSet::new();
    for s in state.services() {
        for name in &s.spec.task.networks {
            let own = !s.spec.stack.is_empty()
                && name
                    .strip_prefix(&s.spec.stack)
                    .is_some_and(|rest| rest.starts_with('_'));
            if own {
                out.insert(
                    name.clone(),
                    ClusterNetwork {
                        name: name.clone(),
                        stack: s.spec.stack.clone(),
                    },
                );
            } else {
                foreign.insert(name.clone());
            }
        }
    }
    for name in foreign {
        out.entry(name.clone()).or_insert_with(|| ClusterNetwork {
            stack: name.split('_').next().unwrap_or_default().to_string(),
            name,
        });
    }
    out
}

#[cfg(test)]
mod tests;
