//! The controller's task (`gantry_proto` `Task` with its `TaskTemplate`) as
//! the worker's [`TaskSpec`]. The only place on the agent that reads the
//! task part of the wire protocol.
//!
//! A field the agent cannot honour rejects the task with an error naming
//! the field (`spec.mounts[1].source: ...`), never a task that runs
//! differently from what was asked.

use crate::engine::spec::{MountConfig, NetworkMode, PortProtocol, PublishedPort, ResourceConfig};
use crate::worker::TaskSpec;
use crate::worker::health::{HealthCheck, HealthSetting, Probe};
use crate::worker::restart::{RestartCondition, RestartPolicy};
use gantry_proto::v1 as pb;
use std::path::PathBuf;
use std::time::Duration;

/// Errors of the conversion: the field that cannot be honoured, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A field is missing, invalid or not supported by this agent.
    #[error("task {task}: {field}: {reason}")]
    Field {
        /// The task's id.
        task: String,
        /// The field's path in the task, e.g. `spec.mounts[0].source`.
        field: String,
        /// Why it is refused.
        reason: String,
    },
}

impl ConvertError {
    /// The path of the field refused.
    pub fn field(&self) -> &str {
        match self {
            ConvertError::Field { field, .. } => field,
        }
    }
}

/// The worker's spec of `task`. The task's `service_name` names its
/// containers (`<service>.<slot>.<task>`); a task from a controller that
/// does not send it is named after the service's id instead.
pub fn task_spec(task: &pb::Task) -> Result<TaskSpec, ConvertError> {
    let err = |field: &str, reason: &str| ConvertError::Field {
        task: task.id.clone(),
        field: field.to_string(),
        reason: reason.to_string(),
    };
    if task.id.is_empty() {
        return Err(err("id", "empty task id"));
    }
    let t = task.spec.as_ref().ok_or_else(|| err("spec", "missing"))?;
    if t.image.is_empty() {
        return Err(err("spec.image", "empty image reference"));
    }
    let mut env: Vec<String> = t.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.sort();
    if let Some(k) = t.env.keys().find(|k| k.is_empty() || k.contains('=')) {
        return Err(err(
            &format!("spec.env[{k:?}]"),
            "a variable name must be non-empty without '='",
        ));
    }
    let mounts = t
        .mounts
        .iter()
        .enumerate()
        .map(|(i, m)| mount(m).map_err(|(f, r)| err(&format!("spec.mounts[{i}].{f}"), &r)))
        .collect::<Result<Vec<_>, _>>()?;
    let resources = match &t.resources {
        Some(r) => limits(r.limits.as_ref()),
        None => ResourceConfig::default(),
    };
    let restart = match &t.restart_policy {
        Some(p) => {
            restart_policy(p).map_err(|(f, r)| err(&format!("spec.restart_policy.{f}"), &r))?
        }
        None => return Err(err("spec.restart_policy", "missing")),
    };
    let health = match &t.healthcheck {
        None => HealthSetting::FromImage,
        Some(h) => health(h).map_err(|(f, r)| err(&format!("spec.healthcheck.{f}"), &r))?,
    };
    let (network, mut ports) = network_for(t).map_err(|(f, r)| err(&format!("spec.{f}"), &r))?;
    let address = match &task.address {
        Some(a) if network == NetworkMode::Bridge => Some(
            a.parse::<std::net::Ipv4Addr>()
                .map_err(|_| err("address", &format!("{a:?} is not an IPv4 address")))?,
        ),
        _ => None,
    };
    if address.is_some() {
        // A task with a controller-allocated address is on the overlay:
        // its ingress ports are the routing mesh's, programmed on every
        // node from the service's record; only `mode: host` ports are
        // published by its container.
        let host_mode: Vec<bool> = t
            .ports
            .iter()
            .map(|p| matches!(pb::PublishMode::try_from(p.mode), Ok(pb::PublishMode::Host)))
            .collect();
        let mut i = 0;
        ports.retain(|_| {
            let keep = host_mode.get(i).copied().unwrap_or(false);
            i += 1;
            keep
        });
    }
    Ok(TaskSpec {
        task_id: task.id.clone(),
        service: if task.service_name.is_empty() {
            task.service.clone()
        } else {
            task.service_name.clone()
        },
        // Global tasks have no slot: the node's id takes its place in the
        // container name, and the task id keeps it unique.
        slot: task.slot.unwrap_or(0),
        global_node: match task.slot {
            Some(_) => None,
            None => task.node.clone(),
        },
        image: t.image.clone(),
        command: t.command.as_ref().map(|l| l.items.clone()),
        entrypoint: t.entrypoint.as_ref().map(|l| l.items.clone()),
        env,
        user: t.user.clone().filter(|u| !u.is_empty()),
        working_dir: t.working_dir.clone().filter(|w| !w.is_empty()),
        hostname: t.hostname.clone().filter(|h| !h.is_empty()),
        mounts,
        resources,
        restart,
        health,
        network,
        ports,
        address,
        stop_grace: t.stop_grace_period_ms.map(Duration::from_millis),
        labels: t.labels.clone().into_iter().collect(),
        generation: task.generation,
    })
}

