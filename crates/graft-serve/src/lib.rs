//! graft-serve: an OpenAI-compatible server for one base model and many LoRA adapters.
//!
//! * [`engine`] — the scheduler: continuous batching over [`graft_model::model::Model::forward_batch`],
//!   rows of different adapters in one step, bounded queue, cancellation.
//! * [`registry`] — adapters by name, loaded at startup or while serving, unloaded safely.
//! * [`http`] — the axum router with thin handlers for `/v1/chat/completions`,
//!   `/v1/completions`, `/v1/models`, `/v1/adapters`, `/health`, `/metrics`; [`middleware`] —
//!   API keys and request counting as layers; [`api`] parses and validates request bodies into
//!   typed requests and [`error::ApiError`] turns every failure into an OpenAI error object.
//! * [`service`] — what each endpoint does without HTTP (over the shared [`state::AppState`]);
//!   [`response`] — assembling engine events into JSON responses and SSE chunks; [`tools`] —
//!   tool-call parsing.
//! * [`drain`] — graceful shutdown: 503 for new requests, a grace period, then open streams
//!   end with an error event ([`serve`] returns how many were cut).
//! * [`metrics`] — Prometheus text metrics; [`text`] — incremental detokenization, stop strings.
//!
//! ```no_run
//! # fn demo(model: graft_model::model::Model<graft_kernels::Cpu>, tok: graft_data::Tokenizer) {
//! let options = graft_serve::ServeOptions::new("my-model");
//! let state = graft_serve::build_state(model, tok, None, &options).unwrap();
//! let server = graft_serve::spawn(state, "127.0.0.1:0").unwrap();
//! println!("listening on {}", server.addr);
//! # }
//! ```

#![warn(missing_docs)]

pub mod api;
pub mod drain;
pub mod engine;
pub mod error;
pub mod http;
pub mod jobs_http;
pub mod metrics;
pub mod middleware;
pub mod registry;
pub mod response;
pub mod service;
pub mod state;
pub mod text;
pub mod tools;

use engine::{Engine, EngineConfig};
use graft_data::{ChatTemplate, Tokenizer};
use graft_kernels::{Cpu, Precision};
use graft_model::model::Model;
use metrics::Metrics;
use registry::Registry;
use state::AppState;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use error::ApiError;

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The name requests use for the base model.
    pub base_name: String,
    /// Other accepted names for the base model.
    pub base_aliases: Vec<String>,
    /// Accepted API keys (empty: none required).
    pub api_keys: Vec<String>,
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Sequences allowed to wait; beyond, 429.
    pub max_queue: usize,
    /// Prompt tokens prefilled per engine step at most.
    pub prefill_chunk: usize,
    /// Matrix-product precision.
    pub precision: Precision,
    /// Context length (`None`: the model's `max_position_embeddings`).
    pub max_context: Option<usize>,
    /// KV-cache positions the running batch may reserve in total (`None`: half the memory
    /// available at startup).
    pub kv_cache_tokens: Option<usize>,
    /// Load every adapter under this directory at startup (also an adapter root).
    pub adapters_dir: Option<PathBuf>,
    /// Directories adapters may be loaded from while serving.
    pub adapter_roots: Vec<PathBuf>,
    /// Largest request body accepted, in bytes (beyond: 413).
    pub max_body_bytes: usize,
    /// How long `/health` waits for the engine loop, which answers between steps (so this must
    /// exceed the longest step, a prefill chunk); beyond, 503.
    pub health_timeout: std::time::Duration,
    /// After a shutdown signal, how long open requests may finish before they are cut.
    pub shutdown_grace: std::time::Duration,
    /// Largest file upload accepted by `POST /v1/files`, in bytes.
    pub max_file_bytes: usize,
    /// The fine-tuning API (`--jobs`): its state directory, workers and threads. The base
    /// model's names and context are filled in from the served model.
    pub jobs: Option<graft_jobs::JobsConfig>,
}

impl ServeOptions {
    /// Defaults: batch 32, queue 256, prefill chunk 512, fast precision, no keys, 2 MiB bodies,
    /// 5 s health timeout, 30 s shutdown grace, 512 MiB uploads.
    pub fn new(base_name: impl Into<String>) -> ServeOptions {
        ServeOptions {
            base_name: base_name.into(),
            base_aliases: Vec::new(),
            api_keys: Vec::new(),
            max_batch: 32,
            max_queue: 256,
            prefill_chunk: 512,
            precision: Precision::Fast,
            max_context: None,
            kv_cache_tokens: None,
            adapters_dir: None,
            adapter_roots: Vec::new(),
            max_body_bytes: 2 << 20,
            health_timeout: std::time::Duration::from_secs(5),
            shutdown_grace: std::time::Duration::from_secs(30),
            max_file_bytes: 512 << 20,
            jobs: None,
        }
    }
}

