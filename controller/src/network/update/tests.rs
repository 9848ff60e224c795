//! The network update computation over small states built with commands.

use std::time::Duration;

use super::*;
use crate::model::{
    HealthCheck, NodeSpec, NodeState, NodeStatus, ServiceMode, ServiceSpec, TaskStatus,
    TaskTemplate,
};
use crate::scheduler::Assignment;
use crate::store::{ApplyOutcome, Command};

fn node_id(s: &str) -> NodeId {
    NodeId::new(s).expect("valid")
}

fn service_id(s: &str) -> ServiceId {
    ServiceId::new(s).expect("valid")
}

fn task_id(s: &str) -> TaskId {
    TaskId::new(s).expect("valid")
}

/// Applies `command`, panicking on a refusal; returns its events.
fn apply(sm: &mut StateMachine, command: Command) -> Vec<Event> {
    let index = sm.applied_index() + 1;
    let ApplyOutcome { events, .. } = sm.apply(index, &command).unwrap_or_else(|e| panic!("{e}"));
    events
}

fn join(sm: &mut StateMachine, node: &str, address: &str) -> Vec<Event> {
    let mut events = apply(
        sm,
        Command::UpsertNode {
            node: node_id(node),
            spec: NodeSpec::default(),
        },
    );
    events.extend(apply(
        sm,
        Command::UpdateNodeStatus {
            node: node_id(node),
            status: NodeStatus {
                state: NodeState::Ready,
                address: address.into(),
                ..NodeStatus::default()
            },
        },
    ));
    events
}

fn spec(name: &str, mode: EndpointMode, health: bool, networks: &[&str]) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        stack: "demo".into(),
        mode: ServiceMode::Replicated { replicas: 1 },
        task: TaskTemplate {
            image: "busybox".into(),
            networks: networks.iter().map(|n| n.to_string()).collect(),
            ports: vec![PortConfig {
                published: Some(8080),
                target: 80,
                protocol: Default::default(),
                mode: Default::default(),
            }],
            healthcheck: health.then(|| HealthCheck {
                probe: HealthProbe::Tcp { port: 80 },
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                retries: 1,
                start_period: Duration::ZERO,
            }),
            ..TaskTemplate::default()
        },
        update_config: None,
        endpoint_mode: mode,
        depends_on: Default::default(),
    }
}

/// Creates `task` of `service` and assigns it to `node`.
fn place(sm: &mut StateMachine, task: &str, service: &str, node: &str) -> Vec<Event> {
    let spec = sm
        .service(&service_id(service))
        .expect("service")
        .spec
        .task
        .clone();
    let mut events = apply(
        sm,
        Command::CreateTasks {
            tasks: vec![Task {
                id: task_id(task),
                service: service_id(service),
                slot: Some(1),
                node: None,
                spec_version: 1,
                spec,
                desired_state: DesiredState::Running,
                status: TaskStatus::default(),
                generation: 0,
                version: 0,
                service_name: format!("demo_{service}"),
                attempt: 0,
                not_before_unix_ms: None,
                address: None,
            }],
        },
    );
    events.extend(apply(
        sm,
        Command::AssignTasks {
            assignments: vec![Assignment {
                task: task_id(task),
                node: node_id(node),
            }],
            at_unix_ms: None,
        },
    ));
    events
}

fn report(
    sm: &mut StateMachine,
    task: &str,
    node: &str,
    state: TaskState,
    health: Health,
) -> Vec<Event> {
    apply(
        sm,
        Command::UpdateTaskStatus {
            task: task_id(task),
            node: node_id(node),
            status: TaskStatus {
                state,
                health,
                ..TaskStatus::default()
            },
        },
    )
}

/// Two nodes, a vip service `web` with a health check on both networks, a
/// dnsrr service `db` on `demo_back`; tasks w1 (n1, running, not yet
/// healthy), w2 (n2, assigned) and d1 (n2, running).
fn cluster() -> StateMachine {
    let mut sm = StateMachine::new();
    apply(
        &mut sm,
        Command::SetAddressing {
            addressing: Addressing::default(),
        },
    );
    join(&mut sm, "n1", "192.168.7.1:7071");
    join(&mut sm, "n2", "192.168.7.2:7071");
    // A node whose address has no IP is no VXLAN peer.
    join(&mut sm, "n3", "agent.example:7071");
    for (id, mode, health, networks) in [
        (
            "web",
            EndpointMode::Vip,
            true,
            &["demo_back", "demo_front"][..],
        ),
        ("db", EndpointMode::Dnsrr, false, &["demo_back"][..]),
    ] {
        apply(
            &mut sm,
            Command::CreateService {
                service: service_id(id),
                spec: spec(id, mode, health, networks),
            },
        );
    }
    place(&mut sm, "w1", "web", "n1");
    place(&mut sm, "w2", "web", "n2");
    place(&mut sm, "d1", "db", "n2");
    report(&mut sm, "w1", "n1", TaskState::Running, Health::Starting);
    report(&mut sm, "d1", "n2", TaskState::Running, Health::None);
    sm
}

