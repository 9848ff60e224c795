//! The OCI runtime: runs an OCI bundle (`config.json` + rootfs) the way runc
//! and crun do, with Gantry's own namespace, mount and cgroup code.
//!
//! A container's init is cloned straight from the calling process (no
//! re-exec of a helper as runc does), which is why it is fast and why the
//! caller must be single-threaded.
//!
//! How a container comes to life (`create`):
//!
//! 1. [`spec`] reads and checks `config.json` in the caller: anything refused
//!    is refused before a single thing exists (no state, cgroup or process).
//! 2. The state directory `<root>/<id>` is made (its `mkdir` is the lock
//!    against a second container of the same id); `run` makes it right
//!    after the clone instead, before anything else of the id exists. A
//!    removed container's emptied directory is kept as a spare
//!    (`<root>/.spare~N`, at most four) and renamed into place instead of
//!    a `mkdir` (`RENAME_NOREPLACE`, the same lock): on a disk file system
//!    mounted with `discard`, removing a directory waits for the device.
//! 3. `clone(2)` with the namespace flags but `CLONE_NEWNET`; the child is
//!    the init ([`init`]). Parent and child talk over a close-on-exec socket
//!    pair, *go* (parent → child), and pipe, *report* (child → parent: `H`
//!    run your hooks, `R` ready, `E<step>: <errno>` failed). A helper
//!    started before the clone (by `run` before the config is even read)
//!    makes the network namespace and sends it on a channel of its own
//!    ([`netns`]: the costliest namespace, off the init's and the parent's
//!    paths). While the child sets up its mounts the parent makes
//!    the cgroup and says go; on v1 the init joins while the
//!    parent writes the limits, and waits for a second message once they
//!    are written. On cgroup v1 the child joins
//!    its cgroup itself through `tasks` (a parent writing `cgroup.procs`
//!    waits for an RCU grace period, most of a start's time), as late as it
//!    can: just before `R`, through the `tasks` files that the parent
//!    opened and sent with go (`SCM_RIGHTS`: no path lookup in the init,
//!    nothing to find after pivot_root). On v2 the parent moves it.
//! 4. The init mounts, makes devices, pivots (a helper unmounts the old root
//!    meanwhile, reaped before `R`: [`mounts::pivot_root`]), masks, reports `R` and blocks
//!    opening `exec.fifo` for writing; `start` opens it for reading, which
//!    lets the init exec the user's program. `run` skips the fifo: its init
//!    execs as soon as it is ready.
//! 5. A [`state::Record`] is saved atomically. Status is never stored: it is
//!    derived from the init (alive and the same start time) and the fifo.
//!
//! Every error path of `create` goes through one guard that kills and reaps
//! the init and removes the cgroup and the state directory.
//!
//! Invariant: nothing here starts a thread; the init and exec children are
//! forks of a single-threaded caller and may allocate freely. (The
//! [`vmhelper`]s, the init's old-root unmount and the parent's network
//! namespace, share their creator's memory but are processes of their own
//! that only make raw system calls, each reaped before its creator goes
//! past what it does.)
//!
pub mod caps;
pub mod devices;
pub mod exec;
pub mod hooks;
pub mod init;
pub mod mounts;
pub mod netns;
pub mod spec;
pub mod state;
pub mod vmhelper;

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
        let launched = self.launch(id, bundle, options, StartMode::Fifo, None)?;
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
        // A new network namespace is the rule for `run` and the longest
        // step of a start: its helper starts before the config is read
        // (see `netns::Pending`). Without one it is not used.
        let early_netns = netns::Pending::start().ok();
        let launched = self
            .launch(id, bundle, options, StartMode::Pipe, early_netns)
            .inspect_err(|_| forward_signals_to(0))?;
        let Launched {
            record,
            dir,
            go,
            report,
            guard,
            cgroup,
            unused_netns,
        } = launched;
        let pid = record.pid;
        // The init did not wait for a start signal: it execs as soon as it
        // is ready, and the report pipe closes when it did.
        let started = exec::read_exec_report(&report).map_err(|message| RuntimeError::Init {
            id: id.to_string(),
            message,
        });
        drop(go);
        drop(report);
        if let Err(e) = started {
            forward_signals_to(0);
            // The guard kills and reaps the init and removes what create made.
            drop(guard);
            return Err(e);
        }
        guard.disarm();
        self.run_poststart(&record);
        let code = wait_exit_code(pid)?;
        // Reaped (long exited) only now, off the start's path.
        drop(unused_netns);
        forward_signals_to(0);
        self.remove(&dir, &record, false, Some(cgroup))?;
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
        let (dir, record) = match self.load(id) {
            Ok(found) => found,
            // A create that died between making the directory and saving
            // the state (killed, power loss) leaves a directory without
            // state: `delete --force` clears it so the id can be used again.
            Err(RuntimeError::NotFound(_)) if force && spec::check_id(id).is_ok() => {
                let dir = self.root.join(id);
                if dir.is_dir() {
                    return std::fs::remove_dir_all(&dir).map_err(|e| io_err(&dir, e));
                }
                return Err(RuntimeError::NotFound(id.to_string()));
            }
            Err(e) => return Err(e),
        };
        let status = state::status(&dir, &record);
        // A created container never ran user code: runc deletes it too.
        if status == ContainerState::Running && !force {
            return Err(wrong_status(id, status, "delete"));
        }
        self.remove(&dir, &record, status != ContainerState::Stopped, None)
    }

    /// Starts `process` inside the running container `id`: it joins all the
    /// container's namespaces and its cgroup. The process is a child of the caller.
    pub fn exec(
        &self,
        id: &str,
        process: &Process,
        options: ExecOptions,
    ) -> Result<ExecProcess, RuntimeError> {
        // `terminal: true` is what `options.tty` does; without it there is
        // no console socket to hand a pty to, which the check refuses.
        let mut owned;
        let process = if options.tty && process.terminal() == Some(true) {
            owned = process.clone();
            owned.set_terminal(Some(false));
            &owned
        } else {
            process
        };
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
        let cgroup_tasks = self_join_tasks(&cgroup);
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
            cgroup_tasks: &cgroup_tasks,
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
        if cgroup_tasks.is_empty()
            && let Err(e) = cgroup.add_process(pid)
        {
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
    fn remove(
        &self,
        dir: &Path,
        record: &Record,
        kill: bool,
        cgroup: Option<Cgroup>,
    ) -> Result<(), RuntimeError> {
        let cgroup = cgroup.or_else(|| self.open_cgroup(record).ok());
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
        remove_state_dir(dir)
    }

    /// create up to the init's ready report; the state is saved.
    fn launch(
        &self,
        id: &str,
        bundle: &Path,
        options: CreateOptions,
        start: StartMode,
        mut early_netns: Option<netns::Pending>,
    ) -> Result<Launched, RuntimeError> {
        let pid_file = options.pid_file.clone();
        let bundle = std::fs::canonicalize(bundle).map_err(|e| io_err(bundle, e))?;
        let plan = spec::load(&bundle, id).map_err(invalid)?;
        let dir = self.root.join(id);
        let mut guard = CreateGuard {
            dir: None,
            cgroup: None,
            pid: None,
        };
        // The state directory is the lock on the id. `create` needs it
        // before the clone (the init gets the fifo); `run` makes it after
        // the clone, while the init mounts (on a disk, e.g. ext4, a mkdir
        // is 0.05-0.1 ms), and before the cgroup: a second container of the
        // same id must never touch the first one's cgroup.
        if start == StartMode::Fifo {
            make_state_dir(&self.root, &dir, id)?;
            guard.dir = Some(dir.clone());
        }
        let fifo = match start {
            StartMode::Fifo => {
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
            StartMode::Pipe => None,
        };
        let (go_r, go_w) = netns::channel().map_err(|source| RuntimeError::Sys {
            call: "socketpair",
            source,
        })?;
        // A new network namespace is made by a helper while we go on to
        // the clone and the init mounts (see `netns`), not by `clone`:
        // `run`'s, started before the config was read, or one started now.
        let clone_flags = plan.namespaces.clone_flags & !libc::CLONE_NEWNET;
        let mut netns = if plan.namespaces.clone_flags & libc::CLONE_NEWNET != 0 {
            Some(match early_netns.take() {
                Some(pending) => pending,
                None => netns::Pending::start()?,
            })
        } else {
            None
        };
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
                None => init::StartSignal::Immediately,
            },
            parent_hooks: !runtime_hooks.is_empty(),
            netns: netns.as_ref().map(|p| p.init_end.as_raw_fd()),
            parent_netns: netns.as_ref().map(|p| p.parent_end.as_raw_fd()),
        };
        let pid = {
            let _pid_ns = match plan
                .namespaces
                .join
                .iter()
                .find(|(f, _)| *f == libc::CLONE_NEWPID)
            {
                Some((_, path)) => Some(EnteredPidNs::enter(path)?),
                None => None,
            };
            clone_init(clone_flags, || init::container_init(&args))?
        };
        guard.pid = Some(pid);
        if start == StartMode::Pipe {
            // `run`: from now on our signals are the container's (installed
            // long before the user's program can run and a caller react).
            forward_signals_to(pid);
        }
        drop(go_r);
        drop(rep_w);
        drop(fifo);
        drop(options);
        if let Some(pending) = &mut netns
            && !pending.has_helper()
        {
            // First, so that the init, mounting meanwhile, waits the least.
            pending.finish()?;
        }
        if start == StartMode::Pipe {
            make_state_dir(&self.root, &dir, id)?;
            guard.dir = Some(dir.clone());
        }

        // The cgroup is made while the child already sets up its mounts
        // (two cores work at once); the child waits for go before it needs it.
        let cg_root = CgroupRoot::detect()?;
        let unlimited =
            Cgroup::create_unlimited(&cg_root, &plan.cgroup_path, Some(&plan.resources))?;
        if unlimited.created() {
            guard.cgroup = Some(unlimited.cgroup().clone());
        }
        let cgroup_tasks = self_join_tasks(unlimited.cgroup());
        // The helper is long done by now; if it failed, the namespace is
        // made here, before go, so that the init never waits in vain.
        if let Some(pending) = &mut netns {
            pending.finish()?;
        }
        // On v1 the init joins (six `tasks` writes) while we write the
        // limits; it waits for the second message, sent once they are
        // written, before it reports ready, so nothing of the user's runs
        // unlimited. On v2 we move it, after the limits as before.
        let cgroup = if cgroup_tasks.is_empty() {
            let cgroup = unlimited.apply()?;
            cgroup.add_process(pid)?;
            send_go(&go_w, &init::go_message(pid, &cgroup_tasks));
            cgroup
        } else {
            let tasks = open_tasks_files(id, &cgroup_tasks)?;
            send_go_with_fds(&go_w, &init::go_message(pid, &cgroup_tasks), &tasks);
            drop(tasks);
            unlimited.apply()?
        };
        guard.cgroup = Some(cgroup.clone());
        send_go(&go_w, &[init::LIMITS_APPLIED]);

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
            unused_netns: early_netns,
            cgroup,
            record,
            dir,
            go: go_w,
            report: rep_r,
            guard,
        })
    }
}

