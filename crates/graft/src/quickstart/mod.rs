//! `graft quickstart`: a few-minute demonstration of real fine-tuning on 2 cores.
//!
//! With a pretrained chat model (`--model`, else SmolLM2-135M-Instruct from the Hugging Face
//! cache or hub) it teaches the model a new identity with LoRA and shows, on held-out questions,
//! how it answers before and after ([`chat`]). When no such model can be had (offline, empty
//! cache) it says so and falls back to a toy model it builds itself ([`toy`]).

mod chat;
mod toy;

use anyhow::Result;
use graft_train::config::TrainConfig;
use graft_train::signal::StopFlag;
use std::path::{Path, PathBuf};

/// The chat model the quickstart uses when `--model` is not given.
pub const DEFAULT_MODEL: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// Arguments of `graft quickstart`.
#[derive(clap::Args)]
pub struct QuickstartArgs {
    /// The chat model to fine-tune (HF folder, .gguf, hub id, ollama:NAME). Default:
    /// HuggingFaceTB/SmolLM2-135M-Instruct from the Hugging Face cache or hub.
    #[arg(long)]
    model: Option<String>,
    /// Skip the pretrained model: build and train the offline toy model.
    #[arg(long, conflicts_with = "model")]
    toy: bool,
    /// Where to put the data and run (and the toy model).
    #[arg(long, default_value = "runs/quickstart")]
    out: PathBuf,
    /// Optimizer steps (default: 40 for a chat model, 300 for the toy).
    #[arg(long)]
    steps: Option<u64>,
    /// Held-out words to score before and after (toy model).
    #[arg(long, default_value_t = 100)]
    eval_words: usize,
    /// Only write the model, data and config (then `graft train OUT/quickstart.toml`).
    #[arg(long)]
    prepare_only: bool,
}

/// Runs the quickstart: the chat-model demo, or the toy when no chat model is available.
pub fn run(args: &QuickstartArgs) -> Result<()> {
    if args.toy {
        return toy::run(args);
    }
    let spec = args.model.as_deref().unwrap_or(DEFAULT_MODEL);
    match graft_hub::hub::resolve_model_path(spec) {
        Ok(path) => chat::run(args, &path),
        Err(e) if args.model.is_some() => Err(anyhow::anyhow!("--model {spec}: {e}")),
        Err(e) => {
            eprintln!(
                "no pretrained chat model available ({DEFAULT_MODEL}: {e});\n\
                 falling back to the offline toy model (give one with --model PATH, e.g. a .gguf file)\n"
            );
            toy::run(args)
        }
    }
}

/// Moves an earlier quickstart run out of the way (to `run-previous`) rather than replacing it
/// silently.
fn set_aside_previous_run(out: &Path, run_dir: &Path) -> Result<()> {
    if run_dir.exists() {
        let previous = out.join("run-previous");
        let _ = std::fs::remove_dir_all(&previous);
        std::fs::rename(run_dir, &previous)?;
        eprintln!(
            "   the previous quickstart run was moved to {} (this run replaces the one before it)",
            previous.display()
        );
    }
    Ok(())
}

/// Trains the run `cfg_path` describes; on Ctrl-C says how to resume and exits with 130.
fn train(cfg_path: &Path, run_dir: &Path) -> Result<graft_train::sft::RunSummary> {
    let cfg = TrainConfig::load(cfg_path, &[])?;
    let stop = StopFlag::install()?;
    let summary = graft_train::sft::run(&cfg, false, &stop)?;
    if summary.interrupted {
        eprintln!(
            "stopped by {}; continue with: graft train --resume {}",
            summary.signal.unwrap_or("a signal"),
            run_dir.display()
        );
        std::process::exit(130);
    }
    Ok(summary)
}
