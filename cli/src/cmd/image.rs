//! `gantry image`: import, pull, ls, inspect, rm and gc against the node's
//! image store, and `load`, which puts images into the cluster through the
//! controller's registry. Wiring and presentation only; the store lives in
//! `gantry_agent::image`, the registry in `gantry_controller::registry`.

use super::UsageError;
use crate::client::{CONTROLLER_ENV, ControllerFlag, context_file, resolve};
use anyhow::Context as _;
use gantry_agent::image::{
    Credentials, ImageError, ImageRecord, ImageStore, ImportOptions, PullOptions, PushTarget,
    Reference, Removed,
};
use gantry_agent::paths::DataDir;
use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// Environment variable with the registry username for `pull`.
const USERNAME_ENV: &str = "GANTRY_REGISTRY_USERNAME";
/// Environment variable with the registry password for `pull`.
const PASSWORD_ENV: &str = "GANTRY_REGISTRY_PASSWORD";

/// Arguments of `gantry image`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node's data directory (default: $GANTRY_DATA_DIR, else /var/lib/gantry).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Import an OCI layout directory, an OCI archive or a `docker save` archive.
    Import {
        /// The directory or archive (tar, optionally gzipped).
        path: PathBuf,
        /// Name the image NAME instead of the names in the archive.
        #[arg(long, value_name = "NAME")]
        tag: Option<String>,
    },
    /// Make images available to every node of the cluster (like `kind load`):
    /// import PATH here, then push each image into the controller's registry,
    /// from which agents pull what they lack.
    Load {
        /// An OCI layout directory, an OCI archive or a `docker save` archive.
        path: PathBuf,
        /// Name the image NAME instead of the names in the archive (only
        /// when it holds one image).
        #[arg(long, value_name = "NAME")]
        tag: Option<String>,
    },
    /// Pull an image from a registry.
    Pull {
        /// The image reference, e.g. `busybox`, `127.0.0.1:5000/app:v1`.
        reference: String,
        /// Use plain HTTP for this registry (loopback registries always do).
        #[arg(long)]
        insecure: bool,
        /// Registry username (or $GANTRY_REGISTRY_USERNAME).
        #[arg(long, short = 'u')]
        username: Option<String>,
        /// Read the registry password from stdin (or $GANTRY_REGISTRY_PASSWORD).
        #[arg(long, requires = "username")]
        password_stdin: bool,
    },
    /// List images.
    #[command(visible_alias = "list")]
    Ls {
        /// Only print image ids.
        #[arg(long, short)]
        quiet: bool,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show everything about an image (JSON unless -o yaml).
    Inspect {
        /// Image reference, id or unique id prefix.
        name: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Format::Json)]
        output: Format,
    },
    /// Remove images (untag a name, or delete an image).
    #[command(visible_alias = "remove")]
    Rm {
        /// Untag even an image a container uses (it is kept until released).
        #[arg(long, short)]
        force: bool,
        /// Image references, ids or unique id prefixes.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Delete blobs and layers no image or container uses.
    Gc {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

/// Output formats: tables for people, JSON or YAML for scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Table,
    Json,
    Yaml,
}

/// Prints `value` as JSON or YAML; `false` for `table` (the caller's job).
fn print_structured(value: &impl serde::Serialize, format: Format) -> anyhow::Result<bool> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml => print!("{}", serde_norway::to_string(value)?),
        Format::Table => return Ok(false),
    }
    Ok(true)
}

