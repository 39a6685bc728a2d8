//! GGUF v2/v3 files (llama.cpp): header, metadata, tensor infos, and the mapping of `llama`,
//! `qwen2` and `qwen3` models onto Hugging Face names, shapes and RoPE row order.
//!
//! Layout (all little-endian): `"GGUF"`, u32 version, u64 tensor count, u64 metadata count, the
//! metadata key/values (key: u64-length string; u32 type; value), the tensor infos (name, u32
//! n_dims, u64 dims innermost-first, u32 ggml type, u64 offset into the data section), then the
//! data section at the next multiple of `general.alignment` (default 32).

use super::{Backing, DType, Entry, LoadedModel, TensorInfo, TokenizerSource, WeightStore, map_file};
use crate::config::{Architecture, ModelSpec, RopeScaling};
use crate::error::ModelError;
use std::collections::HashMap;
use std::path::Path;

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_ARRAY_NESTING: usize = 4;

/// One metadata value of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8: a UTF-8 string (invalid UTF-8 is replaced lossily).
    String(String),
    /// Type 9: an array of values of one type.
    Array(Vec<GgufValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(x) => Some(x as u64),
            GgufValue::U16(x) => Some(x as u64),
            GgufValue::U32(x) => Some(x as u64),
            GgufValue::U64(x) => Some(x),
            GgufValue::I8(x) => u64::try_from(x).ok(),
            GgufValue::I16(x) => u64::try_from(x).ok(),
            GgufValue::I32(x) => u64::try_from(x).ok(),
            GgufValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(x) => Some(x as i64),
            GgufValue::I16(x) => Some(x as i64),
            GgufValue::I32(x) => Some(x as i64),
            GgufValue::I64(x) => Some(x),
            _ => self.as_u64().and_then(|x| i64::try_from(x).ok()),
        }
    }

    /// The value as a float, if it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(x) => Some(x as f64),
            GgufValue::F64(x) => Some(x),
            _ => self.as_i64().map(|x| x as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor info of a GGUF file, as stored (GGUF name, dims innermost-first).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    /// GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, innermost (contiguous) first: `[in, out]` for a linear weight.
    pub dims: Vec<u64>,
    /// The ggml type id (0 F32, 1 F16, 8 Q8_0, 30 BF16, 12 Q4_K, …).
    pub ggml_type: u32,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
}

impl GgufTensor {
    /// The ggml name of this tensor's type (`F32`, `Q4_K`, …).
    pub fn type_name(&self) -> String {
        ggml_type_name(self.ggml_type)
    }
}

/// The parsed header of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufFile {
    /// Format version (2 or 3).
    pub version: u32,
    /// All metadata key/values.
    pub metadata: HashMap<String, GgufValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensor>,
    /// `general.alignment` (default 32).
    pub alignment: u64,
    /// Absolute byte offset of the data section.
    pub data_offset: u64,
}

/// Name of a ggml tensor type id.
fn ggml_type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        other => return format!("unknown type {other}"),
    };
    name.to_string()
}

/// The ggml type id of `dtype` (the inverse of [`dtype_of`]).
pub(super) fn ggml_type_id(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q5_0 => 6,
        DType::Q5_1 => 7,
        DType::Q8_0 => 8,
        DType::Q2_K => 10,
        DType::Q3_K => 11,
        DType::Q4_K => 12,
        DType::Q5_K => 13,
        DType::Q6_K => 14,
        DType::IQ4_NL => 20,
        DType::IQ4_XS => 23,
        DType::BF16 => 30,
    }
}

/// The graft storage type of a ggml tensor type id, if graft reads it.
pub(super) fn dtype_of(ggml_type: u32) -> Option<DType> {
    Some(match ggml_type {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        6 => DType::Q5_0,
        7 => DType::Q5_1,
        8 => DType::Q8_0,
        10 => DType::Q2_K,
        11 => DType::Q3_K,
        12 => DType::Q4_K,
        13 => DType::Q5_K,
        14 => DType::Q6_K,
        20 => DType::IQ4_NL,
        23 => DType::IQ4_XS,
        30 => DType::BF16,
        _ => return None,
    })
}

