//! What client commands print: aligned tables for people (the columns of
//! `docker service ls`, `docker service ps` and `docker node ls`), and the
//! same data as JSON or YAML (`-o json|yaml`) for scripts.
//!
//! Rows are built from the controller's model types (the wire messages are
//! converted with `gantry_controller::wire` first), so the strings printed for
//! states and modes are the model's own serde names: a script reading
//! `-o json` sees `"running"`, `"pending"`, `"drain"`, exactly as the model
//! and the JSON of `events` spell them.
//!
//! Decisions a reader should know:
//! - In JSON a task's `service` is the service's name within its stack and
//!   `stack` its stack (as in the Compose file); tables show Swarm's
//!   `STACK_NAME.SLOT` so that a name can be pasted into `service ps`.
//! - A task's `node` is the node's hostname when the node is known (what a
//!   person compares with `node ls`) and `node_id` its id.
//! - A pending task's `error` is the scheduler's reason for not placing it,
//!   as in Swarm's `service ps`; the raw status note is also in `message`.
//! - Lists are JSON arrays (one document), not JSON lines; `events -o json`
//!   is the exception, one object per line, since it never ends.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use gantry_controller::model as m;
use serde::Serialize;

/// How to print a command's result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON, for scripts.
    Json,
    /// YAML, for scripts.
    Yaml,
}

