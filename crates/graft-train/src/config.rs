//! The training configuration: the TOML file behind `graft train CONFIG.toml [--set key=value ...]`.
//!
//! [`TrainConfig::load`] reads the file, applies `--set` overrides (values parsed as TOML, falling
//! back to a plain string), checks every key against [`KEYS`] — an unknown key at any level is an
//! error that names its full path and suggests the nearest valid key, a value of the wrong type names
//! the key and the type it needs — fills defaults, resolves derived values and validates ranges.
//! [`TrainConfig::to_toml`] writes the resolved config back (saved in the run directory);
//! [`TrainConfig::documented_example`] prints every key with its documentation and default
//! (`graft train --print-config`).
//!
//! Every key is optional except `model.path` and `data.train`.

use crate::schedule::ScheduleKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// An error in a training configuration. Messages name the key (as a dotted path) or the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{origin}: invalid TOML: {message}")]
    Parse {
        /// The config file.
        origin: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key that the config does not have.
    #[error("unknown key `{key}` in {origin}{}", suggestion_text(.suggestion))]
    UnknownKey {
        /// The full dotted path of the key.
        key: String,
        /// Where it came from: the file name or `--set`.
        origin: String,
        /// The nearest valid key, when one is close.
        suggestion: Option<String>,
    },
    /// A value of the wrong type.
    #[error("`{key}` in {origin} must be {expected}, found {found}")]
    Type {
        /// The full dotted path of the key.
        key: String,
        /// Where it came from: the file name or `--set`.
        origin: String,
        /// The expected type, in words.
        expected: String,
        /// The value found, in words.
        found: String,
    },
    /// Writing the resolved config failed.
    #[error("{path}: {source}")]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A `--set` argument that is not `key=value`.
    #[error("--set `{arg}`: expected key=value, e.g. --set optimizer.lr=1e-4")]
    BadSet {
        /// The argument as given.
        arg: String,
    },
    /// A value out of range, or keys that conflict.
    #[error("`{key}`: {message}")]
    Invalid {
        /// The key (or keys) at fault.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

fn suggestion_text(s: &Option<String>) -> String {
    match s {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    }
}

/// The training method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Supervised fine-tuning: next-token cross-entropy on the unmasked tokens.
    #[default]
    Sft,
    /// Direct Preference Optimization (and TRL's variants, by `dpo.loss_type`) on preference pairs.
    Dpo,
    /// Contrastive Preference Optimization (reference-free; `[cpo]`).
    Cpo,
    /// SimPO: CPO with `loss_type = "simpo"` and, unless set, `cpo_alpha = 0`.
    Simpo,
    /// Odds Ratio Preference Optimization (reference-free, with the SFT term; `[orpo]`).
    Orpo,
    /// Kahneman–Tversky Optimization on unpaired, labelled completions (`[kto]`).
    Kto,
    /// A reward model (Bradley–Terry on preference pairs, `[reward]`): a `score` head on the
    /// decoder, saved as `AutoModelForSequenceClassification` loads it.
    Reward,
    /// Group Relative Policy Optimization on prompts, scored by `[[rewards]]` (`[grpo]`).
    Grpo,
    /// REINFORCE Leave-One-Out on prompts, scored by `[[rewards]]` (`[rloo]`).
    Rloo,
}

impl Method {
    /// The method's name in a config (`method = "…"`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo => "dpo",
            Method::Cpo => "cpo",
            Method::Simpo => "simpo",
            Method::Orpo => "orpo",
            Method::Kto => "kto",
            Method::Reward => "reward",
            Method::Grpo => "grpo",
            Method::Rloo => "rloo",
        }
    }

    /// Whether the method trains on preference pairs or labelled completions.
    pub fn is_preference(self) -> bool {
        !matches!(self, Method::Sft | Method::Grpo | Method::Rloo)
    }

    /// Whether the method learns from its own generations (GRPO, RLOO).
    pub fn is_rl(self) -> bool {
        matches!(self, Method::Grpo | Method::Rloo)
    }
}

/// Matmul precision of the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 matmul inputs throughout (the fidelity tests' mode).
    Exact,
    /// bf16 matmul inputs with f32 accumulation where the CPU supports it, f32 elsewhere.
    #[default]
    Fast,
}

/// The record format of the data files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Detect from each file's fields.
    #[default]
    Auto,
    /// `{"messages": [{"role", "content"}, ...]}`.
    Openai,
    /// `{"conversations": [{"from", "value"}, ...]}`.
    Sharegpt,
    /// `{"instruction", "input", "output"}`.
    Alpaca,
    /// `{"prompt", "completion"}` (also spelled `prompt-completion`, as `graft data inspect`).
    #[serde(alias = "prompt-completion")]
    PromptCompletion,
    /// `{"text"}`: plain language modelling.
    Text,
}

/// Which tokens the loss is computed on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskPolicy {
    /// Every assistant turn's tokens.
    #[default]
    #[serde(alias = "assistant_only", alias = "assistant-only")]
    Assistant,
    /// Every token.
    #[serde(alias = "all_tokens", alias = "all-tokens")]
    All,
    /// Only the last assistant turn.
    #[serde(alias = "last-assistant")]
    LastAssistant,
    /// The completion of prompt/completion records.
    #[serde(alias = "completion_only", alias = "completion-only")]
    Completion,
}

/// What happens to a sequence longer than `data.max_length`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the first `max_length` tokens.
    #[default]
    Right,
    /// Keep the last `max_length` tokens.
    Left,
    /// Drop the example.
    Drop,
}

/// `[model]`: what to fine-tune.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Model directory or hub id. Required (default: empty, rejected by validation).
    pub path: String,
    /// Tokenizer directory or hub id when it differs from the model's. Default: none (the model's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Matmul precision. Default: `fast`.
    pub precision: Precision,
}

/// `[data]`: the datasets and how they become token sequences.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Training files or folders. Required (default: empty, rejected by validation).
    #[serde(deserialize_with = "one_or_many")]
    pub train: Vec<String>,
    /// Evaluation files or folders. Default: none.
    #[serde(deserialize_with = "one_or_many")]
    pub eval: Vec<String>,
    /// Record format. Default: `auto`.
    pub format: DataFormat,
    /// Maximum tokens per sequence. Default: 2048.
    pub max_length: usize,
    /// Pack several examples into one row (attention kept separate). Default: true.
    pub packing: bool,
    /// Which tokens are trained on. Default: `assistant`.
    pub mask: MaskPolicy,
    /// Chat template: a Jinja file path or the template text itself. Default: the model's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Handling of over-long sequences. Default: `right`.
    pub truncation: Truncation,
    /// Skip malformed records with a warning instead of failing. Default: false.
    pub skip_invalid: bool,
    /// Fraction of the training data held out for evaluation when `eval` is empty. Default: 0.
    pub eval_fraction: f64,
    /// The column holding the prompt of GRPO / RLOO rows. Default: `prompt`.
    pub prompt_column: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: Vec::new(),
            eval: Vec::new(),
            format: DataFormat::Auto,
            max_length: 2048,
            packing: true,
            mask: MaskPolicy::Assistant,
            chat_template: None,
            truncation: Truncation::Right,
            skip_invalid: false,
            eval_fraction: 0.0,
            prompt_column: "prompt".into(),
        }
    }
}

/// Which linear layers get LoRA adapters.
#[derive(Clone, Debug, PartialEq)]
pub enum LoraTargets {
    /// Every linear layer of the decoder except the output head (PEFT's `"all-linear"`).
    AllLinear,
    /// Layers whose name ends with one of these (e.g. `q_proj`).
    Modules(Vec<String>),
}

impl Serialize for LoraTargets {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LoraTargets::AllLinear => s.serialize_str("all-linear"),
            LoraTargets::Modules(m) => m.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for LoraTargets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = one_or_many(d)?;
        Ok(if list.len() == 1 && list[0] == "all-linear" {
            LoraTargets::AllLinear
        } else {
            LoraTargets::Modules(list)
        })
    }
}

/// `[lora]`: the adapter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Train a LoRA adapter. Default: true (forced false by `full = true`).
    pub enabled: bool,
    /// Rank. Default: 16.
    pub r: usize,
    /// Scale numerator: the update is scaled by `alpha / r` (`alpha / sqrt(r)` with rslora).
    /// Default: 32.
    pub alpha: f64,
    /// Dropout on the adapter's input. Default: 0.05.
    pub dropout: f64,
    /// Target layers. Default: `all-linear`.
    pub targets: LoraTargets,
    /// Rank-stabilised scaling `alpha / sqrt(r)`. Default: false.
    pub rslora: bool,
    /// Start from this PEFT adapter directory (its rank, alpha and targets) instead of a fresh one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            enabled: true,
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: LoraTargets::AllLinear,
            rslora: false,
            init_from: None,
        }
    }
}

impl LoraConfig {
    /// The factor the adapter's output is multiplied by: `alpha / r`, or `alpha / sqrt(r)` with
    /// rslora.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// `[optimizer]`: AdamW.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate. Default: 2e-4.
    pub lr: f64,
    /// First-moment decay. Default: 0.9.
    pub beta1: f64,
    /// Second-moment decay. Default: 0.999.
    pub beta2: f64,
    /// Denominator epsilon. Default: 1e-8.
    pub eps: f64,
    /// Decoupled weight decay (not applied to norms and biases). Default: 0.
    pub weight_decay: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// `[schedule]`: the learning-rate schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Decay after warmup. Default: `cosine`.
    pub kind: ScheduleKind,
    /// Warmup steps. Default: none (use `warmup_ratio`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of the total steps, rounded up. Default: 0.
    pub warmup_ratio: f64,
    /// Floor of the decay as a fraction of the peak lr. Default: 0.
    pub min_lr_ratio: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            kind: ScheduleKind::Cosine,
            warmup_steps: None,
            warmup_ratio: 0.0,
            min_lr_ratio: 0.0,
        }
    }
}

/// `[batch]`: micro-batches, accumulation and clipping.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Tokens per micro-batch. Default: 4096 (or `max_length` if larger) when `micro_batch_rows`
    /// is not set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_batch_tokens: Option<usize>,
    /// Rows (sequences) per micro-batch, instead of a token budget. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_batch_rows: Option<usize>,
    /// Micro-batches per optimizer step. Default: 1.
    pub grad_accum: usize,
    /// Global gradient-norm clipping threshold; 0 turns clipping off. Default: 1.
    pub max_grad_norm: f64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            micro_batch_tokens: None,
            micro_batch_rows: None,
            grad_accum: 1,
            max_grad_norm: 1.0,
        }
    }
}

