//! The orchestrators: turn a service's desired state into task changes.
//!
//! [`reconcile`] compares a service with its tasks and the nodes and returns
//! [`Action`]s — plain data that the executor commits to the store as one
//! command; placement is the scheduler's job, not theirs. Replicated services
//! keep one live task per slot `1..=replicas`; global services keep one live
//! task per eligible node. A task is *live* while its desired state is
//! `running`.
//!
//! Who restarts what (the split that [`RestartPolicy`](crate::model::RestartPolicy)
//! documents): an agent restarts a task's container **in place** when it
//! exits, applying the restart policy (delay, back-off, max attempts within
//! the window) and reporting `restarts`; a task is `failed` or `complete` only
//! when the agent's policy says it is over, and then the orchestrator leaves
//! its slot alone. The orchestrator **replaces** a task (new task, same slot
//! or node; the old one's desired state set to shutdown) only where no agent
//! can act: its node is down, drained or gone (whatever the restart
//! condition: the container never exited on its own), or the task was
//! `rejected`, `orphaned` or shut down behind the controller's back (unless
//! the condition is `none`).
//!
//! Such a replacement is a *retry* and backs off like the agent's restarts:
//! the new task carries its slot's `attempt` count (the predecessor's plus
//! one) and a delay of `max(restart_policy.delay, 100 ms doubling per
//! attempt up to 10 s)`, which the executor turns into the task's
//! `not_before` time and the scheduler honours. `max_attempts` counts these
//! retries: a task that failed on its `max_attempts`-th retry is left alone.
//! A task moved off a lost or drained node is no retry: attempt 0, no delay.
//!
//! **Invariant:** pure and deterministic: no I/O, no clock (delays are
//! relative; the restart `window` is the agent's business), no randomness.
//! New tasks carry no id; the executor assigns one when it commits them.

mod global;
mod replicated;

#[cfg(test)]
mod tests;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{
    DesiredState, Node, NodeId, RestartCondition, RestartPolicy, Service, ServiceId, ServiceMode,
    Task, TaskId, TaskState, TaskTemplate,
};

/// Errors from the orchestrator module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrchestratorError {
    /// A replicated service asked for more slots than a node could ever hold.
    #[error("service {service}: {replicas} replicas is more than the supported {max}")]
    TooManyReplicas {
        /// The service.
        service: ServiceId,
        /// What it asked for.
        replicas: u64,
        /// The limit.
        max: u64,
    },
}

/// The most replicas one service may ask for; bounds the work of a
/// reconcile pass against a typo like `replicas: 10000000000`.
pub const MAX_REPLICAS: u64 = 100_000;

/// A task an orchestrator wants created (desired state running, status new).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewTask {
    /// The service.
    pub service: ServiceId,
    /// The service's full name ([`Task::service_name`]).
    pub service_name: String,
    /// Replicated: the slot it fills.
    pub slot: Option<u64>,
    /// Global: the node it is for (the scheduler only checks it fits).
    pub node: Option<NodeId>,
    /// The service's `spec_version` it is made from.
    pub spec_version: u64,
    /// The service's task template, copied.
    pub spec: TaskTemplate,
    /// The task it replaces, if any.
    pub replaces: Option<TaskId>,
    /// Retries of its slot (or node) so far, this one included
    /// ([`Task::attempt`]); 0 for a first task or one moved off a node.
    #[serde(default)]
    pub attempt: u32,
    /// How long after its creation it may be scheduled: the retry back-off.
    #[serde(default)]
    pub delay: Duration,
}

/// The first retry's back-off (Docker's and the agent's restart back-off).
pub const RETRY_BACKOFF_BASE: Duration = Duration::from_millis(100);

/// The longest retry back-off.
pub const RETRY_BACKOFF_CAP: Duration = Duration::from_secs(10);

/// The wait before retry number `attempt` (1 for the first) under
/// `policy`: the policy's delay, or the back-off when that is longer —
/// [`RETRY_BACKOFF_BASE`] doubling per attempt up to [`RETRY_BACKOFF_CAP`].
pub fn retry_delay(policy: &RestartPolicy, attempt: u32) -> Duration {
    if attempt == 0 {
        return Duration::ZERO;
    }
    // 100 ms × 2^7 already exceeds the cap: larger shifts are the cap.
    let doublings = (attempt - 1).min(16);
    let backoff = RETRY_BACKOFF_BASE
        .saturating_mul(1u32 << doublings)
        .min(RETRY_BACKOFF_CAP);
    policy.delay.max(backoff)
}

/// Why a task's desired state goes to shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownReason {
    /// Its slot is above the replica count.
    ScaleDown,
    /// Its node is down; a replacement runs elsewhere.
    NodeDown,
    /// Its node is drained.
    NodeDrained,
    /// Its node is no longer in the cluster.
    NodeRemoved,
    /// Its node no longer meets the service's constraints (global services).
    NodeIneligible,
    /// A replacement was created for it (it was rejected, orphaned or stopped).
    Replaced,
    /// Another live task fills the same slot or node.
    Duplicate,
    /// The service was removed.
    ServiceRemoved,
}

