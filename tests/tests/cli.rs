//! The client commands end to end against a real `gantry controller` on
//! loopback, with no agents: what a user sees before any node joins
//! (services listed with nothing running, tasks pending with the
//! scheduler's reason), dry runs that change nothing, bad files refused
//! with exit 2 and the cluster unchanged, scale and removal.
//!
//! Needs nothing but the binary: no root, no kernel features. It runs
//! `gantry controller --listen ADDR --data-dir DIR`, the command line the
//! lead wires to `gantry_controller::server::serve`; until that is in the
//! binary these tests fail (loudly, with the controller's output).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A `gantry controller` process on a loopback port, killed (by its pid)
/// and reaped when dropped, even when the test fails.
struct Controller {
    child: Child,
    addr: SocketAddr,
    _data: tempfile::TempDir,
}

impl Controller {
    fn start() -> Controller {
        let data = tempfile::tempdir().unwrap();
        // A port the kernel just handed out and we let go of: another
        // process could take it in between, which the readiness wait below
        // would report rather than hide.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = std::fs::File::create(data.path().join("controller.log")).unwrap();
        let child = Command::new(gantry_tests::gantry_bin())
            .args(["controller", "--listen", &addr.to_string(), "--data-dir"])
            .arg(data.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut controller = Controller {
            child,
            addr,
            _data: data,
        };
        controller.wait_ready();
        controller
    }

    /// Waits until the port accepts connections (at most 10 s), failing
    /// with the controller's log if it exits first.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the controller exited with {status}: {}", self.log());
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the controller did not listen on {} within 10 s: {}",
            self.addr,
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._data.path().join("controller.log")).unwrap_or_default()
    }

    fn gantry(&self, args: &[&str]) -> Output {
        Command::new(gantry_tests::gantry_bin())
            .arg("--controller")
            .arg(self.addr.to_string())
            .args(args)
            .env_remove("GANTRY_CONTROLLER")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed and returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.gantry(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "gantry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    /// Polls `ps -o json` until `check` holds (at most 10 s): the
    /// orchestrator and scheduler act on the deploy asynchronously.
    fn wait_tasks(
        &self,
        args: &[&str],
        what: &str,
        check: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tasks = self.json(args);
            let tasks = tasks.as_array().unwrap().clone();
            if check(&tasks) {
                return tasks;
            }
            if Instant::now() > deadline {
                panic!("{what} within 10 s; last `gantry {args:?}`: {tasks:#?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `compose.yaml` into `dir/name/` and returns its path.
fn compose(dir: &Path, name: &str, body: &str) -> PathBuf {
    let project = dir.join(name);
    std::fs::create_dir_all(&project).unwrap();
    let file = project.join("compose.yaml");
    std::fs::write(&file, body).unwrap();
    file
}

const DEMO: &str = "\
services:
  web:
    image: nginx:1.27
    ports: [\"8080:80\"]
    deploy:
      replicas: 2
  worker:
    image: busybox
    command: [\"sleep\", \"1000\"]
";

fn services_by_name(services: &Value) -> std::collections::BTreeMap<String, Value> {
    services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_string(), s.clone()))
        .collect()
}

#[test]
fn deploy_lists_services_with_nothing_running_and_tasks_pending_for_want_of_nodes() {
    let c = Controller::start();
    let dir = tempfile::tempdir().unwrap();
    let file = compose(dir.path(), "demo", DEMO);
    let out = c.ok(&["deploy", "-f", file.to_str().unwrap()]);
    assert_eq!(
        out,
        "Creating service demo_web\nCreating service demo_worker\n"
    );

    let services = services_by_name(&c.json(&["service", "ls"]));
    assert_eq!(services.len(), 2);
    let web = &services["web"];
    assert_eq!(web["stack"], "demo");
    assert_eq!(web["mode"], "replicated");
    assert_eq!(web["replicas"], 2);
    assert_eq!(web["running"], 0);
    assert_eq!(web["ports"][0], "*:8080->80/tcp");
    // Each service gets a virtual IP from the default service CIDR.
    assert_eq!(web["endpoint_mode"], "vip");
    let vip = web["virtual_ip"].as_str().unwrap_or_default();
    assert!(vip.starts_with("10.43.0."), "{web}");

    let tasks = c.wait_tasks(&["ps"], "three tasks pending with a reason", |tasks| {
        tasks.len() == 3
            && tasks
                .iter()
                .all(|t| t["state"] == "pending" && t["error"].as_str().is_some())
    });
    for t in &tasks {
        assert_eq!(t["desired_state"], "running");
        assert_eq!(t["node"], Value::Null);
        assert_eq!(t["restarts"], 0);
        let error = t["error"].as_str().unwrap();
        assert!(error.contains("no node"), "{error}");
    }
    let web_tasks = c.json(&["service", "ps", "demo_web"]);
    let mut slots: Vec<u64> = web_tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["slot"].as_u64().unwrap())
        .collect();
    slots.sort();
    assert_eq!(slots, [1, 2]);

    // The people's forms of the same data.
    let table = c.ok(&["service", "ls"]);
    let web_line: Vec<&str> = table
        .lines()
        .find(|l| l.contains("demo_web"))
        .unwrap_or_else(|| panic!("{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(web_line[1..4], ["demo_web", "replicated", "0/2"], "{table}");
    let table = c.ok(&["stack", "ps", "demo"]);
    assert!(
        table.contains("demo_web.1") && table.contains("Pending"),
        "{table}"
    );
    assert_eq!(c.ok(&["stack", "ls"]), "NAME   SERVICES\ndemo   2\n");
    assert!(c.json(&["node", "ls"]).as_array().unwrap().is_empty());

    // The same file again changes nothing.
    let out = c.ok(&["deploy", "-f", file.to_str().unwrap()]);
    assert_eq!(out, "Stack demo is up to date\n");
}

#[test]
fn a_dry_run_prints_the_stack_and_the_changes_and_changes_nothing() {
    let c = Controller::start();
    let dir = tempfile::tempdir().unwrap();
    let file = compose(dir.path(), "demo", DEMO);
    let file = file.to_str().unwrap();

    let plan = c.json(&["deploy", "-f", file, "--dry-run"]);
    assert_eq!(plan["stack"]["name"], "demo");
    assert_eq!(plan["stack"]["services"]["web"]["deploy"]["replicas"], 2);
    let mut create: Vec<&str> = plan["changes"]["create"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    create.sort();
    assert_eq!(create, ["web", "worker"]);
    assert!(c.json(&["stack", "ls"]).as_array().unwrap().is_empty());
    assert!(c.json(&["service", "ls"]).as_array().unwrap().is_empty());

    // After a real deploy, a dry run of a changed file reports the update
    // and leaves the service as it was.
    c.ok(&["deploy", "-f", file]);
    compose(
        dir.path(),
        "demo",
        &DEMO.replace("nginx:1.27", "nginx:1.28"),
    );
    let plan = c.json(&["deploy", "-f", file, "--dry-run"]);
    assert_eq!(plan["changes"]["update"][0]["service"], "web");
    assert_eq!(plan["changes"]["update"][0]["fields"][0], "image");
    let web = c.json(&["service", "inspect", "demo_web"]);
    assert_eq!(web["image"], "nginx:1.27");
}

#[test]
fn a_bad_file_exits_2_naming_the_key_and_leaves_the_cluster_unchanged() {
    let c = Controller::start();
    let dir = tempfile::tempdir().unwrap();
    let good = compose(dir.path(), "demo", DEMO);
    c.ok(&["deploy", "-f", good.to_str().unwrap()]);
    let before = c.json(&["service", "ls"]);

    let bad = compose(
        dir.path(),
        "demo",
        &DEMO.replace("      replicas: 2", "      replcas: 5"),
    );
    let out = c.gantry(&["deploy", "-f", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown key `replcas`") && err.contains("line 6"),
        "{err}"
    );
    assert!(err.contains("did you mean `replicas`"), "{err}");

    let malformed = compose(dir.path(), "demo", "services:\n  web: [unclosed\n");
    let out = c.gantry(&["deploy", "-f", malformed.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));

    let missing = c.gantry(&["deploy", "-f", "/nonexistent/compose.yaml"]);
    assert_eq!(missing.status.code(), Some(2));

    assert_eq!(c.json(&["service", "ls"]), before);
}

#[test]
fn scale_and_remove() {
    let c = Controller::start();
    let dir = tempfile::tempdir().unwrap();
    let file = compose(dir.path(), "demo", DEMO);
    c.ok(&["deploy", "-f", file.to_str().unwrap()]);

    assert_eq!(c.ok(&["service", "scale", "web=3"]), "web scaled to 3\n");
    let web = c.json(&["service", "inspect", "web"]);
    assert_eq!(web["replicas"], 3);
    assert_eq!(web["desired"], 3);
    c.wait_tasks(&["service", "ps", "web"], "three web tasks", |t| {
        t.len() == 3
    });

    // A bad count is refused by the parser, an unknown service by the
    // controller; both are bad input.
    let out = c.gantry(&["service", "scale", "web=x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("web=x"));
    let out = c.gantry(&["service", "scale", "nope=1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));

    assert_eq!(c.ok(&["service", "rm", "worker"]), "worker\n");
    let names: Vec<String> = services_by_name(&c.json(&["service", "ls"]))
        .into_keys()
        .collect();
    assert_eq!(names, ["web"]);
    let out = c.gantry(&["service", "rm", "worker"]);
    assert_eq!(out.status.code(), Some(2));

    assert_eq!(
        c.ok(&["stack", "rm", "demo"]),
        "Removing service demo_web\n"
    );
    assert!(c.json(&["service", "ls"]).as_array().unwrap().is_empty());
    c.wait_tasks(&["ps"], "no tasks meant to run", |t| t.is_empty());
    let out = c.gantry(&["stack", "rm", "demo"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn controller_cidr_flags_are_validated_by_name() {
    let data = tempfile::tempdir().unwrap();
    for (flags, expected) in [
        (
            ["--cluster-cidr", "10.42.0.0/23"],
            "--cluster-cidr \"10.42.0.0/23\": the prefix must be /22 or shorter",
        ),
        (
            ["--service-cidr", "10.42.8.0/24"],
            "--cluster-cidr 10.42.0.0/16 overlaps --service-cidr 10.42.8.0/24",
        ),
        (
            ["--service-cidr", "fd00::/108"],
            "--service-cidr \"fd00::/108\"",
        ),
    ] {
        let out = Command::new(gantry_tests::gantry_bin())
            .args(["controller", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .args(flags)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(expected), "{flags:?}: {err}");
    }
}

#[test]
fn node_commands_name_unknown_nodes_as_bad_input() {
    let c = Controller::start();
    let out = c.gantry(&["node", "inspect", "ghost"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ghost"));
    let out = c.gantry(&["node", "update", "--availability", "drain", "ghost"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn deploy_wait_times_out_explaining_why_tasks_are_pending() {
    let c = Controller::start();
    let dir = tempfile::tempdir().unwrap();
    let file = compose(dir.path(), "demo", DEMO);
    let out = c.gantry(&[
        "deploy",
        "-f",
        file.to_str().unwrap(),
        "--wait",
        "--timeout",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("demo_web: 0/2 running"), "{err}");
    assert!(
        err.contains("demo_web.1") && err.contains("no node"),
        "{err}"
    );
    assert!(
        err.contains("not every service is running its tasks after 1 second"),
        "{err}"
    );
}