/// Runs `gantry image`.
pub fn run(args: Args, controller: &ControllerFlag) -> anyhow::Result<ExitCode> {
    // `load` never touches this machine's store (the machine need not be a
    // node, nor its data directory exist): dispatch it before opening one.
    let command = match args.command {
        Command::Load { path, tag } => return load(path, tag, controller),
        command => command,
    };
    let data_dir = args
        .data_dir
        .map(DataDir::new)
        .unwrap_or_else(DataDir::from_env);
    let store = ImageStore::open(data_dir.images()).map_err(classify)?;
    match command {
        Command::Import { path, tag } => import(&store, path, tag),
        Command::Load { path, tag } => load(path, tag, controller),
        Command::Pull {
            reference,
            insecure,
            username,
            password_stdin,
        } => pull(&store, &reference, insecure, username, password_stdin),
        Command::Ls { quiet, output } => ls(&store, quiet, output),
        Command::Inspect { name, output } => {
            let details = store.inspect(&name).map_err(classify)?;
            // Like `docker inspect`, there is no table: `table` means JSON.
            if !print_structured(&details, output)? {
                print_structured(&details, Format::Json)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { force, names } => rm(&store, &names, force),
        Command::Gc { output } => gc(&store, output),
    }
}

/// User mistakes exit 2 (via [`UsageError`]); the rest are failures.
fn classify(err: ImageError) -> anyhow::Error {
    if err.is_user_error() {
        UsageError(err.to_string()).into()
    } else {
        anyhow::Error::new(err)
    }
}

/// `docker.io/library/busybox:latest` → `busybox:latest`, as Docker prints.
fn familiar(name: &str) -> String {
    match Reference::parse(name) {
        Ok(r) => {
            let mut out = r.familiar_repository();
            if let Some(tag) = &r.tag {
                out = format!("{out}:{tag}");
            }
            if let Some(digest) = &r.digest {
                out = format!("{out}@{digest}");
            }
            out
        }
        Err(_) => name.to_string(),
    }
}

fn short_id(id: &str) -> String {
    id.strip_prefix("sha256:")
        .unwrap_or(id)
        .chars()
        .take(12)
        .collect()
}

/// Sizes as Docker prints them: decimal units, three significant digits.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        // Three significant digits, as Go's %.3g in Docker's units.HumanSize.
        let decimals = if value >= 100.0 {
            0
        } else if value >= 10.0 {
            1
        } else {
            2
        };
        let mut number = format!("{value:.decimals$}");
        if number.contains('.') {
            number = number
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string();
        }
        number + UNITS[unit]
    }
}

