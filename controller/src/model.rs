//! The cluster's typed objects: nodes, services and tasks.
//!
//! These are the plain-Rust domain types that the state machine stores, the
//! orchestrators and the scheduler read, and `proto/` converts to and from at
//! the wire boundary. Each object splits what an operator asks for (`spec`)
//! from what the cluster observed (`status`), and carries `version`, the log
//! index of the command that last changed it.
//!
//! **Invariant:** a task's observed state only moves forward
//! ([`TaskStatus::advance`] refuses anything else), so a late or replayed
//! report from an agent can never resurrect a task.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::network::Ipv4Cidr;

/// Errors from building or changing model objects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// An id was empty or contained whitespace or control characters.
    #[error("invalid {kind} id {value:?}: must be non-empty without whitespace")]
    InvalidId {
        /// Which kind of id (`node`, `service`, `task`).
        kind: &'static str,
        /// The rejected value.
        value: String,
    },
    /// A task state change would move the task backwards (or sideways
    /// between two terminal states).
    #[error("task {task}: state cannot move from {from} to {to}")]
    BackwardTransition {
        /// The task whose report was refused.
        task: TaskId,
        /// The state the task is in.
        from: TaskState,
        /// The state that was refused.
        to: TaskState,
    },
    /// A placement constraint could not be parsed.
    #[error("constraint {expr:?}: {reason}")]
    InvalidConstraint {
        /// The constraint text as written.
        expr: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Defines a typed id: a validated, non-empty string newtype that serializes
/// as a bare string, so that a `NodeId` can never be passed where a `TaskId`
/// is expected.
macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Makes an id, refusing empty values and whitespace.
            pub fn new(value: impl Into<String>) -> Result<Self, ModelError> {
                let value = value.into();
                if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(ModelError::InvalidId { kind: $kind, value });
                }
                Ok(Self(value))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = ModelError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = ModelError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

typed_id!(
    /// Identifies a node (a host running an agent).
    NodeId,
    "node"
);
typed_id!(
    /// Identifies a service.
    ServiceId,
    "service"
);
typed_id!(
    /// Identifies a task (one scheduled instance of a service).
    TaskId,
    "task"
);

// ---------------------------------------------------------------------------
// Resources

/// An amount of CPU and memory: a node's capacity, or a task's limit or
/// reservation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in billionths of a CPU (Docker's `NanoCPUs`): 1.5 CPUs is 1_500_000_000.
    #[serde(default)]
    pub nano_cpus: u64,
    /// Memory in bytes.
    #[serde(default)]
    pub memory_bytes: u64,
}

impl Resources {
    /// Whether `need` fits inside `self` on every dimension.
    pub fn fits(&self, need: &Resources) -> bool {
        need.nano_cpus <= self.nano_cpus && need.memory_bytes <= self.memory_bytes
    }

    /// `self - other`, clamped at zero on each dimension.
    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        Resources {
            nano_cpus: self.nano_cpus.saturating_sub(other.nano_cpus),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
        }
    }

    /// `self + other`, saturating on each dimension.
    pub fn saturating_add(&self, other: &Resources) -> Resources {
        Resources {
            nano_cpus: self.nano_cpus.saturating_add(other.nano_cpus),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
        }
    }
}

// ---------------------------------------------------------------------------
// Nodes

/// Whether the operator wants new work on a node (`gantry node update
/// --availability`), with Swarm's meanings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Takes new tasks.
    #[default]
    Active,
    /// Keeps its tasks but takes no new ones.
    Pause,
    /// Takes no tasks; the orchestrators move its tasks elsewhere.
    Drain,
}

/// A node's role in the cluster, for `node.role` constraints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Runs a controller replica (and usually an agent too).
    Manager,
    /// Runs an agent only.
    #[default]
    Worker,
}

impl NodeRole {
    /// The role's name as constraints spell it.
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeRole::Manager => "manager",
            NodeRole::Worker => "worker",
        }
    }
}

