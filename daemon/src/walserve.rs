//! The WAL service on its own: `fleet-agentd wal-serve`, which the packaged
//! `fleet-agent-wal.service` runs as the PostgreSQL user. Everything that needs
//! PostgreSQL's rights (reading `pg_wal`, `pg_basebackup` over peer auth,
//! unpacking a restore into a data directory owned by postgres) runs there, so
//! Debian's defaults stay as they are and fleet-agentd keeps its own sandbox.
//!
//! Its socket carries the WAL routes and `/metrics` only, under the control
//! socket's peer-credential rules: root and the admin group may do everything
//! there, the PostgreSQL user (this process's own user) push and fetch only,
//! anyone else nothing. Base backups, restores, retention and status are the
//! operator's, as on fleet-agentd's socket.
//!
//! With `wal.socket` set, fleet-agentd does not run the service itself: its
//! `/v1/wal` is answered from this socket and its `/metrics` carries the WAL
//! families read from here every few seconds (`remote`), so a scrape never
//! waits on the WAL service.

use crate::api;
use crate::daemon::RunError;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fleet_model::api::ErrorBody;
use fleet_model::config::{ConfigSource, WalConfig, SYSTEM_WAL_SOCKET_PATH};
use fleet_model::Config;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The S3 credentials file beside the config copy the unit hands over
/// (`/run/fleet-agent-wal/s3-credentials`), used instead of
/// `wal.s3.credentials_file`, which the PostgreSQL user cannot read.
pub const S3_CREDENTIALS: &str = "s3-credentials";

/// Said when fleet-agentd cannot run the WAL service itself: without root it
/// lacks PostgreSQL's rights (pg_wal, peer auth, data directories).
pub fn inline_hint() -> String {
    if nix::unistd::geteuid().is_root() {
        return String::new();
    }
    format!(
        " (fleet-agentd runs as uid {} and lacks PostgreSQL's rights: set wal.socket = \"{SYSTEM_WAL_SOCKET_PATH}\" and run `systemctl enable --now fleet-agent-wal`; docs/wal.md)",
        nix::unistd::geteuid()
    )
}

/// The socket `wal-serve` listens on.
pub fn socket_of(wal: &WalConfig) -> PathBuf {
    wal.socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(SYSTEM_WAL_SOCKET_PATH))
}

/// Where the WAL service keeps its caches (prefetch, backup temp files):
/// systemd's `StateDirectory=` when set, else the configured state directory.
fn state_dir(config: &Config) -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .filter(|v| !v.is_empty())
        // STATE_DIRECTORY may list several, separated by ':'; the first is ours.
        .and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| config.state_dir.clone())
}

/// The S3 credentials the unit handed over, when it did.
fn credential_override(wal: &mut WalConfig, source: &ConfigSource) {
    let ConfigSource::File(config) = source else {
        return;
    };
    let Some(file) = config.parent().map(|dir| dir.join(S3_CREDENTIALS)) else {
        return;
    };
    if let (Some(s3), true) = (wal.s3.as_mut(), file.is_file()) {
        s3.credentials_file = Some(file);
    }
}

pub async fn serve(config: Config, source: ConfigSource) -> Result<(), RunError> {
    let Some(mut wal) = config.wal.clone() else {
        return Err(RunError::Config(
            "wal-serve: agent.toml has no [wal] table (docs/wal.md)".into(),
        ));
    };
    if wal.socket.is_none() {
        tracing::warn!(
            "wal.socket is not set: fleet-agentd runs a WAL service of its own too; set wal.socket = \"{SYSTEM_WAL_SOCKET_PATH}\" in agent.toml and restart fleet-agentd (docs/wal.md)."
        );
    }
    credential_override(&mut wal, &source);
    let socket = socket_of(&wal);
    let state_dir = state_dir(&config);
    std::fs::create_dir_all(&state_dir).map_err(|e| {
        RunError::Config(format!(
            "wal-serve: cannot create {}: {e}",
            state_dir.display()
        ))
    })?;
    // No event store here: WAL events go to the journal with the same EVENT=
    // field fleet-agentd uses (`journalctl -u fleet-agent-wal EVENT=wal_backup_created`).
    let sink: fleet_wal::EventSink = Arc::new(|kind: &str, message: &str| {
        if kind.ends_with("_failed") || kind == "wal_conflict" || kind == "wal_valve_open" {
            tracing::warn!(event = kind, "{message}");
        } else {
            tracing::info!(event = kind, "{message}");
        }
    });
    let service = fleet_wal::WalService::new(wal.clone(), &state_dir, sink)
        .map_err(|e| RunError::Config(format!("wal: {e}")))?;
    let metrics_service = service.clone();
    let router: Router = fleet_wal::http::router(service.clone())
        .route(
            "/metrics",
            get(move || {
                let service = metrics_service.clone();
                async move {
                    let mut text = String::new();
                    service.render_metrics(&mut text);
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
        .layer(axum::middleware::from_fn(api::authorize));
    // The same rules as the control socket, with one difference: this
    // process's own user is the PostgreSQL user, and it gets only what the
    // PostgreSQL user gets there (push and fetch), not everything.
    let policy =
        api::unix::Policy::resolve(&config.admin_group, Some(&wal.postgres_user)).without_own_uid();
    let listener = api::unix::bind(&socket)?;
    let mut tasks = service.spawn_background();
    tasks.push(tokio::spawn(api::unix::serve(
        listener,
        router,
        policy,
        api::unix::SocketLimits::default(),
    )));
    tracing::info!(
        target = %service.target.describe(),
        socket = %socket.display(),
        "WAL service listening."
    );
    crate::systemd::ready(&format!("archiving WAL to {}", service.target.describe()));

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    crate::systemd::stopping();
    for task in tasks {
        task.abort();
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// fleet-agentd's view of a WAL service that runs on its own.
#[derive(Clone)]
pub struct Remote {
    socket: PathBuf,
    /// The WAL families as last read, and whether that read worked.
    metrics: Arc<RwLock<(String, bool)>>,
}

/// How often fleet-agentd copies the WAL service's metrics.
const METRICS_EVERY: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl Remote {
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            metrics: Arc::new(RwLock::new((String::new(), false))),
        }
    }

    /// Keeps the copy of the WAL metrics fresh.
    pub fn spawn(&self) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let read = get_over_unix(&me.socket, "/metrics").await;
                if let Ok(mut m) = me.metrics.write() {
                    *m = match read {
                        Ok((StatusCode::OK, body)) => {
                            (String::from_utf8_lossy(&body).into_owned(), true)
                        }
                        _ => (String::new(), false),
                    };
                }
                tokio::time::sleep(METRICS_EVERY).await;
            }
        })
    }

    pub fn render_metrics(&self, out: &mut String) {
        let (text, up) = self.metrics.read().map(|m| m.clone()).unwrap_or_default();
        out.push_str(&text);
        out.push_str(
            "# HELP fleet_agent_wal_service_up Whether fleet-agentd could read the WAL service's metrics (fleet-agent-wal.service) at its last try.\n# TYPE fleet_agent_wal_service_up gauge\n",
        );
        out.push_str(&format!("fleet_agent_wal_service_up {}\n", u8::from(up)));
    }

    /// `GET /v1/wal` answered by the WAL service (the TCP API's share).
    pub fn status_router(&self) -> Router {
        Router::new()
            .route("/v1/wal", get(remote_status))
            .with_state(self.clone())
    }

    /// The unix socket's share: the status, and the other WAL routes refused
    /// with the socket to use.
    pub fn router(&self) -> Router {
        self.status_router().merge(
            Router::new()
                .route("/v1/wal/{*rest}", axum::routing::any(elsewhere))
                .with_state(self.clone()),
        )
    }
}

