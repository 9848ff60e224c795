//! The controller process: the store behind its async front, the executor
//! loops, and the gRPC services, all on one listener.
//!
//! [`serve`] starts this member's Raft node on `<data_dir>/controller/`
//! (a new one-member cluster, a `--join`, a restart or a forced new cluster:
//! [`StartMode`]; the raft id is kept in `raft.json` beside the log), runs
//! the orchestrator, scheduler, task history and node liveness loops while
//! this member leads ([`lead`]), and serves on one TCP port both gRPC over
//! h2c (`gantry.v1.Control`, `gantry.v1.Dispatcher`, `gantry.v1.Raft`,
//! `gantry.v1.Cluster`) and whatever `http_routes` carries (the image
//! registry under `/v2/`, HTTP/1.1): tonic's routes become an axum router
//! merged with the caller's, and `axum::serve` picks HTTP/1.1 or HTTP/2
//! (prior knowledge) per connection.
//!
//! Shutdown is the mini-redis way: when `shutdown` resolves, the stop is
//! broadcast; the listener stops accepting, agent sessions and watch streams
//! end, the loops return, in-flight requests get [`DRAIN_TIMEOUT`] to
//! finish, and the Raft thread is joined so the log is closed.
//!
//! No TLS and no join tokens in this issue: any agent that reaches the port
//! joins (DESIGN's mTLS comes with the security work).
//!
//! **Invariant:** the loops and services meet only through the store: none
//! calls another (swarmkit's manager); the dispatcher's log/exec relay is
//! the one direct link, and it carries bytes, not state.

pub mod control;
pub mod deploy;
pub mod dispatcher;
pub mod executor;
pub mod replication;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use gantry_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::network::Addressing;
use crate::raft::{Bootstrap, RaftConfig, RaftNode};
use crate::store::{Command, StoreConfig};
pub use control::Control;
pub use dispatcher::{Dispatcher, SessionConfig};
pub use replication::{ClusterService, GrpcTransport, RaftService};
pub use state::{StateError, StoreFront};

/// How long in-flight requests may run after shutdown was asked for.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The controller's directory inside the data directory.
pub const CONTROLLER_DIR: &str = "controller";

/// The registry's directory inside the controller's.
pub const REGISTRY_DIR: &str = "registry";

/// Errors from running the controller.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StateError),
    /// This member's identity file could not be read or written.
    #[error("controller identity {path}: {message}")]
    Identity {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// `--join` failed.
    #[error("{message}")]
    Join {
        /// What failed.
        message: String,
    },
    /// The address plan differs from the one the cluster was created with.
    #[error(
        "--cluster-cidr {cluster} / --service-cidr {service}: the cluster was created with \
         {stored_cluster} / {stored_service}; the address plan cannot change"
    )]
    Addressing {
        /// The cluster CIDR asked for.
        cluster: String,
        /// The service CIDR asked for.
        service: String,
        /// The cluster CIDR in the replicated state.
        stored_cluster: String,
        /// The service CIDR in the replicated state.
        stored_service: String,
    },
    /// This controller was removed from the cluster (`gantry cluster
    /// remove-controller`): it stops, and refuses to start again from the
    /// same data unless `--force-new-cluster` (etcd's removed member).
    /// Always [`crate::raft::RaftError::Removed`], whose message it shows.
    #[error(transparent)]
    Removed(crate::raft::RaftError),
    /// Serving failed.
    #[error("serving on {addr}: {source}")]
    Serve {
        /// The address.
        addr: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// What `gantry controller` runs with.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The data directory; the controller keeps its state in
    /// `<data_dir>/controller/` (the registry's blobs in
    /// `<data_dir>/controller/registry/`).
    pub data_dir: PathBuf,
    /// The one address gRPC and the registry are served on.
    pub listen: SocketAddr,
    /// How often agents heartbeat (default 1 s).
    pub heartbeat_period: Duration,
    /// How long a node may stay silent before it is marked down (default
    /// 3 s: with the replacement scheduled at once, a lost node's replicas
    /// run elsewhere within 5 s).
    pub lease: Duration,
    /// Snapshot and watch history settings.
    pub store: StoreConfig,
    /// The cluster and service CIDRs (`--cluster-cidr`, `--service-cidr`):
    /// stored on the first start; a later start with others is refused.
    pub addressing: Addressing,
    /// The address other controllers, agents and clients reach this one at;
    /// `None`: `listen` when it names an address, else one found by
    /// [`advertise_address`].
    pub advertise: Option<String>,
    /// How to start when the data directory holds no cluster yet.
    pub mode: StartMode,
}

