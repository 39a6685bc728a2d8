//! Block-quantized weights re-laid for the decode products of AVX-512 VNNI CPUs
//! ([`InterleavedQuant`], made once by [`super::matmul::Weight::pack_for_inference`]).
//!
//! The row-at-a-time products of [`super::quant_dot`] spend most of their time around the integer
//! dot product: a scalar f16 scale converted per block, a horizontal sum per row, one 32-value
//! block per iteration. Here sixteen weight rows are interleaved so that each 32-bit lane of a
//! zmm register belongs to one row: lane `r` of group vector `j` holds values `4j .. 4j + 4` of
//! row `r`'s block, so one `vpdpbusd` against the activation's four bytes broadcast adds four
//! products to each of sixteen rows at once, and eight of them finish a block of 32 for all
//! sixteen. The block's scales and offsets are f32 vectors (one lane per row), so the scaling
//! is two FMAs per block for sixteen rows and the results come out as a vector of sixteen outputs —
//! no horizontal sums (the layout of llama.cpp's repacked `q4_0_8x8` weights, widened to a zmm).
//!
//! Every supported type becomes `w = scale · u + offset` per block of 32 (Q6_K: per 16) with an
//! unsigned integer `u`:
//!
//! | type | `u` | scale | offset | quants per row-block |
//! |---|---|---|---|---|
//! | Q8_0 | `q + 128` | `d` | `−128·d` | 32 bytes |
//! | Q4_0 | `q` | `d` | `−8·d` | 16 bytes (nibbles) |
//! | Q4_1 | `q` | `d` | `m` | 16 bytes |
//! | Q5_0 / Q5_1 | `q` | `d` | `−16·d` / `m` | 16 bytes + 4 bytes of fifth bits |
//! | Q4_K (sub-block `s`) | `q` | `d·sc_s` | `−dmin·m_s` | 16 bytes |
//! | Q6_K (sub-block of 16 `j`) | `q` | `d·sc_j` | `−32·d·sc_j` | 32 bytes |
//!
//! `scale · u + offset` with one rounding (an FMA) is bit for bit what `quant.rs` computes, so
//! the weight is the same matrix, and the products are those of the dequantized weight with the
//! 8-bit activations of [`Q8Rows`] (as [`super::quant_dot`]'s, up to the order of the f32 sums):
//! `Σ_k w_k·x_k = Σ_blocks scale·dx·Σ u·qx + offset·dx·Σ qx`.
//!
//! Many rows (prompts, fast mode) go through the bf16 GEMM on tiles dequantized from this layout
//! ([`super::quant_matmul::forward_dequantizing`]); gradients through it are dequantized too.

use super::quant_dot::Q8Rows;
use super::quant_matmul::QuantRows;
use crate::quant::{QK, QuantTensor, QuantType, k4_scale_min, q5_quants};

/// Weight rows per interleaved group: one per 32-bit lane of a zmm register.
pub const GROUP_ROWS: usize = 16;

/// How a block's unsigned quants are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quants {
    /// Four bits: four 64-byte vectors per group-block; vector `j`'s low nibbles are values
    /// `4j .. 4j + 4` of each lane's row, its high nibbles values `16 + 4j ..`.
    Nibbles,
    /// As `Nibbles`, then eight 64-bit masks: bit `4·lane + i` of mask `j` is the fifth bit of
    /// value `4j + i` of the lane's row.
    FifthBits,
    /// Eight bits: eight 64-byte vectors; vector `j` holds values `4j .. 4j + 4` of each row.
    Bytes,
}

impl Quants {
    /// Bytes per group of [`GROUP_ROWS`] rows × one block of 32 values.
    fn block_bytes(self) -> usize {
        match self {
            Quants::Nibbles => 256,
            Quants::FifthBits => 256 + 64,
            Quants::Bytes => 512,
        }
    }
}

/// A frozen block-quantized `[rows, cols]` matrix in groups of [`GROUP_ROWS`] interleaved rows
/// (see the module docs): for group `g` and block `b` (32 values), the quants at
/// `quants[(g·nb + b)·block_bytes ..]` and sixteen f32 scales and offsets (thirty-two for Q6_K:
/// values 0..16, then 16..32) at `(g·nb + b)·16 ..`. Rows past `rows` in the last group are zero.
#[derive(Debug, Clone)]
pub struct InterleavedQuant {
    /// The ggml type the blocks came from.
    pub ty: QuantType,
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features), a multiple of 32 (of 256 for the K-quants).
    pub cols: usize,
    layout: Quants,
    /// Scales per sixteen values (Q6_K) rather than per 32.
    halves: bool,
    quants: Vec<u8>,
    scales: Vec<f32>,
    offsets: Vec<f32>,
}

