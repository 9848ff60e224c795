//! `gantry service ls|ps|inspect|scale|logs|rm`, as `docker service` has
//! them. A service is named by its id, `STACK_NAME`, or `NAME` when only one
//! stack has a service of that name; the controller resolves the name.

use std::collections::HashMap;
use std::io::Write as _;
use std::process::ExitCode;

use gantry_controller::model as m;
use gantry_proto::v1 as pb;
use serde::Serialize;

use gantry_proto::tonic::Status;

use crate::client::{Client, ControllerFlag, Repeat, block_on, from_wire, stream_ended};
use crate::cmd::task;
use crate::output::{self, Format, Names, ServiceRow, full_name};

/// `gantry service`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// List services with their running and desired task counts.
    #[command(visible_alias = "list")]
    Ls {
        /// Only this stack's services.
        #[arg(long, value_name = "STACK")]
        stack: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// List a service's tasks.
    Ps {
        /// The service.
        service: String,
        /// Also show tasks that are meant to be stopped (history).
        #[arg(short, long)]
        all: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show a service in full (JSON unless -o says otherwise).
    Inspect {
        /// The service.
        service: String,
        /// Output format; `table` prints a short summary.
        #[arg(short, long, value_enum, default_value_t = Format::Json)]
        output: Format,
    },
    /// Set replicated services' replica counts: `scale web=3 api=2`.
    Scale {
        /// SERVICE=REPLICAS pairs.
        #[arg(required = true, value_name = "SERVICE=REPLICAS", value_parser = parse_scale)]
        scales: Vec<(String, u64)>,
        #[command(flatten)]
        wait: task::WaitArgs,
    },
    /// Print a service's logs, from every task.
    Logs {
        /// The service.
        service: String,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines of each task (a number, or `all`).
        #[arg(short = 'n', long, value_name = "N", value_parser = parse_tail)]
        tail: Option<Tail>,
        /// Print lines without the `NAME.SLOT.TASK@NODE |` prefix.
        #[arg(long)]
        no_task_prefix: bool,
    },
    /// Remove services.
    #[command(visible_alias = "remove")]
    Rm {
        /// The services.
        #[arg(required = true)]
        services: Vec<String>,
    },
}

/// `--tail`: a count or `all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// Every line.
    All,
    /// The last N lines.
    Lines(u64),
}

/// Parses `NAME=N` for `service scale`; the message names the bad value
/// (clap prints it with the argument and exits 2).
pub fn parse_scale(value: &str) -> Result<(String, u64), String> {
    let (name, count) = value
        .split_once('=')
        .ok_or_else(|| format!("`{value}` is not SERVICE=REPLICAS"))?;
    if name.is_empty() {
        return Err(format!(
            "`{value}` names no service (expected SERVICE=REPLICAS)"
        ));
    }
    let count = count.parse::<u64>().map_err(|_| {
        format!("invalid replica count `{count}` in `{value}`: expected a whole number, 0 or more")
    })?;
    Ok((name.to_string(), count))
}

fn parse_tail(value: &str) -> Result<Tail, String> {
    if value == "all" {
        return Ok(Tail::All);
    }
    value
        .parse()
        .map(Tail::Lines)
        .map_err(|_| format!("invalid line count `{value}`: a whole number or `all`"))
}

/// What `service inspect -o json` prints: the `service ls` row, then the
/// whole spec as the model has it.
#[derive(Debug, Serialize)]
struct Inspect {
    #[serde(flatten)]
    row: ServiceRow,
    spec_version: u64,
    version: u64,
    spec: m::ServiceSpec,
}

