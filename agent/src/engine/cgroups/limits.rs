//! Validation of OCI `linux.resources` and conversion to cgroup file values.
//!
//! Pure logic, no I/O: [`Limits::from_resources`] checks every field once and
//! keeps only the ones that are set, so the backends write exactly those
//! files and nothing else (container start is benchmarked).

use super::CgroupError;
use oci_spec::runtime::{LinuxDeviceType, LinuxResources};

/// The highest `cpu.shares` value the kernel accepts (`MAX_SHARES`).
pub const MAX_CPU_SHARES: u64 = 262_144;
/// The lowest `cpu.shares` value the kernel accepts (`MIN_SHARES`).
pub const MIN_CPU_SHARES: u64 = 2;
/// Bounds of a CFS period, in microseconds (kernel: 1 ms to 1 s).
const PERIOD_RANGE: std::ops::RangeInclusive<u64> = 1_000..=1_000_000;
/// The smallest CFS quota the kernel accepts, in microseconds.
const MIN_QUOTA: i64 = 1_000;

/// A limit that is either a number or explicitly unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// No limit (v1 `-1`, v2 `max`).
    Unlimited,
    /// This many units.
    Value(u64),
}

impl Limit {
    /// The value as cgroup v1 spells it.
    pub(crate) fn v1(self) -> String {
        match self {
            Limit::Unlimited => "-1".to_string(),
            Limit::Value(v) => v.to_string(),
        }
    }

    /// The value as cgroup v2 spells it.
    pub(crate) fn v2(self) -> String {
        match self {
            Limit::Unlimited => "max".to_string(),
            Limit::Value(v) => v.to_string(),
        }
    }
}

/// One device cgroup rule, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceRule {
    /// Allow (true) or deny (false).
    pub allow: bool,
    /// `a`, `b` or `c`.
    pub kind: char,
    /// Major number; `None` matches all.
    pub major: Option<u32>,
    /// Minor number; `None` matches all.
    pub minor: Option<u32>,
    /// Subset of `rwm`, never empty.
    pub access: String,
}

impl DeviceRule {
    /// The rule as v1's `devices.allow`/`devices.deny` take it, e.g. `c 1:3 rwm`.
    pub(crate) fn v1_line(&self) -> String {
        let num = |n: Option<u32>| n.map_or_else(|| "*".to_string(), |n| n.to_string());
        format!(
            "{} {}:{} {}",
            self.kind,
            num(self.major),
            num(self.minor),
            self.access
        )
    }
}

/// The resources to write, each `None` when the spec leaves it unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Memory limit in bytes.
    pub memory: Option<Limit>,
    /// Memory plus swap in bytes (OCI's `swap` is this total, as in v1).
    pub memory_swap: Option<Limit>,
    /// Soft limit in bytes (v1 `memory.soft_limit_in_bytes`, v2 `memory.low`).
    pub memory_reservation: Option<Limit>,
    /// CPU shares, already range-checked.
    pub cpu_shares: Option<u64>,
    /// CFS quota in microseconds per period.
    pub cpu_quota: Option<Limit>,
    /// CFS period in microseconds.
    pub cpu_period: Option<u64>,
    /// cpuset CPUs list, e.g. `0-2,4`.
    pub cpus: Option<String>,
    /// cpuset memory nodes list.
    pub mems: Option<String>,
    /// Maximum number of tasks.
    pub pids: Option<Limit>,
    /// Device rules in spec order.
    pub devices: Vec<DeviceRule>,
    /// Raw v2 `file = value` pairs from `linux.resources.unified`, sorted by file.
    pub unified: Vec<(String, String)>,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> CgroupError {
    CgroupError::InvalidResource {
        field,
        reason: reason.into(),
    }
}

/// OCI memory values: positive bytes, `-1` unlimited, `0` unset (as runc reads them).
fn memory_value(field: &'static str, v: Option<i64>) -> Result<Option<Limit>, CgroupError> {
    match v {
        None | Some(0) => Ok(None),
        Some(-1) => Ok(Some(Limit::Unlimited)),
        Some(v) if v > 0 => Ok(Some(Limit::Value(v as u64))),
        Some(v) => Err(invalid(
            field,
            format!("{v} is neither a byte count nor -1 (unlimited)"),
        )),
    }
}

