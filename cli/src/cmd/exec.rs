//! `gantry exec [-i] TASK_OR_SERVICE -- CMD...`: runs a command in a task's
//! container wherever it runs, relayed by the controller through the task's
//! agent session. A service name picks its first running task (lowest
//! slot), as `docker exec` users expect from `docker compose exec`. The
//! command's exit code is ours.
//!
//! Without `-i` the process gets end of file on stdin at once, like `docker
//! exec` without `-i`. No terminal is allocated (`-t` comes with the
//! terminal handling of a later issue).

use std::io::Write as _;
use std::process::ExitCode;

use gantry_proto::tonic::Code;
use gantry_proto::v1 as pb;
use gantry_proto::v1::exec_client_message::Message as ClientMsg;
use gantry_proto::v1::exec_server_message::Message as ServerMsg;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;

use crate::client::{
    Client, ControllerFlag, FAILOVER_BUDGET, Failover, Repeat, block_on, failover_of, leader_of,
};
use crate::cmd::UsageError;

/// `gantry exec`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Relay our stdin to the process.
    #[arg(short, long)]
    pub interactive: bool,
    /// Set an environment variable (KEY=VALUE); repeatable.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Run as this user[:group].
    #[arg(short, long)]
    pub user: Option<String>,
    /// Working directory inside the container.
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// A task id, or a service (its first running task).
    pub target: String,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// Runs `gantry exec`.
pub fn run(args: Args, controller: &ControllerFlag) -> anyhow::Result<ExitCode> {
    let mut env = std::collections::BTreeMap::new();
    for entry in &args.env {
        let (k, v) = entry
            .split_once('=')
            .ok_or_else(|| UsageError(format!("invalid --env `{entry}`: expected KEY=VALUE")))?;
        env.insert(k.to_string(), v.to_string());
    }
    block_on(async {
        let mut client = Client::connect(controller).await?;
        let task = pick_task(&mut client, &args.target).await?;
        let start = pb::ExecStart {
            task,
            command: args.command,
            tty: false,
            env,
            user: args.user,
            working_dir: args.workdir,
            size: None,
        };
        let send = |m| pb::ExecClientMessage { message: Some(m) };
        // Opening the exec fails over like any request while the command
        // surely has not started (a controller's own refusal, a refused
        // connection); once it may have, it is never run again. With -i,
        // our stdin flows from the start (a server may read it before it
        // answers), and what a failed attempt took cannot be sent again:
        // `exec -i` is not retried at all.
        let deadline = tokio::time::Instant::now() + FAILOVER_BUDGET;
        let mut stream = loop {
            let (tx, rx) = mpsc::channel::<pb::ExecClientMessage>(16);
            // The channel has room: these cannot block or fail before the
            // stream is open.
            tx.send(send(ClientMsg::Start(start.clone()))).await.ok();
            if args.interactive {
                tokio::spawn(relay_stdin(tx));
            } else {
                tx.send(send(ClientMsg::CloseStdin(pb::Empty {})))
                    .await
                    .ok();
                drop(tx);
            }
            let opened = client
                .control
                .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            let status = match opened {
                Ok(response) => break response.into_inner(),
                Err(status) => status,
            };
            match failover_of(&status) {
                Some(f) if f.maybe_applied && std::error::Error::source(&status).is_some() => {
                    return Err(unknown_outcome(&client, &f));
                }
                Some(f)
                    if !args.interactive
                        && client.can_fail_over()
                        && tokio::time::Instant::now() < deadline =>
                {
                    client
                        .fail_over(&f, leader_of(&status), deadline)
                        .await
                        .map_err(|_| client.error(status))?;
                }
                _ => return Err(client.error(status)),
            }
        };
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        loop {
            let msg = match stream.message().await {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(status) => {
                    return Err(match failover_of(&status) {
                        Some(f) => unknown_outcome(&client, &f),
                        None => client.error(status),
                    });
                }
            };
            match msg.message {
                Some(ServerMsg::Stdout(bytes)) => {
                    let mut out = stdout.lock();
                    out.write_all(&bytes).and_then(|()| out.flush()).ok();
                }
                Some(ServerMsg::Stderr(bytes)) => {
                    stderr.lock().write_all(&bytes).ok();
                }
                Some(ServerMsg::Exit(exit)) => return Ok(exit_code(exit.code)),
                None => {}
            }
        }
        anyhow::bail!(
            "the exec ended without the process's exit code (its node may have gone away)"
        )
    })?
}

/// An exec whose controller failed under it once the command may have
/// started: it is not run again (a command is not declarative: running it
/// twice may do its work twice), and the user is told why.
fn unknown_outcome(client: &Client, failure: &Failover) -> anyhow::Error {
    anyhow::anyhow!(
        "the controller at {} failed during the exec ({}); the command may have run, or may \
         still be running, on the task's node: its outcome is unknown, so it is not run again",
        client.target.address,
        failure.why
    )
}

/// The task to exec into: a service's first running task, or the argument
/// itself as a task id when no service has that name.
async fn pick_task(client: &mut Client, target: &str) -> anyhow::Result<String> {
    let request = pb::ServiceRef {
        service: target.to_string(),
    };
    let service = client
        .call(Repeat::Read, request, |mut c, r| async move {
            c.inspect_service(r).await
        })
        .await;
    match service {
        Ok(_) => {}
        Err(status) if status.code() == Code::NotFound => return Ok(target.to_string()),
        Err(status) => return Err(client.error(status)),
    }
    let filter = pb::TaskFilter {
        service: target.to_string(),
        states: vec![pb::TaskState::Running as i32],
        ..Default::default()
    };
    let mut tasks = client
        .call(Repeat::Read, filter, |mut c, r| async move {
            c.list_tasks(r).await
        })
        .await
        .map_err(|s| client.error(s))?
        .tasks;
    tasks.sort_by_key(|t| (t.slot.unwrap_or(u64::MAX), t.id.clone()));
    tasks
        .into_iter()
        .next()
        .map(|t| t.id)
        // Bad input like the controller's FAILED_PRECONDITION for a task
        // that is not running: the request cannot be met as the cluster is.
        .ok_or_else(|| {
            UsageError(format!("service {target} has no running task to exec into")).into()
        })
}

/// Copies our stdin into the exec until end of file, then says so.
async fn relay_stdin(tx: mpsc::Sender<pb::ExecClientMessage>) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let msg = pb::ExecClientMessage {
                    message: Some(ClientMsg::Stdin(buf[..n].to_vec())),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }
    let close = pb::ExecClientMessage {
        message: Some(ClientMsg::CloseStdin(pb::Empty {})),
    };
    tx.send(close).await.ok();
}

/// A process's exit code as ours: 0-255 as they are; anything else (which
/// no process can return, but the wire is an int32) folded as a shell would.
fn exit_code(code: i32) -> ExitCode {
    ExitCode::from((code & 0xff) as u8)
}
