//! Links the `gantry` binary as a static, position-dependent executable.
//!
//! Why: `gantry runtime run` is latency-bound, and a small binary's start is
//! mostly the dynamic loader's work: mapping libc, libm and libgcc_s,
//! resolving their symbols and, for a PIE, applying ~19,000 relative
//! relocations (and taking the copy-on-write faults they cause). A static
//! non-PIE executable has none of it (measured in docs/benchmarks.md,
//! "Container start"). The code itself stays position-independent and no
//! RUSTFLAGS change is needed (so no dependency is rebuilt): only the final
//! link of the binary changes.
//!
//! How, without `-C target-feature=+crt-static` (which cannot be set for one
//! crate, and breaks proc-macros when set for all): rustc always asks the
//! linker for `-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc` after
//! `-Bdynamic`. A directory searched first holds one tiny linker script per
//! library, named like the shared library the linker looks for
//! (`libc.so`), that names the static archive instead (`libc.a`, and
//! libgcc's `libgcc_eh.a` for `libgcc_s`); `-static` then makes a fully
//! static executable (no interpreter, glibc's static start files).
//!
//! Costs, accepted: the binary's image is not address-randomised (the heap,
//! stack and mmaps still are); glibc's name service in a static binary has
//! only its built-in `files` and `dns` sources (hostnames resolve through
//! /etc/hosts and DNS; other NSS modules such as mdns or LDAP are not used:
//! Gantry resolves users from the image's own /etc/passwd and talks to
//! nodes by address). `GANTRY_DYNAMIC_LINK=1` at build time gives the
//! previous dynamically linked (still non-PIE) binary; so does a toolchain
//! without glibc's static archives (a cargo warning says so).

//! **Hot code first.** With the `rust-lld` that rustc uses by default on
//! x86_64-unknown-linux-gnu (Rust 1.90 and later), the link also takes
//! `start-path.order`, a `--symbol-ordering-file`: the functions that a
//! `gantry runtime run` executes (the parent, the init and its helpers),
//! placed together at the start of `.text`. Why: the binary's 16 MB of
//! text are mapped lazily, one fault per 64 KiB window touched (the
//! kernel's fault-around), and the start path's code was spread over
//! about 75 windows; the init, a `clone` of the parent, faults the same
//! pages again (a fork does not copy the page tables of file mappings).
//! Both sides are on the critical path of every container start (measured
//! in docs/benchmarks.md). The file lists mangled names (stable for a
//! given toolchain, Cargo.lock and profile); a name the link does not know
//! is skipped without a warning, so a stale file costs speed, never the
//! build. Regenerate it after larger changes to the start path with
//! `cli/start-path-order.sh` (as root: it samples the user-space
//! instruction pointers of 600 `gantry runtime run`s twice with `perf
//! record`, maps them to functions with `nm` and writes the union in the
//! order of a link without the file). `GANTRY_NO_SYMBOL_ORDER=1`, another
//! linker (`-C linker=`, `linker-features`, an older rustc) or target
//! leaves it out.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The libraries rustc links dynamically on x86_64-unknown-linux-gnu, each
/// with the static archives that replace it.
const REPLACED: &[(&str, &[&str])] = &[
    ("gcc_s", &["gcc_eh", "gcc"]),
    ("util", &["util"]),
    ("rt", &["rt"]),
    ("pthread", &["pthread"]),
    ("m", &["m"]),
    ("dl", &["dl"]),
    ("c", &["c", "gcc_eh", "gcc"]),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=GANTRY_DYNAMIC_LINK");
    println!("cargo:rustc-link-arg-bins=-no-pie");
    symbol_order();
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    if !linux_gnu || std::env::var_os("GANTRY_DYNAMIC_LINK").is_some_and(|v| v == "1") {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = out.join("static-link");
    match write_scripts(&dir) {
        Ok(()) => {
            // A `-L` given to the linker driver comes before its own
            // library directories, so these scripts are found first.
            println!("cargo:rustc-link-arg-bins=-L{}", dir.display());
            println!("cargo:rustc-link-arg-bins=-static");
        }
        Err(why) => {
            println!("cargo:warning=gantry is linked dynamically: {why}");
        }
    }
}

/// Writes one linker script per replaced library into `dir`.
fn write_scripts(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    for (shared, archives) in REPLACED {
        let paths = archives
            .iter()
            .map(|a| archive_path(a))
            .collect::<Result<Vec<_>, _>>()?;
        let script = format!("GROUP({})\n", paths.join(" "));
        let file = dir.join(format!("lib{shared}.so"));
        std::fs::write(&file, script).map_err(|e| format!("write {}: {e}", file.display()))?;
    }
    Ok(())
}

/// Where the C compiler finds `lib<name>.a`.
fn archive_path(name: &str) -> Result<String, String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let file = format!("lib{name}.a");
    let output = Command::new(&cc)
        .arg(format!("-print-file-name={file}"))
        .output()
        .map_err(|e| format!("run {cc}: {e}"))?;
    let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
    // Unknown files are printed back as given, without a directory.
    if !output.status.success() || !Path::new(&path).is_absolute() || !Path::new(&path).exists() {
        return Err(format!("{file} not found by {cc} (install libc6-dev)"));
    }
    Ok(std::fs::canonicalize(&path)
        .map(|p| p.display().to_string())
        .unwrap_or(path))
}

/// Passes `start-path.order` to the linker when it is rustc's own `rust-lld`.
fn symbol_order() {
    println!("cargo:rerun-if-changed=start-path.order");
    println!("cargo:rerun-if-env-changed=GANTRY_NO_SYMBOL_ORDER");
    if std::env::var_os("GANTRY_NO_SYMBOL_ORDER").is_some_and(|v| v == "1")
        || std::env::var("TARGET").as_deref() != Ok("x86_64-unknown-linux-gnu")
    {
        return;
    }
    // A linker chosen by hand may be GNU ld, which refuses the option.
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") || flags.contains("link-self-contained") {
        return;
    }
    if std::env::vars_os().any(|(k, _)| {
        k.to_str()
            .is_some_and(|k| k.starts_with("CARGO_TARGET_") && k.ends_with("_LINKER"))
    }) {
        return;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let minor = Command::new(&rustc)
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| {
            v.split_whitespace()
                .nth(1)?
                .split('.')
                .nth(1)?
                .parse::<u32>()
                .ok()
        });
    // rust-lld is the default linker of this target since Rust 1.90.
    if minor.is_none_or(|m| m < 90) {
        return;
    }
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let file = dir.join("start-path.order");
    if file.is_file() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            file.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
