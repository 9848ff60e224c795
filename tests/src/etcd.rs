//! etcd as a peer: an N-member etcd cluster (Debian's `etcd-server`), each
//! member on its own host of the dev-cluster harness (a network namespace
//! on a bridge, [`crate::cluster`]), so etcd and Gantry's controllers are
//! measured on the same kind of network and torn down the same way (every
//! process killed by PID, namespaces, bridge and data removed on drop).
//!
//! The members run with etcd's default timings (heartbeat 100 ms, election
//! 1000 ms) plus `--pre-vote` (off by default in 3.4; the issue saw one
//! election take 7 s without it). etcd always runs raft with check-quorum.

use crate::cluster::{self, Cluster, ClusterConfig, Readiness, RoleCommands, Subnet};
use crate::load::etcd as wire;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where Debian's `etcd-server` puts the server.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// etcd's client port.
pub const CLIENT_PORT: u16 = 2379;
/// etcd's peer port.
pub const PEER_PORT: u16 = 2380;

/// Errors of running an etcd cluster.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The harness failed.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    /// The members did not agree on a leader in time.
    #[error("etcd cluster {name}: no leader within {waited:?} ({detail})")]
    NoLeader {
        /// The cluster.
        name: String,
        /// How long it waited.
        waited: Duration,
        /// What the members said, and their logs' tails.
        detail: String,
    },
}

/// A running etcd cluster; dropped, it is torn down.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The harness cluster whose controller hosts (`c1`…) run the members.
    pub cluster: Cluster,
}

/// Whether etcd can run here: `None` when it can, else why not. A missing
/// etcd is installed first (Debian's `etcd-server`, as the container-start
/// bench installs runc and crun); on a machine with systemd the package
/// also starts a host-wide `etcd.service`, which the benchmark neither uses
/// nor stops.
pub fn missing_etcd() -> Option<String> {
    if Path::new(ETCD_BIN).exists() {
        return None;
    }
    match crate::peers::find_or_install("etcd") {
        Ok(_) if Path::new(ETCD_BIN).exists() => None,
        Ok(found) => Some(format!(
            "needs etcd at {ETCD_BIN}; found {} instead",
            found.display()
        )),
        Err(err) => Some(format!("needs etcd ({ETCD_BIN}): {err}")),
    }
}

