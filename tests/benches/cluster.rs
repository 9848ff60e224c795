//! Control-plane benchmark: a real 3-agent dev cluster (`gantry_tests::cluster`)
//! measured against the figures Docker Swarm gave on this machine.
//!
//! Run: `cargo bench -p gantry-tests --bench cluster` as root. It first brings
//! the release `gantry` binary up to date (`cargo build --release --bin
//! gantry`; or measures `GANTRY_BIN`), and takes a few minutes.
//!
//! Measured (times are seen by a client of the controller's `Events` stream,
//! the way `gantry service ls` would see them, so they include the agents'
//! reports):
//! - `deploy`: `gantry deploy` of one service with 100 replicas of
//!   `gantry.test/busybox` → all 100 tasks running; with `network_mode: host`
//!   and with the default bridge network; the stack is removed between rounds
//!   (every task terminal, every container removed on the agents); the first
//!   round of each mode is a warm-up (the image pulled through the
//!   controller's registry, the bridges created); also timed: when the last
//!   replica was assigned, accepted by its agent and starting;
//! - `restart`: SIGKILL of a running task's container main process → the task
//!   running again with its restart counted (and the container's new main
//!   process alive, as the node sees it); different tasks, default policy;
//! - `lost_node`: a 6-replica service, one agent host partitioned (nftables)
//!   or its agent killed (-9) → 6 running replicas none of which is on it;
//!   default heartbeat and lease; the stack is redeployed between rounds so
//!   every round starts spread 2/2/2;
//! - `memory`: PSS (`/proc/PID/smaps_rollup`) of the controller and agent
//!   processes at 100 running tasks, the shims reported separately.
//!
//! Results: `bench-results/cluster.json` and `.md` at the workspace root, and
//! the table on stdout. Knobs: `GANTRY_BENCH_ROUNDS` (measured deploy rounds
//! per network mode, default 5), `GANTRY_BENCH_KILLS` (restarts, default 12),
//! `GANTRY_BENCH_LOST_ROUNDS` (rounds per fault, default 3).

use gantry_proto::v1 as pb;
use gantry_tests::bench::{env_usize, gantry_release_bin, git_commit, utc_now, workspace_root};
use gantry_tests::cluster::{self, Cluster, ClusterConfig, Role};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Replicas of the deploy benchmark (and tasks of the memory measurement).
const REPLICAS: usize = 100;

/// Replicas of the lost-node benchmark.
const LOST_REPLICAS: usize = 6;

/// How long any one convergence may take before the round counts as failed.
const CONVERGE_LIMIT: Duration = Duration::from_secs(90);

/// A workload that stays up and stops at once on SIGTERM (a bare `sleep` as
/// PID 1 ignores it, and every removal would wait the grace period). The
/// `sleep` runs in the background so that no process is forked while it runs.
const WORKLOAD: &str = "trap 'exit 0' TERM; sleep 3600 & wait";

/// Docker Swarm's figures, measured on this machine by the author
/// (Swarm cannot be installed here: no docker packages).
mod swarm {
    /// 100 replicas deployed → all running, seconds.
    pub const DEPLOY_S: f64 = 13.0;
    /// kill -9 → running again with Swarm's default 5 s restart delay, seconds.
    pub const RESTART_DEFAULT_S: f64 = 5.5;
    /// The same with `delay: 0s`.
    pub const RESTART_DELAY0_S: f64 = 0.65;
    /// A partitioned node's replicas running elsewhere, seconds.
    pub const LOST_NODE_S: f64 = 18.9;
    /// dockerd + containerd + shims at 100 tasks, MiB PSS.
    pub const MEMORY_MIB: f64 = 454.0;
}

/// The targets.
mod target {
    /// Deploy convergence, seconds.
    pub const DEPLOY_S: f64 = 2.0;
    /// Restart after kill -9, seconds.
    pub const RESTART_S: f64 = 0.2;
    /// Lost node, seconds.
    pub const LOST_NODE_S: f64 = 5.0;
    /// Controller + agents as a share of Swarm's memory.
    pub const MEMORY_SHARE: f64 = 0.10;
}

