//! A deployed stack: the normalized Compose [`Stack`] checked again on the
//! controller and turned into the model's [`ServiceSpec`]s, and what a
//! deploy changes compared with the services the stack has now.
//!
//! Decisions:
//! - The server re-validates a stack by writing it back as Compose YAML and
//!   loading that again (no environment, no files: interpolation and
//!   `env_file` were done by the client, and every `$` is escaped), so the
//!   server accepts exactly what `gantry deploy` would accept from a file.
//! - A deploy's diff is computed between the model specs (what the store
//!   holds), with Compose's field names, because the store keeps services,
//!   not Compose documents. Top-level volumes and networks are not stored:
//!   a service's `networks` (full names) and `deploy.endpoint_mode` are, and
//!   show as changed under those names.
//! - What the model cannot carry yet is refused by field rather than
//!   dropped: published port ranges, `host_ip`, tmpfs sizes, and a
//!   healthcheck that only overrides the image's timings.

use std::collections::BTreeMap;
use std::path::Path;

use crate::compose::{
    self, DeployMode, Healthcheck, LoadOptions, MemoryFiles, PortMode, ServiceUpdate, Stack,
    StackChanges,
};
use crate::model::{
    self as m, Constraint, HealthCheck, HealthProbe, Placement, PortConfig, PublishMode,
    ResourceRequirements, Resources, RestartPolicy, ServiceMode, ServiceSpec, TaskTemplate,
    UpdateConfig,
};

/// Why a stack was refused; every variant names the field.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The stack does not load as a Compose file.
    #[error("stack {stack}: {message}")]
    Invalid {
        /// The stack's name.
        stack: String,
        /// The loader's error, which names the key path.
        message: String,
    },
    /// A top-level network the controller cannot carry.
    #[error("{field}: {reason}")]
    Network {
        /// The field path (`networks.back.driver`).
        field: String,
        /// Why.
        reason: String,
    },
    /// A field the controller cannot carry yet.
    #[error("services.{service}.{field}: {reason}")]
    Unsupported {
        /// The service.
        service: String,
        /// The field path within it.
        field: String,
        /// Why.
        reason: String,
    },
}

/// Loads the stack again from its own Compose form; returns the validated
/// (and normalized) stack.
pub fn revalidate(stack: &Stack) -> Result<Stack, DeployError> {
    let invalid = |message: String| DeployError::Invalid {
        stack: stack.name.clone(),
        message,
    };
    let yaml = compose::to_compose_yaml(stack).map_err(|e| invalid(e.to_string()))?;
    let env = BTreeMap::new();
    let files = MemoryFiles::default();
    let loaded = compose::load(
        yaml.as_bytes(),
        &LoadOptions {
            project_dir: Path::new("/"),
            stack_name: Some(&stack.name),
            env: &env,
            files: &files,
        },
    )
    .map_err(|e| invalid(e.to_string()))?;
    Ok(loaded.stack)
}

/// The model spec of every service of `stack`, by name.
pub fn service_specs(stack: &Stack) -> Result<BTreeMap<String, ServiceSpec>, DeployError> {
    check_networks(stack)?;
    stack
        .services
        .iter()
        .map(|(name, service)| {
            Ok((
                name.clone(),
                service_spec(&stack.name, &stack.networks, name, service)?,
            ))
        })
        .collect()
}

/// The cluster network a stack's network `name` is: `<stack>_<name>`, or
/// for an `external: true` network its own name, which must be another
/// stack's full network name (`examples_back`), as Compose names an external
/// network by its real name.
pub fn network_full_name(stack: &str, name: &str, spec: Option<&compose::NetworkSpec>) -> String {
    match spec {
        Some(n) if n.external => name.to_string(),
        _ => format!("{stack}_{name}"),
    }
}