/// What the operator sets on a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Whether the node takes work.
    #[serde(default)]
    pub availability: Availability,
    /// The node's role.
    #[serde(default)]
    pub role: NodeRole,
    /// Operator labels (`--label-add`), matched by `node.labels.KEY` constraints.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Whether the controller hears from a node's agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Not known yet (e.g. just after a controller restart, before the first
    /// heartbeat). Tasks on it are left alone, not replaced.
    #[default]
    Unknown,
    /// Its heartbeat lease is current.
    Ready,
    /// Its heartbeat lease lapsed: its tasks are replaced elsewhere.
    Down,
}

/// A node's operating system and CPU architecture, for
/// `node.platform.os|arch` constraints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, … (the OCI names).
    pub arch: String,
}

/// What the node's agent reports about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Liveness as judged by the dispatcher.
    #[serde(default)]
    pub state: NodeState,
    /// The address the agent is reachable at.
    #[serde(default)]
    pub address: String,
    /// The host's name.
    #[serde(default)]
    pub hostname: String,
    /// The total resources the node offers to tasks.
    #[serde(default)]
    pub resources: Resources,
    /// The node's platform.
    #[serde(default)]
    pub platform: Platform,
}

/// A host running an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The node's id.
    pub id: NodeId,
    /// Operator-set fields.
    #[serde(default)]
    pub spec: NodeSpec,
    /// Agent-reported fields.
    #[serde(default)]
    pub status: NodeStatus,
    /// The log index of the command that last changed this node.
    #[serde(default)]
    pub version: u64,
    /// The node's slice of the cluster CIDR, allocated when it first joins
    /// and kept until it is removed.
    #[serde(default)]
    pub subnet: Option<Ipv4Cidr>,
}

impl Node {
    /// Whether the scheduler may place new tasks here: ready and active.
    pub fn takes_new_tasks(&self) -> bool {
        self.status.state == NodeState::Ready && self.spec.availability == Availability::Active
    }
}

// ---------------------------------------------------------------------------
// Services

/// How many tasks a service wants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// A fixed number of tasks, numbered by slot from 1.
    Replicated {
        /// How many tasks.
        replicas: u64,
    },
    /// One task per eligible node.
    Global,
}

/// Which kind of mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// A named volume managed by the engine.
    Volume,
    /// A host path.
    Bind,
    /// A memory-backed file system.
    Tmpfs,
}

/// A mount into a task's container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Volume, bind or tmpfs.
    pub kind: MountKind,
    /// Volume name or host path; absent for tmpfs and anonymous volumes.
    #[serde(default)]
    pub source: Option<String>,
    /// Path inside the container.
    pub target: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A task's resource limits and reservations (Compose's `deploy.resources`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRequirements {
    /// Hard caps enforced by cgroups on the node.
    #[serde(default)]
    pub limits: Resources,
    /// What the scheduler sets aside on a node for the task.
    #[serde(default)]
    pub reservations: Resources,
}

/// When a task's container should be restarted (Compose's
/// `restart_policy.condition`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    /// Never.
    None,
    /// When it exits with a non-zero code (or could not start).
    OnFailure,
    /// Whenever it stops (Swarm's default).
    #[default]
    Any,
}

/// A restart policy (Compose's `deploy.restart_policy`).
///
/// The split of work, which the orchestrators rely on: the **agent** applies
/// this policy in place when a container exits (delay, back-off,
/// `max_attempts` within `window`) and reports `restarts`; it marks the task
/// `failed` only when the policy says to stop. The **controller** replaces a
/// task with a new one only when the agent cannot act: the node is down or
/// drained, the task was `rejected` (could not be prepared on that node) or
/// `orphaned`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// When to restart.
    #[serde(default)]
    pub condition: RestartCondition,
    /// Wait between a stop and the restart.
    #[serde(default, with = "duration_ms")]
    pub delay: Duration,
    /// Give up after this many attempts (within `window` if set); `None` is unlimited.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// The window over which attempts are counted; `None` counts forever.
    #[serde(default, with = "opt_duration_ms")]
    pub window: Option<Duration>,
}