/// One row's block of 32 values as `scale · u + offset` (two halves of 16 for Q6_K, else both
/// halves alike).
struct BlockParts {
    u: [u8; QK],
    scale: [f32; 2],
    offset: [f32; 2],
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Block `b` (values `32b .. 32b + 32`) of row `r` of `w`, for the types [`supported`] lists.
fn block_parts(w: &QuantTensor, r: usize, b: usize) -> BlockParts {
    let row = w.row(r);
    let bb = w.ty.block_bytes();
    let mut u = [0u8; QK];
    let one = |s: f32, o: f32| ([s, s], [o, o]);
    let (scale, offset) = match w.ty {
        QuantType::Q8_0 => {
            let blk = &row[b * bb..(b + 1) * bb];
            let d = f16_at(blk, 0);
            for (u, &q) in u.iter_mut().zip(&blk[2..34]) {
                *u = q ^ 0x80; // q + 128 as unsigned
            }
            one(d, -128.0 * d)
        }
        QuantType::Q4_0 | QuantType::Q4_1 => {
            let blk = &row[b * bb..(b + 1) * bb];
            let q0 = if w.ty == QuantType::Q4_0 { 2 } else { 4 };
            for (j, &q) in blk[q0..q0 + 16].iter().enumerate() {
                u[j] = q & 0x0F;
                u[j + 16] = q >> 4;
            }
            let d = f16_at(blk, 0);
            match w.ty {
                QuantType::Q4_0 => one(d, -8.0 * d),
                _ => one(d, f16_at(blk, 2)),
            }
        }
        QuantType::Q5_0 => {
            let blk = &row[b * bb..(b + 1) * bb];
            u = q5_quants(&blk[2..6], &blk[6..22]);
            let d = f16_at(blk, 0);
            one(d, -16.0 * d)
        }
        QuantType::Q5_1 => {
            let blk = &row[b * bb..(b + 1) * bb];
            u = q5_quants(&blk[4..8], &blk[8..24]);
            one(f16_at(blk, 0), f16_at(blk, 2))
        }
        QuantType::Q4_K => {
            let (sb, s) = (b / 8, b % 8);
            let blk = &row[sb * bb..(sb + 1) * bb];
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let (sc, mn) = k4_scale_min(&blk[4..16], s);
            let (c, high) = (s / 2, s % 2 == 1);
            for (l, u) in u.iter_mut().enumerate() {
                let q = blk[16 + 32 * c + l];
                *u = if high { q >> 4 } else { q & 0x0F };
            }
            one(d * sc as f32, -(dmin * mn as f32))
        }
        QuantType::Q6_K => {
            let (sb, s) = (b / 8, b % 8);
            let blk = &row[sb * bb..(sb + 1) * bb];
            let (ql, qh, scales) = (&blk[0..128], &blk[128..192], &blk[192..208]);
            let d = f16_at(blk, 208);
            // Values 32s .. 32s + 32 of the super-block: half h, group k (see quant.rs).
            let (h, k) = (s / 4, s % 4);
            for (l, u) in u.iter_mut().enumerate() {
                let low = (ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0F;
                let high = (qh[32 * h + l] >> (2 * k)) & 3;
                *u = low | (high << 4);
            }
            let j = 8 * h + 2 * k;
            let (s0, s1) = (d * scales[j] as i8 as f32, d * scales[j + 1] as i8 as f32);
            ([s0, s1], [-32.0 * s0, -32.0 * s1])
        }
        other => unreachable!("quant_packed: {other:?} has no interleaved layout"),
    };
    BlockParts { u, scale, offset }
}

/// Whether [`InterleavedQuant::new`] takes this block type.
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

/// Whether this CPU runs the interleaved products (AVX-512 VNNI with BW and FMA): where it does
/// not, weights keep their ggml blocks.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::quant_dot::int8_path() == Some(super::quant_dot::Int8Path::Vnni)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

impl InterleavedQuant {
    /// The blocks of `w` re-laid in groups of sixteen rows; `None` for a type without an
    /// interleaved layout ([`supported`]).
    pub fn new(w: &QuantTensor) -> Option<InterleavedQuant> {
        use rayon::prelude::*;
        let (layout, halves) = match w.ty {
            QuantType::Q8_0 => (Quants::Bytes, false),
            QuantType::Q6_K => (Quants::Bytes, true),
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4_K => (Quants::Nibbles, false),
            QuantType::Q5_0 | QuantType::Q5_1 => (Quants::FifthBits, false),
            _ => return None,
        };
        let nb = w.cols / QK;
        let groups = w.rows.div_ceil(GROUP_ROWS);
        let (qb, sb) = (layout.block_bytes(), if halves { 32 } else { 16 });
        let mut p = InterleavedQuant {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
            layout,
            halves,
            quants: vec![0; groups * nb * qb],
            scales: vec![0.0; groups * nb * sb],
            offsets: vec![0.0; groups * nb * sb],
        };
        if nb == 0 {
            return Some(p);
        }
        p.quants
            .par_chunks_mut(nb * qb)
            .zip(p.scales.par_chunks_mut(nb * sb))
            .zip(p.offsets.par_chunks_mut(nb * sb))
            .enumerate()
            .for_each(|(g, ((quants, scales), offsets))| {
                for lane in 0..GROUP_ROWS.min(w.rows - g * GROUP_ROWS) {
                    let r = g * GROUP_ROWS + lane;
                    for b in 0..nb {
                        let parts = block_parts(w, r, b);
                        let q = &mut quants[b * qb..(b + 1) * qb];
                        let u = &parts.u;
                        match layout {
                            Quants::Bytes => {
                                for j in 0..8 {
                                    q[64 * j + 4 * lane..64 * j + 4 * lane + 4]
                                        .copy_from_slice(&u[4 * j..4 * j + 4]);
                                }
                            }
                            Quants::Nibbles | Quants::FifthBits => {
                                for j in 0..4 {
                                    for i in 0..4 {
                                        q[64 * j + 4 * lane + i] =
                                            (u[4 * j + i] & 0x0F) | ((u[16 + 4 * j + i] & 0x0F) << 4);
                                    }
                                }
                                if layout == Quants::FifthBits {
                                    for j in 0..8 {
                                        for i in 0..4 {
                                            if u[4 * j + i] & 0x10 != 0 {
                                                let bit = 4 * lane + i;
                                                q[256 + 8 * j + bit / 8] |= 1 << (bit % 8);
                                            }
                                        }
                                    }
                                }
                            }
                        }
                        let (s, o) = (
                            &mut scales[b * sb..(b + 1) * sb],
                            &mut offsets[b * sb..(b + 1) * sb],
                        );
                        s[lane] = parts.scale[0];
                        o[lane] = parts.offset[0];
                        if halves {
                            s[16 + lane] = parts.scale[1];
                            o[16 + lane] = parts.offset[1];
                        }
                    }
                }
            });
        Some(p)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.quants.len() + 4 * (self.scales.len() + self.offsets.len())
    }

    /// Blocks of 32 per row.
    fn nb(&self) -> usize {
        self.cols / QK
    }

    /// Scales (and offsets) per group-block.
    fn scales_per_block(&self) -> usize {
        if self.halves { 32 } else { 16 }
    }

    /// The unsigned quants of block `b` of row `r`.
    #[inline(always)]
    fn block_quants(&self, r: usize, b: usize) -> [u8; QK] {
        let (g, lane) = (r / GROUP_ROWS, r % GROUP_ROWS);
        let qb = self.layout.block_bytes();
        let q = &self.quants[(g * self.nb() + b) * qb..(g * self.nb() + b + 1) * qb];
        let mut u = [0u8; QK];
        match self.layout {
            Quants::Bytes => {
                for j in 0..8 {
                    u[4 * j..4 * j + 4].copy_from_slice(&q[64 * j + 4 * lane..64 * j + 4 * lane + 4]);
                }
            }
            Quants::Nibbles | Quants::FifthBits => {
                for j in 0..4 {
                    for i in 0..4 {
                        let v = q[64 * j + 4 * lane + i];
                        u[4 * j + i] = v & 0x0F;
                        u[16 + 4 * j + i] = v >> 4;
                    }
                }
                if self.layout == Quants::FifthBits {
                    for j in 0..8 {
                        let mask = u64::from_le_bytes(q[256 + 8 * j..264 + 8 * j].try_into().unwrap());
                        let bits = (mask >> (4 * lane)) as u8;
                        for i in 0..4 {
                            u[4 * j + i] |= ((bits >> i) & 1) << 4;
                        }
                    }
                }
            }
        }
        u
    }

    /// Row `r`, values `c0..c1`, as f32 into `out`: exactly the values `quant.rs` gives the
    /// original blocks.
    pub fn dequantize_range(&self, r: usize, c0: usize, c1: usize, out: &mut [f32]) {
        assert!(r < self.rows && c0 <= c1 && c1 <= self.cols && out.len() >= c1 - c0);
        #[cfg(target_arch = "x86_64")]
        if super::quant_matmul::has_avx512_blocks() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { self.dequantize_range_avx512(r, c0, c1, out) };
        }
        self.dequantize_range_body(r, c0, c1, out)
    }

    /// [`Self::dequantize_range`] compiled for AVX-512 and FMA (one instruction per `mul_add`).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,fma")]
    unsafe fn dequantize_range_avx512(&self, r: usize, c0: usize, c1: usize, out: &mut [f32]) {
        self.dequantize_range_body(r, c0, c1, out)
    }

    #[inline(always)]
    fn dequantize_range_body(&self, r: usize, c0: usize, c1: usize, out: &mut [f32]) {
        let (g, lane) = (r / GROUP_ROWS, r % GROUP_ROWS);
        let sb = self.scales_per_block();
        let mut c = c0;
        while c < c1 {
            let b = c / QK;
            let u = self.block_quants(r, b);
            let at = (g * self.nb() + b) * sb;
            let half = |h: usize| {
                let i = at + if self.halves { 16 * h } else { 0 } + lane;
                (self.scales[i], self.offsets[i])
            };
            let (h0, h1) = (half(0), half(1));
            let mut vals = [0.0f32; QK];
            for (v, (o, &u)) in vals.iter_mut().zip(&u).enumerate() {
                let (s, off) = if v < 16 { h0 } else { h1 };
                *o = s.mul_add(u as f32, off);
            }
            let (lo, hi) = (c - b * QK, (c1 - b * QK).min(QK));
            out[c - c0..c - c0 + hi - lo].copy_from_slice(&vals[lo..hi]);
            c = b * QK + hi;
        }
    }

    /// The whole matrix as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_range(r, 0, self.cols, o);
        }
        out
    }
}

