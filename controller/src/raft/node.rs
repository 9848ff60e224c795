//! The Raft loop and its handle.
//!
//! One loop per controller, on its own OS thread (the store must not block
//! tokio workers on fsync). Each turn: wait for a request or the next tick,
//! take every request that queued meanwhile (so proposals that arrived
//! during the previous fsync go into one Ready: group commit), tick if due,
//! then handle the Ready in raft-rs's documented order:
//!
//! 1. send `messages` (the leader's appends may leave before its own fsync,
//!    Raft §10.2.1);
//! 2. answer ReadIndex requests; a leader applies committed entries to the
//!    [`StateMachine`], publishes their events, answers their proposers
//!    (raft-rs hands out only entries already durable here, so answers need
//!    not wait for this Ready's fsync); a follower with no proposals of
//!    its own waiting does that after step 5, so that its acknowledgement
//!    does not wait for its applying;
//! 3. persist the snapshot, the entries and the hard state in **one**
//!    durable write (entries and hard state: one WAL record, one
//!    `fdatasync`; a snapshot also goes to redb); a commit-index-only
//!    change waits for the next write;
//! 4. install a received snapshot into the state machine;
//! 5. send `persisted_messages` (votes, append responses: they promise
//!    what was just made durable); a follower applies step 2's entries;
//! 6. `advance`, then the light ready: messages, committed entries;
//!    `advance_apply`;
//! 7. snapshot and compact when `snapshot_every` entries were applied.
//!
//! Proposals are routed back by their entry context: this member's id, a
//! per-start incarnation (so an entry proposed before a restart never
//! answers a proposal made after it), a proposal key and the command's slot.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry as RaftEntry, EntryType};
use ::raft::{RawNode, ReadOnlyOption, SnapshotStatus, StateRole};
use protobuf::Message as _;
use tokio::sync::{oneshot, watch};

use super::storage::{RaftStorage, conf_state_of, decode_snapshot_data, hard_state_from_raft};
use super::{
    Bootstrap, LatencyHistogram, Leadership, MemberStatus, Message, RaftConfig, RaftError,
    RaftMetrics, RaftStatus, Role, Transport,
};
use crate::store::{
    Applied, Command, Entry, EntryKind, HardState, LOG_FILE, Log, LogBatch, Membership, Snapshot,
    SnapshotRecord, StateMachine, WAL_DIR, WalLog, WatchHub, command,
};

/// How often an unanswered ReadIndex is asked again (a leader drops reads
/// until it has committed an entry in its term; a follower's forwarded read
/// is lost with its leader).
const READ_RETRY: Duration = Duration::from_millis(200);

/// Most requests taken per turn before the loop ticks and handles a Ready,
/// so that a flood of proposals cannot starve heartbeats.
const MAX_REQUESTS_PER_TURN: usize = 4096;

type ProposeReply = oneshot::Sender<Result<Vec<(u64, Applied)>, RaftError>>;

enum Request {
    Propose {
        entries: Vec<Vec<u8>>,
        started: Instant,
        reply: ProposeReply,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<u64, RaftError>>,
    },
    Step(Box<Message>),
    /// A peer's batch (one of its Readies), stepped in one turn.
    StepBatch(Vec<Message>),
    Unreachable(u64),
    SnapshotDone {
        id: u64,
        failed: bool,
    },
    AddMember {
        address: String,
        reply: oneshot::Sender<Result<u64, RaftError>>,
    },
    RemoveMember {
        id: u64,
        reply: oneshot::Sender<Result<(), RaftError>>,
    },
    Stop,
}

struct Shared {
    id: u64,
    tx: mpsc::Sender<Request>,
    machine: RwLock<StateMachine>,
    hub: WatchHub,
    applied: watch::Receiver<u64>,
    leadership: watch::Receiver<Leadership>,
    status: Mutex<RaftStatus>,
    metrics: Mutex<RaftMetrics>,
    /// Why the loop ended, once it has.
    stopped: Mutex<Option<String>>,
    /// Turns true when this member learns that it was removed from the
    /// cluster (it applied its own removal, or a peer refused its messages
    /// as a removed member's).
    removed: watch::Sender<bool>,
}

/// A handle on a running Raft member; cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

/// The loop's thread: [`RaftThread::stop`] (or dropping it) stops the loop
/// and waits for it. The files stay; start again with [`Bootstrap::Restart`].
#[derive(Debug)]
pub struct RaftThread {
    tx: mpsc::Sender<Request>,
    handle: Option<JoinHandle<()>>,
}

impl RaftThread {
    /// Stops the loop and waits for it to finish its current turn.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let _ = self.tx.send(Request::Stop);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for RaftThread {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

impl RaftNode {
    /// Opens the data directory, recovers the state (latest snapshot, then
    /// the committed entries after it), and starts the loop.
    pub fn start(
        config: RaftConfig,
        bootstrap: Bootstrap,
        transport: Arc<dyn Transport>,
    ) -> Result<(RaftNode, RaftThread), RaftError> {
        let recovered = recover(&config, bootstrap)?;
        let (tx, rx) = mpsc::channel();
        let (applied_tx, applied_rx) = watch::channel(recovered.machine.applied_index());
        let (leader_tx, leader_rx) = watch::channel(Leadership::default());
        let status = RaftStatus {
            id: config.id,
            role: Role::Follower,
            term: recovered.hard_state.term,
            leader: None,
            commit: recovered.hard_state.commit,
            applied: recovered.machine.applied_index(),
            members: Vec::new(),
            next_id: recovered.membership.next_id,
        };
        let shared = Arc::new(Shared {
            id: config.id,
            tx: tx.clone(),
            hub: recovered.hub.clone(),
            machine: RwLock::new(StateMachine::new()),
            applied: applied_rx,
            leadership: leader_rx,
            status: Mutex::new(status),
            metrics: Mutex::new(RaftMetrics {
                proposal_latency: LatencyHistogram::new(),
                ..RaftMetrics::default()
            }),
            stopped: Mutex::new(None),
            removed: watch::Sender::new(false),
        });
        *write(&shared.machine) = recovered.machine;

        let raw_config = ::raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied: recovered.applied,
            max_size_per_msg: config.max_size_per_msg,
            max_inflight_msgs: config.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            // Proposals taken in one turn go to each follower as one
            // MsgAppend (raft-rs otherwise makes one per proposal, each
            // encoded, stepped and answered on its own), as TiKV runs it.
            batch_append: true,
            ..::raft::Config::default()
        };
        raw_config
            .validate()
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut raw = RawNode::new(&raw_config, recovered.storage, &logger)
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        // A lone voter need not wait out an election timeout.
        if recovered.membership.voters.len() == 1
            && recovered.membership.voters.contains_key(&config.id)
        {
            raw.campaign().map_err(|e| RaftError::Raft(e.to_string()))?;
        }
        let mut lp = Loop {
            request_timeout: config.request_timeout,
            snapshot_every: config.snapshot_every,
            election_timeout: config.tick * config.election_ticks as u32,
            tick: config.tick,
            raw,
            shared: shared.clone(),
            rx,
            transport,
            membership: recovered.membership,
            snapshot_index: recovered.snapshot_index,
            incarnation: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            next_key: 1,
            proposals: HashMap::new(),
            by_index: BTreeMap::new(),
            reads: HashMap::new(),
            change: None,
            last_heard: HashMap::new(),
            leadership: Leadership::default(),
            answers: Vec::new(),
            changes_done: Vec::new(),
            applied_tx,
            leader_tx,
            commit_dirty: false,
        };
        lp.publish_status();
        let handle = std::thread::Builder::new()
            .name(format!("raft-{}", config.id))
            .spawn(move || lp.run())
            .map_err(|e| RaftError::Raft(format!("spawning the raft thread: {e}")))?;
        Ok((
            RaftNode { shared },
            RaftThread {
                tx,
                handle: Some(handle),
            },
        ))
    }

