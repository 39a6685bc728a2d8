//! Matrix products of the training step in the three layouts it needs, in exact (f32) or fast
//! (bf16 inputs, f32 accumulation) precision.
//!
//! * forward `Y[t×out] = X[t×in] · Wᵀ` ([`linear_forward`]),
//! * input gradient `dX[t×in] = dY[t×out] · W` ([`linear_backward_input`]),
//! * weight gradient `dW[out×in] = dYᵀ · X` ([`linear_backward_weight`]).
//!
//! A frozen weight may also be kept block-quantized ([`WeightData::Quant`], a GGUF base); its
//! forward and input-gradient products are in [`super::quant_matmul`].
//!
//! Exact mode uses the `gemm` crate; fast mode uses [`super::gemm_bf16`], which rounds inputs to
//! bf16 while packing, so activations never need a bf16 copy.

use super::gemm_bf16::{
    MatData, MatRef, PackedB, few_rows_match_gemm, gemm_bf16, gemm_bf16_cat, gemm_bf16_packed,
    gemm_bf16_rows_packed, has_avx512_bf16,
};
use super::math::has_avx2;
use super::quant_matmul;
use super::quant_packed::{self, InterleavedQuant};
use super::skinny;
use crate::quant::QuantTensor;
use crate::types::Precision;
use half::bf16;
use std::sync::Arc;

/// A linear layer's weight `[out, in]` (row-major), stored in f32, bf16 or ggml blocks.
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
    /// bf16 packed once into the GEMM's panels of `Wᵀ` for inference (see
    /// [`Weight::pack_for_inference`]): forward products read it with no per-call packing, and
    /// give a row the same bits whatever the row count. Backward products widen it (slow).
    Bf16Panels(Arc<PackedB>),
    /// Block-quantized (a frozen base read from GGUF): never updated, no weight gradient.
    Quant(QuantTensor),
    /// Block-quantized and re-laid for inference in groups of sixteen interleaved rows (see
    /// [`Weight::pack_for_inference`], [`super::quant_packed`]): the same values; decode products
    /// sixteen rows per instruction. Prompts and gradients dequantize it as they do the blocks.
    QuantInterleaved(Arc<InterleavedQuant>),
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

    /// A frozen weight kept in its ggml blocks.
    pub fn quantized(q: QuantTensor) -> Weight {
        Weight {
            rows: q.rows,
            cols: q.cols,
            data: WeightData::Quant(q),
        }
    }

    /// Lays a frozen weight out for fast-mode inference where this CPU has a faster layout: bf16
    /// into the GEMM's panels ([`WeightData::Bf16Panels`]) where it has the bf16 microkernel,
    /// ggml blocks into interleaved rows ([`WeightData::QuantInterleaved`]) where it has AVX-512
    /// VNNI; other weights, and other CPUs, keep what they hold. The same values in about the same
    /// bytes; fast forward products read it directly, anything else widens it (slow).
    pub fn pack_for_inference(&mut self) {
        match &self.data {
            WeightData::Bf16(v) if has_avx512_bf16() => {
                let view = MatRef::bf16_row_major(v, self.rows, self.cols).t();
                let packed = PackedB::new(view, rayon::current_num_threads());
                self.data = WeightData::Bf16Panels(Arc::new(packed));
            }
            WeightData::Quant(q) if quant_packed::available() => {
                if let Some(p) = InterleavedQuant::new(q) {
                    self.data = WeightData::QuantInterleaved(Arc::new(p));
                }
            }
            _ => {}
        }
    }

    /// The f32 values (a copy when stored in bf16; dequantized when block-quantized).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            WeightData::F32(v) => v.clone(),
            WeightData::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            WeightData::Bf16Panels(p) => (0..self.rows)
                .flat_map(|r| (0..self.cols).map(move |c| p.get(c, r)))
                .collect(),
            WeightData::Quant(q) => q.to_f32(),
            WeightData::QuantInterleaved(p) => p.to_f32(),
        }
    }

    /// Row `r` as f32 into `out` (`cols` values).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match &self.data {
            WeightData::F32(v) => out[..c].copy_from_slice(&v[r * c..(r + 1) * c]),
            WeightData::Bf16(v) => out[..c]
                .iter_mut()
                .zip(&v[r * c..(r + 1) * c])
                .for_each(|(o, s)| *o = s.to_f32()),
            WeightData::Bf16Panels(p) => out[..c]
                .iter_mut()
                .enumerate()
                .for_each(|(j, o)| *o = p.get(j, r)),
            WeightData::Quant(q) => q.dequantize_range(r, 0, c, out),
            WeightData::QuantInterleaved(p) => p.dequantize_range(r, 0, c, out),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(v) => v.len() * 4,
            WeightData::Bf16(v) => v.len() * 2,
            WeightData::Bf16Panels(p) => p.bytes(),
            WeightData::Quant(q) => q.bytes(),
            WeightData::QuantInterleaved(p) => p.bytes(),
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
            WeightData::Quant(_) | WeightData::QuantInterleaved(_) => {
                unreachable!("block-quantized weights take quant_matmul")
            }
            WeightData::Bf16Panels(_) => unreachable!("packed weights are widened before a view"),
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

