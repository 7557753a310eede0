//! The pull client: one round-trip per poll to `POST {url}/v1/nodes/{node_id}/sync`
//! carrying this node's status summary, answered `304` (nothing new) or `200`
//! with a whole desired-state document. It owns the node's applied revision,
//! the ETag of the document in force, and the coordinator figures of
//! `/v1/node` and `/metrics`.
//!
//! A document is validated whole (bounded size, strict JSON, revision not
//! below the applied one, then `Supervisor::apply` with its id, capacity and
//! port checks) before any of it changes the node; a refusal is kept and
//! reported on the next sync. It must never stop or remove a container because
//! the coordinator is unreachable: a failed poll only backs off and retries,
//! and the departments keep running on the last applied specs (the supervisor
//! persists those itself).

use crate::metrics::MetricsSource;
use crate::snapshot::{NodeSnapshot, Sources};
use crate::store::{now_secs, Store, StoreError};
use crate::supervisor::SupervisorError;
use fleet_model::api::{CoordinatorStatus, DesiredState, SyncCapacity, SyncRefusal, SyncReport};
use fleet_model::config::CoordinatorConfig;
use fleet_model::spec::FieldError;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The largest desired-state document accepted (100+ departments with env and
/// secrets fit in a small fraction of this).
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// A poll that takes longer than this counts as a failure.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `stale` in `/v1/node`: no completed sync for this many poll intervals.
const STALE_AFTER_POLLS: u32 = 3;
/// The first retry after a failure; doubles up to `backoff_max`.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// An identical refused document is not re-validated (nor re-reported as a new
/// event) more often than this: refusals stay reported on every sync anyway.
const RETRY_REFUSED_AFTER: Duration = Duration::from_secs(60);

/// Request and answer header of the status digest (`status_digest`).
pub const STATUS_DIGEST: &str = "fleet-status-digest";

const META_ETAG: &str = "coordinator.etag";
const META_DOCUMENT: &str = "coordinator.document";
const META_PENDING: &str = "coordinator.pending";
const META_REVISION: &str = "applied_revision";
/// The last refusal as JSON (empty = none), so a restarted daemon still shows
/// and reports it while the coordinator is away.
const META_REFUSAL: &str = "coordinator.last_refusal";

/// Why a poll failed. Any of these only delays the next poll.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot reach the coordinator: {0}")]
    Unreachable(String),
    #[error("the coordinator answered HTTP {0}")]
    Status(u16),
    #[error("cannot read coordinator.token_file: {0}")]
    Token(String),
    #[error("cannot set up the coordinator client: {0}")]
    Client(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one completed round-trip did.
#[derive(Debug)]
enum Outcome {
    NotModified,
    Applied { revision: i64 },
    Refused,
}

/// Counters and gauges for `/metrics`, written by the client only.
#[derive(Default)]
pub struct CoordinatorMetrics {
    last_success: AtomicI64,
    failures: AtomicU64,
    refusals: AtomicU64,
    syncs: AtomicU64,
    /// Syncs sent without a body: the coordinator already held that status.
    status_omitted: AtomicU64,
    /// Highest revision any document carried, applied or not; `i64::MIN` = none.
    desired_revision: AtomicI64,
    applied_revision: AtomicI64,
    stale: AtomicBool,
}

impl CoordinatorMetrics {
    fn new() -> Self {
        let m = Self::default();
        m.desired_revision.store(i64::MIN, Ordering::Relaxed);
        m.applied_revision.store(i64::MIN, Ordering::Relaxed);
        m
    }

    pub fn render(&self, out: &mut String) {
        let mut family = |name: &str, kind: &str, help: &str, value: Option<String>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            if let Some(value) = value {
                let _ = writeln!(out, "{name} {value}");
            }
        };
        let known = |v: i64| (v != i64::MIN).then(|| v.to_string());
        let last = self.last_success.load(Ordering::Relaxed);
        family(
            "fleet_agent_coordinator_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last completed sync with the coordinator.",
            (last > 0).then(|| last.to_string()),
        );
        family(
            "fleet_agent_coordinator_syncs_total",
            "counter",
            "Completed syncs with the coordinator (304 or 200).",
            Some(self.syncs.load(Ordering::Relaxed).to_string()),
        );
        family(
            "fleet_agent_coordinator_status_omitted_total",
            "counter",
            "Syncs sent without the status body because the coordinator echoed its digest (nothing changed since).",
            Some(self.status_omitted.load(Ordering::Relaxed).to_string()),
        );
        family(
            "fleet_agent_coordinator_sync_failures_total",
            "counter",
            "Syncs that did not complete (coordinator unreachable, timed out or answered an error).",
            Some(self.failures.load(Ordering::Relaxed).to_string()),
        );
        family(
            "fleet_agent_coordinator_refusals_total",
            "counter",
            "Desired-state documents refused by this node.",
            Some(self.refusals.load(Ordering::Relaxed).to_string()),
        );
        family(
            "fleet_agent_coordinator_stale",
            "gauge",
            "1 when no sync completed for three poll intervals.",
            Some(u8::from(self.stale.load(Ordering::Relaxed)).to_string()),
        );
        family(
            "fleet_agent_desired_revision",
            "gauge",
            "Highest desired-state revision received from the coordinator.",
            known(self.desired_revision.load(Ordering::Relaxed)),
        );
        family(
            "fleet_agent_applied_revision",
            "gauge",
            "Desired-state revision in force on this node.",
            known(self.applied_revision.load(Ordering::Relaxed)),
        );
    }
}

/// Next delay after `failures` consecutive failed polls (0 = healthy): the poll
/// interval, or a doubling backoff capped at `cap`, each shortened by up to
/// `spread` of itself. `unit` is a uniform draw in [0, 1), passed in so the
/// arithmetic is testable.
pub fn next_delay(failures: u32, poll: Duration, cap: Duration, unit: f64) -> Duration {
    let (nominal, spread) = if failures == 0 {
        // Nodes restarted together must not poll in lock-step.
        (poll, 0.2)
    } else {
        let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
        (exp.min(cap), 0.5)
    };
    nominal.mul_f64(1.0 - spread * unit.clamp(0.0, 1.0))
}

/// Checks a `200` body before anything is applied: strict JSON, the whole
/// document shape, and the revision against the applied one.
pub fn parse_document(body: &[u8], applied: Option<i64>) -> Result<DesiredState, SyncRefusal> {
    let refuse = |reason: String, revision: Option<i64>| SyncRefusal {
        at: now_secs(),
        etag: None,
        revision,
        reason,
        fields: vec![],
    };
    let document: DesiredState =
        fleet_model::located::from_json_hiding_values(body).map_err(|p| {
            let at =
                p.at.map(|at| format!(" (line {}, column {})", at.line, at.column));
            refuse(
                format!(
                    "the document is not a valid desired state: {}: {}{}",
                    p.field,
                    p.message,
                    at.unwrap_or_default()
                ),
                peek_revision(body),
            )
        })?;
    if document.revision < 0 {
        return Err(refuse(
            format!("revision {} is negative", document.revision),
            Some(document.revision),
        ));
    }
    if let Some(applied) = applied {
        if document.revision < applied {
            return Err(refuse(
                format!(
                    "revision {} is lower than the applied revision {applied}",
                    document.revision
                ),
                Some(document.revision),
            ));
        }
    }
    Ok(document)
}

/// The revision of a document that failed to parse, when it has one, so the
/// coordinator can tell which of its documents was refused.
fn peek_revision(body: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Peek {
        revision: i64,
    }
    serde_json::from_slice::<Peek>(body)
        .ok()
        .map(|p| p.revision)
}

/// Reads the coordinator token: the first non-comment line of a file that only
/// its owner and group can read (the package's layout is root:fleet-agent 0640,
/// read by the daemon through its group).
fn read_token(path: &Path) -> Result<String, SyncError> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| SyncError::Token(format!("{shown}: {e}")))?;
    if meta.permissions().mode() & 0o037 != 0 {
        return Err(SyncError::Token(format!(
            "{shown} is open to others (group write or any access for others); run `chmod 640 {shown}`"
        )));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| SyncError::Token(format!("{shown}: {e}")))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .ok_or_else(|| SyncError::Token(format!("{shown} holds no token")))
}

