//! The controllers an agent knows and the one it talks to now.
//!
//! An agent starts with the `--join` addresses, adds the list its
//! controller sends in `SessionAccepted.controllers` (every member, the
//! leader first) and keeps that list in `<data_dir>/agent/controllers.json`
//! so that an agent restarted while its `--join` controller is gone still
//! finds the others (Swarm workers keep their managers' addresses the same
//! way). On a broken session it follows the refusing controller's
//! `gantry-leader` hint if there was one, else moves to the next address;
//! a hint naming a controller that just failed by itself is stale (a
//! follower that has not yet noticed the leader's death) and is passed
//! over, so the agent reaches the new leader without waiting.
//!
//! Pure but for [`Controllers::load`]/[`Controllers::save`]: no I/O on the
//! session's path beyond one small file written when the list changes.

use std::path::{Path, PathBuf};

use crate::paths::DataDir;

/// The file that keeps the last known controller list.
pub fn controllers_path(data_dir: &DataDir) -> PathBuf {
    data_dir.root().join("agent").join("controllers.json")
}

/// The known controller addresses and the current one.
#[derive(Debug, Clone)]
pub struct Controllers {
    addresses: Vec<String>,
    current: usize,
    /// Moves since the last accepted session (a whole round through the
    /// list without one means every controller is unreachable: back off).
    moves: usize,
    /// Addresses that failed without naming a leader in this round (down,
    /// unreachable). A follower that has not noticed the leader's death
    /// yet names it: following that hint back would bounce between the
    /// dead leader and that follower, never trying the new leader.
    unreachable: Vec<String>,
}

impl Controllers {
    /// The `--join` addresses (first tried first), then the ones remembered
    /// in `path`, without duplicates.
    pub fn new(join: &[String], remembered: &[String]) -> Controllers {
        let mut addresses: Vec<String> = Vec::new();
        for a in join.iter().chain(remembered) {
            if !a.is_empty() && !addresses.contains(a) {
                addresses.push(a.clone());
            }
        }
        Controllers {
            addresses,
            current: 0,
            moves: 0,
            unreachable: Vec::new(),
        }
    }

