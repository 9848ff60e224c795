//! Scenario tests from `testdata/scheduler/orchestrator/*.yaml` (expected
//! actions in `*.expected`; `UPDATE_EXPECT=1` rewrites them) and property
//! tests. Every scenario also applies its actions and reconciles again, to
//! show that one pass converges.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use proptest::prelude::*;
use serde::Deserialize;

use super::*;
use crate::model::{
    Availability, Constraint, Node, NodeRole, NodeSpec, NodeState, NodeStatus, Platform, Resources,
    RestartPolicy, ServiceSpec, TaskStatus,
};
use crate::scheduler::tests::{FixtureNode, check_fixtures, testdata};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureService {
    id: String,
    /// `replicated` or `global`.
    mode: String,
    #[serde(default)]
    replicas: u64,
    #[serde(default)]
    restart: RestartCondition,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    constraints: Vec<String>,
    #[serde(default = "one")]
    spec_version: u64,
}

fn one() -> u64 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureTask {
    id: String,
    #[serde(default)]
    slot: Option<u64>,
    #[serde(default)]
    node: Option<String>,
    #[serde(default = "running_state")]
    state: TaskState,
    #[serde(default)]
    desired: DesiredState,
    /// Retries of its slot before it ([`Task::attempt`]).
    #[serde(default)]
    attempt: u32,
}

