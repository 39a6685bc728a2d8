//! `weights::quantize` against llama.cpp itself: `tests/fixtures/gguf_quantize/cases.json`, written by
//! `scripts/gen_gguf_quantize_fixture.py` (gguf-py's quantizers and llama.cpp's `llama_model_quantize`).
//!
//! The inputs are regenerated here from the formula in that script's docstring ([`values`]); every
//! type llama.cpp chose must be [`tensor_types`]'s, every tensor's bytes [`quantize`]'s, and
//! quantize → dequantize must stay within the type's error.

mod common;
use common::{dtype, fnv1a64, read_fixture, values};
use graft_model::weights::DType;
use graft_model::weights::quantize::{FileType, ModelFacts, dequantize, quantize, tensor_types};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

fn fixture() -> Option<Value> {
    read_fixture(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf_quantize/cases.json"),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn f32s_from_hex(s: &str) -> Vec<f32> {
    (0..s.len() / 8)
        .map(|i| f32::from_bits(u32::from_str_radix(&s[8 * i..8 * i + 8], 16).unwrap()))
        .collect()
}

/// Largest |error| allowed for a quantized value, as a fraction of the tensor's largest |value|
/// (F16/BF16: of the value itself).
fn tolerance(t: DType) -> f32 {
    match t {
        DType::F32 => 0.0,
        DType::F16 => 1.0 / 2048.0,
        DType::BF16 => 1.0 / 256.0,
        DType::Q8_0 => 0.01,
        DType::Q6_K => 0.03,
        DType::Q5_0 | DType::Q5_1 | DType::Q5_K => 0.07,
        DType::Q4_0 | DType::Q4_1 | DType::Q4_K => 0.15,
        DType::Q3_K => 0.25,
        _ => 0.4,
    }
}

#[test]
fn legacy_types_match_gguf_py() {
    let Some(fx) = fixture() else { return };
    let lg = &fx["legacy"];
    let x = f32s_from_hex(lg["input_f32_hex"].as_str().unwrap());
    let extra = f32s_from_hex(lg["float_extra_f32_hex"].as_str().unwrap());
    let nan = f32s_from_hex(lg["bf16_nan_f32_hex"].as_str().unwrap());
    let row = lg["row_len"].as_u64().unwrap() as usize;
    let outputs = lg["outputs"].as_object().unwrap();
    assert_eq!(outputs.len(), 7);
    for (name, want) in outputs {
        let t = dtype(name);
        let (input, row) = match t {
            DType::F16 => ([x.clone(), extra.clone()].concat(), x.len() + extra.len()),
            DType::BF16 => (
                [x.clone(), extra.clone(), nan.clone()].concat(),
                x.len() + extra.len() + nan.len(),
            ),
            _ => (x.clone(), row),
        };
        let got = quantize(t, &input, row).unwrap();
        assert_eq!(hex(&got), want.as_str().unwrap(), "{name}");
    }
}

#[test]
fn type_mix_matches_llama_cpp() {
    let Some(fx) = fixture() else { return };
    for (mname, m) in fx["models"].as_object().unwrap() {
        let f = &m["facts"];
        let facts = ModelFacts {
            n_layers: f["n_layers"].as_u64().unwrap() as usize,
            n_head: f["n_head"].as_u64().unwrap() as usize,
            n_head_kv: f["n_head_kv"].as_u64().unwrap() as usize,
        };
        let tensors: Vec<(String, Vec<u64>)> = m["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let dims = t[1]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .collect();
                (t[0].as_str().unwrap().to_string(), dims)
            })
            .collect();
        let file_types = m["file_types"].as_object().unwrap();
        assert_eq!(file_types.len(), FileType::ALL.len());
        for (fname, rec) in file_types {
            let ft = FileType::parse(fname).unwrap();
            assert_eq!(
                ft.general_file_type() as u64,
                rec["general.file_type"].as_u64().unwrap(),
                "{fname}"
            );
            let got = tensor_types(ft, &facts, &tensors);
            let want: Vec<&str> = rec["types"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect();
            assert_eq!(want.len(), tensors.len());
            let bad: Vec<String> = tensors
                .iter()
                .zip(got.iter().zip(&want))
                .filter(|(_, (g, w))| g.name() != **w)
                .map(|((n, _), (g, w))| format!("{n}: {g}, llama.cpp {w}"))
                .collect();
            assert!(bad.is_empty(), "model {mname} {fname}:\n{}", bad.join("\n"));
        }
    }
}

#[test]
fn tensor_bytes_match_llama_cpp() {
    let Some(fx) = fixture() else { return };
    let mut checked: BTreeMap<String, usize> = BTreeMap::new();
    let mut bad = Vec::new();
    for (mname, m) in fx["models"].as_object().unwrap() {
        let dims: HashMap<&str, Vec<usize>> = m["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let d = t[1]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                (t[0].as_str().unwrap(), d)
            })
            .collect();
        let mut inputs: HashMap<&str, Vec<f32>> = HashMap::new();
        for (key, rec) in m["tensor_bytes"].as_object().unwrap() {
            let (name, tname) = key.split_once(' ').unwrap();
            let t = dtype(tname);
            let d = &dims[name];
            let (row, n) = (d[0], d.iter().product::<usize>());
            let x = inputs.entry(name).or_insert_with(|| values(name, n, row));
            let got = quantize(t, x, row).unwrap_or_else(|e| panic!("{mname} {key}: {e}"));
            let want_fnv = rec[0].as_str().unwrap();
            let want_first = rec[1].as_str().unwrap();
            let first = &got[..want_first.len() / 2];
            if format!("{:016x}", fnv1a64(&got)) != want_fnv || hex(first) != want_first {
                bad.push(format!(
                    "{mname} {key}: first block\n  graft     {}\n  llama.cpp {want_first}",
                    hex(first)
                ));
            }
            *checked.entry(tname.to_string()).or_default() += 1;

            let back = dequantize(t, &got, n).unwrap();
            let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let tol = tolerance(t);
            let relative = matches!(t, DType::F16 | DType::BF16);
            for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                // F16: relative, plus half the smallest subnormal (2^-25) for values below its normal range.
                let limit = if relative {
                    tol * a.abs() + (2.0f32).powi(-25)
                } else {
                    tol * amax
                };
                assert!((a - b).abs() <= limit, "{mname} {key}: value {i}: {a} -> {b}");
            }
        }
    }
    eprintln!("checked tensors per type: {checked:?}");
    assert!(
        bad.is_empty(),
        "{} tensors differ from llama.cpp:\n{}",
        bad.len(),
        bad.join("\n")
    );
    for t in [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    ] {
        assert!(checked.contains_key(t), "fixture has no {t} tensor");
    }
}
