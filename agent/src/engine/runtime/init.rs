//! The container's init, child side: everything between `clone(2)` and
//! `execve(2)` of the user's process.
//!
//! The init is a fork of the (single-threaded) caller, so it shares no locks
//! with anyone and may allocate freely. It never returns into the caller's
//! code: it either execs or reports its error over the report pipe and
//! `_exit`s. The report pipe is close-on-exec, so the parent reads EOF
//! exactly when the exec succeeded.
//!
//! Protocol on the report pipe (child → parent), one message per line:
//! `H` (mounts done: run the runtime's hooks, then say go), `R` (ready,
//! waiting for start), `E<message>` (a step failed). On the go channel
//! (parent → child, a Unix socket pair used as a pipe): first `n` with the
//! new network namespace's descriptor when the parent made it
//! ([`super::netns`]), then the init's host pid and the cgroup to join
//! (go), `l` once the cgroup's limits are written (the init joins
//! meanwhile but waits for it before it reports ready), and one byte after
//! the hooks.

use super::caps::{self, CapMasks};
use super::devices;
use super::hooks;
use super::mounts;
use super::netns;
use super::spec::Plan;
use nix::mount::MsFlags;
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::Process;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A setup step that failed, with the kernel's answer.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A system call failed.
    #[error("{step}: {errno}")]
    Sys {
        /// The step, e.g. `mount /proc`.
        step: String,
        /// The errno.
        errno: nix::Error,
    },
    /// A file operation failed.
    #[error("{step}: {source}")]
    Io {
        /// The step.
        step: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// Something else went wrong in a step.
    #[error("{step}: {message}")]
    Other {
        /// The step.
        step: String,
        /// What went wrong.
        message: String,
    },
}

impl SetupError {
    /// A failed system call in `step`.
    pub fn sys(step: impl Into<String>, errno: nix::Error) -> SetupError {
        SetupError::Sys {
            step: step.into(),
            errno,
        }
    }

    /// A failed file operation in `step`.
    pub fn io(step: impl Into<String>, source: std::io::Error) -> SetupError {
        SetupError::Io {
            step: step.into(),
            source,
        }
    }

    /// Any other failure in `step`.
    pub fn other(step: impl Into<String>, message: impl Into<String>) -> SetupError {
        SetupError::Other {
            step: step.into(),
            message: message.into(),
        }
    }
}

/// The result of a setup step.
pub type StepResult<T> = Result<T, SetupError>;

/// Names the step of a failed system call.
pub fn sys<T>(step: &'static str, r: nix::Result<T>) -> StepResult<T> {
    r.map_err(|e| SetupError::sys(step, e))
}

/// How the init learns that `start` was called.
#[derive(Debug, Clone, Copy)]
pub enum StartSignal {
    /// Open this `O_PATH` descriptor of `exec.fifo` for writing: it blocks
    /// until `gantry runtime start` opens the fifo for reading.
    Fifo(RawFd),
    /// Go on at once (`run`: the process that creates the container also
    /// starts it, so there is nothing to wait for).
    Immediately,
}

/// Everything the init needs, prepared by the parent before `clone`.
#[derive(Debug)]
pub struct InitArgs<'a> {
    /// The container id.
    pub id: &'a str,
    /// The checked config.
    pub plan: &'a Plan,
    /// The init's end of the go channel.
    pub go: RawFd,
    /// Write end of the report pipe (close-on-exec).
    pub report: RawFd,
    /// The parent's end of the go channel, closed in the child so that the
    /// child sees EOF if the parent dies.
    pub parent_go: RawFd,
    /// The parent's end of the report pipe, closed in the child.
    pub parent_report: RawFd,
    /// Replacement stdin, stdout, stderr.
    pub stdio: Option<[RawFd; 3]>,
    /// How to wait for start.
    pub start: StartSignal,
    /// Whether the parent must run prestart/createRuntime hooks (`H`).
    pub parent_hooks: bool,
    /// The channel that brings the new network namespace (see
    /// [`super::netns`]): the init was cloned without `CLONE_NEWNET`.
    pub netns: Option<RawFd>,
    /// The parent's end of that channel, closed in the child.
    pub parent_netns: Option<RawFd>,
}