/// A bounds-checked little-endian cursor over the file bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ModelError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(ModelError::format(
                self.path,
                format!(
                    "truncated or corrupt: reading {what} at byte {} needs {n} bytes, the file has {}",
                    self.pos,
                    self.bytes.len()
                ),
            )),
        }
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, what: &str) -> Result<u8, ModelError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, ModelError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    /// A count that claims `n` items of at least `min_bytes` each; rejects counts the rest of the
    /// file could not hold (so corrupt counts never trigger huge allocations).
    fn count(&mut self, what: &str, min_bytes: usize) -> Result<usize, ModelError> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .filter(|&n| n.saturating_mul(min_bytes) <= self.remaining());
        fits.ok_or_else(|| {
            ModelError::format(
                self.path,
                format!(
                    "corrupt: {what} {n} at byte {} cannot fit in the remaining {} bytes",
                    self.pos - 8,
                    self.remaining()
                ),
            )
        })
    }
    fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let n = self.count(what, 1)?;
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue, ModelError> {
        Ok(match ty {
            0 => GgufValue::U8(self.u8(key)?),
            1 => GgufValue::I8(self.u8(key)? as i8),
            2 => GgufValue::U16(self.u16(key)?),
            3 => GgufValue::I16(self.u16(key)? as i16),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(self.u32(key)? as i32),
            6 => GgufValue::F32(f32::from_bits(self.u32(key)?)),
            7 => GgufValue::Bool(self.u8(key)? != 0),
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(ModelError::format(
                        self.path,
                        format!("metadata `{key}`: arrays nested too deeply"),
                    ));
                }
                let elem = self.u32(key)?;
                let n = self.count(&format!("length of array `{key}`"), 1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(self.u64(key)? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64(key)?)),
            other => {
                return Err(ModelError::format(
                    self.path,
                    format!(
                        "metadata `{key}` has unknown value type {other}; the file is corrupt or newer than this reader"
                    ),
                ));
            }
        })
    }
}