    /// This member's Raft id.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    fn send(&self, request: Request) -> Result<(), RaftError> {
        self.shared.tx.send(request).map_err(|_| RaftError::Stopped)
    }

    /// Proposes `commands` on any member (a follower's go to the leader as
    /// a raft-rs `MsgProp`): each becomes one log entry, all in the same
    /// Ready when they queue together. Returns, per command, its index and
    /// its outcome or refusal, once applied here. On
    /// [`RaftError::NoQuorum`], [`RaftError::NotLeader`],
    /// [`RaftError::TimedOut`] or [`RaftError::LeaderChanged`] after
    /// proposing, the commands may still commit: treat their outcome as
    /// unknown.
    pub async fn propose(&self, commands: Vec<Command>) -> Result<Vec<(u64, Applied)>, RaftError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let mut entries = Vec::with_capacity(commands.len());
        for c in &commands {
            entries.push(command::encode(c).map_err(|source| RaftError::Encode {
                command: c.name(),
                source,
            })?);
        }
        let (reply, rx) = oneshot::channel();
        self.send(Request::Propose {
            entries,
            started,
            reply,
        })?;
        rx.await.map_err(|_| RaftError::Stopped)?
    }

    /// A linearizable read point (ReadIndex, `ReadOnlyOption::Safe`): once
    /// this member has applied the returned index (see
    /// [`RaftNode::wait_applied`]), reading its local state observes every
    /// write acknowledged before the call. Works on followers too (raft-rs
    /// forwards the request to the leader).
    pub async fn read_index(&self) -> Result<u64, RaftError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::ReadIndex { reply })?;
        rx.await.map_err(|_| RaftError::Stopped)?
    }

    /// Waits until this member has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<(), RaftError> {
        let mut rx = self.shared.applied.clone();
        rx.wait_for(|&applied| applied >= index)
            .await
            .map(|_| ())
            .map_err(|_| RaftError::Stopped)
    }

    /// The applied index.
    pub fn applied(&self) -> u64 {
        *self.shared.applied.borrow()
    }

    /// Reads the local applied state (linearizable after
    /// [`RaftNode::read_index`] and [`RaftNode::wait_applied`]; otherwise
    /// possibly stale, as a watch is).
    pub fn read<R>(&self, f: impl FnOnce(&StateMachine) -> R) -> R {
        f(&read(&self.shared.machine))
    }

    /// The hub that applied entries publish their events to.
    pub fn watch_hub(&self) -> &WatchHub {
        &self.shared.hub
    }

    /// Hands a message from a peer (protobuf-2 bytes) to the loop.
    pub fn step(&self, message_bytes: &[u8]) -> Result<(), RaftError> {
        let message = super::decode_message(message_bytes)?;
        self.step_message(message)
    }

    /// Hands a decoded message from a peer to the loop.
    pub fn step_message(&self, message: Message) -> Result<(), RaftError> {
        self.send(Request::Step(Box::new(message)))
    }

    /// Hands a peer's batch of decoded messages to the loop in one
    /// hand-off (they are stepped in order, in one turn).
    pub fn step_messages(&self, messages: Vec<Message>) -> Result<(), RaftError> {
        match messages.len() {
            0 => Ok(()),
            1 => self.step_message(messages.into_iter().next().unwrap_or_default()),
            _ => self.send(Request::StepBatch(messages)),
        }
    }

    /// Tells raft-rs that a message to `id` could not be delivered.
    pub fn report_unreachable(&self, id: u64) {
        let _ = self.send(Request::Unreachable(id));
    }

    /// Tells raft-rs how sending a snapshot to `id` ended.
    pub fn report_snapshot(&self, id: u64, failed: bool) {
        let _ = self.send(Request::SnapshotDone { id, failed });
    }

    /// Adds a voter that will serve on `address` (leader only, one change
    /// at a time). Returns its new Raft id once the change is applied here;
    /// then start it with that id and [`Bootstrap::Join`].
    pub async fn add_member(&self, address: String) -> Result<u64, RaftError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::AddMember { address, reply })?;
        rx.await.map_err(|_| RaftError::Stopped)?
    }

    /// Removes voter `id` (leader only, one change at a time).
    pub async fn remove_member(&self, id: u64) -> Result<(), RaftError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::RemoveMember { id, reply })?;
        rx.await.map_err(|_| RaftError::Stopped)?
    }

    /// This member's view of the cluster, as of the loop's last turn.
    pub fn status(&self) -> RaftStatus {
        lock(&self.shared.status).clone()
    }

    /// Leadership changes (leader id and term), for starting and stopping
    /// the leader-only loops. Closed when the loop stops.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.shared.leadership.clone()
    }

    /// Why the loop ended, once it has: `stopped` after
    /// [`RaftThread::stop`], or the fatal error (a failed fsync, an entry
    /// the state machine cannot apply). The server should exit then: every
    /// request fails with [`RaftError::Stopped`], and the leadership watch
    /// is closed.
    pub fn stopped(&self) -> Option<String> {
        lock(&self.shared.stopped).clone()
    }

    /// Whether member `id` was removed from the cluster as this member
    /// knows it (see [`RaftStatus::was_removed`]); cheap enough for every
    /// message a peer sends.
    pub fn was_removed(&self, id: u64) -> bool {
        lock(&self.shared.status).was_removed(id)
    }

    /// Turns true once this member learns it was removed from the cluster:
    /// it applied its own removal, or [`RaftNode::report_removed`]. The
    /// server then stops (etcd's removed member shuts down the same way).
    pub fn removed(&self) -> watch::Receiver<bool> {
        self.shared.removed.subscribe()
    }

    /// A peer refused this member's messages because it was removed (a
    /// member that missed its own removal entry learns it this way).
    pub fn report_removed(&self, by: u64) {
        if !self.shared.removed.send_replace(true) {
            tracing::warn!(
                id = self.shared.id,
                peer = by,
                "a peer says this controller was removed from the cluster"
            );
        }
    }

    /// Counters for metrics.
    pub fn metrics(&self) -> RaftMetrics {
        lock(&self.shared.metrics).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// Whether `dir` holds Raft state (a log with a hard state or entries), in
/// which case every [`Bootstrap`] but `ForceNewCluster` restarts from it.
pub fn has_state(dir: &std::path::Path) -> Result<bool, RaftError> {
    if !dir.join(LOG_FILE).exists() && !dir.join(WAL_DIR).exists() {
        return Ok(false);
    }
    let log = WalLog::open(dir)?;
    Ok(log.hard_state()? != HardState::default() || log.last_index()? > 0)
}

/// What start-up rebuilt from the data directory.
struct Recovered {
    storage: RaftStorage,
    machine: StateMachine,
    hub: WatchHub,
    membership: Membership,
    snapshot_index: u64,
    hard_state: HardState,
    /// The index raft-rs starts from as applied.
    applied: u64,
}

fn bootstrap_error(config: &RaftConfig, message: impl Into<String>) -> RaftError {
    RaftError::Bootstrap {
        dir: config.dir.display().to_string(),
        message: message.into(),
    }
}

fn conf_change_entry(index: u64, term: u64, cc: &ConfChange) -> Entry {
    Entry {
        index,
        term,
        data: cc.write_to_bytes().unwrap_or_default(),
        kind: EntryKind::ConfChange,
        context: Vec::new(),
    }
}

fn add_node(id: u64, address: &str) -> ConfChange {
    ConfChange {
        change_type: ConfChangeType::AddNode,
        node_id: id,
        context: address.as_bytes().to_vec().into(),
        ..ConfChange::default()
    }
}

fn remove_node(id: u64) -> ConfChange {
    ConfChange {
        change_type: ConfChangeType::RemoveNode,
        node_id: id,
        ..ConfChange::default()
    }
}

/// Applies a conf change to the replicated membership (raft-rs applies it
/// to its own configuration separately).
fn apply_membership(membership: &mut Membership, cc: &ConfChange) {
    match cc.change_type {
        ConfChangeType::AddNode => {
            let address = String::from_utf8_lossy(&cc.context).into_owned();
            membership.voters.insert(cc.node_id, address);
            membership.next_id = membership.next_id.max(cc.node_id + 1);
        }
        ConfChangeType::RemoveNode => {
            membership.voters.remove(&cc.node_id);
        }
        // Gantry proposes no learners.
        ConfChangeType::AddLearnerNode => {}
    }
}

/// Applies one stored entry during recovery: commands to the machine (a
/// refusal is history too), conf changes to the membership.
fn replay_entry(
    machine: &mut StateMachine,
    hub: &WatchHub,
    membership: &mut Membership,
    entry: &Entry,
) -> Result<(), RaftError> {
    let data: &[u8] = match entry.kind {
        EntryKind::Normal => &entry.data,
        EntryKind::ConfChange | EntryKind::ConfChangeV2 => &[],
    };
    match machine.apply_entry(entry.index, data) {
        Ok(outcome) => hub.publish(entry.index, &outcome.events),
        Err(e) if e.is_refusal() => hub.publish(entry.index, &[]),
        Err(source) => {
            return Err(RaftError::Apply {
                index: entry.index,
                source,
            });
        }
    }
    if entry.kind == EntryKind::ConfChange && !entry.data.is_empty() {
        let cc = ConfChange::parse_from_bytes(&entry.data)
            .map_err(|e| RaftError::Raft(format!("conf change at index {}: {e}", entry.index)))?;
        apply_membership(membership, &cc);
    }
    Ok(())
}

fn replay(
    log: &WalLog,
    machine: &mut StateMachine,
    hub: &WatchHub,
    membership: &mut Membership,
    upto: u64,
) -> Result<(), RaftError> {
    let mut lo = machine.applied_index() + 1;
    while lo <= upto {
        let hi = upto.saturating_add(1).min(lo.saturating_add(1024));
        for entry in log.entries(lo, hi)? {
            replay_entry(machine, hub, membership, &entry)?;
        }
        lo = hi;
    }
    Ok(())
}

fn recover(config: &RaftConfig, bootstrap: Bootstrap) -> Result<Recovered, RaftError> {
    if config.id == 0 {
        return Err(bootstrap_error(
            config,
            "raft id 0 is reserved (ids start at 1)",
        ));
    }
    std::fs::create_dir_all(&config.dir)
        .map_err(|e| bootstrap_error(config, format!("creating the directory: {e}")))?;
    let mut log = WalLog::open(&config.dir)?;
    let has_data = log.hard_state()? != HardState::default() || log.last_index()? > 0;
    match bootstrap {
        Bootstrap::Restart | Bootstrap::ForceNewCluster if !has_data => {
            return Err(bootstrap_error(
                config,
                "no raft state to restart from: start a new cluster or join one",
            ));
        }
        Bootstrap::NewCluster if !has_data => {
            // etcd's bootstrap: the first entry adds the first member, and
            // is committed by fiat (a cluster of one).
            log.write_batch(LogBatch {
                entries: vec![conf_change_entry(
                    1,
                    1,
                    &add_node(config.id, &config.address),
                )],
                hard_state: Some(HardState {
                    term: 1,
                    vote: 0,
                    commit: 1,
                }),
                ..LogBatch::default()
            })?;
        }
        _ => {}
    }

    let mut machine = StateMachine::new();
    let mut membership = Membership::default();
    let mut snapshot_index = 0;
    if let Some(record) = log.snapshot()? {
        let snapshot = Snapshot::decode(&record.data).map_err(|e| RaftError::Snapshot {
            index: record.index,
            message: e.to_string(),
        })?;
        machine.restore(snapshot);
        membership = record.membership;
        snapshot_index = record.index;
    }
    let hub = WatchHub::new(snapshot_index, config.watch_history);
    let mut hard_state = log.hard_state()?;
    let last = log.last_index()?;
    hard_state.commit = hard_state.commit.max(snapshot_index).min(last);
    replay(&log, &mut machine, &hub, &mut membership, hard_state.commit)?;

    if bootstrap == Bootstrap::ForceNewCluster {
        // Keep every entry this member holds: one at the end of its log may
        // be committed (acknowledged) without this member knowing yet, and
        // a new leader would commit it anyway. (etcd drops the uncommitted
        // tail; keeping it loses nothing acknowledged.)
        replay(&log, &mut machine, &hub, &mut membership, last)?;
        let term = hard_state.term.max(log.term(last)?);
        let mut entries = Vec::new();
        let mut index = last;
        let others: Vec<u64> = membership
            .voters
            .keys()
            .copied()
            .filter(|&id| id != config.id)
            .collect();
        for id in others {
            index += 1;
            entries.push(conf_change_entry(index, term, &remove_node(id)));
        }
        if !membership.voters.contains_key(&config.id) {
            index += 1;
            entries.push(conf_change_entry(
                index,
                term,
                &add_node(config.id, &config.address),
            ));
        }
        hard_state = HardState {
            term,
            vote: hard_state.vote,
            commit: index,
        };
        log.write_batch(LogBatch {
            entries: entries.clone(),
            hard_state: Some(hard_state),
            ..LogBatch::default()
        })?;
        for entry in &entries {
            replay_entry(&mut machine, &hub, &mut membership, entry)?;
        }
    }

    if membership.voters.is_empty() && has_data && hard_state.term == 0 {
        // Data from the single-node store (issue 3), which never wrote a
        // hard state or a configuration: it becomes a 1-member Raft cluster
        // with every entry committed, as it was.
        if bootstrap == Bootstrap::Join {
            return Err(bootstrap_error(
                config,
                "holds a single-node controller's data: a joining controller needs an empty \
                 data directory",
            ));
        }
        replay(&log, &mut machine, &hub, &mut membership, last)?;
        let term = log.term(last)?.max(1);
        let entry = conf_change_entry(last + 1, term, &add_node(config.id, &config.address));
        hard_state = HardState {
            term,
            vote: 0,
            commit: last + 1,
        };
        log.write_batch(LogBatch {
            entries: vec![entry.clone()],
            hard_state: Some(hard_state),
            ..LogBatch::default()
        })?;
        replay_entry(&mut machine, &hub, &mut membership, &entry)?;
    }

    // A member whose own data shows its removal must not run on it (etcd's
    // removed member refuses the same way); --force-new-cluster above has
    // already made it the only member again.
    if !membership.voters.is_empty()
        && !membership.voters.contains_key(&config.id)
        && config.id < membership.next_id
    {
        return Err(RaftError::Removed {
            id: config.id,
            dir: config.dir.display().to_string(),
        });
    }

    let applied = machine.applied_index();
    let conf_state: ConfState = conf_state_of(&membership);
    let mut storage = RaftStorage::new(log, conf_state)?;
    storage.set_commit_floor(hard_state.commit);
    Ok(Recovered {
        storage,
        machine,
        hub,
        membership,
        snapshot_index,
        hard_state,
        applied,
    })
}

/// The routing key in an entry's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Route {
    node: u64,
    incarnation: u64,
    key: u64,
    slot: u64,
}