/// Prints `value` as JSON or YAML, or calls `table` for people.
pub fn emit<T: Serialize>(
    format: Format,
    value: &T,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let text = render(format, value, table)?;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // `gantry ps | head -3` closes the pipe early: that is the reader's
        // choice, not a failure (and `print!` would panic on it).
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// What [`emit`] prints, as a string (tests compare it).
pub fn render<T: Serialize>(
    format: Format,
    value: &T,
    table: impl FnOnce() -> String,
) -> anyhow::Result<String> {
    Ok(match format {
        Format::Table => table(),
        Format::Json => format!("{}\n", serde_json::to_string_pretty(value)?),
        Format::Yaml => serde_norway::to_string(value)?,
    })
}

/// An aligned table: every column but the last padded to its widest cell
/// plus three spaces, as Docker's tabwriter does.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (as many cells as headers).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = widths[i] - cell.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// Ids are shown shortened in tables, like Docker's 12 characters; JSON has
/// them whole.
pub fn short_id(id: &str) -> String {
    id.chars().take(12).collect()
}

/// A service's name as Swarm prints it: `STACK_NAME`, or `NAME` outside a
/// stack. This is also a name `ServiceRef` accepts.
pub fn full_name(stack: &str, name: &str) -> String {
    if stack.is_empty() {
        name.to_string()
    } else {
        format!("{stack}_{name}")
    }
}

/// The serde name of a model enum value (`"running"`, `"drain"`).
pub fn serde_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

/// `running` → `Running`, for table cells (Docker capitalizes states).
pub fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A duration as Docker's `HumanDuration` prints it ("5 seconds",
/// "About a minute", "3 hours").
pub fn human_duration(d: Duration) -> String {
    let seconds = d.as_secs();
    let minutes = seconds / 60;
    let hours = minutes / 60;
    match () {
        _ if seconds < 1 => "Less than a second".into(),
        _ if seconds == 1 => "1 second".into(),
        _ if seconds < 60 => format!("{seconds} seconds"),
        _ if minutes == 1 => "About a minute".into(),
        _ if minutes < 60 => format!("{minutes} minutes"),
        _ if hours == 1 => "About an hour".into(),
        _ if hours < 48 => format!("{hours} hours"),
        _ if hours < 24 * 7 * 2 => format!("{} days", hours / 24),
        _ if hours < 24 * 30 * 2 => format!("{} weeks", hours / 24 / 7),
        _ if hours < 24 * 365 * 2 => format!("{} months", hours / 24 / 30),
        _ => format!("{} years", hours / 24 / 365),
    }
}

/// The CURRENT STATE cell: `Running 5 seconds ago`, or just `Running` when
/// the time of the last state change is not known.
pub fn current_state(state: m::TaskState, since: Option<Duration>) -> String {
    let state = capitalize(state.as_str());
    match since {
        Some(d) => format!("{state} {} ago", human_duration(d).to_lowercase()),
        None => state,
    }
}

/// How long before `now` a task's state changed, from its status timestamp
/// (Unix milliseconds); `None` without one. A time a little ahead of `now`
/// (another node's clock) reads as just now.
pub fn since(timestamp_unix_ms: Option<u64>, now: SystemTime) -> Option<Duration> {
    let at = UNIX_EPOCH + Duration::from_millis(timestamp_unix_ms?);
    Some(now.duration_since(at).unwrap_or_default())
}

/// CPU as `docker node inspect` prints it: `2`, `1.5`.
pub fn cpus(nano_cpus: u64) -> String {
    let whole = nano_cpus / 1_000_000_000;
    let frac = nano_cpus % 1_000_000_000;
    if frac == 0 {
        whole.to_string()
    } else {
        let s = format!("{:.3}", nano_cpus as f64 / 1e9);
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A published port as Swarm's `service ls` shows it: `*:8080->80/tcp` for
/// the routing mesh, `8080->80/tcp (host)` for host mode; a port the node
/// picks shows without its published half.
pub fn port(p: &m::PortConfig) -> String {
    let proto = serde_name(&p.protocol);
    let host = p.mode == m::PublishMode::Host;
    match (p.published, host) {
        (Some(published), false) => format!("*:{published}->{}/{proto}", p.target),
        (Some(published), true) => format!("{published}->{}/{proto} (host)", p.target),
        (None, false) => format!("*:->{}/{proto}", p.target),
        (None, true) => format!("->{}/{proto} (host)", p.target),
    }
}

/// Names to show for ids: services by id, nodes by id.
#[derive(Debug, Clone, Default)]
pub struct Names {
    /// Service id → (stack, name).
    pub services: HashMap<String, (String, String)>,
    /// Node id → hostname.
    pub nodes: HashMap<String, String>,
}

impl Names {
    /// Records the names of these services and nodes.
    pub fn new<'a>(
        services: impl IntoIterator<Item = &'a m::Service>,
        nodes: impl IntoIterator<Item = &'a m::Node>,
    ) -> Names {
        Names {
            services: services
                .into_iter()
                .map(|s| {
                    (
                        s.id.to_string(),
                        (s.spec.stack.clone(), s.spec.name.clone()),
                    )
                })
                .collect(),
            nodes: nodes
                .into_iter()
                .map(|n| (n.id.to_string(), n.status.hostname.clone()))
                .collect(),
        }
    }
}

/// A task as `ps`, `service ps` and `stack ps` print it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRow {
    /// The task's id.
    pub id: String,
    /// `STACK_NAME.SLOT` (or `STACK_NAME.NODEID12` for a global service).
    pub name: String,
    /// The service's name within its stack (its id if unknown).
    pub service: String,
    /// The service's stack.
    pub stack: String,
    /// The service's id.
    pub service_id: String,
    /// The slot of a replicated service's task.
    pub slot: Option<u64>,
    /// The node's hostname (its id if unknown); absent before placement.
    pub node: Option<String>,
    /// The node's id.
    pub node_id: Option<String>,
    /// The task's overlay address; absent on the host network or before
    /// it is assigned.
    pub address: Option<String>,
    /// The image.
    pub image: String,
    /// What the controller wants: `running` or `shutdown`.
    pub desired_state: String,
    /// What the agent reports: `pending`, `running`, `failed`, …
    pub state: String,
    /// The main process's last exit code.
    pub exit_code: Option<i32>,
    /// In-place restarts.
    pub restarts: u32,
    /// `none`, `starting`, `healthy` or `unhealthy`.
    pub health: String,
    /// Why it failed, or why a pending task is not placed.
    pub error: Option<String>,
    /// The status note as the controller or agent wrote it.
    pub message: String,
    /// The time since the last state change, when known; the table shows it
    /// as "Running 5 seconds ago".
    #[serde(skip)]
    pub since: Option<Duration>,
    /// The state, typed, for the table.
    #[serde(skip)]
    pub task_state: m::TaskState,
}

impl TaskRow {
    /// Builds a row. `since` is how long ago the task entered its state
    /// ([`since`] of its status timestamp), `None` when unknown.
    pub fn new(task: &m::Task, names: &Names, since: Option<Duration>) -> TaskRow {
        let service_id = task.service.to_string();
        let (stack, service) = names
            .services
            .get(&service_id)
            .cloned()
            .unwrap_or_else(|| (String::new(), service_id.clone()));
        let node_id = task.node.as_ref().map(|n| n.to_string());
        let node = node_id.as_ref().map(|id| {
            names
                .nodes
                .get(id)
                .filter(|h| !h.is_empty())
                .cloned()
                .unwrap_or_else(|| id.clone())
        });
        // Swarm names a global task `<service>.<node id>`; the id is cut to
        // 12 characters like every id in a table.
        let suffix = match (task.slot, &node_id) {
            (Some(slot), _) => slot.to_string(),
            (None, Some(node)) => short_id(node),
            (None, None) => short_id(task.id.as_str()),
        };
        // A task of a removed service still carries the name it was made
        // with.
        let full = if names.services.contains_key(&service_id) || task.service_name.is_empty() {
            full_name(&stack, &service)
        } else {
            task.service_name.clone()
        };
        let pending = task.status.state.rank() <= m::TaskState::Pending.rank();
        let error = task.status.error.clone().or_else(|| {
            (pending && !task.status.message.is_empty()).then(|| task.status.message.clone())
        });
        TaskRow {
            id: task.id.to_string(),
            name: format!("{full}.{suffix}"),
            service,
            stack,
            service_id,
            slot: task.slot,
            node,
            node_id,
            address: task.address.map(|a| a.to_string()),
            image: task.spec.image.clone(),
            desired_state: serde_name(&task.desired_state),
            state: task.status.state.as_str().to_string(),
            exit_code: task.status.exit_code,
            restarts: task.status.restarts,
            health: serde_name(&task.status.health),
            error,
            message: task.status.message.clone(),
            since,
            task_state: task.status.state,
        }
    }
}

/// The table of `ps`, `service ps` and `stack ps`.
pub fn task_table(rows: &[TaskRow]) -> String {
    let mut table = Table::new(&[
        "ID",
        "NAME",
        "IMAGE",
        "NODE",
        "ADDRESS",
        "DESIRED STATE",
        "CURRENT STATE",
        "RESTARTS",
        "HEALTH",
        "ERROR",
    ]);
    for r in rows {
        table.row(vec![
            short_id(&r.id),
            r.name.clone(),
            r.image.clone(),
            r.node.clone().unwrap_or_default(),
            r.address.clone().unwrap_or_default(),
            capitalize(&r.desired_state),
            current_state(r.task_state, r.since),
            r.restarts.to_string(),
            if r.health == "none" {
                String::new()
            } else {
                r.health.clone()
            },
            r.error.as_deref().map(quote_error).unwrap_or_default(),
        ]);
    }
    table.to_string()
}

/// Errors in a table cell are on one line, quoted as Docker does, so that a
/// multi-line reason cannot break the columns.
fn quote_error(error: &str) -> String {
    format!("\"{}\"", error.replace('\n', " "))
}

/// A service as `service ls` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceRow {
    /// The service's id.
    pub id: String,
    /// Its name within its stack.
    pub name: String,
    /// Its stack.
    pub stack: String,
    /// `replicated` or `global`.
    pub mode: String,
    /// The replica count a replicated service asks for; absent for global.
    pub replicas: Option<u64>,
    /// Tasks running now.
    pub running: u64,
    /// Tasks wanted (replicas, or eligible nodes for a global service).
    pub desired: u64,
    /// The image.
    pub image: String,
    /// Published ports, as the table shows them.
    pub ports: Vec<String>,
    /// `vip` or `dnsrr` (Compose `deploy.endpoint_mode`).
    pub endpoint_mode: String,
    /// The virtual IP from the service CIDR (Docker's
    /// `Endpoint.VirtualIPs`); absent for dnsrr and host-network services.
    pub virtual_ip: Option<String>,
}