/// The resolved micro-batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MicroBatch {
    /// At most this many tokens per micro-batch.
    Tokens(usize),
    /// Exactly this many rows per micro-batch (the last may have fewer).
    Rows(usize),
}

/// `[train]`: length of the run, intervals, seed, resources.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainLoopConfig {
    /// Passes over the training data. Default: 1.
    pub epochs: u64,
    /// Stop after this many optimizer steps; overrides `epochs`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Evaluate every N steps (and at the end); 0 = only at the end. Default: 100.
    pub eval_every: u64,
    /// Checkpoint every N steps (and at the end); 0 = only at the end. Default: 500.
    pub save_every: u64,
    /// Checkpoints kept; 0 keeps all. Default: 3.
    pub keep_checkpoints: usize,
    /// Seed of data order, LoRA initialisation and dropout. Default: 42.
    pub seed: u64,
    /// Recompute each layer in backward instead of keeping its activations. Default: false.
    pub activation_checkpointing: bool,
    /// Worker threads; 0 = one per core. Default: 0.
    pub threads: usize,
    /// Log metrics every N steps. Default: 10.
    pub log_every: u64,
}

impl Default for TrainLoopConfig {
    fn default() -> Self {
        TrainLoopConfig {
            epochs: 1,
            max_steps: None,
            eval_every: 100,
            save_every: 500,
            keep_checkpoints: 3,
            seed: 42,
            activation_checkpointing: false,
            threads: 0,
            log_every: 10,
        }
    }
}

/// What a preference objective compares the policy with: `"init"`, `"base"` or a path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Reference {
    /// The weights training starts from (with `lora.init_from`, that adapter). Default.
    #[default]
    Init,
    /// The base model alone (under LoRA: the adapter switched off).
    Base,
    /// Another model (directory, GGUF, hub id) or a PEFT adapter directory for the same base.
    Path(String),
}

impl Serialize for Reference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Reference::Init => "init",
            Reference::Base => "base",
            Reference::Path(p) => p,
        })
    }
}

impl<'de> Deserialize<'de> for Reference {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "init" => Reference::Init,
            "base" => Reference::Base,
            _ => Reference::Path(s),
        })
    }
}

/// `[dpo]`: Direct Preference Optimization, with TRL's `DPOConfig` names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    /// β, the strength of the implicit KL penalty. Default: 0.1.
    pub beta: f64,
    /// TRL loss types, summed. Default: `["sigmoid"]`.
    #[serde(deserialize_with = "one_or_many")]
    pub loss_type: Vec<String>,
    /// A weight per loss type. Default: 1.0 each.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_weights: Option<Vec<f64>>,
    /// ε of the robust, exo_pair and aot losses. Default: 0.0.
    pub label_smoothing: f64,
    /// τ of the discopop loss. Default: 0.05.
    pub discopop_tau: f64,
    /// The reference model. Default: `init`.
    pub reference: Reference,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            beta: 0.1,
            loss_type: vec!["sigmoid".into()],
            loss_weights: None,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            reference: Reference::Init,
        }
    }
}

impl DpoConfig {
    /// The objective's parameters; errors name the key.
    pub fn params(&self) -> Result<crate::objective::dpo::DpoParams, ConfigError> {
        use crate::objective::dpo::{DpoLossType, DpoParams};
        let weights = match &self.loss_weights {
            Some(w) if w.len() != self.loss_type.len() => {
                return Err(invalid(
                    "dpo.loss_weights",
                    format!("has {} weights for {} loss types", w.len(), self.loss_type.len()),
                ));
            }
            Some(w) => w.clone(),
            None => vec![1.0; self.loss_type.len()],
        };
        let mut losses = Vec::new();
        for (name, w) in self.loss_type.iter().zip(weights) {
            let Some(kind) = DpoLossType::from_name(name) else {
                let names: Vec<&str> = DpoLossType::ALL.iter().map(|t| t.name()).collect();
                return Err(invalid(
                    "dpo.loss_type",
                    format!(
                        "unknown loss type \"{name}\"; expected one of {}",
                        names.join(", ")
                    ),
                ));
            };
            losses.push((kind, w));
        }
        let params = DpoParams {
            beta: self.beta,
            losses,
            label_smoothing: self.label_smoothing,
            discopop_tau: self.discopop_tau,
        };
        params.validate().map_err(|m| {
            let (key, msg) = m.split_once(": ").unwrap_or(("dpo", m.as_str()));
            invalid(key, msg.to_string())
        })?;
        Ok(params)
    }
}

/// `[cpo]`: Contrastive Preference Optimization and SimPO, with TRL's `CPOConfig` names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CpoConfig {
    /// β. Default: 0.1.
    pub beta: f64,
    /// sigmoid, hinge, ipo, simpo or alphapo. Default: sigmoid (simpo under `method = "simpo"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_type: Option<String>,
    /// The weight of the chosen NLL. Default: 1.0 (0 for simpo under `method = "simpo"`, and alphapo).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpo_alpha: Option<f64>,
    /// SimPO's target margin γ. Default: 0.5.
    pub simpo_gamma: f64,
    /// AlphaPO's α (0 = log-prob rewards). Default: 0.0.
    pub alpha: f64,
    /// ε. Default: 0.0.
    pub label_smoothing: f64,
}

impl Default for CpoConfig {
    fn default() -> Self {
        CpoConfig {
            beta: 0.1,
            loss_type: None,
            cpo_alpha: None,
            simpo_gamma: 0.5,
            alpha: 0.0,
            label_smoothing: 0.0,
        }
    }
}

impl CpoConfig {
    /// The objective's parameters under `method`; errors name the key.
    pub fn params(&self, method: Method) -> Result<crate::objective::cpo::CpoParams, ConfigError> {
        use crate::objective::cpo::{CpoLossType, CpoParams};
        let default_type = if method == Method::Simpo {
            "simpo"
        } else {
            "sigmoid"
        };
        let name = self.loss_type.as_deref().unwrap_or(default_type);
        let Some(loss_type) = CpoLossType::from_name(name) else {
            return Err(invalid(
                "cpo.loss_type",
                format!("unknown loss type \"{name}\"; expected sigmoid, hinge, ipo, simpo or alphapo"),
            ));
        };
        if method == Method::Simpo && loss_type != CpoLossType::Simpo {
            return Err(invalid(
                "cpo.loss_type",
                "method = \"simpo\" uses loss_type = \"simpo\" (or alphapo); use method = \"cpo\" for the others",
            ));
        }
        let sugar = name == "alphapo" || (method == Method::Simpo && self.loss_type.is_none());
        let cpo_alpha = self.cpo_alpha.unwrap_or(if sugar { 0.0 } else { 1.0 });
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(invalid(
                "cpo.beta",
                format!("must be positive, got {}", self.beta),
            ));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(invalid(
                "cpo.label_smoothing",
                format!("must be in [0, 0.5), got {}", self.label_smoothing),
            ));
        }
        Ok(CpoParams {
            beta: self.beta,
            loss_type,
            cpo_alpha,
            simpo_gamma: self.simpo_gamma,
            alpha: self.alpha,
            label_smoothing: self.label_smoothing,
        })
    }
}

/// `[orpo]`: Odds Ratio Preference Optimization, with TRL's `ORPOConfig` names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrpoConfig {
    /// β (the paper's λ): the weight of the odds-ratio term. Default: 0.1.
    pub beta: f64,
}

/// `[reward]`: reward modelling, with TRL's `RewardConfig` names.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// Weight of `mean (r_chosen + r_rejected)²`, which keeps rewards centred on 0 (TRL's
    /// `center_rewards_coefficient`). Default: none.
    pub center_rewards_coefficient: Option<f64>,
}

/// `[grpo]`: Group Relative Policy Optimization, with TRL's `GRPOConfig` names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// Completions generated per prompt (the group). Default: 8.
    pub num_generations: usize,
    /// Tokens generated per completion at most. Default: 512.
    pub max_completion_length: usize,
    /// Sampling temperature (also divides the trainer's logits). Default: 1.0.
    pub temperature: f64,
    /// Nucleus sampling mass. Default: 1.0.
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = off). Default: 0.
    pub top_k: usize,
    /// KL coefficient against the reference (0: no reference pass at all). Default: 0.0.
    pub beta: f64,
    /// Lower clipping range ε of the ratio. Default: 0.2.
    pub epsilon: f64,
    /// Upper clipping range (DAPO's ε_high). Default: `epsilon`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_high: Option<f64>,
    /// Upper bound of the unclipped ratio (two-sided clipping, INTELLECT-2). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// `grpo`, `bnpo`, `dr_grpo` or `dapo` (the loss normalisation). Default: `dapo`.
    pub loss_type: String,
    /// Advantage scaling: `group` (per-group std), `batch` (std of the whole batch) or `none`.
    /// Default: `group`.
    pub scale_rewards: String,
    /// Optimizer steps per generation batch (μ; > 1 keeps old-policy log-probs). Default: 1.
    pub num_iterations: usize,
    /// Importance ratio per `token` or per `sequence` (GSPO). Default: `token`.
    pub importance_sampling_level: String,
    /// Multiply the per-token KL by the importance ratio (unbiased reverse-KL gradient). Default: true.
    pub use_bias_correction_kl: bool,
    /// Exclude completions cut at `max_completion_length` from the loss. Default: false.
    pub mask_truncated_completions: bool,
    /// Weight of each `[[rewards]]` entry, in order. Default: 1 each.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward_weights: Option<Vec<f64>>,
    /// Log sample completions with their rewards every this many steps (0 = never). Default: 10.
    pub log_completions_every: u64,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            num_generations: 8,
            max_completion_length: 512,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            delta: None,
            loss_type: "dapo".into(),
            scale_rewards: "group".into(),
            num_iterations: 1,
            importance_sampling_level: "token".into(),
            use_bias_correction_kl: true,
            mask_truncated_completions: false,
            reward_weights: None,
            log_completions_every: 10,
        }
    }
}

