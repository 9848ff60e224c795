//! The state machine: cluster objects changed only by [`Command`]s applied in
//! log order.
//!
//! [`StateMachine::apply`] is deterministic: it reads only the current state,
//! the command and its log index, so every replica that applies the same log
//! reaches the same state and refuses the same commands. A refused command
//! changes nothing but still takes its log index (the index is already in
//! every replica's log), so the applied index moves past it.
//!
//! **Invariant:** every object's `version` is the log index of the command
//! that last changed it, and the applied index is at least every version.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::command::{self, Command, CommandError, DesiredStateChange, PendingTask};
use super::watch::{Event, EventKind, Object};
use crate::model::{
    DesiredState, ModelError, Node, NodeId, NodeSpec, NodeStatus, Service, ServiceId, ServiceSpec,
    Task, TaskId, TaskState, TaskStatus,
};
use crate::network::{self, Addressing, Ipv4Cidr, NODE_SUBNET_PREFIX};
use crate::scheduler::Assignment;

/// Why a command was not applied.
///
/// Every variant except [`ApplyError::OutOfOrder`] and
/// [`ApplyError::Decode`] is a *refusal*: deterministic, the index is used
/// up, nothing changed (see [`ApplyError::is_refusal`]).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The index is not the one after the applied index; nothing happened.
    #[error("log index {got} applied out of order: expected {expected}")]
    OutOfOrder {
        /// The applied index plus one.
        expected: u64,
        /// The index given.
        got: u64,
    },
    /// The entry's bytes are not a command this build reads; nothing
    /// happened, and the replica must stop rather than skip it.
    #[error("log index {index}: {source}")]
    Decode {
        /// The entry's index.
        index: u64,
        /// What is wrong.
        #[source]
        source: CommandError,
    },
    /// A command names an object that does not exist.
    #[error("{command}: {kind} {id} not found")]
    NotFound {
        /// The command's name.
        command: &'static str,
        /// `node`, `service` or `task`.
        kind: &'static str,
        /// The missing object's id.
        id: String,
    },
    /// A command creates an object that already exists.
    #[error("{command}: {kind} {id} already exists")]
    AlreadyExists {
        /// The command's name.
        command: &'static str,
        /// `node`, `service` or `task`.
        kind: &'static str,
        /// The object's id.
        id: String,
    },
    /// A field of the command does not fit the object's current state.
    #[error("{command}: {kind} {id} field {field}: {reason}")]
    Invalid {
        /// The command's name.
        command: &'static str,
        /// `node`, `service` or `task`.
        kind: &'static str,
        /// The object's id.
        id: String,
        /// The field, as a dotted path (`status.state`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An agent's report would move a task's state backwards.
    #[error("update-task-status: {0}")]
    Backward(#[source] ModelError),
}

impl ApplyError {
    /// Whether this is a deterministic refusal that used up its log index
    /// (as opposed to a caller or decoding error that changed nothing).
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            ApplyError::OutOfOrder { .. } | ApplyError::Decode { .. }
        )
    }
}

/// What an applied command did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplyOutcome {
    /// The command's log index.
    pub index: u64,
    /// One event per object changed, in the order they were changed. Empty
    /// when the command repeated what was already there.
    pub events: Vec<Event>,
}

/// The whole state at an applied index: what a new replica or a restarted
/// controller restores from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The index of the last command the state includes.
    pub applied_index: u64,
    /// Every node, ordered by id.
    pub nodes: Vec<Node>,
    /// Every service, ordered by id.
    pub services: Vec<Service>,
    /// Every task, ordered by id.
    pub tasks: Vec<Task>,
    /// The cluster's address plan, once set (absent in version 1).
    #[serde(default)]
    pub addressing: Option<Addressing>,
}

/// The snapshot encoding version: 2 added the address plan and the
/// allocations in the objects (all optional, so version 1 still reads).
const SNAPSHOT_VERSION: u32 = 2;

/// The oldest snapshot version this build reads.
const SNAPSHOT_VERSION_MIN: u32 = 1;

#[derive(Serialize)]
struct SnapshotOut<'a> {
    v: u32,
    snapshot: &'a Snapshot,
}

#[derive(Deserialize)]
struct SnapshotIn {
    v: u32,
    snapshot: Snapshot,
}

/// Errors from encoding or decoding a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot could not be serialized or parsed.
    #[error("snapshot is not valid: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The snapshot was written with another encoding version.
    #[error(
        "snapshot encoding version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// The version in the snapshot.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
}

