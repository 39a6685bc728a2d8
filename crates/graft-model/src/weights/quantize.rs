//! Quantization for `graft export gguf --quant`: the per-tensor type mix llama.cpp's quantizer picks
//! for a file type ([`tensor_types`]) and ggml's reference quantizers ([`quantize`]), the inverse of
//! the dequantizers in `quants.rs`.
//!
//! Everything here follows llama.cpp (`src/llama-quant.cpp`, `ggml/src/ggml-quants.c`,
//! `ggml/src/ggml-impl.h`), without an importance matrix and with default quantize parameters, so
//! that a graft export is byte for byte the file `llama-quantize` would write from the same f32
//! weights. ggml builds `ggml-quants.c` into `ggml-base` without `-march` flags, so there is no FMA
//! and hence no contraction: every formula below is written as plain f32 products and sums in the
//! C source's order, and must stay that way (no `mul_add`, no reassociation).
//!
//! Checked against llama.cpp itself (`llama_model_quantize` via llama-cpp-python, and gguf-py) by
//! `crates/graft-model/tests/gguf_quantize.rs` on `tests/fixtures/gguf_quantize/cases.json`.

use super::DType;
use graft_kernels::quant::{
    Q2_K_BYTES, Q3_K_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q5_K_BYTES,
    Q6_K_BYTES, Q8_0_BYTES, QK, QK_K,
};
use half::f16;
use rayon::prelude::*;

/// What `graft export gguf --quant` writes: llama.cpp's file types (`llama_ftype`).
#[allow(non_camel_case_types)] // llama.cpp's names: Q4_K_M, …
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// Every tensor f32 (`LLAMA_FTYPE_ALL_F32`).
    F32,
    /// Matrices f16, vectors f32 (`LLAMA_FTYPE_MOSTLY_F16`).
    F16,
    /// Matrices bf16, vectors f32 (`LLAMA_FTYPE_MOSTLY_BF16`).
    BF16,
    /// Matrices Q8_0 (`LLAMA_FTYPE_MOSTLY_Q8_0`).
    Q8_0,
    /// Matrices Q4_0, the output matrix Q6_K (`LLAMA_FTYPE_MOSTLY_Q4_0`).
    Q4_0,
    /// Q4_K with Q6_K for half of attn_v / ffn_down and the output (`LLAMA_FTYPE_MOSTLY_Q4_K_M`).
    Q4_K_M,
    /// Q5_K with Q6_K for half of attn_v / ffn_down and the output (`LLAMA_FTYPE_MOSTLY_Q5_K_M`).
    Q5_K_M,
    /// Matrices Q6_K (`LLAMA_FTYPE_MOSTLY_Q6_K`).
    Q6_K,
}

impl FileType {
    /// Every file type, in the order of `graft export gguf --help`.
    pub const ALL: [FileType; 8] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q8_0,
        FileType::Q4_0,
        FileType::Q4_K_M,
        FileType::Q5_K_M,
        FileType::Q6_K,
    ];

    /// The file type named `s` (`f32`, `f16`, `bf16`, `q8_0`, `q4_0`, `q4_k_m`, `q5_k_m`, `q6_k`;
    /// any case), or `None`.
    pub fn parse(s: &str) -> Option<FileType> {
        FileType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// The lowercase name [`FileType::parse`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "f32",
            FileType::F16 => "f16",
            FileType::BF16 => "bf16",
            FileType::Q8_0 => "q8_0",
            FileType::Q4_0 => "q4_0",
            FileType::Q4_K_M => "q4_k_m",
            FileType::Q5_K_M => "q5_k_m",
            FileType::Q6_K => "q6_k",
        }
    }

    /// The value of GGUF `general.file_type` (`llama_ftype`).
    pub fn general_file_type(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q8_0 => 7,
            FileType::Q4_K_M => 15,
            FileType::Q5_K_M => 17,
            FileType::Q6_K => 18,
            FileType::BF16 => 32,
        }
    }

    /// The type of the file's ordinary matrices (`llama_ftype_get_default_type`).
    fn default_type(self) -> DType {
        match self {
            FileType::F32 => DType::F32,
            FileType::F16 => DType::F16,
            FileType::BF16 => DType::BF16,
            FileType::Q8_0 => DType::Q8_0,
            FileType::Q4_0 => DType::Q4_0,
            FileType::Q4_K_M => DType::Q4_K,
            FileType::Q5_K_M => DType::Q5_K,
            FileType::Q6_K => DType::Q6_K,
        }
    }
}

impl std::fmt::Display for FileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Facts about the whole model the type choice depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFacts {
    /// Transformer blocks (`{arch}.block_count`).
    pub n_layers: usize,
    /// Attention heads (`{arch}.attention.head_count`).
    pub n_head: usize,
    /// Key/value heads (`{arch}.attention.head_count_kv`).
    pub n_head_kv: usize,
}