fn main() {
    if let Err(reason) = preflight() {
        println!("SKIPPED: {reason}");
        return;
    }
    let workspace = workspace_root();
    let gantry = gantry_release_bin(&workspace);
    let started = Instant::now();
    let scratch = tempfile::Builder::new()
        .prefix("gantry-bench-cluster-")
        .tempdir()
        .expect("temp dir");
    let images = scratch.path().join("images");
    run_ok(
        Command::new(workspace.join("deploy/images/build-test-images.sh")).arg(&images),
        "build-test-images.sh",
    );

    let mut config = ClusterConfig::new(&gantry);
    config.name = cluster::unique_name("bench");
    config.agents = 3;
    let mut c = Cluster::up(config).expect("dev cluster up");
    let up_s = started.elapsed().as_secs_f64();
    c.gantry_ok(&[
        "image",
        "load",
        &images.join("busybox.tar").display().to_string(),
    ]);
    let watcher = Watcher::start(&c.controller_endpoint()).expect("events client");
    let nodes = watcher.node_ids().expect("list nodes");

    let rounds = env_usize("GANTRY_BENCH_ROUNDS", 5);
    let bench = Bench {
        c: &c,
        w: &watcher,
        dir: scratch.path().to_path_buf(),
    };
    let mut deploy = Vec::new();
    let mut memory = Value::Null;
    let mut restart = Value::Null;
    for mode in [Network::Host, Network::Bridge] {
        let r = bench.deploy_rounds(mode, rounds);
        deploy.push(r);
        if mode == Network::Bridge {
            // 100 tasks are running now: weigh the processes, then kill some.
            memory = measure_memory(&c);
            restart = bench.restarts(env_usize("GANTRY_BENCH_KILLS", 12));
        }
        bench.remove("bench");
    }
    drop(bench);
    let lost = lost_node(
        &mut c,
        &watcher,
        scratch.path(),
        &nodes,
        env_usize("GANTRY_BENCH_LOST_ROUNDS", 3),
    );
    drop(watcher);
    let logs: Vec<(String, String)> = c
        .hosts_with(Role::Agent)
        .into_iter()
        .chain(c.hosts_with(Role::Controller))
        .map(|h| {
            let tail = c.log_tail(&h, 5);
            (h, tail)
        })
        .collect();
    let down = c.down().map_err(|e| e.to_string());

    let report = json!({
        "benchmark": "cluster",
        "date": utc_now(),
        "gantry_commit": git_commit(&workspace),
        "gantry_binary": gantry.display().to_string(),
        "machine": machine(),
        "cluster": {"controllers": 1, "agents": 3, "up_s": round2(up_s)},
        "elapsed_s": round2(started.elapsed().as_secs_f64()),
        "deploy": deploy,
        "restart": restart,
        "lost_node": lost,
        "memory": memory,
        "reference": {
            "what": "Docker Swarm, measured on this machine by the issue's author",
            "deploy_s": swarm::DEPLOY_S,
            "restart_default_delay_s": swarm::RESTART_DEFAULT_S,
            "restart_delay0_s": swarm::RESTART_DELAY0_S,
            "lost_node_s": swarm::LOST_NODE_S,
            "memory_mib": swarm::MEMORY_MIB,
        },
        "teardown": match &down { Ok(()) => Value::Null, Err(e) => json!(e) },
    });
    if let Err(e) = &down {
        println!("note: teardown: {e}");
        for (h, tail) in logs {
            println!("--- {h} log tail ---\n{tail}");
        }
    }
    let table = markdown(&report);
    gantry_tests::bench::write_figures(&workspace, "cluster", &report, &table);
}

/// Why the benchmark cannot run here, if it cannot.
fn preflight() -> Result<(), String> {
    if let Some(reason) = gantry_tests::engine_test_prerequisites() {
        return Err(reason.into());
    }
    match cluster::missing_network_tools() {
        Some(reason) => Err(format!("{reason} for the dev cluster")),
        None => Ok(()),
    }
}

/// Extends [`Cluster`] with a CLI call that must succeed.
trait GantryOk {
    /// `gantry ARGS` against the cluster; panics with its output on failure.
    fn gantry_ok(&self, args: &[&str]) -> String;
}

