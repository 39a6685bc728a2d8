//! The device seam: the op set the model code is written against.
//!
//! Buffers are opaque per device ([`Backend::Buf`] for f32 activations/parameters,
//! [`Backend::Ids`] for token ids, positions and targets, [`Backend::Weight`] for matrices in
//! their compute storage). The CPU backend ([`Cpu`]) uses host vectors; a CUDA backend would use
//! device allocations and NVRTC-compiled kernels behind the same methods, and the decoder in
//! `graft-model` would not change.

use crate::cpu::attention::{self, KvRows};
use crate::cpu::cross_entropy::{self, CrossEntropyGrads};
use crate::cpu::matmul::{self, Weight};
use crate::cpu::rope::RopeTable;
use crate::cpu::{elementwise, norm, optim, rope};
use crate::quant::QuantTensor;
use crate::types::{AdamWScalars, AdamWTensor, AttentionShape, CrossEntropyOutput, Precision};

/// Gradient request of [`Backend::lm_head_cross_entropy`]: `(d_logp, d_hidden, d_head)` — the
/// objective's derivative w.r.t. each token's target log-prob (host slice, one per token), the
/// hidden-state gradient (overwritten) and, when the head is trained, its gradient (accumulated).
pub type HeadGrads<'a, Buf> = (&'a [f32], &'a mut Buf, Option<&'a mut Buf>);

/// The numeric op set of the decoder, forward and backward.
///
/// Shapes are passed explicitly; matrices are row-major. "Accumulate" means `+=`, otherwise the
/// output is overwritten.
#[allow(clippy::too_many_arguments)]
pub trait Backend: Send + Sync {
    /// An f32 buffer on the device.
    type Buf: Send + Sync;
    /// A u32 buffer on the device (token ids, positions).
    type Ids: Send + Sync;
    /// A weight matrix `[out, in]` in its compute storage (f32, bf16, or a frozen one in ggml
    /// blocks).
    type Weight: Send + Sync;
    /// Precomputed RoPE angles.
    type Rope: Send + Sync;
    /// A borrowed f32 tensor the optimizer ops read and update in place (the CPU's is `[f32]`, a
    /// view of a [`Backend::Buf`]; a device backend may use its `Buf` itself).
    type View: ?Sized + Send + Sync;
    /// One layer's cached keys or values of one sequence, `[positions, kv_dim]`, in f32 or in
    /// f16 (see [`Backend::kv_zeros`]).
    type KvBuf: Send + Sync;

