//! The overlay data plane on the real kernel, without a controller: three
//! "nodes" (network namespaces on an underlay bridge that itself lives in a
//! namespace, so nothing touches the machine's own network), each driven
//! by `gantry_agent::network::overlay::Overlay` from handcrafted updates,
//! with "containers" that are namespaces on each node's bridge and servers
//! that are threads inside them.
//!
//! One test, several checks, so the setup is paid once: cross-node TCP, VIP
//! spreading, the routing mesh (with the client's address kept on a local
//! replica), network isolation, DNS, an endpoint leaving, a node leaving
//! (its FDB entry, neighbour and route go), an agent restart keeping an
//! established connection, and teardown leaving each namespace as before.

use gantry_agent::engine::spec::PortProtocol;
use gantry_agent::network::overlay::state::{
    ClusterNetwork, Endpoint, OverlayNode, ServicePort, ServiceRecord, Update,
};
use gantry_agent::network::overlay::{Overlay, OverlayConfig, dns, vxlan};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

const PORT: u16 = 8080;
const MESH_PORT: u16 = 30080;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 43, 0, 10);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 254);

/// Why this test cannot run here, if it cannot.
fn prerequisites() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    if let Some(reason) = gantry_tests::cluster::missing_network_tools() {
        return Some(reason.into());
    }
    let bridge = Command::new("bridge").arg("-V").output();
    if !bridge.is_ok_and(|o| o.status.success()) {
        return Some("needs iproute2's bridge tool".into());
    }
    None
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace this test made; deleted on drop.
struct Ns(String);