/// The broad role of a tensor, from its GGUF name (llama.cpp's `tensor_get_category`; the first
/// matching rule wins, in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnKvB,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    if name == "output.weight" {
        Category::Output
    } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        Category::TokenEmbd
    } else if name.contains("attn_qkv.weight") {
        Category::AttnQkv
    } else if name.contains("attn_kv_b.weight") {
        Category::AttnKvB
    } else if name.contains("attn_v.weight") {
        Category::AttnV
    } else if name.contains("attn_k.weight") {
        Category::AttnK
    } else if name.contains("attn_q.weight") {
        Category::AttnQ
    } else if name.contains("attn_output.weight") {
        Category::AttnOutput
    } else if name.contains("ffn_up") {
        Category::FfnUp
    } else if name.contains("ffn_gate") {
        Category::FfnGate
    } else if name.contains("ffn_down") {
        Category::FfnDown
    } else {
        Category::Other
    }
}

/// attn_v and the fused tensors that contain it: the ones llama.cpp gives more bits.
fn is_attn_v_like(c: Category) -> bool {
    matches!(c, Category::AttnV | Category::AttnQkv | Category::AttnKvB)
}

/// Substrings that keep a tensor in its source type (llama.cpp's `tensor_allows_quantization`,
/// the rules that do not depend on the architecture).
const NEVER_QUANTIZED: &[&str] = &[
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
];

/// Whether llama.cpp would quantize this tensor at all: a matrix (at least two dimensions once
/// trailing 1s are dropped, as `ggml_n_dims` counts) whose name ends in `weight` and is none of
/// the exceptions above.
fn allows_quantization(name: &str, dims: &[u64]) -> bool {
    let n_dims = dims.iter().rposition(|&d| d > 1).map_or(1, |i| i + 1);
    n_dims >= 2
        && name.ends_with("weight")
        && name != "position_embd.weight"
        && name != "token_types.weight"
        && !NEVER_QUANTIZED.iter().any(|s| name.contains(s))
}

/// The layer of `blk.N.…`, or −1 (llama.cpp reads it with `sscanf("blk.%d.")`).
fn layer_of(name: &str) -> i64 {
    let Some(rest) = name.strip_prefix("blk.") else {
        return -1;
    };
    let (sign, digits) = match rest.as_bytes().first() {
        Some(b'-') => (-1, &rest[1..]),
        Some(b'+') => (1, &rest[1..]),
        _ => (1, rest),
    };
    let end = digits.bytes().take_while(u8::is_ascii_digit).count();
    digits[..end].parse::<i64>().map_or(-1, |n| sign * n)
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one
/// between them.
fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2
}

/// Chooses the ggml type of every tensor as llama.cpp's quantizer (`llama_tensor_get_type` and the
/// loop around it in src/llama-quant.cpp, no imatrix, default params) does for `ftype`.
///
/// `tensors` are (GGUF name, e.g. `blk.3.ffn_down.weight`; dims innermost-first as GGUF stores
/// them), in file order; the result has one type per tensor, in the same order. Tensors llama.cpp
/// does not quantize (vectors such as norms, and the names it exempts) stay F32. K-quant rows whose
/// length is not a multiple of 256 fall back to Q5_0 (Q4_K), Q5_1 (Q5_K) or Q8_0 (Q6_K), and any
/// quantized type whose row is not a multiple of its block size to F16, as llama.cpp does.
///
/// As in llama.cpp the layer-dependent choices (attn_v, ffn_down) count the tensors in the order
/// llama.cpp's loader sorts them (by layer, then by name), and the output matrix's rule applies to
/// `token_embd.weight` when there is no `output.weight` (tied embeddings). llama.cpp's exceptions
/// for Falcon and mixture-of-experts models are not modelled (graft exports neither); its 70B rule
/// (attn_v Q4_K → Q5_K) is, for llama's definition of 70B: 80 layers with grouped-query attention.
pub fn tensor_types(ftype: FileType, facts: &ModelFacts, tensors: &[(String, Vec<u64>)]) -> Vec<DType> {
    let default = ftype.default_type();
    let tied = !tensors.iter().any(|(n, _)| n == "output.weight");
    let n_attn_v = tensors
        .iter()
        .filter(|(n, _)| is_attn_v_like(category(n)))
        .count();
    let n_ffn = facts.n_layers;
    let is_70b = facts.n_layers == 80 && facts.n_head != facts.n_head_kv;

    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (na, nb) = (&tensors[a].0, &tensors[b].0);
        (layer_of(na), na).cmp(&(layer_of(nb), nb))
    });

    let (mut i_attn_v, mut i_ffn_down) = (0usize, 0usize);
    let mut types = vec![DType::F32; tensors.len()];
    for i in order {
        let (name, dims) = &tensors[i];
        if !allows_quantization(name, dims) {
            continue;
        }
        let quantized = !matches!(default, DType::F32 | DType::F16 | DType::BF16);
        if !quantized {
            types[i] = default;
            continue;
        }
        let ncols = dims.first().copied().unwrap_or(1);
        let cat = category(name);
        let mut t = default;
        if cat == Category::Output || (tied && cat == Category::TokenEmbd) {
            if !ncols.is_multiple_of(t.block_size() as u64) {
                t = DType::Q8_0;
            } else if t != DType::Q8_0 {
                t = DType::Q6_K;
            }
        } else if is_attn_v_like(cat) {
            if matches!(ftype, FileType::Q4_K_M | FileType::Q5_K_M) && use_more_bits(i_attn_v, n_attn_v) {
                t = DType::Q6_K;
            }
            if is_70b && matches!(t, DType::Q3_K | DType::Q4_K) {
                t = DType::Q5_K;
            }
            i_attn_v += 1;
        } else if cat == Category::FfnDown {
            if matches!(ftype, FileType::Q4_K_M | FileType::Q5_K_M) && use_more_bits(i_ffn_down, n_ffn) {
                t = DType::Q6_K;
            }
            i_ffn_down += 1;
        }
        types[i] = fallback(t, ncols);
    }
    types
}