    /// A zero-filled buffer of `n` floats.
    fn zeros(&self, n: usize) -> Self::Buf;
    /// Copies host data to the device.
    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// Copies device data to the host.
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    /// Number of floats in `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Copies ids to the device.
    fn upload_ids(&self, ids: &[u32]) -> Self::Ids;
    /// Sets every element to zero.
    fn fill_zero(&self, buf: &mut Self::Buf);
    /// `dst = src`.
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf);

    /// Makes a weight from host f32 data, stored as bf16 when `bf16` is set.
    fn weight(&self, data: &[f32], rows: usize, cols: usize, bf16: bool) -> Self::Weight;
    /// Makes a frozen weight from ggml blocks (a quantized GGUF base), kept in its blocks: the
    /// matrix products read it as it is. It cannot be updated ([`Backend::weight_update`]).
    fn weight_quantized(&self, q: QuantTensor) -> Self::Weight;
    /// Copies a weight back to host f32.
    fn weight_to_host(&self, w: &Self::Weight) -> Vec<f32>;
    /// Replaces a weight's values (after an optimizer step), keeping its storage type (a
    /// block-quantized one becomes bf16).
    fn weight_update(&self, w: &mut Self::Weight, data: &Self::Buf);
    /// Bytes a weight occupies.
    fn weight_bytes(&self, w: &Self::Weight) -> usize;
    /// Runs `f` — a batch of ops, e.g. one decode step — on the backend's own compute threads.
    /// The CPU runs it on a worker of its thread pool, so each op's parallel part is shared with
    /// the other workers directly instead of being handed in from outside and waited for (which
    /// costs a thread wake-up per op: a large share of a decode step of a small model).
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }
    /// Lays out a frozen weight for inference (forward products only) where the backend has a
    /// faster layout for it; its values do not change. The default keeps it as it is.
    fn weight_pack_for_inference(&self, w: &mut Self::Weight) {
        let _ = w;
    }

    /// `y[t×out] (+)= x · wᵀ`.
    fn linear_forward(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Weight,
        t: usize,
        acc: bool,
        p: Precision,
    );
    /// `y[t×out] = x · wᵀ` for rows that come in consecutive `groups` (one per sequence of a
    /// generation step; they sum to `t`), each row computed as its group alone would be, where
    /// the backend's kernel choice depends on the row count: a request's output then does not
    /// depend on the requests batched with it. The default multiplies all rows at once.
    fn linear_forward_grouped(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Weight,
        groups: &[usize],
        p: Precision,
    ) {
        let t = groups.iter().sum();
        self.linear_forward(y, x, w, t, false, p)
    }
    /// `y[t×out] (+)= x · wᵀ + xa · bᵀ`: a linear layer plus its LoRA up-projection (`xa`
    /// `[t×r]` the scaled down-projection, `b` `[out×r]`) in training. A backend may fuse the two
    /// into one product (the CPU concatenates k), so that `y` is not read back for the side
    /// product. The default runs them one after the other.
    fn linear_forward_lora(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Weight,
        xa: &Self::Buf,
        b: &Self::Weight,
        t: usize,
        acc: bool,
        p: Precision,
    ) {
        self.linear_forward(y, x, w, t, acc, p);
        self.linear_forward(y, xa, b, t, true, p);
    }
    /// `y[t×out] += scale · (x · aᵀ) · bᵀ`: a LoRA adapter's side product at inference (`a`
    /// `[r, in]`, `b` `[out, r]`), each row computed on its own, so that a row's result does not
    /// depend on the rows batched with it (the generation core batches independent requests).
    fn lora_forward_rows(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        a: &Self::Weight,
        b: &Self::Weight,
        scale: f32,
        t: usize,
    );
    /// [`Backend::lora_forward_rows`] for several adapters at once, each on its own rows of `y`
    /// and `x` (`groups` in row order, disjoint; `x` is `[t×inp]`, `y` `[t×out]`): a decode
    /// step whose sequences carry different adapters. Each row gets the bits of a call for its
    /// group alone; the default makes those calls one after another.
    fn lora_forward_rows_batch(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        groups: &[LoraRows<'_, Self::Weight>],
        inp: usize,
        out: usize,
        t: usize,
    ) {
        for g in groups {
            if g.rows == t {
                self.lora_forward_rows(y, x, g.a, g.b, g.scale, t);
                continue;
            }
            let mut xs = self.zeros(g.rows * inp);
            self.copy_rows(&mut xs, 0, x, g.row0, g.rows, inp);
            let mut ys = self.zeros(g.rows * out);
            self.copy_rows(&mut ys, 0, y, g.row0, g.rows, out);
            self.lora_forward_rows(&mut ys, &xs, g.a, g.b, g.scale, g.rows);
            self.copy_rows(y, g.row0, &ys, 0, g.rows, out);
        }
    }
    /// `dx[t×in] (+)= dy · w`.
    fn linear_backward_input(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        w: &Self::Weight,
        t: usize,
        acc: bool,
        p: Precision,
    );
    /// `dx[t×in] (+)= dy · w + dxa · a`: a linear layer's input gradient plus its LoRA
    /// down-projection's (`a` `[r×in]`, `dxa` `[t×r]` the gradient at its output), fused where
    /// the backend can (see [`Backend::linear_forward_lora`]).
    fn linear_backward_input_lora(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        w: &Self::Weight,
        dxa: &Self::Buf,
        a: &Self::Weight,
        t: usize,
        acc: bool,
        p: Precision,
    ) {
        self.linear_backward_input(dx, dy, w, t, acc, p);
        self.linear_backward_input(dx, dxa, a, t, true, p);
    }
    /// `dw[out×in] (+)= dyᵀ · x`.
    fn linear_backward_weight(
        &self,
        dw: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        t: usize,
        out: usize,
        inp: usize,
        acc: bool,
        p: Precision,
    );
    /// `y += bias` per row.
    fn add_bias(&self, y: &mut Self::Buf, bias: &Self::Buf);
    /// `db += Σ_rows dy`.
    fn bias_backward(&self, db: &mut Self::Buf, dy: &Self::Buf);
    /// `y += alpha · x`.
    fn axpy(&self, y: &mut Self::Buf, alpha: f32, x: &Self::Buf);
    /// `y = a + b`.
    fn add(&self, y: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf);
    /// Multiplies every element by `s` (LoRA dropout keeps its own mask op).
    fn scale(&self, y: &mut Self::Buf, s: f32);
    /// `y = x ⊙ mask` where `mask[i] = keep(i) / (1 − p)`, the keep decisions coming from a
    /// counter-based hash of `(seed, i)` ([`crate::rng::dropout_keep_at`]) so backward regenerates
    /// the same mask.
    fn dropout(&self, y: &mut Self::Buf, x: &Self::Buf, p: f32, seed: u64);

    /// RMSNorm rows of width `dim`; stores `rstd`.
    fn rmsnorm_forward(
        &self,
        y: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        eps: f32,
    );
    /// Recomputes RMSNorm output from a saved `rstd`.
    fn rmsnorm_apply(&self, y: &mut Self::Buf, rstd: &Self::Buf, x: &Self::Buf, w: &Self::Buf, dim: usize);
    /// RMSNorm backward; `dw` accumulated when given.
    fn rmsnorm_backward(
        &self,
        dx: &mut Self::Buf,
        dw: Option<&mut Self::Buf>,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        dim: usize,
        acc: bool,
    );

    /// RoPE table for `inv_freq` up to `max_positions`.
    fn rope_table(&self, inv_freq: &[f32], max_positions: usize) -> Self::Rope;
    /// Rotates `[rows, n_heads, head_dim]` in place.
    fn rope_forward(&self, x: &mut Self::Buf, positions: &Self::Ids, n_heads: usize, table: &Self::Rope);
    /// RoPE backward in place.
    fn rope_backward(&self, dx: &mut Self::Buf, positions: &Self::Ids, n_heads: usize, table: &Self::Rope);

    /// Isolated causal attention over packed segments.
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        segments: &[(usize, usize)],
        shape: &AttentionShape,
    );
    /// Attention backward (outputs overwritten).
    fn attention_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        segments: &[(usize, usize)],
        shape: &AttentionShape,
    );

    /// A zero-filled KV-cache buffer of `n` values: f16 where `half` (the fast-mode cache, as
    /// llama.cpp's default: half the bytes each decode step reads), else f32.
    fn kv_zeros(&self, n: usize, half: bool) -> Self::KvBuf;
    /// Writes rows `src_row..src_row+n` of `src` (width `width`) at row `dst_row` of the cache
    /// buffer `dst`, rounded to its precision.
    fn kv_write_rows(
        &self,
        dst: &mut Self::KvBuf,
        dst_row: usize,
        src: &Self::Buf,
        src_row: usize,
        n: usize,
        width: usize,
    );
    /// Copies the first `n` rows (width `width`) of the cache buffer `src` into `dst`, which has
    /// the same precision (growing a cache).
    fn kv_copy_rows(&self, dst: &mut Self::KvBuf, src: &Self::KvBuf, n: usize, width: usize);
    /// Bytes per cached value of `buf` (4 or 2).
    fn kv_elem_bytes(&self, buf: &Self::KvBuf) -> usize;

    /// Inference attention of `nq` new queries at positions `past..past+nq` over a KV cache.
    fn attention_cached(
        &self,
        out: &mut Self::Buf,
        q: &Self::Buf,
        k_cache: &Self::KvBuf,
        v_cache: &Self::KvBuf,
        nq: usize,
        past: usize,
        shape: &AttentionShape,
    );
    /// One step's cached attention for several sequences (a decode batch): sequence `i` has
    /// `seqs[i].rows` new query rows, consecutive in `q` and `out` after those of the sequences
    /// before it, attending to its own cache with `seqs[i].past` earlier positions. Each
    /// sequence gets what [`Backend::attention_cached`] gives it alone; the default runs them one
    /// after another.
    fn attention_cached_batch(
        &self,
        out: &mut Self::Buf,
        q: &Self::Buf,
        seqs: &[CachedSeq<'_, Self::KvBuf>],
        shape: &AttentionShape,
    ) {
        let qd = shape.q_width();
        let mut row = 0;
        for s in seqs {
            let mut qs = self.zeros(s.rows * qd);
            self.copy_rows(&mut qs, 0, q, row, s.rows, qd);
            let mut o = self.zeros(s.rows * qd);
            self.attention_cached(&mut o, &qs, s.k, s.v, s.rows, s.past, shape);
            self.copy_rows(out, row, &o, 0, s.rows, qd);
            row += s.rows;
        }
    }
    /// Copies rows `src_row..src_row+n` of `src` into `dst` starting at row `dst_row` (width `width`).
    fn copy_rows(
        &self,
        dst: &mut Self::Buf,
        dst_row: usize,
        src: &Self::Buf,
        src_row: usize,
        n: usize,
        width: usize,
    );

    /// `a = silu(g) ⊙ u`.
    fn swiglu_forward(&self, a: &mut Self::Buf, g: &Self::Buf, u: &Self::Buf);
    /// SwiGLU backward.
    fn swiglu_backward(
        &self,
        dg: &mut Self::Buf,
        du: &mut Self::Buf,
        da: &Self::Buf,
        g: &Self::Buf,
        u: &Self::Buf,
    );

    /// `x[t] = table[ids[t]]`.
    fn embedding_forward(&self, x: &mut Self::Buf, ids: &Self::Ids, table: &Self::Weight, dim: usize);
    /// `dtable[ids[t]] += dx[t]`.
    fn embedding_backward(&self, dtable: &mut Self::Buf, dx: &Self::Buf, ids: &Self::Ids, dim: usize);

    /// Fused chunked LM head + cross-entropy; see [`cross_entropy::lm_head_cross_entropy`].
    fn lm_head_cross_entropy(
        &self,
        hidden: &Self::Buf,
        head: &Self::Weight,
        targets: &[i32],
        grads: Option<HeadGrads<'_, Self::Buf>>,
        p: Precision,
    ) -> CrossEntropyOutput;

    /// One AdamW step of every tensor in `tensors` with the step's scalars (the element-wise
    /// arithmetic and its order: [`AdamWScalars`]). Each element's update is independent of the
    /// others, so how the work is split does not change any bit.
    fn adamw_update(&self, tensors: &mut [AdamWTensor<'_, Self::View>], s: &AdamWScalars);
    /// `Σ x²` over all of `xs` together, in f64, for the global gradient norm: one partial sum per
    /// chunk of [`OPTIM_CHUNK`](crate::OPTIM_CHUNK) elements (the chunks of each tensor in turn,
    /// each summed in element order), the partial sums then added in that order — a fixed
    /// reduction, so the result does not depend on threads or blocks.
    fn sum_squares(&self, xs: &[&Self::View]) -> f64;
    /// Multiplies every element of every tensor in `xs` by `s` (gradient scaling and clipping).
    fn scale_all(&self, xs: &mut [&mut Self::View], s: f32);
}

/// The CPU backend: host vectors, `gemm`/bf16 kernels, rayon threads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

/// One adapter's rows of [`Backend::lora_forward_rows_batch`]: its factors (`a` `[r×in]`, `b`
/// `[out×r]`), scale, and the rows `row0 .. row0 + rows` it applies to.
pub struct LoraRows<'a, W> {
    /// The down-projection.
    pub a: &'a W,
    /// The up-projection.
    pub b: &'a W,
    /// `alpha / r` (or its rsLoRA form).
    pub scale: f32,
    /// First row.
    pub row0: usize,
    /// Rows.
    pub rows: usize,
}

/// One sequence of [`Backend::attention_cached_batch`]: its key and value caches (this layer's),
/// its new query rows and how many positions the cache held before them.
pub struct CachedSeq<'a, K> {
    /// The layer's key cache of the sequence (the new rows written already).
    pub k: &'a K,
    /// The layer's value cache of the sequence.
    pub v: &'a K,
    /// New query rows.
    pub rows: usize,
    /// Positions cached before them.
    pub past: usize,
}

