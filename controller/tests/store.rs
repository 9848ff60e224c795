//! The store: apply scenarios, determinism properties, the log on memory and
//! on disk, recovery after `kill -9`, and watches.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use gantry_controller::model::{
    Availability, DesiredState, NodeId, NodeSpec, NodeState, NodeStatus, ServiceId, ServiceMode,
    ServiceSpec, Task, TaskId, TaskState, TaskStatus, TaskTemplate,
};
use gantry_controller::network::Addressing;
use gantry_controller::scheduler::Assignment;
use gantry_controller::store::{
    Command, DesiredStateChange, Entry, EventKind, HardState, Log, LogError, MemLog, Object,
    PendingTask, RedbLog, SnapshotRecord, StateMachine, Store, StoreConfig, StoreError, WatchError,
    command,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Helpers

fn node_id(s: &str) -> NodeId {
    NodeId::new(s).expect("valid node id")
}

fn service_id(s: &str) -> ServiceId {
    ServiceId::new(s).expect("valid service id")
}

fn task_id(s: &str) -> TaskId {
    TaskId::new(s).expect("valid task id")
}

fn spec(name: &str, replicas: u64) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        stack: "demo".into(),
        mode: ServiceMode::Replicated { replicas },
        task: TaskTemplate {
            image: "busybox".into(),
            ..TaskTemplate::default()
        },
        update_config: None,
        endpoint_mode: Default::default(),
        depends_on: Default::default(),
    }
}

fn new_task(id: &str, service: &str, slot: u64) -> Task {
    Task {
        id: task_id(id),
        service: service_id(service),
        slot: Some(slot),
        node: None,
        spec_version: 1,
        spec: spec(service, 1).task,
        desired_state: DesiredState::Running,
        status: TaskStatus::default(),
        generation: 0,
        version: 0,
        service_name: format!("demo_{service}"),
        attempt: 0,
        not_before_unix_ms: None,
        address: None,
    }
}

fn upsert(node: &str) -> Command {
    Command::UpsertNode {
        node: node_id(node),
        spec: NodeSpec::default(),
    }
}

fn report(task: &str, node: &str, state: TaskState) -> Command {
    Command::UpdateTaskStatus {
        task: task_id(task),
        node: node_id(node),
        status: TaskStatus {
            state,
            ..TaskStatus::default()
        },
    }
}

