//! ggml's block-quantized tensor types: their block layouts, dequantization, and
//! [`QuantTensor`], a matrix kept in its blocks (a frozen GGUF base the matrix products read
//! directly, see `cpu/quant_matmul.rs`).
//!
//! Dequantization of ggml's block-quantized tensor types, bit-identical to llama.cpp's reference
//! `dequantize_row_*` (`ggml/src/ggml-quants.c`, block structs in `ggml/src/ggml-common.h`) and to
//! gguf-py's `gguf.quants.dequantize`.
//!
//! Every type packs a row (the innermost dimension) into fixed-size blocks: 32 values ([`QK`]) for
//! the legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and IQ4_NL, 256-value super-blocks ([`QK_K`])
//! for the K-quants (Q2_K … Q6_K) and IQ4_XS, so a row length must be a multiple of the block
//! size. Bytes are little-endian; the scales `d` and minimums `m`/`dmin` are IEEE f16, widened
//! exactly to f32. Each function below documents its block layout, byte offsets first.
//!
//! The arithmetic is ggml's: f32, integer quants converted to f32, products left to right
//! (`d * sc * q` is `(d * sc) * q`), then the minimum added or subtracted. Every product in these
//! formulas is exact in f32 (an f16 times small integers: at most 23 significant bits), so only
//! that final `+ m` / `− min` can round, once; the results therefore do not depend on how
//! the products are grouped or on FMA contraction. Every function writes
//! `min(bytes / block_bytes, out / block_values)` blocks.

use half::f16;

/// Values per block of the legacy types and IQ4_NL (ggml's `QK4_0`, `QK8_0`, `QK4_NL`, …).
pub const QK: usize = 32;
/// Values per super-block of the K-quants and IQ4_XS (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// Block sizes in bytes (`sizeof(block_*)` in ggml-common.h).
pub const Q4_0_BYTES: usize = 18;
pub const Q4_1_BYTES: usize = 20;
pub const Q5_0_BYTES: usize = 22;
pub const Q5_1_BYTES: usize = 24;
pub const Q8_0_BYTES: usize = 34;
pub const Q2_K_BYTES: usize = 84;
pub const Q3_K_BYTES: usize = 110;
pub const Q4_K_BYTES: usize = 144;
pub const Q5_K_BYTES: usize = 176;
pub const Q6_K_BYTES: usize = 210;
pub const IQ4_NL_BYTES: usize = 18;
pub const IQ4_XS_BYTES: usize = 136;

/// The 16 non-linear levels of IQ4_NL and IQ4_XS (ggml's `kvalues_iq4nl`).
const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The f16 at `b[i..i + 2]`, as f32 (exact).
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Q4_0, 18 bytes per 32 values: `d` f16 at 0, 16 bytes of 4-bit quants at 2. Byte `j` holds value
/// `j` in its low nibble and value `j + 16` in its high nibble; `x = (q − 8) · d`.
#[inline]
pub fn dequantize_q4_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(Q4_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for (j, &q) in b[2..18].iter().enumerate() {
            y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
            y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1, 20 bytes per 32 values: `d` f16 at 0, `m` f16 at 2, 16 bytes of 4-bit quants at 4
/// (nibbles as Q4_0); `x = q · d + m`.
#[inline]
pub fn dequantize_q4_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(Q4_1_BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        for (j, &q) in b[4..20].iter().enumerate() {
            y[j] = (q & 0x0F) as f32 * d + m;
            y[j + 16] = (q >> 4) as f32 * d + m;
        }
    }
}

/// The 5-bit quants of a Q5_0/Q5_1 block: `qh` is a little-endian u32 whose bit `i` is the fifth
/// bit of value `i`; `qs` holds the low 4 bits, nibbles as Q4_0.
pub(crate) fn q5_quants(qh: &[u8], qs: &[u8]) -> [u8; QK] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; QK];
    for (j, &b) in qs.iter().enumerate() {
        q[j] = (b & 0x0F) | ((((qh >> j) << 4) & 0x10) as u8);
        q[j + 16] = (b >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
    }
    q
}

/// Q5_0, 22 bytes per 32 values: `d` f16 at 0, `qh` (4 bytes, the fifth bits) at 2, 16 bytes of
/// low nibbles at 6 (see [`q5_quants`]); `x = (q − 16) · d`.
#[inline]
pub fn dequantize_q5_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(Q5_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for (y, &q) in y.iter_mut().zip(&q5_quants(&b[2..6], &b[6..22])) {
            *y = (q as i32 - 16) as f32 * d;
        }
    }
}

