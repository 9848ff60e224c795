//! The multi-host harness: a Gantry cluster of N hosts on this machine, each
//! host a network namespace on a bridge with its own address, running real
//! `gantry controller` / `gantry agent` processes, with faults on demand
//! (kill -9, SIGSTOP/SIGCONT, link cut) and a teardown that always runs.
//!
//! The same code is the user's `gantry dev cluster` (kind-style local
//! cluster with chaos built in) and the end-to-end tests' harness, so what the
//! tests exercise is what users run.
//!
//! Layout, for a cluster named `gantry` on `10.251.0.0/24`:
//! - bridge `gtd-gantry` in the root netns, `10.251.0.1`;
//! - hosts `c1` (controller, `10.251.0.2`), `n1..nN` (agents, `.3`, `.4`, …),
//!   each the netns `gantry-gantry-<host>` with `eth0` (a veth to the
//!   bridge), loopback up, a default route via the bridge and forwarding on;
//! - data under `/var/lib/gantry/dev/gantry/<host>/` (the process's
//!   `--data-dir`, its log `gantry.log` beside it);
//! - the record `/run/gantry/dev/gantry/cluster.json` that later CLI
//!   invocations act on, and (from the CLI) `/run/gantry/context.json`.
//!
//! The root netns reaches every host through the bridge; nothing is NATed to
//! the outside, so hosts only reach each other and this machine. No join
//! tokens or TLS: the controller admits any agent that says hello (mTLS comes
//! with the security work, as DESIGN says).

pub mod net;
pub mod process;
pub mod state;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use net::Subnet;
pub use process::{Liveness, ProcessId};
pub use state::{ClusterRecord, Context, HostRecord, Role};

/// The controller's API port (gRPC and the `/v2/` registry on one listener).
pub const CONTROLLER_PORT: u16 = 7070;
/// Where cluster records live.
pub const DEFAULT_STATE_ROOT: &str = "/run/gantry/dev";
/// Where cluster data lives (`<root>/<name>/<host>`).
pub const DEFAULT_BASE_ROOT: &str = "/var/lib/gantry/dev";
/// The CLI context file.
pub const DEFAULT_CONTEXT_FILE: &str = "/run/gantry/context.json";
/// The default cluster's subnet.
pub const DEFAULT_SUBNET: &str = "10.251.0.0/24";
/// The longest cluster name: the bridge `gtd-<name>` must fit the kernel's
/// 15-character interface names.
pub const MAX_NAME_LEN: usize = 11;

/// Errors of building, faulting and tearing down a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A network step failed.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// Starting or signalling a process failed.
    #[error(transparent)]
    Process(#[from] process::ProcessError),
    /// The record or context file could not be read or written.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The cluster name is unusable.
    #[error(
        "invalid cluster name {name:?}: 1 to {MAX_NAME_LEN} characters, lowercase letters, digits and '-', starting with a letter"
    )]
    InvalidName {
        /// What was given.
        name: String,
    },
    /// The configuration is inconsistent.
    #[error("invalid cluster config: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// A cluster (or its leftovers) of this name exists already.
    #[error(
        "dev cluster {name} already exists ({what}); run `gantry dev cluster down --name {name}` first"
    )]
    AlreadyUp {
        /// The cluster.
        name: String,
        /// What was found.
        what: String,
    },
    /// No cluster of this name is recorded.
    #[error("dev cluster {name} is not up (no {path})")]
    NotUp {
        /// The cluster.
        name: String,
        /// The state file looked for.
        path: PathBuf,
    },
    /// The host is not part of the cluster.
    #[error("dev cluster {cluster} has no host {host} (hosts: {hosts})")]
    UnknownHost {
        /// The cluster.
        cluster: String,
        /// What was asked for.
        host: String,
        /// The hosts it has.
        hosts: String,
    },
    /// No free subnet was found, or the requested one is in use.
    #[error("subnet {subnet} for dev cluster {name} overlaps one in use on this machine ({used})")]
    SubnetInUse {
        /// The cluster.
        name: String,
        /// The subnet tried (the last one, when searching).
        subnet: Subnet,
        /// The network it overlaps.
        used: Subnet,
    },
    /// A condition did not hold in time.
    #[error("timed out after {waited:?} waiting for {what}{detail}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        waited: Duration,
        /// Extra context (e.g. the last lines of the hosts' logs).
        detail: String,
    },
    /// A command run on behalf of the cluster could not start.
    #[error("cannot run {program}: {source}")]
    Command {
        /// The program.
        program: String,
        /// What spawn said.
        #[source]
        source: std::io::Error,
    },
    /// Teardown left something behind.
    #[error("dev cluster {name} teardown incomplete: {}", problems.join("; "))]
    Teardown {
        /// The cluster.
        name: String,
        /// Every step that failed.
        problems: Vec<String>,
    },
}

type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// How `up` decides that the cluster is usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The controller accepts connections on its port and `gantry node ls -o
    /// json` lists every agent host as a ready node (the default).
    NodesReady,
    /// Only that the controller accepts connections on its port.
    ControllerPort,
    /// Only that every process was started.
    Started,
}

/// Commands to run instead of `gantry controller` / `gantry agent`: used by
/// the harness's own tests to check the plumbing with stand-in processes.
/// Each word may hold `{host}`, `{addr}`, `{controller}` (`addr:port` of
/// `c1`) and `{data_dir}`, replaced per host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleCommands {
    /// For controller hosts.
    pub controller: Vec<String>,
    /// For agent hosts.
    pub agent: Vec<String>,
}

