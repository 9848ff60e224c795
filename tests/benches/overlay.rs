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
//! through a VIP. On a machine with two or more CPUs, wrk runs on CPU 0 and
//! the responder on CPU 1 (`taskset` and `sched_setaffinity`), so the two
//! ends do not take turns on one core. Each round measures direct and VIP
//! back to back (the order alternating), and the figure that decides is the
//! per-round VIP/direct ratio: its median and spread over the rounds
//! (`GANTRY_BENCH_WRK_ROUNDS`, default 8; `GANTRY_BENCH_WRK_SECONDS`,
//! default 2), so one noisy round on a shared machine does not decide. The
//! load average before and after is recorded with the figures.
//! The client container is registered on node 1 the way a task's container
//! is (a lease and a netns file in node 1's data dir, found by the overlay),
//! so its TCP connects to a VIP are balanced by the eBPF connect program
//! (`network::overlay::lb`); `GANTRY_BENCH_WRK_NFT_AB` (default 1) adds, in
//! the same rounds, the same two pairs from a second client container that
//! is not registered, whose VIP connections take nft DNAT (the path every
//! client had before): an A/B of the two under the same load.
//! `GANTRY_CONNECT_LB=0` turns the eBPF path off altogether.
//! `GANTRY_BENCH_WRK_AA` (default 1) adds a control pair, the same-node
//! task against itself, whose "ratio" is the noise floor of the pairing.
//!
//! Results: `bench-results/overlay.json` and `.md` at the workspace root,
//! and the table on stdout. Knobs: `GANTRY_BENCH_SERVICES` (default 1000),
//! `GANTRY_BENCH_ENDPOINTS` (default 10), `GANTRY_BENCH_ROUNDS` (changes
//! measured, default 50).

use gantry_agent::engine::spec::PortProtocol;
use gantry_agent::network::overlay::state::{
    ClusterNetwork, Endpoint, OverlayNode, ServicePort, ServiceRecord, Update,
};
use gantry_agent::network::overlay::{self, Overlay, OverlayConfig, rules};
use gantry_agent::network::{self, NetworkConfig, Subnet};
use gantry_agent::paths::DataDir;
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

/// A bind mount, unmounted on drop (before its temp dir goes).
struct Unbind(std::path::PathBuf);

