//! A container's new network namespace, made beside the clone instead of
//! inside it.
//!
//! Why: building a network namespace is the one costly namespace (about
//! 0.45 ms of kernel time here, against 0.08 ms for the mount, pid, uts and
//! ipc namespaces together; `clone` of a plain process 0.06 ms). Inside
//! `clone` it delays the init's first instruction, and the second core has
//! nothing to do meanwhile. So the init is cloned without `CLONE_NEWNET`,
//! and a helper ([`MakeHelper`], started before the clone) unshares a
//! network namespace, opens it and hands its descriptor to the init over a
//! channel of its own (a Unix socket pair, `SCM_RIGHTS`: [`Pending`]);
//! where no helper can run, the parent does the same after the clone
//! ([`make_and_send`]). `run` starts the helper first thing, before it
//! reads the config: with the rest of the start this fast, the namespace
//! is what the init waits for (a config that wants none leaves it unused,
//! made for nothing; `create` starts it once the config asks for it). The
//! descriptor in flight keeps the namespace alive; the init joins it with
//! `setns(2)` just before it mounts the first `sysfs` (which shows the
//! network devices of its mounter's namespace) and in any case before
//! anything after its mounts (devices, hooks, `lo`), so what a hook, `exec`
//! or the user's program sees is what `clone` would have made.
//!
//! Once the namespace is sent, the helper brings its `lo` up too (an
//! `ioctl` that costs about 0.07 ms: the device's and IPv6's set-up), still
//! while the init mounts; the init checks and only brings `lo` up itself
//! if it is not up yet, so the result does not depend on who was first.
//!
//! Only a *new* network namespace without a path goes this way; a
//! namespace joined by path is joined by the init as before.

use super::RuntimeError;
use super::init::{SetupError, StepResult};
use super::vmhelper::VmHelper;
use nix::sched::CloneFlags;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The tag byte of the message that carries the namespace.
const TAG: u8 = b'n';

/// The channel between the parent and the init: a Unix stream socket pair
/// (close-on-exec), used like a pipe (parent → init) that can also carry a
/// descriptor. Returns (the init's end, the parent's end).
pub fn channel() -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

/// Parent side: makes a new network namespace, comes back to ours and sends
/// the new one to the init over `channel`.
///
/// The caller's thread switches namespaces for the time of one `unshare`
/// (the rest of the process never sees it: a network namespace is per
/// thread); an error after the unshare still tries to come back first.
pub fn make_and_send(channel: &OwnedFd) -> Result<(), RuntimeError> {
    let own = open_current("open our network namespace")?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|source| RuntimeError::Sys {
        call: "unshare network namespace",
        source,
    })?;
    let new = open_current("open the new network namespace");
    nix::sched::setns(&own, CloneFlags::CLONE_NEWNET).map_err(|source| RuntimeError::Sys {
        call: "return to our network namespace",
        source,
    })?;
    let new = new?;
    let fds = [new.as_raw_fd()];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    nix::sys::socket::sendmsg::<()>(
        channel.as_raw_fd(),
        &[IoSlice::new(&[TAG])],
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(|source| RuntimeError::Sys {
        call: "send the network namespace to the init",
        source,
    })?;
    Ok(())
}

fn open_current(call: &'static str) -> Result<OwnedFd, RuntimeError> {
    nix::fcntl::open(
        "/proc/thread-self/ns/net",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|source| RuntimeError::Sys { call, source })
}

/// Init side: receives the namespace [`make_and_send`] sent on `channel` and
/// joins it. Exits quietly if the parent is gone (nobody to report to).
pub fn receive_and_join(channel: RawFd) -> StepResult<()> {
    let Some(fd) = receive(channel)? else {
        // SAFETY: see init::container_init; the parent is gone.
        unsafe { libc::_exit(1) }
    };
    nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|e| SetupError::sys("join the new network namespace", e))
}