/// The network a task's container gets, and the ports it publishes.
///
/// `network_mode: host` shares the node's namespace (and publishes
/// nothing: the ports are the host's already, as Docker ignores `ports`
/// with host networking). Anything else is the node's bridge with outbound
/// NAT, its ports published on the node. Without the overlay (a task with
/// no controller-allocated address), Swarm's default `ingress` mode is
/// published like `host` mode, on the task's node only; with it, the caller
/// keeps only the `host` ones (the mesh publishes the others). A port
/// without a published number is
/// refused: the node does not pick one yet.
pub fn network_for(
    t: &pb::TaskTemplate,
) -> Result<(NetworkMode, Vec<PublishedPort>), (String, String)> {
    if t.host_network {
        return Ok((NetworkMode::Host, Vec::new()));
    }
    let ports = t
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let bad = |field: &str, reason: String| (format!("ports[{i}].{field}"), reason);
            let host_port = match p.published {
                Some(n) => port(n).map_err(|r| bad("published", r))?,
                None => {
                    return Err(bad(
                        "published",
                        "a published port number is needed: the node does not pick one yet".into(),
                    ));
                }
            };
            let container_port = port(p.target).map_err(|r| bad("target", r))?;
            let protocol = match pb::Protocol::try_from(p.protocol) {
                Ok(pb::Protocol::Tcp) => PortProtocol::Tcp,
                Ok(pb::Protocol::Udp) => PortProtocol::Udp,
                Ok(pb::Protocol::Unspecified) | Err(_) => {
                    return Err(bad("protocol", format!("unknown protocol {}", p.protocol)));
                }
            };
            Ok(PublishedPort {
                host_ip: None,
                host_port,
                container_port,
                protocol,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((NetworkMode::Bridge, ports))
}

/// A mount; the error is `(field, reason)` relative to the mount.
fn mount(m: &pb::Mount) -> Result<MountConfig, (String, String)> {
    let bad = |field: &str, reason: String| (field.to_string(), reason);
    if !m.target.starts_with('/') {
        return Err(bad(
            "target",
            format!("{:?} is not an absolute path", m.target),
        ));
    }
    let destination = m.target.clone();
    let source = m.source.clone().filter(|s| !s.is_empty());
    match pb::MountKind::try_from(m.kind) {
        Ok(pb::MountKind::Volume) => match source {
            Some(name) => {
                crate::engine::volumes::validate_name(&name)
                    .map_err(|e| bad("source", e.to_string()))?;
                Ok(MountConfig::Volume {
                    name,
                    destination,
                    read_only: m.read_only,
                })
            }
            // Anonymous volumes would outlive the task with nobody to
            // remove them; refused until the agent tracks them.
            None => Err(bad(
                "source",
                "anonymous volumes are not supported, name the volume".into(),
            )),
        },
        Ok(pb::MountKind::Bind) => match source {
            Some(path) if path.starts_with('/') => Ok(MountConfig::Bind {
                source: PathBuf::from(path),
                destination,
                read_only: m.read_only,
            }),
            Some(path) => Err(bad(
                "source",
                format!("bind source {path:?} is not an absolute path"),
            )),
            None => Err(bad("source", "a bind mount needs a host path".into())),
        },
        Ok(pb::MountKind::Tmpfs) => {
            if m.read_only {
                return Err(bad(
                    "read_only",
                    "a read-only tmpfs is not supported".into(),
                ));
            }
            Ok(MountConfig::Tmpfs {
                destination,
                size: None,
                mode: None,
            })
        }
        Ok(pb::MountKind::Unspecified) | Err(_) => {
            Err(bad("kind", format!("unknown kind {}", m.kind)))
        }
    }
}

/// The limits the engine enforces; reservations are the scheduler's
/// bookkeeping only (as in Swarm, where they set no cgroup), so they are
/// not read here. Zero is "no limit", as the wire says for an unset one.
fn limits(limits: Option<&pb::Resources>) -> ResourceConfig {
    let Some(l) = limits else {
        return ResourceConfig::default();
    };
    ResourceConfig {
        memory_bytes: (l.memory_bytes > 0).then_some(l.memory_bytes),
        // Rounded up, so that a tiny limit is not read as none.
        millicpus: (l.nano_cpus > 0).then(|| l.nano_cpus.div_ceil(1_000_000)),
        ..ResourceConfig::default()
    }
}

/// The restart policy; the error is `(field, reason)` relative to it.
///
/// Compose's `restart:` reaches the agent already as a condition (`no` →
/// none, `always` and `unless-stopped` → any, `on-failure[:N]` → on-failure
/// with max attempts N); the two any-kinds behave alike here (see
/// [`RestartCondition::UnlessStopped`]).
fn restart_policy(p: &pb::RestartPolicy) -> Result<RestartPolicy, (String, String)> {
    let condition = match pb::RestartCondition::try_from(p.condition) {
        Ok(pb::RestartCondition::None) => RestartCondition::Never,
        Ok(pb::RestartCondition::OnFailure) => RestartCondition::OnFailure,
        Ok(pb::RestartCondition::Any) => RestartCondition::Always,
        Ok(pb::RestartCondition::Unspecified) | Err(_) => {
            return Err((
                "condition".into(),
                format!("unknown condition {}", p.condition),
            ));
        }
    };
    Ok(RestartPolicy {
        condition,
        delay: Duration::from_millis(p.delay_ms),
        max_attempts: p.max_attempts,
        // Swarm reads a zero window as unset.
        window: p.window_ms.filter(|w| *w > 0).map(Duration::from_millis),
    })
}

/// The health setting; the error is `(field, reason)` relative to it. The
/// spec's check replaces the image's; `none` disables the image's too.
/// Zero durations and retries take Docker's defaults, as in an image.
fn health(h: &pb::HealthCheck) -> Result<HealthSetting, (String, String)> {
    use pb::health_probe::Probe as P;
    let probe = match h.probe.as_ref().and_then(|p| p.probe.as_ref()) {
        None => return Err(("probe".into(), "missing".into())),
        Some(P::None(_)) => return Ok(HealthSetting::Disabled),
        Some(P::Exec(list)) if list.items.is_empty() => {
            return Err(("probe.exec".into(), "empty command".into()));
        }
        Some(P::Exec(list)) => Probe::Exec(list.items.clone()),
        Some(P::Shell(cmd)) if cmd.trim().is_empty() => {
            return Err(("probe.shell".into(), "empty command".into()));
        }
        Some(P::Shell(cmd)) => Probe::Exec(vec!["/bin/sh".into(), "-c".into(), cmd.clone()]),
        Some(P::Http(http)) => Probe::Http {
            port: port(http.port).map_err(|r| ("probe.http.port".to_string(), r))?,
            path: if http.path.is_empty() {
                "/".into()
            } else {
                http.path.clone()
            },
        },
        Some(P::Tcp(tcp)) => Probe::Tcp {
            port: port(tcp.port).map_err(|r| ("probe.tcp.port".to_string(), r))?,
        },
    };
    let mut check = HealthCheck::new(probe);
    if h.interval_ms > 0 {
        check.interval = Duration::from_millis(h.interval_ms);
    }
    if h.timeout_ms > 0 {
        check.timeout = Duration::from_millis(h.timeout_ms);
    }
    if h.retries > 0 {
        check.retries = h.retries;
    }
    check.start_period = Duration::from_millis(h.start_period_ms);
    Ok(HealthSetting::Check(check))
}

fn port(p: u32) -> Result<u16, String> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{p} is not a port (1-65535)")),
    }
}