/// Applies `commands` from index 1; returns each result as `Ok(events)` or
/// the error's message.
fn run(sm: &mut StateMachine, commands: &[Command]) -> Vec<Result<usize, String>> {
    commands
        .iter()
        .map(|c| {
            let index = sm.applied_index() + 1;
            sm.apply(index, c)
                .map(|o| o.events.len())
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// A small cluster: node n1, service web with tasks t1 (and t2).
fn cluster() -> (StateMachine, Vec<Command>) {
    let commands = vec![
        upsert("n1"),
        Command::CreateService {
            service: service_id("web"),
            spec: spec("web", 2),
        },
        Command::CreateTasks {
            tasks: vec![new_task("t1", "web", 1), new_task("t2", "web", 2)],
        },
    ];
    let mut sm = StateMachine::new();
    for r in run(&mut sm, &commands) {
        r.expect("setup applies");
    }
    (sm, commands)
}

/// An edit names its node by id or by hostname, resolved at apply: the
/// node that has the name at that point of the log; an unknown name is
/// not found and a name two nodes share is refused, changing nothing.
#[test]
fn node_spec_edits_resolve_a_hostname_at_apply() {
    let named = |node: &str, hostname: &str| Command::UpdateNodeStatus {
        node: node_id(node),
        status: NodeStatus {
            hostname: hostname.to_string(),
            ..NodeStatus::default()
        },
    };
    let edit = |node: &str, v: &str| Command::EditNodeSpec {
        node: node.to_string(),
        availability: None,
        label_add: [("zone".to_string(), v.to_string())].into(),
        label_rm: Vec::new(),
        label_default: BTreeMap::new(),
    };
    let zone = |sm: &StateMachine, node: &str| {
        sm.node(&node_id(node))
            .unwrap()
            .spec
            .labels
            .get("zone")
            .cloned()
    };
    let mut sm = StateMachine::new();
    let setup = [
        upsert("a1"),
        upsert("b2"),
        named("a1", "web-1"),
        named("b2", "web-2"),
    ];
    for r in run(&mut sm, &setup) {
        r.expect("setup applies");
    }
    run(&mut sm, &[edit("web-2", "eu")])[0]
        .clone()
        .expect("by hostname");
    assert_eq!(zone(&sm, "b2").as_deref(), Some("eu"));
    assert_eq!(zone(&sm, "a1"), None);
    run(&mut sm, &[edit("a1", "us")])[0].clone().expect("by id");
    assert_eq!(zone(&sm, "a1").as_deref(), Some("us"));
    let err = run(&mut sm, &[edit("web-9", "x")])[0].clone().unwrap_err();
    assert!(err.contains("web-9") && err.contains("not found"), "{err}");
    // The name moves: the next edit by it lands on the node that has it now.
    run(&mut sm, &[named("b2", "web-1")])[0]
        .clone()
        .expect("rename");
    let before = sm.clone();
    let err = run(&mut sm, &[edit("web-1", "x")])[0].clone().unwrap_err();
    assert!(err.contains("shared by 2 nodes"), "{err}");
    assert_eq!(zone(&sm, "a1"), zone(&before, "a1"));
    assert_eq!(zone(&sm, "b2"), zone(&before, "b2"));
    run(&mut sm, &[named("a1", "db-1"), edit("web-1", "ap")])
        .into_iter()
        .for_each(|r| {
            r.expect("applies");
        });
    assert_eq!(zone(&sm, "b2").as_deref(), Some("ap"));
    assert_eq!(zone(&sm, "a1").as_deref(), Some("us"));
}

/// Two `UpdateNode` edits of different labels, proposed from the same read
/// of the node, both survive: each is applied to the node as the log has
/// it (the linearizability test found the earlier whole-spec upsert losing
/// one of them).
#[test]
fn node_spec_edits_of_different_labels_both_survive() {
    let (mut sm, _) = cluster();
    let edit = |k: &str, v: &str| Command::EditNodeSpec {
        node: "n1".to_string(),
        availability: None,
        label_add: [(k.to_string(), v.to_string())].into(),
        label_rm: Vec::new(),
        label_default: BTreeMap::new(),
    };
    for r in run(&mut sm, &[edit("a", "1"), edit("b", "2"), edit("a", "3")]) {
        r.expect("edit applies");
    }
    let labels = &sm.node(&node_id("n1")).unwrap().spec.labels;
    assert_eq!(labels.get("a").map(String::as_str), Some("3"));
    assert_eq!(labels.get("b").map(String::as_str), Some("2"));
    let drop_b = Command::EditNodeSpec {
        node: "n1".to_string(),
        availability: Some(Availability::Drain),
        label_add: BTreeMap::new(),
        label_rm: vec!["b".into()],
        label_default: BTreeMap::new(),
    };
    run(&mut sm, &[drop_b])[0].clone().expect("edit applies");
    let n1 = sm.node(&node_id("n1")).unwrap();
    assert_eq!(n1.spec.availability, Availability::Drain);
    assert!(!n1.spec.labels.contains_key("b"));
    let missing = Command::EditNodeSpec {
        node: "n9".to_string(),
        availability: None,
        label_add: BTreeMap::new(),
        label_rm: Vec::new(),
        label_default: BTreeMap::new(),
    };
    let err = run(&mut sm, &[missing])[0].clone().unwrap_err();
    assert!(err.contains("n9"), "{err}");
    // An agent's labels at registration fill only what the node lacks: an
    // operator's edit applied just before keeps its value.
    let register = Command::EditNodeSpec {
        node: "n1".to_string(),
        availability: None,
        label_add: BTreeMap::new(),
        label_rm: Vec::new(),
        label_default: [("a", "agent"), ("zone", "z1")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
    };
    run(&mut sm, &[register])[0].clone().expect("edit applies");
    let labels = &sm.node(&node_id("n1")).unwrap().spec.labels;
    assert_eq!(labels.get("a").map(String::as_str), Some("3"));
    assert_eq!(labels.get("zone").map(String::as_str), Some("z1"));
}

// ---------------------------------------------------------------------------
// Apply scenarios

/// The time of a task's last state change comes from the command that made
/// it: the scheduler's clock for pending and assigned, the agent's for what
/// it reports; a report that repeats the state keeps the time.
#[test]
fn state_changes_carry_the_time_in_the_command() {
    let (mut sm, _) = cluster();
    let stamped = |state, at| Command::UpdateTaskStatus {
        task: task_id("t1"),
        node: node_id("n1"),
        status: TaskStatus {
            state,
            timestamp_unix_ms: Some(at),
            ..TaskStatus::default()
        },
    };
    let results = run(
        &mut sm,
        &[
            Command::MarkTasksPending {
                tasks: vec![PendingTask {
                    task: task_id("t2"),
                    message: "no node fits".into(),
                }],
                at_unix_ms: Some(1_000),
            },
            // Only the reason changes: the task has been pending since 1000.
            Command::MarkTasksPending {
                tasks: vec![PendingTask {
                    task: task_id("t2"),
                    message: "still no node fits".into(),
                }],
                at_unix_ms: Some(1_500),
            },
            Command::AssignTasks {
                assignments: vec![Assignment {
                    task: task_id("t1"),
                    node: node_id("n1"),
                }],
                at_unix_ms: Some(2_000),
            },
        ],
    );
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let time = |sm: &StateMachine, id: &str| {
        sm.task(&task_id(id))
            .expect("task")
            .status
            .timestamp_unix_ms
    };
    assert_eq!(time(&sm, "t2"), Some(1_000));
    assert_eq!(time(&sm, "t1"), Some(2_000));
    run(&mut sm, &[stamped(TaskState::Running, 3_000)]);
    assert_eq!(time(&sm, "t1"), Some(3_000));
    let resent = run(&mut sm, &[stamped(TaskState::Running, 4_000)]);
    assert_eq!(resent, [Ok(0)], "a resent report changes nothing");
    assert_eq!(time(&sm, "t1"), Some(3_000));
}

#[test]
fn a_task_goes_from_creation_to_removal() {
    let (mut sm, _) = cluster();
    let results = run(
        &mut sm,
        &[
            Command::MarkTasksPending {
                tasks: vec![PendingTask {
                    task: task_id("t2"),
                    message: "no node has 2 GiB memory free (1 node)".into(),
                }],
                at_unix_ms: None,
            },
            Command::AssignTasks {
                assignments: vec![Assignment {
                    task: task_id("t1"),
                    node: node_id("n1"),
                }],
                at_unix_ms: None,
            },
            report("t1", "n1", TaskState::Running),
            report("t1", "n1", TaskState::Running),
            Command::SetTaskDesiredState {
                changes: vec![DesiredStateChange {
                    task: task_id("t1"),
                    desired_state: DesiredState::Shutdown,
                }],
            },
            report("t1", "n1", TaskState::Shutdown),
            Command::RemoveTasks {
                tasks: vec![task_id("t1")],
            },
        ],
    );
    // The repeated report changes nothing, so it makes no event.
    assert_eq!(
        results,
        vec![Ok(1), Ok(1), Ok(1), Ok(0), Ok(1), Ok(1), Ok(1)]
    );
    assert!(sm.task(&task_id("t1")).is_none());
    let t2 = sm.task(&task_id("t2")).expect("t2 stays");
    assert_eq!(t2.status.state, TaskState::Pending);
    assert_eq!(t2.status.message, "no node has 2 GiB memory free (1 node)");
    assert_eq!(t2.version, 4);
    assert_eq!(sm.applied_index(), 10);
    assert_eq!(sm.tasks_of_service(&service_id("web")).count(), 1);
    assert_eq!(sm.tasks_on_node(&node_id("n1")).count(), 0);
}

#[test]
fn assignment_bumps_generation_and_indexes_the_node() {
    let (mut sm, _) = cluster();
    let results = run(
        &mut sm,
        &[Command::AssignTasks {
            assignments: vec![
                Assignment {
                    task: task_id("t1"),
                    node: node_id("n1"),
                },
                Assignment {
                    task: task_id("t2"),
                    node: node_id("n1"),
                },
            ],
            at_unix_ms: None,
        }],
    );
    assert_eq!(results, vec![Ok(2)]);
    let on_n1: Vec<_> = sm
        .tasks_on_node(&node_id("n1"))
        .map(|t| (t.id.to_string(), t.status.state, t.generation, t.version))
        .collect();
    assert_eq!(
        on_n1,
        vec![
            ("t1".into(), TaskState::Assigned, 1, 4),
            ("t2".into(), TaskState::Assigned, 1, 4)
        ]
    );
}

#[test]
fn service_updates_bump_spec_version_only_on_change() {
    let (mut sm, _) = cluster();
    let results = run(
        &mut sm,
        &[
            Command::UpdateService {
                service: service_id("web"),
                spec: spec("web", 2),
                expected_spec_version: None,
            },
            Command::UpdateService {
                service: service_id("web"),
                spec: spec("web", 5),
                expected_spec_version: Some(1),
            },
            Command::UpdateService {
                service: service_id("web"),
                spec: spec("web", 6),
                expected_spec_version: Some(1),
            },
        ],
    );
    assert_eq!(
        results,
        vec![
            Ok(0),
            Ok(1),
            Err(
                "update-service: service web field spec_version: expected 1 but the service \
                 is at 2 (updated concurrently)"
                    .into()
            )
        ]
    );
    let web = sm.service(&service_id("web")).expect("exists");
    assert_eq!((web.spec_version, web.version), (2, 5));
    assert_eq!(web.spec.mode, ServiceMode::Replicated { replicas: 5 });
}

/// Each refusal names the command, the object and the field.
#[test]
fn refusals_name_the_object_and_field() {
    let cases: Vec<(Command, &str)> = vec![
        (
            Command::RemoveNode {
                node: node_id("ghost"),
            },
            "remove-node: node ghost not found",
        ),
        (
            Command::CreateService {
                service: service_id("web"),
                spec: spec("web", 1),
            },
            "create-service: service web already exists",
        ),
        (
            Command::CreateService {
                service: service_id("api"),
                spec: ServiceSpec {
                    task: TaskTemplate::default(),
                    ..spec("api", 1)
                },
            },
            "create-service: service api field spec.task.image: must not be empty",
        ),
        (
            Command::CreateTasks {
                tasks: vec![new_task("t3", "web", 3), new_task("t3", "web", 4)],
            },
            "create-tasks: task t3 field id: appears twice in the batch",
        ),
        (
            Command::CreateTasks {
                tasks: vec![new_task("t3", "nope", 1)],
            },
            "create-tasks: task t3 field service: service nope not found",
        ),
        (
            Command::CreateTasks {
                tasks: vec![Task {
                    spec_version: 9,
                    ..new_task("t3", "web", 3)
                }],
            },
            "create-tasks: task t3 field spec_version: 9 is newer than service web's \
             spec_version 1",
        ),
        (
            Command::AssignTasks {
                assignments: vec![Assignment {
                    task: task_id("t1"),
                    node: node_id("n9"),
                }],
                at_unix_ms: None,
            },
            "assign-tasks: task t1 field node: node n9 not found",
        ),
        (
            report("t1", "n1", TaskState::Running),
            "update-task-status: task t1 field node: reported by node n1 but the task is on \
             no node",
        ),
        (
            Command::RemoveTasks {
                tasks: vec![task_id("t1")],
            },
            "remove-tasks: task t1 field desired_state: only a task desired shutdown can be \
             removed",
        ),
    ];
    for (command, want) in cases {
        let (mut sm, _) = cluster();
        let before = sm.snapshot();
        let err = sm
            .apply(4, &command)
            .map(|_| ())
            .expect_err("must be refused");
        assert!(err.is_refusal());
        assert_eq!(err.to_string(), want);
        // The index is used up; nothing else changed.
        assert_eq!(sm.applied_index(), 4);
        let after = sm.snapshot();
        assert_eq!(
            (after.nodes, after.services, after.tasks),
            (before.nodes, before.services, before.tasks)
        );
    }
}

#[test]
fn agent_reports_never_move_a_task_backwards() {
    let (mut sm, _) = cluster();
    let results = run(
        &mut sm,
        &[
            Command::AssignTasks {
                assignments: vec![Assignment {
                    task: task_id("t1"),
                    node: node_id("n1"),
                }],
                at_unix_ms: None,
            },
            report("t1", "n1", TaskState::Failed),
            report("t1", "n1", TaskState::Running),
            report("t1", "n2", TaskState::Failed),
        ],
    );
    assert_eq!(
        results,
        vec![
            Ok(1),
            Ok(1),
            Err("update-task-status: task t1: state cannot move from failed to running".into()),
            Err(
                "update-task-status: task t1 field node: reported by node n2 but the task is \
                 on node n1"
                    .into()
            ),
        ]
    );
}

#[test]
fn desired_state_never_goes_back_to_running() {
    let (mut sm, _) = cluster();
    let change = |d| Command::SetTaskDesiredState {
        changes: vec![DesiredStateChange {
            task: task_id("t1"),
            desired_state: d,
        }],
    };
    let results = run(
        &mut sm,
        &[
            change(DesiredState::Shutdown),
            change(DesiredState::Running),
        ],
    );
    assert_eq!(
        results,
        vec![
            Ok(1),
            Err(
                "set-task-desired-state: task t1 field desired_state: cannot move from shutdown \
                 back to running"
                    .into()
            )
        ]
    );
    assert_eq!(sm.task(&task_id("t1")).map(|t| t.generation), Some(1));
}

#[test]
fn out_of_order_and_undecodable_entries_are_not_refusals() {
    let mut sm = StateMachine::new();
    let err = sm.apply(2, &upsert("n1")).map(|_| ()).expect_err("gap");
    assert!(!err.is_refusal());
    assert_eq!(
        err.to_string(),
        "log index 2 applied out of order: expected 1"
    );
    let err = sm
        .apply_entry(1, br#"{"v":2,"command":{}}"#)
        .map(|_| ())
        .expect_err("future version");
    assert!(!err.is_refusal());
    assert_eq!(
        err.to_string(),
        "log index 1: command encoding version 2 is not supported (this build reads version 1)"
    );
    assert_eq!(sm.applied_index(), 0, "nothing was consumed");
    // An empty entry is Raft's no-op: it only moves the index.
    let outcome = sm.apply_entry(1, b"").expect("no-op applies");
    assert!(outcome.events.is_empty());
    assert_eq!(sm.applied_index(), 1);
}

#[test]
fn commands_have_a_stable_versioned_encoding() {
    let bytes = command::encode(&upsert("n1")).expect("encodes");
    assert_eq!(
        String::from_utf8(bytes.clone()).expect("utf-8"),
        r#"{"v":1,"command":{"type":"upsert-node","node":"n1","spec":{"availability":"active","role":"worker","labels":{}}}}"#
    );
    assert_eq!(command::decode(&bytes).expect("decodes"), upsert("n1"));
}

// ---------------------------------------------------------------------------
// Fixture scenarios: controller/testdata/store/*.yaml

#[derive(serde::Deserialize)]
struct Scenario {
    steps: Vec<Step>,
    state: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Step {
    command: Command,
    #[serde(default)]
    events: Option<Vec<String>>,
    #[serde(default)]
    error: Option<String>,
}

fn lower(value: impl std::fmt::Debug) -> String {
    format!("{value:?}").to_lowercase()
}

/// One line per object, in id order, as the fixtures write the state.
fn state_lines(sm: &StateMachine) -> Vec<String> {
    let nodes = sm.nodes().map(|n| {
        format!(
            "node {} v{} {} {}",
            n.id,
            n.version,
            lower(n.status.state),
            lower(n.spec.availability)
        )
    });
    let services = sm.services().map(|s| {
        format!(
            "service {} v{} spec_version={}",
            s.id, s.version, s.spec_version
        )
    });
    let tasks = sm.tasks().map(|t| {
        let mut line = format!(
            "task {} v{} node={} {} desired={} gen={}",
            t.id,
            t.version,
            t.node.as_ref().map_or("-", |n| n.as_str()),
            t.status.state,
            lower(t.desired_state),
            t.generation
        );
        if !t.status.message.is_empty() {
            line.push_str(&format!(" {:?}", t.status.message));
        }
        line
    });
    nodes.chain(services).chain(tasks).collect()
}

#[test]
fn fixture_scenarios() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/store");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("testdata/store exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    for file in files {
        let name = file.display().to_string();
        let text = std::fs::read_to_string(&file).expect("read fixture");
        let scenario: Scenario =
            serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut sm = StateMachine::new();
        for (i, step) in scenario.steps.iter().enumerate() {
            let index = sm.applied_index() + 1;
            let got = sm.apply(index, &step.command).map(|o| {
                o.events
                    .iter()
                    .map(|e| format!("{} {} {}", lower(e.kind), e.object.kind(), e.object.id()))
                    .collect::<Vec<_>>()
            });
            match (&step.error, &step.events, got) {
                (Some(want), None, Err(e)) => assert_eq!(&e.to_string(), want, "{name} step {i}"),
                (None, Some(want), Ok(events)) => assert_eq!(&events, want, "{name} step {i}"),
                (_, _, got) => panic!(
                    "{name} step {i} ({}): got {got:?}, want events {:?} or error {:?}",
                    step.command.name(),
                    step.events,
                    step.error
                ),
            }
        }
        assert_eq!(state_lines(&sm), scenario.state, "{name}: final state");
    }
}

// ---------------------------------------------------------------------------
// Properties

const NODES: &[&str] = &["n0", "n1", "n2"];
const SERVICES: &[&str] = &["s0", "s1"];
const TASKS: &[&str] = &["t0", "t1", "t2", "t3", "t4"];

fn any_task_state() -> impl Strategy<Value = TaskState> {
    prop::sample::select(vec![
        TaskState::New,
        TaskState::Pending,
        TaskState::Assigned,
        TaskState::Accepted,
        TaskState::Running,
        TaskState::Complete,
        TaskState::Failed,
        TaskState::Shutdown,
    ])
}

/// The random commands after a fixed setup (every node, service and task
/// of the small universe exists), so that task commands mostly apply
/// instead of mostly being refused.
/// A plan with room for four node subnets and 14 VIPs, so that random logs
/// run into exhaustion.
fn small_addressing() -> Addressing {
    Addressing {
        cluster_cidr: "10.42.0.0/22".parse().expect("valid"),
        service_cidr: "10.43.0.0/28".parse().expect("valid"),
    }
}

fn any_log() -> impl Strategy<Value = Vec<Command>> {
    (prop::collection::vec(any_command(), 0..60), prop::bool::ANY).prop_map(|(random, plan)| {
        // Half the logs set the address plan first, half on the way (the
        // objects that exist then get their allocations).
        let mut log: Vec<Command> = Vec::new();
        if plan {
            log.push(Command::SetAddressing {
                addressing: small_addressing(),
            });
        }
        log.extend(NODES.iter().map(|n| upsert(n)));
        log.extend(SERVICES.iter().map(|s| Command::CreateService {
            service: service_id(s),
            spec: spec(s, 2),
        }));
        log.push(Command::CreateTasks {
            tasks: TASKS
                .iter()
                .enumerate()
                .map(|(i, t)| new_task(t, SERVICES[i % SERVICES.len()], 1))
                .collect(),
        });
        log.extend(random);
        log
    })
}

fn any_command() -> impl Strategy<Value = Command> {
    let node = prop::sample::select(NODES).prop_map(node_id);
    let service = prop::sample::select(SERVICES).prop_map(service_id);
    let task = prop::sample::select(TASKS).prop_map(task_id);
    let new_task = (
        prop::sample::select(TASKS),
        prop::sample::select(SERVICES),
        prop::option::of(prop::sample::select(NODES)),
        prop::bool::ANY,
    )
        .prop_map(|(t, s, n, pending)| {
            let mut task = new_task(t, s, 1);
            task.node = n.map(node_id);
            if pending {
                task.status.state = TaskState::Pending;
            }
            task
        });
    prop_oneof![
        (node.clone(), prop::bool::ANY).prop_map(|(node, drain)| Command::UpsertNode {
            node,
            spec: NodeSpec {
                availability: if drain {
                    Availability::Drain
                } else {
                    Availability::Active
                },
                ..NodeSpec::default()
            },
        }),
        node.clone().prop_map(|node| Command::RemoveNode { node }),
        (node.clone(), prop::bool::ANY).prop_map(|(node, up)| Command::UpdateNodeStatus {
            node,
            status: NodeStatus {
                state: if up {
                    NodeState::Ready
                } else {
                    NodeState::Down
                },
                ..NodeStatus::default()
            },
        }),
        (service.clone(), 0u64..4).prop_map(|(service, r)| Command::CreateService {
            spec: spec(service.as_str(), r),
            service,
        }),
        (service.clone(), 0u64..4, prop::option::of(0u64..3)).prop_map(|(service, r, e)| {
            Command::UpdateService {
                spec: spec(service.as_str(), r),
                service,
                expected_spec_version: e,
            }
        }),
        service.prop_map(|service| Command::RemoveService { service }),
        prop::collection::vec(new_task, 1..3).prop_map(|tasks| Command::CreateTasks { tasks }),
        prop::collection::vec((task.clone(), prop::bool::ANY), 1..3).prop_map(|c| {
            Command::SetTaskDesiredState {
                changes: c
                    .into_iter()
                    .map(|(task, stop)| DesiredStateChange {
                        task,
                        desired_state: if stop {
                            DesiredState::Shutdown
                        } else {
                            DesiredState::Running
                        },
                    })
                    .collect(),
            }
        }),
        (task.clone(), node.clone(), any_task_state()).prop_map(|(task, node, state)| {
            Command::UpdateTaskStatus {
                task,
                node,
                status: TaskStatus {
                    state,
                    ..TaskStatus::default()
                },
            }
        }),
        task.clone().prop_map(|task| Command::MarkTasksPending {
            tasks: vec![PendingTask {
                task,
                message: "no nodes in the cluster".into(),
            }],
            at_unix_ms: None,
        }),
        prop::collection::vec((task.clone(), node), 1..3).prop_map(|a| Command::AssignTasks {
            assignments: a
                .into_iter()
                .map(|(task, node)| Assignment { task, node })
                .collect(),
            at_unix_ms: None,
        }),
        prop::collection::vec(task, 1..3).prop_map(|tasks| Command::RemoveTasks { tasks }),
        Just(Command::SetAddressing {
            addressing: small_addressing(),
        }),
    ]
}

/// Applies `commands` from index 1 through the byte encoding (as a replica
/// would), ignoring refusals.
fn replay(sm: &mut StateMachine, commands: &[Command]) {
    for c in commands {
        let index = sm.applied_index() + 1;
        let bytes = command::encode(c).expect("encodes");
        if let Err(e) = sm.apply_entry(index, &bytes) {
            assert!(e.is_refusal(), "unexpected error: {e}");
        }
    }
}

fn check_invariants(sm: &StateMachine) -> Result<(), TestCaseError> {
    // No address is held twice, and every task address is in the subnet of
    // its node while the node exists.
    let mut addresses = std::collections::BTreeSet::new();
    for task in sm.tasks() {
        if let Some(address) = task.address {
            prop_assert!(addresses.insert(address), "address {address} held twice");
            prop_assert_eq!(sm.task_at(address), Some(&task.id));
            if let Some(node) = task.node.as_ref().and_then(|n| sm.node(n)) {
                let subnet = node
                    .subnet
                    .expect("a node with addressed tasks has a subnet");
                prop_assert!(subnet.contains(address), "{address} not in {subnet}");
            }
        }
    }
    let mut subnets = std::collections::BTreeSet::new();
    for node in sm.nodes() {
        if let Some(subnet) = node.subnet {
            prop_assert!(subnets.insert(subnet), "subnet {subnet} held twice");
        }
    }
    let mut vips = std::collections::BTreeSet::new();
    for service in sm.services() {
        if let Some(vip) = service.virtual_ip {
            prop_assert!(vips.insert(vip), "vip {vip} held twice");
        }
    }
    for task in sm.tasks() {
        prop_assert!(task.version <= sm.applied_index());
        prop_assert!(sm.tasks_of_service(&task.service).any(|t| t.id == task.id));
        if let Some(node) = &task.node {
            prop_assert!(sm.tasks_on_node(node).any(|t| t.id == task.id));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Two replicas applying the same log reach the same state.
    #[test]
    fn same_log_same_state(commands in any_log()) {
        let mut a = StateMachine::new();
        let mut b = StateMachine::new();
        replay(&mut a, &commands);
        replay(&mut b, &commands);
        prop_assert_eq!(a.snapshot(), b.snapshot());
        prop_assert_eq!(a.applied_index(), commands.len() as u64);
        check_invariants(&a)?;
    }

    /// Restoring a snapshot taken anywhere and replaying the rest gives the
    /// state a full replay gives, secondary indexes included.
    #[test]
    fn snapshot_then_replay_equals_full_replay(
        commands in any_log(),
        cut in 0usize..70,
    ) {
        let cut = cut.min(commands.len());
        let mut full = StateMachine::new();
        replay(&mut full, &commands);

        let mut first = StateMachine::new();
        replay(&mut first, &commands[..cut]);
        let bytes = first.snapshot().encode().expect("encodes");
        let mut restored = StateMachine::new();
        restored.restore(gantry_controller::store::Snapshot::decode(&bytes).expect("decodes"));
        replay(&mut restored, &commands[cut..]);
        prop_assert_eq!(&restored, &full);
    }

    /// A refused command changes nothing but the applied index, and a
    /// command that succeeds stamps every object it touches with its index.
    #[test]
    fn refusals_change_nothing(commands in any_log()) {
        let mut sm = StateMachine::new();
        for c in &commands {
            let before = sm.clone();
            let index = sm.applied_index() + 1;
            match sm.apply(index, c) {
                Err(e) => {
                    prop_assert!(e.is_refusal());
                    let mut expected = before.clone();
                    expected.apply_entry(index, b"").expect("no-op");
                    prop_assert_eq!(&sm, &expected);
                }
                Ok(outcome) => {
                    for ev in &outcome.events {
                        prop_assert_eq!(ev.revision, index);
                        if ev.kind != EventKind::Deleted {
                            let version = match &*ev.object {
                                Object::Node(n) => n.version,
                                Object::Service(s) => s.version,
                                Object::Task(t) => t.version,
                            };
                            prop_assert_eq!(version, index);
                        }
                    }
                    // The address plan is no watched object: setting it
                    // changes state without an event (the controller sets
                    // it before it serves anyone who could watch).
                    let plan = matches!(c, Command::SetAddressing { .. });
                    if outcome.events.is_empty() && !plan {
                        let mut expected = before.clone();
                        expected.apply_entry(index, b"").expect("no-op");
                        prop_assert_eq!(&sm, &expected);
                    }
                }
            }
        }
    }

    /// A watch from any revision replays exactly the events the commands at
    /// that revision and later produced, in order; and a store reopened on
    /// the same log reaches the same state.
    #[test]
    fn watches_replay_exactly_what_was_applied(commands in any_log(), from in 1u64..80) {
        let mut store = Store::with_log(MemLog::new(), config(16, 10_000)).expect("store");
        let mut all = Vec::new();
        for c in &commands {
            if let Ok((_, outcome)) = store.propose(c) {
                all.extend(outcome.events);
            }
        }
        let expected: Vec<_> = all.iter().filter(|e| e.revision >= from).cloned().collect();
        let mut w = store.watch(from).expect("history is large enough");
        let mut got = Vec::new();
        while let Some(e) = w.try_recv().expect("not compacted") {
            got.push(e);
        }
        prop_assert_eq!(got, expected);

        let log = store.log().clone();
        let reopened = Store::with_log(log, config(16, 10_000)).expect("reopen");
        prop_assert_eq!(reopened.state(), store.state());
    }

    /// Every command survives the byte encoding unchanged.
    #[test]
    fn commands_round_trip(c in any_command()) {
        let bytes = command::encode(&c).expect("encodes");
        prop_assert_eq!(command::decode(&bytes).expect("decodes"), c);
    }
}

// ---------------------------------------------------------------------------
// The log, on memory and on disk

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("e{index}t{term}").into_bytes(),
        ..Entry::default()
    }
}

fn indexes(log: &impl Log) -> (u64, u64, Vec<(u64, u64)>) {
    let first = log.first_index().expect("first");
    let last = log.last_index().expect("last");
    let es = log
        .entries(first, last + 1)
        .expect("entries")
        .into_iter()
        .map(|e| (e.index, e.term))
        .collect();
    (first, last, es)
}

/// The behaviour both implementations must share (raft-rs storage rules).
fn log_contract(log: &mut impl Log) {
    assert_eq!(indexes(log), (1, 0, vec![]));
    log.append(&[entry(1, 1), entry(2, 1), entry(3, 1)])
        .expect("append");
    let err = log.append(&[entry(5, 1)]).expect_err("gap");
    assert_eq!(
        err.to_string(),
        "log append at index 5 does not follow on from last index 3"
    );
    // A new leader's entries replace a conflicting tail.
    log.append(&[entry(2, 2)]).expect("overwrite");
    assert_eq!(indexes(log), (1, 2, vec![(1, 1), (2, 2)]));
    assert_eq!(log.entries(2, 3).expect("read")[0].data, b"e2t2");
    log.append(&[entry(3, 2), entry(4, 2), entry(5, 2)])
        .expect("append");
    log.truncate_suffix(5).expect("truncate");
    assert_eq!(log.last_index().expect("last"), 4);

    let err = log.compact(2).expect_err("no snapshot yet");
    assert_eq!(
        err.to_string(),
        "cannot compact up to index 2: the snapshot only covers up to 0"
    );
    log.save_snapshot(SnapshotRecord {
        index: 3,
        term: 2,
        data: b"state".to_vec(),
        membership: Default::default(),
    })
    .expect("snapshot");
    log.compact(3).expect("compact");
    assert_eq!(indexes(log), (4, 4, vec![(4, 2)]));
    assert_eq!(log.term(3).expect("snapshot term"), 2);
    let err = log.entries(2, 4).expect_err("compacted");
    assert_eq!(
        err.to_string(),
        "log index 2 compacted: the first retained index is 4"
    );
    let err = log.append(&[entry(3, 3)]).expect_err("before the snapshot");
    assert!(matches!(err, LogError::Compacted { .. }), "{err}");

    // A snapshot from a leader that disagrees with the log replaces it.
    log.save_snapshot(SnapshotRecord {
        index: 4,
        term: 9,
        data: b"leader".to_vec(),
        membership: Default::default(),
    })
    .expect("install");
    assert_eq!(indexes(log), (5, 4, vec![]));
    assert_eq!(
        log.snapshot().expect("read").map(|s| s.data),
        Some(b"leader".to_vec())
    );

    assert_eq!(log.hard_state().expect("hs"), HardState::default());
    let hs = HardState {
        term: 9,
        vote: 2,
        commit: 4,
    };
    log.set_hard_state(hs).expect("set hs");
    assert_eq!(log.hard_state().expect("hs"), hs);
}

#[test]
fn mem_log_follows_the_contract() {
    log_contract(&mut MemLog::new());
}

#[test]
fn redb_log_follows_the_contract_and_persists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log.redb");
    {
        let mut log = RedbLog::open(&path).expect("open");
        log_contract(&mut log);
        log.append(&[entry(5, 9), entry(6, 9)]).expect("append");
    }
    let log = RedbLog::open(&path).expect("reopen");
    assert_eq!(indexes(&log), (5, 6, vec![(5, 9), (6, 9)]));
    assert_eq!(log.hard_state().expect("hs").commit, 4);
    assert_eq!(log.snapshot().expect("snap").map(|s| s.index), Some(4));
}

// ---------------------------------------------------------------------------
// The store

fn config(snapshot_every: u64, watch_history: usize) -> StoreConfig {
    StoreConfig {
        snapshot_every,
        watch_history,
    }
}

#[test]
fn store_recovers_from_snapshot_and_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = {
        let mut store = Store::open(dir.path(), config(4, 100)).expect("open");
        for i in 0..10 {
            let (index, _) = store.propose(&upsert(&format!("n{i}"))).expect("propose");
            assert_eq!(index, i + 1);
        }
        let err = store
            .propose(&Command::RemoveNode {
                node: node_id("ghost"),
            })
            .map(|_| ())
            .expect_err("refused");
        assert!(
            matches!(err, StoreError::Refused { index: 11, .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "command at index 11 refused: remove-node: node ghost not found"
        );
        // Snapshots at 4 and 8; entries 9.. remain in the log.
        assert_eq!(store.snapshot_index(), 8);
        assert_eq!(store.log().first_index().expect("first"), 9);
        store.state().clone()
    };
    let store = Store::open(dir.path(), config(4, 100)).expect("reopen");
    assert_eq!(store.state(), &expected);
    assert_eq!(store.revision(), 11);
    // The entries replayed after the snapshot can be watched again.
    let mut w = store.watch(9).expect("watch");
    let ev = w.try_recv().expect("ok").expect("an event");
    assert_eq!((ev.revision, ev.object.id()), (9, "n8"));
    let err = store.watch(8).map(|_| ()).expect_err("compacted");
    assert_eq!(
        err.to_string(),
        "revision 8 compacted, resync from snapshot at 11"
    );
}

#[test]
fn the_store_runs_on_the_memory_log_too() {
    let mut store = Store::with_log(MemLog::new(), config(3, 10)).expect("store");
    for n in ["a", "b", "c", "d"] {
        store.propose(&upsert(n)).expect("propose");
    }
    assert_eq!(store.state().nodes().count(), 4);
    assert_eq!(store.snapshot_index(), 3);
}

// ---------------------------------------------------------------------------
// Watches

#[test]
fn watch_replays_from_a_revision_then_follows() {
    let mut store = Store::with_log(MemLog::new(), config(0, 100)).expect("store");
    store.propose(&upsert("n1")).expect("1");
    store
        .propose(&Command::CreateService {
            service: service_id("web"),
            spec: spec("web", 1),
        })
        .expect("2");
    store
        .propose(&Command::CreateTasks {
            tasks: vec![new_task("t1", "web", 1), new_task("t2", "web", 2)],
        })
        .expect("3");

    let mut w = store.watch(2).expect("watch");
    let mut seen = Vec::new();
    while let Some(ev) = w.try_recv().expect("ok") {
        seen.push((
            ev.revision,
            ev.kind,
            ev.object.kind(),
            ev.object.id().to_string(),
        ));
    }
    assert_eq!(
        seen,
        vec![
            (2, EventKind::Created, "service", "web".to_string()),
            (3, EventKind::Created, "task", "t1".to_string()),
            (3, EventKind::Created, "task", "t2".to_string()),
        ]
    );

    // Live events reach a watcher blocked on another thread.
    let hub = store.hub().clone();
    let waiter = std::thread::spawn(move || {
        let mut w = hub.watch(4).expect("watch the future");
        w.recv()
            .map(|e| (e.revision, e.kind, e.object.id().to_string()))
    });
    store
        .propose(&Command::RemoveNode {
            node: node_id("n1"),
        })
        .expect("4");
    assert_eq!(
        waiter.join().expect("thread"),
        Ok((4, EventKind::Deleted, "n1".to_string()))
    );

    // Closing the store ends streams.
    let mut w = store.watch(5).expect("watch");
    drop(store);
    assert_eq!(w.recv(), Err(WatchError::Closed));
}

#[test]
fn watching_compacted_history_asks_for_a_resync() {
    let mut store = Store::with_log(MemLog::new(), config(0, 3)).expect("store");
    for n in ["a", "b", "c", "d", "e"] {
        store.propose(&upsert(n)).expect("propose");
    }
    // Events 3, 4, 5 are retained.
    assert_eq!(store.hub().oldest_watchable(), 3);
    let err = store.watch(2).map(|_| ()).expect_err("compacted");
    assert_eq!(
        err,
        WatchError::Compacted {
            requested: 2,
            snapshot_at: 5
        }
    );
    assert_eq!(
        err.to_string(),
        "revision 2 compacted, resync from snapshot at 5"
    );
    // A slow watcher whose unread events are evicted gets the same error.
    let mut slow = store.watch(3).expect("watch");
    for n in ["f", "g", "h"] {
        store.propose(&upsert(n)).expect("propose");
    }
    assert_eq!(
        slow.try_recv(),
        Err(WatchError::Compacted {
            requested: 3,
            snapshot_at: 8
        })
    );
}

#[test]
fn refused_commands_move_the_revision_without_events() {
    let mut store = Store::with_log(MemLog::new(), config(0, 10)).expect("store");
    let mut w = store.watch(1).expect("watch");
    let _ = store.propose(&Command::RemoveNode {
        node: node_id("ghost"),
    });
    store.propose(&upsert("n1")).expect("2");
    let ev = w.try_recv().expect("ok").expect("event");
    assert_eq!(ev.revision, 2);
    assert_eq!(w.try_recv(), Ok(None));
    assert_eq!(w.recv_timeout(Duration::from_millis(10)), Ok(None));
}

// ---------------------------------------------------------------------------
// Crash recovery: a child process proposes and prints what was acknowledged;
// the parent kills it with SIGKILL mid-stream and checks nothing was lost.

const CRASH_DIR: &str = "GANTRY_STORE_CRASH_DIR";
const CRASH_ROUND: &str = "GANTRY_STORE_CRASH_ROUND";

/// Not a test on its own: the body of the child process of
/// `nothing_acknowledged_is_lost_after_sigkill`, which re-runs this test
/// binary with `CRASH_DIR` set. Without it, it returns at once.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR) else {
        return;
    };
    let round = std::env::var(CRASH_ROUND).unwrap_or_default();
    let mut store = Store::open(&dir, config(5, 100)).expect("child opens the store");
    for i in 0.. {
        let node = format!("r{round}-n{i}");
        // Every seventh proposal is refused, to check refusals replay too.
        let command = if i % 7 == 6 {
            Command::RemoveNode {
                node: node_id(&format!("ghost-{round}-{i}")),
            }
        } else {
            upsert(&node)
        };
        match store.propose(&command) {
            Ok((index, _)) => println!("ack {index} {node}"),
            Err(StoreError::Refused { index, .. }) => println!("refused {index}"),
            Err(e) => panic!("child propose failed: {e}"),
        }
    }
}

#[test]
fn nothing_acknowledged_is_lost_after_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary path");
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    let mut refused = Vec::new();
    let mut proposals = 0u64;
    let started = Instant::now();
    for round in 0..3 {
        let mut child = Process::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CRASH_DIR, dir.path())
            .env(CRASH_ROUND, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut this_round = 0;
        // Kill at a different point each round, mid-stream.
        let kill_after = 23 + round * 11;
        while this_round < kill_after {
            let line = lines
                .next()
                .expect("child ended early")
                .expect("read child output");
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["ack", index, node] => {
                    acked.insert(index.parse().expect("index"), node.to_string());
                    this_round += 1;
                }
                ["refused", index] => refused.push(index.parse::<u64>().expect("index")),
                _ => continue, // libtest's own output
            }
            proposals += 1;
        }
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");

        let store = Store::open(dir.path(), config(5, 100)).expect("reopen after kill");
        for (index, node) in &acked {
            let found = store.state().node(&node_id(node));
            assert_eq!(
                found.map(|n| n.version),
                Some(*index),
                "acknowledged node {node} at index {index} lost in round {round}"
            );
        }
        let last = acked.keys().chain(&refused).max().copied().unwrap_or(0);
        assert!(store.revision() >= last, "revision went backwards");
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "crash test: {proposals} acknowledged proposals over 3 SIGKILLed children in {secs:.2}s"
    );
}

/// Proposals per second with an fsync each, and with group commit, on this
/// machine's disk (printed; run with `--nocapture`).
#[test]
fn proposal_throughput() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path(), StoreConfig::default()).expect("open");
    let n: u32 = 200;
    let started = Instant::now();
    for i in 0..n {
        store.propose(&upsert(&format!("n{i}"))).expect("propose");
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "store: {n} proposals, one fsync each, in {secs:.3}s = {:.0} proposals/s",
        f64::from(n) / secs
    );

    let batch: Vec<Command> = (0..50).map(|i| upsert(&format!("b{i}"))).collect();
    let rounds: u32 = 20;
    let started = Instant::now();
    for _ in 0..rounds {
        for (_, result) in store.propose_batch(&batch).expect("batch") {
            result.expect("applies");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let total = rounds * 50;
    eprintln!(
        "store: {total} proposals in batches of 50 in {secs:.3}s = {:.0} proposals/s",
        f64::from(total) / secs
    );
    assert_eq!(store.revision(), u64::from(n + total));
}

#[test]
fn a_batch_is_one_commit_of_independent_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut store = Store::open(dir.path(), config(2, 100)).expect("open");
        let results = store
            .propose_batch(&[
                upsert("a"),
                Command::RemoveNode {
                    node: node_id("ghost"),
                },
                upsert("b"),
            ])
            .expect("batch");
        let summary: Vec<_> = results
            .iter()
            .map(|(i, r)| {
                (
                    *i,
                    r.as_ref()
                        .map(|o| o.events.len())
                        .map_err(|e| e.to_string()),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (1, Ok(1)),
                (2, Err("remove-node: node ghost not found".to_string())),
                (3, Ok(1))
            ]
        );
        assert_eq!(store.snapshot_index(), 3);
    }
    let store = Store::open(dir.path(), config(2, 100)).expect("reopen");
    assert_eq!(store.state().nodes().count(), 2);
    assert_eq!(store.revision(), 3);
}

#[test]
fn watching_from_zero_means_from_now_on() {
    let mut store = Store::with_log(MemLog::new(), config(0, 10)).expect("store");
    store.propose(&upsert("old")).expect("1");
    let mut w = store.watch(0).expect("watch");
    assert_eq!(w.start_revision(), 2);
    store.propose(&upsert("new")).expect("2");
    let ev = w.try_recv().expect("ok").expect("event");
    assert_eq!((ev.revision, ev.object.id()), (2, "new"));
}

/// Two controllers on one data directory would interleave their logs; the
/// second is refused while the first holds it (redb's exclusive file lock).
#[test]
fn a_second_store_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Store::open(dir.path(), StoreConfig::default()).expect("open");
    let err = Store::open(dir.path(), StoreConfig::default())
        .map(|_| ())
        .expect_err("second open must fail");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "log database {}",
            dir.path().join("log.redb").display()
        )),
        "{message}"
    );
    eprintln!("second open: {message}");
}
