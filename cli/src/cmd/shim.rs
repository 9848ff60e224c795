//! `gantry shim`: the per-container shim, started by the engine (hidden).
//!
//! Kept minimal on purpose: `main` dispatches here before setting up
//! logging, and nothing here allocates more than the arguments.

use gantry_agent::engine::logs::LogConfig;
use gantry_agent::engine::shim::{self, ShimConfig};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `gantry shim`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The container id.
    #[arg(long)]
    id: String,
    /// The container directory (the OCI bundle).
    #[arg(long)]
    bundle: PathBuf,
    /// The OCI runtime's state root.
    #[arg(long)]
    runtime_root: PathBuf,
    /// Rotate the log at this many bytes.
    #[arg(long, default_value_t = LogConfig::default().max_size)]
    log_max_size: u64,
    /// Keep this many log files.
    #[arg(long, default_value_t = LogConfig::default().max_files)]
    log_max_files: u32,
    /// Remove the container from this data directory once it exited.
    #[arg(long)]
    remove_from: Option<PathBuf>,
}

/// Runs `gantry shim`; only the short-lived parent returns.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let code = shim::run(&ShimConfig {
        id: args.id,
        bundle: args.bundle,
        runtime_root: args.runtime_root,
        log: LogConfig {
            max_size: args.log_max_size,
            max_files: args.log_max_files,
        },
        remove_from: args.remove_from.map(gantry_agent::paths::DataDir::new),
    });
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
