//! `gantry node ls|inspect|update|rm`: the cluster's nodes, as `docker node`
//! shows them. A node is named by its id or hostname.

use std::collections::BTreeMap;
use std::process::ExitCode;

use gantry_controller::model as m;
use gantry_proto::v1 as pb;
use serde::Serialize;

use crate::client::{Client, ControllerFlag, Repeat, block_on, from_wire};
use crate::cmd::task;
use crate::output::{self, Format, NodeRow};

/// `gantry node`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// List nodes.
    #[command(visible_alias = "list")]
    Ls {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show a node in full (JSON unless -o says otherwise).
    Inspect {
        /// The node (id or hostname).
        node: String,
        /// Output format; `table` prints a short summary.
        #[arg(short, long, value_enum, default_value_t = Format::Json)]
        output: Format,
    },
    /// Remove a node that is down from the cluster (`docker node rm`): its
    /// tasks move elsewhere and the other nodes drop its overlay entries.
    #[command(visible_alias = "remove")]
    Rm {
        /// The node (id or hostname).
        node: String,
        /// Remove it even while its agent is connected.
        #[arg(long)]
        force: bool,
    },
    /// Change a node's availability or labels.
    Update {
        /// The node (id or hostname).
        node: String,
        /// active: takes tasks; pause: keeps its tasks, takes no new ones;
        /// drain: its tasks move elsewhere.
        #[arg(long, value_enum)]
        availability: Option<AvailabilityArg>,
        /// Add or change a label (KEY=VALUE); repeatable.
        #[arg(long = "label-add", value_name = "KEY=VALUE", value_parser = parse_label)]
        label_add: Vec<(String, String)>,
        /// Remove a label; repeatable.
        #[arg(long = "label-rm", value_name = "KEY")]
        label_rm: Vec<String>,
    },
}

/// `--availability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AvailabilityArg {
    /// Takes new tasks.
    Active,
    /// Keeps its tasks, takes no new ones.
    Pause,
    /// Takes no tasks; its tasks move elsewhere.
    Drain,
}

impl From<AvailabilityArg> for pb::Availability {
    fn from(a: AvailabilityArg) -> Self {
        match a {
            AvailabilityArg::Active => pb::Availability::Active,
            AvailabilityArg::Pause => pb::Availability::Pause,
            AvailabilityArg::Drain => pb::Availability::Drain,
        }
    }
}

/// Parses `KEY=VALUE` (`KEY` alone is an empty value, as `docker node update
/// --label-add` allows).
pub fn parse_label(value: &str) -> Result<(String, String), String> {
    let (key, val) = value.split_once('=').unwrap_or((value, ""));
    if key.is_empty() {
        return Err(format!("`{value}` names no label (expected KEY=VALUE)"));
    }
    Ok((key.to_string(), val.to_string()))
}

/// What `node inspect -o json` prints: the `node ls` row, then the platform
/// and version.
#[derive(Debug, Serialize)]
struct Inspect {
    #[serde(flatten)]
    row: NodeRow,
    platform: m::Platform,
    version: u64,
}

/// Runs `gantry node ...`.
pub fn run(args: Args, controller: &ControllerFlag) -> anyhow::Result<ExitCode> {
    block_on(async {
        let mut client = Client::connect(controller).await?;
        match args.command {
            Command::Ls { output } => {
                let nodes = task::nodes(&mut client).await?;
                let counts = task_counts(&mut client).await?;
                let rows: Vec<NodeRow> = nodes
                    .iter()
                    .map(|n| NodeRow::new(n, counts.get(n.id.as_str()).copied().unwrap_or(0)))
                    .collect();
                output::emit(output, &rows, || output::node_table(&rows))?;
            }
            Command::Inspect { node, output } => {
                let wire = client
                    .call(Repeat::Read, pb::NodeRef { node }, |mut c, r| async move {
                        c.inspect_node(r).await
                    })
                    .await
                    .map_err(|s| client.error(s))?;
                let node: m::Node = from_wire(wire, "node")?;
                let counts = task_counts(&mut client).await?;
                let info = Inspect {
                    row: NodeRow::new(&node, counts.get(node.id.as_str()).copied().unwrap_or(0)),
                    platform: node.status.platform.clone(),
                    version: node.version,
                };
                output::emit(output, &info, || summary(&info))?;
            }
            Command::Rm { node, force } => {
                let request = pb::RemoveNodeRequest {
                    node: node.clone(),
                    force,
                };
                client
                    .call_remove(request, |mut c, r| async move { c.remove_node(r).await })
                    .await
                    .map_err(|s| client.error(s))?;
                println!("{node}");
            }
            Command::Update {
                node,
                availability,
                label_add,
                label_rm,
            } => {
                let request = pb::UpdateNodeRequest {
                    node: node.clone(),
                    availability: availability.map(|a| pb::Availability::from(a) as i32),
                    label_add: label_add.into_iter().collect::<BTreeMap<_, _>>(),
                    label_rm,
                };
                client
                    .call(Repeat::Write, request, |mut c, r| async move {
                        c.update_node(r).await
                    })
                    .await
                    .map_err(|s| client.error(s))?;
                // The node as named, as `docker node update` prints it.
                println!("{node}");
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}

/// Live tasks (desired running) per node id, the TASKS column.
async fn task_counts(client: &mut Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let reply = client
        .call(
            Repeat::Read,
            pb::TaskFilter::default(),
            |mut c, r| async move { c.list_tasks(r).await },
        )
        .await
        .map_err(|s| client.error(s))?;
    let mut counts = BTreeMap::new();
    for t in reply.tasks {
        if let Some(node) = t.node {
            *counts.entry(node).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

fn summary(info: &Inspect) -> String {
    let r = &info.row;
    let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "ID:            {}\nHostname:      {}\nStatus:        {}\nAvailability:  {}\nRole:          {}\nAddress:       {}\nSubnet:        {}\nPlatform:      {}/{}\nCPUs:          {}\nMemory:        {}\nTasks:         {}\nLabels:        {}\n",
        r.id,
        r.hostname,
        r.status,
        r.availability,
        r.role,
        r.address,
        r.subnet.as_deref().unwrap_or(""),
        info.platform.os,
        info.platform.arch,
        output::cpus(r.resources.nano_cpus),
        crate::cmd::binary_size(r.resources.memory_bytes),
        r.tasks,
        labels.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_as_key_value() {
        assert_eq!(parse_label("zone=eu"), Ok(("zone".into(), "eu".into())));
        assert_eq!(parse_label("ssd"), Ok(("ssd".into(), String::new())));
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_label("=eu").is_err());
    }
}
