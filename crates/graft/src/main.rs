//! `graft`: post-train open-weight LLMs on your own machine — fine-tune, evaluate, export, serve.
//!
//! One subcommand per job; each lives in its own module and is a thin layer over the library
//! crates (`graft-model`, `graft-data`, `graft-train`, `graft-serve`).

mod bench;
mod bench_decode;
mod bench_grpo;
mod bench_serve;
mod chat_cmd;
mod data_cmd;
mod generate;
mod jobs_cmd;
mod model_io;
mod quickstart;
mod reward_cmd;
mod serve_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};

/// graft — post-train open-weight LLMs (SFT, LoRA, full fine-tuning) and serve them.
#[derive(Parser)]
#[command(name = "graft", version, about)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model and its LoRA adapters over an OpenAI-compatible HTTP API.
    Serve(serve_cmd::ServeArgs),
    /// Train queued fine-tuning jobs of a `graft serve --jobs --database postgres://…` server.
    Worker(jobs_cmd::WorkerArgs),
    /// Chat with the model in the terminal (its chat template, history kept).
    Chat(chat_cmd::ChatArgs),
    /// Offline demo: build a small model, fine-tune it on a task, report accuracy before/after.
    Quickstart(quickstart::QuickstartArgs),
    /// Fine-tune a model (SFT with LoRA or full fine-tuning) from a TOML config.
    Train(train_cmd::TrainArgs),
    /// Export a finished run (merged model directory).
    #[command(subcommand)]
    Export(train_cmd::ExportCommand),
    /// Dataset tools.
    #[command(subcommand)]
    Data(DataCommand),
    /// Generate a completion for a prompt.
    Generate(generate::GenerateArgs),
    /// Print the logits of a token sequence as JSON (for comparisons with other stacks).
    Logits(generate::LogitsArgs),
    /// Score a dataset's rows with a reward model (one JSON line per row).
    Reward(reward_cmd::RewardArgs),
    /// Benchmarks (training step throughput and memory vs PyTorch).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Show what a dataset will train on: formats, lengths, masks, invalid rows.
    Inspect(data_cmd::DataInspectArgs),
}

/// The activation arena: freed large buffers are kept for the next allocation of their size (a
/// training step allocates the same activations every step; see `ActivationArena`).
#[global_allocator]
static ALLOCATOR: graft_kernels::cpu::alloc::ActivationArena = graft_kernels::cpu::alloc::ActivationArena;

fn main() {
    let cli = Cli::parse();
    if let Some(n) = cli.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
    {
        eprintln!("warning: could not set threads: {e}");
    }
    let result = match cli.command {
        Command::Serve(args) => serve_cmd::run(&args),
        Command::Worker(args) => jobs_cmd::run_worker(&args),
        Command::Chat(args) => chat_cmd::run(&args),
        Command::Quickstart(args) => quickstart::run(&args),
        Command::Train(args) => train_cmd::run(&args),
        Command::Export(cmd) => train_cmd::export(&cmd),
        Command::Data(DataCommand::Inspect(args)) => data_inspect(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Logits(args) => generate::logits(&args),
        Command::Reward(args) => reward_cmd::run(&args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn data_inspect(args: &data_cmd::DataInspectArgs) -> anyhow::Result<()> {
    let loaded = graft_hub::hub::load_model_or_download(&args.model.to_string_lossy())?;
    let (tok, template) = model_io::load_tokenizer(&loaded, None)?;
    data_cmd::run_inspect(args, tok, template)
}
