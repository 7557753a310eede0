//! The HTTP API: one router, two listeners. The unix socket gets everything
//! (callers classified by peer credentials); the TCP listener gets the read-only
//! routes and `/metrics` behind the token check. Errors map to statuses in one
//! exhaustive match.

pub mod tcp;
pub mod unix;

use crate::snapshot::{NodeSnapshot, Sources};
use crate::supervisor::board::DeptView;
use crate::supervisor::department::OperatorCommand;
use crate::supervisor::{Supervisor, SupervisorError};
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use fleet_model::api::{
    ApplyRequest, DepartmentDetail, DepartmentSummary, ErrorBody, EventPage, PortLease,
};
use fleet_model::spec::FieldError;
use fleet_model::DepartmentSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Who is calling, decided once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// root, the daemon's own user, or the admin group on the unix socket.
    Admin,
    /// The PostgreSQL server's user: WAL push and fetch only.
    Wal,
    /// A TCP client that passed the token check: reads only.
    Remote,
    Denied,
}

pub use crate::snapshot::{Mode, SyncStatus};

pub use crate::metrics::MetricsSource;

#[derive(Clone)]
pub struct ApiState {
    pub supervisor: Supervisor,
    pub started: Instant,
    pub mode: Mode,
    pub coordinator_url: Option<String>,
    pub sync: Arc<RwLock<SyncStatus>>,
    pub host: crate::host::HostSampler,
    pub usage: crate::usage::UsageCache,
    pub extra_metrics: Arc<RwLock<Vec<MetricsSource>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Supervisor(#[from] SupervisorError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{message}")]
    Invalid {
        message: String,
        fields: Vec<FieldError>,
    },
    #[error("no department `{0}` on this node")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Internal(String),
    #[error("Docker: {0}")]
    Runtime(#[from] crate::runtime::RuntimeError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, fields) = match self {
            ApiError::Supervisor(SupervisorError::Invalid(fields)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, fields)
            }
            ApiError::Supervisor(SupervisorError::UnknownDepartment(_)) => {
                (StatusCode::NOT_FOUND, vec![])
            }
            ApiError::Supervisor(SupervisorError::Department(_)) => (StatusCode::CONFLICT, vec![]),
            ApiError::Supervisor(SupervisorError::Store(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, vec![])
            }
            ApiError::Supervisor(SupervisorError::Gone(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, vec![])
            }
            ApiError::Supervisor(SupervisorError::Deleting(_)) => (StatusCode::CONFLICT, vec![]),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, vec![]),
            ApiError::Invalid { fields, .. } => (StatusCode::UNPROCESSABLE_ENTITY, fields),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, vec![]),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, vec![]),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, vec![]),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, vec![]),
            ApiError::Runtime(crate::runtime::RuntimeError::NotFound(_)) => {
                (StatusCode::NOT_FOUND, vec![])
            }
            ApiError::Runtime(_) => (StatusCode::BAD_GATEWAY, vec![]),
        };
        (
            status,
            Json(ErrorBody {
                error: message,
                fields,
            }),
        )
            .into_response()
    }
}

/// Routes any authenticated caller may read (unix socket and TCP).
pub fn read_routes() -> Router<ApiState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/node", get(node))
        .route("/v1/departments", get(departments))
        .route("/v1/departments/{id}", get(department))
        .route("/v1/events", get(events))
        .route("/v1/ports", get(ports))
        .route("/v1/usage", get(usage))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::map_response(json_rejections))
}

/// axum answers a bad query or path in plain text, and a wrong method with an
/// empty body; every error of this API is an `ErrorBody`, so rewrite those
/// (keeping headers such as `Allow`). `401` stays empty on purpose: it is
/// added outside these routes.
pub async fn json_rejections(response: Response) -> Response {
    let status = response.status();
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let plain = content_type
        .as_ref()
        .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"));
    if !(status.is_client_error() && (plain || content_type.is_none())) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 16 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let error = if !text.is_empty() {
        text
    } else if status == StatusCode::METHOD_NOT_ALLOWED {
        "this method is not allowed on this path; `Allow` lists those that are".to_string()
    } else {
        status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_lowercase()
    };
    let body = match serde_json::to_vec(&ErrorBody {
        error,
        fields: vec![],
    }) {
        Ok(b) => b,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

/// The TCP listener's answer to a path it does not know.
pub async fn not_served_on_tcp(request: Request) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            error: format!("no `{}` on this listener", request.uri().path()),
            fields: vec![],
        }),
    )
        .into_response()
}

