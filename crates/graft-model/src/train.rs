//! The training step: forward and backward of the whole decoder over one packed micro-batch,
//! written out op by op (llm.c-style). Backward mirrors forward line by line.
//!
//! The objective is a function of the per-token log-probs `log p(target_t)`; backward takes its
//! derivative `d_logp[t] = ∂L/∂ log p(target_t)` per token (see `graft_train::objective` for the
//! normalisation convention). SFT's summed token loss is `d_logp = −1` on every trained token
//! ([`Model::forward_backward`] with `grad_scale = 1`); an objective whose `d_logp` depends on the
//! log-probs (DPO) runs [`Model::forward_for_backward`], computes `d_logp` from the returned
//! log-probs, then [`Model::backward`].
//!
//! With activation checkpointing each layer keeps only its input and is recomputed during
//! backward; without, it keeps what backward needs (norm outputs are always recomputed from the
//! saved input and `rstd`, which is cheap and halves that part of the memory).

use crate::model::{DOWN, GATE, K, Layer, Model, O, Q, UP, V};
use graft_kernels::{AttentionShape, Backend, IGNORE_INDEX, Precision, segments_from_seq_ids};

/// A packed, padding-free micro-batch: several sequences concatenated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    /// Position of each token within its own sequence (restarts at 0).
    pub positions: Vec<u32>,
    /// Sequence id per token; sequences must be contiguous. Tokens never attend across ids.
    pub seq_ids: Vec<u32>,
    /// Next-token target per position, or −100 for no loss.
    pub targets: Vec<i32>,
}

impl Batch {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    /// Whether the batch has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Tokens that carry a loss.
    pub fn num_trained(&self) -> usize {
        self.targets
            .iter()
            .filter(|&&t| t != IGNORE_INDEX && t >= 0)
            .count()
    }
    /// Checks lengths, id ranges and that positions fit; returns a message naming the field.
    pub fn validate(&self, vocab: usize) -> Result<(), String> {
        let n = self.input_ids.len();
        for (name, len) in [
            ("positions", self.positions.len()),
            ("seq_ids", self.seq_ids.len()),
            ("targets", self.targets.len()),
        ] {
            if len != n {
                return Err(format!(
                    "batch field `{name}` has {len} entries, expected {n} (one per input id)"
                ));
            }
        }
        if let Some(&id) = self.input_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(format!("input id {id} is outside the vocabulary (size {vocab})"));
        }
        if let Some(&t) = self
            .targets
            .iter()
            .find(|&&t| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab))
        {
            return Err(format!(
                "target {t} is outside the vocabulary (size {vocab}) and is not -100"
            ));
        }
        Ok(())
    }
}

/// Options of a training forward/backward.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainOptions {
    pub precision: Precision,
    /// Keep only each layer's input; recompute the layer in backward.
    pub checkpointing: bool,
    /// Seed of this micro-batch's LoRA dropout masks (ignored when dropout is 0).
    pub dropout_seed: u64,
    /// LoRA dropout probability.
    pub lora_dropout: f32,
    /// Run the base weights alone, as if no adapter were attached (forward only: a preference
    /// objective's reference under LoRA costs no second copy of the model).
    pub without_adapters: bool,
    /// Divide the logits by this before the log-softmax (GRPO / RLOO: the sampling temperature,
    /// so the trainer's log-probs are those of the distribution the rollouts were drawn from).
    /// `None` or 1: the model's own logits.
    pub temperature: Option<f32>,
}

/// Result of a forward (and backward) pass.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// Σ −log p(target) over trained tokens (f64).
    pub loss_sum: f64,
    pub num_trained: usize,
    /// log p(target) per token, 0 where ignored.
    pub logprobs: Vec<f32>,
    /// Entropy of the predicted distribution per token (at the temperature), 0 where ignored.
    pub entropies: Vec<f32>,
    /// Trained tokens whose target is the most likely token.
    pub num_correct: usize,
}

/// Gradient buffers of one linear projection.
pub struct LinearGrad<B: Backend> {
    pub w: B::Buf,
    pub bias: Option<B::Buf>,
}

/// Gradient buffers of one LoRA module.
pub struct LoraGrad<B: Backend> {
    pub a: B::Buf,
    pub b: B::Buf,
}

/// Gradient buffers of one layer; `None` where the parameter is frozen.
pub struct LayerGrads<B: Backend> {
    pub attn_norm: Option<B::Buf>,
    pub mlp_norm: Option<B::Buf>,
    pub q_norm: Option<B::Buf>,
    pub k_norm: Option<B::Buf>,
    pub linears: [Option<LinearGrad<B>>; 7],
    pub lora: [Option<LoraGrad<B>>; 7],
}

