//! `graft bench train`: training-step throughput, peak memory and MFU of a named model shape,
//! with a per-op time profile, and — in the same invocation — PyTorch + transformers + PEFT on
//! the same shape and batch (`scripts/bench_torch.py`), printing the ratios.

use anyhow::{Context, Result, bail};
use graft_kernels::{Cpu, Precision, profile};
use graft_model::lora::LoraSpec;
use graft_model::model::{Model, WeightStorage};
use graft_model::shapes::{SHAPE_NAMES, named_shape};
use graft_model::train::{Batch, TrainMode, TrainOptions};
use std::path::PathBuf;
use std::time::Instant;

/// Benchmark subcommands.
#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// One training step repeated on a random model of a named shape.
    Train(TrainBenchArgs),
    /// Serving throughput and latency with many LoRA adapters resident.
    Serve(crate::bench_serve::ServeBenchArgs),
    /// Prompt processing and single-stream decode on GGUF files, graft and llama.cpp side by side.
    Decode(crate::bench_decode::DecodeBenchArgs),
}

/// Arguments of `graft bench train`.
#[derive(clap::Args)]
pub struct TrainBenchArgs {
    /// Model shape: smollm2-135m, qwen2.5-0.5b, llama-3.2-1b, stories260k, tiny.
    #[arg(long, default_value = "smollm2-135m")]
    pub shape: String,
    /// LoRA rank (on all seven linear projections, alpha = 2·rank).
    #[arg(long, default_value_t = 16, conflicts_with = "full")]
    pub lora_rank: usize,
    /// Full fine-tuning instead of LoRA.
    #[arg(long)]
    pub full: bool,
    /// Sequences per step (with `--method dpo`: preference pairs, two sequences each).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence (with `--method dpo`: prompt + completion).
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// The objective: `sft` (next-token loss on every token), `dpo` (sigmoid DPO on pairs whose
    /// chosen and rejected completions share a `--prompt-len` prompt; the reference log-probs
    /// computed once before the timed steps, as `graft train` does; the peer is TRL's
    /// DPOTrainer, `scripts/bench_trl_dpo.py`) or `grpo` (`--batch` prompts × `--generations`
    /// completions of `--seq − --prompt-len` tokens, rollouts included; the peer is TRL's
    /// GRPOTrainer, `scripts/bench_trl_grpo.py`).
    #[arg(long, default_value = "sft")]
    pub method: String,
    /// Prompt tokens of each pair (`--method dpo`) or prompt (`--method grpo`).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Completions per prompt (`--method grpo`).
    #[arg(long, default_value_t = 4)]
    pub generations: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Activation checkpointing.
    #[arg(long)]
    pub checkpointing: bool,
    /// Use exact f32 matrix products instead of bf16 (fast) ones.
    #[arg(long)]
    pub exact: bool,
    /// Skip the PyTorch comparison.
    #[arg(long)]
    pub no_torch: bool,
    /// Python with torch, transformers and peft (default: $GRAFT_PYTHON or python3).
    #[arg(long)]
    pub python: Option<String>,
    /// PyTorch configurations to try: `all` (fp32/bf16 × checkpointing off/on, best is compared),
    /// `fp32` or `bf16`.
    #[arg(long, default_value = "all")]
    pub torch_configs: String,
}

/// Runs a benchmark subcommand.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Train(args) => train(&args),
        BenchCommand::Serve(args) => crate::bench_serve::run(&args),
        BenchCommand::Decode(args) => crate::bench_decode::run(&args),
    }
}

/// Peak resident set size of this process in MB (VmHWM), if the OS reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A packed batch of `batch` random sequences of `seq` tokens, next-token targets.
fn random_batch(vocab: usize, batch: usize, seq: usize, seed: u64) -> Batch {
    let mut s = seed;
    let mut b = Batch::default();
    for r in 0..batch {
        let ids: Vec<u32> = (0..seq)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) % vocab as u64) as u32
            })
            .collect();
        for p in 0..seq {
            b.input_ids.push(ids[p]);
            b.positions.push(p as u32);
            b.seq_ids.push(r as u32);
            b.targets.push(if p + 1 < seq { ids[p + 1] as i32 } else { -100 });
        }
    }
    b
}