/// The client's own state, owned by its task.
struct Client {
    config: CoordinatorConfig,
    node_id: String,
    sync_url: String,
    http: reqwest::Client,
    state: Sources,
    store: Arc<Store>,
    metrics: Arc<CoordinatorMetrics>,
    applied_revision: Option<i64>,
    etag: Option<String>,
    last_refusal: Option<SyncRefusal>,
    /// Body digest of the last refused document and when it was refused.
    refused_digest: Option<([u8; 32], Instant)>,
    /// The status digest the coordinator said it holds (its last answer's
    /// `Fleet-Status-Digest`): while the node's status still has that digest,
    /// a sync sends no body.
    status_seen: Option<String>,
    failures: u32,
    last_success: Option<Instant>,
    last_success_at: Option<i64>,
    last_attempt_at: Option<i64>,
    last_error: Option<String>,
    started: Instant,
}

/// Starts the pull client; returns its task. Call once, in coordinator mode.
pub async fn start(
    config: CoordinatorConfig,
    node_id: String,
    state: Sources,
    extra_metrics: &std::sync::RwLock<Vec<MetricsSource>>,
) -> Result<tokio::task::JoinHandle<()>, SyncError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("fleet-agentd/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| SyncError::Client(format!("{}: {e}", path.display())))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| SyncError::Client(format!("{}: {e}", path.display())))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    let http = builder
        .build()
        .map_err(|e| SyncError::Client(e.to_string()))?;
    if let Some(path) = &config.token_file {
        // Fail at start on a missing or open token file, not at the first poll.
        read_token(path)?;
    }
    let node_id = config.node_id.clone().unwrap_or(node_id);
    let store = state.supervisor.shared.store.clone();
    let metrics = Arc::new(CoordinatorMetrics::new());
    if let Ok(mut extra) = extra_metrics.write() {
        let m = metrics.clone();
        extra.push(Arc::new(move |out: &mut String| m.render(out)));
    }
    let mut client = Client {
        sync_url: format!(
            "{}/v1/nodes/{node_id}/sync",
            config.url.trim_end_matches('/')
        ),
        config,
        node_id,
        http,
        store: store.clone(),
        state,
        metrics,
        applied_revision: store.meta(META_REVISION)?.and_then(|v| v.parse().ok()),
        etag: store.meta(META_ETAG)?.filter(|v| !v.is_empty()),
        last_refusal: store
            .meta(META_REFUSAL)?
            .filter(|v| !v.is_empty())
            .and_then(|v| serde_json::from_str(&v).ok()),
        refused_digest: None,
        status_seen: None,
        failures: 0,
        last_success: None,
        last_success_at: None,
        last_attempt_at: None,
        last_error: None,
        started: Instant::now(),
    };
    client.last_error = client.last_refusal.as_ref().map(|r| r.reason.clone());
    client.finish_pending_apply().await;
    client.publish();
    Ok(tokio::spawn(client.run()))
}

