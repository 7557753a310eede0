//! Bodies of the HTTP API under `/v1`, shared by the daemon (which serves them),
//! `agentctl` (which prints them) and the tests. Secrets never enter these types:
//! specs in them are always `DepartmentSpec::redacted()`.

use crate::spec::{DepartmentSpec, FieldError};
use serde::{Deserialize, Serialize};

/// The department state machine; `docs/architecture.md` draws its transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeptState {
    Pending,
    Pulling,
    Starting,
    Running,
    Backoff,
    CrashLooping,
    Updating,
    RollingBack,
    /// Out of HAProxy's rotation, finishing in-flight requests before SIGTERM.
    Draining,
    Stopped,
    Failed,
}

impl DeptState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeptState::Pending => "pending",
            DeptState::Pulling => "pulling",
            DeptState::Starting => "starting",
            DeptState::Running => "running",
            DeptState::Backoff => "backoff",
            DeptState::CrashLooping => "crash_looping",
            DeptState::Updating => "updating",
            DeptState::RollingBack => "rolling_back",
            DeptState::Draining => "draining",
            DeptState::Stopped => "stopped",
            DeptState::Failed => "failed",
        }
    }

    pub const ALL: [DeptState; 11] = [
        DeptState::Pending,
        DeptState::Pulling,
        DeptState::Starting,
        DeptState::Running,
        DeptState::Backoff,
        DeptState::CrashLooping,
        DeptState::Updating,
        DeptState::RollingBack,
        DeptState::Draining,
        DeptState::Stopped,
        DeptState::Failed,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// No probe result yet, or inside `start_period`.
    Unknown,
    Healthy,
    Unhealthy,
    /// Probing is off for this department.
    Disabled,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Disabled => "disabled",
        }
    }
}

/// One row of `agentctl status` / `GET /v1/departments`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepartmentSummary {
    pub id: String,
    pub name: Option<String>,
    pub state: DeptState,
    pub health: Health,
    pub host_port: Option<u16>,
    pub image: String,
    pub restarts: u64,
    /// Unix seconds the current container started, if running.
    pub started_at: Option<i64>,
    pub uptime_seconds: Option<u64>,
    pub container_id: Option<String>,
    pub spec_hash: Option<String>,
    /// Why the department is in its state (exit code, unhealthy, crash loop, ...).
    pub reason: Option<String>,
    /// Whether an operator stopped it; a stopped department is not restarted.
    pub desired_running: bool,
    /// The hand-over port beside `host_port` (`[ports] standby_range`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_port: Option<u16>,
    /// The drain in progress, or the last one (`[haproxy]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainStatus>,
    /// The long operation under way (an image pull), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// A container taken out of HAProxy's rotation and finishing its requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainStatus {
    /// `primary` (host_port) or `standby` (standby_port).
    pub slot: String,
    /// True while it drains; false: the last drain, finished.
    pub active: bool,
    /// Established connections to the slot's port; absent: cannot be known.
    pub connections: Option<u32>,
    /// How long it drained (so far).
    pub seconds: f64,
}

/// How far a long operation (an image pull, a base backup, a restore) is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// `pull`, `backup` or `restore`.
    pub operation: String,
    /// What it works on: the image, the backup.
    pub subject: String,
    /// Bytes moved so far (a pull: compressed layer bytes downloaded).
    pub done_bytes: u64,
    /// All it will move, once that is known (a pull: once every layer's size is).
    pub total_bytes: Option<u64>,
    /// `done_bytes` over the time since the operation began.
    pub bytes_per_second: f64,
    pub elapsed_seconds: f64,
    /// More, in words (a pull: "2 of 5 layers downloaded").
    pub detail: Option<String>,
}

impl Progress {
    /// One line for logs and plain output: `12.3MiB of 40.0MiB (30%), 2.1MiB/s, 2 of 5 layers`.
    pub fn line(&self) -> String {
        let mut out = human_bytes(self.done_bytes);
        if let Some(total) = self.total_bytes.filter(|t| *t > 0) {
            out.push_str(&format!(
                " of {} ({}%)",
                human_bytes(total),
                (self.done_bytes.min(total) * 100) / total
            ));
        }
        out.push_str(&format!(
            ", {}/s",
            human_bytes(self.bytes_per_second as u64)
        ));
        if let Some(detail) = &self.detail {
            out.push_str(", ");
            out.push_str(detail);
        }
        out
    }
}

/// `12.3MiB`: sizes as the CLI, the logs and progress lines show them.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// Unix milliseconds.
    pub at_ms: i64,
    pub ok: bool,
    pub latency_ms: Option<f64>,
    pub status: Option<u16>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartRecord {
    pub at: i64,
    pub reason: String,
    pub exit_code: Option<i64>,
}

/// `agentctl show <id>` / `GET /v1/departments/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepartmentDetail {
    #[serde(flatten)]
    pub summary: DepartmentSummary,
    pub spec: DepartmentSpec,
    pub previous_spec: Option<DepartmentSpec>,
    pub probes: Vec<ProbeRecord>,
    pub events: Vec<Event>,
    pub restart_history: Vec<RestartRecord>,
    pub postgres_check: Option<ProbeRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: i64,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub department: Option<String>,
    pub kind: String,
    pub reason: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// Pass as `after` to get what comes next.
    pub next: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortLease {
    pub port: u16,
    pub department: Option<String>,
    /// `leased`, `free`, or `busy` (held by another process).
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub version: String,
    pub uptime_seconds: u64,
    pub mode: String,
    pub docker_reachable: bool,
    pub departments: usize,
    pub max_departments: usize,
    pub memory_limit_bytes: u64,
    pub memory_committed_bytes: u64,
    pub host: HostResources,
    pub applied_revision: Option<i64>,
    pub coordinator: Option<CoordinatorStatus>,
    pub states: std::collections::BTreeMap<String, usize>,
    /// Standalone mode: how the last load of the spec directories went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_state: Option<DesiredStateStatus>,
    /// Set when this run found `state.db` lost or unreadable and rebuilt the
    /// node from Docker's labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_rebuilt: Option<StateRebuilt>,
}