impl Ns {
    fn new(role: &str) -> Ns {
        let name = format!(
            "gov-{}-{}-{role}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Ns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[track_caller]
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// Runs `f` on a thread inside namespace `ns` (a thread's network
/// namespace is its own; sockets and processes it makes are in `ns`).
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// What the kernel shows of a namespace: links (names), routes, ruleset.
fn snapshot(ns: &str) -> (Vec<String>, String, String) {
    let links = ip(&["-n", ns, "-o", "link", "show"])
        .lines()
        .filter_map(|l| Some(l.split(':').nth(1)?.trim().split('@').next()?.to_string()))
        .collect();
    let routes = ip(&["-n", ns, "route", "show"]);
    let rules = run("ip", &["netns", "exec", ns, "nft", "list", "ruleset"]);
    (links, routes, rules)
}

/// A node: its namespace, underlay address, subnet and overlay.
struct Node {
    ns: Ns,
    id: String,
    underlay: Ipv4Addr,
    subnet: String,
    overlay: Overlay,
}

impl Node {
    fn update(&mut self, mut update: Update) -> gantry_agent::network::overlay::ApplyReport {
        update.node_subnet = Some(self.subnet.parse().unwrap());
        let overlay = &mut self.overlay;
        in_ns(&self.ns.0, || overlay.update(update)).unwrap()
    }
}

/// A container: a namespace on a node's bridge with one address.
struct Container {
    ns: Ns,
    address: Ipv4Addr,
}

fn container(node: &Node, index: u8, mtu: u32) -> Container {
    let ns = Ns::new("ctr");
    let base: Ipv4Addr = node.subnet.split('/').next().unwrap().parse().unwrap();
    let [a, b, c, _] = base.octets();
    let address = Ipv4Addr::new(a, b, c, index);
    let veth = format!("gv{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let mtu = mtu.to_string();
    ip(&[
        "-n", &node.ns.0, "link", "add", &veth, "mtu", &mtu, "type", "veth", "peer", "name",
        "eth0", "mtu", &mtu, "netns", &ns.0,
    ]);
    ip(&[
        "-n", &node.ns.0, "link", "set", &veth, "master", "gantry0", "up",
    ]);
    // As the engine does (`link::create_veth`): a task reaching itself
    // through a VIP is bridged back out of its own port.
    ip(&[
        "-n",
        &node.ns.0,
        "link",
        "set",
        &veth,
        "type",
        "bridge_slave",
        "hairpin",
        "on",
    ]);
    ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        &format!("{address}/24"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", &ns.0, "link", "set", "eth0", "up"]);
    let gw = Ipv4Addr::new(a, b, c, 1).to_string();
    ip(&["-n", &ns.0, "route", "add", "default", "via", &gw]);
    Container { ns, address }
}

/// A TCP server in a container: answers each line with `<name> <peer ip>`.
/// Stops (and closes its listener) when the flag is set.
fn serve(ctr: &Container, name: &str, stop: Arc<AtomicBool>) {
    let file = std::fs::File::open(format!("/run/netns/{}", ctr.ns.0)).unwrap();
    let name = name.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let listener = TcpListener::bind(("0.0.0.0", PORT)).unwrap();
        listener.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, peer)) => {
                    let name = name.clone();
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        conn.set_nonblocking(false).unwrap();
                        conn.set_read_timeout(Some(Duration::from_millis(200)))
                            .unwrap();
                        let mut reader = BufReader::new(conn.try_clone().unwrap());
                        let mut writer = conn;
                        let mut line = String::new();
                        while !stop.load(Ordering::Relaxed) {
                            line.clear();
                            match reader.read_line(&mut line) {
                                Ok(0) => return,
                                Ok(_) => {
                                    let reply = format!("{name} {}\n", peer.ip());
                                    if writer.write_all(reply.as_bytes()).is_err() {
                                        return;
                                    }
                                }
                                Err(_) => continue,
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

/// Connects from namespace `ns` to `to`, or `None` within 1 s.
fn connect(ns: &str, to: SocketAddrV4) -> Option<TcpStream> {
    in_ns(ns, || {
        let s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        Some(s)
    })
}

/// One line exchanged on `s`: the server's `<name> <peer ip>`.
fn ask(s: &mut TcpStream) -> Option<(String, String)> {
    s.write_all(b"hi\n").ok()?;
    let mut line = String::new();
    BufReader::new(s.try_clone().ok()?)
        .read_line(&mut line)
        .ok()?;
    let (name, peer) = line.trim().split_once(' ')?;
    Some((name.to_string(), peer.to_string()))
}

/// One request from `ns` to `to`: who answered and whom it saw.
fn request(ns: &str, to: SocketAddrV4) -> Option<(String, String)> {
    ask(&mut connect(ns, to)?)
}

/// How many of `n` requests each server answered.
fn spread(ns: &str, to: SocketAddrV4, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let who = request(ns, to)
            .map(|(w, _)| w)
            .unwrap_or_else(|| "failed".into());
        *counts.entry(who).or_default() += 1;
    }
    counts
}

/// Asks the DNS responder at `server` from namespace `ns`: the A records.
fn lookup(ns: &str, server: Ipv4Addr, name: &str) -> Result<Vec<Ipv4Addr>, ResponseCode> {
    in_ns(ns, || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        sock.send_to(&q.to_vec().unwrap(), SocketAddr::from((server, 53)))
            .unwrap();
        let mut buf = [0u8; 1500];
        let n = sock.recv(&mut buf).expect("a dns reply within 2 s");
        let reply = Message::from_vec(&buf[..n]).unwrap();
        if reply.metadata.response_code != ResponseCode::NoError {
            return Err(reply.metadata.response_code);
        }
        let mut out: Vec<Ipv4Addr> = reply
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        out.sort();
        Ok(out)
    })
}

fn endpoint(task: &str, node: &Node, address: Ipv4Addr) -> Endpoint {
    Endpoint {
        task: task.into(),
        node: node.id.clone(),
        address,
        ready: true,
    }
}

/// The underlay (a bridge inside its own namespace, with [`CLIENT_IP`] on
/// it) and `count` nodes on it, `10.250.0.<i>` with subnet `10.42.<i>.0/24`.
fn cluster(count: u8) -> (Ns, Vec<Node>) {
    // The underlay: a bridge inside its own namespace, the mesh client on it.
    let underlay = Ns::new("ul");
    ip(&["-n", &underlay.0, "link", "add", "ul", "type", "bridge"]);
    ip(&[
        "-n",
        &underlay.0,
        "addr",
        "add",
        &format!("{CLIENT_IP}/24"),
        "dev",
        "ul",
    ]);
    ip(&["-n", &underlay.0, "link", "set", "ul", "up"]);
    let nodes: Vec<Node> = (1..=count)
        .map(|i| {
            let ns = Ns::new(&format!("n{i}"));
            let address = Ipv4Addr::new(10, 250, 0, i);
            let uplink = format!("up{i}");
            ip(&[
                "-n",
                &underlay.0,
                "link",
                "add",
                &uplink,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns.0,
            ]);
            ip(&[
                "-n",
                &underlay.0,
                "link",
                "set",
                &uplink,
                "master",
                "ul",
                "up",
            ]);
            ip(&[
                "-n",
                &ns.0,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns.0, "link", "set", "eth0", "up"]);
            Node {
                ns,
                id: format!("node{i}"),
                underlay: address,
                subnet: format!("10.42.{i}.0/24"),
                overlay: Overlay::new(OverlayConfig {
                    bridge: "gantry0".into(),
                    underlay: Some(address),
                    clients: None,
                    connect_lb: false,
                }),
            }
        })
        .collect();
    (underlay, nodes)
}

/// Starts the DNS responder on `node`'s gateway (a thread in its namespace
/// with a runtime of its own); it stops when the flag is set.
fn spawn_dns(node: &Node) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let file = std::fs::File::open(format!("/run/netns/{}", node.ns.0)).unwrap();
    let state = node.overlay.state();
    let gateway: Ipv4Addr = node.subnet.split('/').next().unwrap().parse().unwrap();
    let gateway = Ipv4Addr::from(u32::from(gateway) + 1);
    let flag = stop.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let server = dns::spawn((gateway, 53).into(), state, vec![]);
            tx.send(server.is_ok()).unwrap();
            while !flag.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    });
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "dns bind");
    stop
}

#[test]
fn overlay_data_plane_end_to_end_in_namespaces() {
    if let Some(reason) = prerequisites() {
        println!("SKIPPED: {reason}");
        return;
    }
    let (underlay, mut nodes) = cluster(3);
    let before: Vec<_> = nodes.iter().map(|n| snapshot(&n.ns.0)).collect();

    // The cluster: three nodes; `web` on all three behind a VIP and the
    // routing mesh; a client service on the same network; an outsider on
    // another network.
    let overlay_nodes: Vec<OverlayNode> = nodes
        .iter()
        .map(|n| OverlayNode {
            id: n.id.clone(),
            underlay: n.underlay,
            subnet: n.subnet.parse().unwrap(),
        })
        .collect();
    let full = Update {
        full: true,
        revision: 1,
        cluster_cidr: Some("10.42.0.0/16".parse().unwrap()),
        service_cidr: Some("10.43.0.0/16".parse().unwrap()),
        nodes: overlay_nodes,
        networks: vec![
            ClusterNetwork {
                name: "shop_front".into(),
                stack: "shop".into(),
            },
            ClusterNetwork {
                name: "other_default".into(),
                stack: "other".into(),
            },
        ],
        ..Update::default()
    };
    for n in &mut nodes {
        let report = n.update(full.clone());
        assert!(report.full_reload, "{report:?}");
    }
    let mtu = nodes[0].overlay.mtu().unwrap();
    assert_eq!(mtu, 1450, "underlay 1500 minus VXLAN's 50");

    let a1 = container(&nodes[0], 10, mtu);
    let b2 = container(&nodes[1], 10, mtu);
    let b3 = container(&nodes[2], 10, mtu);
    let c1 = container(&nodes[0], 20, mtu);
    let o2 = container(&nodes[1], 30, mtu);
    let o1 = container(&nodes[0], 30, mtu);
    let stop = Arc::new(AtomicBool::new(false));
    for (ctr, name) in [(&a1, "a1"), (&b2, "b2"), (&b3, "b3"), (&o2, "o2")] {
        serve(ctr, name, stop.clone());
    }
    let web_port = ServicePort {
        protocol: PortProtocol::Tcp,
        target: PORT,
        published: Some(MESH_PORT),
        ingress: true,
    };
    let web = ServiceRecord {
        id: "svc-web".into(),
        name: "web".into(),
        stack: "shop".into(),
        vip: Some(VIP),
        ports: vec![web_port],
        networks: vec!["shop_front".into()],
        endpoints: vec![
            endpoint("web.1", &nodes[0], a1.address),
            endpoint("web.2", &nodes[1], b2.address),
            endpoint("web.3", &nodes[2], b3.address),
        ],
    };
    let client = ServiceRecord {
        id: "svc-client".into(),
        name: "client".into(),
        stack: "shop".into(),
        vip: None,
        ports: vec![],
        networks: vec!["shop_front".into()],
        endpoints: vec![endpoint("client.1", &nodes[0], c1.address)],
    };
    let outsider = ServiceRecord {
        id: "svc-out".into(),
        name: "outsider".into(),
        stack: "other".into(),
        vip: None,
        ports: vec![],
        networks: vec!["other_default".into()],
        endpoints: vec![
            endpoint("outsider.1", &nodes[1], o2.address),
            endpoint("outsider.2", &nodes[0], o1.address),
        ],
    };
    let services = Update {
        revision: 2,
        services: vec![web.clone(), client, outsider],
        ..Update::default()
    };
    for n in &mut nodes {
        let report = n.update(services.clone());
        assert!(!report.full_reload, "{report:?}");
    }

    // Cross-node TCP, task to task, with the client's own address.
    let (who, seen) = request(&c1.ns.0, SocketAddrV4::new(b2.address, PORT)).expect("c1 -> b2");
    assert_eq!((who.as_str(), seen.as_str()), ("b2", "10.42.1.20"));
    let (who, _) = request(&c1.ns.0, SocketAddrV4::new(b3.address, PORT)).expect("c1 -> b3");
    assert_eq!(who, "b3");

    // The VIP spreads over the three replicas, each at least 20%.
    let n = 150;
    let counts = spread(&c1.ns.0, SocketAddrV4::new(VIP, PORT), n);
    for name in ["a1", "b2", "b3"] {
        let got = counts.get(name).copied().unwrap_or(0);
        assert!(got * 5 >= n, "VIP spread {counts:?}");
    }

    // A same-node client reaching the VIP keeps its own address when the
    // replica it lands on is on its bridge (bridged back and un-NATed by
    // conntrack on the bridge, no hairpin masquerade)...
    let mut local_peer = None;
    for _ in 0..60 {
        if let Some((who, peer)) = request(&c1.ns.0, SocketAddrV4::new(VIP, PORT))
            && who == "a1"
        {
            local_peer = Some(peer);
            break;
        }
    }
    assert_eq!(local_peer.as_deref(), Some("10.42.1.20"), "c1 -> VIP -> a1");
    // ... and a replica reaching its own service's VIP gets an answer every
    // time, itself included (hairpin: masqueraded to the gateway).
    let counts = spread(&a1.ns.0, SocketAddrV4::new(VIP, PORT), 30);
    assert!(!counts.contains_key("failed"), "a1 -> VIP: {counts:?}");
    assert!(
        counts.contains_key("a1"),
        "a1 -> VIP never itself: {counts:?}"
    );

    // Networks isolate: the outsider reaches neither a replica nor the VIP.
    assert!(request(&o2.ns.0, SocketAddrV4::new(b2.address, PORT)).is_none());
    assert!(request(&o2.ns.0, SocketAddrV4::new(a1.address, PORT)).is_none());
    assert!(request(&o2.ns.0, SocketAddrV4::new(VIP, PORT)).is_none());
    // On the same node too, where the traffic is bridged, not routed: the
    // forward chain sees it through br_netfilter (`link::bridge_netfilter`).
    assert!(request(&o1.ns.0, SocketAddrV4::new(a1.address, PORT)).is_none());
    // ... while a member on the same node still reaches it (control).
    assert!(request(&c1.ns.0, SocketAddrV4::new(a1.address, PORT)).is_some());

    // The routing mesh: node1's address answers from all three replicas; the
    // local one sees the real client, the remote ones node1's VTEP address.
    let mesh = SocketAddrV4::new(nodes[0].underlay, MESH_PORT);
    let mut seen_by: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen_by.len() < 3 && Instant::now() < deadline {
        if let Some((who, peer)) = request(&underlay.0, mesh) {
            seen_by.insert(who, peer);
        }
    }
    assert_eq!(
        seen_by.get("a1").map(String::as_str),
        Some("10.250.0.254"),
        "{seen_by:?}"
    );
    assert_eq!(
        seen_by.get("b2").map(String::as_str),
        Some("10.42.1.0"),
        "{seen_by:?}"
    );
    assert_eq!(
        seen_by.get("b3").map(String::as_str),
        Some("10.42.1.0"),
        "{seen_by:?}"
    );
    // Every node publishes it.
    for node in &nodes[1..] {
        assert!(request(&underlay.0, SocketAddrV4::new(node.underlay, MESH_PORT)).is_some());
    }

    // DNS on node1's gateway, for node1's containers.
    let dns_stop = spawn_dns(&nodes[0]);
    let gw = Ipv4Addr::new(10, 42, 1, 1);
    assert_eq!(lookup(&c1.ns.0, gw, "web."), Ok(vec![VIP]));
    assert_eq!(lookup(&c1.ns.0, gw, "web.shop."), Ok(vec![VIP]));
    assert_eq!(lookup(&c1.ns.0, gw, "shop_web."), Ok(vec![VIP]));
    assert_eq!(
        lookup(&c1.ns.0, gw, "tasks.web."),
        Ok(vec![a1.address, b2.address, b3.address])
    );
    assert_eq!(
        lookup(&c1.ns.0, gw, "outsider."),
        Err(ResponseCode::NXDomain)
    );
    // The same over TCP (a 2-byte length, then the message).
    let over_tcp = in_ns(&c1.ns.0, || {
        let mut conn =
            TcpStream::connect_timeout(&SocketAddr::from((gw, 53)), Duration::from_secs(2))
                .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut q = Message::query();
        q.add_query(Query::query(
            Name::from_ascii("web.").unwrap(),
            RecordType::A,
        ));
        let bytes = q.to_vec().unwrap();
        conn.write_all(&(bytes.len() as u16).to_be_bytes()).unwrap();
        conn.write_all(&bytes).unwrap();
        let mut len = [0u8; 2];
        std::io::Read::read_exact(&mut conn, &mut len).unwrap();
        let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
        std::io::Read::read_exact(&mut conn, &mut reply).unwrap();
        Message::from_vec(&reply).unwrap().answers.len()
    });
    assert_eq!(over_tcp, 1, "web over TCP");

    // An established connection through the VIP, kept across what follows.
    let mut kept = connect(&c1.ns.0, SocketAddrV4::new(VIP, PORT)).expect("kept connection");
    let (kept_backend, _) = ask(&mut kept).expect("kept connection answers");

    // An endpoint leaves (not ready): no new connection reaches it, within
    // 1 s of the update, and the update touches only that service.
    let mut web_down = web.clone();
    let leaving = if kept_backend == "b3" { 0 } else { 2 };
    web_down.endpoints[leaving].ready = false;
    let leaving_name = ["a1", "b2", "b3"][leaving];
    let change = Update {
        revision: 3,
        services: vec![web_down],
        ..Update::default()
    };
    let mut slowest = Duration::ZERO;
    for n in &mut nodes {
        let report = n.update(change.clone());
        assert!(!report.full_reload && report.nft_lines == 2, "{report:?}");
        slowest = slowest.max(report.elapsed);
    }
    println!("one endpoint change applied in {slowest:?} (slowest node)");
    assert!(slowest < Duration::from_secs(1));
    let counts = spread(&c1.ns.0, SocketAddrV4::new(VIP, PORT), 30);
    assert!(!counts.contains_key(leaving_name), "{counts:?}");
    assert!(!counts.contains_key("failed"), "{counts:?}");
    assert_eq!(
        lookup(&c1.ns.0, gw, "tasks.web.").unwrap().len(),
        2,
        "tasks.web drops the endpoint"
    );

    // The agent restarts: a new Overlay from the first full update changes
    // no peer and keeps the established connection on its backend.
    let mut state_now = nodes[0].overlay.state().read().unwrap().clone();
    state_now.revision = 4;
    let full_again = Update {
        full: true,
        revision: 4,
        cluster_cidr: state_now.cluster_cidr,
        service_cidr: state_now.service_cidr,
        nodes: state_now.nodes.values().cloned().collect(),
        services: state_now.services.values().cloned().collect(),
        networks: state_now.networks.values().cloned().collect(),
        ..Update::default()
    };
    nodes[0].overlay = Overlay::new(OverlayConfig {
        bridge: "gantry0".into(),
        underlay: Some(nodes[0].underlay),
        clients: None,
        connect_lb: false,
    });
    let report = nodes[0].update(full_again);
    assert_eq!(report.peer_changes, 0, "{report:?}");
    assert_eq!(ask(&mut kept).map(|(w, _)| w), Some(kept_backend.clone()));
    drop(kept);

    // A node leaves: its route, neighbour and FDB entry go from the others.
    let node3_subnet = nodes[2].subnet.clone();
    let node3_mac = vxlan::vtep_mac(&node3_subnet.parse().unwrap());
    let leave = Update {
        revision: 5,
        removed_nodes: vec!["node3".into()],
        ..Update::default()
    };
    for n in &mut nodes[..2] {
        assert!(ip(&["-n", &n.ns.0, "route"]).contains(&node3_subnet));
        n.update(leave.clone());
        let fdb = run(
            "ip",
            &[
                "netns",
                "exec",
                &n.ns.0,
                "bridge",
                "fdb",
                "show",
                "dev",
                vxlan::DEVICE,
            ],
        );
        assert!(!fdb.contains(&node3_mac), "{fdb}");
        assert!(!ip(&["-n", &n.ns.0, "route"]).contains(&node3_subnet));
        assert!(!ip(&["-n", &n.ns.0, "neigh", "show", "dev", vxlan::DEVICE]).contains("10.42.3.0"));
    }

    // Everything removed: each node's links, routes and ruleset as before.
    stop.store(true, Ordering::Relaxed);
    dns_stop.store(true, Ordering::Relaxed);
    drop((a1, b2, b3, c1, o2, o1));
    for (n, before) in nodes.iter_mut().zip(&before) {
        let overlay = &mut n.overlay;
        in_ns(&n.ns.0, || overlay.teardown()).unwrap();
        // A container's veth goes when its namespace is freed, which waits
        // for the server threads in it to notice the stop (a 200 ms poll).
        let deadline = Instant::now() + Duration::from_secs(10);
        while &snapshot(&n.ns.0) != before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let overlay = &mut n.overlay;
            // The bridge goes once its last port has.
            in_ns(&n.ns.0, || overlay.teardown()).unwrap();
        }
        assert_eq!(&snapshot(&n.ns.0), before, "node {} after teardown", n.id);
    }
}

