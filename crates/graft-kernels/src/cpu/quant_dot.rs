//! Decode products on block-quantized weights with 8-bit activations (fast mode), as llama.cpp
//! computes them: the few input rows are quantized to int8 per block of 32 ([`Q8Rows`]: one f32
//! scale per block and the sums of the quants per 16), and each weight block meets them in
//! integer dot products (unsigned 8-bit weights × signed 8-bit activations, 32-bit sums), scaled
//! to f32 once per block of 32.
//!
//! Per block of 32 values with activation scale `dx` and quants `qx` (sums `sx`):
//!
//! * Q8_0 (`w = d·q`, signed q): `d·dx·Σ q·qx` — the sign of `q` moved onto `qx`, so the
//!   unsigned operand is `|q|`;
//! * Q4_0 (`w = d·(q − 8)`): `d·dx·(Σ q·qx − 8·sx)`;
//! * Q4_1 (`w = d·q + m`): `d·dx·Σ q·qx + m·dx·sx`;
//! * Q5_0 / Q5_1: as Q4_0 (offset 16) / Q4_1, the fifth bits set from the block's `qh` mask;
//! * Q4_K sub-block `s` (`w = d·sc_s·q − dmin·m_s`): `d·sc_s·dx·Σ q·qx − dmin·m_s·dx·sx`;
//! * Q6_K, two sub-blocks of 16 (`w = d·sc_j·(q − 32)`): `d·dx·Σ_j sc_j·(Σ q·qx − 32·sx_j)`.
//!
//! The integer sums are exact, so the result is the product of the dequantized weight with the
//! 8-bit-rounded activations up to f32 rounding (tested against that below); the rounding of the
//! activations (≤ 0.4% of a block's largest value) is the price, as in llama.cpp.
//!
//! Two instruction sets ([`Int8Path`]): AVX-512 VNNI (`vpdpbusd`) and AVX2 (`vpmaddubsw` +
//! `vpmaddwd`, exact for these operands); the kernels are written once for both. Other block
//! types, and CPUs with neither, keep the f32 products of [`super::quant_matmul`].

use crate::quant::{QK, QK_K, QuantTensor, QuantType, k4_scale_min};

/// Rows of activations quantized to int8 per block of 32 (ggml's Q8_0 with sums): `q` row-major
/// `t × inp`, one scale per block, and the sum of the quants of every 16 values.
pub struct Q8Rows {
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) s16: Vec<i32>,
    /// `d · Σ q` per block of 32 (the minimum and offset terms).
    pub(super) ds: Vec<f32>,
    pub(super) inp: usize,
}

impl Q8Rows {
    /// Quantizes `t` rows of `inp` values (`inp` a multiple of 32): per block, `d = max|x| / 127`
    /// and `q = round(x / d)` (half away from zero, as ggml's `quantize_row_q8_0`).
    pub fn new(x: &[f32], t: usize, inp: usize) -> Q8Rows {
        assert!(
            inp.is_multiple_of(QK) && x.len() >= t * inp,
            "Q8Rows: rows of blocks of 32"
        );
        #[cfg(target_arch = "x86_64")]
        if int8_path().is_some() {
            // SAFETY: the CPU has AVX2 (every integer path implies it).
            return unsafe { Q8Rows::new_avx2(x, t, inp) };
        }
        Q8Rows::new_body(x, t, inp)
    }

