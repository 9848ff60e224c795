//! Rows and JSON keys from wire values, converted as the commands do.

use super::*;
use gantry_proto::v1 as pb;

/// A template as the controller sends it: the model's defaults on the wire.
fn template(ports: Vec<m::PortConfig>) -> pb::TaskTemplate {
    m::TaskTemplate {
        image: "nginx:1.27".into(),
        ports,
        ..Default::default()
    }
    .into()
}

fn task(slot: Option<u64>, node: Option<&str>, state: pb::TaskState, message: &str) -> pb::Task {
    pb::Task {
        id: "3f2a9c1d7e6b5a4f".into(),
        service: "svc1".into(),
        slot,
        node: node.map(str::to_string),
        spec_version: 1,
        spec: Some(template(Vec::new())),
        desired_state: pb::DesiredState::Running as i32,
        status: Some(pb::TaskStatus {
            state: state as i32,
            message: message.into(),
            error: None,
            exit_code: None,
            restarts: 0,
            health: pb::Health::None as i32,
            timestamp_unix_ms: None,
        }),
        generation: 1,
        version: 7,
        service_name: "demo_web".into(),
        attempt: 0,
        not_before_unix_ms: None,
        address: None,
    }
}

fn service(mode: pb::service_mode::Mode) -> pb::Service {
    pb::Service {
        id: "svc1".into(),
        spec: Some(pb::ServiceSpec {
            name: "web".into(),
            stack: "demo".into(),
            mode: Some(pb::ServiceMode { mode: Some(mode) }),
            task: Some(template(vec![m::PortConfig {
                published: Some(8080),
                target: 80,
                protocol: m::Protocol::Tcp,
                mode: m::PublishMode::Ingress,
            }])),
            update_config: None,
            endpoint_mode: pb::EndpointMode::Unspecified as i32,
            depends_on: Vec::new(),
        }),
        spec_version: 1,
        version: 3,
        virtual_ip: "10.43.0.5".into(),
    }
}

fn node() -> pb::Node {
    pb::Node {
        id: "node-aaaabbbbccccdddd".into(),
        spec: Some(pb::NodeSpec {
            availability: pb::Availability::Drain as i32,
            role: pb::NodeRole::Worker as i32,
            labels: [("zone".to_string(), "eu".to_string())].into(),
        }),
        status: Some(pb::NodeStatus {
            state: pb::NodeState::Ready as i32,
            address: "10.251.0.3".into(),
            hostname: "agent-1".into(),
            resources: Some(pb::Resources {
                nano_cpus: 1_500_000_000,
                memory_bytes: 2 << 30,
            }),
            platform: Some(pb::Platform {
                os: "linux".into(),
                arch: "amd64".into(),
            }),
        }),
        version: 2,
        subnet: String::new(),
    }
}

fn names() -> Names {
    let s: m::Service = service(pb::service_mode::Mode::Replicated(pb::ReplicatedMode {
        replicas: 3,
    }))
    .try_into()
    .unwrap();
    let n: m::Node = node().try_into().unwrap();
    Names::new([&s], [&n])
}

fn row(t: pb::Task) -> TaskRow {
    let t: m::Task = t.try_into().unwrap();
    TaskRow::new(&t, &names(), None)
}

#[test]
fn a_pending_task_shows_the_schedulers_reason_as_its_error() {
    let r = row(task(
        Some(2),
        None,
        pb::TaskState::Pending,
        "no node is ready (0 nodes)",
    ));
    assert_eq!(r.name, "demo_web.2");
    assert_eq!(r.state, "pending");
    assert_eq!(r.error.as_deref(), Some("no node is ready (0 nodes)"));
    let table = task_table(&[r]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        "ID             NAME         IMAGE        NODE   ADDRESS   DESIRED STATE   CURRENT STATE   RESTARTS   HEALTH   ERROR"
    );
    assert_eq!(
        lines[1],
        "3f2a9c1d7e6b   demo_web.2   nginx:1.27                    Running         Pending         0                   \"no node is ready (0 nodes)\""
    );
}

