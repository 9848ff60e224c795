//! The restart decider: whether and when a task's container that ended is
//! started again, from its policy, how it ended and its past runs.
//!
//! Pure: no clock (times are offsets from an origin the caller picks, e.g.
//! when the worker started), no I/O, deterministic. The worker asks only
//! about exits it did not cause: a container the controller stopped is never
//! restarted, whatever its policy.
//!
//! The policy merges Docker's `restart:` (`no`, `always`, `on-failure[:max]`,
//! `unless-stopped`) and Compose's `deploy.restart_policy` (condition, delay,
//! max_attempts, window), as Swarm does.
//!
//! Back-off follows Docker's restart manager, with two changes: the first
//! restart after a run is immediate (Docker waits 100 ms; the target
//! is a restart within 0.2 s of a crash), and [`BACKOFF_CAP`] is Docker's one
//! minute (Kubernetes' five would leave a flapping service down far longer
//! than Swarm and Compose users expect). A run of at least [`BACKOFF_RESET`]
//! (Docker's 10 s) ends a crash loop: the next restart is immediate again.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The first back-off of a crash loop (Docker's).
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// The longest back-off (Docker's).
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// A run at least this long is not part of a crash loop (Docker's).
pub const BACKOFF_RESET: Duration = Duration::from_secs(10);

/// Errors of this module: restart policies that do not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestartError {
    /// The `restart:` value is none of Docker's.
    #[error(
        "invalid restart policy {0:?}: expected no, always, unless-stopped or on-failure[:max]"
    )]
    InvalidPolicy(String),
    /// The `:max` of `on-failure:max` is not a count.
    #[error("invalid restart policy {policy:?}: maximum retry count {count:?} is not a number")]
    InvalidMaxRetries {
        /// The whole value.
        policy: String,
        /// What followed the colon.
        count: String,
    },
    /// `deploy.restart_policy.condition` is none of Compose's.
    #[error("invalid restart_policy condition {0:?}: expected none, on-failure or any")]
    InvalidCondition(String),
}

/// When a container that ended is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    /// Never (`no`; Compose's `none`).
    Never,
    /// Only after a non-zero exit (`on-failure`).
    OnFailure,
    /// After any exit (`always`; Compose's `any`).
    Always,
    /// After any exit, as `always`. The two differ in Docker only when the
    /// daemon restarts after a manual stop; here only the controller stops
    /// tasks, and a stopped task is never restarted, so they behave alike.
    /// Kept apart so that status and `inspect` show what the user wrote.
    UnlessStopped,
}

/// A task's restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// When to restart.
    pub condition: RestartCondition,
    /// The least time between an exit and the restart (Swarm's `delay`); the
    /// crash-loop back-off applies on top of it, never below it.
    pub delay: Duration,
    /// Give up after this many counted restarts; `None` never gives up.
    pub max_attempts: Option<u32>,
    /// A restart counts against `max_attempts` only if the run it started
    /// ended within this long; `None` counts every restart.
    pub window: Option<Duration>,
}

impl Default for RestartPolicy {
    /// Docker's default, `no`.
    fn default() -> Self {
        RestartPolicy::never()
    }
}

impl RestartPolicy {
    /// `no`.
    pub fn never() -> Self {
        RestartPolicy {
            condition: RestartCondition::Never,
            delay: Duration::ZERO,
            max_attempts: None,
            window: None,
        }
    }

    /// `always`.
    pub fn always() -> Self {
        RestartPolicy {
            condition: RestartCondition::Always,
            ..RestartPolicy::never()
        }
    }

    /// `on-failure[:max]`.
    pub fn on_failure(max_attempts: Option<u32>) -> Self {
        RestartPolicy {
            condition: RestartCondition::OnFailure,
            max_attempts,
            ..RestartPolicy::never()
        }
    }

    /// Compose's `deploy.restart_policy`. `condition` is `none`,
    /// `on-failure` or `any`; Compose's default when unset is `any`.
    pub fn from_compose(
        condition: Option<&str>,
        delay: Option<Duration>,
        max_attempts: Option<u32>,
        window: Option<Duration>,
    ) -> Result<Self, RestartError> {
        let condition = match condition.unwrap_or("any") {
            "none" => RestartCondition::Never,
            "on-failure" => RestartCondition::OnFailure,
            "any" => RestartCondition::Always,
            other => return Err(RestartError::InvalidCondition(other.to_string())),
        };
        Ok(RestartPolicy {
            condition,
            delay: delay.unwrap_or_default(),
            max_attempts,
            // A zero window would count nothing: Swarm reads 0 as "unset".
            window: window.filter(|w| !w.is_zero()),
        })
    }
}

