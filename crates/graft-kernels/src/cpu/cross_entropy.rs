//! The language-model head fused with cross-entropy, chunked over tokens so the full
//! `[tokens × vocab]` logits matrix never exists. Only tokens with a target (`target >= 0`) are
//! computed at all. One pass yields the summed loss, per-token log-probabilities (for DPO, KTO and
//! GRPO) and, when asked, the gradients of an objective `L` w.r.t. the hidden states and the head
//! weight, given `∂L/∂ log p(target_t)` per token (`d_logp`; SFT's mean token loss over `N` tokens
//! is `d_logp = −1/N` on every trained token). An objective whose `d_logp` depends on the
//! log-probs (DPO) calls this twice: once without gradients for the log-probs, then with them.

use super::gemm_bf16::{MatData, MatRef, PackedB, gemm_bf16_packed};
use super::math::{exp_sub_sum_dot, row_max, scale_row};
use super::matmul::{Weight, WeightData, linear_backward_input, linear_backward_weight, linear_forward};
use super::quant_matmul::QuantB;
use crate::types::{CrossEntropyOutput, Precision};
use rayon::prelude::*;

/// Gradient outputs requested from [`lm_head_cross_entropy`].
pub struct CrossEntropyGrads<'a> {
    /// `∂L/∂ log p(target_t)` per token (`[tokens]`; ignored where the target is ignored).
    pub d_logp: &'a [f32],
    /// `[tokens, hidden]`, overwritten (zero rows for ignored tokens).
    pub d_hidden: &'a mut [f32],
    /// `[vocab, hidden]`, accumulated into when the head is trained.
    pub d_head: Option<&'a mut [f32]>,
}

/// Rows per chunk so that a chunk of logits stays near 32 MB.
pub fn default_chunk_rows(vocab: usize) -> usize {
    ((8 << 20) / vocab.max(1)).clamp(16, 1024)
}

