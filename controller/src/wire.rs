//! Conversions between the controller's domain model and the `gantry.v1`
//! wire types generated in `gantry-proto`.
//!
//! This is the one module of the controller that names prost types: the
//! store, orchestrators, scheduler and dispatcher work on [`crate::model`] and
//! call these conversions at the edge, so the protocol can change without the
//! logic noticing.
//!
//! Domain → wire is a plain [`From`]: every valid domain value has a wire
//! form. Wire → domain is a [`TryFrom`] that validates what protobuf cannot
//! express, and its [`WireError`] names the field by its path from the
//! converted message (`spec.task.restart_policy.condition`), so a peer's bug
//! is reported as precisely as a user's typo.
//!
//! Decisions a reader should know:
//! - An `*_UNSPECIFIED` enum value is refused, never read as the default: a
//!   peer that forgot a field gets an error, not a silently active node.
//! - A message-typed field the model requires (a task's `spec`, a node's
//!   `resources`) must be present; an empty message is fine. An absent
//!   `Resources` or `Platform` would otherwise mean "zero", which the
//!   scheduler would act on.
//! - Durations travel as whole milliseconds, like the model's serde form, so
//!   sub-millisecond parts are dropped on the way out (none of the model's
//!   durations is set finer than that).
//! - Ports must be 1-65535: 0 is not a port a container or node can use.
//! - Constraints travel structured; the wire form is checked by printing it
//!   and parsing it back with [`Constraint::parse`], so the wire can never
//!   carry a constraint that the Compose path would have refused.
//! - A deploy carries the normalized [`Stack`] as JSON (see
//!   [`stack_to_json`]): the whole Compose document is one payload on purpose,
//!   its schema belongs to the compose-spec and the controller re-validates it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use gantry_proto::v1 as pb;

use crate::compose::{ObjectChanges, ServiceUpdate, Stack, StackChanges};
use crate::model as m;
use crate::model::{Constraint, ModelError};
use crate::network::Ipv4Cidr;
use crate::network::update::{NetworkUpdate, ServiceRecord};

/// Errors from converting wire messages into domain values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A field the model requires was absent.
    #[error("missing field {field}")]
    Missing {
        /// The field's path within the converted message.
        field: String,
    },
    /// An enum field held its `*_UNSPECIFIED` value.
    #[error("field {field} is unspecified")]
    Unspecified {
        /// The field's path within the converted message.
        field: String,
    },
    /// An enum field held a number this protocol version does not define.
    #[error("field {field}: unknown enum value {value}")]
    UnknownEnum {
        /// The field's path within the converted message.
        field: String,
        /// The number received.
        value: i32,
    },
    /// A port was 0 or above 65535.
    #[error("field {field}: port {value} is out of range 1-65535")]
    PortOutOfRange {
        /// The field's path within the converted message.
        field: String,
        /// The number received.
        value: u32,
    },
    /// A value was refused by the model (an id, a constraint).
    #[error("field {field}: {source}")]
    Invalid {
        /// The field's path within the converted message.
        field: String,
        /// Why the model refused it.
        source: ModelError,
    },
    /// A label name was given for a constraint key other than
    /// `CONSTRAINT_KEY_LABEL`, where it would be silently ignored.
    #[error("field {field}: label {label:?} is only allowed with key CONSTRAINT_KEY_LABEL")]
    StrayLabel {
        /// The field's path within the converted message.
        field: String,
        /// The label received.
        label: String,
    },
    /// An address or network field did not parse.
    #[error("field {field}: {value:?} is not {expected}")]
    BadAddress {
        /// The field's path within the converted message.
        field: String,
        /// The text received.
        value: String,
        /// What was expected (`an IPv4 address`).
        expected: &'static str,
    },
    /// A full assignment set contained a removal.
    #[error("field {field}: a full assignment set may only hold updates")]
    RemoveInFullSet {
        /// The field's path within the converted message.
        field: String,
    },
    /// A stack could not be encoded as JSON (a bug in a serializer, not bad
    /// input: a `Stack` has string map keys only).
    #[error("stack {stack}: cannot encode as json: {reason}")]
    EncodeStack {
        /// The stack's name.
        stack: String,
        /// What the JSON encoder said.
        reason: String,
    },
    /// A deploy's stack payload was not a valid normalized stack.
    #[error("field stack_json: {reason}")]
    InvalidStack {
        /// What the JSON decoder said (line and column included).
        reason: String,
    },
}

impl WireError {
    /// Prefixes the field path with `parent.`, so that an error found deep in
    /// a nested message names its full path from the top.
    fn within(self, parent: &str) -> Self {
        let prefix = |field: String| format!("{parent}.{field}");
        match self {
            WireError::Missing { field } => WireError::Missing {
                field: prefix(field),
            },
            WireError::Unspecified { field } => WireError::Unspecified {
                field: prefix(field),
            },
            WireError::UnknownEnum { field, value } => WireError::UnknownEnum {
                field: prefix(field),
                value,
            },
            WireError::PortOutOfRange { field, value } => WireError::PortOutOfRange {
                field: prefix(field),
                value,
            },
            WireError::Invalid { field, source } => WireError::Invalid {
                field: prefix(field),
                source,
            },
            WireError::StrayLabel { field, label } => WireError::StrayLabel {
                field: prefix(field),
                label,
            },
            WireError::RemoveInFullSet { field } => WireError::RemoveInFullSet {
                field: prefix(field),
            },
            WireError::BadAddress {
                field,
                value,
                expected,
            } => WireError::BadAddress {
                field: prefix(field),
                value,
                expected,
            },
            e @ (WireError::InvalidStack { .. } | WireError::EncodeStack { .. }) => e,
        }
    }

    /// The path of the field involved, when there is one.
    pub fn field(&self) -> &str {
        match self {
            WireError::Missing { field }
            | WireError::Unspecified { field }
            | WireError::UnknownEnum { field, .. }
            | WireError::PortOutOfRange { field, .. }
            | WireError::Invalid { field, .. }
            | WireError::StrayLabel { field, .. }
            | WireError::RemoveInFullSet { field }
            | WireError::BadAddress { field, .. } => field,
            WireError::InvalidStack { .. } | WireError::EncodeStack { .. } => "stack_json",
        }
    }
}

// ---------------------------------------------------------------------------
// Helpers

/// An optional address: empty on the wire is none.
fn opt_ip(value: &str, field: &str) -> Result<Option<Ipv4Addr>, WireError> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| WireError::BadAddress {
        field: field.into(),
        value: value.into(),
        expected: "an IPv4 address",
    })
}

/// An optional network: empty on the wire is none.
fn opt_cidr(value: &str, field: &str) -> Result<Option<Ipv4Cidr>, WireError> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| WireError::BadAddress {
        field: field.into(),
        value: value.into(),
        expected: "an IPv4 network (10.42.3.0/24)",
    })
}

fn ip_text(ip: Option<Ipv4Addr>) -> String {
    ip.map(|ip| ip.to_string()).unwrap_or_default()
}

/// `ENDPOINT_MODE_UNSPECIFIED` is VIP (the proto says so, as Compose does
/// for an absent `endpoint_mode`).
fn endpoint_mode_from_wire(value: i32) -> Result<m::EndpointMode, WireError> {
    match pb::EndpointMode::try_from(value) {
        Ok(pb::EndpointMode::Unspecified | pb::EndpointMode::Vip) => Ok(m::EndpointMode::Vip),
        Ok(pb::EndpointMode::Dnsrr) => Ok(m::EndpointMode::Dnsrr),
        Err(_) => Err(WireError::UnknownEnum {
            field: "endpoint_mode".into(),
            value,
        }),
    }
}

/// The wire number of an endpoint mode.
pub fn endpoint_mode_to_wire(mode: m::EndpointMode) -> i32 {
    match mode {
        m::EndpointMode::Vip => pb::EndpointMode::Vip as i32,
        m::EndpointMode::Dnsrr => pb::EndpointMode::Dnsrr as i32,
    }
}

/// Unwraps a message-typed field the model requires, converting it and
/// naming it in any error.
fn required<W, D>(value: Option<W>, field: &str) -> Result<D, WireError>
where
    D: TryFrom<W, Error = WireError>,
{
    let value = value.ok_or_else(|| WireError::Missing {
        field: field.to_string(),
    })?;
    D::try_from(value).map_err(|e| e.within(field))
}

