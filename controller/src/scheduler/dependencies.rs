//! Compose `depends_on`: which services' tasks must wait for others.
//!
//! A task of a service with `depends_on` is scheduled only once every
//! service it names has reached its condition; until then it stays
//! `pending` with the reason, as `service ps` shows. Decisions, where
//! Compose (one host, one container per service at `up`) does not carry
//! over to a cluster:
//!
//! - **One task is enough** for `service_started` and `service_healthy`: a
//!   service is usable once one of its tasks is (its VIP balances over the
//!   ready ones, as a Kubernetes Service does over ready endpoints). Waiting
//!   for every replica would let one replica that no node can take hold
//!   back everything that depends on the service.
//! - `service_completed_successfully` needs **every** current task of the
//!   dependency to have exited with code 0 (a job with replicas is done
//!   when all are); one that failed is named.
//! - `service_healthy` on a dependency whose tasks have no health check
//!   never holds, as in Compose (which refuses to start then): the reason
//!   says so.
//! - The gate is not only for a first deploy: a dependent task that is
//!   replaced (failed, its node lost) waits again for its dependencies.
//!   Tasks that already run are never stopped when a dependency goes away.
//!
//! **Invariant:** pure, like the rest of the scheduler.

use crate::model::{DependencyCondition, DesiredState, Health, Service, Task, TaskState};

/// Why `service`'s tasks must wait, or `None` when every dependency holds.
/// `service_named` finds a service of the same stack by name; `tasks_of`
/// lists a service's tasks.
pub fn waiting_reason<'a>(
    service: &Service,
    service_named: impl Fn(&str) -> Option<&'a Service>,
    tasks_of: impl Fn(&Service) -> Vec<&'a Task>,
) -> Option<String> {
    for (name, condition) in &service.spec.depends_on {
        let Some(dependency) = service_named(name) else {
            return Some(format!(
                "waiting for service {name} (depends_on), which does not exist"
            ));
        };
        let tasks: Vec<&Task> = tasks_of(dependency)
            .into_iter()
            .filter(|t| t.desired_state == DesiredState::Running)
            .collect();
        if let Some(reason) = unmet(name, *condition, &tasks) {
            return Some(reason);
        }
    }
    None
}

