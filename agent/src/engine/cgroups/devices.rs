//! Device access rules for cgroup v2: an eBPF program built from the rules.
//!
//! cgroup v1 takes rules as lines in `devices.allow`/`devices.deny` (the v1
//! backend writes those). cgroup v2 has no device files: the kernel asks a
//! `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the group, once per
//! device access, with the device type, major, minor and requested access.
//!
//! The program mirrors v1's semantics so that one spec means the same on
//! both: rules apply in spec order and the last rule that matches decides,
//! so the program checks them from last to first and returns at the first
//! match; an access no rule matches is allowed (a fresh v1 group allows
//! everything; real specs start with a deny-all rule). An allow rule matches
//! when it grants every requested access bit, a deny rule when it denies any.
//!
//! The instructions are assembled by hand (as crun does) so no compiler or
//! BPF library is needed; loading and attaching are two raw `bpf(2)` calls
//! (`crate::bpf`).

use super::CgroupError;
use super::limits::DeviceRule;
use crate::bpf::{
    AND64_K, EXIT, Insn, JEQ64_K, JNE32_K, JNE64_K, LDX_MEM_W, MOV64_K, MOV64_X, RSH64_K, insn,
};
use std::os::fd::AsRawFd;
use std::path::Path;

// Registers: r1 holds the context; the prologue loads its fields.
const R0: u8 = 0;
const R1: u8 = 1;
/// Device type: 1 block, 2 char.
const R_TYPE: u8 = 2;
/// Requested access bits: 1 mknod, 2 read, 4 write.
const R_ACCESS: u8 = 3;
const R_MAJOR: u8 = 4;
const R_MINOR: u8 = 5;
const R_TMP: u8 = 6;

// `struct bpf_cgroup_dev_ctx` values.
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;
const ACC_MKNOD: i32 = 1;
const ACC_READ: i32 = 2;
const ACC_WRITE: i32 = 4;
const ACC_ALL: i32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

fn access_bits(access: &str) -> i32 {
    access.chars().fold(0, |bits, c| {
        bits | match c {
            'm' => ACC_MKNOD,
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            _ => 0,
        }
    })
}

/// A jump to the next rule's block, its offset filled in once the block is complete.
const NEXT: i16 = i16::MIN;

/// The instructions of one rule: mismatches jump past the block.
fn rule_block(rule: &DeviceRule) -> Vec<Insn> {
    let mut block = Vec::new();
    match rule.kind {
        'b' => block.push(insn(JNE32_K, R_TYPE, 0, NEXT, DEV_BLOCK)),
        'c' => block.push(insn(JNE32_K, R_TYPE, 0, NEXT, DEV_CHAR)),
        _ => {}
    }
    let acc = access_bits(&rule.access);
    if rule.allow {
        // Every requested bit must be granted: (access & !granted) == 0.
        if acc != ACC_ALL {
            block.push(insn(MOV64_X, R_TMP, R_ACCESS, 0, 0));
            block.push(insn(AND64_K, R_TMP, 0, 0, ACC_ALL & !acc));
            block.push(insn(JNE64_K, R_TMP, 0, NEXT, 0));
        }
    } else {
        // Any requested bit denied: (access & denied) != 0.
        block.push(insn(MOV64_X, R_TMP, R_ACCESS, 0, 0));
        block.push(insn(AND64_K, R_TMP, 0, 0, acc));
        block.push(insn(JEQ64_K, R_TMP, 0, NEXT, 0));
    }
    if let Some(major) = rule.major {
        block.push(insn(JNE32_K, R_MAJOR, 0, NEXT, major as i32));
    }
    if let Some(minor) = rule.minor {
        block.push(insn(JNE32_K, R_MINOR, 0, NEXT, minor as i32));
    }
    block.push(insn(MOV64_K, R0, 0, 0, i32::from(rule.allow)));
    block.push(insn(EXIT, 0, 0, 0, 0));
    let len = block.len();
    for (i, ins) in block.iter_mut().enumerate() {
        if ins.off == NEXT {
            // A jump lands at pc + off + 1; the next block starts at `len`.
            ins.off = (len - i - 1) as i16;
        }
    }
    block
}

/// Assembles the program for `rules` (see the module docs for its meaning).
pub(crate) fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut prog = vec![
        // r2 = ctx->access_type & 0xffff (type); r3 = ctx->access_type >> 16 (access).
        insn(LDX_MEM_W, R_TYPE, R1, 0, 0),
        insn(AND64_K, R_TYPE, 0, 0, 0xffff),
        insn(LDX_MEM_W, R_ACCESS, R1, 0, 0),
        insn(RSH64_K, R_ACCESS, 0, 0, 16),
        insn(LDX_MEM_W, R_MAJOR, R1, 4, 0),
        insn(LDX_MEM_W, R_MINOR, R1, 8, 0),
    ];
    for rule in rules.iter().rev() {
        let block = rule_block(rule);
        // A rule that matches everything ends the program: the verifier
        // refuses unreachable instructions after it.
        let unconditional = block.iter().all(|i| i.off == 0);
        prog.extend(block);
        if unconditional {
            return prog;
        }
    }
    // No rule matched: allowed, as in a fresh v1 group.
    prog.push(insn(MOV64_K, R0, 0, 0, 1));
    prog.push(insn(EXIT, 0, 0, 0, 0));
    prog
}

