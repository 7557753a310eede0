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