/// The parent's go message: the init's host pid, then the cgroup v1 `tasks`
/// files to join the cgroup through (see [`join_cgroup_self`]), if any. The
/// parent sends those files open with it (`SCM_RIGHTS`, in the same order),
/// so that the init only writes to them: no path lookups on its critical
/// path, and nothing to find after pivot_root.
pub fn go_message(pid: i32, cgroup_tasks: &[PathBuf]) -> Vec<u8> {
    let paths: Vec<&[u8]> = cgroup_tasks
        .iter()
        .map(|p| p.as_os_str().as_bytes())
        .collect();
    let joined = paths.join(&b'\n');
    let mut msg = Vec::with_capacity(8 + joined.len());
    msg.extend_from_slice(&pid.to_ne_bytes());
    msg.extend_from_slice(&(joined.len() as u32).to_ne_bytes());
    msg.extend_from_slice(&joined);
    msg
}

/// The most `tasks` descriptors a go message carries (one per v1
/// hierarchy; a host has about a dozen).
pub const MAX_GO_FDS: usize = 32;

/// Waits for the parent's go (see [`go_message`]), joins the cgroup if told
/// to, and returns our host pid. Exits quietly if the parent is gone.
fn wait_for_go(go: RawFd) -> StepResult<i32> {
    let mut head = [0u8; 8];
    let fds = recv_head(go, &mut head)?;
    let pid = i32::from_ne_bytes([head[0], head[1], head[2], head[3]]);
    let len = u32::from_ne_bytes([head[4], head[5], head[6], head[7]]) as usize;
    if len > 0 {
        let mut buf = vec![0u8; len];
        if !read_exact(go, &mut buf) {
            // SAFETY: see container_init.
            unsafe { libc::_exit(1) }
        }
        let tasks: Vec<PathBuf> = buf
            .split(|b| *b == b'\n')
            .map(|p| PathBuf::from(OsStr::from_bytes(p)))
            .collect();
        if fds.len() == tasks.len() {
            for (fd, path) in fds.iter().zip(&tasks) {
                sys("write tasks", nix::unistd::write(fd, b"0").map(|_| ())).map_err(|e| {
                    SetupError::other(format!("join cgroup {}", path.display()), e.to_string())
                })?;
            }
        } else {
            join_cgroup_self(&tasks)?;
        }
    }
    Ok(pid)
}

/// Reads the go message's fixed head, and the descriptors that come with
/// it. Exits quietly if the parent is gone.
fn recv_head(go: RawFd, head: &mut [u8; 8]) -> StepResult<Vec<std::os::fd::OwnedFd>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::FromRawFd;
    let mut space = nix::cmsg_space!([RawFd; MAX_GO_FDS]);
    let mut fds = Vec::new();
    let mut got = 0;
    // Bounded: each round reads at least one byte or ends the init.
    while got < head.len() {
        let mut iov = [std::io::IoSliceMut::new(&mut head[got..])];
        let msg = match recvmsg::<()>(go, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(SetupError::sys("read go", e)),
            Ok(msg) => msg,
        };
        if msg.bytes == 0 {
            // The parent died or gave up: nobody to report to.
            // SAFETY: see container_init.
            unsafe { libc::_exit(1) }
        }
        for c in msg.cmsgs().map_err(|e| SetupError::sys("read go", e))? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors in our
                // table; nobody else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|r| unsafe { std::os::fd::OwnedFd::from_raw_fd(r) }),
                );
            }
        }
        got += msg.bytes;
    }
    Ok(fds)
}

/// The parent's message after go once the cgroup's limits are written.
pub const LIMITS_APPLIED: u8 = b'l';

/// Waits for go, joins the cgroup, waits until the parent has written the
/// cgroup's limits, then unshares the cgroup namespace if asked. Returns
/// our host pid.
fn enter_cgroup(args: &InitArgs<'_>) -> StepResult<i32> {
    let pid = wait_for_go(args.go)?;
    let mut b = [0u8; 1];
    if !read_exact(args.go, &mut b) || b[0] != LIMITS_APPLIED {
        // The parent failed to write the limits (and says so) or died.
        // SAFETY: see container_init.
        unsafe { libc::_exit(1) }
    }
    if args.plan.namespaces.new_cgroupns {
        // Only now: we are in our cgroup, which becomes the root of the new
        // cgroup namespace.
        sys(
            "unshare cgroup namespace",
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP),
        )?;
    }
    Ok(pid)
}

