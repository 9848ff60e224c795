//! The executor: the loops that turn the pure cores' results into
//! commands, in swarmkit's manner — components meet only through the store.
//!
//! - The **orchestrator** loop runs [`orchestrator::reconcile`] for every
//!   service an event touched (all of them after a node change) and proposes
//!   the task creations and shutdowns.
//! - The **scheduler** loop gathers every new or pending task, builds one
//!   [`ClusterView`], runs [`scheduler::schedule`] once for the batch and
//!   proposes `AssignTasks` and `MarkTasksPending` (with each filter's
//!   explanation). A retry whose `not_before` time has not come is left
//!   out, and the loop wakes up again when the earliest one comes.
//!
//! The loops are the shell around the pure cores, so they read the clock:
//! the orchestrator's retry delays become absolute `not_before` times here,
//! and the state changes they make are stamped, the times written into the
//! commands (the state machine never reads a clock; replaying the log gives
//! the same times).
//! - The **task history** loop deletes stopped tasks beyond the last
//!   [`TASK_HISTORY_LIMIT`] per slot (per node for global services), like
//!   Swarm's `task-history-limit`, and every stopped task of a removed
//!   service.
//!
//! Each loop first runs a pass over everything (so after a restart, even a
//! kill -9 in the middle of a deploy, the cluster converges from what the
//! store holds), then watches from the revision it read and runs a pass per
//! batch of events. None calls another: a pass's commands produce events
//! that wake the others.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::model::{
    DesiredState, Node, NodeId, Service, ServiceId, Task, TaskId, TaskState, TaskStatus,
};
use crate::orchestrator::{self, Action, NewTask, ShutdownReason};
use crate::scheduler::{self, ClusterView, TaskRef, dependencies};
use crate::store::{Command, DesiredStateChange, Event, Object, PendingTask};

use super::state::{StoreFront, random_id};

/// Stopped tasks kept per slot, counting the live one (Swarm's default
/// `task-history-limit`).
pub const TASK_HISTORY_LIMIT: usize = 5;

/// Which services a batch of events concerns.
enum Scope {
    All,
    Services(BTreeSet<ServiceId>),
}

/// Runs `pass` once over everything, then once per batch of events, until
/// `shutdown` resolves. A pass may ask to run again at a time of its own
/// (with no events) even when nothing happens before then.
async fn drive<F, Fut>(
    name: &'static str,
    store: &StoreFront,
    shutdown: impl Future<Output = ()>,
    mut pass: F,
) where
    F: FnMut(Option<Vec<Event>>) -> Fut,
    Fut: Future<Output = Option<Instant>>,
{
    tokio::pin!(shutdown);
    'resync: loop {
        let revision = store.revision();
        let mut wake = pass(None).await;
        let mut events = match store.watch(revision + 1) {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!(loop_name = name, error = %e, "watch failed; resyncing");
                continue 'resync;
            }
        };
        loop {
            let first = tokio::select! {
                () = &mut shutdown => return,
                e = events.recv() => e,
                () = sleep_until(wake), if wake.is_some() => {
                    wake = pass(Some(Vec::new())).await;
                    continue;
                }
            };
            let mut batch = Vec::new();
            match first {
                Some(Ok(events)) => batch.extend(events),
                Some(Err(crate::store::WatchError::Closed)) | None => return,
                Some(Err(e)) => {
                    tracing::info!(loop_name = name, error = %e, "watch fell behind; resyncing");
                    continue 'resync;
                }
            }
            while let Ok(next) = events.try_recv() {
                match next {
                    Ok(events) => batch.extend(events),
                    Err(_) => continue 'resync,
                }
            }
            wake = pass(Some(batch)).await;
        }
    }
}

async fn sleep_until(wake: Option<Instant>) {
    if let Some(at) = wake {
        tokio::time::sleep_until(at).await;
    }
}

