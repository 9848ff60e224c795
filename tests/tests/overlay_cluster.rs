//! Issue 5 end to end: a real dev cluster (a controller and three agents,
//! each host a network namespace), a real Compose file, the test images,
//! and what a user sees from inside the containers (`gantry exec`) and from
//! the hosts: names and `tasks.<service>`, task to task across nodes, a VIP
//! spreading over three replicas on three nodes, a published port answering
//! on every node, networks isolating, and removal leaving no rule behind.
//! One cluster, several checks (the cluster is the expensive part).

use gantry_tests::cluster::{self, Cluster, ClusterConfig, wait_for};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const SHOP: &str = r#"
services:
  web:
    image: gantry.test/web:latest
    ports:
      - "8080:80"
    healthcheck:
      test: ["HTTP", "80", "/health"]
      interval: 1s
      timeout: 1s
      retries: 1
    deploy:
      replicas: 3
  client:
    image: gantry.test/busybox:latest
    command: ["sleep", "3600"]
"#;

const OTHER: &str = r#"
services:
  outsider:
    image: gantry.test/busybox:latest
    command: ["sleep", "3600"]
"#;

fn prerequisites() -> Option<&'static str> {
    if let Some(reason) = gantry_tests::engine_test_prerequisites() {
        return Some(reason);
    }
    cluster::missing_network_tools()
}

struct Env {
    c: Cluster,
    files: tempfile::TempDir,
}

impl Env {
    fn run(&self, args: &[&str]) -> Output {
        self.c
            .gantry_within(args, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("gantry {args:?}: {e}"))
    }

    #[track_caller]
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

