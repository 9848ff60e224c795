//! End-to-end tests of the agent process (`gantry agent`): the real binary
//! with the real worker and engine, as root, against a controller played by
//! an in-process tonic `Dispatcher` written here (it accepts hellos, sends
//! assignment sets, records statuses, and can drop the stream).
//!
//! The agent runs as a child process, so that it can be killed with -9 and
//! started again on the same data directory.

use gantry_agent::engine::container::{ContainerInfo, ContainerState, Engine, EngineConfig};
use gantry_agent::paths::DataDir;
use gantry_proto::v1 as pb;
use gantry_proto::v1::dispatcher_server::{Dispatcher, DispatcherServer};
use gantry_tests::bundle::{APPLETS, HOST_BUSYBOX};
use gantry_tests::gantry_bin;
use gantry_tests::image_fixtures::{Registry, have, skopeo_push, write_single_layer_layout};
use serde_json::json;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const IMAGE: &str = "gtest/busybox:latest";
const WAIT: Duration = Duration::from_secs(20);

macro_rules! require {
    () => {
        if let Some(reason) = gantry_tests::engine_test_prerequisites() {
            println!("SKIPPED: {reason}");
            return;
        }
    };
}

// ---------------------------------------------------------------------------
// The controller, played in process.

/// What the fake controller saw.
#[derive(Default)]
struct Seen {
    /// Every hello, in order; the session number is its index + 1.
    hellos: Vec<pb::Hello>,
    /// Every status update, with the session it came on.
    updates: Vec<(usize, pb::TaskStatusUpdate)>,
    /// Log chunks.
    logs: Vec<pb::LogChunk>,
    /// Exec output.
    exec: Vec<pb::ExecOutput>,
    heartbeats: u64,
    /// The current session's outbound stream.
    session: Option<mpsc::Sender<Result<pb::ControllerMessage, Status>>>,
    /// The full set sent at the start of every session.
    full_set: Option<pb::AssignmentSet>,
    generation: u64,
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Seen>,
    changed: Condvar,
}

#[derive(Clone)]
struct FakeDispatcher(Arc<Shared>);

/// A full assignment set of `tasks` at `generation`.
fn full_set(tasks: Vec<pb::Task>, generation: u64) -> pb::AssignmentSet {
    pb::AssignmentSet {
        generation,
        full: true,
        changes: tasks
            .into_iter()
            .map(|mut task| {
                task.generation = generation;
                pb::AssignmentChange {
                    action: pb::AssignmentAction::Update as i32,
                    task: Some(task),
                }
            })
            .collect(),
    }
}

fn message(m: pb::controller_message::Message) -> Result<pb::ControllerMessage, Status> {
    Ok(pb::ControllerMessage { message: Some(m) })
}

#[tonic::async_trait]
impl Dispatcher for FakeDispatcher {
    type SessionStream = ReceiverStream<Result<pb::ControllerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        use pb::agent_message::Message as A;
        use pb::controller_message::Message as C;
        let mut inbound = request.into_inner();
        let Some(pb::AgentMessage {
            message: Some(A::Hello(hello)),
        }) = inbound.message().await?
        else {
            return Err(Status::invalid_argument("hello first"));
        };
        let (tx, rx) = mpsc::channel(64);
        let number = {
            let mut seen = self.0.seen.lock().unwrap();
            seen.hellos.push(hello);
            let number = seen.hellos.len();
            let accepted = C::Accepted(pb::SessionAccepted {
                session_id: format!("s{number}"),
                heartbeat_period_ms: 200,
                lease_ms: 600,
                protocol_version: gantry_proto::PROTOCOL_VERSION,
                controllers: Vec::new(),
            });
            tx.try_send(message(accepted)).unwrap();
            if let Some(full) = seen.full_set.clone() {
                tx.try_send(message(C::Assignments(full))).unwrap();
            }
            seen.session = Some(tx);
            number
        };
        self.0.changed.notify_all();
        let shared = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let mut seen = shared.seen.lock().unwrap();
                match m.message {
                    Some(A::Status(s)) => seen
                        .updates
                        .extend(s.updates.into_iter().map(|u| (number, u))),
                    Some(A::Heartbeat(_)) => seen.heartbeats += 1,
                    Some(A::Logs(chunk)) => seen.logs.push(chunk),
                    Some(A::Exec(out)) => seen.exec.push(out),
                    _ => {}
                }
                drop(seen);
                shared.changed.notify_all();
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A Dispatcher server on a loopback port, on a runtime of its own.
///
/// The port is a front that plays the controller's one listener: HTTP/2
/// (gRPC) goes to the Dispatcher, HTTP/1.1 (`/v2/`, the registry agents
/// pull from) to `registry` when there is one, else is closed.
struct FakeController {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeController {
    fn start() -> FakeController {
        FakeController::with_registry(None)
    }