    /// [`Q8Rows::new`] compiled for AVX2, where the maxima and the rounding vectorise.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn new_avx2(x: &[f32], t: usize, inp: usize) -> Q8Rows {
        Q8Rows::new_body(x, t, inp)
    }

    #[inline(always)]
    fn new_body(x: &[f32], t: usize, inp: usize) -> Q8Rows {
        let mut r = Q8Rows {
            q: vec![0; t * inp],
            d: vec![0.0; t * inp / QK],
            s16: vec![0; t * inp / 16],
            ds: vec![0.0; t * inp / QK],
            inp,
        };
        for (b, xb) in x[..t * inp].chunks_exact(QK).enumerate() {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let qb = &mut r.q[b * QK..(b + 1) * QK];
            for (q, &v) in qb.iter_mut().zip(xb) {
                *q = (v * id).round() as i8;
            }
            r.d[b] = d;
            r.s16[2 * b] = qb[..16].iter().map(|&v| v as i32).sum();
            r.s16[2 * b + 1] = qb[16..].iter().map(|&v| v as i32).sum();
            r.ds[b] = d * (r.s16[2 * b] + r.s16[2 * b + 1]) as f32;
        }
        r
    }

    /// The f32 values the quants stand for (`q · d`), row-major: what the products multiply.
    pub fn dequantized(&self) -> Vec<f32> {
        self.q
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * self.d[i / QK])
            .collect()
    }
}

/// The integer dot-product path this CPU takes, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Path {
    /// AVX-512 VNNI on 256-bit vectors (with AVX-512 BW/VL, AVX2, FMA and F16C).
    Vnni,
    /// AVX2 byte multiply-adds (with FMA and F16C).
    Avx2,
}

/// The integer path for this CPU, or `None` where it has neither (then the f32 block products of
/// [`super::quant_matmul`] run).
pub fn int8_path() -> Option<Int8Path> {
    // Asked once: every decode product and activation quantization consults it.
    static PATH: std::sync::OnceLock<Option<Int8Path>> = std::sync::OnceLock::new();
    *PATH.get_or_init(detect_int8_path)
}

fn detect_int8_path() -> Option<Int8Path> {
    #[cfg(target_arch = "x86_64")]
    {
        let base = super::math::has_avx2();
        if base
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512f")
        {
            return Some(Int8Path::Vnni);
        }
        if base {
            return Some(Int8Path::Avx2);
        }
    }
    None
}

/// Whether [`rows`] has an integer kernel for this block type.
pub fn supported(ty: QuantType) -> bool {
    matches!(
        ty,
        QuantType::Q8_0
            | QuantType::Q4_0
            | QuantType::Q4_1
            | QuantType::Q5_0
            | QuantType::Q5_1
            | QuantType::Q4_K
            | QuantType::Q6_K
    )
}

/// `acc[(n − n0)·t + m] = Σ_k a[m][k] · w[n][k]` for weight rows `n0..n1` and the `t` (1..=8)
/// quantized rows `a`. The caller checks [`int8_path`] and [`supported`].
pub fn rows(w: &QuantTensor, a: &Q8Rows, t: usize, n0: usize, n1: usize, acc: &mut [f32]) {
    let path = int8_path().expect("quant_dot::rows: the CPU has no integer dot products");
    rows_on(path, w, a, t, n0, n1, acc)
}

/// [`rows`] on a given path (which the CPU must have: a VNNI CPU has both).
fn rows_on(path: Int8Path, w: &QuantTensor, a: &Q8Rows, t: usize, n0: usize, n1: usize, acc: &mut [f32]) {
    assert!(int8_path().is_some_and(|best| best == path || path == Int8Path::Avx2));
    assert!(supported(w.ty) && (1..=8).contains(&t));
    assert!(a.inp == w.cols && a.q.len() >= t * a.inp && acc.len() >= (n1 - n0) * t && n1 <= w.rows);
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! dispatch {
            ($isa:ident; $($t:literal)*) => {
                match t {
                    $($t => for n in n0..n1 {
                        let out = &mut acc[(n - n0) * t..(n - n0 + 1) * t];
                        // SAFETY: the CPU has the module's features (int8_path); sizes asserted
                        // above.
                        unsafe {
                            match w.ty {
                                QuantType::Q8_0 => $isa::legacy::<$t, 0>(w.row(n), a, out),
                                QuantType::Q4_0 => $isa::legacy::<$t, 1>(w.row(n), a, out),
                                QuantType::Q4_1 => $isa::legacy::<$t, 2>(w.row(n), a, out),
                                QuantType::Q5_0 => $isa::legacy::<$t, 3>(w.row(n), a, out),
                                QuantType::Q5_1 => $isa::legacy::<$t, 4>(w.row(n), a, out),
                                QuantType::Q4_K => $isa::q4_k::<$t>(w.row(n), a, out),
                                _ => $isa::q6_k::<$t>(w.row(n), a, out),
                            }
                        }
                    },)*
                    _ => unreachable!(),
                }
            };
        }
        match path {
            Int8Path::Vnni => dispatch!(vnni; 1 2 3 4 5 6 7 8),
            Int8Path::Avx2 => dispatch!(avx2; 1 2 3 4 5 6 7 8),
        }
    }
}

