//! Replicated controllers end to end (issue 4): a real dev cluster of three
//! `gantry controller`s (c1 a new cluster, c2 and c3 `--join`ed) and two
//! agents, each host its own network namespace, checked through the CLI as
//! a user would.
//!
//! One cluster, several checks, in order: the membership table; a deploy
//! through a follower, and `service logs` and `exec` through it (proxied to
//! the leader); kill -9 of the leader under a `deploy --wait` that talks to
//! it (a new leader is measured and must come within 1.5 s, the waiting CLI
//! goes on with another controller mid-command and sees the deploy
//! finished by the new leader, a write issued at the kill with the dead
//! leader first in its list succeeds, the deployed tasks are not restarted
//! and no node is marked down; the killed controller restarts and catches
//! up); then a partition of the (new) leader (it refuses writes with the
//! quorum message, the majority elects and takes writes, and after the heal
//! the old leader follows); last, that controller is removed while down,
//! and started again learns it from its peers and stops. Figures are
//! printed as `FIGURE ...`.
//!
//! The loopback test covers membership: join, removal (the removed
//! controller stops by itself and refuses its stale data), restart of all,
//! force-new-cluster, catch-up by snapshot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gantry_tests::cluster::{self, CONTROLLER_PORT, Cluster, ClusterConfig, wait_for};
use serde_json::Value;

/// Why these tests cannot run here, if they cannot.
fn prerequisites() -> Option<&'static str> {
    if let Some(reason) = gantry_tests::engine_test_prerequisites() {
        return Some(reason);
    }
    cluster::missing_network_tools()
}

/// The test images (`deploy/images/build-test-images.sh`), built once into
/// cargo's scratch directory under a name made of the inputs' digest, so
/// the deploy tests' build is reused (same scheme as tests/tests/deploy.rs).
fn test_images() -> &'static Path {
    static IMAGES: OnceLock<PathBuf> = OnceLock::new();
    IMAGES.get_or_init(|| {
        gantry_tests::image_fixtures::test_images_in(Path::new(env!("CARGO_TARGET_TMPDIR")))
    })
}