/// `pairs` random preference pairs of `seq` tokens each (a shared `prompt` prefix, different
/// completions), laid out `[chosen_0, rejected_0, …]` with only completion tokens trained.
fn random_pairs(
    vocab: usize,
    pairs: usize,
    seq: usize,
    prompt: usize,
    seed: u64,
) -> graft_train::objective::pairs::PairBatch {
    use graft_train::objective::pairs::{PairBatch, PairSlot};
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) % vocab as u64) as u32
    };
    let mut b = Batch::default();
    let mut slots = Vec::new();
    for k in 0..pairs {
        let head: Vec<u32> = (0..prompt).map(|_| next()).collect();
        for j in 0..2 {
            let ids: Vec<u32> = head
                .iter()
                .copied()
                .chain((prompt..seq).map(|_| next()))
                .collect();
            for p in 0..seq {
                b.input_ids.push(ids[p]);
                b.positions.push(p as u32);
                b.seq_ids.push((2 * k + j) as u32);
                b.targets.push(if p + 1 < seq && p + 1 >= prompt {
                    ids[p + 1] as i32
                } else {
                    -100
                });
            }
        }
        slots.push(PairSlot {
            chosen_seq: 2 * k as u32,
            rejected_seq: 2 * k as u32 + 1,
            ref_chosen: 0.0,
            ref_rejected: 0.0,
        });
    }
    PairBatch {
        batch: b,
        pairs: slots,
        completion: Vec::new(),
    }
}

/// The CPU model from `/proc/cpuinfo` with its family and model numbers (machines of one name
/// differ: Zen 4 is family 25, Zen 5 family 26) and the kernel paths chosen for it — every
/// benchmark prints this.
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let name = field("model name").unwrap_or_else(|| "unknown CPU".into());
    let numbers = match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!(" (family {f} model {m})"),
        _ => String::new(),
    };
    format!("{name}{numbers}; {}", graft_kernels::cpu::kernel_paths())
}

/// Model FLOPs of one step (forward + backward, no recomputation), the MFU numerator.
fn step_flops(spec: &graft_model::ModelSpec, batch: usize, seq: usize, full: bool, lora_rank: usize) -> f64 {
    let t = (batch * seq) as f64;
    let (h, i) = (spec.hidden_size as f64, spec.intermediate_size as f64);
    let (q, kv) = (spec.q_dim() as f64, spec.kv_dim() as f64);
    let linear_params = h * q + 2.0 * h * kv + q * h + 3.0 * h * i;
    let passes = if full { 3.0 } else { 2.0 }; // forward, dX, (dW)
    let mut f = passes * 2.0 * t * linear_params * spec.num_layers as f64;
    if !full {
        // LoRA: x·Aᵀ and (xa)·Bᵀ forward, and ~3× that backward.
        let in_out: f64 = 2.0 * h + q + 2.0 * kv + q + h + 2.0 * i + h + i;
        f += 4.0 * 2.0 * t * lora_rank as f64 * in_out * spec.num_layers as f64;
    }
    let trained = (batch * (seq - 1)) as f64;
    f += passes * 2.0 * trained * spec.vocab_size as f64 * h;
    // Causal attention: QKᵀ and PV, each 2·S²/2·d per head; backward ≈ 2.5× forward.
    let attn_fwd = 2.0 * 2.0 * (seq as f64 * seq as f64 / 2.0) * spec.head_dim as f64 * spec.num_heads as f64;
    f += 3.5 * attn_fwd * batch as f64 * spec.num_layers as f64;
    f
}

