//! Resolving a `user` string against an image's `/etc/passwd` and `/etc/group`.
//!
//! Accepted forms, as in Docker: empty (root), `name`, `uid`, `uid:gid`,
//! `name:group`, `uid:group`, `name:gid`. A name that the image does not
//! know is an error naming it; a numeric uid the image does not know is
//! used as is with gid 0. The supplementary groups are the groups of
//! `/etc/group` that list the user as a member, as runc and containerd do.
//!
//! The files are read with `openat2(RESOLVE_IN_ROOT)`, so a symlink in the
//! image (e.g. `/etc/passwd -> /host/etc/passwd`) resolves inside the rootfs
//! and can never make the engine read a host file.

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Errors of user resolution.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The user name is not in the image's `/etc/passwd`.
    #[error("unable to find user {0}: no matching entries in passwd file")]
    UnknownUser(String),
    /// The group name is not in the image's `/etc/group`.
    #[error("unable to find group {0}: no matching entries in group file")]
    UnknownGroup(String),
    /// The user string has a bad shape.
    #[error("invalid user {0:?}: expected name, uid, uid:gid or name:group")]
    Invalid(String),
    /// A file of the rootfs could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The path inside the rootfs.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

/// The identity a container process runs with.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResolvedUser {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
    /// Supplementary group ids, sorted, without the primary one.
    pub additional_gids: Vec<u32>,
    /// The home directory from `/etc/passwd`, if the user is listed.
    pub home: Option<String>,
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// Group name.
    pub name: String,
    /// Group id.
    pub gid: u32,
    /// Member user names.
    pub members: Vec<String>,
}

