//! The read model: one `NodeSnapshot` value taken from what is already in
//! memory (the status board, the supervisor's counters and heartbeat, the
//! coordinator client's status, the host sampler). The API's `/v1/node`,
//! `/metrics` and the coordinator's sync report are all rendered from it, so
//! the three always agree and none of them imports another: `metrics` knows
//! nothing of the HTTP layer, and the coordinator builds its report without it.
//! Taking a snapshot never waits on Docker or on a department task.

use crate::host::{HostSample, HostSampler};
use crate::supervisor::board::DeptView;
use crate::supervisor::Supervisor;
use crate::systemd::Ages;
use fleet_model::api::{CoordinatorStatus, NodeStatus, StateRebuilt, SyncDepartment};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Standalone,
    Coordinator,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Standalone => "standalone",
            Mode::Coordinator => "coordinator",
        }
    }
}

/// Status the coordinator client publishes for the read model.
#[derive(Debug, Clone, Default)]
pub struct SyncStatus {
    pub applied_revision: Option<i64>,
    pub coordinator: Option<CoordinatorStatus>,
    /// Standalone mode: the last load of the spec directories (`desired.rs`).
    pub desired_state: Option<fleet_model::api::DesiredStateStatus>,
}

/// The handles a snapshot is taken from; cheap to clone.
#[derive(Clone)]
pub struct Sources {
    pub supervisor: Supervisor,
    pub started: Instant,
    pub mode: Mode,
    pub sync: Arc<RwLock<SyncStatus>>,
    pub host: HostSampler,
}

/// The supervisor's own counters, read once.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub reconcile_runs: u64,
    pub reconcile_seconds: f64,
    pub event_stream_reconnects: u64,
    pub docker_events: u64,
    pub events_dropped: u64,
}

/// Everything a reader of this node sees, at one moment.
#[derive(Debug, Clone)]
pub struct NodeSnapshot {
    pub node_id: String,
    pub mode: Mode,
    pub uptime: Duration,
    pub docker_up: bool,
    pub max_departments: usize,
    /// The configured pool, when it parses (it did at start).
    pub port_range: Option<(u16, u16)>,
    /// Host memory minus `reserved_memory`.
    pub memory_limit_bytes: u64,
    /// What admission compares with `memory_limit_bytes`: the sum of the
    /// departments' reservations (saturating).
    pub memory_committed_bytes: u64,
    pub departments: BTreeMap<String, DeptView>,
    pub counts: Counts,
    pub heartbeat: Ages,
    pub sync: SyncStatus,
    pub state_rebuilt: Option<StateRebuilt>,
    pub host: HostSample,
}

impl NodeSnapshot {
    pub fn take(sources: &Sources) -> Self {
        let supervisor = &sources.supervisor;
        let shared = &supervisor.shared;
        let departments = shared.board.all();
        let c = &shared.counters;
        let admission = crate::admission::Node::of(&shared.config, shared.host_memory_bytes);
        Self {
            node_id: shared.node_id.clone(),
            mode: sources.mode,
            uptime: sources.started.elapsed(),
            docker_up: shared.docker_up.load(Ordering::Relaxed),
            max_departments: shared.config.max_departments,
            port_range: shared.config.ports.parsed_range().ok(),
            memory_limit_bytes: shared
                .host_memory_bytes
                .saturating_sub(shared.config.reserved_memory.bytes()),
            memory_committed_bytes: departments
                .values()
                .map(|v| crate::admission::counted(&v.spec, &admission).0)
                .fold(0u64, u64::saturating_add),
            counts: Counts {
                reconcile_runs: c.reconcile_runs.load(Ordering::Relaxed),
                reconcile_seconds: c.reconcile_seconds_micros.load(Ordering::Relaxed) as f64 / 1e6,
                event_stream_reconnects: c.event_stream_reconnects.load(Ordering::Relaxed),
                docker_events: c.docker_events.load(Ordering::Relaxed),
                events_dropped: c.events_dropped.load(Ordering::Relaxed),
            },
            departments,
            heartbeat: supervisor.heartbeat.ages(),
            sync: sources.sync.read().map(|s| s.clone()).unwrap_or_default(),
            state_rebuilt: supervisor.state_rebuilt.clone(),
            host: sources.host.sample(),
        }
    }

    /// The body of `/v1/node`.
    pub fn node_status(&self) -> NodeStatus {
        let mut states = BTreeMap::new();
        for view in self.departments.values() {
            *states.entry(view.state.as_str().to_string()).or_insert(0) += 1;
        }
        NodeStatus {
            node_id: self.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.uptime.as_secs(),
            mode: self.mode.as_str().into(),
            docker_reachable: self.docker_up,
            departments: self.departments.len(),
            max_departments: self.max_departments,
            memory_limit_bytes: self.memory_limit_bytes,
            memory_committed_bytes: self.memory_committed_bytes,
            host: self.host.resources.clone(),
            applied_revision: self.sync.applied_revision,
            coordinator: self.sync.coordinator.clone(),
            states,
            desired_state: self.sync.desired_state.clone(),
            state_rebuilt: self.state_rebuilt.clone(),
        }
    }

    /// The departments as the coordinator's sync report lists them.
    pub fn sync_departments(&self) -> Vec<SyncDepartment> {
        self.departments
            .iter()
            .map(|(id, view)| SyncDepartment {
                id: id.clone(),
                state: view.state,
                health: view.health,
                restarts: view.restarts(),
                host_port: Some(view.host_port),
                image: view.spec.image.clone(),
                spec_hash: Some(view.spec_hash.clone()),
                desired_running: view.desired_running,
                reason: view.reason.clone(),
            })
            .collect()
    }
}
