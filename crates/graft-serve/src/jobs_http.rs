//! The fine-tuning API's routes (`/v1/files`, `/v1/fine_tuning/…`): thin handlers over
//! [`graft_jobs::Jobs`], run on blocking threads (the state is SQLite and files on disk). Each
//! acts for the request's [`Project`]; without `--jobs` they answer 404 saying how to enable it.

use crate::api::{FromBody, Object};
use crate::error::{ApiError, jobs_error};
use crate::http::Parsed;
use crate::middleware::Project;
use crate::state::AppState;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use graft_jobs::{Jobs, JobsError, ListQuery};
use serde_json::Value;
use std::sync::Arc;

type Answer = Result<Response, ApiError>;
type Pairs = Query<Vec<(String, String)>>;

/// The routes, for the keyed part of the router; `max_file_bytes` bounds uploads.
pub fn routes(max_file_bytes: usize) -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/v1/files",
            post(upload_file)
                .get(list_files)
                .layer(DefaultBodyLimit::max(max_file_bytes)),
        )
        .route("/v1/files/{id}", get(get_file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/fine_tuning/jobs", post(create_job).get(list_jobs))
        .route("/v1/fine_tuning/jobs/{id}", get(get_job))
        .route("/v1/fine_tuning/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/fine_tuning/jobs/{id}/pause", post(pause_job))
        .route("/v1/fine_tuning/jobs/{id}/resume", post(resume_job))
        .route("/v1/fine_tuning/jobs/{id}/events", get(list_events))
        .route("/v1/fine_tuning/jobs/{id}/checkpoints", get(list_checkpoints))
        .route("/v1/fine_tuning/alpha/graders/run", post(run_grader))
        .route("/v1/fine_tuning/alpha/graders/validate", post(validate_grader))
}

async fn run_grader(State(st): State<Arc<AppState>>, Parsed(JsonBody(body)): Parsed<JsonBody>) -> Answer {
    run(&st, move |j| j.run_grader(&body)).await
}

async fn validate_grader(
    State(st): State<Arc<AppState>>,
    Parsed(JsonBody(body)): Parsed<JsonBody>,
) -> Answer {
    run(&st, move |j| j.validate_grader(&body)).await
}

/// A JSON object body, passed on whole to the jobs service (which checks its fields).
pub struct JsonBody(pub Value);

impl FromBody for JsonBody {
    fn from_body(obj: &Object) -> Result<Self, ApiError> {
        Ok(JsonBody(Value::Object(obj.clone())))
    }
}

fn service(st: &AppState) -> Result<Arc<Jobs>, ApiError> {
    st.jobs.clone().ok_or_else(|| {
        ApiError::not_found(
            "Fine-tuning is not enabled on this server; start it with `graft serve --jobs` (state under --state-dir).",
        )
    })
}

/// Runs a jobs call on a blocking thread and answers its JSON.
async fn run(st: &AppState, f: impl FnOnce(&Jobs) -> Result<Value, JobsError> + Send + 'static) -> Answer {
    let jobs = service(st)?;
    let v = tokio::task::spawn_blocking(move || f(&jobs))
        .await
        .map_err(|e| ApiError::internal(format!("the fine-tuning service failed: {e}")))?
        .map_err(jobs_error)?;
    Ok(Json(v).into_response())
}

fn query(pairs: &[(String, String)], allowed: &[&str]) -> Result<ListQuery, ApiError> {
    ListQuery::from_pairs(pairs, allowed).map_err(jobs_error)
}

async fn upload_file(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    mut mp: Multipart,
) -> Answer {
    service(&st)?;
    let bad = |e: axum::extract::multipart::MultipartError| {
        ApiError::bad_request(format!("The multipart body cannot be read: {e}"))
    };
    let (mut file, mut purpose) = (None, None);
    while let Some(field) = mp.next_field().await.map_err(bad)? {
        match field.name().unwrap_or_default() {
            "file" => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let bytes = field.bytes().await.map_err(bad)?;
                file = Some((name, bytes));
            }
            "purpose" => purpose = Some(field.text().await.map_err(bad)?),
            n if n.starts_with("expires_after") => {}
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("Unrecognized request argument supplied: {other} (known: file, purpose)"),
                ));
            }
        }
    }
    let (name, bytes) =
        file.ok_or_else(|| ApiError::invalid("file", "Missing required parameter: 'file'."))?;
    let purpose =
        purpose.ok_or_else(|| ApiError::invalid("purpose", "Missing required parameter: 'purpose'."))?;
    run(&st, move |j| j.upload_file(&p.0, &name, &purpose, &bytes)).await
}

async fn list_files(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    Query(q): Pairs,
) -> Answer {
    let q = query(&q, &["after", "limit", "order", "purpose"])?;
    run(&st, move |j| j.list_files(&p.0, &q)).await
}

async fn get_file(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    Path(id): Path<String>,
) -> Answer {
    run(&st, move |j| j.get_file(&p.0, &id)).await
}

async fn delete_file(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    Path(id): Path<String>,
) -> Answer {
    run(&st, move |j| j.delete_file(&p.0, &id)).await
}

async fn file_content(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    Path(id): Path<String>,
) -> Answer {
    let jobs = service(&st)?;
    let bytes = tokio::task::spawn_blocking(move || jobs.file_content(&p.0, &id))
        .await
        .map_err(|e| ApiError::internal(format!("the fine-tuning service failed: {e}")))?
        .map_err(jobs_error)?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn create_job(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    Parsed(JsonBody(body)): Parsed<JsonBody>,
) -> Answer {
    run(&st, move |j| j.create_job(&p.0, &body)).await
}

async fn list_jobs(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    Query(q): Pairs,
) -> Answer {
    let q = query(&q, &["after", "limit", "metadata"])?;
    run(&st, move |j| j.list_jobs(&p.0, &q)).await
}

async fn get_job(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    Path(id): Path<String>,
) -> Answer {
    run(&st, move |j| j.get_job(&p.0, &id)).await
}

async fn cancel_job(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    Path(id): Path<String>,
) -> Answer {
    run(&st, move |j| j.cancel_job(&p.0, &id)).await
}

async fn pause_job(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    Path(id): Path<String>,
) -> Answer {
    run(&st, move |j| j.pause_job(&p.0, &id)).await
}

async fn resume_job(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    Path(id): Path<String>,
) -> Answer {
    run(&st, move |j| j.resume_job(&p.0, &id)).await
}

async fn list_events(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    Path(id): Path<String>,
    Query(q): Pairs,
) -> Answer {
    let q = query(&q, &["after", "limit"])?;
    run(&st, move |j| j.list_events(&p.0, &id, &q)).await
}

async fn list_checkpoints(
    State(st): State<Arc<AppState>>,
    Extension(p): Extension<Project>,
    Path(id): Path<String>,
    Query(q): Pairs,
) -> Answer {
    let q = query(&q, &["after", "limit"])?;
    run(&st, move |j| j.list_checkpoints(&p.0, &id, &q)).await
}
