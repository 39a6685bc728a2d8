//! A model or a LoRA adapter as the GGUF file llama.cpp loads: the architecture's hyperparameters
//! under llama.cpp's key names, tensors under GGUF names with dims innermost-first, q/k rows of
//! `llama` models permuted back into the interleaved RoPE order, and each tensor in the type
//! llama.cpp's own quantizer would choose for the requested file type
//! ([`quantize::tensor_types`]). Tokenizer keys come from the caller (`graft-hub` builds them).

use super::gguf::{GgufValue, gguf_name};
use super::gguf_write::{GgufTensorSpec, write_gguf};
use super::quantize::{self, FileType, ModelFacts};
use super::{DType, rope_half_to_interleaved};
use crate::config::{Architecture, ModelSpec, RopeScaling};
use crate::error::ModelError;
use crate::peft::{LoraAdapter, LoraModule};
use std::path::Path;

/// llama.cpp's name of an architecture (`general.architecture`).
pub fn gguf_architecture(arch: Architecture) -> &'static str {
    match arch {
        // llama.cpp converts Mistral checkpoints to its `llama` architecture.
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
    }
}

fn string(s: &str) -> GgufValue {
    GgufValue::String(s.to_string())
}

fn u32_of(path: &Path, key: &str, x: usize) -> Result<GgufValue, ModelError> {
    u32::try_from(x)
        .map(GgufValue::U32)
        .map_err(|_| ModelError::Config {
            path: path.display().to_string(),
            field: key.into(),
            message: format!("{x} does not fit in a GGUF u32"),
        })
}

/// `general.*` and the architecture's hyperparameter keys for a model with `spec`.
fn model_metadata(
    path: &Path,
    spec: &ModelSpec,
    name: &str,
    ftype: FileType,
) -> Result<Vec<(String, GgufValue)>, ModelError> {
    let arch = gguf_architecture(spec.architecture);
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        ("general.architecture".to_string(), string(arch)),
        ("general.type".into(), string("model")),
        ("general.name".into(), string(name)),
        (
            "general.file_type".into(),
            GgufValue::U32(ftype.general_file_type()),
        ),
        ("general.quantization_version".into(), GgufValue::U32(2)),
    ];
    for (key, x) in [
        ("vocab_size", spec.vocab_size),
        ("context_length", spec.max_position_embeddings),
        ("embedding_length", spec.hidden_size),
        ("block_count", spec.num_layers),
        ("feed_forward_length", spec.intermediate_size),
        ("rope.dimension_count", spec.head_dim),
        ("attention.head_count", spec.num_heads),
        ("attention.head_count_kv", spec.num_kv_heads),
        ("attention.key_length", spec.head_dim),
        ("attention.value_length", spec.head_dim),
    ] {
        m.push((k(key), u32_of(path, &k(key), x)?));
    }
    m.push((
        k("attention.layer_norm_rms_epsilon"),
        GgufValue::F32(spec.rms_norm_eps),
    ));
    m.push((k("rope.freq_base"), GgufValue::F32(spec.rope_theta)));
    match spec.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            m.push((k("rope.scaling.type"), string("linear")));
            m.push((k("rope.scaling.factor"), GgufValue::F32(factor)));
        }
        RopeScaling::Llama3 {
            original_max_position_embeddings,
            ..
        } => {
            // The factors themselves travel as the `rope_freqs.weight` tensor.
            m.push((
                k("rope.scaling.original_context_length"),
                u32_of(
                    path,
                    "rope.scaling.original_context_length",
                    original_max_position_embeddings,
                )?,
            ));
        }
    }
    Ok(m)
}

/// Llama 3 RoPE scaling's per-frequency divisors (the `rope_freqs.weight` tensor), as
/// llama.cpp's converter computes them.
fn llama3_rope_factors(spec: &ModelSpec) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = spec.rope_scaling
    else {
        return None;
    };
    let hd = spec.head_dim;
    Some(
        (0..hd / 2)
            .map(|i| {
                let freq = 1.0 / (spec.rope_theta as f64).powf(2.0 * i as f64 / hd as f64);
                super::gguf::llama3_factor(
                    freq,
                    factor as f64,
                    low_freq_factor as f64,
                    high_freq_factor as f64,
                    original_max_position_embeddings as f64,
                ) as f32
            })
            .collect(),
    )
}