impl Drop for Unbind {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
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
        // With connect-time balancing on (unless GANTRY_CONNECT_LB=0): each
        // change also patches its eBPF maps, and that is timed too.
        let mut overlay = Overlay::new(OverlayConfig {
            bridge: "gantry0".into(),
            underlay: Some(Ipv4Addr::new(10, 250, 0, 1)),
            clients: None,
            connect_lb: overlay::connect_lb_from_env(),
        });
        let report = overlay.update(full).expect("full update");
        let lb_mode = overlay.vip_mode();
        let mut lb_synced = report.lb_synced;
        let full_time = report.elapsed;
        let full_lines = report.nft_lines;
        let mut revision = 2;
        let mut one = Vec::new();
        let mut one_lb = Vec::new();
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
            lb_synced &= report.lb_synced;
            one.push(report.elapsed);
            one_lb.push(report.lb_elapsed);
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
                bridge_netfilter: true,
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
            full_time, full_lines, one, one_lb, one_lines, add, remove, reload, diff_equal,
            lb_mode, lb_synced,
        )
    });
    let (
        full_time,
        full_lines,
        mut one,
        mut one_lb,
        one_lines,
        mut add,
        mut remove,
        mut reload,
        diff_equal,
        lb_mode,
        lb_synced,
    ) = results;
    println!(
        "VIP mode of the rule-apply run: {lb_mode}; every change synced the eBPF maps: {lb_synced}"
    );
    for v in [&mut one, &mut one_lb, &mut add, &mut remove, &mut reload] {
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
        row("one_endpoint, of which eBPF maps", &one_lb),
        row("add_service", &add),
        row("remove_service", &remove),
        row("full_reload_same_size", &reload),
    ];
    // wrk is installed when missing, as the container-start bench installs
    // runc and crun.
    let wrk_rows = match gantry_tests::peers::find_or_install("wrk") {
        Ok(_) => wrk_bench(),
        Err(err) => {
            println!("SKIPPED (data path): {err}");
            Vec::new()
        }
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
        "vip_mode": lb_mode,
        "ebpf_maps_synced_each_change": lb_synced,
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
        for r in wrk_rows.iter().filter(|r| r.get("ratio_median").is_none()) {
            md.push_str(&format!(
                "| {} | {:.0} | {:.2} | {:.2} |\n",
                r["name"].as_str().unwrap_or(""),
                r["requests_per_s"].as_f64().unwrap_or(0.0),
                r["p50_ms"].as_f64().unwrap_or(0.0),
                r["p99_ms"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    let ratios: Vec<_> = wrk_rows
        .iter()
        .filter(|r| r.get("ratio_median").is_some())
        .collect();
    if !ratios.is_empty() {
        md.push_str(
            "\n| VIP/direct requests/s, per round | rounds | median | p25 | p75 | min | max | p99 VIP/direct (median) | load before → after |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in ratios {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            md.push_str(&format!(
                "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} → {:.2} |\n",
                r["name"].as_str().unwrap_or(""),
                r["rounds"],
                f("ratio_median"),
                f("ratio_p25"),
                f("ratio_p75"),
                f("ratio_min"),
                f("ratio_max"),
                f("p99_ratio_median"),
                f("load_before"),
                f("load_after"),
            ));
        }
    }
    gantry_tests::bench::write_figures(&workspace, "overlay", &report, &md);
}

/// A keep-alive HTTP responder on port 80 in namespace `ns`, on CPU `cpu`
/// when given (threads that live until the process ends; the namespace goes
/// with the bench).
fn http_server(ns: &str, cpu: Option<usize>) {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        // The connection threads inherit this thread's CPU.
        if let Some(cpu) = cpu {
            let mut set = nix::sched::CpuSet::new();
            set.set(cpu).expect("cpu set");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .expect("pin the responder");
        }
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

/// One wrk run from namespace `ns`, on CPU `cpu` when given (one wrk
/// thread then: two on one core only take turns): (requests/s, p50 ms,
/// p99 ms).
fn wrk(ns: &str, url: &str, seconds: u32, cpu: Option<usize>) -> (f64, f64, f64) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]);
    match cpu {
        Some(cpu) => cmd.args(["taskset", "-c", &cpu.to_string(), "wrk", "-t", "1"]),
        None => cmd.args(["wrk", "-t", "2"]),
    };
    let out = cmd
        .args(["-c", "16"])
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

/// The `q` quantile (nearest rank) of `v`; 0 when empty.
fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n => v[((n - 1) as f64 * q).round() as usize],
    }
}

