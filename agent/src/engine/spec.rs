//! From an image and `docker run`-style overrides to an OCI runtime spec.
//!
//! [`build_spec`] is a pure function: everything it needs (the resolved user,
//! the host paths of volumes and of the `/etc` files the engine writes) is
//! resolved by the caller first, so the whole of Docker's merge logic is
//! tested here without root, images or a kernel.
//!
//! The spec follows what Docker (moby + containerd) generates:
//! - capabilities: Docker's 14 defaults in the bounding, effective and
//!   permitted sets, none inheritable or ambient;
//! - runc's masked and read-only `/proc` and `/sys` paths;
//! - the default mounts (`/proc`, `/dev`, `/dev/pts`, `/dev/shm`,
//!   `/dev/mqueue`, `/sys`, `/sys/fs/cgroup` read-only);
//! - rlimits: only `RLIMIT_NOFILE`, soft 1024 and hard 524288 (systemd's
//!   and Go's convention, which current Docker engines end up with), so that
//!   programs using `select(2)` keep working and servers can raise the limit;
//!   the hard limit is capped at what the engine itself may set;
//! - env: `PATH` default, `HOSTNAME`, the image's env, then the overrides
//!   (a bare `KEY` removes it), `HOME` from `/etc/passwd` when unset;
//! - `--entrypoint` resets the image's cmd; the hostname defaults to the
//!   short container id; cgroups path `gantry/<id>`;
//! - namespaces: pid, ipc, uts, mount, cgroup and network (new, host or
//!   joined). The cgroup namespace is private on every host (Docker's
//!   default on cgroup v2; on v1 Docker shares the host's).

use crate::engine::logs::LogConfig;
use crate::engine::user::ResolvedUser;
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The `PATH` a container gets when its image sets none (Docker's).
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's default capability set.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// runc's (and Docker's) masked paths.
pub const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// runc's (and Docker's) read-only paths.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The soft `RLIMIT_NOFILE` of a container.
pub const NOFILE_SOFT: u64 = 1024;
/// The hard `RLIMIT_NOFILE` of a container.
pub const NOFILE_HARD: u64 = 524288;

/// The CPU CFS period used to express `--cpus` (Docker's).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Errors of spec building and of parsing `docker run`-style flags.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Neither the image nor the overrides give a command to run.
    #[error("no command specified: the image has no entrypoint or cmd and none was given")]
    NoCommand,
    /// A field of the container config is invalid.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, e.g. `working_dir` or `mounts[1].destination`.
        field: String,
        /// Why it was refused.
        reason: String,
    },
    /// The generated spec does not deserialize (a bug in this module).
    #[error("generated spec is invalid: {0}")]
    Generated(#[source] serde_json::Error),
}

/// How a container is attached to the network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// A new, empty network namespace (only loopback), like `--network none`.
    #[default]
    None,
    /// The host's network namespace, like `--network host`.
    Host,
    /// Join the network namespace at this path (e.g. `/run/netns/x`).
    Join(PathBuf),
    /// A namespace of its own on the node's bridge (`gantry0`), with an
    /// address from the node's subnet, outbound NAT and published ports:
    /// Docker's default `bridge` network. The engine makes the namespace
    /// (see `crate::network`) and builds the spec as a [`NetworkMode::Join`].
    Bridge,
}

impl NetworkMode {
    /// Parses `--network`: `bridge`, `host`, `none` or a netns path.
    pub fn parse_flag(value: &str) -> Result<NetworkMode, SpecError> {
        match value {
            "bridge" => Ok(NetworkMode::Bridge),
            "host" => Ok(NetworkMode::Host),
            "none" => Ok(NetworkMode::None),
            path if path.starts_with('/') => Ok(NetworkMode::Join(PathBuf::from(path))),
            other => Err(SpecError::Invalid {
                field: "network".into(),
                reason: format!("{other:?} is not bridge, host, none or a netns path"),
            }),
        }
    }
}

/// The transport protocol of a published port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// TCP (the default, as in Docker).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// A container port published on the node (`-p [IP:]HOST:CONTAINER[/PROTO]`,
/// Compose `ports:`): traffic to the node's address (or `host_ip`) on
/// `host_port` is forwarded to the container's `container_port`. Swarm's
/// `mode: host` publishing; the routing mesh comes with the overlay.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublishedPort {
    /// Only this node address; every local address when unset.
    #[serde(default)]
    pub host_ip: Option<std::net::Ipv4Addr>,
    /// The port on the node.
    pub host_port: u16,
    /// The port inside the container.
    pub container_port: u16,
    /// TCP or UDP.
    #[serde(default)]
    pub protocol: PortProtocol,
}

