//! The TCP listener for the coordinator and Prometheus: read-only routes and
//! `/metrics`. A bearer token is required whenever one is configured (and the
//! daemon refuses to start on a non-loopback address without one). Tokens are
//! compared in constant time; the file may hold two (one per line) so a token
//! can be rotated without downtime. A refusal says `401` and nothing more.
//!
//! The listener is open to the network, so it also owns the limits that keep
//! a misbehaving client from starving the coordinator: a cap on connections
//! (excess ones wait in the kernel's backlog), a deadline for each request
//! head that also closes idle keep-alive connections (slowloris), a deadline
//! for each answer, a body cap, a per-client-address rate limit, and optional
//! TLS with optional client-certificate verification.

use super::Caller;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use fleet_model::api::ErrorBody;
use fleet_model::config::ApiConfig;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Read-only routes take no bodies; anything bigger than this is refused.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Cap on one request head (request line and headers).
const HEAD_LIMIT: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {0} holds no token")]
    Empty(String),
    #[error("token file {0} is open to others (group write or any access for others); run `chmod 640 {0}`")]
    TooOpen(String),
}

#[derive(Clone, Default)]
pub struct Tokens(Arc<Vec<Vec<u8>>>);

impl Tokens {
    pub fn none() -> Self {
        Self::default()
    }

    pub fn load(path: &Path) -> Result<Self, TokenError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| TokenError::Read {
            path: shown.clone(),
            source,
        })?;
        // Group read is allowed: the package keeps secrets root:fleet-agent
        // 0640, so the daemon reads them through its group without owning them.
        if meta.permissions().mode() & 0o037 != 0 {
            return Err(TokenError::TooOpen(shown));
        }
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: shown.clone(),
            source,
        })?;
        let tokens: Vec<Vec<u8>> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .take(2)
            .map(|l| l.as_bytes().to_vec())
            .collect();
        if tokens.is_empty() {
            return Err(TokenError::Empty(shown));
        }
        Ok(Self(Arc::new(tokens)))
    }

    pub fn required(&self) -> bool {
        !self.0.is_empty()
    }

    pub fn accepts(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        // Check every token, whatever matched, so timing says nothing.
        let mut ok = subtle::Choice::from(0u8);
        for token in self.0.iter() {
            ok |= token.as_slice().ct_eq(presented);
        }
        ok.into()
    }
}

pub async fn require_token(
    axum::extract::State(tokens): axum::extract::State<Tokens>,
    mut request: Request,
    next: Next,
) -> Response {
    if tokens.required() {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .map(<[u8]>::to_vec);
        let ok = presented.is_some_and(|p| tokens.accepts(&p));
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
            )
                .into_response();
        }
    }
    request.extensions_mut().insert(Caller::Remote);
    next.run(request).await
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path} holds no {what}")]
    Empty { path: String, what: &'static str },
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("api.tls_client_ca: {0}")]
    ClientCa(String),
}

/// The listener's limits, from `[api]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    /// Added to `request_timeout` for `/v1/events` long-polls.
    pub max_event_wait: Duration,
    /// Per client address; 0 = off.
    pub requests_per_second: u32,
}

impl Limits {
    pub fn from_config(api: &ApiConfig) -> Self {
        Self {
            max_connections: api.max_connections,
            header_timeout: api.header_timeout,
            request_timeout: api.request_timeout,
            max_event_wait: api.max_event_wait,
            requests_per_second: api.requests_per_second,
        }
    }
}

/// The TLS acceptor when `api.tls_cert` and `api.tls_key` are set; with
/// `api.tls_client_ca` a client must present a certificate that CA signed.
pub fn tls_acceptor(api: &ApiConfig) -> Result<Option<tokio_rustls::TlsAcceptor>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (Some(cert), Some(key)) = (&api.tls_cert, &api.tls_key) else {
        return Ok(None);
    };
    let read_err = |path: &Path, e: &dyn std::fmt::Display| TlsError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let load_certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| read_err(path, &e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| read_err(path, &e))?;
        if certs.is_empty() {
            return Err(TlsError::Empty {
                path: path.display().to_string(),
                what: "PEM certificate",
            });
        }
        Ok(certs)
    };
    let chain = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| read_err(key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &api.tls_client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots.add(cert)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// The client's address, put on every request by `serve`.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// A token bucket per client address: `rate` per second, bursts of `rate`.
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

/// Beyond this many tracked addresses, idle ones are forgotten.
const RATE_TRACKED: usize = 4096;

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        Self {
            rate: f64::from(per_second),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= RATE_TRACKED && !buckets.contains_key(&ip) {
            // A full bucket idle for a second is the same as no entry.
            buckets.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(1));
        }
        let (tokens, at) = buckets.entry(ip).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message,
            fields: vec![],
        }),
    )
        .into_response()
}