/// Now, in Unix milliseconds (0 for a clock before 1970).
pub(super) fn unix_ms(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The orchestrator loop.
pub async fn run_orchestrator(store: StoreFront, shutdown: impl Future<Output = ()>) {
    let s = store.clone();
    drive("orchestrator", &store, shutdown, move |events| {
        let store = s.clone();
        async move {
            let scope = match events {
                None => Scope::All,
                Some(events) => orchestrator_scope(&events),
            };
            orchestrate(&store, &scope).await;
            None
        }
    })
    .await;
}

fn orchestrator_scope(events: &[Event]) -> Scope {
    let mut services = BTreeSet::new();
    for e in events {
        match &*e.object {
            Object::Node(_) => return Scope::All,
            Object::Service(s) => {
                services.insert(s.id.clone());
            }
            Object::Task(t) => {
                services.insert(t.service.clone());
            }
        }
    }
    Scope::Services(services)
}

/// One orchestrator pass over the services in `scope`.
async fn orchestrate(store: &StoreFront, scope: &Scope) {
    let now = unix_ms(SystemTime::now());
    let commands = store.read(|s| {
        let nodes: Vec<Node> = s.nodes().cloned().collect();
        let ids: BTreeSet<ServiceId> = match scope {
            Scope::All => s
                .services()
                .map(|svc| svc.id.clone())
                .chain(s.tasks().map(|t| t.service.clone()))
                .collect(),
            Scope::Services(ids) => ids.clone(),
        };
        let mut commands = Vec::new();
        for id in ids {
            let tasks: Vec<Task> = s.tasks_of_service(&id).cloned().collect();
            let actions = match s.service(&id) {
                Some(service) => match orchestrator::reconcile(service, &tasks, &nodes) {
                    // Converged on counts and placement: now bring outdated
                    // tasks to the current spec.
                    Ok(actions) if actions.is_empty() => update_actions(service, &tasks),
                    Ok(actions) => actions,
                    Err(e) => {
                        tracing::warn!(service = %id, error = %e, "cannot reconcile service");
                        continue;
                    }
                },
                None => orchestrator::remove_service(&id, &tasks),
            };
            commands.extend(commands_for(actions, now));
        }
        commands
    });
    propose_logged(store, "orchestrator", commands).await;
}

/// The updater: every live, unfinished task whose template differs from
/// the service's is replaced in its slot (or on its node), stop-first.
///
/// Decision: all such tasks at once. `update_config` is stored but rolling
/// updates (parallelism, delay, monitor, failure action) come with the
/// update orchestrator; a change that only bumps `spec_version` without
/// touching the template (a scale) replaces nothing. It runs only once
/// [`orchestrator::reconcile`] has nothing to do for the service, so the
/// two never act on the same task in one pass.
fn update_actions(service: &Service, tasks: &[Task]) -> Vec<Action> {
    let mut outdated: Vec<&Task> = tasks
        .iter()
        .filter(|t| {
            t.service == service.id
                && t.desired_state == DesiredState::Running
                && !t.status.state.is_terminal()
                && t.spec != service.spec.task
        })
        .collect();
    outdated.sort_by(|a, b| (a.slot, &a.node, &a.id).cmp(&(b.slot, &b.node, &b.id)));
    let mut actions = Vec::new();
    for t in outdated {
        actions.push(Action::Shutdown {
            task: t.id.clone(),
            reason: ShutdownReason::Replaced,
        });
        actions.push(Action::Create(Box::new(NewTask {
            service: service.id.clone(),
            service_name: service.spec.full_name(),
            slot: t.slot,
            // A global task stays on its node; a replicated one is placed
            // again by the scheduler.
            node: if t.slot.is_some() {
                None
            } else {
                t.node.clone()
            },
            spec_version: service.spec_version,
            spec: service.spec.task.clone(),
            replaces: Some(t.id.clone()),
            attempt: 0,
            delay: Duration::ZERO,
        })));
    }
    actions
}

/// Turns one service's actions into at most two commands (each all or
/// none, so a refusal of one service's creations does not hold up another's).
/// `now` (Unix milliseconds) stamps the new tasks and turns retry delays
/// into `not_before` times.
fn commands_for(actions: Vec<Action>, now: u64) -> Vec<Command> {
    let mut tasks = Vec::new();
    let mut changes = Vec::new();
    for action in actions {
        match action {
            Action::Create(new) => {
                let id = match TaskId::new(random_id()) {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::error!(error = %e, "generated task id refused");
                        continue;
                    }
                };
                tasks.push(Task {
                    id,
                    service: new.service,
                    slot: new.slot,
                    node: new.node,
                    spec_version: new.spec_version,
                    spec: new.spec,
                    desired_state: DesiredState::Running,
                    status: TaskStatus {
                        state: TaskState::New,
                        timestamp_unix_ms: Some(now),
                        ..TaskStatus::default()
                    },
                    generation: 0,
                    version: 0,
                    service_name: new.service_name,
                    attempt: new.attempt,
                    not_before_unix_ms: (!new.delay.is_zero()).then(|| {
                        now.saturating_add(u64::try_from(new.delay.as_millis()).unwrap_or(u64::MAX))
                    }),
                    // Allocated by the state machine when it is assigned.
                    address: None,
                });
            }
            Action::Shutdown { task, reason } => {
                tracing::debug!(%task, reason = reason.as_str(), "shutting task down");
                changes.push(DesiredStateChange {
                    task,
                    desired_state: DesiredState::Shutdown,
                });
            }
        }
    }
    let mut commands = Vec::new();
    // Shutdowns first: a replacement's creation never has to wait for the
    // task it replaces to be told to stop.
    if !changes.is_empty() {
        commands.push(Command::SetTaskDesiredState { changes });
    }
    if !tasks.is_empty() {
        commands.push(Command::CreateTasks { tasks });
    }
    commands
}