fn train(args: &TrainBenchArgs) -> Result<()> {
    let Some(spec) = named_shape(&args.shape) else {
        bail!(
            "unknown --shape `{}`; expected one of {}",
            args.shape,
            SHAPE_NAMES.join(", ")
        );
    };
    if args.batch == 0 || args.seq < 2 || args.steps == 0 {
        bail!("--batch and --steps must be ≥ 1 and --seq ≥ 2");
    }
    let dpo = match args.method.as_str() {
        "sft" => false,
        "dpo" => true,
        "grpo" => return crate::bench_grpo::run(args),
        other => bail!("--method: expected sft, dpo or grpo, got `{other}`"),
    };
    if dpo && args.prompt_len + 2 > args.seq {
        bail!(
            "--prompt-len ({}) must leave at least 2 completion tokens in --seq ({})",
            args.prompt_len,
            args.seq
        );
    }
    let precision = if args.exact {
        Precision::Exact
    } else {
        Precision::Fast.effective()
    };
    let mode = if args.full {
        TrainMode::Full
    } else {
        TrainMode::Lora
    };
    let storage = if mode == TrainMode::Lora && precision == Precision::Fast {
        WeightStorage::Bf16
    } else {
        WeightStorage::F32
    };
    let threads = rayon::current_num_threads();
    eprintln!(
        "graft bench train{}: {} ({:.1}M params), {}, batch {} × seq {}, {:?} precision, checkpointing {}, {} threads, {}",
        if dpo { " --method dpo" } else { "" },
        args.shape,
        spec.num_parameters() as f64 / 1e6,
        if args.full {
            "full fine-tuning".to_string()
        } else {
            format!("LoRA r{} on all linear layers", args.lora_rank)
        },
        args.batch,
        args.seq,
        precision,
        if args.checkpointing { "on" } else { "off" },
        threads,
        cpu_model()
    );
    let mut model = Model::random(Cpu, &spec, 1, storage);
    model.ensure_positions(args.seq);
    if mode == TrainMode::Lora {
        let lora = LoraSpec {
            r: args.lora_rank,
            alpha: 2.0 * args.lora_rank as f32,
            rslora: false,
            dropout: 0.0,
            targets: [true; 7],
        };
        model.init_lora(&lora, 7);
    }
    let batch = random_batch(spec.vocab_size, args.batch, args.seq, 42);
    let mut pairs = dpo.then(|| random_pairs(spec.vocab_size, args.batch, args.seq, args.prompt_len, 42));
    let mut objective = graft_train::objective::pairs::PairObjective {
        loss: graft_train::objective::dpo::DpoParams::default(),
    };
    if let Some(pb) = pairs.as_mut() {
        // The reference (the base: adapter off), once, as graft train keeps it in the run dir.
        let t0 = Instant::now();
        let out = model.forward_logprobs_with(
            &pb.batch,
            TrainOptions {
                precision,
                without_adapters: true,
                ..Default::default()
            },
        );
        let seqs = graft_train::objective::pairs::sequence_logps(&pb.batch, &out.logprobs);
        for s in &mut pb.pairs {
            s.ref_chosen = seqs[s.chosen_seq as usize].0;
            s.ref_rejected = seqs[s.rejected_seq as usize].0;
        }
        eprintln!(
            "  reference log-probs (once per run): {:.2} s",
            t0.elapsed().as_secs_f64()
        );
    }
    let mut grads = model.new_grads(mode);
    // The trainer's own AdamW, so the step and its memory are what a real run does.
    let mut opt = graft_train::optim::AdamW::new(graft_train::optim::AdamWHyper::default());
    let opts = TrainOptions {
        precision,
        checkpointing: args.checkpointing,
        ..Default::default()
    };
    let n_trained = batch.num_trained();
    let mut times = Vec::new();
    let mut last_loss = 0.0;
    for step in 0..=args.steps {
        if step == 1 {
            profile::reset();
            profile::set_enabled(true);
        }
        let t0 = Instant::now();
        grads.zero(&model.backend);
        if let Some(pb) = &pairs {
            use graft_train::objective::Objective;
            let c = objective.forward_backward(&model, pb, &mut grads, opts);
            let mut gs: Vec<&mut [f32]> = Vec::new();
            grads.for_each_mut(|_, g| gs.push(g.as_mut_slice()));
            graft_train::optim::scale_grads(&mut gs, 1.0 / c.units as f32);
            last_loss = c.loss_sum / c.units;
        } else {
            let out = model.forward_backward(&batch, &mut grads, 1.0 / n_trained as f32, opts);
            last_loss = out.loss_sum / n_trained as f64;
        }
        let _p = profile::scope("optimizer");
        let mut trainable = model.trainable(mode, &mut grads).map_err(anyhow::Error::msg)?;
        let mut params: Vec<graft_train::optim::Param<'_>> = trainable
            .iter_mut()
            .map(|p| graft_train::optim::Param {
                name: p.name.as_str(),
                value: &mut *p.value,
                grad: p.grad.as_slice(),
                decay: p.id.decays(),
            })
            .collect();
        opt.step(&mut params, 1e-4)?;
        drop(params);
        drop(_p);
        let dt = t0.elapsed().as_secs_f64();
        eprintln!(
            "  step {step}{}: {dt:.2} s, loss {last_loss:.4}",
            if step == 0 { " (warm-up)" } else { "" }
        );
        if step > 0 {
            times.push(dt);
        }
    }
    profile::set_enabled(false);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let sequences = if dpo { 2 * args.batch } else { args.batch };
    let tokens = (sequences * args.seq) as f64;
    let tps = tokens / mean;
    let rss = peak_rss_mb().unwrap_or(f64::NAN);
    let flops = step_flops(&spec, sequences, args.seq, args.full, args.lora_rank);
    let (peak_f32, peak_bf16) = graft_kernels::cpu::gemm_bf16::measure_peak_gflops(threads);
    let peak = if precision == Precision::Fast {
        peak_bf16
    } else {
        peak_f32
    };
    let achieved = flops / mean / 1e9;
    println!("graft: {tps:.1} tokens/s, step {mean:.2} s, peak RSS {rss:.0} MB, loss {last_loss:.4}");
    println!(
        "graft: {achieved:.1} GFLOP/s model FLOPs, MFU {:.1}% of the measured {} GEMM peak ({peak:.0} GFLOP/s; f32 {peak_f32:.0}, bf16 {peak_bf16:.0})",
        100.0 * achieved / peak,
        if precision == Precision::Fast {
            "bf16"
        } else {
            "f32"
        },
    );
    let path = graft_kernels::cpu::gemm_bf16::gemm_path();
    if precision == Precision::Fast
        && let Some(instruction) = path.peak_instruction()
        && let Some(ipeak) = graft_kernels::cpu::gemm_bf16::instruction_peak_gflops(path, threads)
    {
        println!(
            "graft: MFU {:.1}% of the {} path's instruction peak ({ipeak:.0} GFLOP/s: {threads} cores of register-resident {instruction})",
            100.0 * achieved / ipeak,
            path.describe(),
        );
    }
    let plan = graft_train::plan::estimate(
        &spec,
        &graft_train::plan::PlanInput {
            tokens: sequences * args.seq,
            lora: (mode == TrainMode::Lora).then_some(LoraSpec {
                r: args.lora_rank,
                alpha: 2.0 * args.lora_rank as f32,
                rslora: false,
                dropout: 0.0,
                targets: [true; 7],
            }),
            bf16_weights: storage == WeightStorage::Bf16,
            stored_weight_bytes: None,
            fast: precision == Precision::Fast,
            checkpointing: args.checkpointing,
        },
    );
    let predicted = plan.total() as f64 / (1 << 20) as f64;
    println!(
        "memory planner: predicted {predicted:.0} MB vs measured {rss:.0} MB ({:+.1}%)",
        100.0 * (predicted - rss) / rss
    );
    println!("per-op time over {} timed steps:", times.len());
    let totals = profile::totals();
    let all: f64 = totals.iter().map(|t| t.1.as_secs_f64()).sum();
    for (op, d, calls) in totals {
        println!(
            "  {op:<24} {:>8.3} s/step {:>5.1}%  ({} calls/step)",
            d.as_secs_f64() / times.len() as f64,
            100.0 * d.as_secs_f64() / all,
            calls / times.len() as u64
        );
    }
    if !args.no_torch {
        if dpo {
            compare_trl_dpo(args, tps, rss)?;
        } else {
            compare_torch(args, tps, rss)?;
        }
    }
    Ok(())
}

