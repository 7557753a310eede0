//! The WAL routes, merged into the daemon's unix-socket router. Push and fetch
//! are for the PostgreSQL user (the daemon's authorisation layer lets that user
//! reach nothing else); the TCP API gets none of these routes.

use crate::backup::RestoreRequest;
use crate::service::{PushOutcome, WalError, WalService};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleet_model::api::ErrorBody;
use serde::Deserialize;
use std::sync::Arc;

impl IntoResponse for WalError {
    fn into_response(self) -> Response {
        let status = match &self {
            WalError::BadName(_) | WalError::BadRequest(_) | WalError::NoSystemId => {
                StatusCode::BAD_REQUEST
            }
            WalError::Conflict { .. } => StatusCode::CONFLICT,
            WalError::NotFound(_) => StatusCode::NOT_FOUND,
            WalError::ForeignCluster { .. } => StatusCode::FORBIDDEN,
            WalError::Target(_) => StatusCode::SERVICE_UNAVAILABLE,
            WalError::Corrupt { .. } | WalError::Postgres(_) => StatusCode::BAD_GATEWAY,
            WalError::Backup(_) | WalError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            status,
            Json(ErrorBody {
                error: self.to_string(),
                fields: vec![],
            }),
        )
            .into_response()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushQuery {
    name: String,
    system_id: Option<u64>,
    /// With an empty body: "is this exact file (device, inode, size, mtime)
    /// already archived?" `200` if so, `412` to ask for the content.
    dev: Option<u64>,
    ino: Option<u64>,
    size: Option<u64>,
    mtime_ns: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SysQuery {
    system_id: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionQuery {
    window: Option<String>,
}

/// The largest WAL file accepted (PostgreSQL's maximum segment size).
const MAX_SEGMENT: usize = 1 << 30;

pub fn router(service: Arc<WalService>) -> Router {
    Router::new()
        .route(
            "/v1/wal/push",
            post(push).layer(DefaultBodyLimit::max(MAX_SEGMENT)),
        )
        .route("/v1/wal/fetch/{name}", get(fetch))
        .route("/v1/wal", get(status))
        .route("/v1/wal/backups", get(list_backups).post(create_backup))
        .route("/v1/wal/restore", post(restore))
        .route("/v1/wal/retention", post(retention))
        .with_state(service)
}

/// `GET /v1/wal` on a node without `[wal]`: a JSON 404 saying so.
pub fn absent_router() -> Router {
    Router::new().route(
        "/v1/wal",
        get(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(ErrorBody {
                    error: "WAL archiving is not configured on this node (no [wal] in agent.toml)"
                        .into(),
                    fields: vec![],
                }),
            )
        }),
    )
}

/// What the TCP API may show: the status only.
pub fn read_router(service: Arc<WalService>) -> Router {
    Router::new()
        .route("/v1/wal", get(status))
        .with_state(service)
}

async fn push(
    State(service): State<Arc<WalService>>,
    Query(q): Query<PushQuery>,
    body: Bytes,
) -> Result<Response, WalError> {
    let sysid = service
        .resolve_sysid(q.system_id)
        .inspect_err(|e| service.fail(e))?;
    if !crate::names::is_valid(&q.name) {
        let e = WalError::BadName(q.name.clone());
        service.fail(&e);
        return Err(e);
    }
    service
        .admit(sysid, true)
        .inspect_err(|e| service.fail(e))?;
    if let (Some(dev), Some(ino), Some(size), Some(mtime_ns), true) =
        (q.dev, q.ino, q.size, q.mtime_ns, body.is_empty())
    {
        let id = crate::service::FileId {
            dev,
            ino,
            size,
            mtime_ns,
        };
        if service.archived_by_identity(sysid, &q.name, id).await {
            return Ok(Json(serde_json::json!({
                "name": q.name,
                "outcome": PushOutcome::AlreadyArchived,
            }))
            .into_response());
        }
        return Ok((
            StatusCode::PRECONDITION_FAILED,
            Json(ErrorBody {
                error: "not archived by the look-ahead yet; send the content".into(),
                fields: vec![],
            }),
        )
            .into_response());
    }
    let outcome = service.push_from_postgres(sysid, &q.name, body).await?;
    Ok(Json(serde_json::json!({ "name": q.name, "outcome": outcome })).into_response())
}

async fn fetch(
    State(service): State<Arc<WalService>>,
    Path(name): Path<String>,
    Query(q): Query<SysQuery>,
) -> Result<Response, WalError> {
    let sysid = service.resolve_sysid(q.system_id)?;
    if !crate::names::is_valid(&name) {
        return Err(WalError::BadName(name));
    }
    service
        .admit(sysid, false)
        .inspect_err(|e| service.fail(e))?;
    let content = service.fetch(sysid, &name).await.inspect_err(|e| {
        if !matches!(e, WalError::NotFound(_)) {
            service.fail(e)
        }
    })?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        content,
    )
        .into_response())
}

async fn status(State(service): State<Arc<WalService>>) -> Response {
    Json(service.status().await).into_response()
}

async fn list_backups(
    State(service): State<Arc<WalService>>,
    Query(q): Query<SysQuery>,
) -> Result<Response, WalError> {
    let sysid = service.resolve_sysid(q.system_id)?;
    Ok(Json(service.list_backups(sysid).await?).into_response())
}

async fn create_backup(State(service): State<Arc<WalService>>) -> Result<Response, WalError> {
    let manifest = service.create_backup().await.inspect_err(|e| {
        service.fail(e);
        (service.events)("wal_backup_failed", &format!("base backup failed: {e}"));
    })?;
    Ok(Json(manifest).into_response())
}

async fn restore(
    State(service): State<Arc<WalService>>,
    Json(request): Json<RestoreRequest>,
) -> Result<Response, WalError> {
    Ok(Json(service.restore(request).await?).into_response())
}

async fn retention(
    State(service): State<Arc<WalService>>,
    Query(q): Query<RetentionQuery>,
) -> Result<Response, WalError> {
    let window = match &q.window {
        Some(w) => Some(
            humantime::parse_duration(w)
                .map_err(|_| WalError::BadRequest(format!("window `{w}` is not a duration")))?,
        ),
        None => None,
    };
    Ok(Json(service.apply_retention(window).await?).into_response())
}
