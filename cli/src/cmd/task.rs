//! `gantry ps`: every task of the cluster (or of one service or node), and
//! the task listing that `service ps` and `stack ps` share.

use std::process::ExitCode;

use gantry_controller::model as m;
use gantry_proto::v1 as pb;

use crate::client::{Client, ControllerFlag, block_on, from_wire};
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
        let node = args.node.map(|n| node_id(&names, &n)).unwrap_or_default();
        let filter = pb::TaskFilter {
            service: args.service.unwrap_or_default(),
            stack: args.stack.unwrap_or_default(),
            node,
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
    let reply = client
        .control
        .list_services(pb::ListServicesRequest {
            stack: stack.to_string(),
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
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
        .control
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
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
        .control
        .list_tasks(filter)
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    rows(reply.tasks, names)
}

/// Tasks from the wire as rows, in the controller's order.
pub fn rows(tasks: Vec<pb::Task>, names: &Names) -> anyhow::Result<Vec<TaskRow>> {
    tasks
        .into_iter()
        .map(|t| {
            let task: m::Task = from_wire(t, "task")?;
            // The wire's task status carries no time of its last change yet,
            // so CURRENT STATE shows the state alone.
            Ok(TaskRow::new(&task, names, None))
        })
        .collect()
}

/// Prints task rows.
pub fn print(format: Format, rows: &[TaskRow]) -> anyhow::Result<()> {
    output::emit(format, &rows, || output::task_table(rows))
}

/// A node named by hostname or id → its id (the task filter takes ids). An
/// unknown name is passed on as it is, for the controller to refuse.
pub fn node_id(names: &Names, node: &str) -> String {
    if names.nodes.contains_key(node) {
        return node.to_string();
    }
    names
        .nodes
        .iter()
        .find(|(_, hostname)| hostname.as_str() == node)
        .map(|(id, _)| id.clone())
        .unwrap_or_else(|| node.to_string())
}