fn import(store: &ImageStore, path: PathBuf, tag: Option<String>) -> anyhow::Result<ExitCode> {
    if !path.exists() {
        return Err(UsageError(format!("{}: no such file or directory", path.display())).into());
    }
    let records = store
        .import(&path, &ImportOptions { tag })
        .map_err(classify)?;
    for record in records {
        if record.names.is_empty() {
            println!("Loaded image ID: {}", record.id);
        }
        for name in &record.names {
            println!("Loaded image: {}", familiar(name));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `gantry image load`: import into a scratch store (never the node's own:
/// loading is about the cluster, and this machine may not be a node), then
/// push every name of every image to the controller. The scratch store goes
/// when done; it lives under $TMPDIR, since import also unpacks the layers.
fn load(
    path: PathBuf,
    tag: Option<String>,
    controller: &ControllerFlag,
) -> anyhow::Result<ExitCode> {
    if !path.exists() {
        return Err(UsageError(format!("{}: no such file or directory", path.display())).into());
    }
    // The same resolution as every client command (flag, environment,
    // context file, default), so that `image load` and `deploy` never talk
    // to two different clusters.
    let env = std::env::var(CONTROLLER_ENV).ok();
    let controller = resolve(controller.0.as_deref(), env.as_deref(), &context_file())?.address;
    let scratch = tempfile::Builder::new()
        .prefix("gantry-load-")
        .tempdir()
        .context("creating a scratch image store")?;
    let store = ImageStore::open(scratch.path()).map_err(classify)?;
    let records = store
        .import(&path, &ImportOptions { tag })
        .map_err(classify)?;
    let target = PushTarget::mirror(&controller);
    for record in &records {
        if record.names.is_empty() {
            return Err(UsageError(format!(
                "{}: image {} has no name to load it under: give --tag NAME",
                path.display(),
                record.id
            ))
            .into());
        }
        for name in &record.names {
            let digest = store
                .push(name, &target, &mut |event| eprintln!("{event}"))
                .with_context(|| format!("loading {name} into the controller at {controller}"))?;
            println!("Loaded image: {} ({digest})", familiar(name));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn pull(
    store: &ImageStore,
    reference: &str,
    insecure: bool,
    username: Option<String>,
    password_stdin: bool,
) -> anyhow::Result<ExitCode> {
    let username = username.or_else(|| std::env::var(USERNAME_ENV).ok());
    let credentials = match username {
        Some(username) => {
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .context("reading the password from stdin")?;
                line.trim_end_matches(['\r', '\n']).to_string()
            } else if let Ok(password) = std::env::var(PASSWORD_ENV) {
                password
            } else {
                return Err(UsageError(format!(
                    "--username needs --password-stdin or ${PASSWORD_ENV}"
                ))
                .into());
            };
            Some(Credentials { username, password })
        }
        None => None,
    };
    let options = PullOptions {
        insecure,
        credentials,
        ..PullOptions::default()
    };
    // Simple lines: they read the same in a terminal and in CI logs.
    let record = store
        .pull(reference, &options, &mut |event| eprintln!("{event}"))
        .map_err(classify)?;
    println!("Digest: {}", record.manifest_digest);
    let name = record
        .names
        .iter()
        .find(|n| {
            let wanted = Reference::parse(reference).map(|r| r.repository());
            Reference::parse(n).is_ok_and(|r| wanted.as_ref().is_ok_and(|w| *w == r.repository()))
        })
        .or(record.names.first())
        .cloned()
        .unwrap_or_else(|| record.id.clone());
    println!("{name}");
    Ok(ExitCode::SUCCESS)
}

/// One row of `ls`: an image under one of its names.
#[derive(serde::Serialize)]
struct Row<'a> {
    repository: String,
    tag: String,
    id: &'a str,
    size: u64,
}

fn ls(store: &ImageStore, quiet: bool, output: Format) -> anyhow::Result<ExitCode> {
    let images = store.list().map_err(classify)?;
    if quiet {
        for image in &images {
            println!("{}", short_id(&image.id));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if print_structured(&images, output)? {
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = Vec::new();
    for image in &images {
        rows.extend(rows_of(image));
    }
    let headers = ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|(row, image)| {
            let created = store
                .config(image)
                .ok()
                .and_then(|c| c.created().clone())
                .map(|c| c.chars().take(19).collect::<String>().replace('T', " "))
                .unwrap_or_else(|| "N/A".to_string());
            [
                row.repository.clone(),
                row.tag.clone(),
                short_id(row.id),
                created,
                human_size(row.size),
            ]
        })
        .collect();
    print_table(&headers, &cells);
    Ok(ExitCode::SUCCESS)
}

fn rows_of(image: &ImageRecord) -> Vec<(Row<'_>, &ImageRecord)> {
    if image.names.is_empty() {
        return vec![(
            Row {
                repository: "<none>".into(),
                tag: "<none>".into(),
                id: &image.id,
                size: image.size,
            },
            image,
        )];
    }
    image
        .names
        .iter()
        .map(|name| {
            let (repository, tag) = match Reference::parse(name) {
                Ok(r) => (
                    r.familiar_repository(),
                    r.tag.clone().unwrap_or_else(|| "<none>".into()),
                ),
                Err(_) => (name.clone(), "<none>".into()),
            };
            (
                Row {
                    repository,
                    tag,
                    id: &image.id,
                    size: image.size,
                },
                image,
            )
        })
        .collect()
}

fn print_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) {
    let mut widths = headers.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn rm(store: &ImageStore, names: &[String], force: bool) -> anyhow::Result<ExitCode> {
    let mut failures: Vec<ImageError> = Vec::new();
    for name in names {
        match store.remove(name, force) {
            Ok(done) => {
                for removed in done {
                    match removed {
                        Removed::Untagged(n) => println!("Untagged: {}", familiar(&n)),
                        Removed::Deleted(id) => println!("Deleted: {id}"),
                    }
                }
            }
            Err(err) => failures.push(err),
        }
    }
    match failures.len() {
        0 => Ok(ExitCode::SUCCESS),
        1 => Err(classify(failures.remove(0))),
        _ => {
            let user = failures.iter().all(ImageError::is_user_error);
            let message = failures
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            if user {
                Err(UsageError(message).into())
            } else {
                Err(anyhow::anyhow!(message))
            }
        }
    }
}

fn gc(store: &ImageStore, output: Format) -> anyhow::Result<ExitCode> {
    let report = store.gc().map_err(classify)?;
    match output {
        Format::Json | Format::Yaml => {
            print_structured(&report, output)?;
        }
        Format::Table => {
            for id in &report.images {
                println!("Deleted image: {id}");
            }
            for digest in &report.blobs {
                println!("Deleted blob: {digest}");
            }
            for snapshot in &report.snapshots {
                println!("Deleted layer: {snapshot}");
            }
            println!(
                "Freed {} ({} images, {} blobs, {} layers)",
                human_size(report.bytes_freed),
                report.images.len(),
                report.blobs.len(),
                report.snapshots.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names_print_like_docker() {
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(4_261_000), "4.26MB");
        assert_eq!(human_size(1_000_000), "1MB");
        assert_eq!(human_size(100_000_000), "100MB");
        assert_eq!(
            familiar("docker.io/library/busybox:latest"),
            "busybox:latest"
        );
        assert_eq!(familiar("127.0.0.1:5000/app:v1"), "127.0.0.1:5000/app:v1");
    }
}
