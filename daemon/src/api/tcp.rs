//! The TCP listener for the coordinator and Prometheus: read-only routes and
//! `/metrics`. A bearer token is required whenever one is configured (and the
//! daemon refuses to start on a non-loopback address without one). Tokens are
//! compared in constant time; the file may hold two (one per line) so a token
//! can be rotated without downtime. A refusal says `401` and nothing more.

use super::Caller;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::path::Path;
use std::sync::Arc;

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
    #[error("token file {0} is readable by others; run `chmod 600 {0}`")]
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
        if meta.permissions().mode() & 0o077 != 0 {
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

#[cfg(test)]
mod tests {
    use super::*;

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
