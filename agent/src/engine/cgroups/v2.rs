//! The cgroup v2 backend: one directory in the unified hierarchy.
//!
//! A controller's files appear in a group only when every ancestor enables
//! it in `cgroup.subtree_control`, so creation walks from the root down,
//! enabling what is missing. Only ancestors without processes can do that
//! (the no-internal-processes rule; the root is exempt), so an ancestor that
//! holds processes is left alone and the limit write below it then fails
//! naming the missing file.

use super::fs;
use super::limits::{Limits, shares_to_weight, v2_swap_max};
use super::{CgroupError, CgroupStats};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Controllers every container group gets.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Creates the group directory, enabling controllers on the way down.
/// Returns the directory and whether it was new.
pub(crate) fn create_dir(
    root: &Path,
    relative: &Path,
    limits: &Limits,
) -> Result<(PathBuf, bool), CgroupError> {
    let mut wanted: Vec<&str> = CONTROLLERS.to_vec();
    if limits.needs_cpuset() {
        wanted.push("cpuset");
    }
    let mut current = root.to_path_buf();
    let mut created = false;
    for component in relative.components() {
        enable_controllers(&current, current == root, &wanted)?;
        current.push(component);
        if !current.is_dir() {
            match std::fs::create_dir(&current) {
                Ok(()) => created = true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(fs::io_err(&current, e)),
            }
        }
    }
    Ok((current, created))
}

/// Enables in `dir`'s `cgroup.subtree_control` the wanted controllers that
/// are available there and not yet enabled, in one write.
fn enable_controllers(dir: &Path, is_root: bool, wanted: &[&str]) -> Result<(), CgroupError> {
    let available = fs::read_opt(&dir.join("cgroup.controllers"))?.unwrap_or_default();
    let control = dir.join("cgroup.subtree_control");
    let enabled = fs::read(&control)?;
    let missing: Vec<String> = wanted
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root {
        let procs = dir.join("cgroup.procs");
        let text = fs::read_opt(&procs)?.unwrap_or_default();
        if !fs::parse_pids(&procs, &text)?.is_empty() {
            tracing::debug!(
                dir = %dir.display(),
                "cgroup holds processes; controllers not enabled below it"
            );
            return Ok(());
        }
    }
    fs::write(&control, &missing.join(" "))
}

/// Writes the limits that are set, and only those.
pub(crate) fn apply(dir: &Path, limits: &Limits) -> Result<(), CgroupError> {
    if let Some(limit) = limits.memory {
        fs::write(&dir.join("memory.max"), &limit.v2())?;
    }
    if let Some(swap) = limits.memory_swap {
        let value = v2_swap_max(limits.memory, swap)?;
        let file = dir.join("memory.swap.max");
        if file.exists() {
            fs::write(&file, &value.v2())?;
        } else {
            tracing::warn!(path = %file.display(), "no swap accounting; swap limit ignored");
        }
    }
    if let Some(r) = limits.memory_reservation {
        fs::write(&dir.join("memory.low"), &r.v2())?;
    }
    if let Some(shares) = limits.cpu_shares {
        fs::write(
            &dir.join("cpu.weight"),
            &shares_to_weight(shares).to_string(),
        )?;
    }
    if limits.cpu_quota.is_some() || limits.cpu_period.is_some() {
        let file = dir.join("cpu.max");
        let quota = match limits.cpu_quota {
            Some(q) => q.v2(),
            // A new period alone keeps the quota in force.
            None => fs::read(&file)?
                .split_whitespace()
                .next()
                .unwrap_or("max")
                .to_string(),
        };
        let value = match limits.cpu_period {
            Some(p) => format!("{quota} {p}"),
            None => quota,
        };
        fs::write(&file, &value)?;
    }
    if let Some(pids) = limits.pids {
        fs::write(&dir.join("pids.max"), &pids.v2())?;
    }
    if let Some(cpus) = &limits.cpus {
        fs::write(&dir.join("cpuset.cpus"), cpus)?;
    }
    if let Some(mems) = &limits.mems {
        fs::write(&dir.join("cpuset.mems"), mems)?;
    }
    for (file, value) in &limits.unified {
        fs::write(&dir.join(file), value)?;
    }
    if !limits.devices.is_empty() {
        super::devices::apply_v2(dir, &limits.devices)?;
    }
    Ok(())
}

/// Moves `pid` into the group.
pub(crate) fn add_process(dir: &Path, pid: i32) -> Result<(), CgroupError> {
    fs::write(&dir.join("cgroup.procs"), &pid.to_string())
}

/// The processes in the group.
pub(crate) fn processes(dir: &Path) -> Result<Vec<i32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    fs::parse_pids(&path, &fs::read(&path)?)
}

