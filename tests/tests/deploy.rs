//! The control plane end to end (issue 3): a real dev cluster (`gantry
//! controller` and three `gantry agent`s, each host its own network
//! namespace), the test images pushed with `gantry image load`, stacks
//! deployed with `gantry deploy`, and everything asserted through the CLI's
//! `-o json` output, as a user would see it.
//!
//! Each test function brings up one cluster and makes several checks on it,
//! so the file stays within a few minutes. Containers are also looked at on
//! the hosts themselves (`gantry container ps` with the agent's data dir,
//! inside its namespace) to prove that removed or replaced tasks are really
//! gone, not only hidden by the controller.
//!
//! Decisions the tests pin down (where Swarm differs, the test says so):
//! - A restart policy acts **in place on the agent**: the task keeps its id
//!   and slot and `restarts` counts the restarts. `on-failure` with
//!   `max_attempts: 2` ends with the task `failed` and `restarts == 2` (the
//!   first run plus two restarts), and no replacement task is created. Swarm
//!   replaces the task each time instead and shows the attempts as history
//!   rows; the count of attempts is the same.
//! - An impossible placement is not an error of `deploy` (as in Swarm): the
//!   deploy succeeds and the tasks stay `pending`, their `error` naming the
//!   filter that failed and on how many nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gantry_tests::cluster::{self, Cluster, ClusterConfig, wait_for};
use serde_json::Value;

/// Why these tests cannot run here, if they cannot.
fn prerequisites() -> Option<&'static str> {
    if let Some(reason) = gantry_tests::engine_test_prerequisites() {
        return Some(reason);
    }
    cluster::missing_network_tools()
}

macro_rules! require {
    () => {
        if let Some(reason) = prerequisites() {
            println!("SKIPPED: {reason}");
            return;
        }
    };
}

/// The test images, built once into cargo's scratch directory for
/// integration tests (see [`gantry_tests::image_fixtures::test_images_in`]).
fn test_images() -> &'static Path {
    static IMAGES: OnceLock<PathBuf> = OnceLock::new();
    IMAGES.get_or_init(|| {
        gantry_tests::image_fixtures::test_images_in(Path::new(env!("CARGO_TARGET_TMPDIR")))
    })
}

/// A real cluster with the test images loaded and a directory for the
/// tests' Compose files. Dropping it tears the cluster down.
struct Env {
    c: Cluster,
    files: tempfile::TempDir,
}

impl Env {
    /// A cluster of `agents` agents, every one ready, with both test images
    /// in the controller's registry.
    fn up(agents: u32) -> Env {
        let images = test_images();
        let mut config = ClusterConfig::new(gantry_tests::gantry_bin());
        config.name = cluster::unique_name("d");
        config.agents = agents;
        // Several clusters start at once on a small CI machine.
        config.ready_timeout = Duration::from_secs(90);
        let c = Cluster::up(config).expect("real cluster up");
        let env = Env {
            c,
            files: tempfile::Builder::new()
                .prefix("gantry-deploy-")
                .tempdir()
                .expect("temp dir for compose files"),
        };
        for image in ["web.tar", "busybox.tar"] {
            env.ok(&["image", "load", images.join(image).to_str().unwrap()]);
        }
        env
    }

    /// Runs the CLI against the cluster, bounded (a hung controller must
    /// fail the test, not hang it).
    fn run(&self, args: &[&str]) -> Output {
        self.c
            .gantry_within(args, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("gantry {args:?}: {e}"))
    }