/// Gradient buffers of the whole model. Frozen weights get none, so LoRA training allocates
/// gradient memory only for the adapters.
pub struct Grads<B: Backend> {
    pub embed: Option<B::Buf>,
    pub lm_head: Option<B::Buf>,
    pub final_norm: Option<B::Buf>,
    pub layers: Vec<LayerGrads<B>>,
    /// A reward model's score head (trained under LoRA too, as PEFT's `modules_to_save`).
    pub score: Option<B::Buf>,
}

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainMode {
    /// Every base weight.
    Full,
    /// Only the active LoRA adapters.
    Lora,
}

impl<B: Backend> Grads<B> {
    /// Sets every gradient to zero.
    pub fn zero(&mut self, b: &B) {
        self.for_each_mut(|_, g| b.fill_zero(g));
    }
}

/// Activations one layer keeps for its backward.
struct LayerActs<B: Backend> {
    x_in: B::Buf,
    rstd1: B::Buf,
    q_raw: Option<B::Buf>,
    k_raw: Option<B::Buf>,
    q_rstd: Option<B::Buf>,
    k_rstd: Option<B::Buf>,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
    h: B::Buf,
    rstd2: B::Buf,
    g: B::Buf,
    u: B::Buf,
    /// Per projection: `scale · A·dropout(x)`, `[t, r]`.
    xa: [Option<B::Buf>; 7],
}

/// A training forward waiting for its objective's `d_logp` (see [`Model::forward_for_backward`]):
/// the activations backward needs.
pub struct PendingBackward<B: Backend> {
    x: B::Buf,
    acts: Vec<LayerActs<B>>,
    xf: B::Buf,
    rstdf: B::Buf,
    opts: TrainOptions,
}

/// Per-call context shared by the layer functions.
struct Ctx<'a, B: Backend> {
    t: usize,
    pos: &'a B::Ids,
    segments: &'a [(usize, usize)],
    shape: AttentionShape,
    opts: TrainOptions,
}

impl<B: Backend> Model<B> {
    /// Allocates gradient buffers for `mode` (LoRA mode needs adapters attached first).
    pub fn new_grads(&self, mode: TrainMode) -> Grads<B> {
        let b = &self.backend;
        let full = mode == TrainMode::Full;
        let (h, v) = (self.spec.hidden_size, self.spec.vocab_size);
        let opt = |on: bool, n: usize| if on { Some(b.zeros(n)) } else { None };
        Grads {
            embed: opt(full, v * h),
            lm_head: opt(full && self.lm_head.is_some(), v * h),
            final_norm: opt(full, h),
            score: opt(self.score.is_some(), h),
            layers: self
                .layers
                .iter()
                .map(|layer| LayerGrads {
                    attn_norm: opt(full, h),
                    mlp_norm: opt(full, h),
                    q_norm: opt(full && layer.q_norm.is_some(), self.spec.head_dim),
                    k_norm: opt(full && layer.k_norm.is_some(), self.spec.head_dim),
                    linears: std::array::from_fn(|i| {
                        let lin = &layer.linears[i];
                        full.then(|| LinearGrad {
                            w: b.zeros(lin.out * lin.inp),
                            bias: lin.bias.as_ref().map(|_| b.zeros(lin.out)),
                        })
                    }),
                    lora: std::array::from_fn(|i| {
                        let lin = &layer.linears[i];
                        layer.lora[i]
                            .as_ref()
                            .filter(|_| mode == TrainMode::Lora)
                            .map(|m| LoraGrad {
                                a: b.zeros(m.r * lin.inp),
                                b: b.zeros(lin.out * m.r),
                            })
                    }),
                })
                .collect(),
        }
    }

    /// Forward only: per-token log-probs and summed loss (for eval, DPO reference models, GRPO).
    pub fn forward_logprobs(&self, batch: &Batch, precision: Precision) -> ForwardOutput {
        self.run(
            batch,
            TrainOptions {
                precision,
                ..Default::default()
            },
        )
    }

    /// Forward only with the given options (e.g. `without_adapters` for a reference pass).
    pub fn forward_logprobs_with(&self, batch: &Batch, opts: TrainOptions) -> ForwardOutput {
        self.run(batch, opts)
    }

    /// Forward and backward of the summed token loss: accumulates
    /// `grad_scale · ∂(Σ −log p(target))/∂θ` into `grads` (`d_logp = −grad_scale` per token).
    pub fn forward_backward(
        &self,
        batch: &Batch,
        grads: &mut Grads<B>,
        grad_scale: f32,
        opts: TrainOptions,
    ) -> ForwardOutput {
        let d_logp = vec![-grad_scale; batch.len()];
        self.forward_backward_weighted(batch, grads, &d_logp, opts)
    }

