//! The controller process: the store behind its async front, the executor
//! loops, and the gRPC services, all on one listener.
//!
//! [`serve`] opens the store in `<data_dir>/controller/`, starts the
//! orchestrator, scheduler, task history and node liveness loops, and serves
//! on one TCP port both gRPC over h2c (`gantry.v1.Control`,
//! `gantry.v1.Dispatcher`) and whatever `http_routes` carries (the image
//! registry under `/v2/`, HTTP/1.1): tonic's routes become an axum router
//! merged with the caller's, and `axum::serve` picks HTTP/1.1 or HTTP/2
//! (prior knowledge) per connection.
//!
//! Shutdown is the mini-redis way: when `shutdown` resolves, the stop is
//! broadcast; the listener stops accepting, agent sessions and watch streams
//! end, the loops return, in-flight requests get [`DRAIN_TIMEOUT`] to
//! finish, and the store's writer thread is joined so the log is closed.
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
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use gantry_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::network::Addressing;
use crate::store::{Command, StoreConfig};
pub use control::Control;
pub use dispatcher::{Dispatcher, SessionConfig};
pub use state::{StateError, StoreFront, StoreThread};

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
    /// The address plan differs from the one the cluster was created with.
    #[error("--cluster-cidr {cluster} / --service-cidr {service}: {source}")]
    Addressing {
        /// The cluster CIDR asked for.
        cluster: String,
        /// The service CIDR asked for.
        service: String,
        /// Why the store refused it.
        #[source]
        source: Box<StateError>,
    },
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
            addressing: Addressing::default(),
        }
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

/// Runs the controller on an already bound listener (tests bind port 0).
pub async fn serve_on(
    config: ControllerConfig,
    listener: TcpListener,
    http_routes: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| config.listen.to_string(), |a| a.to_string());
    let dir = config.controller_dir();
    let (store, thread) = StoreFront::open(&dir, config.store)?;
    tracing::info!(%addr, dir = %dir.display(), revision = store.revision(), "controller starting");
    // The address plan goes through the log like every change, so every
    // replica has it; the first start sets it, later ones must match it.
    let plan = Command::SetAddressing {
        addressing: config.addressing,
    };
    if let Err(e) = store.propose_one(plan).await {
        drop(store);
        // Close the log before returning, so the caller may reopen it.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        return Err(ServerError::Addressing {
            cluster: config.addressing.cluster_cidr.to_string(),
            service: config.addressing.service_cidr.to_string(),
            source: Box::new(e),
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
    loops.spawn(executor::run_orchestrator(
        store.clone(),
        stopped(stop_rx.clone()),
    ));
    loops.spawn(executor::run_scheduler(
        store.clone(),
        stopped(stop_rx.clone()),
    ));
    loops.spawn(executor::run_task_history(
        store.clone(),
        stopped(stop_rx.clone()),
    ));
    {
        let dispatcher = dispatcher.clone();
        let stop = stopped(stop_rx.clone());
        loops.spawn(async move { dispatcher.run_liveness(stop).await });
    }
    drop(store);

    let router = tonic::service::Routes::new(pb::control_server::ControlServer::new(control))
        .add_service(pb::dispatcher_server::DispatcherServer::new(dispatcher))
        .into_axum_router()
        .merge(http_routes);

    let server_stop = stopped(stop_rx.clone());
    let mut server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(server_stop)
            .await
    });
    let result = tokio::select! {
        r = &mut server => Some(r),
        () = shutdown => None,
    };
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
    // The writer thread ends once the last front is dropped: give stragglers
    // (a request handler finishing) the drain timeout, then stop waiting.
    let joined = tokio::task::spawn_blocking(move || thread.join());
    if tokio::time::timeout(DRAIN_TIMEOUT, joined).await.is_err() {
        tracing::warn!("the store is still in use after shutdown; not waiting for it");
    }
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(ServerError::Serve { addr, source }),
        Err(e) => Err(ServerError::Serve {
            addr,
            source: std::io::Error::other(e.to_string()),
        }),
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
