//! Overlay rule-apply benchmark: how long the agent takes to program the
//! `ip gantry_overlay` table for 1,000 services × 10 endpoints, and one
//! endpoint change at that size (issue 5's target: ≤ 50 ms, in proportion to
//! what changed, as kube-proxy's nftables mode).
//!
//! Run as root: `cargo bench -p gantry-tests --bench overlay` (or with
//! `--profile dev` to skip the release build: the time is the `nft` process
//! and the kernel's, the Rust diff is microseconds). Everything happens in a
//! network namespace the bench makes and deletes: a veth underlay
//! interface, the VXLAN device, the bridge and the table.
//!
//! Measured, each from the update handed to `Overlay::update` to the
//! kernel's answer (`ApplyReport::elapsed`, the slowest being what a user
//! waits for):
//! - `full`: the first update, the whole table (what an agent restart does);
//! - `one_endpoint`: one endpoint of one service made not ready (a flush and
//!   one rule);
//! - `add_service` / `remove_service`: one service (10 endpoints) added and
//!   removed;
//! - `full_reload_same_size`: the whole table loaded again, for comparison
//!   (what a non-incremental design would pay per change).
//!
//! Then, when `wrk` (Debian package) is installed, the data path: a client
//! container on node 1 runs `wrk` against a keep-alive HTTP responder in a
//! container on the same node and on node 2, straight to its address and
//! through a VIP (rounds interleaved; requests/s, p50 and p99).
//!
//! Results: `bench-results/overlay.json` and `.md` at the workspace root,
//! and the table on stdout. Knobs: `GANTRY_BENCH_SERVICES` (default 1000),
//! `GANTRY_BENCH_ENDPOINTS` (default 10), `GANTRY_BENCH_ROUNDS` (changes
//! measured, default 50).

use gantry_agent::engine::spec::PortProtocol;
use gantry_agent::network::overlay::state::{
    ClusterNetwork, Endpoint, OverlayNode, ServicePort, ServiceRecord, Update,
};
use gantry_agent::network::overlay::{Overlay, OverlayConfig, rules};
use gantry_tests::bench::{env_usize, git_commit, utc_now, workspace_root};
use serde_json::json;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("bench thread")
    })
}