/// On the TCP listener, every operation of `admin_routes` (the same paths and
/// methods) answers `403`: the listener is read-only, and saying so beats a
/// `404`/`405` that suggests the path or method does not exist at all.
pub fn socket_only_routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/apply", post(socket_only))
        .route(
            "/v1/departments/{id}",
            axum::routing::put(socket_only).delete(socket_only),
        )
        .route("/v1/departments/{id}/logs", get(socket_only))
        .route("/v1/departments/{id}/{action}", post(socket_only))
}

async fn socket_only(request: Request) -> Response {
    ApiError::Forbidden(format!(
        "`{} {}`: this listener is read-only; changes and logs are on the local control socket (agentctl)",
        request.method(),
        request.uri().path()
    ))
    .into_response()
}

/// Routes that change something or may reveal more: unix socket only.
pub fn admin_routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/apply", post(apply))
        .route(
            "/v1/departments/{id}",
            axum::routing::put(put_department).delete(delete_department),
        )
        .route("/v1/departments/{id}/logs", get(logs))
        .route("/v1/departments/{id}/prepull", post(prepull))
        .route("/v1/departments/{id}/{action}", post(command))
        .route("/v1/haproxy", get(haproxy_config))
        .layer(axum::middleware::map_response(json_rejections))
}