impl Client {
    async fn run(mut self) {
        tracing::info!(url = %self.sync_url, poll_interval = ?self.config.poll_interval, "Coordinator client started.");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let result = self.sync_once().await;
            self.last_attempt_at = Some(now_secs());
            match result {
                Ok(outcome) => {
                    if self.failures > 0 {
                        tracing::info!(
                            failures = self.failures,
                            "The coordinator is reachable again."
                        );
                    }
                    self.failures = 0;
                    self.last_success = Some(Instant::now());
                    self.last_success_at = Some(now_secs());
                    self.last_error = self.last_refusal.as_ref().map(|r| r.reason.clone());
                    self.metrics.syncs.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .last_success
                        .store(now_secs(), Ordering::Relaxed);
                    match outcome {
                        Outcome::Applied { revision } => {
                            tracing::info!(revision, "Desired state from the coordinator in force.")
                        }
                        Outcome::NotModified | Outcome::Refused => {}
                    }
                }
                Err(e) => {
                    self.failures = self.failures.saturating_add(1);
                    self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                    let message = e.to_string();
                    // One line when it starts failing, then every tenth try.
                    if self.failures == 1 || self.failures.is_multiple_of(10) {
                        tracing::warn!(
                            error = %message,
                            failures = self.failures,
                            "Coordinator sync failed; the departments keep their last applied specs."
                        );
                    }
                    self.last_error = Some(message);
                }
            }
            self.publish();
            let delay = next_delay(
                self.failures,
                self.config.poll_interval,
                self.config.backoff_max(),
                rand::random::<f64>(),
            );
            let wake = Instant::now() + delay;
            // Keep `stale` current while sleeping through a long backoff.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    _ = tick.tick() => self.publish(),
                }
            }
        }
    }

    fn stale(&self) -> bool {
        let since = self.last_success.unwrap_or(self.started);
        since.elapsed() > self.config.poll_interval * STALE_AFTER_POLLS
    }

    /// Writes what `/v1/node` and `/metrics` show.
    fn publish(&self) {
        let stale = self.stale();
        self.metrics.stale.store(stale, Ordering::Relaxed);
        self.metrics
            .applied_revision
            .store(self.applied_revision.unwrap_or(i64::MIN), Ordering::Relaxed);
        let status = CoordinatorStatus {
            url: self.config.url.clone(),
            last_success_at: self.last_success_at,
            last_attempt_at: self.last_attempt_at,
            last_error: self.last_error.clone(),
            stale,
            consecutive_failures: u64::from(self.failures),
            last_refusal: self.last_refusal.clone(),
        };
        if let Ok(mut sync) = self.state.sync.write() {
            sync.applied_revision = self.applied_revision;
            sync.coordinator = Some(status);
        }
    }

    fn report(&self) -> SyncReport {
        let snapshot = NodeSnapshot::take(&self.state);
        let node = snapshot.node_status();
        let departments = snapshot.sync_departments();
        SyncReport {
            node_id: self.node_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            applied_revision: self.applied_revision,
            applied_etag: self.etag.clone(),
            reported_at: now_secs(),
            docker_reachable: node.docker_reachable,
            capacity: SyncCapacity {
                departments: node.departments,
                max_departments: node.max_departments,
                memory_limit_bytes: node.memory_limit_bytes,
                memory_committed_bytes: node.memory_committed_bytes,
            },
            departments,
            last_refusal: self.last_refusal.clone(),
        }
    }

    async fn sync_once(&mut self) -> Result<Outcome, SyncError> {
        let report = self.report();
        let digest = status_digest(&report);
        let mut request = self
            .http
            .post(&self.sync_url)
            .header(STATUS_DIGEST, &digest);
        // The whole status only when the coordinator does not already hold
        // it: an idle node's sync is then a request head (a lease renewal,
        // as kubelet's split of Lease from NodeStatus), while a coordinator
        // that never echoes the digest always gets the whole body.
        if self.status_seen.as_deref() == Some(digest.as_str()) {
            self.metrics.status_omitted.fetch_add(1, Ordering::Relaxed);
        } else {
            request = request.json(&report);
        }
        // Forgotten until the answer says again: a failed sync, or a
        // coordinator that lost its memory, gets the whole status next time.
        self.status_seen = None;
        if let Some(etag) = &self.etag {
            request = request.header(IF_NONE_MATCH, etag);
        }
        if let Some(path) = &self.config.token_file {
            // Read on every poll so a rotated token is picked up without a restart.
            request = request.header(AUTHORIZATION, format!("Bearer {}", read_token(path)?));
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| SyncError::Unreachable(error_chain(&e)))?;
        if matches!(response.status(), StatusCode::OK | StatusCode::NOT_MODIFIED) {
            self.status_seen = response
                .headers()
                .get(STATUS_DIGEST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        match response.status() {
            StatusCode::NOT_MODIFIED => {
                // The coordinator agrees the node has its current document:
                // the departments it does not list may now be removed.
                self.set_last_refusal(None);
                self.state.supervisor.desired_state_confirmed();
                return Ok(Outcome::NotModified);
            }
            StatusCode::OK => {}
            other => return Err(SyncError::Status(other.as_u16())),
        }
        let etag = response
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let json = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| v.starts_with("application/json"));
        let body = match read_bounded(&mut response).await? {
            Ok(body) => body,
            Err(reason) => {
                return Ok(self.refuse(SyncRefusal {
                    at: now_secs(),
                    etag,
                    revision: None,
                    reason,
                    fields: vec![],
                }))
            }
        };
        if !json {
            return Ok(self.refuse(SyncRefusal {
                at: now_secs(),
                etag,
                revision: None,
                reason: "the document's Content-Type is not application/json".into(),
                fields: vec![],
            }));
        }
        let digest: [u8; 32] = Sha256::digest(&body).into();
        if let Some((refused, at)) = &self.refused_digest {
            if *refused == digest && at.elapsed() < RETRY_REFUSED_AFTER {
                return Ok(Outcome::Refused);
            }
        }
        let document = match parse_document(&body, self.applied_revision) {
            Ok(d) => d,
            Err(mut refusal) => {
                refusal.etag = etag;
                self.refused_digest = Some((digest, Instant::now()));
                return Ok(self.refuse(refusal));
            }
        };
        self.metrics
            .desired_revision
            .fetch_max(document.revision, Ordering::Relaxed);
        match self.apply(document, etag.clone(), &body).await {
            Ok(revision) => {
                self.refused_digest = None;
                Ok(Outcome::Applied { revision })
            }
            Err(refusal) => {
                self.refused_digest = Some((digest, Instant::now()));
                Ok(self.refuse(refusal))
            }
        }
    }

    /// Applies a parsed document as one; the pending copy in the store lets a
    /// daemon killed half-way finish the job at its next start.
    async fn apply(
        &mut self,
        document: DesiredState,
        etag: Option<String>,
        body: &[u8],
    ) -> Result<i64, SyncRefusal> {
        let revision = document.revision;
        let refusal = |reason: String, fields: Vec<FieldError>| SyncRefusal {
            at: now_secs(),
            etag: etag.clone(),
            revision: Some(revision),
            reason,
            fields,
        };
        let pending = serde_json::json!({
            "etag": etag,
            "document": String::from_utf8_lossy(body),
        })
        .to_string();
        if let Err(e) = self.store.set_meta(META_PENDING, &pending) {
            return Err(refusal(format!("the node cannot store it: {e}"), vec![]));
        }
        let result = self
            .state
            .supervisor
            .apply(document.departments, true)
            .await;
        let outcome = match result {
            Ok(report) => {
                let promoted = self
                    .store
                    .set_meta(META_DOCUMENT, &String::from_utf8_lossy(body))
                    .and_then(|()| {
                        self.store
                            .set_meta(META_ETAG, etag.as_deref().unwrap_or(""))
                    })
                    .and_then(|()| self.store.set_meta(META_REVISION, &revision.to_string()));
                if let Err(e) = promoted {
                    tracing::error!(error = %e, revision, "Applied a desired state but could not record its revision.");
                }
                self.applied_revision = Some(revision);
                self.etag = etag;
                self.set_last_refusal(None);
                if !(report.created.is_empty()
                    && report.updated.is_empty()
                    && report.deleted.is_empty())
                {
                    self.state.supervisor.shared.events.record(
                        None,
                        "desired_state_applied",
                        None,
                        &format!(
                            "revision {revision} from the coordinator applied: {} created, {} updated, {} deleted, {} unchanged",
                            report.created.len(),
                            report.updated.len(),
                            report.deleted.len(),
                            report.unchanged.len()
                        ),
                    );
                }
                Ok(revision)
            }
            Err(SupervisorError::Invalid(fields)) => Err(refusal(
                format!(
                    "revision {revision} was refused and nothing changed: {}",
                    fleet_model::spec::join_fields(&fields)
                ),
                fields,
            )),
            Err(e) => Err(refusal(
                format!("revision {revision} could not be applied: {e}"),
                vec![],
            )),
        };
        if let Err(e) = self.store.set_meta(META_PENDING, "") {
            tracing::warn!(error = %e, "Could not clear the pending desired state.");
        }
        outcome
    }

    fn refuse(&mut self, refusal: SyncRefusal) -> Outcome {
        self.metrics.refusals.fetch_add(1, Ordering::Relaxed);
        if let Some(revision) = refusal.revision {
            self.metrics
                .desired_revision
                .fetch_max(revision, Ordering::Relaxed);
        }
        let repeated = self
            .last_refusal
            .as_ref()
            .is_some_and(|r| r.reason == refusal.reason && r.etag == refusal.etag);
        if !repeated {
            tracing::warn!(
                revision = refusal.revision,
                reason = %refusal.reason,
                "Refused the coordinator's desired state; the node keeps revision {}.",
                self.applied_revision.map(|r| r.to_string()).unwrap_or_else(|| "none".into())
            );
            self.state.supervisor.shared.events.record(
                None,
                "desired_state_refused",
                Some("invalid"),
                &refusal.reason,
            );
        }
        self.set_last_refusal(Some(refusal));
        Outcome::Refused
    }

    /// Keeps the last refusal in memory and in the store.
    fn set_last_refusal(&mut self, refusal: Option<SyncRefusal>) {
        if self.last_refusal == refusal {
            return;
        }
        let stored = match &refusal {
            Some(r) => serde_json::to_string(r).unwrap_or_default(),
            None => String::new(),
        };
        if let Err(e) = self.store.set_meta(META_REFUSAL, &stored) {
            tracing::warn!(error = %e, "Could not record the last refusal; it is reported until the daemon restarts.");
        }
        self.last_refusal = refusal;
    }

    /// A daemon killed in the middle of an apply left the document it was
    /// applying in the store: apply it again before the first poll.
    async fn finish_pending_apply(&mut self) {
        let pending = match self.store.meta(META_PENDING) {
            Ok(Some(p)) if !p.is_empty() => p,
            _ => return,
        };
        #[derive(serde::Deserialize)]
        struct Pending {
            etag: Option<String>,
            document: String,
        }
        let Ok(pending) = serde_json::from_str::<Pending>(&pending) else {
            let _ = self.store.set_meta(META_PENDING, "");
            return;
        };
        let body = pending.document.into_bytes();
        match parse_document(&body, self.applied_revision) {
            Ok(document) => {
                tracing::info!(
                    revision = document.revision,
                    "Finishing the desired state an earlier run was applying."
                );
                if let Err(refusal) = self.apply(document, pending.etag, &body).await {
                    tracing::warn!(reason = %refusal.reason, "The interrupted desired state is refused now.");
                }
            }
            Err(_) => {
                let _ = self.store.set_meta(META_PENDING, "");
            }
        }
    }
}