/// What cluster to build.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The cluster's name (default `gantry`); see [`MAX_NAME_LEN`].
    pub name: String,
    /// Controller hosts (`c1`, …): `c1` starts a new cluster, the others
    /// `--join` it one at a time; agents get every controller's address.
    pub controllers: u32,
    /// Agent hosts (`n1`, …), default 3.
    pub agents: u32,
    /// The hosts' subnet; `None` picks one: 10.251.0.0/24 for `gantry`, a
    /// /24 in 10.251.0.0/16 derived from the name otherwise, skipping any
    /// that overlaps a network in use on this machine.
    pub subnet: Option<Subnet>,
    /// The `gantry` binary the hosts run.
    pub gantry_binary: PathBuf,
    /// Where hosts keep their data; `None` is `/var/lib/gantry/dev/<name>`.
    pub base_dir: Option<PathBuf>,
    /// Where cluster records live (default `/run/gantry/dev`).
    pub state_root: PathBuf,
    /// `--cpus` each agent advertises (default: the machine's).
    pub agent_cpus: Option<String>,
    /// `--memory` each agent advertises (default: the machine's).
    pub agent_memory: Option<String>,
    /// The CLI context file to write, if any (the CLI passes
    /// [`DEFAULT_CONTEXT_FILE`]; tests leave it unset so they never redirect
    /// a user's CLI).
    pub context_file: Option<PathBuf>,
    /// How `up` decides the cluster is usable.
    pub readiness: Readiness,
    /// How long `up` waits for that.
    pub ready_timeout: Duration,
    /// Stand-in commands (tests of the harness itself); `None` runs Gantry.
    pub commands: Option<RoleCommands>,
    /// Log compaction interval of the controllers (`GANTRY_SNAPSHOT_EVERY`
    /// in their environment); `None` keeps the default (10,000 entries). A
    /// test hook: a low value makes a lagging follower catch up by snapshot.
    pub snapshot_every: Option<u64>,
}

impl ClusterConfig {
    /// The defaults: cluster `gantry`, one controller, three agents.
    pub fn new(gantry_binary: impl Into<PathBuf>) -> Self {
        ClusterConfig {
            name: "gantry".to_string(),
            controllers: 1,
            agents: 3,
            subnet: None,
            gantry_binary: gantry_binary.into(),
            base_dir: None,
            state_root: PathBuf::from(DEFAULT_STATE_ROOT),
            agent_cpus: None,
            agent_memory: None,
            context_file: None,
            readiness: Readiness::NodesReady,
            ready_timeout: Duration::from_secs(30),
            commands: None,
            snapshot_every: None,
        }
    }
}

/// What `ls` shows about a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStatus {
    /// `c1`, `n1`, …
    pub name: String,
    /// Controller or agent.
    pub role: Role,
    /// Its address.
    pub address: Ipv4Addr,
    /// Its process's PID while that process lives.
    pub pid: Option<i32>,
    /// The process's state.
    pub process: ProcessState,
    /// Whether its link is cut.
    pub partitioned: bool,
}

impl HostStatus {
    /// `running`, `stopped`, `killed`, `partitioned` or `stopped,partitioned`.
    pub fn state_word(&self) -> String {
        match (self.process, self.partitioned) {
            (ProcessState::Running, true) => "partitioned".to_string(),
            (p, true) => format!("{p},partitioned"),
            (p, false) => p.to_string(),
        }
    }
}

/// A host process's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    /// Alive and not stopped.
    Running,
    /// SIGSTOPped.
    Stopped,
    /// Not running (killed, crashed or never started).
    Killed,
}

impl std::fmt::Display for ProcessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProcessState::Running => "running",
            ProcessState::Stopped => "stopped",
            ProcessState::Killed => "killed",
        })
    }
}

/// A running dev cluster. Dropping one made by [`Cluster::up`] tears it
/// down; one from [`Cluster::open`] (another invocation's cluster) is left
/// as it is, and [`Cluster::detach`] keeps an `up` one running.
#[derive(Debug)]
pub struct Cluster {
    record: ClusterRecord,
    state_dir: PathBuf,
    /// Processes this process started, so that killed ones are reaped rather
    /// than left as zombies while the test that made them runs.
    children: HashMap<String, Child>,
    down_on_drop: bool,
    _lock: Option<state::Lock>,
}

impl Cluster {
    /// Builds the cluster and waits until it is ready (per
    /// [`ClusterConfig::readiness`]). On failure everything built so far is
    /// torn down and the error carries the hosts' last log lines.
    pub fn up(config: ClusterConfig) -> Result<Cluster> {
        validate_name(&config.name)?;
        let state_dir = config.state_root.join(&config.name);
        let result = Cluster::build(config);
        if result.is_err() && !state_dir.join("cluster.json").exists() {
            // Refused before anything was recorded: only the lock file is
            // there, and it should not outlive the attempt.
            let _ = std::fs::remove_dir_all(&state_dir);
        }
        result
    }

    fn build(config: ClusterConfig) -> Result<Cluster> {
        if config.controllers == 0 {
            return Err(ClusterError::InvalidConfig {
                reason: "at least one controller is needed".into(),
            });
        }
        let state_dir = config.state_root.join(&config.name);
        let lock = state::lock(&state_dir.join("lock"))?;
        let state_file = state_dir.join("cluster.json");
        if state_file.exists() {
            return Err(ClusterError::AlreadyUp {
                name: config.name.clone(),
                what: format!("{} exists", state_file.display()),
            });
        }
        let base_dir = config
            .base_dir
            .clone()
            .unwrap_or_else(|| Path::new(DEFAULT_BASE_ROOT).join(&config.name));
        let bridge = format!("gtd-{}", config.name);
        let hosts = plan_hosts(&config);
        if let Some(leftover) = leftovers(&config.name, &bridge) {
            return Err(ClusterError::AlreadyUp {
                name: config.name.clone(),
                what: leftover,
            });
        }

        // Choosing a subnet and claiming it (the bridge's address) happen
        // under one machine-wide lock so that clusters made at the same time
        // (parallel tests) never pick the same one.
        let alloc_lock = state::lock(&config.state_root.join(".subnets.lock"))?;
        let subnet = choose_subnet(&config)?;
        let record = ClusterRecord {
            name: config.name.clone(),
            subnet,
            bridge: bridge.clone(),
            base_dir: base_dir.clone(),
            gantry_binary: config.gantry_binary.clone(),
            context_file: None,
            hosts: assign_addresses(hosts, &subnet, &config)?,
        };
        // Recorded before anything exists, so `down` can clean up after an
        // `up` that was interrupted half way.
        state::write_json(&state_file, &record)?;
        let mut cluster = Cluster {
            record,
            state_dir,
            children: HashMap::new(),
            down_on_drop: true,
            _lock: Some(lock),
        };
        let gateway = subnet.nth(1).ok_or_else(|| ClusterError::InvalidConfig {
            reason: format!("subnet {subnet} has no room for the bridge"),
        })?;
        net::create_bridge(&bridge, gateway, subnet.prefix)?;
        drop(alloc_lock);

        for host in &cluster.record.hosts {
            let alias = format!("gantry dev cluster {} host {}", config.name, host.name);
            net::create_host(&net::HostNet {
                netns: &host.netns,
                veth: &host.veth,
                bridge: &bridge,
                address: host.address,
                gateway,
                prefix: subnet.prefix,
                alias: &alias,
            })?;
            std::fs::create_dir_all(&host.data_dir).map_err(|source| state::StateError::Io {
                action: "create",
                path: host.data_dir.clone(),
                source,
            })?;
        }

        let controllers: Vec<String> = cluster.hosts_with(Role::Controller);
        for (i, host) in controllers.iter().enumerate() {
            cluster.spawn_host(host)?;
            if config.readiness == Readiness::Started {
                continue;
            }
            if i == 0 {
                cluster.wait_controller_port(config.ready_timeout)?;
            }
            // One at a time, each a member before the next asks: Raft
            // changes its membership one member at a time.
            if controllers.len() > 1 && config.commands.is_none() {
                cluster.wait_members(i + 1, config.ready_timeout)?;
            }
        }
        for host in cluster.hosts_with(Role::Agent) {
            cluster.spawn_host(&host)?;
        }
        if config.readiness == Readiness::NodesReady {
            cluster.wait_nodes_ready(config.ready_timeout)?;
        }
        if let Some(path) = &config.context_file {
            let endpoint = cluster.controller_endpoint();
            state::write_json(
                path,
                &Context {
                    controller: endpoint,
                    controllers: cluster.controller_endpoints(),
                    source: state::context_source(&config.name),
                },
            )?;
            cluster.record.context_file = Some(path.clone());
            cluster.save()?;
        }
        // Later invocations (`gantry dev cluster kill n2`, a test's own CLI
        // calls) take the lock per command; holding it for the cluster's
        // life would block them.
        cluster._lock = None;
        Ok(cluster)
    }