/// How a health check probes a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthProbe {
    /// Run a command directly in the container (`CMD`).
    Exec(Vec<String>),
    /// Run a command with `/bin/sh -c` in the container (`CMD-SHELL`).
    Shell(String),
    /// An HTTP GET to the task; healthy on a 2xx or 3xx answer.
    Http {
        /// Container port.
        port: u16,
        /// Request path.
        path: String,
    },
    /// A TCP connect to the task.
    Tcp {
        /// Container port.
        port: u16,
    },
    /// Health checking disabled (`NONE`), even if the image defines one.
    None,
}

/// A health check (Docker HEALTHCHECK semantics).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// The probe.
    pub probe: HealthProbe,
    /// Time between probes.
    #[serde(with = "duration_ms")]
    pub interval: Duration,
    /// A probe slower than this fails.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Consecutive failures before the task is unhealthy.
    pub retries: u32,
    /// Failures during this initial period do not count.
    #[serde(default, with = "duration_ms")]
    pub start_period: Duration,
}

/// Transport protocol of a published port.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How a port is published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// On every node, load-balanced to the service's tasks (Swarm's routing mesh).
    #[default]
    Ingress,
    /// On the node running the task only; two such tasks cannot share a node.
    Host,
}

/// A published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortConfig {
    /// The port on the node(s); `None` lets the node pick one.
    #[serde(default)]
    pub published: Option<u16>,
    /// The port inside the container.
    pub target: u16,
    /// TCP or UDP.
    #[serde(default)]
    pub protocol: Protocol,
    /// Ingress or host.
    #[serde(default)]
    pub mode: PublishMode,
}

/// Which comparison a constraint makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConstraintOp {
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
}

/// Which node attribute a constraint reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConstraintKey {
    /// `node.id`.
    Id,
    /// `node.hostname`.
    Hostname,
    /// `node.role`.
    Role,
    /// `node.platform.os`.
    Os,
    /// `node.platform.arch`.
    Arch,
    /// `node.labels.KEY`.
    Label(String),
}

/// A placement constraint such as `node.labels.zone==eu`.
///
/// Matching follows swarmkit: values compare case-insensitively (label keys
/// exactly), and a
/// `node.labels.KEY != value` constraint is satisfied by a node without that
/// label. Serialized as the text the operator wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Constraint {
    /// The attribute.
    pub key: ConstraintKey,
    /// The comparison.
    pub op: ConstraintOp,
    /// The value compared against.
    pub value: String,
}

impl Constraint {
    /// Parses `KEY==VALUE` or `KEY!=VALUE` (spaces around the operator allowed).
    pub fn parse(expr: &str) -> Result<Constraint, ModelError> {
        let bad = |reason: &str| ModelError::InvalidConstraint {
            expr: expr.to_string(),
            reason: reason.to_string(),
        };
        let (key, op, value) = if let Some((k, v)) = expr.split_once("==") {
            (k, ConstraintOp::Eq, v)
        } else if let Some((k, v)) = expr.split_once("!=") {
            (k, ConstraintOp::Ne, v)
        } else {
            return Err(bad("expected KEY==VALUE or KEY!=VALUE"));
        };
        let (key, value) = (key.trim(), value.trim());
        if value.is_empty() {
            return Err(bad("empty value"));
        }
        if value.contains("==") || value.contains("!=") {
            return Err(bad("more than one operator"));
        }
        let key = match key {
            "node.id" => ConstraintKey::Id,
            "node.hostname" => ConstraintKey::Hostname,
            "node.role" => ConstraintKey::Role,
            "node.platform.os" => ConstraintKey::Os,
            "node.platform.arch" => ConstraintKey::Arch,
            other => match other.strip_prefix("node.labels.") {
                Some(label) if !label.is_empty() => ConstraintKey::Label(label.to_string()),
                _ => {
                    return Err(bad(
                        "unknown key: expected node.id, node.hostname, node.role, \
                         node.platform.os, node.platform.arch or node.labels.KEY",
                    ));
                }
            },
        };
        Ok(Constraint {
            key,
            op,
            value: value.to_string(),
        })
    }

