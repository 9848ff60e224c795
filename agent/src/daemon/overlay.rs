//! The agent's side of the overlay: the controller's `NetworkUpdate`s,
//! converted at this boundary and applied in order on a thread of their own
//! (`ip` and `nft` are processes: they never run on the async runtime, and a
//! slow one never holds up heartbeats), the node's network config written
//! for the engine, and the DNS responder started on the bridge's gateway.
//!
//! **Invariant:** an agent that stops leaves the data plane as it is; the
//! next one rebuilds from the first full update without disturbing
//! established connections (see `network::overlay`). When the last service
//! that needs the data plane goes, the agent removes it (back to dormant),
//! and [`leave`] removes it for a node leaving the cluster.

use crate::network::overlay::state::{
    ClusterNetwork, DesiredState, Endpoint, OverlayNode, ServicePort, ServiceRecord, Update,
};
use crate::network::overlay::{Overlay, OverlayConfig, dns, vxlan};
use crate::network::{NetworkConfig, Subnet};
use crate::paths::DataDir;
use gantry_proto::v1 as pb;
use std::net::Ipv4Addr;
use std::sync::mpsc;

/// A field of an update that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("network update: {field} {value:?}: {reason}")]
pub struct UpdateError {
    /// The field, e.g. `services[web].endpoints[2].address`.
    pub field: String,
    /// Its value.
    pub value: String,
    /// Why it cannot be used.
    pub reason: String,
}

fn bad(field: impl Into<String>, value: &str, reason: impl ToString) -> UpdateError {
    UpdateError {
        field: field.into(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn subnet(field: &str, value: &str) -> Result<Option<Subnet>, UpdateError> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|e| bad(field, value, e))
}

fn addr(field: impl Into<String>, value: &str) -> Result<Ipv4Addr, UpdateError> {
    value
        .parse()
        .map_err(|_| bad(field, value, "not an IPv4 address"))
}

/// The wire's update as the overlay's.
pub fn convert(u: &pb::NetworkUpdate) -> Result<Update, UpdateError> {
    let nodes = u
        .nodes
        .iter()
        .map(|n| {
            let field = |f: &str| format!("nodes[{}].{f}", n.node_id);
            Ok(OverlayNode {
                id: n.node_id.clone(),
                underlay: addr(field("underlay_ip"), &n.underlay_ip)?,
                subnet: subnet(&field("subnet"), &n.subnet)?
                    .ok_or_else(|| bad(field("subnet"), "", "missing"))?,
            })
        })
        .collect::<Result<_, UpdateError>>()?;
    let services = u
        .services
        .iter()
        .map(|s| {
            let field = |f: &str| format!("services[{}].{f}", s.service_id);
            let vip = match s.virtual_ip.as_str() {
                "" => None,
                v => Some(addr(field("virtual_ip"), v)?),
            };
            let ports = s
                .ports
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let port = |n: u32, f: &str| {
                        u16::try_from(n).ok().filter(|n| *n > 0).ok_or_else(|| {
                            bad(
                                field(&format!("ports[{i}].{f}")),
                                &n.to_string(),
                                "not a port (1-65535)",
                            )
                        })
                    };
                    Ok(ServicePort {
                        protocol: match pb::Protocol::try_from(p.protocol) {
                            Ok(pb::Protocol::Udp) => crate::engine::spec::PortProtocol::Udp,
                            _ => crate::engine::spec::PortProtocol::Tcp,
                        },
                        target: port(p.target, "target")?,
                        published: p.published.map(|n| port(n, "published")).transpose()?,
                        // Swarm's default is the routing mesh.
                        ingress: !matches!(
                            pb::PublishMode::try_from(p.mode),
                            Ok(pb::PublishMode::Host)
                        ),
                    })
                })
                .collect::<Result<_, UpdateError>>()?;
            let endpoints = s
                .endpoints
                .iter()
                .map(|e| {
                    Ok(Endpoint {
                        task: e.task.clone(),
                        node: e.node.clone(),
                        address: addr(
                            field(&format!("endpoints[{}].address", e.task)),
                            &e.address,
                        )?,
                        ready: e.ready,
                    })
                })
                .collect::<Result<_, UpdateError>>()?;
            Ok(ServiceRecord {
                id: s.service_id.clone(),
                name: s.name.clone(),
                stack: s.stack.clone(),
                // dnsrr has no VIP whatever the field says.
                vip: vip.filter(|_| {
                    !matches!(
                        pb::EndpointMode::try_from(s.endpoint_mode),
                        Ok(pb::EndpointMode::Dnsrr)
                    )
                }),
                ports,
                networks: s.networks.clone(),
                endpoints,
            })
        })
        .collect::<Result<_, UpdateError>>()?;
    Ok(Update {
        full: u.full,
        revision: u.revision,
        cluster_cidr: subnet("cluster_cidr", &u.cluster_cidr)?,
        service_cidr: subnet("service_cidr", &u.service_cidr)?,
        node_subnet: subnet("node_subnet", &u.node_subnet)?,
        nodes,
        removed_nodes: u.removed_nodes.clone(),
        services,
        removed_services: u.removed_services.clone(),
        networks: u
            .networks
            .iter()
            .map(|n| ClusterNetwork {
                name: n.name.clone(),
                stack: n.stack.clone(),
            })
            .collect(),
        removed_networks: u.removed_networks.clone(),
    })
}

