//! Inference: KV-cache prefill and decode for one or many sequences at once.
//!
//! [`Model::forward_batch`] runs a step for several sequences, each bringing its new tokens (a
//! whole prompt for prefill, one token for decode) and its own [`KvCache`]. The matrix products
//! run once over all rows of the step; attention runs per sequence over its cache. This is the
//! primitive under the generation core ([`crate::generation`]).

use crate::lora::{Adapter, LoraLinear};
use crate::model::{DOWN, GATE, K, Layer, Model, O, Q, UP, V};
use graft_kernels::{Backend, CachedSeq, LoraRows, Precision};

/// Keys and values of one sequence, per layer `[capacity, kv_dim]`: f16 for fast-mode
/// generation (as llama.cpp's default cache), f32 for exact mode.
pub struct KvCache<B: Backend> {
    k: Vec<B::KvBuf>,
    v: Vec<B::KvBuf>,
    /// Positions filled.
    pub len: usize,
    /// Positions the buffers can hold.
    pub capacity: usize,
}

impl<B: Backend> KvCache<B> {
    /// Bytes held by the cache buffers.
    pub fn bytes(&self, backend: &B, kv_dim: usize) -> usize {
        let elem = self.k.first().map_or(4, |k| backend.kv_elem_bytes(k));
        2 * self.k.len() * self.capacity * kv_dim * elem
    }
}

/// One sequence's part of a batched step.
pub struct SeqStep<'a, B: Backend> {
    pub cache: &'a mut KvCache<B>,
    /// New tokens (prompt or the last sampled token).
    pub tokens: &'a [u32],
    /// The LoRA adapter of this sequence (`None`: the model's own active adapter, if any).
    /// Sequences with different adapters share one step: base products run once over all rows,
    /// each adapter is applied to its own rows.
    pub adapter: Option<&'a Adapter<B>>,
}

impl<B: Backend> Model<B> {
    /// A cache for up to `capacity` positions, for steps in `precision` (fast: f16 values;
    /// exact: f32).
    pub fn new_cache(&self, capacity: usize, precision: Precision) -> KvCache<B> {
        let n = capacity * self.spec.kv_dim();
        let half = precision == Precision::Fast;
        KvCache {
            k: (0..self.spec.num_layers)
                .map(|_| self.backend.kv_zeros(n, half))
                .collect(),
            v: (0..self.spec.num_layers)
                .map(|_| self.backend.kv_zeros(n, half))
                .collect(),
            len: 0,
            capacity,
        }
    }

    /// Grows `cache` to hold `capacity` positions, keeping what it holds (a server starts caches
    /// small and grows them as sequences get longer).
    pub fn grow_cache(&self, cache: &mut KvCache<B>, capacity: usize) {
        if capacity <= cache.capacity {
            return;
        }
        let kd = self.spec.kv_dim();
        for buf in cache.k.iter_mut().chain(cache.v.iter_mut()) {
            let half = self.backend.kv_elem_bytes(buf) == 2;
            let mut grown = self.backend.kv_zeros(capacity * kd, half);
            self.backend.kv_copy_rows(&mut grown, buf, cache.len, kd);
            *buf = grown;
        }
        cache.capacity = capacity;
    }