/// Builds the shared state: starts the engine and loads the startup adapters.
pub fn build_state(
    model: Model<Cpu>,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    options: &ServeOptions,
) -> Result<Arc<AppState>, String> {
    let mut model = model;
    let max_context = options
        .max_context
        .unwrap_or(model.spec.max_position_embeddings)
        .max(2);
    model.ensure_positions(max_context);
    let mut eos: Vec<u32> = tokenizer.eos_ids().to_vec();
    for &e in &model.spec.eos_token_ids {
        if !eos.contains(&e) {
            eos.push(e);
        }
    }
    let vocab = model.spec.vocab_size;
    // The KV cache holds f16 values in fast mode, f32 in exact mode.
    let value_bytes = if options.precision == Precision::Fast {
        2
    } else {
        4
    };
    let bytes_per_token = (2 * model.spec.num_layers * model.spec.kv_dim() * value_bytes).max(1);
    let kv_budget_tokens = options.kv_cache_tokens.unwrap_or_else(|| {
        available_memory_bytes().map_or(usize::MAX, |m| (m / 2 / bytes_per_token).max(max_context))
    });
    let jobs = match &options.jobs {
        Some(cfg) => {
            let mut cfg = cfg.clone();
            cfg.base_model = options.base_name.clone();
            cfg.base_aliases = options.base_aliases.clone();
            cfg.context = max_context;
            Some(graft_jobs::Jobs::open(cfg).map_err(|e| format!("--jobs: {e}"))?)
        }
        None => None,
    };
    let model = Arc::new(model);
    let mut roots = options.adapter_roots.clone();
    if let Some(d) = &options.adapters_dir {
        roots.push(d.clone());
    }
    let mut reserved = vec![options.base_name.clone()];
    reserved.extend(options.base_aliases.iter().cloned());
    let registry = Arc::new(Registry::new(model.clone(), &roots, reserved));
    if let Some(d) = &options.adapters_dir {
        registry.load_all(d).map_err(|e| e.to_string())?;
    }
    let metrics = Arc::new(Metrics::new());
    metrics
        .adapters_loaded
        .store(registry.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let engine = Engine::start(
        model,
        EngineConfig {
            max_batch: options.max_batch.max(1),
            max_queue: options.max_queue,
            prefill_chunk: options.prefill_chunk.max(1),
            precision: options.precision,
            max_context,
            kv_budget_tokens,
        },
        metrics.clone(),
    );
    Ok(Arc::new(AppState {
        engine,
        registry,
        tokenizer: Arc::new(tokenizer),
        template,
        base_name: options.base_name.clone(),
        base_aliases: options.base_aliases.clone(),
        api_keys: options.api_keys.clone(),
        metrics,
        eos,
        vocab,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        next_id: AtomicU64::new(0),
        max_body_bytes: options.max_body_bytes,
        health_timeout: options.health_timeout,
        drain: Arc::new(drain::Drain::new()),
        shutdown_grace: options.shutdown_grace,
        max_file_bytes: options.max_file_bytes,
        jobs,
    }))
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (Linux).
fn available_memory_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// How a server shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShutdownReport {
    /// Requests still open after the grace period, ended with an error.
    pub cut: usize,
}

/// After the cut, how long connections get to deliver their final events.
const AFTER_CUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `state` on `listener` until `shutdown` resolves, then drains: new requests get 503,
/// open requests get `state.shutdown_grace` to finish, and those still open are cut (a stream
/// ends with an SSE error event, then `[DONE]`). Returns how many were cut.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<ShutdownReport> {
    let drain = state.drain.clone();
    let grace = state.shutdown_grace;
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        shutdown.await;
        drain.begin();
        if !drain.wait_idle(grace).await {
            drain.cut_all();
            drain.wait_idle(AFTER_CUT).await;
        }
        let _ = stopped_tx.send(());
    };
    let server = axum::serve(listener, http::router(state.clone())).with_graceful_shutdown(stop);
    // A client that stops reading must not hold the process after the cut.
    let give_up = async {
        if stopped_rx.await.is_ok() {
            tokio::time::sleep(AFTER_CUT).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = std::future::IntoFuture::into_future(server) => r?,
        () = give_up => {}
    }
    // Running fine-tuning jobs save a checkpoint and go back to the queue.
    if let Some(jobs) = state.jobs.clone() {
        let _ = tokio::task::spawn_blocking(move || jobs.shutdown()).await;
    }
    Ok(ShutdownReport {
        cut: state.drain.cut_count(),
    })
}

/// A server running on its own thread (tests, benchmarks, `graft chat`-style embedding).
pub struct RunningServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// The shared state (registry, metrics, engine).
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<ShutdownReport>>,
}

impl RunningServer {
    /// Shuts down as [`serve`] does (drain, grace period, cut) and waits for the server thread.
    pub fn stop(mut self) -> ShutdownReport {
        self.shutdown()
    }

    fn shutdown(&mut self) -> ShutdownReport {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds `addr` (e.g. `127.0.0.1:0`) and serves on a background thread with its own runtime.
pub fn spawn(state: Arc<AppState>, addr: &str) -> std::io::Result<RunningServer> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr))?;
    let local = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let thread = std::thread::Builder::new()
        .name("graft-http".into())
        .spawn(move || {
            let report = rt.block_on(serve(listener, st, async {
                let _ = rx.await;
            }));
            rt.shutdown_background();
            report.unwrap_or_default()
        })?;
    Ok(RunningServer {
        addr: local,
        state,
        stop: Some(tx),
        thread: Some(thread),
    })
}
