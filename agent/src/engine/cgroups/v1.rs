//! The cgroup v1 backend: one directory per controller hierarchy.
//!
//! Hierarchies are found by listing the cgroup root once: each mount is a
//! directory named after its controllers (`memory`, or `cpu,cpuacct` where
//! they are co-mounted; the `cpu`/`cpuacct` symlinks next to such a mount are
//! skipped so a hierarchy is never used twice). A file is written in the
//! group directory of whichever hierarchy has it, so the same code serves
//! separate and co-mounted layouts.

use super::fs;
use super::limits::{Limit, Limits};
use super::{CgroupError, CgroupStats};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Controllers every container group gets, in the order their group
/// directories are kept (memory first: its files are the most used).
const CONTROLLERS: [&str; 6] = ["memory", "cpu", "cpuacct", "pids", "devices", "freezer"];

/// v1 memory limits at or above this read as unlimited (the kernel reports
/// `PAGE_COUNTER_MAX` pages, about 2^63 bytes).
const UNLIMITED_THRESHOLD: u64 = 1 << 62;

/// The mount directories under `root` that serve the wanted controllers,
/// each listed once, in [`CONTROLLERS`] order with cpuset last.
pub(crate) fn hierarchies(root: &Path, with_cpuset: bool) -> Result<Vec<PathBuf>, CgroupError> {
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| fs::io_err(root, e))? {
        let entry = entry.map_err(|e| fs::io_err(root, e))?;
        // Symlinks are aliases of co-mounted hierarchies listed under their real name.
        if !entry.file_type().map_err(|e| fs::io_err(root, e))?.is_dir() {
            continue;
        }
        if let Some(name) = entry.file_name().to_str() {
            mounts.push((name.to_string(), entry.path()));
        }
    }
    let wanted = CONTROLLERS
        .iter()
        .copied()
        .chain(with_cpuset.then_some("cpuset"));
    let mut dirs: Vec<PathBuf> = Vec::new();
    for controller in wanted {
        let found = mounts
            .iter()
            .find(|(name, _)| name.split(',').any(|c| c == controller));
        if let Some((_, path)) = found
            && !dirs.contains(path)
        {
            dirs.push(path.clone());
        }
    }
    if dirs.is_empty() {
        return Err(CgroupError::NoHierarchy(root.to_path_buf()));
    }
    Ok(dirs)
}

/// Creates the group in every hierarchy, returning the group directories
/// and whether any was new.
pub(crate) fn create_dirs(
    root: &Path,
    relative: &Path,
    limits: &Limits,
) -> Result<(Vec<PathBuf>, bool), CgroupError> {
    let mut created = false;
    let mut dirs = Vec::new();
    for mount in hierarchies(root, limits.needs_cpuset())? {
        let dir = mount.join(relative);
        if is_cpuset(&mount) {
            created |= create_cpuset(&mount, relative)?;
        } else {
            created |= fs::make_dir(&dir)?;
        }
        dirs.push(dir);
    }
    Ok((dirs, created))
}

fn is_cpuset(mount: &Path) -> bool {
    mount
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.split(',').any(|c| c == "cpuset"))
}

/// v1 cpuset refuses tasks in a group whose `cpuset.cpus`/`cpuset.mems` are
/// empty, which they are on mkdir; each new level copies its parent's.
fn create_cpuset(mount: &Path, relative: &Path) -> Result<bool, CgroupError> {
    let mut created = false;
    let mut parent = mount.to_path_buf();
    for component in relative.components() {
        let dir = parent.join(component);
        if !dir.is_dir() {
            match std::fs::create_dir(&dir) {
                Ok(()) => created = true,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(fs::io_err(&dir, e)),
            }
        }
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if fs::read(&dir.join(file))?.trim().is_empty() {
                let value = fs::read(&parent.join(file))?;
                fs::write(&dir.join(file), value.trim())?;
            }
        }
        parent = dir;
    }
    Ok(created)
}

/// The group directories of an existing group, in every hierarchy where it exists.
pub(crate) fn open_dirs(root: &Path, relative: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let dirs: Vec<PathBuf> = hierarchies(root, true)?
        .into_iter()
        .map(|m| m.join(relative))
        .filter(|d| d.is_dir())
        .collect();
    if dirs.is_empty() {
        let path = root.join(relative);
        return Err(fs::io_err(
            &path,
            std::io::Error::new(ErrorKind::NotFound, "no such cgroup in any hierarchy"),
        ));
    }
    Ok(dirs)
}