impl Limits {
    /// Validates `resources` and keeps what is set.
    pub(crate) fn from_resources(resources: &LinuxResources) -> Result<Limits, CgroupError> {
        let mut limits = Limits::default();
        if let Some(mem) = resources.memory() {
            limits.memory = memory_value("linux.resources.memory.limit", mem.limit())?;
            limits.memory_swap = memory_value("linux.resources.memory.swap", mem.swap())?;
            limits.memory_reservation =
                memory_value("linux.resources.memory.reservation", mem.reservation())?;
            if let (Some(Limit::Value(limit)), Some(Limit::Value(swap))) =
                (limits.memory, limits.memory_swap)
                && swap < limit
            {
                return Err(invalid(
                    "linux.resources.memory.swap",
                    format!(
                        "memory+swap {swap} is below the memory limit {limit}; swap counts memory too"
                    ),
                ));
            }
            if let (Some(Limit::Value(limit)), Some(Limit::Value(res))) =
                (limits.memory, limits.memory_reservation)
                && res > limit
            {
                return Err(invalid(
                    "linux.resources.memory.reservation",
                    format!("reservation {res} is above the memory limit {limit}"),
                ));
            }
            ignored("linux.resources.memory.kernel", mem.kernel().is_some());
            ignored(
                "linux.resources.memory.kernelTCP",
                mem.kernel_tcp().is_some(),
            );
            ignored(
                "linux.resources.memory.swappiness",
                mem.swappiness().is_some(),
            );
            ignored(
                "linux.resources.memory.disableOOMKiller",
                mem.disable_oom_killer() == Some(true),
            );
        }
        if let Some(cpu) = resources.cpu() {
            limits.cpu_shares = match cpu.shares() {
                None | Some(0) => None,
                Some(s) if (MIN_CPU_SHARES..=MAX_CPU_SHARES).contains(&s) => Some(s),
                Some(s) => {
                    return Err(invalid(
                        "linux.resources.cpu.shares",
                        format!("{s} is outside {MIN_CPU_SHARES}..={MAX_CPU_SHARES}"),
                    ));
                }
            };
            limits.cpu_quota = match cpu.quota() {
                None | Some(0) => None,
                Some(q) if q < 0 => Some(Limit::Unlimited),
                Some(q) if q < MIN_QUOTA => {
                    return Err(invalid(
                        "linux.resources.cpu.quota",
                        format!("{q}us is below the kernel's minimum of {MIN_QUOTA}us"),
                    ));
                }
                Some(q) => Some(Limit::Value(q as u64)),
            };
            limits.cpu_period = match cpu.period() {
                None | Some(0) => None,
                Some(p) if PERIOD_RANGE.contains(&p) => Some(p),
                Some(p) => {
                    return Err(invalid(
                        "linux.resources.cpu.period",
                        format!("{p}us is outside 1000..=1000000us"),
                    ));
                }
            };
            limits.cpus = cpu_list("linux.resources.cpu.cpus", cpu.cpus().as_deref())?;
            limits.mems = cpu_list("linux.resources.cpu.mems", cpu.mems().as_deref())?;
            ignored(
                "linux.resources.cpu.realtimeRuntime",
                cpu.realtime_runtime().is_some(),
            );
            ignored(
                "linux.resources.cpu.realtimePeriod",
                cpu.realtime_period().is_some(),
            );
            ignored("linux.resources.cpu.idle", cpu.idle().is_some());
            ignored("linux.resources.cpu.burst", cpu.burst().is_some());
        }
        if let Some(pids) = resources.pids() {
            limits.pids = match pids.limit() {
                0 => None,
                l if l < 0 => Some(Limit::Unlimited),
                l => Some(Limit::Value(l as u64)),
            };
        }
        if let Some(devices) = resources.devices() {
            for d in devices {
                limits.devices.push(device_rule(
                    d.allow(),
                    d.typ(),
                    d.major(),
                    d.minor(),
                    d.access().as_deref(),
                )?);
            }
        }
        if let Some(unified) = resources.unified() {
            for (file, value) in unified {
                if file.is_empty() || file.contains('/') || file.starts_with('.') {
                    return Err(invalid(
                        "linux.resources.unified",
                        format!("{file:?} is not a cgroup file name"),
                    ));
                }
                limits.unified.push((file.clone(), value.clone()));
            }
            limits.unified.sort();
        }
        ignored("linux.resources.blockIO", resources.block_io().is_some());
        ignored(
            "linux.resources.hugepageLimits",
            resources
                .hugepage_limits()
                .as_ref()
                .is_some_and(|h| !h.is_empty()),
        );
        ignored("linux.resources.network", resources.network().is_some());
        ignored(
            "linux.resources.rdma",
            resources.rdma().as_ref().is_some_and(|r| !r.is_empty()),
        );
        Ok(limits)
    }

    /// Whether cpuset must be set up (v1 hierarchy, v2 controller).
    pub(crate) fn needs_cpuset(&self) -> bool {
        self.cpus.is_some() || self.mems.is_some()
    }
}

