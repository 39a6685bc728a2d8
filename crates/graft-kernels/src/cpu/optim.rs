//! The optimizer's numeric kernels on host slices: the fused AdamW update, the sum of squares of
//! the gradient norm and a many-tensor scale, each over fixed chunks of [`OPTIM_CHUNK`] elements
//! run in parallel. Every element's update is independent of the others and the partial sums are
//! added in a fixed order, so no result depends on the number of threads.

use crate::types::{AdamWScalars, AdamWTensor, OPTIM_CHUNK as CHUNK};
use rayon::prelude::*;

/// One AdamW step of every tensor: all tensors are split into chunks and the chunks updated in
/// parallel (see [`AdamWScalars`] for the arithmetic).
pub fn adamw_update(tensors: &mut [AdamWTensor<'_, [f32]>], s: &AdamWScalars) {
    let mut work = Vec::new();
    for t in tensors.iter_mut() {
        for (((pc, gc), mc), vc) in t
            .param
            .chunks_mut(CHUNK)
            .zip(t.grad.chunks(CHUNK))
            .zip(t.m.chunks_mut(CHUNK))
            .zip(t.v.chunks_mut(CHUNK))
        {
            work.push((pc, gc, mc, vc, t.decay));
        }
    }
    work.into_par_iter()
        .for_each(|(p, g, m, v, decay)| update_chunk(p, g, m, v, decay, s));
}

/// The AdamW update of one chunk, in torch's operation order: `lerp` and `addcmul` as fused
/// multiply-adds (as torch's vectorised CPU kernels compute them), `addcdiv` as `p + (s·m)/d`.
/// `mul_add` is exactly rounded wherever it runs, so every path gives the same bits.
#[inline(always)]
fn update_chunk_body(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decay: bool, s: &AdamWScalars) {
    if decay {
        for x in p.iter_mut() {
            *x *= s.decay_factor;
        }
    }
    for i in 0..p.len() {
        let gi = g[i];
        let mi = s.lerp_weight.mul_add(gi - m[i], m[i]);
        let vi = (s.one_minus_beta2 * gi).mul_add(gi, v[i] * s.beta2);
        m[i] = mi;
        v[i] = vi;
        let denom = vi.sqrt() / s.bias_correction2_sqrt + s.eps;
        p[i] += (s.neg_step_size * mi) / denom;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn update_chunk_fma(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decay: bool, s: &AdamWScalars) {
    update_chunk_body(p, g, m, v, decay, s)
}

fn update_chunk(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decay: bool, s: &AdamWScalars) {
    #[cfg(target_arch = "x86_64")]
    if super::math::has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { update_chunk_fma(p, g, m, v, decay, s) };
    }
    update_chunk_body(p, g, m, v, decay, s)
}

fn sum_squares_f64(x: &[f32]) -> f64 {
    x.iter().map(|&v| (v as f64) * (v as f64)).sum()
}

/// Σ x² over all of `xs` in `f64`: one partial sum per chunk (chunks of each tensor in turn,
/// computed in parallel), the partial sums added in that order.
pub fn sum_squares(xs: &[&[f32]]) -> f64 {
    let chunks: Vec<&[f32]> = xs.iter().flat_map(|g| g.chunks(CHUNK)).collect();
    let partial: Vec<f64> = chunks.par_iter().map(|c| sum_squares_f64(c)).collect();
    partial.iter().sum::<f64>()
}

/// Multiplies every element of every tensor by `factor`, chunks in parallel.
pub fn scale_all(xs: &mut [&mut [f32]], factor: f32) {
    let mut chunks: Vec<&mut [f32]> = xs.iter_mut().flat_map(|g| g.chunks_mut(CHUNK)).collect();
    chunks
        .par_iter_mut()
        .for_each(|c| c.iter_mut().for_each(|x| *x *= factor));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_squares_adds_chunk_partials_in_order() {
        let a: Vec<f32> = (0..CHUNK + 5).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let b: Vec<f32> = (0..7).map(|i| i as f32 * 1e-3).collect();
        let partial = |x: &[f32]| x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
        let want = [partial(&a[..CHUNK]), partial(&a[CHUNK..]), partial(&b)]
            .iter()
            .sum::<f64>();
        assert_eq!(sum_squares(&[&a, &b]).to_bits(), want.to_bits());
        let (mut x, mut y) = (a.clone(), b.clone());
        scale_all(&mut [&mut x[..], &mut y[..]], 0.5);
        assert!(x.iter().zip(&a).all(|(s, o)| *s == o * 0.5) && y[6] == b[6] * 0.5);
    }
}
