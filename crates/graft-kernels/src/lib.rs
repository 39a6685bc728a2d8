//! graft-kernels: the numeric ops of the engine, forward and backward, per device.
//!
//! Every op is a pair of functions (`*_forward` / `*_backward`) over explicit buffers, written
//! out by hand and tested against finite differences here and against PyTorch through the model
//! fixtures in `graft-model`. [`cpu`] holds the CPU implementations; [`Backend`] is the device
//! seam the model code is written against, so a CUDA backend can be added without touching it;
//! [`types`] holds what crosses the seam (precision, attention shapes, cross-entropy outputs,
//! the ignore index, the AdamW scalars), so no caller needs to name `cpu::`.

pub mod backend;
pub mod cpu;
pub mod profile;
pub mod quant;
pub mod rng;
pub mod types;

pub use backend::{Backend, CachedSeq, Cpu, LoraRows};
pub use cpu::matmul::{Weight, WeightData};
pub use types::{
    AdamWScalars, AdamWTensor, AttentionShape, CrossEntropyOutput, IGNORE_INDEX, OPTIM_CHUNK, Precision,
    segments_from_seq_ids,
};
