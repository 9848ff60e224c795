//! Reading and checking a bundle's `config.json` before anything is created.
//!
//! Everything that can be refused is refused here, in the calling process,
//! so that a bad config leaves nothing behind (no state, no cgroup, no
//! process). Fields Gantry does not implement are refused by name, never
//! silently ignored. The result is a [`Plan`]: the namespaces to create or
//! join and the cgroup to use, in the form the clone and the init need.

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use std::path::{Path, PathBuf};

/// Why a config was refused: the field and the reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// The config field, e.g. `linux.seccomp`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn refuse(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// What the runtime will do for a namespace type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePlan {
    /// Namespaces created by `clone(2)` (the `CLONE_NEW*` flags), cgroup excluded.
    pub clone_flags: libc::c_int,
    /// Whether the init unshares a new cgroup namespace once it is in its cgroup.
    pub new_cgroupns: bool,
    /// Namespaces joined with `setns(2)`: (flag, path).
    pub join: Vec<(libc::c_int, PathBuf)>,
}

impl NamespacePlan {
    /// Whether the container gets a namespace of this kind (new or joined).
    pub fn has(&self, flag: libc::c_int) -> bool {
        self.clone_flags & flag != 0
            || (flag == libc::CLONE_NEWCGROUP && self.new_cgroupns)
            || self.join.iter().any(|(f, _)| *f == flag)
    }

    /// Whether the container gets a *new* namespace of this kind.
    pub fn creates(&self, flag: libc::c_int) -> bool {
        self.clone_flags & flag != 0 || (flag == libc::CLONE_NEWCGROUP && self.new_cgroupns)
    }
}

/// A checked config and the decisions derived from it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The parsed config.
    pub spec: Spec,
    /// The bundle directory (absolute).
    pub bundle: PathBuf,
    /// The rootfs (absolute).
    pub rootfs: PathBuf,
    /// Namespaces to create and join.
    pub namespaces: NamespacePlan,
    /// The cgroup, relative to the cgroup mount root.
    pub cgroup_path: PathBuf,
}

/// Reads `<bundle>/config.json` and checks it.
pub fn load(bundle: &Path, id: &str) -> Result<Plan, SpecError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path)
        .map_err(|e| refuse("config.json", format!("{}: {e}", path.display())))?;
    let spec: Spec =
        serde_json::from_slice(&text).map_err(|e| refuse("config.json", e.to_string()))?;
    plan(spec, bundle, id)
}

