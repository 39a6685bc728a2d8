//! Deterministic random numbers for training: the engine's one RNG, defined in
//! [`graft_kernels::rng`] (xoshiro256** [`Rng`] with its checkpointed [`RngState`], splitmix64,
//! the counter-based [`uniform_at`] / [`dropout_keep`]) and re-exported here for the trainer.

pub use graft_kernels::rng::*;
