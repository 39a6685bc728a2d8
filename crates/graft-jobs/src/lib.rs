//! graft-jobs: OpenAI's fine-tuning API without HTTP — files, jobs, events, checkpoints and the
//! fine-tuned models they produce — over graft's trainers.
//!
//! * [`store`] — the state (SQLite in the state directory, schema migrations at open).
//! * [`files`] — validation of uploaded training files (OpenAI's three formats, line and field
//!   in every error).
//! * [`request`] — create-job bodies and `"auto"` hyperparameters.
//! * [`config`] — a job as a graft [`graft_train::config::TrainConfig`] (LoRA on the served base).
//! * [`runner`] — workers that claim queued jobs, train them with [`graft_train::sft::run`],
//!   turn `metrics.jsonl` and checkpoints into events, and act on cancel / pause.
//!
//! Every object is rendered as the official `openai` SDK types it (`FileObject`,
//! `FineTuningJob`, `FineTuningJobEvent`, `FineTuningJobCheckpoint`). A project (one API key)
//! sees only its own files, jobs and models; server paths never appear in a response.
//!
//! A job trains a LoRA adapter on the served base; its model `ft:{base}:{suffix}:{id}` (and each
//! checkpoint's `…:ckpt-step-N`) is a PEFT directory in the state directory that the server
//! loads on first use ([`Jobs::resolve_model`]).

#![warn(missing_docs)]

pub mod config;
pub mod files;
pub mod request;
pub mod runner;
pub mod sql;
pub mod store;

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use store::{CheckpointRow, EventRow, FileRow, JobRow, Store};

/// A failure the API answers: HTTP status and an OpenAI error object's fields.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct JobsError {
    /// HTTP status.
    pub status: u16,
    /// Human-readable message.
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// Machine-readable code.
    pub code: Option<&'static str>,
}

