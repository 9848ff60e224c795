//! End-to-end tests of the agent's task worker: the real engine, as root,
//! on the real kernel, with a busybox image the test builds from Debian's
//! busybox-static and imports into a temporary data directory.
//!
//! Each test runs a [`Worker`] on its own thread ([`Worker::run`]), sends it
//! assignments and reads the task statuses it reports, as the dispatcher
//! client will.

use gantry_agent::engine::container::{ContainerId, ContainerState, Engine, EngineConfig};
use gantry_agent::paths::DataDir;
use gantry_agent::worker::health::{HealthCheck, HealthSetting, HealthStatus, Probe};
use gantry_agent::worker::restart::RestartPolicy;
use gantry_agent::worker::{Control, TaskSpec, TaskState, TaskStatus, Worker, WorkerConfig};
use gantry_tests::bundle::{APPLETS, HOST_BUSYBOX};
use gantry_tests::gantry_bin;
use gantry_tests::image_fixtures::write_single_layer_layout;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const IMAGE: &str = "gtest/busybox:latest";
/// The same with a HEALTHCHECK: `test -f /tmp/ok` every 200 ms, 1 retry.
const CHECKED_IMAGE: &str = "gtest/checked:latest";

macro_rules! require {
    () => {
        if let Some(reason) = gantry_tests::engine_test_prerequisites() {
            println!("SKIPPED: {reason}");
            return;
        }
    };
}

/// A layer with busybox, its applets (and `httpd`), `/tmp` and `/etc/passwd`.
fn busybox_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        match link {
            Some(target) => b.append_link(&mut h, path, target).unwrap(),
            None => b.append_data(&mut h, path, data).unwrap(),
        }
    };
    for d in ["bin/", "etc/", "srv/", "proc/", "sys/", "dev/"] {
        add(d, tar::EntryType::Directory, 0o755, &[], None);
    }
    add("tmp/", tar::EntryType::Directory, 0o1777, &[], None);
    let busybox = std::fs::read(HOST_BUSYBOX).unwrap();
    add(
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        &busybox,
        None,
    );
    for applet in APPLETS.iter().chain(&["httpd"]) {
        add(
            &format!("bin/{applet}"),
            tar::EntryType::Symlink,
            0o777,
            &[],
            Some("busybox"),
        );
    }
    add(
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n",
        None,
    );
    add(
        "srv/index.html",
        tar::EntryType::Regular,
        0o644,
        b"ok\n",
        None,
    );
    b.into_inner().unwrap()
}

/// Writes an OCI layout holding [`IMAGE`] and [`CHECKED_IMAGE`] into `dir`.
fn write_layout(dir: &Path) {
    write_single_layer_layout(
        dir,
        &busybox_layer(),
        &[
            (IMAGE, json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]})),
            (
                CHECKED_IMAGE,
                json!({"Cmd": ["sh"], "Env": ["PATH=/bin"], "Healthcheck": {
                    "Test": ["CMD-SHELL", "test -f /tmp/ok"],
                    "Interval": 200_000_000u64, "Timeout": 5_000_000_000u64, "Retries": 1
                }}),
            ),
        ],
    );
}

/// A temporary node with the test image and a worker running on a thread.
/// Drop stops the worker and removes every container the test made.
struct Node {
    data: tempfile::TempDir,
    engine: Engine,
    control: Sender<Control>,
    events: Receiver<TaskStatus>,
    /// Every status received.
    seen: Vec<TaskStatus>,
    /// Those not yet matched by [`Node::expect`].
    pending: Vec<TaskStatus>,
    worker: Option<JoinHandle<()>>,
}

