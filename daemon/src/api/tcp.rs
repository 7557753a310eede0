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
    #[error("cannot create token file {path}: {source}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {0} holds no token")]
    Empty(String),
    #[error("token file {path} holds {count} tokens; at most two (the current one and the next, one per line) are allowed")]
    TooMany { path: String, count: usize },
    #[error("token file {0} is open to others (group write or any access for others); run `chmod 640 {0}`")]
    TooOpen(String),
}

/// The accepted bearer tokens. Shared by every connection of the listener and
/// swapped whole by `reload` (SIGHUP), so a rotation needs no restart: write
/// the new token as a second line, reload, move clients over, drop the old
/// line, reload.
#[derive(Clone, Default)]
pub struct Tokens {
    accepted: Arc<std::sync::RwLock<Arc<Vec<Vec<u8>>>>>,
    path: Option<std::path::PathBuf>,
}

/// The file name of the token the daemon generates in its state directory
/// when `api.token_file` is not set.
pub const DEFAULT_TOKEN_FILE: &str = "api.token";

impl Tokens {
    pub fn none() -> Self {
        Self::default()
    }

    fn of(tokens: Vec<Vec<u8>>, path: Option<&Path>) -> Self {
        Self {
            accepted: Arc::new(std::sync::RwLock::new(Arc::new(tokens))),
            path: path.map(Path::to_path_buf),
        }
    }

    pub fn load(path: &Path) -> Result<Self, TokenError> {
        Ok(Self::of(read_tokens(path)?, Some(path)))
    }

    /// The token file in force: `api.token_file`, or the one generated under
    /// `state_dir` (created, 0640, on first use). A TCP listener never runs
    /// without a token, so a local user outside the admin group does not get
    /// the read API the control socket refuses them.
    pub fn configured(token_file: Option<&Path>, state_dir: &Path) -> Result<Self, TokenError> {
        match token_file {
            Some(path) => Self::load(path),
            None => {
                let path = state_dir.join(DEFAULT_TOKEN_FILE);
                generate_if_missing(&path)?;
                Self::load(&path)
            }
        }
    }

