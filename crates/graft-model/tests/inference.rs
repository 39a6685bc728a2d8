//! Batched inference: sequences with different adapters (and the base model) in one step give
//! the same logits as each run alone, and prefill + decode through the KV cache equals a full
//! forward pass.

use graft_kernels::{Cpu, Precision};
use graft_model::infer::SeqStep;
use graft_model::model::{Model, WeightStorage};
use graft_model::peft::load_peft_adapter;
use graft_model::train::Batch;
use graft_model::weights::load_model;
use std::path::PathBuf;

fn fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/engine")
        .join(case)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn mixed_adapter_batch_equals_separate_runs() {
    let dir = fixture("llama_tied_gqa");
    let loaded = load_model(&dir).unwrap();
    let model = Model::from_weights(Cpu, &loaded.spec, &loaded.weights, WeightStorage::F32).unwrap();
    let a1 = model.upload_adapter(&load_peft_adapter(&dir.join("lora/adapter"), &model.spec).unwrap());
    let a2 = model.upload_adapter(&load_peft_adapter(&dir.join("lora_qv/adapter"), &model.spec).unwrap());
    let prompts: [&[u32]; 4] = [&[1, 5, 9, 33, 2], &[7, 7, 8], &[100, 3, 4, 5, 6, 7, 8], &[11, 12]];
    let adapters = [None, Some(&a1), Some(&a2), Some(&a1)];
    // Separately.
    let mut alone = Vec::new();
    for (p, a) in prompts.iter().zip(adapters) {
        let mut cache = model.new_cache(16, Precision::Exact);
        let mut out = model.forward_batch(
            &mut [SeqStep {
                cache: &mut cache,
                tokens: p,
                adapter: a,
            }],
            Precision::Exact,
        );
        let l1 = out.remove(0);
        let l2 = model
            .forward_batch(
                &mut [SeqStep {
                    cache: &mut cache,
                    tokens: &[42],
                    adapter: a,
                }],
                Precision::Exact,
            )
            .remove(0);
        alone.push((l1, l2));
    }
    // Together: one prefill step, then one decode step, all four sequences.
    let mut caches: Vec<_> = (0..4).map(|_| model.new_cache(16, Precision::Exact)).collect();
    let mut steps: Vec<SeqStep<'_, Cpu>> = caches
        .iter_mut()
        .zip(prompts.iter().zip(adapters))
        .map(|(c, (p, a))| SeqStep {
            cache: c,
            tokens: p,
            adapter: a,
        })
        .collect();
    let first = model.forward_batch(&mut steps, Precision::Exact);
    for s in steps.iter_mut() {
        s.tokens = &[42];
    }
    let second = model.forward_batch(&mut steps, Precision::Exact);
    for i in 0..4 {
        assert!(max_diff(&first[i], &alone[i].0) < 1e-5, "prefill row {i}");
        assert!(max_diff(&second[i], &alone[i].1) < 1e-5, "decode row {i}");
    }
    // The adapters really change the output.
    assert!(max_diff(&alone[1].0, &alone[3].0) > 0.0);
}

#[test]
fn kv_cache_decode_equals_full_forward() {
    let dir = fixture("mistral_sliding");
    let loaded = load_model(&dir).unwrap();
    let model = Model::from_weights(Cpu, &loaded.spec, &loaded.weights, WeightStorage::F32).unwrap();
    let tokens: Vec<u32> = (0..14).map(|i| (i * 7 + 3) % 128).collect();
    let n = tokens.len();
    let full = model.logits(
        &Batch {
            input_ids: tokens.clone(),
            positions: (0..n as u32).collect(),
            seq_ids: vec![0; n],
            targets: vec![-100; n],
        },
        Precision::Exact,
    );
    let mut cache = model.new_cache(n, Precision::Exact);
    let v = model.spec.vocab_size;
    let first = model.forward_batch(
        &mut [SeqStep {
            cache: &mut cache,
            tokens: &tokens[..6],
            adapter: None,
        }],
        Precision::Exact,
    );
    assert!(max_diff(&first[0], &full[5 * v..6 * v]) < 1e-5);
    for p in 6..n {
        let out = model.forward_batch(
            &mut [SeqStep {
                cache: &mut cache,
                tokens: &tokens[p..p + 1],
                adapter: None,
            }],
            Precision::Exact,
        );
        assert!(
            max_diff(&out[0], &full[p * v..(p + 1) * v]) < 1e-5,
            "position {p}"
        );
    }
}
