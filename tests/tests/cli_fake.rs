//! The client commands end to end against a scripted `Control` server on
//! loopback: the real `gantry` binary, real gRPC, canned answers. This pins
//! what the CLI sends (a dry run is a dry run, the stack is the normalized
//! one), what it prints, and its exit codes, including the streaming
//! commands (`exec` with stdin, `service logs`, `events`) that need agents
//! with a real controller. `cli.rs` runs the same commands against a real
//! `gantry controller`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use gantry_controller::model as m;
use gantry_controller::wire;
use gantry_proto::tonic::{self, Request, Response, Status, Streaming};
use gantry_proto::v1 as pb;
use gantry_proto::v1::control_server::{Control, ControlServer};
use tokio_stream::Stream;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What the fake saw.
#[derive(Default)]
struct Seen {
    /// (service, dry_run) per deployed service.
    deploys: Vec<(String, bool)>,
    deployed_stack: Option<String>,
    scales: Vec<(String, u64)>,
    node_updates: Vec<pb::UpdateNodeRequest>,
    exec_start: Option<pb::ExecStart>,
    /// `list_tasks` calls so far: task 3 exists from the third on (a
    /// replacement that starts while `service logs` runs).
    task_lists: usize,
}

#[derive(Clone, Default)]
struct Fake {
    seen: Arc<Mutex<Seen>>,
    /// A controller that cannot serve now (no leader): the requests the
    /// failover test makes answer its UNAVAILABLE, marked `gantry-retry`.
    failing: bool,
}

impl Fake {
    fn check(&self) -> Result<(), Status> {
        if !self.failing {
            return Ok(());
        }
        let mut status = Status::unavailable("no quorum: 1 of 3 controllers reachable");
        status.metadata_mut().insert(
            gantry_controller::server::replication::RETRY_METADATA,
            tonic::metadata::MetadataValue::from_static("another-controller"),
        );
        Err(status)
    }
}

fn service() -> pb::Service {
    m::Service {
        id: m::ServiceId::new("svc-1").unwrap(),
        spec: m::ServiceSpec {
            name: "web".into(),
            stack: "demo".into(),
            mode: m::ServiceMode::Replicated { replicas: 2 },
            task: m::TaskTemplate {
                image: "nginx:1.27".into(),
                ..Default::default()
            },
            update_config: None,
            endpoint_mode: Default::default(),
            depends_on: Default::default(),
        },
        spec_version: 1,
        version: 4,
        virtual_ip: None,
    }
    .into()
}

fn task(slot: u64) -> pb::Task {
    m::Task {
        id: m::TaskId::new(format!("task-{slot}")).unwrap(),
        service: m::ServiceId::new("svc-1").unwrap(),
        slot: Some(slot),
        node: None,
        spec_version: 1,
        spec: m::TaskTemplate {
            image: "nginx:1.27".into(),
            ..Default::default()
        },
        desired_state: m::DesiredState::Running,
        status: m::TaskStatus {
            state: m::TaskState::Pending,
            message: "no node is ready (0 nodes)".into(),
            ..Default::default()
        },
        generation: 1,
        version: 5,
        service_name: "demo_web".into(),
        attempt: 0,
        not_before_unix_ms: None,
        address: None,
    }
    .into()
}

fn node(availability: m::Availability) -> pb::Node {
    m::Node {
        id: m::NodeId::new("node-1").unwrap(),
        spec: m::NodeSpec {
            availability,
            ..Default::default()
        },
        status: m::NodeStatus {
            state: m::NodeState::Ready,
            address: "127.0.0.1".into(),
            hostname: "agent-1".into(),
            resources: m::Resources {
                nano_cpus: 2_000_000_000,
                memory_bytes: 1 << 30,
            },
            platform: m::Platform {
                os: "linux".into(),
                arch: "amd64".into(),
            },
        },
        version: 2,
        subnet: None,
    }
    .into()
}

fn known(service: &str) -> Result<(), Status> {
    match service {
        "web" | "demo_web" | "svc-1" => Ok(()),
        other => Err(Status::not_found(format!("service {other} not found"))),
    }
}

