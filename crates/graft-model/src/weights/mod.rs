//! Weight I/O: named tensors from Hugging Face safetensors directories, llama2.c checkpoints and
//! GGUF files, all exposed under Hugging Face names and shapes; safetensors writing.
//!
//! [`load_model`] dispatches on the path (directory → HF, `.bin` → llama2.c, `.gguf` → GGUF) and
//! returns a [`LoadedModel`]: the [`ModelSpec`], a [`WeightStore`] and where the tokenizer lives.
//! The store memory-maps its files and converts on access ([`WeightStore::f32`],
//! [`WeightStore::bf16`]), so opening a model costs no copies.
//!
//! Every store, whatever its source, names its tensors as transformers does
//! (`model.layers.{i}.self_attn.q_proj.weight`, …) with HF shapes (`[out, in]` for linear
//! weights), and q/k rows in HF's rotate-half RoPE order: llama2.c files and GGUF `llama` files
//! keep the interleaved order and are permuted on access (see [`rope_interleaved_to_half`]).

pub(crate) mod gguf;
mod gguf_export;
mod gguf_write;
mod llama2c;
pub mod quantize;

mod safetensors_io;
#[cfg(test)]
mod tests;

pub use gguf::{GgufFile, GgufTensor, GgufValue, parse_gguf, read_gguf};
pub use gguf_export::{gguf_architecture, save_gguf_lora, save_gguf_model};
pub use gguf_write::{GgufTensorSpec, write_gguf};
pub use safetensors_io::{
    open_hf_weights, open_safetensors, save_hf_model_dir, save_safetensors, save_safetensors_bf16,
    write_file_atomically,
};

use crate::config::ModelSpec;
use crate::error::ModelError;
use graft_kernels::quant::{self as quants, QuantTensor, QuantType};
use half::{bf16, f16};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Element type of a stored tensor: a plain float, or one of ggml's block-quantized types (read
/// from GGUF files; block layouts and dequantization in `quants.rs`).
///
/// Quantized types pack each row (the innermost dimension) into blocks of
/// [`DType::block_size`] values taking [`DType::block_bytes`] bytes; rows must be a multiple of
/// the block size.
#[allow(non_camel_case_types)] // ggml's names: Q4_K, IQ4_NL, …
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE float32.
    F32,
    /// IEEE float16.
    F16,
    /// bfloat16.
    BF16,
    /// GGUF Q8_0: blocks of 32 values, an f16 scale `d` and 32 int8 quants (`x = q · d`; 34 bytes).
    Q8_0,
    /// GGUF Q4_0: blocks of 32 values, an f16 scale `d` and 16 bytes of 4-bit quants `q`
    /// (`x = (q − 8) · d`; low nibbles are values 0–15, high nibbles 16–31; 18 bytes).
    Q4_0,
    /// GGUF Q4_1: blocks of 32 values, f16 scale `d` and minimum `m`, 16 bytes of 4-bit quants
    /// (`x = q · d + m`, nibbles as Q4_0; 20 bytes).
    Q4_1,
    /// GGUF Q5_0: blocks of 32 values, f16 `d`, 32 fifth bits, 4-bit low parts
    /// (`x = (q − 16) · d`; 22 bytes).
    Q5_0,
    /// GGUF Q5_1: blocks of 32 values, f16 `d` and `m`, 5-bit quants as Q5_0 (`x = q · d + m`;
    /// 24 bytes).
    Q5_1,
    /// GGUF Q2_K: 256-value super-blocks of 16 sub-blocks, 4-bit sub-block scales and minimums,
    /// 2-bit quants, f16 `d` and `dmin` (84 bytes).
    Q2_K,
    /// GGUF Q3_K: 256-value super-blocks of 16 sub-blocks, 6-bit signed sub-block scales, 3-bit
    /// quants, f16 `d` (110 bytes).
    Q3_K,
    /// GGUF Q4_K: 256-value super-blocks of 8 sub-blocks, 6-bit sub-block scales and minimums,
    /// 4-bit quants, f16 `d` and `dmin` (144 bytes).
    Q4_K,
    /// GGUF Q5_K: as Q4_K with 5-bit quants (176 bytes).
    Q5_K,
    /// GGUF Q6_K: 256-value super-blocks of 16 sub-blocks, int8 sub-block scales, 6-bit quants,
    /// f16 `d` (210 bytes).
    Q6_K,
    /// GGUF IQ4_NL: blocks of 32 values, f16 `d` and 4-bit indices into a fixed table of 16
    /// non-linear levels (18 bytes).
    IQ4_NL,
    /// GGUF IQ4_XS: 256-value super-blocks of 8 sub-blocks, 6-bit signed sub-block scales, f16
    /// `d`, 4-bit indices into IQ4_NL's levels (136 bytes).
    IQ4_XS,
}