/// llama.cpp's `tensor_type_fallback`: a type whose block does not divide the row length.
fn fallback(t: DType, ncols: u64) -> DType {
    if ncols.is_multiple_of(t.block_size() as u64) {
        return t;
    }
    let f = match t {
        DType::Q2_K | DType::Q3_K => DType::Q4_0,
        DType::Q4_K => DType::Q5_0,
        DType::Q5_K => DType::Q5_1,
        DType::Q6_K => DType::Q8_0,
        DType::IQ4_XS => DType::IQ4_NL,
        other => other,
    };
    if ncols.is_multiple_of(f.block_size() as u64) {
        f
    } else {
        DType::F16
    }
}

/// Quantizes `src` (whole rows of `row_len` values) to `dtype`, returning the bytes ggml stores.
///
/// Supports F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, each
/// as ggml's reference (no importance matrix) conversion; other types (IQ4_NL, IQ4_XS) are an error
/// naming the type, as are a `row_len` that is not a positive multiple of the type's block size and
/// a `src` that is not whole rows. Rows are quantized in parallel; the result does not depend on it
/// (blocks are independent).
pub fn quantize(dtype: DType, src: &[f32], row_len: usize) -> Result<Vec<u8>, String> {
    let block: fn(&[f32], &mut [u8]) = match dtype {
        DType::F32 => |x, y| {
            for (v, o) in x.iter().zip(y.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        },
        DType::F16 => |x, y| {
            for (v, o) in x.iter().zip(y.chunks_exact_mut(2)) {
                o.copy_from_slice(&fp32_to_fp16(*v).to_le_bytes());
            }
        },
        DType::BF16 => |x, y| {
            for (v, o) in x.iter().zip(y.chunks_exact_mut(2)) {
                o.copy_from_slice(&fp32_to_bf16(*v).to_le_bytes());
            }
        },
        DType::Q8_0 => quantize_q8_0,
        DType::Q4_0 => quantize_q4_0,
        DType::Q4_1 => quantize_q4_1,
        DType::Q5_0 => quantize_q5_0,
        DType::Q5_1 => quantize_q5_1,
        DType::Q2_K => quantize_q2_k,
        DType::Q3_K => quantize_q3_k,
        DType::Q4_K => quantize_q4_k,
        DType::Q5_K => quantize_q5_k,
        DType::Q6_K => quantize_q6_k,
        DType::IQ4_NL | DType::IQ4_XS => {
            return Err(format!("quantizing to {dtype} is not supported"));
        }
    };
    let (bs, bb) = (dtype.block_size(), dtype.block_bytes());
    if row_len == 0 || !row_len.is_multiple_of(bs) {
        return Err(format!(
            "cannot quantize rows of {row_len} values to {dtype}: \
             the row length must be a positive multiple of {bs}"
        ));
    }
    if !src.len().is_multiple_of(row_len) {
        return Err(format!("{} values are not whole rows of {row_len}", src.len()));
    }
    let row_bytes = row_len / bs * bb;
    let mut out = vec![0u8; src.len() / row_len * row_bytes];
    // Enough rows per task that small rows do not drown in scheduling.
    let min_rows = (1 << 14) / row_len + 1;
    src.par_chunks(row_len)
        .zip(out.par_chunks_mut(row_bytes))
        .with_min_len(min_rows)
        .for_each(|(x, y)| {
            for (xb, yb) in x.chunks_exact(bs).zip(y.chunks_exact_mut(bb)) {
                block(xb, yb);
            }
        });
    Ok(out)
}

/// The `n` values stored in `bytes` of `dtype` (the inverse of [`quantize`], through graft's
/// dequantizers, bit-identical to ggml's); an error if `bytes` is not exactly `n` values' storage.
pub fn dequantize(dtype: DType, bytes: &[u8], n: usize) -> Result<Vec<f32>, String> {
    match dtype.storage_bytes(n) {
        Some(len) if len == bytes.len() => {
            let mut out = vec![0.0f32; n];
            super::convert_chunk_f32(dtype, bytes, &mut out);
            Ok(out)
        }
        _ => Err(format!(
            "{} bytes are not the {dtype} storage of {n} values",
            bytes.len()
        )),
    }
}

/// ggml's scalar fp32 → fp16 (`ggml_compute_fp32_to_fp16`): round to nearest even, overflow to
/// ±inf, subnormals kept; every NaN becomes the quiet NaN 0x7E00 with the input's sign.
pub(crate) fn fp32_to_fp16(f: f32) -> u16 {
    let scale_to_inf = f32::from_bits(0x7780_0000); // 2^112
    let scale_to_zero = f32::from_bits(0x0880_0000); // 2^-110
    let mut base = (f.abs() * scale_to_inf) * scale_to_zero;
    let w = f.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1_w & 0xFF00_0000).max(0x7100_0000);
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x7C00;
    let mantissa_bits = bits & 0x0FFF;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16) | if shl1_w > 0xFF00_0000 { 0x7E00 } else { nonsign }) as u16
}

