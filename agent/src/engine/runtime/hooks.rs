//! OCI hooks: a program run with the container's state JSON on its stdin.
//!
//! Used by the runtime (prestart, createRuntime, poststart, poststop, in the
//! runtime's namespaces) and by the init (createContainer, startContainer,
//! inside the container). A hook that runs past its `timeout` is killed.

use oci_spec::runtime::Hook;
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The hook could not be started.
    #[error("hook {path}: {source}")]
    Spawn {
        /// The hook's path.
        path: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The hook exited with a failure.
    #[error("hook {path}: {status}")]
    Failed {
        /// The hook's path.
        path: String,
        /// How it ended.
        status: String,
    },
    /// The hook ran past its timeout and was killed.
    #[error("hook {path}: timed out after {seconds}s")]
    Timeout {
        /// The hook's path.
        path: String,
        /// The timeout.
        seconds: i64,
    },
}

/// A hook without a timeout still may not hang the runtime forever.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs every hook in `hooks` in order, stopping at the first failure.
pub fn run_all(hooks: &[Hook], state_json: &[u8]) -> Result<(), HookError> {
    hooks.iter().try_for_each(|h| run(h, state_json))
}

/// Runs one hook with `state_json` on its stdin and waits for it.
pub fn run(hook: &Hook, state_json: &[u8]) -> Result<(), HookError> {
    let path = hook.path().display().to_string();
    let mut cmd = Command::new(hook.path());
    let args = hook.args().as_deref().unwrap_or(&[]);
    if let Some((first, rest)) = args.split_first() {
        cmd.arg0(first).args(rest);
    }
    cmd.env_clear();
    for kv in hook.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| HookError::Spawn {
        path: path.clone(),
        source,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine: ignore EPIPE.
        let _ = stdin.write_all(state_json);
    }
    let timeout = hook
        .timeout()
        .map(|s| Duration::from_secs(s.max(1) as u64))
        .unwrap_or(DEFAULT_TIMEOUT);
    let status = wait_timeout(&mut child, timeout).map_err(|source| HookError::Spawn {
        path: path.clone(),
        source,
    })?;
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(HookError::Failed {
            path,
            status: match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit status {c}"),
                (_, Some(sig)) => format!("killed by signal {sig}"),
                _ => s.to_string(),
            },
        }),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(HookError::Timeout {
                path,
                seconds: timeout.as_secs() as i64,
            })
        }
    }
}

/// Waits for `child` at most `timeout`, sleeping in `poll(2)` on a pidfd
/// rather than spinning.
fn wait_timeout(
    child: &mut std::process::Child,
    timeout: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::c_int, 0) };
    if raw < 0 {
        return child.wait().map(Some);
    }
    // SAFETY: the kernel just returned this descriptor to us.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [nix::poll::PollFd::new(
            pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(
            &mut fds,
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
        );
    }
}