impl DType {
    /// Every type graft reads, plain floats first.
    pub const ALL: [DType; 15] = [
        DType::F32,
        DType::F16,
        DType::BF16,
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
        DType::IQ4_NL,
        DType::IQ4_XS,
    ];

    /// The block-quantized type, or `None` for plain floats.
    pub fn quant_type(self) -> Option<QuantType> {
        Some(match self {
            DType::F32 | DType::F16 | DType::BF16 => return None,
            DType::Q8_0 => QuantType::Q8_0,
            DType::Q4_0 => QuantType::Q4_0,
            DType::Q4_1 => QuantType::Q4_1,
            DType::Q5_0 => QuantType::Q5_0,
            DType::Q5_1 => QuantType::Q5_1,
            DType::Q2_K => QuantType::Q2_K,
            DType::Q3_K => QuantType::Q3_K,
            DType::Q4_K => QuantType::Q4_K,
            DType::Q5_K => QuantType::Q5_K,
            DType::Q6_K => QuantType::Q6_K,
            DType::IQ4_NL => QuantType::IQ4_NL,
            DType::IQ4_XS => QuantType::IQ4_XS,
        })
    }

    /// Bytes taken by `numel` elements, or `None` if `numel` is not a whole number of the type's
    /// blocks or overflows.
    pub fn storage_bytes(self, numel: usize) -> Option<usize> {
        numel
            .is_multiple_of(self.block_size())
            .then(|| (numel / self.block_size()).checked_mul(self.block_bytes()))
            .flatten()
    }