/// How a controller starts (`gantry controller` flags). Whatever the mode,
/// a data directory that already holds a cluster restarts that member,
/// except with [`StartMode::ForceNewCluster`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StartMode {
    /// A new one-member cluster if the data directory is empty, else a
    /// restart.
    #[default]
    Auto,
    /// `gantry cluster init`: like `Auto`, but the caller refuses a data
    /// directory that holds a cluster (see [`holds_cluster`]).
    Init,
    /// `--join ADDR`: ask the member at ADDR to add this controller, then
    /// start empty and wait for the leader's log or snapshot.
    Join(String),
    /// `--force-new-cluster`: this member's data as a one-member cluster.
    ForceNewCluster,
}

impl ControllerConfig {
    /// The defaults, with state in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> ControllerConfig {
        ControllerConfig {
            data_dir: data_dir.into(),
            ..ControllerConfig::default()
        }
    }

    /// `<data_dir>/controller/`.
    pub fn controller_dir(&self) -> PathBuf {
        self.data_dir.join(CONTROLLER_DIR)
    }

    /// `<data_dir>/controller/registry/`, where the registry keeps its blobs.
    pub fn registry_dir(&self) -> PathBuf {
        self.controller_dir().join(REGISTRY_DIR)
    }
}

impl Default for ControllerConfig {
    fn default() -> ControllerConfig {
        ControllerConfig {
            data_dir: PathBuf::from("/var/lib/gantry"),
            listen: SocketAddr::from(([0, 0, 0, 0], 7070)),
            heartbeat_period: Duration::from_secs(1),
            lease: Duration::from_secs(3),
            store: StoreConfig::default(),
            advertise: None,
            mode: StartMode::Auto,
            addressing: Addressing::default(),
        }
    }
}

/// Whether the controller's directory already holds a cluster's data
/// (this member's identity, written before its Raft state).
pub fn holds_cluster(config: &ControllerConfig) -> bool {
    config.controller_dir().join(IDENTITY_FILE).exists()
}

/// The address to advertise: `config.advertise`, else `listen` when it is
/// not the unspecified address, else the local address of a route towards
/// `toward` (a UDP connect, which sends nothing) with the listen port, else
/// loopback.
pub fn advertise_address(config: &ControllerConfig, toward: Option<&str>) -> String {
    if let Some(a) = &config.advertise {
        return a.clone();
    }
    let port = config.listen.port();
    if !config.listen.ip().is_unspecified() {
        return config.listen.to_string();
    }
    let local = toward.and_then(|t| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        socket.connect(t).ok()?;
        socket.local_addr().ok()
    });
    match local {
        Some(a) => SocketAddr::new(a.ip(), port).to_string(),
        None => SocketAddr::from(([127, 0, 0, 1], port)).to_string(),
    }
}

/// Binds `config.listen` and runs the controller until `shutdown` resolves.
pub async fn serve(
    config: ControllerConfig,
    http_routes: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    serve_on(config, listener, http_routes, shutdown).await
}

/// This member's identity, kept beside the log (`raft.json`): a restart
/// must come back with the raft id the cluster gave it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Identity {
    id: u64,
    address: String,
    /// Set when this member learnt that it was removed from the cluster:
    /// a later start refuses the data (unless `--force-new-cluster`), even
    /// if the log itself never got the removal entry.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    removed: bool,
}

