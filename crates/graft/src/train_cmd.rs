//! `graft train` and `graft export`: run (or resume) a fine-tuning run from a TOML config, and
//! turn a finished run into a merged model directory.

use anyhow::{Context, Result, bail};
use graft_train::config::TrainConfig;
use graft_train::signal::StopFlag;
use std::path::PathBuf;

/// Arguments of `graft train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// The run's config (TOML); see `graft train --print-config` for every key.
    config: Option<PathBuf>,
    /// Override a config key, e.g. `--set optimizer.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in this directory from its latest checkpoint.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "config")]
    resume: Option<PathBuf>,
    /// Print the predicted peak memory and its parts, then exit without training.
    #[arg(long)]
    plan: bool,
    /// Print a fully commented example config and exit.
    #[arg(long)]
    print_config: bool,
}

/// Runs `graft train`.
pub fn run(args: &TrainArgs) -> Result<()> {
    if args.print_config {
        print!("{}", TrainConfig::documented_example());
        return Ok(());
    }
    let (cfg, resume) = match (&args.config, &args.resume) {
        (Some(path), None) => (TrainConfig::load(path, &args.sets)?, false),
        (None, Some(dir)) => {
            let path = dir.join("config.toml");
            if !path.exists() {
                bail!(
                    "--resume {}: no config.toml there (is it a graft run directory?)",
                    dir.display()
                );
            }
            let mut cfg = TrainConfig::load(&path, &args.sets)?;
            cfg.output.dir = Some(dir.display().to_string());
            (cfg, true)
        }
        _ => bail!("give a config file (graft train CONFIG.toml) or --resume RUN_DIR"),
    };
    if args.plan {
        let plan = graft_train::plan::plan(&cfg)?;
        print!("{plan}");
        return Ok(());
    }
    let stop = StopFlag::install().context("installing the Ctrl-C handler")?;
    let summary = graft_train::sft::run(&cfg, resume, &stop)?;
    let dir = summary.run_dir.display();
    if summary.interrupted {
        eprintln!(
            "stopped by {} at step {}/{}; checkpoint saved. Continue with: graft train --resume {dir}",
            summary.signal.unwrap_or("a signal"),
            summary.steps,
            summary.total_steps
        );
        // The shell convention for a run ended by a signal: 128 + its number.
        let code = match summary.signal {
            Some("SIGTERM") => 143,
            _ => 130,
        };
        std::process::exit(code);
    }
    let output = match &summary.output {
        Some(p) if p.ends_with("adapter") => "adapter/ (PEFT LoRA adapter)",
        Some(_) => "model/ (full model)",
        None => "no final weights",
    };
    eprintln!(
        "done: {} steps, last-step train loss {}{}; wrote {output}, report.md and metrics.jsonl in {dir}",
        summary.steps,
        summary.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary
            .eval_loss
            .map_or(String::new(), |l| format!(", eval loss {l:.4}")),
    );
    Ok(())
}

/// `graft export` subcommands.
#[derive(clap::Subcommand)]
pub enum ExportCommand {
    /// Fold a run's LoRA adapter into its base model and write a Hugging Face directory.
    Merge {
        /// The run directory (holding config.toml and adapter/).
        run_dir: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs `graft export`.
pub fn export(cmd: &ExportCommand) -> Result<()> {
    match cmd {
        ExportCommand::Merge { run_dir, out } => {
            graft_train::sft::export_merged(run_dir, out)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
    }
}
