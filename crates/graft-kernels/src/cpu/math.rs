//! Vectorisable transcendental helpers for the fused ops: `exp` by range reduction and a
//! degree-6 polynomial (≈1 ulp on the softmax range), and row kernels (max, exp-and-sum) written
//! with fixed-width lane accumulators so LLVM emits SIMD code. Each row kernel is compiled three
//! times — for the baseline target, AVX2 and AVX-512 — and picked at run time.

/// `e^x` for f32, accurate to about 1–2 ulp for `x` in [-87, 88] (clamped outside).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2E).round_ties_even();
    let r = x - k * LN2_HI - k * LN2_LO;
    // Taylor/minimax coefficients of e^r on [-ln2/2, ln2/2].
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    let bits = ((k as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

const LANES: usize = 16;

#[inline(always)]
fn row_max_body(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j]);
        }
    }
    let mut m = acc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    for &x in rest {
        m = m.max(x);
    }
    m
}

#[inline(always)]
fn exp_sub_sum_body(row: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let n = row.len() / LANES * LANES;
    let (head, tail) = row.split_at_mut(n);
    for c in head.chunks_exact_mut(LANES) {
        for j in 0..LANES {
            let e = exp_f32(c[j] - shift);
            c[j] = e;
            acc[j] += e;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for x in tail {
        *x = exp_f32(*x - shift);
        s += *x;
    }
    s
}

#[inline(always)]
fn exp_sub_sum_dot_body(row: &mut [f32], shift: f32) -> (f32, f32) {
    let mut acc = [0.0f32; LANES];
    let mut dot = [0.0f32; LANES];
    let n = row.len() / LANES * LANES;
    let (head, tail) = row.split_at_mut(n);
    for c in head.chunks_exact_mut(LANES) {
        for j in 0..LANES {
            let d = c[j] - shift;
            let e = exp_f32(d);
            c[j] = e;
            acc[j] += e;
            dot[j] += e * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    let mut w: f32 = dot.iter().sum();
    for x in tail {
        let d = *x - shift;
        *x = exp_f32(d);
        s += *x;
        w += *x * d;
    }
    (s, w)
}

#[inline(always)]
fn scale_body(row: &mut [f32], s: f32) {
    for x in row {
        *x *= s;
    }
}

#[inline(always)]
fn swiglu_fwd_body(a: &mut [f32], g: &[f32], u: &[f32]) {
    for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
        *a = g * sigmoid_f32(g) * u;
    }
}

#[inline(always)]
fn swiglu_bwd_body(dg: &mut [f32], du: &mut [f32], da: &[f32], g: &[f32], u: &[f32]) {
    for ((((dg, du), &da), &g), &u) in dg.iter_mut().zip(du.iter_mut()).zip(da).zip(g).zip(u) {
        let s = sigmoid_f32(g);
        *du = da * g * s;
        *dg = da * u * s * (1.0 + g * (1.0 - s));
    }
}

/// The row kernels compiled for one instruction set (the bodies above, vectorised for it).
#[cfg(target_arch = "x86_64")]
macro_rules! row_kernels {
    ($features:literal) => {
        #[target_feature(enable = $features)]
        pub unsafe fn swiglu_fwd(a: &mut [f32], g: &[f32], u: &[f32]) {
            super::swiglu_fwd_body(a, g, u)
        }
        #[target_feature(enable = $features)]
        pub unsafe fn swiglu_bwd(dg: &mut [f32], du: &mut [f32], da: &[f32], g: &[f32], u: &[f32]) {
            super::swiglu_bwd_body(dg, du, da, g, u)
        }
        #[target_feature(enable = $features)]
        pub unsafe fn row_max(row: &[f32]) -> f32 {
            super::row_max_body(row)
        }
        #[target_feature(enable = $features)]
        pub unsafe fn exp_sub_sum(row: &mut [f32], shift: f32) -> f32 {
            super::exp_sub_sum_body(row, shift)
        }
        #[target_feature(enable = $features)]
        pub unsafe fn exp_sub_sum_dot(row: &mut [f32], shift: f32) -> (f32, f32) {
            super::exp_sub_sum_dot_body(row, shift)
        }
        #[target_feature(enable = $features)]
        pub unsafe fn scale(row: &mut [f32], s: f32) {
            super::scale_body(row, s)
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    row_kernels!("avx512f,avx512vl,avx512dq,fma");

    /// # Safety
    /// `dst.len() ≥ src.len()`; the CPU has avx512f.
    #[target_feature(enable = "avx512f,avx512vl,avx512dq,fma")]
    pub unsafe fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
        use std::arch::x86_64::*;
        let n16 = src.len() / 16 * 16;
        for i in (0..n16).step_by(16) {
            // SAFETY: i + 16 ≤ src.len() ≤ dst.len().
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            }
        }
        for i in n16..src.len() {
            dst[i] = src[i].to_f32();
        }
    }
    /// # Safety
    /// `dst.len() ≥ src.len()`; the CPU has avx512f.
    #[target_feature(enable = "avx512f,avx512vl,avx512dq,fma")]
    pub unsafe fn narrow_f16(src: &[f32], dst: &mut [half::f16]) {
        use std::arch::x86_64::*;
        let n16 = src.len() / 16 * 16;
        for i in (0..n16).step_by(16) {
            // SAFETY: i + 16 ≤ src.len() ≤ dst.len().
            unsafe {
                let v = _mm512_loadu_ps(src.as_ptr().add(i));
                let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
            }
        }
        for i in n16..src.len() {
            dst[i] = half::f16::from_f32(src[i]);
        }
    }
}

/// The same kernels for x86 CPUs without AVX-512 (Zen 1–3, Intel before Ice Lake): AVX2, FMA,
/// and F16C for the f16 conversions.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    row_kernels!("avx2,fma,f16c");

    /// # Safety
    /// `dst.len() ≥ src.len()`; the CPU has avx2 and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
        use std::arch::x86_64::*;
        let n8 = src.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 ≤ src.len() ≤ dst.len().
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        for i in n8..src.len() {
            dst[i] = src[i].to_f32();
        }
    }
    /// # Safety
    /// `dst.len() ≥ src.len()`; the CPU has avx2 and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn narrow_f16(src: &[f32], dst: &mut [half::f16]) {
        use std::arch::x86_64::*;
        let n8 = src.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 ≤ src.len() ≤ dst.len().
            unsafe {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            }
        }
        for i in n8..src.len() {
            dst[i] = half::f16::from_f32(src[i]);
        }
    }
}

