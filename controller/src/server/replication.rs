//! The controllers' side of replication on the gRPC port: the `Raft`
//! service (Step, Stream), the `Cluster` service (ListControllers,
//! JoinController, RemoveController), and the gRPC [`Transport`] that
//! carries Raft messages to peers (a follower's writes among them: raft-rs
//! forwards its proposals to the leader as `MsgProp` messages).
//!
//! Decisions:
//! - **One long-lived client stream per peer** (`Raft.Stream` over one
//!   HTTP/2 channel): the Raft thread encodes a Ready's messages for a peer
//!   into one `RaftBatch` and puts it straight on the stream's bounded queue
//!   ([`PEER_QUEUE`] batches), which hyper's task for the call drains, so
//!   order is kept, no send waits for the answer to the previous one, and
//!   no task of ours sits between the Raft thread and the connection (a
//!   task per peer in between cost a wake-up per message on the critical
//!   path). `send` never blocks the Raft loop: a full queue drops the batch
//!   and reports the peer unreachable (raft-rs then probes it instead of
//!   streaming appends into the void), as etcd's rafthttp does with its
//!   4096-message pipeline buffer; a queue full for a second gets a new
//!   stream. A stream that ends reports the peer unreachable (stale
//!   heartbeats and appends are worthless; raft resends); the next Ready
//!   opens a new one.
//! - A follower asked to change membership passes the request to the leader
//!   over the same `Cluster` service, so `gantry controller --join` may name
//!   any member, as with `docker swarm join`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gantry_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use super::state::{StateError, StoreFront};
use crate::raft::{Message, RaftError, RaftNode, Role, Transport, encode_message};
use crate::store::ApplyError;

/// How long one `Raft.Step` may take (a snapshot longer).
const STEP_TIMEOUT: Duration = Duration::from_secs(1);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to a peer may take: a partitioned peer must not hold
/// its queue for long.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The metadata key naming the leader in a follower's refusal.
pub const LEADER_METADATA: &str = "gantry-leader";

/// A gRPC status for a store error: UNAVAILABLE (with the leader named in
/// `gantry-leader` when known) for no quorum, no leader and shutdown, so
/// clients retry elsewhere; NOT_FOUND and ABORTED for refusals; INTERNAL
/// for the rest.
pub fn status_of(e: StateError, leader: Option<String>) -> Status {
    match e {
        StateError::Refused { source, .. } => match source {
            ApplyError::NotFound { .. } => Status::not_found(source.to_string()),
            other => Status::aborted(other.to_string()),
        },
        e if e.is_unavailable() => unavailable(e.to_string(), leader),
        other => Status::internal(other.to_string()),
    }
}

/// The metadata key that marks an UNAVAILABLE as this controller's own
/// ("not here, not now": no quorum, no leader, shutting down, the leader
/// unreachable), as opposed to an answer about something else (a node
/// whose agent is not connected): clients try another controller on the
/// first, never on the second.
pub const RETRY_METADATA: &str = "gantry-retry";

/// UNAVAILABLE with `message`, naming `leader` in the metadata when known,
/// and marked with [`RETRY_METADATA`].
pub fn unavailable(message: String, leader: Option<String>) -> Status {
    let mut status = Status::unavailable(message);
    status.metadata_mut().insert(
        RETRY_METADATA,
        tonic::metadata::MetadataValue::from_static("another-controller"),
    );
    if let Some(leader) = leader.filter(|l| !l.is_empty())
        && let Ok(value) = leader.parse()
    {
        status.metadata_mut().insert(LEADER_METADATA, value);
    }
    status
}

/// A lazily connected channel to `address`.
fn channel(address: &str, connect_timeout: Duration) -> Result<Channel, String> {
    Endpoint::from_shared(format!("http://{address}"))
        .map(|e| {
            e.connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2))
                .connect_lazy()
        })
        .map_err(|e| format!("invalid controller address {address}: {e}"))
}

// ---------------------------------------------------------------------------
// Transport

/// Raft messages to peers over `Raft.Stream` (snapshots over `Raft.Step`);
/// see the module documentation.
pub struct GrpcTransport {
    runtime: tokio::runtime::Handle,
    node: OnceLock<RaftNode>,
    peers: Mutex<HashMap<u64, Peer>>,
    /// Addresses learnt outside the replicated address book: a joining
    /// member has no configuration until the leader's snapshot arrives, yet
    /// must answer the leader before that (from the join's answer).
    known: Mutex<HashMap<u64, String>>,
}

