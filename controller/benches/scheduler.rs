//! Scheduler throughput: placements per second for batches of 100 and 10,000
//! tasks on simulated clusters of 1,000 and 5,000 nodes.
//!
//! `cargo bench -p gantry-controller --bench scheduler`. Each case repeats
//! until it has 100 samples or has used its share of a one-minute budget
//! (at least 3 samples), then reports the median and p95 of the time per
//! batch and the placement rate. Results are printed and written to
//! `bench-results/scheduler.{json,md}` at the workspace root.
//!
//! The workload: nodes with 16 CPUs and 64 GiB, a third labelled `zone=eu`,
//! one in 50 drained and one in 100 down; the batch is ten services, each a
//! run of tasks reserving 0.1 CPU and 128 MiB, every third service
//! constrained to `node.labels.zone==eu` and every fifth limited to four
//! replicas per node. Everything fits, so every task is placed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use gantry_controller::model::{
    Availability, Constraint, Node, NodeId, NodeRole, NodeSpec, NodeState, NodeStatus, Placement,
    Platform, ResourceRequirements, Resources, ServiceId, TaskId, TaskTemplate,
};
use gantry_controller::scheduler::{ClusterView, TaskRef, schedule};

const BUDGET: Duration = Duration::from_secs(60);
const MAX_SAMPLES: usize = 100;
const MIN_SAMPLES: usize = 3;

fn nodes(count: usize) -> Vec<Node> {
    (0..count)
        .map(|i| Node {
            id: NodeId::new(format!("node-{i:05}")).expect("valid id"),
            spec: NodeSpec {
                availability: if i % 50 == 7 {
                    Availability::Drain
                } else {
                    Availability::Active
                },
                role: NodeRole::Worker,
                labels: BTreeMap::from([(
                    "zone".to_string(),
                    if i % 3 == 0 { "eu" } else { "us" }.to_string(),
                )]),
            },
            status: NodeStatus {
                state: if i % 100 == 13 {
                    NodeState::Down
                } else {
                    NodeState::Ready
                },
                address: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                hostname: format!("host-{i}"),
                resources: Resources {
                    nano_cpus: 16_000_000_000,
                    memory_bytes: 64 << 30,
                },
                platform: Platform {
                    os: "linux".into(),
                    arch: "amd64".into(),
                },
            },
            version: 1,
            subnet: None,
        })
        .collect()
}

struct Batch {
    ids: Vec<TaskId>,
    services: Vec<ServiceId>,
    specs: Vec<TaskTemplate>,
    /// (task index, service index) in batch order.
    order: Vec<(usize, usize)>,
}

fn batch(tasks: usize) -> Batch {
    const SERVICES: usize = 10;
    let services: Vec<ServiceId> = (0..SERVICES)
        .map(|s| ServiceId::new(format!("svc-{s}")).expect("valid id"))
        .collect();
    let specs: Vec<TaskTemplate> = (0..SERVICES)
        .map(|s| TaskTemplate {
            image: "busybox".into(),
            resources: ResourceRequirements {
                limits: Resources::default(),
                reservations: Resources {
                    nano_cpus: 100_000_000,
                    memory_bytes: 128 << 20,
                },
            },
            placement: Placement {
                constraints: if s % 3 == 0 {
                    vec![Constraint::parse("node.labels.zone==eu").expect("valid")]
                } else {
                    Vec::new()
                },
                max_replicas_per_node: (s % 5 == 0).then_some(4),
            },
            ..TaskTemplate::default()
        })
        .collect();
    let ids = (0..tasks)
        .map(|i| TaskId::new(format!("task-{i:06}")).expect("valid id"))
        .collect();
    // Each service's tasks come as one run, as an orchestrator emits them.
    let order = (0..tasks).map(|i| (i, i * SERVICES / tasks)).collect();
    Batch {
        ids,
        services,
        specs,
        order,
    }
}

struct CaseResult {
    nodes: usize,
    tasks: usize,
    samples: usize,
    placed: usize,
    median: Duration,
    p95: Duration,
}