    /// Reads the remembered list; a missing or unreadable file is an empty
    /// list (the `--join` addresses still work), logged when unreadable.
    pub fn load(path: &Path) -> Vec<String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "ignoring the remembered controllers: {e}");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    /// Keeps `list` in `path` (temporary file, then rename).
    pub fn save(path: &Path, list: &[String]) {
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(list).unwrap_or_default())?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), "cannot remember the controllers: {e}");
        }
    }

    /// The address to connect to now.
    pub fn current(&self) -> &str {
        self.addresses.get(self.current).map_or("", String::as_str)
    }

    /// Every known address.
    pub fn all(&self) -> &[String] {
        &self.addresses
    }

    /// A session was accepted: `members` (leader first) joins the list, in
    /// front, and the current address stays the current one.
    pub fn accepted(&mut self, members: &[String]) {
        self.moves = 0;
        self.unreachable.clear();
        if members.is_empty() {
            return;
        }
        let current = self.current().to_string();
        let mut addresses: Vec<String> = Vec::new();
        for a in members.iter().chain(&self.addresses) {
            if !a.is_empty() && !addresses.contains(a) {
                addresses.push(a.clone());
            }
        }
        self.addresses = addresses;
        self.current = self
            .addresses
            .iter()
            .position(|a| *a == current)
            .unwrap_or(0);
    }

    /// The session broke: go to `leader` when the controller named one
    /// (unless that one just failed by itself in this round: the hint is
    /// stale), else to the next address, those that failed by themselves
    /// last. Returns true when a whole round through the list has failed
    /// (the caller backs off before the next try).
    pub fn failed(&mut self, leader: Option<&str>) -> bool {
        let leader = leader.filter(|l| !l.is_empty() && *l != self.current());
        let stale = leader.is_some_and(|l| self.unreachable.iter().any(|u| u == l));
        if let Some(leader) = leader.filter(|_| !stale) {
            match self.addresses.iter().position(|a| a == leader) {
                Some(i) => self.current = i,
                None => {
                    self.addresses.push(leader.to_string());
                    self.current = self.addresses.len() - 1;
                }
            }
            self.moves += 1;
            // A hint is worth following at once, unless hints go round in
            // circles (two controllers each naming the other mid-election).
            return self.round_done(self.moves > self.addresses.len());
        }
        if leader.is_none() {
            let failed = self.current().to_string();
            if !self.unreachable.contains(&failed) {
                self.unreachable.push(failed);
            }
        }
        let n = self.addresses.len();
        if n > 0 {
            self.current = (1..=n)
                .map(|step| (self.current + step) % n)
                .find(|&i| !self.unreachable.contains(&self.addresses[i]))
                .unwrap_or((self.current + 1) % n);
        }
        self.moves += 1;
        self.round_done(self.moves >= n)
    }

    /// Ends a round when `done`: the caller waits once, and the next round
    /// tries every address again (without the reset, every failure after
    /// the first round would count as a whole round and back off).
    fn round_done(&mut self, done: bool) -> bool {
        if done {
            self.moves = 0;
            self.unreachable.clear();
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn join_addresses_come_first_and_remembered_ones_follow() {
        let c = Controllers::new(&list(&["a:1", "b:1"]), &list(&["b:1", "c:1"]));
        assert_eq!(c.all(), list(&["a:1", "b:1", "c:1"]));
        assert_eq!(c.current(), "a:1");
    }

    #[test]
    fn a_failure_moves_on_and_a_round_of_failures_backs_off() {
        let mut c = Controllers::new(&list(&["a:1", "b:1", "c:1"]), &[]);
        assert!(!c.failed(None));
        assert_eq!(c.current(), "b:1");
        assert!(!c.failed(None));
        assert_eq!(c.current(), "c:1");
        assert!(c.failed(None), "three failures in a row are a whole round");
        assert_eq!(c.current(), "a:1");
        assert!(!c.failed(None), "the next round starts without a wait");
        c.accepted(&[]);
        assert!(!c.failed(None), "an accepted session starts a new round");
    }

    /// The leader `a` died; follower `b` has not noticed and still names
    /// it; `c` leads now. The agent must reach `c` without waiting.
    #[test]
    fn a_stale_hint_naming_a_controller_that_just_failed_is_not_followed() {
        let mut c = Controllers::new(&list(&["a:1", "b:1", "c:1"]), &[]);
        assert!(!c.failed(None), "a is down");
        assert_eq!(c.current(), "b:1");
        assert!(!c.failed(Some("a:1")), "b names the dead leader");
        assert_eq!(
            c.current(),
            "c:1",
            "tried next instead of bouncing back to a"
        );
    }

    #[test]
    fn the_leader_hint_is_followed_and_learned() {
        let mut c = Controllers::new(&list(&["a:1"]), &[]);
        assert!(!c.failed(Some("z:1")));
        assert_eq!(c.current(), "z:1");
        assert_eq!(c.all(), list(&["a:1", "z:1"]));
    }

    #[test]
    fn the_accepted_members_go_first_and_the_current_one_stays() {
        let mut c = Controllers::new(&list(&["b:1"]), &[]);
        c.accepted(&list(&["a:1", "b:1", "c:1"]));
        assert_eq!(c.all(), list(&["a:1", "b:1", "c:1"]));
        assert_eq!(c.current(), "b:1");
    }

    #[test]
    fn the_list_is_remembered_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let path = controllers_path(&DataDir::new(dir.path()));
        assert!(Controllers::load(&path).is_empty());
        Controllers::save(&path, &list(&["a:1", "b:1"]));
        assert_eq!(Controllers::load(&path), list(&["a:1", "b:1"]));
    }
}
