//! `graft serve`: an OpenAI-compatible server over one base model and its LoRA adapters
//! (continuous batching, adapters hot-loaded while serving). The work is in `graft-serve`.

use crate::model_io;
use anyhow::{Context, Result, bail};
use graft_kernels::Precision;
use graft_model::model::WeightStorage;
use graft_serve::ServeOptions;
use std::path::PathBuf;

/// Arguments of `graft serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Model: a Hugging Face directory or hub id (`org/name`), a llama2.c `.bin` (tokenizer
    /// beside it) or a `.gguf`.
    #[arg(long)]
    model: PathBuf,
    /// Directory of PEFT adapters: every subdirectory with an adapter_config.json is loaded at
    /// startup under its directory name, and adapters may be hot-loaded from inside it.
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// Another directory adapters may be hot-loaded from (repeatable).
    #[arg(long = "adapter-root")]
    adapter_roots: Vec<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// API key clients must send as `Authorization: Bearer KEY` (repeatable; also
    /// $GRAFT_API_KEY). Without one, no key is required.
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Sequences allowed to wait for a batch slot; beyond, requests get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Prompt tokens prefilled per engine step at most (bounds decode latency of others).
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Name the base model is served under (default: the model directory or file name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Tokenizer to use instead of the model's.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Jinja chat template file to use instead of (or when the model lacks) its own.
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Context length (default: the model's max_position_embeddings).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// KV-cache positions the running batch may reserve in total (each request reserves its
    /// prompt + max_tokens; others wait). Default: half the memory available at startup.
    #[arg(long)]
    kv_cache_tokens: Option<usize>,
    /// Exact f32 weights and matrix products (greedy output equals `graft generate --exact`);
    /// default is bf16 weights and products (equal to `graft generate`).
    #[arg(long)]
    exact: bool,
    /// After SIGTERM / Ctrl-C: seconds open requests may run on (new requests get 503);
    /// those still open are then ended with an error event and graft exits non-zero. A
    /// second signal cuts them at once.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    shutdown_grace: f64,
    /// Seconds /health waits for the engine loop (answered between engine steps) before 503.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    health_timeout: f64,
    /// Serve OpenAI's fine-tuning API too (`/v1/files`, `/v1/fine_tuning/jobs`): jobs train
    /// LoRA adapters on the served model in this process, and each finished model is served
    /// at once as `ft:{model}:{suffix}:{id}`.
    #[arg(long)]
    jobs: bool,
    #[command(flatten)]
    jobs_args: crate::jobs_cmd::JobsArgs,
    /// Threads the inference engine computes with (0: one per core).
    #[arg(long, default_value_t = 0)]
    serve_threads: usize,
}

/// Seconds from a flag as a duration; errors name the flag.
fn seconds(flag: &str, secs: f64) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(secs)
        .map_err(|_| anyhow::anyhow!("--{flag} {secs}: expected a number of seconds ≥ 0"))
}

/// The name a model path is served under by default.
pub fn default_model_name(path: &std::path::Path) -> String {
    let p = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let name = if p.is_dir() { p.file_name() } else { p.file_stem() };
    name.and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("graft-model")
        .to_string()
}

/// End-of-sequence ids from a model directory's `generation_config.json` (`eos_token_id`, a
/// number or a list), which instruct models use to stop at their end-of-turn token.
pub fn generation_eos_ids(model: &std::path::Path) -> Vec<u32> {
    let dir =
        graft_hub::hub::resolve_model_path(&model.to_string_lossy()).unwrap_or_else(|_| model.to_path_buf());
    let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => Vec::new(),
    }
}

/// Runs `graft serve` until interrupted.
pub fn run(args: &ServeArgs) -> Result<()> {
    let (storage, precision) = if args.exact {
        (WeightStorage::F32, Precision::Exact)
    } else {
        (WeightStorage::Bf16, Precision::Fast)
    };
    let mut m = model_io::open(&args.model, args.tokenizer.as_deref(), None, storage)?;
    if !args.exact {
        m.model.pack_for_inference();
    }
    for id in generation_eos_ids(&args.model) {
        if !m.model.spec.eos_token_ids.contains(&id) {
            m.model.spec.eos_token_ids.push(id);
        }
    }
    if let Some(path) = &args.chat_template {
        let t = graft_data::ChatTemplate::from_file(path, m.tokenizer.special_tokens().clone())
            .with_context(|| format!("loading chat template {}", path.display()))?;
        m.template = Some(t);
    }
    let base_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_model_name(&args.model));
    let mut options = ServeOptions::new(base_name.clone());
    let given = args.model.display().to_string();
    if given != base_name {
        options.base_aliases.push(given);
    }
    options.api_keys = args.api_keys.clone();
    if let Ok(k) = std::env::var("GRAFT_API_KEY")
        && !k.is_empty()
    {
        options.api_keys.push(k);
    }
    options.max_batch = args.max_batch;
    options.max_queue = args.max_queue;
    options.prefill_chunk = args.prefill_chunk;
    options.precision = precision;
    options.max_context = args.max_model_len;
    options.kv_cache_tokens = args.kv_cache_tokens;
    options.adapters_dir = args.adapters.clone();
    options.adapter_roots = args.adapter_roots.clone();
    options.shutdown_grace = seconds("shutdown-grace", args.shutdown_grace)?;
    options.health_timeout = seconds("health-timeout", args.health_timeout)?;
    if let Some(d) = &args.adapters
        && !d.is_dir()
    {
        bail!("--adapters {}: not a directory", d.display());
    }
    if args.serve_threads > 0 {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(args.serve_threads)
            .build_global();
    }
    if args.jobs {
        options.jobs = Some(args.jobs_args.config(
            &args.model,
            &base_name,
            args.tokenizer.as_deref(),
            args.chat_template.as_deref(),
            Some(format!("http://{}:{}/v1", args.host, args.port)),
        ));
    }
    let has_template = m.template.is_some();
    let state = graft_serve::build_state(m.model, m.tokenizer, m.template, &options)
        .map_err(|e| anyhow::anyhow!(e))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "graft serve: model `{base_name}` with {} adapter(s){}; listening on http://{local}",
            state.registry.len(),
            if has_template {
                ""
            } else {
                " (no chat template: /v1/chat/completions is refused)"
            }
        );
        let drain = state.drain.clone();
        let grace = options.shutdown_grace;
        let signal = async move {
            shutdown_signal().await;
            eprintln!(
                "graft serve: shutting down: open requests have {} s to finish, new ones get 503 (signal again to cut them now)",
                grace.as_secs_f64()
            );
            tokio::spawn(async move {
                shutdown_signal().await;
                eprintln!("graft serve: second signal: cutting open requests");
                drain.cut_all();
            });
        };
        let report = graft_serve::serve(listener, state, signal).await?;
        if report.cut > 0 {
            bail!(
                "shut down with {} request(s) still open: they were ended with an error after the {} s grace period (--shutdown-grace)",
                report.cut,
                grace.as_secs_f64()
            );
        }
        eprintln!("graft serve: every open request finished; stopped");
        Ok(())
    })
}

/// Resolves on Ctrl-C or (Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = ctrl_c => {},
            () = term => {},
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}