const IDENTITY_FILE: &str = "raft.json";

fn load_identity(dir: &std::path::Path) -> Result<Option<Identity>, ServerError> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ServerError::Identity {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ServerError::Identity {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
    }
}

fn save_identity(dir: &std::path::Path, identity: &Identity) -> Result<(), ServerError> {
    let path = dir.join(IDENTITY_FILE);
    let fail = |e: std::io::Error| ServerError::Identity {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let tmp = dir.join("raft.json.tmp");
    let bytes = serde_json::to_vec(identity).unwrap_or_default();
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(&bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
    }
    std::fs::rename(&tmp, &path).map_err(fail)
}

/// Records in `raft.json` that this member was removed, so that a later
/// start refuses its data; a failure is logged (the refusal then rests on
/// the log, which may lack the removal entry).
fn mark_removed(dir: &std::path::Path, identity: &Identity) {
    let identity = Identity {
        removed: true,
        ..identity.clone()
    };
    if let Err(e) = save_identity(dir, &identity) {
        tracing::error!(error = %e, "recording that this controller was removed failed");
    }
}

/// The largest Raft message (a snapshot) a controller accepts.
const MAX_RAFT_MESSAGE: usize = 1 << 30;

/// How long `--join` keeps asking before giving up.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the controller on an already bound listener (tests bind port 0).
pub async fn serve_on(
    config: ControllerConfig,
    listener: TcpListener,
    http_routes: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let bound = listener.local_addr().ok();
    let addr = bound.map_or_else(|| config.listen.to_string(), |a| a.to_string());
    let dir = config.controller_dir();
    let join_target = match &config.mode {
        StartMode::Join(a) => Some(a.clone()),
        _ => None,
    };
    let mut advertise_config = config.clone();
    if let Some(bound) = bound {
        advertise_config.listen = bound;
    }
    let advertise = advertise_address(&advertise_config, join_target.as_deref());

    // Restart when this member has an identity; else what the flags say.
    let identity = load_identity(&dir)?;
    let transport = GrpcTransport::new(tokio::runtime::Handle::current());
    let removed = |id: u64| {
        ServerError::Removed(crate::raft::RaftError::Removed {
            id,
            dir: config.data_dir.display().to_string(),
        })
    };
    let (identity, bootstrap) = match (identity, &config.mode) {
        (Some(id), StartMode::ForceNewCluster) => (id, Bootstrap::ForceNewCluster),
        (Some(id), _) if id.removed => return Err(removed(id.id)),
        (Some(id), mode) => {
            if matches!(mode, StartMode::Join(_)) {
                tracing::info!(
                    raft_id = id.id,
                    "the data directory holds a cluster: restarting as that member, not joining"
                );
            }
            (id, Bootstrap::Restart)
        }
        (None, StartMode::ForceNewCluster) => {
            return Err(ServerError::Identity {
                path: dir.join(IDENTITY_FILE).display().to_string(),
                message: "--force-new-cluster needs this member's data, and there is none".into(),
            });
        }
        (None, StartMode::Join(target)) => {
            let (id, members) = replication::join(target, &advertise, JOIN_TIMEOUT)
                .await
                .map_err(|message| ServerError::Join { message })?;
            transport.learn(members);
            let identity = Identity {
                id,
                address: advertise.clone(),
                removed: false,
            };
            save_identity(&dir, &identity)?;
            (identity, Bootstrap::Join)
        }
        (None, StartMode::Auto | StartMode::Init) => {
            let identity = Identity {
                id: 1,
                address: advertise.clone(),
                removed: false,
            };
            save_identity(&dir, &identity)?;
            (identity, Bootstrap::NewCluster)
        }
    };

    let mut raft_config = RaftConfig::new(identity.id, identity.address.clone(), &dir);
    raft_config.snapshot_every = config.store.snapshot_every;
    raft_config.watch_history = config.store.watch_history;
    let (raft, raft_thread) = match RaftNode::start(raft_config, bootstrap, transport.clone()) {
        Ok(started) => started,
        Err(crate::raft::RaftError::Removed { id, .. }) => {
            mark_removed(&dir, &identity);
            return Err(removed(id));
        }
        Err(source) => {
            return Err(StateError::Open {
                path: dir.display().to_string(),
                source: Box::new(source),
            }
            .into());
        }
    };
    if identity.removed {
        // --force-new-cluster made it a member again.
        let identity = Identity {
            removed: false,
            ..identity.clone()
        };
        save_identity(&dir, &identity)?;
    }
    let mut removed_rx = raft.removed();
    transport.attach(raft.clone());
    let store = StoreFront::new(raft.clone());
    tracing::info!(%addr, advertise = %identity.address, raft_id = identity.id, ?bootstrap, dir = %dir.display(), revision = store.revision(), "controller starting");
    // The address plan is replicated state: the leader proposes it when it
    // starts leading (see `lead`); a member whose flags disagree with what
    // the cluster holds is refused here, by name.
    if let Some(stored) = store.read(|s| s.addressing().copied())
        && stored != config.addressing
    {
        drop((store, raft));
        let _ = tokio::task::spawn_blocking(move || raft_thread.stop()).await;
        return Err(ServerError::Addressing {
            cluster: config.addressing.cluster_cidr.to_string(),
            service: config.addressing.service_cidr.to_string(),
            stored_cluster: stored.cluster_cidr.to_string(),
            stored_service: stored.service_cidr.to_string(),
        });
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        // An error means the sender is gone, which is a stop too.
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let dispatcher = Dispatcher::new(
        store.clone(),
        SessionConfig {
            heartbeat_period: config.heartbeat_period,
            lease: config.lease,
        },
    )
    .with_shutdown(stop_rx.clone());
    let control = Control::new(store.clone(), dispatcher.clone()).with_shutdown(stop_rx.clone());

    let mut loops = tokio::task::JoinSet::new();
    loops.spawn(lead(
        store.clone(),
        dispatcher.clone(),
        config.addressing,
        stop_rx.clone(),
    ));

    let router = tonic::service::Routes::new(pb::control_server::ControlServer::new(control))
        .add_service(pb::dispatcher_server::DispatcherServer::new(dispatcher))
        .add_service(
            // A snapshot travels as one `Raft.Step` message: far above
            // tonic's 4 MiB default for a state with many services.
            pb::raft_server::RaftServer::new(
                RaftService::new(store.clone()).with_shutdown(stop_rx.clone()),
            )
            .max_decoding_message_size(MAX_RAFT_MESSAGE),
        )
        .add_service(pb::cluster_server::ClusterServer::new(ClusterService::new(
            store.clone(),
        )))
        .into_axum_router()
        .merge(http_routes)
        .merge(metrics_route(store.clone()));
    drop(store);

    let server_stop = stopped(stop_rx.clone());
    // Nagle off on every accepted connection, as tonic's own server does
    // (axum's does not): a gRPC answer is a few small HTTP/2 frames, and
    // with Nagle on, a frame written while the previous one is unacked
    // waits for that ack.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on a connection");
        }
    });
    let mut server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(server_stop)
            .await
    });
    let mut was_removed = false;
    let result = tokio::select! {
        r = &mut server => Some(r),
        () = shutdown => None,
        // Removed from the cluster: stop, as etcd's removed member does,
        // rather than run on forever campaigning to peers that refuse it.
        Ok(_) = removed_rx.wait_for(|removed| *removed) => {
            was_removed = true;
            None
        }
    };
    if was_removed {
        tracing::error!(
            raft_id = identity.id,
            dir = %config.data_dir.display(),
            "this controller was removed from the cluster; its data is stale; stopping"
        );
        mark_removed(&dir, &identity);
    }
    // Broadcast the stop whichever way we got here.
    let _ = stop_tx.send(true);
    let result = match result {
        Some(r) => r,
        None => match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("requests still running after the drain timeout; closing them");
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    while loops.join_next().await.is_some() {}
    tracing::info!("controller stopped; closing the store");
    // Stop the Raft loop (it finishes its turn, so what it acknowledged is
    // on disk); stragglers holding handles get errors from then on.
    drop(raft);
    let joined = tokio::task::spawn_blocking(move || raft_thread.stop());
    if tokio::time::timeout(DRAIN_TIMEOUT, joined).await.is_err() {
        tracing::warn!("the store is still in use after shutdown; not waiting for it");
    }
    match result {
        _ if was_removed => Err(removed(identity.id)),
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(ServerError::Serve { addr, source }),
        Err(e) => Err(ServerError::Serve {
            addr,
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// `GET /metrics`: the Raft counters in Prometheus' text format.
fn metrics_route(store: StoreFront) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = replication::metrics_text(&store);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    text,
                )
            }
        }),
    )
}

