//! `graft reward`: scores a dataset's rows with a reward model (a `*ForSequenceClassification`
//! checkpoint, or a base model plus the adapter of a `method = "reward"` run).
//!
//! One JSON line per row on stdout: preference rows give `chosen`, `rejected` and `margin`
//! (`chosen − rejected`); single answers (text, messages, prompt/completion, KTO rows) give
//! `score`. Sequences are tokenized as TRL's `RewardTrainer` does (prompt and answer as one text,
//! EOS appended to text rows) and scored where `*ForSequenceClassification` reads them: the last
//! token that is not the padding id. A summary (pairs ranked correctly, mean margin) goes to
//! stderr.

use anyhow::{Context, Result, bail};
use clap::Args;
use graft_data::batch::PackedBatch;
use graft_data::dataset::{LoadOptions, load};
use graft_data::sample::{TokenizeOptions, TokenizedRecord, TokenizedSample};
use graft_data::tokenized::tokenize_dataset;
use graft_kernels::Precision;
use graft_model::model::WeightStorage;
use graft_model::train::{Batch, TrainOptions};
use graft_train::objective::reward::score_position;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `graft reward`.
#[derive(Args, Debug)]
pub struct RewardArgs {
    /// The reward model (HF directory of a `*ForSequenceClassification` checkpoint), or the base
    /// model of `--adapter`.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter whose `modules_to_save` carries the score head (the `adapter/` of a
    /// `method = "reward"` run).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Tokenizer file or directory, if not the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The rows to score (JSONL, JSON, CSV, Parquet; any format `graft train` reads).
    #[arg(long)]
    pub data: PathBuf,
    /// Sequences longer than this many tokens are cut to their first tokens (0: the model's context).
    #[arg(long, default_value_t = 0)]
    pub max_length: usize,
    /// bf16 matmuls (faster, scores differ in the third digit); default f32.
    #[arg(long)]
    pub fast: bool,
}

/// Runs `graft reward`.
pub fn run(args: &RewardArgs) -> Result<()> {
    let storage = if args.fast {
        WeightStorage::Bf16
    } else {
        WeightStorage::F32
    };
    let open = crate::model_io::open(
        &args.model,
        args.tokenizer.as_deref(),
        args.adapter.as_deref(),
        storage,
    )?;
    let (mut model, tok, template) = (open.model, open.tokenizer, open.template);
    if model.score.is_none() {
        bail!(
            "{} has no score head: pass a reward model (a *ForSequenceClassification checkpoint, or --model BASE \
             --adapter the adapter/ of a method = \"reward\" run)",
            args.adapter.as_ref().unwrap_or(&args.model).display()
        );
    }
    let context = model.spec.max_position_embeddings;
    let max_len = if args.max_length == 0 {
        context
    } else {
        args.max_length
    };
    model.ensure_positions(max_len);
    let ds = load(&args.data, &LoadOptions::default())
        .with_context(|| format!("--data {}", args.data.display()))?;
    let opts = TokenizeOptions {
        max_len: Some(max_len),
        join_prompt_text: true,
        ..Default::default()
    };
    let tokenized = tokenize_dataset(&ds, &tok, template.as_ref(), &opts, false)
        .with_context(|| format!("--data {}", args.data.display()))?;
    if tokenized.examples.is_empty() {
        bail!("--data {}: no rows to score", args.data.display());
    }
    // Each row's sequences in row order (a pair's chosen then rejected), one score each.
    let mut items: Vec<&TokenizedSample> = Vec::new();
    for e in &tokenized.examples {
        match &e.record {
            TokenizedRecord::Pair { chosen, rejected, .. } => items.extend([chosen, rejected]),
            TokenizedRecord::Single(s) | TokenizedRecord::Kto { sample: s, .. } => items.push(s),
            TokenizedRecord::Chunks(c) => items.push(&c[0]),
        }
    }
    let pad = graft_train::preference::reward_pad_id(&tok);
    let topts = TrainOptions {
        precision: if args.fast {
            Precision::Fast.effective()
        } else {
            Precision::Exact
        },
        ..Default::default()
    };
    let mut scores = vec![0f32; items.len()];
    let budget = max_len.max(4096);
    let mut start = 0;
    while start < items.len() {
        let mut end = start;
        let mut used = 0;
        while end < items.len() && (end == start || used + items[end].input_ids.len() <= budget) {
            used += items[end].input_ids.len();
            end += 1;
        }
        let samples = &items[start..end];
        let packed = PackedBatch::from_samples(samples);
        let batch = Batch {
            input_ids: packed.input_ids,
            positions: packed.positions,
            seq_ids: packed.seq_ids,
            // Scores only: the LM head is not used.
            targets: vec![-100; packed.targets.len()],
        };
        let mut at = Vec::with_capacity(samples.len());
        let mut offset = 0;
        for s in samples {
            at.push(offset + score_position(&s.input_ids, pad));
            offset += s.input_ids.len();
        }
        let s = model.forward_scores(&batch, &at, topts);
        scores[start..end].copy_from_slice(&s);
        start = end;
    }
    let mut out = std::io::stdout().lock();
    let (mut pairs, mut correct, mut margin_sum) = (0usize, 0usize, 0f64);
    let mut k = 0;
    for e in &tokenized.examples {
        let file = tokenized.files.get(e.file).map(|f| f.display().to_string());
        let line = e.line;
        let value = match &e.record {
            TokenizedRecord::Pair { .. } => {
                let (c, r) = (scores[k] as f64, scores[k + 1] as f64);
                k += 2;
                pairs += 1;
                correct += usize::from(c > r);
                margin_sum += c - r;
                json!({"file": file, "line": line, "chosen": c, "rejected": r, "margin": c - r})
            }
            TokenizedRecord::Kto { label, .. } => {
                k += 1;
                json!({"file": file, "line": line, "score": scores[k - 1] as f64, "label": label})
            }
            _ => {
                k += 1;
                json!({"file": file, "line": line, "score": scores[k - 1] as f64})
            }
        };
        writeln!(out, "{value}")?;
    }
    if pairs > 0 {
        eprintln!(
            "{pairs} pairs: chosen scored above rejected in {correct} ({:.1}%), mean margin {:.4}",
            100.0 * correct as f64 / pairs as f64,
            margin_sum / pairs as f64
        );
    }
    if !tokenized.dropped_too_long.is_empty() || !tokenized.skipped.is_empty() {
        eprintln!(
            "warning: {} rows were not scored (invalid or dropped)",
            tokenized.dropped_too_long.len() + tokenized.skipped.len()
        );
    }
    Ok(())
}
