//! Cluster addressing in the state machine: node subnets, task addresses and
//! service VIPs are allocated by apply, released only when their holder
//! leaves the store, and survive a snapshot.

use gantry_controller::model::{
    DesiredState, EndpointMode, NodeId, NodeSpec, ServiceId, ServiceMode, ServiceSpec, Task,
    TaskId, TaskState, TaskStatus, TaskTemplate,
};
use gantry_controller::network::Addressing;
use gantry_controller::scheduler::Assignment;
use gantry_controller::store::{Command, DesiredStateChange, Snapshot, StateMachine};

fn node_id(s: &str) -> NodeId {
    NodeId::new(s).expect("valid node id")
}

fn service_id(s: &str) -> ServiceId {
    ServiceId::new(s).expect("valid service id")
}

fn task_id(s: &str) -> TaskId {
    TaskId::new(s).expect("valid task id")
}

fn plan(cluster: &str, service: &str) -> Command {
    Command::SetAddressing {
        addressing: Addressing {
            cluster_cidr: cluster.parse().expect("valid"),
            service_cidr: service.parse().expect("valid"),
        },
    }
}

fn spec(name: &str, mode: EndpointMode, host_network: bool) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        stack: "demo".into(),
        mode: ServiceMode::Replicated { replicas: 1 },
        task: TaskTemplate {
            image: "busybox".into(),
            host_network,
            networks: if host_network {
                Vec::new()
            } else {
                vec!["demo_default".into()]
            },
            ..TaskTemplate::default()
        },
        update_config: None,
        endpoint_mode: mode,
        depends_on: Default::default(),
    }
}

fn create_service(id: &str, mode: EndpointMode, host_network: bool) -> Command {
    Command::CreateService {
        service: service_id(id),
        spec: spec(id, mode, host_network),
    }
}

