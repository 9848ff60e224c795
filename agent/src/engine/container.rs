//! The [`Engine`]: containers on one node, Docker's lifecycle over the
//! image store, the volume store, the OCI runtime and one shim per
//! container.
//!
//! State lives in files, never only in memory, so any number of engine
//! processes (CLI invocations, the agent, an agent restarted after a crash)
//! see the same containers. `<data dir>/containers/<id>/` holds:
//! - `container.json`: the [`ContainerRecord`] (config, name, image, created);
//! - `config.json` and `rootfs/`: the OCI bundle (rootfs is the overlay
//!   mount, `upper/` and `work/` its writable side);
//! - `hosts`, `hostname`, `resolv.conf`: bind-mounted into `/etc`;
//! - `container.log*`: the json-file logs;
//! - `shim.json` while a shim owns the container, `exit.json` once it ended.
//!
//! A container's state is derived from those: no `shim.json` is Created;
//! a live shim (pid and start time match) is Running; an `exit.json` is
//! Exited; a dead shim without `exit.json` is Dead (the shim was killed, so
//! the exit is unknown), which `inspect` reports with an error message.
//! That is also the whole of re-attaching after an engine restart.
//!
//! Invariant: the engine never forks a container process itself; the shim
//! does. Only `exec` starts a process (a child of the caller), because the
//! caller owns its stdio.

use crate::engine::cgroups::{CgroupError, CgroupRoot, CgroupStats};
use crate::engine::logs::{LOG_FILE, LogEntry, LogError, LogOptions, read_logs, rfc3339_nano};
use crate::engine::rootfs::{self, RootfsError};
use crate::engine::runtime::{ExecOptions, ExecProcess, Runtime, RuntimeError};
use crate::engine::shim::{EXIT_FILE, ExitRecord, SHIM_STATE_FILE, ShimState, process_start_time};
use crate::engine::spec::{
    self, ContainerConfig, EtcFiles, MountConfig, NetworkMode, ResolvedMount, SpecError, SpecInputs,
};
use crate::engine::user::{self, UserError};
use crate::engine::volumes::{self, VolumeError, VolumeInfo, VolumeStore};
use crate::image::{ImageError, ImageStore};
use crate::network::{self, Attachment, NetworkConfig, NetworkError, PortBinding};
use crate::paths::DataDir;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

/// The record of a container, in its directory.
pub const RECORD_FILE: &str = "container.json";

/// The default grace period between the stop signal and SIGKILL (Docker's).
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// Container directories being removed are renamed to this prefix + id.
const TRASH_PREFIX: &str = ".removing-";

/// How long to wait for a shim to go after SIGKILL before giving up.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// No container matches the id, id prefix or name.
    #[error("no such container: {0}")]
    NotFound(String),
    /// The id prefix matches several containers.
    #[error("container id prefix {0} is ambiguous")]
    Ambiguous(String),
    /// The name is taken.
    #[error("container name {name} is already in use by container {id}")]
    NameInUse {
        /// The name asked for.
        name: String,
        /// The container that has it.
        id: String,
    },
    /// The name is not `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
    #[error("invalid container name {0:?}: it must match [a-zA-Z0-9][a-zA-Z0-9_.-]+")]
    InvalidName(String),
    /// The operation needs a stopped container.
    #[error("container {0} is running: stop it first or force the removal")]
    Running(String),
    /// The operation needs a running container.
    #[error("container {0} is not running")]
    NotRunning(String),
    /// The container's shim died without recording how the container ended.
    #[error("container {0} is dead: its shim exited without recording an exit status")]
    Dead(String),
    /// A bind mount's source does not exist.
    #[error("bind mount source path does not exist: {0}")]
    BindSourceMissing(PathBuf),
    /// The shim could not start the container.
    #[error("container {id}: shim: {message}")]
    Shim {
        /// The container id.
        id: String,
        /// What the shim reported.
        message: String,
    },
    /// Waiting for a container to stop timed out.
    #[error("container {0} did not stop within {1:?} after SIGKILL")]
    StopTimeout(String, Duration),
    /// A file of the engine could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// A record file is malformed.
    #[error("{path}: {source}")]
    Record {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        /// The call.
        call: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// The image store failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The container config is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The user could not be resolved.
    #[error(transparent)]
    User(#[from] UserError),
    /// A volume operation failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The rootfs could not be mounted or unmounted.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// The logs could not be read.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The OCI runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The cgroup could not be read.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Bridge networking could not be set up or torn down.
    #[error(transparent)]
    Network(#[from] NetworkError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ContainerError {
    let path = path.to_path_buf();
    move |source| ContainerError::Io { path, source }
}

fn sys(call: &'static str) -> impl FnOnce(nix::Error) -> ContainerError {
    move |source| ContainerError::Sys { call, source }
}

/// A container id: 64 lowercase hex digits, as Docker's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerId(String);

impl ContainerId {
    /// A new random id.
    pub fn generate() -> Result<ContainerId, ContainerError> {
        let mut bytes = [0u8; 32];
        let path = Path::new("/dev/urandom");
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(io(path))?;
        Ok(ContainerId(hex::encode(bytes)))
    }

    /// The full id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 digits, as `docker ps` shows.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ContainerId {
    type Err = ContainerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(ContainerId(s.to_string()))
        } else {
            Err(ContainerError::NotFound(s.to_string()))
        }
    }
}

impl TryFrom<String> for ContainerId {
    type Error = ContainerError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ContainerId> for String {
    fn from(id: ContainerId) -> String {
        id.0
    }
}

/// How an [`Engine`] is set up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The node's data directory.
    pub data_dir: DataDir,
    /// The `gantry` binary to run as `gantry shim` (the CLI passes
    /// `/proc/self/exe`, tests the binary they drive).
    pub shim_binary: PathBuf,
}

/// What the engine keeps about a container (`container.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// The id.
    pub id: ContainerId,
    /// The unique name.
    pub name: String,
    /// The image as the user named it.
    pub image: String,
    /// The image id (`sha256:…`).
    pub image_id: String,
    /// The config it was created with.
    pub config: ContainerConfig,
    /// The hostname it got.
    pub hostname: String,
    /// The stop signal in effect (config, image, or SIGTERM).
    pub stop_signal: String,
    /// When it was created, RFC 3339.
    pub created: String,
    /// Volumes made for the image's `VOLUME`s that no mount covered;
    /// removed with the container.
    #[serde(default)]
    pub anonymous_volumes: Vec<String>,
    /// The command line it runs (entrypoint and cmd merged).
    #[serde(default)]
    pub args: Vec<String>,
    /// Where it is attached, for bridge networking.
    #[serde(default)]
    pub network: Option<Attachment>,
}