/// `web` says where it runs in its log (for `service logs` through a
/// follower), then serves as the image does.
const APP: &str = "
services:
  web:
    image: gantry.test/web:latest
    command: [\"sh\", \"-c\", \"echo web up on $$(hostname); exec httpd -f -v -p 80 -h /www\"]
    deploy:
      replicas: 2
";

/// A `gantry` command running in the background, killed (by its own
/// handle: only what this test started) when dropped; its stderr goes to a
/// file that the test reads while it runs.
struct Background {
    child: std::process::Child,
    stderr: PathBuf,
}

impl Background {
    /// Starts `gantry --controller CONTROLLERS ARGS` from the root netns
    /// (the cluster's bridge is reachable from there).
    fn start(controllers: &str, args: &[&str], stderr: PathBuf) -> Background {
        let file = std::fs::File::create(&stderr).unwrap();
        let child = Command::new(gantry_tests::gantry_bin())
            .args(["--controller", controllers])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start gantry");
        Background { child, stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (bounded) for it to exit; its status and how long it ran
    /// since `since`.
    fn wait(&mut self, limit: Duration, since: Instant) -> (std::process::ExitStatus, Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, since.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "gantry still running after {limit:?}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Env {
    c: Cluster,
    files: tempfile::TempDir,
}

impl Env {
    fn address(&self, host: &str) -> String {
        format!("{}:{CONTROLLER_PORT}", self.c.host_addr(host).unwrap())
    }

    /// The CLI against every controller (failover), bounded.
    fn run(&self, args: &[&str]) -> Output {
        self.c
            .gantry_within(args, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("gantry {args:?}: {e}"))
    }

    /// The CLI against one controller only, run inside `from`'s namespace
    /// (so a partitioned host can still be asked over its own address).
    fn run_at(&self, from: &str, controller: &str, args: &[&str]) -> Output {
        let mut cmd = self
            .c
            .command_in(from, gantry_tests::gantry_bin().to_str().unwrap())
            .unwrap();
        cmd.args(["--controller", controller]).args(args);
        cluster::output_within(cmd, Duration::from_secs(30)).unwrap()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for h in ["c1", "c2", "c3", "n1", "n2"] {
            out.push_str(&format!("\n--- {h}:\n{}", self.c.log_tail(h, 15)));
        }
        out
    }

    fn ok(&self, out: Output, what: &str) -> String {
        assert!(
            out.status.success(),
            "{what} exited {:?}: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        let text = self.ok(self.run(&full), &format!("gantry {full:?}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("gantry {full:?}: {e}: {text}"))
    }

    /// `cluster controllers -o json` asked of `host` (from its namespace).
    fn controllers_at(&self, host: &str) -> Option<Value> {
        let out = self.run_at(
            host,
            &self.address(host),
            &["cluster", "controllers", "-o", "json"],
        );
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The leader's host name as `host` sees it.
    fn leader_at(&self, host: &str) -> Option<String> {
        let list = self.controllers_at(host)?;
        let address = list["controllers"]
            .as_array()?
            .iter()
            .find(|c| c["leader"] == true)?["address"]
            .as_str()?
            .to_string();
        ["c1", "c2", "c3"]
            .into_iter()
            .find(|h| self.address(h) == address)
            .map(str::to_string)
    }

    /// The running tasks of `web`: task id → node id.
    fn web_tasks(&self) -> BTreeMap<String, String> {
        self.json(&["service", "ps", "app_web"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["desired_state"] == "running" && t["state"] == "running")
            .map(|t| {
                (
                    t["id"].as_str().unwrap().to_string(),
                    t["node"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// The web containers on the agents, with their PIDs: a restarted
    /// container has a new PID (or a new id).
    fn web_containers(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for host in ["n1", "n2"] {
            let data = self.c.host_data_dir(host).unwrap();
            let ps = self
                .c
                .command_in(host, gantry_tests::gantry_bin().to_str().unwrap())
                .unwrap()
                .args(["container", "ps", "-o", "json"])
                .env("GANTRY_DATA_DIR", &data)
                .stdin(Stdio::null())
                .output()
                .expect("container ps");
            for line in String::from_utf8_lossy(&ps.stdout).lines() {
                let Ok(c) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if c["name"].as_str().unwrap_or("").starts_with("app_web.") {
                    out.insert(
                        c["id"].as_str().unwrap_or("").to_string(),
                        c["pid"].as_i64().unwrap_or(0),
                    );
                }
            }
        }
        out
    }

    /// A small write through the CLI (a node label), at `controller` from
    /// `from`'s namespace.
    fn write_at(&self, from: &str, controller: &str, value: &str) -> Output {
        self.run_at(
            from,
            controller,
            &[
                "node",
                "update",
                "n1",
                "--label-add",
                &format!("probe={value}"),
            ],
        )
    }
}

/// A plain HTTP/1.1 GET on the cluster's bridge (the test's own network).
fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&address.parse().unwrap(), Duration::from_secs(2))
            .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

#[test]
fn three_controllers_fail_over_without_restarting_tasks() {
    if let Some(reason) = prerequisites() {
        println!("SKIPPED: {reason}");
        return;
    }
    let images = test_images();
    let mut config = ClusterConfig::new(gantry_tests::gantry_bin());
    config.name = cluster::unique_name("rc");
    config.controllers = 3;
    config.agents = 2;
    config.ready_timeout = Duration::from_secs(60);
    let c = Cluster::up(config).expect("3 controllers + 2 agents up");
    let env = Env {
        c,
        files: tempfile::Builder::new()
            .prefix("gantry-controllers-")
            .tempdir()
            .unwrap(),
    };

    // The table: one leader, two followers, everyone agrees.
    let list = env.json(&["cluster", "controllers"]);
    let roles: Vec<&str> = list["controllers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles.len(), 3, "{list}");
    assert_eq!(
        roles.iter().filter(|r| **r == "leader").count(),
        1,
        "{list}"
    );
    assert_eq!(
        roles.iter().filter(|r| **r == "follower").count(),
        2,
        "{list}"
    );
    let table = env.ok(env.run(&["cluster", "controllers"]), "cluster controllers");
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(" *"), "the leader is marked: {table}");
    let leader = env.leader_at("c1").expect("c1 knows the leader");
    let follower = ["c1", "c2", "c3"]
        .into_iter()
        .find(|h| *h != leader)
        .unwrap();
    // Metrics for graphs: in the JSON listing and on /metrics.
    assert!(list["metrics"]["term"].as_u64().unwrap_or(0) >= 1, "{list}");
    let metrics = http_get(&env.address(&leader), "/metrics");
    assert!(metrics.contains("gantry_raft_is_leader 1"), "{metrics}");
    assert!(
        metrics.contains("gantry_raft_proposal_latency_seconds_bucket"),
        "{metrics}"
    );

    // A deploy through a follower.
    let web = images.join("web.tar");
    env.ok(
        env.run(&["image", "load", web.to_str().unwrap()]),
        "image load",
    );
    let app = env.files.path().join("app.yaml");
    std::fs::write(&app, APP).unwrap();
    let through = env.address(follower);
    let out = env.run_at(
        follower,
        &through,
        &["deploy", "-p", "app", "-f", app.to_str().unwrap()],
    );
    env.ok(out, "deploy through a follower");
    // Read-your-writes on the follower.
    let ls = env.run_at(follower, &through, &["service", "ls", "-o", "json"]);
    assert!(
        env.ok(ls, "service ls on the follower").contains("\"web\""),
        "the follower lists the service it forwarded"
    );
    let mut tasks = BTreeMap::new();
    wait_for("web to run 2 tasks", Duration::from_secs(40), || {
        tasks = env.web_tasks();
        tasks.len() == 2
    })
    .unwrap_or_else(|e| panic!("{e}{}", env.logs()));
    let containers = env.web_containers();
    assert_eq!(containers.len(), 2, "{containers:?}");

    // Logs and exec through a follower: it proxies them to the leader,
    // where the agents' sessions are.
    let mut logs = String::new();
    wait_for(
        "both tasks' lines in service logs through a follower",
        Duration::from_secs(15),
        || {
            let out = env.run_at(follower, &through, &["service", "logs", "app_web"]);
            logs = String::from_utf8_lossy(&out.stdout).into_owned();
            out.status.success() && logs.matches("web up on").count() == 2
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {logs}{}", env.logs()));
    let out = env.run_at(
        follower,
        &through,
        &[
            "exec",
            "app_web",
            "--",
            "sh",
            "-c",
            "echo via-follower; exit 3",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "exec through a follower: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "via-follower\n");

    // kill -9 the leader right after it acknowledged a second deploy (its
    // tasks not yet placed or started): a new leader within 1.5 s, writes
    // accepted again, and the new leader finishes the deploy.
    let mut c = env;
    let killed = leader.clone();
    let survivors: Vec<&str> = ["c1", "c2", "c3"]
        .into_iter()
        .filter(|h| *h != killed)
        .collect();
    let inflight = c.files.path().join("inflight.yaml");
    std::fs::write(
        &inflight,
        "services:\n  web:\n    image: gantry.test/web:latest\n    deploy:\n      replicas: 2\n",
    )
    .unwrap();
    // The deploy goes to the leader (first in the list) and waits there
    // for its tasks: once it says it is waiting, the deploy is
    // acknowledged, and the leader dies under the wait (the CLI must go on
    // with another controller, mid-command).
    let all_from_killed = std::iter::once(killed.as_str())
        .chain(survivors.iter().copied())
        .map(|h| c.address(h))
        .collect::<Vec<_>>()
        .join(",");
    let mut waiting = Background::start(
        &all_from_killed,
        &[
            "deploy",
            "-p",
            "late",
            "-f",
            inflight.to_str().unwrap(),
            "--wait",
            "--timeout",
            "40s",
        ],
        c.files.path().join("deploy-wait.err"),
    );
    wait_for(
        "the deploy to be acknowledged and wait",
        Duration::from_secs(20),
        || waiting.stderr().contains("late_web: "),
    )
    .unwrap_or_else(|e| panic!("{e}: {}{}", waiting.stderr(), c.logs()));
    let start = Instant::now();
    c.c.kill(&killed).unwrap();
    // A write issued right after the kill, with the dead leader first in
    // its list: the CLI retries on the others until the new leader takes it.
    let mut during = Background::start(
        &all_from_killed,
        &["node", "update", "n1", "--label-add", "during=failover"],
        c.files.path().join("during.err"),
    );
    let mut new_leader = None;
    wait_for("a new leader", Duration::from_secs(10), || {
        new_leader = survivors
            .iter()
            .find_map(|h| c.leader_at(h).filter(|l| *l != killed));
        new_leader.is_some()
    })
    .unwrap_or_else(|e| panic!("{e}{}", c.logs()));
    let elected = start.elapsed();
    let new_leader = new_leader.unwrap();
    let mut n = 0;
    wait_for(
        "a write after the failover",
        Duration::from_secs(10),
        || {
            n += 1;
            c.write_at(survivors[0], &c.address(survivors[0]), &format!("k{n}"))
                .status
                .success()
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", c.logs()));
    let writable = start.elapsed();
    let (status, cli_write) = during.wait(Duration::from_secs(15), start);
    assert!(
        status.success(),
        "a write issued during the failover fails over: {}",
        during.stderr()
    );
    println!(
        "FIGURE leader kill -9 -> new leader {new_leader} seen after {} ms, writes accepted after {} ms, \
         a CLI write issued at the kill done after {} ms ({} failovers mid-request)",
        elected.as_millis(),
        writable.as_millis(),
        cli_write.as_millis(),
        during.stderr().matches("going on with").count()
    );
    assert!(
        elected <= Duration::from_millis(1500),
        "a new leader took {elected:?} (target 1.5 s)"
    );

    // The CLI fails over (its list starts with c1, which may be the dead one).
    let services = c.json(&["service", "ls"]);
    assert_eq!(services.as_array().unwrap().len(), 2, "{services}");
    // The waiting deploy went on with another controller and saw its tasks
    // run.
    let (status, _) = waiting.wait(Duration::from_secs(40), start);
    assert!(
        status.success(),
        "deploy --wait fails over mid-command: {}{}",
        waiting.stderr(),
        c.logs()
    );
    assert!(
        waiting.stderr().contains("going on with"),
        "the CLI says it moved on: {}",
        waiting.stderr()
    );
    let n1 = c.json(&["node", "inspect", "n1"]);
    assert_eq!(n1["labels"]["during"], "failover", "{n1}");
    // The deploy in flight when the leader died runs to the end.
    wait_for("late_web to run 2 tasks", Duration::from_secs(30), || {
        c.json(&["service", "ps", "late_web"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["desired_state"] == "running" && t["state"] == "running")
            .count()
            == 2
    })
    .unwrap_or_else(|e| panic!("{e}{}", c.logs()));

    // No task restarted and no node marked down, past a whole lease.
    std::thread::sleep(Duration::from_secs(4));
    let nodes = c.c.node_statuses().unwrap();
    assert!(
        nodes.values().all(|s| s == "ready"),
        "every node stays ready across the failover: {nodes:?}"
    );
    assert_eq!(
        c.web_tasks(),
        tasks,
        "the same tasks run after the failover{}",
        c.logs()
    );
    assert_eq!(
        c.web_containers(),
        containers,
        "the same containers (ids and PIDs) run after the failover"
    );

    // The killed controller restarts (same data: a restart, not a join) and
    // catches up with the leader.
    c.c.start(&killed).unwrap();
    wait_for(
        "the restarted controller to follow and catch up",
        Duration::from_secs(15),
        || {
            let Some(list) = c.controllers_at(&killed) else {
                return false;
            };
            let me = list["controllers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["answered"] == true)
                .cloned()
                .unwrap_or(Value::Null);
            me["role"] == "follower"
                && list["controllers"].as_array().map_or(0, Vec::len) == 3
                && me["applied"].as_u64().unwrap_or(0)
                    >= list["commit_index"].as_u64().unwrap_or(u64::MAX)
                && c.leader_at(&killed).as_deref() == Some(new_leader.as_str())
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", c.logs()));

    // Partition the leader: it refuses writes with the quorum message, the
    // majority elects and takes writes, the heal makes it a follower.
    let isolated = new_leader.clone();
    let majority: Vec<&str> = ["c1", "c2", "c3"]
        .into_iter()
        .filter(|h| *h != isolated)
        .collect();
    c.c.partition(&isolated).unwrap();
    let own = c.address(&isolated);
    let mut refusal = String::new();
    wait_for(
        "the partitioned leader to refuse writes",
        Duration::from_secs(10),
        || {
            let out = c.write_at(&isolated, &own, "cut");
            refusal = String::from_utf8_lossy(&out.stderr).into_owned();
            !out.status.success() && refusal.contains("no quorum")
        },
    )
    .unwrap_or_else(|e| panic!("{e}: last answer {refusal}{}", c.logs()));
    assert!(
        refusal.contains("1 of 3 controllers reachable"),
        "the refusal counts the reachable controllers: {refusal}"
    );
    let start = Instant::now();
    let out = c.write_at(&isolated, &own, "cut2");
    assert!(!out.status.success());
    assert!(
        start.elapsed() <= Duration::from_millis(2500),
        "a refused write fails fast, took {:?}",
        start.elapsed()
    );
    let mut majority_leader = None;
    wait_for("the majority to elect", Duration::from_secs(10), || {
        majority_leader = c
            .leader_at(majority[0])
            .filter(|l| *l != isolated && majority.contains(&l.as_str()));
        majority_leader.is_some()
    })
    .unwrap_or_else(|e| panic!("{e}{}", c.logs()));
    let out = c.write_at(majority[0], &c.address(majority[0]), "majority");
    c.ok(out, "a write on the majority side");
    c.c.heal(&isolated).unwrap();
    let majority_leader = majority_leader.unwrap();
    wait_for(
        "the healed controller to follow the new leader",
        Duration::from_secs(15),
        || c.leader_at(&isolated).as_deref() == Some(majority_leader.as_str()),
    )
    .unwrap_or_else(|e| panic!("{e}{}", c.logs()));
    // It has the majority's write (no divergence): its list shows the label.
    let out = c.run_at(&isolated, &own, &["node", "inspect", "n1", "-o", "json"]);
    let node = c.ok(out, "node inspect on the healed controller");
    assert!(node.contains("majority"), "{node}");
    assert!(
        !node.contains("cut"),
        "a refused write is not applied: {node}"
    );

    // Remove that controller while it is down, so that it never gets its
    // removal entry (a partition would not do: TCP delivers what the
    // leader sent before it stopped replicating to it): started again, it
    // campaigns, its peers refuse it as a removed member, and it stops
    // saying why.
    c.c.kill(&isolated).unwrap();
    let out = c.run_at(
        &majority_leader,
        &c.address(&majority_leader),
        &["cluster", "remove-controller", &own],
    );
    c.ok(out, "remove-controller of a controller that is down");
    c.c.start(&isolated).unwrap();
    let healed = Instant::now();
    wait_for(
        "the removed controller to stop",
        Duration::from_secs(15),
        || {
            c.c.status()
                .iter()
                .any(|h| h.name == isolated && h.process == cluster::ProcessState::Killed)
        },
    )
    .unwrap_or_else(|e| panic!("{e}{}", c.logs()));
    println!(
        "FIGURE a controller removed while down stopped {} ms after it was started again",
        healed.elapsed().as_millis()
    );
    let log = c.c.log_tail(&isolated, 10);
    assert!(
        log.contains("this controller was removed from the cluster (id")
            && log.contains("a peer says this controller was removed"),
        "it learnt it from its peers: {log}"
    );
    let list = c.json(&["cluster", "controllers"]);
    assert_eq!(list["controllers"].as_array().unwrap().len(), 2, "{list}");
}

/// `gantry controller` processes on loopback, killed (SIGKILL, by the
/// child handle: only what this test started) when dropped.
struct Controllers {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    children: Vec<Option<std::process::Child>>,
}

impl Controllers {
    fn new(n: usize) -> Controllers {
        // Free ports: bound by the kernel, then released for the controller.
        let ports = (0..n)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        Controllers {
            dir: tempfile::Builder::new()
                .prefix("gantry-raft-loopback-")
                .tempdir()
                .unwrap(),
            ports,
            children: (0..n).map(|_| None).collect(),
        }
    }

    fn address(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    fn start(&mut self, i: usize, extra: &[&str]) {
        let data = self.dir.path().join(format!("c{i}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("c{i}.log")))
            .unwrap();
        let child = Command::new(gantry_tests::gantry_bin())
            .args(["controller", "--listen", &self.address(i), "--data-dir"])
            .arg(&data)
            .args(extra)
            .env("GANTRY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start gantry controller");
        self.children[i] = Some(child);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (bounded) for controller `i` to exit by itself.
    fn wait_exit(&mut self, i: usize, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.children[i].as_mut().expect("started");
            if let Some(status) = child.try_wait().unwrap() {
                self.children[i] = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "c{i} still running after {limit:?}{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Controller `i`'s whole log.
    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("c{i}.log"))).unwrap_or_default()
    }

    fn cli(&self, i: usize, args: &[&str]) -> Output {
        let mut cmd = Command::new(gantry_tests::gantry_bin());
        cmd.args(["--controller", &self.address(i)]).args(args);
        cluster::output_within(cmd, Duration::from_secs(20)).unwrap()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..self.ports.len() {
            let text = std::fs::read_to_string(self.dir.path().join(format!("c{i}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "\n--- c{i}:\n{}",
                lines[lines.len().saturating_sub(10)..].join("\n")
            ));
        }
        out
    }

    /// `cluster controllers -o json` of controller `i`, once it answers.
    fn list(&self, i: usize) -> Option<Value> {
        let out = self.cli(i, &["cluster", "controllers", "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Waits until controller `i` sees `members` members and a leader.
    fn wait_members(&self, i: usize, members: usize) {
        let mut last = Value::Null;
        wait_for(
            &format!("c{i} to see {members} members and a leader"),
            Duration::from_secs(20),
            || {
                last = self.list(i).unwrap_or(Value::Null);
                last["controllers"].as_array().map_or(0, Vec::len) == members
                    && last["leader_id"].as_u64().unwrap_or(0) != 0
            },
        )
        .unwrap_or_else(|e| panic!("{e}: last {last}{}", self.logs()));
    }

    fn ok(&self, out: Output, what: &str) -> String {
        assert!(
            out.status.success(),
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Controllers {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

/// Membership and recovery with controller processes on loopback (no
/// namespaces needed): join through a follower, remove a controller (it
/// stops by itself and refuses to start again on its data),
/// restart every controller at once with the state intact, disaster
/// recovery with --force-new-cluster from one survivor, and `cluster init`
/// refusing a data directory that holds a cluster.
#[test]
fn membership_restart_all_and_force_new_cluster() {
    if !gantry_tests::gantry_bin().exists() {
        println!("SKIPPED: build the gantry binary first (cargo build --bin gantry)");
        return;
    }
    let mut c = Controllers::new(3);
    c.start(0, &[]);
    c.wait_members(0, 1);
    let first = c.address(0);
    c.start(1, &["--join", &first]);
    c.wait_members(0, 2);
    // Joining through a follower: it passes the request to the leader.
    let second = c.address(1);
    c.start(2, &["--join", &second]);
    c.wait_members(0, 3);
    // A member knows the others once the leader's snapshot or log reached
    // it (a moment after the join is acknowledged).
    c.wait_members(1, 3);
    c.wait_members(2, 3);

    // A write through a follower, read back on every member.
    let stack = c.dir.path().join("keep.yaml");
    std::fs::write(
        &stack,
        "services:\n  web:\n    image: gantry.test/web:latest\n    deploy:\n      replicas: 2\n",
    )
    .unwrap();
    let out = c.cli(2, &["deploy", "-p", "keep", "-f", stack.to_str().unwrap()]);
    c.ok(out, "deploy through c2");
    for i in 0..3 {
        let ls = c.ok(c.cli(i, &["service", "ls", "-o", "json"]), "service ls");
        assert!(ls.contains("\"keep\""), "c{i}: {ls}");
    }

    // Remove c2 (by address): it stops by itself, saying why, and refuses
    // to start again on its stale data; two members remain.
    let third = c.address(2);
    let out = c.cli(0, &["cluster", "remove-controller", &third]);
    c.ok(out, "cluster remove-controller");
    let removed = "this controller was removed from the cluster (id 3); its data in";
    let asked = Instant::now();
    let status = c.wait_exit(2, Duration::from_secs(15));
    println!(
        "FIGURE removed controller stopped {} ms after remove-controller returned",
        asked.elapsed().as_millis()
    );
    assert!(!status.success(), "{status:?}");
    assert!(c.log(2).contains(removed), "{}", c.logs());
    std::fs::remove_file(c.dir.path().join("c2.log")).unwrap();
    c.start(2, &[]);
    let status = c.wait_exit(2, Duration::from_secs(15));
    assert!(!status.success(), "{status:?}");
    let log = c.log(2);
    assert!(
        log.contains(removed) && log.contains("is stale"),
        "a restart on the removed member's data is refused: {log}"
    );
    c.wait_members(0, 2);

    // Restart every controller at once: same members, same state.
    c.kill(0);
    c.kill(1);
    c.start(0, &[]);
    c.start(1, &["--join", &first]);
    c.wait_members(0, 2);
    let ls = c.ok(c.cli(1, &["service", "ls", "-o", "json"]), "service ls");
    assert!(
        ls.contains("\"keep\""),
        "state intact after restarting all: {ls}"
    );

    // Lose the majority for good: c0 alone cannot write...
    c.kill(1);
    let out = c.cli(0, &["service", "scale", "keep_web=3"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no quorum"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...until it is restarted as a new one-member cluster from its data.
    c.kill(0);
    c.start(0, &["--force-new-cluster"]);
    c.wait_members(0, 1);
    let out = c.cli(0, &["service", "scale", "keep_web=3"]);
    c.ok(out, "a write after --force-new-cluster");
    let ls = c.ok(c.cli(0, &["service", "ls", "-o", "json"]), "service ls");
    assert!(ls.contains("\"keep\""), "{ls}");

    // A new member of a cluster whose log was compacted catches up by
    // snapshot (the leader snapshots every 20 entries here).
    c.kill(0);
    c.start(0, &["--snapshot-every", "20"]);
    c.wait_members(0, 1);
    for n in 1..=30 {
        let out = c.cli(0, &["service", "scale", &format!("keep_web={}", n % 5 + 1)]);
        c.ok(out, "service scale");
    }
    let out = c.cli(0, &["service", "scale", "keep_web=7"]);
    c.ok(out, "service scale");
    let _ = std::fs::remove_dir_all(c.dir.path().join("c1"));
    c.start(1, &["--join", &first]);
    c.wait_members(1, 2);
    let ls = c.ok(
        c.cli(1, &["service", "ls", "-o", "json"]),
        "service ls on c1",
    );
    assert!(ls.contains("\"keep\""), "{ls}");
    let inspect = c.ok(
        c.cli(1, &["service", "inspect", "keep_web", "-o", "json"]),
        "service inspect on c1",
    );
    assert!(inspect.contains("\"replicas\": 7"), "{inspect}");
    let leader_log = std::fs::read_to_string(c.dir.path().join("c0.log")).unwrap_or_default();
    assert!(
        leader_log
            .lines()
            .any(|l| l.contains("snapshot sent") && l.contains("delivered=true")),
        "the new member caught up by snapshot{}",
        c.logs()
    );

    // `cluster init` refuses a data directory that holds a cluster.
    let out = Command::new(gantry_tests::gantry_bin())
        .args(["cluster", "init", "--listen", "127.0.0.1:1", "--data-dir"])
        .arg(c.dir.path().join("c0"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already holds a cluster"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
