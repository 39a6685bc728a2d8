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
use graft_model::model::{Model, WeightStorage};
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
        let path = match case["file"].as_str() {
            Some(f) => fixture_dir().join(f),
            None => {
                let p = tmp.join(format!("{mname}-{tname}.gguf"));
                rebuild(&p, &fx["models"][mname], case);
                p
            }
        };
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