impl FromStr for RestartPolicy {
    type Err = RestartError;

    /// Docker's `restart:` values.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "no" | "" => Ok(RestartPolicy::never()),
            "always" => Ok(RestartPolicy::always()),
            "unless-stopped" => Ok(RestartPolicy {
                condition: RestartCondition::UnlessStopped,
                ..RestartPolicy::never()
            }),
            "on-failure" => Ok(RestartPolicy::on_failure(None)),
            _ => match s.strip_prefix("on-failure:") {
                Some(count) => {
                    let max =
                        count
                            .parse::<u32>()
                            .map_err(|_| RestartError::InvalidMaxRetries {
                                policy: s.to_string(),
                                count: count.to_string(),
                            })?;
                    // Docker: `on-failure:0` means no limit.
                    Ok(RestartPolicy::on_failure((max > 0).then_some(max)))
                }
                None => Err(RestartError::InvalidPolicy(s.to_string())),
            },
        }
    }
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Exit {
    /// The exit code, 128 + signal when a signal killed it (as Docker).
    pub code: i32,
    /// The signal that killed the init, if one did.
    pub signal: Option<i32>,
    /// Whether the kernel's OOM killer struck the container.
    pub oom_killed: bool,
}

impl Exit {
    /// Whether the run failed: a non-zero exit, or an OOM kill (which a
    /// process may survive, exiting 0 after a child was killed; Docker
    /// still reports it, and an operator wants it restarted under
    /// `on-failure`).
    pub fn failed(&self) -> bool {
        self.code != 0 || self.signal.is_some() || self.oom_killed
    }
}

/// One run of a task's container, as offsets from the caller's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Run {
    /// When it started.
    pub started: Duration,
    /// When it ended.
    pub ended: Duration,
}

impl Run {
    /// How long it ran.
    pub fn length(&self) -> Duration {
        self.ended.saturating_sub(self.started)
    }
}

/// Why a task is not restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GiveUpReason {
    /// The policy is `no`.
    PolicyNever,
    /// The policy is `on-failure` and the run succeeded.
    Succeeded,
    /// `max_attempts` counted restarts were made.
    MaxAttempts {
        /// The limit.
        max: u32,
    },
}

impl fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GiveUpReason::PolicyNever => f.write_str("restart policy is no"),
            GiveUpReason::Succeeded => f.write_str("exited successfully under on-failure"),
            GiveUpReason::MaxAttempts { max } => {
                write!(f, "gave up after {max} restart attempts")
            }
        }
    }
}

/// What to do with a container that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Decision {
    /// Start it again this long after its exit.
    Restart {
        /// The wait: `max(policy delay, back-off)`.
        after: Duration,
    },
    /// Leave it ended.
    GiveUp {
        /// Why.
        reason: GiveUpReason,
    },
}

/// Decides about the container of a task that just ended with `exit`.
///
/// `runs` are all its runs, oldest first, the one that just ended last:
/// `runs[0]` was the first start, each later one a restart. An empty
/// `runs` is read as a single zero-length run.
pub fn decide(policy: &RestartPolicy, exit: &Exit, runs: &[Run]) -> Decision {
    match policy.condition {
        RestartCondition::Never => {
            return Decision::GiveUp {
                reason: GiveUpReason::PolicyNever,
            };
        }
        RestartCondition::OnFailure if !exit.failed() => {
            return Decision::GiveUp {
                reason: GiveUpReason::Succeeded,
            };
        }
        RestartCondition::OnFailure
        | RestartCondition::Always
        | RestartCondition::UnlessStopped => {}
    }
    if let Some(max) = policy.max_attempts
        && counted_restarts(policy, runs) >= max
    {
        return Decision::GiveUp {
            reason: GiveUpReason::MaxAttempts { max },
        };
    }
    Decision::Restart {
        after: policy.delay.max(backoff(crash_streak(runs))),
    }
}