/// `[rloo]`: REINFORCE Leave-One-Out, with TRL's `RLOOConfig` names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlooConfig {
    /// Completions generated per prompt. Default: 2.
    pub num_generations: usize,
    /// Tokens generated per completion at most. Default: 512.
    pub max_completion_length: usize,
    /// Sampling temperature (also divides the trainer's logits). Default: 1.0.
    pub temperature: f64,
    /// Nucleus sampling mass. Default: 1.0.
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = off). Default: 0.
    pub top_k: usize,
    /// KL coefficient: the sequence KL to the reference is subtracted from the reward. Default: 0.05.
    pub beta: f64,
    /// Lower clipping range ε of the ratio. Default: 0.2.
    pub epsilon: f64,
    /// Upper clipping range. Default: `epsilon`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_high: Option<f64>,
    /// Normalise the advantages over the batch (mean 0, std 1). Default: false.
    pub normalize_advantages: bool,
    /// Optimizer steps per generation batch. Default: 1.
    pub num_iterations: usize,
    /// Exclude completions cut at `max_completion_length` from the loss. Default: false.
    pub mask_truncated_completions: bool,
    /// Weight of each `[[rewards]]` entry, in order. Default: 1 each.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward_weights: Option<Vec<f64>>,
    /// Log sample completions with their rewards every this many steps (0 = never). Default: 10.
    pub log_completions_every: u64,
}

impl Default for RlooConfig {
    fn default() -> Self {
        RlooConfig {
            num_generations: 2,
            max_completion_length: 512,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            beta: 0.05,
            epsilon: 0.2,
            epsilon_high: None,
            normalize_advantages: false,
            num_iterations: 1,
            mask_truncated_completions: false,
            reward_weights: None,
            log_completions_every: 10,
        }
    }
}

/// What to do when a reward function cannot score a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRewardError {
    /// Stop the run with an error naming the sample and the function.
    #[default]
    Fail,
    /// Score the sample 0 and count it (`rewards/<name>/errors`).
    Zero,
}

/// One `[[rewards]]` entry: a reward function by name with its options.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardFnConfig {
    /// The function (`math`, `format`, `command`, …; see `graft_train::reward_fns`).
    pub name: String,
    /// A sample it cannot score fails the run (`fail`) or scores 0 (`zero`). Default: `fail`.
    #[serde(default)]
    pub on_error: OnRewardError,
    /// The function's own options.
    #[serde(flatten)]
    pub options: toml::Table,
}

impl Default for OrpoConfig {
    fn default() -> Self {
        OrpoConfig { beta: 0.1 }
    }
}

/// `[kto]`: Kahneman–Tversky Optimization, with TRL's `KTOConfig` names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KtoConfig {
    /// β. Default: 0.1.
    pub beta: f64,
    /// Weight of desirable (label = true) examples. Default: 1.0.
    pub desirable_weight: f64,
    /// Weight of undesirable (label = false) examples. Default: 1.0.
    pub undesirable_weight: f64,
    /// `kto` or `apo_zero_unpaired`. Default: `kto`.
    pub loss_type: String,
    /// The reference model. Default: `init`.
    pub reference: Reference,
}

impl Default for KtoConfig {
    fn default() -> Self {
        KtoConfig {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            loss_type: "kto".into(),
            reference: Reference::Init,
        }
    }
}

impl KtoConfig {
    /// The objective's parameters; errors name the key.
    pub fn params(&self) -> Result<crate::objective::kto::KtoParams, ConfigError> {
        use crate::objective::kto::{KtoLossType, KtoParams};
        let loss_type = match self.loss_type.as_str() {
            "kto" => KtoLossType::Kto,
            "apo_zero_unpaired" => KtoLossType::ApoZeroUnpaired,
            other => {
                return Err(invalid(
                    "kto.loss_type",
                    format!("unknown loss type \"{other}\"; expected kto or apo_zero_unpaired"),
                ));
            }
        };
        for (key, v) in [
            ("kto.beta", self.beta),
            ("kto.desirable_weight", self.desirable_weight),
            ("kto.undesirable_weight", self.undesirable_weight),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(invalid(key, format!("must be positive, got {v}")));
            }
        }
        Ok(KtoParams {
            beta: self.beta,
            desirable_weight: self.desirable_weight,
            undesirable_weight: self.undesirable_weight,
            loss_type,
        })
    }
}

/// `[output]`: where the run goes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// Run directory. Default: `runs/<config file name without .toml>` (`runs/graft` when the
    /// config does not come from a file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
}

/// A complete training configuration. Field defaults are those of [`TrainConfig::default`] and are
/// listed with each key in [`KEYS`] and [`TrainConfig::documented_example`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Training method. Default: `sft`.
    pub method: Method,
    /// Full fine-tuning instead of LoRA. Default: false.
    pub full: bool,
    /// `[model]`.
    pub model: ModelConfig,
    /// `[data]`.
    pub data: DataConfig,
    /// `[lora]`.
    pub lora: LoraConfig,
    /// `[optimizer]`.
    pub optimizer: OptimizerConfig,
    /// `[schedule]`.
    pub schedule: ScheduleConfig,
    /// `[batch]`.
    pub batch: BatchConfig,
    /// `[train]`.
    pub train: TrainLoopConfig,
    /// `[output]`.
    pub output: OutputConfig,
    /// `[dpo]` (used with `method = "dpo"`).
    pub dpo: DpoConfig,
    /// `[cpo]` (used with `method = "cpo"` and `"simpo"`).
    pub cpo: CpoConfig,
    /// `[orpo]` (used with `method = "orpo"`).
    pub orpo: OrpoConfig,
    /// `[kto]` (used with `method = "kto"`).
    pub kto: KtoConfig,
    /// `[reward]` (used with `method = "reward"`).
    pub reward: RewardConfig,
    /// `[grpo]` (used with `method = "grpo"`).
    pub grpo: GrpoConfig,
    /// `[rloo]` (used with `method = "rloo"`).
    pub rloo: RlooConfig,
    /// `[[rewards]]`: the reward functions GRPO and RLOO score completions with.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rewards: Vec<RewardFnConfig>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// The file name of the resolved config in a run directory.
pub const CONFIG_FILE: &str = "config.toml";

/// The type a key accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A string.
    Str,
    /// A non-negative integer.
    Int,
    /// A number (integers accepted).
    Float,
    /// `true` or `false`.
    Bool,
    /// One of these strings.
    Choice(&'static [&'static str]),
    /// A string or a list of strings.
    StrList,
    /// A list of numbers.
    FloatList,
}

