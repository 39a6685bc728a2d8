//! Reward modelling (`method = "reward"`), as TRL's `RewardTrainer`: a Bradley–Terry loss on the
//! scalar scores a `score` head reads from the final hidden state of prompt + chosen and
//! prompt + rejected,
//!
//! `loss = −mean log σ(r_c − r_r − margin) + center_rewards_coefficient · mean (r_c + r_r)²`
//!
//! over the pairs (the margin column is optional; the centring term only with a coefficient).
//! A sequence's score is read where Hugging Face's `*ForSequenceClassification` reads it: at the
//! last token that is not the padding id (so with EOS as the pad token, the token before the
//! trailing EOS). Metrics by TRL's names: `accuracy` (strict `r_c > r_r`), `margin` (mean
//! `r_c − r_r`, without the margin column), `min_reward`, `mean_reward`, `max_reward`.

use super::{Contribution, Objective};
use graft_kernels::Cpu;
use graft_model::model::Model;
use graft_model::train::{Batch, Grads, TrainOptions};

/// The reward loss's parameters (`[reward]`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RewardParams {
    /// Weight of the `mean (r_c + r_r)²` term that keeps rewards centred on 0 (`None`: off).
    pub center_rewards_coefficient: Option<f64>,
}

/// Where one pair's two scores are read in a packed micro-batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RewardSlot {
    /// Token index (in the packed batch) the chosen sequence's score is read at.
    pub chosen_at: usize,
    /// Token index the rejected sequence's score is read at.
    pub rejected_at: usize,
    /// The pair's `margin` column (0 without one).
    pub margin: f64,
}

/// A reward-model micro-batch: the packed chosen and rejected sequences and where each pair's
/// scores are read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RewardBatch {
    /// The packed tokens (no targets: the LM head is not used).
    pub batch: Batch,
    /// The pairs in the batch.
    pub pairs: Vec<RewardSlot>,
}

impl RewardBatch {
    /// Token positions of every score: chosen of each pair, then rejected of each pair.
    fn positions(&self) -> Vec<usize> {
        self.pairs
            .iter()
            .map(|p| p.chosen_at)
            .chain(self.pairs.iter().map(|p| p.rejected_at))
            .collect()
    }
}

/// Where a sequence's score is read, as `*ForSequenceClassification` does: the offset (within
/// `ids`) of the last token that is not `pad_id`, or 0 when every token is padding.
pub fn score_position(ids: &[u32], pad_id: Option<u32>) -> usize {
    ids.iter().rposition(|&t| Some(t) != pad_id).unwrap_or(0)
}