fn new_task(id: &str, service: &str, host_network: bool) -> Task {
    Task {
        id: task_id(id),
        service: service_id(service),
        slot: Some(1),
        node: None,
        spec_version: 1,
        spec: spec(service, EndpointMode::Vip, host_network).task,
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

fn assign(tasks: &[&str], node: &str) -> Command {
    Command::AssignTasks {
        assignments: tasks
            .iter()
            .map(|t| Assignment {
                task: task_id(t),
                node: node_id(node),
            })
            .collect(),
        at_unix_ms: None,
    }
}

/// Stops `tasks` and removes them from the store (what task history does).
fn stop_and_remove(sm: &mut StateMachine, tasks: &[&str], node: &str) {
    let changes = tasks
        .iter()
        .map(|t| DesiredStateChange {
            task: task_id(t),
            desired_state: DesiredState::Shutdown,
        })
        .collect();
    ok(sm, Command::SetTaskDesiredState { changes });
    for t in tasks {
        let status = TaskStatus {
            state: TaskState::Shutdown,
            ..TaskStatus::default()
        };
        ok(
            sm,
            Command::UpdateTaskStatus {
                task: task_id(t),
                node: node_id(node),
                status,
            },
        );
    }
    ok(
        sm,
        Command::RemoveTasks {
            tasks: tasks.iter().map(|t| task_id(t)).collect(),
        },
    );
}

fn apply(sm: &mut StateMachine, command: Command) -> Result<usize, String> {
    let index = sm.applied_index() + 1;
    sm.apply(index, &command)
        .map(|o| o.events.len())
        .map_err(|e| e.to_string())
}

fn ok(sm: &mut StateMachine, command: Command) -> usize {
    let name = command.name();
    apply(sm, command).unwrap_or_else(|e| panic!("{name} refused: {e}"))
}

fn subnet(sm: &StateMachine, node: &str) -> Option<String> {
    sm.node(&node_id(node))
        .and_then(|n| n.subnet)
        .map(|s| s.to_string())
}

fn address(sm: &StateMachine, task: &str) -> Option<String> {
    sm.task(&task_id(task))
        .and_then(|t| t.address)
        .map(|a| a.to_string())
}

fn vip(sm: &StateMachine, service: &str) -> Option<String> {
    sm.service(&service_id(service))
        .and_then(|s| s.virtual_ip)
        .map(|a| a.to_string())
}

#[test]
fn nodes_get_the_lowest_free_subnet_and_keep_it_while_their_tasks_hold_addresses() {
    let mut sm = StateMachine::new();
    ok(&mut sm, plan("10.42.0.0/22", "10.43.0.0/16"));
    for n in ["a", "b", "c"] {
        ok(&mut sm, upsert(n));
    }
    assert_eq!(subnet(&sm, "a").as_deref(), Some("10.42.0.0/24"));
    assert_eq!(subnet(&sm, "b").as_deref(), Some("10.42.1.0/24"));
    assert_eq!(subnet(&sm, "c").as_deref(), Some("10.42.2.0/24"));
    // An update of the spec keeps the subnet.
    let drained = Command::UpsertNode {
        node: node_id("b"),
        spec: NodeSpec {
            availability: gantry_controller::model::Availability::Drain,
            ..NodeSpec::default()
        },
    };
    ok(&mut sm, drained);
    assert_eq!(subnet(&sm, "b").as_deref(), Some("10.42.1.0/24"));

    // b runs a task, then is removed: its subnet stays blocked while the
    // task holds an address in it.
    ok(&mut sm, create_service("web", EndpointMode::Vip, false));
    ok(
        &mut sm,
        Command::CreateTasks {
            tasks: vec![new_task("t1", "web", false)],
        },
    );
    ok(&mut sm, assign(&["t1"], "b"));
    assert_eq!(address(&sm, "t1").as_deref(), Some("10.42.1.2"));
    ok(&mut sm, Command::RemoveNode { node: node_id("b") });
    ok(&mut sm, upsert("d"));
    assert_eq!(subnet(&sm, "d").as_deref(), Some("10.42.3.0/24"));
    // The cluster CIDR is full: the next node is refused, naming it.
    assert_eq!(
        apply(&mut sm, upsert("e")),
        Err(
            "upsert-node: node e field subnet: cluster CIDR 10.42.0.0/22 has no free /24 \
             subnet (all 4 are held by nodes or by tasks of removed nodes)"
                .into()
        )
    );
    // b comes back under its id: it gets its old subnet, where its task is.
    ok(&mut sm, upsert("b"));
    assert_eq!(subnet(&sm, "b").as_deref(), Some("10.42.1.0/24"));

    // Removed again, and its task deleted: the subnet is free for others.
    ok(&mut sm, Command::RemoveNode { node: node_id("b") });
    stop_and_remove(&mut sm, &["t1"], "b");
    ok(&mut sm, upsert("e"));
    assert_eq!(subnet(&sm, "e").as_deref(), Some("10.42.1.0/24"));
}

#[test]
fn task_addresses_are_the_lowest_free_and_reused_only_after_removal() {
    let mut sm = StateMachine::new();
    ok(&mut sm, plan("10.42.0.0/16", "10.43.0.0/16"));
    ok(&mut sm, upsert("n1"));
    ok(&mut sm, create_service("web", EndpointMode::Vip, false));
    ok(&mut sm, create_service("host", EndpointMode::Vip, true));
    let tasks = vec![
        new_task("t1", "web", false),
        new_task("t2", "web", false),
        new_task("t3", "web", false),
        new_task("h1", "host", true),
    ];
    ok(&mut sm, Command::CreateTasks { tasks });
    ok(&mut sm, assign(&["t1", "t2", "h1"], "n1"));
    // .0 is the network, .1 the node's bridge: tasks start at .2.
    assert_eq!(address(&sm, "t1").as_deref(), Some("10.42.0.2"));
    assert_eq!(address(&sm, "t2").as_deref(), Some("10.42.0.3"));
    assert_eq!(address(&sm, "h1"), None, "a host-network task has none");

    // t1 stops: its address is still held while the task is in the store.
    let stop = Command::SetTaskDesiredState {
        changes: vec![DesiredStateChange {
            task: task_id("t1"),
            desired_state: DesiredState::Shutdown,
        }],
    };
    ok(&mut sm, stop);
    ok(&mut sm, assign(&["t3"], "n1"));
    assert_eq!(address(&sm, "t3").as_deref(), Some("10.42.0.4"));

    // Once removed from the store, it is the lowest free again.
    let shutdown = Command::UpdateTaskStatus {
        task: task_id("t1"),
        node: node_id("n1"),
        status: TaskStatus {
            state: TaskState::Shutdown,
            ..TaskStatus::default()
        },
    };
    ok(&mut sm, shutdown);
    ok(
        &mut sm,
        Command::RemoveTasks {
            tasks: vec![task_id("t1")],
        },
    );
    ok(
        &mut sm,
        Command::CreateTasks {
            tasks: vec![new_task("t4", "web", false)],
        },
    );
    ok(&mut sm, assign(&["t4"], "n1"));
    assert_eq!(address(&sm, "t4").as_deref(), Some("10.42.0.2"));
}

#[test]
fn a_full_subnet_leaves_the_task_pending_naming_the_subnet() {
    let mut sm = StateMachine::new();
    ok(&mut sm, plan("10.42.0.0/16", "10.43.0.0/16"));
    ok(&mut sm, upsert("n1"));
    ok(&mut sm, create_service("web", EndpointMode::Vip, false));
    // .2 to .254: 253 addresses.
    let ids: Vec<String> = (0..254).map(|i| format!("t{i:03}")).collect();
    let tasks = ids.iter().map(|id| new_task(id, "web", false)).collect();
    ok(&mut sm, Command::CreateTasks { tasks });
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    ok(&mut sm, assign(&all, "n1"));
    assert_eq!(address(&sm, "t252").as_deref(), Some("10.42.0.254"));
    let last = sm.task(&task_id("t253")).expect("task");
    assert_eq!(last.status.state, TaskState::Pending);
    assert_eq!(last.address, None);
    assert_eq!(last.node, None);
    assert_eq!(
        last.status.message,
        "no free address in subnet 10.42.0.0/24 of node n1"
    );
    // Trying again changes nothing, so the scheduler is not woken by it.
    assert_eq!(apply(&mut sm, assign(&["t253"], "n1")), Ok(0));
}

#[test]
fn vips_follow_the_endpoint_mode_and_are_released_with_the_service() {
    let mut sm = StateMachine::new();
    ok(&mut sm, plan("10.42.0.0/16", "10.43.0.0/28"));
    ok(&mut sm, create_service("web", EndpointMode::Vip, false));
    ok(&mut sm, create_service("rr", EndpointMode::Dnsrr, false));
    ok(&mut sm, create_service("host", EndpointMode::Vip, true));
    ok(&mut sm, create_service("api", EndpointMode::Vip, false));
    // The service CIDR's network address is never a VIP.
    assert_eq!(vip(&sm, "web").as_deref(), Some("10.43.0.1"));
    assert_eq!(vip(&sm, "rr"), None);
    assert_eq!(vip(&sm, "host"), None);
    assert_eq!(vip(&sm, "api").as_deref(), Some("10.43.0.2"));

    // An update keeps the VIP; switching to dnsrr releases it, back to vip
    // allocates the lowest free.
    let mut changed = spec("web", EndpointMode::Vip, false);
    changed.task.image = "nginx".into();
    let update = |spec: ServiceSpec| Command::UpdateService {
        service: service_id("web"),
        spec,
        expected_spec_version: None,
    };
    ok(&mut sm, update(changed.clone()));
    assert_eq!(vip(&sm, "web").as_deref(), Some("10.43.0.1"));
    changed.endpoint_mode = EndpointMode::Dnsrr;
    ok(&mut sm, update(changed.clone()));
    assert_eq!(vip(&sm, "web"), None);
    ok(&mut sm, create_service("db", EndpointMode::Vip, false));
    assert_eq!(vip(&sm, "db").as_deref(), Some("10.43.0.1"));
    changed.endpoint_mode = EndpointMode::Vip;
    ok(&mut sm, update(changed));
    assert_eq!(vip(&sm, "web").as_deref(), Some("10.43.0.3"));

    // Removal releases it.
    ok(
        &mut sm,
        Command::RemoveService {
            service: service_id("api"),
        },
    );
    ok(&mut sm, create_service("cache", EndpointMode::Vip, false));
    assert_eq!(vip(&sm, "cache").as_deref(), Some("10.43.0.2"));

    // A /28 has 14: fill it, and the next is refused naming the CIDR.
    for i in 0..11 {
        ok(
            &mut sm,
            create_service(&format!("s{i}"), EndpointMode::Vip, false),
        );
    }
    assert_eq!(vip(&sm, "s10").as_deref(), Some("10.43.0.14"));
    assert_eq!(
        apply(&mut sm, create_service("more", EndpointMode::Vip, false)),
        Err(
            "create-service: service more field virtual_ip: service CIDR 10.43.0.0/28 has no \
             free address (14 virtual IPs held)"
                .into()
        )
    );
}

#[test]
fn the_address_plan_is_set_once_and_allocates_for_what_exists() {
    let mut sm = StateMachine::new();
    ok(&mut sm, upsert("n1"));
    ok(&mut sm, create_service("web", EndpointMode::Vip, false));
    assert_eq!(subnet(&sm, "n1"), None, "no plan, no subnet");
    assert_eq!(vip(&sm, "web"), None);
    // Setting it allocates for the node and the service (2 events).
    assert_eq!(apply(&mut sm, plan("10.42.0.0/16", "10.43.0.0/16")), Ok(2));
    assert_eq!(subnet(&sm, "n1").as_deref(), Some("10.42.0.0/24"));
    assert_eq!(vip(&sm, "web").as_deref(), Some("10.43.0.1"));
    // The same plan again is a no-op; another is refused by name.
    assert_eq!(apply(&mut sm, plan("10.42.0.0/16", "10.43.0.0/16")), Ok(0));
    assert_eq!(
        apply(&mut sm, plan("10.88.0.0/16", "10.43.0.0/16")),
        Err(
            "set-addressing: cluster addressing field cluster_cidr: the cluster was created \
             with 10.42.0.0/16 and addresses were allocated from it; 10.88.0.0/16 cannot \
             replace it"
                .into()
        )
    );
    assert_eq!(
        apply(&mut sm, plan("10.42.0.0/16", "10.42.0.0/20")),
        Err(
            "set-addressing: cluster addressing field addressing: cluster_cidr \
             10.42.0.0/16 overlaps service_cidr 10.42.0.0/20"
                .into()
        )
    );
}

#[test]
fn a_restored_snapshot_has_the_same_allocations_and_allocates_the_same_next() {
    let mut sm = StateMachine::new();
    ok(&mut sm, plan("10.42.0.0/16", "10.43.0.0/16"));
    ok(&mut sm, upsert("n1"));
    ok(&mut sm, upsert("n2"));
    ok(&mut sm, create_service("web", EndpointMode::Vip, false));
    let tasks = vec![new_task("t1", "web", false), new_task("t2", "web", false)];
    ok(&mut sm, Command::CreateTasks { tasks });
    ok(&mut sm, assign(&["t1", "t2"], "n2"));

    let bytes = sm.snapshot().encode().expect("encodes");
    let mut restored = StateMachine::new();
    restored.restore(Snapshot::decode(&bytes).expect("decodes"));
    assert_eq!(restored, sm);
    assert_eq!(subnet(&restored, "n2").as_deref(), Some("10.42.1.0/24"));
    assert_eq!(address(&restored, "t2").as_deref(), Some("10.42.1.3"));
    assert_eq!(vip(&restored, "web").as_deref(), Some("10.43.0.1"));

    // The next allocations agree too.
    for machine in [&mut sm, &mut restored] {
        ok(machine, upsert("n3"));
        ok(machine, create_service("api", EndpointMode::Vip, false));
        let t3 = new_task("t3", "web", false);
        ok(machine, Command::CreateTasks { tasks: vec![t3] });
        ok(machine, assign(&["t3"], "n2"));
    }
    assert_eq!(restored, sm);
    assert_eq!(address(&sm, "t3").as_deref(), Some("10.42.1.4"));
    assert_eq!(subnet(&sm, "n3").as_deref(), Some("10.42.2.0/24"));
    assert_eq!(vip(&sm, "api").as_deref(), Some("10.43.0.2"));

    // A version 1 snapshot (before addressing) still reads.
    let v1 = br#"{"v":1,"snapshot":{"applied_index":3,"nodes":[],"services":[],"tasks":[]}}"#;
    let old = Snapshot::decode(v1).expect("version 1 reads");
    assert_eq!(old.addressing, None);
    assert_eq!(old.applied_index, 3);
}
