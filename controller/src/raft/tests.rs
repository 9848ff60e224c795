//! In-process tests of the Raft node: a network harness in raft-rs's style
//! (N members, an in-memory transport that can drop, delay and partition)
//! over the real `StateMachine` and real `RedbLog` files in a temp dir.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::model::{NodeId, NodeSpec};
use crate::store::Command;

/// Generous bound for anything a healthy test cluster must do.
const WAIT: Duration = Duration::from_secs(10);

fn config(id: u64, dir: &std::path::Path) -> RaftConfig {
    RaftConfig {
        // Small ticks keep the file fast; 20 ms (elections after 200–400 ms)
        // leaves room for a loaded 2-core machine.
        tick: Duration::from_millis(20),
        election_ticks: 10,
        heartbeat_ticks: 2,
        snapshot_every: 1_000,
        request_timeout: Duration::from_millis(1500),
        ..RaftConfig::new(id, format!("n{id}"), dir.join(format!("n{id}")))
    }
}

fn write_cmd(key: &str, value: &str) -> Command {
    Command::UpsertNode {
        node: NodeId::new(key).expect("valid node id"),
        spec: NodeSpec {
            labels: BTreeMap::from([("v".to_string(), value.to_string())]),
            ..NodeSpec::default()
        },
    }
}

/// The value a member holds for `key`.
fn value(node: &RaftNode, key: &str) -> Option<String> {
    node.read(|sm| {
        sm.node(&NodeId::new(key).expect("valid node id"))
            .and_then(|n| n.spec.labels.get("v").cloned())
    })
}

fn state_bytes(node: &RaftNode) -> Vec<u8> {
    node.read(|sm| {
        let mut snap = sm.snapshot();
        // Members may sit at different indexes after the same writes
        // (no-op entries of different leaders); compare the content.
        snap.applied_index = 0;
        snap.encode().expect("encode")
    })
}

#[derive(Default)]
struct NetState {
    nodes: HashMap<u64, RaftNode>,
    /// Directed links that drop everything.
    cut: BTreeSet<(u64, u64)>,
    /// Drop one message in `drop_one_in` (0: none).
    drop_one_in: u64,
    delay: Duration,
    rng: u64,
    delayed: BinaryHeap<Delayed>,
    closed: bool,
}

struct Delayed {
    at: Instant,
    seq: u64,
    msg: Message,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Earliest first from a max-heap.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The in-memory network.
struct Net {
    state: Mutex<NetState>,
    wake: Condvar,
}

impl Net {
    fn new() -> Arc<Net> {
        let net = Arc::new(Net {
            state: Mutex::new(NetState {
                rng: 0x9e37_79b9_7f4a_7c15,
                ..NetState::default()
            }),
            wake: Condvar::new(),
        });
        let weak = Arc::downgrade(&net);
        std::thread::spawn(move || {
            // Delivers delayed messages; ends with the net.
            loop {
                let Some(net) = weak.upgrade() else { return };
                let mut s = net.state.lock().unwrap();
                if s.closed {
                    return;
                }
                let now = Instant::now();
                let mut due = Vec::new();
                while s.delayed.peek().is_some_and(|d| d.at <= now) {
                    due.push(s.delayed.pop().unwrap().msg);
                }
                let targets: Vec<(Option<RaftNode>, Message)> = due
                    .into_iter()
                    .map(|m| (s.nodes.get(&m.to).cloned(), m))
                    .collect();
                let wait = s
                    .delayed
                    .peek()
                    .map_or(Duration::from_millis(20), |d| {
                        d.at.saturating_duration_since(now)
                    })
                    .min(Duration::from_millis(20));
                if targets.is_empty() {
                    let _unused = net.wake.wait_timeout(s, wait).unwrap();
                    continue;
                }
                drop(s);
                for (node, m) in targets {
                    if let Some(node) = node {
                        let _ = node.step_message(m);
                    }
                }
            }
        });
        net
    }

    fn send(&self, from: u64, msgs: Vec<Message>) {
        let mut s = self.state.lock().unwrap();
        let mut now_targets = Vec::new();
        for m in msgs {
            if s.cut.contains(&(from, m.to)) {
                continue;
            }
            if s.drop_one_in > 0 {
                s.rng ^= s.rng << 13;
                s.rng ^= s.rng >> 7;
                s.rng ^= s.rng << 17;
                if s.rng.is_multiple_of(s.drop_one_in) {
                    continue;
                }
            }
            // Round-trip through the wire encoding, as the server will.
            let m = decode_message(&encode_message(&m)).expect("round trip");
            if s.delay > Duration::ZERO {
                let seq = s.rng;
                s.rng = s.rng.wrapping_add(1);
                let at = Instant::now() + s.delay;
                s.delayed.push(Delayed { at, seq, msg: m });
                self.wake.notify_all();
            } else if let Some(node) = s.nodes.get(&m.to) {
                now_targets.push((node.clone(), m));
            }
        }
        drop(s);
        for (node, m) in now_targets {
            let _ = node.step_message(m);
        }
    }

