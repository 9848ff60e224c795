//! Plain file I/O on cgroupfs, shared by the v1 and v2 backends.
//!
//! Every helper names the path in its error. Writes never create files: on a
//! real cgroupfs a missing file means a controller is not there, and a unit
//! test's fake tree must fail the same way.

use super::CgroupError;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Wraps an I/O error with the path it concerns.
pub(crate) fn io_err(path: &Path, source: std::io::Error) -> CgroupError {
    CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `value` to the existing cgroup file `path` in one `write(2)`, the
/// way the kernel expects a cgroup file write.
pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    file.write_all(value.as_bytes())
        .map_err(|e| io_err(path, e))
}

/// Reads a whole cgroup file.
pub(crate) fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|e| io_err(path, e))
}

/// Reads a cgroup file, or `None` when it does not exist (controller absent).
pub(crate) fn read_opt(path: &Path) -> Result<Option<String>, CgroupError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Parses a file holding one unsigned number; `max` (v2) reads as `None`.
pub(crate) fn parse_u64(path: &Path, text: &str) -> Result<Option<u64>, CgroupError> {
    let t = text.trim();
    if t == "max" {
        return Ok(None);
    }
    t.parse::<u64>().map(Some).map_err(|e| {
        io_err(
            path,
            std::io::Error::new(ErrorKind::InvalidData, format!("not a number {t:?}: {e}")),
        )
    })
}

/// Finds `key` in a flat-keyed file (`key value` per line) such as
/// `memory.events`, `cpu.stat` or v1's `memory.oom_control`.
pub(crate) fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Parses `cgroup.procs`: one PID per line.
pub(crate) fn parse_pids(path: &Path, text: &str) -> Result<Vec<i32>, CgroupError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim().parse::<i32>().map_err(|e| {
                io_err(
                    path,
                    std::io::Error::new(ErrorKind::InvalidData, format!("bad pid {l:?}: {e}")),
                )
            })
        })
        .collect()
}

/// How many times `rmdir` is retried while the kernel still reports the group busy.
const RMDIR_ATTEMPTS: u32 = 60;
/// The longest wait between two `rmdir` attempts.
const RMDIR_MAX_WAIT: Duration = Duration::from_millis(50);

/// Removes the group directory `dir` and, first, any child groups below it
/// (a container may make its own). A missing directory is fine. `EBUSY`
/// (processes still exiting) is retried a bounded number of times.
pub(crate) fn remove_group(dir: &Path) -> Result<(), CgroupError> {
    remove_group_depth(dir, 0)
}

/// Nesting bound: cgroup trees a container builds are shallow; a deeper one
/// is refused rather than recursed into without end.
const MAX_DEPTH: u32 = 32;

fn remove_group_depth(dir: &Path, depth: u32) -> Result<(), CgroupError> {
    if depth > MAX_DEPTH {
        return Err(io_err(
            dir,
            std::io::Error::other("cgroup tree nested too deeply to remove"),
        ));
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(dir, e)),
    };
    let mut children: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        if entry.file_type().map_err(|e| io_err(dir, e))?.is_dir() {
            children.push(entry.path());
        }
    }
    for child in children {
        remove_group_depth(&child, depth + 1)?;
    }
    let mut wait = Duration::from_millis(1);
    for attempt in 1..=RMDIR_ATTEMPTS {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < RMDIR_ATTEMPTS => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(RMDIR_MAX_WAIT);
            }
            Err(e) => return Err(io_err(dir, e)),
        }
    }
    // The loop's last attempt always returns; this keeps the compiler honest.
    Err(io_err(dir, std::io::Error::from_raw_os_error(libc::EBUSY)))
}

/// Polls `done` until it says true, at most `attempts` times with a growing
/// wait capped at `max_wait`. Returns whether it became true.
pub(crate) fn wait_until(
    attempts: u32,
    max_wait: Duration,
    mut done: impl FnMut() -> Result<bool, CgroupError>,
) -> Result<bool, CgroupError> {
    let mut wait = Duration::from_micros(200);
    for _ in 0..attempts {
        if done()? {
            return Ok(true);
        }
        std::thread::sleep(wait);
        wait = (wait * 2).min(max_wait);
    }
    done()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_values_are_found() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(text, "oom_kill"), Some(3));
        assert_eq!(keyed_value(text, "oom"), None);
        assert_eq!(
            keyed_value("usage_usec 1500\nuser_usec 1", "usage_usec"),
            Some(1500)
        );
    }

    #[test]
    fn numbers_and_max_parse() {
        let p = Path::new("memory.max");
        assert_eq!(parse_u64(p, "max\n").unwrap(), None);
        assert_eq!(parse_u64(p, "4096\n").unwrap(), Some(4096));
        assert!(parse_u64(p, "lots").is_err());
    }

    #[test]
    fn pids_parse() {
        let p = Path::new("cgroup.procs");
        assert_eq!(parse_pids(p, "1\n22\n\n").unwrap(), vec![1, 22]);
        assert!(parse_pids(p, "x\n").is_err());
    }

    #[test]
    fn remove_group_removes_children_and_tolerates_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let g = tmp.path().join("g");
        std::fs::create_dir_all(g.join("a/b")).unwrap();
        std::fs::create_dir_all(g.join("c")).unwrap();
        remove_group(&g).unwrap();
        assert!(!g.exists());
        remove_group(&g).unwrap();
    }
}