fn endpoint(task: &str, node: &str, address: &str, ready: bool) -> ServiceEndpoint {
    ServiceEndpoint {
        task: task_id(task),
        node: node_id(node),
        address: address.parse().expect("ip"),
        ready,
    }
}

#[test]
fn a_full_update_carries_the_whole_network_state() {
    let sm = cluster();
    let mut view = AgentView::default();
    let update = full(&sm, &node_id("n2"), &mut view);
    assert!(update.full);
    assert_eq!(update.revision, sm.applied_index());
    assert_eq!(update.addressing, Some(Addressing::default()));
    assert_eq!(update.node_subnet, "10.42.1.0/24".parse().ok());
    let nodes: Vec<(String, String, String)> = update
        .nodes
        .iter()
        .map(|n| {
            (
                n.node.to_string(),
                n.underlay_ip.to_string(),
                n.subnet.to_string(),
            )
        })
        .collect();
    assert_eq!(
        nodes,
        [
            ("n1".into(), "192.168.7.1".into(), "10.42.0.0/24".into()),
            ("n2".into(), "192.168.7.2".into(), "10.42.1.0/24".into()),
        ]
    );
    let [db, web] = &update.services[..] else {
        panic!("two services: {:?}", update.services);
    };
    assert_eq!(web.name, "web");
    assert_eq!(web.stack, "demo");
    assert_eq!(web.virtual_ip, "10.43.0.1".parse().ok());
    assert_eq!(web.endpoint_mode, EndpointMode::Vip);
    assert_eq!(web.ports[0].target, 80);
    assert_eq!(web.networks, ["demo_back", "demo_front"]);
    // w1 runs but its health check has not passed; w2 is only assigned.
    assert_eq!(
        web.endpoints,
        [
            endpoint("w1", "n1", "10.42.0.2", false),
            endpoint("w2", "n2", "10.42.1.2", false),
        ]
    );
    assert_eq!(db.virtual_ip, None);
    assert_eq!(db.endpoint_mode, EndpointMode::Dnsrr);
    assert_eq!(db.endpoints, [endpoint("d1", "n2", "10.42.1.3", true)]);
    let networks: Vec<(&str, &str)> = update
        .networks
        .iter()
        .map(|n| (n.name.as_str(), n.stack.as_str()))
        .collect();
    assert_eq!(networks, [("demo_back", "demo"), ("demo_front", "demo")]);
}

