//! Scenario tests from `testdata/scheduler/*.yaml` (expected plans in
//! `*.expected`; run with `UPDATE_EXPECT=1` to rewrite them) and property tests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde::Deserialize;

use super::Strategy as Scoring;
use super::*;
use crate::model::{
    Availability, Constraint, DesiredState, Node, NodeRole, NodeSpec, NodeState, NodeStatus,
    Placement, Platform, PortConfig, Protocol, PublishMode, ResourceRequirements, Resources,
    ServiceId, Task, TaskId, TaskState, TaskStatus, TaskTemplate,
};
use proptest::strategy::Strategy;

// ---------------------------------------------------------------------------
// Fixtures (shared with the orchestrator's tests)

/// A node as fixtures write it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FixtureNode {
    id: String,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default = "ready")]
    state: NodeState,
    #[serde(default)]
    availability: Availability,
    #[serde(default)]
    role: NodeRole,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default = "four")]
    cpus: f64,
    #[serde(default = "eight_gib")]
    memory: String,
    #[serde(default = "amd64")]
    arch: String,
}

fn ready() -> NodeState {
    NodeState::Ready
}
fn four() -> f64 {
    4.0
}
fn eight_gib() -> String {
    "8GiB".into()
}
fn amd64() -> String {
    "amd64".into()
}

impl FixtureNode {
    pub(crate) fn build(&self) -> Node {
        Node {
            id: self.id.parse().expect("fixture node id"),
            spec: NodeSpec {
                availability: self.availability,
                role: self.role,
                labels: self.labels.clone(),
            },
            status: NodeStatus {
                state: self.state,
                address: format!("10.0.0.{}", self.id.len()),
                hostname: self.hostname.clone().unwrap_or_else(|| self.id.clone()),
                resources: Resources {
                    nano_cpus: (self.cpus * 1e9) as u64,
                    memory_bytes: parse_bytes(&self.memory),
                },
                platform: Platform {
                    os: "linux".into(),
                    arch: self.arch.clone(),
                },
            },
            version: 1,
            subnet: None,
        }
    }
}

/// `512MiB`, `2GiB`, `100` → bytes.
pub(crate) fn parse_bytes(text: &str) -> u64 {
    let t = text.trim();
    for (suffix, mult) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if let Some(n) = t.strip_suffix(suffix) {
            return (n.trim().parse::<f64>().expect("fixture size") * mult as f64) as u64;
        }
    }
    t.parse().expect("fixture size")
}

/// What a fixture task needs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FixtureNeeds {
    #[serde(default)]
    cpus: f64,
    #[serde(default)]
    memory: Option<String>,
    #[serde(default)]
    constraints: Vec<String>,
    /// `8080/tcp` style host-mode published ports.
    #[serde(default)]
    host_ports: Vec<String>,
    #[serde(default)]
    max_per_node: Option<u64>,
}

impl FixtureNeeds {
    pub(crate) fn template(&self) -> TaskTemplate {
        TaskTemplate {
            image: "busybox".into(),
            resources: ResourceRequirements {
                limits: Resources::default(),
                reservations: Resources {
                    nano_cpus: (self.cpus * 1e9) as u64,
                    memory_bytes: self.memory.as_deref().map_or(0, parse_bytes),
                },
            },
            placement: Placement {
                constraints: self
                    .constraints
                    .iter()
                    .map(|c| Constraint::parse(c).expect("fixture constraint"))
                    .collect(),
                max_replicas_per_node: self.max_per_node,
            },
            ports: self
                .host_ports
                .iter()
                .map(|p| {
                    let (port, proto) = p.split_once('/').unwrap_or((p, "tcp"));
                    PortConfig {
                        published: Some(port.parse().expect("fixture port")),
                        target: 80,
                        protocol: if proto == "udp" {
                            Protocol::Udp
                        } else {
                            Protocol::Tcp
                        },
                        mode: PublishMode::Host,
                    }
                })
                .collect(),
            ..TaskTemplate::default()
        }
    }
}

/// Tasks already on nodes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureExisting {
    id: String,
    service: String,
    node: String,
    #[serde(default = "running")]
    state: TaskState,
    #[serde(flatten)]
    needs: FixtureNeeds,
}

fn running() -> TaskState {
    TaskState::Running
}