/// ggml's fp32 → bf16 (`ggml_compute_fp32_to_bf16`): round to nearest even (overflowing to ±inf),
/// subnormals kept; a NaN keeps its top bits and is made quiet.
pub(crate) fn fp32_to_bf16(f: f32) -> u16 {
    let u = f.to_bits();
    if u & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + (0x7FFF + ((u >> 16) & 1)) as u64) >> 16) as u16
}

/// The f16 bits of `v` (ggml's conversion) stored at `b[i..i + 2]`; returns the stored value as f32.
fn put_f16(b: &mut [u8], i: usize, v: f32) -> f32 {
    let h = fp32_to_fp16(v);
    b[i..i + 2].copy_from_slice(&h.to_le_bytes());
    f16::from_bits(h).to_f32()
}

/// ggml's `nearest_int`: round to nearest, ties to even, by the 1.5·2^23 trick (|x| ≤ 2^22).
fn nearest_int(x: f32) -> i32 {
    let val = x + 12582912.0;
    (val.to_bits() as i32 & 0x007F_FFFF) - 0x0040_0000
}

/// The element of largest magnitude (first one on ties), and that magnitude; (0, 0) if none exceeds 0.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

/// Minimum and maximum as ggml's Q4_1/Q5_1 find them (starting from ±FLT_MAX).
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// Q8_0 (`quantize_row_q8_0_ref`): `d = amax / 127`, `q = round(x / d)` half away from zero.
fn quantize_q8_0(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!((x.len(), y.len()), (QK, Q8_0_BYTES));
    let mut amax = 0.0f32;
    for &v in x {
        let a = v.abs();
        amax = if amax > a { amax } else { a };
    }
    let d = amax / 127.0;
    let id = inverse(d);
    put_f16(y, 0, d);
    for (o, &v) in y[2..].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
}

/// Q4_0 (`quantize_row_q4_0_ref`): `d = max / −8` with `max` the signed value of largest
/// magnitude, `q = min(15, trunc(x / d + 8.5))`.
fn quantize_q4_0(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!((x.len(), y.len()), (QK, Q4_0_BYTES));
    let (max, _) = signed_absmax(x);
    let d = max / -8.0;
    let id = inverse(d);
    put_f16(y, 0, d);
    for j in 0..QK / 2 {
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
        y[2 + j] = q0 | (q1 << 4);
    }
}

/// Q4_1 (`quantize_row_q4_1_ref`): `d = (max − min) / 15`, `m = min`,
/// `q = min(15, trunc((x − min) / d + 0.5))`.
fn quantize_q4_1(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!((x.len(), y.len()), (QK, Q4_1_BYTES));
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    for j in 0..QK / 2 {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + QK / 2] - min) * id + 0.5) as i8).min(15) as u8;
        y[4 + j] = q0 | (q1 << 4);
    }
}

/// Packs 32 five-bit quants as Q5_0/Q5_1 store them: fifth bits into the u32 at `qh`, low nibbles
/// at `qs` (value `j` low, `j + 16` high).
fn pack_q5(q: &[u8; QK], y: &mut [u8], qh: usize, qs: usize) {
    let mut bits = 0u32;
    for j in 0..QK / 2 {
        let (q0, q1) = (q[j], q[j + QK / 2]);
        y[qs + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        bits |= (((q0 & 0x10) >> 4) as u32) << j;
        bits |= (((q1 & 0x10) >> 4) as u32) << (j + QK / 2);
    }
    y[qh..qh + 4].copy_from_slice(&bits.to_le_bytes());
}

/// Q5_0 (`quantize_row_q5_0_ref`): `d = max / −16`, `q = min(31, trunc(x / d + 16.5))`.
fn quantize_q5_0(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!((x.len(), y.len()), (QK, Q5_0_BYTES));
    let (max, _) = signed_absmax(x);
    let d = max / -16.0;
    let id = inverse(d);
    put_f16(y, 0, d);
    let mut q = [0u8; QK];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((v * id + 16.5) as i8).min(31) as u8;
    }
    pack_q5(&q, y, 2, 6);
}

