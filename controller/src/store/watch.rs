//! Change events and watches: stream every change from a revision, so that
//! nobody polls.
//!
//! A revision is the log index of the command that made the change (one
//! command may make several events, all with its index). The
//! [`StateMachine`](super::StateMachine) returns the events of each applied
//! command; a [`WatchHub`] keeps a bounded history of them and hands them to
//! [`WatchStream`]s, etcd's watch semantics: a watch from revision `r` first
//! replays every retained event with revision `>= r`, then follows live ones.
//! A watch from a revision older than the retained history fails with
//! [`WatchError::Compacted`], and the watcher lists the state (a snapshot at
//! the revision named in the error) and watches again from the next one, as a
//! Kubernetes informer does after "410 Gone".
//!
//! The API is synchronous (a mutex and a condvar): the core needs no async
//! runtime; an async wrapper can sit on top later.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::{Node, Service, Task};

/// Errors from watching.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The events from the requested revision are no longer retained (or a
    /// slow watcher fell behind the retained history).
    #[error("revision {requested} compacted, resync from snapshot at {snapshot_at}")]
    Compacted {
        /// The first revision the watcher needed.
        requested: u64,
        /// The revision the current state is at: list it, then watch from
        /// the next revision.
        snapshot_at: u64,
    },
    /// The store was closed; no more events will come.
    #[error("watch closed: the store shut down")]
    Closed,
}

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The object was created.
    Created,
    /// The object changed.
    Updated,
    /// The object was removed; the event carries its last state.
    Deleted,
}

/// A cluster object as it is after a change (before it, for a deletion).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Object {
    /// A node.
    Node(Node),
    /// A service.
    Service(Service),
    /// A task.
    Task(Task),
}

impl Object {
    /// The object's kind as errors and logs name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Node(_) => "node",
            Object::Service(_) => "service",
            Object::Task(_) => "task",
        }
    }

    /// The object's id as a string.
    pub fn id(&self) -> &str {
        match self {
            Object::Node(n) => n.id.as_str(),
            Object::Service(s) => s.id.as_str(),
            Object::Task(t) => t.id.as_str(),
        }
    }
}

/// One change to one object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The log index of the command that made the change.
    pub revision: u64,
    /// Created, updated or deleted.
    pub kind: EventKind,
    /// The object after the change (its last state for a deletion). Shared:
    /// the hub's history, every watcher and the proposer hold the same one,
    /// so handing an event on never copies the object (a node's labels, a
    /// service's spec).
    pub object: Arc<Object>,
}

/// The retained history, shared by the hub and its streams.
#[derive(Debug)]
struct History {
    /// Retained events, oldest first; `events[i]` has sequence number
    /// `first_seq + i`.
    events: VecDeque<Event>,
    /// The sequence number of `events[0]`.
    first_seq: u64,
    /// Every revision `>= servable_from` still has all its events here (or
    /// had none).
    servable_from: u64,
    /// The latest revision published (the applied index).
    revision: u64,
    /// At most this many events are kept.
    capacity: usize,
    /// Set when the store shuts down.
    closed: bool,
}

impl History {
    fn next_seq(&self) -> u64 {
        self.first_seq + self.events.len() as u64
    }
}

