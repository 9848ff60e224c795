//! The walk from a parsed YAML tree to a [`Stack`]: key checking,
//! short-syntax expansion, defaults and cross-references.
//!
//! Values are read leniently where Compose is lenient: after interpolation
//! every number may arrive as a string (`replicas: ${N:-3}`), so integers,
//! booleans and durations are accepted as strings too.

use std::collections::{BTreeMap, BTreeSet};

use serde_norway::{Mapping, Value};

use super::interpolate::interpolate;
use super::position::{Pos, Positions};
use super::spec::*;
use super::units::{Bytes, Duration};
use super::{
    ComposeError, LoadOptions, Loaded, ValueError, Warning, WarningKind, env, ports, shell, volumes,
};

mod deploy;

type Result<T> = std::result::Result<T, ComposeError>;

const TOP_KEYS: &[&str] = &["name", "services", "volumes", "networks"];
const TOP_UNSUPPORTED: &[&str] = &["secrets", "configs", "include", "models"];

const SERVICE_KEYS: &[&str] = &[
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "volumes",
    "healthcheck",
    "restart",
    "user",
    "working_dir",
    "hostname",
    "labels",
    "deploy",
    "network_mode",
    "depends_on",
    "networks",
    "stop_grace_period",
];
/// Every other service key of the compose-spec: accepted with a warning.
const SERVICE_UNSUPPORTED: &[&str] = &[
    "annotations",
    "attach",
    "blkio_config",
    "build",
    "cap_add",
    "cap_drop",
    "cgroup",
    "cgroup_parent",
    "configs",
    "container_name",
    "cpu_count",
    "cpu_percent",
    "cpu_period",
    "cpu_quota",
    "cpu_rt_period",
    "cpu_rt_runtime",
    "cpu_shares",
    "cpus",
    "cpuset",
    "credential_spec",
    "develop",
    "device_cgroup_rules",
    "devices",
    "dns",
    "dns_opt",
    "dns_search",
    "domainname",
    "driver_opts",
    "expose",
    "extends",
    "external_links",
    "extra_hosts",
    "gpus",
    "group_add",
    "init",
    "ipc",
    "isolation",
    "label_file",
    "links",
    "logging",
    "mac_address",
    "mem_limit",
    "mem_reservation",
    "mem_swappiness",
    "memswap_limit",
    "models",
    "oom_kill_disable",
    "oom_score_adj",
    "pid",
    "pids_limit",
    "platform",
    "post_start",
    "pre_stop",
    "privileged",
    "profiles",
    "provider",
    "pull_policy",
    "read_only",
    "runtime",
    "scale",
    "secrets",
    "security_opt",
    "shm_size",
    "stdin_open",
    "stop_signal",
    "storage_opt",
    "sysctls",
    "tmpfs",
    "tty",
    "ulimits",
    "use_api_socket",
    "userns_mode",
    "uts",
    "volumes_from",
];

/// Reads a Compose file's text.
pub fn load(text: &str, options: &LoadOptions<'_>) -> Result<Loaded> {
    let positions = Positions::scan(text);
    let mut root: Value = serde_norway::from_str(text).map_err(|e| ComposeError::Yaml {
        pos: e
            .location()
            .map(|l| Pos {
                line: l.line(),
                column: l.column(),
            })
            .unwrap_or_default(),
        message: e.to_string(),
    })?;
    root.apply_merge().map_err(|e| ComposeError::Yaml {
        pos: Pos::default(),
        message: e.to_string(),
    })?;
    let mut walker = Walker {
        positions,
        warnings: Vec::new(),
        options,
        vars: BTreeMap::new(),
        service_names: BTreeSet::new(),
    };
    walker.vars = walker.read_dotenv()?;
    walker.interpolate_tree(&mut root, "")?;
    let stack = walker.stack(&root)?;
    let mut warnings = walker.warnings;
    // File order; warnings whose position is unknown go last.
    warnings.sort_by_key(|w| (w.pos.line == 0, w.pos.line, w.pos.column));
    Ok(Loaded { stack, warnings })
}

struct Walker<'a> {
    positions: Positions,
    warnings: Vec<Warning>,
    options: &'a LoadOptions<'a>,
    /// `.env` values; the process environment wins over them.
    vars: BTreeMap<String, String>,
    /// Every service's name, for checking `depends_on` where it is written.
    service_names: BTreeSet<String>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn describe(value: &Value) -> String {
    let short = |s: String| {
        if s.chars().count() > 40 {
            String::new()
        } else {
            format!(" `{s}`")
        }
    };
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("a boolean `{b}`"),
        Value::Number(n) => format!("a number `{n}`"),
        Value::String(s) => format!("a string{}", short(s.clone())),
        Value::Sequence(_) => "a list".to_string(),
        Value::Mapping(_) => "a mapping".to_string(),
        Value::Tagged(t) => format!("a tagged value `{}`", t.tag),
    }
}