impl Snapshot {
    /// Encodes the snapshot (versioned JSON, like commands).
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        serde_json::to_vec(&SnapshotOut {
            v: SNAPSHOT_VERSION,
            snapshot: self,
        })
        .map_err(SnapshotError::Malformed)
    }

    /// Decodes bytes written by [`Snapshot::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        let s: SnapshotIn = serde_json::from_slice(bytes).map_err(SnapshotError::Malformed)?;
        if !(SNAPSHOT_VERSION_MIN..=SNAPSHOT_VERSION).contains(&s.v) {
            return Err(SnapshotError::UnsupportedVersion {
                found: s.v,
                supported: SNAPSHOT_VERSION,
            });
        }
        Ok(s.snapshot)
    }
}

/// The cluster state, in memory. Pure: no I/O, no clock.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateMachine {
    applied_index: u64,
    nodes: BTreeMap<NodeId, Node>,
    services: BTreeMap<ServiceId, Service>,
    tasks: BTreeMap<TaskId, Task>,
    /// Secondary index: tasks by service (kept in step with `tasks`).
    by_service: BTreeMap<ServiceId, BTreeSet<TaskId>>,
    /// Secondary index: tasks by node (kept in step with `tasks`).
    by_node: BTreeMap<NodeId, BTreeSet<TaskId>>,
    /// The address plan, once set.
    addressing: Option<Addressing>,
    /// Index: node subnets held (kept in step with `nodes`).
    subnets: BTreeMap<Ipv4Cidr, NodeId>,
    /// Index: task addresses held (kept in step with `tasks`).
    addresses: BTreeMap<Ipv4Addr, TaskId>,
    /// Index: virtual IPs held (kept in step with `services`).
    vips: BTreeMap<Ipv4Addr, ServiceId>,
}

impl StateMachine {
    /// An empty state at index 0.
    pub fn new() -> StateMachine {
        StateMachine::default()
    }

    /// The index of the last entry applied (refused ones included).
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The cluster's address plan, once set.
    pub fn addressing(&self) -> Option<&Addressing> {
        self.addressing.as_ref()
    }

    /// The task holding `address`, if any.
    pub fn task_at(&self, address: Ipv4Addr) -> Option<&TaskId> {
        self.addresses.get(&address)
    }

    /// A node by id.
    pub fn node(&self, id: &NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// A service by id.
    pub fn service(&self, id: &ServiceId) -> Option<&Service> {
        self.services.get(id)
    }

    /// A task by id.
    pub fn task(&self, id: &TaskId) -> Option<&Task> {
        self.tasks.get(id)
    }

    /// Every node, ordered by id.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    /// Every service, ordered by id.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.values()
    }

