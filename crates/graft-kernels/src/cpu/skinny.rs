//! Products with a narrow output, `y[t×n] (+)= x[t×k] · w[k×n]` with `n ≤ 64` and many rows:
//! LoRA's down-projection `x · Aᵀ` in the forward pass and `dy · B` in the backward (n = rank).
//!
//! Through the tiled GEMM these pack (round, transpose, copy) the whole `t × k` activation for
//! a product a few dozen times smaller than the layer's own, and fill half of a 32-column tile
//! with zeros. Here each row of `x` is read once, in place: `w` (padded to whole 16-lane vectors,
//! at most 64 × 4 bytes a k-row) stays in L1, and a block of rows keeps its outputs in registers
//! while one broadcast of `x[i][p]` and one FMA per vector go by for each `p`. f32 throughout,
//! each output summed over `p` in order, so a row's result does not depend on `t`, the thread
//! count or the rows beside it.

/// Widest output this module takes.
pub const MAX_N: usize = 64;

/// Rows of `x` below which the caller's few-row paths are better than this one.
const MIN_ROWS: usize = 9;

/// Whether [`forward`] runs here: AVX-512 (F) on the CPU, `n ≤ MAX_N`, enough rows.
pub fn applies(t: usize, n: usize) -> bool {
    (1..=MAX_N).contains(&n) && t >= MIN_ROWS && super::math::has_avx512()
}

/// How the narrow weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `w[k×n]` row-major (LoRA's B `[out×r]` in `dy · B`).
    KByN,
    /// `w[n×k]` row-major, used transposed (LoRA's A `[r×in]` in `x · Aᵀ`).
    NByK,
}

/// `y[t×n] (+)= x[t×k] · w` (row-major f32; `w` is `k×n`, or `n×k` used transposed, per
/// `layout`). Callers check [`applies`] first.
///
/// # Panics
/// If the slices are shorter than their shapes, `n > MAX_N`, or the CPU lacks AVX-512.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    layout: WeightLayout,
    t: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    use rayon::prelude::*;
    assert!(
        n <= MAX_N && x.len() >= t * k && w.len() >= k * n && y.len() >= t * n,
        "skinny::forward: shapes"
    );
    assert!(super::math::has_avx512(), "skinny::forward without AVX-512");
    if t == 0 || n == 0 {
        return;
    }
    let nv = n.div_ceil(16);
    // w's k-rows padded to whole vectors (zeros past n), so the loop loads without masks.
    let mut wp = vec![0.0f32; k * nv * 16];
    for (p, dst) in wp.chunks_exact_mut(nv * 16).enumerate() {
        match layout {
            WeightLayout::KByN => dst[..n].copy_from_slice(&w[p * n..(p + 1) * n]),
            WeightLayout::NByK => dst[..n]
                .iter_mut()
                .enumerate()
                .for_each(|(j, v)| *v = w[j * k + p]),
        }
    }
    // Tasks of whole row blocks; about four per worker.
    let block = if nv <= 2 { 8 } else { 4 };
    let per_task = t
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .div_ceil(block)
        .max(1)
        * block;
    let run = |(ys, xs): (&mut [f32], &[f32])| {
        let rows = xs.len() / k.max(1);
        let mut r = 0;
        while r < rows {
            let m = block.min(rows - r);
            // SAFETY: rows r..r+m of xs (k each) and ys (n each) lie inside them; wp holds k
            // padded rows of nv vectors; the CPU has AVX-512 (asserted).
            unsafe {
                let (yr, xr) = (ys[r * n..].as_mut_ptr(), xs[r * k..].as_ptr());
                match nv {
                    1 => block_rows::<1, 8>(yr, xr, &wp, m, k, n, accumulate),
                    2 => block_rows::<2, 8>(yr, xr, &wp, m, k, n, accumulate),
                    3 => block_rows::<3, 4>(yr, xr, &wp, m, k, n, accumulate),
                    _ => block_rows::<4, 4>(yr, xr, &wp, m, k, n, accumulate),
                }
            }
            r += m;
        }
    };
    let (ys, xs) = (&mut y[..t * n], &x[..t * k]);
    if k == 0 {
        if !accumulate {
            ys.fill(0.0);
        }
        return;
    }
    if t * n * k >= 1 << 18 {
        ys.par_chunks_mut(per_task * n)
            .zip(xs.par_chunks(per_task * k))
            .for_each(run);
    } else {
        run((ys, xs));
    }
}

