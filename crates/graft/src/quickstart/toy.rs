//! The offline fallback of `graft quickstart`, when no pretrained chat model can be had: graft
//! builds a small Llama-architecture model with a character-level tokenizer and a chat template, writes a
//! synthetic task (reverse a word) as an OpenAI-format chat dataset, measures exact-match
//! accuracy of greedy answers on held-out words, fine-tunes through the normal `graft train`
//! pipeline, and measures again.

use anyhow::{Context, Result};
use graft_kernels::{Cpu, Precision};
use graft_model::model::{Model, WeightStorage};
use graft_model::sample::SamplingParams;
use graft_model::shapes::random_tensor;
use graft_model::{Architecture, ModelSpec, RopeScaling};
use serde_json::json;
use std::path::Path;

use super::QuickstartArgs;

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The task: the prompt for a word and its expected answer.
fn task(word: &str) -> (String, String) {
    (format!("reverse: {word}"), word.chars().rev().collect())
}

/// Deterministic distinct random lowercase words of 3–7 letters.
fn words(n: usize, seed: u64, avoid: &std::collections::HashSet<String>) -> Vec<String> {
    let mut s = seed;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as usize
    };
    let mut out = Vec::new();
    let mut seen = avoid.clone();
    while out.len() < n {
        let len = 3 + next() % 5;
        let w: String = (0..len).map(|_| (b'a' + (next() % 26) as u8) as char).collect();
        if seen.insert(w.clone()) {
            out.push(w);
        }
    }
    out
}

/// Writes the character-level tokenizer, chat template, config and random weights.
fn build_model(dir: &Path) -> Result<ModelSpec> {
    std::fs::create_dir_all(dir)?;
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIALS.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    let mut chars: Vec<char> = (32u8..127).map(|b| b as char).collect();
    chars.push('\n');
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(SPECIALS.len() + i));
    }
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string_pretty(&tokenizer)?,
    )?;
    let tok_config = json!({
        "bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": false, "add_eos_token": false, "chat_template": TEMPLATE,
        "model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast"
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok_config)?,
    )?;
    let spec = ModelSpec {
        architecture: Architecture::Llama,
        vocab_size: 128,
        hidden_size: 128,
        intermediate_size: 384,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        sliding_window: None,
        bos_token_id: None,
        eos_token_ids: vec![2],
        sequence_classifier: false,
    };
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = graft_model::weights::hf_tensor_shapes(&spec)
        .into_iter()
        .map(|(name, shape)| {
            let mut data = random_tensor(&name, &shape, 2024);
            // A wider init than the 0.02 default trains faster at this size.
            if !name.ends_with("norm.weight") {
                data.iter_mut().for_each(|x| *x *= 2.5);
            }
            (name, shape, data)
        })
        .collect();
    let refs: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), d.as_slice()))
        .collect();
    graft_model::weights::save_hf_model_dir(dir, &spec, &refs)?;
    Ok(spec)
}

fn write_dataset(path: &Path, words: &[String]) -> Result<()> {
    let mut text = String::new();
    for w in words {
        let (q, a) = task(w);
        let row = json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]});
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(path, text)?;
    Ok(())
}

/// Exact-match accuracy of greedy answers of the model in `dir` on `words`.
fn accuracy(dir: &Path, words: &[String], examples: usize) -> Result<f64> {
    let loaded = graft_model::weights::load_model(dir)?;
    let mut model = Model::from_weights(Cpu, &loaded.spec, &loaded.weights, WeightStorage::F32)?;
    let (tok, template) = graft_data::load_tokenizer_and_template(dir)?;
    let template = template.context("quickstart model has a chat template")?;
    let mut right = 0;
    for (i, w) in words.iter().enumerate() {
        let (q, want) = task(w);
        let text = template.render_text(
            &[graft_data::Message::new("user", q.as_str())],
            None,
            true,
            &Default::default(),
        )?;
        let ids = tok.encode(&text, false)?.ids;
        let (out, _) = model.generate(
            &ids,
            12,
            SamplingParams::default(),
            tok.eos_ids(),
            Precision::Exact,
            |_| true,
        );
        let got = tok.decode(&out, true);
        if got.trim() == want {
            right += 1;
        }
        if i < examples {
            eprintln!(
                "    {q:<18} → {:<10} (expected {want})",
                format!("{:?}", got.trim())
            );
        }
    }
    Ok(right as f64 / words.len() as f64)
}

/// Runs the toy quickstart.
pub(super) fn run(args: &QuickstartArgs) -> Result<()> {
    let out = &args.out;
    let base = out.join("base-model");
    let data = out.join("data");
    std::fs::create_dir_all(&data)?;
    eprintln!(
        "1. building a 0.8M-parameter Llama model with a character tokenizer in {}",
        base.display()
    );
    build_model(&base)?;
    let train_words = words(3000, 1, &Default::default());
    let seen: std::collections::HashSet<String> = train_words.iter().cloned().collect();
    let eval_words = words(args.eval_words, 2, &seen);
    let loss_eval = words(
        200,
        3,
        &seen
            .union(&eval_words.iter().cloned().collect())
            .cloned()
            .collect(),
    );
    write_dataset(&data.join("train.jsonl"), &train_words)?;
    write_dataset(&data.join("eval.jsonl"), &loss_eval)?;
    eprintln!(
        "2. task: reverse a word ({} training conversations, {} held-out words)",
        train_words.len(),
        eval_words.len()
    );
    let before = if args.prepare_only {
        0.0
    } else {
        accuracy(&base, &eval_words, 3)?
    };
    if !args.prepare_only {
        eprintln!("   accuracy before fine-tuning: {:.1}%", 100.0 * before);
    }
    let run_dir = out.join("run");
    if !args.prepare_only {
        super::set_aside_previous_run(out, &run_dir)?;
    }
    let config = format!(
        r#"# Written by `graft quickstart`; run it again with `graft train {cfg}`.
full = true

[model]
path = "{base}"
precision = "exact"

[data]
train = ["{train}"]
eval = ["{eval}"]
max_length = 64

[optimizer]
lr = 3e-3
weight_decay = 0.0

[schedule]
kind = "cosine"
warmup_steps = 20

[batch]
micro_batch_tokens = 2048
max_grad_norm = 1.0

[train]
max_steps = {steps}
eval_every = 100
save_every = 100
log_every = 10
seed = 7

[output]
dir = "{run}"
"#,
        cfg = out.join("quickstart.toml").display(),
        base = base.display(),
        train = data.join("train.jsonl").display(),
        eval = data.join("eval.jsonl").display(),
        steps = args.steps.unwrap_or(300),
        run = run_dir.display(),
    );
    let cfg_path = out.join("quickstart.toml");
    std::fs::write(&cfg_path, &config)?;
    if args.prepare_only {
        eprintln!(
            "prepared {}; train with: graft train {}",
            out.display(),
            cfg_path.display()
        );
        return Ok(());
    }
    eprintln!("3. fine-tuning with {}", cfg_path.display());
    let summary = super::train(&cfg_path, &run_dir)?;
    let after = accuracy(&run_dir.join("model"), &eval_words, 5)?;
    println!(
        "quickstart: reverse-a-word accuracy on {} held-out words: {:.1}% before → {:.1}% after fine-tuning (eval loss {})",
        eval_words.len(),
        100.0 * before,
        100.0 * after,
        summary.eval_loss.map_or("-".into(), |l| format!("{l:.3}"))
    );
    println!(
        "run directory: {} (report.md, loss_curve.svg, metrics.jsonl, model/)",
        run_dir.display()
    );
    Ok(())
}