    fn with_registry(registry: Option<u16>) -> FakeController {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shared = Arc::new(Shared::default());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let grpc = listener.local_addr().unwrap();
        let front = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = front.local_addr().unwrap();
        runtime.spawn(split_front(front, grpc, registry));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = DispatcherServer::new(FakeDispatcher(shared.clone()));
        runtime.spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        FakeController {
            shared,
            addr,
            stop: Some(stop),
            runtime: Some(runtime),
        }
    }

    /// Makes `tasks` the node's whole assignment set, at a new generation.
    fn assign(&self, tasks: Vec<pb::Task>) {
        let mut seen = self.shared.seen.lock().unwrap();
        seen.generation += 1;
        let set = full_set(tasks, seen.generation);
        seen.full_set = Some(set.clone());
        if let Some(session) = &seen.session {
            let _ = session.try_send(message(pb::controller_message::Message::Assignments(set)));
        }
    }

    /// Plays a controller that restarted and lost its generation count:
    /// the stream ends, and the next session opens with `tasks` at
    /// generation 1.
    fn restart_with(&self, tasks: Vec<pb::Task>) {
        let mut seen = self.shared.seen.lock().unwrap();
        seen.generation = 1;
        seen.full_set = Some(full_set(tasks, 1));
        seen.session = None;
    }

    fn send(&self, m: pb::controller_message::Message) {
        let seen = self.shared.seen.lock().unwrap();
        seen.session
            .as_ref()
            .expect("a session")
            .try_send(message(m))
            .unwrap();
    }

    /// Ends the current stream (as a controller that lost it would).
    fn drop_session(&self) {
        self.shared.seen.lock().unwrap().session = None;
    }

    /// Waits until `pred` holds; panics after `timeout` with what was seen.
    #[track_caller]
    fn wait_for<T>(&self, what: &str, timeout: Duration, pred: impl Fn(&Seen) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        let mut seen = self.shared.seen.lock().unwrap();
        loop {
            if let Some(v) = pred(&seen) {
                return v;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let updates: Vec<String> = seen
                    .updates
                    .iter()
                    .map(|(n, u)| format!("  session {n}: {u:?}"))
                    .collect();
                panic!(
                    "{what}: not within {timeout:?}; {} hellos, updates:\n{}",
                    seen.hellos.len(),
                    updates.join("\n")
                );
            }
            seen = self.shared.changed.wait_timeout(seen, left).unwrap().0;
        }
    }

