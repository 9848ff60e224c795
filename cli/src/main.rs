//! The `gantry` binary: one file that runs every role and the client commands.
//!
//! Thin by design: argument parsing and wiring only; the logic lives in the
//! `gantry-agent` and `gantry-controller` crates.
//!
//! Invariant: `main` is synchronous. Subcommands that clone container
//! processes (`runtime`, `shim`) must run in a single-threaded process, so an
//! async runtime is only ever built inside the subcommands that need one.

mod client;
mod cmd;
mod output;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Gantry: a small, fast, multi-node container orchestrator.
#[derive(Debug, Parser)]
#[command(name = "gantry", version, about, propagate_version = true)]
struct Cli {
    /// The controller to talk to, HOST:PORT (default: $GANTRY_CONTROLLER,
    /// else the context in /run/gantry/context.json, else 127.0.0.1:7070).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    controller: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run OCI bundles directly, like runc (create, start, state, kill, delete, run, exec).
    Runtime(cmd::runtime::Args),
    /// Manage images: import, pull, ls, inspect, rm, gc.
    Image(cmd::image::Args),
    /// Run and manage containers on this node, like `docker run/ps/stop/logs/exec`.
    Container(cmd::container::Args),
    /// Manage named volumes: create, ls, inspect, rm.
    Volume(cmd::volume::Args),
    /// A one-machine cluster in one process: controller plus this machine's agent.
    Up(cmd::up::Args),
    /// Run this node's agent: join a controller and run what it assigns.
    Agent(cmd::agent::Args),
    /// Run the control plane (store, scheduler, dispatcher, API) on this host.
    Controller(cmd::controller::Args),
    /// The replicated controllers: init, controllers, remove-controller.
    Cluster(cmd::cluster::Args),
    /// Deploy a Compose file as a stack (create or update its services).
    Deploy(cmd::deploy::Args),
    /// Manage stacks: ls, ps, rm.
    Stack(cmd::stack::Args),
    /// Manage services: ls, ps, inspect, scale, logs, rm.
    Service(cmd::service::Args),
    /// List the cluster's tasks.
    Ps(cmd::task::Args),
    /// Run a command in a task's container, wherever it runs.
    Exec(cmd::exec::Args),
    /// Manage nodes: ls, inspect, update.
    Node(cmd::node::Args),
    /// Stream changes to nodes, services and tasks.
    Events(cmd::events::Args),
    /// Local development: `gantry dev cluster up|ls|kill|stop|start|partition|heal|down`.
    Dev(cmd::dev::Args),
    /// The per-container shim (started by the engine, not by people).
    #[command(hide = true)]
    Shim(cmd::shim::Args),
}

/// The container-start paths, parsed on their own: `gantry runtime` and
/// `gantry shim` run once per container start, and building clap's whole
/// command tree (every client and daemon subcommand) costs them a measurable
/// part of a start. Same argument types, so the same flags and errors.
#[derive(Debug, Parser)]
#[command(name = "gantry", version)]
struct StartPath {
    #[command(subcommand)]
    command: StartCommand,
}

#[derive(Debug, Subcommand)]
enum StartCommand {
    /// Run OCI bundles directly, like runc (create, start, state, kill, delete, run, exec).
    Runtime(cmd::runtime::Args),
    /// The per-container shim (started by the engine, not by people).
    Shim(cmd::shim::Args),
}