/// Widens bf16 values to f32 (exact: the bits shifted), in parallel for large inputs.
pub fn widen_bf16(data: &[bf16]) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0.0f32; data.len()];
    out.par_chunks_mut(1 << 16)
        .zip(data.par_chunks(1 << 16))
        .for_each(|(o, i)| {
            o.iter_mut()
                .zip(i)
                .for_each(|(o, x)| *o = f32::from_bits((x.to_bits() as u32) << 16))
        });
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
    /// The same strides over `data` instead, where given (a widened copy of the same layout).
    fn with_data(self, data: Option<&'a [f32]>) -> View<'a> {
        match data {
            Some(d) => View {
                data: Src::F32(d),
                ..self
            },
            None => self,
        }
    }

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
            // A bf16-stored operand (a frozen bf16 weight) in exact mode: widened to f32 in its
            // own layout — one contiguous pass at memory speed, the strides kept — and the f32
            // operand used as it is.
            let widened = |v: &View<'_>| -> Option<Vec<f32>> {
                match v.data {
                    Src::F32(_) => None,
                    Src::Bf16(d) => Some(widen_bf16(d)),
                }
            };
            let (aw, bw) = (widened(&a), widened(&b));
            matmul(
                c,
                c_rs,
                a.with_data(aw.as_deref()),
                b.with_data(bw.as_deref()),
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
    if let WeightData::Quant(q) = &w.data {
        return quant_matmul::forward(y, x, q, t, accumulate, precision);
    }
    if let WeightData::QuantInterleaved(p) = &w.data {
        if t == 0 || w.rows == 0 {
            return;
        }
        // Fast mode: a few rows take the interleaved integer products (8-bit activations);
        // more rows the bf16 GEMM on dequantized tiles, or — on CPUs without a bf16 GEMM — the
        // integer products eight rows at a time.
        if precision == Precision::Fast && t <= GEMV_MAX_ROWS {
            return quant_packed::forward_rows(y, x, p, t, accumulate);
        }
        if precision == Precision::Fast && precision.effective() != Precision::Fast && !accumulate {
            return quant_packed::forward_in_decode_chunks(y, x, p, t);
        }
        return quant_matmul::forward_dequantizing(y, x, &**p, t, accumulate, precision);
    }
    // A weight packed for inference: a few rows stream its panels once, more rows take the GEMM
    // without packing it; both compute each row the same way (on AMX machines not: there
    // `linear_forward_grouped` keeps the two apart), so a row's result does not depend on the row
    // count (on the requests batched with it).
    if let WeightData::Bf16Panels(p) = &w.data {
        let beta = if accumulate { 1.0 } else { 0.0 };
        if !gemm_bf16_rows_packed(y, x, p, t, 1.0, beta) {
            let threads = rayon::current_num_threads();
            gemm_bf16_packed(
                y,
                w.rows,
                MatRef::f32_row_major(x, t, w.cols),
                p,
                1.0,
                beta,
                threads,
            );
        }
        return;
    }
    // Decode: a few rows against bf16 weights is a matrix-vector product bound by reading the
    // weights once; the tiled GEMM would pack (copy) the whole weight for each call. (Its sums
    // run in another order than the GEMM's: weights packed for inference avoid that.)
    if let WeightData::Bf16(wd) = &w.data
        && (1..=GEMV_MAX_ROWS).contains(&t)
        && precision == Precision::Fast
    {
        gemv_bf16(y, x, wd, w.rows, w.cols, t, accumulate);
        return;
    }
    // Small f32 weights (LoRA's factors: rank × hidden and hidden × rank) run without the tiled
    // GEMM, whose setup costs more than the product for a few rows.
    if let WeightData::F32(wd) = &w.data
        && w.rows * w.cols <= SMALL_F32_GEMV
        && (1..=GEMV_MAX_ROWS).contains(&t)
    {
        rowwise_f32_forward(y, x, wd, w.rows, w.cols, t, accumulate);
        return;
    }
    // Narrow f32 weights (LoRA's down-projection A, rank × hidden) for many rows: each row of x
    // read once in place, instead of packing all of x for a product of a few dozen columns.
    if let WeightData::F32(wd) = &w.data
        && skinny::applies(t, w.rows)
    {
        skinny::forward(
            y,
            x,
            wd,
            skinny::WeightLayout::NByK,
            t,
            w.cols,
            w.rows,
            accumulate,
        );
        return;
    }
    matmul(
        y,
        w.rows,
        View::row_major(x, t, w.cols),
        w.view(true),
        accumulate,
        precision,
    );
}

