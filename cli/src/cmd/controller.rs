//! `gantry controller`: runs the control plane (store, scheduler,
//! orchestrators, dispatcher, API) until SIGTERM or SIGINT.
//!
//! How it starts depends on its data directory, as etcd's and Nomad's
//! servers do: an empty one makes a new one-member cluster (or, with
//! `--join ADDR`, asks that member to add this one); one that holds a
//! cluster restarts that member (`--join` is then ignored: a restarted
//! member never joins again); `--force-new-cluster` restarts it as the only
//! member, keeping its data (disaster recovery after losing the majority).
//!
//! The tokio runtime is built here, inside the subcommand, so that `main`
//! stays synchronous (ARCHITECTURE.md's invariant).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use gantry_agent::paths::DataDir;
use gantry_controller::compose::units;
use gantry_controller::network::{self, Addressing};
use gantry_controller::registry::{self, RegistryStore};
use gantry_controller::server::{self, ControllerConfig, StartMode};

use super::UsageError;

/// Arguments of `gantry controller`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The address gRPC and the image registry are served on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7070")]
    listen: SocketAddr,
    /// The data directory (default: $GANTRY_DATA_DIR, else /var/lib/gantry);
    /// state goes to DIR/controller/.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// How often agents heartbeat (Go duration syntax: 1s, 500ms).
    #[arg(long, value_name = "D", default_value = "1s", value_parser = parse_duration)]
    heartbeat_period: Duration,
    /// How long a silent node keeps its tasks before it is marked down.
    #[arg(long, value_name = "D", default_value = "3s", value_parser = parse_duration)]
    lease: Duration,
    /// The address other controllers, agents and clients reach this one at
    /// (default: --listen, or when that is 0.0.0.0 the local address that
    /// reaches --join, else 127.0.0.1 with the listen port).
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// Join the cluster of the controller at HOST:PORT (any member: a
    /// follower forwards to the leader). Ignored when the data directory
    /// already holds a cluster.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "force_new_cluster")]
    join: Option<String>,
    /// Disaster recovery: restart from this member's data as a cluster of
    /// one (etcd's --force-new-cluster); add the others back with --join.
    #[arg(long)]
    force_new_cluster: bool,
    /// Snapshot the state and compact the log every N applied entries
    /// (etcd's --snapshot-count); a lagging or new controller is sent the
    /// snapshot.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    snapshot_every: u64,
    /// The overlay's address space, cut into one /24 per node (IPv4, /22 or
    /// shorter). Fixed when the cluster is created.
    #[arg(long, value_name = "CIDR", default_value = network::DEFAULT_CLUSTER_CIDR)]
    cluster_cidr: String,
    /// Where service virtual IPs come from (IPv4, must not overlap the
    /// cluster CIDR). Fixed when the cluster is created.
    #[arg(long, value_name = "CIDR", default_value = network::DEFAULT_SERVICE_CIDR)]
    service_cidr: String,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = units::Duration::parse(text).map_err(|e| e.to_string())?.0;
    if d.is_zero() {
        return Err("must be greater than 0".into());
    }
    Ok(d)
}

/// Runs `gantry controller`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mode = match (&args.join, args.force_new_cluster) {
        (Some(join), _) => StartMode::Join(join.clone()),
        (None, true) => StartMode::ForceNewCluster,
        (None, false) => StartMode::Auto,
    };
    start(args, mode)
}

/// Runs `gantry cluster init`: a controller that must start a new cluster.
pub fn run_init(args: Args) -> anyhow::Result<ExitCode> {
    if args.join.is_some() || args.force_new_cluster {
        return Err(UsageError(
            "cluster init starts a new cluster: --join and --force-new-cluster do not apply \
             (use `gantry controller --join ADDR` to add this host to a cluster)"
                .into(),
        )
        .into());
    }
    start(args, StartMode::Init)
}

fn start(args: Args, mode: StartMode) -> anyhow::Result<ExitCode> {
    if args.lease <= args.heartbeat_period {
        return Err(UsageError(format!(
            "--lease {:?} must be longer than --heartbeat-period {:?}",
            args.lease, args.heartbeat_period
        ))
        .into());
    }
    let addressing = Addressing::from_flags(&args.cluster_cidr, &args.service_cidr)
        .map_err(|e| UsageError(e.to_string()))?;
    let data_dir = args
        .data_dir
        .map(DataDir::new)
        .unwrap_or_else(DataDir::from_env);
    let mut config = ControllerConfig {
        data_dir: data_dir.root().to_path_buf(),
        listen: args.listen,
        heartbeat_period: args.heartbeat_period,
        lease: args.lease,
        advertise: args.advertise,
        mode,
        store: gantry_controller::store::StoreConfig {
            snapshot_every: args.snapshot_every,
            ..Default::default()
        },
        addressing,
    };
    // A test hook, not a flag: the failover test lowers the log compaction
    // interval so that a lagging follower must catch up by snapshot.
    if let Some(every) = std::env::var("GANTRY_SNAPSHOT_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.store.snapshot_every = every;
    }
    if matches!(config.mode, StartMode::Init) && server::holds_cluster(&config) {
        return Err(UsageError(format!(
            "{} already holds a cluster: start it with `gantry controller`, or remove the \
             directory to make a new one",
            config.controller_dir().display()
        ))
        .into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gantry-controller")
        .build()
        .context("starting the async runtime")?;
    let registry_dir = config.registry_dir();
    let registry = RegistryStore::open(&registry_dir)
        .with_context(|| format!("opening the registry in {}", registry_dir.display()))?;
    runtime.block_on(async move {
        let shutdown = shutdown_signal().context("installing signal handlers")?;
        // One port: gRPC for clients and agents, `/v2/` for image pulls.
        server::serve(config, registry::router(registry), shutdown)
            .await
            .context("controller")
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}