    /// Whether `node` satisfies this constraint.
    pub fn matches(&self, node: &Node) -> bool {
        let actual: Option<&str> = match &self.key {
            ConstraintKey::Id => Some(node.id.as_str()),
            ConstraintKey::Hostname => Some(&node.status.hostname),
            ConstraintKey::Role => Some(node.spec.role.as_str()),
            ConstraintKey::Os => Some(&node.status.platform.os),
            ConstraintKey::Arch => Some(&node.status.platform.arch),
            ConstraintKey::Label(k) => node.spec.labels.get(k).map(String::as_str),
        };
        let equal = actual.is_some_and(|a| a.eq_ignore_ascii_case(&self.value));
        match self.op {
            ConstraintOp::Eq => equal,
            ConstraintOp::Ne => !equal,
        }
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            ConstraintKey::Id => f.write_str("node.id")?,
            ConstraintKey::Hostname => f.write_str("node.hostname")?,
            ConstraintKey::Role => f.write_str("node.role")?,
            ConstraintKey::Os => f.write_str("node.platform.os")?,
            ConstraintKey::Arch => f.write_str("node.platform.arch")?,
            ConstraintKey::Label(k) => write!(f, "node.labels.{k}")?,
        }
        let op = match self.op {
            ConstraintOp::Eq => "==",
            ConstraintOp::Ne => "!=",
        };
        write!(f, "{op}{}", self.value)
    }
}

impl FromStr for Constraint {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Constraint::parse(s)
    }
}

impl TryFrom<String> for Constraint {
    type Error = ModelError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Constraint::parse(&value)
    }
}

impl From<Constraint> for String {
    fn from(c: Constraint) -> String {
        c.to_string()
    }
}

/// Where a service's tasks may run (Compose's `deploy.placement`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// All must hold on a node for a task to be placed there.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// At most this many of the service's tasks per node; `None` or 0 is unlimited
    /// (Swarm treats 0 as unlimited too).
    #[serde(default)]
    pub max_replicas_per_node: Option<u64>,
}

/// What each of a service's tasks runs: the part of the service spec copied
/// into every task, so that a task keeps running what it was created with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTemplate {
    /// Image reference.
    pub image: String,
    /// Overrides the image's CMD; `None` keeps it.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Overrides the image's ENTRYPOINT; `None` keeps it, an empty list clears it.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Environment variables (sorted, so equal specs compare equal).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `user[:group]`.
    #[serde(default)]
    pub user: Option<String>,
    /// Working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// Container hostname.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Mounts.
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Limits and reservations.
    #[serde(default)]
    pub resources: ResourceRequirements,
    /// Restart policy.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Health check; `None` uses the image's.
    #[serde(default)]
    pub healthcheck: Option<HealthCheck>,
    /// Placement.
    #[serde(default)]
    pub placement: Placement,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    /// Share the node's network namespace (`network_mode: host`); otherwise
    /// the task gets its own namespace on the node's bridge.
    #[serde(default)]
    pub host_network: bool,
    /// Container labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Time between the stop signal and SIGKILL (Compose
    /// `stop_grace_period`); `None` leaves it to the node (10 s).
    #[serde(default, with = "opt_duration_ms")]
    pub stop_grace_period: Option<Duration>,
    /// The cluster networks the task joins, by full name
    /// (`<stack>_<network>`); empty with `host_network`.
    #[serde(default)]
    pub networks: Vec<String>,
}