/// A group of tasks to place: `ids`, or `count` tasks named `SERVICE.N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureBatch {
    service: String,
    /// Pins the tasks to one node, as a global service's tasks are.
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    count: usize,
    #[serde(flatten)]
    needs: FixtureNeeds,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SchedulerFixture {
    #[serde(default)]
    strategy: Scoring,
    nodes: Vec<FixtureNode>,
    #[serde(default)]
    existing: Vec<FixtureExisting>,
    batch: Vec<FixtureBatch>,
}

fn task(id: &str, service: &str, node: Option<&str>, state: TaskState, spec: TaskTemplate) -> Task {
    Task {
        id: id.parse().expect("task id"),
        service: service.parse().expect("service id"),
        slot: None,
        node: node.map(|n| n.parse().expect("node id")),
        spec_version: 1,
        spec,
        desired_state: DesiredState::Running,
        status: TaskStatus {
            state,
            ..TaskStatus::default()
        },
        generation: 1,
        version: 1,
        service_name: String::new(),
        attempt: 0,
        not_before_unix_ms: None,
        address: None,
    }
}

/// Renders a plan and the resulting load as the `.expected` text.
fn render(view: &ClusterView<'_>, plan: &Plan, batch: &[Task]) -> String {
    let mut out = String::new();
    let placed: HashMap<&TaskId, &NodeId> = plan
        .assignments
        .iter()
        .map(|a| (&a.task, &a.node))
        .collect();
    let unplaced: HashMap<&TaskId, &Unplaced> =
        plan.unplaced.iter().map(|u| (&u.task, u)).collect();
    for t in batch {
        match (placed.get(&t.id), unplaced.get(&t.id)) {
            (Some(node), _) => writeln!(out, "{} -> {}", t.id, node),
            (None, Some(u)) => writeln!(out, "{} pending: {}", t.id, u.reason()),
            (None, None) => writeln!(out, "{} MISSING FROM PLAN", t.id),
        }
        .expect("write to string");
    }
    let mut after = view.clone();
    for t in batch {
        if let Some(node) = placed.get(&t.id) {
            after.place(TaskRef::from(t), node);
        }
    }
    out.push_str("--\n");
    for n in after.nodes() {
        let free = n.available();
        writeln!(
            out,
            "{}: {} task{}, free {} / {}",
            n.node.id,
            n.tasks,
            if n.tasks == 1 { "" } else { "s" },
            filter::format_cpus(free.nano_cpus),
            filter::format_bytes(free.memory_bytes)
        )
        .expect("write to string");
    }
    out
}

fn run_scheduler_fixture(text: &str) -> String {
    let fx: SchedulerFixture = serde_norway::from_str(text).expect("fixture parses");
    let nodes: Vec<Node> = fx.nodes.iter().map(FixtureNode::build).collect();
    let existing: Vec<Task> = fx
        .existing
        .iter()
        .map(|e| {
            task(
                &e.id,
                &e.service,
                Some(&e.node),
                e.state,
                e.needs.template(),
            )
        })
        .collect();
    let mut batch = Vec::new();
    for b in &fx.batch {
        let spec = b.needs.template();
        let ids: Vec<String> = if b.ids.is_empty() {
            (1..=b.count)
                .map(|i| format!("{}.{i}", b.service))
                .collect()
        } else {
            b.ids.clone()
        };
        for id in ids {
            batch.push(task(
                &id,
                &b.service,
                b.node.as_deref(),
                TaskState::Pending,
                spec.clone(),
            ));
        }
    }
    let view = ClusterView::new(&nodes, &existing).expect("fixture view");
    let refs: Vec<TaskRef<'_>> = batch.iter().map(TaskRef::from).collect();
    let plan = schedule_with(
        &view,
        &refs,
        &SchedulerConfig {
            strategy: fx.strategy,
        },
    );
    render(&view, &plan, &batch)
}

