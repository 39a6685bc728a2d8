//! A fine-tuning job as a graft training config: LoRA on the served base, OpenAI's
//! hyperparameters mapped onto graft's keys, then the job's own `graft` settings applied as
//! `--set` overrides (so their errors name the key as `graft train` does).
//!
//! | OpenAI | graft |
//! |---|---|
//! | `supervised` / `dpo` / `reinforcement` | `method = "sft"` / `"dpo"` / `"grpo"` |
//! | `n_epochs` | `train.epochs` |
//! | `batch_size` (examples per step; prompts under reinforcement) | `batch.micro_batch_rows × batch.grad_accum`, `data.packing = false` |
//! | `learning_rate_multiplier` | `optimizer.lr = multiplier × 1e-4` |
//! | `beta` (dpo) | `dpo.beta` |
//! | `compute_multiplier` (reinforcement) | `grpo.num_generations = max(2, round(4 × multiplier))` |
//! | `eval_interval` (reinforcement) | `train.eval_every` |
//! | `grader` | `[[rewards]] name = "openai_grader"` |
//! | `seed` | `train.seed` |
//!
//! A checkpoint is saved every epoch (at most every 100 steps), three kept, as OpenAI keeps
//! the last three.

use crate::request::BASE_LR;
use crate::store::JobRow;
use crate::{Jobs, JobsError};
use graft_train::config::TrainConfig;
use serde_json::{Map, Value, json};

/// Keys a job's `graft` settings may not set: the server decides them.
const RESERVED: &[&str] = &[
    "method",
    "full",
    "model.path",
    "data.train",
    "data.eval",
    "output.dir",
    "train.threads",
    "lora.enabled",
    "lora.init_from",
    "rewards",
    "model.tokenizer",
    "data.chat_template",
];

fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_nulls).collect()),
        other => other.clone(),
    }
}

fn to_toml(v: &Value, place: &str) -> Result<toml::Value, JobsError> {
    toml::Value::try_from(strip_nulls(v))
        .map_err(|e| JobsError::invalid(place, format!("{place}: cannot be expressed as a setting: {e}")))
}

/// Flattens `{"lora": {"r": 8}, "data.max_length": 512}` into dotted keys.
fn flatten(prefix: &str, m: &Map<String, Value>, out: &mut Vec<(String, Value)>) {
    for (k, v) in m {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            Value::Object(inner) if !inner.is_empty() => flatten(&key, inner, out),
            _ => out.push((key, v.clone())),
        }
    }
}

/// The `[[rewards]]` entry of a reinforcement job's grader.
fn grader_reward(jobs: &Jobs, grader: &Value) -> Value {
    let mut r = json!({"name": "openai_grader", "grader": strip_nulls(grader)});
    if jobs.config.allow_python_graders {
        r["allow_python"] = json!(true);
    }
    if let Some(u) = &jobs.config.grader_base_url {
        r["base_url"] = json!(u);
    }
    r
}

/// Checks that a grader builds (every field known and well-typed).
pub fn check_grader(jobs: &Jobs, grader: &Value) -> Result<(), JobsError> {
    let mut opts = grader_reward(jobs, grader);
    opts.as_object_mut().map(|o| o.remove("name"));
    graft_train::reward_fns::from_config("openai_grader", &opts)
        .map(|_| ())
        .map_err(|e| JobsError::invalid("method.reinforcement.grader", e))
}

