//! `gantry stack ls|ps|rm`: stacks as `docker stack` shows them. A stack is
//! what one `gantry deploy` of one Compose file made.

use std::process::ExitCode;

use gantry_proto::v1 as pb;
use serde::Serialize;

use crate::client::{Client, ControllerFlag, Repeat, block_on};
use crate::cmd::task;
use crate::output::{self, Format, Table, full_name};

/// `gantry stack`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// List stacks.
    #[command(visible_alias = "list")]
    Ls {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// List a stack's tasks.
    Ps {
        /// The stack.
        stack: String,
        /// Also show tasks that are meant to be stopped (history).
        #[arg(short, long)]
        all: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Remove stacks and all their services.
    #[command(visible_alias = "remove")]
    Rm {
        /// The stacks.
        #[arg(required = true)]
        stacks: Vec<String>,
    },
}

/// A stack in `stack ls -o json`.
#[derive(Debug, Serialize)]
struct StackRow {
    name: String,
    services: u64,
}

/// Runs `gantry stack ...`.
pub fn run(args: Args, controller: &ControllerFlag) -> anyhow::Result<ExitCode> {
    block_on(async {
        let mut client = Client::connect(controller).await?;
        match args.command {
            Command::Ls { output } => {
                let reply = client
                    .call(
                        Repeat::Read,
                        pb::ListStacksRequest {},
                        |mut c, r| async move { c.list_stacks(r).await },
                    )
                    .await
                    .map_err(|s| client.error(s))?;
                let rows: Vec<StackRow> = reply
                    .stacks
                    .into_iter()
                    .map(|s| StackRow {
                        name: s.name,
                        services: s.services,
                    })
                    .collect();
                output::emit(output, &rows, || {
                    let mut table = Table::new(&["NAME", "SERVICES"]);
                    for r in &rows {
                        table.row(vec![r.name.clone(), r.services.to_string()]);
                    }
                    table.to_string()
                })?;
            }
            Command::Ps { stack, all, output } => {
                let names = task::names(&mut client).await?;
                let request = pb::StackTasksRequest { stack, all };
                let reply = client
                    .call(Repeat::Read, request, |mut c, r| async move {
                        c.stack_tasks(r).await
                    })
                    .await
                    .map_err(|s| client.error(s))?;
                let rows = task::rows(reply.tasks, &names)?;
                task::print(output, &rows)?;
            }
            Command::Rm { stacks } => {
                // Like `docker stack rm a b`: every stack is tried, and the
                // first failure decides the exit code.
                let mut first_error = None;
                for stack in stacks {
                    let request = pb::RemoveStackRequest {
                        stack: stack.clone(),
                    };
                    match client
                        .call_remove(request, |mut c, r| async move { c.remove_stack(r).await })
                        .await
                    {
                        Ok(reply) => {
                            for service in reply.removed {
                                println!("Removing service {}", full_name(&stack, &service));
                            }
                        }
                        Err(status) => {
                            let err = client.error(status);
                            eprintln!("gantry: stack {stack}: {err:#}");
                            first_error.get_or_insert(err);
                        }
                    }
                }
                if let Some(err) = first_error {
                    return Ok(crate::cmd::exit_code_for(&err));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}