impl QuantRows for InterleavedQuant {
    fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    fn dequantize_range(&self, r: usize, c0: usize, c1: usize, out: &mut [f32]) {
        InterleavedQuant::dequantize_range(self, r, c0, c1, out)
    }
}

/// A raw output pointer shared by the tasks of [`forward_rows`], which write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (their own groups' columns).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `y[t×out] (+)= x[t×in] · wᵀ` for `t` ≤ 8 rows, the inputs rounded to 8 bits per block of 32
/// ([`Q8Rows`]); parallel over groups of sixteen output rows. Each row's result does not depend
/// on the other rows (the same operations in the same order for any `t`). The CPU must have
/// [`available`].
pub fn forward_rows(y: &mut [f32], x: &[f32], w: &InterleavedQuant, t: usize, accumulate: bool) {
    let (out, inp) = (w.rows, w.cols);
    assert!(
        y.len() >= t * out && x.len() >= t * inp,
        "quant_packed: buffer sizes"
    );
    let a = Q8Rows::new(x, t, inp);
    forward_groups(y, &a, w, t, accumulate, true);
}

/// [`forward_rows`] on quantized rows `a`, over the threads (`parallel`) or on this one.
fn forward_groups(
    y: &mut [f32],
    a: &Q8Rows,
    w: &InterleavedQuant,
    t: usize,
    accumulate: bool,
    parallel: bool,
) {
    use rayon::prelude::*;
    assert!(available(), "quant_packed: the CPU has no AVX-512 VNNI");
    assert!((1..=8).contains(&t), "quant_packed: 1..=8 rows, not {t}");
    let out = w.rows;
    assert!(
        y.len() >= t * out && a.inp == w.cols,
        "quant_packed: buffer sizes"
    );
    let groups = out.div_ceil(GROUP_ROWS);
    let tasks = if parallel {
        (rayon::current_num_threads() * 2).min(groups).max(1)
    } else {
        1
    };
    let per = groups.div_ceil(tasks);
    let yp = OutPtr(y.as_mut_ptr());
    let run = |task: usize| {
        let mut vals = [[0.0f32; GROUP_ROWS]; 8];
        for g in task * per..((task + 1) * per).min(groups) {
            // SAFETY: the CPU has the kernel's features (asserted); `a` holds t rows of w.cols.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                kernels::group(w, g, a, t, &mut vals)
            };
            let (r0, n) = (g * GROUP_ROWS, GROUP_ROWS.min(out - g * GROUP_ROWS));
            for (m, v) in vals[..t].iter().enumerate() {
                for (lane, &v) in v[..n].iter().enumerate() {
                    // SAFETY: row m < t, column r0 + lane < out: inside y (asserted); this task
                    // alone writes group g's columns.
                    unsafe {
                        let dst = yp.get().add(m * out + r0 + lane);
                        *dst = if accumulate { *dst + v } else { v };
                    }
                }
            }
        }
    };
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// `y[t×out] = x · wᵀ` for any number of rows as the decode products compute them: chunks of
/// eight rows over the threads, each row's result the one it would get alone (for CPUs without a
/// bf16 GEMM, where this beats f32 products on dequantized panels).
pub fn forward_in_decode_chunks(y: &mut [f32], x: &[f32], w: &InterleavedQuant, t: usize) {
    use rayon::prelude::*;
    let (out, inp) = (w.rows, w.cols);
    assert!(
        y.len() >= t * out && x.len() >= t * inp,
        "quant_packed: buffer sizes"
    );
    y[..t * out]
        .par_chunks_mut(8 * out)
        .zip(x[..t * inp].par_chunks(8 * inp))
        .for_each(|(yc, xc)| {
            let n = xc.len() / inp;
            let a = Q8Rows::new(xc, n, inp);
            forward_groups(yc, &a, w, n, false, false);
        });
}