impl JobsError {
    /// 400 naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> JobsError {
        JobsError {
            status: 400,
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> JobsError {
        JobsError {
            status: 404,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 500: the server's state failed (a database or disk error).
    pub fn internal(message: impl Into<String>) -> JobsError {
        JobsError {
            status: 500,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// Sets the code.
    pub fn with_code(mut self, code: &'static str) -> JobsError {
        self.code = Some(code);
        self
    }

    /// Sets the param.
    pub fn with_param(mut self, param: &str) -> JobsError {
        self.param = Some(param.to_string());
        self
    }
}

/// The project an API key belongs to: `proj-` and 16 hex digits of its SHA-256, or `default`
/// when the server takes no keys.
pub fn project_of_key(key: Option<&str>) -> String {
    use sha2::Digest;
    match key {
        None => "default".to_string(),
        Some(k) => {
            let d = sha2::Sha256::digest(k.as_bytes());
            let hex: String = d.iter().take(8).map(|b| format!("{b:02x}")).collect();
            format!("proj-{hex}")
        }
    }
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random id: `prefix` and 24 characters of `[a-zA-Z0-9]`.
pub fn new_id(prefix: &str) -> String {
    use std::io::Read;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 24];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !ok {
        // No /dev/urandom: time and a counter through SHA-256.
        use sha2::Digest;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let c = COUNTER.fetch_add(1, Ordering::Relaxed);
        let d = sha2::Sha256::digest(format!("{t}:{c}:{}", std::process::id()).as_bytes());
        bytes.copy_from_slice(&d[..24]);
    }
    let tail: String = bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    format!("{prefix}{tail}")
}

/// How the jobs service runs.
#[derive(Clone, Debug)]
pub struct JobsConfig {
    /// Files, run directories and the SQLite database live here.
    pub state_dir: PathBuf,
    /// The name clients use for the served base model (the `model` of a job).
    pub base_model: String,
    /// Other names accepted for it.
    pub base_aliases: Vec<String>,
    /// What training loads (`model.path` of the runs).
    pub model_path: String,
    /// The base model's context length (caps `data.max_length`).
    pub context: usize,
    /// Jobs trained at once in this process (0: none; the API only queues them for workers).
    pub max_concurrent_jobs: usize,
    /// Threads each training run uses (0: all cores).
    pub train_threads: usize,
    /// This process's worker name (claims and leases).
    pub worker_id: String,
    /// Whether `python` graders may run (in the reward sandbox).
    pub allow_python_graders: bool,
    /// The OpenAI-compatible endpoint model graders call (`score_model`, `label_model`).
    pub grader_base_url: Option<String>,
    /// The chat template the server renders with, when it is not the model's own (training
    /// uses the same).
    pub chat_template: Option<String>,
    /// The tokenizer the server uses, when it is not the model's own.
    pub tokenizer: Option<String>,
    /// Where the state lives: a `postgres://` URL (shared by a server and its workers), or
    /// `None` for SQLite in the state directory.
    pub database: Option<String>,
    /// How long a worker's claim on a job holds without renewal (a dead worker's job is
    /// requeued after it), in seconds.
    pub lease_s: u64,
}

impl JobsConfig {
    /// In-process defaults: one job at a time, worker `local-<pid>`.
    pub fn new(state_dir: PathBuf, base_model: &str, model_path: &str, context: usize) -> JobsConfig {
        JobsConfig {
            state_dir,
            base_model: base_model.to_string(),
            base_aliases: Vec::new(),
            model_path: model_path.to_string(),
            context,
            max_concurrent_jobs: 1,
            train_threads: 0,
            worker_id: format!("local-{}", std::process::id()),
            allow_python_graders: false,
            grader_base_url: None,
            chat_template: None,
            tokenizer: None,
            database: None,
            lease_s: runner::LEASE_S,
        }
    }
}

/// A fine-tuned model the server can load: its PEFT directory.
#[derive(Clone, Debug, PartialEq)]
pub struct FineTunedModel {
    /// `ft:…` id.
    pub id: String,
    /// The PEFT adapter directory.
    pub dir: PathBuf,
    /// Unix seconds it was created.
    pub created: u64,
    /// The project that owns it.
    pub project: String,
}

/// The jobs service: the store, the state directory and the workers of this process.
pub struct Jobs {
    /// The state database.
    pub store: Store,
    /// How it runs.
    pub config: JobsConfig,
    shutdown: AtomicBool,
    workers: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// Query parameters of a listing.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// The id after which the page starts.
    pub after: Option<String>,
    /// Page size (default 20, at most 100).
    pub limit: Option<usize>,
    /// `metadata[k]=v` filters.
    pub metadata: Vec<(String, String)>,
    /// `order` (`asc` / `desc`, files).
    pub order: Option<String>,
    /// `purpose` (files).
    pub purpose: Option<String>,
}

impl ListQuery {
    /// From `key=value` query pairs; unknown keys are errors naming them.
    pub fn from_pairs(pairs: &[(String, String)], allowed: &[&str]) -> Result<ListQuery, JobsError> {
        let mut q = ListQuery::default();
        for (k, v) in pairs {
            if let Some(inner) = k.strip_prefix("metadata[").and_then(|s| s.strip_suffix(']'))
                && allowed.contains(&"metadata")
            {
                q.metadata.push((inner.to_string(), v.clone()));
                continue;
            }
            if !allowed.contains(&k.as_str()) {
                return Err(JobsError::invalid(
                    k.as_str(),
                    format!(
                        "Unrecognized query parameter: {k} (known: {})",
                        allowed.join(", ")
                    ),
                ));
            }
            match k.as_str() {
                "after" => q.after = Some(v.clone()),
                "limit" => {
                    let n: usize =
                        v.parse()
                            .ok()
                            .filter(|&n| (1..=10_000).contains(&n))
                            .ok_or_else(|| {
                                JobsError::invalid(
                                    "limit",
                                    format!("limit must be an integer from 1 to 10000, not {v:?}"),
                                )
                            })?;
                    q.limit = Some(n);
                }
                "order" => {
                    if v != "asc" && v != "desc" {
                        return Err(JobsError::invalid(
                            "order",
                            format!("order must be asc or desc, not {v:?}"),
                        ));
                    }
                    q.order = Some(v.clone());
                }
                "purpose" => q.purpose = Some(v.clone()),
                _ => {}
            }
        }
        Ok(q)
    }

    fn limit(&self, default: usize) -> usize {
        self.limit.unwrap_or(default)
    }
}

fn page(data: Vec<Value>, has_more: bool) -> Value {
    let first = data.first().and_then(|d| d["id"].as_str()).map(str::to_string);
    let last = data.last().and_then(|d| d["id"].as_str()).map(str::to_string);
    json!({"object": "list", "data": data, "has_more": has_more, "first_id": first, "last_id": last})
}

/// The OpenAI `FileObject` of a file.
pub fn file_object(f: &FileRow) -> Value {
    json!({
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at,
        "filename": f.filename, "purpose": f.purpose, "status": "processed",
        "status_details": null, "expires_at": null,
    })
}

/// The OpenAI `FineTuningJobEvent` of an event.
pub fn event_object(e: &EventRow) -> Value {
    json!({
        "id": e.id, "object": "fine_tuning.job.event", "created_at": e.created_at,
        "level": e.level, "message": e.message, "data": e.data.clone().unwrap_or(json!({})),
        "type": e.kind,
    })
}

/// The OpenAI `FineTuningJobCheckpoint` of a checkpoint.
pub fn checkpoint_object(c: &CheckpointRow) -> Value {
    json!({
        "id": c.id, "object": "fine_tuning.job.checkpoint", "created_at": c.created_at,
        "fine_tuned_model_checkpoint": c.model_id, "fine_tuning_job_id": c.job_id,
        "metrics": c.metrics, "step_number": c.step,
    })
}

/// The random part of a job id (`ftjob-XXXX` → `XXXX`).
fn job_tail(id: &str) -> &str {
    id.strip_prefix("ftjob-").unwrap_or(id)
}

impl Jobs {
    /// Opens the state directory (creating it), requeues jobs this worker held before a
    /// restart and jobs whose worker's lease ran out, and starts `max_concurrent_jobs` workers.
    pub fn open(config: JobsConfig) -> Result<Arc<Jobs>, JobsError> {
        for d in ["files", "jobs"] {
            let p = config.state_dir.join(d);
            std::fs::create_dir_all(&p)
                .map_err(|e| JobsError::internal(format!("cannot create {}: {e}", p.display())))?;
        }
        let database = match &config.database {
            Some(url) => url.clone(),
            None => config.state_dir.join("graft-jobs.sqlite").display().to_string(),
        };
        let store = Store::open(&database)?;
        let jobs = Arc::new(Jobs {
            store,
            config,
            shutdown: AtomicBool::new(false),
            workers: std::sync::Mutex::new(Vec::new()),
        });
        if !jobs.store.is_shared() {
            // SQLite has one process: every job marked running belonged to an earlier life of
            // this server. (With PostgreSQL, workers requeue jobs whose lease ran out.)
            let requeued = jobs.store.requeue_orphans(u64::MAX)?;
            for id in requeued {
                jobs.event(
                    &id,
                    "info",
                    "The server restarted; the job continues from its last checkpoint.",
                    None,
                )?;
            }
        }
        if jobs.config.max_concurrent_jobs > 0 {
            runner::start_workers(&jobs);
        }
        Ok(jobs)
    }

    /// Whether [`Jobs::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Stops the workers: running jobs save a checkpoint and go back to the queue (they resume
    /// when a worker runs again). Waits for them.
    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        let handles: Vec<_> = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }

    pub(crate) fn add_worker(&self, h: std::thread::JoinHandle<()>) {
        self.workers.lock().unwrap_or_else(|e| e.into_inner()).push(h);
    }

    /// Appends an event to a job.
    pub fn event(
        &self,
        job_id: &str,
        level: &str,
        message: &str,
        data: Option<Value>,
    ) -> Result<(), JobsError> {
        self.store.add_event(
            job_id,
            &EventRow {
                id: new_id("ftevent-"),
                created_at: now(),
                level: level.into(),
                message: message.into(),
                data,
                kind: "message".into(),
            },
        )
    }

    /// Where a file's bytes live.
    pub fn file_path(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("files").join(format!("{id}.jsonl"))
    }

    /// A job's directory (its run directory is `run/` inside).
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("jobs").join(id)
    }

    /// A job's run directory.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("run")
    }

    // ----- files -----

    /// `POST /v1/files`: stores and (for `fine-tune`) validates an upload.
    pub fn upload_file(
        &self,
        project: &str,
        filename: &str,
        purpose: &str,
        bytes: &[u8],
    ) -> Result<Value, JobsError> {
        if purpose != "fine-tune" {
            return Err(JobsError::invalid(
                "purpose",
                format!("purpose {purpose:?} is not supported by this server; use \"fine-tune\""),
            ));
        }
        let facts = files::validate_fine_tune_file(bytes)?;
        self.store_file(
            project,
            filename,
            purpose,
            bytes,
            Some(facts.kind.name()),
            facts.examples,
        )
    }

    fn store_file(
        &self,
        project: &str,
        filename: &str,
        purpose: &str,
        bytes: &[u8],
        kind: Option<&str>,
        examples: u64,
    ) -> Result<Value, JobsError> {
        let id = new_id("file-");
        let path = self.file_path(&id);
        write_atomically(&path, bytes)?;
        let row = FileRow {
            id,
            project: project.to_string(),
            filename: filename.to_string(),
            purpose: purpose.to_string(),
            bytes: bytes.len() as u64,
            created_at: now(),
            kind: kind.map(str::to_string),
            examples,
        };
        self.store.insert_file(&row)?;
        Ok(file_object(&row))
    }

    fn file(&self, project: &str, id: &str) -> Result<FileRow, JobsError> {
        self.store
            .get_file(project, id)?
            .ok_or_else(|| JobsError::not_found(format!("No such File object: {id}")).with_param("id"))
    }

    /// `GET /v1/files`.
    pub fn list_files(&self, project: &str, q: &ListQuery) -> Result<Value, JobsError> {
        let asc = q.order.as_deref() == Some("asc");
        let (rows, more) = self.store.list_files(
            project,
            q.purpose.as_deref(),
            q.after.as_deref(),
            q.limit(10_000),
            asc,
        )?;
        Ok(page(rows.iter().map(file_object).collect(), more))
    }

    /// `GET /v1/files/{id}`.
    pub fn get_file(&self, project: &str, id: &str) -> Result<Value, JobsError> {
        Ok(file_object(&self.file(project, id)?))
    }

    /// `GET /v1/files/{id}/content`.
    pub fn file_content(&self, project: &str, id: &str) -> Result<Vec<u8>, JobsError> {
        let f = self.file(project, id)?;
        std::fs::read(self.file_path(&f.id))
            .map_err(|e| JobsError::internal(format!("the content of {id} cannot be read: {e}")))
    }

    /// `DELETE /v1/files/{id}`.
    pub fn delete_file(&self, project: &str, id: &str) -> Result<Value, JobsError> {
        let f = self.file(project, id)?;
        self.store.delete_file(project, &f.id)?;
        let _ = std::fs::remove_file(self.file_path(&f.id));
        Ok(json!({"id": id, "object": "file", "deleted": true}))
    }

    // ----- jobs -----

    /// The model id of a job (`ft:{base}:{suffix}:{tail}`).
    pub fn model_name(&self, job: &JobRow) -> String {
        format!(
            "ft:{}:{}:{}",
            if job.base.is_empty() {
                &self.config.base_model
            } else {
                &job.base
            },
            job.suffix.as_deref().unwrap_or(""),
            job_tail(&job.id)
        )
    }

    /// The OpenAI `FineTuningJob` object of a job.
    pub fn job_object(&self, j: &JobRow) -> Value {
        let kind = j.method["type"].as_str().unwrap_or("supervised").to_string();
        let hyper = j.method[&kind]["hyperparameters"].clone();
        json!({
            "id": j.id, "object": "fine_tuning.job", "created_at": j.created_at,
            "error": j.error, "fine_tuned_model": j.fine_tuned_model, "finished_at": j.finished_at,
            "hyperparameters": {
                "n_epochs": hyper["n_epochs"], "batch_size": hyper["batch_size"],
                "learning_rate_multiplier": hyper["learning_rate_multiplier"],
            },
            "model": j.model, "organization_id": j.project, "result_files": j.result_files,
            "seed": j.seed, "status": j.status, "trained_tokens": j.trained_tokens,
            "training_file": j.training_file, "validation_file": j.validation_file,
            "estimated_finish": j.estimated_finish, "integrations": [], "metadata": j.metadata,
            "method": j.method, "user_provided_suffix": j.suffix,
        })
    }

    fn job(&self, project: &str, id: &str) -> Result<JobRow, JobsError> {
        self.store.get_job(Some(project), id)?.ok_or_else(|| {
            JobsError::not_found(format!("Fine-tuning job {id} not found.")).with_param("fine_tuning_job_id")
        })
    }

    /// `POST /v1/fine_tuning/jobs`: checks the request and its files, records the job and
    /// queues it.
    pub fn create_job(&self, project: &str, body: &Value) -> Result<Value, JobsError> {
        let req = request::parse_create(body)?;
        // The model: the served base, or a fine-tuned model of this project to continue.
        let init_from = if req.model == self.config.base_model
            || self.config.base_aliases.contains(&req.model)
        {
            None
        } else {
            match self.resolve_model(project, &req.model)? {
                Some(m) => Some(m.dir),
                None => {
                    return Err(JobsError::invalid(
                        "model",
                        format!(
                            "Model {} is not available for fine-tuning on this server; use {} (the served base model) or one of your ft: models",
                            req.model, self.config.base_model
                        ),
                    )
                    .with_code("model_not_available"));
                }
            }
        };
        let check = |id: &str, param: &str| -> Result<FileRow, JobsError> {
            let f = self.store.get_file(project, id)?.ok_or_else(|| {
                JobsError::invalid(param, format!("invalid {param}: no file {id}"))
                    .with_code("invalid_file_id")
            })?;
            if f.purpose != "fine-tune" {
                return Err(JobsError::invalid(
                    param,
                    format!(
                        "invalid {param}: {id} has purpose {:?}, not \"fine-tune\"",
                        f.purpose
                    ),
                ));
            }
            if f.kind.as_deref() != Some(req.method.as_str()) {
                return Err(JobsError::invalid(
                    param,
                    format!(
                        "invalid {param}: {id} holds {} examples, but the job's method is {}",
                        f.kind.as_deref().unwrap_or("unknown"),
                        req.method
                    ),
                )
                .with_code("invalid_file_format"));
            }
            Ok(f)
        };
        let train = check(&req.training_file, "training_file")?;
        let validation = req
            .validation_file
            .as_deref()
            .map(|v| check(v, "validation_file"))
            .transpose()?;
        let resolved = request::resolve(&req, train.examples);
        let id = new_id("ftjob-");
        let seed = req.seed.unwrap_or_else(|| now() % 2_147_483_647);
        let job = JobRow {
            id: id.clone(),
            project: project.to_string(),
            created_at: now(),
            status: "validating_files".into(),
            model: req.model.clone(),
            base: self.config.base_model.clone(),
            training_file: train.id.clone(),
            validation_file: validation.as_ref().map(|v| v.id.clone()),
            suffix: req.suffix.clone(),
            seed,
            metadata: req.metadata.clone(),
            method: resolved.method_object(&req),
            graft: Value::Object(req.graft.clone()),
            init_from: init_from.map(|p| p.display().to_string()),
            ..JobRow::default()
        };
        // The whole training config must be valid before the job is accepted.
        config::train_config(self, &job).map_err(|e| e.with_param_if_none("graft"))?;
        if let Some(g) = &req.grader {
            config::check_grader(self, g)?;
        }
        self.store.insert_job(&job)?;
        self.event(
            &id,
            "info",
            &format!("Validating training file: {}", train.id),
            None,
        )?;
        if let Some(v) = &validation {
            self.event(
                &id,
                "info",
                &format!("Validating validation file: {}", v.id),
                None,
            )?;
        }
        let created = self.job_object(&job);
        self.store.modify_job(&id, |j| {
            if j.status == "validating_files" {
                j.status = "queued".into();
            }
        })?;
        self.event(&id, "info", "Files validated, moving job to queued state", None)?;
        Ok(created)
    }

    /// `GET /v1/fine_tuning/jobs`.
    pub fn list_jobs(&self, project: &str, q: &ListQuery) -> Result<Value, JobsError> {
        let (rows, more) = self
            .store
            .list_jobs(project, q.after.as_deref(), q.limit(20), &q.metadata)?;
        Ok(page(rows.iter().map(|j| self.job_object(j)).collect(), more))
    }

    /// `GET /v1/fine_tuning/jobs/{id}`.
    pub fn get_job(&self, project: &str, id: &str) -> Result<Value, JobsError> {
        Ok(self.job_object(&self.job(project, id)?))
    }

    /// `POST …/{id}/cancel`: a queued or paused job ends now; a running one stops at its next
    /// step (the answer shows it `cancelled`, as OpenAI's does).
    pub fn cancel_job(&self, project: &str, id: &str) -> Result<Value, JobsError> {
        self.control(project, id, "cancel")
    }

    /// `POST …/{id}/pause`: a running job saves a checkpoint and waits; a queued one waits.
    pub fn pause_job(&self, project: &str, id: &str) -> Result<Value, JobsError> {
        self.control(project, id, "pause")
    }

    /// `POST …/{id}/resume`: a paused job goes back to the queue and continues from its last
    /// checkpoint.
    pub fn resume_job(&self, project: &str, id: &str) -> Result<Value, JobsError> {
        let job = self.job(project, id)?;
        let (job, ok) = self
            .store
            .modify_job(&job.id, |j| {
                if j.status != "paused" {
                    return false;
                }
                j.status = "queued".into();
                j.control = None;
                true
            })?
            .ok_or_else(|| JobsError::not_found(format!("Fine-tuning job {id} not found.")))?;
        if !ok {
            return Err(JobsError::invalid(
                "fine_tuning_job_id",
                format!("Job {id} is {}; only a paused job can be resumed.", job.status),
            )
            .with_code("invalid_job_state"));
        }
        self.event(id, "info", "Fine-tuning job resumed", None)?;
        Ok(self.job_object(&job))
    }

    fn control(&self, project: &str, id: &str, what: &str) -> Result<Value, JobsError> {
        let job = self.job(project, id)?;
        let (job, outcome) = self
            .store
            .modify_job(&job.id, |j| match (j.status.as_str(), what) {
                ("validating_files" | "queued" | "paused", "cancel") => {
                    j.status = "cancelled".into();
                    j.finished_at = Some(now());
                    j.control = None;
                    Ok(Some("Fine-tuning job cancelled"))
                }
                ("validating_files" | "queued", "pause") => {
                    j.status = "paused".into();
                    Ok(Some("Fine-tuning job paused"))
                }
                ("running", _) => {
                    j.control = Some(what.to_string());
                    Ok(None)
                }
                (s, _) => Err(s.to_string()),
            })?
            .ok_or_else(|| JobsError::not_found(format!("Fine-tuning job {id} not found.")))?;
        match outcome {
            Err(state) => Err(JobsError::invalid(
                "fine_tuning_job_id",
                format!(
                    "Job {id} is {state}; it cannot be {}.",
                    if what == "cancel" { "cancelled" } else { "paused" }
                ),
            )
            .with_code("invalid_job_state")),
            Ok(Some(msg)) => {
                self.event(id, "info", msg, None)?;
                Ok(self.job_object(&job))
            }
            Ok(None) => {
                // Running: the worker stops at its next step; answer with the state it is moving to.
                let mut shown = job.clone();
                shown.status = if what == "cancel" { "cancelled" } else { "paused" }.into();
                Ok(self.job_object(&shown))
            }
        }
    }

    /// `GET …/{id}/events`.
    pub fn list_events(&self, project: &str, id: &str, q: &ListQuery) -> Result<Value, JobsError> {
        let job = self.job(project, id)?;
        let (rows, more) = self.store.list_events(&job.id, q.after.as_deref(), q.limit(20))?;
        Ok(
            json!({"object": "list", "data": rows.iter().map(event_object).collect::<Vec<_>>(), "has_more": more}),
        )
    }

    /// `GET …/{id}/checkpoints`.
    pub fn list_checkpoints(&self, project: &str, id: &str, q: &ListQuery) -> Result<Value, JobsError> {
        let job = self.job(project, id)?;
        let (rows, more) = self
            .store
            .list_checkpoints(&job.id, q.after.as_deref(), q.limit(10))?;
        Ok(page(rows.iter().map(checkpoint_object).collect(), more))
    }

    // ----- graders -----

    fn grader_options(&self) -> graft_train::reward_fns::graders::GraderOptions {
        let mut o = graft_train::reward_fns::graders::GraderOptions::from_env();
        if let Some(u) = &self.config.grader_base_url {
            o.base_url = Some(u.clone());
        }
        o.allow_python = self.config.allow_python_graders;
        o
    }

    fn body_fields<'a>(
        body: &'a Value,
        allowed: &[&str],
    ) -> Result<&'a serde_json::Map<String, Value>, JobsError> {
        let obj = body
            .as_object()
            .ok_or_else(|| JobsError::invalid("body", "the body must be a JSON object"))?;
        for k in obj.keys() {
            if !allowed.contains(&k.as_str()) {
                return Err(JobsError::invalid(
                    k.as_str(),
                    format!(
                        "Unrecognized request argument supplied: {k} (known: {})",
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(obj)
    }

    /// `POST /v1/fine_tuning/alpha/graders/validate`: the grader, when it is valid.
    pub fn validate_grader(&self, body: &Value) -> Result<Value, JobsError> {
        let obj = Self::body_fields(body, &["grader"])?;
        let g = obj
            .get("grader")
            .ok_or_else(|| JobsError::invalid("grader", "Missing required parameter: 'grader'."))?;
        graft_train::reward_fns::graders::grader_from_json(g, &self.grader_options())
            .map_err(|e| JobsError::invalid("grader", e))?;
        Ok(json!({"grader": g}))
    }

    /// `POST /v1/fine_tuning/alpha/graders/run`: grades one `model_sample` against `item`.
    pub fn run_grader(&self, body: &Value) -> Result<Value, JobsError> {
        let obj = Self::body_fields(body, &["grader", "model_sample", "item"])?;
        let g = obj
            .get("grader")
            .ok_or_else(|| JobsError::invalid("grader", "Missing required parameter: 'grader'."))?;
        let sample = obj.get("model_sample").ok_or_else(|| {
            JobsError::invalid("model_sample", "Missing required parameter: 'model_sample'.")
        })?;
        let item = obj.get("item").cloned().unwrap_or(Value::Null);
        graft_train::reward_fns::graders::run_grader(g, &self.grader_options(), sample, &item)
            .map_err(|e| JobsError::invalid("grader", e))
    }

    // ----- models -----

    /// The fine-tuned model (or checkpoint) `name` of `project`, if it exists and is ready.
    pub fn resolve_model(&self, project: &str, name: &str) -> Result<Option<FineTunedModel>, JobsError> {
        let Some(rest) = name.strip_prefix("ft:") else {
            return Ok(None);
        };
        let (head, last) = match rest.rsplit_once(':') {
            Some(x) => x,
            None => return Ok(None),
        };
        let (tail, step) = match last.strip_prefix("ckpt-step-") {
            Some(s) => match (s.parse::<u64>(), head.rsplit_once(':')) {
                (Ok(step), Some((_, tail))) => (tail, Some(step)),
                _ => return Ok(None),
            },
            None => (last, None),
        };
        let Some(job) = self.store.get_job(Some(project), &format!("ftjob-{tail}"))? else {
            return Ok(None);
        };
        let base = self.model_name(&job);
        match step {
            None => {
                if name != base || job.model_deleted || job.fine_tuned_model.is_none() {
                    return Ok(None);
                }
                Ok(Some(FineTunedModel {
                    id: name.to_string(),
                    dir: self.run_dir(&job.id).join("adapter"),
                    created: job.finished_at.unwrap_or(job.created_at),
                    project: job.project,
                }))
            }
            Some(step) => {
                if name != format!("{base}:ckpt-step-{step}") {
                    return Ok(None);
                }
                let dir = graft_train::checkpoint::checkpoint_dir(&self.run_dir(&job.id), step)
                    .join(graft_train::sft::CHECKPOINT_PEFT_DIR);
                if !dir.join("adapter_config.json").is_file() {
                    return Ok(None);
                }
                let created = std::fs::metadata(&dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(job.created_at, |d| d.as_secs());
                Ok(Some(FineTunedModel {
                    id: name.to_string(),
                    dir,
                    created,
                    project: job.project,
                }))
            }
        }
    }

    /// The fine-tuned models of `project` (for `/v1/models`), newest first.
    pub fn list_models(&self, project: &str) -> Result<Vec<FineTunedModel>, JobsError> {
        Ok(self
            .store
            .jobs_with_models(Some(project))?
            .into_iter()
            .map(|j| FineTunedModel {
                id: j.fine_tuned_model.clone().unwrap_or_default(),
                dir: self.run_dir(&j.id).join("adapter"),
                created: j.finished_at.unwrap_or(j.created_at),
                project: j.project,
            })
            .collect())
    }

    /// `DELETE /v1/models/{id}` of a fine-tuned model: it is no longer listed or served (its
    /// job stays). `Ok(None)` when `project` has no such model.
    pub fn delete_model(&self, project: &str, name: &str) -> Result<Option<Value>, JobsError> {
        if self.resolve_model(project, name)?.is_none() {
            return Ok(None);
        }
        if name.contains(":ckpt-step-") {
            return Err(JobsError::invalid(
                "model",
                "a checkpoint model is deleted with its job's model, not on its own",
            ));
        }
        let tail = name.rsplit(':').next().unwrap_or_default();
        self.store
            .modify_job(&format!("ftjob-{tail}"), |j| j.model_deleted = true)?;
        Ok(Some(json!({"id": name, "object": "model", "deleted": true})))
    }
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), JobsError> {
    graft_train::checkpoint::write_atomically(path, bytes)
        .map_err(|e| JobsError::internal(format!("cannot write {}: {e}", path.display())))
}

impl JobsError {
    fn with_param_if_none(mut self, param: &str) -> JobsError {
        if self.param.is_none() {
            self.param = Some(param.to_string());
        }
        self
    }
}
