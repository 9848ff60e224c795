//! The controllers' side of replication on the gRPC port: the `Raft`
//! service (Step, Stream), the `Cluster` service (ListControllers,
//! JoinController, RemoveController), and the gRPC [`Transport`] that
//! carries Raft messages to peers (a follower's writes among them: raft-rs
//! forwards its proposals to the leader as `MsgProp` messages).
//!
//! Decisions:
//! - **One queue per peer, bounded** ([`PEER_QUEUE`] messages), drained by
//!   one task per peer over one HTTP/2 channel: each drain (everything
//!   queued) is one `RaftBatch` on a long-lived client stream
//!   (`Raft.Stream`), so order is kept and no send waits for the answer to
//!   the previous one. `send` never blocks the Raft
//!   loop: a full queue drops the message and reports the peer unreachable
//!   (raft-rs then probes it instead of streaming appends into the void),
//!   as etcd's rafthttp does with its 4096-message pipeline buffer. A failed
//!   send reports the peer unreachable and drops what queued behind it
//!   (stale heartbeats and appends are worthless; raft resends).
//! - A follower asked to change membership passes the request to the leader
//!   over the same `Cluster` service, so `gantry controller --join` may name
//!   any member, as with `docker swarm join`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gantry_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use super::state::{StateError, StoreFront};
use crate::raft::{Message, RaftError, RaftNode, Role, Transport, encode_message};
use crate::store::ApplyError;

/// Messages queued per peer before new ones are dropped.
pub const PEER_QUEUE: usize = 4096;

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
    peers: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
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

    fn queue(&self, to: u64) -> Option<mpsc::Sender<Message>> {
        let node = self.node.get()?;
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = peers.get(&to)
            && !tx.is_closed()
        {
            return Some(tx.clone());
        }
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
        // Called on the Raft thread: a lazy channel spawns its connection
        // task, which needs the runtime's context.
        let _runtime = self.runtime.enter();
        let channel = match channel(&address, PEER_CONNECT_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(peer = to, "{e}");
                return None;
            }
        };
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        self.runtime
            .spawn(peer_loop(node.clone(), to, address, channel, rx));
        peers.insert(to, tx.clone());
        Some(tx)
    }
}

impl Transport for GrpcTransport {
    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            let Some(tx) = self.queue(to) else {
                continue;
            };
            if tx.try_send(m).is_err()
                && let Some(node) = self.node.get()
            {
                node.report_unreachable(to);
            }
        }
    }
}

/// Most bytes of raft messages put in one [`pb::RaftBatch`] (far below the
/// server's decoding limit; a larger drain goes out as several batches).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Batches handed to a peer's stream before its sender waits: with the
/// HTTP/2 window this is the pipeline depth.
const STREAM_BATCHES: usize = 64;

/// An open `Raft.Stream` call: where its batches go, and the call itself.
type StreamCall = (
    mpsc::Sender<pb::RaftBatch>,
    tokio::task::JoinHandle<Result<(), Status>>,
);

/// One peer's outgoing side: the open `Raft.Stream` call, if any.
struct Peer {
    node: RaftNode,
    to: u64,
    address: String,
    client: pb::raft_client::RaftClient<Channel>,
    stream: Option<StreamCall>,
    failing: bool,
}

