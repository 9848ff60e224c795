//! Container start benchmark: `gantry runtime` against runc and crun on the
//! same busybox bundle, and the resident memory of Gantry's shims.
//!
//! Run: `cargo bench -p gantry-tests --bench container_start` as root. It
//! first brings the release `gantry` binary up to date (`cargo build --release
//! --bin gantry`; or measures `GANTRY_BIN`), and takes about 1–3 minutes.
//!
//! Measured, with memory, pids and cpu cgroup limits in the bundle:
//! - `run_true`: `X run --bundle B ID` of `/bin/true` (create, start, wait,
//!   delete in one command), wall time from spawn to the runtime's exit;
//! - `first_output`: the same with `echo hi`, from spawn to the first byte on
//!   the stdout pipe;
//! - `shim_pss`: the proportional set size (`/proc/PID/smaps_rollup`) of each
//!   shim of 10 containers started with `gantry container run -d`.
//!
//! Rounds are interleaved (each round runs every runtime, in an order that
//! rotates from round to round) so that noise from the shared machine falls on
//! all runtimes alike; warm-up rounds are discarded. All runtimes run in one
//! private mount namespace where the hybrid cgroup2 mount is hidden, because
//! crun 1.8.1 refuses hybrid hosts (see `gantry_tests::peers`).
//!
//! Results: `bench-results/container-start.json` and `.md` at the workspace
//! root, and the table on stdout. Knobs: `GANTRY_BENCH_ROUNDS` (measured
//! rounds, default 200), `GANTRY_BENCH_WARMUP` (default 10),
//! `GANTRY_BENCH_BUDGET_S` (stop adding rounds after this many seconds,
//! default 120).

use gantry_tests::bench::{env_usize, gantry_release_bin, git_commit, utc_now, workspace_root};
use gantry_tests::bundle::{self, BundleBuilder};
use gantry_tests::peers::{self, OciRuntime, RuntimeKind};
use serde_json::{Value, json};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long one run may take before it counts as hung and is killed.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// How many containers the shim memory measurement starts.
const SHIM_CONTAINERS: usize = 10;

/// The shim memory target, in KiB of PSS.
const SHIM_TARGET_KIB: u64 = 1024;

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    if let Err(reason) = preflight() {
        println!("SKIPPED: {reason}");
        return;
    }
    let workspace = workspace_root();
    let state = tempfile::Builder::new()
        .prefix("gantry-bench-")
        .tempdir()
        .expect("temp dir for runtime state");
    let isolation = peers::isolate_cgroup_layout().expect("private mount namespace");

    let (mut runtimes, missing) = peers::peers(state.path());
    for err in &missing {
        println!("note: {err}");
    }
    let gantry = gantry_release_bin(&workspace);
    runtimes.insert(
        0,
        OciRuntime::new(RuntimeKind::Gantry, &gantry, state.path().join("gantry")),
    );

    let true_bundle = BundleBuilder::new()
        .args(["/bin/true"])
        .default_limits()
        .build_temp()
        .expect("bundle for /bin/true");
    let echo_bundle = BundleBuilder::new()
        .args(["echo", "hi"])
        .default_limits()
        .build_temp()
        .expect("bundle for echo hi");

    // A runtime that cannot run the bundle at all (e.g. `gantry runtime` not
    // built yet) is reported and left out rather than failing every round.
    let mut unavailable = Vec::new();
    runtimes.retain(|rt| match run_true(rt, true_bundle.path(), "probe") {
        Ok(_) => true,
        Err(err) => {
            println!("note: {} left out: {err}", rt.kind);
            unavailable.push(json!({"runtime": rt.kind.name(), "error": err}));
            false
        }
    });

    let rounds = env_usize("GANTRY_BENCH_ROUNDS", 200);
    let warmup = env_usize("GANTRY_BENCH_WARMUP", 10);
    let budget = Duration::from_secs(env_usize("GANTRY_BENCH_BUDGET_S", 120) as u64);
    let started = Instant::now();
    let mut samples: Vec<Samples> = runtimes.iter().map(|_| Samples::default()).collect();
    let mut round = 0;
    while round < warmup + rounds {
        if round >= warmup && started.elapsed() > budget {
            println!("note: time budget {budget:?} spent after {round} rounds");
            break;
        }
        let n = runtimes.len();
        for k in 0..n {
            let i = (round + k) % n;
            let rt = &runtimes[i];
            let id = format!("r{round}");
            let a = run_true(rt, true_bundle.path(), &id);
            let b = first_output(rt, echo_bundle.path(), &id);
            if round < warmup {
                continue;
            }
            let s = &mut samples[i];
            match a {
                Ok(d) => s.run_true.push(d),
                Err(e) => s.errors.push(format!("run_true: {e}")),
            }
            match b {
                Ok(d) => s.first_output.push(d),
                Err(e) => s.errors.push(format!("first_output: {e}")),
            }
        }
        round += 1;
    }
    let measured_rounds = round.saturating_sub(warmup);

    let shim = shim_memory(&gantry, &workspace);

    let report = json!({
        "benchmark": "container_start",
        "date": utc_now(),
        "gantry_commit": git_commit(&workspace),
        "machine": machine(isolation),
        "bundle": "tests/src/bundle.rs busybox bundle with default_limits(): memory 256 MiB, pids 512, cpu 100000/100000",
        "rounds": measured_rounds,
        "warmup_rounds": warmup,
        "elapsed_s": round2(started.elapsed().as_secs_f64()),
        "runtimes": runtimes.iter().zip(&samples).map(|(rt, s)| json!({
            "runtime": rt.kind.name(),
            "binary": rt.binary.display().to_string(),
            "version": version_of(rt),
            "run_true_ms": stats_json(&s.run_true),
            "first_output_ms": stats_json(&s.first_output),
            "errors": s.errors,
        })).collect::<Vec<_>>(),
        "unavailable": unavailable,
        "targets": targets(&runtimes, &samples),
        "shim_memory": shim,
    });
    let table = markdown(&report);
    gantry_tests::bench::write_figures(&workspace, "container-start", &report, &table);
}

