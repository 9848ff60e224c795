//! `gantry cluster init|controllers|remove-controller`: the replicated
//! controllers, as `docker swarm init` and `docker node ls` (managers) show
//! them.
//!
//! `init` runs this host's controller as a new one-member cluster (the same
//! process as `gantry controller`) and refuses a data directory that already
//! holds one, like `docker swarm init` on a node that is already a manager.
//! `controllers` lists the members with their Raft role, term and applied
//! index, the leader marked with `*`, and in `-o json|yaml` also the
//! answering controller's counters (term, leader changes, commit/apply
//! index, proposal latency) for graphs. `remove-controller` takes a raft id
//! or an address.

use std::process::ExitCode;

use gantry_proto::v1 as pb;
use serde::Serialize;

use crate::client::{Client, ControllerFlag, Repeat, block_on};
use crate::cmd::controller;
use crate::output::{self, Format, Table};

/// `gantry cluster`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Start this host's controller as a new one-member cluster (refused
    /// when its data directory already holds one).
    Init(Box<controller::Args>),
    /// List the controllers: raft id, address, role, term, applied index.
    #[command(visible_alias = "ls")]
    Controllers {
        /// Output format (json and yaml add the answering controller's
        /// metrics).
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Remove a controller from the cluster, by raft id or address.
    #[command(visible_alias = "rm")]
    RemoveController {
        /// The controller: its raft id (as `cluster controllers` shows it)
        /// or its HOST:PORT.
        // Its own id: as `controller` it shared the global `--controller`
        // flag's, and the value given here replaced the flag's, so the
        // command went to the controller being removed.
        #[arg(id = "member", value_name = "CONTROLLER")]
        controller: String,
    },
}

/// One row of `cluster controllers`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControllerRow {
    /// Raft id.
    pub id: u64,
    /// HOST:PORT.
    pub address: String,
    /// leader, follower, candidate, learner, unreachable.
    pub role: String,
    /// Whether this is the leader.
    pub leader: bool,
    /// Term as last known.
    pub term: u64,
    /// Applied index as last known.
    pub applied: u64,
    /// Whether this is the controller that answered.
    pub answered: bool,
}

/// What `cluster controllers -o json` prints.
#[derive(Debug, Serialize)]
struct Listing {
    controllers: Vec<ControllerRow>,
    leader_id: u64,
    commit_index: u64,
    metrics: Option<Metrics>,
}

/// The answering controller's counters.
#[derive(Debug, Serialize)]
struct Metrics {
    term: u64,
    leader_changes: u64,
    commit_index: u64,
    applied_index: u64,
    proposals: u64,
    proposal_p50_ms: f64,
    proposal_p99_ms: f64,
}

/// The lowercase name of a wire role.
pub fn role_name(role: i32) -> String {
    match pb::ControllerRole::try_from(role).unwrap_or(pb::ControllerRole::Unspecified) {
        pb::ControllerRole::Leader => "leader",
        pb::ControllerRole::Follower => "follower",
        pb::ControllerRole::Candidate => "candidate",
        pb::ControllerRole::Learner => "learner",
        pb::ControllerRole::Unreachable => "unreachable",
        pb::ControllerRole::Unspecified => "unknown",
    }
    .to_string()
}

fn rows(list: &pb::ListControllersResponse) -> Vec<ControllerRow> {
    list.controllers
        .iter()
        .map(|c| ControllerRow {
            id: c.raft_id,
            address: c.address.clone(),
            role: role_name(c.role),
            leader: c.raft_id == list.leader_id && list.leader_id != 0,
            term: c.term,
            applied: c.applied_index,
            answered: c.is_self,
        })
        .collect()
}

/// The `cluster controllers` table: the leader's id marked with `*`, as
/// `docker node ls` marks the node it was asked on.
pub fn controller_table(rows: &[ControllerRow]) -> String {
    let mut table = Table::new(&["ID", "ADDRESS", "ROLE", "TERM", "APPLIED"]);
    for r in rows {
        let id = if r.leader {
            format!("{} *", r.id)
        } else {
            r.id.to_string()
        };
        table.row(vec![
            id,
            r.address.clone(),
            r.role.clone(),
            r.term.to_string(),
            r.applied.to_string(),
        ]);
    }
    table.to_string()
}

fn listing(list: pb::ListControllersResponse) -> Listing {
    Listing {
        controllers: rows(&list),
        leader_id: list.leader_id,
        commit_index: list.commit_index,
        metrics: list.metrics.map(|m| Metrics {
            term: m.term,
            leader_changes: m.leader_changes,
            commit_index: m.commit_index,
            applied_index: m.applied_index,
            proposals: m.proposals,
            proposal_p50_ms: m.proposal_p50_ms,
            proposal_p99_ms: m.proposal_p99_ms,
        }),
    }
}

/// Runs `gantry cluster ...`.
pub fn run(args: Args, flag: &ControllerFlag) -> anyhow::Result<ExitCode> {
    let (output, remove) = match args.command {
        Command::Init(args) => return controller::run_init(*args),
        Command::Controllers { output } => (output, None),
        Command::RemoveController { controller } => (Format::Table, Some(controller)),
    };
    block_on(async {
        let mut client = Client::connect(flag).await?;
        let list = match remove {
            // The table of whichever controller answers (a dead one's
            // table is of no use).
            None => client
                .call_cluster(Repeat::Read, None, pb::Empty {}, |mut c, r| async move {
                    c.list_controllers(r).await
                })
                .await
                .map_err(|s| client.error(s))?,
            Some(which) => {
                let controller = match which.trim().parse::<u64>() {
                    Ok(id) => pb::remove_controller_request::Controller::RaftId(id),
                    Err(_) => pb::remove_controller_request::Controller::Address(which),
                };
                let request = pb::RemoveControllerRequest {
                    controller: Some(controller),
                };
                // A removal repeated after an unknown outcome finds the
                // controller gone: the first attempt removed it, and the
                // table printed is the members as they are now.
                let removed = client
                    .call_cluster(
                        Repeat::Write,
                        Some(Default::default),
                        request,
                        |mut c, r| async move { c.remove_controller(r).await },
                    )
                    .await
                    .map_err(|s| client.error(s))?;
                if removed.controllers.is_empty() {
                    client
                        .call_cluster(Repeat::Read, None, pb::Empty {}, |mut c, r| async move {
                            c.list_controllers(r).await
                        })
                        .await
                        .map_err(|s| client.error(s))?
                } else {
                    removed
                }
            }
        };
        let listing = listing(list);
        output::emit(output, &listing, || controller_table(&listing.controllers))?;
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_is_marked_in_the_table() {
        let list = pb::ListControllersResponse {
            controllers: vec![
                pb::ControllerInfo {
                    raft_id: 1,
                    address: "10.0.0.1:7070".into(),
                    role: pb::ControllerRole::Follower as i32,
                    term: 3,
                    applied_index: 40,
                    is_self: true,
                },
                pb::ControllerInfo {
                    raft_id: 2,
                    address: "10.0.0.2:7070".into(),
                    role: pb::ControllerRole::Leader as i32,
                    term: 3,
                    applied_index: 41,
                    is_self: false,
                },
            ],
            leader_id: 2,
            commit_index: 41,
            metrics: None,
        };
        let text = controller_table(&rows(&list));
        assert_eq!(
            text,
            "ID    ADDRESS         ROLE       TERM   APPLIED\n\
             1     10.0.0.1:7070   follower   3      40\n\
             2 *   10.0.0.2:7070   leader     3      41\n"
        );
    }
}