/// A container's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    /// Created, never started.
    Created,
    /// Its shim and init are running.
    Running,
    /// It ended; `exit` says how.
    Exited,
    /// Its shim died without recording an exit.
    Dead,
}

impl fmt::Display for ContainerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContainerState::Created => "created",
            ContainerState::Running => "running",
            ContainerState::Exited => "exited",
            ContainerState::Dead => "dead",
        })
    }
}

/// A container as `ps` and `inspect` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerInfo {
    /// The id.
    pub id: ContainerId,
    /// The name.
    pub name: String,
    /// The image as named.
    pub image: String,
    /// The image id.
    pub image_id: String,
    /// The state.
    pub state: ContainerState,
    /// Docker-like status: `Up 3 seconds`, `Exited (0) 1 minute ago`, `Created`.
    pub status: String,
    /// The init's pid while running.
    pub pid: Option<i32>,
    /// The shim's pid while running.
    pub shim_pid: Option<i32>,
    /// The exit code once exited.
    pub exit_code: Option<i32>,
    /// The full exit record once exited.
    pub exit: Option<ExitRecord>,
    /// When it was created.
    pub created: String,
    /// When it last started.
    pub started_at: Option<String>,
    /// When it last ended.
    pub finished_at: Option<String>,
    /// How often it was restarted by a restart policy (not implemented yet: 0).
    pub restart_count: u32,
    /// What is wrong, for a dead container.
    pub error: Option<String>,
    /// The container directory.
    pub dir: PathBuf,
    /// The config it was created with.
    pub config: ContainerConfig,
    /// The command line it runs (entrypoint and cmd merged).
    pub args: Vec<String>,
    /// Resource usage from its cgroup, while running (filled by
    /// [`Engine::inspect`] only, to keep `list` cheap).
    pub stats: Option<CgroupStats>,
    /// Its bridge attachment (address, gateway, veth, netns), if any.
    pub network: Option<Attachment>,
}

/// What [`Engine::exec`] runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecConfig {
    /// The command and its arguments.
    pub command: Vec<String>,
    /// `KEY=VALUE` added to the container's env.
    pub env: Vec<String>,
    /// The user; the container's when unset.
    pub user: Option<String>,
    /// The working directory; the container's when unset.
    pub working_dir: Option<String>,
    /// Allocate a pseudo-terminal.
    pub tty: bool,
}

/// The containers of one node.
#[derive(Debug, Clone)]
pub struct Engine {
    data: DataDir,
    images: ImageStore,
    volumes: VolumeStore,
    runtime: Runtime,
    shim_binary: PathBuf,
}

impl Engine {
    /// Opens the engine of `config.data_dir`, creating its directories.
    pub fn open(config: EngineConfig) -> Result<Engine, ContainerError> {
        let data = config.data_dir;
        for dir in [data.containers(), data.volumes(), data.runtime_root()] {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        let engine = Engine {
            images: ImageStore::open(data.images())?,
            volumes: VolumeStore::new(data.volumes()),
            runtime: Runtime::new(data.runtime_root()),
            shim_binary: config.shim_binary,
            data,
        };
        engine.finish_removals();
        Ok(engine)
    }

    /// Deletes what removals interrupted by a crash left behind. Best
    /// effort: a failure here must not stop the engine from opening.
    fn finish_removals(&self) {
        let root = self.data.containers();
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with(TRASH_PREFIX) {
                continue;
            }
            let path = entry.path();
            if let Err(e) = rootfs::unmount(&path.join("rootfs")) {
                tracing::warn!("finishing the removal of {}: {e}", path.display());
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!("finishing the removal of {}: {e}", path.display());
            }
        }
    }

    /// The image store the engine uses.
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// The directory of container `id`.
    pub fn container_dir(&self, id: &ContainerId) -> PathBuf {
        self.data.containers().join(id.as_str())
    }

    /// Finds a container by full id, name or unique id prefix.
    pub fn resolve(&self, name_or_id: &str) -> Result<ContainerId, ContainerError> {
        let records = self.records()?;
        if let Some(r) = records
            .iter()
            .find(|r| r.id.as_str() == name_or_id || r.name == name_or_id)
        {
            return Ok(r.id.clone());
        }
        let name_or_id = name_or_id.strip_prefix('/').unwrap_or(name_or_id);
        if let Some(r) = records.iter().find(|r| r.name == name_or_id) {
            return Ok(r.id.clone());
        }
        let matches: Vec<_> = records
            .iter()
            .filter(|r| !name_or_id.is_empty() && r.id.as_str().starts_with(name_or_id))
            .collect();
        match matches.as_slice() {
            [one] => Ok(one.id.clone()),
            [] => Err(ContainerError::NotFound(name_or_id.to_string())),
            _ => Err(ContainerError::Ambiguous(name_or_id.to_string())),
        }
    }

