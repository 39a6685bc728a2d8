//! The layers every request passes through before (and after) its handler: API keys
//! ([`require_api_key`]) and request / error counting ([`count_requests`]).

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Checks `Authorization: Bearer KEY` against the configured keys (none configured: open).
pub fn check_api_key(api_keys: &[String], headers: &HeaderMap) -> Result<(), ApiError> {
    if api_keys.is_empty() {
        return Ok(());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    match given {
        None => Err(ApiError::unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
        )),
        Some(k) if api_keys.iter().any(|a| a == k) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("Incorrect API key provided.")),
    }
}

/// Refuses the request with 401 unless it carries an accepted API key; runs before the
/// handler reads the body.
pub async fn require_api_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match check_api_key(&st.api_keys, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Counts generation requests per endpoint and every answer with an error status.
pub async fn count_requests(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let m = &st.metrics;
    match req.uri().path() {
        "/v1/chat/completions" => m.chat_requests.fetch_add(1, Ordering::Relaxed),
        "/v1/completions" => m.completion_requests.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
    let resp = next.run(req).await;
    if resp.status().is_client_error() || resp.status().is_server_error() {
        m.failed_requests.fetch_add(1, Ordering::Relaxed);
    }
    resp
}
