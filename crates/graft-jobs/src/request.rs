//! `POST /v1/fine_tuning/jobs` bodies: the fields OpenAI's SDK sends, checked (unknown fields
//! are errors naming them), and the method's hyperparameters with `"auto"` resolved from the
//! training file's size the way OpenAI describes it.

use crate::JobsError;
use serde_json::{Map, Value, json};

/// Fields a create-job body may hold.
const FIELDS: &[&str] = &[
    "model",
    "training_file",
    "validation_file",
    "suffix",
    "seed",
    "metadata",
    "method",
    "hyperparameters",
    "integrations",
    "graft",
];

/// A create-job request, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct CreateJob {
    /// The base model (or an `ft:` model to continue).
    pub model: String,
    /// Training file id.
    pub training_file: String,
    /// Validation file id.
    pub validation_file: Option<String>,
    /// Model name suffix.
    pub suffix: Option<String>,
    /// Seed (random when not given).
    pub seed: Option<u64>,
    /// Metadata (≤ 16 string pairs).
    pub metadata: Option<Value>,
    /// `supervised`, `dpo` or `reinforcement`.
    pub method: String,
    /// The method's hyperparameters as given (`"auto"` or numbers).
    pub hyperparameters: Map<String, Value>,
    /// The reinforcement grader.
    pub grader: Option<Value>,
    /// graft's own settings: config keys (`lora.r`, `data.max_length`, …) → values.
    pub graft: Map<String, Value>,
}

fn unknown(place: &str, key: &str, known: &[&str]) -> JobsError {
    let p = if place.is_empty() {
        key.to_string()
    } else {
        format!("{place}.{key}")
    };
    JobsError::invalid(
        p.clone(),
        format!(
            "Unrecognized request argument supplied: {p} (known here: {})",
            known.join(", ")
        ),
    )
    .with_code("unknown_parameter")
}

fn string(obj: &Map<String, Value>, key: &str, place: &str) -> Result<Option<String>, JobsError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(JobsError::invalid(
            format!("{place}{key}"),
            format!("{place}{key} must be a string, not {other}"),
        )),
    }
}

fn object<'a>(v: &'a Value, place: &str) -> Result<&'a Map<String, Value>, JobsError> {
    v.as_object()
        .ok_or_else(|| JobsError::invalid(place, format!("{place} must be an object, not {v}")))
}

/// Hyperparameter names per method.
fn hyper_names(method: &str) -> &'static [&'static str] {
    match method {
        "supervised" => &["n_epochs", "batch_size", "learning_rate_multiplier"],
        "dpo" => &["n_epochs", "batch_size", "learning_rate_multiplier", "beta"],
        _ => &[
            "n_epochs",
            "batch_size",
            "learning_rate_multiplier",
            "compute_multiplier",
            "eval_interval",
            "eval_samples",
            "reasoning_effort",
        ],
    }
}

fn check_hypers(h: &Value, method: &str, place: &str) -> Result<Map<String, Value>, JobsError> {
    let h = object(h, place)?;
    let names = hyper_names(method);
    for (k, v) in h {
        if !names.contains(&k.as_str()) {
            return Err(unknown(place, k, names));
        }
        let p = format!("{place}.{k}");
        let auto = v.as_str() == Some("auto") || v.is_null();
        match k.as_str() {
            "reasoning_effort" => {
                if !matches!(v.as_str(), Some("default" | "low" | "medium" | "high")) && !v.is_null() {
                    return Err(JobsError::invalid(
                        p.clone(),
                        format!("{p} must be one of default, low, medium, high, not {v}"),
                    ));
                }
            }
            "n_epochs" | "batch_size" | "eval_interval" | "eval_samples" => {
                let (lo, hi) = match k.as_str() {
                    "n_epochs" => (1, 50),
                    "batch_size" => (1, 256),
                    _ => (1, 1_000_000),
                };
                if !auto && !v.as_u64().is_some_and(|n| (lo..=hi).contains(&n)) {
                    return Err(JobsError::invalid(
                        p.clone(),
                        format!("{p} must be \"auto\" or an integer from {lo} to {hi}, not {v}"),
                    ));
                }
            }
            _ => {
                if !auto && !v.as_f64().is_some_and(|x| x > 0.0 && x <= 100.0) {
                    return Err(JobsError::invalid(
                        p.clone(),
                        format!("{p} must be \"auto\" or a number > 0, not {v}"),
                    ));
                }
            }
        }
    }
    Ok(h.clone())
}