#[test]
fn incremental_updates_carry_only_what_changed() {
    let mut sm = cluster();
    let n1 = node_id("n1");
    let mut view = AgentView::default();
    full(&sm, &n1, &mut view);

    // w1 turns healthy: the whole web record, w1 now ready.
    let mut changes = Changes::default();
    changes.add(&report(
        &mut sm,
        "w1",
        "n1",
        TaskState::Running,
        Health::Healthy,
    ));
    let update = incremental(&sm, &n1, &changes, &mut view).expect("an update");
    assert!(!update.full);
    assert_eq!(update.revision, sm.applied_index());
    assert!(update.nodes.is_empty() && update.networks.is_empty());
    let [web] = &update.services[..] else {
        panic!("one service: {:?}", update.services);
    };
    assert_eq!(web.endpoints[0], endpoint("w1", "n1", "10.42.0.2", true));
    assert_eq!(web.endpoints.len(), 2);

    // A report that changes nothing the network sees (a new restart count)
    // sends nothing.
    let mut changes = Changes::default();
    let echo = apply(
        &mut sm,
        Command::UpdateTaskStatus {
            task: task_id("w1"),
            node: n1.clone(),
            status: TaskStatus {
                state: TaskState::Running,
                health: Health::Healthy,
                restarts: 1,
                ..TaskStatus::default()
            },
        },
    );
    assert_eq!(echo.len(), 1, "the store saw a change");
    changes.add(&echo);
    assert_eq!(incremental(&sm, &n1, &changes, &mut view), None);

    // w1 fails: it leaves the endpoints.
    let mut changes = Changes::default();
    changes.add(&report(
        &mut sm,
        "w1",
        "n1",
        TaskState::Failed,
        Health::Healthy,
    ));
    let update = incremental(&sm, &n1, &changes, &mut view).expect("an update");
    assert_eq!(
        update.services[0].endpoints,
        [endpoint("w2", "n2", "10.42.1.2", false)]
    );

    // A node changes its address, another is removed.
    let mut changes = Changes::default();
    changes.add(&join(&mut sm, "n2", "192.168.7.22:7071"));
    changes.add(&apply(
        &mut sm,
        Command::RemoveNode {
            node: node_id("n3"),
        },
    ));
    let update = incremental(&sm, &n1, &changes, &mut view).expect("an update");
    assert_eq!(update.nodes.len(), 1);
    assert_eq!(update.nodes[0].underlay_ip.to_string(), "192.168.7.22");
    // n3 never was a peer, so there is nothing to remove.
    assert!(update.removed_nodes.is_empty());
    let mut changes = Changes::default();
    changes.add(&apply(
        &mut sm,
        Command::RemoveNode {
            node: node_id("n2"),
        },
    ));
    let update = incremental(&sm, &n1, &changes, &mut view).expect("an update");
    assert_eq!(update.removed_nodes, [node_id("n2")]);

    // The only service on demo_front moves off it; then web is removed.
    let mut changes = Changes::default();
    changes.add(&apply(
        &mut sm,
        Command::UpdateService {
            service: service_id("web"),
            spec: spec("web", EndpointMode::Vip, true, &["demo_back"]),
            expected_spec_version: None,
        },
    ));
    let update = incremental(&sm, &n1, &changes, &mut view).expect("an update");
    assert_eq!(update.services[0].networks, ["demo_back"]);
    assert_eq!(update.services[0].virtual_ip, "10.43.0.1".parse().ok());
    assert_eq!(update.removed_networks, ["demo_front"]);
    let mut changes = Changes::default();
    changes.add(&apply(
        &mut sm,
        Command::RemoveService {
            service: service_id("db"),
        },
    ));
    changes.add(&apply(
        &mut sm,
        Command::RemoveService {
            service: service_id("web"),
        },
    ));
    let update = incremental(&sm, &n1, &changes, &mut view).expect("an update");
    assert_eq!(
        update.removed_services,
        [service_id("db"), service_id("web")]
    );
    assert_eq!(update.removed_networks, ["demo_back"]);

    // What the agent was sent adds up to a full update of the same state.
    let mut fresh = AgentView::default();
    full(&sm, &n1, &mut fresh);
    assert_eq!(fresh, view);
}

#[test]
fn a_changed_own_subnet_gives_a_full_update() {
    let mut sm = StateMachine::new();
    join(&mut sm, "n1", "192.168.7.1:7071");
    let n1 = node_id("n1");
    let mut view = AgentView::default();
    let first = full(&sm, &n1, &mut view);
    assert_eq!((first.addressing, first.node_subnet), (None, None));
    assert!(first.nodes.is_empty(), "no subnet, no peer");
    let mut changes = Changes::default();
    changes.add(&apply(
        &mut sm,
        Command::SetAddressing {
            addressing: Addressing::default(),
        },
    ));
    let update = incremental(&sm, &n1, &changes, &mut view).expect("an update");
    assert!(update.full);
    assert_eq!(update.node_subnet, "10.42.0.0/24".parse().ok());
    assert_eq!(update.nodes.len(), 1);
}