/// `agentctl haproxy-config`: the backend lines for this node's departments,
/// from the daemon's own view of ports and health paths.
async fn haproxy_config(State(state): State<ApiState>) -> Response {
    let shared = &state.supervisor.shared;
    let Some(haproxy) = &shared.config.haproxy else {
        return ApiError::Conflict(
            "[haproxy] is not configured in agent.toml: there is no hand-over to configure HAProxy for (docs/install.md)".into(),
        )
        .into_response();
    };
    let backends: Vec<crate::drain::Backend> = shared
        .board
        .all()
        .into_iter()
        .map(|(id, v)| crate::drain::Backend {
            id,
            port: v.host_port,
            standby_port: v.standby_port,
            health_path: v.spec.health.enabled.then(|| v.spec.health.path.clone()),
        })
        .collect();
    let text = crate::drain::haproxy_backends(&shared.node_id, shared.bind, haproxy, &backends);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// Paths the WAL caller may use; everything else is refused to it.
const WAL_PATHS: [&str; 2] = ["/v1/wal/push", "/v1/wal/fetch/"];

pub async fn authorize(
    Extension(caller): Extension<Caller>,
    request: Request,
    next: Next,
) -> Response {
    match caller {
        Caller::Admin | Caller::Remote => next.run(request).await,
        Caller::Wal => {
            let path = request.uri().path();
            if WAL_PATHS
                .iter()
                .any(|p| path == *p || (p.ends_with('/') && path.starts_with(p)))
            {
                next.run(request).await
            } else {
                ApiError::Forbidden(
                    "this socket only lets the PostgreSQL user push and fetch WAL".into(),
                )
                .into_response()
            }
        }
        Caller::Denied => (
            StatusCode::FORBIDDEN,
            Json(ErrorBody {
                error: "permission denied: use root or a member of the fleet-agent group".into(),
                fields: vec![],
            }),
        )
            .into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// JSON with an ETag; `304` when the caller already has this body.
fn tagged_json<T: Serialize>(headers: &HeaderMap, value: &T) -> Response {
    let body = match serde_json::to_vec(value) {
        Ok(b) => b,
        Err(e) => return ApiError::Internal(e.to_string()).into_response(),
    };
    let digest = Sha256::digest(&body);
    let etag = format!("\"{}\"", hex::encode(&digest[..16]));
    tagged_body(headers, etag, move || Ok(body))
}

/// `body` under a given ETag (strong `"..."` or weak `W/"..."`); it is only
/// produced when the answer is not `304`.
fn tagged_body(
    headers: &HeaderMap,
    etag: String,
    body: impl FnOnce() -> Result<Vec<u8>, serde_json::Error>,
) -> Response {
    // If-None-Match compares weakly (RFC 9110 13.1.2): `W/` is ignored.
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let ours = opaque(&etag);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| opaque(t) == ours || t.trim() == "*"));
    let etag_value = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
    if matches {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response();
    }
    let body = match body() {
        Ok(b) => b,
        Err(e) => return ApiError::Internal(e.to_string()).into_response(),
    };
    (
        StatusCode::OK,
        [
            (header::ETAG, etag_value),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        body,
    )
        .into_response()
}

pub fn summary(id: &str, view: &DeptView) -> DepartmentSummary {
    let now = crate::store::now_secs();
    DepartmentSummary {
        id: id.to_string(),
        name: view.spec.name.clone(),
        state: view.state,
        health: view.health,
        host_port: Some(view.host_port),
        image: view.spec.image.clone(),
        restarts: view.restarts(),
        started_at: view.started_at,
        uptime_seconds: view.started_at.map(|s| (now - s).max(0) as u64),
        container_id: view.container_id.clone(),
        spec_hash: Some(view.spec_hash.clone()),
        reason: view
            .pull_progress
            .clone()
            .map(|p| format!("pulling: {p}"))
            .or_else(|| view.reason.clone()),
        desired_running: view.desired_running,
        standby_port: view.standby_port,
        drain: view.drain.as_ref().map(|d| fleet_model::api::DrainStatus {
            slot: d.slot.as_str().to_string(),
            active: d.took.is_none(),
            connections: d.connections,
            seconds: d.seconds(std::time::Instant::now()),
        }),
        progress: view.progress.clone(),
    }
}

impl ApiState {
    /// The handles the read model is taken from.
    pub fn sources(&self) -> Sources {
        Sources {
            supervisor: self.supervisor.clone(),
            started: self.started,
            mode: self.mode,
            sync: self.sync.clone(),
            host: self.host.clone(),
        }
    }

    pub fn snapshot(&self) -> NodeSnapshot {
        NodeSnapshot::take(&self.sources())
    }
}

async fn node(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let mut status = state.snapshot().node_status();
    // Uptime and the host sample drift every few seconds; a weak ETag over
    // everything else lets a poller get `304` until something it acts on
    // (departments, capacity, revision, coordinator sync) changes. The tag is
    // computed first so the `304` path never serializes the whole answer.
    let uptime = std::mem::take(&mut status.uptime_seconds);
    let host = std::mem::take(&mut status.host);
    let digest = match serde_json::to_vec(&status) {
        Ok(b) => Sha256::digest(&b),
        Err(e) => return ApiError::Internal(e.to_string()).into_response(),
    };
    status.uptime_seconds = uptime;
    status.host = host;
    tagged_body(
        &headers,
        format!("W/\"{}\"", hex::encode(&digest[..16])),
        || serde_json::to_vec(&status),
    )
}

async fn departments(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let list: Vec<DepartmentSummary> = state
        .supervisor
        .shared
        .board
        .all()
        .iter()
        .map(|(id, v)| {
            let mut s = summary(id, v);
            s.uptime_seconds = None;
            s
        })
        .collect();
    tagged_json(&headers, &list)
}

async fn department(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let shared = &state.supervisor.shared;
    let view = shared
        .board
        .get(&id)
        .ok_or_else(|| ApiError::NotFound(id.clone()))?;
    let mut summary = summary(&id, &view);
    summary.uptime_seconds = None;
    let detail = DepartmentDetail {
        summary,
        spec: view.spec.clone(),
        previous_spec: view.previous.clone(),
        probes: view.probes.iter().cloned().collect(),
        events: shared.store.recent_events(&id, 20).unwrap_or_default(),
        restart_history: shared.store.restart_history(&id, 20).unwrap_or_default(),
        postgres_check: view.postgres_check.clone(),
    };
    Ok(tagged_json(&headers, &detail))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    after: i64,
    wait: Option<String>,
    department: Option<String>,
    // u32 so that what the document allows (up to 2^32 - 1) is exactly what
    // parses; the value is then clamped to a page size.
    limit: Option<u32>,
    /// The newest `tail` events instead of the oldest after `after`.
    tail: Option<u32>,
    /// Only events at or after this Unix time in milliseconds.
    since_ms: Option<i64>,
}

/// `wait` of `/v1/events`: digits and a unit, `ms` or `s` (`500ms`, `30s`),
/// the grammar `docs/openapi.yaml` gives, so a client can tell from the
/// document alone what is accepted.
pub fn parse_wait(text: &str) -> Option<Duration> {
    let (digits, millis) = match text.strip_suffix("ms") {
        Some(d) => (d, true),
        None => (text.strip_suffix('s')?, false),
    };
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(if millis {
        Duration::from_millis(n)
    } else {
        Duration::from_secs(n)
    })
}

async fn events(
    State(state): State<ApiState>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let log = &state.supervisor.shared.events;
    if q.after < 0 {
        return Err(ApiError::BadRequest(
            "after: must be 0 or a sequence number from `next`".into(),
        ));
    }
    let limit = q.limit.unwrap_or(500).clamp(1, 5000) as usize;
    let wait = match &q.wait {
        Some(w) => parse_wait(w)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "wait: `{w}` is not a duration such as \"30s\" or \"500ms\""
                ))
            })?
            .min(state.supervisor.shared.config.api.max_event_wait),
        None => Duration::ZERO,
    };
    let department = q.department.as_deref();
    if let Some(tail) = q.tail {
        // A tail is answered at once (any `wait` is not applied); a follower
        // continues with after=<next>&wait=...
        // `next` is the end of the log when the page was cut, not its last
        // event: a follower continues from there, replaying nothing.
        let upto = log.latest().max(q.after);
        let tail = tail.min(5000) as usize;
        let page = log.query((q.after, upto), department, q.since_ms, tail, true);
        return Ok(Json(EventPage {
            events: page,
            next: upto,
        })
        .into_response());
    }
    let mut rx = log.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let page = log.query((q.after, i64::MAX), department, q.since_ms, limit, false);
        if !page.is_empty() || tokio::time::Instant::now() >= deadline {
            let next = page.last().map(|e| e.seq).unwrap_or(q.after.max(0));
            return Ok(Json(EventPage { events: page, next }).into_response());
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            let next = q.after.max(0);
            return Ok(Json(EventPage {
                events: vec![],
                next,
            })
            .into_response());
        }
    }
}