    /// Every task, ordered by id.
    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values()
    }

    /// A service's tasks (including those of a removed service), ordered by id.
    pub fn tasks_of_service(&self, service: &ServiceId) -> impl Iterator<Item = &Task> {
        self.by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tasks.get(id))
    }

    /// The tasks assigned or pinned to a node, ordered by id.
    pub fn tasks_on_node(&self, node: &NodeId) -> impl Iterator<Item = &Task> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tasks.get(id))
    }

    /// The whole state, for persisting or sending to a replica.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            applied_index: self.applied_index,
            nodes: self.nodes.values().cloned().collect(),
            services: self.services.values().cloned().collect(),
            tasks: self.tasks.values().cloned().collect(),
            addressing: self.addressing,
        }
    }

    /// Replaces the whole state with `snapshot`.
    pub fn restore(&mut self, snapshot: Snapshot) {
        let mut sm = StateMachine {
            applied_index: snapshot.applied_index,
            addressing: snapshot.addressing,
            ..StateMachine::default()
        };
        for node in snapshot.nodes {
            if let Some(subnet) = node.subnet {
                sm.subnets.insert(subnet, node.id.clone());
            }
            sm.nodes.insert(node.id.clone(), node);
        }
        for service in snapshot.services {
            if let Some(vip) = service.virtual_ip {
                sm.vips.insert(vip, service.id.clone());
            }
            sm.services.insert(service.id.clone(), service);
        }
        for task in snapshot.tasks {
            sm.put_task(task);
        }
        *self = sm;
    }

    /// Applies a log entry's bytes: empty bytes are a no-op entry (Raft
    /// appends one when a leader is elected) that only moves the applied
    /// index; anything else must decode to a [`Command`].
    pub fn apply_entry(&mut self, index: u64, data: &[u8]) -> Result<ApplyOutcome, ApplyError> {
        self.check_index(index)?;
        if data.is_empty() {
            self.applied_index = index;
            return Ok(ApplyOutcome {
                index,
                events: Vec::new(),
            });
        }
        let command =
            command::decode(data).map_err(|source| ApplyError::Decode { index, source })?;
        self.apply(index, &command)
    }

    /// Applies `command` at log `index`, which must be the applied index plus
    /// one. On a refusal nothing changes but the applied index, which moves
    /// to `index` all the same.
    pub fn apply(&mut self, index: u64, command: &Command) -> Result<ApplyOutcome, ApplyError> {
        self.check_index(index)?;
        self.applied_index = index;
        let events = self.execute(index, command)?;
        Ok(ApplyOutcome { index, events })
    }

    fn check_index(&self, index: u64) -> Result<(), ApplyError> {
        let expected = self.applied_index + 1;
        if index != expected {
            return Err(ApplyError::OutOfOrder {
                expected,
                got: index,
            });
        }
        Ok(())
    }

    /// Validates then changes. Each arm checks everything before its first
    /// mutation, so that a refusal leaves the state untouched.
    fn execute(&mut self, index: u64, command: &Command) -> Result<Vec<Event>, ApplyError> {
        let name = command.name();
        match command {
            Command::UpsertNode { node, spec } => {
                self.upsert_node(index, name, node, Cow::Borrowed(spec))
            }
            Command::EditNodeSpec {
                node,
                availability,
                label_add,
                label_rm,
                label_default,
            } => {
                let id = self.resolve_node(name, node)?;
                let current = &self.nodes[&id];
                let mut spec = current.spec.clone();
                for (k, v) in label_default {
                    spec.labels.entry(k.clone()).or_insert_with(|| v.clone());
                }
                if let Some(a) = availability {
                    spec.availability = *a;
                }
                spec.labels
                    .extend(label_add.iter().map(|(k, v)| (k.clone(), v.clone())));
                for k in label_rm {
                    spec.labels.remove(k);
                }
                self.upsert_node(index, name, &id, Cow::Owned(spec))
            }
            Command::RemoveNode { node } => {
                let removed = self
                    .nodes
                    .remove(node)
                    .ok_or_else(|| not_found(name, node))?;
                // The subnet is free for a new node once no task of this
                // one holds an address in it (see `free_subnet`).
                if let Some(subnet) = removed.subnet {
                    self.subnets.remove(&subnet);
                }
                Ok(vec![event(
                    index,
                    EventKind::Deleted,
                    Object::Node(removed),
                )])
            }
            Command::UpdateNodeStatus { node, status } => {
                self.update_node_status(index, name, node, status)
            }
            Command::CreateService { service, spec } => {
                self.create_service(index, name, service, spec)
            }
            Command::UpdateService {
                service,
                spec,
                expected_spec_version,
            } => self.update_service(index, name, service, spec, *expected_spec_version),
            Command::RemoveService { service } => {
                let removed = self
                    .services
                    .remove(service)
                    .ok_or_else(|| not_found(name, service))?;
                if let Some(vip) = removed.virtual_ip {
                    self.vips.remove(&vip);
                }
                Ok(vec![event(
                    index,
                    EventKind::Deleted,
                    Object::Service(removed),
                )])
            }
            Command::CreateTasks { tasks } => self.create_tasks(index, name, tasks),
            Command::SetTaskDesiredState { changes } => {
                self.set_desired_state(index, name, changes)
            }
            Command::UpdateTaskStatus { task, node, status } => {
                self.update_task_status(index, name, task, node, status)
            }
            Command::MarkTasksPending { tasks, at_unix_ms } => {
                self.mark_pending(index, name, tasks, *at_unix_ms)
            }
            Command::AssignTasks {
                assignments,
                at_unix_ms,
            } => self.assign(index, name, assignments, *at_unix_ms),
            Command::RemoveTasks { tasks } => self.remove_tasks(index, name, tasks),
            Command::SetAddressing { addressing } => self.set_addressing(index, name, addressing),
        }
    }

    /// The node `reference` names: the node with that id, else the one node
    /// with that hostname (the rule `gantry node` commands follow).
    fn resolve_node(&self, name: &'static str, reference: &str) -> Result<NodeId, ApplyError> {
        if let Ok(id) = NodeId::new(reference)
            && self.nodes.contains_key(&id)
        {
            return Ok(id);
        }
        let named: Vec<&NodeId> = self
            .nodes
            .values()
            .filter(|n| n.status.hostname == reference)
            .map(|n| &n.id)
            .collect();
        match named.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(ApplyError::NotFound {
                command: name,
                kind: "node",
                id: reference.to_string(),
            }),
            several => Err(invalid(
                name,
                "node",
                &reference,
                "node",
                format!(
                    "hostname {reference} is shared by {} nodes; name one by id",
                    several.len()
                ),
            )),
        }
    }

    fn upsert_node(
        &mut self,
        index: u64,
        name: &'static str,
        id: &NodeId,
        // Owned when the caller built it (an edit), so it moves in uncopied.
        spec: Cow<'_, NodeSpec>,
    ) -> Result<Vec<Event>, ApplyError> {
        match self.nodes.get_mut(id) {
            Some(node) if node.spec == *spec => Ok(Vec::new()),
            Some(node) => {
                node.spec = spec.into_owned();
                node.version = index;
                Ok(vec![event(
                    index,
                    EventKind::Updated,
                    Object::Node(node.clone()),
                )])
            }
            None => {
                let subnet = match &self.addressing {
                    Some(a) => Some(self.subnet_for(id, a).ok_or_else(|| {
                        invalid(
                            name,
                            "node",
                            id,
                            "subnet",
                            format!(
                                "cluster CIDR {} has no free /{NODE_SUBNET_PREFIX} subnet \
                                 (all {} are held by nodes or by tasks of removed nodes)",
                                a.cluster_cidr,
                                a.node_subnets()
                            ),
                        )
                    })?),
                    None => None,
                };
                let node = Node {
                    id: id.clone(),
                    spec: spec.into_owned(),
                    status: NodeStatus::default(),
                    version: index,
                    subnet,
                };
                if let Some(subnet) = subnet {
                    self.subnets.insert(subnet, id.clone());
                }
                self.nodes.insert(id.clone(), node.clone());
                Ok(vec![event(index, EventKind::Created, Object::Node(node))])
            }
        }
    }

    /// The subnet for a node joining: the one its tasks still hold
    /// addresses in, when it was removed and comes back under the same id
    /// (its agent may still run them), else the lowest free one.
    fn subnet_for(&self, id: &NodeId, addressing: &Addressing) -> Option<Ipv4Cidr> {
        let previous = self
            .tasks_on_node(id)
            .find_map(|t| t.address)
            .and_then(|address| {
                (0..addressing.node_subnets())
                    .filter_map(|i| addressing.cluster_cidr.subnet(NODE_SUBNET_PREFIX, i))
                    .find(|s| s.contains(address))
            })
            .filter(|s| !self.subnets.contains_key(s));
        previous.or_else(|| self.free_subnet(addressing))
    }

    /// The lowest node subnet that no node holds and in which no task (of a
    /// removed node) still holds an address.
    fn free_subnet(&self, addressing: &Addressing) -> Option<Ipv4Cidr> {
        (0..addressing.node_subnets())
            .filter_map(|i| addressing.cluster_cidr.subnet(NODE_SUBNET_PREFIX, i))
            .find(|s| {
                !self.subnets.contains_key(s)
                    && self.addresses.range(s.first()..=s.last()).next().is_none()
            })
    }

    /// The lowest free address for a task in `subnet`.
    fn free_task_address(&self, subnet: &Ipv4Cidr) -> Option<Ipv4Addr> {
        let (first, last) = network::task_address_range(subnet);
        network::lowest_free(
            first,
            last,
            self.addresses.range(first..=last).map(|(a, _)| *a),
        )
    }

    /// The lowest free virtual IP.
    fn free_vip(&self, addressing: &Addressing) -> Option<Ipv4Addr> {
        let (first, last) = network::vip_range(&addressing.service_cidr);
        network::lowest_free(first, last, self.vips.range(first..=last).map(|(a, _)| *a))
    }

    fn vip_exhausted(
        &self,
        name: &'static str,
        id: &ServiceId,
        addressing: &Addressing,
    ) -> ApplyError {
        invalid(
            name,
            "service",
            id,
            "virtual_ip",
            format!(
                "service CIDR {} has no free address ({} virtual IPs held)",
                addressing.service_cidr,
                self.vips.len()
            ),
        )
    }

    fn set_addressing(
        &mut self,
        index: u64,
        name: &'static str,
        addressing: &Addressing,
    ) -> Result<Vec<Event>, ApplyError> {
        let refuse = |field, reason: String| ApplyError::Invalid {
            command: name,
            kind: "cluster",
            id: "addressing".into(),
            field,
            reason,
        };
        addressing
            .check("cluster_cidr", "service_cidr")
            .map_err(|e| refuse("addressing", e.to_string()))?;
        if let Some(current) = &self.addressing {
            if current == addressing {
                return Ok(Vec::new());
            }
            let (field, was, asked) = if current.cluster_cidr != addressing.cluster_cidr {
                (
                    "cluster_cidr",
                    current.cluster_cidr,
                    addressing.cluster_cidr,
                )
            } else {
                (
                    "service_cidr",
                    current.service_cidr,
                    addressing.service_cidr,
                )
            };
            return Err(refuse(
                field,
                format!(
                    "the cluster was created with {was} and addresses were allocated from it; \
                     {asked} cannot replace it"
                ),
            ));
        }
        self.addressing = Some(*addressing);
        // Objects that exist from before the plan get their allocations now,
        // in id order, so that every replica allocates the same.
        let mut events = Vec::new();
        let ids: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.subnet.is_none())
            .map(|n| n.id.clone())
            .collect();
        for id in ids {
            let Some(subnet) = self.free_subnet(addressing) else {
                break;
            };
            self.subnets.insert(subnet, id.clone());
            if let Some(node) = self.nodes.get_mut(&id) {
                node.subnet = Some(subnet);
                node.version = index;
                events.push(event(index, EventKind::Updated, Object::Node(node.clone())));
            }
        }
        let ids: Vec<ServiceId> = self
            .services
            .values()
            .filter(|s| s.virtual_ip.is_none() && s.spec.wants_vip())
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            let Some(vip) = self.free_vip(addressing) else {
                break;
            };
            self.vips.insert(vip, id.clone());
            if let Some(service) = self.services.get_mut(&id) {
                service.virtual_ip = Some(vip);
                service.version = index;
                events.push(event(
                    index,
                    EventKind::Updated,
                    Object::Service(service.clone()),
                ));
            }
        }
        Ok(events)
    }

    fn update_node_status(
        &mut self,
        index: u64,
        name: &'static str,
        id: &NodeId,
        status: &NodeStatus,
    ) -> Result<Vec<Event>, ApplyError> {
        let node = self.nodes.get_mut(id).ok_or_else(|| not_found(name, id))?;
        if node.status == *status {
            return Ok(Vec::new());
        }
        node.status = status.clone();
        node.version = index;
        Ok(vec![event(
            index,
            EventKind::Updated,
            Object::Node(node.clone()),
        )])
    }

    fn create_service(
        &mut self,
        index: u64,
        name: &'static str,
        id: &ServiceId,
        spec: &ServiceSpec,
    ) -> Result<Vec<Event>, ApplyError> {
        if self.services.contains_key(id) {
            return Err(ApplyError::AlreadyExists {
                command: name,
                kind: "service",
                id: id.to_string(),
            });
        }
        check_service_spec(name, id, spec)?;
        let virtual_ip = match &self.addressing {
            Some(a) if spec.wants_vip() => Some(
                self.free_vip(a)
                    .ok_or_else(|| self.vip_exhausted(name, id, a))?,
            ),
            _ => None,
        };
        let service = Service {
            id: id.clone(),
            spec: spec.clone(),
            spec_version: 1,
            version: index,
            virtual_ip,
        };
        if let Some(vip) = virtual_ip {
            self.vips.insert(vip, id.clone());
        }
        self.services.insert(id.clone(), service.clone());
        Ok(vec![event(
            index,
            EventKind::Created,
            Object::Service(service),
        )])
    }

    fn update_service(
        &mut self,
        index: u64,
        name: &'static str,
        id: &ServiceId,
        spec: &ServiceSpec,
        expected: Option<u64>,
    ) -> Result<Vec<Event>, ApplyError> {
        check_service_spec(name, id, spec)?;
        let service = self
            .services
            .get_mut(id)
            .ok_or_else(|| not_found(name, id))?;
        if let Some(expected) = expected
            && expected != service.spec_version
        {
            return Err(ApplyError::Invalid {
                command: name,
                kind: "service",
                id: id.to_string(),
                field: "spec_version",
                reason: format!(
                    "expected {expected} but the service is at {} (updated concurrently)",
                    service.spec_version
                ),
            });
        }
        if service.spec == *spec {
            return Ok(Vec::new());
        }
        // Switching endpoint mode (or to or from the host network) allocates
        // or releases the VIP; otherwise the VIP is kept across updates.
        let mut vip = service.virtual_ip;
        match (&self.addressing, vip, spec.wants_vip()) {
            (Some(a), None, true) => {
                let a = *a;
                let allocated = self
                    .free_vip(&a)
                    .ok_or_else(|| self.vip_exhausted(name, id, &a))?;
                self.vips.insert(allocated, id.clone());
                vip = Some(allocated);
            }
            (_, Some(held), false) => {
                self.vips.remove(&held);
                vip = None;
            }
            _ => {}
        }
        let service = self
            .services
            .get_mut(id)
            .ok_or_else(|| not_found(name, id))?;
        service.virtual_ip = vip;
        service.spec = spec.clone();
        service.spec_version += 1;
        service.version = index;
        Ok(vec![event(
            index,
            EventKind::Updated,
            Object::Service(service.clone()),
        )])
    }

    fn create_tasks(
        &mut self,
        index: u64,
        name: &'static str,
        tasks: &[Task],
    ) -> Result<Vec<Event>, ApplyError> {
        let mut seen = BTreeSet::new();
        for task in tasks {
            let invalid = |field, reason: String| invalid(name, "task", &task.id, field, reason);
            if !seen.insert(&task.id) {
                return Err(invalid("id", "appears twice in the batch".into()));
            }
            if self.tasks.contains_key(&task.id) {
                return Err(ApplyError::AlreadyExists {
                    command: name,
                    kind: "task",
                    id: task.id.to_string(),
                });
            }
            let service = self
                .services
                .get(&task.service)
                .ok_or_else(|| invalid("service", format!("service {} not found", task.service)))?;
            if task.spec_version > service.spec_version {
                return Err(invalid(
                    "spec_version",
                    format!(
                        "{} is newer than service {}'s spec_version {}",
                        task.spec_version, service.id, service.spec_version
                    ),
                ));
            }
            if let Some(node) = &task.node
                && !self.nodes.contains_key(node)
            {
                return Err(invalid("node", format!("node {node} not found")));
            }
            if !matches!(task.status.state, TaskState::New | TaskState::Pending) {
                return Err(invalid(
                    "status.state",
                    format!(
                        "a new task must be new or pending, not {}",
                        task.status.state
                    ),
                ));
            }
            if task.desired_state != DesiredState::Running {
                return Err(invalid(
                    "desired_state",
                    "a new task must be desired running".into(),
                ));
            }
        }
        let mut events = Vec::with_capacity(tasks.len());
        for task in tasks {
            let mut task = task.clone();
            task.version = index;
            events.push(event(index, EventKind::Created, Object::Task(task.clone())));
            self.put_task(task);
        }
        Ok(events)
    }

    fn set_desired_state(
        &mut self,
        index: u64,
        name: &'static str,
        changes: &[DesiredStateChange],
    ) -> Result<Vec<Event>, ApplyError> {
        let mut seen = BTreeSet::new();
        for change in changes {
            let task = self.existing_task(name, &change.task)?;
            if !seen.insert(&change.task) {
                return Err(invalid(
                    name,
                    "task",
                    &change.task,
                    "task",
                    "appears twice in the batch".into(),
                ));
            }
            // Desired state only moves running → shutdown (swarmkit): a task
            // told to stop is replaced, never revived.
            if task.desired_state == DesiredState::Shutdown
                && change.desired_state == DesiredState::Running
            {
                return Err(invalid(
                    name,
                    "task",
                    &change.task,
                    "desired_state",
                    "cannot move from shutdown back to running".into(),
                ));
            }
        }
        let mut events = Vec::new();
        for change in changes {
            if let Some(task) = self.tasks.get_mut(&change.task)
                && task.desired_state != change.desired_state
            {
                task.desired_state = change.desired_state;
                task.generation += 1;
                task.version = index;
                events.push(event(index, EventKind::Updated, Object::Task(task.clone())));
            }
        }
        Ok(events)
    }

    fn update_task_status(
        &mut self,
        index: u64,
        name: &'static str,
        id: &TaskId,
        node: &NodeId,
        status: &TaskStatus,
    ) -> Result<Vec<Event>, ApplyError> {
        let task = self.existing_task(name, id)?;
        if task.node.as_ref() != Some(node) {
            let assigned = task
                .node
                .as_ref()
                .map_or("no node".to_string(), |n| format!("node {n}"));
            return Err(invalid(
                name,
                "task",
                id,
                "node",
                format!("reported by node {node} but the task is on {assigned}"),
            ));
        }
        if task.status.state.rank() < TaskState::Assigned.rank() {
            return Err(invalid(
                name,
                "task",
                id,
                "status.state",
                format!("the task is {} and was never assigned", task.status.state),
            ));
        }
        let mut next = task.status.clone();
        let changed = next
            .advance(id, status.state)
            .map_err(ApplyError::Backward)?;
        // The time of the last state change: a resent report of the same
        // state (or one that only changes health) keeps it.
        next.timestamp_unix_ms = if changed {
            status.timestamp_unix_ms
        } else {
            task.status.timestamp_unix_ms.or(status.timestamp_unix_ms)
        };
        next.message = status.message.clone();
        next.error = status.error.clone();
        next.exit_code = status.exit_code;
        next.restarts = status.restarts;
        next.health = status.health;
        if next == task.status {
            return Ok(Vec::new());
        }
        let task = self.tasks.get_mut(id).ok_or_else(|| not_found(name, id))?;
        task.status = next;
        task.version = index;
        Ok(vec![event(
            index,
            EventKind::Updated,
            Object::Task(task.clone()),
        )])
    }

    fn mark_pending(
        &mut self,
        index: u64,
        name: &'static str,
        pending: &[PendingTask],
        at_unix_ms: Option<u64>,
    ) -> Result<Vec<Event>, ApplyError> {
        let mut seen = BTreeSet::new();
        for p in pending {
            let task = self.existing_task(name, &p.task)?;
            if !seen.insert(&p.task) {
                return Err(invalid(
                    name,
                    "task",
                    &p.task,
                    "task",
                    "appears twice in the batch".into(),
                ));
            }
            if !matches!(task.status.state, TaskState::New | TaskState::Pending) {
                return Err(invalid(
                    name,
                    "task",
                    &p.task,
                    "status.state",
                    format!(
                        "only a new or pending task can be pending, not {}",
                        task.status.state
                    ),
                ));
            }
        }
        let mut events = Vec::new();
        for p in pending {
            if let Some(task) = self.tasks.get_mut(&p.task)
                && (task.status.state != TaskState::Pending || task.status.message != p.message)
            {
                if task.status.state != TaskState::Pending {
                    task.status.timestamp_unix_ms = at_unix_ms;
                }
                task.status.state = TaskState::Pending;
                task.status.message = p.message.clone();
                task.version = index;
                events.push(event(index, EventKind::Updated, Object::Task(task.clone())));
            }
        }
        Ok(events)
    }

    fn assign(
        &mut self,
        index: u64,
        name: &'static str,
        assignments: &[Assignment],
        at_unix_ms: Option<u64>,
    ) -> Result<Vec<Event>, ApplyError> {
        let mut seen = BTreeSet::new();
        for a in assignments {
            let task = self.existing_task(name, &a.task)?;
            let invalid = |field, reason: String| invalid(name, "task", &a.task, field, reason);
            if !seen.insert(&a.task) {
                return Err(invalid("task", "appears twice in the batch".into()));
            }
            if !self.nodes.contains_key(&a.node) {
                return Err(invalid("node", format!("node {} not found", a.node)));
            }
            if let Some(pinned) = &task.node
                && pinned != &a.node
            {
                return Err(invalid(
                    "node",
                    format!("the task is for node {pinned}, not {}", a.node),
                ));
            }
            if !matches!(task.status.state, TaskState::New | TaskState::Pending) {
                return Err(invalid(
                    "status.state",
                    format!(
                        "only a new or pending task can be assigned, not {}",
                        task.status.state
                    ),
                ));
            }
            if task.desired_state != DesiredState::Running {
                return Err(invalid(
                    "desired_state",
                    "a task being shut down is not assigned".into(),
                ));
            }
        }
        // Apply does not re-run the scheduler's filters: the plan was made
        // from a snapshot and committing it is the scheduler's decision; the
        // dispatcher rejects what no longer fits and the task is replaced.
        let mut events = Vec::with_capacity(assignments.len());
        for a in assignments {
            let subnet = self.nodes.get(&a.node).and_then(|n| n.subnet);
            let Some(mut task) = self.take_task(&a.task) else {
                continue;
            };
            // A task that needs an address and finds none on its node's
            // subnet stays pending, saying so; its siblings are still
            // assigned (a full node must not block the rest of the plan).
            // Unchanged (already pending for this reason) it makes no event,
            // so the scheduler is not woken by its own refusal.
            let address = match subnet {
                Some(subnet) if !task.spec.host_network && task.address.is_none() => {
                    match self.free_task_address(&subnet) {
                        Some(address) => Some(address),
                        None => {
                            let message =
                                format!("no free address in subnet {subnet} of node {}", a.node);
                            if task.status.state != TaskState::Pending
                                || task.status.message != message
                            {
                                if task.status.state != TaskState::Pending {
                                    task.status.timestamp_unix_ms = at_unix_ms;
                                }
                                task.status.state = TaskState::Pending;
                                task.status.message = message;
                                task.version = index;
                                events.push(event(
                                    index,
                                    EventKind::Updated,
                                    Object::Task(task.clone()),
                                ));
                            }
                            self.put_task(task);
                            continue;
                        }
                    }
                }
                _ => task.address,
            };
            task.node = Some(a.node.clone());
            task.address = address;
            task.status.state = TaskState::Assigned;
            task.status.message = String::new();
            task.status.timestamp_unix_ms = at_unix_ms;
            task.generation += 1;
            task.version = index;
            events.push(event(index, EventKind::Updated, Object::Task(task.clone())));
            self.put_task(task);
        }
        Ok(events)
    }

    fn remove_tasks(
        &mut self,
        index: u64,
        name: &'static str,
        ids: &[TaskId],
    ) -> Result<Vec<Event>, ApplyError> {
        let mut seen = BTreeSet::new();
        for id in ids {
            let task = self.existing_task(name, id)?;
            if !seen.insert(id) {
                return Err(invalid(
                    name,
                    "task",
                    id,
                    "task",
                    "appears twice in the batch".into(),
                ));
            }
            if task.desired_state != DesiredState::Shutdown {
                return Err(invalid(
                    name,
                    "task",
                    id,
                    "desired_state",
                    "only a task desired shutdown can be removed".into(),
                ));
            }
            if task.occupies_node() {
                return Err(invalid(
                    name,
                    "task",
                    id,
                    "status.state",
                    format!(
                        "the task is still {} on its node; wait until it stops",
                        task.status.state
                    ),
                ));
            }
        }
        Ok(ids
            .iter()
            .filter_map(|id| self.take_task(id))
            .map(|task| event(index, EventKind::Deleted, Object::Task(task)))
            .collect())
    }

    fn existing_task(&self, name: &'static str, id: &TaskId) -> Result<&Task, ApplyError> {
        self.tasks.get(id).ok_or_else(|| not_found(name, id))
    }

    /// Inserts a task and indexes it.
    fn put_task(&mut self, task: Task) {
        if let Some(address) = task.address {
            self.addresses.insert(address, task.id.clone());
        }
        self.by_service
            .entry(task.service.clone())
            .or_default()
            .insert(task.id.clone());
        if let Some(node) = &task.node {
            self.by_node
                .entry(node.clone())
                .or_default()
                .insert(task.id.clone());
        }
        self.tasks.insert(task.id.clone(), task);
    }

    /// Removes a task and its index entries.
    fn take_task(&mut self, id: &TaskId) -> Option<Task> {
        let task = self.tasks.remove(id)?;
        if let Some(address) = task.address
            && self.addresses.get(&address) == Some(id)
        {
            self.addresses.remove(&address);
        }
        if let Some(set) = self.by_service.get_mut(&task.service) {
            set.remove(id);
            if set.is_empty() {
                self.by_service.remove(&task.service);
            }
        }
        if let Some(node) = &task.node
            && let Some(set) = self.by_node.get_mut(node)
        {
            set.remove(id);
            if set.is_empty() {
                self.by_node.remove(node);
            }
        }
        Some(task)
    }
}