/// Why the benchmark cannot run here, if it cannot.
fn preflight() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("needs root to run containers".into());
    }
    if !bundle::busybox_available() {
        return Err(format!(
            "{} missing (apt-get install busybox-static)",
            bundle::HOST_BUSYBOX
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Samples {
    run_true: Vec<Duration>,
    first_output: Vec<Duration>,
    errors: Vec<String>,
}

/// Summary statistics of one runtime and metric, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Stats {
    n: usize,
    median: f64,
    p95: f64,
    min: f64,
    mean: f64,
}

impl Stats {
    fn of(samples: &[Duration]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = if n % 2 == 1 {
            ms[n / 2]
        } else {
            (ms[n / 2 - 1] + ms[n / 2]) / 2.0
        };
        // Nearest-rank percentile.
        let p95 = ms[((n as f64 * 0.95).ceil() as usize).clamp(1, n) - 1];
        Some(Stats {
            n,
            median,
            p95,
            min: ms[0],
            mean: ms.iter().sum::<f64>() / n as f64,
        })
    }
}

/// The statistics of `samples` as JSON (null when there are none).
fn stats_json(samples: &[Duration]) -> Value {
    match Stats::of(samples) {
        None => Value::Null,
        Some(s) => json!({
            "n": s.n, "median": round2(s.median), "p95": round2(s.p95),
            "min": round2(s.min), "mean": round2(s.mean),
        }),
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The targets: Gantry's median at most half of crun's, for both metrics.
fn targets(runtimes: &[OciRuntime], samples: &[Samples]) -> Value {
    let median = |kind: RuntimeKind, f: fn(&Samples) -> &Vec<Duration>| {
        runtimes
            .iter()
            .position(|rt| rt.kind == kind)
            .and_then(|i| Stats::of(f(&samples[i])))
            .map(|s| s.median)
    };
    let ratio = |f: fn(&Samples) -> &Vec<Duration>| match (
        median(RuntimeKind::Gantry, f),
        median(RuntimeKind::Crun, f),
    ) {
        (Some(g), Some(c)) if c > 0.0 => {
            json!({"gantry_over_crun": round2(g / c), "met": g / c <= 0.5})
        }
        _ => Value::Null,
    };
    json!({
        "rule": "gantry median <= 0.5 x crun median",
        "run_true": ratio(|s| &s.run_true),
        "first_output": ratio(|s| &s.first_output),
    })
}

/// `X run` of the `/bin/true` bundle: spawn to exit.
fn run_true(rt: &OciRuntime, bundle: &Path, id: &str) -> Result<Duration, String> {
    let id = format!("bench-{}-{id}", rt.kind);
    let start = Instant::now();
    let mut child = rt
        .run_command(bundle, &id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", rt.binary.display()))?;
    let status = wait_bounded(&mut child, start + RUN_TIMEOUT);
    let elapsed = start.elapsed();
    check_exit(rt, &id, &mut child, status).map(|()| elapsed)
}

/// `X run` of the `echo hi` bundle: spawn to the first byte on stdout.
fn first_output(rt: &OciRuntime, bundle: &Path, id: &str) -> Result<Duration, String> {
    let id = format!("bench-{}-{id}-echo", rt.kind);
    let start = Instant::now();
    let mut child = rt
        .run_command(bundle, &id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", rt.binary.display()))?;
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let ready = poll_readable(stdout.as_raw_fd(), start + RUN_TIMEOUT);
    let elapsed = start.elapsed();
    let mut text = String::new();
    if ready {
        let _ = stdout.read_to_string(&mut text);
    }
    let status = wait_bounded(&mut child, start + RUN_TIMEOUT);
    check_exit(rt, &id, &mut child, status)?;
    if text != "hi\n" {
        return Err(format!("{id}: stdout was {text:?}, not \"hi\\n\""));
    }
    Ok(elapsed)
}

fn check_exit(
    rt: &OciRuntime,
    id: &str,
    child: &mut Child,
    status: Result<ExitStatus, String>,
) -> Result<(), String> {
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => {
            rt.force_delete(id);
            Err(format!("{id}: {s}: {}", stderr.trim()))
        }
        Err(e) => {
            rt.force_delete(id);
            Err(format!("{id}: {e}"))
        }
    }
}

/// Waits for `child` to exit, up to `deadline`, without polling in a sleep
/// loop (which would add its granularity to every sample): a pidfd becomes
/// readable when the process exits. A child still running at the deadline is
/// killed.
fn wait_bounded(child: &mut Child, deadline: Instant) -> Result<ExitStatus, String> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if raw < 0 {
        return Err(format!("pidfd_open: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
    if !poll_readable(pidfd.as_raw_fd(), deadline) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("did not exit within {RUN_TIMEOUT:?}"));
    }
    child.wait().map_err(|e| format!("wait: {e}"))
}

/// Whether `fd` became readable (or hung up) before `deadline`.
fn poll_readable(fd: RawFd, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms.max(1)) };
        if n > 0 {
            return true;
        }
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// The first line of `X --version`.
fn version_of(rt: &OciRuntime) -> String {
    let out = Command::new(&rt.binary).arg("--version").output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        Err(e) => format!("unknown: {e}"),
    }
}

fn machine(isolation: peers::Isolation) -> Value {
    let uts = nix::sys::utsname::uname().ok();
    let field = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uts.as_ref()
            .map(|u| f(u).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cgroups = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else if Path::new(peers::UNIFIED_MOUNT).exists() {
        "v1 hybrid (cgroup2 at /sys/fs/cgroup/unified hidden from the runtimes)"
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
    json!({
        "os": os,
        "kernel": field(|u| u.release()),
        "arch": field(|u| u.machine()),
        "cpus": cpus,
        "cpu_model": cpu_model,
        "cgroups": cgroups,
        "isolation": format!("{isolation:?}"),
    })
}

/// Resident memory of Gantry's shims: 10 containers started with
/// `gantry container run -d`, PSS of each shim from smaps_rollup.
fn shim_memory(gantry: &Path, workspace: &Path) -> Value {
    match shim::measure(gantry, workspace, SHIM_CONTAINERS) {
        Ok(shims) => {
            let median = |f: fn(&shim::Pss) -> u64| {
                let mut v: Vec<u64> = shims.iter().map(f).collect();
                v.sort_unstable();
                let n = v.len();
                if n % 2 == 1 {
                    v[n / 2] as f64
                } else {
                    (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0
                }
            };
            let max = shims.iter().map(|p| p.total).max().unwrap_or(0);
            json!({
                "containers": shims.len(),
                "pss_kib": shims.iter().map(|p| p.total).collect::<Vec<_>>(),
                "median_kib": median(|p| p.total),
                "max_kib": max,
                "median_anon_kib": median(|p| p.anon),
                "median_file_kib": median(|p| p.file),
                "target_kib": SHIM_TARGET_KIB,
                "met": max <= SHIM_TARGET_KIB,
                "note": "containerd-shim is not installed here, so there is no peer figure",
            })
        }
        Err(reason) => {
            println!("note: shim memory not measured: {reason}");
            json!({"skipped": reason, "target_kib": SHIM_TARGET_KIB})
        }
    }
}

mod shim {
    //! Starting detached containers with `gantry container run -d` and
    //! reading their shims' memory.

    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// How long the shims may take to appear.
    const SHIM_WAIT: Duration = Duration::from_secs(20);

    /// A workload that stays up and stops at once on SIGTERM (a plain
    /// `sleep` as PID 1 ignores it, and every stop would wait the grace period).
    const WORKLOAD: [&str; 3] = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"];

    /// Removes the containers (and, should one survive that, kills its shim)
    /// and the node's data directory, even when the measurement fails.
    struct Cleanup {
        gantry: PathBuf,
        data: tempfile::TempDir,
        names: Vec<String>,
        shims: Vec<u32>,
    }

    impl Cleanup {
        fn gantry(&self) -> Command {
            let mut cmd = Command::new(&self.gantry);
            cmd.env("GANTRY_DATA_DIR", self.data.path());
            cmd
        }
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            for name in &self.names {
                let _ = self
                    .gantry()
                    .args(["container", "rm", "--force", name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            for pid in &self.shims {
                // Only shims this run found under its own data directory, and
                // only if that is still what the pid is.
                if is_our_shim(*pid, self.data.path()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }

    /// PSS in KiB of each shim of `count` detached containers.
    pub fn measure(gantry: &Path, workspace: &Path, count: usize) -> Result<Vec<Pss>, String> {
        let help = Command::new(gantry)
            .args(["container", "run", "--help"])
            .output()
            .map_err(|e| format!("{}: {e}", gantry.display()))?;
        if !help.status.success() {
            return Err("gantry container run is not available in this build".into());
        }
        let data = tempfile::Builder::new()
            .prefix("gantry-bench-node-")
            .tempdir()
            .map_err(|e| format!("temp data dir: {e}"))?;
        let mut cleanup = Cleanup {
            gantry: gantry.to_path_buf(),
            data,
            names: Vec::new(),
            shims: Vec::new(),
        };
        let images = cleanup.data.path().join("test-images");
        run(Command::new(workspace.join("deploy/images/build-test-images.sh")).arg(&images))?;
        run(cleanup
            .gantry()
            .args(["image", "import"])
            .arg(images.join("busybox")))?;
        for i in 0..count {
            let name = format!("bench-shim-{}-{i}", std::process::id());
            cleanup.names.push(name.clone());
            run(cleanup
                .gantry()
                // No bridge: shim memory does not depend on it, and the
                // bench runs in the machine's own network namespace.
                .args([
                    "container",
                    "run",
                    "-d",
                    "--network",
                    "none",
                    "--name",
                    &name,
                    "gantry.test/busybox:latest",
                ])
                .args(WORKLOAD))?;
        }
        let deadline = Instant::now() + SHIM_WAIT;
        loop {
            cleanup.shims = find_shims(cleanup.data.path());
            if cleanup.shims.len() >= count {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "found {} shims of {count} containers after {SHIM_WAIT:?}",
                    cleanup.shims.len()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Let the shims settle (first-touch of their pages) before reading.
        std::thread::sleep(Duration::from_millis(500));
        cleanup.shims.iter().map(|pid| pss(*pid)).collect()
    }

    fn run(cmd: &mut Command) -> Result<(), String> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{cmd:?}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The pids of `gantry shim` processes of the node whose data directory
    /// is `data` (named in their command line or environment).
    fn find_shims(data: &Path) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut pids: Vec<u32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|pid| is_our_shim(*pid, data))
            .collect();
        pids.sort_unstable();
        pids
    }

    fn is_our_shim(pid: u32, data: &Path) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.get(1) != Some(&&b"shim"[..]) {
            return false;
        }
        let needle = data.as_os_str().as_encoded_bytes();
        let mentions = |bytes: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        mentions(&cmdline)
            || std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| mentions(&env))
    }

    /// A process's proportional set size, in KiB: all of it, and the part
    /// that is its own (anonymous) rather than shared file pages (the binary).
    #[derive(Debug, Clone, Copy)]
    pub struct Pss {
        /// `Pss:`.
        pub total: u64,
        /// `Pss_Anon:`.
        pub anon: u64,
        /// `Pss_File:`.
        pub file: u64,
    }

    /// The PSS lines of `/proc/PID/smaps_rollup`.
    pub fn pss(pid: u32) -> Result<Pss, String> {
        let path = format!("/proc/{pid}/smaps_rollup");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .ok_or_else(|| format!("{path}: no {name} line"))
        };
        Ok(Pss {
            total: field("Pss:")?,
            anon: field("Pss_Anon:")?,
            file: field("Pss_File:")?,
        })
    }
}

/// The markdown table of a report.
fn markdown(report: &Value) -> String {
    let mut md = String::new();
    let m = &report["machine"];
    md.push_str(&format!(
        "# Container start: gantry vs runc vs crun\n\n{} (gantry {}) — {}, kernel {}, {} CPUs ({}), cgroups {}; {} rounds (+{} warm-up), {} s\n\n",
        report["date"].as_str().unwrap_or(""),
        report["gantry_commit"].as_str().unwrap_or(""),
        m["os"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or(""),
        m["cgroups"].as_str().unwrap_or(""),
        report["rounds"],
        report["warmup_rounds"],
        report["elapsed_s"],
    ));
    md.push_str("| metric | runtime | median ms | p95 ms | min ms | mean ms | n |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|\n");
    for (metric, key) in [
        ("run /bin/true", "run_true_ms"),
        ("first output of echo hi", "first_output_ms"),
    ] {
        for rt in report["runtimes"].as_array().into_iter().flatten() {
            let s = &rt[key];
            if s.is_null() {
                md.push_str(&format!(
                    "| {metric} | {} | – | – | – | – | 0 |\n",
                    rt["runtime"].as_str().unwrap_or("")
                ));
                continue;
            }
            md.push_str(&format!(
                "| {metric} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
                rt["runtime"].as_str().unwrap_or(""),
                s["median"].as_f64().unwrap_or(0.0),
                s["p95"].as_f64().unwrap_or(0.0),
                s["min"].as_f64().unwrap_or(0.0),
                s["mean"].as_f64().unwrap_or(0.0),
                s["n"],
            ));
        }
    }
    md.push('\n');
    let t = &report["targets"];
    for (metric, key) in [
        ("run /bin/true", "run_true"),
        ("first output", "first_output"),
    ] {
        match t[key].as_object() {
            Some(o) => md.push_str(&format!(
                "- {metric}: gantry/crun median = {} (target ≤ 0.5: {})\n",
                o["gantry_over_crun"],
                if o["met"] == true { "met" } else { "NOT met" }
            )),
            None => md.push_str(&format!("- {metric}: gantry/crun ratio not available\n")),
        }
    }
    let shim = &report["shim_memory"];
    if let Some(reason) = shim["skipped"].as_str() {
        md.push_str(&format!("- shim PSS: not measured ({reason})\n"));
    } else {
        md.push_str(&format!(
            "- shim PSS over {} containers: median {} KiB (anon {}, file {}), max {} KiB (target ≤ {} KiB: {})\n",
            shim["containers"],
            shim["median_kib"],
            shim["median_anon_kib"],
            shim["median_file_kib"],
            shim["max_kib"],
            shim["target_kib"],
            if shim["met"] == true {
                "met"
            } else {
                "NOT met"
            }
        ));
    }
    for rt in report["runtimes"].as_array().into_iter().flatten() {
        let errors = rt["errors"].as_array().map_or(0, Vec::len);
        if errors > 0 {
            md.push_str(&format!(
                "- {}: {errors} failed runs, first: {}\n",
                rt["runtime"].as_str().unwrap_or(""),
                rt["errors"][0]
            ));
        }
    }
    for u in report["unavailable"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "- {} not measured: {}\n",
            u["runtime"].as_str().unwrap_or(""),
            u["error"].as_str().unwrap_or("")
        ));
    }
    md
}
