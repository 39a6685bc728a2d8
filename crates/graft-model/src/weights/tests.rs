//! Loader tests against the real files in `shared/data` and synthetic broken files.

use super::*;
use crate::config::Architecture;
use std::path::PathBuf;

/// `shared/data`, or `None` (with a note on stderr) when this checkout has no shared data.
fn shared_data() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipping: {} not found", dir.display());
        None
    }
}

fn stories(data: &Path) -> PathBuf {
    data.join("models/stories260K")
}

/// A fresh scratch directory under the target dir's tmp (removed and recreated).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("graft-weights-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `(name, shape, values)`.
type NamedTensor = (String, Vec<usize>, Vec<f32>);

fn all_f32(store: &WeightStore) -> Vec<NamedTensor> {
    store
        .names()
        .into_iter()
        .map(|n| {
            let shape = store.info(n).unwrap().shape.clone();
            let v = store.f32(n, &shape).unwrap();
            (n.to_string(), shape, v)
        })
        .collect()
}

/// The spec fields every stories260K source must agree on (tying differs: the GGUF carries a
/// copy of the embedding as `output.weight`).
fn assert_same_architecture(a: &ModelSpec, b: &ModelSpec, what: &str) {
    let mut b = b.clone();
    b.tie_word_embeddings = a.tie_word_embeddings;
    assert_eq!(*a, b, "{what}");
}

#[test]
fn stories260k_hf_dir_loads() {
    let Some(data) = shared_data() else { return };
    let m = load_model(&stories(&data).join("hf")).unwrap();
    assert_eq!(m.spec.architecture, Architecture::Llama);
    assert_eq!(
        (m.spec.hidden_size, m.spec.num_layers, m.spec.num_kv_heads),
        (64, 5, 4)
    );
    assert!(m.spec.tie_word_embeddings);
    assert_eq!(m.tokenizer, TokenizerSource::HfDir(stories(&data).join("hf")));
    assert_eq!(m.weights.names().len(), 1 + 5 * 9 + 1);
    let info = m.weights.info("model.layers.0.self_attn.k_proj.weight").unwrap();
    assert_eq!(
        (info.shape.as_slice(), info.dtype),
        (&[32usize, 64][..], DType::F32)
    );
    let bf = m.weights.bf16("model.norm.weight", &[64]).unwrap();
    let f = m.weights.f32("model.norm.weight", &[64]).unwrap();
    for (x, y) in bf.iter().zip(&f) {
        assert_eq!(*x, bf16::from_f32(*y));
    }
}

#[test]
fn stories260k_llama2c_files_equal_hf_exactly() {
    let Some(data) = shared_data() else { return };
    let hf = load_model(&stories(&data).join("hf")).unwrap();
    let reference = all_f32(&hf.weights);
    for file in ["stories260K.bin", "stories260K.v1.bin"] {
        let m = load_model(&stories(&data).join(file)).unwrap();
        assert_eq!(m.spec, hf.spec, "{file}");
        assert_eq!(
            m.tokenizer,
            TokenizerSource::Llama2cFile(stories(&data).join("tok512.bin")),
            "{file}"
        );
        assert_eq!(m.weights.names(), hf.weights.names(), "{file}");
        for (name, shape, want) in &reference {
            let got = m.weights.f32(name, shape).unwrap();
            assert!(got == *want, "{file}: {name} differs from hf/model.safetensors");
        }
    }
}

#[test]
fn stories260k_gguf_f32_equals_hf_exactly() {
    let Some(data) = shared_data() else { return };
    let hf = load_model(&stories(&data).join("hf")).unwrap();
    let m = load_model(&stories(&data).join("stories260K.gguf")).unwrap();
    assert_same_architecture(&hf.spec, &m.spec, "gguf spec");
    assert!(
        !m.spec.tie_word_embeddings,
        "the GGUF has output.weight, so the head is untied"
    );
    for (name, shape, want) in all_f32(&hf.weights) {
        let got = m.weights.f32(&name, &shape).unwrap();
        assert!(got == want, "{name} differs from hf/model.safetensors");
    }
    let emb = hf.weights.f32("model.embed_tokens.weight", &[512, 64]).unwrap();
    assert_eq!(m.weights.f32("lm_head.weight", &[512, 64]).unwrap(), emb);
    match &m.tokenizer {
        TokenizerSource::Gguf {
            pieces,
            scores,
            token_types,
            bos,
            eos,
            model,
            ..
        } => {
            assert_eq!((pieces.len(), scores.len(), token_types.len()), (512, 512, 512));
            assert_eq!(
                (pieces[1].as_str(), *bos, *eos, model.as_str()),
                ("<s>", Some(1), Some(2), "llama")
            );
            assert_eq!(token_types[3], 6, "byte piece");
        }
        other => panic!("expected the embedded vocabulary, got {other:?}"),
    }
}