/// Runs `scripts/bench_trl_dpo.py` (TRL's DPOTrainer + PEFT on the same shape and pairs) and
/// prints the ratios.
fn compare_trl_dpo(args: &TrainBenchArgs, tps: f64, rss: f64) -> Result<()> {
    let Some(v) = run_peer(args, "bench_trl_dpo.py", "TRL", "trl, peft and torch", |cmd| {
        cmd.args([
            "--shape",
            &args.shape,
            "--pairs",
            &args.batch.to_string(),
            "--prompt-len",
            &args.prompt_len.to_string(),
            "--completion-len",
            &(args.seq - args.prompt_len).to_string(),
            "--steps",
            &args.steps.to_string(),
            "--threads",
            &rayon::current_num_threads().to_string(),
            "--lora-rank",
            &args.lora_rank.to_string(),
            "--configs",
            &args.torch_configs,
            // Like for like: graft computes the reference once before training too.
            "--precompute-ref",
        ]);
        Ok(())
    })?
    else {
        return Ok(());
    };
    let best = &v["best"];
    let t_tps = best["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let t_rss = best["peak_rss_mb"].as_f64().unwrap_or(f64::NAN);
    let lean = leanest_peer_rss_mb(&v);
    println!(
        "trl {} (best config: {} {}): {t_tps:.1} tokens/s, peak RSS {t_rss:.0} MB (leanest config {lean:.0} MB)",
        v["trl"],
        best["dtype"],
        if best["checkpointing"].as_bool() == Some(true) {
            "with checkpointing"
        } else {
            "no checkpointing"
        },
    );
    println!(
        "ratio graft/trl: tokens/s {:.2}×, peak RSS {:.2}× of the leanest TRL config",
        tps / t_tps,
        rss / lean
    );
    Ok(())
}

/// The lowest peak RSS among a peer report's `configs` (the leanest configuration it ran).
pub fn leanest_peer_rss_mb(report: &serde_json::Value) -> f64 {
    report["configs"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|x| x["peak_rss_mb"].as_f64())
                .fold(f64::INFINITY, f64::min)
        })
        .unwrap_or(f64::NAN)
}

