//! A coordinator stand-in speaking the pull protocol of `docs/openapi.yaml`:
//! `POST /v1/nodes/{node_id}/sync` answered `304` or `200` + `ETag` + a
//! desired-state document. Tests set what each node gets (a document, garbage,
//! an oversized body, an error status), make it go away (stop listening) and
//! come back on the same port, and read every sync body it received.
//!
//! Plain threads and blocking sockets: one connection per request
//! (`Connection: close`), which is all the daemon's client needs.

use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// What the stand-in answers a node.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A document: `304` when `If-None-Match` carries `etag`, else `200`.
    Document { body: Vec<u8>, etag: String },
    /// These bytes with `200` and `etag`, whatever the node sent. Without
    /// `content_length` the body ends when the connection closes, so the
    /// node cannot know its size up front.
    Raw {
        body: Vec<u8>,
        etag: String,
        content_length: bool,
    },
    /// An empty answer with this status.
    Status(u16),
}

/// One sync the stand-in received.
#[derive(Debug, Clone)]
pub struct RecordedSync {
    pub node_id: String,
    pub if_none_match: Option<String>,
    pub authorization: Option<String>,
    /// The JSON body (`Value::Null` if it did not parse).
    pub body: Value,
    /// The status the stand-in answered.
    pub answered: u16,
    /// The node's `Fleet-Status-Digest` header.
    pub status_digest: Option<String>,
    /// Bytes of the request body (0: the node sent its digest only).
    pub body_bytes: usize,
    pub at: Instant,
}

#[derive(Default)]
struct State {
    replies: HashMap<String, Reply>,
    syncs: Vec<RecordedSync>,
    token: Option<String>,
    /// Echo `Fleet-Status-Digest` (the node then omits unchanged bodies).
    echo_status: bool,
    /// The digest of the last whole status each node sent.
    held_status: HashMap<String, String>,
}

pub struct StubCoordinator {
    port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    etags: AtomicU64,
}

impl StubCoordinator {
    /// Listens on a port the kernel picks. Only for tests that never
    /// `go_away`: once released, an ephemeral port can be handed to any
    /// outgoing connection on the host, and `come_back` then cannot bind it.
    pub fn start() -> Self {
        Self::bind(0)
    }

    /// Listens on a fixed port below the ephemeral range (scripts/test.sh moves
    /// it to 49152-60999), so a test that goes away and comes back finds its
    /// port free again. Stand-in coordinators use 48300-48309.
    pub fn start_on(port: u16) -> Self {
        Self::bind(port)
    }

    fn bind(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("bind the stand-in coordinator on port {port}: {e}"));
        let port = listener.local_addr().unwrap().port();
        let mut stub = StubCoordinator {
            port,
            state: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            accept: None,
            etags: AtomicU64::new(0),
        };
        stub.listen(listener);
        stub
    }

    fn listen(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        self.stop.store(false, Ordering::SeqCst);
        let stop = self.stop.clone();
        let state = self.state.clone();
        self.accept = Some(thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let state = state.clone();
                        thread::spawn(move || handle(stream, &state));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            // Dropping the listener here: new connections are refused.
        }));
    }

    /// `http://127.0.0.1:<port>`: the `[coordinator] url`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on every sync must carry `Authorization: Bearer <token>` (else `401`).
    pub fn require_token(&self, token: &str) {
        self.state.lock().unwrap().token = Some(token.to_string());
    }

    /// From now on answer with `Fleet-Status-Digest` naming the last whole
    /// status each node sent, as a coordinator that keeps node status does.
    pub fn echo_status_digest(&self) {
        self.state.lock().unwrap().echo_status = true;
    }

    /// Forgets every node's status, as a restarted coordinator would.
    pub fn forget_status(&self) {
        self.state.lock().unwrap().held_status.clear();
    }

    /// Serves `{"revision": revision, "departments": departments}` to `node`
    /// under a fresh ETag, which it returns.
    pub fn set_document(&self, node: &str, revision: i64, departments: Value) -> String {
        let body = serde_json::to_vec(&serde_json::json!({
            "revision": revision,
            "departments": departments,
        }))
        .unwrap();
        let etag = self.fresh_etag(revision);
        self.set_reply(
            node,
            Reply::Document {
                body,
                etag: etag.clone(),
            },
        );
        etag
    }

    /// A fresh quoted ETag naming the revision, for `Reply::Raw`.
    pub fn fresh_etag(&self, revision: i64) -> String {
        format!(
            "\"r{revision}-{}\"",
            self.etags.fetch_add(1, Ordering::SeqCst)
        )
    }

    pub fn set_reply(&self, node: &str, reply: Reply) {
        self.state
            .lock()
            .unwrap()
            .replies
            .insert(node.to_string(), reply);
    }

    /// Stops listening: connections are refused until `come_back`.
    pub fn go_away(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            t.join().unwrap();
        }
    }

    /// Listens again on the same port.
    pub fn come_back(&mut self) {
        assert!(self.accept.is_none(), "the stand-in is already listening");
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot listen on port {} again: {e}", self.port),
            }
        };
        self.listen(listener);
    }

    /// Every sync from `node` so far, oldest first.
    pub fn syncs(&self, node: &str) -> Vec<RecordedSync> {
        self.state
            .lock()
            .unwrap()
            .syncs
            .iter()
            .filter(|s| s.node_id == node)
            .cloned()
            .collect()
    }

    /// Waits for a sync from `node` received after `since` that satisfies `check`.
    pub fn wait_sync(
        &self,
        node: &str,
        since: Instant,
        timeout: Duration,
        what: &str,
        check: impl Fn(&RecordedSync) -> bool,
    ) -> RecordedSync {
        crate::wait_for(timeout, what, || {
            self.syncs(node)
                .into_iter()
                .find(|s| s.at >= since && check(s))
        })
    }
}

