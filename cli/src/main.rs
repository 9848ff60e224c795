//! The `gantry` binary: one file that runs every role and the client commands.
//!
//! Thin by design: argument parsing and wiring only; the logic lives in the
//! `gantry-agent` and `gantry-controller` crates.
//!
//! Invariant: `main` is synchronous. Subcommands that clone container
//! processes (`runtime`, `shim`) must run in a single-threaded process, so an
//! async runtime is only ever built inside the subcommands that need one.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Gantry: a small, fast, multi-node container orchestrator.
#[derive(Debug, Parser)]
#[command(name = "gantry", version, about, propagate_version = true)]
struct Cli {
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
    /// Run the control plane (store, scheduler, dispatcher, API) on this host.
    Controller(cmd::controller::Args),
    /// Local development: `gantry dev cluster up|ls|kill|stop|start|partition|heal|down`.
    Dev(cmd::dev::Args),
    /// The per-container shim (started by the engine, not by people).
    #[command(hide = true)]
    Shim(cmd::shim::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The shim lives as long as its container, once per container: it skips
    // the logging setup (its diagnostics go to a file through stderr).
    if let Command::Shim(args) = cli.command {
        return finish(cmd::shim::run(args));
    }
    cmd::init_logging();
    let result = match cli.command {
        Command::Runtime(args) => cmd::runtime::run(args),
        Command::Image(args) => cmd::image::run(args),
        Command::Container(args) => cmd::container::run(args),
        Command::Volume(args) => cmd::volume::run(args),
        Command::Controller(args) => cmd::controller::run(args),
        Command::Dev(args) => cmd::dev::run(args),
        Command::Shim(args) => cmd::shim::run(args),
    };
    finish(result)
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