/// The overlay thread's mailbox.
pub struct OverlayHandle {
    tx: mpsc::Sender<pb::NetworkUpdate>,
}

impl OverlayHandle {
    /// Starts the overlay thread for `data`'s node; `underlay` is the
    /// node's advertised address when it is an IPv4 address (the update's
    /// own node entry is preferred).
    pub fn start(data: DataDir, underlay: Option<Ipv4Addr>) -> std::io::Result<OverlayHandle> {
        let (tx, rx) = mpsc::channel::<pb::NetworkUpdate>();
        std::thread::Builder::new()
            .name("gantry-overlay".into())
            .spawn(move || run(data, underlay, rx))?;
        Ok(OverlayHandle { tx })
    }

    /// Queues an update; applied in order.
    pub fn send(&self, update: pb::NetworkUpdate) {
        if self.tx.send(update).is_err() {
            tracing::error!("the overlay thread is gone; network update dropped");
        }
    }
}

/// A DNS responder on its own thread and runtime; stopped on drop.
struct DnsThread {
    gateway: Ipv4Addr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for DnsThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn start_dns(
    gateway: Ipv4Addr,
    state: std::sync::Arc<std::sync::RwLock<crate::network::overlay::state::DesiredState>>,
) -> Option<DnsThread> {
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let upstreams = dns::upstreams(&resolv);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ok_tx, ok_rx) = mpsc::channel::<Result<(), String>>();
    let spawned = std::thread::Builder::new()
        .name("gantry-dns".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ok_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                match dns::spawn((gateway, 53).into(), state, upstreams) {
                    Ok(_server) => {
                        let _ = ok_tx.send(Ok(()));
                        let _ = stop_rx.await;
                    }
                    Err(e) => {
                        let _ = ok_tx.send(Err(e.to_string()));
                    }
                }
            });
        });
    if let Err(e) = spawned {
        tracing::warn!("dns: cannot start its thread: {e}");
        return None;
    }
    match ok_rx.recv() {
        Ok(Ok(())) => {
            tracing::info!(%gateway, "dns responder listening on {gateway}:53");
            Some(DnsThread {
                gateway,
                stop: Some(stop_tx),
            })
        }
        Ok(Err(e)) => {
            tracing::warn!(%gateway, "dns: cannot serve {gateway}:53: {e}; retried on the next update");
            None
        }
        Err(_) => None,
    }
}