    /// Opens the cluster another invocation made (to fault it, list it or
    /// take it down). Dropping the result leaves the cluster running.
    pub fn open(name: &str, state_root: &Path) -> Result<Cluster> {
        validate_name(name)?;
        let state_dir = state_root.join(name);
        let state_file = state_dir.join("cluster.json");
        if !state_file.exists() {
            return Err(ClusterError::NotUp {
                name: name.to_string(),
                path: state_file,
            });
        }
        let lock = state::lock(&state_dir.join("lock"))?;
        let record = state::load(&state_file)?.ok_or_else(|| ClusterError::NotUp {
            name: name.to_string(),
            path: state_file.clone(),
        })?;
        Ok(Cluster {
            record,
            state_dir,
            children: HashMap::new(),
            down_on_drop: false,
            _lock: Some(lock),
        })
    }

    /// Tears down the cluster named `name`, recorded or not: with a record,
    /// as [`Cluster::down`]; without one, whatever of its network is left
    /// (netns named `gantry-<name>-c<i>|n<i>`, bridge `gtd-<name>`) is
    /// deleted, and no process is signalled (none is known to be ours).
    /// Returns whether there was anything to tear down.
    pub fn down_named(name: &str, state_root: &Path) -> Result<bool> {
        validate_name(name)?;
        match Cluster::open(name, state_root) {
            Ok(cluster) => cluster.down().map(|()| true),
            Err(ClusterError::NotUp { .. }) => {
                let mut problems = Vec::new();
                let mut found = false;
                for ns in net::netns_list() {
                    if is_host_netns(name, &ns) {
                        found = true;
                        if let Err(e) = net::delete_netns(&ns) {
                            problems.push(e.to_string());
                        }
                    }
                }
                let bridge = format!("gtd-{name}");
                if net::link_exists(&bridge) {
                    found = true;
                    if let Err(e) = net::delete_link(&bridge) {
                        problems.push(e.to_string());
                    }
                }
                let _ = std::fs::remove_dir_all(state_root.join(name));
                if problems.is_empty() {
                    Ok(found)
                } else {
                    Err(ClusterError::Teardown {
                        name: name.to_string(),
                        problems,
                    })
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Re-reads the record, to see what another invocation (`gantry dev
    /// cluster kill n2` in another process) changed.
    pub fn reload(&mut self) -> Result<()> {
        let path = self.state_dir.join("cluster.json");
        self.record = state::load(&path)?.ok_or_else(|| ClusterError::NotUp {
            name: self.record.name.clone(),
            path,
        })?;
        Ok(())
    }

    /// Keeps the cluster running after this value is dropped (the CLI's `up`).
    pub fn detach(mut self) {
        self.down_on_drop = false;
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// The record (as in the state file).
    pub fn record(&self) -> &ClusterRecord {
        &self.record
    }

    /// The first controller's API address, `addr:7070`.
    pub fn controller_endpoint(&self) -> String {
        self.record
            .controller_endpoint()
            .unwrap_or_else(|| format!("0.0.0.0:{CONTROLLER_PORT}"))
    }

    /// Every controller's API address, `c1` first.
    pub fn controller_endpoints(&self) -> Vec<String> {
        self.record
            .hosts
            .iter()
            .filter(|h| h.role == Role::Controller)
            .map(|h| format!("{}:{CONTROLLER_PORT}", h.address))
            .collect()
    }

    /// What the CLI is pointed at: every controller, as a comma list (the
    /// CLI takes the first that answers and knows a leader).
    fn cli_controllers(&self) -> String {
        let all = self.controller_endpoints();
        if all.is_empty() {
            self.controller_endpoint()
        } else {
            all.join(",")
        }
    }

    /// The controllers as `gantry cluster controllers -o json` lists them
    /// (raft id, address, role, term, applied, leader), asked of `via` (a
    /// controller host) or, with `None`, of whichever answers first.
    pub fn controllers(&self, via: Option<&str>) -> Result<serde_json::Value> {
        let target = match via {
            Some(host) => format!("{}:{CONTROLLER_PORT}", self.host_addr(host)?),
            None => self.cli_controllers(),
        };
        let mut cmd = Command::new(&self.record.gantry_binary);
        cmd.args([
            "--controller",
            &target,
            "cluster",
            "controllers",
            "-o",
            "json",
        ]);
        let out = output_within(cmd, Duration::from_secs(5))?;
        if !out.status.success() {
            return Err(ClusterError::Command {
                program: format!(
                    "{} cluster controllers",
                    self.record.gantry_binary.display()
                ),
                source: std::io::Error::other(
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ),
            });
        }
        serde_json::from_slice(&out.stdout).map_err(|e| ClusterError::Command {
            program: format!(
                "{} cluster controllers",
                self.record.gantry_binary.display()
            ),
            source: std::io::Error::other(format!("unreadable output: {e}")),
        })
    }

    /// The leader's host name (`c2`), as controller `via` (or any) sees it.
    pub fn leader(&self, via: Option<&str>) -> Result<Option<String>> {
        let list = self.controllers(via)?;
        let leader_address = list["controllers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["leader"].as_bool() == Some(true))
            .and_then(|c| c["address"].as_str().map(str::to_string));
        Ok(leader_address.and_then(|a| {
            self.record
                .hosts
                .iter()
                .find(|h| format!("{}:{CONTROLLER_PORT}", h.address) == a)
                .map(|h| h.name.clone())
        }))
    }

    /// Waits until the controllers have `count` members and a leader.
    pub fn wait_members(&self, count: usize, timeout: Duration) -> Result<()> {
        let mut last = String::new();
        wait_for(
            &format!("{count} controllers to be members with a leader"),
            timeout,
            || match self.controllers(Some("c1")) {
                Ok(list) => {
                    let members = list["controllers"].as_array().map_or(0, Vec::len);
                    last = format!("{members} members, leader {}", list["leader_id"]);
                    members == count && list["leader_id"].as_u64().unwrap_or(0) != 0
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            },
        )
        .map_err(|e| match e {
            ClusterError::Timeout {
                what,
                waited,
                detail,
            } => self.with_logs(ClusterError::Timeout {
                what,
                waited,
                detail: format!("{detail} (last: {last})"),
            }),
            e => e,
        })
    }

    /// A host's address.
    pub fn host_addr(&self, host: &str) -> Result<Ipv4Addr> {
        Ok(self.host(host)?.address)
    }

    /// A host's data directory (its process's `--data-dir`).
    pub fn host_data_dir(&self, host: &str) -> Result<PathBuf> {
        Ok(self.host(host)?.data_dir.clone())
    }

    /// A host's log (its process's stdout and stderr).
    pub fn host_log(&self, host: &str) -> Result<PathBuf> {
        Ok(self.host(host)?.log.clone())
    }

    /// The host names of a role, in order.
    pub fn hosts_with(&self, role: Role) -> Vec<String> {
        self.record
            .hosts
            .iter()
            .filter(|h| h.role == role)
            .map(|h| h.name.clone())
            .collect()
    }

    /// Every host's state, as `gantry dev cluster ls` prints it.
    pub fn status(&self) -> Vec<HostStatus> {
        self.record
            .hosts
            .iter()
            .map(|h| {
                let liveness = h.process.map(process::liveness).unwrap_or(Liveness::Dead);
                let process = match liveness {
                    Liveness::Running => ProcessState::Running,
                    Liveness::Stopped => ProcessState::Stopped,
                    Liveness::Dead => ProcessState::Killed,
                };
                HostStatus {
                    name: h.name.clone(),
                    role: h.role,
                    address: h.address,
                    pid: h
                        .process
                        .filter(|_| liveness != Liveness::Dead)
                        .map(|p| p.pid),
                    process,
                    partitioned: net::is_partitioned(&h.netns).unwrap_or(false),
                }
            })
            .collect()
    }

    /// Runs the `gantry` CLI against this cluster (`--controller` set) from
    /// the root netns and returns what it printed.
    pub fn gantry(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.record.gantry_binary)
            .arg("--controller")
            .arg(self.cli_controllers())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ClusterError::Command {
                program: self.record.gantry_binary.display().to_string(),
                source,
            })
    }

    /// [`Cluster::gantry`], killed if it has not finished within `limit` (a
    /// CLI call against a stopped or partitioned controller may hang).
    pub fn gantry_within(&self, args: &[&str], limit: Duration) -> Result<Output> {
        let mut cmd = Command::new(&self.record.gantry_binary);
        cmd.arg("--controller")
            .arg(self.cli_controllers())
            .args(args);
        output_within(cmd, limit)
    }

    /// Each node's status by hostname (`ready`, `down`, …) as `gantry node ls
    /// -o json` reports it; the hostnames are the host names (`n1`, …).
    pub fn node_statuses(&self) -> Result<std::collections::BTreeMap<String, String>> {
        let out = self.gantry_within(&["node", "ls", "-o", "json"], Duration::from_secs(5))?;
        if !out.status.success() {
            return Err(ClusterError::Command {
                program: format!("{} node ls", self.record.gantry_binary.display()),
                source: std::io::Error::other(
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ),
            });
        }
        Ok(node_statuses(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .collect())
    }

    /// Waits until `gantry node ls` reports node `host` as `status` (e.g.
    /// `down` after `kill`, `ready` after `start`).
    pub fn wait_node_status(&self, host: &str, status: &str, timeout: Duration) -> Result<()> {
        self.host(host)?;
        wait_for(&format!("node {host} to be {status}"), timeout, || {
            self.node_statuses()
                .map(|m| m.get(host).map(String::as_str) == Some(status))
                .unwrap_or(false)
        })
        .map_err(|e| self.with_logs(e))
    }

    /// A command that will run in `host`'s network namespace (and the
    /// machine's mount namespace).
    pub fn command_in(&self, host: &str, program: &str) -> Result<Command> {
        Ok(net::command_in(&self.host(host)?.netns, program)?)
    }

    /// Runs `argv` in `host`'s network namespace and returns what it printed,
    /// e.g. `exec_in("n1", &["busybox", "wget", "-qO-", "http://10.251.0.3:8080/"])`.
    pub fn exec_in(&self, host: &str, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| ClusterError::InvalidConfig {
                reason: "exec_in needs a program".into(),
            })?;
        self.command_in(host, program)?
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ClusterError::Command {
                program: program.to_string(),
                source,
            })
    }

    /// `kill -9` of the host's Gantry process (and the helpers it forked).
    /// Its containers keep running, as when an agent crashes: their shims are
    /// detached, and a restarted agent adopts them.
    pub fn kill(&mut self, host: &str) -> Result<()> {
        let h = self.host(host)?.clone();
        if let Some(id) = h.process {
            process::kill(host, id, self.children.get_mut(host))?;
            self.children.remove(host);
        }
        Ok(())
    }

    /// SIGSTOP of the host's Gantry process group: it holds its sockets but
    /// answers nothing, like a hung machine.
    /// A killed host stays killed.
    pub fn stop(&mut self, host: &str) -> Result<()> {
        let h = self.host(host)?.clone();
        if let Some(id) = h.process {
            process::signal_group(id, nix::sys::signal::Signal::SIGSTOP);
            wait_for(
                &format!("host {host} to stop"),
                Duration::from_secs(5),
                || process::liveness(id) != Liveness::Running,
            )?;
        }
        Ok(())
    }

    /// Brings a host's process back: SIGCONT when stopped, a new process
    /// (same command, same data) when killed; nothing when running.
    pub fn start(&mut self, host: &str) -> Result<()> {
        let h = self.host(host)?.clone();
        match h.process.map(process::liveness).unwrap_or(Liveness::Dead) {
            Liveness::Running => Ok(()),
            Liveness::Stopped => {
                if let Some(id) = h.process {
                    process::signal_group(id, nix::sys::signal::Signal::SIGCONT);
                }
                Ok(())
            }
            Liveness::Dead => self.spawn_host(host),
        }
    }

    /// Cuts the host's link: every packet through its `eth0` is dropped
    /// (nftables table `inet gantry-dev` in its netns).
    pub fn partition(&mut self, host: &str) -> Result<()> {
        Ok(net::partition(&self.host(host)?.netns)?)
    }

    /// Restores the host's link.
    pub fn heal(&mut self, host: &str) -> Result<()> {
        Ok(net::heal(&self.host(host)?.netns)?)
    }

    /// The last `lines` lines of a host's log (for failure messages).
    pub fn log_tail(&self, host: &str, lines: usize) -> String {
        let Ok(h) = self.host(host) else {
            return String::new();
        };
        let text = std::fs::read_to_string(&h.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Tears the cluster down; see [`Cluster::down_ref`].
    pub fn down(mut self) -> Result<()> {
        self.down_on_drop = false;
        self.down_ref()
    }

    /// Tears the cluster down: SIGKILL of every recorded process (by PID and
    /// start time, so never another process), removal of the agents'
    /// containers (`gantry container ps -a -q` / `rm -f` with the host's
    /// data dir, inside its netns, which stops shims, unmounts root
    /// filesystems and removes cgroups), then the hosts' namespaces (their
    /// links and nftables tables go with them), the bridge, the data, the
    /// context file (only if this cluster wrote it) and the record.
    /// Idempotent; every step runs even when an earlier one failed, and the
    /// error lists them all.
    pub fn down_ref(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        let hosts = self.record.hosts.clone();
        for h in &hosts {
            if let Some(id) = h.process
                && let Err(e) = process::kill(&h.name, id, self.children.get_mut(&h.name))
            {
                problems.push(e.to_string());
            }
            self.children.remove(&h.name);
        }
        for h in hosts.iter().filter(|h| h.role == Role::Agent) {
            if let Err(e) = self.remove_containers(h) {
                problems.push(e);
            }
        }
        if let Err(e) = unmount_under(&self.record.base_dir) {
            problems.push(e);
        }
        for h in &hosts {
            if let Err(e) = net::delete_link(&h.veth) {
                problems.push(e.to_string());
            }
            if let Err(e) = net::delete_netns(&h.netns) {
                problems.push(e.to_string());
            }
        }
        if let Err(e) = net::delete_link(&self.record.bridge) {
            problems.push(e.to_string());
        }
        if let Err(e) = remove_tree_same_fs(&self.record.base_dir) {
            problems.push(e);
        }
        if let Some(path) = &self.record.context_file
            && let Err(e) = state::remove_context(path, &state::context_source(&self.record.name))
        {
            problems.push(e.to_string());
        }
        if let Err(e) = std::fs::remove_dir_all(&self.state_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("remove {}: {e}", self.state_dir.display()));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::Teardown {
                name: self.record.name.clone(),
                problems,
            })
        }
    }

    fn host(&self, host: &str) -> Result<&HostRecord> {
        self.record
            .hosts
            .iter()
            .find(|h| h.name == host)
            .ok_or_else(|| ClusterError::UnknownHost {
                cluster: self.record.name.clone(),
                host: host.to_string(),
                hosts: self
                    .record
                    .hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    fn save(&self) -> Result<()> {
        Ok(state::write_json(
            &self.state_dir.join("cluster.json"),
            &self.record,
        )?)
    }

    fn spawn_host(&mut self, host: &str) -> Result<()> {
        let h = self.host(host)?.clone();
        let (id, child) = process::spawn(&process::Spawn {
            host: &h.name,
            netns: &h.netns,
            argv: &h.argv,
            env: &h.env,
            log: &h.log,
        })?;
        self.children.insert(h.name.clone(), child);
        if let Some(rec) = self.record.hosts.iter_mut().find(|r| r.name == host) {
            rec.process = Some(id);
        }
        self.save()
    }

    fn logs_detail(&self) -> String {
        let mut detail = String::new();
        for h in &self.record.hosts {
            let tail = self.log_tail(&h.name, 5);
            if !tail.is_empty() {
                detail.push_str(&format!("\n--- {} ({}):\n{tail}", h.name, h.log.display()));
            }
        }
        detail
    }

    fn wait_controller_port(&self, timeout: Duration) -> Result<()> {
        let addr: SocketAddr =
            self.controller_endpoint()
                .parse()
                .map_err(|_| ClusterError::InvalidConfig {
                    reason: format!("bad controller endpoint {}", self.controller_endpoint()),
                })?;
        wait_for(
            &format!("the controller to accept connections on {addr}"),
            timeout,
            || TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok(),
        )
        .map_err(|e| self.with_logs(e))
    }

    fn wait_nodes_ready(&self, timeout: Duration) -> Result<()> {
        let agents = self.hosts_with(Role::Agent);
        let mut last = String::new();
        let result = wait_for(
            &format!("nodes {} to be ready", agents.join(", ")),
            timeout,
            || match self.gantry_within(&["node", "ls", "-o", "json"], Duration::from_secs(5)) {
                Ok(out) if out.status.success() => {
                    let ready = ready_nodes(&String::from_utf8_lossy(&out.stdout));
                    last = format!("ready: {}", ready.join(", "));
                    agents.iter().all(|a| ready.contains(a))
                }
                Ok(out) => {
                    last = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    false
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            },
        );
        result.map_err(|e| match e {
            ClusterError::Timeout {
                what,
                waited,
                detail,
            } => self.with_logs(ClusterError::Timeout {
                what,
                waited,
                detail: format!("{detail} (last `gantry node ls`: {last})"),
            }),
            e => e,
        })
    }

    fn with_logs(&self, e: ClusterError) -> ClusterError {
        match e {
            ClusterError::Timeout {
                what,
                waited,
                detail,
            } => ClusterError::Timeout {
                what,
                waited,
                detail: format!("{detail}{}", self.logs_detail()),
            },
            e => e,
        }
    }

    /// Removes an agent's containers with the CLI, inside the host's netns
    /// (the engine tears down container networking where it set it up).
    fn remove_containers(&self, h: &HostRecord) -> Result<(), String> {
        if !h.data_dir.join("containers").exists() {
            return Ok(());
        }
        let run = |args: &[&str]| -> Result<Output, String> {
            let mut cmd =
                net::command_in(&h.netns, &self.record.gantry_binary).map_err(|e| e.to_string())?;
            cmd.args(args)
                .env("GANTRY_DATA_DIR", &h.data_dir)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("gantry {}: {e}", args.join(" ")))
        };
        let ps = run(&["container", "ps", "-a", "-q"])?;
        if !ps.status.success() {
            return Err(format!(
                "gantry container ps on host {}: {}",
                h.name,
                String::from_utf8_lossy(&ps.stderr).trim()
            ));
        }
        let ids: Vec<String> = String::from_utf8_lossy(&ps.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut args = vec!["container", "rm", "-f"];
        args.extend(ids.iter().map(String::as_str));
        let rm = run(&args)?;
        if !rm.status.success() {
            return Err(format!(
                "gantry container rm -f on host {}: {}",
                h.name,
                String::from_utf8_lossy(&rm.stderr).trim()
            ));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.down_on_drop
            && let Err(e) = self.down_ref()
        {
            eprintln!("gantry dev cluster: {e}");
        }
    }
}

/// Runs `cmd` to completion, capturing its output, or kills it once `limit`
/// has passed (then the output so far comes back with a failed status and a
/// note on stderr).
pub fn output_within(mut cmd: Command, limit: Duration) -> Result<Output> {
    use std::io::Read;
    let program = cmd.get_program().to_string_lossy().into_owned();
    let spawn_err = |source| ClusterError::Command {
        program: program.clone(),
        source,
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    // Readers on their own threads, so a child filling a pipe never blocks
    // on us while we wait for it.
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(spawn_err)? {
            break status;
        }
        if start.elapsed() >= limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().map_err(spawn_err)?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out.join().unwrap_or_default();
    let mut stderr = err.join().unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(format!("\n{program} killed after {limit:?}\n").as_bytes());
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Polls `condition` every 50 ms until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    // Bounded in count as well as time, whatever the clock does.
    let max_polls = timeout.as_millis() / 50 + 2;
    for _ in 0..max_polls {
        if condition() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(ClusterError::Timeout {
        what: what.to_string(),
        waited: start.elapsed(),
        detail: String::new(),
    })
}
/// Why a dev cluster cannot be built here, if it cannot: it needs
/// iproute2's `ip` and nftables' `nft` (root and busybox are the callers' to
/// check, as the stand-in and real-process tests need different things).
pub fn missing_network_tools() -> Option<&'static str> {
    for (tool, reason) in [
        ("ip", "needs iproute2 (ip)"),
        ("nft", "needs nftables (nft)"),
    ] {
        let found = std::process::Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(reason);
        }
    }
    None
}

/// A cluster name no other cluster of this process, nor (very likely) of a
/// concurrent one, uses: `<prefix><pid>-<n>`, within [`MAX_NAME_LEN`].
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id() % 100_000;
    let mut name = format!("{prefix}{pid}-{n}");
    name.truncate(MAX_NAME_LEN);
    name
}

/// Each node's hostname and status (lowercased) from `gantry node ls -o
/// json`: a JSON array (or `{"nodes": [...]}`) of objects whose `hostname`
/// (or `name`) names the node and whose `status` (or `state`; a string or
/// `{"state": ...}`) says how it is.
pub fn node_statuses(json: &str) -> Vec<(String, String)> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let nodes = match &value {
        serde_json::Value::Array(a) => a.clone(),
        serde_json::Value::Object(o) => o
            .get("nodes")
            .and_then(|n| n.as_array())
            .cloned()
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    nodes
        .iter()
        .filter_map(|n| {
            let name = n.get("hostname").or_else(|| n.get("name"))?.as_str()?;
            let state = n.get("status").or_else(|| n.get("state"))?;
            let state = state
                .as_str()
                .or_else(|| state.get("state").and_then(|s| s.as_str()))?;
            Some((name.to_string(), state.to_ascii_lowercase()))
        })
        .collect()
}

/// The nodes [`node_statuses`] reports `ready`.
pub fn ready_nodes(json: &str) -> Vec<String> {
    node_statuses(json)
        .into_iter()
        .filter(|(_, status)| status == "ready")
        .map(|(name, _)| name)
        .collect()
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ClusterError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// Whether `netns` is a host namespace of cluster `name`:
/// `gantry-<name>-c<digits>` or `gantry-<name>-n<digits>`.
fn is_host_netns(name: &str, netns: &str) -> bool {
    let Some(rest) = netns
        .strip_prefix("gantry-")
        .and_then(|r| r.strip_prefix(name))
        .and_then(|r| r.strip_prefix('-'))
    else {
        return false;
    };
    let mut chars = rest.chars();
    matches!(chars.next(), Some('c' | 'n'))
        && !chars.as_str().is_empty()
        && chars.all(|c| c.is_ascii_digit())
}

fn leftovers(name: &str, bridge: &str) -> Option<String> {
    if net::link_exists(bridge) {
        return Some(format!("bridge {bridge} exists"));
    }
    net::netns_list()
        .into_iter()
        .find(|ns| is_host_netns(name, ns))
        .map(|ns| format!("network namespace {ns} exists"))
}

/// 32-bit FNV-1a: a stable hash for names (std's hasher is randomized).
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Hosts without addresses or commands yet.
fn plan_hosts(config: &ClusterConfig) -> Vec<(String, Role)> {
    let mut hosts = Vec::new();
    for i in 1..=config.controllers {
        hosts.push((format!("c{i}"), Role::Controller));
    }
    for i in 1..=config.agents {
        hosts.push((format!("n{i}"), Role::Agent));
    }
    hosts
}

fn choose_subnet(config: &ClusterConfig) -> Result<Subnet> {
    let used = net::used_subnets()?;
    let clash = |s: &Subnet| used.iter().find(|u| u.overlaps(s)).copied();
    if let Some(subnet) = config.subnet {
        return match clash(&subnet) {
            Some(u) => Err(ClusterError::SubnetInUse {
                name: config.name.clone(),
                subnet,
                used: u,
            }),
            None => Ok(subnet),
        };
    }
    let start = if config.name == "gantry" {
        0
    } else {
        1 + fnv(&config.name) % 255
    };
    let mut last = None;
    for i in 0..256u32 {
        let third = (start + i) % 256;
        let subnet = Subnet {
            network: Ipv4Addr::new(10, 251, third as u8, 0),
            prefix: 24,
        };
        match clash(&subnet) {
            None => return Ok(subnet),
            Some(u) => last = Some((subnet, u)),
        }
    }
    let (subnet, used) = last.unwrap_or((
        Subnet {
            network: Ipv4Addr::new(10, 251, 0, 0),
            prefix: 24,
        },
        Subnet {
            network: Ipv4Addr::new(10, 251, 0, 0),
            prefix: 16,
        },
    ));
    Err(ClusterError::SubnetInUse {
        name: config.name.clone(),
        subnet,
        used,
    })
}

fn assign_addresses(
    hosts: Vec<(String, Role)>,
    subnet: &Subnet,
    config: &ClusterConfig,
) -> Result<Vec<HostRecord>> {
    let base_dir = config
        .base_dir
        .clone()
        .unwrap_or_else(|| Path::new(DEFAULT_BASE_ROOT).join(&config.name));
    // .1 is the bridge; hosts follow in order, so c1 is .2 as users expect.
    let addresses: Vec<Ipv4Addr> = (0..hosts.len() as u32)
        .map(|i| {
            subnet
                .nth(i + 2)
                .ok_or_else(|| ClusterError::InvalidConfig {
                    reason: format!("subnet {subnet} is too small for {} hosts", hosts.len()),
                })
        })
        .collect::<Result<_>>()?;
    let controller = format!("{}:{CONTROLLER_PORT}", addresses[0]);
    let every_controller: Vec<String> = hosts
        .iter()
        .zip(&addresses)
        .filter(|((_, role), _)| *role == Role::Controller)
        .map(|(_, a)| format!("{a}:{CONTROLLER_PORT}"))
        .collect();
    let gantry = config.gantry_binary.display().to_string();
    let log_level = std::env::var("GANTRY_LOG").unwrap_or_else(|_| "info".to_string());
    hosts
        .into_iter()
        .zip(addresses)
        .map(|((name, role), address)| {
            let data_dir = base_dir.join(&name);
            let data = data_dir.display().to_string();
            let argv = match (&config.commands, role) {
                (Some(c), Role::Controller) => c.controller.clone(),
                (Some(c), Role::Agent) => c.agent.clone(),
                (None, Role::Controller) => {
                    let mut argv = vec![
                        gantry.clone(),
                        "controller".into(),
                        "--listen".into(),
                        format!("{address}:{CONTROLLER_PORT}"),
                        "--data-dir".into(),
                        data.clone(),
                    ];
                    // c2..cN join c1. A restart keeps the flag: a controller
                    // whose data dir holds a cluster restarts as that member
                    // and ignores --join.
                    if name != "c1" {
                        argv.extend(["--join".into(), controller.clone()]);
                    }
                    argv
                }
                (None, Role::Agent) => {
                    let mut argv = vec![
                        gantry.clone(),
                        "agent".into(),
                        "--join".into(),
                        every_controller.join(","),
                        "--hostname".into(),
                        name.clone(),
                        "--advertise".into(),
                        address.to_string(),
                        "--data-dir".into(),
                        data.clone(),
                    ];
                    if let Some(cpus) = &config.agent_cpus {
                        argv.extend(["--cpus".into(), cpus.clone()]);
                    }
                    if let Some(memory) = &config.agent_memory {
                        argv.extend(["--memory".into(), memory.clone()]);
                    }
                    argv
                }
            };
            let argv = argv
                .into_iter()
                .map(|w| {
                    w.replace("{host}", &name)
                        .replace("{addr}", &address.to_string())
                        .replace("{controller}", &controller)
                        .replace("{data_dir}", &data)
                })
                .collect();
            let veth = format!("gtv{:08x}", fnv(&format!("{}/{name}", config.name)));
            if net::link_exists(&veth) {
                return Err(ClusterError::AlreadyUp {
                    name: config.name.clone(),
                    what: format!("link {veth} exists"),
                });
            }
            Ok(HostRecord {
                netns: format!("gantry-{}-{name}", config.name),
                veth,
                log: data_dir.join("gantry.log"),
                env: [
                    ("GANTRY_DATA_DIR".into(), data.clone()),
                    ("GANTRY_LOG".into(), log_level.clone()),
                    // The log is a file: no terminal colour codes in it.
                    ("NO_COLOR".into(), "1".into()),
                ]
                .into_iter()
                .chain(
                    config
                        .snapshot_every
                        .filter(|_| role == Role::Controller)
                        .map(|n| ("GANTRY_SNAPSHOT_EVERY".into(), n.to_string())),
                )
                .collect(),
                data_dir,
                name,
                role,
                address,
                argv,
                process: None,
            })
        })
        .collect()
}

/// Mount points at or under `dir`, from our mountinfo (the hosts' processes
/// share the machine's mount namespace, so their mounts show here).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect()
}

fn unescape_mount_path(p: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let bytes = p.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount under `dir`, deepest first: what container removal
/// did not unmount (a crashed shim's rootfs) must not be under the tree we
/// delete next.
fn unmount_under(dir: &Path) -> Result<(), String> {
    let mut mounts = mounts_under(dir);
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let mut problems = Vec::new();
    for m in mounts {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            problems.push(format!("umount {}: {e}", m.display()));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Removes `dir` without crossing into other filesystems: a mount point still
/// there (a bind mount of a user's directory into a container) is left, and
/// reported, rather than emptied.
fn remove_tree_same_fs(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let root = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("stat {}: {e}", dir.display())),
    };
    fn walk(path: &Path, dev: u64, skipped: &mut Vec<String>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let p = entry.path();
            let meta = std::fs::symlink_metadata(&p)?;
            if meta.is_dir() {
                if meta.dev() != dev {
                    skipped.push(p.display().to_string());
                    continue;
                }
                walk(&p, dev, skipped)?;
                if let Err(e) = std::fs::remove_dir(&p)
                    && !skipped.iter().any(|s| Path::new(s).starts_with(&p))
                {
                    return Err(e);
                }
            } else {
                std::fs::remove_file(&p)?;
            }
        }
        Ok(())
    }
    let mut skipped = Vec::new();
    walk(dir, root.dev(), &mut skipped).map_err(|e| format!("remove {}: {e}", dir.display()))?;
    if !skipped.is_empty() {
        return Err(format!(
            "left mount points in place: {}",
            skipped.join(", ")
        ));
    }
    std::fs::remove_dir(dir).map_err(|e| format!("remove {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interface_names() {
        assert!(validate_name("gantry").is_ok());
        assert!(validate_name("a-b1").is_ok());
        assert!(validate_name("abcdefghijk").is_ok());
        assert!(validate_name("abcdefghijkl").is_err(), "gtd-<name> > 15");
        assert!(validate_name("1abc").is_err());
        assert!(validate_name("Abc").is_err());
        assert!(validate_name("").is_err());
        let n = unique_name("t");
        assert!(validate_name(&n).is_ok(), "{n}");
        assert_ne!(unique_name("t"), unique_name("t"));
    }

    #[test]
    fn host_netns_names_match_exactly_one_cluster() {
        assert!(is_host_netns("a", "gantry-a-c1"));
        assert!(is_host_netns("a", "gantry-a-n12"));
        assert!(!is_host_netns("a", "gantry-a-b-n1"), "cluster a-b's host");
        assert!(!is_host_netns("a", "gantry-a-n"));
        assert!(!is_host_netns("a", "gantry-a-x1"));
        assert!(!is_host_netns("a", "other"));
    }

    #[test]
    fn ready_nodes_reads_the_cli_shapes() {
        let json = r#"[{"hostname":"n1","state":"ready"},{"hostname":"n2","state":"down"},
                       {"name":"n3","status":{"state":"READY"}}]"#;
        assert_eq!(ready_nodes(json), vec!["n1", "n3"]);
        assert_eq!(
            ready_nodes(r#"{"nodes":[{"hostname":"n1","status":"ready"}]}"#),
            vec!["n1"]
        );
        assert!(ready_nodes("not json").is_empty());
        // What the CLI's `node ls -o json` prints (a pretty array of rows).
        let cli = r#"[
          {"id": "a1", "hostname": "n1", "status": "ready", "availability": "active"},
          {"id": "b2", "hostname": "n2", "status": "down", "availability": "active"}
        ]"#;
        assert_eq!(
            node_statuses(cli),
            vec![("n1".into(), "ready".into()), ("n2".into(), "down".into())]
        );
    }

    #[test]
    fn hosts_get_addresses_and_commands_in_order() {
        let mut config = ClusterConfig::new("/usr/bin/gantry");
        config.agents = 2;
        config.agent_memory = Some("1g".into());
        let subnet: Subnet = DEFAULT_SUBNET.parse().unwrap();
        let hosts = assign_addresses(plan_hosts(&config), &subnet, &config).unwrap();
        let names: Vec<_> = hosts
            .iter()
            .map(|h| (h.name.as_str(), h.address.to_string()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("c1", "10.251.0.2".to_string()),
                ("n1", "10.251.0.3".to_string()),
                ("n2", "10.251.0.4".to_string())
            ]
        );
        assert_eq!(
            hosts[0].argv.join(" "),
            "/usr/bin/gantry controller --listen 10.251.0.2:7070 --data-dir /var/lib/gantry/dev/gantry/c1"
        );
        assert_eq!(
            hosts[2].argv.join(" "),
            "/usr/bin/gantry agent --join 10.251.0.2:7070 --hostname n2 --advertise 10.251.0.4 \
             --data-dir /var/lib/gantry/dev/gantry/n2 --memory 1g"
        );
        assert_eq!(hosts[1].netns, "gantry-gantry-n1");
        assert!(hosts[1].veth.len() <= 15);
    }

    #[test]
    fn stand_in_commands_get_placeholders_filled() {
        let mut config = ClusterConfig::new("/g");
        config.name = "t".into();
        config.agents = 1;
        config.base_dir = Some("/b".into());
        config.commands = Some(RoleCommands {
            controller: vec!["srv".into(), "{addr}:7070".into()],
            agent: vec![
                "cli".into(),
                "{controller}".into(),
                "{host}@{data_dir}".into(),
            ],
        });
        let subnet: Subnet = "10.251.7.0/24".parse().unwrap();
        let hosts = assign_addresses(plan_hosts(&config), &subnet, &config).unwrap();
        assert_eq!(hosts[0].argv, vec!["srv", "10.251.7.2:7070"]);
        assert_eq!(hosts[1].argv, vec!["cli", "10.251.7.2:7070", "n1@/b/n1"]);
    }

    #[test]
    fn output_within_bounds_a_hanging_command() {
        let mut echo = Command::new("sh");
        echo.args(["-c", "echo hi; echo err >&2"]);
        let out = output_within(echo, Duration::from_secs(5)).unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr, b"err\n");
        let start = Instant::now();
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let out = output_within(sleep, Duration::from_millis(200)).unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("killed after"));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn mount_paths_unescape() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }
}