    /// Runs one step for every sequence in `seqs`, appending to their caches; returns the
    /// next-token logits (`[vocab]`) after each sequence's last new token.
    ///
    /// Panics if a cache would overflow; callers size caches from `max_tokens`.
    pub fn forward_batch(&self, seqs: &mut [SeqStep<'_, B>], precision: Precision) -> Vec<Vec<f32>> {
        self.backend.run(|| self.forward_batch_here(seqs, precision))
    }

    /// [`Model::forward_batch`] on the calling thread.
    fn forward_batch_here(&self, seqs: &mut [SeqStep<'_, B>], precision: Precision) -> Vec<Vec<f32>> {
        let b = &self.backend;
        let s = &self.spec;
        let hd = s.hidden_size;
        let t: usize = seqs.iter().map(|q| q.tokens.len()).sum();
        if t == 0 {
            return vec![vec![]; seqs.len()];
        }
        let mut ids = Vec::with_capacity(t);
        let mut positions = Vec::with_capacity(t);
        for q in seqs.iter() {
            assert!(
                q.cache.len + q.tokens.len() <= q.cache.capacity,
                "KV cache overflow"
            );
            ids.extend_from_slice(q.tokens);
            positions.extend((q.cache.len..q.cache.len + q.tokens.len()).map(|p| p as u32));
        }
        let pos = b.upload_ids(&positions);
        let mut x = b.zeros(t * hd);
        b.embedding_forward(&mut x, &b.upload_ids(&ids), &self.embed, hd);
        for (l, layer) in self.layers.iter().enumerate() {
            x = self.layer_infer(l, layer, x, seqs, &pos, t, precision);
        }
        for q in seqs.iter_mut() {
            q.cache.len += q.tokens.len();
        }
        // Final norm and head on each sequence's last row only.
        let n = seqs.len();
        let mut last = b.zeros(n * hd);
        let mut row = 0;
        for (i, q) in seqs.iter().enumerate() {
            row += q.tokens.len();
            b.copy_rows(&mut last, i, &x, row - 1, 1, hd);
        }
        let mut normed = b.zeros(n * hd);
        let mut rstd = b.zeros(n);
        b.rmsnorm_forward(
            &mut normed,
            &mut rstd,
            &last,
            &self.final_norm,
            hd,
            s.rms_norm_eps,
        );
        let mut logits = b.zeros(n * s.vocab_size);
        b.linear_forward_grouped(&mut logits, &normed, self.head(), &vec![1; n], precision);
        let host = b.download(&logits);
        host.chunks(s.vocab_size).map(|c| c.to_vec()).collect()
    }

    /// `y = x Wᵀ + b` for all rows, then each sequence's LoRA on its rows (consecutive
    /// sequences sharing an adapter are done together).
    #[allow(clippy::too_many_arguments)]
    fn linear_infer(
        &self,
        layer: &Layer<B>,
        l: usize,
        i: usize,
        x: &B::Buf,
        seqs: &[SeqStep<'_, B>],
        t: usize,
        p: Precision,
    ) -> B::Buf {
        let b = &self.backend;
        let lin = &layer.linears[i];
        let mut y = b.zeros(t * lin.out);
        // Each sequence's rows as a group: its output must not depend on the others.
        let groups: Vec<usize> = seqs.iter().map(|q| q.tokens.len()).collect();
        b.linear_forward_grouped(&mut y, x, &lin.w, &groups, p);
        if let Some(bias) = &lin.bias {
            b.add_bias(&mut y, bias);
        }
        fn lora_of<'x, B: Backend>(
            adapter: Option<&'x Adapter<B>>,
            layer: &'x Layer<B>,
            l: usize,
            i: usize,
        ) -> Option<&'x LoraLinear<B>> {
            match adapter {
                Some(a) => a.layers[l][i].as_ref(),
                None => layer.lora[i].as_ref(),
            }
        }
        let same = |a: Option<&LoraLinear<B>>, c: Option<&LoraLinear<B>>| match (a, c) {
            (None, None) => true,
            (Some(a), Some(c)) => std::ptr::eq(a, c),
            _ => false,
        };
        let mut groups = Vec::new();
        let mut start = 0; // first sequence of the current group
        let mut row0 = 0; // its first row
        while start < seqs.len() {
            let m = lora_of(seqs[start].adapter, layer, l, i);
            let mut end = start;
            let mut rows = 0;
            while end < seqs.len() && same(lora_of(seqs[end].adapter, layer, l, i), m) {
                rows += seqs[end].tokens.len();
                end += 1;
            }
            if let Some(m) = m.filter(|_| rows > 0) {
                groups.push(LoraRows {
                    a: &m.a,
                    b: &m.b,
                    scale: m.scale,
                    row0,
                    rows,
                });
            }
            row0 += rows;
            start = end;
        }
        // Row by row, so a request's output does not depend on the requests batched with it.
        if !groups.is_empty() {
            b.lora_forward_rows_batch(&mut y, x, &groups, lin.inp, lin.out, t);
        }
        y
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_infer(
        &self,
        l: usize,
        layer: &Layer<B>,
        x: B::Buf,
        seqs: &mut [SeqStep<'_, B>],
        pos: &B::Ids,
        t: usize,
        p: Precision,
    ) -> B::Buf {
        let b = &self.backend;
        let s = &self.spec;
        let (hd, eps) = (s.hidden_size, s.rms_norm_eps);
        let (qd, kd) = (s.q_dim(), s.kv_dim());
        let mut xn = b.zeros(t * hd);
        let mut rstd = b.zeros(t);
        b.rmsnorm_forward(&mut xn, &mut rstd, &x, &layer.attn_norm, hd, eps);
        let mut q = self.linear_infer(layer, l, Q, &xn, seqs, t, p);
        let mut k = self.linear_infer(layer, l, K, &xn, seqs, t, p);
        let v = self.linear_infer(layer, l, V, &xn, seqs, t, p);
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let mut qo = b.zeros(t * qd);
            let mut r = b.zeros(t * s.num_heads);
            b.rmsnorm_forward(&mut qo, &mut r, &q, qn, s.head_dim, eps);
            let mut ko = b.zeros(t * kd);
            let mut r2 = b.zeros(t * s.num_kv_heads);
            b.rmsnorm_forward(&mut ko, &mut r2, &k, kn, s.head_dim, eps);
            q = qo;
            k = ko;
        }
        b.rope_forward(&mut q, pos, s.num_heads, &self.rope);
        b.rope_forward(&mut k, pos, s.num_kv_heads, &self.rope);
        let shape = self.attention_shape(p);
        let mut attn = b.zeros(t * qd);
        let mut row = 0;
        for sq in seqs.iter_mut() {
            let (n, past) = (sq.tokens.len(), sq.cache.len);
            b.kv_write_rows(&mut sq.cache.k[l], past, &k, row, n, kd);
            b.kv_write_rows(&mut sq.cache.v[l], past, &v, row, n, kd);
            row += n;
        }
        let cached: Vec<CachedSeq<'_, B::KvBuf>> = seqs
            .iter()
            .map(|sq| CachedSeq {
                k: &sq.cache.k[l],
                v: &sq.cache.v[l],
                rows: sq.tokens.len(),
                past: sq.cache.len,
            })
            .collect();
        b.attention_cached_batch(&mut attn, &q, &cached, &shape);
        let o = self.linear_infer(layer, l, O, &attn, seqs, t, p);
        let mut h = o;
        b.axpy(&mut h, 1.0, &x);
        let mut hn = b.zeros(t * hd);
        b.rmsnorm_forward(&mut hn, &mut rstd, &h, &layer.mlp_norm, hd, eps);
        let g = self.linear_infer(layer, l, GATE, &hn, seqs, t, p);
        let u = self.linear_infer(layer, l, UP, &hn, seqs, t, p);
        let mut act = b.zeros(t * s.intermediate_size);
        b.swiglu_forward(&mut act, &g, &u);
        let mut out = self.linear_infer(layer, l, DOWN, &act, seqs, t, p);
        b.axpy(&mut out, 1.0, &h);
        out
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence / stop token was produced.
    Stop,
    /// `max_tokens` was reached (or the context is full).
    Length,
}
