//! Supervised fine-tuning: the mean next-token cross-entropy over the trained tokens of a step.
//! Its unit is the trained token; `d_logp = −1` on every trained token of a micro-batch, known
//! before the forward, so forward and backward run fused in one pass. Like TRL's SFTTrainer it
//! reports `mean_token_accuracy`: the share of trained tokens whose target is the argmax.

use super::{Contribution, Objective};
use graft_kernels::Cpu;
use graft_model::model::Model;
use graft_model::train::{Batch, Grads, TrainOptions};

/// The SFT objective.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sft;

impl Objective for Sft {
    type Batch = Batch;

    fn forward_backward(
        &mut self,
        model: &Model<Cpu>,
        batch: &Batch,
        grads: &mut Grads<Cpu>,
        opts: TrainOptions,
    ) -> Contribution {
        let out = model.forward_backward(batch, grads, 1.0, opts);
        Contribution {
            loss_sum: out.loss_sum,
            units: out.num_trained as f64,
            tokens: out.num_trained,
            metrics: [("mean_token_accuracy", out.num_correct as f64)].into(),
        }
    }

    fn evaluate(&self, model: &Model<Cpu>, batch: &Batch, opts: TrainOptions) -> Contribution {
        let out = model.forward_logprobs_with(batch, opts);
        Contribution {
            loss_sum: out.loss_sum,
            units: out.num_trained as f64,
            tokens: out.num_trained,
            metrics: [("mean_token_accuracy", out.num_correct as f64)].into(),
        }
    }
}