/// Usage figures; a controller that is not enabled reads as zero.
pub(crate) fn stats(dir: &Path) -> Result<CgroupStats, CgroupError> {
    let number = |file: &str| -> Result<Option<u64>, CgroupError> {
        let path = dir.join(file);
        match fs::read_opt(&path)? {
            Some(text) => fs::parse_u64(&path, &text),
            None => Ok(None),
        }
    };
    let keyed = |file: &str, key: &str| -> Result<u64, CgroupError> {
        Ok(fs::read_opt(&dir.join(file))?
            .and_then(|t| fs::keyed_value(&t, key))
            .unwrap_or(0))
    };
    Ok(CgroupStats {
        cpu_usage_ns: keyed("cpu.stat", "usage_usec")?.saturating_mul(1_000),
        memory_usage_bytes: number("memory.current")?.unwrap_or(0),
        memory_limit_bytes: number("memory.max")?,
        pids_current: number("pids.current")?.unwrap_or(0),
        oom_kills: keyed("memory.events", "oom_kill")?,
    })
}

/// How long a freeze may take to settle: 40 polls, waits capped at 25 ms.
const FREEZE_POLLS: u32 = 40;
const FREEZE_MAX_WAIT: Duration = Duration::from_millis(25);

/// SIGKILL goes through `cgroup.kill` (kernel 5.14+), which kills atomically
/// with no fork race. Other signals, or older kernels: freeze, signal every
/// process, thaw.
pub(crate) fn kill_all(dir: &Path, signal: nix::sys::signal::Signal) -> Result<(), CgroupError> {
    let kill = dir.join("cgroup.kill");
    if signal == nix::sys::signal::Signal::SIGKILL && kill.exists() {
        return fs::write(&kill, "1");
    }
    let freeze = dir.join("cgroup.freeze");
    let frozen = freeze.exists() && freeze_group(dir)?;
    let result = processes(dir).and_then(|pids| super::signal_pids(&pids, signal));
    // Thaw even if signalling failed, or the group's processes stay stuck.
    let thawed = if frozen {
        fs::write(&freeze, "0")
    } else {
        Ok(())
    };
    result.and(thawed)
}

/// Returns whether the group reported `frozen 1` in time; if not, it is
/// thawed again and the caller signals without the freeze.
fn freeze_group(dir: &Path) -> Result<bool, CgroupError> {
    let freeze = dir.join("cgroup.freeze");
    let events = dir.join("cgroup.events");
    fs::write(&freeze, "1")?;
    let frozen = fs::wait_until(FREEZE_POLLS, FREEZE_MAX_WAIT, || {
        Ok(fs::keyed_value(&fs::read(&events)?, "frozen") == Some(1))
    })?;
    if !frozen {
        fs::write(&freeze, "0")?;
    }
    Ok(frozen)
}