/// Runs every `DIR/*.yaml` through `run`, comparing with `*.expected`
/// (rewritten instead when `UPDATE_EXPECT=1`). Fails listing every mismatch.
pub(crate) fn check_fixtures(dir: &Path, run: fn(&str) -> String) {
    let update = std::env::var_os("UPDATE_EXPECT").is_some_and(|v| v == "1");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("fixture dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "no fixtures in {}", dir.display());
    let mut failures = Vec::new();
    for input in entries {
        let text = std::fs::read_to_string(&input).expect("read fixture");
        let got = run(&text);
        let expected_path = input.with_extension("expected");
        if update {
            std::fs::write(&expected_path, &got).expect("write expected");
            continue;
        }
        let want = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if want != got {
            failures.push(format!(
                "{}:\n--- expected\n{want}--- got\n{got}",
                input.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixture(s) differ (UPDATE_EXPECT=1 rewrites them):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

pub(crate) fn testdata(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(sub)
}

#[test]
fn scheduler_scenarios() {
    check_fixtures(&testdata("scheduler"), run_scheduler_fixture);
}

#[test]
fn empty_cluster_says_so() {
    let view = ClusterView::new(&[], &[]).expect("empty view");
    let t = task(
        "t1",
        "web",
        None,
        TaskState::Pending,
        TaskTemplate::default(),
    );
    let plan = schedule(&view, &[TaskRef::from(&t)]);
    assert_eq!(plan.unplaced.len(), 1);
    assert_eq!(plan.unplaced[0].reason(), "no nodes in the cluster");
}

#[test]
fn duplicate_node_ids_are_refused() {
    let n = FixtureNode {
        id: "n1".into(),
        hostname: None,
        state: NodeState::Ready,
        availability: Availability::Active,
        role: NodeRole::Worker,
        labels: BTreeMap::new(),
        cpus: 1.0,
        memory: "1GiB".into(),
        arch: "amd64".into(),
    }
    .build();
    let nodes = vec![n.clone(), n];
    let err = ClusterView::new(&nodes, &[])
        .map(|_| ())
        .map_err(|e| e.to_string());
    assert_eq!(
        err,
        Err("node n1 appears twice in the cluster view".to_string())
    );
}

#[test]
fn a_full_node_subnet_is_a_filter_that_explains_itself() {
    let node = |id: &str, subnet: &str| {
        let mut n = FixtureNode {
            id: id.into(),
            hostname: None,
            state: NodeState::Ready,
            availability: Availability::Active,
            role: NodeRole::Worker,
            labels: BTreeMap::new(),
            cpus: 1000.0,
            memory: "1TiB".into(),
            arch: "amd64".into(),
        }
        .build();
        n.subnet = Some(subnet.parse().expect("subnet"));
        n
    };
    let nodes = vec![node("n1", "10.42.0.0/24"), node("n2", "10.42.1.0/24")];
    // n1 holds 253 addresses: 250 running tasks and 3 finished ones that
    // keep theirs until they are deleted. A host-network task is no issue.
    let mut existing: Vec<Task> = (0..253)
        .map(|i| {
            let state = if i < 250 {
                TaskState::Running
            } else {
                TaskState::Complete
            };
            let mut t = task(
                &format!("e{i}"),
                "old",
                Some("n1"),
                state,
                TaskTemplate::default(),
            );
            t.address = Some(std::net::Ipv4Addr::new(10, 42, 0, 2 + i as u8));
            t
        })
        .collect();
    let view = ClusterView::new(&nodes, &existing).expect("view");
    assert_eq!(view.nodes()[0].addresses, 253);
    let batch: Vec<Task> = (0..3)
        .map(|i| {
            task(
                &format!("t{i}"),
                "web",
                None,
                TaskState::Pending,
                TaskTemplate::default(),
            )
        })
        .collect();
    let refs: Vec<TaskRef<'_>> = batch.iter().map(TaskRef::from).collect();
    let plan = schedule(&view, &refs);
    assert!(plan.unplaced.is_empty(), "{:?}", plan.unplaced);
    assert!(plan.assignments.iter().all(|a| a.node.as_str() == "n2"));
    let host = TaskTemplate {
        host_network: true,
        ..TaskTemplate::default()
    };
    let h = task("h", "mon", Some("n1"), TaskState::Pending, host);
    assert_eq!(schedule(&view, &[TaskRef::from(&h)]).assignments.len(), 1);

    // Both full: unplaced, saying why.
    existing.extend((0..253).map(|i| {
        let mut t = task(
            &format!("f{i}"),
            "old",
            Some("n2"),
            TaskState::Running,
            TaskTemplate::default(),
        );
        t.address = Some(std::net::Ipv4Addr::new(10, 42, 1, 2 + i as u8));
        t
    }));
    let view = ClusterView::new(&nodes, &existing).expect("view");
    let plan = schedule(&view, &refs[..1]);
    assert_eq!(
        plan.unplaced[0].reason(),
        "no free address in subnet 10.42.0.0/24 (253 held) (1 node); \
         no free address in subnet 10.42.1.0/24 (253 held) (1 node)"
    );
}

// ---------------------------------------------------------------------------
// Properties

fn arb_node(i: usize) -> impl Strategy<Value = Node> {
    (
        prop::sample::select(vec![
            NodeState::Ready,
            NodeState::Ready,
            NodeState::Ready,
            NodeState::Down,
        ]),
        prop::sample::select(vec![
            Availability::Active,
            Availability::Active,
            Availability::Pause,
            Availability::Drain,
        ]),
        prop::sample::select(vec!["a", "b", "c"]),
        1u64..8,
        1u64..16,
    )
        .prop_map(move |(state, availability, zone, cpus, gib)| Node {
            id: NodeId::new(format!("n{i:03}")).expect("valid"),
            spec: NodeSpec {
                availability,
                role: NodeRole::Worker,
                labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
            },
            status: NodeStatus {
                state,
                address: String::new(),
                hostname: format!("host{i}"),
                resources: Resources {
                    nano_cpus: cpus * 1_000_000_000,
                    memory_bytes: gib << 30,
                },
                platform: Platform {
                    os: "linux".into(),
                    arch: "amd64".into(),
                },
            },
            version: 0,
            subnet: None,
        })
}

fn arb_nodes() -> impl Strategy<Value = Vec<Node>> {
    (0usize..12).prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>())
}

fn arb_spec() -> impl Strategy<Value = TaskTemplate> {
    (
        0u64..3000,
        0u64..4096,
        prop::option::of(prop::sample::select(vec![
            "node.labels.zone==a",
            "node.labels.zone!=b",
            "node.hostname!=host1",
        ])),
        prop::option::of(prop::sample::select(vec![80u16, 443])),
        prop::option::of(1u64..3),
    )
        .prop_map(|(milli, mib, constraint, port, max)| TaskTemplate {
            image: "busybox".into(),
            resources: ResourceRequirements {
                limits: Resources::default(),
                reservations: Resources {
                    nano_cpus: milli * 1_000_000,
                    memory_bytes: mib << 20,
                },
            },
            placement: Placement {
                constraints: constraint
                    .map(|c| Constraint::parse(c).expect("valid"))
                    .into_iter()
                    .collect(),
                max_replicas_per_node: max,
            },
            ports: port
                .map(|p| PortConfig {
                    published: Some(p),
                    target: 80,
                    protocol: Protocol::Tcp,
                    mode: PublishMode::Host,
                })
                .into_iter()
                .collect(),
            ..TaskTemplate::default()
        })
}

/// A batch: a few services, each a spec and a number of tasks.
fn arb_batch() -> impl Strategy<Value = Vec<Task>> {
    // Some groups are pinned to a node (global services), sometimes to one
    // that does not exist.
    let group = (
        arb_spec(),
        1usize..15,
        prop::option::weighted(0.2, 0usize..14),
    );
    prop::collection::vec(group, 1..4).prop_map(|groups| {
        let mut tasks = Vec::new();
        for (g, (spec, count, pin)) in groups.into_iter().enumerate() {
            let pin = pin.map(|n| format!("n{n:03}"));
            for i in 0..count {
                tasks.push(task(
                    &format!("s{g}.{i}"),
                    &format!("s{g}"),
                    pin.as_deref(),
                    TaskState::Pending,
                    spec.clone(),
                ));
            }
        }
        tasks
    })
}

proptest! {
    /// Whatever is placed fits: no node's reservations exceed its capacity, no
    /// placement breaks a constraint, availability, readiness,
    /// `max_replicas_per_node` or a host port; and a task is left pending only
    /// if no node could take it at that point.
    #[test]
    fn placements_respect_every_filter(nodes in arb_nodes(), batch in arb_batch()) {
        let view = ClusterView::new(&nodes, &[]).expect("view");
        let refs: Vec<TaskRef<'_>> = batch.iter().map(TaskRef::from).collect();
        for strategy in [Scoring::Spread, Scoring::Binpack] {
            let plan = schedule_with(&view, &refs, &SchedulerConfig { strategy });
            prop_assert_eq!(plan.assignments.len() + plan.unplaced.len(), batch.len());
            let by_id: HashMap<&TaskId, &Task> = batch.iter().map(|t| (&t.id, t)).collect();
            let mut reserved: HashMap<&NodeId, Resources> = HashMap::new();
            let mut per_service: HashMap<(&NodeId, &ServiceId), u64> = HashMap::new();
            let mut ports: HashSet<(&NodeId, Protocol, u16)> = HashSet::new();
            for a in &plan.assignments {
                let t = by_id[&a.task];
                let node = nodes.iter().find(|n| n.id == a.node).expect("assigned to a known node");
                prop_assert!(node.takes_new_tasks());
                if let Some(pinned) = &t.node {
                    prop_assert_eq!(pinned, &node.id);
                }
                for c in &t.spec.placement.constraints {
                    prop_assert!(c.matches(node), "{} on {}", c, node.id);
                }
                let r = reserved.entry(&node.id).or_default();
                *r = r.saturating_add(&t.spec.resources.reservations);
                prop_assert!(node.status.resources.fits(r), "overcommitted {}", node.id);
                let count = per_service.entry((&node.id, &t.service)).or_insert(0);
                *count += 1;
                if let Some(max) = t.spec.placement.max_replicas_per_node {
                    prop_assert!(*count <= max);
                }
                for p in host_ports(&t.spec) {
                    prop_assert!(ports.insert((&node.id, p.0, p.1)), "port {:?} twice on {}", p, node.id);
                }
            }
            for u in &plan.unplaced {
                let total: usize = u.rejections.iter().map(|r| r.nodes).sum();
                match &by_id[&u.task].node {
                    None => prop_assert_eq!(total, nodes.len(), "every node is accounted for"),
                    Some(pinned) => {
                        let present = nodes.iter().any(|n| &n.id == pinned);
                        prop_assert_eq!(total, usize::from(present), "only its own node counts");
                    }
                }
            }
        }
    }

    /// Same input, same plan; and the order nodes are listed in does not matter.
    #[test]
    fn deterministic(nodes in arb_nodes(), batch in arb_batch()) {
        let refs: Vec<TaskRef<'_>> = batch.iter().map(TaskRef::from).collect();
        let view = ClusterView::new(&nodes, &[]).expect("view");
        let first = schedule(&view, &refs);
        prop_assert_eq!(&first, &schedule(&view, &refs));
        let mut reversed = nodes.clone();
        reversed.reverse();
        let view2 = ClusterView::new(&reversed, &[]).expect("view");
        prop_assert_eq!(&first, &schedule(&view2, &refs));
    }

    /// On equal unconstrained nodes, a service's replicas differ by at most one per node.
    #[test]
    fn spread_is_balanced(node_count in 1usize..20, replicas in 0usize..100) {
        let nodes: Vec<Node> = (0..node_count)
            .map(|i| FixtureNode {
                id: format!("n{i:02}"),
                hostname: None,
                state: NodeState::Ready,
                availability: Availability::Active,
                role: NodeRole::Worker,
                labels: BTreeMap::new(),
                cpus: 64.0,
                memory: "64GiB".into(),
                arch: "amd64".into(),
            }.build())
            .collect();
        let spec = FixtureNeeds { cpus: 0.1, memory: Some("64MiB".into()), ..FixtureNeeds::default() }.template();
        let batch: Vec<Task> = (0..replicas)
            .map(|i| task(&format!("web.{i}"), "web", None, TaskState::Pending, spec.clone()))
            .collect();
        let refs: Vec<TaskRef<'_>> = batch.iter().map(TaskRef::from).collect();
        let view = ClusterView::new(&nodes, &[]).expect("view");
        let plan = schedule(&view, &refs);
        prop_assert!(plan.unplaced.is_empty());
        let mut counts: HashMap<&NodeId, usize> = nodes.iter().map(|n| (&n.id, 0)).collect();
        for a in &plan.assignments {
            *counts.get_mut(&a.node).expect("known node") += 1;
        }
        let max = counts.values().max().copied().unwrap_or(0);
        let min = counts.values().min().copied().unwrap_or(0);
        prop_assert!(max - min <= 1, "max {} min {}", max, min);
    }
}

/// The obvious scheduler: for every task, scan every node through every
/// filter and keep the best score. `schedule_with` must choose exactly as it does.
fn reference_schedule(
    view: &ClusterView<'_>,
    tasks: &[TaskRef<'_>],
    config: &SchedulerConfig,
) -> Plan {
    let mut view = view.clone();
    let mut plan = Plan::default();
    for task in tasks {
        let same: Vec<u64> = view
            .nodes
            .iter()
            .map(|n| n.per_service.get(task.service).copied().unwrap_or(0))
            .collect();
        let need = task.spec.resources.reservations;
        let all: Vec<usize> = (0..view.nodes.len())
            .filter(|&i| task.node.is_none_or(|p| &view.nodes[i].node.id == p))
            .collect();
        let mut best: Option<(Score, usize)> = None;
        for &i in &all {
            let n = &view.nodes[i];
            let max_ok = task
                .spec
                .placement
                .max_replicas_per_node
                .filter(|&m| m > 0)
                .is_none_or(|m| same[i] < m);
            if filter::static_rejection(task.spec, n.node).is_some()
                || !n.available().fits(&need)
                || host_ports(task.spec).any(|p| n.host_ports.contains(&p))
                || !max_ok
            {
                continue;
            }
            let s = score(config.strategy, n, same[i], &need);
            if best.as_ref().is_none_or(|(b, _)| s < *b) {
                best = Some((s, i));
            }
        }
        match best {
            Some((_, i)) => {
                let node = view.nodes[i].node.id.clone();
                view.place(*task, &node);
                plan.assignments.push(Assignment {
                    task: task.id.clone(),
                    node,
                });
            }
            None => plan.unplaced.push(Unplaced {
                task: task.id.clone(),
                rejections: filter::explain(&view, *task, &same, &all),
            }),
        }
    }
    plan
}

proptest! {
    /// The grouped, ordered-set scheduler makes the same plan as the obvious one.
    #[test]
    fn same_plan_as_the_reference(nodes in arb_nodes(), batch in arb_batch(), binpack in any::<bool>()) {
        let view = ClusterView::new(&nodes, &[]).expect("view");
        let refs: Vec<TaskRef<'_>> = batch.iter().map(TaskRef::from).collect();
        let config = SchedulerConfig { strategy: if binpack { Scoring::Binpack } else { Scoring::Spread } };
        prop_assert_eq!(schedule_with(&view, &refs, &config), reference_schedule(&view, &refs, &config));
    }
}

proptest! {
    /// Across passes: what an earlier pass placed (now running, or finished
    /// and so holding nothing) is counted, and a second pass still never
    /// overcommits a node or reuses a host port.
    #[test]
    fn second_pass_counts_the_first(
        nodes in arb_nodes(),
        first in arb_batch(),
        second in arb_batch(),
        finished in prop::collection::vec(any::<bool>(), 64),
    ) {
        let view = ClusterView::new(&nodes, &[]).expect("view");
        let refs: Vec<TaskRef<'_>> = first.iter().map(TaskRef::from).collect();
        let plan = schedule(&view, &refs);
        let placed: HashMap<&TaskId, &NodeId> = plan.assignments.iter().map(|a| (&a.task, &a.node)).collect();
        let existing: Vec<Task> = first
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let node = placed.get(&t.id)?;
                let mut t = t.clone();
                t.id = TaskId::new(format!("old.{}", t.id)).expect("valid");
                t.node = Some((*node).clone());
                t.status.state = if finished[i % finished.len()] { TaskState::Complete } else { TaskState::Running };
                Some(t)
            })
            .collect();
        let view = ClusterView::new(&nodes, &existing).expect("view");
        let refs: Vec<TaskRef<'_>> = second.iter().map(TaskRef::from).collect();
        let plan = schedule(&view, &refs);
        let by_id: HashMap<&TaskId, &Task> = second.iter().map(|t| (&t.id, t)).collect();
        let mut reserved: HashMap<&NodeId, Resources> = HashMap::new();
        let mut ports: HashSet<(&NodeId, Protocol, u16)> = HashSet::new();
        for t in existing.iter().filter(|t| t.occupies_node()) {
            let node = t.node.as_ref().expect("placed");
            let r = reserved.entry(node).or_default();
            *r = r.saturating_add(&t.spec.resources.reservations);
            for p in host_ports(&t.spec) {
                ports.insert((node, p.0, p.1));
            }
        }
        for a in &plan.assignments {
            let t = by_id[&a.task];
            let node = nodes.iter().find(|n| n.id == a.node).expect("known node");
            let r = reserved.entry(&node.id).or_default();
            *r = r.saturating_add(&t.spec.resources.reservations);
            prop_assert!(node.status.resources.fits(r), "overcommitted {}", node.id);
            for p in host_ports(&t.spec) {
                prop_assert!(ports.insert((&node.id, p.0, p.1)), "port {:?} twice on {}", p, node.id);
            }
        }
    }
}