/// Runs the peer script `scripts/<script>` with the Python of `--python` / `$GRAFT_PYTHON` and
/// returns the JSON line it prints last; `None` (after saying why) when it is missing or fails.
pub fn run_peer(
    args: &TrainBenchArgs,
    script: &str,
    peer: &str,
    packages: &str,
    add_args: impl FnOnce(&mut std::process::Command) -> Result<()>,
) -> Result<Option<serde_json::Value>> {
    let python = args
        .python
        .clone()
        .or_else(|| std::env::var("GRAFT_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    run_peer_with(&python, script, peer, packages, add_args)
}

/// [`run_peer`] with an explicit Python.
pub fn run_peer_with(
    python: &str,
    script: &str,
    peer: &str,
    packages: &str,
    add_args: impl FnOnce(&mut std::process::Command) -> Result<()>,
) -> Result<Option<serde_json::Value>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(script);
    if !path.exists() {
        eprintln!("(skipping the {peer} comparison: {} not found)", path.display());
        return Ok(None);
    }
    let mut cmd = std::process::Command::new(python);
    cmd.arg(&path);
    add_args(&mut cmd)?;
    eprintln!("running the {peer} reference: {python} {} …", path.display());
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {python}"))?;
    if !out.status.success() {
        eprintln!(
            "({peer} comparison failed: {}; are {packages} installed for {python}? set --python)",
            out.status
        );
        return Ok(None);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')) else {
        eprintln!("(the {peer} comparison printed no JSON result)");
        return Ok(None);
    };
    Ok(Some(
        serde_json::from_str(line).with_context(|| format!("parsing {script} output"))?,
    ))
}

fn compare_torch(args: &TrainBenchArgs, tps: f64, rss: f64) -> Result<()> {
    let Some(v) = run_peer(
        args,
        "bench_torch.py",
        "PyTorch",
        "torch, transformers and peft",
        |cmd| {
            cmd.args([
                "--shape",
                &args.shape,
                "--batch",
                &args.batch.to_string(),
                "--seq",
                &args.seq.to_string(),
            ])
            .args([
                "--steps",
                &args.steps.to_string(),
                "--threads",
                &rayon::current_num_threads().to_string(),
            ]);
            if args.full {
                cmd.arg("--full");
            } else {
                cmd.args(["--lora-rank", &args.lora_rank.to_string()]);
            }
            match args.torch_configs.as_str() {
                "all" => {
                    cmd.arg("--all-configs");
                }
                d @ ("fp32" | "bf16") => {
                    cmd.args(["--dtype", d]);
                    if args.checkpointing {
                        cmd.arg("--checkpointing");
                    }
                }
                other => bail!("--torch-configs: expected all, fp32 or bf16, got `{other}`"),
            }
            Ok(())
        },
    )?
    else {
        return Ok(());
    };
    let t_tps = v["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let t_rss = v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN);
    println!(
        "pytorch (best config {}): {t_tps:.1} tokens/s, peak RSS {t_rss:.0} MB",
        v["config"]
    );
    println!(
        "ratio graft/pytorch: tokens/s {:.2}×, peak RSS {:.2}×",
        tps / t_tps,
        rss / t_rss
    );
    Ok(())
}