    /// Creates a container: resolves and leases the image, prepares
    /// volumes, mounts the rootfs, writes the bundle. A failure leaves
    /// nothing behind (volumes created for it included).
    pub fn create(&self, config: &ContainerConfig) -> Result<ContainerId, ContainerError> {
        let _lock = self.lock()?;
        let records = self.records()?;
        let name = match &config.name {
            Some(name) => {
                validate_container_name(name)?;
                if let Some(other) = records.iter().find(|r| r.name == *name) {
                    return Err(ContainerError::NameInUse {
                        name: name.clone(),
                        id: other.id.to_string(),
                    });
                }
                name.clone()
            }
            None => generate_name(&records)?,
        };
        // Cheap checks first, before anything is made.
        for mount in &config.mounts {
            if let MountConfig::Bind { source, .. } = mount
                && !source.exists()
            {
                return Err(ContainerError::BindSourceMissing(source.clone()));
            }
        }
        check_ports(config)?;
        let image = self.images.resolve(&config.image)?;
        let image_config = self.images.config(&image)?;
        spec::args_for(&image_config, config)?;
        spec::cwd_for(&image_config, config)?;

        let id = ContainerId::generate()?;
        let dir = self.container_dir(&id);
        let mut undo = CreateUndo {
            engine: self,
            id: &id,
            dir: dir.clone(),
            leased: false,
            mounted: false,
            new_volumes: Vec::new(),
            network: false,
            done: false,
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        self.images.add_lease(id.as_str(), &image)?;
        undo.leased = true;

        let layers = self.images.layer_dirs(&image)?;
        let (upper, work, rootfs_dir) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
        for d in [&upper, &work, &rootfs_dir] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let layers = if layers.is_empty() {
            // overlayfs needs a lower directory; an image without layers gets an empty one.
            let empty = dir.join("empty");
            std::fs::create_dir_all(&empty).map_err(io(&empty))?;
            vec![empty]
        } else {
            layers
        };
        rootfs::mount_overlay(&layers, &upper, &work, &rootfs_dir)?;
        undo.mounted = true;

        let resolved_user =
            user::resolve_in_rootfs(&rootfs_dir, spec::user_for(&image_config, config))?;

        let mut mounts = Vec::new();
        for mount in &config.mounts {
            mounts.push(match mount {
                MountConfig::Bind {
                    source,
                    destination,
                    read_only,
                } => ResolvedMount::Bind {
                    source: source.clone(),
                    destination: destination.clone(),
                    read_only: *read_only,
                },
                MountConfig::Volume {
                    name,
                    destination,
                    read_only,
                } => {
                    if self.volumes.ensure(name)? {
                        undo.new_volumes.push(name.clone());
                    }
                    // As Docker: an empty volume gets the image's content at
                    // its mount point (a new one, or one made by `volume create`).
                    let data = self.volumes.data_dir(name);
                    if volumes::is_empty_dir(&data)? {
                        volumes::copy_up_from_rootfs(&rootfs_dir, destination, &data)?;
                    }
                    ResolvedMount::Bind {
                        source: self.volumes.data_dir(name),
                        destination: destination.clone(),
                        read_only: *read_only,
                    }
                }
                MountConfig::Tmpfs {
                    destination,
                    size,
                    mode,
                } => ResolvedMount::Tmpfs {
                    destination: destination.clone(),
                    size: *size,
                    mode: *mode,
                },
            });
        }

        // The image's VOLUMEs that no mount covers get an anonymous volume,
        // as in Docker, so that their data lives outside the container's
        // upper dir.
        let mut anonymous_volumes = Vec::new();
        let mut declared = image_config
            .config()
            .as_ref()
            .and_then(|c| c.volumes().clone())
            .unwrap_or_default();
        declared.sort();
        for destination in declared {
            let destination = format!("/{}", destination.trim_matches('/'));
            if destination == "/"
                || config
                    .mounts
                    .iter()
                    .any(|m| m.destination().trim_end_matches('/') == destination)
            {
                continue;
            }
            let name = ContainerId::generate()?.to_string();
            self.volumes.ensure(&name)?;
            undo.new_volumes.push(name.clone());
            let data = self.volumes.data_dir(&name);
            volumes::copy_up_from_rootfs(&rootfs_dir, &destination, &data)?;
            mounts.push(ResolvedMount::Bind {
                source: data,
                destination,
                read_only: false,
            });
            anonymous_volumes.push(name);
        }

        let mut config = config.clone();
        config.name = Some(name.clone());
        if config.network == NetworkMode::Host && config.hostname.is_none() {
            // Docker: a container on the host's network has the host's name.
            config.hostname = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok());
        }
        let hostname = spec::hostname_for(id.as_str(), &config);
        // Last of the steps that can fail for reasons of the host, so that
        // a failure before it has no network to undo.
        // Read at each create, not once at open: on a cluster node the
        // agent's overlay writes the node's subnet and MTU there when the
        // controller first says them.
        let net = self.network_config()?;
        let attachment = if config.network == NetworkMode::Bridge {
            undo.network = true;
            Some(network::attach(
                &self.data,
                &net,
                id.as_str(),
                config.address,
            )?)
        } else {
            None
        };
        // A cluster task asks the node's DNS responder (the bridge's
        // gateway) for names; anything else keeps the host's resolvers.
        let dns = match (&attachment, net.cluster_cidr, config.address) {
            (Some(a), Some(_), Some(_)) => Some(a.gateway),
            _ => None,
        };
        let etc =
            self.write_etc_files(&dir, &hostname, &config.network, attachment.as_ref(), dns)?;
        // The runtime joins the namespace the engine made.
        let spec_config = match &attachment {
            Some(a) => ContainerConfig {
                network: NetworkMode::Join(a.netns.clone()),
                ..config.clone()
            },
            None => config.clone(),
        };
        let oci = spec::build_spec(&SpecInputs {
            id: id.as_str(),
            image: &image_config,
            config: &spec_config,
            user: &resolved_user,
            mounts: &mounts,
            etc: &etc,
            max_nofile: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(_, hard)| hard)
                .unwrap_or(spec::NOFILE_SOFT),
        })?;
        let spec_path = dir.join("config.json");
        let spec_json =
            serde_json::to_vec_pretty(&oci).map_err(|source| ContainerError::Record {
                path: spec_path.clone(),
                source,
            })?;
        std::fs::write(&spec_path, spec_json).map_err(io(&spec_path))?;