/// Moves the calling (single-threaded) process into a cgroup v1 group by
/// writing `0` to each hierarchy's `tasks` file.
///
/// Why not the parent writing the pid to `cgroup.procs`: moving a whole
/// thread group takes the kernel's global `cgroup_threadgroup_rwsem` for
/// writing, which waits for an RCU grace period (about 10 ms here, most of a
/// container start). A thread moving itself through `tasks` skips that lock.
pub fn join_cgroup_self(tasks: &[PathBuf]) -> StepResult<()> {
    for path in tasks {
        std::fs::write(path, b"0")
            .map_err(|e| SetupError::io(format!("join cgroup {}", path.display()), e))?;
    }
    Ok(())
}

/// Writes one protocol message; errors are ignored since the reader may be
/// gone (`create` exited), which SIGPIPE (ignored by Rust) turns into EPIPE.
pub fn report(fd: RawFd, tag: u8, text: &str) {
    let mut msg = Vec::with_capacity(text.len() + 2);
    msg.push(tag);
    msg.extend(text.bytes().map(|b| if b == b'\n' { b' ' } else { b }));
    msg.push(b'\n');
    // SAFETY: fd is our open report pipe; msg is a valid buffer.
    unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
}

/// Reads exactly `buf.len()` bytes; false on EOF or error.
pub fn read_exact(fd: RawFd, buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the slice is valid for writes of its remaining length.
        let n = unsafe { libc::read(fd, buf[done..].as_mut_ptr().cast(), buf.len() - done) };
        if n > 0 {
            done += n as usize;
        } else if n < 0 && nix::Error::last() == nix::Error::EINTR {
            continue;
        } else {
            return false;
        }
    }
    true
}

