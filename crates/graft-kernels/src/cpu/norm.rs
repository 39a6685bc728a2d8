//! RMSNorm forward and backward over rows of width `dim` (Llama/Qwen style: weight multiply, no
//! bias, no mean subtraction), used for the pre-attention, pre-MLP and final norms and for Qwen3's
//! per-head q/k norms.

use rayon::prelude::*;

const PAR_ROWS: usize = 64;

/// `y = x · rstd · w` per row, with `rstd = 1/sqrt(mean(x²) + eps)` stored for backward.
pub fn rmsnorm_forward(y: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], dim: usize, eps: f32) {
    let rows = x.len() / dim;
    assert_eq!(y.len(), rows * dim);
    assert_eq!(rstd.len(), rows);
    y.par_chunks_mut(dim * PAR_ROWS)
        .zip(rstd.par_chunks_mut(PAR_ROWS))
        .zip(x.par_chunks(dim * PAR_ROWS))
        .for_each(|((y, r), x)| {
            for ((y, r), x) in y.chunks_mut(dim).zip(r.iter_mut()).zip(x.chunks(dim)) {
                let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
                let s = 1.0 / ((ss / dim as f64) as f32 + eps).sqrt();
                *r = s;
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = w * (x * s);
                }
            }
        });
}

/// Recomputes the forward output from the saved `rstd` (used when activations are not kept).
pub fn rmsnorm_apply(y: &mut [f32], rstd: &[f32], x: &[f32], w: &[f32], dim: usize) {
    y.par_chunks_mut(dim * PAR_ROWS)
        .zip(rstd.par_chunks(PAR_ROWS))
        .zip(x.par_chunks(dim * PAR_ROWS))
        .for_each(|((y, r), x)| {
            for ((y, &s), x) in y.chunks_mut(dim).zip(r).zip(x.chunks(dim)) {
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = w * (x * s);
                }
            }
        });
}

/// Backward of [`rmsnorm_forward`]: `dx (+)= …`, and `dw += Σ_rows dy · x · rstd` when `dw` is given.
///
/// `dx = rstd · (w·dy) − x · rstd³ · mean(w·dy·x)`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dim: usize,
    accumulate: bool,
) {
    let rows = x.len() / dim;
    assert_eq!(dx.len(), rows * dim);
    dx.par_chunks_mut(dim * PAR_ROWS)
        .zip(dy.par_chunks(dim * PAR_ROWS))
        .zip(x.par_chunks(dim * PAR_ROWS))
        .zip(rstd.par_chunks(PAR_ROWS))
        .for_each(|(((dx, dy), x), r)| {
            for (((dx, dy), x), &s) in dx.chunks_mut(dim).zip(dy.chunks(dim)).zip(x.chunks(dim)).zip(r) {
                let dot: f64 = dy
                    .iter()
                    .zip(x)
                    .zip(w)
                    .map(|((&g, &x), &w)| (g * w) as f64 * x as f64)
                    .sum();
                let c = (dot / dim as f64) as f32 * s * s * s;
                for (((dx, &g), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                    let v = s * (g * w) - x * c;
                    if accumulate { *dx += v } else { *dx = v }
                }
            }
        });
    if let Some(dw) = dw {
        // Column sums: split the rows into fixed chunks (deterministic), then reduce in order.
        let chunk_rows = rows.div_ceil(16).max(1);
        let partials: Vec<Vec<f32>> = x
            .par_chunks(dim * chunk_rows)
            .zip(dy.par_chunks(dim * chunk_rows))
            .zip(rstd.par_chunks(chunk_rows))
            .map(|((x, dy), r)| {
                let mut acc = vec![0.0f32; dim];
                for ((x, dy), &s) in x.chunks(dim).zip(dy.chunks(dim)).zip(r) {
                    for ((a, &x), &g) in acc.iter_mut().zip(x).zip(dy) {
                        *a += g * x * s;
                    }
                }
                acc
            })
            .collect();
        for p in partials {
            for (d, v) in dw.iter_mut().zip(p) {
                *d += v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_matches_finite_differences() {
        let dim = 6;
        let x: Vec<f32> = (0..18).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + i as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..18).map(|i| ((i * 5 % 7) as f32 - 3.0) * 0.2).collect();
        let loss = |x: &[f32], w: &[f32]| {
            let mut y = vec![0.0; 18];
            let mut r = vec![0.0; 3];
            rmsnorm_forward(&mut y, &mut r, x, w, dim, 1e-5);
            y.iter()
                .zip(&dy)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum::<f64>()
        };
        let mut y = vec![0.0; 18];
        let mut r = vec![0.0; 3];
        rmsnorm_forward(&mut y, &mut r, &x, &w, dim, 1e-5);
        let mut dx = vec![0.0; 18];
        let mut dw = vec![0.0; dim];
        rmsnorm_backward(&mut dx, Some(&mut dw), &dy, &x, &w, &r, dim, false);
        let h = 1e-3;
        for i in 0..18 {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let num = (loss(&xp, &w) - loss(&xm, &w)) / (2.0 * h as f64);
            assert!((num - dx[i] as f64).abs() < 2e-3, "dx[{i}] {num} vs {}", dx[i]);
        }
        for i in 0..dim {
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[i] += h;
            wm[i] -= h;
            let num = (loss(&x, &wp) - loss(&x, &wm)) / (2.0 * h as f64);
            assert!((num - dw[i] as f64).abs() < 2e-3, "dw[{i}]");
        }
    }
}