#[test]
fn a_global_task_is_named_after_its_node_id_cut_to_12() {
    let r = row(task(
        None,
        Some("node-aaaabbbbccccdddd"),
        pb::TaskState::Running,
        "started",
    ));
    assert_eq!(r.name, "demo_web.node-aaaabbb");
    assert_eq!(r.node_id.as_deref(), Some("node-aaaabbbbccccdddd"));
}

#[test]
fn a_task_of_a_removed_service_keeps_its_name() {
    let mut t = task(Some(3), None, pb::TaskState::Shutdown, "stopped");
    t.service = "gone1".into();
    t.service_name = "old_api".into();
    assert_eq!(row(t).name, "old_api.3");
}

#[test]
fn a_running_task_shows_its_node_by_hostname_and_no_error() {
    let mut t = task(
        Some(1),
        Some("node-aaaabbbbccccdddd"),
        pb::TaskState::Running,
        "started",
    );
    let status = t.status.as_mut().unwrap();
    status.restarts = 2;
    status.exit_code = Some(137);
    status.health = pb::Health::Healthy as i32;
    t.address = Some("10.42.3.7".into());
    let r = row(t);
    assert_eq!(r.address.as_deref(), Some("10.42.3.7"));
    assert!(task_table(std::slice::from_ref(&r)).contains("   10.42.3.7   "));
    assert_eq!(r.node.as_deref(), Some("agent-1"));
    assert_eq!(r.node_id.as_deref(), Some("node-aaaabbbbccccdddd"));
    assert_eq!(r.error, None);
    assert_eq!(r.restarts, 2);
    assert_eq!(r.health, "healthy");
}

#[test]
fn task_json_has_the_keys_scripts_read() {
    let r = row(task(
        Some(1),
        None,
        pb::TaskState::Pending,
        "no node is ready",
    ));
    let v: serde_json::Value =
        serde_json::from_str(&render(Format::Json, &vec![r], String::new).unwrap()).unwrap();
    let t = &v[0];
    for key in [
        "id",
        "service",
        "slot",
        "node",
        "desired_state",
        "state",
        "exit_code",
        "restarts",
        "health",
        "error",
    ] {
        assert!(t.get(key).is_some(), "missing {key} in {t}");
    }
    assert_eq!(t["service"], "web");
    assert_eq!(t["stack"], "demo");
    assert_eq!(t["slot"], 1);
    assert_eq!(t["node"], serde_json::Value::Null);
    assert_eq!(t["desired_state"], "running");
    assert_eq!(t["state"], "pending");
    assert_eq!(t["exit_code"], serde_json::Value::Null);
    assert_eq!(t["health"], "none");
    assert_eq!(t["error"], "no node is ready");
}

#[test]
fn services_list_running_over_desired_with_ports() {
    let s: m::Service = service(pb::service_mode::Mode::Replicated(pb::ReplicatedMode {
        replicas: 3,
    }))
    .try_into()
    .unwrap();
    let r = ServiceRow::new(&s, 0, 3);
    let table = service_table(std::slice::from_ref(&r));
    assert_eq!(
        table,
        "ID     NAME       MODE         REPLICAS   IMAGE        PORTS            VIP\n\
         svc1   demo_web   replicated   0/3        nginx:1.27   *:8080->80/tcp   10.43.0.5\n"
    );
    let v: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(v["name"], "web");
    assert_eq!(v["stack"], "demo");
    assert_eq!(v["mode"], "replicated");
    assert_eq!(v["replicas"], 3);
    assert_eq!(v["running"], 0);
    assert_eq!(v["desired"], 3);
    assert_eq!(v["image"], "nginx:1.27");
    assert_eq!(v["ports"][0], "*:8080->80/tcp");
    // Unspecified on the wire is vip, as in Compose.
    assert_eq!(v["endpoint_mode"], "vip");
    assert_eq!(v["virtual_ip"], "10.43.0.5");

    let g: m::Service = service(pb::service_mode::Mode::Global(pb::Empty {}))
        .try_into()
        .unwrap();
    let v = serde_json::to_value(ServiceRow::new(&g, 2, 2)).unwrap();
    assert_eq!(v["mode"], "global");
    assert_eq!(v["replicas"], serde_json::Value::Null);
}

