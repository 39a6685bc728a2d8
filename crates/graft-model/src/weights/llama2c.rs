//! llama2.c checkpoints: the legacy layout (7 × int32 header) and the version-1 export
//! (256-byte `ak42` header). See `shared/data/models/stories260K/README.md` for both layouts.

use super::{Backing, DType, Entry, LoadedModel, TensorInfo, TokenizerSource, WeightStore, map_file};
use crate::config::{Architecture, ModelSpec, RopeScaling};
use crate::error::ModelError;
use std::path::Path;

/// `"ak42"` read as a little-endian u32: the magic of llama2.c's versioned exports.
const V1_MAGIC: u32 = 0x616b_3432;
const V1_HEADER_BYTES: usize = 256;
const LEGACY_HEADER_BYTES: usize = 28;

/// The seven hyperparameters of a llama2.c header.
#[derive(Debug, Clone, Copy)]
struct Header {
    dim: usize,
    hidden_dim: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    vocab_size: usize,
    seq_len: usize,
    shared_classifier: bool,
}

fn read_i32(bytes: &[u8], at: usize) -> i32 {
    i32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Parses and validates the 7 int32 parameters at `at`. In the `legacy` layout a negative vocab
/// size means an unshared classifier follows; v1 files carry that flag separately.
fn parse_params(path: &Path, bytes: &[u8], at: usize, legacy: bool) -> Result<Header, ModelError> {
    let names = [
        "dim",
        "hidden_dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "seq_len",
    ];
    let mut v = [0i64; 7];
    for (i, x) in v.iter_mut().enumerate() {
        *x = read_i32(bytes, at + 4 * i) as i64;
    }
    let shared_classifier = if legacy { v[5] > 0 } else { true };
    v[5] = v[5].abs();
    for (name, &x) in names.iter().zip(&v) {
        if x <= 0 || x > (1 << 24) {
            return Err(ModelError::Config {
                path: path.display().to_string(),
                field: (*name).into(),
                message: format!("header value {x} is out of range; is this a llama2.c checkpoint?"),
            });
        }
    }
    let h = Header {
        dim: v[0] as usize,
        hidden_dim: v[1] as usize,
        n_layers: v[2] as usize,
        n_heads: v[3] as usize,
        n_kv_heads: v[4] as usize,
        vocab_size: v[5] as usize,
        seq_len: v[6] as usize,
        shared_classifier,
    };
    let bad = |field: &str, message: String| ModelError::Config {
        path: path.display().to_string(),
        field: field.into(),
        message,
    };
    if !h.dim.is_multiple_of(h.n_heads) || !(h.dim / h.n_heads).is_multiple_of(2) {
        return Err(bad(
            "n_heads",
            format!("dim {} must split into {} heads of even width", h.dim, h.n_heads),
        ));
    }
    if !h.n_heads.is_multiple_of(h.n_kv_heads) {
        return Err(bad(
            "n_kv_heads",
            format!(
                "n_heads {} must be a multiple of n_kv_heads {}",
                h.n_heads, h.n_kv_heads
            ),
        ));
    }
    Ok(h)
}

impl Header {
    fn head_size(&self) -> usize {
        self.dim / self.n_heads
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_size()
    }

    fn spec(&self) -> ModelSpec {
        ModelSpec {
            architecture: Architecture::Llama,
            vocab_size: self.vocab_size,
            hidden_size: self.dim,
            intermediate_size: self.hidden_dim,
            num_layers: self.n_layers,
            num_heads: self.n_heads,
            num_kv_heads: self.n_kv_heads,
            head_dim: self.head_size(),
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: self.seq_len,
            tie_word_embeddings: self.shared_classifier,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            sliding_window: None,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            sequence_classifier: false,
        }
    }
}

/// One layer-stacked (or single) array of the checkpoint.
struct Array {
    /// HF name, with `{i}` for the layer index of stacked arrays.
    name: &'static str,
    /// HF shape of one layer's slice.
    shape: Vec<usize>,
    /// Stacked over layers (`n_layers` slices) or a single tensor.
    per_layer: bool,
    /// Interleaved RoPE rows to permute, with this many heads.
    rope_heads: Option<usize>,
    /// Skipped data (the legacy freq_cis tables): advances the offset, adds no tensor.
    skip: bool,
}

fn array(name: &'static str, shape: Vec<usize>, per_layer: bool) -> Array {
    Array {
        name,
        shape,
        per_layer,
        rope_heads: None,
        skip: false,
    }
}

/// Opens a llama2.c checkpoint (legacy or v1) and looks for its tokenizer beside it.
pub(super) fn load_llama2c(path: &Path) -> Result<LoadedModel, ModelError> {
    let map = map_file(path)?;
    if map.len() < LEGACY_HEADER_BYTES {
        return Err(ModelError::format(
            path,
            format!("truncated: {} bytes is shorter than a llama2.c header", map.len()),
        ));
    }
    let magic = u32::from_le_bytes([map[0], map[1], map[2], map[3]]);
    let (header, data_start, legacy) = if magic == V1_MAGIC {
        if map.len() < V1_HEADER_BYTES {
            return Err(ModelError::format(
                path,
                format!(
                    "truncated: {} bytes is shorter than the 256-byte llama2.c v1 header",
                    map.len()
                ),
            ));
        }
        let version = read_i32(&map, 4);
        if version != 1 {
            return Err(ModelError::Config {
                path: path.display().to_string(),
                field: "version".into(),
                message: format!(
                    "llama2.c export version {version} is not supported (only version 1, fp32; version 2 is \
                     llama2.c's own int8 format)"
                ),
            });
        }
        let mut h = parse_params(path, &map, 8, false)?;
        h.shared_classifier = map[36] != 0;
        (h, V1_HEADER_BYTES, false)
    } else {
        (parse_params(path, &map, 0, true)?, LEGACY_HEADER_BYTES, true)
    };

    let (d, f, v, l) = (header.dim, header.hidden_dim, header.vocab_size, header.n_layers);
    let (kv, hs) = (header.kv_dim(), header.head_size());
    let emb = array("model.embed_tokens.weight", vec![v, d], false);
    let rms_att = array("model.layers.{i}.input_layernorm.weight", vec![d], true);
    let rms_ffn = array("model.layers.{i}.post_attention_layernorm.weight", vec![d], true);
    let mut wq = array("model.layers.{i}.self_attn.q_proj.weight", vec![d, d], true);
    wq.rope_heads = Some(header.n_heads);
    let mut wk = array("model.layers.{i}.self_attn.k_proj.weight", vec![kv, d], true);
    wk.rope_heads = Some(header.n_kv_heads);
    let wv = array("model.layers.{i}.self_attn.v_proj.weight", vec![kv, d], true);
    let wo = array("model.layers.{i}.self_attn.o_proj.weight", vec![d, d], true);
    let w1 = array("model.layers.{i}.mlp.gate_proj.weight", vec![f, d], true);
    let w2 = array("model.layers.{i}.mlp.down_proj.weight", vec![d, f], true);
    let w3 = array("model.layers.{i}.mlp.up_proj.weight", vec![f, d], true);
    let norm = array("model.norm.weight", vec![d], false);
    let mut layout = if legacy {
        let freq = Array {
            name: "freq_cis",
            shape: vec![header.seq_len, hs],
            per_layer: false,
            rope_heads: None,
            skip: true,
        };
        vec![emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, norm, freq]
    } else {
        vec![rms_att, rms_ffn, norm, emb, wq, wk, wv, wo, w1, w2, w3]
    };
    if !header.shared_classifier {
        layout.push(array("lm_head.weight", vec![v, d], false));
    }

    let mut store = WeightStore::new(path);
    let file_len = map.len();
    let source = store.add_source(path, Backing::Mmap(map));
    let mut offset = data_start;
    for a in &layout {
        // Header values are ≤ 2^24, so these products fit in u64 for any realistic layout;
        // checked anyway so a hostile header cannot wrap.
        let bytes = a
            .shape
            .iter()
            .try_fold(4usize, |acc, &x| acc.checked_mul(x))
            .ok_or_else(|| ModelError::format(path, format!("tensor `{}` size overflows", a.name)))?;
        let copies = if a.per_layer { l } else { 1 };
        for i in 0..copies {
            if !a.skip {
                let name = a.name.replace("{i}", &i.to_string());
                let entry = Entry {
                    info: TensorInfo {
                        name,
                        shape: a.shape.clone(),
                        dtype: DType::F32,
                    },
                    source,
                    offset,
                    len: bytes,
                    rope_heads: a.rope_heads,
                };
                store.insert(entry, path)?;
            } else if offset.checked_add(bytes).is_none_or(|end| end > file_len) {
                return Err(ModelError::format(
                    path,
                    format!("truncated: the freq_cis tables end past the file's {file_len} bytes"),
                ));
            }
            offset = offset
                .checked_add(bytes)
                .ok_or_else(|| ModelError::format(path, "tensor offsets overflow"))?;
        }
    }
    if offset != file_len {
        return Err(ModelError::format(
            path,
            format!(
                "the header (dim {d}, hidden_dim {f}, n_layers {l}, n_heads {}, n_kv_heads {}, vocab_size {v}, \
                 seq_len {}, {} classifier) describes {offset} bytes but the file has {file_len}",
                header.n_heads,
                header.n_kv_heads,
                header.seq_len,
                if header.shared_classifier {
                    "shared"
                } else {
                    "separate"
                }
            ),
        ));
    }

    let dir = path.parent().unwrap_or(Path::new("."));
    let tokenizer = [format!("tok{v}.bin"), "tokenizer.bin".to_string()]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .map(TokenizerSource::Llama2cFile)
        .unwrap_or(TokenizerSource::Missing);
    Ok(LoadedModel {
        spec: header.spec(),
        weights: store,
        tokenizer,
        path: path.to_path_buf(),
    })
}