/// Runs `gantry service ...`.
pub fn run(args: Args, controller: &ControllerFlag) -> anyhow::Result<ExitCode> {
    block_on(async {
        let mut client = Client::connect(controller).await?;
        match args.command {
            Command::Ls { stack, output } => {
                let services = task::services(&mut client, stack.as_deref().unwrap_or("")).await?;
                let rows: Vec<ServiceRow> = services
                    .iter()
                    .map(|(s, running, desired)| ServiceRow::new(s, *running, *desired))
                    .collect();
                output::emit(output, &rows, || output::service_table(&rows))?;
            }
            Command::Ps {
                service,
                all,
                output,
            } => {
                let names = task::names(&mut client).await?;
                let filter = pb::TaskFilter {
                    service,
                    all,
                    ..Default::default()
                };
                let rows = task::list(&mut client, &names, filter).await?;
                task::print(output, &rows)?;
            }
            Command::Inspect { service, output } => {
                let info = inspect(&mut client, &service).await?;
                output::emit(output, &info, || summary(&info))?;
            }
            Command::Scale { scales, wait } => {
                let names: Vec<String> = scales.iter().map(|(n, _)| n.clone()).collect();
                let code = scale(&mut client, scales).await?;
                if wait.wait && code == ExitCode::SUCCESS {
                    return task::wait_converged(&mut client, "", &names, wait.timeout).await;
                }
                return Ok(code);
            }
            Command::Logs {
                service,
                follow,
                tail,
                no_task_prefix,
            } => {
                logs(&mut client, service, follow, tail, !no_task_prefix).await?;
            }
            Command::Rm { services } => {
                let mut first_error = None;
                for service in services {
                    let request = pb::ServiceRef {
                        service: service.clone(),
                    };
                    match client
                        .call_remove(request, |mut c, r| async move { c.remove_service(r).await })
                        .await
                    {
                        Ok(_) => println!("{service}"),
                        Err(status) => {
                            let err = client.error(status);
                            eprintln!("gantry: service {service}: {err:#}");
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

async fn inspect(client: &mut Client, service: &str) -> anyhow::Result<Inspect> {
    let request = pb::ServiceRef {
        service: service.to_string(),
    };
    let info = client
        .call(Repeat::Read, request, |mut c, r| async move {
            c.inspect_service(r).await
        })
        .await
        .map_err(|s| client.error(s))?;
    let wire = info
        .service
        .ok_or_else(|| anyhow::anyhow!("the controller sent service {service} without its spec"))?;
    let service: m::Service = from_wire(wire, "service")?;
    Ok(Inspect {
        row: ServiceRow::new(&service, info.running, info.desired),
        spec_version: service.spec_version,
        version: service.version,
        spec: service.spec,
    })
}

/// `service inspect -o table`: the few lines a person looks for.
fn summary(info: &Inspect) -> String {
    let r = &info.row;
    let mut out = format!(
        "ID:        {}\nName:      {}\nStack:     {}\nMode:      {}\nReplicas:  {}/{}\nImage:     {}\n",
        r.id,
        full_name(&r.stack, &r.name),
        r.stack,
        r.mode,
        r.running,
        r.desired,
        r.image
    );
    if !r.ports.is_empty() {
        out.push_str(&format!("Ports:     {}\n", r.ports.join(", ")));
    }
    // As `docker service inspect --pretty` prints `Endpoint Mode`, and the
    // VIP that `Endpoint.VirtualIPs` holds.
    out.push_str(&format!("Endpoint:  {}", r.endpoint_mode));
    if let Some(vip) = &r.virtual_ip {
        out.push_str(&format!(" {vip}"));
    }
    out.push('\n');
    if !info.spec.task.networks.is_empty() {
        out.push_str(&format!(
            "Networks:  {}\n",
            info.spec.task.networks.join(", ")
        ));
    }
    out
}

async fn scale(client: &mut Client, scales: Vec<(String, u64)>) -> anyhow::Result<ExitCode> {
    // As `docker service scale a=1 b=2`: each is tried, and the first
    // failure decides the exit code.
    let mut first_error = None;
    for (service, replicas) in scales {
        let request = pb::ScaleServiceRequest {
            service: service.clone(),
            replicas,
        };
        let scaled = client
            .call(Repeat::Write, request, |mut c, r| async move {
                c.scale_service(r).await
            })
            .await;
        match scaled {
            Ok(_) => println!("{service} scaled to {replicas}"),
            Err(status) => {
                let err = client.error(status);
                eprintln!("gantry: service {service}: {err:#}");
                first_error.get_or_insert(err);
            }
        }
    }
    Ok(match first_error {
        Some(err) => crate::cmd::exit_code_for(&err),
        None => ExitCode::SUCCESS,
    })
}

/// Records the log prefix of each of `service`'s tasks:
/// `STACK_NAME.SLOT.TASK12@NODE`.
async fn task_labels(
    client: &mut Client,
    names: &Names,
    service: &str,
    labels: &mut HashMap<String, String>,
) -> anyhow::Result<()> {
    let filter = pb::TaskFilter {
        service: service.to_string(),
        all: true,
        ..Default::default()
    };
    for row in task::list(client, names, filter).await? {
        let node = row
            .node
            .as_ref()
            .map(|n| format!("@{n}"))
            .unwrap_or_default();
        labels.insert(
            row.id.clone(),
            format!("{}.{}{node}", row.name, output::short_id(&row.id)),
        );
    }
    Ok(())
}

/// Opens a log stream (failing over like any read).
async fn open_logs(
    client: &mut Client,
    request: pb::ServiceLogsRequest,
) -> anyhow::Result<gantry_proto::tonic::Streaming<pb::LogEntry>> {
    client
        .call(Repeat::Read, request, |mut c, r| async move {
            c.service_logs(r).await
        })
        .await
        .map_err(|s| client.error(s))
}

/// After `status` broke a log stream: fails over to another controller
/// and asks for the lines from `since` on (all of them when none was
/// printed yet), when the client may; else the error.
async fn reopen_logs(
    client: &mut Client,
    status: Status,
    request: &pb::ServiceLogsRequest,
    since: Option<i64>,
) -> anyhow::Result<gantry_proto::tonic::Streaming<pb::LogEntry>> {
    client.fail_over_stream(status).await?;
    let mut request = request.clone();
    if let Some(since) = since {
        request.since_unix_nanos = Some(since);
        request.tail = None;
    }
    open_logs(client, request).await
}

async fn logs(
    client: &mut Client,
    service: String,
    follow: bool,
    tail: Option<Tail>,
    prefix: bool,
) -> anyhow::Result<()> {
    // Task names for the prefix, as `docker service logs` writes it
    // (`web.1.abc123@node1 | `). A task that starts later (a replacement,
    // with --follow) is looked up once when its first line comes, and shown
    // by id if even that fails.
    let mut labels: HashMap<String, String> = HashMap::new();
    let mut names = Names::default();
    if prefix {
        names = task::names(client).await?;
        task_labels(client, &names, &service, &mut labels).await?;
    }
    let request = pb::ServiceLogsRequest {
        service: service.clone(),
        follow,
        tail: match tail {
            Some(Tail::Lines(n)) => Some(n),
            Some(Tail::All) | None => None,
        },
        since_unix_nanos: None,
    };
    let mut stream = open_logs(client, request.clone()).await?;
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    // The time of the last line printed: a stream that breaks with its
    // controller is opened again on another from there (lines of that very
    // nanosecond could repeat; none is lost).
    let mut last_time = None;
    loop {
        let entry = match stream.message().await {
            Ok(Some(entry)) => entry,
            Ok(None) if follow && client.can_fail_over() => {
                stream = reopen_logs(client, stream_ended("log"), &request, last_time).await?;
                continue;
            }
            Ok(None) => break,
            Err(status) => {
                stream = reopen_logs(client, status, &request, last_time).await?;
                continue;
            }
        };
        last_time = Some(entry.time_unix_nanos);
        let mut line = Vec::with_capacity(entry.line.len() + 64);
        if prefix {
            if !labels.contains_key(&entry.task) {
                // Once per task: a failed look-up records the id form.
                task_labels(client, &names, &service, &mut labels).await?;
                labels
                    .entry(entry.task.clone())
                    .or_insert_with(|| format!("{}@{}", output::short_id(&entry.task), entry.node));
            }
            let label = labels.get(&entry.task).cloned().unwrap_or_default();
            line.extend_from_slice(label.as_bytes());
            line.extend_from_slice(b"    | ");
        }
        line.extend_from_slice(&entry.line);
        line.push(b'\n');
        // Lines go out whole, one write each, so that stdout and stderr
        // interleave at line boundaries; a closed pipe (`| head`) ends us.
        let written = if entry.stream == pb::LogStream::Stderr as i32 {
            stderr.lock().write_all(&line)
        } else {
            let mut out = stdout.lock();
            out.write_all(&line).and_then(|()| out.flush())
        };
        if written.is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_pairs_parse_and_bad_counts_name_the_value() {
        assert_eq!(parse_scale("web=3"), Ok(("web".to_string(), 3)));
        assert_eq!(parse_scale("demo_web=0"), Ok(("demo_web".to_string(), 0)));
        let err = parse_scale("web=x").unwrap_err();
        assert!(err.contains("`x`") && err.contains("web=x"), "{err}");
        assert!(parse_scale("web").unwrap_err().contains("SERVICE=REPLICAS"));
        assert!(parse_scale("=3").is_err());
        assert!(parse_scale("web=-1").is_err());
    }

    #[test]
    fn tail_is_a_count_or_all() {
        assert_eq!(parse_tail("all"), Ok(Tail::All));
        assert_eq!(parse_tail("20"), Ok(Tail::Lines(20)));
        assert!(parse_tail("many").is_err());
    }
}
