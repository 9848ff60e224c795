//! The Control service: the client API (`gantry deploy`, `service ...`,
//! `node ...`, `events`, `logs`, `exec`).
//!
//! Writes are commands proposed to the store; reads come from one revision
//! of it, and every list says which revision it was read at, so a client
//! can follow on with `Events` without a gap. Logs and exec go through the
//! dispatcher's relay to the agent of the task's node; the agents' sessions
//! live on the leader, so a follower proxies those streams to it (as it
//! forwards writes), and a client may point at any controller.
//!
//! Errors: NOT_FOUND names the service, node or task; INVALID_ARGUMENT names
//! the field; FAILED_PRECONDITION for what the object's state forbids
//! (scaling a global service); ABORTED when a concurrent write won
//! (retrying is safe); OUT_OF_RANGE for events from a compacted revision.
//!
//! Decision: a service reference is its id, `STACK_NAME`, or `NAME` when
//! exactly one stack has a service of that name (Swarm names services
//! `STACK_NAME` too); a node reference is its id or hostname.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use gantry_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::deploy;
use super::dispatcher::Dispatcher;
use super::state::{StateError, StoreFront, random_id};
use crate::model::{
    DesiredState, Node, NodeId, NodeState, Service, ServiceId, ServiceMode, Task, TaskId, TaskState,
};
use crate::orchestrator::MAX_REPLICAS;
use crate::store::{ApplyError, Command, EventKind, Object, StateMachine, WatchError};
use crate::wire;

/// The Control service.
#[derive(Debug, Clone)]
pub struct Control {
    store: StoreFront,
    dispatcher: Dispatcher,
    shutdown: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Control {
    /// A Control service over `store`, relaying through `dispatcher`.
    pub fn new(store: StoreFront, dispatcher: Dispatcher) -> Control {
        Control {
            store,
            dispatcher,
            shutdown: None,
        }
    }

    /// Ends open event and log streams when `stop` turns true.
    pub fn with_shutdown(mut self, stop: tokio::sync::watch::Receiver<bool>) -> Control {
        self.shutdown = Some(stop);
        self
    }
}

/// How long an exec may take to send its `start` message.
const EXEC_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn state_status(e: StateError) -> Status {
    super::replication::status_of(e, None)
}

impl Control {
    /// Makes this controller's state current (Raft ReadIndex) before a
    /// read that must not be stale, so a list right after a write through
    /// any controller shows it; without a quorum the read is refused like
    /// a write, naming the leader when known.
    async fn current(&self) -> Result<(), Status> {
        self.store
            .linearizable()
            .await
            .map_err(|e| super::replication::status_of(e, self.store.leader_address()))
    }

    /// Where a log or exec stream must go: `None` to serve it here (this
    /// controller leads, so the agents' sessions are here), else a client
    /// of the leader's Control service to proxy it to, as a follower does
    /// with writes. A request that a follower already proxied is not
    /// proxied again (two members each believing the other leads would
    /// bounce it): it is refused with the leader named, and the client
    /// retries.
    fn stream_route(
        &self,
        what: &str,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Option<pb::control_client::ControlClient<tonic::transport::Channel>>, Status> {
        if self.store.is_leader() {
            return Ok(None);
        }
        let leader = self.store.leader_address();
        let proxied = metadata.get(PROXIED_METADATA).is_some();
        let address = match &leader {
            Some(a) if !proxied => a.clone(),
            Some(a) => {
                return Err(super::replication::unavailable(
                    format!("{what} goes through the leader; the leader is {a}"),
                    leader,
                ));
            }
            None => {
                return Err(super::replication::unavailable(
                    format!("{what} goes through the leader, and no leader is known"),
                    None,
                ));
            }
        };
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| Status::internal(format!("invalid leader address {address}: {e}")))?
            .connect_timeout(PROXY_CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Some(pb::control_client::ControlClient::new(channel)))
    }

