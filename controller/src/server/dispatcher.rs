//! The Dispatcher service: one `Session` stream per agent.
//!
//! An agent says `hello`; the dispatcher registers its node if it is new
//! (there are no join tokens or certificates in this issue: any agent that
//! can reach the port joins; DESIGN's mTLS comes later), marks it ready with
//! what it reported, answers `accepted`, sends the node's full assignment
//! set and then each change to it. Status reports go to the store; log and
//! exec output is relayed to the Control service by request id.
//!
//! Decisions:
//! - Assignment set generations are store revisions: they only grow, across
//!   sessions and controller restarts, so an agent never ignores a newer set.
//! - A full set holds the node's tasks whose desired state is running. Tasks
//!   the node still runs but that are no longer wanted are absent, so the
//!   agent stops them; the dispatcher records them as shut down on the
//!   node's behalf, since the agent is told to stop everything not in the
//!   set (swarmkit's dispatcher does the same for tasks its node dropped).
//! - While a session lasts, a task whose desired state becomes shutdown is
//!   sent as an update (the agent stops it and reports `shutdown`); a task
//!   deleted from the store is sent as a removal.
//! - Liveness is one loop over all ready nodes: a node not heard from
//!   within the lease is marked down, whether its session broke or it went
//!   silent. A disconnect alone does not mark it down, so an agent that
//!   reconnects within the lease keeps its tasks. After a controller restart
//!   every node gets one lease from the start to reconnect.
//! - The dispatcher runs on the Raft leader only: a follower refuses a
//!   session with UNAVAILABLE, "not the leader; the leader is ADDR" and the
//!   `gantry-leader: ADDR` metadata, and the leader that loses leadership
//!   ends its sessions the same way, so agents move with the leader.
//! - A new leader gives every node a whole lease from the moment it became
//!   leader before the liveness loop may mark it down (the grace Swarm's
//!   dispatcher gives after a leader change), so a failover never marks a
//!   healthy node down or moves its tasks.
//! - Agent labels are merged into the node's labels only for keys the
//!   operator has not set (operator labels win, as Swarm's node labels over
//!   engine labels), by the state machine (`EditNodeSpec.label_default`)
//!   against the node as the log has it, not from a read here.
//! - The network state follows the assignments: a full `NetworkUpdate` right
//!   after every full assignment set (read at the same revision), then
//!   incremental ones computed by [`crate::network::update`] from the
//!   objects the store events touched, at most one per [`NETWORK_BATCH`], so
//!   a deploy of many tasks is a few updates, not one per report.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use gantry_proto::v1 as pb;
use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::state::{StoreFront, random_id};
use crate::model::{
    Availability, DesiredState, NodeId, NodeRole, NodeSpec, NodeState, NodeStatus, Task, TaskId,
    TaskState,
};
use crate::network::update::{self as netupdate, AgentView, Changes};
use crate::store::{Command, EventKind, Object};
use crate::wire::{AssignmentChange, Assignments, Registration, StatusReport};

/// Errors from the dispatcher.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The node has no live session to relay a request through.
    #[error("node {node} has no agent session")]
    NoSession {
        /// The node.
        node: NodeId,
    },
}

/// Lease and heartbeat settings.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// How often agents heartbeat.
    pub heartbeat_period: Duration,
    /// How long a node may stay silent before it is marked down.
    pub lease: Duration,
}

type Outbound = mpsc::Sender<Result<pb::ControllerMessage, Status>>;

/// How long store changes are gathered into one incremental network update:
/// short against the 1 s the data plane has to follow a health change, long
/// enough that a burst of reports makes one update.
pub const NETWORK_BATCH: Duration = Duration::from_millis(20);

struct Session {
    /// This session's number, so that a replaced session's cleanup leaves
    /// its successor alone.
    serial: u64,
    tx: Outbound,
    /// Ends the session (replaced, or the lease lapsed).
    kill: Arc<Notify>,
}