    fn json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        let text = self.ok(&full);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("gantry {full:?}: {e}: {text}"))
    }

    fn deploy(&self, stack: &str, yaml: &str) {
        let path = self.files.path().join(format!("{stack}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        self.ok(&["deploy", "-p", stack, "-f", path.to_str().unwrap()]);
    }

    fn running(&self, service: &str) -> Vec<Value> {
        self.json(&["service", "ps", service])
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t["desired_state"] == "running" && t["state"] == "running")
            .collect()
    }

    fn wait_running(&self, service: &str, n: usize) -> Vec<Value> {
        let mut last = Vec::new();
        let found = wait_for(
            &format!("{service} to run {n} tasks"),
            Duration::from_secs(40),
            || {
                last = self.running(service);
                last.len() == n
            },
        );
        if let Err(e) = found {
            panic!(
                "{e}: {last:?}\ncontroller log:\n{}",
                self.c.log_tail("c1", 30)
            );
        }
        last
    }

    /// `gantry exec SERVICE sh -c SCRIPT`: (success, stdout).
    fn exec(&self, service: &str, script: &str) -> (bool, String) {
        let out = self.run(&["exec", service, "sh", "-c", script]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// What each agent host's overlay looks like, for a failure message.
    fn diagnose(&self) -> String {
        let mut out = String::new();
        for host in self.c.hosts_with(cluster::Role::Agent) {
            out.push_str(&format!("==== {host}\n"));
            for argv in [
                &["ip", "-br", "addr"][..],
                &["ip", "route"],
                &["ip", "neigh", "show", "dev", "gantry.vx"],
                &["bridge", "fdb", "show", "dev", "gantry.vx"],
                &["nft", "list", "ruleset"],
            ] {
                if let Ok(o) = self.c.exec_in(&host, argv) {
                    out.push_str(&String::from_utf8_lossy(&o.stdout));
                    out.push_str(&String::from_utf8_lossy(&o.stderr));
                }
            }
            out.push_str(&self.c.log_tail(&host, 15));
        }
        out
    }

    /// `nft list table ip gantry_overlay` on `host` ("" when absent).
    fn overlay_table(&self, host: &str) -> String {
        let out = self
            .c
            .exec_in(host, &["nft", "list", "table", "ip", "gantry_overlay"])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn host_busybox() -> &'static str {
    gantry_tests::bundle::HOST_BUSYBOX
}

#[test]
fn services_reach_each_other_by_name_through_vips_and_the_routing_mesh() {
    if let Some(reason) = prerequisites() {
        println!("SKIPPED: {reason}");
        return;
    }
    let images = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/build-test-images.sh"))
        .arg(images.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut config = ClusterConfig::new(gantry_tests::gantry_bin());
    config.name = cluster::unique_name("ov");
    config.agents = 3;
    config.ready_timeout = Duration::from_secs(90);
    let env = Env {
        c: Cluster::up(config).expect("dev cluster up"),
        files: tempfile::tempdir().unwrap(),
    };
    for image in ["web.tar", "busybox.tar"] {
        env.ok(&["image", "load", images.path().join(image).to_str().unwrap()]);
    }
    env.deploy("shop", SHOP);
    env.deploy("other", OTHER);
    let web = env.wait_running("shop_web", 3);
    env.wait_running("shop_client", 1);
    env.wait_running("other_outsider", 1);
    let services: BTreeMap<String, Value> = env
        .json(&["service", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                format!(
                    "{}_{}",
                    s["stack"].as_str().unwrap(),
                    s["name"].as_str().unwrap()
                ),
                s.clone(),
            )
        })
        .collect();
    let vip = services["shop_web"]["virtual_ip"]
        .as_str()
        .unwrap()
        .to_string();
    let mut addresses: Vec<String> = web
        .iter()
        .map(|t| t["address"].as_str().unwrap().to_string())
        .collect();
    addresses.sort();

    // Names: the service, its stack forms, and its tasks.
    let (_, looked) = env.exec(
        "shop_client",
        "nslookup web; nslookup web.shop; nslookup shop_web",
    );
    assert_eq!(looked.matches(&vip).count(), 3, "{looked}");
    // tasks.web: the ready replicas, so all three once their health
    // checks passed.
    let mut tasks = String::new();
    let all_ready = wait_for(
        "tasks.web to name 3 replicas",
        Duration::from_secs(20),
        || {
            tasks = env.exec("shop_client", "nslookup tasks.web").1;
            addresses.iter().all(|a| tasks.contains(a.as_str()))
        },
    );
    assert!(all_ready.is_ok(), "{addresses:?} not all in {tasks}");

    // Task to task across nodes: every replica by its address.
    for a in &addresses {
        let (ok, page) = env.exec(
            "shop_client",
            &format!("timeout 3 wget -q -O - http://{a}/cgi-bin/index.cgi"),
        );
        assert!(
            ok && page.contains(&format!("ip={a}")),
            "{a}: {page:?}\n{}",
            env.diagnose()
        );
    }

    // The VIP spreads 150 requests over the three replicas, each ≥ 20%.
    let (_, pages) = env.exec(
        "shop_client",
        "for i in $(seq 150); do timeout 3 wget -q -O - http://web/cgi-bin/index.cgi; done",
    );
    for a in &addresses {
        let got = pages.matches(&format!("ip={a}\n")).count();
        assert!(got * 5 >= 150, "{a} answered {got} of 150: {pages}");
    }

    // A replica made unhealthy stops receiving new connections within its
    // health interval (1 s, one retry) + 1 s.
    let sick = &web[0];
    let sick_addr = sick["address"].as_str().unwrap().to_string();
    let (ok, _) = {
        let out = env.run(&["exec", sick["id"].as_str().unwrap(), "rm", "/www/health"]);
        (out.status.success(), ())
    };
    assert!(ok, "rm /www/health in {sick}");
    std::thread::sleep(Duration::from_secs(2));
    let (_, pages) = env.exec(
        "shop_client",
        "for i in $(seq 30); do timeout 3 wget -q -O - http://web/cgi-bin/index.cgi; done",
    );
    assert!(
        !pages.contains(&format!("ip={sick_addr}\n")),
        "the unhealthy replica {sick_addr} still answers: {pages}"
    );
    assert!(pages.matches("ip=").count() >= 28, "{pages}");

    // The published port answers on every node's address, from outside.
    for host in env.c.hosts_with(cluster::Role::Agent) {
        let addr = env.c.host_addr(&host).unwrap();
        let out = env
            .c
            .exec_in(
                "c1",
                &[
                    host_busybox(),
                    "timeout",
                    "5",
                    host_busybox(),
                    "wget",
                    "-q",
                    "-O",
                    "-",
                    &format!("http://{addr}:8080/cgi-bin/index.cgi"),
                ],
            )
            .unwrap();
        let page = String::from_utf8_lossy(&out.stdout);
        assert!(page.contains("ip=10.42."), "{host} ({addr}): {page:?}");
    }

    // Networks isolate: another stack's container neither resolves nor
    // reaches the shop's services.
    let (_, nx) = env.exec("other_outsider", "nslookup web 2>&1; echo done");
    assert!(!nx.contains(&vip), "{nx}");
    for target in [vip.as_str(), addresses[0].as_str()] {
        let (ok, page) = env.exec(
            "other_outsider",
            &format!("timeout 2 wget -q -O - http://{target}/cgi-bin/index.cgi"),
        );
        assert!(!ok && page.is_empty(), "{target} reached: {page:?}");
    }

    // Removal: the stacks go, and so do their chains, map entries and
    // network sets, on every node.
    for stack in ["shop", "other"] {
        env.ok(&["stack", "rm", stack]);
    }
    for host in env.c.hosts_with(cluster::Role::Agent) {
        let mut table = String::new();
        let gone = wait_for("the overlay rules to go", Duration::from_secs(20), || {
            table = env.overlay_table(&host);
            // The fixed chains stay (the node is still in the cluster);
            // no service chain, map entry or network set is left.
            table.contains("chain isolate")
                && !table.contains("svc_")
                && !table.contains("goto")
                && !table.contains("set net_")
        });
        assert!(gone.is_ok(), "{host}: {table}");
    }
}