impl Route {
    fn encode(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32);
        for x in [self.node, self.incarnation, self.key, self.slot] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    fn decode(bytes: &[u8]) -> Option<Route> {
        if bytes.len() != 32 {
            return None;
        }
        let word = |i: usize| {
            let mut b = [0; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        Some(Route {
            node: word(0),
            incarnation: word(1),
            key: word(2),
            slot: word(3),
        })
    }
}

struct Proposal {
    started: Instant,
    deadline: Instant,
    results: Vec<Option<(u64, Applied)>>,
    remaining: usize,
    /// The leader a follower's proposal was handed to; None when proposed
    /// as leader.
    handed_to: Option<u64>,
    reply: ProposeReply,
}

struct PendingRead {
    ctx: Vec<u8>,
    deadline: Instant,
    issued: Option<Instant>,
    reply: oneshot::Sender<Result<u64, RaftError>>,
}

enum ChangeReply {
    Add(u64, oneshot::Sender<Result<u64, RaftError>>),
    Remove(oneshot::Sender<Result<(), RaftError>>),
}

struct PendingChange {
    key: u64,
    description: String,
    deadline: Instant,
    reply: ChangeReply,
}

impl PendingChange {
    fn finish(self, result: Result<(), RaftError>) {
        match self.reply {
            ChangeReply::Add(id, reply) => {
                let _ = reply.send(result.map(|()| id));
            }
            ChangeReply::Remove(reply) => {
                let _ = reply.send(result);
            }
        }
    }
}

struct Loop {
    request_timeout: Duration,
    snapshot_every: u64,
    election_timeout: Duration,
    tick: Duration,
    raw: RawNode<RaftStorage>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Request>,
    transport: Arc<dyn Transport>,
    membership: Membership,
    snapshot_index: u64,
    incarnation: u64,
    next_key: u64,
    proposals: HashMap<u64, Proposal>,
    /// Entry index → (proposal key, slot), for this member's proposals not
    /// yet applied: another entry applied there means ours was overwritten.
    by_index: BTreeMap<u64, (u64, u64)>,
    reads: HashMap<u64, PendingRead>,
    change: Option<PendingChange>,
    last_heard: HashMap<u64, Instant>,
    leadership: Leadership,
    /// Answers for proposals applied in the current batch, sent once the
    /// applied index is published (so that a proposer that got its answer
    /// finds `applied()` at least at its index).
    answers: Vec<(ProposeReply, Vec<(u64, Applied)>)>,
    changes_done: Vec<PendingChange>,
    applied_tx: watch::Sender<u64>,
    leader_tx: watch::Sender<Leadership>,
    /// The light ready advanced the commit index past the stored one; the
    /// next write carries it.
    commit_dirty: bool,
}

impl Loop {
    fn run(mut self) {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let mut stop = false;
            match self.rx.recv_timeout(wait) {
                Ok(request) => stop |= self.handle(request),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => stop = true,
            }
            let mut taken = 1;
            while !stop && taken < MAX_REQUESTS_PER_TURN {
                match self.rx.try_recv() {
                    Ok(request) => stop |= self.handle(request),
                    Err(_) => break,
                }
                taken += 1;
            }
            if stop {
                break;
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick += self.tick;
                if next_tick < now {
                    next_tick = now + self.tick;
                }
                self.expire(now);
            }
            self.issue_reads();
            // A snapshot raft-rs asked for (see `RaftStorage::snapshot`)
            // may come without a Ready. Reads that this Ready made
            // servable (a new leader's first commit) go out at once.
            let turn = self
                .on_ready()
                .and_then(|()| self.maybe_snapshot())
                .and_then(|()| match self.issue_reads() {
                    true => self.on_ready(),
                    false => Ok(()),
                });
            if let Err(e) = turn {
                tracing::error!(id = self.shared.id, error = %e, "raft loop stopped");
                *lock(&self.shared.stopped) = Some(e.to_string());
                break;
            }
            self.publish_status();
        }
        self.shutdown();
    }

    /// Handles one request; true to stop.
    fn handle(&mut self, request: Request) -> bool {
        match request {
            Request::Propose {
                entries,
                started,
                reply,
            } => self.propose(entries, started, reply),
            Request::ReadIndex { reply } => {
                if self.raw.raft.leader_id == 0 {
                    let _ = reply.send(Err(self.no_quorum()));
                } else {
                    let key = self.next_key();
                    self.reads.insert(
                        key,
                        PendingRead {
                            // Unique in the cluster, not only here: the
                            // leader keeps one pending read per context and
                            // drops a second with the same one, so a bare
                            // key (every member counts from 1) made reads
                            // from two members collide and one wait for
                            // READ_RETRY.
                            ctx: self.route(key, 0),
                            deadline: Instant::now() + self.request_timeout,
                            issued: None,
                            reply,
                        },
                    );
                }
            }
            Request::Step(message) => self.step(*message),
            Request::StepBatch(messages) => {
                for message in messages {
                    self.step(message);
                }
            }
            Request::Unreachable(id) => self.raw.report_unreachable(id),
            Request::SnapshotDone { id, failed } => self.raw.report_snapshot(
                id,
                if failed {
                    SnapshotStatus::Failure
                } else {
                    SnapshotStatus::Finish
                },
            ),
            Request::AddMember { address, reply } => self.add_member(address, reply),
            Request::RemoveMember { id, reply } => self.remove_member(id, reply),
            Request::Stop => return true,
        }
        false
    }

    fn step(&mut self, message: Message) {
        if message.from != 0 {
            self.last_heard.insert(message.from, Instant::now());
        }
        // Stale or misaddressed messages are refused by raft-rs; nothing to
        // do about them here.
        let _ = self.raw.step(message);
    }

    fn next_key(&mut self) -> u64 {
        self.next_key += 1;
        self.next_key
    }

    fn route(&self, key: u64, slot: u64) -> Vec<u8> {
        Route {
            node: self.shared.id,
            incarnation: self.incarnation,
            key,
            slot,
        }
        .encode()
    }

    fn reachable(&self) -> usize {
        let now = Instant::now();
        let id = self.shared.id;
        let mut n = usize::from(self.membership.voters.contains_key(&id));
        for voter in self.membership.voters.keys().filter(|&&v| v != id) {
            if self
                .last_heard
                .get(voter)
                .is_some_and(|t| now.duration_since(*t) < self.election_timeout)
            {
                n += 1;
            }
        }
        n.max(1)
    }

    /// Why a request ran past its deadline: no quorum when a majority is
    /// not reachable, otherwise a plain timeout (an overloaded cluster
    /// still has its quorum, and saying otherwise sends operators hunting
    /// for a partition that is not there).
    fn expired(&self) -> RaftError {
        let reachable = self.reachable();
        let members = self.membership.voters.len().max(1);
        if reachable > members / 2 {
            RaftError::TimedOut {
                after: self.request_timeout,
                reachable,
                members,
            }
        } else {
            RaftError::NoQuorum { reachable, members }
        }
    }

    fn no_quorum(&self) -> RaftError {
        RaftError::NoQuorum {
            reachable: self.reachable(),
            members: self.membership.voters.len().max(1),
        }
    }

    fn not_leader(&self) -> RaftError {
        let leader = self.raw.raft.leader_id;
        if leader == 0 || leader == self.shared.id {
            return RaftError::NotLeader { leader: None };
        }
        RaftError::NotLeader {
            leader: Some((
                leader,
                self.membership
                    .voters
                    .get(&leader)
                    .cloned()
                    .unwrap_or_default(),
            )),
        }
    }

    /// Ok when this member leads and can reach a quorum.
    fn check_leader(&self) -> Result<(), RaftError> {
        if self.raw.raft.state != StateRole::Leader {
            if self.raw.raft.leader_id == 0 {
                return Err(self.no_quorum());
            }
            return Err(self.not_leader());
        }
        // A leader cut off from its quorum steps down after an election
        // timeout (check_quorum); its requests wait until then or until
        // the request timeout, whichever comes first.
        Ok(())
    }

    fn propose(&mut self, entries: Vec<Vec<u8>>, started: Instant, reply: ProposeReply) {
        // A follower proposes too: raft-rs hands the entries to the leader
        // in a `MsgProp`, which the transport batches with the rest of the
        // traffic to it; the proposal is answered when the entry, carrying
        // our route, is applied here. Without a leader there is nobody to
        // hand it to.
        let leader = self.raw.raft.state == StateRole::Leader;
        if !leader && self.raw.raft.leader_id == 0 {
            lock(&self.shared.metrics).proposals_failed += 1;
            let _ = reply.send(Err(self.no_quorum()));
            return;
        }
        let key = self.next_key();
        let n = entries.len();
        for (slot, data) in entries.into_iter().enumerate() {
            let ctx = self.route(key, slot as u64);
            if let Err(e) = self.raw.propose(ctx, data) {
                self.by_index.retain(|_, (k, _)| *k != key);
                lock(&self.shared.metrics).proposals_failed += 1;
                let err = match e {
                    ::raft::Error::ProposalDropped => self.not_leader(),
                    other => RaftError::Raft(other.to_string()),
                };
                let _ = reply.send(Err(err));
                return;
            }
            // Only a leader knows where its entry landed (to notice it
            // being overwritten by the next leader).
            if leader {
                let index = self.raw.raft.raft_log.last_index();
                self.by_index.insert(index, (key, slot as u64));
            }
        }
        self.proposals.insert(
            key,
            Proposal {
                started,
                deadline: Instant::now() + self.request_timeout,
                results: (0..n).map(|_| None).collect(),
                remaining: n,
                handed_to: (!leader).then_some(self.raw.raft.leader_id),
                reply,
            },
        );
    }

    fn pending_change(&self) -> Option<String> {
        if let Some(change) = &self.change {
            return Some(change.description.clone());
        }
        if self.raw.raft.has_pending_conf() {
            return Some(format!(
                "the membership change at log index {}",
                self.raw.raft.pending_conf_index
            ));
        }
        None
    }

    fn add_member(&mut self, address: String, reply: oneshot::Sender<Result<u64, RaftError>>) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        if let Some(pending) = self.pending_change() {
            let _ = reply.send(Err(RaftError::ChangePending { pending }));
            return;
        }
        if address.is_empty() {
            let _ = reply.send(Err(RaftError::BadChange(
                "a new controller needs an address".to_string(),
            )));
            return;
        }
        if let Some((id, _)) = self.membership.voters.iter().find(|(_, a)| **a == address) {
            let _ = reply.send(Err(RaftError::BadChange(format!(
                "address {address} already belongs to controller {id}"
            ))));
            return;
        }
        let id = self
            .membership
            .next_id
            .max(self.membership.voters.keys().max().map_or(1, |m| m + 1));
        let description = format!("adding controller {id} at {address}");
        self.propose_change(
            add_node(id, &address),
            description,
            ChangeReply::Add(id, reply),
        );
    }

