//! `gantry container` (wired up by the container work).

use std::process::ExitCode;

/// Arguments of `gantry container`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `gantry container`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("gantry container is not built yet")
}