#[test]
fn stories260k_gguf_q8_0_within_quantization_error() {
    let Some(data) = shared_data() else { return };
    let hf = load_model(&stories(&data).join("hf")).unwrap();
    let path = stories(&data).join("stories260K-Q8_0.gguf");
    let m = load_model(&path).unwrap();
    assert_same_architecture(&hf.spec, &m.spec, "q8_0 spec");
    let mut seen = HashMap::new();
    for (name, shape, want) in all_f32(&hf.weights) {
        let info = m.weights.info(&name).unwrap().clone();
        *seen.entry(info.dtype).or_insert(0) += 1;
        let got = m.weights.f32(&name, &shape).unwrap();
        let row = *shape.last().unwrap();
        match info.dtype {
            DType::F32 => assert!(got == want, "{name}"),
            DType::F16 => {
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= w.abs() * 1e-3 + 1e-7, "{name}: {g} vs {w}");
                }
            }
            DType::Q8_0 => {
                // Each 32-value block: scale d = max|w| / 127 (stored as f16), error ≤ d/2 plus the
                // f16 rounding of d times |q| ≤ 127.
                assert_eq!(row % 32, 0);
                for (gb, wb) in got.chunks(32).zip(want.chunks(32)) {
                    let d = wb.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                    for (g, w) in gb.iter().zip(wb) {
                        assert!(
                            (g - w).abs() <= 0.5 * d + 127.0 * d * 1e-3 + 1e-7,
                            "{name}: {g} vs {w} (d {d})"
                        );
                    }
                }
            }
            other => panic!("{name}: unexpected {other}"),
        }
    }
    assert_eq!(
        seen.get(&DType::F16),
        Some(&5),
        "the five ffn_down tensors are F16: {seen:?}"
    );
    assert!(seen.get(&DType::Q8_0).is_some_and(|&n| n >= 30), "{seen:?}");
    // bf16 of a Q8_0 tensor goes through f32 and the RoPE permutation like f32 does.
    let q = m
        .weights
        .f32("model.layers.1.self_attn.q_proj.weight", &[64, 64])
        .unwrap();
    let qb = m
        .weights
        .bf16("model.layers.1.self_attn.q_proj.weight", &[64, 64])
        .unwrap();
    assert!(q.iter().zip(&qb).all(|(a, b)| bf16::from_f32(*a) == *b));
}

#[test]
fn llama2_tiny_random_gguf_loads() {
    let Some(data) = shared_data() else { return };
    let m = load_model(&data.join("models/llama-2-tiny-random/llama-2-tiny-random.gguf")).unwrap();
    assert_eq!(m.spec.architecture, Architecture::Llama);
    assert_eq!(m.spec.vocab_size, 32000);
    let types: std::collections::HashSet<DType> = m
        .weights
        .names()
        .iter()
        .map(|n| m.weights.info(n).unwrap().dtype)
        .collect();
    assert!(
        types.contains(&DType::F16) && types.contains(&DType::F32),
        "{types:?}"
    );
    for name in m.weights.names() {
        let shape = m.weights.info(name).unwrap().shape.clone();
        assert!(
            m.weights.f32(name, &shape).unwrap().iter().all(|x| x.is_finite()),
            "{name}"
        );
    }
    match &m.tokenizer {
        TokenizerSource::Gguf { pieces, .. } => assert_eq!(pieces.len(), 32000),
        other => panic!("{other:?}"),
    }
}

#[test]
fn hf_config_files_parse() {
    let Some(data) = shared_data() else { return };
    let dir = data.join("configs/hf");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let spec = ModelSpec::from_config_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            hf_tensor_shapes(&spec).len() > spec.num_layers * 9,
            "{}",
            path.display()
        );
        n += 1;
    }
    assert_eq!(n, 3);
}

// ---- error paths ----

fn copy_truncated(src: &Path, dst: &Path, len: usize) {
    let bytes = std::fs::read(src).unwrap();
    std::fs::write(dst, &bytes[..len.min(bytes.len())]).unwrap();
}