fn main() -> ExitCode {
    no_error_backtraces();
    match std::env::args_os()
        .nth(1)
        .as_deref()
        .and_then(|a| a.to_str())
    {
        // The shim lives as long as its container, once per container: it
        // skips the logging setup (its diagnostics go to a file through
        // stderr).
        Some("shim") | Some("runtime") => {
            // `runtime run` in its usual shapes skips clap altogether.
            let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            if let Some(run) = cmd::runtime::parse_run_fast(&args) {
                cmd::init_logging();
                return finish(cmd::runtime::run_fast(run));
            }
            return match StartPath::parse().command {
                StartCommand::Shim(args) => finish(cmd::shim::run(args)),
                StartCommand::Runtime(args) => {
                    cmd::init_logging();
                    finish(cmd::runtime::run(args))
                }
            };
        }
        _ => {}
    }
    let cli = Cli::parse();
    if let Command::Shim(args) = cli.command {
        return finish(cmd::shim::run(args));
    }
    cmd::init_logging();
    let controller = client::ControllerFlag(cli.controller);
    let result = match cli.command {
        Command::Deploy(args) => cmd::deploy::run(args, &controller),
        Command::Stack(args) => cmd::stack::run(args, &controller),
        Command::Service(args) => cmd::service::run(args, &controller),
        Command::Ps(args) => cmd::task::run(args, &controller),
        Command::Exec(args) => cmd::exec::run(args, &controller),
        Command::Node(args) => cmd::node::run(args, &controller),
        Command::Events(args) => cmd::events::run(args, &controller),
        Command::Runtime(args) => cmd::runtime::run(args),
        Command::Image(args) => cmd::image::run(args, &controller),
        Command::Container(args) => cmd::container::run(args),
        Command::Volume(args) => cmd::volume::run(args),
        Command::Up(args) => cmd::up::run(args),
        Command::Agent(args) => cmd::agent::run(args),
        Command::Controller(args) => cmd::controller::run(args),
        Command::Cluster(args) => cmd::cluster::run(args, &controller),
        Command::Dev(args) => cmd::dev::run(args),
        Command::Shim(args) => cmd::shim::run(args),
    };
    finish(result)
}

/// Turns off the backtrace that anyhow captures with every error when
/// `RUST_BACKTRACE` is set, unless `RUST_LIB_BACKTRACE` asks for them.
///
/// Why: Gantry never prints them (errors are printed with `{:#}`, which
/// leaves the backtrace out), and capturing one is not free: in the static
/// binary (`build.rs`) the first capture costs ~4 ms, libgcc's unwinder
/// sorting the unwind tables of the whole binary, on every error path
/// (`gantry runtime state` of a missing container, a refused config). This
/// is std's documented split: `RUST_LIB_BACKTRACE=0` disables library
/// backtraces and keeps the ones of panics, which `RUST_BACKTRACE` still
/// controls. The setting is read once and cached by std, so the variable is
/// removed again at once and no child process inherits it.
fn no_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_some() {
        return;
    }
    // SAFETY: the first thing main does: no other thread exists yet that
    // could read the environment concurrently.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    // Disabled: this only reads the variables and caches the answer.
    let _ = std::backtrace::Backtrace::capture();
    // SAFETY: as above.
    unsafe { std::env::remove_var("RUST_LIB_BACKTRACE") };
}

