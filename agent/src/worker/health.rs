//! Health checks: Docker's HEALTHCHECK semantics over three probes.
//!
//! - [`HealthState`] is the pure counting: status `starting` until the
//!   first success (→ `healthy`) or until `retries` consecutive failures
//!   after the start period (→ `unhealthy`); failures during the start
//!   period do not count; a success resets the streak. No clock: times are
//!   offsets from an origin the caller picks.
//! - [`run_probe`] runs one probe, bounded by the check's timeout:
//!   - exec: `gantry container exec` as a child process (see [`ExecProbe`]
//!     for why not [`Engine::exec`](crate::engine::container::Engine::exec)
//!     in-process); exit 0 is healthy; output kept (Docker's 4 KiB); on
//!     timeout its whole process group is killed.
//!   - tcp and http: from a short-lived thread that joins the container's
//!     network namespace with `setns` (per thread for network namespaces,
//!     so the rest of the process stays where it is) and connects to
//!     `127.0.0.1:port`. Loopback because, until the networking work lands,
//!     a task's namespace has nothing else; a server bound to 0.0.0.0 is
//!     reachable there too. HTTP is a plain `GET` over HTTP/1.0; a 2xx or
//!     3xx status is healthy (Kubernetes' rule).

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Docker's default interval between probes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// Docker's default probe timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Docker's default number of consecutive failures before unhealthy.
pub const DEFAULT_RETRIES: u32 = 3;

/// How much probe output is kept (Docker's).
pub const MAX_OUTPUT: usize = 4096;

/// How many probe results are kept (Docker's).
pub const MAX_LOG: usize = 5;

/// Errors of this module: health checks that do not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    /// A HEALTHCHECK `test` that is none of Docker's forms.
    #[error(
        "invalid healthcheck test {0:?}: expected [\"NONE\"], [\"CMD\", ...] or [\"CMD-SHELL\", command]"
    )]
    InvalidTest(Vec<String>),
}

/// What a probe does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// Runs this command in the container (Docker's `CMD`); `CMD-SHELL`
    /// becomes `["/bin/sh", "-c", command]`.
    Exec(Vec<String>),
    /// Connects to this port on the container's loopback.
    Tcp {
        /// The port.
        port: u16,
    },
    /// `GET path` on this port of the container's loopback.
    Http {
        /// The port.
        port: u16,
        /// The path, e.g. `/healthz`.
        path: String,
    },
}

impl Probe {
    /// Docker's `test` forms: `["NONE"]` (no check: `None`), `["CMD",
    /// args...]`, `["CMD-SHELL", command]`; a bare string list without a
    /// keyword is `CMD-SHELL` joined by spaces, as Compose reads a string.
    pub fn from_docker_test(test: &[String]) -> Result<Option<Probe>, HealthError> {
        let invalid = || HealthError::InvalidTest(test.to_vec());
        match test.first().map(String::as_str) {
            Some("NONE") => Ok(None),
            Some("CMD") if test.len() > 1 => Ok(Some(Probe::Exec(test[1..].to_vec()))),
            Some("CMD-SHELL") if test.len() == 2 => Ok(Some(Probe::Exec(vec![
                "/bin/sh".into(),
                "-c".into(),
                test[1].clone(),
            ]))),
            Some("CMD" | "CMD-SHELL") | None => Err(invalid()),
            Some(_) => Ok(Some(Probe::Exec(vec![
                "/bin/sh".into(),
                "-c".into(),
                test.join(" "),
            ]))),
        }
    }
}

/// A task's health check.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    /// The probe.
    pub probe: Probe,
    /// Time between the end of a probe and the next (the first comes one
    /// interval after the start).
    pub interval: Duration,
    /// A probe running longer fails (and is killed).
    pub timeout: Duration,
    /// Consecutive failures that make the task unhealthy; 0 means Docker's 3.
    pub retries: u32,
    /// Failures during this long after the start do not count, until the
    /// first success.
    pub start_period: Duration,
}

impl HealthCheck {
    /// A check with Docker's defaults.
    pub fn new(probe: Probe) -> Self {
        HealthCheck {
            probe,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            start_period: Duration::ZERO,
        }
    }