impl GantryOk for Cluster {
    fn gantry_ok(&self, args: &[&str]) -> String {
        let out = self
            .gantry_within(args, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("gantry {}: {e}", args.join(" ")));
        assert!(
            out.status.success(),
            "gantry {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// The controller's view, kept by a client of its Events stream.

/// The tasks as the controller has them, kept up to date from `Events` by a
/// background task; waits wake on every change and report when the change
/// that satisfied them arrived.
struct Watcher {
    rt: tokio::runtime::Runtime,
    client: pb::control_client::ControlClient<gantry_proto::tonic::transport::Channel>,
    view: Arc<(Mutex<View>, Condvar)>,
}

#[derive(Default)]
struct View {
    tasks: HashMap<String, pb::Task>,
    /// When each task last changed (since the watch began).
    updated: HashMap<String, Instant>,
    /// When each task was first seen in each state (indexed by the state's
    /// number), for the deploy's milestones.
    first_seen: HashMap<String, [Option<Instant>; 16]>,
    /// When the last change was applied.
    changed: Option<Instant>,
    /// Why the stream ended, if it did.
    error: Option<String>,
}

impl Watcher {
    fn start(endpoint: &str) -> Result<Watcher, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let url = format!("http://{endpoint}");
        let mut client = rt
            .block_on(pb::control_client::ControlClient::connect(url.clone()))
            .map_err(|e| format!("connect {url}: {e}"))?;
        // List first, then follow every change after the list's revision: a
        // consistent view with nothing missed in between.
        let list = rt
            .block_on(client.list_tasks(pb::TaskFilter {
                all: true,
                ..Default::default()
            }))
            .map_err(|e| format!("list tasks: {e}"))?
            .into_inner();
        let view = Arc::new((
            Mutex::new(View {
                tasks: list.tasks.into_iter().map(|t| (t.id.clone(), t)).collect(),
                ..View::default()
            }),
            Condvar::new(),
        ));
        let mut stream = rt
            .block_on(client.events(pb::EventsRequest {
                after_revision: list.revision,
                kinds: vec![pb::ObjectKind::Task as i32],
            }))
            .map_err(|e| format!("events: {e}"))?
            .into_inner();
        let shared = view.clone();
        rt.spawn(async move {
            let (lock, changed) = &*shared;
            loop {
                let next = stream.message().await;
                let mut v = lock.lock().unwrap();
                match next {
                    Ok(Some(event)) => {
                        if let Some(pb::event::Object::Task(task)) = event.object {
                            let now = Instant::now();
                            if event.action == pb::EventAction::Remove as i32 {
                                v.tasks.remove(&task.id);
                                v.updated.remove(&task.id);
                            } else {
                                v.updated.insert(task.id.clone(), now);
                                let state = task.status.as_ref().map_or(0, |s| s.state);
                                if let Ok(i) = usize::try_from(state) {
                                    let seen = v.first_seen.entry(task.id.clone()).or_default();
                                    if let Some(slot) = seen.get_mut(i) {
                                        slot.get_or_insert(now);
                                    }
                                }
                                v.tasks.insert(task.id.clone(), task);
                            }
                            v.changed = Some(now);
                        }
                    }
                    Ok(None) => v.error = Some("events stream ended".into()),
                    Err(e) => v.error = Some(format!("events stream: {e}")),
                }
                let done = v.error.is_some();
                drop(v);
                changed.notify_all();
                if done {
                    break;
                }
            }
        });
        Ok(Watcher { rt, client, view })
    }

    /// Node id by hostname.
    fn node_ids(&self) -> Result<HashMap<String, String>, String> {
        let mut client = self.client.clone();
        let list = self
            .rt
            .block_on(client.list_nodes(pb::ListNodesRequest {}))
            .map_err(|e| format!("list nodes: {e}"))?
            .into_inner();
        Ok(list
            .nodes
            .into_iter()
            .filter_map(|n| Some((n.status?.hostname, n.id)))
            .collect())
    }

    /// Waits until `done` holds for the tasks; returns when the change that
    /// made it hold arrived (or now, if it already held).
    fn wait_until(
        &self,
        limit: Duration,
        mut done: impl FnMut(&HashMap<String, pb::Task>) -> bool,
    ) -> Result<Instant, String> {
        let deadline = Instant::now() + limit;
        let (lock, changed) = &*self.view;
        let mut v = lock.lock().unwrap();
        let mut first = true;
        loop {
            if done(&v.tasks) {
                // Already true before any change: it holds as of now.
                return Ok(if first {
                    Instant::now()
                } else {
                    v.changed.unwrap_or_else(Instant::now)
                });
            }
            first = false;
            if let Some(e) = &v.error {
                return Err(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("not within {limit:?}: {}", summary(&v.tasks)));
            }
            v = changed.wait_timeout(v, left).unwrap().0;
        }
    }

    /// When task `id` last changed, if it is now as `holds` says.
    fn task_updated_when(
        &self,
        id: &str,
        holds: impl FnOnce(&pb::Task) -> bool,
    ) -> Option<Instant> {
        let v = self.view.0.lock().unwrap();
        let task = v.tasks.get(id)?;
        if holds(task) {
            v.updated.get(id).copied()
        } else {
            None
        }
    }

    /// For each of `states`, when the last of the running tasks had first
    /// reached that state or a later one (a task may skip a report).
    fn milestones(&self, states: &[pb::TaskState]) -> Vec<Option<Instant>> {
        let v = self.view.0.lock().unwrap();
        states
            .iter()
            .map(|state| {
                let from = *state as usize;
                let mut last: Option<Instant> = None;
                for t in v.tasks.values().filter(|t| is_running(t)) {
                    let seen = v.first_seen.get(&t.id)?;
                    let first = seen[from..=pb::TaskState::Running as usize]
                        .iter()
                        .flatten()
                        .min()?;
                    last = Some(last.map_or(*first, |l| l.max(*first)));
                }
                last
            })
            .collect()
    }

    /// A copy of the current tasks.
    fn tasks(&self) -> HashMap<String, pb::Task> {
        self.view.0.lock().unwrap().tasks.clone()
    }
}

fn is_running(t: &pb::Task) -> bool {
    t.desired_state() == pb::DesiredState::Running
        && t.status.as_ref().map(pb::TaskStatus::state) == Some(pb::TaskState::Running)
}

fn is_terminal(t: &pb::Task) -> bool {
    use pb::TaskState as S;
    matches!(
        t.status.as_ref().map(pb::TaskStatus::state),
        Some(S::Complete | S::Failed | S::Rejected | S::Shutdown | S::Orphaned)
    )
}

fn running(tasks: &HashMap<String, pb::Task>) -> usize {
    tasks.values().filter(|t| is_running(t)).count()
}

/// Task counts by state, for failure messages.
fn summary(tasks: &HashMap<String, pb::Task>) -> String {
    let mut by: std::collections::BTreeMap<String, usize> = Default::default();
    for t in tasks.values() {
        let state = t
            .status
            .as_ref()
            .map_or("none".to_string(), |s| format!("{:?}", s.state()));
        *by.entry(format!("{:?}/{state}", t.desired_state()))
            .or_default() += 1;
    }
    format!("tasks (desired/state): {by:?}")
}

// ---------------------------------------------------------------------------
// Deploy convergence and restarts.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Network {
    Host,
    Bridge,
}

impl Network {
    fn name(self) -> &'static str {
        match self {
            Network::Host => "host",
            Network::Bridge => "bridge",
        }
    }
}

