//! Compose files (the compose-spec, as users write them) turned into a
//! normalized, fully defaulted [`Stack`], and the difference between two
//! stacks.
//!
//! [`load`] is what `gantry deploy -f FILE` and `deploy --dry-run` run first:
//! it parses the YAML, interpolates variables (process environment over
//! `.env`), expands short syntax, fills in Swarm's defaults and checks every
//! key. A typo or a wrong value is an error that names the key path and its
//! line and column; a compose-spec key that Gantry does not support yet is a
//! [`Warning`] returned with the stack, never silently dropped. [`diff`] says
//! which services a redeploy creates, updates (and which fields) and removes.
//!
//! **Invariant:** the only I/O is reading `.env` and `env_file:` files through
//! [`ProjectFiles`]; no clock, no randomness: the same input gives the same
//! stack and the same warnings in the same order.

mod diff;
pub mod env;
pub mod interpolate;
mod normalize;
pub mod placement;
pub mod ports;
pub mod position;
pub mod shell;
pub mod spec;
pub mod units;
pub mod volumes;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub use diff::{ObjectChanges, ServiceUpdate, StackChanges, diff};
pub use position::Pos;
pub use spec::*;

/// Reads the files a Compose file refers to (`.env`, `env_file:`), so that
/// tests can serve fixtures and the loader stays free of direct I/O.
pub trait ProjectFiles {
    /// Reads a whole file as UTF-8. A missing file is an
    /// [`io::ErrorKind::NotFound`] error.
    fn read(&self, path: &Path) -> io::Result<String>;
}

/// [`ProjectFiles`] on the local file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskFiles;

impl ProjectFiles for DiskFiles {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// [`ProjectFiles`] from memory, for tests and for callers that already hold
/// the files.
#[derive(Debug, Clone, Default)]
pub struct MemoryFiles(pub BTreeMap<PathBuf, String>);

impl ProjectFiles for MemoryFiles {
    fn read(&self, path: &Path) -> io::Result<String> {
        self.0
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such file"))
    }
}

/// What [`load`] needs besides the file's bytes.
pub struct LoadOptions<'a> {
    /// The project directory: relative paths (`.env`, `env_file:`, bind
    /// sources) are resolved against it, and its name is the default stack
    /// name. Pass an absolute path.
    pub project_dir: &'a Path,
    /// `--stack NAME`, which wins over `name:` in the file.
    pub stack_name: Option<&'a str>,
    /// The process environment (`std::env::vars()`), which wins over `.env`.
    pub env: &'a BTreeMap<String, String>,
    /// Where `.env` and `env_file:` files are read from.
    pub files: &'a dyn ProjectFiles,
}

/// A loaded Compose file.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The normalized stack.
    pub stack: Stack,
    /// Everything that was accepted but not applied, in file order.
    pub warnings: Vec<Warning>,
}

/// Something in the file that Gantry accepted without applying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Where it is (unknown positions print nothing).
    pub pos: Pos,
    /// The key path, such as `services.web.build`.
    pub path: String,
    /// What it is.
    pub kind: WarningKind,
}

/// The kinds of [`Warning`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WarningKind {
    /// A compose-spec key Gantry does not support yet; it is ignored.
    Unsupported,
    /// A key the compose-spec itself marks obsolete (`version`); ignored.
    Obsolete,
    /// A variable referenced without a default was unset and became empty
    /// (or, for `environment: [KEY]`, the key was left out).
    UnsetVariable {
        /// The variable.
        name: String,
    },
    /// A key ignored because another one takes precedence.
    Overridden {
        /// The key path that wins.
        by: String,
    },
    /// An optional dependency (`required: false`) on a service that does not
    /// exist; it is left out.
    MissingOptionalDependency {
        /// The missing service.
        service: String,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (pos, path) = (self.pos, &self.path);
        match &self.kind {
            WarningKind::Unsupported => {
                write!(f, "{pos}{path}: not supported by gantry yet, ignored")
            }
            WarningKind::Obsolete => write!(f, "{pos}{path}: obsolete, ignored"),
            WarningKind::UnsetVariable { name } => write!(
                f,
                "{pos}{path}: variable {name} is not set, defaulting to a blank string"
            ),
            WarningKind::Overridden { by } => {
                write!(f, "{pos}{path}: ignored because {by} is set")
            }
            WarningKind::MissingOptionalDependency { service } => write!(
                f,
                "{pos}{path}: optional dependency on unknown service `{service}` ignored"
            ),
        }
    }
}