fn service(i: usize, endpoints: usize) -> ServiceRecord {
    ServiceRecord {
        id: format!("svc{i:05}"),
        name: format!("s{i}"),
        stack: format!("stack{}", i % 10),
        vip: Some(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(10, 43, 0, 2)) + i as u32,
        )),
        ports: vec![ServicePort {
            protocol: PortProtocol::Tcp,
            target: 80,
            published: None,
            ingress: true,
        }],
        networks: vec![format!("stack{}_default", i % 10)],
        endpoints: (0..endpoints)
            .map(|e| {
                let node = e % 3 + 1;
                // Distinct addresses in the cluster CIDR (10.42.10.2 on):
                // the rules do not care which node's /24 holds them, and a
                // /24 holds only 253.
                let n = (i * endpoints + e) as u32;
                Endpoint {
                    task: format!("t{i}.{e}"),
                    node: format!("node{node}"),
                    address: Ipv4Addr::new(10, 42, (10 + n / 250) as u8, (n % 250 + 2) as u8),
                    ready: true,
                }
            })
            .collect(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: needs root");
        return;
    }
    let services = env_usize("GANTRY_BENCH_SERVICES", 1000);
    let endpoints = env_usize("GANTRY_BENCH_ENDPOINTS", 10);
    let rounds = env_usize("GANTRY_BENCH_ROUNDS", 50);
    let ns = Ns(format!("gob-{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    // A veth pair as the underlay interface (the dummy module may be absent).
    ip(&[
        "-n", &ns.0, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1",
    ]);
    ip(&["-n", &ns.0, "addr", "add", "10.250.0.1/24", "dev", "ul0"]);
    ip(&["-n", &ns.0, "link", "set", "ul0", "up"]);

    let nodes: Vec<OverlayNode> = (1..=3u8)
        .map(|i| OverlayNode {
            id: format!("node{i}"),
            underlay: Ipv4Addr::new(10, 250, 0, i),
            subnet: format!("10.42.{i}.0/24").parse().expect("subnet"),
        })
        .collect();
    let mut records: Vec<ServiceRecord> = (0..services).map(|i| service(i, endpoints)).collect();
    let full = Update {
        full: true,
        revision: 1,
        cluster_cidr: Some("10.42.0.0/16".parse().expect("cidr")),
        service_cidr: Some("10.43.0.0/16".parse().expect("cidr")),
        node_subnet: Some("10.42.1.0/24".parse().expect("subnet")),
        nodes,
        services: records.clone(),
        networks: (0..10)
            .map(|s| ClusterNetwork {
                name: format!("stack{s}_default"),
                stack: format!("stack{s}"),
            })
            .collect(),
        ..Update::default()
    };

    let results = in_ns(&ns.0, move || {
        let mut overlay = Overlay::new(OverlayConfig {
            bridge: "gantry0".into(),
            underlay: Some(Ipv4Addr::new(10, 250, 0, 1)),
        });
        let report = overlay.update(full).expect("full update");
        let full_time = report.elapsed;
        let full_lines = report.nft_lines;
        let mut revision = 2;
        let mut one = Vec::new();
        let mut one_lines = 0;
        for r in 0..rounds {
            let i = (r * 37) % services;
            records[i].endpoints[r % endpoints].ready = !records[i].endpoints[r % endpoints].ready;
            let report = overlay
                .update(Update {
                    revision,
                    services: vec![records[i].clone()],
                    ..Update::default()
                })
                .expect("endpoint change");
            revision += 1;
            one_lines = report.nft_lines;
            one.push(report.elapsed);
        }
        let mut add = Vec::new();
        let mut remove = Vec::new();
        for r in 0..rounds.min(20) {
            let extra = service(services + r, endpoints);
            let report = overlay
                .update(Update {
                    revision,
                    services: vec![extra.clone()],
                    ..Update::default()
                })
                .expect("add service");
            revision += 1;
            add.push(report.elapsed);
            let report = overlay
                .update(Update {
                    revision,
                    removed_services: vec![extra.id.clone()],
                    ..Update::default()
                })
                .expect("remove service");
            revision += 1;
            remove.push(report.elapsed);
        }
        // The same table loaded whole, as a design without diffs would.
        let state = overlay.state().read().expect("state").clone();
        let model = rules::model(
            &state,
            &rules::Context {
                bridge: "gantry0".into(),
                vxlan: "gantry.vx".into(),
            },
        )
        .expect("model");
        let mut reload = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            rules::apply(&rules::full(&model)).expect("full reload");
            reload.push(start.elapsed());
        }
        // The diff alone (no kernel), for the record.
        let start = Instant::now();
        let _ = rules::diff(&model, &model);
        let diff_equal = start.elapsed();
        overlay.teardown().expect("teardown");
        (
            full_time, full_lines, one, one_lines, add, remove, reload, diff_equal,
        )
    });
    let (full_time, full_lines, mut one, one_lines, mut add, mut remove, mut reload, diff_equal) =
        results;
    for v in [&mut one, &mut add, &mut remove, &mut reload] {
        v.sort();
    }
    let row = |name: &str, v: &[Duration]| {
        json!({
            "name": name,
            "n": v.len(),
            "p50_ms": ms(percentile(v, 0.5)),
            "p99_ms": ms(percentile(v, 0.99)),
            "max_ms": ms(v.last().copied().unwrap_or_default()),
        })
    };
    let rows = vec![
        json!({"name": "full", "n": 1, "p50_ms": ms(full_time), "p99_ms": ms(full_time), "max_ms": ms(full_time), "nft_lines": full_lines}),
        {
            let mut r = row("one_endpoint", &one);
            r["nft_lines"] = json!(one_lines);
            r
        },
        row("add_service", &add),
        row("remove_service", &remove),
        row("full_reload_same_size", &reload),
    ];
    let wrk_rows = if Command::new("wrk").arg("--version").output().is_ok() {
        wrk_bench()
    } else {
        println!("SKIPPED (data path): wrk is not installed (apt-get install wrk)");
        Vec::new()
    };
    let workspace = workspace_root();
    let report = json!({
        "wrk": wrk_rows,
        "bench": "overlay",
        "when": utc_now(),
        "commit": git_commit(&workspace),
        "services": services,
        "endpoints_per_service": endpoints,
        "rounds": rounds,
        "diff_of_equal_models_ms": ms(diff_equal),
        "rows": rows,
    });
    let mut md = format!(
        "| {services} services × {endpoints} endpoints | n | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n"
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} |\n",
            r["name"].as_str().unwrap_or(""),
            r["n"],
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            r["max_ms"].as_f64().unwrap_or(0.0),
        ));
    }
    if !wrk_rows.is_empty() {
        md.push_str(
            "\n| data path (wrk, keep-alive) | requests/s | p50 ms | p99 ms |\n|---|---|---|---|\n",
        );
        for r in &wrk_rows {
            md.push_str(&format!(
                "| {} | {:.0} | {:.2} | {:.2} |\n",
                r["name"].as_str().unwrap_or(""),
                r["requests_per_s"].as_f64().unwrap_or(0.0),
                r["p50_ms"].as_f64().unwrap_or(0.0),
                r["p99_ms"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    gantry_tests::bench::write_figures(&workspace, "overlay", &report, &md);
}

/// A keep-alive HTTP responder on port 80 in namespace `ns` (threads that
/// live until the process ends; the namespace goes with the bench).
fn http_server(ns: &str) {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let listener = TcpListener::bind(("0.0.0.0", 80)).expect("bind :80");
        tx.send(()).expect("ready");
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut pending = Vec::new();
                loop {
                    let n = match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        if conn
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("server ready");
}

/// One wrk run from namespace `ns`: (requests/s, p50 ms, p99 ms).
fn wrk(ns: &str, url: &str, seconds: u32) -> (f64, f64, f64) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "wrk", "-t", "2", "-c", "16"])
        .arg(format!("-d{seconds}s"))
        .args(["--latency", url])
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let number = |line: &str| -> f64 {
        let v = line.split_whitespace().last().unwrap_or("0");
        let (num, scale) = if let Some(n) = v.strip_suffix("us") {
            (n, 0.001)
        } else if let Some(n) = v.strip_suffix("ms") {
            (n, 1.0)
        } else if let Some(n) = v.strip_suffix('s') {
            (n, 1000.0)
        } else {
            (v, 1.0)
        };
        num.parse::<f64>().unwrap_or(0.0) * scale
    };
    let find = |prefix: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .map(number)
            .unwrap_or(0.0)
    };
    (find("Requests/sec:"), find("50%"), find("99%"))
}

/// The data path: two nodes, a client and a server on node 1, a server on
/// node 2, a VIP for each server.
fn wrk_bench() -> Vec<serde_json::Value> {
    let pid = std::process::id();
    let name = |role: &str| format!("gow-{pid}-{role}");
    let ul = Ns(name("ul"));
    ip(&["netns", "add", &ul.0]);
    ip(&["-n", &ul.0, "link", "add", "ul", "type", "bridge"]);
    ip(&["-n", &ul.0, "link", "set", "ul", "up"]);
    let mut keep = Vec::new();
    let mut overlays = Vec::new();
    let nodes: Vec<OverlayNode> = (1..=2u8)
        .map(|i| OverlayNode {
            id: format!("node{i}"),
            underlay: Ipv4Addr::new(10, 250, 0, i),
            subnet: format!("10.42.{i}.0/24").parse().expect("subnet"),
        })
        .collect();
    for n in &nodes {
        let i = n.underlay.octets()[3];
        let ns = Ns(name(&format!("n{i}")));
        ip(&["netns", "add", &ns.0]);
        let up = format!("up{i}");
        ip(&[
            "-n", &ul.0, "link", "add", &up, "type", "veth", "peer", "name", "eth0", "netns", &ns.0,
        ]);
        ip(&["-n", &ul.0, "link", "set", &up, "master", "ul", "up"]);
        ip(&[
            "-n",
            &ns.0,
            "addr",
            "add",
            &format!("{}/24", n.underlay),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns.0, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        keep.push(ns);
    }
    let record = |id: &str, vip: [u8; 4], node: &str, addr: [u8; 4]| ServiceRecord {
        id: id.into(),
        name: id.into(),
        stack: "b".into(),
        vip: Some(vip.into()),
        ports: vec![ServicePort {
            protocol: PortProtocol::Tcp,
            target: 80,
            published: None,
            ingress: true,
        }],
        networks: vec!["b_default".into()],
        endpoints: vec![Endpoint {
            task: format!("{id}.1"),
            node: node.into(),
            address: addr.into(),
            ready: true,
        }],
    };
    let update = Update {
        full: true,
        revision: 1,
        cluster_cidr: Some("10.42.0.0/16".parse().expect("cidr")),
        service_cidr: Some("10.43.0.0/16".parse().expect("cidr")),
        nodes: nodes.clone(),
        networks: vec![ClusterNetwork {
            name: "b_default".into(),
            stack: "b".into(),
        }],
        services: vec![
            record("same", [10, 43, 0, 1], "node1", [10, 42, 1, 10]),
            record("cross", [10, 43, 0, 2], "node2", [10, 42, 2, 10]),
            record("client", [10, 43, 0, 3], "node1", [10, 42, 1, 20]),
        ],
        ..Update::default()
    };
    for (n, ns) in nodes.iter().zip(&keep) {
        let mut u = update.clone();
        u.node_subnet = Some(n.subnet);
        let overlay = in_ns(&ns.0, || {
            let mut o = Overlay::new(OverlayConfig {
                bridge: "gantry0".into(),
                underlay: Some(n.underlay),
            });
            o.update(u).expect("update");
            o
        });
        overlays.push(overlay);
    }
    let mtu = overlays[0].mtu().unwrap_or(1450).to_string();
    let mut containers = Vec::new();
    for (node, addr, role) in [
        (0usize, "10.42.1.10", "s1"),
        (1, "10.42.2.10", "s2"),
        (0, "10.42.1.20", "cl"),
    ] {
        let ns = Ns(name(role));
        ip(&["netns", "add", &ns.0]);
        let veth = format!("gv{role}");
        let gw = if node == 0 { "10.42.1.1" } else { "10.42.2.1" };
        ip(&[
            "-n",
            &keep[node].0,
            "link",
            "add",
            &veth,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            &mtu,
            "netns",
            &ns.0,
        ]);
        ip(&[
            "-n",
            &keep[node].0,
            "link",
            "set",
            &veth,
            "master",
            "gantry0",
            "up",
        ]);
        ip(&[
            "-n",
            &ns.0,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns.0, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ip(&["-n", &ns.0, "route", "add", "default", "via", gw]);
        containers.push(ns);
    }
    http_server(&containers[0].0);
    http_server(&containers[1].0);
    let client = containers[2].0.clone();
    let targets = [
        ("same node, direct", "http://10.42.1.10/"),
        ("same node, VIP", "http://10.43.0.1/"),
        ("cross node, direct", "http://10.42.2.10/"),
        ("cross node, VIP", "http://10.43.0.2/"),
    ];
    let rounds = env_usize("GANTRY_BENCH_WRK_ROUNDS", 3);
    let seconds = env_usize("GANTRY_BENCH_WRK_SECONDS", 4) as u32;
    let mut runs: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); targets.len()];
    for r in 0..rounds {
        for k in 0..targets.len() {
            // The order rotates so that load from the shared machine falls
            // on every target alike.
            let t = (k + r) % targets.len();
            runs[t].push(wrk(&client, targets[t].1, seconds));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let rows = targets
        .iter()
        .zip(runs)
        .map(|((label, url), v)| {
            json!({
                "name": label,
                "url": url,
                "rounds": v.len(),
                "requests_per_s": median(v.iter().map(|x| x.0).collect()),
                "p50_ms": median(v.iter().map(|x| x.1).collect()),
                "p99_ms": median(v.iter().map(|x| x.2).collect()),
            })
        })
        .collect();
    for (o, ns) in overlays.iter_mut().zip(&keep) {
        let _ = in_ns(&ns.0, || o.teardown());
    }
    drop(containers);
    drop(keep);
    drop(ul);
    rows
}
