//! Matrix products of the training step in the three layouts it needs, in exact (f32) or fast
//! (bf16 inputs, f32 accumulation) precision.
//!
//! * forward `Y[t×out] = X[t×in] · Wᵀ` ([`linear_forward`]),
//! * input gradient `dX[t×in] = dY[t×out] · W` ([`linear_backward_input`]),
//! * weight gradient `dW[out×in] = dYᵀ · X` ([`linear_backward_weight`]).
//!
//! Exact mode uses the `gemm` crate; fast mode uses [`super::gemm_bf16`], which rounds inputs to
//! bf16 while packing, so activations never need a bf16 copy.

use super::gemm_bf16::{MatData, MatRef, gemm_bf16, has_avx512_bf16};
use half::bf16;

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
    pub fn effective(self) -> Precision {
        if self == Precision::Fast && has_avx512_bf16() {
            Precision::Fast
        } else {
            Precision::Exact
        }
    }
}

/// A linear layer's weight `[out, in]` (row-major), stored in f32 or bf16.
#[derive(Debug, Clone)]
pub struct Weight {
    pub data: WeightData,
    /// Output features (rows).
    pub rows: usize,
    /// Input features (columns).
    pub cols: usize,
}

/// Storage of a [`Weight`].
#[derive(Debug, Clone)]
pub enum WeightData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Weight {
    /// An f32 weight.
    pub fn f32(data: Vec<f32>, rows: usize, cols: usize) -> Weight {
        assert_eq!(data.len(), rows * cols, "weight length");
        Weight {
            data: WeightData::F32(data),
            rows,
            cols,
        }
    }

    /// A bf16 copy of `data` (round to nearest even).
    pub fn bf16_from_f32(data: &[f32], rows: usize, cols: usize) -> Weight {
        assert_eq!(data.len(), rows * cols, "weight length");
        Weight {
            data: WeightData::Bf16(to_bf16(data)),
            rows,
            cols,
        }
    }

    /// The f32 values (a copy when stored in bf16).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            WeightData::F32(v) => v.clone(),
            WeightData::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(v) => v.len() * 4,
            WeightData::Bf16(v) => v.len() * 2,
        }
    }

    fn view(&self, transposed: bool) -> View<'_> {
        let (rows, cols, rs, cs) = if transposed {
            (self.cols, self.rows, 1, self.cols)
        } else {
            (self.rows, self.cols, self.cols, 1)
        };
        match &self.data {
            WeightData::F32(v) => View {
                data: Src::F32(v),
                rows,
                cols,
                rs,
                cs,
            },
            WeightData::Bf16(v) => View {
                data: Src::Bf16(v),
                rows,
                cols,
                rs,
                cs,
            },
        }
    }
}

/// Converts to bf16 (round to nearest even), in parallel for large inputs.
pub fn to_bf16(data: &[f32]) -> Vec<bf16> {
    use rayon::prelude::*;
    let mut out = vec![bf16::ZERO; data.len()];
    out.par_chunks_mut(1 << 16)
        .zip(data.par_chunks(1 << 16))
        .for_each(|(o, i)| o.iter_mut().zip(i).for_each(|(o, &x)| *o = bf16::from_f32(x)));
    out
}

#[derive(Clone, Copy)]
enum Src<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

/// A strided matrix operand.
#[derive(Clone, Copy)]
struct View<'a> {
    data: Src<'a>,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    fn as_mat_ref(self) -> MatRef<'a> {
        MatRef {
            data: match self.data {
                Src::F32(d) => MatData::F32(d),
                Src::Bf16(d) => MatData::Bf16(d),
            },
            rows: self.rows,
            cols: self.cols,
            row_stride: self.rs,
            col_stride: self.cs,
        }
    }
    fn row_major(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View {
            data: Src::F32(data),
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    fn transposed(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        // `data` is row-major [rows, cols]; the view is its transpose [cols, rows].
        View {
            data: Src::F32(data),
            rows: cols,
            cols: rows,
            rs: 1,
            cs: cols,
        }
    }
}

/// `C[m×n] (+)= A · B`, C row-major with row stride `c_rs`.
fn matmul(c: &mut [f32], c_rs: usize, a: View, b: View, accumulate: bool, precision: Precision) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "matmul inner dimensions");
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * c_rs + n, "matmul output too small");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].fill(0.0);
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    match (precision.effective(), a.data, b.data) {
        (Precision::Exact, Src::F32(ad), Src::F32(bd)) => {
            let par = if m * n * k < 64 * 64 * 64 {
                gemm::Parallelism::None
            } else {
                gemm::Parallelism::Rayon(threads)
            };
            // SAFETY: the asserts above and the views' construction guarantee every index
            // `i*rs + j*cs` the kernel touches lies inside the slices; `c` is exclusively borrowed.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    c_rs as isize,
                    accumulate,
                    ad.as_ptr(),
                    a.cs as isize,
                    a.rs as isize,
                    bd.as_ptr(),
                    b.cs as isize,
                    b.rs as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        }
        (Precision::Exact, _, _) => {
            // bf16-stored operand in exact mode: widen it (only happens for frozen bf16 weights).
            let widen = |v: View<'_>| -> Vec<f32> {
                let mut out = vec![0.0f32; v.rows * v.cols];
                for i in 0..v.rows {
                    for j in 0..v.cols {
                        let idx = i * v.rs + j * v.cs;
                        out[i * v.cols + j] = match v.data {
                            Src::F32(d) => d[idx],
                            Src::Bf16(d) => d[idx].to_f32(),
                        };
                    }
                }
                out
            };
            let (aw, bw) = (widen(a), widen(b));
            matmul(
                c,
                c_rs,
                View::row_major(&aw, m, k),
                View::row_major(&bw, k, n),
                accumulate,
                Precision::Exact,
            );
        }
        (Precision::Fast, _, _) => {
            gemm_bf16(
                c,
                c_rs,
                a.as_mat_ref(),
                b.as_mat_ref(),
                1.0,
                if accumulate { 1.0 } else { 0.0 },
                threads,
            );
        }
    }
}

