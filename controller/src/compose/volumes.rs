//! Mount specifications in the short syntax (`data:/var/lib/data:ro`,
//! `./site:/usr/share/nginx/html`, `/cache`) and bind-source resolution.

use std::path::{Component, Path, PathBuf};

use super::spec::{Mount, MountKind};

/// Why a mount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    /// The overall shape is wrong.
    #[error("invalid volume `{text}`: {reason}")]
    Invalid {
        /// The specification as written.
        text: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(text: &str, reason: impl Into<String>) -> MountError {
    MountError::Invalid {
        text: text.to_string(),
        reason: reason.into(),
    }
}

/// Whether a short-syntax source names a host path rather than a volume:
/// Compose's rule is a leading `.`, `/` or `~`.
pub fn is_path(source: &str) -> bool {
    source.starts_with(['.', '/', '~'])
}

/// Resolves a bind source against the project directory: `~` from `home`,
/// relative paths joined to `project_dir`, `.` and `..` folded lexically
/// (nothing is read from disk: the path is on the nodes, not here).
pub fn resolve_bind_source(
    source: &str,
    project_dir: &Path,
    home: Option<&str>,
    whole: &str,
) -> Result<String, MountError> {
    let path = if source == "~" || source.starts_with("~/") {
        let home = home.ok_or_else(|| invalid(whole, "`~` is used but HOME is not set"))?;
        PathBuf::from(home).join(source.trim_start_matches('~').trim_start_matches('/'))
    } else if source.starts_with('~') {
        return Err(invalid(whole, "`~user` paths are not supported"));
    } else {
        project_dir.join(source)
    };
    let out = fold(&path);
    let text = out.to_string_lossy().into_owned();
    if !out.is_absolute() {
        return Err(invalid(
            whole,
            format!("bind source `{text}` is not absolute (the project directory is relative)"),
        ));
    }
    Ok(text)
}

/// Folds `.` and `..` out of a path without touching the file system.
pub fn fold(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Checks a mount target.
pub fn check_target(target: &str, whole: &str) -> Result<(), MountError> {
    if !target.starts_with('/') {
        return Err(invalid(
            whole,
            format!("target `{target}` is not an absolute path"),
        ));
    }
    Ok(())
}

/// Parses `[source:]target[:mode]`, where mode is `ro` or `rw`.
pub fn parse_short(
    text: &str,
    project_dir: &Path,
    home: Option<&str>,
) -> Result<Mount, MountError> {
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target, mode) = match parts.as_slice() {
        [target] => (None, *target, None),
        [source, target] => (Some(*source), *target, None),
        [source, target, mode] => (Some(*source), *target, Some(*mode)),
        _ => return Err(invalid(text, "too many `:`")),
    };
    check_target(target, text)?;
    let mut read_only = false;
    for flag in mode.iter().flat_map(|m| m.split(',')) {
        match flag {
            "ro" => read_only = true,
            "rw" => read_only = false,
            other => {
                return Err(invalid(
                    text,
                    format!("unsupported mode `{other}` (Gantry supports ro and rw)"),
                ));
            }
        }
    }
    let (kind, source) = match source {
        None => (MountKind::Volume, None),
        Some("") => return Err(invalid(text, "empty source")),
        Some(s) if is_path(s) => (
            MountKind::Bind,
            Some(resolve_bind_source(s, project_dir, home, text)?),
        ),
        Some(s) => (MountKind::Volume, Some(s.to_string())),
    };
    Ok(Mount {
        kind,
        source,
        target: target.to_string(),
        read_only,
        tmpfs: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Mount, MountError> {
        parse_short(text, Path::new("/srv/app"), Some("/home/me"))
    }

    #[test]
    fn short_syntax() {
        let m = parse("data:/var/lib/data:ro").unwrap();
        assert_eq!(
            (m.kind, m.source.as_deref(), m.target.as_str(), m.read_only),
            (MountKind::Volume, Some("data"), "/var/lib/data", true)
        );
        let m = parse("./site:/www").unwrap();
        assert_eq!(
            (m.kind, m.source.as_deref()),
            (MountKind::Bind, Some("/srv/app/site"))
        );
        assert_eq!(
            parse("../x/./y:/y").unwrap().source.as_deref(),
            Some("/srv/x/y")
        );
        assert_eq!(
            parse("~/conf:/conf:rw").unwrap().source.as_deref(),
            Some("/home/me/conf")
        );
        assert_eq!(
            parse("/etc/hosts:/h:ro").unwrap().source.as_deref(),
            Some("/etc/hosts")
        );
        let m = parse("/cache").unwrap();
        assert_eq!((m.kind, m.source), (MountKind::Volume, None));
    }

    #[test]
    fn errors() {
        for (text, message) in [
            (
                "data:relative",
                "invalid volume `data:relative`: target `relative` is not an absolute path",
            ),
            (
                "data:/d:z",
                "invalid volume `data:/d:z`: unsupported mode `z` (Gantry supports ro and rw)",
            ),
            ("a:/b:ro:x", "invalid volume `a:/b:ro:x`: too many `:`"),
            (":/b", "invalid volume `:/b`: empty source"),
        ] {
            assert_eq!(parse(text).unwrap_err().to_string(), message);
        }
        assert!(parse_short("~/x:/x", Path::new("/p"), None).is_err());
    }
}