impl CaseResult {
    fn rate(&self, d: Duration) -> f64 {
        self.placed as f64 / d.as_secs_f64()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn run_case(node_count: usize, task_count: usize, budget: Duration) -> CaseResult {
    let nodes = nodes(node_count);
    let view = ClusterView::new(&nodes, &[]).expect("unique node ids");
    let b = batch(task_count);
    let refs: Vec<TaskRef<'_>> = b
        .order
        .iter()
        .map(|&(t, s)| TaskRef {
            id: &b.ids[t],
            service: &b.services[s],
            spec: &b.specs[s],
            node: None,
        })
        .collect();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut placed = 0;
    while samples.len() < MIN_SAMPLES || (samples.len() < MAX_SAMPLES && started.elapsed() < budget)
    {
        let t0 = Instant::now();
        let plan = std::hint::black_box(schedule(&view, &refs));
        samples.push(t0.elapsed());
        placed = plan.assignments.len();
    }
    samples.sort();
    CaseResult {
        nodes: node_count,
        tasks: task_count,
        samples: samples.len(),
        placed,
        median: percentile(&samples, 0.5),
        p95: percentile(&samples, 0.95),
    }
}

fn main() {
    let cases = [(1_000, 100), (1_000, 10_000), (5_000, 100), (5_000, 10_000)];
    // The large batches get most of the budget.
    let budget_for = |tasks: usize| {
        if tasks >= 10_000 {
            BUDGET * 2 / 5
        } else {
            BUDGET / 10
        }
    };
    let results: Vec<CaseResult> = cases
        .iter()
        .map(|&(n, t)| {
            let r = run_case(n, t, budget_for(t));
            println!(
                "scheduler: {:>5} nodes, {:>6} tasks: median {:>9.3} ms ({:>10.0} placements/s), p95 {:>9.3} ms ({:>10.0} placements/s), {} placed, {} samples",
                r.nodes,
                r.tasks,
                r.median.as_secs_f64() * 1e3,
                r.rate(r.median),
                r.p95.as_secs_f64() * 1e3,
                r.rate(r.p95),
                r.placed,
                r.samples
            );
            r
        })
        .collect();

    let json = serde_json::json!({
        "benchmark": "scheduler",
        "unit": "placements per second",
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cases": results.iter().map(|r| serde_json::json!({
            "nodes": r.nodes,
            "tasks": r.tasks,
            "placed": r.placed,
            "samples": r.samples,
            "median_ms": r.median.as_secs_f64() * 1e3,
            "p95_ms": r.p95.as_secs_f64() * 1e3,
            "median_placements_per_s": r.rate(r.median),
            "p95_placements_per_s": r.rate(r.p95),
        })).collect::<Vec<_>>(),
    });
    let mut md = String::from(
        "# Scheduler benchmark\n\n`cargo bench -p gantry-controller --bench scheduler`; \
         see `controller/benches/scheduler.rs` for the workload. p95 is the slower tail \
         (time per batch; placements/s at that time).\n\n\
         | nodes | tasks | placed | samples | median ms | median placements/s | p95 ms | p95 placements/s |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &results {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} | {:.0} | {:.3} | {:.0} |\n",
            r.nodes,
            r.tasks,
            r.placed,
            r.samples,
            r.median.as_secs_f64() * 1e3,
            r.rate(r.median),
            r.p95.as_secs_f64() * 1e3,
            r.rate(r.p95)
        ));
    }
    // The workspace root is the controller crate's parent.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let dir = root.join("bench-results");
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| {
            std::fs::write(
                dir.join("scheduler.json"),
                serde_json::to_string_pretty(&json).unwrap_or_default() + "\n",
            )
        })
        .and_then(|()| std::fs::write(dir.join("scheduler.md"), &md));
    match written {
        Ok(()) => println!("scheduler: wrote {}/scheduler.{{json,md}}", dir.display()),
        Err(e) => {
            eprintln!("scheduler: cannot write results to {}: {e}", dir.display());
            std::process::exit(1);
        }
    }
}