/// The namespace sent on `channel`; `None` at EOF (nothing was sent and
/// every sender is gone).
fn receive(channel: RawFd) -> StepResult<Option<OwnedFd>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut tag = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let received = {
        let mut iov = [IoSliceMut::new(&mut tag)];
        // Bounded: the parent sends right after the clone, or dies (EOF).
        loop {
            match recvmsg::<()>(
                channel,
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::Error::EINTR) => continue,
                Err(e) => break Err(SetupError::sys("receive network namespace", e)),
                Ok(msg) if msg.bytes == 0 => return Ok(None),
                Ok(msg) => {
                    let mut fd = None;
                    for c in msg
                        .cmsgs()
                        .map_err(|e| SetupError::sys("receive network namespace", e))?
                    {
                        if let ControlMessageOwned::ScmRights(fds) = c {
                            for raw in fds {
                                // SAFETY: the kernel just installed this
                                // descriptor in our table; nobody else owns it.
                                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                                fd.get_or_insert(owned);
                            }
                        }
                    }
                    break Ok(fd);
                }
            }
        }
    }?;
    match received {
        Some(fd) if tag[0] == TAG => Ok(Some(fd)),
        _ => Err(SetupError::other(
            "receive network namespace",
            "the parent sent no namespace",
        )),
    }
}

/// A new network namespace on its way to an init: a channel of its own
/// (the init reads it before its first `sysfs` mount; nothing else is sent
/// on it, so it needs no ordering with go) and the helper that makes it
/// and sends it there.
///
/// `run` starts one before it even reads the config ([`Pending::start`]):
/// a network namespace is the longest single step of a start (0.5-0.6 ms
/// of kernel time) and the init waits for it, so it should begin as early
/// as it can. A config without a new network namespace (host network, a
/// namespace joined by path) then leaves it unused: it is dropped after
/// the container ran, its namespace never joined.
#[derive(Debug)]
pub struct Pending {
    /// The init's end (close-on-exec).
    pub init_end: OwnedFd,
    /// Our end: the helper sends on its copy; we send on it if it fails.
    pub parent_end: OwnedFd,
    /// None if no helper could be started: [`Pending::finish`] makes and
    /// sends the namespace itself.
    helper: Option<MakeHelper>,
    /// Whether [`Pending::finish`] is done.
    finished: bool,
}

impl Pending {
    /// Makes the channel and starts the helper.
    pub fn start() -> Result<Pending, RuntimeError> {
        let (init_end, parent_end) = channel().map_err(|source| RuntimeError::Sys {
            call: "socketpair",
            source,
        })?;
        let helper = MakeHelper::start(&parent_end);
        Ok(Pending {
            init_end,
            parent_end,
            helper,
            finished: false,
        })
    }

    /// Whether a helper makes the namespace (else [`Pending::finish`] does).
    pub fn has_helper(&self) -> bool {
        self.helper.is_some()
    }

    /// Waits for the helper; if it sent nothing, makes and sends the
    /// namespace here. After this the init will find its namespace. Once
    /// done, later calls do nothing.
    pub fn finish(&mut self) -> Result<(), RuntimeError> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        let sent = self.helper.take().is_some_and(MakeHelper::wait);
        if !sent {
            make_and_send(&self.parent_end)?;
        }
        Ok(())
    }
}

/// A helper process that makes the namespace and sends it ([`make_and_send`]
/// without the parent's time): started before the clone, when the second
/// core has nothing to do (the parent reads the config, opens the cgroup
/// hierarchies and clones the init meanwhile). It shares our memory
/// (`CLONE_VM`, its own small stack) but touches none of it: raw system
/// calls only, no errno, no allocation. Its message is in the channel
/// before the parent's go, which [`MakeHelper::wait`] comes before.
#[derive(Debug)]
pub struct MakeHelper {
    helper: VmHelper,
}

impl MakeHelper {
    /// Starts the helper sending on `channel`; None if it cannot be started
    /// (the caller then calls [`make_and_send`] itself).
    pub fn start(channel: &OwnedFd) -> Option<MakeHelper> {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `helper_main` follows vmhelper's rules; its argument is
        // the descriptor's number itself, not a pointer. Without
        // CLONE_FILES the helper has its own copy of our descriptor table.
        let helper = unsafe {
            VmHelper::start(
                helper_main,
                channel.as_raw_fd() as usize as *mut libc::c_void,
                false,
            )
        };
        #[cfg(not(target_arch = "x86_64"))]
        let helper = {
            let _ = channel;
            None
        };
        helper.map(|helper| MakeHelper { helper })
    }

