//! The multi-host harness (`gantry_tests::cluster`, also `gantry dev
//! cluster`), as root on the real kernel.
//!
//! The plumbing is proved with stand-in processes (busybox `httpd` per host):
//! reachability between hosts and from this machine, kill -9, SIGSTOP and
//! SIGCONT, link cuts, separate CLI invocations acting on the recorded
//! cluster, and a teardown that leaves no namespace, link, process or file.
//! `real_cluster_*` brings up real `gantry controller` and `gantry agent`
//! processes and checks that `gantry node ls` shows every agent ready.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gantry_tests::cluster::{
    self, Cluster, ClusterConfig, ProcessState, Readiness, RoleCommands, net, wait_for,
};

fn prerequisites() -> Option<&'static str> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (network namespaces, a bridge)");
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("needs busybox-static (/bin/busybox) for the stand-in hosts");
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

/// Each host serves `<role> <host>` over HTTP: the controller on its API
/// port, agents on 8080.
fn stand_in_config(agents: u32) -> ClusterConfig {
    let mut config = ClusterConfig::new(gantry_tests::gantry_bin());
    config.name = cluster::unique_name("t");
    config.agents = agents;
    config.readiness = Readiness::ControllerPort;
    config.ready_timeout = Duration::from_secs(10);
    let serve = |role: &str, port: &str| {
        vec![
            "/bin/busybox".to_string(),
            "sh".into(),
            "-c".into(),
            format!(
                "echo {role} {{host}} > {{data_dir}}/index.html && \
                 exec /bin/busybox httpd -f -p {{addr}}:{port} -h {{data_dir}}"
            ),
        ]
    };
    config.commands = Some(RoleCommands {
        controller: serve("controller", "7070"),
        agent: serve("agent", "8080"),
    });
    config
}

/// GETs `url` with busybox wget (bounded by `timeout`, since busybox's own
/// `-T` crashes), from `host`'s netns or from this machine.
fn fetch(cluster: &Cluster, from: Option<&str>, url: &str) -> Option<String> {
    let argv = ["timeout", "2", "/bin/busybox", "wget", "-q", "-O", "-", url];
    let out = match from {
        Some(host) => cluster.exec_in(host, &argv).ok()?,
        None => Command::new(argv[0]).args(&argv[1..]).output().ok()?,
    };
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn url(cluster: &Cluster, host: &str) -> String {
    let port = if host.starts_with('c') { 7070 } else { 8080 };
    format!("http://{}:{port}/", cluster.host_addr(host).unwrap())
}

fn state_of(cluster: &Cluster, host: &str) -> (ProcessState, bool, Option<i32>) {
    let s = cluster
        .status()
        .into_iter()
        .find(|s| s.name == host)
        .unwrap();
    (s.process, s.partitioned, s.pid)
}

/// What a cluster leaves on the machine, to check that `down` removes it all.
struct Footprint {
    netns: Vec<String>,
    links: Vec<String>,
    pids: Vec<i32>,
    paths: Vec<PathBuf>,
}

fn footprint(cluster: &Cluster) -> Footprint {
    let rec = cluster.record();
    Footprint {
        netns: rec.hosts.iter().map(|h| h.netns.clone()).collect(),
        links: rec
            .hosts
            .iter()
            .map(|h| h.veth.clone())
            .chain([rec.bridge.clone()])
            .collect(),
        pids: cluster.status().iter().filter_map(|s| s.pid).collect(),
        paths: vec![
            rec.base_dir.clone(),
            PathBuf::from(cluster::DEFAULT_STATE_ROOT).join(&rec.name),
        ],
    }
}

fn assert_gone(f: &Footprint) {
    for ns in &f.netns {
        assert!(!net::netns_exists(ns), "netns {ns} left behind");
    }
    for link in &f.links {
        assert!(!net::link_exists(link), "link {link} left behind");
    }
    for pid in &f.pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let rest = state.rsplit(')').next().unwrap_or("");
        assert!(
            state.is_empty() || rest.trim_start().starts_with('Z'),
            "process {pid} still running: {state}"
        );
    }
    for path in &f.paths {
        assert!(!path.exists(), "{} left behind", path.display());
    }
}

