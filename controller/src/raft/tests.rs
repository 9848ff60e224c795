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

fn state_bytes(node: &RaftNode) -> String {
    node.read(|sm| {
        let mut snap = sm.snapshot();
        // Members may sit at different indexes after the same writes
        // (no-op entries of different leaders); compare the content.
        snap.applied_index = 0;
        String::from_utf8(snap.encode().expect("encode")).expect("json")
    })
}

/// Asserts two members' states are byte for byte the same, showing where
/// they differ.
#[track_caller]
fn assert_same_state(a: &str, b: &str, what: &str) {
    if a == b {
        return;
    }
    let at = a
        .bytes()
        .zip(b.bytes())
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let lo = at.saturating_sub(150);
    panic!(
        "{what}: states differ at byte {at} (lengths {} and {}):\n  {}\n  {}",
        a.len(),
        b.len(),
        a.get(lo..(at + 150).min(a.len())).unwrap_or(""),
        b.get(lo..(at + 150).min(b.len())).unwrap_or("")
    );
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

    assert_eq!(node.stopped(), None);
    c.kill(1);
    assert_eq!(node.stopped().as_deref(), Some("stopped"));
    assert!(matches!(
        node.propose(vec![write_cmd("late", "1")]).await,
        Err(RaftError::Stopped)
    ));
    assert!(
        node.leadership().has_changed().is_err(),
        "leadership watch closed"
    );
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
        assert_same_state(
            &state_bytes(&c.node(id)),
            &leader_state,
            &format!("member {id}"),
        );
        assert_eq!(value(&c.node(id), "k3-24").as_deref(), Some("24"));
    }
    // A follower takes proposals too (raft-rs hands them to the leader):
    // answered once applied on the follower, and the same everywhere.
    let follower = *ids.iter().find(|&&i| i != leader).unwrap();
    let results = c
        .node(follower)
        .propose(vec![write_cmd("x", "1"), write_cmd("y", "2")])
        .await
        .expect("follower proposal");
    assert_eq!(results.len(), 2);
    assert!(results[1].0 > results[0].0, "in order");
    assert!(results.iter().all(|(_, applied)| applied.is_ok()));
    assert_eq!(value(&c.node(follower), "y").as_deref(), Some("2"));
    c.wait_applied(&ids, results[1].0).await;
    for &id in &ids {
        assert_eq!(value(&c.node(id), "x").as_deref(), Some("1"));
    }
    // ReadIndex on a follower is linearizable.
    let index = c.write(&ids, "fresh", "yes").await;
    let read = c.node(follower).read_index().await.expect("follower read");
    assert!(
        read >= index,
        "read index {read} before the acknowledged write {index}"
    );
    c.node(follower).wait_applied(read).await.expect("applied");
    assert_eq!(value(&c.node(follower), "fresh").as_deref(), Some("yes"));
    // The leader's view of its followers catches up with the write.
    let deadline = Instant::now() + WAIT;
    loop {
        let status = c.node(leader).status();
        assert_eq!(status.members.len(), 3);
        if status.members.iter().all(|m| m.match_index >= index) {
            break;
        }
        assert!(Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Linearizable reads on every member at once: a read's context is unique
/// in the cluster (a leader holds one pending read per context and drops a
/// second with the same one), so none is lost and asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_on_every_member_at_once_are_all_answered() {
    let c = TestCluster::grow(3).await;
    let ids = c.ids();
    c.wait_leader(&ids).await;
    let index = c.write(&ids, "k", "v").await;
    for _ in 0..20 {
        let mut reads = Vec::new();
        for &id in &ids {
            let node = c.node(id);
            reads.push(tokio::spawn(async move { node.read_index().await }));
        }
        for read in reads {
            let read = read.await.expect("reader").expect("read");
            assert!(read >= index, "read index {read} before the write {index}");
        }
    }
    let retried: u64 = ids
        .iter()
        .map(|&id| c.node(id).metrics().reads_retried)
        .sum();
    assert_eq!(retried, 0, "reads were lost and asked again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_leader_stops_committing_and_heals_without_divergence() {
    let c = TestCluster::grow(3).await;
    let ids = c.ids();
    let old = c.wait_leader(&ids).await;
    c.write(&ids, "before", "1").await;
    c.net.isolate(&[old], &ids);
    let rest: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
    // A follower's write handed to the cut-off leader is lost with it: it
    // fails as soon as another leader is known, its outcome unknown.
    let handed = {
        let node = c.node(rest[0]);
        tokio::spawn(async move { node.propose(vec![write_cmd("handed", "1")]).await })
    };
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
    match handed.await.expect("follower proposal") {
        Err(RaftError::LeaderChanged { leader }) => assert_eq!(leader, old),
        other => panic!("want leader changed, got {other:?}"),
    }
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
    // A follower cut off alone: its write goes nowhere and fails within
    // the request timeout, saying the quorum is out of reach (or that the
    // leader it handed the write to is gone), never that it succeeded.
    let loner = *rest.iter().find(|&&i| i != new).unwrap();
    c.net.isolate(&[loner], &ids);
    let started = Instant::now();
    let err = c
        .node(loner)
        .propose(vec![write_cmd("alone", "1")])
        .await
        .expect_err("a cut-off follower's write");
    assert!(
        matches!(
            err,
            RaftError::NoQuorum { .. } | RaftError::LeaderChanged { .. }
        ),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    c.net.heal();
    let last = c.write(&ids, "after", "3").await;
    c.wait_applied(&ids, last).await;
    let want = state_bytes(&c.node(new));
    for &id in &ids {
        assert_same_state(&state_bytes(&c.node(id)), &want, &format!("member {id}"));
        assert_eq!(value(&c.node(id), "lost"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_is_replaced_and_catches_up_on_restart() {
    let mut c = TestCluster::grow(3).await;
    let ids = c.ids();
    let old = c.wait_leader(&ids).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        c.write(&ids, &format!("a{i}"), "1").await;
        acked.push(format!("a{i}"));
    }
    c.kill(old);
    let rest: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
    let killed_at = Instant::now();
    let new = c.wait_leader(&rest).await;
    // A linearizable read right after the election (the new leader holds
    // reads until it has committed an entry of its term) sees every
    // acknowledged write.
    for &id in &rest {
        let read = c.node(id).read_index().await.expect("read after failover");
        c.node(id).wait_applied(read).await.expect("applied");
        assert_eq!(value(&c.node(id), "a19").as_deref(), Some("1"));
    }
    let index = c.write(&rest, "after-kill", "1").await;
    let elapsed = killed_at.elapsed();
    // 20 ms ticks: an election within 10–20 ticks, plus pre-vote rounds.
    assert!(
        elapsed < Duration::from_secs(2),
        "writes resumed after {elapsed:?}"
    );
    assert_ne!(new, old);
    for key in &acked {
        for &id in &rest {
            assert_eq!(
                value(&c.node(id), key).as_deref(),
                Some("1"),
                "{key} lost on {id}"
            );
        }
    }
    // The old leader restarts from its files and catches up.
    let back = c.start(old, Bootstrap::Restart);
    c.wait_applied(&[old], index).await;
    assert_eq!(value(&back, "after-kill").as_deref(), Some("1"));
    assert_same_state(
        &state_bytes(&back),
        &state_bytes(&c.node(new)),
        "restarted leader",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot() {
    let mut c = TestCluster::empty();
    let dir = c.dir.path().to_path_buf();
    let small = |id| RaftConfig {
        snapshot_every: 20,
        ..config(id, &dir)
    };
    c.start_with(small(1), Bootstrap::NewCluster);
    c.wait_leader(&[1]).await;
    for id in [2, 3] {
        assert_eq!(
            c.node(1).add_member(format!("n{id}")).await.expect("add"),
            id
        );
        let cfg = small(id);
        c.start_with(cfg, Bootstrap::Join);
        let applied = c.node(1).applied();
        c.wait_applied(&[id], applied).await;
    }
    let ids = c.ids();
    c.kill(3);
    let live = [1, 2];
    let mut last = 0;
    for i in 0..70 {
        last = c.write(&live, &format!("s{i}"), &i.to_string()).await;
    }
    // The leader compacted past everything member 3 has.
    let leader = c.wait_leader(&live).await;
    let log = c.node(leader).metrics();
    assert!(log.snapshots >= 3, "{log:?}");
    let node = c.start_with(small(3), Bootstrap::Restart);
    c.wait_applied(&[3], last).await;
    assert!(
        node.metrics().snapshots >= 1,
        "member 3 installed no snapshot"
    );
    assert_eq!(value(&node, "s69").as_deref(), Some("69"));
    assert_same_state(
        &state_bytes(&node),
        &state_bytes(&c.node(leader)),
        "member 3",
    );
    // It knows every address from the snapshot's membership.
    let addresses: Vec<String> = node
        .status()
        .members
        .into_iter()
        .map(|m| m.address)
        .collect();
    assert_eq!(addresses, ["n1", "n2", "n3"]);
    // And after a restart it still does, from its own snapshot.
    c.kill(3);
    let node = c.start_with(small(3), Bootstrap::Restart);
    assert_eq!(value(&node, "s69").as_deref(), Some("69"));
    assert_eq!(node.status().members.len(), 3);
    let index = c.write(&ids, "more", "1").await;
    c.wait_applied(&ids, index).await;
    // A brand-new member joins from the snapshot too (the log before it is
    // gone), and learns every address from it.
    let leader = c.wait_leader(&ids).await;
    let id = c
        .node(leader)
        .add_member("n4".to_string())
        .await
        .expect("add");
    let fresh = c.start_with(small(id), Bootstrap::Join);
    let index = c.write(&c.ids(), "joined", "1").await;
    c.wait_applied(&[id], index).await;
    assert!(
        fresh.metrics().snapshots >= 1,
        "the new member installed no snapshot"
    );
    assert_eq!(value(&fresh, "s0").as_deref(), Some("0"));
    let addresses: Vec<String> = fresh
        .status()
        .members
        .into_iter()
        .map(|m| m.address)
        .collect();
    assert_eq!(addresses, ["n1", "n2", "n3", "n4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_and_removed_one_at_a_time() {
    let mut c = TestCluster::grow(3).await;
    let leader = c.wait_leader(&c.ids()).await;
    let node = c.node(leader);
    // Two changes at once: the second names the first. Holding the first
    // back (its messages cut for a moment) makes "at once" certain.
    let ids = c.ids();
    c.net.isolate(&[leader], &ids);
    let first = tokio::spawn({
        let node = node.clone();
        async move { node.add_member("n4".to_string()).await }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let err = node
        .add_member("n5".to_string())
        .await
        .expect_err("second change while one is pending");
    assert_eq!(
        err.to_string(),
        "membership change refused: adding controller 4 at n4 is still pending"
    );
    c.net.heal();
    assert_eq!(first.await.expect("task").expect("first change"), 4);
    c.start(4, Bootstrap::Join);
    let err = node.add_member("n2".to_string()).await.expect_err("dup");
    assert_eq!(
        err.to_string(),
        "membership change refused: address n2 already belongs to controller 2"
    );
    let err = node.remove_member(9).await.expect_err("unknown");
    assert_eq!(
        err.to_string(),
        "membership change refused: controller 9 is not a member"
    );
    // Remove a follower; the rest carry on, and its id is never reused.
    let victim = *c.ids().iter().find(|&&i| i != leader).unwrap();
    node.remove_member(victim).await.expect("remove");
    c.kill(victim);
    let ids = c.ids();
    let index = c.write(&ids, "after-remove", "1").await;
    c.wait_applied(&ids, index).await;
    for &id in &ids {
        let members: Vec<u64> = c.node(id).status().members.iter().map(|m| m.id).collect();
        assert!(
            !members.contains(&victim),
            "{id} still lists {victim}: {members:?}"
        );
        assert_eq!(members.len(), 3);
        // Its messages would now be refused as a removed member's; a
        // member's own id and one never handed out are not removed.
        let node = c.node(id);
        assert!(node.was_removed(victim), "{id} knows {victim} was removed");
        assert!(!node.was_removed(id));
        assert!(!node.was_removed(99));
    }
    let leader = c.wait_leader(&ids).await;
    assert_eq!(
        c.node(leader)
            .add_member("n6".to_string())
            .await
            .expect("add"),
        5,
        "ids are never reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_new_cluster_from_one_survivor_keeps_the_data() {
    let mut c = TestCluster::grow(3).await;
    let ids = c.ids();
    let mut last = 0;
    for i in 0..10 {
        last = c.write(&ids, &format!("f{i}"), "1").await;
    }
    c.wait_applied(&ids, last).await;
    // Two of three are lost for good.
    let survivor = 3;
    for id in [1, 2] {
        c.kill(id);
    }
    c.kill(survivor);
    let node = c.start(survivor, Bootstrap::ForceNewCluster);
    assert_eq!(c.wait_leader(&[survivor]).await, survivor);
    for i in 0..10 {
        assert_eq!(value(&node, &format!("f{i}")).as_deref(), Some("1"));
    }
    let members: Vec<u64> = node.status().members.iter().map(|m| m.id).collect();
    assert_eq!(members, [survivor]);
    let index = c.write(&[survivor], "recovered", "1").await;
    assert!(index > last);
    // It restarts as the 1-member cluster it now is, and can grow again.
    c.kill(survivor);
    let node = c.start(survivor, Bootstrap::Restart);
    c.wait_leader(&[survivor]).await;
    assert_eq!(value(&node, "recovered").as_deref(), Some("1"));
    let id = node.add_member("n-new".to_string()).await.expect("add");
    assert_eq!(id, 4, "ids of the lost members are not reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_member_keeps_the_state() {
    let mut c = TestCluster::grow(3).await;
    let ids = c.ids();
    let mut last = 0;
    for i in 0..15 {
        last = c.write(&ids, &format!("r{i}"), "1").await;
    }
    c.wait_applied(&ids, last).await;
    let before = state_bytes(&c.node(1));
    for &id in &ids {
        c.kill(id);
    }
    for &id in &ids {
        c.start(id, Bootstrap::Restart);
    }
    let leader = c.wait_leader(&ids).await;
    for &id in &ids {
        assert_same_state(&state_bytes(&c.node(id)), &before, &format!("member {id}"));
    }
    let index = c.write(&ids, "again", "1").await;
    c.wait_applied(&ids, index).await;
    assert_eq!(value(&c.node(leader), "r14").as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_three_five_and_seven_members_elect() {
    for n in [1, 3, 5, 7] {
        let c = TestCluster::grow(n).await;
        let ids = c.ids();
        let index = c.write(&ids, "k", &n.to_string()).await;
        c.wait_applied(&ids, index).await;
        for &id in &ids {
            assert_eq!(c.node(id).status().members.len(), n as usize);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_and_delays_lose_nothing_acknowledged() {
    let c = TestCluster::grow(3).await;
    let ids = c.ids();
    {
        let mut s = c.net.state.lock().unwrap();
        s.drop_one_in = 10;
        s.delay = Duration::from_millis(3);
    }
    let mut acked = Vec::new();
    for i in 0..30 {
        c.write(&ids, &format!("d{i}"), "1").await;
        acked.push(i);
    }
    {
        let mut s = c.net.state.lock().unwrap();
        s.drop_one_in = 0;
        s.delay = Duration::ZERO;
    }
    let last = c.write(&ids, "end", "1").await;
    c.wait_applied(&ids, last).await;
    let want = state_bytes(&c.node(1));
    for &id in &ids {
        assert_same_state(&state_bytes(&c.node(id)), &want, &format!("member {id}"));
        for i in &acked {
            assert_eq!(value(&c.node(id), &format!("d{i}")).as_deref(), Some("1"));
        }
    }
}

/// The target with the production timings (50 ms ticks, elections
/// after 0.5–1 s): writes are accepted again within 1.5 s of the leader's
/// death, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_within_one_and_a_half_seconds_of_the_leader_dying() {
    let mut c = TestCluster::empty();
    let dir = c.dir.path().to_path_buf();
    let prod = |id: u64| RaftConfig::new(id, format!("n{id}"), dir.join(format!("n{id}")));
    c.start_with(prod(1), Bootstrap::NewCluster);
    c.wait_leader(&[1]).await;
    for id in [2, 3] {
        assert_eq!(
            c.node(1).add_member(format!("n{id}")).await.expect("add"),
            id
        );
        c.start_with(prod(id), Bootstrap::Join);
        let applied = c.node(1).applied();
        c.wait_applied(&[id], applied).await;
    }
    let ids = c.ids();
    let mut figures = Vec::new();
    for round in 0..3 {
        let old = c.wait_leader(&ids).await;
        c.write(&ids, &format!("before{round}"), "1").await;
        c.kill(old);
        let killed = Instant::now();
        let rest: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
        let index = c.write(&rest, &format!("after{round}"), "1").await;
        figures.push(killed.elapsed());
        c.start_with(prod(old), Bootstrap::Restart);
        c.wait_applied(&[old], index).await;
    }
    eprintln!("writes resumed after leader kill: {figures:?}");
    for f in &figures {
        assert!(*f < Duration::from_millis(1500), "{figures:?}");
    }
}

#[tokio::test]
async fn single_node_store_data_becomes_a_one_member_cluster() {
    let mut c = TestCluster::empty();
    let dir = c.dir.path().join("n1");
    {
        let mut store =
            crate::store::Store::open(&dir, crate::store::StoreConfig::default()).expect("store");
        store.propose(&write_cmd("old", "1")).expect("propose");
        store.propose(&write_cmd("older", "2")).expect("propose");
    }
    let node = c.start(1, Bootstrap::NewCluster);
    c.wait_leader(&[1]).await;
    assert_eq!(value(&node, "old").as_deref(), Some("1"));
    assert_eq!(value(&node, "older").as_deref(), Some("2"));
    let index = c.write(&[1], "new", "3").await;
    assert!(index > 3, "{index}");
    assert_eq!(node.status().members.len(), 1);
    // A joining controller refuses such data instead of forking it.
    let other = c.dir.path().join("n2");
    {
        let mut store =
            crate::store::Store::open(&other, crate::store::StoreConfig::default()).expect("store");
        store.propose(&write_cmd("x", "1")).expect("propose");
    }
    let transport = Arc::new(NetTransport {
        from: 2,
        net: Arc::downgrade(&c.net),
    });
    let err = RaftNode::start(config(2, c.dir.path()), Bootstrap::Join, transport)
        .expect_err("join with data");
    assert!(
        err.to_string()
            .contains("a joining controller needs an empty data directory"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_leader_moves_leadership_first() {
    let mut c = TestCluster::grow(3).await;
    let ids = c.ids();
    let old = c.wait_leader(&ids).await;
    let err = c.node(old).remove_member(old).await.expect_err("leader");
    let RaftError::LeadershipMoving { id, to } = &err else {
        panic!("{err}");
    };
    assert_eq!(*id, old);
    assert_eq!(to.1, format!("n{}", to.0));
    let rest: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
    let deadline = Instant::now() + WAIT;
    while c.node(to.0).status().role != Role::Leader {
        assert!(Instant::now() < deadline, "leadership never moved");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let new = c.wait_leader(&ids).await;
    assert_eq!(new, to.0, "leadership went where the error said");
    c.node(new)
        .remove_member(old)
        .await
        .expect("remove the old leader");
    c.kill(old);
    let index = c.write(&rest, "after", "1").await;
    c.wait_applied(&rest, index).await;
    assert_eq!(c.node(new).status().members.len(), 2);
}

/// Writes through whichever of `nodes` leads; None once `deadline` passes.
async fn write_anywhere(nodes: &[RaftNode], key: &str, deadline: Instant) -> Option<u64> {
    while Instant::now() < deadline {
        for node in nodes {
            if node.status().role != Role::Leader {
                continue;
            }
            if let Ok(results) = node.propose(vec![write_cmd(key, "1")]).await {
                return Some(results[0].0);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_during_concurrent_writes_loses_no_acknowledged_write() {
    let mut c = TestCluster::grow(3).await;
    let ids = c.ids();
    let nodes: Vec<RaftNode> = ids.iter().map(|&i| c.node(i)).collect();
    let stop = Instant::now() + Duration::from_millis(1500);
    let mut clients = Vec::new();
    for client in 0..4 {
        let nodes = nodes.clone();
        clients.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while Instant::now() < stop {
                let key = format!("w{client}-{i}");
                if write_anywhere(&nodes, &key, stop + WAIT).await.is_some() {
                    acked.push(key);
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old = c.wait_leader(&ids).await;
    c.kill(old);
    let mut acked = Vec::new();
    for t in clients {
        acked.extend(t.await.expect("client"));
    }
    let rest: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
    let last = c.write(&rest, "end", "1").await;
    c.wait_applied(&rest, last).await;
    assert!(acked.len() > 20, "only {} writes acknowledged", acked.len());
    for &id in &rest {
        for key in &acked {
            assert_eq!(
                value(&c.node(id), key).as_deref(),
                Some("1"),
                "{key} lost on {id}"
            );
        }
    }
    // The killed leader comes back with every acknowledged write too.
    let back = c.start(old, Bootstrap::Restart);
    c.wait_applied(&[old], last).await;
    for key in &acked {
        assert_eq!(
            value(&back, key).as_deref(),
            Some("1"),
            "{key} lost on {old}"
        );
    }
}
