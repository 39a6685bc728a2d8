//! The device-neutral types of the op set: what model and training code pass to a [`Backend`]
//! and get back from it, whatever the device. The CPU implementations in [`crate::cpu`] (and a
//! device backend's kernels) take and return these; none of them holds device memory.
//!
//! [`Backend`]: crate::Backend

use crate::cpu::gemm_bf16::has_avx512_bf16;

/// Numeric precision of matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 inputs and accumulation; what the fidelity tests use.
    #[default]
    Exact,
    /// bf16-rounded inputs with f32 accumulation (`vdpbf16ps` where available).
    Fast,
}

impl Precision {
    /// Fast mode only pays where the CPU has bf16 dot products; elsewhere it falls back to f32.
    /// (The CPU backend is the only one, so this asks the CPU.)
    pub fn effective(self) -> Precision {
        if self == Precision::Fast && has_avx512_bf16() {
            Precision::Fast
        } else {
            Precision::Exact
        }
    }
}

/// Shape of an attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Each query sees at most this many most recent keys, itself included.
    pub window: Option<usize>,
    /// Round the inputs of the two products (QKᵀ, PV and their backward) to bf16 with f32
    /// accumulation (fast mode); softmax and its statistics stay f32.
    pub bf16: bool,
}

impl AttentionShape {
    /// Values of a row of queries (all heads).
    pub fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
    /// Values of a row of keys or values (all KV heads).
    pub fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Splits per-token sequence ids into contiguous `(start, len)` segments.
pub fn segments_from_seq_ids(seq_ids: &[u32]) -> Vec<(usize, usize)> {
    let mut segs = Vec::new();
    let mut start = 0;
    for i in 1..=seq_ids.len() {
        if i == seq_ids.len() || seq_ids[i] != seq_ids[i - 1] {
            if i > start {
                segs.push((start, i - start));
            }
            start = i;
        }
    }
    segs
}

/// Target value meaning "no loss at this position".
pub const IGNORE_INDEX: i32 = -100;

/// What [`Backend::lm_head_cross_entropy`](crate::Backend::lm_head_cross_entropy) computed.
#[derive(Debug, Clone)]
pub struct CrossEntropyOutput {
    /// Σ over trained tokens of `−log p(target)`, accumulated in f64.
    pub loss_sum: f64,
    /// Number of tokens with a target.
    pub num_trained: usize,
    /// `log p(target)` per token (0 where the target is ignored).
    pub logprobs: Vec<f32>,
    /// The entropy of the predicted distribution per token (0 where the target is ignored):
    /// GRPO / RLOO log its mean.
    pub entropies: Vec<f32>,
    /// Trained tokens whose target is the most likely token (ties count as correct): the
    /// numerator of TRL's and OpenAI's `mean_token_accuracy`.
    pub num_correct: usize,
}

/// Elements per unit of work of the optimizer ops ([`Backend::adamw_update`],
/// [`Backend::sum_squares`], [`Backend::scale_all`]) and per partial sum of
/// [`Backend::sum_squares`]. Fixed, so results do not depend on the thread count (or on how a
/// device schedules its blocks).
///
/// [`Backend::adamw_update`]: crate::Backend::adamw_update
/// [`Backend::sum_squares`]: crate::Backend::sum_squares
/// [`Backend::scale_all`]: crate::Backend::scale_all
pub const OPTIM_CHUNK: usize = 1 << 14;

/// The per-step scalars of the AdamW update, as `f32` (computed by the optimizer in `f64`, as
/// torch computes them, then cast).
///
/// Per element, in this order: `p *= decay_factor` (when the tensor decays), then
/// `m = lerp_weight·(g − m) + m` and `v = (one_minus_beta2·g)·g + v·beta2` as fused multiply-adds,
/// then `p += (neg_step_size·m) / (√v / bias_correction2_sqrt + eps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// `1 − lr·weight_decay`.
    pub decay_factor: f32,
    /// `1 − β₁` (torch's `lerp` weight).
    pub lerp_weight: f32,
    /// `β₂`.
    pub beta2: f32,
    /// `1 − β₂`.
    pub one_minus_beta2: f32,
    /// `−lr / (1 − β₁ᵗ)`.
    pub neg_step_size: f32,
    /// `√(1 − β₂ᵗ)`.
    pub bias_correction2_sqrt: f32,
    /// Added to the denominator.
    pub eps: f32,
}

/// One tensor of an AdamW step: its values and moments (updated in place), its gradient, and
/// whether weight decay applies. `V` is the backend's [`View`](crate::Backend::View); all four
/// have the same length.
#[derive(Debug)]
pub struct AdamWTensor<'a, V: ?Sized> {
    /// The parameter's values.
    pub param: &'a mut V,
    /// Its gradient.
    pub grad: &'a V,
    /// The first moment (`exp_avg`).
    pub m: &'a mut V,
    /// The second moment (`exp_avg_sq`).
    pub v: &'a mut V,
    /// Multiply the values by [`AdamWScalars::decay_factor`] first.
    pub decay: bool,
}