/// The Levenshtein distance, for "did you mean" hints.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// ` (did you mean `x`?)` for the closest candidate within two edits.
fn hint<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> String {
    candidates
        .into_iter()
        .map(|c| (distance(word, c), c))
        .filter(|(d, _)| *d <= 2 && *d < word.len())
        .min()
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

impl Walker<'_> {
    fn pos(&self, path: &str) -> Pos {
        self.positions.get(path)
    }

    fn warn(&mut self, path: &str, kind: WarningKind) {
        let pos = self.pos(path);
        self.warnings.push(Warning {
            pos,
            path: path.to_string(),
            kind,
        });
    }

    fn lookup(&self, name: &str) -> Option<String> {
        self.options
            .env
            .get(name)
            .or_else(|| self.vars.get(name))
            .cloned()
    }

    fn invalid(
        &self,
        path: &str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> ComposeError {
        ComposeError::InvalidValue {
            pos: self.pos(path),
            path: path.to_string(),
            source: ValueError::Other {
                value: value.into(),
                reason: reason.into(),
            },
        }
    }

    fn value_error(&self, path: &str, source: impl Into<ValueError>) -> ComposeError {
        ComposeError::InvalidValue {
            pos: self.pos(path),
            path: path.to_string(),
            source: source.into(),
        }
    }

    fn type_error(&self, path: &str, expected: &'static str, value: &Value) -> ComposeError {
        ComposeError::InvalidType {
            pos: self.pos(path),
            path: path.to_string(),
            expected,
            found: describe(value),
        }
    }

    fn conflict(&self, path: &str, reason: impl Into<String>) -> ComposeError {
        ComposeError::Conflict {
            pos: self.pos(path),
            path: path.to_string(),
            reason: reason.into(),
        }
    }

    /// Reads `.env` from the project directory, if there is one.
    fn read_dotenv(&mut self) -> Result<BTreeMap<String, String>> {
        let path = self.options.project_dir.join(".env");
        let text = match self.options.files.read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(source) => {
                return Err(ComposeError::Read {
                    pos: Pos::default(),
                    key: ".env".to_string(),
                    path,
                    source,
                });
            }
        };
        let env = self.options.env;
        let lookup = |name: &str| env.get(name).cloned();
        let entries =
            env::parse(&text, ".env", &lookup).map_err(|source| ComposeError::EnvFile {
                pos: Pos::default(),
                path: ".env".to_string(),
                source,
            })?;
        Ok(entries
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
    }

    /// Interpolates every string value (never keys, as in Compose).
    fn interpolate_tree(&mut self, value: &mut Value, path: &str) -> Result<()> {
        match value {
            Value::String(s) if s.contains('$') => {
                let lookup = |name: &str| self.lookup(name);
                let out = interpolate(s, &lookup).map_err(|source| ComposeError::Interpolate {
                    pos: self.pos(path),
                    path: path.to_string(),
                    source,
                })?;
                *s = out.value;
                for name in out.unset {
                    self.warn(path, WarningKind::UnsetVariable { name });
                }
            }
            Value::Sequence(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.interpolate_tree(item, &format!("{path}[{i}]"))?;
                }
            }
            Value::Mapping(map) => {
                for (key, item) in map.iter_mut() {
                    let key = scalar_text(key).unwrap_or_default();
                    self.interpolate_tree(item, &join(path, &key))?;
                }
            }
            Value::Tagged(tagged) => self.interpolate_tree(&mut tagged.value, path)?,
            _ => {}
        }
        Ok(())
    }

    fn mapping<'v>(&self, value: &'v Value, path: &str) -> Result<&'v Mapping> {
        value
            .as_mapping()
            .ok_or_else(|| self.type_error(path, "a mapping", value))
    }

    /// Checks a mapping's keys: known ones pass, compose-spec ones that
    /// Gantry lacks warn, `x-` extensions are skipped, anything else is an
    /// error with a hint.
    fn check_keys(
        &mut self,
        map: &Mapping,
        path: &str,
        known: &[&str],
        unsupported: &[&str],
    ) -> Result<()> {
        for key in map.keys() {
            let Some(key) = key.as_str() else {
                return Err(self.type_error(path, "string keys", key));
            };
            let key_path = join(path, key);
            if known.contains(&key) || key.starts_with("x-") {
                continue;
            }
            if unsupported.contains(&key) {
                self.warn(&key_path, WarningKind::Unsupported);
                continue;
            }
            return Err(ComposeError::UnknownKey {
                pos: self.pos(&key_path),
                key: key.to_string(),
                hint: hint(key, known.iter().chain(unsupported).copied()),
                path: key_path,
            });
        }
        Ok(())
    }

    fn string(&self, value: &Value, path: &str) -> Result<String> {
        scalar_text(value).ok_or_else(|| self.type_error(path, "a string", value))
    }

    fn opt_string(&self, map: &Mapping, key: &str, path: &str) -> Result<Option<String>> {
        get(map, key)
            .map(|v| self.string(v, &join(path, key)))
            .transpose()
    }

    fn u64(&self, value: &Value, path: &str) -> Result<u64> {
        let text = self.string(value, path)?;
        text.trim()
            .parse()
            .map_err(|_| self.invalid(path, text, "expected a non-negative integer"))
    }

    fn bool(&self, value: &Value, path: &str) -> Result<bool> {
        if let Value::Bool(b) = value {
            return Ok(*b);
        }
        let text = self.string(value, path)?;
        match text.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" => Ok(true),
            "false" | "no" | "off" => Ok(false),
            _ => Err(self.invalid(path, text, "expected true or false")),
        }
    }

    fn duration(&self, value: &Value, path: &str) -> Result<Duration> {
        let text = self.string(value, path)?;
        Duration::parse(&text).map_err(|e| self.value_error(path, e))
    }

    fn opt_duration(
        &self,
        map: &Mapping,
        key: &str,
        path: &str,
        default: Duration,
    ) -> Result<Duration> {
        match get(map, key) {
            Some(v) => self.duration(v, &join(path, key)),
            None => Ok(default),
        }
    }

    fn sequence<'v>(&self, value: &'v Value, path: &str) -> Result<&'v [Value]> {
        value
            .as_sequence()
            .map(Vec::as_slice)
            .ok_or_else(|| self.type_error(path, "a list", value))
    }

    /// A mapping of strings or a list of `KEY=VALUE`; `None` values are keys
    /// written without a value.
    fn key_values(&self, value: &Value, path: &str) -> Result<Vec<(String, Option<String>)>> {
        match value {
            Value::Mapping(map) => map
                .iter()
                .map(|(k, v)| {
                    let key = self.string(k, path)?;
                    let item = join(path, &key);
                    let v = match v {
                        Value::Null => None,
                        v => Some(self.string(v, &item)?),
                    };
                    Ok((key, v))
                })
                .collect(),
            Value::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let text = self.string(item, &format!("{path}[{i}]"))?;
                    Ok(match text.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (text, None),
                    })
                })
                .collect(),
            other => Err(self.type_error(path, "a mapping or a list of KEY=VALUE", other)),
        }
    }

    fn stack(&mut self, root: &Value) -> Result<Stack> {
        let map = self.mapping(root, "")?;
        if get(map, "version").is_some() {
            self.warn("version", WarningKind::Obsolete);
        }
        self.check_keys(map, "", &[TOP_KEYS, &["version"]].concat(), TOP_UNSUPPORTED)?;
        let name = self.stack_name(map)?;
        let volumes = match get(map, "volumes") {
            Some(v) => self.top_volumes(v)?,
            None => BTreeMap::new(),
        };
        let mut networks = match get(map, "networks") {
            Some(v) => self.top_networks(v)?,
            None => BTreeMap::new(),
        };
        let services_value = get(map, "services").ok_or(ComposeError::NoServices)?;
        let services_map = self.mapping(services_value, "services")?;
        if services_map.is_empty() {
            return Err(ComposeError::NoServices);
        }
        self.service_names = services_map
            .keys()
            .map(|k| self.string(k, "services"))
            .collect::<Result<_>>()?;
        let mut services = BTreeMap::new();
        for (key, value) in services_map {
            let name = self.string(key, "services")?;
            let service = self.service(&name, value, &volumes, &networks)?;
            services.insert(name, service);
        }
        self.check_dependencies(&services)?;
        // The implicit `default` network exists once a service uses it, as
        // `docker compose config` shows it.
        if services
            .values()
            .any(|s| s.networks.contains_key("default"))
        {
            networks.entry("default".to_string()).or_default();
        }
        Ok(Stack {
            name,
            services,
            volumes,
            networks,
        })
    }

    /// `--stack`, else `name:`, else the project directory's name. Explicit
    /// names must already be valid (Compose refuses an invalid `-p`); a
    /// directory's name is normalized the way Compose does it: lowercased,
    /// characters other than `[a-z0-9_-]` dropped, leading `_`/`-` trimmed.
    fn stack_name(&self, map: &Mapping) -> Result<String> {
        let explicit = match self.options.stack_name {
            Some(n) => Some(n.to_string()),
            None => self.opt_string(map, "name", "")?,
        };
        if let Some(name) = explicit {
            let valid = name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            if !valid {
                return Err(ComposeError::InvalidStackName {
                    name,
                    reason: "use lowercase letters, digits, `_` and `-`, starting with a letter or digit",
                });
            }
            return Ok(name);
        }
        let dir = self
            .options
            .project_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let normalized: String = dir
            .to_ascii_lowercase()
            .chars()
            .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-')
            .collect();
        let normalized = normalized.trim_start_matches(['_', '-']).to_string();
        if normalized.is_empty() {
            return Err(ComposeError::InvalidStackName {
                name: dir,
                reason: "the project directory's name has no usable characters; pass --stack or set name:",
            });
        }
        Ok(normalized)
    }

    fn top_volumes(&mut self, value: &Value) -> Result<BTreeMap<String, VolumeSpec>> {
        let mut out = BTreeMap::new();
        let Some(map) = (match value {
            Value::Null => None,
            v => Some(self.mapping(v, "volumes")?),
        }) else {
            return Ok(out);
        };
        for (key, spec) in map {
            let name = self.string(key, "volumes")?;
            let path = join("volumes", &name);
            let mut volume = VolumeSpec::default();
            if !spec.is_null() {
                let m = self.mapping(spec, &path)?;
                self.check_keys(
                    m,
                    &path,
                    &["driver", "external", "labels"],
                    &["driver_opts", "name"],
                )?;
                volume.driver = self.opt_string(m, "driver", &path)?;
                if let Some(v) = get(m, "external") {
                    volume.external = self.bool(v, &join(&path, "external"))?;
                }
                volume.labels = self.labels(m, &path)?;
            }
            out.insert(name, volume);
        }
        Ok(out)
    }

    fn top_networks(&mut self, value: &Value) -> Result<BTreeMap<String, NetworkSpec>> {
        let mut out = BTreeMap::new();
        let Some(map) = (match value {
            Value::Null => None,
            v => Some(self.mapping(v, "networks")?),
        }) else {
            return Ok(out);
        };
        for (key, spec) in map {
            let name = self.string(key, "networks")?;
            let path = join("networks", &name);
            let mut network = NetworkSpec::default();
            if !spec.is_null() {
                let m = self.mapping(spec, &path)?;
                self.check_keys(
                    m,
                    &path,
                    &["driver", "external", "internal", "attachable", "labels"],
                    &["driver_opts", "ipam", "enable_ipv4", "enable_ipv6", "name"],
                )?;
                network.driver = self.opt_string(m, "driver", &path)?;
                for (key, slot) in [
                    ("external", &mut network.external),
                    ("internal", &mut network.internal),
                    ("attachable", &mut network.attachable),
                ] {
                    if let Some(v) = get(m, key) {
                        *slot = self.bool(v, &join(&path, key))?;
                    }
                }
                network.labels = self.labels(m, &path)?;
            }
            out.insert(name, network);
        }
        Ok(out)
    }

    fn labels(&self, map: &Mapping, path: &str) -> Result<BTreeMap<String, String>> {
        let Some(value) = get(map, "labels") else {
            return Ok(BTreeMap::new());
        };
        let path = join(path, "labels");
        Ok(self
            .key_values(value, &path)?
            .into_iter()
            .map(|(k, v)| (k, v.unwrap_or_default()))
            .collect())
    }

    fn service(
        &mut self,
        name: &str,
        value: &Value,
        volumes: &BTreeMap<String, VolumeSpec>,
        networks: &BTreeMap<String, NetworkSpec>,
    ) -> Result<Service> {
        let path = join("services", name);
        let mut chars = name.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c));
        if !valid {
            return Err(ComposeError::InvalidServiceName {
                pos: self.pos(&path),
                name: name.to_string(),
            });
        }
        let map = self.mapping(value, &path)?;
        self.check_keys(map, &path, SERVICE_KEYS, SERVICE_UNSUPPORTED)?;
        let image = self
            .opt_string(map, "image", &path)?
            .ok_or(ComposeError::MissingKey {
                pos: self.pos(&path),
                path: path.clone(),
                key: "image",
                hint: if get(map, "build").is_some() {
                    " (build is not supported: build the image, then `gantry image load` it)"
                } else {
                    ""
                },
            })?;
        if image.trim().is_empty() {
            return Err(self.invalid(&join(&path, "image"), image, "empty image reference"));
        }
        let command = self.command(map, "command", &path)?;
        let entrypoint = self.command(map, "entrypoint", &path)?;
        let environment = self.environment(map, &path)?;
        let ports = self.ports(map, &path)?;
        let mounts = self.mounts(map, &path, volumes)?;
        let healthcheck = match get(map, "healthcheck") {
            Some(v) => Some(self.healthcheck(v, &join(&path, "healthcheck"))?),
            None => None,
        };
        let user = self.opt_string(map, "user", &path)?;
        let working_dir = self.opt_string(map, "working_dir", &path)?;
        if let Some(dir) = &working_dir
            && !dir.starts_with('/')
        {
            return Err(self.invalid(
                &join(&path, "working_dir"),
                dir.clone(),
                "must be an absolute path",
            ));
        }
        let hostname = self.opt_string(map, "hostname", &path)?;
        let labels = self.labels(map, &path)?;
        let stop_grace_period = match get(map, "stop_grace_period") {
            Some(v) => Some(self.duration(v, &join(&path, "stop_grace_period"))?),
            None => None,
        };
        let restart = match get(map, "restart") {
            Some(v) => Some(self.restart(v, &join(&path, "restart"))?),
            None => None,
        };
        let deploy = self.deploy(map, &path, restart)?;
        let network_mode = match get(map, "network_mode") {
            Some(v) => {
                let p = join(&path, "network_mode");
                match self.string(v, &p)?.as_str() {
                    "host" => Some(NetworkMode::Host),
                    other => {
                        return Err(self.invalid(
                            &p,
                            other,
                            "unsupported network mode (Gantry supports host)",
                        ));
                    }
                }
            }
            None => None,
        };
        let depends_on = self.depends_on(map, &path)?;
        let service_networks =
            self.service_networks(map, &path, networks, network_mode.is_some())?;
        Ok(Service {
            image,
            command,
            entrypoint,
            environment,
            ports,
            volumes: mounts,
            healthcheck,
            user,
            working_dir,
            hostname,
            labels,
            stop_grace_period,
            deploy,
            network_mode,
            depends_on,
            networks: service_networks,
        })
    }

    /// A string is split into words as Compose does; a list is taken as is.
    fn command(&self, map: &Mapping, key: &str, path: &str) -> Result<Option<Vec<String>>> {
        let path = join(path, key);
        match get(map, key) {
            None => Ok(None),
            Some(Value::Sequence(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| self.string(v, &format!("{path}[{i}]")))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => {
                let text = self.string(v, &path)?;
                shell::split(&text)
                    .map(Some)
                    .map_err(|e| self.value_error(&path, e))
            }
        }
    }

    /// `env_file:` entries, then `environment:` over them. A key written
    /// without a value takes it from the environment (process, then
    /// `.env`); when it is unset there too the key is left out, as Compose
    /// does, with a warning.
    fn environment(&mut self, map: &Mapping, path: &str) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let mut entries = Vec::new();
        if let Some(value) = get(map, "env_file") {
            let file_path = join(path, "env_file");
            let files: Vec<(String, bool, String)> = match value {
                Value::Sequence(items) => items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.env_file_entry(item, &format!("{file_path}[{i}]")))
                    .collect::<Result<_>>()?,
                other => vec![self.env_file_entry(other, &file_path)?],
            };
            for (file, required, item_path) in files {
                let full = volumes::fold(&self.options.project_dir.join(&file));
                let text = match self.options.files.read(&full) {
                    Ok(text) => text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => continue,
                    Err(source) => {
                        return Err(ComposeError::Read {
                            pos: self.pos(&item_path),
                            key: item_path,
                            path: full,
                            source,
                        });
                    }
                };
                let lookup = |name: &str| self.lookup(name);
                let parsed =
                    env::parse(&text, &file, &lookup).map_err(|source| ComposeError::EnvFile {
                        pos: self.pos(&item_path),
                        path: item_path.clone(),
                        source,
                    })?;
                entries.extend(parsed.into_iter().map(|(k, v)| (k, v, item_path.clone())));
            }
        }
        if let Some(value) = get(map, "environment") {
            let env_path = join(path, "environment");
            let pairs = self.key_values(value, &env_path)?;
            entries.extend(pairs.into_iter().map(|(k, v)| (k, v, env_path.clone())));
        }
        for (key, value, item_path) in entries {
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(self.invalid(&item_path, key, "invalid environment variable name"));
            }
            match value.or_else(|| self.lookup(&key)) {
                Some(v) => {
                    out.insert(key, v);
                }
                None => {
                    out.remove(&key);
                    self.warn(&item_path, WarningKind::UnsetVariable { name: key });
                }
            }
        }
        Ok(out)
    }

    fn env_file_entry(&mut self, value: &Value, path: &str) -> Result<(String, bool, String)> {
        match value {
            Value::Mapping(m) => {
                self.check_keys(m, path, &["path", "required"], &["format"])?;
                let file = self
                    .opt_string(m, "path", path)?
                    .ok_or(ComposeError::MissingKey {
                        pos: self.pos(path),
                        path: path.to_string(),
                        key: "path",
                        hint: "",
                    })?;
                let required = match get(m, "required") {
                    Some(v) => self.bool(v, &join(path, "required"))?,
                    None => true,
                };
                Ok((file, required, path.to_string()))
            }
            other => Ok((self.string(other, path)?, true, path.to_string())),
        }
    }

    fn ports(&mut self, map: &Mapping, path: &str) -> Result<Vec<Port>> {
        let Some(value) = get(map, "ports") else {
            return Ok(Vec::new());
        };
        let path = join(path, "ports");
        let mut out = Vec::new();
        for (i, item) in self.sequence(value, &path)?.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            match item {
                Value::Mapping(m) => out.push(self.long_port(m, &item_path)?),
                other => {
                    let text = self.string(other, &item_path)?;
                    out.extend(
                        ports::parse_short(&text).map_err(|e| self.value_error(&item_path, e))?,
                    );
                }
            }
        }
        Ok(out)
    }

    fn long_port(&mut self, m: &Mapping, path: &str) -> Result<Port> {
        self.check_keys(
            m,
            path,
            &["target", "published", "protocol", "mode", "host_ip"],
            &["name", "app_protocol"],
        )?;
        let target_value = get(m, "target").ok_or(ComposeError::MissingKey {
            pos: self.pos(path),
            path: path.to_string(),
            key: "target",
            hint: "",
        })?;
        let target_path = join(path, "target");
        let target_text = self.string(target_value, &target_path)?;
        let target = ports::parse_range(&target_text, &target_text)
            .map_err(|e| self.value_error(&target_path, e))?;
        if target.start != target.end {
            return Err(self.invalid(&target_path, target_text, "a range needs the short syntax"));
        }
        let published = match get(m, "published") {
            Some(v) => {
                let p = join(path, "published");
                let text = self.string(v, &p)?;
                Some(ports::parse_range(&text, &text).map_err(|e| self.value_error(&p, e))?)
            }
            None => None,
        };
        let protocol = match self.opt_string(m, "protocol", path)? {
            Some(p) => ports::parse_protocol(&p, &p)
                .map_err(|e| self.value_error(&join(path, "protocol"), e))?,
            None => Protocol::Tcp,
        };
        let mode = match self.opt_string(m, "mode", path)?.as_deref() {
            None | Some("ingress") => PortMode::Ingress,
            Some("host") => PortMode::Host,
            Some(other) => {
                return Err(self.invalid(&join(path, "mode"), other, "expected ingress or host"));
            }
        };
        let host_ip = match self.opt_string(m, "host_ip", path)? {
            Some(ip) => Some(
                ip.parse()
                    .map_err(|_| self.invalid(&join(path, "host_ip"), ip, "not an IP address"))?,
            ),
            None => None,
        };
        Ok(Port {
            target: target.start,
            published,
            protocol,
            mode,
            host_ip,
        })
    }

    fn mounts(
        &mut self,
        map: &Mapping,
        path: &str,
        declared: &BTreeMap<String, VolumeSpec>,
    ) -> Result<Vec<Mount>> {
        let Some(value) = get(map, "volumes") else {
            return Ok(Vec::new());
        };
        let path = join(path, "volumes");
        let home = self.lookup("HOME");
        let mut out = Vec::new();
        for (i, item) in self.sequence(value, &path)?.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let mount = match item {
                Value::Mapping(m) => self.long_mount(m, &item_path, home.as_deref())?,
                other => {
                    let text = self.string(other, &item_path)?;
                    volumes::parse_short(&text, self.options.project_dir, home.as_deref())
                        .map_err(|e| self.value_error(&item_path, e))?
                }
            };
            if mount.kind == MountKind::Volume
                && let Some(name) = &mount.source
                && !declared.contains_key(name)
            {
                return Err(ComposeError::UndefinedVolume {
                    pos: self.pos(&item_path),
                    path: item_path,
                    name: name.clone(),
                });
            }
            out.push(mount);
        }
        Ok(out)
    }

    fn long_mount(&mut self, m: &Mapping, path: &str, home: Option<&str>) -> Result<Mount> {
        self.check_keys(
            m,
            path,
            &["type", "source", "target", "read_only", "tmpfs"],
            &["bind", "volume", "consistency", "image"],
        )?;
        let missing = |key| ComposeError::MissingKey {
            pos: self.pos(path),
            path: path.to_string(),
            key,
            hint: "",
        };
        let kind = match self.opt_string(m, "type", path)?.as_deref() {
            Some("volume") => MountKind::Volume,
            Some("bind") => MountKind::Bind,
            Some("tmpfs") => MountKind::Tmpfs,
            Some(other) => {
                return Err(self.invalid(
                    &join(path, "type"),
                    other,
                    "expected volume, bind or tmpfs",
                ));
            }
            None => return Err(missing("type")),
        };
        let target = self
            .opt_string(m, "target", path)?
            .ok_or_else(|| missing("target"))?;
        volumes::check_target(&target, &target)
            .map_err(|e| self.value_error(&join(path, "target"), e))?;
        let source = self
            .opt_string(m, "source", path)?
            .filter(|s| !s.is_empty());
        let source = match (kind, source) {
            (MountKind::Bind, None) => return Err(missing("source")),
            (MountKind::Bind, Some(s)) => Some(
                volumes::resolve_bind_source(&s, self.options.project_dir, home, &s)
                    .map_err(|e| self.value_error(&join(path, "source"), e))?,
            ),
            (MountKind::Tmpfs, Some(_)) => {
                return Err(self.conflict(&join(path, "source"), "a tmpfs mount has no source"));
            }
            (_, s) => s,
        };
        let read_only = match get(m, "read_only") {
            Some(v) => self.bool(v, &join(path, "read_only"))?,
            None => false,
        };
        let tmpfs = match get(m, "tmpfs") {
            Some(v) => {
                let p = join(path, "tmpfs");
                if kind != MountKind::Tmpfs {
                    return Err(self.conflict(&p, "tmpfs options need type: tmpfs"));
                }
                let t = self.mapping(v, &p)?;
                self.check_keys(t, &p, &["size"], &["mode"])?;
                let size = match get(t, "size") {
                    Some(v) => {
                        let sp = join(&p, "size");
                        let text = self.string(v, &sp)?;
                        Some(Bytes::parse(&text).map_err(|e| self.value_error(&sp, e))?)
                    }
                    None => None,
                };
                Some(TmpfsOptions { size })
            }
            None => None,
        };
        Ok(Mount {
            kind,
            source,
            target,
            read_only,
            tmpfs,
        })
    }

    /// Docker's defaults: interval 30s, timeout 30s, retries 3, start
    /// period 0s. A string test is `CMD-SHELL`; `disable: true` is
    /// `test: ["NONE"]`. Without `test` the image's check is kept and only
    /// its timings are overridden (an empty `test` list).
    fn healthcheck(&mut self, value: &Value, path: &str) -> Result<Healthcheck> {
        let m = self.mapping(value, path)?;
        self.check_keys(
            m,
            path,
            &[
                "test",
                "interval",
                "timeout",
                "retries",
                "start_period",
                "disable",
            ],
            &["start_interval"],
        )?;
        let test_path = join(path, "test");
        let mut test = match get(m, "test") {
            None => Vec::new(),
            Some(Value::Sequence(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| self.string(v, &format!("{test_path}[{i}]")))
                .collect::<Result<Vec<_>>>()?,
            Some(v) => {
                let text = self.string(v, &test_path)?;
                vec!["CMD-SHELL".to_string(), text]
            }
        };
        // Gantry's own probes, beyond Docker's: `["HTTP", PORT, PATH]` (a GET
        // from the node, healthy on 2xx/3xx) and `["TCP", PORT]` (a connect),
        // as Kubernetes' httpGet and tcpSocket probes: they need no shell or
        // wget in the image and cost no process per check.
        let port_ok = |p: &str| p.parse::<u16>().is_ok_and(|p| p > 0);
        match test.first().map(String::as_str) {
            None => {}
            Some("NONE") if test.len() == 1 => {}
            Some("CMD") if test.len() >= 2 => {}
            Some("CMD-SHELL") if test.len() == 2 => {}
            Some("HTTP") if test.len() == 3 && port_ok(&test[1]) && test[2].starts_with('/') => {}
            Some("TCP") if test.len() == 2 && port_ok(&test[1]) => {}
            Some(_) => {
                return Err(self.invalid(
                    &test_path,
                    format!("{test:?}"),
                    "expected [\"NONE\"], [\"CMD\", args...], [\"CMD-SHELL\", command], \
                     [\"HTTP\", port, \"/path\"] or [\"TCP\", port]",
                ));
            }
        }
        if let Some(v) = get(m, "disable")
            && self.bool(v, &join(path, "disable"))?
        {
            if !test.is_empty() && test != ["NONE"] {
                return Err(self.conflict(path, "disable: true and a test cannot be used together"));
            }
            test = vec!["NONE".to_string()];
        }
        Ok(Healthcheck {
            test,
            interval: self.opt_duration(m, "interval", path, Duration::from_secs(30))?,
            timeout: self.opt_duration(m, "timeout", path, Duration::from_secs(30))?,
            retries: match get(m, "retries") {
                Some(v) => self.u64(v, &join(path, "retries"))?,
                None => 3,
            },
            start_period: self.opt_duration(m, "start_period", path, Duration::default())?,
        })
    }

    /// The list form means `condition: service_started`.
    fn depends_on(&mut self, map: &Mapping, path: &str) -> Result<BTreeMap<String, Dependency>> {
        let Some(value) = get(map, "depends_on") else {
            return Ok(BTreeMap::new());
        };
        let path = join(path, "depends_on");
        let started = Dependency {
            condition: DependencyCondition::ServiceStarted,
            restart: false,
            required: true,
        };
        let mut entries = Vec::new();
        match value {
            Value::Sequence(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    entries.push((self.string(item, &p)?, started.clone(), p));
                }
            }
            Value::Mapping(m) => {
                for (key, spec) in m {
                    let name = self.string(key, &path)?;
                    let p = join(&path, &name);
                    let mut dep = started.clone();
                    if !spec.is_null() {
                        let sm = self.mapping(spec, &p)?;
                        self.check_keys(sm, &p, &["condition", "restart", "required"], &[])?;
                        dep.condition = match self.opt_string(sm, "condition", &p)?.as_deref() {
                            None | Some("service_started") => DependencyCondition::ServiceStarted,
                            Some("service_healthy") => DependencyCondition::ServiceHealthy,
                            Some("service_completed_successfully") => {
                                DependencyCondition::ServiceCompletedSuccessfully
                            }
                            Some(other) => {
                                return Err(self.invalid(
                                    &join(&p, "condition"),
                                    other,
                                    "expected service_started, service_healthy or service_completed_successfully",
                                ));
                            }
                        };
                        if let Some(v) = get(sm, "restart") {
                            dep.restart = self.bool(v, &join(&p, "restart"))?;
                        }
                        if let Some(v) = get(sm, "required") {
                            dep.required = self.bool(v, &join(&p, "required"))?;
                        }
                    }
                    entries.push((name, dep, p));
                }
            }
            other => return Err(self.type_error(&path, "a list or a mapping of services", other)),
        }
        let mut out = BTreeMap::new();
        for (name, dep, p) in entries {
            if self.service_names.contains(&name) {
                out.insert(name, dep);
            } else if dep.required {
                return Err(ComposeError::UnknownService {
                    pos: self.pos(&p),
                    hint: hint(&name, self.service_names.iter().map(String::as_str)),
                    path: p,
                    service: name,
                });
            } else {
                self.warn(&p, WarningKind::MissingOptionalDependency { service: name });
            }
        }
        Ok(out)
    }

    /// A service joins `default` unless it names networks or uses the host's
    /// network, as in Compose.
    fn service_networks(
        &mut self,
        map: &Mapping,
        path: &str,
        declared: &BTreeMap<String, NetworkSpec>,
        host: bool,
    ) -> Result<BTreeMap<String, ServiceNetwork>> {
        let path = join(path, "networks");
        let Some(value) = get(map, "networks") else {
            let mut out = BTreeMap::new();
            if !host {
                out.insert("default".to_string(), ServiceNetwork::default());
            }
            return Ok(out);
        };
        if host {
            return Err(self.conflict(&path, "networks cannot be used with network_mode: host"));
        }
        // Each entry keeps the path it was written at, for errors.
        let mut entries = Vec::new();
        match value {
            Value::Sequence(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    entries.push((self.string(item, &p)?, ServiceNetwork::default(), p));
                }
            }
            Value::Mapping(m) => {
                for (key, spec) in m {
                    let name = self.string(key, &path)?;
                    let p = join(&path, &name);
                    let mut network = ServiceNetwork::default();
                    if !spec.is_null() {
                        let sm = self.mapping(spec, &p)?;
                        self.check_keys(
                            sm,
                            &p,
                            &["aliases"],
                            &[
                                "ipv4_address",
                                "ipv6_address",
                                "link_local_ips",
                                "mac_address",
                                "priority",
                                "gw_priority",
                                "driver_opts",
                                "interface_name",
                            ],
                        )?;
                        if let Some(v) = get(sm, "aliases") {
                            let ap = join(&p, "aliases");
                            network.aliases = self
                                .sequence(v, &ap)?
                                .iter()
                                .enumerate()
                                .map(|(i, a)| self.string(a, &format!("{ap}[{i}]")))
                                .collect::<Result<_>>()?;
                        }
                    }
                    entries.push((name, network, p));
                }
            }
            other => return Err(self.type_error(&path, "a list or a mapping of networks", other)),
        }
        let mut out = BTreeMap::new();
        for (name, network, p) in entries {
            if name != "default" && !declared.contains_key(&name) {
                return Err(ComposeError::UndefinedNetwork {
                    pos: self.pos(&p),
                    path: p,
                    name,
                });
            }
            out.insert(name, network);
        }
        Ok(out)
    }

    /// `depends_on` has no cycle (names were checked where written).
    fn check_dependencies(&self, services: &BTreeMap<String, Service>) -> Result<()> {
        // Depth-first search with colours; the first back edge is the cycle.
        fn visit<'s>(
            name: &'s str,
            services: &'s BTreeMap<String, Service>,
            stack: &mut Vec<&'s str>,
            done: &mut BTreeSet<&'s str>,
        ) -> Option<String> {
            if let Some(at) = stack.iter().position(|s| *s == name) {
                let mut cycle: Vec<&str> = stack[at..].to_vec();
                cycle.push(name);
                return Some(cycle.join(" -> "));
            }
            if done.contains(name) {
                return None;
            }
            stack.push(name);
            if let Some(service) = services.get(name) {
                for dep in service.depends_on.keys() {
                    if let Some(cycle) = visit(dep, services, stack, done) {
                        return Some(cycle);
                    }
                }
            }
            stack.pop();
            done.insert(name);
            None
        }
        let mut done = BTreeSet::new();
        for name in services.keys() {
            if let Some(cycle) = visit(name, services, &mut Vec::new(), &mut done) {
                return Err(ComposeError::DependencyCycle { cycle });
            }
        }
        Ok(())
    }
}

/// A key's value, with `null` treated as absent (`command:` with nothing
/// after it means "not set" in Compose).
fn get<'m>(map: &'m Mapping, key: &str) -> Option<&'m Value> {
    map.get(key).filter(|v| !v.is_null())
}

/// A scalar as text: strings as is, numbers and booleans printed.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints() {
        assert_eq!(
            hint("replcas", ["replicas", "mode"]),
            " (did you mean `replicas`?)"
        );
        assert_eq!(
            hint("imag", SERVICE_KEYS.iter().copied()),
            " (did you mean `image`?)"
        );
        assert_eq!(hint("zzzzzz", ["replicas"]), "");
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
