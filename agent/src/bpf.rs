//! Hand-assembled eBPF: instructions, the `bpf(2)` syscall, program loading,
//! hash maps and cgroup links, with no compiler or BPF library (as crun
//! does). Shared by the cgroup v2 device filter
//! (`engine::cgroups::devices`) and the overlay's connect-time load
//! balancer (`network::overlay::lb`).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// One eBPF instruction, as `struct bpf_insn` lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct Insn {
    pub(crate) code: u8,
    /// `src << 4 | dst`.
    pub(crate) regs: u8,
    pub(crate) off: i16,
    pub(crate) imm: i32,
}

// Only the tests' interpreters decode instructions.
#[cfg(test)]
impl Insn {
    /// The destination register.
    pub(crate) fn dst(&self) -> usize {
        (self.regs & 0xf) as usize
    }

    /// The source register.
    pub(crate) fn src(&self) -> usize {
        (self.regs >> 4) as usize
    }
}

/// An instruction from its fields.
pub(crate) const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// Opcodes (linux/bpf_common.h, linux/bpf.h).
/// `dst = *(u32 *)(src + off)`.
pub(crate) const LDX_MEM_W: u8 = 0x61;
/// `*(u32 *)(dst + off) = src`.
pub(crate) const STX_MEM_W: u8 = 0x63;
/// `*(u64 *)(dst + off) = src`.
pub(crate) const STX_MEM_DW: u8 = 0x7b;
/// `*(u32 *)(dst + off) = imm`.
pub(crate) const ST_MEM_W: u8 = 0x62;
/// `dst = src` (64-bit).
pub(crate) const MOV64_X: u8 = 0xbf;
/// `dst = imm` (64-bit).
pub(crate) const MOV64_K: u8 = 0xb7;
/// `dst += imm` (64-bit).
pub(crate) const ADD64_K: u8 = 0x07;
/// `dst &= imm` (64-bit).
pub(crate) const AND64_K: u8 = 0x57;
/// `dst >>= imm` (64-bit).
pub(crate) const RSH64_K: u8 = 0x77;
/// `dst = (u32)dst % (u32)src` (a zero divisor leaves dst).
pub(crate) const MOD32_X: u8 = 0x9c;
/// `if (u32)dst != imm goto +off` (JMP32 class, kernel 5.1+).
pub(crate) const JNE32_K: u8 = 0x56;
/// `if dst == imm goto +off`.
pub(crate) const JEQ64_K: u8 = 0x15;
/// `if dst != imm goto +off`.
pub(crate) const JNE64_K: u8 = 0x55;
/// `if dst != src goto +off`.
pub(crate) const JNE64_X: u8 = 0x5d;
/// `goto +off`.
pub(crate) const JA: u8 = 0x05;
/// `r0 = helper imm (r1..r5)`; r1..r5 are clobbered.
pub(crate) const CALL: u8 = 0x85;
/// `return r0`.
pub(crate) const EXIT: u8 = 0x95;
/// `dst = imm64`, two slots; with src = [`PSEUDO_MAP_FD`], imm is a map fd.
pub(crate) const LD_IMM64: u8 = 0x18;
/// `LD_IMM64`'s src register value meaning "imm is a map fd".
pub(crate) const PSEUDO_MAP_FD: u8 = 1;

/// Helper function ids (`enum bpf_func_id`).
pub(crate) const FN_MAP_LOOKUP_ELEM: i32 = 1;
/// `long bpf_map_update_elem(map, key, value, flags)`.
pub(crate) const FN_MAP_UPDATE_ELEM: i32 = 2;
/// `u64 bpf_get_socket_cookie(ctx)` (sock_addr programs: 4.12+).
pub(crate) const FN_GET_SOCKET_COOKIE: i32 = 46;
/// `u32 bpf_get_prandom_u32(void)`.
pub(crate) const FN_GET_PRANDOM_U32: i32 = 7;
/// `u64 bpf_get_netns_cookie(void *ctx)` (5.7+ for sock_addr programs).
pub(crate) const FN_GET_NETNS_COOKIE: i32 = 122;

/// The two instructions loading map `fd` into `dst`.
pub(crate) fn ld_map_fd(dst: u8, fd: &OwnedFd) -> [Insn; 2] {
    [
        insn(LD_IMM64, dst, PSEUDO_MAP_FD, 0, fd.as_raw_fd()),
        insn(0, 0, 0, 0, 0),
    ]
}

const BPF_MAP_CREATE: libc::c_long = 0;
#[cfg(test)]
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
pub(crate) const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_LINK_CREATE: libc::c_long = 28;

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`; the kernel
/// treats the fields after them as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_MAP_CREATE` (leading fields).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr` for the element commands.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` (leading fields).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// The `bpf(2)` syscall with `attr` as its `union bpf_attr` prefix.
pub(crate) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly laid out `bpf_attr` prefix of the
    // size passed; the kernel reads it and writes only through the
    // pointers it holds, whose buffers the callers keep alive for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// Loads `prog` as a program of `prog_type` for `attach_type`, returning its
