//! graft-train: everything around the engine that a training run needs.
//!
//! The engine (`graft-model`, `graft-kernels`) computes a loss and its gradients for a micro-batch;
//! this crate turns that into a run: the configuration a user writes, the optimizer that updates the
//! weights, the learning-rate schedule, checkpoints that resume bit-identically, the metrics log and
//! the report at the end.
//!
//! # Modules
//! - [`config`]: [`TrainConfig`](config::TrainConfig), the TOML file behind `graft train CONFIG.toml`,
//!   with `--set key=value` overrides, defaults, validation and "did you mean" errors.
//! - [`objective`]: what a step minimises, from per-token log-probs (or a reward model's scores) —
//!   SFT, DPO (every TRL loss type), CPO/SimPO, ORPO, KTO, reward models — and the one
//!   normalisation convention.
//! - [`preference`]: preference, KTO and reward-model runs (pairs, reference log-probs, batches).
//! - [`rl`]: GRPO and RLOO runs (prompts, rollouts on the live weights, advantages, the policy step).
//! - [`reward_fns`]: the reward functions RL scores completions with (math answers, text and regex
//!   matches, formats, length, JSON and JSON Schema, sandboxed code tests).
//! - [`optim`]: AdamW (as `torch.optim.AdamW`), global-norm gradient clipping, non-finite checks.
//! - [`schedule`]: learning-rate schedules as in transformers (cosine / linear / constant with
//!   warmup, optional floor).
//! - [`rng`]: the deterministic RNG (xoshiro256**) for shuffling and the counter-based
//!   [`uniform_at`](rng::uniform_at) for dropout masks.
//! - [`tensors`]: named `f32` tensors in safetensors files, exact round trip.
//! - [`checkpoint`]: atomic checkpoint directories with a hashed manifest, the trainer state, finding
//!   the latest good checkpoint, retention.
//! - [`metrics`]: the append-only `metrics.jsonl` log and its reader.
//! - [`report`]: `report.md` and the `loss_curve.svg` it embeds.
//! - [`signal`]: the Ctrl-C / SIGTERM flag the loop polls to save and stop cleanly.
//!
//! # How a run uses it
//! ```text
//! cfg = TrainConfig::load(path, &sets)?            resolved + validated; cfg.save(run_dir)
//! stop = StopFlag::install()?                      polled once per optimizer step
//! sched = LrSchedule::from_config(&cfg.schedule, cfg.optimizer.lr, total_steps)
//! opt = AdamW::new((&cfg.optimizer).into())        or AdamW::read_state_file(..) on resume
//! per step:
//!   micro-batches -> objective.forward_backward: summed-loss gradients, in its units
//!   scale_grads(grads, 1 / units_of_step)                    tokens (SFT), pairs (DPO)
//!   norm = clip_grad_norm(grads, cfg.batch.max_grad_norm)   non-finite: stop, keep last checkpoint
//!   opt.step(params, sched.lr_at(step))?
//!   MetricsWriter::append(record)                  every train.log_every steps
//!   CheckpointWriter::begin/write_*/commit, prune_checkpoints   every train.save_every steps
//! write_report(run_dir, &facts, &read_metrics(..)?)
//! ```
//!
//! # Run directory
//! ```text
//! RUN_DIR/
//!   config.toml                  resolved config (TrainConfig::save)
//!   metrics.jsonl                one JSON object per log line (metrics)
//!   report.md, loss_curve.svg    written at the end, and on a clean stop (report)
//!   adapter/                     the final adapter in PEFT's layout (written by graft-model)
//!   checkpoints/step-N/          manifest.json, trainer_state.json, optimizer.safetensors,
//!                                adapter.safetensors or model.safetensors (checkpoint)
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod export;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod plan;
pub mod preference;
pub mod report;
pub mod reward_fns;
pub mod rl;
pub mod rng;
pub mod schedule;
pub mod sft;
pub mod signal;
pub mod tensors;