/// Whether a product with `w` and a LoRA factor `f` can run as one [`gemm_bf16_cat`]: fast
/// precision on a CPU with the bf16 GEMM, weights stored as f32 or bf16, and more rows than the
/// few-row products take.
fn lora_fusable(w: &Weight, f: &Weight, t: usize, precision: Precision) -> bool {
    let plain = |w: &Weight| matches!(w.data, WeightData::F32(_) | WeightData::Bf16(_));
    precision.effective() == Precision::Fast && t > GEMV_MAX_ROWS && plain(w) && plain(f)
}

/// `y[t×out] (+)= x · wᵀ + xa · bᵀ`: a linear layer and its LoRA up-projection (`xa` `[t×r]`,
/// the scaled down-projection; `b` `[out×r]`) as one product over the concatenated k where
/// [`lora_fusable`], so `y` is written once instead of being read back to add the side product;
/// otherwise two products.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward_lora(
    y: &mut [f32],
    x: &[f32],
    w: &Weight,
    xa: &[f32],
    b: &Weight,
    t: usize,
    accumulate: bool,
    precision: Precision,
) {
    assert_eq!(
        w.rows, b.rows,
        "linear_forward_lora: W and B have different outputs"
    );
    if !lora_fusable(w, b, t, precision) {
        linear_forward(y, x, w, t, accumulate, precision);
        linear_forward(y, xa, b, t, true, precision);
        return;
    }
    gemm_bf16_cat(
        y,
        w.rows,
        (
            View::row_major(x, t, w.cols).as_mat_ref(),
            View::row_major(xa, t, b.cols).as_mat_ref(),
        ),
        (w.view(true).as_mat_ref(), b.view(true).as_mat_ref()),
        1.0,
        if accumulate { 1.0 } else { 0.0 },
        rayon::current_num_threads(),
    );
}

/// `y[t×out] = x · wᵀ` for rows in consecutive `groups` (one per sequence), each row computed as
/// its group alone would be. Weights with a few-row path (≤ [`GEMV_MAX_ROWS`]: block-quantized
/// ones, bf16 ones in fast mode where they are not packed — CPUs without bf16 dot products — and
/// small f32 ones) round differently there than in the GEMM, so the rows of small groups (decode
/// steps, short prompts) are multiplied a few at a time — each row's few-row result does not
/// depend on the others — and the rows of large groups together through the GEMM, whose rows do
/// not depend on each other either. Packed bf16 is invariant already and takes one product.
pub fn linear_forward_grouped(y: &mut [f32], x: &[f32], w: &Weight, groups: &[usize], precision: Precision) {
    let t: usize = groups.iter().sum();
    let few = |g: &usize| (1..=GEMV_MAX_ROWS).contains(g);
    // Where a few rows take another kernel than many (the GEMV paths of `linear_forward`), the
    // small groups are multiplied apart from the large ones; packed weights give a row the same
    // bits at any row count, except where the GEMM runs on AMX tiles.
    let row_count_matters = match &w.data {
        WeightData::Quant(_) | WeightData::QuantInterleaved(_) => true,
        WeightData::Bf16(_) => precision == Precision::Fast,
        WeightData::F32(_) => w.rows * w.cols <= SMALL_F32_GEMV,
        WeightData::Bf16Panels(_) => !few_rows_match_gemm(),
    };
    if let WeightData::Quant(q) = &w.data
        && t > GEMV_MAX_ROWS
        && quant_matmul::prompts_in_decode_chunks(q, precision)
    {
        // Every row as a decode step computes it: invariant by construction.
        return quant_matmul::forward_in_decode_chunks(y, x, q, t);
    }
    if let WeightData::QuantInterleaved(p) = &w.data
        && t > GEMV_MAX_ROWS
        && precision == Precision::Fast
        && precision.effective() != Precision::Fast
    {
        // As above: the interleaved products eight rows at a time.
        return quant_packed::forward_in_decode_chunks(y, x, p, t);
    }
    if !row_count_matters || t <= GEMV_MAX_ROWS || groups.iter().all(|g| !few(g)) {
        return linear_forward(y, x, w, t, false, precision);
    }
    let (inp, out) = (w.cols, w.rows);
    // Row indices of the small groups and of the large ones.
    let (mut small, mut large) = (Vec::new(), Vec::new());
    let mut row = 0;
    for g in groups {
        let rows = row..row + g;
        if few(g) {
            small.extend(rows)
        } else {
            large.extend(rows)
        }
        row += g;
    }
    let mut run = |rows: &[usize]| {
        let n = rows.len();
        let mut xs = vec![0.0f32; n * inp];
        for (i, &r) in rows.iter().enumerate() {
            xs[i * inp..(i + 1) * inp].copy_from_slice(&x[r * inp..(r + 1) * inp]);
        }
        let mut ys = vec![0.0f32; n * out];
        linear_forward(&mut ys, &xs, w, n, false, precision);
        for (i, &r) in rows.iter().enumerate() {
            y[r * out..(r + 1) * out].copy_from_slice(&ys[i * out..(i + 1) * out]);
        }
    };
    for chunk in small.chunks(GEMV_MAX_ROWS) {
        run(chunk);
    }
    if !large.is_empty() {
        run(&large);
    }
}