fn running_state() -> TaskState {
    TaskState::Running
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrchestratorFixture {
    service: FixtureService,
    /// Reconcile a removal of the service instead.
    #[serde(default)]
    removed: bool,
    #[serde(default)]
    nodes: Vec<FixtureNode>,
    #[serde(default)]
    tasks: Vec<FixtureTask>,
}

fn service(
    id: &str,
    mode: ServiceMode,
    policy: RestartPolicy,
    constraints: Vec<Constraint>,
) -> Service {
    let mut task = TaskTemplate {
        image: "busybox".into(),
        restart_policy: policy,
        ..TaskTemplate::default()
    };
    task.placement.constraints = constraints;
    Service {
        id: id.parse().expect("service id"),
        spec: ServiceSpec {
            name: id.into(),
            stack: "demo".into(),
            mode,
            task,
            update_config: None,
            endpoint_mode: Default::default(),
            depends_on: Default::default(),
        },
        spec_version: 1,
        version: 1,
        virtual_ip: None,
    }
}

fn task(
    id: &str,
    service: &Service,
    slot: Option<u64>,
    node: Option<&str>,
    state: TaskState,
    desired: DesiredState,
) -> Task {
    Task {
        id: id.parse().expect("task id"),
        service: service.id.clone(),
        slot,
        node: node.map(|n| n.parse().expect("node id")),
        spec_version: service.spec_version,
        spec: service.spec.task.clone(),
        desired_state: desired,
        status: TaskStatus {
            state,
            ..TaskStatus::default()
        },
        generation: 1,
        version: 1,
        service_name: service.spec.full_name(),
        attempt: 0,
        not_before_unix_ms: None,
        address: None,
    }
}

/// What the executor would do: commit the actions to the task list.
fn apply(tasks: &mut Vec<Task>, actions: &[Action], next_id: &mut usize) {
    for action in actions {
        match action {
            Action::Create(new) => {
                *next_id += 1;
                tasks.push(Task {
                    id: TaskId::new(format!("new{next_id}")).expect("valid"),
                    service: new.service.clone(),
                    slot: new.slot,
                    node: new.node.clone(),
                    spec_version: new.spec_version,
                    spec: new.spec.clone(),
                    desired_state: DesiredState::Running,
                    status: TaskStatus::default(),
                    generation: 1,
                    version: 1,
                    service_name: new.service_name.clone(),
                    attempt: new.attempt,
                    not_before_unix_ms: None,
                    address: None,
                });
            }
            Action::Shutdown { task, .. } => {
                if let Some(t) = tasks.iter_mut().find(|t| &t.id == task) {
                    t.desired_state = DesiredState::Shutdown;
                    t.generation += 1;
                }
            }
        }
    }
}

fn render(actions: &[Action]) -> String {
    let mut out = String::new();
    for a in actions {
        match a {
            Action::Create(new) => {
                out.push_str("create");
                if let Some(slot) = new.slot {
                    write!(out, " slot {slot}").expect("write to string");
                }
                if let Some(node) = &new.node {
                    write!(out, " on {node}").expect("write to string");
                }
                if let Some(old) = &new.replaces {
                    write!(out, " replacing {old}").expect("write to string");
                }
                if new.attempt > 0 {
                    write!(out, " (attempt {} after {:?})", new.attempt, new.delay)
                        .expect("write to string");
                }
                out.push('\n');
            }
            Action::Shutdown { task, reason } => {
                writeln!(out, "shutdown {task} ({})", reason.as_str()).expect("write to string");
            }
        }
    }
    if actions.is_empty() {
        out.push_str("(nothing to do)\n");
    }
    out
}

fn run_orchestrator_fixture(text: &str) -> String {
    let fx: OrchestratorFixture = serde_norway::from_str(text).expect("fixture parses");
    let mode = match fx.service.mode.as_str() {
        "replicated" => ServiceMode::Replicated {
            replicas: fx.service.replicas,
        },
        "global" => ServiceMode::Global,
        other => panic!("fixture mode {other}"),
    };
    let policy = RestartPolicy {
        condition: fx.service.restart,
        max_attempts: fx.service.max_attempts,
        ..RestartPolicy::default()
    };
    let constraints = fx
        .service
        .constraints
        .iter()
        .map(|c| Constraint::parse(c).expect("fixture constraint"))
        .collect();
    let mut svc = service(&fx.service.id, mode, policy, constraints);
    svc.spec_version = fx.service.spec_version;
    let nodes: Vec<Node> = fx.nodes.iter().map(FixtureNode::build).collect();
    let mut tasks: Vec<Task> = fx
        .tasks
        .iter()
        .map(|t| Task {
            attempt: t.attempt,
            ..task(&t.id, &svc, t.slot, t.node.as_deref(), t.state, t.desired)
        })
        .collect();
    let pass = |tasks: &[Task]| {
        if fx.removed {
            remove_service(&svc.id, tasks)
        } else {
            reconcile(&svc, tasks, &nodes).expect("reconcile")
        }
    };
    let first = pass(&tasks);
    let mut out = render(&first);
    apply(&mut tasks, &first, &mut 0);
    out.push_str("-- then\n");
    out.push_str(&render(&pass(&tasks)));
    out
}

#[test]
fn orchestrator_scenarios() {
    check_fixtures(
        &testdata("scheduler/orchestrator"),
        run_orchestrator_fixture,
    );
}

#[test]
fn retries_back_off_from_100ms_to_10s_never_below_the_policy_delay() {
    let policy = RestartPolicy::default();
    let ms = |attempt| retry_delay(&policy, attempt).as_millis();
    assert_eq!(
        (0..=9).map(ms).collect::<Vec<_>>(),
        [0, 100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
    );
    assert_eq!(ms(u32::MAX), 10_000);
    let slow = RestartPolicy {
        delay: std::time::Duration::from_secs(5),
        ..RestartPolicy::default()
    };
    assert_eq!(retry_delay(&slow, 1), std::time::Duration::from_secs(5));
    assert_eq!(
        retry_delay(&slow, 7),
        std::time::Duration::from_millis(6400)
    );
}

#[test]
fn absurd_replica_counts_are_refused() {
    let svc = service(
        "web",
        ServiceMode::Replicated { replicas: u64::MAX },
        RestartPolicy::default(),
        Vec::new(),
    );
    let err = reconcile(&svc, &[], &[]).map_err(|e| e.to_string());
    assert_eq!(
        err,
        Err(format!(
            "service web: {} replicas is more than the supported 100000",
            u64::MAX
        ))
    );
}

// ---------------------------------------------------------------------------
// Properties

fn arb_nodes() -> impl Strategy<Value = Vec<Node>> {
    prop::collection::vec(
        (
            prop::sample::select(vec![
                NodeState::Ready,
                NodeState::Ready,
                NodeState::Down,
                NodeState::Unknown,
            ]),
            prop::sample::select(vec![
                Availability::Active,
                Availability::Active,
                Availability::Pause,
                Availability::Drain,
            ]),
            any::<bool>(),
        ),
        0..8,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (state, availability, eu))| Node {
                id: NodeId::new(format!("n{i}")).expect("valid"),
                spec: NodeSpec {
                    availability,
                    role: NodeRole::Worker,
                    labels: if eu {
                        BTreeMap::from([("zone".to_string(), "eu".to_string())])
                    } else {
                        BTreeMap::new()
                    },
                },
                status: NodeStatus {
                    state,
                    address: String::new(),
                    hostname: format!("n{i}"),
                    resources: Resources::default(),
                    platform: Platform::default(),
                },
                version: 0,
                subnet: None,
            })
            .collect()
    })
}

fn any_state() -> impl Strategy<Value = TaskState> {
    prop::sample::select(vec![
        TaskState::New,
        TaskState::Pending,
        TaskState::Running,
        TaskState::Complete,
        TaskState::Failed,
        TaskState::Rejected,
        TaskState::Shutdown,
        TaskState::Orphaned,
    ])
}