impl std::fmt::Debug for GrpcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTransport").finish_non_exhaustive()
    }
}

/// Batches queued on a peer's open stream before new ones are dropped
/// (with the HTTP/2 window this is the pipeline depth; a Ready makes at
/// most one batch per peer).
pub const PEER_QUEUE: usize = 1024;

/// Most bytes of raft messages put in one [`pb::RaftBatch`] (far below the
/// server's decoding limit; a larger Ready goes out as several batches).
const MAX_BATCH_BYTES: usize = 4 << 20;

/// An open `Raft.Stream` call: where its batches go, and the call itself.
struct StreamCall {
    tx: mpsc::Sender<pb::RaftBatch>,
    call: tokio::task::JoinHandle<()>,
    /// A batch went out on it already ("reachable again" only once a
    /// stream outlived a batch: a new one takes batches before it has
    /// connected).
    used: bool,
    /// Since when its queue has been full: a peer that stops reading fills
    /// the HTTP/2 window, then the queue.
    full_since: Option<Instant>,
}

/// One peer's outgoing side, owned by the transport and used on the Raft
/// thread only.
struct Peer {
    address: String,
    client: pb::raft_client::RaftClient<Channel>,
    stream: Option<StreamCall>,
    /// Whether "not delivered" was logged and "reachable again" was not
    /// yet (shared with the stream's and snapshots' tasks).
    failing: Arc<AtomicBool>,
}

impl GrpcTransport {
    /// A transport whose peer tasks run on `runtime`.
    pub fn new(runtime: tokio::runtime::Handle) -> Arc<GrpcTransport> {
        Arc::new(GrpcTransport {
            runtime,
            node: OnceLock::new(),
            peers: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
        })
    }

