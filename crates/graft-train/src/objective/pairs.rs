//! What every pairwise preference objective shares: the pairs of a packed micro-batch, their
//! summed completion log-probs, and the [`Objective`] that turns a [`PairLoss`] (DPO, CPO/SimPO,
//! ORPO) into `d_logp`: a sequence's tokens all get the loss's derivative w.r.t. that
//! sequence's summed log-prob (averages and NLL terms are functions of the sums and token counts).

use super::{Contribution, Objective};
use graft_kernels::{Cpu, IGNORE_INDEX};
use graft_model::model::Model;
use graft_model::train::{Batch, Grads, TrainOptions};

/// The summed completion log-probs of one pair under the policy and the reference.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairLogps {
    /// Policy, chosen completion.
    pub chosen: f64,
    /// Policy, rejected completion.
    pub rejected: f64,
    /// Reference, chosen completion.
    pub ref_chosen: f64,
    /// Reference, rejected completion.
    pub ref_rejected: f64,
    /// Completion tokens of the chosen sequence.
    pub chosen_tokens: usize,
    /// Completion tokens of the rejected sequence.
    pub rejected_tokens: usize,
    /// The policy's summed log-prob over every target of the chosen sequence (its prompt too when
    /// the batch trains it, as ORPO's NLL does; else equal to `chosen`).
    pub chosen_all: f64,
    /// Targets of the chosen sequence.
    pub chosen_all_tokens: usize,
}

/// Where a pair sits in a packed micro-batch and its reference log-probs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairSlot {
    /// Sequence id (in the batch's `seq_ids`) of the chosen completion.
    pub chosen_seq: u32,
    /// Sequence id of the rejected completion.
    pub rejected_seq: u32,
    /// The reference's summed log-prob of the chosen completion.
    pub ref_chosen: f64,
    /// The reference's summed log-prob of the rejected completion.
    pub ref_rejected: f64,
}

/// A DPO micro-batch: packed sequences (chosen and rejected of each pair both in it) and where
/// each pair is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairBatch {
    /// The packed tokens; completion tokens have targets (and, for ORPO, the chosen prompts).
    pub batch: Batch,
    /// The pairs in the batch.
    pub pairs: Vec<PairSlot>,
    /// Per token: its target is a completion token (empty: every target is).
    pub completion: Vec<bool>,
}

/// Per sequence id: the sum of the target log-probs and the number of targets.
pub fn sequence_logps(batch: &Batch, logprobs: &[f32]) -> Vec<(f64, usize)> {
    sequence_logps_where(batch, logprobs, |_| true)
}

/// [`sequence_logps`] over the targets at the positions `keep` accepts.
pub fn sequence_logps_where(
    batch: &Batch,
    logprobs: &[f32],
    keep: impl Fn(usize) -> bool,
) -> Vec<(f64, usize)> {
    let n = batch.seq_ids.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut out = vec![(0.0f64, 0usize); n];
    for (t, ((&s, &target), &lp)) in batch.seq_ids.iter().zip(&batch.targets).zip(logprobs).enumerate() {
        if target != IGNORE_INDEX && target >= 0 && keep(t) {
            let e = &mut out[s as usize];
            e.0 += lp as f64;
            e.1 += 1;
        }
    }
    out
}

/// A pairwise preference loss over a micro-batch's pairs.
pub trait PairLoss {
    /// The micro-batch loss (TRL's: a mean over pairs plus any batch-level term), its derivative
    /// w.r.t. each pair's summed chosen and rejected log-probs, and TRL's metrics for the batch
    /// (means).
    fn pair_loss(&self, pairs: &[PairLogps]) -> PairLossOutput;
}

/// What a [`PairLoss`] computes for one micro-batch.
#[derive(Clone, Debug, PartialEq)]
pub struct PairLossOutput {
    /// The batch loss.
    pub loss: f64,
    /// `∂ loss / ∂ chosen` per pair.
    pub d_chosen: Vec<f64>,
    /// `∂ loss / ∂ rejected` per pair.
    pub d_rejected: Vec<f64>,
    /// `∂ loss / ∂ chosen_all` per pair (terms over the whole chosen sequence; empty if none).
    pub d_chosen_all: Vec<f64>,
    /// Batch means by TRL's names.
    pub metrics: Vec<(&'static str, f64)>,
}

/// A pairwise preference objective: its unit is the pair.
#[derive(Clone, Debug, Default)]
pub struct PairObjective<L> {
    /// The loss.
    pub loss: L,
}

impl<L: PairLoss> PairObjective<L> {
    fn pair_logps(batch: &PairBatch, logprobs: &[f32]) -> Vec<PairLogps> {
        let all = sequence_logps(&batch.batch, logprobs);
        let completion = if batch.completion.is_empty() {
            all.clone()
        } else {
            sequence_logps_where(&batch.batch, logprobs, |t| batch.completion[t])
        };
        batch
            .pairs
            .iter()
            .map(|s| {
                let (c, nc) = completion[s.chosen_seq as usize];
                let (r, nr) = completion[s.rejected_seq as usize];
                let (ca, nca) = all[s.chosen_seq as usize];
                PairLogps {
                    chosen: c,
                    rejected: r,
                    ref_chosen: s.ref_chosen,
                    ref_rejected: s.ref_rejected,
                    chosen_tokens: nc,
                    rejected_tokens: nr,
                    chosen_all: ca,
                    chosen_all_tokens: nca,
                }
            })
            .collect()
    }
}

impl<L: PairLoss> Objective for PairObjective<L> {
    type Batch = PairBatch;

