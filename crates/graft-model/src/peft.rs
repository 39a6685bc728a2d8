//! LoRA adapters in PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`,
//! readable and writable so that `peft.PeftModel.from_pretrained` loads what graft saves and graft
//! loads what PEFT saves.
//!
//! A LoRA pair on a linear layer `y = W x` adds `scale · B (A x)` with `A: [r, in]`,
//! `B: [out, r]`, and `scale = lora_alpha / r` (or `lora_alpha / sqrt(r)` with rsLoRA). graft
//! applies LoRA to the seven linear projections of a decoder layer (q, k, v, o, gate, up, down);
//! configs asking for anything else (DoRA, biases, embeddings, `modules_to_save`, …) are refused
//! with a message saying which option.
//!
//! Module selection follows PEFT: `target_modules` is a list of names (a module matches when its
//! full name equals an entry or ends with `.entry`), the string `"all-linear"`, or any other string
//! as a regular expression that must match the whole module name (e.g.
//! `model.layers.0.self_attn.q_proj`); `exclude_modules` the same; `layers_to_transform` with list
//! targets; `rank_pattern` / `alpha_pattern` keys match a module when the name ends with the key
//! (as a regex) at a `.` boundary.

use crate::config::ModelSpec;
use crate::error::ModelError;
use crate::weights::{open_safetensors, save_safetensors};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;

/// The seven linear projections of a decoder layer that can carry LoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraModule {
    /// `self_attn.q_proj`.
    Q,
    /// `self_attn.k_proj`.
    K,
    /// `self_attn.v_proj`.
    V,
    /// `self_attn.o_proj`.
    O,
    /// `mlp.gate_proj`.
    Gate,
    /// `mlp.up_proj`.
    Up,
    /// `mlp.down_proj`.
    Down,
}

impl LoraModule {
    /// All seven, in layer order.
    pub const ALL: [LoraModule; 7] = [
        LoraModule::Q,
        LoraModule::K,
        LoraModule::V,
        LoraModule::O,
        LoraModule::Gate,
        LoraModule::Up,
        LoraModule::Down,
    ];

    /// The module's own name (`q_proj`, …), as used in `target_modules`.
    pub fn name(self) -> &'static str {
        match self {
            LoraModule::Q => "q_proj",
            LoraModule::K => "k_proj",
            LoraModule::V => "v_proj",
            LoraModule::O => "o_proj",
            LoraModule::Gate => "gate_proj",
            LoraModule::Up => "up_proj",
            LoraModule::Down => "down_proj",
        }
    }

    /// Parses a module's own name (`q_proj`, …).
    pub fn from_name(name: &str) -> Option<LoraModule> {
        LoraModule::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The submodule holding it (`self_attn` or `mlp`).
    fn block(self) -> &'static str {
        match self {
            LoraModule::Q | LoraModule::K | LoraModule::V | LoraModule::O => "self_attn",
            LoraModule::Gate | LoraModule::Up | LoraModule::Down => "mlp",
        }
    }

    /// Full module name in a transformers causal LM, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.block(), self.name())
    }

    /// The layer and module of an HF weight name (`model.layers.3.self_attn.q_proj.weight`), if
    /// it is one of the seven LoRA-able projections.
    pub fn of_weight(name: &str) -> Option<(usize, LoraModule)> {
        let rest = name.strip_prefix("model.layers.")?.strip_suffix(".weight")?;
        let (layer, rest) = rest.split_once('.')?;
        let (block, module) = rest.split_once('.')?;
        let m = LoraModule::from_name(module)?;
        (m.block() == block).then_some((layer.parse().ok()?, m))
    }

    /// `(out_features, in_features)` of the projection for `spec`.
    pub fn dims(self, spec: &ModelSpec) -> (usize, usize) {
        let (h, f) = (spec.hidden_size, spec.intermediate_size);
        match self {
            LoraModule::Q => (spec.q_dim(), h),
            LoraModule::K | LoraModule::V => (spec.kv_dim(), h),
            LoraModule::O => (h, spec.q_dim()),
            LoraModule::Gate | LoraModule::Up => (f, h),
            LoraModule::Down => (h, f),
        }
    }
}

/// Which modules an adapter targets, in PEFT's three forms.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// A list of names: a module matches when its full name equals an entry or ends with
    /// `.entry`.
    List(Vec<String>),
    /// `"all-linear"`: every linear layer except the output head (here: all seven projections).
    AllLinear,
    /// A regular expression that must match the whole module name.
    Regex(String),
}

impl TargetModules {
    /// Whether `module_path` (a full module name) matches, PEFT's rules.
    fn matches(&self, module_path: &str) -> bool {
        match self {
            TargetModules::List(names) => names.iter().any(|n| name_matches(n, module_path)),
            TargetModules::AllLinear => true,
            TargetModules::Regex(re) => full_match(re, module_path),
        }
    }

    fn from_json(v: &Value, field: &str, path: &Path) -> Result<Option<TargetModules>, ModelError> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) if s.eq_ignore_ascii_case("all-linear") => Ok(Some(TargetModules::AllLinear)),
            Value::String(s) => {
                compile_full(s)
                    .map_err(|e| config_err(path, field, format!("invalid regular expression `{s}`: {e}")))?;
                Ok(Some(TargetModules::Regex(s.clone())))
            }
            Value::Array(items) => {
                let names = items
                    .iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| config_err(path, field, "expected a list of module names".into()))?;
                // PEFT treats a one-element ["all-linear"] like the string.
                if names.len() == 1 && names[0].eq_ignore_ascii_case("all-linear") {
                    return Ok(Some(TargetModules::AllLinear));
                }
                Ok(Some(TargetModules::List(names)))
            }
            other => Err(config_err(
                path,
                field,
                format!("expected a list of names or a string, got {other}"),
            )),
        }
    }
}

fn name_matches(name: &str, module_path: &str) -> bool {
    module_path == name
        || module_path
            .strip_suffix(name)
            .is_some_and(|head| head.ends_with('.'))
}