/// `etcd --version`'s first line (`etcd Version: 3.4.23`).
pub fn etcd_version() -> String {
    std::process::Command::new(ETCD_BIN)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The argv of member `host` of a cluster at `addresses` (c1, c2, … in
/// order).
fn member_argv(name: &str, addresses: &[Ipv4Addr]) -> Vec<String> {
    let initial: Vec<String> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| format!("c{}=http://{a}:{PEER_PORT}", i + 1))
        .collect();
    [
        ETCD_BIN,
        "--name",
        "{host}",
        "--data-dir",
        "{data_dir}/etcd",
        "--listen-client-urls",
        &format!("http://{{addr}}:{CLIENT_PORT}"),
        "--advertise-client-urls",
        &format!("http://{{addr}}:{CLIENT_PORT}"),
        "--listen-peer-urls",
        &format!("http://{{addr}}:{PEER_PORT}"),
        "--initial-advertise-peer-urls",
        &format!("http://{{addr}}:{PEER_PORT}"),
        "--initial-cluster",
        &initial.join(","),
        "--initial-cluster-token",
        name,
        "--initial-cluster-state",
        "new",
        "--pre-vote",
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl EtcdCluster {
    /// Starts `members` etcd members as hosts `c1…` of a harness cluster
    /// named `name` and waits (≤ 30 s) until every member knows the leader.
    pub fn up(name: &str, members: u32) -> Result<EtcdCluster, EtcdError> {
        // The members' command lines name each other's addresses, so the
        // subnet is chosen here (hosts get .2, .3, … in order); one taken
        // meanwhile by a concurrent cluster is refused by the harness under
        // its lock, and the next is tried.
        let start = 1 + name
            .bytes()
            .fold(7u32, |h, b| h.wrapping_mul(31) + u32::from(b))
            % 254;
        let mut last = None;
        for attempt in 0..16u32 {
            let used = cluster::net::used_subnets().map_err(cluster::ClusterError::from)?;
            let subnet = (0..254u32)
                .map(|i| Subnet {
                    network: Ipv4Addr::new(10, 251, ((start + attempt + i) % 254 + 1) as u8, 0),
                    prefix: 24,
                })
                .find(|s| !used.iter().any(|u| u.overlaps(s)));
            let Some(subnet) = subnet else { break };
            let addresses: Vec<Ipv4Addr> = (0..members).filter_map(|i| subnet.nth(i + 2)).collect();
            let mut config = ClusterConfig::new(PathBuf::from(ETCD_BIN));
            config.name = name.to_string();
            config.controllers = members;
            config.agents = 0;
            config.subnet = Some(subnet);
            config.readiness = Readiness::Started;
            config.commands = Some(RoleCommands {
                controller: member_argv(name, &addresses),
                agent: Vec::new(),
            });
            match Cluster::up(config) {
                Ok(cluster) => {
                    let etcd = EtcdCluster { cluster };
                    etcd.wait_leader(Duration::from_secs(30))?;
                    return Ok(etcd);
                }
                Err(e @ cluster::ClusterError::SubnetInUse { .. }) => last = Some(e),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last
            .unwrap_or(cluster::ClusterError::InvalidConfig {
                reason: "no free /24 in 10.251.0.0/16 for the etcd cluster".into(),
            })
            .into())
    }

    /// The members' host names (`c1`, …).
    pub fn members(&self) -> Vec<String> {
        self.cluster.hosts_with(cluster::Role::Controller)
    }

    /// A member's client endpoint, `addr:2379`.
    pub fn endpoint(&self, host: &str) -> String {
        match self.cluster.host_addr(host) {
            Ok(a) => format!("{a}:{CLIENT_PORT}"),
            Err(_) => format!("{host}:{CLIENT_PORT}"),
        }
    }

    /// Every member's client endpoint, in host order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members().iter().map(|h| self.endpoint(h)).collect()
    }

    /// The leader's host as the live members report it (`None` if none of
    /// them knows one), asking each member for at most 500 ms.
    pub fn leader(&self) -> Option<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let mut ids = Vec::new();
        let mut leader = 0u64;
        for host in self.members() {
            let endpoint = self.endpoint(&host);
            let asked = rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(500), wire::status(&endpoint)).await
            });
            if let Ok(Ok((me, lead))) = asked {
                ids.push((host, me));
                if lead != 0 {
                    leader = lead;
                }
            }
        }
        ids.into_iter()
            .find(|(_, id)| *id == leader && leader != 0)
            .map(|(h, _)| h)
    }

    /// Waits until a leader is known (and every member answers).
    pub fn wait_leader(&self, limit: Duration) -> Result<String, EtcdError> {
        let start = Instant::now();
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if start.elapsed() > limit {
                let tails: Vec<String> = self
                    .members()
                    .iter()
                    .map(|h| format!("--- {h} ---\n{}", self.cluster.log_tail(h, 5)))
                    .collect();
                return Err(EtcdError::NoLeader {
                    name: self.cluster.name().to_string(),
                    waited: limit,
                    detail: tails.join("\n"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_name_each_other() {
        let argv = member_argv(
            "e1",
            &[Ipv4Addr::new(10, 251, 9, 2), Ipv4Addr::new(10, 251, 9, 3)],
        );
        let line = argv.join(" ");
        assert!(line.starts_with("/usr/bin/etcd --name {host} --data-dir {data_dir}/etcd"));
        assert!(
            line.contains("--initial-cluster c1=http://10.251.9.2:2380,c2=http://10.251.9.3:2380")
        );
        assert!(line.contains("--listen-client-urls http://{addr}:2379"));
        assert!(line.contains("--pre-vote"));
    }
}
