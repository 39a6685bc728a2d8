//! graft-hub: opening a model, for training and inference alike. A model path — a local Hugging
//! Face folder, a hub id (`org/name[@revision]`, fetched into the Hugging Face cache), a llama.cpp
//! GGUF file or a llama2.c checkpoint — becomes its weights ([`graft_model::weights::LoadedModel`]),
//! its tokenizer and its chat template; `ollama:NAME[:TAG]` opens a model in Ollama's store.
//!
//! * [`hub`] — hub ids → cache snapshots (download, offline reuse, revisions, tokens).
//! * [`ollama`] — `ollama:NAME[:TAG]` → the GGUF blob in Ollama's local store.
//! * [`open`] — the tokenizer and chat template that belong to a loaded model.

pub mod gguf_tokenizer;
pub mod hub;
pub mod ollama;
pub mod open;

pub use open::{OpenError, load_tokenizer};