impl PublishedPort {
    /// Parses a `-p` flag: `HOST:CONTAINER`, `IP:HOST:CONTAINER`, each with
    /// an optional `/tcp` or `/udp`. A bare `CONTAINER` (Docker picks a
    /// random host port) and port ranges are refused for now, by name.
    pub fn parse_publish_flag(flag: &str) -> Result<PublishedPort, SpecError> {
        let invalid = |reason: String| SpecError::Invalid {
            field: format!("publish {flag:?}"),
            reason,
        };
        let (spec, protocol) = match flag.rsplit_once('/') {
            Some((spec, "tcp")) => (spec, PortProtocol::Tcp),
            Some((spec, "udp")) => (spec, PortProtocol::Udp),
            Some((_, other)) => {
                return Err(invalid(format!("unknown protocol {other:?}: tcp or udp")));
            }
            None => (flag, PortProtocol::Tcp),
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (host_ip, host_port, container_port) = match parts.as_slice() {
            [host, container] => (None, *host, *container),
            [ip, host, container] => {
                let ip = if ip.is_empty() || *ip == "0.0.0.0" {
                    None
                } else {
                    Some(
                        ip.parse()
                            .map_err(|_| invalid(format!("{ip:?} is not an IPv4 address")))?,
                    )
                };
                (ip, *host, *container)
            }
            [_] => {
                return Err(invalid(
                    "a host port is required (HOST:CONTAINER); random host ports are not supported yet".into(),
                ));
            }
            _ => return Err(invalid("expected [IP:]HOST:CONTAINER[/tcp|udp]".into())),
        };
        let port = |p: &str, what: &str| -> Result<u16, SpecError> {
            if p.contains('-') {
                return Err(invalid(format!("{what} port ranges are not supported yet")));
            }
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(invalid(format!(
                    "{what} port {p:?} is not a number from 1 to 65535"
                ))),
            }
        };
        Ok(PublishedPort {
            host_ip,
            host_port: port(host_port, "host")?,
            container_port: port(container_port, "container")?,
            protocol,
        })
    }

    /// `IP:PORT/PROTO` on the host side, `0.0.0.0` for every address.
    pub fn host_display(&self) -> String {
        let ip = self
            .host_ip
            .map_or_else(|| "0.0.0.0".to_string(), |ip| ip.to_string());
        let proto = match self.protocol {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        };
        format!("{ip}:{}/{proto}", self.host_port)
    }
}

/// A mount asked for by the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MountConfig {
    /// A host path bind-mounted into the container (`-v /src:/dst[:ro]`).
    Bind {
        /// The host path; it must exist.
        source: PathBuf,
        /// The absolute path inside the container.
        destination: String,
        /// Mount read-only.
        read_only: bool,
    },
    /// A named volume (`-v name:/dst[:ro]`), created on first use.
    Volume {
        /// The volume name.
        name: String,
        /// The absolute path inside the container.
        destination: String,
        /// Mount read-only.
        read_only: bool,
    },
    /// A tmpfs (`--tmpfs /dst[:size=64m,mode=1777]`).
    Tmpfs {
        /// The absolute path inside the container.
        destination: String,
        /// Its size limit in bytes (the kernel's default, half of RAM, when unset).
        size: Option<u64>,
        /// Its permission bits, e.g. `0o1777`.
        mode: Option<u32>,
    },
}

impl MountConfig {
    /// The absolute path inside the container.
    pub fn destination(&self) -> &str {
        match self {
            MountConfig::Bind { destination, .. }
            | MountConfig::Volume { destination, .. }
            | MountConfig::Tmpfs { destination, .. } => destination,
        }
    }

    /// Parses `-v SRC:DST[:ro|rw]`: an absolute `SRC` is a bind mount, any
    /// other a volume name.
    pub fn parse_volume_flag(flag: &str) -> Result<MountConfig, SpecError> {
        let invalid = |reason: &str| SpecError::Invalid {
            field: format!("volume {flag:?}"),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = flag.split(':').collect();
        let (source, destination, read_only) = match parts.as_slice() {
            [source, destination] => (*source, *destination, false),
            [source, destination, "ro"] => (*source, *destination, true),
            [source, destination, "rw"] => (*source, *destination, false),
            [_, _, mode] => return Err(invalid(&format!("unknown mode {mode:?} (ro or rw)"))),
            _ => return Err(invalid("expected SRC:DST[:ro]")),
        };
        if source.is_empty() {
            return Err(invalid("empty source"));
        }
        check_destination(destination, &format!("volume {flag:?}"))?;
        if source.starts_with('/') {
            Ok(MountConfig::Bind {
                source: PathBuf::from(source),
                destination: destination.to_string(),
                read_only,
            })
        } else {
            crate::engine::volumes::validate_name(source).map_err(|e| invalid(&e.to_string()))?;
            Ok(MountConfig::Volume {
                name: source.to_string(),
                destination: destination.to_string(),
                read_only,
            })
        }
    }

    /// Parses `--tmpfs DST[:size=64m,mode=1777]`.
    pub fn parse_tmpfs_flag(flag: &str) -> Result<MountConfig, SpecError> {
        let field = format!("tmpfs {flag:?}");
        let (destination, options) = match flag.split_once(':') {
            Some((d, o)) => (d, o),
            None => (flag, ""),
        };
        check_destination(destination, &field)?;
        let mut size = None;
        let mut mode = None;
        for option in options.split(',').filter(|o| !o.is_empty()) {
            match option.split_once('=') {
                Some(("size", value)) => size = Some(parse_size(value)?),
                Some(("mode", value)) => {
                    mode = Some(
                        u32::from_str_radix(value, 8).map_err(|_| SpecError::Invalid {
                            field: field.clone(),
                            reason: format!("mode {value:?} is not octal"),
                        })?,
                    )
                }
                _ => {
                    return Err(SpecError::Invalid {
                        field,
                        reason: format!("unknown option {option:?} (size=, mode=)"),
                    });
                }
            }
        }
        Ok(MountConfig::Tmpfs {
            destination: destination.to_string(),
            size,
            mode,
        })
    }
}

/// Resource limits (`-m`, `--cpus`, `--cpu-shares`, `--pids-limit`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResourceConfig {
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a CPU (`--cpus 0.5` is 500).
    pub millicpus: Option<u64>,
    /// Relative CPU weight (cgroup v1 `cpu.shares`).
    pub cpu_shares: Option<u64>,
    /// Maximum number of processes and threads.
    pub pids_limit: Option<i64>,
}

