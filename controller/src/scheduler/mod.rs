//! The scheduler: decides which node each pending task runs on.
//!
//! [`schedule`] is a pure function over a snapshot ([`ClusterView`]): a
//! pipeline of filters (node ready, node active, placement constraints,
//! CPU/memory reservations, host ports, `max_replicas_per_node`) then a score
//! (spread a service's replicas across nodes, then least loaded; or binpack),
//! in the manner of swarmkit's `Pipeline` and Nomad's feasibility stack. It
//! places a whole batch, updating its working copy of the view after each
//! placement, so two tasks of one batch never take the same free memory or
//! host port. When no node passes, the plan says why, per filter, with the
//! number of nodes each filter rejected.
//!
//! **Invariant:** no I/O, no clock, no randomness: the same view and batch
//! give the same plan. Ties are broken by node id.

pub mod dependencies;
mod filter;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{
    Node, NodeId, PortConfig, Protocol, PublishMode, Resources, ServiceId, Task, TaskId,
    TaskTemplate,
};

pub use filter::FilterKind;

/// Errors from the scheduler module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// Two nodes in a view had the same id.
    #[error("node {0} appears twice in the cluster view")]
    DuplicateNode(NodeId),
}

/// A task to place: borrowed from a [`Task`], or built directly (benchmarks,
/// callers that have not materialised tasks yet).
#[derive(Clone, Copy, Debug)]
pub struct TaskRef<'a> {
    /// The task's id.
    pub id: &'a TaskId,
    /// Its service (for spread and `max_replicas_per_node`).
    pub service: &'a ServiceId,
    /// What it needs: reservations, constraints, ports.
    pub spec: &'a TaskTemplate,
    /// The only node it may go to: a global service's task is made for one
    /// node, and the scheduler only checks that it fits there.
    pub node: Option<&'a NodeId>,
}

impl<'a> From<&'a Task> for TaskRef<'a> {
    fn from(task: &'a Task) -> Self {
        TaskRef {
            id: &task.id,
            service: &task.service,
            spec: &task.spec,
            node: task.node.as_ref(),
        }
    }
}

/// One node as the scheduler sees it: the node and what is already on it.
#[derive(Clone, Debug)]
pub struct NodeInfo<'a> {
    /// The node.
    pub node: &'a Node,
    /// Sum of the reservations of the tasks occupying it.
    pub reserved: Resources,
    /// Number of tasks occupying it.
    pub tasks: u64,
    /// Tasks occupying it, per service.
    pub per_service: HashMap<ServiceId, u64>,
    /// Host-mode published ports in use.
    pub host_ports: HashSet<(Protocol, u16)>,
    /// Addresses of the node's subnet held by tasks (finished ones
    /// included: an address is held until its task is deleted).
    pub addresses: u64,
}

impl NodeInfo<'_> {
    /// Resources not yet reserved.
    pub fn available(&self) -> Resources {
        self.node.status.resources.saturating_sub(&self.reserved)
    }

    fn add(&mut self, service: &ServiceId, spec: &TaskTemplate) {
        self.reserved = self.reserved.saturating_add(&spec.resources.reservations);
        self.tasks += 1;
        *self.per_service.entry(service.clone()).or_insert(0) += 1;
        self.host_ports.extend(host_ports(spec));
        if needs_address(spec, self.node) {
            self.addresses += 1;
        }
    }

    /// Whether the node's subnet has an address left for `spec`.
    fn has_address_for(&self, spec: &TaskTemplate) -> bool {
        !needs_address(spec, self.node) || self.addresses < ADDRESSES_PER_NODE
    }
}

/// A snapshot of the cluster for one scheduling pass: every node, sorted by
/// id, with the load of the tasks already on it.
#[derive(Clone, Debug)]
pub struct ClusterView<'a> {
    nodes: Vec<NodeInfo<'a>>,
}

