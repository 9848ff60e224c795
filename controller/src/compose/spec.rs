//! The normalized stack: what a Compose file means once interpolation is done,
//! short forms are expanded and Swarm's defaults are filled in.
//!
//! Serialized, a [`Stack`] is itself a valid Compose file in long syntax
//! (what `docker compose config` prints), so that normalizing its output again
//! gives the same stack (see [`super::to_compose_yaml`]). Every field that has
//! a default is present after normalization; optional fields that have no
//! default are `None` and left out of the output.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::units::{Bytes, Cpus, Duration};

/// A whole Compose project: its services and the volumes and networks they
/// refer to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stack {
    /// The stack's name (from `--stack`, `name:` or the project directory).
    pub name: String,
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Top-level named volumes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, VolumeSpec>,
    /// Top-level networks, including the implicit `default` once a service
    /// uses it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub networks: BTreeMap<String, NetworkSpec>,
}

/// One service: the template for its tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// The image reference, as written (resolution happens on the nodes).
    pub image: String,
    /// Replaces the image's `CMD`; `None` keeps the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's `ENTRYPOINT`; `Some([])` clears it, `None` keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Environment variables: `env_file:` entries overridden by `environment:`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    /// Published and exposed ports, one entry per target port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// Mounts in the order written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Mount>,
    /// The health check; `None` keeps the image's `HEALTHCHECK`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    /// `user[:group]` to run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The working directory (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// The container's hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Container labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Time between the stop signal and SIGKILL; `None` for the node's
    /// default (10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_period: Option<Duration>,
    /// Orchestration settings, always complete after normalization.
    pub deploy: Deploy,
    /// `host` to share the node's network namespace; `None` for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<NetworkMode>,
    /// Services this one depends on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub depends_on: BTreeMap<String, Dependency>,
    /// Networks the service joins (`default` unless it names others or uses
    /// the host's network).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub networks: BTreeMap<String, ServiceNetwork>,
}

/// A port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// The port inside the container.
    pub target: u16,
    /// The port (or range, for any one free port of it) on the nodes;
    /// `None` exposes the port without publishing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<PortRange>,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// `ingress` (every node, Swarm's routing mesh) or `host` (only the node
    /// running the task).
    pub mode: PortMode,
    /// The host address to bind, for `host` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

/// A published port or inclusive range; printed `8080` or `8000-8010`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port (equal to `start` for a single port).
    pub end: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> Self {
        r.to_string()
    }
}

impl TryFrom<String> for PortRange {
    type Error = super::ports::PortError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        super::ports::parse_range(&s, &s)
    }
}

/// A port's transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
}

/// How a port is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortMode {
    /// On every node, routed to any task (Swarm's default).
    Ingress,
    /// Only on the node running the task.
    Host,
}

/// A mount into a service's containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// What is mounted.
    #[serde(rename = "type")]
    pub kind: MountKind,
    /// The volume name or the absolute host path; `None` for an anonymous
    /// volume or a tmpfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The absolute path inside the container.
    pub target: String,
    /// Mounted read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// tmpfs options, for `type: tmpfs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs: Option<TmpfsOptions>,
}

/// The kinds of mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// A named (or anonymous) volume managed by the node.
    Volume,
    /// A host path.
    Bind,
    /// A memory-backed file system.
    Tmpfs,
}

/// Options of a tmpfs mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TmpfsOptions {
    /// Size limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Bytes>,
}

/// A health check, complete with Docker's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthcheck {
    /// `["NONE"]` (disabled), `["CMD", args…]` or `["CMD-SHELL", command]`;
    /// Gantry also takes `["HTTP", port, "/path"]` and `["TCP", port]`;
    /// empty to keep the image's test and override only the timings.
    pub test: Vec<String>,
    /// Time between checks (default 30s).
    pub interval: Duration,
    /// Time a check may take (default 30s).
    pub timeout: Duration,
    /// Consecutive failures that make the task unhealthy (default 3).
    pub retries: u64,
    /// Grace period after start during which failures do not count (default 0s).
    pub start_period: Duration,
}

impl Healthcheck {
    /// Whether this check disables the image's health check.
    pub fn is_disabled(&self) -> bool {
        self.test.first().is_some_and(|t| t == "NONE")
    }
}

/// The `deploy:` section, complete with Swarm's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deploy {
    /// `replicated` or `global`.
    pub mode: DeployMode,
    /// Number of tasks for a replicated service; `None` for a global one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u64>,
    /// CPU and memory limits and reservations.
    pub resources: Resources,
    /// When and how tasks are restarted.
    pub restart_policy: RestartPolicy,
    /// Where tasks may run.
    pub placement: Placement,
    /// How a changed service is rolled out (stored; rolling updates come later).
    pub update_config: UpdateConfig,
    /// How the service is reached by name; `None` is vip, as in Compose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_mode: Option<EndpointMode>,
}

