//! The agent process (`gantry agent --join HOST:PORT`): joins a controller
//! and runs what it assigns through the task worker.
//!
//! - [`node`]: the node's id (made once, kept in `<data_dir>/agent/node-id`),
//!   hostname, resources and platform.
//! - [`assignments`]: the wanted set as assignment sets edit it (pure).
//! - [`controllers`]: the known controller addresses, failover order,
//!   remembered in `<data_dir>/agent/controllers.json`.
//! - [`convert`]: the controller's tasks as the worker's specs, and the
//!   worker's statuses as the wire's.
//! - [`overlay`]: the controller's network updates applied to the node's
//!   overlay data plane (on a thread of its own), and the DNS responder.
//! - [`session`]: the dispatcher session: hello, heartbeats, assignments
//!   down, statuses up, image pulls, logs and exec relays, reconnects.
//!
//! [`leave`] is `gantry agent --leave`: a leaving node's task containers and
//! overlay removed, with the agent stopped.
//!
//! [`run`] builds its own tokio runtime (the `gantry` binary's `main` is
//! synchronous and starts no threads before dispatch); [`serve`] is the same
//! on the caller's runtime, for `gantry up`. The worker runs on a
//! std thread of its own: every engine call that spawns a shim is made
//! there, never from the runtime, and nothing async forks to run Rust code
//! (shims and exec relays are re-executed `gantry` processes).
//!
//! No join token or TLS yet: a controller registers any node id it has not
//! seen (DESIGN's mTLS comes with the security issue).
//!
//! **Invariant:** stopping the agent never stops a workload. On shutdown
//! the worker returns leaving its containers running, and the next agent on
//! this data directory adopts them (an agent killed with -9 and restarted
//! re-attaches the same way).

pub mod assignments;
pub mod controllers;
pub mod convert;
pub mod node;
pub mod overlay;
pub mod session;

use crate::engine::container::{ContainerError, Engine, EngineConfig};
use crate::paths::DataDir;
use crate::worker::{Control, DEFAULT_TICK, Worker, WorkerConfig, WorkerError};
pub use node::ResourceOverride;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

/// The default heartbeat period, used until a controller says otherwise.
pub const DEFAULT_HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);

