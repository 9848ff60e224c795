//! The per-container shim: a small, single-threaded process that owns one
//! container for its whole life, like containerd-shim.
//!
//! The engine runs `gantry shim …` (the gantry binary re-executed). That
//! process forks; the child calls `setsid` and becomes the shim, the parent
//! waits for the child's one-line report over a pipe — `ready <init pid>` or
//! `error <message>` —, prints it and exits, so the engine reaps it at once
//! and the shim is adopted by init (or a subreaper). The shim then:
//!
//! 1. creates and starts the container with [`Runtime`], its stdout and
//!    stderr on pipes it holds and its stdin on `/dev/null`;
//! 2. writes `shim.json` (its pid and start time, the init's pid, the start
//!    time of the container), then reports `ready`;
//! 3. runs one `poll(2)` loop over the two pipes and a signalfd (SIGCHLD,
//!    SIGTERM): output goes to the json-file log, SIGTERM is forwarded to the
//!    container, SIGCHLD reaps the init (and any orphan it adopted as a
//!    subreaper);
//! 4. when the init is gone and the pipes are drained, writes `exit.json`
//!    atomically (exit code, signal, OOM kill, start and finish times),
//!    deletes the runtime container (which removes its cgroup) and exits.
//!
//! The shim ignores SIGHUP, SIGINT and SIGPIPE and does not depend on the
//! engine's process: the engine may die and come back; it finds the shim by
//! `shim.json` and the result in `exit.json`.
//!
//! Memory: no threads, no async runtime, one 4 KiB read buffer and the log
//! writer's bounded line buffers.

use crate::engine::cgroups::{Cgroup, CgroupRoot};
use crate::engine::logs::{LOG_FILE, LogConfig, LogWriter, Stream, rfc3339_nano};
use crate::engine::runtime::{CreateOptions, InitStdio, Runtime};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigHandler, SigSet, Signal, kill, signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// The shim's record of itself, in the container directory.
pub const SHIM_STATE_FILE: &str = "shim.json";
/// The exit record the shim leaves, in the container directory.
pub const EXIT_FILE: &str = "exit.json";
/// Where the shim's own diagnostics go, in the container directory.
pub const SHIM_LOG_FILE: &str = "shim.log";

/// How long the shim keeps draining output after the init died (processes
/// that escaped the pid namespace's teardown could hold the pipes forever).
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Errors of the shim (reported to the engine as `error <message>`).
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// A file of the container directory could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        /// The call.
        call: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// The runtime could not create or start the container.
    #[error(transparent)]
    Runtime(#[from] crate::engine::runtime::RuntimeError),
    /// The log could not be written.
    #[error(transparent)]
    Log(#[from] crate::engine::logs::LogError),
}

/// What `gantry shim` is told.
#[derive(Debug, Clone)]
pub struct ShimConfig {
    /// The container id (also its runtime id).
    pub id: String,
    /// The container directory: the OCI bundle, and where logs and records go.
    pub bundle: PathBuf,
    /// The runtime's state root.
    pub runtime_root: PathBuf,
    /// Log rotation.
    pub log: LogConfig,
    /// Remove the container (rootfs, lease, directory) from this data
    /// directory once its exit is recorded (`--rm` of a detached container).
    pub remove_from: Option<crate::paths::DataDir>,
}

/// `shim.json`: how the engine finds a live shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    /// The shim's pid.
    pub shim_pid: i32,
    /// The shim's start time (field 22 of `/proc/<pid>/stat`), to tell it
    /// from a later process that reuses its pid.
    pub shim_start_time: u64,
    /// The container init's pid.
    pub init_pid: i32,
    /// When the container started, RFC 3339.
    pub started_at: String,
}

/// `exit.json`: how a container ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The exit code, 128 + signal number when killed by a signal (as Docker).
    pub exit_code: i32,
    /// The signal that killed the init, if one did.
    pub signal: Option<i32>,
    /// Whether the kernel's OOM killer killed a process of the container.
    pub oom_killed: bool,
    /// When the container started, RFC 3339.
    pub started_at: String,
    /// When the init ended, RFC 3339.
    pub finished_at: String,
}

