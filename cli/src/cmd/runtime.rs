//! `gantry runtime`: run OCI bundles directly, with runc's command names and
//! flags so that containerd-style callers can use it.
//!
//! Wiring only: the work is done by `gantry_agent::engine::runtime`. This
//! path must stay single-threaded (the runtime clones container processes
//! from this very process), so nothing here starts a thread.

use super::UsageError;
use anyhow::{Context, bail};
use gantry_agent::engine::runtime::{
    CreateOptions, DEFAULT_ROOT, ExecOptions, InitStdio, Runtime, RuntimeError,
};
use nix::sys::signal::Signal;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

/// Arguments of `gantry runtime`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where container state is kept.
    #[arg(long, global = true, default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Accepted for runc compatibility; logs go to stderr.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Accepted for runc compatibility; ignored.
    #[arg(long = "log-format", global = true)]
    log_format: Option<String>,
    /// Not supported: Gantry manages cgroupfs directly (`=false` is accepted).
    #[arg(
        long = "systemd-cgroup",
        global = true,
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true
    )]
    systemd_cgroup: Option<bool>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create a container from a bundle; its init waits for `start`.
    Create {
        /// The bundle directory (holding config.json).
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        /// Write the init's pid here.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Not supported yet.
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// Accepted for runc compatibility: no session keyring is made anyway.
        #[arg(long)]
        no_new_keyring: bool,
        /// Not supported: the rootfs is always pivoted.
        #[arg(long)]
        no_pivot: bool,
        /// The container id.
        id: String,
    },
    /// Start a created container's process.
    Start {
        /// The container id.
        id: String,
    },
    /// Print a container's OCI state as JSON.
    State {
        /// The container id.
        id: String,
    },
    /// Send a signal to a container's init (default TERM).
    Kill {
        /// Signal every process of the container.
        #[arg(short, long)]
        all: bool,
        /// The container id.
        id: String,
        /// A name (`KILL`, `SIGKILL`) or a number.
        signal: Option<String>,
    },
    /// Delete a container (a running one only with --force).
    Delete {
        /// Kill the container first if it runs.
        #[arg(short, long)]
        force: bool,
        /// The container id.
        id: String,
    },
    /// Create, start, wait for and delete a container; exits with its code.
    Run {
        /// The bundle directory (holding config.json).
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
        /// Write the init's pid here.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Not supported yet.
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// The container id.
        id: String,
    },
    /// Run a process in a running container; exits with its code.
    Exec(Box<ExecArgs>),
    /// List containers.
    #[command(alias = "ls")]
    List {
        /// `table` or `json`.
        #[arg(short, long, default_value = "table")]
        format: String,
    },
}