/// The group directories in the order to look for `file` in: first those
/// whose hierarchy is named after the file's controller (`cpu,cpuacct` for
/// `cpuacct.usage`), then the rest. The order only saves system calls; the
/// file is taken from whichever directory actually has it.
fn candidates<'a>(dirs: &'a [PathBuf], file: &str) -> impl Iterator<Item = &'a Path> {
    let controller = file.split('.').next().unwrap_or_default().to_string();
    let named = move |d: &&PathBuf| {
        d.components().any(|c| {
            c.as_os_str()
                .to_str()
                .is_some_and(|n| n.split(',').any(|x| x == controller))
        })
    };
    let first = dirs.iter().filter(named.clone());
    let rest = dirs.iter().filter(move |d| !named(d));
    first.chain(rest).map(PathBuf::as_path)
}

/// The directory among `dirs` holding `file`, i.e. the hierarchy of its controller.
fn dir_with<'a>(dirs: &'a [PathBuf], file: &str) -> Option<&'a Path> {
    candidates(dirs, file).find(|d| d.join(file).exists())
}

/// Writes `file` in the hierarchy that has it.
fn write(dirs: &[PathBuf], file: &'static str, value: &str) -> Result<(), CgroupError> {
    for dir in candidates(dirs, file) {
        if fs::try_write(&dir.join(file), value)? {
            return Ok(());
        }
    }
    Err(CgroupError::MissingFile {
        file,
        group: dirs.first().cloned().unwrap_or_default(),
    })
}

/// Reads `file` from the hierarchy that has it, `None` if none has it.
fn read(dirs: &[PathBuf], file: &str) -> Result<Option<(PathBuf, String)>, CgroupError> {
    for dir in candidates(dirs, file) {
        let path = dir.join(file);
        if let Some(text) = fs::read_opt(&path)? {
            return Ok(Some((path, text)));
        }
    }
    Ok(None)
}

/// Writes the limits that are set, and only those.
pub(crate) fn apply(dirs: &[PathBuf], limits: &Limits) -> Result<(), CgroupError> {
    if !limits.unified.is_empty() {
        return Err(CgroupError::InvalidResource {
            field: "linux.resources.unified",
            reason: "raw cgroup v2 files cannot be set on a cgroup v1 host".to_string(),
        });
    }
    apply_memory(dirs, limits)?;
    if let Some(r) = limits.memory_reservation {
        write(dirs, "memory.soft_limit_in_bytes", &r.v1())?;
    }
    if let Some(swappiness) = limits.swappiness {
        write(dirs, "memory.swappiness", &swappiness.to_string())?;
    }
    if limits.disable_oom_killer {
        write(dirs, "memory.oom_control", "1")?;
    }
    if let Some(shares) = limits.cpu_shares {
        write(dirs, "cpu.shares", &shares.to_string())?;
    }
    // Period first: a quota is checked against the period in force.
    if let Some(period) = limits.cpu_period {
        write(dirs, "cpu.cfs_period_us", &period.to_string())?;
    }
    if let Some(quota) = limits.cpu_quota {
        write(dirs, "cpu.cfs_quota_us", &quota.v1())?;
    }
    if let Some(pids) = limits.pids {
        write(dirs, "pids.max", &pids.v2())?;
    }
    if let Some(cpus) = &limits.cpus {
        write(dirs, "cpuset.cpus", cpus)?;
    }
    if let Some(mems) = &limits.mems {
        write(dirs, "cpuset.mems", mems)?;
    }
    // Each write(2) is one rule to the kernel, so a run of rules for the
    // same file shares one open: a container's default rules are a deny
    // and a dozen allows, written while the init waits for its cgroup
    // (each open + close of a cgroup file costs about as much as the
    // write).
    let mut open: Option<(&'static str, PathBuf, std::fs::File)> = None;
    for rule in &limits.devices {
        let file = if rule.allow {
            "devices.allow"
        } else {
            "devices.deny"
        };
        let (_, path, handle) = match open {
            Some(ref mut o) if o.0 == file => o,
            _ => {
                let (path, handle) = open_for_write(dirs, file)?;
                open.insert((file, path, handle))
            }
        };
        std::io::Write::write_all(handle, rule.v1_line().as_bytes())
            .map_err(|e| fs::io_err(path, e))?;
    }
    Ok(())
}

/// Opens `file` for writing in the hierarchy that has it.
fn open_for_write(
    dirs: &[PathBuf],
    file: &'static str,
) -> Result<(PathBuf, std::fs::File), CgroupError> {
    for dir in candidates(dirs, file) {
        let path = dir.join(file);
        match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(handle) => return Ok((path, handle)),
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(fs::io_err(&path, e)),
        }
    }
    Err(CgroupError::MissingFile {
        file,
        group: dirs.first().cloned().unwrap_or_default(),
    })
}

