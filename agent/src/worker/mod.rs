//! The task worker: runs the tasks the controller assigns to this node and
//! keeps them running.
//!
//! - [`restart`]: the pure restart decider (policies, back-off, max attempts).
//! - [`health`]: health probes and their pure counting.
//! - [`Worker`]: assignments in, containers through the [`Engine`], task
//!   status out on a channel.
//!
//! The worker is one synchronous loop ([`Worker::run`], or [`Worker::step`]
//! driven by the caller): it waits on the pidfds of the running tasks'
//! shims, so an exit is seen the moment the shim records it, and on the
//! next due timer (a back-off, a probe) or a short tick for new
//! assignments. Restarts are local and at once: the same container is
//! started again (Docker's model, so logs and the writable layer stay), and
//! its restart count goes up in the status. Probes and stops, which can take
//! seconds, each run on a short-lived thread so that they never delay
//! another task's restart. The threads are sound because the worker never
//! runs Rust code in a forked child: the engine spawns shims with
//! `std::process::Command` (fork and exec at once), and exec probes run in
//! a child `gantry` (see [`health::ExecProbe`]), not through the in-process
//! [`Engine::exec`].
//!
//! **Invariant:** a task's state only moves forward, except that a running
//! task may go to `restarting` and back while its restart policy allows:
//! `complete`, `failed`, `rejected` and `shutdown` are final.
//!
//! **Invariant:** the worker never restarts a container it stopped itself
//! (an assignment removed), whatever the policy; one it stopped for being
//! unhealthy goes through the restart policy as a failed run (Swarm: an
//! unhealthy task fails, and `condition: none` leaves it failed).

pub mod health;
pub mod restart;

