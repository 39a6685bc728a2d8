//! The fine-tuning jobs settings `graft serve --jobs` and `graft worker` share, and `graft
//! worker`: a process that trains queued jobs of a shared PostgreSQL state (`SELECT … FOR UPDATE
//! SKIP LOCKED` claims, renewed leases) on a state directory shared with the server.

use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// Settings of the jobs service (flattened into `serve` and `worker`).
#[derive(clap::Args, Clone, Debug)]
pub struct JobsArgs {
    /// Where the fine-tuning state lives: uploaded files and run directories (and the SQLite
    /// database unless --database is given). Workers and the server share it.
    #[arg(long, default_value = "graft-state")]
    pub state_dir: PathBuf,
    /// A `postgres://user:password@host/db` URL: keep jobs state in PostgreSQL, so `graft
    /// worker` processes on other machines can train the queued jobs (default: SQLite under
    /// --state-dir, one process).
    #[arg(long)]
    pub database: Option<String>,
    /// Fine-tuning jobs trained at once by this process (0: none — the server only queues
    /// them for workers).
    #[arg(long, default_value_t = 1)]
    pub max_concurrent_jobs: usize,
    /// Threads each fine-tuning job trains with (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub train_threads: usize,
    /// Seconds a worker's claim on a running job holds without renewal; a job whose worker
    /// died is requeued (and resumes from its last checkpoint) after it.
    #[arg(long, default_value_t = 60)]
    pub lease_seconds: u64,
    /// Let reinforcement jobs use `python` graders (run in the reward sandbox: no network,
    /// time and memory limits).
    #[arg(long)]
    pub allow_python_graders: bool,
    /// OpenAI-compatible endpoint that `score_model` / `label_model` graders call (default:
    /// $GRAFT_GRADER_BASE_URL, else the server itself).
    #[arg(long)]
    pub grader_base_url: Option<String>,
}

/// This process's worker name: host name and process id.
fn worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    format!("{host}-{}", std::process::id())
}

impl JobsArgs {
    /// The jobs config for a service over `model` (served as `base_name`).
    pub fn config(
        &self,
        model: &Path,
        base_name: &str,
        tokenizer: Option<&Path>,
        chat_template: Option<&Path>,
        default_grader_url: Option<String>,
    ) -> graft_jobs::JobsConfig {
        let model_path = graft_hub::hub::resolve_model_path(&model.to_string_lossy())
            .unwrap_or_else(|_| model.to_path_buf());
        let mut j = graft_jobs::JobsConfig::new(
            self.state_dir.clone(),
            base_name,
            &model_path.display().to_string(),
            0,
        );
        j.max_concurrent_jobs = self.max_concurrent_jobs;
        j.train_threads = self.train_threads;
        j.allow_python_graders = self.allow_python_graders;
        j.grader_base_url = self
            .grader_base_url
            .clone()
            .or_else(|| {
                std::env::var("GRAFT_GRADER_BASE_URL")
                    .ok()
                    .filter(|u| !u.is_empty())
            })
            .or(default_grader_url);
        j.chat_template = chat_template.map(|p| p.display().to_string());
        j.tokenizer = tokenizer.map(|p| p.display().to_string());
        j.database = self.database.clone();
        j.lease_s = self.lease_seconds;
        j.worker_id = worker_id();
        j
    }
}

/// Arguments of `graft worker`.
#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The base model the server serves (the same files: jobs train LoRA adapters on it).
    #[arg(long)]
    model: PathBuf,
    /// The name the server serves it under (default: the model directory or file name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Tokenizer to use instead of the model's (as the server does).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Jinja chat template file to use instead of the model's (as the server does).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    #[command(flatten)]
    jobs: JobsArgs,
}

/// Runs `graft worker` until SIGINT / SIGTERM; running jobs then save a checkpoint and go back
/// to the queue.
pub fn run_worker(args: &WorkerArgs) -> Result<()> {
    if args.jobs.database.is_none() {
        bail!(
            "graft worker needs --database postgres://…: workers share the jobs state with the server through PostgreSQL \
             (with SQLite, `graft serve --jobs` trains the jobs itself)"
        );
    }
    if args.jobs.max_concurrent_jobs == 0 {
        bail!("--max-concurrent-jobs 0: a worker must train at least one job at a time");
    }
    let loaded = graft_hub::hub::load_model_or_download(&args.model.to_string_lossy())
        .map_err(|e| anyhow::anyhow!("--model {}: {e}", args.model.display()))?;
    let context = loaded.spec.max_position_embeddings;
    drop(loaded);
    let base = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| crate::serve_cmd::default_model_name(&args.model));
    let mut cfg = args.jobs.config(
        &args.model,
        &base,
        args.tokenizer.as_deref(),
        args.chat_template.as_deref(),
        None,
    );
    cfg.context = context;
    let stop = graft_train::signal::StopFlag::install()?;
    let jobs = graft_jobs::Jobs::open(cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "graft worker {}: training queued jobs on `{base}` ({} at a time)",
        jobs.config.worker_id, jobs.config.max_concurrent_jobs
    );
    while !stop.is_set() {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    eprintln!("graft worker: stopping; running jobs save a checkpoint and go back to the queue");
    jobs.shutdown();
    Ok(())
}