/// Parses the header, metadata and tensor infos of a GGUF file held in `bytes`. Every tensor's
/// data range is checked against the file size for the types whose size is known.
pub fn parse_gguf(path: &Path, bytes: &[u8]) -> Result<GgufFile, ModelError> {
    let mut r = Reader { bytes, pos: 0, path };
    let magic = r.take(4, "the magic")?;
    if magic != GGUF_MAGIC {
        return Err(ModelError::format(
            path,
            "not a GGUF file (the first four bytes are not \"GGUF\")",
        ));
    }
    let version = r.u32("the version")?;
    if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
        return Err(ModelError::format(
            path,
            "big-endian GGUF files are not supported",
        ));
    }
    if version != 2 && version != 3 {
        return Err(ModelError::format(
            path,
            format!("GGUF version {version} is not supported (expected 2 or 3)"),
        ));
    }
    // A tensor info takes at least 24 bytes, a key/value at least 13.
    let n_tensors = r.count("tensor count", 24)?;
    let n_kv = r.count("metadata count", 13)?;
    let mut metadata = HashMap::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = r.string("a metadata key")?;
        let ty = r.u32(&key)?;
        let value = r.value(ty, &key, 0)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|&a| a > 0 && a <= 1 << 20)
            .ok_or_else(|| ModelError::Config {
                path: path.display().to_string(),
                field: "general.alignment".into(),
                message: format!("expected a positive integer, got {v:?}"),
            })?,
    };
    let mut tensors = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = r.string("a tensor name")?;
        let n_dims = r.u32(&name)? as usize;
        if n_dims > 8 {
            return Err(ModelError::format(
                path,
                format!("tensor `{name}`: {n_dims} dimensions (corrupt)"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(r.u64(&name)?);
        }
        let ggml_type = r.u32(&name)?;
        let offset = r.u64(&name)?;
        tensors.push(GgufTensor {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
    if data_offset > bytes.len() as u64 && n_tensors > 0 {
        return Err(ModelError::format(
            path,
            format!(
                "truncated: the data section would start at byte {data_offset}, the file has {}",
                bytes.len()
            ),
        ));
    }
    for t in &mut tensors {
        t.offset = t.offset.checked_add(data_offset).ok_or_else(|| {
            ModelError::format(
                path,
                format!("tensor `{}`: offset {} overflows", t.name, t.offset),
            )
        })?;
    }
    Ok(GgufFile {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// Reads the header, metadata and tensor infos of a GGUF file (memory-mapped; no tensor data is
/// read).
pub fn read_gguf(path: &Path) -> Result<GgufFile, ModelError> {
    let map = map_file(path)?;
    parse_gguf(path, &map)
}

/// Maps a GGUF tensor name onto its Hugging Face name.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Maps a Hugging Face tensor name onto its GGUF name (the inverse of [`hf_name`]).
pub(super) fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let gguf = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf}.{kind}"))
}

/// Typed access to GGUF metadata with errors that name the key.
struct Meta<'a> {
    file: &'a GgufFile,
    path: &'a Path,
}

impl Meta<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ModelError {
        ModelError::Config {
            path: self.path.display().to_string(),
            field: key.into(),
            message: message.into(),
        }
    }
    fn get(&self, key: &str) -> Option<&GgufValue> {
        self.file.metadata.get(key)
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {v:?}"))),
        }
    }
    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(key, "missing; expected a positive integer"))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, got {v:?}"))),
        }
    }
    fn opt_str(&self, key: &str) -> Result<Option<String>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.err(key, format!("expected a string, got {v:?}"))),
        }
    }
    fn opt_u32(&self, key: &str) -> Result<Option<u32>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a token id, got {v:?}"))),
        }
    }
    fn array(&self, key: &str) -> Result<Option<&[GgufValue]>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| self.err(key, "expected an array")),
        }
    }
}