    fn remove_member(&mut self, id: u64, reply: oneshot::Sender<Result<(), RaftError>>) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        if let Some(pending) = self.pending_change() {
            let _ = reply.send(Err(RaftError::ChangePending { pending }));
            return;
        }
        let Some(address) = self.membership.voters.get(&id).cloned() else {
            let _ = reply.send(Err(RaftError::BadChange(format!(
                "controller {id} is not a member"
            ))));
            return;
        };
        if self.membership.voters.len() == 1 {
            let _ = reply.send(Err(RaftError::BadChange(format!(
                "controller {id} is the last member"
            ))));
            return;
        }
        if id == self.shared.id {
            // raft-rs keeps a leader that removed itself leading (its
            // followers keep hearing heartbeats and never elect); etcd and
            // swarmkit move leadership first. Pick the follower furthest
            // along and hand over.
            let target = self
                .raw
                .raft
                .prs()
                .iter()
                .filter(|(peer, p)| **peer != id && p.recent_active)
                .max_by_key(|(_, p)| p.matched)
                .map(|(peer, _)| *peer);
            let Some(target) = target else {
                let _ = reply.send(Err(self.no_quorum()));
                return;
            };
            self.raw.transfer_leader(target);
            let to_address = self
                .membership
                .voters
                .get(&target)
                .cloned()
                .unwrap_or_default();
            let _ = reply.send(Err(RaftError::LeadershipMoving {
                id,
                to: (target, to_address),
            }));
            return;
        }
        let description = format!("removing controller {id} at {address}");
        self.propose_change(remove_node(id), description, ChangeReply::Remove(reply));
    }

    fn propose_change(&mut self, cc: ConfChange, description: String, reply: ChangeReply) {
        let key = self.next_key();
        let ctx = self.route(key, 0);
        let change = PendingChange {
            key,
            description,
            deadline: Instant::now() + self.request_timeout,
            reply,
        };
        match self.raw.propose_conf_change(ctx, cc) {
            Ok(()) => self.change = Some(change),
            Err(e) => {
                let err = match e {
                    ::raft::Error::ProposalDropped => self.not_leader(),
                    other => RaftError::Raft(other.to_string()),
                };
                change.finish(Err(err));
            }
        }
    }

    /// Fails what waited too long, and asks again for unanswered reads.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            let err = self.expired();
            self.fail_proposal(key, err);
        }
        let expired: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(read) = self.reads.remove(&key) {
                let _ = read.reply.send(Err(self.expired()));
            }
        }
        if self.change.as_ref().is_some_and(|c| c.deadline <= now) {
            let err = self.expired();
            if let Some(change) = self.change.take() {
                change.finish(Err(err));
            }
        }
    }

    fn fail_proposal(&mut self, key: u64, err: RaftError) {
        if let Some(p) = self.proposals.remove(&key) {
            lock(&self.shared.metrics).proposals_failed += 1;
            let _ = p.reply.send(Err(err));
        }
    }

    /// Issues reads not yet issued, or unanswered for [`READ_RETRY`], when
    /// they can be served: a leader must have committed an entry in its
    /// term (raft-rs drops the read otherwise); a follower needs a leader.
    fn issue_reads(&mut self) -> bool {
        if self.reads.is_empty() {
            return false;
        }
        let can = if self.raw.raft.state == StateRole::Leader {
            self.raw.raft.commit_to_current_term()
        } else {
            self.raw.raft.leader_id != 0
        };
        if !can {
            return false;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        let mut retried = 0;
        for read in self.reads.values_mut() {
            if read
                .issued
                .is_none_or(|t| now.duration_since(t) >= READ_RETRY)
            {
                retried += u64::from(read.issued.is_some());
                read.issued = Some(now);
                due.push(read.ctx.clone());
            }
        }
        let issued = !due.is_empty();
        if retried > 0 {
            lock(&self.shared.metrics).reads_retried += retried;
        }
        for ctx in due {
            self.raw.read_index(ctx);
        }
        issued
    }

    fn on_ready(&mut self) -> Result<(), RaftError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }

        // A snapshot from the leader (raft-rs puts no committed entries in a
        // Ready that has one).
        let snapshot = if ready.snapshot().is_empty() {
            None
        } else {
            let snap = ready.snapshot();
            let meta = snap.get_metadata();
            let (membership, data) =
                decode_snapshot_data(&snap.data).map_err(|message| RaftError::Snapshot {
                    index: meta.index,
                    message,
                })?;
            Some(SnapshotRecord {
                index: meta.index,
                term: meta.term,
                data,
                membership,
            })
        };

        // Committed entries are already durable here (raft-rs hands out
        // only entries up to the persisted index), so a leader applies and
        // answers them before this Ready's fsync, as raft-rs's example
        // does: its answers do not wait for the next batch's fsync. So does
        // a follower with proposals of its own waiting. One without applies
        // them after its fsync and acknowledgement instead: its ack is on
        // every write's path (the leader commits on it), and nobody here
        // waits for the applying (etcd's followers apply after sending
        // too). Acking first under load measured fewer writes/s at 256
        // clients (smaller batches, more CPU per write).
        self.answer_reads(ready.take_read_states());
        let committed = ready.take_committed_entries();
        let after_ack = if self.raw.raft.state == StateRole::Leader || !self.proposals.is_empty() {
            self.apply(committed)?;
            Vec::new()
        } else {
            committed
        };

        // Snapshot, entries and hard state: one durable write (one WAL record
        // and `fdatasync` without a snapshot). A
        // change of the commit index alone is not worth an fsync (raft-rs's
        // `must_sync` is false then: the commit index is recovered from the
        // leader); it rides along with the next write.
        let entries = ready.take_entries();
        let hs_changed = ready.hs().is_some() || self.commit_dirty;
        if snapshot.is_some() || !entries.is_empty() || ready.must_sync() {
            let hard_state = hs_changed.then(|| hard_state_from_raft(&self.raw.raft.hard_state()));
            let started = Instant::now();
            self.raw
                .mut_store()
                .persist_ready(snapshot.clone(), entries, hard_state)?;
            let mut metrics = lock(&self.shared.metrics);
            metrics.log_writes += 1;
            metrics.log_write_seconds += started.elapsed().as_secs_f64();
            self.commit_dirty = false;
        } else if hs_changed {
            self.commit_dirty = true;
        }
        if let Some(record) = snapshot {
            self.install(record)?;
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        self.apply(after_ack)?;

        let mut light = self.raw.advance(ready);
        if light.commit_index().is_some() {
            self.commit_dirty = true;
        }
        if !light.messages().is_empty() {
            self.transport.send(light.take_messages());
        }
        let committed = light.take_committed_entries();
        self.apply(committed)?;
        self.raw.advance_apply();
        self.maybe_snapshot()?;
        self.check_leadership();
        Ok(())
    }

    fn answer_reads(&mut self, states: Vec<::raft::ReadState>) {
        for state in states {
            let Some(key) = Route::decode(&state.request_ctx)
                .filter(|r| r.node == self.shared.id && r.incarnation == self.incarnation)
                .map(|r| r.key)
            else {
                continue;
            };
            if let Some(read) = self.reads.remove(&key) {
                let _ = read.reply.send(Ok(state.index));
            }
        }
    }

    /// Replaces the state with a snapshot from the leader.
    fn install(&mut self, record: SnapshotRecord) -> Result<(), RaftError> {
        let snapshot = Snapshot::decode(&record.data).map_err(|e| RaftError::Snapshot {
            index: record.index,
            message: e.to_string(),
        })?;
        {
            let mut machine = write(&self.shared.machine);
            machine.restore(snapshot);
            // As the store's restore does: watchers resync from the new
            // state instead of missing the events in between.
            self.shared.hub.reset(record.index);
        }
        self.raw
            .mut_store()
            .set_conf_state(conf_state_of(&record.membership));
        self.membership = record.membership;
        self.snapshot_index = record.index;
        // Entries up to the snapshot are not ours to answer any more.
        let stale: Vec<(u64, u64)> = self
            .by_index
            .range(..=record.index)
            .map(|(_, v)| *v)
            .collect();
        self.by_index.retain(|&i, _| i > record.index);
        for (key, _) in stale {
            let err = self.not_leader();
            self.fail_proposal(key, err);
        }
        lock(&self.shared.metrics).snapshots += 1;
        self.applied_tx.send_replace(record.index);
        Ok(())
    }

    fn apply(&mut self, entries: Vec<RaftEntry>) -> Result<(), RaftError> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let mut machine = write(&shared.machine);
        for e in entries {
            let index = e.index;
            let route = Route::decode(&e.context)
                .filter(|r| r.node == shared.id && r.incarnation == self.incarnation);
            if let Some((key, slot)) = self.by_index.remove(&index)
                && route.is_none_or(|r| (r.key, r.slot) != (key, slot))
            {
                // Our entry at this index was overwritten by a new leader.
                let err = self.not_leader();
                self.fail_proposal(key, err);
            }
            match e.entry_type {
                EntryType::EntryNormal => {
                    let applied: Applied = match machine.apply_entry(index, &e.data) {
                        Ok(outcome) => {
                            shared.hub.append(index, &outcome.events);
                            Ok(outcome)
                        }
                        Err(err) if err.is_refusal() => {
                            shared.hub.append(index, &[]);
                            Err(err)
                        }
                        Err(source) => return Err(RaftError::Apply { index, source }),
                    };
                    if let Some(r) = route {
                        self.resolve(r.key, r.slot, index, applied);
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    machine
                        .apply_entry(index, &[])
                        .map_err(|source| RaftError::Apply { index, source })?;
                    shared.hub.append(index, &[]);
                    if e.data.is_empty() {
                        continue;
                    }
                    let cs = if e.entry_type == EntryType::EntryConfChange {
                        let cc = ConfChange::parse_from_bytes(&e.data).map_err(|err| {
                            RaftError::Raft(format!("conf change at index {index}: {err}"))
                        })?;
                        apply_membership(&mut self.membership, &cc);
                        if cc.change_type == ConfChangeType::RemoveNode && cc.node_id == shared.id {
                            tracing::warn!(
                                id = shared.id,
                                index,
                                "this controller's removal from the cluster was applied"
                            );
                            shared.removed.send_replace(true);
                        }
                        self.raw.apply_conf_change(&cc)
                    } else {
                        let cc = ::raft::eraftpb::ConfChangeV2::parse_from_bytes(&e.data).map_err(
                            |err| RaftError::Raft(format!("conf change at index {index}: {err}")),
                        )?;
                        self.raw.apply_conf_change(&cc)
                    }
                    .map_err(|err| {
                        RaftError::Raft(format!("conf change at index {index}: {err}"))
                    })?;
                    self.raw.mut_store().set_conf_state(cs);
                    if let Some(r) = route
                        && self.change.as_ref().is_some_and(|c| c.key == r.key)
                        && let Some(change) = self.change.take()
                    {
                        self.changes_done.push(change);
                    }
                }
            }
        }
        drop(machine);
        // Watchers wake once per applied batch, not once per entry.
        shared.hub.notify();
        self.applied_tx.send_replace(last);
        for (reply, results) in self.answers.drain(..) {
            let _ = reply.send(Ok(results));
        }
        for change in self.changes_done.drain(..) {
            change.finish(Ok(()));
        }
        Ok(())
    }

    fn resolve(&mut self, key: u64, slot: u64, index: u64, applied: Applied) {
        let Some(p) = self.proposals.get_mut(&key) else {
            return;
        };
        let Some(cell) = p.results.get_mut(slot as usize) else {
            return;
        };
        if cell.is_none() {
            p.remaining -= 1;
        }
        *cell = Some((index, applied));
        if p.remaining > 0 {
            return;
        }
        if let Some(p) = self.proposals.remove(&key) {
            let mut metrics = lock(&self.shared.metrics);
            metrics.proposals_committed += p.results.len() as u64;
            metrics.proposal_latency.observe(p.started.elapsed());
            drop(metrics);
            let results = p.results.into_iter().flatten().collect();
            self.answers.push((p.reply, results));
        }
    }

    /// Snapshots and compacts when `snapshot_every` entries were applied
    /// since the last snapshot; snapshot, hard state and compaction go in
    /// one transaction.
    fn maybe_snapshot(&mut self) -> Result<(), RaftError> {
        let every = self.snapshot_every;
        // A follower needs a snapshot the stored one cannot serve (it is
        // older than asked, or from before the follower was added).
        let wanted = self.raw.store().take_snapshot_wanted();
        let (index, data) = {
            let machine = read(&self.shared.machine);
            let index = machine.applied_index();
            let due = every != 0 && index >= self.snapshot_index + every;
            if !(due || wanted && index > self.snapshot_index) {
                return Ok(());
            }
            let data = machine
                .snapshot()
                .encode()
                .map_err(|e| RaftError::Snapshot {
                    index,
                    message: e.to_string(),
                })?;
            (index, data)
        };
        let term = self
            .raw
            .raft
            .raft_log
            .term(index)
            .map_err(|e| RaftError::Raft(format!("term of index {index}: {e}")))?;
        let mut hs = hard_state_from_raft(&self.raw.raft.hard_state());
        hs.commit = hs.commit.max(index);
        self.raw.mut_store().persist(LogBatch {
            snapshot: Some(SnapshotRecord {
                index,
                term,
                data,
                membership: self.membership.clone(),
            }),
            hard_state: Some(hs),
            compact_to: Some(index),
            ..LogBatch::default()
        })?;
        self.commit_dirty = false;
        self.snapshot_index = index;
        lock(&self.shared.metrics).snapshots += 1;
        Ok(())
    }

    fn check_leadership(&mut self) {
        let leader = self.raw.raft.leader_id;
        let now = Leadership {
            leader: (leader != 0).then_some(leader),
            term: self.raw.raft.term,
        };
        if now == self.leadership {
            return;
        }
        let id = self.shared.id;
        if now.leader.is_some() && now.leader != self.leadership.leader {
            lock(&self.shared.metrics).leader_changes += 1;
        }
        let was_leader = self.leadership.leader == Some(id);
        if now.leader != self.leadership.leader {
            // Proposals handed to a leader that is gone may still commit
            // under the next one, or may be lost with it: their outcome is
            // unknown, and waiting out the request timeout would not tell.
            let stale: Vec<(u64, u64)> = self
                .proposals
                .iter()
                .filter_map(|(k, p)| p.handed_to.map(|l| (*k, l)))
                .filter(|&(_, l)| Some(l) != now.leader)
                .collect();
            for (key, leader) in stale {
                self.fail_proposal(key, RaftError::LeaderChanged { leader });
            }
        }
        self.leadership = now;
        self.leader_tx.send_replace(now);
        if was_leader && self.raw.raft.state != StateRole::Leader {
            // Proposals made as leader may still commit under the next
            // leader: their outcome is unknown, and the client retries there.
            let keys: Vec<u64> = self.proposals.keys().copied().collect();
            for key in keys {
                let err = self.not_leader();
                self.fail_proposal(key, err);
            }
            self.by_index.clear();
            if let Some(change) = self.change.take() {
                change.finish(Err(self.not_leader()));
            }
        }
    }

    fn publish_status(&mut self) {
        let raft = &self.raw.raft;
        let role = match raft.state {
            StateRole::Leader => Role::Leader,
            StateRole::Follower => Role::Follower,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
        };
        let now = Instant::now();
        let id = self.shared.id;
        let members = self
            .membership
            .voters
            .iter()
            .map(|(&member, address)| {
                let progress = (role == Role::Leader)
                    .then(|| raft.prs().get(member))
                    .flatten();
                MemberStatus {
                    id: member,
                    address: address.clone(),
                    match_index: progress.map_or(0, |p| p.matched),
                    recent_active: member == id
                        || self
                            .last_heard
                            .get(&member)
                            .is_some_and(|t| now.duration_since(*t) < self.election_timeout),
                }
            })
            .collect();
        let applied = *self.applied_tx.borrow();
        let status = RaftStatus {
            id,
            role,
            term: raft.term,
            leader: (raft.leader_id != 0).then_some(raft.leader_id),
            commit: raft.raft_log.committed,
            applied,
            members,
            next_id: self.membership.next_id,
        };
        let mut metrics = lock(&self.shared.metrics);
        metrics.term = status.term;
        metrics.commit = status.commit;
        metrics.applied = applied;
        drop(metrics);
        *lock(&self.shared.status) = status;
    }

    fn shutdown(mut self) {
        // Keep the latest commit index so that a restart replays less.
        if self.commit_dirty {
            let hs = hard_state_from_raft(&self.raw.raft.hard_state());
            let _ = self.raw.mut_store().persist(LogBatch {
                hard_state: Some(hs),
                ..LogBatch::default()
            });
        }
        let keys: Vec<u64> = self.proposals.keys().copied().collect();
        for key in keys {
            self.fail_proposal(key, RaftError::Stopped);
        }
        for (_, read) in self.reads.drain() {
            let _ = read.reply.send(Err(RaftError::Stopped));
        }
        if let Some(change) = self.change.take() {
            change.finish(Err(RaftError::Stopped));
        }
        self.shared.hub.close();
        lock(&self.shared.stopped).get_or_insert_with(|| "stopped".to_string());
    }
}