/// Parses and checks a create-job body.
pub fn parse_create(body: &Value) -> Result<CreateJob, JobsError> {
    let obj = object(body, "body")?;
    for k in obj.keys() {
        if !FIELDS.contains(&k.as_str()) {
            return Err(unknown("", k, FIELDS));
        }
    }
    let model = string(obj, "model", "")?
        .ok_or_else(|| JobsError::invalid("model", "Missing required parameter: 'model'."))?;
    let training_file = string(obj, "training_file", "")?
        .ok_or_else(|| JobsError::invalid("training_file", "Missing required parameter: 'training_file'."))?;
    let validation_file = string(obj, "validation_file", "")?;
    let suffix = string(obj, "suffix", "")?;
    if let Some(s) = &suffix {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
        if !ok {
            return Err(JobsError::invalid(
                "suffix",
                format!("suffix must be 1-64 characters from A-Z a-z 0-9 - _ ., not {s:?}"),
            ));
        }
    }
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().filter(|&s| s <= i32::MAX as u64).ok_or_else(|| {
            JobsError::invalid(
                "seed",
                format!("seed must be an integer from 0 to 2147483647, not {v}"),
            )
        })?),
    };
    let metadata = match obj.get("metadata") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let m = object(v, "metadata")?;
            if m.len() > 16 {
                return Err(JobsError::invalid("metadata", "metadata holds at most 16 pairs"));
            }
            for (k, val) in m {
                let ok = k.len() <= 64 && val.as_str().is_some_and(|s| s.len() <= 512);
                if !ok {
                    return Err(JobsError::invalid(
                        format!("metadata.{k}"),
                        "metadata keys are strings of at most 64 characters and values strings of at most 512",
                    ));
                }
            }
            Some(v.clone())
        }
    };
    if let Some(i) = obj.get("integrations")
        && !i.is_null()
        && i.as_array().is_none_or(|a| !a.is_empty())
    {
        return Err(JobsError::invalid(
            "integrations",
            "integrations (Weights & Biases) are not available on this server; metrics are in each job's events and result file",
        ));
    }
    let (method, hyperparameters, grader) = match obj.get("method") {
        None | Some(Value::Null) => {
            let h = match obj.get("hyperparameters") {
                None | Some(Value::Null) => Map::new(),
                Some(h) => check_hypers(h, "supervised", "hyperparameters")?,
            };
            ("supervised".to_string(), h, None)
        }
        Some(m) => {
            let m = object(m, "method")?;
            let kind = string(m, "type", "method.")?.ok_or_else(|| {
                JobsError::invalid("method.type", "Missing required parameter: 'method.type'.")
            })?;
            if !matches!(kind.as_str(), "supervised" | "dpo" | "reinforcement") {
                return Err(JobsError::invalid(
                    "method.type",
                    format!("method.type must be one of supervised, dpo, reinforcement, not {kind:?}"),
                ));
            }
            for k in m.keys() {
                if k != "type" && k != &kind {
                    return Err(unknown("method", k, &["type", kind.as_str()]));
                }
            }
            let place = format!("method.{kind}");
            let (h, grader) = match m.get(&kind) {
                None | Some(Value::Null) => (Map::new(), None),
                Some(inner) => {
                    let inner = object(inner, &place)?;
                    let allowed: &[&str] = if kind == "reinforcement" {
                        &["hyperparameters", "grader", "response_format"]
                    } else {
                        &["hyperparameters"]
                    };
                    for k in inner.keys() {
                        if !allowed.contains(&k.as_str()) {
                            return Err(unknown(&place, k, allowed));
                        }
                    }
                    let h = match inner.get("hyperparameters") {
                        None | Some(Value::Null) => Map::new(),
                        Some(h) => check_hypers(h, &kind, &format!("{place}.hyperparameters"))?,
                    };
                    (h, inner.get("grader").filter(|g| !g.is_null()).cloned())
                }
            };
            if kind == "reinforcement" && grader.is_none() {
                return Err(JobsError::invalid(
                    "method.reinforcement.grader",
                    "Missing required parameter: 'method.reinforcement.grader'.",
                ));
            }
            if obj.get("hyperparameters").is_some_and(|h| !h.is_null()) {
                return Err(JobsError::invalid(
                    "hyperparameters",
                    "give hyperparameters inside method, not both at the top level and in method",
                ));
            }
            (kind, h, grader)
        }
    };
    let graft = match obj.get("graft") {
        None | Some(Value::Null) => Map::new(),
        Some(g) => object(g, "graft")?.clone(),
    };
    Ok(CreateJob {
        model,
        training_file,
        validation_file,
        suffix,
        seed,
        metadata,
        method,
        hyperparameters,
        grader,
        graft,
    })
}

/// Hyperparameters with `"auto"` resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// Passes over the training file.
    pub n_epochs: u64,
    /// Examples (prompts, under reinforcement) per optimizer step.
    pub batch_size: u64,
    /// Multiplies graft's base learning rate ([`BASE_LR`]).
    pub learning_rate_multiplier: f64,
    /// DPO β.
    pub beta: f64,
    /// Reinforcement: completions per prompt scale with it.
    pub compute_multiplier: f64,
    /// Reinforcement: evaluate every this many steps.
    pub eval_interval: u64,
    /// Reinforcement: validation prompts scored per evaluation.
    pub eval_samples: u64,
}