/// The start time of process `pid` in clock ticks since boot, from
/// `/proc/<pid>/stat`; `None` if it does not exist.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted
    // from the last ')'. starttime is field 22; after ')' comes field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Writes `value` as JSON to `path` atomically (temporary file, fsync, rename).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut file = File::create(&tmp)?;
    serde_json::to_writer(&mut file, value).map_err(std::io::Error::other)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Runs `gantry shim`: returns (in the short-lived parent) the process exit
/// code; the detached shim never returns.
pub fn run(config: &ShimConfig) -> i32 {
    let (report_r, report_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            println!("error pipe: {e}");
            return 1;
        }
    };
    // SAFETY: `gantry shim` is single-threaded (main dispatches to it before
    // anything starts a thread), so the child may run arbitrary code.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            println!("error fork: {e}");
            1
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(report_w);
            let mut report = String::new();
            // Bounded: the child writes one short line, then closes the pipe.
            let _ = File::from(report_r).take(4096).read_to_string(&mut report);
            let line = report
                .lines()
                .next()
                .unwrap_or("error shim exited without reporting");
            println!("{line}");
            if line.starts_with("ready ") { 0 } else { 1 }
        }
        Ok(ForkResult::Child) => {
            drop(report_r);
            let code = match shim_main(config, report_w) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("gantry shim {}: {e}", config.id);
                    1
                }
            };
            std::process::exit(code)
        }
    }
}

/// The detached shim. Reports failures before `ready` over `report`.
fn shim_main(config: &ShimConfig, report: OwnedFd) -> Result<(), ShimError> {
    let mut report = Some(File::from(report));
    let fail = |report: &mut Option<File>, err: &ShimError| {
        if let Some(mut r) = report.take() {
            let message = err.to_string().replace('\n', " ");
            let _ = writeln!(r, "error {message}");
        }
    };
    let runtime = Runtime::new(&config.runtime_root);
    match setup(config, &runtime) {
        Ok(mut shim) => {
            if let Some(mut r) = report.take() {
                let _ = writeln!(r, "ready {}", shim.init);
            }
            trim_memory();
            shim.run_loop()?;
            shim.finish(config, &runtime)
        }
        Err(e) => {
            fail(&mut report, &e);
            // A half-created container must not linger in the state root,
            // but one that already existed belongs to another shim.
            if !matches!(
                e,
                ShimError::Runtime(crate::engine::runtime::RuntimeError::AlreadyExists(_))
            ) {
                let _ = runtime.delete(&config.id, true);
            }
            Err(e)
        }
    }
}

/// Gives back the memory that argument parsing and setup touched but the
/// poll loop never will, so that a shim costs little while its container
/// runs for days:
/// - the pages of our own executable that are still plain file pages
///   (non-writable mappings whose `Anonymous:` is 0 in smaps): dropping them
///   only means the few the loop uses fault back in from the page cache;
/// - the stack below the current frame (the loop runs shallower than
///   argument parsing did);
/// - free heap at the top of the heap (`malloc_trim`).
///
/// Mappings holding private data (writable ones, and the RELRO part that the
/// dynamic loader wrote to) are never touched: their content would be lost.
fn trim_memory() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let here = 0u8;
    let sp = std::ptr::addr_of!(here) as usize;
    // Below the current frame nothing is live; the margin covers the red
    // zone and the calls trim_memory itself makes.
    const STACK_MARGIN: usize = 16 * 1024;
    const PAGE: usize = 4096;
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut candidate: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            // A mapping header: "start-end perms offset dev inode path".
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            candidate = None;
            if path == "[stack]" && sp > start && sp < end {
                let to = sp.saturating_sub(STACK_MARGIN) & !(PAGE - 1);
                if to > start {
                    ranges.push((start, to));
                }
            } else if !perms.contains('w') && Path::new(path) == exe {
                candidate = Some((start, end));
            }
        } else if first == "Anonymous:"
            && let Some(range) = candidate.take()
            && fields.next() == Some("0")
        {
            ranges.push(range);
        }
    }
    drop(smaps);
    for (from, to) in ranges {
        // SAFETY: these ranges hold only unmodified file pages (they fault
        // back in unchanged) or stack below every live frame.
        unsafe {
            libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_DONTNEED);
        }
    }
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

struct Shim {
    init: i32,
    out: Option<OwnedFd>,
    err: Option<OwnedFd>,
    signals: SignalFd,
    log: LogWriter,
    status: Option<WaitStatus>,
    started_at: String,
}

