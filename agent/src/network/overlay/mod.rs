//! The overlay data plane on one node (issue 5): VXLAN to the other nodes,
//! service VIPs and the routing mesh in nftables, network isolation, and
//! the node's DNS responder, all programmed from the controller's
//! `NetworkUpdate`s.
//!
//! - [`state`]: the desired state, folded from updates (pure).
//! - [`vxlan`]: the `gantry.vx` device and one route, neighbour and FDB
//!   entry per remote node (flannel's `vxlan` backend).
//! - [`rules`]: the `ip gantry_overlay` nftables table (kube-proxy's
//!   nftables mode), rendered and diffed purely, loaded in one transaction.
//! - [`dns`]: names → VIPs and task addresses, scoped by network.
//! - [`lb`]: connect-time balancing of TCP VIPs in eBPF for the node's own
//!   task containers (no per-packet NAT); the nft DNAT stays as fallback.
//!
//! [`Overlay`] is the thin shell: it keeps what it applied and, for each
//! update, applies only the difference. It starts with nothing applied, so
//! an agent restart reads the device's peers back from the kernel and
//! reloads the table once (NAT bindings live in conntrack, so established
//! connections are not disturbed); afterwards each change is incremental.
//! An agent that stops leaves the data plane as it is: containers keep
//! running and keep talking, as with Docker's `live-restore`.

pub mod dns;
pub mod lb;
pub mod rules;
pub mod state;
pub mod vxlan;

