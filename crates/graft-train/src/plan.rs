//! The memory planner: predicts a training run's peak resident memory from the model shape and
//! the run's settings, by counting the buffers the engine allocates (weights in their storage
//! type, trainable parameters with gradient and two AdamW moments, the activations each layer
//! keeps for backward — or only layer inputs with checkpointing — the largest backward transient,
//! and the LM-head logits chunk). `graft bench train` prints it next to the measured peak.

use crate::config::{Method, MicroBatch, Precision as CfgPrecision, TrainConfig};
use graft_model::ModelSpec;
use graft_model::lora::LoraSpec;
use graft_model::model::{WeightStorage, stored_weight_bytes};
use std::fmt;

/// What the planner needs to know about a run.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// Tokens per micro-batch.
    pub tokens: usize,
    /// LoRA spec, or `None` for full fine-tuning.
    pub lora: Option<LoraSpec>,
    /// Frozen weights stored as bf16 (fast-mode LoRA).
    pub bf16_weights: bool,
    /// Bytes of the base weights in their storage when the file says more than the shape does
    /// (a quantized GGUF, whose block-quantized matrices stay in their blocks under LoRA; see
    /// `graft_model::model::stored_weight_bytes`); `None`: every weight at the storage type's size.
    pub stored_weight_bytes: Option<u64>,
    /// bf16 matrix products (the LM head is then packed once per step, twice: Wᵀ and W).
    pub fast: bool,
    /// Activation checkpointing.
    pub checkpointing: bool,
}

/// Predicted peak memory, by part (bytes).
#[derive(Debug, Clone, Default)]
pub struct MemoryPlan {
    /// Base weights in their storage type.
    pub weights: u64,
    /// Trainable values + gradients + AdamW moments (LoRA: the adapters; full: every weight).
    pub trainable: u64,
    /// Activations kept for backward across all layers.
    pub activations: u64,
    /// Largest transient of one layer's forward/backward (incl. recomputation).
    pub layer_workspace: u64,
    /// LM head: one logits chunk (its gradient in place) and, in fast mode, the packed head.
    pub logits_chunk: u64,
    /// Process baseline (code, allocator, thread stacks, tokenized data).
    pub baseline: u64,
}

impl MemoryPlan {
    /// Sum of the parts.
    pub fn total(&self) -> u64 {
        self.weights
            + self.trainable
            + self.activations
            + self.layer_workspace
            + self.logits_chunk
            + self.baseline
    }
}

fn mb(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "predicted peak memory: {:.0} MB", mb(self.total()))?;
        for (name, v) in [
            ("weights", self.weights),
            ("trainable (+grads, AdamW)", self.trainable),
            ("activations", self.activations),
            ("layer workspace", self.layer_workspace),
            ("LM head (chunk, packing)", self.logits_chunk),
            ("baseline", self.baseline),
        ] {
            writeln!(f, "  {name:<27} {:>8.0} MB", mb(v))?;
        }
        Ok(())
    }
}

