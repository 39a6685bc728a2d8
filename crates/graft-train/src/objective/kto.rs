//! Kahneman–Tversky Optimization on unpaired, labelled completions, as TRL's `KTOTrainer`
//! computes it (`loss_type = kto | apo_zero_unpaired`).
//!
//! Its unit is the example. A micro-batch holds `B` (prompt, completion, label) examples in data
//! order (KTO batches are not shuffled) and, for `kto`, the KL estimate's mismatched sequences:
//! prompt `i` with the completion of example `i − 1` (the first takes the last), TRL's rotation.
//! With `ℓ = c − c_ref` a completion's log-ratio and `z = max(0, mean(KL_policy − KL_ref))`
//! (detached), a desirable example's loss is `1 − σ(β(ℓ − z))`, an undesirable one's
//! `1 − σ(β(z − ℓ))`, weighted by `desirable_weight` / `undesirable_weight`; the batch loss is
//! their mean. `apo_zero_unpaired`: `1 − σ(βℓ)` and `σ(βℓ)`, no KL.

use super::ad::Ad;
use super::pairs::sequence_logps;
use super::{Contribution, Objective};
use graft_kernels::Cpu;
use graft_model::model::Model;
use graft_model::train::{Batch, Grads, TrainOptions};

/// KTO's loss types (`KTOConfig.loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KtoLossType {
    /// The KTO paper's loss with the batch KL estimate.
    Kto,
    /// APO-zero for unpaired data (no KL).
    ApoZeroUnpaired,
}

/// The KTO hyperparameters (TRL's `KTOConfig` names and defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct KtoParams {
    /// `beta` (0.1).
    pub beta: f64,
    /// `desirable_weight` (1.0).
    pub desirable_weight: f64,
    /// `undesirable_weight` (1.0).
    pub undesirable_weight: f64,
    /// `loss_type` (kto).
    pub loss_type: KtoLossType,
}

impl Default for KtoParams {
    fn default() -> Self {
        KtoParams {
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            loss_type: KtoLossType::Kto,
        }
    }
}

impl KtoParams {
    /// Whether the loss needs the KL sequences.
    pub fn uses_kl(&self) -> bool {
        self.loss_type == KtoLossType::Kto
    }
}

/// One example of a KTO micro-batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KtoSlot {
    /// Its sequence id in the batch.
    pub seq: u32,
    /// Desirable (`true`) or not.
    pub label: bool,
    /// The reference's summed completion log-prob.
    pub ref_logp: f64,
    /// Its KL sequence's id in the KL batch (with `kto`).
    pub kl_seq: u32,
    /// The reference's summed log-prob of the KL sequence's completion.
    pub ref_kl_logp: f64,
}

/// A KTO micro-batch: the examples, and the KL sequences (forward only).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KtoBatch {
    /// The examples' packed tokens (completions trained).
    pub batch: Batch,
    /// The mismatched prompt/completion sequences (empty without KL).
    pub kl_batch: Batch,
    /// The examples.
    pub slots: Vec<KtoSlot>,
}

/// What the KTO loss gives for one micro-batch.
#[derive(Clone, Debug, PartialEq)]
pub struct KtoLoss {
    /// The batch loss (mean over examples).
    pub loss: f64,
    /// `∂ loss / ∂` each example's summed completion log-prob.
    pub d_logp: Vec<f64>,
    /// The KL estimate used (detached, clamped at 0; 0 without KL).
    pub kl: f64,
    /// TRL's metrics (means over the batch's chosen / rejected examples).
    pub metrics: Vec<(&'static str, f64)>,
}

/// TRL's KTO loss over a batch: `logps`, `ref_logps` per example, `kl` the batch estimate.
pub fn kto_loss(params: &KtoParams, labels: &[bool], logps: &[f64], ref_logps: &[f64], kl: f64) -> KtoLoss {
    let n = labels.len();
    let beta = params.beta;
    let mut total = Ad::constant(0.0, n);
    let (mut rc, mut rr, mut lc, mut lr, mut nc, mut nr) = (0.0, 0.0, 0.0, 0.0, 0usize, 0usize);
    for i in 0..n {
        let ratio = Ad::input(logps[i], i, n).offset(-ref_logps[i]);
        let loss = match (params.loss_type, labels[i]) {
            (KtoLossType::Kto, true) => ratio.offset(-kl).scale(beta).sigmoid().scale(-1.0).offset(1.0),
            (KtoLossType::Kto, false) => ratio
                .scale(-1.0)
                .offset(kl)
                .scale(beta)
                .sigmoid()
                .scale(-1.0)
                .offset(1.0),
            (KtoLossType::ApoZeroUnpaired, true) => ratio.scale(beta).sigmoid().scale(-1.0).offset(1.0),
            (KtoLossType::ApoZeroUnpaired, false) => ratio.scale(beta).sigmoid(),
        };
        let w = if labels[i] {
            params.desirable_weight
        } else {
            params.undesirable_weight
        };
        total = total.add(&loss.scale(w));
        if labels[i] {
            rc += beta * ratio.v;
            lc += logps[i];
            nc += 1;
        } else {
            rr += beta * ratio.v;
            lr += logps[i];
            nr += 1;
        }
    }
    let total = total.scale(1.0 / n.max(1) as f64);
    let mut metrics = vec![("kl", kl)];
    if nc > 0 {
        metrics.push(("rewards/chosen", rc / nc as f64));
        metrics.push(("logps/chosen", lc / nc as f64));
    }
    if nr > 0 {
        metrics.push(("rewards/rejected", rr / nr as f64));
        metrics.push(("logps/rejected", lr / nr as f64));
    }
    if nc > 0 && nr > 0 {
        metrics.push(("rewards/margins", rc / nc as f64 - rr / nr as f64));
    }
    KtoLoss {
        loss: total.v,
        d_logp: total.g,
        kl,
        metrics,
    }
}

/// The KTO objective.
#[derive(Clone, Debug, Default)]
pub struct Kto {
    /// Its hyperparameters.
    pub params: KtoParams,
}

impl Kto {
    /// The batch KL estimate: `max(0, mean(policy − reference))` over the KL sequences, detached.
    fn kl(&self, model: &Model<Cpu>, batch: &KtoBatch, opts: TrainOptions) -> f64 {
        if !self.params.uses_kl() || batch.kl_batch.is_empty() {
            return 0.0;
        }
        let forward = TrainOptions {
            lora_dropout: 0.0,
            ..opts
        };
        let out = model.forward_logprobs_with(&batch.kl_batch, forward);
        let seqs = sequence_logps(&batch.kl_batch, &out.logprobs);
        let n = batch.slots.len().max(1) as f64;
        let sum: f64 = batch
            .slots
            .iter()
            .map(|s| seqs[s.kl_seq as usize].0 - s.ref_kl_logp)
            .sum();
        (sum / n).max(0.0)
    }

