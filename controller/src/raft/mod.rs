//! Raft replication of the controller's store (raft-rs, one loop per
//! controller on its own thread).
//!
//! Raft replaces only the single-node `Store` driver: the same encoded
//! [`Command`](crate::store::Command)s go into the same durable
//! [`RedbLog`](crate::store::RedbLog), committed entries are applied to the
//! same [`StateMachine`](crate::store::StateMachine) with `apply_entry`, and
//! their events are published to the same [`WatchHub`](crate::store::WatchHub).
//!
//! - [`storage`]: raft-rs's `Storage` over the `RedbLog`, with the hard
//!   state, the conf state and the member address book;
//! - [`node`]: the [`RaftNode`] handle and the loop behind it (tick, step,
//!   propose, Ready in raft-rs's documented order, apply, snapshot).
//!
//! The server owns the transport ([`Transport`], gRPC `Raft.Step` carrying
//! protobuf-2-encoded `eraftpb::Message` bytes) and hands incoming messages
//! to [`RaftNode::step`].
//!
//! Invariants: everything one Ready asks to persist (snapshot, entries, hard
//! state) is written in one fsynced redb transaction before the messages
//! that depend on it are sent; state is only rebuilt from the log (latest
//! snapshot, then the committed entries after it), membership included.

pub mod node;
pub mod storage;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

pub use node::{RaftNode, RaftThread, has_state};
pub use raft::eraftpb::Message;
pub use storage::RaftStorage;

use crate::store::{ApplyError, CommandError, LogError, SnapshotError};

/// A controller's Raft settings.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    /// This member's Raft id (the first member is 1; the leader hands out
    /// the others, see [`RaftNode::add_member`]).
    pub id: u64,
    /// The address peers reach this member's `Raft` service on; goes into
    /// the replicated address book when the cluster is created.
    pub address: String,
    /// The data directory (the log file lives in it).
    pub dir: PathBuf,
    /// One Raft tick. 50 ms: with `election_ticks` 10 an election starts
    /// 0.5–1 s (randomized) after the leader goes silent, under etcd's
    /// default 1 s, so writes resume within the 1.5 s.
    pub tick: Duration,
    /// Ticks without a leader before a member campaigns (raft-rs randomizes
    /// in `[election_ticks, 2 * election_ticks)`).
    pub election_ticks: usize,
    /// Ticks between the leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Take a snapshot and compact the log after this many applied entries
    /// (swarmkit's default, 10 000); 0 never snapshots.
    pub snapshot_every: u64,
    /// How many events watches can replay from.
    pub watch_history: usize,
    /// How long a proposal, read or membership change may wait to commit
    /// before it fails with [`RaftError::NoQuorum`].
    pub request_timeout: Duration,
    /// Entries per append message (raft-rs `max_size_per_msg` is in bytes;
    /// this bounds the bytes: 1 MiB).
    pub max_size_per_msg: u64,
    /// Append messages in flight per follower.
    pub max_inflight_msgs: usize,
}

impl RaftConfig {
    /// The defaults for member `id` serving on `address` with data in `dir`.
    pub fn new(id: u64, address: impl Into<String>, dir: impl Into<PathBuf>) -> RaftConfig {
        RaftConfig {
            id,
            address: address.into(),
            dir: dir.into(),
            tick: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: 10_000,
            watch_history: 10_000,
            request_timeout: Duration::from_secs(2),
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
        }
    }
}

/// How a member starts.
///
/// When the data directory already holds Raft state, `NewCluster` and
/// `Join` behave as `Restart` (etcd ignores `--initial-cluster` the same
/// way once its data dir exists), so restarting a controller with the flags
/// it was first started with is safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// A new 1-member cluster with this member as its only voter.
    NewCluster,
    /// A member that the leader already added (with [`RaftNode::add_member`]):
    /// starts with an empty log and no configuration and waits for the
    /// leader's snapshot or entries.
    Join,
    /// Restart from the data directory, which must hold Raft state.
    Restart,
    /// Disaster recovery (etcd's `--force-new-cluster`): restart from this
    /// member's data with the configuration rewritten to this member alone,
    /// keeping every entry it holds.
    ForceNewCluster,
}