/// Predicts the peak memory of training `spec` with `input`.
pub fn estimate(spec: &ModelSpec, input: &PlanInput) -> MemoryPlan {
    let t = input.tokens as u64;
    let (h, i) = (spec.hidden_size as u64, spec.intermediate_size as u64);
    let (qd, kd) = (spec.q_dim() as u64, spec.kv_dim() as u64);
    let (nh, layers, v) = (
        spec.num_heads as u64,
        spec.num_layers as u64,
        spec.vocab_size as u64,
    );
    let params = spec.num_parameters() as u64;
    let weight_bytes = if input.bf16_weights { 2 } else { 4 };
    let dims: [(u64, u64); 7] = [(qd, h), (kd, h), (kd, h), (h, qd), (i, h), (i, h), (h, i)];
    let (trainable_params, lora_rank_sum) = match &input.lora {
        Some(l) => {
            let per_layer: u64 = dims
                .iter()
                .zip(l.targets)
                .filter(|(_, on)| *on)
                .map(|((o, n), _)| l.r as u64 * (o + n))
                .sum();
            let ranks = l.targets.iter().filter(|&&on| on).count() as u64 * l.r as u64;
            (per_layer * layers, ranks)
        }
        None => (params, 0),
    };
    // Full fine-tuning: the f32 weights are the trainable values (counted in `weights`).
    let trainable = match input.lora {
        Some(_) => trainable_params * 16,
        None => trainable_params * 12,
    };
    let qk = if spec.qk_norm {
        qd + kd + nh + spec.num_kv_heads as u64
    } else {
        0
    };
    let kept_per_token = h + 1 + qd + 2 * kd + qd + nh + h + 1 + 2 * i + lora_rank_sum + qk;
    let activations = if input.checkpointing {
        layers * t * h * 4 + t * kept_per_token * 4
    } else {
        layers * t * kept_per_token * 4
    };
    // Backward of one layer, at its widest: the MLP part holds dact, dg, du (3·I) and hn, dhn,
    // dh (3·h); the attention part dattn, dq (2·qd), dk, dv (2·kd), xn, dxn, dh (3·h). The final
    // norm adds x, xf, dxf (3·h).
    let widest = (3 * i + 3 * h).max(2 * qd + 2 * kd + 3 * h);
    let layer_workspace = t * (widest + 3 * h) * 4;
    // One chunk of logits (its gradient is computed in place) plus the gathered hidden rows.
    let chunk = graft_kernels::cpu::cross_entropy::default_chunk_rows(spec.vocab_size) as u64;
    let packed_head = if input.fast { 2 * v * h * 2 } else { 0 };
    let logits_chunk = chunk.min(t) * v * 4 + chunk.min(t) * h * 8 + packed_head;
    MemoryPlan {
        weights: input.stored_weight_bytes.unwrap_or(params * weight_bytes),
        trainable,
        activations,
        layer_workspace,
        logits_chunk,
        baseline: 8 << 20,
    }
}

/// The plan of a config: reads only the model's `config.json` (or GGUF/llama2.c header), so a
/// hub model can be planned before its weights are downloaded.
pub fn plan(cfg: &TrainConfig) -> Result<MemoryPlan, crate::sft::TrainError> {
    let spec = graft_hub::hub::model_spec(&cfg.model.path)
        .map_err(|e| crate::sft::TrainError(format!("model.path: {e}")))?;
    let lora = if cfg.uses_lora() {
        Some(crate::sft::lora_spec(cfg)?)
    } else {
        None
    };
    let fast = cfg.model.precision == CfgPrecision::Fast
        && graft_kernels::Precision::Fast.effective() == graft_kernels::Precision::Fast;
    // A local GGUF file: its tensor types (from the header; nothing is read) decide what the
    // base costs, since block-quantized matrices stay in their blocks under fast-mode LoRA.
    let bf16_weights = fast && lora.is_some();
    let local = std::path::Path::new(&cfg.model.path);
    let stored_weight_bytes = if local.is_file() && local.extension().is_some_and(|e| e == "gguf") {
        let loaded = graft_model::weights::load_model(local)
            .map_err(|e| crate::sft::TrainError(format!("model.path: {e}")))?;
        let storage = if bf16_weights {
            WeightStorage::Bf16
        } else {
            WeightStorage::F32
        };
        Some(stored_weight_bytes(&loaded.spec, &loaded.weights, storage))
    } else {
        None
    };
    let tokens = match cfg.micro_batch() {
        MicroBatch::Tokens(n) => n,
        // Preference methods count pairs: two sequences each (KTO's KL sequences are forward only).
        MicroBatch::Rows(r)
            if matches!(
                cfg.method,
                Method::Dpo | Method::Cpo | Method::Simpo | Method::Orpo | Method::Reward
            ) =>
        {
            2 * r * cfg.data.max_length
        }
        MicroBatch::Rows(r) => r * cfg.data.max_length,
    };
    Ok(estimate(
        &spec,
        &PlanInput {
            tokens,
            bf16_weights,
            stored_weight_bytes,
            fast,
            lora,
            checkpointing: cfg.train.activation_checkpointing,
        },
    ))
}