/// fd; on a refusal the verifier's log is fetched with a second load to say
/// why.
pub(crate) fn load(
    prog_type: u32,
    attach_type: u32,
    name: &str,
    prog: &[Insn],
) -> Result<OwnedFd, String> {
    const LICENSE: &[u8] = b"Apache-2.0\0";
    let attr = |log: &mut Vec<u8>, level: u32| ProgLoadAttr {
        prog_type,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: level,
        log_size: log.len() as u32,
        log_buf: if level > 0 {
            log.as_mut_ptr() as u64
        } else {
            0
        },
        prog_name: name16(name),
        expected_attach_type: attach_type,
        ..ProgLoadAttr::default()
    };
    let mut no_log = Vec::new();
    match bpf(BPF_PROG_LOAD, &mut attr(&mut no_log, 0)) {
        // SAFETY: a successful BPF_PROG_LOAD returns a new fd that we own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(first) => {
            let mut log = vec![0u8; 64 * 1024];
            if let Ok(fd) = bpf(BPF_PROG_LOAD, &mut attr(&mut log, 1)) {
                // SAFETY: as above; the retry succeeded, so keep its program.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            }
            let end = log.iter().position(|&b| b == 0).unwrap_or(0);
            let text = String::from_utf8_lossy(&log[..end]);
            Err(format!("load: {first}; verifier: {}", text.trim()))
        }
    }
}

/// `BPF_MAP_TYPE_HASH`.
pub(crate) const MAP_HASH: u32 = 1;
/// `BPF_F_NO_PREALLOC`: entries are allocated on update, so an idle map
/// costs next to nothing (several agents share one machine in tests).
pub(crate) const F_NO_PREALLOC: u32 = 1;

/// `BPF_MAP_TYPE_LRU_HASH`: full, it evicts the least recently used entry.
pub(crate) const MAP_LRU_HASH: u32 = 9;

/// A map whose keys are `K` and values `V` (plain `repr(C)` data).
#[derive(Debug)]
pub(crate) struct Map<K, V> {
    fd: OwnedFd,
    _types: std::marker::PhantomData<(K, V)>,
}

impl<K: Copy, V: Copy> Map<K, V> {
    /// Creates a hash map of at most `max_entries`, allocated on update.
    pub(crate) fn hash(name: &str, max_entries: u32) -> std::io::Result<Self> {
        Self::create(MAP_HASH, F_NO_PREALLOC, name, max_entries)
    }

    /// Creates an LRU hash map of `max_entries` (preallocated: the kernel
    /// has no other kind of LRU map).
    pub(crate) fn lru(name: &str, max_entries: u32) -> std::io::Result<Self> {
        Self::create(MAP_LRU_HASH, 0, name, max_entries)
    }

    fn create(map_type: u32, flags: u32, name: &str, max_entries: u32) -> std::io::Result<Self> {
        let mut attr = MapCreateAttr {
            map_type,
            key_size: std::mem::size_of::<K>() as u32,
            value_size: std::mem::size_of::<V>() as u32,
            max_entries,
            map_flags: flags,
            map_name: name16(name),
            ..MapCreateAttr::default()
        };
        let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
        Ok(Map {
            // SAFETY: a successful BPF_MAP_CREATE returns a new fd we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            _types: std::marker::PhantomData,
        })
    }

    /// The map's fd (for [`ld_map_fd`]).
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Inserts or replaces `key`'s value; a reader sees the old or the new
    /// value, never a mix.
    pub(crate) fn set(&self, key: &K, value: &V) -> std::io::Result<()> {
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: value as *const V as u64,
            ..MapElemAttr::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
    }

    /// Deletes `key`; one that is not there is no error.
    pub(crate) fn delete(&self, key: &K) -> std::io::Result<()> {
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            ..MapElemAttr::default()
        };
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// `key`'s value, if any (tests read the maps back).
    #[cfg(test)]
    pub(crate) fn get(&self, key: &K) -> std::io::Result<Option<V>> {
        let mut value = std::mem::MaybeUninit::<V>::zeroed();
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: value.as_mut_ptr() as u64,
            ..MapElemAttr::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            // SAFETY: the kernel filled the value's `size_of::<V>()` bytes,
            // and V is plain data.
            Ok(_) => Ok(Some(unsafe { value.assume_init() })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Attaches `prog` to the cgroup open as `cgroup` with a bpf_link: it
/// stacks with other programs (links are always multi-attach) and is
/// detached by the kernel when the returned fd closes, so a process that
/// dies leaves nothing attached.
pub(crate) fn link_cgroup(
    prog: &OwnedFd,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: a successful BPF_LINK_CREATE returns a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn instructions_are_eight_bytes() {
        assert_eq!(std::mem::size_of::<super::Insn>(), 8);
    }
}