/// Checks a parsed config; pure apart from nothing (no I/O).
pub fn plan(spec: Spec, bundle: &Path, id: &str) -> Result<Plan, SpecError> {
    check_id(id)?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| refuse("process", "missing"))?;
    check_process(process, "process")?;

    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| refuse("root", "missing"))?;
    let rootfs = if root.path().is_absolute() {
        root.path().clone()
    } else {
        bundle.join(root.path())
    };

    let linux = spec
        .linux()
        .as_ref()
        .ok_or_else(|| refuse("linux", "missing"))?;
    if linux.seccomp().is_some() {
        return Err(refuse("linux.seccomp", "not supported yet"));
    }
    if linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        || spec.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
    {
        return Err(refuse(
            "linux.uidMappings",
            "user namespaces are not supported yet",
        ));
    }
    if linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        || spec.gid_mappings().as_ref().is_some_and(|m| !m.is_empty())
    {
        return Err(refuse(
            "linux.gidMappings",
            "user namespaces are not supported yet",
        ));
    }
    if linux.mount_label().as_ref().is_some_and(|l| !l.is_empty()) {
        return Err(refuse("linux.mountLabel", "SELinux is not supported"));
    }
    if linux.intel_rdt().is_some() {
        return Err(refuse("linux.intelRdt", "not supported yet"));
    }
    if linux.personality().is_some() {
        return Err(refuse("linux.personality", "not supported yet"));
    }
    if linux.time_offsets().as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(refuse("linux.timeOffsets", "not supported yet"));
    }
    if linux.net_devices().as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(refuse("linux.netDevices", "not supported yet"));
    }
    if linux.memory_policy().is_some() {
        return Err(refuse("linux.memoryPolicy", "not supported yet"));
    }
    if let Some(prop) = linux.rootfs_propagation()
        && !prop.is_empty()
        && super::mounts::propagation_flag(prop).is_none()
    {
        return Err(refuse(
            "linux.rootfsPropagation",
            format!("unknown propagation {prop:?}"),
        ));
    }
    if let Some(sysctl) = linux.sysctl() {
        for key in sysctl.keys() {
            if key.is_empty() || key.contains("..") || key.starts_with('/') {
                return Err(refuse(format!("linux.sysctl.{key}"), "invalid key"));
            }
        }
    }

    let namespaces = plan_namespaces(&spec)?;

    if spec.hostname().as_ref().is_some_and(|h| !h.is_empty())
        && !namespaces.has(libc::CLONE_NEWUTS)
    {
        return Err(refuse("hostname", "needs a uts namespace"));
    }

    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let field = format!("mounts[{i}]");
        if !m.destination().is_absolute() {
            return Err(refuse(
                format!("{field}.destination"),
                format!("{} is not absolute", m.destination().display()),
            ));
        }
        if m.uid_mappings().is_some() || m.gid_mappings().is_some() {
            return Err(refuse(
                format!("{field}.uidMappings"),
                "id-mapped mounts are not supported yet",
            ));
        }
        let typ = m.typ().as_deref().unwrap_or("");
        if typ == "cgroup" || typ == "cgroup2" {
            return Err(refuse(
                format!("{field}.type"),
                format!("{typ} mounts are not supported yet"),
            ));
        }
        let opts = super::mounts::parse_options(m.options().as_deref().unwrap_or(&[]));
        if opts.is_bind() || typ == "bind" {
            if m.source().is_none() {
                return Err(refuse(
                    format!("{field}.source"),
                    "missing for a bind mount",
                ));
            }
        } else if typ.is_empty() {
            return Err(refuse(format!("{field}.type"), "missing"));
        }
    }

    let cgroup_path = match linux.cgroups_path() {
        Some(p) if !p.as_os_str().is_empty() => {
            let text = p.to_string_lossy();
            if text.contains(':') {
                return Err(refuse(
                    "linux.cgroupsPath",
                    "systemd slice:prefix:name paths are not supported",
                ));
            }
            let rel = PathBuf::from(text.trim_start_matches('/'));
            if rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(refuse("linux.cgroupsPath", "must not contain .."));
            }
            rel
        }
        _ => PathBuf::from("gantry").join(id),
    };

    if let Some(hooks) = spec.hooks() {
        let lists = [
            ("hooks.prestart", hooks.prestart()),
            ("hooks.createRuntime", hooks.create_runtime()),
            ("hooks.createContainer", hooks.create_container()),
            ("hooks.startContainer", hooks.start_container()),
            ("hooks.poststart", hooks.poststart()),
            ("hooks.poststop", hooks.poststop()),
        ];
        for (name, list) in lists {
            for (i, hook) in list.iter().flatten().enumerate() {
                if !hook.path().is_absolute() {
                    return Err(refuse(format!("{name}[{i}].path"), "must be absolute"));
                }
                if hook.timeout().is_some_and(|t| t <= 0) {
                    return Err(refuse(format!("{name}[{i}].timeout"), "must be positive"));
                }
            }
        }
    }

    Ok(Plan {
        bundle: bundle.to_path_buf(),
        rootfs,
        namespaces,
        cgroup_path,
        spec,
    })
}

/// Checks a container id: what runc accepts (letters, digits, `_+-.`), so
/// that it is always one safe path component.
pub fn check_id(id: &str) -> Result<(), SpecError> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(refuse("id", format!("{id:?} is not a valid container id")))
    }
}