    /// Remembers peers' addresses from outside the configuration (the
    /// members a join's answer lists).
    pub fn learn(&self, members: impl IntoIterator<Item = (u64, String)>) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.extend(members.into_iter().filter(|(_, a)| !a.is_empty()));
    }

    /// Gives the transport its node (for peer addresses and reports); until
    /// then messages are dropped (raft resends).
    pub fn attach(&self, node: RaftNode) {
        let _ = self.node.set(node);
    }

    /// The peer `to`, connected lazily on first use.
    fn peer<'a>(
        &self,
        node: &RaftNode,
        peers: &'a mut HashMap<u64, Peer>,
        to: u64,
    ) -> Option<&'a mut Peer> {
        let slot = match peers.entry(to) {
            std::collections::hash_map::Entry::Occupied(peer) => return Some(peer.into_mut()),
            std::collections::hash_map::Entry::Vacant(slot) => slot,
        };
        {
            let address = node
                .status()
                .members
                .into_iter()
                .find(|m| m.id == to)
                .map(|m| m.address)
                .filter(|a| !a.is_empty())
                .or_else(|| {
                    let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
                    known.get(&to).cloned()
                });
            let Some(address) = address else {
                tracing::debug!(peer = to, "no address for the peer yet; message dropped");
                return None;
            };
            // Called on the Raft thread: a lazy channel spawns its
            // connection task, which needs the runtime's context.
            let _runtime = self.runtime.enter();
            let channel = match channel(&address, PEER_CONNECT_TIMEOUT) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(peer = to, "{e}");
                    return None;
                }
            };
            let client = pb::raft_client::RaftClient::new(channel)
                .max_encoding_message_size(usize::MAX)
                .max_decoding_message_size(usize::MAX);
            Some(slot.insert(Peer {
                address,
                client,
                stream: None,
                failing: Arc::new(AtomicBool::new(false)),
            }))
        }
    }

    /// Puts `messages` (encoded, in order) on `to`'s stream, opening it
    /// when none is open. Runs on the Raft thread and never waits: the
    /// stream's own task (hyper's) takes the batch from the queue, with no
    /// task of ours in between.
    fn send_batch(&self, node: &RaftNode, peer: &mut Peer, to: u64, messages: Vec<Vec<u8>>) {
        if peer
            .stream
            .as_ref()
            .is_some_and(|s| s.tx.is_closed() || s.call.is_finished())
        {
            // The call ended; its task reported why.
            peer.stream = None;
        }
        let stream = peer.stream.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            let mut client = peer.client.clone();
            let node = node.clone();
            let address = peer.address.clone();
            let failing = peer.failing.clone();
            let call = self.runtime.spawn(async move {
                let why = match client
                    .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                {
                    Ok(_) => "the stream was closed by the peer".to_string(),
                    Err(status) => {
                        if says_removed(&status) {
                            node.report_removed(to);
                        }
                        status.message().to_string()
                    }
                };
                failed(&node, to, &address, &failing, &why);
            });
            StreamCall {
                tx,
                call,
                used: false,
                full_since: None,
            }
        });
        match stream.tx.try_send(pb::RaftBatch { messages }) {
            Ok(()) => {
                stream.full_since = None;
                if stream.used && peer.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(peer = to, address = %peer.address, "controller reachable again");
                }
                stream.used = true;
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                // Dropped: raft-rs probes the peer and resends. A peer
                // that has not read for STEP_TIMEOUT gets a new stream, as
                // a unary Step would have timed out.
                let since = *stream.full_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= STEP_TIMEOUT {
                    stream.call.abort();
                    peer.stream = None;
                    failed(node, to, &peer.address, &peer.failing, "timed out");
                } else {
                    node.report_unreachable(to);
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                peer.stream = None;
                node.report_unreachable(to);
            }
        }
    }

    /// Sends a snapshot on the unary `Raft.Step` from a task of its own (it
    /// is large and rare, and raft-rs wants to hear how it ended).
    fn send_snapshot(&self, node: &RaftNode, peer: &Peer, to: u64, m: Message) {
        let mut client = peer.client.clone();
        let node = node.clone();
        let address = peer.address.clone();
        let failing = peer.failing.clone();
        self.runtime.spawn(async move {
            let mut request = Request::new(pb::RaftMessage {
                message: encode_message(&m),
            });
            request.set_timeout(SNAPSHOT_TIMEOUT);
            let result = tokio::time::timeout(SNAPSHOT_TIMEOUT, client.step(request)).await;
            let ok = matches!(result, Ok(Ok(_)));
            tracing::info!(
                peer = to,
                address = %address,
                index = m.get_snapshot().get_metadata().get_index(),
                delivered = ok,
                "snapshot sent"
            );
            node.report_snapshot(to, !ok);
            match result {
                Ok(Ok(_)) => {
                    if failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(peer = to, address = %address, "controller reachable again");
                    }
                }
                Ok(Err(status)) => {
                    if says_removed(&status) {
                        node.report_removed(to);
                    }
                    failed(&node, to, &address, &failing, status.message());
                }
                Err(_) => failed(&node, to, &address, &failing, "timed out"),
            }
        });
    }
}

/// Logs (once per outage) that messages to `to` were not delivered, and
/// reports it unreachable.
fn failed(node: &RaftNode, to: u64, address: &str, failing: &AtomicBool, why: &str) {
    if !failing.swap(true, Ordering::Relaxed) {
        tracing::warn!(peer = to, address = %address, "raft messages not delivered: {why}");
    }
    node.report_unreachable(to);
}

