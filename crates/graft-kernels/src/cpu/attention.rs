//! Grouped-query causal attention over packed sequences, forward and backward, flash-style: the
//! forward keeps only the per-row log-sum-exp, the backward recomputes the probabilities block by
//! block. Tokens of different sequences never attend to each other — a packed batch is a list of
//! contiguous segments and each is processed on its own.
//!
//! Layouts (row-major): `q` is `[tokens, n_heads, head_dim]`, `k`/`v` are
//! `[tokens, n_kv_heads, head_dim]`, `out` is like `q`, `lse` is `[tokens, n_heads]`.

use super::math::{exp_sub_sum, row_max, scale_row};
use super::matmul::{axpy_f32_body, dot_f32_body};
use crate::types::AttentionShape;
use rayon::prelude::*;
use std::borrow::Cow;

/// Queries processed per block (bounds the score scratch to `QUERY_BLOCK × keys`).
const QUERY_BLOCK: usize = 64;

impl AttentionShape {
    fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
    /// First key (inclusive) visible from a query at position `pos`.
    fn first_key(&self, pos: usize) -> usize {
        match self.window {
            Some(w) if pos + 1 > w => pos + 1 - w,
            _ => 0,
        }
    }
    /// The keys a query at `pos` sees among the chunk of `n` cached positions from `i0`, as
    /// offsets `lo..hi` into the chunk (empty when `lo >= hi`).
    fn chunk_keys(&self, pos: usize, i0: usize, n: usize) -> (usize, usize) {
        let lo = self.first_key(pos).max(i0) - i0;
        let hi = (pos + 1).min(i0 + n).saturating_sub(i0);
        (lo, hi)
    }
}

#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: tasks write disjoint elements through these pointers (see each use).
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

/// `c[m×n] (+)= scale · a[m×k] · b[k×n]` over raw strided pointers (single-threaded gemm).
///
/// # Safety
/// All indices `i*rs + j*cs` within the dimensions must be valid for the pointers, and no other
/// thread may write the elements of `c` touched here.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    scale: f32,
    accumulate: bool,
    bf16: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if bf16 && k > 0 && c_cs == 1 && super::gemm_bf16::has_avx512_bf16() {
        use super::gemm_bf16::{MatData, MatRef, gemm_bf16};
        let extent = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
        // SAFETY: the caller guarantees these extents are valid and that `c` is exclusively ours.
        let (a_s, b_s, c_s) = unsafe {
            (
                std::slice::from_raw_parts(a, extent(m, k, a_rs, a_cs)),
                std::slice::from_raw_parts(b, extent(k, n, b_rs, b_cs)),
                std::slice::from_raw_parts_mut(c, extent(m, n, c_rs, 1)),
            )
        };
        let am = MatRef {
            data: MatData::F32(a_s),
            rows: m,
            cols: k,
            row_stride: a_rs,
            col_stride: a_cs,
        };
        let bm = MatRef {
            data: MatData::F32(b_s),
            rows: k,
            cols: n,
            row_stride: b_rs,
            col_stride: b_cs,
        };
        gemm_bf16(c_s, c_rs, am, bm, scale, if accumulate { 1.0 } else { 0.0 }, 1);
        return;
    }
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            c_cs as isize,
            c_rs as isize,
            accumulate,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
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

/// Applies the causal/window mask to a score block and turns it into probabilities in place;
/// returns nothing but writes each row's log-sum-exp into `lse_out(row)`.
fn softmax_rows(
    s: &mut [f32],
    nk: usize,
    rows: usize,
    q_pos0: usize,
    k0: usize,
    shape: &AttentionShape,
) -> Vec<f32> {
    let mut lse = Vec::with_capacity(rows);
    for r in 0..rows {
        let pos = q_pos0 + r;
        let lo = shape.first_key(pos).max(k0) - k0;
        let hi = pos + 1 - k0; // exclusive
        let row = &mut s[r * nk..(r + 1) * nk];
        let mx = row_max(&row[lo..hi]);
        let sum = exp_sub_sum(&mut row[lo..hi], mx);
        scale_row(&mut row[lo..hi], 1.0 / sum);
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
        lse.push(mx + sum.ln());
    }
    lse
}