    /// Waits for the helper; true if it sent the namespace.
    pub fn wait(self) -> bool {
        self.helper.wait()
    }
}

/// The helper's body: `unshare(CLONE_NEWNET)`, open the new namespace,
/// send it with the tag byte on the channel (its argument), bring `lo` up.
/// Exits 0 once sent, 1 otherwise (nothing sent: the parent then does it
/// itself).
#[cfg(target_arch = "x86_64")]
extern "C" fn helper_main(arg: *mut libc::c_void) -> libc::c_int {
    use super::mounts::raw_syscall5 as sys5;
    const PATH: &[u8] = b"/proc/thread-self/ns/net\0";
    /// A control message carrying one descriptor, laid out as
    /// `CMSG_SPACE(sizeof(int))` bytes.
    #[repr(C)]
    struct OneFd {
        header: libc::cmsghdr,
        fd: libc::c_int,
        _pad: libc::c_int,
    }
    let channel = arg as usize;
    // SAFETY: raw system calls with valid pointers into this stack frame and
    // a NUL-terminated static path; nothing shared is written.
    unsafe {
        if sys5(libc::SYS_unshare, libc::CLONE_NEWNET as usize, 0, 0, 0, 0) < 0 {
            return 1;
        }
        let fd = sys5(
            libc::SYS_openat,
            libc::AT_FDCWD as isize as usize,
            PATH.as_ptr() as usize,
            (libc::O_RDONLY | libc::O_CLOEXEC) as usize,
            0,
            0,
        );
        if fd < 0 {
            return 1;
        }
        let tag = [TAG];
        let mut iov = libc::iovec {
            iov_base: tag.as_ptr() as *mut libc::c_void,
            iov_len: 1,
        };
        let mut control = OneFd {
            header: std::mem::zeroed(),
            fd: fd as libc::c_int,
            _pad: 0,
        };
        control.header.cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        control.header.cmsg_level = libc::SOL_SOCKET;
        control.header.cmsg_type = libc::SCM_RIGHTS;
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = (&mut control as *mut OneFd).cast();
        msg.msg_controllen = std::mem::size_of::<OneFd>() as _;
        let sent = sys5(
            libc::SYS_sendmsg,
            channel,
            &msg as *const libc::msghdr as usize,
            libc::MSG_NOSIGNAL as usize,
            0,
            0,
        );
        if sent != 1 {
            return 1;
        }
        // Still in the new namespace, with time to spare (the init mounts
        // meanwhile): bring `lo` up here, off the init's path. Best effort:
        // the init checks it and brings it up itself if this failed or has
        // not happened yet (`init::loopback_up`).
        loopback_up_raw();
        // The descriptor in flight keeps the namespace; ours goes with exit.
        0
    }
}

/// `ip link set lo up` in the caller's network namespace, with raw system
/// calls only (the helper may not touch errno or allocate); errors ignored.
#[cfg(target_arch = "x86_64")]
fn loopback_up_raw() {
    use super::mounts::raw_syscall5 as sys5;
    // SAFETY: raw socket/ioctl/close calls on a zeroed ifreq on this stack.
    unsafe {
        let sock = sys5(
            libc::SYS_socket,
            libc::AF_INET as usize,
            (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as usize,
            0,
            0,
            0,
        );
        if sock < 0 {
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as libc::c_char;
        req.ifr_name[1] = b'o' as libc::c_char;
        // The kernel reads and writes the request through this pointer.
        let req: *mut libc::ifreq = &mut req;
        let sock = sock as usize;
        if sys5(
            libc::SYS_ioctl,
            sock,
            libc::SIOCGIFFLAGS as usize,
            req as usize,
            0,
            0,
        ) == 0
        {
            (*req).ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            sys5(
                libc::SYS_ioctl,
                sock,
                libc::SIOCSIFFLAGS as usize,
                req as usize,
                0,
                0,
            );
        }
        sys5(libc::SYS_close, sock, 0, 0, 0, 0);
    }
}