    /// Runs the CLI and returns its stdout, failing the test with its stderr
    /// and the controller's log when it exits non-zero.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "gantry {args:?} exited {:?}: {}\ncontroller log:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr),
            self.c.log_tail("c1", 30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `-o json` appended and parses what it printed.
    fn json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        let text = self.ok(&full);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("gantry {full:?}: {e}: {text}"))
    }

    /// Writes `yaml` as the file `name` and returns its path.
    fn file(&self, name: &str, yaml: &str) -> String {
        let path = self.files.path().join(name);
        std::fs::write(&path, yaml).expect("write compose file");
        path.to_str().unwrap().to_string()
    }

    /// `gantry deploy -p STACK -f FILE` (asserted to succeed).
    fn deploy(&self, stack: &str, file: &str) -> String {
        self.ok(&["deploy", "-p", stack, "-f", file])
    }

    /// `service ls -o json`, by `STACK_NAME`.
    fn services(&self) -> BTreeMap<String, Value> {
        self.json(&["service", "ls"])
            .as_array()
            .expect("service ls -o json is an array")
            .iter()
            .map(|s| {
                let name = format!(
                    "{}_{}",
                    s["stack"].as_str().unwrap(),
                    s["name"].as_str().unwrap()
                );
                (name, s.clone())
            })
            .collect()
    }

    /// `service ps SERVICE -o json` (with `-a`: the history too).
    fn tasks(&self, service: &str, all: bool) -> Vec<Value> {
        let mut args = vec!["service", "ps", service];
        if all {
            args.push("-a");
        }
        self.json(&args)
            .as_array()
            .expect("service ps -o json is an array")
            .clone()
    }

    /// The tasks of `service` that should run and do.
    fn running(&self, service: &str) -> Vec<Value> {
        self.tasks(service, false)
            .into_iter()
            .filter(|t| t["desired_state"] == "running" && t["state"] == "running")
            .collect()
    }

    /// Waits until `service` runs exactly `n` tasks that should run, and no
    /// other task of it should run.
    fn wait_running(&self, service: &str, n: usize, timeout: Duration) {
        let mut last = Vec::new();
        let found = wait_for(&format!("{service} to run {n} tasks"), timeout, || {
            last = self.tasks(service, false);
            let wanted = last
                .iter()
                .filter(|t| t["desired_state"] == "running")
                .count();
            let running = last
                .iter()
                .filter(|t| t["desired_state"] == "running" && t["state"] == "running")
                .count();
            wanted == n && running == n
        });
        if let Err(e) = found {
            panic!(
                "{e}; service ps: {}\ncontroller log:\n{}",
                serde_json::to_string_pretty(&last).unwrap(),
                self.c.log_tail("c1", 30)
            );
        }
    }

    /// The containers on `host`, running or not, as the host's own engine
    /// lists them (`gantry container ps -a -o json`: one object per line).
    fn containers_on(&self, host: &str) -> Vec<Value> {
        let data = self.c.host_data_dir(host).expect("host data dir");
        let out = self
            .c
            .command_in(host, gantry_tests::gantry_bin().to_str().unwrap())
            .expect("command in host")
            .args(["container", "ps", "-a", "-o", "json"])
            .env("GANTRY_DATA_DIR", &data)
            .stdin(Stdio::null())
            .output()
            .expect("gantry container ps");
        assert!(
            out.status.success(),
            "container ps on {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("container ps line is JSON"))
            .collect()
    }

    /// The containers of the service named `service` (`STACK_NAME`) on
    /// `host`: the agent names them `STACK_NAME.SLOT.TASK` (Swarm's names).
    fn service_containers_on(&self, host: &str, service: &str) -> Vec<Value> {
        let prefix = format!("{service}.");
        self.containers_on(host)
            .into_iter()
            .filter(|c| c["name"].as_str().unwrap_or("").starts_with(&prefix))
            .collect()
    }
}

impl Env {
    /// Every container of the service named `service` on the agent hosts,
    /// running or not, as `(host, container)`.
    fn containers_of(&self, service: &str) -> Vec<(String, Value)> {
        self.c
            .hosts_with(cluster::Role::Agent)
            .into_iter()
            .flat_map(|h| {
                self.service_containers_on(&h, service)
                    .into_iter()
                    .map(move |c| (h.clone(), c))
            })
            .collect()
    }
}

