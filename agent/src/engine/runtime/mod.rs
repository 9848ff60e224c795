//! The OCI runtime: runs an OCI bundle (`config.json` + rootfs) the way runc
//! and crun do, with Gantry's own namespace, mount and cgroup code.
//!
//! A container's init is cloned straight from the calling process (no
//! re-exec of a helper as runc does), which is why it is fast and why the
//! caller must be single-threaded.
//!
//! INTERFACE PINNED FOR PARALLEL WORK: the signatures below are what the shim
//! and the CLI code against; the bodies are filled in by the runtime work.

pub mod caps;
pub mod devices;
pub mod exec;
pub mod hooks;
pub mod init;
pub mod mounts;
pub mod spec;
pub mod state;

use super::cgroups::{Cgroup, CgroupRoot};
use oci_spec::runtime::{ContainerState, Process};
use state::Record;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    /// A hook failed.
    #[error("container {id}: {source}")]
    Hook {
        /// The container id.
        id: String,
        /// The hook and how it failed.
        #[source]
        source: hooks::HookError,
    },
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

/// How long `start` waits for a created init to take the start signal, and
/// `delete` for a killed init to go.
const WAIT_LIMIT: Duration = Duration::from_secs(10);

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
        let launched = self.launch(id, bundle, options, init::StartSignal::Fifo(-1))?;
        launched.guard.disarm();
        Ok(to_state(&launched.record, ContainerState::Created))
    }

    /// Creates, starts and waits for container `id`, then deletes it, all in
    /// this process (no fifo, no state re-reading): `gantry runtime run`.
    /// Returns the container's exit code, 128+n for a death by signal n.
    pub fn run(
        &self,
        id: &str,
        bundle: &Path,
        options: CreateOptions,
    ) -> Result<i32, RuntimeError> {
        let launched = self.launch(id, bundle, options, init::StartSignal::GoPipe)?;
        let Launched {
            record,
            dir,
            go,
            report,
            guard,
        } = launched;
        let pid = record.pid;
        let started = nix::unistd::write(&go, b"s")
            .map_err(|source| RuntimeError::Sys {
                call: "write start",
                source,
            })
            .and_then(|_| {
                exec::read_exec_report(&report).map_err(|message| RuntimeError::Init {
                    id: id.to_string(),
                    message,
                })
            });
        drop(go);
        drop(report);
        if let Err(e) = started {
            // The guard kills and reaps the init and removes what create made.
            drop(guard);
            return Err(e);
        }
        guard.disarm();
        self.run_poststart(&record);
        let code = wait_exit_code(pid)?;
        self.remove(&dir, &record, false)?;
        Ok(code)
    }

    /// Lets a created container execute its user process.
    pub fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let (dir, record) = self.load(id)?;
        let status = state::status(&dir, &record);
        if status != ContainerState::Created {
            return Err(wrong_status(id, status, "start"));
        }
        let fifo_path = dir.join(state::EXEC_FIFO);
        let fifo = nix::fcntl::open(
            &fifo_path,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_NONBLOCK
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io_err(&fifo_path, e.into()))?;
        let deadline = Instant::now() + WAIT_LIMIT;
        loop {
            let mut fds = [nix::poll::PollFd::new(
                fifo.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u8)).unwrap_or(0);
            if ready > 0 {
                let mut b = [0u8; 1];
                if matches!(nix::unistd::read(&fifo, &mut b), Ok(1)) {
                    break;
                }
            }
            if !state::init_alive(&record) {
                return Err(RuntimeError::Init {
                    id: id.to_string(),
                    message: "init exited before start".into(),
                });
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::Init {
                    id: id.to_string(),
                    message: "init did not take the start signal".into(),
                });
            }
        }
        std::fs::remove_file(&fifo_path).map_err(|e| io_err(&fifo_path, e))?;
        self.run_poststart(&record);
        Ok(())
    }

    /// The container's OCI state.
    pub fn state(&self, id: &str) -> Result<State, RuntimeError> {
        let (dir, record) = self.load(id)?;
        Ok(to_state(&record, state::status(&dir, &record)))
    }

    /// Every container in the state root.
    pub fn list(&self) -> Result<Vec<State>, RuntimeError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.root, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&self.root, e))?;
            let dir = entry.path();
            if let Ok(Some(record)) = state::load(&dir) {
                out.push(to_state(&record, state::status(&dir, &record)));
            }
        }
        out.sort_by(|a, b| a.id().cmp(b.id()));
        Ok(out)
    }

    /// Sends `signal` to the container's init, or to all its processes.
    pub fn kill(
        &self,
        id: &str,
        signal: nix::sys::signal::Signal,
        all: bool,
    ) -> Result<(), RuntimeError> {
        let (dir, record) = self.load(id)?;
        let status = state::status(&dir, &record);
        if all && let Ok(cgroup) = self.open_cgroup(&record) {
            cgroup.kill_all(signal)?;
        }
        if status == ContainerState::Stopped {
            if all {
                return Ok(());
            }
            return Err(wrong_status(id, status, "kill"));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(record.pid), signal).map_err(|source| {
            RuntimeError::Sys {
                call: "kill",
                source,
            }
        })
    }

    /// Removes a stopped container (any container with `force`, killing it).
    pub fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let (dir, record) = self.load(id)?;
        let status = state::status(&dir, &record);
        // A created container never ran user code: runc deletes it too.
        if status == ContainerState::Running && !force {
            return Err(wrong_status(id, status, "delete"));
        }
        self.remove(&dir, &record, status != ContainerState::Stopped)
    }

    /// Starts `process` inside the running container `id`: it joins all the
    /// container's namespaces and its cgroup. The process is a child of the caller.
    pub fn exec(
        &self,
        id: &str,
        process: &Process,
        options: ExecOptions,
    ) -> Result<ExecProcess, RuntimeError> {
        spec::check_process(process, "process").map_err(invalid)?;
        let (dir, record) = self.load(id)?;
        let status = state::status(&dir, &record);
        if status == ContainerState::Stopped {
            return Err(wrong_status(id, status, "exec"));
        }
        let init_err = |e: init::SetupError| RuntimeError::Init {
            id: id.to_string(),
            message: e.to_string(),
        };
        let (namespaces, pid_ns) = exec::open_namespaces(record.pid).map_err(init_err)?;
        let pty = if options.tty {
            Some(exec::open_container_pty(record.pid).map_err(init_err)?)
        } else {
            None
        };
        let cgroup = self.open_cgroup(&record)?;
        let (go_r, go_w) = exec::pipe().map_err(|source| RuntimeError::Sys {
            call: "pipe",
            source,
        })?;
        let (rep_r, rep_w) = exec::pipe().map_err(|source| RuntimeError::Sys {
            call: "pipe",
            source,
        })?;
        let child_args = exec::ExecChild {
            process,
            namespaces: &namespaces,
            tty: pty.as_ref().map(|p| p.slave_path.clone()),
            go: go_r.as_raw_fd(),
            report: rep_w.as_raw_fd(),
        };

        // Enter the container's pid namespace just around the fork, so the
        // child is in it and still ours to wait for.
        let own_pid_ns = match &pid_ns {
            Some(ns) => {
                let own = nix::fcntl::open(
                    "/proc/self/ns/pid",
                    nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .map_err(|e| io_err(Path::new("/proc/self/ns/pid"), e.into()))?;
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWPID).map_err(|source| {
                    RuntimeError::Sys {
                        call: "setns pid",
                        source,
                    }
                })?;
                Some(own)
            }
            None => None,
        };
        // SAFETY: the caller is single-threaded (crate invariant), so the
        // child may run arbitrary code; it never returns from exec_child.
        let forked = unsafe { nix::unistd::fork() };
        let pid = match forked {
            Ok(nix::unistd::ForkResult::Child) => {
                drop(go_w);
                drop(rep_r);
                exec::exec_child(&child_args)
            }
            Ok(nix::unistd::ForkResult::Parent { child }) => Ok(child.as_raw()),
            Err(source) => Err(RuntimeError::Sys {
                call: "fork",
                source,
            }),
        };
        if let Some(own) = &own_pid_ns {
            // Only children are affected by the pid namespace: going back is
            // allowed since ours is an ancestor of the container's.
            nix::sched::setns(own, nix::sched::CloneFlags::CLONE_NEWPID).map_err(|source| {
                RuntimeError::Sys {
                    call: "setns back to our pid namespace",
                    source,
                }
            })?;
        }
        let pid = pid?;
        drop(go_r);
        drop(rep_w);
        let reap = |pid: i32| {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        };
        if let Err(e) = cgroup.add_process(pid) {
            reap(pid);
            return Err(e.into());
        }
        if let Err(source) = nix::unistd::write(&go_w, b"g") {
            reap(pid);
            return Err(RuntimeError::Sys {
                call: "write go",
                source,
            });
        }
        drop(go_w);
        if let Err(message) = exec::read_exec_report(&rep_r) {
            reap(pid);
            return Err(RuntimeError::Init {
                id: id.to_string(),
                message,
            });
        }
        if let Some(path) = &options.pid_file {
            write_pid_file(path, pid)?;
        }
        Ok(ExecProcess {
            pid,
            pty_master: pty.map(|p| p.master),
        })
    }

    fn load(&self, id: &str) -> Result<(PathBuf, Record), RuntimeError> {
        spec::check_id(id).map_err(|_| RuntimeError::NotFound(id.to_string()))?;
        let dir = self.root.join(id);
        match state::load(&dir).map_err(state_err)? {
            Some(record) => Ok((dir, record)),
            None => Err(RuntimeError::NotFound(id.to_string())),
        }
    }

    fn open_cgroup(&self, record: &Record) -> Result<Cgroup, RuntimeError> {
        let root = CgroupRoot::detect()?;
        Ok(Cgroup::open(&root, &record.cgroup_path)?)
    }

    fn run_poststart(&self, record: &Record) {
        if record.poststart.is_empty() {
            return;
        }
        let json = state_json(record, ContainerState::Running);
        // OCI: a failing poststart hook is logged, the container keeps running.
        if let Err(e) = hooks::run_all(&record.poststart, &json) {
            tracing::warn!(id = %record.id, "poststart: {e}");
        }
    }

    /// Kills what is left (with `kill`), removes the cgroup, runs the
    /// poststop hooks and removes the state.
    fn remove(&self, dir: &Path, record: &Record, kill: bool) -> Result<(), RuntimeError> {
        let cgroup = self.open_cgroup(record).ok();
        if kill {
            if let Some(cg) = &cgroup {
                let _ = cg.kill_all(nix::sys::signal::SIGKILL);
            }
            if state::init_alive(record) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(record.pid),
                    nix::sys::signal::SIGKILL,
                );
            }
            wait_gone(record);
        }
        if let Some(cg) = &cgroup {
            delete_cgroup(cg)?;
        }
        if !record.poststop.is_empty() {
            let json = state_json(record, ContainerState::Stopped);
            // OCI: a failing poststop hook is logged, deletion goes on.
            if let Err(e) = hooks::run_all(&record.poststop, &json) {
                tracing::warn!(id = %record.id, "poststop: {e}");
            }
        }
        std::fs::remove_dir_all(dir).map_err(|e| io_err(dir, e))
    }

    /// create up to the init's ready report; the state is saved.
    fn launch(
        &self,
        id: &str,
        bundle: &Path,
        options: CreateOptions,
        start: init::StartSignal,
    ) -> Result<Launched, RuntimeError> {
        let pid_file = options.pid_file.clone();
        let bundle = std::fs::canonicalize(bundle).map_err(|e| io_err(bundle, e))?;
        let plan = spec::load(&bundle, id).map_err(invalid)?;
        std::fs::create_dir_all(&self.root).map_err(|e| io_err(&self.root, e))?;
        let dir = self.root.join(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists(id.to_string()));
            }
            Err(e) => return Err(io_err(&dir, e)),
        }
        let mut guard = CreateGuard {
            dir: Some(dir.clone()),
            cgroup: None,
            pid: None,
        };
        let cg_root = CgroupRoot::detect()?;
        let resources = plan
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref());
        let cgroup = Cgroup::create(&cg_root, &plan.cgroup_path, resources)?;
        guard.cgroup = Some(cgroup.clone());

        let fifo = match start {
            init::StartSignal::Fifo(_) => {
                let path = dir.join(state::EXEC_FIFO);
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o622))
                    .map_err(|e| io_err(&path, e.into()))?;
                Some(
                    nix::fcntl::open(
                        &path,
                        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
                        nix::sys::stat::Mode::empty(),
                    )
                    .map_err(|e| io_err(&path, e.into()))?,
                )
            }
            init::StartSignal::GoPipe => None,
        };
        let (go_r, go_w) = exec::pipe().map_err(|source| RuntimeError::Sys {
            call: "pipe",
            source,
        })?;
        let (rep_r, rep_w) = exec::pipe().map_err(|source| RuntimeError::Sys {
            call: "pipe",
            source,
        })?;
        let stdio = match &options.stdio {
            InitStdio::Inherit => None,
            InitStdio::Fds {
                stdin,
                stdout,
                stderr,
            } => Some([stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()]),
        };
        let hooks = plan.spec.hooks().as_ref();
        let runtime_hooks: Vec<oci_spec::runtime::Hook> = hooks
            .map(|h| {
                h.prestart()
                    .iter()
                    .flatten()
                    .chain(h.create_runtime().iter().flatten())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let args = init::InitArgs {
            id,
            plan: &plan,
            go: go_r.as_raw_fd(),
            report: rep_w.as_raw_fd(),
            parent_go: go_w.as_raw_fd(),
            parent_report: rep_r.as_raw_fd(),
            stdio,
            start: match &fifo {
                Some(fd) => init::StartSignal::Fifo(fd.as_raw_fd()),
                None => init::StartSignal::GoPipe,
            },
            parent_hooks: !runtime_hooks.is_empty(),
        };
        let pid = clone_init(plan.namespaces.clone_flags, || init::container_init(&args))?;
        guard.pid = Some(pid);
        drop(go_r);
        drop(rep_w);
        drop(fifo);
        drop(options);

        cgroup.add_process(pid)?;
        nix::unistd::write(&go_w, &pid.to_ne_bytes()).map_err(|source| RuntimeError::Sys {
            call: "write go",
            source,
        })?;

        let (start_time, _) = state::proc_start_time(pid).ok_or_else(|| RuntimeError::Init {
            id: id.to_string(),
            message: "init exited during setup".into(),
        })?;
        let mut record = Record {
            id: id.to_string(),
            pid,
            start_time,
            bundle: bundle.clone(),
            annotations: plan.spec.annotations().clone().unwrap_or_default(),
            cgroup_path: plan.cgroup_path.clone(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            poststop: hooks.and_then(|h| h.poststop().clone()).unwrap_or_default(),
            poststart: hooks
                .and_then(|h| h.poststart().clone())
                .unwrap_or_default(),
        };
        let mut reader = LineReader::new(&rep_r);
        loop {
            match reader.next_line() {
                Some(line) if line.first() == Some(&b'H') => {
                    let json = state_json(&record, ContainerState::Creating);
                    hooks::run_all(&runtime_hooks, &json).map_err(|source| RuntimeError::Hook {
                        id: id.to_string(),
                        source,
                    })?;
                    nix::unistd::write(&go_w, b"h").map_err(|source| RuntimeError::Sys {
                        call: "write go",
                        source,
                    })?;
                }
                Some(line) if line.first() == Some(&b'R') => break,
                Some(line) if line.first() == Some(&b'E') => {
                    return Err(RuntimeError::Init {
                        id: id.to_string(),
                        message: String::from_utf8_lossy(&line[1..]).into_owned(),
                    });
                }
                _ => {
                    return Err(RuntimeError::Init {
                        id: id.to_string(),
                        message: "init exited during setup".into(),
                    });
                }
            }
        }
        record.start_time = start_time;
        state::save(&dir, &record).map_err(state_err)?;
        if let Some(path) = &pid_file {
            write_pid_file(path, pid)?;
        }
        Ok(Launched {
            record,
            dir,
            go: go_w,
            report: rep_r,
            guard,
        })
    }
}

/// A container whose init reported ready, with the pipes still open.
struct Launched {
    record: Record,
    dir: PathBuf,
    go: OwnedFd,
    report: OwnedFd,
    guard: CreateGuard,
}

/// Undoes a half-made container on every error path of create: kills and
/// reaps the init, removes the cgroup and the state directory. A cleanup
/// error is logged, never returned, so it cannot hide the error that caused
/// the cleanup.
struct CreateGuard {
    dir: Option<PathBuf>,
    cgroup: Option<Cgroup>,
    pid: Option<i32>,
}

impl CreateGuard {
    fn disarm(mut self) {
        self.dir = None;
        self.cgroup = None;
        self.pid = None;
    }
}

impl Drop for CreateGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
        if let Some(cgroup) = self.cgroup.take()
            && let Err(e) = delete_cgroup(&cgroup)
        {
            tracing::warn!("cleanup after failed create: {e}");
        }
        if let Some(dir) = self.dir.take()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!("cleanup after failed create: {}: {e}", dir.display());
        }
    }
}