/// Set in the init once `start` let it go in fifo mode.
static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The init's entry point after `clone`: sets the container up and execs,
/// or reports the failed step and exits. Never returns.
pub fn container_init(args: &InitArgs<'_>) -> ! {
    // SAFETY: closing our copies of the parent's pipe ends.
    unsafe {
        libc::close(args.parent_go);
        libc::close(args.parent_report);
        if let Some(fd) = args.parent_netns {
            libc::close(fd);
        }
    }
    let err = match init_steps(args) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    report(args.report, b'E', &err.to_string());
    if STARTED.load(std::sync::atomic::Ordering::Relaxed) {
        // After `start` nobody reads the report pipe any more (create has
        // exited): the container's stderr is where the user will look.
        let msg = format!("gantry init: {err}\n");
        // SAFETY: writing a valid buffer to fd 2.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    }
    // SAFETY: _exit skips the caller's atexit handlers and destructors,
    // which belong to the parent's copy of this process.
    unsafe { libc::_exit(1) }
}

fn init_steps(args: &InitArgs<'_>) -> StepResult<std::convert::Infallible> {
    let plan = args.plan;
    let spec = &plan.spec;
    if let Some([i, o, e]) = args.stdio {
        for (from, to) in [(i, 0), (o, 1), (e, 2)] {
            if from != to {
                // SAFETY: dup2 of descriptors the parent handed us.
                if unsafe { libc::dup2(from, to) } < 0 {
                    return Err(SetupError::sys("dup2 stdio", nix::Error::last()));
                }
            }
        }
    }
    // Device nodes and mount targets get exactly the modes asked for.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());

    for (flag, path) in &plan.namespaces.join {
        // The parent joined the pid namespace for us: it only applies to
        // children, so it had to be done before the clone.
        if *flag == libc::CLONE_NEWPID {
            continue;
        }
        let fd = nix::fcntl::open(
            path.as_path(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| SetupError::sys(format!("open namespace {}", path.display()), e))?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::from_bits_truncate(*flag))
            .map_err(|e| SetupError::sys(format!("join namespace {}", path.display()), e))?;
    }
    if plan.namespaces.has(libc::CLONE_NEWUTS) {
        if let Some(name) = spec.hostname().as_deref().filter(|h| !h.is_empty()) {
            sys("sethostname", nix::unistd::sethostname(name))?;
        }
        if let Some(name) = spec.domainname().as_deref().filter(|h| !h.is_empty()) {
            // SAFETY: the pointer and length describe `name`.
            let r = unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) };
            if r < 0 {
                return Err(SetupError::sys("setdomainname", nix::Error::last()));
            }
        }
    }

    let linux = spec.linux().as_ref();
    let rootfs = plan.rootfs.as_path();
    let propagation = linux
        .and_then(|l| l.rootfs_propagation().as_deref())
        .and_then(mounts::propagation_flag)
        .unwrap_or(MsFlags::MS_SLAVE | MsFlags::MS_REC);
    mounts::do_mount(
        None,
        Path::new("/"),
        None,
        propagation | MsFlags::MS_REC,
        None,
    )?;
    mounts::do_mount(
        Some(rootfs),
        rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    // Opened after the bind just made, so that lookups through it see it.
    let root_fd = mounts::open_rootfs(rootfs)?;
    let mut dev_mounted = false;
    let mut devpts_mounted = false;
    let mut netns_pending = args.netns;
    for m in spec.mounts().iter().flatten() {
        if is_cgroup_mount(m) {
            // Mounted once we are in our cgroup namespace, below.
            continue;
        }
        let typ = m.typ().as_deref().unwrap_or("");
        if let Some(channel) = netns_pending.filter(|_| typ == "sysfs") {
            // sysfs shows the network devices of its mounter's namespace.
            netns::receive_and_join(channel)?;
            netns_pending = None;
        }
        mounts::mount_one(root_fd.as_fd(), rootfs, &plan.bundle, m)?;
        let dest = m.destination().as_path();
        if dest == Path::new("/dev") && typ == "tmpfs" {
            dev_mounted = true;
        }
        if dest == Path::new("/dev/pts") && typ == "devpts" {
            devpts_mounted = true;
        }
    }
    if let Some(channel) = netns_pending {
        // Before devices, hooks and `lo`: from here on everything sees the
        // container's network namespace, as if `clone` had made it.
        netns::receive_and_join(channel)?;
    }
    if dev_mounted {
        devices::create_in_fresh_dev(rootfs, devpts_mounted)?;
    }
    for (i, d) in linux
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let dev = devices::from_spec(d)
            .map_err(|e| SetupError::other(format!("linux.devices[{i}]"), e))?;
        devices::create(rootfs, &dev)?;
    }

    // Everything so far ran while the parent made the cgroup. The go (and
    // joining the cgroup) waits as late as possible: until just before
    // `R`, unless something before pivot_root needs to be in the cgroup
    // namespace (cgroup mounts) or to know our pid (hooks). The join needs
    // no host path: the parent sends the `tasks` files open with go.
    let late_go = !args.parent_hooks
        && !spec.mounts().iter().flatten().any(is_cgroup_mount)
        && spec
            .hooks()
            .as_ref()
            .and_then(|h| h.create_container().as_ref())
            .is_none_or(|l| l.is_empty());
    let mut host_pid = 0;
    if !late_go {
        host_pid = enter_cgroup(args)?;
        for m in spec
            .mounts()
            .iter()
            .flatten()
            .filter(|m| is_cgroup_mount(m))
        {
            mounts::mount_cgroups(rootfs, m)?;
        }
    }

    if args.parent_hooks {
        report(args.report, b'H', "");
        let mut b = [0u8; 1];
        if !read_exact(args.go, &mut b) {
            // SAFETY: see container_init.
            unsafe { libc::_exit(1) }
        }
    }
    let state_json = |status: &str, host_pid: i32| {
        serde_json::to_vec(&serde_json::json!({
            "ociVersion": "1.0.2",
            "id": args.id,
            "status": status,
            "pid": host_pid,
            "bundle": plan.bundle,
            "annotations": spec.annotations().clone().unwrap_or_default(),
        }))
        .unwrap_or_default()
    };
    if let Some(list) = spec
        .hooks()
        .as_ref()
        .and_then(|h| h.create_container().as_ref())
    {
        hooks::run_all(list, &state_json("created", host_pid))
            .map_err(|e| SetupError::other("createContainer hook", e.to_string()))?;
    }

    drop(root_fd);
    let old_root = mounts::pivot_root(rootfs)?;

    if let Some(sysctl) = linux.and_then(|l| l.sysctl().as_ref()) {
        for (key, value) in sysctl {
            let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&path, value).map_err(|e| SetupError::io(format!("sysctl {key}"), e))?;
        }
    }
    for p in linux
        .and_then(|l| l.masked_paths().as_ref())
        .into_iter()
        .flatten()
    {
        mounts::mask_path(Path::new(p))?;
    }
    for p in linux
        .and_then(|l| l.readonly_paths().as_ref())
        .into_iter()
        .flatten()
    {
        mounts::readonly_path(Path::new(p))?;
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        mounts::do_mount(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )?;
    }
    if plan.namespaces.creates(libc::CLONE_NEWNET) {
        loopback_up()?;
    }

    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| SetupError::other("process", "missing"))?;
    if let Some(adj) = process.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| SetupError::io("write oom_score_adj", e))?;
    }
    let prepared = PreparedProcess::new(process)?;
    if late_go {
        host_pid = enter_cgroup(args)?;
    }

    // The old root's unmount ran in parallel with everything since
    // pivot_root; nothing of it may be mounted when the container is ready.
    old_root.detach()?;
    report(args.report, b'R', "");
    match args.start {
        StartSignal::Fifo(fd) => {
            let path = format!("/proc/self/fd/{fd}");
            let fifo = nix::fcntl::open(
                path.as_str(),
                nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| SetupError::sys("open exec fifo", e))?;
            sys(
                "write exec fifo",
                nix::unistd::write(&fifo, b"0").map(|_| ()),
            )?;
            STARTED.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        StartSignal::Immediately => {}
    }
    if let Some(list) = spec
        .hooks()
        .as_ref()
        .and_then(|h| h.start_container().as_ref())
    {
        hooks::run_all(list, &state_json("running", host_pid))
            .map_err(|e| SetupError::other("startContainer hook", e.to_string()))?;
    }
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe { libc::setsid() };
    prepared.exec()
}

