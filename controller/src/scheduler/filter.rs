//! The scheduler's filters and their explanations.
//!
//! The hot loop in `mod.rs` checks filters as booleans; this module says *why*
//! a node failed, and is only asked when a task cannot be placed anywhere, so
//! building strings never slows a pass that succeeds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ClusterView, NodeInfo, Rejection, TaskRef, host_ports};
use crate::model::{Availability, Node, NodeState, Resources, TaskTemplate};

/// The filters, in pipeline order. A node is charged to the first filter it fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FilterKind {
    /// A task pinned to one node (global services) only goes there.
    Pinned,
    /// The node's agent is ready (not down, not unknown).
    Ready,
    /// The node's availability is active (not pause or drain).
    Availability,
    /// Every placement constraint holds.
    Constraint,
    /// The node's subnet has an address left (counting this batch's
    /// placements and finished tasks that still hold one).
    Addresses,
    /// Enough unreserved CPU and memory, counting this batch's placements.
    Resources,
    /// The task's host-mode published ports are free on the node.
    HostPorts,
    /// Fewer than `max_replicas_per_node` of the service's tasks are on the node.
    MaxReplicas,
}

/// The first filter that does not depend on the batch (ready, availability,
/// constraints) that rejects `node`, with the reason.
pub(super) fn static_rejection(spec: &TaskTemplate, node: &Node) -> Option<(FilterKind, String)> {
    match node.status.state {
        NodeState::Ready => {}
        NodeState::Down => return Some((FilterKind::Ready, "node is down".into())),
        NodeState::Unknown => return Some((FilterKind::Ready, "node state is unknown".into())),
    }
    match node.spec.availability {
        Availability::Active => {}
        Availability::Pause => {
            return Some((
                FilterKind::Availability,
                "node availability is pause".into(),
            ));
        }
        Availability::Drain => {
            return Some((
                FilterKind::Availability,
                "node availability is drain".into(),
            ));
        }
    }
    spec.placement
        .constraints
        .iter()
        .find(|c| !c.matches(node))
        .map(|c| (FilterKind::Constraint, format!("constraint {c} failed")))
}

/// The first filter that rejects `n` for `task`, with the reason, or `None`
/// when the node would take it.
fn rejection(
    task: TaskRef<'_>,
    n: &NodeInfo<'_>,
    same_service: u64,
) -> Option<(FilterKind, String)> {
    let spec = task.spec;
    if let Some(r) = static_rejection(spec, n.node) {
        return Some(r);
    }
    if !n.has_address_for(spec) {
        let subnet = n.node.subnet.map(|s| s.to_string()).unwrap_or_default();
        return Some((
            FilterKind::Addresses,
            format!("no free address in subnet {subnet} ({} held)", n.addresses),
        ));
    }
    let need = spec.resources.reservations;
    let free = n.available();
    if !free.fits(&need) {
        return Some((FilterKind::Resources, resources_reason(&need, &free)));
    }
    if let Some((proto, port)) = host_ports(spec).find(|p| n.host_ports.contains(p)) {
        return Some((
            FilterKind::HostPorts,
            format!("host port {port}/{proto} in use"),
        ));
    }
    if let Some(max) = spec.placement.max_replicas_per_node.filter(|&m| m > 0)
        && same_service >= max
    {
        return Some((
            FilterKind::MaxReplicas,
            format!("max replicas per node ({max}) reached"),
        ));
    }
    None
}

/// Counts, per filter and reason, the `candidates` (node indexes) that reject
/// `task`, in pipeline order then by reason. A pinned task is only explained
/// against its own node: listing every other node as "not its node" would
/// bury the reason that matters.
pub(super) fn explain(
    view: &ClusterView<'_>,
    task: TaskRef<'_>,
    same_service: &[u64],
    candidates: &[usize],
) -> Vec<Rejection> {
    if let (Some(id), true) = (task.node, candidates.is_empty()) {
        return vec![Rejection {
            filter: FilterKind::Pinned,
            reason: format!("its node {id} is not in the cluster"),
            nodes: 0,
        }];
    }
    let mut counts: BTreeMap<(FilterKind, String), usize> = BTreeMap::new();
    for &i in candidates {
        let Some(n) = view.nodes.get(i) else { continue };
        let same = same_service.get(i).copied().unwrap_or(0);
        if let Some(key) = rejection(task, n, same) {
            *counts.entry(key).or_insert(0) += 1;
        }
    }
    counts
        .into_iter()
        .map(|((filter, reason), nodes)| Rejection {
            filter,
            reason,
            nodes,
        })
        .collect()
}

/// `no node has 2 GiB memory free`, naming every dimension that is short.
fn resources_reason(need: &Resources, free: &Resources) -> String {
    let mut short = Vec::new();
    if need.nano_cpus > free.nano_cpus {
        short.push(format_cpus(need.nano_cpus));
    }
    if need.memory_bytes > free.memory_bytes {
        short.push(format!("{} memory", format_bytes(need.memory_bytes)));
    }
    format!("no node has {} free", short.join(" and "))
}

/// `1 CPU`, `0.5 CPUs`, `2 CPUs`.
pub(crate) fn format_cpus(nano: u64) -> String {
    let whole = nano / 1_000_000_000;
    let frac = nano % 1_000_000_000;
    let text = if frac == 0 {
        whole.to_string()
    } else {
        let digits = format!("{frac:09}");
        format!("{whole}.{}", digits.trim_end_matches('0'))
    };
    if nano == 1_000_000_000 {
        "1 CPU".into()
    } else {
        format!("{text} CPUs")
    }
}

/// Bytes in the largest binary unit that gives at least 1, with at most two
/// decimals: `2 GiB`, `1.5 GiB`, `512 MiB`, `100 B`.
pub(crate) fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, size) in UNITS {
        if bytes >= size {
            let hundredths = (bytes as u128 * 100 / size as u128) as u64;
            let (whole, frac) = (hundredths / 100, hundredths % 100);
            return match frac {
                0 => format!("{whole} {name}"),
                f if f % 10 == 0 => format!("{whole}.{} {name}", f / 10),
                f => format!("{whole}.{f:02} {name}"),
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_an_operator_writes_them() {
        assert_eq!(format_bytes(2 << 30), "2 GiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
        assert_eq!(format_bytes(512 << 20), "512 MiB");
        assert_eq!(format_bytes(100), "100 B");
        assert_eq!(format_cpus(1_000_000_000), "1 CPU");
        assert_eq!(format_cpus(500_000_000), "0.5 CPUs");
        assert_eq!(format_cpus(2_000_000_000), "2 CPUs");
    }
}
