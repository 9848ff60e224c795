//! OCI bundles for tests and benchmarks, built from Debian's static busybox.
//!
//! A bundle is a directory with `config.json` and `rootfs/`. The rootfs holds
//! `/bin/busybox` (from the `busybox-static` package) with a symlink per applet
//! the tests use, and `/etc/passwd` and `/etc/group` with `root`, `nobody` and
//! a test user ([`TEST_UID`]). The config is a runc-like default spec (the one
//! `runc spec` writes, with Docker's default capability set) that the builder
//! methods change; the same bundle runs under runc, crun and `gantry runtime`.
//!
//! ```no_run
//! use gantry_tests::bundle::BundleBuilder;
//! let bundle = BundleBuilder::new()
//!     .args(["sh", "-c", "echo hello"])
//!     .hostname("box")
//!     .memory_limit(64 << 20)
//!     .build_temp()
//!     .unwrap();
//! println!("{}", bundle.path().display());
//! ```

use serde_json::{Value, json};
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

/// Where Debian's `busybox-static` puts the binary.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// The uid and gid of the non-root test user in the rootfs's `/etc/passwd`.
pub const TEST_UID: u32 = 1000;

/// The test user's name.
pub const TEST_USER: &str = "tester";

/// A supplementary group of the test user (`/etc/group`: `extra`).
pub const TEST_EXTRA_GID: u32 = 1001;

/// The applets linked into `rootfs/bin`.
pub const APPLETS: &[&str] = &[
    "sh", "ash", "true", "false", "sleep", "cat", "echo", "id", "hostname", "ls", "ps", "mount",
    "grep", "env", "pwd", "touch", "mkdir", "rm", "stat", "test", "[", "head", "tail", "wc",
    "kill", "ulimit", "readlink", "whoami", "printf", "dd", "uname", "nproc", "find", "ln",
    "chmod", "tr", "cut", "sed", "awk", "seq", "yes", "stty", "tty", "ip", "ifconfig", "nc",
    "wget", "top", "usleep",
];

/// Docker's default capability set: the engine's own list, so that the
/// bundles the runtime tests use and the containers the engine makes agree.
pub const DOCKER_DEFAULT_CAPS: &[&str] = &gantry_agent::engine::spec::DEFAULT_CAPABILITIES;

/// runc's default masked paths.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

/// runc's default read-only paths.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Whether the host has the static busybox the bundles are built from; tests
/// print `SKIPPED` when it does not.
pub fn busybox_available() -> bool {
    Path::new(HOST_BUSYBOX).is_file()
}

/// The runc-like default `config.json` running `args`.
pub fn default_spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "TERM=xterm"
            ],
            "cwd": "/",
            "capabilities": {
                "bounding": DOCKER_DEFAULT_CAPS,
                "effective": DOCKER_DEFAULT_CAPS,
                "permitted": DOCKER_DEFAULT_CAPS,
                "inheritable": [],
                "ambient": []
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "gantry",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS
        }
    })
}

/// Builds a bundle: start from [`BundleBuilder::new`], change what the test
/// needs, then [`BundleBuilder::build`] into a directory.
#[derive(Debug, Clone)]
pub struct BundleBuilder {
    spec: Value,
}

impl Default for BundleBuilder {
    fn default() -> Self {
        BundleBuilder::new()
    }
}

impl BundleBuilder {
    /// The default spec, running `/bin/true`.
    pub fn new() -> Self {
        BundleBuilder {
            spec: default_spec(&["/bin/true"]),
        }
    }