/// A pending log or exec request: where the agent's answers go.
struct Relay {
    node: NodeId,
    tx: mpsc::Sender<pb::AgentMessage>,
}

struct Tables {
    sessions: HashMap<NodeId, Session>,
    last_seen: HashMap<NodeId, Instant>,
    relays: HashMap<u64, Relay>,
    /// When this controller last became leader (or started): no node is
    /// marked down for silence before a whole lease after it.
    lease_start: Instant,
}

struct Inner {
    store: StoreFront,
    config: SessionConfig,
    tables: Mutex<Tables>,
    serial: AtomicU64,
}

/// The dispatcher; cheap to clone. Serves `gantry.v1.Dispatcher` and relays
/// logs and exec for the Control service.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

/// An open relay: the agent's answers to one log or exec request.
#[derive(Debug)]
pub struct RelayHandle {
    /// The request id the agent echoes.
    pub request_id: u64,
    /// `LogChunk` or `ExecOutput` messages, as the agent sent them.
    pub rx: mpsc::Receiver<pb::AgentMessage>,
}

impl Dispatcher {
    /// A dispatcher over `store`.
    pub fn new(store: StoreFront, config: SessionConfig) -> Dispatcher {
        Dispatcher {
            inner: Arc::new(Inner {
                store,
                config,
                tables: Mutex::new(Tables {
                    sessions: HashMap::new(),
                    last_seen: HashMap::new(),
                    relays: HashMap::new(),
                    lease_start: Instant::now(),
                }),
                serial: AtomicU64::new(1),
            }),
            shutdown: None,
        }
    }

    /// Ends every session when `stop` turns true (the controller shuts
    /// down), so that draining connections does not wait for agents.
    pub fn with_shutdown(mut self, stop: tokio::sync::watch::Receiver<bool>) -> Dispatcher {
        self.shutdown = Some(stop);
        self
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        // Every update below leaves the tables consistent before it could
        // panic, so a poisoned lock still holds good data.
        self.inner.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self, node: &NodeId) {
        self.tables().last_seen.insert(node.clone(), Instant::now());
    }

    /// Sends `message` down `node`'s session.
    async fn send_to(
        &self,
        node: &NodeId,
        message: pb::ControllerMessage,
    ) -> Result<(), DispatchError> {
        let tx = self
            .tables()
            .sessions
            .get(node)
            .map(|s| s.tx.clone())
            .ok_or_else(|| DispatchError::NoSession { node: node.clone() })?;
        tx.send(Ok(message))
            .await
            .map_err(|_| DispatchError::NoSession { node: node.clone() })
    }

    /// Opens a relay on `node` and sends the request `make` builds with its
    /// id (a `LogRequest` or the first `ExecRequest`).
    pub async fn open_relay(
        &self,
        node: &NodeId,
        make: impl FnOnce(u64) -> pb::ControllerMessage,
    ) -> Result<RelayHandle, DispatchError> {
        let request_id = self.inner.serial.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(256);
        self.tables().relays.insert(
            request_id,
            Relay {
                node: node.clone(),
                tx,
            },
        );
        if let Err(e) = self.send_to(node, make(request_id)).await {
            self.tables().relays.remove(&request_id);
            return Err(e);
        }
        Ok(RelayHandle { request_id, rx })
    }

    /// Sends a further message for an open relay (exec input).
    pub async fn relay_send(
        &self,
        node: &NodeId,
        message: pb::ControllerMessage,
    ) -> Result<(), DispatchError> {
        self.send_to(node, message).await
    }

    /// Closes a relay and tells the agent to stop the request.
    pub async fn close_relay(&self, node: &NodeId, request_id: u64) {
        let had = self.tables().relays.remove(&request_id).is_some();
        if had {
            let cancel = pb::ControllerMessage {
                message: Some(pb::controller_message::Message::Cancel(pb::CancelRequest {
                    request_id,
                })),
            };
            // The session may be gone already; then so is the request.
            let _ = self.send_to(node, cancel).await;
        }
    }