fn sys(call: &'static str) -> impl FnOnce(nix::Error) -> ShimError {
    move |source| ShimError::Sys { call, source }
}

fn setup(config: &ShimConfig, runtime: &Runtime) -> Result<Shim, ShimError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ShimError::Io { path, source }
    };
    nix::unistd::setsid().map_err(sys("setsid"))?;
    // Leave the engine's stdio: our diagnostics go to shim.log, and the
    // engine's pipes must reach EOF when our parent exits.
    let devnull_path = Path::new("/dev/null");
    let devnull = File::open(devnull_path).map_err(io(devnull_path))?;
    let shim_log_path = config.bundle.join(SHIM_LOG_FILE);
    let shim_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&shim_log_path)
        .map_err(io(&shim_log_path))?;
    nix::unistd::dup2_stdin(&devnull).map_err(sys("dup2 stdin"))?;
    nix::unistd::dup2_stdout(&devnull).map_err(sys("dup2 stdout"))?;
    nix::unistd::dup2_stderr(&shim_log).map_err(sys("dup2 stderr"))?;
    // Orphans of the container (e.g. daemonized exec processes) are reaped here.
    nix::sys::prctl::set_child_subreaper(true).map_err(sys("prctl subreaper"))?;

    let log = LogWriter::open(config.bundle.join(LOG_FILE), config.log)?;
    let (out_r, out_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe stdout"))?;
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe stderr"))?;
    let state = runtime.create(
        &config.id,
        &config.bundle,
        CreateOptions {
            stdio: InitStdio::Fds {
                stdin: OwnedFd::from(devnull),
                stdout: out_w,
                stderr: err_w,
            },
            pid_file: None,
        },
    )?;
    let init = state.pid().unwrap_or(0);
    if init <= 0 {
        return Err(ShimError::Sys {
            call: "runtime create (no init pid)",
            source: nix::errno::Errno::ESRCH,
        });
    }
    // Signal setup comes after the init was cloned: blocked signals and
    // ignored dispositions would be inherited by the container's process.
    for sig in [Signal::SIGHUP, Signal::SIGINT, Signal::SIGPIPE] {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { signal(sig, SigHandler::SigIgn) }.map_err(sys("signal"))?;
    }
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.add(Signal::SIGTERM);
    mask.thread_block().map_err(sys("sigprocmask"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(sys("signalfd"))?;

    runtime.start(&config.id)?;
    let started_at = rfc3339_nano(SystemTime::now());
    let me = std::process::id() as i32;
    let shim_state = ShimState {
        shim_pid: me,
        shim_start_time: process_start_time(me).unwrap_or(0),
        init_pid: init,
        started_at: started_at.clone(),
    };
    let state_path = config.bundle.join(SHIM_STATE_FILE);
    write_json_atomic(&state_path, &shim_state).map_err(io(&state_path))?;
    Ok(Shim {
        init,
        out: Some(out_r),
        err: Some(err_r),
        signals,
        log,
        status: None,
        started_at,
    })
}

impl Shim {
    /// Until the init is reaped and both pipes are closed (or the drain
    /// limit after the init's death passed).
    fn run_loop(&mut self) -> Result<(), ShimError> {
        // SIGCHLD may have come before the signalfd existed.
        self.reap();
        let mut buf = [0u8; 4096];
        let mut init_gone_at: Option<Instant> = self.status.map(|_| Instant::now());
        loop {
            if self.status.is_some() && self.out.is_none() && self.err.is_none() {
                return Ok(());
            }
            let timeout = match init_gone_at {
                None => PollTimeout::NONE,
                Some(at) => match DRAIN_LIMIT.checked_sub(at.elapsed()) {
                    Some(left) => PollTimeout::try_from(left).unwrap_or(PollTimeout::ZERO),
                    None => return Ok(()),
                },
            };
            let (out_ready, err_ready, sig_ready) = {
                let mut fds = Vec::with_capacity(3);
                fds.push(PollFd::new(self.signals.as_fd(), PollFlags::POLLIN));
                if let Some(fd) = &self.out {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                }
                if let Some(fd) = &self.err {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                }
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(sys("poll")(e)),
                }
                let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
                let sig = ready(&fds[0]);
                let mut i = 1;
                let mut out = false;
                if self.out.is_some() {
                    out = ready(&fds[i]);
                    i += 1;
                }
                let err = self.err.is_some() && ready(&fds[i]);
                (out, err, sig)
            };
            if out_ready {
                self.pump(Stream::Stdout, &mut buf)?;
            }
            if err_ready {
                self.pump(Stream::Stderr, &mut buf)?;
            }
            if sig_ready {
                while let Ok(Some(info)) = self.signals.read_signal() {
                    if info.ssi_signo == Signal::SIGTERM as u32 {
                        let _ = kill(Pid::from_raw(self.init), Signal::SIGTERM);
                    }
                }
                self.reap();
                if self.status.is_some() && init_gone_at.is_none() {
                    init_gone_at = Some(Instant::now());
                }
            }
        }
    }

    /// Reads what one pipe has; closes it at EOF.
    fn pump(&mut self, stream: Stream, buf: &mut [u8]) -> Result<(), ShimError> {
        let slot = match stream {
            Stream::Stdout => &mut self.out,
            Stream::Stderr => &mut self.err,
        };
        let Some(fd) = slot.as_ref() else {
            return Ok(());
        };
        match nix::unistd::read(fd, buf) {
            Ok(0) | Err(nix::errno::Errno::EBADF) => {
                *slot = None;
                self.log.flush_partial(stream)?;
            }
            Ok(n) => self.log.write(stream, &buf[..n])?,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
            Err(_) => {
                *slot = None;
                self.log.flush_partial(stream)?;
            }
        }
        Ok(())
    }

    /// Reaps every exited child; remembers the init's status.
    fn reap(&mut self) {
        // Bounded by the number of children, which is finite; the cap
        // guards against a kernel surprise.
        for _ in 0..4096 {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    if status.pid() == Some(Pid::from_raw(self.init)) {
                        self.status = Some(status);
                    }
                }
            }
        }
    }

    /// Records the exit and removes the runtime container.
    fn finish(mut self, config: &ShimConfig, runtime: &Runtime) -> Result<(), ShimError> {
        let _ = self.log.flush_partial(Stream::Stdout);
        let _ = self.log.flush_partial(Stream::Stderr);
        let (exit_code, signal) = match self.status {
            Some(WaitStatus::Exited(_, code)) => (code, None),
            Some(WaitStatus::Signaled(_, sig, _)) => (128 + sig as i32, Some(sig as i32)),
            // Unknown: the init was never reaped within the loop's bounds.
            _ => (255, None),
        };
        let oom_killed = CgroupRoot::detect()
            .and_then(|root| Cgroup::open(&root, Path::new(&format!("gantry/{}", config.id))))
            .and_then(|cgroup| cgroup.stats())
            .map(|stats| stats.oom_kills > 0)
            .unwrap_or(false);
        let record = ExitRecord {
            exit_code,
            signal,
            oom_killed,
            started_at: self.started_at.clone(),
            finished_at: rfc3339_nano(SystemTime::now()),
        };
        // The cgroup and runtime state go before the exit record appears, so
        // that whoever sees `exit.json` sees a fully stopped container.
        if let Err(e) = runtime.delete(&config.id, true) {
            eprintln!(
                "gantry shim {}: deleting the runtime container: {e}",
                config.id
            );
        }
        let path = config.bundle.join(EXIT_FILE);
        write_json_atomic(&path, &record).map_err(|source| ShimError::Io {
            path: path.clone(),
            source,
        })?;
        if let Some(data_dir) = &config.remove_from {
            let removed = crate::engine::container::remove_exited(data_dir, &config.id);
            if let Err(e) = removed {
                eprintln!("gantry shim {}: removing the container: {e}", config.id);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_found() {
        let me = std::process::id() as i32;
        let t = process_start_time(me).unwrap();
        assert!(t > 0);
        assert_eq!(process_start_time(me), Some(t));
        assert_eq!(process_start_time(i32::MAX), None);
    }

    #[test]
    fn records_are_written_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(EXIT_FILE);
        let record = ExitRecord {
            exit_code: 137,
            signal: Some(9),
            oom_killed: false,
            started_at: "a".into(),
            finished_at: "b".into(),
        };
        write_json_atomic(&path, &record).unwrap();
        let back: ExitRecord = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, record);
        assert!(!dir.path().join("exit.json.tmp").exists());
    }
}