/// Q5_1, 24 bytes per 32 values: `d` f16 at 0, `m` f16 at 2, `qh` at 4, low nibbles at 8 (as
/// Q5_0); `x = q · d + m`.
#[inline]
pub fn dequantize_q5_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(Q5_1_BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        for (y, &q) in y.iter_mut().zip(&q5_quants(&b[4..8], &b[8..24])) {
            *y = q as f32 * d + m;
        }
    }
}

/// Q8_0, 34 bytes per 32 values: `d` f16 at 0, 32 int8 quants at 2; `x = q · d`.
#[inline]
pub fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for (y, &q) in y.iter_mut().zip(&b[2..]) {
            *y = (q as i8) as f32 * d;
        }
    }
}

/// Q2_K, 84 bytes per 256 values: 16 bytes of sub-block `scales` at 0, 64 bytes of 2-bit quants
/// `qs` at 16, `d` f16 at 80, `dmin` f16 at 82. Sixteen sub-blocks of 16 values; sub-block `s` has
/// scale `d · (scales[s] & 15)` and minimum `dmin · (scales[s] >> 4)`, and `x = scale · q − min`.
/// Value `128h + 32j + l` (half `h` < 2, `j` < 4, `l` < 32) is bits `2j..2j+2` of `qs[32h + l]`, in
/// sub-block `8h + 2j + l / 16`.
#[inline]
pub fn dequantize_q2_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(Q2_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let (scales, qs) = (&b[0..16], &b[16..80]);
        let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
        for h in 0..2 {
            for j in 0..4 {
                for l in 0..32 {
                    let sc = scales[8 * h + 2 * j + l / 16];
                    let dl = d * (sc & 0x0F) as f32;
                    let ml = dmin * (sc >> 4) as f32;
                    let q = (qs[32 * h + l] >> (2 * j)) & 3;
                    y[128 * h + 32 * j + l] = dl * q as f32 - ml;
                }
            }
        }
    }
}

/// The 6-bit scale of Q3_K sub-block `s` (< 16), before its −32 offset: the low 4 bits are the low
/// (`s` < 8) or high nibble of `scales[s % 8]`, the top 2 bits are bits `2(s / 4)..` of
/// `scales[8 + s % 4]`.
fn q3_k_scale(scales: &[u8], s: usize) -> i32 {
    let low = if s < 8 {
        scales[s] & 0x0F
    } else {
        scales[s - 8] >> 4
    };
    let high = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
    (low | (high << 4)) as i32
}

/// Q3_K, 110 bytes per 256 values: 32 bytes of high bits `hmask` at 0, 64 bytes of low 2-bit quants
/// `qs` at 32, 12 bytes of packed 6-bit `scales` at 96 (see [`q3_k_scale`]), `d` f16 at 108. Sixteen
/// sub-blocks of 16; `x = d · (scale − 32) · (q − 4·(1 − hbit))`, i.e. the quant is offset by 4 when
/// its `hmask` bit is *clear*. Value `128h + 32j + l` takes bits `2j..2j+2` of `qs[32h + l]`, bit
/// `4h + j` of `hmask[l]`, and sub-block `8h + 2j + l / 16`.
#[inline]
pub fn dequantize_q3_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(Q3_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
        let d = f16_at(b, 108);
        for h in 0..2 {
            for j in 0..4 {
                let m = 1u8 << (4 * h + j);
                for l in 0..32 {
                    let dl = d * (q3_k_scale(scales, 8 * h + 2 * j + l / 16) - 32) as f32;
                    let low = ((qs[32 * h + l] >> (2 * j)) & 3) as i32;
                    let q = low - if hmask[l] & m != 0 { 0 } else { 4 };
                    y[128 * h + 32 * j + l] = dl * q as f32;
                }
            }
        }
    }
}

/// The 6-bit scale and minimum of sub-block `j` (< 8) of a Q4_K/Q5_K block, packed in 12 bytes
/// (ggml's `get_scale_min_k4`): for `j` < 4 the low 6 bits of bytes `j` and `j + 4`; otherwise
/// the low and high nibble of byte `j + 4` with, on top, the high 2 bits of bytes `j − 4` and `j`.
pub(crate) fn k4_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Q4_K, 144 bytes per 256 values: `d` f16 at 0, `dmin` f16 at 2, 12 bytes of packed 6-bit scales
/// and minimums at 4 (see [`k4_scale_min`]), 128 bytes of 4-bit quants at 16. Eight sub-blocks of
/// 32; sub-block `s` has scale `d · sc[s]`, minimum `dmin · m[s]`, and `x = scale · q − min`. Each
/// 32-byte group `c` (< 4) of quants holds sub-block `2c` in its low nibbles and `2c + 1` in its
/// high nibbles.
#[inline]
pub fn dequantize_q4_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(Q4_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, qs) = (&b[4..16], &b[16..144]);
        for c in 0..4 {
            let (sc1, m1) = k4_scale_min(scales, 2 * c);
            let (sc2, m2) = k4_scale_min(scales, 2 * c + 1);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            for l in 0..32 {
                let q = qs[32 * c + l];
                y[64 * c + l] = d1 * (q & 0x0F) as f32 - m1;
                y[64 * c + 32 + l] = d2 * (q >> 4) as f32 - m2;
            }
        }
    }
}