/// What a user asks for when creating a container: `docker run`'s options.
/// Unset fields take the image's values, then Docker's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ContainerConfig {
    /// The image reference, id or id prefix.
    pub image: String,
    /// A unique name; generated when unset.
    pub name: Option<String>,
    /// Replaces the image's cmd.
    pub command: Option<Vec<String>>,
    /// Replaces the image's entrypoint and resets its cmd (an empty list
    /// clears the entrypoint, like `--entrypoint ""`).
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE` entries added to the image's env; a bare `KEY` removes it.
    pub env: Vec<String>,
    /// The working directory (absolute); the image's or `/` when unset.
    pub working_dir: Option<String>,
    /// `name`, `uid`, `uid:gid` or `name:group`; the image's or root when unset.
    pub user: Option<String>,
    /// The hostname; the short container id when unset.
    pub hostname: Option<String>,
    /// Bind mounts, volumes and tmpfs mounts.
    pub mounts: Vec<MountConfig>,
    /// Resource limits.
    pub resources: ResourceConfig,
    /// The network namespace.
    pub network: NetworkMode,
    /// Ports published on the node (bridge networking only).
    pub ports: Vec<PublishedPort>,
    /// The address on the bridge, when allocated elsewhere (a cluster
    /// task's, by the controller); the local IPAM's otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
    /// Mount the root filesystem read-only.
    pub read_only: bool,
    /// Set `no_new_privileges` (off by default, as in Docker).
    pub no_new_privileges: bool,
    /// The signal that stops the container (e.g. `SIGTERM`, `15`); the
    /// image's or `SIGTERM` when unset.
    pub stop_signal: Option<String>,
    /// Seconds between the stop signal and SIGKILL; 10 when unset.
    pub stop_grace_secs: Option<u64>,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// Log rotation.
    pub log: LogConfig,
    /// Remove the container when it exits (`--rm`): its shim does it, so it
    /// happens even when nobody waits for the container.
    pub auto_remove: bool,
}

/// The host side of a mount, once volumes are resolved to directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedMount {
    /// Bind-mount `source` (a host path or a volume's `_data`).
    Bind {
        /// The host path.
        source: PathBuf,
        /// The absolute path inside the container.
        destination: String,
        /// Mount read-only.
        read_only: bool,
    },
    /// Mount a fresh tmpfs.
    Tmpfs {
        /// The absolute path inside the container.
        destination: String,
        /// Size limit in bytes.
        size: Option<u64>,
        /// Permission bits.
        mode: Option<u32>,
    },
}

impl ResolvedMount {
    fn destination(&self) -> &str {
        match self {
            ResolvedMount::Bind { destination, .. } | ResolvedMount::Tmpfs { destination, .. } => {
                destination
            }
        }
    }
}

/// The per-container files the engine writes and bind-mounts into `/etc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcFiles {
    /// Mounted at `/etc/hosts`.
    pub hosts: PathBuf,
    /// Mounted at `/etc/hostname`.
    pub hostname: PathBuf,
    /// Mounted at `/etc/resolv.conf`.
    pub resolv_conf: PathBuf,
}

