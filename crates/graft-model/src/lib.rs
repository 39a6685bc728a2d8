//! graft-model: decoder-only transformer architectures, their weights, and the engine that runs
//! them — training forward/backward (full fine-tuning and LoRA) and inference with a KV cache.
//!
//! * [`config`] — [`ModelSpec`] from a Hugging Face `config.json`.
//! * [`error`] — [`ModelError`], which always names the file, field or tensor at fault.

pub mod config;
pub mod error;
pub mod generation;
pub mod infer;
pub mod lora;
mod lora_peft;
pub mod model;
pub mod params;
pub mod peft;
pub mod sample;
pub mod shapes;
pub mod train;
pub mod weights;

pub use config::{Architecture, ModelSpec, RopeScaling};
pub use error::ModelError;