/// `^(?:re)$`, i.e. Python's `re.fullmatch`.
fn compile_full(re: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{re})$"))
}

fn full_match(re: &str, s: &str) -> bool {
    compile_full(re).map(|r| r.is_match(s)).unwrap_or(false)
}

/// PEFT's `get_pattern_key` test: `re.match(rf"(.*\.)?({key})$", module_path)`; a key that is not
/// a valid regex here falls back to a literal name/suffix comparison.
fn pattern_matches(key: &str, module_path: &str) -> bool {
    match regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")) {
        Ok(r) => r.is_match(module_path),
        Err(_) => name_matches(key, module_path),
    }
}

fn config_err(path: &Path, field: &str, message: String) -> ModelError {
    ModelError::Config {
        path: path.display().to_string(),
        field: field.into(),
        message,
    }
}

/// The parts of a PEFT `LoraConfig` that decide what an adapter computes.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapterConfig {
    /// Default rank.
    pub r: usize,
    /// Default alpha (scale numerator).
    pub lora_alpha: f32,
    /// rsLoRA: scale = alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
    /// Which modules carry LoRA.
    pub target_modules: TargetModules,
    /// Modules excluded even when targeted (PEFT `exclude_modules`).
    pub exclude_modules: Option<TargetModules>,
    /// Only these layer indices (PEFT `layers_to_transform`; applies to list targets, as in PEFT).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Dropout on the LoRA input during training.
    pub lora_dropout: f32,
    /// The base model the adapter was trained on (hub id or path).
    pub base_model_name_or_path: Option<String>,
    /// Per-module rank overrides: `(key, rank)`; a key matches a module whose full name ends with
    /// it (as a regex) at a `.` boundary; the first matching key wins.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alpha overrides, matched like `rank_pattern`.
    pub alpha_pattern: Vec<(String, f32)>,
    /// PEFT `task_type` (`CAUSAL_LM`, or `SEQ_CLS` for a reward model's adapter).
    pub task_type: Option<String>,
    /// PEFT `modules_to_save`: modules trained and saved whole next to the LoRA factors. graft
    /// supports a reward model's head only (`score`, with PEFT's `classifier` alias).
    pub modules_to_save: Vec<String>,
}

impl LoraAdapterConfig {
    /// A plain config: rank `r`, `lora_alpha`, the given module names, no patterns.
    pub fn new(r: usize, lora_alpha: f32, modules: &[LoraModule]) -> LoraAdapterConfig {
        LoraAdapterConfig {
            r,
            lora_alpha,
            use_rslora: false,
            target_modules: TargetModules::List(modules.iter().map(|m| m.name().to_string()).collect()),
            exclude_modules: None,
            layers_to_transform: None,
            lora_dropout: 0.0,
            base_model_name_or_path: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            task_type: Some("CAUSAL_LM".into()),
            modules_to_save: Vec::new(),
        }
    }

    /// This config for a reward model's adapter: task `SEQ_CLS`, with the `score` head in
    /// `modules_to_save` (what PEFT sets for `AutoModelForSequenceClassification`).
    pub fn for_sequence_classification(mut self) -> LoraAdapterConfig {
        self.task_type = Some("SEQ_CLS".into());
        self.modules_to_save = vec!["classifier".into(), "score".into()];
        self
    }

    /// Whether the config saves a reward model's `score` head with the adapter.
    pub fn saves_score(&self) -> bool {
        self.modules_to_save.iter().any(|m| m == "score")
    }

    /// Whether the module at `module_path` (e.g. `model.layers.0.self_attn.q_proj`) in decoder
    /// layer `layer` carries LoRA under this config.
    pub fn targets(&self, module_path: &str, layer: usize) -> bool {
        if self
            .exclude_modules
            .as_ref()
            .is_some_and(|x| x.matches(module_path))
        {
            return false;
        }
        if !self.target_modules.matches(module_path) {
            return false;
        }
        match (&self.target_modules, &self.layers_to_transform) {
            (TargetModules::List(_), Some(layers)) if !layers.is_empty() => layers.contains(&layer),
            _ => true,
        }
    }