/// The stack's top-level networks that the model cannot carry yet, refused
/// by field: drivers other than `overlay` (every network is a scope of the
/// one overlay) and `internal` (no outbound access is not enforced yet).
pub fn check_networks(stack: &Stack) -> Result<(), DeployError> {
    for (name, n) in &stack.networks {
        let refuse = |field: &str, reason: &str| DeployError::Network {
            field: format!("networks.{name}.{field}"),
            reason: reason.to_string(),
        };
        if let Some(driver) = n.driver.as_deref()
            && driver != "overlay"
        {
            return Err(refuse(
                "driver",
                &format!("driver {driver:?} is not supported (every network is an overlay scope)"),
            ));
        }
        if n.internal {
            return Err(refuse(
                "internal",
                "internal networks are not supported yet",
            ));
        }
        if n.external && !name.contains('_') {
            return Err(refuse(
                "external",
                "an external network is named by its full name, <stack>_<network> \
                 (e.g. examples_back)",
            ));
        }
    }
    Ok(())
}

fn service_spec(
    stack: &str,
    declared: &BTreeMap<String, compose::NetworkSpec>,
    name: &str,
    s: &compose::Service,
) -> Result<ServiceSpec, DeployError> {
    let unsupported = |field: String, reason: &str| DeployError::Unsupported {
        service: name.to_string(),
        field,
        reason: reason.to_string(),
    };
    let mut networks = Vec::new();
    for (network, attachment) in &s.networks {
        if !attachment.aliases.is_empty() {
            return Err(unsupported(
                format!("networks.{network}.aliases"),
                "network aliases are not supported yet (the service is resolved by its name)",
            ));
        }
        networks.push(network_full_name(stack, network, declared.get(network)));
    }
    networks.sort();
    networks.dedup();
    let mode = match s.deploy.mode {
        DeployMode::Global => ServiceMode::Global,
        DeployMode::Replicated => ServiceMode::Replicated {
            replicas: s.deploy.replicas.unwrap_or(1),
        },
    };
    let mut ports = Vec::new();
    for (i, p) in s.ports.iter().enumerate() {
        if p.host_ip.is_some() {
            return Err(unsupported(
                format!("ports[{i}].host_ip"),
                "binding a published port to one address is not supported yet",
            ));
        }
        let published = match p.published {
            None => None,
            Some(r) if r.start == r.end => Some(r.start),
            Some(r) => {
                return Err(unsupported(
                    format!("ports[{i}].published"),
                    &format!("the range {r} is not supported yet; publish one port"),
                ));
            }
        };
        ports.push(PortConfig {
            published,
            target: p.target,
            protocol: match p.protocol {
                compose::Protocol::Tcp => m::Protocol::Tcp,
                compose::Protocol::Udp => m::Protocol::Udp,
            },
            mode: match p.mode {
                PortMode::Ingress => PublishMode::Ingress,
                PortMode::Host => PublishMode::Host,
            },
        });
    }
    let mut mounts = Vec::new();
    for (i, v) in s.volumes.iter().enumerate() {
        if v.tmpfs.as_ref().is_some_and(|t| t.size.is_some()) {
            return Err(unsupported(
                format!("volumes[{i}].tmpfs.size"),
                "tmpfs size limits are not supported yet",
            ));
        }
        mounts.push(m::Mount {
            kind: match v.kind {
                compose::MountKind::Volume => m::MountKind::Volume,
                compose::MountKind::Bind => m::MountKind::Bind,
                compose::MountKind::Tmpfs => m::MountKind::Tmpfs,
            },
            source: v.source.clone(),
            target: v.target.clone(),
            read_only: v.read_only,
        });
    }
    let healthcheck = match &s.healthcheck {
        None => None,
        Some(h) => Some(health(h).ok_or_else(|| {
            unsupported(
                "healthcheck.test".into(),
                "overriding only the image's health check timings is not supported yet; give a test",
            )
        })?),
    };
    let resources = |r: &compose::ResourceSpec| Resources {
        nano_cpus: r.cpus.map_or(0, |c| c.0),
        memory_bytes: r.memory.map_or(0, |b| b.0),
    };
    let rp = &s.deploy.restart_policy;
    let restart_policy = RestartPolicy {
        condition: match rp.condition {
            compose::RestartCondition::None => m::RestartCondition::None,
            compose::RestartCondition::OnFailure => m::RestartCondition::OnFailure,
            compose::RestartCondition::Any => m::RestartCondition::Any,
        },
        delay: rp.delay.0,
        max_attempts: rp
            .max_attempts
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        window: (!rp.window.0.is_zero()).then_some(rp.window.0),
    };
    let mut constraints = Vec::new();
    for (i, c) in s.deploy.placement.constraints.iter().enumerate() {
        constraints.push(Constraint::parse(&c.to_string()).map_err(|e| {
            unsupported(format!("deploy.placement.constraints[{i}]"), &e.to_string())
        })?);
    }
    let mut depends_on = BTreeMap::new();
    for (dependency, d) in &s.depends_on {
        if d.restart {
            return Err(unsupported(
                format!("depends_on.{dependency}.restart"),
                "restarting a service when its dependency is updated is not supported yet",
            ));
        }
        let condition = match d.condition {
            compose::DependencyCondition::ServiceStarted => m::DependencyCondition::ServiceStarted,
            compose::DependencyCondition::ServiceHealthy => m::DependencyCondition::ServiceHealthy,
            compose::DependencyCondition::ServiceCompletedSuccessfully => {
                m::DependencyCondition::ServiceCompletedSuccessfully
            }
        };
        depends_on.insert(dependency.clone(), condition);
    }
    let uc = &s.deploy.update_config;
    Ok(ServiceSpec {
        name: name.to_string(),
        stack: stack.to_string(),
        mode,
        task: TaskTemplate {
            image: s.image.clone(),
            command: s.command.clone(),
            entrypoint: s.entrypoint.clone(),
            env: s.environment.clone(),
            user: s.user.clone(),
            working_dir: s.working_dir.clone(),
            hostname: s.hostname.clone(),
            mounts,
            resources: ResourceRequirements {
                limits: resources(&s.deploy.resources.limits),
                reservations: resources(&s.deploy.resources.reservations),
            },
            restart_policy,
            healthcheck,
            placement: Placement {
                constraints,
                max_replicas_per_node: s.deploy.placement.max_replicas_per_node,
            },
            ports,
            host_network: s.network_mode == Some(compose::NetworkMode::Host),
            labels: s.labels.clone(),
            stop_grace_period: s.stop_grace_period.map(|d| d.0),
            networks,
        },
        endpoint_mode: match s.deploy.endpoint_mode {
            Some(compose::EndpointMode::Dnsrr) => m::EndpointMode::Dnsrr,
            Some(compose::EndpointMode::Vip) | None => m::EndpointMode::Vip,
        },
        depends_on,
        update_config: Some(UpdateConfig {
            parallelism: uc.parallelism,
            delay: uc.delay.0,
            failure_action: match uc.failure_action {
                compose::FailureAction::Continue => m::FailureAction::Continue,
                compose::FailureAction::Rollback => m::FailureAction::Rollback,
                compose::FailureAction::Pause => m::FailureAction::Pause,
            },
            monitor: uc.monitor.0,
            max_failure_ratio: uc.max_failure_ratio,
            order: match uc.order {
                compose::UpdateOrder::StopFirst => m::UpdateOrder::StopFirst,
                compose::UpdateOrder::StartFirst => m::UpdateOrder::StartFirst,
            },
        }),
    })
}

