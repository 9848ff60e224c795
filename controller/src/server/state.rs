//! The store's async front over the Raft node: writes go through Raft
//! (proposed on any member, carried to the leader by Raft itself), reads
//! come from the local applied state, watches from the local hub.
//!
//! - **Writes**: [`StoreFront::propose`] hands the commands to
//!   [`RaftNode::propose`] on any member. The leader batches whatever
//!   queued during the previous fsync into one Ready (group commit); a
//!   follower proposes too, and raft-rs carries the entries to the leader as
//!   a `MsgProp` inside the Raft messages streamed there (etcd does the
//!   same), so forwarded writes are batched with everything else and need
//!   no answer of their own. The follower answers when it applies the entry
//!   itself (the entry's context names the proposer), so a client reads its
//!   own write from any controller, and the result is the follower's own
//!   deterministic apply of the entry.
//! - **Reads** take the state machine's lock for one closure, so a reader
//!   sees one revision and never half a batch. [`StoreFront::read`] reads
//!   whatever this member has applied (the loops and the dispatcher run on
//!   the leader, where that is current enough); [`StoreFront::linearizable`]
//!   first does a Raft ReadIndex and waits for it to be applied, for the
//!   Control RPCs that must not show a stale list.
//! - **Watches** come from this member's applied state on any member.
//!
//! Errors keep their meaning for callers: no quorum and no leader are
//! [`StateError::NoQuorum`] / [`StateError::NotLeader`], which the gRPC
//! services answer with UNAVAILABLE.

use tokio::sync::mpsc;

use crate::raft::{RaftError, RaftNode};
use crate::store::{Applied, ApplyError, ApplyOutcome, Command, Event, StateMachine, WatchError};

/// Errors from the store front.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The Raft node could not be started in its directory.
    #[error("starting the replicated store in {path}: {source}")]
    Open {
        /// The store's directory.
        path: String,
        /// What failed.
        #[source]
        source: Box<RaftError>,
    },
    /// Logging or applying failed; the commands' outcome is unknown.
    #[error("store write failed: {message}")]
    Write {
        /// The error, as text.
        message: String,
    },
    /// The command was logged at `index` and refused by the state machine.
    #[error("command {command} at index {index} refused: {source}")]
    Refused {
        /// The command's name.
        command: &'static str,
        /// Its log index.
        index: u64,
        /// Why it was refused.
        #[source]
        source: ApplyError,
    },
    /// No majority of the controllers can be reached: writes (and current
    /// reads) are refused until one is back. A write that failed this way
    /// may still be applied later: its outcome is unknown.
    #[error(
        "no quorum: {reachable} of {members} controllers reachable; writes are refused until a majority is back"
    )]
    NoQuorum {
        /// Members reachable from this one, itself included.
        reachable: usize,
        /// Voters.
        members: usize,
    },
    /// A majority is reachable but the write did not commit within the
    /// request timeout (an overloaded cluster): its outcome is unknown.
    #[error("{message}")]
    TimedOut {
        /// The Raft node's words, with the timeout and the reachable count.
        message: String,
    },
    /// This controller is not the leader and could not hand the request to
    /// one (none known, or unreachable).
    #[error("not the leader{}", match .leader { Some(a) => format!("; the leader is {a}"), None => "; no leader is known (an election may be under way)".to_string() })]
    NotLeader {
        /// The leader's address, when known.
        leader: Option<String>,
    },
    /// The store has stopped (the controller is shutting down).
    #[error("the store is shut down")]
    Stopped,
}

impl StateError {
    /// Whether the error means "try again, maybe elsewhere" (gRPC
    /// UNAVAILABLE) rather than a failure of the request itself.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StateError::NoQuorum { .. }
                | StateError::TimedOut { .. }
                | StateError::NotLeader { .. }
                | StateError::Stopped
        )
    }
}

impl From<RaftError> for StateError {
    fn from(e: RaftError) -> StateError {
        match e {
            RaftError::NoQuorum { reachable, members } => {
                StateError::NoQuorum { reachable, members }
            }
            RaftError::NotLeader { leader } => StateError::NotLeader {
                leader: leader.map(|(_, address)| address),
            },
            e @ (RaftError::TimedOut { .. } | RaftError::LeaderChanged { .. }) => {
                StateError::TimedOut {
                    message: e.to_string(),
                }
            }
            RaftError::Stopped => StateError::Stopped,
            other => StateError::Write {
                message: other.to_string(),
            },
        }
    }
}

/// The store's async front; cheap to clone.
#[derive(Clone)]
pub struct StoreFront {
    raft: RaftNode,
    id: u64,
}

impl std::fmt::Debug for StoreFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreFront").finish_non_exhaustive()
    }
}

impl StoreFront {
    /// A front over a started Raft node.
    pub fn new(raft: RaftNode) -> StoreFront {
        let id = raft.id();
        StoreFront { raft, id }
    }