    /// Waits for a status of `task` in `state` on session `session` (any
    /// session: 0).
    #[track_caller]
    fn wait_status(&self, task: &str, state: pb::TaskState, session: usize) -> pb::TaskStatus {
        self.wait_for(
            &format!("task {task} {state:?} on session {session}"),
            WAIT,
            |seen| {
                seen.updates.iter().find_map(|(n, u)| {
                    let s = u.status.as_ref()?;
                    (u.task == task && s.state == state as i32 && (session == 0 || *n == session))
                        .then(|| s.clone())
                })
            },
        )
    }
}

/// Sends each connection to the gRPC server or the registry by its first
/// bytes (the HTTP/2 preface starts with `PRI`).
async fn split_front(front: tokio::net::TcpListener, grpc: SocketAddr, registry: Option<u16>) {
    while let Ok((mut inbound, _)) = front.accept().await {
        tokio::spawn(async move {
            let mut head = [0u8; 3];
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match inbound.peek(&mut head).await {
                    Ok(3) => break,
                    Ok(0) | Err(_) => return,
                    Ok(_) if Instant::now() > deadline => return,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            let target = if &head == b"PRI" {
                grpc
            } else {
                match registry {
                    Some(port) => SocketAddr::from(([127, 0, 0, 1], port)),
                    None => return,
                }
            };
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

impl Drop for FakeController {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

// ---------------------------------------------------------------------------
// The node: a data directory with the test image, and the agent process.

/// A layer with busybox, its applets, `/tmp` and `/etc/passwd`.
fn busybox_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        match link {
            Some(target) => b.append_link(&mut h, path, target).unwrap(),
            None => b.append_data(&mut h, path, data).unwrap(),
        }
    };
    for d in ["bin/", "etc/", "proc/", "sys/", "dev/"] {
        add(d, tar::EntryType::Directory, 0o755, &[], None);
    }
    add("tmp/", tar::EntryType::Directory, 0o1777, &[], None);
    let busybox = std::fs::read(HOST_BUSYBOX).unwrap();
    add(
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        &busybox,
        None,
    );
    for applet in APPLETS {
        add(
            &format!("bin/{applet}"),
            tar::EntryType::Symlink,
            0o777,
            &[],
            Some("busybox"),
        );
    }
    add(
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n",
        None,
    );
    b.into_inner().unwrap()
}

struct Node {
    data: tempfile::TempDir,
    engine: Engine,
    agent: Option<Child>,
    controller: SocketAddr,
}

impl Node {
    fn new(controller: &FakeController) -> Node {
        let data = tempfile::Builder::new()
            .prefix("gantry-ag-")
            .tempdir()
            .unwrap();
        let layout = data.path().join("layout");
        write_single_layer_layout(
            &layout,
            &busybox_layer(),
            &[(IMAGE, json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}))],
        );
        let out = Command::new(gantry_bin())
            .args(["image", "import", "--data-dir"])
            .arg(data.path())
            .arg(&layout)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "image import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let engine = Engine::open(EngineConfig {
            data_dir: DataDir::new(data.path()),
            shim_binary: gantry_bin(),
        })
        .unwrap();
        let mut node = Node {
            data,
            engine,
            agent: None,
            controller: controller.addr,
        };
        node.start_agent();
        node
    }

    fn start_agent(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("agent.log"))
            .unwrap();
        let child = Command::new(gantry_bin())
            .arg("agent")
            .arg("--join")
            .arg(self.controller.to_string())
            .args(["--hostname", "node-a", "--label", "zone=eu"])
            .args(["--cpus", "2", "--memory", "1g", "--data-dir"])
            .arg(self.data.path())
            .env("GANTRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }

    fn containers(&self) -> Vec<ContainerInfo> {
        self.engine.list().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        if std::thread::panicking() {
            eprintln!("agent log:\n{}", self.log());
        }
        if let Ok(list) = self.engine.list() {
            for info in list {
                let _ = self.engine.remove(&info.id, true);
            }
        }
        let prefix = self.data.path().display().to_string();
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<&str> = info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(&prefix))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// A task of service `svc1` (`demo_web`) running `sh -c script` with
/// restart `any`.
fn task(id: &str, script: &str) -> pb::Task {
    pb::Task {
        id: id.into(),
        service: "svc1".into(),
        service_name: "demo_web".into(),
        slot: Some(1),
        spec: Some(pb::TaskTemplate {
            image: IMAGE.into(),
            command: Some(pb::StringList {
                items: vec!["sh".into(), "-c".into(), script.into()],
            }),
            restart_policy: Some(pb::RestartPolicy {
                condition: pb::RestartCondition::Any as i32,
                delay_ms: 0,
                max_attempts: None,
                window_ms: None,
            }),
            stop_grace_period_ms: Some(500),
            // The agent here runs in the machine's own network namespace (to
            // reach the in-process controller on loopback): the host network
            // keeps these tasks from building a bridge and nft table there.
            // The bridge has its own test below, which undoes what it makes.
            host_network: true,
            ..pb::TaskTemplate::default()
        }),
        desired_state: pb::DesiredState::Running as i32,
        ..pb::Task::default()
    }
}

fn running_container<'a>(node: &'a [ContainerInfo], task: &str) -> Option<&'a ContainerInfo> {
    node.iter().find(|c| {
        c.config.labels.get("gantry.task.id").map(String::as_str) == Some(task)
            && c.state == ContainerState::Running
    })
}

// ---------------------------------------------------------------------------

#[test]
fn hello_then_assignment_runs_and_removal_stops() {
    require!();
    let controller = FakeController::start();
    let node = Node::new(&controller);
    let hello = controller.wait_for("hello", WAIT, |s| s.hellos.first().cloned());
    let kept = std::fs::read_to_string(node.data.path().join("agent/node-id")).unwrap();
    assert_eq!(hello.node_id, kept.trim());
    assert_eq!(hello.hostname, "node-a");
    assert_eq!(hello.labels.get("zone").map(String::as_str), Some("eu"));
    let resources = hello.resources.unwrap();
    assert_eq!(resources.nano_cpus, 2_000_000_000);
    assert_eq!(resources.memory_bytes, 1 << 30);
    assert_eq!(hello.platform.unwrap().os, "linux");
    assert_eq!(hello.protocol_version, gantry_proto::PROTOCOL_VERSION);
    assert_eq!(hello.last_generation, 0);
    // The address that reaches the controller (loopback here).
    assert_eq!(hello.address, "127.0.0.1");

    controller.assign(vec![task("task1run", "exec sleep 1000")]);
    let running = controller.wait_status("task1run", pb::TaskState::Running, 1);
    assert_eq!(running.restarts, 0);
    // Stamped with the time of the state change, by the agent's clock.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let at = running
        .timestamp_unix_ms
        .expect("a running status has a time");
    assert!(at <= now && now - at < 60_000, "stamped {at}, now {now}");
    let update = controller.wait_for("generation", WAIT, |s| {
        s.updates
            .iter()
            .find(|(_, u)| u.task == "task1run")
            .map(|(_, u)| u.generation)
    });
    assert_eq!(update, 1, "statuses carry the task's generation");
    let containers = node.containers();
    let c = running_container(&containers, "task1run").expect("a running container");
    // Named like a Swarm task: the service's name, not its id.
    assert_eq!(c.name, "demo_web.1.task1run");
    // Heartbeats flow at the accepted period (200 ms).
    controller.wait_for("heartbeats", WAIT, |s| (s.heartbeats >= 2).then_some(()));

    controller.assign(vec![]);
    let shutdown = controller.wait_status("task1run", pb::TaskState::Shutdown, 1);
    assert!(
        shutdown.message.contains("no longer assigned"),
        "{shutdown:?}"
    );
    assert!(node.containers().is_empty(), "the container is removed");
}

#[test]
fn a_dropped_stream_reconnects_without_touching_containers() {
    require!();
    let controller = FakeController::start();
    let node = Node::new(&controller);
    controller.assign(vec![task("task2keep", "exec sleep 1000")]);
    controller.wait_status("task2keep", pb::TaskState::Running, 1);
    let before = node.containers();
    let pid = running_container(&before, "task2keep").unwrap().pid;
    let dropped = Instant::now();
    controller.drop_session();
    controller.wait_for("a second session", WAIT, |s| {
        (s.hellos.len() >= 2).then_some(())
    });
    println!("reconnected after {:?}", dropped.elapsed());
    let hello = controller.shared.seen.lock().unwrap().hellos[1].clone();
    assert_eq!(hello.last_generation, 1, "the reconnect says what it has");
    // The current status is re-sent on the new session.
    let status = controller.wait_status("task2keep", pb::TaskState::Running, 2);
    assert_eq!(status.restarts, 0);
    let after = node.containers();
    let c = running_container(&after, "task2keep").expect("still running");
    assert_eq!(c.pid, pid, "the container was not restarted");
    assert!(
        dropped.elapsed() < Duration::from_secs(3),
        "reconnect took {:?}",
        dropped.elapsed()
    );

    // A controller that restarted counting generations from 1 again: the
    // full set that opens the session is applied all the same.
    controller.assign(vec![task("task2keep", "exec sleep 1000")]);
    controller.restart_with(vec![
        task("task2keep", "exec sleep 1000"),
        task("task2new", "exec sleep 1000"),
    ]);
    controller.wait_status("task2new", pb::TaskState::Running, 3);
    let after = node.containers();
    assert_eq!(
        running_container(&after, "task2keep").unwrap().pid,
        pid,
        "still the same container"
    );
}

#[test]
fn an_agent_killed_9_and_restarted_adopts_its_containers() {
    require!();
    let controller = FakeController::start();
    let mut node = Node::new(&controller);
    controller.assign(vec![task("task3adopt", "exec sleep 1000")]);
    controller.wait_status("task3adopt", pb::TaskState::Running, 1);
    let before = node.containers();
    let pid = running_container(&before, "task3adopt").unwrap().pid;
    let first_id = controller
        .wait_for("hello", WAIT, |s| s.hellos.first().cloned())
        .node_id;
    node.kill_agent();
    // Killed -9: the container does not notice.
    let during = node.containers();
    assert_eq!(running_container(&during, "task3adopt").unwrap().pid, pid);
    node.start_agent();
    let hello = controller.wait_for("a second hello", WAIT, |s| s.hellos.get(1).cloned());
    assert_eq!(hello.node_id, first_id, "the same node comes back");
    assert_eq!(
        hello.last_generation, 0,
        "a new process has applied nothing"
    );
    let status = controller.wait_status("task3adopt", pb::TaskState::Running, 2);
    assert!(status.message.contains("adopted"), "{status:?}");
    assert_eq!(status.restarts, 0);
    let after = node.containers();
    assert_eq!(after.len(), 1);
    assert_eq!(
        running_container(&after, "task3adopt").unwrap().pid,
        pid,
        "adopted, not restarted"
    );
}

#[test]
fn tasks_that_cannot_run_are_rejected_naming_why() {
    require!();
    let controller = FakeController::start();
    let _node = Node::new(&controller);
    let mut missing = task("task4pull", "true");
    missing.spec.as_mut().unwrap().image = "gantry.test/missing:1".into();
    let mut ports = task("task4port", "true");
    // Refused before anything is made, so no bridge appears here.
    ports.spec.as_mut().unwrap().host_network = false;
    ports.spec.as_mut().unwrap().ports = vec![pb::PortConfig {
        published: None,
        target: 80,
        protocol: pb::Protocol::Tcp as i32,
        mode: pb::PublishMode::Host as i32,
    }];
    let fine = task("task4ok", "exec sleep 1000");
    controller.assign(vec![missing, ports, fine]);
    let rejected = controller.wait_status("task4port", pb::TaskState::Rejected, 1);
    assert!(
        rejected
            .error
            .as_deref()
            .unwrap_or("")
            .contains("spec.ports[0].published"),
        "{rejected:?}"
    );
    // The pull goes to the controller's address first; this one serves
    // no registry, so the pull fails and says so.
    controller.wait_status("task4pull", pb::TaskState::Preparing, 1);
    let rejected = controller.wait_status("task4pull", pb::TaskState::Rejected, 1);
    let error = rejected.error.unwrap_or_default();
    assert!(error.contains("gantry.test/missing:1"), "{error}");
    // The others were not held up.
    controller.wait_status("task4ok", pb::TaskState::Running, 1);
}

#[test]
fn logs_and_exec_are_relayed() {
    require!();
    let controller = FakeController::start();
    let _node = Node::new(&controller);
    controller.assign(vec![task(
        "task5relay",
        "echo hello; echo oops >&2; exec sleep 1000",
    )]);
    controller.wait_status("task5relay", pb::TaskState::Running, 1);
    // The lines may take a moment to reach the log file.
    let deadline = Instant::now() + WAIT;
    let mut request_id = 0;
    let lines = loop {
        request_id += 1;
        controller.send(pb::controller_message::Message::Logs(pb::LogRequest {
            request_id,
            task: "task5relay".into(),
            follow: false,
            tail: None,
            since_unix_nanos: None,
        }));
        let entries = controller.wait_for("log end", WAIT, |s| {
            let chunks: Vec<&pb::LogChunk> = s
                .logs
                .iter()
                .filter(|c| c.request_id == request_id)
                .collect();
            chunks.iter().any(|c| c.end).then(|| {
                chunks
                    .iter()
                    .flat_map(|c| c.entries.clone())
                    .collect::<Vec<_>>()
            })
        });
        if entries.len() >= 2 || Instant::now() > deadline {
            break entries;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text: Vec<(i32, String)> = lines
        .iter()
        .map(|e| (e.stream, String::from_utf8_lossy(&e.line).into_owned()))
        .collect();
    assert!(
        text.contains(&(pb::LogStream::Stdout as i32, "hello".into())),
        "{text:?}"
    );
    assert!(
        text.contains(&(pb::LogStream::Stderr as i32, "oops".into())),
        "{text:?}"
    );
    assert!(
        lines
            .iter()
            .all(|e| e.task == "task5relay" && e.time_unix_nanos > 0)
    );

    // Followed: what is there comes at once, then the stream stays open
    // until cancelled.
    controller.send(pb::controller_message::Message::Logs(pb::LogRequest {
        request_id: 50,
        task: "task5relay".into(),
        follow: true,
        tail: Some(1),
        since_unix_nanos: None,
    }));
    let followed = controller.wait_for("followed lines", WAIT, |s| {
        let entries: Vec<pb::LogEntry> = s
            .logs
            .iter()
            .filter(|c| c.request_id == 50)
            .flat_map(|c| c.entries.clone())
            .collect();
        (!entries.is_empty()).then_some(entries)
    });
    assert_eq!(followed.len(), 1, "tail 1: {followed:?}");
    assert!(
        !controller
            .shared
            .seen
            .lock()
            .unwrap()
            .logs
            .iter()
            .any(|c| c.request_id == 50 && c.end),
        "a followed request stays open"
    );
    controller.send(pb::controller_message::Message::Cancel(pb::CancelRequest {
        request_id: 50,
    }));
    controller.wait_for("followed end after cancel", WAIT, |s| {
        s.logs
            .iter()
            .any(|c| c.request_id == 50 && c.end)
            .then_some(())
    });

    use pb::exec_client_message::Message as X;
    let exec = |m: X| {
        pb::controller_message::Message::Exec(pb::ExecRequest {
            request_id: 99,
            message: Some(pb::ExecClientMessage { message: Some(m) }),
        })
    };
    controller.send(exec(X::Start(pb::ExecStart {
        task: "task5relay".into(),
        command: vec!["sh".into(), "-c".into(), "cat; echo done; exit 3".into()],
        ..pb::ExecStart::default()
    })));
    controller.send(exec(X::Stdin(b"abc".to_vec())));
    controller.send(exec(X::CloseStdin(pb::Empty {})));
    let (stdout, code) = controller.wait_for("exec exit", WAIT, |s| {
        use pb::exec_server_message::Message as O;
        let mut stdout = Vec::new();
        for out in s.exec.iter().filter(|o| o.request_id == 99) {
            match out.output.as_ref().and_then(|o| o.message.as_ref()) {
                Some(O::Stdout(b)) => stdout.extend_from_slice(b),
                Some(O::Exit(e)) => return Some((stdout, e.code)),
                _ => {}
            }
        }
        None
    });
    assert_eq!(String::from_utf8_lossy(&stdout), "abcdone\n");
    assert_eq!(code, 3);
}

#[test]
fn sigterm_stops_the_agent_and_leaves_its_containers() {
    require!();
    let controller = FakeController::start();
    let mut node = Node::new(&controller);
    controller.assign(vec![task("task6term", "exec sleep 1000")]);
    controller.wait_status("task6term", pb::TaskState::Running, 1);
    let pid = running_container(&node.containers(), "task6term")
        .unwrap()
        .pid;
    let mut agent = node.agent.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = agent.kill();
            let _ = agent.wait();
            panic!("the agent did not stop on SIGTERM:\n{}", node.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}: {}", node.log());
    let after = node.containers();
    assert_eq!(
        running_container(&after, "task6term").map(|c| c.pid),
        Some(pid),
        "the workload outlives its agent"
    );
}

#[test]
fn incremental_sets_and_desired_shutdown_edit_the_wanted_set() {
    require!();
    let controller = FakeController::start();
    let node = Node::new(&controller);
    controller.assign(vec![task("task7a", "exec sleep 1000")]);
    controller.wait_status("task7a", pb::TaskState::Running, 1);
    let change = |action: pb::AssignmentAction, mut task: pb::Task, generation: u64| {
        task.generation = generation;
        pb::AssignmentChange {
            action: action as i32,
            task: Some(task),
        }
    };
    // Incremental: add b, keep a.
    controller.send(pb::controller_message::Message::Assignments(
        pb::AssignmentSet {
            generation: 2,
            full: false,
            changes: vec![change(
                pb::AssignmentAction::Update,
                task("task7b", "exec sleep 1000"),
                2,
            )],
        },
    ));
    controller.wait_status("task7b", pb::TaskState::Running, 1);
    // A stale set (generation 2 again) is ignored: c never starts.
    controller.send(pb::controller_message::Message::Assignments(
        pb::AssignmentSet {
            generation: 2,
            full: false,
            changes: vec![change(
                pb::AssignmentAction::Update,
                task("task7c", "exec sleep 1000"),
                2,
            )],
        },
    ));
    // Incremental: remove a; b's desired state goes to shutdown.
    let mut b_down = task("task7b", "exec sleep 1000");
    b_down.desired_state = pb::DesiredState::Shutdown as i32;
    controller.send(pb::controller_message::Message::Assignments(
        pb::AssignmentSet {
            generation: 3,
            full: false,
            changes: vec![
                change(pb::AssignmentAction::Remove, task("task7a", ""), 3),
                change(pb::AssignmentAction::Update, b_down, 3),
            ],
        },
    ));
    controller.wait_status("task7a", pb::TaskState::Shutdown, 1);
    controller.wait_status("task7b", pb::TaskState::Shutdown, 1);
    assert!(node.containers().is_empty());
    let seen = controller.shared.seen.lock().unwrap();
    // The shutdown answers the generation that asked for it; a controller
    // drops reports older than the task's current generation.
    let b_shutdown = seen
        .updates
        .iter()
        .find(|(_, u)| {
            u.task == "task7b"
                && u.status.as_ref().map(|s| s.state) == Some(pb::TaskState::Shutdown as i32)
        })
        .map(|(_, u)| u.generation);
    assert_eq!(b_shutdown, Some(3));
    assert!(
        !seen.updates.iter().any(|(_, u)| u.task == "task7c"),
        "the stale set was applied"
    );
}

#[test]
fn a_missing_image_is_pulled_from_the_controller_registry() {
    require!();
    if !have("skopeo") {
        println!("SKIPPED: needs skopeo to fill the test registry");
        return;
    }
    let Some(registry) = Registry::start("") else {
        println!("SKIPPED: needs Debian's docker-registry");
        return;
    };
    // The image only the "controller" has: pushed to the registry behind
    // its port under its full name, as `gantry image load` would keep it.
    let layout = tempfile::tempdir().unwrap();
    write_single_layer_layout(
        layout.path(),
        &busybox_layer(),
        &[("v1", json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}))],
    );
    skopeo_push(
        layout.path(),
        "v1",
        &format!("{}/gantry.test/web:v1", registry.host()),
        None,
    )
    .unwrap_or_else(|e| panic!("skopeo push: {e}\n{}", registry.log()));
    let controller = FakeController::with_registry(Some(registry.port));
    let node = Node::new(&controller);
    assert!(node.engine.images().resolve("gantry.test/web:v1").is_err());
    let mut t = task("task8pull", "exec sleep 1000");
    t.spec.as_mut().unwrap().image = "gantry.test/web:v1".into();
    controller.assign(vec![t]);
    let preparing = controller.wait_status("task8pull", pb::TaskState::Preparing, 1);
    assert!(
        preparing.message.contains("gantry.test/web:v1"),
        "{preparing:?}"
    );
    controller.wait_status("task8pull", pb::TaskState::Running, 1);
    assert!(node.engine.images().resolve("gantry.test/web:v1").is_ok());
    assert!(running_container(&node.containers(), "task8pull").is_some());
}

/// Undoes what a bridged task makes in the machine's own network namespace
/// (the agent here runs in it, to reach the in-process controller on
/// loopback): the `gantry0` bridge, the `ip gantry` nft table and
/// `ip_forward`, each only if the test made it.
struct HostNetworkGuard {
    bridge_existed: bool,
    table_existed: bool,
    ip_forward: Option<String>,
}

impl HostNetworkGuard {
    const FORWARD: &'static str = "/proc/sys/net/ipv4/ip_forward";