/// `y[t×out] (+)= x[t×in] · wᵀ`.
pub fn linear_forward(
    y: &mut [f32],
    x: &[f32],
    w: &Weight,
    t: usize,
    accumulate: bool,
    precision: Precision,
) {
    matmul(
        y,
        w.rows,
        View::row_major(x, t, w.cols),
        w.view(true),
        accumulate,
        precision,
    );
}

/// `dx[t×in] (+)= dy[t×out] · w`.
pub fn linear_backward_input(
    dx: &mut [f32],
    dy: &[f32],
    w: &Weight,
    t: usize,
    accumulate: bool,
    precision: Precision,
) {
    matmul(
        dx,
        w.cols,
        View::row_major(dy, t, w.rows),
        w.view(false),
        accumulate,
        precision,
    );
}

/// `dw[out×in] (+)= dy[t×out]ᵀ · x[t×in]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_weight(
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    t: usize,
    out: usize,
    inp: usize,
    accumulate: bool,
    precision: Precision,
) {
    matmul(
        dw,
        inp,
        View::transposed(dy, t, out),
        View::row_major(x, t, inp),
        accumulate,
        precision,
    );
}

/// Plain row-major product `c[m×n] (+)= a[m×k] · b[k×n]` (f32), for small helper products.
pub fn matmul_nn(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, accumulate: bool) {
    matmul(
        c,
        n,
        View::row_major(a, m, k),
        View::row_major(b, k, n),
        accumulate,
        Precision::Exact,
    );
}

/// Strided f32 product used by attention: `c (+)= alpha_scale · a · b` with explicit strides.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    c: &mut [f32],
    c_rs: usize,
    a: &[f32],
    a_rows: usize,
    a_cols: usize,
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_cols: usize,
    b_rs: usize,
    b_cs: usize,
    scale: f32,
    accumulate: bool,
) {
    let (m, k, n) = (a_rows, a_cols, b_cols);
    if m == 0 || n == 0 || k == 0 {
        if !accumulate && k == 0 {
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: callers pass strides describing sub-matrices inside `a`, `b` and `c`; the kernel
    // reads/writes only indices `i*rs + j*cs` within the stated dimensions.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum::<f64>() as f32;
            }
        }
        c
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn three_layouts_match_naive() {
        let (t, inp, out) = (37, 29, 23);
        let x = rand(t * inp, 1);
        let w = rand(out * inp, 2);
        let dy = rand(t * out, 3);
        let wt: Vec<f32> = (0..inp * out).map(|i| w[(i % out) * inp + i / out]).collect(); // [in, out]
        let weight = Weight::f32(w.clone(), out, inp);
        let mut y = vec![0.0; t * out];
        linear_forward(&mut y, &x, &weight, t, false, Precision::Exact);
        let want = naive(&x, &wt, t, inp, out);
        assert!(y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));
        let mut dx = vec![1.0; t * inp];
        linear_backward_input(&mut dx, &dy, &weight, t, true, Precision::Exact);
        let want = naive(&dy, &w, t, out, inp);
        assert!(dx.iter().zip(&want).all(|(a, b)| (a - 1.0 - b).abs() < 1e-5));
        let dyt: Vec<f32> = (0..out * t).map(|i| dy[(i % t) * out + i / t]).collect(); // [out, t]
        let mut dw = vec![0.0; out * inp];
        linear_backward_weight(&mut dw, &dy, &x, t, out, inp, false, Precision::Exact);
        let want = naive(&dyt, &x, out, t, inp);
        assert!(dw.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));
    }
}
