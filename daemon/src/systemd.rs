//! systemd's notify protocol (`Type=notify`): READY once the socket is bound and
//! the store open, STATUS lines, STOPPING, and the watchdog. Outside systemd (no
//! `NOTIFY_SOCKET`) every call is a no-op.
//!
//! The watchdog is not fed by any one loop: the Docker event loop and the resync
//! loop each stamp a [`Heartbeat`], and a task of its own sends `WATCHDOG=1`
//! every half `WatchdogSec` only while both stamps are fresh. So a wedged loop
//! gets the daemon restarted, while a slow Docker call (bounded by the resync
//! pass limit) or a busy department task never holds the ping up.

use sd_notify::NotifyState;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

pub fn reloading() {
    let _ = sd_notify::notify(&[NotifyState::Reloading]);
}

fn watchdog() {
    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
}

/// `WatchdogSec` of the unit, when systemd asked this process for pings.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// The longest a resync pass may take before it is abandoned (and retried at
/// the next tick): a hung Docker `list` must not stop the loop's heartbeat.
pub fn resync_pass_limit(resync_interval: Duration) -> Duration {
    resync_interval.min(Duration::from_secs(10))
}

/// How old the resync loop's stamp may be while the loop is healthy: one
/// interval of waiting, one pass at its limit, and some slack.
pub fn resync_stale_after(resync_interval: Duration) -> Duration {
    resync_interval + resync_pass_limit(resync_interval) + Duration::from_secs(2)
}

/// The event loop stamps every second while it waits for events, and at
/// least every ~10 s (a 5 s ping plus a 5 s retry delay) while Docker is away.
pub const EVENT_LOOP_BEAT: Duration = Duration::from_secs(1);
pub const EVENT_LOOP_STALE_AFTER: Duration = Duration::from_secs(15);

/// Refuses a `resync_interval` with which a healthy resync loop could go
/// quiet for longer than `WatchdogSec`.
pub fn check_resync_interval(resync_interval: Duration, watchdog: Duration) -> Result<(), String> {
    if EVENT_LOOP_STALE_AFTER > watchdog {
        return Err(format!(
            "the unit's WatchdogSec = {} is shorter than the {} within which the Docker event loop proves itself alive (while Docker is away it waits up to 5s per attempt); set WatchdogSec to at least {}",
            humantime::format_duration(watchdog),
            humantime::format_duration(EVENT_LOOP_STALE_AFTER),
            humantime::format_duration(EVENT_LOOP_STALE_AFTER),
        ));
    }
    if resync_stale_after(resync_interval) > watchdog {
        let room =
            watchdog.saturating_sub(resync_pass_limit(resync_interval) + Duration::from_secs(2));
        return Err(format!(
            "resync_interval = {} is too long for the unit's WatchdogSec = {}: the resync loop proves itself alive once per interval plus one pass (at most {}), which must fit in WatchdogSec; set resync_interval to at most {} or raise WatchdogSec",
            humantime::format_duration(resync_interval),
            humantime::format_duration(watchdog),
            humantime::format_duration(resync_pass_limit(resync_interval)),
            humantime::format_duration(room),
        ));
    }
    Ok(())
}

/// When each supervised loop last proved it runs, in milliseconds since the
/// heartbeat was made.
pub struct Heartbeat {
    origin: Instant,
    event_loop_ms: AtomicU64,
    resync_ms: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            event_loop_ms: AtomicU64::new(0),
            resync_ms: AtomicU64::new(0),
        }
    }
}

/// The two loops' stamp ages, for the decision and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ages {
    pub event_loop: Duration,
    pub resync: Duration,
}

impl Heartbeat {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub fn event_loop_alive(&self) {
        self.event_loop_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn resync_alive(&self) {
        self.resync_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    pub fn ages(&self) -> Ages {
        let now = self.now_ms();
        let age = |stamp: &AtomicU64| {
            Duration::from_millis(now.saturating_sub(stamp.load(Ordering::Relaxed)))
        };
        Ages {
            event_loop: age(&self.event_loop_ms),
            resync: age(&self.resync_ms),
        }
    }
}

/// Whether the daemon may tell systemd it is alive: both loops stamped
/// within what a healthy loop needs.
pub fn alive(ages: Ages, resync_interval: Duration) -> bool {
    ages.event_loop <= EVENT_LOOP_STALE_AFTER && ages.resync <= resync_stale_after(resync_interval)
}

/// Pings the watchdog every half `interval` while [`alive`] says so; logs
/// (once per episode) when it withholds the ping.
pub async fn feed_watchdog(
    heartbeat: std::sync::Arc<Heartbeat>,
    interval: Duration,
    resync_interval: Duration,
) {
    let mut ticker = tokio::time::interval(interval / 2);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withheld = false;
    loop {
        ticker.tick().await;
        let ages = heartbeat.ages();
        if alive(ages, resync_interval) {
            watchdog();
            withheld = false;
        } else if !withheld {
            withheld = true;
            tracing::error!(
                event_loop_age_ms = ages.event_loop.as_millis() as u64,
                resync_age_ms = ages.resync.as_millis() as u64,
                "A supervision loop stopped making progress; withholding the watchdog ping so systemd restarts the daemon."
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_loop_withholds_the_ping() {
        let ri = Duration::from_secs(10);
        let fresh = Ages {
            event_loop: Duration::from_secs(1),
            resync: Duration::from_secs(12),
        };
        assert!(alive(fresh, ri));
        assert!(!alive(
            Ages {
                event_loop: Duration::from_secs(16),
                ..fresh
            },
            ri
        ));
        // interval + pass limit (10s) + 2s slack
        assert!(alive(
            Ages {
                resync: Duration::from_secs(22),
                ..fresh
            },
            ri
        ));
        assert!(!alive(
            Ages {
                resync: Duration::from_secs(23),
                ..fresh
            },
            ri
        ));
    }

    #[test]
    fn resync_interval_must_fit_in_watchdog_sec() {
        let wd = Duration::from_secs(60);
        assert!(check_resync_interval(Duration::from_secs(10), wd).is_ok());
        assert!(check_resync_interval(Duration::from_secs(48), wd).is_ok());
        let err = check_resync_interval(Duration::from_secs(49), wd).unwrap_err();
        assert!(err.contains("resync_interval = 49s"), "{err}");
        assert!(err.contains("at most 48s"), "{err}");
        let err =
            check_resync_interval(Duration::from_secs(1), Duration::from_secs(10)).unwrap_err();
        assert!(err.contains("WatchdogSec = 10s is shorter"), "{err}");
    }

    #[test]
    fn stamps_make_ages_small() {
        let hb = Heartbeat::default();
        hb.event_loop_alive();
        hb.resync_alive();
        let ages = hb.ages();
        assert!(ages.event_loop < Duration::from_secs(1));
        assert!(ages.resync < Duration::from_secs(1));
    }
}