/// What to do when an update fails (stored for the update orchestrator).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    /// Stop updating.
    #[default]
    Pause,
    /// Keep going.
    Continue,
    /// Roll back to the previous spec.
    Rollback,
}

/// Whether an updated task starts before or after its predecessor stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// Stop the old one first (Swarm's default).
    #[default]
    StopFirst,
    /// Start the new one first.
    StartFirst,
}

/// Rolling update settings (Compose's `deploy.update_config`); stored now,
/// acted on by the update orchestrator later.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateConfig {
    /// Tasks updated at once; 0 means all.
    #[serde(default)]
    pub parallelism: u64,
    /// Wait between batches.
    #[serde(default, with = "duration_ms")]
    pub delay: Duration,
    /// On failure.
    #[serde(default)]
    pub failure_action: FailureAction,
    /// How long to watch an updated task for failure.
    #[serde(default, with = "duration_ms")]
    pub monitor: Duration,
    /// Tolerated share of failed tasks, 0.0–1.0.
    #[serde(default)]
    pub max_failure_ratio: f64,
    /// Stop-first or start-first.
    #[serde(default)]
    pub order: UpdateOrder,
}

/// How a service is reached by name (Compose `deploy.endpoint_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// One virtual IP, load-balanced over the ready tasks by every node.
    #[default]
    Vip,
    /// No virtual IP: the name resolves to the ready tasks' addresses.
    Dnsrr,
}

impl EndpointMode {
    /// The Compose spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointMode::Vip => "vip",
            EndpointMode::Dnsrr => "dnsrr",
        }
    }
}

/// What the operator asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// The service's name, unique within its stack.
    pub name: String,
    /// The stack (Compose project) it belongs to.
    #[serde(default)]
    pub stack: String,
    /// Replicated or global.
    pub mode: ServiceMode,
    /// What each task runs.
    pub task: TaskTemplate,
    /// Rolling update settings.
    #[serde(default)]
    pub update_config: Option<UpdateConfig>,
    /// How clients reach the service by name (Compose
    /// `deploy.endpoint_mode`).
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    /// Compose `depends_on`: services of the same stack, by name, and what
    /// each must reach before this service's tasks are scheduled (see
    /// [`crate::scheduler::dependencies`]). Not part of the task template:
    /// changing it replaces no running task.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub depends_on: BTreeMap<String, DependencyCondition>,
}

/// What a service named in `depends_on` must reach before the dependent
/// service's tasks are scheduled (Compose's conditions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DependencyCondition {
    /// A task of it runs (`service_started`, the default).
    #[default]
    ServiceStarted,
    /// A task of it runs and its health check passes (`service_healthy`).
    ServiceHealthy,
    /// Its tasks ran to completion with exit code 0
    /// (`service_completed_successfully`).
    ServiceCompletedSuccessfully,
}

impl DependencyCondition {
    /// The Compose spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DependencyCondition::ServiceStarted => "service_started",
            DependencyCondition::ServiceHealthy => "service_healthy",
            DependencyCondition::ServiceCompletedSuccessfully => "service_completed_successfully",
        }
    }
}

impl ServiceSpec {
    /// Whether the service gets a virtual IP: endpoint mode vip and not on
    /// the host's network.
    pub fn wants_vip(&self) -> bool {
        self.endpoint_mode == EndpointMode::Vip && !self.task.host_network
    }

    /// The name Swarm prints and `ServiceRef` accepts: `STACK_NAME`, or
    /// `NAME` outside a stack.
    pub fn full_name(&self) -> String {
        if self.stack.is_empty() {
            self.name.clone()
        } else {
            format!("{}_{}", self.stack, self.name)
        }
    }
}