    /// Forward and backward of an objective whose per-token derivative `d_logp` is known before
    /// the forward: accumulates `Σ_t d_logp[t] · ∂ log p(target_t)/∂θ` into `grads` in one pass.
    pub fn forward_backward_weighted(
        &self,
        batch: &Batch,
        grads: &mut Grads<B>,
        d_logp: &[f32],
        opts: TrainOptions,
    ) -> ForwardOutput {
        let pending = self.forward_trunk(batch, opts);
        self.head_and_backward(batch, pending, grads, d_logp)
    }

    /// The first half of a training step whose `d_logp` depends on the log-probs: forward with
    /// every activation backward needs kept, and the per-token log-probs.
    pub fn forward_for_backward(
        &self,
        batch: &Batch,
        opts: TrainOptions,
    ) -> (ForwardOutput, PendingBackward<B>) {
        let pending = self.forward_trunk(batch, opts);
        let scaled;
        let xf = match opts.temperature.filter(|&t| t != 1.0) {
            Some(t) => {
                let mut x = self.backend.zeros(self.backend.len(&pending.xf));
                self.backend.axpy(&mut x, 1.0 / t, &pending.xf);
                scaled = x;
                &scaled
            }
            None => &pending.xf,
        };
        let ce = self
            .backend
            .lm_head_cross_entropy(xf, self.head(), &batch.targets, None, opts.precision);
        let out = ForwardOutput {
            loss_sum: ce.loss_sum,
            num_trained: ce.num_trained,
            logprobs: ce.logprobs,
            entropies: ce.entropies,
            num_correct: ce.num_correct,
        };
        (out, pending)
    }

    /// The second half: accumulates `Σ_t d_logp[t] · ∂ log p(target_t)/∂θ` into `grads` (the LM
    /// head's forward is recomputed chunk by chunk; the rest comes from `pending`).
    pub fn backward(&self, batch: &Batch, pending: PendingBackward<B>, grads: &mut Grads<B>, d_logp: &[f32]) {
        self.head_and_backward(batch, pending, grads, d_logp);
    }

    /// Full logits `[tokens, vocab]` of a batch (small models and tests only).
    pub fn logits(&self, batch: &Batch, precision: Precision) -> Vec<f32> {
        let b = &self.backend;
        let t = batch.len();
        let (x, _) = self.trunk_forward(
            batch,
            false,
            TrainOptions {
                precision,
                ..Default::default()
            },
        );
        let (xf, _) = self.final_norm_forward(&x);
        let mut logits = b.zeros(t * self.spec.vocab_size);
        b.linear_forward(&mut logits, &xf, self.head(), t, false, precision);
        b.download(&logits)
    }