impl KeyKind {
    fn expected(self) -> String {
        match self {
            KeyKind::Str => "a string".into(),
            KeyKind::Int => "a non-negative integer".into(),
            KeyKind::Float => "a number".into(),
            KeyKind::Bool => "true or false".into(),
            KeyKind::Choice(c) => format!(
                "one of {}",
                c.iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            KeyKind::StrList => "a string or a list of strings".into(),
            KeyKind::FloatList => "a list of numbers".into(),
        }
    }
}

/// One valid key of the config file.
#[derive(Clone, Copy, Debug)]
pub struct KeySpec {
    /// Dotted path, e.g. `optimizer.lr`.
    pub path: &'static str,
    /// The type it accepts.
    pub kind: KeyKind,
    /// What it does and its default, as printed in the documented example.
    pub doc: &'static str,
    /// Value shown in the documented example instead of the default (TOML syntax); for keys
    /// without a default the example line is commented out.
    pub example: Option<&'static str>,
}

const fn key(path: &'static str, kind: KeyKind, doc: &'static str) -> KeySpec {
    KeySpec {
        path,
        kind,
        doc,
        example: None,
    }
}

const fn key_ex(path: &'static str, kind: KeyKind, doc: &'static str, example: &'static str) -> KeySpec {
    KeySpec {
        path,
        kind,
        doc,
        example: Some(example),
    }
}

/// The sections of the config file, in documentation order.
pub const SECTIONS: &[(&str, &str)] = &[
    ("model", "The model to fine-tune."),
    (
        "data",
        "Training and evaluation data, and how records become token sequences.",
    ),
    ("lora", "The LoRA adapter (ignored with `full = true`)."),
    ("optimizer", "AdamW, as torch.optim.AdamW."),
    (
        "schedule",
        "Learning-rate schedule, as transformers' get_*_schedule_with_warmup.",
    ),
    ("batch", "Micro-batches, gradient accumulation and clipping."),
    ("train", "Length of the run, intervals, seed and resources."),
    ("output", "Where the run directory goes."),
    (
        "dpo",
        "Direct Preference Optimization (method = \"dpo\"), with TRL's DPOConfig names and defaults.",
    ),
    (
        "cpo",
        "Contrastive Preference Optimization and SimPO (method = \"cpo\" / \"simpo\"), with TRL's CPOConfig names.",
    ),
    (
        "orpo",
        "Odds Ratio Preference Optimization (method = \"orpo\"), with TRL's ORPOConfig names.",
    ),
    (
        "kto",
        "Kahneman–Tversky Optimization (method = \"kto\"), with TRL's KTOConfig names and defaults.",
    ),
    (
        "reward",
        "Reward modelling (method = \"reward\"), with TRL's RewardConfig names.",
    ),
    (
        "grpo",
        "GRPO (method = \"grpo\"), with TRL's GRPOConfig names and defaults; rewards: [[rewards]].",
    ),
    (
        "rloo",
        "RLOO (method = \"rloo\"), with TRL's RLOOConfig names and defaults; rewards: [[rewards]].",
    ),
];

/// Every valid key, in documentation order: the schema that unknown-key and type errors, `--set`
/// and [`TrainConfig::documented_example`] use.
pub const KEYS: &[KeySpec] = &[
    key(
        "method",
        KeyKind::Choice(&[
            "sft", "dpo", "cpo", "simpo", "orpo", "kto", "reward", "grpo", "rloo",
        ]),
        "Training method: \"sft\" (supervised fine-tuning on single answers), or on prompt/chosen/rejected \
         pairs \"dpo\" (see [dpo]), \"cpo\" or \"simpo\" (reference-free, see [cpo]), \"orpo\" (reference-free with \
         an SFT term, see [orpo]); \"kto\" on unpaired prompt/completion/label rows (see [kto]); \"reward\" trains a \
         reward model (a score head) on pairs (see [reward]); \"grpo\" and \"rloo\" learn from their own \
         completions to prompt-only rows, scored by [[rewards]] (see [grpo], [rloo]). Default: \"sft\".",
    ),
    key(
        "full",
        KeyKind::Bool,
        "Full fine-tuning: train every weight instead of a LoRA adapter ([lora] is then ignored). Default: false.",
    ),
    key_ex(
        "model.path",
        KeyKind::Str,
        "Model directory (config.json, tokenizer, *.safetensors), Hugging Face hub id (org/name[@revision]), GGUF or llama2.c file, or ollama:NAME[:TAG] (a model in Ollama's local store). Required.",
        "\"HuggingFaceTB/SmolLM2-135M-Instruct\"",
    ),
    key_ex(
        "model.tokenizer",
        KeyKind::Str,
        "Tokenizer directory or hub id, when it differs from the model's. Default: the model's own.",
        "\"path/to/tokenizer\"",
    ),
    key(
        "model.precision",
        KeyKind::Choice(&["exact", "fast"]),
        "Matmul precision: \"fast\" = bf16 inputs with f32 accumulation where the CPU has avx512_bf16 (f32 \
         elsewhere); \"exact\" = f32 throughout. Weights and optimizer state are f32 either way. Default: \"fast\".",
    ),
    key_ex(
        "data.train",
        KeyKind::StrList,
        "Training data: JSONL files or folders of them, a string or a list. Required.",
        "[\"data/train.jsonl\"]",
    ),
    key_ex(
        "data.eval",
        KeyKind::StrList,
        "Evaluation data, in the same forms as `train`. Default: none (see `eval_fraction`).",
        "[\"data/eval.jsonl\"]",
    ),
    key(
        "data.format",
        KeyKind::Choice(&[
            "auto",
            "openai",
            "sharegpt",
            "alpaca",
            "prompt_completion",
            "text",
        ]),
        "Record format: \"openai\" ({messages: [{role, content}]}), \"sharegpt\" ({conversations: [{from, value}]}), \
         \"alpaca\" ({instruction, input, output}), \"prompt_completion\" ({prompt, completion}), \"text\" ({text}), \
         or \"auto\" to detect it per file. Default: \"auto\".",
    ),
    key(
        "data.max_length",
        KeyKind::Int,
        "Maximum tokens per sequence (at least 2). Default: 2048.",
    ),
    key(
        "data.packing",
        KeyKind::Bool,
        "Pack several examples into each row; attention never crosses examples. Default: true.",
    ),
    key(
        "data.mask",
        KeyKind::Choice(&["assistant", "all", "last_assistant", "completion"]),
        "Tokens the loss is computed on: every assistant turn, all tokens, the last assistant turn, or the \
         completion of prompt/completion records. Default: \"assistant\".",
    ),
    key_ex(
        "data.chat_template",
        KeyKind::Str,
        "Chat template for chat-format data: a path to a Jinja file (`.jinja`, or a `tokenizer_config.json` / \
         `chat_template.json` holding one) or the template text itself. Needed for base models that have none. \
         Default: the model's own.",
        "\"templates/chatml.jinja\"",
    ),
    key(
        "data.truncation",
        KeyKind::Choice(&["right", "left", "drop"]),
        "Sequences longer than max_length: keep the start (\"right\"), keep the end (\"left\") or drop them. \
         Default: \"right\".",
    ),
    key(
        "data.skip_invalid",
        KeyKind::Bool,
        "Skip malformed records with a warning instead of stopping. Default: false.",
    ),
    key(
        "data.eval_fraction",
        KeyKind::Float,
        "Fraction of the training data held out for evaluation when `eval` is not given (0 = none). Default: 0.",
    ),
    key(
        "data.prompt_column",
        KeyKind::Str,
        "GRPO / RLOO: the column holding each row's prompt (a string, or a list of messages rendered with the chat \
         template and its generation prompt); every other column reaches the reward functions. Default: \"prompt\".",
    ),
    key(
        "lora.enabled",
        KeyKind::Bool,
        "Train a LoRA adapter. Default: true.",
    ),
    key("lora.r", KeyKind::Int, "Rank of the adapter. Default: 16."),
    key(
        "lora.alpha",
        KeyKind::Float,
        "Scale numerator: updates are scaled by alpha / r (alpha / sqrt(r) with rslora). Default: 32.",
    ),
    key(
        "lora.dropout",
        KeyKind::Float,
        "Dropout on the adapter's input, in [0, 1). Default: 0.05.",
    ),
    key(
        "lora.targets",
        KeyKind::StrList,
        "Layers to adapt: \"all-linear\" (every linear layer but the output head) or a list of layer names such \
         as [\"q_proj\", \"v_proj\"]. Default: \"all-linear\".",
    ),
    key(
        "lora.rslora",
        KeyKind::Bool,
        "Rank-stabilised LoRA: scale by alpha / sqrt(r). Default: false.",
    ),
    key_ex(
        "lora.init_from",
        KeyKind::Str,
        "Start from an existing PEFT adapter directory (e.g. an SFT run's adapter/, for SFT then DPO); its rank, \
         alpha and targets replace r, alpha, rslora and targets. Default: a fresh adapter.",
        "\"runs/sft/adapter\"",
    ),
    key(
        "optimizer.lr",
        KeyKind::Float,
        "Peak learning rate. Typical: 1e-4 to 3e-4 for LoRA, 1e-5 to 5e-5 for full fine-tuning. Default: 2e-4.",
    ),
    key(
        "optimizer.beta1",
        KeyKind::Float,
        "AdamW first-moment decay, in [0, 1). Default: 0.9.",
    ),
    key(
        "optimizer.beta2",
        KeyKind::Float,
        "AdamW second-moment decay, in [0, 1). Default: 0.999.",
    ),
    key(
        "optimizer.eps",
        KeyKind::Float,
        "AdamW denominator epsilon. Default: 1e-8.",
    ),
    key(
        "optimizer.weight_decay",
        KeyKind::Float,
        "Decoupled weight decay; never applied to norms and biases. Default: 0.",
    ),
    key(
        "schedule.kind",
        KeyKind::Choice(&["cosine", "linear", "constant"]),
        "Decay after warmup: \"cosine\", \"linear\" or \"constant\". Default: \"cosine\".",
    ),
    key_ex(
        "schedule.warmup_steps",
        KeyKind::Int,
        "Steps of linear warmup from 0. Default: none (use warmup_ratio); do not set both.",
        "20",
    ),
    key(
        "schedule.warmup_ratio",
        KeyKind::Float,
        "Warmup as a fraction of the total steps, rounded up. Default: 0.",
    ),
    key(
        "schedule.min_lr_ratio",
        KeyKind::Float,
        "Floor of the cosine or linear decay, as a fraction of the peak lr. Default: 0.",
    ),
    key_ex(
        "batch.micro_batch_tokens",
        KeyKind::Int,
        "Token budget of one micro-batch (padding included). Default: 4096, or max_length if larger, unless \
         micro_batch_rows is set.",
        "4096",
    ),
    key_ex(
        "batch.micro_batch_rows",
        KeyKind::Int,
        "Rows per micro-batch, instead of a token budget. Default: none.",
        "4",
    ),
    key(
        "batch.grad_accum",
        KeyKind::Int,
        "Micro-batches per optimizer step; the loss is normalised by all trained tokens of the step. Default: 1.",
    ),
    key(
        "batch.max_grad_norm",
        KeyKind::Float,
        "Clip the global gradient norm to this; 0 turns clipping off. Default: 1.",
    ),
    key(
        "train.epochs",
        KeyKind::Int,
        "Passes over the training data. Default: 1.",
    ),
    key_ex(
        "train.max_steps",
        KeyKind::Int,
        "Stop after this many optimizer steps; overrides epochs. Default: none.",
        "1000",
    ),
    key(
        "train.eval_every",
        KeyKind::Int,
        "Evaluate every N optimizer steps, and at the end; 0 = only at the end. Default: 100.",
    ),
    key(
        "train.save_every",
        KeyKind::Int,
        "Save a checkpoint every N optimizer steps, and at the end; 0 = only at the end. Default: 500.",
    ),
    key(
        "train.keep_checkpoints",
        KeyKind::Int,
        "Checkpoints to keep; 0 keeps all. Default: 3.",
    ),
    key(
        "train.seed",
        KeyKind::Int,
        "Seed for data order, adapter initialisation and dropout. Default: 42.",
    ),
    key(
        "train.activation_checkpointing",
        KeyKind::Bool,
        "Keep only each layer's input and recompute the layer in backward: less memory, ~30% more compute. \
         Default: false.",
    ),
    key(
        "train.threads",
        KeyKind::Int,
        "Worker threads; 0 = one per core. Default: 0.",
    ),
    key(
        "train.log_every",
        KeyKind::Int,
        "Log metrics every N optimizer steps. Default: 10.",
    ),
    key_ex(
        "output.dir",
        KeyKind::Str,
        "Run directory (adapter, checkpoints, metrics, report). Default: runs/<config file name>.",
        "\"runs/my-run\"",
    ),
    key(
        "dpo.beta",
        KeyKind::Float,
        "β: how strongly the policy is kept near the reference (the implicit KL penalty). Default: 0.1.",
    ),
    key_ex(
        "dpo.loss_type",
        KeyKind::StrList,
        "TRL's loss type, or a list of them summed with loss_weights: sigmoid, hinge, ipo, exo_pair, nca_pair, \
         robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm. \
         Default: \"sigmoid\".",
        "[\"sigmoid\", \"sft\"]",
    ),
    key_ex(
        "dpo.loss_weights",
        KeyKind::FloatList,
        "A weight per loss_type entry. Default: 1.0 each.",
        "[0.8, 0.2]",
    ),
    key(
        "dpo.label_smoothing",
        KeyKind::Float,
        "ε: the assumed rate of flipped labels, used by robust, exo_pair, aot and aot_unpaired. Default: 0.0.",
    ),
    key(
        "dpo.discopop_tau",
        KeyKind::Float,
        "τ of the discopop loss. Default: 0.05.",
    ),
    key(
        "dpo.reference",
        KeyKind::Str,
        "The reference the policy is compared with: \"init\" = the weights training starts from (with \
         lora.init_from, that adapter), \"base\" = the base model without any adapter, or a path: a PEFT adapter \
         directory for the same base, or another model (directory, GGUF file, hub id) with the same vocabulary. \
         Its log-probs are computed once before training and kept in the run directory. Default: \"init\".",
    ),
    key(
        "cpo.beta",
        KeyKind::Float,
        "β of the CPO/SimPO loss. Default: 0.1 (SimPO's paper uses 2.0 to 2.5).",
    ),
    key(
        "cpo.loss_type",
        KeyKind::Choice(&["sigmoid", "hinge", "ipo", "simpo", "alphapo"]),
        "CPO's loss: sigmoid, hinge, ipo (averaged log-probs), simpo (averaged, with margin simpo_gamma) or alphapo \
         (simpo with cpo_alpha = 0 and the alpha reward shape). Default: \"sigmoid\" (\"simpo\" with method = \"simpo\").",
    ),
    key(
        "cpo.cpo_alpha",
        KeyKind::Float,
        "Weight of the NLL of the chosen completions. Default: 1.0 (0.0 with method = \"simpo\" or alphapo).",
    ),
    key(
        "cpo.simpo_gamma",
        KeyKind::Float,
        "SimPO's target reward margin γ. Default: 0.5.",
    ),
    key(
        "cpo.alpha",
        KeyKind::Float,
        "AlphaPO's reward shape α (rewards (1 − p^(−α))/α); 0 = log-prob rewards. Default: 0.0.",
    ),
    key(
        "cpo.label_smoothing",
        KeyKind::Float,
        "ε of the sigmoid and simpo losses, in [0, 0.5). Default: 0.0.",
    ),
    key(
        "orpo.beta",
        KeyKind::Float,
        "β (the paper's λ): weight of the odds-ratio term against the chosen NLL. Default: 0.1.",
    ),
    key("kto.beta", KeyKind::Float, "β of the KTO loss. Default: 0.1."),
    key(
        "kto.desirable_weight",
        KeyKind::Float,
        "Weight of the losses of desirable (label = true) examples. Default: 1.0.",
    ),
    key(
        "kto.undesirable_weight",
        KeyKind::Float,
        "Weight of the losses of undesirable (label = false) examples. Default: 1.0.",
    ),
    key(
        "kto.loss_type",
        KeyKind::Choice(&["kto", "apo_zero_unpaired"]),
        "\"kto\" (with the batch KL estimate from mismatched prompt/completion pairs) or \"apo_zero_unpaired\". \
         Default: \"kto\".",
    ),
    key(
        "kto.reference",
        KeyKind::Str,
        "The reference, as dpo.reference (\"init\", \"base\" or a path). Default: \"init\".",
    ),
    key(
        "reward.center_rewards_coefficient",
        KeyKind::Float,
        "Weight of mean (r_chosen + r_rejected)², which keeps the rewards centred on 0 (the paper's 0.01). \
         Default: none.",
    ),
    key(
        "grpo.num_generations",
        KeyKind::Int,
        "Completions sampled per prompt (the group); at least 2. batch.micro_batch_rows × batch.grad_accum completions make one step, so that must be a multiple of it. Default: 8.",
    ),
    key(
        "grpo.max_completion_length",
        KeyKind::Int,
        "Tokens generated per completion at most. Default: 512.",
    ),
    key(
        "grpo.temperature",
        KeyKind::Float,
        "Sampling temperature; the trainer divides its logits by it too. Default: 1.0.",
    ),
    key(
        "grpo.top_p",
        KeyKind::Float,
        "Nucleus sampling mass, in (0, 1]. Default: 1.0.",
    ),
    key(
        "grpo.top_k",
        KeyKind::Int,
        "Sample from the k most likely tokens (0 = all). Default: 0.",
    ),
    key(
        "grpo.beta",
        KeyKind::Float,
        "KL coefficient against the reference (the base without the adapter, or the initial weights); 0 skips the reference pass entirely. Default: 0.0.",
    ),
    key(
        "grpo.epsilon",
        KeyKind::Float,
        "Lower clipping range of the importance ratio. Default: 0.2.",
    ),
    key_ex(
        "grpo.epsilon_high",
        KeyKind::Float,
        "Upper clipping range (DAPO's clip-higher). Default: epsilon.",
        "0.28",
    ),
    key_ex(
        "grpo.delta",
        KeyKind::Float,
        "Upper bound of the unclipped ratio (two-sided clipping); > 1 + epsilon_high. Default: none.",
        "4.0",
    ),
    key(
        "grpo.loss_type",
        KeyKind::Choice(&["grpo", "bnpo", "dr_grpo", "dapo"]),
        "Loss normalisation: \"grpo\" (each completion's token mean, averaged), \"bnpo\" (token mean over the micro-batch), \"dr_grpo\" (sum over micro-batch rows × max_completion_length), \"dapo\" (token sum over the step's completion tokens). Default: \"dapo\".",
    ),
    key(
        "grpo.scale_rewards",
        KeyKind::Choice(&["group", "batch", "none"]),
        "Divide advantages by the std of the group's rewards, of the whole batch's, or not at all (Dr. GRPO). Default: \"group\".",
    ),
    key(
        "grpo.num_iterations",
        KeyKind::Int,
        "Optimizer steps on each batch of completions (μ); above 1 the ratio is taken against the log-probs at generation time. Default: 1.",
    ),
    key(
        "grpo.importance_sampling_level",
        KeyKind::Choice(&["token", "sequence"]),
        "Importance ratio per token, or one per completion from its mean log-ratio (GSPO). Default: \"token\".",
    ),
    key(
        "grpo.use_bias_correction_kl",
        KeyKind::Bool,
        "Multiply the KL term by the importance ratio, so its gradient is the unbiased reverse-KL gradient (as TRL). \
         Default: true.",
    ),
    key(
        "grpo.mask_truncated_completions",
        KeyKind::Bool,
        "Leave completions cut at max_completion_length out of the loss. Default: false.",
    ),
    key_ex(
        "grpo.reward_weights",
        KeyKind::FloatList,
        "Weight of each [[rewards]] entry, in order. Default: 1 each.",
        "[1.0, 0.5]",
    ),
    key(
        "grpo.log_completions_every",
        KeyKind::Int,
        "Write sample completions with their rewards to completions.jsonl every this many steps (0 = never). Default: 10.",
    ),
    key(
        "rloo.num_generations",
        KeyKind::Int,
        "Completions sampled per prompt (the group); at least 2. batch.micro_batch_rows × batch.grad_accum completions make one step, so that must be a multiple of it. Default: 2.",
    ),
    key(
        "rloo.max_completion_length",
        KeyKind::Int,
        "Tokens generated per completion at most. Default: 512.",
    ),
    key(
        "rloo.temperature",
        KeyKind::Float,
        "Sampling temperature; the trainer divides its logits by it too. Default: 1.0.",
    ),
    key(
        "rloo.top_p",
        KeyKind::Float,
        "Nucleus sampling mass, in (0, 1]. Default: 1.0.",
    ),
    key(
        "rloo.top_k",
        KeyKind::Int,
        "Sample from the k most likely tokens (0 = all). Default: 0.",
    ),
    key(
        "rloo.beta",
        KeyKind::Float,
        "KL coefficient: beta × the sequence's KL to the reference is subtracted from its reward. Default: 0.05.",
    ),
    key(
        "rloo.epsilon",
        KeyKind::Float,
        "Lower clipping range of the importance ratio. Default: 0.2.",
    ),
    key_ex(
        "rloo.epsilon_high",
        KeyKind::Float,
        "Upper clipping range (DAPO's clip-higher). Default: epsilon.",
        "0.28",
    ),
    key(
        "rloo.normalize_advantages",
        KeyKind::Bool,
        "Normalise the advantages over the batch to mean 0, std 1. Default: false.",
    ),
    key(
        "rloo.num_iterations",
        KeyKind::Int,
        "Optimizer steps on each batch of completions (μ); above 1 the ratio is taken against the log-probs at generation time. Default: 1.",
    ),
    key(
        "rloo.mask_truncated_completions",
        KeyKind::Bool,
        "Leave completions cut at max_completion_length out of the loss. Default: false.",
    ),
    key_ex(
        "rloo.reward_weights",
        KeyKind::FloatList,
        "Weight of each [[rewards]] entry, in order. Default: 1 each.",
        "[1.0, 0.5]",
    ),
    key(
        "rloo.log_completions_every",
        KeyKind::Int,
        "Write sample completions with their rewards to completions.jsonl every this many steps (0 = never). Default: 10.",
    ),
];

fn spec(path: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.path == path)
}

