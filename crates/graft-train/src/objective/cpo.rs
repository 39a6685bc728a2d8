//! Contrastive Preference Optimization and its reference-free relatives, as TRL's `CPOTrainer`
//! computes them: `loss_type = sigmoid | hinge | ipo | simpo`, `alpha` ≠ 0 for AlphaPO's reward
//! transform (TRL's `loss_type = "alphapo"` is `simpo` with `cpo_alpha = 0`), plus `cpo_alpha` ×
//! the NLL of the chosen completions. `method = "simpo"` is this objective with `loss_type = simpo`.
//!
//! The policy alone is compared (no reference): `logits = c − r` with the summed completion
//! log-probs, or their per-token averages for `ipo` and `simpo`; rewards are `β·c` and `β·r` (or
//! `β` × AlphaPO's rewards); the NLL is the mean over every chosen completion token of the
//! micro-batch, as TRL's cross-entropy over the chosen rows.

use super::ad::{Ad, mean};
use super::pairs::{PairLogps, PairLoss, PairLossOutput};

/// CPO's loss types (`CPOConfig.loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpoLossType {
    /// `−log σ(β·logits)`, label-smoothed.
    Sigmoid,
    /// `relu(1 − β·logits)`.
    Hinge,
    /// `(logits − 1/(2β))²` on averaged log-probs.
    Ipo,
    /// SimPO: `−log σ(β·(logits − γ/β))` on averaged log-probs, label-smoothed.
    Simpo,
}

impl CpoLossType {
    /// The loss type TRL calls `name` (`alphapo` is `simpo`).
    pub fn from_name(name: &str) -> Option<CpoLossType> {
        Some(match name {
            "sigmoid" => CpoLossType::Sigmoid,
            "hinge" => CpoLossType::Hinge,
            "ipo" => CpoLossType::Ipo,
            "simpo" | "alphapo" => CpoLossType::Simpo,
            _ => return None,
        })
    }
}

/// The CPO hyperparameters (TRL's `CPOConfig` names and defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct CpoParams {
    /// `beta` (0.1).
    pub beta: f64,
    /// `loss_type` (sigmoid).
    pub loss_type: CpoLossType,
    /// `cpo_alpha` (1.0; 0 for SimPO / AlphaPO): the weight of the chosen NLL.
    pub cpo_alpha: f64,
    /// `simpo_gamma` (0.5): SimPO's target margin.
    pub simpo_gamma: f64,
    /// `alpha` (0.0): AlphaPO's reward shape; 0 = log-prob rewards.
    pub alpha: f64,
    /// `label_smoothing` (0.0).
    pub label_smoothing: f64,
}

impl Default for CpoParams {
    fn default() -> Self {
        CpoParams {
            beta: 0.1,
            loss_type: CpoLossType::Sigmoid,
            cpo_alpha: 1.0,
            simpo_gamma: 0.5,
            alpha: 0.0,
            label_smoothing: 0.0,
        }
    }
}

impl PairLoss for CpoParams {
    fn pair_loss(&self, pairs: &[PairLogps]) -> PairLossOutput {
        let p = pairs.len();
        let n = 2 * p;
        let (beta, eps) = (self.beta, self.label_smoothing);
        let averaged = matches!(self.loss_type, CpoLossType::Ipo | CpoLossType::Simpo);
        let logp = |i: usize, chosen: bool| {
            let x = &pairs[i];
            let (v, slot, len) = if chosen {
                (x.chosen, i, x.chosen_tokens)
            } else {
                (x.rejected, p + i, x.rejected_tokens)
            };
            let a = Ad::input(v, slot, n);
            if averaged {
                a.scale(1.0 / len.max(1) as f64)
            } else {
                a
            }
        };
        // AlphaPO: r = (1 − p^(−α)) / α with p = exp(logp).
        let reward_of = |l: &Ad| {
            if self.alpha != 0.0 {
                l.scale(-self.alpha)
                    .exp()
                    .scale(-1.0)
                    .offset(1.0)
                    .scale(1.0 / self.alpha)
            } else {
                l.clone()
            }
        };
        let mut losses = Vec::with_capacity(p);
        let (mut rc_sum, mut rr_sum, mut acc, mut c_sum, mut r_sum) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for i in 0..p {
            let (c, r) = (logp(i, true), logp(i, false));
            let (rc, rr) = (reward_of(&c), reward_of(&r));
            let mut logits = rc.sub(&rr);
            let smoothed = |l: &Ad| {
                let bl = l.scale(beta);
                bl.log_sigmoid()
                    .scale(-(1.0 - eps))
                    .sub(&bl.scale(-1.0).log_sigmoid().scale(eps))
            };
            losses.push(match self.loss_type {
                CpoLossType::Simpo => {
                    logits = logits.offset(-self.simpo_gamma / beta);
                    smoothed(&logits)
                }
                CpoLossType::Sigmoid => smoothed(&logits),
                CpoLossType::Hinge => logits.scale(-beta).offset(1.0).relu(),
                CpoLossType::Ipo => logits.offset(-1.0 / (2.0 * beta)).square(),
            });
            let (bc, br) = (beta * rc.v, beta * rr.v);
            rc_sum += bc;
            rr_sum += br;
            acc += if bc > br { 1.0 } else { 0.0 };
            c_sum += c.v;
            r_sum += r.v;
        }
        let mut total = mean(&losses, n);
        // NLL of the chosen completions: the mean over all their tokens in the batch.
        let tokens: usize = pairs.iter().map(|x| x.chosen_tokens).sum();
        let mut nll = Ad::constant(0.0, n);
        for (i, x) in pairs.iter().enumerate() {
            nll = nll.add(&Ad::input(x.chosen, i, n));
        }
        let nll = nll.scale(-1.0 / tokens.max(1) as f64);
        if self.cpo_alpha != 0.0 {
            total = total.add(&nll.scale(self.cpo_alpha));
        }
        let m = p.max(1) as f64;
        PairLossOutput {
            loss: total.v,
            d_chosen: total.g[..p].to_vec(),
            d_rejected: total.g[p..].to_vec(),
            d_chosen_all: Vec::new(),
            metrics: vec![
                ("rewards/chosen", rc_sum / m),
                ("rewards/rejected", rr_sum / m),
                ("rewards/accuracies", acc / m),
                ("rewards/margins", (rc_sum - rr_sum) / m),
                ("logps/chosen", c_sum / m),
                ("logps/rejected", r_sum / m),
                ("nll_loss", if self.cpo_alpha != 0.0 { nll.v } else { 0.0 }),
            ],
        }
    }
}
