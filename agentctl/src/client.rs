//! HTTP/1 over the daemon's unix socket. One connection per request: agentctl
//! is short-lived, and this keeps failure reporting simple.

use anyhow::{anyhow, Context, Result};
use fleet_model::api::ErrorBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;

pub struct Client {
    socket: PathBuf,
}

/// A refusal from the daemon, with its one-sentence reason.
#[derive(Debug)]
pub struct ApiFailure {
    #[allow(dead_code)]
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.body.fields.is_empty() {
            write!(f, "{}", self.body.error)
        } else {
            let fields: Vec<String> = self
                .body
                .fields
                .iter()
                .map(|e| format!("  {}: {}", e.field, e.message))
                .collect();
            write!(f, "{}\n{}", headline(&self.body.error), fields.join("\n"))
        }
    }
}

fn headline(error: &str) -> &str {
    error.split(": ").next().unwrap_or(error)
}

impl std::error::Error for ApiFailure {}

impl Client {
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Response<Incoming>> {
        self.send_typed(method, path, body, "application/json")
            .await
    }

    /// `send` with a body of the given content type (WAL bytes).
    pub async fn send_typed(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        content_type: &str,
    ) -> Result<Response<Incoming>> {
        let content = body.is_some().then_some(("content-type", content_type));
        self.send_one(method, path, content, body.unwrap_or_default())
            .await
    }

    /// One request to the daemon: `host`, at most one more header, the body.
    async fn send_one(
        &self,
        method: Method,
        path: &str,
        header: Option<(&str, &str)>,
        body: Bytes,
    ) -> Result<Response<Incoming>> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "fleet-agentd");
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| anyhow!("bad request: {e}"))?;
        self.send_request(request).await
    }

    async fn send_request(&self, request: Request<Full<Bytes>>) -> Result<Response<Incoming>> {
        let stream = UnixStream::connect(&self.socket).await.with_context(|| {
            format!(
                "cannot reach fleet-agentd at {}; is it running? (start it with `fleet-agentd`, or pass --socket)",
                self.socket.display()
            )
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("handshake with fleet-agentd failed")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        sender
            .send_request(request)
            .await
            .context("fleet-agentd closed the connection")
    }

    /// A bodiless request with one extra header (`wal fetch`'s hand-off offer).
    pub async fn send_with_header(
        &self,
        method: Method,
        path: &str,
        header: Option<(&str, &str)>,
    ) -> Result<Response<Incoming>> {
        self.send_one(method, path, header, Bytes::new()).await
    }

    /// Sends and reads the whole answer whatever its status.
    pub async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        content_type: &str,
    ) -> Result<(StatusCode, Bytes)> {
        let response = self.send_typed(method, path, body, content_type).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .context("reading fleet-agentd's answer")?
            .to_bytes();
        Ok((status, bytes))
    }

    /// Sends and reads the whole answer; a non-2xx answer becomes `ApiFailure`.
    pub async fn call(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<Bytes> {
        let (status, bytes) = self
            .exchange(method, path, body, "application/json")
            .await?;
        if status.is_success() {
            return Ok(bytes);
        }
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or(ErrorBody {
            error: format!(
                "fleet-agentd answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            ),
            fields: vec![],
        });
        Err(ApiFailure { status, body }.into())
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let bytes = self.call(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes)
            .context("fleet-agentd sent an answer this agentctl does not understand")
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let body = Bytes::from(serde_json::to_vec(body)?);
        let bytes = self.call(method, path, Some(body)).await?;
        serde_json::from_slice(&bytes)
            .context("fleet-agentd sent an answer this agentctl does not understand")
    }
}
