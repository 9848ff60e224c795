//! Conformance of `gantry runtime` with runc and crun: the same bundle run
//! under all three must give the same observable results.
//!
//! A probe script inside the container prints what a process can see of its
//! sandbox: ids and groups, hostname, its pid, capability sets, no_new_privs,
//! /dev, the mount table (normalised from /proc/self/mountinfo), masked and
//! read-only paths, whether /sys is writable, cwd, env, rlimits, open fds and
//! cgroups. Exit codes (`exit 7`) and death by signal are compared too. runc
//! is the reference; every difference is printed as a diff.
//!
//! Each test thread first enters a private mount namespace with the hybrid
//! cgroup2 mount hidden ([`peers::isolate_cgroup_layout`]), because crun 1.8.1
//! refuses hybrid hosts; all three runtimes then run under the same conditions.

use gantry_tests::bundle::{self, BundleBuilder};
use gantry_tests::peers::{self, OciRuntime, RuntimeKind};
use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long one `X run` may take before the test gives up on it.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// The probe: one `== section` header per thing observed, in a fixed order,
/// with output normalised so that only real differences remain (no inode
/// numbers, mount ids, or times).
const PROBE: &str = r#"
MASKED="/proc/acpi /proc/asound /proc/kcore /proc/keys /proc/latency_stats /proc/timer_list
        /proc/timer_stats /proc/sched_debug /sys/firmware /proc/scsi"
section() { echo "== $1"; }
section id; id
section status; grep -E '^(Uid|Gid|Groups|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status
section hostname; hostname
section pid; echo $$
section cwd; pwd
section umask; umask
section env; env | busybox sort
section limits; cat /proc/self/limits
section fds; ls /proc/self/fd | busybox sort -n | tr '\n' ' '; echo
section devices
# Opening the default devices for reading and writing (the devices cgroup and
# the nodes themselves decide); the probe avoids /dev/null elsewhere so that a
# broken /dev/null shows up here, not as side effects.
for d in null zero full random urandom tty ptmx; do
    r=$( (: </dev/$d) 2>&1 ) && r=ok
    w=$( (: >/dev/$d) 2>&1 ) && w=ok
    echo "/dev/$d read: ${r##*: } write: ${w##*: }"