const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Enforces `rules` on the v2 group `dir` by attaching a new device program.
/// It is attached without `BPF_F_ALLOW_MULTI`, so a later call (an update)
/// replaces the program instead of stacking another.
pub(crate) fn apply_v2(dir: &Path, rules: &[DeviceRule]) -> Result<(), CgroupError> {
    let fail = |reason: String| CgroupError::DeviceProgram {
        path: dir.to_path_buf(),
        reason,
    };
    let prog = crate::bpf::load(
        BPF_PROG_TYPE_CGROUP_DEVICE,
        BPF_CGROUP_DEVICE,
        "gantry_devices",
        &program(rules),
    )
    .map_err(fail)?;
    let group = std::fs::File::open(dir).map_err(|e| super::fs::io_err(dir, e))?;
    let mut attr = ProgAttachAttr {
        target_fd: group.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        ..ProgAttachAttr::default()
    };
    crate::bpf::bpf(crate::bpf::BPF_PROG_ATTACH, &mut attr)
        .map_err(|e| fail(format!("attach: {e}")))?;
    // The attachment holds its own reference; our fds close here.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `prog` over one device access the way the kernel would, for the
    /// subset of instructions [`program`] emits.
    fn run(prog: &[Insn], typ: i32, access: i32, major: u32, minor: u32) -> u64 {
        let ctx = [((access as u32) << 16) | typ as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        for _ in 0..10_000 {
            let i = prog[pc];
            let (dst, src) = (i.dst(), i.src());
            let imm64 = i.imm as i64 as u64;
            let mut next = pc + 1;
            let jump = pc as isize + i.off as isize + 1;
            match i.code {
                LDX_MEM_W => {
                    assert_eq!(src, 1, "loads only from ctx");
                    r[dst] = u64::from(ctx[i.off as usize / 4]);
                }
                MOV64_X => r[dst] = r[src],
                MOV64_K => r[dst] = imm64,
                AND64_K => r[dst] &= imm64,
                RSH64_K => r[dst] >>= i.imm,
                JNE32_K if r[dst] as u32 != i.imm as u32 => next = jump as usize,
                JEQ64_K if r[dst] == imm64 => next = jump as usize,
                JNE64_K if r[dst] != imm64 => next = jump as usize,
                JNE32_K | JEQ64_K | JNE64_K => {}
                EXIT => return r[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
            pc = next;
            assert!(pc < prog.len(), "fell off the program");
        }
        panic!("program did not exit");
    }

    fn rule(
        allow: bool,
        kind: char,
        major: Option<u32>,
        minor: Option<u32>,
        access: &str,
    ) -> DeviceRule {
        DeviceRule {
            allow,
            kind,
            major,
            minor,
            access: access.to_string(),
        }
    }

    const C: i32 = DEV_CHAR;
    const B: i32 = DEV_BLOCK;
    const RW: i32 = ACC_READ | ACC_WRITE;

    #[test]
    fn no_rules_allow_everything() {
        let p = program(&[]);
        assert_eq!(run(&p, C, RW, 1, 3), 1);
        assert_eq!(run(&p, B, ACC_MKNOD, 8, 0), 1);
    }

    #[test]
    fn deny_all_then_allow_some_like_docker() {
        let p = program(&[
            rule(false, 'a', None, None, "rwm"),
            rule(true, 'c', Some(1), Some(3), "rwm"), // /dev/null
            rule(true, 'c', Some(5), Some(0), "rw"),  // /dev/tty
            rule(true, 'c', Some(136), None, "rwm"),  // /dev/pts/*
            rule(true, 'a', None, None, "m"),         // mknod anything
        ]);
        assert_eq!(run(&p, C, RW, 1, 3), 1, "/dev/null");
        assert_eq!(run(&p, C, RW, 1, 5), 0, "/dev/zero not listed");
        assert_eq!(run(&p, C, ACC_READ, 5, 0), 1, "tty read");
        assert_eq!(
            run(&p, C, RW | ACC_MKNOD, 5, 0),
            0,
            "tty rw+mknod in one go"
        );
        assert_eq!(run(&p, C, RW, 136, 7), 1, "any pts");
        assert_eq!(run(&p, B, RW, 1, 3), 0, "block 1:3 is not char 1:3");
        assert_eq!(run(&p, B, ACC_MKNOD, 8, 0), 1, "mknod allowed everywhere");
        assert_eq!(run(&p, B, ACC_READ, 8, 0), 0, "but not reading a disk");
    }

    #[test]
    fn later_rules_win_and_partial_denies_bite() {
        let p = program(&[
            rule(true, 'a', None, None, "rwm"),
            rule(false, 'c', Some(1), Some(3), "w"),
        ]);
        assert_eq!(run(&p, C, ACC_READ, 1, 3), 1);
        assert_eq!(run(&p, C, RW, 1, 3), 0);
        assert_eq!(run(&p, C, RW, 1, 5), 1);
        let p = program(&[
            rule(false, 'c', Some(1), Some(3), "rwm"),
            rule(true, 'c', Some(1), Some(3), "rwm"),
        ]);
        assert_eq!(run(&p, C, RW, 1, 3), 1);
    }

    #[test]
    fn large_device_numbers_compare_as_u32() {
        let p = program(&[
            rule(false, 'a', None, None, "rwm"),
            rule(true, 'c', Some(4_000_000_000), None, "rwm"),
        ]);
        assert_eq!(run(&p, C, RW, 4_000_000_000, 1), 1);
        assert_eq!(run(&p, C, RW, 4_000_000_001, 1), 0);
    }

    #[test]
    fn an_allow_all_rule_ends_the_program() {
        let p = program(&[
            rule(false, 'c', Some(1), Some(5), "rwm"),
            rule(true, 'a', None, None, "rwm"),
        ]);
        assert_eq!(p.len(), 6 + 2, "prologue, then the allow-all block only");
        assert_eq!(run(&p, C, RW, 1, 5), 1);
    }
}