    /// Values per block: 32 for Q4_0 … Q8_0 and IQ4_NL, 256 (a super-block) for the K-quants and
    /// IQ4_XS, 1 for plain floats.
    pub const fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL => quants::QK,
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS => {
                quants::QK_K
            }
        }
    }

    /// Bytes per block (plain floats: bytes per value).
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => quants::Q8_0_BYTES,
            DType::Q4_0 => quants::Q4_0_BYTES,
            DType::Q4_1 => quants::Q4_1_BYTES,
            DType::Q5_0 => quants::Q5_0_BYTES,
            DType::Q5_1 => quants::Q5_1_BYTES,
            DType::Q2_K => quants::Q2_K_BYTES,
            DType::Q3_K => quants::Q3_K_BYTES,
            DType::Q4_K => quants::Q4_K_BYTES,
            DType::Q5_K => quants::Q5_K_BYTES,
            DType::Q6_K => quants::Q6_K_BYTES,
            DType::IQ4_NL => quants::IQ4_NL_BYTES,
            DType::IQ4_XS => quants::IQ4_XS_BYTES,
        }
    }

    /// The conventional (ggml) name of this type: `F32`, `BF16`, `Q8_0`, `Q4_K`, `IQ4_XS`, ….
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q2_K => "Q2_K",
            DType::Q3_K => "Q3_K",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
            DType::IQ4_NL => "IQ4_NL",
            DType::IQ4_XS => "IQ4_XS",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Name, shape and element type of one tensor, as the store exposes it (HF name and shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Hugging Face tensor name, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// Hugging Face shape, outermost first (`[out, in]` for linear weights).
    pub shape: Vec<usize>,
    /// Element type in the file.
    pub dtype: DType,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Bytes a store reads from: a memory-mapped file or an owned buffer.
enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// One file (or buffer) tensors point into.
struct Source {
    path: PathBuf,
    data: Backing,
}

/// Where one tensor's bytes are and how to turn them into HF layout.
struct Entry {
    info: TensorInfo,
    source: usize,
    offset: usize,
    len: usize,
    /// Rows are in llama2.c/GGUF interleaved RoPE order for this many heads; permute on access.
    rope_heads: Option<usize>,
}

/// Named tensors from one or more files, memory-mapped where possible and converted on access.
///
/// Names and shapes are Hugging Face's whatever the source format; see the module docs.
pub struct WeightStore {
    /// The model path the store was opened from (a file or directory), used in error messages.
    origin: PathBuf,
    sources: Vec<Source>,
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    /// Tensors present in safetensors files in a type the store cannot convert (integers, f64, …):
    /// name → (type, source). GGUF files with such tensors fail to open instead.
    unsupported: HashMap<String, (String, usize)>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field("origin", &self.origin)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl WeightStore {
    fn new(origin: &Path) -> WeightStore {
        WeightStore {
            origin: origin.to_path_buf(),
            sources: Vec::new(),
            entries: Vec::new(),
            index: HashMap::new(),
            unsupported: HashMap::new(),
        }
    }

    /// An in-memory store of f32 tensors `(name, shape, values)`; `origin` is only used in error
    /// messages. Fails if a tensor's value count does not match its shape or a name repeats.
    pub fn from_f32_tensors(
        origin: &Path,
        tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    ) -> Result<WeightStore, ModelError> {
        let mut store = WeightStore::new(origin);
        for (name, shape, values) in tensors {
            let numel: usize = shape.iter().product();
            if numel != values.len() {
                return Err(ModelError::tensor(
                    origin,
                    &name,
                    format!("shape {shape:?} needs {numel} values, got {}", values.len()),
                ));
            }
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let len = bytes.len();
            let source = store.add_source(origin, Backing::Owned(bytes));
            store.insert(
                Entry {
                    info: TensorInfo {
                        name,
                        shape,
                        dtype: DType::F32,
                    },
                    source,
                    offset: 0,
                    len,
                    rope_heads: None,
                },
                origin,
            )?;
        }
        Ok(store)
    }

    fn add_source(&mut self, path: &Path, data: Backing) -> usize {
        self.sources.push(Source {
            path: path.to_path_buf(),
            data,
        });
        self.sources.len() - 1
    }

    /// Adds a tensor after checking its byte range against its source and its size against its
    /// shape and type.
    fn insert(&mut self, entry: Entry, path: &Path) -> Result<(), ModelError> {
        let name = &entry.info.name;
        let source_len = self.sources[entry.source].data.bytes().len();
        let end = entry.offset.checked_add(entry.len);
        if end.is_none_or(|end| end > source_len) {
            return Err(ModelError::tensor(
                path,
                name,
                format!(
                    "data at bytes {}..{} lies beyond the end of the file ({source_len} bytes); the file is \
                     truncated or corrupt",
                    entry.offset,
                    entry.offset as u128 + entry.len as u128
                ),
            ));
        }
        let numel = checked_numel(&entry.info.shape).ok_or_else(|| {
            ModelError::tensor(path, name, format!("shape {:?} overflows", entry.info.shape))
        })?;
        let expected = entry.info.dtype.storage_bytes(numel).ok_or_else(|| {
            ModelError::tensor(
                path,
                name,
                format!(
                    "{numel} elements cannot be stored as {} (blocks of {} values)",
                    entry.info.dtype,
                    entry.info.dtype.block_size()
                ),
            )
        })?;
        if expected != entry.len {
            return Err(ModelError::tensor(
                path,
                name,
                format!(
                    "shape {:?} as {} needs {expected} bytes but the file gives {}",
                    entry.info.shape, entry.info.dtype, entry.len
                ),
            ));
        }
        if let Some(heads) = entry.rope_heads {
            let rows = entry.info.shape.first().copied().unwrap_or(0);
            if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 {
                return Err(ModelError::tensor(
                    path,
                    name,
                    format!("{rows} rows cannot be split into {heads} RoPE heads of even width"),
                ));
            }
        }
        if self.index.contains_key(name) {
            return Err(ModelError::tensor(path, name, "appears more than once"));
        }
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push(entry);
        Ok(())
    }

    /// The path the store was opened from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The block-quantized type of the first quantized tensor (by name), if any: a quantized
    /// base (GGUF Q4_K_M, …), whose weights a full fine-tune could not write back losslessly.
    pub fn quantized_type(&self) -> Option<(&str, DType)> {
        self.entries
            .iter()
            .filter(|e| e.info.dtype.block_size() > 1)
            .map(|e| (e.info.name.as_str(), e.info.dtype))
            .min_by_key(|(n, _)| *n)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.iter().map(|e| e.info.name.as_str()).collect();
        names.sort_unstable();
        names
    }

    /// Name, HF shape and file type of a tensor.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.entries[i].info)
    }

    /// Whether the store has a tensor of this name (in a supported type).
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The file a tensor is read from.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index
            .get(name)
            .map(|&i| self.sources[self.entries[i].source].path.as_path())
    }

    /// Looks a tensor up and checks its shape; the error names the tensor and the file.
    fn entry(&self, name: &str, expected_shape: &[usize]) -> Result<&Entry, ModelError> {
        let Some(&i) = self.index.get(name) else {
            if let Some((ty, source)) = self.unsupported.get(name) {
                return Err(ModelError::tensor(
                    &self.sources[*source].path,
                    name,
                    format!(
                        "has type {ty}, which is not supported (supported in safetensors files: F32, F16, BF16)"
                    ),
                ));
            }
            return Err(ModelError::tensor(
                &self.origin,
                name,
                format!(
                    "not found (expected shape {expected_shape:?}; the model has {} tensors)",
                    self.entries.len()
                ),
            ));
        };
        let entry = &self.entries[i];
        if entry.info.shape != expected_shape {
            return Err(ModelError::tensor(
                &self.sources[entry.source].path,
                name,
                format!("expected shape {expected_shape:?}, found {:?}", entry.info.shape),
            ));
        }
        Ok(entry)
    }

    fn bytes_of(&self, entry: &Entry) -> &[u8] {
        // In range: checked by `insert`, and sources are never mutated afterwards.
        &self.sources[entry.source].data.bytes()[entry.offset..entry.offset + entry.len]
    }

    /// A converted f32 copy of a tensor in HF layout. Errors name the tensor and the file if it is
    /// missing, in an unsupported type, or its shape is not `expected_shape`.
    pub fn f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let entry = self.entry(name, expected_shape)?;
        let mut out = vec![0f32; entry.info.numel()];
        self.convert_f32(entry, &mut out);
        Ok(out)
    }

    /// Like [`WeightStore::f32`], writing into `out` (whose length must be the element count).
    pub fn f32_into(&self, name: &str, expected_shape: &[usize], out: &mut [f32]) -> Result<(), ModelError> {
        let entry = self.entry(name, expected_shape)?;
        if out.len() != entry.info.numel() {
            return Err(ModelError::tensor(
                &self.origin,
                name,
                format!(
                    "output buffer holds {} values, the tensor has {}",
                    out.len(),
                    entry.info.numel()
                ),
            ));
        }
        self.convert_f32(entry, out);
        Ok(())
    }

    fn convert_f32(&self, entry: &Entry, out: &mut [f32]) {
        use rayon::prelude::*;
        let bytes = self.bytes_of(entry);
        let dtype = entry.info.dtype;
        // Large tensors convert in parallel chunks of CHUNK values: a whole number of blocks of
        // every type, so each chunk of `out` lines up with a whole number of blocks of `bytes`
        // (rows, hence tensors, are whole blocks; `insert` checked the byte count).
        const CHUNK: usize = 1 << 16;
        const _: () = assert!(CHUNK.is_multiple_of(quants::QK) && CHUNK.is_multiple_of(quants::QK_K));
        let chunk_bytes = CHUNK / dtype.block_size() * dtype.block_bytes();
        if out.len() > 4 * CHUNK {
            out.par_chunks_mut(CHUNK)
                .zip(bytes.par_chunks(chunk_bytes))
                .for_each(|(o, b)| convert_chunk_f32(dtype, b, o));
        } else {
            convert_chunk_f32(dtype, bytes, out);
        }
        if let Some(heads) = entry.rope_heads {
            rope_interleaved_to_half(out, heads, entry.info.shape[0]);
        }
    }

    /// A block-quantized matrix as it is stored (a copy of its blocks, rows in HF order), or
    /// `None` when the tensor is a plain float type or not two-dimensional. Errors as
    /// [`WeightStore::f32`].
    pub fn quantized(&self, name: &str, expected_shape: &[usize]) -> Result<Option<QuantTensor>, ModelError> {
        let entry = self.entry(name, expected_shape)?;
        let (Some(ty), &[rows, cols]) = (entry.info.dtype.quant_type(), entry.info.shape.as_slice()) else {
            return Ok(None);
        };
        let mut data = self.bytes_of(entry).to_vec();
        if let Some(heads) = entry.rope_heads {
            // Rows are whole blocks, so reordering rows of bytes reorders the matrix's rows.
            rope_interleaved_to_half(&mut data, heads, rows);
        }
        Ok(Some(QuantTensor::new(ty, data, rows, cols)))
    }

    /// A converted bf16 copy of a tensor in HF layout (f32, f16 and dequantized values rounded to
    /// nearest even). Errors as [`WeightStore::f32`].
    pub fn bf16(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<bf16>, ModelError> {
        let entry = self.entry(name, expected_shape)?;
        match entry.info.dtype {
            DType::BF16 => {
                let mut out: Vec<bf16> = self
                    .bytes_of(entry)
                    .chunks_exact(2)
                    .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                    .collect();
                if let Some(heads) = entry.rope_heads {
                    rope_interleaved_to_half(&mut out, heads, entry.info.shape[0]);
                }
                Ok(out)
            }
            _ => {
                let mut tmp = vec![0f32; entry.info.numel()];
                self.convert_f32(entry, &mut tmp);
                Ok(tmp.into_iter().map(bf16::from_f32).collect())
            }
        }
    }

    /// Checks that every tensor `spec` needs is present with the HF shape; the error names the
    /// first missing or misshapen tensor.
    pub fn check_against(&self, spec: &ModelSpec) -> Result<(), ModelError> {
        // A corrupt layer count must not make us list billions of names: stop at the first
        // layer that is absent (never more than one past the number of stored tensors).
        for i in 0..spec.num_layers {
            let name = format!("model.layers.{i}.input_layernorm.weight");
            if !self.contains(&name) {
                self.entry(&name, &[spec.hidden_size])?;
            }
        }
        for (name, shape) in hf_tensor_shapes(spec) {
            self.entry(&name, &shape)?;
        }
        Ok(())
    }
}

fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Converts raw little-endian values of `dtype` into `out` (as many whole blocks as both hold).
fn convert_chunk_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::Q8_0 => quants::dequantize_q8_0(bytes, out),
        DType::Q4_0 => quants::dequantize_q4_0(bytes, out),
        DType::Q4_1 => quants::dequantize_q4_1(bytes, out),
        DType::Q5_0 => quants::dequantize_q5_0(bytes, out),
        DType::Q5_1 => quants::dequantize_q5_1(bytes, out),
        DType::Q2_K => quants::dequantize_q2_k(bytes, out),
        DType::Q3_K => quants::dequantize_q3_k(bytes, out),
        DType::Q4_K => quants::dequantize_q4_k(bytes, out),
        DType::Q5_K => quants::dequantize_q5_k(bytes, out),
        DType::Q6_K => quants::dequantize_q6_k(bytes, out),
        DType::IQ4_NL => quants::dequantize_iq4_nl(bytes, out),
        DType::IQ4_XS => quants::dequantize_iq4_xs(bytes, out),
    }
}

/// Reorders the rows of a `[heads * head_dim, cols]` matrix (or a bias, `cols = 1`) from the
/// interleaved RoPE layout of llama2.c and GGUF `llama` (pairs `(2i, 2i+1)`) into Hugging Face's
/// rotate-half layout (pairs `(i, i + head_dim/2)`): HF row `h*hd + j*hd/2 + i` = interleaved row
/// `h*hd + 2i + j`. `rows` must be a multiple of `heads` with an even quotient.
pub fn rope_interleaved_to_half<T: Copy>(data: &mut [T], heads: usize, rows: usize) {
    permute_rope_rows(data, heads, rows, true);
}