#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::{GROUP_ROWS, InterleavedQuant, Q8Rows, QK, Quants};
    use std::arch::x86_64::*;

    /// The sixteen outputs of group `g` for each of the `t` rows of `a` into `vals[m]`.
    ///
    /// # Safety
    /// The CPU must have avx512f/bw and avx512vnni; `a` holds `t` (1..=8) rows of `w.cols`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    pub(super) unsafe fn group(
        w: &InterleavedQuant,
        g: usize,
        a: &Q8Rows,
        t: usize,
        vals: &mut [[f32; GROUP_ROWS]; 8],
    ) {
        macro_rules! dispatch {
            ($($t:literal)*) => {
                match (t, w.layout, w.halves) {
                    $(
                        ($t, Quants::Nibbles, _) => block_rows::<$t, 0, false>(w, g, a, vals),
                        ($t, Quants::FifthBits, _) => block_rows::<$t, 1, false>(w, g, a, vals),
                        ($t, Quants::Bytes, false) => block_rows::<$t, 2, false>(w, g, a, vals),
                        ($t, Quants::Bytes, true) => block_rows::<$t, 2, true>(w, g, a, vals),
                    )*
                    _ => unreachable!("quant_packed: 1..=8 rows"),
                }
            };
        }
        // SAFETY: as this function's contract.
        unsafe { dispatch!(1 2 3 4 5 6 7 8) }
    }

    /// [`group`] for `T` rows, layout `L` (0 nibbles, 1 nibbles + fifth bits, 2 bytes) and
    /// scales per 16 (`H`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
    unsafe fn block_rows<const T: usize, const L: u8, const H: bool>(
        w: &InterleavedQuant,
        g: usize,
        a: &Q8Rows,
        vals: &mut [[f32; GROUP_ROWS]; 8],
    ) {
        let nb = w.cols / QK;
        let qb = w.layout.block_bytes();
        let sb = w.scales_per_block();
        assert!(a.inp == w.cols && a.q.len() >= T * a.inp && a.d.len() >= T * nb);
        assert!(w.quants.len() >= (g + 1) * nb * qb && w.scales.len() >= (g + 1) * nb * sb);
        // SAFETY (every raw read below): group g's nb blocks of quants, scales and offsets lie in
        // the buffers, and block b < nb of each of the T activation rows in `a` (asserted).
        let quants = unsafe { w.quants.as_ptr().add(g * nb * qb) };
        let scales = unsafe { w.scales.as_ptr().add(g * nb * sb) };
        let offsets = unsafe { w.offsets.as_ptr().add(g * nb * sb) };
        let (xq, xd, xds, xs16) = (a.q.as_ptr(), a.d.as_ptr(), a.ds.as_ptr(), a.s16.as_ptr());
        let inp = a.inp;
        let mask = _mm512_set1_epi8(0x0F);
        let sixteen = _mm512_set1_epi8(0x10);
        // Even blocks into acc0, odd into acc1: two independent FMA chains per row.
        let mut acc0 = [_mm512_setzero_ps(); T];
        let mut acc1 = [_mm512_setzero_ps(); T];
        #[inline(always)]
        unsafe fn one_block<const T: usize, const L: u8, const H: bool>(
            b: usize,
            q: *const u8,
            scales: *const f32,
            offsets: *const f32,
            (xq, xd, xds, xs16, inp, nb): (*const i8, *const f32, *const f32, *const i32, usize, usize),
            (mask, sixteen): (__m512i, __m512i),
            acc: &mut [__m512; T],
        ) {
            // SAFETY: see block_rows.
            unsafe {
                let u: [__m512i; 8] = match L {
                    2 => core::array::from_fn(|j| _mm512_loadu_si512(q.add(64 * j) as *const _)),
                    _ => {
                        let v: [__m512i; 4] =
                            core::array::from_fn(|j| _mm512_loadu_si512(q.add(64 * j) as *const _));
                        let mut u: [__m512i; 8] = core::array::from_fn(|j| {
                            if j < 4 {
                                _mm512_and_si512(v[j], mask)
                            } else {
                                _mm512_and_si512(_mm512_srli_epi16::<4>(v[j - 4]), mask)
                            }
                        });
                        if L == 1 {
                            for (j, u) in u.iter_mut().enumerate() {
                                let bits = (q.add(256 + 8 * j) as *const u64).read_unaligned();
                                *u = _mm512_or_si512(*u, _mm512_maskz_mov_epi8(u64::from_le(bits), sixteen));
                            }
                        }
                        u
                    }
                };
                let s0 = _mm512_loadu_ps(scales);
                let o0 = _mm512_loadu_ps(offsets);
                let (s1, o1) = if H {
                    (_mm512_loadu_ps(scales.add(16)), _mm512_loadu_ps(offsets.add(16)))
                } else {
                    (s0, o0)
                };
                for (m, acc) in acc.iter_mut().enumerate() {
                    let x = xq.add(m * inp + b * QK) as *const i32;
                    let bx = |j: usize| _mm512_set1_epi32(x.add(j).read_unaligned());
                    let z = _mm512_setzero_si512();
                    let lo = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, u[0], bx(0)), u[1], bx(1));
                    let lo = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(lo, u[2], bx(2)), u[3], bx(3));
                    let hi = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, u[4], bx(4)), u[5], bx(5));
                    let hi = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(hi, u[6], bx(6)), u[7], bx(7));
                    let i = m * nb + b;
                    let dx = _mm512_set1_ps(*xd.add(i));
                    let mut a = *acc;
                    if H {
                        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(s0, dx), a);
                        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(s1, dx), a);
                        let d = *xd.add(i);
                        a = _mm512_fmadd_ps(o0, _mm512_set1_ps(d * *xs16.add(2 * i) as f32), a);
                        a = _mm512_fmadd_ps(o1, _mm512_set1_ps(d * *xs16.add(2 * i + 1) as f32), a);
                    } else {
                        let dot = _mm512_add_epi32(lo, hi);
                        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s0, dx), a);
                        a = _mm512_fmadd_ps(o0, _mm512_set1_ps(*xds.add(i)), a);
                    }
                    *acc = a;
                }
            }
        }
        let xs = (xq, xd, xds, xs16, inp, nb);
        let consts = (mask, sixteen);
        let mut b = 0;
        // SAFETY: b < nb throughout.
        unsafe {
            while b + 1 < nb {
                one_block::<T, L, H>(
                    b,
                    quants.add(b * qb),
                    scales.add(b * sb),
                    offsets.add(b * sb),
                    xs,
                    consts,
                    &mut acc0,
                );
                let c = b + 1;
                one_block::<T, L, H>(
                    c,
                    quants.add(c * qb),
                    scales.add(c * sb),
                    offsets.add(c * sb),
                    xs,
                    consts,
                    &mut acc1,
                );
                b += 2;
            }
            if b < nb {
                one_block::<T, L, H>(
                    b,
                    quants.add(b * qb),
                    scales.add(b * sb),
                    offsets.add(b * sb),
                    xs,
                    consts,
                    &mut acc0,
                );
            }
        }
        for m in 0..T {
            // SAFETY: vals[m] holds sixteen f32.
            unsafe { _mm512_storeu_ps(vals[m].as_mut_ptr(), _mm512_add_ps(acc0[m], acc1[m])) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant_matmul::tests::{rand, random_blocks};
    use super::*;
    use crate::quant::QK_K;

    const TYPES: [QuantType; 7] = [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q4_K,
        QuantType::Q6_K,
    ];

    /// The re-laid blocks dequantize to exactly the values of the original ones, whole rows and
    /// ranges cutting blocks, on a row count that leaves the last group part-empty.
    #[test]
    fn interleaved_blocks_dequantize_bit_for_bit() {
        for (i, ty) in TYPES.into_iter().enumerate() {
            let (rows, cols) = (37usize, 2 * QK_K);
            let w = random_blocks(ty, rows, cols, 3 + i as u64);
            let p = InterleavedQuant::new(&w).unwrap();
            let (a, b) = (w.to_f32(), p.to_f32());
            // Equal as numbers: a zero can be +0 here where quant.rs gives −0 (a negative Q6_K
            // scale times q − 32 = 0).
            assert!(a == b, "{ty:?}: whole rows");
            let (mut x, mut y) = (vec![0.0f32; 300], vec![0.0f32; 300]);
            for (r, c0, c1) in [
                (0usize, 5usize, 305usize),
                (36, 31, 33),
                (17, 480, 512),
                (20, 0, 0),
            ] {
                w.dequantize_range(r, c0, c1, &mut x);
                p.dequantize_range(r, c0, c1, &mut y);
                assert_eq!(x[..c1 - c0], y[..c1 - c0], "{ty:?} row {r} {c0}..{c1}");
            }
        }
        assert!(InterleavedQuant::new(&random_blocks(QuantType::Q3_K, 3, QK_K, 1)).is_none());
    }

    /// The interleaved products equal the dequantized weight times the 8-bit-rounded activations
    /// (to f32 rounding), for 1..8 rows, and each row's result is the same bits whatever rows
    /// come with it; `accumulate` adds.
    #[test]
    fn interleaved_products_equal_the_dequantized_weight_times_the_rounded_activations() {
        if !available() {
            eprintln!("skipping: this CPU has no AVX-512 VNNI (weights keep their ggml blocks)");
            return;
        }
        for (i, ty) in TYPES.into_iter().enumerate() {
            let (n, inp) = (37usize, 512usize);
            let w = random_blocks(ty, n, inp, 7 + i as u64);
            let p = InterleavedQuant::new(&w).unwrap();
            let wd = w.to_f32();
            let rows = 19; // prompt chunks of 8, 8 and 3
            let mut x = rand(rows * inp, 11);
            x[5] *= 40.0; // an outlier: one block's scale much larger than the others
            let mut alone = vec![0.0f32; rows * n];
            for m in 0..rows {
                forward_rows(&mut alone[m * n..], &x[m * inp..], &p, 1, false);
            }
            for t in [1usize, 3, 8] {
                let a = Q8Rows::new(&x, t, inp);
                let xd = a.dequantized();
                let mut y = vec![0.25f32; t * n];
                forward_rows(&mut y, &x, &p, t, true);
                for r in 0..n {
                    for m in 0..t {
                        let prods = (0..inp).map(|k| wd[r * inp + k] as f64 * xd[m * inp + k] as f64);
                        let want: f64 = prods.clone().sum();
                        let scale: f64 = prods.map(f64::abs).sum();
                        let got = y[m * n + r] as f64 - 0.25;
                        assert!(
                            (got - want).abs() <= 1e-5 * scale + 1e-6,
                            "{ty:?} t {t} [{m}][{r}]: {got} vs {want}"
                        );
                    }
                }
                // Each row as alone, bit for bit.
                let mut y1 = vec![0.0f32; t * n];
                forward_rows(&mut y1, &x, &p, t, false);
                let same = y1.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{ty:?} t {t}: a row's result depends on the rows with it");
            }
            // Prompt chunks: every row as alone.
            let mut y = vec![f32::NAN; rows * n];
            forward_in_decode_chunks(&mut y, &x, &p, rows);
            assert!(
                y.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{ty:?} chunks"
            );
        }
    }
}