    /// The Raft node behind the front.
    pub fn raft(&self) -> &RaftNode {
        &self.raft
    }

    /// This controller's raft id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether this controller leads now.
    pub fn is_leader(&self) -> bool {
        self.raft.leadership().borrow().leader == Some(self.id)
    }

    /// The leader's address, when one is known.
    pub fn leader_address(&self) -> Option<String> {
        self.raft
            .status()
            .leader_address()
            .map(|(_, address)| address)
            .filter(|a| !a.is_empty())
    }

    /// Every controller's address, the leader's first (what agents get in
    /// `SessionAccepted.controllers`).
    pub fn controller_addresses(&self) -> Vec<String> {
        let status = self.raft.status();
        let mut members = status.members;
        members.sort_by_key(|m| (Some(m.id) != status.leader, m.id));
        members
            .into_iter()
            .map(|m| m.address)
            .filter(|a| !a.is_empty())
            .collect()
    }

    /// Logs `commands` durably on a majority and applies them; returns each
    /// one's index and outcome (or refusal), in order, once applied on this
    /// member (so a write is readable here when it is answered). Any member
    /// takes writes: a follower's go to the leader inside the Raft messages
    /// it already streams there (see [`RaftNode::propose`]).
    pub async fn propose(&self, commands: Vec<Command>) -> Result<Vec<(u64, Applied)>, StateError> {
        Ok(self.raft.propose(commands).await?)
    }

    /// Proposes one command; a refusal is an error.
    pub async fn propose_one(&self, command: Command) -> Result<(u64, ApplyOutcome), StateError> {
        let name = command.name();
        let mut results = self.propose(vec![command]).await?;
        match results.pop() {
            Some((index, Ok(outcome))) => Ok((index, outcome)),
            Some((index, Err(source))) => Err(StateError::Refused {
                command: name,
                index,
                source,
            }),
            None => Err(StateError::Stopped),
        }
    }

    /// Waits until this member's state is at least as new as everything
    /// committed when the call began (Raft ReadIndex), so that a read after
    /// it is linearizable. Fails with no quorum like a write.
    pub async fn linearizable(&self) -> Result<(), StateError> {
        let index = self.raft.read_index().await?;
        self.raft.wait_applied(index).await?;
        Ok(())
    }

    /// Runs `f` on this member's applied state at one revision.
    pub fn read<R>(&self, f: impl FnOnce(&StateMachine) -> R) -> R {
        self.raft.read(f)
    }

    /// This member's revision (its applied index).
    pub fn revision(&self) -> u64 {
        self.raft.read(|s| s.applied_index())
    }

    /// Every event from revision `from` (inclusive; 0 for "from now on"),
    /// delivered on a channel in batches of whole revisions: a command's
    /// events are published together, so a batch never splits one (the
    /// dispatcher relies on it: one assignment set per revision). The
    /// channel ends after an error (compaction, shutdown); dropping the
    /// receiver stops the forwarding task at once. Call it inside the
    /// runtime.
    pub fn watch(&self, from: u64) -> Result<EventBatches, WatchError> {
        let hub = self.raft.watch_hub();
        // Subscribed before the stream is opened: a publish in between
        // shows up as a change, so nothing waits for a wake that came early.
        let mut notified = hub.subscribe();
        let mut stream = hub.watch(from)?;
        let (tx, rx) = mpsc::channel(256);
        // A task, not a thread blocked on the hub: the hub wakes it once per
        // applied batch, and the hand-off to the watcher stays inside the
        // runtime (a thread per watch cost a context switch per write).
        tokio::spawn(async move {
            loop {
                notified.borrow_and_update();
                // Drain everything retained: a revision's events are
                // published together, so stopping only when none is left
                // never splits one.
                let mut batch = Vec::new();
                let mut failed = None;
                loop {
                    match stream.try_recv() {
                        Ok(Some(event)) => batch.push(event),
                        Ok(None) => break,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if !batch.is_empty() && tx.send(Ok(batch)).await.is_err() {
                    return;
                }
                if failed.is_none() && stream.is_closed() {
                    failed = Some(WatchError::Closed);
                }
                if let Some(e) = failed {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                tokio::select! {
                    changed = notified.changed() => {
                        if changed.is_err() {
                            let _ = tx.send(Err(WatchError::Closed)).await;
                            return;
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }
}

/// Batches of events, each made of whole revisions, from [`StoreFront::watch`].
pub type EventBatches = mpsc::Receiver<Result<Vec<Event>, WatchError>>;

/// A new random object id: 20 lowercase hex digits from the kernel's
/// random source (ids need only be unique, not secret; Swarm's are 25
/// base-36 characters from a CSPRNG). Falls back to the clock and a counter
/// if `/dev/urandom` cannot be read.
pub fn random_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 10];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !ok {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes[..8].copy_from_slice(&nanos.to_be_bytes());
        bytes[8..].copy_from_slice(&(n as u16).to_be_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