/// A worker status as the wire's.
///
/// The worker's `restarting` (an in-place restart waiting out its delay)
/// is reported as `running`: the wire's task state only moves forward, and
/// the task is still the one running instance of its slot; the restart
/// count, exit code and message (`exited with 1; restarting in 5s`) say what
/// happened. Swarm, which replaces a failed task with a new one instead,
/// never shows a task going back either.
pub fn status_to_wire(status: &crate::worker::TaskStatus) -> pb::TaskStatus {
    use crate::worker::TaskState as W;
    use crate::worker::health::HealthStatus as H;
    let state = match status.state {
        W::Starting => pb::TaskState::Starting,
        W::Running | W::Restarting => pb::TaskState::Running,
        W::Complete => pb::TaskState::Complete,
        W::Failed => pb::TaskState::Failed,
        W::Rejected => pb::TaskState::Rejected,
        W::Shutdown => pb::TaskState::Shutdown,
    };
    let health = match status.health {
        None => pb::Health::None,
        Some(H::Starting) => pb::Health::Starting,
        Some(H::Healthy) => pb::Health::Healthy,
        Some(H::Unhealthy) => pb::Health::Unhealthy,
    };
    let error = matches!(status.state, W::Failed | W::Rejected).then(|| status.message.clone());
    pb::TaskStatus {
        state: state as i32,
        message: status.message.clone(),
        error,
        exit_code: status.exit_code,
        restarts: status.restarts,
        health: health as i32,
        // Stamped when the session records it.
        timestamp_unix_ms: None,
    }
}