/// The kernels below, compiled once per instruction set: each instantiation brings its own
/// `dot_u8i8` (unsigned × signed bytes, four products summed per i32 lane, lanes in byte order)
/// and `fifth_bits`.
#[cfg(target_arch = "x86_64")]
macro_rules! int8_kernels {
    ($features:literal) => {
        /// The f16 at byte `i` of `b`, as f32 (F16C).
        #[target_feature(enable = $features)]
        #[inline]
        fn f16_at(b: &[u8], i: usize) -> f32 {
            assert!(i + 2 <= b.len());
            // SAFETY: bytes i..i+2 are inside `b` (asserted).
            let bits = unsafe { (b.as_ptr().add(i) as *const u16).read_unaligned() };
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(u16::from_le(bits) as i32)))
        }

        /// Sum of the 8 lanes.
        #[target_feature(enable = $features)]
        #[inline]
        fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }

        /// The 32 activation quants of block `b` of row `m`.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn act(a: &Q8Rows, m: usize, b: usize) -> __m256i {
            // SAFETY: block b of row m lies inside `a.q` (callers loop over the row's blocks).
            unsafe { _mm256_loadu_si256(a.q.as_ptr().add(m * a.inp + b * QK) as *const __m256i) }
        }

        /// The 32 nibbles of 16 bytes, low nibbles first (values 0..16), then the high ones.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn nibbles16(p: *const u8) -> __m256i {
            // SAFETY: 16 readable bytes at p (caller).
            let b = unsafe { _mm_loadu_si128(p as *const __m128i) };
            let m = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(b, m);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), m);
            _mm256_set_m128i(hi, lo)
        }

        /// A legacy row (Q8_0 `K` = 0, Q4_0 1, Q4_1 2, Q5_0 3, Q5_1 4) against `T` quantized rows.
        ///
        /// # Safety
        /// The CPU must have the module's features; `row` holds `a.inp / 32` blocks and
        /// `a` at least `T` rows; `out.len() ≥ T`.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn legacy<const T: usize, const K: u8>(row: &[u8], a: &Q8Rows, out: &mut [f32]) {
            let bb = match K {
                0 => Q8_0_BYTES,
                1 => Q4_0_BYTES,
                2 => Q4_1_BYTES,
                3 => Q5_0_BYTES,
                _ => Q5_1_BYTES,
            };
            let nb = a.inp / QK;
            assert!(row.len() >= nb * bb);
            assert!(a.q.len() >= T * a.inp && a.d.len() >= T * nb && a.ds.len() >= T * nb);
            // Even blocks into `acc0` / `corr0`, odd ones into `acc1` / `corr1`: two independent
            // chains per row, each a named local (an index computed at run time would keep them
            // in memory).
            let mut acc0 = [_mm256_setzero_ps(); T];
            let mut acc1 = [_mm256_setzero_ps(); T];
            let mut corr0 = [0.0f32; T];
            let mut corr1 = [0.0f32; T];
            // Every index below is in bounds by the asserts above: block b < nb of the weight row,
            // and of each of the T activation rows; the loop reads through raw pointers so the hot
            // loop carries no bounds checks.
            let (d, ds) = (a.d.as_ptr(), a.ds.as_ptr());
            macro_rules! block {
                ($b:expr, $acc:ident, $corr:ident) => {{
                    let b = $b;
                    // SAFETY: b < nb, and the row holds nb blocks of bb bytes (asserted).
                    let blk = unsafe { core::slice::from_raw_parts(row.as_ptr().add(b * bb), bb) };
                    let dw = f16_at(blk, 0);
                    // SAFETY: the block's quants lie inside it (Q8_0 at 2..34, Q4_0 2..18, Q4_1
                    // 4..20, Q5_0 fifth bits 2..6 and nibbles 6..22, Q5_1 4..8 and 8..24).
                    let wq = unsafe {
                        let p = blk.as_ptr();
                        match K {
                            0 => _mm256_loadu_si256(p.add(2) as *const __m256i),
                            1 => nibbles16(p.add(2)),
                            2 => nibbles16(p.add(4)),
                            3 => _mm256_or_si256(nibbles16(p.add(6)), fifth_bits(p.add(2))),
                            _ => _mm256_or_si256(nibbles16(p.add(8)), fifth_bits(p.add(4))),
                        }
                    };
                    let (uw, mw) = match K {
                        0 => (_mm256_sign_epi8(wq, wq), 0.0),
                        2 | 4 => (wq, f16_at(blk, 2)),
                        _ => (wq, 0.0),
                    };
                    for m in 0..T {
                        let i = m * nb + b;
                        // SAFETY: block b of row m < T: i < T·nb (asserted above).
                        let (dx, dsx, xq) = unsafe { (*d.add(i), *ds.add(i), act(a, m, b)) };
                        let xq = if K == 0 { _mm256_sign_epi8(xq, wq) } else { xq };
                        let dot = dot_u8i8(uw, xq);
                        $acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * dx), $acc[m]);
                        match K {
                            1 => $corr[m] -= 8.0 * dw * dsx,
                            3 => $corr[m] -= 16.0 * dw * dsx,
                            2 | 4 => $corr[m] += mw * dsx,
                            _ => {}
                        }
                    }
                }};
            }
            let mut b = 0;
            while b + 1 < nb {
                block!(b, acc0, corr0);
                block!(b + 1, acc1, corr1);
                b += 2;
            }
            if b < nb {
                block!(b, acc0, corr0);
            }
            for m in 0..T {
                out[m] = hsum(_mm256_add_ps(acc0[m], acc1[m])) + (corr0[m] + corr1[m]);
            }
        }

        /// A Q4_K row against `T` quantized rows.
        ///
        /// # Safety
        /// As [`legacy`], with `row` holding `a.inp / 256` Q4_K blocks.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn q4_k<const T: usize>(row: &[u8], a: &Q8Rows, out: &mut [f32]) {
            let nsb = a.inp / QK_K;
            let nb = a.inp / QK;
            assert!(row.len() >= nsb * Q4_K_BYTES);
            let mut acc = [[_mm256_setzero_ps(); 2]; T];
            let mut corr = [[0.0f32; 2]; T];
            let mask = _mm256_set1_epi8(0x0F);
            for sb in 0..nsb {
                let blk = &row[sb * Q4_K_BYTES..(sb + 1) * Q4_K_BYTES];
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                for c in 0..4 {
                    // SAFETY: quants group c is bytes 16 + 32c .. 48 + 32c of the block.
                    let bytes =
                        unsafe { _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * c) as *const __m256i) };
                    let halves = [
                        _mm256_and_si256(bytes, mask),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), mask),
                    ];
                    for (e, q) in halves.into_iter().enumerate() {
                        let s = 2 * c + e;
                        let (sc, mn) = k4_scale_min(scales, s);
                        let (ds, dm) = (d * sc as f32, dmin * mn as f32);
                        let b = sb * 8 + s;
                        for m in 0..T {
                            let i = m * nb + b;
                            let dx = a.d[i];
                            // SAFETY: block b of row m < T (caller).
                            let dot = dot_u8i8(q, unsafe { act(a, m, b) });
                            acc[m][e] =
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(ds * dx), acc[m][e]);
                            corr[m][e] -= dm * a.ds[i];
                        }
                    }
                }
            }
            for m in 0..T {
                out[m] = hsum(_mm256_add_ps(acc[m][0], acc[m][1])) + (corr[m][0] + corr[m][1]);
            }
        }

        /// A Q6_K row against `T` quantized rows.
        ///
        /// # Safety
        /// As [`legacy`], with `row` holding `a.inp / 256` Q6_K blocks.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn q6_k<const T: usize>(row: &[u8], a: &Q8Rows, out: &mut [f32]) {
            let nsb = a.inp / QK_K;
            let nb = a.inp / QK;
            assert!(row.len() >= nsb * Q6_K_BYTES);
            let mut acc = [[_mm256_setzero_ps(); 2]; T];
            let mut corr = [[0.0f32; 2]; T];
            let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
            for sb in 0..nsb {
                let blk = &row[sb * Q6_K_BYTES..(sb + 1) * Q6_K_BYTES];
                let d = f16_at(blk, 208);
                let scales = &blk[192..208];
                for h in 0..2 {
                    // SAFETY: ql is bytes 0..128 and qh 128..192 of the block.
                    let (ql0, ql1, qh) = unsafe {
                        let p = blk.as_ptr();
                        (
                            _mm256_loadu_si256(p.add(64 * h) as *const __m256i),
                            _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i),
                            _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i),
                        )
                    };
                    let lows = [
                        _mm256_and_si256(ql0, m4),
                        _mm256_and_si256(ql1, m4),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    ];
                    let highs = [
                        _mm256_and_si256(qh, m2),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2),
                        _mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2),
                    ];
                    for k in 0..4 {
                        let q = _mm256_or_si256(lows[k], _mm256_slli_epi16::<4>(highs[k]));
                        let j = 8 * h + 2 * k;
                        let (sa, sb2) = (scales[j] as i8 as i32, scales[j + 1] as i8 as i32);
                        let sv = _mm256_setr_epi32(sa, sa, sa, sa, sb2, sb2, sb2, sb2);
                        let b = sb * 8 + 4 * h + k;
                        for m in 0..T {
                            let i = m * nb + b;
                            let dx = a.d[i];
                            // SAFETY: block b of row m < T (caller).
                            let dot = dot_u8i8(q, unsafe { act(a, m, b) });
                            let dot = _mm256_mullo_epi32(dot, sv);
                            acc[m][k & 1] = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(dot),
                                _mm256_set1_ps(d * dx),
                                acc[m][k & 1],
                            );
                            let s = sa * a.s16[2 * i] + sb2 * a.s16[2 * i + 1];
                            corr[m][k & 1] -= 32.0 * d * dx * s as f32;
                        }
                    }
                }
            }
            for m in 0..T {
                out[m] = hsum(_mm256_add_ps(acc[m][0], acc[m][1])) + (corr[m][0] + corr[m][1]);
            }
        }
    };
}

