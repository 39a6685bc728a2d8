//! [`AppState`]: what every endpoint shares (engine, registry, tokenizer, template, keys,
//! metrics), and the lookups they have in common: model names and tokenization.

use crate::drain::Drain;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::registry::{AdapterEntry, Registry};
use graft_data::{ChatTemplate, Tokenizer};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Everything the endpoints share.
pub struct AppState {
    /// The scheduler.
    pub engine: Engine,
    /// Loaded adapters.
    pub registry: Arc<Registry>,
    /// The base model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The chat template (`None`: chat completions are refused).
    pub template: Option<ChatTemplate>,
    /// The name requests use for the base model.
    pub base_name: String,
    /// Other names accepted for the base model (e.g. the `--model` path).
    pub base_aliases: Vec<String>,
    /// Accepted API keys (empty: no authentication).
    pub api_keys: Vec<String>,
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// End-of-sequence token ids.
    pub eos: Vec<u32>,
    /// Vocabulary size of the model.
    pub vocab: usize,
    /// Unix seconds the server started.
    pub created: u64,
    /// Request id counter.
    pub next_id: AtomicU64,
    /// Largest request body accepted, in bytes (beyond: 413).
    pub max_body_bytes: usize,
    /// How long `/health` waits for the engine loop to answer.
    pub health_timeout: std::time::Duration,
    /// Shutdown: requests in flight, draining, cutting.
    pub drain: Arc<Drain>,
    /// How long open requests may run on after shutdown begins.
    pub shutdown_grace: std::time::Duration,
    /// Largest file upload accepted, in bytes.
    pub max_file_bytes: usize,
    /// The fine-tuning jobs service (`graft serve --jobs`).
    pub jobs: Option<Arc<graft_jobs::Jobs>>,
}

impl AppState {
    /// The base model (`None` or one of its names), an adapter `project` may use, or one of
    /// its fine-tuned models (`ft:…`, loaded on first use); 404 otherwise — also for another
    /// project's adapters, so their names do not leak.
    pub fn resolve_model(
        &self,
        name: Option<&str>,
        project: &str,
    ) -> Result<(String, Option<Arc<AdapterEntry>>), ApiError> {
        let Some(name) = name else {
            return Ok((self.base_name.clone(), None));
        };
        if name == self.base_name || self.base_aliases.iter().any(|a| a == name) {
            return Ok((name.to_string(), None));
        }
        if let Some(a) = self.registry.get(name) {
            if a.visible_to(project) {
                return Ok((name.to_string(), Some(a)));
            }
            return Err(ApiError::model_not_found(name));
        }
        if let Some(jobs) = &self.jobs
            && let Some(m) = jobs
                .resolve_model(project, name)
                .map_err(crate::error::jobs_error)?
        {
            let entry = self
                .registry
                .load_fine_tuned(&m.id, &m.dir, &m.project)
                .map_err(|e| {
                    // The reason names server paths: it goes to the log, not to the client.
                    eprintln!("graft serve: loading {name}: {e}");
                    ApiError::internal(format!(
                        "the fine-tuned model {name} cannot be loaded; see the server log"
                    ))
                })?;
            self.update_adapter_gauge();
            return Ok((name.to_string(), Some(entry)));
        }
        Err(ApiError::model_not_found(name))
    }

    /// Token ids of `text` (`special`: add BOS/EOS as the tokenizer does); errors name `param`.
    pub fn encode(&self, text: &str, special: bool, param: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode(text, special)
            .map(|e| e.ids)
            .map_err(|e| ApiError::invalid(param, format!("cannot tokenize the {param}: {e}")))
    }

    /// Publishes the number of resident adapters to the metrics.
    pub fn update_adapter_gauge(&self) {
        self.metrics
            .adapters_loaded
            .store(self.registry.len() as u64, Ordering::Relaxed);
    }
}