/// Q5_K, 176 bytes per 256 values: `d` f16 at 0, `dmin` f16 at 2, 12 bytes of scales and minimums
/// at 4 (as Q4_K), 32 bytes of fifth bits `qh` at 16, 128 bytes of low nibbles at 48 (as Q4_K).
/// Value `l` of sub-block `s` (< 8) has its fifth bit in bit `s` of `qh[l]`; `x = scale · q − min`.
#[inline]
pub fn dequantize_q5_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(Q5_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
        for c in 0..4 {
            let (sc1, m1) = k4_scale_min(scales, 2 * c);
            let (sc2, m2) = k4_scale_min(scales, 2 * c + 1);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
            for l in 0..32 {
                let q = qs[32 * c + l];
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                y[64 * c + l] = d1 * ((q & 0x0F) + h1) as f32 - m1;
                y[64 * c + 32 + l] = d2 * ((q >> 4) + h2) as f32 - m2;
            }
        }
    }
}

/// Q6_K, 210 bytes per 256 values: 128 bytes of low nibbles `ql` at 0, 64 bytes of high 2-bit
/// pairs `qh` at 128, 16 int8 sub-block `scales` at 192, `d` f16 at 208. Sixteen sub-blocks of 16;
/// `x = d · scale · (q − 32)` with 6-bit `q`. In half `h` (< 2; `ql` bytes `64h..`, `qh` bytes
/// `32h..`), value `128h + 32k + l` (`k` < 4, `l` < 32) takes the low (`k` < 2) or high nibble of
/// `ql[64h + 32(k % 2) + l]`, bits `2k..2k+2` of `qh[32h + l]`, and scale `8h + 2k + l / 16`.
#[inline]
pub fn dequantize_q6_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(Q6_K_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
        let d = f16_at(b, 208);
        for h in 0..2 {
            for k in 0..4 {
                for l in 0..32 {
                    let low = (ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0F;
                    let high = (qh[32 * h + l] >> (2 * k)) & 3;
                    let q = (low | (high << 4)) as i32 - 32;
                    let sc = scales[8 * h + 2 * k + l / 16] as i8;
                    y[128 * h + 32 * k + l] = d * sc as f32 * q as f32;
                }
            }
        }
    }
}

/// IQ4_NL, 18 bytes per 32 values: `d` f16 at 0, 16 bytes of 4-bit indices at 2 (nibbles as Q4_0)
/// into the non-linear levels [`KVALUES_IQ4NL`]; `x = d · kvalues[q]`.
#[inline]
pub fn dequantize_iq4_nl(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(IQ4_NL_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for (j, &q) in b[2..18].iter().enumerate() {
            y[j] = d * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32;
            y[j + 16] = d * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
        }
    }
}

/// IQ4_XS, 136 bytes per 256 values: `d` f16 at 0, `scales_h` (u16) at 2, 4 bytes of `scales_l` at
/// 4, 128 bytes of 4-bit indices at 8. Eight sub-blocks of 32; sub-block `s` has the 6-bit scale
/// `ls` = nibble `s % 2` of `scales_l[s / 2]` | bits `2s..2s+2` of `scales_h` << 4, and
/// `x = d · (ls − 32) · kvalues[q]`; its 16 index bytes (at `8 + 16s`) hold values `0..16` in the
/// low nibbles and `16..32` in the high ones (as IQ4_NL).
#[inline]
pub fn dequantize_iq4_xs(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(IQ4_XS_BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 0);
        let scales_h = u16::from_le_bytes([b[2], b[3]]);
        let (scales_l, qs) = (&b[4..8], &b[8..136]);
        for s in 0..8 {
            let low = (scales_l[s / 2] >> (4 * (s % 2))) & 0x0F;
            let high = ((scales_h >> (2 * s)) & 3) as u8;
            let dl = d * ((low | (high << 4)) as i32 - 32) as f32;
            for (j, &q) in qs[16 * s..16 * s + 16].iter().enumerate() {
                y[32 * s + j] = dl * KVALUES_IQ4NL[(q & 0x0F) as usize] as f32;
                y[32 * s + 16 + j] = dl * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
            }
        }
    }
}

/// A ggml block-quantized type (the block quants GGUF files store; plain floats are not here).
#[allow(non_camel_case_types)] // ggml's names: Q4_K, IQ4_NL, …
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
}