    /// The process's arguments (`process.args`).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let args: Vec<String> = args.into_iter().map(Into::into).collect();
        self.spec["process"]["args"] = json!(args);
        self
    }

    /// Adds `KEY=VALUE` to `process.env`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        if let Some(env) = self.spec["process"]["env"].as_array_mut() {
            env.push(json!(format!("{key}={value}")));
        }
        self
    }

    /// The working directory (`process.cwd`).
    pub fn cwd(mut self, cwd: &str) -> Self {
        self.spec["process"]["cwd"] = json!(cwd);
        self
    }

    /// The user (`process.user`): uid, gid and supplementary gids.
    pub fn user(mut self, uid: u32, gid: u32, additional_gids: &[u32]) -> Self {
        let mut user = json!({"uid": uid, "gid": gid});
        if !additional_gids.is_empty() {
            user["additionalGids"] = json!(additional_gids);
        }
        self.spec["process"]["user"] = user;
        self
    }

    /// The container's hostname.
    pub fn hostname(mut self, hostname: &str) -> Self {
        self.spec["hostname"] = json!(hostname);
        self
    }

    /// Sets one capability list (`bounding`, `effective`, `permitted`,
    /// `inheritable` or `ambient`) of `process.capabilities`.
    pub fn capabilities(mut self, set: &str, caps: &[&str]) -> Self {
        self.spec["process"]["capabilities"][set] = json!(caps);
        self
    }

    /// Sets every capability list but `ambient` and `inheritable` to `caps`.
    pub fn all_capabilities(self, caps: &[&str]) -> Self {
        self.capabilities("bounding", caps)
            .capabilities("effective", caps)
            .capabilities("permitted", caps)
    }

    /// `process.noNewPrivileges`.
    pub fn no_new_privileges(mut self, on: bool) -> Self {
        self.spec["process"]["noNewPrivileges"] = json!(on);
        self
    }

    /// Adds an rlimit, e.g. `("RLIMIT_NOFILE", 256, 512)`.
    pub fn rlimit(mut self, kind: &str, soft: u64, hard: u64) -> Self {
        if let Some(limits) = self.spec["process"]["rlimits"].as_array_mut() {
            limits.retain(|l| l["type"] != kind);
            limits.push(json!({"type": kind, "soft": soft, "hard": hard}));
        }
        self
    }

    /// `root.readonly`.
    pub fn readonly_root(mut self, on: bool) -> Self {
        self.spec["root"]["readonly"] = json!(on);
        self
    }

    /// A memory limit in bytes (`linux.resources.memory.limit`).
    pub fn memory_limit(mut self, bytes: i64) -> Self {
        self.spec["linux"]["resources"]["memory"] = json!({"limit": bytes});
        self
    }

    /// A pids limit (`linux.resources.pids.limit`).
    pub fn pids_limit(mut self, limit: i64) -> Self {
        self.spec["linux"]["resources"]["pids"] = json!({"limit": limit});
        self
    }

    /// A CPU quota and period in microseconds (`linux.resources.cpu`).
    pub fn cpu_limit(mut self, quota: i64, period: u64) -> Self {
        self.spec["linux"]["resources"]["cpu"] = json!({"quota": quota, "period": period});
        self
    }

    /// Runc's defaults for the benchmark: 256 MiB memory, 512 pids, one CPU.
    pub fn default_limits(self) -> Self {
        self.memory_limit(256 << 20)
            .pids_limit(512)
            .cpu_limit(100_000, 100_000)
    }

    /// `linux.cgroupsPath`.
    pub fn cgroups_path(mut self, path: &str) -> Self {
        self.spec["linux"]["cgroupsPath"] = json!(path);
        self
    }

    /// Adds a hook to `hooks.<kind>` (`prestart`, `createRuntime`,
    /// `createContainer`, `startContainer`, `poststart`, `poststop`).
    pub fn hook(mut self, kind: &str, path: &str, args: &[&str], timeout: Option<i64>) -> Self {
        let mut hook = json!({"path": path, "args": args});
        if let Some(t) = timeout {
            hook["timeout"] = json!(t);
        }
        if !self.spec["hooks"].is_object() {
            self.spec["hooks"] = json!({});
        }
        match self.spec["hooks"][kind].as_array_mut() {
            Some(list) => list.push(hook),
            None => self.spec["hooks"][kind] = json!([hook]),
        }
        self
    }

    /// Adds a mount, e.g. `("/data", "bind", "/tmp/x", &["rbind", "ro"])`.
    pub fn mount(mut self, destination: &str, kind: &str, source: &str, options: &[&str]) -> Self {
        if let Some(mounts) = self.spec["mounts"].as_array_mut() {
            mounts.push(json!({
                "destination": destination, "type": kind, "source": source, "options": options
            }));
        }
        self
    }

    /// Joins the namespace at `path` instead of creating one of `kind`.
    pub fn namespace_path(mut self, kind: &str, path: &str) -> Self {
        if let Some(list) = self.spec["linux"]["namespaces"].as_array_mut() {
            for ns in list.iter_mut() {
                if ns["type"] == kind {
                    ns["path"] = json!(path);
                }
            }
        }
        self
    }

    /// Removes the namespace `kind` from `linux.namespaces` (share the host's).
    pub fn without_namespace(mut self, kind: &str) -> Self {
        if let Some(list) = self.spec["linux"]["namespaces"].as_array_mut() {
            list.retain(|ns| ns["type"] != kind);
        }
        self
    }

    /// Any other change to the spec, e.g. adding a field the runtime must refuse.
    pub fn edit(mut self, f: impl FnOnce(&mut Value)) -> Self {
        f(&mut self.spec);
        self
    }

    /// The spec as it stands.
    pub fn spec(&self) -> &Value {
        &self.spec
    }

    /// Writes the bundle into `dir` (created if missing): `config.json` and `rootfs/`.
    pub fn build(&self, dir: &Path) -> io::Result<Bundle> {
        std::fs::create_dir_all(dir)?;
        write_rootfs(&dir.join("rootfs"))?;
        self.write_config(dir)?;
        Ok(Bundle {
            path: dir.to_path_buf(),
            _temp: None,
        })
    }

    /// Writes the bundle into a new temporary directory, removed when the
    /// [`Bundle`] is dropped.
    pub fn build_temp(&self) -> io::Result<Bundle> {
        let temp = tempfile::Builder::new()
            .prefix("gantry-bundle-")
            .tempdir()?;
        let mut bundle = self.build(temp.path())?;
        bundle._temp = Some(temp);
        Ok(bundle)
    }

    /// Rewrites only `config.json` of an existing bundle directory.
    pub fn write_config(&self, dir: &Path) -> io::Result<()> {
        let text = serde_json::to_vec_pretty(&self.spec).map_err(io::Error::other)?;
        std::fs::write(dir.join("config.json"), text)
    }
}