/// A service: a desired set of tasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Service {
    /// The service's id.
    pub id: ServiceId,
    /// The desired state.
    pub spec: ServiceSpec,
    /// Bumped whenever `spec` changes; tasks record the one they were made from.
    #[serde(default)]
    pub spec_version: u64,
    /// The log index of the command that last changed this service.
    #[serde(default)]
    pub version: u64,
    /// The virtual IP from the service CIDR (endpoint mode vip, not host
    /// network); kept across updates, released when the service is removed.
    #[serde(default)]
    pub virtual_ip: Option<Ipv4Addr>,
}

// ---------------------------------------------------------------------------
// Tasks

/// A task's observed state, reported by its agent (swarmkit's task model).
/// The order of the variants is the order a task moves through; the last
/// five are terminal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Created by an orchestrator.
    #[default]
    New,
    /// Waiting for the scheduler.
    Pending,
    /// Placed on a node, not yet seen by its agent.
    Assigned,
    /// The agent took it.
    Accepted,
    /// The agent is pulling the image and setting up.
    Preparing,
    /// The container is starting.
    Starting,
    /// The container runs.
    Running,
    /// Exited with code 0 and will not be restarted. Terminal.
    Complete,
    /// Exited with an error and will not be restarted. Terminal.
    Failed,
    /// Could not be prepared or started on its node. Terminal.
    Rejected,
    /// Stopped because its desired state was shutdown. Terminal.
    Shutdown,
    /// Its node was lost for good. Terminal.
    Orphaned,
}

impl TaskState {
    /// Position in the forward order; all terminal states share the last rank.
    pub fn rank(self) -> u8 {
        match self {
            TaskState::New => 0,
            TaskState::Pending => 1,
            TaskState::Assigned => 2,
            TaskState::Accepted => 3,
            TaskState::Preparing => 4,
            TaskState::Starting => 5,
            TaskState::Running => 6,
            TaskState::Complete
            | TaskState::Failed
            | TaskState::Rejected
            | TaskState::Shutdown
            | TaskState::Orphaned => 7,
        }
    }

    /// Whether the task is finished (nothing runs and nothing will).
    pub fn is_terminal(self) -> bool {
        self.rank() == 7
    }

    /// The state's lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::New => "new",
            TaskState::Pending => "pending",
            TaskState::Assigned => "assigned",
            TaskState::Accepted => "accepted",
            TaskState::Preparing => "preparing",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Complete => "complete",
            TaskState::Failed => "failed",
            TaskState::Rejected => "rejected",
            TaskState::Shutdown => "shutdown",
            TaskState::Orphaned => "orphaned",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the controller wants a task to be; owned by the controller only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Run it.
    #[default]
    Running,
    /// Stop it (it stays in history until garbage-collected).
    Shutdown,
}

/// A task's health as its agent's health checks see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No health check configured.
    #[default]
    None,
    /// In the start period, or no verdict yet.
    Starting,
    /// Passing.
    Healthy,
    /// Failing `retries` times in a row.
    Unhealthy,
}

/// A task's observed status; owned by its agent (the scheduler sets
/// `pending` → `assigned`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// The state; only moves forward, see [`TaskStatus::advance`].
    #[serde(default)]
    pub state: TaskState,
    /// A human-readable note (e.g. why the task is pending).
    #[serde(default)]
    pub message: String,
    /// The error that made the task fail or be rejected.
    #[serde(default)]
    pub error: Option<String>,
    /// The main process's last exit code.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// In-place restarts the agent has done for this task.
    #[serde(default)]
    pub restarts: u32,
    /// Health check verdict.
    #[serde(default)]
    pub health: Health,
    /// When the state last changed (Unix milliseconds), by the clock of
    /// whoever changed it; `service ps` shows "Running 5 seconds ago" from
    /// it. The time travels inside the command that changes the state, so
    /// applying the log never reads a clock.
    #[serde(default)]
    pub timestamp_unix_ms: Option<u64>,
}

