//! `exec`: a new process inside a running container.
//!
//! The process joins every namespace of the container's init through
//! `/proc/PID/ns/*` and its cgroup. A pid namespace only applies to children,
//! so the caller itself enters it just around the `fork` (and returns to its
//! own right after): the new process is then a plain child of the caller,
//! which can wait for it. With a tty, the pty is allocated in the
//! container's own devpts instance (opened through `/proc/PID/root`), so
//! `tty` inside names a path that exists there.

use super::init::{PreparedProcess, SetupError, StepResult, read_exact, report, sys};
use nix::sched::CloneFlags;
use oci_spec::runtime::Process;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

/// The namespaces `exec` joins, in the order it joins them: the mount
/// namespace last, since after it the host's `/proc` paths are gone.
const NAMESPACES: &[(&str, libc::c_int)] = &[
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("net", libc::CLONE_NEWNET),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("mnt", libc::CLONE_NEWNS),
];

/// An opened pty: the master (ours) and the slave's path in the container.
#[derive(Debug)]
pub struct Pty {
    /// The master side.
    pub master: OwnedFd,
    /// The slave's path inside the container, e.g. `/dev/pts/0`.
    pub slave_path: PathBuf,
}

/// Opens a pty in the devpts instance of the container whose init is `pid`.
pub fn open_container_pty(pid: i32) -> Result<Pty, SetupError> {
    let candidates = [
        format!("/proc/{pid}/root/dev/pts/ptmx"),
        format!("/proc/{pid}/root/dev/ptmx"),
    ];
    let mut last = nix::Error::ENOENT;
    for path in &candidates {
        match nix::fcntl::open(
            path.as_str(),
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(master) => {
                // SAFETY: unlockpt and TIOCGPTN on the master we just opened.
                let n = unsafe {
                    if libc::unlockpt(master.as_raw_fd()) < 0 {
                        return Err(SetupError::sys("unlockpt", nix::Error::last()));
                    }
                    let mut n: libc::c_uint = 0;
                    if libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) < 0 {
                        return Err(SetupError::sys("TIOCGPTN", nix::Error::last()));
                    }
                    n
                };
                return Ok(Pty {
                    master,
                    slave_path: PathBuf::from(format!("/dev/pts/{n}")),
                });
            }
            Err(e) => last = e,
        }
    }
    Err(SetupError::sys("open the container's ptmx", last))
}

/// What the parent prepared for the exec child.
#[derive(Debug)]
pub struct ExecChild<'a> {
    /// The process to run.
    pub process: &'a Process,
    /// Namespace descriptors to join, in order.
    pub namespaces: &'a [(OwnedFd, libc::c_int)],
    /// The pty slave's path in the container.
    pub tty: Option<PathBuf>,
    /// Read end of the go pipe.
    pub go: RawFd,
    /// Write end of the report pipe (close-on-exec).
    pub report: RawFd,
}

/// Namespace descriptors with their `CLONE_NEW*` flag.
pub type Namespaces = Vec<(OwnedFd, libc::c_int)>;

/// Opens the init's namespaces that differ from ours: those `setns` joins
/// and, separately, the pid namespace.
pub fn open_namespaces(pid: i32) -> StepResult<(Namespaces, Option<OwnedFd>)> {
    let differs = |name: &str| -> StepResult<bool> {
        use std::os::unix::fs::MetadataExt;
        let theirs = std::fs::metadata(format!("/proc/{pid}/ns/{name}"))
            .map_err(|e| SetupError::io(format!("stat /proc/{pid}/ns/{name}"), e))?;
        let ours = std::fs::metadata(format!("/proc/self/ns/{name}"))
            .map_err(|e| SetupError::io(format!("stat /proc/self/ns/{name}"), e))?;
        Ok(theirs.ino() != ours.ino() || theirs.dev() != ours.dev())
    };
    let open = |name: &str| -> StepResult<OwnedFd> {
        let path = format!("/proc/{pid}/ns/{name}");
        nix::fcntl::open(
            path.as_str(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| SetupError::sys(format!("open {path}"), e))
    };
    let mut list = Vec::new();
    for (name, flag) in NAMESPACES {
        if differs(name)? {
            list.push((open(name)?, *flag));
        }
    }
    let pid_ns = if differs("pid")? {
        Some(open("pid")?)
    } else {
        None
    };
    Ok((list, pid_ns))
}

/// The exec child after `fork`: joins, sets up and execs. Never returns.
pub fn exec_child(args: &ExecChild<'_>) -> ! {
    let err = match exec_steps(args) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    report(args.report, b'E', &err.to_string());
    // SAFETY: _exit skips the parent's atexit handlers and destructors.
    unsafe { libc::_exit(127) }
}

fn exec_steps(args: &ExecChild<'_>) -> StepResult<std::convert::Infallible> {
    let mut go = [0u8; 1];
    if !read_exact(args.go, &mut go) {
        // SAFETY: see exec_child.
        unsafe { libc::_exit(127) }
    }
    for (fd, flag) in args.namespaces {
        sys(
            "setns",
            nix::sched::setns(fd.as_fd(), CloneFlags::from_bits_truncate(*flag)),
        )
        .map_err(|e| SetupError::other("join container namespace", e.to_string()))?;
    }
    sys("chdir /", nix::unistd::chdir("/"))?;
    if let Some(slave) = &args.tty {
        sys("setsid", nix::unistd::setsid().map(|_| ()))?;
        let fd = nix::fcntl::open(
            slave.as_path(),
            nix::fcntl::OFlag::O_RDWR,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| SetupError::sys(format!("open {}", slave.display()), e))?;
        // SAFETY: TIOCSCTTY on a terminal we just opened.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
            return Err(SetupError::sys("TIOCSCTTY", nix::Error::last()));
        }
        for to in 0..3 {
            // SAFETY: dup2 onto the standard descriptors.
            if unsafe { libc::dup2(fd.as_raw_fd(), to) } < 0 {
                return Err(SetupError::sys("dup2 tty", nix::Error::last()));
            }
        }
    }
    let prepared = PreparedProcess::new(args.process)?;
    prepared.exec()
}

/// Creates a close-on-exec pipe: (read, write).
pub fn pipe() -> Result<(OwnedFd, OwnedFd), nix::Error> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
}

/// Reads the report pipe until EOF: `Ok(())` when the child exec'd (EOF
/// without message), the child's error otherwise.
pub fn read_exec_report(fd: &OwnedFd) -> Result<(), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Bounded: a message is one line, EOF comes with the exec.
    for _ in 0..1024 {
        match nix::unistd::read(fd, &mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(format!("read exec report: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    match text.lines().find(|l| l.starts_with('E')) {
        Some(line) => Err(line[1..].to_string()),
        None => Ok(()),
    }
}