/// Opens a GGUF model: spec from the metadata, tensors under HF names, tokenizer from the
/// `tokenizer.ggml.*` keys.
pub(super) fn load_gguf(path: &Path) -> Result<LoadedModel, ModelError> {
    let map = map_file(path)?;
    let file = parse_gguf(path, &map)?;
    let meta = Meta { file: &file, path };

    let arch_name = meta
        .opt_str("general.architecture")?
        .ok_or_else(|| meta.err("general.architecture", "missing"))?;
    let architecture = match arch_name.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        other => {
            return Err(meta.err(
                "general.architecture",
                format!("unsupported architecture `{other}`; expected llama (incl. Mistral), qwen2 or qwen3"),
            ));
        }
    };
    let a = |k: &str| format!("{arch_name}.{k}");
    if meta.opt_usize(&a("expert_count"))?.unwrap_or(0) > 0 {
        return Err(meta.err(&a("expert_count"), "mixture-of-experts models are not supported"));
    }
    let hidden_size = meta.usize(&a("embedding_length"))?;
    let intermediate_size = meta.usize(&a("feed_forward_length"))?;
    let num_layers = meta.usize(&a("block_count"))?;
    let num_heads = meta.usize(&a("attention.head_count"))?;
    let num_kv_heads = meta
        .opt_usize(&a("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(meta.err(
            &a("attention.head_count_kv"),
            format!("head_count {num_heads} must be a positive multiple of head_count_kv {num_kv_heads}"),
        ));
    }
    let head_dim = match meta.opt_usize(&a("attention.key_length"))? {
        Some(d) => d,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => {
            return Err(meta.err(
                &a("attention.head_count"),
                format!("embedding_length {hidden_size} is not divisible by head_count {num_heads}"),
            ));
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(meta.err(
            &a("attention.key_length"),
            format!("RoPE needs an even head size, got {head_dim}"),
        ));
    }
    if let Some(v) = meta.opt_usize(&a("attention.value_length"))?
        && v != head_dim
    {
        return Err(meta.err(
            &a("attention.value_length"),
            format!("{v} differs from the key length {head_dim}"),
        ));
    }
    if let Some(r) = meta.opt_usize(&a("rope.dimension_count"))?
        && r != head_dim
    {
        return Err(meta.err(
            &a("rope.dimension_count"),
            format!("partial rotary embeddings ({r} of {head_dim} dims) are not supported"),
        ));
    }
    let rms_norm_eps =
        meta.opt_f64(&a("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| meta.err(&a("attention.layer_norm_rms_epsilon"), "missing"))? as f32;
    let rope_theta = meta.opt_f64(&a("rope.freq_base"))?.unwrap_or(10000.0) as f32;
    let max_position_embeddings = meta.usize(&a("context_length"))?;

    // Tensors.
    let mut store = WeightStore::new(path);
    let file_len = map.len() as u64;
    let by_name: HashMap<&str, &GgufTensor> = file.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let interleaved = architecture == Architecture::Llama;
    let mut pending = Vec::new();
    for t in &file.tensors {
        let Some(name) = hf_name(&t.name) else { continue };
        let shape: Vec<usize> = t
            .dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<_>>()
            .ok_or_else(|| ModelError::tensor(path, &t.name, format!("dims {:?} overflow", t.dims)))?;
        let dtype = dtype_of(t.ggml_type).ok_or_else(|| {
            let supported: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
            ModelError::tensor(
                path,
                &t.name,
                format!(
                    "({name}) has type {}, which is not supported; supported GGUF types: {}",
                    t.type_name(),
                    supported.join(", ")
                ),
            )
        })?;
        let block = dtype.block_size() as u64;
        if block > 1 && t.dims.first().is_none_or(|&d| d % block != 0) {
            return Err(ModelError::tensor(
                path,
                &t.name,
                format!(
                    "({name}) has type {dtype}, whose rows must be a multiple of its block size {block}, but dims \
                     (innermost first) are {:?}",
                    t.dims
                ),
            ));
        }
        let numel = super::checked_numel(&shape)
            .ok_or_else(|| ModelError::tensor(path, &t.name, format!("dims {:?} overflow", t.dims)))?;
        let len = dtype
            .storage_bytes(numel)
            .ok_or_else(|| ModelError::tensor(path, &t.name, format!("dims {:?} overflow", t.dims)))?;
        if t.offset.checked_add(len as u64).is_none_or(|end| end > file_len) {
            return Err(ModelError::tensor(
                path,
                &t.name,
                format!(
                    "data at bytes {}..{} lies beyond the end of the file ({file_len} bytes); the file is truncated \
                     or corrupt",
                    t.offset,
                    t.offset as u128 + len as u128
                ),
            ));
        }
        let rope_heads = match (
            interleaved,
            name.contains(".self_attn.q_proj."),
            name.contains(".self_attn.k_proj."),
        ) {
            (true, true, _) => Some(num_heads),
            (true, _, true) => Some(num_kv_heads),
            _ => None,
        };
        pending.push(Entry {
            info: TensorInfo { name, shape, dtype },
            source: 0,
            offset: t.offset as usize,
            len,
            rope_heads,
        });
    }
    let rope_scaling = rope_scaling(&meta, &arch_name, &by_name, &map, head_dim, rope_theta)?;
    let source = store.add_source(path, Backing::Mmap(map));
    for mut e in pending {
        e.source = source;
        store.insert(e, path)?;
    }

    let vocab_size = match store.info("model.embed_tokens.weight") {
        Some(info) if info.shape.len() == 2 => info.shape[0],
        Some(info) => {
            return Err(ModelError::tensor(
                path,
                "token_embd.weight",
                format!("expected 2 dimensions, found {:?}", info.shape),
            ));
        }
        None => {
            return Err(ModelError::tensor(
                path,
                "token_embd.weight",
                "not found (the token embedding)",
            ));
        }
    };
    let has = |n: &str| store.contains(n);
    let (qkv_bias, o_bias) = match architecture {
        Architecture::Qwen2 => (true, false),
        _ => (
            has("model.layers.0.self_attn.q_proj.bias"),
            has("model.layers.0.self_attn.o_proj.bias"),
        ),
    };
    let bos = meta.opt_u32("tokenizer.ggml.bos_token_id")?;
    let eos = meta.opt_u32("tokenizer.ggml.eos_token_id")?;
    let spec = ModelSpec {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: !has("lm_head.weight"),
        qkv_bias,
        o_bias,
        mlp_bias: has("model.layers.0.mlp.gate_proj.bias"),
        qk_norm: architecture == Architecture::Qwen3,
        sliding_window: None,
        bos_token_id: bos,
        eos_token_ids: eos.into_iter().collect(),
        sequence_classifier: false,
    };
    let tokenizer = tokenizer(&meta, bos, eos)?;
    Ok(LoadedModel {
        spec,
        weights: store,
        tokenizer,
        path: path.to_path_buf(),
    })
}

/// RoPE scaling from `{arch}.rope.scaling.*`, or Llama 3 scaling recognised from a
/// `rope_freqs.weight` tensor (llama.cpp stores the per-frequency factors, not the parameters).
fn rope_scaling(
    meta: &Meta,
    arch: &str,
    tensors: &HashMap<&str, &GgufTensor>,
    bytes: &[u8],
    head_dim: usize,
    theta: f32,
) -> Result<RopeScaling, ModelError> {
    let type_key = format!("{arch}.rope.scaling.type");
    match meta.opt_str(&type_key)?.as_deref() {
        None | Some("none") => {}
        Some("linear") => {
            let key = format!("{arch}.rope.scaling.factor");
            let factor = meta
                .opt_f64(&key)?
                .ok_or_else(|| meta.err(&key, "missing for linear RoPE scaling"))?;
            return Ok(RopeScaling::Linear {
                factor: factor as f32,
            });
        }
        Some(other) => {
            return Err(meta.err(
                &type_key,
                format!("RoPE scaling `{other}` is not supported (none, linear)"),
            ));
        }
    }
    let Some(t) = tensors.get("rope_freqs.weight") else {
        return Ok(RopeScaling::None);
    };
    let path = meta.path;
    let n = head_dim / 2;
    let unsupported = |why: String| ModelError::tensor(path, "rope_freqs.weight", why);
    if t.ggml_type != 0 || t.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)) != Some(n as u64) {
        return Err(unsupported(format!(
            "expected {n} F32 values (one factor per frequency), found {} {:?}",
            t.type_name(),
            t.dims
        )));
    }
    let start = usize::try_from(t.offset)
        .ok()
        .filter(|&s| s.checked_add(4 * n).is_some_and(|e| e <= bytes.len()));
    let start = start.ok_or_else(|| unsupported("data lies beyond the end of the file".into()))?;
    let factors: Vec<f32> = bytes[start..start + 4 * n]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let factor = factors.iter().copied().fold(1.0f32, f32::max);
    let original = meta
        .opt_usize(&format!("{arch}.rope.scaling.original_context_length"))?
        .unwrap_or(8192);
    let (low, high) = (1.0f32, 4.0f32);
    let matches = factors.iter().enumerate().all(|(i, &f)| {
        let freq = 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64);
        let expected = llama3_factor(freq, factor as f64, low as f64, high as f64, original as f64);
        ((f as f64) - expected).abs() <= 1e-3 * expected.abs().max(1.0)
    });
    if !matches {
        return Err(unsupported(
            "the per-frequency RoPE factors do not match Llama 3 scaling (low_freq_factor 1, high_freq_factor 4); \
             other schemes are not supported"
                .into(),
        ));
    }
    if factor == 1.0 {
        return Ok(RopeScaling::None);
    }
    Ok(RopeScaling::Llama3 {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: original,
    })
}