/// The restarts that count against `max_attempts`: every run but the
/// first, and with a window only those that ended within it.
pub fn counted_restarts(policy: &RestartPolicy, runs: &[Run]) -> u32 {
    let restarts = runs.iter().skip(1);
    let n = match policy.window {
        None => restarts.count(),
        Some(window) => restarts.filter(|r| r.length() < window).count(),
    };
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// How many runs, counting back from the last, were shorter than
/// [`BACKOFF_RESET`]: the length of the current crash loop.
pub fn crash_streak(runs: &[Run]) -> u32 {
    let n = runs
        .iter()
        .rev()
        .take_while(|r| r.length() < BACKOFF_RESET)
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The back-off after a crash loop of `streak` short runs: none for the
/// first, then [`BACKOFF_BASE`] doubling up to [`BACKOFF_CAP`].
pub fn backoff(streak: u32) -> Duration {
    if streak <= 1 {
        return Duration::ZERO;
    }
    // 100 ms × 2^10 already exceeds the cap: larger shifts are the cap.
    let doublings = (streak - 2).min(16);
    BACKOFF_BASE
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn failed() -> Exit {
        Exit {
            code: 1,
            signal: None,
            oom_killed: false,
        }
    }

    fn ok() -> Exit {
        Exit {
            code: 0,
            signal: None,
            oom_killed: false,
        }
    }

    /// `n` runs of `len` each, back to back.
    fn runs(n: usize, len: Duration) -> Vec<Run> {
        (0..n)
            .map(|i| Run {
                started: len * i as u32,
                ended: len * (i as u32 + 1),
            })
            .collect()
    }

    #[test]
    fn docker_policies_parse() {
        let table: &[(&str, RestartPolicy)] = &[
            ("no", RestartPolicy::never()),
            ("always", RestartPolicy::always()),
            ("on-failure", RestartPolicy::on_failure(None)),
            ("on-failure:3", RestartPolicy::on_failure(Some(3))),
            ("on-failure:0", RestartPolicy::on_failure(None)),
        ];
        for (text, want) in table {
            assert_eq!(text.parse::<RestartPolicy>().as_ref(), Ok(want), "{text}");
        }
        assert_eq!(
            "unless-stopped".parse::<RestartPolicy>().unwrap().condition,
            RestartCondition::UnlessStopped
        );
        assert_eq!(
            "sometimes"
                .parse::<RestartPolicy>()
                .unwrap_err()
                .to_string(),
            "invalid restart policy \"sometimes\": expected no, always, unless-stopped or on-failure[:max]"
        );
        assert!(matches!(
            "on-failure:x".parse::<RestartPolicy>(),
            Err(RestartError::InvalidMaxRetries { .. })
        ));
    }

    #[test]
    fn compose_policies_convert() {
        let p = RestartPolicy::from_compose(None, None, None, None).unwrap();
        assert_eq!(p, RestartPolicy::always());
        let p = RestartPolicy::from_compose(
            Some("on-failure"),
            Some(ms(500)),
            Some(3),
            Some(Duration::ZERO),
        )
        .unwrap();
        assert_eq!(p.condition, RestartCondition::OnFailure);
        assert_eq!(
            (p.delay, p.max_attempts, p.window),
            (ms(500), Some(3), None)
        );
        assert_eq!(
            RestartPolicy::from_compose(Some("never"), None, None, None)
                .unwrap_err()
                .to_string(),
            "invalid restart_policy condition \"never\": expected none, on-failure or any"
        );
    }

    #[test]
    fn decisions_table() {
        let second = Duration::from_secs(1);
        let minute = Duration::from_secs(60);
        let on_failure_2 = RestartPolicy::on_failure(Some(2));
        let windowed = RestartPolicy {
            window: Some(Duration::from_secs(5)),
            ..on_failure_2
        };
        let delayed = RestartPolicy {
            delay: ms(300),
            ..RestartPolicy::always()
        };
        let give_up = |reason| Decision::GiveUp { reason };
        let restart = |after| Decision::Restart { after };
        // (name, policy, exit, runs, expected)
        let table: Vec<(&str, RestartPolicy, Exit, Vec<Run>, Decision)> = vec![
            (
                "no never restarts",
                RestartPolicy::never(),
                failed(),
                runs(1, second),
                give_up(GiveUpReason::PolicyNever),
            ),
            (
                "on-failure leaves a success",
                RestartPolicy::on_failure(None),
                ok(),
                runs(1, second),
                give_up(GiveUpReason::Succeeded),
            ),
            (
                "on-failure restarts a failure at once",
                RestartPolicy::on_failure(None),
                failed(),
                runs(1, second),
                restart(Duration::ZERO),
            ),
            (
                "oom exit 0 is a failure",
                RestartPolicy::on_failure(None),
                Exit {
                    oom_killed: true,
                    ..ok()
                },
                runs(1, second),
                restart(Duration::ZERO),
            ),
            (
                "always restarts a success",
                RestartPolicy::always(),
                ok(),
                runs(1, second),
                restart(Duration::ZERO),
            ),
            (
                "second quick crash backs off",
                RestartPolicy::always(),
                failed(),
                runs(2, second),
                restart(ms(100)),
            ),
            (
                "fifth quick crash",
                RestartPolicy::always(),
                failed(),
                runs(5, second),
                restart(ms(800)),
            ),
            (
                "long crash loop is capped",
                RestartPolicy::always(),
                failed(),
                runs(40, second),
                restart(BACKOFF_CAP),
            ),
            (
                "a long run resets the loop",
                RestartPolicy::always(),
                failed(),
                runs(5, minute),
                restart(Duration::ZERO),
            ),
            (
                "delay is a floor",
                delayed,
                failed(),
                runs(2, second),
                restart(ms(300)),
            ),
            (
                "back-off above the delay",
                delayed,
                failed(),
                runs(4, second),
                restart(ms(400)),
            ),
            (
                "on-failure:2 first restart",
                on_failure_2,
                failed(),
                runs(1, second),
                restart(Duration::ZERO),
            ),
            (
                "on-failure:2 second restart",
                on_failure_2,
                failed(),
                runs(2, second),
                restart(ms(100)),
            ),
            (
                "on-failure:2 gives up",
                on_failure_2,
                failed(),
                runs(3, second),
                give_up(GiveUpReason::MaxAttempts { max: 2 }),
            ),
            (
                "window: long runs do not count",
                windowed,
                failed(),
                runs(6, minute),
                restart(Duration::ZERO),
            ),
            (
                "window: short runs count",
                windowed,
                failed(),
                runs(3, second),
                give_up(GiveUpReason::MaxAttempts { max: 2 }),
            ),
        ];
        for (name, policy, exit, runs, want) in table {
            assert_eq!(decide(&policy, &exit, &runs), want, "{name}");
        }
    }

    fn policy_strategy() -> impl Strategy<Value = RestartPolicy> {
        (
            prop_oneof![
                Just(RestartCondition::OnFailure),
                Just(RestartCondition::Always),
                Just(RestartCondition::UnlessStopped)
            ],
            0u64..2_000,
            proptest::option::of(0u32..6),
            proptest::option::of(1u64..30_000),
        )
            .prop_map(|(condition, delay, max_attempts, window)| RestartPolicy {
                condition,
                delay: ms(delay),
                max_attempts,
                window: window.map(ms),
            })
    }

    proptest! {
        #[test]
        fn backoff_is_monotone_and_capped(a in 0u32..100, b in 0u32..100) {
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(backoff(lo) <= backoff(hi));
            prop_assert!(backoff(hi) <= BACKOFF_CAP);
        }

        #[test]
        fn waits_are_monotone_within_a_crash_loop(policy in policy_strategy(), n in 1usize..40) {
            let policy = RestartPolicy { max_attempts: None, ..policy };
            let mut last = Duration::ZERO;
            for k in 1..=n {
                let Decision::Restart { after } = decide(&policy, &failed(), &runs(k, ms(50))) else {
                    return Err(TestCaseError::fail("no limit, yet it gave up"));
                };
                prop_assert!(after >= last);
                prop_assert!(after >= policy.delay);
                prop_assert!(after <= policy.delay.max(BACKOFF_CAP));
                last = after;
            }
        }

        /// Simulates a task whose runs have random lengths: the restarts that
        /// count never exceed max_attempts.
        #[test]
        fn max_attempts_is_never_exceeded(
            policy in policy_strategy(),
            lengths in proptest::collection::vec(0u64..60_000, 1..60),
        ) {
            let mut history = Vec::new();
            let mut now = Duration::ZERO;
            for len in lengths {
                history.push(Run { started: now, ended: now + ms(len) });
                now += ms(len);
                match decide(&policy, &failed(), &history) {
                    Decision::Restart { after } => now += after,
                    Decision::GiveUp { reason } => {
                        let gave_up_on_max = matches!(reason, GiveUpReason::MaxAttempts { .. });
                        prop_assert!(gave_up_on_max, "gave up: {}", reason);
                        break;
                    }
                }
            }
            if let Some(max) = policy.max_attempts {
                // Each restart was made while fewer than max counted, and
                // adds at most one: the count never passes max.
                prop_assert!(counted_restarts(&policy, &history) <= max);
                if policy.window.is_none() {
                    prop_assert!(history.len() as u32 - 1 <= max);
                }
            }
        }
    }
}
