//! `gantry shim` (wired up by the shim work).

use std::process::ExitCode;

/// Arguments of `gantry shim`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `gantry shim`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("gantry shim is not built yet")
}