use super::{NetworkError, Subnet, link};
use state::{DesiredState, Update};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Runs `program args` with `input` on stdin; its stdout on success, its
/// stderr in the error otherwise. `step` names what was being done.
pub(crate) fn run_tool(
    program: &str,
    args: &[&str],
    step: &str,
    input: &str,
) -> Result<String, NetworkError> {
    let err = |message: String| NetworkError::Command {
        step: step.to_string(),
        message,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot run {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows up as the tool's own failure below.
        let _ = stdin.write_all(input.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|e| err(format!("waiting for {program}: {e}")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(err(String::from_utf8_lossy(&output.stderr)
            .trim()
            .to_string()))
    }
}

/// What the overlay needs to know about its node beyond the updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    /// The node's bridge (`gantry0`); it gets the node subnet's `.1`.
    pub bridge: String,
    /// The node's underlay address (the VXLAN local address) when the
    /// updates do not say: the update's own node entry (the one with this
    /// node's subnet) wins.
    pub underlay: Option<Ipv4Addr>,
    /// The data directory whose task containers are this node's clients
    /// for connect-time balancing (leases name the container of a task's
    /// address, its netns file the namespace); `None`: no local clients,
    /// every VIP takes the nft DNAT path.
    pub clients: Option<crate::paths::DataDir>,
    /// Balance TCP VIPs at `connect()` in eBPF ([`lb`]) when the kernel
    /// allows; off: nft DNAT only.
    pub connect_lb: bool,
}

/// Whether connect-time balancing is wanted: on unless
/// `GANTRY_CONNECT_LB` is `0`/`off`/`false` (a switch for operators and
/// for A/B benchmarks).
pub fn connect_lb_from_env() -> bool {
    !matches!(
        std::env::var("GANTRY_CONNECT_LB").as_deref(),
        Ok("0" | "off" | "false")
    )
}

/// The resolver of local clients in data dir `data`: the task's address →
/// its container (the lease) → its netns file → the namespace's cookie.
fn data_dir_resolver(data: crate::paths::DataDir) -> lb::ClientResolver {
    Box::new(move |_task, address| {
        let config = super::NetworkConfig::load(&data).ok()?;
        let leases = super::ipam::load(&data, &config.subnet).ok()?;
        let id = leases.leases.get(&address)?;
        lb::netns_cookie(&super::netns_path(&data, id)).ok()
    })
}

/// What one update did, for logs and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// The update was older than the state and ignored.
    pub stale: bool,
    /// Peers added, changed or removed.
    pub peer_changes: usize,
    /// Lines of the nft transaction (0: none was run).
    pub nft_lines: usize,
    /// The table was reloaded whole.
    pub full_reload: bool,
    /// The connect-time balancer's maps were updated too.
    pub lb_synced: bool,
    /// Time spent on the balancer's maps (part of `elapsed`).
    pub lb_elapsed: Duration,
    /// Time spent, update to kernel.
    pub elapsed: Duration,
}

/// The node's overlay: desired state plus what was applied.
pub struct Overlay {
    config: OverlayConfig,
    state: Arc<RwLock<DesiredState>>,
    /// The device as set up: (node subnet, underlay address, MTU).
    device: Option<(Subnet, Ipv4Addr, u32)>,
    peers: Option<vxlan::Peers>,
    model: Option<rules::Model>,
    /// The connect-time balancer, once started.
    lb: Option<lb::Balancer>,
    /// Why it is not running (logged once), once a start was tried.
    lb_off: Option<String>,
}

impl Overlay {
    /// An overlay with nothing applied yet.
    pub fn new(config: OverlayConfig) -> Overlay {
        Overlay {
            config,
            state: Arc::default(),
            device: None,
            peers: None,
            model: None,
            lb: None,
            lb_off: None,
        }
    }

    /// How service VIPs are balanced on this node, for logs and
    /// `docs/network.md`: `ebpf-connect+nft` or `nft (<why>)`.
    pub fn vip_mode(&self) -> String {
        match (&self.lb, &self.lb_off) {
            (Some(lb), _) => format!(
                "ebpf-connect+nft (attached at {}; getpeername answers the {})",
                lb.cgroup.display(),
                if lb.peer_is_vip() { "VIP" } else { "replica" }
            ),
            (None, Some(why)) => format!("nft ({why})"),
            (None, None) => "nft".to_string(),
        }
    }

    /// Whether some local task's container was not found yet: the caller
    /// calls [`Overlay::retry_clients`] a little later.
    pub fn has_pending_clients(&self) -> bool {
        self.lb.as_ref().is_some_and(lb::Balancer::has_pending)
    }

    /// Looks for the containers of local tasks not found before.
    pub fn retry_clients(&mut self) {
        let Some(balancer) = self.lb.as_mut() else {
            return;
        };
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = balancer.retry(&state) {
            drop(state);
            self.stop_lb(format!("updating its maps: {e}"));
        }
    }

    /// Stops connect-time balancing (the link closes: the kernel detaches
    /// the program), with one warning; VIPs keep working through nft.
    fn stop_lb(&mut self, why: String) {
        tracing::warn!("connect-time VIP balancing off, service VIPs use nft DNAT only: {why}");
        self.lb = None;
        self.lb_off = Some(why);
    }

    /// Starts the balancer the first time it is wanted.
    fn start_lb(&mut self) {
        if self.lb.is_some() || self.lb_off.is_some() {
            return;
        }
        if !self.config.connect_lb {
            self.lb_off = Some("turned off".into());
            tracing::info!("connect-time VIP balancing turned off: service VIPs use nft DNAT");
            return;
        }
        let resolver: lb::ClientResolver = match self.config.clients.clone() {
            Some(data) => data_dir_resolver(data),
            None => Box::new(|_, _| None),
        };
        match lb::Balancer::start(resolver) {
            Ok(b) => {
                tracing::info!(
                    cgroup = %b.cgroup.display(),
                    "service VIPs: TCP balanced at connect() in eBPF for this node's tasks, nft DNAT for the rest"
                );
                self.lb = Some(b);
            }
            Err(why) => self.stop_lb(why),
        }
    }

    /// The desired state, shared with the DNS responder.
    pub fn state(&self) -> Arc<RwLock<DesiredState>> {
        self.state.clone()
    }

    /// The overlay MTU once the device is set up (the underlay's minus the
    /// VXLAN overhead): the bridge and every container veth use it.
    pub fn mtu(&self) -> Option<u32> {
        self.device.map(|(_, _, mtu)| mtu)
    }

    /// Folds `update` in and programs the difference: the device (first
    /// time, or when the node subnet changed), the peers, the table.
    pub fn update(&mut self, update: Update) -> Result<ApplyReport, NetworkError> {
        let start = Instant::now();
        let mut report = ApplyReport::default();
        let ctx = rules::Context {
            bridge: self.config.bridge.clone(),
            vxlan: vxlan::DEVICE.to_string(),
            bridge_netfilter: link::bridge_netfilter(),
        };
        // Only services changed: the table is patched service by service
        // and nothing else is recomputed (the common case: endpoints come
        // and go). Anything else rebuilds the model and diffs it.
        let services_only = !update.full
            && update.nodes.is_empty()
            && update.removed_nodes.is_empty()
            && update.networks.is_empty()
            && update.removed_networks.is_empty()
            && update.cluster_cidr.is_none()
            && update.service_cidr.is_none()
            && update
                .node_subnet
                .is_none_or(|s| self.device.map(|d| d.0) == Some(s))
            && self.model.is_some()
            && self.peers.is_some();
        let changed = if services_only {
            update.services.clone()
        } else {
            Vec::new()
        };
        let removed = update.removed_services.clone();
        let (node_subnet, underlay, peers, model) = {
            let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
            if !state.apply(update) {
                report.stale = true;
                return Ok(report);
            }
            let underlay = state
                .nodes
                .values()
                .find(|n| Some(n.subnet) == state.node_subnet)
                .map(|n| n.underlay)
                .or(self.config.underlay);
            // Computed here, under the lock; the kernel work below runs
            // without it, so DNS answers never wait on `ip` or `nft`.
            let (peers, model) = if services_only {
                (None, None)
            } else {
                (Some(state.peers()), rules::model(&state, &ctx))
            };
            (state.node_subnet, underlay, peers, model)
        };
        if let (Some(subnet), Some(underlay)) = (node_subnet, underlay)
            && self.device.map(|(s, u, _)| (s, u)) != Some((subnet, underlay))
        {
            let mtu = vxlan::underlay_mtu(underlay)?.saturating_sub(vxlan::OVERHEAD);
            vxlan::ensure_device(underlay, &subnet, mtu)?;
            link::ensure_bridge(&self.config.bridge, &subnet)?;
            run_tool(
                "ip",
                &["-batch", "-"],
                "set bridge mtu",
                &format!("link set {} mtu {mtu}\n", self.config.bridge),
            )?;
            link::enable_forwarding(&self.config.bridge)?;
            // 127.0.0.1:PORT of the routing mesh may be DNATed to a replica
            // on another node: as on the bridge, the kernel must route it.
            let _ = std::fs::write(
                format!("/proc/sys/net/ipv4/conf/{}/route_localnet", vxlan::DEVICE),
                "1\n",
            );
            self.device = Some((subnet, underlay, mtu));
        }
        if let (Some(new), Some(_)) = (peers, self.device) {
            let old = match self.peers.take() {
                Some(p) => p,
                None => vxlan::kernel_peers()?,
            };
            let plan = vxlan::plan(&old, &new);
            report.peer_changes = plan.fdb.lines().count() + plan.fdb_del.lines().count();
            if let Err(e) = vxlan::apply_plan(&plan) {
                // Unknown: read back from the kernel next time.
                self.peers = None;
                return Err(e);
            }
            self.peers = Some(new);
        }
        let commands = if services_only {
            let patched = self.model.as_mut().and_then(|m| {
                let refs: Vec<&state::ServiceRecord> = changed.iter().collect();
                m.patch(&refs, &removed)
            });
            match patched {
                Some(c) => Some(c),
                None => {
                    // A patch could not do it: the whole model, diffed.
                    let state = self.state.read().unwrap_or_else(|p| p.into_inner());
                    let new = rules::model(&state, &ctx);
                    drop(state);
                    let old = self.model.take();
                    self.model = new;
                    match (&old, &self.model) {
                        (Some(old), Some(new)) => rules::diff(old, new),
                        (None, Some(new)) => Some(rules::full(new)),
                        _ => None,
                    }
                }
            }
        } else if let Some(new) = model {
            let commands = match &self.model {
                Some(old) => rules::diff(old, &new),
                None => Some(rules::full(&new)),
            };
            self.model = Some(new);
            commands
        } else {
            None
        };
        if let Some(commands) = commands.filter(|c| !c.is_empty()) {
            report.full_reload = commands.starts_with("table ip");
            report.nft_lines = commands.lines().count();
            if let Err(e) = rules::apply(&commands) {
                // Unknown now: the next update reloads the whole table.
                self.model = None;
                return Err(e);
            }
        }
        // A balancer started just now has empty maps: it gets everything.
        let fresh = self.lb.is_none() && self.device.is_some() && {
            self.start_lb();
            self.lb.is_some()
        };
        if let Some(balancer) = self.lb.as_mut() {
            let lb_start = Instant::now();
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            let synced = if services_only && !fresh {
                balancer.sync_some(&changed, &removed, &state)
            } else {
                balancer.sync_all(&state)
            };
            drop(state);
            report.lb_elapsed = lb_start.elapsed();
            match synced {
                Ok(()) => report.lb_synced = true,
                Err(e) => self.stop_lb(format!("updating its maps: {e}")),
            }
        }
        report.elapsed = start.elapsed();
        Ok(report)
    }

    /// Removes everything the overlay made on this node: the table, the
    /// VXLAN device with its entries, and the bridge if no container is on
    /// it any more (one that is keeps it: it is the engine's too). For a
    /// node leaving the cluster and for tests; an agent that merely stops
    /// leaves the data plane running.
    pub fn teardown(&mut self) -> Result<(), NetworkError> {
        self.model = None;
        self.peers = None;
        self.device = None;
        self.lb = None;
        self.lb_off = None;
        let table = rules::delete_table();
        let device = vxlan::delete_device();
        let bridge = match link::exists(&self.config.bridge) {
            Ok(true) => {
                let ports = run_tool(
                    "ip",
                    &["-o", "link", "show", "master", &self.config.bridge],
                    "list bridge ports",
                    "",
                )?;
                if ports.trim().is_empty() {
                    link::delete_link(&self.config.bridge)
                } else {
                    Ok(())
                }
            }
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        table.and(device).and(bridge)
    }
}
