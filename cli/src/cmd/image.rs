//! `gantry image` (wired up by the image work).

use std::process::ExitCode;

/// Arguments of `gantry image`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `gantry image`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("gantry image is not built yet")
}