/// [`attention::attention_cached`] on a cache of either precision.
fn cpu_attention_cached(
    out: &mut [f32],
    q: &[f32],
    k_cache: &KvRows,
    v_cache: &KvRows,
    nq: usize,
    past: usize,
    shape: &AttentionShape,
) {
    match (k_cache, v_cache) {
        (KvRows::F32(k), KvRows::F32(v)) => attention::attention_cached(out, q, k, v, nq, past, shape),
        (KvRows::F16(k), KvRows::F16(v)) => attention::attention_cached(out, q, k, v, nq, past, shape),
        _ => panic!("attention_cached: keys and values differ in precision"),
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Ids = Vec<u32>;
    type Weight = Weight;
    type Rope = RopeTable;
    type View = [f32];
    type KvBuf = KvRows;

    fn zeros(&self, n: usize) -> Vec<f32> {
        vec![0.0; n]
    }
    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }
    fn download(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn upload_ids(&self, ids: &[u32]) -> Vec<u32> {
        ids.to_vec()
    }
    fn fill_zero(&self, buf: &mut Vec<f32>) {
        buf.fill(0.0);
    }
    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>) {
        dst.copy_from_slice(src);
    }

    fn weight(&self, data: &[f32], rows: usize, cols: usize, bf16: bool) -> Weight {
        if bf16 {
            Weight::bf16_from_f32(data, rows, cols)
        } else {
            Weight::f32(data.to_vec(), rows, cols)
        }
    }
    fn weight_quantized(&self, q: QuantTensor) -> Weight {
        Weight::quantized(q)
    }
    fn weight_to_host(&self, w: &Weight) -> Vec<f32> {
        w.to_f32()
    }
    fn weight_update(&self, w: &mut Weight, data: &Vec<f32>) {
        match &mut w.data {
            matmul::WeightData::F32(v) => v.copy_from_slice(data),
            matmul::WeightData::Bf16(v) => *v = matmul::to_bf16(data),
            // Packed for inference: repacked from the new values.
            matmul::WeightData::Bf16Panels(_) => {
                *w = Weight::bf16_from_f32(data, w.rows, w.cols);
                w.pack_for_inference();
            }
            // Arbitrary values have no blocks: the weight becomes bf16 (an adapter merged into a
            // quantized base for serving).
            matmul::WeightData::Quant(_) | matmul::WeightData::QuantInterleaved(_) => {
                w.data = matmul::WeightData::Bf16(matmul::to_bf16(data))
            }
        }
    }
    fn weight_bytes(&self, w: &Weight) -> usize {
        w.bytes()
    }
    fn weight_pack_for_inference(&self, w: &mut Weight) {
        w.pack_for_inference()
    }
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        // On a pool worker already: inline; otherwise the closure runs on one.
        rayon::scope(|_| f())
    }

    fn linear_forward(&self, y: &mut Vec<f32>, x: &Vec<f32>, w: &Weight, t: usize, acc: bool, p: Precision) {
        let _p = crate::profile::scope("matmul_forward");
        matmul::linear_forward(y, x, w, t, acc, p)
    }
    fn linear_forward_lora(
        &self,
        y: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Weight,
        xa: &Vec<f32>,
        b: &Weight,
        t: usize,
        acc: bool,
        p: Precision,
    ) {
        let _p = crate::profile::scope("matmul_forward");
        matmul::linear_forward_lora(y, x, w, xa, b, t, acc, p)
    }
    fn linear_forward_grouped(
        &self,
        y: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Weight,
        groups: &[usize],
        p: Precision,
    ) {
        let _p = crate::profile::scope("matmul_forward");
        matmul::linear_forward_grouped(y, x, w, groups, p)
    }
    fn lora_forward_rows(
        &self,
        y: &mut Vec<f32>,
        x: &Vec<f32>,
        a: &Weight,
        b: &Weight,
        scale: f32,
        t: usize,
    ) {
        let _p = crate::profile::scope("lora_forward_rows");
        matmul::lora_forward_rows(y, x, a, b, scale, t)
    }
    fn lora_forward_rows_batch(
        &self,
        y: &mut Vec<f32>,
        x: &Vec<f32>,
        groups: &[LoraRows<'_, Weight>],
        inp: usize,
        out: usize,
        t: usize,
    ) {
        use rayon::prelude::*;
        let _p = crate::profile::scope("lora_forward_rows");
        assert!(
            x.len() >= t * inp && y.len() >= t * out,
            "lora_forward_rows_batch: shapes"
        );
        // Each group on its own rows of y, side by side on the pool.
        let mut parts = Vec::with_capacity(groups.len());
        let (mut rest, mut at) = (&mut y[..t * out], 0);
        for g in groups {
            assert!(
                g.row0 >= at && g.row0 + g.rows <= t,
                "lora_forward_rows_batch: groups out of order"
            );
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((g.row0 - at) * out);
            let (mine, tail) = tail.split_at_mut(g.rows * out);
            rest = tail;
            at = g.row0 + g.rows;
            parts.push((mine, &x[g.row0 * inp..at * inp], g));
        }
        let run = |(ys, xs, g): (&mut [f32], &[f32], &LoraRows<'_, Weight>)| {
            matmul::lora_forward_rows(ys, xs, g.a, g.b, g.scale, g.rows)
        };
        if parts.len() == 1 {
            parts.into_iter().for_each(run);
        } else {
            parts.into_par_iter().for_each(run);
        }
    }
    fn linear_backward_input(
        &self,
        dx: &mut Vec<f32>,
        dy: &Vec<f32>,
        w: &Weight,
        t: usize,
        acc: bool,
        p: Precision,
    ) {
        let _p = crate::profile::scope("matmul_backward_input");
        matmul::linear_backward_input(dx, dy, w, t, acc, p)
    }
    fn linear_backward_input_lora(
        &self,
        dx: &mut Vec<f32>,
        dy: &Vec<f32>,
        w: &Weight,
        dxa: &Vec<f32>,
        a: &Weight,
        t: usize,
        acc: bool,
        p: Precision,
    ) {
        let _p = crate::profile::scope("matmul_backward_input");
        matmul::linear_backward_input_lora(dx, dy, w, dxa, a, t, acc, p)
    }
    fn linear_backward_weight(
        &self,
        dw: &mut Vec<f32>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        t: usize,
        out: usize,
        inp: usize,
        acc: bool,
        p: Precision,
    ) {
        let _p = crate::profile::scope("matmul_backward_weight");
        matmul::linear_backward_weight(dw, dy, x, t, out, inp, acc, p)
    }
    fn add_bias(&self, y: &mut Vec<f32>, bias: &Vec<f32>) {
        let _p = crate::profile::scope("elementwise");
        elementwise::add_bias(y, bias)
    }
    fn bias_backward(&self, db: &mut Vec<f32>, dy: &Vec<f32>) {
        let _p = crate::profile::scope("elementwise");
        elementwise::bias_backward(db, dy)
    }
    fn axpy(&self, y: &mut Vec<f32>, alpha: f32, x: &Vec<f32>) {
        let _p = crate::profile::scope("elementwise");
        elementwise::axpy(y, alpha, x)
    }
    fn add(&self, y: &mut Vec<f32>, a: &Vec<f32>, b: &Vec<f32>) {
        let _p = crate::profile::scope("elementwise");
        elementwise::add(y, a, b)
    }
    fn scale(&self, y: &mut Vec<f32>, s: f32) {
        let _p = crate::profile::scope("elementwise");
        y.iter_mut().for_each(|v| *v *= s);
    }
    fn dropout(&self, y: &mut Vec<f32>, x: &Vec<f32>, p: f32, seed: u64) {
        let _p = crate::profile::scope("elementwise");
        use rayon::prelude::*;
        let inv = 1.0 / (1.0 - p);
        y.par_iter_mut()
            .zip(x.par_iter())
            .enumerate()
            .for_each(|(i, (y, &x))| {
                *y = if crate::rng::dropout_keep_at(seed, i as u64, p) {
                    x * inv
                } else {
                    0.0
                };
            });
    }

    fn rmsnorm_forward(
        &self,
        y: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dim: usize,
        eps: f32,
    ) {
        let _p = crate::profile::scope("rmsnorm");
        norm::rmsnorm_forward(y, rstd, x, w, dim, eps)
    }
    fn rmsnorm_apply(&self, y: &mut Vec<f32>, rstd: &Vec<f32>, x: &Vec<f32>, w: &Vec<f32>, dim: usize) {
        let _p = crate::profile::scope("rmsnorm");
        norm::rmsnorm_apply(y, rstd, x, w, dim)
    }
    fn rmsnorm_backward(
        &self,
        dx: &mut Vec<f32>,
        dw: Option<&mut Vec<f32>>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        dim: usize,
        acc: bool,
    ) {
        let _p = crate::profile::scope("rmsnorm_backward");
        norm::rmsnorm_backward(dx, dw.map(|v| v.as_mut_slice()), dy, x, w, rstd, dim, acc)
    }

    fn rope_table(&self, inv_freq: &[f32], max_positions: usize) -> RopeTable {
        RopeTable::new(inv_freq, max_positions)
    }
    fn rope_forward(&self, x: &mut Vec<f32>, positions: &Vec<u32>, n_heads: usize, table: &RopeTable) {
        let _p = crate::profile::scope("rope");
        rope::rope_forward(x, positions, n_heads, table)
    }
    fn rope_backward(&self, dx: &mut Vec<f32>, positions: &Vec<u32>, n_heads: usize, table: &RopeTable) {
        let _p = crate::profile::scope("rope");
        rope::rope_backward(dx, positions, n_heads, table)
    }

    fn attention_forward(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        segments: &[(usize, usize)],
        shape: &AttentionShape,
    ) {
        let _p = crate::profile::scope("attention_forward");
        attention::attention_forward(out, lse, q, k, v, segments, shape)
    }
    fn attention_backward(
        &self,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        dout: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        segments: &[(usize, usize)],
        shape: &AttentionShape,
    ) {
        let _p = crate::profile::scope("attention_backward");
        attention::attention_backward(dq, dk, dv, dout, out, lse, q, k, v, segments, shape)
    }

    fn kv_zeros(&self, n: usize, half: bool) -> KvRows {
        if half {
            KvRows::F16(vec![half::f16::ZERO; n])
        } else {
            KvRows::F32(vec![0.0; n])
        }
    }
    fn kv_write_rows(
        &self,
        dst: &mut KvRows,
        dst_row: usize,
        src: &Vec<f32>,
        src_row: usize,
        n: usize,
        width: usize,
    ) {
        let from = &src[src_row * width..(src_row + n) * width];
        let range = dst_row * width..(dst_row + n) * width;
        match dst {
            KvRows::F32(d) => d[range].copy_from_slice(from),
            KvRows::F16(d) => crate::cpu::math::narrow_f16(from, &mut d[range]),
        }
    }
    fn kv_copy_rows(&self, dst: &mut KvRows, src: &KvRows, n: usize, width: usize) {
        match (dst, src) {
            (KvRows::F32(d), KvRows::F32(s)) => d[..n * width].copy_from_slice(&s[..n * width]),
            (KvRows::F16(d), KvRows::F16(s)) => d[..n * width].copy_from_slice(&s[..n * width]),
            _ => panic!("kv_copy_rows: the two cache buffers differ in precision"),
        }
    }
    fn kv_elem_bytes(&self, buf: &KvRows) -> usize {
        match buf {
            KvRows::F32(_) => 4,
            KvRows::F16(_) => 2,
        }
    }

    fn attention_cached(
        &self,
        out: &mut Vec<f32>,
        q: &Vec<f32>,
        k_cache: &KvRows,
        v_cache: &KvRows,
        nq: usize,
        past: usize,
        shape: &AttentionShape,
    ) {
        let _p = crate::profile::scope("attention_cached");
        cpu_attention_cached(out, q, k_cache, v_cache, nq, past, shape)
    }
    fn attention_cached_batch(
        &self,
        out: &mut Vec<f32>,
        q: &Vec<f32>,
        seqs: &[CachedSeq<'_, KvRows>],
        shape: &AttentionShape,
    ) {
        use rayon::prelude::*;
        let _p = crate::profile::scope("attention_cached_batch");
        let qd = shape.q_width();
        let total: usize = seqs.iter().map(|s| s.rows).sum();
        assert!(
            q.len() >= total * qd && out.len() >= total * qd,
            "attention_cached_batch: q or out shorter than the sequences' rows"
        );
        // The sequences side by side on the pool (each short decode cache is one chunk of the
        // single-sequence kernel, so one at a time would leave the other workers idle), each
        // on its own rows of `q` and `out`: the same calls as one by one.
        let mut parts = Vec::with_capacity(seqs.len());
        let (mut rest, mut qrest) = (&mut out[..total * qd], &q[..total * qd]);
        for s in seqs {
            let (o, r) = std::mem::take(&mut rest).split_at_mut(s.rows * qd);
            let (qs, qr) = qrest.split_at(s.rows * qd);
            (rest, qrest) = (r, qr);
            parts.push((o, qs, s));
        }
        parts
            .into_par_iter()
            .for_each(|(o, qs, s)| cpu_attention_cached(o, qs, s.k, s.v, s.rows, s.past, shape));
    }
    fn copy_rows(
        &self,
        dst: &mut Vec<f32>,
        dst_row: usize,
        src: &Vec<f32>,
        src_row: usize,
        n: usize,
        width: usize,
    ) {
        dst[dst_row * width..(dst_row + n) * width]
            .copy_from_slice(&src[src_row * width..(src_row + n) * width]);
    }

    fn swiglu_forward(&self, a: &mut Vec<f32>, g: &Vec<f32>, u: &Vec<f32>) {
        let _p = crate::profile::scope("swiglu");
        elementwise::swiglu_forward(a, g, u)
    }
    fn swiglu_backward(
        &self,
        dg: &mut Vec<f32>,
        du: &mut Vec<f32>,
        da: &Vec<f32>,
        g: &Vec<f32>,
        u: &Vec<f32>,
    ) {
        let _p = crate::profile::scope("swiglu_backward");
        elementwise::swiglu_backward(dg, du, da, g, u)
    }

    fn embedding_forward(&self, x: &mut Vec<f32>, ids: &Vec<u32>, table: &Weight, dim: usize) {
        let _p = crate::profile::scope("embedding");
        match &table.data {
            matmul::WeightData::F32(t) => elementwise::embedding_forward(x, ids, t, dim),
            _ => {
                // bf16 or block-quantized: each looked-up row converted on demand.
                for (row, &id) in x.chunks_mut(dim).zip(ids) {
                    table.row_to_f32(id as usize, row);
                }
            }
        }
    }
    fn embedding_backward(&self, dtable: &mut Vec<f32>, dx: &Vec<f32>, ids: &Vec<u32>, dim: usize) {
        let _p = crate::profile::scope("embedding_backward");
        elementwise::embedding_backward(dtable, dx, ids, dim)
    }

    fn lm_head_cross_entropy(
        &self,
        hidden: &Vec<f32>,
        head: &Weight,
        targets: &[i32],
        grads: Option<HeadGrads<'_, Vec<f32>>>,
        p: Precision,
    ) -> CrossEntropyOutput {
        let _p = crate::profile::scope("lm_head_cross_entropy");
        let grads = grads.map(|(d_logp, d_hidden, d_head)| CrossEntropyGrads {
            d_logp,
            d_hidden: d_hidden.as_mut_slice(),
            d_head: d_head.map(|v| v.as_mut_slice()),
        });
        cross_entropy::lm_head_cross_entropy(
            hidden,
            head,
            targets,
            grads,
            cross_entropy::default_chunk_rows(head.rows),
            p,
        )
    }

    fn adamw_update(&self, tensors: &mut [AdamWTensor<'_, [f32]>], s: &AdamWScalars) {
        optim::adamw_update(tensors, s)
    }
    fn sum_squares(&self, xs: &[&[f32]]) -> f64 {
        optim::sum_squares(xs)
    }
    fn scale_all(&self, xs: &mut [&mut [f32]], s: f32) {
        optim::scale_all(xs, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of sequences' cached attention gives each sequence the bits of its own call.
    #[test]
    fn attention_cached_batch_equals_one_call_per_sequence() {
        let shape = AttentionShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 64,
            window: None,
            bf16: true,
        };
        let (qd, kd) = (shape.q_width(), shape.kv_width());
        let val = |n: usize, s: usize| -> Vec<f32> {
            (0..n).map(|i| (((i * s) % 89) as f32 - 44.0) / 50.0).collect()
        };
        // (new rows, past positions): decode rows, a prompt chunk, an empty cache, a long cache.
        let specs = [(1usize, 5usize), (3, 0), (1, 300), (20, 40), (1, 0)];
        for half in [false, true] {
            let caches: Vec<(KvRows, KvRows)> = specs
                .iter()
                .enumerate()
                .map(|(i, &(n, past))| {
                    let (k, v) = (val((n + past) * kd, 7 + i), val((n + past) * kd, 11 + i));
                    if half {
                        let h = |x: Vec<f32>| x.into_iter().map(half::f16::from_f32).collect();
                        (KvRows::F16(h(k)), KvRows::F16(h(v)))
                    } else {
                        (KvRows::F32(k), KvRows::F32(v))
                    }
                })
                .collect();
            let total: usize = specs.iter().map(|s| s.0).sum();
            let q = val(total * qd, 13);
            let seqs: Vec<CachedSeq<'_, KvRows>> = specs
                .iter()
                .zip(&caches)
                .map(|(&(rows, past), (k, v))| CachedSeq { k, v, rows, past })
                .collect();
            let mut got = vec![f32::NAN; total * qd];
            Cpu.attention_cached_batch(&mut got, &q, &seqs, &shape);
            let mut row = 0;
            for s in &seqs {
                let mut want = vec![0.0f32; s.rows * qd];
                let qs = q[row * qd..(row + s.rows) * qd].to_vec();
                Cpu.attention_cached(&mut want, &qs, s.k, s.v, s.rows, s.past, &shape);
                let g = &got[row * qd..(row + s.rows) * qd];
                assert!(
                    g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "half {half}, {} rows after {}",
                    s.rows,
                    s.past
                );
                row += s.rows;
            }
        }
    }

    /// Several adapters' rows in one call give each row the bits of its own group's call, and
    /// leave rows without an adapter alone.
    #[test]
    fn lora_forward_rows_batch_equals_one_call_per_group() {
        let (inp, out, t) = (40usize, 24usize, 9usize);
        let val = |n: usize, s: usize| -> Vec<f32> {
            (0..n).map(|i| (((i * s) % 83) as f32 - 41.0) / 60.0).collect()
        };
        let ad: Vec<(Weight, Weight)> = (0..3)
            .map(|i| {
                (
                    Weight::f32(val(4 * inp, 3 + i), 4, inp),
                    Weight::f32(val(out * 4, 5 + i), out, 4),
                )
            })
            .collect();
        let x = val(t * inp, 7);
        let y0 = val(t * out, 9);
        // Rows 0..2 adapter 0, row 2 none, rows 3..7 adapter 1, rows 7..9 adapter 2.
        let spans = [(0usize, 0usize, 2usize), (1, 3, 4), (2, 7, 2)];
        let groups: Vec<LoraRows<'_, Weight>> = spans
            .iter()
            .map(|&(a, row0, rows)| LoraRows {
                a: &ad[a].0,
                b: &ad[a].1,
                scale: 0.5 + a as f32,
                row0,
                rows,
            })
            .collect();
        let mut got = y0.clone();
        Cpu.lora_forward_rows_batch(&mut got, &x, &groups, inp, out, t);
        let mut want = y0.clone();
        for g in &groups {
            let xs = x[g.row0 * inp..(g.row0 + g.rows) * inp].to_vec();
            let mut ys = want[g.row0 * out..(g.row0 + g.rows) * out].to_vec();
            Cpu.lora_forward_rows(&mut ys, &xs, g.a, g.b, g.scale, g.rows);
            want[g.row0 * out..(g.row0 + g.rows) * out].copy_from_slice(&ys);
        }
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(got[2 * out..3 * out], y0[2 * out..3 * out]);
    }

    /// The LoRA dropout mask as it was before its hash moved to `crate::rng`.
    #[test]
    fn dropout_mask_is_pinned() {
        let x = vec![1.0f32; 64];
        let mut y = vec![0.0f32; 64];
        Cpu.dropout(&mut y, &x, 0.3, 77);
        let mask = y
            .iter()
            .enumerate()
            .fold(0u64, |m, (i, &v)| m | ((v != 0.0) as u64) << i);
        assert_eq!(mask, 17437435141182647514);
        assert!(y.iter().all(|&v| v == 0.0 || v == 1.0 / 0.7));
    }
}