impl QuantType {
    /// Values per block: [`QK`] or [`QK_K`].
    pub fn block_size(self) -> usize {
        use QuantType::*;
        match self {
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | IQ4_NL => QK,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | IQ4_XS => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        use QuantType::*;
        match self {
            Q4_0 => Q4_0_BYTES,
            Q4_1 => Q4_1_BYTES,
            Q5_0 => Q5_0_BYTES,
            Q5_1 => Q5_1_BYTES,
            Q8_0 => Q8_0_BYTES,
            Q2_K => Q2_K_BYTES,
            Q3_K => Q3_K_BYTES,
            Q4_K => Q4_K_BYTES,
            Q5_K => Q5_K_BYTES,
            Q6_K => Q6_K_BYTES,
            IQ4_NL => IQ4_NL_BYTES,
            IQ4_XS => IQ4_XS_BYTES,
        }
    }

    /// Dequantizes whole blocks of `bytes` into `out` (as many as both hold).
    #[inline]
    pub fn dequantize(self, bytes: &[u8], out: &mut [f32]) {
        use QuantType::*;
        match self {
            Q4_0 => dequantize_q4_0(bytes, out),
            Q4_1 => dequantize_q4_1(bytes, out),
            Q5_0 => dequantize_q5_0(bytes, out),
            Q5_1 => dequantize_q5_1(bytes, out),
            Q8_0 => dequantize_q8_0(bytes, out),
            Q2_K => dequantize_q2_k(bytes, out),
            Q3_K => dequantize_q3_k(bytes, out),
            Q4_K => dequantize_q4_k(bytes, out),
            Q5_K => dequantize_q5_k(bytes, out),
            Q6_K => dequantize_q6_k(bytes, out),
            IQ4_NL => dequantize_iq4_nl(bytes, out),
            IQ4_XS => dequantize_iq4_xs(bytes, out),
        }
    }
}

/// A row-major matrix `[rows, cols]` kept in ggml blocks: each row is `cols / block_size` blocks
/// of [`QuantType::block_bytes`], rows one after another (a GGUF tensor's bytes as they are, rows
/// possibly reordered). It is read-only: a frozen base weight.
#[derive(Debug, Clone)]
pub struct QuantTensor {
    /// The block type.
    pub ty: QuantType,
    /// `rows · row_bytes()` bytes.
    pub data: Vec<u8>,
    /// Rows (output features of a linear weight).
    pub rows: usize,
    /// Columns (input features), a multiple of the block size.
    pub cols: usize,
}

impl QuantTensor {
    /// Wraps the blocks of a `[rows, cols]` matrix.
    ///
    /// # Panics
    /// If `cols` is not a multiple of the block size or `data` is not `rows` rows of blocks.
    pub fn new(ty: QuantType, data: Vec<u8>, rows: usize, cols: usize) -> QuantTensor {
        assert!(
            cols.is_multiple_of(ty.block_size()),
            "{ty:?} rows are blocks of {} values, not {cols}",
            ty.block_size()
        );
        let q = QuantTensor { ty, data, rows, cols };
        assert_eq!(
            q.data.len(),
            rows * q.row_bytes(),
            "{ty:?} [{rows}, {cols}]: byte count"
        );
        q
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.block_bytes()
    }

    /// The blocks of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Dequantizes `row[c0..c1]` into `out` (`c1 − c0` values); blocks only partly inside the
    /// range are dequantized whole into a small buffer.
    #[inline]
    pub fn dequantize_range(&self, r: usize, c0: usize, c1: usize, out: &mut [f32]) {
        assert!(c0 <= c1 && c1 <= self.cols && out.len() >= c1 - c0);
        let (bs, bb) = (self.ty.block_size(), self.ty.block_bytes());
        let row = self.row(r);
        let mut c = c0;
        let mut tmp = [0.0f32; QK_K];
        // The whole blocks in one call (one type dispatch), then the partial ones at the ends.
        let (first, last) = (c0.div_ceil(bs) * bs, c1 / bs * bs);
        if first < last {
            self.ty.dequantize(
                &row[first / bs * bb..last / bs * bb],
                &mut out[first - c0..last - c0],
            );
        }
        while c < c1 {
            if c == first && first < last {
                c = last;
                continue;
            }
            let (b, off) = (c / bs, c % bs);
            let block = &row[b * bb..(b + 1) * bb];
            let n = (bs - off).min(c1 - c);
            if off == 0 && n == bs {
                self.ty.dequantize(block, &mut out[c - c0..c - c0 + bs]);
            } else {
                self.ty.dequantize(block, &mut tmp[..bs]);
                out[c - c0..c - c0 + n].copy_from_slice(&tmp[off..off + n]);
            }
            c += n;
        }
    }

    /// The whole matrix as f32 (export, tests).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_range(r, 0, self.cols, o);
        }
        out
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}