/// How a launched init will be told to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartMode {
    /// Through `exec.fifo`, by a later `start` (another process).
    Fifo,
    /// At once, as soon as the init is ready (`run`).
    Pipe,
}

/// A container whose init reported ready, with the pipes still open.
struct Launched {
    /// `run`'s early network namespace when the config has none to make.
    unused_netns: Option<netns::Pending>,
    cgroup: Cgroup,
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

/// This process's pid namespace for children switched to another one, and
/// switched back on drop. Joining a pid namespace only affects children, so
/// it is done around the clone by the parent.
struct EnteredPidNs {
    own: OwnedFd,
}

impl EnteredPidNs {
    fn enter(path: &Path) -> Result<EnteredPidNs, RuntimeError> {
        let open = |p: &Path| {
            nix::fcntl::open(
                p,
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| io_err(p, e.into()))
        };
        let own = open(Path::new("/proc/self/ns/pid"))?;
        let target = open(path)?;
        nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWPID).map_err(|source| {
            RuntimeError::Sys {
                call: "setns pid",
                source,
            }
        })?;
        Ok(EnteredPidNs { own })
    }
}

impl Drop for EnteredPidNs {
    fn drop(&mut self) {
        // Ours is an ancestor of the one we entered, so this is allowed.
        if let Err(e) = nix::sched::setns(&self.own, nix::sched::CloneFlags::CLONE_NEWPID) {
            tracing::error!("cannot return to our own pid namespace: {e}");
        }
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

/// The `tasks` files through which a child joins `cgroup` itself (cgroup
/// v1; see [`init::join_cgroup_self`]). Empty on v2, where the parent moves
/// the child with [`Cgroup::add_process`].
fn self_join_tasks(cgroup: &Cgroup) -> Vec<PathBuf> {
    match cgroup {
        Cgroup::V1 { dirs } => dirs.iter().map(|d| d.join("tasks")).collect(),
        Cgroup::V2 { .. } => Vec::new(),
    }
}

/// Sends a message on the go channel. A child that already failed has
/// closed its end: its report, read next, says why, so a failed write is
/// not the error to return.
fn send_go(go: &OwnedFd, msg: &[u8]) {
    if let Err(e) = write_all(go, msg) {
        tracing::debug!("write go: {e}");
    }
}

/// Opens the cgroup v1 `tasks` files the init joins through (write only).
fn open_tasks_files(id: &str, paths: &[PathBuf]) -> Result<Vec<OwnedFd>, RuntimeError> {
    if paths.len() > init::MAX_GO_FDS {
        return Err(RuntimeError::Init {
            id: id.to_string(),
            message: format!(
                "{} cgroup hierarchies: at most {} are supported",
                paths.len(),
                init::MAX_GO_FDS
            ),
        });
    }
    paths
        .iter()
        .map(|p| {
            nix::fcntl::open(
                p,
                nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| io_err(p, e.into()))
        })
        .collect()
}

/// Sends the go message with the `tasks` descriptors attached to it (see
/// [`init::go_message`]); a child that already failed is left to its
/// report, as in [`send_go`].
fn send_go_with_fds(go: &OwnedFd, msg: &[u8], fds: &[OwnedFd]) {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
    let sent = loop {
        match nix::sys::socket::sendmsg::<()>(
            go.as_raw_fd(),
            &[std::io::IoSlice::new(msg)],
            &cmsg,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(nix::Error::EINTR) => continue,
            other => break other,
        }
    };
    match sent {
        // The rest (the message is short; a stream socket may still split it).
        Ok(n) => send_go(go, &msg[n..]),
        Err(e) => tracing::debug!("write go: {e}"),
    }
}

/// Writes all of `data` to a pipe.
fn write_all(fd: &OwnedFd, mut data: &[u8]) -> nix::Result<()> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The pid that signals sent to `run` are passed on to (0: none).
static FORWARD_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = FORWARD_PID.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Passes SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 received by
/// this process on to `pid`, as `runc run` does, so that stopping `run`
/// stops the container (its init then decides what the signal means).
fn forward_signals_to(pid: i32) {
    FORWARD_PID.store(pid, std::sync::atomic::Ordering::Relaxed);
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        // SAFETY: installing a handler that only calls kill(2); SA_RESTART
        // keeps waitpid going.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = if pid > 0 {
                forward_signal as *const () as libc::sighandler_t
            } else {
                libc::SIG_DFL
            };
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
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

/// How many emptied state directories a state root keeps for reuse (see
/// [`make_state_dir`]); more concurrent removals than this remove theirs.
const SPARE_STATE_DIRS: usize = 4;

/// The name of spare state directory `k` in the state root. `~` is not
/// allowed in a container id ([`spec::check_id`]), so a spare is never
/// mistaken for a container's directory, and it holds no `state.json`, so
/// [`Runtime::list`] skips it.
fn spare_state_dir(root: &Path, k: usize) -> PathBuf {
    root.join(format!(".spare~{k}"))
}

/// `rename(from, to)` that fails with `EEXIST` rather than replace `to`.
fn rename_noreplace(from: &Path, to: &Path) -> nix::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
}

/// Makes the state directory `dir` of container `id` in `root` (made too
/// if missing); an existing one means the id is taken.
///
/// A spare directory left by an earlier removal ([`remove_state_dir`]) is
/// renamed into place when there is one, with `RENAME_NOREPLACE`: the same
/// lock as `mkdir` (it fails if the id's directory exists), and two
/// creations never get the same spare (the loser's rename finds none).
/// Why: on a disk file system a new directory gets a data block, and its
/// removal frees it; on ext4 mounted with `discard` (common on cloud
/// disks, and the machine the start benchmark runs on) that `rmdir` waits
/// for a synchronous device discard, 0.3-0.4 ms and up to several ms, on
/// the tail of every `run` and `delete`. A rename costs neither.
fn make_state_dir(root: &Path, dir: &Path, id: &str) -> Result<(), RuntimeError> {
    for k in 0..SPARE_STATE_DIRS {
        match rename_noreplace(&spare_state_dir(root, k), dir) {
            Ok(()) => return Ok(()),
            Err(nix::Error::EEXIST) => return Err(RuntimeError::AlreadyExists(id.to_string())),
            Err(nix::Error::ENOENT) => continue,
            // E.g. EINVAL: a file system without RENAME_NOREPLACE.
            Err(_) => break,
        }
    }
    let mut made = std::fs::create_dir(dir);
    if matches!(&made, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
        std::fs::create_dir_all(root).map_err(|e| io_err(root, e))?;
        made = std::fs::create_dir(dir);
    }
    match made {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(RuntimeError::AlreadyExists(id.to_string()))
        }
        Err(e) => Err(io_err(dir, e)),
    }
}

