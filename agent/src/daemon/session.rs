//! The dispatcher session: the one long-lived `Session` stream an agent
//! holds with its controller, and the state that outlives a stream.
//!
//! Per stream: `Hello` (node id, hostname, address, resources, labels,
//! platform, protocol version, last generation), wait for `accepted`,
//! re-send every task's current status, then heartbeat every
//! `heartbeat_period_ms` while assignments come down and statuses go up.
//! A broken stream is reconnected to the controller a refusal named as
//! leader (`gantry-leader`), else to the next known controller, at once;
//! only after a whole round of failures with a capped back-off (100 ms → 2 s);
//! the worker and its containers are not touched meanwhile, and statuses
//! that change while disconnected are sent on the next stream.
//!
//! Assignments are kept as the whole set of wanted tasks (a full set
//! replaces it, an incremental one edits it) and handed to the worker as
//! that whole set. A task whose image the node lacks is held back until a
//! pull (from the controller's registry first, then the image's own) on a
//! thread of the blocking pool brings it; other tasks go on meanwhile.

use super::assignments::{Assigned, Wanted};
use super::controllers::{Controllers, controllers_path};
use super::convert;
use super::node::{self, NodeResources};
use super::{AgentConfig, AgentError};
use crate::engine::container::{ContainerId, ContainerState, Engine, parse_rfc3339};
use crate::engine::logs::{self, LOG_FILE, LogOptions, Stream};
use crate::image::PullOptions;
use crate::worker::{Control, LABEL_TASK_ID, TaskStatus};
use gantry_proto::v1 as pb;
use gantry_proto::v1::dispatcher_client::DispatcherClient;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

/// How long to wait for a connection and for `accepted`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Log lines sent in one chunk at most.
const LOG_CHUNK: usize = 256;

/// What the node says about itself in `Hello`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The node's id.
    pub node_id: String,
    /// Its name.
    pub hostname: String,
    /// What it offers.
    pub resources: NodeResources,
    /// OS and architecture.
    pub platform: (String, String),
}

impl NodeInfo {
    /// Reads (or makes) the node id and detects the rest.
    pub fn describe(config: &AgentConfig) -> Result<NodeInfo, AgentError> {
        Ok(NodeInfo {
            node_id: node::load_or_create_node_id(&config.data_dir)?,
            hostname: config.hostname.clone(),
            resources: node::resources(&config.resources.unwrap_or_default())?,
            platform: node::platform(),
        })
    }
}

/// Why a stream ended.
enum Ended {
    /// Told to shut down.
    Shutdown,
    /// The worker stopped (its error is what [`super::serve`] returns).
    WorkerGone,
    /// The stream broke (or never came up); `accepted` says whether the
    /// controller had taken the session, which resets the back-off.
    Broken {
        reason: String,
        accepted: bool,
        /// The leader the refusing controller named (`gantry-leader`).
        leader: Option<String>,
    },
}

/// The leader a controller names in a refusal's `gantry-leader` metadata.
fn leader_hint(status: &tonic::Status) -> Option<String> {
    status
        .metadata()
        .get(LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|v| !v.is_empty())
}

/// The metadata key a follower's refusal names the leader in.
pub const LEADER_METADATA: &str = "gantry-leader";

/// Input for an exec relay.
enum ExecInput {
    Stdin(Vec<u8>),
    CloseStdin,
}

/// The agent's session state; survives reconnects.
pub struct Agent {
    config: AgentConfig,
    node: NodeInfo,
    engine: Engine,
    control: std::sync::mpsc::Sender<Control>,
    events: mpsc::UnboundedReceiver<TaskStatus>,
    pulls_tx: mpsc::UnboundedSender<(String, Result<(), String>)>,
    pulls_rx: mpsc::UnboundedReceiver<(String, Result<(), String>)>,
    /// Images being pulled.
    pulling: BTreeSet<String>,
    /// The tasks the controller wants here.
    wanted: Wanted,
    /// The last status of every task, with its generation.
    statuses: BTreeMap<String, (u64, pb::TaskStatus)>,
    /// Container ids the worker reported.
    containers: BTreeMap<String, String>,
    /// Changes not sent yet.
    unsent: Vec<pb::TaskStatusUpdate>,
    /// The worker's apply counter (its own, strictly increasing).
    apply_seq: u64,
    /// Followed log requests, by id: set to cancel.
    log_requests: HashMap<u64, Arc<AtomicBool>>,
    /// Running exec relays, by id.
    execs: HashMap<u64, mpsc::UnboundedSender<ExecInput>>,
    /// The controllers known and the one in use.
    controllers: Controllers,
    /// The member list last saved to the data dir.
    remembered: Vec<String>,
}