    /// Cuts every link between `a` and the others (both ways).
    fn isolate(&self, group: &[u64], all: &[u64]) {
        let mut s = self.state.lock().unwrap();
        for &a in group {
            for &b in all {
                if !group.contains(&b) {
                    s.cut.insert((a, b));
                    s.cut.insert((b, a));
                }
            }
        }
    }

    fn heal(&self) {
        self.state.lock().unwrap().cut.clear();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.state.lock().unwrap().closed = true;
    }
}

struct NetTransport {
    from: u64,
    net: std::sync::Weak<Net>,
}

impl Transport for NetTransport {
    fn send(&self, msgs: Vec<Message>) {
        if let Some(net) = self.net.upgrade() {
            net.send(self.from, msgs);
        }
    }
}

/// N members over one net, with their files in one temp dir.
struct TestCluster {
    dir: tempfile::TempDir,
    net: Arc<Net>,
    members: BTreeMap<u64, (RaftNode, RaftThread)>,
}

impl TestCluster {
    fn empty() -> TestCluster {
        TestCluster {
            dir: tempfile::tempdir().expect("temp dir"),
            net: Net::new(),
            members: BTreeMap::new(),
        }
    }

    fn start(&mut self, id: u64, bootstrap: Bootstrap) -> RaftNode {
        self.start_with(config(id, self.dir.path()), bootstrap)
    }

    fn start_with(&mut self, config: RaftConfig, bootstrap: Bootstrap) -> RaftNode {
        let id = config.id;
        let transport = Arc::new(NetTransport {
            from: id,
            net: Arc::downgrade(&self.net),
        });
        let (node, thread) = RaftNode::start(config, bootstrap, transport).expect("start");
        self.net
            .state
            .lock()
            .unwrap()
            .nodes
            .insert(id, node.clone());
        self.members.insert(id, (node.clone(), thread));
        node
    }

    /// Stops member `id` (as if killed: files kept, nothing flushed beyond
    /// what each Ready already fsynced).
    fn kill(&mut self, id: u64) {
        self.net.state.lock().unwrap().nodes.remove(&id);
        if let Some((_, thread)) = self.members.remove(&id) {
            thread.stop();
        }
    }

    fn node(&self, id: u64) -> RaftNode {
        self.members[&id].0.clone()
    }

    fn ids(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    /// A 1-member cluster grown to `n` members through `add_member`.
    async fn grow(n: u64) -> TestCluster {
        let mut c = TestCluster::empty();
        c.start(1, Bootstrap::NewCluster);
        c.wait_leader(&[1]).await;
        for want in 2..=n {
            let leader = c.wait_leader(&c.ids()).await;
            let id = c
                .node(leader)
                .add_member(format!("n{want}"))
                .await
                .expect("add member");
            assert_eq!(id, want, "ids are handed out in order");
            c.start(id, Bootstrap::Join);
            // The new member must have caught up before the next change
            // needs it for a quorum.
            let applied = c.node(leader).applied();
            c.wait_applied(&[id], applied).await;
        }
        c
    }

    /// Waits until the members in `ids` agree on one leader among them.
    async fn wait_leader(&self, ids: &[u64]) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let statuses: Vec<RaftStatus> = ids.iter().map(|&i| self.node(i).status()).collect();
            let leaders: BTreeSet<u64> = statuses.iter().filter_map(|s| s.leader).collect();
            if statuses.iter().all(|s| s.leader.is_some())
                && leaders.len() == 1
                && let Some(&leader) = leaders.iter().next()
                && ids.contains(&leader)
                && self.node(leader).status().role == Role::Leader
            {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {ids:?}: {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_applied(&self, ids: &[u64], index: u64) {
        for &id in ids {
            tokio::time::timeout(WAIT, self.node(id).wait_applied(index))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "member {id} did not apply {index}: {:?}",
                        self.node(id).status()
                    )
                })
                .expect("applied");
        }
    }