/// Removes the group (and any child groups).
pub(crate) fn delete(dir: &Path) -> Result<(), CgroupError> {
    fs::remove_group(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cgroups::limits::Limit;

    const ALL: &str = "cpuset cpu io memory hugetlb pids";

    /// A fake unified hierarchy: `root/mid/leaf`, each level with the files a
    /// kernel would show, all empty unless given.
    struct Fake {
        _tmp: tempfile::TempDir,
        root: PathBuf,
    }

    impl Fake {
        fn new(mid_procs: &str) -> Fake {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().to_path_buf();
            let leaf_files = [
                "cgroup.procs",
                "memory.max",
                "memory.swap.max",
                "memory.low",
                "cpu.weight",
                "cpu.max",
                "pids.max",
                "cpuset.cpus",
                "cpuset.mems",
            ];
            for (dir, procs) in [
                (root.clone(), "1\n"),
                (root.join("mid"), mid_procs),
                (root.join("mid/leaf"), ""),
            ] {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("cgroup.controllers"), ALL).unwrap();
                std::fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
                for f in leaf_files {
                    std::fs::write(dir.join(f), "").unwrap();
                }
                std::fs::write(dir.join("cgroup.procs"), procs).unwrap();
            }
            std::fs::write(root.join("mid/leaf/cpu.max"), "max 100000\n").unwrap();
            Fake { _tmp: tmp, root }
        }

        fn read(&self, file: &str) -> String {
            std::fs::read_to_string(self.root.join(file)).unwrap()
        }
    }

    #[test]
    fn ancestors_get_controllers_from_the_root_down() {
        let fake = Fake::new("");
        let limits = Limits::default();
        let (dir, created) = create_dir(&fake.root, Path::new("mid/leaf"), &limits).unwrap();
        assert_eq!(dir, fake.root.join("mid/leaf"));
        assert!(!created, "the fake tree already had the leaf");
        assert_eq!(fake.read("cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(
            fake.read("mid/cgroup.subtree_control"),
            "+cpu +memory +pids"
        );
        // The leaf holds the container's processes: it enables nothing.
        assert_eq!(fake.read("mid/leaf/cgroup.subtree_control"), "");
    }

    #[test]
    fn cpuset_only_when_asked_and_only_missing_ones() {
        let fake = Fake::new("");
        std::fs::write(fake.root.join("cgroup.subtree_control"), "cpu memory pids").unwrap();
        let limits = Limits {
            cpus: Some("0".to_string()),
            ..Limits::default()
        };
        create_dir(&fake.root, Path::new("mid/leaf"), &limits).unwrap();
        assert_eq!(fake.read("cgroup.subtree_control"), "+cpuset");
        assert_eq!(
            fake.read("mid/cgroup.subtree_control"),
            "+cpu +memory +pids +cpuset"
        );
    }

    #[test]
    fn an_ancestor_with_processes_is_left_alone() {
        let fake = Fake::new("42\n");
        create_dir(&fake.root, Path::new("mid/leaf"), &Limits::default()).unwrap();
        assert_eq!(fake.read("cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(fake.read("mid/cgroup.subtree_control"), "");
    }

    #[test]
    fn unavailable_controllers_are_not_requested() {
        let fake = Fake::new("");
        std::fs::write(fake.root.join("cgroup.controllers"), "memory io").unwrap();
        create_dir(&fake.root, Path::new("mid/leaf"), &Limits::default()).unwrap();
        assert_eq!(fake.read("cgroup.subtree_control"), "+memory");
    }

    #[test]
    fn limits_are_written_in_v2_terms_and_unset_ones_untouched() {
        let fake = Fake::new("");
        let dir = fake.root.join("mid/leaf");
        let limits = Limits {
            memory: Some(Limit::Value(32 << 20)),
            memory_swap: Some(Limit::Value(48 << 20)),
            cpu_shares: Some(1024),
            cpu_quota: Some(Limit::Value(50_000)),
            cpu_period: Some(100_000),
            pids: Some(Limit::Unlimited),
            ..Limits::default()
        };
        apply(&dir, &limits).unwrap();
        assert_eq!(fake.read("mid/leaf/memory.max"), "33554432");
        assert_eq!(fake.read("mid/leaf/memory.swap.max"), "16777216");
        assert_eq!(fake.read("mid/leaf/cpu.weight"), "39");
        assert_eq!(fake.read("mid/leaf/cpu.max"), "50000 100000");
        assert_eq!(fake.read("mid/leaf/pids.max"), "max");
        assert_eq!(fake.read("mid/leaf/memory.low"), "");
        assert_eq!(fake.read("mid/leaf/cpuset.cpus"), "");
    }

    #[test]
    fn period_alone_keeps_the_quota_and_quota_alone_keeps_the_period() {
        let fake = Fake::new("");
        let dir = fake.root.join("mid/leaf");
        std::fs::write(dir.join("cpu.max"), "25000 100000\n").unwrap();
        let period_only = Limits {
            cpu_period: Some(50_000),
            ..Limits::default()
        };
        apply(&dir, &period_only).unwrap();
        assert_eq!(fake.read("mid/leaf/cpu.max"), "25000 50000");
        let quota_only = Limits {
            cpu_quota: Some(Limit::Unlimited),
            ..Limits::default()
        };
        apply(&dir, &quota_only).unwrap();
        assert_eq!(fake.read("mid/leaf/cpu.max"), "max");
    }

    #[test]
    fn a_missing_controller_file_is_an_error_naming_it() {
        let fake = Fake::new("");
        let dir = fake.root.join("mid/leaf");
        std::fs::remove_file(dir.join("pids.max")).unwrap();
        let err = apply(
            &dir,
            &Limits {
                pids: Some(Limit::Value(5)),
                ..Limits::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("pids.max"), "{err}");
    }

    #[test]
    fn stats_read_v2_files() {
        let fake = Fake::new("");
        let dir = fake.root.join("mid/leaf");
        std::fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        std::fs::write(dir.join("memory.current"), "4096\n").unwrap();
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        std::fs::write(dir.join("pids.current"), "3\n").unwrap();
        std::fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n",
        )
        .unwrap();
        let s = stats(&dir).unwrap();
        assert_eq!(
            s,
            CgroupStats {
                cpu_usage_ns: 1_500_000,
                memory_usage_bytes: 4096,
                memory_limit_bytes: None,
                pids_current: 3,
                oom_kills: 2,
            }
        );
        std::fs::write(dir.join("memory.max"), "1048576\n").unwrap();
        assert_eq!(stats(&dir).unwrap().memory_limit_bytes, Some(1 << 20));
    }
}
