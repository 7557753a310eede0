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
    /// A tracker that remembers restarts made before it existed (by a daemon
    /// before this one, read back from Docker's events by `recovery`): the
    /// failure instants, any order. A crash loop then stays a crash loop, and
    /// a backoff goes on growing, across a daemon restart or a lost store.
    pub fn seeded(failures: impl IntoIterator<Item = Instant>) -> Self {
        let mut attempts: Vec<Instant> = failures.into_iter().collect();
        attempts.sort();
        RestartTracker {
            attempts: attempts.into(),
            parked: false,
        }
    }

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
    /// restarts of many departments apart (up to 20% shorter than the nominal delay).
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

/// `backoff * 2^exponent`, capped at `backoff_max`, minus up to 20% jitter.
///
/// The jitter only ever shortens the delay, so `backoff` and `backoff_max` are
/// upper bounds an operator can compute with (the unhealthy-restart bound of
/// issue 3 is `interval x retries + timeout + backoff`), and delays still grow:
/// the shortest delay of attempt n+1 (1.6 x nominal n) is longer than the
/// longest of attempt n.
pub fn delay(spec: &RestartSpec, exponent: u32, jitter: f64) -> Duration {
    let base = spec
        .backoff
        .checked_mul(1u32.checked_shl(exponent).unwrap_or(u32::MAX))
        .unwrap_or(spec.backoff_max)
        .min(spec.backoff_max);
    let jitter = jitter.clamp(0.0, 1.0) * 0.2;
    base.mul_f64(1.0 - jitter)
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
    fn a_seeded_tracker_goes_on_where_the_old_one_stopped() {
        let spec = spec();
        let now = Instant::now();
        let exit = FailureReason::Exited { code: 1 };
        let ago = |s| now - Duration::from_secs(s);
        // Two restarts remembered: the third failure waits 4s, the fourth parks.
        let mut t = RestartTracker::seeded([ago(20), ago(50)]);
        assert_eq!(
            t.on_failure(&spec, &exit, now, 0.0),
            Decision::RestartAfter(Duration::from_secs(4))
        );
        assert_eq!(t.on_failure(&spec, &exit, now, 0.0), Decision::Park);
        // Remembered restarts older than the window count for nothing.
        let mut old = RestartTracker::seeded([ago(700), ago(800), ago(900)]);
        assert_eq!(
            old.on_failure(&spec, &exit, now, 0.0),
            Decision::RestartAfter(Duration::from_secs(1))
        );
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
        assert!(delay(&spec, 10, 0.99) < Duration::from_secs(5));
        assert!(delay(&spec, 10, 0.99) >= Duration::from_secs(4));
        assert!(delay(&spec, 0, 0.5) < Duration::from_secs(1));
        assert_eq!(delay(&spec, 0, 0.5), Duration::from_millis(900));
        assert_eq!(delay(&spec, 40, 0.0), Duration::from_secs(5));
    }

    #[test]
    fn jittered_delays_still_grow() {
        let mut spec = spec();
        spec.backoff_max = Duration::from_secs(3600);
        for n in 0..10 {
            assert!(
                delay(&spec, n + 1, 1.0) > delay(&spec, n, 0.0),
                "attempt {n}"
            );
        }
    }
}