    /// The rank of the module at `module_path` (`rank_pattern` or `r`).
    pub fn rank_for(&self, module_path: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module_path))
            .map_or(self.r, |&(_, r)| r)
    }

    /// The alpha of the module at `module_path` (`alpha_pattern` or `lora_alpha`).
    pub fn alpha_for(&self, module_path: &str) -> f32 {
        self.alpha_pattern
            .iter()
            .find(|(k, _)| pattern_matches(k, module_path))
            .map_or(self.lora_alpha, |&(_, a)| a)
    }

    /// The LoRA scale of the module at `module_path`: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scale_for(&self, module_path: &str) -> f32 {
        let r = self.rank_for(module_path).max(1) as f32;
        let alpha = self.alpha_for(module_path);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Parses a PEFT `adapter_config.json` object, refusing options graft does not implement.
    /// `path` is used in error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<LoraAdapterConfig, ModelError> {
        let err = |field: &str, message: String| config_err(path, field, message);
        let get = |k: &str| v.get(k).unwrap_or(&Value::Null);
        if !v.is_object() {
            return Err(err("(json)", "expected a JSON object".into()));
        }
        match get("peft_type") {
            Value::Null => {}
            Value::String(s) if s == "LORA" => {}
            other => {
                return Err(err(
                    "peft_type",
                    format!("only LORA adapters are supported, got {other}"),
                ));
            }
        }
        let truthy = |x: &Value| !matches!(x, Value::Null | Value::Bool(false));
        let refuse_if = |k: &str, what: &str| -> Result<(), ModelError> {
            let x = get(k);
            let set = match x {
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                other => truthy(other),
            };
            if set {
                Err(err(k, format!("{what} is not supported (got {x})")))
            } else {
                Ok(())
            }
        };
        refuse_if("use_dora", "DoRA (use_dora)")?;
        let modules_to_save = match get("modules_to_save") {
            Value::Null => Vec::new(),
            Value::Array(a) => {
                let mut names = Vec::new();
                for x in a {
                    match x.as_str() {
                        Some(n @ ("score" | "classifier")) => names.push(n.to_string()),
                        _ => {
                            return Err(err(
                                "modules_to_save",
                                format!(
                                    "saving `{x}` whole is not supported; graft supports a reward model's \
                                     head only (\"score\", \"classifier\")"
                                ),
                            ));
                        }
                    }
                }
                names
            }
            other => {
                return Err(err(
                    "modules_to_save",
                    format!("expected a list of module names, got {other}"),
                ));
            }
        };
        refuse_if("fan_in_fan_out", "fan_in_fan_out (Conv1D-style weights)")?;
        refuse_if("lora_bias", "a LoRA bias on B (lora_bias)")?;
        refuse_if("target_parameters", "LoRA on parameters (target_parameters)")?;
        refuse_if(
            "trainable_token_indices",
            "trainable token embeddings (trainable_token_indices)",
        )?;
        refuse_if("layer_replication", "layer replication")?;
        refuse_if(
            "alora_invocation_tokens",
            "activated LoRA (alora_invocation_tokens)",
        )?;
        refuse_if("use_qalora", "QALoRA (use_qalora)")?;
        refuse_if("use_bdlora", "block-diagonal LoRA (use_bdlora)")?;
        refuse_if("arrow_config", "Arrow routing (arrow_config)")?;
        refuse_if("kasa_config", "KaSA (kasa_config)")?;
        refuse_if("monteclora_config", "MonteCLoRA (monteclora_config)")?;
        refuse_if("velora_config", "VeLoRA (velora_config)")?;
        match get("bias") {
            Value::Null => {}
            Value::String(s) if s == "none" => {}
            other => return Err(err("bias", format!("only \"none\" is supported, got {other}"))),
        }
        if let Value::String(s) = get("init_lora_weights") {
            let s = s.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "lora_ga", "loftq"]
                .iter()
                .any(|p| s.starts_with(p))
            {
                return Err(err(
                    "init_lora_weights",
                    format!(
                        "`{s}` adapters change the base weights; convert the adapter to plain LoRA (PEFT's \
                         path_initial_model_for_weight_conversion) before loading it"
                    ),
                ));
            }
        }
        match get("layers_pattern") {
            Value::Null => {}
            Value::String(s) if s == "layers" || s.is_empty() => {}
            Value::Array(a) if a.iter().all(|x| x.as_str() == Some("layers")) => {}
            other => {
                return Err(err(
                    "layers_pattern",
                    format!("only \"layers\" is supported, got {other}"),
                ));
            }
        }

        let r = match get("r") {
            Value::Null => 8,
            x => x
                .as_u64()
                .filter(|&r| r > 0)
                .ok_or_else(|| err("r", format!("expected a positive integer, got {x}")))?
                as usize,
        };
        let num = |k: &str, default: f64| -> Result<f64, ModelError> {
            match get(k) {
                Value::Null => Ok(default),
                x => x
                    .as_f64()
                    .ok_or_else(|| err(k, format!("expected a number, got {x}"))),
            }
        };
        let lora_alpha = num("lora_alpha", 8.0)? as f32;
        let lora_dropout = num("lora_dropout", 0.0)? as f32;
        let use_rslora = match get("use_rslora") {
            Value::Null => false,
            x => x
                .as_bool()
                .ok_or_else(|| err("use_rslora", format!("expected true or false, got {x}")))?,
        };
        // PEFT's default targets for llama, mistral, qwen2 and qwen3.
        let target_modules = TargetModules::from_json(get("target_modules"), "target_modules", path)?
            .unwrap_or_else(|| TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
        let exclude_modules = TargetModules::from_json(get("exclude_modules"), "exclude_modules", path)?;
        if exclude_modules == Some(TargetModules::AllLinear) {
            return Err(err(
                "exclude_modules",
                "excluding all linear layers leaves nothing to adapt".into(),
            ));
        }
        let layers_to_transform = match get("layers_to_transform") {
            Value::Null => None,
            Value::Number(n) => Some(vec![
                n.as_u64()
                    .ok_or_else(|| err("layers_to_transform", format!("got {n}")))? as usize,
            ]),
            Value::Array(a) => Some(
                a.iter()
                    .map(|x| x.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| err("layers_to_transform", "expected layer indices".into()))?,
            ),
            other => {
                return Err(err(
                    "layers_to_transform",
                    format!("expected an index or a list, got {other}"),
                ));
            }
        };
        let patterns = |k: &str| -> Result<Vec<(String, f64)>, ModelError> {
            match get(k) {
                Value::Null => Ok(Vec::new()),
                Value::Object(m) => m
                    .iter()
                    .map(|(key, x)| {
                        let x = x.as_f64().ok_or_else(|| {
                            err(&format!("{k}.{key}"), format!("expected a number, got {x}"))
                        })?;
                        Ok((key.clone(), x))
                    })
                    .collect(),
                other => Err(err(k, format!("expected an object, got {other}"))),
            }
        };
        let rank_pattern = patterns("rank_pattern")?
            .into_iter()
            .map(|(k, x)| {
                if x >= 1.0 && x.fract() == 0.0 {
                    Ok((k, x as usize))
                } else {
                    Err(err(
                        &format!("rank_pattern.{k}"),
                        format!("expected a positive integer rank, got {x}"),
                    ))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let alpha_pattern = patterns("alpha_pattern")?
            .into_iter()
            .map(|(k, x)| (k, x as f32))
            .collect();
        let opt_str = |k: &str| -> Result<Option<String>, ModelError> {
            match get(k) {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s.clone())),
                other => Err(err(k, format!("expected a string, got {other}"))),
            }
        };
        Ok(LoraAdapterConfig {
            r,
            lora_alpha,
            use_rslora,
            target_modules,
            exclude_modules,
            layers_to_transform,
            lora_dropout,
            base_model_name_or_path: opt_str("base_model_name_or_path")?,
            rank_pattern,
            alpha_pattern,
            task_type: opt_str("task_type")?,
            modules_to_save,
        })
    }

    /// The `adapter_config.json` object PEFT 0.21 writes for this config.
    pub fn to_json(&self) -> Value {
        let number = |x: f32| -> Value {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                json!(x as i64)
            } else {
                json!(x as f64)
            }
        };
        let targets = |t: &TargetModules| -> Value {
            match t {
                TargetModules::List(names) => json!(names),
                // PEFT saves the expanded module names.
                TargetModules::AllLinear => json!(LoraModule::ALL.map(|m| m.name())),
                TargetModules::Regex(re) => json!(re),
            }
        };
        let rank_pattern: serde_json::Map<String, Value> = self
            .rank_pattern
            .iter()
            .map(|(k, r)| (k.clone(), json!(r)))
            .collect();
        let alpha_pattern: serde_json::Map<String, Value> = self
            .alpha_pattern
            .iter()
            .map(|(k, a)| (k.clone(), number(*a)))
            .collect();
        json!({
            "alora_invocation_tokens": null,
            "alpha_pattern": alpha_pattern,
            "arrow_config": null,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "corda_config": null,
            "ensure_weight_tying": false,
            "eva_config": null,
            "exclude_modules": self.exclude_modules.as_ref().map(targets),
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "kasa_config": null,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": self.layers_to_transform,
            "loftq_config": {},
            "lora_alpha": number(self.lora_alpha),
            "lora_bias": false,
            "lora_dropout": self.lora_dropout as f64,
            "lora_ga_config": null,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": if self.modules_to_save.is_empty() {
                Value::Null
            } else {
                json!(self.modules_to_save)
            },
            "monteclora_config": null,
            "peft_type": "LORA",
            "qalora_group_size": 16,
            "r": self.r,
            "rank_pattern": rank_pattern,
            "revision": null,
            "target_modules": targets(&self.target_modules),
            "target_parameters": null,
            "task_type": self.task_type.as_deref().unwrap_or("CAUSAL_LM"),
            "trainable_token_indices": null,
            "use_bdlora": null,
            "use_dora": false,
            "use_qalora": false,
            "use_rslora": self.use_rslora,
            "velora_config": null,
        })
    }
}

