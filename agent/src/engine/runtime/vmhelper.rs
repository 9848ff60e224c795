//! Short-lived helper processes that share the caller's memory
//! (`CLONE_VM`, a small stack of their own) to make a few system calls in
//! parallel with it on the other core.
//!
//! A helper touches none of the caller's memory but its own stack and the
//! read-only argument it is given: raw system calls only
//! ([`super::mounts::raw_syscall5`]), no errno, no allocation, no locks (the
//! caller's thread-local storage is shared). It is reaped before its stack
//! and argument are freed ([`VmHelper::wait`] or drop).

/// A started helper; see the module docs.
#[derive(Debug)]
pub struct VmHelper {
    pid: libc::pid_t,
    /// The helper's stack; freed only after the helper has exited.
    _stack: Vec<u128>,
}

impl VmHelper {
    /// Starts `body(arg)` in a helper; None if it cannot be started (the
    /// caller then does the work itself). `share_files` shares the
    /// descriptor table (`CLONE_FILES`) instead of copying it.
    ///
    /// # Safety
    /// `body` must follow the module's rules, and whatever `arg` points to
    /// must stay valid and unchanged until the helper is reaped.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn start(
        body: extern "C" fn(*mut libc::c_void) -> libc::c_int,
        arg: *mut libc::c_void,
        share_files: bool,
    ) -> Option<VmHelper> {
        const STACK_WORDS: usize = 4096; // 64 KiB; a few system calls
        // Not zeroed: a zeroed 64 KiB is 16 page faults (a memset) on the
        // critical path; the helper touches only the top of its stack.
        let mut stack = Vec::<u128>::with_capacity(STACK_WORDS);
        // SAFETY: one past the end of the allocation (its capacity), 16-byte
        // aligned (u128); the memory is ours for as long as `stack` lives.
        let top = unsafe { stack.as_mut_ptr().add(STACK_WORDS) }.cast::<libc::c_void>();
        let files = if share_files { libc::CLONE_FILES } else { 0 };
        // SAFETY: the helper runs `body` on its own stack, which lives until
        // it is reaped; the caller vouches for `body` and `arg`.
        let pid = unsafe { libc::clone(body, top, libc::CLONE_VM | files | libc::SIGCHLD, arg) };
        (pid > 0).then_some(VmHelper { pid, _stack: stack })
    }

    /// No helpers on other architectures (their system calls are x86-64 asm).
    ///
    /// # Safety
    /// None needed; the signature matches the x86-64 one.
    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn start(
        _body: extern "C" fn(*mut libc::c_void) -> libc::c_int,
        _arg: *mut libc::c_void,
        _share_files: bool,
    ) -> Option<VmHelper> {
        None
    }

    /// Waits for the helper; true if it exited 0.
    pub fn wait(mut self) -> bool {
        self.reap()
    }

    fn reap(&mut self) -> bool {
        if self.pid <= 0 {
            return false;
        }
        let mut status = 0;
        // Bounded by the helper's few system calls.
        loop {
            // SAFETY: waiting for our own child; status is a valid int.
            let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if r == self.pid {
                break;
            }
            if r < 0 && nix::Error::last() == nix::Error::EINTR {
                continue;
            }
            self.pid = 0;
            return false;
        }
        self.pid = 0;
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
    }
}

impl Drop for VmHelper {
    fn drop(&mut self) {
        // The stack must outlive the helper that runs on it.
        self.reap();
    }
}
