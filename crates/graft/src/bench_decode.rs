//! `graft bench decode`: prompt processing and single-stream greedy decode on GGUF files, graft
//! and llama.cpp (`scripts/bench_llamacpp_decode.py`, llama-cpp-python) in one invocation, with
//! the ratio and the CPU model.
//!
//! Per file: a deterministic prompt of `--prompt` token ids is processed once (prompt tokens/s =
//! prompt length / time to the first new token), then `--tokens` more are generated greedily
//! with end-of-sequence ignored (decode tokens/s over those). graft runs as `graft generate` does
//! by default (bf16 weights, fast products); llama.cpp with its defaults (f16 KV cache).

use crate::bench::{cpu_model, run_peer_with};
use anyhow::{Context, Result};
use graft_kernels::{Cpu, Precision};
use graft_model::model::{Model, WeightStorage};
use graft_model::sample::SamplingParams;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `graft bench decode`.
#[derive(clap::Args)]
pub struct DecodeBenchArgs {
    /// GGUF files to measure (repeatable), e.g. SmolLM2 as F16, Q8_0, Q4_K_M and Q4_1.
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// New tokens to decode.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Python with llama-cpp-python for the peer (default: $GRAFT_LLAMACPP_PYTHON, then python3).
    #[arg(long)]
    python: Option<String>,
    /// Skip the llama.cpp side.
    #[arg(long)]
    no_peer: bool,
    /// Also print where graft's decode time goes, per backend op (ms per new token; a separate,
    /// untimed run, the prompt's share subtracted).
    #[arg(long)]
    profile: bool,
}

/// The prompt: deterministic ids in `[3, vocab)` (clear of the usual special ids).
fn prompt_ids(vocab: usize, n: usize) -> Vec<u32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            3 + ((s >> 33) as usize % (vocab.saturating_sub(3).max(1))) as u32
        })
        .collect()
}

/// (prompt tokens/s, decode tokens/s) of graft on the model `loaded` for the prompt `ids`.
fn graft_side(
    loaded: &graft_model::weights::LoadedModel,
    ids: &[u32],
    tokens: usize,
    profile: bool,
) -> Result<(f64, f64)> {
    let mut model = Model::from_weights(Cpu, &loaded.spec, &loaded.weights, WeightStorage::Bf16)?;
    model.pack_for_inference();
    let greedy = SamplingParams::default();
    // Warm-up (page-in, thread pool), then the timed runs.
    model.generate(&ids[..ids.len().min(16)], 2, greedy, &[], Precision::Fast, |_| {
        true
    });
    let t = Instant::now();
    model.generate(ids, 1, greedy, &[], Precision::Fast, |_| true);
    let first = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (out, _) = model.generate(ids, tokens + 1, greedy, &[], Precision::Fast, |_| true);
    let all = t.elapsed().as_secs_f64();
    let new = out.len().saturating_sub(1);
    let decode = new as f64 / (all - first).max(1e-9);
    if profile {
        print_decode_profile(&mut model, ids, tokens);
    }
    Ok((ids.len() as f64 / first, decode))
}

/// Per-op time of the decode steps alone: a profiled prompt-only run subtracted from a profiled
/// full run.
fn print_decode_profile(model: &mut Model<Cpu>, ids: &[u32], tokens: usize) {
    use graft_kernels::profile;
    let greedy = SamplingParams::default();
    let mut measure = |n: usize| {
        profile::reset();
        profile::set_enabled(true);
        let (out, _) = model.generate(ids, n, greedy, &[], Precision::Fast, |_| true);
        profile::set_enabled(false);
        (out.len(), profile::totals())
    };
    let (_, prompt) = measure(1);
    let (len, full) = measure(tokens + 1);
    let new = len.saturating_sub(1).max(1) as f64;
    let mut rows: Vec<(&str, f64, u64)> = full
        .iter()
        .map(|&(op, d, calls)| {
            let (pd, pc) = prompt
                .iter()
                .find(|e| e.0 == op)
                .map_or((0.0, 0), |e| (e.1.as_secs_f64(), e.2));
            (
                op,
                (d.as_secs_f64() - pd).max(0.0) * 1e3 / new,
                calls.saturating_sub(pc),
            )
        })
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = rows.iter().map(|r| r.1).sum();
    println!("  decode op profile ({total:.2} ms per token in ops):");
    for (op, ms, calls) in rows.iter().filter(|r| r.1 > 0.005) {
        println!(
            "    {op:<28} {ms:>7.3} ms/token {:>5.1}%  {calls} calls",
            100.0 * ms / total.max(1e-12)
        );
    }
}

/// Runs `graft bench decode`.
pub fn run(args: &DecodeBenchArgs) -> Result<()> {
    let threads = rayon::current_num_threads();
    println!(
        "graft bench decode: prompt {} tokens, {} new tokens, {threads} threads, {}",
        args.prompt,
        args.tokens,
        cpu_model()
    );
    let python = args
        .python
        .clone()
        .or_else(|| std::env::var("GRAFT_LLAMACPP_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    println!(
        "{:<44} {:>12} {:>12} {:>9}   {:>12} {:>12} {:>9}",
        "file", "graft pp t/s", "llama pp", "ratio", "graft tg t/s", "llama tg", "ratio"
    );
    for path in &args.models {
        let loaded = graft_model::weights::load_model(path).with_context(|| path.display().to_string())?;
        let ids = prompt_ids(loaded.spec.vocab_size, args.prompt);
        let (pp, tg) = graft_side(&loaded, &ids, args.tokens, args.profile)
            .with_context(|| format!("graft on {}", path.display()))?;
        drop(loaded);
        let peer = if args.no_peer {
            None
        } else {
            run_peer_with(
                &python,
                "bench_llamacpp_decode.py",
                "llama.cpp",
                "llama-cpp-python",
                |cmd| {
                    let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                    cmd.arg(path)
                        .args(["--ids", &ids.join(","), "--tokens", &args.tokens.to_string()])
                        .args(["--threads", &threads.to_string()]);
                    Ok(())
                },
            )?
        };
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        match peer {
            Some(v) => {
                let (lpp, ltg) = (
                    v["prompt_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
                    v["decode_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
                );
                println!(
                    "{name:<44} {pp:>12.1} {lpp:>12.1} {:>8.2}×   {tg:>12.1} {ltg:>12.1} {:>8.2}×",
                    pp / lpp,
                    tg / ltg
                );
            }
            None => println!(
                "{name:<44} {pp:>12.1} {:>12} {:>9}   {tg:>12.1} {:>12} {:>9}",
                "-", "-", "-", "-"
            ),
        }
    }
    println!("ratios are graft / llama.cpp (≥ 1.00× means graft is as fast or faster)");
    Ok(())
}