#[tonic::async_trait]
impl Control for Fake {
    async fn deploy_stack(
        &self,
        request: Request<pb::DeployStackRequest>,
    ) -> Result<Response<pb::DeployStackResponse>, Status> {
        let req = request.into_inner();
        let stack = wire::stack_from_json(&req.stack_json)
            .map_err(|e| Status::invalid_argument(format!("stack_json: {e}")))?;
        let mut seen = self.seen.lock().unwrap();
        seen.deployed_stack = Some(stack.name.clone());
        for name in stack.services.keys() {
            seen.deploys.push((name.clone(), req.dry_run));
        }
        Ok(Response::new(pb::DeployStackResponse {
            stack: stack.name.clone(),
            changes: Some(pb::StackChanges {
                create: stack.services.keys().cloned().collect(),
                ..Default::default()
            }),
            revision: if req.dry_run { 0 } else { 9 },
        }))
    }

    async fn list_stacks(
        &self,
        _: Request<pb::ListStacksRequest>,
    ) -> Result<Response<pb::ListStacksResponse>, Status> {
        Ok(Response::new(pb::ListStacksResponse {
            stacks: vec![pb::StackSummary {
                name: "demo".into(),
                services: 1,
            }],
            revision: 9,
        }))
    }

    async fn stack_tasks(
        &self,
        request: Request<pb::StackTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        if request.into_inner().stack != "demo" {
            return Err(Status::not_found("stack not found"));
        }
        Ok(Response::new(pb::ListTasksResponse {
            tasks: vec![task(1), task(2)],
            revision: 9,
        }))
    }

    async fn remove_stack(
        &self,
        request: Request<pb::RemoveStackRequest>,
    ) -> Result<Response<pb::RemoveStackResponse>, Status> {
        let stack = request.into_inner().stack;
        if stack != "demo" {
            return Err(Status::not_found(format!("stack {stack} not found")));
        }
        Ok(Response::new(pb::RemoveStackResponse {
            removed: vec!["web".into()],
            revision: 10,
        }))
    }

    async fn list_services(
        &self,
        _: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        Ok(Response::new(pb::ListServicesResponse {
            services: vec![pb::ServiceInfo {
                service: Some(service()),
                running: 0,
                desired: 2,
            }],
            revision: 9,
        }))
    }

    async fn inspect_service(
        &self,
        request: Request<pb::ServiceRef>,
    ) -> Result<Response<pb::ServiceInfo>, Status> {
        self.check()?;
        known(&request.into_inner().service)?;
        Ok(Response::new(pb::ServiceInfo {
            service: Some(service()),
            running: 1,
            desired: 2,
        }))
    }

    async fn scale_service(
        &self,
        request: Request<pb::ScaleServiceRequest>,
    ) -> Result<Response<pb::ServiceInfo>, Status> {
        let req = request.into_inner();
        known(&req.service)?;
        self.seen
            .lock()
            .unwrap()
            .scales
            .push((req.service, req.replicas));
        Ok(Response::new(pb::ServiceInfo {
            service: Some(service()),
            running: 0,
            desired: req.replicas,
        }))
    }

    async fn remove_service(
        &self,
        request: Request<pb::ServiceRef>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.check()?;
        known(&request.into_inner().service)?;
        Ok(Response::new(pb::WriteResponse { revision: 11 }))
    }

    type ServiceLogsStream = BoxStream<pb::LogEntry>;

