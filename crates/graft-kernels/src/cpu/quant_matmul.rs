//! Matrix products with a block-quantized weight ([`QuantTensor`]: a frozen GGUF base kept in its
//! ggml blocks), in the two layouts a frozen weight needs (there is no weight gradient):
//!
//! * forward `Y[t×out] (+)= X[t×in] · Wᵀ` ([`forward`]),
//! * input gradient `dX[t×in] (+)= dY[t×out] · W` ([`backward_input`]).
//!
//! Three paths, none of which materialises the whole matrix in another type:
//!
//! * few rows (decode, `t ≤` [`GEMV_MAX_ROWS`]): each weight row is read once, block by block,
//!   for all `t` inputs; a Q8_0 / Q4_0 / Q4_1 block is dequantized in registers (32 values) and
//!   multiplied with the f32 inputs straight away; other types dequantize one row into a small
//!   buffer first. f32 inputs, f32 accumulation.
//! * fast mode (bf16 products): the bf16 GEMM reads the weight through [`QuantB`], a
//!   [`BSource`] that dequantizes the rows a B panel needs (≤ 512 columns × one k-block) to bf16
//!   while packing, so the products are those of the bf16-rounded dequantized weight — what a bf16
//!   copy of it would give.
//! * exact mode: the weight is dequantized to f32 a panel of rows at a time (≤ 1 MB) and
//!   multiplied in f32.
//!
//! Dequantized values are exactly those of `quant.rs` (llama.cpp's reference), so each path
//! matches "dequantize, then multiply" up to the order of the f32 sums (tested below).

use super::gemm_bf16::{BSource, MatRef, gemm_bf16_source};
use super::matmul::{GEMV_MAX_ROWS, matmul_strided};
use super::quant_dot;
use crate::quant::{self, QK, QuantTensor, QuantType};
use crate::types::Precision;
use half::bf16;

/// A frozen block-quantized matrix `[rows, cols]` whose rows dequantize in ranges, exactly as
/// `quant.rs` does: a [`QuantTensor`] in its ggml blocks, or the same blocks re-laid for the
/// decode products ([`super::quant_packed::InterleavedQuant`]). The GEMM and exact paths here
/// read either through this.
pub trait QuantRows: Sync {
    /// `(rows, cols)`.
    fn shape(&self) -> (usize, usize);
    /// `row[c0..c1]` of row `r` as f32 into `out`.
    fn dequantize_range(&self, r: usize, c0: usize, c1: usize, out: &mut [f32]);
}

impl QuantRows for QuantTensor {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    #[inline]
    fn dequantize_range(&self, r: usize, c0: usize, c1: usize, out: &mut [f32]) {
        QuantTensor::dequantize_range(self, r, c0, c1, out)
    }
}

/// A quantized weight `W [out, in]` as the `B` operand of a GEMM: `Wᵀ` (`k = in`, the forward)
/// or `W` (`k = out`, the input gradient). Tiles are dequantized row by row (a weight row's
/// blocks are contiguous), so the forward's tiles are column-contiguous.
pub struct QuantB<'a, W: QuantRows + ?Sized = QuantTensor> {
    /// The weight.
    pub w: &'a W,
    /// `Wᵀ` rather than `W`.
    pub transposed: bool,
}

impl<W: QuantRows + ?Sized> BSource for QuantB<'_, W> {
    fn rows(&self) -> usize {
        let (rows, cols) = self.w.shape();
        if self.transposed { cols } else { rows }
    }
    fn cols(&self) -> usize {
        let (rows, cols) = self.w.shape();
        if self.transposed { rows } else { cols }
    }
    fn columns_contiguous(&self) -> bool {
        self.transposed
    }
    fn tile(&self, k0: usize, k1: usize, j0: usize, j1: usize, out: &mut [u16]) {
        // Weight rows r0..r1, columns c0..c1: one output line per weight row either way.
        let (r0, r1, c0, c1) = if self.transposed {
            (j0, j1, k0, k1)
        } else {
            (k0, k1, j0, j1)
        };
        #[cfg(target_arch = "x86_64")]
        if has_avx512_blocks() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { tile_rows_avx512(self.w, r0, r1, c0, c1, out) };
        }
        tile_rows(self.w, r0, r1, c0, c1, out)
    }
}