/// Runs the leader-only loops (orchestrator, scheduler, task history,
/// liveness) while this controller leads: they start, each with its full
/// pass, when it gains leadership and stop when it loses it, until `stop`.
async fn lead(
    store: StoreFront,
    dispatcher: Dispatcher,
    addressing: Addressing,
    stop: watch::Receiver<bool>,
) {
    let me = store.id();
    let mut leadership = store.raft().leadership();
    loop {
        // Wait to lead.
        loop {
            if *stop.borrow() {
                return;
            }
            // A closed channel means the Raft loop stopped: nothing to lead.
            if leadership.has_changed().is_err() {
                tracing::error!(
                    raft_id = me,
                    "the raft loop stopped; the leader-only loops stay off"
                );
                return;
            }
            if leadership.borrow_and_update().leader == Some(me) {
                break;
            }
            let mut stop = stop.clone();
            tokio::select! {
                r = leadership.changed() => if r.is_err() { return; },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        let term = leadership.borrow().term;
        tracing::info!(
            raft_id = me,
            term,
            "leading: starting the orchestrator, scheduler, task history and liveness loops"
        );
        dispatcher.gained_leadership();
        // The address plan goes through the log like every change, so every
        // replica has it: the first leader of a new cluster sets it before
        // the scheduler can assign a task (which takes an address from it).
        if store.read(|s| s.addressing().is_none())
            && let Err(e) = store
                .propose_one(Command::SetAddressing { addressing })
                .await
        {
            tracing::error!(error = %e, "storing the address plan failed; tasks get no addresses until a later leader stores it");
        }
        let (term_tx, term_rx) = watch::channel(false);
        let until = {
            let stop = stop.clone();
            move || {
                let mut stop = stop.clone();
                let mut term = term_rx.clone();
                async move {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => {}
                        _ = term.wait_for(|s| *s) => {}
                    }
                }
            }
        };
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(executor::run_orchestrator(store.clone(), until()));
        loops.spawn(executor::run_scheduler(store.clone(), until()));
        loops.spawn(executor::run_task_history(store.clone(), until()));
        {
            let dispatcher = dispatcher.clone();
            let until = until();
            loops.spawn(async move { dispatcher.run_liveness(until).await });
        }
        // Lead until leadership moves (or the controller stops).
        loop {
            let mut stop_rx = stop.clone();
            tokio::select! {
                r = leadership.changed() => {
                    if r.is_err() || leadership.borrow_and_update().leader != Some(me) {
                        break;
                    }
                }
                _ = stop_rx.wait_for(|s| *s) => break,
            }
        }
        let _ = term_tx.send(true);
        while loops.join_next().await.is_some() {}
        tracing::info!(
            raft_id = me,
            "no longer leading: the leader-only loops stopped"
        );
    }
}

/// Resolves when `rx` says stop (or its sender is gone); never without one.
pub(crate) async fn stop_signal(rx: Option<tokio::sync::watch::Receiver<bool>>) {
    match rx {
        Some(mut rx) => {
            let _ = rx.wait_for(|stop| *stop).await;
        }
        None => std::future::pending().await,
    }
}
