//! The tasks the controller wants on this node, as assignment sets edit
//! them: the agent's side of the dispatcher's protocol, kept pure (no I/O,
//! no clock) so that its rules are tested without a controller or root.
//!
//! - A full set replaces the wanted set; an incremental one edits it
//!   (UPDATE adds or replaces, REMOVE drops). A REMOVE in a full set is
//!   refused as a sender's confusion, and ignored.
//! - A set whose generation is not newer than the last applied is stale and
//!   ignored, except the full set that opens a session (see
//!   [`Wanted::apply`]).
//! - A task whose desired state is not `running` is not wanted: the worker
//!   stops it.
//! - Every task's generation as last received is kept: its status reports
//!   carry it, and the controller drops reports about an older one.
//! - A task refused once (a field the agent cannot honour, a failed pull, a
//!   container that could not be created) stays refused: its spec never
//!   changes, so trying again could only fail again.

use super::convert;
use crate::worker::TaskSpec;
use gantry_proto::v1 as pb;
use std::collections::{BTreeMap, BTreeSet};

/// A task the controller wants here.
#[derive(Debug, Clone, PartialEq)]
pub struct Assigned {
    /// What the worker runs.
    pub spec: TaskSpec,
    /// Its image is in the node's store, so the worker may have it.
    pub ready: bool,
}

/// What applying a set did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    /// Tasks refused by this set: task, generation, why (naming the field).
    pub refused: Vec<(String, u64, String)>,
    /// For a full set, every task it named: anything else this node
    /// remembers about other tasks may be forgotten.
    pub named: Option<BTreeSet<String>>,
}

/// The wanted set. See the module docs.
#[derive(Debug, Default)]
pub struct Wanted {
    last_generation: u64,
    awaiting_full_set: bool,
    tasks: BTreeMap<String, Assigned>,
    refused: BTreeSet<String>,
    generations: BTreeMap<String, u64>,
}

impl Wanted {
    /// The newest generation applied (0: none), for `Hello`.
    pub fn last_generation(&self) -> u64 {
        self.last_generation
    }

    /// A session was accepted: its first full set is applied whatever its
    /// generation.
    pub fn session_opened(&mut self) {
        self.awaiting_full_set = true;
    }

    /// The generation a status report about `task` carries.
    pub fn generation_of(&self, task: &str) -> u64 {
        self.generations
            .get(task)
            .copied()
            .unwrap_or(self.last_generation)
    }

    /// The wanted tasks.
    pub fn tasks(&self) -> impl Iterator<Item = (&String, &Assigned)> {
        self.tasks.iter()
    }

    /// The wanted tasks, to mark them ready.
    pub fn tasks_mut(&mut self) -> impl Iterator<Item = (&String, &mut Assigned)> {
        self.tasks.iter_mut()
    }

    /// The specs the worker should run: the wanted tasks whose image is here.
    pub fn ready_specs(&self) -> Vec<TaskSpec> {
        self.tasks
            .values()
            .filter(|a| a.ready)
            .map(|a| a.spec.clone())
            .collect()
    }

    /// Refuses `task` for good (a failed pull, a container the worker
    /// could not create): no longer wanted, and never taken again.
    pub fn refuse(&mut self, task: &str) -> Option<Assigned> {
        self.refused.insert(task.to_string());
        self.tasks.remove(task)
    }

    /// Forgets the generations of tasks `keep` says no.
    pub fn retain_generations(&mut self, keep: impl Fn(&str) -> bool) {
        self.generations.retain(|id, _| keep(id));
    }