impl Drop for StubCoordinator {
    fn drop(&mut self) {
        self.go_away();
    }
}

fn handle(mut stream: TcpStream, state: &Mutex<State>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let Ok(clone) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(clone);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line.is_empty() {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length.min(16 * 1024 * 1024)];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let node = path
        .strip_prefix("/v1/nodes/")
        .and_then(|p| p.strip_suffix("/sync"))
        .map(str::to_string);
    let mut guard = state.lock().unwrap();
    let authorization = headers.get("authorization").cloned();
    let if_none_match = headers.get("if-none-match").cloned();
    let (status, etag, payload, content_length) = match (&node, method) {
        (None, _) => (404, None, Vec::new(), true),
        (Some(_), m) if m != "POST" => (405, None, Vec::new(), true),
        (Some(_), _)
            if guard
                .token
                .as_ref()
                .is_some_and(|t| authorization.as_deref() != Some(&format!("Bearer {t}"))) =>
        {
            (401, None, Vec::new(), true)
        }
        (Some(node), _) => match guard.replies.get(node).cloned() {
            None => (404, None, Vec::new(), true),
            Some(Reply::Status(code)) => (code, None, Vec::new(), true),
            Some(Reply::Document { body, etag }) => {
                if if_none_match.as_deref() == Some(etag.as_str()) {
                    (304, Some(etag), Vec::new(), true)
                } else {
                    (200, Some(etag), body, true)
                }
            }
            Some(Reply::Raw {
                body,
                etag,
                content_length,
            }) => (200, Some(etag), body, content_length),
        },
    };
    let status_digest = headers.get("fleet-status-digest").cloned();
    let mut echo = None;
    if let Some(node) = node {
        let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if guard.echo_status && (status == 200 || status == 304) {
            if let (Some(digest), false) = (&status_digest, parsed.is_null()) {
                guard.held_status.insert(node.clone(), digest.clone());
            }
            echo = guard.held_status.get(&node).cloned();
        }
        guard.syncs.push(RecordedSync {
            node_id: node,
            if_none_match,
            authorization,
            body: parsed,
            answered: status,
            status_digest,
            body_bytes: body.len(),
            at: Instant::now(),
        });
    }
    drop(guard);
    let reason = match status {
        200 => "OK",
        304 => "Not Modified",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    if let Some(etag) = etag {
        head.push_str(&format!("ETag: {etag}\r\n"));
    }
    if status == 200 {
        head.push_str("Content-Type: application/json\r\n");
    }
    if let Some(digest) = echo {
        head.push_str(&format!("Fleet-Status-Digest: {digest}\r\n"));
    }
    if content_length && status != 304 {
        head.push_str(&format!("Content-Length: {}\r\n", payload.len()));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&payload);
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