fn is_section(path: &str) -> bool {
    SECTIONS.iter().any(|(s, _)| *s == path)
}

/// Levenshtein distance between two strings (by chars).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn normalise(s: &str) -> String {
    s.to_ascii_lowercase().replace('-', "_")
}

/// All valid paths directly under `parent` ("" for the top level): keys and sections.
fn children(parent: &str) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    if parent.is_empty() {
        out.extend(SECTIONS.iter().map(|(s, _)| *s));
    }
    for k in KEYS {
        let (p, _) = k.path.rsplit_once('.').unwrap_or(("", k.path));
        if p == parent {
            out.push(k.path);
        }
    }
    out
}

fn last(path: &str) -> &str {
    path.rsplit_once('.').map(|(_, l)| l).unwrap_or(path)
}

/// The valid key nearest to the unknown `path`: a sibling within a small edit distance, else a key
/// of the same (or nearly the same) name in another section.
fn suggest(path: &str) -> Option<String> {
    let (parent, name) = path.rsplit_once('.').unwrap_or(("", path));
    let name = normalise(name);
    let limit = (name.chars().count() / 3).max(2);
    let best = |candidates: Vec<&'static str>, limit: usize| {
        candidates
            .into_iter()
            .map(|c| (edit_distance(&name, last(c)), c))
            .filter(|(d, _)| *d <= limit)
            .min_by_key(|(d, _)| *d)
            .map(|(_, c)| c.to_string())
    };
    if spec(parent).is_none()
        && (parent.is_empty() || is_section(parent))
        && let Some(s) = best(children(parent), limit)
    {
        return Some(s);
    }
    let all: Vec<&'static str> = KEYS
        .iter()
        .map(|k| k.path)
        .chain(SECTIONS.iter().map(|(s, _)| *s))
        .collect();
    best(all, 1)
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("string \"{s}\""),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(f) => format!("number {f}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("datetime {d}"),
        Value::Array(_) => "a list".into(),
        Value::Table(_) => "a table".into(),
    }
}