/// How many RoPE heads the rows of an HF tensor hold when a `llama` GGUF stores them
/// interleaved (q and k projections), else `None`.
fn interleaved_heads(spec: &ModelSpec, hf: &str) -> Option<usize> {
    if gguf_architecture(spec.architecture) != "llama" {
        return None;
    }
    if hf.contains(".self_attn.q_proj.") {
        Some(spec.num_heads)
    } else if hf.contains(".self_attn.k_proj.") {
        Some(spec.num_kv_heads)
    } else {
        None
    }
}

fn refuse_classifier(path: &Path, spec: &ModelSpec) -> Result<(), ModelError> {
    if spec.sequence_classifier {
        return Err(ModelError::format(
            path,
            "a reward (sequence-classification) model has no GGUF form llama.cpp runs; export it with \
             `graft export merge` instead",
        ));
    }
    Ok(())
}

fn quantize_err<'a>(path: &'a Path, name: &'a str) -> impl Fn(String) -> ModelError + 'a {
    move |e| ModelError::tensor(path, name, e)
}

/// Writes the model with `spec` as one GGUF file of file type `ftype`, with `extra` metadata (the
/// tokenizer and chat template) after the model's own keys. `tensors` are HF names and shapes (as
/// transformers has them); `fetch(i)` gives tensor `i`'s f32 values when it is written, so only
/// one tensor is in memory at a time. Returns the type each GGUF tensor was written in, by GGUF
/// name.
pub fn save_gguf_model(
    path: &Path,
    spec: &ModelSpec,
    tensors: &[(String, Vec<usize>)],
    mut fetch: impl FnMut(usize) -> Result<Vec<f32>, ModelError>,
    ftype: FileType,
    name: &str,
    extra: &[(String, GgufValue)],
) -> Result<Vec<(String, DType)>, ModelError> {
    refuse_classifier(path, spec)?;
    let mut metadata = model_metadata(path, spec, name, ftype)?;
    metadata.extend(extra.iter().cloned());

    // (GGUF name, dims innermost-first, index into `tensors` or None for rope_freqs).
    let mut layout: Vec<(String, Vec<u64>, Option<usize>)> = Vec::with_capacity(tensors.len() + 1);
    for (i, (hf, shape)) in tensors.iter().enumerate() {
        let gguf = gguf_name(hf)
            .ok_or_else(|| ModelError::tensor(path, hf, "has no GGUF counterpart in llama.cpp's naming"))?;
        layout.push((gguf, shape.iter().rev().map(|&d| d as u64).collect(), Some(i)));
    }
    let rope_factors = llama3_rope_factors(spec);
    if let Some(f) = &rope_factors {
        layout.push(("rope_freqs.weight".into(), vec![f.len() as u64], None));
    }
    let facts = ModelFacts {
        n_layers: spec.num_layers,
        n_head: spec.num_heads,
        n_head_kv: spec.num_kv_heads,
    };
    let names: Vec<(String, Vec<u64>)> = layout.iter().map(|(n, d, _)| (n.clone(), d.clone())).collect();
    let types = quantize::tensor_types(ftype, &facts, &names);
    let specs: Vec<GgufTensorSpec> = layout
        .iter()
        .zip(&types)
        .map(|((n, d, _), &dtype)| GgufTensorSpec {
            name: n.clone(),
            dims: d.clone(),
            dtype,
        })
        .collect();
    write_gguf(path, &metadata, &specs, |i| {
        let (gguf, dims, source) = &layout[i];
        let row_len = dims.first().copied().unwrap_or(1) as usize;
        let Some(source) = *source else {
            let f = rope_factors.as_deref().unwrap_or(&[]);
            return quantize::quantize(types[i], f, row_len).map_err(quantize_err(path, gguf));
        };
        let (hf, shape) = &tensors[source];
        let mut data = fetch(source)?;
        if shape.iter().product::<usize>() != data.len() {
            return Err(ModelError::tensor(
                path,
                hf,
                format!("shape {shape:?} does not match {} values", data.len()),
            ));
        }
        if let Some(heads) = interleaved_heads(spec, hf) {
            rope_half_to_interleaved(&mut data, heads, shape[0]);
        }
        quantize::quantize(types[i], &data, row_len).map_err(quantize_err(path, gguf))
    })?;
    Ok(specs.into_iter().map(|s| (s.name, s.dtype)).collect())
}