/// Errors of the agent process.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The node description failed (id file, resources).
    #[error(transparent)]
    Node(#[from] node::NodeError),
    /// The engine could not be opened.
    #[error("engine at {data_dir}: {source}")]
    Engine {
        /// The data directory.
        data_dir: PathBuf,
        /// The cause.
        #[source]
        source: ContainerError,
    },
    /// The worker failed to start or stopped with an error.
    #[error("worker: {0}")]
    Worker(#[from] WorkerError),
    /// The controller address cannot be used.
    #[error("invalid controller address {address:?}: {reason}")]
    InvalidController {
        /// The address given.
        address: String,
        /// Why.
        reason: String,
    },
    /// The async runtime or a thread could not be started.
    #[error("starting {what}: {source}")]
    Start {
        /// What was being started.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The worker thread panicked.
    #[error("the worker thread panicked")]
    WorkerPanicked,
    /// Leaving: a task container could not be removed.
    #[error("leave: removing task container {id}: {source}")]
    LeaveContainer {
        /// The container.
        id: String,
        /// The cause.
        #[source]
        source: ContainerError,
    },
    /// Leaving: the overlay could not be removed.
    #[error("leave: removing the overlay: {0}")]
    LeaveOverlay(#[source] crate::network::NetworkError),
}

/// What [`leave`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaveReport {
    /// Task containers removed.
    pub tasks_removed: usize,
    /// Whether the bridge went too (a standalone container keeps it).
    pub bridge_removed: bool,
}

/// `gantry agent --leave`, for a node leaving the cluster (Swarm's `docker
/// swarm leave` on a worker): removes this data dir's task containers (the
/// ones the worker made, labelled `gantry.task.id`; standalone containers
/// stay) and then the node's overlay (`Overlay::teardown`, the idle bridge
/// and the engine's table). Run with the agent stopped (a running one would
/// start its tasks again); the controller side is `gantry node rm`.
pub fn leave(data_dir: &DataDir, gantry_binary: PathBuf) -> Result<LeaveReport, AgentError> {
    let engine = Engine::open(EngineConfig {
        data_dir: data_dir.clone(),
        shim_binary: gantry_binary,
    })
    .map_err(|source| AgentError::Engine {
        data_dir: data_dir.root().to_path_buf(),
        source,
    })?;
    let containers = engine.list().map_err(|source| AgentError::Engine {
        data_dir: data_dir.root().to_path_buf(),
        source,
    })?;
    let mut tasks_removed = 0;
    for info in containers {
        if !info
            .config
            .labels
            .contains_key(crate::worker::LABEL_TASK_ID)
        {
            continue;
        }
        engine
            .remove(&info.id, true)
            .map_err(|source| AgentError::LeaveContainer {
                id: info.id.to_string(),
                source,
            })?;
        tasks_removed += 1;
    }
    let bridge_removed = overlay::leave(data_dir).map_err(AgentError::LeaveOverlay)?;
    Ok(LeaveReport {
        tasks_removed,
        bridge_removed,
    })
}

/// How an agent is set up (`gantry agent` flags).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node's data directory.
    pub data_dir: DataDir,
    /// The controller tried first, `host:port` (the first of `--join`).
    pub controller: String,
    /// Every controller address the agent was given (`--join a,b,c`),
    /// `controller` first; the session fails over through them and through
    /// the list each controller sends in `SessionAccepted.controllers`.
    pub controllers: Vec<String>,
    /// The node's name (`--hostname`; the host's by default).
    pub hostname: String,
    /// The address the node is reachable at (`--advertise`); when unset, the
    /// local address of the connection to the controller.
    pub advertise_address: Option<String>,
    /// Node labels (`--label K=V`).
    pub labels: BTreeMap<String, String>,
    /// CPUs and memory to advertise instead of what is detected.
    pub resources: Option<ResourceOverride>,
    /// The `gantry` binary, run as shim, for exec probes and exec relays.
    pub gantry_binary: PathBuf,
    /// Heartbeat period until the controller's `accepted` says otherwise.
    pub heartbeat_period: Duration,
    /// Reconnect back-off: first and longest wait.
    pub reconnect_backoff: (Duration, Duration),
    /// Program the overlay (VXLAN, VIPs, DNS) from the controller's network
    /// updates (`--no-overlay` turns it off: for agents sharing the
    /// machine's own network namespace in tests, or a node whose tasks all
    /// use host networking).
    pub overlay: bool,
}

impl AgentConfig {
    /// A config with the defaults: this host's name, detected resources,
    /// `/proc/self/exe` as the `gantry` binary, 1 s heartbeats, reconnects
    /// backing off from 100 ms to 2 s.
    pub fn new(data_dir: DataDir, controller: impl Into<String>) -> AgentConfig {
        let controller = controller.into();
        AgentConfig {
            data_dir,
            controllers: vec![controller.clone()],
            controller,
            hostname: node::hostname(),
            advertise_address: None,
            labels: BTreeMap::new(),
            resources: None,
            gantry_binary: PathBuf::from("/proc/self/exe"),
            heartbeat_period: DEFAULT_HEARTBEAT_PERIOD,
            reconnect_backoff: (Duration::from_millis(100), Duration::from_secs(2)),
            overlay: true,
        }
    }
}

/// Runs the agent until `shutdown` completes, on a tokio runtime of its own
/// (2 worker threads), with the worker on its own thread. On shutdown the
/// worker returns and the containers keep running. For a process that is
/// the agent alone (`gantry agent`).
pub fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gantry-agent")
        .enable_all()
        .build()
        .map_err(|source| AgentError::Start {
            what: "the async runtime",
            source,
        })?;
    let result = runtime.block_on(serve(config, shutdown));
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// [`run`] on the caller's runtime, for a process that runs more than the
/// agent (`gantry up`: the controller and an agent in one process). The
/// worker still gets a std thread of its own, so the engine's shim spawns
/// never happen on the runtime.
pub async fn serve(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    validate_controller(&config.controller)?;
    for address in &config.controllers {
        validate_controller(address)?;
    }
    let node = session::NodeInfo::describe(&config)?;
    let engine = Engine::open(EngineConfig {
        data_dir: config.data_dir.clone(),
        shim_binary: config.gantry_binary.clone(),
    })
    .map_err(|source| AgentError::Engine {
        data_dir: config.data_dir.root().to_path_buf(),
        source,
    })?;
    let (status_tx, status_rx) = std::sync::mpsc::channel();
    // Lists the containers to adopt (kept running until the first
    // assignments say which are still wanted); a few file reads.
    let worker = Worker::new(
        engine.clone(),
        WorkerConfig {
            data_dir: config.data_dir.clone(),
            gantry_binary: config.gantry_binary.clone(),
            tick: DEFAULT_TICK,
        },
        status_tx,
    )?;
    let (control_tx, control_rx) = std::sync::mpsc::channel::<Control>();
    let worker_thread = std::thread::Builder::new()
        .name("gantry-worker".into())
        .spawn(move || worker.run(control_rx))
        .map_err(|source| AgentError::Start {
            what: "the worker thread",
            source,
        })?;
    // Worker statuses into the runtime: a blocking receive belongs on a
    // thread, not on an async task. Ends when the worker drops its sender.
    let (event_tx, event_rx) = tokio::sync::mpsc::unbounded_channel();
    let relay = std::thread::Builder::new()
        .name("gantry-status".into())
        .spawn(move || {
            while let Ok(status) = status_rx.recv() {
                if event_tx.send(status).is_err() {
                    break;
                }
            }
        })
        .map_err(|source| AgentError::Start {
            what: "the status relay thread",
            source,
        })?;
    let agent = session::Agent::new(config, node, engine, control_tx.clone(), event_rx);
    agent.run(shutdown).await;
    // Containers stay: the worker only waits for removals in flight.
    let _ = control_tx.send(Control::Shutdown);
    let joined = tokio::task::spawn_blocking(move || {
        let result = worker_thread.join();
        let _ = relay.join();
        result
    })
    .await;
    match joined {
        Ok(Ok(result)) => Ok(result?),
        Ok(Err(_)) | Err(_) => Err(AgentError::WorkerPanicked),
    }
}

/// Completes on SIGTERM or SIGINT: the shutdown a `gantry agent` process
/// passes to [`run`]. Lazy, so it can be made outside the runtime.
pub async fn terminate_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `host:port` with a port, as the controller address must be.
fn validate_controller(address: &str) -> Result<(), AgentError> {
    let bad = |reason: &str| AgentError::InvalidController {
        address: address.to_string(),
        reason: reason.to_string(),
    };
    if address.contains("://") {
        return Err(bad("give host:port without a scheme"));
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(bad("expected host:port"));
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad("the port must be 1-65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_addresses_need_a_host_and_port() {
        assert!(validate_controller("127.0.0.1:7070").is_ok());
        assert!(validate_controller("[::1]:7070").is_ok());
        assert!(validate_controller("ctl.example:7070").is_ok());
        for bad in ["127.0.0.1", "http://a:1", ":7070", "a:0", "a:x"] {
            let err = validate_controller(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
