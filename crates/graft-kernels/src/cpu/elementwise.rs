//! Element-wise ops of the decoder: SwiGLU, residual adds, embedding lookup and bias.

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// `a = silu(g) · u`.
pub fn swiglu_forward(a: &mut [f32], g: &[f32], u: &[f32]) {
    a.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(u.par_chunks(CHUNK))
        .for_each(|((a, g), u)| super::math::swiglu_fwd(a, g, u));
}

/// Backward of [`swiglu_forward`]: `dg = da · u · σ(g)(1 + g(1 − σ(g)))`, `du = da · silu(g)`.
pub fn swiglu_backward(dg: &mut [f32], du: &mut [f32], da: &[f32], g: &[f32], u: &[f32]) {
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(da.par_chunks(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(((dg, du), da), (g, u))| super::math::swiglu_bwd(dg, du, da, g, u));
}

/// `y += x`.
pub fn add_inplace(y: &mut [f32], x: &[f32]) {
    assert_eq!(y.len(), x.len());
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y += x;
            }
        });
}

/// `y = a + b`.
pub fn add(y: &mut [f32], a: &[f32], b: &[f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .for_each(|((y, a), b)| {
            for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                *y = a + b;
            }
        });
}

/// `y += alpha · x`.
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y += alpha * x;
            }
        });
}

/// Adds `bias` (length `width`) to every row of `y`.
pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    let width = bias.len();
    y.par_chunks_mut(width * 64).for_each(|rows| {
        for row in rows.chunks_mut(width) {
            for (y, &b) in row.iter_mut().zip(bias) {
                *y += b;
            }
        }
    });
}

/// `db += Σ_rows dy` (deterministic: fixed row chunks reduced in order).
pub fn bias_backward(db: &mut [f32], dy: &[f32]) {
    let width = db.len();
    let rows = dy.len() / width;
    let chunk_rows = rows.div_ceil(16).max(1);
    let partials: Vec<Vec<f32>> = dy
        .par_chunks(width * chunk_rows)
        .map(|rows| {
            let mut acc = vec![0.0f32; width];
            for row in rows.chunks(width) {
                for (a, &g) in acc.iter_mut().zip(row) {
                    *a += g;
                }
            }
            acc
        })
        .collect();
    for p in partials {
        for (d, v) in db.iter_mut().zip(p) {
            *d += v;
        }
    }
}

/// Gathers embedding rows: `x[t] = table[ids[t]]`.
pub fn embedding_forward(x: &mut [f32], ids: &[u32], table: &[f32], dim: usize) {
    x.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(row, &id)| {
        let id = id as usize;
        row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    });
}

/// Scatters gradients back: `dtable[ids[t]] += dx[t]` (sequential, so deterministic).
pub fn embedding_backward(dtable: &mut [f32], dx: &[f32], ids: &[u32], dim: usize) {
    for (row, &id) in dx.chunks(dim).zip(ids) {
        let id = id as usize;
        for (d, &g) in dtable[id * dim..(id + 1) * dim].iter_mut().zip(row) {
            *d += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let g = [-2.0f32, -0.5, 0.0, 0.7, 3.0];
        let u = [0.3f32, -1.2, 2.0, 0.5, -0.7];
        let da = [1.0f32, 0.5, -0.3, 2.0, -1.0];
        let mut dg = [0.0; 5];
        let mut du = [0.0; 5];
        swiglu_backward(&mut dg, &mut du, &da, &g, &u);
        let f = |g: f32, u: f32| g * super::super::math::sigmoid_f32(g) * u;
        for i in 0..5 {
            let h = 1e-3;
            let ng = (f(g[i] + h, u[i]) - f(g[i] - h, u[i])) / (2.0 * h) * da[i];
            let nu = (f(g[i], u[i] + h) - f(g[i], u[i] - h)) / (2.0 * h) * da[i];
            assert!((ng - dg[i]).abs() < 1e-2 && (nu - du[i]).abs() < 1e-2, "{i}");
        }
    }
}
