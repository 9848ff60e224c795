//! One module per subcommand group; each exposes `Args` and `run(Args)`.

pub mod agent;
pub mod cluster;
pub mod container;
pub mod controller;
pub mod deploy;
pub mod dev;
pub mod events;
pub mod exec;
pub mod image;
pub mod node;
pub mod runtime;
pub mod service;
pub mod shim;
pub mod stack;
pub mod task;
pub mod up;
pub mod volume;

use std::fmt;
use std::process::ExitCode;

/// An error caused by what the user asked for (a bad flag value, a malformed
/// file, an unknown name). The binary exits 2 for these and 1 for failures.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Exit codes: 0 done, 1 failed, 2 bad usage or input.
pub fn exit_code_for(err: &anyhow::Error) -> ExitCode {
    if err.downcast_ref::<UsageError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}

/// Logs go to stderr, filtered by `GANTRY_LOG` (default: warnings).
pub fn init_logging() {
    // Without GANTRY_LOG a plain level filter: parsing filter directives is
    // measurable on `gantry runtime`'s per-container path.
    match tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG") {
        Ok(filter) => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .try_init();
        }
        Err(_) => {
            let _ = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::WARN)
                .with_writer(std::io::stderr)
                .try_init();
        }
    }
}

/// Memory sizes as `docker stats` prints them: binary units, two decimals.
pub fn binary_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.2}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::binary_size;

    #[test]
    fn memory_sizes_print_like_docker_stats() {
        assert_eq!(binary_size(512), "512B");
        assert_eq!(binary_size(569_344), "556.00KiB");
        assert_eq!(binary_size(64 << 20), "64.00MiB");
    }
}