/// Other spellings a choice key accepts (the names `graft data inspect` uses): `(key, alias,
/// canonical value)`. The enums carry the same aliases for deserialization.
const CHOICE_ALIASES: &[(&str, &str, &str)] = &[
    ("data.format", "prompt-completion", "prompt_completion"),
    ("data.mask", "assistant_only", "assistant"),
    ("data.mask", "assistant-only", "assistant"),
    ("data.mask", "all_tokens", "all"),
    ("data.mask", "all-tokens", "all"),
    ("data.mask", "last-assistant", "last_assistant"),
    ("data.mask", "completion_only", "completion"),
    ("data.mask", "completion-only", "completion"),
];

/// The canonical value an alias of a choice key stands for.
fn choice_alias(path: &str, value: &str) -> Option<&'static str> {
    CHOICE_ALIASES
        .iter()
        .find(|(p, a, _)| *p == path && *a == value)
        .map(|(_, _, c)| *c)
}

fn check_value(path: &str, kind: KeyKind, v: &Value, origin: &str) -> Result<(), ConfigError> {
    let ok = match (kind, v) {
        (KeyKind::Str, Value::String(_)) => true,
        (KeyKind::Int, Value::Integer(i)) => *i >= 0,
        (KeyKind::Float, Value::Float(_) | Value::Integer(_)) => true,
        (KeyKind::Bool, Value::Boolean(_)) => true,
        (KeyKind::FloatList, Value::Array(a)) => a.iter().all(|x| x.is_float() || x.is_integer()),
        (KeyKind::Choice(choices), Value::String(s)) => {
            if choices.contains(&s.as_str()) || choice_alias(path, s).is_some() {
                true
            } else {
                let near = choices
                    .iter()
                    .map(|c| (edit_distance(&normalise(s), c), *c))
                    .filter(|(d, _)| *d <= 3)
                    .min_by_key(|(d, _)| *d)
                    .map(|(_, c)| format!(" (did you mean \"{c}\"?)"))
                    .unwrap_or_default();
                return Err(ConfigError::Type {
                    key: path.to_string(),
                    origin: origin.to_string(),
                    expected: kind.expected(),
                    found: format!("{}{near}", describe(v)),
                });
            }
        }
        (KeyKind::StrList, Value::String(_)) => true,
        (KeyKind::StrList, Value::Array(items)) => items.iter().all(Value::is_str),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Type {
            key: path.to_string(),
            origin: origin.to_string(),
            expected: kind.expected(),
            found: describe(v),
        })
    }
}

/// Checks every key of `table` (at `prefix`) against [`KEYS`].
fn check_table(table: &Table, prefix: &str, origin: &str) -> Result<(), ConfigError> {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if prefix.is_empty() && path == "rewards" {
            check_rewards(v, origin)?;
        } else if prefix.is_empty() && is_section(&path) {
            match v {
                Value::Table(t) => check_table(t, &path, origin)?,
                other => {
                    return Err(ConfigError::Type {
                        key: path.clone(),
                        origin: origin.to_string(),
                        expected: format!("a section ([{path}] with keys such as `{}`)", children(&path)[0]),
                        found: describe(other),
                    });
                }
            }
        } else if let Some(s) = spec(&path) {
            check_value(&path, s.kind, v, origin)?;
        } else {
            return Err(ConfigError::UnknownKey {
                suggestion: suggest(&path),
                key: path,
                origin: origin.to_string(),
            });
        }
    }
    Ok(())
}

/// Checks `[[rewards]]`: a list of tables, each with a `name` and an optional `on_error`; the
/// function's own options are checked when it is built (`reward_fns::from_config`).
fn check_rewards(v: &Value, origin: &str) -> Result<(), ConfigError> {
    let expected = "a list of tables ([[rewards]] with name = \"…\" and the function's options)";
    let Value::Array(items) = v else {
        return Err(ConfigError::Type {
            key: "rewards".into(),
            origin: origin.to_string(),
            expected: expected.into(),
            found: describe(v),
        });
    };
    for (i, item) in items.iter().enumerate() {
        let key = format!("rewards[{i}]");
        let Value::Table(t) = item else {
            return Err(ConfigError::Type {
                key,
                origin: origin.to_string(),
                expected: expected.into(),
                found: describe(item),
            });
        };
        match t.get("name") {
            Some(Value::String(_)) => {}
            Some(other) => {
                return Err(ConfigError::Type {
                    key: format!("{key}.name"),
                    origin: origin.to_string(),
                    expected: "a reward function's name".into(),
                    found: describe(other),
                });
            }
            None => {
                return Err(invalid(
                    &key,
                    format!(
                        "needs name = \"…\", one of {}",
                        crate::reward_fns::KNOWN.join(", ")
                    ),
                ));
            }
        }
        if let Some(e) = t.get("on_error")
            && !matches!(e.as_str(), Some("fail" | "zero"))
        {
            return Err(ConfigError::Type {
                key: format!("{key}.on_error"),
                origin: origin.to_string(),
                expected: "\"fail\" or \"zero\"".into(),
                found: describe(e),
            });
        }
    }
    Ok(())
}

/// Applies one `--set key=value` to `table`.
fn apply_set(table: &mut Table, arg: &str) -> Result<(), ConfigError> {
    let origin = "--set";
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| ConfigError::BadSet { arg: arg.to_string() })?;
    let (key, raw) = (key.trim(), raw.trim());
    if key.is_empty() {
        return Err(ConfigError::BadSet { arg: arg.to_string() });
    }
    if is_section(key) {
        return Err(invalid(
            key,
            format!(
                "is a section; set one of its keys, e.g. --set {}=...",
                children(key)[0]
            ),
        ));
    }
    let Some(spec) = spec(key) else {
        return Err(ConfigError::UnknownKey {
            key: key.to_string(),
            origin: origin.into(),
            suggestion: suggest(key),
        });
    };
    let parsed = format!("v = {raw}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"));
    let value = match (spec.kind, parsed) {
        // A key that wants a string takes the text as written (`--set output.dir=2024`).
        (KeyKind::Str | KeyKind::Choice(_), Some(v)) if !v.is_str() => Value::String(raw.to_string()),
        (KeyKind::StrList, Some(v)) if !v.is_str() && !v.is_array() => Value::String(raw.to_string()),
        (_, Some(v)) => v,
        (_, None) => Value::String(raw.to_string()),
    };
    check_value(key, spec.kind, &value, origin)?;
    let mut node = table;
    let mut parts: Vec<&str> = key.split('.').collect();
    let leaf = parts.pop().expect("split yields at least one part");
    for part in parts {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        node = match entry {
            Value::Table(t) => t,
            other => {
                return Err(ConfigError::Type {
                    key: part.to_string(),
                    origin: "the config".into(),
                    expected: "a section".into(),
                    found: describe(other),
                });
            }
        };
    }
    node.insert(leaf.to_string(), value);
    Ok(())
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