impl ServiceRow {
    /// Builds a row from a service and its counts.
    pub fn new(service: &m::Service, running: u64, desired: u64) -> ServiceRow {
        let (mode, replicas) = match service.spec.mode {
            m::ServiceMode::Replicated { replicas } => ("replicated", Some(replicas)),
            m::ServiceMode::Global => ("global", None),
        };
        ServiceRow {
            id: service.id.to_string(),
            name: service.spec.name.clone(),
            stack: service.spec.stack.clone(),
            mode: mode.to_string(),
            replicas,
            running,
            desired,
            image: service.spec.task.image.clone(),
            ports: service.spec.task.ports.iter().map(port).collect(),
            endpoint_mode: service.spec.endpoint_mode.as_str().to_string(),
            virtual_ip: service.virtual_ip.map(|ip| ip.to_string()),
        }
    }
}

/// The table of `service ls`.
pub fn service_table(rows: &[ServiceRow]) -> String {
    let mut table = Table::new(&["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS", "VIP"]);
    for r in rows {
        table.row(vec![
            short_id(&r.id),
            full_name(&r.stack, &r.name),
            r.mode.clone(),
            format!("{}/{}", r.running, r.desired),
            r.image.clone(),
            r.ports.join(", "),
            r.virtual_ip.clone().unwrap_or_default(),
        ]);
    }
    table.to_string()
}