/// Everything [`build_spec`] needs, resolved.
#[derive(Debug, Clone)]
pub struct SpecInputs<'a> {
    /// The full container id.
    pub id: &'a str,
    /// The image's configuration.
    pub image: &'a ImageConfiguration,
    /// The user's overrides.
    pub config: &'a ContainerConfig,
    /// The process's uid, gid and groups, resolved against the image.
    pub user: &'a ResolvedUser,
    /// The user's mounts with host sources resolved, in `config.mounts` order.
    pub mounts: &'a [ResolvedMount],
    /// The `/etc` files to bind-mount.
    pub etc: &'a EtcFiles,
    /// The highest hard `RLIMIT_NOFILE` the runtime may set: raising a hard
    /// limit needs `CAP_SYS_RESOURCE`, which the engine may lack, so the
    /// engine passes its own hard limit and [`NOFILE_HARD`] is capped at it.
    pub max_nofile: u64,
}

/// The hostname a container gets: the override, else the first 12
/// characters of its id (Docker's short id).
pub fn hostname_for(id: &str, config: &ContainerConfig) -> String {
    match &config.hostname {
        Some(h) if !h.is_empty() => h.clone(),
        _ => id.chars().take(12).collect(),
    }
}

/// The user string in effect: the override, else the image's.
pub fn user_for<'a>(image: &'a ImageConfiguration, config: &'a ContainerConfig) -> &'a str {
    match &config.user {
        Some(u) if !u.is_empty() => u,
        _ => image
            .config()
            .as_ref()
            .and_then(|c| c.user().as_deref())
            .unwrap_or(""),
    }
}

/// The stop signal in effect: the override, else the image's, else `SIGTERM`.
pub fn stop_signal_for(image: &ImageConfiguration, config: &ContainerConfig) -> String {
    config
        .stop_signal
        .clone()
        .or_else(|| {
            image
                .config()
                .as_ref()
                .and_then(|c| c.stop_signal().clone())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "SIGTERM".to_string())
}

/// The command line: Docker's entrypoint/cmd merge.
pub fn args_for(
    image: &ImageConfiguration,
    config: &ContainerConfig,
) -> Result<Vec<String>, SpecError> {
    let image_config = image.config().as_ref();
    let (entrypoint, cmd) = match &config.entrypoint {
        // An explicit entrypoint drops the image's cmd: it was written for
        // the image's entrypoint.
        Some(entrypoint) => (
            entrypoint.clone(),
            config.command.clone().unwrap_or_default(),
        ),
        None => (
            image_config
                .and_then(|c| c.entrypoint().clone())
                .unwrap_or_default(),
            config
                .command
                .clone()
                .or_else(|| image_config.and_then(|c| c.cmd().clone()))
                .unwrap_or_default(),
        ),
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(args)
}

/// The environment: Docker's order and override rules.
pub fn env_for(
    image: &ImageConfiguration,
    config: &ContainerConfig,
    hostname: &str,
    home: Option<&str>,
) -> Vec<String> {
    let mut env = vec![DEFAULT_PATH_ENV.to_string(), format!("HOSTNAME={hostname}")];
    let image_env = image
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default();
    for entry in image_env.iter().chain(config.env.iter()) {
        merge_env(&mut env, entry);
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!(
            "HOME={}",
            home.filter(|h| !h.is_empty()).unwrap_or("/")
        ));
    }
    env
}

/// `KEY=VALUE` replaces `KEY` in place or appends it; a bare `KEY` removes it.
pub fn merge_env(env: &mut Vec<String>, entry: &str) {
    let key = entry.split_once('=').map_or(entry, |(k, _)| k);
    let position = env
        .iter()
        .position(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key);
    match (entry.contains('='), position) {
        (true, Some(i)) => env[i] = entry.to_string(),
        (true, None) => env.push(entry.to_string()),
        (false, Some(i)) => {
            env.remove(i);
        }
        (false, None) => {}
    }
}

/// The working directory: the override, else the image's, else `/`.
pub fn cwd_for(image: &ImageConfiguration, config: &ContainerConfig) -> Result<String, SpecError> {
    let cwd = config
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| {
            image
                .config()
                .as_ref()
                .and_then(|c| c.working_dir().clone())
        })
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".to_string());
    if !cwd.starts_with('/') {
        return Err(SpecError::Invalid {
            field: "working_dir".into(),
            reason: format!("{cwd:?} is not an absolute path"),
        });
    }
    Ok(cwd)
}