/// `y[t×out] += scale · (x[t×in] · Aᵀ) · Bᵀ`: a LoRA adapter's side product at inference (`a`
/// is `[r, in]`, `b` `[out, r]`), in f32, each row computed on its own — a row's result does not
/// depend on how many rows are multiplied with it, so the requests a server batches together
/// cannot change each other's outputs. Factors not stored as f32 are widened first.
pub fn lora_forward_rows(y: &mut [f32], x: &[f32], a: &Weight, b: &Weight, scale: f32, t: usize) {
    let (r, inp, out) = (a.rows, a.cols, b.rows);
    assert!(
        b.cols == r && x.len() >= t * inp && y.len() >= t * out,
        "lora_forward_rows: shapes"
    );
    fn f32_data(w: &Weight) -> std::borrow::Cow<'_, [f32]> {
        match &w.data {
            WeightData::F32(v) => std::borrow::Cow::Borrowed(v.as_slice()),
            _ => std::borrow::Cow::Owned(w.to_f32()),
        }
    }
    let (ad, bd) = (f32_data(a), f32_data(b));
    let mut xa = vec![0.0f32; t * r];
    rowwise_f32_forward(&mut xa, x, &ad, r, inp, t, false);
    xa.iter_mut().for_each(|v| *v *= scale);
    rowwise_f32_forward(y, &xa, &bd, out, r, t, true);
}

/// Rows up to which [`linear_forward`] on bf16 weights runs as matrix-vector products.
pub const GEMV_MAX_ROWS: usize = 8;

/// f32 weights up to this many elements run few-row products on one thread, without the GEMM.
const SMALL_F32_GEMV: usize = 1 << 16;

/// `y[t×out] (+)= x[t×inp] · wᵀ` for a small f32 weight, each row on its own (the same arithmetic
/// for any `t`), parallel over rows when there are many.
fn rowwise_f32_forward(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    out: usize,
    inp: usize,
    t: usize,
    accumulate: bool,
) {
    use rayon::prelude::*;
    if t == 0 || out == 0 {
        return;
    }
    // Short rows (LoRA's B: hidden × rank): y_m += Σ_j x_m[j] · column j, columns contiguous
    // after one transpose, so each step is a long vector update.
    let cols: Vec<f32> = if inp <= 64 {
        let mut cols = vec![0.0f32; inp * out];
        for n in 0..out {
            for j in 0..inp {
                cols[j * out + n] = w[n * inp + j];
            }
        }
        cols
    } else {
        Vec::new()
    };
    let row = |(ym, xm): (&mut [f32], &[f32])| {
        if inp <= 64 {
            if !accumulate {
                ym.fill(0.0);
            }
            for j in 0..inp {
                axpy_f32(ym, xm[j], &cols[j * out..(j + 1) * out]);
            }
        } else {
            for (n, dst) in ym.iter_mut().enumerate() {
                let v = dot_f32(xm, &w[n * inp..(n + 1) * inp]);
                *dst = if accumulate { *dst + v } else { v };
            }
        }
    };
    let (ys, xs) = (&mut y[..t * out], &x[..t * inp]);
    if t * out * inp >= 1 << 20 {
        ys.par_chunks_mut(out).zip(xs.par_chunks(inp)).for_each(row);
    } else {
        ys.chunks_mut(out).zip(xs.chunks(inp)).for_each(row);
    }
}