/// A node's resources in JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeResources {
    /// CPUs (fractional).
    pub cpus: f64,
    /// CPU in billionths of a CPU.
    pub nano_cpus: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// A node as `node ls` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeRow {
    /// The node's id.
    pub id: String,
    /// Its hostname.
    pub hostname: String,
    /// `ready`, `down` or `unknown`.
    pub status: String,
    /// `active`, `pause` or `drain`.
    pub availability: String,
    /// `manager` or `worker`.
    pub role: String,
    /// The address its agent reports.
    pub address: String,
    /// Its slice of the cluster CIDR (overlay subnet).
    pub subnet: Option<String>,
    /// Operator and agent labels.
    pub labels: BTreeMap<String, String>,
    /// What it offers to tasks.
    pub resources: NodeResources,
    /// Tasks placed on it that are meant to run.
    pub tasks: u64,
}

impl NodeRow {
    /// Builds a row from a node and the number of its live tasks.
    pub fn new(node: &m::Node, tasks: u64) -> NodeRow {
        let r = node.status.resources;
        NodeRow {
            id: node.id.to_string(),
            hostname: node.status.hostname.clone(),
            status: serde_name(&node.status.state),
            availability: serde_name(&node.spec.availability),
            role: node.spec.role.as_str().to_string(),
            address: node.status.address.clone(),
            subnet: node.subnet.map(|s| s.to_string()),
            labels: node.spec.labels.clone(),
            resources: NodeResources {
                cpus: r.nano_cpus as f64 / 1e9,
                nano_cpus: r.nano_cpus,
                memory_bytes: r.memory_bytes,
            },
            tasks,
        }
    }
}

/// The table of `node ls`.
pub fn node_table(rows: &[NodeRow]) -> String {
    let mut table = Table::new(&[
        "ID",
        "HOSTNAME",
        "STATUS",
        "AVAILABILITY",
        "ADDRESS",
        "CPUS",
        "MEMORY",
        "TASKS",
    ]);
    for r in rows {
        table.row(vec![
            short_id(&r.id),
            r.hostname.clone(),
            capitalize(&r.status),
            capitalize(&r.availability),
            r.address.clone(),
            cpus(r.resources.nano_cpus),
            crate::cmd::binary_size(r.resources.memory_bytes),
            r.tasks.to_string(),
        ]);
    }
    table.to_string()
}

#[cfg(test)]
mod tests;