use crate::engine::container::{ContainerError, ContainerId, ContainerState, Engine};
use crate::engine::spec::{
    ContainerConfig, MountConfig, NetworkMode, PublishedPort, ResourceConfig,
};
use crate::paths::DataDir;
use health::{
    ExecProbe, HealthCheck, HealthSetting, HealthState, HealthStatus, ProbeResult, ProbeTarget,
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use restart::{Decision, Exit, RestartPolicy, Run};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The label holding a container's task id.
pub const LABEL_TASK_ID: &str = "gantry.task.id";
/// The label holding a container's service name.
pub const LABEL_SERVICE: &str = "gantry.service";
/// The label holding a container's slot.
pub const LABEL_SLOT: &str = "gantry.slot";
/// The label holding the generation of the task's spec.
pub const LABEL_GENERATION: &str = "gantry.generation";

/// The longest the loop sleeps without looking for new assignments.
pub const DEFAULT_TICK: Duration = Duration::from_millis(20);

/// Errors of the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The engine failed on something the worker cannot report per task
    /// (listing containers at start).
    #[error(transparent)]
    Engine(#[from] ContainerError),
    /// Waiting on the shims failed.
    #[error("poll on task pidfds: {0}")]
    Poll(#[source] nix::Error),
}

/// What the controller asks this node to run: one task.
///
/// The agent's own plain type, made from the controller's task by
/// [`crate::daemon::convert::task_spec`]. A task's spec never changes (a changed
/// service gets new tasks, as in Swarm), so a task id already running is
/// left as it is when assigned again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task id (unique in the cluster).
    pub task_id: String,
    /// The service's name (`STACK_NAME`).
    pub service: String,
    /// The replica slot (for global services, any number unique on the node).
    pub slot: u64,
    /// Global services: the node's id, which takes the slot's place in the
    /// container name, as Swarm names global tasks `<service>.<node>`.
    #[serde(default)]
    pub global_node: Option<String>,
    /// The image reference.
    pub image: String,
    /// Replaces the image's cmd.
    pub command: Option<Vec<String>>,
    /// Replaces the image's entrypoint.
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE` entries added to the image's env.
    pub env: Vec<String>,
    /// The user.
    pub user: Option<String>,
    /// The working directory.
    pub working_dir: Option<String>,
    /// The hostname.
    pub hostname: Option<String>,
    /// Mounts.
    pub mounts: Vec<MountConfig>,
    /// Resource limits.
    pub resources: ResourceConfig,
    /// The restart policy, applied here.
    pub restart: RestartPolicy,
    /// The health check: the image's by default.
    pub health: HealthSetting,
    /// The network namespace.
    pub network: NetworkMode,
    /// Ports published on the node (with [`NetworkMode::Bridge`]).
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
    /// Its address on the node's subnet, allocated by the controller.
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
    /// Time between the stop signal and SIGKILL; the engine's 10 s when unset.
    pub stop_grace: Option<Duration>,
    /// User labels, added to the worker's own.
    pub labels: BTreeMap<String, String>,
    /// The generation at which the controller last changed this task.
    pub generation: u64,
}

impl TaskSpec {
    /// The container name, as Swarm's: `<service>.<slot>.<task12>`, or
    /// `<service>.<node12>.<task12>` for a global service (ids cut to 12
    /// characters, as tables show them).
    pub fn container_name(&self) -> String {
        let short = |id: &str| id.chars().take(12).collect::<String>();
        let instance = match &self.global_node {
            Some(node) => short(node),
            None => self.slot.to_string(),
        };
        format!("{}.{instance}.{}", self.service, short(&self.task_id))
    }

    fn container_config(&self) -> ContainerConfig {
        let mut labels = self.labels.clone();
        labels.insert(LABEL_TASK_ID.into(), self.task_id.clone());
        labels.insert(LABEL_SERVICE.into(), self.service.clone());
        labels.insert(LABEL_SLOT.into(), self.slot.to_string());
        labels.insert(LABEL_GENERATION.into(), self.generation.to_string());
        ContainerConfig {
            image: self.image.clone(),
            name: Some(self.container_name()),
            command: self.command.clone(),
            entrypoint: self.entrypoint.clone(),
            env: self.env.clone(),
            working_dir: self.working_dir.clone(),
            user: self.user.clone(),
            hostname: self.hostname.clone(),
            mounts: self.mounts.clone(),
            resources: self.resources.clone(),
            network: self.network.clone(),
            ports: self.ports.clone(),
            address: self.address,
            stop_grace_secs: self.stop_grace.map(|d| d.as_secs()),
            labels,
            ..ContainerConfig::default()
        }
    }
}

/// A task's state as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Its container is being created and started.
    Starting,
    /// Its container runs.
    Running,
    /// Its container ended and will be started again after a back-off.
    Restarting,
    /// It ended successfully and will not be restarted.
    Complete,
    /// It ended with a failure and will not be restarted.
    Failed,
    /// Its container could not be created or started.
    Rejected,
    /// It was stopped and removed because it is no longer assigned.
    Shutdown,
}

impl TaskState {
    /// Whether the state is final.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Complete | TaskState::Failed | TaskState::Rejected | TaskState::Shutdown
        )
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Restarting => "restarting",
            TaskState::Complete => "complete",
            TaskState::Failed => "failed",
            TaskState::Rejected => "rejected",
            TaskState::Shutdown => "shutdown",
        })
    }
}

/// A change of a task, sent up to the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// The task.
    pub task_id: String,
    /// Its container, once created.
    pub container_id: Option<String>,
    /// Its state.
    pub state: TaskState,
    /// The last exit code.
    pub exit_code: Option<i32>,
    /// How often the worker restarted it.
    pub restarts: u32,
    /// Its health, when it has a check.
    pub health: Option<HealthStatus>,
    /// What happened, for people.
    pub message: String,
}

/// How a [`Worker`] is set up.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The node's data directory (the engine's).
    pub data_dir: DataDir,
    /// The `gantry` binary, for exec probes.
    pub gantry_binary: PathBuf,
    /// The longest [`Worker::run`] sleeps before looking for new assignments.
    pub tick: Duration,
}

/// What [`Worker::run`] is told.
#[derive(Debug, Clone)]
pub enum Control {
    /// New assignments (see [`Worker::apply`]).
    Apply {
        /// Every task this node should run.
        tasks: Vec<TaskSpec>,
        /// Their generation.
        generation: u64,
    },
    /// Return from [`Worker::run`], leaving the containers running (an
    /// agent restart must not stop workloads; the next worker adopts them).
    Shutdown,
}

/// Where a task is in its container's life.
#[derive(Debug)]
enum Phase {
    /// Running; the pidfd of its shim.
    Running(OwnedFd),
    /// Ended; start again at this time.
    Waiting(Duration),
    /// Ended for good.
    Done,
}

/// A probe in flight.
struct Probing {
    thread: JoinHandle<ProbeResult>,
}

/// A task the worker owns.
struct Task {
    spec: TaskSpec,
    container: ContainerId,
    phase: Phase,
    state: TaskState,
    runs: Vec<Run>,
    started: Duration,
    restarts: u32,
    exit_code: Option<i32>,
    /// The check in effect (the spec's or the image's).
    check: Option<HealthCheck>,
    health: Option<HealthState>,
    next_probe: Option<Duration>,
    probing: Option<Probing>,
    /// A stop is in flight because the task turned unhealthy.
    stopping_unhealthy: Option<UnhealthyStop>,
}

impl Task {
    /// A task just created or adopted: starting, with no run or probe yet.
    fn new(
        spec: TaskSpec,
        container: ContainerId,
        check: Option<HealthCheck>,
        now: Duration,
    ) -> Task {
        Task {
            spec,
            container,
            phase: Phase::Done,
            state: TaskState::Starting,
            runs: Vec::new(),
            started: now,
            restarts: 0,
            exit_code: None,
            check,
            health: None,
            next_probe: None,
            probing: None,
            stopping_unhealthy: None,
        }
    }
}

/// The stop of a task that turned unhealthy.
enum UnhealthyStop {
    /// [`Engine::stop`] runs on this thread.
    InFlight(JoinHandle<Result<(), ContainerError>>),
    /// It returned; the exit is on its way through the pidfd.
    Stopped,
}

/// A container being stopped and removed (no longer assigned).
struct Removal {
    task_id: String,
    container: ContainerId,
    restarts: u32,
    thread: JoinHandle<Result<(), ContainerError>>,
}

/// Runs this node's tasks through the engine. See the module docs.
pub struct Worker {
    engine: Engine,
    config: WorkerConfig,
    events: Sender<TaskStatus>,
    origin: Instant,
    generation: Option<u64>,
    tasks: BTreeMap<String, Task>,
    /// Containers of tasks found at start, kept untouched until the first
    /// assignments say which are still wanted.
    adopted: BTreeMap<String, ContainerId>,
    removals: Vec<Removal>,
}

impl Worker {
    /// A worker over `engine`, sending task changes to `events`. Containers
    /// labelled with a task id are found and kept running, to be adopted
    /// by the first [`Worker::apply`] that still assigns their task.
    pub fn new(
        engine: Engine,
        config: WorkerConfig,
        events: Sender<TaskStatus>,
    ) -> Result<Worker, WorkerError> {
        let mut adopted = BTreeMap::new();
        let mut duplicates = Vec::new();
        // Oldest first: a newer container of the same task (a create that
        // raced a crash) wins, the older one goes.
        for info in engine.list()? {
            if let Some(task) = info.config.labels.get(LABEL_TASK_ID)
                && let Some(old) = adopted.insert(task.clone(), info.id.clone())
            {
                duplicates.push((task.clone(), old));
            }
        }
        let mut worker = Worker {
            engine,
            config,
            events,
            origin: Instant::now(),
            generation: None,
            tasks: BTreeMap::new(),
            adopted,
            removals: Vec::new(),
        };
        for (task, container) in duplicates {
            worker.remove_container(task, container, 0, None);
        }
        Ok(worker)
    }

    /// The generation last applied.
    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// The current status of every task.
    pub fn statuses(&self) -> Vec<TaskStatus> {
        self.tasks
            .values()
            .map(|t| status_of(t, String::new()))
            .collect()
    }

    /// Makes this node run exactly `assignments`: new tasks are created and
    /// started (or adopted when their container exists), tasks no longer
    /// listed are stopped and removed. A generation not newer than the last
    /// one applied is stale and ignored: false.
    ///
    /// Never fails as a whole: a task that cannot run (no such image, an
    /// empty task id, a name in use) is reported `rejected` and the others
    /// run, as a Swarm agent does.
    pub fn apply(&mut self, assignments: Vec<TaskSpec>, generation: u64) -> bool {
        if self.generation.is_some_and(|g| generation <= g) {
            tracing::debug!(generation, current = ?self.generation, "stale assignments ignored");
            return false;
        }
        self.generation = Some(generation);
        let (assignments, invalid): (Vec<TaskSpec>, Vec<TaskSpec>) =
            assignments.into_iter().partition(|s| !s.task_id.is_empty());
        for spec in invalid {
            self.send(TaskStatus {
                task_id: spec.task_id,
                container_id: None,
                state: TaskState::Rejected,
                exit_code: None,
                restarts: 0,
                health: None,
                message: format!(
                    "task of service {} slot {} has an empty task id",
                    spec.service, spec.slot
                ),
            });
        }
        let wanted: BTreeMap<String, TaskSpec> = assignments
            .into_iter()
            .map(|s| (s.task_id.clone(), s))
            .collect();
        // Gone from the assignments: stop and remove.
        let gone: Vec<String> = self
            .tasks
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(task) = self.tasks.remove(&id) {
                let grace = task.spec.stop_grace;
                self.remove_container(id, task.container, task.restarts, grace);
            }
        }
        let orphans: Vec<(String, ContainerId)> = self
            .adopted
            .iter()
            .filter(|(id, _)| !wanted.contains_key(*id))
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect();
        for (id, container) in orphans {
            self.adopted.remove(&id);
            self.remove_container(id, container, 0, None);
        }
        for (id, spec) in wanted {
            if self.tasks.contains_key(&id) {
                continue;
            }
            match self.adopted.remove(&id) {
                Some(container) => self.adopt(spec, container),
                None => self.create(spec),
            }
        }
        true
    }

    /// Waits up to `max_wait` for something to do (an exit, a due restart
    /// or probe, a finished probe or stop) and does it.
    pub fn step(&mut self, max_wait: Duration) -> Result<(), WorkerError> {
        let now = self.now();
        let mut wait = max_wait;
        for task in self.tasks.values() {
            for at in [
                match task.phase {
                    Phase::Waiting(at) => Some(at),
                    _ => None,
                },
                task.next_probe.filter(|_| task.probing.is_none()),
            ]
            .into_iter()
            .flatten()
            {
                wait = wait.min(at.saturating_sub(now));
            }
            if task.probing.is_some() || task.stopping_unhealthy.is_some() {
                wait = wait.min(DEFAULT_TICK);
            }
        }
        if !self.removals.is_empty() {
            wait = wait.min(DEFAULT_TICK);
        }
        let exited = self.wait_exits(wait)?;
        for id in exited {
            self.on_exit(&id);
        }
        self.finish_removals();
        self.finish_failed_stops();
        self.finish_probes();
        self.run_due();
        Ok(())
    }

    /// Runs the loop until told [`Control::Shutdown`] or the sender is gone.
    pub fn run(mut self, control: Receiver<Control>) -> Result<(), WorkerError> {
        loop {
            loop {
                match control.try_recv() {
                    Ok(Control::Apply { tasks, generation }) => {
                        self.apply(tasks, generation);
                    }
                    Ok(Control::Shutdown) | Err(TryRecvError::Disconnected) => {
                        self.drain();
                        return Ok(());
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            self.step(self.config.tick)?;
        }
    }

    /// Waits for the stops and removals in flight, so that none is cut off.
    fn drain(&mut self) {
        while !self.removals.is_empty() {
            std::thread::sleep(DEFAULT_TICK);
            self.finish_removals();
        }
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn send(&self, status: TaskStatus) {
        tracing::debug!(task = %status.task_id, state = %status.state, "{}", status.message);
        // Nobody listening is not the worker's failure: tasks keep running.
        let _ = self.events.send(status);
    }

    fn emit(&self, id: &str, message: impl Into<String>) {
        if let Some(task) = self.tasks.get(id) {
            self.send(status_of(task, message.into()));
        }
    }

    fn create(&mut self, spec: TaskSpec) {
        let id = spec.task_id.clone();
        let rejected = |message: String| TaskStatus {
            task_id: id.clone(),
            container_id: None,
            state: TaskState::Rejected,
            exit_code: None,
            restarts: 0,
            health: None,
            message,
        };
        let container = match self.engine.create(&spec.container_config()) {
            Ok(c) => c,
            Err(e) => return self.send(rejected(format!("create: {e}"))),
        };
        let check = self.check_for(&spec);
        let task = Task::new(spec, container.clone(), check, self.now());
        self.tasks.insert(id.clone(), task);
        self.emit(&id, "container created");
        if let Err(e) = self.start(&id) {
            if let Some(task) = self.tasks.get_mut(&id) {
                task.state = TaskState::Rejected;
                task.phase = Phase::Done;
            }
            self.emit(&id, format!("start: {e}"));
        }
    }

    /// Takes over a container found at start: a running one is watched, a
    /// created one started, an ended one handled as an exit just seen.
    fn adopt(&mut self, spec: TaskSpec, container: ContainerId) {
        let id = spec.task_id.clone();
        let now = self.now();
        let check = self.check_for(&spec);
        self.tasks
            .insert(id.clone(), Task::new(spec, container.clone(), check, now));
        let state = self.engine.inspect(&container).map(|i| i.state);
        match state {
            Ok(ContainerState::Running) => match self.engine.shim_pidfd(&container) {
                Ok(Some(fd)) => {
                    self.set_running(&id, Some(fd), now);
                    self.emit(&id, "adopted running container");
                }
                // It ended between the two looks.
                Ok(None) => self.on_exit(&id),
                Err(e) => self.fail(&id, format!("adopt: {e}")),
            },
            Ok(ContainerState::Created) => {
                if let Err(e) = self.start(&id) {
                    self.fail(&id, format!("start: {e}"));
                }
            }
            Ok(ContainerState::Exited | ContainerState::Dead) => self.on_exit(&id),
            Err(e) => self.fail(&id, format!("adopt: {e}")),
        }
    }

    /// The health check a task runs: its own, else its image's (read from
    /// the image config, which the OCI types do not carry). An image whose
    /// check cannot be read runs none, with a warning: a task must not fail
    /// to start over its image's optional metadata.
    fn check_for(&self, spec: &TaskSpec) -> Option<HealthCheck> {
        match &spec.health {
            HealthSetting::Disabled => None,
            HealthSetting::Check(check) => Some(check.clone()),
            HealthSetting::FromImage => {
                let images = self.engine.images();
                let config = images
                    .resolve(&spec.image)
                    .and_then(|image| Ok(images.blobs().read(&image.id)?))
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| {
                        serde_json::from_slice::<serde_json::Value>(&bytes)
                            .map_err(|e| e.to_string())
                    })
                    .and_then(|config| {
                        health::from_image_config(&config).map_err(|e| e.to_string())
                    });
                match config {
                    Ok(check) => check,
                    Err(e) => {
                        tracing::warn!(task = %spec.task_id, image = %spec.image, "image healthcheck: {e}");
                        None
                    }
                }
            }
        }
    }

    /// Starts the task's container and watches it.
    fn start(&mut self, id: &str) -> Result<(), ContainerError> {
        let Some(task) = self.tasks.get(id) else {
            return Ok(());
        };
        let container = task.container.clone();
        self.engine.start(&container)?;
        let now = self.now();
        let pidfd = self.engine.shim_pidfd(&container)?;
        self.set_running(id, pidfd, now);
        let restarts = self.tasks.get(id).map_or(0, |t| t.restarts);
        self.emit(
            id,
            if restarts == 0 {
                "started".to_string()
            } else {
                format!("restarted ({restarts})")
            },
        );
        if matches!(self.tasks.get(id), Some(t) if !matches!(t.phase, Phase::Running(_))) {
            // It ended before its shim could be watched: handle it as any exit.
            self.on_exit(id);
        }
        Ok(())
    }

    /// Marks the task's container started at `now`, watched through `fd`
    /// (`None`: it already ended, and the caller handles the exit).
    fn set_running(&mut self, id: &str, fd: Option<OwnedFd>, now: Duration) {
        if let Some(task) = self.tasks.get_mut(id) {
            task.phase = match fd {
                Some(fd) => Phase::Running(fd),
                None => Phase::Done,
            };
            task.state = TaskState::Running;
            task.started = now;
            task.probing = None;
            task.health = task.check.as_ref().map(|_| HealthState::new(now));
            task.next_probe = task.check.as_ref().map(|h| now + h.interval);
        }
    }

    fn fail(&mut self, id: &str, message: String) {
        if let Some(task) = self.tasks.get_mut(id) {
            task.state = TaskState::Failed;
            task.phase = Phase::Done;
            task.next_probe = None;
        }
        self.emit(id, message);
    }

    /// Polls the running tasks' shim pidfds; the tasks whose shim exited.
    fn wait_exits(&self, timeout: Duration) -> Result<Vec<String>, WorkerError> {
        let running: Vec<(&String, &OwnedFd)> = self
            .tasks
            .iter()
            .filter_map(|(id, t)| match &t.phase {
                Phase::Running(fd) => Some((id, fd)),
                _ => None,
            })
            .collect();
        if running.is_empty() {
            std::thread::sleep(timeout);
            return Ok(Vec::new());
        }
        let mut fds: Vec<PollFd<'_>> = running
            .iter()
            .map(|(_, fd)| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
            .collect();
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => return Ok(Vec::new()),
            Ok(_) => {}
            Err(e) => return Err(WorkerError::Poll(e)),
        }
        Ok(running
            .iter()
            .zip(&fds)
            .filter(|(_, fd)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|((id, _), _)| (*id).clone())
            .collect())
    }

    /// A task's container ended: record the run and ask the policy.
    fn on_exit(&mut self, id: &str) {
        let now = self.now();
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        let info = self.engine.inspect(&task.container);
        let (exit, mut message) = match &info {
            Ok(info) => match &info.exit {
                Some(e) => (
                    Exit {
                        code: e.exit_code,
                        signal: e.signal,
                        oom_killed: e.oom_killed,
                    },
                    match (e.signal, e.oom_killed) {
                        (_, true) => format!("exited with {} (OOM killed)", e.exit_code),
                        (Some(sig), _) => format!("exited with {} (signal {sig})", e.exit_code),
                        (None, _) => format!("exited with {}", e.exit_code),
                    },
                ),
                // Dead: the shim died without recording the exit.
                None => (
                    Exit {
                        code: 255,
                        signal: None,
                        oom_killed: false,
                    },
                    info.error
                        .clone()
                        .unwrap_or_else(|| "container ended".into()),
                ),
            },
            Err(e) => (
                Exit {
                    code: 255,
                    signal: None,
                    oom_killed: false,
                },
                format!("inspect: {e}"),
            ),
        };
        let mut unhealthy = false;
        if let Some(stop) = task.stopping_unhealthy.take() {
            if let UnhealthyStop::InFlight(thread) = stop {
                // The container ended, so the stop returns at once.
                let _ = thread.join();
            }
            unhealthy = true;
            message = format!("unhealthy, stopped: {message}");
        }
        // A container stopped for being unhealthy failed, whatever it exited
        // with (a graceful 0 after SIGTERM included); the true code is
        // still what is reported.
        let judged = if unhealthy && !exit.failed() {
            Exit { code: 1, ..exit }
        } else {
            exit
        };
        task.exit_code = Some(exit.code);
        task.runs.push(Run {
            started: task.started,
            ended: now,
        });
        task.next_probe = None;
        task.probing = None;
        let decision = restart::decide(&task.spec.restart, &judged, &task.runs);
        match decision {
            Decision::Restart { after } => {
                task.state = TaskState::Restarting;
                task.phase = Phase::Waiting(now + after);
            }
            Decision::GiveUp { .. } => {
                task.state = if judged.failed() {
                    TaskState::Failed
                } else {
                    TaskState::Complete
                };
                task.phase = Phase::Done;
            }
        }
        match decision {
            Decision::Restart { after } => {
                self.emit(id, format!("{message}; restarting in {after:?}"));
                if after.is_zero() {
                    self.restart(id);
                }
            }
            Decision::GiveUp { reason } => {
                self.emit(id, format!("{message}; not restarted: {reason}"));
            }
        }
    }

    fn restart(&mut self, id: &str) {
        if let Some(task) = self.tasks.get_mut(id) {
            task.restarts += 1;
        }
        if let Err(e) = self.start(id) {
            self.fail(id, format!("restart: {e}"));
        }
    }

    /// Starts due restarts and due probes.
    fn run_due(&mut self) {
        let now = self.now();
        let due_restarts: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| matches!(t.phase, Phase::Waiting(at) if at <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due_restarts {
            self.restart(&id);
        }
        let exec = ExecProbe {
            gantry_binary: self.config.gantry_binary.clone(),
            data_dir: self.config.data_dir.root().to_path_buf(),
        };
        for task in self.tasks.values_mut() {
            let (Some(check), Some(at), None, Phase::Running(_)) =
                (&task.check, task.next_probe, &task.probing, &task.phase)
            else {
                continue;
            };
            if at > now || task.stopping_unhealthy.is_some() {
                continue;
            }
            let netns_pid = match task.spec.network {
                NetworkMode::Host => None,
                _ => self
                    .engine
                    .inspect(&task.container)
                    .ok()
                    .and_then(|i| i.pid),
            };
            let target = ProbeTarget {
                container_id: task.container.to_string(),
                netns_pid,
            };
            let (exec, probe, timeout) = (exec.clone(), check.probe.clone(), check.timeout);
            let thread = std::thread::Builder::new()
                .name("gantry-health".into())
                .spawn(move || health::run_probe(&exec, &probe, &target, timeout));
            match thread {
                Ok(thread) => task.probing = Some(Probing { thread }),
                Err(e) => {
                    tracing::warn!(task = %task.spec.task_id, "health probe thread: {e}");
                    task.next_probe = Some(now + check.interval);
                }
            }
        }
    }

    /// Counts the probes that finished; stops tasks that turned unhealthy.
    fn finish_probes(&mut self) {
        let now = self.now();
        let mut changed = Vec::new();
        for (id, task) in self.tasks.iter_mut() {
            if !task
                .probing
                .as_ref()
                .is_some_and(|p| p.thread.is_finished())
            {
                continue;
            }
            let Some(probing) = task.probing.take() else {
                continue;
            };
            let result = probing.thread.join().unwrap_or_else(|_| ProbeResult {
                healthy: false,
                exit_code: None,
                output: "health probe panicked".into(),
            });
            // A probe of a container that ended since is moot.
            let (Some(check), Some(health), Phase::Running(_)) =
                (&task.check, &mut task.health, &task.phase)
            else {
                continue;
            };
            let output = result.output.clone();
            task.next_probe = Some(now + check.interval);
            if let Some(status) = health.record(check, result, now) {
                changed.push((id.clone(), status, output));
            }
        }
        for (id, status, output) in changed {
            let output = output.trim();
            self.emit(
                &id,
                if output.is_empty() {
                    format!("health: {status}")
                } else {
                    format!("health: {status}: {output}")
                },
            );
            if status == HealthStatus::Unhealthy {
                self.stop_unhealthy(&id);
            }
        }
    }

    fn stop_unhealthy(&mut self, id: &str) {
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        let (engine, container, grace) = (
            self.engine.clone(),
            task.container.clone(),
            task.spec.stop_grace,
        );
        task.next_probe = None;
        let thread = std::thread::Builder::new()
            .name("gantry-stop".into())
            .spawn(move || engine.stop(&container, grace));
        match thread {
            Ok(t) => task.stopping_unhealthy = Some(UnhealthyStop::InFlight(t)),
            Err(e) => tracing::warn!(task = %id, "stop thread: {e}"),
        }
    }

    /// A stop of an unhealthy task that failed leaves it running: probing
    /// resumes, so that it is stopped again if it stays unhealthy (or
    /// recovers), rather than never looked at again.
    fn finish_failed_stops(&mut self) {
        let now = self.now();
        let mut failed = Vec::new();
        for (id, task) in self.tasks.iter_mut() {
            let finished = matches!(
                &task.stopping_unhealthy,
                Some(UnhealthyStop::InFlight(t)) if t.is_finished()
            );
            if !finished {
                continue;
            }
            let Some(UnhealthyStop::InFlight(stop)) = task.stopping_unhealthy.take() else {
                continue;
            };
            let error = match stop.join() {
                // Stopped: the exit is on its way through the pidfd, and
                // must still be counted as the unhealthy stop it is.
                Ok(Ok(())) => {
                    task.stopping_unhealthy = Some(UnhealthyStop::Stopped);
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the stop thread panicked".to_string(),
            };
            task.next_probe = task.check.as_ref().map(|c| now + c.interval);
            failed.push((id.clone(), error));
        }
        for (id, e) in failed {
            self.emit(&id, format!("stopping the unhealthy container: {e}"));
        }
    }

    /// Stops and removes a container in the background; `shutdown` is
    /// reported once it is gone.
    fn remove_container(
        &mut self,
        task_id: String,
        container: ContainerId,
        restarts: u32,
        grace: Option<Duration>,
    ) {
        let engine = self.engine.clone();
        let c = container.clone();
        let thread = std::thread::Builder::new()
            .name("gantry-remove".into())
            .spawn(move || {
                engine.stop(&c, grace)?;
                engine.remove(&c, true)
            });
        match thread {
            Ok(thread) => self.removals.push(Removal {
                task_id,
                container,
                restarts,
                thread,
            }),
            Err(e) => tracing::warn!(task = %task_id, "remove thread: {e}"),
        }
    }

    fn finish_removals(&mut self) {
        let (done, pending): (Vec<Removal>, Vec<Removal>) = std::mem::take(&mut self.removals)
            .into_iter()
            .partition(|r| r.thread.is_finished());
        self.removals = pending;
        for removal in done {
            let message = match removal.thread.join() {
                Ok(Ok(())) => "stopped and removed: no longer assigned".to_string(),
                Ok(Err(e)) => format!("removing its container: {e}"),
                Err(_) => "removing its container: the thread panicked".to_string(),
            };
            self.send(TaskStatus {
                task_id: removal.task_id,
                container_id: Some(removal.container.to_string()),
                state: TaskState::Shutdown,
                exit_code: None,
                restarts: removal.restarts,
                health: None,
                message,
            });
        }
    }
}

fn status_of(task: &Task, message: String) -> TaskStatus {
    TaskStatus {
        task_id: task.spec.task_id.clone(),
        container_id: Some(task.container.to_string()),
        state: task.state,
        exit_code: task.exit_code,
        restarts: task.restarts,
        health: task.health.as_ref().map(HealthState::status),
        message,
    }
}