/// The model's health check; `None` for a test-less override.
fn health(h: &Healthcheck) -> Option<HealthCheck> {
    let probe = match h.test.first().map(String::as_str) {
        Some("NONE") => HealthProbe::None,
        Some("CMD") => HealthProbe::Exec(h.test[1..].to_vec()),
        Some("CMD-SHELL") => HealthProbe::Shell(h.test[1..].join(" ")),
        // The loader checked the port and the path.
        Some("HTTP") => HealthProbe::Http {
            port: h.test.get(1)?.parse().ok()?,
            path: h.test.get(2)?.clone(),
        },
        Some("TCP") => HealthProbe::Tcp {
            port: h.test.get(1)?.parse().ok()?,
        },
        _ => return None,
    };
    Some(HealthCheck {
        probe,
        interval: h.interval.0,
        timeout: h.timeout.0,
        retries: u32::try_from(h.retries).unwrap_or(u32::MAX),
        start_period: h.start_period.0,
    })
}

/// What deploying `new` (by name) changes in a stack whose services are
/// `old` (by name).
pub fn diff(
    old: &BTreeMap<String, ServiceSpec>,
    new: &BTreeMap<String, ServiceSpec>,
) -> StackChanges {
    let mut changes = StackChanges::default();
    for (name, spec) in new {
        match old.get(name) {
            None => changes.create.push(name.clone()),
            Some(before) => {
                let fields = changed_fields(before, spec);
                if !fields.is_empty() {
                    changes.update.push(ServiceUpdate {
                        service: name.clone(),
                        fields,
                    });
                }
            }
        }
    }
    changes.remove = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    changes
}