    /// Writes through whichever member leads among `ids`, retrying while
    /// leadership moves; returns the index.
    async fn write(&self, ids: &[u64], key: &str, value: &str) -> u64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let leader = self.wait_leader(ids).await;
            match self.node(leader).propose(vec![write_cmd(key, value)]).await {
                Ok(results) => {
                    let (index, applied) = &results[0];
                    applied.as_ref().expect("applied");
                    return *index;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "write {key} failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let ids = self.ids();
        for id in ids {
            self.kill(id);
        }
    }
}

#[tokio::test]
async fn single_member_commits_reads_and_restarts() {
    let mut c = TestCluster::empty();
    let node = c.start(1, Bootstrap::NewCluster);
    assert_eq!(c.wait_leader(&[1]).await, 1);
    let results = node
        .propose(vec![write_cmd("a", "1"), write_cmd("b", "2")])
        .await
        .expect("propose");
    assert_eq!(results.len(), 2);
    assert_eq!(results[1].0, results[0].0 + 1, "one entry per command");
    let read = node.read_index().await.expect("read index");
    node.wait_applied(read).await.expect("applied");
    assert_eq!(value(&node, "a").as_deref(), Some("1"));
    let status = node.status();
    assert_eq!(status.role, Role::Leader);
    assert_eq!(
        status.members,
        vec![MemberStatus {
            id: 1,
            address: "n1".to_string(),
            match_index: status.members[0].match_index,
            recent_active: true,
        }]
    );
    let metrics = node.metrics();
    assert_eq!(metrics.proposals_committed, 2);
    assert_eq!(metrics.proposal_latency.count, 1);

    c.kill(1);
    // NewCluster on existing data restarts from it.
    let node = c.start(1, Bootstrap::NewCluster);
    c.wait_leader(&[1]).await;
    assert_eq!(value(&node, "b").as_deref(), Some("2"));
    let results = node
        .propose(vec![write_cmd("c", "3")])
        .await
        .expect("propose after restart");
    assert!(results[0].0 > read);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_apply_the_same_commands_in_the_same_order() {
    let c = TestCluster::grow(3).await;
    let ids = c.ids();
    let leader = c.wait_leader(&ids).await;
    // Concurrent proposers: their commands interleave in one log order.
    let mut tasks = Vec::new();
    for client in 0..4 {
        let node = c.node(leader);
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                node.propose(vec![write_cmd(&format!("k{client}-{i}"), &format!("{i}"))])
                    .await
                    .expect("propose");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let last = c.node(leader).applied();
    c.wait_applied(&ids, last).await;
    let leader_state = state_bytes(&c.node(leader));
    // Every member's hub saw every index in order, and states agree.
    for &id in &ids {
        assert_eq!(
            state_bytes(&c.node(id)),
            leader_state,
            "member {id} diverged"
        );
        assert_eq!(value(&c.node(id), "k3-24").as_deref(), Some("24"));
    }
    // Followers refuse proposals, naming the leader.
    let follower = *ids.iter().find(|&&i| i != leader).unwrap();
    let err = c
        .node(follower)
        .propose(vec![write_cmd("x", "1")])
        .await
        .expect_err("follower");
    assert_eq!(
        err.to_string(),
        format!("not the leader: the leader is controller {leader} at n{leader}")
    );
    // ReadIndex on a follower is linearizable.
    let index = c.write(&ids, "fresh", "yes").await;
    let read = c.node(follower).read_index().await.expect("follower read");
    assert!(
        read >= index,
        "read index {read} before the acknowledged write {index}"
    );
    c.node(follower).wait_applied(read).await.expect("applied");
    assert_eq!(value(&c.node(follower), "fresh").as_deref(), Some("yes"));
    let status = c.node(leader).status();
    assert_eq!(status.members.len(), 3);
    assert!(
        status.members.iter().all(|m| m.match_index >= index),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_leader_stops_committing_and_heals_without_divergence() {
    let c = TestCluster::grow(3).await;
    let ids = c.ids();
    let old = c.wait_leader(&ids).await;
    c.write(&ids, "before", "1").await;
    c.net.isolate(&[old], &ids);
    let rest: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
    // The cut-off leader fails fast or within the bound, never succeeds.
    let started = Instant::now();
    let err = c
        .node(old)
        .propose(vec![write_cmd("lost", "1")])
        .await
        .expect_err("minority write");
    assert!(
        matches!(
            err,
            RaftError::NoQuorum { .. } | RaftError::NotLeader { .. }
        ),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The majority elects and continues.
    let new = c.wait_leader(&rest).await;
    assert_ne!(new, old);
    let index = c.write(&rest, "during", "2").await;
    // The old leader steps down (check_quorum) and says so.
    let deadline = Instant::now() + WAIT;
    while c.node(old).status().role == Role::Leader {
        assert!(Instant::now() < deadline, "old leader never stepped down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = c
        .node(old)
        .propose(vec![write_cmd("lost2", "1")])
        .await
        .expect_err("cut-off write");
    assert_eq!(err.to_string(), "no quorum: 1 of 3 controllers reachable");
    c.net.heal();
    c.wait_applied(&ids, index).await;
    let last = c.write(&ids, "after", "3").await;
    c.wait_applied(&ids, last).await;
    let want = state_bytes(&c.node(new));
    for &id in &ids {
        assert_eq!(state_bytes(&c.node(id)), want, "member {id} diverged");
        assert_eq!(value(&c.node(id), "lost"), None);
    }
}