    /// This controller just became leader: every node gets a whole lease
    /// from now before it may be marked down (its agent is reconnecting
    /// from the old leader).
    pub fn gained_leadership(&self) {
        let mut tables = self.tables();
        tables.lease_start = Instant::now();
        tables.last_seen.clear();
    }

    /// The refusal a follower answers a session with.
    fn not_leader(&self) -> Status {
        let leader = self.inner.store.leader_address();
        let message = match &leader {
            Some(a) => format!("not the leader; the leader is {a}"),
            None => "not the leader; no leader is known yet (an election may be under way)".into(),
        };
        super::replication::unavailable(message, leader)
    }

    /// Whether `node` has a live session.
    pub fn has_session(&self, node: &NodeId) -> bool {
        self.tables().sessions.contains_key(node)
    }

    /// Marks down every ready node not heard from within the lease, until
    /// `shutdown` resolves.
    pub async fn run_liveness(&self, shutdown: impl std::future::Future<Output = ()>) {
        let tick = (self.inner.config.heartbeat_period / 4)
            .clamp(Duration::from_millis(50), Duration::from_millis(250));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = interval.tick() => self.expire_leases().await,
            }
        }
    }

    async fn expire_leases(&self) {
        let now = Instant::now();
        let ready: Vec<(NodeId, NodeStatus)> = self.inner.store.read(|s| {
            s.nodes()
                .filter(|n| n.status.state == NodeState::Ready)
                .map(|n| (n.id.clone(), n.status.clone()))
                .collect()
        });
        let mut commands = Vec::new();
        {
            let mut tables = self.tables();
            for (node, mut status) in ready {
                let seen = tables
                    .last_seen
                    .get(&node)
                    .copied()
                    .unwrap_or(tables.lease_start)
                    .max(tables.lease_start);
                if now.duration_since(seen) <= self.inner.config.lease {
                    continue;
                }
                tracing::warn!(%node, lease = ?self.inner.config.lease, "node missed its lease, marking it down");
                if let Some(session) = tables.sessions.remove(&node) {
                    session.kill.notify_one();
                }
                status.state = NodeState::Down;
                commands.push(Command::UpdateNodeStatus { node, status });
            }
        }
        if let Err(e) = self.inner.store.propose(commands).await {
            tracing::error!(error = %e, "marking nodes down failed");
        }
    }

    async fn run_session(&self, mut inbound: Streaming<pb::AgentMessage>, tx: Outbound) {
        let hello = match tokio::time::timeout(self.inner.config.lease, inbound.message()).await {
            Ok(Ok(Some(pb::AgentMessage {
                message: Some(pb::agent_message::Message::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => {
                let _ = tx
                    .send(Err(Status::invalid_argument(
                        "message: the first message of a session must be hello",
                    )))
                    .await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "session ended before hello");
                return;
            }
            Ok(Ok(None)) => return,
            Err(_) => {
                let _ = tx
                    .send(Err(Status::deadline_exceeded("no hello within the lease")))
                    .await;
                return;
            }
        };
        let reg = match Registration::try_from(hello) {
            Ok(reg) => reg,
            Err(e) => {
                let _ = tx
                    .send(Err(Status::invalid_argument(format!("hello: {e}"))))
                    .await;
                return;
            }
        };
        if reg.protocol_version != gantry_proto::PROTOCOL_VERSION {
            let _ = tx
                .send(Err(Status::failed_precondition(format!(
                    "hello.protocol_version: agent speaks {}, controller speaks {}",
                    reg.protocol_version,
                    gantry_proto::PROTOCOL_VERSION
                ))))
                .await;
            return;
        }
        let node = reg.node.clone();
        // Seen now, before it is ready: the liveness loop must not find it
        // ready with only the controller's start time to go by.
        self.touch(&node);
        if let Err(e) = self.register(&reg).await {
            let _ = tx
                .send(Err(Status::unavailable(format!(
                    "registering node {node}: {e}"
                ))))
                .await;
            return;
        }
        let serial = self.inner.serial.fetch_add(1, Ordering::Relaxed);
        let kill = Arc::new(Notify::new());
        {
            let mut tables = self.tables();
            if let Some(old) = tables.sessions.insert(
                node.clone(),
                Session {
                    serial,
                    tx: tx.clone(),
                    kill: Arc::clone(&kill),
                },
            ) {
                tracing::info!(%node, "a new session replaces the node's previous one");
                old.kill.notify_one();
            }
            tables.last_seen.insert(node.clone(), Instant::now());
        }
        let session_id = random_id();
        tracing::info!(%node, hostname = %reg.hostname, session = %session_id, "agent session accepted");
        let accepted = pb::ControllerMessage {
            message: Some(pb::controller_message::Message::Accepted(
                pb::SessionAccepted {
                    session_id,
                    heartbeat_period_ms: duration_ms(self.inner.config.heartbeat_period),
                    lease_ms: duration_ms(self.inner.config.lease),
                    protocol_version: gantry_proto::PROTOCOL_VERSION,
                    controllers: self.inner.store.controller_addresses(),
                },
            )),
        };
        if tx.send(Ok(accepted)).await.is_ok() {
            let ready = ready_status(&reg);
            self.session_loop(&node, &ready, &mut inbound, &tx, &kill)
                .await;
        }
        let mut tables = self.tables();
        if tables
            .sessions
            .get(&node)
            .is_some_and(|s| s.serial == serial)
        {
            tables.sessions.remove(&node);
            // Whoever waits on this node's logs or exec learns it is over.
            tables.relays.retain(|_, r| r.node != node);
        }
        tracing::info!(%node, "agent session ended");
    }

    /// Registers the node if new and records its reported status as ready.
    async fn register(&self, reg: &Registration) -> Result<(), super::state::StateError> {
        let existing = self.inner.store.read(|s| s.node(&reg.node).cloned());
        let mut commands = Vec::new();
        match existing {
            None => commands.push(Command::UpsertNode {
                node: reg.node.clone(),
                spec: NodeSpec {
                    availability: Availability::Active,
                    role: NodeRole::Worker,
                    labels: reg.labels.clone(),
                },
            }),
            // The agent's labels fill only keys the node lacks, decided by
            // the state machine against the node as the log has it: a spec
            // built from this read would put back labels an operator's
            // `node update` had just changed (a lost update). The read only
            // saves a proposal when there is nothing to add.
            Some(node) if reg.labels.keys().any(|k| !node.spec.labels.contains_key(k)) => commands
                .push(Command::EditNodeSpec {
                    node: reg.node.to_string(),
                    availability: None,
                    label_add: BTreeMap::new(),
                    label_rm: Vec::new(),
                    label_default: reg.labels.clone(),
                }),
            Some(_) => {}
        }
        commands.push(Command::UpdateNodeStatus {
            node: reg.node.clone(),
            status: ready_status(reg),
        });
        let names: Vec<&'static str> = commands.iter().map(Command::name).collect();
        let mut first_refusal = None;
        for ((index, result), command) in self
            .inner
            .store
            .propose(commands)
            .await?
            .into_iter()
            .zip(names)
        {
            if let Err(source) = result {
                tracing::warn!(node = %reg.node, index, error = %source, "registration command refused");
                first_refusal.get_or_insert(super::state::StateError::Refused {
                    command,
                    index,
                    source,
                });
            }
        }
        // A node that could not be created (no free subnet in the cluster
        // CIDR) must not get a session: the agent hears why and retries.
        let exists = self.inner.store.read(|s| s.node(&reg.node).is_some());
        match first_refusal {
            Some(e) if !exists => Err(e),
            _ => Ok(()),
        }
    }

    async fn session_loop(
        &self,
        node: &NodeId,
        ready: &NodeStatus,
        inbound: &mut Streaming<pb::AgentMessage>,
        tx: &Outbound,
        kill: &Notify,
    ) {
        // The generation of every task as last sent, so that status echoes
        // (which do not bump it) are not sent back to the agent.
        let mut sent: HashMap<TaskId, u64> = HashMap::new();
        // What the agent has of the network state, and what changed since.
        let mut view = AgentView::default();
        let mut changed = Changes::default();
        let mut network_due: Option<tokio::time::Instant> = None;
        let Some(mut events) = self.send_full_set(node, tx, &mut sent, &mut view).await else {
            return;
        };
        let mut leadership = self.inner.store.raft().leadership();
        let me = self.inner.store.id();
        loop {
            let due = network_due;
            tokio::select! {
                moved = leadership.changed() => {
                    let leads = moved.is_ok() && leadership.borrow_and_update().leader == Some(me);
                    if !leads {
                        let _ = tx.send(Err(self.not_leader())).await;
                        return;
                    }
                }
                () = async move {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    network_due = None;
                    let update = self.inner.store.read(|s| {
                        netupdate::incremental(s, node, &changed, &mut view)
                    });
                    changed = Changes::default();
                    if let Some(update) = update {
                        let message = pb::ControllerMessage {
                            message: Some(pb::controller_message::Message::Network(update.into())),
                        };
                        if tx.send(Ok(message)).await.is_err() {
                            return;
                        }
                    }
                }
                () = super::stop_signal(self.shutdown.clone()) => {
                    let _ = tx.send(Err(Status::unavailable("the controller is shutting down"))).await;
                    return;
                }
                () = kill.notified() => {
                    let _ = tx.send(Err(Status::aborted("session replaced or lease expired"))).await;
                    return;
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        self.touch(node);
                        let beat = matches!(
                            message.message,
                            Some(pb::agent_message::Message::Heartbeat(_))
                        );
                        self.handle_agent_message(node, message).await;
                        if beat {
                            self.ensure_ready(node, ready).await;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(%node, error = %e, "agent stream broke");
                        return;
                    }
                },
                event = events.recv() => {
                    let mut batch = Vec::new();
                    let mut resync = false;
                    let mut next = event;
                    loop {
                        match next {
                            Some(Ok(events)) => batch.extend(events),
                            Some(Err(_)) | None => {
                                resync = true;
                                break;
                            }
                        }
                        match events.try_recv() {
                            Ok(e) => next = Some(e),
                            Err(_) => break,
                        }
                    }
                    if resync {
                        // Compacted (or the watch ended): start over with a
                        // full set, which is always correct.
                        changed = Changes::default();
                        network_due = None;
                        match self.send_full_set(node, tx, &mut sent, &mut view).await {
                            Some(rx) => events = rx,
                            None => return,
                        }
                        continue;
                    }
                    changed.add(&batch);
                    if !changed.is_empty() && network_due.is_none() {
                        network_due = Some(tokio::time::Instant::now() + NETWORK_BATCH);
                    }
                    if !self.send_changes(node, tx, &mut sent, batch).await {
                        return;
                    }
                }
            }
        }
    }

    /// Marks the node ready again if it is not while its live session
    /// heartbeats: the liveness loop may have marked it down from a stale
    /// reading just as the agent reconnected, and a down node with a live
    /// session would otherwise never come back.
    async fn ensure_ready(&self, node: &NodeId, ready: &NodeStatus) {
        let state = self
            .inner
            .store
            .read(|s| s.node(node).map(|n| n.status.state));
        if state.is_some_and(|s| s != NodeState::Ready) {
            tracing::info!(%node, "node heartbeats while marked down; marking it ready");
            let command = Command::UpdateNodeStatus {
                node: node.clone(),
                status: ready.clone(),
            };
            if let Err(e) = self.inner.store.propose(vec![command]).await {
                tracing::error!(%node, error = %e, "marking the node ready failed");
            }
        }
    }

    /// Sends the node's full assignment set and full network state, both
    /// read at one revision, and returns a watch from just after it.
    async fn send_full_set(
        &self,
        node: &NodeId,
        tx: &Outbound,
        sent: &mut HashMap<TaskId, u64>,
        view: &mut AgentView,
    ) -> Option<super::state::EventBatches> {
        let (revision, wanted, unwanted, network) = self.inner.store.read(|s| {
            let mut wanted: Vec<Task> = Vec::new();
            let mut unwanted: Vec<Task> = Vec::new();
            for t in s.tasks_on_node(node) {
                if t.desired_state == DesiredState::Running && is_assigned(t) {
                    wanted.push(t.clone());
                } else if t.occupies_node() {
                    unwanted.push(t.clone());
                }
            }
            let network = netupdate::full(s, node, view);
            (s.applied_index(), wanted, unwanted, network)
        });
        let events = match self.inner.store.watch(revision + 1) {
            Ok(rx) => rx,
            Err(e) => {
                tracing::warn!(%node, error = %e, "cannot watch the store for the session");
                let _ = tx
                    .send(Err(Status::unavailable(format!("watch: {e}"))))
                    .await;
                return None;
            }
        };
        sent.clear();
        for t in &wanted {
            sent.insert(t.id.clone(), t.generation);
        }
        let set = Assignments {
            generation: revision,
            full: true,
            changes: wanted.into_iter().map(AssignmentChange::Update).collect(),
        };
        let message = pb::ControllerMessage {
            message: Some(pb::controller_message::Message::Assignments(set.into())),
        };
        if tx.send(Ok(message)).await.is_err() {
            return None;
        }
        let message = pb::ControllerMessage {
            message: Some(pb::controller_message::Message::Network(network.into())),
        };
        if tx.send(Ok(message)).await.is_err() {
            return None;
        }
        if !unwanted.is_empty() {
            let commands = unwanted
                .into_iter()
                .map(|t| {
                    let mut status = t.status.clone();
                    status.state = TaskState::Shutdown;
                    status.message =
                        "not in the node's assignments when its agent connected; stopped by the agent"
                            .into();
                    status.timestamp_unix_ms = Some(super::executor::unix_ms(SystemTime::now()));
                    Command::UpdateTaskStatus {
                        task: t.id,
                        node: node.clone(),
                        status,
                    }
                })
                .collect();
            if let Err(e) = self.inner.store.propose(commands).await {
                tracing::warn!(%node, error = %e, "recording dropped tasks as shut down failed");
            }
        }
        Some(events)
    }

    /// Sends an incremental set for the events that concern this node;
    /// false when the session is gone.
    async fn send_changes(
        &self,
        node: &NodeId,
        tx: &Outbound,
        sent: &mut HashMap<TaskId, u64>,
        events: Vec<crate::store::Event>,
    ) -> bool {
        let mut changes = Vec::new();
        let mut generation = 0;
        for event in events {
            let Object::Task(task) = &*event.object else {
                continue;
            };
            if task.node.as_ref() != Some(node) {
                continue;
            }
            match event.kind {
                EventKind::Deleted => {
                    if sent.remove(&task.id).is_some() {
                        generation = event.revision;
                        changes.push(AssignmentChange::Remove(task.id.clone()));
                    }
                }
                EventKind::Created | EventKind::Updated => {
                    let known = sent.get(&task.id).copied();
                    let relevant = match known {
                        Some(g) => g != task.generation,
                        // A task the agent never had is only worth sending
                        // while it is wanted, and once it is assigned.
                        None => task.desired_state == DesiredState::Running && is_assigned(task),
                    };
                    if relevant {
                        sent.insert(task.id.clone(), task.generation);
                        generation = event.revision;
                        changes.push(AssignmentChange::Update(task.clone()));
                    }
                }
            }
        }
        if changes.is_empty() {
            return true;
        }
        let set = Assignments {
            generation,
            full: false,
            changes,
        };
        let message = pb::ControllerMessage {
            message: Some(pb::controller_message::Message::Assignments(set.into())),
        };
        tx.send(Ok(message)).await.is_ok()
    }

    async fn handle_agent_message(&self, node: &NodeId, message: pb::AgentMessage) {
        use pb::agent_message::Message;
        match message.message {
            Some(Message::Heartbeat(_)) | None => {}
            Some(Message::Hello(_)) => {
                tracing::debug!(%node, "ignoring a second hello in one session");
            }
            Some(Message::Status(updates)) => self.record_status(node, updates).await,
            Some(Message::Logs(chunk)) => {
                let id = chunk.request_id;
                let end = chunk.end;
                self.relay(
                    id,
                    pb::AgentMessage {
                        message: Some(Message::Logs(chunk)),
                    },
                )
                .await;
                if end {
                    self.tables().relays.remove(&id);
                }
            }
            Some(Message::Exec(output)) => {
                let id = output.request_id;
                let end = matches!(
                    output.output.as_ref().and_then(|o| o.message.as_ref()),
                    Some(pb::exec_server_message::Message::Exit(_))
                );
                self.relay(
                    id,
                    pb::AgentMessage {
                        message: Some(Message::Exec(output)),
                    },
                )
                .await;
                if end {
                    self.tables().relays.remove(&id);
                }
            }
        }
    }

    async fn relay(&self, request_id: u64, message: pb::AgentMessage) {
        let tx = self.tables().relays.get(&request_id).map(|r| r.tx.clone());
        if let Some(tx) = tx
            && tx.send(message).await.is_err()
        {
            // The client went away; forget the request.
            self.tables().relays.remove(&request_id);
        }
    }

    async fn record_status(&self, node: &NodeId, updates: pb::TaskStatusUpdates) {
        let reports: Vec<StatusReport> = updates
            .updates
            .into_iter()
            .filter_map(|u| match StatusReport::try_from(u) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(%node, error = %e, "dropping a malformed status update");
                    None
                }
            })
            .collect();
        let commands: Vec<Command> = self.inner.store.read(|s| {
            reports
                .into_iter()
                .filter(|r| match s.task(&r.task) {
                    // A report about an older generation was overtaken by a
                    // change the agent has not acted on yet.
                    Some(t) => t.node.as_ref() == Some(node) && r.generation >= t.generation,
                    None => false,
                })
                .map(|r| Command::UpdateTaskStatus {
                    task: r.task,
                    node: node.clone(),
                    status: r.status,
                })
                .collect()
        });
        match self.inner.store.propose(commands).await {
            Ok(results) => {
                for (index, result) in results {
                    if let Err(e) = result {
                        tracing::debug!(%node, index, error = %e, "status update refused");
                    }
                }
            }
            Err(e) => tracing::error!(%node, error = %e, "recording task status failed"),
        }
    }
}

/// Whether the scheduler has assigned `task` (as swarmkit's dispatcher,
/// only those go to an agent). A global task names its node from the
/// start, but until it is assigned it may still be held back (Compose
/// `depends_on`, `not_before` of a retry): sent early, the agent would run
/// it at once and its reports would be refused as "never assigned".
fn is_assigned(task: &Task) -> bool {
    task.status.state.rank() >= TaskState::Assigned.rank()
}

/// The status a node reports in its hello, as ready.
fn ready_status(reg: &Registration) -> NodeStatus {
    NodeStatus {
        state: NodeState::Ready,
        address: reg.address.clone(),
        hostname: reg.hostname.clone(),
        resources: reg.resources,
        platform: reg.platform.clone(),
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The stream a session answers with.
pub type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::dispatcher_server::Dispatcher for Dispatcher {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        if !self.inner.store.is_leader() {
            return Err(self.not_leader());
        }
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(128);
        let this = self.clone();
        tokio::spawn(async move { this.run_session(inbound, tx).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
