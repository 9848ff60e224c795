//! End-to-end tests of `gantry runtime`: real bundles, real namespaces and
//! cgroups, driven through the `gantry` binary as runc's callers would.
//!
//! Every test makes its own state root and unique container ids, and a
//! guard runs `delete --force` on drop, so a failing test leaves nothing.

use gantry_tests::bundle::{Bundle, BundleBuilder, TEST_EXTRA_GID, TEST_UID, busybox_available};
use gantry_tests::gantry_bin;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Prints why a test cannot run here; `true` means go on.
fn can_run(test: &str) -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        println!("SKIPPED: {test}: needs root");
        return false;
    }
    if !busybox_available() {
        println!("SKIPPED: {test}: /bin/busybox missing (apt-get install busybox-static)");
        return false;
    }
    true
}

/// A state root and a container id in it; `delete --force` on drop.
struct Ctr {
    root: tempfile::TempDir,
    id: String,
    bundle: Bundle,
}

impl Ctr {
    fn new(name: &str, builder: BundleBuilder) -> Ctr {
        let id = format!("t-{name}-{}", std::process::id());
        let bundle = builder.build_temp().expect("build bundle");
        Ctr {
            root: tempfile::Builder::new()
                .prefix("gantry-rt-")
                .tempdir()
                .expect("state root"),
            id,
            bundle,
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(gantry_bin());
        c.arg("runtime").arg("--root").arg(self.root.path());
        c
    }

    /// Runs a runtime subcommand to completion, capturing its output.
    fn rt(&self, args: &[&str]) -> Output {
        self.cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run gantry")
    }

    /// `run` of the bundle: (exit code, stdout, stderr).
    fn run(&self) -> (i32, String, String) {
        let out = self.rt(&["run", "-b", path_str(self.bundle.path()), &self.id]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `create`, with the container's stdout and stderr going to a file
    /// (a pipe would stay open as long as the container lives).
    fn create(&self) -> Output {
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let err = log.try_clone().expect("log file");
        self.cmd()
            .args(["create", "--bundle", path_str(self.bundle.path()), &self.id])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .status()
            .map(|status| Output {
                status,
                stdout: vec![],
                stderr: std::fs::read(self.log_path()).unwrap_or_default(),
            })
            .expect("run gantry create")
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join(format!("{}.log", self.id))
    }

    fn state(&self) -> serde_json::Value {
        let out = self.rt(&["state", &self.id]);
        assert!(out.status.success(), "state: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("state JSON")
    }

    fn status(&self) -> String {
        self.state()["status"].as_str().unwrap_or("").to_string()
    }

    fn pid(&self) -> i32 {
        self.state()["pid"].as_i64().expect("pid") as i32
    }

    /// Waits (bounded) until the state shows `status` (the container may
    /// not exist yet when a concurrent `run` is still creating it).
    fn wait_status(&self, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.rt(&["state", &self.id]);
            let now: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if now["status"] == status {
                return;
            }
            assert!(Instant::now() < deadline, "never became {status}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The container's cgroup directory: in the pids hierarchy on cgroup v1,
    /// the one unified directory on v2.
    fn cgroup_dir(&self) -> PathBuf {
        use gantry_agent::engine::cgroups::{CgroupRoot, CgroupVersion};
        let root = CgroupRoot::detect().expect("detect the host's cgroup layout");
        let base = match root.version {
            CgroupVersion::V1 => root.path.join("pids/gantry"),
            CgroupVersion::V2 => root.path.join("gantry"),
        };
        base.join(&self.id)
    }

    fn exec(&self, extra: &[&str], args: &[&str]) -> (i32, String) {
        let mut all = vec!["exec"];
        all.extend_from_slice(extra);
        all.push(&self.id);
        all.push("--");
        all.extend_from_slice(args);
        let out = self.rt(&all);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out),
        )
    }
}

impl Drop for Ctr {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .args(["delete", "--force", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sh(script: &str) -> BundleBuilder {
    BundleBuilder::new().args(["sh", "-c", script])
}

#[test]
fn runs_as_pid_1_with_its_own_hostname_processes_and_mounts() {
    if !can_run("isolation") {
        return;
    }
    let c = Ctr::new(
        "iso",
        sh("echo pid=$$; hostname; ps | wc -l; cat /proc/mounts; ip -o link").hostname("box-1"),
    );
    let (code, out, err) = c.run();
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "pid=1");
    assert_eq!(lines[1], "box-1");
    // Header, sh, ps and wc: nothing of the host.
    let procs: usize = lines[2].trim().parse().unwrap();
    assert!(procs <= 4, "saw {procs} ps lines");
    assert!(
        !out.contains("/sys/fs/cgroup"),
        "host mounts visible:\n{out}"
    );
    assert!(out.contains("proc /proc proc"), "{out}");
    // A new network namespace holds only lo, and it is up.
    let links: Vec<&str> = out.lines().filter(|l| l.contains(": <")).collect();
    assert_eq!(links.len(), 1, "{links:?}");
    assert!(
        links[0].contains("lo:") && links[0].contains("UP"),
        "{links:?}"
    );
    assert!(
        !c.root.path().join(&c.id).exists(),
        "run left its state behind"
    );
    assert!(!c.cgroup_dir().exists(), "run left its cgroup behind");
}

#[test]
fn applies_user_groups_env_and_cwd() {
    if !can_run("user") {
        return;
    }
    let c = Ctr::new(
        "user",
        sh("id -u; id -g; id -G; echo $FOO; pwd; echo $HOME")
            .user(TEST_UID, TEST_UID, &[TEST_EXTRA_GID])
            .env("FOO", "bar baz")
            .cwd("/tmp"),
    );
    let (code, out, err) = c.run();
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], TEST_UID.to_string());
    assert_eq!(lines[1], TEST_UID.to_string());
    let groups: Vec<&str> = lines[2].split_whitespace().collect();
    assert!(
        groups.contains(&TEST_EXTRA_GID.to_string().as_str()),
        "{groups:?}"
    );
    assert_eq!(lines[3], "bar baz");
    assert_eq!(lines[4], "/tmp");
    assert_eq!(lines[5], "/home/tester");
}

#[test]
fn applies_capabilities_no_new_privs_and_rlimits() {
    if !can_run("caps") {
        return;
    }
    let c = Ctr::new(
        "caps",
        sh("grep -E '^(Cap|NoNewPrivs)' /proc/self/status; ulimit -n; ulimit -Hn")
            .all_capabilities(&["CAP_CHOWN", "CAP_KILL"])
            .no_new_privileges(true)
            .rlimit("RLIMIT_NOFILE", 256, 512),
    );
    let (code, out, err) = c.run();
    assert_eq!(code, 0, "{out}{err}");
    // CAP_CHOWN is bit 0, CAP_KILL bit 5.
    for line in [
        "CapEff:\t0000000000000021",
        "CapPrm:\t0000000000000021",
        "CapBnd:\t0000000000000021",
        "CapAmb:\t0000000000000000",
        "NoNewPrivs:\t1",
    ] {
        assert!(out.contains(line), "missing {line:?} in\n{out}");
    }
    assert!(out.contains("\n256\n512\n"), "{out}");
}

#[test]
fn non_root_user_keeps_configured_capabilities() {
    if !can_run("caps-user") {
        return;
    }
    let c = Ctr::new(
        "capsuser",
        sh("grep -E '^Cap(Eff|Amb)' /proc/self/status")
            .user(TEST_UID, TEST_UID, &[])
            .all_capabilities(&["CAP_NET_BIND_SERVICE"])
            .capabilities("inheritable", &["CAP_NET_BIND_SERVICE"])
            .capabilities("ambient", &["CAP_NET_BIND_SERVICE"]),
    );
    let (code, out, err) = c.run();
    assert_eq!(code, 0, "{out}{err}");
    // CAP_NET_BIND_SERVICE is bit 10.
    assert!(out.contains("CapEff:\t0000000000000400"), "{out}");
    assert!(out.contains("CapAmb:\t0000000000000400"), "{out}");
}

#[test]
fn masks_paths_and_mounts_sys_read_only() {
    if !can_run("masked") {
        return;
    }
    let c = Ctr::new(
        "masked",
        sh("wc -c < /proc/keys; ls /proc/acpi 2>/dev/null | wc -l; \
            touch /sys/x 2>&1; (echo 1 > /proc/sys/kernel/domainname) 2>&1; \
            grep -E ' /proc/(sys|irq|bus|fs) ' /proc/mounts; true"),
    );
    let (code, out, err) = c.run();
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0].trim(), "0", "/proc/keys readable: {out}");
    assert_eq!(lines[1].trim(), "0", "/proc/acpi listable: {out}");
    assert_eq!(
        out.matches("Read-only file system").count(),
        2,
        "writes to /sys or /proc/sys worked:\n{out}"
    );
    let ro_proc = out
        .lines()
        .filter(|l| l.starts_with("proc /proc/") && l.contains(" ro,"))
        .count();
    assert_eq!(ro_proc, 4, "readonly paths:\n{out}");
}

#[test]
fn read_only_root_and_bind_mounts() {
    if !can_run("ro-root") {
        return;
    }
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("hello"), "from host").unwrap();
    let c = Ctr::new(
        "roroot",
        sh("cat /data/hello; echo; touch /data/x 2>&1; touch /etc/x 2>&1; touch /dev/shm/ok && echo shm-ok")
            .readonly_root(true)
            .mount("/data", "bind", path_str(host.path()), &["rbind", "ro"]),
    );
    let (code, out, err) = c.run();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("from host"), "{out}");
    assert_eq!(out.matches("Read-only file system").count(), 2, "{out}");
    assert!(out.contains("shm-ok"), "{out}");
}