#[test]
fn stand_in_hosts_reach_each_other_and_faults_take_effect() {
    require!();
    let context_dir = tempfile::tempdir().unwrap();
    let context = context_dir.path().join("context.json");
    let mut config = stand_in_config(2);
    config.context_file = Some(context.clone());
    let mut c = Cluster::up(config).expect("cluster up");
    let name = c.name().to_string();

    // Addresses in order on the cluster's subnet, c1 first after the bridge.
    let subnet = c.record().subnet;
    assert_eq!(c.host_addr("c1").unwrap(), subnet.nth(2).unwrap());
    assert_eq!(c.host_addr("n2").unwrap(), subnet.nth(4).unwrap());
    let ctx: cluster::Context = serde_json::from_slice(&std::fs::read(&context).unwrap()).unwrap();
    assert_eq!(ctx.controller, format!("{}:7070", subnet.nth(2).unwrap()));
    assert_eq!(ctx.source, format!("dev cluster {name}"));

    // Every host reaches the others, and this machine reaches every host.
    for h in ["n1", "n2"] {
        let u = url(&c, h);
        wait_for(&format!("{h} to serve"), Duration::from_secs(10), || {
            fetch(&c, None, &u).is_some()
        })
        .unwrap();
    }
    let c1 = url(&c, "c1");
    assert_eq!(fetch(&c, None, &c1).as_deref(), Some("controller c1"));
    assert_eq!(fetch(&c, Some("n1"), &c1).as_deref(), Some("controller c1"));
    assert_eq!(
        fetch(&c, Some("n2"), &url(&c, "n1")).as_deref(),
        Some("agent n1")
    );
    for h in ["c1", "n1", "n2"] {
        let (p, part, pid) = state_of(&c, h);
        assert_eq!((p, part), (ProcessState::Running, false), "{h}");
        assert!(pid.is_some());
    }
    // Forwarding is on inside hosts (agents route their containers).
    let fwd = c
        .exec_in("n1", &["cat", "/proc/sys/net/ipv4/ip_forward"])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");

    // Partition: n1 is cut off both ways; the others still talk; heal undoes it.
    c.partition("n1").unwrap();
    assert!(state_of(&c, "n1").1, "n1 shows as partitioned");
    assert_eq!(fetch(&c, Some("n1"), &c1), None, "n1 still reaches c1");
    assert_eq!(fetch(&c, None, &url(&c, "n1")), None, "n1 still reachable");
    assert_eq!(fetch(&c, Some("n2"), &c1).as_deref(), Some("controller c1"));
    c.heal("n1").unwrap();
    assert!(!state_of(&c, "n1").1);
    assert_eq!(fetch(&c, Some("n1"), &c1).as_deref(), Some("controller c1"));

    // Stop: the controller's process is frozen (connections hang), start resumes it.
    let pid_before = state_of(&c, "c1").2;
    c.stop("c1").unwrap();
    assert_eq!(state_of(&c, "c1").0, ProcessState::Stopped);
    assert_eq!(fetch(&c, Some("n1"), &c1), None, "a stopped host answered");
    c.start("c1").unwrap();
    assert_eq!(state_of(&c, "c1").0, ProcessState::Running);
    assert_eq!(
        state_of(&c, "c1").2,
        pid_before,
        "SIGCONT keeps the process"
    );
    assert_eq!(fetch(&c, Some("n1"), &c1).as_deref(), Some("controller c1"));

    // Kill: the process is gone; start runs a new one with the same command.
    let old = state_of(&c, "n2").2.unwrap();
    c.kill("n2").unwrap();
    assert_eq!(state_of(&c, "n2").0, ProcessState::Killed);
    assert_eq!(fetch(&c, Some("n1"), &url(&c, "n2")), None);
    c.start("n2").unwrap();
    let new = state_of(&c, "n2").2.unwrap();
    assert_ne!(old, new);
    let u = url(&c, "n2");
    wait_for("n2 to serve again", Duration::from_secs(10), || {
        fetch(&c, Some("n1"), &u).as_deref() == Some("agent n2")
    })
    .unwrap();

    let f = footprint(&c);
    c.down().expect("down");
    assert_gone(&f);
    assert!(!context.exists(), "down removes the context it wrote");
    // Idempotent: a second down of the same name finds nothing.
    assert!(!Cluster::down_named(&name, Path::new(cluster::DEFAULT_STATE_ROOT)).unwrap());
}