/// Whether the CPU has what the AVX-512 block kernels here are compiled for (avx512f/vl/bw and
/// fma): the dequantizing tiles and the decode products on the blocks.
pub fn has_avx512_blocks() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`tile_rows`] compiled for AVX-512, so that the dequantization and the rounding vectorise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
unsafe fn tile_rows_avx512<W: QuantRows + ?Sized>(
    w: &W,
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
    out: &mut [u16],
) {
    tile_rows(w, r0, r1, c0, c1, out)
}

/// Rows `r0..r1`, columns `c0..c1` of `w` as bf16 bits (nearest even), row after row.
#[inline(always)]
fn tile_rows<W: QuantRows + ?Sized>(w: &W, r0: usize, r1: usize, c0: usize, c1: usize, out: &mut [u16]) {
    let len = c1 - c0;
    if len == 0 {
        return;
    }
    let mut row = vec![0.0f32; len];
    for (r, o) in (r0..r1).zip(out.chunks_exact_mut(len)) {
        w.dequantize_range(r, c0, c1, &mut row);
        o.iter_mut()
            .zip(&row)
            .for_each(|(o, &v)| *o = bf16::from_f32(v).to_bits());
    }
}

/// Rows of f32 scratch per panel of the exact path (about 1 MB).
fn exact_panel_rows(cols: usize) -> usize {
    ((1 << 18) / cols.max(1)).max(1)
}

/// `y[t×out] (+)= x[t×in] · wᵀ`.
pub fn forward(y: &mut [f32], x: &[f32], w: &QuantTensor, t: usize, accumulate: bool, precision: Precision) {
    let (out, inp) = (w.rows, w.cols);
    assert!(
        y.len() >= t * out && x.len() >= t * inp,
        "quantized forward: buffer sizes"
    );
    if t == 0 || out == 0 {
        return;
    }
    if t <= GEMV_MAX_ROWS {
        // 8-bit activations are fast mode's rounding here whether or not the CPU has bf16 dot
        // products (llama.cpp rounds them on every CPU).
        let int8 =
            precision == Precision::Fast && quant_dot::int8_path().is_some() && quant_dot::supported(w.ty);
        return gemv(y, x, w, t, accumulate, int8);
    }
    forward_dequantizing(y, x, w, t, accumulate, precision)
}

/// [`forward`] through dequantized tiles, for any row count: the bf16 GEMM on tiles dequantized
/// while packing (fast mode), or f32 panels (exact).
pub fn forward_dequantizing<W: QuantRows + ?Sized>(
    y: &mut [f32],
    x: &[f32],
    w: &W,
    t: usize,
    accumulate: bool,
    precision: Precision,
) {
    let (out, inp) = w.shape();
    assert!(
        y.len() >= t * out && x.len() >= t * inp,
        "quantized forward: buffer sizes"
    );
    if t == 0 || out == 0 {
        return;
    }
    if precision.effective() == Precision::Fast {
        let src = QuantB { w, transposed: true };
        let beta = if accumulate { 1.0 } else { 0.0 };
        let threads = rayon::current_num_threads();
        gemm_bf16_source(y, out, MatRef::f32_row_major(x, t, inp), &src, 1.0, beta, threads);
        return;
    }
    for_each_panel(w, |r0, nr, s| {
        // y[:, r0..r0+nr] (+)= x · sᵀ.
        matmul_strided(
            &mut y[r0..],
            out,
            x,
            t,
            inp,
            inp,
            1,
            s,
            nr,
            1,
            inp,
            1.0,
            accumulate,
        );
    });
}

/// Calls `f(r0, nr, panel)` for consecutive panels of at most [`exact_panel_rows`] rows of `w`,
/// each dequantized to f32 into one scratch buffer (the whole matrix never is).
fn for_each_panel<W: QuantRows + ?Sized>(w: &W, mut f: impl FnMut(usize, usize, &[f32])) {
    let (out, inp) = w.shape();
    let panel = exact_panel_rows(inp);
    let mut scratch = vec![0.0f32; panel.min(out) * inp];
    for r0 in (0..out).step_by(panel) {
        let nr = panel.min(out - r0);
        let s = &mut scratch[..nr * inp];
        dequantize_rows(w, r0, s);
        f(r0, nr, s);
    }
}