/// `m ≤ R` rows: `y[i][..n] (+)= Σ_p x[i][p] · wp[p]`, the `R × NV` accumulators in registers.
///
/// # Safety
/// `y` and `x` must hold `m` rows of `n` and `k` elements (row strides `n` and `k`); `wp` holds
/// `k` rows of `NV · 16`; `m ≤ R`, `n ≤ NV · 16`; the CPU must have avx512f.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_rows<const NV: usize, const R: usize>(
    y: *mut f32,
    x: *const f32,
    wp: &[f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    let w = wp.as_ptr();
    for p in 0..k {
        // SAFETY: k-row p of wp holds NV vectors (caller).
        let wv: [__m512; NV] = core::array::from_fn(|v| unsafe { _mm512_loadu_ps(w.add((p * NV + v) * 16)) });
        for (i, acc) in acc.iter_mut().enumerate().take(m) {
            // SAFETY: row i < m of x holds k elements (caller).
            let xv = _mm512_set1_ps(unsafe { *x.add(i * k + p) });
            for (a, &wv) in acc.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(xv, wv, *a);
            }
        }
    }
    for (i, acc) in acc.iter().enumerate().take(m) {
        for (v, a) in acc.iter().enumerate() {
            let lanes = n.saturating_sub(v * 16).min(16);
            if lanes == 0 {
                break;
            }
            let mask: __mmask16 = if lanes == 16 {
                0xffff
            } else {
                ((1u32 << lanes) - 1) as u16
            };
            // SAFETY: lanes < n of row i (caller); masked lanes untouched.
            unsafe {
                let dst = y.add(i * n + v * 16);
                let val = if accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), *a)
                } else {
                    *a
                };
                _mm512_mask_storeu_ps(dst, mask, val);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn block_rows<const NV: usize, const R: usize>(
    _: *mut f32,
    _: *const f32,
    _: &[f32],
    _: usize,
    _: usize,
    _: usize,
    _: bool,
) {
    unreachable!("skinny products need AVX-512")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_f64_and_is_row_invariant() {
        if !crate::cpu::math::has_avx512() {
            eprintln!("skipping: no AVX-512 on this CPU");
            return;
        }
        for &(t, k, n) in &[
            (9, 1, 1),
            (13, 7, 16),
            (50, 577, 8),
            (101, 64, 17),
            (300, 1536, 32),
            (37, 33, 48),
            (64, 100, 64),
        ] {
            let (x, w) = (vals(t * k, 1 + t as u64), vals(k * n, 2 + n as u64));
            for accumulate in [false, true] {
                let y0 = vals(t * n, 3);
                let mut y = y0.clone();
                forward(&mut y, &x, &w, WeightLayout::KByN, t, k, n, accumulate);
                // The same weight stored n × k gives the same bits.
                let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
                let mut yt = y0.clone();
                forward(&mut yt, &x, &wt, WeightLayout::NByK, t, k, n, accumulate);
                assert!(yt.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()));
                for i in 0..t {
                    for j in 0..n {
                        let dot: f64 = (0..k).map(|p| x[i * k + p] as f64 * w[p * n + j] as f64).sum();
                        let want = dot + if accumulate { y0[i * n + j] as f64 } else { 0.0 };
                        let got = y[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "t={t} k={k} n={n} ({i},{j}): {got} vs {want}"
                        );
                    }
                }
                // A row's bits do not depend on the rows multiplied with it.
                if t >= 2 * MIN_ROWS {
                    let mut part = vec![0.0f32; MIN_ROWS * n];
                    part.copy_from_slice(&y0[n..(1 + MIN_ROWS) * n]);
                    forward(
                        &mut part,
                        &x[k..],
                        &w,
                        WeightLayout::KByN,
                        MIN_ROWS,
                        k,
                        n,
                        accumulate,
                    );
                    assert!(part.iter().zip(&y[n..]).all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            }
        }
    }
}