/// Errors from the Raft node.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// Only the leader takes membership changes (and a proposal made as
    /// leader fails this way when it loses leadership before applying).
    #[error("not the leader{}", match .leader {
        Some((id, address)) => format!(": the leader is controller {id} at {address}"),
        None => String::new(),
    })]
    NotLeader {
        /// The leader's id and address, when known.
        leader: Option<(u64, String)>,
    },
    /// The request could not be committed in time, or this member knows it
    /// has no leader. A proposal that fails this way may still commit
    /// later: its outcome is unknown.
    #[error("no quorum: {reachable} of {members} controllers reachable")]
    NoQuorum {
        /// Members (this one included) heard from within an election
        /// timeout.
        reachable: usize,
        /// Voters in the configuration.
        members: usize,
    },
    /// A majority is reachable but the request did not commit (or the read
    /// was not confirmed) within the request timeout: the cluster is
    /// overloaded or a peer is slow. A proposal that fails this way may
    /// still commit later: its outcome is unknown.
    #[error(
        "timed out after {after:?} waiting for the request to commit ({reachable} of {members} controllers reachable); its outcome is unknown"
    )]
    TimedOut {
        /// The request timeout.
        after: std::time::Duration,
        /// Members (this one included) heard from within an election
        /// timeout.
        reachable: usize,
        /// Voters in the configuration.
        members: usize,
    },
    /// A follower handed the proposal to a leader that lost its leadership
    /// (or stopped being heard of) before the entry was applied here: the
    /// entry may still commit under the next leader, so its outcome is
    /// unknown.
    #[error(
        "the leader (controller {leader}) changed while the request was in flight; its outcome is unknown"
    )]
    LeaderChanged {
        /// The leader the proposal was handed to.
        leader: u64,
    },
    /// The node's loop has stopped (shut down, or a fatal storage error).
    #[error("raft node stopped")]
    Stopped,
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A command could not be encoded; nothing was proposed.
    #[error("command {command} could not be encoded: {source}")]
    Encode {
        /// The command's name.
        command: &'static str,
        /// What failed.
        #[source]
        source: CommandError,
    },
    /// The state machine could not apply a committed entry (not a refusal:
    /// bytes it cannot decode, or an index out of order). The node stops.
    #[error("applying log index {index} failed: {source}")]
    Apply {
        /// The entry's index.
        index: u64,
        /// What failed.
        #[source]
        source: ApplyError,
    },
    /// A stored or received snapshot could not be decoded.
    #[error("snapshot at index {index}: {message}")]
    Snapshot {
        /// The snapshot's index.
        index: u64,
        /// What is wrong.
        message: String,
    },
    /// A membership change was asked for while another is not yet applied
    /// (changes go one at a time).
    #[error("membership change refused: {pending} is still pending")]
    ChangePending {
        /// The pending change, e.g. `adding controller 3 at 10.0.0.3:4701`.
        pending: String,
    },
    /// The leader was asked to remove itself: it hands leadership to the
    /// most up-to-date member first (raft-rs would keep a removed leader
    /// leading). Retry the removal on the new leader.
    #[error(
        "controller {id} is the leader: leadership is moving to controller {} at {}; retry the removal there",
        .to.0, .to.1
    )]
    LeadershipMoving {
        /// The leader being removed (this member).
        id: u64,
        /// The member taking over: id and address.
        to: (u64, String),
    },
    /// The membership change makes no sense (unknown id, address already a
    /// member, removing the last member).
    #[error("membership change refused: {0}")]
    BadChange(String),
    /// A message from a peer could not be decoded.
    #[error("raft message of {len} bytes could not be decoded: {message}")]
    BadMessage {
        /// Its length.
        len: usize,
        /// The decoder's complaint.
        message: String,
    },
    /// The data directory does not fit the requested bootstrap.
    #[error("raft data in {dir}: {message}")]
    Bootstrap {
        /// The data directory.
        dir: String,
        /// What does not fit.
        message: String,
    },
    /// raft-rs refused an operation.
    #[error("raft: {0}")]
    Raft(String),
    /// This member was removed from the cluster (its own data shows the
    /// removal applied): its data is stale and it must not run on it.
    #[error(
        "this controller was removed from the cluster (id {id}); its data in {dir} is stale \
         (remove it and start with --join to add this controller again, or start with \
         --force-new-cluster to make a new cluster from it)"
    )]
    Removed {
        /// Its raft id.
        id: u64,
        /// The data directory.
        dir: String,
    },
}

impl From<SnapshotError> for RaftError {
    fn from(e: SnapshotError) -> RaftError {
        RaftError::Snapshot {
            index: 0,
            message: e.to_string(),
        }
    }
}

/// A member's Raft role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Takes proposals and replicates them.
    Leader,
    /// Follows a leader (or waits for one).
    Follower,
    /// Campaigning.
    Candidate,
    /// Asking whether it could win before campaigning (pre-vote).
    PreCandidate,
}

impl Role {
    /// The lowercase name `gantry cluster controllers` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::PreCandidate => "pre-candidate",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who leads, and in which term.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leadership {
    /// The leader's id, when one is known.
    pub leader: Option<u64>,
    /// The current term.
    pub term: u64,
}

/// One member as this member sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its Raft id.
    pub id: u64,
    /// Its address from the replicated address book.
    pub address: String,
    /// The highest index known replicated to it (leader only; 0 elsewhere).
    pub match_index: u64,
    /// Whether it was heard from within an election timeout (always true
    /// for this member itself).
    pub recent_active: bool,
}

