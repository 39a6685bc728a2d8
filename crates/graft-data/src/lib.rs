//! graft-data: tokenizers, chat templates, dataset formats, template-derived loss masks and
//! isolated packing — everything between a dataset file and the token batches the engine trains on.
//!
//! * [`Tokenizer`] — one type over Hugging Face `tokenizer.json`, tiktoken rank files (Llama 3,
//!   Qwen), SentencePiece vocabularies (llama2.c `tok512.bin`, GGUF arrays, `.model` protobufs) and
//!   GPT-2 vocab/merges; byte offsets, special tokens, BOS/EOS from the model's configs, streaming
//!   decode.
//! * [`ChatTemplate`] — `chat_template` rendered with transformers' semantics; [`ChatTemplate::render`]
//!   also returns the byte span each message produced, found by rendering conversation prefixes.
//! * [`dataset`] — OpenAI messages, ShareGPT, Alpaca, prompt/completion, text, preference and KTO
//!   files, auto-detected, with `file:line: reason` errors.
//! * [`sample`] — records to token ids with per-token training flags derived from the rendering
//!   (assistant-only by default, end-of-turn token trained, doubled BOS fixed).
//! * [`batch`] — best-fit-decreasing packing into padding-free batches with per-token sequence ids
//!   and restarted positions; a seeded RNG for reproducible shuffles.
//! * [`tokenized`] — whole-dataset tokenization cached by content hash; [`inspect`] — the report
//!   behind `graft data inspect`.
//!
//! ```no_run
//! use graft_data::{load_tokenizer_and_template, load_tokenized, dataset::LoadOptions, sample::TokenizeOptions};
//! let (tok, template) = load_tokenizer_and_template("model_dir".as_ref())?;
//! let opts = TokenizeOptions { max_len: Some(2048), ..Default::default() };
//! let data = load_tokenized("train.jsonl".as_ref(), &LoadOptions::default(), &tok, template.as_ref(), &opts, Some("cache".as_ref()))?;
//! let (batches, _stats) = graft_data::pack(&data.singles(), 4096, 42, 0)?;
//! # Ok::<(), graft_data::Error>(())
//! ```

#![warn(missing_docs)]

pub mod batch;
pub mod dataset;
pub mod error;
pub mod hash;
pub mod inspect;
pub mod sample;
pub mod template;
pub mod tokenized;
pub mod tokenizer;

use std::path::Path;

pub use batch::{PackedBatch, best_fit_decreasing, pack, shuffled_indices};
pub use dataset::{DatasetFormat, Record, Row, RowError, Turns};
pub use error::{Error, Result};
pub use inspect::{InspectOptions, InspectReport};
pub use sample::{LossMode, TokenizeOptions, TokenizedRecord, TokenizedSample, Truncation};
pub use template::{ChatTemplate, Message, MessageSpan, Rendered};
pub use tokenized::{TokenizedDataset, load_tokenized};
pub use tokenizer::{
    DecodeStream, Encoding, IncrementalDecoder, SpecialTokens, TiktokenSpec, Tokenizer, TokenizerKind,
};

/// Loads the tokenizer and chat template for a model path: a Hugging Face folder (tokenizer.json
/// or tiktoken ranks + configs), or a llama2.c checkpoint `.bin` whose tokenizer sits beside it
/// (`tokenizer.bin`, `tok<N>.bin`). The template is `None` when the model has none.
pub fn load_tokenizer_and_template(model_path: &Path) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    if model_path.is_dir() {
        let tok = Tokenizer::from_model_dir(model_path)?;
        let template = tok.chat_template().cloned();
        return Ok((tok, template));
    }
    if model_path.extension().is_some_and(|e| e == "bin") {
        let dir = model_path.parent().unwrap_or(Path::new("."));
        let is_tokenizer_file = |p: &Path| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name == "tokenizer.bin"
                || (name.starts_with("tok") && name[3..].trim_end_matches(".bin").parse::<u32>().is_ok())
        };
        if is_tokenizer_file(model_path) {
            return Ok((Tokenizer::from_llama2c_file(model_path)?, None));
        }
        let mut candidates: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_tokenizer_file(p))
            .collect();
        candidates.sort();
        return match candidates.first() {
            Some(p) => Ok((Tokenizer::from_llama2c_file(p)?, None)),
            None => Err(Error::invalid(
                model_path.display().to_string(),
                format!(
                    "no llama2.c tokenizer beside it: expected tokenizer.bin or tok<N>.bin in {}",
                    dir.display()
                ),
            )),
        };
    }
    if model_path.file_name().is_some_and(|n| n == "tokenizer.json") {
        let dir = model_path.parent().unwrap_or(Path::new("."));
        return load_tokenizer_and_template(dir);
    }
    Err(Error::invalid(
        model_path.display().to_string(),
        "expected a Hugging Face model folder or a llama2.c .bin checkpoint",
    ))
}