/// The inverse of [`rope_interleaved_to_half`]: Hugging Face's rotate-half row order back into
/// the interleaved order GGUF `llama` files store (what llama.cpp's converter writes).
pub fn rope_half_to_interleaved<T: Copy>(data: &mut [T], heads: usize, rows: usize) {
    permute_rope_rows(data, heads, rows, false);
}

/// Moves row `h*hd + 2i + j` (interleaved) to `h*hd + j*hd/2 + i` (rotate-half), or back.
fn permute_rope_rows<T: Copy>(data: &mut [T], heads: usize, rows: usize, to_half: bool) {
    if rows == 0 || heads == 0 {
        return;
    }
    let cols = data.len() / rows;
    let hd = rows / heads;
    let src = data.to_vec();
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let half = h * hd + j * hd / 2 + i;
                let interleaved = h * hd + 2 * i + j;
                let (dst_row, src_row) = if to_half {
                    (half, interleaved)
                } else {
                    (interleaved, half)
                };
                data[dst_row * cols..(dst_row + 1) * cols]
                    .copy_from_slice(&src[src_row * cols..(src_row + 1) * cols]);
            }
        }
    }
}

/// Every tensor a model with this spec has, with its HF name and shape, in file order
/// (embedding, layers, final norm, then `lm_head.weight` when the head is not tied).
pub fn hf_tensor_shapes(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
    let h = spec.hidden_size;
    let (q, kv, ffn) = (spec.q_dim(), spec.kv_dim(), spec.intermediate_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![spec.vocab_size, h])];
    for i in 0..spec.num_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        if spec.qkv_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        if spec.qk_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![spec.head_dim]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![spec.head_dim]));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if spec.o_bias {
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![ffn, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![ffn, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, ffn]));
        if spec.mlp_bias {
            out.push((format!("{p}.mlp.gate_proj.bias"), vec![ffn]));
            out.push((format!("{p}.mlp.up_proj.bias"), vec![ffn]));
            out.push((format!("{p}.mlp.down_proj.bias"), vec![h]));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if spec.sequence_classifier {
        out.push(("score.weight".to_string(), vec![1, h]));
    } else if !spec.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![spec.vocab_size, h]));
    }
    out
}