/// Removes a container's state directory.
///
/// Why not `remove_dir_all` straight away: the directory usually holds only
/// `state.json` (the fifo is gone after `start`, `run` never makes one), and
/// an unlink and a rename are 2 system calls where the general walk makes 10
/// on the teardown path of every `run`; anything else there takes the walk.
/// The emptied directory is kept as a spare for the next container (see
/// [`make_state_dir`] for why) while fewer than [`SPARE_STATE_DIRS`] are;
/// otherwise it is removed.
fn remove_state_dir(dir: &Path) -> Result<(), RuntimeError> {
    let _ = std::fs::remove_file(dir.join(state::STATE_FILE));
    // A spare must be empty: a container deleted before `start` still has
    // its fifo, and an interrupted save may have left its temporary file
    // (nothing else is ever written here).
    let _ = std::fs::remove_file(dir.join(state::EXEC_FIFO));
    let _ = std::fs::remove_file(dir.join(state::TEMP_FILE));
    if let Some(root) = dir.parent() {
        for k in 0..SPARE_STATE_DIRS {
            match rename_noreplace(dir, &spare_state_dir(root, k)) {
                Ok(()) => return Ok(()),
                Err(nix::Error::EEXIST) => continue,
                // ENOENT (a concurrent `delete --force` got there first) and
                // anything unexpected: the removal below says what it is.
                Err(_) => break,
            }
        }
    }
    let result = match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => std::fs::remove_dir_all(dir),
        other => other,
    };
    match result {
        // A concurrent `delete --force` got there first: the same end.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(dir, e)),
        _ => Ok(()),
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