    /// Relays a proxied stream from the leader to our client until either
    /// side ends or the controller stops; the task owns the leader's
    /// client, so its connection lives as long as the stream.
    fn relay_from_leader<T: Send + 'static>(
        &self,
        leader: pb::control_client::ControlClient<tonic::transport::Channel>,
        mut upstream: Streaming<T>,
    ) -> BoxStream<T> {
        let (out, rx) = mpsc::channel(256);
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            let _leader = leader;
            let stop = super::stop_signal(stop);
            tokio::pin!(stop);
            loop {
                let item = tokio::select! {
                    m = upstream.message() => m,
                    () = out.closed() => break,
                    () = &mut stop => break,
                };
                match item {
                    Ok(Some(m)) => {
                        if out.send(Ok(m)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        let _ = out.send(Err(proxy_status(status))).await;
                        break;
                    }
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// The metadata key a follower sets on a stream it proxies to the leader.
const PROXIED_METADATA: &str = "gantry-proxied";

/// How long a follower waits to connect to the leader it proxies to.
const PROXY_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A request to the leader, marked as proxied.
fn proxied<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        PROXIED_METADATA,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    request
}

/// The leader's answer as this controller's: its own statuses pass as they
/// are; a failure to reach it (a status made from a transport error) is
/// UNAVAILABLE, marked so that the client tries another controller.
fn proxy_status(status: Status) -> Status {
    if std::error::Error::source(&status).is_some() {
        return super::replication::unavailable(
            format!("the leader cannot be reached: {}", status.message()),
            None,
        );
    }
    status
}

/// Finds a service by id, `STACK_NAME`, or unambiguous `NAME`.
fn resolve_service<'a>(s: &'a StateMachine, reference: &str) -> Result<&'a Service, Status> {
    if reference.is_empty() {
        return Err(Status::invalid_argument("service: must not be empty"));
    }
    if let Ok(id) = ServiceId::new(reference)
        && let Some(svc) = s.service(&id)
    {
        return Ok(svc);
    }
    if let Some(svc) = s.services().find(|svc| svc.spec.full_name() == reference) {
        return Ok(svc);
    }
    let named: Vec<&Service> = s
        .services()
        .filter(|svc| svc.spec.name == reference)
        .collect();
    match named.as_slice() {
        [one] => Ok(one),
        [] => Err(Status::not_found(format!("service {reference} not found"))),
        many => Err(Status::invalid_argument(format!(
            "service: {reference} is ambiguous; name it STACK_{reference} (stacks: {})",
            many.iter()
                .map(|svc| svc.spec.stack.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Finds a node by id or hostname.
fn resolve_node<'a>(s: &'a StateMachine, reference: &str) -> Result<&'a Node, Status> {
    if reference.is_empty() {
        return Err(Status::invalid_argument("node: must not be empty"));
    }
    if let Ok(id) = NodeId::new(reference)
        && let Some(node) = s.node(&id)
    {
        return Ok(node);
    }
    let named: Vec<&Node> = s
        .nodes()
        .filter(|n| n.status.hostname == reference)
        .collect();
    match named.as_slice() {
        [one] => Ok(one),
        [] => Err(Status::not_found(format!("node {reference} not found"))),
        _ => Err(Status::invalid_argument(format!(
            "node: hostname {reference} is shared by several nodes; use the node id"
        ))),
    }
}

/// A service with its running and desired counts.
fn service_info(s: &StateMachine, svc: &Service) -> pb::ServiceInfo {
    let running = s
        .tasks_of_service(&svc.id)
        .filter(|t| {
            t.status.state == TaskState::Running && t.desired_state == DesiredState::Running
        })
        .count() as u64;
    let desired = match svc.spec.mode {
        ServiceMode::Replicated { replicas } => replicas,
        ServiceMode::Global => s
            .nodes()
            .filter(|n| {
                n.takes_new_tasks()
                    && svc
                        .spec
                        .task
                        .placement
                        .constraints
                        .iter()
                        .all(|c| c.matches(n))
            })
            .count() as u64,
    };
    pb::ServiceInfo {
        service: Some(svc.clone().into()),
        running,
        desired,
    }
}

/// Tasks sorted by service, slot or node, then newest first.
fn sorted_tasks(mut tasks: Vec<Task>) -> Vec<pb::Task> {
    tasks.sort_by(|a, b| {
        (&a.service, a.slot, &a.node)
            .cmp(&(&b.service, b.slot, &b.node))
            .then_with(|| b.version.cmp(&a.version))
    });
    tasks.into_iter().map(Into::into).collect()
}

fn event_to_wire(event: crate::store::Event) -> pb::Event {
    let action = match event.kind {
        EventKind::Created => pb::EventAction::Create,
        EventKind::Updated => pb::EventAction::Update,
        EventKind::Deleted => pb::EventAction::Remove,
    };
    let object = match Arc::unwrap_or_clone(event.object) {
        Object::Node(n) => pb::event::Object::Node(n.into()),
        Object::Service(s) => pb::event::Object::Service(s.into()),
        Object::Task(t) => pb::event::Object::Task(t.into()),
    };
    pb::Event {
        revision: event.revision,
        action: action as i32,
        object: Some(object),
    }
}

fn kind_of(object: &Object) -> pb::ObjectKind {
    match object {
        Object::Node(_) => pb::ObjectKind::Node,
        Object::Service(_) => pb::ObjectKind::Service,
        Object::Task(_) => pb::ObjectKind::Task,
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for Control {
    async fn deploy_stack(
        &self,
        request: Request<pb::DeployStackRequest>,
    ) -> Result<Response<pb::DeployStackResponse>, Status> {
        self.current().await?;
        let req = request.into_inner();
        let stack = wire::stack_from_json(&req.stack_json)
            .map_err(|e| Status::invalid_argument(format!("stack_json: {e}")))?;
        let stack = deploy::revalidate(&stack)
            .map_err(|e| Status::invalid_argument(format!("stack_json: {e}")))?;
        let specs = deploy::service_specs(&stack)
            .map_err(|e| Status::invalid_argument(format!("stack_json: {e}")))?;
        // An external network must exist: some service of another stack
        // joins it (networks live as long as a service uses them), as
        // `docker stack deploy` refuses an external network it cannot find.
        for (name, network) in &stack.networks {
            if !network.external {
                continue;
            }
            let exists = self.store.read(|s| {
                s.services().any(|svc| {
                    svc.spec.stack != stack.name && svc.spec.task.networks.contains(name)
                })
            });
            if !exists {
                return Err(Status::invalid_argument(format!(
                    "stack_json: networks.{name}.external: network {name:?} does not exist \
                     (no service of another stack joins it)"
                )));
            }
        }
        let current: BTreeMap<String, Service> = self.store.read(|s| {
            s.services()
                .filter(|svc| svc.spec.stack == stack.name)
                .map(|svc| (svc.spec.name.clone(), svc.clone()))
                .collect()
        });
        let old_specs: BTreeMap<String, _> = current
            .iter()
            .map(|(name, svc)| (name.clone(), svc.spec.clone()))
            .collect();
        let changes = deploy::diff(&old_specs, &specs);
        let mut response = pb::DeployStackResponse {
            stack: stack.name.clone(),
            changes: Some(changes.clone().into()),
            revision: 0,
        };
        if req.dry_run || changes.is_empty() {
            return Ok(Response::new(response));
        }
        let mut commands = Vec::new();
        for name in &changes.create {
            let id = ServiceId::new(random_id())
                .map_err(|e| Status::internal(format!("service id: {e}")))?;
            commands.push(Command::CreateService {
                service: id,
                spec: specs[name].clone(),
            });
        }
        for update in &changes.update {
            let svc = &current[&update.service];
            commands.push(Command::UpdateService {
                service: svc.id.clone(),
                spec: specs[&update.service].clone(),
                expected_spec_version: Some(svc.spec_version),
            });
        }
        for name in &changes.remove {
            commands.push(Command::RemoveService {
                service: current[name].id.clone(),
            });
        }
        let results = self.store.propose(commands).await.map_err(state_status)?;
        let mut refused = Vec::new();
        for (index, result) in &results {
            response.revision = response.revision.max(*index);
            if let Err(e) = result {
                refused.push(e.to_string());
            }
        }
        if !refused.is_empty() {
            // Only a concurrent change to the same stack gets here: the
            // stack itself was validated before anything was proposed.
            return Err(Status::aborted(format!(
                "stack {}: changed concurrently, deploy again: {}",
                stack.name,
                refused.join("; ")
            )));
        }
        tracing::info!(stack = %stack.name, create = changes.create.len(), update = changes.update.len(), remove = changes.remove.len(), "stack deployed");
        Ok(Response::new(response))
    }

    async fn list_stacks(
        &self,
        _request: Request<pb::ListStacksRequest>,
    ) -> Result<Response<pb::ListStacksResponse>, Status> {
        self.current().await?;
        Ok(Response::new(self.store.read(|s| {
            let mut stacks: BTreeMap<String, u64> = BTreeMap::new();
            for svc in s.services() {
                *stacks.entry(svc.spec.stack.clone()).or_default() += 1;
            }
            pb::ListStacksResponse {
                stacks: stacks
                    .into_iter()
                    .map(|(name, services)| pb::StackSummary { name, services })
                    .collect(),
                revision: s.applied_index(),
            }
        })))
    }

    async fn stack_tasks(
        &self,
        request: Request<pb::StackTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        self.current().await?;
        let req = request.into_inner();
        self.list_tasks(Request::new(pb::TaskFilter {
            stack: req.stack,
            all: req.all,
            ..pb::TaskFilter::default()
        }))
        .await
    }

    async fn remove_stack(
        &self,
        request: Request<pb::RemoveStackRequest>,
    ) -> Result<Response<pb::RemoveStackResponse>, Status> {
        self.current().await?;
        let stack = request.into_inner().stack;
        let services: Vec<(String, ServiceId)> = self.store.read(|s| {
            s.services()
                .filter(|svc| svc.spec.stack == stack)
                .map(|svc| (svc.spec.name.clone(), svc.id.clone()))
                .collect()
        });
        if services.is_empty() {
            return Err(Status::not_found(format!("stack {stack} not found")));
        }
        let commands = services
            .iter()
            .map(|(_, id)| Command::RemoveService {
                service: id.clone(),
            })
            .collect();
        let results = self.store.propose(commands).await.map_err(state_status)?;
        let mut removed = Vec::new();
        let mut revision = 0;
        for ((name, _), (index, result)) in services.into_iter().zip(results) {
            revision = revision.max(index);
            // A service removed concurrently is gone either way.
            if result.is_ok() {
                removed.push(name);
            }
        }
        Ok(Response::new(pb::RemoveStackResponse { removed, revision }))
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        self.current().await?;
        let stack = request.into_inner().stack;
        Ok(Response::new(self.store.read(|s| {
            let mut services: Vec<&Service> = s
                .services()
                .filter(|svc| stack.is_empty() || svc.spec.stack == stack)
                .collect();
            services
                .sort_by(|a, b| (&a.spec.stack, &a.spec.name).cmp(&(&b.spec.stack, &b.spec.name)));
            pb::ListServicesResponse {
                services: services
                    .into_iter()
                    .map(|svc| service_info(s, svc))
                    .collect(),
                revision: s.applied_index(),
            }
        })))
    }

    async fn inspect_service(
        &self,
        request: Request<pb::ServiceRef>,
    ) -> Result<Response<pb::ServiceInfo>, Status> {
        self.current().await?;
        let reference = request.into_inner().service;
        self.store
            .read(|s| resolve_service(s, &reference).map(|svc| service_info(s, svc)))
            .map(Response::new)
    }

    async fn scale_service(
        &self,
        request: Request<pb::ScaleServiceRequest>,
    ) -> Result<Response<pb::ServiceInfo>, Status> {
        self.current().await?;
        let req = request.into_inner();
        if req.replicas > MAX_REPLICAS {
            return Err(Status::invalid_argument(format!(
                "replicas: {} is more than the supported {MAX_REPLICAS}",
                req.replicas
            )));
        }
        let svc = self
            .store
            .read(|s| resolve_service(s, &req.service).cloned())?;
        if svc.spec.mode == ServiceMode::Global {
            return Err(Status::failed_precondition(format!(
                "service {}: a global service runs one task per eligible node and cannot be scaled",
                svc.spec.name
            )));
        }
        let mut spec = svc.spec.clone();
        spec.mode = ServiceMode::Replicated {
            replicas: req.replicas,
        };
        self.store
            .propose_one(Command::UpdateService {
                service: svc.id.clone(),
                spec,
                expected_spec_version: Some(svc.spec_version),
            })
            .await
            .map_err(state_status)?;
        self.store
            .read(|s| {
                s.service(&svc.id)
                    .map(|svc| service_info(s, svc))
                    .ok_or_else(|| Status::not_found(format!("service {} not found", svc.id)))
            })
            .map(Response::new)
    }

    async fn remove_service(
        &self,
        request: Request<pb::ServiceRef>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.current().await?;
        let reference = request.into_inner().service;
        let id = self
            .store
            .read(|s| resolve_service(s, &reference).map(|svc| svc.id.clone()))?;
        let (revision, _) = self
            .store
            .propose_one(Command::RemoveService { service: id })
            .await
            .map_err(state_status)?;
        Ok(Response::new(pb::WriteResponse { revision }))
    }

    type ServiceLogsStream = BoxStream<pb::LogEntry>;

    async fn service_logs(
        &self,
        request: Request<pb::ServiceLogsRequest>,
    ) -> Result<Response<Self::ServiceLogsStream>, Status> {
        if let Some(mut leader) = self.stream_route("service logs", request.metadata())? {
            let upstream = leader
                .service_logs(proxied(request.into_inner()))
                .await
                .map_err(proxy_status)?
                .into_inner();
            return Ok(Response::new(self.relay_from_leader(leader, upstream)));
        }
        let req = request.into_inner();
        let tasks: Vec<(TaskId, NodeId)> = self.store.read(|s| {
            let svc = resolve_service(s, &req.service)?;
            Ok::<_, Status>(
                s.tasks_of_service(&svc.id)
                    .filter_map(|t| Some((t.id.clone(), t.node.clone()?)))
                    .collect(),
            )
        })?;
        let (out, rx) = mpsc::channel(256);
        for (task, node) in tasks {
            if !self.dispatcher.has_session(&node) {
                continue;
            }
            let request = pb::LogRequest {
                request_id: 0,
                task: task.to_string(),
                follow: req.follow,
                tail: req.tail,
                since_unix_nanos: req.since_unix_nanos,
            };
            let relay = match self
                .dispatcher
                .open_relay(&node, |request_id| pb::ControllerMessage {
                    message: Some(pb::controller_message::Message::Logs(pb::LogRequest {
                        request_id,
                        ..request
                    })),
                })
                .await
            {
                Ok(relay) => relay,
                Err(e) => {
                    tracing::debug!(%task, error = %e, "no logs from task");
                    continue;
                }
            };
            let out = out.clone();
            let dispatcher = self.dispatcher.clone();
            let stop = self.shutdown.clone();
            tokio::spawn(async move {
                let mut rx = relay.rx;
                let stop = super::stop_signal(stop);
                tokio::pin!(stop);
                loop {
                    let message = tokio::select! {
                        m = rx.recv() => m,
                        () = out.closed() => break,
                        () = &mut stop => break,
                    };
                    let Some(pb::AgentMessage {
                        message: Some(pb::agent_message::Message::Logs(chunk)),
                    }) = message
                    else {
                        break;
                    };
                    for entry in chunk.entries {
                        if out.send(Ok(entry)).await.is_err() {
                            break;
                        }
                    }
                    if chunk.end {
                        break;
                    }
                }
                dispatcher.close_relay(&node, relay.request_id).await;
            });
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::TaskFilter>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        self.current().await?;
        let filter = request.into_inner();
        let mut states = Vec::new();
        for (i, &state) in filter.states.iter().enumerate() {
            states.push(
                wire::task_state_from_wire(state, &format!("states[{i}]"))
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            );
        }
        self.store
            .read(|s| {
                let service = if filter.service.is_empty() {
                    None
                } else {
                    Some(resolve_service(s, &filter.service)?.id.clone())
                };
                let node = if filter.node.is_empty() {
                    None
                } else {
                    Some(resolve_node(s, &filter.node)?.id.clone())
                };
                let tasks: Vec<Task> = s
                    .tasks()
                    .filter(|t| filter.all || t.desired_state == DesiredState::Running)
                    .filter(|t| service.as_ref().is_none_or(|id| &t.service == id))
                    .filter(|t| node.as_ref().is_none_or(|id| t.node.as_ref() == Some(id)))
                    .filter(|t| states.is_empty() || states.contains(&t.status.state))
                    .filter(|t| {
                        filter.stack.is_empty()
                            || s.service(&t.service)
                                .is_some_and(|svc| svc.spec.stack == filter.stack)
                    })
                    .cloned()
                    .collect();
                Ok(pb::ListTasksResponse {
                    tasks: sorted_tasks(tasks),
                    revision: s.applied_index(),
                })
            })
            .map(Response::new)
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.current().await?;
        Ok(Response::new(self.store.read(|s| {
            let mut nodes: Vec<&Node> = s.nodes().collect();
            nodes.sort_by(|a, b| (&a.status.hostname, &a.id).cmp(&(&b.status.hostname, &b.id)));
            pb::ListNodesResponse {
                nodes: nodes.into_iter().map(|n| n.clone().into()).collect(),
                revision: s.applied_index(),
            }
        })))
    }

    async fn inspect_node(
        &self,
        request: Request<pb::NodeRef>,
    ) -> Result<Response<pb::Node>, Status> {
        self.current().await?;
        let reference = request.into_inner().node;
        self.store
            .read(|s| resolve_node(s, &reference).map(|n| n.clone().into()))
            .map(Response::new)
    }

    async fn update_node(
        &self,
        request: Request<pb::UpdateNodeRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let req = request.into_inner();
        if req.node.is_empty() {
            return Err(Status::invalid_argument("node: must not be empty"));
        }
        let availability = req
            .availability
            .map(|a| wire::availability_from_wire(a, "availability"))
            .transpose()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.label_add.keys().any(String::is_empty) {
            return Err(Status::invalid_argument(
                "label_add: a label key must not be empty",
            ));
        }
        // The edit itself, with the node as named: the state machine
        // resolves the name and applies the edit to the node as the log has
        // it, so no read comes first (none could be stale), and concurrent
        // updates of different labels do not undo each other.
        let (revision, _) = self
            .store
            .propose_one(Command::EditNodeSpec {
                node: req.node,
                availability,
                label_add: req.label_add,
                label_rm: req.label_rm,
                label_default: BTreeMap::new(),
            })
            .await
            .map_err(|e| match e {
                // A hostname several nodes share: bad input, as before the
                // name was resolved at apply.
                StateError::Refused {
                    source: source @ ApplyError::Invalid { .. },
                    ..
                } => Status::invalid_argument(source.to_string()),
                e => state_status(e),
            })?;
        Ok(Response::new(pb::WriteResponse { revision }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        self.current().await?;
        let req = request.into_inner();
        let (id, state) = self
            .store
            .read(|s| resolve_node(s, &req.node).map(|n| (n.id.clone(), n.status.state)))?;
        // `docker node rm` refuses a node that is not down: removing a live
        // node by mistake would pull its tasks' endpoints from every
        // other node while they still run.
        if state == NodeState::Ready && !req.force {
            return Err(Status::failed_precondition(format!(
                "node {id} is ready (its agent is connected); stop it first or use --force"
            )));
        }
        let (revision, _) = self
            .store
            .propose_one(Command::RemoveNode { node: id })
            .await
            .map_err(state_status)?;
        Ok(Response::new(pb::WriteResponse { revision }))
    }

    type EventsStream = BoxStream<pb::Event>;

    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let req = request.into_inner();
        let mut kinds = Vec::new();
        for (i, &k) in req.kinds.iter().enumerate() {
            match pb::ObjectKind::try_from(k) {
                Ok(pb::ObjectKind::Unspecified) | Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "kinds[{i}]: {k} is not an object kind"
                    )));
                }
                Ok(kind) => kinds.push(kind),
            }
        }
        let from = if req.after_revision == 0 {
            0
        } else {
            req.after_revision.saturating_add(1)
        };
        let mut events = self.store.watch(from).map_err(watch_status)?;
        let (out, rx) = mpsc::channel(256);
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            let stop = super::stop_signal(stop);
            tokio::pin!(stop);
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    () = out.closed() => return,
                    () = &mut stop => return,
                };
                match event {
                    Some(Ok(batch)) => {
                        for event in batch {
                            if !kinds.is_empty() && !kinds.contains(&kind_of(&event.object)) {
                                continue;
                            }
                            if out.send(Ok(event_to_wire(event))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        let _ = out.send(Err(watch_status(e))).await;
                        return;
                    }
                    None => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExecStream = BoxStream<pb::ExecServerMessage>;

    async fn exec(
        &self,
        request: Request<Streaming<pb::ExecClientMessage>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        if let Some(mut leader) = self.stream_route("exec", request.metadata())? {
            // Our client's input goes on to the leader as it comes.
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                while let Ok(Some(message)) = inbound.message().await {
                    if tx.send(message).await.is_err() {
                        return;
                    }
                }
            });
            let upstream = leader
                .exec(proxied(ReceiverStream::new(rx)))
                .await
                .map_err(proxy_status)?
                .into_inner();
            return Ok(Response::new(self.relay_from_leader(leader, upstream)));
        }
        let mut inbound = request.into_inner();
        // The client sends `start` at once; one that does not is not held
        // on to for ever.
        let first = tokio::time::timeout(EXEC_START_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no start message within 30 s"))??
            .ok_or_else(|| Status::invalid_argument("message: the first message must be start"))?;
        let Some(pb::exec_client_message::Message::Start(start)) = &first.message else {
            return Err(Status::invalid_argument(
                "message: the first message must be start",
            ));
        };
        if start.command.is_empty() {
            return Err(Status::invalid_argument("start.command: must not be empty"));
        }
        let task_id = TaskId::new(start.task.clone())
            .map_err(|e| Status::invalid_argument(format!("start.task: {e}")))?;
        let node = self.store.read(|s| {
            let task = s
                .task(&task_id)
                .ok_or_else(|| Status::not_found(format!("task {task_id} not found")))?;
            if task.status.state != TaskState::Running {
                return Err(Status::failed_precondition(format!(
                    "task {task_id} is {}, not running",
                    task.status.state
                )));
            }
            task.node
                .clone()
                .ok_or_else(|| Status::failed_precondition(format!("task {task_id} has no node")))
        })?;
        let relay = self
            .dispatcher
            .open_relay(&node, |request_id| pb::ControllerMessage {
                message: Some(pb::controller_message::Message::Exec(pb::ExecRequest {
                    request_id,
                    message: Some(first),
                })),
            })
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let request_id = relay.request_id;
        // Client input → agent.
        let dispatcher = self.dispatcher.clone();
        let input_node = node.clone();
        let input = tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let forward = pb::ControllerMessage {
                    message: Some(pb::controller_message::Message::Exec(pb::ExecRequest {
                        request_id,
                        message: Some(message),
                    })),
                };
                if dispatcher.relay_send(&input_node, forward).await.is_err() {
                    return;
                }
            }
        });
        // Agent output → client.
        let (out, rx) = mpsc::channel(256);
        let dispatcher = self.dispatcher.clone();
        tokio::spawn(async move {
            let mut agent = relay.rx;
            let mut exited = false;
            loop {
                let message = tokio::select! {
                    m = agent.recv() => m,
                    () = out.closed() => break,
                };
                let Some(pb::AgentMessage {
                    message: Some(pb::agent_message::Message::Exec(output)),
                }) = message
                else {
                    break;
                };
                let Some(output) = output.output else {
                    continue;
                };
                exited = matches!(
                    output.message,
                    Some(pb::exec_server_message::Message::Exit(_))
                );
                if out.send(Ok(output)).await.is_err() || exited {
                    break;
                }
            }
            if !exited {
                let _ = out
                    .send(Err(Status::unavailable(format!(
                        "node {node}: the agent session ended before the command exited"
                    ))))
                    .await;
            }
            input.abort();
            dispatcher.close_relay(&node, request_id).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn watch_status(e: WatchError) -> Status {
    match e {
        WatchError::Compacted { .. } => Status::out_of_range(e.to_string()),
        WatchError::Closed => Status::unavailable(e.to_string()),
    }
}
