//! The `deploy:` section and `restart:`: replicas, resources, restart
//! policy, placement and update settings, with Swarm's defaults filled in.

use serde_norway::{Mapping, Value};

use super::{Result, Walker, get, join};
use crate::compose::WarningKind;
use crate::compose::placement;
use crate::compose::spec::*;
use crate::compose::units::{Bytes, Cpus, Duration};

impl Walker<'_> {
    /// `restart:` as a restart policy. Docker's engine restarts at once and
    /// backs off on its own, so the translation has no delay (the agent's
    /// exponential back-off handles crash loops); `unless-stopped` is
    /// `always`, since a task stopped by an operator is removed, not
    /// restarted, in an orchestrator.
    pub(super) fn restart(&self, value: &Value, path: &str) -> Result<RestartPolicy> {
        let text = match value {
            Value::Bool(false) => "no".to_string(),
            v => self.string(v, path)?,
        };
        let (condition, max_attempts) = match text.as_str() {
            "no" => (RestartCondition::None, None),
            "always" | "unless-stopped" => (RestartCondition::Any, None),
            "on-failure" => (RestartCondition::OnFailure, None),
            other => match other.strip_prefix("on-failure:").map(str::parse::<u64>) {
                Some(Ok(n)) => (RestartCondition::OnFailure, Some(n).filter(|n| *n > 0)),
                _ => {
                    return Err(self.invalid(
                        path,
                        other,
                        "expected no, always, on-failure[:N] or unless-stopped",
                    ));
                }
            },
        };
        Ok(RestartPolicy {
            condition,
            delay: Duration::default(),
            max_attempts,
            window: Duration::default(),
        })
    }

    pub(super) fn deploy(
        &mut self,
        map: &Mapping,
        path: &str,
        restart: Option<RestartPolicy>,
    ) -> Result<Deploy> {
        let deploy_path = join(path, "deploy");
        let empty = Mapping::new();
        let m = match get(map, "deploy") {
            Some(v) => self.mapping(v, &deploy_path)?,
            None => &empty,
        };
        self.check_keys(
            m,
            &deploy_path,
            &[
                "mode",
                "replicas",
                "resources",
                "restart_policy",
                "placement",
                "update_config",
                "endpoint_mode",
            ],
            &["rollback_config", "labels"],
        )?;
        let mode = match self.opt_string(m, "mode", &deploy_path)?.as_deref() {
            None | Some("replicated") => DeployMode::Replicated,
            Some("global") => DeployMode::Global,
            Some(other) => {
                return Err(self.invalid(
                    &join(&deploy_path, "mode"),
                    other,
                    "expected replicated or global",
                ));
            }
        };
        let replicas = match (mode, get(m, "replicas")) {
            (DeployMode::Replicated, Some(v)) => {
                Some(self.u64(v, &join(&deploy_path, "replicas"))?)
            }
            (DeployMode::Replicated, None) => Some(1),
            (DeployMode::Global, Some(_)) => {
                return Err(self.conflict(
                    &join(&deploy_path, "replicas"),
                    "replicas cannot be used with mode: global",
                ));
            }
            (DeployMode::Global, None) => None,
        };
        let resources = match get(m, "resources") {
            Some(v) => self.resources(v, &join(&deploy_path, "resources"))?,
            None => Resources::default(),
        };
        let restart_policy = match (get(m, "restart_policy"), restart) {
            (Some(v), restart) => {
                if restart.is_some() {
                    self.warn(
                        &join(path, "restart"),
                        WarningKind::Overridden {
                            by: join(&deploy_path, "restart_policy"),
                        },
                    );
                }
                self.restart_policy(v, &join(&deploy_path, "restart_policy"))?
            }
            (None, Some(policy)) => policy,
            // Swarm's default when neither is given: restart on any exit,
            // without limit — but at once, not after Swarm's fixed 5s (see
            // `restart_policy`).
            (None, None) => RestartPolicy {
                condition: RestartCondition::Any,
                delay: Duration::default(),
                max_attempts: None,
                window: Duration::default(),
            },
        };
        let placement = match get(m, "placement") {
            Some(v) => self.placement(v, &join(&deploy_path, "placement"))?,
            None => Placement::default(),
        };
        let update_config = self.update_config(
            get(m, "update_config"),
            &join(&deploy_path, "update_config"),
        )?;
        let endpoint_mode = match self
            .opt_string(m, "endpoint_mode", &deploy_path)?
            .as_deref()
        {
            None => None,
            Some("vip") => Some(EndpointMode::Vip),
            Some("dnsrr") => Some(EndpointMode::Dnsrr),
            Some(other) => {
                return Err(self.invalid(
                    &join(&deploy_path, "endpoint_mode"),
                    other,
                    "expected vip or dnsrr",
                ));
            }
        };
        Ok(Deploy {
            mode,
            replicas,
            resources,
            restart_policy,
            placement,
            update_config,
            endpoint_mode,
        })
    }

    fn resources(&mut self, value: &Value, path: &str) -> Result<Resources> {
        let m = self.mapping(value, path)?;
        self.check_keys(m, path, &["limits", "reservations"], &[])?;
        let limits = match get(m, "limits") {
            Some(v) => self.resource_spec(v, &join(path, "limits"), &["pids"])?,
            None => ResourceSpec::default(),
        };
        let reservations = match get(m, "reservations") {
            Some(v) => self.resource_spec(
                v,
                &join(path, "reservations"),
                &["devices", "generic_resources"],
            )?,
            None => ResourceSpec::default(),
        };
        if let (Some(r), Some(l)) = (reservations.memory, limits.memory)
            && r > l
        {
            return Err(self.conflict(
                &join(path, "reservations.memory"),
                format!(
                    "reservation {} bytes is above the limit of {} bytes",
                    r.0, l.0
                ),
            ));
        }
        if let (Some(r), Some(l)) = (reservations.cpus, limits.cpus)
            && r > l
        {
            return Err(self.conflict(
                &join(path, "reservations.cpus"),
                format!("reservation of {r} cpus is above the limit of {l}"),
            ));
        }
        Ok(Resources {
            limits,
            reservations,
        })
    }

    fn resource_spec(
        &mut self,
        value: &Value,
        path: &str,
        unsupported: &[&str],
    ) -> Result<ResourceSpec> {
        let m = self.mapping(value, path)?;
        self.check_keys(m, path, &["cpus", "memory"], unsupported)?;
        let cpus = match get(m, "cpus") {
            Some(v) => {
                let p = join(path, "cpus");
                let text = self.string(v, &p)?;
                Some(Cpus::parse(&text).map_err(|e| self.value_error(&p, e))?)
            }
            None => None,
        };
        let memory = match get(m, "memory") {
            Some(v) => {
                let p = join(path, "memory");
                let text = self.string(v, &p)?;
                let bytes = Bytes::parse(&text).map_err(|e| self.value_error(&p, e))?;
                // Docker reads 0 as "no limit"; refusing it keeps one spelling
                // for "no limit" (leaving the key out).
                if bytes.0 == 0 {
                    return Err(self.invalid(&p, text, "must be greater than 0"));
                }
                Some(bytes)
            }
            None => None,
        };
        Ok(ResourceSpec { cpus, memory })
    }

    /// Defaults for what is left out: condition any, delay 0s, no attempt
    /// limit, window 0s. `max_attempts: 0` means no limit, as in Swarm.
    ///
    /// Decision: the default delay is 0s where Swarm's is 5s. The agent's
    /// crash-loop back-off (Docker's: 100 ms doubling to 60 s, reset after
    /// 10 s of running) already paces a container that keeps failing, so a
    /// fixed delay only makes every single crash cost 5 s of downtime. A
    /// `delay` written in the file is honoured as the least wait.
    fn restart_policy(&mut self, value: &Value, path: &str) -> Result<RestartPolicy> {
        let m = self.mapping(value, path)?;
        self.check_keys(
            m,
            path,
            &["condition", "delay", "max_attempts", "window"],
            &[],
        )?;
        let condition = match self.opt_string(m, "condition", path)?.as_deref() {
            None | Some("any") => RestartCondition::Any,
            Some("on-failure") => RestartCondition::OnFailure,
            Some("none") => RestartCondition::None,
            Some(other) => {
                return Err(self.invalid(
                    &join(path, "condition"),
                    other,
                    "expected none, on-failure or any",
                ));
            }
        };
        let max_attempts = match get(m, "max_attempts") {
            Some(v) => Some(self.u64(v, &join(path, "max_attempts"))?).filter(|n| *n > 0),
            None => None,
        };
        Ok(RestartPolicy {
            condition,
            delay: self.opt_duration(m, "delay", path, Duration::default())?,
            max_attempts,
            window: self.opt_duration(m, "window", path, Duration::default())?,
        })
    }

    /// `max_replicas_per_node: 0` means no limit, as in Swarm.
    fn placement(&mut self, value: &Value, path: &str) -> Result<Placement> {
        let m = self.mapping(value, path)?;
        self.check_keys(
            m,
            path,
            &["constraints", "max_replicas_per_node"],
            &["preferences"],
        )?;
        let mut constraints = Vec::new();
        if let Some(v) = get(m, "constraints") {
            let cp = join(path, "constraints");
            for (i, item) in self.sequence(v, &cp)?.iter().enumerate() {
                let ip = format!("{cp}[{i}]");
                let text = self.string(item, &ip)?;
                constraints.push(
                    placement::parse_constraint(&text).map_err(|e| self.value_error(&ip, e))?,
                );
            }
        }
        let max_replicas_per_node = match get(m, "max_replicas_per_node") {
            Some(v) => Some(self.u64(v, &join(path, "max_replicas_per_node"))?).filter(|n| *n > 0),
            None => None,
        };
        Ok(Placement {
            constraints,
            max_replicas_per_node,
        })
    }

    /// Swarm's defaults: parallelism 1, delay 0s, failure_action pause,
    /// monitor 5s, max_failure_ratio 0, order stop-first.
    fn update_config(&mut self, value: Option<&Value>, path: &str) -> Result<UpdateConfig> {
        let empty = Mapping::new();
        let m = match value {
            Some(v) => self.mapping(v, path)?,
            None => &empty,
        };
        self.check_keys(
            m,
            path,
            &[
                "parallelism",
                "delay",
                "failure_action",
                "monitor",
                "max_failure_ratio",
                "order",
            ],
            &[],
        )?;
        let failure_action = match self.opt_string(m, "failure_action", path)?.as_deref() {
            None | Some("pause") => FailureAction::Pause,
            Some("continue") => FailureAction::Continue,
            Some("rollback") => FailureAction::Rollback,
            Some(other) => {
                return Err(self.invalid(
                    &join(path, "failure_action"),
                    other,
                    "expected continue, rollback or pause",
                ));
            }
        };
        let order = match self.opt_string(m, "order", path)?.as_deref() {
            None | Some("stop-first") => UpdateOrder::StopFirst,
            Some("start-first") => UpdateOrder::StartFirst,
            Some(other) => {
                return Err(self.invalid(
                    &join(path, "order"),
                    other,
                    "expected stop-first or start-first",
                ));
            }
        };
        let max_failure_ratio = match get(m, "max_failure_ratio") {
            Some(v) => {
                let p = join(path, "max_failure_ratio");
                let text = self.string(v, &p)?;
                match text.trim().parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => r,
                    _ => return Err(self.invalid(&p, text, "expected a number from 0 to 1")),
                }
            }
            None => 0.0,
        };
        Ok(UpdateConfig {
            parallelism: match get(m, "parallelism") {
                Some(v) => self.u64(v, &join(path, "parallelism"))?,
                None => 1,
            },
            delay: self.opt_duration(m, "delay", path, Duration::default())?,
            failure_action,
            monitor: self.opt_duration(m, "monitor", path, Duration::from_secs(5))?,
            max_failure_ratio,
            order,
        })
    }
}