/// Converts an optional message-typed field, naming it in any error.
fn optional<W, D>(value: Option<W>, field: &str) -> Result<Option<D>, WireError>
where
    D: TryFrom<W, Error = WireError>,
{
    value
        .map(|v| D::try_from(v).map_err(|e| e.within(field)))
        .transpose()
}

/// Converts each element of a repeated field, naming the failing index.
fn each<W, D>(values: Vec<W>, field: &str) -> Result<Vec<D>, WireError>
where
    D: TryFrom<W, Error = WireError>,
{
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| D::try_from(v).map_err(|e| e.within(&format!("{field}[{i}]"))))
        .collect()
}

fn port(value: u32, field: &str) -> Result<u16, WireError> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(WireError::PortOutOfRange {
            field: field.to_string(),
            value,
        }),
    }
}

fn id<T>(value: String, field: &str) -> Result<T, WireError>
where
    T: TryFrom<String, Error = ModelError>,
{
    T::try_from(value).map_err(|source| WireError::Invalid {
        field: field.to_string(),
        source,
    })
}

/// Whole milliseconds, saturating: a duration beyond `u64::MAX` ms (585
/// million years) is not one anybody meant.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A domain enum that has a protobuf counterpart carried as `i32`.
trait WireEnum: Sized {
    /// Reads the wire number, refusing `*_UNSPECIFIED` and unknown values.
    fn from_wire(value: i32, field: &str) -> Result<Self, WireError>;
    /// The wire number.
    fn to_wire(self) -> i32;
}

/// Pairs a model enum with its generated enum variant by variant (the
/// variant names match; the generated enum adds `Unspecified`). A variant
/// added to either side without the other stops compilation here.
macro_rules! wire_enum {
    ($model:ident <=> $pb:ident { $($variant:ident),+ $(,)? }) => {
        impl WireEnum for m::$model {
            fn from_wire(value: i32, field: &str) -> Result<Self, WireError> {
                match pb::$pb::try_from(value) {
                    $(Ok(pb::$pb::$variant) => Ok(m::$model::$variant),)+
                    Ok(pb::$pb::Unspecified) => Err(WireError::Unspecified {
                        field: field.to_string(),
                    }),
                    Err(_) => Err(WireError::UnknownEnum {
                        field: field.to_string(),
                        value,
                    }),
                }
            }

            fn to_wire(self) -> i32 {
                pb::$pb::from(self) as i32
            }
        }

        impl From<m::$model> for pb::$pb {
            fn from(value: m::$model) -> Self {
                match value {
                    $(m::$model::$variant => pb::$pb::$variant,)+
                }
            }
        }
    };
}

wire_enum!(Availability <=> Availability { Active, Pause, Drain });
wire_enum!(NodeRole <=> NodeRole { Manager, Worker });
wire_enum!(NodeState <=> NodeState { Unknown, Ready, Down });
wire_enum!(MountKind <=> MountKind { Volume, Bind, Tmpfs });
wire_enum!(RestartCondition <=> RestartCondition { None, OnFailure, Any });
wire_enum!(Protocol <=> Protocol { Tcp, Udp });
wire_enum!(PublishMode <=> PublishMode { Ingress, Host });
wire_enum!(FailureAction <=> FailureAction { Pause, Continue, Rollback });
wire_enum!(UpdateOrder <=> UpdateOrder { StopFirst, StartFirst });
wire_enum!(DesiredState <=> DesiredState { Running, Shutdown });
wire_enum!(Health <=> Health { None, Starting, Healthy, Unhealthy });
wire_enum!(TaskState <=> TaskState {
    New, Pending, Assigned, Accepted, Preparing, Starting, Running,
    Complete, Failed, Rejected, Shutdown, Orphaned,
});

/// Task states also travel alone (`TaskFilter.states`), so the generated
/// enum converts back too.
impl TryFrom<pb::TaskState> for m::TaskState {
    type Error = WireError;
    fn try_from(state: pb::TaskState) -> Result<Self, WireError> {
        m::TaskState::from_wire(state as i32, "state")
    }
}

/// Reads a task state number (e.g. an element of `TaskFilter.states`).
pub fn task_state_from_wire(value: i32, field: &str) -> Result<m::TaskState, WireError> {
    m::TaskState::from_wire(value, field)
}

/// Reads an availability number (`UpdateNodeRequest.availability`).
pub fn availability_from_wire(value: i32, field: &str) -> Result<m::Availability, WireError> {
    m::Availability::from_wire(value, field)
}

// ---------------------------------------------------------------------------
// Nodes

impl From<m::Resources> for pb::Resources {
    fn from(r: m::Resources) -> Self {
        pb::Resources {
            nano_cpus: r.nano_cpus,
            memory_bytes: r.memory_bytes,
        }
    }
}

impl TryFrom<pb::Resources> for m::Resources {
    type Error = WireError;
    fn try_from(r: pb::Resources) -> Result<Self, WireError> {
        Ok(m::Resources {
            nano_cpus: r.nano_cpus,
            memory_bytes: r.memory_bytes,
        })
    }
}

impl From<m::Platform> for pb::Platform {
    fn from(p: m::Platform) -> Self {
        pb::Platform {
            os: p.os,
            arch: p.arch,
        }
    }
}

impl TryFrom<pb::Platform> for m::Platform {
    type Error = WireError;
    fn try_from(p: pb::Platform) -> Result<Self, WireError> {
        Ok(m::Platform {
            os: p.os,
            arch: p.arch,
        })
    }
}

impl From<m::NodeSpec> for pb::NodeSpec {
    fn from(s: m::NodeSpec) -> Self {
        pb::NodeSpec {
            availability: s.availability.to_wire(),
            role: s.role.to_wire(),
            labels: s.labels,
        }
    }
}

impl TryFrom<pb::NodeSpec> for m::NodeSpec {
    type Error = WireError;
    fn try_from(s: pb::NodeSpec) -> Result<Self, WireError> {
        Ok(m::NodeSpec {
            availability: m::Availability::from_wire(s.availability, "availability")?,
            role: m::NodeRole::from_wire(s.role, "role")?,
            labels: s.labels,
        })
    }
}

impl From<m::NodeStatus> for pb::NodeStatus {
    fn from(s: m::NodeStatus) -> Self {
        pb::NodeStatus {
            state: s.state.to_wire(),
            address: s.address,
            hostname: s.hostname,
            resources: Some(s.resources.into()),
            platform: Some(s.platform.into()),
        }
    }
}

impl TryFrom<pb::NodeStatus> for m::NodeStatus {
    type Error = WireError;
    fn try_from(s: pb::NodeStatus) -> Result<Self, WireError> {
        Ok(m::NodeStatus {
            state: m::NodeState::from_wire(s.state, "state")?,
            address: s.address,
            hostname: s.hostname,
            resources: required(s.resources, "resources")?,
            platform: required(s.platform, "platform")?,
        })
    }
}