/// The scheduler loop.
pub async fn run_scheduler(store: StoreFront, shutdown: impl Future<Output = ()>) {
    let s = store.clone();
    drive("scheduler", &store, shutdown, move |_events| {
        let store = s.clone();
        async move { schedule_pending(&store).await }
    })
    .await;
}

/// One scheduling pass over every new or pending task whose time has
/// come; returns when the next one's comes.
async fn schedule_pending(store: &StoreFront) -> Option<Instant> {
    let now = unix_ms(SystemTime::now());
    let mut next: Option<u64> = None;
    let commands = store.read(|s| {
        let mut pending: Vec<&Task> = s
            .tasks()
            .filter(|t| {
                matches!(t.status.state, TaskState::New | TaskState::Pending)
                    && t.desired_state == DesiredState::Running
            })
            .filter(|t| match t.not_before_unix_ms {
                Some(at) if at > now => {
                    next = Some(next.map_or(at, |n| n.min(at)));
                    false
                }
                _ => true,
            })
            .collect();
        // Compose `depends_on`: a task whose dependencies do not hold yet
        // stays pending with the reason, and the scheduler never sees it.
        let mut reasons: BTreeMap<&ServiceId, Option<String>> = BTreeMap::new();
        let mut held: Vec<(&Task, String)> = Vec::new();
        pending.retain(|t| {
            let reason = reasons.entry(&t.service).or_insert_with(|| {
                let service = s.service(&t.service)?;
                if service.spec.depends_on.is_empty() {
                    return None;
                }
                dependencies::waiting_reason(
                    service,
                    |name| {
                        s.services()
                            .find(|x| x.spec.stack == service.spec.stack && x.spec.name == name)
                    },
                    |dependency| s.tasks_of_service(&dependency.id).collect(),
                )
            });
            match reason {
                Some(r) => {
                    held.push((*t, r.clone()));
                    false
                }
                None => true,
            }
        });
        let held: Vec<PendingTask> = held
            .into_iter()
            // Writing the same reason again would wake every watcher for nothing.
            .filter(|(t, r)| t.status.state != TaskState::Pending || &t.status.message != r)
            .map(|(t, message)| PendingTask {
                task: t.id.clone(),
                message,
            })
            .collect();
        if pending.is_empty() {
            return if held.is_empty() {
                Vec::new()
            } else {
                vec![Command::MarkTasksPending {
                    tasks: held,
                    at_unix_ms: Some(now),
                }]
            };
        }
        // Tasks of one service next to each other: the scheduler shares its
        // work across such a group, and slots are placed in order.
        pending.sort_by(|a, b| {
            (&a.service, &a.node, a.slot, &a.id).cmp(&(&b.service, &b.node, b.slot, &b.id))
        });
        let nodes: Vec<Node> = s.nodes().cloned().collect();
        // Finished tasks that still hold an address count against their
        // node's subnet.
        let tasks: Vec<Task> = s
            .tasks()
            .filter(|t| t.occupies_node() || (t.address.is_some() && t.node.is_some()))
            .cloned()
            .collect();
        let view = match ClusterView::new(&nodes, &tasks) {
            Ok(view) => view,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the cluster view");
                return Vec::new();
            }
        };
        let refs: Vec<TaskRef<'_>> = pending.iter().map(|t| TaskRef::from(*t)).collect();
        let plan = scheduler::schedule(&view, &refs);
        let by_id: BTreeMap<&TaskId, &Task> = pending.iter().map(|t| (&t.id, *t)).collect();
        let mut commands = Vec::new();
        if !plan.assignments.is_empty() {
            commands.push(Command::AssignTasks {
                assignments: plan.assignments,
                at_unix_ms: Some(now),
            });
        }
        let newly_pending: Vec<PendingTask> =
            held.into_iter()
                .chain(plan.unplaced.iter().filter_map(|u| {
                    let message = u.reason();
                    let task = by_id.get(&u.task)?;
                    // Writing the same reason again would wake every watcher
                    // for nothing.
                    (task.status.state != TaskState::Pending || task.status.message != message)
                        .then(|| PendingTask {
                            task: u.task.clone(),
                            message,
                        })
                }))
                .collect();
        if !newly_pending.is_empty() {
            commands.push(Command::MarkTasksPending {
                tasks: newly_pending,
                at_unix_ms: Some(now),
            });
        }
        commands
    });
    propose_logged(store, "scheduler", commands).await;
    next.map(|at| Instant::now() + Duration::from_millis(at - now))
}