        let record = ContainerRecord {
            id: id.clone(),
            name,
            image: config.image.clone(),
            image_id: image.id.clone(),
            stop_signal: spec::stop_signal_for(&image_config, &config),
            hostname,
            config,
            created: rfc3339_nano(SystemTime::now()),
            anonymous_volumes,
            args: oci
                .process()
                .as_ref()
                .and_then(|p| p.args().clone())
                .unwrap_or_default(),
            network: attachment,
        };
        let record_path = dir.join(RECORD_FILE);
        crate::engine::shim::write_json_atomic(&record_path, &record).map_err(io(&record_path))?;
        undo.done = true;
        drop(undo);
        Ok(id)
    }

    fn write_etc_files(
        &self,
        dir: &Path,
        hostname: &str,
        network: &NetworkMode,
        attachment: Option<&Attachment>,
        dns: Option<std::net::Ipv4Addr>,
    ) -> Result<EtcFiles, ContainerError> {
        let etc = EtcFiles {
            hosts: dir.join("hosts"),
            hostname: dir.join("hostname"),
            resolv_conf: dir.join("resolv.conf"),
        };
        // Docker's: a bridged container's own name resolves to its address;
        // without one, to 127.0.1.1 (Debian's convention).
        let own = attachment.map_or_else(|| "127.0.1.1".to_string(), |a| a.ip.to_string());
        let hosts = match network {
            NetworkMode::Host => std::fs::read_to_string("/etc/hosts").unwrap_or_default(),
            _ => format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
                 fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\n\
                 ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n{own}\t{hostname}\n"
            ),
        };
        std::fs::write(&etc.hosts, hosts).map_err(io(&etc.hosts))?;
        std::fs::write(&etc.hostname, format!("{hostname}\n")).map_err(io(&etc.hostname))?;
        // A cluster task: the node's responder, which answers service names
        // on the task's networks and forwards the rest to the host's
        // resolvers (no search domain: bare service names are answered as
        // they are, as Swarm does). Otherwise the host's resolver config.
        let resolv = match dns {
            Some(server) => format!("nameserver {server}\noptions ndots:0\n"),
            None => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        };
        std::fs::write(&etc.resolv_conf, resolv).map_err(io(&etc.resolv_conf))?;
        Ok(etc)
    }

    /// Starts a created or exited container: its shim creates and starts it.
    pub fn start(&self, id: &ContainerId) -> Result<(), ContainerError> {
        // Two concurrent starts must not both spawn a shim.
        let _lock = self.lock()?;
        let record = self.record(id)?;
        let dir = self.container_dir(id);
        match self.state_of(id)?.0 {
            ContainerState::Running => return Ok(()),
            ContainerState::Dead => {
                // The runtime may still hold the dead shim's container.
                let _ = self.runtime.delete(id.as_str(), true);
            }
            ContainerState::Created | ContainerState::Exited => {}
        }
        for file in [EXIT_FILE, SHIM_STATE_FILE] {
            let path = dir.join(file);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        // After a reboot the overlay is gone: mount it again.
        let rootfs_dir = dir.join("rootfs");
        if !rootfs::is_mounted(&rootfs_dir) {
            let image = self.images.resolve(&record.image_id)?;
            let layers = self.images.layer_dirs(&image)?;
            rootfs::mount_overlay(&layers, &dir.join("upper"), &dir.join("work"), &rootfs_dir)?;
        }
        // So is the network namespace; and a published port taken by a
        // running container fails the start, as in Docker, before anything runs.
        let bridged = record.network.is_some();
        if let Some(attachment) = &record.network {
            network::check_conflicts(&self.port_bindings(Some(id))?)?;
            network::ensure_attached(&self.data, attachment, None)?;
            // Published before the process runs (as Docker does), so a server
            // is reachable as soon as it listens and a failure here starts
            // nothing. Also without ports: the same table holds the outbound
            // NAT, and the sync turns forwarding on.
            self.publish(Some(id), None)?;
        }
        let output = std::process::Command::new(&self.shim_binary)
            .arg("shim")
            .arg("--id")
            .arg(id.as_str())
            .arg("--bundle")
            .arg(&dir)
            .arg("--runtime-root")
            .arg(self.runtime.root())
            .arg("--log-max-size")
            .arg(record.config.log.max_size.to_string())
            .arg("--log-max-files")
            .arg(record.config.log.max_files.to_string())
            .args(
                record
                    .config
                    .auto_remove
                    .then(|| {
                        [
                            "--remove-from".into(),
                            self.data.root().as_os_str().to_owned(),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(io(&self.shim_binary))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().next().unwrap_or("");
        if line.starts_with("ready ") {
            return Ok(());
        }
        let message = match line.strip_prefix("error ") {
            Some(m) => m.to_string(),
            None => format!(
                "exited with {} without reporting: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        };
        let publishes = bridged && !record.config.ports.is_empty();
        if publishes && let Err(e) = self.publish(None, None) {
            // The shim's error is the one the caller must see.
            tracing::warn!(%id, "unpublishing the ports of a failed start: {e}");
        }
        Err(ContainerError::Shim {
            id: id.to_string(),
            message,
        })
    }

    /// Creates and starts a container.
    pub fn run(&self, config: &ContainerConfig) -> Result<ContainerId, ContainerError> {
        let id = self.create(config)?;
        self.start(&id)?;
        Ok(id)
    }

    /// Every container, oldest first.
    pub fn list(&self) -> Result<Vec<ContainerInfo>, ContainerError> {
        let mut infos = Vec::new();
        for record in self.records()? {
            infos.push(self.info(record)?);
        }
        infos.sort_by(|a, b| a.created.cmp(&b.created));
        Ok(infos)
    }

    /// One container's details.
    pub fn inspect(&self, id: &ContainerId) -> Result<ContainerInfo, ContainerError> {
        let record = self.record(id)?;
        let mut info = self.info(record)?;
        if info.state == ContainerState::Running {
            // The container may stop meanwhile: no stats is not an error.
            info.stats = self.stats(id).ok();
        }
        Ok(info)
    }

    /// Resource usage from the container's cgroup (running containers only).
    pub fn stats(&self, id: &ContainerId) -> Result<CgroupStats, ContainerError> {
        if self.state_of(id)?.0 != ContainerState::Running {
            return Err(ContainerError::NotRunning(id.to_string()));
        }
        let root = CgroupRoot::detect()?;
        let cgroup = crate::engine::cgroups::Cgroup::open(&root, &cgroup_path(id))?;
        Ok(cgroup.stats()?)
    }

    /// Sends `signal` to the container's init.
    pub fn kill(&self, id: &ContainerId, signal: Signal) -> Result<(), ContainerError> {
        if self.state_of(id)?.0 != ContainerState::Running {
            return Err(ContainerError::NotRunning(id.to_string()));
        }
        Ok(self.runtime.kill(id.as_str(), signal, false)?)
    }

    /// Stops a container: its stop signal, then SIGKILL to all its processes
    /// after `grace` (the container's, else 10 s). Returns once the shim
    /// recorded the exit. A stopped container is left as it is.
    pub fn stop(&self, id: &ContainerId, grace: Option<Duration>) -> Result<(), ContainerError> {
        let record = self.record(id)?;
        let Some(pidfd) = self.shim_pidfd(id)? else {
            return Ok(());
        };
        let grace = grace
            .or(record.config.stop_grace_secs.map(Duration::from_secs))
            .unwrap_or(DEFAULT_STOP_GRACE);
        let signal = spec::parse_signal(&record.stop_signal).unwrap_or(Signal::SIGTERM);
        // The container may end between our look and the signal: that is a stop.
        let _ = self.runtime.kill(id.as_str(), signal, false);
        let stopped = wait_fd_readable(&pidfd, Some(grace))? || {
            let _ = self.runtime.kill(id.as_str(), Signal::SIGKILL, true);
            wait_fd_readable(&pidfd, Some(KILL_WAIT))?
        };
        if !stopped {
            return Err(ContainerError::StopTimeout(id.to_string(), KILL_WAIT));
        }
        // A stopped container publishes nothing (its address stays leased).
        if !record.config.ports.is_empty() && record.network.is_some() {
            let _lock = self.lock()?;
            self.publish(None, None)?;
        }
        Ok(())
    }

    /// Rebuilds the node's network state from the containers' records, for
    /// the agent to call when it starts: the namespace and veth of every
    /// running bridged container (recreated after a reboot) and the
    /// `ip gantry` table, which then holds exactly the running containers'
    /// published ports, whatever a crash left there. Does nothing on a node
    /// where no container ever used the bridge.
    pub fn restore_network(&self) -> Result<(), ContainerError> {
        let _lock = self.lock()?;
        let records = self.records()?;
        if !records.iter().any(|r| r.network.is_some())
            && !network::network_dir(&self.data).exists()
        {
            return Ok(());
        }
        let mut veths = Vec::new();
        for record in &records {
            if let Some(a) = &record.network
                && let (ContainerState::Running, Some(shim)) = self.state_of(&record.id)?
            {
                network::ensure_attached(&self.data, a, Some(shim.init_pid))?;
                veths.push(a.host_veth.as_str());
            }
        }
        // A veth made by an older agent may have hairpin mode off: a
        // container would then fail to reach itself through a VIP or its
        // own published port.
        network::link::set_hairpin(&veths)?;
        // Always: after a reboot or a hand edit the kernel's table may not be
        // the one this data dir last loaded.
        self.publish_with(None, None, network::Sync::Always)
    }

    /// The published ports of running bridged containers, plus those of
    /// `starting` (listed last, so that a conflict names the other one).
    fn port_bindings(
        &self,
        starting: Option<&ContainerId>,
    ) -> Result<Vec<PortBinding>, ContainerError> {
        let mut records = self.records()?;
        records.sort_by_key(|r| Some(&r.id) == starting);
        let mut bindings = Vec::new();
        for record in records {
            let Some(attachment) = &record.network else {
                continue;
            };
            if record.config.ports.is_empty() {
                continue;
            }
            if Some(&record.id) != starting
                && self.state_of(&record.id)?.0 != ContainerState::Running
            {
                continue;
            }
            for port in &record.config.ports {
                bindings.push(PortBinding {
                    container: record.id.to_string(),
                    ip: attachment.ip,
                    port: port.clone(),
                });
            }
        }
        Ok(bindings)
    }

    /// Makes the node's `ip gantry` table publish exactly the running
    /// containers' ports, plus `starting`'s, less `removing`'s. Callers hold
    /// the engine lock, which `start` holds until its container runs: so a
    /// start in progress (published, not yet running) is never unpublished
    /// by a concurrent stop or removal's sync.
    fn publish(
        &self,
        starting: Option<&ContainerId>,
        removing: Option<&ContainerId>,
    ) -> Result<(), ContainerError> {
        self.publish_with(starting, removing, network::Sync::IfChanged)
    }

    fn publish_with(
        &self,
        starting: Option<&ContainerId>,
        removing: Option<&ContainerId>,
        mode: network::Sync,
    ) -> Result<(), ContainerError> {
        let _lock = network::lock(&self.data)?;
        let bindings: Vec<PortBinding> = self
            .port_bindings(starting)?
            .into_iter()
            .filter(|b| Some(b.container.as_str()) != removing.map(|id| id.as_str()))
            .collect();
        Ok(network::sync_rules(
            &self.data,
            &self.network_config()?,
            &bindings,
            mode,
        )?)
    }

    /// The data dir's network config (a small file read).
    fn network_config(&self) -> Result<NetworkConfig, ContainerError> {
        Ok(NetworkConfig::load(&self.data)?)
    }

    /// A pidfd of the container's shim while it runs: readable when the
    /// shim exited (and `exit.json` is written), for async callers to wait on.
    pub fn shim_pidfd(&self, id: &ContainerId) -> Result<Option<OwnedFd>, ContainerError> {
        let (state, shim) = self.state_of(id)?;
        let (ContainerState::Running, Some(shim)) = (state, shim) else {
            return Ok(None);
        };
        let pidfd = pidfd_open(shim.shim_pid)?;
        // The shim may have exited and its pid been reused between our look
        // and the pidfd_open: check again through the fd's process.
        match pidfd {
            Some(fd) if process_start_time(shim.shim_pid) == Some(shim.shim_start_time) => {
                Ok(Some(fd))
            }
            _ => Ok(None),
        }
    }

    /// Waits until the container ends and returns how it ended (at once for
    /// an exited container).
    pub fn wait(&self, id: &ContainerId) -> Result<ExitRecord, ContainerError> {
        if let Some(pidfd) = self.shim_pidfd(id)? {
            wait_fd_readable(&pidfd, None)?;
        }
        match self.state_of(id)?.0 {
            ContainerState::Exited => self.exit_record(id),
            ContainerState::Dead => Err(ContainerError::Dead(id.to_string())),
            ContainerState::Created => Err(ContainerError::NotRunning(id.to_string())),
            // The shim exited just now and its record is on the way: cannot
            // happen since exit.json is written before the shim exits.
            ContainerState::Running => Err(ContainerError::Dead(id.to_string())),
        }
    }

    /// Removes a container: its rootfs mount, image lease and directory.
    /// Named volumes stay. A running container needs `force` (it is killed).
    pub fn remove(&self, id: &ContainerId, force: bool) -> Result<(), ContainerError> {
        let _ = self.record(id)?;
        match self.state_of(id)?.0 {
            ContainerState::Running if !force => {
                return Err(ContainerError::Running(id.to_string()));
            }
            ContainerState::Running => {
                if let Some(pidfd) = self.shim_pidfd(id)? {
                    let _ = self.runtime.kill(id.as_str(), Signal::SIGKILL, true);
                    if !wait_fd_readable(&pidfd, Some(KILL_WAIT))? {
                        return Err(ContainerError::StopTimeout(id.to_string(), KILL_WAIT));
                    }
                }
            }
            ContainerState::Dead => {
                // Its shim is gone; make sure nothing of it runs on.
                if let Err(e) = self.runtime.delete(id.as_str(), true)
                    && !matches!(e, RuntimeError::NotFound(_))
                {
                    return Err(e.into());
                }
            }
            ContainerState::Created | ContainerState::Exited => {}
        }
        let _lock = self.lock()?;
        self.teardown(id)
    }

    fn teardown(&self, id: &ContainerId) -> Result<(), ContainerError> {
        let dir = self.container_dir(id);
        let record = self.record(id).ok();
        let anonymous = record
            .as_ref()
            .map(|r| r.anonymous_volumes.clone())
            .unwrap_or_default();
        let published = record.as_ref().is_some_and(|r| !r.config.ports.is_empty());
        let attachment = record.and_then(|r| r.network);
        // Also without a record: a create that crashed half-way may have
        // left a namespace behind.
        if attachment.is_some() || network::netns_path(&self.data, id.as_str()).exists() {
            network::detach(&self.data, id.as_str())?;
            if published {
                self.publish(None, Some(id))?;
            }
        }
        rootfs::unmount(&dir.join("rootfs"))?;
        self.images.remove_lease(id.as_str())?;
        // Out of sight in one step, then deleted: nobody lists a half-removed
        // container, and what a crash leaves here `Engine::open` finishes.
        let trash = self.data.containers().join(format!("{TRASH_PREFIX}{id}"));
        match std::fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&dir)(e)),
        }
        match std::fs::remove_dir_all(&trash) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&trash)(e)),
        }
        // Named volumes stay; the anonymous ones nobody can name again go.
        for name in anonymous {
            match self.volumes.remove(&name) {
                Ok(()) | Err(VolumeError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads the container's logs (see [`read_logs`]); with `follow`, until
    /// the container stops.
    pub fn logs(
        &self,
        id: &ContainerId,
        options: &LogOptions,
        sink: &mut dyn FnMut(&LogEntry) -> std::io::Result<()>,
    ) -> Result<(), ContainerError> {
        self.logs_with(id, options, &mut || {}, sink)
    }

    /// [`Engine::logs`] that also calls `tick` every time a follower looks
    /// for news (every few tens of milliseconds), e.g. to forward signals the
    /// caller received to the container.
    pub fn logs_with(
        &self,
        id: &ContainerId,
        options: &LogOptions,
        tick: &mut dyn FnMut(),
        sink: &mut dyn FnMut(&LogEntry) -> std::io::Result<()>,
    ) -> Result<(), ContainerError> {
        let _ = self.record(id)?;
        let path = self.container_dir(id).join(LOG_FILE);
        let mut running = || {
            tick();
            matches!(self.state_of(id), Ok((ContainerState::Running, _)))
        };
        Ok(read_logs(&path, options, &mut running, sink)?)
    }

    /// Runs a process in a running container; it is a child of the caller,
    /// with the caller's stdio (or a pty when `tty`).
    pub fn exec(&self, id: &ContainerId, exec: &ExecConfig) -> Result<ExecProcess, ContainerError> {
        if self.state_of(id)?.0 != ContainerState::Running {
            return Err(ContainerError::NotRunning(id.to_string()));
        }
        if exec.command.is_empty() {
            return Err(SpecError::Invalid {
                field: "exec command".into(),
                reason: "no command given".into(),
            }
            .into());
        }
        let dir = self.container_dir(id);
        let spec_path = dir.join("config.json");
        let oci = oci_spec::runtime::Spec::load(&spec_path).map_err(|e| ContainerError::Io {
            path: spec_path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut process = oci.process().clone().unwrap_or_default();
        process.set_args(Some(exec.command.clone()));
        // The pty is asked for through ExecOptions::tty; the runtime reads a
        // terminal in the process itself as a console-socket request.
        process.set_terminal(Some(false));
        let mut env = process.env().clone().unwrap_or_default();
        for entry in &exec.env {
            spec::merge_env(&mut env, entry);
        }
        if exec.tty && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".into());
        }
        process.set_env(Some(env));
        if let Some(user) = &exec.user {
            let resolved = user::resolve_in_rootfs(&dir.join("rootfs"), user)?;
            let mut u = process.user().clone();
            u.set_uid(resolved.uid);
            u.set_gid(resolved.gid);
            u.set_additional_gids(
                (!resolved.additional_gids.is_empty()).then_some(resolved.additional_gids),
            );
            process.set_user(u);
        }
        if let Some(cwd) = &exec.working_dir {
            if !cwd.starts_with('/') {
                return Err(SpecError::Invalid {
                    field: "exec working_dir".into(),
                    reason: format!("{cwd:?} is not an absolute path"),
                }
                .into());
            }
            process.set_cwd(PathBuf::from(cwd));
        }
        Ok(self.runtime.exec(
            id.as_str(),
            &process,
            ExecOptions {
                tty: exec.tty,
                pid_file: None,
            },
        )?)
    }

    /// The named volumes, each with the containers using it.
    pub fn volume_list(&self) -> Result<Vec<VolumeInfo>, ContainerError> {
        let records = self.records()?;
        let mut list = self.volumes.list()?;
        for volume in &mut list {
            volume.used_by = users_of(&records, &volume.name);
        }
        Ok(list)
    }

    /// Creates a named volume.
    pub fn volume_create(&self, name: &str) -> Result<VolumeInfo, ContainerError> {
        Ok(self.volumes.create(name)?)
    }

    /// One volume, with the containers using it.
    pub fn volume_inspect(&self, name: &str) -> Result<VolumeInfo, ContainerError> {
        let mut info = self.volumes.inspect(name)?;
        info.used_by = users_of(&self.records()?, name);
        Ok(info)
    }

    /// Removes a volume no container uses (running or not, as Docker).
    pub fn volume_remove(&self, name: &str) -> Result<(), ContainerError> {
        let _lock = self.lock()?;
        let users = users_of(&self.records()?, name);
        if !users.is_empty() {
            return Err(VolumeError::InUse {
                name: name.to_string(),
                containers: users,
            }
            .into());
        }
        Ok(self.volumes.remove(name)?)
    }

    fn info(&self, record: ContainerRecord) -> Result<ContainerInfo, ContainerError> {
        let id = record.id.clone();
        let (state, shim) = self.state_of(&id)?;
        let exit = if state == ContainerState::Exited {
            Some(self.exit_record(&id)?)
        } else {
            None
        };
        let now = SystemTime::now();
        let status = match state {
            ContainerState::Created => "Created".to_string(),
            ContainerState::Running => {
                match shim.as_ref().and_then(|s| parse_rfc3339(&s.started_at)) {
                    Some(t) => format!(
                        "Up {}",
                        human_duration(now.duration_since(t).unwrap_or_default())
                    ),
                    None => "Up".to_string(),
                }
            }
            ContainerState::Exited => {
                let exit = exit.as_ref();
                let code = exit.map_or(0, |e| e.exit_code);
                match exit.and_then(|e| parse_rfc3339(&e.finished_at)) {
                    Some(t) => format!(
                        "Exited ({code}) {} ago",
                        human_duration(now.duration_since(t).unwrap_or_default())
                    ),
                    None => format!("Exited ({code})"),
                }
            }
            ContainerState::Dead => "Dead".to_string(),
        };
        let error = (state == ContainerState::Dead)
            .then(|| ContainerError::Dead(id.to_string()).to_string());
        Ok(ContainerInfo {
            dir: self.container_dir(&id),
            name: record.name,
            image: record.image,
            image_id: record.image_id,
            state,
            status,
            pid: shim
                .as_ref()
                .filter(|_| state == ContainerState::Running)
                .map(|s| s.init_pid),
            shim_pid: shim
                .as_ref()
                .filter(|_| state == ContainerState::Running)
                .map(|s| s.shim_pid),
            exit_code: exit.as_ref().map(|e| e.exit_code),
            started_at: exit
                .as_ref()
                .map(|e| e.started_at.clone())
                .or_else(|| shim.as_ref().map(|s| s.started_at.clone())),
            finished_at: exit.as_ref().map(|e| e.finished_at.clone()),
            exit,
            created: record.created,
            restart_count: 0,
            error,
            config: record.config,
            args: record.args,
            stats: None,
            network: record.network,
            id,
        })
    }

    /// The state, and the shim record if there is one.
    fn state_of(
        &self,
        id: &ContainerId,
    ) -> Result<(ContainerState, Option<ShimState>), ContainerError> {
        let dir = self.container_dir(id);
        let shim_path = dir.join(SHIM_STATE_FILE);
        let shim: Option<ShimState> = read_json_opt(&shim_path)?;
        // exit.json is checked after shim.json: the shim writes it last, so
        // reading in this order never sees "no shim.json, no exit.json" for a
        // container that ran.
        if dir.join(EXIT_FILE).exists() {
            return Ok((ContainerState::Exited, shim));
        }
        let Some(shim) = shim else {
            return Ok((ContainerState::Created, None));
        };
        if process_start_time(shim.shim_pid) == Some(shim.shim_start_time) {
            return Ok((ContainerState::Running, Some(shim)));
        }
        // The shim is gone. It may have written exit.json just now.
        if dir.join(EXIT_FILE).exists() {
            return Ok((ContainerState::Exited, Some(shim)));
        }
        Ok((ContainerState::Dead, Some(shim)))
    }

    fn exit_record(&self, id: &ContainerId) -> Result<ExitRecord, ContainerError> {
        let path = self.container_dir(id).join(EXIT_FILE);
        read_json_opt(&path)?.ok_or_else(|| ContainerError::Dead(id.to_string()))
    }

    fn record(&self, id: &ContainerId) -> Result<ContainerRecord, ContainerError> {
        let path = self.container_dir(id).join(RECORD_FILE);
        read_json_opt(&path)?.ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    /// Every container with a complete record (a create in progress has none yet).
    fn records(&self) -> Result<Vec<ContainerRecord>, ContainerError> {
        let root = self.data.containers();
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&root)(e)),
        };
        let mut records = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(&root))?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<ContainerId>().ok())
            else {
                continue;
            };
            let path = self.container_dir(&id).join(RECORD_FILE);
            if let Some(record) = read_json_opt::<ContainerRecord>(&path)? {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// Serializes creations and removals between engine processes (names
    /// must stay unique, volumes must not vanish under a new container).
    fn lock(&self) -> Result<nix::fcntl::Flock<File>, ContainerError> {
        let path = self.data.containers().join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| sys("flock")(e))
    }
}

/// Removes container `id` of `data_dir` whose exit is recorded, for its own
/// shim (`--rm`): the shim is still alive, so [`Engine::remove`] would see a
/// running container.
pub(crate) fn remove_exited(data_dir: &DataDir, id: &str) -> Result<(), ContainerError> {
    let id: ContainerId = id.parse()?;
    let engine = Engine::open(EngineConfig {
        data_dir: data_dir.clone(),
        shim_binary: PathBuf::new(),
    })?;
    let _lock = engine.lock()?;
    engine.teardown(&id)
}

/// Undoes a half-done create when dropped before `done`.
struct CreateUndo<'a> {
    engine: &'a Engine,
    id: &'a ContainerId,
    dir: PathBuf,
    leased: bool,
    mounted: bool,
    new_volumes: Vec<String>,
    network: bool,
    done: bool,
}

impl Drop for CreateUndo<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Errors here are logged, never returned: the error that made us
        // undo is the one the caller must see.
        if self.mounted
            && let Err(e) = rootfs::unmount(&self.dir.join("rootfs"))
        {
            tracing::warn!(id = %self.id, "undo create: {e}");
        }
        if self.network
            && let Err(e) = network::detach(&self.engine.data, self.id.as_str())
        {
            tracing::warn!(id = %self.id, "undo create: {e}");
        }
        if self.leased
            && let Err(e) = self.engine.images.remove_lease(self.id.as_str())
        {
            tracing::warn!(id = %self.id, "undo create: {e}");
        }
        for name in &self.new_volumes {
            if let Err(e) = self.engine.volumes.remove(name) {
                tracing::warn!(id = %self.id, "undo create: {e}");
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(id = %self.id, "undo create: {}: {e}", self.dir.display());
        }
    }
}

