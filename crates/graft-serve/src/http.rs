//! The HTTP layer: the axum router and thin handlers. Each handler extracts a typed request
//! ([`Parsed`] bodies from [`crate::api`]), calls [`crate::service`] and responds; API keys,
//! the shutdown drain and request counting are layers ([`crate::middleware`]), errors become
//! OpenAI error objects through [`ApiError`] (those axum answers itself too, by the
//! `openai_errors` layer).

use crate::api::{
    ChatRequest, CompletionRequest, DetokenizeRequest, FromBody, LoadAdapterRequest, LoadLoraAdapterRequest,
    TokenizeRequest, UnloadLoraAdapterRequest,
};
use crate::error::ApiError;
use crate::middleware;
use crate::middleware::Project;
use crate::service;
use crate::state::AppState;
use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, middleware as mw};
use serde_json::{Value, json};
use std::sync::Arc;

/// A request body parsed into `T`; malformed bodies are answered with an [`ApiError`].
pub struct Parsed<T>(pub T);

impl<T: FromBody> FromRequest<Arc<AppState>> for Parsed<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::payload_too_large(state.max_body_bytes),
                status => ApiError::from_status(status, e.body_text()),
            })?;
        let obj = crate::api::parse_body(&bytes)?;
        T::from_body(&obj).map(Parsed)
    }
}

type Answer = Result<Response, ApiError>;

fn json(v: Value) -> Answer {
    Ok(Json(v).into_response())
}

/// The router with every endpoint.
pub fn router(state: Arc<AppState>) -> Router {
    let keyed = Router::new()
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model).delete(delete_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/adapters", post(load_adapter).get(list_adapters))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
        .merge(crate::jobs_http::routes(state.max_file_bytes))
        .route_layer(mw::from_fn_with_state(state.clone(), middleware::require_api_key));
    let routes = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .merge(keyed)
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state.clone());
    // The whole router as the fallback service, so these layers see its finished responses
    // (a 405 gets its `Allow` header from the router, after per-route layers ran).
    Router::new()
        .fallback_service(routes)
        .layer(mw::from_fn_with_state(
            state.clone(),
            middleware::refuse_while_draining,
        ))
        .layer(mw::from_fn_with_state(state.clone(), middleware::openai_errors))
        .layer(mw::from_fn_with_state(state, middleware::count_requests))
}

async fn fallback() -> ApiError {
    ApiError::not_found("Unknown route.")
}

async fn health(State(st): State<Arc<AppState>>) -> Answer {
    json(service::health(&st).await?)
}

async fn version() -> Answer {
    json(json!({"version": env!("CARGO_PKG_VERSION"), "server": "graft"}))
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    st.update_adapter_gauge();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        st.metrics.render(),
    )
        .into_response()
}

/// The request's project (set by the API-key layer).
type Proj = Extension<Project>;

async fn list_models(State(st): State<Arc<AppState>>, Extension(p): Proj) -> Answer {
    json(service::list_models(&st, &p.0)?)
}

async fn get_model(State(st): State<Arc<AppState>>, Extension(p): Proj, Path(id): Path<String>) -> Answer {
    json(service::get_model(&st, &p.0, &id)?)
}

async fn delete_model(State(st): State<Arc<AppState>>, Extension(p): Proj, Path(id): Path<String>) -> Answer {
    json(service::delete_model(&st, &p.0, &id)?)
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    Extension(p): Proj,
    Parsed(req): Parsed<ChatRequest>,
) -> Answer {
    service::chat(&st, &p.0, req)?.respond().await
}

async fn completions(
    State(st): State<Arc<AppState>>,
    Extension(p): Proj,
    Parsed(req): Parsed<CompletionRequest>,
) -> Answer {
    service::completion(&st, &p.0, req)?.respond().await
}

async fn tokenize(
    State(st): State<Arc<AppState>>,
    Extension(p): Proj,
    Parsed(req): Parsed<TokenizeRequest>,
) -> Answer {
    json(service::tokenize(&st, &p.0, req)?)
}

async fn detokenize(
    State(st): State<Arc<AppState>>,
    Extension(p): Proj,
    Parsed(req): Parsed<DetokenizeRequest>,
) -> Answer {
    json(service::detokenize(&st, &p.0, req)?)
}

async fn list_adapters(State(st): State<Arc<AppState>>, Extension(p): Proj) -> Answer {
    json(service::list_adapters(&st, &p.0))
}

async fn load_adapter(
    State(st): State<Arc<AppState>>,
    Extension(p): Proj,
    Parsed(req): Parsed<LoadAdapterRequest>,
) -> Answer {
    json(service::load_adapter(&st, &p.0, req).await?)
}

async fn load_lora_adapter(
    State(st): State<Arc<AppState>>,
    Extension(p): Proj,
    Parsed(LoadLoraAdapterRequest(req)): Parsed<LoadLoraAdapterRequest>,
) -> Answer {
    json(service::load_adapter(&st, &p.0, req).await?)
}

async fn unload_adapter(
    State(st): State<Arc<AppState>>,
    Extension(p): Proj,
    Path(name): Path<String>,
) -> Answer {
    json(service::unload_adapter(&st, &p.0, &name, "name")?)
}

async fn unload_lora_adapter(
    State(st): State<Arc<AppState>>,
    Extension(p): Proj,
    Parsed(req): Parsed<UnloadLoraAdapterRequest>,
) -> Answer {
    json(service::unload_adapter(&st, &p.0, &req.name, "lora_name")?)
}