impl<'a> ClusterView<'a> {
    /// Builds a view from the nodes and the tasks that exist. A task counts
    /// against its node while it [occupies](Task::occupies_node) it, whatever
    /// its desired state: a task told to stop still holds its memory until it
    /// has stopped. A finished task that still holds an address counts
    /// against the node's subnet only. Tasks on nodes not in `nodes` are
    /// ignored.
    pub fn new(nodes: &'a [Node], tasks: &[Task]) -> Result<Self, SchedulerError> {
        let mut infos: Vec<NodeInfo<'a>> = nodes
            .iter()
            .map(|node| NodeInfo {
                node,
                reserved: Resources::default(),
                tasks: 0,
                per_service: HashMap::new(),
                host_ports: HashSet::new(),
                addresses: 0,
            })
            .collect();
        infos.sort_by(|a, b| a.node.id.cmp(&b.node.id));
        if let Some(w) = infos.windows(2).find(|w| w[0].node.id == w[1].node.id) {
            return Err(SchedulerError::DuplicateNode(w[0].node.id.clone()));
        }
        let mut view = ClusterView { nodes: infos };
        for task in tasks {
            let Some(i) = task.node.as_ref().and_then(|n| view.index_of(n)) else {
                continue;
            };
            if task.occupies_node() {
                view.nodes[i].add(&task.service, &task.spec);
            } else if task.address.is_some() {
                view.nodes[i].addresses += 1;
            }
        }
        Ok(view)
    }

    /// The nodes, sorted by id.
    pub fn nodes(&self) -> &[NodeInfo<'a>] {
        &self.nodes
    }

    fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.nodes.binary_search_by(|n| n.node.id.cmp(id)).ok()
    }

    /// Records `task` as placed on `node` (what the scheduler does within a
    /// batch; also lets a caller replay a plan onto a view).
    pub fn place(&mut self, task: TaskRef<'_>, node: &NodeId) {
        if let Some(i) = self.index_of(node) {
            self.nodes[i].add(task.service, task.spec);
        }
    }
}

/// How to choose among the nodes that pass every filter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Fewest tasks of the same service first, then fewest tasks (Swarm's
    /// behaviour): replicas survive the loss of a node.
    #[default]
    Spread,
    /// The node whose most-used resource would be the fullest first (Nomad's
    /// binpack): keeps whole nodes free for large tasks.
    Binpack,
}

/// Scheduler settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// Scoring strategy.
    pub strategy: Strategy,
}

/// A task placed on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The task.
    pub task: TaskId,
    /// Where it goes.
    pub node: NodeId,
}

/// Why some nodes were rejected for a task by one filter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The filter that rejected them (the first one in the pipeline that failed).
    pub filter: FilterKind,
    /// What that filter found, e.g. `constraint node.labels.zone==eu failed`.
    pub reason: String,
    /// How many nodes it rejected for this reason (0 when the reason is not
    /// about nodes at all, e.g. a pinned node missing from the cluster).
    pub nodes: usize,
}

/// A task no node could take, with the reasons.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    /// The task; it stays pending.
    pub task: TaskId,
    /// Per filter and reason, how many nodes were rejected, in pipeline order.
    /// Empty when the cluster has no nodes.
    pub rejections: Vec<Rejection>,
}

impl Unplaced {
    /// The one-line explanation shown by `service ps`, e.g.
    /// `no node has 2 GiB memory free (3 nodes); constraint node.labels.zone==eu failed (1 node)`.
    pub fn reason(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Unplaced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rejections.is_empty() {
            return f.write_str("no nodes in the cluster");
        }
        for (i, r) in self.rejections.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            match r.nodes {
                0 => f.write_str(&r.reason)?,
                1 => write!(f, "{} (1 node)", r.reason)?,
                n => write!(f, "{} ({n} nodes)", r.reason)?,
            }
        }
        Ok(())
    }
}

/// The outcome of a scheduling pass.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Tasks placed, in batch order.
    pub assignments: Vec<Assignment>,
    /// Tasks that stay pending, in batch order.
    pub unplaced: Vec<Unplaced>,
}

/// Places `tasks` with the default settings (spread). See [`schedule_with`].
pub fn schedule(view: &ClusterView<'_>, tasks: &[TaskRef<'_>]) -> Plan {
    schedule_with(view, tasks, &SchedulerConfig::default())
}