done
section dev
# crun adds /dev/core (-> /proc/kcore) and chowns /dev/null to the user; both are
# its own extras, not what a workload relies on, so owner and /dev/core are left out.
for f in /dev/* /dev/pts/* /dev/shm /dev/mqueue; do
    [ "$f" = /dev/core ] || stat -c '%n %F %a %t:%T' "$f"
done
section mounts
# Mount point, fs type and per-mount flags. Masked paths are left out here (runc
# and crun mask with different filesystems; the masked section checks the
# effect), and so are superblock options (sizes, and ro on a shared superblock).
awk -v masked="$MASKED" '
    BEGIN { n = split(masked, m, " "); for (k = 1; k <= n; k++) skip[m[k]] = 1 }
    !($5 in skip) { for (i = 7; $i != "-"; i++) ; print $5, $(i + 1), $6 }
' /proc/self/mountinfo | busybox sort
section masked
for p in $MASKED; do
    if [ -d "$p" ]; then echo "$p dir entries=$(ls -A "$p" | wc -l)"
    elif [ -e "$p" ]; then echo "$p file bytes=$(head -c 64 "$p" 2>&1 | wc -c)"
    else echo "$p absent"; fi
done
section readonly
# busybox's `test -w` is always true for root, so really try to write: make a
# directory in each directory; the error (EROFS, EPERM, ...) is part of the result.
for p in /proc/bus /proc/fs /proc/irq /proc/sys /sys /sys/kernel /sys/fs/cgroup /proc /tmp /dev /; do
    if out=$(mkdir "$p/.gantry-probe" 2>&1); then rmdir "$p/.gantry-probe"; echo "$p writable"
    else echo "$p ${out##*: }"; fi
done
touch /sys/gantry-probe 2>&1
echo x 2>&1 >/proc/sys/kernel/hostname | sed 's/.*: //'
section cgroup; cat /proc/self/cgroup
section oom; cat /proc/self/oom_score_adj
section net
# The container's own network namespace: only `lo`, up. sysfs shows the
# devices of the namespace that mounted it, so /sys/class/net must agree.
ip -o link | sed 's/^[0-9]*: //'
ls /sys/class/net
section tmp; stat -c '%n %a %u:%g' / /tmp /root /proc /sys /dev
"#;

/// What one run showed: the runtime's exit status and the container's stdout.
#[derive(Debug)]
struct Observed {
    exit: String,
    stdout: String,
    stderr: String,
}

impl Observed {
    /// The part that must match between runtimes.
    fn comparable(&self, with_stdout: bool) -> String {
        if with_stdout {
            format!("exit: {}\n{}", self.exit, self.stdout)
        } else {
            format!("exit: {}\n", self.exit)
        }
    }
}

/// The runtimes to compare, or why the test cannot run here.
struct Runtimes {
    all: Vec<OciRuntime>,
    _state: tempfile::TempDir,
}

fn runtimes() -> Result<Runtimes, String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("needs root to run containers".into());
    }
    if !bundle::busybox_available() {
        return Err(format!(
            "{} missing (apt-get install busybox-static)",
            bundle::HOST_BUSYBOX
        ));
    }
    let state = tempfile::Builder::new()
        .prefix("gantry-conformance-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let (peers, missing) = peers::peers(state.path());
    if let Some(err) = missing.first() {
        return Err(err.to_string());
    }
    peers::isolate_cgroup_layout().map_err(|e| e.to_string())?;
    let mut all = vec![OciRuntime::new(
        RuntimeKind::Gantry,
        gantry_tests::gantry_bin(),
        state.path().join("gantry"),
    )];
    all.extend(peers);
    Ok(Runtimes { all, _state: state })
}

/// Removes the container if a run left it behind (timeout, panic).
struct ContainerGuard<'a> {
    runtime: &'a OciRuntime,
    id: String,
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        self.runtime.force_delete(&self.id);
    }
}

fn unique_id(case: &str, kind: RuntimeKind) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "conf-{case}-{kind}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `X run` of `bundle`, stdout and stderr to files, bounded by [`RUN_TIMEOUT`].
fn run(runtime: &OciRuntime, bundle: &Path, case: &str) -> Observed {
    let id = unique_id(case, runtime.kind);
    let _guard = ContainerGuard {
        runtime,
        id: id.clone(),
    };
    let out = tempfile::tempfile().expect("stdout temp file");
    let err = tempfile::tempfile().expect("stderr temp file");
    let mut child = runtime
        .run_command(bundle, &id)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup stdout"))
        .stderr(err.try_clone().expect("dup stderr"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", runtime.binary.display()));
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for runtime") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} run {id} took over {RUN_TIMEOUT:?}", runtime.kind);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let exit = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(code), _) => code.to_string(),
        (None, Some(sig)) => format!("runtime killed by signal {sig}"),
        _ => "unknown".into(),
    };
    Observed {
        exit,
        stdout: read_all(out),
        stderr: read_all(err),
    }
}

fn read_all(mut file: File) -> String {
    use std::io::{Read, Seek};
    let mut text = String::new();
    file.rewind().expect("rewind output");
    file.read_to_string(&mut text).expect("read output");
    text
}

/// A line diff of `a` against `b` (longest common subsequence): `-` lines
/// only in `a`, `+` lines only in `b`, and the differing lines' context.
fn diff(a: &str, b: &str) -> String {
    let a: Vec<&str> = a.lines().collect();
    let b: Vec<&str> = b.lines().collect();
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    let mut section = "";
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            if a[i].starts_with("== ") {
                section = a[i];
            }
            i += 1;
            j += 1;
            continue;
        }
        if !section.is_empty() {
            out.push_str(&format!("{section}\n"));
            section = "";
        }
        if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        }
    }
    out
}

/// Runs `builder`'s bundle under every runtime and asserts that all match
/// runc's result (exit status, and stdout when `with_stdout`), and that runc's
/// result holds each of `must_contain`: a probe that broke would otherwise
/// agree with itself everywhere.
fn check_case(case: &str, builder: BundleBuilder, with_stdout: bool, must_contain: &[&str]) {
    let runtimes = match runtimes() {
        Ok(r) => r,
        Err(reason) => {
            println!("SKIPPED: {reason}");
            return;
        }
    };
    let bundle = builder.build_temp().expect("build bundle");
    let results: Vec<(RuntimeKind, Observed)> = runtimes
        .all
        .iter()
        .map(|rt| (rt.kind, run(rt, bundle.path(), case)))
        .collect();
    let reference = results
        .iter()
        .find(|(kind, _)| *kind == RuntimeKind::Runc)
        .map(|(_, o)| o)
        .expect("runc ran");
    let expected = reference.comparable(with_stdout);
    for needle in must_contain {
        assert!(
            expected.contains(needle),
            "case {case}: runc's result lacks {needle:?}:\n{expected}\nstderr:\n{}",
            reference.stderr
        );
    }
    let mut failures = String::new();
    for (kind, observed) in &results {
        let got = observed.comparable(with_stdout);
        if got != expected {
            failures.push_str(&format!(
                "--- runc\n+++ {kind}\n{}{kind} stderr:\n{}\n",
                diff(&expected, &got),
                observed.stderr
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "case {case}: runtimes disagree\n{failures}\nrunc's full output:\n{expected}\nrunc stderr:\n{}",
        reference.stderr
    );
    println!("case {case}: gantry, runc and crun agree:\n{expected}");
}

#[test]
fn probe_as_root_matches_runc_and_crun() {
    check_case(
        "root",
        BundleBuilder::new()
            .args(["sh", "-c", PROBE])
            .hostname("probe")
            .env("PROBE", "root"),
        true,
        &[
            "exit: 0\n",
            "== pid\n1\n",
            "== hostname\nprobe\n",
            "PROBE=root",
            "== tmp\n/ 755",
        ],
    );
}

#[test]
fn probe_as_user_with_groups_cwd_and_rlimits_matches() {
    check_case(
        "user",
        BundleBuilder::new()
            .args(["sh", "-c", PROBE])
            .user(
                bundle::TEST_UID,
                bundle::TEST_UID,
                &[bundle::TEST_EXTRA_GID],
            )
            .cwd("/tmp")
            .hostname("probe-user")
            .env("HOME", "/home/tester")
            .rlimit("RLIMIT_NOFILE", 256, 512)
            .rlimit("RLIMIT_NPROC", 100, 200),
        true,
        &[
            "uid=1000(tester) gid=1000(tester) groups=1001(extra)",
            "== cwd\n/tmp\n",
            "Max open files            256                  512",
        ],
    );
}

#[test]
fn probe_with_readonly_root_and_limits_matches() {
    check_case(
        "ro",
        BundleBuilder::new()
            .args(["sh", "-c", PROBE])
            .readonly_root(true)
            .no_new_privileges(false)
            .default_limits(),
        true,
        &["/ Read-only file system", "NoNewPrivs:\t0"],
    );
}

#[test]
fn exit_code_is_passed_through() {
    check_case(
        "exit7",
        BundleBuilder::new().args(["sh", "-c", "echo before; exit 7"]),
        true,
        &["exit: 7\nbefore\n"],
    );
}

#[test]
fn death_by_sigkill_is_reported_alike() {
    // Without a pid namespace the shell is not an init, so it can kill itself.
    check_case(
        "kill9",
        BundleBuilder::new()
            .args(["sh", "-c", "kill -KILL $$; echo survived"])
            .without_namespace("pid"),
        true,
        &["exit: 137\n"],
    );
}

#[test]
fn death_by_sigterm_is_reported_alike() {
    check_case(
        "kill15",
        BundleBuilder::new()
            .args(["sh", "-c", "kill -TERM $$; echo survived"])
            .without_namespace("pid"),
        true,
        &["exit: 143\n"],
    );
}

#[test]
fn missing_executable_fails_alike() {
    check_case(
        "noexec",
        BundleBuilder::new().args(["/bin/does-not-exist"]),
        false,
        &["exit: 1\n"],
    );
}

#[test]
fn diff_marks_changed_lines_under_their_section() {
    let d = diff("== a\nx\n== b\ny\nz\n", "== a\nx\n== b\nY\nz\n");
    assert_eq!(d, "== b\n+ Y\n- y\n");
    assert_eq!(diff("same\n", "same\n"), "");
}

/// The limits a process's cgroups enforce, read on the host: memory limit,
/// pids limit and CPU quota/period, under cgroup v1 or v2.
fn host_cgroup_limits(pid: i64) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| format!("/proc/{pid}/cgroup: {e}"))?;
    let path_of = |controller: &str| {
        text.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
            list.split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })
    };
    let read = |file: String| {
        std::fs::read_to_string(&file)
            .map(|v| v.trim().to_string())
            .map_err(|e| format!("{file}: {e}"))
    };
    let mut limits = Vec::new();
    if let Some(mem) = path_of("memory") {
        if mem == "/" {
            return Err(format!("pid {pid} is in the root memory cgroup"));
        }
        let cpu = path_of("cpu").ok_or("no cpu cgroup")?;
        let pids = path_of("pids").ok_or("no pids cgroup")?;
        let root = "/sys/fs/cgroup";
        limits.push(format!(
            "memory {}",
            read(format!("{root}/memory{mem}/memory.limit_in_bytes"))?
        ));
        limits.push(format!(
            "pids {}",
            read(format!("{root}/pids{pids}/pids.max"))?
        ));
        limits.push(format!(
            "cpu quota {}",
            read(format!("{root}/cpu{cpu}/cpu.cfs_quota_us"))?
        ));
        limits.push(format!(
            "cpu period {}",
            read(format!("{root}/cpu{cpu}/cpu.cfs_period_us"))?
        ));
    } else {
        let path = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("no cgroup v2 line")?;
        let dir = format!("/sys/fs/cgroup{path}");
        limits.push(format!("memory {}", read(format!("{dir}/memory.max"))?));
        limits.push(format!("pids {}", read(format!("{dir}/pids.max"))?));
        limits.push(format!("cpu {}", read(format!("{dir}/cpu.max"))?));
    }
    Ok(limits)
}

#[test]
fn cgroup_limits_are_applied_alike() {
    let runtimes = match runtimes() {
        Ok(r) => r,
        Err(reason) => {
            println!("SKIPPED: {reason}");
            return;
        }
    };
    let bundle = BundleBuilder::new()
        .args(["sleep", "30"])
        .memory_limit(96 << 20)
        .pids_limit(64)
        .cpu_limit(50_000, 100_000)
        .build_temp()
        .expect("build bundle");
    let mut seen = Vec::new();
    for rt in &runtimes.all {
        let id = unique_id("limits", rt.kind);
        let _guard = ContainerGuard {
            runtime: rt,
            id: id.clone(),
        };
        let status = rt
            .command()
            .arg("create")
            .arg("--bundle")
            .arg(bundle.path())
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .expect("spawn create");
        assert!(status.success(), "{} create {id}: {status}", rt.kind);
        let state = rt
            .command()
            .arg("state")
            .arg(&id)
            .output()
            .expect("spawn state");
        assert!(
            state.status.success(),
            "{} state {id}: {}",
            rt.kind,
            state.status
        );
        let state: serde_json::Value =
            serde_json::from_slice(&state.stdout).expect("state is JSON");
        assert_eq!(
            state["status"], "created",
            "{} state {id}: {state}",
            rt.kind
        );
        let pid = state["pid"].as_i64().expect("state has a pid");
        let limits = host_cgroup_limits(pid).unwrap_or_else(|e| panic!("{}: {e}", rt.kind));
        seen.push((rt.kind, limits));
    }
    let reference = &seen
        .iter()
        .find(|(kind, _)| *kind == RuntimeKind::Runc)
        .expect("runc ran")
        .1;
    assert!(
        reference.contains(&"memory 100663296".to_string())
            && reference.contains(&"pids 64".to_string()),
        "runc applied {reference:?}"
    );
    for (kind, limits) in &seen {
        assert_eq!(limits, reference, "{kind} applies other limits than runc");
    }
}