    fn loss(&self, batch: &KtoBatch, logprobs: &[f32], kl: f64) -> KtoLoss {
        let seqs = sequence_logps(&batch.batch, logprobs);
        let labels: Vec<bool> = batch.slots.iter().map(|s| s.label).collect();
        let logps: Vec<f64> = batch.slots.iter().map(|s| seqs[s.seq as usize].0).collect();
        let refs: Vec<f64> = batch.slots.iter().map(|s| s.ref_logp).collect();
        kto_loss(&self.params, &labels, &logps, &refs, kl)
    }
}

impl Objective for Kto {
    type Batch = KtoBatch;

    fn forward_backward(
        &mut self,
        model: &Model<Cpu>,
        batch: &KtoBatch,
        grads: &mut Grads<Cpu>,
        opts: TrainOptions,
    ) -> Contribution {
        let kl = self.kl(model, batch, opts);
        let (out, pending) = model.forward_for_backward(&batch.batch, opts);
        let loss = self.loss(batch, &out.logprobs, kl);
        let units = batch.slots.len() as f64;
        let n_seq = batch
            .batch
            .seq_ids
            .iter()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        let mut per_seq = vec![0.0f32; n_seq];
        for (i, s) in batch.slots.iter().enumerate() {
            per_seq[s.seq as usize] = (units * loss.d_logp[i]) as f32;
        }
        let d_logp: Vec<f32> = batch.batch.seq_ids.iter().map(|&s| per_seq[s as usize]).collect();
        model.backward(&batch.batch, pending, grads, &d_logp);
        Contribution::from_means(loss.loss, &loss.metrics, batch.slots.len(), out.num_trained)
    }

    fn evaluate(&self, model: &Model<Cpu>, batch: &KtoBatch, opts: TrainOptions) -> Contribution {
        let kl = self.kl(model, batch, opts);
        let out = model.forward_logprobs_with(&batch.batch, opts);
        let loss = self.loss(batch, &out.logprobs, kl);
        Contribution::from_means(loss.loss, &loss.metrics, batch.slots.len(), out.num_trained)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_match_finite_differences() {
        let labels = [true, false, true, false, false];
        let logps = [-12.0, -15.5, -30.2, -22.1, -8.4];
        let refs = [-13.0, -14.0, -29.0, -25.0, -9.5];
        for loss_type in [KtoLossType::Kto, KtoLossType::ApoZeroUnpaired] {
            let p = KtoParams {
                beta: 0.5,
                desirable_weight: 1.33,
                undesirable_weight: 0.9,
                loss_type,
            };
            let got = kto_loss(&p, &labels, &logps, &refs, 0.3);
            for i in 0..labels.len() {
                let at = |d: f64| {
                    let mut l = logps;
                    l[i] += d;
                    kto_loss(&p, &labels, &l, &refs, 0.3).loss
                };
                let num = (at(1e-6) - at(-1e-6)) / 2e-6;
                assert!(
                    (num - got.d_logp[i]).abs() < 1e-7,
                    "{loss_type:?} {i}: {num} vs {}",
                    got.d_logp[i]
                );
            }
        }
    }
}