    /// Applies an assignment set; `None` when it is stale.
    ///
    /// The full set that opens a session is applied even when it is not
    /// newer: it is the controller's whole truth, applying it again is
    /// harmless (tasks already wanted are left as they are), and ignoring
    /// it would leave the node deaf to a controller that restarted and
    /// counts generations from lower again.
    pub fn apply(&mut self, set: pb::AssignmentSet) -> Option<Applied> {
        let opening = std::mem::take(&mut self.awaiting_full_set) && set.full;
        if set.generation <= self.last_generation && !opening {
            return None;
        }
        self.last_generation = set.generation;
        let mut applied = Applied::default();
        let mut updates: BTreeMap<String, pb::Task> = BTreeMap::new();
        for change in set.changes {
            let Some(task) = change.task else {
                tracing::warn!("assignment change without a task, ignored");
                continue;
            };
            match pb::AssignmentAction::try_from(change.action) {
                Ok(pb::AssignmentAction::Update) => {
                    updates.insert(task.id.clone(), task);
                }
                Ok(pb::AssignmentAction::Remove) if !set.full => {
                    updates.remove(&task.id);
                    self.tasks.remove(&task.id);
                }
                _ => tracing::warn!(
                    task = %task.id,
                    action = change.action,
                    full = set.full,
                    "assignment action refused"
                ),
            }
        }
        if set.full {
            let named: BTreeSet<String> = updates.keys().cloned().collect();
            self.tasks.retain(|id, _| named.contains(id));
            self.refused.retain(|id| named.contains(id));
            applied.named = Some(named);
        }
        for (id, task) in updates {
            // Reports carry the task's generation as last received, the one
            // the controller checks them against: a desired shutdown bumps
            // it, and the shutdown that follows must not read as a stale
            // report about the running task.
            let known = self.generations.entry(id.clone()).or_default();
            *known = (*known).max(task.generation);
            if pb::DesiredState::try_from(task.desired_state) != Ok(pb::DesiredState::Running) {
                self.tasks.remove(&id);
                continue;
            }
            if self.refused.contains(&id) {
                continue;
            }
            if let Some(current) = self.tasks.get(&id)
                && current.spec.generation >= task.generation
            {
                continue;
            }
            match convert::task_spec(&task) {
                Ok(spec) => {
                    let ready = self
                        .tasks
                        .get(&id)
                        .is_some_and(|a| a.ready && a.spec.image == spec.image);
                    self.tasks.insert(id, Assigned { spec, ready });
                }
                Err(e) => {
                    self.tasks.remove(&id);
                    self.refused.insert(id.clone());
                    applied.refused.push((id, task.generation, e.to_string()));
                }
            }
        }
        Some(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, generation: u64) -> pb::Task {
        pb::Task {
            id: id.into(),
            service: "svc".into(),
            slot: Some(1),
            generation,
            desired_state: pb::DesiredState::Running as i32,
            spec: Some(pb::TaskTemplate {
                image: "img".into(),
                restart_policy: Some(pb::RestartPolicy {
                    condition: pb::RestartCondition::Any as i32,
                    ..pb::RestartPolicy::default()
                }),
                ..pb::TaskTemplate::default()
            }),
            ..pb::Task::default()
        }
    }

    fn set(
        generation: u64,
        full: bool,
        changes: Vec<(pb::AssignmentAction, pb::Task)>,
    ) -> pb::AssignmentSet {
        pb::AssignmentSet {
            generation,
            full,
            changes: changes
                .into_iter()
                .map(|(action, task)| pb::AssignmentChange {
                    action: action as i32,
                    task: Some(task),
                })
                .collect(),
        }
    }

    fn ids(w: &Wanted) -> Vec<&str> {
        w.tasks().map(|(id, _)| id.as_str()).collect()
    }

    use pb::AssignmentAction::{Remove, Update};

    #[test]
    fn full_sets_replace_and_incremental_sets_edit() {
        let mut w = Wanted::default();
        w.session_opened();
        let a = w
            .apply(set(
                5,
                true,
                vec![(Update, task("a", 5)), (Update, task("b", 5))],
            ))
            .unwrap();
        assert_eq!(ids(&w), ["a", "b"]);
        assert_eq!(
            a.named,
            Some(["a".to_string(), "b".to_string()].into_iter().collect())
        );
        w.apply(set(
            6,
            false,
            vec![(Update, task("c", 6)), (Remove, task("a", 6))],
        ))
        .unwrap();
        assert_eq!(ids(&w), ["b", "c"]);
        w.apply(set(7, true, vec![(Update, task("c", 6))])).unwrap();
        assert_eq!(ids(&w), ["c"]);
        assert_eq!(w.last_generation(), 7);
        // A REMOVE in a full set is refused; the set still applies.
        w.apply(set(
            8,
            true,
            vec![(Update, task("d", 8)), (Remove, task("c", 8))],
        ))
        .unwrap();
        assert_eq!(ids(&w), ["d"]);
    }

    #[test]
    fn stale_sets_are_ignored_except_a_session_opening_full_set() {
        let mut w = Wanted::default();
        w.apply(set(5, false, vec![(Update, task("a", 5))]))
            .unwrap();
        assert!(
            w.apply(set(5, false, vec![(Update, task("b", 5))]))
                .is_none()
        );
        assert!(
            w.apply(set(4, true, vec![(Update, task("b", 4))]))
                .is_none()
        );
        assert_eq!(ids(&w), ["a"]);
        // A restarted controller counting from 2: the opening set applies,
        // the next stale one does not.
        w.session_opened();
        assert!(
            w.apply(set(2, true, vec![(Update, task("b", 2))]))
                .is_some()
        );
        assert_eq!(ids(&w), ["b"]);
        assert_eq!(w.last_generation(), 2);
        assert!(
            w.apply(set(2, false, vec![(Update, task("c", 2))]))
                .is_none()
        );
        // Only a full set opens: an incremental first set is judged as usual.
        w.session_opened();
        assert!(
            w.apply(set(1, false, vec![(Update, task("c", 1))]))
                .is_none()
        );
    }

    #[test]
    fn desired_shutdown_drops_the_task_and_bumps_its_generation() {
        let mut w = Wanted::default();
        w.apply(set(1, true, vec![(Update, task("a", 1))])).unwrap();
        assert_eq!(w.generation_of("a"), 1);
        let mut down = task("a", 2);
        down.desired_state = pb::DesiredState::Shutdown as i32;
        w.apply(set(2, false, vec![(Update, down)])).unwrap();
        assert!(ids(&w).is_empty());
        assert_eq!(w.generation_of("a"), 2, "the shutdown report answers 2");
        assert_eq!(w.generation_of("unknown"), 2, "else the last set's");
    }

    #[test]
    fn refused_tasks_stay_refused_until_a_full_set_drops_them() {
        let mut w = Wanted::default();
        let mut bad = task("bad", 1);
        bad.spec.as_mut().unwrap().image.clear();
        let applied = w
            .apply(set(
                1,
                true,
                vec![(Update, bad.clone()), (Update, task("ok", 1))],
            ))
            .unwrap();
        assert_eq!(applied.refused.len(), 1);
        let (id, generation, why) = &applied.refused[0];
        assert_eq!((id.as_str(), *generation), ("bad", 1));
        assert!(why.contains("spec.image"), "{why}");
        assert_eq!(ids(&w), ["ok"]);
        // Sent again: not converted (nor refused) again.
        let again = w
            .apply(set(
                2,
                false,
                vec![(Update, {
                    let mut b = bad.clone();
                    b.generation = 2;
                    b
                })],
            ))
            .unwrap();
        assert!(again.refused.is_empty());
        // A worker refusal too.
        assert!(w.refuse("ok").is_some());
        w.apply(set(3, false, vec![(Update, task("ok", 3))]))
            .unwrap();
        assert!(ids(&w).is_empty());
        // A full set without them forgets them: a new task of that id
        // (there is none in practice) would be taken.
        w.apply(set(4, true, vec![])).unwrap();
        w.apply(set(5, false, vec![(Update, task("ok", 5))]))
            .unwrap();
        assert_eq!(ids(&w), ["ok"]);
    }

    #[test]
    fn a_resent_task_keeps_its_readiness_and_spec() {
        let mut w = Wanted::default();
        w.apply(set(1, true, vec![(Update, task("a", 1))])).unwrap();
        for (_, a) in w.tasks_mut() {
            a.ready = true;
        }
        assert_eq!(w.ready_specs().len(), 1);
        w.session_opened();
        w.apply(set(1, true, vec![(Update, task("a", 1))])).unwrap();
        assert_eq!(w.ready_specs().len(), 1, "still ready after a resend");
    }
}