/// Checks the parts of a `process` object that Gantry implements or refuses.
pub fn check_process(process: &oci_spec::runtime::Process, field: &str) -> Result<(), SpecError> {
    let args = process.args().as_deref().unwrap_or(&[]);
    if args.is_empty() || args[0].is_empty() {
        return Err(refuse(format!("{field}.args"), "must name a program"));
    }
    if process.command_line().is_some() {
        return Err(refuse(format!("{field}.commandLine"), "is for Windows"));
    }
    if process.terminal().unwrap_or(false) {
        return Err(refuse(
            format!("{field}.terminal"),
            "not supported yet (no console socket): use exec --tty",
        ));
    }
    if process
        .apparmor_profile()
        .as_ref()
        .is_some_and(|p| !p.is_empty())
    {
        return Err(refuse(
            format!("{field}.apparmorProfile"),
            "AppArmor is not supported",
        ));
    }
    if process
        .selinux_label()
        .as_ref()
        .is_some_and(|p| !p.is_empty())
    {
        return Err(refuse(
            format!("{field}.selinuxLabel"),
            "SELinux is not supported",
        ));
    }
    if process.io_priority().is_some() {
        return Err(refuse(format!("{field}.ioPriority"), "not supported yet"));
    }
    if process.scheduler().is_some() {
        return Err(refuse(format!("{field}.scheduler"), "not supported yet"));
    }
    if process.exec_cpu_affinity().is_some() {
        return Err(refuse(
            format!("{field}.execCPUAffinity"),
            "not supported yet",
        ));
    }
    if process
        .user()
        .username()
        .as_ref()
        .is_some_and(|u| !u.is_empty())
    {
        return Err(refuse(
            format!("{field}.user.username"),
            "is for Windows: use uid and gid",
        ));
    }
    if !process.cwd().is_absolute() {
        return Err(refuse(
            format!("{field}.cwd"),
            format!("{} is not absolute", process.cwd().display()),
        ));
    }
    for (i, env) in process.env().iter().flatten().enumerate() {
        if !env.contains('=') || env.contains('\0') {
            return Err(refuse(
                format!("{field}.env[{i}]"),
                format!("{env:?} is not KEY=VALUE"),
            ));
        }
    }
    for (i, limit) in process.rlimits().iter().flatten().enumerate() {
        if limit.soft() > limit.hard() {
            return Err(refuse(
                format!("{field}.rlimits[{i}]"),
                "soft limit above hard limit",
            ));
        }
    }
    Ok(())
}