/// A member's Raft state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftStatus {
    /// This member's id.
    pub id: u64,
    /// Its role.
    pub role: Role,
    /// The current term.
    pub term: u64,
    /// The leader, when known.
    pub leader: Option<u64>,
    /// The commit index.
    pub commit: u64,
    /// The applied index (the state machine's revision).
    pub applied: u64,
    /// The voters, by id.
    pub members: Vec<MemberStatus>,
    /// The next raft id the cluster would hand out: an id below it that is
    /// not a voter was removed (ids are never reused).
    pub next_id: u64,
}

impl RaftStatus {
    /// Whether member `id` was removed from the cluster, as far as this
    /// member has applied (a member added after what this one applied is
    /// not mistaken for a removed one: its id is not below `next_id` yet).
    pub fn was_removed(&self, id: u64) -> bool {
        id != 0 && id < self.next_id && !self.members.iter().any(|m| m.id == id)
    }

    /// The leader's id and address, when known.
    pub fn leader_address(&self) -> Option<(u64, String)> {
        let leader = self.leader?;
        let address = self
            .members
            .iter()
            .find(|m| m.id == leader)
            .map(|m| m.address.clone())
            .unwrap_or_default();
        Some((leader, address))
    }
}

/// The upper bounds of the proposal latency histogram's buckets, in
/// milliseconds (a last, unbounded bucket follows).
pub const LATENCY_BUCKETS_MS: [f64; 12] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
];

/// A fixed-bucket latency histogram (Prometheus-style: cumulative counts
/// are computed by the exporter).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencyHistogram {
    /// Observations per bucket of [`LATENCY_BUCKETS_MS`], plus one for the
    /// overflow bucket (not cumulative).
    pub counts: Vec<u64>,
    /// The sum of all observations, in seconds.
    pub sum_seconds: f64,
    /// The number of observations.
    pub count: u64,
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> LatencyHistogram {
        LatencyHistogram {
            counts: vec![0; LATENCY_BUCKETS_MS.len() + 1],
            sum_seconds: 0.0,
            count: 0,
        }
    }

    /// Records one observation.
    pub fn observe(&mut self, latency: Duration) {
        let ms = latency.as_secs_f64() * 1000.0;
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        if self.counts.len() != LATENCY_BUCKETS_MS.len() + 1 {
            self.counts = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        }
        self.counts[bucket] += 1;
        self.sum_seconds += latency.as_secs_f64();
        self.count += 1;
    }

    /// The smallest bucket bound under which at least `q` (0..=1) of the
    /// observations fall, in milliseconds (infinity for the overflow bucket,
    /// 0 when empty).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let want = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return LATENCY_BUCKETS_MS.get(i).copied().unwrap_or(f64::INFINITY);
            }
        }
        f64::INFINITY
    }
}

/// Counters worth graphing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RaftMetrics {
    /// The current term.
    pub term: u64,
    /// How many times this member saw the leader change (to a known
    /// leader different from the previous one).
    pub leader_changes: u64,
    /// The commit index.
    pub commit: u64,
    /// The applied index.
    pub applied: u64,
    /// Commands proposed on this member and committed.
    pub proposals_committed: u64,
    /// Proposals on this member that failed (outcome unknown).
    pub proposals_failed: u64,
    /// ReadIndex requests asked again after going unanswered for
    /// `READ_RETRY` (a leader change, a lost message): each one a read
    /// that waited at least that long.
    pub reads_retried: u64,
    /// Snapshots taken or installed.
    pub snapshots: u64,
    /// Proposal latency on this member (propose → applied → answered).
    pub proposal_latency: LatencyHistogram,
    /// Ready writes to the durable log (entries and hard state, one fsync
    /// each): with the seconds below, what the log costs per write.
    pub log_writes: u64,
    /// Seconds spent in those writes.
    pub log_write_seconds: f64,
}

/// Carries Raft messages to peers. The server implements it over gRPC
/// `Raft.Step` (each message protobuf-2 encoded, see [`encode_message`]).
///
/// `send` must never block the Raft loop: queue and return. A peer that
/// cannot be reached is reported back with [`RaftNode::report_unreachable`]
/// (and a failed snapshot with [`RaftNode::report_snapshot`]), so that
/// raft-rs probes it instead of streaming appends into the void.
pub trait Transport: Send + Sync + 'static {
    /// Sends `msgs` (each has its `to` set).
    fn send(&self, msgs: Vec<Message>);
}

/// Encodes a Raft message for the wire (protobuf 2, raft-rs's codec).
pub fn encode_message(message: &Message) -> Vec<u8> {
    use protobuf::Message as _;
    // Writing to a Vec only fails on messages over 2 GiB.
    message.write_to_bytes().unwrap_or_default()
}

/// Decodes a Raft message from the wire.
pub fn decode_message(bytes: &[u8]) -> Result<Message, RaftError> {
    use protobuf::Message as _;
    Message::parse_from_bytes(bytes).map_err(|e| RaftError::BadMessage {
        len: bytes.len(),
        message: e.to_string(),
    })
}