impl Agent {
    /// An agent over a running worker (`control`, `events`).
    pub fn new(
        config: AgentConfig,
        node: NodeInfo,
        engine: Engine,
        control: std::sync::mpsc::Sender<Control>,
        events: mpsc::UnboundedReceiver<TaskStatus>,
    ) -> Agent {
        let (pulls_tx, pulls_rx) = mpsc::unbounded_channel();
        let remembered = Controllers::load(&controllers_path(&config.data_dir));
        let controllers = Controllers::new(&config.controllers, &remembered);
        Agent {
            controllers,
            remembered,
            config,
            node,
            engine,
            control,
            events,
            pulls_tx,
            pulls_rx,
            pulling: BTreeSet::new(),
            wanted: Wanted::default(),
            statuses: BTreeMap::new(),
            containers: BTreeMap::new(),
            unsent: Vec::new(),
            apply_seq: 0,
            log_requests: HashMap::new(),
            execs: HashMap::new(),
        }
    }

    /// Holds sessions with the controller until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let (first, max) = self.config.reconnect_backoff;
        let mut backoff = first;
        loop {
            match self.session(&mut shutdown).await {
                Ended::Shutdown => return,
                Ended::WorkerGone => return worker_gone(),
                Ended::Broken {
                    reason,
                    accepted,
                    leader,
                } => {
                    if accepted {
                        backoff = first;
                    }
                    let failed_at = self.controllers.current().to_string();
                    // Another controller is worth a try at once; only a
                    // whole round of failures waits (and backs off).
                    let round = self.controllers.failed(leader.as_deref());
                    let wait = if round { backoff } else { Duration::ZERO };
                    tracing::warn!(controller = %failed_at, next = %self.controllers.current(), "session: {reason}; reconnecting in {wait:?}");
                    if !round {
                        self.end_relays();
                        continue;
                    }
                }
            }
            self.end_relays();
            let deadline = tokio::time::Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep_until(deadline) => break,
                    status = self.events.recv() => match status {
                        Some(status) => self.record(status),
                        None => return worker_gone(),
                    },
                    Some((image, result)) = self.pulls_rx.recv() => self.pulled(image, result),
                }
            }
            backoff = (backoff * 2).min(max);
        }
    }

    /// One stream, from connect to its end.
    async fn session(&mut self, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> Ended {
        let broken = |reason: String| Ended::Broken {
            reason,
            accepted: false,
            leader: None,
        };
        let controller = self.controllers.current().to_string();
        let endpoint = match Endpoint::from_shared(format!("http://{controller}")) {
            Ok(e) => e
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                // A controller that vanishes without closing the connection
                // (a cut link, a frozen host) is noticed by HTTP/2 pings
                // within ~3 s: before a new leader's grace (one 3 s lease
                // from its election, itself ~1 s after the cut) runs out.
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2))
                .keep_alive_while_idle(true),
            Err(e) => return broken(format!("address: {e}")),
        };
        let channel = tokio::select! {
            _ = &mut *shutdown => return Ended::Shutdown,
            c = endpoint.connect() => match c {
                Ok(c) => c,
                Err(e) => return broken(format!("connect: {e}")),
            },
        };
        let mut client = DispatcherClient::new(channel);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1024);
        let address = self.advertise_address();
        let hello = pb::AgentMessage {
            message: Some(pb::agent_message::Message::Hello(pb::Hello {
                node_id: self.node.node_id.clone(),
                hostname: self.node.hostname.clone(),
                address,
                resources: Some(pb::Resources {
                    nano_cpus: self.node.resources.nano_cpus,
                    memory_bytes: self.node.resources.memory_bytes,
                }),
                labels: self.config.labels.clone().into_iter().collect(),
                platform: Some(pb::Platform {
                    os: self.node.platform.0.clone(),
                    arch: self.node.platform.1.clone(),
                }),
                protocol_version: gantry_proto::PROTOCOL_VERSION,
                last_generation: self.wanted.last_generation(),
            })),
        };
        if tx.send(hello).await.is_err() {
            return broken("hello: the stream closed".into());
        }
        let opened = tokio::time::timeout(
            CONNECT_TIMEOUT,
            client.session(tokio_stream::wrappers::ReceiverStream::new(rx)),
        );
        let mut inbound = tokio::select! {
            _ = &mut *shutdown => return Ended::Shutdown,
            r = opened => match r {
                Ok(Ok(response)) => response.into_inner(),
                Ok(Err(status)) => return Ended::Broken {
                    reason: format!("refused: {}", status.message()),
                    accepted: false,
                    leader: leader_hint(&status),
                },
                Err(_) => return broken("no answer to the session request".into()),
            },
        };
        let first = tokio::select! {
            _ = &mut *shutdown => return Ended::Shutdown,
            m = tokio::time::timeout(CONNECT_TIMEOUT, inbound.message()) => m,
        };
        let accepted = match first {
            Ok(Ok(Some(pb::ControllerMessage {
                message: Some(pb::controller_message::Message::Accepted(a)),
            }))) => a,
            Ok(Ok(Some(other))) => {
                return broken(format!("expected accepted, got {other:?}"));
            }
            Ok(Ok(None)) => return broken("closed before accepting the session".into()),
            Ok(Err(status)) => {
                return Ended::Broken {
                    reason: format!("refused: {}", status.message()),
                    accepted: false,
                    leader: leader_hint(&status),
                };
            }
            Err(_) => return broken("no accepted within the timeout".into()),
        };
        if accepted.protocol_version != gantry_proto::PROTOCOL_VERSION {
            return broken(format!(
                "controller speaks protocol {}, this agent {}",
                accepted.protocol_version,
                gantry_proto::PROTOCOL_VERSION
            ));
        }
        tracing::info!(session = %accepted.session_id, node = %self.node.node_id, %controller, "session accepted");
        if !accepted.controllers.is_empty() && accepted.controllers != self.remembered {
            Controllers::save(
                &controllers_path(&self.config.data_dir),
                &accepted.controllers,
            );
            self.remembered = accepted.controllers.clone();
        }
        self.controllers.accepted(&accepted.controllers);
        self.wanted.session_opened();
        let period = match accepted.heartbeat_period_ms {
            0 => self.config.heartbeat_period,
            ms => Duration::from_millis(ms),
        };
        let broken_after_accept = |reason: String| Ended::Broken {
            reason,
            accepted: true,
            leader: None,
        };
        // Every task's current status, so that a controller that missed
        // changes (or restarted) sees where everything is.
        self.unsent = self
            .statuses
            .iter()
            .map(|(task, (generation, status))| pb::TaskStatusUpdate {
                task: task.clone(),
                generation: *generation,
                status: Some(status.clone()),
            })
            .collect();
        if !self.flush(&tx).await {
            return broken_after_accept("sending statuses: the stream closed".into());
        }
        let mut heartbeat = tokio::time::interval(period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sequence = 0u64;
        loop {
            tokio::select! {
                _ = &mut *shutdown => return Ended::Shutdown,
                _ = heartbeat.tick() => {
                    sequence += 1;
                    let beat = pb::AgentMessage {
                        message: Some(pb::agent_message::Message::Heartbeat(pb::Heartbeat { sequence })),
                    };
                    if tx.send(beat).await.is_err() {
                        return broken_after_accept("heartbeat: the stream closed".into());
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(message)) => self.handle(message, &tx),
                    Ok(None) => return broken_after_accept("the controller ended the stream".into()),
                    Err(status) => return Ended::Broken {
                        reason: format!("stream: {}", status.message()),
                        accepted: true,
                        leader: leader_hint(&status),
                    },
                },
                status = self.events.recv() => {
                    let Some(status) = status else {
                        return Ended::WorkerGone;
                    };
                    self.record(status);
                    // Batch what else is already there.
                    while let Ok(status) = self.events.try_recv() {
                        self.record(status);
                    }
                }
                Some((image, result)) = self.pulls_rx.recv() => self.pulled(image, result),
            }
            if !self.flush(&tx).await {
                return broken_after_accept("sending statuses: the stream closed".into());
            }
        }
    }

    /// The address to advertise: `--advertise`, else the host part of a
    /// local address that reaches the controller (found by a UDP connect,
    /// which sends nothing), else the hostname.
    fn advertise_address(&self) -> String {
        if let Some(a) = &self.config.advertise_address {
            return a.clone();
        }
        let local = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| {
                s.connect(self.controllers.current())?;
                s.local_addr()
            })
            .map(|a| a.ip().to_string());
        local.unwrap_or_else(|_| self.node.hostname.clone())
    }

    /// Sends the unsent status changes; false if the stream is gone (they
    /// are re-sent with the current statuses on the next one).
    async fn flush(&mut self, tx: &mpsc::Sender<pb::AgentMessage>) -> bool {
        if self.unsent.is_empty() {
            return true;
        }
        let updates = std::mem::take(&mut self.unsent);
        let message = pb::AgentMessage {
            message: Some(pb::agent_message::Message::Status(pb::TaskStatusUpdates {
                updates,
            })),
        };
        tx.send(message).await.is_ok()
    }

    /// A worker status: kept as the task's current one, queued to be sent.
    fn record(&mut self, status: TaskStatus) {
        if let Some(c) = &status.container_id {
            self.containers.insert(status.task_id.clone(), c.clone());
        }
        let generation = self.wanted.generation_of(&status.task_id);
        let wire = convert::status_to_wire(&status);
        if status.state == crate::worker::TaskState::Rejected && status.container_id.is_none() {
            // The worker could not create its container and does not hold
            // it: kept out of later applies, which would only try again.
            self.wanted.refuse(&status.task_id);
        }
        self.set_status(status.task_id, generation, wire);
    }

    /// Records and queues a status, stamped with the time of its state
    /// change: now, or the time already recorded when the state is the same
    /// (a new health verdict or restart count is no state change).
    fn set_status(&mut self, task: String, generation: u64, mut status: pb::TaskStatus) {
        status.timestamp_unix_ms = match self.statuses.get(&task) {
            Some((_, old)) if old.state == status.state && old.timestamp_unix_ms.is_some() => {
                old.timestamp_unix_ms
            }
            _ => Some(convert::unix_ms(std::time::SystemTime::now())),
        };
        self.statuses
            .insert(task.clone(), (generation, status.clone()));
        self.unsent.push(pb::TaskStatusUpdate {
            task,
            generation,
            status: Some(status),
        });
    }

    /// A message from the controller.
    fn handle(&mut self, message: pb::ControllerMessage, tx: &mpsc::Sender<pb::AgentMessage>) {
        use pb::controller_message::Message as M;
        match message.message {
            Some(M::Assignments(set)) => self.assignments(set),
            Some(M::Logs(request)) => self.logs(request, tx.clone()),
            Some(M::Cancel(cancel)) => {
                if let Some(flag) = self.log_requests.remove(&cancel.request_id) {
                    flag.store(true, Ordering::Relaxed);
                }
                // Dropping the input channel kills the exec.
                self.execs.remove(&cancel.request_id);
            }
            Some(M::Exec(request)) => self.exec(request, tx.clone()),
            Some(M::Accepted(_)) => tracing::warn!("a second accepted in one session, ignored"),
            // The overlay data plane is not programmed yet.
            Some(M::Network(update)) => {
                tracing::debug!(revision = update.revision, "network update ignored")
            }
            None => tracing::warn!("an empty controller message, ignored"),
        }
    }

    /// An assignment set: the wanted set edited (see [`Wanted::apply`]),
    /// refusals reported, images prepared, the worker told.
    fn assignments(&mut self, set: pb::AssignmentSet) {
        let generation = set.generation;
        let Some(applied) = self.wanted.apply(set) else {
            tracing::debug!(
                generation,
                last = self.wanted.last_generation(),
                "stale assignments ignored"
            );
            return;
        };
        if let Some(named) = applied.named {
            // Final statuses of tasks a full set no longer names were
            // re-sent when the session opened; the controller has them.
            self.statuses
                .retain(|id, (_, s)| named.contains(id) || !is_final(s));
            let statuses = &self.statuses;
            self.wanted
                .retain_generations(|id| named.contains(id) || statuses.contains_key(id));
        }
        for (task, generation, why) in applied.refused {
            self.report_refused(task, generation, why);
        }
        self.prepare_images();
        self.apply();
    }

    fn report_refused(&mut self, task: String, generation: u64, message: String) {
        tracing::warn!(%task, "rejected: {message}");
        let status = convert::own_status(pb::TaskState::Rejected, message);
        self.set_status(task, generation, status);
    }

    /// Marks tasks whose image is here ready; starts pulls for the others.
    fn prepare_images(&mut self) {
        let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, a) in self.wanted.tasks_mut().filter(|(_, a)| !a.ready) {
            if self.engine.images().resolve(&a.spec.image).is_ok() {
                a.ready = true;
            } else {
                missing
                    .entry(a.spec.image.clone())
                    .or_default()
                    .push(id.clone());
            }
        }
        for (image, tasks) in missing {
            for task in tasks {
                let generation = self.wanted.generation_of(&task);
                let already = self
                    .statuses
                    .get(&task)
                    .is_some_and(|(_, s)| s.state == pb::TaskState::Preparing as i32);
                if !already {
                    let status = convert::own_status(
                        pb::TaskState::Preparing,
                        format!("pulling image {image}"),
                    );
                    self.set_status(task, generation, status);
                }
            }
            if !self.pulling.insert(image.clone()) {
                continue;
            }
            let images = self.engine.images().clone();
            let options = PullOptions {
                mirror: Some(format!("http://{}", self.controllers.current())),
                fallback_to_origin: true,
                ..PullOptions::default()
            };
            let done = self.pulls_tx.clone();
            // The blocking pool: a pull is network and disk I/O, and forks
            // nothing.
            tokio::task::spawn_blocking(move || {
                let result = images
                    .pull(&image, &options, &mut |_| {})
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                let _ = done.send((image, result));
            });
        }
    }

    /// A pull ended: its tasks go to the worker, or are rejected.
    fn pulled(&mut self, image: String, result: Result<(), String>) {
        self.pulling.remove(&image);
        let waiting = |a: &Assigned| !a.ready && a.spec.image == image;
        match result {
            Ok(()) => {
                for (_, a) in self.wanted.tasks_mut() {
                    if waiting(a) {
                        a.ready = true;
                    }
                }
            }
            Err(e) => {
                let tasks: Vec<String> = self
                    .wanted
                    .tasks()
                    .filter(|(_, a)| waiting(a))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in tasks {
                    if self.wanted.refuse(&id).is_some() {
                        let generation = self.wanted.generation_of(&id);
                        self.report_refused(id, generation, format!("pull {image}: {e}"));
                    }
                }
            }
        }
        self.apply();
    }

    /// Hands the worker every ready task.
    fn apply(&mut self) {
        self.apply_seq += 1;
        let tasks = self.wanted.ready_specs();
        if self
            .control
            .send(Control::Apply {
                tasks,
                generation: self.apply_seq,
            })
            .is_err()
        {
            tracing::error!("the worker is gone; assignments not applied");
        }
    }

    /// The container of a task: the one the worker reported, else the one
    /// labelled with it.
    fn container_of(&self, task: &str) -> Option<ContainerId> {
        if let Some(Ok(id)) = self.containers.get(task).map(|c| c.parse()) {
            return Some(id);
        }
        self.engine.list().ok()?.into_iter().find_map(|info| {
            (info.config.labels.get(LABEL_TASK_ID).map(String::as_str) == Some(task))
                .then_some(info.id)
        })
    }

    /// A log request: the task container's json-file log, relayed in
    /// chunks from a blocking thread (file reads, no forks).
    fn logs(&mut self, request: pb::LogRequest, tx: mpsc::Sender<pb::AgentMessage>) {
        let id = request.request_id;
        let chunk = move |entries: Vec<pb::LogEntry>, end: bool| pb::AgentMessage {
            message: Some(pb::agent_message::Message::Logs(pb::LogChunk {
                request_id: id,
                entries,
                end,
            })),
        };
        let Some(container) = self.container_of(&request.task) else {
            let _ = tx.try_send(chunk(Vec::new(), true));
            return;
        };
        let cancel = Arc::new(AtomicBool::new(false));
        if request.follow {
            // Forget the followers that ended on their own (their thread
            // dropped its handle on the flag).
            self.log_requests.retain(|_, f| Arc::strong_count(f) > 1);
            self.log_requests.insert(id, cancel.clone());
        }
        let engine = self.engine.clone();
        let node = self.node.node_id.clone();
        tokio::task::spawn_blocking(move || {
            let path = engine.container_dir(&container).join(LOG_FILE);
            let options = LogOptions {
                follow: request.follow,
                tail: request
                    .tail
                    .map(|t| usize::try_from(t).unwrap_or(usize::MAX)),
                ..LogOptions::default()
            };
            // Shared by the sink and the follower's poll, which sends what a
            // quiet container wrote last instead of holding it back.
            let buffer: RefCell<Vec<pb::LogEntry>> = RefCell::new(Vec::new());
            let mut still_running = || {
                if cancel.load(Ordering::Relaxed) || tx.is_closed() {
                    return false;
                }
                let pending = std::mem::take(&mut *buffer.borrow_mut());
                if !pending.is_empty() && tx.blocking_send(chunk(pending, false)).is_err() {
                    return false;
                }
                matches!(
                    engine.inspect(&container).map(|i| i.state),
                    Ok(ContainerState::Running)
                )
            };
            let mut sink = |entry: &logs::LogEntry| -> std::io::Result<()> {
                if cancel.load(Ordering::Relaxed) {
                    return Err(std::io::Error::other("cancelled"));
                }
                let time = parse_rfc3339(&entry.time)
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
                if request.since_unix_nanos.is_some_and(|since| time < since) {
                    return Ok(());
                }
                let line = entry.log.strip_suffix('\n').unwrap_or(&entry.log);
                let mut buffer = buffer.borrow_mut();
                buffer.push(pb::LogEntry {
                    task: request.task.clone(),
                    node: node.clone(),
                    stream: match entry.stream {
                        Stream::Stdout => pb::LogStream::Stdout as i32,
                        Stream::Stderr => pb::LogStream::Stderr as i32,
                    },
                    time_unix_nanos: time,
                    line: line.as_bytes().to_vec(),
                });
                if buffer.len() >= LOG_CHUNK {
                    tx.blocking_send(chunk(std::mem::take(&mut buffer), false))
                        .map_err(|_| std::io::Error::other("session closed"))?;
                }
                Ok(())
            };
            let result = logs::read_logs(&path, &options, &mut still_running, &mut sink);
            if let Err(e) = &result {
                tracing::debug!(request = id, "logs: {e}");
            }
            let _ = tx.blocking_send(chunk(buffer.take(), true));
        });
    }

    /// An exec request: the first carries what to run, in a child `gantry
    /// container exec` (a fresh process, so nothing here forks to run Rust
    /// code); the next ones its stdin.
    fn exec(&mut self, request: pb::ExecRequest, tx: mpsc::Sender<pb::AgentMessage>) {
        use pb::exec_client_message::Message as C;
        let id = request.request_id;
        let Some(message) = request.message.and_then(|m| m.message) else {
            return;
        };
        match message {
            C::Start(start) => {
                let (input_tx, input_rx) = mpsc::unbounded_channel();
                // Forget the relays whose process ended.
                self.execs.retain(|_, input| !input.is_closed());
                self.execs.insert(id, input_tx);
                let container = self.container_of(&start.task);
                let gantry = self.config.gantry_binary.clone();
                let data_dir = self.config.data_dir.root().to_path_buf();
                tokio::spawn(exec_relay(
                    id, start, container, gantry, data_dir, input_rx, tx,
                ));
            }
            C::Stdin(bytes) => {
                if let Some(input) = self.execs.get(&id) {
                    let _ = input.send(ExecInput::Stdin(bytes));
                }
            }
            C::CloseStdin(_) => {
                if let Some(input) = self.execs.get(&id) {
                    let _ = input.send(ExecInput::CloseStdin);
                }
            }
            // No TTY yet, so nothing to resize.
            C::Resize(_) => {}
        }
    }

    /// Cancels what rode on a stream that ended: followed logs and execs.
    fn end_relays(&mut self) {
        for (_, flag) in self.log_requests.drain() {
            flag.store(true, Ordering::Relaxed);
        }
        self.execs.clear();
    }
}