/// Rows `r0 ..` of `w` dequantized to f32 into `out` (whole rows, as many as it holds), split
/// over the threads, each part compiled for the widest vector unit the CPU has.
fn dequantize_rows<W: QuantRows + ?Sized>(w: &W, r0: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    let inp = w.shape().1.max(1);
    let rows = out.len() / inp;
    let per_task = rows.div_ceil(rayon::current_num_threads().max(1) * 2).max(8);
    out[..rows * inp]
        .par_chunks_mut(per_task * inp)
        .enumerate()
        .for_each(|(i, o)| dequantize_rows_on_cpu(w, r0 + i * per_task, o));
}

/// [`dequantize_rows`] on one thread.
fn dequantize_rows_on_cpu<W: QuantRows + ?Sized>(w: &W, r0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_blocks() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { dequantize_rows_avx512(w, r0, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::math::has_avx2() {
        // SAFETY: as above.
        return unsafe { dequantize_rows_avx2(w, r0, out) };
    }
    dequantize_rows_body(w, r0, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
unsafe fn dequantize_rows_avx512<W: QuantRows + ?Sized>(w: &W, r0: usize, out: &mut [f32]) {
    dequantize_rows_body(w, r0, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize_rows_avx2<W: QuantRows + ?Sized>(w: &W, r0: usize, out: &mut [f32]) {
    dequantize_rows_body(w, r0, out)
}

#[inline(always)]
fn dequantize_rows_body<W: QuantRows + ?Sized>(w: &W, r0: usize, out: &mut [f32]) {
    let inp = w.shape().1;
    for (r, o) in (r0..).zip(out.chunks_exact_mut(inp)) {
        w.dequantize_range(r, 0, inp, o);
    }
}

/// `dx[t×in] (+)= dy[t×out] · w`.
pub fn backward_input<W: QuantRows + ?Sized>(
    dx: &mut [f32],
    dy: &[f32],
    w: &W,
    t: usize,
    accumulate: bool,
    precision: Precision,
) {
    let (out, inp) = w.shape();
    assert!(
        dx.len() >= t * inp && dy.len() >= t * out,
        "quantized backward: buffer sizes"
    );
    if t == 0 || inp == 0 {
        return;
    }
    if precision.effective() == Precision::Fast {
        let src = QuantB { w, transposed: false };
        let beta = if accumulate { 1.0 } else { 0.0 };
        let threads = rayon::current_num_threads();
        gemm_bf16_source(
            dx,
            inp,
            MatRef::f32_row_major(dy, t, out),
            &src,
            1.0,
            beta,
            threads,
        );
        return;
    }
    if out == 0 {
        if !accumulate {
            dx[..t * inp].fill(0.0);
        }
        return;
    }
    for_each_panel(w, |r0, nr, s| {
        // dx (+)= dy[:, r0..r0+nr] · s.
        let acc = accumulate || r0 > 0;
        matmul_strided(dx, inp, &dy[r0..], t, nr, out, 1, s, inp, inp, 1, 1.0, acc);
    });
}

/// Whether inference prompts (many rows) on `w` should run as the decode products, eight rows at
/// a time ([`forward_in_decode_chunks`]): fast mode on a CPU with integer dot products but no bf16
/// GEMM, where the alternative is an f32 GEMM on dequantized panels, and only for the 32-value
/// block types. llama.cpp multiplies prompts on such CPUs the same way (8-bit activations against
/// the blocks). Measured on Zen 3 (AVX2, `examples/bench_quant_products.rs`, 512 × 1536 → 576):
/// Q8_0 60–76 GFLOP/s against the f32 path's 43–49, Q4_0/Q4_1/Q5_0 even; Q4_K (37–43 vs 49–68)
/// and Q6_K (20–26 vs 45–63), whose sub-blocks need float work per 32 values, stay on the GEMM.
pub fn prompts_in_decode_chunks(w: &QuantTensor, precision: Precision) -> bool {
    precision == Precision::Fast
        && precision.effective() != Precision::Fast
        && quant_dot::int8_path().is_some()
        && matches!(
            w.ty,
            QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1
        )
}

/// `y[t×out] = x · wᵀ` for any number of rows, as the decode products compute them: the rows in
/// chunks of [`GEMV_MAX_ROWS`] spread over the threads, each chunk quantized to 8 bits and
/// multiplied with the whole weight (a block of output rows at a time, which stays in L2). Each
/// row's result is the one a decode step alone would give, whatever rows come with it.
pub fn forward_in_decode_chunks(y: &mut [f32], x: &[f32], w: &QuantTensor, t: usize) {
    use rayon::prelude::*;
    let (out, inp) = (w.rows, w.cols);
    assert!(
        y.len() >= t * out && x.len() >= t * inp,
        "quantized forward: buffer sizes"
    );
    const ROW_BLOCK: usize = 64;
    y[..t * out]
        .par_chunks_mut(GEMV_MAX_ROWS * out)
        .zip(x[..t * inp].par_chunks(GEMV_MAX_ROWS * inp))
        .for_each(|(yc, xc)| {
            let n = xc.len() / inp;
            let a = quant_dot::Q8Rows::new(xc, n, inp);
            let mut acc = vec![0.0f32; ROW_BLOCK * n];
            for n0 in (0..out).step_by(ROW_BLOCK) {
                let n1 = (n0 + ROW_BLOCK).min(out);
                quant_dot::rows(w, &a, n, n0, n1, &mut acc);
                for (r, vals) in acc[..(n1 - n0) * n].chunks_exact(n).enumerate() {
                    for (m, &v) in vals.iter().enumerate() {
                        yc[m * out + n0 + r] = v;
                    }
                }
            }
        });
}

/// `y[t×out] (+)= x · wᵀ` for a few rows, parallel over blocks of output rows; each weight row is
/// read once for all `t` inputs. `int8`: the inputs are quantized to 8 bits and meet the blocks
/// in integer dot products ([`quant_dot`]).
fn gemv(y: &mut [f32], x: &[f32], w: &QuantTensor, t: usize, accumulate: bool, int8: bool) {
    use rayon::prelude::*;
    let out = w.rows;
    let q8 = int8.then(|| quant_dot::Q8Rows::new(x, t, w.cols));
    let threads = rayon::current_num_threads().max(1);
    let block = out.div_ceil(threads * 4).max(16);
    let parts: Vec<(usize, Vec<f32>)> = (0..out.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let (n0, n1) = (b * block, ((b + 1) * block).min(out));
            let mut acc = vec![0.0f32; (n1 - n0) * t];
            match &q8 {
                Some(a) => quant_dot::rows(w, a, t, n0, n1, &mut acc),
                None => gemv_rows(w, x, t, n0, n1, &mut acc),
            }
            (n0, acc)
        })
        .collect();
    for (n0, acc) in parts {
        for (r, vals) in acc.chunks_exact(t).enumerate() {
            for (m, &v) in vals.iter().enumerate() {
                let dst = &mut y[m * out + n0 + r];
                *dst = if accumulate { *dst + v } else { v };
            }
        }
    }
}

/// `acc[(n − n0)·t + m] = Σ_k x[m·in + k] · w[n][k]` for weight rows `n0..n1`.
fn gemv_rows(w: &QuantTensor, x: &[f32], t: usize, n0: usize, n1: usize, acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_blocks() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { gemv_rows_avx512(w, x, t, n0, n1, acc) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::math::has_avx2() {
        // SAFETY: as above.
        return unsafe { gemv_rows_avx2(w, x, t, n0, n1, acc) };
    }
    gemv_rows_body(w, x, t, n0, n1, acc)
}

/// [`gemv_rows_body`] compiled for AVX2 and FMA, so that the block products vectorise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_rows_avx2(w: &QuantTensor, x: &[f32], t: usize, n0: usize, n1: usize, acc: &mut [f32]) {
    gemv_rows_body(w, x, t, n0, n1, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
unsafe fn gemv_rows_avx512(w: &QuantTensor, x: &[f32], t: usize, n0: usize, n1: usize, acc: &mut [f32]) {
    let kind = match w.ty {
        QuantType::Q8_0 => 0,
        QuantType::Q4_0 => 1,
        QuantType::Q4_1 => 2,
        _ => return gemv_rows_body(w, x, t, n0, n1, acc),
    };
    for n in n0..n1 {
        let (row, out) = (w.row(n), &mut acc[(n - n0) * t..(n - n0 + 1) * t]);
        macro_rules! dispatch {
            ($($t:literal)*) => {
                match (t, kind) {
                    $(
                        ($t, 0) => legacy_rows_avx512::<$t, 0>(row, x, w.cols, out),
                        ($t, 1) => legacy_rows_avx512::<$t, 1>(row, x, w.cols, out),
                        ($t, _) => legacy_rows_avx512::<$t, 2>(row, x, w.cols, out),
                    )*
                    _ => unreachable!("gemv rows: 1..=GEMV_MAX_ROWS"),
                }
            };
        }
        // SAFETY: the CPU has the features (this function's); the sizes are checked inside.
        unsafe { dispatch!(1 2 3 4 5 6 7 8) }
    }
}

/// `out[m] = Σ_k x[m·inp + k] · row[k]` for `T` input rows and a Q8_0 (`K` = 0), Q4_0 (1) or
/// Q4_1 (2) row: each block becomes two zmm of f32 weights in registers (the values
/// `quant.rs` computes, bit for bit: `q · d`, `(q − 8) · d`, `q · d + m`), then two FMAs per input
/// row.
///
/// # Safety
/// The CPU must have avx512f/vl/bw and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
unsafe fn legacy_rows_avx512<const T: usize, const K: u8>(
    row: &[u8],
    x: &[f32],
    inp: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let bb = match K {
        0 => quant::Q8_0_BYTES,
        1 => quant::Q4_0_BYTES,
        _ => quant::Q4_1_BYTES,
    };
    let nb = inp / QK;
    assert!(row.len() >= nb * bb && x.len() >= T * inp && out.len() >= T);
    let f16_at = |b: &[u8], i: usize| half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32();
    // Two blocks per step into separate accumulators, so the FMA chains do not wait on each other.
    let mut acc = [[_mm512_setzero_ps(); 4]; T];
    let nibble = _mm512_set1_epi32(0x0F);
    let eight = _mm512_set1_epi32(8);
    // The block's 32 weights as two zmm.
    macro_rules! weights {
        ($blk:expr) => {{
            let blk: &[u8] = $blk;
            let vd = _mm512_set1_ps(f16_at(blk, 0));
            // SAFETY: each 16-byte load lies inside the block (Q8_0: quants at 2..34; Q4_0:
            // 2..18; Q4_1: 4..20).
            unsafe {
                match K {
                    0 => {
                        let q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.as_ptr().add(2) as *const __m128i));
                        let q1 =
                            _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.as_ptr().add(18) as *const __m128i));
                        (
                            _mm512_mul_ps(_mm512_cvtepi32_ps(q0), vd),
                            _mm512_mul_ps(_mm512_cvtepi32_ps(q1), vd),
                        )
                    }
                    1 => {
                        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.as_ptr().add(2) as *const __m128i));
                        let lo = _mm512_sub_epi32(_mm512_and_si512(q, nibble), eight);
                        let hi = _mm512_sub_epi32(_mm512_srli_epi32::<4>(q), eight);
                        (
                            _mm512_mul_ps(_mm512_cvtepi32_ps(lo), vd),
                            _mm512_mul_ps(_mm512_cvtepi32_ps(hi), vd),
                        )
                    }
                    _ => {
                        let vm = _mm512_set1_ps(f16_at(blk, 2));
                        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i));
                        let lo = _mm512_and_si512(q, nibble);
                        let hi = _mm512_srli_epi32::<4>(q);
                        (
                            _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), vd), vm),
                            _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), vd), vm),
                        )
                    }
                }
            }
        }};
    }
    // acc[m][2h..2h+2] += the block's weights · x[m][b·32..]
    macro_rules! fma_rows {
        ($w:expr, $b:expr, $h:literal) => {{
            let (w0, w1) = $w;
            for (m, acc) in acc.iter_mut().enumerate() {
                // SAFETY: m < T and (b + 1)·32 ≤ inp: inside x (asserted above).
                unsafe {
                    let xp = x.as_ptr().add(m * inp + $b * QK);
                    acc[2 * $h] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[2 * $h]);
                    acc[2 * $h + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), acc[2 * $h + 1]);
                }
            }
        }};
    }
    let mut b = 0;
    while b + 2 <= nb {
        let w = weights!(&row[b * bb..(b + 1) * bb]);
        let v = weights!(&row[(b + 1) * bb..(b + 2) * bb]);
        fma_rows!(w, b, 0);
        fma_rows!(v, b + 1, 1);
        b += 2;
    }
    if b < nb {
        let w = weights!(&row[b * bb..(b + 1) * bb]);
        fma_rows!(w, b, 0);
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        *o = _mm512_reduce_add_ps(sum);
    }
}