impl Transport for GrpcTransport {
    /// Called on the Raft thread with a Ready's messages: each peer's go
    /// out as one batch (several past MAX_BATCH_BYTES), in order, with a
    /// snapshot after what came before it.
    fn send(&self, msgs: Vec<Message>) {
        let Some(node) = self.node.get() else {
            return;
        };
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut batches: Vec<(u64, Vec<Vec<u8>>, usize)> = Vec::new();
        for m in msgs {
            let to = m.to;
            if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                if let Some(i) = batches.iter().position(|(t, _, _)| *t == to) {
                    let (_, batch, _) = batches.swap_remove(i);
                    if let Some(peer) = self.peer(node, &mut peers, to) {
                        self.send_batch(node, peer, to, batch);
                    }
                }
                if let Some(peer) = self.peer(node, &mut peers, to) {
                    self.send_snapshot(node, peer, to, m);
                }
                continue;
            }
            let encoded = encode_message(&m);
            let i = match batches.iter().position(|(t, _, _)| *t == to) {
                Some(i) => i,
                None => {
                    batches.push((to, Vec::new(), 0));
                    batches.len() - 1
                }
            };
            batches[i].2 += encoded.len();
            batches[i].1.push(encoded);
            if batches[i].2 >= MAX_BATCH_BYTES {
                let (_, batch, _) = batches.swap_remove(i);
                if let Some(peer) = self.peer(node, &mut peers, to) {
                    self.send_batch(node, peer, to, batch);
                }
            }
        }
        for (to, batch, _) in batches {
            if let Some(peer) = self.peer(node, &mut peers, to) {
                self.send_batch(node, peer, to, batch);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The Raft service

/// `gantry.v1.Raft`: messages from peers.
#[derive(Debug, Clone)]
pub struct RaftService {
    store: StoreFront,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

impl RaftService {
    /// The service over `store`.
    pub fn new(store: StoreFront) -> RaftService {
        RaftService {
            store,
            shutdown: None,
        }
    }

    /// Ends peers' open `Raft.Stream` calls when `stop` turns true: they
    /// never end on their own, and would hold the shutdown for the whole
    /// drain timeout.
    pub fn with_shutdown(mut self, stop: tokio::sync::watch::Receiver<bool>) -> RaftService {
        self.shutdown = Some(stop);
        self
    }
}

impl RaftService {
    /// Hands one message to the Raft loop, unless it comes from a member
    /// that was removed: that one is told so (etcd answers a removed
    /// member's messages the same way), and stops.
    fn step_one(&self, bytes: &[u8]) -> Result<(), Status> {
        let message = self.checked(bytes)?;
        step_result(self.store.raft().step_message(message))
    }

    /// Decodes one message, refusing a removed member's.
    fn checked(&self, bytes: &[u8]) -> Result<Message, Status> {
        let raft = self.store.raft();
        let message = crate::raft::decode_message(bytes)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if raft.was_removed(message.from) {
            let mut status = Status::failed_precondition(format!(
                "controller {} was removed from the cluster",
                message.from
            ));
            status.metadata_mut().insert(
                REMOVED_METADATA,
                tonic::metadata::MetadataValue::from(message.from),
            );
            return Err(status);
        }
        Ok(message)
    }
}

fn step_result(result: Result<(), RaftError>) -> Result<(), Status> {
    match result {
        Ok(()) => Ok(()),
        Err(RaftError::Stopped) => Err(Status::unavailable("the controller is shutting down")),
        Err(e) => Err(Status::invalid_argument(e.to_string())),
    }
}

/// The metadata key on the answer to a removed member's Raft messages
/// (its raft id).
pub const REMOVED_METADATA: &str = "gantry-removed";

/// Whether `status` is a peer's answer that this member was removed.
fn says_removed(status: &Status) -> bool {
    status.metadata().get(REMOVED_METADATA).is_some()
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn step(&self, request: Request<pb::RaftMessage>) -> Result<Response<pb::Empty>, Status> {
        let bytes = request.into_inner().message;
        if tracing::enabled!(tracing::Level::DEBUG)
            && let Ok(m) = crate::raft::decode_message(&bytes)
        {
            tracing::debug!(from = m.from, kind = ?m.get_msg_type(), index = m.index, "raft message");
        }
        match self.step_one(&bytes) {
            Ok(()) => Ok(Response::new(pb::Empty {})),
            Err(status) => Err(status),
        }
    }

    async fn stream(
        &self,
        request: Request<Streaming<pb::RaftBatch>>,
    ) -> Result<Response<pb::Empty>, Status> {
        let mut batches = request.into_inner();
        let stop = super::stop_signal(self.shutdown.clone());
        tokio::pin!(stop);
        loop {
            let batch = tokio::select! {
                b = batches.message() => b?,
                () = &mut stop => {
                    return Err(Status::unavailable("the controller is shutting down"));
                }
            };
            let Some(batch) = batch else {
                break;
            };
            // One hand-off to the Raft loop per batch, not per message: a
            // batch is one Ready's messages for this member, and the loop
            // steps them all in one turn.
            let messages = batch
                .messages
                .iter()
                .map(|bytes| self.checked(bytes))
                .collect::<Result<Vec<_>, _>>()?;
            step_result(self.store.raft().step_messages(messages))?;
        }
        Ok(Response::new(pb::Empty {}))
    }
}

// ---------------------------------------------------------------------------
// The Cluster service

/// `gantry.v1.Cluster`: the controllers and their membership.
#[derive(Debug, Clone)]
pub struct ClusterService {
    store: StoreFront,
}

impl ClusterService {
    /// The service over `store`.
    pub fn new(store: StoreFront) -> ClusterService {
        ClusterService { store }
    }

    fn list(&self) -> pb::ListControllersResponse {
        let raft = self.store.raft();
        let status = raft.status();
        let metrics = raft.metrics();
        let leading = status.role == Role::Leader;
        let controllers = status
            .members
            .iter()
            .map(|m| {
                let me = m.id == status.id;
                let role = if status.leader == Some(m.id) {
                    pb::ControllerRole::Leader
                } else if me {
                    match status.role {
                        Role::Leader => pb::ControllerRole::Leader,
                        Role::Follower => pb::ControllerRole::Follower,
                        Role::Candidate | Role::PreCandidate => pb::ControllerRole::Candidate,
                    }
                } else if leading && !m.recent_active {
                    pb::ControllerRole::Unreachable
                } else {
                    pb::ControllerRole::Follower
                };
                pb::ControllerInfo {
                    raft_id: m.id,
                    address: m.address.clone(),
                    role: role as i32,
                    term: status.term,
                    applied_index: if me { status.applied } else { m.match_index },
                    is_self: me,
                }
            })
            .collect();
        pb::ListControllersResponse {
            controllers,
            leader_id: status.leader.unwrap_or(0),
            commit_index: status.commit,
            metrics: Some(pb::ControllerMetrics {
                term: metrics.term,
                leader_changes: metrics.leader_changes,
                commit_index: metrics.commit,
                applied_index: metrics.applied,
                proposals: metrics.proposals_committed,
                proposal_p50_ms: finite(metrics.proposal_latency.quantile_ms(0.5)),
                proposal_p99_ms: finite(metrics.proposal_latency.quantile_ms(0.99)),
            }),
        }
    }

    /// A client of the leader's `Cluster` service, for a follower passing a
    /// membership change on.
    fn leader_client(
        &self,
        e: RaftError,
    ) -> Result<pb::cluster_client::ClusterClient<Channel>, Status> {
        match e {
            RaftError::NotLeader {
                leader: Some((_, address)),
            } if !address.is_empty() => {
                let c = channel(&address, PEER_CONNECT_TIMEOUT).map_err(Status::internal)?;
                Ok(pb::cluster_client::ClusterClient::new(c))
            }
            e => Err(membership_status(e, self.store.leader_address())),
        }
    }
}

/// Bucket bounds are infinite past the last one; JSON has no infinity.
fn finite(ms: f64) -> f64 {
    if ms.is_finite() { ms } else { f64::MAX }
}

fn membership_status(e: RaftError, leader: Option<String>) -> Status {
    match e {
        RaftError::ChangePending { .. } => Status::failed_precondition(e.to_string()),
        RaftError::BadChange(_) => Status::invalid_argument(e.to_string()),
        e => status_of(e.into(), leader),
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn list_controllers(
        &self,
        _request: Request<pb::Empty>,
    ) -> Result<Response<pb::ListControllersResponse>, Status> {
        Ok(Response::new(self.list()))
    }

    async fn join_controller(
        &self,
        request: Request<pb::JoinControllerRequest>,
    ) -> Result<Response<pb::JoinControllerResponse>, Status> {
        let address = request.into_inner().address.trim().to_string();
        if address.is_empty() {
            return Err(Status::invalid_argument("address: must not be empty"));
        }
        match self.store.raft().add_member(address.clone()).await {
            Ok(raft_id) => {
                tracing::info!(raft_id, %address, "controller added");
                Ok(Response::new(pb::JoinControllerResponse {
                    raft_id,
                    controllers: self.list().controllers,
                }))
            }
            Err(e) => {
                let mut leader = self.leader_client(e)?;
                leader
                    .join_controller(pb::JoinControllerRequest { address })
                    .await
            }
        }
    }

    async fn remove_controller(
        &self,
        request: Request<pb::RemoveControllerRequest>,
    ) -> Result<Response<pb::ListControllersResponse>, Status> {
        let request = request.into_inner();
        let members = self.store.raft().status().members;
        let id = match &request.controller {
            Some(pb::remove_controller_request::Controller::RaftId(id)) => members
                .iter()
                .find(|m| m.id == *id)
                .map(|m| m.id)
                .ok_or_else(|| Status::not_found(format!("controller {id} is not a member")))?,
            Some(pb::remove_controller_request::Controller::Address(a)) => members
                .iter()
                .find(|m| m.address == *a)
                .map(|m| m.id)
                .ok_or_else(|| Status::not_found(format!("no controller at {a} is a member")))?,
            None => {
                return Err(Status::invalid_argument(
                    "controller: give a raft id or an address",
                ));
            }
        };
        match self.store.raft().remove_member(id).await {
            Ok(()) => {
                tracing::info!(raft_id = id, "controller removed");
                Ok(Response::new(self.list()))
            }
            Err(e) => {
                let mut leader = self.leader_client(e)?;
                leader
                    .remove_controller(pb::RemoveControllerRequest {
                        controller: Some(pb::remove_controller_request::Controller::RaftId(id)),
                    })
                    .await
            }
        }
    }
}

/// Asks the controller at `address` (any member) to add this one at
/// `advertise`; retries for up to `timeout` while the cluster elects or
/// the member starts. Returns the raft id given and the members (id,
/// address) the answer lists.
pub async fn join(
    address: &str,
    advertise: &str,
    timeout: Duration,
) -> Result<(u64, Vec<(u64, String)>), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut wait = Duration::from_millis(100);
    loop {
        let attempt = async {
            let c = channel(address, Duration::from_secs(2))?;
            let mut client = pb::cluster_client::ClusterClient::new(c);
            client
                .join_controller(pb::JoinControllerRequest {
                    address: advertise.to_string(),
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    let members = r
                        .controllers
                        .into_iter()
                        .map(|c| (c.raft_id, c.address))
                        .collect::<Vec<_>>();
                    (r.raft_id, members)
                })
                .map_err(|s| format!("{}: {}", code_name(s.code()), s.message()))
        };
        match attempt.await {
            Ok(joined) => return Ok(joined),
            Err(e) if tokio::time::Instant::now() + wait < deadline => {
                tracing::warn!(%address, "joining: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(format!("joining the cluster through {address}: {e}")),
        }
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::Unimplemented => "unimplemented (not a replicated controller)",
        _ => "error",
    }
}

/// The Prometheus text exposition of this controller's Raft counters
/// (`GET /metrics` on the controller's port).
pub fn metrics_text(store: &StoreFront) -> String {
    use std::fmt::Write as _;
    let raft = store.raft();
    let m = raft.metrics();
    let status = raft.status();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    gauge(
        "gantry_raft_term",
        "The current Raft term.",
        "gauge",
        m.term as f64,
    );
    gauge(
        "gantry_raft_is_leader",
        "1 while this controller leads.",
        "gauge",
        f64::from(u8::from(status.role == Role::Leader)),
    );
    gauge(
        "gantry_raft_leader_changes_total",
        "Leader changes seen by this controller.",
        "counter",
        m.leader_changes as f64,
    );
    gauge(
        "gantry_raft_commit_index",
        "The commit index.",
        "gauge",
        m.commit as f64,
    );
    gauge(
        "gantry_raft_applied_index",
        "The applied index.",
        "gauge",
        m.applied as f64,
    );
    gauge(
        "gantry_raft_members",
        "Voters in the configuration.",
        "gauge",
        status.members.len() as f64,
    );
    gauge(
        "gantry_raft_proposals_committed_total",
        "Commands proposed here and committed.",
        "counter",
        m.proposals_committed as f64,
    );
    gauge(
        "gantry_raft_proposals_failed_total",
        "Commands proposed here that failed (outcome unknown).",
        "counter",
        m.proposals_failed as f64,
    );
    gauge(
        "gantry_raft_reads_retried_total",
        "Linearizable reads asked again after going unanswered for 200 ms.",
        "counter",
        m.reads_retried as f64,
    );
    gauge(
        "gantry_raft_log_writes_total",
        "Ready writes to the durable log (one fsync each).",
        "counter",
        m.log_writes as f64,
    );
    gauge(
        "gantry_raft_log_write_seconds_total",
        "Seconds spent writing the durable log.",
        "counter",
        m.log_write_seconds,
    );
    let h = &m.proposal_latency;
    let name = "gantry_raft_proposal_latency_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Proposal latency, proposed to applied.\n# TYPE {name} histogram"
    );
    let mut cumulative = 0;
    for (i, bound) in crate::raft::LATENCY_BUCKETS_MS.iter().enumerate() {
        cumulative += h.counts.get(i).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            bound / 1000.0
        );
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count {}", h.count);
    out
}
