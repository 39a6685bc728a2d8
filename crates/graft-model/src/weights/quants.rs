//! Dequantization of ggml's block-quantized tensor types, bit-identical to llama.cpp's reference
//! `dequantize_row_*` (`ggml/src/ggml-quants.c`, block structs in `ggml/src/ggml-common.h`) and to
//! gguf-py's `gguf.quants.dequantize`.
//!
//! Every type packs a row (the innermost dimension) into fixed-size blocks of 32 values ([`QK`]),
//! so a row length must be a multiple of the block size. Bytes are little-endian; the scales `d`
//! and minimums `m` are IEEE f16, widened exactly to f32. Each function below documents its block
//! layout, byte offsets first.
//!
//! The arithmetic is ggml's: f32, integer quants converted to f32, in ggml's order. Every product
//! in these formulas is exact in f32 (an f16 times small integers), so only a final `+ m` can
//! round, once; the results therefore do not depend on how the products are grouped or on FMA
//! contraction. Every function writes `min(bytes / block_bytes, out / block_values)` blocks.

use half::f16;

/// Values per block of Q4_0, Q4_1 and Q8_0 (ggml's `QK4_0`, `QK4_1`, `QK8_0`).
pub(super) const QK: usize = 32;

/// Block sizes in bytes (`sizeof(block_*)` in ggml-common.h).
pub(super) const Q4_0_BYTES: usize = 18;
pub(super) const Q4_1_BYTES: usize = 20;
pub(super) const Q8_0_BYTES: usize = 34;

/// The f16 at `b[i..i + 2]`, as f32 (exact).
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Q4_0, 18 bytes per 32 values: `d` f16 at 0, 16 bytes of 4-bit quants at 2. Byte `j` holds value
/// `j` in its low nibble and value `j + 16` in its high nibble; `x = (q − 8) · d`.
pub(super) fn dequantize_q4_0(bytes: &[u8], out: &mut [f32]) {
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
pub(super) fn dequantize_q4_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(Q4_1_BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        for (j, &q) in b[4..20].iter().enumerate() {
            y[j] = (q & 0x0F) as f32 * d + m;
            y[j + 16] = (q >> 4) as f32 * d + m;
        }
    }
}

/// Q8_0, 34 bytes per 32 values: `d` f16 at 0, 32 int8 quants at 2; `x = q · d`.
pub(super) fn dequantize_q8_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for (y, &q) in y.iter_mut().zip(&b[2..]) {
            *y = (q as i8) as f32 * d;
        }
    }
}
