//! graft-hub: opening a model, for training and inference alike. A model path — a local Hugging
//! Face folder, a hub id (`org/name[@revision]`, fetched into the Hugging Face cache), a llama.cpp
//! GGUF file or a llama2.c checkpoint — becomes its weights ([`graft_model::weights::LoadedModel`]),
//! its tokenizer and its chat template.
//!
//! * [`hub`] — hub ids → cache snapshots (download, offline reuse, revisions, tokens).
//! * [`open`] — the tokenizer and chat template that belong to a loaded model.

pub mod hub;
pub mod open;

pub use open::{OpenError, load_tokenizer};