/// AVX-512 VNNI (Zen 4/5, Intel Ice Lake and later): `vpdpbusd` on 256-bit vectors.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Q8Rows, QK, QK_K, k4_scale_min};
    use crate::quant::{Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q6_K_BYTES, Q8_0_BYTES};
    use core::arch::x86_64::*;

    /// Σ of four `u8 × i8` products per i32 lane.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    #[inline]
    fn dot_u8i8(u: __m256i, s: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
    }

    /// The fifth bits of a Q5 block (`qh`, a little-endian u32 at `p`) as 0x10 in byte `i`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn fifth_bits(p: *const u8) -> __m256i {
        // SAFETY: 4 readable bytes at p (caller).
        let qh = unsafe { (p as *const u32).read_unaligned() };
        _mm256_maskz_set1_epi8(u32::from_le(qh), 0x10)
    }

    int8_kernels!("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni");
}

/// AVX2 (Zen 1–3, Intel Haswell and later): `vpmaddubsw` then `vpmaddwd`, as llama.cpp does
/// there. The 16-bit pair sums cannot saturate for these operands: the unsigned side is at most
/// 128 (|Q8_0|) and the signed one at most 127 in magnitude, so a pair is at most 32 512.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q8Rows, QK, QK_K, k4_scale_min};
    use crate::quant::{Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q6_K_BYTES, Q8_0_BYTES};
    use core::arch::x86_64::*;

    /// Σ of four `u8 × i8` products per i32 lane (exact: see the module comment).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dot_u8i8(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    /// The fifth bits of a Q5 block (`qh`, a little-endian u32 at `p`) as 0x10 in byte `i`: byte
    /// `i` takes byte `i / 8` of `qh` and keeps bit `i % 8` of it.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn fifth_bits(p: *const u8) -> __m256i {
        // SAFETY: 4 readable bytes at p (caller).
        let qh = unsafe { (p as *const u32).read_unaligned() };
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(u32::from_le(qh) as i32),
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3,
                3,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    int8_kernels!("avx2,fma,f16c");
}