    fn retries(&self) -> u32 {
        if self.retries == 0 {
            DEFAULT_RETRIES
        } else {
            self.retries
        }
    }
}

/// Which health check a task runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthSetting {
    /// The image's HEALTHCHECK, if it has one (Docker's default).
    #[default]
    FromImage,
    /// None, even if the image has one (Compose's `disable: true`).
    Disabled,
    /// This one, instead of the image's.
    Check(HealthCheck),
}

/// The HEALTHCHECK of a Docker image config (`config.Healthcheck`: `Test`,
/// and `Interval`, `Timeout`, `StartPeriod` in nanoseconds, `Retries`;
/// zero or absent is Docker's default). `None` when the image has none or
/// says `NONE`.
pub fn from_image_config(config: &serde_json::Value) -> Result<Option<HealthCheck>, HealthError> {
    let Some(hc) = config
        .pointer("/config/Healthcheck")
        .filter(|v| !v.is_null())
    else {
        return Ok(None);
    };
    let test: Vec<String> = hc
        .get("Test")
        .and_then(|t| t.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if test.is_empty() {
        // Docker: an empty test inherits the (absent) parent's: no check.
        return Ok(None);
    }
    let Some(probe) = Probe::from_docker_test(&test)? else {
        return Ok(None);
    };
    let nanos = |key: &str, default: Duration| {
        hc.get(key)
            .and_then(|v| v.as_u64())
            .filter(|n| *n > 0)
            .map_or(default, Duration::from_nanos)
    };
    Ok(Some(HealthCheck {
        probe,
        interval: nanos("Interval", DEFAULT_INTERVAL),
        timeout: nanos("Timeout", DEFAULT_TIMEOUT),
        start_period: nanos("StartPeriod", Duration::ZERO),
        retries: hc
            .get("Retries")
            .and_then(|v| v.as_u64())
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
    }))
}

/// A task's health, as `docker inspect` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// No verdict yet.
    Starting,
    /// The last probe passed.
    Healthy,
    /// `retries` probes in a row failed.
    Unhealthy,
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthStatus::Starting => "starting",
            HealthStatus::Healthy => "healthy",
            HealthStatus::Unhealthy => "unhealthy",
        })
    }
}

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Whether it passed.
    pub healthy: bool,
    /// The exec probe's exit code (`None`: not an exec probe, or killed on timeout).
    pub exit_code: Option<i32>,
    /// Its output or what went wrong, at most [`MAX_OUTPUT`] bytes.
    pub output: String,
}

/// The counting of a task's health since its container (re)started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    status: HealthStatus,
    failing_streak: u32,
    started: Duration,
    log: VecDeque<ProbeResult>,
}

impl HealthState {
    /// A container started at `started`: `starting`.
    pub fn new(started: Duration) -> Self {
        HealthState {
            status: HealthStatus::Starting,
            failing_streak: 0,
            started,
            log: VecDeque::new(),
        }
    }

    /// The status.
    pub fn status(&self) -> HealthStatus {
        self.status
    }

    /// Consecutive counted failures.
    pub fn failing_streak(&self) -> u32 {
        self.failing_streak
    }

    /// The last [`MAX_LOG`] results, oldest first.
    pub fn log(&self) -> impl Iterator<Item = &ProbeResult> {
        self.log.iter()
    }

    /// Counts a probe that ended at `at`; returns the new status when it changed.
    pub fn record(
        &mut self,
        check: &HealthCheck,
        result: ProbeResult,
        at: Duration,
    ) -> Option<HealthStatus> {
        let before = self.status;
        if result.healthy {
            self.failing_streak = 0;
            self.status = HealthStatus::Healthy;
        } else if self.status == HealthStatus::Starting
            && at.saturating_sub(self.started) < check.start_period
        {
            // Docker: a failure in the start period does not count, so a
            // slow starter is not killed before it could answer.
        } else {
            self.failing_streak += 1;
            if self.failing_streak >= check.retries() {
                self.status = HealthStatus::Unhealthy;
            }
        }
        if self.log.len() == MAX_LOG {
            self.log.pop_front();
        }
        self.log.push_back(result);
        (self.status != before).then_some(self.status)
    }
}