/// The learning rate a multiplier of 1 means for a LoRA adapter (the `auto` multiplier, 2,
/// gives graft's default LoRA rate 2e-4).
pub const BASE_LR: f64 = 1e-4;

fn num<'a>(h: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    h.get(k).filter(|v| !v.is_null() && v.as_str() != Some("auto"))
}

/// Resolves `auto` for a training file of `examples` rows: 3 epochs, raised so the run sees at
/// least 100 examples (at most 25 epochs) and lowered so it sees at most 25,000; a batch of
/// 0.2% of the file (1 to 256); a multiplier of 2 (1 under reinforcement); β 0.1.
pub fn resolve(req: &CreateJob, examples: u64) -> Resolved {
    let h = &req.hyperparameters;
    let n = examples.max(1);
    let n_epochs = num(h, "n_epochs").and_then(Value::as_u64).unwrap_or({
        if n * 3 < 100 {
            100u64.div_ceil(n).min(25)
        } else if n * 3 > 25_000 {
            (25_000 / n).max(1)
        } else {
            3
        }
    });
    let batch_size = num(h, "batch_size")
        .and_then(Value::as_u64)
        .unwrap_or(((n as f64 * 0.002).ceil() as u64).clamp(1, 256));
    let rl = req.method == "reinforcement";
    let steps_per_epoch = n.div_ceil(batch_size);
    Resolved {
        n_epochs,
        batch_size,
        learning_rate_multiplier: num(h, "learning_rate_multiplier")
            .and_then(Value::as_f64)
            .unwrap_or(if rl { 1.0 } else { 2.0 }),
        beta: num(h, "beta").and_then(Value::as_f64).unwrap_or(0.1),
        compute_multiplier: num(h, "compute_multiplier")
            .and_then(Value::as_f64)
            .unwrap_or(1.0),
        eval_interval: num(h, "eval_interval")
            .and_then(Value::as_u64)
            .unwrap_or(steps_per_epoch),
        eval_samples: num(h, "eval_samples").and_then(Value::as_u64).unwrap_or(8),
    }
}

impl Resolved {
    /// The `method` object a job shows: the type and its hyperparameters as numbers.
    pub fn method_object(&self, req: &CreateJob) -> Value {
        let mut h = json!({
            "n_epochs": self.n_epochs,
            "batch_size": self.batch_size,
            "learning_rate_multiplier": self.learning_rate_multiplier,
        });
        let mut inner = Map::new();
        match req.method.as_str() {
            "dpo" => {
                h["beta"] = json!(self.beta);
            }
            "reinforcement" => {
                h["compute_multiplier"] = json!(self.compute_multiplier);
                h["eval_interval"] = json!(self.eval_interval);
                h["eval_samples"] = json!(self.eval_samples);
                h["reasoning_effort"] = req
                    .hyperparameters
                    .get("reasoning_effort")
                    .cloned()
                    .unwrap_or(json!("default"));
                inner.insert("grader".into(), req.grader.clone().unwrap_or(Value::Null));
            }
            _ => {}
        }
        inner.insert("hyperparameters".into(), h);
        json!({"type": req.method, req.method.clone(): Value::Object(inner)})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        json!({"model": "m", "training_file": "file-1"})
    }

    #[test]
    fn defaults_and_auto() {
        let r = parse_create(&base()).unwrap();
        assert_eq!(r.method, "supervised");
        let res = resolve(&r, 10);
        assert_eq!((res.n_epochs, res.batch_size), (10, 1));
        assert_eq!(resolve(&r, 1000).n_epochs, 3);
        assert_eq!(resolve(&r, 20_000).n_epochs, 1);
        assert_eq!(resolve(&r, 1000).batch_size, 2);
        let m = res.method_object(&r);
        assert_eq!(m["supervised"]["hyperparameters"]["n_epochs"], 10);
        let mut b = base();
        b["method"] = json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}});
        let r = parse_create(&b).unwrap();
        let res = resolve(&r, 50);
        assert_eq!((res.n_epochs, res.beta), (2, 0.2));
    }

    #[test]
    fn errors_name_the_field() {
        let mut b = base();
        b["learning_rate"] = json!(1);
        let e = parse_create(&b).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("learning_rate"));
        let mut b = base();
        b["method"] = json!({"type": "supervised", "supervised": {"hyperparameters": {"n_epoch": 2}}});
        let e = parse_create(&b).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("method.supervised.hyperparameters.n_epoch")
        );
        let mut b = base();
        b["method"] = json!({"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 0}}});
        let e = parse_create(&b).unwrap_err();
        assert_eq!(
            e.param.as_deref(),
            Some("method.supervised.hyperparameters.batch_size")
        );
        let mut b = base();
        b["method"] = json!({"type": "reinforcement"});
        let e = parse_create(&b).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("method.reinforcement.grader"));
        let e = parse_create(&json!({"model": "m"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("training_file"));
        let mut b = base();
        b["suffix"] = json!("a:b");
        assert_eq!(parse_create(&b).unwrap_err().param.as_deref(), Some("suffix"));
    }
}