/// Existing tasks: slot 1..8, a node index (maybe absent), a state, live or not.
fn arb_tasks() -> impl Strategy<Value = Vec<(u64, Option<usize>, TaskState, bool)>> {
    prop::collection::vec(
        (
            1u64..8,
            prop::option::of(0usize..9),
            any_state(),
            any::<bool>(),
        ),
        0..16,
    )
}

fn arb_policy() -> impl Strategy<Value = RestartPolicy> {
    (
        prop::sample::select(vec![
            RestartCondition::None,
            RestartCondition::OnFailure,
            RestartCondition::Any,
        ]),
        prop::option::of(0u32..3),
    )
        .prop_map(|(condition, max_attempts)| RestartPolicy {
            condition,
            max_attempts,
            ..RestartPolicy::default()
        })
}

fn build_tasks(
    svc: &Service,
    raw: &[(u64, Option<usize>, TaskState, bool)],
    global: bool,
) -> Vec<Task> {
    raw.iter()
        .enumerate()
        .map(|(i, (slot, node, state, live))| {
            let node = node.map(|n| format!("n{n}"));
            task(
                &format!("t{i}"),
                svc,
                (!global).then_some(*slot),
                node.as_deref(),
                *state,
                if *live {
                    DesiredState::Running
                } else {
                    DesiredState::Shutdown
                },
            )
        })
        .collect()
}

proptest! {
    /// One pass converges: after applying its actions, a second pass has
    /// nothing to do; and exactly `replicas` slots are live, numbered from 1
    /// up, one task each.
    #[test]
    fn replicated_converges_in_one_pass(
        nodes in arb_nodes(),
        raw in arb_tasks(),
        replicas in 0u64..10,
        policy in arb_policy(),
    ) {
        let svc = service("web", ServiceMode::Replicated { replicas }, policy, Vec::new());
        let mut tasks = build_tasks(&svc, &raw, false);
        let actions = reconcile(&svc, &tasks, &nodes).expect("reconcile");
        apply(&mut tasks, &actions, &mut 0);
        let again = reconcile(&svc, &tasks, &nodes).expect("reconcile");
        prop_assert!(again.is_empty(), "second pass: {}", render(&again));
        let live: Vec<u64> = tasks
            .iter()
            .filter(|t| t.desired_state == DesiredState::Running)
            .filter_map(|t| t.slot)
            .collect();
        let distinct: BTreeSet<u64> = live.iter().copied().collect();
        prop_assert_eq!(distinct.len(), live.len(), "one live task per slot");
        prop_assert_eq!(live.len() as u64, replicas);
        // No live, unfinished task is left on a node that is down, drained or gone.
        for t in tasks.iter().filter(|t| t.desired_state == DesiredState::Running && !t.status.state.is_terminal()) {
            prop_assert!(replicated::node_loss(t, &nodes).is_none());
        }
    }

    /// Global: one pass converges, and afterwards every eligible node has
    /// exactly one live task, and no live unfinished task is on a node that
    /// is down, drained, gone or fails the constraints.
    #[test]
    fn global_converges_in_one_pass(
        nodes in arb_nodes(),
        raw in arb_tasks(),
        constrained in any::<bool>(),
        policy in arb_policy(),
    ) {
        let constraints = if constrained {
            vec![Constraint::parse("node.labels.zone==eu").expect("valid")]
        } else {
            Vec::new()
        };
        let svc = service("agent", ServiceMode::Global, policy, constraints.clone());
        let mut tasks = build_tasks(&svc, &raw, true);
        let actions = reconcile(&svc, &tasks, &nodes).expect("reconcile");
        apply(&mut tasks, &actions, &mut 0);
        let again = reconcile(&svc, &tasks, &nodes).expect("reconcile");
        prop_assert!(again.is_empty(), "second pass: {}", render(&again));
        for n in &nodes {
            let live = tasks
                .iter()
                .filter(|t| t.desired_state == DesiredState::Running && t.node.as_ref() == Some(&n.id))
                .count();
            let eligible = n.takes_new_tasks() && constraints.iter().all(|c| c.matches(n));
            if eligible {
                prop_assert_eq!(live, 1, "node {}", n.id);
            } else {
                prop_assert!(live <= 1, "node {}", n.id);
            }
        }
        for t in tasks.iter().filter(|t| t.desired_state == DesiredState::Running && !t.status.state.is_terminal()) {
            let node = t.node.as_ref().and_then(|id| nodes.iter().find(|n| &n.id == id));
            prop_assert!(node.is_some());
            prop_assert!(replicated::node_loss(t, &nodes).is_none());
            prop_assert!(node.is_some_and(|n| constraints.iter().all(|c| c.matches(n))));
        }
    }
}
