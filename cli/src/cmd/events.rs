//! `gantry events`: every change to nodes, services and tasks as it
//! commits, one line each like `docker events` (or one JSON object per line
//! with `-o json`). `--since REV` replays what committed after a revision
//! first, so a script can list (which reports its revision) and then follow
//! without a gap.
//!
//! Lines start with the change's revision rather than a wall-clock time:
//! the controller's log has no clock in it (its state machine is
//! deterministic), and the revision is what `--since` takes.

use std::io::Write as _;
use std::process::ExitCode;

use gantry_controller::model as m;
use gantry_proto::v1 as pb;
use serde::Serialize;

use crate::client::{Client, ControllerFlag, Repeat, block_on, from_wire};
use crate::cmd::UsageError;
use crate::cmd::task;
use crate::output::{Format, Names, full_name, serde_name};

/// `gantry events`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Replay the changes committed after this revision first (default:
    /// only changes from now on).
    #[arg(long, value_name = "REV", default_value_t = 0)]
    pub since: u64,
    /// Only these kinds of object; repeatable.
    #[arg(long, value_enum, value_name = "KIND")]
    pub kind: Vec<KindArg>,
    /// Output format (`json`: one object per line).
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

/// `--kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// Nodes.
    Node,
    /// Services.
    Service,
    /// Tasks.
    Task,
}

impl From<KindArg> for pb::ObjectKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Node => pb::ObjectKind::Node,
            KindArg::Service => pb::ObjectKind::Service,
            KindArg::Task => pb::ObjectKind::Task,
        }
    }
}

/// One event as `-o json` prints it.
#[derive(Debug, Serialize)]
pub struct EventLine {
    /// The revision of the change.
    pub revision: u64,
    /// `create`, `update` or `remove`.
    pub action: String,
    /// `node`, `service` or `task`.
    pub kind: String,
    /// The object's id.
    pub id: String,
    /// `key=value` attributes for the line form.
    #[serde(skip)]
    pub attributes: Vec<(String, String)>,
    /// The object after the change (before it, for a removal).
    pub object: serde_json::Value,
}

impl EventLine {
    /// Converts an event from the wire. `names` shows task events' service
    /// and node by name; service and node events keep it current.
    pub fn new(event: pb::Event, names: &mut Names) -> anyhow::Result<EventLine> {
        let action = match pb::EventAction::try_from(event.action) {
            Ok(pb::EventAction::Create) => "create",
            Ok(pb::EventAction::Update) => "update",
            Ok(pb::EventAction::Remove) => "remove",
            _ => "unknown",
        };
        let (kind, id, attributes, object) = match event.object {
            Some(pb::event::Object::Node(n)) => {
                let n: m::Node = from_wire(n, "node")?;
                names
                    .nodes
                    .insert(n.id.to_string(), n.status.hostname.clone());
                let attrs = vec![
                    ("hostname".into(), n.status.hostname.clone()),
                    ("status".into(), serde_name(&n.status.state)),
                    ("availability".into(), serde_name(&n.spec.availability)),
                ];
                ("node", n.id.to_string(), attrs, serde_json::to_value(&n)?)
            }
            Some(pb::event::Object::Service(s)) => {
                let s: m::Service = from_wire(s, "service")?;
                names.services.insert(
                    s.id.to_string(),
                    (s.spec.stack.clone(), s.spec.name.clone()),
                );
                let mut attrs = vec![
                    ("name".into(), s.spec.name.clone()),
                    ("stack".into(), s.spec.stack.clone()),
                    ("image".into(), s.spec.task.image.clone()),
                ];
                if let m::ServiceMode::Replicated { replicas } = s.spec.mode {
                    attrs.push(("replicas".into(), replicas.to_string()));
                }
                (
                    "service",
                    s.id.to_string(),
                    attrs,
                    serde_json::to_value(&s)?,
                )
            }
            Some(pb::event::Object::Task(t)) => {
                let t: m::Task = from_wire(t, "task")?;
                let service = match names.services.get(t.service.as_str()) {
                    Some((stack, name)) => full_name(stack, name),
                    None => t.service.to_string(),
                };
                let mut attrs = vec![("service".into(), service)];
                if let Some(slot) = t.slot {
                    attrs.push(("slot".into(), slot.to_string()));
                }
                if let Some(node) = &t.node {
                    let node = names
                        .nodes
                        .get(node.as_str())
                        .filter(|h| !h.is_empty())
                        .cloned()
                        .unwrap_or_else(|| node.to_string());
                    attrs.push(("node".into(), node));
                }
                attrs.push(("state".into(), t.status.state.as_str().to_string()));
                attrs.push(("desired".into(), serde_name(&t.desired_state)));
                if let Some(code) = t.status.exit_code {
                    attrs.push(("exit_code".into(), code.to_string()));
                }
                if let Some(error) = &t.status.error {
                    attrs.push(("error".into(), error.clone()));
                }
                ("task", t.id.to_string(), attrs, serde_json::to_value(&t)?)
            }
            None => anyhow::bail!(
                "the controller sent event {} without an object",
                event.revision
            ),
        };
        Ok(EventLine {
            revision: event.revision,
            action: action.to_string(),
            kind: kind.to_string(),
            id,
            attributes,
            object,
        })
    }

    /// The line form: `REV KIND ACTION ID (key=value, ...)`.
    pub fn line(&self) -> String {
        let attrs: Vec<String> = self
            .attributes
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "{} {} {} {} ({})",
            self.revision,
            self.kind,
            self.action,
            self.id,
            attrs.join(", ")
        )
    }
}

/// Runs `gantry events` until the controller ends the stream (or we are
/// interrupted).
pub fn run(args: Args, controller: &ControllerFlag) -> anyhow::Result<ExitCode> {
    if args.output == Format::Yaml {
        return Err(
            UsageError("events: -o yaml is not a line format: use json or table".into()).into(),
        );
    }
    block_on(async {
        let mut client = Client::connect(controller).await?;
        // Names as of now; a replay from an older revision may mention a
        // service removed since, which then shows by id.
        let mut names = task::names(&mut client).await?;
        let request = pb::EventsRequest {
            after_revision: args.since,
            kinds: args
                .kind
                .into_iter()
                .map(|k| pb::ObjectKind::from(k) as i32)
                .collect(),
        };
        let mut stream = client
            .call(Repeat::Read, request.clone(), |mut c, r| async move {
                c.events(r).await
            })
            .await
            .map_err(|s| client.error(s))?;
        let stdout = std::io::stdout();
        let mut last_revision = 0;
        loop {
            let event = match stream.message().await {
                Ok(Some(event)) => event,
                Ok(None) => break,
                // The controller failed under the stream: every member
                // serves events, so go on with another from the revision
                // after the last one printed (none repeated; the rest of a
                // revision cut in the middle would be lost, which the
                // server's whole-revision batches make unlikely).
                Err(status) => {
                    client.fail_over_stream(status).await?;
                    let mut again = request.clone();
                    again.after_revision = again.after_revision.max(last_revision);
                    stream = client
                        .call(
                            Repeat::Read,
                            again,
                            |mut c, r| async move { c.events(r).await },
                        )
                        .await
                        .map_err(|s| client.error(s))?;
                    continue;
                }
            };
            last_revision = last_revision.max(event.revision);
            let event = EventLine::new(event, &mut names)?;
            let text = match args.output {
                Format::Json => serde_json::to_string(&event)?,
                _ => event.line(),
            };
            let mut out = stdout.lock();
            // A closed pipe (`gantry events | head`) ends the command quietly.
            if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                break;
            }
        }
        Ok(ExitCode::SUCCESS)
    })?
}
