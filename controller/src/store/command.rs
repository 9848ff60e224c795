//! The commands that change cluster state, and their versioned encoding.
//!
//! A [`Command`] is what goes into the log: every change to nodes, services
//! and tasks is one command, applied in log order by the
//! [`StateMachine`](super::StateMachine). Commands carry everything apply
//! needs (ids, specs), so that apply uses no clock and no randomness and
//! every replica reaches the same state from the same log.
//!
//! **API boundary:** the bytes [`encode`] produces are what Raft replicates in
//! the next issue. They are JSON in an envelope `{"v":1,"command":{...}}`; a
//! replica that meets a version it does not know stops rather than guess
//! (etcd does the same with unknown entry types).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{
    Availability, DesiredState, NodeId, NodeSpec, NodeStatus, ServiceId, ServiceSpec, Task, TaskId,
    TaskStatus,
};
use crate::network::Addressing;
use crate::scheduler::Assignment;

/// The encoding version this build writes and the only one it reads.
pub const COMMAND_VERSION: u32 = 1;

/// Errors from encoding or decoding a command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The entry was written by a build with another encoding version.
    #[error(
        "command encoding version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// The version in the entry.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The entry is not a valid command envelope.
    #[error("command entry is not valid: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The command could not be serialized.
    #[error("command could not be encoded: {0}")]
    Encode(#[source] serde_json::Error),
}

/// A task's new desired state, one item of [`Command::SetTaskDesiredState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredStateChange {
    /// The task.
    pub task: TaskId,
    /// What the controller now wants.
    pub desired_state: DesiredState,
}

/// A task the scheduler could not place, one item of
/// [`Command::MarkTasksPending`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTask {
    /// The task.
    pub task: TaskId,
    /// Why it is pending, as `service ps` shows it.
    pub message: String,
}

/// One change to the cluster state. Apply validates it against the current
/// state; see [`StateMachine::apply`](super::StateMachine::apply) for what is
/// refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Command {
    /// Adds a node, or replaces the operator-set part of an existing one
    /// (its agent-reported status is kept).
    UpsertNode {
        /// The node.
        node: NodeId,
        /// What the operator sets.
        spec: NodeSpec,
    },
    /// Edits an existing node's operator-set fields in place: what
    /// `UpdateNode` asks for, applied against the node as the log has it,
    /// so concurrent edits of different labels all survive (an
    /// [`Command::UpsertNode`] built from a read of the spec would put back
    /// labels another edit had just changed).
    EditNodeSpec {
        /// The node: its id, or its hostname when no node has that id (the
        /// one node with it; several are refused). Resolved at apply, so
        /// an edit by name needs no linearizable read before it and lands
        /// on the node the name means at that point of the log, as
        /// `gantry node update NAME` expects. Older entries hold ids, which
        /// resolve to themselves.
        node: String,
        /// The new availability, if it changes.
        availability: Option<Availability>,
        /// Labels to add or overwrite.
        label_add: BTreeMap<String, String>,
        /// Label keys to remove (after `label_add`).
        label_rm: Vec<String>,
        /// Labels to add only where the node has no label of that key, first
        /// (an agent's `--label`s at registration: what the operator set
        /// since wins, as it did when the dispatcher merged them itself).
        /// Absent from older log entries.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        label_default: BTreeMap<String, String>,
    },
    /// Removes a node. Its tasks stay; the orchestrators replace them.
    RemoveNode {
        /// The node.
        node: NodeId,
    },
    /// Records what a node's agent reports, or the dispatcher's liveness verdict.
    UpdateNodeStatus {
        /// The node.
        node: NodeId,
        /// The whole new status.
        status: NodeStatus,
    },
    /// Creates a service with `spec_version` 1.
    CreateService {
        /// The service.
        service: ServiceId,
        /// What the operator asked for.
        spec: ServiceSpec,
    },
    /// Replaces a service's spec, bumping `spec_version` when it differs.
    UpdateService {
        /// The service.
        service: ServiceId,
        /// The new spec.
        spec: ServiceSpec,
        /// When set, the update is refused unless the service is at this
        /// `spec_version` (optimistic concurrency for `gantry deploy`, like
        /// Swarm's `--version` on `service update`).
        expected_spec_version: Option<u64>,
    },
    /// Removes a service. Its tasks stay until the orchestrator shuts them
    /// down and they are removed with [`Command::RemoveTasks`].
    RemoveService {
        /// The service.
        service: ServiceId,
    },
    /// Creates tasks, all or none. `version` is set by apply; `status.state`
    /// must be `new` or `pending`.
    CreateTasks {
        /// The tasks, with ids chosen by the proposer.
        tasks: Vec<Task>,
    },
    /// Changes tasks' desired state, all or none. A task's desired state only
    /// moves from running to shutdown.
    SetTaskDesiredState {
        /// The changes.
        changes: Vec<DesiredStateChange>,
    },
    /// Records a task status reported by the agent of the task's node; the
    /// state only moves forward ([`TaskStatus::advance`]).
    UpdateTaskStatus {
        /// The task.
        task: TaskId,
        /// The reporting node; must be the task's node.
        node: NodeId,
        /// The reported status.
        status: TaskStatus,
    },
    /// Moves new tasks to pending with the scheduler's reason, all or none.
    MarkTasksPending {
        /// The tasks and why each is pending.
        tasks: Vec<PendingTask>,
        /// The proposer's clock (Unix milliseconds): the state change's
        /// timestamp for tasks that become pending.
        #[serde(default)]
        at_unix_ms: Option<u64>,
    },
    /// Commits a scheduler plan's assignments, all or none: each task moves
    /// to `assigned` on its node and its generation is bumped.
    AssignTasks {
        /// The assignments.
        assignments: Vec<Assignment>,
        /// The proposer's clock (Unix milliseconds): the state change's
        /// timestamp.
        #[serde(default)]
        at_unix_ms: Option<u64>,
    },
    /// Deletes tasks that no longer hold anything on a node and whose desired
    /// state is shutdown (task history garbage collection), all or none.
    /// Their addresses are released.
    RemoveTasks {
        /// The tasks.
        tasks: Vec<TaskId>,
    },
    /// Sets the cluster's address plan (the controller proposes it on every
    /// start). The first one is kept; a later one with other values is
    /// refused, since addresses were allocated from the first. Nodes and
    /// services that exist without a subnet or VIP get one (and an event
    /// each); the plan itself is no watched object and makes no event.
    SetAddressing {
        /// The cluster and service CIDRs.
        addressing: Addressing,
    },
}