/// The divisor Llama 3 scaling applies to one inverse frequency.
pub(super) fn llama3_factor(freq: f64, factor: f64, low: f64, high: f64, original: f64) -> f64 {
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    if wavelen < high_wavelen {
        1.0
    } else if wavelen > low_wavelen {
        factor
    } else {
        let smooth = (original / wavelen - low) / (high - low);
        1.0 / ((1.0 - smooth) / factor + smooth)
    }
}

/// The embedded vocabulary, or [`TokenizerSource::Missing`] without `tokenizer.ggml.tokens`.
fn tokenizer(meta: &Meta, bos: Option<u32>, eos: Option<u32>) -> Result<TokenizerSource, ModelError> {
    let Some(tokens) = meta.array("tokenizer.ggml.tokens")? else {
        return Ok(TokenizerSource::Missing);
    };
    let strings = |key: &str, items: &[GgufValue]| -> Result<Vec<String>, ModelError> {
        items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| meta.err(key, "expected an array of strings"))
            })
            .collect()
    };
    let pieces = strings("tokenizer.ggml.tokens", tokens)?;
    let scores = match meta.array("tokenizer.ggml.scores")? {
        None => Vec::new(),
        Some(a) => a
            .iter()
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| meta.err("tokenizer.ggml.scores", "expected numbers"))
            })
            .collect::<Result<_, _>>()?,
    };
    let token_types = match meta.array("tokenizer.ggml.token_type")? {
        None => Vec::new(),
        Some(a) => a
            .iter()
            .map(|v| {
                v.as_i64()
                    .and_then(|x| i32::try_from(x).ok())
                    .ok_or_else(|| meta.err("tokenizer.ggml.token_type", "expected integers"))
            })
            .collect::<Result<_, _>>()?,
    };
    for (key, len) in [
        ("tokenizer.ggml.scores", scores.len()),
        ("tokenizer.ggml.token_type", token_types.len()),
    ] {
        if len != 0 && len != pieces.len() {
            return Err(meta.err(
                key,
                format!("has {len} entries but tokenizer.ggml.tokens has {}", pieces.len()),
            ));
        }
    }
    let merges = match meta.array("tokenizer.ggml.merges")? {
        None => Vec::new(),
        Some(a) => strings("tokenizer.ggml.merges", a)?,
    };
    Ok(TokenizerSource::Gguf {
        pieces,
        scores,
        token_types,
        merges,
        bos,
        eos,
        model: meta
            .opt_str("tokenizer.ggml.model")?
            .unwrap_or_else(|| "llama".into()),
        pre: meta.opt_str("tokenizer.ggml.pre")?,
        chat_template: meta.opt_str("tokenizer.chat_template")?,
    })
}

