//! `gantry ps`: every task of the cluster (or of one service, stack or
//! node); the task listing that `service ps` and `stack ps` share; and the
//! wait for convergence behind `deploy --wait` and `service scale --wait`.

use std::process::ExitCode;
use std::time::Duration;

use gantry_controller::model as m;
use gantry_proto::tonic::Status;
use gantry_proto::v1 as pb;

use crate::client::{Client, ControllerFlag, Repeat, block_on, from_wire, stream_ended};
use crate::output::{self, Format, Names, TaskRow};

/// `gantry ps`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also show tasks that are meant to be stopped (history).
    #[arg(short, long)]
    pub all: bool,
    /// Only this service's tasks (id, STACK_NAME, or NAME when unambiguous).
    #[arg(long, value_name = "SERVICE")]
    pub service: Option<String>,
    /// Only tasks on this node (id or hostname).
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Only this stack's tasks.
    #[arg(long, value_name = "STACK")]
    pub stack: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

/// Runs `gantry ps`.
pub fn run(args: Args, controller: &ControllerFlag) -> anyhow::Result<ExitCode> {
    block_on(async {
        let mut client = Client::connect(controller).await?;
        let names = names(&mut client).await?;
        let filter = pb::TaskFilter {
            service: args.service.unwrap_or_default(),
            stack: args.stack.unwrap_or_default(),
            // The controller resolves a hostname as well as an id.
            node: args.node.unwrap_or_default(),
            states: Vec::new(),
            all: args.all,
        };
        let rows = list(&mut client, &names, filter).await?;
        print(args.output, &rows)?;
        Ok(ExitCode::SUCCESS)
    })?
}

/// The names of every service and node, for showing tasks.
pub async fn names(client: &mut Client) -> anyhow::Result<Names> {
    let services = services(client, "").await?;
    let nodes = nodes(client).await?;
    Ok(Names::new(services.iter().map(|(s, _, _)| s), &nodes))
}

/// Every service (of one stack, or all for ""), with its running and
/// desired counts.
pub async fn services(
    client: &mut Client,
    stack: &str,
) -> anyhow::Result<Vec<(m::Service, u64, u64)>> {
    let request = pb::ListServicesRequest {
        stack: stack.to_string(),
    };
    let reply = client
        .call(Repeat::Read, request, |mut c, r| async move {
            c.list_services(r).await
        })
        .await
        .map_err(|s| client.error(s))?;
    reply
        .services
        .into_iter()
        .map(|info| {
            let service = info.service.ok_or_else(|| {
                anyhow::anyhow!("the controller sent a service list entry without its service")
            })?;
            Ok((from_wire(service, "service")?, info.running, info.desired))
        })
        .collect()
}

/// Every node.
pub async fn nodes(client: &mut Client) -> anyhow::Result<Vec<m::Node>> {
    let reply = client
        .call(
            Repeat::Read,
            pb::ListNodesRequest {},
            |mut c, r| async move { c.list_nodes(r).await },
        )
        .await
        .map_err(|s| client.error(s))?;
    reply
        .nodes
        .into_iter()
        .map(|n| from_wire(n, "node"))
        .collect()
}

/// The tasks a filter selects, as rows.
pub async fn list(
    client: &mut Client,
    names: &Names,
    filter: pb::TaskFilter,
) -> anyhow::Result<Vec<TaskRow>> {
    let reply = client
        .call(Repeat::Read, filter, |mut c, r| async move {
            c.list_tasks(r).await
        })
        .await
        .map_err(|s| client.error(s))?;
    rows(reply.tasks, names)
}

/// Tasks from the wire as rows, in the controller's order.
pub fn rows(tasks: Vec<pb::Task>, names: &Names) -> anyhow::Result<Vec<TaskRow>> {
    let now = std::time::SystemTime::now();
    tasks
        .into_iter()
        .map(|t| {
            let task: m::Task = from_wire(t, "task")?;
            let since = output::since(task.status.timestamp_unix_ms, now);
            Ok(TaskRow::new(&task, names, since))
        })
        .collect()
}

/// Prints task rows.
pub fn print(format: Format, rows: &[TaskRow]) -> anyhow::Result<()> {
    output::emit(format, &rows, || output::task_table(rows))
}

/// `--wait` for `deploy` and `service scale`: how long to wait for the
/// services to run as many tasks as they want.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Wait until every affected service runs as many tasks as it wants,
    /// printing progress on stderr, like `docker stack deploy --detach=false`.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long (`90s`, `2m`); exit 1, listing the
    /// tasks that are not running and why.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration, requires = "wait")]
    pub timeout: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    gantry_controller::compose::units::Duration::parse(text)
        .map(|d| d.0)
        .map_err(|e| e.to_string())
}

