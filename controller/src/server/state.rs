//! The store's async front: one thread owns every write, reads come from a
//! consistent view, watches arrive on tokio channels.
//!
//! The [`Store`] is synchronous and fsyncs once per proposal, so it must not
//! run on the async workers. A dedicated thread takes proposals from a
//! channel; whatever queued up while it was fsyncing goes into the next
//! [`Store::propose_batch`] together (group commit, as etcd's raft loop does
//! with its ready batches), so many agents reporting at once cost one fsync,
//! not one each. Each proposer gets back exactly its own commands' results.
//!
//! Reads take a read lock on the store for the length of a closure, so a
//! reader sees the state at one revision and never half of a batch; a read
//! waits at most for the fsync in progress.

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::store::{
    Applied, ApplyError, ApplyOutcome, Command, Event, StateMachine, Store, StoreConfig,
    StoreError, WatchError, WatchHub,
};

/// Errors from the store front.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The store could not be opened in its directory.
    #[error("opening the store in {path}: {source}")]
    Open {
        /// The store's directory.
        path: String,
        /// What failed.
        #[source]
        source: Box<StoreError>,
    },
    /// Logging or applying a batch failed; none of its commands may have
    /// been acknowledged.
    #[error("store write failed: {message}")]
    Write {
        /// The store's error, as text (it is shared by every proposer in the
        /// batch).
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
    /// The store's thread has stopped (the controller is shutting down).
    #[error("the store is shut down")]
    Stopped,
    /// The store's thread could not be started.
    #[error("starting the store thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Most commands in one group commit; bounds one fsync's transaction.
const MAX_BATCH: usize = 1024;

/// How often a watch forwarder checks whether its receiver is gone.
const WATCH_POLL: Duration = Duration::from_millis(200);

struct Proposal {
    commands: Vec<Command>,
    reply: oneshot::Sender<Result<Vec<(u64, Applied)>, StateError>>,
}

/// The store's async front; cheap to clone.
#[derive(Clone)]
pub struct StoreFront {
    store: Arc<RwLock<Store>>,
    hub: WatchHub,
    proposals: std_mpsc::Sender<Proposal>,
}

impl std::fmt::Debug for StoreFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreFront").finish_non_exhaustive()
    }
}

/// The thread that owns writes; join it after every [`StoreFront`] is gone
/// so that the log file is closed before the process (or a test) reopens it.
#[derive(Debug)]
pub struct StoreThread(JoinHandle<()>);

impl StoreThread {
    /// Waits for the thread to finish (it does once every front is dropped).
    pub fn join(self) {
        // A panic in the writer thread has already been reported by the
        // panic hook; there is nothing to add here.
        let _ = self.0.join();
    }
}

impl StoreFront {
    /// Opens (or creates) the store in `dir`, recovering its state, and
    /// starts the writer thread.
    pub fn open(dir: &Path, config: StoreConfig) -> Result<(StoreFront, StoreThread), StateError> {
        let store = Store::open(dir, config).map_err(|source| StateError::Open {
            path: dir.display().to_string(),
            source: Box::new(source),
        })?;
        let hub = store.hub().clone();
        let store = Arc::new(RwLock::new(store));
        let (tx, rx) = std_mpsc::channel::<Proposal>();
        let writer = Arc::clone(&store);
        let handle = std::thread::Builder::new()
            .name("gantry-store".into())
            .spawn(move || write_loop(&writer, &rx))
            .map_err(StateError::Thread)?;
        Ok((
            StoreFront {
                store,
                hub,
                proposals: tx,
            },
            StoreThread(handle),
        ))
    }

    /// Logs `commands` durably and applies them; returns each one's index
    /// and outcome (or refusal), in order.
    pub async fn propose(&self, commands: Vec<Command>) -> Result<Vec<(u64, Applied)>, StateError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.proposals
            .send(Proposal { commands, reply })
            .map_err(|_| StateError::Stopped)?;
        rx.await.map_err(|_| StateError::Stopped)?
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

    /// Runs `f` on the state at one revision.
    pub fn read<R>(&self, f: impl FnOnce(&StateMachine) -> R) -> R {
        f(self.lock().state())
    }

    /// The current revision (the applied index).
    pub fn revision(&self) -> u64 {
        self.lock().revision()
    }

    fn lock(&self) -> RwLockReadGuard<'_, Store> {
        // A poisoned lock means the writer panicked mid-apply; the state
        // machine validates before it mutates, so what is there is readable.
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Every event from revision `from` (inclusive; 0 for "from now on"),
    /// delivered on a channel in batches of whole revisions: a command's
    /// events are published together, so a batch never splits one (the
    /// dispatcher relies on it: one assignment set per revision). The
    /// channel ends after an error (compaction, shutdown); dropping the
    /// receiver stops the forwarder within [`WATCH_POLL`].
    pub fn watch(&self, from: u64) -> Result<EventBatches, WatchError> {
        let mut stream = self.hub.watch(from)?;
        let (tx, rx) = mpsc::channel(256);
        // A plain thread, not the runtime's blocking pool: the stream blocks
        // on a condvar, and a watch lives as long as its session.
        let spawned = std::thread::Builder::new()
            .name("gantry-watch".into())
            .spawn(move || {
                loop {
                    if tx.is_closed() {
                        return;
                    }
                    let first = match stream.recv_timeout(WATCH_POLL) {
                        Ok(Some(event)) => event,
                        Ok(None) => continue,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e));
                            return;
                        }
                    };
                    let mut batch = vec![first];
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
                    if tx.blocking_send(Ok(batch)).is_err() {
                        return;
                    }
                    if let Some(e) = failed {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            });
        // Without a thread there is no watch: report it as a closed store so
        // that the caller resyncs or ends, as after a shutdown.
        spawned.map_err(|_| WatchError::Closed)?;
        Ok(rx)
    }
}

/// Batches of events, each made of whole revisions, from [`StoreFront::watch`].
pub type EventBatches = mpsc::Receiver<Result<Vec<Event>, WatchError>>;

fn write_loop(store: &RwLock<Store>, rx: &std_mpsc::Receiver<Proposal>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let mut count = batch[0].commands.len();
        while count < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => {
                    count += p.commands.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let commands: Vec<Command> = batch
            .iter()
            .flat_map(|p| p.commands.iter().cloned())
            .collect();
        let result = store
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .propose_batch(&commands);
        match result {
            Ok(results) => {
                let mut results = results.into_iter();
                for p in batch {
                    let mine: Vec<_> = results.by_ref().take(p.commands.len()).collect();
                    let _ = p.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, commands = commands.len(), "store write failed");
                let message = e.to_string();
                for p in batch {
                    let _ = p.reply.send(Err(StateError::Write {
                        message: message.clone(),
                    }));
                }
            }
        }
    }
}

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