/// How the exec probe reaches the container: the `gantry` binary's
/// `container exec`, in a process of its own.
///
/// Why not [`Engine::exec`](crate::engine::container::Engine::exec) in this
/// process: it forks the caller and runs Rust code in the child (sound only
/// from a single-threaded process, and the worker runs probes beside other
/// work), and the child inherits the caller's own stdio, which the worker
/// cannot redirect to capture the output without redirecting its own. A
/// child `gantry` gets a pipe as stdio and its own process group, so a
/// timeout kills the CLI and the probe process with one `killpg`. The cost
/// is a process start per probe, a few milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecProbe {
    /// The `gantry` binary.
    pub gantry_binary: PathBuf,
    /// The node's data directory.
    pub data_dir: PathBuf,
}

/// Where a probe runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// The container id.
    pub container_id: String,
    /// The container's init pid, whose network namespace tcp and http
    /// probes join; `None` probes from the caller's (host networking).
    pub netns_pid: Option<i32>,
}

/// Runs one probe, within `timeout`. Never fails: what goes wrong is an
/// unhealthy result saying what.
pub fn run_probe(
    exec: &ExecProbe,
    probe: &Probe,
    target: &ProbeTarget,
    timeout: Duration,
) -> ProbeResult {
    match probe {
        Probe::Exec(argv) => run_exec(exec, &target.container_id, argv, timeout),
        Probe::Tcp { port } => in_netns(target.netns_pid, {
            let port = *port;
            move || {
                connect(port, timeout).map(|_| ProbeResult {
                    healthy: true,
                    exit_code: None,
                    output: format!("connected to port {port}"),
                })
            }
        }),
        Probe::Http { port, path } => in_netns(target.netns_pid, {
            let (port, path) = (*port, path.clone());
            move || http_get(port, &path, timeout)
        }),
    }
}

fn failure(output: String) -> ProbeResult {
    ProbeResult {
        healthy: false,
        exit_code: None,
        output,
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_OUTPUT {
        let mut end = MAX_OUTPUT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn run_exec(exec: &ExecProbe, container: &str, argv: &[String], timeout: Duration) -> ProbeResult {
    use std::os::unix::process::CommandExt;
    let deadline = Instant::now() + timeout;
    let (read, write) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return failure(format!("probe pipe: {e}")),
    };
    let write2 = match write.try_clone() {
        Ok(w) => w,
        Err(e) => return failure(format!("probe pipe: {e}")),
    };
    let child = Command::new(&exec.gantry_binary)
        .arg("container")
        .arg("--data-dir")
        .arg(&exec.data_dir)
        .arg("exec")
        .arg(container)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2))
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return failure(format!("running {}: {e}", exec.gantry_binary.display()));
        }
    };
    // The child holds the write ends now; ours were moved into the Command,
    // which dropped them after the spawn, so EOF means the probe is done.
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (output, timed_out) = read_until(&read, deadline);
    if timed_out {
        // The CLI and the process it forked share the group we made.
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::SIGKILL);
    }
    let status = child.wait();
    let output = truncate(String::from_utf8_lossy(&output).into_owned());
    if timed_out {
        return failure(format!(
            "health check exceeded timeout ({timeout:?}){}{output}",
            if output.is_empty() { "" } else { ": " }
        ));
    }
    match status {
        Ok(status) => ProbeResult {
            healthy: status.success(),
            exit_code: status.code(),
            output,
        },
        Err(e) => failure(format!("waiting for the probe: {e}")),
    }
}

/// Reads `fd` until EOF or `deadline`; true when the deadline came first.
/// Keeps at most [`MAX_OUTPUT`] bytes and drains the rest.
fn read_until(fd: &OwnedFd, deadline: Instant) -> (Vec<u8>, bool) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (out, true);
        }
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) => return (out, true),
            Ok(_) => match nix::unistd::read(fd, &mut buf) {
                Ok(0) => return (out, false),
                Ok(n) => {
                    let room = MAX_OUTPUT.saturating_sub(out.len());
                    out.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return (out, false),
            },
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return (out, false),
        }
    }
}

