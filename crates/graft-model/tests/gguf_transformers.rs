//! graft reads GGUF models as Hugging Face transformers does: `tests/fixtures/gguf_transformers/`,
//! written by `scripts/gen_gguf_transformers_fixture.py`, holds transformers' logits
//! (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=…)`, dequantized by gguf-py) on tiny
//! random `llama`, `qwen2` and `qwen3` GGUFs, one per tensor type graft reads, quantized by
//! llama.cpp's `llama_model_quantize`.
//!
//! Files of the types graft quantizes are rebuilt here byte for byte (the script's formula values
//! through [`quantize`], bit-exact with llama.cpp, and [`write_gguf`]; the whole file's FNV-1a-64
//! must be the script's); IQ4_NL and IQ4_XS files are committed. graft's exact f32 logits must be
//! within 1e-4 of transformers', relative to the largest |logit|.

mod common;
use common::{dtype, fnv1a64, read_fixture};
use graft_kernels::{Cpu, Precision};
use graft_model::model::{Model, WeightStorage, stored_weight_bytes};
use graft_model::train::Batch;
use graft_model::weights::quantize::quantize;
use graft_model::weights::{GgufTensorSpec, GgufValue, load_model, write_gguf};
use serde_json::Value;
use std::path::{Path, PathBuf};

const TOLERANCE: f64 = 1e-4;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf_transformers")
}

fn fixture() -> Option<Value> {
    read_fixture(&fixture_dir().join("cases.json"))
}

/// The script's formula data for tensor `name` (+ 1 for norms).
fn values(name: &str, n: usize, row: usize) -> Vec<f32> {
    let mut v = common::values(name, n, row);
    if name.ends_with("norm.weight") {
        v.iter_mut().for_each(|x| *x += 1.0);
    }
    v
}