/// The 1-minute load average (`/proc/loadavg`'s first field).
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
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
            // A second client that node 1's agent does not know a container
            // for: its connects take the nft DNAT path (the A/B below).
            record("client2", [10, 43, 0, 4], "node1", [10, 42, 1, 21]),
        ],
        ..Update::default()
    };
    // Node 1's data dir, where its client container is found the way the
    // agent finds a task's: the lease of its address, then its netns file.
    let data_dir = tempfile::tempdir().expect("data dir");
    let data = DataDir::new(data_dir.path());
    let node1_subnet: Subnet = "10.42.1.0/24".parse().expect("subnet");
    NetworkConfig {
        subnet: node1_subnet,
        ..NetworkConfig::default()
    }
    .save(&data)
    .expect("node 1 network config");
    for (n, ns) in nodes.iter().zip(&keep) {
        let mut u = update.clone();
        u.node_subnet = Some(n.subnet);
        let clients = (n.subnet == node1_subnet).then(|| data.clone());
        let overlay = in_ns(&ns.0, || {
            let mut o = Overlay::new(OverlayConfig {
                bridge: "gantry0".into(),
                underlay: Some(n.underlay),
                clients,
                connect_lb: overlay::connect_lb_from_env(),
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
        (0, "10.42.1.21", "c2"),
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
        // As the engine makes them (`link::create_veth`).
        ip(&[
            "-n",
            &keep[node].0,
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
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns.0, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ip(&["-n", &ns.0, "route", "add", "default", "via", gw]);
        containers.push(ns);
    }
    // wrk on CPU 0, the responders on CPU 1, when there are two CPUs and
    // `taskset` (util-linux) to pin wrk with.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = cpus >= 2 && Command::new("taskset").arg("-V").output().is_ok();
    let (wrk_cpu, server_cpu) = if pinned {
        (Some(0), Some(1))
    } else {
        println!("data path not pinned ({cpus} CPUs, taskset present: no)");
        (None, None)
    };
    http_server(&containers[0].0, server_cpu);
    http_server(&containers[1].0, server_cpu);
    // The client container registered as a task's is (its lease and its
    // netns file in node 1's data dir), then found by the overlay's retry,
    // as the agent's loop does for a task whose container came after the
    // update. `c2` is left unregistered.
    let netns_file = network::netns_path(&data, "bench-client");
    std::fs::create_dir_all(netns_file.parent().expect("netns dir")).expect("netns dir");
    std::fs::File::create(&netns_file).expect("netns file");
    nix::mount::mount(
        Some(format!("/run/netns/{}", containers[2].0).as_str()),
        &netns_file,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind the client's netns");
    let _unbind = Unbind(netns_file.clone());
    network::ipam::lease_fixed(
        &data,
        &node1_subnet,
        "bench-client",
        Ipv4Addr::new(10, 42, 1, 20),
    )
    .expect("lease");
    overlays[0].retry_clients();
    let mode = overlays[0].vip_mode();
    println!("VIP mode on node 1: {mode}");
    // What each client's socket to the same-node VIP is really connected
    // to: the kernel's socket table, not getpeername() (which answers the
    // VIP for a balanced socket, as with DNAT).
    let peer = |ns: &str| {
        in_ns(ns, || {
            let s = std::net::TcpStream::connect_timeout(
                &"10.43.0.1:80".parse().expect("addr"),
                Duration::from_secs(2),
            );
            let local = match s.and_then(|s| s.local_addr()) {
                Ok(a) => a,
                Err(e) => return format!("error: {e}"),
            };
            // This thread's namespace's table (`/proc/self/net` would be
            // the main thread's).
            let table = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
            let local_port = format!(":{:04X}", local.port());
            table
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() > 2 && f[1].ends_with(&local_port)).then(|| f[2].to_string())
                })
                .find_map(|remote| {
                    let hex = remote.split(':').next()?;
                    let n = u32::from_str_radix(hex, 16).ok()?;
                    // /proc prints the address as a host-order u32 of the
                    // network-order bytes.
                    Some(Ipv4Addr::from(n.to_le_bytes()).to_string())
                })
                .unwrap_or_else(|| "not found".into())
        })
    };
    let mut pairs: Vec<(&str, &str, &str, &str)> = Vec::new();
    let (peer_cl, peer_c2) = (peer(&containers[2].0), peer(&containers[3].0));
    println!("the VIP from the registered client: {peer_cl}; from the other: {peer_c2}");
    let fast = mode.starts_with("ebpf") && peer_cl == "10.42.1.10";
    if !fast {
        println!(
            "data path: connect-time balancing is not on for the client ({mode}); nft rows only"
        );
    }
    let client = containers[2].0.clone();
    let other = containers[3].0.clone();
    let fast_label = |nft: &'static str, ebpf: &'static str| if fast { ebpf } else { nft };
    pairs.push((
        fast_label("same node (nft DNAT)", "same node (eBPF connect)"),
        &client,
        "http://10.42.1.10/",
        "http://10.43.0.1/",
    ));
    pairs.push((
        fast_label("cross node (nft DNAT)", "cross node (eBPF connect)"),
        &client,
        "http://10.42.2.10/",
        "http://10.43.0.2/",
    ));
    if env_usize("GANTRY_BENCH_WRK_AA", 1) != 0 {
        // The same target twice: what the pairing alone reads as a
        // difference on this machine (the noise floor of a VIP/direct
        // ratio), in the same rounds.
        pairs.push((
            "same node, direct vs direct (A/A control)",
            &client,
            "http://10.42.1.10/",
            "http://10.42.1.10/",
        ));
    }
    if env_usize("GANTRY_BENCH_WRK_NFT_AB", 1) != 0 && fast {
        assert_eq!(peer_c2, "10.43.0.1", "the unregistered client takes nft");
        pairs.push((
            "same node (nft DNAT, client not registered)",
            &other,
            "http://10.42.1.10/",
            "http://10.43.0.1/",
        ));
        pairs.push((
            "cross node (nft DNAT, client not registered)",
            &other,
            "http://10.42.2.10/",
            "http://10.43.0.2/",
        ));
    }
    let rounds = env_usize("GANTRY_BENCH_WRK_ROUNDS", 8).max(1);
    let seconds = env_usize("GANTRY_BENCH_WRK_SECONDS", 2).max(1) as u32;
    let load_before = loadavg();
    // Per pair: (direct, VIP) per round.
    let mut runs: Vec<Vec<[(f64, f64, f64); 2]>> = vec![Vec::new(); pairs.len()];
    for r in 0..rounds {
        for (k, (_, client, direct, vip)) in pairs.iter().enumerate() {
            // Back to back, the order alternating, so that a burst of load
            // from the shared machine falls on either alike.
            let (d, v) = if (r + k) % 2 == 0 {
                let d = wrk(client, direct, seconds, wrk_cpu);
                (d, wrk(client, vip, seconds, wrk_cpu))
            } else {
                let v = wrk(client, vip, seconds, wrk_cpu);
                (wrk(client, direct, seconds, wrk_cpu), v)
            };
            runs[k].push([d, v]);
        }
    }
    let load_after = loadavg();
    let mut rows = Vec::new();
    for ((label, _, direct, vip), v) in pairs.iter().zip(runs) {
        for (i, (path, url)) in [("direct", direct), ("VIP", vip)].iter().enumerate() {
            rows.push(json!({
                "name": format!("{label}, {path}"),
                "url": url,
                "rounds": v.len(),
                "requests_per_s": quantile(v.iter().map(|x| x[i].0).collect(), 0.5),
                "p50_ms": quantile(v.iter().map(|x| x[i].1).collect(), 0.5),
                "p99_ms": quantile(v.iter().map(|x| x[i].2).collect(), 0.5),
            }));
        }
        let ratio: Vec<f64> = v.iter().map(|x| x[1].0 / x[0].0.max(1.0)).collect();
        let p99: Vec<f64> = v.iter().map(|x| x[1].2 / x[0].2.max(0.001)).collect();
        rows.push(json!({
            "name": format!("{label}, VIP/direct"),
            "rounds": v.len(),
            "per_round": ratio,
            "ratio_median": quantile(ratio.clone(), 0.5),
            "ratio_p25": quantile(ratio.clone(), 0.25),
            "ratio_p75": quantile(ratio.clone(), 0.75),
            "ratio_min": quantile(ratio.clone(), 0.0),
            "ratio_max": quantile(ratio, 1.0),
            "p99_ratio_median": quantile(p99, 0.5),
            "pinned": pinned,
            "load_before": load_before,
            "load_after": load_after,
        }));
    }
    for (o, ns) in overlays.iter_mut().zip(&keep) {
        let _ = in_ns(&ns.0, || o.teardown());
    }
    drop(containers);
    drop(keep);
    drop(ul);
    rows
}