/// `time` in Unix milliseconds, as task statuses carry it (0 before 1970).
pub fn unix_ms(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A status the agent makes itself, before the worker has the task
/// (`preparing` while its image is pulled, `rejected` when that fails).
pub fn own_status(state: pb::TaskState, message: String) -> pb::TaskStatus {
    let failed = matches!(state, pb::TaskState::Rejected | pb::TaskState::Failed);
    pb::TaskStatus {
        state: state as i32,
        error: failed.then(|| message.clone()),
        message,
        exit_code: None,
        restarts: 0,
        health: pb::Health::None as i32,
        timestamp_unix_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::health::HealthStatus;
    use crate::worker::{TaskState, TaskStatus};

    fn template() -> pb::TaskTemplate {
        pb::TaskTemplate {
            image: "gantry.test/web:1".into(),
            restart_policy: Some(pb::RestartPolicy {
                condition: pb::RestartCondition::Any as i32,
                delay_ms: 0,
                max_attempts: None,
                window_ms: None,
            }),
            ..pb::TaskTemplate::default()
        }
    }

    fn task(spec: pb::TaskTemplate) -> pb::Task {
        pb::Task {
            id: "t1".into(),
            service: "svc1".into(),
            service_name: "demo_web".into(),
            slot: Some(2),
            generation: 7,
            spec: Some(spec),
            desired_state: pb::DesiredState::Running as i32,
            ..pb::Task::default()
        }
    }

    fn field_of(t: pb::TaskTemplate) -> String {
        task_spec(&task(t)).unwrap_err().field().to_string()
    }

    #[test]
    fn every_field_reaches_the_spec() {
        let mut t = template();
        t.command = Some(pb::StringList {
            items: vec!["sh".into(), "-c".into(), "true".into()],
        });
        t.entrypoint = Some(pb::StringList { items: vec![] });
        t.env = [("B".to_string(), "2".to_string()), ("A".into(), "1".into())]
            .into_iter()
            .collect();
        t.user = Some("1000:1000".into());
        t.working_dir = Some("/srv".into());
        t.hostname = Some("web-2".into());
        t.mounts = vec![
            pb::Mount {
                kind: pb::MountKind::Volume as i32,
                source: Some("data".into()),
                target: "/data".into(),
                read_only: true,
            },
            pb::Mount {
                kind: pb::MountKind::Bind as i32,
                source: Some("/etc/hosts".into()),
                target: "/h".into(),
                read_only: false,
            },
            pb::Mount {
                kind: pb::MountKind::Tmpfs as i32,
                source: None,
                target: "/run".into(),
                read_only: false,
            },
        ];
        t.resources = Some(pb::ResourceRequirements {
            limits: Some(pb::Resources {
                nano_cpus: 500_000_000,
                memory_bytes: 64 << 20,
            }),
            reservations: Some(pb::Resources {
                nano_cpus: 1,
                memory_bytes: 1,
            }),
        });
        t.restart_policy = Some(pb::RestartPolicy {
            condition: pb::RestartCondition::OnFailure as i32,
            delay_ms: 1500,
            max_attempts: Some(3),
            window_ms: Some(60_000),
        });
        t.healthcheck = Some(pb::HealthCheck {
            probe: Some(pb::HealthProbe {
                probe: Some(pb::health_probe::Probe::Shell("test -f /ok".into())),
            }),
            interval_ms: 200,
            timeout_ms: 1000,
            retries: 2,
            start_period_ms: 5000,
        });
        t.host_network = true;
        t.labels = [("team".to_string(), "a".to_string())]
            .into_iter()
            .collect();
        t.stop_grace_period_ms = Some(3000);
        let spec = task_spec(&task(t)).unwrap();
        assert_eq!(spec.task_id, "t1");
        assert_eq!(spec.service, "demo_web");
        assert_eq!(spec.slot, 2);
        assert_eq!(spec.generation, 7);
        assert_eq!(spec.image, "gantry.test/web:1");
        assert_eq!(
            spec.command,
            Some(vec!["sh".into(), "-c".into(), "true".into()])
        );
        assert_eq!(spec.entrypoint, Some(vec![]));
        assert_eq!(spec.env, vec!["A=1".to_string(), "B=2".to_string()]);
        assert_eq!(spec.user.as_deref(), Some("1000:1000"));
        assert_eq!(spec.working_dir.as_deref(), Some("/srv"));
        assert_eq!(spec.hostname.as_deref(), Some("web-2"));
        assert_eq!(
            spec.mounts,
            vec![
                MountConfig::Volume {
                    name: "data".into(),
                    destination: "/data".into(),
                    read_only: true
                },
                MountConfig::Bind {
                    source: "/etc/hosts".into(),
                    destination: "/h".into(),
                    read_only: false
                },
                MountConfig::Tmpfs {
                    destination: "/run".into(),
                    size: None,
                    mode: None
                },
            ]
        );
        assert_eq!(spec.resources.millicpus, Some(500));
        assert_eq!(spec.resources.memory_bytes, Some(64 << 20));
        assert_eq!(
            spec.restart,
            RestartPolicy {
                condition: RestartCondition::OnFailure,
                delay: Duration::from_millis(1500),
                max_attempts: Some(3),
                window: Some(Duration::from_secs(60)),
            }
        );
        let HealthSetting::Check(check) = &spec.health else {
            panic!("{:?}", spec.health);
        };
        assert_eq!(
            check.probe,
            Probe::Exec(vec!["/bin/sh".into(), "-c".into(), "test -f /ok".into()])
        );
        assert_eq!(check.interval, Duration::from_millis(200));
        assert_eq!(check.timeout, Duration::from_secs(1));
        assert_eq!(check.retries, 2);
        assert_eq!(check.start_period, Duration::from_secs(5));
        assert_eq!(spec.network, NetworkMode::Host);
        assert_eq!(spec.stop_grace, Some(Duration::from_secs(3)));
        assert_eq!(spec.labels.get("team").map(String::as_str), Some("a"));
    }

    #[test]
    fn defaults_keep_the_image_and_engine_values() {
        let spec = task_spec(&task(template())).unwrap();
        assert_eq!(spec.command, None);
        assert_eq!(spec.entrypoint, None);
        assert_eq!(spec.health, HealthSetting::FromImage);
        assert_eq!(spec.network, NetworkMode::Bridge);
        assert!(spec.ports.is_empty());
        assert_eq!(spec.stop_grace, None);
        assert_eq!(spec.resources, ResourceConfig::default());
        assert_eq!(spec.restart, RestartPolicy::always());
        let mut global = task(template());
        global.slot = None;
        assert_eq!(task_spec(&global).unwrap().slot, 0);
    }

    #[test]
    fn containers_are_named_like_swarm_tasks() {
        let replicated = task_spec(&task(template())).unwrap();
        assert_eq!(replicated.container_name(), "demo_web.2.t1");
        let mut global = task(template());
        global.id = "abcdefghijklmnopqrstuvwxyz".into();
        global.slot = None;
        global.node = Some("0123456789abcdef0123".into());
        assert_eq!(
            task_spec(&global).unwrap().container_name(),
            "demo_web.0123456789ab.abcdefghijkl"
        );
        // A controller that does not send the name: the service's id.
        let mut unnamed = task(template());
        unnamed.service_name.clear();
        assert_eq!(task_spec(&unnamed).unwrap().container_name(), "svc1.2.t1");
    }

    #[test]
    fn health_probes_and_none() {
        let with = |probe| {
            let mut t = template();
            t.healthcheck = Some(pb::HealthCheck {
                probe: Some(pb::HealthProbe { probe: Some(probe) }),
                ..pb::HealthCheck::default()
            });
            task_spec(&task(t)).map(|s| s.health)
        };
        use pb::health_probe::Probe as P;
        assert_eq!(with(P::None(pb::Empty {})), Ok(HealthSetting::Disabled));
        let Ok(HealthSetting::Check(c)) = with(P::Tcp(pb::TcpProbe { port: 80 })) else {
            panic!()
        };
        assert_eq!(c.probe, Probe::Tcp { port: 80 });
        // Zeroes take Docker's defaults.
        assert_eq!(c.interval, crate::worker::health::DEFAULT_INTERVAL);
        let Ok(HealthSetting::Check(c)) = with(P::Http(pb::HttpProbe {
            port: 8080,
            path: String::new(),
        })) else {
            panic!()
        };
        assert_eq!(
            c.probe,
            Probe::Http {
                port: 8080,
                path: "/".into()
            }
        );
        let Ok(HealthSetting::Check(c)) = with(P::Exec(pb::StringList {
            items: vec!["true".into()],
        })) else {
            panic!()
        };
        assert_eq!(c.probe, Probe::Exec(vec!["true".into()]));
        let err = with(P::Tcp(pb::TcpProbe { port: 70000 })).unwrap_err();
        assert_eq!(err.field(), "spec.healthcheck.probe.tcp.port");
        assert!(err.to_string().contains("70000"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let mut t = template();
        t.image.clear();
        assert_eq!(field_of(t), "spec.image");
        let mut t = template();
        t.restart_policy = None;
        assert_eq!(field_of(t), "spec.restart_policy");
        let mut t = template();
        t.restart_policy.as_mut().unwrap().condition = 0;
        assert_eq!(field_of(t), "spec.restart_policy.condition");
        let mount = |kind: pb::MountKind, source: Option<&str>, target: &str| pb::Mount {
            kind: kind as i32,
            source: source.map(String::from),
            target: target.into(),
            read_only: false,
        };
        for (m, field) in [
            (
                mount(pb::MountKind::Volume, None, "/d"),
                "spec.mounts[1].source",
            ),
            (
                mount(pb::MountKind::Bind, Some("rel"), "/d"),
                "spec.mounts[1].source",
            ),
            (
                mount(pb::MountKind::Tmpfs, None, "rel"),
                "spec.mounts[1].target",
            ),
            (
                mount(pb::MountKind::Unspecified, None, "/d"),
                "spec.mounts[1].kind",
            ),
        ] {
            let mut t = template();
            t.mounts = vec![mount(pb::MountKind::Tmpfs, None, "/ok"), m];
            assert_eq!(field_of(t), field);
        }
        let mut t = template();
        t.ports = vec![
            pb::PortConfig {
                published: Some(8080),
                target: 80,
                protocol: pb::Protocol::Tcp as i32,
                mode: pb::PublishMode::Ingress as i32,
            },
            pb::PortConfig {
                published: None,
                target: 53,
                protocol: pb::Protocol::Udp as i32,
                mode: pb::PublishMode::Host as i32,
            },
        ];
        let err = task_spec(&task(t.clone())).unwrap_err();
        assert_eq!(err.field(), "spec.ports[1].published");
        assert!(
            err.to_string()
                .starts_with("task t1: spec.ports[1].published: "),
            "{err}"
        );
        t.ports[1].published = Some(5353);
        let spec = task_spec(&task(t.clone())).unwrap();
        assert_eq!(spec.network, NetworkMode::Bridge);
        assert_eq!(
            spec.ports,
            vec![
                PublishedPort {
                    host_ip: None,
                    host_port: 8080,
                    container_port: 80,
                    protocol: PortProtocol::Tcp
                },
                PublishedPort {
                    host_ip: None,
                    host_port: 5353,
                    container_port: 53,
                    protocol: PortProtocol::Udp
                },
            ]
        );
        // On the overlay (an allocated address), ingress ports are the
        // routing mesh's: the container publishes only `mode: host` ones.
        t.ports[1].mode = pb::PublishMode::Host as i32;
        let mut on_overlay = task(t.clone());
        on_overlay.address = Some("10.42.1.5".into());
        let spec = task_spec(&on_overlay).unwrap();
        assert_eq!(spec.address, Some(std::net::Ipv4Addr::new(10, 42, 1, 5)));
        assert_eq!(spec.ports.len(), 1);
        assert_eq!(spec.ports[0].host_port, 5353);
        on_overlay.address = Some("nope".into());
        assert_eq!(task_spec(&on_overlay).unwrap_err().field(), "address");
        t.ports[0].target = 0;
        assert_eq!(field_of(t.clone()), "spec.ports[0].target");
        // Host networking publishes nothing.
        t.host_network = true;
        let spec = task_spec(&task(t)).unwrap();
        assert_eq!(spec.network, NetworkMode::Host);
        assert!(spec.ports.is_empty());
        let mut t = template();
        t.env = [("A=B".to_string(), "1".to_string())].into_iter().collect();
        assert!(field_of(t).starts_with("spec.env"));
        let mut no_spec = task(template());
        no_spec.spec = None;
        assert_eq!(task_spec(&no_spec).unwrap_err().field(), "spec");
    }

    #[test]
    fn worker_states_map_onto_the_wire() {
        let status = |state, health| TaskStatus {
            task_id: "t".into(),
            container_id: None,
            state,
            exit_code: Some(1),
            restarts: 2,
            health,
            message: "exited with 1".into(),
        };
        for (state, wire) in [
            (TaskState::Starting, pb::TaskState::Starting),
            (TaskState::Running, pb::TaskState::Running),
            (TaskState::Restarting, pb::TaskState::Running),
            (TaskState::Complete, pb::TaskState::Complete),
            (TaskState::Failed, pb::TaskState::Failed),
            (TaskState::Rejected, pb::TaskState::Rejected),
            (TaskState::Shutdown, pb::TaskState::Shutdown),
        ] {
            let w = status_to_wire(&status(state, None));
            assert_eq!(w.state, wire as i32, "{state}");
            assert_eq!(w.exit_code, Some(1));
            assert_eq!(w.restarts, 2);
            assert_eq!(w.health, pb::Health::None as i32);
            assert_eq!(
                w.error.is_some(),
                matches!(state, TaskState::Failed | TaskState::Rejected)
            );
        }
        let w = status_to_wire(&status(TaskState::Running, Some(HealthStatus::Unhealthy)));
        assert_eq!(w.health, pb::Health::Unhealthy as i32);
    }
}
