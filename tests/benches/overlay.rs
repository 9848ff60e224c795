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
use std::net::Ipv4Addr;
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
    let workspace = workspace_root();
    let report = json!({
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
    print!("{md}");
    let out_dir = workspace.join("bench-results");
    std::fs::create_dir_all(&out_dir).expect("create bench-results/");
    std::fs::write(
        out_dir.join("overlay.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("write overlay.json");
    std::fs::write(out_dir.join("overlay.md"), &md).expect("write overlay.md");
}