impl From<m::Node> for pb::Node {
    fn from(n: m::Node) -> Self {
        pb::Node {
            id: n.id.into(),
            spec: Some(n.spec.into()),
            status: Some(n.status.into()),
            version: n.version,
            subnet: n.subnet.map(|s| s.to_string()).unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::Node> for m::Node {
    type Error = WireError;
    fn try_from(n: pb::Node) -> Result<Self, WireError> {
        Ok(m::Node {
            id: id(n.id, "id")?,
            spec: required(n.spec, "spec")?,
            status: required(n.status, "status")?,
            version: n.version,
            subnet: opt_cidr(&n.subnet, "subnet")?,
        })
    }
}

// ---------------------------------------------------------------------------
// Services

impl From<m::Mount> for pb::Mount {
    fn from(mnt: m::Mount) -> Self {
        pb::Mount {
            kind: mnt.kind.to_wire(),
            source: mnt.source,
            target: mnt.target,
            read_only: mnt.read_only,
        }
    }
}

impl TryFrom<pb::Mount> for m::Mount {
    type Error = WireError;
    fn try_from(mnt: pb::Mount) -> Result<Self, WireError> {
        Ok(m::Mount {
            kind: m::MountKind::from_wire(mnt.kind, "kind")?,
            source: mnt.source,
            target: mnt.target,
            read_only: mnt.read_only,
        })
    }
}

impl From<m::ResourceRequirements> for pb::ResourceRequirements {
    fn from(r: m::ResourceRequirements) -> Self {
        pb::ResourceRequirements {
            limits: Some(r.limits.into()),
            reservations: Some(r.reservations.into()),
        }
    }
}

impl TryFrom<pb::ResourceRequirements> for m::ResourceRequirements {
    type Error = WireError;
    fn try_from(r: pb::ResourceRequirements) -> Result<Self, WireError> {
        Ok(m::ResourceRequirements {
            limits: required(r.limits, "limits")?,
            reservations: required(r.reservations, "reservations")?,
        })
    }
}

impl From<m::RestartPolicy> for pb::RestartPolicy {
    fn from(p: m::RestartPolicy) -> Self {
        pb::RestartPolicy {
            condition: p.condition.to_wire(),
            delay_ms: millis(p.delay),
            max_attempts: p.max_attempts,
            window_ms: p.window.map(millis),
        }
    }
}

impl TryFrom<pb::RestartPolicy> for m::RestartPolicy {
    type Error = WireError;
    fn try_from(p: pb::RestartPolicy) -> Result<Self, WireError> {
        Ok(m::RestartPolicy {
            condition: m::RestartCondition::from_wire(p.condition, "condition")?,
            delay: Duration::from_millis(p.delay_ms),
            max_attempts: p.max_attempts,
            window: p.window_ms.map(Duration::from_millis),
        })
    }
}

impl From<m::HealthProbe> for pb::HealthProbe {
    fn from(p: m::HealthProbe) -> Self {
        use pb::health_probe::Probe;
        let probe = match p {
            m::HealthProbe::Exec(items) => Probe::Exec(pb::StringList { items }),
            m::HealthProbe::Shell(cmd) => Probe::Shell(cmd),
            m::HealthProbe::Http { port, path } => Probe::Http(pb::HttpProbe {
                port: port.into(),
                path,
            }),
            m::HealthProbe::Tcp { port } => Probe::Tcp(pb::TcpProbe { port: port.into() }),
            m::HealthProbe::None => Probe::None(pb::Empty {}),
        };
        pb::HealthProbe { probe: Some(probe) }
    }
}

impl TryFrom<pb::HealthProbe> for m::HealthProbe {
    type Error = WireError;
    fn try_from(p: pb::HealthProbe) -> Result<Self, WireError> {
        use pb::health_probe::Probe;
        Ok(match p.probe {
            Some(Probe::Exec(list)) => m::HealthProbe::Exec(list.items),
            Some(Probe::Shell(cmd)) => m::HealthProbe::Shell(cmd),
            Some(Probe::Http(h)) => m::HealthProbe::Http {
                port: port(h.port, "http.port")?,
                path: h.path,
            },
            Some(Probe::Tcp(t)) => m::HealthProbe::Tcp {
                port: port(t.port, "tcp.port")?,
            },
            Some(Probe::None(_)) => m::HealthProbe::None,
            None => {
                return Err(WireError::Missing {
                    field: "probe".into(),
                });
            }
        })
    }
}

impl From<m::HealthCheck> for pb::HealthCheck {
    fn from(h: m::HealthCheck) -> Self {
        pb::HealthCheck {
            probe: Some(h.probe.into()),
            interval_ms: millis(h.interval),
            timeout_ms: millis(h.timeout),
            retries: h.retries,
            start_period_ms: millis(h.start_period),
        }
    }
}

impl TryFrom<pb::HealthCheck> for m::HealthCheck {
    type Error = WireError;
    fn try_from(h: pb::HealthCheck) -> Result<Self, WireError> {
        Ok(m::HealthCheck {
            probe: required(h.probe, "probe")?,
            interval: Duration::from_millis(h.interval_ms),
            timeout: Duration::from_millis(h.timeout_ms),
            retries: h.retries,
            start_period: Duration::from_millis(h.start_period_ms),
        })
    }
}

impl From<m::PortConfig> for pb::PortConfig {
    fn from(p: m::PortConfig) -> Self {
        pb::PortConfig {
            published: p.published.map(u32::from),
            target: p.target.into(),
            protocol: p.protocol.to_wire(),
            mode: p.mode.to_wire(),
        }
    }
}

impl TryFrom<pb::PortConfig> for m::PortConfig {
    type Error = WireError;
    fn try_from(p: pb::PortConfig) -> Result<Self, WireError> {
        Ok(m::PortConfig {
            published: p.published.map(|v| port(v, "published")).transpose()?,
            target: port(p.target, "target")?,
            protocol: m::Protocol::from_wire(p.protocol, "protocol")?,
            mode: m::PublishMode::from_wire(p.mode, "mode")?,
        })
    }
}

impl From<Constraint> for pb::Constraint {
    fn from(c: Constraint) -> Self {
        let (key, label) = match c.key {
            m::ConstraintKey::Id => (pb::ConstraintKey::Id, String::new()),
            m::ConstraintKey::Hostname => (pb::ConstraintKey::Hostname, String::new()),
            m::ConstraintKey::Role => (pb::ConstraintKey::Role, String::new()),
            m::ConstraintKey::Os => (pb::ConstraintKey::Os, String::new()),
            m::ConstraintKey::Arch => (pb::ConstraintKey::Arch, String::new()),
            m::ConstraintKey::Label(label) => (pb::ConstraintKey::Label, label),
        };
        let op = match c.op {
            m::ConstraintOp::Eq => pb::ConstraintOp::Eq,
            m::ConstraintOp::Ne => pb::ConstraintOp::Ne,
        };
        pb::Constraint {
            key: key as i32,
            label,
            op: op as i32,
            value: c.value,
        }
    }
}

impl TryFrom<pb::Constraint> for Constraint {
    type Error = WireError;
    fn try_from(c: pb::Constraint) -> Result<Self, WireError> {
        let unspecified = |field: &str| WireError::Unspecified {
            field: field.to_string(),
        };
        let key = pb::ConstraintKey::try_from(c.key).map_err(|_| WireError::UnknownEnum {
            field: "key".into(),
            value: c.key,
        })?;
        let name = match key {
            pb::ConstraintKey::Unspecified => return Err(unspecified("key")),
            pb::ConstraintKey::Id => "node.id",
            pb::ConstraintKey::Hostname => "node.hostname",
            pb::ConstraintKey::Role => "node.role",
            pb::ConstraintKey::Os => "node.platform.os",
            pb::ConstraintKey::Arch => "node.platform.arch",
            pb::ConstraintKey::Label => "node.labels.",
        };
        if key != pb::ConstraintKey::Label && !c.label.is_empty() {
            return Err(WireError::StrayLabel {
                field: "label".into(),
                label: c.label,
            });
        }
        let op = match pb::ConstraintOp::try_from(c.op) {
            Ok(pb::ConstraintOp::Eq) => "==",
            Ok(pb::ConstraintOp::Ne) => "!=",
            Ok(pb::ConstraintOp::Unspecified) => return Err(unspecified("op")),
            Err(_) => {
                return Err(WireError::UnknownEnum {
                    field: "op".into(),
                    value: c.op,
                });
            }
        };
        // One parser decides what a valid constraint is, whichever way it
        // arrived; a value that parses into something else (an embedded
        // operator, surrounding spaces) is refused rather than reinterpreted.
        let text = format!("{name}{}{op}{}", c.label, c.value);
        let invalid = |source| WireError::Invalid {
            field: "value".into(),
            source,
        };
        let parsed = Constraint::parse(&text).map_err(invalid)?;
        if parsed.to_string() != text {
            return Err(invalid(ModelError::InvalidConstraint {
                expr: text,
                reason: "label or value has surrounding spaces or an operator".into(),
            }));
        }
        Ok(parsed)
    }
}

impl From<m::Placement> for pb::Placement {
    fn from(p: m::Placement) -> Self {
        pb::Placement {
            constraints: p.constraints.into_iter().map(Into::into).collect(),
            max_replicas_per_node: p.max_replicas_per_node,
        }
    }
}

impl TryFrom<pb::Placement> for m::Placement {
    type Error = WireError;
    fn try_from(p: pb::Placement) -> Result<Self, WireError> {
        Ok(m::Placement {
            constraints: each(p.constraints, "constraints")?,
            max_replicas_per_node: p.max_replicas_per_node,
        })
    }
}

impl From<m::TaskTemplate> for pb::TaskTemplate {
    fn from(t: m::TaskTemplate) -> Self {
        let list = |items: Vec<String>| pb::StringList { items };
        pb::TaskTemplate {
            image: t.image,
            command: t.command.map(list),
            entrypoint: t.entrypoint.map(list),
            env: t.env,
            user: t.user,
            working_dir: t.working_dir,
            hostname: t.hostname,
            mounts: t.mounts.into_iter().map(Into::into).collect(),
            resources: Some(t.resources.into()),
            restart_policy: Some(t.restart_policy.into()),
            healthcheck: t.healthcheck.map(Into::into),
            placement: Some(t.placement.into()),
            ports: t.ports.into_iter().map(Into::into).collect(),
            host_network: t.host_network,
            labels: t.labels,
            stop_grace_period_ms: t.stop_grace_period.map(millis),
            networks: t.networks,
        }
    }
}

impl TryFrom<pb::TaskTemplate> for m::TaskTemplate {
    type Error = WireError;
    fn try_from(t: pb::TaskTemplate) -> Result<Self, WireError> {
        Ok(m::TaskTemplate {
            image: t.image,
            command: t.command.map(|l| l.items),
            entrypoint: t.entrypoint.map(|l| l.items),
            env: t.env,
            user: t.user,
            working_dir: t.working_dir,
            hostname: t.hostname,
            mounts: each(t.mounts, "mounts")?,
            resources: required(t.resources, "resources")?,
            restart_policy: required(t.restart_policy, "restart_policy")?,
            healthcheck: optional(t.healthcheck, "healthcheck")?,
            placement: required(t.placement, "placement")?,
            ports: each(t.ports, "ports")?,
            host_network: t.host_network,
            labels: t.labels,
            stop_grace_period: t.stop_grace_period_ms.map(Duration::from_millis),
            networks: t.networks,
        })
    }
}

impl From<m::ServiceMode> for pb::ServiceMode {
    fn from(mode: m::ServiceMode) -> Self {
        use pb::service_mode::Mode;
        let mode = match mode {
            m::ServiceMode::Replicated { replicas } => {
                Mode::Replicated(pb::ReplicatedMode { replicas })
            }
            m::ServiceMode::Global => Mode::Global(pb::Empty {}),
        };
        pb::ServiceMode { mode: Some(mode) }
    }
}

impl TryFrom<pb::ServiceMode> for m::ServiceMode {
    type Error = WireError;
    fn try_from(mode: pb::ServiceMode) -> Result<Self, WireError> {
        use pb::service_mode::Mode;
        match mode.mode {
            Some(Mode::Replicated(r)) => Ok(m::ServiceMode::Replicated {
                replicas: r.replicas,
            }),
            Some(Mode::Global(_)) => Ok(m::ServiceMode::Global),
            None => Err(WireError::Missing {
                field: "mode".into(),
            }),
        }
    }
}

impl From<m::UpdateConfig> for pb::UpdateConfig {
    fn from(u: m::UpdateConfig) -> Self {
        pb::UpdateConfig {
            parallelism: u.parallelism,
            delay_ms: millis(u.delay),
            failure_action: u.failure_action.to_wire(),
            monitor_ms: millis(u.monitor),
            max_failure_ratio: u.max_failure_ratio,
            order: u.order.to_wire(),
        }
    }
}

impl TryFrom<pb::UpdateConfig> for m::UpdateConfig {
    type Error = WireError;
    fn try_from(u: pb::UpdateConfig) -> Result<Self, WireError> {
        Ok(m::UpdateConfig {
            parallelism: u.parallelism,
            delay: Duration::from_millis(u.delay_ms),
            failure_action: m::FailureAction::from_wire(u.failure_action, "failure_action")?,
            monitor: Duration::from_millis(u.monitor_ms),
            max_failure_ratio: u.max_failure_ratio,
            order: m::UpdateOrder::from_wire(u.order, "order")?,
        })
    }
}

impl From<m::ServiceSpec> for pb::ServiceSpec {
    fn from(s: m::ServiceSpec) -> Self {
        pb::ServiceSpec {
            name: s.name,
            stack: s.stack,
            mode: Some(s.mode.into()),
            task: Some(s.task.into()),
            update_config: s.update_config.map(Into::into),
            endpoint_mode: endpoint_mode_to_wire(s.endpoint_mode),
            depends_on: s
                .depends_on
                .into_iter()
                .map(|(service, condition)| pb::Dependency {
                    service,
                    condition: match condition {
                        m::DependencyCondition::ServiceStarted => {
                            pb::DependencyCondition::Started as i32
                        }
                        m::DependencyCondition::ServiceHealthy => {
                            pb::DependencyCondition::Healthy as i32
                        }
                        m::DependencyCondition::ServiceCompletedSuccessfully => {
                            pb::DependencyCondition::CompletedSuccessfully as i32
                        }
                    },
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::ServiceSpec> for m::ServiceSpec {
    type Error = WireError;
    fn try_from(s: pb::ServiceSpec) -> Result<Self, WireError> {
        Ok(m::ServiceSpec {
            name: s.name,
            stack: s.stack,
            mode: required(s.mode, "mode")?,
            task: required(s.task, "task")?,
            update_config: optional(s.update_config, "update_config")?,
            endpoint_mode: endpoint_mode_from_wire(s.endpoint_mode)?,
            depends_on: s
                .depends_on
                .into_iter()
                .enumerate()
                .map(|(i, d)| {
                    let condition = match pb::DependencyCondition::try_from(d.condition) {
                        Ok(pb::DependencyCondition::Started) => {
                            m::DependencyCondition::ServiceStarted
                        }
                        Ok(pb::DependencyCondition::Healthy) => {
                            m::DependencyCondition::ServiceHealthy
                        }
                        Ok(pb::DependencyCondition::CompletedSuccessfully) => {
                            m::DependencyCondition::ServiceCompletedSuccessfully
                        }
                        Err(_) => {
                            return Err(WireError::UnknownEnum {
                                field: format!("depends_on[{i}].condition"),
                                value: d.condition,
                            });
                        }
                    };
                    Ok((d.service, condition))
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

impl From<m::Service> for pb::Service {
    fn from(s: m::Service) -> Self {
        pb::Service {
            id: s.id.into(),
            spec: Some(s.spec.into()),
            spec_version: s.spec_version,
            version: s.version,
            virtual_ip: ip_text(s.virtual_ip),
        }
    }
}

impl TryFrom<pb::Service> for m::Service {
    type Error = WireError;
    fn try_from(s: pb::Service) -> Result<Self, WireError> {
        Ok(m::Service {
            id: id(s.id, "id")?,
            spec: required(s.spec, "spec")?,
            spec_version: s.spec_version,
            version: s.version,
            virtual_ip: opt_ip(&s.virtual_ip, "virtual_ip")?,
        })
    }
}

// ---------------------------------------------------------------------------
// Tasks

impl From<m::TaskStatus> for pb::TaskStatus {
    fn from(s: m::TaskStatus) -> Self {
        pb::TaskStatus {
            state: s.state.to_wire(),
            message: s.message,
            error: s.error,
            exit_code: s.exit_code,
            restarts: s.restarts,
            health: s.health.to_wire(),
            timestamp_unix_ms: s.timestamp_unix_ms,
        }
    }
}

impl TryFrom<pb::TaskStatus> for m::TaskStatus {
    type Error = WireError;
    fn try_from(s: pb::TaskStatus) -> Result<Self, WireError> {
        Ok(m::TaskStatus {
            state: m::TaskState::from_wire(s.state, "state")?,
            message: s.message,
            error: s.error,
            exit_code: s.exit_code,
            restarts: s.restarts,
            health: m::Health::from_wire(s.health, "health")?,
            timestamp_unix_ms: s.timestamp_unix_ms,
        })
    }
}

impl From<m::Task> for pb::Task {
    fn from(t: m::Task) -> Self {
        pb::Task {
            id: t.id.into(),
            service: t.service.into(),
            slot: t.slot,
            node: t.node.map(Into::into),
            spec_version: t.spec_version,
            spec: Some(t.spec.into()),
            desired_state: t.desired_state.to_wire(),
            status: Some(t.status.into()),
            generation: t.generation,
            version: t.version,
            service_name: t.service_name,
            attempt: t.attempt,
            not_before_unix_ms: t.not_before_unix_ms,
            address: t.address.map(|a| a.to_string()),
        }
    }
}

impl TryFrom<pb::Task> for m::Task {
    type Error = WireError;
    fn try_from(t: pb::Task) -> Result<Self, WireError> {
        Ok(m::Task {
            id: id(t.id, "id")?,
            service: id(t.service, "service")?,
            slot: t.slot,
            node: t.node.map(|n| id(n, "node")).transpose()?,
            spec_version: t.spec_version,
            spec: required(t.spec, "spec")?,
            desired_state: m::DesiredState::from_wire(t.desired_state, "desired_state")?,
            status: required(t.status, "status")?,
            generation: t.generation,
            version: t.version,
            service_name: t.service_name,
            attempt: t.attempt,
            not_before_unix_ms: t.not_before_unix_ms,
            address: t
                .address
                .as_deref()
                .map(|a| opt_ip(a, "address"))
                .transpose()?
                .flatten(),
        })
    }
}

// ---------------------------------------------------------------------------
// Network state

impl From<NetworkUpdate> for pb::NetworkUpdate {
    fn from(u: NetworkUpdate) -> Self {
        let (cluster_cidr, service_cidr) =
            u.addressing.map_or((String::new(), String::new()), |a| {
                (a.cluster_cidr.to_string(), a.service_cidr.to_string())
            });
        pb::NetworkUpdate {
            full: u.full,
            revision: u.revision,
            cluster_cidr,
            service_cidr,
            node_subnet: u.node_subnet.map(|s| s.to_string()).unwrap_or_default(),
            nodes: u
                .nodes
                .into_iter()
                .map(|n| pb::OverlayNode {
                    node_id: n.node.into(),
                    underlay_ip: n.underlay_ip.to_string(),
                    subnet: n.subnet.to_string(),
                })
                .collect(),
            removed_nodes: u.removed_nodes.into_iter().map(Into::into).collect(),
            services: u.services.into_iter().map(Into::into).collect(),
            removed_services: u.removed_services.into_iter().map(Into::into).collect(),
            networks: u
                .networks
                .into_iter()
                .map(|n| pb::ClusterNetwork {
                    name: n.name,
                    stack: n.stack,
                })
                .collect(),
            removed_networks: u.removed_networks,
        }
    }
}

impl From<ServiceRecord> for pb::ServiceRecord {
    fn from(r: ServiceRecord) -> Self {
        pb::ServiceRecord {
            service_id: r.service.into(),
            name: r.name,
            stack: r.stack,
            virtual_ip: ip_text(r.virtual_ip),
            endpoint_mode: endpoint_mode_to_wire(r.endpoint_mode),
            ports: r.ports.into_iter().map(Into::into).collect(),
            networks: r.networks,
            endpoints: r
                .endpoints
                .into_iter()
                .map(|e| pb::ServiceEndpoint {
                    task: e.task.into(),
                    node: e.node.into(),
                    address: e.address.to_string(),
                    ready: e.ready,
                })
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------
// Dispatcher messages that have no model type of their own

/// A task status report from an agent (`TaskStatusUpdate`), validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// The task reported on.
    pub task: m::TaskId,
    /// The assignment generation the agent acted on; the dispatcher drops a
    /// report older than the task's current generation.
    pub generation: u64,
    /// The status as the agent sees it.
    pub status: m::TaskStatus,
}

impl From<StatusReport> for pb::TaskStatusUpdate {
    fn from(r: StatusReport) -> Self {
        pb::TaskStatusUpdate {
            task: r.task.into(),
            generation: r.generation,
            status: Some(r.status.into()),
        }
    }
}

impl TryFrom<pb::TaskStatusUpdate> for StatusReport {
    type Error = WireError;
    fn try_from(u: pb::TaskStatusUpdate) -> Result<Self, WireError> {
        Ok(StatusReport {
            task: id(u.task, "task")?,
            generation: u.generation,
            status: required(u.status, "status")?,
        })
    }
}

/// An agent's `Hello`, validated: what it says about its node.
///
/// Decision: the agent's own labels (`gantry agent --label`) are reported
/// separately from [`m::NodeSpec::labels`], which the operator owns; the
/// dispatcher decides how to merge them (operator labels win, as with
/// Swarm's engine vs node labels), not this conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The node's id.
    pub node: m::NodeId,
    /// The host's name.
    pub hostname: String,
    /// The address the agent is reachable at.
    pub address: String,
    /// The resources it offers to tasks.
    pub resources: m::Resources,
    /// Labels the agent was started with.
    pub labels: BTreeMap<String, String>,
    /// OS and architecture.
    pub platform: m::Platform,
    /// The agent's protocol version; compared by the dispatcher, not here, so
    /// that it can refuse with a status that names both versions.
    pub protocol_version: u32,
    /// The newest assignment generation the agent applied (0: none).
    pub last_generation: u64,
}

impl From<Registration> for pb::Hello {
    fn from(r: Registration) -> Self {
        pb::Hello {
            node_id: r.node.into(),
            hostname: r.hostname,
            address: r.address,
            resources: Some(r.resources.into()),
            labels: r.labels,
            platform: Some(r.platform.into()),
            protocol_version: r.protocol_version,
            last_generation: r.last_generation,
        }
    }
}

impl TryFrom<pb::Hello> for Registration {
    type Error = WireError;
    fn try_from(h: pb::Hello) -> Result<Self, WireError> {
        Ok(Registration {
            node: id(h.node_id, "node_id")?,
            hostname: h.hostname,
            address: h.address,
            resources: required(h.resources, "resources")?,
            labels: h.labels,
            platform: required(h.platform, "platform")?,
            protocol_version: h.protocol_version,
            last_generation: h.last_generation,
        })
    }
}

/// One change to a node's assignments (`AssignmentChange`).
// Most changes are updates, so boxing the task would add an allocation to the
// common case to save space in the rare one.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignmentChange {
    /// Add the task, or replace the agent's copy: one action for both so that
    /// a resent change is harmless (swarmkit's `UPDATE`).
    Update(m::Task),
    /// Stop the task if it runs and forget it.
    Remove(m::TaskId),
}

/// A node's assignments at a generation (`AssignmentSet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignments {
    /// Strictly increasing per node; the agent ignores a set that is not
    /// newer than the last it applied.
    pub generation: u64,
    /// `changes` is the whole set: the agent stops and drops every task not
    /// in it. Decision: a full set holds only `Update`s; a `Remove` in one is
    /// refused, since it would mean the sender confused the two kinds.
    pub full: bool,
    /// The changes, applied in order.
    pub changes: Vec<AssignmentChange>,
}

impl From<AssignmentChange> for pb::AssignmentChange {
    fn from(c: AssignmentChange) -> Self {
        let (action, task) = match c {
            AssignmentChange::Update(task) => (pb::AssignmentAction::Update, task.into()),
            // A removal reads only the task's id; the rest stays empty.
            AssignmentChange::Remove(id) => (
                pb::AssignmentAction::Remove,
                pb::Task {
                    id: id.into(),
                    ..pb::Task::default()
                },
            ),
        };
        pb::AssignmentChange {
            action: action as i32,
            task: Some(task),
        }
    }
}

impl TryFrom<pb::AssignmentChange> for AssignmentChange {
    type Error = WireError;
    fn try_from(c: pb::AssignmentChange) -> Result<Self, WireError> {
        let task = c.task.ok_or_else(|| WireError::Missing {
            field: "task".into(),
        })?;
        match pb::AssignmentAction::try_from(c.action) {
            Ok(pb::AssignmentAction::Update) => m::Task::try_from(task)
                .map(AssignmentChange::Update)
                .map_err(|e| e.within("task")),
            Ok(pb::AssignmentAction::Remove) => {
                id(task.id, "task.id").map(AssignmentChange::Remove)
            }
            Ok(pb::AssignmentAction::Unspecified) => Err(WireError::Unspecified {
                field: "action".into(),
            }),
            Err(_) => Err(WireError::UnknownEnum {
                field: "action".into(),
                value: c.action,
            }),
        }
    }
}

impl From<Assignments> for pb::AssignmentSet {
    fn from(a: Assignments) -> Self {
        pb::AssignmentSet {
            generation: a.generation,
            full: a.full,
            changes: a.changes.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::AssignmentSet> for Assignments {
    type Error = WireError;
    fn try_from(a: pb::AssignmentSet) -> Result<Self, WireError> {
        let changes: Vec<AssignmentChange> = each(a.changes, "changes")?;
        if a.full
            && let Some(i) = changes
                .iter()
                .position(|c| matches!(c, AssignmentChange::Remove(_)))
        {
            return Err(WireError::RemoveInFullSet {
                field: format!("changes[{i}].action"),
            });
        }
        Ok(Assignments {
            generation: a.generation,
            full: a.full,
            changes,
        })
    }
}

// ---------------------------------------------------------------------------
// Stacks

/// Encodes a normalized stack for `DeployStackRequest.stack_json`.
///
/// JSON rather than a field-by-field protobuf mirror: the stack is a whole
/// Compose document whose schema grows with each supported key, it already
/// has one serde form (the one `deploy --dry-run -o json` prints), and the
/// controller normalizes and validates it again on arrival.
pub fn stack_to_json(stack: &Stack) -> Result<Vec<u8>, WireError> {
    serde_json::to_vec(stack).map_err(|e| WireError::EncodeStack {
        stack: stack.name.clone(),
        reason: e.to_string(),
    })
}

/// Decodes `DeployStackRequest.stack_json`. Unknown fields are refused by
/// [`Stack`]'s own serde rules, not here.
pub fn stack_from_json(bytes: &[u8]) -> Result<Stack, WireError> {
    serde_json::from_slice(bytes).map_err(|e| WireError::InvalidStack {
        reason: e.to_string(),
    })
}

impl From<ObjectChanges> for pb::ObjectChanges {
    fn from(c: ObjectChanges) -> Self {
        pb::ObjectChanges {
            create: c.create,
            update: c.update,
            remove: c.remove,
        }
    }
}

impl From<pb::ObjectChanges> for ObjectChanges {
    fn from(c: pb::ObjectChanges) -> Self {
        ObjectChanges {
            create: c.create,
            update: c.update,
            remove: c.remove,
        }
    }
}

impl From<StackChanges> for pb::StackChanges {
    fn from(c: StackChanges) -> Self {
        pb::StackChanges {
            create: c.create,
            update: c
                .update
                .into_iter()
                .map(|u| pb::ServiceUpdate {
                    service: u.service,
                    fields: u.fields,
                })
                .collect(),
            remove: c.remove,
            volumes: Some(c.volumes.into()),
            networks: Some(c.networks.into()),
        }
    }
}

/// Infallible: every list is just names, and an absent `volumes` or
/// `networks` means nothing changed there.
impl From<pb::StackChanges> for StackChanges {
    fn from(c: pb::StackChanges) -> Self {
        StackChanges {
            create: c.create,
            update: c
                .update
                .into_iter()
                .map(|u| ServiceUpdate {
                    service: u.service,
                    fields: u.fields,
                })
                .collect(),
            remove: c.remove,
            volumes: c.volumes.map(Into::into).unwrap_or_default(),
            networks: c.networks.map(Into::into).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::select;

    // -- strategies: every valid domain value, durations at ms precision ----

    fn ident() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9._-]{0,11}"
    }

    fn text() -> impl Strategy<Value = String> {
        "[ -~]{0,12}"
    }

    fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
        prop::collection::btree_map(ident(), text(), 0..4)
    }

    fn ms() -> impl Strategy<Value = Duration> {
        (0u64..10_000_000).prop_map(Duration::from_millis)
    }

    fn resources() -> impl Strategy<Value = m::Resources> {
        (any::<u64>(), any::<u64>()).prop_map(|(nano_cpus, memory_bytes)| m::Resources {
            nano_cpus,
            memory_bytes,
        })
    }

    fn platform() -> impl Strategy<Value = m::Platform> {
        (text(), text()).prop_map(|(os, arch)| m::Platform { os, arch })
    }

    fn node() -> impl Strategy<Value = m::Node> {
        let spec = (
            select(vec![
                m::Availability::Active,
                m::Availability::Pause,
                m::Availability::Drain,
            ]),
            select(vec![m::NodeRole::Manager, m::NodeRole::Worker]),
            labels(),
        )
            .prop_map(|(availability, role, labels)| m::NodeSpec {
                availability,
                role,
                labels,
            });
        let status = (
            select(vec![
                m::NodeState::Unknown,
                m::NodeState::Ready,
                m::NodeState::Down,
            ]),
            text(),
            text(),
            resources(),
            platform(),
        )
            .prop_map(
                |(state, address, hostname, resources, platform)| m::NodeStatus {
                    state,
                    address,
                    hostname,
                    resources,
                    platform,
                },
            );
        (ident(), spec, status, any::<u64>()).prop_map(|(id, spec, status, version)| m::Node {
            id: m::NodeId::new(id).expect("strategy makes valid ids"),
            spec,
            status,
            version,
            subnet: None,
        })
    }

    fn port() -> impl Strategy<Value = u16> {
        1u16..=u16::MAX
    }

    fn constraint() -> impl Strategy<Value = Constraint> {
        let key = prop_oneof![
            Just(m::ConstraintKey::Id),
            Just(m::ConstraintKey::Hostname),
            Just(m::ConstraintKey::Role),
            Just(m::ConstraintKey::Os),
            Just(m::ConstraintKey::Arch),
            ident().prop_map(m::ConstraintKey::Label),
        ];
        (
            key,
            select(vec![m::ConstraintOp::Eq, m::ConstraintOp::Ne]),
            ident(),
        )
            .prop_map(|(key, op, value)| Constraint { key, op, value })
    }

    fn probe() -> impl Strategy<Value = m::HealthProbe> {
        prop_oneof![
            prop::collection::vec(text(), 0..3).prop_map(m::HealthProbe::Exec),
            text().prop_map(m::HealthProbe::Shell),
            (port(), text()).prop_map(|(port, path)| m::HealthProbe::Http { port, path }),
            port().prop_map(|port| m::HealthProbe::Tcp { port }),
            Just(m::HealthProbe::None),
        ]
    }

    fn template() -> impl Strategy<Value = m::TaskTemplate> {
        let mount = (
            select(vec![
                m::MountKind::Volume,
                m::MountKind::Bind,
                m::MountKind::Tmpfs,
            ]),
            proptest::option::of(text()),
            text(),
            any::<bool>(),
        )
            .prop_map(|(kind, source, target, read_only)| m::Mount {
                kind,
                source,
                target,
                read_only,
            });
        let restart = (
            select(vec![
                m::RestartCondition::None,
                m::RestartCondition::OnFailure,
                m::RestartCondition::Any,
            ]),
            ms(),
            proptest::option::of(any::<u32>()),
            proptest::option::of(ms()),
        )
            .prop_map(
                |(condition, delay, max_attempts, window)| m::RestartPolicy {
                    condition,
                    delay,
                    max_attempts,
                    window,
                },
            );
        let health = (probe(), ms(), ms(), any::<u32>(), ms()).prop_map(
            |(probe, interval, timeout, retries, start_period)| m::HealthCheck {
                probe,
                interval,
                timeout,
                retries,
                start_period,
            },
        );
        let port_config = (
            proptest::option::of(port()),
            port(),
            select(vec![m::Protocol::Tcp, m::Protocol::Udp]),
            select(vec![m::PublishMode::Ingress, m::PublishMode::Host]),
        )
            .prop_map(|(published, target, protocol, mode)| m::PortConfig {
                published,
                target,
                protocol,
                mode,
            });
        let placement = (
            prop::collection::vec(constraint(), 0..3),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(constraints, max_replicas_per_node)| m::Placement {
                constraints,
                max_replicas_per_node,
            });
        let strings = || proptest::option::of(prop::collection::vec(text(), 0..3));
        (
            (text(), strings(), strings(), labels()),
            (
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
            ),
            prop::collection::vec(mount, 0..3),
            (resources(), resources()),
            restart,
            proptest::option::of(health),
            placement,
            (
                prop::collection::vec(port_config, 0..3),
                any::<bool>(),
                prop::collection::btree_map(text(), text(), 0..3),
                proptest::option::of(ms()),
            ),
        )
            .prop_map(
                |(
                    (image, command, entrypoint, env),
                    (user, working_dir, hostname),
                    mounts,
                    (limits, reservations),
                    restart_policy,
                    healthcheck,
                    placement,
                    (ports, host_network, labels, stop_grace_period),
                )| m::TaskTemplate {
                    image,
                    command,
                    entrypoint,
                    env,
                    user,
                    working_dir,
                    hostname,
                    mounts,
                    resources: m::ResourceRequirements {
                        limits,
                        reservations,
                    },
                    restart_policy,
                    healthcheck,
                    placement,
                    ports,
                    host_network,
                    labels,
                    stop_grace_period,
                    networks: Vec::new(),
                },
            )
    }

    fn service() -> impl Strategy<Value = m::Service> {
        let mode = prop_oneof![
            any::<u64>().prop_map(|replicas| m::ServiceMode::Replicated { replicas }),
            Just(m::ServiceMode::Global),
        ];
        let update = (
            any::<u64>(),
            ms(),
            select(vec![
                m::FailureAction::Pause,
                m::FailureAction::Continue,
                m::FailureAction::Rollback,
            ]),
            ms(),
            0u32..=1000,
            select(vec![m::UpdateOrder::StopFirst, m::UpdateOrder::StartFirst]),
        )
            .prop_map(
                |(parallelism, delay, failure_action, monitor, permille, order)| m::UpdateConfig {
                    parallelism,
                    delay,
                    failure_action,
                    monitor,
                    max_failure_ratio: f64::from(permille) / 1000.0,
                    order,
                },
            );
        let depends_on = proptest::collection::btree_map(
            ident(),
            select(vec![
                m::DependencyCondition::ServiceStarted,
                m::DependencyCondition::ServiceHealthy,
                m::DependencyCondition::ServiceCompletedSuccessfully,
            ]),
            0..3,
        );
        (
            ident(),
            (
                ident(),
                text(),
                mode,
                template(),
                proptest::option::of(update),
                depends_on,
            ),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(
                    id,
                    (name, stack, mode, task, update_config, depends_on),
                    spec_version,
                    version,
                )| {
                    m::Service {
                        id: m::ServiceId::new(id).expect("strategy makes valid ids"),
                        spec: m::ServiceSpec {
                            name,
                            stack,
                            mode,
                            task,
                            update_config,
                            endpoint_mode: Default::default(),
                            depends_on,
                        },
                        spec_version,
                        version,
                        virtual_ip: None,
                    }
                },
            )
    }

    fn task_state() -> impl Strategy<Value = m::TaskState> {
        select(vec![
            m::TaskState::New,
            m::TaskState::Pending,
            m::TaskState::Assigned,
            m::TaskState::Accepted,
            m::TaskState::Preparing,
            m::TaskState::Starting,
            m::TaskState::Running,
            m::TaskState::Complete,
            m::TaskState::Failed,
            m::TaskState::Rejected,
            m::TaskState::Shutdown,
            m::TaskState::Orphaned,
        ])
    }

    fn task_status() -> impl Strategy<Value = m::TaskStatus> {
        (
            task_state(),
            text(),
            proptest::option::of(text()),
            proptest::option::of(any::<i32>()),
            any::<u32>(),
            select(vec![
                m::Health::None,
                m::Health::Starting,
                m::Health::Healthy,
                m::Health::Unhealthy,
            ]),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(state, message, error, exit_code, restarts, health, timestamp_unix_ms)| {
                    m::TaskStatus {
                        state,
                        message,
                        error,
                        exit_code,
                        restarts,
                        health,
                        timestamp_unix_ms,
                    }
                },
            )
    }

    fn task() -> impl Strategy<Value = m::Task> {
        (
            (ident(), ident(), proptest::option::of(1u64..1000)),
            proptest::option::of(ident()),
            any::<u64>(),
            template(),
            select(vec![m::DesiredState::Running, m::DesiredState::Shutdown]),
            task_status(),
            (
                any::<u64>(),
                any::<u64>(),
                text(),
                any::<u32>(),
                proptest::option::of(any::<u64>()),
            ),
        )
            .prop_map(
                |(
                    (id, service, slot),
                    node,
                    spec_version,
                    spec,
                    desired_state,
                    status,
                    (generation, version, service_name, attempt, not_before_unix_ms),
                )| m::Task {
                    id: m::TaskId::new(id).expect("strategy makes valid ids"),
                    service: m::ServiceId::new(service).expect("strategy makes valid ids"),
                    slot,
                    node: node.map(|n| m::NodeId::new(n).expect("strategy makes valid ids")),
                    spec_version,
                    spec,
                    desired_state,
                    status,
                    generation,
                    version,
                    service_name,
                    attempt,
                    not_before_unix_ms,
                    address: None,
                },
            )
    }

    /// Domain → wire → bytes → wire → domain: the encoding step proves the
    /// conversions hold across a real protobuf round trip, not just in memory.
    fn through_bytes<D, W>(value: D) -> Result<D, WireError>
    where
        W: From<D> + gantry_proto::prost::Message + Default,
        D: TryFrom<W, Error = WireError>,
    {
        let bytes = gantry_proto::prost::Message::encode_to_vec(&W::from(value));
        let wire = W::decode(bytes.as_slice()).expect("decodes what it encoded");
        D::try_from(wire)
    }

    proptest! {
        #[test]
        fn node_round_trips(node in node()) {
            prop_assert_eq!(through_bytes::<_, pb::Node>(node.clone()), Ok(node));
        }

        #[test]
        fn service_round_trips(service in service()) {
            prop_assert_eq!(through_bytes::<_, pb::Service>(service.clone()), Ok(service));
        }

        #[test]
        fn task_round_trips(task in task()) {
            prop_assert_eq!(through_bytes::<_, pb::Task>(task.clone()), Ok(task));
        }

        #[test]
        fn status_report_round_trips(
            task in ident(), generation in any::<u64>(), status in task_status()
        ) {
            let report = StatusReport {
                task: m::TaskId::new(task).expect("valid id"),
                generation,
                status,
            };
            prop_assert_eq!(
                through_bytes::<_, pb::TaskStatusUpdate>(report.clone()),
                Ok(report)
            );
        }

        #[test]
        fn registration_round_trips(
            node in ident(), hostname in text(), address in text(),
            resources in resources(), labels in labels(), platform in platform(),
            protocol_version in any::<u32>(), last_generation in any::<u64>(),
        ) {
            let registration = Registration {
                node: m::NodeId::new(node).expect("valid id"),
                hostname, address, resources, labels, platform,
                protocol_version, last_generation,
            };
            prop_assert_eq!(
                through_bytes::<_, pb::Hello>(registration.clone()),
                Ok(registration)
            );
        }

        #[test]
        fn assignments_round_trip(
            generation in any::<u64>(),
            full in any::<bool>(),
            changes in prop::collection::vec(
                prop_oneof![
                    task().prop_map(AssignmentChange::Update),
                    ident().prop_map(|id| AssignmentChange::Remove(
                        m::TaskId::new(id).expect("valid id")
                    )),
                ],
                0..4,
            ),
        ) {
            let changes = if full {
                changes.into_iter().filter(|c| matches!(c, AssignmentChange::Update(_))).collect()
            } else {
                changes
            };
            let set = Assignments { generation, full, changes };
            prop_assert_eq!(through_bytes::<_, pb::AssignmentSet>(set.clone()), Ok(set));
        }

        /// Whatever bytes arrive, decoding then converting never panics: a
        /// peer's garbage is an error, not a crashed controller.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            use gantry_proto::prost::Message;
            if let Ok(wire) = pb::Task::decode(bytes.as_slice()) {
                let _ = m::Task::try_from(wire);
            }
            if let Ok(wire) = pb::Service::decode(bytes.as_slice()) {
                let _ = m::Service::try_from(wire);
            }
            if let Ok(wire) = pb::Node::decode(bytes.as_slice()) {
                let _ = m::Node::try_from(wire);
            }
        }
    }

    // -- errors name the field ---------------------------------------------

    fn sample_task() -> pb::Task {
        pb::Task::from(m::Task {
            id: m::TaskId::new("t1").expect("valid"),
            service: m::ServiceId::new("s1").expect("valid"),
            slot: Some(1),
            node: None,
            spec_version: 1,
            spec: m::TaskTemplate {
                image: "busybox".into(),
                placement: m::Placement {
                    constraints: vec![Constraint::parse("node.labels.zone==eu").expect("valid")],
                    max_replicas_per_node: None,
                },
                ports: vec![m::PortConfig {
                    published: Some(8080),
                    target: 80,
                    protocol: m::Protocol::Tcp,
                    mode: m::PublishMode::Ingress,
                }],
                ..m::TaskTemplate::default()
            },
            desired_state: m::DesiredState::Running,
            status: m::TaskStatus::default(),
            generation: 1,
            version: 1,
            service_name: "demo_web".into(),
            attempt: 0,
            not_before_unix_ms: None,
            address: None,
        })
    }

    /// Each case breaks one field of a valid task and states the message a
    /// user (or the lead reading a log) would see.
    #[test]
    fn task_errors_name_the_field() {
        type Break = fn(&mut pb::Task);
        let cases: Vec<(&str, Break)> = vec![
            (
                "field id: invalid task id \"\": must be non-empty without whitespace",
                |t| t.id.clear(),
            ),
            (
                "field node: invalid node id \"a b\": must be non-empty without whitespace",
                |t| t.node = Some("a b".into()),
            ),
            ("missing field spec", |t| t.spec = None),
            ("field desired_state is unspecified", |t| {
                t.desired_state = 0
            }),
            ("field status.state: unknown enum value 99", |t| {
                if let Some(s) = t.status.as_mut() {
                    s.state = 99;
                }
            }),
            ("field status.health is unspecified", |t| {
                if let Some(s) = t.status.as_mut() {
                    s.health = 0;
                }
            }),
            ("missing field spec.restart_policy", |t| {
                if let Some(s) = t.spec.as_mut() {
                    s.restart_policy = None;
                }
            }),
            ("field spec.restart_policy.condition is unspecified", |t| {
                if let Some(p) = t.spec.as_mut().and_then(|s| s.restart_policy.as_mut()) {
                    p.condition = 0;
                }
            }),
            (
                "field spec.ports[0].target: port 70000 is out of range 1-65535",
                |t| {
                    if let Some(s) = t.spec.as_mut() {
                        s.ports[0].target = 70_000;
                    }
                },
            ),
            (
                "field spec.ports[0].published: port 0 is out of range 1-65535",
                |t| {
                    if let Some(s) = t.spec.as_mut() {
                        s.ports[0].published = Some(0);
                    }
                },
            ),
            (
                "field spec.placement.constraints[0].key is unspecified",
                |t| {
                    if let Some(p) = t.spec.as_mut().and_then(|s| s.placement.as_mut()) {
                        p.constraints[0].key = 0;
                    }
                },
            ),
            (
                "field spec.placement.constraints[0].label: label \"zone\" is only allowed \
                 with key CONSTRAINT_KEY_LABEL",
                |t| {
                    if let Some(p) = t.spec.as_mut().and_then(|s| s.placement.as_mut()) {
                        p.constraints[0].key = pb::ConstraintKey::Hostname as i32;
                    }
                },
            ),
            (
                "field spec.placement.constraints[0].value: constraint \"node.labels.zone==\": \
                 empty value",
                |t| {
                    if let Some(p) = t.spec.as_mut().and_then(|s| s.placement.as_mut()) {
                        p.constraints[0].value.clear();
                    }
                },
            ),
            (
                "field spec.placement.constraints[0].value: constraint \"node.labels.zone==a==b\": \
                 more than one operator",
                |t| {
                    if let Some(p) = t.spec.as_mut().and_then(|s| s.placement.as_mut()) {
                        p.constraints[0].value = "a==b".into();
                    }
                },
            ),
            (
                "field spec.placement.constraints[0].value: constraint \"node.labels.zone== eu\": \
                 label or value has surrounding spaces or an operator",
                |t| {
                    if let Some(p) = t.spec.as_mut().and_then(|s| s.placement.as_mut()) {
                        p.constraints[0].value = " eu".into();
                    }
                },
            ),
            ("missing field spec.healthcheck.probe", |t| {
                if let Some(s) = t.spec.as_mut() {
                    s.healthcheck = Some(pb::HealthCheck::default());
                }
            }),
        ];
        assert!(
            m::Task::try_from(sample_task()).is_ok(),
            "the sample is valid"
        );
        for (want, break_it) in cases {
            let mut wire = sample_task();
            break_it(&mut wire);
            let got = m::Task::try_from(wire).map_err(|e| e.to_string());
            assert_eq!(got, Err(want.to_string()));
        }
    }

    #[test]
    fn node_and_service_errors_name_the_field() {
        let node = pb::Node {
            id: "n1".into(),
            spec: Some(pb::NodeSpec::default()),
            status: Some(pb::NodeStatus::default()),
            version: 0,
            subnet: String::new(),
        };
        let err = m::Node::try_from(node).map_err(|e| e.to_string());
        assert_eq!(err, Err("field spec.availability is unspecified".into()));

        let service = pb::Service {
            id: "s1".into(),
            spec: Some(pb::ServiceSpec {
                name: "web".into(),
                mode: Some(pb::ServiceMode { mode: None }),
                ..pb::ServiceSpec::default()
            }),
            ..pb::Service::default()
        };
        let err = m::Service::try_from(service).map_err(|e| e.to_string());
        assert_eq!(err, Err("missing field spec.mode.mode".into()));

        let hello = pb::Hello {
            node_id: "n1".into(),
            resources: Some(pb::Resources::default()),
            ..pb::Hello::default()
        };
        let err = Registration::try_from(hello).map_err(|e| e.field().to_string());
        assert_eq!(err, Err("platform".into()));
    }

    #[test]
    fn assignment_errors_name_the_change() {
        let remove = AssignmentChange::Remove(m::TaskId::new("t9").expect("valid"));
        let mut set = pb::AssignmentSet::from(Assignments {
            generation: 3,
            full: false,
            changes: vec![
                AssignmentChange::Update(m::Task::try_from(sample_task()).expect("valid sample")),
                remove,
            ],
        });
        assert!(Assignments::try_from(set.clone()).is_ok());

        set.full = true;
        let err = Assignments::try_from(set.clone()).map_err(|e| e.to_string());
        assert_eq!(
            err,
            Err("field changes[1].action: a full assignment set may only hold updates".into())
        );

        set.full = false;
        if let Some(t) = set.changes[0].task.as_mut() {
            t.desired_state = 0;
        }
        let err = Assignments::try_from(set.clone()).map_err(|e| e.to_string());
        assert_eq!(
            err,
            Err("field changes[0].task.desired_state is unspecified".into())
        );

        set.changes[1].action = 0;
        set.changes[0] = set.changes[1].clone();
        let err = Assignments::try_from(set).map_err(|e| e.to_string());
        assert_eq!(err, Err("field changes[0].action is unspecified".into()));
    }

    #[test]
    fn stop_grace_period_reaches_the_agent_in_milliseconds() {
        let template = m::TaskTemplate {
            image: "busybox".into(),
            stop_grace_period: Some(Duration::from_millis(2500)),
            ..m::TaskTemplate::default()
        };
        let wire = pb::TaskTemplate::from(template.clone());
        assert_eq!(wire.stop_grace_period_ms, Some(2500));
        assert_eq!(m::TaskTemplate::try_from(wire), Ok(template));
        let unset = pb::TaskTemplate::from(m::TaskTemplate::default());
        assert_eq!(unset.stop_grace_period_ms, None);
    }

    #[test]
    fn entrypoint_absent_and_empty_stay_distinct() {
        for entrypoint in [None, Some(vec![])] {
            let template = m::TaskTemplate {
                image: "busybox".into(),
                entrypoint: entrypoint.clone(),
                ..m::TaskTemplate::default()
            };
            let back = m::TaskTemplate::try_from(pb::TaskTemplate::from(template));
            assert_eq!(back.map(|t| t.entrypoint), Ok(entrypoint));
        }
    }

    #[test]
    fn task_state_filters_convert_both_ways() {
        assert_eq!(
            pb::TaskState::from(m::TaskState::Running),
            pb::TaskState::Running
        );
        assert_eq!(
            m::TaskState::try_from(pb::TaskState::Orphaned),
            Ok(m::TaskState::Orphaned)
        );
        assert_eq!(
            task_state_from_wire(0, "states[2]").map_err(|e| e.to_string()),
            Err("field states[2] is unspecified".into())
        );
    }

    // -- stacks ------------------------------------------------------------

    #[test]
    fn normalized_stack_fixture_survives_the_deploy_payload() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/compose/ok/realistic/expected.json"
        );
        let fixture = std::fs::read(path).expect("fixture exists");
        let stack = stack_from_json(&fixture).expect("the fixture is a normalized stack");
        assert_eq!(stack.name, "shop");
        let payload = stack_to_json(&stack).expect("encodes");
        assert_eq!(stack_from_json(&payload), Ok(stack));
    }

    #[test]
    fn a_bad_stack_payload_says_where() {
        let err =
            stack_from_json(b"{\"name\": \"shop\",\n \"services\": 3}").map_err(|e| e.to_string());
        let msg = err.expect_err("refused");
        assert!(msg.starts_with("field stack_json: "), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn stack_changes_round_trip() {
        let changes = StackChanges {
            create: vec!["web".into()],
            update: vec![ServiceUpdate {
                service: "db".into(),
                fields: vec!["image".into(), "deploy.replicas".into()],
            }],
            remove: vec!["old".into()],
            volumes: ObjectChanges {
                create: vec!["data".into()],
                ..ObjectChanges::default()
            },
            networks: ObjectChanges::default(),
        };
        let back = StackChanges::from(pb::StackChanges::from(changes.clone()));
        assert_eq!(back, changes);
    }
}