    fn forward_backward(
        &mut self,
        model: &Model<Cpu>,
        batch: &PairBatch,
        grads: &mut Grads<Cpu>,
        opts: TrainOptions,
    ) -> Contribution {
        let (out, pending) = model.forward_for_backward(&batch.batch, opts);
        let pairs = Self::pair_logps(batch, &out.logprobs);
        let loss = self.loss.pair_loss(&pairs);
        // loss_sum = P · loss, so each sequence's tokens get P · ∂loss/∂(its summed log-prob).
        let units = pairs.len() as f64;
        let n_seq = batch
            .batch
            .seq_ids
            .iter()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        // Per sequence: the derivative for its completion tokens, and for every target.
        let mut per_seq = vec![(0.0f64, 0.0f64); n_seq];
        for (i, s) in batch.pairs.iter().enumerate() {
            let all = loss.d_chosen_all.get(i).copied().unwrap_or(0.0);
            per_seq[s.chosen_seq as usize] = (units * loss.d_chosen[i], units * all);
            per_seq[s.rejected_seq as usize] = (units * loss.d_rejected[i], 0.0);
        }
        let d_logp: Vec<f32> = batch
            .batch
            .seq_ids
            .iter()
            .enumerate()
            .map(|(t, &s)| {
                let (completion, all) = per_seq[s as usize];
                let is_completion = batch.completion.get(t).copied().unwrap_or(true);
                (all + if is_completion { completion } else { 0.0 }) as f32
            })
            .collect();
        model.backward(&batch.batch, pending, grads, &d_logp);
        Contribution::from_means(loss.loss, &loss.metrics, pairs.len(), out.num_trained)
    }

    fn evaluate(&self, model: &Model<Cpu>, batch: &PairBatch, opts: TrainOptions) -> Contribution {
        let out = model.forward_logprobs_with(&batch.batch, opts);
        let pairs = Self::pair_logps(batch, &out.logprobs);
        {
            let loss = self.loss.pair_loss(&pairs);
            Contribution::from_means(loss.loss, &loss.metrics, pairs.len(), out.num_trained)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Three pairs with mixed margins and lengths (no ties or kinks).
    pub(crate) fn pairs() -> Vec<PairLogps> {
        [
            (-12.0, -15.5, -13.0, -14.0, 5, 7),
            (-30.2, -22.1, -29.0, -25.0, 11, 9),
            (-8.4, -8.3, -9.5, -7.0, 3, 4),
        ]
        .iter()
        .map(|&(c, r, rc, rr, nc, nr)| PairLogps {
            chosen: c,
            rejected: r,
            ref_chosen: rc,
            ref_rejected: rr,
            chosen_tokens: nc,
            rejected_tokens: nr,
            chosen_all: c,
            chosen_all_tokens: nc,
        })
        .collect()
    }

    /// Checks a loss's gradient against central differences of its value.
    pub(crate) fn check_gradients(loss: &impl PairLoss, what: &str) {
        let base = pairs();
        let got = loss.pair_loss(&base);
        let h = 1e-6;
        for i in 0..base.len() {
            for chosen in [true, false] {
                let at = |d: f64| {
                    let mut p = base.clone();
                    if chosen {
                        p[i].chosen += d;
                    } else {
                        p[i].rejected += d;
                    }
                    loss.pair_loss(&p).loss
                };
                let num = (at(h) - at(-h)) / (2.0 * h);
                let ad = if chosen {
                    got.d_chosen[i]
                } else {
                    got.d_rejected[i]
                };
                // Central differences lose ~ε·|loss|/h to rounding (AlphaPO's rewards are large).
                let tol = 1e-6 * (1.0 + num.abs()) + 4.0 * f64::EPSILON * got.loss.abs() / h;
                assert!(
                    (num - ad).abs() < tol,
                    "{what} pair {i} chosen={chosen}: {num} vs {ad}"
                );
            }
        }
    }

    #[test]
    fn cpo_and_orpo_gradients_match_finite_differences() {
        use crate::objective::cpo::{CpoLossType, CpoParams};
        for loss_type in [
            CpoLossType::Sigmoid,
            CpoLossType::Hinge,
            CpoLossType::Ipo,
            CpoLossType::Simpo,
        ] {
            for alpha in [0.0, 0.5] {
                let p = CpoParams {
                    beta: 0.5,
                    loss_type,
                    alpha,
                    label_smoothing: 0.1,
                    ..Default::default()
                };
                check_gradients(&p, &format!("cpo {loss_type:?} alpha {alpha}"));
            }
        }
        check_gradients(&crate::objective::orpo::OrpoParams { beta: 0.3 }, "orpo");
    }

    #[test]
    fn orpo_log1mexp_is_stable_on_both_branches() {
        use crate::objective::ad::Ad;
        for x in [-30.0, -2.0, -0.7, -0.69, -1e-3] {
            let v = Ad::input(x, 0, 1).log1mexp();
            assert!(
                (v.v - (1.0 - f64::exp(x)).ln()).abs() < 1e-9 * (1.0 + v.v.abs()),
                "{x}"
            );
        }
    }
}