/// Published ports need a namespace of the container's own on the bridge.
/// With the host's network they are meaningless: Docker warns and drops
/// them, and so does this (logged, never silent).
fn check_ports(config: &ContainerConfig) -> Result<(), ContainerError> {
    if config.ports.is_empty() {
        return Ok(());
    }
    match config.network {
        NetworkMode::Bridge => Ok(()),
        NetworkMode::Host => {
            tracing::warn!("published ports are discarded with the host's network");
            Ok(())
        }
        NetworkMode::None | NetworkMode::Join(_) => Err(SpecError::Invalid {
            field: "ports".into(),
            reason: "published ports need bridge networking".into(),
        }
        .into()),
    }
}

fn users_of(records: &[ContainerRecord], volume: &str) -> Vec<String> {
    records
        .iter()
        .filter(|r| {
            r.anonymous_volumes.iter().any(|a| a == volume)
                || r.config
                    .mounts
                    .iter()
                    .any(|m| matches!(m, MountConfig::Volume { name, .. } if name == volume))
        })
        .map(|r| r.id.to_string())
        .collect()
}

/// The cgroup of a container, relative to the cgroup root.
pub fn cgroup_path(id: &ContainerId) -> PathBuf {
    PathBuf::from(format!("gantry/{id}"))
}

