//! `graft bench train --method grpo`: GRPO steps on a named shape (random weights, LoRA on every
//! linear layer), rollouts through the generation core on the live adapter, against TRL's
//! GRPOTrainer (transformers generation + PEFT, `scripts/bench_trl_grpo.py`) on the same shape,
//! prompt length, completions per prompt and completion length, in one invocation.

use crate::bench::{TrainBenchArgs, cpu_model, leanest_peer_rss_mb, peak_rss_mb, run_peer};
use anyhow::{Result, bail};
use graft_kernels::{Cpu, Precision};
use graft_model::lora::LoraSpec;
use graft_model::model::{Model, WeightStorage};
use graft_model::shapes::named_shape;
use graft_model::train::{TrainMode, TrainOptions};
use graft_train::config::TrainConfig;
use graft_train::objective::Objective;
use graft_train::rl::{PromptRow, Rl, RlBatch, RlSettings};
use std::time::Instant;

/// A whitespace word-level tokenizer with `vocab` ids (`<pad>`, `<s>`, `</s>`, then `w3` …), the
/// one `scripts/bench_trl_dpo.py` builds, so both sides decode the same text.
fn word_tokenizer(vocab: usize) -> Result<graft_data::Tokenizer> {
    let mut words = serde_json::Map::new();
    for (i, w) in ["<pad>", "<s>", "</s>"].iter().enumerate() {
        words.insert(w.to_string(), i.into());
    }
    for i in 3..vocab {
        words.insert(format!("w{i}"), i.into());
    }
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": words, "unk_token": "<pad>"}
    });
    Ok(graft_data::Tokenizer::from_tokenizer_json_bytes(
        json.to_string().as_bytes(),
    )?)
}