#[test]
fn truncated_files_are_errors_not_panics() {
    let Some(data) = shared_data() else { return };
    let dir = scratch("truncated");
    for (file, out) in [
        ("stories260K.bin", "t.bin"),
        ("stories260K.v1.bin", "t1.bin"),
        ("stories260K.gguf", "t.gguf"),
        ("stories260K-Q8_0.gguf", "tq.gguf"),
    ] {
        let src = stories(&data).join(file);
        let full = std::fs::metadata(&src).unwrap().len() as usize;
        // (Cuts of more than the 32-byte tail padding a GGUF may end with.)
        for len in [0, 3, 20, 27, 100, 255, 300, 5000, full / 2, full - 40] {
            let dst = dir.join(out);
            copy_truncated(&src, &dst, len);
            let Err(err) = load_model(&dst) else {
                panic!("{file} cut to {len} bytes must not load")
            };
            let text = err.to_string();
            assert!(
                text.contains(out),
                "{file}@{len}: error should name the file: {text}"
            );
        }
    }
    // A tensor cut short names the tensor.
    let src = stories(&data).join("stories260K.gguf");
    let full = std::fs::metadata(&src).unwrap().len() as usize;
    copy_truncated(&src, &dir.join("t.gguf"), full - 100);
    let text = load_model(&dir.join("t.gguf")).unwrap_err().to_string();
    assert!(text.contains("tensor `") && text.contains("truncated"), "{text}");
    let src = stories(&data).join("stories260K.v1.bin");
    copy_truncated(&src, &dir.join("t1.bin"), 256 + 4 * 2000);
    let text = load_model(&dir.join("t1.bin")).unwrap_err().to_string();
    assert!(
        text.contains("model.embed_tokens.weight") && text.contains("truncated"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes an HF directory for a tiny llama with the given tensors.
fn tiny_spec() -> ModelSpec {
    ModelSpec::from_config_json(&serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 12,
        "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2, "vocab_size": 16,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
    }))
    .unwrap()
}

fn tiny_tensors(spec: &ModelSpec) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    hf_tensor_shapes(spec)
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let v = (0..n).map(|i| (k * 1000 + i) as f32 * 0.001).collect();
            (name, shape, v)
        })
        .collect()
}

fn as_refs(t: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<(String, Vec<usize>, &[f32])> {
    t.iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.as_slice()))
        .collect()
}

