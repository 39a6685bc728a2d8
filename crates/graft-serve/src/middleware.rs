//! The layers every request passes through before (and after) its handler: API keys
//! ([`require_api_key`]), 503 while shutting down ([`refuse_while_draining`]), request / error
//! counting ([`count_requests`]) and OpenAI error
//! bodies for the errors axum answers itself ([`openai_errors`]: 405, 413, …).

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Checks `Authorization: Bearer KEY` against the configured keys (none configured: open).
pub fn check_api_key(api_keys: &[String], headers: &HeaderMap) -> Result<(), ApiError> {
    if api_keys.is_empty() {
        return Ok(());
    }
    match bearer(headers) {
        None => Err(ApiError::unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
        )),
        Some(k) if api_keys.contains(&k) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("Incorrect API key provided.")),
    }
}

/// The project a request acts for: one per API key (`default` when the server takes none).
/// Files, jobs, fine-tuned models and adapters loaded through the API belong to one project.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Project(pub String);

/// Refuses the request with 401 unless it carries an accepted API key, and records the
/// [`Project`] of the key for the handler; runs before the handler reads the body.
pub async fn require_api_key(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    match check_api_key(&st.api_keys, req.headers()) {
        Ok(()) => {
            let key = if st.api_keys.is_empty() {
                None
            } else {
                bearer(req.headers())
            };
            let project = Project(graft_jobs::project_of_key(key.as_deref()));
            req.extensions_mut().insert(project);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|v| v.trim().to_string())
}

/// Refuses requests with 503 once shutdown has begun (`/metrics` stays readable).
pub async fn refuse_while_draining(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if st.drain.is_draining() && req.uri().path() != "/metrics" {
        return ApiError::unavailable(
            "The server is shutting down and takes no new requests.",
            "server_shutting_down",
        )
        .into_response();
    }
    next.run(req).await
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

/// Gives error responses that are not JSON (axum's own 405 with an empty body, a plain-text
/// extractor rejection) an OpenAI error body with the same status and headers.
pub async fn openai_errors(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let e = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            ApiError::method_not_allowed(&method, &path, allowed)
        }
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::payload_too_large(st.max_body_bytes),
        _ if text.is_empty() => ApiError::from_status(
            status,
            status.canonical_reason().unwrap_or("Request failed").to_string(),
        ),
        _ => ApiError::from_status(status, text),
    };
    let mut out = e.into_response();
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}