    /// Reads the file again; on any problem the tokens in force stay.
    pub fn reload(&self) -> Result<usize, TokenError> {
        let Some(path) = &self.path else {
            return Ok(0);
        };
        let tokens = read_tokens(path)?;
        let count = tokens.len();
        if let Ok(mut accepted) = self.accepted.write() {
            *accepted = Arc::new(tokens);
        }
        Ok(count)
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn current(&self) -> Arc<Vec<Vec<u8>>> {
        match self.accepted.read() {
            Ok(a) => a.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn required(&self) -> bool {
        !self.current().is_empty()
    }

    pub fn accepts(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        // Check every token, whatever matched, so timing says nothing.
        let mut ok = subtle::Choice::from(0u8);
        for token in self.current().iter() {
            ok |= token.as_slice().ct_eq(presented);
        }
        ok.into()
    }
}

fn read_tokens(path: &Path) -> Result<Vec<Vec<u8>>, TokenError> {
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
        .map(|l| l.as_bytes().to_vec())
        .collect();
    // A third line is a mistake (a rotation never finished, a pasted file),
    // not something to cut silently: the token it holds would be refused.
    if tokens.len() > 2 {
        return Err(TokenError::TooMany {
            path: shown,
            count: tokens.len(),
        });
    }
    if tokens.is_empty() {
        return Err(TokenError::Empty(shown));
    }
    Ok(tokens)
}

/// Creates `path` with a fresh random token, readable by the daemon's user and
/// group only (0640: the admin group reads it for curl, agentctl and a local
/// Prometheus). An existing file is left as it is.
pub fn generate_if_missing(path: &Path) -> Result<(), TokenError> {
    use rand::RngCore;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let create = |source| TokenError::Create {
        path: path.display().to_string(),
        source,
    };
    if path.exists() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(create)?;
    }
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let tmp = path.with_extension("token.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&tmp)
        .map_err(create)?;
    file.write_all(format!("{}\n", hex::encode(bytes)).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(create)?;
    // Rename, so a reader never sees half a token; a concurrent creator's
    // file is as good as ours.
    std::fs::rename(&tmp, path).map_err(create)?;
    Ok(())
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
            // Closed with the answer: a client without the token does not
            // get to keep a connection (and its slot) open for more guesses.
            return (
                StatusCode::UNAUTHORIZED,
                [
                    (header::WWW_AUTHENTICATE, "Bearer"),
                    (header::CONNECTION, "close"),
                ],
            )
                .into_response();
        }
    }
    if let Some(pending) = request.extensions().get::<Pending>() {
        pending.authenticated();
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
        let ip = client_key(ip);
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

/// The client a limit counts against. Every loopback address (127.0.0.0/8,
/// `::1`, and those mapped into IPv6) is one local client: a local process can
/// bind any of them, so counting each apart would give it 16 million buckets.
/// An IPv6 client is its /64, the smallest block a site is routed.
pub fn client_key(ip: IpAddr) -> IpAddr {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match ip {
        ip if ip.is_loopback() => IpAddr::from([127, 0, 0, 1]),
        IpAddr::V6(v6) => {
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::from(segments)
        }
        v4 => v4,
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

/// Connections that have not yet presented a valid token, per client
/// (`client_key`). One client may have at most `per_client_cap` of them; its
/// next one closes its oldest instead. So connections that never
/// authenticate (idle, slow heads, bad tokens) hold at most a share of
/// `max_connections`, and a client's newest connection, the one about to
/// send a request, is the one served. A connection leaves the table at its
/// first request with a valid token and is never closed this way after.
#[derive(Default)]
pub struct Unauthenticated {
    inner: Mutex<UnauthInner>,
}

#[derive(Default)]
struct UnauthInner {
    next_id: u64,
    by_client: HashMap<IpAddr, std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>>,
}

/// A connection's entry in `Unauthenticated`, on each of its requests.
#[derive(Clone)]
pub struct Pending {
    table: Arc<Unauthenticated>,
    key: IpAddr,
    id: u64,
}

impl Unauthenticated {
    /// Admits a connection; the receiver fires when a newer connection of
    /// the same client pushed it out.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        cap: usize,
    ) -> (Pending, tokio::sync::oneshot::Receiver<()>) {
        let key = client_key(ip);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.next_id += 1;
        let id = inner.next_id;
        let queue = inner.by_client.entry(key).or_default();
        while queue.len() >= cap.max(1) {
            if let Some((_, oldest)) = queue.pop_front() {
                let _ = oldest.send(());
            }
        }
        queue.push_back((id, tx));
        (
            Pending {
                table: self.clone(),
                key,
                id,
            },
            rx,
        )
    }

    fn forget(&self, key: IpAddr, id: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = inner.by_client.get_mut(&key) {
            // Dropping the sender tells the connection it is no longer pending.
            queue.retain(|(i, _)| *i != id);
            if queue.is_empty() {
                inner.by_client.remove(&key);
            }
        }
    }

    pub fn pending(&self, ip: IpAddr) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.by_client.get(&client_key(ip)).map_or(0, |q| q.len())
    }
}

impl Pending {
    /// The connection presented a valid token: out of the table for good.
    pub fn authenticated(&self) {
        self.table.forget(self.key, self.id);
    }
}

/// One client's share of `max_connections` for connections not yet
/// authenticated: a quarter, at least 4.
pub fn per_client_cap(max_connections: usize) -> usize {
    (max_connections / 4).max(4).min(max_connections)
}

/// Serves `conn` until it ends, or until the connection is pushed out of
/// `Unauthenticated` while it still has not authenticated.
async fn unless_evicted<F: std::future::Future>(
    conn: F,
    evicted: tokio::sync::oneshot::Receiver<()>,
) -> Option<F::Output> {
    tokio::pin!(conn);
    tokio::select! {
        out = &mut conn => Some(out),
        pushed = evicted => match pushed {
            Ok(()) => None,
            // The sender is gone: authenticated (or forgotten); serve on.
            Err(_) => Some(conn.await),
        },
    }
}

/// Accepts connections while fewer than `max_connections` are open, with at
/// most `per_client_cap` of them per client not yet authenticated; serves
/// each as HTTP/1.1 (over TLS when an acceptor is given).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let unauthenticated = Arc::new(Unauthenticated::default());
    let cap = per_client_cap(limits.max_connections);
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
        let (pending, evicted) = unauthenticated.admit(peer.ip(), cap);
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let http = http.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let entry = pending.clone();
            let service = hyper::service::service_fn(
                move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(Peer(peer));
                    request.extensions_mut().insert(pending.clone());
                    router.clone().oneshot(request.map(Body::new))
                },
            );
            let result = match tls {
                None => {
                    unless_evicted(
                        http.serve_connection(TokioIo::new(stream), service),
                        evicted,
                    )
                    .await
                }
                Some(acceptor) => {
                    // The handshake gets the same deadline as a request head.
                    let handshake =
                        tokio::time::timeout(limits.header_timeout, acceptor.accept(stream));
                    match unless_evicted(handshake, evicted).await {
                        Some(Ok(Ok(stream))) => {
                            // Evicting during the request itself is left to
                            // the head deadline: a TLS client pays a handshake
                            // per connection, which bounds how fast it floods.
                            Some(http.serve_connection(TokioIo::new(stream), service).await)
                        }
                        Some(Ok(Err(e))) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed.");
                            None
                        }
                        Some(Err(_)) | None => None,
                    }
                }
            };
            entry.authenticated();
            if let Some(Err(e)) = result {
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
        let ip = IpAddr::from([10, 0, 0, 1]);
        let other = IpAddr::from([10, 0, 0, 2]);
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
    fn every_loopback_address_is_one_client() {
        let limiter = RateLimiter::new(3);
        let t0 = Instant::now();
        let loopbacks: [IpAddr; 4] = [
            IpAddr::from([127, 0, 0, 1]),
            IpAddr::from([127, 0, 0, 2]),
            IpAddr::from([127, 9, 8, 7]),
            "::ffff:127.0.0.3".parse().unwrap(),
        ];
        for ip in &loopbacks[..3] {
            assert!(limiter.allow(*ip, t0), "{ip}");
        }
        // The bucket is spent, whichever loopback address asks.
        for ip in loopbacks.iter().chain([&"::1".parse().unwrap()]) {
            assert!(!limiter.allow(*ip, t0), "{ip}");
        }
        // An IPv6 client is its /64.
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
    }

    #[tokio::test]
    async fn unauthenticated_connections_of_one_client_push_out_their_oldest() {
        let table = Arc::new(Unauthenticated::default());
        let cap = per_client_cap(16);
        assert_eq!(cap, 4);
        let flood: Vec<_> = (0..cap)
            .map(|i| table.admit(IpAddr::from([127, 0, 0, i as u8 + 1]), cap))
            .collect();
        assert_eq!(table.pending(IpAddr::from([127, 0, 0, 1])), cap);
        // Another client is not affected.
        let (_other, mut other_rx) = table.admit(IpAddr::from([10, 1, 1, 1]), cap);
        // The same client's next connection closes its oldest, not itself.
        let (newest, mut newest_rx) = table.admit(IpAddr::from([127, 0, 0, 200]), cap);
        let mut flood = flood.into_iter();
        let (_oldest, oldest_rx) = flood.next().unwrap();
        assert_eq!(oldest_rx.await, Ok(()));
        for (_, mut rx) in flood {
            assert!(rx
                .try_recv()
                .is_err_and(|e| e == tokio::sync::oneshot::error::TryRecvError::Empty));
        }
        assert_eq!(table.pending(IpAddr::from([127, 0, 0, 1])), cap);
        // Authenticated: out of the table, and its receiver says "serve on".
        newest.authenticated();
        assert_eq!(
            newest_rx.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(table.pending(IpAddr::from([127, 0, 0, 1])), cap - 1);
        assert!(other_rx
            .try_recv()
            .is_err_and(|e| e == tokio::sync::oneshot::error::TryRecvError::Empty));
        assert_eq!(per_client_cap(2), 2);
    }

    fn token_file(dir: &Path, text: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("api-token");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        path
    }

    #[test]
    fn a_third_token_line_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = token_file(dir.path(), "one\ntwo\nthree\n");
        match Tokens::load(&path) {
            Err(TokenError::TooMany { count: 3, .. }) => {}
            Err(e) => panic!("wrong refusal: {e}"),
            Ok(_) => panic!("three tokens accepted"),
        }
        let path = token_file(dir.path(), "# rotated on Monday\none\n\ntwo\n");
        let tokens = Tokens::load(&path).unwrap();
        assert!(tokens.accepts(b"one") && tokens.accepts(b"two"));
    }

    #[test]
    fn reload_swaps_the_tokens_and_a_bad_file_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = token_file(dir.path(), "old-token\n");
        let tokens = Tokens::load(&path).unwrap();
        // A clone is what the listener holds.
        let listener_view = tokens.clone();
        token_file(dir.path(), "old-token\nnew-token\n");
        assert_eq!(tokens.reload().unwrap(), 2);
        assert!(listener_view.accepts(b"new-token") && listener_view.accepts(b"old-token"));
        token_file(dir.path(), "new-token\n");
        tokens.reload().unwrap();
        assert!(!listener_view.accepts(b"old-token"));
        token_file(dir.path(), "a\nb\nc\n");
        assert!(tokens.reload().is_err());
        assert!(listener_view.accepts(b"new-token"));
        assert!(!listener_view.accepts(b"a"));
    }

    #[test]
    fn without_a_token_file_one_is_generated_closed_to_others_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::configured(None, dir.path()).unwrap();
        assert!(tokens.required());
        let path = dir.path().join(DEFAULT_TOKEN_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o037, 0, "{mode:o}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert!(tokens.accepts(text.trim().as_bytes()));
        // The next start keeps it.
        let again = Tokens::configured(None, dir.path()).unwrap();
        assert!(again.accepts(text.trim().as_bytes()));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn accepts_either_rotation_token_and_nothing_close() {
        let tokens = Tokens::of(vec![b"alpha-token".to_vec(), b"beta-token".to_vec()], None);
        assert!(tokens.accepts(b"alpha-token"));
        assert!(tokens.accepts(b"beta-token"));
        assert!(!tokens.accepts(b"alpha-tokeN"));
        assert!(!tokens.accepts(b"alpha-toke"));
        assert!(!tokens.accepts(b""));
    }
}