fn run(data: DataDir, underlay: Option<Ipv4Addr>, rx: mpsc::Receiver<pb::NetworkUpdate>) {
    let bridge = NetworkConfig::load(&data)
        .map(|c| c.bridge)
        .unwrap_or_else(|_| crate::network::DEFAULT_BRIDGE.to_string());
    // Dormant until the cluster has a service that needs the data plane (a
    // VIP, or a task with an address): a cluster of host-network tasks
    // gets no device, bridge, table or DNS socket on its nodes. The state
    // is gathered meanwhile and handed over whole.
    let mut dormant = DesiredState::default();
    let mut overlay: Option<Overlay> = None;
    let mut dns: Option<DnsThread> = None;
    // Set when the overlay went back to dormant with a container still on
    // the bridge (a removed stack's tasks stop after their service record
    // is gone): the bridge and the engine's table go once it is empty,
    // checked every second for at most `IDLE_BRIDGE_RETRIES` seconds.
    let mut idle_bridge: Option<u32> = None;
    loop {
        let pending = overlay.as_ref().is_some_and(Overlay::has_pending_clients);
        let wire = match idle_bridge {
            // A local task's container is not made yet: its namespace is
            // looked for again shortly, so that its connects get balanced.
            None if pending => match rx.recv_timeout(std::time::Duration::from_millis(500)) {
                Ok(w) => w,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(o) = overlay.as_mut() {
                        o.retry_clients();
                    }
                    continue;
                }
            },
            None => match rx.recv() {
                Ok(w) => w,
                Err(_) => return,
            },
            Some(tries) => match rx.recv_timeout(std::time::Duration::from_secs(1)) {
                Ok(w) => w,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    idle_bridge = remove_idle_bridge(&data, &bridge, tries);
                    continue;
                }
            },
        };
        let update = match convert(&wire) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(revision = wire.revision, "{e}; update ignored");
                continue;
            }
        };
        let active = match overlay.as_mut() {
            Some(o) => {
                log_applied(wire.revision, o.update(update));
                o
            }
            None => {
                dormant.apply(update);
                if let Some(subnet) = dormant.node_subnet {
                    // The engine's config is a file: written even while
                    // dormant, so that tasks created meanwhile get the node
                    // subnet and MTU.
                    let mtu = node_underlay(&dormant, underlay)
                        .and_then(|u| vxlan::underlay_mtu(u).ok())
                        .map(|m| m.saturating_sub(vxlan::OVERHEAD));
                    save_config(&data, subnet, dormant.cluster_cidr, mtu);
                }
                if !dormant.has_overlay_services() {
                    tracing::debug!(
                        revision = wire.revision,
                        "overlay dormant: no service needs it yet"
                    );
                    continue;
                }
                let mut o = Overlay::new(OverlayConfig {
                    bridge: bridge.clone(),
                    underlay,
                    clients: Some(data.clone()),
                    connect_lb: crate::network::overlay::connect_lb_from_env(),
                });
                log_applied(wire.revision, o.update(dormant.to_full_update()));
                overlay.insert(o)
            }
        };
        let (node_subnet, cluster_cidr) = {
            let state = active.state();
            let s = state.read().unwrap_or_else(|p| p.into_inner());
            (s.node_subnet, s.cluster_cidr)
        };
        if let Some(subnet) = node_subnet {
            save_config(&data, subnet, cluster_cidr, active.mtu());
            if dns.as_ref().map(|d| d.gateway) != Some(subnet.gateway()) {
                // The old responder (another gateway) stops first.
                drop(dns.take());
                dns = start_dns(subnet.gateway(), active.state());
            }
        }
        let state = active.state();
        let idle = {
            let s = state.read().unwrap_or_else(|p| p.into_inner());
            (!s.has_overlay_services()).then(|| s.clone())
        };
        if let Some(state) = idle {
            // The last service that needed the data plane is gone: back to
            // dormant, leaving the node as before the first one (Swarm
            // removes a network's sandbox, VXLAN device and rules from a
            // node when its last task there goes). The state is kept for
            // the next activation.
            tracing::info!(
                revision = wire.revision,
                "no service needs the overlay any more: tearing it down"
            );
            drop(dns.take());
            if let Err(e) = active.teardown() {
                tracing::warn!(revision = wire.revision, "overlay teardown: {e}");
            }
            overlay = None;
            dormant = state;
            idle_bridge = remove_idle_bridge(&data, &bridge, 0);
        } else {
            idle_bridge = None;
        }
    }
}

/// Removes this node's overlay whatever the cluster says: the table, the
/// VXLAN device with its entries, and, once no container is on it, the
/// bridge and the engine's table (`gantry agent --leave`, after its task
/// containers are gone). `Ok(false)` when a container keeps the bridge.
pub fn leave(data: &DataDir) -> Result<bool, crate::network::NetworkError> {
    let bridge = NetworkConfig::load(data)
        .map(|c| c.bridge)
        .unwrap_or_else(|_| crate::network::DEFAULT_BRIDGE.to_string());
    Overlay::new(OverlayConfig {
        bridge: bridge.clone(),
        underlay: None,
        clients: None,
        connect_lb: false,
    })
    .teardown()?;
    crate::network::remove_idle_bridge(data, &bridge)
}