impl Node {
    fn new() -> Node {
        let data = tempfile::Builder::new()
            .prefix("gantry-wk-")
            .tempdir()
            .unwrap();
        let layout = data.path().join("layout");
        write_layout(&layout);
        let out = Command::new(gantry_bin())
            .args(["image", "import", "--data-dir"])
            .arg(data.path())
            .arg(&layout)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "image import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let engine = Engine::open(EngineConfig {
            data_dir: DataDir::new(data.path()),
            shim_binary: gantry_bin(),
        })
        .unwrap();
        let (control, events, worker) = start_worker(&engine, data.path());
        Node {
            data,
            engine,
            control,
            events,
            seen: Vec::new(),
            pending: Vec::new(),
            worker: Some(worker),
        }
    }

    fn apply(&self, tasks: Vec<TaskSpec>, generation: u64) {
        self.control
            .send(Control::Apply { tasks, generation })
            .unwrap();
    }

    /// The first status not yet matched that matches `pred`, reading more
    /// as needed; panics after `timeout` with everything seen.
    #[track_caller]
    fn expect(&mut self, timeout: Duration, pred: impl Fn(&TaskStatus) -> bool) -> TaskStatus {
        if let Some(i) = self.pending.iter().position(&pred) {
            return self.pending.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(status) => {
                    self.seen.push(status.clone());
                    if pred(&status) {
                        return status;
                    }
                    self.pending.push(status);
                }
                Err(_) => panic!(
                    "no matching status within {timeout:?}; seen:\n{}",
                    self.seen
                        .iter()
                        .map(|s| format!("  {s:?}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }

    /// Stops the worker, leaving its containers as they are.
    fn stop_worker(&mut self) {
        let _ = self.control.send(Control::Shutdown);
        if let Some(worker) = self.worker.take() {
            worker.join().unwrap();
        }
    }

    fn container(&self, id: &str) -> gantry_agent::engine::container::ContainerInfo {
        self.engine
            .inspect(&id.parse::<ContainerId>().unwrap())
            .unwrap()
    }
}

fn start_worker(
    engine: &Engine,
    data: &Path,
) -> (Sender<Control>, Receiver<TaskStatus>, JoinHandle<()>) {
    let (control, control_rx) = channel();
    let (events_tx, events) = channel();
    let worker = Worker::new(
        engine.clone(),
        WorkerConfig {
            data_dir: DataDir::new(data),
            gantry_binary: gantry_bin(),
            tick: Duration::from_millis(20),
        },
        events_tx,
    )
    .unwrap();
    let thread = std::thread::spawn(move || worker.run(control_rx).unwrap());
    (control, events, thread)
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_worker();
        if let Ok(list) = self.engine.list() {
            for info in list {
                let _ = self.engine.remove(&info.id, true);
            }
        }
        let prefix = self.data.path().display().to_string();
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut points: Vec<&str> = info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(&prefix))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// A task running `sh -c script` under `restart`.
fn task(id: &str, script: &str, restart: RestartPolicy) -> TaskSpec {
    TaskSpec {
        task_id: id.to_string(),
        service: "web".into(),
        slot: 1,
        global_node: None,
        image: IMAGE.into(),
        command: Some(vec!["sh".into(), "-c".into(), script.into()]),
        entrypoint: None,
        env: Vec::new(),
        user: None,
        working_dir: None,
        hostname: None,
        mounts: Vec::new(),
        resources: Default::default(),
        restart,
        health: HealthSetting::FromImage,
        network: Default::default(),
        ports: Vec::new(),
        address: None,
        stop_grace: Some(Duration::from_secs(1)),
        labels: Default::default(),
        generation: 1,
    }
}

fn is(id: &'static str, state: TaskState) -> impl Fn(&TaskStatus) -> bool {
    move |s| s.task_id == id && s.state == state
}

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn kill_9_restarts_at_once_and_counts_the_restart() {
    require!();
    let mut node = Node::new();
    node.apply(
        vec![task(
            "task0kill9abcdef",
            "exec sleep 1000",
            RestartPolicy::always(),
        )],
        1,
    );
    let running = node.expect(WAIT, is("task0kill9abcdef", TaskState::Running));
    assert_eq!(running.restarts, 0);
    let container = running.container_id.clone().unwrap();
    let info = node.container(&container);
    assert_eq!(info.name, "web.1.task0kill9ab");
    assert_eq!(
        info.config.labels.get("gantry.task.id").map(String::as_str),
        Some("task0kill9abcdef")
    );
    let pid = info.pid.unwrap();
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let restarted = node.expect(WAIT, |s| {
        s.task_id == "task0kill9abcdef" && s.state == TaskState::Running && s.restarts == 1
    });
    let latency = killed.elapsed();
    println!("first restart after kill -9: {latency:?}");
    assert_eq!(restarted.container_id.as_deref(), Some(container.as_str()));
    let info = node.container(&container);
    assert_eq!(info.state, ContainerState::Running);
    assert_ne!(info.pid, Some(pid));
    // The exit that caused it was reported on the way, as Docker shows it.
    assert!(node.seen.iter().any(|s| s.state == TaskState::Restarting
        && s.exit_code == Some(137)
        && s.message.contains("signal 9")));
    assert!(
        latency < Duration::from_secs(1),
        "first restart took {latency:?}"
    );
}

#[test]
fn on_failure_2_gives_up_after_two_restarts() {
    require!();
    let mut node = Node::new();
    node.apply(
        vec![task(
            "task1onfail2abcd",
            "exit 3",
            "on-failure:2".parse().unwrap(),
        )],
        1,
    );
    let failed = node.expect(WAIT, is("task1onfail2abcd", TaskState::Failed));
    assert_eq!(failed.restarts, 2);
    assert_eq!(failed.exit_code, Some(3));
    assert!(
        failed.message.contains("gave up after 2 restart attempts"),
        "{}",
        failed.message
    );
    // And it stays down: an absence has no condition to wait for, so watch
    // a bounded window (longer than the back-off that a restart would use).
    std::thread::sleep(Duration::from_millis(500));
    let info = node.container(failed.container_id.as_deref().unwrap());
    assert_eq!(info.state, ContainerState::Exited);
    assert!(node.events.try_recv().is_err());
}

#[test]
fn crash_loop_backs_off() {
    require!();
    let mut node = Node::new();
    node.apply(
        vec![task("task2loopabcdef", "exit 1", RestartPolicy::always())],
        1,
    );
    // Starts: the first run and five restarts; back-off 0, 100, 200, 400, 800 ms.
    let mut starts = Vec::new();
    for restarts in 0..=5 {
        node.expect(WAIT, |s| {
            s.task_id == "task2loopabcdef" && s.restarts == restarts && s.message.contains("start")
        });
        starts.push(Instant::now());
    }
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    println!("crash loop gaps between starts: {gaps:?}");
    // Each wait doubles: the later gaps are clearly longer than the first.
    assert!(gaps[4] > gaps[0] + Duration::from_millis(500), "{gaps:?}");
    assert!(gaps[4] > gaps[2], "{gaps:?}");
    let backoffs: Vec<&str> = node
        .seen
        .iter()
        .filter_map(|s| s.message.split("restarting in ").nth(1))
        .collect();
    assert_eq!(backoffs[..5], ["0ns", "100ms", "200ms", "400ms", "800ms"]);
}

#[test]
fn failing_exec_health_check_makes_the_task_unhealthy_and_restarts_it() {
    require!();
    let mut node = Node::new();
    let check = |script: &str| HealthCheck {
        interval: Duration::from_millis(200),
        timeout: Duration::from_secs(5),
        retries: 2,
        start_period: Duration::ZERO,
        ..HealthCheck::new(Probe::Exec(vec!["sh".into(), "-c".into(), script.into()]))
    };
    let mut sick = task(
        "task3sickabcdef",
        "exec sleep 1000",
        RestartPolicy::always(),
    );
    sick.health = HealthSetting::Check(check("echo not ready; test -f /tmp/ok"));
    let mut well = task(
        "task3wellabcdef",
        "touch /tmp/ok; exec sleep 1000",
        RestartPolicy::always(),
    );
    well.service = "api".into();
    well.health = HealthSetting::Check(check("test -f /tmp/ok"));
    node.apply(vec![sick, well], 1);
    node.expect(WAIT, |s| {
        s.task_id == "task3wellabcdef" && s.health == Some(HealthStatus::Healthy)
    });
    let unhealthy = node.expect(WAIT, |s| {
        s.task_id == "task3sickabcdef" && s.health == Some(HealthStatus::Unhealthy)
    });
    assert!(
        unhealthy.message.contains("not ready"),
        "probe output kept: {}",
        unhealthy.message
    );
    let restarted = node.expect(WAIT, |s| {
        s.task_id == "task3sickabcdef" && s.state == TaskState::Running && s.restarts == 1
    });
    // A restarted container starts over: health is starting again.
    assert_eq!(restarted.health, Some(HealthStatus::Starting));
    assert!(node.seen.iter().any(|s| s.task_id == "task3sickabcdef"
        && s.state == TaskState::Restarting
        && s.message.contains("unhealthy")));
    // The healthy one was never touched.
    assert!(
        !node
            .seen
            .iter()
            .any(|s| s.task_id == "task3wellabcdef" && s.restarts > 0)
    );
}

#[test]
fn exec_probe_timeout_kills_the_probe() {
    require!();
    let mut node = Node::new();
    let mut slow = task("task4slowabcdef", "exec sleep 1000", RestartPolicy::never());
    slow.health = HealthSetting::Check(HealthCheck {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(300),
        retries: 1,
        start_period: Duration::ZERO,
        ..HealthCheck::new(Probe::Exec(vec!["sleep".into(), "77".into()]))
    });
    node.apply(vec![slow], 1);
    let unhealthy = node.expect(WAIT, |s| {
        s.task_id == "task4slowabcdef" && s.health == Some(HealthStatus::Unhealthy)
    });
    assert!(
        unhealthy.message.contains("exceeded timeout"),
        "{}",
        unhealthy.message
    );
    // Policy `no`: the unhealthy task is stopped and fails, not restarted.
    let failed = node.expect(WAIT, is("task4slowabcdef", TaskState::Failed));
    assert_eq!(failed.restarts, 0);
    // The timed-out probe was killed: no `sleep 77` is left anywhere (the
    // kill is asynchronous, so wait, bounded, for the processes to be gone).
    let probe_left = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .any(|c| c == b"sleep\x0077\x00")
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while probe_left() {
        assert!(Instant::now() < deadline, "the timed-out probe still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tcp_and_http_probes_reach_the_container() {
    require!();
    let mut node = Node::new();
    let probe_check = |probe| HealthCheck {
        interval: Duration::from_millis(200),
        timeout: Duration::from_secs(2),
        retries: 2,
        start_period: Duration::from_secs(5),
        ..HealthCheck::new(probe)
    };
    let mut http = task(
        "task5httpabcdef",
        "exec httpd -f -p 8080 -h /srv",
        RestartPolicy::always(),
    );
    http.health = HealthSetting::Check(probe_check(Probe::Http {
        port: 8080,
        path: "/index.html".into(),
    }));
    let mut tcp = task(
        "task5tcpabcdefg",
        "exec sleep 1000",
        RestartPolicy::always(),
    );
    tcp.service = "db".into();
    tcp.health = HealthSetting::Check(probe_check(Probe::Tcp { port: 5432 }));
    node.apply(vec![http, tcp], 1);
    node.expect(WAIT, |s| {
        s.task_id == "task5httpabcdef" && s.health == Some(HealthStatus::Healthy)
    });
    // Nothing listens on 5432 in its namespace (nor does the host's count).
    let bad = node.expect(WAIT, |s| {
        s.task_id == "task5tcpabcdefg" && s.health == Some(HealthStatus::Unhealthy)
    });
    assert!(
        bad.message.contains("connect to port 5432"),
        "{}",
        bad.message
    );
}

#[test]
fn policy_no_reports_complete_or_failed_with_the_exit_code() {
    require!();
    let mut node = Node::new();
    node.apply(
        vec![task("task6okabcdefgh", "exit 0", RestartPolicy::never()), {
            let mut t = task("task6badabcdefg", "exit 5", RestartPolicy::never());
            t.slot = 2;
            t
        }],
        1,
    );
    let ok = node.expect(WAIT, is("task6okabcdefgh", TaskState::Complete));
    assert_eq!((ok.exit_code, ok.restarts), (Some(0), 0));
    let bad = node.expect(WAIT, is("task6badabcdefg", TaskState::Failed));
    assert_eq!((bad.exit_code, bad.restarts), (Some(5), 0));
    assert!(
        bad.message.contains("restart policy is no"),
        "{}",
        bad.message
    );
}

#[test]
fn removing_an_assignment_stops_and_removes_the_container() {
    require!();
    let mut node = Node::new();
    let spec = task(
        "task7goneabcdef",
        "exec sleep 1000",
        RestartPolicy::always(),
    );
    node.apply(vec![spec.clone()], 5);
    let running = node.expect(WAIT, is("task7goneabcdef", TaskState::Running));
    let container = running.container_id.unwrap();
    node.apply(Vec::new(), 6);
    let shutdown = node.expect(WAIT, is("task7goneabcdef", TaskState::Shutdown));
    assert_eq!(shutdown.container_id.as_deref(), Some(container.as_str()));
    assert!(node.engine.list().unwrap().is_empty());
    // A stale generation changes nothing.
    node.apply(vec![spec], 4);
    // Nothing may happen: watch a bounded window longer than a worker tick.
    std::thread::sleep(Duration::from_millis(300));
    assert!(node.engine.list().unwrap().is_empty());
    assert!(node.events.try_recv().is_err());
}

#[test]
fn a_new_worker_adopts_running_containers_without_restarting_them() {
    require!();
    let mut node = Node::new();
    let keep = task(
        "task8keepabcdef",
        "exec sleep 1000",
        RestartPolicy::always(),
    );
    let mut drop_me = task(
        "task8dropabcdef",
        "exec sleep 1000",
        RestartPolicy::always(),
    );
    drop_me.slot = 2;
    node.apply(vec![keep.clone(), drop_me], 1);
    let running = node.expect(WAIT, is("task8keepabcdef", TaskState::Running));
    node.expect(WAIT, is("task8dropabcdef", TaskState::Running));
    let container = running.container_id.unwrap();
    let pid = node.container(&container).pid;
    // The agent restarts: its containers run on.
    node.stop_worker();
    assert_eq!(node.container(&container).state, ContainerState::Running);
    let (control, events, worker) = start_worker(&node.engine, node.data.path());
    node.control = control;
    node.events = events;
    node.pending.clear();
    node.worker = Some(worker);
    node.apply(vec![keep], 2);
    let adopted = node.expect(WAIT, is("task8keepabcdef", TaskState::Running));
    assert_eq!(adopted.container_id.as_deref(), Some(container.as_str()));
    assert!(adopted.message.contains("adopted"), "{}", adopted.message);
    assert_eq!(node.container(&container).pid, pid);
    // The task no longer assigned was removed.
    node.expect(WAIT, is("task8dropabcdef", TaskState::Shutdown));
    assert_eq!(node.engine.list().unwrap().len(), 1);
    // And the adopted one is still watched: a kill restarts it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid.unwrap()),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    node.expect(WAIT, |s| {
        s.task_id == "task8keepabcdef" && s.state == TaskState::Running && s.restarts == 1
    });
}

#[test]
fn the_image_healthcheck_applies_unless_the_spec_disables_it() {
    require!();
    let mut node = Node::new();
    let mut good = task(
        "task9goodabcdef",
        "touch /tmp/ok; exec sleep 1000",
        RestartPolicy::always(),
    );
    good.image = CHECKED_IMAGE.into();
    let mut bad = task("task9badabcdefg", "exec sleep 1000", RestartPolicy::never());
    bad.image = CHECKED_IMAGE.into();
    bad.slot = 2;
    let mut off = task(
        "task9offabcdefg",
        "exec sleep 1000",
        RestartPolicy::always(),
    );
    off.image = CHECKED_IMAGE.into();
    off.slot = 3;
    off.health = HealthSetting::Disabled;
    node.apply(vec![good, bad, off], 1);
    node.expect(WAIT, |s| {
        s.task_id == "task9goodabcdef" && s.health == Some(HealthStatus::Healthy)
    });
    node.expect(WAIT, |s| {
        s.task_id == "task9badabcdefg" && s.health == Some(HealthStatus::Unhealthy)
    });
    node.expect(WAIT, is("task9badabcdefg", TaskState::Failed));
    assert!(
        node.seen
            .iter()
            .filter(|s| s.task_id == "task9offabcdefg")
            .all(|s| s.health.is_none())
    );
}