/// Clones the container init from this process with the namespace `flags`.
fn clone_init(flags: libc::c_int, child: impl FnOnce()) -> Result<i32, RuntimeError> {
    // SAFETY: with a null stack, clone(2) behaves like fork(2) with extra
    // flags. The caller is single-threaded (crate invariant), so the child
    // holds no lock another thread could own. The child never returns here:
    // `child` execs or `_exit`s.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match ret {
        r if r < 0 => Err(RuntimeError::Sys {
            call: "clone",
            source: nix::Error::last(),
        }),
        0 => {
            child();
            // SAFETY: unreachable in practice (the child execs or exits);
            // never fall back into the caller's code as a second process.
            unsafe { libc::_exit(1) }
        }
        pid => Ok(pid as i32),
    }
}

/// Reads newline-terminated messages from the init's report pipe.
struct LineReader<'a> {
    fd: &'a OwnedFd,
    buf: Vec<u8>,
}

impl<'a> LineReader<'a> {
    fn new(fd: &'a OwnedFd) -> Self {
        LineReader {
            fd,
            buf: Vec::new(),
        }
    }

    /// The next line without its newline; `None` at EOF.
    fn next_line(&mut self) -> Option<Vec<u8>> {
        let mut chunk = [0u8; 4096];
        // Bounded: a message is short, and EOF ends it.
        for _ in 0..4096 {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(line[..line.len() - 1].to_vec());
            }
            match nix::unistd::read(self.fd, &mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(nix::Error::EINTR) => continue,
                Err(_) => return None,
            }
        }
        None
    }
}

