//! `gantry runtime` (wired up by the runtime work).

use std::process::ExitCode;

/// Arguments of `gantry runtime`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `gantry runtime`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("gantry runtime is not built yet")
}
