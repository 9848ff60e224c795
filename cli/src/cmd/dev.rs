//! `gantry dev cluster ...`: a kind-style local cluster with chaos built in.
//!
//! A thin shell over `gantry_tests::cluster`, the same harness the
//! end-to-end tests use, so the cluster users play with is the one the tests
//! prove. `up` writes the CLI context file, so `gantry node ls` and friends
//! talk to the dev cluster with no flags until `down` removes it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use gantry_tests::cluster::{self, Cluster, ClusterConfig, Readiness, Subnet};

use super::UsageError;

/// Arguments of `gantry dev`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: DevCommand,
}

#[derive(Debug, Subcommand)]
enum DevCommand {
    /// A local multi-host cluster: hosts are network namespaces on a bridge.
    Cluster(ClusterArgs),
}

#[derive(Debug, clap::Args)]
struct ClusterArgs {
    /// The cluster's name (several can run side by side).
    #[arg(long, global = true, default_value = "gantry")]
    name: String,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Build the hosts, start a controller and agents, wait until every node is ready.
    Up(UpArgs),
    /// List the hosts: NAME ROLE ADDRESS PID STATE.
    Ls,
    /// kill -9 a host's Gantry processes (its containers keep running).
    Kill(HostArg),
    /// SIGSTOP a host's Gantry processes (a hung machine).
    Stop(HostArg),
    /// Resume a stopped host, or restart a killed one.
    Start(HostArg),
    /// Cut a host's network link (nftables drops everything on its eth0).
    Partition(HostArg),
    /// Restore a partitioned host's link.
    Heal(HostArg),
    /// Kill every process the cluster started, remove its containers, namespaces, bridge and data.
    Down,
}

fn parse_controllers(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n @ (1 | 3 | 5 | 7)) => Ok(n),
        _ => Err(format!("`{text}`: 1, 3, 5 or 7 controllers")),
    }
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Agent hosts (n1..nN).
    #[arg(long, default_value_t = 3)]
    agents: u32,
    /// Controller hosts (c1..cN): 1, 3, 5 or 7 (an odd count, as Raft
    /// wants: an even one tolerates no more failures than one fewer).
    #[arg(long, default_value_t = 1, value_parser = parse_controllers)]
    controllers: u32,
    /// The hosts' subnet (default 10.251.0.0/24, or a free /24 in 10.251.0.0/16).
    #[arg(long)]
    subnet: Option<String>,
    /// CPUs each agent advertises (default: the machine's).
    #[arg(long)]
    cpus: Option<String>,
    /// Memory each agent advertises, bytes or with a unit like 1g (default: the machine's).
    #[arg(long)]
    memory: Option<String>,
    /// Where hosts keep their data (default /var/lib/gantry/dev/<name>).
    #[arg(long)]
    base_dir: Option<PathBuf>,
    /// Seconds to wait for every node to be ready.
    #[arg(long, default_value_t = 30)]
    wait: u64,
}

#[derive(Debug, clap::Args)]
struct HostArg {
    /// The host, as `ls` names it (c1, n1, n2, ...).
    host: String,
}

/// Runs `gantry dev ...`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let DevCommand::Cluster(args) = args.command;
    if !nix::unistd::Uid::effective().is_root() {
        anyhow::bail!("gantry dev cluster needs root (it creates network namespaces and a bridge)");
    }
    let state_root = PathBuf::from(cluster::DEFAULT_STATE_ROOT);
    let name = args.name;
    match args.command {
        ClusterCommand::Up(up) => {
            let subnet = up
                .subnet
                .as_deref()
                .map(str::parse::<Subnet>)
                .transpose()
                .map_err(|e| UsageError(e.to_string()))?;
            let gantry = std::env::current_exe().context("locating the gantry binary")?;
            let mut config = ClusterConfig::new(gantry);
            config.name = name.clone();
            config.agents = up.agents;
            config.controllers = up.controllers;
            config.subnet = subnet;
            config.agent_cpus = up.cpus;
            config.agent_memory = up.memory;
            config.base_dir = up.base_dir;
            config.context_file = Some(crate::client::context_file());
            config.readiness = Readiness::NodesReady;
            config.ready_timeout = Duration::from_secs(up.wait);
            let dev = Cluster::up(config).map_err(usage_or_failure)?;
            print_hosts(&dev)?;
            println!(
                "controller {} (context {}); `gantry dev cluster down --name {name}` removes it",
                dev.controller_endpoint(),
                crate::client::context_file().display()
            );
            dev.detach();
        }
        ClusterCommand::Ls => {
            let dev = Cluster::open(&name, &state_root).map_err(usage_or_failure)?;
            print_hosts(&dev)?;
        }
        ClusterCommand::Kill(h) => fault(&name, &state_root, &h.host, Cluster::kill)?,
        ClusterCommand::Stop(h) => fault(&name, &state_root, &h.host, Cluster::stop)?,
        ClusterCommand::Start(h) => fault(&name, &state_root, &h.host, Cluster::start)?,
        ClusterCommand::Partition(h) => fault(&name, &state_root, &h.host, Cluster::partition)?,
        ClusterCommand::Heal(h) => fault(&name, &state_root, &h.host, Cluster::heal)?,
        ClusterCommand::Down => {
            if !Cluster::down_named(&name, &state_root)? {
                eprintln!("dev cluster {name} is not up; nothing to remove");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Bad names and unknown hosts are the user's input (exit 2); the rest are
/// failures (exit 1).
fn usage_or_failure(e: cluster::ClusterError) -> anyhow::Error {
    match e {
        cluster::ClusterError::InvalidName { .. }
        | cluster::ClusterError::UnknownHost { .. }
        | cluster::ClusterError::InvalidConfig { .. } => UsageError(e.to_string()).into(),
        e => e.into(),
    }
}

fn fault(
    name: &str,
    state_root: &std::path::Path,
    host: &str,
    action: fn(&mut Cluster, &str) -> Result<(), cluster::ClusterError>,
) -> anyhow::Result<()> {
    let mut dev = Cluster::open(name, state_root).map_err(usage_or_failure)?;
    action(&mut dev, host).map_err(usage_or_failure)?;
    print_hosts(&dev)
}

fn print_hosts(dev: &Cluster) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<6} {:<11} {:<16} {:<8} STATE",
        "NAME", "ROLE", "ADDRESS", "PID"
    )?;
    for h in dev.status() {
        let pid = h.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{:<6} {:<11} {:<16} {:<8} {}",
            h.name,
            h.role.to_string(),
            h.address.to_string(),
            pid,
            h.state_word()
        )?;
    }
    Ok(())
}
