//! `gantry agent --join HOST:PORT[,HOST:PORT...]`: runs this node's agent until SIGTERM or
//! SIGINT, which leave the node's containers running. `gantry agent --leave`
//! removes the node's task containers and overlay instead, and exits.

use super::UsageError;
use anyhow::Context;
use gantry_agent::daemon::{self, AgentConfig, ResourceOverride};
use gantry_agent::engine::spec::parse_size;
use gantry_agent::paths::DataDir;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `gantry agent`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The controllers to join, HOST:PORT (a comma list, or repeated): the
    /// first is tried first, the others on failure; the agent also learns
    /// every member from the controller it reaches.
    #[arg(
        long,
        value_name = "HOST:PORT",
        value_delimiter = ',',
        required_unless_present = "leave"
    )]
    join: Vec<String>,
    /// Leave the cluster instead of running: remove this node's task
    /// containers and its overlay (devices, routes, rules, and the bridge
    /// when no other container is on it), then exit. Run it with the agent
    /// stopped; `gantry node rm` removes the node on the controller side
    /// (Swarm's `docker swarm leave` then `docker node rm`).
    #[arg(long, conflicts_with = "join")]
    leave: bool,
    /// The node's name (default: the host's).
    #[arg(long)]
    hostname: Option<String>,
    /// The address other nodes reach this one at (default: the local
    /// address that reaches the controller).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,
    /// A node label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// CPUs to advertise instead of those detected (fractions allowed).
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory to advertise instead of what is detected (bytes, or 512m, 1g).
    #[arg(long)]
    memory: Option<String>,
    /// The node's data directory.
    #[arg(long, env = "GANTRY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Do not program the overlay (VXLAN, service VIPs, DNS) from the
    /// controller's network updates: for a node whose tasks all use host
    /// networking, or an agent sharing a test machine's own namespace.
    #[arg(long)]
    no_overlay: bool,
}

/// Runs `gantry agent`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let data_dir = args
        .data_dir
        .map(DataDir::new)
        .unwrap_or_else(DataDir::from_env);
    if args.leave {
        let binary = std::env::current_exe().context("locating the gantry binary")?;
        let report = daemon::leave(&data_dir, binary)?;
        println!(
            "left: {} task container(s) removed, overlay removed{}",
            report.tasks_removed,
            if report.bridge_removed {
                ", bridge removed"
            } else {
                "; the bridge stays (a container is on it)"
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let join: Vec<String> = args
        .join
        .iter()
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    let Some(first) = join.first().cloned() else {
        return Err(UsageError("--join: give at least one controller HOST:PORT".into()).into());
    };
    let mut config = AgentConfig::new(data_dir, first);
    config.controllers = join;
    if let Some(hostname) = args.hostname {
        config.hostname = hostname;
    }
    config.advertise_address = args.advertise;
    config.overlay = !args.no_overlay;
    config.labels = parse_labels(&args.labels)?;
    let memory_bytes = args
        .memory
        .as_deref()
        .map(|m| parse_size(m).map_err(|e| UsageError(format!("--memory: {e}"))))
        .transpose()?;
    if args.cpus.is_some() || memory_bytes.is_some() {
        config.resources = Some(ResourceOverride {
            cpus: args.cpus,
            memory_bytes,
        });
    }
    // The shim and exec relays re-execute this very binary.
    config.gantry_binary = std::env::current_exe().context("locating the gantry binary")?;
    daemon::run(config, daemon::terminate_signal()).map_err(|e| match e {
        daemon::AgentError::InvalidController { .. }
        | daemon::AgentError::Node(gantry_agent::daemon::node::NodeError::InvalidOverride {
            ..
        }) => UsageError(e.to_string()).into(),
        other => anyhow::Error::new(other),
    })?;
    Ok(ExitCode::SUCCESS)
}

fn parse_labels(labels: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for label in labels {
        match label.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                out.insert(k.to_string(), v.to_string());
            }
            _ => {
                return Err(UsageError(format!("--label {label:?}: expected KEY=VALUE")).into());
            }
        }
    }
    Ok(out)
}