/// Q5_1 (`quantize_row_q5_1_ref`): `d = (max − min) / 31`, `m = min`,
/// `q = trunc((x − min) / d + 0.5)`.
fn quantize_q5_1(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!((x.len(), y.len()), (QK, Q5_1_BYTES));
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    let mut q = [0u8; QK];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((v - min) * id + 0.5) as u8;
    }
    pack_q5(&q, y, 4, 8);
}

/// ggml's `make_qkx2_quants`: a scale and (non-positive) offset for `x` with quants `0..=nmax`,
/// minimizing the `weights`-weighted squared (`use_mad`: absolute) error over `nstep + 1`
/// candidate scales `(nmax + rmin + 0.1·is) / (max − min)`, each refined by weighted least
/// squares. Writes the quants to `l`; returns `(scale, −offset)`.
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let rdelta = 0.1f32;
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    let mut laux = [0u8; 32];
    let laux = &mut laux[..n];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                l.copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Packs 256 two-bit quants as Q2_K/Q3_K store them: value `128h + 32j + l` in bits `2j..2j+2`
/// of byte `32h + l`.
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for h in 0..2 {
        for i in 0..32 {
            let q = |j: usize| l[128 * h + 32 * j + i];
            qs[32 * h + i] = q(0) | (q(1) << 2) | (q(2) << 4) | (q(3) << 6);
        }
    }
}

/// Q2_K (`quantize_row_q2_K_ref`): sixteen sub-blocks of 16 fitted by [`make_qkx2_quants`]
/// (weights `|x|`, absolute error), 4-bit scales and minimums against the largest of each, then
/// every value requantized to `0..=3` against the stored ones.
fn quantize_q2_k(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!((x.len(), y.len()), (QK_K, Q2_K_BYTES));
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let mut mins = [0.0f32; QK_K / 16];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    let mut weights = [0.0f32; 16];
    for j in 0..QK_K / 16 {
        let xs = &x[16 * j..16 * j + 16];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let (scale, min) = make_qkx2_quants(3, xs, &weights, &mut l[16 * j..16 * j + 16], -0.5, 15, true);
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let sc = &mut y[0..16];
    sc.fill(0);
    let d = if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for (s, &v) in sc.iter_mut().zip(&scales) {
            *s = nearest_int(iscale * v) as u8;
        }
        max_scale / 15.0
    } else {
        0.0
    };
    let dmin = if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for (s, &v) in sc.iter_mut().zip(&mins) {
            *s |= (nearest_int(iscale * v) << 4) as u8;
        }
        max_min / 15.0
    } else {
        0.0
    };
    let d = put_f16(y, 80, d);
    let dmin = put_f16(y, 82, dmin);
    for ((&s, xs), ls) in y[0..16]
        .iter()
        .zip(x.chunks_exact(16))
        .zip(l.chunks_exact_mut(16))
    {
        let dl = d * (s & 0x0F) as f32;
        if dl == 0.0 {
            continue;
        }
        let dm = dmin * (s >> 4) as f32;
        for (q, &v) in ls.iter_mut().zip(xs) {
            *q = nearest_int((v + dm) / dl).clamp(0, 3) as u8;
        }
    }
    pack_2bit(&l, &mut y[16..80]);
}