/// Fields Gantry does not apply are logged, never silently dropped.
fn ignored(field: &'static str, present: bool) {
    if present {
        tracing::warn!(field, "cgroup resource not supported by gantry; ignored");
    }
}

/// Checks a cpuset list such as `0-3,6`. An empty string means unset.
fn cpu_list(field: &'static str, list: Option<&str>) -> Result<Option<String>, CgroupError> {
    let Some(list) = list.map(str::trim).filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    for part in list.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| invalid(field, format!("{list:?} is not a list like 0-3,5")))
        };
        if parse(lo)? > parse(hi)? {
            return Err(invalid(
                field,
                format!("range {part:?} in {list:?} is reversed"),
            ));
        }
    }
    Ok(Some(list.to_string()))
}

/// Validates one OCI device cgroup rule.
fn device_rule(
    allow: bool,
    typ: Option<LinuxDeviceType>,
    major: Option<i64>,
    minor: Option<i64>,
    access: Option<&str>,
) -> Result<DeviceRule, CgroupError> {
    const FIELD: &str = "linux.resources.devices";
    let kind = match typ.unwrap_or_default() {
        LinuxDeviceType::A => 'a',
        LinuxDeviceType::B => 'b',
        // `u` is an unbuffered character device: the same thing to the cgroup.
        LinuxDeviceType::C | LinuxDeviceType::U => 'c',
        LinuxDeviceType::P => {
            return Err(invalid(
                FIELD,
                "type p (fifo) cannot be restricted by the device cgroup",
            ));
        }
    };
    let number = |n: Option<i64>| match n {
        None | Some(-1) => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| invalid(FIELD, format!("device number {n} out of range"))),
    };
    let access = access.unwrap_or("").trim();
    // An absent access string means every access, as runc reads it.
    let access = if access.is_empty() { "rwm" } else { access };
    if !access.chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
        return Err(invalid(
            FIELD,
            format!("access {access:?} may only hold r, w and m"),
        ));
    }
    Ok(DeviceRule {
        allow,
        kind,
        major: number(major)?,
        minor: number(minor)?,
        access: access.to_string(),
    })
}

/// Converts v1 CPU shares (2..=262144, default 1024) to a v2 `cpu.weight`
/// (1..=10000, default 100) with runc's linear mapping, so that the same
/// bundle gets the same weight under Gantry, runc and crun.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(MIN_CPU_SHARES, MAX_CPU_SHARES);
    1 + ((shares - MIN_CPU_SHARES) * 9_999) / (MAX_CPU_SHARES - MIN_CPU_SHARES)
}