/// How many seconds a dormant agent keeps checking for its bridge to empty.
const IDLE_BRIDGE_RETRIES: u32 = 120;

/// Removes the bridge and the engine's table if no container is on the
/// bridge; `Some(tries + 1)` to check again later, `None` when done (or
/// given up on: a standalone container may hold the bridge for good).
fn remove_idle_bridge(data: &DataDir, bridge: &str, tries: u32) -> Option<u32> {
    match crate::network::remove_idle_bridge(data, bridge) {
        Ok(true) => {
            tracing::info!(bridge, "idle bridge and its rules removed");
            None
        }
        Ok(false) if tries < IDLE_BRIDGE_RETRIES => Some(tries + 1),
        Ok(false) => {
            tracing::info!(bridge, "a container stays on the bridge; it is kept");
            None
        }
        Err(e) => {
            tracing::warn!(bridge, "removing the idle bridge: {e}");
            None
        }
    }
}

fn log_applied(
    revision: u64,
    result: Result<crate::network::overlay::ApplyReport, crate::network::NetworkError>,
) {
    match result {
        Ok(report) => tracing::debug!(revision, ?report, "network update applied"),
        Err(e) => tracing::warn!(revision, "network update: {e}"),
    }
}

/// This node's underlay address: its own entry's, else the advertised one.
fn node_underlay(state: &DesiredState, fallback: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
    state
        .nodes
        .values()
        .find(|n| Some(n.subnet) == state.node_subnet)
        .map(|n| n.underlay)
        .or(fallback)
}

/// Writes the node's share of the cluster CIDR, the cluster CIDR and the
/// overlay MTU as the engine's network config, when they changed.
fn save_config(data: &DataDir, subnet: Subnet, cluster: Option<Subnet>, mtu: Option<u32>) {
    let mut config = NetworkConfig::load(data).unwrap_or_default();
    if config.subnet == subnet && config.cluster_cidr == cluster && config.mtu == mtu {
        return;
    }
    config.subnet = subnet;
    config.cluster_cidr = cluster;
    config.mtu = mtu;
    if let Err(e) = config.save(data) {
        tracing::warn!("saving the node's network config: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_convert_and_bad_fields_are_named() {
        let mut u = pb::NetworkUpdate {
            full: true,
            revision: 3,
            cluster_cidr: "10.42.0.0/16".into(),
            service_cidr: "10.43.0.0/16".into(),
            node_subnet: "10.42.1.0/24".into(),
            nodes: vec![pb::OverlayNode {
                node_id: "n1".into(),
                underlay_ip: "192.0.2.1".into(),
                subnet: "10.42.1.0/24".into(),
            }],
            services: vec![pb::ServiceRecord {
                service_id: "s1".into(),
                name: "web".into(),
                stack: "shop".into(),
                virtual_ip: "10.43.0.2".into(),
                endpoint_mode: pb::EndpointMode::Vip as i32,
                ports: vec![pb::PortConfig {
                    published: Some(8080),
                    target: 80,
                    protocol: pb::Protocol::Tcp as i32,
                    mode: pb::PublishMode::Host as i32,
                }],
                networks: vec!["shop_default".into()],
                endpoints: vec![pb::ServiceEndpoint {
                    task: "t1".into(),
                    node: "n1".into(),
                    address: "10.42.1.5".into(),
                    ready: true,
                }],
            }],
            ..Default::default()
        };
        let c = convert(&u).unwrap();
        assert_eq!(c.services[0].vip, Some(Ipv4Addr::new(10, 43, 0, 2)));
        assert!(!c.services[0].ports[0].ingress);
        assert_eq!(c.nodes[0].subnet.to_string(), "10.42.1.0/24");
        u.services[0].endpoints[0].address = "nope".into();
        let err = convert(&u).unwrap_err().to_string();
        assert_eq!(
            err,
            "network update: services[s1].endpoints[t1].address \"nope\": not an IPv4 address"
        );
        u.services[0].endpoints[0].address = "10.42.1.5".into();
        u.services[0].endpoint_mode = pb::EndpointMode::Dnsrr as i32;
        assert_eq!(convert(&u).unwrap().services[0].vip, None);
    }
}