/// Fused, chunked LM head + cross-entropy over `hidden` (`[tokens, dim]`).
pub fn lm_head_cross_entropy(
    hidden: &[f32],
    head: &Weight,
    targets: &[i32],
    mut grads: Option<CrossEntropyGrads<'_>>,
    chunk_rows: usize,
    precision: Precision,
) -> CrossEntropyOutput {
    let (vocab, dim) = (head.rows, head.cols);
    let t = targets.len();
    assert_eq!(hidden.len(), t * dim);
    if let Some(g) = &grads {
        assert_eq!(g.d_logp.len(), t, "one d_logp per token");
    }
    let rows: Vec<usize> = (0..t).filter(|&i| targets[i] >= 0).collect();
    let mut logprobs = vec![0.0f32; t];
    let mut entropies = vec![0.0f32; t];
    let mut loss_sum = 0.0f64;
    let mut num_correct = 0usize;
    if let Some(g) = grads.as_mut() {
        g.d_hidden.fill(0.0);
    }
    let chunk_rows = chunk_rows.max(1);
    // Fast mode: pack the head once for all chunks (forward: Wᵀ; input gradient: W) instead of
    // re-packing the whole vocabulary for every chunk.
    let packed = (precision.effective() == Precision::Fast && !rows.is_empty()).then(|| {
        let threads = rayon::current_num_threads();
        let view = |transposed: bool| {
            let (r, c, rs, cs) = if transposed {
                (dim, vocab, 1, dim)
            } else {
                (vocab, dim, dim, 1)
            };
            let data = match &head.data {
                WeightData::F32(v) => MatData::F32(v),
                WeightData::Bf16(v) => MatData::Bf16(v),
                // Dequantized to bf16 while packed.
                WeightData::Quant(w) => {
                    return PackedB::from_source(&QuantB { w, transposed }, threads);
                }
                WeightData::QuantInterleaved(w) => {
                    return PackedB::from_source(&QuantB { w: &**w, transposed }, threads);
                }
                // Packed for inference already (Wᵀ); the input gradient's W is widened.
                WeightData::Bf16Panels(p) if transposed => return (**p).clone(),
                WeightData::Bf16Panels(_) => {
                    let wide = head.to_f32();
                    let v = MatRef {
                        data: MatData::F32(&wide),
                        rows: r,
                        cols: c,
                        row_stride: rs,
                        col_stride: cs,
                    };
                    return PackedB::new(v, threads);
                }
            };
            PackedB::new(
                MatRef {
                    data,
                    rows: r,
                    cols: c,
                    row_stride: rs,
                    col_stride: cs,
                },
                threads,
            )
        };
        let fwd = view(true);
        let bwd = grads.is_some().then(|| view(false));
        (fwd, bwd)
    });
    let mut h = vec![0.0f32; chunk_rows.min(rows.len().max(1)) * dim];
    let mut logits = vec![0.0f32; chunk_rows.min(rows.len().max(1)) * vocab];
    let mut dh = Vec::new();
    for chunk in rows.chunks(chunk_rows) {
        let c = chunk.len();
        for (r, &i) in chunk.iter().enumerate() {
            h[r * dim..(r + 1) * dim].copy_from_slice(&hidden[i * dim..(i + 1) * dim]);
        }
        let (h, logits) = (&h[..c * dim], &mut logits[..c * vocab]);
        match &packed {
            Some((fwd, _)) => gemm_bf16_packed(
                logits,
                vocab,
                MatRef::f32_row_major(h, c, dim),
                fwd,
                1.0,
                0.0,
                rayon::current_num_threads(),
            ),
            None => linear_forward(logits, h, head, c, false, precision),
        }
        let d_logp = grads.as_ref().map(|g| g.d_logp);
        let lp: Vec<(f32, f32, bool)> = logits
            .par_chunks_mut(vocab)
            .zip(chunk.par_iter())
            .map(|(row, &i)| {
                let tgt = targets[i] as usize;
                let target_logit = row[tgt];
                let mx = row_max(row);
                let (sum, dot) = exp_sub_sum_dot(row, mx);
                let lse = mx + sum.ln();
                let entropy = sum.ln() - dot / sum;
                if let Some(d) = d_logp {
                    // ∂L/∂logits = −d_logp · (onehot − softmax) = s · softmax − s · onehot.
                    let s = -d[i];
                    scale_row(row, s / sum);
                    row[tgt] -= s;
                }
                (target_logit - lse, entropy, target_logit >= mx)
            })
            .collect();
        for (&i, &(l, h, top)) in chunk.iter().zip(&lp) {
            logprobs[i] = l;
            entropies[i] = h;
            loss_sum -= l as f64;
            num_correct += top as usize;
        }
        if let Some(g) = grads.as_mut() {
            dh.resize(c * dim, 0.0);
            match packed.as_ref().and_then(|p| p.1.as_ref()) {
                Some(bwd) => gemm_bf16_packed(
                    &mut dh,
                    dim,
                    MatRef::f32_row_major(logits, c, vocab),
                    bwd,
                    1.0,
                    0.0,
                    rayon::current_num_threads(),
                ),
                None => linear_backward_input(&mut dh, logits, head, c, false, precision),
            }
            for (r, &i) in chunk.iter().enumerate() {
                g.d_hidden[i * dim..(i + 1) * dim].copy_from_slice(&dh[r * dim..(r + 1) * dim]);
            }
            if let Some(dw) = g.d_head.as_deref_mut() {
                linear_backward_weight(dw, logits, h, c, vocab, dim, true, precision);
            }
        }
    }
    CrossEntropyOutput {
        loss_sum,
        num_trained: rows.len(),
        logprobs,
        entropies,
        num_correct,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_match_finite_differences_and_chunking_is_invisible() {
        let (t, dim, vocab) = (7, 5, 11);
        let hidden: Vec<f32> = (0..t * dim).map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.1).collect();
        let w: Vec<f32> = (0..vocab * dim)
            .map(|i| ((i * 13 % 19) as f32 - 9.0) * 0.05)
            .collect();
        let targets = [3, -100, 0, 10, 5, -100, 7];
        let head = Weight::f32(w.clone(), vocab, dim);
        let run = |hidden: &[f32], w: &[f32], chunk: usize| {
            let head = Weight::f32(w.to_vec(), vocab, dim);
            lm_head_cross_entropy(hidden, &head, &targets, None, chunk, Precision::Exact).loss_sum
        };
        let mut dh = vec![0.0; t * dim];
        let mut dw = vec![0.0; vocab * dim];
        let out = lm_head_cross_entropy(
            &hidden,
            &head,
            &targets,
            Some(CrossEntropyGrads {
                d_logp: &[-1.0; 7],
                d_hidden: &mut dh,
                d_head: Some(&mut dw),
            }),
            2,
            Precision::Exact,
        );
        assert_eq!(out.num_trained, 5);
        // Entropy per trained token, against the softmax computed directly; argmax hits.
        let mut correct = 0;
        for (i, &tg) in targets.iter().enumerate() {
            let z: Vec<f64> = (0..vocab)
                .map(|v| {
                    (0..dim)
                        .map(|k| (hidden[i * dim + k] * w[v * dim + k]) as f64)
                        .sum()
                })
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            correct += (tg >= 0 && z[tg as usize] >= m) as usize;
            let s: f64 = z.iter().map(|x| (x - m).exp()).sum();
            let h: f64 = -z
                .iter()
                .map(|x| ((x - m).exp() / s) * ((x - m) - s.ln()))
                .sum::<f64>();
            let want = if tg >= 0 { h } else { 0.0 };
            assert!(
                (out.entropies[i] as f64 - want).abs() < 1e-5,
                "token {i}: {} vs {want}",
                out.entropies[i]
            );
        }
        assert_eq!(out.num_correct, correct);
        assert!((out.loss_sum - run(&hidden, &w, 100)).abs() < 1e-5);
        let e = 1e-2f32;
        for i in 0..t * dim {
            let (mut p, mut m) = (hidden.clone(), hidden.clone());
            p[i] += e;
            m[i] -= e;
            let num = (run(&p, &w, 3) - run(&m, &w, 3)) / (2.0 * e as f64);
            assert!((num - dh[i] as f64).abs() < 1e-3, "dh {i}");
        }
        for i in 0..vocab * dim {
            let (mut p, mut m) = (w.clone(), w.clone());
            p[i] += e;
            m[i] -= e;
            let num = (run(&hidden, &p, 3) - run(&hidden, &m, 3)) / (2.0 * e as f64);
            assert!((num - dw[i] as f64).abs() < 1e-3, "dw {i}");
        }
    }

    #[test]
    fn per_token_weights_give_the_gradient_of_a_weighted_log_prob_sum() {
        let (t, dim, vocab) = (6, 4, 9);
        let hidden: Vec<f32> = (0..t * dim).map(|i| ((i * 29 % 13) as f32 - 6.0) * 0.1).collect();
        let w: Vec<f32> = (0..vocab * dim)
            .map(|i| ((i * 11 % 17) as f32 - 8.0) * 0.05)
            .collect();
        let targets = [2, 8, -100, 0, 4, 1];
        let d_logp = [0.7f32, -1.3, 0.0, 2.0, -0.25, 0.5];
        // L = Σ d_logp_t · log p_t (linear in the log-probs, so d_logp is its exact gradient).
        let objective = |hidden: &[f32]| {
            let head = Weight::f32(w.clone(), vocab, dim);
            let out = lm_head_cross_entropy(hidden, &head, &targets, None, 4, Precision::Exact);
            out.logprobs
                .iter()
                .zip(&d_logp)
                .map(|(l, d)| (l * d) as f64)
                .sum::<f64>()
        };
        let head = Weight::f32(w.clone(), vocab, dim);
        let mut dh = vec![0.0; t * dim];
        let g = CrossEntropyGrads {
            d_logp: &d_logp,
            d_hidden: &mut dh,
            d_head: None,
        };
        lm_head_cross_entropy(&hidden, &head, &targets, Some(g), 2, Precision::Exact);
        let e = 1e-2f32;
        for i in 0..t * dim {
            let (mut p, mut m) = (hidden.clone(), hidden.clone());
            p[i] += e;
            m[i] -= e;
            let num = (objective(&p) - objective(&m)) / (2.0 * e as f64);
            assert!((num - dh[i] as f64).abs() < 1e-3, "dh {i}: {num} vs {}", dh[i]);
        }
    }

    #[test]
    fn fast_mode_matches_exact_mode() {
        let (t, dim, vocab) = (300, 40, 700);
        let hidden: Vec<f32> = (0..t * dim)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.05)
            .collect();
        let w: Vec<f32> = (0..vocab * dim)
            .map(|i| ((i * 13 % 19) as f32 - 9.0) * 0.03)
            .collect();
        let targets: Vec<i32> = (0..t)
            .map(|i| if i % 5 == 0 { -100 } else { (i * 7 % vocab) as i32 })
            .collect();
        let head = Weight::f32(w, vocab, dim);
        let run = |p: Precision| {
            let mut dh = vec![0.0; t * dim];
            let mut dw = vec![0.0; vocab * dim];
            let d_logp = vec![-0.01; t];
            let g = CrossEntropyGrads {
                d_logp: &d_logp,
                d_hidden: &mut dh,
                d_head: Some(&mut dw),
            };
            let out = lm_head_cross_entropy(&hidden, &head, &targets, Some(g), 64, p);
            (out.loss_sum, dh, dw)
        };
        let (le, dhe, dwe) = run(Precision::Exact);
        let (lf, dhf, dwf) = run(Precision::Fast);
        let rel = |a: &[f32], b: &[f32]| {
            let n: f64 = a
                .iter()
                .zip(b)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            n / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt()
        };
        assert!(((lf - le) / le).abs() < 1e-2, "{lf} vs {le}");
        assert!(rel(&dhf, &dhe) < 2e-2 && rel(&dwf, &dwe) < 2e-2);
    }
}