/// The `node` of each task.
fn nodes_of(tasks: &[Value]) -> Vec<String> {
    tasks
        .iter()
        .map(|t| t["node"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The ids of the given tasks, sorted.
fn ids_of(tasks: &[Value]) -> BTreeSet<String> {
    tasks
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

/// The running and desired counts `service ls` shows for `service`.
fn counts(services: &BTreeMap<String, Value>, service: &str) -> (u64, u64) {
    let s = services
        .get(service)
        .unwrap_or_else(|| panic!("service ls has no {service}: {services:?}"));
    (
        s["running"].as_u64().unwrap(),
        s["desired"].as_u64().unwrap(),
    )
}

// Long-running test commands trap SIGTERM: a shell that is PID 1 ignores
// it otherwise, and every stop (update, scale-down, unhealthy restart) would
// wait out the 10 s grace period, which gantry does not let a file shorten
// yet (`stop_grace_period` is ignored with a warning).

/// Two services: `web` (the web image, spread freely) and `talk` (logs one
/// line naming its container, at most one replica per node).
const APP: &str = "
services:
  web:
    image: gantry.test/web:latest
    deploy:
      replicas: 3
  talk:
    image: gantry.test/busybox:latest
    command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; echo talking on $$(hostname); while true; do sleep 1; done\"]
    deploy:
      replicas: 3
      placement:
        max_replicas_per_node: 1
";

/// Deploy, spread, dry run, redeploy of a changed file, refused files,
/// scale up and down, logs and exec across nodes, and removal.
#[test]
fn deploy_scale_update_and_remove_on_three_agents() {
    require!();
    let env = Env::up(3);
    let app = env.file("app.yaml", APP);

    // Deploy: both services created, all replicas running.
    let out = env.deploy("app", &app);
    assert!(out.contains("app_web") && out.contains("app_talk"), "{out}");
    env.wait_running("app_web", 3, Duration::from_secs(30));
    env.wait_running("app_talk", 3, Duration::from_secs(30));
    let services = env.services();
    assert_eq!(counts(&services, "app_web"), (3, 3));
    assert_eq!(counts(&services, "app_talk"), (3, 3));
    let web_id = "app_web".to_string();

    // Spread: three replicas of a service with no placement rule land on
    // three distinct nodes.
    let web = env.running("app_web");
    let nodes: BTreeSet<String> = nodes_of(&web).into_iter().collect();
    assert_eq!(
        nodes,
        BTreeSet::from(["n1".into(), "n2".into(), "n3".into()]),
        "web's replicas are not spread: {web:?}"
    );
    for t in &web {
        assert_eq!(t["restarts"], 0, "{t}");
        assert!(t["error"].is_null(), "{t}");
    }
    // Overlay addressing: each node has its own /24 of the cluster CIDR,
    // each task an address in its node's, each service a VIP.
    let subnets: BTreeMap<String, String> = env
        .json(&["node", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let subnet = n["subnet"].as_str().unwrap_or_else(|| panic!("{n}"));
            (n["id"].as_str().unwrap().to_string(), subnet.to_string())
        })
        .collect();
    let distinct: BTreeSet<&String> = subnets.values().collect();
    assert_eq!(distinct.len(), 3, "{subnets:?}");
    for t in &web {
        let subnet = &subnets[t["node_id"].as_str().unwrap()];
        let prefix = subnet.trim_end_matches("0/24");
        let address = t["address"].as_str().unwrap_or_else(|| panic!("{t}"));
        assert!(
            subnet.starts_with("10.42.") && address.starts_with(prefix),
            "{address} is not in {subnet}"
        );
    }
    let vip = services["app_web"]["virtual_ip"]
        .as_str()
        .unwrap_or_default();
    assert!(vip.starts_with("10.43."), "{:?}", services["app_web"]);
    let web_ids = ids_of(&web);
    let talk_ids = ids_of(&env.running("app_talk"));

    // A dry run of a changed file prints the normalized stack and the
    // change, and changes nothing.
    let changed = env.file(
        "app-changed.yaml",
        &APP.replace("echo talking on", "echo now talking on"),
    );
    let before = env.services();
    let dry = env.json(&["deploy", "-p", "app", "-f", &changed, "--dry-run"]);
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(dry["revision"], 0, "{dry}");
    assert_eq!(dry["stack"]["name"], "app", "{dry}");
    assert_eq!(
        dry["stack"]["services"]["web"]["deploy"]["replicas"], 3,
        "the normalized stack: {dry}"
    );
    let updates = dry["changes"]["update"].as_array().unwrap();
    assert_eq!(updates.len(), 1, "{dry}");
    assert_eq!(updates[0]["service"], "talk", "{dry}");
    assert!(
        updates[0]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "command"),
        "{dry}"
    );
    assert!(dry["changes"]["create"].as_array().unwrap().is_empty());
    assert!(dry["changes"]["remove"].as_array().unwrap().is_empty());
    assert_eq!(env.services(), before, "a dry run changed the services");
    assert_eq!(ids_of(&env.running("app_web")), web_ids);
    assert_eq!(ids_of(&env.running("app_talk")), talk_ids);

    // Refused files: exit 2, stderr names the key, the cluster unchanged.
    let refused = [
        (
            "malformed.yaml",
            "services:\n  web: [\n    image: x\n",
            "invalid YAML",
        ),
        (
            "unknown.yaml",
            "services:\n  web:\n    image: gantry.test/web:latest\n    deploy:\n      replcas: 2\n",
            "replcas",
        ),
        (
            "negative.yaml",
            "services:\n  web:\n    image: gantry.test/web:latest\n    deploy:\n      replicas: -1\n",
            "services.web.deploy.replicas",
        ),
    ];
    for (name, yaml, names) in refused {
        let path = env.file(name, yaml);
        let out = env.run(&["deploy", "-p", "app", "-f", &path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(names),
            "{name}: stderr lacks {names}: {stderr}"
        );
        assert!(stderr.contains("line "), "{name}: no line in {stderr}");
    }
    assert_eq!(env.services(), before, "a refused file changed the cluster");

    // Redeploying the same file changes nothing.
    let out = env.deploy("app", &app);
    assert!(out.contains("up to date"), "{out}");
    assert_eq!(env.services(), before);
    assert_eq!(ids_of(&env.running("app_talk")), talk_ids);

    // Redeploy of the changed file: only `talk` is replaced; web's tasks
    // keep their ids.
    env.deploy("app", &changed);
    wait_for("talk's tasks replaced", Duration::from_secs(30), || {
        let now = env.running("app_talk");
        now.len() == 3 && ids_of(&now).is_disjoint(&talk_ids)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", env.tasks("app_talk", true)));
    env.wait_running("app_talk", 3, Duration::from_secs(10));
    assert_eq!(
        ids_of(&env.running("app_web")),
        web_ids,
        "redeploying changed only talk, but web's tasks were replaced"
    );

    // Logs from every node: each talk replica wrote its line, prefixed
    // with its task and node.
    wait_for(
        "talk's logs from three nodes",
        Duration::from_secs(15),
        || {
            let logs = env.ok(&["service", "logs", "app_talk"]);
            ["@n1", "@n2", "@n3"].iter().all(|node| {
                logs.lines()
                    .any(|l| l.contains(node) && l.contains("now talking on"))
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {}", env.ok(&["service", "logs", "app_talk"])));

    // Exec into a task on each node: the command runs in that task's
    // container (its hostname is the container's) and its exit code is ours.
    for t in env.running("app_talk") {
        let id = t["id"].as_str().unwrap();
        let hostname = env.ok(&["exec", id, "--", "hostname"]);
        let logs = env.ok(&["service", "logs", "--no-task-prefix", "app_talk"]);
        assert!(
            logs.contains(&format!("now talking on {}", hostname.trim())),
            "exec in {id} on {}: hostname {hostname:?} is not in the logs {logs}",
            t["node"]
        );
        let out = env.run(&["exec", id, "--", "sh", "-c", "exit 3"]);
        assert_eq!(out.status.code(), Some(3), "exec's exit code in {id}");
    }
    let out = env.ok(&[
        "exec",
        "app_web",
        "--",
        "wget",
        "-qO-",
        "http://127.0.0.1/health",
    ]);
    assert_eq!(out.trim(), "ok");

    // Scale up, then down: the counts follow and the extra containers go.
    env.ok(&[
        "service",
        "scale",
        "app_web=5",
        "--wait",
        "--timeout",
        "30s",
    ]);
    env.wait_running("app_web", 5, Duration::from_secs(10));
    assert_eq!(counts(&env.services(), "app_web"), (5, 5));
    env.ok(&["service", "scale", "app_web=2"]);
    env.wait_running("app_web", 2, Duration::from_secs(30));
    wait_for(
        "scaled-down containers gone",
        Duration::from_secs(30),
        || env.containers_of(&web_id).len() == 2,
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", env.containers_of(&web_id)));
    assert_eq!(counts(&env.services(), "app_web"), (2, 2));
    // What `ps -a` still shows of the removed slots is shut down.
    for t in env.tasks("app_web", true) {
        if t["desired_state"] == "shutdown" {
            assert_ne!(t["state"], "running", "{t}");
        } else {
            assert_eq!(t["state"], "running", "{t}");
        }
    }

    // Removal: the service leaves `service ls`, and its containers leave
    // every node.
    env.ok(&["service", "rm", "app_web"]);
    assert!(!env.services().contains_key("app_web"));
    assert!(env.services().contains_key("app_talk"));
    wait_for("web's containers removed", Duration::from_secs(30), || {
        env.containers_of(&web_id).is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", env.containers_of(&web_id)));
    let out = env.run(&["service", "ps", "app_web"]);
    assert!(!out.status.success(), "service ps of a removed service");
}

/// Placement constraints, impossible placements explained, and the
/// constraint met later by a label.
#[test]
fn placement_constraints_and_impossible_placements() {
    require!();
    let env = Env::up(3);
    let file = env.file(
        "place.yaml",
        "
services:
  eu:
    image: gantry.test/busybox:latest
    command: [\"sleep\", \"1000\"]
    deploy:
      replicas: 3
      placement:
        constraints: [\"node.labels.zone==eu\"]
  huge:
    image: gantry.test/busybox:latest
    command: [\"sleep\", \"1000\"]
    deploy:
      replicas: 2
      resources:
        reservations:
          memory: 100000G
  site:
    image: gantry.test/web:latest
    ports:
      - target: 80
        published: 8080
        mode: host
    deploy:
      mode: global
",
    );
    // As in Swarm, a placement nothing satisfies is not a deploy error.
    env.deploy("pl", &file);
    let explained = |service: &str, why: &str| {
        let mut last = Vec::new();
        wait_for(
            &format!("{service} explained"),
            Duration::from_secs(15),
            || {
                last = env.tasks(service, false);
                !last.is_empty()
                    && last.iter().all(|t| {
                        t["state"] == "pending"
                            && t["node"].is_null()
                            && t["error"].as_str().is_some_and(|e| e.contains(why))
                    })
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {last:?}"));
        last
    };
    // The error names the filter and how many nodes it rejected.
    let eu = explained("pl_eu", "constraint node.labels.zone==eu failed (3 nodes)");
    assert_eq!(eu.len(), 3);
    let huge = explained("pl_huge", "memory free (3 nodes)");
    assert_eq!(huge.len(), 2);
    assert_eq!(counts(&env.services(), "pl_eu"), (0, 3));
    assert_eq!(counts(&env.services(), "pl_huge"), (0, 2));

    // The label arrives: every replica goes to n2, the only node with it.
    env.ok(&["node", "update", "--label-add", "zone=eu", "n2"]);
    env.wait_running("pl_eu", 3, Duration::from_secs(20));
    assert_eq!(nodes_of(&env.running("pl_eu")), vec!["n2"; 3]);
    // The other stays pending, still explained.
    let huge = explained("pl_huge", "no node has");
    assert_eq!(huge.len(), 2);

    // A global service runs once on every node, and its published host
    // port answers on each node's address, from a host (n1 itself too), each
    // node with its own container. (`timeout`, not wget's `-T`: Debian's
    // busybox 1.35 wget crashes with `-T`.)
    env.wait_running("pl_site", 3, Duration::from_secs(30));
    let mut nodes = nodes_of(&env.running("pl_site"));
    nodes.sort();
    assert_eq!(nodes, vec!["n1", "n2", "n3"]);
    assert_eq!(counts(&env.services(), "pl_site"), (3, 3));
    let mut answered = BTreeSet::new();
    for host in ["n1", "n2", "n3"] {
        let url = format!("http://{}:8080/", env.c.host_addr(host).unwrap());
        let mut body = String::new();
        wait_for(&format!("{url} to answer"), Duration::from_secs(10), || {
            body = env
                .c
                .exec_in(
                    "n1",
                    &["timeout", "2", "busybox", "wget", "-q", "-O", "-", &url],
                )
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            body.starts_with("hostname=")
        })
        .unwrap_or_else(|e| panic!("{e}: {body:?}"));
        answered.insert(body);
    }
    assert_eq!(answered.len(), 3, "one container per node: {answered:?}");
}

/// Restart policies on the agent: kill -9 of the main process, give-up
/// after `max_attempts`, crash-loop back-off, and unhealthy containers.
#[test]
fn restart_policies_kill_give_up_backoff_and_health() {
    require!();
    let env = Env::up(3);
    let file = env.file(
        "restart.yaml",
        "
services:
  web:
    image: gantry.test/web:latest
    deploy:
      replicas: 1
      restart_policy:
        condition: any
        delay: 0s
  giveup:
    image: gantry.test/busybox:latest
    command: [\"sh\", \"-c\", \"sleep 0.3; exit 1\"]
    deploy:
      restart_policy:
        condition: on-failure
        delay: 0s
        max_attempts: 2
  loop:
    image: gantry.test/busybox:latest
    command: [\"sh\", \"-c\", \"exit 3\"]
    deploy:
      restart_policy:
        condition: any
        delay: 0s
  sick:
    image: gantry.test/busybox:latest
    command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; while true; do sleep 1; done\"]
    healthcheck:
      test: [\"CMD\", \"false\"]
      interval: 1s
      timeout: 1s
      retries: 1
    deploy:
      restart_policy:
        condition: any
        delay: 0s
  job:
    image: gantry.test/busybox:latest
    command: [\"sh\", \"-c\", \"sleep 1\"]
    deploy:
      restart_policy:
        condition: none
  after:
    image: gantry.test/busybox:latest
    command: [\"sleep\", \"1000\"]
    depends_on:
      web:
        condition: service_started
      job:
        condition: service_completed_successfully
  gated:
    image: gantry.test/busybox:latest
    command: [\"sleep\", \"1000\"]
    depends_on:
      sick:
        condition: service_healthy
    deploy:
      mode: global
",
    );
    env.deploy("rs", &file);

    // Crash-loop back-off: watch `restarts` climb and time each step.
    // Back-off doubles from 0.1 s, so the later steps take clearly longer
    // than the first ones (bounded: at most 20 s of watching).
    let start = Instant::now();
    let mut seen: Vec<(u64, Duration)> = Vec::new();
    let mut message = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        let tasks = env.tasks("rs_loop", false);
        if let Some(t) = tasks.first() {
            let r = t["restarts"].as_u64().unwrap_or(0);
            // Timed from the first restart: the first run's own start
            // (pull, container set-up) is no restart interval.
            if r >= 1 && seen.last().is_none_or(|(last, _)| r > *last) {
                seen.push((r, start.elapsed()));
            }
            if t["message"]
                .as_str()
                .is_some_and(|m| m.contains("restarting in"))
            {
                message = t["message"].as_str().unwrap().to_string();
            }
            if r >= 7 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        seen.len() >= 3 && seen.last().is_some_and(|(r, _)| *r >= 6),
        "the crash loop did not restart 6 times in 20 s: {seen:?}"
    );
    // The time per restart between consecutive observed counts (a poll
    // may see two restarts at once). The agent's back-off is 0, 0.1, 0.2,
    // 0.4, 0.8, 1.6, 3.2 s for the 1st..7th restart, so the last interval
    // is well over twice the first.
    let gaps: Vec<f64> = seen
        .windows(2)
        .map(|w| (w[1].1 - w[0].1).as_secs_f64() / (w[1].0 - w[0].0) as f64)
        .collect();
    let (first, last) = (gaps[0], *gaps.last().unwrap());
    assert!(
        last > 2.0 * first && last >= 0.7,
        "restarts do not back off: per-restart intervals {gaps:?} ({seen:?})"
    );
    assert!(
        !message.is_empty(),
        "no `restarting in` message seen while looping"
    );

    // on-failure with max_attempts 2: two restarts, then it stays failed
    // (the same task: restarts are in place, see the module doc).
    wait_for("giveup to give up", Duration::from_secs(20), || {
        env.tasks("rs_giveup", false)
            .first()
            .is_some_and(|t| t["state"] == "failed")
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", env.tasks("rs_giveup", true)));
    std::thread::sleep(Duration::from_secs(2));
    let all = env.tasks("rs_giveup", true);
    assert_eq!(all.len(), 1, "giveup was replaced: {all:?}");
    let t = &all[0];
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(t["restarts"], 2, "{t}");
    assert_eq!(t["exit_code"], 1, "{t}");
    assert!(
        t["error"]
            .as_str()
            .is_some_and(|e| e.contains("2 restart attempts")),
        "{t}"
    );
    assert_eq!(counts(&env.services(), "rs_giveup"), (0, 1));

    // kill -9 of web's main process on its node: restarted in place.
    env.wait_running("rs_web", 1, Duration::from_secs(20));
    let t = env.running("rs_web").remove(0);
    let host = t["node"].as_str().unwrap().to_string();
    let task12 = &t["id"].as_str().unwrap()[..12];
    let container = env
        .containers_on(&host)
        .into_iter()
        .find(|c| c["name"].as_str().unwrap_or("").ends_with(task12))
        .unwrap_or_else(|| panic!("no container of task {} on {host}", t["id"]));
    let pid = container["pid"].as_i64().expect("the container's pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 web's main process");
    wait_for(
        "web restarted after kill -9",
        Duration::from_secs(15),
        || {
            env.running("rs_web")
                .first()
                .is_some_and(|now| now["restarts"].as_u64() >= Some(1))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", env.tasks("rs_web", true)));
    let now = env.running("rs_web").remove(0);
    assert_eq!(now["id"], t["id"], "restarted in place, same task");
    assert_eq!(now["exit_code"], 137, "{now}");

    // Unhealthy: health `unhealthy` is seen and the container is restarted.
    let mut unhealthy_seen = false;
    wait_for("sick restarted", Duration::from_secs(25), || {
        let t = env.tasks("rs_sick", false);
        let t = match t.first() {
            Some(t) => t.clone(),
            None => return false,
        };
        unhealthy_seen |= t["health"] == "unhealthy";
        unhealthy_seen && t["restarts"].as_u64() >= Some(1)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e} (unhealthy seen: {unhealthy_seen}): {:?}",
            env.tasks("rs_sick", true)
        )
    });

    // depends_on: `after` starts once web runs and the job exited 0;
    // `gated` waits for a service that is never healthy, and says so.
    env.wait_running("rs_after", 1, Duration::from_secs(20));
    let job = env.tasks("rs_job", true);
    assert!(
        job.iter().all(|t| t["state"] == "complete"),
        "after started before its job completed: {job:?}"
    );
    // A global service's tasks name their node from the start: they must
    // still not reach an agent before they are assigned.
    let gated = env.tasks("rs_gated", true);
    assert_eq!(gated.len(), 3, "one per node: {gated:?}");
    for t in &gated {
        assert_eq!(t["state"], "pending", "{gated:?}");
        assert_eq!(
            t["message"], "waiting for service sick to be healthy (depends_on)",
            "{gated:?}"
        );
    }
    assert_eq!(env.containers_of("rs_gated").len(), 0, "a held task ran");
}

/// An agent host dies: its replicas run elsewhere within seconds; when it
/// returns, no duplicates and its old containers are gone.
#[test]
fn agent_host_killed_and_returning() {
    require!();
    let mut env = Env::up(3);
    let file = env.file(
        "ha.yaml",
        "
services:
  web:
    image: gantry.test/web:latest
    deploy:
      replicas: 3
  every:
    image: gantry.test/busybox:latest
    command: [\"sh\", \"-c\", \"trap 'exit 0' TERM; while true; do sleep 1; done\"]
    deploy:
      mode: global
",
    );
    env.deploy("ha", &file);
    env.wait_running("ha_web", 3, Duration::from_secs(30));
    env.wait_running("ha_every", 3, Duration::from_secs(30));
    let service_id = "ha_web".to_string();
    let on_n2: Vec<Value> = env
        .running("ha_web")
        .into_iter()
        .filter(|t| t["node"] == "n2")
        .collect();
    assert_eq!(on_n2.len(), 1, "spread puts one replica on n2");

    env.c.kill("n2").unwrap();
    let killed = Instant::now();
    // The lease is 3 s, so about 3.3 s is expected (the issue asks for about
    // 5 s); the bound leaves room for a loaded CI machine, and the time
    // taken is printed.
    wait_for("n2's replica elsewhere", Duration::from_secs(10), || {
        let running = env.running("ha_web");
        running.len() == 3 && running.iter().all(|t| t["node"] != "n2")
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", env.tasks("ha_web", true)));
    println!("replica moved off n2 in {:?}", killed.elapsed());
    assert_eq!(env.c.node_statuses().unwrap()["n2"], "down");
    // A global service is not moved: its n2 task just stops counting.
    let every = env.running("ha_every");
    assert!(every.iter().all(|t| t["node"] != "n2"), "{every:?}");
    let mut every_nodes = nodes_of(&every);
    every_nodes.sort();
    assert_eq!(every_nodes, vec!["n1", "n3"]);
    // The old container still runs on the dead host's machine (an agent
    // crash does not stop containers).
    assert_eq!(env.service_containers_on("n2", &service_id).len(), 1);

    env.c.start("n2").unwrap();
    env.c
        .wait_node_status("n2", "ready", Duration::from_secs(20))
        .unwrap();
    // Back: the agent is told its old task is gone; it stops it and the
    // count stays at three.
    wait_for("n2's old container gone", Duration::from_secs(20), || {
        env.service_containers_on("n2", &service_id).is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", env.service_containers_on("n2", &service_id)));
    env.wait_running("ha_web", 3, Duration::from_secs(10));
    // Exactly one container per replica is left on the nodes.
    let containers = env.containers_of(&service_id);
    assert_eq!(containers.len(), 3, "{containers:?}");
    assert!(containers.iter().all(|(_, c)| c["state"] == "running"));
    assert_eq!(counts(&env.services(), "ha_web"), (3, 3));
    let old = on_n2[0]["id"].as_str().unwrap();
    let history = env.tasks("ha_web", true);
    let old_now = history.iter().find(|t| t["id"] == old);
    if let Some(old_now) = old_now {
        assert_eq!(old_now["desired_state"], "shutdown", "{old_now}");
        assert_ne!(old_now["state"], "running", "{old_now}");
    }
    // The global service is back to one task per node.
    env.wait_running("ha_every", 3, Duration::from_secs(20));
    let mut every_nodes = nodes_of(&env.running("ha_every"));
    every_nodes.sort();
    assert_eq!(every_nodes, vec!["n1", "n2", "n3"]);
    assert_eq!(counts(&env.services(), "ha_every"), (3, 3));
    let every_id = "ha_every".to_string();
    wait_for(
        "one global container per node",
        Duration::from_secs(20),
        || env.containers_of(&every_id).len() == 3,
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", env.containers_of(&every_id)));
}

/// The controller killed with -9 right after a 20-replica deploy returns:
/// after its restart the stack is still there and converges.
#[test]
fn controller_killed_mid_deploy_converges() {
    require!();
    let mut env = Env::up(3);
    let file = env.file(
        "many.yaml",
        "
services:
  many:
    image: gantry.test/busybox:latest
    command: [\"sleep\", \"1000\"]
    deploy:
      replicas: 20
",
    );
    env.deploy("cc", &file);
    env.c.kill("c1").unwrap();
    env.c.start("c1").unwrap();
    // After the restart the service is there, with what was deployed.
    let mut services = BTreeMap::new();
    let mut last = String::new();
    let back = wait_for("the controller back", Duration::from_secs(20), || match env
        .c
        .gantry_within(&["service", "ls", "-o", "json"], Duration::from_secs(5))
    {
        Ok(out) if out.status.success() => {
            services = serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .into_iter()
                .map(|s| (s["name"].as_str().unwrap_or("").to_string(), s))
                .collect();
            true
        }
        Ok(out) => {
            last = String::from_utf8_lossy(&out.stderr).trim().to_string();
            false
        }
        Err(e) => {
            last = e.to_string();
            false
        }
    });
    // This once failed under heavy load with nothing listening after the
    // restart; the controller's own log says why if it happens again.
    if let Err(e) = back {
        panic!(
            "{e}; last answer: {last}\n--- c1's log (both runs):\n{}",
            env.c.log_tail("c1", 60)
        );
    }
    let many = services.get("many").expect("the service survived the kill");
    assert_eq!(many["replicas"], 20);
    // The whole spec survived: the same file is nothing new to it.
    let dry = env.json(&["deploy", "-p", "cc", "-f", &file, "--dry-run"]);
    for kind in ["create", "update", "remove"] {
        assert_eq!(dry["changes"][kind], serde_json::json!([]), "{dry}");
    }
    env.wait_running("cc_many", 20, Duration::from_secs(30));
    let tasks = env.running("cc_many");
    let slots: BTreeSet<u64> = tasks.iter().map(|t| t["slot"].as_u64().unwrap()).collect();
    assert_eq!(slots, (1..=20).collect(), "one task per slot");
    let running = env
        .containers_of("cc_many")
        .into_iter()
        .filter(|(_, c)| c["state"] == "running")
        .count();
    assert_eq!(running, 20, "no duplicate containers");
}