/// The last load of standalone mode's desired state (`departments_dir` and the
/// applied specs), at start or SIGHUP. While it is refused the departments keep
/// their last applied specs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DesiredStateStatus {
    pub valid: bool,
    /// Why it was refused: files, line:column and fields at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Unix seconds of that load.
    pub loaded_at: i64,
}

/// How the daemon rebuilt its store at start (`/v1/node`, `agentctl doctor`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRebuilt {
    /// `corrupt` (moved aside) or `missing` (managed containers ran, no store).
    pub reason: String,
    /// Where the unreadable file was kept, for inspection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    pub at: i64,
    /// Departments rebuilt from their containers' labels.
    pub recovered: Vec<String>,
    /// Containers left as they are, with why (no spec label, hash mismatch).
    pub not_recovered: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct HostResources {
    pub cpus: usize,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub load_average_1m: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CoordinatorStatus {
    pub url: String,
    pub last_success_at: Option<i64>,
    pub last_attempt_at: Option<i64>,
    pub last_error: Option<String>,
    pub stale: bool,
    pub consecutive_failures: u64,
    /// The last document this node refused, until a later one is applied or
    /// the coordinator answers `304`; kept across daemon restarts.
    #[serde(default)]
    pub last_refusal: Option<SyncRefusal>,
}

/// Every error body of the API: one sentence, plus the fields at fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
}

/// `PUT /v1/departments` (apply a set) answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
    pub deleted: Vec<String>,
    /// The spec hash each applied department has once it runs the applied
    /// spec (`spec_hash` of `/v1/departments/{id}`). The hash is keyed with a
    /// key only the daemon holds, so a client cannot compute it; `agentctl
    /// apply --wait` compares with these.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub spec_hashes: std::collections::BTreeMap<String, String>,
}

/// The coordinator's desired state for one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    pub revision: i64,
    pub departments: Vec<DepartmentSpec>,
}

/// `POST /v1/departments/apply` body from `agentctl apply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    pub departments: Vec<DepartmentSpec>,
    /// Replace the whole set: departments not listed are deleted.
    #[serde(default)]
    pub prune: bool,
}

/// Body of `POST {coordinator}/v1/nodes/{node_id}/sync`: the node's status
/// summary, sent on every poll. No secrets: states and ids only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncReport {
    pub node_id: String,
    pub agent_version: String,
    /// Revision of the desired state in force on this node (`null`: none yet).
    pub applied_revision: Option<i64>,
    /// ETag of that document, as the coordinator sent it.
    pub applied_etag: Option<String>,
    /// Unix seconds when this report was made.
    pub reported_at: i64,
    pub docker_reachable: bool,
    pub capacity: SyncCapacity,
    pub departments: Vec<SyncDepartment>,
    /// The last document this node refused, until a later one is applied or
    /// the coordinator answers `304`.
    pub last_refusal: Option<SyncRefusal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncCapacity {
    pub departments: usize,
    pub max_departments: usize,
    pub memory_limit_bytes: u64,
    pub memory_committed_bytes: u64,
}

/// One department as reported to the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncDepartment {
    pub id: String,
    pub state: DeptState,
    pub health: Health,
    pub restarts: u64,
    pub host_port: Option<u16>,
    pub image: String,
    pub spec_hash: Option<String>,
    /// False when an operator stopped it on the node (`agentctl stop`).
    pub desired_running: bool,
    pub reason: Option<String>,
}

/// Why a desired-state document was refused. Nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRefusal {
    /// Unix seconds.
    pub at: i64,
    /// The refused document's ETag, if the coordinator sent one.
    pub etag: Option<String>,
    /// Its revision, if the document got far enough to have one.
    pub revision: Option<i64>,
    /// One sentence.
    pub reason: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
}

/// One row of `GET /v1/usage` / `agentctl top`: what the department's container
/// uses, from the daemon's stats cache (refreshed every `stats_interval`), with
/// the state, health and restarts of the status board.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepartmentUsage {
    pub id: String,
    pub state: DeptState,
    pub health: Health,
    pub restarts: u64,
    /// Share of one core over the last interval (1.0 = one core busy); `null`
    /// until two samples of the same container exist.
    pub cpu_ratio: Option<f64>,
    /// CPU time of the current container since it started.
    pub cpu_seconds: Option<f64>,
    pub memory_bytes: Option<u64>,
    /// The container's memory limit (the host's memory when it has none).
    pub memory_limit_bytes: Option<u64>,
    /// Unix milliseconds of the sample; `null` when none was taken yet.
    pub sampled_at_ms: Option<i64>,
}

/// Request header of a caller of the WAL service's `GET /v1/wal/fetch/{name}`
/// that can take a prefetched file over (agentctl `wal fetch`). A header
/// rather than a query parameter, so that an older daemon ignores it and
/// sends the bytes as before.
pub const WAL_HAND_OFF_REQUEST: &str = "x-fleet-wal-hand-off";
/// Answer header to such a caller: the prefetched file's absolute path; the
/// body is empty. Absent: the body is the segment.
pub const WAL_HAND_OFF_PATH: &str = "x-fleet-wal-path";
/// With `WAL_HAND_OFF_PATH`: the file's length, which the caller checks.
pub const WAL_HAND_OFF_LENGTH: &str = "x-fleet-wal-length";