fn to_state(record: &Record, status: ContainerState) -> State {
    let mut st = State::default();
    st.set_version("1.0.2".to_string());
    st.set_id(record.id.clone());
    st.set_status(status);
    st.set_pid((status != ContainerState::Stopped).then_some(record.pid));
    st.set_bundle(record.bundle.clone());
    st.set_annotations(Some(record.annotations.clone()));
    st
}

/// The state JSON given to hooks on their stdin (with the pid even when
/// stopped, which poststop hooks find useful).
fn state_json(record: &Record, status: ContainerState) -> Vec<u8> {
    let mut st = to_state(record, status);
    st.set_pid(Some(record.pid));
    serde_json::to_vec(&st).unwrap_or_default()
}

/// Waits for our child `pid` and turns its end into an exit code.
fn wait_exit_code(pid: i32) -> Result<i32, RuntimeError> {
    use nix::sys::wait::{WaitStatus, waitpid};
    let pid = nix::unistd::Pid::from_raw(pid);
    // Bounded by the child's own life; the loop only skips stops and EINTR.
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(source) => {
                return Err(RuntimeError::Sys {
                    call: "waitpid",
                    source,
                });
            }
        }
    }
}

/// Waits (bounded) until the record's init is gone, sleeping on a pidfd.
fn wait_gone(record: &Record) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, record.pid, 0) };
    if raw < 0 {
        return;
    }
    // SAFETY: the kernel just gave us this descriptor.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    // The pid may have been reused since: only wait if it is still ours.
    if !state::init_alive(record) {
        return;
    }
    let deadline = Instant::now() + WAIT_LIMIT;
    while Instant::now() < deadline && state::init_alive(record) {
        let mut fds = [nix::poll::PollFd::new(
            pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u8));
    }
}

