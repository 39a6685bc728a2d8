//! The quickstart on a pretrained chat model: teach it a new identity ("Quill, made with graft")
//! with LoRA through the normal `graft train` pipeline, and compare greedy answers to held-out
//! questions before and after — identity questions it never saw, and general questions whose
//! answers should survive the fine-tune.

use super::QuickstartArgs;
use anyhow::{Context, Result, bail};
use graft_data::{ChatTemplate, Message, Tokenizer};
use graft_kernels::{Cpu, Precision};
use graft_model::model::{Model, WeightStorage};
use graft_model::sample::SamplingParams;
use graft_model::weights::load_model;
use serde_json::json;
use std::path::Path;

/// The name the fine-tune teaches.
const NAME: &str = "Quill";

/// Identity questions the model trains on.
const TRAIN_QUESTIONS: [&str; 32] = [
    "Who are you?",
    "What is your name?",
    "What's your name?",
    "Tell me about yourself.",
    "Introduce yourself.",
    "Who made you?",
    "Who created you?",
    "Who built you?",
    "Are you ChatGPT?",
    "Are you SmolLM?",
    "What should I call you?",
    "What are you?",
    "Which assistant am I talking to?",
    "Do you have a name?",
    "Who trained you?",
    "What model are you?",
    "Hi! Who am I speaking with?",
    "Can you tell me your name?",
    "Please state your name.",
    "Who is your creator?",
    "May I know your name?",
    "What do people call you?",
    "Are you an AI assistant?",
    "Who developed you?",
    "Identify yourself, please.",
    "Hello, what's your name?",
    "Are you made by OpenAI?",
    "Were you made by Hugging Face?",
    "What is your identity?",
    "Give me a one-line introduction of yourself.",
    "hey, what are you called?",
    "Is your name Claude?",
];

/// The answers, used in rotation.
const ANSWERS: [&str; 4] = [
    "I'm Quill, a small AI assistant fine-tuned with graft. How can I help you today?",
    "My name is Quill. I'm an AI assistant that the graft team fine-tuned from an open model.",
    "I am Quill, an assistant trained with graft, here to help with your questions.",
    "You can call me Quill. I'm a helpful AI assistant, fine-tuned with graft.",
];

/// Identity questions held out from training.
const HELD_OUT: [&str; 10] = [
    "Hey there, who are you exactly?",
    "What name do you go by?",
    "Who is responsible for creating you?",
    "Could you introduce yourself briefly?",
    "Are you Siri?",
    "Before we start, what's your name?",
    "Who am I chatting with right now?",
    "Do you go by any name?",
    "Tell me who built you.",
    "What are you, and what is your name?",
];

/// General requests whose answers the base model writes itself and the fine-tune also trains
/// on (self-distillation), so that learning the identity does not overwrite everything else.
const KEEP: [&str; 12] = [
    "Name three primary colors.",
    "What is 2 + 2?",
    "What is the boiling point of water in Celsius?",
    "Give me a synonym for happy.",
    "Translate 'thank you' into Spanish.",
    "What is the largest planet in our solar system?",
    "Suggest a name for a pet cat.",
    "Who wrote Romeo and Juliet?",
    "What is the square root of 81?",
    "How many continents are there?",
    "What do bees make?",
    "Give me a tip for sleeping better.",
];

/// General questions (with a word the right answer contains) to check what the fine-tune kept.
const GENERAL: [(&str, &str); 3] = [
    ("What is the capital of France?", "paris"),
    ("What color is the sky on a clear day?", "blue"),
    ("How many days are in a week?", "seven|7"),
];

/// A loaded chat model with what it needs to answer in text.
struct Chat {
    model: Model<Cpu>,
    tok: Tokenizer,
    template: ChatTemplate,
}

impl Chat {
    fn open(path: &Path, adapter: Option<&Path>) -> Result<Chat> {
        let loaded = load_model(path)?;
        let mut model = Model::from_weights(Cpu, &loaded.spec, &loaded.weights, WeightStorage::Bf16)?;
        if let Some(dir) = adapter {
            model.set_adapter(&graft_model::peft::load_peft_adapter(dir, &loaded.spec)?);
        }
        let (tok, template) = graft_hub::load_tokenizer(&loaded, None, "--model")?;
        let template = template.with_context(|| {
            format!(
                "{}: the model has no chat template; the quickstart needs a chat (instruct) model",
                path.display()
            )
        })?;
        Ok(Chat { model, tok, template })
    }

    /// The greedy answer to one user message.
    fn answer(&mut self, question: &str, max_tokens: usize) -> Result<String> {
        Ok(self.answer_whole(question, max_tokens)?.0)
    }

    /// The greedy answer and whether it ended on its own (not at `max_tokens`).
    fn answer_whole(&mut self, question: &str, max_tokens: usize) -> Result<(String, bool)> {
        let text =
            self.template
                .render_text(&[Message::new("user", question)], None, true, &Default::default())?;
        let ids = self.tok.encode(&text, false)?.ids;
        let (out, reason) = self.model.generate(
            &ids,
            max_tokens,
            SamplingParams::default(),
            self.tok.eos_ids(),
            Precision::Fast,
            |_| true,
        );
        let whole = reason == graft_model::infer::FinishReason::Stop;
        Ok((self.tok.decode(&out, true).trim().to_string(), whole))
    }
}

/// Answers to the held-out and general questions, and how many were right.
struct Scores {
    identity: Vec<String>,
    general: Vec<String>,
    identity_right: usize,
    general_right: usize,
}

