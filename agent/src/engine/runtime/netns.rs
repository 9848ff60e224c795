//! A container's new network namespace, made by the parent while the init
//! sets up its mounts, instead of inside `clone(2)`.
//!
//! Why: building a network namespace is the one costly namespace (about
//! 0.45 ms of kernel time here, against 0.08 ms for the mount, pid, uts and
//! ipc namespaces together; `clone` of a plain process 0.06 ms). Inside
//! `clone` it delays the init's first instruction; the parent has nothing to
//! do at that moment but wait. So the init is cloned without
//! `CLONE_NEWNET`, and the parent, once the init runs on the other core,
//! unshares a network namespace for itself, opens it, returns to its own and
//! hands the namespace's descriptor to the init over the go channel (a Unix
//! socket pair, `SCM_RIGHTS`). The descriptor in flight keeps the namespace
//! alive; the init joins it with `setns(2)` just before it mounts the first
//! `sysfs` (which shows the network devices of its mounter's namespace) and
//! in any case before anything after its mounts (devices, hooks, `lo`), so
//! what a hook, `exec` or the user's program sees is what `clone` would have
//! made.
//!
//! Only a *new* network namespace without a path goes this way; a
//! namespace joined by path is joined by the init as before.

use super::RuntimeError;
use super::init::{SetupError, StepResult};
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
                Ok(msg) if msg.bytes == 0 => {
                    // SAFETY: see init::container_init; the parent is gone.
                    unsafe { libc::_exit(1) }
                }
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
    let fd = match received {
        Some(fd) if tag[0] == TAG => fd,
        _ => {
            return Err(SetupError::other(
                "receive network namespace",
                "the parent sent no namespace",
            ));
        }
    };
    nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
        .map_err(|e| SetupError::sys("join the new network namespace", e))
}