/// Attention for queries at positions `q_pos0 ..` of one sequence whose keys/values (positions
/// `0 ..`) are at `k`/`v` with row stride `kv_rs`; writes `out` rows and `lse`.
///
/// # Safety
/// Pointers must cover the rows/heads addressed; `out`/`lse` elements of (these rows, heads of
/// `kv_head`'s group) must not be written by other threads.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_one_kv_head(
    shape: &AttentionShape,
    kv_head: usize,
    q: *const f32,
    q_rs: usize,
    nq: usize,
    q_pos0: usize,
    k: *const f32,
    v: *const f32,
    kv_rs: usize,
    out: *mut f32,
    out_rs: usize,
    lse: *mut f32,
    lse_rs: usize,
    scratch: &mut Vec<f32>,
) {
    let d = shape.head_dim;
    let g = shape.group();
    let h0 = kv_head * g;
    // The query heads sharing this K/V head are stacked into one tall block, so each product
    // packs K (or V) once for all of them: rows `j*nb .. (j+1)*nb` belong to head `h0 + j`.
    let (mut qb, mut ob) = (Vec::new(), Vec::new());
    let mut qs = 0;
    while qs < nq {
        let nb = QUERY_BLOCK.min(nq - qs);
        let pos0 = q_pos0 + qs;
        let k0 = shape.first_key(pos0);
        let nk = pos0 + nb - k0;
        qb.resize(g * nb * d, 0.0);
        ob.resize(g * nb * d, 0.0);
        scratch.resize(g * nb * nk, 0.0);
        // SAFETY: rows qs..qs+nb of q (heads of this group) and keys k0..k0+nk exist by the
        // caller's contract; out/lse rows of these heads belong to this task.
        unsafe {
            for j in 0..g {
                for r in 0..nb {
                    let src = std::slice::from_raw_parts(q.add((qs + r) * q_rs + (h0 + j) * d), d);
                    qb[(j * nb + r) * d..(j * nb + r + 1) * d].copy_from_slice(src);
                }
            }
            gemm_raw(
                g * nb,
                nk,
                d,
                scratch.as_mut_ptr(),
                nk,
                1,
                qb.as_ptr(),
                d,
                1,
                k.add(k0 * kv_rs + kv_head * d),
                1,
                kv_rs,
                shape.scale(),
                false,
                shape.bf16,
            );
            for j in 0..g {
                let l = softmax_rows(
                    &mut scratch[j * nb * nk..(j + 1) * nb * nk],
                    nk,
                    nb,
                    pos0,
                    k0,
                    shape,
                );
                for (r, &val) in l.iter().enumerate() {
                    *lse.add((qs + r) * lse_rs + h0 + j) = val;
                }
            }
            gemm_raw(
                g * nb,
                d,
                nk,
                ob.as_mut_ptr(),
                d,
                1,
                scratch.as_ptr(),
                nk,
                1,
                v.add(k0 * kv_rs + kv_head * d),
                kv_rs,
                1,
                1.0,
                false,
                shape.bf16,
            );
            for j in 0..g {
                for r in 0..nb {
                    let dst = std::slice::from_raw_parts_mut(out.add((qs + r) * out_rs + (h0 + j) * d), d);
                    dst.copy_from_slice(&ob[(j * nb + r) * d..(j * nb + r + 1) * d]);
                }
            }
        }
        qs += nb;
    }
}

/// Most query rows per K/V head (heads of a group × new tokens) for which cached attention
/// takes the decode path ([`attention_decode`]) instead of the GEMM: decode reads each cached
/// key and value once, with nothing padded to the GEMM's 8-row tile and no bf16 copy of the
/// cache per token.
const DIRECT_MAX_ROWS: usize = 16;

/// Cache positions per task of [`attention_decode`]. Fixed (not derived from the thread count),
/// so a sequence's output does not depend on the machine's threads or on the batch.
const KEY_CHUNK: usize = 128;