/// The session ends when the worker does: an agent that cannot run tasks
/// should exit (and be restarted by its supervisor, adopting the
/// containers) rather than heartbeat as if all were well.
fn worker_gone() {
    tracing::error!("the task worker stopped; the agent stops too");
}

fn is_final(status: &pb::TaskStatus) -> bool {
    matches!(
        pb::TaskState::try_from(status.state),
        Ok(pb::TaskState::Complete
            | pb::TaskState::Failed
            | pb::TaskState::Rejected
            | pb::TaskState::Shutdown
            | pb::TaskState::Orphaned)
    )
}

/// Runs one exec and relays its output; ends with `exit` (126 when it could
/// not run, as a shell reports a command it cannot execute).
async fn exec_relay(
    id: u64,
    start: pb::ExecStart,
    container: Option<ContainerId>,
    gantry: std::path::PathBuf,
    data_dir: std::path::PathBuf,
    mut input: mpsc::UnboundedReceiver<ExecInput>,
    tx: mpsc::Sender<pb::AgentMessage>,
) {
    use pb::exec_server_message::Message as S;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let out = |m: S| pb::AgentMessage {
        message: Some(pb::agent_message::Message::Exec(pb::ExecOutput {
            request_id: id,
            output: Some(pb::ExecServerMessage { message: Some(m) }),
        })),
    };
    let fail = |reason: String| {
        let tx = tx.clone();
        async move {
            let _ = tx
                .send(out(S::Stderr(format!("gantry: {reason}\n").into_bytes())))
                .await;
            let _ = tx.send(out(S::Exit(pb::ExecExit { code: 126 }))).await;
        }
    };
    let Some(container) = container else {
        return fail(format!("task {} has no container on this node", start.task)).await;
    };
    if start.tty {
        return fail("a terminal (-t) is not supported by this agent yet".into()).await;
    }
    if start.command.is_empty() {
        return fail("no command given".into()).await;
    }
    let mut command = tokio::process::Command::new(&gantry);
    command
        .arg("container")
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("exec")
        .arg("-i");
    if let Some(user) = &start.user {
        command.arg("--user").arg(user);
    }
    if let Some(dir) = &start.working_dir {
        command.arg("--workdir").arg(dir);
    }
    for (k, v) in &start.env {
        command.arg("--env").arg(format!("{k}={v}"));
    }
    command
        .arg(container.as_str())
        .args(&start.command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Its own group: a cancel kills the CLI and what it started at once.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("running {}: {e}", gantry.display())).await,
    };
    let pgid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let mut stdin = child.stdin.take();
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return fail("exec pipes missing".into()).await;
    };
    let (mut out_open, mut err_open) = (true, true);
    let mut buf_out = vec![0u8; 16 * 1024];
    let mut buf_err = vec![0u8; 16 * 1024];
    let mut cancelled = false;
    while out_open || err_open {
        tokio::select! {
            n = stdout.read(&mut buf_out), if out_open => match n {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => { let _ = tx.send(out(S::Stdout(buf_out[..n].to_vec()))).await; }
            },
            n = stderr.read(&mut buf_err), if err_open => match n {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => { let _ = tx.send(out(S::Stderr(buf_err[..n].to_vec()))).await; }
            },
            i = input.recv(), if !cancelled => match i {
                Some(ExecInput::Stdin(bytes)) => {
                    if let Some(s) = stdin.as_mut() && s.write_all(&bytes).await.is_err() {
                        stdin = None;
                    }
                }
                Some(ExecInput::CloseStdin) => stdin = None,
                None => {
                    // Cancelled, or the session ended.
                    cancelled = true;
                    if let Some(pgid) = pgid {
                        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::SIGKILL);
                    }
                }
            },
        }
    }
    let code = match child.wait().await {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(255)
        }
        Err(_) => 255,
    };
    let _ = tx.send(out(S::Exit(pb::ExecExit { code }))).await;
}