/// `deploy.endpoint_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// A virtual IP in front of the tasks.
    Vip,
    /// DNS round robin over the tasks' addresses.
    Dnsrr,
}

/// How many tasks a service has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeployMode {
    /// A fixed number of tasks.
    Replicated,
    /// One task on every eligible node.
    Global,
}

/// Limits and reservations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Hard limits enforced by cgroups.
    #[serde(default)]
    pub limits: ResourceSpec,
    /// What the scheduler sets aside on a node for each task.
    #[serde(default)]
    pub reservations: ResourceSpec,
}

/// CPU and memory amounts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSpec {
    /// CPUs (may be fractional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Cpus>,
    /// Memory in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Bytes>,
}

/// Swarm's restart policy, which `restart:` is translated into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// When to restart.
    pub condition: RestartCondition,
    /// Wait between restarts.
    pub delay: Duration,
    /// Restarts allowed within `window` (or ever, if the window is 0s);
    /// `None` for no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u64>,
    /// How long a restart must run to count as a success; 0s counts at once.
    pub window: Duration,
}

/// When tasks are restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    /// Never.
    None,
    /// When the task exits with a non-zero code.
    OnFailure,
    /// Whenever the task ends.
    Any,
}

/// Placement rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Constraints a node must meet, all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    /// At most this many tasks of the service per node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas_per_node: Option<u64>,
}

/// One placement constraint, `key==value` or `key!=value`; printed as written
/// without spaces.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Constraint {
    /// What is compared: `node.id`, `node.hostname`, `node.role`,
    /// `node.platform.os`, `node.platform.arch`, `node.labels.<name>` or
    /// `engine.labels.<name>`.
    pub key: String,
    /// `==` or `!=`.
    pub op: ConstraintOp,
    /// The value compared with.
    pub value: String,
}

/// A constraint's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConstraintOp {
    /// `==`
    #[serde(rename = "==")]
    Eq,
    /// `!=`
    #[serde(rename = "!=")]
    Ne,
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            ConstraintOp::Eq => "==",
            ConstraintOp::Ne => "!=",
        };
        write!(f, "{}{op}{}", self.key, self.value)
    }
}

impl From<Constraint> for String {
    fn from(c: Constraint) -> Self {
        c.to_string()
    }
}

impl TryFrom<String> for Constraint {
    type Error = super::placement::ConstraintError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        super::placement::parse_constraint(&s)
    }
}

/// Rolling update settings, complete with Swarm's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Tasks updated at once (default 1; 0 means all at once).
    pub parallelism: u64,
    /// Wait between batches (default 0s).
    pub delay: Duration,
    /// What to do when an update fails (default `pause`).
    pub failure_action: FailureAction,
    /// How long to watch each updated task for failure (default 5s).
    pub monitor: Duration,
    /// Fraction of failed tasks tolerated, 0 to 1 (default 0).
    pub max_failure_ratio: f64,
    /// `stop-first` (default) or `start-first`.
    pub order: UpdateOrder,
}

/// What a failed update does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    /// Keep going.
    Continue,
    /// Roll back to the previous spec.
    Rollback,
    /// Stop and wait for the operator.
    Pause,
}

/// Whether new tasks start before old ones stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// Stop the old task, then start the new one.
    StopFirst,
    /// Start the new task, then stop the old one.
    StartFirst,
}

/// `network_mode:` values Gantry supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Share the node's network namespace.
    Host,
}

/// A `depends_on` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    /// What the dependency must reach first.
    pub condition: DependencyCondition,
    /// Restart this service when the dependency is updated.
    pub restart: bool,
    /// Whether a missing dependency is an error (otherwise a warning).
    pub required: bool,
}

/// What a dependency must reach before the dependent starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DependencyCondition {
    /// Started (the default and the list form's meaning).
    ServiceStarted,
    /// Healthy.
    ServiceHealthy,
    /// Exited with code 0.
    ServiceCompletedSuccessfully,
}

/// A service's attachment to a network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceNetwork {
    /// Extra names for the service on this network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

/// A top-level named volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// The volume driver (`local` when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The volume exists outside the stack and is not created by it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external: bool,
    /// Volume labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A top-level network (stored; networking comes with its own issue).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// The network driver (`overlay` when unset, as in Swarm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The network exists outside the stack.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external: bool,
    /// No outbound access.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub internal: bool,
    /// Standalone containers may attach.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attachable: bool,
    /// Network labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}