/// One LoRA pair on a linear layer: `y += scale · B (A x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// `[r, in]`, row-major.
    pub a: Vec<f32>,
    /// `[out, r]`, row-major.
    pub b: Vec<f32>,
    /// Rank.
    pub r: usize,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f32,
}

impl LoraPair {
    /// A pair of zeros for a `[out, in]` projection.
    pub fn zeros(out: usize, inp: usize, r: usize, scale: f32) -> LoraPair {
        LoraPair {
            a: vec![0.0; r * inp],
            b: vec![0.0; out * r],
            r,
            scale,
        }
    }
}

/// Adds one LoRA pair's `scale · B A` to the `[out, inp]` row-major weight `w` in place (`a`:
/// `[r, inp]`, `b`: `[out, r]`), in f32, row by row — the one merge every export uses.
pub fn add_lora_delta(w: &mut [f32], a: &[f32], b: &[f32], r: usize, scale: f32, inp: usize) {
    if inp == 0 || r == 0 {
        return;
    }
    for (o, wrow) in w.chunks_exact_mut(inp).enumerate() {
        for k in 0..r {
            let coef = scale * b[o * r + k];
            if coef != 0.0 {
                for (wv, &x) in wrow.iter_mut().zip(&a[k * inp..(k + 1) * inp]) {
                    *wv += coef * x;
                }
            }
        }
    }
}

/// The LoRA pairs of one decoder layer (`None` where a projection has no adapter).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerLora {
    /// `self_attn.q_proj`.
    pub q: Option<LoraPair>,
    /// `self_attn.k_proj`.
    pub k: Option<LoraPair>,
    /// `self_attn.v_proj`.
    pub v: Option<LoraPair>,
    /// `self_attn.o_proj`.
    pub o: Option<LoraPair>,
    /// `mlp.gate_proj`.
    pub gate: Option<LoraPair>,
    /// `mlp.up_proj`.
    pub up: Option<LoraPair>,
    /// `mlp.down_proj`.
    pub down: Option<LoraPair>,
}

impl LayerLora {
    /// The pair on `module`, if any.
    pub fn get(&self, module: LoraModule) -> Option<&LoraPair> {
        self.slot(module).as_ref()
    }

    /// Mutable access to the slot of `module`.
    pub fn get_mut(&mut self, module: LoraModule) -> &mut Option<LoraPair> {
        match module {
            LoraModule::Q => &mut self.q,
            LoraModule::K => &mut self.k,
            LoraModule::V => &mut self.v,
            LoraModule::O => &mut self.o,
            LoraModule::Gate => &mut self.gate,
            LoraModule::Up => &mut self.up,
            LoraModule::Down => &mut self.down,
        }
    }

    fn slot(&self, module: LoraModule) -> &Option<LoraPair> {
        match module {
            LoraModule::Q => &self.q,
            LoraModule::K => &self.k,
            LoraModule::V => &self.v,
            LoraModule::O => &self.o,
            LoraModule::Gate => &self.gate,
            LoraModule::Up => &self.up,
            LoraModule::Down => &self.down,
        }
    }
}

/// A LoRA adapter for a whole model: its config and one [`LayerLora`] per decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    /// The PEFT config (rank, alpha, targets, patterns).
    pub config: LoraAdapterConfig,
    /// One entry per decoder layer.
    pub layers: Vec<LayerLora>,
    /// A reward model's `score` head (`[1, hidden]`), saved whole under PEFT's
    /// `modules_to_save` as `base_model.model.score.weight`.
    pub score: Option<Vec<f32>>,
}

impl LoraAdapter {
    /// An adapter with zero-filled A and B for every module `config` targets in a model with
    /// `spec` (ranks and scales from the config); the trainer initialises A.
    pub fn zeros(config: LoraAdapterConfig, spec: &ModelSpec) -> LoraAdapter {
        let layers = (0..spec.num_layers)
            .map(|i| {
                let mut layer = LayerLora::default();
                for m in LoraModule::ALL {
                    let path = m.path(i);
                    if config.targets(&path, i) {
                        let (out, inp) = m.dims(spec);
                        *layer.get_mut(m) = Some(LoraPair::zeros(
                            out,
                            inp,
                            config.rank_for(&path),
                            config.scale_for(&path),
                        ));
                    }
                }
                layer
            })
            .collect();
        LoraAdapter {
            config,
            layers,
            score: None,
        }
    }

