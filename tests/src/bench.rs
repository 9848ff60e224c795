//! What the benchmarks (`tests/benches/`) share: where the workspace and
//! the release binary are, knobs from the environment, and the stamp (commit,
//! time) every figures file carries.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (this package is `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The release `gantry`: `GANTRY_BIN`, else `target/release/gantry` brought
/// up to date with `cargo build --release --bin gantry` (a no-op when it is;
/// a stale binary would measure old code). Debug builds are not what users
/// run, so they are not measured.
pub fn gantry_release_bin(workspace: &Path) -> PathBuf {
    if let Some(path) = std::env::var_os("GANTRY_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    println!("cargo build --release --bin gantry");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "gantry"])
        .current_dir(workspace)
        .status()
        .expect("run cargo build --release --bin gantry");
    assert!(
        status.success(),
        "cargo build --release --bin gantry failed"
    );
    target.join("release/gantry")
}

/// A count from the environment variable `name`, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The workspace's `git describe --always --dirty`, if git is there.
pub fn git_commit(workspace: &Path) -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(workspace)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (no date crate needed for one timestamp).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes a benchmark's figures: `bench-results/<name>.json` (the report)
/// and `<name>.md` (its table) at the workspace root, and prints the table
/// and where they went.
pub fn write_figures(workspace: &Path, name: &str, report: &serde_json::Value, table: &str) {
    let out_dir = workspace.join("bench-results");
    std::fs::create_dir_all(&out_dir).expect("create bench-results/");
    let json = out_dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(report).expect("serialise report");
    std::fs::write(&json, text + "\n").unwrap_or_else(|e| panic!("write {}: {e}", json.display()));
    let md = out_dir.join(format!("{name}.md"));
    std::fs::write(&md, table).unwrap_or_else(|e| panic!("write {}: {e}", md.display()));
    println!("{table}");
    println!("written: {} and {name}.md", json.display());
}