/// One chunk's share of [`attention_decode`]: for every stacked row, the largest visible score
/// (−∞ when the chunk holds no key the row may see), the sum of `e^(score − max)` over the
/// visible keys, and `Σ e^(score − max) · value` (`head_dim` values per row).
struct DecodePart {
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

/// Cached attention for a few new queries (decode): the cache is read row by row — each
/// position's keys (then values) for all K/V heads at once, so memory is walked in order —
/// in chunks of [`KEY_CHUNK`] positions spread over the threads, each chunk with its own
/// softmax statistics, then merged in chunk order (flash-decoding). Products and sums in f32.
fn attention_decode<E: CacheElem>(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    nq: usize,
    past: usize,
    shape: &AttentionShape,
) {
    let (d, nh) = (shape.head_dim, shape.n_heads);
    let qw = shape.q_width();
    let k0 = shape.first_key(past);
    let nk = past + nq - k0;
    // Stacked rows: row h·nq + r is head h of new token r (position past + r).
    let rows = nh * nq;
    let mut qs = vec![0.0f32; rows * d];
    for h in 0..nh {
        for r in 0..nq {
            qs[(h * nq + r) * d..(h * nq + r + 1) * d]
                .copy_from_slice(&q[r * qw + h * d..r * qw + (h + 1) * d]);
        }
    }
    let chunks = nk.div_ceil(KEY_CHUNK);
    let part = |c: usize| {
        let i0 = k0 + c * KEY_CHUNK;
        decode_chunk(
            &qs,
            k_cache,
            v_cache,
            i0,
            KEY_CHUNK.min(k0 + nk - i0),
            nq,
            past,
            shape,
        )
    };
    // Threads only for two whole chunks or more: a fork costs more than a short chunk.
    let parts: Vec<DecodePart> = if nk >= 2 * KEY_CHUNK && rayon::current_num_threads() > 1 {
        (0..chunks).into_par_iter().map(part).collect()
    } else {
        (0..chunks).map(part).collect()
    };
    for row in 0..rows {
        let m = parts.iter().map(|p| p.max[row]).fold(f32::NEG_INFINITY, f32::max);
        let (h, r) = (row / nq, row % nq);
        let o = &mut out[r * qw + h * d..r * qw + (h + 1) * d];
        o.fill(0.0);
        let mut total = 0.0f32;
        for p in &parts {
            if p.max[row] == f32::NEG_INFINITY {
                continue;
            }
            let w = super::math::exp_f32(p.max[row] - m);
            total += w * p.sum[row];
            axpy_f32_body(o, w, &p.out[row * d..(row + 1) * d]);
        }
        scale_row(o, 1.0 / total);
    }
}

/// The [`DecodePart`] of cache positions `i0 .. i0 + n` for the stacked queries `qs`.
#[allow(clippy::too_many_arguments)]
fn decode_chunk<E: CacheElem>(
    qs: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    i0: usize,
    n: usize,
    nq: usize,
    past: usize,
    shape: &AttentionShape,
) -> DecodePart {
    #[cfg(target_arch = "x86_64")]
    if super::math::has_avx512() {
        macro_rules! direct {
            ($($dv:literal)*) => {
                match shape.head_dim {
                    $(d if d == 16 * $dv => {
                        // SAFETY: the CPU has the features the function is compiled for.
                        return unsafe {
                            decode_chunk_zmm::<E, $dv>(qs, k_cache, v_cache, i0, n, nq, past, shape)
                        };
                    })*
                    _ => {}
                }
            };
        }
        direct!(2 3 4 5 6 7 8 10 12 16);
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { decode_chunk_avx512(qs, k_cache, v_cache, i0, n, nq, past, shape) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::math::has_avx2() {
        // SAFETY: as above.
        return unsafe { decode_chunk_avx2(qs, k_cache, v_cache, i0, n, nq, past, shape) };
    }
    decode_chunk_body(qs, k_cache, v_cache, i0, n, nq, past, shape)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn decode_chunk_avx2<E: CacheElem>(
    qs: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    i0: usize,
    n: usize,
    nq: usize,
    past: usize,
    shape: &AttentionShape,
) -> DecodePart {
    decode_chunk_body(qs, k_cache, v_cache, i0, n, nq, past, shape)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn decode_chunk_avx512<E: CacheElem>(
    qs: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    i0: usize,
    n: usize,
    nq: usize,
    past: usize,
    shape: &AttentionShape,
) -> DecodePart {
    decode_chunk_body(qs, k_cache, v_cache, i0, n, nq, past, shape)
}

/// [`decode_chunk_body`] for a head of `16·DV` values on AVX-512: a query row's `DV` vectors stay
/// in registers while the chunk's keys stream past (each widened from the cache as loaded), one
/// tree reduction per score instead of a scalar sum of lanes; then each row's output (`DV`
/// vectors) accumulates in registers over the chunk's values. Scores and sums in f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn decode_chunk_zmm<E: CacheElem, const DV: usize>(
    qs: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    i0: usize,
    n: usize,
    nq: usize,
    past: usize,
    shape: &AttentionShape,
) -> DecodePart {
    use std::arch::x86_64::*;
    let (d, g, kw) = (shape.head_dim, shape.group(), shape.kv_width());
    assert_eq!(d, 16 * DV);
    let rows = shape.n_heads * nq;
    assert!(qs.len() >= rows * d && k_cache.len() >= (i0 + n) * kw && v_cache.len() >= (i0 + n) * kw);
    let scale = shape.scale();
    // Sixteen cache values at `p` as f32.
    #[inline(always)]
    unsafe fn load16<E: CacheElem>(p: *const E) -> __m512 {
        // SAFETY: sixteen elements readable at p (callers); the element is f16 or f32.
        unsafe {
            if E::HALF {
                _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
            } else {
                _mm512_loadu_ps(p as *const f32)
            }
        }
    }
    let mut s = vec![0.0f32; rows * n];
    for row in 0..rows {
        let kvh = row / (g * nq);
        // SAFETY: row < rows: its d values lie in qs (asserted).
        let q: [__m512; DV] =
            core::array::from_fn(|j| unsafe { _mm512_loadu_ps(qs.as_ptr().add(row * d + 16 * j)) });
        let sr = &mut s[row * n..(row + 1) * n];
        for (i, sc) in sr.iter_mut().enumerate() {
            // SAFETY: position i0 + i < i0 + n: its key row lies in the cache (asserted).
            let key = unsafe { k_cache.as_ptr().add((i0 + i) * kw + kvh * d) };
            let mut acc = _mm512_mul_ps(q[0], unsafe { load16(key) });
            for (j, &qj) in q.iter().enumerate().skip(1) {
                acc = _mm512_fmadd_ps(qj, unsafe { load16(key.add(16 * j)) }, acc);
            }
            *sc = scale * _mm512_reduce_add_ps(acc);
        }
    }
    let mut max = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0.0f32; rows];
    let mut out = vec![0.0f32; rows * d];
    for row in 0..rows {
        let (lo, hi) = shape.chunk_keys(past + row % nq, i0, n);
        if lo >= hi {
            continue;
        }
        let sr = &mut s[row * n..(row + 1) * n];
        max[row] = row_max(&sr[lo..hi]);
        sum[row] = exp_sub_sum(&mut sr[lo..hi], max[row]);
        let kvh = row / (g * nq);
        let mut acc = [_mm512_setzero_ps(); DV];
        for (i, &p) in sr.iter().enumerate().take(hi).skip(lo) {
            let p = _mm512_set1_ps(p);
            // SAFETY: as for the keys.
            let value = unsafe { v_cache.as_ptr().add((i0 + i) * kw + kvh * d) };
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(p, unsafe { load16(value.add(16 * j)) }, *a);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            // SAFETY: row < rows: its d outputs lie in `out`.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(row * d + 16 * j), *a) };
        }
    }
    DecodePart { max, sum, out }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_chunk_body<E: CacheElem>(
    qs: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    i0: usize,
    n: usize,
    nq: usize,
    past: usize,
    shape: &AttentionShape,
) -> DecodePart {
    let (d, g, kw) = (shape.head_dim, shape.group(), shape.kv_width());
    let rows = shape.n_heads * nq;
    let scale = shape.scale();
    // Scores, position-major: each cached key row is read once for every head.
    let mut s = vec![0.0f32; rows * n];
    let mut wide = vec![0.0f32; kw];
    for i in 0..n {
        let key_row = E::as_f32(&k_cache[(i0 + i) * kw..(i0 + i + 1) * kw], &mut wide);
        for (kvh, key) in key_row.chunks_exact(d).enumerate() {
            for row in kvh * g * nq..(kvh + 1) * g * nq {
                s[row * n + i] = scale * dot_f32_body(&qs[row * d..(row + 1) * d], key);
            }
        }
    }
    // Each row's visible keys in this chunk, its max and exponentials.
    let mut max = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0.0f32; rows];
    for row in 0..rows {
        let (lo, hi) = shape.chunk_keys(past + row % nq, i0, n);
        let sr = &mut s[row * n..(row + 1) * n];
        if lo >= hi {
            sr.fill(0.0);
            continue;
        }
        max[row] = row_max(&sr[lo..hi]);
        sum[row] = exp_sub_sum(&mut sr[lo..hi], max[row]);
        sr[..lo].fill(0.0);
        sr[hi..].fill(0.0);
    }
    // Σ e · value, position-major.
    let mut out = vec![0.0f32; rows * d];
    for i in 0..n {
        let value_row = E::as_f32(&v_cache[(i0 + i) * kw..(i0 + i + 1) * kw], &mut wide);
        for (kvh, value) in value_row.chunks_exact(d).enumerate() {
            for row in kvh * g * nq..(kvh + 1) * g * nq {
                axpy_f32_body(&mut out[row * d..(row + 1) * d], s[row * n + i], value);
            }
        }
    }
    DecodePart { max, sum, out }
}

/// Training forward over a packed batch: `out` and `lse` for every token and head.
pub fn attention_forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segments: &[(usize, usize)],
    shape: &AttentionShape,
) {
    let (qw, kw) = (shape.q_width(), shape.kv_width());
    let t: usize = segments.iter().map(|s| s.1).sum();
    assert!(q.len() >= t * qw && k.len() >= t * kw && v.len() >= t * kw && out.len() >= t * qw);
    assert!(lse.len() >= t * shape.n_heads);
    let (out_p, lse_p) = (Ptr(out.as_mut_ptr()), Ptr(lse.as_mut_ptr()));
    let tasks: Vec<(usize, usize, usize)> = segments
        .iter()
        .flat_map(|&(s, n)| (0..shape.n_kv_heads).map(move |h| (s, n, h)))
        .collect();
    tasks
        .par_iter()
        .for_each_init(Vec::new, |scratch, &(start, len, kvh)| {
            let (out_p, lse_p) = (out_p, lse_p);
            // SAFETY: each task owns rows start..start+len of the heads in kvh's group.
            unsafe {
                attend_one_kv_head(
                    shape,
                    kvh,
                    q.as_ptr().add(start * qw),
                    qw,
                    len,
                    0,
                    k.as_ptr().add(start * kw),
                    v.as_ptr().add(start * kw),
                    kw,
                    out_p.0.add(start * qw),
                    qw,
                    lse_p.0.add(start * shape.n_heads),
                    shape.n_heads,
                    scratch,
                );
            }
        });
}

/// The CPU backend's KV-cache buffer ([`crate::Backend::KvBuf`]): one layer's keys or values
/// of one sequence, `[positions, kv_width]`.
pub enum KvRows {
    /// Full precision (exact mode).
    F32(Vec<f32>),
    /// The fast-mode cache.
    F16(Vec<half::f16>),
}

/// An element of a KV cache: f32, or f16 (the fast-mode cache: half the bytes each decode
/// step reads, as llama.cpp's default cache), widened to f32 as it is read.
pub trait CacheElem: Copy + Send + Sync {
    /// Whether the element is f16 (else f32).
    const HALF: bool;
    /// `src` as f32: itself, or widened into `buf` (at least `src.len()` long).
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
    /// `src` as f32: borrowed, or widened into a new buffer.
    fn widened(src: &[Self]) -> Cow<'_, [f32]>;
}

impl CacheElem for f32 {
    const HALF: bool = false;
    #[inline(always)]
    fn as_f32<'a>(src: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        src
    }
    fn widened(src: &[f32]) -> Cow<'_, [f32]> {
        Cow::Borrowed(src)
    }
}