fn plan_namespaces(spec: &Spec) -> Result<NamespacePlan, SpecError> {
    let mut plan = NamespacePlan {
        clone_flags: 0,
        new_cgroupns: false,
        join: Vec::new(),
    };
    let list = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .map(|v| v.as_slice())
        .unwrap_or(&[]);
    let mut seen = 0;
    for (i, ns) in list.iter().enumerate() {
        let field = format!("linux.namespaces[{i}]");
        let flag = match ns.typ() {
            LinuxNamespaceType::Pid => libc::CLONE_NEWPID,
            LinuxNamespaceType::Network => libc::CLONE_NEWNET,
            LinuxNamespaceType::Mount => libc::CLONE_NEWNS,
            LinuxNamespaceType::Ipc => libc::CLONE_NEWIPC,
            LinuxNamespaceType::Uts => libc::CLONE_NEWUTS,
            LinuxNamespaceType::Cgroup => libc::CLONE_NEWCGROUP,
            LinuxNamespaceType::User => {
                return Err(refuse(
                    format!("{field}.type"),
                    "user namespaces are not supported yet",
                ));
            }
            LinuxNamespaceType::Time => {
                return Err(refuse(
                    format!("{field}.type"),
                    "time namespaces are not supported yet",
                ));
            }
        };
        if seen & flag != 0 {
            return Err(refuse(format!("{field}.type"), "listed twice"));
        }
        seen |= flag;
        match ns.path() {
            Some(path) if !path.as_os_str().is_empty() => {
                if !path.is_absolute() {
                    return Err(refuse(format!("{field}.path"), "must be absolute"));
                }
                plan.join.push((flag, path.clone()));
            }
            _ if flag == libc::CLONE_NEWCGROUP => plan.new_cgroupns = true,
            _ => plan.clone_flags |= flag,
        }
    }
    if seen & libc::CLONE_NEWNS == 0 {
        return Err(refuse(
            "linux.namespaces",
            "a mount namespace is required (pivot_root needs one)",
        ));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> serde_json::Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["/bin/true"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "hostname": "h",
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [
                {"type": "pid"}, {"type": "mount"}, {"type": "uts"},
                {"type": "cgroup"}, {"type": "network", "path": "/proc/1/ns/net"}
            ]}
        })
    }

    fn check(v: serde_json::Value) -> Result<Plan, SpecError> {
        let spec: Spec = serde_json::from_value(v).unwrap();
        plan(spec, Path::new("/b"), "c1")
    }

    #[test]
    fn plans_namespaces_and_defaults() {
        let p = check(base()).unwrap();
        assert_eq!(
            p.namespaces.clone_flags,
            libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS
        );
        assert!(p.namespaces.new_cgroupns);
        assert_eq!(
            p.namespaces.join,
            vec![(libc::CLONE_NEWNET, PathBuf::from("/proc/1/ns/net"))]
        );
        assert_eq!(p.rootfs, PathBuf::from("/b/rootfs"));
        assert_eq!(p.cgroup_path, PathBuf::from("gantry/c1"));
    }

    #[test]
    fn refuses_seccomp_by_name() {
        let mut v = base();
        v["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW"});
        let err = check(v).unwrap_err();
        assert_eq!(err.field, "linux.seccomp");
        assert_eq!(err.to_string(), "linux.seccomp: not supported yet");
    }

    #[test]
    fn refuses_bad_fields() {
        type Edit = fn(&mut serde_json::Value);
        let cases: Vec<(Edit, &str)> = vec![
            (|v| v["process"]["args"] = json!([]), "process.args"),
            (|v| v["process"]["cwd"] = json!("tmp"), "process.cwd"),
            (
                |v| v["process"]["terminal"] = json!(true),
                "process.terminal",
            ),
            (
                |v| v["process"]["env"] = json!(["NOEQUALS"]),
                "process.env[0]",
            ),
            (
                |v| v["mounts"] = json!([{"destination": "rel", "type": "tmpfs"}]),
                "mounts[0].destination",
            ),
            (
                |v| v["linux"]["namespaces"] = json!([{"type": "pid"}]),
                "linux.namespaces",
            ),
            (
                |v| v["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "user"}]),
                "linux.namespaces[1].type",
            ),
            (
                |v| v["linux"]["namespaces"] = json!([{"type": "mount"}]),
                "hostname",
            ),
            (
                |v| v["linux"]["cgroupsPath"] = json!("system.slice:gantry:x"),
                "linux.cgroupsPath",
            ),
            (
                |v| v["linux"]["rootfsPropagation"] = json!("sideways"),
                "linux.rootfsPropagation",
            ),
            (
                |v| v["hooks"] = json!({"poststop": [{"path": "true"}]}),
                "hooks.poststop[0].path",
            ),
        ];
        for (edit, field) in cases {
            let mut v = base();
            edit(&mut v);
            let err = check(v).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn cgroups_path_is_relative_to_the_mount_root() {
        let mut v = base();
        v["linux"]["cgroupsPath"] = json!("/custom/x");
        assert_eq!(check(v).unwrap().cgroup_path, PathBuf::from("custom/x"));
    }

    #[test]
    fn ids_are_one_path_component() {
        assert!(check_id("abc-1_2.3").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "é"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }
}