    /// Number of trainable values (all A and B entries).
    pub fn num_parameters(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| LoraModule::ALL.map(|m| l.get(m).map_or(0, |p| p.a.len() + p.b.len())))
            .sum()
    }
}

/// The safetensors key PEFT saves for `module` in `layer` (`lora_A` or `lora_B`).
fn peft_key(module: LoraModule, layer: usize, ab: &str) -> String {
    format!("base_model.model.{}.{ab}.weight", module.path(layer))
}

/// The key PEFT saves a reward model's `score` head under (in `modules_to_save`).
pub const PEFT_SCORE_KEY: &str = "base_model.model.score.weight";

/// Whether `key` is the saved `score` head (PEFT strips the `modules_to_save.default` infix
/// when saving; a state dict taken from a live model still has it).
fn is_score_key(key: &str) -> bool {
    let rest = key.strip_prefix("base_model.model.").unwrap_or(key);
    matches!(
        rest,
        "score.weight" | "score.modules_to_save.default.weight" | "score.modules_to_save.weight"
    )
}

/// Parses a saved key into (layer, module, "lora_A" | "lora_B"), accepting the `.default`
/// adapter-name infix and keys with or without the `base_model.model.` prefix.
fn parse_key(key: &str) -> Option<(usize, LoraModule, &'static str)> {
    let rest = key.strip_prefix("base_model.model.").unwrap_or(key);
    let rest = rest.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (rest, ab) = if let Some(r) = rest.strip_suffix(".lora_A") {
        (r, "lora_A")
    } else {
        (rest.strip_suffix(".lora_B")?, "lora_B")
    };
    let (block, name) = rest.split_once('.')?;
    let module = LoraModule::from_name(name)?;
    (module.block() == block).then_some((layer, module, ab))
}

/// Loads a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`) — or a
/// llama.cpp LoRA `.gguf` file — for a model with `spec`. Every A/B shape is checked against the spec and the config's rank; errors
/// name the key or config field.
pub fn load_peft_adapter(dir: &Path, spec: &ModelSpec) -> Result<LoraAdapter, ModelError> {
    if dir.is_file() && dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return crate::weights::gguf::load_gguf_lora(dir, spec);
    }
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::format(&config_path, format!("invalid JSON: {e}")))?;
    let config = LoraAdapterConfig::from_json(&value, &config_path)?;
    check_targets_exist(&config, spec, &config_path)?;

    let weights_path = dir.join("adapter_model.safetensors");
    if !weights_path.is_file() {
        let message = if dir.join("adapter_model.bin").is_file() {
            "adapter_model.bin (a PyTorch pickle) is not supported; save the adapter with safe_serialization=True"
        } else {
            "adapter_model.safetensors is missing"
        };
        return Err(ModelError::format(dir, message));
    }
    let store = open_safetensors(&weights_path)?;

    // Every key must be a LoRA A/B of a supported projection in an existing layer.
    let mut found: HashMap<(usize, LoraModule, &str), String> = HashMap::new();
    let mut score = None;
    for key in store.names() {
        if is_score_key(key) {
            if !config.saves_score() {
                return Err(ModelError::tensor(
                    &weights_path,
                    key,
                    "is a reward model's score head, but adapter_config.json does not list \"score\" in modules_to_save",
                ));
            }
            score = Some(store.f32(key, &[1, spec.hidden_size])?);
            continue;
        }
        let Some((layer, module, ab)) = parse_key(key) else {
            return Err(ModelError::tensor(
                &weights_path,
                key,
                "is not a LoRA A/B weight of q/k/v/o/gate/up/down_proj; graft supports LoRA on those seven \
                 projections only (no DoRA magnitudes, embeddings or biases; modules_to_save only for a reward \
                 model's score head)",
            ));
        };
        if layer >= spec.num_layers {
            return Err(ModelError::tensor(
                &weights_path,
                key,
                format!(
                    "layer {layer} does not exist; the model has {} layers",
                    spec.num_layers
                ),
            ));
        }
        if let Some(previous) = found.insert((layer, module, ab), key.to_string()) {
            return Err(ModelError::tensor(
                &weights_path,
                key,
                format!("duplicates `{previous}`"),
            ));
        }
    }

    let mut layers = Vec::with_capacity(spec.num_layers);
    for i in 0..spec.num_layers {
        let mut layer = LayerLora::default();
        for m in LoraModule::ALL {
            let path = m.path(i);
            let targeted = config.targets(&path, i);
            let a_key = found.get(&(i, m, "lora_A"));
            let b_key = found.get(&(i, m, "lora_B"));
            match (targeted, a_key, b_key) {
                (false, None, None) => continue,
                (false, Some(k), _) | (false, None, Some(k)) => {
                    return Err(ModelError::tensor(
                        &weights_path,
                        k,
                        format!("module `{path}` is not selected by target_modules in adapter_config.json"),
                    ));
                }
                (true, None, _) => {
                    return Err(ModelError::tensor(
                        &weights_path,
                        &peft_key(m, i, "lora_A"),
                        "missing",
                    ));
                }
                (true, _, None) => {
                    return Err(ModelError::tensor(
                        &weights_path,
                        &peft_key(m, i, "lora_B"),
                        "missing",
                    ));
                }
                (true, Some(a_key), Some(b_key)) => {
                    let r = config.rank_for(&path);
                    let (out, inp) = m.dims(spec);
                    let a = store.f32(a_key, &[r, inp])?;
                    let b = store.f32(b_key, &[out, r])?;
                    *layer.get_mut(m) = Some(LoraPair {
                        a,
                        b,
                        r,
                        scale: config.scale_for(&path),
                    });
                }
            }
        }
        layers.push(layer);
    }
    if config.saves_score() && score.is_none() {
        return Err(ModelError::tensor(
            &weights_path,
            PEFT_SCORE_KEY,
            "missing (adapter_config.json lists \"score\" in modules_to_save)",
        ));
    }
    if score.is_none()
        && layers
            .iter()
            .all(|l| LoraModule::ALL.iter().all(|&m| l.get(m).is_none()))
    {
        return Err(ModelError::tensor(
            &weights_path,
            "(all)",
            "the adapter has no LoRA weights for this model",
        ));
    }
    Ok(LoraAdapter {
        config,
        layers,
        score,
    })
}