/// A bundle on disk.
#[derive(Debug)]
pub struct Bundle {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Bundle {
    /// The bundle directory (pass it to `--bundle`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The rootfs directory.
    pub fn rootfs(&self) -> PathBuf {
        self.path.join("rootfs")
    }
}

/// Lays out a busybox rootfs in `rootfs`.
pub fn write_rootfs(rootfs: &Path) -> io::Result<()> {
    for dir in [
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "home/tester",
        "var",
        "run",
    ] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    let busybox = rootfs.join("bin/busybox");
    if !busybox.exists() {
        std::fs::copy(HOST_BUSYBOX, &busybox)?;
    }
    for applet in APPLETS {
        let link = rootfs.join("bin").join(applet);
        if link.symlink_metadata().is_err() {
            symlink("busybox", &link)?;
        }
    }
    // Some scripts expect /usr/bin/env and /sbin tools; one symlink each covers them.
    for (link, target) in [("usr", "."), ("sbin", "bin")] {
        let link = rootfs.join(link);
        if link.symlink_metadata().is_err() {
            symlink(target, &link)?;
        }
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        format!(
            "root:x:0:0:root:/root:/bin/sh\n\
             nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
             {TEST_USER}:x:{TEST_UID}:{TEST_UID}:tester:/home/tester:/bin/sh\n"
        ),
    )?;
    std::fs::write(
        rootfs.join("etc/group"),
        format!(
            "root:x:0:\n\
             tty:x:5:\n\
             nogroup:x:65534:\n\
             {TEST_USER}:x:{TEST_UID}:\n\
             extra:x:{TEST_EXTRA_GID}:{TEST_USER}\n"
        ),
    )?;
    std::fs::write(rootfs.join("etc/hostname"), "gantry\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_changes_the_spec() {
        let b = BundleBuilder::new()
            .args(["sh", "-c", "exit 3"])
            .env("A", "b")
            .user(1000, 1000, &[1001])
            .hostname("h")
            .default_limits()
            .hook("poststop", "/bin/true", &["true"], Some(5))
            .namespace_path("network", "/proc/1/ns/net");
        let s = b.spec();
        assert_eq!(s["process"]["args"][2], "exit 3");
        assert!(
            s["process"]["env"]
                .as_array()
                .unwrap()
                .contains(&json!("A=b"))
        );
        assert_eq!(s["process"]["user"]["additionalGids"][0], 1001);
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 256 << 20);
        assert_eq!(s["hooks"]["poststop"][0]["timeout"], 5);
        let net = s["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["type"] == "network")
            .unwrap();
        assert_eq!(net["path"], "/proc/1/ns/net");
    }

    #[test]
    fn spec_parses_as_oci() {
        let text = serde_json::to_string(BundleBuilder::new().default_limits().spec()).unwrap();
        let spec: oci_spec::runtime::Spec = serde_json::from_str(&text).unwrap();
        assert_eq!(spec.hostname().as_deref(), Some("gantry"));
    }

    #[test]
    fn builds_a_rootfs() {
        if !busybox_available() {
            println!("SKIPPED: {HOST_BUSYBOX} missing (apt-get install busybox-static)");
            return;
        }
        let bundle = BundleBuilder::new().build_temp().unwrap();
        assert!(bundle.rootfs().join("bin/busybox").is_file());
        assert!(bundle.path().join("config.json").is_file());
        assert!(
            bundle
                .rootfs()
                .join("bin/sh")
                .symlink_metadata()
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
}