impl ShutdownReason {
    /// The reason as shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownReason::ScaleDown => "scale-down",
            ShutdownReason::NodeDown => "node-down",
            ShutdownReason::NodeDrained => "node-drained",
            ShutdownReason::NodeRemoved => "node-removed",
            ShutdownReason::NodeIneligible => "node-ineligible",
            ShutdownReason::Replaced => "replaced",
            ShutdownReason::Duplicate => "duplicate",
            ShutdownReason::ServiceRemoved => "service-removed",
        }
    }
}

/// One change for the executor to commit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum Action {
    /// Create a task.
    Create(Box<NewTask>),
    /// Set a task's desired state to shutdown (bumping its generation).
    Shutdown {
        /// The task.
        task: TaskId,
        /// Why.
        reason: ShutdownReason,
    },
}

/// The actions that bring `service`'s tasks in line with its spec and the
/// nodes. `tasks` may hold other services' tasks; they are ignored.
pub fn reconcile(
    service: &Service,
    tasks: &[Task],
    nodes: &[Node],
) -> Result<Vec<Action>, OrchestratorError> {
    let own: Vec<&Task> = tasks.iter().filter(|t| t.service == service.id).collect();
    match service.spec.mode {
        ServiceMode::Replicated { replicas } => {
            if replicas > MAX_REPLICAS {
                return Err(OrchestratorError::TooManyReplicas {
                    service: service.id.clone(),
                    replicas,
                    max: MAX_REPLICAS,
                });
            }
            Ok(replicated::reconcile(service, replicas, &own, nodes))
        }
        ServiceMode::Global => Ok(global::reconcile(service, &own, nodes)),
    }
}

/// The actions for a removed service: every live task is shut down.
pub fn remove_service(service: &ServiceId, tasks: &[Task]) -> Vec<Action> {
    let mut live: Vec<&Task> = tasks
        .iter()
        .filter(|t| &t.service == service && t.desired_state == DesiredState::Running)
        .collect();
    live.sort_by(|a, b| a.id.cmp(&b.id));
    live.into_iter()
        .map(|t| Action::Shutdown {
            task: t.id.clone(),
            reason: ShutdownReason::ServiceRemoved,
        })
        .collect()
}

/// Picks the task to keep among live tasks for one slot or node: the one
/// furthest along and not finished, then the newest spec, then the highest
/// id (deterministic). Returns it and the others.
fn keep_one(mut candidates: Vec<&Task>) -> (Option<&Task>, Vec<&Task>) {
    candidates.sort_by(|a, b| {
        let key = |t: &Task| {
            (
                !t.status.state.is_terminal(),
                t.status.state.rank(),
                t.spec_version,
            )
        };
        key(b).cmp(&key(a)).then_with(|| b.id.cmp(&a.id))
    });
    let mut rest = candidates.into_iter();
    let kept = rest.next();
    (kept, rest.collect())
}

/// What the orchestrator does about a finished (terminal) live task.
#[derive(Debug, PartialEq, Eq)]
enum Finished {
    /// Its slot or node is done: the agent's restart policy ended it.
    Leave,
    /// Replace it with a new task.
    Replace,
}

/// Decides about a terminal live task `task`.
///
/// Decision: retries are counted in the tasks themselves
/// ([`Task::attempt`]), not in the slot's history, which the task history
/// collector cuts to five tasks: counted there, a `max_attempts` above four
/// would never be reached.
fn finished(task: &Task) -> Finished {
    let policy = &task.spec.restart_policy;
    match task.status.state {
        TaskState::Rejected | TaskState::Orphaned | TaskState::Shutdown => {}
        _ => return Finished::Leave,
    }
    if policy.condition == RestartCondition::None {
        return Finished::Leave;
    }
    // Swarm's convention: max_attempts 0 means unlimited. The first task is
    // not a retry, so `max` retries means `max + 1` failed tasks.
    if let Some(max) = policy.max_attempts.filter(|&m| m > 0)
        && task.attempt >= max
    {
        return Finished::Leave;
    }
    Finished::Replace
}

/// Where a new task comes from, which decides its attempt count and delay.
#[derive(Clone, Copy)]
enum Origin<'a> {
    /// A slot or node that has no task yet.
    Fresh,
    /// Replaces a task that did nothing wrong (its node was lost).
    Moves(&'a Task),
    /// Retries a task that failed where only the controller can act.
    Retries(&'a Task),
}

fn new_task(service: &Service, slot: Option<u64>, node: Option<NodeId>, origin: Origin) -> Action {
    let (replaces, attempt) = match origin {
        Origin::Fresh => (None, 0),
        Origin::Moves(t) => (Some(t.id.clone()), 0),
        Origin::Retries(t) => (Some(t.id.clone()), t.attempt.saturating_add(1)),
    };
    Action::Create(Box::new(NewTask {
        service: service.id.clone(),
        service_name: service.spec.full_name(),
        slot,
        node,
        spec_version: service.spec_version,
        spec: service.spec.task.clone(),
        replaces,
        attempt,
        delay: retry_delay(&service.spec.task.restart_policy, attempt),
    }))
}
