//! `gantry up`: a whole single-node cluster in one process — the controller
//! and an agent joined to it — for trying Gantry on one machine (k3s's
//! `server` with its embedded agent, Nomad's `-dev`).
//!
//! Both run on one tokio runtime built here (`main` stays synchronous). The
//! controller listens on `127.0.0.1:7070` unless told otherwise and keeps its
//! state in `DATA_DIR/controller/`; the agent uses `DATA_DIR` as any agent
//! does, so a later `gantry agent` on the same data dir is the same node with
//! the same containers. While it runs, `/run/gantry/context.json` points the
//! CLI on this machine at it, so `gantry deploy` and friends need no flags.
//!
//! On SIGTERM or SIGINT the agent stops first (containers keep running, as
//! with any agent stop; the next `gantry up` adopts them), then the controller.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use gantry_agent::daemon::{self, AgentConfig};
use gantry_agent::paths::DataDir;
use gantry_controller::registry::{self, RegistryStore};
use gantry_controller::server::{self, ControllerConfig};
use gantry_tests::cluster::state::{self as context_state, Context as CliContext};
use tokio::sync::watch;

use super::UsageError;
use crate::client::context_file;

/// What `gantry up` writes as the context's `source`.
const CONTEXT_SOURCE: &str = "gantry up";

/// Arguments of `gantry up`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The address the controller serves gRPC and images on. Loopback by
    /// default: a one-machine cluster needs no open port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// The data directory (default: $GANTRY_DATA_DIR, else /var/lib/gantry).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The node's name (default: the host's).
    #[arg(long)]
    hostname: Option<String>,
}

/// Runs `gantry up`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.listen.port() == 0 {
        return Err(
            UsageError("--listen: a fixed port is needed (the agent joins it)".into()).into(),
        );
    }
    let data_dir = args
        .data_dir
        .map(DataDir::new)
        .unwrap_or_else(DataDir::from_env);
    let controller = ControllerConfig {
        data_dir: data_dir.root().to_path_buf(),
        listen: args.listen,
        ..ControllerConfig::default()
    };
    let registry_dir = controller.registry_dir();
    let registry = RegistryStore::open(&registry_dir)
        .with_context(|| format!("opening the registry in {}", registry_dir.display()))?;

    // The agent dials the controller on loopback when it listens on every
    // address: 0.0.0.0 is not an address to connect to.
    let join = if args.listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], args.listen.port()))
    } else {
        args.listen
    };
    let mut agent = AgentConfig::new(data_dir, join.to_string());
    if let Some(hostname) = args.hostname {
        agent.hostname = hostname;
    }
    agent.gantry_binary = std::env::current_exe().context("locating the gantry binary")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gantry-up")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        // One signal stops both: the agent first, then the controller.
        let (stop_tx, stop_rx) = watch::channel(false);
        let signal = daemon::terminate_signal();
        tokio::spawn(async move {
            signal.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };

        let (agent_done_tx, agent_done_rx) = watch::channel(false);
        let controller_task = tokio::spawn(server::serve(
            controller,
            registry::router(registry),
            stopped(agent_done_rx.clone()),
        ));
        let context_path = context_file();
        write_context(&context_path, &join.to_string())?;
        eprintln!(
            "gantry up: controller on {join}, this machine's agent joined; \
             the CLI here talks to it with no flags (Ctrl-C stops both; containers keep running)"
        );
        let mut controller_task = controller_task;
        let agent_run = daemon::serve(agent, stopped(stop_rx));
        tokio::pin!(agent_run);
        let result = tokio::select! {
            // The controller ending first is a failure (say, its port is
            // taken): the agent would only retry a controller that is gone.
            ended = &mut controller_task => match ended {
                Ok(Ok(())) => Err(anyhow::anyhow!("the controller stopped unexpectedly")),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("controller")),
                Err(e) => Err(anyhow::Error::new(e).context("the controller task panicked")),
            },
            agent_result = &mut agent_run => {
                let _ = agent_done_tx.send(true);
                let controller_result = controller_task.await;
                agent_result.context("agent").and_then(|()| {
                    controller_result
                        .context("the controller task panicked")?
                        .context("controller")
                })
            }
        };
        let _ = context_state::remove_context(&context_path, CONTEXT_SOURCE);
        result?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Points the CLI on this machine at `controller` (replacing a dev
/// cluster's context, as the newest cluster wins in kind and kubectl).
fn write_context(path: &Path, controller: &str) -> anyhow::Result<()> {
    let context = CliContext {
        controller: controller.to_string(),
        controllers: Vec::new(),
        source: CONTEXT_SOURCE.to_string(),
    };
    context_state::write_json(path, &context)
        .with_context(|| format!("writing the CLI context {}", path.display()))
}