/// Builds the OCI runtime spec of a container.
pub fn build_spec(inputs: &SpecInputs<'_>) -> Result<Spec, SpecError> {
    let config = inputs.config;
    let hostname = hostname_for(inputs.id, config);
    let args = args_for(inputs.image, config)?;
    let env = env_for(inputs.image, config, &hostname, inputs.user.home.as_deref());
    let cwd = cwd_for(inputs.image, config)?;
    for (i, mount) in config.mounts.iter().enumerate() {
        check_destination(mount.destination(), &format!("mounts[{i}].destination"))?;
    }

    let caps: Vec<&str> = DEFAULT_CAPABILITIES.to_vec();
    let nofile_hard = NOFILE_HARD.min(inputs.max_nofile);
    let nofile_soft = NOFILE_SOFT.min(nofile_hard);
    let mut user = json!({ "uid": inputs.user.uid, "gid": inputs.user.gid });
    if !inputs.user.additional_gids.is_empty() {
        user["additionalGids"] = json!(inputs.user.additional_gids);
    }

    let mut mounts = default_mounts();
    let etc = inputs.etc;
    for (source, destination) in [
        (&etc.resolv_conf, "/etc/resolv.conf"),
        (&etc.hostname, "/etc/hostname"),
        (&etc.hosts, "/etc/hosts"),
    ] {
        mounts.push(bind_mount(source, destination, false));
    }
    // Parents before children, as Docker sorts them, so that a mount at
    // /a/b is not hidden by a later one at /a.
    let mut user_mounts: Vec<&ResolvedMount> = inputs.mounts.iter().collect();
    user_mounts.sort_by_key(|m| Path::new(m.destination()).components().count());
    for mount in user_mounts {
        mounts.push(match mount {
            ResolvedMount::Bind {
                source,
                destination,
                read_only,
            } => bind_mount(source, destination, *read_only),
            ResolvedMount::Tmpfs {
                destination,
                size,
                mode,
            } => {
                let mut options = vec!["nosuid".to_string(), "nodev".into(), "noexec".into()];
                if let Some(size) = size {
                    options.push(format!("size={size}"));
                }
                if let Some(mode) = mode {
                    options.push(format!("mode={mode:o}"));
                }
                json!({"destination": destination, "type": "tmpfs", "source": "tmpfs", "options": options})
            }
        });
    }

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
        // Private, so that /sys/fs/cgroup shows the container's own groups
        // (Docker's default on cgroup v2 hosts; on v1 Docker shares the
        // host's, which would expose every other group here).
        json!({"type": "cgroup"}),
    ];
    match &config.network {
        NetworkMode::None => namespaces.push(json!({"type": "network"})),
        NetworkMode::Host => {}
        NetworkMode::Join(path) => namespaces.push(json!({"type": "network", "path": path})),
        NetworkMode::Bridge => {
            // The engine attaches first and passes the namespace as a Join.
            return Err(SpecError::Invalid {
                field: "network".into(),
                reason: "bridge networking needs the namespace the engine makes".into(),
            });
        }
    }

    let spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": user,
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": nofile_soft, "hard": nofile_hard}],
            "noNewPrivileges": config.no_new_privileges,
            "oomScoreAdj": 0,
        },
        "root": {"path": "rootfs", "readonly": config.read_only},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": format!("gantry/{}", inputs.id),
            "resources": resources(&config.resources),
            "namespaces": namespaces,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    });
    serde_json::from_value(spec).map_err(SpecError::Generated)
}

fn bind_mount(source: &Path, destination: &str, read_only: bool) -> Value {
    json!({
        "destination": destination,
        "type": "bind",
        "source": source,
        "options": ["rbind", "rprivate", if read_only { "ro" } else { "rw" }],
    })
}

fn default_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["ro", "nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
    ]
}

/// Docker's device cgroup rules: deny all, then the usual character devices
/// and `mknod` of any device (creating one is harmless, opening it is not).
fn device_rules() -> Vec<Value> {
    let mut rules = vec![json!({"allow": false, "access": "rwm"})];
    rules.push(json!({"allow": true, "type": "c", "access": "m"}));
    rules.push(json!({"allow": true, "type": "b", "access": "m"}));
    for (major, minor) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
        (10, 200),
    ] {
        rules.push(
            json!({"allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm"}),
        );
    }
    rules.push(json!({"allow": true, "type": "c", "major": 136, "access": "rwm"}));
    rules
}

fn resources(r: &ResourceConfig) -> Value {
    let mut resources = json!({ "devices": device_rules() });
    if let Some(limit) = r.memory_bytes {
        resources["memory"] = json!({ "limit": limit });
    }
    let mut cpu = serde_json::Map::new();
    if let Some(shares) = r.cpu_shares {
        cpu.insert("shares".into(), json!(shares));
    }
    if let Some(millicpus) = r.millicpus {
        cpu.insert("quota".into(), json!(millicpus * CPU_PERIOD_US / 1000));
        cpu.insert("period".into(), json!(CPU_PERIOD_US));
    }
    if !cpu.is_empty() {
        resources["cpu"] = Value::Object(cpu);
    }
    if let Some(limit) = r.pids_limit {
        resources["pids"] = json!({ "limit": limit });
    }
    resources
}

fn check_destination(destination: &str, field: &str) -> Result<(), SpecError> {
    if !destination.starts_with('/') {
        return Err(SpecError::Invalid {
            field: field.to_string(),
            reason: format!("destination {destination:?} is not an absolute path"),
        });
    }
    if destination == "/"
        || Path::new(destination)
            .components()
            .any(|c| c.as_os_str() == "..")
    {
        return Err(SpecError::Invalid {
            field: field.to_string(),
            reason: format!("destination {destination:?} may not be / or contain .."),
        });
    }
    Ok(())
}