/// The task history loop.
pub async fn run_task_history(store: StoreFront, shutdown: impl Future<Output = ()>) {
    let s = store.clone();
    drive("task-history", &store, shutdown, move |events| {
        let store = s.clone();
        let relevant = events.is_none_or(|events| {
            events
                .iter()
                .any(|e| matches!(&*e.object, Object::Task(_) | Object::Service(_)))
        });
        async move {
            if relevant {
                collect_history(&store).await;
            }
            None
        }
    })
    .await;
}

/// A replicated slot (service, slot) or a global service's node.
type SlotKey = (ServiceId, Option<u64>, Option<NodeId>);

/// One task history pass.
async fn collect_history(store: &StoreFront) {
    let doomed: Vec<TaskId> = store.read(|s| {
        // Per slot (replicated) or per node (global): the service and which.
        let mut groups: BTreeMap<SlotKey, Vec<&Task>> = BTreeMap::new();
        let mut doomed = Vec::new();
        for t in s.tasks() {
            let stopped = t.desired_state == DesiredState::Shutdown && !t.occupies_node();
            if s.service(&t.service).is_none() {
                if stopped {
                    doomed.push(t.id.clone());
                }
                continue;
            }
            let node = if t.slot.is_some() {
                None
            } else {
                t.node.clone()
            };
            groups
                .entry((t.service.clone(), t.slot, node))
                .or_default()
                .push(t);
        }
        for tasks in groups.values_mut() {
            if tasks.len() <= TASK_HISTORY_LIMIT {
                continue;
            }
            // Oldest first: the log index of the last change orders them.
            tasks.sort_by_key(|t| (t.version, t.id.clone()));
            let mut excess = tasks.len() - TASK_HISTORY_LIMIT;
            for t in tasks.iter() {
                if excess == 0 {
                    break;
                }
                if t.desired_state == DesiredState::Shutdown && !t.occupies_node() {
                    doomed.push(t.id.clone());
                    excess -= 1;
                }
            }
        }
        doomed
    });
    if !doomed.is_empty() {
        propose_logged(
            store,
            "task-history",
            vec![Command::RemoveTasks { tasks: doomed }],
        )
        .await;
    }
}

async fn propose_logged(store: &StoreFront, who: &'static str, commands: Vec<Command>) {
    if commands.is_empty() {
        return;
    }
    match store.propose(commands).await {
        Ok(results) => {
            for (index, result) in results {
                if let Err(e) = result {
                    // Another writer got there first; the events of its
                    // change wake this loop again with the new state.
                    tracing::debug!(loop_name = who, index, error = %e, "command refused");
                }
            }
        }
        Err(e) => tracing::error!(loop_name = who, error = %e, "proposing failed"),
    }
}