#[inline(always)]
fn gemv_rows_body(w: &QuantTensor, x: &[f32], t: usize, n0: usize, n1: usize, acc: &mut [f32]) {
    let inp = w.cols;
    let mut wrow = Vec::new();
    for n in n0..n1 {
        let row = w.row(n);
        let out = &mut acc[(n - n0) * t..(n - n0 + 1) * t];
        // The legacy types are read block by block; the others dequantize the row first.
        match w.ty {
            QuantType::Q8_0 => dot_rows(row, quant::Q8_0_BYTES, x, inp, t, out, quant::dequantize_q8_0),
            QuantType::Q4_0 => dot_rows(row, quant::Q4_0_BYTES, x, inp, t, out, quant::dequantize_q4_0),
            QuantType::Q4_1 => dot_rows(row, quant::Q4_1_BYTES, x, inp, t, out, quant::dequantize_q4_1),
            _ => {
                wrow.resize(inp, 0.0);
                w.ty.dequantize(row, &mut wrow);
                let bytes: &[u8] = bytemuck::cast_slice(&wrow);
                dot_rows(bytes, QK * 4, x, inp, t, out, |b, o| {
                    for (o, c) in o.iter_mut().zip(b.chunks_exact(4)) {
                        *o = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                    }
                });
            }
        }
    }
}