/// Runs the GRPO benchmark: `--batch` prompts per step × `--generations` completions of
/// `--seq − --prompt-len` tokens.
pub fn run(args: &TrainBenchArgs) -> Result<()> {
    let Some(spec) = named_shape(&args.shape) else {
        bail!("unknown --shape `{}`", args.shape);
    };
    let completion = args.seq.saturating_sub(args.prompt_len);
    if completion == 0 || args.prompt_len == 0 || args.generations < 2 {
        bail!("--method grpo needs --prompt-len ≥ 1, --seq above it and --generations ≥ 2");
    }
    let precision = if args.exact {
        Precision::Exact
    } else {
        Precision::Fast.effective()
    };
    let storage = if precision == Precision::Fast {
        WeightStorage::Bf16
    } else {
        WeightStorage::F32
    };
    let threads = rayon::current_num_threads();
    let completions = args.batch * args.generations;
    eprintln!(
        "graft bench train --method grpo: {} ({:.1}M params), LoRA r{} on all linear layers, {} prompts × {} \
         generations of {completion} tokens after {}-token prompts, {:?} precision, {threads} threads, {}",
        args.shape,
        spec.num_parameters() as f64 / 1e6,
        args.lora_rank,
        args.batch,
        args.generations,
        args.prompt_len,
        precision,
        cpu_model()
    );
    let mut model = Model::random(Cpu, &spec, 1, storage);
    model.ensure_positions(args.seq + 1);
    model.init_lora(
        &LoraSpec {
            r: args.lora_rank,
            alpha: 2.0 * args.lora_rank as f32,
            rslora: false,
            dropout: 0.0,
            targets: [true; 7],
        },
        7,
    );
    let tok = word_tokenizer(spec.vocab_size)?;
    let mut s = 42u64;
    let prompts: Vec<PromptRow> = (0..args.batch * (args.steps + 1))
        .map(|i| {
            let ids: Vec<u32> = (0..args.prompt_len)
                .map(|_| 3 + (graft_train::rng::splitmix64(&mut s) % (spec.vocab_size as u64 - 3)) as u32)
                .collect();
            PromptRow {
                place: format!("prompt {i}"),
                text: tok.decode(&ids, true),
                ids,
                columns: Default::default(),
            }
        })
        .collect();
    // TRL's GRPOConfig defaults (dapo, beta 0, temperature 1) on this shape.
    let cfg = TrainConfig::from_toml_str(
        &format!(
            "method = \"grpo\"\n\
             [model]\npath = \"{}\"\n\
             [data]\ntrain = \"(random prompts)\"\nmax_length = {}\n\
             [batch]\nmicro_batch_rows = {completions}\ngrad_accum = 1\n\
             [grpo]\nnum_generations = {}\nmax_completion_length = {completion}\n\
             [[rewards]]\nname = \"length\"\nmax = 100000\n",
            args.shape,
            args.seq + 1,
            args.generations
        ),
        "graft bench train --method grpo",
        &[],
    )?;
    let settings = RlSettings::from_config(&cfg).map_err(anyhow::Error::msg)?;
    // No stop tokens: every completion runs its full length, as on TRL's side (EOS suppressed).
    let mut objective =
        Rl::new(&cfg, &settings, &prompts, &tok, Vec::new(), None).map_err(anyhow::Error::msg)?;
    let mut grads = model.new_grads(TrainMode::Lora);
    let mut opt = graft_train::optim::AdamW::new(graft_train::optim::AdamWHyper::default());
    let opts = TrainOptions {
        precision,
        checkpointing: args.checkpointing,
        ..Default::default()
    };
    let (mut steps, mut rollouts) = (Vec::new(), Vec::new());
    for step in 0..=args.steps {
        let batch = RlBatch {
            generation: step as u64,
            iteration: 0,
            prompts: (step * args.batch..(step + 1) * args.batch).collect(),
        };
        let t0 = Instant::now();
        grads.zero(&model.backend);
        // Per-op time of the rollouts of the timed steps.
        graft_kernels::profile::set_enabled(step > 0);
        objective
            .prepare_step(&model, &batch, opts)
            .map_err(anyhow::Error::msg)?;
        graft_kernels::profile::set_enabled(false);
        let t_roll = t0.elapsed().as_secs_f64();
        let c = objective.forward_backward(&model, &batch, &mut grads, opts);
        let mut trainable = model
            .trainable(TrainMode::Lora, &mut grads)
            .map_err(anyhow::Error::msg)?;
        let mut params: Vec<graft_train::optim::Param<'_>> = trainable
            .iter_mut()
            .map(|p| graft_train::optim::Param {
                name: p.name.as_str(),
                value: &mut *p.value,
                grad: p.grad.as_slice(),
                decay: p.id.decays(),
            })
            .collect();
        opt.step(&mut params, 1e-6)?;
        drop(params);
        let dt = t0.elapsed().as_secs_f64();
        let generated = c.metrics.get("completions/mean_length").copied().unwrap_or(0.0) * completions as f64;
        eprintln!(
            "  step {step}{}: {dt:.2} s (rollouts {t_roll:.2} s, {generated:.0} tokens)",
            if step == 0 { " (warm-up)" } else { "" }
        );
        if step > 0 {
            steps.push(dt);
            rollouts.push((t_roll, generated));
        }
    }
    let roll_total: f64 = rollouts.iter().map(|r| r.0).sum();
    println!("rollout time by op over {} timed steps:", steps.len());
    for (op, d, calls) in graft_kernels::profile::totals() {
        println!(
            "  {op:<24} {:>8.3} s/step {:>5.1}%  ({} calls/step)",
            d.as_secs_f64() / steps.len() as f64,
            100.0 * d.as_secs_f64() / roll_total.max(1e-9),
            calls / steps.len() as u64
        );
    }
    let mean = steps.iter().sum::<f64>() / steps.len() as f64;
    let roll_tps =
        rollouts.iter().map(|r| r.1).sum::<f64>() / rollouts.iter().map(|r| r.0).sum::<f64>().max(1e-9);
    let rss = peak_rss_mb().unwrap_or(f64::NAN);
    println!(
        "graft: step {mean:.2} s ({:.2} completions/s), rollouts {roll_tps:.1} tokens/s, peak RSS {rss:.0} MB",
        completions as f64 / mean
    );
    if args.no_torch {
        return Ok(());
    }
    let Some(v) = run_peer(args, "bench_trl_grpo.py", "TRL", "trl, peft and torch", |cmd| {
        cmd.args([
            "--shape",
            &args.shape,
            "--prompts-per-step",
            &args.batch.to_string(),
            "--generations",
            &args.generations.to_string(),
            "--prompt-len",
            &args.prompt_len.to_string(),
            "--completion-len",
            &completion.to_string(),
            "--steps",
            &args.steps.to_string(),
            "--threads",
            &threads.to_string(),
            "--lora-rank",
            &args.lora_rank.to_string(),
            "--configs",
            &args.torch_configs,
        ]);
        Ok(())
    })?
    else {
        return Ok(());
    };
    let best = &v["best"];
    let t_step = best["mean_step_s"].as_f64().unwrap_or(f64::NAN);
    let t_roll = best["rollout_tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let t_rss = best["peak_rss_mb"].as_f64().unwrap_or(f64::NAN);
    let lean = leanest_peer_rss_mb(&v);
    println!(
        "trl {} GRPOTrainer (best config: {}): step {t_step:.2} s, rollouts {t_roll:.1} tokens/s, peak RSS {t_rss:.0} MB \
         (leanest config {lean:.0} MB)",
        v["trl"], best["dtype"]
    );
    println!(
        "ratio graft/trl: step throughput {:.2}×, rollout tokens/s {:.2}×, peak RSS {:.2}× of the leanest TRL config ({})",
        t_step / mean,
        roll_tps / t_roll,
        rss / lean,
        cpu_model()
    );
    Ok(())
}