/// `y += a · x` (vectorised by the compiler).
fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { axpy_f32_avx512(y, a, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { axpy_f32_avx2(y, a, x) };
    }
    axpy_f32_body(y, a, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_f32_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_f32_body(y, a, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
unsafe fn axpy_f32_avx512(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_f32_body(y, a, x)
}

#[inline(always)]
pub(super) fn axpy_f32_body(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = a.mul_add(x, *y);
    }
}

/// `Σ x[i] · w[i]` in f32 with 16 partial sums (vectorised by the compiler).
fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { dot_f32_avx512(x, w) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { dot_f32_avx2(x, w) };
    }
    dot_f32_body(x, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(x: &[f32], w: &[f32]) -> f32 {
    dot_f32_body(x, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
unsafe fn dot_f32_avx512(x: &[f32], w: &[f32]) -> f32 {
    dot_f32_body(x, w)
}

#[inline(always)]
pub(super) fn dot_f32_body(x: &[f32], w: &[f32]) -> f32 {
    const L: usize = 16;
    let n = x.len().min(w.len());
    let mut acc = [0.0f32; L];
    let (xc, wc) = (x[..n].chunks_exact(L), w[..n].chunks_exact(L));
    let (xt, wt) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        for j in 0..L {
            acc[j] = a[j].mul_add(b[j], acc[j]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in xt.iter().zip(wt) {
        s += a * b;
    }
    s
}

/// `y[t×out] (+)= bf16(x)[t×in] · wᵀ` for a few rows `t`, parallel over output rows: each
/// weight row is read once for all `t` inputs. Inputs are rounded to bf16 as the bf16 GEMM
/// rounds them, products accumulate in f32.
fn gemv_bf16(y: &mut [f32], x: &[f32], w: &[bf16], out: usize, inp: usize, t: usize, accumulate: bool) {
    use rayon::prelude::*;
    // With bf16 dot products the inputs are rounded as the bf16 GEMM rounds them; elsewhere the
    // f32 inputs meet the widened weights.
    let bf16_dot = has_avx512_bf16();
    let xr: Vec<bf16> = if bf16_dot {
        x[..t * inp].iter().map(|&v| bf16::from_f32(v)).collect()
    } else {
        Vec::new()
    };
    let threads = rayon::current_num_threads().max(1);
    let block = out.div_ceil(threads * 4).max(16);
    // Results per output block, row-major [rows of block][t], then scattered into y.
    let parts: Vec<(usize, Vec<f32>)> = (0..out.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let (n0, n1) = (b * block, ((b + 1) * block).min(out));
            let mut acc = vec![0.0f32; (n1 - n0) * t];
            for n in n0..n1 {
                let row = &w[n * inp..(n + 1) * inp];
                let dst = &mut acc[(n - n0) * t..(n - n0 + 1) * t];
                if bf16_dot {
                    gemv_row(&xr, inp, t, row, dst);
                } else {
                    gemv_row_f32_inputs(&x[..t * inp], inp, t, row, dst);
                }
            }
            (n0, acc)
        })
        .collect();
    for (n0, acc) in parts {
        let rows = acc.len() / t;
        for r in 0..rows {
            for m in 0..t {
                let dst = &mut y[m * out + n0 + r];
                let v = acc[r * t + m];
                *dst = if accumulate { *dst + v } else { v };
            }
        }
    }
}

/// `out[m] = Σ_k x[m·inp + k] · row[k]` for the `t` bf16 input rows: each 32-value chunk of the
/// weight row meets all `t` rows in one `vdpbf16ps` each (products exact in f32, as the GEMM's).
fn gemv_row(x: &[bf16], inp: usize, t: usize, row: &[bf16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU supports the features the functions are compiled for; `x` holds
        // `t · inp` values, `row` `inp`, `out` `t` (checked by the callers' slicing).
        unsafe {
            match t {
                1 => return gemv_row_avx512::<1>(x, inp, row, out),
                2 => return gemv_row_avx512::<2>(x, inp, row, out),
                3 => return gemv_row_avx512::<3>(x, inp, row, out),
                4 => return gemv_row_avx512::<4>(x, inp, row, out),
                5 => return gemv_row_avx512::<5>(x, inp, row, out),
                6 => return gemv_row_avx512::<6>(x, inp, row, out),
                7 => return gemv_row_avx512::<7>(x, inp, row, out),
                8 => return gemv_row_avx512::<8>(x, inp, row, out),
                _ => {}
            }
        }
    }
    for m in 0..t {
        out[m] = x[m * inp..(m + 1) * inp]
            .iter()
            .zip(row)
            .map(|(a, b)| a.to_f32() * b.to_f32())
            .sum();
    }
}

/// `out[m] = Σ_k x[m·inp + k] · row[k]` for `t` f32 input rows and a bf16 weight row, on CPUs
/// without bf16 dot products: AVX2 widens eight weights at a time (a shift) and meets every row
/// in one FMA each. Up to four input rows per pass over the weight row (which stays in L1), each
/// row with the same two accumulator chains whatever `t` is, so that a row's result does not
/// depend on the rows multiplied with it.
fn gemv_row_f32_inputs(x: &[f32], inp: usize, t: usize, row: &[bf16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let mut m0 = 0;
        while m0 < t {
            let (xs, o) = (&x[m0 * inp..t * inp], &mut out[m0..t]);
            // SAFETY: the CPU has avx2 and fma; `xs` holds `(t − m0) · inp` values, `row` `inp`,
            // `o` `t − m0` (checked inside).
            unsafe {
                match t - m0 {
                    1 => gemv_row_avx2::<1, 2>(xs, inp, row, o),
                    2 => gemv_row_avx2::<2, 2>(xs, inp, row, o),
                    3 => gemv_row_avx2::<3, 2>(xs, inp, row, o),
                    _ => gemv_row_avx2::<4, 2>(xs, inp, row, o),
                }
            }
            m0 += 4;
        }
        return;
    }
    for m in 0..t {
        out[m] = x[m * inp..(m + 1) * inp]
            .iter()
            .zip(row)
            .map(|(a, b)| a * b.to_f32())
            .sum();
    }
}

/// [`gemv_row_f32_inputs`] for `T` rows, `U` chunks of eight weights per step (independent FMA
/// chains: `T · U` accumulators, plus the `U` weight vectors, in registers).
///
/// # Safety
/// The CPU must have avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_row_avx2<const T: usize, const U: usize>(
    x: &[f32],
    inp: usize,
    row: &[bf16],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(x.len() >= T * inp && row.len() >= inp && out.len() >= T);
    let mut acc = [[_mm256_setzero_ps(); U]; T];
    let step = 8 * U;
    let whole = inp / step * step;
    let mut k = 0;
    while k < whole {
        for u in 0..U {
            // SAFETY: k + 8u + 8 <= whole <= inp: the loads stay inside `row` and each input row.
            unsafe {
                let bits = _mm_loadu_si128(row.as_ptr().add(k + 8 * u) as *const __m128i);
                let wv = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)));
                for (m, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(m * inp + k + 8 * u));
                    a[u] = _mm256_fmadd_ps(xv, wv, a[u]);
                }
            }
        }
        k += step;
    }
    for (m, a) in acc.iter().enumerate() {
        let mut v = a[0];
        for au in &a[1..] {
            v = _mm256_add_ps(v, *au);
        }
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let mut s = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
        for kk in whole..inp {
            s += x[m * inp + kk] * row[kk].to_f32();
        }
        out[m] = s;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512bf16")]
unsafe fn gemv_row_avx512<const T: usize>(x: &[bf16], inp: usize, row: &[bf16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(x.len() >= T * inp && row.len() >= inp && out.len() >= T);
    let bh = |v: __m512i| -> __m512bh {
        // SAFETY: both are 512-bit plain-data vector types; every bit pattern is valid.
        unsafe { core::mem::transmute::<__m512i, __m512bh>(v) }
    };
    let mut acc = [_mm512_setzero_ps(); T];
    let n32 = inp / 32 * 32;
    let mut k = 0;
    while k < n32 {
        // SAFETY: k + 32 <= inp, so the loads stay inside `row` and each input row.
        unsafe {
            let w = bh(_mm512_loadu_si512(row.as_ptr().add(k) as *const __m512i));
            for (m, a) in acc.iter_mut().enumerate() {
                let xv = bh(_mm512_loadu_si512(x.as_ptr().add(m * inp + k) as *const __m512i));
                *a = _mm512_dpbf16_ps(*a, xv, w);
            }
        }
        k += 32;
    }
    for (m, a) in acc.iter().enumerate() {
        let mut s = _mm512_reduce_add_ps(*a);
        for kk in n32..inp {
            s += x[m * inp + kk].to_f32() * row[kk].to_f32();
        }
        out[m] = s;
    }
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
    if let WeightData::Quant(q) = &w.data {
        return quant_matmul::backward_input(dx, dy, q, t, accumulate, precision);
    }
    if let WeightData::QuantInterleaved(p) = &w.data {
        return quant_matmul::backward_input(dx, dy, &**p, t, accumulate, precision);
    }
    if let WeightData::Bf16Panels(_) = &w.data {
        // Packed for inference; a gradient through it is rare (a reward model scored in place).
        let widened = Weight::f32(w.to_f32(), w.rows, w.cols);
        return linear_backward_input(dx, dy, &widened, t, accumulate, precision);
    }
    // Narrow inputs (LoRA's up-projection B, hidden × rank): `dy · B` as in `linear_forward`.
    if let WeightData::F32(wd) = &w.data
        && skinny::applies(t, w.cols)
    {
        skinny::forward(
            dx,
            dy,
            wd,
            skinny::WeightLayout::KByN,
            t,
            w.rows,
            w.cols,
            accumulate,
        );
        return;
    }
    matmul(
        dx,
        w.cols,
        View::row_major(dy, t, w.rows),
        w.view(false),
        accumulate,
        precision,
    );
}

/// `dx[t×in] (+)= dy[t×out] · w + dxa[t×r] · a`: a linear layer's input gradient and its LoRA
/// down-projection's (`a` `[r×in]`, `dxa` the gradient at its output) as one product over the
/// concatenated k where [`lora_fusable`] (`dx` written once); otherwise two products.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_input_lora(
    dx: &mut [f32],
    dy: &[f32],
    w: &Weight,
    dxa: &[f32],
    a: &Weight,
    t: usize,
    accumulate: bool,
    precision: Precision,
) {
    assert_eq!(
        w.cols, a.cols,
        "linear_backward_input_lora: W and A have different inputs"
    );
    if !lora_fusable(w, a, t, precision) {
        linear_backward_input(dx, dy, w, t, accumulate, precision);
        linear_backward_input(dx, dxa, a, t, true, precision);
        return;
    }
    gemm_bf16_cat(
        dx,
        w.cols,
        (
            View::row_major(dy, t, w.rows).as_mat_ref(),
            View::row_major(dxa, t, a.rows).as_mat_ref(),
        ),
        (w.view(false).as_mat_ref(), a.view(false).as_mat_ref()),
        1.0,
        if accumulate { 1.0 } else { 0.0 },
        rayon::current_num_threads(),
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

    /// The fused LoRA products ([`linear_forward_lora`], [`linear_backward_input_lora`]) against
    /// the two products they replace, in both precisions, on rows above and below the few-row
    /// limit, with and without accumulation; bf16-stored and f32 base weights.
    #[test]
    fn fused_lora_products_match_the_two_products() {
        // Values exact in bf16: the fused product rounds its inputs to bf16 in fast mode,
        // while a narrow second product (n ≤ 64: `skinny`) multiplies f32 as given.
        let val = |n: usize, m: usize, s: f32| -> Vec<f32> {
            (0..n)
                .map(|i| bf16::from_f32(((i * m % 97) as f32 - 48.0) * s).to_f32())
                .collect()
        };
        for &(t, inp, out, r) in &[
            (40usize, 96usize, 70usize, 16usize),
            (5, 64, 33, 8),
            (130, 58, 200, 4),
        ] {
            let x = val(t * inp, 29, 0.02);
            let xa = val(t * r, 31, 0.03);
            let dy = val(t * out, 37, 0.01);
            let dxa = val(t * r, 41, 0.02);
            let wf = val(out * inp, 13, 0.01);
            let a = Weight::f32(val(r * inp, 17, 0.02), r, inp);
            let b = Weight::f32(val(out * r, 19, 0.02), out, r);
            for w in [
                Weight::f32(wf.clone(), out, inp),
                Weight::bf16_from_f32(&wf, out, inp),
            ] {
                for p in [Precision::Exact, Precision::Fast] {
                    for acc in [false, true] {
                        let tol = 2e-3;
                        let close = |got: &[f32], want: &[f32]| {
                            for (g, w) in got.iter().zip(want) {
                                assert!(
                                    (g - w).abs() <= tol * (1.0 + w.abs()),
                                    "{g} vs {w} ({t} rows, {p:?})"
                                );
                            }
                        };
                        let mut want = vec![0.5f32; t * out];
                        linear_forward(&mut want, &x, &w, t, acc, p);
                        linear_forward(&mut want, &xa, &b, t, true, p);
                        let mut got = vec![0.5f32; t * out];
                        linear_forward_lora(&mut got, &x, &w, &xa, &b, t, acc, p);
                        close(&got, &want);
                        let mut want = vec![0.5f32; t * inp];
                        linear_backward_input(&mut want, &dy, &w, t, acc, p);
                        linear_backward_input(&mut want, &dxa, &a, t, true, p);
                        let mut got = vec![0.5f32; t * inp];
                        linear_backward_input_lora(&mut got, &dy, &w, &dxa, &a, t, acc, p);
                        close(&got, &want);
                    }
                }
            }
        }
    }

    #[test]
    fn few_row_small_f32_products_match_the_naive_product() {
        // LoRA's factors at decode: rank × hidden (long rows) and hidden × rank (short rows).
        for &(t, inp, out) in &[
            (1usize, 576usize, 16usize),
            (8, 16, 576),
            (3, 17, 33),
            (5, 100, 7),
        ] {
            let x: Vec<f32> = (0..t * inp)
                .map(|i| ((i * 29 % 83) as f32 - 41.0) * 0.017)
                .collect();
            let wf: Vec<f32> = (0..out * inp)
                .map(|i| ((i * 13 % 71) as f32 - 35.0) * 0.023)
                .collect();
            let w = Weight::f32(wf.clone(), out, inp);
            for accumulate in [false, true] {
                let mut y = vec![0.25f32; t * out];
                linear_forward(&mut y, &x, &w, t, accumulate, Precision::Exact);
                for m in 0..t {
                    for n in 0..out {
                        let want: f64 = (0..inp)
                            .map(|k| x[m * inp + k] as f64 * wf[n * inp + k] as f64)
                            .sum::<f64>()
                            + if accumulate { 0.25 } else { 0.0 };
                        let got = y[m * out + n] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "t {t} [{m}][{n}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_how_many_rows_share_the_product() {
        // The generation core batches requests; a request's output must not change with the
        // batch: each row gives the same bits alone, in a few-row batch and in a tall one — for
        // bf16 weights packed for inference (the decode product and the tiled GEMM agree) and
        // for LoRA's side product at inference.
        let (t, inp, out, r) = (21usize, 577usize, 70usize, 16usize);
        let x: Vec<f32> = (0..t * inp)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.011)
            .collect();
        let wf: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 19 % 83) as f32 - 41.0) * 0.019)
            .collect();
        let lora_a = Weight::f32(
            (0..r * inp)
                .map(|i| ((i * 7 % 61) as f32 - 30.0) * 0.02)
                .collect(),
            r,
            inp,
        );
        let lora_b = Weight::f32(
            (0..out * r)
                .map(|i| ((i * 5 % 23) as f32 - 11.0) * 0.05)
                .collect(),
            out,
            r,
        );
        let packed = has_avx512_bf16().then(|| {
            let mut w = Weight::bf16_from_f32(&wf, out, inp);
            w.pack_for_inference();
            assert!(matches!(w.data, WeightData::Bf16Panels(_)));
            assert_eq!(
                w.to_f32(),
                Weight::bf16_from_f32(&wf, out, inp).to_f32(),
                "packing keeps the values"
            );
            w
        });
        if packed.is_none() {
            eprintln!("bf16 case skipped: no avx512_bf16 on this CPU (fast mode runs exact)");
        }
        let product = |x: &[f32], rows: usize| {
            let mut y = vec![0.5f32; rows * out];
            if let Some(w) = &packed {
                // One row per request, as the server batches decode steps.
                linear_forward_grouped(&mut y, x, w, &vec![1; rows], Precision::Fast);
            }
            lora_forward_rows(&mut y, x, &lora_a, &lora_b, 0.5, rows);
            y
        };
        let all = product(&x, t);
        for chunk in [1usize, 3, 8] {
            for r0 in (0..t).step_by(chunk) {
                let rows = chunk.min(t - r0);
                let y = product(&x[r0 * inp..(r0 + rows) * inp], rows);
                let same = y
                    .iter()
                    .zip(&all[r0 * out..])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "rows {r0}.. in chunks of {chunk}");
            }
        }
        // And the LoRA product is the product.
        let (ad, bd) = (lora_a.to_f32(), lora_b.to_f32());
        let mut y = vec![0.0f32; t * out];
        lora_forward_rows(&mut y, &x, &lora_a, &lora_b, 0.5, t);
        for m in [0, t - 1] {
            for n in [0, out - 1] {
                let want: f64 = (0..r)
                    .map(|j| {
                        let xa: f64 = (0..inp)
                            .map(|k| x[m * inp + k] as f64 * ad[j * inp + k] as f64)
                            .sum();
                        0.5 * xa * bd[n * r + j] as f64
                    })
                    .sum();
                assert!(
                    (y[m * out + n] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "lora [{m}][{n}]"
                );
            }
        }
    }

    #[test]
    fn few_row_products_do_not_depend_on_the_row_count() {
        // What batching independent requests relies on: row m of a t-row product has the same
        // bits for every t the few-row paths take (bf16 and block-quantized weights, fast mode).
        use super::super::quant_matmul::tests::random_blocks;
        use crate::quant::QuantType;
        let (inp, out) = (512usize, 37usize);
        let wf: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 17 % 89) as f32 - 44.0) * 0.021)
            .collect();
        let weights = [
            Weight::bf16_from_f32(&wf, out, inp),
            Weight::quantized(random_blocks(QuantType::Q8_0, out, inp, 3)),
            Weight::quantized(random_blocks(QuantType::Q5_0, out, inp, 4)),
            Weight::quantized(random_blocks(QuantType::Q4_K, out, inp, 5)),
        ];
        let x: Vec<f32> = (0..GEMV_MAX_ROWS * inp)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.013)
            .collect();
        for w in &weights {
            let mut one = vec![0.0f32; GEMV_MAX_ROWS * out];
            for m in 0..GEMV_MAX_ROWS {
                linear_forward(&mut one[m * out..], &x[m * inp..], w, 1, false, Precision::Fast);
            }
            for t in 2..=GEMV_MAX_ROWS {
                let mut y = vec![0.0f32; t * out];
                linear_forward(&mut y, &x, w, t, false, Precision::Fast);
                let same = y.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{:?}: {t} rows differ from one at a time",
                    std::mem::discriminant(&w.data)
                );
            }
        }
    }

    #[test]
    fn few_row_bf16_products_match_the_exact_product_of_the_rounded_inputs() {
        // The decode path (matrix-vector products) against f32 products of the same bf16-rounded
        // inputs, on odd shapes, with and without accumulation.
        for &(t, inp, out) in &[
            (1usize, 577usize, 131usize),
            (3, 64, 49),
            (8, 33, 1000),
            (5, 16, 7),
            (2, 100, 9),
        ] {
            let x: Vec<f32> = (0..t * inp)
                .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.013)
                .collect();
            let wf: Vec<f32> = (0..out * inp)
                .map(|i| ((i * 17 % 89) as f32 - 44.0) * 0.021)
                .collect();
            let w = Weight::bf16_from_f32(&wf, out, inp);
            let wr = w.to_f32();
            // Inputs are rounded to bf16 only where the CPU has the bf16 path; elsewhere fast
            // precision is the exact f32 product with the widened weights.
            let bf16_path = Precision::Fast.effective() == Precision::Fast;
            let xr: Vec<f32> = x
                .iter()
                .map(|&v| if bf16_path { bf16::from_f32(v).to_f32() } else { v })
                .collect();
            for accumulate in [false, true] {
                let mut y = vec![0.5f32; t * out];
                linear_forward(&mut y, &x, &w, t, accumulate, Precision::Fast);
                for m in 0..t {
                    for n in 0..out {
                        let want: f64 = (0..inp)
                            .map(|k| xr[m * inp + k] as f64 * wr[n * inp + k] as f64)
                            .sum::<f64>()
                            + if accumulate { 0.5 } else { 0.0 };
                        let got = y[m * out + n] as f64;
                        assert!(
                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "t {t} [{m}][{n}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

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
