//! `graft chat`: an interactive terminal chat with a model (and optionally a LoRA adapter),
//! rendered through the model's chat template, with the conversation kept and replies streamed.
//! Commands: `/reset` clears the history, `/exit` (or end of input) quits.

use crate::model_io;
use anyhow::{Context, Result, bail};
use graft_data::Message;
use graft_kernels::Precision;
use graft_model::model::WeightStorage;
use graft_model::sample::SamplingParams;
use std::io::{BufRead, Write};
use std::path::PathBuf;

/// Arguments of `graft chat`.
#[derive(clap::Args)]
pub struct ChatArgs {
    /// Model: a Hugging Face directory, a llama2.c `.bin` or a `.gguf`.
    #[arg(long)]
    model: PathBuf,
    /// PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Tokenizer to use instead of the model's.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Jinja chat template file (when the model has none, or to override it).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// System message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Maximum new tokens per reply.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Random seed (each reply uses the next one).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Exact f32 weights and products (default: bf16, as `graft serve`).
    #[arg(long)]
    exact: bool,
}

/// Runs the chat loop on stdin/stdout.
pub fn run(args: &ChatArgs) -> Result<()> {
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
    if let Some(path) = &args.chat_template {
        m.template = Some(
            graft_data::ChatTemplate::from_file(path, m.tokenizer.special_tokens().clone())
                .with_context(|| format!("loading chat template {}", path.display()))?,
        );
    }
    let Some(template) = m.template.take() else {
        bail!(
            "{}: the model has no chat template; pass --chat-template FILE (or use `graft generate`)",
            args.model.display()
        );
    };
    let mut sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    if let Err(e) = sampling.validate() {
        bail!("{e}");
    }
    let mut stop: Vec<u32> = m.tokenizer.eos_ids().to_vec();
    stop.extend(m.model.spec.eos_token_ids.iter().copied());
    stop.extend(crate::serve_cmd::generation_eos_ids(&args.model));
    let context = m.model.spec.max_position_embeddings;
    let mut history: Vec<Message> = Vec::new();
    if let Some(s) = &args.system {
        history.push(Message::new("system", s.as_str()));
    }
    let system_turns = history.len();
    eprintln!("graft chat: /reset clears the conversation, /exit quits.");
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let stdout = std::io::stdout();
    let mut line = String::new();
    loop {
        {
            let mut out = stdout.lock();
            write!(out, "> ")?;
            out.flush()?;
        }
        line.clear();
        if input.read_line(&mut line)? == 0 {
            writeln!(stdout.lock())?;
            break;
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.truncate(system_turns);
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        history.push(Message::new("user", text));
        // Render; drop the oldest turns while the prompt leaves no room for a reply.
        let ids = loop {
            let rendered = template.render_text(&history, None, true, &serde_json::Map::new())?;
            let ids = m.tokenizer.encode(&rendered, false)?.ids;
            if ids.len() + 16 <= context || history.len() <= system_turns + 1 {
                break ids;
            }
            history.remove(system_turns);
        };
        if ids.len() + 1 >= context {
            eprintln!("(the message is too long for the model's context of {context} tokens)");
            history.pop();
            continue;
        }
        let max_tokens = args.max_tokens.min(context - ids.len());
        // The reply is what the new ids add to the prompt's text (leading space kept).
        let mut stream = m.tokenizer.decode_stream_after(&ids, true);
        let mut out = stdout.lock();
        let (reply_ids, _) = m
            .model
            .generate(&ids, max_tokens, sampling, &stop, precision, |id| {
                if let Some(t) = stream.step(id) {
                    let _ = out.write_all(t.as_bytes());
                    let _ = out.flush();
                }
                true
            });
        if let Some(t) = stream.finish() {
            out.write_all(t.as_bytes())?;
        }
        writeln!(out)?;
        let reply = m.tokenizer.decode(&reply_ids, true);
        history.push(Message::new("assistant", reply.trim()));
        sampling.seed = sampling.seed.wrapping_add(1);
    }
    Ok(())
}