/// Reads at most `MAX_DOCUMENT_BYTES`; the inner `Err` is a refusal reason.
async fn read_bounded(
    response: &mut reqwest::Response,
) -> Result<Result<Vec<u8>, String>, SyncError> {
    let too_big = || {
        format!(
            "the document is larger than the {} KiB limit",
            MAX_DOCUMENT_BYTES / 1024
        )
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
    {
        return Ok(Err(too_big()));
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                    return Ok(Err(too_big()));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(Ok(body)),
            Err(e) => return Err(SyncError::Unreachable(error_chain(&e))),
        }
    }
}

/// reqwest's top-level message hides the cause ("error sending request"); the
/// operator needs the whole chain ("connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The digest of a status report without its `reported_at`: equal for two
/// syncs exactly when the coordinator would learn nothing new from the second.
/// Quoted, like an ETag.
pub fn status_digest(report: &SyncReport) -> String {
    let mut unstamped = report.clone();
    unstamped.reported_at = 0;
    let bytes = serde_json::to_vec(&unstamped).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    format!("\"{}\"", hex::encode(&digest[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_only_shortens() {
        let poll = Duration::from_secs(15);
        let cap = Duration::from_secs(15);
        assert_eq!(next_delay(0, poll, cap, 0.0), poll);
        assert_eq!(next_delay(0, poll, cap, 0.999).as_secs(), 12);
        assert_eq!(next_delay(1, poll, cap, 0.0), Duration::from_millis(500));
        assert_eq!(next_delay(2, poll, cap, 0.0), Duration::from_secs(1));
        assert_eq!(next_delay(5, poll, cap, 0.0), Duration::from_secs(8));
        assert_eq!(next_delay(6, poll, cap, 0.0), cap);
        assert_eq!(next_delay(u32::MAX, poll, cap, 0.0), cap);
        assert!(next_delay(6, poll, cap, 0.999) >= cap / 2);
    }

    #[test]
    fn documents_are_checked_whole_before_anything_applies() {
        let ok = br#"{"revision": 3, "departments": []}"#;
        assert_eq!(parse_document(ok, Some(3)).unwrap().revision, 3);
        let lower = parse_document(ok, Some(4)).unwrap_err();
        assert!(
            lower.reason.contains("lower than the applied revision 4"),
            "{}",
            lower.reason
        );
        assert_eq!(lower.revision, Some(3));
        let unknown =
            parse_document(br#"{"revision": 5, "departments": [], "x": 1}"#, None).unwrap_err();
        assert!(
            unknown.reason.contains("unknown field `x`"),
            "{}",
            unknown.reason
        );
        assert_eq!(unknown.revision, Some(5));
        let garbage = parse_document(b"{not json", None).unwrap_err();
        assert!(garbage.reason.contains("line 1"), "{}", garbage.reason);
        assert_eq!(garbage.revision, None);
    }

    #[test]
    fn parse_errors_do_not_echo_values() {
        let body = br#"{"revision": 1, "departments": [{"id": "a1", "image": "i", "secrets": {"K": 12345}, "container_port": "hunter2"}]}"#;
        let refusal = parse_document(body, None).unwrap_err();
        assert!(!refusal.reason.contains("hunter2"), "{}", refusal.reason);
        assert!(!refusal.reason.contains("12345"), "{}", refusal.reason);
        assert!(
            refusal
                .reason
                .contains("departments[0].secrets.K: invalid type"),
            "{}",
            refusal.reason
        );
        let body = br#"{"revision": 1, "departments": [{"id": "a1", "image": "i", "container_port": "hunter2"}]}"#;
        let refusal = parse_document(body, None).unwrap_err();
        assert!(!refusal.reason.contains("hunter2"), "{}", refusal.reason);
        assert!(
            refusal.reason.contains("departments[0].container_port"),
            "{}",
            refusal.reason
        );
    }

    #[test]
    fn metrics_render_every_family_once() {
        let m = CoordinatorMetrics::new();
        let mut out = String::new();
        m.render(&mut out);
        assert!(!out.contains("\nfleet_agent_applied_revision "));
        m.applied_revision.store(7, Ordering::Relaxed);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("\nfleet_agent_applied_revision 7\n"), "{out}");
        assert_eq!(out.matches("# TYPE").count(), 8);
    }

    #[test]
    fn the_status_digest_ignores_the_report_time_and_nothing_else() {
        let report = SyncReport {
            node_id: "n1".into(),
            agent_version: "0".into(),
            applied_revision: Some(3),
            applied_etag: Some("\"e\"".into()),
            reported_at: 1000,
            docker_reachable: true,
            capacity: SyncCapacity {
                departments: 1,
                max_departments: 10,
                memory_limit_bytes: 1 << 30,
                memory_committed_bytes: 0,
            },
            departments: vec![],
            last_refusal: None,
        };
        let digest = status_digest(&report);
        assert_eq!(digest.len(), 34, "{digest}");
        let mut later = report.clone();
        later.reported_at = 2000;
        assert_eq!(status_digest(&later), digest);
        let mut changed = report.clone();
        changed.docker_reachable = false;
        assert_ne!(status_digest(&changed), digest);
        let mut changed = report;
        changed.capacity.departments = 2;
        assert_ne!(status_digest(&changed), digest);
    }
}