impl Command {
    /// The command's name, as the log and errors show it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::UpsertNode { .. } => "upsert-node",
            Command::EditNodeSpec { .. } => "edit-node-spec",
            Command::RemoveNode { .. } => "remove-node",
            Command::UpdateNodeStatus { .. } => "update-node-status",
            Command::CreateService { .. } => "create-service",
            Command::UpdateService { .. } => "update-service",
            Command::RemoveService { .. } => "remove-service",
            Command::CreateTasks { .. } => "create-tasks",
            Command::SetTaskDesiredState { .. } => "set-task-desired-state",
            Command::UpdateTaskStatus { .. } => "update-task-status",
            Command::MarkTasksPending { .. } => "mark-tasks-pending",
            Command::AssignTasks { .. } => "assign-tasks",
            Command::RemoveTasks { .. } => "remove-tasks",
            Command::SetAddressing { .. } => "set-addressing",
        }
    }
}

/// The on-log envelope; the version comes first so that it can be read
/// before the command is.
#[derive(Serialize)]
struct EnvelopeOut<'a> {
    v: u32,
    command: &'a Command,
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u32,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    command: Command,
}

/// Encodes a command as log entry bytes.
pub fn encode(command: &Command) -> Result<Vec<u8>, CommandError> {
    serde_json::to_vec(&EnvelopeOut {
        v: COMMAND_VERSION,
        command,
    })
    .map_err(CommandError::Encode)
}

/// Decodes log entry bytes written by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<Command, CommandError> {
    let probe: VersionProbe = serde_json::from_slice(bytes).map_err(CommandError::Malformed)?;
    if probe.v != COMMAND_VERSION {
        return Err(CommandError::UnsupportedVersion {
            found: probe.v,
            supported: COMMAND_VERSION,
        });
    }
    let envelope: EnvelopeIn = serde_json::from_slice(bytes).map_err(CommandError::Malformed)?;
    Ok(envelope.command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Command {
        Command::RemoveNode {
            node: NodeId::new("n1").expect("valid"),
        }
    }

    #[test]
    fn a_command_round_trips() {
        let bytes = encode(&sample()).expect("encodes");
        assert_eq!(decode(&bytes).expect("decodes"), sample());
    }

    /// Another version is named as such, whether or not its command would
    /// parse as this version's.
    #[test]
    fn another_version_is_refused_by_number() {
        let parses = br#"{"v":2,"command":{"type":"remove-node","node":"n1"}}"#;
        let does_not = br#"{"v":2,"command":{"type":"teleport-node","to":"mars"}}"#;
        for bytes in [&parses[..], &does_not[..]] {
            match decode(bytes) {
                Err(CommandError::UnsupportedVersion {
                    found: 2,
                    supported: COMMAND_VERSION,
                }) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            decode(br#"{"v":1,"command":{"type":"teleport-node"}}"#),
            Err(CommandError::Malformed(_))
        ));
        assert!(matches!(
            decode(b"not json"),
            Err(CommandError::Malformed(_))
        ));
    }
}