fn read_json_opt<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, ContainerError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| ContainerError::Record {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// `pidfd_open(2)`: `None` when the process does not exist.
pub fn pidfd_open(pid: i32) -> Result<Option<OwnedFd>, ContainerError> {
    // SAFETY: a plain system call with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let errno = nix::errno::Errno::last();
        if errno == nix::errno::Errno::ESRCH {
            return Ok(None);
        }
        return Err(sys("pidfd_open")(errno));
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// Waits until `fd` is readable (a pidfd: the process exited); `None` waits
/// forever. True when it became readable.
pub fn wait_fd_readable(fd: &OwnedFd, timeout: Option<Duration>) -> Result<bool, ContainerError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let poll_timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, poll_timeout) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(sys("poll pidfd")(e)),
        }
    }
}

fn validate_container_name(name: &str) -> Result<(), ContainerError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidName(name.to_string()))
    }
}

const ADJECTIVES: [&str; 16] = [
    "brave", "calm", "eager", "fancy", "gentle", "happy", "jolly", "keen", "lucid", "merry",
    "nimble", "proud", "quiet", "swift", "tender", "witty",
];
const NOUNS: [&str; 16] = [
    "babbage", "curie", "darwin", "euler", "fermat", "galois", "hopper", "kepler", "lovelace",
    "noether", "pascal", "ritchie", "shannon", "turing", "volta", "wozniak",
];

