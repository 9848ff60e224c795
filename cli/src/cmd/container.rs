//! `gantry container`: run and manage containers on this node, like
//! `docker run/ps/stop/logs/exec`. Thin: flags to [`ContainerConfig`] and
//! calls to the [`Engine`].

use super::UsageError;
use anyhow::Context;
use clap::Subcommand;
use gantry_agent::engine::container::{
    ContainerError, ContainerId, ContainerInfo, ContainerState, Engine, EngineConfig, ExecConfig,
};
use gantry_agent::engine::logs::{LogEntry, LogOptions, Stream};
use gantry_agent::engine::spec::{
    self, ContainerConfig, MountConfig, NetworkMode, PublishedPort, ResourceConfig, SpecError,
};
use gantry_agent::paths::DataDir;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `gantry container`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node's data directory.
    #[arg(long, global = true, env = "GANTRY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create and start a container.
    Run(Box<RunArgs>),
    /// Create a container without starting it.
    Create(Box<RunArgs>),
    /// List containers.
    Ps(PsArgs),
    /// Start stopped containers.
    Start {
        /// Containers (name, id or id prefix).
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Stop running containers: stop signal, then SIGKILL after the grace period.
    Stop {
        /// Seconds to wait before SIGKILL (the container's stop timeout by default).
        #[arg(short = 't', long = "time")]
        time: Option<u64>,
        /// Containers.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Send a signal to running containers.
    Kill {
        /// The signal (name or number).
        #[arg(short, long, default_value = "KILL")]
        signal: String,
        /// Containers.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Remove containers.
    Rm {
        /// Kill running containers first.
        #[arg(short, long)]
        force: bool,
        /// Containers.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Print a container's logs.
    Logs(LogsArgs),
    /// Run a command in a running container.
    Exec(ExecArgs),
    /// Wait for containers to stop and print their exit codes.
    Wait {
        /// Containers.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Print containers' details as JSON.
    Inspect {
        /// Containers.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Print resource usage of running containers.
    Stats {
        /// Print once and exit (the only mode for now).
        #[arg(long)]
        no_stream: bool,
        /// Containers (all running ones by default).
        containers: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
// `-h` is the hostname, as in `docker run`; help stays on `--help`.
#[command(disable_help_flag = true)]
struct RunArgs {
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// Run in the background and print the container id.
    #[arg(short, long)]
    detach: bool,
    /// A unique name.
    #[arg(long)]
    name: Option<String>,
    /// Remove the container when it exits.
    #[arg(long)]
    rm: bool,
    /// Set an environment variable (KEY=VALUE, or KEY to take it from here).
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// Read environment variables from a file.
    #[arg(long)]
    env_file: Vec<PathBuf>,
    /// Bind mount or named volume: SRC:DST[:ro].
    #[arg(short, long = "volume")]
    volume: Vec<String>,
    /// Mount a tmpfs: DST[:size=64m,mode=1777].
    #[arg(long)]
    tmpfs: Vec<String>,
    /// Memory limit (e.g. 64m).
    #[arg(short, long)]
    memory: Option<String>,
    /// CPU limit (e.g. 0.5).
    #[arg(long)]
    cpus: Option<String>,
    /// Relative CPU weight.
    #[arg(long)]
    cpu_shares: Option<u64>,
    /// Maximum number of processes.
    #[arg(long)]
    pids_limit: Option<i64>,
    /// User: name, uid, uid:gid or name:group.
    #[arg(short, long)]
    user: Option<String>,
    /// Working directory inside the container.
    #[arg(short, long)]
    workdir: Option<String>,
    /// Hostname.
    #[arg(short = 'h', long)]
    hostname: Option<String>,
    /// Network: bridge (default: own address on the node's bridge, NAT,
    /// published ports), host, none (loopback only), or a netns path.
    #[arg(long, default_value = "bridge")]
    network: String,
    /// Publish a container port on the node: [IP:]HOST:CONTAINER[/tcp|udp].
    #[arg(short = 'p', long = "publish")]
    publish: Vec<String>,
    /// Override the image's entrypoint (resets its cmd).
    #[arg(long)]
    entrypoint: Option<String>,
    /// Mount the root filesystem read-only.
    #[arg(long)]
    read_only: bool,
    /// The signal that stops the container.
    #[arg(long)]
    stop_signal: Option<String>,
    /// Seconds between the stop signal and SIGKILL.
    #[arg(long)]
    stop_timeout: Option<u64>,
    /// Set a label (KEY=VALUE).
    #[arg(short, long = "label")]
    label: Vec<String>,
    /// Rotate the log at this size (e.g. 10m).
    #[arg(long)]
    log_max_size: Option<String>,
    /// Keep this many log files.
    #[arg(long)]
    log_max_files: Option<u32>,
    /// The image.
    image: String,
    /// The command and its arguments (replaces the image's cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct PsArgs {
    /// Show all containers (running ones by default).
    #[arg(short, long)]
    all: bool,
    /// Only print ids.
    #[arg(short, long)]
    quiet: bool,
    /// Output format: table or json.
    #[arg(short, long, default_value = "table")]
    output: String,
}

#[derive(Debug, clap::Args)]
struct LogsArgs {
    /// Keep printing new output until the container stops.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines ("all" for all).
    #[arg(long, default_value = "all")]
    tail: String,
    /// Prefix each line with its time.
    #[arg(short, long)]
    timestamps: bool,
    /// The container.
    container: String,
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// Keep stdin open (stdin is always the caller's for now).
    #[arg(short, long)]
    interactive: bool,
    /// Allocate a pseudo-terminal.
    #[arg(short, long)]
    tty: bool,
    /// User: name, uid, uid:gid or name:group.
    #[arg(short, long)]
    user: Option<String>,
    /// Working directory.
    #[arg(short, long)]
    workdir: Option<String>,
    /// Set an environment variable.
    #[arg(short, long = "env")]
    env: Vec<String>,
    /// The container.
    container: String,
    /// The command.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Runs `gantry container`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let data_dir = args
        .data_dir
        .map(DataDir::new)
        .unwrap_or_else(DataDir::from_env);
    let engine = Engine::open(EngineConfig {
        data_dir,
        shim_binary: PathBuf::from("/proc/self/exe"),
    })
    .map_err(usage_or)?;
    match args.command {
        Command::Run(run) => run_container(&engine, *run),
        Command::Create(run) => {
            let config = config_from(&run)?;
            let id = engine.create(&config).map_err(usage_or)?;
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Ps(ps) => list(&engine, &ps),
        Command::Start { containers } => each(&engine, &containers, |id| engine.start(id)),
        Command::Stop { time, containers } => each(&engine, &containers, |id| {
            engine.stop(id, time.map(Duration::from_secs))
        }),
        Command::Kill { signal, containers } => {
            let signal = spec::parse_signal(&signal).map_err(usage)?;
            each(&engine, &containers, |id| engine.kill(id, signal))
        }
        Command::Rm { force, containers } => {
            each(&engine, &containers, |id| engine.remove(id, force))
        }
        Command::Logs(logs) => print_logs(&engine, &logs),
        Command::Exec(exec) => exec_in(&engine, exec),
        Command::Wait { containers } => {
            // As `docker wait`: the codes are printed, the command succeeds.
            for c in &containers {
                let id = engine.resolve(c).map_err(usage_or)?;
                let exit = engine.wait(&id)?;
                println!("{}", exit.exit_code);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { containers } => {
            let mut out = Vec::new();
            for c in &containers {
                let id = engine.resolve(c).map_err(usage_or)?;
                out.push(engine.inspect(&id)?);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats {
            no_stream: _,
            containers,
        } => stats(&engine, &containers),
    }
}

/// Errors the user caused (an unknown name, a bad config) exit 2.
fn usage_or(err: ContainerError) -> anyhow::Error {
    match err {
        ContainerError::NotFound(_)
        | ContainerError::Ambiguous(_)
        | ContainerError::NameInUse { .. }
        | ContainerError::InvalidName(_)
        | ContainerError::BindSourceMissing(_)
        | ContainerError::Spec(_)
        | ContainerError::User(_)
        | ContainerError::Image(gantry_agent::image::ImageError::NotFound(_))
        | ContainerError::Volume(gantry_agent::engine::volumes::VolumeError::InvalidName(_)) => {
            UsageError(err.to_string()).into()
        }
        other => other.into(),
    }
}

fn usage(err: SpecError) -> anyhow::Error {
    UsageError(err.to_string()).into()
}

/// A bad flag value: the error names the flag, as `--memory: invalid size …`.
fn flag_usage(flag: &'static str) -> impl Fn(SpecError) -> anyhow::Error {
    move |err| UsageError(format!("{flag}: {err}")).into()
}

fn each(
    engine: &Engine,
    containers: &[String],
    op: impl Fn(&ContainerId) -> Result<(), ContainerError>,
) -> anyhow::Result<ExitCode> {
    for c in containers {
        let id = engine.resolve(c).map_err(usage_or)?;
        op(&id)
            .map_err(usage_or)
            .with_context(|| format!("container {c}"))?;
        println!("{c}");
    }
    Ok(ExitCode::SUCCESS)
}

fn config_from(run: &RunArgs) -> anyhow::Result<ContainerConfig> {
    let mut env = Vec::new();
    for file in &run.env_file {
        let content = std::fs::read_to_string(file)
            .map_err(|e| UsageError(format!("env file {}: {e}", file.display())))?;
        for line in content.lines() {
            let line = line.trim();
            if !line.is_empty() && !line.starts_with('#') {
                env.push(env_entry(line));
            }
        }
    }
    env.extend(run.env.iter().map(|e| env_entry(e)));
    let mut mounts = Vec::new();
    for v in &run.volume {
        mounts.push(MountConfig::parse_volume_flag(v).map_err(usage)?);
    }
    for t in &run.tmpfs {
        mounts.push(MountConfig::parse_tmpfs_flag(t).map_err(usage)?);
    }
    let network = NetworkMode::parse_flag(&run.network).map_err(flag_usage("--network"))?;
    let mut ports = Vec::new();
    for p in &run.publish {
        ports.push(PublishedPort::parse_publish_flag(p).map_err(flag_usage("--publish"))?);
    }
    if !ports.is_empty() && network == NetworkMode::Host {
        eprintln!("WARNING: published ports are discarded when using host network mode");
    }
    let mut labels = std::collections::BTreeMap::new();
    for l in &run.label {
        let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
        labels.insert(k.to_string(), v.to_string());
    }
    if let Some(signal) = &run.stop_signal {
        spec::parse_signal(signal).map_err(flag_usage("--stop-signal"))?;
    }
    let mut log = gantry_agent::engine::logs::LogConfig::default();
    if let Some(size) = &run.log_max_size {
        log.max_size = spec::parse_size(size).map_err(flag_usage("--log-max-size"))?;
    }
    if let Some(files) = run.log_max_files {
        log.max_files = files.max(1);
    }
    Ok(ContainerConfig {
        image: run.image.clone(),
        name: run.name.clone(),
        command: (!run.command.is_empty()).then(|| run.command.clone()),
        entrypoint: run.entrypoint.as_ref().map(|e| {
            if e.is_empty() {
                Vec::new()
            } else {
                vec![e.clone()]
            }
        }),
        env,
        working_dir: run.workdir.clone(),
        user: run.user.clone(),
        hostname: run.hostname.clone(),
        mounts,
        resources: ResourceConfig {
            memory_bytes: run
                .memory
                .as_deref()
                .map(spec::parse_size)
                .transpose()
                .map_err(flag_usage("--memory"))?,
            millicpus: run
                .cpus
                .as_deref()
                .map(spec::parse_cpus)
                .transpose()
                .map_err(flag_usage("--cpus"))?,
            cpu_shares: run.cpu_shares,
            pids_limit: run.pids_limit,
        },
        network,
        ports,
        // The local IPAM picks it: the controller allocates only tasks'.
        address: None,
        read_only: run.read_only,
        no_new_privileges: false,
        stop_signal: run.stop_signal.clone(),
        stop_grace_secs: run.stop_timeout,
        labels,
        log,
        auto_remove: false,
    })
}

/// `KEY` alone takes the value from this process's environment, as Docker.
fn env_entry(entry: &str) -> String {
    if entry.contains('=') {
        entry.to_string()
    } else {
        match std::env::var(entry) {
            Ok(value) => format!("{entry}={value}"),
            Err(_) => entry.to_string(),
        }
    }
}

fn run_container(engine: &Engine, run: RunArgs) -> anyhow::Result<ExitCode> {
    let mut config = config_from(&run)?;
    // Detached, the shim removes the container when it exits; in the
    // foreground this command does, once it has the exit code.
    config.auto_remove = run.rm && run.detach;
    let id = engine.create(&config).map_err(usage_or)?;
    if let Err(e) = engine.start(&id) {
        if run.rm {
            let _ = engine.remove(&id, true);
        }
        return Err(e.into());
    }
    if run.detach {
        println!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    // Foreground: stream the logs until the container ends, then exit
    // with its code. The container does not depend on this process.
    let options = LogOptions {
        follow: true,
        ..Default::default()
    };
    // As `docker run` (sig-proxy): SIGINT, SIGTERM and SIGHUP sent to this
    // process go to the container instead of ending the command.
    proxy::install();
    let mut forward = || {
        if let Some(signal) = proxy::take() {
            let _ = engine.kill(&id, signal);
        }
    };
    let result = engine.logs_with(&id, &options, &mut forward, &mut |e| write_entry(e, false));
    let exit = engine.wait(&id);
    if run.rm {
        engine.remove(&id, true)?;
    }
    result?;
    let code = exit?.exit_code;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

fn write_entry(entry: &LogEntry, timestamps: bool) -> std::io::Result<()> {
    let line = if timestamps {
        format!("{} {}", entry.time, entry.log)
    } else {
        entry.log.clone()
    };
    match entry.stream {
        Stream::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(line.as_bytes())?;
            out.flush()
        }
        Stream::Stderr => {
            let mut err = std::io::stderr().lock();
            err.write_all(line.as_bytes())?;
            err.flush()
        }
    }
}

fn print_logs(engine: &Engine, logs: &LogsArgs) -> anyhow::Result<ExitCode> {
    let id = engine.resolve(&logs.container).map_err(usage_or)?;
    let tail = match logs.tail.as_str() {
        "all" => None,
        n => Some(
            n.parse::<usize>()
                .map_err(|_| UsageError(format!("invalid --tail {n:?}: a number or all")))?,
        ),
    };
    let options = LogOptions {
        follow: logs.follow,
        tail,
        ..Default::default()
    };
    engine.logs(&id, &options, &mut |e| write_entry(e, logs.timestamps))?;
    Ok(ExitCode::SUCCESS)
}

fn list(engine: &Engine, ps: &PsArgs) -> anyhow::Result<ExitCode> {
    let containers: Vec<ContainerInfo> = engine
        .list()?
        .into_iter()
        .filter(|c| ps.all || c.state == ContainerState::Running)
        .collect();
    if ps.quiet {
        for c in &containers {
            println!("{}", c.id.short());
        }
        return Ok(ExitCode::SUCCESS);
    }
    match ps.output.as_str() {
        "json" => {
            for c in &containers {
                let line = serde_json::json!({
                    "id": c.id,
                    "name": c.name,
                    "image": c.image,
                    "state": c.state,
                    "status": c.status,
                    "exit_code": c.exit_code,
                    "pid": c.pid,
                    "command": c.args,
                    "created": c.created,
                    "ip": c.network.as_ref().map(|n| n.ip),
                    "ports": ports_column(c),
                });
                println!("{line}");
            }
        }
        "table" => {
            println!(
                "{:<12}  {:<20}  {:<24}  {:<28}  {:<22}  NAMES",
                "CONTAINER ID", "IMAGE", "COMMAND", "STATUS", "PORTS"
            );
            for c in &containers {
                let command = c.args.join(" ");
                let command: String = command.chars().take(22).collect();
                println!(
                    "{:<12}  {:<20}  {:<24}  {:<28}  {:<22}  {}",
                    c.id.short(),
                    c.image,
                    format!("\"{command}\""),
                    c.status,
                    ports_column(c),
                    c.name
                );
            }
        }
        other => {
            return Err(UsageError(format!("invalid --output {other:?}: table or json")).into());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Docker's PORTS column: `0.0.0.0:8080->80/tcp, …` while the container
/// runs on the bridge (a stopped container publishes nothing).
fn ports_column(c: &gantry_agent::engine::container::ContainerInfo) -> String {
    if c.state != ContainerState::Running || c.network.is_none() {
        return String::new();
    }
    c.config
        .ports
        .iter()
        .map(|p| {
            let host = p.host_display();
            let (addr, proto) = host.rsplit_once('/').unwrap_or((host.as_str(), "tcp"));
            format!("{addr}->{}/{proto}", p.container_port)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn stats(engine: &Engine, containers: &[String]) -> anyhow::Result<ExitCode> {
    let ids: Vec<ContainerId> = if containers.is_empty() {
        engine
            .list()?
            .into_iter()
            .filter(|c| c.state == ContainerState::Running)
            .map(|c| c.id)
            .collect()
    } else {
        containers
            .iter()
            .map(|c| engine.resolve(c).map_err(usage_or))
            .collect::<Result<_, _>>()?
    };
    println!(
        "{:<12}  {:>14}  {:>14}  {:>14}  {:>5}",
        "CONTAINER ID", "CPU TIME", "MEM USAGE", "MEM LIMIT", "PIDS"
    );
    for id in ids {
        let s = engine.stats(&id)?;
        println!(
            "{:<12}  {:>13.3}s  {:>14}  {:>14}  {:>5}",
            id.short(),
            s.cpu_usage_ns as f64 / 1e9,
            super::binary_size(s.memory_usage_bytes),
            s.memory_limit_bytes
                .map_or_else(|| "-".to_string(), super::binary_size),
            s.pids_current
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn exec_in(engine: &Engine, exec: ExecArgs) -> anyhow::Result<ExitCode> {
    let id = engine.resolve(&exec.container).map_err(usage_or)?;
    if !exec.interactive && !exec.tty {
        // As `docker exec` without -i: the process gets no stdin. It inherits
        // ours, so ours becomes /dev/null first.
        let devnull = std::fs::File::open("/dev/null").context("/dev/null")?;
        nix::unistd::dup2_stdin(&devnull).context("dup2 /dev/null")?;
    }
    let process = engine
        .exec(
            &id,
            &ExecConfig {
                command: exec.command.clone(),
                env: exec.env.iter().map(|e| env_entry(e)).collect(),
                user: exec.user.clone(),
                working_dir: exec.workdir.clone(),
                tty: exec.tty,
            },
        )
        .map_err(usage_or)?;
    if let Some(master) = process.pty_master {
        let _raw = RawTerminal::enter();
        copy_pty(master)?;
    }
    let pid = nix::unistd::Pid::from_raw(process.pid);
    // Bounded by the process's life: waitpid returns when it ends.
    loop {
        match nix::sys::wait::waitpid(pid, None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => {
                return Ok(ExitCode::from(code.clamp(0, 255) as u8));
            }
            Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => {
                return Ok(ExitCode::from((128 + sig as i32).clamp(0, 255) as u8));
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for the exec process"),
        }
    }
}

/// Copies between this terminal and the exec's pty until the pty closes.
fn copy_pty(master: std::os::fd::OwnedFd) -> anyhow::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let mut buf = [0u8; 4096];
    let mut stdin_open = true;
    loop {
        let mut fds = vec![PollFd::new(master.as_fd(), PollFlags::POLLIN)];
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("poll"),
        }
        let master_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let stdin_ready = stdin_open && fds[1].revents().is_some_and(|r| !r.is_empty());
        if master_ready {
            match nix::unistd::read(&master, &mut buf) {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&buf[..n])?;
                    out.flush()?;
                }
            }
        }
        if stdin_ready {
            match nix::unistd::read(&stdin, &mut buf) {
                Ok(0) | Err(_) => stdin_open = false,
                Ok(n) => {
                    nix::unistd::write(&master, &buf[..n]).context("writing to the pty")?;
                }
            }
        }
    }
}

/// Signals received by a foreground `run`, to forward to its container.
mod proxy {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    use std::sync::atomic::{AtomicI32, Ordering};

    static PENDING: AtomicI32 = AtomicI32::new(0);

    extern "C" fn on_signal(signal: libc::c_int) {
        // Only an atomic store: async-signal-safe.
        PENDING.store(signal, Ordering::SeqCst);
    }

    /// Catches SIGINT, SIGTERM and SIGHUP from now on.
    pub fn install() {
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: the handler only stores into an atomic.
            let _ = unsafe { sigaction(signal, &action) };
        }
    }

    /// The last signal received since the previous call, if any.
    pub fn take() -> Option<Signal> {
        match PENDING.swap(0, Ordering::SeqCst) {
            0 => None,
            n => Signal::try_from(n).ok(),
        }
    }
}

/// Puts stdin's terminal (if it is one) in raw mode until dropped, so that
/// keys reach the exec's pty as typed.
struct RawTerminal {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawTerminal {
    fn enter() -> RawTerminal {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawTerminal { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return RawTerminal { saved: None };
        }
        RawTerminal { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}