/// The case's GGUF, rebuilt from the formula with graft's quantizer and writer.
fn rebuild(path: &Path, model: &Value, case: &Value) {
    let metadata: Vec<(String, GgufValue)> = model["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let key = m[0].as_str().unwrap().to_string();
            let value = match (m[1].as_str().unwrap(), key.as_str()) {
                ("u32", "general.file_type") => GgufValue::U32(case["file_type"].as_u64().unwrap() as u32),
                ("u32", _) => GgufValue::U32(m[2].as_u64().unwrap() as u32),
                ("f32", _) => GgufValue::F32(m[2].as_f64().unwrap() as f32),
                ("str", _) => GgufValue::String(m[2].as_str().unwrap().to_string()),
                (t, _) => panic!("{key}: unexpected type {t}"),
            };
            (key, value)
        })
        .collect();
    let tensors: Vec<GgufTensorSpec> = model["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .zip(case["types"].as_array().unwrap())
        .map(|(t, ty)| GgufTensorSpec {
            name: t[0].as_str().unwrap().to_string(),
            dims: t[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect(),
            dtype: dtype(ty.as_str().unwrap()),
        })
        .collect();
    write_gguf(path, &metadata, &tensors, |i| {
        let t = &tensors[i];
        let row = t.dims[0] as usize;
        let n = t.dims.iter().product::<u64>() as usize;
        Ok(quantize(t.dtype, &values(&t.name, n, row), row).unwrap())
    })
    .unwrap();
}

/// The case's GGUF: the committed file, or one rebuilt into `tmp`.
fn case_file(fx: &Value, case: &Value, tmp: &Path) -> PathBuf {
    let (mname, tname) = (case["model"].as_str().unwrap(), case["type"].as_str().unwrap());
    match case["file"].as_str() {
        Some(f) => fixture_dir().join(f),
        None => {
            let p = tmp.join(format!("{mname}-{tname}.gguf"));
            rebuild(&p, &fx["models"][mname], case);
            p
        }
    }
}

#[test]
fn logits_match_transformers() {
    let Some(fx) = fixture() else { return };
    let tmp = std::env::temp_dir().join(format!("graft-gguf-transformers-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut report = Vec::new();
    let mut bad = Vec::new();
    for case in fx["cases"].as_array().unwrap() {
        let mname = case["model"].as_str().unwrap();
        let tname = case["type"].as_str().unwrap();
        let label = format!("{mname} {tname}");
        let path = case_file(&fx, case, &tmp);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            format!("{:016x}", fnv1a64(&bytes)),
            case["file_fnv"].as_str().unwrap(),
            "{label}: not the file transformers read ({} bytes, script's {})",
            bytes.len(),
            case["file_bytes"]
        );

        let loaded = load_model(&path).unwrap_or_else(|e| panic!("{label}: {e}"));
        let model = Model::from_weights(Cpu, &loaded.spec, &loaded.weights, WeightStorage::F32)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let ids: Vec<u32> = case["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let n = ids.len();
        let batch = Batch {
            input_ids: ids,
            positions: (0..n as u32).collect(),
            seq_ids: vec![0; n],
            targets: vec![-100; n],
        };
        let got = model.logits(&batch, Precision::Exact);
        let want: Vec<f64> = case["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
            .collect();
        assert_eq!(got.len(), want.len(), "{label}: logits shape");
        let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
        let rel = err / scale;
        report.push(format!("{label:<16} max |a-b| {err:.3e}, relative {rel:.3e}"));
        if rel.is_nan() || rel > TOLERANCE {
            bad.push(label);
        }
        if case["file"].is_null() {
            std::fs::remove_file(&path).unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("{}", report.join("\n"));
    assert!(bad.is_empty(), "beyond {TOLERANCE} relative: {bad:?}");
    assert_eq!(report.len(), 41);
}

/// Max |a − b| relative to the largest |b|.
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-12f64, |m, &w| m.max(w.abs() as f64));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()))
        / scale
}

/// A model whose block-quantized matrices stay in their blocks (`WeightStorage::Bf16` on a
/// quantized GGUF) computes what the dequantized model computes, for every type: logits on the
/// few-row (decode) and GEMM paths, and a LoRA step's loss and gradients (the input gradient
/// through the frozen blocks). The reference holds the same values in f32 (block-quantized
/// matrices dequantized, float matrices rounded to bf16 as `Bf16` storage rounds them): exact
/// precision must match it to 1e-5 of the largest value; fast (bf16) precision stays at the
/// bf16-rounding level a dequantized bf16 copy shows (2e-2 for logits, 5e-3 for the step; both
/// are reported).
#[test]
fn quantized_in_memory_model_matches_the_dequantized_model() {
    use graft_kernels::{Backend, WeightData};
    use graft_model::lora::LoraSpec;
    use graft_model::train::{TrainMode, TrainOptions};
    let Some(fx) = fixture() else { return };
    let tmp = std::env::temp_dir().join(format!("graft-gguf-quant-mem-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut report = Vec::new();
    for case in fx["cases"].as_array().unwrap() {
        let label = format!(
            "{} {}",
            case["model"].as_str().unwrap(),
            case["type"].as_str().unwrap()
        );
        let path = case_file(&fx, case, &tmp);
        let loaded = load_model(&path).unwrap();
        let (spec, w) = (&loaded.spec, &loaded.weights);
        let mut quant = Model::from_weights(Cpu, spec, w, WeightStorage::Bf16).unwrap();
        let quantized = w
            .info("model.layers.0.mlp.up_proj.weight")
            .unwrap()
            .dtype
            .quant_type()
            .is_some();
        let kept = matches!(quant.layers[0].linears[5].w.data, WeightData::Quant(_));
        assert_eq!(kept, quantized, "{label}: up_proj kept in blocks");
        // What the memory planner counts is what the model holds.
        let b = &quant.backend;
        let mut held = b.weight_bytes(&quant.embed) + quant.lm_head.as_ref().map_or(0, |h| b.weight_bytes(h));
        held += 4 * quant.final_norm.len();
        for layer in &quant.layers {
            held += 4 * (layer.attn_norm.len() + layer.mlp_norm.len());
            held +=
                4 * (layer.q_norm.as_ref().map_or(0, Vec::len) + layer.k_norm.as_ref().map_or(0, Vec::len));
            for lin in &layer.linears {
                held += b.weight_bytes(&lin.w) + 4 * lin.bias.as_ref().map_or(0, Vec::len);
            }
        }
        assert_eq!(
            stored_weight_bytes(spec, w, WeightStorage::Bf16),
            held as u64,
            "{label}: planned bytes"
        );
        let mut exact = Model::from_tensor_fn(Cpu, spec, WeightStorage::F32, |name, shape| {
            let mut v = w.f32(name, shape)?;
            let float = w.info(name).unwrap().dtype.quant_type().is_none();
            if shape.len() == 2 && float {
                v.iter_mut().for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
            }
            Ok(v)
        })
        .unwrap();
        let mut bf16 =
            Model::from_tensor_fn(Cpu, spec, WeightStorage::Bf16, |name, shape| w.f32(name, shape)).unwrap();
        let ids: Vec<u32> = case["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        // 7 tokens (the few-row path) and 21 (the GEMM path), with targets for the LoRA step.
        let long: Vec<u32> = ids.iter().cycle().take(21).copied().collect();
        let mut worst = [0.0f64; 6];
        for m in [&mut quant, &mut exact, &mut bf16] {
            m.ensure_positions(32);
        }
        for ids in [&ids, &long] {
            let n = ids.len();
            let batch = Batch {
                input_ids: ids.clone(),
                positions: (0..n as u32).collect(),
                seq_ids: vec![0; n],
                targets: ids[1..].iter().map(|&t| t as i32).chain([-100]).collect(),
            };
            let want = exact.logits(&batch, Precision::Exact);
            worst[0] = worst[0].max(max_rel(&quant.logits(&batch, Precision::Exact), &want));
            worst[1] = worst[1].max(max_rel(&quant.logits(&batch, Precision::Fast), &want));
            worst[2] = worst[2].max(max_rel(&bf16.logits(&batch, Precision::Fast), &want));
            // A LoRA step: same adapter (B non-zero, so A's gradient is too) on both bases.
            let lora = LoraSpec {
                r: 4,
                alpha: 8.0,
                rslora: false,
                dropout: 0.0,
                targets: [true; 7],
            };
            let step = |model: &mut Model<Cpu>, precision: Precision| {
                model.init_lora(&lora, 5);
                for layer in &mut model.layers {
                    for m in layer.lora.iter_mut().flatten() {
                        let out = m.b.rows;
                        let vals: Vec<f32> = (0..out * m.r)
                            .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.01)
                            .collect();
                        m.b = Cpu.weight(&vals, out, m.r, false);
                    }
                }
                let mut grads = model.new_grads(TrainMode::Lora);
                let opts = TrainOptions {
                    precision,
                    ..Default::default()
                };
                let out = model.forward_backward(&batch, &mut grads, 1.0 / n as f32, opts);
                let mut all = vec![out.loss_sum as f32];
                grads.for_each_mut(|_, g| all.extend_from_slice(g));
                model.clear_adapter();
                all
            };
            let want = step(&mut exact, Precision::Exact);
            worst[3] = worst[3].max(max_rel(&step(&mut quant, Precision::Exact), &want));
            worst[4] = worst[4].max(max_rel(&step(&mut quant, Precision::Fast), &want));
            worst[5] = worst[5].max(max_rel(&step(&mut bf16, Precision::Fast), &want));
        }
        report.push(format!(
            "{label:<16} logits: exact {:.1e}, fast {:.1e} (bf16 copy {:.1e}); LoRA step: exact {:.1e}, fast {:.1e} (bf16 copy {:.1e})",
            worst[0], worst[1], worst[2], worst[3], worst[4], worst[5]
        ));
        // Fast logits: the 7-token batch takes the decode products, whose activations are
        // rounded to 8 bits per block of 32 on VNNI CPUs (as llama.cpp's): up to 3.3e-2 on these
        // tiny random models, against 2.2e-2 for the bf16 copy.
        assert!(
            worst[0] < 1e-5 && worst[3] < 1e-5 && worst[1] < 5e-2 && worst[4] < 5e-3,
            "{}",
            report.last().unwrap()
        );
        if case["file"].is_null() {
            std::fs::remove_file(&path).unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("{}", report.join("\n"));
    assert_eq!(report.len(), 41);
}
