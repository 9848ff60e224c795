//! Real-kernel tests of the cgroup layer, run as root on whatever the host
//! has (v1/hybrid here, v2 on modern hosts). Every group lives under
//! `gantry-test-<pid>/<n>` and is removed by a guard, even on failure.

use super::*;
use nix::sys::signal::Signal;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder,
};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Live [`Scratch`] groups in this process and the base directories they
/// used: those are removed only by the last one to go, so no test removes a
/// base under another's feet.
static LIVE: Mutex<(u32, Vec<PathBuf>)> = Mutex::new((0, Vec::new()));

/// The host's cgroup root, or `None` (after saying why) when these tests cannot run.
fn host_root() -> Option<CgroupRoot> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: cgroup kernel tests need root");
        return None;
    }
    match CgroupRoot::detect() {
        Ok(root) => Some(root),
        Err(e) => {
            println!("SKIPPED: no usable cgroup hierarchy: {e}");
            None
        }
    }
}

/// The shell used for child processes: busybox where installed (Debian test
/// machines), otherwise the host's `/bin/sh` with coreutils (Ubuntu hosts).
fn shell() -> Command {
    if Path::new("/bin/busybox").exists() {
        let mut c = Command::new("/bin/busybox");
        c.arg("sh");
        c
    } else {
        Command::new("/bin/sh")
    }
}

/// A test's cgroup and child processes, all removed on drop.
struct Scratch {
    root: CgroupRoot,
    base: PathBuf,
    relative: PathBuf,
    children: Vec<Child>,
}

impl Scratch {
    fn new(root: CgroupRoot) -> Scratch {
        let base = PathBuf::from(format!("gantry-test-{}", std::process::id()));
        let relative = base.join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
        let scratch = Scratch {
            root,
            base,
            relative,
            children: Vec::new(),
        };
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.0 += 1;
        for dir in scratch.base_dirs() {
            if !live.1.contains(&dir) {
                live.1.push(dir);
            }
        }
        drop(live);
        scratch
    }

    /// Starts `script` in a shell that first waits for a line on stdin, so
    /// the test can move it into the group before it does anything.
    fn spawn_gated(&mut self, script: &str) -> i32 {
        let child = shell()
            .arg("-c")
            .arg(format!("read _ ; {script}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shell");
        let pid = child.id() as i32;
        self.children.push(child);
        pid
    }

    /// Lets the gated child at `index` run.
    fn release(&mut self, index: usize) {
        let mut stdin = self.children[index].stdin.take().expect("gated child");
        stdin.write_all(b"go\n").expect("release child");
    }

    /// Waits, bounded, for the child at `index` to exit.
    fn wait_exit(&mut self, index: usize, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        while start.elapsed() < limit {
            if let Some(status) = self.children[index].try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        None
    }

    fn stderr(&mut self, index: usize) -> String {
        let mut out = String::new();
        if let Some(mut e) = self.children[index].stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut out);
        }
        out
    }

