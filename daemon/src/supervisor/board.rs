//! The status board: the latest view each department task published of itself.
//! Readers (API, metrics, coordinator reports) never wait on a department task
//! or on Docker; they read what the owner last wrote here.

use fleet_model::api::{DeptState, Health, ProbeRecord};
use fleet_model::DepartmentSpec;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};

#[derive(Debug, Clone)]
pub struct DeptView {
    pub spec: DepartmentSpec,
    pub previous: Option<DepartmentSpec>,
    pub host_port: u16,
    pub state: DeptState,
    pub health: Health,
    pub reason: Option<String>,
    pub container_id: Option<String>,
    pub spec_hash: String,
    pub started_at: Option<i64>,
    pub desired_running: bool,
    pub probes: VecDeque<ProbeRecord>,
    pub restarts_by_reason: BTreeMap<String, u64>,
    pub probe_total: u64,
    pub probe_failures: u64,
    /// Probe latencies (seconds) not yet folded into the metrics histogram.
    pub probe_latency_histogram: crate::supervisor::probe::LatencyHistogram,
    pub pull_progress: Option<String>,
    pub progress: Option<fleet_model::api::Progress>,
    pub postgres_check: Option<ProbeRecord>,
    /// The hand-over port (`[haproxy]` with `[ports] standby_range`).
    pub standby_port: Option<u16>,
    /// What the agent listener tells HAProxy of each port.
    pub agent: crate::drain::AgentSlots,
    /// The drain in progress, or the last one.
    pub drain: Option<DrainView>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DrainView {
    pub slot: crate::drain::Slot,
    pub since: std::time::Instant,
    /// Established connections at the last count; `None`: cannot be known.
    pub connections: Option<u32>,
    /// Set once it ended: how long it took.
    pub took: Option<std::time::Duration>,
}

impl DrainView {
    pub fn seconds(&self, now: std::time::Instant) -> f64 {
        self.took
            .unwrap_or_else(|| now.saturating_duration_since(self.since))
            .as_secs_f64()
    }
}

impl DeptView {
    pub fn restarts(&self) -> u64 {
        self.restarts_by_reason.values().sum()
    }
}

#[derive(Clone, Default)]
pub struct Board {
    inner: Arc<RwLock<BTreeMap<String, DeptView>>>,
}

impl Board {
    pub fn publish(&self, id: &str, view: DeptView) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), view);
    }

    pub fn remove(&self, id: &str) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    pub fn get(&self, id: &str) -> Option<DeptView> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub fn all(&self) -> BTreeMap<String, DeptView> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A plain view for tests of readers.
    pub(crate) fn view() -> DeptView {
        let spec = DepartmentSpec::from_toml("t", "id = \"hr\"\nimage = \"a:1\"\n").expect("spec");
        DeptView {
            spec_hash: spec.container_hash(
                8001,
                &fleet_model::spec::HashKey::from_bytes(crate::store::TEST_HASH_KEY),
            ),
            spec,
            previous: None,
            host_port: 8001,
            state: DeptState::Running,
            health: Health::Healthy,
            reason: None,
            container_id: None,
            started_at: None,
            desired_running: true,
            probes: VecDeque::new(),
            restarts_by_reason: BTreeMap::new(),
            probe_total: 0,
            probe_failures: 0,
            probe_latency_histogram: Default::default(),
            pull_progress: None,
            progress: None,
            postgres_check: None,
            standby_port: None,
            agent: Default::default(),
            drain: None,
        }
    }
}