/// Places `tasks`, in the order given, onto the nodes of `view`.
///
/// Each task goes to the best-scoring node that passes every filter, and the
/// working view is updated before the next task. Consecutive tasks with the
/// same service, spec and node (if pinned) form a group that shares the work that does not
/// change within a batch (node state, availability, constraints), which keeps
/// a 10,000-task deploy on thousands of nodes fast; once one task of a group
/// cannot be placed, neither can the rest of it, and they share its reasons.
pub fn schedule_with(
    view: &ClusterView<'_>,
    tasks: &[TaskRef<'_>],
    config: &SchedulerConfig,
) -> Plan {
    let mut view = view.clone();
    let mut plan = Plan::default();
    let mut start = 0;
    while start < tasks.len() {
        let first = tasks[start];
        let end = tasks[start..]
            .iter()
            .position(|t| {
                t.service != first.service || t.node != first.node || t.spec != first.spec
            })
            .map_or(tasks.len(), |p| start + p);
        place_group(&mut view, &tasks[start..end], config, &mut plan);
        start = end;
    }
    plan
}

/// Places tasks that share a service, a spec and a pinned node (if any).
fn place_group(
    view: &mut ClusterView<'_>,
    group: &[TaskRef<'_>],
    config: &SchedulerConfig,
    plan: &mut Plan,
) {
    let Some(first) = group.first() else {
        return;
    };
    let spec = first.spec;
    let service = first.service;
    let need = spec.resources.reservations;
    let ports: Vec<(Protocol, u16)> = host_ports(spec).collect();
    let max_per_node = spec.placement.max_replicas_per_node.filter(|&m| m > 0);
    // The nodes this group may use: all, or the one it is pinned to.
    let candidates: Vec<usize> = match first.node {
        None => (0..view.nodes.len()).collect(),
        Some(id) => view.index_of(id).into_iter().collect(),
    };
    let mut same_service = vec![0u64; view.nodes.len()];
    for &i in &candidates {
        same_service[i] = view.nodes[i].per_service.get(service).copied().unwrap_or(0);
    }
    let fits = |n: &NodeInfo<'_>, same: u64| {
        n.has_address_for(spec)
            && n.available().fits(&need)
            && !ports.iter().any(|p| n.host_ports.contains(p))
            && max_per_node.is_none_or(|m| same < m)
    };
    // The feasible nodes, best first. Within a group only the node that takes
    // a task changes (its score, and whether it still fits), so an ordered
    // set updated at that node gives the same choice as rescanning every node
    // for every task, in O(log nodes) per task. The node index (nodes are
    // sorted by id) breaks ties.
    let mut ranked: BTreeSet<(Score, usize)> = candidates
        .iter()
        .map(|&i| (i, &view.nodes[i]))
        .filter(|&(i, n)| {
            filter::static_rejection(spec, n.node).is_none() && fits(n, same_service[i])
        })
        .map(|(i, n)| (score(config.strategy, n, same_service[i], &need), i))
        .collect();

    for (k, task) in group.iter().enumerate() {
        let Some((_, i)) = ranked.pop_first() else {
            let rejections = filter::explain(view, *task, &same_service, &candidates);
            for rest in &group[k..] {
                plan.unplaced.push(Unplaced {
                    task: rest.id.clone(),
                    rejections: rejections.clone(),
                });
            }
            return;
        };
        let n = &mut view.nodes[i];
        n.add(service, spec);
        same_service[i] += 1;
        plan.assignments.push(Assignment {
            task: task.id.clone(),
            node: n.node.id.clone(),
        });
        if fits(n, same_service[i]) {
            ranked.insert((score(config.strategy, n, same_service[i], &need), i));
        }
    }
}

/// A node's score for a task: lower is better.
type Score = (u64, u64);

fn score(strategy: Strategy, n: &NodeInfo<'_>, same_service: u64, need: &Resources) -> Score {
    match strategy {
        Strategy::Spread => (same_service, n.tasks),
        Strategy::Binpack => {
            // Fullest node first: score by the free share (per million) of the
            // node's scarcest resource after placement.
            let total = n.node.status.resources;
            let after = n.reserved.saturating_add(need);
            let free_share = |used: u64, total: u64| -> u64 {
                if total == 0 {
                    return 0;
                }
                let free = total.saturating_sub(used) as u128;
                u64::try_from(free * 1_000_000 / total as u128).unwrap_or(u64::MAX)
            };
            let cpu = free_share(after.nano_cpus, total.nano_cpus);
            let mem = free_share(after.memory_bytes, total.memory_bytes);
            (cpu.min(mem), n.tasks)
        }
    }
}

/// Addresses a node subnet has for tasks (`.2` to `.254` of a `/24`).
const ADDRESSES_PER_NODE: u64 = 253;

/// Whether a task of `spec` takes an address on `node`: not on the host
/// network, and the node has a subnet (the cluster has an address plan).
fn needs_address(spec: &TaskTemplate, node: &Node) -> bool {
    !spec.host_network && node.subnet.is_some()
}

/// A spec's host-mode published ports (ingress ports are cluster-wide and do
/// not take a port on the node the task runs on; a host port left to the node
/// to pick cannot conflict).
fn host_ports(spec: &TaskTemplate) -> impl Iterator<Item = (Protocol, u16)> + '_ {
    spec.ports
        .iter()
        .filter_map(|p: &PortConfig| match (p.mode, p.published) {
            (PublishMode::Host, Some(port)) => Some((p.protocol, port)),
            _ => None,
        })
}