impl Peer {
    /// Sends `messages` (encoded, in order) on the stream, opening it when
    /// none is open. False when the peer cannot take them.
    async fn send_batch(&mut self, messages: Vec<Vec<u8>>) -> bool {
        if let Some((tx, call)) = &self.stream
            && (tx.is_closed() || call.is_finished())
        {
            let (_, call) = self.stream.take().expect("checked above");
            let why = match call.await {
                Ok(Ok(())) => "the stream was closed by the peer".to_string(),
                Ok(Err(status)) if says_removed(&status) => {
                    self.node.report_removed(self.to);
                    status.message().to_string()
                }
                Ok(Err(status)) => status.message().to_string(),
                Err(e) => format!("the stream's task failed: {e}"),
            };
            self.failed(why);
            return false;
        }
        // "Reachable again" only once a stream outlived a batch: a new one
        // takes batches before it has connected.
        let established = self.stream.is_some();
        let tx = match &self.stream {
            Some((tx, _)) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::channel(STREAM_BATCHES);
                let mut client = self.client.clone();
                let call = tokio::spawn(async move {
                    client
                        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                        .map(|_| ())
                });
                self.stream = Some((tx.clone(), call));
                tx
            }
        };
        // A peer that stops reading fills the HTTP/2 window, then this
        // channel: give up after STEP_TIMEOUT, as a unary Step would.
        match tokio::time::timeout(STEP_TIMEOUT, tx.send(pb::RaftBatch { messages })).await {
            Ok(Ok(())) => {
                if established {
                    self.reachable();
                }
                true
            }
            Ok(Err(_)) => {
                // The call ended; its error is read on the next batch.
                self.node.report_unreachable(self.to);
                false
            }
            Err(_) => {
                if let Some((_, call)) = self.stream.take() {
                    call.abort();
                }
                self.failed("timed out".to_string());
                false
            }
        }
    }

    /// Sends a snapshot on the unary `Raft.Step` (it is large and rare, and
    /// raft-rs wants to hear how it ended).
    async fn send_snapshot(&mut self, m: Message) -> bool {
        let mut request = Request::new(pb::RaftMessage {
            message: encode_message(&m),
        });
        request.set_timeout(SNAPSHOT_TIMEOUT);
        let result = tokio::time::timeout(SNAPSHOT_TIMEOUT, self.client.step(request)).await;
        let ok = matches!(result, Ok(Ok(_)));
        tracing::info!(
            peer = self.to,
            address = %self.address,
            index = m.get_snapshot().get_metadata().get_index(),
            delivered = ok,
            "snapshot sent"
        );
        self.node.report_snapshot(self.to, !ok);
        match result {
            Ok(Ok(_)) => self.reachable(),
            Ok(Err(status)) => {
                if says_removed(&status) {
                    self.node.report_removed(self.to);
                }
                self.failed(status.message().to_string())
            }
            Err(_) => self.failed("timed out".to_string()),
        }
        ok
    }

    fn reachable(&mut self) {
        if self.failing {
            tracing::info!(peer = self.to, address = %self.address, "controller reachable again");
            self.failing = false;
        }
    }

    fn failed(&mut self, why: String) {
        if !self.failing {
            tracing::warn!(peer = self.to, address = %self.address, "raft messages not delivered: {why}");
            self.failing = true;
        }
        self.node.report_unreachable(self.to);
    }
}

/// Drains one peer's queue: everything queued since the last batch goes
/// out as one [`pb::RaftBatch`] on one long-lived `Raft.Stream` call, so
/// the order is kept and no batch waits for the previous one's answer
/// (etcd's rafthttp streams the same way). Snapshots go on `Raft.Step`,
/// after what queued before them.
async fn peer_loop(
    node: RaftNode,
    to: u64,
    address: String,
    channel: Channel,
    mut rx: mpsc::Receiver<Message>,
) {
    let client = pb::raft_client::RaftClient::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    let mut peer = Peer {
        node,
        to,
        address,
        client,
        stream: None,
        failing: false,
    };
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => break,
            },
        };
        let ok = if first.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
            peer.send_snapshot(first).await
        } else {
            let mut batch = Vec::new();
            let mut bytes = 0;
            let mut pending = Some(first);
            while let Some(m) = pending.take() {
                if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                    next = Some(m);
                    break;
                }
                let encoded = encode_message(&m);
                bytes += encoded.len();
                batch.push(encoded);
                if bytes >= MAX_BATCH_BYTES {
                    break;
                }
                pending = rx.try_recv().ok();
            }
            peer.send_batch(batch).await
        };
        if !ok {
            // What queued behind a failed send is stale by the time the
            // peer is back; raft resends what matters.
            next = None;
            while rx.try_recv().is_ok() {}
        }
    }
    if let Some((_, call)) = peer.stream.take() {
        call.abort();
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
        match raft.step_message(message) {
            Ok(()) => Ok(()),
            Err(RaftError::Stopped) => Err(Status::unavailable("the controller is shutting down")),
            Err(e) => Err(Status::invalid_argument(e.to_string())),
        }
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
            for bytes in &batch.messages {
                self.step_one(bytes)?;
            }
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