/// ggml's `make_q3_quants` as Q3_K calls it (`do_rmse`): a signed scale for `x` with quants
/// `−nmax..nmax`, from `−nmax / max` refined by up to five rounds of single-quant changes that
/// raise the `x²`-weighted fit. Writes the quants, offset by `nmax`, to `l`; returns the scale.
fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let iscale = -nmax as f32 / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (q, &v) in l.iter_mut().zip(x) {
        let li = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *q = li as i8;
        let w = v * v;
        sumlx += w * v * li as f32;
        suml2 += w * li as f32 * li as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (q, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let old = *q as f32;
            let mut slx = sumlx - w * v * old;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * old * old;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != *q as i32 {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *q = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for q in l.iter_mut() {
        *q += nmax as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// Q3_K (`quantize_row_q3_K_ref`): sixteen sub-blocks of 16 fitted by [`make_q3_quants`], 6-bit
/// signed scales against the largest in magnitude (`d = max_scale / −32`), then every value
/// requantized to `−4..4` against the stored scales; the quants' third bits go to `hmask`.
fn quantize_q3_k(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!((x.len(), y.len()), (QK_K, Q3_K_BYTES));
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
    for j in 0..QK_K / 16 {
        let s = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
        scales[j] = s;
        if s.abs() > amax {
            amax = s.abs();
            max_scale = s;
        }
    }
    y.fill(0);
    let d = if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        let sc = &mut y[96..108];
        for (j, &s) in scales.iter().enumerate() {
            // ggml keeps the low byte of the int (an int8_t) before clamping.
            let q = ((nearest_int(iscale * s) as i8).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                sc[j] = q & 0x0F;
            } else {
                sc[j - 8] |= (q & 0x0F) << 4;
            }
            sc[8 + j % 4] |= (q >> 4) << (2 * (j / 4));
        }
        1.0 / iscale
    } else {
        0.0
    };
    let d = put_f16(y, 108, d);
    for j in 0..QK_K / 16 {
        let sc = &y[96..108];
        let low = if j < 8 { sc[j] & 0x0F } else { sc[j - 8] >> 4 };
        let s = (low | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32;
        let dl = d * s as f32;
        if dl == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / dl).clamp(-4, 3) + 4) as i8;
        }
    }
    let mut low = [0u8; QK_K];
    for (j, (&q, o)) in l.iter().zip(low.iter_mut()).enumerate() {
        let mut q = q as u8;
        if q > 3 {
            y[j % 32] |= 1 << (j / 32);
            q -= 4;
        }
        *o = q;
    }
    pack_2bit(&low, &mut y[32..96]);
}

/// The shared body of Q4_K and Q5_K (`quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`): eight
/// sub-blocks of 32 fitted by [`make_qkx2_quants`] (weights `rms(x) + |x|`), their scales and
/// minimums quantized to 6 bits against the largest of each, then every value requantized against
/// the stored scales. Fills `y[0..16]` (`d`, `dmin`, packed scales) and returns the quants.
fn quantize_k_scales(x: &[f32], y: &mut [u8], nmax: i32, rmin: f32, nstep: i32) -> [u8; QK_K] {
    let mut l = [0u8; QK_K];
    let mut scales = [0.0f32; QK_K / 32];
    let mut mins = [0.0f32; QK_K / 32];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    let mut weights = [0.0f32; 32];
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (scale, min) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            rmin,
            nstep,
            false,
        );
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut y[4..16];
    sc.fill(0);
    for j in 0..QK_K / 32 {
        // ggml stores the int in a uint8_t (keeping the low byte) before clamping to 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d = put_f16(y, 0, max_scale / 63.0);
    let dmin = put_f16(y, 2, max_min / 63.0);
    for j in 0..QK_K / 32 {
        let (s, m) = k4_scale_min(&y[4..16], j);
        let dl = d * s as f32;
        if dl == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 32 * j..32 * j + 32 {
            l[i] = nearest_int((x[i] + dm) / dl).clamp(0, nmax) as u8;
        }
    }
    l
}

/// The 6-bit scale and minimum of sub-block `j` of a packed Q4_K/Q5_K scale array.
fn k4_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K (`quantize_row_q4_K_ref`): 4-bit quants, candidate scales from `15 − 1` in steps of 0.1.
fn quantize_q4_k(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!((x.len(), y.len()), (QK_K, Q4_K_BYTES));
    let l = quantize_k_scales(x, y, 15, -1.0, 20);
    for c in 0..4 {
        for i in 0..32 {
            y[16 + 32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
        }
    }
}

/// Q5_K (`quantize_row_q5_K_ref`): 5-bit quants, candidate scales from `31 − 0.5` in steps of 0.1.
fn quantize_q5_k(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!((x.len(), y.len()), (QK_K, Q5_K_BYTES));
    let l = quantize_k_scales(x, y, 31, -0.5, 15);
    let (qh, qs) = y[16..].split_at_mut(32);
    qh.fill(0);
    for c in 0..4 {
        let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for i in 0..32 {
            let (mut l1, mut l2) = (l[64 * c + i], l[64 * c + 32 + i]);
            if l1 > 15 {
                l1 -= 16;
                qh[i] |= m1;
            }
            if l2 > 15 {
                l2 -= 16;
                qh[i] |= m2;
            }
            qs[32 * c + i] = l1 | (l2 << 4);
        }
    }
}

/// ggml's `make_qx_quants` as Q6_K calls it (`rmse_type` 1, no weights): a signed scale for `x`
/// with quants `−nmax..nmax`, the best of 19 candidate scales `−(nmax + 0.1·is) / max` under the
/// error weighted by `x²`. Writes the quants, offset by `nmax`, to `l`; returns the scale.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (max, amax) = signed_absmax(x);
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let mut iscale = -nmax as f32 / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (q, &v) in l.iter_mut().zip(x) {
        let li = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *q = (li + nmax) as i8;
        let w = v * v;
        sumlx += w * v * li as f32;
        suml2 += w * li as f32 * li as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let li = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            let w = v * v;
            sumlx += w * v * li as f32;
            suml2 += w * li as f32 * li as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (q, &v) in l.iter_mut().zip(x) {
                *q = (nmax + nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q6_K (`quantize_row_q6_K_ref`): sixteen sub-blocks of 16 fitted by [`make_qx_quants`], their
/// scales quantized to int8 against the largest in magnitude (`d = max_scale / −128`), then every
/// value requantized to `−32..32` against the stored scales.
fn quantize_q6_k(x: &[f32], y: &mut [u8]) {
    debug_assert_eq!((x.len(), y.len()), (QK_K, Q6_K_BYTES));
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for ib in 0..QK_K / 16 {
        let scale = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    y.fill(0);
    if max_abs_scale < 1e-15 {
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = put_f16(y, 208, 1.0 / iscale);
    for ib in 0..QK_K / 16 {
        y[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    for j in 0..QK_K / 16 {
        let dl = d * (y[192 + j] as i8) as f32;
        if dl == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            l[i] = (nearest_int(x[i] / dl).clamp(-32, 31) + 32) as i8;
        }
    }
    let (ql, qh) = y[..192].split_at_mut(128);
    for h in 0..2 {
        for i in 0..32 {
            let q = |k: usize| l[128 * h + 32 * k + i] as u8;
            ql[64 * h + i] = (q(0) & 0x0F) | ((q(2) & 0x0F) << 4);
            ql[64 * h + 32 + i] = (q(1) & 0x0F) | ((q(3) & 0x0F) << 4);
            qh[32 * h + i] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dequant(dtype: DType, bytes: &[u8], n: usize) -> Vec<f32> {
        dequantize(dtype, bytes, n).unwrap()
    }

    #[test]
    fn file_type_names_round_trip() {
        for t in FileType::ALL {
            assert_eq!(FileType::parse(t.name()), Some(t));
            assert_eq!(FileType::parse(&t.name().to_uppercase()), Some(t));
        }
        assert_eq!(FileType::parse("Q4_k_M"), Some(FileType::Q4_K_M));
        assert_eq!(FileType::parse("q4_k"), None);
        assert_eq!(FileType::parse(""), None);
        let codes: Vec<u32> = FileType::ALL.iter().map(|t| t.general_file_type()).collect();
        assert_eq!(codes, [0, 1, 32, 7, 2, 15, 17, 18]);
    }

    #[test]
    fn errors_not_panics() {
        let x = vec![0.5f32; 512];
        for t in [DType::IQ4_NL, DType::IQ4_XS] {
            let e = quantize(t, &x, 256).unwrap_err();
            assert!(e.contains(t.name()), "{e}");
        }
        assert!(
            quantize(DType::Q8_0, &x, 48)
                .unwrap_err()
                .contains("multiple of 32")
        );
        assert!(
            quantize(DType::Q4_K, &x[..128], 128)
                .unwrap_err()
                .contains("multiple of 256")
        );
        assert!(quantize(DType::Q4_0, &x, 0).is_err());
        assert!(quantize(DType::F16, &x, 0).is_err());
        assert!(
            quantize(DType::Q4_0, &x[..96], 64)
                .unwrap_err()
                .contains("whole rows")
        );
        assert!(quantize(DType::F32, &x[..7], 2).is_err());
        // Zero rows are fine.
        assert_eq!(quantize(DType::Q6_K, &[], 256).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn odd_shapes_and_sizes() {
        // One value per row, three values per row, rows of one block: sizes and exact round trips.
        let x: Vec<f32> = (0..96).map(|i| (i as f32 - 40.0) / 8.0).collect();
        for (t, row) in [
            (DType::F32, 1),
            (DType::F16, 3),
            (DType::BF16, 96),
            (DType::Q8_0, 32),
            (DType::Q5_1, 96),
        ] {
            let b = quantize(t, &x, row).unwrap();
            assert_eq!(b.len(), t.storage_bytes(x.len()).unwrap(), "{t}");
            let back = dequant(t, &b, x.len());
            let tol = if matches!(t, DType::Q8_0 | DType::Q5_1) {
                0.2
            } else {
                0.0
            };
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{t}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn fp16_and_bf16_special_values() {
        let cases: [(f32, u16, u16); 12] = [
            (0.0, 0x0000, 0x0000),
            (-0.0, 0x8000, 0x8000),
            (1.0, 0x3C00, 0x3F80),
            (65504.0, 0x7BFF, 0x4780),
            (65520.0, 0x7C00, 0x4780), // rounds up to inf in f16
            (f32::INFINITY, 0x7C00, 0x7F80),
            (f32::NEG_INFINITY, 0xFC00, 0xFF80),
            (f32::from_bits(0x7FC0_0001), 0x7E00, 0x7FC0),
            (f32::from_bits(0xFF80_0001), 0xFE00, 0xFFC0), // signalling NaN: quieted
            (5.960_464_5e-8, 0x0001, 0x3380),              // smallest f16 subnormal
            (f32::from_bits(0x0000_0001), 0x0000, 0x0000), // f32 subnormal: bf16 keeps it, rounds to 0
            (f32::from_bits(0x3F80_8000), 0x3C04, 0x3F80), // bf16 tie to even (down)
        ];
        for (v, h, b) in cases {
            assert_eq!(fp32_to_fp16(v), h, "f16 of {v:e}");
            assert_eq!(fp32_to_bf16(v), b, "bf16 of {v:e}");
        }
        assert_eq!(fp32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82); // tie to even (up)
        assert_eq!(fp32_to_bf16(f32::from_bits(0x0001_8000)), 0x0002); // subnormal kept
        assert_eq!(fp32_to_bf16(f32::MAX), 0x7F80); // overflows to inf
        // Finite values agree with the half crate (which differs only in NaN payloads).
        let mut s = 0x1234_5678u32;
        for _ in 0..100_000 {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let v = f32::from_bits(s);
            if v.is_nan() {
                continue;
            }
            assert_eq!(fp32_to_fp16(v), f16::from_f32(v).to_bits(), "{v:e}");
            assert_eq!(fp32_to_bf16(v), half::bf16::from_f32(v).to_bits(), "{v:e}");
        }
    }

    #[test]
    fn all_zero_and_constant_blocks() {
        for t in [
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q5_0,
            DType::Q5_1,
            DType::Q2_K,
            DType::Q3_K,
            DType::Q4_K,
            DType::Q5_K,
            DType::Q6_K,
        ] {
            for c in [0.0f32, 0.25, -3.0] {
                let x = vec![c; 512];
                let b = quantize(t, &x, 256).unwrap();
                let back = dequant(t, &b, 512);
                for v in back {
                    assert!((v - c).abs() <= c.abs() * 0.02, "{t} {c}: {v}");
                }
            }
        }
    }

    #[test]
    fn round_trip_error_is_small() {
        let mut s = 42u64;
        let x: Vec<f32> = (0..4096)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect();
        for (t, tol) in [
            (DType::Q8_0, 0.005),
            (DType::Q6_K, 0.02),
            (DType::Q5_0, 0.07),
            (DType::Q5_1, 0.04),
            (DType::Q5_K, 0.07),
            (DType::Q4_0, 0.13),
            (DType::Q4_1, 0.08),
            (DType::Q4_K, 0.1),
            (DType::Q3_K, 0.3),
            (DType::Q2_K, 0.6),
        ] {
            let b = quantize(t, &x, 512).unwrap();
            let back = dequant(t, &b, x.len());
            let err = x
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err <= tol, "{t}: max error {err}");
        }
    }

    #[test]
    fn type_mix_rules() {
        let facts = ModelFacts {
            n_layers: 8,
            n_head: 4,
            n_head_kv: 2,
        };
        let mut tensors = vec![
            ("token_embd.weight".to_string(), vec![256, 100]),
            ("output_norm.weight".to_string(), vec![256]),
        ];
        for i in 0..8 {
            for (n, d) in [
                ("attn_v.weight", vec![256, 128]),
                ("ffn_down.weight", vec![512, 256]),
            ] {
                tensors.push((format!("blk.{i}.{n}"), d));
            }
            tensors.push((format!("blk.{i}.attn_norm.weight"), vec![256, 1]));
        }
        let types = tensor_types(FileType::Q4_K_M, &facts, &tensors);
        assert_eq!(types[0], DType::Q6_K); // tied: token_embd takes the output rule
        assert_eq!(types[1], DType::F32);
        let v: Vec<DType> = (0..8).map(|i| types[2 + 3 * i]).collect();
        use DType::{Q4_K as K4, Q6_K as K6};
        assert_eq!(v, [K6, K4, K4, K6, K4, K4, K6, K6]);
        assert!((0..8).all(|i| types[4 + 3 * i] == DType::F32)); // [256, 1] counts as 1-D
        for ft in [FileType::F32, FileType::F16, FileType::BF16] {
            let t = tensor_types(ft, &facts, &tensors);
            assert_eq!(t[0], ft.default_type());
            assert_eq!(t[1], DType::F32);
        }
        assert_eq!(fallback(DType::Q4_K, 96), DType::Q5_0);
        assert_eq!(fallback(DType::Q5_K, 64), DType::Q5_1);
        assert_eq!(fallback(DType::Q6_K, 32), DType::Q8_0);
        assert_eq!(fallback(DType::Q6_K, 80), DType::F16);
        assert_eq!(fallback(DType::Q8_0, 48), DType::F16);
        assert_eq!(layer_of("blk.12.attn_v.weight"), 12);
        assert_eq!(layer_of("output.weight"), -1);
    }
}