/// The loss, its derivative with respect to each score, and the metrics of one micro-batch.
#[derive(Clone, Debug, PartialEq)]
pub struct RewardLoss {
    /// The mean loss over the pairs.
    pub loss: f64,
    /// `∂loss/∂r_c` per pair.
    pub d_chosen: Vec<f64>,
    /// `∂loss/∂r_r` per pair.
    pub d_rejected: Vec<f64>,
    /// TRL's metrics for this batch.
    pub metrics: Vec<(&'static str, f64)>,
}

/// The reward loss of pairs with scores `chosen[i]`, `rejected[i]` and margins `margin[i]`.
pub fn reward_loss(params: &RewardParams, chosen: &[f64], rejected: &[f64], margin: &[f64]) -> RewardLoss {
    let n = chosen.len().max(1) as f64;
    let (mut loss, mut d_chosen, mut d_rejected) = (0.0, Vec::new(), Vec::new());
    let (mut correct, mut diff) = (0.0, 0.0);
    for ((&c, &r), &m) in chosen.iter().zip(rejected).zip(margin) {
        let z = c - r - m;
        // −log σ(z) = softplus(−z), computed stably; d/dz = −σ(−z).
        loss += (-z).max(0.0) + (-z.abs()).exp().ln_1p();
        let d = -sigmoid(-z) / n;
        let (mut dc, mut dr) = (d, -d);
        if let Some(coef) = params.center_rewards_coefficient {
            loss += coef * (c + r).powi(2);
            let dcenter = 2.0 * coef * (c + r) / n;
            dc += dcenter;
            dr += dcenter;
        }
        d_chosen.push(dc);
        d_rejected.push(dr);
        correct += f64::from(u8::from(c > r));
        diff += c - r;
    }
    let all = chosen.iter().chain(rejected);
    let min = all.clone().copied().fold(f64::INFINITY, f64::min);
    let max = all.clone().copied().fold(f64::NEG_INFINITY, f64::max);
    let mean = all.sum::<f64>() / (2.0 * n);
    RewardLoss {
        loss: loss / n,
        d_chosen,
        d_rejected,
        metrics: vec![
            ("accuracy", correct / n),
            ("margin", diff / n),
            ("min_reward", min),
            ("mean_reward", mean),
            ("max_reward", max),
        ],
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The reward-model objective (units: pairs).
#[derive(Clone, Debug, Default)]
pub struct Reward {
    /// The loss's parameters.
    pub params: RewardParams,
}

impl Reward {
    fn loss(&self, batch: &RewardBatch, scores: &[f32]) -> RewardLoss {
        let n = batch.pairs.len();
        let s: Vec<f64> = scores.iter().map(|&x| x as f64).collect();
        let margins: Vec<f64> = batch.pairs.iter().map(|p| p.margin).collect();
        reward_loss(&self.params, &s[..n], &s[n..], &margins)
    }
}

impl Objective for Reward {
    type Batch = RewardBatch;

    fn forward_backward(
        &mut self,
        model: &Model<Cpu>,
        batch: &RewardBatch,
        grads: &mut Grads<Cpu>,
        opts: TrainOptions,
    ) -> Contribution {
        let positions = batch.positions();
        let (scores, pending) = model.forward_for_scores(&batch.batch, &positions, opts);
        let loss = self.loss(batch, &scores);
        // loss_sum = P · loss, so each score gets P · ∂loss/∂score.
        let units = batch.pairs.len() as f64;
        let d_scores: Vec<f32> = loss
            .d_chosen
            .iter()
            .chain(&loss.d_rejected)
            .map(|d| (units * d) as f32)
            .collect();
        model.backward_scores(&batch.batch, pending, grads, &positions, &d_scores);
        Contribution::from_means(loss.loss, &loss.metrics, batch.pairs.len(), batch.batch.len())
    }

    fn evaluate(&self, model: &Model<Cpu>, batch: &RewardBatch, opts: TrainOptions) -> Contribution {
        let scores = model.forward_scores(&batch.batch, &batch.positions(), opts);
        let loss = self.loss(batch, &scores);
        Contribution::from_means(loss.loss, &loss.metrics, batch.pairs.len(), batch.batch.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_match_finite_differences() {
        let params = RewardParams {
            center_rewards_coefficient: Some(0.05),
        };
        let (c, r, m) = (vec![0.3, -1.2, 2.0], vec![0.1, 0.4, 2.5], vec![0.5, 0.0, -0.2]);
        let base = reward_loss(&params, &c, &r, &m);
        let h = 1e-6;
        for i in 0..3 {
            let mut c2 = c.clone();
            c2[i] += h;
            let num = (reward_loss(&params, &c2, &r, &m).loss - base.loss) / h;
            assert!(
                (num - base.d_chosen[i]).abs() < 1e-5,
                "{num} vs {}",
                base.d_chosen[i]
            );
            let mut r2 = r.clone();
            r2[i] += h;
            let num = (reward_loss(&params, &c, &r2, &m).loss - base.loss) / h;
            assert!((num - base.d_rejected[i]).abs() < 1e-5);
        }
    }

    #[test]
    fn accuracy_is_strict_and_positions_skip_padding() {
        let l = reward_loss(&RewardParams::default(), &[1.0, 2.0], &[1.0, 1.0], &[0.0, 0.0]);
        assert_eq!(l.metrics[0], ("accuracy", 0.5));
        assert_eq!(score_position(&[1, 5, 6, 2], Some(0)), 3);
        assert_eq!(score_position(&[1, 5, 6, 2], Some(2)), 2);
        assert_eq!(score_position(&[2, 2], Some(2)), 0);
        assert_eq!(score_position(&[1, 5], None), 1);
    }
}