    /// The directories a test group's base occupies, to remove when empty.
    fn base_dirs(&self) -> Vec<PathBuf> {
        match self.root.version {
            CgroupVersion::V1 => v1::hierarchies(&self.root.path, true)
                .unwrap_or_default()
                .into_iter()
                .map(|m| m.join(&self.base))
                .collect(),
            CgroupVersion::V2 => vec![self.root.path.join(&self.base)],
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(cg) = Cgroup::open(&self.root, &self.relative) {
            let _ = cg.kill_all(Signal::SIGKILL);
        }
        for child in &mut self.children {
            // Only our own children, by the PID we started.
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Ok(cg) = Cgroup::open(&self.root, &self.relative)
            && let Err(e) = cg.delete()
        {
            eprintln!("cleanup: {e}");
        }
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.0 -= 1;
        if live.0 == 0 {
            for dir in live.1.drain(..) {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

fn read_in(cg: &Cgroup, file: &str) -> String {
    let dir = cg
        .dirs()
        .into_iter()
        .find(|d| d.join(file).exists())
        .unwrap_or_else(|| panic!("{file} in no group dir"));
    std::fs::read_to_string(dir.join(file))
        .unwrap()
        .trim()
        .to_string()
}

fn memory_resources(limit: i64, swap: Option<i64>) -> LinuxResources {
    let mut m = LinuxMemoryBuilder::default().limit(limit);
    if let Some(s) = swap {
        m = m.swap(s);
    }
    LinuxResourcesBuilder::default()
        .memory(m.build().unwrap())
        .build()
        .unwrap()
}

#[test]
fn kernel_limits_membership_update_kill_and_delete() {
    let Some(root) = host_root() else { return };
    let mut s = Scratch::new(root.clone());
    let resources = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(64i64 << 20)
                .reservation(32i64 << 20)
                .build()
                .unwrap(),
        )
        .cpu(
            LinuxCpuBuilder::default()
                .shares(512u64)
                .quota(50_000)
                .period(100_000u64)
                .build()
                .unwrap(),
        )
        .pids(LinuxPidsBuilder::default().limit(50).build().unwrap())
        .build()
        .unwrap();
    let cg = Cgroup::create(&root, &s.relative, Some(&resources)).expect("create");
    match root.version {
        CgroupVersion::V1 => {
            assert_eq!(read_in(&cg, "memory.limit_in_bytes"), "67108864");
            assert_eq!(read_in(&cg, "memory.soft_limit_in_bytes"), "33554432");
            assert_eq!(read_in(&cg, "cpu.shares"), "512");
            assert_eq!(read_in(&cg, "cpu.cfs_quota_us"), "50000");
            assert_eq!(read_in(&cg, "cpu.cfs_period_us"), "100000");
        }
        CgroupVersion::V2 => {
            assert_eq!(read_in(&cg, "memory.max"), "67108864");
            assert_eq!(read_in(&cg, "memory.low"), "33554432");
            assert_eq!(read_in(&cg, "cpu.weight"), "20");
            assert_eq!(read_in(&cg, "cpu.max"), "50000 100000");
        }
    }
    assert_eq!(read_in(&cg, "pids.max"), "50");

    let pid = s.spawn_gated("sleep 30");
    cg.add_process(pid).expect("add_process");
    assert_eq!(cg.processes().unwrap(), vec![pid]);
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let rel = format!("/{}", s.relative.display());
    assert!(membership.contains(&rel), "{membership}");
    s.release(0);

    cg.update(&memory_resources(128i64 << 20, None))
        .expect("update");
    let stats = cg.stats().unwrap();
    assert_eq!(stats.memory_limit_bytes, Some(128 << 20));
    assert!(stats.pids_current >= 1, "{stats:?}");
    // Memory charged before the move stays with the old group; what `sleep`
    // maps after its exec is charged here.
    let start = Instant::now();
    while cg.stats().unwrap().memory_usage_bytes == 0 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(cg.stats().unwrap().memory_usage_bytes > 0);

    // Reopening finds the same group.
    let reopened = Cgroup::open(&root, &s.relative).unwrap();
    assert_eq!(reopened.processes().unwrap(), cg.processes().unwrap());

    cg.kill_all(Signal::SIGKILL).expect("kill_all");
    let status = s
        .wait_exit(0, Duration::from_secs(10))
        .expect("child exits");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    cg.delete().expect("delete");
    for dir in cg.dirs() {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    assert!(Cgroup::open(&root, &s.relative).is_err());
}

#[test]
fn kernel_memory_limit_is_enforced_by_the_oom_killer() {
    let Some(root) = host_root() else { return };
    let mut s = Scratch::new(root.clone());
    // Swap equal to the limit leaves no swap to escape into.
    let cg = Cgroup::create(
        &root,
        &s.relative,
        Some(&memory_resources(32 << 20, Some(32 << 20))),
    )
    .expect("create");
    s.spawn_gated("head -c 104857600 /dev/zero | tail");
    cg.add_process(s.children[0].id() as i32).unwrap();
    s.release(0);
    let status = s
        .wait_exit(0, Duration::from_secs(60))
        .expect("allocating child ends");
    assert!(
        !status.success(),
        "allocating 100 MiB under 32 MiB succeeded"
    );
    let stats = cg.stats().unwrap();
    assert!(stats.oom_kills >= 1, "{stats:?}");
    assert_eq!(stats.memory_limit_bytes, Some(32 << 20));
}

#[test]
fn kernel_pids_limit_is_enforced() {
    let Some(root) = host_root() else { return };
    let mut s = Scratch::new(root.clone());
    let resources = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(4).build().unwrap())
        .build()
        .unwrap();
    let cg = Cgroup::create(&root, &s.relative, Some(&resources)).expect("create");
    // The sleeps must not hold the shell's stderr open, or reading it waits for them.
    s.spawn_gated("for i in 1 2 3 4 5 6; do sleep 30 2>/dev/null & done; echo forked; wait");
    cg.add_process(s.children[0].id() as i32).unwrap();
    s.release(0);
    let status = s
        .wait_exit(0, Duration::from_secs(20))
        .expect("the shell gives up when it cannot fork");
    assert!(!status.success());
    let stderr = s.stderr(0);
    assert!(stderr.to_lowercase().contains("fork"), "stderr: {stderr}");
    let stats = cg.stats().unwrap();
    assert!(stats.pids_current <= 4, "{stats:?}");
    // The sleeps the shell did start are still there, and kill_all gets them.
    assert!(!cg.processes().unwrap().is_empty());
    cg.kill_all(Signal::SIGKILL).unwrap();
    cg.delete().expect("delete after kill_all");
    assert!(Cgroup::open(&root, &s.relative).is_err());
}

#[test]
fn kernel_kill_all_with_a_catchable_signal_freezes_and_thaws() {
    let Some(root) = host_root() else { return };
    let mut s = Scratch::new(root.clone());
    let cg = Cgroup::create(&root, &s.relative, None).expect("create");
    s.spawn_gated("trap 'exit 7' TERM; sleep 30 & wait");
    cg.add_process(s.children[0].id() as i32).unwrap();
    s.release(0);
    // Wait until the shell has started its sleep, so the trap is in place.
    let start = Instant::now();
    while cg.processes().unwrap().len() < 2 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(cg.processes().unwrap().len(), 2);
    cg.kill_all(Signal::SIGTERM).expect("kill_all");
    let status = s
        .wait_exit(0, Duration::from_secs(10))
        .expect("shell exits");
    // The trap ran, so the group was thawed after signalling.
    assert_eq!(status.code(), Some(7));
}

#[test]
fn kernel_invalid_values_change_nothing() {
    let Some(root) = host_root() else { return };
    let s = Scratch::new(root.clone());
    let bad = LinuxResourcesBuilder::default()
        .cpu(LinuxCpuBuilder::default().quota(10).build().unwrap())
        .build()
        .unwrap();
    let err = Cgroup::create(&root, &s.relative, Some(&bad)).unwrap_err();
    assert!(
        matches!(
            err,
            CgroupError::InvalidResource {
                field: "linux.resources.cpu.quota",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        Cgroup::open(&root, &s.relative).is_err(),
        "group was created"
    );
}

/// Hybrid hosts also mount an (empty) unified hierarchy: the v2 code paths
/// that need no controller (membership, freeze, `cgroup.kill`, removal) run
/// there for real even on a v1 machine.
#[test]
fn kernel_v2_core_on_this_hosts_unified_mount() {
    let Some(host) = host_root() else { return };
    let path = match host.version {
        CgroupVersion::V2 => host.path.clone(),
        CgroupVersion::V1 => host.path.join("unified"),
    };
    if fs_magic(&path).ok() != Some(CGROUP2_MAGIC) {
        println!("SKIPPED: no cgroup2 mount at {}", path.display());
        return;
    }
    let root = CgroupRoot {
        path,
        version: CgroupVersion::V2,
    };
    let mut s = Scratch::new(root.clone());
    let cg = Cgroup::create(&root, &s.relative, None).expect("create");
    let pid = s.spawn_gated("sleep 30");
    cg.add_process(pid).unwrap();
    assert_eq!(cg.processes().unwrap(), vec![pid]);
    cg.kill_all(Signal::SIGKILL).expect("kill_all");
    let status = s
        .wait_exit(0, Duration::from_secs(10))
        .expect("child exits");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    cg.delete().expect("delete");
    assert!(Cgroup::open(&root, &s.relative).is_err());
}

#[test]
fn kernel_detect_matches_the_mount() {
    let Some(root) = host_root() else { return };
    let fs_type = fs_magic(&root.path).unwrap();
    match root.version {
        CgroupVersion::V2 => assert_eq!(fs_type, CGROUP2_MAGIC),
        CgroupVersion::V1 => assert_eq!(fs_type, TMPFS_MAGIC),
    }
}