#[cfg(test)]
mod tests {
    use super::super::quant_matmul::tests::{rand, random_blocks};
    use super::*;

    #[test]
    fn q8_rows_round_like_ggml() {
        let mut x = vec![0.0f32; 64];
        x[0] = 1.27;
        x[1] = -0.635; // half a step
        x[2] = 0.004; // rounds to 0
        let a = Q8Rows::new(&x, 1, 64);
        assert_eq!(a.d[0], 1.27 / 127.0);
        assert_eq!((a.q[0], a.q[1], a.q[2]), (127, -64, 0));
        assert_eq!((a.d[1], a.q[32]), (0.0, 0), "an all-zero block has scale 0");
        assert_eq!(a.s16[0], 127 - 64);
    }

    #[test]
    fn integer_products_equal_the_dequantized_weight_times_the_rounded_activations() {
        if int8_path().is_none() {
            eprintln!(
                "skipping: this CPU has neither AVX2 nor AVX-512 VNNI (the f32 block products run instead)"
            );
            return;
        }
        let paths: &[Int8Path] = match int8_path() {
            Some(Int8Path::Vnni) => &[Int8Path::Vnni, Int8Path::Avx2],
            _ => &[Int8Path::Avx2],
        };
        for (&path, ty) in paths.iter().flat_map(|p| {
            [
                QuantType::Q8_0,
                QuantType::Q4_0,
                QuantType::Q4_1,
                QuantType::Q5_0,
                QuantType::Q5_1,
                QuantType::Q4_K,
                QuantType::Q6_K,
            ]
            .map(|ty| (p, ty))
        }) {
            let (rows_n, inp) = (37usize, 512usize);
            let w = random_blocks(ty, rows_n, inp, 7);
            let wd = w.to_f32();
            for t in [1usize, 3, 8] {
                let mut x = rand(t * inp, 11 + t as u64);
                x[5] *= 40.0; // an outlier: one block's scale much larger than the others
                let a = Q8Rows::new(&x, t, inp);
                let xd = a.dequantized();
                let mut acc = vec![0.0f32; rows_n * t];
                rows_on(path, &w, &a, t, 0, rows_n, &mut acc);
                for n in 0..rows_n {
                    for m in 0..t {
                        let want: f64 = (0..inp)
                            .map(|k| wd[n * inp + k] as f64 * xd[m * inp + k] as f64)
                            .sum();
                        let scale: f64 = (0..inp)
                            .map(|k| (wd[n * inp + k] as f64 * xd[m * inp + k] as f64).abs())
                            .sum();
                        let got = acc[n * t + m] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * scale + 1e-6,
                            "{path:?} {ty:?} t {t} [{n}][{m}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