/// Reads a llama.cpp LoRA adapter GGUF (`general.type = adapter`, `adapter.type = lora`, tensors
/// `blk.N.<module>.weight.lora_a` / `.lora_b`, as `convert_lora_to_gguf.py` and `graft export
/// gguf-lora` write them) for a base with `spec`: each pair's scale is llama.cpp's
/// `adapter.lora.alpha / r` (1 without an alpha), q/k B rows of `llama` models go back to HF's
/// rotate-half order. Errors name the file and the tensor or key.
pub(crate) fn load_gguf_lora(path: &Path, spec: &ModelSpec) -> Result<crate::peft::LoraAdapter, ModelError> {
    use crate::peft::{LoraAdapter, LoraAdapterConfig, LoraModule, LoraPair};
    let map = map_file(path)?;
    let file = parse_gguf(path, &map)?;
    let meta = Meta { file: &file, path };
    if meta.opt_str("general.type")?.as_deref() != Some("adapter")
        || meta.opt_str("adapter.type")?.as_deref() != Some("lora")
    {
        return Err(meta.err(
            "general.type",
            "not a LoRA adapter GGUF (expected general.type = adapter and adapter.type = lora)",
        ));
    }
    let arch = meta.opt_str("general.architecture")?.unwrap_or_default();
    let base_arch = super::gguf_export::gguf_architecture(spec.architecture);
    if arch != base_arch {
        return Err(meta.err(
            "general.architecture",
            format!("the adapter is for `{arch}`, the base model is `{base_arch}`"),
        ));
    }
    let alpha = meta.opt_f64("adapter.lora.alpha")?.unwrap_or(0.0) as f32;
    let tensor = |t: &GgufTensor| -> Result<Vec<f32>, ModelError> {
        let dtype = dtype_of(t.ggml_type).ok_or_else(|| {
            ModelError::tensor(
                path,
                &t.name,
                format!("has type {}, which graft does not read", t.type_name()),
            )
        })?;
        let n: u64 = t.dims.iter().product();
        let len = dtype.storage_bytes(n as usize).ok_or_else(|| {
            ModelError::tensor(path, &t.name, format!("dims {:?} are not whole blocks", t.dims))
        })?;
        let start = t.offset as usize;
        let bytes = map
            .get(start..start.saturating_add(len))
            .ok_or_else(|| ModelError::tensor(path, &t.name, "data lies beyond the end of the file"))?;
        super::quantize::dequantize(dtype, bytes, n as usize)
            .map_err(|e| ModelError::tensor(path, &t.name, e))
    };
    let mut adapter = LoraAdapter::zeros(LoraAdapterConfig::new(1, 1.0, &[]), spec);
    let mut modules = Vec::new();
    let mut first_rank = None;
    for t in &file.tensors {
        let Some(base) = t.name.strip_suffix(".lora_a") else {
            if !t.name.ends_with(".lora_b") {
                return Err(ModelError::tensor(
                    path,
                    &t.name,
                    "is neither a lora_a nor a lora_b tensor",
                ));
            }
            continue;
        };
        let b_name = format!("{base}.lora_b");
        let b = file
            .tensors
            .iter()
            .find(|x| x.name == b_name)
            .ok_or_else(|| ModelError::tensor(path, &t.name, format!("has no `{b_name}`")))?;
        let hf = hf_name(base)
            .ok_or_else(|| ModelError::tensor(path, &t.name, "names no projection graft knows"))?;
        let (layer, m) = LoraModule::of_weight(&hf)
            .ok_or_else(|| ModelError::tensor(path, &t.name, "is not a LoRA-able projection"))?;
        if layer >= spec.num_layers {
            return Err(ModelError::tensor(
                path,
                &t.name,
                format!("layer {layer} of a {}-layer model", spec.num_layers),
            ));
        }
        let (out, inp) = m.dims(spec);
        let r = t.dims.get(1).copied().unwrap_or(0) as usize;
        if t.dims != [inp as u64, r as u64] || b.dims != [r as u64, out as u64] || r == 0 {
            return Err(ModelError::tensor(
                path,
                &t.name,
                format!(
                    "dims {:?} / {:?}; expected [{inp}, r] and [r, {out}] for {hf}",
                    t.dims, b.dims
                ),
            ));
        }
        let a = tensor(t)?;
        let mut bv = tensor(b)?;
        if base_arch == "llama" {
            match m {
                LoraModule::Q => super::rope_interleaved_to_half(&mut bv, spec.num_heads, out),
                LoraModule::K => super::rope_interleaved_to_half(&mut bv, spec.num_kv_heads, out),
                _ => {}
            }
        }
        let scale = if alpha == 0.0 { 1.0 } else { alpha / r as f32 };
        *adapter.layers[layer].get_mut(m) = Some(LoraPair { a, b: bv, r, scale });
        if !modules.contains(&m) {
            modules.push(m);
        }
        first_rank.get_or_insert(r);
    }
    let Some(r) = first_rank else {
        return Err(ModelError::format(
            path,
            "the adapter has no lora_a/lora_b tensors",
        ));
    };
    adapter.config = LoraAdapterConfig::new(r, if alpha == 0.0 { r as f32 } else { alpha }, &modules);
    Ok(adapter)
}
