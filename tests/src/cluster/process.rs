//! A host's Gantry process: started detached inside the host's network
//! namespace, recorded by PID *and* start time, and signalled only while that
//! pair still names the process we started.
//!
//! The start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot)
//! makes the record safe across separate CLI invocations: a PID that was
//! reused by an unrelated process after ours died never matches, so `kill`,
//! `stop` and `down` never signal a process the dev cluster did not start.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::net;

/// Errors of starting and signalling processes.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The command could not be started.
    #[error("cannot start {program} for host {host}: {source}")]
    Spawn {
        /// The host.
        host: String,
        /// The program.
        program: String,
        /// What spawn said.
        #[source]
        source: std::io::Error,
    },
    /// The log file could not be opened.
    #[error("cannot open log {path}: {source}")]
    Log {
        /// The log path.
        path: PathBuf,
        /// What open said.
        #[source]
        source: std::io::Error,
    },
    /// The host's network namespace could not be joined.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// A process did not go away after SIGKILL within the bound.
    #[error("process {pid} of host {host} is still there {waited:?} after SIGKILL")]
    Unkillable {
        /// The host.
        host: String,
        /// The PID.
        pid: i32,
        /// How long we waited.
        waited: Duration,
    },
    /// The recorded command is empty.
    #[error("host {host} has no command to run")]
    NoCommand {
        /// The host.
        host: String,
    },
}

/// A process we started: its PID and its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessId {
    /// The PID (also its process group and session: it calls `setsid`).
    pub pid: i32,
    /// Clock ticks since boot when it started (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// What `/proc` says about a recorded process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Running (or sleeping, as processes mostly are).
    Running,
    /// Stopped by a signal (SIGSTOP).
    Stopped,
    /// Gone, a zombie, or the PID now names another process.
    Dead,
}

/// What to run for a host.
pub struct Spawn<'a> {
    /// The host's name, for messages.
    pub host: &'a str,
    /// The netns to run in.
    pub netns: &'a str,
    /// Program and arguments.
    pub argv: &'a [String],
    /// Extra environment.
    pub env: &'a [(String, String)],
    /// Where stdout and stderr go (appended).
    pub log: &'a Path,
}

/// Starts a host's process: in the host's netns (`setns` in the child, so the
/// mount namespace stays the machine's), in a new session (so it survives the
/// CLI that started it and signals can reach its whole process group), stdin
/// from /dev/null, stdout and stderr appended to the host's log.
pub fn spawn(s: &Spawn<'_>) -> Result<(ProcessId, Child), ProcessError> {
    let (program, args) = s
        .argv
        .split_first()
        .ok_or_else(|| ProcessError::NoCommand {
            host: s.host.to_string(),
        })?;
    if let Some(dir) = s.log.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ProcessError::Log {
            path: s.log.to_path_buf(),
            source,
        })?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.log)
        .map_err(|source| ProcessError::Log {
            path: s.log.to_path_buf(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| ProcessError::Log {
        path: s.log.to_path_buf(),
        source,
    })?;
    let mut cmd = net::command_in(s.netns, program)?;
    cmd.args(args)
        .envs(s.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: setsid(2) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        host: s.host.to_string(),
        program: program.clone(),
        source,
    })?;
    let pid = child.id() as i32;
    // The child exists from spawn's return on, so its stat is readable; a
    // child that already exited and was not reaped still shows its stat.
    let start_time = stat(pid).map(|st| st.start_time).unwrap_or(0);
    Ok((ProcessId { pid, start_time }, child))
}

struct Stat {
    state: char,
    start_time: u64,
}

fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the fields
    // we want come after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); field 22 (starttime) is rest[19].
    Some(Stat {
        state: fields.first()?.chars().next()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// What `/proc` says about `id` now.
pub fn liveness(id: ProcessId) -> Liveness {
    match stat(id.pid) {
        Some(st) if st.start_time == id.start_time => match st.state {
            'Z' | 'X' | 'x' => Liveness::Dead,
            'T' | 't' => Liveness::Stopped,
            _ => Liveness::Running,
        },
        _ => Liveness::Dead,
    }
}

/// Sends `signal` to the process group of `id` if `id` still names the
/// process we started; returns whether it did. The group is the process and
/// the helpers it forked without a session of their own (container shims
/// call `setsid`, so containers are never in it).
pub fn signal_group(id: ProcessId, signal: nix::sys::signal::Signal) -> bool {
    if liveness(id) == Liveness::Dead {
        return false;
    }
    let pgid = nix::unistd::Pid::from_raw(id.pid);
    // The leader is ours (checked above) and called setsid, so the group id
    // equals its PID; signalling the group also reaches its forked helpers.
    if nix::sys::signal::killpg(pgid, signal).is_err() {
        return nix::sys::signal::kill(pgid, signal).is_ok();
    }
    true
}

/// SIGKILLs `id`'s group and waits (bounded) until the process is gone,
/// reaping it through `child` when we are its parent.
pub fn kill(host: &str, id: ProcessId, child: Option<&mut Child>) -> Result<(), ProcessError> {
    signal_group(id, nix::sys::signal::Signal::SIGKILL);
    let bound = Duration::from_secs(10);
    let start = Instant::now();
    let mut child = child;
    loop {
        if let Some(c) = child.as_deref_mut() {
            // Reaping turns our zombie into nothing; a process we are not the
            // parent of is reaped by init (or the nearest subreaper).
            let _ = c.try_wait();
        }
        if liveness(id) == Liveness::Dead {
            return Ok(());
        }
        if start.elapsed() > bound {
            return Err(ProcessError::Unkillable {
                host: host.to_string(),
                pid: id.pid,
                waited: bound,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_stat_parses_and_a_wrong_start_time_is_dead() {
        let pid = std::process::id() as i32;
        let st = stat(pid).expect("our own stat");
        let me = ProcessId {
            pid,
            start_time: st.start_time,
        };
        assert_eq!(liveness(me), Liveness::Running);
        let reused = ProcessId {
            pid,
            start_time: st.start_time + 1,
        };
        assert_eq!(liveness(reused), Liveness::Dead, "a reused PID is not ours");
    }
}
