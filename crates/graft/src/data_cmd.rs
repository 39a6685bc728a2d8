//! `graft data inspect`: show what a dataset will train on before training.
//!
//! Prints rows, detected format, a token length histogram, truncated rows, the trained-token
//! fraction, one rendered sample with its trained spans marked, and every invalid row as
//! `file:line: reason`. Invalid rows make the command fail unless `--skip-invalid` is given.

use std::path::PathBuf;

use anyhow::{Context, bail};
use graft_data::dataset::DatasetFormat;
use graft_data::inspect::{InspectOptions, inspect};
use graft_data::sample::{LossMode, Truncation};
use graft_data::{ChatTemplate, Tokenizer};

/// Arguments of `graft data inspect`.
#[derive(clap::Args, Debug, Clone)]
pub struct DataInspectArgs {
    /// Dataset file (.jsonl, .json, .txt, optionally .gz) or folder of them.
    pub file: PathBuf,
    /// Model folder (Hugging Face layout) or llama2.c .bin whose tokenizer and chat template to use.
    #[arg(long)]
    pub model: PathBuf,
    /// Dataset format instead of auto-detection, as `data.format` in a train config: openai,
    /// sharegpt, alpaca, prompt_completion (or prompt-completion), text, preference, kto.
    #[arg(long)]
    pub format: Option<DatasetFormat>,
    /// Maximum sequence length in tokens; longer rows are reported as truncated.
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    /// Which tokens are trained, as `data.mask` in a train config: assistant, all, last_assistant,
    /// completion (`--loss` and the spellings assistant-only, all-tokens, … also work).
    #[arg(long = "mask", alias = "loss", default_value = "assistant")]
    pub loss: LossMode,
    /// Keep the end of long rows instead of the start.
    #[arg(long)]
    pub truncate_left: bool,
    /// Report invalid rows and carry on instead of failing.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Which valid row to show rendered (0 = the first).
    #[arg(long, default_value_t = 0)]
    pub sample_row: usize,
    /// Chat template to use instead of the model's: a .jinja file, or a JSON file with `chat_template`.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

/// Runs `graft data inspect` with an already loaded tokenizer and (optional) chat template.
pub fn run_inspect(
    args: &DataInspectArgs,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
) -> anyhow::Result<()> {
    let template = match &args.chat_template {
        Some(path) => Some(
            ChatTemplate::from_file(path, tokenizer.special_tokens().clone())
                .with_context(|| format!("loading chat template {}", path.display()))?,
        ),
        None => template,
    };
    let opts = InspectOptions {
        format: args.format,
        max_len: args.max_len,
        loss: args.loss,
        truncation: if args.truncate_left {
            Truncation::KeepEnd
        } else {
            Truncation::KeepStart
        },
        sample_row: args.sample_row,
    };
    let report = inspect(&args.file, &tokenizer, template.as_ref(), &opts)
        .with_context(|| format!("inspecting {}", args.file.display()))?;
    print!("{report}");
    if !report.invalid.is_empty() && !args.skip_invalid {
        bail!(
            "{} invalid row(s) in {} (listed above); fix them or pass --skip-invalid to skip them",
            report.invalid.len(),
            args.file.display()
        );
    }
    if report.rows == 0 {
        bail!("{}: no valid rows", args.file.display());
    }
    Ok(())
}