#[test]
fn readiness_needs_running_desired_running_and_health() {
    let mut sm = cluster();
    let task = |sm: &StateMachine, id: &str| sm.task(&task_id(id)).cloned().expect("task");
    assert!(!ready(&task(&sm, "w1")), "health check not passed yet");
    assert!(ready(&task(&sm, "d1")), "no health check: running is ready");
    // No check in the file, but the image's HEALTHCHECK runs: it decides.
    report(&mut sm, "d1", "n2", TaskState::Running, Health::Starting);
    assert!(!ready(&task(&sm, "d1")), "the image's check has not passed");
    report(&mut sm, "d1", "n2", TaskState::Running, Health::Healthy);
    assert!(ready(&task(&sm, "d1")));
    report(&mut sm, "w1", "n1", TaskState::Running, Health::Healthy);
    assert!(ready(&task(&sm, "w1")));
    report(&mut sm, "w1", "n1", TaskState::Running, Health::Unhealthy);
    assert!(!ready(&task(&sm, "w1")));
    apply(
        &mut sm,
        Command::SetTaskDesiredState {
            changes: vec![crate::store::DesiredStateChange {
                task: task_id("d1"),
                desired_state: DesiredState::Shutdown,
            }],
        },
    );
    assert!(
        !ready(&task(&sm, "d1")),
        "being stopped: no new connections"
    );
}

#[test]
fn underlay_ips_come_from_agent_addresses() {
    assert_eq!(underlay_ip("10.0.0.2:7071"), "10.0.0.2".parse().ok());
    assert_eq!(underlay_ip("10.0.0.2"), "10.0.0.2".parse().ok());
    assert_eq!(underlay_ip("[fd00::2]:7071"), "fd00::2".parse().ok());
    assert_eq!(underlay_ip("node1:7071"), None);
}

/// The scale: 1,000 services × 10 endpoints on 50 nodes. An
/// endpoint change costs in proportion to its service, not the cluster.
/// Prints the figures (debug build: several times the release cost).
#[test]
fn one_endpoint_change_at_a_thousand_services_costs_one_service() {
    let mut sm = StateMachine::new();
    apply(
        &mut sm,
        Command::SetAddressing {
            addressing: Addressing::default(),
        },
    );
    let nodes: Vec<String> = (0..50).map(|i| format!("n{i:02}")).collect();
    for (i, n) in nodes.iter().enumerate() {
        join(
            &mut sm,
            n,
            &format!("192.168.{}.{}:7071", i / 200, i % 200 + 1),
        );
    }
    let mut tasks = Vec::new();
    let mut assignments = Vec::new();
    for s in 0..1000 {
        let name = format!("s{s:04}");
        apply(
            &mut sm,
            Command::CreateService {
                service: service_id(&name),
                spec: spec(&name, EndpointMode::Vip, false, &["demo_default"]),
            },
        );
        let template = sm
            .service(&service_id(&name))
            .expect("service")
            .spec
            .task
            .clone();
        for r in 0..10 {
            let id = format!("{name}-{r}");
            tasks.push(Task {
                id: task_id(&id),
                service: service_id(&name),
                slot: Some(r + 1),
                node: None,
                spec_version: 1,
                spec: template.clone(),
                desired_state: DesiredState::Running,
                status: TaskStatus::default(),
                generation: 0,
                version: 0,
                service_name: format!("demo_{name}"),
                attempt: 0,
                not_before_unix_ms: None,
                address: None,
            });
            assignments.push(Assignment {
                task: task_id(&id),
                node: node_id(&nodes[(s * 10 + r as usize) % nodes.len()]),
            });
        }
    }
    apply(&mut sm, Command::CreateTasks { tasks });
    apply(
        &mut sm,
        Command::AssignTasks {
            assignments,
            at_unix_ms: None,
        },
    );
    let me = node_id("n00");
    let mut view = AgentView::default();
    let started = std::time::Instant::now();
    let update = full(&sm, &me, &mut view);
    let full_time = started.elapsed();
    assert_eq!(update.services.len(), 1000);
    let endpoints: usize = update.services.iter().map(|s| s.endpoints.len()).sum();
    assert_eq!(endpoints, 10_000);

    let task = sm.task(&task_id("s0500-3")).expect("task").clone();
    let node = task.node.clone().expect("assigned");
    let mut changes = Changes::default();
    changes.add(&report(
        &mut sm,
        "s0500-3",
        node.as_str(),
        TaskState::Running,
        Health::None,
    ));
    let started = std::time::Instant::now();
    let update = incremental(&sm, &me, &changes, &mut view).expect("an update");
    let one_time = started.elapsed();
    assert_eq!(update.services.len(), 1);
    assert_eq!(update.services[0].endpoints.len(), 10);
    println!(
        "network update, 1,000 services x 10 endpoints: full {full_time:?}, one endpoint change {one_time:?}"
    );
    assert!(
        one_time * 20 < full_time,
        "an endpoint change costs its service, not the cluster: {one_time:?} vs full {full_time:?}"
    );
}