/// Parses a size like Docker's `-m`: `1024`, `64k`, `64m`, `1g` (binary units,
/// optional trailing `b`).
pub fn parse_size(value: &str) -> Result<u64, SpecError> {
    let invalid = || SpecError::Invalid {
        field: "size".into(),
        reason: format!("{value:?} is not a size like 64m"),
    };
    let lower = value.trim().to_ascii_lowercase();
    let trimmed = lower.strip_suffix('b').unwrap_or(&lower);
    let (digits, multiplier) = match trimmed.chars().last() {
        Some('k') => (&trimmed[..trimmed.len() - 1], 1u64 << 10),
        Some('m') => (&trimmed[..trimmed.len() - 1], 1 << 20),
        Some('g') => (&trimmed[..trimmed.len() - 1], 1 << 30),
        Some('t') => (&trimmed[..trimmed.len() - 1], 1 << 40),
        _ => (trimmed, 1),
    };
    let number: f64 = digits.parse().map_err(|_| invalid())?;
    if !number.is_finite() || number < 0.0 {
        return Err(invalid());
    }
    Ok((number * multiplier as f64) as u64)
}

/// Parses `--cpus 0.5` into thousandths of a CPU.
pub fn parse_cpus(value: &str) -> Result<u64, SpecError> {
    let invalid = || SpecError::Invalid {
        field: "cpus".into(),
        reason: format!("{value:?} is not a positive number of CPUs like 0.5"),
    };
    let cpus: f64 = value.trim().parse().map_err(|_| invalid())?;
    if !cpus.is_finite() || cpus <= 0.0 {
        return Err(invalid());
    }
    let millicpus = (cpus * 1000.0).round() as u64;
    if millicpus == 0 {
        return Err(invalid());
    }
    Ok(millicpus)
}