    fn new() -> HostNetworkGuard {
        HostNetworkGuard {
            bridge_existed: std::path::Path::new("/sys/class/net/gantry0").exists(),
            table_existed: Command::new("nft")
                .args(["list", "table", "ip", "gantry"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            ip_forward: std::fs::read_to_string(Self::FORWARD).ok(),
        }
    }
}

impl Drop for HostNetworkGuard {
    fn drop(&mut self) {
        if !self.table_existed {
            let _ = Command::new("nft")
                .args(["delete", "table", "ip", "gantry"])
                .stderr(Stdio::null())
                .status();
        }
        if !self.bridge_existed {
            let _ = Command::new("ip")
                .args(["link", "delete", "gantry0"])
                .stderr(Stdio::null())
                .status();
        }
        if let Some(value) = &self.ip_forward {
            let _ = std::fs::write(Self::FORWARD, value);
        }
    }
}

#[test]
fn a_task_on_the_bridge_publishes_its_ports() {
    require!();
    // Declared first, so it is dropped last: after the node's containers.
    let _host_network = HostNetworkGuard::new();
    let controller = FakeController::start();
    let node = Node::new(&controller);
    let mut t = task("task9port", "exec nc -l -p 80 -e echo hello");
    t.spec.as_mut().unwrap().host_network = false;
    t.spec.as_mut().unwrap().ports = vec![pb::PortConfig {
        published: Some(18089),
        target: 80,
        protocol: pb::Protocol::Tcp as i32,
        mode: pb::PublishMode::Ingress as i32,
    }];
    controller.assign(vec![t]);
    controller.wait_status("task9port", pb::TaskState::Running, 1);
    let containers = node.containers();
    let c = running_container(&containers, "task9port").unwrap();
    assert_eq!(
        c.config.network,
        gantry_agent::engine::spec::NetworkMode::Bridge
    );
    assert_eq!(c.config.ports.len(), 1);
    assert_eq!(c.config.ports[0].host_port, 18089);
}
