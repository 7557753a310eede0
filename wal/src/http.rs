//! The WAL routes, merged into the daemon's unix-socket router. Push and fetch
//! are for the PostgreSQL user (the daemon's authorisation layer lets that user
//! reach nothing else); the TCP API gets none of these routes.

use crate::backup::RestoreRequest;
use crate::service::{Fetched, PushOutcome, PushServed, WalError, WalService};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fleet_model::api::{ErrorBody, WAL_HAND_OFF_LENGTH, WAL_HAND_OFF_PATH, WAL_HAND_OFF_REQUEST};
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
            WalError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            WalError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        let busy = matches!(self, WalError::Busy { .. });
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
                fields: vec![],
            }),
        )
            .into_response();
        if busy {
            // A target failure is also 503, without this header: only a busy
            // service tells the caller when to come back.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
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

pub fn router(service: Arc<WalService>) -> Router {
    Router::new()
        .route(
            "/v1/wal/push",
            // The body is streamed, and bounded by push_limit in the handler.
            post(push).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/wal/fetch/{name}", get(fetch))
        .route("/v1/wal", get(status))
        .route("/v1/wal/backups", get(list_backups).post(create_backup))
        .route("/v1/wal/restore", post(restore))
        .route("/v1/wal/retention", post(retention))
        .route("/v1/wal/verify", post(verify))
        .route("/v1/wal/drill", post(drill))
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
    headers: HeaderMap,
    body: Body,
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
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        // HTTP/1 without Content-Length or chunking is an empty body (agentctl's
        // identity question); hyper reports that as an exact size of 0.
        .or_else(|| axum::body::HttpBody::size_hint(&body).exact());
    if let (Some(dev), Some(ino), Some(size), Some(mtime_ns), Some(0)) =
        (q.dev, q.ino, q.size, q.mtime_ns, length)
    {
        let id = crate::service::FileId {
            dev,
            ino,
            size,
            mtime_ns,
        };
        let answered = |outcome: PushOutcome, served: PushServed| {
            service.count_push(served);
            Json(serde_json::json!({ "name": q.name, "outcome": outcome })).into_response()
        };
        if service.archived_by_identity(sysid, &q.name, id).await {
            return Ok(answered(
                PushOutcome::AlreadyArchived,
                PushServed::LookAhead,
            ));
        }
        if let Some(outcome) = service.archive_named(sysid, &q.name, id).await {
            return Ok(answered(outcome?, PushServed::PgWal));
        }
        // The look-ahead may have started it between the two questions.
        if service.archived_by_identity(sysid, &q.name, id).await {
            return Ok(answered(
                PushOutcome::AlreadyArchived,
                PushServed::LookAhead,
            ));
        }
        return Ok((
            StatusCode::PRECONDITION_FAILED,
            Json(ErrorBody {
                error: "not archived ahead, and not a file this service may read in pg_wal_dir; send the content".into(),
                fields: vec![],
            }),
        )
            .into_response());
    }
    // The length is checked before a byte is read, so an oversized or
    // unannounced body costs nothing; the body itself is never gathered: it
    // goes piece by piece into the pass that hashes and compresses it.
    let limit = service.push_limit();
    let length = match length {
        Some(n) if n <= limit => n,
        Some(n) => {
            let e = WalError::TooLarge(format!(
                "`{}` is {n} bytes; a WAL file here is at most {limit} bytes (the cluster's segment size)",
                q.name
            ));
            service.fail(&e);
            return Err(e);
        }
        None => {
            return Err(WalError::BadRequest(
                "a push needs a Content-Length (agentctl wal push sends one)".into(),
            ))
        }
    };
    let _permit = service.push_permit().inspect_err(|e| service.fail(e))?;
    let stream = futures_util::TryStreamExt::map_err(body.into_data_stream(), |e| {
        std::io::Error::other(e.to_string())
    });
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let content = crate::service::Content::Stream(Box::new(std::io::Read::take(reader, length)));
    let outcome = service.push_from_postgres(sysid, &q.name, content).await?;
    service.count_push(PushServed::Content);
    Ok(Json(serde_json::json!({ "name": q.name, "outcome": outcome })).into_response())
}

async fn fetch(
    State(service): State<Arc<WalService>>,
    Path(name): Path<String>,
    Query(q): Query<SysQuery>,
    headers: HeaderMap,
) -> Result<Response, WalError> {
    // The same checks as for the bytes: a hand-off goes only to a caller
    // already admitted for this cluster, and only names a file in its
    // prefetch directory (the name is a validated WAL name, no `/`).
    let sysid = service.resolve_sysid(q.system_id)?;
    if !crate::names::is_valid(&name) {
        return Err(WalError::BadName(name));
    }
    service
        .admit(sysid, false)
        .inspect_err(|e| service.fail(e))?;
    let hand_off = headers.get(WAL_HAND_OFF_REQUEST).is_some_and(|v| v == "1");
    let fetched = service
        .fetch_or_hand_off(sysid, &name, hand_off)
        .await
        .inspect_err(|e| {
            if !matches!(e, WalError::NotFound(_)) {
                service.fail(e)
            }
        })?;
    let content = match fetched {
        Fetched::Content(content) => content,
        Fetched::HandOff { path, length } => {
            use std::os::unix::ffi::OsStrExt;
            match header::HeaderValue::from_bytes(path.as_os_str().as_bytes()) {
                Ok(value) => {
                    return Ok((
                        [
                            (header::HeaderName::from_static(WAL_HAND_OFF_PATH), value),
                            (
                                header::HeaderName::from_static(WAL_HAND_OFF_LENGTH),
                                header::HeaderValue::from(length),
                            ),
                        ],
                        "",
                    )
                        .into_response())
                }
                // A state directory whose path is not a header value: the bytes.
                Err(_) => tokio::fs::read(&path)
                    .await
                    .map_err(|e| WalError::Internal(format!("{}: {e}", path.display())))?,
            }
        }
    };
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

async fn verify(
    State(service): State<Arc<WalService>>,
    Query(q): Query<SysQuery>,
) -> Result<Response, WalError> {
    Ok(Json(service.verify(q.system_id).await?).into_response())
}

async fn drill(
    State(service): State<Arc<WalService>>,
    Json(request): Json<crate::drill::DrillRequest>,
) -> Result<Response, WalError> {
    Ok(Json(service.drill(request).await?).into_response())
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use bytes::Bytes;
    use tower::ServiceExt;

    /// A service whose `pg_wal_dir` holds one 1 MiB segment (so pushes are
    /// capped at 1 MiB) with `parallel_uploads = 2`.
    fn service(dir: &std::path::Path) -> Arc<WalService> {
        let pg_wal = dir.join("pg_wal");
        std::fs::create_dir_all(pg_wal.join("archive_status")).expect("pg_wal");
        std::fs::write(pg_wal.join("000000010000000000000001"), vec![0u8; 1 << 20])
            .expect("segment");
        std::fs::create_dir_all(dir.join("archive")).expect("archive");
        let config: fleet_model::config::WalConfig = toml::from_str(&format!(
            "target = \"file://{}\"\npg_wal_dir = \"{}\"\nparallel_uploads = 2",
            dir.join("archive").display(),
            pg_wal.display()
        ))
        .expect("config");
        WalService::new(config, dir, Arc::new(|_: &str, _: &str| {})).expect("service")
    }

    type Chunk = Result<Bytes, std::io::Error>;

    /// A body that yields what is sent on the channel, and ends when it closes.
    fn slow_body() -> (tokio::sync::mpsc::Sender<Chunk>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        (tx, Body::from_stream(stream))
    }

    fn push(name: &str, length: u64, body: Body) -> Request<Body> {
        Request::post(format!("/v1/wal/push?name={name}&system_id=7"))
            .header(header::CONTENT_LENGTH, length)
            .body(body)
            .expect("request")
    }

    #[tokio::test]
    async fn a_push_larger_than_a_segment_is_refused_before_its_body_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let router = router(service(dir.path()));
        // The body never arrives: a refusal that waited for it would hang.
        let (_tx, body) = slow_body();
        let response = router
            .clone()
            .oneshot(push("000000010000000000000002", (1 << 20) + 1, body))
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Exactly the segment size is a segment.
        let response = router
            .oneshot(push(
                "000000010000000000000002",
                1 << 20,
                Body::from(vec![1u8; 1 << 20]),
            ))
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn pushes_beyond_parallel_uploads_are_told_to_retry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let service = service(dir.path());
        let router = router(service.clone());
        // Two pushes whose bodies arrive slowly hold both slots.
        let mut senders = Vec::new();
        let mut calls = Vec::new();
        for i in 2..4 {
            let (tx, body) = slow_body();
            senders.push(tx);
            let request = push(&format!("00000001000000000000000{i}"), 8, body);
            calls.push(tokio::spawn(router.clone().oneshot(request)));
        }
        while service.push_calls.available_permits() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let response = router
            .clone()
            .oneshot(push(
                "000000010000000000000004",
                8,
                Body::from(vec![4u8; 8]),
            ))
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response
                .headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        // Once the slow bodies are complete, the retried push goes through.
        for tx in &senders {
            tx.try_send(Ok(Bytes::from(vec![9u8; 8]))).expect("send");
        }
        drop(senders);
        for call in calls {
            let answer = call.await.expect("task").expect("answer");
            assert_eq!(answer.status(), StatusCode::OK);
        }
        let response = router
            .oneshot(push(
                "000000010000000000000004",
                8,
                Body::from(vec![4u8; 8]),
            ))
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            service
                .counters
                .failures
                .lock()
                .map(|f| f.get("busy").copied())
                .ok()
                .flatten(),
            Some(1)
        );
    }

    /// archive_command's identity question for `path`, as agentctl asks it.
    fn identity_question(name: &str, path: &std::path::Path, sysid: u64) -> Request<Body> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path).expect("stat");
        Request::post(format!(
            "/v1/wal/push?name={name}&system_id={sysid}&dev={}&ino={}&size={}&mtime_ns={}",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
        ))
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .expect("request")
    }

    async fn answer(router: &Router, request: Request<Body>) -> (StatusCode, serde_json::Value) {
        let response = router.clone().oneshot(request).await.expect("answer");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    #[tokio::test]
    async fn a_segment_the_look_ahead_has_not_reached_is_archived_from_pg_wal_by_its_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No look-ahead runs: the service is not started.
        let (service, pg_wal) = crate::service::cluster_77_service(dir.path());
        let archive = dir.path().join("archive");
        let segment: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let first = "000000010000000000000001";
        std::fs::write(pg_wal.join(first), &segment).expect("segment");
        let router = router(service.clone());

        let (status, body) =
            answer(&router, identity_question(first, &pg_wal.join(first), 77)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["outcome"], "stored");
        let object = std::fs::read(archive.join(format!("77/wal/{first}.zst"))).expect("object");
        assert_eq!(crate::codec::decode(&object).expect("decode"), segment);
        // Asked again (the archiver's retry after a crash): known by identity.
        let (status, body) =
            answer(&router, identity_question(first, &pg_wal.join(first), 77)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["outcome"], "already_archived");
        let mut metrics = String::new();
        service.render_metrics(&mut metrics);
        for (served, count) in [("look_ahead", 1), ("pg_wal", 1), ("content", 0)] {
            let line =
                format!("\nfleet_agent_wal_push_calls_total{{served=\"{served}\"}} {count}\n");
            assert!(metrics.contains(&line), "{line} in {metrics}");
        }

        // A file elsewhere under the same name is not the pg_wal file: send the content.
        let second = "000000010000000000000002";
        std::fs::write(pg_wal.join(second), &segment).expect("segment");
        let elsewhere = dir.path().join(second);
        std::fs::write(&elsewhere, &segment).expect("copy");
        let (status, _) = answer(&router, identity_question(second, &elsewhere, 77)).await;
        assert_eq!(status, StatusCode::PRECONDITION_FAILED);
        // A symlink planted in pg_wal is never followed.
        let third = "000000010000000000000003";
        std::os::unix::fs::symlink(&elsewhere, pg_wal.join(third)).expect("symlink");
        let (status, _) = answer(&router, identity_question(third, &elsewhere, 77)).await;
        assert_eq!(status, StatusCode::PRECONDITION_FAILED);
        assert!(!archive.join(format!("77/wal/{second}.zst")).exists());
        assert!(!archive.join(format!("77/wal/{third}.zst")).exists());
    }
}