/// A value that failed to parse, from the module that parses it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A duration, size or CPU count.
    #[error(transparent)]
    Unit(#[from] units::UnitError),
    /// A port.
    #[error(transparent)]
    Port(#[from] ports::PortError),
    /// A mount.
    #[error(transparent)]
    Mount(#[from] volumes::MountError),
    /// A placement constraint.
    #[error(transparent)]
    Constraint(#[from] placement::ConstraintError),
    /// A command line.
    #[error(transparent)]
    Shell(#[from] shell::ShellError),
    /// Anything else: an out-of-range number, an unknown enum value.
    #[error("invalid value `{value}`: {reason}")]
    Other {
        /// The value as written.
        value: String,
        /// What is wrong, and what is allowed.
        reason: String,
    },
}

/// Why a Compose file was refused. Every variant names the key path (and
/// its position when known) or the file involved.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// The file is not UTF-8.
    #[error("the compose file is not valid UTF-8")]
    NotUtf8,
    /// The YAML itself is malformed.
    #[error("{pos}invalid YAML: {message}")]
    Yaml {
        /// Where the parser stopped.
        pos: Pos,
        /// The parser's message.
        message: String,
    },
    /// A value of the wrong YAML type.
    #[error("{pos}{path}: expected {expected}, found {found}")]
    InvalidType {
        /// Where.
        pos: Pos,
        /// The key path.
        path: String,
        /// What was expected.
        expected: &'static str,
        /// What was found, with the value when short.
        found: String,
    },
    /// A key that is neither supported nor in the compose-spec: most often a
    /// typo.
    #[error("{pos}unknown key `{key}` at {path}{hint}")]
    UnknownKey {
        /// Where.
        pos: Pos,
        /// The key.
        key: String,
        /// The full key path.
        path: String,
        /// ` (did you mean `replicas`?)`, or empty.
        hint: String,
    },
    /// A value that failed to parse or is out of range.
    #[error("{pos}{path}: {source}")]
    InvalidValue {
        /// Where.
        pos: Pos,
        /// The key path.
        path: String,
        /// What is wrong with the value.
        source: ValueError,
    },
    /// Interpolation failed (a required variable is missing, or bad `$`).
    #[error("{pos}{path}: {source}")]
    Interpolate {
        /// Where.
        pos: Pos,
        /// The key path of the value.
        path: String,
        /// The interpolation error.
        source: interpolate::InterpolateError,
    },
    /// A required key is absent.
    #[error("{pos}{path}: `{key}` is required{hint}")]
    MissingKey {
        /// Where the enclosing mapping is.
        pos: Pos,
        /// The enclosing mapping's path.
        path: String,
        /// The missing key.
        key: &'static str,
        /// Advice, or empty.
        hint: &'static str,
    },
    /// Two keys that cannot be used together, or a value that contradicts
    /// another.
    #[error("{pos}{path}: {reason}")]
    Conflict {
        /// Where.
        pos: Pos,
        /// The key path.
        path: String,
        /// What conflicts.
        reason: String,
    },
    /// A service name outside `[a-z0-9][a-z0-9_.-]*`.
    #[error(
        "{pos}services.{name}: invalid service name `{name}` (use lowercase letters, digits, `_`, `.` and `-`, starting with a letter or digit)"
    )]
    InvalidServiceName {
        /// Where.
        pos: Pos,
        /// The name.
        name: String,
    },
    /// `depends_on` names a service that does not exist.
    #[error("{pos}{path}: unknown service `{service}`{hint}")]
    UnknownService {
        /// Where.
        pos: Pos,
        /// The key path.
        path: String,
        /// The missing service.
        service: String,
        /// ` (did you mean `db`?)`, or empty.
        hint: String,
    },
    /// `depends_on` forms a cycle.
    #[error("dependency cycle: {cycle}")]
    DependencyCycle {
        /// The services in the cycle, `a -> b -> a`.
        cycle: String,
    },
    /// A service mounts a named volume that is not declared under the
    /// top-level `volumes:`.
    #[error("{pos}{path}: volume `{name}` is not declared in the top-level volumes")]
    UndefinedVolume {
        /// Where.
        pos: Pos,
        /// The key path of the mount.
        path: String,
        /// The volume.
        name: String,
    },
    /// A service joins a network that is not declared under the top-level
    /// `networks:`.
    #[error("{pos}{path}: network `{name}` is not declared in the top-level networks")]
    UndefinedNetwork {
        /// Where.
        pos: Pos,
        /// The key path.
        path: String,
        /// The network.
        name: String,
    },
    /// The file defines no services.
    #[error("the compose file defines no services")]
    NoServices,
    /// The stack name is invalid or cannot be derived.
    #[error("invalid stack name `{name}`: {reason}")]
    InvalidStackName {
        /// The name as given (or derived).
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `.env` or an `env_file:` could not be read.
    #[error("{pos}{key}: cannot read {}: {source}", path.display())]
    Read {
        /// Where the file is named (unknown for `.env`).
        pos: Pos,
        /// The key path naming the file (`.env` for the project's).
        key: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// `.env` or an `env_file:` is malformed.
    #[error("{pos}{path}: {source}")]
    EnvFile {
        /// Where the file is named (unknown for `.env`).
        pos: Pos,
        /// The key path naming the file (`.env` for the project's).
        path: String,
        /// The parse error.
        source: env::EnvFileError,
    },
    /// The stack could not be written as YAML.
    #[error("cannot serialize the stack: {message}")]
    Serialize {
        /// The serializer's message.
        message: String,
    },
}

/// Loads a Compose file: parses, interpolates, validates and normalizes it.
pub fn load(source: &[u8], options: &LoadOptions<'_>) -> Result<Loaded, ComposeError> {
    let text = std::str::from_utf8(source).map_err(|_| ComposeError::NotUtf8)?;
    normalize::load(text, options)
}

/// Writes a stack as a Compose file that [`load`] reads back into the same
/// stack: long syntax throughout, and every `$` in a value written `$$` so
/// that it is not interpolated again (as `docker compose config` does).
pub fn to_compose_yaml(stack: &Stack) -> Result<String, ComposeError> {
    let serialize = |e: &dyn fmt::Display| ComposeError::Serialize {
        message: e.to_string(),
    };
    let mut value = serde_json::to_value(stack).map_err(|e| serialize(&e))?;
    escape_dollars(&mut value);
    serde_norway::to_string(&value).map_err(|e| serialize(&e))
}

fn escape_dollars(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) if s.contains('$') => *s = s.replace('$', "$$"),
        serde_json::Value::Array(items) => items.iter_mut().for_each(escape_dollars),
        serde_json::Value::Object(map) => map.values_mut().for_each(escape_dollars),
        _ => {}
    }
}

#[cfg(test)]
mod tests;