/// The layers of the TCP listener, outermost first: deadline, body cap, rate
/// limit, token. The rate limit comes before the token so a flood of bad
/// tokens costs one map lookup each.
pub fn harden(router: Router, tokens: Tokens, limits: Limits) -> Router {
    let limiter = Arc::new(RateLimiter::new(limits.requests_per_second));
    let rate = limits.requests_per_second;
    router
        .layer(axum::middleware::from_fn_with_state(tokens, require_token))
        .layer(axum::middleware::from_fn(
            move |request: Request, next: Next| {
                let limiter = limiter.clone();
                async move {
                    let ip = request.extensions().get::<Peer>().map(|p| p.0.ip());
                    if let Some(ip) = ip {
                        if !limiter.allow(ip, Instant::now()) {
                            let mut response = error(
                                StatusCode::TOO_MANY_REQUESTS,
                                format!("too many requests: this listener answers {rate} per second per client"),
                            );
                            response
                                .headers_mut()
                                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                            return response;
                        }
                    }
                    next.run(request).await
                }
            },
        ))
        .layer(axum::middleware::from_fn(limit_body))
        .layer(axum::middleware::from_fn(move |request: Request, next: Next| {
            let mut deadline = limits.request_timeout;
            if request.uri().path() == "/v1/events" {
                deadline += limits.max_event_wait;
            }
            async move {
                match tokio::time::timeout(deadline, next.run(request)).await {
                    Ok(response) => response,
                    Err(_) => error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("no answer within {deadline:?}; try again"),
                    ),
                }
            }
        }))
}

async fn limit_body(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request bodies are limited to {BODY_LIMIT} bytes here"),
        );
    }
    // A chunked body has no length up front: cap whatever reads it.
    let request = request.map(|b| Body::new(http_body_util::Limited::new(b, BODY_LIMIT)));
    next.run(request).await
}

/// Raises the soft open-file limit to the hard one: a systemd service starts
/// with 1024, less than `api.max_connections` plus what the daemon holds.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Accepts connections while fewer than `max_connections` are open; serves
/// each as HTTP/1.1 (over TLS when an acceptor is given).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(HEAD_LIMIT)
        .keep_alive(true);
    loop {
        // Waiting here leaves excess connections in the backlog until a slot
        // frees; idle ones free theirs after `header_timeout`.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "Accept on the TCP API failed.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let http = http.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(Peer(peer));
                    router.clone().oneshot(request.map(Body::new))
                },
            );
            let result = match tls {
                None => http.serve_connection(TokioIo::new(stream), service).await,
                Some(acceptor) => {
                    // The handshake gets the same deadline as a request head.
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => {
                            http.serve_connection(TokioIo::new(stream), service).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed.");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "TCP API connection ended with an error.");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_a_burst_then_refills() {
        let limiter = RateLimiter::new(5);
        let ip = IpAddr::from([127, 0, 0, 1]);
        let other = IpAddr::from([127, 0, 0, 2]);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(limiter.allow(ip, t0));
        }
        assert!(!limiter.allow(ip, t0));
        // Another client has its own bucket.
        assert!(limiter.allow(other, t0));
        // 200 ms at 5/s buys one request.
        assert!(limiter.allow(ip, t0 + Duration::from_millis(200)));
        assert!(!limiter.allow(ip, t0 + Duration::from_millis(200)));
        assert!(RateLimiter::new(0).allow(ip, t0));
    }

    #[test]
    fn accepts_either_rotation_token_and_nothing_close() {
        let tokens = Tokens(Arc::new(vec![
            b"alpha-token".to_vec(),
            b"beta-token".to_vec(),
        ]));
        assert!(tokens.accepts(b"alpha-token"));
        assert!(tokens.accepts(b"beta-token"));
        assert!(!tokens.accepts(b"alpha-tokeN"));
        assert!(!tokens.accepts(b"alpha-toke"));
        assert!(!tokens.accepts(b""));
    }
}