impl TrainConfig {
    /// Reads a config file, applies `--set key=value` overrides, resolves and validates it. The run
    /// directory defaults to `runs/<file stem>`.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("graft");
        Self::parse(&text, &path.display().to_string(), sets, &format!("runs/{stem}"))
    }

    /// Parses config text (`origin` names it in errors), applies `--set` overrides, resolves and
    /// validates. The run directory defaults to `runs/graft`.
    pub fn from_toml_str(text: &str, origin: &str, sets: &[String]) -> Result<Self, ConfigError> {
        Self::parse(text, origin, sets, "runs/graft")
    }

    fn parse(text: &str, origin: &str, sets: &[String], default_dir: &str) -> Result<Self, ConfigError> {
        let mut table: Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        check_table(&table, "", origin)?;
        for arg in sets {
            apply_set(&mut table, arg)?;
        }
        let lora_explicit = table
            .get("lora")
            .and_then(|l| l.get("enabled"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut cfg = TrainConfig::deserialize(Value::Table(table)).map_err(|e| ConfigError::Parse {
            origin: origin.into(),
            message: e.to_string(),
        })?;
        if cfg.full && lora_explicit {
            return Err(invalid(
                "full",
                "`full = true` and `lora.enabled = true` conflict; choose one",
            ));
        }
        cfg.resolve(default_dir);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Fills the defaults that depend on other keys: the micro-batch budget, the run directory, and
    /// `lora.enabled = false` under `full = true`. Idempotent.
    pub fn resolve(&mut self, default_dir: &str) {
        if self.batch.micro_batch_tokens.is_none() && self.batch.micro_batch_rows.is_none() {
            self.batch.micro_batch_tokens = Some(self.data.max_length.max(4096));
        }
        if self.output.dir.is_none() {
            self.output.dir = Some(default_dir.to_string());
        }
        if self.full {
            self.lora.enabled = false;
        }
    }

    /// Checks ranges and combinations; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let unit = |key: &str, x: f64, closed_top: bool| {
            let ok = x >= 0.0 && (x < 1.0 || (closed_top && x == 1.0));
            if ok {
                Ok(())
            } else {
                Err(invalid(
                    key,
                    format!("must be in [0, 1{}, got {x}", if closed_top { "]" } else { ")" }),
                ))
            }
        };
        let positive = |key: &str, x: f64| {
            if x > 0.0 && x.is_finite() {
                Ok(())
            } else {
                Err(invalid(key, format!("must be a positive number, got {x}")))
            }
        };
        if self.model.path.trim().is_empty() {
            return Err(invalid("model.path", "is required: a model directory or hub id"));
        }
        match self.method {
            Method::Dpo => {
                self.dpo.params()?;
            }
            Method::Cpo | Method::Simpo => {
                self.cpo.params(self.method)?;
            }
            Method::Kto => {
                self.kto.params()?;
            }
            Method::Reward
                if self
                    .reward
                    .center_rewards_coefficient
                    .is_some_and(|c| !(c >= 0.0 && c.is_finite())) =>
            {
                return Err(invalid(
                    "reward.center_rewards_coefficient",
                    format!(
                        "must be a non-negative number, got {}",
                        self.reward.center_rewards_coefficient.unwrap_or_default()
                    ),
                ));
            }
            Method::Grpo | Method::Rloo => {
                let (key, message) = match crate::rl::RlSettings::from_config(self) {
                    Ok(_) => (String::new(), String::new()),
                    Err(e) => match e.split_once(": ") {
                        Some((k, m)) => (k.to_string(), m.to_string()),
                        None => (self.method.name().to_string(), e),
                    },
                };
                if !message.is_empty() {
                    return Err(invalid(&key, message));
                }
            }
            Method::Orpo if !(self.orpo.beta >= 0.0 && self.orpo.beta.is_finite()) => {
                return Err(invalid(
                    "orpo.beta",
                    format!("must be a non-negative number, got {}", self.orpo.beta),
                ));
            }
            _ => {}
        }
        if self.lora.init_from.is_some() && !self.uses_lora() {
            return Err(invalid(
                "lora.init_from",
                "starts a LoRA adapter; it does not apply with full = true",
            ));
        }
        let d = &self.data;
        if d.train.is_empty() || d.train.iter().any(|p| p.trim().is_empty()) {
            return Err(invalid("data.train", "is required: one or more files or folders"));
        }
        if d.max_length < 2 {
            return Err(invalid(
                "data.max_length",
                format!("must be at least 2, got {}", d.max_length),
            ));
        }
        unit("data.eval_fraction", d.eval_fraction, false)?;
        if d.eval_fraction > 0.0 && !d.eval.is_empty() {
            return Err(invalid(
                "data.eval_fraction",
                "set together with data.eval; use one of them",
            ));
        }
        if !self.full && !self.lora.enabled {
            return Err(invalid(
                "lora.enabled",
                "is false and full is false: nothing to train; set one of them",
            ));
        }
        if self.uses_lora() {
            let l = &self.lora;
            if l.r == 0 {
                return Err(invalid("lora.r", "must be at least 1"));
            }
            positive("lora.alpha", l.alpha)?;
            unit("lora.dropout", l.dropout, false)?;
            if let LoraTargets::Modules(m) = &l.targets
                && (m.is_empty() || m.iter().any(|t| t.trim().is_empty()))
            {
                return Err(invalid(
                    "lora.targets",
                    "must be \"all-linear\" or a non-empty list of layer names",
                ));
            }
        }
        let o = &self.optimizer;
        positive("optimizer.lr", o.lr)?;
        unit("optimizer.beta1", o.beta1, false)?;
        unit("optimizer.beta2", o.beta2, false)?;
        positive("optimizer.eps", o.eps)?;
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return Err(invalid(
                "optimizer.weight_decay",
                format!("must be >= 0, got {}", o.weight_decay),
            ));
        }
        let s = &self.schedule;
        unit("schedule.warmup_ratio", s.warmup_ratio, true)?;
        unit("schedule.min_lr_ratio", s.min_lr_ratio, true)?;
        if s.warmup_steps.is_some() && s.warmup_ratio > 0.0 {
            return Err(invalid(
                "schedule.warmup_steps",
                "set together with schedule.warmup_ratio; use one of them",
            ));
        }
        let b = &self.batch;
        match (b.micro_batch_tokens, b.micro_batch_rows) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "batch.micro_batch_tokens",
                    "set together with batch.micro_batch_rows; use one",
                ));
            }
            (Some(t), None) if t < d.max_length => {
                return Err(invalid(
                    "batch.micro_batch_tokens",
                    format!(
                        "({t}) must be at least data.max_length ({}) so that every sequence fits",
                        d.max_length
                    ),
                ));
            }
            (None, Some(0)) => return Err(invalid("batch.micro_batch_rows", "must be at least 1")),
            _ => {}
        }
        if b.grad_accum == 0 {
            return Err(invalid("batch.grad_accum", "must be at least 1"));
        }
        if b.max_grad_norm.is_nan() || b.max_grad_norm < 0.0 {
            return Err(invalid(
                "batch.max_grad_norm",
                format!("must be >= 0 (0 = no clipping), got {}", b.max_grad_norm),
            ));
        }
        let t = &self.train;
        match t.max_steps {
            Some(0) => return Err(invalid("train.max_steps", "must be at least 1")),
            None if t.epochs == 0 => return Err(invalid("train.epochs", "must be at least 1")),
            _ => {}
        }
        if t.log_every == 0 {
            return Err(invalid("train.log_every", "must be at least 1"));
        }
        if self.output.dir.as_deref().is_some_and(|d| d.trim().is_empty()) {
            return Err(invalid("output.dir", "must not be empty"));
        }
        Ok(())
    }

    /// Whether a LoRA adapter is trained (`lora.enabled` and not `full`).
    pub fn uses_lora(&self) -> bool {
        !self.full && self.lora.enabled
    }

    /// The micro-batch size; in a resolved config exactly one of the two keys is set.
    pub fn micro_batch(&self) -> MicroBatch {
        match (self.batch.micro_batch_rows, self.batch.micro_batch_tokens) {
            (Some(r), _) => MicroBatch::Rows(r),
            (None, Some(t)) => MicroBatch::Tokens(t),
            (None, None) => MicroBatch::Tokens(self.data.max_length.max(4096)),
        }
    }

    /// The run directory (`output.dir`, or `runs/graft` in an unresolved config).
    pub fn output_dir(&self) -> PathBuf {
        PathBuf::from(self.output.dir.as_deref().unwrap_or("runs/graft"))
    }

    /// The config as TOML, every resolved value written out; parses back to an equal config.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a TrainConfig always serialises to TOML")
    }

    /// Writes the resolved config to `run_dir/config.toml` (temp file + rename), creating `run_dir`.
    /// Returns the file's path.
    pub fn save(&self, run_dir: &Path) -> Result<PathBuf, ConfigError> {
        let path = run_dir.join(CONFIG_FILE);
        let tmp = run_dir.join(format!(".{CONFIG_FILE}.tmp"));
        let io = |source| ConfigError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(run_dir).map_err(io)?;
        let text = format!(
            "# Resolved configuration of this run (graft {}).\n{}",
            env!("CARGO_PKG_VERSION"),
            self.to_toml()
        );
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(path)
    }

    /// SHA-256 (hex) of [`TrainConfig::to_toml`]: identifies the config in checkpoints.
    pub fn hash(&self) -> String {
        crate::checkpoint::sha256_hex(self.to_toml().as_bytes())
    }

    /// A complete example config with every key, its documentation and its default (keys without a
    /// default are shown commented out). It parses and validates as is.
    pub fn documented_example() -> String {
        // Unresolved on purpose: keys whose default depends on other keys or on the file name
        // (micro-batch size, run directory) are shown commented out.
        let defaults = TrainConfig {
            model: ModelConfig {
                path: "x".into(),
                ..Default::default()
            },
            data: DataConfig {
                train: vec!["x".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let defaults: Table = toml::from_str(&defaults.to_toml()).expect("own TOML parses");
        let mut out = String::from(
            "# graft train configuration.\n\
             # Run: graft train CONFIG.toml [--set section.key=value ...]\n\
             # Every key is optional except model.path and data.train; the values below are the defaults\n\
             # (commented-out lines show keys that have no default).\n",
        );
        let mut section = "";
        for k in KEYS {
            let (sec, name) = k.path.rsplit_once('.').unwrap_or(("", k.path));
            if sec != section {
                section = sec;
                let doc = SECTIONS
                    .iter()
                    .find(|(s, _)| *s == sec)
                    .map(|(_, d)| *d)
                    .unwrap_or("");
                out.push_str(&format!("\n[{sec}]\n# {doc}\n"));
            }
            out.push('\n');
            for line in wrap(k.doc, 98) {
                out.push_str(&format!("# {line}\n"));
            }
            let default = if sec.is_empty() {
                defaults.get(name)
            } else {
                defaults.get(sec).and_then(|t| t.get(name))
            };
            let required = matches!(k.path, "model.path" | "data.train");
            match (default, k.example) {
                (_, Some(ex)) if required => out.push_str(&format!("{name} = {ex}\n")),
                (Some(Value::Float(f)), _) => out.push_str(&format!("{name} = {}\n", format_float(*f))),
                (Some(v), _) => out.push_str(&format!("{name} = {v}\n")),
                (None, Some(ex)) => out.push_str(&format!("# {name} = {ex}\n")),
                (None, None) => out.push_str(&format!("# {name} =\n")),
            }
        }
        out.push_str(
            "\n# [[rewards]]: the reward functions of method = \"grpo\" / \"rloo\", one table each, e.g.\n\
             # [[rewards]]\n\
             # name = \"math\"       # math, exact_match, contains, regex, format, length, json_valid, json_schema,\n\
             #                     # code_tests\n\
             # column = \"answer\"   # the function's own options\n\
             # on_error = \"fail\"   # a sample it cannot score stops the run, or \"zero\" scores it 0\n",
        );
        out
    }
}

/// A float as TOML, in exponent form when small (`1e-8` rather than `0.00000001`).
fn format_float(f: f64) -> String {
    if f != 0.0 && f.abs() < 1e-3 {
        format!("{f:e}")
    } else if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[model]\npath = \"m\"\n[data]\ntrain = \"t.jsonl\"\n";

    fn parse(text: &str, sets: &[&str]) -> Result<TrainConfig, ConfigError> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        TrainConfig::from_toml_str(text, "test.toml", &sets)
    }

    fn err(text: &str, sets: &[&str]) -> String {
        parse(text, sets).unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.model.path, "m");
        assert_eq!(c.data.train, vec!["t.jsonl"]);
        assert_eq!(c.method, Method::Sft);
        assert!(c.uses_lora());
        assert_eq!(c.lora.r, 16);
        assert_eq!(c.lora.targets, LoraTargets::AllLinear);
        assert_eq!(c.optimizer.lr, 2e-4);
        assert_eq!(c.micro_batch(), MicroBatch::Tokens(4096));
        assert_eq!(c.output_dir(), PathBuf::from("runs/graft"));
        assert_eq!(c.lora.scale(), 2.0);
    }

    #[test]
    fn unknown_keys_are_named_with_suggestions() {
        let e = err(&format!("{MINIMAL}[optimizer]\nlrr = 1e-4\n"), &[]);
        assert_eq!(
            e,
            "unknown key `optimizer.lrr` in test.toml (did you mean `optimizer.lr`?)"
        );
        let e = err(&format!("{MINIMAL}[optimiser]\nlr = 1e-4\n"), &[]);
        assert!(
            e.contains("`optimiser`") && e.contains("did you mean `optimizer`"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}[train]\nlr = 1e-4\n"), &[]);
        assert!(
            e.contains("`train.lr`") && e.contains("did you mean `optimizer.lr`"),
            "{e}"
        );
        let e = err(
            "[model]\npath = \"m\"\n[data]\ntrain = \"t\"\nmax-length = 5\n",
            &[],
        );
        assert!(
            e.contains("`data.max-length`") && e.contains("`data.max_length`"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}[data]\n"), &[]);
        assert!(e.contains("invalid TOML"), "{e}");
        let e = err(&format!("{MINIMAL}[batch]\nzzzzzzzzzz = 1\n"), &[]);
        assert_eq!(e, "unknown key `batch.zzzzzzzzzz` in test.toml");
        let e = err(MINIMAL, &["lora.rnk=8"]);
        assert_eq!(e, "unknown key `lora.rnk` in --set (did you mean `lora.r`?)");
        let e = err(MINIMAL, &["lora=false"]);
        assert!(e.contains("is a section") && e.contains("lora.enabled"), "{e}");
        let e = err(MINIMAL, &["optimizer.lr.x=1"]);
        assert!(e.contains("`optimizer.lr.x`"), "{e}");
    }

    #[test]
    fn type_errors_name_key_and_type() {
        let e = err(&format!("{MINIMAL}[optimizer]\nlr = \"fast\"\n"), &[]);
        assert_eq!(
            e,
            "`optimizer.lr` in test.toml must be a number, found string \"fast\""
        );
        let e = err(&format!("{MINIMAL}[lora]\nr = -1\n"), &[]);
        assert!(
            e.contains("`lora.r`") && e.contains("non-negative integer"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}[schedule]\nkind = \"cosin\"\n"), &[]);
        assert!(
            e.contains("`schedule.kind`") && e.contains("did you mean \"cosine\""),
            "{e}"
        );
        let e = err("model = \"m\"\n", &[]);
        assert!(e.contains("`model`") && e.contains("section"), "{e}");
        let e = err(MINIMAL, &["train.seed=abc"]);
        assert!(e.contains("`train.seed` in --set"), "{e}");
        let e = err(MINIMAL, &["data.packing=yes"]);
        assert!(e.contains("true or false"), "{e}");
        assert!(err(MINIMAL, &["novalue"]).contains("expected key=value"));
    }

    #[test]
    fn set_overrides_parse_as_toml_or_string() {
        let c = parse(
            MINIMAL,
            &[
                "optimizer.lr=1e-3",
                "lora.targets=[\"q_proj\", \"v_proj\"]",
                "model.path=org/model-name",
                "output.dir=2024",
                "schedule.kind=linear",
                "train.max_steps=7",
                "data.train=a.jsonl",
                "lora.alpha=8",
                "data.packing=false",
                " train.seed = 7 ",
            ],
        )
        .unwrap();
        assert_eq!(c.optimizer.lr, 1e-3);
        assert_eq!(
            c.lora.targets,
            LoraTargets::Modules(vec!["q_proj".into(), "v_proj".into()])
        );
        assert_eq!(c.model.path, "org/model-name");
        assert_eq!(c.output.dir.as_deref(), Some("2024"));
        assert_eq!(c.schedule.kind, ScheduleKind::Linear);
        assert_eq!(c.train.max_steps, Some(7));
        assert_eq!(c.data.train, vec!["a.jsonl"]);
        assert_eq!(c.lora.alpha, 8.0);
        assert!(!c.data.packing);
        assert_eq!(c.train.seed, 7);
        // Later overrides win; a --set may create its section.
        let c = parse(
            "[model]\npath = \"m\"\n",
            &["data.train=x", "optimizer.lr=1", "optimizer.lr=2"],
        )
        .unwrap();
        assert_eq!(c.optimizer.lr, 2.0);
    }

    #[test]
    fn validation_names_the_key() {
        assert!(err("[model]\npath = \"\"\n[data]\ntrain = \"t\"\n", &[]).contains("`model.path`"));
        assert!(err("[model]\npath = \"m\"\n", &[]).contains("`data.train`"));
        let e = err(&format!("full = true\n{MINIMAL}[lora]\nenabled = true\n"), &[]);
        assert!(e.contains("conflict"), "{e}");
        let cases: [(&[&str], &str); 16] = [
            (&["optimizer.lr=0"], "`optimizer.lr`: must be a positive number"),
            (&["optimizer.beta2=1.0"], "`optimizer.beta2`"),
            (&["optimizer.weight_decay=-0.1"], "`optimizer.weight_decay`"),
            (&["lora.r=0"], "`lora.r`"),
            (&["lora.dropout=1.0"], "`lora.dropout`"),
            (&["lora.targets=[]"], "`lora.targets`"),
            (&["batch.grad_accum=0"], "`batch.grad_accum`"),
            (&["batch.micro_batch_tokens=100"], "`batch.micro_batch_tokens`"),
            (
                &["batch.micro_batch_tokens=4096", "batch.micro_batch_rows=2"],
                "use one",
            ),
            (&["data.max_length=1"], "`data.max_length`: must be at least 2"),
            (
                &["schedule.warmup_steps=5", "schedule.warmup_ratio=0.1"],
                "`schedule.warmup_steps`",
            ),
            (&["train.max_steps=0"], "`train.max_steps`"),
            (&["train.epochs=0"], "`train.epochs`"),
            (&["train.log_every=0"], "`train.log_every`"),
            (&["lora.enabled=false"], "nothing to train"),
            (&["data.eval=e", "data.eval_fraction=0.1"], "`data.eval_fraction`"),
        ];
        for (sets, want) in cases {
            let e = err(MINIMAL, sets);
            assert!(e.contains(want), "{sets:?}: {e}");
        }
        // Rows instead of tokens is fine, and so is a token budget of exactly max_length.
        assert_eq!(
            parse(MINIMAL, &["batch.micro_batch_rows=2"])
                .unwrap()
                .micro_batch(),
            MicroBatch::Rows(2)
        );
        let c = parse(
            MINIMAL,
            &["data.max_length=8192", "batch.micro_batch_tokens=8192"],
        )
        .unwrap();
        assert_eq!(c.micro_batch(), MicroBatch::Tokens(8192));
        let c = parse(MINIMAL, &["data.max_length=8192"]).unwrap();
        assert_eq!(c.micro_batch(), MicroBatch::Tokens(8192));
    }

    #[test]
    fn full_fine_tuning_disables_lora() {
        let c = parse(&format!("full = true\n{MINIMAL}"), &[]).unwrap();
        assert!(!c.uses_lora() && !c.lora.enabled);
        let c = parse(MINIMAL, &["full=true"]).unwrap();
        assert!(c.full && !c.uses_lora());
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = parse(
            MINIMAL,
            &[
                "lora.targets=[\"q_proj\"]",
                "schedule.warmup_steps=3",
                "model.tokenizer=tok",
            ],
        )
        .unwrap();
        let text = c.to_toml();
        let back = parse(&text, &[]).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.hash(), c.hash());
        assert_eq!(c.hash().len(), 64);
        let other = parse(MINIMAL, &["train.seed=1"]).unwrap();
        assert_ne!(other.hash(), c.hash());
    }

    #[test]
    fn choice_keys_accept_the_cli_spellings() {
        let c = parse(
            MINIMAL,
            &["data.format=prompt-completion", "data.mask=all-tokens"],
        )
        .unwrap();
        assert_eq!(c.data.format, DataFormat::PromptCompletion);
        assert_eq!(c.data.mask, MaskPolicy::All);
        let c = parse(MINIMAL, &["data.mask=last-assistant"]).unwrap();
        assert_eq!(c.data.mask, MaskPolicy::LastAssistant);
        let text = format!("{MINIMAL}\n");
        let c = parse(&text.replace("[data]", "[data]\nmask = \"completion-only\""), &[]).unwrap();
        assert_eq!(c.data.mask, MaskPolicy::Completion);
    }

    #[test]
    fn documented_example_parses_and_covers_every_key() {
        let text = TrainConfig::documented_example();
        let c = parse(&text, &[]).unwrap();
        assert_eq!(c.model.path, "HuggingFaceTB/SmolLM2-135M-Instruct");
        // Apart from the required keys, the example's values are the defaults.
        let mut expected = parse(MINIMAL, &[]).unwrap();
        expected.model.path = c.model.path.clone();
        expected.data.train = c.data.train.clone();
        assert_eq!(c, expected);
        for k in KEYS {
            let name = last(k.path);
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("{name} =")) || l.starts_with(&format!("# {name} ="))),
                "{} missing from the example",
                k.path
            );
        }
        assert!(text.lines().all(|l| l.len() <= 110), "long line in example");
    }

    #[test]
    fn schema_matches_struct() {
        // A config with every optional key set serialises to exactly the keys of the schema.
        let mut c = parse(
            MINIMAL,
            &[
                "model.tokenizer=t",
                "data.chat_template=t",
                "dpo.loss_weights=[1.0]",
                "cpo.loss_type=sigmoid",
                "cpo.cpo_alpha=1.0",
                "lora.init_from=a",
                "schedule.warmup_steps=1",
                "train.max_steps=5",
                "data.eval=e",
                "reward.center_rewards_coefficient=0.01",
                "grpo.delta=4.0",
                "grpo.epsilon_high=0.28",
                "grpo.reward_weights=[1.0]",
                "rloo.epsilon_high=0.28",
                "rloo.reward_weights=[1.0]",
            ],
        )
        .unwrap();
        c.batch.micro_batch_rows = Some(2);
        let table: Table = toml::from_str(&c.to_toml()).unwrap();
        let mut found = Vec::new();
        for (k, v) in &table {
            match v {
                Value::Table(t) => found.extend(t.keys().map(|sub| format!("{k}.{sub}"))),
                _ => found.push(k.clone()),
            }
        }
        found.sort();
        let mut schema: Vec<String> = KEYS.iter().map(|k| k.path.to_string()).collect();
        schema.sort();
        assert_eq!(found, schema);
        for (s, _) in SECTIONS {
            assert!(KEYS.iter().any(|k| k.path.starts_with(&format!("{s}."))));
        }
    }

    #[test]
    fn load_reads_file_and_names_it() {
        let dir = std::env::temp_dir().join(format!("graft-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("my-sft.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let c = TrainConfig::load(&path, &[]).unwrap();
        assert_eq!(c.output_dir(), PathBuf::from("runs/my-sft"));
        let saved = c.save(&dir.join("run")).unwrap();
        assert_eq!(TrainConfig::load(&saved, &[]).unwrap(), c);
        let e = TrainConfig::load(&dir.join("missing.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
        std::fs::write(&path, "[model\n").unwrap();
        let e = TrainConfig::load(&path, &[]).unwrap_err().to_string();
        assert!(e.contains("my-sft.toml") && e.contains("invalid TOML"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("lr", "lr"), 0);
        assert_eq!(edit_distance("lrr", "lr"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