fn is_cgroup_mount(m: &oci_spec::runtime::Mount) -> bool {
    matches!(m.typ().as_deref(), Some("cgroup" | "cgroup2"))
}

/// Brings up `lo` in the container's new network namespace (one ioctl; no
/// netlink socket needed), unless it is up already: the helper that made
/// the namespace brings it up too, off this path ([`netns`]).
fn loopback_up() -> StepResult<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq we own.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(SetupError::sys("socket for lo", nix::Error::last()));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut r = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
        if r == 0 && req.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            r = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        }
        let errno = nix::Error::last();
        libc::close(sock);
        if r < 0 {
            return Err(SetupError::sys("bring up lo", errno));
        }
    }
    Ok(())
}

/// The OCI rlimit name → resource number.
pub fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

/// Finds `program` the way `execvp` would, but in `PATH` from the
/// container's environment (not ours), as runc does.
pub fn lookup_program(program: &str, env: &[String]) -> Option<PathBuf> {
    let is_exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_exec(&p).then_some(p);
    }
    let path = env
        .iter()
        .rev()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| is_exec(p))
}

/// The home directory of `uid` in the container's `/etc/passwd`.
fn home_of(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[5].to_string())
    })
}

/// A user process ready to exec: resolved program, C strings built. Made
/// before the init reports ready, so a missing program fails `create`.
#[derive(Debug)]
pub struct PreparedProcess {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: PathBuf,
    uid: u32,
    gid: u32,
    groups: Vec<Gid>,
    umask: u32,
    caps: CapMasks,
    no_new_privs: bool,
    rlimits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
}

fn cstring(step: &str, s: impl AsRef<OsStr>) -> StepResult<CString> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| SetupError::other(step, "contains a NUL byte"))
}

