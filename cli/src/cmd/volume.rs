//! `gantry volume`: named volumes (create, ls, inspect, rm).

use super::UsageError;
use clap::Subcommand;
use gantry_agent::engine::container::{ContainerError, Engine, EngineConfig};
use gantry_agent::engine::volumes::VolumeError;
use gantry_agent::paths::DataDir;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `gantry volume`.
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
    /// Create a volume.
    Create {
        /// Its name.
        name: String,
    },
    /// List volumes.
    Ls {
        /// Only print names.
        #[arg(short, long)]
        quiet: bool,
        /// Output format: table or json.
        #[arg(short, long, default_value = "table")]
        output: String,
    },
    /// Print volumes' details as JSON.
    Inspect {
        /// Volume names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove volumes no container uses.
    Rm {
        /// Volume names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn usage_or(err: ContainerError) -> anyhow::Error {
    match err {
        ContainerError::Volume(
            VolumeError::InvalidName(_) | VolumeError::NotFound(_) | VolumeError::AlreadyExists(_),
        ) => UsageError(err.to_string()).into(),
        other => other.into(),
    }
}

/// Runs `gantry volume`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let data_dir = args
        .data_dir
        .map(DataDir::new)
        .unwrap_or_else(DataDir::from_env);
    let engine = Engine::open(EngineConfig {
        data_dir,
        shim_binary: PathBuf::from("/proc/self/exe"),
    })?;
    match args.command {
        Command::Create { name } => {
            engine.volume_create(&name).map_err(usage_or)?;
            println!("{name}");
        }
        Command::Ls { quiet, output } => {
            let volumes = engine.volume_list()?;
            match (quiet, output.as_str()) {
                (true, _) => volumes.iter().for_each(|v| println!("{}", v.name)),
                (false, "json") => {
                    for v in &volumes {
                        println!("{}", serde_json::to_string(v)?);
                    }
                }
                (false, "table") => {
                    println!("{:<32}  {:<8}  MOUNTPOINT", "VOLUME NAME", "IN USE");
                    for v in &volumes {
                        println!(
                            "{:<32}  {:<8}  {}",
                            v.name,
                            v.used_by.len(),
                            v.mountpoint.display()
                        );
                    }
                }
                (false, other) => {
                    return Err(
                        UsageError(format!("invalid --output {other:?}: table or json")).into(),
                    );
                }
            }
        }
        Command::Inspect { names } => {
            let mut out = Vec::new();
            for name in &names {
                out.push(engine.volume_inspect(name).map_err(usage_or)?);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Rm { names } => {
            for name in &names {
                engine.volume_remove(name).map_err(usage_or)?;
                println!("{name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