/// Parses `/etc/passwd`, skipping malformed lines and comments.
pub fn parse_passwd(content: &str) -> Vec<PasswdEntry> {
    content
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: fields[0].to_string(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
                home: fields.get(5).map(|h| h.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

/// Parses `/etc/group`, skipping malformed lines and comments.
pub fn parse_group(content: &str) -> Vec<GroupEntry> {
    content
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 3 {
                return None;
            }
            Some(GroupEntry {
                name: fields[0].to_string(),
                gid: fields[2].parse().ok()?,
                members: fields
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|m| !m.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Resolves `user` against parsed passwd and group entries (pure).
pub fn resolve(
    user: &str,
    passwd: &[PasswdEntry],
    groups: &[GroupEntry],
) -> Result<ResolvedUser, UserError> {
    let user = user.trim();
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if group_part.is_some_and(|g| g.is_empty() || g.contains(':')) {
        return Err(UserError::Invalid(user.to_string()));
    }
    let user_part = if user_part.is_empty() { "0" } else { user_part };

    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd
            .iter()
            .find(|p| p.uid == uid)
            .cloned()
            .unwrap_or(PasswdEntry {
                name: String::new(),
                uid,
                gid: 0,
                home: String::new(),
            }),
        Err(_) => passwd
            .iter()
            .find(|p| p.name == user_part)
            .cloned()
            .ok_or_else(|| UserError::UnknownUser(user_part.to_string()))?,
    };

    let gid = match group_part {
        None => entry.gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                groups
                    .iter()
                    .find(|g| g.name == group)
                    .ok_or_else(|| UserError::UnknownGroup(group.to_string()))?
                    .gid
            }
        },
    };

    let mut additional_gids: Vec<u32> = if entry.name.is_empty() {
        Vec::new()
    } else {
        groups
            .iter()
            .filter(|g| g.members.contains(&entry.name))
            .map(|g| g.gid)
            .filter(|g| *g != gid)
            .collect()
    };
    additional_gids.sort_unstable();
    additional_gids.dedup();

    Ok(ResolvedUser {
        uid: entry.uid,
        gid,
        additional_gids,
        home: (!entry.home.is_empty()).then_some(entry.home),
    })
}

/// Resolves `user` against the image's files in `rootfs` (a missing file
/// counts as empty).
pub fn resolve_in_rootfs(rootfs: &Path, user: &str) -> Result<ResolvedUser, UserError> {
    let passwd = read_in_root(rootfs, "etc/passwd")?.unwrap_or_default();
    let group = read_in_root(rootfs, "etc/group")?.unwrap_or_default();
    resolve(user, &parse_passwd(&passwd), &parse_group(&group))
}

/// Reads `relative` inside `root`, resolving every symlink as if `root`
/// were `/`. `None` when it does not exist.
pub fn read_in_root(root: &Path, relative: &str) -> Result<Option<String>, UserError> {
    let io = |source: std::io::Error| UserError::Io {
        path: root.join(relative),
        source,
    };
    let root_fd = std::fs::File::open(root).map_err(io)?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .mode(Mode::empty())
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(&root_fd, relative, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(io(e.into())),
    };
    let mut content = String::new();
    // Bounded: a passwd file of a megabyte is already absurd.
    std::fs::File::from(fd)
        .take(1 << 20)
        .read_to_string(&mut content)
        .map_err(io)?;
    Ok(Some(content))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
        # comment\n\
        app:x:1000:1000:app:/home/app:/bin/sh\n\
        broken line\n";
    const GROUP: &str =
        "root:x:0:\nwheel:x:10:root,app\napp:x:1000:\naudio:x:29:app\nstaff:x:50:\n";

    fn r(user: &str) -> Result<ResolvedUser, UserError> {
        resolve(user, &parse_passwd(PASSWD), &parse_group(GROUP))
    }

    #[test]
    fn names_and_ids_resolve() {
        assert_eq!(
            r("").unwrap(),
            ResolvedUser {
                uid: 0,
                gid: 0,
                additional_gids: vec![10],
                home: Some("/root".into())
            }
        );
        assert_eq!(
            r("app").unwrap(),
            ResolvedUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![10, 29],
                home: Some("/home/app".into())
            }
        );
        assert_eq!(r("1000").unwrap().additional_gids, vec![10, 29]);
        assert_eq!(r("app:staff").unwrap().gid, 50);
        assert_eq!(r("app:7").unwrap().gid, 7);
        assert_eq!(r("daemon").unwrap().gid, 1);
        assert_eq!(
            r("4242:4243").unwrap(),
            ResolvedUser {
                uid: 4242,
                gid: 4243,
                additional_gids: vec![],
                home: None
            }
        );
        assert_eq!(r("4242").unwrap().gid, 0);
    }

    #[test]
    fn unknown_names_are_errors_naming_them() {
        assert_eq!(
            r("nobody").unwrap_err().to_string(),
            "unable to find user nobody: no matching entries in passwd file"
        );
        assert_eq!(
            r("app:games").unwrap_err().to_string(),
            "unable to find group games: no matching entries in group file"
        );
        assert!(matches!(r("app:"), Err(UserError::Invalid(_))));
    }

    #[test]
    fn symlinks_do_not_escape_the_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        // A host-looking file outside the rootfs that an absolute symlink targets.
        let outside = dir.path().join("etc");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("passwd"), "evil:x:0:0::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("etc/passwd"), rootfs.join("etc/passwd"))
            .unwrap();
        // Resolved inside the rootfs the target does not exist: no passwd.
        assert!(matches!(
            resolve_in_rootfs(&rootfs, "evil"),
            Err(UserError::UnknownUser(_))
        ));
        // A relative symlink climbing out is clamped at the rootfs too.
        std::fs::remove_file(rootfs.join("etc/passwd")).unwrap();
        std::fs::write(dir.path().join("passwd-outside"), "evil:x:0:0::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("../../passwd-outside", rootfs.join("etc/passwd")).unwrap();
        std::fs::write(rootfs.join("etc/real"), PASSWD).unwrap();
        assert!(matches!(
            resolve_in_rootfs(&rootfs, "evil"),
            Err(UserError::UnknownUser(_))
        ));
        // And an in-root absolute symlink works.
        std::fs::remove_file(rootfs.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/real", rootfs.join("etc/passwd")).unwrap();
        std::fs::write(rootfs.join("etc/group"), GROUP).unwrap();
        assert_eq!(resolve_in_rootfs(&rootfs, "app").unwrap().uid, 1000);
    }
}
