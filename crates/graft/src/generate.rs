//! `graft generate`: complete a prompt with a model (and optionally a LoRA adapter).

use crate::model_io;
use anyhow::{Result, bail};
use graft_kernels::Precision;
use graft_model::model::WeightStorage;
use graft_model::sample::SamplingParams;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `graft generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Model: a Hugging Face directory, a llama2.c `.bin` (tokenizer beside it) or a `.gguf`.
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Tokenizer to use instead of the model's (directory, tokenizer.json or llama2.c tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Prompt text (raw: no chat template is applied; see --chat).
    #[arg(long)]
    prompt: String,
    /// Render the prompt as one user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Maximum new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Exact f32 weights and products (default: bf16, as `graft chat` and `graft serve`).
    #[arg(long, conflicts_with = "fast")]
    exact: bool,
    /// The default (bf16 weights and products); accepted for older scripts.
    #[arg(long, hide = true)]
    fast: bool,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object (`prompt_ids`, `ids`, `text`, `finish_reason`) instead of streaming text.
    #[arg(long)]
    json: bool,
}

/// Runs `graft generate`, streaming the completion to stdout.
pub fn run(args: &GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    if let Err(e) = sampling.validate() {
        bail!("{e}");
    }
    let (storage, precision) = if args.exact {
        (WeightStorage::F32, Precision::Exact)
    } else {
        (WeightStorage::Bf16, Precision::Fast)
    };
    let mut m = model_io::open(
        &args.model,
        args.tokenizer.as_deref(),
        args.adapter.as_deref(),
        storage,
    )?;
    if !args.exact {
        m.model.pack_for_inference();
    }
    let prompt_ids = if args.chat {
        let Some(template) = &m.template else {
            bail!(
                "{}: the model has no chat template; drop --chat",
                args.model.display()
            )
        };
        let text = template.render_text(
            &[graft_data::Message::new("user", args.prompt.as_str())],
            None,
            true,
            &serde_json::Map::new(),
        )?;
        // The template writes special tokens such as BOS itself.
        m.tokenizer.encode(&text, false)?.ids
    } else {
        m.tokenizer.encode(&args.prompt, true)?.ids
    };
    if prompt_ids.is_empty() {
        bail!("the prompt encodes to no tokens; give a non-empty --prompt");
    }
    let mut stop: Vec<u32> = m.tokenizer.eos_ids().to_vec();
    stop.extend(m.model.spec.eos_token_ids.iter().copied());
    if args.ignore_eos {
        stop.clear();
    }
    let vocab = m.model.spec.vocab_size;
    if let Some(&bad) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
        bail!(
            "the tokenizer produced id {bad}, outside the model's vocabulary ({vocab}); wrong --tokenizer?"
        );
    }
    // The reply is what the new ids add to the prompt's text (leading space kept).
    let mut stream = m.tokenizer.decode_stream_after(&prompt_ids, true);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let model = &mut m.model;
    if args.json {
        let (ids, reason) =
            model.generate(&prompt_ids, args.max_tokens, sampling, &stop, precision, |_| true);
        let text = m.tokenizer.decode(&ids, true);
        let reason = match reason {
            graft_model::infer::FinishReason::Stop => "stop",
            graft_model::infer::FinishReason::Length => "length",
        };
        let v =
            serde_json::json!({"prompt_ids": prompt_ids, "ids": ids, "text": text, "finish_reason": reason});
        writeln!(out, "{v}")?;
        return Ok(());
    }
    model.generate(&prompt_ids, args.max_tokens, sampling, &stop, precision, |id| {
        if let Some(text) = stream.step(id) {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
        true
    });
    if let Some(text) = stream.finish() {
        out.write_all(text.as_bytes())?;
    }
    writeln!(out)?;
    Ok(())
}

/// Arguments of `graft logits`.
#[derive(clap::Args)]
pub struct LogitsArgs {
    /// Model (as for `generate`).
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Comma-separated token ids (one sequence).
    #[arg(long)]
    ids: String,
    /// Output JSON file (`-` for stdout): `[T][V]` logits.
    #[arg(long, default_value = "-")]
    out: PathBuf,
}

/// Runs `graft logits`: the full logits of a token sequence, for comparisons with other stacks.
pub fn logits(args: &LogitsArgs) -> Result<()> {
    let ids: Vec<u32> = args
        .ids
        .split(',')
        .map(|s| s.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("--ids: expected comma-separated token ids: {e}"))?;
    let loaded = graft_model::weights::load_model(&graft_hub::hub::resolve_model_path(
        &args.model.to_string_lossy(),
    )?)?;
    let mut model = graft_model::model::Model::from_weights(
        graft_kernels::Cpu,
        &loaded.spec,
        &loaded.weights,
        WeightStorage::F32,
    )?;
    if let Some(dir) = &args.adapter {
        model.set_adapter(&graft_model::peft::load_peft_adapter(dir, &loaded.spec)?);
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= model.spec.vocab_size) {
        bail!(
            "--ids: {bad} is outside the vocabulary ({})",
            model.spec.vocab_size
        );
    }
    let n = ids.len();
    model.ensure_positions(n);
    let batch = graft_model::train::Batch {
        input_ids: ids,
        positions: (0..n as u32).collect(),
        seq_ids: vec![0; n],
        targets: vec![-100; n],
    };
    let logits = model.logits(&batch, Precision::Exact);
    let rows: Vec<&[f32]> = logits.chunks(model.spec.vocab_size).collect();
    let json = serde_json::to_string(&rows)?;
    if args.out.as_os_str() == "-" {
        println!("{json}");
    } else {
        std::fs::write(&args.out, json)?;
    }
    Ok(())
}