/// Refuses target modules that name nothing graft can adapt (PEFT too fails when a target
/// matches no module; here embeddings, `lm_head` and the norms are not adaptable).
fn check_targets_exist(config: &LoraAdapterConfig, spec: &ModelSpec, path: &Path) -> Result<(), ModelError> {
    let paths: Vec<String> = (0..spec.num_layers.max(1))
        .flat_map(|i| LoraModule::ALL.map(|m| m.path(i)))
        .collect();
    let supported =
        "graft applies LoRA to q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj only";
    match &config.target_modules {
        TargetModules::AllLinear => {}
        TargetModules::List(names) => {
            for name in names {
                if !paths.iter().any(|p| name_matches(name, p)) {
                    return Err(config_err(
                        path,
                        "target_modules",
                        format!("`{name}` is not a supported module; {supported}"),
                    ));
                }
            }
        }
        TargetModules::Regex(re) => {
            if !paths.iter().any(|p| full_match(re, p)) {
                return Err(config_err(
                    path,
                    "target_modules",
                    format!("the regular expression `{re}` matches no supported module; {supported}"),
                ));
            }
        }
    }
    Ok(())
}

/// Writes `adapter` as a PEFT adapter directory (`adapter_config.json` +
/// `adapter_model.safetensors`, f32) that `peft.PeftModel.from_pretrained` loads. Each pair's rank
/// and scale must be what the config gives its module (set `rank_pattern` / `alpha_pattern` for
/// per-module values), and the pairs present must be exactly the modules the config targets.
pub fn save_peft_adapter(
    dir: &Path,
    adapter: &LoraAdapter,
    base_model_name_or_path: Option<&str>,
) -> Result<(), ModelError> {
    let config = &adapter.config;
    let weights_path = dir.join("adapter_model.safetensors");
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for (i, layer) in adapter.layers.iter().enumerate() {
        for m in LoraModule::ALL {
            let path = m.path(i);
            let key = peft_key(m, i, "lora_A");
            match (config.targets(&path, i), layer.get(m)) {
                (false, None) => {}
                (true, None) => {
                    return Err(ModelError::tensor(
                        &weights_path,
                        &key,
                        format!(
                            "module `{path}` is targeted by the config but the adapter has no pair for it"
                        ),
                    ));
                }
                (false, Some(_)) => {
                    return Err(ModelError::tensor(
                        &weights_path,
                        &key,
                        format!(
                            "the adapter has a pair for `{path}`, which the config's target_modules does not select"
                        ),
                    ));
                }
                (true, Some(p)) => {
                    let (r, scale) = (config.rank_for(&path), config.scale_for(&path));
                    if p.r != r || p.r == 0 {
                        return Err(ModelError::tensor(
                            &weights_path,
                            &key,
                            format!(
                                "pair rank {} differs from the config's rank {r} for `{path}`",
                                p.r
                            ),
                        ));
                    }
                    if (p.scale - scale).abs() > 1e-6 * scale.abs().max(1.0) {
                        return Err(ModelError::tensor(
                            &weights_path,
                            &key,
                            format!(
                                "pair scale {} differs from the config's scale {scale} for `{path}`",
                                p.scale
                            ),
                        ));
                    }
                    if p.a.len() % r != 0 || p.b.len() % r != 0 {
                        return Err(ModelError::tensor(
                            &weights_path,
                            &key,
                            format!(
                                "A has {} values and B {}, not multiples of the rank {r}",
                                p.a.len(),
                                p.b.len()
                            ),
                        ));
                    }
                    tensors.push((key, vec![r, p.a.len() / r], &p.a));
                    tensors.push((peft_key(m, i, "lora_B"), vec![p.b.len() / r, r], &p.b));
                }
            }
        }
    }
    match (&adapter.score, config.saves_score()) {
        (Some(w), true) => tensors.push((PEFT_SCORE_KEY.to_string(), vec![1, w.len()], w)),
        (None, false) => {}
        (Some(_), false) => {
            return Err(ModelError::tensor(
                &weights_path,
                PEFT_SCORE_KEY,
                "the adapter has a score head but the config's modules_to_save does not list \"score\"",
            ));
        }
        (None, true) => {
            return Err(ModelError::tensor(
                &weights_path,
                PEFT_SCORE_KEY,
                "the config's modules_to_save lists \"score\" but the adapter has no score head",
            ));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors(&weights_path, &tensors, Some(meta))?;
    let mut json = config.to_json();
    if let Some(base) = base_model_name_or_path {
        json["base_model_name_or_path"] = json!(base);
    }
    let config_path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&json)
        .map_err(|e| ModelError::format(&config_path, format!("cannot encode: {e}")))?;
    crate::weights::write_file_atomically(&config_path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::save_safetensors;
    use std::path::PathBuf;

    fn tiny_spec() -> ModelSpec {
        ModelSpec::from_config_json(&json!({
            "architectures": ["Qwen2ForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 32,
        }))
        .unwrap()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("graft-peft-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Deterministic non-trivial values.
    fn fill(adapter: &mut LoraAdapter) {
        let mut x = 1u32;
        for layer in &mut adapter.layers {
            for m in LoraModule::ALL {
                if let Some(p) = layer.get_mut(m) {
                    for v in p.a.iter_mut().chain(p.b.iter_mut()) {
                        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        *v = (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                    }
                }
            }
        }
    }

    #[test]
    fn round_trip_with_patterns_and_rslora() {
        let spec = tiny_spec();
        let mut config = LoraAdapterConfig::new(4, 8.0, &LoraModule::ALL);
        config.use_rslora = true;
        config.rank_pattern = vec![("layers.1.self_attn.q_proj".into(), 2)];
        config.alpha_pattern = vec![("down_proj".into(), 3.0)];
        config.layers_to_transform = Some(vec![0, 1]);
        let mut adapter = LoraAdapter::zeros(config, &spec);
        fill(&mut adapter);
        assert!(
            adapter.layers[2].q.is_none(),
            "layers_to_transform leaves layer 2 out"
        );
        assert_eq!(adapter.layers[1].q.as_ref().unwrap().r, 2);
        assert_eq!(adapter.layers[0].q.as_ref().unwrap().r, 4);
        assert_eq!(adapter.layers[0].q.as_ref().unwrap().scale, 4.0);
        assert_eq!(adapter.layers[0].down.as_ref().unwrap().scale, 1.5);
        let dir = scratch("roundtrip");
        save_peft_adapter(&dir, &adapter, Some("Qwen/tiny")).unwrap();
        let loaded = load_peft_adapter(&dir, &spec).unwrap();
        assert_eq!(
            loaded.config.base_model_name_or_path.as_deref(),
            Some("Qwen/tiny")
        );
        let mut expected = adapter.clone();
        expected.config.base_model_name_or_path = Some("Qwen/tiny".into());
        assert_eq!(loaded, expected);
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        for (k, v) in [
            ("peft_type", json!("LORA")),
            ("task_type", json!("CAUSAL_LM")),
            ("bias", json!("none")),
            ("fan_in_fan_out", json!(false)),
            ("init_lora_weights", json!(true)),
            ("inference_mode", json!(true)),
            ("modules_to_save", Value::Null),
            ("use_dora", json!(false)),
            ("r", json!(4)),
            ("lora_alpha", json!(8)),
        ] {
            assert_eq!(json[k], v, "{k}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn target_forms_follow_peft() {
        let list = TargetModules::List(vec!["q_proj".into(), "mlp.up_proj".into()]);
        assert!(list.matches("model.layers.0.self_attn.q_proj"));
        assert!(list.matches("model.layers.3.mlp.up_proj"));
        assert!(!list.matches("model.layers.3.mlp.gate_proj"));
        assert!(!TargetModules::List(vec!["proj".into()]).matches("model.layers.0.self_attn.q_proj"));
        let re = TargetModules::Regex(r".*\.(q|v)_proj".into());
        assert!(re.matches("model.layers.0.self_attn.v_proj"));
        assert!(!re.matches("model.layers.0.self_attn.k_proj"));
        // Full match: a bare name is not a regex for the whole path.
        assert!(!TargetModules::Regex("q_proj".into()).matches("model.layers.0.self_attn.q_proj"));
        assert!(TargetModules::AllLinear.matches("model.layers.0.mlp.down_proj"));
        let p = Path::new("adapter_config.json");
        let c = LoraAdapterConfig::from_json(&json!({"r": 2, "target_modules": "all-linear"}), p).unwrap();
        assert_eq!(c.target_modules, TargetModules::AllLinear);
        let c = LoraAdapterConfig::from_json(&json!({"r": 2}), p).unwrap();
        assert_eq!(
            c.target_modules,
            TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
        );
        let c = LoraAdapterConfig::from_json(
            &json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
                    "exclude_modules": ["layers.0.self_attn.q_proj"], "rank_pattern": {"^model.layers.1.*v_proj": 2}}),
            p,
        )
        .unwrap();
        assert!(!c.targets("model.layers.0.self_attn.q_proj", 0));
        assert!(c.targets("model.layers.1.self_attn.q_proj", 1));
        assert_eq!(c.rank_for("model.layers.1.self_attn.v_proj"), 2);
        assert_eq!(c.rank_for("model.layers.2.self_attn.v_proj"), 8);
        assert_eq!(c.scale_for("model.layers.1.self_attn.v_proj"), 8.0);
        assert_eq!(c.scale_for("model.layers.2.self_attn.v_proj"), 2.0);
    }

    /// Ranks and scales PEFT 0.21.2 gave each module for these configs (`get_peft_model` on a
    /// 2-layer model, read from each LoRA layer's `r` and `scaling`).
    #[test]
    fn patterns_agree_with_peft() {
        let p = Path::new("adapter_config.json");
        let c = LoraAdapterConfig::from_json(
            &json!({"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                    "rank_pattern": {"layers.1.self_attn.q_proj": 2, "^model.layers.0.mlp.*": 3},
                    "alpha_pattern": {"down_proj": 5, "v_proj": 7}}),
            p,
        )
        .unwrap();
        for (module, r, scale) in [
            ("model.layers.0.mlp.down_proj", 3, 5.0 / 3.0),
            ("model.layers.0.mlp.gate_proj", 3, 8.0 / 3.0),
            ("model.layers.0.self_attn.q_proj", 4, 2.0),
            ("model.layers.0.self_attn.v_proj", 4, 1.75),
            ("model.layers.1.mlp.down_proj", 4, 1.25),
            ("model.layers.1.self_attn.q_proj", 2, 4.0),
        ] {
            assert_eq!(c.rank_for(module), r, "{module}");
            assert!((c.scale_for(module) - scale).abs() < 1e-6, "{module}");
        }
        let c = LoraAdapterConfig::from_json(
            &json!({"r": 2, "lora_alpha": 3, "target_modules": ".*\\.(q|k)_proj", "use_rslora": true}),
            p,
        )
        .unwrap();
        assert!(
            c.targets("model.layers.1.self_attn.k_proj", 1)
                && !c.targets("model.layers.1.self_attn.v_proj", 1)
        );
        assert!((c.scale_for("model.layers.1.self_attn.k_proj") - 2.1213203).abs() < 1e-6);
        let c = LoraAdapterConfig::from_json(
            &json!({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"],
                    "layers_to_transform": [1], "exclude_modules": ["layers.1.mlp.down_proj"]}),
            p,
        )
        .unwrap();
        let targeted: Vec<String> = (0..2)
            .flat_map(|i| LoraModule::ALL.map(move |m| (i, m)))
            .filter(|&(i, m)| c.targets(&m.path(i), i))
            .map(|(i, m)| m.path(i))
            .collect();
        assert_eq!(targeted, vec!["model.layers.1.self_attn.q_proj".to_string()]);
    }

    #[test]
    fn unsupported_options_are_refused_by_name() {
        let p = Path::new("adapter_config.json");
        for (field, extra) in [
            ("use_dora", json!({"use_dora": true})),
            ("modules_to_save", json!({"modules_to_save": ["lm_head"]})),
            ("bias", json!({"bias": "all"})),
            ("fan_in_fan_out", json!({"fan_in_fan_out": true})),
            ("peft_type", json!({"peft_type": "IA3"})),
            ("init_lora_weights", json!({"init_lora_weights": "pissa"})),
            ("target_modules", json!({"target_modules": "[unclosed"})),
        ] {
            let mut v = json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            let e = LoraAdapterConfig::from_json(&v, p).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        // An empty modules_to_save list is what PEFT writes as "nothing"; accepted.
        LoraAdapterConfig::from_json(&json!({"r": 4, "modules_to_save": []}), p).unwrap();
    }

    #[test]
    fn load_errors_name_the_key_or_field() {
        let spec = tiny_spec();
        let dir = scratch("errors");
        let mut adapter = LoraAdapter::zeros(
            LoraAdapterConfig::new(2, 4.0, &[LoraModule::Q, LoraModule::V]),
            &spec,
        );
        fill(&mut adapter);
        save_peft_adapter(&dir, &adapter, None).unwrap();

        // A target that is not one of the seven projections.
        let mut cfg = adapter.config.to_json();
        cfg["target_modules"] = json!(["q_proj", "embed_tokens"]);
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
        let e = load_peft_adapter(&dir, &spec).unwrap_err().to_string();
        assert!(e.contains("target_modules") && e.contains("embed_tokens"), "{e}");

        // A config whose rank disagrees with the weights: the key and both shapes are named.
        let mut cfg = adapter.config.to_json();
        cfg["r"] = json!(3);
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
        let e = load_peft_adapter(&dir, &spec).unwrap_err().to_string();
        assert!(
            e.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
                && e.contains("[3, 16]"),
            "{e}"
        );

        // Weights for a module the config does not target.
        let mut cfg = adapter.config.to_json();
        cfg["target_modules"] = json!(["q_proj"]);
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
        let e = load_peft_adapter(&dir, &spec).unwrap_err().to_string();
        assert!(e.contains("v_proj.lora_") && e.contains("not selected"), "{e}");

        // A DoRA magnitude vector in the weights.
        std::fs::write(
            dir.join("adapter_config.json"),
            adapter.config.to_json().to_string(),
        )
        .unwrap();
        let m = vec![1f32; 16];
        let a = vec![0f32; 32];
        let b = vec![0f32; 32];
        save_safetensors(
            &dir.join("adapter_model.safetensors"),
            &[
                (
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
                    vec![2, 16],
                    &a,
                ),
                (
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".into(),
                    vec![16, 2],
                    &b,
                ),
                (
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
                    vec![16],
                    &m,
                ),
            ],
            None,
        )
        .unwrap();
        let e = load_peft_adapter(&dir, &spec).unwrap_err().to_string();
        assert!(e.contains("lora_magnitude_vector"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn default_adapter_name_infix_is_accepted() {
        let spec = tiny_spec();
        let dir = scratch("default");
        let config = LoraAdapterConfig::new(2, 2.0, &[LoraModule::O]);
        std::fs::write(dir.join("adapter_config.json"), config.to_json().to_string()).unwrap();
        let a: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..32).map(|i| -(i as f32)).collect();
        let mut tensors = Vec::new();
        for i in 0..3 {
            let p = format!("base_model.model.model.layers.{i}.self_attn.o_proj");
            tensors.push((format!("{p}.lora_A.default.weight"), vec![2, 16], a.as_slice()));
            tensors.push((format!("{p}.lora_B.default.weight"), vec![16, 2], b.as_slice()));
        }
        save_safetensors(&dir.join("adapter_model.safetensors"), &tensors, None).unwrap();
        let adapter = load_peft_adapter(&dir, &spec).unwrap();
        let o = adapter.layers[2].o.as_ref().unwrap();
        assert_eq!(
            (o.a.as_slice(), o.b.as_slice(), o.scale),
            (a.as_slice(), b.as_slice(), 1.0)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Adapters written by real PEFT (`tests/fixtures/engine/*/lora*/adapter`), when present.
    #[test]
    fn peft_fixtures_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/engine");
        let Ok(cases) = std::fs::read_dir(&root) else {
            eprintln!("skipping: {} not found", root.display());
            return;
        };
        let mut loaded = 0;
        for case in cases {
            let case = case.unwrap().path();
            let Ok(spec) = ModelSpec::from_config_file(&case.join("config.json")) else {
                continue;
            };
            for sub in std::fs::read_dir(&case).unwrap() {
                let adapter_dir = sub.unwrap().path().join("adapter");
                if !adapter_dir.join("adapter_config.json").is_file() {
                    continue;
                }
                let adapter = load_peft_adapter(&adapter_dir, &spec)
                    .unwrap_or_else(|e| panic!("{}: {e}", adapter_dir.display()));
                assert!(adapter.num_parameters() > 0);
                // Saving it again and reloading gives the same adapter.
                let out = scratch(&format!("fixture-{loaded}"));
                save_peft_adapter(&out, &adapter, None).unwrap();
                assert_eq!(
                    load_peft_adapter(&out, &spec).unwrap(),
                    adapter,
                    "{}",
                    adapter_dir.display()
                );
                let _ = std::fs::remove_dir_all(&out);
                loaded += 1;
            }
        }
        if loaded == 0 {
            eprintln!("skipping: no PEFT adapters under {}", root.display());
        }
    }
}