/// Waits until the selected services (of `stack`, or all; only those named
/// in `only` when it is not empty) each run `desired` tasks, or `timeout`
/// passes. Changes are followed through `Events`, not by polling: the
/// counts are read again after each burst of task and service events.
pub async fn wait_converged(
    client: &mut Client,
    stack: &str,
    only: &[String],
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Subscribe before the first count, so that no change between the two
    // is missed.
    let request = pb::EventsRequest {
        after_revision: 0,
        kinds: vec![pb::ObjectKind::Task as i32, pb::ObjectKind::Service as i32],
    };
    let mut events = subscribe(client, request.clone()).await?;
    let mut last_progress = String::new();
    // Bounded by the deadline; the count only keeps a broken stream from
    // spinning.
    for _ in 0..100_000 {
        let selected: Vec<(m::Service, u64, u64)> = services(client, stack)
            .await?
            .into_iter()
            .filter(|(s, _, _)| only.is_empty() || only.iter().any(|n| names_service(n, s)))
            .collect();
        let stopping = stopping(client, stack).await?;
        let progress: Vec<String> = selected
            .iter()
            .map(|(s, running, desired)| {
                let name = output::full_name(&s.spec.stack, &s.spec.name);
                match stopping.get(s.id.as_str()) {
                    Some(n) => format!("{name}: {running}/{desired} running, {n} stopping"),
                    None => format!("{name}: {running}/{desired} running"),
                }
            })
            .collect();
        let progress = progress.join(", ");
        if progress != last_progress {
            eprintln!("{progress}");
            last_progress = progress;
        }
        // The controller counts only tasks meant to run, so a scale down
        // has converged once the surplus tasks, meant to stop, have stopped.
        if selected.iter().all(|(s, running, desired)| {
            running == desired && !stopping.contains_key(s.id.as_str())
        }) {
            return Ok(ExitCode::SUCCESS);
        }
        match tokio::time::timeout_at(deadline, events.message()).await {
            Err(_) => return not_converged(client, &selected, timeout).await,
            // The controller failed under the stream (or stopped and ended
            // it): go on with another, since every member serves events, and
            // count again.
            Ok(Err(status)) => events = resubscribe(client, status, &request).await?,
            Ok(Ok(None)) if client.can_fail_over() => {
                events = resubscribe(client, stream_ended("event"), &request).await?;
            }
            Ok(Ok(None)) => anyhow::bail!("the controller ended the event stream while we waited"),
            Ok(Ok(Some(_))) => {
                // A scale or deploy changes many tasks at once: take the
                // whole burst before counting again.
                let quiet = Duration::from_millis(50);
                for _ in 0..10_000 {
                    match tokio::time::timeout(quiet, events.message()).await {
                        Ok(Ok(Some(_))) => continue,
                        Ok(Err(status)) => {
                            events = resubscribe(client, status, &request).await?;
                            break;
                        }
                        _ => break,
                    }
                }
            }
        }
    }
    anyhow::bail!("gave up waiting: too many changes")
}

/// Opens an event stream (failing over like any read).
async fn subscribe(
    client: &mut Client,
    request: pb::EventsRequest,
) -> anyhow::Result<gantry_proto::tonic::Streaming<pb::Event>> {
    client
        .call(Repeat::Read, request, |mut c, r| async move {
            c.events(r).await
        })
        .await
        .map_err(|s| client.error(s))
}

/// After `status` broke an event stream: fails over to another controller
/// and subscribes there, when the client may (else the error).
async fn resubscribe(
    client: &mut Client,
    status: Status,
    request: &pb::EventsRequest,
) -> anyhow::Result<gantry_proto::tonic::Streaming<pb::Event>> {
    client.fail_over_stream(status).await?;
    subscribe(client, request.clone()).await
}

/// Per service id, its tasks meant to stop that still run.
async fn stopping(
    client: &mut Client,
    stack: &str,
) -> anyhow::Result<std::collections::HashMap<String, u64>> {
    let filter = pb::TaskFilter {
        stack: stack.to_string(),
        states: vec![pb::TaskState::Running as i32],
        all: true,
        ..Default::default()
    };
    let reply = client
        .call(Repeat::Read, filter, |mut c, r| async move {
            c.list_tasks(r).await
        })
        .await
        .map_err(|s| client.error(s))?;
    let mut out = std::collections::HashMap::new();
    for t in reply.tasks {
        if t.desired_state == pb::DesiredState::Shutdown as i32 {
            *out.entry(t.service).or_insert(0) += 1;
        }
    }
    Ok(out)
}

/// Whether a name given on the command line names this service.
fn names_service(name: &str, s: &m::Service) -> bool {
    name == s.id.as_str()
        || name == s.spec.name
        || name == output::full_name(&s.spec.stack, &s.spec.name)
}

/// The end of a wait that timed out: the tasks that are not where they
/// should be (not running though wanted, or running though meant to stop),
/// with their reasons, then exit 1.
async fn not_converged(
    client: &mut Client,
    selected: &[(m::Service, u64, u64)],
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let names = names(client).await?;
    let mut stuck = Vec::new();
    // Every selected service: one whose counts match may still have tasks
    // that are meant to stop and have not.
    for (s, _, _) in selected {
        let filter = pb::TaskFilter {
            service: s.id.to_string(),
            all: true,
            ..Default::default()
        };
        stuck.extend(list(client, &names, filter).await?.into_iter().filter(|t| {
            let running = t.task_state == m::TaskState::Running;
            if t.desired_state == "running" {
                !running
            } else {
                running
            }
        }));
    }
    eprint!("{}", output::task_table(&stuck));
    anyhow::bail!(
        "not every service is running its tasks after {}",
        output::human_duration(timeout).to_lowercase()
    )
}