impl TaskStatus {
    /// Moves the state to `to`. Returns `Ok(true)` when the state changed,
    /// `Ok(false)` for a repeat of the current state (agents resend), and
    /// refuses a move backwards or from one terminal state to another.
    pub fn advance(&mut self, task: &TaskId, to: TaskState) -> Result<bool, ModelError> {
        let from = self.state;
        if to == from {
            return Ok(false);
        }
        if to.rank() <= from.rank() {
            return Err(ModelError::BackwardTransition {
                task: task.clone(),
                from,
                to,
            });
        }
        self.state = to;
        Ok(true)
    }
}

/// One scheduled instance of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// The task's id.
    pub id: TaskId,
    /// The service it belongs to.
    pub service: ServiceId,
    /// Replicated services: the slot (1-based) this task fills. A replacement
    /// takes its predecessor's slot. `None` for global services.
    #[serde(default)]
    pub slot: Option<u64>,
    /// The node it is assigned to. For global services set at creation (the
    /// task exists for that node); for replicated ones set by the scheduler.
    #[serde(default)]
    pub node: Option<NodeId>,
    /// The service's `spec_version` this task was made from.
    #[serde(default)]
    pub spec_version: u64,
    /// A copy of the service's template at creation.
    pub spec: TaskTemplate,
    /// What the controller wants.
    #[serde(default)]
    pub desired_state: DesiredState,
    /// What the agent reports.
    #[serde(default)]
    pub status: TaskStatus,
    /// Bumped by the controller on every change the agent must act on;
    /// an agent ignores an assignment older than one it has seen.
    #[serde(default)]
    pub generation: u64,
    /// The log index of the command that last changed this task.
    #[serde(default)]
    pub version: u64,
    /// The service's name as Swarm prints it ([`ServiceSpec::full_name`]),
    /// copied at creation like swarmkit's `ServiceAnnotations`, so that an
    /// agent can name the task's container without the service. Empty in
    /// tasks stored before it existed.
    #[serde(default)]
    pub service_name: String,
    /// Retries of its slot (or node) after failures that only the
    /// controller could act on (rejected, orphaned); 0 for a first task.
    /// `restart_policy.max_attempts` counts these.
    #[serde(default)]
    pub attempt: u32,
    /// A retry's back-off: the scheduler leaves the task alone before this
    /// time (Unix milliseconds). Set by the executor from the
    /// orchestrator's relative delay, so the state machine never reads a
    /// clock.
    #[serde(default)]
    pub not_before_unix_ms: Option<u64>,
    /// The task's address on its node's subnet, allocated when it is
    /// assigned (none for host-network tasks, or before the cluster has an
    /// address plan). Held until the task is deleted from the store.
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
}

impl Task {
    /// Whether the task holds resources and ports on its node: assigned by
    /// the scheduler (state `assigned` or later) and not finished. A task told
    /// to shut down still holds them until it stops; a global task that names
    /// its node but is still pending does not hold them yet.
    pub fn occupies_node(&self) -> bool {
        self.node.is_some()
            && self.status.state.rank() >= TaskState::Assigned.rank()
            && !self.status.state.is_terminal()
    }
}