/// The states whose arrival the deploy benchmark times, on the way to
/// running: placed by the scheduler, taken by the agent, container starting.
const MILESTONES: [pb::TaskState; 3] = [
    pb::TaskState::Assigned,
    pb::TaskState::Accepted,
    pb::TaskState::Starting,
];

/// What one deploy took, in seconds from the CLI's start.
struct Deployed {
    /// Until every replica ran.
    running_s: f64,
    /// Until `gantry deploy` returned.
    cli_s: f64,
    /// Until every replica had reached each of [`MILESTONES`].
    milestones: Vec<Option<f64>>,
}

struct Bench<'a> {
    c: &'a Cluster,
    w: &'a Watcher,
    dir: PathBuf,
}

/// A compose file of one busybox service named `sleep`.
fn compose(replicas: usize, network: Network) -> String {
    let net = match network {
        Network::Host => "    network_mode: host\n",
        Network::Bridge => "",
    };
    format!(
        "services:\n  sleep:\n    image: gantry.test/busybox:latest\n{net}    command: [\"sh\", \"-c\", \"{WORKLOAD}\"]\n    deploy:\n      replicas: {replicas}\n"
    )
}

impl Bench<'_> {
    /// Deploys `replicas` of the sleep service as `stack` and returns the
    /// seconds until all run (and until the CLI returned).
    fn deploy(&self, stack: &str, replicas: usize, network: Network) -> Result<Deployed, String> {
        let file = self.dir.join(format!("{stack}-{}.yaml", network.name()));
        std::fs::write(&file, compose(replicas, network)).map_err(|e| e.to_string())?;
        let file = file.display().to_string();
        let start = Instant::now();
        let out = self
            .c
            .gantry_within(&["deploy", "-f", &file, "-p", stack], CONVERGE_LIMIT)
            .map_err(|e| e.to_string())?;
        let cli = start.elapsed();
        if !out.status.success() {
            return Err(format!(
                "gantry deploy: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let at = self
            .w
            .wait_until(CONVERGE_LIMIT, |t| running(t) >= replicas)?;
        let since = |at: Instant| at.saturating_duration_since(start).as_secs_f64();
        let milestones = self
            .w
            .milestones(&MILESTONES)
            .into_iter()
            .map(|at| at.map(since))
            .collect();
        Ok(Deployed {
            running_s: since(at),
            cli_s: cli.as_secs_f64(),
            milestones,
        })
    }

    /// `gantry stack rm`, a wait until every task is terminal or gone, and
    /// one until the agents have removed every container: removals still in
    /// flight would otherwise slow the next round's starts.
    fn remove(&self, stack: &str) {
        self.c.gantry_ok(&["stack", "rm", stack]);
        if let Err(e) = self
            .w
            .wait_until(CONVERGE_LIMIT, |t| t.values().all(is_terminal))
        {
            panic!("stack {stack} not gone: {e}");
        }
        let deadline = Instant::now() + CONVERGE_LIMIT;
        loop {
            let left = self.container_count();
            if left == Ok(0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containers of stack {stack} not removed within {CONVERGE_LIMIT:?}: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// How many containers (of any state) the agents have.
    fn container_count(&self) -> Result<usize, String> {
        let mut count = 0;
        for host in self.c.hosts_with(Role::Agent) {
            let data = self.c.host_data_dir(&host).map_err(|e| e.to_string())?;
            let out = self
                .c
                .command_in(&host, &self.c.record().gantry_binary.display().to_string())
                .map_err(|e| e.to_string())?
                .env("GANTRY_DATA_DIR", &data)
                .args(["container", "ps", "-a", "-q"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("container ps on {host}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "container ps on {host}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            count += String::from_utf8_lossy(&out.stdout).lines().count();
        }
        Ok(count)
    }

    /// One warm-up and `rounds` measured deploys of 100 replicas; the last
    /// deployment is left running.
    fn deploy_rounds(&self, network: Network, rounds: usize) -> Value {
        let mut samples = Vec::new();
        let mut cli = Vec::new();
        let mut steps: Vec<Vec<f64>> = vec![Vec::new(); MILESTONES.len()];
        let mut warmup = Value::Null;
        let mut errors = Vec::new();
        for round in 0..=rounds {
            if round > 0 {
                self.remove("bench");
            }
            match self.deploy("bench", REPLICAS, network) {
                Ok(d) => {
                    let steps_text: Vec<String> = MILESTONES
                        .iter()
                        .zip(&d.milestones)
                        .map(|(state, s)| {
                            format!(
                                "{} {}",
                                state.as_str_name(),
                                s.map_or("?".into(), |s| format!("{s:.2}"))
                            )
                        })
                        .collect();
                    println!(
                        "deploy {}: {} {:.2} s (cli {:.2} s; all {})",
                        network.name(),
                        if round == 0 {
                            "warm-up".to_string()
                        } else {
                            format!("round {round}")
                        },
                        d.running_s,
                        d.cli_s,
                        steps_text.join(", ")
                    );
                    if round == 0 {
                        warmup = json!(round3(d.running_s));
                    } else {
                        samples.push(d.running_s);
                        cli.push(d.cli_s);
                        for (list, s) in steps.iter_mut().zip(&d.milestones) {
                            list.extend(*s);
                        }
                    }
                }
                Err(e) => {
                    println!("deploy {}: round {round} failed: {e}", network.name());
                    errors.push(e);
                    // Start the next round from nothing.
                    let _ = self
                        .c
                        .gantry_within(&["stack", "rm", "bench"], CONVERGE_LIMIT);
                }
            }
        }
        json!({
            "network": network.name(),
            "replicas": REPLICAS,
            "warmup_s": warmup,
            "converged_s": stats_json(&samples),
            "rounds_s": samples.iter().map(|s| round3(*s)).collect::<Vec<_>>(),
            "deploy_cli_s": stats_json(&cli),
            "all_reached_s": MILESTONES
                .iter()
                .zip(&steps)
                .map(|(state, list)| (state.as_str_name().to_string(), stats_json(list)))
                .collect::<serde_json::Map<String, Value>>(),
            "errors": errors,
        })
    }

    /// `kills` times: SIGKILL of a different running task's main process,
    /// then the time until the controller reports it running again with one
    /// more restart, and until the node has its new main process.
    fn restarts(&self, kills: usize) -> Value {
        let mut reported = Vec::new();
        let mut process = Vec::new();
        let mut errors = Vec::new();
        let containers = match self.containers() {
            Ok(c) => c,
            Err(e) => return json!({"skipped": e}),
        };
        let tasks = self.w.tasks();
        // Spread the kills over the nodes: take tasks in turn from each.
        let mut by_node: std::collections::BTreeMap<String, Vec<&pb::Task>> = Default::default();
        for t in tasks.values().filter(|t| is_running(t)) {
            by_node
                .entry(t.node.clone().unwrap_or_default())
                .or_default()
                .push(t);
        }
        let mut picks = Vec::new();
        for i in 0.. {
            let before = picks.len();
            for list in by_node.values() {
                if let Some(t) = list.get(i) {
                    picks.push(*t);
                }
            }
            if picks.len() >= kills || picks.len() == before {
                break;
            }
        }
        picks.truncate(kills);
        for task in picks {
            // The agent names a task's container SERVICE.SLOT.TASKID-PREFIX.
            let Some(container) = containers.iter().find(|c| {
                let short = c.name.rsplit('.').next().unwrap_or("");
                short.len() >= 8 && task.id.starts_with(short)
            }) else {
                errors.push(format!("no running container of task {} found", task.id));
                continue;
            };
            let restarts = task.status.as_ref().map_or(0, |s| s.restarts);
            let (id, pid) = (task.id.clone(), container.pid);
            let start = Instant::now();
            if let Err(e) = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            ) {
                errors.push(format!("kill {pid} (task {id}): {e}"));
                continue;
            }
            // Both views are polled every millisecond: the node's (the new
            // shim's `shim.json` names a new, live init) and the
            // controller's (the task running with one more restart; the
            // event's arrival time is what counts).
            let deadline = start + Duration::from_secs(30);
            let (mut node_at, mut controller_at) = (None, None);
            while Instant::now() < deadline && (node_at.is_none() || controller_at.is_none()) {
                if node_at.is_none() && new_init(&container.shim_state, pid) {
                    node_at = Some(start.elapsed().as_secs_f64());
                }
                if controller_at.is_none() {
                    controller_at = self.w.task_updated_when(&id, |t| {
                        is_running(t) && t.status.as_ref().is_some_and(|s| s.restarts > restarts)
                    });
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let fmt =
                |s: Option<f64>| s.map_or("not seen".into(), |s| format!("{:.0} ms", s * 1e3));
            let controller_s =
                controller_at.map(|at| at.saturating_duration_since(start).as_secs_f64());
            println!(
                "restart of task {id}: reported running {}, new process {}",
                fmt(controller_s),
                fmt(node_at)
            );
            match controller_s {
                Some(s) => reported.push(s),
                None => errors.push(format!("task {id}: not reported running again within 30 s")),
            }
            match node_at {
                Some(s) => process.push(s),
                None => errors.push(format!(
                    "task {id}: no new main process in {} within 30 s",
                    container.shim_state.display()
                )),
            }
        }
        json!({
            "policy": "default (condition any, delay 0 s, crash-loop back-off from 100 ms)",
            "reported_running_s": stats_json(&reported),
            "new_process_s": stats_json(&process),
            "errors": errors,
        })
    }

    /// Every running container on the agents, from `gantry container ps -o
    /// json` with each host's data dir, in its netns.
    fn containers(&self) -> Result<Vec<Container>, String> {
        let mut all = Vec::new();
        for host in self.c.hosts_with(Role::Agent) {
            let data = self.c.host_data_dir(&host).map_err(|e| e.to_string())?;
            let out = self
                .c
                .command_in(&host, &self.c.record().gantry_binary.display().to_string())
                .map_err(|e| e.to_string())?
                .env("GANTRY_DATA_DIR", &data)
                .args(["container", "ps", "-o", "json"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("container ps on {host}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "container ps on {host}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    continue;
                };
                if let (Some(id), Some(name), Some(pid)) =
                    (v["id"].as_str(), v["name"].as_str(), v["pid"].as_i64())
                {
                    all.push(Container {
                        name: name.to_string(),
                        pid: pid as i32,
                        shim_state: data.join("containers").join(id).join("shim.json"),
                    });
                }
            }
        }
        Ok(all)
    }
}

/// A running container on an agent.
struct Container {
    name: String,
    /// Its main process (init), in this machine's pid namespace.
    pid: i32,
    /// The engine's `<data>/containers/<id>/shim.json`, which every shim
    /// (re)writes with its init's pid.
    shim_state: PathBuf,
}

/// Whether `shim.json` names an init other than `old` that is alive.
fn new_init(shim_state: &Path, old: i32) -> bool {
    let Ok(text) = std::fs::read(shim_state) else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<Value>(&text) else {
        return false;
    };
    v["init_pid"]
        .as_i64()
        .is_some_and(|pid| pid as i32 != old && Path::new(&format!("/proc/{pid}")).exists())
}

// ---------------------------------------------------------------------------
// Lost node.

fn lost_node(
    c: &mut Cluster,
    w: &Watcher,
    dir: &Path,
    nodes: &HashMap<String, String>,
    rounds: usize,
) -> Value {
    let agents = c.hosts_with(Role::Agent);
    let mut results = Vec::new();
    for fault in ["partition", "kill"] {
        let mut samples = Vec::new();
        let mut moved = Vec::new();
        let mut errors = Vec::new();
        for round in 0..rounds {
            let victim = agents[round % agents.len()].clone();
            let Some(victim_id) = nodes.get(&victim).cloned() else {
                errors.push(format!("no node id for host {victim}"));
                continue;
            };
            // A fresh spread: every round starts 2/2/2.
            {
                let b = Bench {
                    c,
                    w,
                    dir: dir.to_path_buf(),
                };
                if let Err(e) = b.deploy("lost", LOST_REPLICAS, Network::Bridge) {
                    errors.push(format!("deploy: {e}"));
                    continue;
                }
            }
            let on_victim = w
                .tasks()
                .values()
                .filter(|t| is_running(t) && t.node.as_deref() == Some(&victim_id))
                .count();
            let start = Instant::now();
            let cut = match fault {
                "partition" => c.partition(&victim),
                _ => c.kill(&victim),
            };
            if let Err(e) = cut {
                errors.push(format!("{fault} {victim}: {e}"));
                continue;
            }
            let at = w.wait_until(CONVERGE_LIMIT, |tasks| {
                tasks
                    .values()
                    .filter(|t| is_running(t) && t.node.as_deref() != Some(&victim_id))
                    .count()
                    >= LOST_REPLICAS
            });
            match at {
                Ok(at) => {
                    let s = at.saturating_duration_since(start).as_secs_f64();
                    println!("lost node ({fault} {victim}, {on_victim} replicas there): {s:.2} s");
                    samples.push(s);
                    moved.push(on_victim);
                }
                Err(e) => errors.push(format!("{fault} {victim}: {e}")),
            }
            let back = match fault {
                "partition" => c.heal(&victim),
                _ => c.start(&victim),
            };
            if let Err(e) = back {
                panic!("bringing {victim} back: {e}");
            }
            if let Err(e) = c.wait_node_status(&victim, "ready", Duration::from_secs(30)) {
                panic!("{victim} not ready again: {e}");
            }
            let b = Bench {
                c,
                w,
                dir: dir.to_path_buf(),
            };
            b.remove("lost");
        }
        results.push(json!({
            "fault": fault,
            "replicas": LOST_REPLICAS,
            "replicas_on_lost_node": moved,
            "converged_s": stats_json(&samples),
            "errors": errors,
        }));
    }
    json!(results)
}

// ---------------------------------------------------------------------------
// Memory.

/// PSS of the controller, the agents and the cluster's shims, in KiB.
fn measure_memory(c: &Cluster) -> Value {
    // Let the processes settle after the deploy (allocator, first touches).
    std::thread::sleep(Duration::from_secs(2));
    let mut control_plane = Vec::new();
    for s in c.status() {
        let Some(pid) = s.pid else { continue };
        match pss(pid) {
            Ok(p) => control_plane.push(json!({
                "host": s.name,
                "role": match s.role { Role::Controller => "controller", Role::Agent => "agent" },
                "pid": pid,
                "pss_kib": p.0, "anon_kib": p.1, "file_kib": p.2,
            })),
            Err(e) => return json!({"skipped": e}),
        }
    }
    let base = c
        .host_data_dir(&c.hosts_with(Role::Agent)[0])
        .ok()
        .and_then(|d| d.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let shims: Vec<u64> = find_shims(&base)
        .into_iter()
        .filter_map(|pid| pss(pid).ok().map(|p| p.0))
        .collect();
    let total: u64 = control_plane
        .iter()
        .map(|p| p["pss_kib"].as_u64().unwrap_or(0))
        .sum();
    let mut sorted = shims.clone();
    sorted.sort_unstable();
    let shim_median = if sorted.is_empty() {
        0.0
    } else if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2] as f64
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) as f64 / 2.0
    };
    let total_mib = total as f64 / 1024.0;
    let share = total_mib / swarm::MEMORY_MIB;
    json!({
        "running_tasks": REPLICAS,
        "network": "bridge",
        "processes": control_plane,
        "control_plane_pss_mib": round2(total_mib),
        "percent_of_swarm": round2(share * 100.0),
        "met": share <= target::MEMORY_SHARE,
        "shims": {
            "count": shims.len(),
            "median_kib": shim_median,
            "total_mib": round2(shims.iter().sum::<u64>() as f64 / 1024.0),
        },
    })
}

/// `gantry shim` processes whose command line or environment names a path
/// under `base` (the cluster's data).
fn find_shims(base: &Path) -> Vec<i32> {
    let needle = base.as_os_str().as_encoded_bytes().to_vec();
    if needle.is_empty() {
        return Vec::new();
    }
    let mentions = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle.as_slice());
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            cmdline.split(|b| *b == 0).nth(1) == Some(&b"shim"[..])
                && (mentions(&cmdline)
                    || std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|e| mentions(&e)))
        })
        .collect()
}

/// `Pss:`, `Pss_Anon:` and `Pss_File:` of `/proc/PID/smaps_rollup`, in KiB.
fn pss(pid: i32) -> Result<(u64, u64, u64), String> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("{path}: no {name} line"))
    };
    Ok((field("Pss:")?, field("Pss_Anon:")?, field("Pss_File:")?))
}

// ---------------------------------------------------------------------------
// Statistics and the report (the same conventions as container_start.rs).

/// Median, nearest-rank p95, min, mean and n of seconds, as JSON (null when
/// there are none).
fn stats_json(samples: &[f64]) -> Value {
    if samples.is_empty() {
        return Value::Null;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    let p95 = s[((n as f64 * 0.95).ceil() as usize).clamp(1, n) - 1];
    json!({
        "n": n,
        "median": round3(median),
        "p95": round3(p95),
        "min": round3(s[0]),
        "mean": round3(s.iter().sum::<f64>() / n as f64),
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn machine() -> Value {
    let uts = nix::sys::utsname::uname().ok();
    let kernel = uts
        .as_ref()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cgroups = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else if Path::new("/sys/fs/cgroup/unified").exists() {
        "v1 hybrid"
    } else {
        "v1"
    };
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|s| s.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split(' ').next().map(str::to_string))
        .unwrap_or_default();
    json!({
        "os": os, "kernel": kernel, "cpus": cpus, "cpu_model": cpu_model,
        "cgroups": cgroups, "loadavg_1m_at_end": load,
    })
}

/// One table row: median and p95 of `stats` (seconds) against the reference.
fn row(md: &mut String, metric: &str, stats: &Value, reference: &str, target: f64, unit_ms: bool) {
    if stats.is_null() {
        md.push_str(&format!(
            "| {metric} | – | – | – | 0 | {reference} | {target} s | not measured |\n"
        ));
        return;
    }
    let f = |k: &str| stats[k].as_f64().unwrap_or(f64::NAN);
    let show = |x: f64| {
        if unit_ms {
            format!("{:.0} ms", x * 1e3)
        } else {
            format!("{x:.2} s")
        }
    };
    let met = if f("median") <= target {
        "met"
    } else {
        "NOT met"
    };
    md.push_str(&format!(
        "| {metric} | {} | {} | {} | {} | {reference} | ≤ {} | {met} |\n",
        show(f("median")),
        show(f("p95")),
        show(f("min")),
        stats["n"],
        show(target),
    ));
}

/// The markdown table of a report.
fn markdown(report: &Value) -> String {
    let mut md = String::new();
    let m = &report["machine"];
    md.push_str(&format!(
        "# Control plane: gantry dev cluster (1 controller, 3 agents) vs Docker Swarm\n\n{} (gantry {}) — {}, kernel {}, {} CPUs ({}), cgroups {}; load {} at the end; {} s in all\n\n",
        report["date"].as_str().unwrap_or(""),
        report["gantry_commit"].as_str().unwrap_or(""),
        m["os"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or(""),
        m["cgroups"].as_str().unwrap_or(""),
        m["loadavg_1m_at_end"].as_str().unwrap_or(""),
        report["elapsed_s"],
    ));
    md.push_str(
        "| metric | median | p95 | min | n | Swarm (reference, issue author) | target | |\n",
    );
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---|\n");
    for d in report["deploy"].as_array().into_iter().flatten() {
        row(
            &mut md,
            &format!(
                "deploy 100 replicas → all running ({})",
                d["network"].as_str().unwrap_or("")
            ),
            &d["converged_s"],
            &format!("{} s", swarm::DEPLOY_S),
            target::DEPLOY_S,
            false,
        );
    }
    let r = &report["restart"];
    row(
        &mut md,
        "kill -9 → task running again (controller)",
        &r["reported_running_s"],
        &format!(
            "{} s (delay 5 s); {} s (delay 0)",
            swarm::RESTART_DEFAULT_S,
            swarm::RESTART_DELAY0_S
        ),
        target::RESTART_S,
        true,
    );
    row(
        &mut md,
        "kill -9 → new main process (node)",
        &r["new_process_s"],
        "–",
        target::RESTART_S,
        true,
    );
    for l in report["lost_node"].as_array().into_iter().flatten() {
        row(
            &mut md,
            &format!(
                "lost node ({}) → 6 replicas running elsewhere",
                l["fault"].as_str().unwrap_or("")
            ),
            &l["converged_s"],
            &format!("{} s (partition)", swarm::LOST_NODE_S),
            target::LOST_NODE_S,
            false,
        );
    }
    md.push('\n');
    for d in report["deploy"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "- deploy ({}): warm-up round (first pull through the registry) {} s; `gantry deploy` itself returned in median {} s\n",
            d["network"].as_str().unwrap_or(""),
            d["warmup_s"],
            d["deploy_cli_s"]["median"],
        ));
        if let Some(steps) = d["all_reached_s"].as_object() {
            // In the order a task goes through them (the map is sorted by name).
            let text: Vec<String> = MILESTONES
                .iter()
                .map(|state| {
                    let name = state.as_str_name();
                    let short = name.trim_start_matches("TASK_STATE_").to_lowercase();
                    format!(
                        "{short} {} s",
                        steps.get(name).map_or(Value::Null, |s| s["median"].clone())
                    )
                })
                .collect();
            md.push_str(&format!(
                "  - median time until all 100 had reached (or passed): {}\n",
                text.join(", ")
            ));
        }
    }
    let mem = &report["memory"];
    if let Some(reason) = mem["skipped"].as_str() {
        md.push_str(&format!("- memory: not measured ({reason})\n"));
    } else if !mem.is_null() {
        let procs: Vec<String> = mem["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{} {} KiB", p["host"].as_str().unwrap_or(""), p["pss_kib"]))
            .collect();
        md.push_str(&format!(
            "- memory at {} running tasks: controller + 3 agents **{} MiB PSS** ({}) = {:.1}% of Swarm's {} MiB (dockerd + containerd + shims; target ≤ {:.0}%: {}); shims separately: {} of them, median {} KiB, total {} MiB\n",
            mem["running_tasks"],
            mem["control_plane_pss_mib"],
            procs.join(", "),
            mem["percent_of_swarm"].as_f64().unwrap_or(0.0),
            swarm::MEMORY_MIB,
            target::MEMORY_SHARE * 100.0,
            if mem["met"] == true { "met" } else { "NOT met" },
            mem["shims"]["count"],
            mem["shims"]["median_kib"],
            mem["shims"]["total_mib"],
        ));
    }
    let mut errors = Vec::new();
    for section in ["deploy", "lost_node"] {
        for s in report[section].as_array().into_iter().flatten() {
            errors.extend(s["errors"].as_array().into_iter().flatten().cloned());
        }
    }
    errors.extend(
        report["restart"]["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .cloned(),
    );
    if let Some(reason) = report["restart"]["skipped"].as_str() {
        md.push_str(&format!("- restart: not measured ({reason})\n"));
    }
    if !errors.is_empty() {
        md.push_str(&format!(
            "- {} failed rounds, first: {}\n",
            errors.len(),
            errors[0]
        ));
    }
    md
}
