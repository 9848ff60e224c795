//! The OCI runtime: runs an OCI bundle (`config.json` + rootfs) the way runc
//! and crun do, with Gantry's own namespace, mount and cgroup code.
//!
//! A container's init is cloned straight from the calling process (no
//! re-exec of a helper as runc does), which is why it is fast and why the
//! caller must be single-threaded.
//!
//! INTERFACE PINNED FOR PARALLEL WORK: the signatures below are what the shim
//! and the CLI code against; the bodies are filled in by the runtime work.

use oci_spec::runtime::Process;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// The default state root of `gantry runtime` (runc's is `/run/runc`).
pub const DEFAULT_ROOT: &str = "/run/gantry/runtime";

/// Errors of the OCI runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A file of the bundle or the state root could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// No container with this id exists in the state root.
    #[error("container {0} does not exist")]
    NotFound(String),
    /// A container with this id already exists.
    #[error("container {0} already exists")]
    AlreadyExists(String),
    /// The bundle's config.json is malformed or asks for something unsupported.
    #[error("invalid config.json: {field}: {reason}")]
    InvalidConfig {
        /// The config field, e.g. `process.args`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The operation is not allowed in the container's current status.
    #[error("container {id} is {status}: cannot {operation}")]
    WrongStatus {
        /// The container id.
        id: String,
        /// Its status now.
        status: String,
        /// What was asked.
        operation: &'static str,
    },
    /// Setting up the container failed inside the new namespaces.
    #[error("container {id}: {message}")]
    Init {
        /// The container id.
        id: String,
        /// The step that failed and the kernel's error.
        message: String,
    },
    /// A cgroup could not be set up.
    #[error(transparent)]
    Cgroup(#[from] super::cgroups::CgroupError),
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        /// The call that failed.
        call: &'static str,
        /// The errno.
        #[source]
        source: nix::Error,
    },
}

/// Where a new container's stdio comes from.
#[derive(Debug)]
pub enum InitStdio {
    /// The caller's own stdin, stdout and stderr (what `runc create` does).
    Inherit,
    /// These descriptors, e.g. pipes held by the shim.
    Fds {
        /// Standard input (e.g. `/dev/null`).
        stdin: OwnedFd,
        /// Standard output.
        stdout: OwnedFd,
        /// Standard error.
        stderr: OwnedFd,
    },
}

/// Options of [`Runtime::create`].
#[derive(Debug)]
pub struct CreateOptions {
    /// The container's stdio.
    pub stdio: InitStdio,
    /// Where to write the init's pid, as `runc create --pid-file` does.
    pub pid_file: Option<PathBuf>,
}

/// Options of [`Runtime::exec`].
#[derive(Debug)]
pub struct ExecOptions {
    /// Allocate a pseudo-terminal for the process; its master side is returned.
    pub tty: bool,
    /// Where to write the process's pid.
    pub pid_file: Option<PathBuf>,
}

/// A process started by [`Runtime::exec`]: a child of the caller.
#[derive(Debug)]
pub struct ExecProcess {
    /// Its pid (in the caller's pid namespace).
    pub pid: i32,
    /// The pty master when [`ExecOptions::tty`] was set.
    pub pty_master: Option<OwnedFd>,
}

/// The OCI state of a container, as `runc state` prints it.
pub type State = oci_spec::runtime::State;

/// A state root holding containers, like runc's `--root`.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
}

impl Runtime {
    /// A runtime keeping its state under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Runtime { root: root.into() }
    }

    /// The state root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates container `id` from `bundle`: namespaces, cgroup, mounts and
    /// pivot_root are done, and its init waits for [`Runtime::start`] before it
    /// executes the user process. The init is a child of the caller.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        options: CreateOptions,
    ) -> Result<State, RuntimeError> {
        let _ = (id, bundle, options);
        unimplemented!("filled in by the runtime work")
    }

    /// Lets a created container execute its user process.
    pub fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let _ = id;
        unimplemented!("filled in by the runtime work")
    }

    /// The container's OCI state.
    pub fn state(&self, id: &str) -> Result<State, RuntimeError> {
        let _ = id;
        unimplemented!("filled in by the runtime work")
    }

    /// Every container in the state root.
    pub fn list(&self) -> Result<Vec<State>, RuntimeError> {
        unimplemented!("filled in by the runtime work")
    }

    /// Sends `signal` to the container's init, or to all its processes.
    pub fn kill(
        &self,
        id: &str,
        signal: nix::sys::signal::Signal,
        all: bool,
    ) -> Result<(), RuntimeError> {
        let _ = (id, signal, all);
        unimplemented!("filled in by the runtime work")
    }

    /// Removes a stopped container (any container with `force`, killing it).
    pub fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let _ = (id, force);
        unimplemented!("filled in by the runtime work")
    }

    /// Starts `process` inside the running container `id`: it joins all the
    /// container's namespaces and its cgroup. The process is a child of the caller.
    pub fn exec(
        &self,
        id: &str,
        process: &Process,
        options: ExecOptions,
    ) -> Result<ExecProcess, RuntimeError> {
        let _ = (id, process, options);
        unimplemented!("filled in by the runtime work")
    }
}