    async fn service_logs(
        &self,
        request: Request<pb::ServiceLogsRequest>,
    ) -> Result<Response<Self::ServiceLogsStream>, Status> {
        let req = request.into_inner();
        known(&req.service)?;
        let entry = |stream: pb::LogStream, line: &str| {
            Ok(pb::LogEntry {
                task: "task-1".into(),
                node: "node-1".into(),
                stream: stream as i32,
                time_unix_nanos: 0,
                line: line.as_bytes().to_vec(),
            })
        };
        let mut entries = vec![
            entry(pb::LogStream::Stdout, &format!("hello tail={:?}", req.tail)),
            entry(pb::LogStream::Stderr, "oops"),
        ];
        if req.follow {
            entries.push(Ok(pb::LogEntry {
                task: "task-3".into(),
                ..entry(pb::LogStream::Stdout, "from the replacement")?
            }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(entries))))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::TaskFilter>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        self.check()?;
        let filter = request.into_inner();
        if !filter.service.is_empty() {
            known(&filter.service)?;
        }
        let running = filter.states.contains(&(pb::TaskState::Running as i32));
        let mut tasks = vec![task(2), task(1)];
        let lists = {
            let mut seen = self.seen.lock().unwrap();
            seen.task_lists += 1;
            seen.task_lists
        };
        if lists > 2 && !running {
            tasks.push(task(3));
        }
        if running {
            for t in &mut tasks {
                t.status.as_mut().unwrap().state = pb::TaskState::Running as i32;
                t.node = Some("node-1".into());
            }
        }
        Ok(Response::new(pb::ListTasksResponse { tasks, revision: 9 }))
    }

    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        Ok(Response::new(pb::ListNodesResponse {
            nodes: vec![node(m::Availability::Active)],
            revision: 9,
        }))
    }

    async fn inspect_node(
        &self,
        request: Request<pb::NodeRef>,
    ) -> Result<Response<pb::Node>, Status> {
        match request.into_inner().node.as_str() {
            "agent-1" | "node-1" => Ok(Response::new(node(m::Availability::Active))),
            other => Err(Status::not_found(format!("node {other} not found"))),
        }
    }

    async fn update_node(
        &self,
        request: Request<pb::UpdateNodeRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.check()?;
        let req = request.into_inner();
        self.seen.lock().unwrap().node_updates.push(req);
        Ok(Response::new(pb::WriteResponse { revision: 7 }))
    }

    async fn remove_node(
        &self,
        _request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        Err(Status::unimplemented("remove_node"))
    }

    type EventsStream = BoxStream<pb::Event>;

    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let req = request.into_inner();
        if req.after_revision == 1 {
            return Err(Status::out_of_range("revision 1 is compacted"));
        }
        let events = vec![
            Ok(pb::Event {
                revision: req.after_revision + 1,
                action: pb::EventAction::Create as i32,
                object: Some(pb::event::Object::Service(service())),
            }),
            Ok(pb::Event {
                revision: req.after_revision + 2,
                action: pb::EventAction::Update as i32,
                object: Some(pb::event::Object::Task(task(1))),
            }),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    type ExecStream = BoxStream<pb::ExecServerMessage>;

    /// Echoes stdin on stdout once stdin is closed, writes `err` on stderr,
    /// and exits with the code the command's first word names.
    async fn exec(
        &self,
        request: Request<Streaming<pb::ExecClientMessage>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        use pb::exec_client_message::Message as C;
        use pb::exec_server_message::Message as S;
        self.check()?;
        let mut inbound = request.into_inner();
        let start = match inbound.message().await? {
            Some(pb::ExecClientMessage {
                message: Some(C::Start(start)),
            }) => start,
            _ => return Err(Status::invalid_argument("the first message must be start")),
        };
        let code: i32 = start.command[0].parse().unwrap_or(3);
        self.seen.lock().unwrap().exec_start = Some(start);
        let mut input = Vec::new();
        while let Some(msg) = inbound.message().await? {
            match msg.message {
                Some(C::Stdin(bytes)) => input.extend(bytes),
                Some(C::CloseStdin(_)) => break,
                _ => {}
            }
        }
        let out = |m| Ok(pb::ExecServerMessage { message: Some(m) });
        let replies = vec![
            out(S::Stdout(input)),
            out(S::Stderr(b"err".to_vec())),
            out(S::Exit(pb::ExecExit { code })),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(replies))))
    }
}

/// The fake, serving on a loopback port from its own thread until the test
/// process ends.
fn serve() -> (SocketAddr, Arc<Mutex<Seen>>) {
    serve_fake(Fake::default())
}

fn serve_fake(fake: Fake) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let seen = fake.seen.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            tonic::transport::Server::builder()
                .add_service(ControlServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
    });
    (rx.recv().unwrap(), seen)
}