/// A Docker-like `adjective_scientist` name not yet taken.
fn generate_name(records: &[ContainerRecord]) -> Result<String, ContainerError> {
    let path = Path::new("/dev/urandom");
    let mut bytes = [0u8; 64];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io(path))?;
    for pair in bytes.chunks(2) {
        let name = format!(
            "{}_{}",
            ADJECTIVES[pair[0] as usize % ADJECTIVES.len()],
            NOUNS[pair[1] as usize % NOUNS.len()]
        );
        if !records.iter().any(|r| r.name == name) {
            return Ok(name);
        }
    }
    // All tries taken: a numeric suffix makes it unique.
    Ok(format!(
        "{}_{}",
        ADJECTIVES[bytes[0] as usize % 16],
        hex::encode(&bytes[..4])
    ))
}

/// Parses the RFC 3339 UTC times this crate writes.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || !s.ends_with('Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let nanos = match s.get(19..s.len() - 1) {
        Some(frac) if frac.starts_with('.') && frac.len() > 1 => {
            let digits = &frac[1..frac.len().min(10)];
            let n: u32 = digits.parse().ok()?;
            n * 10u32.pow(9 - digits.len() as u32)
        }
        _ => 0,
    };
    // Days from civil (Howard Hinnant), the inverse of the formatter's.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    if secs < 0 {
        return None;
    }
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nanos))
}