/// `out[m] = Σ_k x[m·inp + k] · row[k]` for `t` input rows, the weight row given as blocks of 32
/// values (`block_bytes` each) that `dequant` turns into f32.
#[inline(always)]
fn dot_rows(
    row: &[u8],
    block_bytes: usize,
    x: &[f32],
    inp: usize,
    t: usize,
    out: &mut [f32],
    dequant: impl Fn(&[u8], &mut [f32]),
) {
    match t {
        1 => dot_rows_t::<1>(row, block_bytes, x, inp, out, dequant),
        2 => dot_rows_t::<2>(row, block_bytes, x, inp, out, dequant),
        3 => dot_rows_t::<3>(row, block_bytes, x, inp, out, dequant),
        4 => dot_rows_t::<4>(row, block_bytes, x, inp, out, dequant),
        5 => dot_rows_t::<5>(row, block_bytes, x, inp, out, dequant),
        6 => dot_rows_t::<6>(row, block_bytes, x, inp, out, dequant),
        7 => dot_rows_t::<7>(row, block_bytes, x, inp, out, dequant),
        8 => dot_rows_t::<8>(row, block_bytes, x, inp, out, dequant),
        _ => unreachable!("gemv rows: 1..=GEMV_MAX_ROWS"),
    }
}

#[inline(always)]
fn dot_rows_t<const T: usize>(
    row: &[u8],
    block_bytes: usize,
    x: &[f32],
    inp: usize,
    out: &mut [f32],
    dequant: impl Fn(&[u8], &mut [f32]),
) {
    assert!(x.len() >= T * inp && out.len() >= T && row.len() / block_bytes * QK == inp);
    let mut acc = [[0.0f32; QK]; T];
    let mut wb = [0.0f32; QK];
    for (b, block) in row.chunks_exact(block_bytes).enumerate() {
        dequant(block, &mut wb);
        for (m, acc) in acc.iter_mut().enumerate() {
            let xb = &x[m * inp + b * QK..m * inp + (b + 1) * QK];
            for l in 0..QK {
                acc[l] = wb[l].mul_add(xb[l], acc[l]);
            }
        }
    }
    for (o, acc) in out.iter_mut().zip(&acc) {
        *o = acc.iter().sum();
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-0.5, 0.5).
    pub(crate) fn rand(n: usize, seed: u64) -> Vec<f32> {
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

    /// Random but well-formed blocks of `ty`: every byte random except the f16 scales, which are
    /// set to small finite values (so no block decodes to inf/NaN).
    pub(crate) fn random_blocks(ty: QuantType, rows: usize, cols: usize, seed: u64) -> QuantTensor {
        let (bs, bb) = (ty.block_size(), ty.block_bytes());
        let nblocks = rows * cols / bs;
        let mut s = seed;
        let mut data: Vec<u8> = (0..nblocks * bb)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect();
        // Byte offsets of the f16 scales in each block (see quant.rs).
        let scales: &[usize] = match ty {
            QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 | QuantType::IQ4_NL | QuantType::IQ4_XS => {
                &[0]
            }
            QuantType::Q4_1 | QuantType::Q5_1 | QuantType::Q4_K | QuantType::Q5_K => &[0, 2],
            QuantType::Q2_K => &[80, 82],
            QuantType::Q3_K => &[108],
            QuantType::Q6_K => &[208],
        };
        for (i, block) in data.chunks_exact_mut(bb).enumerate() {
            for (j, &off) in scales.iter().enumerate() {
                let v = half::f16::from_f32(((i * 7 + j * 3) % 11) as f32 * 1e-3 + 1e-3);
                block[off..off + 2].copy_from_slice(&v.to_bits().to_le_bytes());
            }
        }
        QuantTensor::new(ty, data, rows, cols)
    }

    const TYPES: [QuantType; 12] = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q2_K,
        QuantType::Q3_K,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
        QuantType::IQ4_NL,
        QuantType::IQ4_XS,
    ];

    /// `Σ_k a[i][k] · b[j][k]` in f64 (`a` is `m × k`, `b` is `n × k`).
    fn nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[j * k + p] as f64).sum();
            }
        }
        c
    }

    fn check(got: &[f32], want: &[f64], base: f32, tol: f64, what: &str) {
        let scale = want.iter().fold(1e-3f64, |m, w| m.max(w.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (g as f64 - base as f64 - w).abs();
            assert!(
                err <= tol * scale,
                "{what} [{i}]: {g} vs {} (err {err}, scale {scale})",
                w + base as f64
            );
        }
    }

    fn bf16_round(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
    }

    /// Forward and input gradient of every type, on odd shapes, against "dequantize, then
    /// multiply": exact and decode paths to 1e-5 of the largest |value| (f32 sums in another
    /// order), the bf16 path against the f64 product of the bf16-rounded operands to 1e-5.
    #[test]
    fn quantized_products_match_dequantize_then_multiply() {
        for (i, &ty) in TYPES.iter().enumerate() {
            let k = ty.block_size() * if ty.block_size() == QK { 3 } else { 2 };
            for &(t, n) in &[(1usize, 17usize), (3, 33), (17, 5), (8, 1), (40, 131)] {
                let w = random_blocks(ty, n, k, 11 + i as u64);
                let wf = w.to_f32();
                let x = rand(t * k, 5 + t as u64);
                let dy = rand(t * n, 7 + n as u64);
                let what = format!("{ty:?} t {t} n {n} k {k}");
                // Forward.
                let want = nt(&x, &wf, t, n, k);
                let want_bf = nt(&bf16_round(&x), &bf16_round(&wf), t, n, k);
                for (p, acc) in [
                    (Precision::Exact, false),
                    (Precision::Exact, true),
                    (Precision::Fast, true),
                ] {
                    let base = if acc { 0.25 } else { 0.0 };
                    let mut y = vec![base; t * n];
                    forward(&mut y, &x, &w, t, acc, p);
                    let fast = p.effective() == Precision::Fast;
                    let int8 = p == Precision::Fast
                        && t <= GEMV_MAX_ROWS
                        && quant_dot::int8_path().is_some()
                        && quant_dot::supported(ty);
                    // Few rows in fast mode: 8-bit activations against the dequantized weight.
                    let want_q8 =
                        int8.then(|| nt(&quant_dot::Q8Rows::new(&x, t, k).dequantized(), &wf, t, n, k));
                    let want = match (&want_q8, fast && t > GEMV_MAX_ROWS) {
                        (Some(q8), _) => q8,
                        (None, true) => &want_bf,
                        (None, false) => &want,
                    };
                    check(&y, want, base, 1e-5, &format!("forward {p:?} {what}"));
                }
                // Input gradient: dx = dy · W, i.e. Σ_j dy[m][j] · W[j][c].
                let wt: Vec<f32> = (0..k * n).map(|e| wf[(e % n) * k + e / n]).collect(); // [k, n]
                let want = nt(&dy, &wt, t, k, n);
                let want_bf = nt(&bf16_round(&dy), &bf16_round(&wt), t, k, n);
                for (p, acc) in [
                    (Precision::Exact, false),
                    (Precision::Exact, true),
                    (Precision::Fast, true),
                ] {
                    let base = if acc { -0.5 } else { 0.0 };
                    let mut dx = vec![base; t * k];
                    backward_input(&mut dx, &dy, &w, t, acc, p);
                    let want = if p.effective() == Precision::Fast {
                        &want_bf
                    } else {
                        &want
                    };
                    check(&dx, want, base, 1e-5, &format!("backward {p:?} {what}"));
                }
            }
        }
    }

    /// Prompts in decode chunks: every row bit for bit what the decode product of that row alone
    /// gives, for a row count that is not a multiple of the chunk.
    #[test]
    fn prompt_rows_in_decode_chunks_equal_each_row_alone() {
        if quant_dot::int8_path().is_none() {
            eprintln!("skipping: this CPU has no integer dot products");
            return;
        }
        for (i, ty) in [
            QuantType::Q8_0,
            QuantType::Q4_1,
            QuantType::Q5_0,
            QuantType::Q4_K,
            QuantType::Q6_K,
        ]
        .into_iter()
        .enumerate()
        {
            let (t, n, k) = (19usize, 70usize, 512usize);
            let w = random_blocks(ty, n, k, 21 + i as u64);
            let x = rand(t * k, 9);
            let mut y = vec![f32::NAN; t * n];
            forward_in_decode_chunks(&mut y, &x, &w, t);
            for m in 0..t {
                let mut one = vec![0.0f32; n];
                forward(&mut one, &x[m * k..(m + 1) * k], &w, 1, false, Precision::Fast);
                let same = one
                    .iter()
                    .zip(&y[m * n..(m + 1) * n])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty:?} row {m}");
            }
        }
    }

    /// The packed-once head (`PackedB::from_source`) gives the same products as packing on the fly.
    #[test]
    fn packed_source_matches_the_source_product() {
        use super::super::gemm_bf16::{PackedB, gemm_bf16_packed};
        let w = random_blocks(QuantType::Q4_1, 70, 64, 3);
        let x = rand(19 * 64, 9);
        let src = QuantB {
            w: &w,
            transposed: true,
        };
        let packed = PackedB::from_source(&src, 2);
        let (mut a, mut b) = (vec![0.0f32; 19 * 70], vec![0.0f32; 19 * 70]);
        gemm_bf16_packed(
            &mut a,
            70,
            MatRef::f32_row_major(&x, 19, 64),
            &packed,
            1.0,
            0.0,
            2,
        );
        gemm_bf16_source(&mut b, 70, MatRef::f32_row_major(&x, 19, 64), &src, 1.0, 0.0, 2);
        assert_eq!(a, b);
    }
}
