//! The global orchestrator: one live task per eligible node.
//!
//! A node is eligible for a new task when it is ready, active and meets every
//! constraint. An existing task stays on a paused node or one whose state is
//! unknown (see `replicated::node_loss`) and is shut down when its node is
//! down, drained, gone, or no longer meets the constraints. When a down node
//! comes back ready it gets a fresh task; its old one was already told to stop.

use std::collections::{BTreeMap, BTreeSet};

use super::replicated::{node_loss, shutdown};
use super::{Action, Finished, Origin, ShutdownReason, finished, keep_one, new_task};
use crate::model::{DesiredState, Node, NodeId, Service, Task};

pub(super) fn reconcile(service: &Service, tasks: &[&Task], nodes: &[Node]) -> Vec<Action> {
    let constraints = &service.spec.task.placement.constraints;
    let mut actions = Vec::new();
    let mut live: BTreeMap<&NodeId, Vec<&Task>> = BTreeMap::new();
    let mut nodeless: Vec<&Task> = Vec::new();
    for &t in tasks {
        match &t.node {
            Some(node) if t.desired_state == DesiredState::Running => {
                live.entry(node).or_default().push(t);
            }
            Some(_) => {}
            None if t.desired_state == DesiredState::Running => nodeless.push(t),
            None => {}
        }
    }
    // A global task is made for one node; one without a node (left over from
    // a mode change) has nowhere to go.
    nodeless.sort_by(|a, b| a.id.cmp(&b.id));
    for t in nodeless {
        actions.push(shutdown(t, ShutdownReason::NodeIneligible));
    }

    let mut covered: BTreeSet<&NodeId> = BTreeSet::new();
    for (&node_id, candidates) in &live {
        let (kept, duplicates) = keep_one(candidates.clone());
        let Some(task) = kept else { continue };
        for t in duplicates {
            actions.push(shutdown(t, ShutdownReason::Duplicate));
        }
        let node = nodes.iter().find(|n| &n.id == node_id);
        let meets_constraints = node.is_some_and(|n| constraints.iter().all(|c| c.matches(n)));
        // Constraints are checked against the current spec: a constraint
        // added by a redeploy moves the service off nodes that fail it.
        let leave = if !task.status.state.is_terminal() {
            node_loss(task, nodes)
                .or((!meets_constraints).then_some(ShutdownReason::NodeIneligible))
        } else {
            None
        };
        if let Some(reason) = leave {
            actions.push(shutdown(task, reason));
            continue;
        }
        if task.status.state.is_terminal() && finished(task) == Finished::Replace {
            actions.push(shutdown(task, ShutdownReason::Replaced));
            if node.is_some_and(|n| n.takes_new_tasks()) && meets_constraints {
                actions.push(new_task(
                    service,
                    None,
                    Some(node_id.clone()),
                    Origin::Retries(task),
                ));
            }
            covered.insert(node_id);
            continue;
        }
        covered.insert(node_id);
    }

    let mut eligible: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.takes_new_tasks() && constraints.iter().all(|c| c.matches(n)))
        .collect();
    eligible.sort_by(|a, b| a.id.cmp(&b.id));
    for node in eligible {
        if !covered.contains(&node.id) {
            actions.push(new_task(
                service,
                None,
                Some(node.id.clone()),
                Origin::Fresh,
            ));
        }
    }
    actions
}