#[derive(Debug)]
struct Shared {
    history: Mutex<History>,
    /// Wakes blocking streams.
    changed: Condvar,
    /// Wakes async watchers ([`WatchHub::subscribe`]): bumped on every
    /// notification, so a waiter never misses one that came between its
    /// last look and its wait.
    notified: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// Locks the history. A poisoned lock only means another thread panicked
    /// while holding it; every update below leaves the history consistent
    /// before it can panic, so the data is still good to read.
    fn lock(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The publishing side of watches: the store's driver publishes each applied
/// command's events here, in log order.
#[derive(Debug, Clone)]
pub struct WatchHub {
    shared: Arc<Shared>,
}

impl WatchHub {
    /// A hub whose state is at `revision` with no history yet, keeping at most
    /// `capacity` events (at least one).
    pub fn new(revision: u64, capacity: usize) -> WatchHub {
        WatchHub {
            shared: Arc::new(Shared {
                history: Mutex::new(History {
                    events: VecDeque::new(),
                    first_seq: 0,
                    servable_from: revision + 1,
                    revision,
                    capacity: capacity.max(1),
                    closed: false,
                }),
                changed: Condvar::new(),
                notified: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    /// Wakes every watcher (blocking streams and async subscribers).
    fn wake(&self) {
        self.shared.changed.notify_all();
        self.shared.notified.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever the hub wakes its watchers (new
    /// events, a reset, the close): what an async watcher waits on between
    /// [`WatchStream::try_recv`] drains, instead of a thread blocked in
    /// [`WatchStream::recv`].
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.notified.subscribe()
    }

    /// Publishes the events of the command at `revision` (possibly none: a
    /// refused command still moves the revision). Events must come in
    /// revision order; the driver guarantees it by publishing after apply.
    pub fn publish(&self, revision: u64, events: &[Event]) {
        self.append(revision, events);
        self.wake();
    }

    /// Publishes like [`WatchHub::publish`] without waking the watchers
    /// yet: a driver applying many commands at once appends each and calls
    /// [`WatchHub::notify`] once, so watchers wake once per batch instead
    /// of once per command.
    pub fn append(&self, revision: u64, events: &[Event]) {
        let mut h = self.shared.lock();
        for event in events {
            if h.events.len() == h.capacity
                && let Some(old) = h.events.pop_front()
            {
                h.first_seq += 1;
                // The evicted event's revision may have siblings still
                // retained, so that whole revision is no longer servable.
                h.servable_from = h.servable_from.max(old.revision + 1);
            }
            h.events.push_back(event.clone());
        }
        h.revision = h.revision.max(revision);
    }

    /// Wakes the watchers after [`WatchHub::append`]s.
    pub fn notify(&self) {
        self.wake();
    }

    /// Forgets all history: the state was replaced by a snapshot at
    /// `revision`, so only later revisions can be watched, and every open
    /// stream fails with [`WatchError::Compacted`] (conservatively, even one
    /// that waited for a revision after the snapshot).
    pub fn reset(&self, revision: u64) {
        let mut h = self.shared.lock();
        // Skip one sequence number so that every open stream, even one that
        // had read everything, finds itself behind `first_seq` and resyncs:
        // the revisions between its position and the snapshot were never
        // published as events.
        h.first_seq = h.next_seq() + 1;
        h.events.clear();
        h.servable_from = revision + 1;
        h.revision = revision;
        drop(h);
        self.wake();
    }

    /// Ends every stream: they return [`WatchError::Closed`] once they have
    /// drained what is retained.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.wake();
    }

    /// The latest revision published.
    pub fn revision(&self) -> u64 {
        self.shared.lock().revision
    }

    /// The oldest revision a new watch can start from.
    pub fn oldest_watchable(&self) -> u64 {
        self.shared.lock().servable_from
    }

    /// A stream of every event with revision `>= from`. Fails when events
    /// from `from` onwards are no longer all retained. `from` may lie in the
    /// future; the stream then waits for it. `from == 0` means "from now on"
    /// (the next revision), as in etcd.
    pub fn watch(&self, from: u64) -> Result<WatchStream, WatchError> {
        let h = self.shared.lock();
        let from = if from == 0 { h.revision + 1 } else { from };
        // A revision at or below the current one is only servable if no
        // event at or after it was evicted.
        if from < h.servable_from && from <= h.revision {
            return Err(WatchError::Compacted {
                requested: from,
                snapshot_at: h.revision,
            });
        }
        let offset = h.events.partition_point(|e| e.revision < from);
        let next_seq = h.first_seq + offset as u64;
        drop(h);
        Ok(WatchStream {
            shared: Arc::clone(&self.shared),
            from,
            next_seq,
            next_revision: from,
        })
    }
}

/// Events from one watch, in revision order. Blocking; see [`WatchHub::watch`].
#[derive(Debug)]
pub struct WatchStream {
    shared: Arc<Shared>,
    /// The revision the watch was opened at.
    from: u64,
    /// The sequence number of the next event to hand out.
    next_seq: u64,
    /// The revision the next event is at least at, for the compaction error.
    next_revision: u64,
}

impl WatchStream {
    /// The revision this watch started from.
    pub fn start_revision(&self) -> u64 {
        self.from
    }

    /// Whether the hub was closed (the store shut down); events still
    /// retained can be drained first.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// The next event if one is ready, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<Event>, WatchError> {
        let shared = Arc::clone(&self.shared);
        let h = shared.lock();
        self.take(&h)
    }

    /// The next event, waiting for it.
    pub fn recv(&mut self) -> Result<Event, WatchError> {
        let shared = Arc::clone(&self.shared);
        let mut h = shared.lock();
        loop {
            if let Some(event) = self.take(&h)? {
                return Ok(event);
            }
            if h.closed {
                return Err(WatchError::Closed);
            }
            h = shared.changed.wait(h).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The next event, waiting at most `timeout`; `Ok(None)` when none came.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, WatchError> {
        let deadline = Instant::now() + timeout;
        let shared = Arc::clone(&self.shared);
        let mut h = shared.lock();
        loop {
            if let Some(event) = self.take(&h)? {
                return Ok(Some(event));
            }
            if h.closed {
                return Err(WatchError::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            h = shared
                .changed
                .wait_timeout(h, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn take(&mut self, h: &History) -> Result<Option<Event>, WatchError> {
        if self.next_seq < h.first_seq {
            // The watcher was too slow: events it had not read were evicted.
            return Err(WatchError::Compacted {
                requested: self.next_revision,
                snapshot_at: h.revision,
            });
        }
        let offset = usize::try_from(self.next_seq - h.first_seq).unwrap_or(usize::MAX);
        match h.events.get(offset) {
            Some(event) => {
                self.next_seq += 1;
                self.next_revision = event.revision;
                Ok(Some(event.clone()))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NodeId, NodeSpec, NodeStatus};

    fn ev(revision: u64, id: &str) -> Event {
        Event {
            revision,
            kind: EventKind::Created,
            object: Arc::new(Object::Node(Node {
                id: NodeId::new(id).expect("valid"),
                spec: NodeSpec::default(),
                status: NodeStatus::default(),
                version: revision,
                subnet: None,
            })),
        }
    }

    /// Evicting one event of a revision makes the whole revision unservable:
    /// a watcher must never get half of a command's changes.
    #[test]
    fn eviction_inside_a_revision_compacts_all_of_it() {
        let hub = WatchHub::new(0, 3);
        hub.publish(1, &[ev(1, "a"), ev(1, "b")]);
        hub.publish(2, &[ev(2, "c"), ev(2, "d")]);
        assert_eq!(hub.oldest_watchable(), 2);
        assert!(hub.watch(1).is_err());
        let mut w = hub.watch(2).expect("revision 2 is whole");
        let ids: Vec<_> = std::iter::from_fn(|| w.try_recv().ok().flatten())
            .map(|e| e.object.id().to_string())
            .collect();
        assert_eq!(ids, ["c", "d"]);
    }

    /// Installing a snapshot drops history: open streams must resync.
    #[test]
    fn reset_forces_streams_to_resync() {
        let hub = WatchHub::new(0, 10);
        hub.publish(1, &[ev(1, "a")]);
        let mut w = hub.watch(2).expect("future");
        hub.reset(50);
        hub.publish(51, &[ev(51, "z")]);
        assert_eq!(
            w.try_recv(),
            Err(WatchError::Compacted {
                requested: 2,
                snapshot_at: 51
            })
        );
        assert!(hub.watch(50).is_err());
        let mut w = hub.watch(51).expect("after the snapshot");
        assert_eq!(w.try_recv().ok().flatten().map(|e| e.revision), Some(51));
    }
}