fn finish(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("gantry: {err:#}");
            cmd::exit_code_for(&err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gantry").chain(args.iter().copied()))
    }

    /// The start path's own parser of `runtime run` agrees with clap on
    /// every command line it accepts, and leaves the rest to clap.
    #[test]
    fn runtime_run_fast_parse_agrees_with_clap() {
        let clap_run = |args: &[&str]| {
            StartPath::try_parse_from(std::iter::once("gantry").chain(args.iter().copied()))
                .ok()
                .and_then(|p| match p.command {
                    StartCommand::Runtime(a) => cmd::runtime::as_fast_run(a),
                    StartCommand::Shim(_) => None,
                })
        };
        let fast_run = |args: &[&str]| {
            let os: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
            cmd::runtime::parse_run_fast(&os)
        };
        // The shapes the fast path is for: taken, and the same as clap's.
        for args in [
            &["runtime", "run", "c1"][..],
            &["runtime", "--root", "/r", "run", "--bundle", "/b", "c1"],
            &["runtime", "--root=/r", "run", "-b", "/b", "c1"],
            &["runtime", "run", "--root", "/r", "c1", "--bundle=/b"],
            &["runtime", "run", "c1", "--pid-file", "/p", "-b", "b"],
            &["runtime", "run", "--pid-file=/p", "c1"],
            &["runtime", "run", "run"],
            &["runtime", "run", "--root=-x", "c1"],
        ] {
            let fast = fast_run(args);
            assert!(fast.is_some(), "{args:?} left to clap");
            assert_eq!(fast, clap_run(args), "{args:?}");
        }
        // Errors, other flags and shapes: left to clap.
        for args in [
            &["runtime", "run"][..],
            &["runtime", "run", "a", "b"],
            &["runtime", "run", "--root", "/r", "--root", "/s", "c1"],
            &["runtime", "run", "-b", "/b", "--bundle", "/c", "c1"],
            &["runtime", "run", "--root", "-x", "c1"],
            &["runtime", "run", "--root=", "c1"],
            &["runtime", "run", "-b=/b", "c1"],
            &["runtime", "run", "-bx", "c1"],
            &["runtime", "run", "--", "c1"],
            &["runtime", "run", "--help"],
            &["runtime", "--log", "/l", "run", "c1"],
            &["runtime", "run", "--console-socket", "/s", "c1"],
            &["runtime", "--bundle", "/b", "run", "c1"],
            &["runtime", "create", "c1"],
            &["runtime", "run", "--rootx", "/r", "c1"],
            &["runtime", "run", "-", "c1"],
            &["runtime", "run", ""],
            &["runtime"],
        ] {
            assert_eq!(fast_run(args), None, "{args:?}");
        }
    }

    #[test]
    fn remove_controller_names_a_member_not_the_controller_to_talk_to() {
        let cli = parse(&[
            "--controller",
            "10.0.0.1:7070",
            "cluster",
            "remove-controller",
            "10.0.0.3:7070",
        ])
        .unwrap();
        assert_eq!(cli.controller.as_deref(), Some("10.0.0.1:7070"));
        let debug = format!("{:?}", cli.command);
        assert!(debug.contains("\"10.0.0.3:7070\""), "{debug}");
    }

    #[test]
    fn scale_takes_name_count_pairs() {
        let cli = parse(&["service", "scale", "web=3", "demo_api=0"]).unwrap();
        let debug = format!("{:?}", cli.command);
        assert!(
            debug.contains("(\"web\", 3)") && debug.contains("(\"demo_api\", 0)"),
            "{debug}"
        );
    }

    #[test]
    fn a_bad_replica_count_is_a_usage_error_naming_the_value() {
        let err = parse(&["service", "scale", "web=x"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let text = err.to_string();
        assert!(text.contains("web=x") && text.contains("`x`"), "{text}");
    }

    #[test]
    fn the_controller_flag_is_global() {
        let cli = parse(&["node", "ls", "--controller", "10.0.0.1:7070"]).unwrap();
        assert_eq!(cli.controller.as_deref(), Some("10.0.0.1:7070"));
        let cli = parse(&["--controller", "h:1", "ps", "--all", "-o", "json"]).unwrap();
        assert_eq!(cli.controller.as_deref(), Some("h:1"));
        // `image load` talks to the controller too, through the same flag.
        let cli = parse(&["image", "load", "--controller", "h:2", "x.tar"]).unwrap();
        assert_eq!(cli.controller.as_deref(), Some("h:2"));
    }

    #[test]
    fn client_commands_parse() {
        for args in [
            &[
                "deploy",
                "-f",
                "compose.yaml",
                "--stack",
                "demo",
                "--dry-run",
                "-o",
                "json",
            ][..],
            &["deploy", "-p", "demo"],
            &["stack", "ls"],
            &["stack", "ps", "demo", "-o", "yaml"],
            &["stack", "rm", "demo"],
            &["service", "ls", "--stack", "demo"],
            &["service", "ps", "demo_web", "-a"],
            &["service", "inspect", "web"],
            &["service", "logs", "-f", "--tail", "10", "web"],
            &["service", "rm", "web", "api"],
            &["ps", "--service", "web", "--node", "agent-1"],
            &["exec", "-i", "web", "--", "sh", "-c", "cat"],
            &["exec", "web", "ls", "-l"],
            &["node", "ls", "-o", "json"],
            &["node", "inspect", "agent-1"],
            &[
                "node",
                "update",
                "--availability",
                "drain",
                "--label-add",
                "zone=eu",
                "--label-rm",
                "old",
                "agent-1",
            ],
            &[
                "events", "--since", "42", "--kind", "task", "--kind", "node", "-o", "json",
            ],
        ] {
            if let Err(err) = parse(args) {
                panic!("{args:?}: {err}");
            }
        }
        for (args, what) in [
            (
                &["node", "update", "--availability", "gone", "n1"][..],
                "gone",
            ),
            (&["events", "--kind", "volume"], "volume"),
            (&["ps", "-o", "xml"], "xml"),
            (&["exec", "web"], "CMD"),
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
            assert!(err.to_string().contains(what), "{args:?}: {err}");
        }
    }
}
