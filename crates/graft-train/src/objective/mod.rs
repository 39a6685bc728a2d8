//! Training objectives: what an optimizer step minimises, as a function of the per-token
//! log-probs the engine computes. One file per objective; the trainer loop knows none of them.
//!
//! # The normalisation convention (the one place it is defined)
//! An objective counts its loss in *units* — trained tokens for SFT, preference pairs for DPO.
//! For each micro-batch it returns a [`Contribution`]: `loss_sum`, the sum of its loss over the
//! units of that micro-batch, and `units`; and it accumulates `∂ loss_sum / ∂θ` into the gradient
//! buffers (through the engine's per-token `d_logp`, see `graft_model::train`). The trainer then
//! divides the accumulated gradients and the summed loss by the units of the whole optimizer step,
//! so the step minimises the mean over its units however they are split into micro-batches (the
//! token-level mean of SFT, the mean over pairs of DPO). Metrics are summed over units the same
//! way and reported as means.
//!
//! # Adding an objective
//! Write a type that implements [`Objective`] in a new file here: its `Batch` (what one
//! micro-batch carries besides the tokens), `forward_backward` (usually
//! `Model::forward_for_backward`, the loss and its `d_logp` from the log-probs, then
//! `Model::backward`) and `evaluate`.

pub(crate) mod ad;
pub mod cpo;
pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod orpo;
pub mod pairs;
pub mod reward;
pub mod sft;

use graft_kernels::Cpu;
use graft_model::model::Model;
use graft_model::train::{Grads, TrainOptions};
use std::collections::BTreeMap;

/// One micro-batch's share of a step, in the objective's units.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Contribution {
    /// The loss summed over this micro-batch's units.
    pub loss_sum: f64,
    /// How many units (tokens, pairs) the micro-batch holds.
    pub units: f64,
    /// Trained tokens (for throughput).
    pub tokens: usize,
    /// Metrics summed over the units, by TRL's names (`rewards/chosen`, …); reported as means.
    pub metrics: BTreeMap<&'static str, f64>,
}

impl Contribution {
    /// The contribution of a micro-batch whose objective reports means over its `units`: TRL's
    /// per-batch `loss` and `metrics`, turned into sums.
    pub fn from_means(
        loss: f64,
        metrics: &[(&'static str, f64)],
        units: usize,
        tokens: usize,
    ) -> Contribution {
        let units = units as f64;
        Contribution {
            loss_sum: loss * units,
            units,
            tokens,
            metrics: metrics.iter().map(|&(k, v)| (k, v * units)).collect(),
        }
    }

    /// Adds another micro-batch's contribution.
    pub fn add(&mut self, other: &Contribution) {
        self.loss_sum += other.loss_sum;
        self.units += other.units;
        self.tokens += other.tokens;
        for (k, v) in &other.metrics {
            *self.metrics.entry(k).or_insert(0.0) += v;
        }
    }

    /// The mean loss per unit (`None` without units).
    pub fn mean_loss(&self) -> Option<f64> {
        (self.units > 0.0).then(|| self.loss_sum / self.units)
    }

    /// Each metric's mean per unit.
    pub fn mean_metrics(&self) -> BTreeMap<String, f64> {
        let n = self.units.max(1.0);
        self.metrics.iter().map(|(k, v)| (k.to_string(), v / n)).collect()
    }
}

/// A training objective over micro-batches of type [`Objective::Batch`].
pub trait Objective {
    /// One micro-batch: the packed tokens plus whatever the loss needs to know about them.
    type Batch;

    /// Micro-batches per optimizer step, when the objective decides it (`None`: the config's
    /// `batch.grad_accum`). RL returns 1: its batch is a whole generation batch.
    fn micro_batches_per_step(&self) -> Option<usize> {
        None
    }

    /// What must survive a resume besides the weights and the optimizer (RL: the completions of
    /// a generation batch that later steps still train on); saved in each checkpoint.
    fn state(&self) -> Option<serde_json::Value> {
        None
    }

    /// Restores what [`Objective::state`] saved.
    fn restore(&mut self, _state: serde_json::Value) -> Result<(), String> {
        Ok(())
    }

    /// Whether a zero gradient for many steps means the run collapsed (true for losses on fixed
    /// data). RL returns false: a batch whose groups all scored alike has no advantage and
    /// rightly no gradient.
    fn zero_gradient_is_collapse(&self) -> bool {
        true
    }

    /// Work a micro-batch needs before its forward that may fail on user input: RL samples and
    /// scores its completions here (a reward function that cannot score a sample stops the run
    /// with the sample's place). Runs before every [`Objective::forward_backward`].
    fn prepare_step(
        &mut self,
        _model: &Model<Cpu>,
        _batch: &Self::Batch,
        _opts: TrainOptions,
    ) -> Result<(), String> {
        Ok(())
    }

    /// Forward and backward of one micro-batch: accumulates `∂ loss_sum / ∂θ` into `grads`.
    fn forward_backward(
        &mut self,
        model: &Model<Cpu>,
        batch: &Self::Batch,
        grads: &mut Grads<Cpu>,
        opts: TrainOptions,
    ) -> Contribution;

    /// The same quantities without gradients (evaluation).
    fn evaluate(&self, model: &Model<Cpu>, batch: &Self::Batch, opts: TrainOptions) -> Contribution;
}
