//! HTTP health probes. One probe task per running container sends each result
//! to the department's owner task; the task itself decides nothing. The target
//! is always the department's own published port on loopback (or the bind
//! address), redirects are never followed, and the body read is bounded.

use fleet_model::api::ProbeRecord;
use fleet_model::spec::HealthSpec;
use futures_util::StreamExt;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Most of a body a probe reads; the rest is dropped with the connection.
const MAX_BODY: usize = 64 * 1024;

/// Upper bounds (seconds) of the probe latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyHistogram {
    /// Cumulative counts per bucket of `LATENCY_BUCKETS`.
    pub buckets: [u64; 10],
    pub count: u64,
    pub sum: f64,
}

impl LatencyHistogram {
    pub fn observe(&mut self, seconds: f64) {
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap_or_default()
}

/// The probe's address: the bind address, or loopback when bound to all.
pub fn probe_host(bind: IpAddr) -> IpAddr {
    if bind.is_unspecified() {
        match bind {
            IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
            IpAddr::V6(_) => IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
        }
    } else {
        bind
    }
}

pub fn probe_url(host: IpAddr, port: u16, path: &str) -> String {
    match host {
        IpAddr::V4(v4) => format!("http://{v4}:{port}{path}"),
        IpAddr::V6(v6) => format!("http://[{v6}]:{port}{path}"),
    }
}

/// One probe: healthy only on a 2xx answer within the timeout.
pub async fn probe_once(client: &reqwest::Client, url: &str, timeout: Duration) -> ProbeRecord {
    let at_ms = crate::store::now_millis();
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, async {
        let response = client.get(url).send().await?;
        let status = response.status();
        let mut body = response.bytes_stream();
        let mut read = 0usize;
        while let Some(chunk) = body.next().await {
            read += chunk?.len();
            if read >= MAX_BODY {
                break;
            }
        }
        Ok::<_, reqwest::Error>(status)
    })
    .await;
    let latency = started.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok(Ok(status)) if status.is_success() => ProbeRecord {
            at_ms,
            ok: true,
            latency_ms: Some(latency),
            status: Some(status.as_u16()),
            error: None,
        },
        Ok(Ok(status)) => ProbeRecord {
            at_ms,
            ok: false,
            latency_ms: Some(latency),
            status: Some(status.as_u16()),
            error: Some(if status.is_redirection() {
                "redirect not followed".to_string()
            } else {
                format!("HTTP {}", status.as_u16())
            }),
        },
        Ok(Err(e)) => ProbeRecord {
            at_ms,
            ok: false,
            latency_ms: None,
            status: None,
            error: Some(short_error(&e)),
        },
        Err(_) => ProbeRecord {
            at_ms,
            ok: false,
            latency_ms: None,
            status: None,
            error: Some(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )),
        },
    }
}

fn short_error(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connection refused".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            text = s.to_string();
            source = s.source();
        }
        text
    }
}

/// Probes `url` every `health.interval` until the receiver goes away, tagging
/// each result with `generation` so the owner drops results of an old container.
pub fn spawn<M: Send + 'static>(
    client: reqwest::Client,
    url: String,
    health: HealthSpec,
    generation: u64,
    tx: mpsc::Sender<M>,
    wrap: fn(u64, ProbeRecord) -> M,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // A first look soon after start, then on the interval.
        let first = health.interval.min(Duration::from_millis(500));
        tokio::time::sleep(first).await;
        let mut ticker = tokio::time::interval(health.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let record = probe_once(&client, &url, health.timeout).await;
            if tx.send(wrap(generation, record)).await.is_err() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut h = LatencyHistogram::default();
        h.observe(0.003);
        h.observe(2.0);
        assert_eq!(h.buckets[0], 0);
        assert_eq!(h.buckets[2], 1);
        assert_eq!(h.buckets[9], 2);
        assert_eq!(h.count, 2);
    }

    #[test]
    fn urls_never_leave_the_given_host() {
        assert_eq!(
            probe_url(probe_host("0.0.0.0".parse().unwrap()), 8001, "/health"),
            "http://127.0.0.1:8001/health"
        );
        assert_eq!(
            probe_url("::1".parse().unwrap(), 8001, "/h"),
            "http://[::1]:8001/h"
        );
    }
}
