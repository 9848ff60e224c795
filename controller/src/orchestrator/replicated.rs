//! The replicated orchestrator: one live task per slot `1..=replicas`.
//!
//! Scale-down removes the highest slots first (slot numbers are stable, so
//! `web.1` stays `web.1`); scale-up fills the lowest free slot numbers. A
//! replacement takes its predecessor's slot.

use std::collections::BTreeMap;

use super::{Action, Finished, Origin, ShutdownReason, finished, keep_one, new_task};
use crate::model::{Availability, DesiredState, Node, NodeState, Service, Task};

pub(super) fn reconcile(
    service: &Service,
    replicas: u64,
    tasks: &[&Task],
    nodes: &[Node],
) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut live: BTreeMap<u64, Vec<&Task>> = BTreeMap::new();
    let mut slotless: Vec<&Task> = Vec::new();
    for &t in tasks {
        match t.slot {
            Some(slot) if t.desired_state == DesiredState::Running => {
                live.entry(slot).or_default().push(t);
            }
            Some(_) => {}
            // A task without a slot cannot belong to a replicated service
            // (left over from a mode change): it has no place to stay.
            None if t.desired_state == DesiredState::Running => slotless.push(t),
            None => {}
        }
    }
    slotless.sort_by(|a, b| a.id.cmp(&b.id));
    for t in slotless {
        actions.push(shutdown(t, ShutdownReason::ScaleDown));
    }

    // Keep the lowest `replicas` occupied slots; the rest are scaled down.
    let keep_count = usize::try_from(replicas).unwrap_or(usize::MAX);
    let mut occupied = 0usize;
    for (&slot, candidates) in &live {
        let (kept, duplicates) = keep_one(candidates.clone());
        let Some(task) = kept else { continue };
        if occupied >= keep_count {
            for t in std::iter::once(task).chain(duplicates) {
                actions.push(shutdown(t, ShutdownReason::ScaleDown));
            }
            continue;
        }
        occupied += 1;
        for t in duplicates {
            actions.push(shutdown(t, ShutdownReason::Duplicate));
        }
        let replace = if task.status.state.is_terminal() {
            match finished(task) {
                Finished::Leave => None,
                Finished::Replace => Some((ShutdownReason::Replaced, Origin::Retries(task))),
            }
        } else {
            node_loss(task, nodes).map(|reason| (reason, Origin::Moves(task)))
        };
        if let Some((reason, origin)) = replace {
            actions.push(shutdown(task, reason));
            actions.push(new_task(service, Some(slot), None, origin));
        }
    }

    // Fill the lowest free slot numbers.
    let mut slot = 1u64;
    while occupied < keep_count {
        if live.get(&slot).is_none_or(|c| c.is_empty()) {
            actions.push(new_task(service, Some(slot), None, Origin::Fresh));
            occupied += 1;
        }
        slot += 1;
    }
    actions
}

/// Why a running (non-terminal) task must move off its node, if it must.
/// A node in state `unknown` keeps its tasks: that is what nodes look like
/// right after a controller restart, before their first heartbeat, and
/// replacing then would double every service. A paused node keeps its tasks.
pub(super) fn node_loss(task: &Task, nodes: &[Node]) -> Option<ShutdownReason> {
    let id = task.node.as_ref()?;
    let Some(node) = nodes.iter().find(|n| &n.id == id) else {
        return Some(ShutdownReason::NodeRemoved);
    };
    if node.status.state == NodeState::Down {
        Some(ShutdownReason::NodeDown)
    } else if node.spec.availability == Availability::Drain {
        Some(ShutdownReason::NodeDrained)
    } else {
        None
    }
}

pub(super) fn shutdown(task: &Task, reason: ShutdownReason) -> Action {
    Action::Shutdown {
        task: task.id.clone(),
        reason,
    }
}