/// `memory.memsw.limit_in_bytes` may never be below `memory.limit_in_bytes`,
/// so when the limit grows the total is raised first, and when it shrinks the
/// limit is lowered first.
fn apply_memory(dirs: &[PathBuf], limits: &Limits) -> Result<(), CgroupError> {
    const LIMIT: &str = "memory.limit_in_bytes";
    const MEMSW: &str = "memory.memsw.limit_in_bytes";
    let swap = match limits.memory_swap {
        Some(swap) if dir_with(dirs, MEMSW).is_some() => Some(swap),
        Some(_) => {
            tracing::warn!(
                "memory.memsw.limit_in_bytes absent (no swap accounting); swap limit ignored"
            );
            None
        }
        None => None,
    };
    match (limits.memory, swap) {
        (None, None) => Ok(()),
        (Some(limit), None) => write(dirs, LIMIT, &limit.v1()),
        (None, Some(swap)) => write(dirs, MEMSW, &swap.v1()),
        (Some(limit), Some(swap)) => {
            let current = read(dirs, LIMIT)?
                .and_then(|(_, t)| t.trim().parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            let growing = match limit {
                Limit::Unlimited => true,
                Limit::Value(v) => v > current,
            };
            if growing {
                write(dirs, MEMSW, &swap.v1())?;
                write(dirs, LIMIT, &limit.v1())
            } else {
                write(dirs, LIMIT, &limit.v1())?;
                write(dirs, MEMSW, &swap.v1())
            }
        }
    }
}

/// Moves `pid` into the group in every hierarchy.
pub(crate) fn add_process(dirs: &[PathBuf], pid: i32) -> Result<(), CgroupError> {
    let pid = pid.to_string();
    for dir in dirs {
        fs::write(&dir.join("cgroup.procs"), &pid)?;
    }
    Ok(())
}

/// The processes in the group, as the first hierarchy lists them.
pub(crate) fn processes(dirs: &[PathBuf]) -> Result<Vec<i32>, CgroupError> {
    let Some(dir) = dirs.first() else {
        return Ok(Vec::new());
    };
    let path = dir.join("cgroup.procs");
    match fs::read_opt(&path)? {
        Some(text) => fs::parse_pids(&path, &text),
        None => Ok(Vec::new()),
    }
}

/// Usage figures; a controller that is absent reads as zero.
pub(crate) fn stats(dirs: &[PathBuf]) -> Result<CgroupStats, CgroupError> {
    let number = |file: &str| -> Result<Option<u64>, CgroupError> {
        match read(dirs, file)? {
            Some((path, text)) => fs::parse_u64(&path, &text),
            None => Ok(None),
        }
    };
    let limit = number("memory.limit_in_bytes")?.filter(|&l| l < UNLIMITED_THRESHOLD);
    Ok(CgroupStats {
        cpu_usage_ns: number("cpuacct.usage")?.unwrap_or(0),
        memory_usage_bytes: number("memory.usage_in_bytes")?.unwrap_or(0),
        memory_limit_bytes: limit,
        pids_current: number("pids.current")?.unwrap_or(0),
        oom_kills: read(dirs, "memory.oom_control")?
            .and_then(|(_, t)| fs::keyed_value(&t, "oom_kill"))
            .unwrap_or(0),
    })
}

/// How long a freeze may take to settle: 40 polls, waits capped at 25 ms.
const FREEZE_POLLS: u32 = 40;
const FREEZE_MAX_WAIT: Duration = Duration::from_millis(25);

/// Freezes the group, signals every process, thaws. Freezing first stops a
/// process from forking a child the signal would miss.
pub(crate) fn kill_all(
    dirs: &[PathBuf],
    signal: nix::sys::signal::Signal,
) -> Result<(), CgroupError> {
    let freezer = dir_with(dirs, "freezer.state").map(|d| d.join("freezer.state"));
    let frozen = match &freezer {
        Some(state) => freeze(state)?,
        None => false,
    };
    let result = processes(dirs).and_then(|pids| super::signal_pids(&pids, signal));
    // Thaw even if signalling failed, or the group's processes stay stuck.
    let thawed = match freezer.filter(|_| frozen) {
        Some(state) => fs::write(&state, "THAWED"),
        None => Ok(()),
    };
    result.and(thawed)
}

/// Returns whether the group reached `FROZEN` in time; if not, it is thawed
/// again and the caller signals without the freeze.
fn freeze(state: &Path) -> Result<bool, CgroupError> {
    fs::write(state, "FROZEN")?;
    let frozen = fs::wait_until(FREEZE_POLLS, FREEZE_MAX_WAIT, || {
        Ok(fs::read(state)?.trim() == "FROZEN")
    })?;
    if !frozen {
        fs::write(state, "THAWED")?;
    }
    Ok(frozen)
}

/// Removes the group from every hierarchy.
pub(crate) fn delete(dirs: &[PathBuf]) -> Result<(), CgroupError> {
    let mut first_err = None;
    for dir in dirs {
        // Keep going so one busy hierarchy does not leave the others behind.
        if let Err(e) = fs::remove_group(dir) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comounted_and_separate_hierarchies_are_found_once() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for d in [
            "cpu,cpuacct",
            "memory",
            "pids",
            "blkio",
            "cpuset",
            "unified",
        ] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        std::os::unix::fs::symlink(root.join("cpu,cpuacct"), root.join("cpu")).unwrap();
        std::os::unix::fs::symlink(root.join("cpu,cpuacct"), root.join("cpuacct")).unwrap();
        let found = hierarchies(root, false).unwrap();
        let names: Vec<_> = found
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["memory", "cpu,cpuacct", "pids"]);
        let with_cpuset = hierarchies(root, true).unwrap();
        assert_eq!(with_cpuset.last().unwrap(), &root.join("cpuset"));
    }

    #[test]
    fn files_go_to_the_hierarchy_that_has_them() {
        let tmp = tempfile::tempdir().unwrap();
        let mem = tmp.path().join("memory/g");
        let cpu = tmp.path().join("cpu,cpuacct/g");
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::create_dir_all(&cpu).unwrap();
        for f in [
            "memory.limit_in_bytes",
            "memory.memsw.limit_in_bytes",
            "memory.soft_limit_in_bytes",
            "memory.swappiness",
        ] {
            std::fs::write(mem.join(f), "9223372036854771712\n").unwrap();
        }
        for f in ["cpu.shares", "cpu.cfs_quota_us", "cpu.cfs_period_us"] {
            std::fs::write(cpu.join(f), "").unwrap();
        }
        let dirs = vec![mem.clone(), cpu.clone()];
        let limits = Limits {
            memory: Some(Limit::Value(1 << 25)),
            memory_swap: Some(Limit::Value(1 << 26)),
            swappiness: Some(10),
            cpu_shares: Some(512),
            cpu_quota: Some(Limit::Value(50_000)),
            cpu_period: Some(100_000),
            ..Limits::default()
        };
        apply(&dirs, &limits).unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(mem.join("memory.swappiness")), "10");
        assert_eq!(read(mem.join("memory.limit_in_bytes")), "33554432");
        assert_eq!(read(mem.join("memory.memsw.limit_in_bytes")), "67108864");
        assert_eq!(read(cpu.join("cpu.shares")), "512");
        assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(cpu.join("cpu.cfs_period_us")), "100000");
        // Untouched because unset.
        assert_eq!(
            read(mem.join("memory.soft_limit_in_bytes")),
            "9223372036854771712\n"
        );
        let err = apply(
            &dirs,
            &Limits {
                pids: Some(Limit::Value(3)),
                ..Limits::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                CgroupError::MissingFile {
                    file: "pids.max",
                    ..
                }
            ),
            "{err}"
        );
    }
}