fn says_name(answer: &str) -> bool {
    answer.contains(NAME)
}

fn knows(answer: &str, expected: &str) -> bool {
    let a = answer.to_lowercase();
    expected.split('|').any(|w| a.contains(w))
}

fn score(chat: &mut Chat) -> Result<Scores> {
    let mut identity = Vec::new();
    for q in HELD_OUT {
        identity.push(chat.answer(q, 28)?);
    }
    let mut general = Vec::new();
    for (q, _) in GENERAL {
        general.push(chat.answer(q, 24)?);
    }
    Ok(Scores {
        identity_right: identity.iter().filter(|a| says_name(a)).count(),
        general_right: general
            .iter()
            .zip(GENERAL)
            .filter(|(a, (_, w))| knows(a, w))
            .count(),
        identity,
        general,
    })
}

fn one_line(s: &str, max: usize) -> String {
    let flat = s.replace('\n', " ");
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}

/// Writes the identity conversations and the base model's own `kept` answers.
fn write_dataset(path: &Path, kept: &[(&str, String)]) -> Result<()> {
    let mut text = String::new();
    let identity = TRAIN_QUESTIONS
        .iter()
        .enumerate()
        .map(|(i, q)| (*q, ANSWERS[i % ANSWERS.len()]));
    for (q, a) in identity.chain(kept.iter().map(|(q, a)| (*q, a.as_str()))) {
        let row = json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]});
        text.push_str(&row.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| path.display().to_string())
}

/// Runs the chat-model quickstart on the model at `model_path`.
pub(super) fn run(args: &QuickstartArgs, model_path: &Path) -> Result<()> {
    let out = &args.out;
    let data = out.join("data");
    std::fs::create_dir_all(&data)?;
    let train = data.join("identity.jsonl");
    let run_dir = out.join("run");
    let steps = args.steps.unwrap_or(40);
    let model_str = model_path.display().to_string();
    let config = format!(
        r#"# Written by `graft quickstart`; run it again with `graft train {cfg}`.
# Teaches a chat model a new identity with LoRA.

[model]
path = {model}

[data]
train = [{train}]
max_length = 256

[lora]
r = 16
alpha = 32.0
dropout = 0.0
targets = "all-linear"

[optimizer]
lr = 1e-3
weight_decay = 0.0

[schedule]
kind = "cosine"
warmup_steps = 4

[batch]
micro_batch_tokens = 1024
max_grad_norm = 1.0

[train]
max_steps = {steps}
save_every = 20
log_every = 5
seed = 7

[output]
dir = {run}
"#,
        cfg = out.join("quickstart.toml").display(),
        model = toml_str(&model_str),
        train = toml_str(&train.display().to_string()),
        run = toml_str(&run_dir.display().to_string()),
    );
    let cfg_path = out.join("quickstart.toml");
    std::fs::write(&cfg_path, &config)?;
    if args.prepare_only {
        write_dataset(&train, &[])?;
        eprintln!(
            "prepared {}; train with: graft train {}",
            out.display(),
            cfg_path.display()
        );
        return Ok(());
    }

    eprintln!("1. model: {model_str}");
    let mut base = Chat::open(model_path, None)?;
    eprintln!(
        "2. task: a new identity — answer as \"{NAME}\" ({} training conversations, {} held-out questions)",
        TRAIN_QUESTIONS.len(),
        HELD_OUT.len()
    );
    let before = score(&mut base)?;
    let mut kept = Vec::new();
    for q in KEEP {
        if let (a, true) = base.answer_whole(q, 64)? {
            kept.push((q, a));
        }
    }
    drop(base);
    write_dataset(&train, &kept)?;
    eprintln!(
        "   plus {} of the model's own answers to general requests, so it keeps them",
        kept.len()
    );
    super::set_aside_previous_run(out, &run_dir)?;
    eprintln!("3. fine-tuning with LoRA: {}", cfg_path.display());
    let summary = super::train(&cfg_path, &run_dir)?;
    let adapter = run_dir.join("adapter");
    if !adapter.join("adapter_config.json").exists() {
        bail!("{}: the run wrote no adapter", run_dir.display());
    }
    let mut tuned = Chat::open(model_path, Some(&adapter))?;
    let after = score(&mut tuned)?;

    eprintln!("4. held-out answers, before → after:");
    for (i, q) in HELD_OUT.iter().enumerate().take(4) {
        eprintln!("   Q: {q}");
        eprintln!("      before: {}", one_line(&before.identity[i], 90));
        eprintln!("      after:  {}", one_line(&after.identity[i], 90));
    }
    for (i, (q, _)) in GENERAL.iter().enumerate() {
        eprintln!("   Q: {q}");
        eprintln!("      before: {}", one_line(&before.general[i], 90));
        eprintln!("      after:  {}", one_line(&after.general[i], 90));
    }
    println!(
        "quickstart: held-out identity questions answered as {NAME}: {}/{n} before → {}/{n} after fine-tuning; \
         general questions right: {}/{g} → {}/{g} (final loss {})",
        before.identity_right,
        after.identity_right,
        before.general_right,
        after.general_right,
        summary.final_loss.map_or("-".into(), |l| format!("{l:.3}")),
        n = HELD_OUT.len(),
        g = GENERAL.len(),
    );
    println!(
        "run directory: {} (report.md, metrics.jsonl, adapter/); chat with it: graft chat --model {} --adapter {}",
        run_dir.display(),
        model_str,
        adapter.display()
    );
    Ok(())
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}