/// The v2 `memory.swap.max` value for OCI's memory+swap total `swap` and
/// memory `limit`: v2 limits swap alone, so it is their difference.
pub(crate) fn v2_swap_max(limit: Option<Limit>, swap: Limit) -> Result<Limit, CgroupError> {
    match (limit, swap) {
        (_, Limit::Unlimited) => Ok(Limit::Unlimited),
        (Some(Limit::Value(limit)), Limit::Value(swap)) => {
            // from_resources already refused swap < limit.
            Ok(Limit::Value(swap.saturating_sub(limit)))
        }
        (_, Limit::Value(_)) => Err(invalid(
            "linux.resources.memory.swap",
            "a swap limit needs a memory limit on cgroup v2, which limits swap alone",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxDeviceCgroupBuilder, LinuxMemoryBuilder, LinuxPidsBuilder,
        LinuxResourcesBuilder,
    };

    fn field_of(err: CgroupError) -> &'static str {
        match err {
            CgroupError::InvalidResource { field, .. } => field,
            other => panic!("expected InvalidResource, got {other}"),
        }
    }

    #[test]
    fn weight_conversion_matches_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(512), 20);
    }

    #[test]
    fn swap_v2_is_difference() {
        let l = Some(Limit::Value(100));
        assert_eq!(
            v2_swap_max(l, Limit::Value(300)).unwrap(),
            Limit::Value(200)
        );
        assert_eq!(v2_swap_max(l, Limit::Value(100)).unwrap(), Limit::Value(0));
        assert_eq!(
            v2_swap_max(None, Limit::Unlimited).unwrap(),
            Limit::Unlimited
        );
        assert_eq!(
            field_of(v2_swap_max(None, Limit::Value(5)).unwrap_err()),
            "linux.resources.memory.swap"
        );
    }

    #[test]
    fn unset_fields_stay_unset() {
        let r = LinuxResourcesBuilder::default().build().unwrap();
        assert_eq!(Limits::from_resources(&r).unwrap(), Limits::default());
        let r = LinuxResourcesBuilder::default()
            .memory(LinuxMemoryBuilder::default().limit(0).build().unwrap())
            .pids(LinuxPidsBuilder::default().limit(0).build().unwrap())
            .build()
            .unwrap();
        assert_eq!(Limits::from_resources(&r).unwrap(), Limits::default());
    }

    #[test]
    fn values_convert() {
        let r = LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(1 << 20)
                    .swap(-1)
                    .reservation(1 << 19)
                    .build()
                    .unwrap(),
            )
            .cpu(
                LinuxCpuBuilder::default()
                    .shares(512u64)
                    .quota(50_000)
                    .period(100_000u64)
                    .cpus("0-1,3")
                    .build()
                    .unwrap(),
            )
            .pids(LinuxPidsBuilder::default().limit(-1).build().unwrap())
            .build()
            .unwrap();
        let l = Limits::from_resources(&r).unwrap();
        assert_eq!(l.memory, Some(Limit::Value(1 << 20)));
        assert_eq!(l.memory_swap, Some(Limit::Unlimited));
        assert_eq!(l.memory_reservation, Some(Limit::Value(1 << 19)));
        assert_eq!(l.cpu_shares, Some(512));
        assert_eq!(l.cpu_quota, Some(Limit::Value(50_000)));
        assert_eq!(l.cpu_period, Some(100_000));
        assert_eq!(l.cpus.as_deref(), Some("0-1,3"));
        assert_eq!(l.pids, Some(Limit::Unlimited));
        assert!(l.needs_cpuset());
        assert_eq!(Limit::Unlimited.v1(), "-1");
        assert_eq!(Limit::Unlimited.v2(), "max");
    }

    fn mem(limit: i64, swap: i64, reservation: i64) -> LinuxResources {
        LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(limit)
                    .swap(swap)
                    .reservation(reservation)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    fn cpu(shares: u64, quota: i64, period: u64, cpus: &str) -> LinuxResources {
        LinuxResourcesBuilder::default()
            .cpu(
                LinuxCpuBuilder::default()
                    .shares(shares)
                    .quota(quota)
                    .period(period)
                    .cpus(cpus)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases = [
            (mem(-5, 0, 0), "linux.resources.memory.limit"),
            (mem(100, 50, 0), "linux.resources.memory.swap"),
            (mem(100, 0, 200), "linux.resources.memory.reservation"),
            (mem(0, -7, 0), "linux.resources.memory.swap"),
            (cpu(1, 0, 0, ""), "linux.resources.cpu.shares"),
            (cpu(300_000, 0, 0, ""), "linux.resources.cpu.shares"),
            (cpu(0, 999, 0, ""), "linux.resources.cpu.quota"),
            (cpu(0, 0, 999, ""), "linux.resources.cpu.period"),
            (cpu(0, 0, 2_000_000, ""), "linux.resources.cpu.period"),
            (cpu(0, 0, 0, "0-x"), "linux.resources.cpu.cpus"),
            (cpu(0, 0, 0, "3-1"), "linux.resources.cpu.cpus"),
        ];
        for (r, field) in cases {
            assert_eq!(
                field_of(Limits::from_resources(&r).unwrap_err()),
                field,
                "{r:?}"
            );
        }
    }

    #[test]
    fn device_rules_validate_and_format() {
        let rule = |typ, major, minor, access: &str| {
            let mut b = LinuxDeviceCgroupBuilder::default().allow(true).typ(typ);
            if let Some(m) = major {
                b = b.major(m);
            }
            if let Some(m) = minor {
                b = b.minor(m);
            }
            if !access.is_empty() {
                b = b.access(access);
            }
            let r = LinuxResourcesBuilder::default()
                .devices(vec![b.build().unwrap()])
                .build()
                .unwrap();
            Limits::from_resources(&r).map(|l| l.devices[0].clone())
        };
        let r = rule(LinuxDeviceType::C, Some(1), Some(3), "rw").unwrap();
        assert_eq!(r.v1_line(), "c 1:3 rw");
        let r = rule(LinuxDeviceType::A, None, None, "").unwrap();
        assert_eq!(r.v1_line(), "a *:* rwm");
        let r = rule(LinuxDeviceType::U, Some(5), None, "m").unwrap();
        assert_eq!(r.v1_line(), "c 5:* m");
        assert_eq!(
            field_of(rule(LinuxDeviceType::C, Some(1), Some(3), "rx").unwrap_err()),
            "linux.resources.devices"
        );
        assert_eq!(
            field_of(rule(LinuxDeviceType::P, None, None, "r").unwrap_err()),
            "linux.resources.devices"
        );
        assert_eq!(
            field_of(rule(LinuxDeviceType::C, Some(-3), None, "r").unwrap_err()),
            "linux.resources.devices"
        );
    }
}
