//! Model architecture description read from a Hugging Face `config.json`.
//!
//! [`ModelSpec`] is the single description the rest of the engine works from: the decoder is
//! driven entirely by it, so architecture variants (Qwen2 q/k/v bias, Qwen3 q/k norm, Mistral
//! sliding window, Llama 3 RoPE scaling, tied embeddings) are fields here, not separate models.

use crate::error::ModelError;
use serde_json::Value;
use std::path::Path;

/// Which Hugging Face architecture family a model belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM`: Llama 2/3/3.x, SmolLM/SmolLM2, TinyLlama, llama2.c exports.
    Llama,
    /// `MistralForCausalLM`: Llama layout plus an optional sliding attention window.
    Mistral,
    /// `Qwen2ForCausalLM`: bias on the q/k/v projections.
    Qwen2,
    /// `Qwen3ForCausalLM`: RMSNorm on each query/key head, explicit `head_dim`.
    Qwen3,
}

impl Architecture {
    /// The `architectures[0]` string transformers writes for this family.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The `architectures[0]` string of this family's reward-model class
    /// (`AutoModelForSequenceClassification`).
    pub fn hf_sequence_classifier_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForSequenceClassification",
            Architecture::Mistral => "MistralForSequenceClassification",
            Architecture::Qwen2 => "Qwen2ForSequenceClassification",
            Architecture::Qwen3 => "Qwen3ForSequenceClassification",
        }
    }

    /// The `model_type` string transformers writes for this family.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    /// Parses an `architectures[0]` (or `model_type`) value; `*ForSequenceClassification` names
    /// the same family.
    pub fn parse(name: &str) -> Option<Architecture> {
        if let Some(family) = name.strip_suffix("ForSequenceClassification") {
            return Architecture::parse(&format!("{family}ForCausalLM"));
        }
        match name {
            "LlamaForCausalLM" | "llama" => Some(Architecture::Llama),
            "MistralForCausalLM" | "mistral" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Some(Architecture::Qwen2),
            "Qwen3ForCausalLM" | "qwen3" => Some(Architecture::Qwen3),
            _ => None,
        }
    }
}

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters` in config.json).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.1-style piecewise scaling of the inverse frequencies.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Linear position interpolation: inverse frequencies divided by `factor`.
    Linear { factor: f32 },
}

/// Everything the engine needs to know about a decoder-only transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Width of one attention head (may differ from `hidden_size / num_heads`, as in Qwen3).
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// The LM head shares the token-embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate/up/down projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Each token attends to at most this many most recent positions, itself included (Mistral).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    /// All end-of-sequence ids (Llama 3 instruct models list several).
    pub eos_token_ids: Vec<u32>,
    /// A reward model: config.json says `*ForSequenceClassification` with one label, so the
    /// checkpoint has a `score` head (`[1, hidden]`) and no `lm_head`.
    pub sequence_classifier: bool,
}

impl ModelSpec {
    /// Reads and validates `config.json`.
    pub fn from_config_file(path: &Path) -> Result<ModelSpec, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.display().to_string(),
            field: "(json)".into(),
            message: format!("invalid JSON: {e}"),
        })?;
        ModelSpec::from_config_json(&value).map_err(|e| e.in_file(path))
    }

    /// Builds a spec from a parsed `config.json` object.
    pub fn from_config_json(v: &Value) -> Result<ModelSpec, ModelError> {
        let cfg = ConfigReader { v };
        let arch_name = match v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
        {
            Some(s) => s.to_string(),
            None => cfg.str("model_type")?,
        };
        let architecture = Architecture::parse(&arch_name).ok_or_else(|| {
            cfg.err(
                "architectures",
                format!(
                    "unsupported architecture `{arch_name}`; expected one of LlamaForCausalLM, \
                     MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM (or their \
                     *ForSequenceClassification reward models)"
                ),
            )
        })?;
        let sequence_classifier = arch_name.ends_with("ForSequenceClassification");
        if sequence_classifier {
            let labels = match v.get("id2label") {
                Some(Value::Object(m)) => m.len(),
                _ => cfg.opt_usize("num_labels")?.unwrap_or(2),
            };
            if labels != 1 {
                return Err(cfg.err(
                    "id2label",
                    format!(
                        "a sequence classifier with {labels} labels; graft trains and scores reward models, \
                         which have one (num_labels = 1)"
                    ),
                ));
            }
        }
        if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str())
            && act != "silu"
        {
            return Err(cfg.err(
                "hidden_act",
                format!("unsupported activation `{act}`; expected `silu`"),
            ));
        }
        let hidden_size = cfg.usize("hidden_size")?;
        let num_heads = cfg.usize("num_attention_heads")?;
        let num_kv_heads = cfg.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match cfg.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if num_heads == 0 || hidden_size % num_heads != 0 {
                    return Err(cfg.err(
                        "num_attention_heads",
                        format!(
                            "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}"
                        ),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(cfg.err(
                "num_key_value_heads",
                format!(
                    "num_attention_heads {num_heads} must be a multiple of num_key_value_heads {num_kv_heads}"
                ),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(cfg.err("head_dim", format!("RoPE needs an even head_dim, got {head_dim}")));
        }

        // transformers ≥ 5 moved rope_theta/rope_scaling into `rope_parameters`.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .or_else(|| v.get("rope_theta").and_then(|t| t.as_f64()))
            .unwrap_or(10000.0) as f32;
        let scaling_obj = v.get("rope_scaling").filter(|s| s.is_object()).or(rope_params);
        let rope_scaling = match scaling_obj {
            None => RopeScaling::None,
            Some(s) => parse_rope_scaling(s).map_err(|m| cfg.err("rope_scaling", m))?,
        };

        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Qwen3 | Architecture::Llama | Architecture::Mistral => {
                let b = cfg.opt_bool("attention_bias")?.unwrap_or(false);
                (b, b)
            }
        };
        let sliding_window = match architecture {
            Architecture::Mistral => cfg.opt_usize("sliding_window")?,
            Architecture::Qwen2 | Architecture::Qwen3 => {
                if cfg.opt_bool("use_sliding_window")?.unwrap_or(false) {
                    return Err(cfg.err(
                        "use_sliding_window",
                        "per-layer sliding windows (use_sliding_window = true) are not supported".into(),
                    ));
                }
                None
            }
            Architecture::Llama => None,
        };
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![n.as_u64().unwrap_or(0) as u32],
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
            Some(_) => {
                return Err(cfg.err("eos_token_id", "expected an integer or a list of integers".into()));
            }
        };
        let spec = ModelSpec {
            architecture,
            vocab_size: cfg.usize("vocab_size")?,
            hidden_size,
            intermediate_size: cfg.usize("intermediate_size")?,
            num_layers: cfg.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: cfg.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: cfg.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: cfg.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: cfg.opt_bool("mlp_bias")?.unwrap_or(false),
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window,
            bos_token_id: cfg.opt_usize("bos_token_id")?.map(|x| x as u32),
            eos_token_ids,
            sequence_classifier,
        };
        Ok(spec)
    }

    /// Query projection width (`num_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Key/value projection width (`num_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Writes a `config.json` that transformers loads back to this spec.
    pub fn to_config_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        let class = if self.sequence_classifier {
            self.architecture.hf_sequence_classifier_name()
        } else {
            self.architecture.hf_name()
        };
        m.insert("architectures".into(), serde_json::json!([class]));
        if self.sequence_classifier {
            m.insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
            m.insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
        }
        m.insert("model_type".into(), self.architecture.model_type().into());
        m.insert("vocab_size".into(), self.vocab_size.into());
        m.insert("hidden_size".into(), self.hidden_size.into());
        m.insert("intermediate_size".into(), self.intermediate_size.into());
        m.insert("num_hidden_layers".into(), self.num_layers.into());
        m.insert("num_attention_heads".into(), self.num_heads.into());
        m.insert("num_key_value_heads".into(), self.num_kv_heads.into());
        m.insert("head_dim".into(), self.head_dim.into());
        m.insert("hidden_act".into(), "silu".into());
        m.insert("rms_norm_eps".into(), (self.rms_norm_eps as f64).into());
        m.insert("rope_theta".into(), (self.rope_theta as f64).into());
        m.insert(
            "rope_scaling".into(),
            match self.rope_scaling {
                RopeScaling::None => Value::Null,
                RopeScaling::Linear { factor } => {
                    serde_json::json!({"rope_type": "linear", "factor": factor})
                }
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                } => {
                    serde_json::json!({
                        "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                        "high_freq_factor": high_freq_factor,
                        "original_max_position_embeddings": original_max_position_embeddings,
                    })
                }
            },
        );
        m.insert(
            "max_position_embeddings".into(),
            self.max_position_embeddings.into(),
        );
        m.insert("tie_word_embeddings".into(), self.tie_word_embeddings.into());
        match self.architecture {
            Architecture::Qwen2 => {
                m.insert("use_sliding_window".into(), false.into());
            }
            Architecture::Mistral => {
                m.insert(
                    "sliding_window".into(),
                    self.sliding_window.map(Value::from).unwrap_or(Value::Null),
                );
            }
            Architecture::Qwen3 => {
                m.insert("attention_bias".into(), self.qkv_bias.into());
                m.insert("use_sliding_window".into(), false.into());
            }
            Architecture::Llama => {
                m.insert("attention_bias".into(), self.qkv_bias.into());
                m.insert("mlp_bias".into(), self.mlp_bias.into());
            }
        }
        if let Some(b) = self.bos_token_id {
            m.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                m.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                m.insert("eos_token_id".into(), serde_json::json!(many));
            }
        }
        m.insert("torch_dtype".into(), "float32".into());
        Value::Object(m)
    }

    /// Number of parameters of the base model (embedding counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let per_layer = 2 * h
            + h * self.q_dim()
            + 2 * h * self.kv_dim()
            + self.q_dim() * h
            + 3 * h * self.intermediate_size
            + if self.qkv_bias {
                self.q_dim() + 2 * self.kv_dim()
            } else {
                0
            }
            + if self.o_bias { h } else { 0 }
            + if self.mlp_bias {
                2 * self.intermediate_size + h
            } else {
                0
            }
            + if self.qk_norm { 2 * self.head_dim } else { 0 };
        let head = if self.sequence_classifier {
            h
        } else if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * per_layer + h + head
    }
}

fn parse_rope_scaling(s: &Value) -> Result<RopeScaling, String> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| s.get(k).and_then(|x| x.as_f64());
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor").ok_or("linear rope_scaling needs `factor`")? as f32,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor").ok_or("llama3 rope_scaling needs `factor`")? as f32,
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0) as f32,
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0) as f32,
            original_max_position_embeddings: num("original_max_position_embeddings").unwrap_or(8192.0)
                as usize,
        }),
        other => Err(format!(
            "unsupported rope type `{other}`; expected default, linear or llama3"
        )),
    }
}

/// Typed access to config fields with errors that name the field.
struct ConfigReader<'a> {
    v: &'a Value,
}

impl ConfigReader<'_> {
    fn err(&self, field: &str, message: String) -> ModelError {
        ModelError::Config {
            path: "config.json".into(),
            field: field.into(),
            message,
        }
    }
    fn str(&self, k: &str) -> Result<String, ModelError> {
        self.v
            .get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .ok_or_else(|| self.err(k, "missing or not a string".into()))
    }
    fn usize(&self, k: &str) -> Result<usize, ModelError> {
        self.opt_usize(k)?
            .ok_or_else(|| self.err(k, "missing; expected a positive integer".into()))
    }
    fn opt_usize(&self, k: &str) -> Result<Option<usize>, ModelError> {
        match self.v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(k, format!("expected a non-negative integer, got {x}"))),
        }
    }
    fn opt_f64(&self, k: &str) -> Result<Option<f64>, ModelError> {
        match self.v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(k, format!("expected a number, got {x}"))),
        }
    }
    fn opt_bool(&self, k: &str) -> Result<Option<bool>, ModelError> {
        match self.v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(k, format!("expected true or false, got {x}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smollm2_with_rope_parameters() {
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
            "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30,
            "vocab_size": 49152, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
            "rope_parameters": {"rope_theta": 100000, "rope_type": "default"}
        });
        let s = ModelSpec::from_config_json(&v).unwrap();
        assert_eq!(s.head_dim, 64);
        assert_eq!(s.rope_theta, 100000.0);
        assert_eq!(s.rope_scaling, RopeScaling::None);
        assert!(
            (s.num_parameters() as f64 - 134.5e6).abs() < 1e6,
            "{}",
            s.num_parameters()
        );
    }

    #[test]
    fn unsupported_architecture_names_the_field() {
        let v = serde_json::json!({"architectures": ["GPT2LMHeadModel"]});
        let e = ModelSpec::from_config_json(&v).unwrap_err().to_string();
        assert!(
            e.contains("architectures") && e.contains("GPT2LMHeadModel"),
            "{e}"
        );
    }

    #[test]
    fn missing_field_is_named() {
        let v = serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_attention_heads": 2});
        let e = ModelSpec::from_config_json(&v).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
    }
}