/// Runs `gantry runtime`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.systemd_cgroup == Some(true) {
        return Err(
            UsageError("--systemd-cgroup: not supported (gantry drives cgroupfs)".into()).into(),
        );
    }
    let _ = (&args.log, &args.log_format);
    let rt = Runtime::new(&args.root);
    match args.command {
        Command::Create {
            bundle,
            pid_file,
            console_socket,
            no_new_keyring: _,
            no_pivot,
            id,
        } => {
            no_console_socket(&console_socket)?;
            if no_pivot {
                return Err(UsageError("--no-pivot: not supported".into()).into());
            }
            let options = CreateOptions {
                stdio: InitStdio::Inherit,
                pid_file,
            };
            rt.create(&id, &bundle, options).map_err(classify)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Start { id } => {
            rt.start(&id).map_err(classify)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::State { id } => {
            let state = rt.state(&id).map_err(classify)?;
            println!("{}", serde_json::to_string_pretty(&state)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Kill { all, id, signal } => {
            let signal = parse_signal(signal.as_deref().unwrap_or("TERM"))?;
            rt.kill(&id, signal, all).map_err(classify)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete { force, id } => {
            rt.delete(&id, force).map_err(classify)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            bundle,
            pid_file,
            console_socket,
            id,
        } => {
            no_console_socket(&console_socket)?;
            run_container(&rt, &id, &bundle, pid_file)
        }
        Command::Exec(a) => exec(&rt, *a),
        Command::List { format } => {
            let states = rt.list().map_err(classify)?;
            match format.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&states)?),
                "table" => {
                    println!("{:<24} {:<8} {:<8} BUNDLE", "ID", "PID", "STATUS");
                    for s in &states {
                        println!(
                            "{:<24} {:<8} {:<8} {}",
                            s.id(),
                            s.pid().unwrap_or(0),
                            s.status().to_string(),
                            s.bundle().display()
                        );
                    }
                }
                other => {
                    return Err(
                        UsageError(format!("--format {other}: expected table or json")).into(),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `gantry runtime run`: create, start, wait and delete; exits with the
/// container's code.
fn run_container(
    rt: &Runtime,
    id: &str,
    bundle: &std::path::Path,
    pid_file: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let options = CreateOptions {
        stdio: InitStdio::Inherit,
        pid_file,
    };
    let code = rt.run(id, bundle, options).map_err(classify)?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// The arguments of `gantry runtime run` in its common shapes, parsed
/// without clap (see [`parse_run_fast`]).
#[derive(Debug, PartialEq, Eq)]
pub struct FastRun {
    root: PathBuf,
    bundle: PathBuf,
    pid_file: Option<PathBuf>,
    id: String,
}

/// Parses `runtime [--root R] run [--bundle|-b B] [--pid-file F] ID` (the
/// flags in any order, `--flag=value` too, `--root` before or after `run`),
/// the command line of every container start by a runc-style caller and of
/// the start benchmark. Anything else (another flag or subcommand, a
/// repeated flag, `--`, help, a missing or second id, a value that is not
/// UTF-8 where clap wants a string) gives `None`, and clap parses it as
/// before, with its errors and help.
///
/// Why: building clap's command tree for `runtime` and matching against it
/// is a measurable part of the parent's start-up before the clone (its code
/// and heap pages faulted in), on the path of every container start; the
/// result here is the same as clap's (a unit test compares the two).
pub fn parse_run_fast(args: &[std::ffi::OsString]) -> Option<FastRun> {
    let mut root: Option<PathBuf> = None;
    let mut bundle: Option<PathBuf> = None;
    let mut pid_file: Option<PathBuf> = None;
    let mut id: Option<String> = None;
    let mut seen_run = false;
    let mut rest = args.iter();
    if rest.next()?.to_str()? != "runtime" {
        return None;
    }
    // A flag's value: `--flag=value`, or the next argument.
    fn value<'a>(
        arg: &'a str,
        long: &str,
        rest: &mut std::slice::Iter<'a, std::ffi::OsString>,
    ) -> Option<PathBuf> {
        let v = match arg.strip_prefix(long)? {
            "" => rest.next()?.to_str()?,
            eq => eq.strip_prefix('=')?,
        };
        // clap refuses an empty path, and takes `-x` after a flag for
        // another flag.
        (!v.is_empty() && (!v.starts_with('-') || arg.contains('='))).then(|| PathBuf::from(v))
    }
    fn set(slot: &mut Option<PathBuf>, v: PathBuf) -> Option<()> {
        // clap refuses a repeated flag.
        slot.replace(v).is_none().then_some(())
    }
    while let Some(arg) = rest.next() {
        let text = arg.to_str()?;
        let flag = text.split('=').next().unwrap_or(text);
        match (flag, seen_run) {
            ("--root", _) => set(&mut root, value(text, "--root", &mut rest)?)?,
            ("run", false) => seen_run = true,
            ("--bundle", true) => set(&mut bundle, value(text, "--bundle", &mut rest)?)?,
            ("-b", true) if text == "-b" => set(&mut bundle, value(text, "-b", &mut rest)?)?,
            ("--pid-file", true) => set(&mut pid_file, value(text, "--pid-file", &mut rest)?)?,
            (_, true) if !text.starts_with('-') && !text.is_empty() && id.is_none() => {
                id = Some(text.to_string())
            }
            _ => return None,
        }
    }
    if !seen_run {
        return None;
    }
    Some(FastRun {
        root: root.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT)),
        bundle: bundle.unwrap_or_else(|| PathBuf::from(".")),
        pid_file,
        id: id?,
    })
}

/// Runs a `gantry runtime run` parsed by [`parse_run_fast`].
pub fn run_fast(args: FastRun) -> anyhow::Result<ExitCode> {
    run_container(
        &Runtime::new(&args.root),
        &args.id,
        &args.bundle,
        args.pid_file,
    )
}

/// What clap made of a `run` command line, in [`FastRun`]'s terms (for the
/// test that compares the two parsers).
#[cfg(test)]
pub fn as_fast_run(args: Args) -> Option<FastRun> {
    match args.command {
        Command::Run {
            bundle,
            pid_file,
            console_socket: None,
            id,
        } if args.log.is_none() && args.log_format.is_none() && args.systemd_cgroup.is_none() => {
            Some(FastRun {
                root: args.root,
                bundle,
                pid_file,
                id,
            })
        }
        _ => None,
    }
}

fn no_console_socket(socket: &Option<PathBuf>) -> anyhow::Result<()> {
    if socket.is_some() {
        return Err(UsageError("--console-socket: not supported".into()).into());
    }
    Ok(())
}

/// Bad input (a config that is refused, an unknown container) exits 2;
/// everything else is a failure (1).
fn classify(err: RuntimeError) -> anyhow::Error {
    match err {
        RuntimeError::InvalidConfig { .. } | RuntimeError::NotFound(_) => {
            UsageError(err.to_string()).into()
        }
        // The runtime's messages already name the cause (`path: errno`);
        // anyhow's chain would print it twice.
        other => anyhow::Error::msg(other.to_string()),
    }
}

/// Parses `KILL`, `SIGKILL`, `kill` or `9`.
fn parse_signal(text: &str) -> anyhow::Result<Signal> {
    if let Ok(n) = text.parse::<i32>() {
        return Signal::try_from(n)
            .map_err(|_| UsageError(format!("signal {text}: no such signal")).into());
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| UsageError(format!("signal {text}: no such signal")).into())
}

/// Arguments of `gantry runtime exec`.
#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// Allocate a pseudo-terminal.
    #[arg(short, long)]
    tty: bool,
    /// Start the process and exit at once, without waiting for it.
    #[arg(short, long)]
    detach: bool,
    /// Working directory inside the container.
    #[arg(long)]
    cwd: Option<PathBuf>,
    /// Set an environment variable (KEY=VALUE), repeatable.
    #[arg(short, long)]
    env: Vec<String>,
    /// UID[:GID] to run as.
    #[arg(short, long)]
    user: Option<String>,
    /// An OCI process JSON file to run instead of the arguments.
    #[arg(short, long)]
    process: Option<PathBuf>,
    /// Write the process's pid here.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// The container id.
    id: String,
    /// The command and its arguments.
    #[arg(last = true)]
    args: Vec<String>,
}

/// Builds the process (the container's own `process` as the template, as
/// runc does), starts it and waits for it.
fn exec(rt: &Runtime, a: ExecArgs) -> anyhow::Result<ExitCode> {
    let mut tty = a.tty;
    let mut process: oci_spec::runtime::Process = match &a.process {
        Some(path) => {
            let text = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
            serde_json::from_slice(&text)
                .map_err(|e| UsageError(format!("{}: {e}", path.display())))?
        }
        None => {
            if a.args.is_empty() {
                return Err(UsageError(
                    "exec: give the command after --, or --process FILE".into(),
                )
                .into());
            }
            let state = rt.state(&a.id).map_err(classify)?;
            let config = state.bundle().join("config.json");
            let text =
                std::fs::read(&config).with_context(|| format!("read {}", config.display()))?;
            let spec: oci_spec::runtime::Spec = serde_json::from_slice(&text)
                .with_context(|| format!("parse {}", config.display()))?;
            let mut p = spec.process().clone().unwrap_or_default();
            p.set_args(Some(a.args.clone()));
            p
        }
    };
    if process.terminal().unwrap_or(false) {
        tty = true;
        process.set_terminal(Some(false));
    }
    if !a.env.is_empty() {
        let mut env = process.env().clone().unwrap_or_default();
        for kv in &a.env {
            let Some((key, _)) = kv.split_once('=') else {
                return Err(UsageError(format!("--env {kv}: expected KEY=VALUE")).into());
            };
            env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(key));
            env.push(kv.clone());
        }
        process.set_env(Some(env));
    }
    if let Some(cwd) = a.cwd {
        process.set_cwd(cwd);
    }
    if let Some(user) = &a.user {
        let (uid, gid) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user.as_str(), None),
        };
        let bad = || UsageError(format!("--user {user}: expected UID[:GID]"));
        let uid: u32 = uid.parse().map_err(|_| bad())?;
        let gid: u32 = match gid {
            Some(g) => g.parse().map_err(|_| bad())?,
            None => uid,
        };
        let mut u = process.user().clone();
        u.set_uid(uid);
        u.set_gid(gid);
        u.set_additional_gids(None);
        process.set_user(u);
    }
    if a.detach && tty {
        return Err(
            UsageError("--detach with a tty needs --console-socket: not supported".into()).into(),
        );
    }
    let child = rt
        .exec(
            &a.id,
            &process,
            ExecOptions {
                tty,
                pid_file: a.pid_file,
            },
        )
        .map_err(classify)?;
    if a.detach {
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(master) = &child.pty_master {
        relay_pty(master)?;
    }
    let code = wait(child.pid)?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

fn wait(pid: i32) -> anyhow::Result<i32> {
    use nix::sys::wait::{WaitStatus, waitpid};
    let pid = nix::unistd::Pid::from_raw(pid);
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(e) => bail!("waitpid {pid}: {e}"),
        }
    }
}

/// Puts our terminal back the way it was, even on error.
struct RawMode {
    fd: OwnedFd,
    saved: nix::sys::termios::Termios,
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ =
            nix::sys::termios::tcsetattr(&self.fd, nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

/// Copies our stdin to the pty and the pty to our stdout until the
/// process's side of the pty closes.
fn relay_pty(master: &OwnedFd) -> anyhow::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let stdin = std::io::stdin();
    let stdin_fd = stdin.as_fd();
    let _raw = if nix::unistd::isatty(stdin_fd).unwrap_or(false) {
        let saved = nix::sys::termios::tcgetattr(stdin_fd)?;
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(stdin_fd, nix::sys::termios::SetArg::TCSANOW, &raw)?;
        // Give the pty our window size.
        // SAFETY: TIOCGWINSZ/TIOCSWINSZ with a winsize we own.
        unsafe {
            let mut ws: libc::winsize = std::mem::zeroed();
            if libc::ioctl(stdin_fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) == 0 {
                libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws);
            }
        }
        Some(RawMode {
            fd: stdin_fd.try_clone_to_owned()?,
            saved,
        })
    } else {
        None
    };
    let stdout = std::io::stdout();
    let mut stdin_open = true;
    let mut buf = [0u8; 8192];
    loop {
        let mut fds = vec![PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(stdin_fd, PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => bail!("poll: {e}"),
        }
        let master_ev = fds[0].revents().unwrap_or(PollFlags::empty());
        let stdin_ev = fds
            .get(1)
            .and_then(|f| f.revents())
            .unwrap_or(PollFlags::empty());
        if master_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match nix::unistd::read(master, &mut buf) {
                Ok(0) | Err(nix::Error::EIO) => break,
                Ok(n) => write_all(stdout.as_fd(), &buf[..n])?,
                Err(nix::Error::EINTR) => {}
                Err(e) => bail!("read pty: {e}"),
            }
        }
        if stdin_ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match nix::unistd::read(stdin_fd, &mut buf) {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    // End of our input: tell the pty (^D) so a reading shell ends.
                    let _ = write_all(master.as_fd(), &[4]);
                }
                Ok(n) => write_all(master.as_fd(), &buf[..n])?,
            }
        }
    }
    Ok(())
}

fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> anyhow::Result<()> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(nix::Error::EINTR) => {}
            Err(e) => bail!("write: {e}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_signals_by_name_and_number() {
        assert_eq!(parse_signal("KILL").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("SIGTERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("hup").unwrap(), Signal::SIGHUP);
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("99").is_err());
    }
}