/// Where a model's tokenizer comes from.
#[derive(Clone, PartialEq)]
pub enum TokenizerSource {
    /// A Hugging Face directory with `tokenizer.json` (and `tokenizer_config.json`, …).
    HfDir(PathBuf),
    /// A llama2.c tokenizer file (`tok{vocab}.bin` or `tokenizer.bin` beside the checkpoint).
    Llama2cFile(PathBuf),
    /// The vocabulary embedded in a GGUF file's `tokenizer.ggml.*` metadata.
    Gguf {
        /// `tokenizer.ggml.tokens`: the piece of each id.
        pieces: Vec<String>,
        /// `tokenizer.ggml.scores` (empty if absent).
        scores: Vec<f32>,
        /// `tokenizer.ggml.token_type` (empty if absent): 1 normal, 2 unknown, 3 control,
        /// 4 user-defined, 5 unused, 6 byte.
        token_types: Vec<i32>,
        /// `tokenizer.ggml.merges` (BPE merges, `"a b"`; empty if absent).
        merges: Vec<String>,
        /// `tokenizer.ggml.bos_token_id`.
        bos: Option<u32>,
        /// `tokenizer.ggml.eos_token_id`.
        eos: Option<u32>,
        /// `tokenizer.ggml.model` (`llama` for SentencePiece, `gpt2` for byte-level BPE, …).
        model: String,
        /// `tokenizer.ggml.pre`: the pre-tokenizer name of a BPE vocabulary (`qwen2`, `llama-bpe`, …).
        pre: Option<String>,
        /// `tokenizer.chat_template`, if the file carries one.
        chat_template: Option<String>,
    },
    /// No tokenizer was found next to the weights.
    Missing,
}