fn gantry(addr: SocketAddr, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(gantry_tests::gantry_bin())
        .arg("--controller")
        .arg(addr.to_string())
        .args(args)
        .env_remove("GANTRY_CONTROLLER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn deploy_sends_the_normalized_stack_and_a_dry_run_is_a_dry_run() {
    let (addr, seen) = serve();
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("shop");
    std::fs::create_dir(&project).unwrap();
    let file = project.join("compose.yaml");
    std::fs::write(
        &file,
        "services:\n  web:\n    image: nginx:${TAG:-1.27}\n    build: .\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();

    let out = gantry(
        addr,
        &["deploy", "-f", file, "--dry-run", "-o", "json"],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stack"]["name"], "shop");
    assert_eq!(v["stack"]["services"]["web"]["image"], "nginx:1.27");
    assert_eq!(v["changes"]["create"][0], "web");
    assert_eq!(v["dry_run"], true);
    // The unsupported `build:` is a warning naming it, on stderr.
    assert!(
        stderr(&out).contains("services.web.build"),
        "{}",
        stderr(&out)
    );
    assert!(
        seen.lock().unwrap().deploys.last().unwrap().1,
        "dry_run not sent"
    );

    let out = gantry(addr, &["deploy", "-f", file, "--stack", "demo"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Creating service demo_web\n");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.deployed_stack.as_deref(), Some("demo"));
    assert!(
        !seen.deploys.last().unwrap().1,
        "a deploy sent as a dry run"
    );
}

#[test]
fn a_bad_compose_file_exits_2_naming_the_key_without_sending_anything() {
    let (addr, seen) = serve();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("compose.yaml");
    std::fs::write(
        &file,
        "services:\n  web:\n    image: nginx\n    deploy:\n      replcas: 2\n",
    )
    .unwrap();
    let out = gantry(addr, &["deploy", "-f", file.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("replcas") && err.contains("line 5"), "{err}");
    assert!(seen.lock().unwrap().deploys.is_empty());
}

#[test]
fn lists_print_tables_and_json() {
    let (addr, _) = serve();
    let out = gantry(addr, &["service", "ls"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out)
            .lines()
            .nth(1)
            .unwrap()
            .contains("demo_web   replicated   0/2"),
        "{}",
        stdout(&out)
    );

    let out = gantry(addr, &["service", "ps", "web", "-o", "json"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["service"], "web");
    assert_eq!(v[0]["state"], "pending");
    assert_eq!(v[0]["error"], "no node is ready (0 nodes)");

    let out = gantry(addr, &["stack", "ps", "demo"], b"");
    assert!(
        stdout(&out).contains("\"no node is ready (0 nodes)\""),
        "{}",
        stdout(&out)
    );

    let out = gantry(addr, &["stack", "ls", "-o", "yaml"], b"");
    assert_eq!(stdout(&out), "- name: demo\n  services: 1\n");

    let out = gantry(addr, &["node", "ls"], b"");
    assert!(
        stdout(&out).contains("agent-1    Ready    Active"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn unknown_names_exit_2_and_other_failures_exit_1() {
    let (addr, seen) = serve();
    let out = gantry(addr, &["service", "inspect", "nope"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("service nope not found"),
        "{}",
        stderr(&out)
    );

    // Every pair is tried; the first failure decides the exit code.
    let out = gantry(addr, &["service", "scale", "web=3", "nope=1"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stdout(&out), "web scaled to 3\n");
    assert_eq!(seen.lock().unwrap().scales, [("web".to_string(), 3)]);

    let out = gantry(addr, &["stack", "rm", "demo"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "Removing service demo_web\n");

    // A compacted revision is the controller's answer, not bad input.
    let out = gantry(addr, &["events", "--since", "1"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("OUT_OF_RANGE"), "{}", stderr(&out));
}

#[test]
fn node_update_sends_only_what_was_asked() {
    let (addr, seen) = serve();
    let out = gantry(
        addr,
        &[
            "node",
            "update",
            "--availability",
            "drain",
            "--label-add",
            "zone=eu",
            "agent-1",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The node as named, as `docker node update` prints it.
    assert_eq!(stdout(&out), "agent-1\n");
    let seen = seen.lock().unwrap();
    let req = &seen.node_updates[0];
    assert_eq!(req.node, "agent-1");
    assert_eq!(req.availability, Some(pb::Availability::Drain as i32));
    assert_eq!(req.label_add.get("zone").map(String::as_str), Some("eu"));
    assert!(req.label_rm.is_empty());
}

#[test]
fn exec_relays_stdin_output_and_the_exit_code() {
    let (addr, seen) = serve();
    // A service name picks its first running task (lowest slot).
    let out = gantry(
        addr,
        &["exec", "-i", "web", "--", "7", "arg"],
        b"some input",
    );
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(out.stdout, b"some input");
    assert_eq!(out.stderr, b"err");
    let start = seen.lock().unwrap().exec_start.clone().unwrap();
    assert_eq!(start.task, "task-1");
    assert_eq!(start.command, ["7", "arg"]);

    // Without -i the process sees end of file at once; a task id is used as is.
    let out = gantry(addr, &["exec", "task-9", "0"], b"ignored");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, b"");
    assert_eq!(
        seen.lock().unwrap().exec_start.clone().unwrap().task,
        "task-9"
    );
}

/// A controller that cannot serve (its UNAVAILABLE marked `gantry-retry`)
/// first in the list: the CLI goes on with the next one, for reads, writes
/// and opening an exec; a removal that the second controller finds already
/// gone was done by the first attempt, whose outcome was unknown. Named
/// alone, the failing controller's answer is the CLI's.
#[test]
fn requests_fail_over_to_the_next_controller() {
    let (bad, bad_seen) = serve_fake(Fake {
        failing: true,
        ..Fake::default()
    });
    let (good, seen) = serve();
    let both = format!("{bad},{good}");
    let run = |args: &[&str]| {
        Command::new(gantry_tests::gantry_bin())
            .args(["--controller", &both])
            .args(args)
            .env_remove("GANTRY_CONTROLLER")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&["node", "update", "--label-add", "zone=eu", "n1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("the controller at {bad} failed (no quorum")),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(&format!("going on with {good}")));
    assert_eq!(seen.lock().unwrap().node_updates.len(), 1);
    assert!(bad_seen.lock().unwrap().node_updates.is_empty());

    let out = run(&["exec", "web", "--", "5"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(
        seen.lock().unwrap().exec_start.clone().unwrap().task,
        "task-1"
    );

    let out = run(&["service", "rm", "gone"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "gone\n");
    assert!(
        stderr(&out)
            .contains("an earlier attempt, whose controller failed under it, may have removed it"),
        "{}",
        stderr(&out)
    );

    // Named alone, a controller is not swapped for another.
    let out = gantry(
        bad,
        &["node", "update", "--label-add", "zone=eu", "n1"],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no quorum"), "{}", stderr(&out));
}

#[test]
fn logs_and_events_stream_lines() {
    let (addr, _) = serve();
    let out = gantry(addr, &["service", "logs", "--tail", "5", "web"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "demo_web.1.task-1    | hello tail=Some(5)\n");
    assert_eq!(stderr(&out), "demo_web.1.task-1    | oops\n");
    // A task that was not there when the logs began is looked up by name.
    let out = gantry(addr, &["service", "logs", "--follow", "web"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "demo_web.1.task-1    | hello tail=None\ndemo_web.3.task-3    | from the replacement\n"
    );

    let out = gantry(addr, &["events", "--since", "10"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(
        lines[0],
        "11 service create svc-1 (name=web, stack=demo, image=nginx:1.27, replicas=2)"
    );
    assert!(lines[1].starts_with("12 task update task-1 (service=demo_web, slot=1, state=pending"));

    let out = gantry(addr, &["events", "-o", "json"], b"");
    let first: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(first["kind"], "service");
    assert_eq!(first["object"]["spec"]["name"], "web");
}

#[test]
fn an_unreachable_controller_names_the_address_and_its_source() {
    let out = Command::new(gantry_tests::gantry_bin())
        .args(["service", "ls"])
        .env("GANTRY_CONTROLLER", "127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach the controller at 127.0.0.1:1 (from GANTRY_CONTROLLER)"),
        "{err}"
    );
    assert!(err.contains("gantry up"), "{err}");
}
