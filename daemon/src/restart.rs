//! Restart arithmetic: which failures count, how long to wait before the next
//! attempt, and when a department is parked as crash-looping. Pure values over
//! monotonic instants, so the rules are unit-tested without Docker or tokio.
//!
//! Attempts are counted in a sliding `window`: a failure older than the window
//! is forgotten, so a department that stays up for one window starts again from
//! the base delay with its whole retry budget (the "stable period").

use fleet_model::spec::{RestartPolicy, RestartSpec};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Why a department's container needs another start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureReason {
    Exited {
        code: i64,
    },
    Oom,
    Unhealthy,
    /// The container vanished or could not be started.
    Lost,
}

impl FailureReason {
    /// The bounded label used in events and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FailureReason::Exited { .. } => "exit",
            FailureReason::Oom => "oom",
            FailureReason::Unhealthy => "unhealthy",
            FailureReason::Lost => "lost",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            FailureReason::Exited { code } => format!("exited with code {code}"),
            FailureReason::Oom => "killed: out of memory".into(),
            FailureReason::Unhealthy => "unhealthy: health probe failed".into(),
            FailureReason::Lost => "container missing or failed to start".into(),
        }
    }

    pub fn exit_code(&self) -> Option<i64> {
        match self {
            FailureReason::Exited { code } => Some(*code),
            FailureReason::Oom => Some(137),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start again after this delay.
    RestartAfter(Duration),
    /// Too many failures in the window: stop trying until an operator or a new spec says so.
    Park,
    /// The policy says this failure is not restarted (for example exit 0 under on-failure).
    LeaveStopped,
}

#[derive(Debug, Clone, Default)]
pub struct RestartTracker {
    attempts: VecDeque<Instant>,
    parked: bool,
}

impl RestartTracker {
    pub fn parked(&self) -> bool {
        self.parked
    }

    /// Forgets every attempt and un-parks: an operator restart or a new spec.
    pub fn reset(&mut self) {
        self.attempts.clear();
        self.parked = false;
    }

    pub fn attempts_in_window(&mut self, spec: &RestartSpec, now: Instant) -> usize {
        self.forget_old(spec, now);
        self.attempts.len()
    }

    fn forget_old(&mut self, spec: &RestartSpec, now: Instant) {
        while let Some(first) = self.attempts.front() {
            if now.saturating_duration_since(*first) > spec.window {
                self.attempts.pop_front();
            } else {
                break;
            }
        }
    }

    /// Decides what to do about a failure at `now`; `jitter` in [0, 1) spreads
    /// restarts of many departments apart (up to +20% of the delay).
    pub fn on_failure(
        &mut self,
        spec: &RestartSpec,
        reason: &FailureReason,
        now: Instant,
        jitter: f64,
    ) -> Decision {
        let restart = !matches!(
            (spec.policy, reason),
            (RestartPolicy::Never, _)
                | (RestartPolicy::OnFailure, FailureReason::Exited { code: 0 })
        );
        if !restart {
            return Decision::LeaveStopped;
        }
        self.forget_old(spec, now);
        if self.attempts.len() >= spec.max_retries as usize {
            self.parked = true;
            return Decision::Park;
        }
        let exponent = self.attempts.len().min(30) as u32;
        self.attempts.push_back(now);
        Decision::RestartAfter(delay(spec, exponent, jitter))
    }
}

/// `backoff * 2^exponent`, capped at `backoff_max`, plus up to 20% jitter (still capped).
pub fn delay(spec: &RestartSpec, exponent: u32, jitter: f64) -> Duration {
    let base = spec
        .backoff
        .checked_mul(1u32.checked_shl(exponent).unwrap_or(u32::MAX))
        .unwrap_or(spec.backoff_max)
        .min(spec.backoff_max);
    let jitter = jitter.clamp(0.0, 1.0) * 0.2;
    base.mul_f64(1.0 + jitter)
        .min(spec.backoff_max.max(spec.backoff))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RestartSpec {
        RestartSpec::default()
    }

    #[test]
    fn delays_double_then_park_after_max_retries() {
        let spec = spec();
        let mut t = RestartTracker::default();
        let now = Instant::now();
        let exit = FailureReason::Exited { code: 1 };
        assert_eq!(
            t.on_failure(&spec, &exit, now, 0.0),
            Decision::RestartAfter(Duration::from_secs(1))
        );
        assert_eq!(
            t.on_failure(&spec, &exit, now, 0.0),
            Decision::RestartAfter(Duration::from_secs(2))
        );
        assert_eq!(
            t.on_failure(&spec, &exit, now, 0.0),
            Decision::RestartAfter(Duration::from_secs(4))
        );
        assert_eq!(t.on_failure(&spec, &exit, now, 0.0), Decision::Park);
        assert!(t.parked());
        t.reset();
        assert!(!t.parked());
    }

    #[test]
    fn old_failures_are_forgotten_after_the_window() {
        let spec = spec();
        let mut t = RestartTracker::default();
        let start = Instant::now();
        let exit = FailureReason::Exited { code: 1 };
        for _ in 0..3 {
            t.on_failure(&spec, &exit, start, 0.0);
        }
        let later = start + spec.window + Duration::from_secs(1);
        assert_eq!(
            t.on_failure(&spec, &exit, later, 0.0),
            Decision::RestartAfter(Duration::from_secs(1))
        );
    }

    #[test]
    fn policy_decides_which_exits_restart() {
        let mut spec = spec();
        let mut t = RestartTracker::default();
        let now = Instant::now();
        assert_eq!(
            t.on_failure(&spec, &FailureReason::Exited { code: 0 }, now, 0.0),
            Decision::LeaveStopped
        );
        spec.policy = RestartPolicy::Always;
        assert!(matches!(
            t.on_failure(&spec, &FailureReason::Exited { code: 0 }, now, 0.0),
            Decision::RestartAfter(_)
        ));
        spec.policy = RestartPolicy::Never;
        assert_eq!(
            t.on_failure(&spec, &FailureReason::Oom, now, 0.0),
            Decision::LeaveStopped
        );
    }

    #[test]
    fn delay_is_capped_with_jitter() {
        let mut spec = spec();
        spec.backoff_max = Duration::from_secs(5);
        assert_eq!(delay(&spec, 10, 0.0), Duration::from_secs(5));
        assert_eq!(delay(&spec, 10, 0.99), Duration::from_secs(5));
        assert!(delay(&spec, 0, 0.5) > Duration::from_secs(1));
        assert_eq!(delay(&spec, 40, 0.0), Duration::from_secs(5));
    }
}