async fn ports(State(state): State<ApiState>) -> Json<Vec<PortLease>> {
    let (pool, bind) = state.supervisor.port_table();
    let leases = pool.leases().clone();
    let mut out: Vec<PortLease> = (pool.low..=pool.high)
        .map(|port| match leases.get(&port) {
            Some(d) => PortLease {
                port,
                department: Some(d.clone()),
                status: "leased".into(),
            },
            None => PortLease {
                port,
                department: None,
                status: if crate::ports::port_busy(bind, port) {
                    "busy"
                } else {
                    "free"
                }
                .into(),
            },
        })
        .collect();
    // Explicit host ports outside the pool are leases too.
    for (port, d) in leases
        .iter()
        .filter(|(p, _)| **p < pool.low || **p > pool.high)
    {
        out.push(PortLease {
            port: *port,
            department: Some(d.clone()),
            status: "leased".into(),
        });
    }
    Json(out)
}

async fn usage(State(state): State<ApiState>) -> Json<Vec<fleet_model::api::DepartmentUsage>> {
    Json(state.usage.usage(&state.supervisor.shared))
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let mut text = crate::metrics::render(&state.snapshot(), &state.usage);
    if let Ok(extra) = state.extra_metrics.read() {
        for render in extra.iter() {
            render(&mut text);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn refuse_in_coordinator_mode(state: &ApiState) -> Result<(), ApiError> {
    match state.mode {
        Mode::Standalone => Ok(()),
        Mode::Coordinator => Err(ApiError::Conflict(format!(
            "this node takes its desired state from the coordinator at {}; change the department there (restart, stop and start still work here)",
            state.coordinator_url.as_deref().unwrap_or("?")
        ))),
    }
}

async fn apply(
    State(state): State<ApiState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    refuse_in_coordinator_mode(&state)?;
    let request: ApplyRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    apply_specs(&state, request.departments, request.prune).await
}

async fn apply_specs(
    state: &ApiState,
    specs: Vec<DepartmentSpec>,
    prune: bool,
) -> Result<Response, ApiError> {
    let sources = crate::desired::Sources::of(&state.supervisor.shared.config);
    let mut specs = specs;
    // A department of a hand-written file is the operator's: an apply would
    // be undone (or refused as a duplicate) at the next reload.
    for spec in specs.iter().filter(|s| s.validate().is_ok()) {
        if let Some(file) = hand_written(&sources, &spec.id)? {
            return Err(ApiError::Conflict(format!(
                "`{}` is defined by {}; edit that file and run `systemctl reload fleet-agentd` instead",
                spec.id,
                file.display()
            )));
        }
    }
    if prune {
        // --prune means "exactly these applied specs": the hand-written
        // departments are not the apply's to remove, so they stay as they run.
        let given: std::collections::BTreeSet<String> =
            specs.iter().map(|s| s.id.clone()).collect();
        for running in state.supervisor.specs() {
            if !given.contains(&running.id) && hand_written(&sources, &running.id)?.is_some() {
                specs.push(running);
            }
        }
    }
    let dir = sources.applied.clone();
    // The files are standalone mode's desired state, loaded (and pruned to) at
    // every start, so they are written before the specs take effect: a crash
    // in between leaves them ahead of the running state, never behind it (a
    // department applied but missing from the files would be deleted at the
    // next start). A refused apply puts back what was there. Specs that fail
    // validation write nothing: their ids may not be file names.
    let snapshot = if specs.iter().all(|s| s.validate().is_ok()) {
        let snapshot = crate::desired::snapshot(&dir, specs.iter().map(|s| s.id.as_str()));
        for spec in &specs {
            if hand_written(&sources, &spec.id)?.is_some() {
                continue;
            }
            if let Err(e) = crate::desired::write_spec(&dir, spec) {
                let _ = snapshot.restore();
                return Err(ApiError::Internal(e.to_string()));
            }
        }
        Some(snapshot)
    } else {
        None
    };
    let report = match state.supervisor.apply(specs, prune).await {
        Ok(report) => report,
        Err(e) => {
            if let Some(snapshot) = snapshot {
                if let Err(restore) = snapshot.restore() {
                    tracing::error!(error = %restore, "Could not put back the spec files of a refused apply.");
                }
            }
            return Err(e.into());
        }
    };
    for id in &report.deleted {
        crate::desired::remove_spec(&dir, id).map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    Ok(Json(report).into_response())
}

fn hand_written(
    sources: &crate::desired::Sources,
    id: &str,
) -> Result<Option<std::path::PathBuf>, ApiError> {
    crate::desired::hand_written_file(&sources.hand_written, id)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

async fn put_department(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    refuse_in_coordinator_mode(&state)?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest("body must be UTF-8 JSON".into()))?;
    let spec = DepartmentSpec::from_json("body", text).map_err(|e| ApiError::Invalid {
        message: format!("spec refused: {e}"),
        fields: e.fields(),
    })?;
    if spec.id != id {
        return Err(ApiError::Invalid {
            message: format!("spec id `{}` does not match the path `{id}`", spec.id),
            fields: vec![FieldError::new(
                "id",
                "must match the department in the path",
            )],
        });
    }
    apply_specs(&state, vec![spec], false).await
}

async fn delete_department(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    refuse_in_coordinator_mode(&state)?;
    let sources = crate::desired::Sources::of(&state.supervisor.shared.config);
    if !fleet_model::spec::valid_id(&id) {
        return Err(SupervisorError::UnknownDepartment(id).into());
    }
    if let Some(file) = hand_written(&sources, &id)? {
        return Err(ApiError::Conflict(format!(
            "`{id}` is defined by {}; remove that file and run `systemctl reload fleet-agentd` instead",
            file.display()
        )));
    }
    // The file goes first: a crash before the container is removed leaves a
    // department that the next start prunes, never one that comes back.
    let snapshot = crate::desired::snapshot(&sources.applied, [id.as_str()]);
    crate::desired::remove_spec(&sources.applied, &id)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    match state.supervisor.delete(&id).await {
        Ok(()) => {}
        // Its file was there but it did not run (the last load was refused):
        // removing the file was the whole delete.
        Err(SupervisorError::UnknownDepartment(_)) if snapshot.had(&id) => {}
        Err(e) => {
            if let Err(restore) = snapshot.restore() {
                tracing::error!(error = %restore, "Could not put back the spec file of a failed delete.");
            }
            return Err(e.into());
        }
    }
    Ok(Json(serde_json::json!({ "deleted": id })).into_response())
}

async fn command(
    State(state): State<ApiState>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let command = match action.as_str() {
        "start" => OperatorCommand::Start,
        "stop" => OperatorCommand::Stop,
        "restart" => OperatorCommand::Restart,
        "rollback" => OperatorCommand::Rollback,
        other => {
            return Err(ApiError::BadRequest(format!(
                "`{other}` is not an action; use start, stop, restart or rollback"
            )))
        }
    };
    let message = state.supervisor.command(&id, command).await?;
    Ok(Json(serde_json::json!({ "message": message })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrepullBody {
    image: String,
}

/// `agentctl prepull <id> <image>`: the department's next image, announced.
/// It is pulled in the background now and kept by image collection while
/// announced (until the department's spec names it, or it is deleted).
async fn prepull(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Json(body): Json<PrepullBody>,
) -> Result<Response, ApiError> {
    let shared = state.supervisor.shared.clone();
    if shared.board.get(&id).is_none() {
        return Err(ApiError::NotFound(id));
    }
    let image = body.image.trim().to_string();
    if let Err(problem) = crate::imagegc::check_reference(&image) {
        return Err(ApiError::Invalid {
            message: format!("image: {problem}"),
            fields: vec![FieldError::new("image", problem)],
        });
    }
    let message = crate::imagegc::prepull(shared, &id, &image)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "message": message })),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    tail: Option<usize>,
    #[serde(default)]
    follow: bool,
    /// Unix seconds.
    since: Option<i64>,
    #[serde(default)]
    timestamps: bool,
}

async fn logs(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let view = state
        .supervisor
        .shared
        .board
        .get(&id)
        .ok_or_else(|| ApiError::NotFound(id.clone()))?;
    let container = view
        .container_id
        .ok_or_else(|| ApiError::Conflict(format!("department `{id}` has no container yet")))?;
    let stream = state.supervisor.shared.runtime.logs(
        &container,
        &crate::runtime::LogQuery {
            tail: q.tail,
            follow: q.follow,
            since_secs: q.since,
            timestamps: q.timestamps,
        },
    );
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_takes_exactly_the_documented_grammar() {
        assert_eq!(parse_wait("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_wait("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_wait("0s"), Some(Duration::ZERO));
        assert_eq!(
            parse_wait("999999999s"),
            Some(Duration::from_secs(999_999_999))
        );
        for bad in [
            "",
            "s",
            "ms",
            "30",
            "1m",
            "1h 30m",
            "-1s",
            "+1s",
            "1000000000s",
            " 1s",
            "1s\n",
            "\u{a6}",
        ] {
            assert_eq!(parse_wait(bad), None, "{bad:?}");
        }
    }
}
