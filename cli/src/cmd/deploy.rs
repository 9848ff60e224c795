//! `gantry deploy -f compose.yaml`: loads a Compose file here (so that a bad
//! file is refused with its line before anything is sent), then sends the
//! normalized stack to the controller, which diffs it against what is
//! deployed and changes only what differs.
//!
//! Like `docker compose`, the stack is named after the file's directory
//! unless `--stack`/`-p` (or `name:` in the file) says otherwise, and
//! without `-f` the usual file names are looked for in the current
//! directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use gantry_controller::compose::{self, DiskFiles, LoadOptions, Stack, StackChanges};
use gantry_controller::wire;
use gantry_proto::v1 as pb;
use serde::Serialize;

use crate::client::{Client, ControllerFlag, Repeat, block_on};
use crate::cmd::{UsageError, task};
use crate::output::{self, Format, full_name};

/// The names looked for without `-f`, in `docker compose`'s order.
const DEFAULT_FILES: [&str; 4] = [
    "compose.yaml",
    "compose.yml",
    "docker-compose.yaml",
    "docker-compose.yml",
];

/// `gantry deploy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The Compose file (default: compose.yaml, compose.yml,
    /// docker-compose.yaml or docker-compose.yml here).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The stack's name (default: `name:` in the file, else the file's
    /// directory name).
    #[arg(
        short = 'p',
        long = "stack",
        visible_alias = "project-name",
        value_name = "NAME"
    )]
    pub stack: Option<String>,
    /// Only show the normalized stack and what a deploy would change.
    #[arg(long)]
    pub dry_run: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
    #[command(flatten)]
    pub wait: task::WaitArgs,
}

/// What `deploy -o json|yaml` prints.
#[derive(Debug, Serialize)]
struct Outcome<'a> {
    /// The normalized stack, as `docker compose config` would print it.
    stack: &'a Stack,
    /// What changed, or would change.
    changes: &'a StackChanges,
    /// Whether nothing was changed on purpose.
    dry_run: bool,
    /// The revision holding the change (0 for a dry run or no change).
    revision: u64,
}

/// Runs `gantry deploy`.
pub fn run(args: Args, controller: &ControllerFlag) -> anyhow::Result<ExitCode> {
    let file = match args.file {
        Some(file) => file,
        None => find_default_file(Path::new("."))?,
    };
    let loaded = load(&file, args.stack.as_deref())?;
    for warning in &loaded.warnings {
        eprintln!("warning: {}: {warning}", file.display());
    }
    let stack_json =
        wire::stack_to_json(&loaded.stack).context("cannot encode the stack for the controller")?;
    let stack = loaded.stack;
    block_on(async {
        let mut client = Client::connect(controller).await?;
        let request = pb::DeployStackRequest {
            stack_json,
            dry_run: args.dry_run,
        };
        // A stack states what should run: repeating it after an unknown
        // outcome on another controller changes nothing more.
        let reply = client
            .call(Repeat::Write, request, |mut c, r| async move {
                c.deploy_stack(r).await
            })
            .await
            .map_err(|s| client.error(s))?;
        let changes: StackChanges = reply.changes.unwrap_or_default().into();
        let name = if reply.stack.is_empty() {
            stack.name.clone()
        } else {
            reply.stack
        };
        let outcome = Outcome {
            stack: &stack,
            changes: &changes,
            dry_run: args.dry_run,
            revision: reply.revision,
        };
        output::emit(args.output, &outcome, || {
            describe(&name, &changes, args.dry_run)
        })?;
        if args.wait.wait && !args.dry_run {
            return task::wait_converged(&mut client, &name, &[], args.wait.timeout).await;
        }
        Ok(ExitCode::SUCCESS)
    })?
}

/// Loads and normalizes a Compose file; every failure is bad input (exit
/// 2) naming the file, and the loader's message names the key and line.
pub fn load(file: &Path, stack: Option<&str>) -> anyhow::Result<compose::Loaded> {
    let source = std::fs::read(file)
        .map_err(|e| UsageError(format!("cannot read {}: {e}", file.display())))?;
    let absolute = std::path::absolute(file)
        .map_err(|e| UsageError(format!("cannot resolve {}: {e}", file.display())))?;
    // The directory as the user knows it (symlinks resolved, like `docker
    // compose`), so that `.` still yields the directory's real name.
    let parent = absolute.parent().unwrap_or(Path::new("/"));
    let project_dir = parent
        .canonicalize()
        .unwrap_or_else(|_| parent.to_path_buf());
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let options = LoadOptions {
        project_dir: &project_dir,
        stack_name: stack,
        env: &env,
        files: &DiskFiles,
    };
    compose::load(&source, &options)
        .map_err(|e| UsageError(format!("{}: {e}", file.display())).into())
}