/// The Compose names of the fields that differ.
fn changed_fields(a: &ServiceSpec, b: &ServiceSpec) -> Vec<String> {
    let mut fields = Vec::new();
    let mut check = |differs: bool, name: &str| {
        if differs {
            fields.push(name.to_string());
        }
    };
    let (x, y) = (&a.task, &b.task);
    check(x.image != y.image, "image");
    check(x.command != y.command, "command");
    check(x.entrypoint != y.entrypoint, "entrypoint");
    check(x.env != y.env, "environment");
    check(x.ports != y.ports, "ports");
    check(x.mounts != y.mounts, "volumes");
    check(x.healthcheck != y.healthcheck, "healthcheck");
    check(x.user != y.user, "user");
    check(x.working_dir != y.working_dir, "working_dir");
    check(x.hostname != y.hostname, "hostname");
    check(x.labels != y.labels, "labels");
    check(
        x.stop_grace_period != y.stop_grace_period,
        "stop_grace_period",
    );
    check(x.host_network != y.host_network, "network_mode");
    check(x.networks != y.networks, "networks");
    check(a.endpoint_mode != b.endpoint_mode, "deploy.endpoint_mode");
    check(a.depends_on != b.depends_on, "depends_on");
    match (&a.mode, &b.mode) {
        (ServiceMode::Replicated { .. }, ServiceMode::Replicated { .. }) => {
            check(a.mode != b.mode, "deploy.replicas");
        }
        _ => check(a.mode != b.mode, "deploy.mode"),
    }
    check(x.resources != y.resources, "deploy.resources");
    check(
        x.restart_policy != y.restart_policy,
        "deploy.restart_policy",
    );
    check(x.placement != y.placement, "deploy.placement");
    check(a.update_config != b.update_config, "deploy.update_config");
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose::MemoryFiles;

    fn load(yaml: &str) -> Stack {
        let env = BTreeMap::new();
        let files = MemoryFiles::default();
        compose::load(
            yaml.as_bytes(),
            &LoadOptions {
                project_dir: Path::new("/srv/demo"),
                stack_name: Some("demo"),
                env: &env,
                files: &files,
            },
        )
        .expect("fixture loads")
        .stack
    }

    #[test]
    fn networks_and_endpoint_modes_become_model_specs() {
        let stack = load(
            "services:\n  web:\n    image: nginx\n    networks: [front, back]\n  api:\n    image: api\n    deploy: {endpoint_mode: dnsrr}\n    networks:\n      back:\n      shared:\n  plain:\n    image: busybox\n  host:\n    image: busybox\n    network_mode: host\nnetworks:\n  front:\n  back:\n    driver: overlay\n  other_shared:\n    external: true\n  shared:\n    external: true\n",
        );
        // `shared` is external without a full name: refused by field.
        let err = service_specs(&revalidate(&stack).expect("valid")).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "networks.shared.external: an external network is named by its full name, \
             <stack>_<network> (e.g. examples_back)"
        );
        let stack = load(
            "services:\n  web:\n    image: nginx\n    networks: [front, back]\n  api:\n    image: api\n    deploy: {endpoint_mode: dnsrr}\n    networks:\n      back:\n      other_shared:\n  plain:\n    image: busybox\n  host:\n    image: busybox\n    network_mode: host\nnetworks:\n  front:\n  back:\n    driver: overlay\n  other_shared:\n    external: true\n",
        );
        let specs = service_specs(&revalidate(&stack).expect("valid")).expect("converts");
        assert_eq!(specs["web"].task.networks, ["demo_back", "demo_front"]);
        assert_eq!(specs["web"].endpoint_mode, m::EndpointMode::Vip);
        assert_eq!(specs["api"].task.networks, ["demo_back", "other_shared"]);
        assert_eq!(specs["api"].endpoint_mode, m::EndpointMode::Dnsrr);
        // Compose's rule: a service that names no network joins the stack's
        // default; a host-network service joins none and gets no VIP.
        assert_eq!(specs["plain"].task.networks, ["demo_default"]);
        assert!(specs["host"].task.networks.is_empty());
        assert!(!specs["host"].wants_vip());

        // A diff names the Compose fields.
        let mut changed = specs.clone();
        let api = changed.get_mut("api").expect("api");
        api.endpoint_mode = m::EndpointMode::Vip;
        api.task.networks.pop();
        let changes = diff(&specs, &changed);
        assert_eq!(
            changes.update[0].fields,
            ["networks", "deploy.endpoint_mode"]
        );

        // What the overlay cannot carry yet is refused by field.
        let aliases = load(
            "services:\n  web:\n    image: nginx\n    networks:\n      front:\n        aliases: [www]\nnetworks:\n  front:\n",
        );
        let err = service_specs(&aliases).expect_err("aliases refused");
        assert_eq!(
            err.to_string(),
            "services.web.networks.front.aliases: network aliases are not supported yet \
             (the service is resolved by its name)"
        );
        let bridge = load(
            "services:\n  web:\n    image: nginx\nnetworks:\n  default:\n    driver: bridge\n",
        );
        let err = service_specs(&bridge).expect_err("bridge refused");
        assert_eq!(
            err.to_string(),
            "networks.default.driver: driver \"bridge\" is not supported (every network is an \
             overlay scope)"
        );
    }

    #[test]
    fn depends_on_becomes_conditions_and_restart_is_refused() {
        let stack = load(
            "services:\n  db:\n    image: postgres\n  job:\n    image: busybox\n  app:\n    image: app\n    depends_on:\n      db: {condition: service_healthy}\n      job: {condition: service_completed_successfully}\n      cache: {required: false}\n  web:\n    image: nginx\n    depends_on: [app]\n",
        );
        let specs = service_specs(&revalidate(&stack).expect("valid")).expect("converts");
        let want: BTreeMap<String, m::DependencyCondition> = [
            ("db".to_string(), m::DependencyCondition::ServiceHealthy),
            (
                "job".to_string(),
                m::DependencyCondition::ServiceCompletedSuccessfully,
            ),
        ]
        .into();
        // The optional `cache`, which the stack lacks, is left out (with
        // the loader's warning).
        assert_eq!(specs["app"].depends_on, want);
        assert_eq!(
            specs["web"].depends_on,
            [("app".to_string(), m::DependencyCondition::ServiceStarted)].into()
        );
        assert!(specs["db"].depends_on.is_empty());

        // A changed condition is an update of that field alone.
        let mut changed = specs.clone();
        changed.get_mut("web").expect("web").depends_on.clear();
        assert_eq!(diff(&specs, &changed).update[0].fields, ["depends_on"]);

        let restart = load(
            "services:\n  db:\n    image: postgres\n  app:\n    image: app\n    depends_on:\n      db: {condition: service_started, restart: true}\n",
        );
        let err = service_specs(&restart).expect_err("restart refused");
        assert_eq!(
            err.to_string(),
            "services.app.depends_on.db.restart: restarting a service when its dependency is \
             updated is not supported yet"
        );
    }

    #[test]
    fn a_stack_becomes_model_specs() {
        let stack = load(
            "services:\n  web:\n    image: nginx\n    stop_grace_period: 1m30s\n    network_mode: host\n    labels: {tier: front}\n    ports: ['8080:80']\n    healthcheck:\n      test: [CMD, wget, -q, localhost]\n      interval: 2s\n    deploy:\n      replicas: 3\n      resources:\n        limits: {cpus: '0.5', memory: 64m}\n      placement:\n        constraints: [node.labels.zone==eu]\n        max_replicas_per_node: 2\n      restart_policy:\n        condition: on-failure\n        max_attempts: 4\n",
        );
        let specs = service_specs(&revalidate(&stack).expect("valid")).expect("converts");
        let web = &specs["web"];
        assert_eq!(web.stack, "demo");
        assert_eq!(web.mode, ServiceMode::Replicated { replicas: 3 });
        let t = &web.task;
        assert!(t.host_network);
        assert_eq!(t.labels["tier"], "front");
        assert_eq!(t.ports[0].published, Some(8080));
        assert_eq!(t.ports[0].target, 80);
        assert_eq!(t.resources.limits.nano_cpus, 500_000_000);
        assert_eq!(t.resources.limits.memory_bytes, 64 << 20);
        assert_eq!(t.placement.max_replicas_per_node, Some(2));
        assert_eq!(
            t.placement.constraints[0].to_string(),
            "node.labels.zone==eu"
        );
        assert_eq!(t.restart_policy.condition, m::RestartCondition::OnFailure);
        assert_eq!(t.restart_policy.max_attempts, Some(4));
        let hc = t.healthcheck.as_ref().expect("healthcheck");
        assert_eq!(
            hc.probe,
            HealthProbe::Exec(vec!["wget".into(), "-q".into(), "localhost".into()])
        );
        assert_eq!(hc.interval, std::time::Duration::from_secs(2));
        assert_eq!(
            t.stop_grace_period,
            Some(std::time::Duration::from_secs(90))
        );
    }

    #[test]
    fn http_and_tcp_probes_reach_the_model() {
        let stack = load(
            "services:\n  web:\n    image: a\n    healthcheck:\n      test: [HTTP, '8080', /health]\n  db:\n    image: b\n    healthcheck:\n      test: [TCP, '5432']\n",
        );
        let specs = service_specs(&revalidate(&stack).expect("valid")).expect("converts");
        let probe = |name: &str| {
            specs[name]
                .task
                .healthcheck
                .as_ref()
                .expect(name)
                .probe
                .clone()
        };
        assert_eq!(
            probe("web"),
            HealthProbe::Http {
                port: 8080,
                path: "/health".into()
            }
        );
        assert_eq!(probe("db"), HealthProbe::Tcp { port: 5432 });

        let env = BTreeMap::new();
        let files = MemoryFiles::default();
        for bad in [
            "[HTTP, '0', /health]",
            "[HTTP, '8080', health]",
            "[HTTP, '8080']",
            "[TCP, '70000']",
            "[TCP]",
        ] {
            let yaml =
                format!("services:\n  web:\n    image: a\n    healthcheck:\n      test: {bad}\n");
            let err = compose::load(
                yaml.as_bytes(),
                &LoadOptions {
                    project_dir: Path::new("/srv/demo"),
                    stack_name: Some("demo"),
                    env: &env,
                    files: &files,
                },
            )
            .expect_err(bad)
            .to_string();
            assert!(
                err.contains("services.web.healthcheck.test"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn stop_grace_period_is_optional_and_diffed() {
        let old = service_specs(&load("services:\n  web:\n    image: a\n")).expect("old");
        assert_eq!(old["web"].task.stop_grace_period, None);
        let new = service_specs(&load(
            "services:\n  web:\n    image: a\n    stop_grace_period: 500ms\n",
        ))
        .expect("new");
        assert_eq!(
            new["web"].task.stop_grace_period,
            Some(std::time::Duration::from_millis(500))
        );
        assert_eq!(diff(&old, &new).update[0].fields, ["stop_grace_period"]);
    }

    #[test]
    fn what_the_model_cannot_carry_is_refused_by_field() {
        let stack = load("services:\n  web:\n    image: nginx\n    ports: ['8000-8010:80']\n");
        let err = service_specs(&stack).expect_err("range refused");
        assert_eq!(
            err.to_string(),
            "services.web.ports[0].published: the range 8000-8010 is not supported yet; publish one port"
        );
    }

    #[test]
    fn diff_names_compose_fields() {
        let old = service_specs(&load(
            "services:\n  web:\n    image: a\n    deploy: {replicas: 2}\n  db:\n    image: d\n",
        ))
        .expect("old");
        let new = service_specs(&load(
            "services:\n  web:\n    image: b\n    deploy: {replicas: 3}\n  cache:\n    image: c\n",
        ))
        .expect("new");
        let changes = diff(&old, &new);
        assert_eq!(changes.create, ["cache"]);
        assert_eq!(changes.remove, ["db"]);
        assert_eq!(changes.update.len(), 1);
        assert_eq!(changes.update[0].fields, ["image", "deploy.replicas"]);
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn revalidation_refuses_what_the_loader_refuses() {
        let mut stack = load("services:\n  web:\n    image: nginx\n");
        stack.name = "Bad Name".into();
        let err = revalidate(&stack).expect_err("invalid stack name");
        assert!(err.to_string().contains("Bad Name"), "{err}");
    }
}