/// Why `condition` does not hold for dependency `name` with current tasks
/// `tasks`, or `None` when it does.
fn unmet(name: &str, condition: DependencyCondition, tasks: &[&Task]) -> Option<String> {
    let running = || {
        tasks
            .iter()
            .filter(|t| t.status.state == TaskState::Running)
    };
    match condition {
        DependencyCondition::ServiceStarted => {
            let started = tasks
                .iter()
                .any(|t| matches!(t.status.state, TaskState::Running | TaskState::Complete));
            (!started).then(|| format!("waiting for service {name} to start (depends_on)"))
        }
        DependencyCondition::ServiceHealthy => {
            if running().any(|t| t.status.health == Health::Healthy) {
                None
            } else if running().next().is_some()
                && running().all(|t| t.status.health == Health::None)
            {
                Some(format!(
                    "waiting for service {name} to be healthy (depends_on), but it has no health check"
                ))
            } else {
                Some(format!(
                    "waiting for service {name} to be healthy (depends_on)"
                ))
            }
        }
        DependencyCondition::ServiceCompletedSuccessfully => {
            if let Some(failed) = tasks
                .iter()
                .find(|t| t.status.state.is_terminal() && t.status.state != TaskState::Complete)
            {
                let how = match failed.status.exit_code {
                    Some(code) => format!("{} with exit code {code}", failed.status.state),
                    None => failed.status.state.to_string(),
                };
                return Some(format!(
                    "waiting for service {name} to complete successfully (depends_on), but its task {} {how}",
                    failed.id
                ));
            }
            let done =
                !tasks.is_empty() && tasks.iter().all(|t| t.status.state == TaskState::Complete);
            (!done).then(|| {
                format!("waiting for service {name} to complete successfully (depends_on)")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{ServiceMode, ServiceSpec, TaskStatus, TaskTemplate};

    fn service(name: &str, depends_on: &[(&str, DependencyCondition)]) -> Service {
        Service {
            id: name.parse().expect("service id"),
            spec: ServiceSpec {
                name: name.into(),
                stack: "demo".into(),
                mode: ServiceMode::Replicated { replicas: 1 },
                task: TaskTemplate::default(),
                update_config: None,
                endpoint_mode: Default::default(),
                depends_on: depends_on
                    .iter()
                    .map(|(n, c)| (n.to_string(), *c))
                    .collect(),
            },
            spec_version: 1,
            version: 1,
            virtual_ip: None,
        }
    }

    fn task(id: &str, of: &Service, state: TaskState, health: Health, exit: Option<i32>) -> Task {
        Task {
            id: id.parse().expect("task id"),
            service: of.id.clone(),
            slot: Some(1),
            node: None,
            spec_version: 1,
            spec: TaskTemplate::default(),
            desired_state: DesiredState::Running,
            status: TaskStatus {
                state,
                health,
                exit_code: exit,
                ..TaskStatus::default()
            },
            generation: 1,
            version: 1,
            service_name: of.spec.full_name(),
            attempt: 0,
            not_before_unix_ms: None,
            address: None,
        }
    }

    /// The reason `app` waits, given `db`'s tasks (`None`: db does not exist).
    fn reason(condition: DependencyCondition, db_tasks: Option<Vec<Task>>) -> Option<String> {
        let app = service("app", &[("db", condition)]);
        let db = service("db", &[]);
        let services: BTreeMap<&str, &Service> = db_tasks
            .is_some()
            .then_some(("db", &db))
            .into_iter()
            .collect();
        let tasks = db_tasks.unwrap_or_default();
        waiting_reason(
            &app,
            |name| services.get(name).copied(),
            |s| tasks.iter().filter(|t| t.service == s.id).collect(),
        )
    }

    #[test]
    fn started_needs_one_running_or_completed_task() {
        let db = service("db", &[]);
        let c = DependencyCondition::ServiceStarted;
        assert_eq!(
            reason(c, Some(vec![])).as_deref(),
            Some("waiting for service db to start (depends_on)")
        );
        let starting = task("t1", &db, TaskState::Starting, Health::None, None);
        assert!(reason(c, Some(vec![starting.clone()])).is_some());
        let running = task("t2", &db, TaskState::Running, Health::None, None);
        assert_eq!(reason(c, Some(vec![starting, running])), None);
        let done = task("t3", &db, TaskState::Complete, Health::None, Some(0));
        assert_eq!(reason(c, Some(vec![done])), None);
    }

    #[test]
    fn healthy_needs_one_healthy_running_task_and_says_when_none_can_be() {
        let db = service("db", &[]);
        let c = DependencyCondition::ServiceHealthy;
        let starting = task("t1", &db, TaskState::Running, Health::Starting, None);
        assert_eq!(
            reason(c, Some(vec![starting.clone()])).as_deref(),
            Some("waiting for service db to be healthy (depends_on)")
        );
        let healthy = task("t2", &db, TaskState::Running, Health::Healthy, None);
        assert_eq!(reason(c, Some(vec![starting, healthy])), None);
        let unchecked = task("t3", &db, TaskState::Running, Health::None, None);
        assert_eq!(
            reason(c, Some(vec![unchecked])).as_deref(),
            Some("waiting for service db to be healthy (depends_on), but it has no health check")
        );
    }

    #[test]
    fn completed_successfully_needs_every_task_done_with_zero() {
        let db = service("db", &[]);
        let c = DependencyCondition::ServiceCompletedSuccessfully;
        let done = task("t1", &db, TaskState::Complete, Health::None, Some(0));
        let running = task("t2", &db, TaskState::Running, Health::None, None);
        assert!(reason(c, Some(vec![done.clone(), running])).is_some());
        assert!(reason(c, Some(vec![])).is_some(), "no task yet is not done");
        let failed = task("t3", &db, TaskState::Failed, Health::None, Some(3));
        assert_eq!(
            reason(c, Some(vec![done.clone(), failed])).as_deref(),
            Some(
                "waiting for service db to complete successfully (depends_on), but its task t3 failed with exit code 3"
            )
        );
        // A task the orchestrator shut down (replaced) no longer counts.
        let mut old = task("t4", &db, TaskState::Failed, Health::None, Some(1));
        old.desired_state = DesiredState::Shutdown;
        assert_eq!(reason(c, Some(vec![done, old])), None);
    }

    #[test]
    fn a_missing_dependency_is_named() {
        assert_eq!(
            reason(DependencyCondition::ServiceStarted, None).as_deref(),
            Some("waiting for service db (depends_on), which does not exist")
        );
    }

    #[test]
    fn no_dependencies_never_wait() {
        let app = service("app", &[]);
        assert_eq!(waiting_reason(&app, |_| None, |_| Vec::new()), None);
    }
}