impl PreparedProcess {
    /// Resolves and converts `process` (inside the container's root).
    pub fn new(process: &Process) -> StepResult<PreparedProcess> {
        let args = process.args().as_deref().unwrap_or(&[]);
        let first = args
            .first()
            .ok_or_else(|| SetupError::other("process.args", "empty"))?;
        let mut env: Vec<String> = process.env().clone().unwrap_or_default();
        let program = lookup_program(first, &env).ok_or_else(|| {
            SetupError::other(
                format!("exec {first}"),
                "no such executable in the container (PATH from process.env)",
            )
        })?;
        let user = process.user();
        if !env.iter().any(|kv| kv.starts_with("HOME=")) {
            env.push(format!(
                "HOME={}",
                home_of(user.uid()).unwrap_or_else(|| "/".into())
            ));
        }
        let mut rlimits = Vec::new();
        for limit in process.rlimits().iter().flatten() {
            let name = limit.typ().to_string();
            let res = rlimit_resource(&name)
                .ok_or_else(|| SetupError::other("process.rlimits", format!("unknown {name}")))?;
            rlimits.push((res, limit.soft(), limit.hard()));
        }
        Ok(PreparedProcess {
            program: cstring("process.args", &program)?,
            argv: args
                .iter()
                .map(|a| cstring("process.args", a))
                .collect::<StepResult<_>>()?,
            envp: env
                .iter()
                .map(|a| cstring("process.env", a))
                .collect::<StepResult<_>>()?,
            cwd: process.cwd().clone(),
            uid: user.uid(),
            gid: user.gid(),
            groups: user
                .additional_gids()
                .iter()
                .flatten()
                .map(|g| Gid::from_raw(*g))
                .collect(),
            umask: user.umask().unwrap_or(0o022),
            caps: CapMasks::from_spec(process.capabilities().as_ref()),
            no_new_privs: process.no_new_privileges().unwrap_or(false),
            rlimits,
        })
    }

    /// Applies rlimits, cwd, the user, capabilities and no_new_privs, then
    /// execs. Returns only on failure.
    pub fn exec(&self) -> StepResult<std::convert::Infallible> {
        for (res, soft, hard) in &self.rlimits {
            let lim = libc::rlimit {
                rlim_cur: *soft,
                rlim_max: *hard,
            };
            // SAFETY: lim is a valid rlimit.
            if unsafe { libc::setrlimit(*res, &lim) } < 0 {
                return Err(SetupError::sys(
                    format!("setrlimit {res}"),
                    nix::Error::last(),
                ));
            }
        }
        // As root first, so that a directory only root may enter still
        // works as a working directory; retried below as the user.
        let early_cwd = nix::unistd::chdir(self.cwd.as_path());

        caps::drop_bounding(self.caps.bounding)?;
        caps::keep_caps(true)?;
        sys("setgroups", nix::unistd::setgroups(&self.groups))?;
        sys("setgid", nix::unistd::setgid(Gid::from_raw(self.gid)))?;
        sys("setuid", nix::unistd::setuid(Uid::from_raw(self.uid)))?;
        caps::keep_caps(false)?;
        caps::set_process_caps(&self.caps)?;
        caps::raise_ambient(self.caps.ambient)?;
        if early_cwd.is_err() {
            nix::unistd::chdir(self.cwd.as_path())
                .map_err(|e| SetupError::sys(format!("chdir {}", self.cwd.display()), e))?;
        }
        if self.no_new_privs {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
                return Err(SetupError::sys(
                    "prctl PR_SET_NO_NEW_PRIVS",
                    nix::Error::last(),
                ));
            }
        }
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
            self.umask as libc::mode_t,
        ));
        reset_signals();
        // Descriptors the caller leaked must not reach the container; the
        // ones we still need are already close-on-exec.
        // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags.
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32) };
        let err = nix::unistd::execve(&self.program, &self.argv, &self.envp)
            .err()
            .unwrap_or(nix::Error::UnknownErrno);
        Err(SetupError::sys(
            format!("exec {}", self.program.to_string_lossy()),
            err,
        ))
    }
}

/// Rust ignores SIGPIPE in every program; an exec'd process must not
/// inherit that (`yes | head` would never end), nor our signal mask.
fn reset_signals() {
    // SAFETY: restoring default dispositions and an empty mask.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_programs_in_the_container_path() {
        let env = vec!["PATH=/nonexistent:/bin".to_string()];
        assert_eq!(lookup_program("sh", &env), Some(PathBuf::from("/bin/sh")));
        assert_eq!(
            lookup_program("/bin/sh", &[]),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(lookup_program("no-such-program-x", &env), None);
    }

    #[test]
    fn knows_every_oci_rlimit() {
        for name in [
            "RLIMIT_NOFILE",
            "RLIMIT_NPROC",
            "RLIMIT_RTTIME",
            "RLIMIT_AS",
        ] {
            assert!(rlimit_resource(name).is_some(), "{name}");
        }
        assert!(rlimit_resource("RLIMIT_BOGUS").is_none());
    }
}