#[test]
fn nodes_list_like_docker_node_ls() {
    let n: m::Node = node().try_into().unwrap();
    let r = NodeRow::new(&n, 4);
    assert_eq!(
        node_table(std::slice::from_ref(&r)),
        "ID             HOSTNAME   STATUS   AVAILABILITY   ADDRESS      CPUS   MEMORY    TASKS\n\
         node-aaaabbb   agent-1    Ready    Drain          10.251.0.3   1.5    2.00GiB   4\n"
    );
    let v = serde_json::to_value(&r).unwrap();
    for key in [
        "id",
        "hostname",
        "status",
        "availability",
        "address",
        "labels",
        "resources",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["status"], "ready");
    assert_eq!(v["availability"], "drain");
    assert_eq!(v["labels"]["zone"], "eu");
    assert_eq!(v["resources"]["memory_bytes"], 2u64 << 30);
    assert_eq!(v["resources"]["cpus"], 1.5);
}

#[test]
fn yaml_is_the_same_data_as_json() {
    let n: m::Node = node().try_into().unwrap();
    let rows = vec![NodeRow::new(&n, 0)];
    let yaml = render(Format::Yaml, &rows, String::new).unwrap();
    let from_yaml: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
    let from_json: serde_json::Value =
        serde_json::from_str(&render(Format::Json, &rows, String::new).unwrap()).unwrap();
    assert_eq!(from_yaml, from_json);
}

#[test]
fn durations_read_like_docker() {
    use std::time::Duration;
    assert_eq!(
        human_duration(Duration::from_millis(300)),
        "Less than a second"
    );
    assert_eq!(human_duration(Duration::from_secs(5)), "5 seconds");
    assert_eq!(human_duration(Duration::from_secs(70)), "About a minute");
    assert_eq!(human_duration(Duration::from_secs(600)), "10 minutes");
    assert_eq!(human_duration(Duration::from_secs(3 * 3600)), "3 hours");
    assert_eq!(
        current_state(m::TaskState::Running, Some(Duration::from_secs(5))),
        "Running 5 seconds ago"
    );
    assert_eq!(current_state(m::TaskState::Pending, None), "Pending");
}

#[test]
fn small_formatters() {
    assert_eq!(cpus(2_000_000_000), "2");
    assert_eq!(cpus(500_000_000), "0.5");
    assert_eq!(full_name("", "web"), "web");
    assert_eq!(full_name("demo", "web"), "demo_web");
    let host = m::PortConfig {
        published: Some(80),
        target: 8080,
        protocol: m::Protocol::Udp,
        mode: m::PublishMode::Host,
    };
    assert_eq!(port(&host), "80->8080/udp (host)");
}

#[test]
fn current_state_says_how_long_ago_from_the_status_time() {
    let mut t = task(
        Some(1),
        Some("node-aaaabbbbccccdddd"),
        pb::TaskState::Running,
        "started",
    );
    t.status.as_mut().unwrap().timestamp_unix_ms = Some(1_700_000_000_000);
    let task: m::Task = t.try_into().unwrap();
    let now = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_005_400);
    let since = since(task.status.timestamp_unix_ms, now);
    assert_eq!(since, Some(Duration::from_millis(5_400)));
    let table = task_table(&[TaskRow::new(&task, &names(), since)]);
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .contains(" Running 5 seconds ago "),
        "{table}"
    );
    // Another node's clock a little ahead: just now, not a panic.
    let behind = std::time::UNIX_EPOCH + Duration::from_millis(1_699_999_999_000);
    assert_eq!(
        super::since(Some(1_700_000_000_000), behind),
        Some(Duration::ZERO)
    );
    assert_eq!(super::since(None, now), None);
}