#[test]
fn hf_dir_round_trip_and_missing_or_misshapen_tensor() {
    let spec = tiny_spec();
    let tensors = tiny_tensors(&spec);
    let dir = scratch("roundtrip");
    save_hf_model_dir(&dir, &spec, &as_refs(&tensors)).unwrap();
    assert!(!dir.join("model.safetensors.tmp").exists());
    let m = load_model(&dir).unwrap();
    assert_eq!(m.spec, spec);
    assert_eq!(m.tokenizer, TokenizerSource::Missing);
    for (name, shape, v) in &tensors {
        assert_eq!(&m.weights.f32(name, shape).unwrap(), v, "{name}");
    }
    // Wrong expected shape: names the tensor, the file and both shapes.
    let e = m.weights.f32("model.norm.weight", &[9]).unwrap_err().to_string();
    assert!(
        e.contains("model.norm.weight") && e.contains("model.safetensors") && e.contains("[9]"),
        "{e}"
    );
    let e = m
        .weights
        .f32("model.layers.7.mlp.up_proj.weight", &[12, 8])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.7.mlp.up_proj.weight") && e.contains("not found"),
        "{e}"
    );

    // A file missing a tensor the config needs fails at load, naming it.
    let without: Vec<_> = tensors
        .iter()
        .filter(|t| t.0 != "model.layers.1.mlp.down_proj.weight")
        .cloned()
        .collect();
    save_hf_model_dir(&dir, &spec, &as_refs(&without)).unwrap();
    let e = load_model(&dir).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("not found"),
        "{e}"
    );

    // A misshapen tensor fails at load, naming it and the shapes.
    let mut bad = tensors.clone();
    let i = bad
        .iter()
        .position(|t| t.0 == "model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    bad[i].1 = vec![8, 4];
    save_hf_model_dir(&dir, &spec, &as_refs(&bad)).unwrap();
    let e = load_model(&dir).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight") && e.contains("[4, 8]"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bf16_safetensors_round_trip() {
    let dir = scratch("bf16");
    let v: Vec<f32> = (0..12).map(|i| i as f32 / 7.0).collect();
    let path = dir.join("x.safetensors");
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors_bf16(&path, &[("x".into(), vec![3, 4], &v)], Some(meta)).unwrap();
    let store = open_safetensors(&path).unwrap();
    assert_eq!(store.info("x").unwrap().dtype, DType::BF16);
    let got = store.bf16("x", &[3, 4]).unwrap();
    assert_eq!(got, v.iter().map(|x| bf16::from_f32(*x)).collect::<Vec<_>>());
    let got = store.f32("x", &[3, 4]).unwrap();
    assert!(got.iter().zip(&v).all(|(a, b)| (a - b).abs() <= b.abs() / 128.0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sharded_safetensors_load() {
    let spec = tiny_spec();
    let tensors = tiny_tensors(&spec);
    let dir = scratch("sharded");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&spec.to_config_json()).unwrap(),
    )
    .unwrap();
    let half = tensors.len() / 2;
    let shards = [
        ("model-00001-of-00002.safetensors", &tensors[..half]),
        ("model-00002-of-00002.safetensors", &tensors[half..]),
    ];
    let mut weight_map = serde_json::Map::new();
    for (file, part) in shards {
        save_safetensors(&dir.join(file), &as_refs(part), None).unwrap();
        for (name, _, _) in part {
            weight_map.insert(name.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let m = load_model(&dir).unwrap();
    for (name, shape, v) in &tensors {
        assert_eq!(&m.weights.f32(name, shape).unwrap(), v, "{name}");
    }
    assert!(
        m.weights
            .file_of("model.norm.weight")
            .unwrap()
            .ends_with("model-00002-of-00002.safetensors")
    );

    // An index entry whose shard lacks the tensor is named.
    weight_map.insert(
        "model.extra.weight".into(),
        "model-00001-of-00002.safetensors".into(),
    );
    let index = serde_json::json!({"weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = load_model(&dir).unwrap_err().to_string();
    assert!(e.contains("model.extra.weight"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- synthetic GGUF files ----

/// A minimal GGUF writer for tests.
struct GgufBuilder {
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn gguf_str(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

impl GgufBuilder {
    fn new(arch: &str) -> GgufBuilder {
        let mut b = GgufBuilder {
            kv: vec![],
            tensors: vec![],
        };
        b.kv_str("general.architecture", arch);
        b
    }
    fn kv_str(&mut self, k: &str, v: &str) {
        self.kv.push((k.into(), 8, gguf_str(v)));
    }
    fn kv_u32(&mut self, k: &str, v: u32) {
        self.kv.push((k.into(), 4, v.to_le_bytes().to_vec()));
    }
    fn kv_f32(&mut self, k: &str, v: f32) {
        self.kv.push((k.into(), 6, v.to_le_bytes().to_vec()));
    }
    fn tensor_f32(&mut self, name: &str, hf_shape: &[usize], values: &[f32]) {
        let dims = hf_shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((
            name.into(),
            dims,
            0,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    fn build(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            b.extend_from_slice(&gguf_str(k));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            b.extend_from_slice(&gguf_str(name));
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        for (_, _, _, data) in &self.tensors {
            b.extend_from_slice(data);
            while !b.len().is_multiple_of(32) {
                b.push(0);
            }
        }
        b
    }
}

/// A complete tiny qwen2 GGUF (hidden 8, 2 heads of 4, 1 kv head, 1 layer, vocab 16).
fn tiny_qwen2_gguf() -> (GgufBuilder, Vec<NamedTensor>) {
    qwen2_gguf(8, 12)
}

/// A complete qwen2 GGUF of hidden size `h` (2 heads of `h / 2`, 1 kv head), MLP size `ffn`,
/// 1 layer, vocab 16; f32 tensors `k * 100 + i` for the `k`-th tensor.
fn qwen2_gguf(h: usize, ffn: usize) -> (GgufBuilder, Vec<NamedTensor>) {
    let mut g = GgufBuilder::new("qwen2");
    g.kv_u32("qwen2.embedding_length", h as u32);
    g.kv_u32("qwen2.feed_forward_length", ffn as u32);
    g.kv_u32("qwen2.block_count", 1);
    g.kv_u32("qwen2.attention.head_count", 2);
    g.kv_u32("qwen2.attention.head_count_kv", 1);
    g.kv_u32("qwen2.context_length", 64);
    g.kv_f32("qwen2.attention.layer_norm_rms_epsilon", 1e-6);
    g.kv_f32("qwen2.rope.freq_base", 1e6);
    let kv = h / 2;
    let names = [
        ("token_embd.weight", "model.embed_tokens.weight", vec![16, h]),
        ("output_norm.weight", "model.norm.weight", vec![h]),
        (
            "blk.0.attn_norm.weight",
            "model.layers.0.input_layernorm.weight",
            vec![h],
        ),
        (
            "blk.0.ffn_norm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            vec![h],
        ),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
            vec![h, h],
        ),
        (
            "blk.0.attn_q.bias",
            "model.layers.0.self_attn.q_proj.bias",
            vec![h],
        ),
        (
            "blk.0.attn_k.weight",
            "model.layers.0.self_attn.k_proj.weight",
            vec![kv, h],
        ),
        (
            "blk.0.attn_k.bias",
            "model.layers.0.self_attn.k_proj.bias",
            vec![kv],
        ),
        (
            "blk.0.attn_v.weight",
            "model.layers.0.self_attn.v_proj.weight",
            vec![kv, h],
        ),
        (
            "blk.0.attn_v.bias",
            "model.layers.0.self_attn.v_proj.bias",
            vec![kv],
        ),
        (
            "blk.0.attn_output.weight",
            "model.layers.0.self_attn.o_proj.weight",
            vec![h, h],
        ),
        (
            "blk.0.ffn_gate.weight",
            "model.layers.0.mlp.gate_proj.weight",
            vec![ffn, h],
        ),
        (
            "blk.0.ffn_up.weight",
            "model.layers.0.mlp.up_proj.weight",
            vec![ffn, h],
        ),
        (
            "blk.0.ffn_down.weight",
            "model.layers.0.mlp.down_proj.weight",
            vec![h, ffn],
        ),
    ];
    let mut hf = vec![];
    for (k, (gname, hname, shape)) in names.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (k * 100 + i) as f32).collect();
        g.tensor_f32(gname, &shape, &v);
        hf.push((hname.to_string(), shape, v));
    }
    (g, hf)
}

#[test]
fn synthetic_qwen2_gguf_is_not_permuted() {
    let dir = scratch("qwen2gguf");
    let (g, hf) = tiny_qwen2_gguf();
    let path = dir.join("m.gguf");
    std::fs::write(&path, g.build()).unwrap();
    let m = load_model(&path).unwrap();
    assert_eq!(m.spec.architecture, Architecture::Qwen2);
    assert!(m.spec.qkv_bias && m.spec.tie_word_embeddings && !m.spec.qk_norm);
    assert_eq!(
        (m.spec.rope_theta, m.spec.head_dim, m.spec.vocab_size),
        (1e6, 4, 16)
    );
    assert_eq!(m.tokenizer, TokenizerSource::Missing);
    for (name, shape, v) in &hf {
        assert_eq!(&m.weights.f32(name, shape).unwrap(), v, "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gguf_errors_name_the_tensor_or_field() {
    let dir = scratch("gguferr");
    let path = dir.join("m.gguf");

    // Unsupported architecture.
    let (mut g, _) = tiny_qwen2_gguf();
    g.kv[0] = ("general.architecture".into(), 8, gguf_str("phi3"));
    std::fs::write(&path, g.build()).unwrap();
    let e = load_model(&path).unwrap_err().to_string();
    assert!(e.contains("general.architecture") && e.contains("phi3"), "{e}");

    // Unsupported tensor types: `gguf_unsupported_or_misaligned_quant_types_are_named`.

    // A missing tensor.
    let (mut g, _) = tiny_qwen2_gguf();
    g.tensors.retain(|t| t.0 != "blk.0.attn_v.bias");
    std::fs::write(&path, g.build()).unwrap();
    let e = load_model(&path).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.self_attn.v_proj.bias") && e.contains("not found"),
        "{e}"
    );

    // A misshapen tensor.
    let (mut g, _) = tiny_qwen2_gguf();
    let t = g
        .tensors
        .iter_mut()
        .find(|t| t.0 == "blk.0.ffn_down.weight")
        .unwrap();
    t.1 = vec![8, 12];
    std::fs::write(&path, g.build()).unwrap();
    let e = load_model(&path).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.mlp.down_proj.weight") && e.contains("[8, 12]"),
        "{e}"
    );

    // An absurd layer count fails fast on the first missing layer.
    let (mut g, _) = tiny_qwen2_gguf();
    let kv = g.kv.iter_mut().find(|kv| kv.0 == "qwen2.block_count").unwrap();
    kv.2 = u32::MAX.to_le_bytes().to_vec();
    std::fs::write(&path, g.build()).unwrap();
    let e = load_model(&path).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.1.input_layernorm.weight") && e.contains("not found"),
        "{e}"
    );

    // A missing hyperparameter.
    let (mut g, _) = tiny_qwen2_gguf();
    g.kv.retain(|kv| kv.0 != "qwen2.block_count");
    std::fs::write(&path, g.build()).unwrap();
    let e = load_model(&path).unwrap_err().to_string();
    assert!(e.contains("qwen2.block_count") && e.contains("missing"), "{e}");

    // A hostile array length does not allocate or panic.
    let mut g = GgufBuilder::new("llama");
    let mut arr = 8u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&u64::MAX.to_le_bytes());
    g.kv.push(("tokenizer.ggml.tokens".into(), 9, arr));
    std::fs::write(&path, g.build()).unwrap();
    let e = load_model(&path).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.ggml.tokens") && e.contains("corrupt"),
        "{e}"
    );

    // Not a GGUF at all.
    std::fs::write(&path, b"GGML\x03\0\0\0 and more bytes here").unwrap();
    let e = load_model(&path).unwrap_err().to_string();
    assert!(e.contains("not a GGUF file"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn llama2c_bad_header_is_named() {
    let dir = scratch("l2cerr");
    let path = dir.join("m.bin");
    let mut h: Vec<u8> = [64i32, 172, 5, 8, 3, 512, 512]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    h.extend_from_slice(&[0u8; 64]);
    std::fs::write(&path, &h).unwrap();
    let e = load_model(&path).unwrap_err().to_string();
    assert!(e.contains("n_kv_heads"), "{e}");
    let mut h: Vec<u8> = [64i32, -172, 5, 8, 4, 512, 512]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    h.extend_from_slice(&[0u8; 64]);
    std::fs::write(&path, &h).unwrap();
    let e = load_model(&path).unwrap_err().to_string();
    assert!(e.contains("hidden_dim"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn legacy_negative_vocab_means_separate_classifier() {
    let Some(data) = shared_data() else { return };
    let src = std::fs::read(stories(&data).join("stories260K.bin")).unwrap();
    let mut bytes = src.clone();
    bytes[20..24].copy_from_slice(&(-512i32).to_le_bytes());
    let wcls: Vec<f32> = (0..512 * 64).map(|i| i as f32 * 1e-4).collect();
    bytes.extend(wcls.iter().flat_map(|v| v.to_le_bytes()));
    let dir = scratch("wcls");
    let path = dir.join("untied.bin");
    std::fs::write(&path, &bytes).unwrap();
    let m = load_model(&path).unwrap();
    assert!(!m.spec.tie_word_embeddings);
    assert_eq!(m.tokenizer, TokenizerSource::Missing);
    assert_eq!(m.weights.f32("lm_head.weight", &[512, 64]).unwrap(), wcls);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rope_permutation_matches_the_readme_formula() {
    // 2 heads of width 4, 1 column: interleaved row h*4 + 2i + j → HF row h*4 + j*2 + i.
    let mut rows: Vec<u32> = (0..8).collect();
    rope_interleaved_to_half(&mut rows, 2, 8);
    assert_eq!(rows, vec![0, 2, 1, 3, 4, 6, 5, 7]);
}

/// Random byte corruption of the headers of every format: loading (and reading every tensor of
/// what still loads) must return, never panic.
#[test]
fn corrupted_headers_never_panic() {
    let Some(data) = shared_data() else { return };
    let dir = scratch("fuzz");
    let gguf = stories(&data).join("stories260K-Q8_0.gguf");
    let header_end = read_gguf(&gguf).unwrap().data_offset as usize;
    let cases = [
        (gguf, "f.gguf", header_end),
        (stories(&data).join("stories260K.bin"), "f.bin", 28),
        (stories(&data).join("stories260K.v1.bin"), "f1.bin", 64),
        (
            stories(&data).join("hf/model.safetensors"),
            "model.safetensors",
            4096,
        ),
    ];
    std::fs::copy(stories(&data).join("hf/config.json"), dir.join("config.json")).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (src, name, span) in cases {
        let original = std::fs::read(&src).unwrap();
        for _ in 0..60 {
            let mut bytes = original.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % span;
                bytes[at] = match next() % 3 {
                    0 => 0xff,
                    1 => 0,
                    _ => next() as u8,
                };
            }
            let path = dir.join(name);
            std::fs::write(&path, &bytes).unwrap();
            let target = if name.ends_with(".safetensors") {
                dir.clone()
            } else {
                path
            };
            if let Ok(m) = load_model(&target) {
                for n in m.weights.names() {
                    let shape = m.weights.info(n).unwrap().shape.clone();
                    let _ = m.weights.f32(n, &shape);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Tensors large enough for the parallel conversion path give the same values as the serial one.
#[test]
fn large_tensors_convert_in_parallel_identically() {
    let n = 5 * (1 << 16) + 96; // not a multiple of the chunk
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 10007) as f32 / 997.0 - 5.0)
        .collect();
    let store = WeightStore::from_f32_tensors(
        Path::new("mem"),
        vec![("x".into(), vec![n / 32, 32], values.clone())],
    )
    .unwrap();
    assert_eq!(store.f32("x", &[n / 32, 32]).unwrap(), values);

    let dir = scratch("parallel");
    let path = dir.join("x.safetensors");
    save_safetensors_bf16(&path, &[("x".into(), vec![n], &values)], None).unwrap();
    let store = open_safetensors(&path).unwrap();
    let want: Vec<f32> = values.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
    assert_eq!(store.f32("x", &[n]).unwrap(), want);
    let _ = std::fs::remove_dir_all(&dir);

    // Q8_0: block k has scale (k % 5 + 1) / 64 and quants (j - 16) * (k % 3 + 1) clamped.
    let blocks = n / 32;
    let mut bytes = Vec::with_capacity(blocks * 34);
    let mut want = Vec::with_capacity(n);
    for k in 0..blocks {
        let d = f16::from_f32((k % 5 + 1) as f32 / 64.0);
        bytes.extend_from_slice(&d.to_le_bytes());
        for j in 0..32i32 {
            let q = ((j - 16) * (k as i32 % 3 + 1)).clamp(-127, 127) as i8;
            bytes.push(q as u8);
            want.push(d.to_f32() * q as f32);
        }
    }
    let mut store = WeightStore::new(Path::new("mem"));
    let len = bytes.len();
    let source = store.add_source(Path::new("mem"), Backing::Owned(bytes));
    let info = TensorInfo {
        name: "q".into(),
        shape: vec![blocks, 32],
        dtype: DType::Q8_0,
    };
    store
        .insert(
            Entry {
                info,
                source,
                offset: 0,
                len,
                rope_heads: None,
            },
            Path::new("mem"),
        )
        .unwrap();
    assert_eq!(store.f32("q", &[blocks, 32]).unwrap(), want);

    // Every quantized type, rows of 512 values (two K-quant super-blocks): the chunked parallel
    // conversion equals one serial pass. Random bytes, so compare bits (NaNs included).
    let rows = 5 * (1 << 16) / 512 + 3;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for dtype in DType::ALL.into_iter().filter(|d| d.block_size() > 1) {
        let len = dtype.storage_bytes(rows * 512).unwrap();
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        let mut serial = vec![0f32; rows * 512];
        convert_chunk_f32(dtype, &bytes, &mut serial);
        let mut store = WeightStore::new(Path::new("mem"));
        let source = store.add_source(Path::new("mem"), Backing::Owned(bytes));
        let info = TensorInfo {
            name: "q".into(),
            shape: vec![rows, 512],
            dtype,
        };
        let entry = Entry {
            info,
            source,
            offset: 0,
            len,
            rope_heads: None,
        };
        store.insert(entry, Path::new("mem")).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&store.f32("q", &[rows, 512]).unwrap()),
            bits(&serial),
            "{dtype}"
        );
    }
}

/// The cases of `tests/fixtures/gguf_quants/cases.json`: (ggml type id, type, block bytes, values).
fn gguf_quant_cases() -> Vec<(u32, DType, Vec<u8>, Vec<f32>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf_quants/cases.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = v["cases"].as_array().unwrap().iter().map(|case| {
        let ty = case["type"].as_str().unwrap();
        let dtype = *DType::ALL.iter().find(|d| d.name() == ty).unwrap();
        let hex = case["bytes_hex"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let values: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        (case["ggml_type"].as_u64().unwrap() as u32, dtype, bytes, values)
    });
    cases.collect()
}

/// `tests/fixtures/gguf_quants/cases.json` (`scripts/gen_gguf_quant_fixture.py`): blocks of every
/// quantized type graft reads (quantized by llama.cpp's gguf-py where it can, random bytes with
/// sane f16 scales where it cannot) and the values gguf-py's `dequantize` gives; graft's must be
/// bit-identical.
#[test]
fn quant_blocks_dequantize_as_gguf_py_does() {
    let mut covered = Vec::new();
    for (ggml_type, dtype, bytes, want) in gguf_quant_cases() {
        assert_eq!(gguf::dtype_of(ggml_type), Some(dtype));
        assert_eq!(dtype.storage_bytes(want.len()), Some(bytes.len()), "{dtype}");
        assert!(
            want.len() >= 2 * dtype.block_size(),
            "{dtype}: fewer than 2 blocks"
        );
        let mut got = vec![0f32; want.len()];
        convert_chunk_f32(dtype, &bytes, &mut got);
        assert_eq!(got, want, "{dtype}");
        // Also the sign of zeros.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{dtype}");
        covered.push(dtype);
    }
    for dtype in DType::ALL.into_iter().filter(|d| d.block_size() > 1) {
        assert!(covered.contains(&dtype), "no fixture case for {dtype}");
    }
}

/// A GGUF file with K-quant and IQ4_XS tensors (the fixture's two super-blocks as a `[2, 256]` MLP
/// weight) loads; those tensors read back as gguf-py dequantizes them, the others unchanged.
#[test]
fn gguf_with_k_quant_tensors_loads() {
    let dir = scratch("ggufkquant");
    let path = dir.join("m.gguf");
    let cases = gguf_quant_cases();
    let (mut g, mut hf) = qwen2_gguf(256, 2);
    for (gguf_name, hf_name, ty) in [
        (
            "blk.0.ffn_gate.weight",
            "model.layers.0.mlp.gate_proj.weight",
            DType::Q4_K,
        ),
        (
            "blk.0.ffn_up.weight",
            "model.layers.0.mlp.up_proj.weight",
            DType::IQ4_XS,
        ),
    ] {
        let (ggml_type, _, bytes, values) = cases.iter().find(|c| c.1 == ty).unwrap();
        let t = g.tensors.iter_mut().find(|t| t.0 == gguf_name).unwrap();
        (t.2, t.3) = (*ggml_type, bytes.clone());
        hf.iter_mut().find(|t| t.0 == hf_name).unwrap().2 = values.clone();
    }
    std::fs::write(&path, g.build()).unwrap();
    let m = load_model(&path).unwrap();
    assert_eq!(
        m.weights.info("model.layers.0.mlp.up_proj.weight").unwrap().dtype,
        DType::IQ4_XS
    );
    for (name, shape, v) in &hf {
        assert_eq!(&m.weights.f32(name, shape).unwrap(), v, "{name}");
    }
    // bf16 goes through the f32 values.
    let gate = "model.layers.0.mlp.gate_proj.weight";
    let want: Vec<bf16> = hf
        .iter()
        .find(|t| t.0 == gate)
        .unwrap()
        .2
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    assert_eq!(m.weights.bf16(gate, &[2, 256]).unwrap(), want);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GGUF tensor in a type graft does not read, or whose rows are not whole blocks, fails to load
/// with an error naming the tensor (GGUF and HF names), its type and, for the latter, the block size.
#[test]
fn gguf_unsupported_or_misaligned_quant_types_are_named() {
    let dir = scratch("ggufquanterr");
    let path = dir.join("m.gguf");
    let set_type = |g: &mut GgufBuilder, name: &str, ty: u32| {
        g.tensors.iter_mut().find(|t| t.0 == name).unwrap().2 = ty;
    };

    // IQ2_XXS (16) is a known ggml type graft does not read; the error lists what it does read.
    let (mut g, _) = tiny_qwen2_gguf();
    set_type(&mut g, "blk.0.ffn_up.weight", 16);
    std::fs::write(&path, g.build()).unwrap();
    let e = load_model(&path).unwrap_err().to_string();
    assert!(
        e.contains("blk.0.ffn_up.weight") && e.contains("mlp.up_proj") && e.contains("has type IQ2_XXS"),
        "{e}"
    );
    for dtype in DType::ALL {
        assert!(e.contains(dtype.name()), "{dtype} not listed: {e}");
    }

    // A type id ggml does not have.
    let (mut g, _) = tiny_qwen2_gguf();
    set_type(&mut g, "blk.0.attn_q.weight", 99);
    std::fs::write(&path, g.build()).unwrap();
    let e = load_model(&path).unwrap_err().to_string();
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("unknown type 99"),
        "{e}"
    );

    // Rows of 8 values are not whole blocks of Q4_K (256) or Q5_0 (32).
    for (ty, name, block) in [(12, "Q4_K", "256"), (6, "Q5_0", "32")] {
        let (mut g, _) = tiny_qwen2_gguf();
        set_type(&mut g, "blk.0.ffn_gate.weight", ty);
        std::fs::write(&path, g.build()).unwrap();
        let e = load_model(&path).unwrap_err().to_string();
        assert!(
            e.contains("blk.0.ffn_gate.weight") && e.contains(name) && e.contains(block),
            "{e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// SmolLM2-135M-Instruct as users download it (Q4_1 GGUF, Q8_0 embeddings) loads with its
/// architecture, and its dequantized embedding rows are finite and non-zero.
#[test]
fn smollm2_q4_1_gguf_loads() {
    let Some(data) = shared_data() else { return };
    let path = data.join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let loaded = load_model(&path).unwrap();
    assert_eq!(
        (
            loaded.spec.hidden_size,
            loaded.spec.num_layers,
            loaded.spec.vocab_size
        ),
        (576, 30, 49152)
    );
    let w = loaded
        .weights
        .f32("model.layers.0.mlp.down_proj.weight", &[576, 1536])
        .unwrap();
    assert!(w.iter().all(|x| x.is_finite()) && w.iter().any(|&x| x != 0.0));
}