/// Docker's "3 seconds", "2 minutes", "About an hour" style.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "Less than a second".into(),
        1 => "1 second".into(),
        2..=59 => format!("{s} seconds"),
        60..=119 => "About a minute".into(),
        120..=3599 => format!("{} minutes", s / 60),
        3600..=7199 => "About an hour".into(),
        7200..=172_799 => format!("{} hours", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_64_hex() {
        let id = ContainerId::generate().unwrap();
        assert_eq!(id.as_str().len(), 64);
        assert_eq!(id.short().len(), 12);
        assert_eq!(id.as_str().parse::<ContainerId>().unwrap(), id);
        assert!("ABC".parse::<ContainerId>().is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<ContainerId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<ContainerId>("\"nope\"").is_err());
    }

    #[test]
    fn names_are_validated_and_generated() {
        validate_container_name("web-1").unwrap();
        assert!(validate_container_name("-x").is_err());
        assert!(validate_container_name("a").is_err());
        assert!(validate_container_name("a/b").is_err());
        let name = generate_name(&[]).unwrap();
        validate_container_name(&name).unwrap();
        assert!(name.contains('_'));
    }

    #[test]
    fn times_round_trip() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(parse_rfc3339(&rfc3339_nano(t)), Some(t));
        let t = SystemTime::UNIX_EPOCH + Duration::new(951_782_400, 0);
        assert_eq!(parse_rfc3339(&rfc3339_nano(t)), Some(t));
        assert_eq!(parse_rfc3339("garbage"), None);
        assert_eq!(human_duration(Duration::from_secs(5)), "5 seconds");
        assert_eq!(human_duration(Duration::from_secs(300)), "5 minutes");
    }
}