#[test]
fn creates_default_devices() {
    if !can_run("devices") {
        return;
    }
    let c = Ctr::new(
        "dev",
        sh(
            "ls /dev; head -c 4 /dev/urandom | wc -c; echo x > /dev/null && echo null-ok; readlink /dev/ptmx",
        ),
    );
    let (code, out, err) = c.run();
    assert_eq!(code, 0, "{out}{err}");
    let names: Vec<&str> = out.lines().collect();
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "fd",
    ] {
        assert!(names.contains(&dev), "/dev/{dev} missing: {names:?}");
    }
    assert!(out.contains("\n4\nnull-ok\npts/ptmx\n"), "{out}");
}

#[test]
fn exit_codes_pass_through() {
    if !can_run("exit") {
        return;
    }
    let c = Ctr::new("exit", sh("exit 42"));
    assert_eq!(c.run().0, 42);
    let c = Ctr::new("noexe", BundleBuilder::new().args(["/no/such/program"]));
    let (code, out, err) = c.run();
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("/no/such/program"), "{err}");
    assert!(!c.root.path().join(&c.id).exists());
    assert!(!c.cgroup_dir().exists());
}

#[test]
fn signal_death_is_128_plus_n() {
    if !can_run("signal") {
        return;
    }
    let c = Ctr::new("sig", BundleBuilder::new().args(["sleep", "100"]));
    let mut child = c
        .cmd()
        .args(["run", "-b", path_str(c.bundle.path()), &c.id])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    c.wait_status("running");
    let out = c.rt(&["kill", &c.id, "KILL"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(137));
}

#[test]
fn lifecycle_create_start_kill_delete() {
    if !can_run("lifecycle") {
        return;
    }
    let c = Ctr::new("life", sh("echo started; exec sleep 100"));
    let out = c.create();
    assert!(out.status.success(), "create: {}", stderr(&out));
    assert_eq!(c.status(), "created");
    let pid = c.pid();
    // Created: the user process has not run yet.
    assert!(std::fs::read_to_string(c.log_path()).unwrap().is_empty());
    assert!(c.cgroup_dir().exists());
    let procs = std::fs::read_to_string(c.cgroup_dir().join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");

    let listed = c.rt(&["list", "--format", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(list[0]["id"], c.id.as_str());

    let out = c.rt(&["start", &c.id]);
    assert!(out.status.success(), "start: {}", stderr(&out));
    assert_eq!(c.status(), "running");
    let out = c.rt(&["start", &c.id]);
    assert_eq!(out.status.code(), Some(1), "second start must fail");

    let out = c.rt(&["delete", &c.id]);
    assert!(!out.status.success(), "deleted a running container");

    // The user process runs now: its first output arrives (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(c.log_path()).unwrap() != "started\n" {
        assert!(Instant::now() < deadline, "no output after start");
        std::thread::sleep(Duration::from_millis(5));
    }

    let out = c.rt(&["kill", &c.id, "9"]);
    assert!(out.status.success(), "kill: {}", stderr(&out));
    c.wait_status("stopped");

    let out = c.rt(&["delete", &c.id]);
    assert!(out.status.success(), "delete: {}", stderr(&out));
    let out = c.rt(&["state", &c.id]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("does not exist"));
    assert!(!c.root.path().join(&c.id).exists());
    assert!(!c.cgroup_dir().exists());
}

/// A removed container's state directory is kept as a spare for the next
/// one (a rename instead of an `rmdir`, see `make_state_dir`): the spare
/// must come back empty, even from a container deleted before `start`
/// (which still had its `exec.fifo`), and never show as a container.
#[test]
fn a_removed_containers_state_directory_is_reused_clean() {
    if !can_run("spare") {
        return;
    }
    let c = Ctr::new("spare", sh("exit 3"));
    assert!(c.create().status.success());
    let out = c.rt(&["delete", &c.id]);
    assert!(out.status.success(), "delete: {}", stderr(&out));
    assert!(!c.root.path().join(&c.id).exists());
    // The same id again, through the directory just removed.
    let out = c.create();
    assert!(out.status.success(), "second create: {}", stderr(&out));
    assert_eq!(c.status(), "created");
    assert!(c.rt(&["start", &c.id]).status.success());
    c.wait_status("stopped");
    let listed = || -> serde_json::Value {
        serde_json::from_slice(&c.rt(&["list", "--format", "json"]).stdout).unwrap()
    };
    let list = listed();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert!(c.rt(&["delete", &c.id]).status.success());
    assert_eq!(c.run().0, 3);
    assert_eq!(c.run().0, 3, "a second run of the same id");
    let list = listed();
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    // What is left in the root is spares: names no container id can have,
    // and empty.
    for entry in std::fs::read_dir(c.root.path()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".log") {
            continue;
        }
        assert!(name.contains('~'), "left in the state root: {name}");
        let inside = std::fs::read_dir(entry.path()).unwrap().count();
        assert_eq!(inside, 0, "spare {name} is not empty");
    }
}

#[test]
fn delete_force_kills_a_running_container() {
    if !can_run("force") {
        return;
    }
    let c = Ctr::new("force", sh("sleep 100 & exec sleep 100"));
    assert!(c.create().status.success());
    assert!(c.rt(&["start", &c.id]).status.success());
    let pid = c.pid();
    let out = c.rt(&["delete", "--force", &c.id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let gone =
        gantry_agent::engine::runtime::state::proc_start_time(pid).is_none_or(|(_, zombie)| zombie);
    assert!(gone, "init {pid} survived delete --force");
    assert!(!c.cgroup_dir().exists());
    assert!(!c.root.path().join(&c.id).exists());
}

#[test]
fn exec_joins_the_container() {
    if !can_run("exec") {
        return;
    }
    let c = Ctr::new(
        "exec",
        BundleBuilder::new()
            .args(["sleep", "100"])
            .hostname("exec-box"),
    );
    assert!(c.create().status.success());
    assert!(c.rt(&["start", &c.id]).status.success());
    let pid = c.pid();
    // `start` returns once the init was told to go (as runc's does), not
    // once it has exec'd the process: on a busy machine the exec can still
    // be ahead, and /proc/1/cmdline below would name the runtime.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }

    let (code, out) = c.exec(&[], &["sh", "-c", "hostname; cat /proc/1/cmdline; echo; for n in mnt pid net uts ipc; do readlink /proc/self/ns/$n; done"]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "exec-box");
    assert!(lines[1].starts_with("sleep"), "{out}");
    for (i, ns) in ["mnt", "pid", "net", "uts", "ipc"].iter().enumerate() {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_eq!(
            lines[2 + i],
            theirs.to_str().unwrap(),
            "{ns} namespace differs"
        );
    }
    // The exec'd process is in the container's cgroup: the root of the
    // container's cgroup namespace in every hierarchy it has.
    let (code, out) = c.exec(&[], &["cat", "/proc/self/cgroup"]);
    assert_eq!(code, 0, "{out}");
    for line in out
        .lines()
        .filter(|l| l.contains("memory") || l.contains("pids"))
    {
        assert!(
            line.ends_with(":/"),
            "exec'd process outside the container's cgroup: {out}"
        );
    }

    let (code, out) = c.exec(
        &["--user", "1000:1000", "--env", "X=y", "--cwd", "/tmp"],
        &["sh", "-c", "id -u; echo $X; pwd; exit 5"],
    );
    assert_eq!(code, 5, "{out}");
    assert_eq!(out, "1000\ny\n/tmp\n");
}

#[test]
fn exec_with_a_tty() {
    if !can_run("exec-tty") {
        return;
    }
    let c = Ctr::new("tty", BundleBuilder::new().args(["sleep", "100"]));
    assert!(c.create().status.success());
    assert!(c.rt(&["start", &c.id]).status.success());
    let out = c
        .cmd()
        .args([
            "exec",
            "-t",
            &c.id,
            "--",
            "sh",
            "-c",
            "tty; test -t 0 && echo is-a-tty; exit 6",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(6), "{text}{}", stderr(&out));
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("is-a-tty"), "{text}");
}

#[test]
fn hooks_get_the_state_on_stdin() {
    if !can_run("hooks") {
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    let save = |name: &str| format!("cat > {}/{name}.json", out_dir.path().display());
    // Also what the hook finds as the network namespace of the state's pid:
    // the container's own, although the runtime makes it after the clone.
    let save_with_netns = |name: &str| {
        let dir = out_dir.path().display();
        format!(
            "tee {dir}/{name}.json | sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p' \
             | {{ read pid; readlink /proc/$pid/ns/net > {dir}/{name}.netns; }}"
        )
    };
    let c = Ctr::new(
        "hooks",
        BundleBuilder::new()
            .args(["sleep", "100"])
            .hook(
                "createRuntime",
                "/bin/sh",
                &["sh", "-c", &save_with_netns("createRuntime")],
                Some(5),
            )
            .hook(
                "createContainer",
                "/bin/sh",
                &["sh", "-c", &save("createContainer")],
                Some(5),
            )
            .hook(
                "startContainer",
                "/bin/sh",
                &["sh", "-c", "cat > /tmp/startContainer.json"],
                Some(5),
            )
            .hook(
                "poststart",
                "/bin/sh",
                &["sh", "-c", &save("poststart")],
                Some(5),
            )
            .hook(
                "poststop",
                "/bin/sh",
                &["sh", "-c", &save("poststop")],
                Some(5),
            ),
    );
    assert!(
        c.create().status.success(),
        "{}",
        std::fs::read_to_string(c.log_path()).unwrap_or_default()
    );
    let pid = c.pid();
    let netns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let container_netns = netns(&pid.to_string());
    assert_ne!(container_netns, netns("self"), "the container has its own");
    let hook_netns = std::fs::read_to_string(out_dir.path().join("createRuntime.netns")).unwrap();
    assert_eq!(
        hook_netns.trim(),
        container_netns.to_string_lossy(),
        "the createRuntime hook saw another network namespace"
    );
    assert!(c.rt(&["start", &c.id]).status.success());
    // `start` returns once the init is released (as runc's does); the
    // startContainer hook then runs inside the container before the user
    // process. Wait for what it writes before killing the container.
    let start_hook_out = c.bundle.rootfs().join("tmp/startContainer.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read(&start_hook_out)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the startContainer hook wrote no state within 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(c.rt(&["delete", "--force", &c.id]).status.success());
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        )
        .unwrap()
    };
    for (name, status) in [
        ("createRuntime", "creating"),
        ("createContainer", "created"),
        ("poststart", "running"),
        ("poststop", "stopped"),
    ] {
        let st = read(out_dir.path().join(format!("{name}.json")));
        assert_eq!(st["id"], c.id.as_str(), "{name}");
        assert_eq!(st["status"], status, "{name}");
        assert_eq!(st["pid"], pid, "{name}");
    }
    let st = read(c.bundle.rootfs().join("tmp/startContainer.json"));
    assert_eq!(st["status"], "running");
}

#[test]
fn a_hook_past_its_timeout_fails_create_and_leaves_nothing() {
    if !can_run("hook-timeout") {
        return;
    }
    let c = Ctr::new(
        "hooktimeout",
        BundleBuilder::new().hook("createRuntime", "/bin/sleep", &["sleep", "30"], Some(1)),
    );
    let started = Instant::now();
    let out = c.create();
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
    assert!(!c.root.path().join(&c.id).exists());
    assert!(!c.cgroup_dir().exists());
}

#[test]
fn a_bad_config_is_refused_by_field_and_leaves_nothing() {
    if !can_run("bad-config") {
        return;
    }
    let c = Ctr::new(
        "badcfg",
        BundleBuilder::new().edit(|s| {
            s["linux"]["seccomp"] = serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW"})
        }),
    );
    let out = c.create();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("linux.seccomp: not supported yet"),
        "{}",
        stderr(&out)
    );
    assert!(!c.root.path().join(&c.id).exists());
    assert!(!c.cgroup_dir().exists());

    // Refused inside the init: a mount that cannot be made. Nothing stays:
    // no state, no cgroup, and no process left in it.
    let c = Ctr::new(
        "badmount",
        BundleBuilder::new().mount("/data", "bind", "/no/such/source", &["rbind"]),
    );
    let out = c.create();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("/data"), "{}", stderr(&out));
    assert!(!c.root.path().join(&c.id).exists());
    assert!(!c.cgroup_dir().exists());
}

#[test]
fn memory_limit_oom_kills_with_sigkill() {
    if !can_run("oom") {
        return;
    }
    let c = Ctr::new(
        "oom",
        sh("exec dd if=/dev/zero of=/dev/null bs=64M count=1").memory_limit(16 << 20),
    );
    let (code, out, err) = c.run();
    assert_eq!(code, 137, "{out}{err}");
}

#[test]
fn pids_limit_applies() {
    if !can_run("pids") {
        return;
    }
    let c = Ctr::new(
        "pids",
        sh("for i in 1 2 3 4 5 6 7 8; do sleep 5 & done 2>&1; true").pids_limit(4),
    );
    let (_, out, err) = c.run();
    let out = out + &err;
    assert!(
        out.contains("can't fork") || out.contains("Resource temporarily unavailable"),
        "{out}"
    );
}

#[test]
fn joins_namespaces_given_by_path() {
    if !can_run("ns-path") {
        return;
    }
    let a = Ctr::new("nsa", BundleBuilder::new().args(["sleep", "100"]));
    assert!(a.create().status.success());
    assert!(a.rt(&["start", &a.id]).status.success());
    let apid = a.pid();
    let b = Ctr::new(
        "nsb",
        sh("readlink /proc/self/ns/net; ps -o comm")
            .namespace_path("network", &format!("/proc/{apid}/ns/net"))
            .namespace_path("pid", &format!("/proc/{apid}/ns/pid")),
    );
    let (code, out, err) = b.run();
    assert_eq!(code, 0, "{out}{err}");
    let theirs = std::fs::read_link(format!("/proc/{apid}/ns/net")).unwrap();
    assert_eq!(out.lines().next(), theirs.to_str(), "{out}");
    // B's process lives in A's pid namespace and sees A's init.
    assert!(out.lines().any(|l| l.trim() == "sleep"), "{out}");
}

#[test]
fn applies_sysctls() {
    if !can_run("sysctl") {
        return;
    }
    let c = Ctr::new(
        "sysctl",
        sh("cat /proc/sys/net/ipv4/ip_forward")
            .edit(|s| s["linux"]["sysctl"] = serde_json::json!({"net.ipv4.ip_forward": "1"})),
    );
    let (code, out, err) = c.run();
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "1\n");
}

#[test]
fn run_forwards_sigterm_to_the_container() {
    if !can_run("forward") {
        return;
    }
    let c = Ctr::new(
        "fwd",
        sh("trap 'echo got-term; exit 3' TERM; echo ready; sleep 100 & wait"),
    );
    let mut child = c
        .cmd()
        .args(["run", "-b", path_str(c.bundle.path()), &c.id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(status.code(), Some(3), "{rest}");
    assert!(rest.contains("got-term"), "{rest}");
}

#[test]
fn exec_takes_a_process_file_and_kill_all_reaches_every_process() {
    if !can_run("exec-process") {
        return;
    }
    let c = Ctr::new("execproc", BundleBuilder::new().args(["sleep", "100"]));
    assert!(c.create().status.success());
    assert!(c.rt(&["start", &c.id]).status.success());
    let file = c.root.path().join("process.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&serde_json::json!({
            "user": {"uid": 65534, "gid": 65534},
            "args": ["sh", "-c", "id -u; echo $ONLY; exit 9"],
            "env": ["ONLY=this", "PATH=/bin"],
            "cwd": "/"
        }))
        .unwrap(),
    )
    .unwrap();
    let out = c.rt(&["exec", "--process", path_str(&file), &c.id]);
    assert_eq!(out.status.code(), Some(9), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "65534\nthis\n");

    // --detach returns at once; the process lives on in the container.
    let started = Instant::now();
    // (Its stdio is ours, so not pipes: those would stay open.)
    let status = c
        .cmd()
        .args(["exec", "--detach", &c.id, "--", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(started.elapsed() < Duration::from_secs(10));
    let (_, ps) = c.exec(&[], &["ps", "-o", "comm"]);
    assert_eq!(
        ps.lines().filter(|l| l.trim() == "sleep").count(),
        2,
        "{ps}"
    );

    let out = c.rt(&["kill", "--all", &c.id, "KILL"]);
    assert!(out.status.success(), "{}", stderr(&out));
    c.wait_status("stopped");
    let out = c.rt(&["kill", &c.id, "KILL"]);
    assert_eq!(out.status.code(), Some(1), "kill of a stopped container");
}

#[test]
fn usage_errors_exit_2() {
    if !can_run("usage") {
        return;
    }
    let c = Ctr::new("usage", BundleBuilder::new());
    assert_eq!(
        c.rt(&["kill", &c.id, "NOSUCHSIGNAL"]).status.code(),
        Some(2)
    );
    assert_eq!(
        c.rt(&["--systemd-cgroup", "state", &c.id]).status.code(),
        Some(2)
    );
    // containerd passes `--systemd-cgroup=false`: accepted.
    let out = c.rt(&["--systemd-cgroup=false", "--log", "/dev/null", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.rt(&[
        "create",
        "--console-socket",
        "/tmp/x.sock",
        "-b",
        path_str(c.bundle.path()),
        &c.id,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--console-socket"),
        "{}",
        stderr(&out)
    );
    assert_eq!(c.rt(&["state", &c.id]).status.code(), Some(2));
    assert_eq!(c.rt(&["bogus-subcommand"]).status.code(), Some(2));
}

#[test]
fn cgroup_mount_shows_the_containers_own_cgroup_read_only() {
    if !can_run("cgroup-mount") {
        return;
    }
    // The mount `runc spec` puts in every config.
    let c = Ctr::new(
        "cgmount",
        sh(
            "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max; \
            touch /sys/fs/cgroup/x 2>&1; mkdir /sys/fs/cgroup/memory/sub 2>&1; true",
        )
        .memory_limit(64 << 20)
        .pids_limit(77)
        .mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
    );
    let (code, out, err) = c.run();
    if out.contains("No such file") && !Path::new("/sys/fs/cgroup/memory").exists() {
        println!("SKIPPED: cgroup-mount: host has no cgroup v1 memory hierarchy");
        return;
    }
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], (64u64 << 20).to_string(), "{out}");
    assert_eq!(lines[1], "77", "{out}");
    assert_eq!(out.matches("Read-only file system").count(), 2, "{out}");
}

#[test]
fn delete_force_clears_a_half_created_container() {
    if !can_run("half-created") {
        return;
    }
    let c = Ctr::new("half", BundleBuilder::new());
    // What a create killed before saving its state leaves behind.
    std::fs::create_dir_all(c.root.path().join(&c.id)).unwrap();
    let out = c.create();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("already exists"));
    assert_eq!(c.rt(&["delete", &c.id]).status.code(), Some(2));
    assert!(c.rt(&["delete", "--force", &c.id]).status.success());
    assert!(!c.root.path().join(&c.id).exists());
    assert_eq!(c.run().0, 0);
}

#[test]
fn run_of_a_taken_id_fails_and_leaves_the_first_container_alone() {
    if !can_run("taken-id") {
        return;
    }
    // `run` takes the id (its state directory) only after the clone: the
    // second container must still fail before it touches the first one's
    // cgroup, limits or process.
    let c = Ctr::new(
        "taken",
        BundleBuilder::new()
            .args(["sleep", "100"])
            .memory_limit(64 << 20),
    );
    let created = c.create();
    assert!(created.status.success(), "{}", stderr(&created));
    let pid = c.pid();
    let other = BundleBuilder::new()
        .args(["true"])
        .memory_limit(32 << 20)
        .build_temp()
        .unwrap();
    let out = c.rt(&["run", "-b", path_str(other.path()), &c.id]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let state = c.rt(&["state", &c.id]);
    let state: serde_json::Value = serde_json::from_slice(&state.stdout).unwrap();
    assert_eq!(state["status"], "created");
    assert_eq!(state["pid"], pid);
    let limit = Path::new("/sys/fs/cgroup/memory/gantry")
        .join(&c.id)
        .join("memory.limit_in_bytes");
    if limit.exists() {
        let value = std::fs::read_to_string(&limit).unwrap();
        assert_eq!(value.trim(), (64u64 << 20).to_string());
    }
    assert!(c.rt(&["delete", "--force", &c.id]).status.success());
}

#[test]
fn mount_targets_never_leave_the_rootfs() {
    if !can_run("escape") {
        return;
    }
    let host = tempfile::Builder::new()
        .prefix("gantry-escape-")
        .tempdir()
        .unwrap();
    let c = Ctr::new(
        "escape",
        sh("grep ' /escape\\| /tmp/gantry-escape' /proc/mounts").mount(
            "/escape/sub",
            "tmpfs",
            "tmpfs",
            &["size=1m"],
        ),
    );
    // A symlink in the image pointing at a host path: inside the container
    // it must resolve under the rootfs.
    std::os::unix::fs::symlink(host.path(), c.bundle.rootfs().join("escape")).unwrap();
    let (code, out, err) = c.run();
    assert_eq!(code, 0, "{out}{err}");
    let inside = format!("{}/sub", host.path().display());
    assert!(out.contains(&format!("tmpfs {inside} tmpfs")), "{out}");
    assert!(
        !Path::new(&inside).exists(),
        "the mount target was made on the host"
    );
    assert!(
        c.bundle
            .rootfs()
            .join(inside.trim_start_matches('/'))
            .is_dir()
    );
}