/// Serde helpers: a `Duration` as whole milliseconds, readable in JSON and YAML.
mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Serde helpers: an optional `Duration` as whole milliseconds.
mod opt_duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_refuse_empty_and_whitespace() {
        assert!(NodeId::new("").is_err());
        assert!(TaskId::new("a b").is_err());
        assert_eq!(
            ServiceId::new("web").map(|s| s.to_string()),
            Ok("web".into())
        );
        let err = serde_json::from_str::<NodeId>("\"\"").map(|_| ());
        assert!(err.is_err(), "serde must validate ids too");
    }

    #[test]
    fn constraints_parse_and_print() {
        for (text, printed) in [
            ("node.labels.zone==eu", "node.labels.zone==eu"),
            ("node.role != manager", "node.role!=manager"),
            ("node.platform.arch==arm64", "node.platform.arch==arm64"),
        ] {
            let c = Constraint::parse(text);
            assert_eq!(c.map(|c| c.to_string()), Ok(printed.to_string()), "{text}");
        }
        for bad in [
            "node.labels.zone",
            "engine.labels.x==1",
            "node.labels.==a",
            "node.id==",
            "a==b==c",
        ] {
            assert!(Constraint::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn ne_label_constraint_matches_a_node_without_the_label() {
        let node = Node {
            id: NodeId::new("n1").expect("valid id"),
            spec: NodeSpec::default(),
            status: NodeStatus::default(),
            version: 0,
            subnet: None,
        };
        let ne = Constraint::parse("node.labels.zone!=eu").expect("valid");
        let eq = Constraint::parse("node.labels.zone==eu").expect("valid");
        assert!(ne.matches(&node));
        assert!(!eq.matches(&node));
    }

    #[test]
    fn a_terminal_state_is_final() {
        let id = TaskId::new("t").expect("valid id");
        let mut s = TaskStatus::default();
        assert_eq!(s.advance(&id, TaskState::Running), Ok(true));
        assert_eq!(s.advance(&id, TaskState::Running), Ok(false));
        assert!(s.advance(&id, TaskState::Starting).is_err());
        assert_eq!(s.advance(&id, TaskState::Failed), Ok(true));
        let err = s.advance(&id, TaskState::Shutdown);
        assert_eq!(
            err.map_err(|e| e.to_string()),
            Err("task t: state cannot move from failed to shutdown".to_string())
        );
    }

    fn any_state() -> impl Strategy<Value = TaskState> {
        prop::sample::select(vec![
            TaskState::New,
            TaskState::Pending,
            TaskState::Assigned,
            TaskState::Accepted,
            TaskState::Preparing,
            TaskState::Starting,
            TaskState::Running,
            TaskState::Complete,
            TaskState::Failed,
            TaskState::Rejected,
            TaskState::Shutdown,
            TaskState::Orphaned,
        ])
    }

    proptest! {
        /// Whatever sequence of reports arrives, the state's rank never
        /// decreases and a terminal state never changes.
        #[test]
        fn state_never_moves_backwards(reports in prop::collection::vec(any_state(), 0..40)) {
            let id = TaskId::new("t").expect("valid id");
            let mut s = TaskStatus::default();
            for to in reports {
                let before = s.state;
                let result = s.advance(&id, to);
                prop_assert!(s.state.rank() >= before.rank());
                if before.is_terminal() {
                    prop_assert_eq!(s.state, before);
                }
                prop_assert_eq!(result.is_ok(), to == before || to.rank() > before.rank());
            }
        }

        #[test]
        fn task_round_trips_through_json(slot in 1u64..100, generation in 0u64..10) {
            let task = Task {
                id: TaskId::new("t1").expect("valid"),
                service: ServiceId::new("s").expect("valid"),
                slot: Some(slot),
                node: None,
                spec_version: 1,
                spec: TaskTemplate {
                    image: "busybox".into(),
                    placement: Placement {
                        constraints: vec![Constraint::parse("node.labels.zone==eu").expect("valid")],
                        max_replicas_per_node: Some(2),
                    },
                    restart_policy: RestartPolicy {
                        condition: RestartCondition::OnFailure,
                        delay: Duration::from_millis(500),
                        max_attempts: Some(3),
                        window: Some(Duration::from_secs(60)),
                    },
                    ..TaskTemplate::default()
                },
                desired_state: DesiredState::Running,
                status: TaskStatus::default(),
                generation,
                version: 7,
                service_name: "demo_web".into(),
                attempt: 2,
                not_before_unix_ms: Some(1_700_000_000_000),
                address: None,
            };
            let json = serde_json::to_string(&task).expect("serializes");
            let back: Task = serde_json::from_str(&json).expect("deserializes");
            prop_assert_eq!(back, task);
        }
    }
}