fn check_service_spec(
    name: &'static str,
    id: &ServiceId,
    spec: &ServiceSpec,
) -> Result<(), ApplyError> {
    if spec.name.trim().is_empty() {
        return Err(invalid(
            name,
            "service",
            id,
            "spec.name",
            "must not be empty".into(),
        ));
    }
    if spec.task.image.trim().is_empty() {
        return Err(invalid(
            name,
            "service",
            id,
            "spec.task.image",
            "must not be empty".into(),
        ));
    }
    Ok(())
}

fn event(revision: u64, kind: EventKind, object: Object) -> Event {
    Event {
        revision,
        kind,
        object: Arc::new(object),
    }
}

/// The kind name of an id type, for error messages.
trait Kind: std::fmt::Display {
    const KIND: &'static str;
}

impl Kind for NodeId {
    const KIND: &'static str = "node";
}

impl Kind for ServiceId {
    const KIND: &'static str = "service";
}

impl Kind for TaskId {
    const KIND: &'static str = "task";
}

fn not_found<I: Kind>(command: &'static str, id: &I) -> ApplyError {
    ApplyError::NotFound {
        command,
        kind: I::KIND,
        id: id.to_string(),
    }
}

fn invalid(
    command: &'static str,
    kind: &'static str,
    id: &impl std::fmt::Display,
    field: &'static str,
    reason: String,
) -> ApplyError {
    ApplyError::Invalid {
        command,
        kind,
        id: id.to_string(),
        field,
        reason,
    }
}
