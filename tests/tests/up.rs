//! `gantry up`: the one-process, one-machine cluster. A user runs it, then
//! uses the CLI with no flags: the node is ready, an image loaded into it and
//! a Compose file deployed run, and SIGTERM stops it cleanly (context file
//! gone, exit 0), leaving containers to the next agent as any agent stop does.
//!
//! The controller listens on a free loopback port and the context file is
//! moved with `GANTRY_CONTEXT_FILE`, so the test never redirects this
//! machine's CLI. Tasks use the host's network, so nothing is created in
//! the machine's own network namespace.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use gantry_tests::image_fixtures::free_port;
use gantry_tests::{engine_test_prerequisites, gantry_bin};

/// A `gantry up` process plus its data dir; Drop kills it by PID and removes
/// every container it left.
struct Up {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Up {
    fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn context_file(&self) -> PathBuf {
        self.dir.path().join("context.json")
    }

    /// Runs the CLI the way a user would: no `--controller`, the context
    /// file says where `gantry up` is.
    fn gantry(&self, args: &[&str]) -> Output {
        Command::new(gantry_bin())
            .args(args)
            .env("GANTRY_CONTEXT_FILE", self.context_file())
            .env_remove("GANTRY_CONTROLLER")
            .stdin(Stdio::null())
            .output()
            .expect("run gantry")
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.gantry(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&out)))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let node = |args: &[&str]| {
            Command::new(gantry_bin())
                .arg("container")
                .args(args)
                .env("GANTRY_DATA_DIR", self.dir.path())
                .stdin(Stdio::null())
                .output()
        };
        if let Ok(out) = node(&["ps", "-a", "-q"]) {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = node(&["rm", "-f", id]);
            }
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

#[test]
fn up_runs_a_one_machine_cluster_the_cli_finds_without_flags() {
    if let Some(reason) = engine_test_prerequisites() {
        println!("SKIPPED: {reason}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("up.log")).expect("log file");
    let child = Command::new(gantry_bin())
        .args([
            "up",
            "--listen",
            &listen,
            "--hostname",
            "solo",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("GANTRY_CONTEXT_FILE", dir.path().join("context.json"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("start gantry up");
    let mut up = Up {
        child: Some(child),
        dir,
    };

    // The context file names the controller; `node ls` with no flags finds
    // the node this machine's agent registered.
    wait_until("the node to be ready", Duration::from_secs(20), || {
        let out = up.gantry(&["node", "ls", "-o", "json"]);
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .map(|nodes| nodes[0]["status"] == "ready" && nodes[0]["hostname"] == "solo")
                .unwrap_or(false)
    });
    let context: serde_json::Value =
        serde_json::from_slice(&std::fs::read(up.context_file()).expect("context file"))
            .expect("context json");
    assert_eq!(context["controller"], listen.as_str());
    assert_eq!(context["source"], "gantry up");

    // An image loaded into it and a stack deployed onto it run.
    let images = up.data_dir().join("images-out");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/images/build-test-images.sh");
    let built = Command::new("bash")
        .arg(script)
        .arg(&images)
        .stdin(Stdio::null())
        .output()
        .expect("run build-test-images.sh");
    assert!(
        built.status.success(),
        "build-test-images.sh: {}",
        text(&built)
    );
    let loaded = up.gantry(&[
        "image",
        "load",
        images.join("busybox.tar").to_str().expect("utf-8"),
    ]);
    assert!(loaded.status.success(), "image load: {}", text(&loaded));

    let compose = up.data_dir().join("compose.yaml");
    std::fs::write(
        &compose,
        "services:\n  sleeper:\n    image: gantry.test/busybox:latest\n    \
         command: [\"sleep\", \"3600\"]\n    network_mode: host\n    deploy:\n      replicas: 2\n",
    )
    .expect("write compose file");
    let deployed = up.gantry(&[
        "deploy",
        "-f",
        compose.to_str().expect("utf-8"),
        "--stack",
        "solo",
        "--wait",
        "--timeout",
        "30s",
    ]);
    assert!(deployed.status.success(), "deploy: {}", text(&deployed));
    let tasks = up.json(&["ps", "-o", "json"]);
    let tasks = tasks.as_array().expect("task list");
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    for task in tasks {
        assert_eq!(task["state"], "running", "{task}");
        assert_eq!(task["node"], "solo", "{task}");
    }

    // SIGTERM: the agent stops, then the controller; exit 0; the context
    // file goes with it.
    let mut child = up.child.take().expect("child");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gantry up did not exit within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "gantry up exited with {status}");
    assert!(
        !up.context_file().exists(),
        "the context file outlived gantry up"
    );
}