/// The first of the default file names present in `dir`.
fn find_default_file(dir: &Path) -> anyhow::Result<PathBuf> {
    DEFAULT_FILES
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            UsageError(format!(
                "no compose file here (looked for {}): pass -f FILE",
                DEFAULT_FILES.join(", ")
            ))
            .into()
        })
}

/// What a deploy did, in `docker stack deploy`'s words.
pub fn describe(stack: &str, changes: &StackChanges, dry_run: bool) -> String {
    if changes.is_empty() {
        return if dry_run {
            format!("Stack {stack} is up to date: a deploy would change nothing\n")
        } else {
            format!("Stack {stack} is up to date\n")
        };
    }
    let (create, update, remove) = if dry_run {
        ("Would create", "Would update", "Would remove")
    } else {
        ("Creating", "Updating", "Removing")
    };
    let mut out = String::new();
    let mut line = |verb: &str, kind: &str, name: &str, detail: String| {
        out.push_str(&format!(
            "{verb} {kind} {}{detail}\n",
            full_name(stack, name)
        ));
    };
    for (kind, objects) in [("volume", &changes.volumes), ("network", &changes.networks)] {
        for name in &objects.create {
            line(create, kind, name, String::new());
        }
        for name in &objects.update {
            line(update, kind, name, String::new());
        }
    }
    for name in &changes.create {
        line(create, "service", name, String::new());
    }
    for u in &changes.update {
        line(
            update,
            "service",
            &u.service,
            format!(" ({})", u.fields.join(", ")),
        );
    }
    for name in &changes.remove {
        line(remove, "service", name, String::new());
    }
    for (kind, objects) in [("volume", &changes.volumes), ("network", &changes.networks)] {
        for name in &objects.remove {
            line(remove, kind, name, String::new());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_controller::compose::{ObjectChanges, ServiceUpdate};

    #[test]
    fn changes_read_like_docker_stack_deploy() {
        let changes = StackChanges {
            create: vec!["web".into()],
            update: vec![ServiceUpdate {
                service: "api".into(),
                fields: vec!["image".into(), "deploy.replicas".into()],
            }],
            remove: vec!["old".into()],
            volumes: ObjectChanges {
                create: vec!["data".into()],
                ..Default::default()
            },
            networks: ObjectChanges::default(),
        };
        assert_eq!(
            describe("demo", &changes, false),
            "Creating volume demo_data\n\
             Creating service demo_web\n\
             Updating service demo_api (image, deploy.replicas)\n\
             Removing service demo_old\n"
        );
        assert!(describe("demo", &changes, true).starts_with("Would create volume demo_data\n"));
        assert_eq!(
            describe("demo", &StackChanges::default(), false),
            "Stack demo is up to date\n"
        );
    }

    #[test]
    fn the_stack_is_named_after_the_directory_and_bad_keys_are_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let project = dir.path().join("shop");
        std::fs::create_dir(&project).unwrap();
        let file = project.join("compose.yaml");
        std::fs::write(&file, "services:\n  web:\n    image: nginx\n").unwrap();
        assert_eq!(load(&file, None).unwrap().stack.name, "shop");
        assert_eq!(load(&file, Some("other")).unwrap().stack.name, "other");
        assert_eq!(find_default_file(&project).unwrap(), file);

        std::fs::write(
            &file,
            "services:\n  web:\n    image: nginx\n    deploy:\n      replcas: 2\n",
        )
        .unwrap();
        let err = load(&file, None).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some());
        let text = err.to_string();
        assert!(
            text.contains("replcas") && text.contains("line 5"),
            "{text}"
        );
    }

    #[test]
    fn no_compose_file_is_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_default_file(dir.path()).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some());
        assert!(err.to_string().contains("compose.yaml"));
    }
}
