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
    /// Write a run (its adapter merged) or any model graft opens as one GGUF file for llama.cpp.
    Gguf {
        /// A run directory, or a model (HF folder, .gguf, hub id, ollama:NAME).
        run_or_model: String,
        /// llama.cpp file type: f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k.
        #[arg(long, default_value = "f16")]
        quant: String,
        /// Output file (default: RUN/model-QUANT.gguf for a run, ./NAME-QUANT.gguf for a model).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write a run's LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli --lora FILE`).
    GgufLora {
        /// The run directory.
        run_dir: PathBuf,
        /// Output file (default: RUN/adapter.gguf).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write a folder with the merged GGUF and an Ollama Modelfile; runs `ollama create` when
    /// Ollama is installed.
    Ollama {
        /// A run directory, or a model graft opens.
        run_or_model: String,
        /// The Ollama model name (`ollama run NAME`).
        #[arg(long)]
        name: String,
        /// llama.cpp file type of the GGUF (as for `export gguf`).
        #[arg(long, default_value = "q4_k_m")]
        quant: String,
        /// Output folder (default: RUN/ollama for a run, ./NAME-ollama otherwise).
        #[arg(long)]
        out: Option<PathBuf>,
        /// An Ollama Go template file to use instead of the one derived from the chat template.
        #[arg(long)]
        template: Option<PathBuf>,
    },
}

fn file_type(quant: &str) -> Result<graft_model::weights::quantize::FileType> {
    use graft_model::weights::quantize::FileType;
    FileType::parse(quant).with_context(|| {
        let names: Vec<&str> = FileType::ALL.iter().map(|f| f.name()).collect();
        format!(
            "--quant: `{quant}` is not a file type graft writes; expected one of {}",
            names.join(", ")
        )
    })
}

fn is_run_dir(p: &str) -> bool {
    std::path::Path::new(p).join("config.toml").is_file()
}

fn stem(p: &str) -> String {
    let path = std::path::Path::new(p);
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.replace([':', '/'], "-"))
}

fn size_mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Runs `graft export`.
pub fn export(cmd: &ExportCommand) -> Result<()> {
    match cmd {
        ExportCommand::Merge { run_dir, out } => {
            graft_train::sft::export_merged(run_dir, out)?;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
        ExportCommand::Gguf {
            run_or_model,
            quant,
            out,
        } => {
            let ftype = file_type(quant)?;
            let out = out.clone().unwrap_or_else(|| {
                if is_run_dir(run_or_model) {
                    PathBuf::from(run_or_model).join(format!("model-{}.gguf", ftype.name()))
                } else {
                    PathBuf::from(format!("{}-{}.gguf", stem(run_or_model), ftype.name()))
                }
            });
            let e = graft_train::export::export_gguf(run_or_model, &out, ftype)?;
            let mix: Vec<String> = e.type_counts.iter().map(|(t, n)| format!("{n} × {t}")).collect();
            eprintln!(
                "wrote {} ({}; tensors {})",
                e.path.display(),
                size_mb(e.bytes),
                mix.join(", ")
            );
            Ok(())
        }
        ExportCommand::GgufLora { run_dir, out } => {
            let out = out.clone().unwrap_or_else(|| run_dir.join("adapter.gguf"));
            graft_train::export::export_gguf_lora(run_dir, &out)?;
            eprintln!("wrote {} (llama.cpp: --lora {})", out.display(), out.display());
            Ok(())
        }
        ExportCommand::Ollama {
            run_or_model,
            name,
            quant,
            out,
            template,
        } => {
            let ftype = file_type(quant)?;
            let out = out.clone().unwrap_or_else(|| {
                if is_run_dir(run_or_model) {
                    PathBuf::from(run_or_model).join("ollama")
                } else {
                    PathBuf::from(format!("{}-ollama", name.replace([':', '/'], "-")))
                }
            });
            let template = match template {
                Some(p) => {
                    Some(std::fs::read_to_string(p).with_context(|| format!("--template {}", p.display()))?)
                }
                None => None,
            };
            let e = graft_train::export::export_ollama(run_or_model, &out, name, ftype, template.as_deref())?;
            eprintln!(
                "wrote {} ({}) and {}",
                e.gguf.path.display(),
                size_mb(e.gguf.bytes),
                e.modelfile.display()
            );
            match e.created {
                Some(_) => eprintln!("created Ollama model `{name}`: ollama run {name}"),
                None => eprintln!(
                    "ollama is not on PATH; to register it later: cd {} && ollama create {name} -f Modelfile",
                    out.display()
                ),
            }
            Ok(())
        }
    }
}