impl std::fmt::Debug for TokenizerSource {
    /// Summarises an embedded vocabulary (counts, not the pieces themselves).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerSource::HfDir(p) => f.debug_tuple("HfDir").field(p).finish(),
            TokenizerSource::Llama2cFile(p) => f.debug_tuple("Llama2cFile").field(p).finish(),
            TokenizerSource::Gguf {
                pieces,
                merges,
                bos,
                eos,
                model,
                pre,
                chat_template,
                ..
            } => f
                .debug_struct("Gguf")
                .field("model", model)
                .field("pre", pre)
                .field("pieces", &pieces.len())
                .field("merges", &merges.len())
                .field("bos", bos)
                .field("eos", eos)
                .field("chat_template", &chat_template.is_some())
                .finish_non_exhaustive(),
            TokenizerSource::Missing => f.write_str("Missing"),
        }
    }
}

/// A model opened by [`load_model`].
#[derive(Debug)]
pub struct LoadedModel {
    /// The architecture, from `config.json`, the llama2.c header or the GGUF metadata.
    pub spec: ModelSpec,
    /// The weights under HF names and shapes.
    pub weights: WeightStore,
    /// Where the tokenizer is.
    pub tokenizer: TokenizerSource,
    /// The path given to [`load_model`].
    pub path: PathBuf,
}

/// Opens a model: a directory is a Hugging Face checkpoint (`config.json` plus `model.safetensors`
/// or a sharded `model.safetensors.index.json`), a `.bin` file a llama2.c checkpoint (legacy or
/// version 1), a `.gguf` file a GGUF v2/v3 model. Checks that every tensor the spec needs is present
/// with the right shape; errors name the file and the tensor or field at fault.
pub fn load_model(path: &Path) -> Result<LoadedModel, ModelError> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    let loaded = if meta.is_dir() {
        safetensors_io::load_hf_dir(path)?
    } else {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("bin") => llama2c::load_llama2c(path)?,
            Some("gguf") => gguf::load_gguf(path)?,
            Some("safetensors") => {
                return Err(ModelError::format(
                    path,
                    "a bare .safetensors file has no config; pass the directory holding it and config.json",
                ));
            }
            // Ollama's blobs (`sha256-…`) and other renamed GGUF files: known by their magic.
            _ if starts_with_gguf_magic(path) => gguf::load_gguf(path)?,
            _ => {
                return Err(ModelError::format(
                    path,
                    "unknown model format; expected a Hugging Face directory, a llama2.c .bin or a .gguf file",
                ));
            }
        }
    };
    loaded.weights.check_against(&loaded.spec)?;
    Ok(loaded)
}

fn starts_with_gguf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Memory-maps a whole file read-only.
fn map_file(path: &Path) -> Result<memmap2::Mmap, ModelError> {
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    if len == 0 {
        return Err(ModelError::format(path, "the file is empty"));
    }
    // SAFETY: the map is read-only; like every mmap-based loader we rely on model files not being
    // truncated or rewritten while they are open. All offsets are checked against the map's length.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))
}