/// Writes `adapter` as a llama.cpp LoRA adapter GGUF (`general.type = adapter`, `adapter.type =
/// lora`, tensors `blk.N.<module>.weight.lora_a` / `.lora_b` in F32) for a base with `spec`.
///
/// llama.cpp scales every pair by `adapter.lora.alpha / r` (r from the tensor's shape), one
/// alpha for the whole file. graft writes `alpha = scale · r` of the first pair and folds any
/// other pair's different `scale · r` (rsLoRA, rank or alpha patterns) into its B, so each
/// pair's effective `scale · B A` is exactly the adapter's. q/k B rows of `llama` models are
/// permuted into the interleaved RoPE order, like their base weights.
pub fn save_gguf_lora(
    path: &Path,
    spec: &ModelSpec,
    adapter: &LoraAdapter,
    name: &str,
) -> Result<(), ModelError> {
    refuse_classifier(path, spec)?;
    if adapter.score.is_some() {
        return Err(ModelError::format(
            path,
            "the adapter trains a reward model's score head, which llama.cpp adapters cannot carry",
        ));
    }
    let mut pairs = Vec::new();
    for (layer, l) in adapter.layers.iter().enumerate() {
        for m in LoraModule::ALL {
            if let Some(p) = l.get(m) {
                pairs.push((m.path(layer), m, p));
            }
        }
    }
    let Some((_, _, first)) = pairs.first() else {
        return Err(ModelError::format(path, "the adapter has no LoRA pairs"));
    };
    let alpha = first.scale * first.r as f32;
    let arch = gguf_architecture(spec.architecture);
    let metadata = vec![
        ("general.architecture".to_string(), string(arch)),
        ("general.type".into(), string("adapter")),
        ("general.name".into(), string(name)),
        ("adapter.type".into(), string("lora")),
        ("adapter.lora.alpha".into(), GgufValue::F32(alpha)),
    ];
    let mut specs = Vec::new();
    for (module_path, m, p) in &pairs {
        let (out, inp) = m.dims(spec);
        let base = gguf_name(&format!("{module_path}.weight"))
            .ok_or_else(|| ModelError::tensor(path, module_path, "has no GGUF counterpart"))?;
        specs.push(GgufTensorSpec {
            name: format!("{base}.lora_a"),
            dims: vec![inp as u64, p.r as u64],
            dtype: DType::F32,
        });
        specs.push(GgufTensorSpec {
            name: format!("{base}.lora_b"),
            dims: vec![p.r as u64, out as u64],
            dtype: DType::F32,
        });
    }
    write_gguf(path, &metadata, &specs, |i| {
        let (module_path, _, p) = &pairs[i / 2];
        let values = if i % 2 == 0 {
            p.a.clone()
        } else {
            let fold = p.scale * p.r as f32 / alpha;
            let mut b: Vec<f32> = if fold == 1.0 {
                p.b.clone()
            } else {
                p.b.iter().map(|x| x * fold).collect()
            };
            if let Some(heads) = interleaved_heads(spec, &format!("{module_path}.weight")) {
                let rows = b.len() / p.r.max(1);
                rope_half_to_interleaved(&mut b, heads, rows);
            }
            b
        };
        Ok(values.iter().flat_map(|x| x.to_le_bytes()).collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::{named_shape, random_tensor};
    use crate::weights::{hf_tensor_shapes, load_model};

    /// An f32 export reads back as the same spec and the same weights, for a `llama` model with
    /// Llama 3 RoPE scaling (q/k rows re-interleaved, factors as `rope_freqs.weight`) and for
    /// qwen2 with biases and a tied head.
    #[test]
    fn f32_exports_read_back_as_written() {
        let dir = std::env::temp_dir().join(format!("graft-gguf-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut llama = named_shape("tiny").unwrap();
        llama.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        llama.max_position_embeddings = 512;
        let mut qwen = named_shape("tiny").unwrap();
        qwen.architecture = Architecture::Qwen2;
        qwen.qkv_bias = true;
        qwen.tie_word_embeddings = true;
        for (i, spec) in [llama, qwen].into_iter().enumerate() {
            let list = hf_tensor_shapes(&spec);
            let data: Vec<Vec<f32>> = list.iter().map(|(n, s)| random_tensor(n, s, 7)).collect();
            let path = dir.join(format!("m{i}.gguf"));
            save_gguf_model(
                &path,
                &spec,
                &list,
                |k| Ok(data[k].clone()),
                FileType::F32,
                "t",
                &[],
            )
            .unwrap();
            let back = load_model(&path).unwrap();
            let mut want = spec.clone();
            want.bos_token_id = None;
            want.eos_token_ids.clear();
            assert_eq!(back.spec, want, "{:?}", spec.architecture);
            for ((n, s), d) in list.iter().zip(&data) {
                assert_eq!(&back.weights.f32(n, s).unwrap(), d, "{n}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