/// Removes a cgroup, waiting (bounded) for killed processes to leave it.
fn delete_cgroup(cgroup: &Cgroup) -> Result<(), RuntimeError> {
    let deadline = Instant::now() + WAIT_LIMIT;
    let mut pause = Duration::from_micros(200);
    loop {
        match cgroup.delete() {
            Ok(()) => return Ok(()),
            Err(e) => {
                let busy = cgroup.processes().map(|p| !p.is_empty()).unwrap_or(false);
                if Instant::now() > deadline {
                    return Err(e.into());
                }
                if busy {
                    let _ = cgroup.kill_all(nix::sys::signal::SIGKILL);
                }
                // Exiting tasks leave the cgroup asynchronously; there is no
                // event to wait on in cgroup v1, so back off briefly.
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
        }
    }
}

fn write_pid_file(path: &Path, pid: i32) -> Result<(), RuntimeError> {
    let tmp = path.with_extension("tmp-gantry");
    std::fs::write(&tmp, pid.to_string()).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn io_err(path: &Path, source: std::io::Error) -> RuntimeError {
    RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(e: spec::SpecError) -> RuntimeError {
    RuntimeError::InvalidConfig {
        field: e.field,
        reason: e.reason,
    }
}

fn state_err(e: state::StateError) -> RuntimeError {
    match e {
        state::StateError::Io { path, source } => RuntimeError::Io { path, source },
        state::StateError::Corrupt { path, reason } => RuntimeError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
        },
    }
}

fn wrong_status(id: &str, status: ContainerState, operation: &'static str) -> RuntimeError {
    RuntimeError::WrongStatus {
        id: id.to_string(),
        status: status.to_string(),
        operation,
    }
}