async fn remote_status(State(remote): State<Remote>) -> Response {
    match get_over_unix(&remote.socket, "/v1/wal").await {
        Ok((status, body)) => (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => unreachable_wal(&remote.socket, &e),
    }
}

/// 503, not 404: to `agentctl wal fetch` a 404 means "not archived", which
/// would end a recovery early.
async fn elsewhere(State(remote): State<Remote>) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(ErrorBody {
            error: format!(
                "the WAL service runs on its own (fleet-agent-wal.service); use its socket {} (agentctl's wal, backup and restore commands find it)",
                remote.socket.display()
            ),
            fields: vec![],
        }),
    )
        .into_response()
}

fn unreachable_wal(socket: &Path, error: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(ErrorBody {
            error: format!(
                "the WAL service is not reachable at {} ({error}); is fleet-agent-wal.service running? (systemctl status fleet-agent-wal)",
                socket.display()
            ),
            fields: vec![],
        }),
    )
        .into_response()
}

/// One GET over a unix socket, whole body, bounded in time.
async fn get_over_unix(socket: &Path, path: &str) -> Result<(StatusCode, Vec<u8>), String> {
    use http_body_util::BodyExt;
    let call = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body.to_vec()))
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| format!("no answer within {}s", CALL_TIMEOUT.as_secs()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the WAL service's socket: its two routes fleet-agentd reads.
    async fn fake_wal_service(socket: &Path) -> tokio::task::JoinHandle<()> {
        let listener = tokio::net::UnixListener::bind(socket).expect("bind");
        let router = Router::new()
            .route(
                "/metrics",
                get(|| async { "fleet_agent_wal_shipped_segments_total 7\n" }),
            )
            .route(
                "/v1/wal",
                get(|| async { Json(serde_json::json!({ "pushed_segments": 7 })) }),
            );
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        })
    }

    async fn call(router: Router, path: &str) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let response = router
            .oneshot(
                axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .expect("request"),
            )
            .await
            .expect("answer");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn fleet_agentd_relays_the_wal_services_status_and_metrics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("wal.sock");
        let remote = Remote::new(socket.clone());

        // Not running yet: 503 naming the unit, and the metrics say it is down.
        let (status, body) = call(remote.router(), "/v1/wal").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("fleet-agent-wal"), "{body}");
        let mut text = String::new();
        remote.render_metrics(&mut text);
        assert!(text.contains("fleet_agent_wal_service_up 0\n"), "{text}");

        let service = fake_wal_service(&socket).await;
        let relay = remote.spawn();
        let (status, body) = call(remote.router(), "/v1/wal").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("\"pushed_segments\":7"), "{body}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut text = String::new();
            remote.render_metrics(&mut text);
            if text.contains("fleet_agent_wal_service_up 1\n") {
                assert!(
                    text.contains("fleet_agent_wal_shipped_segments_total 7\n"),
                    "{text}"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never relayed: {text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The WAL service's other routes are not served here; 503, not 404,
        // so `agentctl wal fetch` never takes it for "not archived".
        let (status, body) = call(remote.router(), "/v1/wal/fetch/000000010000000000000001").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains(&socket.display().to_string()), "{body}");
        relay.abort();
        service.abort();
    }
}