/// `gantry dev cluster ls|kill|start|partition|heal|down` in separate
/// processes act on the cluster this process built, through its record.
#[test]
fn separate_cli_invocations_act_on_the_recorded_cluster() {
    require!();
    let mut c = Cluster::up(stand_in_config(1)).expect("cluster up");
    let name = c.name().to_string();
    let dev = |args: &[&str]| {
        let out = Command::new(gantry_tests::gantry_bin())
            .args(["dev", "cluster", "--name", &name])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = dev(&["ls"]);
    assert_eq!(code, Some(0), "{err}");
    let n1 = out
        .lines()
        .find(|l| l.starts_with("n1 "))
        .unwrap_or_default();
    assert!(n1.contains("agent") && n1.ends_with("running"), "{out}");
    assert!(
        n1.contains(&c.host_addr("n1").unwrap().to_string()),
        "{out}"
    );

    let (code, out, err) = dev(&["kill", "n1"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("n1 ") && l.ends_with("killed")),
        "{out}"
    );
    c.reload().unwrap();
    assert_eq!(state_of(&c, "n1").0, ProcessState::Killed);

    let (code, _, err) = dev(&["start", "n1"]);
    assert_eq!(code, Some(0), "{err}");
    c.reload().unwrap();
    assert_eq!(state_of(&c, "n1").0, ProcessState::Running);

    let (code, out, err) = dev(&["partition", "n1"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("n1 ") && l.ends_with("partitioned")),
        "{out}"
    );
    let (code, _, err) = dev(&["heal", "n1"]);
    assert_eq!(code, Some(0), "{err}");
    c.reload().unwrap();
    assert!(!state_of(&c, "n1").1);

    let (code, _, err) = dev(&["kill", "n9"]);
    assert_eq!(code, Some(2), "an unknown host is bad input: {err}");
    assert!(err.contains("n9"), "{err}");

    let f = footprint(&c);
    // The harness's own record of the cluster is now stale (another process
    // took it down): leave it without a second teardown.
    c.detach();
    let (code, _, err) = dev(&["down"]);
    assert_eq!(code, Some(0), "{err}");
    assert_gone(&f);
    let (code, _, err) = dev(&["ls"]);
    assert_eq!(code, Some(1), "{err}");
}

#[test]
fn a_failed_up_leaves_nothing() {
    require!();
    let mut config = stand_in_config(1);
    // The controller exits at once: its port never opens.
    config.commands.as_mut().unwrap().controller = vec!["/bin/false".into()];
    config.ready_timeout = Duration::from_secs(2);
    let name = config.name.clone();
    let err = Cluster::up(config).expect_err("a controller that exits cannot be ready");
    assert!(
        err.to_string().contains("accept connections"),
        "the error says what it waited for: {err}"
    );
    assert!(!net::link_exists(&format!("gtd-{name}")));
    assert!(
        net::netns_list()
            .iter()
            .all(|ns| !ns.starts_with(&format!("gantry-{name}-"))),
        "{:?}",
        net::netns_list()
    );
    assert!(!Path::new(cluster::DEFAULT_STATE_ROOT).join(&name).exists());
}

#[test]
fn clusters_side_by_side_get_distinct_subnets() {
    require!();
    let a = Cluster::up(stand_in_config(0)).expect("cluster a");
    let b = Cluster::up(stand_in_config(0)).expect("cluster b");
    assert!(!a.record().subnet.overlaps(&b.record().subnet));
    for c in [&a, &b] {
        let u = url(c, "c1");
        wait_for("c1 to serve", Duration::from_secs(10), || {
            fetch(c, None, &u).as_deref() == Some("controller c1")
        })
        .unwrap();
    }
    // A second cluster of the same name is refused while the first is up.
    let mut again = stand_in_config(0);
    again.name = a.name().to_string();
    let err = Cluster::up(again).expect_err("duplicate name");
    assert!(
        matches!(err, cluster::ClusterError::AlreadyUp { .. }),
        "{err}"
    );
    assert!(
        net::link_exists(&a.record().bridge),
        "the refusal tore nothing down"
    );
    assert!(net::netns_exists(&a.record().hosts[0].netns));
    // A subnet already in use (a's) is refused, and the refusal leaves nothing.
    let mut clash = stand_in_config(0);
    clash.subnet = Some(a.record().subnet);
    let clash_name = clash.name.clone();
    let err = Cluster::up(clash).expect_err("overlapping subnet");
    assert!(
        matches!(err, cluster::ClusterError::SubnetInUse { .. }),
        "{err}"
    );
    assert!(
        !Path::new(cluster::DEFAULT_STATE_ROOT)
            .join(&clash_name)
            .exists()
    );
    assert!(!net::link_exists(&format!("gtd-{clash_name}")));
}

#[test]
fn down_by_name_removes_leftovers_without_a_record() {
    require!();
    let name = cluster::unique_name("t");
    let ns = format!("gantry-{name}-n1");
    let bridge = format!("gtd-{name}");
    net::ip(&["netns", "add", &ns]).unwrap();
    net::ip(&["link", "add", &bridge, "type", "bridge"]).unwrap();
    let state_root = Path::new(cluster::DEFAULT_STATE_ROOT);
    assert!(Cluster::down_named(&name, state_root).unwrap());
    assert!(!net::netns_exists(&ns));
    assert!(!net::link_exists(&bridge));
    assert!(!Cluster::down_named(&name, state_root).unwrap());
}

/// Whether the gantry binary under test has the `controller` and `agent`
/// roles (they land with the control plane's other branches).
fn has_gantry_roles() -> bool {
    ["controller", "agent"].iter().all(|role| {
        Command::new(gantry_tests::gantry_bin())
            .args([role, "--help"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

/// Real `gantry controller` and agents: `gantry node ls` lists every agent
/// host as a ready node, and `down` leaves nothing.
#[test]
fn real_cluster_three_agents_ready() {
    require!();
    if !has_gantry_roles() {
        println!("SKIPPED: this gantry build has no `controller`/`agent` commands yet");
        return;
    }
    let mut config = ClusterConfig::new(gantry_tests::gantry_bin());
    config.name = cluster::unique_name("r");
    config.agents = 3;
    config.ready_timeout = Duration::from_secs(60);
    let c = match Cluster::up(config) {
        Ok(c) => c,
        Err(e) => panic!("real cluster up: {e}"),
    };
    let out = c.gantry(&["node", "ls", "-o", "json"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ready = cluster::ready_nodes(&String::from_utf8_lossy(&out.stdout));
    ready.sort();
    assert_eq!(ready, vec!["n1", "n2", "n3"]);
    let f = footprint(&c);
    c.down().expect("down");
    assert_gone(&f);
}

/// An image with busybox and a page to serve, for containers on the hosts.
fn write_web_layout(dir: &Path) {
    use gantry_tests::image_fixtures::{Entry, layer_tar, write_single_layer_layout};
    let busybox = std::fs::read(gantry_tests::bundle::HOST_BUSYBOX).unwrap();
    let layer = layer_tar(&[
        Entry::Dir("bin/"),
        Entry::Dir("proc/"),
        Entry::Dir("sys/"),
        Entry::Dir("dev/"),
        Entry::Dir("etc/"),
        Entry::Dir("www/"),
        Entry::File("bin/busybox", busybox, 0o755),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::Symlink("bin/httpd", "busybox"),
        Entry::File("www/index.html", b"container\n".to_vec(), 0o644),
    ]);
    write_single_layer_layout(
        dir,
        &layer,
        &[(
            "gantry.test/web:latest",
            serde_json::json!({"Cmd": ["httpd", "-f", "-p", "8081", "-h", "/www"],
                               "Env": ["PATH=/bin"]}),
        )],
    );
}

/// A container a host started keeps serving after `kill` of the host's
/// process (its shim is detached), and `down` removes it: no process, no
/// mount left under the cluster's data.
#[test]
fn containers_outlive_a_killed_host_and_down_removes_them() {
    require!();
    if let Some(reason) = gantry_tests::engine_test_prerequisites() {
        println!("SKIPPED: {reason}");
        return;
    }
    let mut c = Cluster::up(stand_in_config(1)).expect("cluster up");
    let data = c.host_data_dir("n1").unwrap();
    let layout = tempfile::tempdir().unwrap();
    write_web_layout(layout.path());
    let gantry = |args: &[&str]| {
        let out = c
            .command_in("n1", gantry_tests::gantry_bin().to_str().unwrap())
            .unwrap()
            .args(args)
            .env("GANTRY_DATA_DIR", &data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gantry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    gantry(&["image", "import", layout.path().to_str().unwrap()]);
    gantry(&[
        "container",
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "host",
        "gantry.test/web:latest",
    ]);
    let ps: serde_json::Value =
        serde_json::from_str(gantry(&["container", "ps", "-o", "json"]).trim()).unwrap();
    let pid = ps["pid"].as_i64().expect("the container's pid") as i32;
    let web = format!("http://{}:8081/", c.host_addr("n1").unwrap());
    wait_for("the container to serve", Duration::from_secs(10), || {
        fetch(&c, None, &web).as_deref() == Some("container")
    })
    .unwrap();

    c.kill("n1").unwrap();
    assert_eq!(state_of(&c, "n1").0, ProcessState::Killed);
    assert_eq!(
        fetch(&c, None, &web).as_deref(),
        Some("container"),
        "the container died with its host's process"
    );

    let base = c.record().base_dir.clone();
    let f = footprint(&c);
    c.down().expect("down");
    assert_gone(&f);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the container's process {pid} survived down"
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(base.to_str().unwrap()),
        "mounts left under {}",
        base.display()
    );
}

/// Faults on a real cluster show in `gantry node ls`: a killed or stopped
/// agent's node goes down and comes back ready after `start`; a partitioned
/// one goes down and comes back after `heal`.
#[test]
fn real_cluster_faults_show_in_node_status() {
    require!();
    if !has_gantry_roles() {
        println!("SKIPPED: this gantry build has no `controller`/`agent` commands yet");
        return;
    }
    let mut config = ClusterConfig::new(gantry_tests::gantry_bin());
    config.name = cluster::unique_name("r");
    config.agents = 2;
    config.ready_timeout = Duration::from_secs(60);
    let mut c = Cluster::up(config).expect("real cluster up");
    // The controller's default lease is 3 s; allow for a loaded machine.
    let bound = Duration::from_secs(20);
    c.kill("n1").unwrap();
    c.wait_node_status("n1", "down", bound).unwrap();
    assert_eq!(c.node_statuses().unwrap()["n2"], "ready");
    c.start("n1").unwrap();
    c.wait_node_status("n1", "ready", bound).unwrap();

    c.stop("n2").unwrap();
    c.wait_node_status("n2", "down", bound).unwrap();
    c.start("n2").unwrap();
    c.wait_node_status("n2", "ready", bound).unwrap();

    c.partition("n1").unwrap();
    c.wait_node_status("n1", "down", bound).unwrap();
    c.heal("n1").unwrap();
    c.wait_node_status("n1", "ready", bound).unwrap();

    let f = footprint(&c);
    c.down().expect("down");
    assert_gone(&f);
}
