//! Capabilities and the user switch, in the order that keeps them right.
//!
//! The bounding set is dropped first (it needs `CAP_SETPCAP`, which we still
//! hold), then the user is switched with `PR_SET_KEEPCAPS` so the permitted
//! set survives `setuid`, then effective/permitted/inheritable are set in one
//! `capset(2)`, then ambient capabilities are raised (they must be permitted
//! and inheritable already).

use super::init::{SetupError, StepResult};
use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities};
use std::str::FromStr;

/// The kernel number of an OCI capability (`CAP_NET_ADMIN` → 12).
pub fn number(cap: &Capability) -> Option<u8> {
    let name = cap.to_string();
    let name = if name.starts_with("CAP_") {
        name
    } else {
        format!("CAP_{}", name.to_uppercase())
    };
    caps::Capability::from_str(&name).ok().map(|c| c.index())
}

/// A capability set as a 64-bit mask.
pub fn mask(set: Option<&Capabilities>) -> u64 {
    set.into_iter()
        .flatten()
        .filter_map(number)
        .fold(0u64, |m, n| m | (1u64 << n))
}

/// The five sets of a process as masks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapMasks {
    /// Bounding set.
    pub bounding: u64,
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
    /// Ambient set.
    pub ambient: u64,
}

impl CapMasks {
    /// The masks of an OCI `process.capabilities` (none at all without one).
    pub fn from_spec(caps: Option<&LinuxCapabilities>) -> CapMasks {
        match caps {
            None => CapMasks::default(),
            Some(c) => CapMasks {
                bounding: mask(c.bounding().as_ref()),
                effective: mask(c.effective().as_ref()),
                permitted: mask(c.permitted().as_ref()),
                inheritable: mask(c.inheritable().as_ref()),
                ambient: mask(c.ambient().as_ref()),
            },
        }
    }
}

/// Drops every capability outside `bounding` from the bounding set.
pub fn drop_bounding(bounding: u64) -> StepResult<()> {
    for cap in 0..64u32 {
        if bounding & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r < 0 {
            let errno = nix::Error::last();
            // EINVAL: past the last capability this kernel knows.
            if errno == nix::Error::EINVAL {
                break;
            }
            return Err(SetupError::sys(
                format!("drop capability {cap} from bounding set"),
                errno,
            ));
        }
    }
    Ok(())
}

/// Keeps the permitted set across the coming `setuid` (or stops keeping it).
pub fn keep_caps(on: bool) -> StepResult<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, on as libc::c_ulong, 0, 0, 0) };
    if r < 0 {
        return Err(SetupError::sys("prctl PR_SET_KEEPCAPS", nix::Error::last()));
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets effective, permitted and inheritable in one `capset(2)`.
pub fn set_process_caps(m: &CapMasks) -> StepResult<()> {
    const VERSION_3: u32 = 0x2008_0522;
    let header = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: m.effective as u32,
            permitted: m.permitted as u32,
            inheritable: m.inheritable as u32,
        },
        CapData {
            effective: (m.effective >> 32) as u32,
            permitted: (m.permitted >> 32) as u32,
            inheritable: (m.inheritable >> 32) as u32,
        },
    ];
    // SAFETY: header and data are valid for the duration of the call and laid
    // out as the kernel's v3 structures.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if r < 0 {
        return Err(SetupError::sys("capset", nix::Error::last()));
    }
    Ok(())
}

/// Raises the ambient capabilities (after [`set_process_caps`]).
pub fn raise_ambient(ambient: u64) -> StepResult<()> {
    for cap in 0..64u32 {
        if ambient & (1u64 << cap) == 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let r = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                cap as libc::c_ulong,
                0,
                0,
            )
        };
        if r < 0 {
            return Err(SetupError::sys(
                format!("raise ambient capability {cap}"),
                nix::Error::last(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_from_names() {
        let set: Capabilities = [Capability::Chown, Capability::NetAdmin, Capability::Kill]
            .into_iter()
            .collect();
        // CHOWN 0, KILL 5, NET_ADMIN 12.
        assert_eq!(mask(Some(&set)), (1 << 0) | (1 << 5) | (1 << 12));
        assert_eq!(mask(None), 0);
        assert_eq!(number(&Capability::SysAdmin), Some(21));
    }
}