impl CacheElem for half::f16 {
    const HALF: bool = true;
    #[inline(always)]
    fn as_f32<'a>(src: &'a [half::f16], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        super::math::widen_f16(src, buf);
        buf
    }
    fn widened(src: &[half::f16]) -> Cow<'_, [f32]> {
        let mut buf = vec![0.0; src.len()];
        super::math::widen_f16(src, &mut buf);
        Cow::Owned(buf)
    }
}

/// Inference attention for `nq` new queries of one sequence at positions `past ..past+nq`, over a
/// cache holding keys/values for positions `0 .. past+nq` (row stride `n_kv_heads·head_dim`).
/// A few queries (decode) read the cache directly in its precision; more (prefill) go through
/// the GEMM on an f32 copy of an f16 cache.
pub fn attention_cached<E: CacheElem>(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    nq: usize,
    past: usize,
    shape: &AttentionShape,
) {
    let (qw, kw) = (shape.q_width(), shape.kv_width());
    assert!(q.len() >= nq * qw && out.len() >= nq * qw);
    assert!(k_cache.len() >= (past + nq) * kw && v_cache.len() >= (past + nq) * kw);
    if nq * shape.group() <= DIRECT_MAX_ROWS {
        return attention_decode(out, q, k_cache, v_cache, nq, past, shape);
    }
    let n = (past + nq) * kw;
    let (k_cache, v_cache) = (E::widened(&k_cache[..n]), E::widened(&v_cache[..n]));
    let (k_cache, v_cache) = (&k_cache[..], &v_cache[..]);
    let mut lse = vec![0.0f32; nq * shape.n_heads];
    let (out_p, lse_p) = (Ptr(out.as_mut_ptr()), Ptr(lse.as_mut_ptr()));
    let run = |scratch: &mut Vec<f32>, kvh: usize| {
        let (out_p, lse_p) = (out_p, lse_p);
        // SAFETY: each kv head's task writes only its group's heads.
        unsafe {
            attend_one_kv_head(
                shape,
                kvh,
                q.as_ptr(),
                qw,
                nq,
                past,
                k_cache.as_ptr(),
                v_cache.as_ptr(),
                kw,
                out_p.0,
                qw,
                lse_p.0,
                shape.n_heads,
                scratch,
            );
        }
    };
    // Parallel over K/V heads once there is enough work.
    if nq * (past + nq) * shape.n_heads >= 4096 {
        (0..shape.n_kv_heads)
            .into_par_iter()
            .for_each_init(Vec::new, |s, h| run(s, h));
    } else {
        let mut scratch = Vec::new();
        (0..shape.n_kv_heads).for_each(|h| run(&mut scratch, h));
    }
}