/// Parses a signal as Docker does: `SIGTERM`, `TERM`, `term` or `15`.
pub fn parse_signal(value: &str) -> Result<nix::sys::signal::Signal, SpecError> {
    use nix::sys::signal::Signal;
    use std::str::FromStr;
    let invalid = || SpecError::Invalid {
        field: "signal".into(),
        reason: format!("{value:?} is not a signal name or number"),
    };
    if let Ok(number) = value.parse::<i32>() {
        return Signal::try_from(number).map_err(|_| invalid());
    }
    let upper = value.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {

    #[test]
    fn publish_flags_parse_like_docker() {
        let p = PublishedPort::parse_publish_flag("8080:80").unwrap();
        assert_eq!(
            p,
            PublishedPort {
                host_ip: None,
                host_port: 8080,
                container_port: 80,
                protocol: PortProtocol::Tcp
            }
        );
        assert_eq!(p.host_display(), "0.0.0.0:8080/tcp");
        let p = PublishedPort::parse_publish_flag("127.0.0.1:53:5353/udp").unwrap();
        assert_eq!(p.host_ip, Some(std::net::Ipv4Addr::LOCALHOST));
        assert_eq!(p.protocol, PortProtocol::Udp);
        assert_eq!(p.host_display(), "127.0.0.1:53/udp");
        assert_eq!(
            PublishedPort::parse_publish_flag("0.0.0.0:1:2")
                .unwrap()
                .host_ip,
            None
        );
        for bad in [
            "80",
            "80:0",
            "x:80",
            "8080:80/sctp",
            "1-2:1-2",
            "a.b:1:2",
            "1:2:3:4",
        ] {
            let err = PublishedPort::parse_publish_flag(bad).unwrap_err();
            assert!(err.to_string().contains(bad), "{bad}: {err}");
        }
        let json = serde_json::json!({"host_port": 1, "container_port": 2});
        let p: PublishedPort = serde_json::from_value(json).unwrap();
        assert_eq!((p.host_ip, p.protocol), (None, PortProtocol::Tcp));
    }

    #[test]
    fn network_flags_parse() {
        assert_eq!(
            NetworkMode::parse_flag("bridge").unwrap(),
            NetworkMode::Bridge
        );
        assert_eq!(NetworkMode::parse_flag("host").unwrap(), NetworkMode::Host);
        assert_eq!(NetworkMode::parse_flag("none").unwrap(), NetworkMode::None);
        assert_eq!(
            NetworkMode::parse_flag("/run/netns/x").unwrap(),
            NetworkMode::Join("/run/netns/x".into())
        );
        assert!(NetworkMode::parse_flag("overlay").is_err());
        assert_eq!(
            serde_json::to_value(NetworkMode::Bridge).unwrap(),
            serde_json::json!("bridge")
        );
        // The engine turns Bridge into a Join of the namespace it made; a
        // spec asked for Bridge directly is a bug, refused by name.
        let image = ImageConfiguration::default();
        let config = ContainerConfig {
            network: NetworkMode::Bridge,
            command: Some(vec!["true".into()]),
            ..ContainerConfig::default()
        };
        let user = ResolvedUser::default();
        let etc = EtcFiles {
            hosts: "/h".into(),
            hostname: "/n".into(),
            resolv_conf: "/r".into(),
        };
        let err = build_spec(&SpecInputs {
            id: "x",
            image: &image,
            config: &config,
            user: &user,
            mounts: &[],
            etc: &etc,
            max_nofile: NOFILE_HARD,
        })
        .unwrap_err();
        assert!(err.to_string().starts_with("invalid network:"), "{err}");
    }
    use super::*;

    fn image(json: Value) -> ImageConfiguration {
        let full = json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": json,
        });
        serde_json::from_value(full).unwrap()
    }

    fn root() -> ResolvedUser {
        ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            home: Some("/root".into()),
        }
    }

    fn etc() -> EtcFiles {
        EtcFiles {
            hosts: "/c/hosts".into(),
            hostname: "/c/hostname".into(),
            resolv_conf: "/c/resolv.conf".into(),
        }
    }

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn spec_of(
        image: &ImageConfiguration,
        config: &ContainerConfig,
        mounts: &[ResolvedMount],
    ) -> Spec {
        let user = root();
        let etc = etc();
        build_spec(&SpecInputs {
            id: ID,
            image,
            config,
            user: &user,
            mounts,
            etc: &etc,
            max_nofile: u64::MAX,
        })
        .unwrap()
    }

    fn spec_json(
        image: &ImageConfiguration,
        config: &ContainerConfig,
        mounts: &[ResolvedMount],
    ) -> Value {
        serde_json::to_value(spec_of(image, config, mounts)).unwrap()
    }

    #[test]
    fn busybox_defaults_match_docker() {
        let img = image(json!({"Cmd": ["sh"]}));
        let spec = spec_of(&img, &ContainerConfig::default(), &[]);
        let expected = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": ["sh"],
                "env": [DEFAULT_PATH_ENV, "HOSTNAME=0123456789ab", "HOME=/root"],
                "cwd": "/",
                "capabilities": {
                    "bounding": DEFAULT_CAPABILITIES,
                    "effective": DEFAULT_CAPABILITIES,
                    "permitted": DEFAULT_CAPABILITIES,
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 524288}],
                "noNewPrivileges": false,
                "oomScoreAdj": 0,
            },
            "root": {"path": "rootfs", "readonly": false},
            "hostname": "0123456789ab",
            "mounts": default_mounts().into_iter().chain([
                json!({"destination": "/etc/resolv.conf", "type": "bind", "source": "/c/resolv.conf", "options": ["rbind", "rprivate", "rw"]}),
                json!({"destination": "/etc/hostname", "type": "bind", "source": "/c/hostname", "options": ["rbind", "rprivate", "rw"]}),
                json!({"destination": "/etc/hosts", "type": "bind", "source": "/c/hosts", "options": ["rbind", "rprivate", "rw"]}),
            ]).collect::<Vec<_>>(),
            "linux": {
                "cgroupsPath": format!("gantry/{ID}"),
                "resources": {"devices": device_rules()},
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}, {"type": "network"}],
                "maskedPaths": MASKED_PATHS,
                "readonlyPaths": READONLY_PATHS,
            },
        });
        // Compared as Specs: capabilities are sets, whose JSON order varies.
        let expected: Spec = serde_json::from_value(expected).unwrap();
        assert_eq!(spec, expected);
    }

    #[test]
    fn nofile_is_capped_at_what_the_engine_may_set() {
        let img = image(json!({"Cmd": ["sh"]}));
        let (user, etc, config) = (root(), etc(), ContainerConfig::default());
        let spec = build_spec(&SpecInputs {
            id: ID,
            image: &img,
            config: &config,
            user: &user,
            mounts: &[],
            etc: &etc,
            max_nofile: 20000,
        })
        .unwrap();
        let spec = serde_json::to_value(spec).unwrap();
        assert_eq!(
            spec["process"]["rlimits"],
            json!([{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 20000}])
        );
    }

    #[test]
    fn entrypoint_override_resets_image_cmd() {
        let img = image(json!({"Entrypoint": ["/entry"], "Cmd": ["default"]}));
        let mut config = ContainerConfig::default();
        assert_eq!(args_for(&img, &config).unwrap(), ["/entry", "default"]);
        config.command = Some(vec!["other".into()]);
        assert_eq!(args_for(&img, &config).unwrap(), ["/entry", "other"]);
        config.command = None;
        config.entrypoint = Some(vec!["/bin/echo".into()]);
        assert_eq!(args_for(&img, &config).unwrap(), ["/bin/echo"]);
        config.entrypoint = Some(vec![]);
        config.command = Some(vec!["ls".into()]);
        assert_eq!(args_for(&img, &config).unwrap(), ["ls"]);
        config.command = None;
        assert!(matches!(args_for(&img, &config), Err(SpecError::NoCommand)));
    }

    #[test]
    fn env_merges_like_docker() {
        let img = image(json!({"Env": ["PATH=/app/bin:/bin", "A=image", "B=image"]}));
        let config = ContainerConfig {
            env: vec![
                "B=user".into(),
                "C=user".into(),
                "A".into(),
                "HOME=/h".into(),
            ],
            ..Default::default()
        };
        assert_eq!(
            env_for(&img, &config, "web", Some("/root")),
            [
                "PATH=/app/bin:/bin",
                "HOSTNAME=web",
                "B=user",
                "C=user",
                "HOME=/h"
            ]
        );
    }

    #[test]
    fn overrides_land_in_the_spec() {
        let img = image(json!({"Cmd": ["sh"], "WorkingDir": "/srv", "User": "nobody"}));
        let config = ContainerConfig {
            hostname: Some("web".into()),
            working_dir: Some("/tmp".into()),
            read_only: true,
            network: NetworkMode::Join("/run/netns/x".into()),
            resources: ResourceConfig {
                memory_bytes: Some(64 << 20),
                millicpus: Some(500),
                cpu_shares: Some(512),
                pids_limit: Some(100),
            },
            ..Default::default()
        };
        let mounts = [
            ResolvedMount::Bind {
                source: "/v/data/_data".into(),
                destination: "/data/sub".into(),
                read_only: true,
            },
            ResolvedMount::Tmpfs {
                destination: "/data".into(),
                size: Some(1 << 20),
                mode: Some(0o1777),
            },
        ];
        let spec = spec_json(&img, &config, &mounts);
        assert_eq!(spec["hostname"], "web");
        assert_eq!(spec["process"]["cwd"], "/tmp");
        assert_eq!(spec["root"]["readonly"], true);
        assert_eq!(
            spec["linux"]["namespaces"][5],
            json!({"type": "network", "path": "/run/netns/x"})
        );
        let resources = &spec["linux"]["resources"];
        assert_eq!(resources["memory"]["limit"], 64 << 20);
        assert_eq!(
            resources["cpu"],
            json!({"shares": 512, "quota": 50000, "period": 100000})
        );
        assert_eq!(resources["pids"]["limit"], 100);
        let mounts = spec["mounts"].as_array().unwrap();
        let n = mounts.len();
        assert_eq!(
            mounts[n - 2],
            json!({"destination": "/data", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "nodev", "noexec", "size=1048576", "mode=1777"]})
        );
        assert_eq!(
            mounts[n - 1],
            json!({"destination": "/data/sub", "type": "bind", "source": "/v/data/_data",
                   "options": ["rbind", "rprivate", "ro"]})
        );
        let host = ContainerConfig {
            network: NetworkMode::Host,
            ..Default::default()
        };
        let spec = spec_json(&img, &host, &[]);
        assert!(
            !spec["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|ns| ns["type"] == "network")
        );
    }

    #[test]
    fn relative_workdir_is_refused() {
        let img = image(json!({"Cmd": ["sh"]}));
        let config = ContainerConfig {
            working_dir: Some("srv".into()),
            ..Default::default()
        };
        let err = cwd_for(&img, &config).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid working_dir: \"srv\" is not an absolute path"
        );
    }

    #[test]
    fn volume_and_tmpfs_flags_parse() {
        assert_eq!(
            MountConfig::parse_volume_flag("/host:/c:ro").unwrap(),
            MountConfig::Bind {
                source: "/host".into(),
                destination: "/c".into(),
                read_only: true
            }
        );
        assert_eq!(
            MountConfig::parse_volume_flag("data:/data").unwrap(),
            MountConfig::Volume {
                name: "data".into(),
                destination: "/data".into(),
                read_only: false
            }
        );
        assert!(MountConfig::parse_volume_flag("data:rel").is_err());
        assert!(MountConfig::parse_volume_flag("-bad:/x").is_err());
        assert!(MountConfig::parse_volume_flag("a:/x:zz").is_err());
        assert_eq!(
            MountConfig::parse_tmpfs_flag("/run:size=64m,mode=1777").unwrap(),
            MountConfig::Tmpfs {
                destination: "/run".into(),
                size: Some(64 << 20),
                mode: Some(0o1777)
            }
        );
        assert!(MountConfig::parse_tmpfs_flag("/run:uid=1").is_err());
    }

    #[test]
    fn sizes_cpus_and_signals_parse() {
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512kb").unwrap(), 512 << 10);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_cpus("0.5").unwrap(), 500);
        assert!(parse_cpus("0").is_err());
        use nix::sys::signal::Signal;
        assert_eq!(parse_signal("SIGTERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("usr1").unwrap(), Signal::SIGUSR1);
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert!(parse_signal("NOPE").is_err());
    }
}