/// The training config of `job`, its run directory under the job's directory.
pub fn train_config(jobs: &Jobs, job: &JobRow) -> Result<TrainConfig, JobsError> {
    let kind = job.method["type"].as_str().unwrap_or("supervised");
    let h = &job.method[kind]["hyperparameters"];
    let n_epochs = h["n_epochs"].as_u64().unwrap_or(1);
    let batch = h["batch_size"].as_u64().unwrap_or(1).max(1);
    let lr = h["learning_rate_multiplier"].as_f64().unwrap_or(2.0) * BASE_LR;
    let examples = jobs
        .store
        .get_file(&job.project, &job.training_file)?
        .map_or(1, |f| f.examples.max(1));
    let steps_per_epoch = examples.div_ceil(batch).max(1);
    let mut t = toml::Table::new();
    let mut set = |path: &str, v: toml::Value| {
        let mut node = &mut t;
        let parts: Vec<&str> = path.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            node = node
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("config sections are tables");
        }
        node.insert(parts[parts.len() - 1].to_string(), v);
    };
    use toml::Value as T;
    let method = match kind {
        "dpo" => "dpo",
        "reinforcement" => "grpo",
        _ => "sft",
    };
    set("method", T::String(method.into()));
    set("model.path", T::String(jobs.config.model_path.clone()));
    set(
        "data.train",
        T::Array(vec![T::String(
            jobs.file_path(&job.training_file).display().to_string(),
        )]),
    );
    if let Some(v) = &job.validation_file {
        set(
            "data.eval",
            T::Array(vec![T::String(jobs.file_path(v).display().to_string())]),
        );
    }
    set(
        "data.max_length",
        T::Integer(jobs.config.context.min(2048) as i64),
    );
    set("data.packing", T::Boolean(false));
    if let Some(t) = &jobs.config.chat_template {
        set("data.chat_template", T::String(t.clone()));
    }
    if let Some(t) = &jobs.config.tokenizer {
        set("model.tokenizer", T::String(t.clone()));
    }
    set("optimizer.lr", T::Float(lr));
    set("train.epochs", T::Integer(n_epochs as i64));
    set("train.seed", T::Integer(job.seed as i64));
    set("train.log_every", T::Integer(1));
    set("train.save_every", T::Integer(steps_per_epoch.min(100) as i64));
    set("train.keep_checkpoints", T::Integer(3));
    set("train.eval_every", T::Integer(steps_per_epoch as i64));
    set("train.threads", T::Integer(0));
    set(
        "output.dir",
        T::String(jobs.run_dir(&job.id).display().to_string()),
    );
    if let Some(dir) = &job.init_from {
        set("lora.init_from", T::String(dir.clone()));
    }
    match kind {
        "reinforcement" => {
            let g = ((4.0 * h["compute_multiplier"].as_f64().unwrap_or(1.0)).round() as i64).max(2);
            set("grpo.num_generations", T::Integer(g));
            set(
                "grpo.max_completion_length",
                T::Integer((jobs.config.context / 2).clamp(16, 512) as i64),
            );
            set("data.prompt_column", T::String("messages".into()));
            set("batch.micro_batch_rows", T::Integer(g));
            set("batch.grad_accum", T::Integer(batch as i64));
            if let Some(every) = h["eval_interval"].as_u64() {
                set("train.eval_every", T::Integer(every as i64));
            }
            let grader = &job.method["reinforcement"]["grader"];
            let reward = to_toml(&grader_reward(jobs, grader), "method.reinforcement.grader")?;
            t.insert("rewards".into(), T::Array(vec![reward]));
        }
        _ => {
            let rows = (1..=batch.min(8))
                .rev()
                .find(|d| batch.is_multiple_of(*d))
                .unwrap_or(1);
            set("batch.micro_batch_rows", T::Integer(rows as i64));
            set("batch.grad_accum", T::Integer((batch / rows) as i64));
            if kind == "dpo" {
                set("dpo.beta", T::Float(h["beta"].as_f64().unwrap_or(0.1)));
            }
        }
    }
    let text = toml::to_string(&t).map_err(|e| JobsError::internal(format!("job config: {e}")))?;
    let mut extras = Vec::new();
    if let Value::Object(g) = &job.graft {
        flatten("", g, &mut extras);
    }
    let mut sets = Vec::new();
    for (k, v) in &extras {
        if RESERVED.iter().any(|r| k == r || k.starts_with(&format!("{r}."))) {
            return Err(JobsError::invalid(
                format!("graft.{k}"),
                format!("graft.{k}: set by the server for every job; it cannot be changed per job"),
            ));
        }
        let lit = match v {
            Value::String(s) => T::String(s.clone()).to_string(),
            other => to_toml(other, &format!("graft.{k}"))?.to_string(),
        };
        sets.push(format!("{k}={lit}"));
    }
    TrainConfig::from_toml_str(&text, "the fine-tuning job", &sets)
        .map_err(|e| JobsError::invalid("graft", format!("graft: {e}")))
}