/// Backward of [`attention_forward`]: writes `dq`, `dk`, `dv` (overwritten, not accumulated).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    segments: &[(usize, usize)],
    shape: &AttentionShape,
) {
    let (qw, kw, d, nh) = (shape.q_width(), shape.kv_width(), shape.head_dim, shape.n_heads);
    let t: usize = segments.iter().map(|s| s.1).sum();
    dk[..t * kw].fill(0.0);
    dv[..t * kw].fill(0.0);
    // delta[t, h] = Σ_d dout · out
    let mut delta = vec![0.0f32; t * nh];
    delta.par_chunks_mut(nh).enumerate().for_each(|(row, dl)| {
        for (h, x) in dl.iter_mut().enumerate() {
            let o = &out[row * qw + h * d..row * qw + (h + 1) * d];
            let g = &dout[row * qw + h * d..row * qw + (h + 1) * d];
            *x = o.iter().zip(g).map(|(a, b)| a * b).sum();
        }
    });
    let (dq_p, dk_p, dv_p) = (Ptr(dq.as_mut_ptr()), Ptr(dk.as_mut_ptr()), Ptr(dv.as_mut_ptr()));
    let tasks: Vec<(usize, usize, usize)> = segments
        .iter()
        .flat_map(|&(s, n)| (0..shape.n_kv_heads).map(move |h| (s, n, h)))
        .collect();
    let scale = shape.scale();
    tasks.par_iter().for_each_init(
        || [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()],
        |[p, dp, qb, gb, tmp], &(start, len, kvh)| {
            let (dq_p, dk_p, dv_p) = (dq_p, dk_p, dv_p);
            let g = shape.group();
            let h0 = kvh * g;
            let kb = k[start * kw..].as_ptr();
            let vb = v[start * kw..].as_ptr();
            let mut qs = 0;
            while qs < len {
                let nb = QUERY_BLOCK.min(len - qs);
                let k0 = shape.first_key(qs);
                let nk = qs + nb - k0;
                let rows = g * nb;
                p.resize(rows * nk, 0.0);
                dp.resize(rows * nk, 0.0);
                qb.resize(rows * d, 0.0);
                gb.resize(rows * d, 0.0);
                tmp.resize(rows * d, 0.0);
                // Stack this group's heads: row j*nb + r is query qs + r of head h0 + j.
                for j in 0..g {
                    for r in 0..nb {
                        let src = (start + qs + r) * qw + (h0 + j) * d;
                        let dst = (j * nb + r) * d;
                        qb[dst..dst + d].copy_from_slice(&q[src..src + d]);
                        gb[dst..dst + d].copy_from_slice(&dout[src..src + d]);
                    }
                }
                // SAFETY: reads stay inside this segment; writes go to dq rows of this group's
                // heads and dk/dv rows of kv head kvh, all owned by this task.
                unsafe {
                    gemm_raw(
                        rows,
                        nk,
                        d,
                        p.as_mut_ptr(),
                        nk,
                        1,
                        qb.as_ptr(),
                        d,
                        1,
                        kb.add(k0 * kw + kvh * d),
                        1,
                        kw,
                        scale,
                        false,
                        shape.bf16,
                    );
                    for j in 0..g {
                        for r in 0..nb {
                            let pos = qs + r;
                            let l = lse[(start + pos) * nh + h0 + j];
                            let lo = shape.first_key(pos) - k0;
                            let hi = pos + 1 - k0;
                            let row = &mut p[(j * nb + r) * nk..(j * nb + r + 1) * nk];
                            row[..lo].fill(0.0);
                            exp_sub_sum(&mut row[lo..hi], l);
                            row[hi..].fill(0.0);
                        }
                    }
                    // dV[k0..] += Pᵀ · dO
                    gemm_raw(
                        nk,
                        d,
                        rows,
                        dv_p.0.add((start + k0) * kw + kvh * d),
                        kw,
                        1,
                        p.as_ptr(),
                        1,
                        nk,
                        gb.as_ptr(),
                        d,
                        1,
                        1.0,
                        true,
                        shape.bf16,
                    );
                    // dP = dO · Vᵀ
                    gemm_raw(
                        rows,
                        nk,
                        d,
                        dp.as_mut_ptr(),
                        nk,
                        1,
                        gb.as_ptr(),
                        d,
                        1,
                        vb.add(k0 * kw + kvh * d),
                        1,
                        kw,
                        1.0,
                        false,
                        shape.bf16,
                    );
                    // dS = P ∘ (dP − delta)
                    for j in 0..g {
                        for r in 0..nb {
                            let dl = delta[(start + qs + r) * nh + h0 + j];
                            let o = (j * nb + r) * nk;
                            for (x, &pp) in dp[o..o + nk].iter_mut().zip(&p[o..o + nk]) {
                                *x = pp * (*x - dl);
                            }
                        }
                    }
                    // dQ = dS · K · scale
                    gemm_raw(
                        rows,
                        d,
                        nk,
                        tmp.as_mut_ptr(),
                        d,
                        1,
                        dp.as_ptr(),
                        nk,
                        1,
                        kb.add(k0 * kw + kvh * d),
                        kw,
                        1,
                        scale,
                        false,
                        shape.bf16,
                    );
                    for j in 0..g {
                        for r in 0..nb {
                            let dst = std::slice::from_raw_parts_mut(
                                dq_p.0.add((start + qs + r) * qw + (h0 + j) * d),
                                d,
                            );
                            dst.copy_from_slice(&tmp[(j * nb + r) * d..(j * nb + r + 1) * d]);
                        }
                    }
                    // dK[k0..] += dSᵀ · Q · scale
                    gemm_raw(
                        nk,
                        d,
                        rows,
                        dk_p.0.add((start + k0) * kw + kvh * d),
                        kw,
                        1,
                        dp.as_ptr(),
                        1,
                        nk,
                        qb.as_ptr(),
                        d,
                        1,
                        scale,
                        true,
                        shape.bf16,
                    );
                }
                qs += nb;
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Direct O(T²) reference of one segment.
    fn reference(q: &[f32], k: &[f32], v: &[f32], segs: &[(usize, usize)], sh: &AttentionShape) -> Vec<f32> {
        let (qw, kw, d) = (sh.q_width(), sh.kv_width(), sh.head_dim);
        let mut out = vec![0.0f32; q.len()];
        for &(s, n) in segs {
            for i in 0..n {
                for h in 0..sh.n_heads {
                    let kvh = h / sh.group();
                    let lo = sh.first_key(i);
                    let scores: Vec<f64> = (lo..=i)
                        .map(|j| {
                            (0..d)
                                .map(|x| {
                                    q[(s + i) * qw + h * d + x] as f64 * k[(s + j) * kw + kvh * d + x] as f64
                                })
                                .sum::<f64>()
                                * sh.scale() as f64
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                    for x in 0..d {
                        out[(s + i) * qw + h * d + x] = (lo..=i)
                            .map(|j| (scores[j - lo] - m).exp() / z * v[(s + j) * kw + kvh * d + x] as f64)
                            .sum::<f64>() as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_reference_and_isolates_segments() {
        for (window, bf16) in [(None, false), (Some(3), false), (None, true), (Some(3), true)] {
            let sh = AttentionShape {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8,
                window,
                bf16,
            };
            let tol = if bf16 { 2e-2 } else { 1e-5 };
            let segs = vec![(0, 5), (5, 70), (75, 2)];
            let t = 77;
            let (q, k, v) = (rand(t * 32, 1), rand(t * 16, 2), rand(t * 16, 3));
            let mut out = vec![0.0; t * 32];
            let mut lse = vec![0.0; t * 4];
            attention_forward(&mut out, &mut lse, &q, &k, &v, &segs, &sh);
            let want = reference(&q, &k, &v, &segs, &sh);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < tol, "{a} vs {b} (bf16 {bf16})");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let sh = AttentionShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            window: Some(4),
            bf16: false,
        };
        let segs = vec![(0, 6), (6, 3)];
        let t = 9;
        let (q, k, v) = (rand(t * 8, 4), rand(t * 4, 5), rand(t * 4, 6));
        let g = rand(t * 8, 7);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            reference(q, k, v, &segs, &sh)
                .iter()
                .zip(&g)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum()
        };
        let mut out = vec![0.0; t * 8];
        let mut lse = vec![0.0; t * 2];
        attention_forward(&mut out, &mut lse, &q, &k, &v, &segs, &sh);
        let (mut dq, mut dk, mut dv) = (vec![0.0; t * 8], vec![0.0; t * 4], vec![0.0; t * 4]);
        attention_backward(&mut dq, &mut dk, &mut dv, &g, &out, &lse, &q, &k, &v, &segs, &sh);
        let h = 1e-3f32;
        let check = |which: usize, grad: &[f32]| {
            for i in 0..grad.len() {
                let mut bufs = [q.clone(), k.clone(), v.clone()];
                bufs[which][i] += h;
                let lp = loss(&bufs[0], &bufs[1], &bufs[2]);
                bufs[which][i] -= 2.0 * h;
                let lm = loss(&bufs[0], &bufs[1], &bufs[2]);
                let num = (lp - lm) / (2.0 * h as f64);
                assert!(
                    (num - grad[i] as f64).abs() < 1e-3,
                    "tensor {which} [{i}] {num} vs {}",
                    grad[i]
                );
            }
        };
        check(0, &dq);
        check(1, &dk);
        check(2, &dv);
    }

    #[test]
    fn cached_attention_equals_training_forward() {
        let sh = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            window: Some(5),
            bf16: false,
        };
        let t = 11;
        let (q, k, v) = (rand(t * 32, 8), rand(t * 16, 9), rand(t * 16, 10));
        let mut want = vec![0.0; t * 32];
        let mut lse = vec![0.0; t * 4];
        attention_forward(&mut want, &mut lse, &q, &k, &v, &[(0, t)], &sh);
        // prefill 7, then decode 4 one at a time
        let mut out = vec![0.0; t * 32];
        attention_cached(&mut out[..7 * 32], &q[..7 * 32], &k, &v, 7, 0, &sh);
        for p in 7..t {
            attention_cached(
                &mut out[p * 32..(p + 1) * 32],
                &q[p * 32..(p + 1) * 32],
                &k,
                &v,
                1,
                p,
                &sh,
            );
        }
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    /// Decode over a long cache takes the chunked f32 path (several chunks of keys, a sliding
    /// window that starts inside a chunk) in either precision; a head size that is not a
    /// multiple of 16 exercises the lane tail, multiples of 16 the register-resident AVX-512
    /// kernel; nine new tokens take the GEMM path instead.
    #[test]
    fn direct_decode_matches_reference() {
        for (head_dim, window, bf16) in [
            (40, None, true),
            (64, Some(100), false),
            (8, None, false),
            (96, Some(300), true),
            (128, None, false),
        ] {
            let sh = AttentionShape {
                n_heads: 6,
                n_kv_heads: 2,
                head_dim,
                window,
                bf16,
            };
            let (qw, kw, t) = (sh.q_width(), sh.kv_width(), 701);
            let (q, k, v) = (rand(t * qw, 21), rand(t * kw, 22), rand(t * kw, 23));
            let want = reference(&q, &k, &v, &[(0, t)], &sh);
            // The f16 cache: the same attention over the rounded keys and values.
            let (k16, v16): (Vec<half::f16>, Vec<half::f16>) = (
                k.iter().map(|&x| half::f16::from_f32(x)).collect(),
                v.iter().map(|&x| half::f16::from_f32(x)).collect(),
            );
            let widen = |h: &[half::f16]| h.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
            let want16 = reference(&q, &widen(&k16), &widen(&v16), &[(0, t)], &sh);
            for nq in [1, 3, 9] {
                let past = t - nq;
                // The GEMM path rounds its inputs to bf16 in fast mode; the decode path is f32.
                let tol = if bf16 && nq == 9 { 1e-3 } else { 1e-5 };
                let mut out = vec![0.0; nq * qw];
                attention_cached(&mut out, &q[past * qw..], &k, &v, nq, past, &sh);
                for (a, b) in out.iter().zip(&want[past * qw..]) {
                    assert!((a - b).abs() < tol, "d={head_dim} nq={nq}: {a} vs {b}");
                }
                attention_cached(&mut out, &q[past * qw..], &k16, &v16, nq, past, &sh);
                for (a, b) in out.iter().zip(&want16[past * qw..]) {
                    assert!((a - b).abs() < tol, "f16 cache d={head_dim} nq={nq}: {a} vs {b}");
                }
            }
        }
    }
}