/// `gantry container ARGS --data-dir DIR` inside `node`'s namespace.
fn gantry_in(node: &Node, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let bin = gantry_tests::gantry_bin();
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.ns.0))
        .arg("--")
        .arg(bin)
        .args(["container", "--data-dir"])
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

/// Real containers of the engine on the overlay, as the agent makes them
/// for tasks: the controller's address, the overlay MTU, the node's DNS in
/// `resolv.conf`; task to task across nodes, by address and by name.
#[test]
fn engine_tasks_get_the_overlay_address_mtu_and_dns() {
    if let Some(reason) =
        prerequisites().or(gantry_tests::engine_test_prerequisites().map(String::from))
    {
        println!("SKIPPED: {reason}");
        return;
    }
    use gantry_agent::engine::container::{Engine, EngineConfig};
    use gantry_agent::engine::spec::{ContainerConfig, NetworkMode};
    use gantry_agent::network::NetworkConfig;
    use gantry_agent::paths::DataDir;
    let (_underlay, mut nodes) = cluster(2);
    let images = tempfile::tempdir().unwrap();
    run(
        "bash",
        &[
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../deploy/images/build-test-images.sh"
            ),
            images.path().to_str().unwrap(),
        ],
    );
    let dirs: Vec<tempfile::TempDir> = (0..2)
        .map(|_| {
            tempfile::Builder::new()
                .prefix("gantry-ov-")
                .tempdir()
                .unwrap()
        })
        .collect();
    for dir in &dirs {
        for archive in ["web.tar", "busybox.tar"] {
            run(
                gantry_tests::gantry_bin().to_str().unwrap(),
                &[
                    "image",
                    "import",
                    "--data-dir",
                    dir.path().to_str().unwrap(),
                    images.path().join(archive).to_str().unwrap(),
                ],
            );
        }
    }
    let web_ip = Ipv4Addr::new(10, 42, 2, 10);
    let client_ip = Ipv4Addr::new(10, 42, 1, 10);
    let record =
        |id: &str, name: &str, vip: Option<Ipv4Addr>, node: &Node, address| ServiceRecord {
            id: id.into(),
            name: name.into(),
            stack: "shop".into(),
            vip,
            ports: vec![ServicePort {
                protocol: PortProtocol::Tcp,
                target: 80,
                published: None,
                ingress: true,
            }],
            networks: vec!["shop_default".into()],
            endpoints: vec![endpoint(&format!("{name}.1"), node, address)],
        };
    let full = Update {
        full: true,
        revision: 1,
        cluster_cidr: Some("10.42.0.0/16".parse().unwrap()),
        service_cidr: Some("10.43.0.0/16".parse().unwrap()),
        nodes: nodes
            .iter()
            .map(|n| OverlayNode {
                id: n.id.clone(),
                underlay: n.underlay,
                subnet: n.subnet.parse().unwrap(),
            })
            .collect(),
        networks: vec![ClusterNetwork {
            name: "shop_default".into(),
            stack: "shop".into(),
        }],
        services: vec![
            record("svc-web", "web", Some(VIP), &nodes[1], web_ip),
            record("svc-client", "client", None, &nodes[0], client_ip),
        ],
        ..Update::default()
    };
    for (n, dir) in nodes.iter_mut().zip(&dirs) {
        n.update(full.clone());
        // What the agent's overlay writes for the engine.
        NetworkConfig {
            bridge: "gantry0".into(),
            subnet: n.subnet.parse().unwrap(),
            cluster_cidr: Some("10.42.0.0/16".parse().unwrap()),
            mtu: n.overlay.mtu(),
        }
        .save(&DataDir::new(dir.path()))
        .unwrap();
    }
    let dns_stop = spawn_dns(&nodes[0]);
    let start =
        |node: &Node, dir: &std::path::Path, image: &str, cmd: Option<Vec<String>>, address| {
            in_ns(&node.ns.0, || {
                let engine = Engine::open(EngineConfig {
                    data_dir: DataDir::new(dir),
                    shim_binary: gantry_tests::gantry_bin(),
                })
                .unwrap();
                let id = engine
                    .create(&ContainerConfig {
                        image: image.into(),
                        command: cmd,
                        network: NetworkMode::Bridge,
                        address: Some(address),
                        ..ContainerConfig::default()
                    })
                    .unwrap();
                engine.start(&id).unwrap();
                id.as_str().to_string()
            })
        };
    let web = start(
        &nodes[1],
        dirs[1].path(),
        "gantry.test/web:latest",
        None,
        web_ip,
    );
    let client = start(
        &nodes[0],
        dirs[0].path(),
        "gantry.test/busybox:latest",
        Some(vec!["sleep".into(), "300".into()]),
        client_ip,
    );
    let exec = |args: &[&str]| {
        let mut all = vec!["exec", client.as_str()];
        all.extend_from_slice(args);
        let out = gantry_in(&nodes[0], dirs[0].path(), &all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (_, addr) = exec(&["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("10.42.1.10/24"), "{addr}");
    let (_, mtu) = exec(&["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu.trim(), "1450");
    let (_, resolv) = exec(&["cat", "/etc/resolv.conf"]);
    assert!(resolv.starts_with("nameserver 10.42.1.1\n"), "{resolv}");
    // Task to task across nodes, by address, with the caller's own address
    // (no masquerade inside the cluster CIDR).
    let url = |host: &str| format!("http://{host}/cgi-bin/index.cgi");
    let mut page = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !page.contains("ip=10.42.2.10") && Instant::now() < deadline {
        page = exec(&["timeout", "3", "wget", "-q", "-O", "-", &url("10.42.2.10")]).1;
    }
    assert!(page.contains("ip=10.42.2.10"), "{page:?}");
    // By name through the node's DNS and the VIP.
    let (_, looked_up) = exec(&["nslookup", "web"]);
    assert!(looked_up.contains(&VIP.to_string()), "{looked_up}");
    let (_, by_name) = exec(&["timeout", "3", "wget", "-q", "-O", "-", &url("web")]);
    assert!(by_name.contains("ip=10.42.2.10"), "{by_name:?}");

    dns_stop.store(true, Ordering::Relaxed);
    for (node, dir, id) in [(&nodes[0], &dirs[0], &client), (&nodes[1], &dirs[1], &web)] {
        let out = gantry_in(node, dir.path(), &["rm", "-f", id]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for n in &mut nodes {
        let overlay = &mut n.overlay;
        in_ns(&n.ns.0, || overlay.teardown()).unwrap();
    }
}