/// Runs `f` on a thread that first joins the network namespace of `pid`.
fn in_netns(
    pid: Option<i32>,
    f: impl FnOnce() -> Result<ProbeResult, String> + Send + 'static,
) -> ProbeResult {
    let thread = std::thread::Builder::new()
        .name("gantry-probe".into())
        .spawn(move || {
            if let Some(pid) = pid {
                join_netns(pid)?;
            }
            f()
        });
    match thread.map(|t| t.join()) {
        Ok(Ok(Ok(result))) => result,
        Ok(Ok(Err(message))) => failure(truncate(message)),
        Ok(Err(_)) => failure("probe thread panicked".into()),
        Err(e) => failure(format!("probe thread: {e}")),
    }
}

fn join_netns(pid: i32) -> Result<(), String> {
    let path = Path::new("/proc").join(pid.to_string()).join("ns/net");
    let ns = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns {}: {e}", path.display()))
}

fn connect(port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect to port {port}: {e}"))
}

fn http_get(port: u16, path: &str, timeout: Duration) -> Result<ProbeResult, String> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect(port, timeout)?;
    let left = || Some(deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero());
    let timed_out = || format!("http probe of port {port} exceeded timeout ({timeout:?})");
    stream
        .set_write_timeout(Some(left().ok_or_else(timed_out)?))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: gantry-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("http probe of port {port}: {e}"))?;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    // The status line is all we need; stop once it is in.
    while !response.contains(&b'\n') && response.len() < MAX_OUTPUT {
        stream
            .set_read_timeout(Some(left().ok_or_else(timed_out)?))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("http probe of port {port}: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&response);
    let line = text.lines().next().unwrap_or("").trim().to_string();
    let code = parse_status_line(&line)
        .ok_or_else(|| format!("http probe of port {port}: bad status line {line:?}"))?;
    Ok(ProbeResult {
        healthy: (200..400).contains(&code),
        exit_code: None,
        output: line,
    })
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn pass() -> ProbeResult {
        ProbeResult {
            healthy: true,
            exit_code: Some(0),
            output: String::new(),
        }
    }

    fn fail() -> ProbeResult {
        ProbeResult {
            healthy: false,
            exit_code: Some(1),
            output: "nope".into(),
        }
    }

    fn check(retries: u32, start_period: u64) -> HealthCheck {
        HealthCheck {
            retries,
            start_period: s(start_period),
            ..HealthCheck::new(Probe::Tcp { port: 80 })
        }
    }

    /// Feeds results at the given seconds; returns the status after each.
    fn play(check: &HealthCheck, results: &[(u64, bool)]) -> Vec<HealthStatus> {
        let mut state = HealthState::new(Duration::ZERO);
        results
            .iter()
            .map(|&(at, ok)| {
                state.record(check, if ok { pass() } else { fail() }, s(at));
                state.status()
            })
            .collect()
    }

    #[test]
    fn counting_table() {
        use HealthStatus::{Healthy as H, Starting as S, Unhealthy as U};
        // (name, check, results (second, passed), statuses after each)
        type Case = (
            &'static str,
            HealthCheck,
            Vec<(u64, bool)>,
            Vec<HealthStatus>,
        );
        let table: Vec<Case> = vec![
            (
                "first success is healthy",
                check(3, 0),
                vec![(1, true)],
                vec![H],
            ),
            (
                "three failures make unhealthy",
                check(3, 0),
                vec![(1, false), (2, false), (3, false)],
                vec![S, S, U],
            ),
            (
                "a success resets the streak",
                check(2, 0),
                vec![(1, false), (2, true), (3, false), (4, false)],
                vec![S, H, H, U],
            ),
            (
                "failures in the start period do not count",
                check(2, 10),
                vec![(1, false), (5, false), (9, false), (11, false), (12, false)],
                vec![S, S, S, S, U],
            ),
            (
                "a success ends the start period",
                check(1, 10),
                vec![(1, true), (2, false)],
                vec![H, U],
            ),
            (
                "unhealthy recovers on success",
                check(1, 0),
                vec![(1, false), (2, true)],
                vec![U, H],
            ),
            (
                "retries 0 is Docker's 3",
                check(0, 0),
                vec![(1, false), (2, false), (3, false)],
                vec![S, S, U],
            ),
        ];
        for (name, check, results, want) in table {
            assert_eq!(play(&check, &results), want, "{name}");
        }
    }

    #[test]
    fn record_reports_changes_and_keeps_five_results() {
        let check = check(1, 0);
        let mut state = HealthState::new(Duration::ZERO);
        assert_eq!(
            state.record(&check, pass(), s(1)),
            Some(HealthStatus::Healthy)
        );
        assert_eq!(state.record(&check, pass(), s(2)), None);
        assert_eq!(
            state.record(&check, fail(), s(3)),
            Some(HealthStatus::Unhealthy)
        );
        for i in 0..10 {
            state.record(&check, fail(), s(4 + i));
        }
        assert_eq!(state.log().count(), MAX_LOG);
        assert_eq!(state.failing_streak(), 11);
    }

    #[test]
    fn docker_tests_parse() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(Probe::from_docker_test(&v(&["NONE"])), Ok(None));
        assert_eq!(
            Probe::from_docker_test(&v(&["CMD", "true"])),
            Ok(Some(Probe::Exec(v(&["true"]))))
        );
        assert_eq!(
            Probe::from_docker_test(&v(&["CMD-SHELL", "test -f /ok"])),
            Ok(Some(Probe::Exec(v(&["/bin/sh", "-c", "test -f /ok"]))))
        );
        assert!(Probe::from_docker_test(&v(&["CMD"])).is_err());
        assert!(Probe::from_docker_test(&[]).is_err());
    }

    #[test]
    fn image_healthchecks_parse() {
        let config = serde_json::json!({"config": {"Healthcheck": {
            "Test": ["CMD-SHELL", "wget -q -O- localhost"],
            "Interval": 5_000_000_000u64, "Retries": 4
        }}});
        let check = from_image_config(&config).unwrap().unwrap();
        assert_eq!(
            check.probe,
            Probe::Exec(vec![
                "/bin/sh".into(),
                "-c".into(),
                "wget -q -O- localhost".into()
            ])
        );
        assert_eq!(check.interval, s(5));
        assert_eq!(check.timeout, DEFAULT_TIMEOUT);
        assert_eq!((check.retries, check.start_period), (4, Duration::ZERO));
        let none = serde_json::json!({"config": {"Healthcheck": {"Test": ["NONE"]}}});
        assert_eq!(from_image_config(&none), Ok(None));
        assert_eq!(
            from_image_config(&serde_json::json!({"config": {}})),
            Ok(None)
        );
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line("HTTP/1.1 204 No Content"), Some(204));
        assert_eq!(parse_status_line("HTTP/1.0 500"), Some(500));
        assert_eq!(parse_status_line("SSH-2.0"), None);
    }

    #[test]
    fn tcp_and_http_probes_on_the_host() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for (i, stream) in listener.incoming().take(3).enumerate() {
                let mut stream = stream.unwrap();
                if i == 0 {
                    continue; // the tcp probe only connects
                }
                let mut buf = [0u8; 512];
                let _ = stream.read(&mut buf);
                let reply: &[u8] = if i == 1 {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 503 Service Unavailable\r\n\r\n"
                };
                let _ = stream.write_all(reply);
            }
        });
        let exec = ExecProbe {
            gantry_binary: PathBuf::from("/nonexistent"),
            data_dir: PathBuf::from("/nonexistent"),
        };
        let target = ProbeTarget {
            container_id: "x".into(),
            netns_pid: None,
        };
        let t = s(5);
        assert!(run_probe(&exec, &Probe::Tcp { port }, &target, t).healthy);
        let http = Probe::Http {
            port,
            path: "/healthz".into(),
        };
        let ok = run_probe(&exec, &http, &target, t);
        assert!(ok.healthy, "{ok:?}");
        let bad = run_probe(&exec, &http, &target, t);
        assert!(!bad.healthy);
        assert_eq!(bad.output, "HTTP/1.1 503 Service Unavailable");
        server.join().unwrap();
        // Nothing listens any more.
        let closed = run_probe(&exec, &Probe::Tcp { port }, &target, t);
        assert!(!closed.healthy);
        assert!(
            closed.output.contains("connect to port"),
            "{}",
            closed.output
        );
        // An exec probe whose binary is missing fails, saying so.
        let missing = run_probe(&exec, &Probe::Exec(vec!["true".into()]), &target, t);
        assert!(!missing.healthy);
        assert!(
            missing.output.contains("/nonexistent"),
            "{}",
            missing.output
        );
    }
}