    fn trunk_forward(&self, batch: &Batch, keep: bool, opts: TrainOptions) -> (B::Buf, Vec<LayerActs<B>>) {
        let b = &self.backend;
        let t = batch.len();
        let ids = b.upload_ids(&batch.input_ids);
        let pos = b.upload_ids(&batch.positions);
        let segments = segments_from_seq_ids(&batch.seq_ids);
        let ctx = Ctx {
            t,
            pos: &pos,
            segments: &segments,
            shape: self.attention_shape(opts.precision),
            opts,
        };
        let mut x = b.zeros(t * self.spec.hidden_size);
        b.embedding_forward(&mut x, &ids, &self.embed, self.spec.hidden_size);
        let mut acts = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let (out, a) = self.layer_forward(l, layer, x, &ctx, keep && !opts.checkpointing);
            if keep {
                acts.push(a);
            }
            x = out;
        }
        (x, acts)
    }

    fn run(&self, batch: &Batch, opts: TrainOptions) -> ForwardOutput {
        self.check_positions(batch);
        let (x, _) = self.trunk_forward(batch, false, opts);
        let (mut xf, _) = self.final_norm_forward(&x);
        self.apply_temperature(&mut xf, opts);
        let ce = self
            .backend
            .lm_head_cross_entropy(&xf, self.head(), &batch.targets, None, opts.precision);
        ForwardOutput {
            loss_sum: ce.loss_sum,
            num_trained: ce.num_trained,
            logprobs: ce.logprobs,
            entropies: ce.entropies,
            num_correct: ce.num_correct,
        }
    }

    /// Scales the head's input by `1 / opts.temperature` (logits `(x/T) Wᵀ = (x Wᵀ)/T`).
    fn apply_temperature(&self, x: &mut B::Buf, opts: TrainOptions) {
        if let Some(t) = opts.temperature.filter(|&t| t != 1.0 && t > 0.0) {
            self.backend.scale(x, 1.0 / t);
        }
    }

    /// The final RMSNorm of the trunk's output `x`: the normed states and their `rstd`.
    fn final_norm_forward(&self, x: &B::Buf) -> (B::Buf, B::Buf) {
        let b = &self.backend;
        let hd = self.spec.hidden_size;
        let t = b.len(x) / hd;
        let mut xf = b.zeros(t * hd);
        let mut rstdf = b.zeros(t);
        b.rmsnorm_forward(
            &mut xf,
            &mut rstdf,
            x,
            &self.final_norm,
            hd,
            self.spec.rms_norm_eps,
        );
        (xf, rstdf)
    }

    fn check_positions(&self, batch: &Batch) {
        let max_pos = batch.positions.iter().copied().max().unwrap_or(0) as usize;
        assert!(
            max_pos < self.spec.max_position_embeddings.max(1),
            "position {max_pos} beyond the RoPE table; call ensure_positions"
        );
    }

    /// Trunk forward keeping what backward needs, and the final norm.
    fn forward_trunk(&self, batch: &Batch, opts: TrainOptions) -> PendingBackward<B> {
        self.check_positions(batch);
        let (x, acts) = self.trunk_forward(batch, true, opts);
        let (xf, rstdf) = self.final_norm_forward(&x);
        PendingBackward {
            x,
            acts,
            xf,
            rstdf,
            opts,
        }
    }

    /// The LM head with gradients (fused with its forward), then the trunk's backward.
    fn head_and_backward(
        &self,
        batch: &Batch,
        pending: PendingBackward<B>,
        grads: &mut Grads<B>,
        d_logp: &[f32],
    ) -> ForwardOutput {
        let b = &self.backend;
        let (t, hd) = (batch.len(), self.spec.hidden_size);
        let PendingBackward {
            x,
            acts,
            xf,
            rstdf,
            opts,
        } = pending;
        let mut dxf = b.zeros(t * hd);
        let d_head = if self.lm_head.is_some() {
            grads.lm_head.as_mut()
        } else {
            grads.embed.as_mut()
        };
        let mut xf = xf;
        self.apply_temperature(&mut xf, opts);
        let ce = b.lm_head_cross_entropy(
            &xf,
            self.head(),
            &batch.targets,
            Some((d_logp, &mut dxf, d_head)),
            opts.precision,
        );
        drop(xf);
        // logits = (xf / T) Wᵀ, so ∂/∂xf carries the same 1/T.
        self.apply_temperature(&mut dxf, opts);
        self.trunk_backward(batch, x, acts, rstdf, dxf, grads, opts);
        ForwardOutput {
            loss_sum: ce.loss_sum,
            num_trained: ce.num_trained,
            logprobs: ce.logprobs,
            entropies: ce.entropies,
            num_correct: ce.num_correct,
        }
    }

    /// Backward from the gradient of the final-normed hidden states `dxf` down through the
    /// final norm and every layer (and the embedding when it is trained).
    #[allow(clippy::too_many_arguments)]
    fn trunk_backward(
        &self,
        batch: &Batch,
        x: B::Buf,
        mut acts: Vec<LayerActs<B>>,
        rstdf: B::Buf,
        dxf: B::Buf,
        grads: &mut Grads<B>,
        opts: TrainOptions,
    ) {
        let b = &self.backend;
        let (t, hd) = (batch.len(), self.spec.hidden_size);
        let mut dx = b.zeros(t * hd);
        b.rmsnorm_backward(
            &mut dx,
            grads.final_norm.as_mut(),
            &dxf,
            &x,
            &self.final_norm,
            &rstdf,
            hd,
            false,
        );
        drop(dxf);

        let pos = b.upload_ids(&batch.positions);
        let segments = segments_from_seq_ids(&batch.seq_ids);
        let ctx = Ctx {
            t,
            pos: &pos,
            segments: &segments,
            shape: self.attention_shape(opts.precision),
            opts,
        };
        let need_input_grad_at_bottom = grads.embed.is_some();
        for l in (0..self.layers.len()).rev() {
            let layer = &self.layers[l];
            let a = acts.pop().expect("one activation record per layer");
            let a = if opts.checkpointing {
                self.layer_forward(l, layer, a.x_in, &ctx, true).1
            } else {
                a
            };
            let want_dx = l > 0 || need_input_grad_at_bottom;
            dx = self.layer_backward(l, layer, &mut grads.layers[l], a, dx, &ctx, want_dx);
        }
        if let Some(de) = grads.embed.as_mut() {
            let ids = b.upload_ids(&batch.input_ids);
            b.embedding_backward(de, &dx, &ids, hd);
        }
    }

    /// A reward model's forward: one score per sequence, read through the `score` head from the
    /// final hidden state at token `positions[s]` of the batch (HF's sequence classifiers read
    /// the last non-padding token). Panics if the model has no score head.
    pub fn forward_scores(&self, batch: &Batch, positions: &[usize], opts: TrainOptions) -> Vec<f32> {
        self.check_positions(batch);
        let (x, _) = self.trunk_forward(batch, false, opts);
        let (xf, _) = self.final_norm_forward(&x);
        self.read_scores(&self.backend.download(&xf), positions)
    }

    /// The first half of a reward-model training step: the scores at `positions` (as
    /// [`Self::forward_scores`]) and the activations backward needs.
    pub fn forward_for_scores(
        &self,
        batch: &Batch,
        positions: &[usize],
        opts: TrainOptions,
    ) -> (Vec<f32>, PendingBackward<B>) {
        let pending = self.forward_trunk(batch, opts);
        let scores = self.read_scores(&self.backend.download(&pending.xf), positions);
        (scores, pending)
    }

    /// The second half: accumulates `Σ_s d_scores[s] · ∂ score_s/∂θ` into `grads` (the score
    /// head's gradient included).
    pub fn backward_scores(
        &self,
        batch: &Batch,
        pending: PendingBackward<B>,
        grads: &mut Grads<B>,
        positions: &[usize],
        d_scores: &[f32],
    ) {
        let b = &self.backend;
        let hd = self.spec.hidden_size;
        let w = b.download(self.score.as_ref().expect("a reward model has a score head"));
        let xf = b.download(&pending.xf);
        let mut dxf = vec![0f32; batch.len() * hd];
        let mut dw = vec![0f32; hd];
        for (&p, &d) in positions.iter().zip(d_scores) {
            for j in 0..hd {
                dxf[p * hd + j] += d * w[j];
                dw[j] += d * xf[p * hd + j];
            }
        }
        if let Some(g) = grads.score.as_mut() {
            b.axpy(g, 1.0, &b.upload(&dw));
        }
        let PendingBackward {
            x, acts, rstdf, opts, ..
        } = pending;
        self.trunk_backward(batch, x, acts, rstdf, b.upload(&dxf), grads, opts);
    }

    fn read_scores(&self, xf: &[f32], positions: &[usize]) -> Vec<f32> {
        let hd = self.spec.hidden_size;
        let w = self
            .backend
            .download(self.score.as_ref().expect("a reward model has a score head"));
        positions
            .iter()
            .map(|&p| {
                let row = &xf[p * hd..(p + 1) * hd];
                row.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum::<f64>() as f32
            })
            .collect()
    }

    /// `y = x Wᵀ + b + scale · B (A dropout(x))`; returns `scale · A dropout(x)` for backward.
    /// The base and up-projection products run as one ([`Backend::linear_forward_lora`]).
    fn linear_fwd(
        &self,
        layer: &Layer<B>,
        l: usize,
        i: usize,
        x: &B::Buf,
        ctx: &Ctx<'_, B>,
    ) -> (B::Buf, Option<B::Buf>) {
        let b = &self.backend;
        let lin = &layer.linears[i];
        let t = ctx.t;
        let mut y = b.zeros(t * lin.out);
        let xa = layer.lora[i]
            .as_ref()
            .filter(|_| !ctx.opts.without_adapters)
            .map(|m| {
                let mut xa = b.zeros(t * m.r);
                if ctx.opts.lora_dropout > 0.0 {
                    let mut xd = b.zeros(t * lin.inp);
                    b.dropout(
                        &mut xd,
                        x,
                        ctx.opts.lora_dropout,
                        dropout_seed(ctx.opts.dropout_seed, l, i),
                    );
                    b.linear_forward(&mut xa, &xd, &m.a, t, false, ctx.opts.precision);
                } else {
                    b.linear_forward(&mut xa, x, &m.a, t, false, ctx.opts.precision);
                }
                b.scale(&mut xa, m.scale);
                b.linear_forward_lora(&mut y, x, &lin.w, &xa, &m.b, t, false, ctx.opts.precision);
                xa
            });
        if xa.is_none() {
            b.linear_forward(&mut y, x, &lin.w, t, false, ctx.opts.precision);
        }
        if let Some(bias) = &lin.bias {
            b.add_bias(&mut y, bias);
        }
        (y, xa)
    }

    /// Backward of [`Self::linear_fwd`]: accumulates weight/bias/LoRA grads; returns or
    /// accumulates `dx` into `dx_acc`.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        layer: &Layer<B>,
        lg: &mut crate::train::LayerGrads<B>,
        l: usize,
        i: usize,
        dy: &B::Buf,
        x: &B::Buf,
        xa: Option<&B::Buf>,
        dx_acc: Option<&mut B::Buf>,
        dx_accumulate: bool,
        ctx: &Ctx<'_, B>,
    ) {
        let b = &self.backend;
        let lin = &layer.linears[i];
        let t = ctx.t;
        let p = ctx.opts.precision;
        if let Some(g) = lg.linears[i].as_mut() {
            b.linear_backward_weight(&mut g.w, dy, x, t, lin.out, lin.inp, true, p);
            if let Some(gb) = g.bias.as_mut() {
                b.bias_backward(gb, dy);
            }
        }
        let lora = layer.lora[i].as_ref();
        let Some(dx) = dx_acc else {
            if let (Some(m), Some(xa)) = (lora, xa) {
                self.lora_bwd(m, lg.lora[i].as_mut(), l, i, dy, x, xa, None, ctx);
            }
            return;
        };
        match (lora, xa) {
            // Without dropout, the down-projection's input gradient joins the base product.
            (Some(m), Some(xa)) if ctx.opts.lora_dropout == 0.0 => {
                let dxa = self.lora_bwd(m, lg.lora[i].as_mut(), l, i, dy, x, xa, None, ctx);
                b.linear_backward_input_lora(dx, dy, &lin.w, &dxa, &m.a, t, dx_accumulate, p);
            }
            (Some(m), Some(xa)) => {
                b.linear_backward_input(dx, dy, &lin.w, t, dx_accumulate, p);
                self.lora_bwd(m, lg.lora[i].as_mut(), l, i, dy, x, xa, Some(dx), ctx);
            }
            _ => b.linear_backward_input(dx, dy, &lin.w, t, dx_accumulate, p),
        }
    }

    /// LoRA's backward: accumulates `g` (when trained) and, given `dx`, adds the input gradient
    /// through the adapter to it; returns `dxa`, the gradient at the down-projection's output.
    #[allow(clippy::too_many_arguments)]
    fn lora_bwd(
        &self,
        m: &crate::lora::LoraLinear<B>,
        g: Option<&mut LoraGrad<B>>,
        l: usize,
        i: usize,
        dy: &B::Buf,
        x: &B::Buf,
        xa: &B::Buf,
        dx: Option<&mut B::Buf>,
        ctx: &Ctx<'_, B>,
    ) -> B::Buf {
        let b = &self.backend;
        let lin_inp = b.len(x) / ctx.t;
        let lin_out = b.len(dy) / ctx.t;
        let t = ctx.t;
        // dxa = scale · dy · B   [t, r]
        let mut dxa = b.zeros(t * m.r);
        b.linear_backward_input(&mut dxa, dy, &m.b, t, false, ctx.opts.precision);
        b.scale(&mut dxa, m.scale);
        let xd = if ctx.opts.lora_dropout > 0.0 {
            let mut xd = b.zeros(t * lin_inp);
            b.dropout(
                &mut xd,
                x,
                ctx.opts.lora_dropout,
                dropout_seed(ctx.opts.dropout_seed, l, i),
            );
            Some(xd)
        } else {
            None
        };
        if let Some(g) = g {
            // dB += dyᵀ · (scale · xa)
            b.linear_backward_weight(&mut g.b, dy, xa, t, lin_out, m.r, true, ctx.opts.precision);
            // dA += dxaᵀ · dropout(x)
            b.linear_backward_weight(
                &mut g.a,
                &dxa,
                xd.as_ref().unwrap_or(x),
                t,
                m.r,
                lin_inp,
                true,
                ctx.opts.precision,
            );
        }
        if let Some(dx) = dx {
            if ctx.opts.lora_dropout > 0.0 {
                let mut dxd = b.zeros(t * lin_inp);
                b.linear_backward_input(&mut dxd, &dxa, &m.a, t, false, ctx.opts.precision);
                let mut masked = b.zeros(t * lin_inp);
                b.dropout(
                    &mut masked,
                    &dxd,
                    ctx.opts.lora_dropout,
                    dropout_seed(ctx.opts.dropout_seed, l, i),
                );
                b.axpy(dx, 1.0, &masked);
            } else {
                b.linear_backward_input(dx, &dxa, &m.a, t, true, ctx.opts.precision);
            }
        }
        dxa
    }

    fn layer_forward(
        &self,
        l: usize,
        layer: &Layer<B>,
        x_in: B::Buf,
        ctx: &Ctx<'_, B>,
        keep: bool,
    ) -> (B::Buf, LayerActs<B>) {
        let b = &self.backend;
        let s = &self.spec;
        let (t, hd, eps) = (ctx.t, s.hidden_size, s.rms_norm_eps);
        let pos = ctx.pos;
        let mut xn = b.zeros(t * hd);
        let mut rstd1 = b.zeros(t);
        b.rmsnorm_forward(&mut xn, &mut rstd1, &x_in, &layer.attn_norm, hd, eps);
        let (mut q, xa_q) = self.linear_fwd(layer, l, Q, &xn, ctx);
        let (mut k, xa_k) = self.linear_fwd(layer, l, K, &xn, ctx);
        let (v, xa_v) = self.linear_fwd(layer, l, V, &xn, ctx);
        drop(xn);
        let (mut q_raw, mut k_raw, mut q_rstd, mut k_rstd) = (None, None, None, None);
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let mut qo = b.zeros(t * s.q_dim());
            let mut qr = b.zeros(t * s.num_heads);
            b.rmsnorm_forward(&mut qo, &mut qr, &q, qn, s.head_dim, eps);
            let mut ko = b.zeros(t * s.kv_dim());
            let mut kr = b.zeros(t * s.num_kv_heads);
            b.rmsnorm_forward(&mut ko, &mut kr, &k, kn, s.head_dim, eps);
            q_raw = Some(std::mem::replace(&mut q, qo));
            k_raw = Some(std::mem::replace(&mut k, ko));
            q_rstd = Some(qr);
            k_rstd = Some(kr);
        }
        b.rope_forward(&mut q, pos, s.num_heads, &self.rope);
        b.rope_forward(&mut k, pos, s.num_kv_heads, &self.rope);
        let mut attn = b.zeros(t * s.q_dim());
        let mut lse = b.zeros(t * s.num_heads);
        b.attention_forward(&mut attn, &mut lse, &q, &k, &v, ctx.segments, &ctx.shape);
        let (o, xa_o) = self.linear_fwd(layer, l, O, &attn, ctx);
        let mut h = b.zeros(t * hd);
        b.add(&mut h, &x_in, &o);
        drop(o);
        let mut hn = b.zeros(t * hd);
        let mut rstd2 = b.zeros(t);
        b.rmsnorm_forward(&mut hn, &mut rstd2, &h, &layer.mlp_norm, hd, eps);
        let (g, xa_g) = self.linear_fwd(layer, l, GATE, &hn, ctx);
        let (u, xa_u) = self.linear_fwd(layer, l, UP, &hn, ctx);
        drop(hn);
        let mut act = b.zeros(t * s.intermediate_size);
        b.swiglu_forward(&mut act, &g, &u);
        let (d, xa_d) = self.linear_fwd(layer, l, DOWN, &act, ctx);
        drop(act);
        let mut out = d;
        b.axpy(&mut out, 1.0, &h);
        let acts = if keep {
            LayerActs {
                x_in,
                rstd1,
                q_raw,
                k_raw,
                q_rstd,
                k_rstd,
                q,
                k,
                v,
                attn,
                lse,
                h,
                rstd2,
                g,
                u,
                xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
            }
        } else {
            // Only the layer input survives (activation checkpointing / inference).
            let e = || b.zeros(0);
            LayerActs {
                x_in,
                rstd1: e(),
                q_raw: None,
                k_raw: None,
                q_rstd: None,
                k_rstd: None,
                q: e(),
                k: e(),
                v: e(),
                attn: e(),
                lse: e(),
                h: e(),
                rstd2: e(),
                g: e(),
                u: e(),
                xa: Default::default(),
            }
        };
        (out, acts)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        layer: &Layer<B>,
        lg: &mut LayerGrads<B>,
        a: LayerActs<B>,
        d_out: B::Buf,
        ctx: &Ctx<'_, B>,
        want_dx: bool,
    ) -> B::Buf {
        let b = &self.backend;
        let s = &self.spec;
        let (t, hd) = (ctx.t, s.hidden_size);
        let pos = ctx.pos;
        let [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d] = a.xa;

        // MLP: out = h + down(silu(gate(hn)) · up(hn))
        let mut act = b.zeros(t * s.intermediate_size);
        b.swiglu_forward(&mut act, &a.g, &a.u);
        let mut dact = b.zeros(t * s.intermediate_size);
        self.linear_bwd(
            layer,
            lg,
            l,
            DOWN,
            &d_out,
            &act,
            xa_d.as_ref(),
            Some(&mut dact),
            false,
            ctx,
        );
        drop(act);
        let mut dg = b.zeros(t * s.intermediate_size);
        let mut du = b.zeros(t * s.intermediate_size);
        b.swiglu_backward(&mut dg, &mut du, &dact, &a.g, &a.u);
        drop(dact);
        let mut hn = b.zeros(t * hd);
        b.rmsnorm_apply(&mut hn, &a.rstd2, &a.h, &layer.mlp_norm, hd);
        let mut dhn = b.zeros(t * hd);
        self.linear_bwd(
            layer,
            lg,
            l,
            GATE,
            &dg,
            &hn,
            xa_g.as_ref(),
            Some(&mut dhn),
            false,
            ctx,
        );
        self.linear_bwd(
            layer,
            lg,
            l,
            UP,
            &du,
            &hn,
            xa_u.as_ref(),
            Some(&mut dhn),
            true,
            ctx,
        );
        drop((dg, du, hn));
        let mut dh = d_out;
        b.rmsnorm_backward(
            &mut dh,
            lg.mlp_norm.as_mut(),
            &dhn,
            &a.h,
            &layer.mlp_norm,
            &a.rstd2,
            hd,
            true,
        );
        drop(dhn);

        // Attention: h = x_in + o_proj(attn(q, k, v))
        let mut dattn = b.zeros(t * s.q_dim());
        self.linear_bwd(
            layer,
            lg,
            l,
            O,
            &dh,
            &a.attn,
            xa_o.as_ref(),
            Some(&mut dattn),
            false,
            ctx,
        );
        let (mut dq, mut dk, mut dv) = (
            b.zeros(t * s.q_dim()),
            b.zeros(t * s.kv_dim()),
            b.zeros(t * s.kv_dim()),
        );
        b.attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &dattn,
            &a.attn,
            &a.lse,
            &a.q,
            &a.k,
            &a.v,
            ctx.segments,
            &ctx.shape,
        );
        drop(dattn);
        b.rope_backward(&mut dq, pos, s.num_heads, &self.rope);
        b.rope_backward(&mut dk, pos, s.num_kv_heads, &self.rope);
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let (q_raw, k_raw) = (
                a.q_raw.as_ref().expect("q_raw kept"),
                a.k_raw.as_ref().expect("k_raw kept"),
            );
            let mut dq_raw = b.zeros(t * s.q_dim());
            b.rmsnorm_backward(
                &mut dq_raw,
                lg.q_norm.as_mut(),
                &dq,
                q_raw,
                qn,
                a.q_rstd.as_ref().expect("kept"),
                s.head_dim,
                false,
            );
            let mut dk_raw = b.zeros(t * s.kv_dim());
            b.rmsnorm_backward(
                &mut dk_raw,
                lg.k_norm.as_mut(),
                &dk,
                k_raw,
                kn,
                a.k_rstd.as_ref().expect("kept"),
                s.head_dim,
                false,
            );
            dq = dq_raw;
            dk = dk_raw;
        }
        let mut xn = b.zeros(t * hd);
        b.rmsnorm_apply(&mut xn, &a.rstd1, &a.x_in, &layer.attn_norm, hd);
        let mut dxn = b.zeros(t * hd);
        let full_needed = want_dx || lg.attn_norm.is_some();
        let target = if full_needed { Some(&mut dxn) } else { None };
        match target {
            Some(dxn) => {
                self.linear_bwd(layer, lg, l, Q, &dq, &xn, xa_q.as_ref(), Some(dxn), false, ctx);
                self.linear_bwd(layer, lg, l, K, &dk, &xn, xa_k.as_ref(), Some(dxn), true, ctx);
                self.linear_bwd(layer, lg, l, V, &dv, &xn, xa_v.as_ref(), Some(dxn), true, ctx);
            }
            None => {
                self.linear_bwd(layer, lg, l, Q, &dq, &xn, xa_q.as_ref(), None, false, ctx);
                self.linear_bwd(layer, lg, l, K, &dk, &xn, xa_k.as_ref(), None, false, ctx);
                self.linear_bwd(layer, lg, l, V, &dv, &xn, xa_v.as_ref(), None, false, ctx);
                return dh;
            }
        }
        drop((dq, dk, dv, xn));
        b.rmsnorm_backward(
            &mut dh,
            lg.attn_norm.as_mut(),
            &dxn,
            &a.x_in,
            &layer.attn_norm,
            &a.rstd1,
            hd,
            true,
        );
        dh
    }
}

/// Seed of the dropout mask of projection `i` in layer `l`.
fn dropout_seed(step_seed: u64, l: usize, i: usize) -> u64 {
    step_seed ^ ((l as u64) << 32 | i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}