/// Whether the CPU has AVX2, FMA and F16C: the one test for every AVX2 build in `cpu` (this
/// module's row kernels, the f32 helpers and GEMV of `matmul`, the block products, the
/// optimizer), each compiled for those features or fewer.
#[inline]
pub(super) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has what this module's AVX-512 paths are compiled for (avx512f/vl/dq, fma).
#[inline]
pub(super) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Largest element of `row` (−∞ for an empty row).
pub fn row_max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { avx512::row_max(row) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::row_max(row) };
    }
    row_max_body(row)
}

/// Replaces each `x` by `e^(x − shift)` and returns their sum.
pub fn exp_sub_sum(row: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { avx512::exp_sub_sum(row, shift) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::exp_sub_sum(row, shift) };
    }
    exp_sub_sum_body(row, shift)
}

/// [`exp_sub_sum`] that also returns `Σ e^(x − shift)·(x − shift)`: with the sum `S`, the
/// softmax's entropy is `ln S − that / S` (one pass, for the entropy of a row of logits).
pub fn exp_sub_sum_dot(row: &mut [f32], shift: f32) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { avx512::exp_sub_sum_dot(row, shift) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::exp_sub_sum_dot(row, shift) };
    }
    exp_sub_sum_dot_body(row, shift)
}

/// `dst[i] = src[i]` widened from f16 (exact).
pub fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    assert!(dst.len() >= src.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports the features the function is compiled for; sizes asserted.
        return unsafe { avx512::widen_f16(src, dst) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::widen_f16(src, dst) };
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// `dst[i] = src[i]` rounded to the nearest f16 (ties to even, as `half::f16::from_f32`).
pub fn narrow_f16(src: &[f32], dst: &mut [half::f16]) {
    assert!(dst.len() >= src.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports the features the function is compiled for; sizes asserted.
        return unsafe { avx512::narrow_f16(src, dst) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::narrow_f16(src, dst) };
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(s);
    }
}

/// Multiplies every element by `s`.
pub fn scale_row(row: &mut [f32], s: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { avx512::scale(row, s) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::scale(row, s) };
    }
    scale_body(row, s)
}

/// `a = g·σ(g)·u` element-wise.
pub fn swiglu_fwd(a: &mut [f32], g: &[f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { avx512::swiglu_fwd(a, g, u) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::swiglu_fwd(a, g, u) };
    }
    swiglu_fwd_body(a, g, u)
}

/// Backward of [`swiglu_fwd`] element-wise.
pub fn swiglu_bwd(dg: &mut [f32], du: &mut [f32], da: &[f32], g: &[f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { avx512::swiglu_bwd(dg, du, da, g, u) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::swiglu_bwd(dg, du, da, g, u) };
    }
    swiglu_bwd_body(dg, du, da, g, u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversions_equal_half() {
        // An odd length (vector body and tail), ties, denormals, overflow, infinities, NaN.
        let mut src: Vec<f32> = (0..37)
            .map(|i| (i as f32 - 18.0) * 0.37e-3 * (1.7f32).powi(i % 23))
            .collect();
        src.extend([
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            3e-7,
            -6e-8,
            65520.0,
            1e6,
            f32::INFINITY,
        ]);
        src.extend([f32::NEG_INFINITY, f32::NAN, -0.0]);
        let mut h = vec![half::f16::ZERO; src.len()];
        narrow_f16(&src, &mut h);
        for (x, y) in src.iter().zip(&h) {
            let want = half::f16::from_f32(*x);
            assert!(
                want.to_bits() == y.to_bits() || (want.is_nan() && y.is_nan()),
                "{x}: {y} vs {want}"
            );
        }
        let mut back = vec![0.0f32; h.len()];
        widen_f16(&h, &mut back);
        for (a, b) in h.iter().zip(&back) {
            assert!(
                a.to_f32().to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{a}"
            );
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn row_kernels_match_scalar() {
        let mut row: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let m = row_max(&row);
        assert_eq!(m, row.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let want: f64 = row.iter().map(|&x| ((x - m) as f64).exp()).sum();
        let s = exp_sub_sum(&mut row, m);
        assert!(((s as f64 - want) / want).abs() < 1e-6);
    }
}
