//! Odds Ratio Preference Optimization, as TRL's `ORPOTrainer` computes it: the NLL of the chosen
//! sequences — every target, prompt included, as TRL's labels are the whole chosen sequence (mean
//! over all of them in the micro-batch) — minus `β` × the mean of
//! `log σ(log odds(chosen) − log odds(rejected))`, with per-token-averaged log-probs `ℓ` and
//! `log odds = ℓ − log(1 − e^ℓ)`. No reference. Rewards are `β·ℓ`; TRL logs `log_odds_ratio`
//! (the mean `log σ(…)`) and `log_odds_chosen` (the mean log-odds difference).

use super::ad::{Ad, mean};
use super::pairs::{PairLogps, PairLoss, PairLossOutput};

/// The ORPO hyperparameters (TRL's `ORPOConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct OrpoParams {
    /// `beta` (0.1): the paper's λ, the weight of the odds-ratio term.
    pub beta: f64,
}

impl Default for OrpoParams {
    fn default() -> Self {
        OrpoParams { beta: 0.1 }
    }
}

impl PairLoss for OrpoParams {
    fn pair_loss(&self, pairs: &[PairLogps]) -> PairLossOutput {
        let p = pairs.len();
        let n = 2 * p;
        let beta = self.beta;
        let mut ratios = Vec::with_capacity(p);
        let mut log_odds_all = Vec::with_capacity(p);
        let (mut c_sum, mut r_sum, mut acc) = (0.0, 0.0, 0.0);
        for (i, x) in pairs.iter().enumerate() {
            let c = Ad::input(x.chosen, i, n).scale(1.0 / x.chosen_tokens.max(1) as f64);
            let r = Ad::input(x.rejected, p + i, n).scale(1.0 / x.rejected_tokens.max(1) as f64);
            let log_odds = c.sub(&r).sub(&c.log1mexp().sub(&r.log1mexp()));
            ratios.push(log_odds.log_sigmoid());
            log_odds_all.push(log_odds.v);
            c_sum += c.v;
            r_sum += r.v;
            acc += if beta * c.v > beta * r.v { 1.0 } else { 0.0 };
        }
        // The NLL covers every target of the chosen sequences (TRL's ORPO trains the prompt too):
        // its derivative w.r.t. each pair's `chosen_all` is the same constant.
        let tokens: usize = pairs.iter().map(|x| x.chosen_all_tokens).sum();
        let nll = -pairs.iter().map(|x| x.chosen_all).sum::<f64>() / tokens.max(1) as f64;
        let ratio = mean(&ratios, n);
        let total = ratio.scale(-beta).offset(nll);
        let m = p.max(1) as f64;
        PairLossOutput {
            loss: total.v,
            d_chosen: total.g[..p].to_vec(),
            d_rejected: total.g[p..].to_vec(),
            d_chosen_all: vec![-1.0 / tokens.max(1) as f64; p],
            metrics: vec![
                ("rewards/chosen", beta * c_sum / m),
                ("rewards/rejected", beta * r_sum / m),
                ("rewards/accuracies", acc / m),
                ("rewards/margins", beta * (c_sum - r_sum) / m),
                ("logps/chosen", c_sum / m),
                ("logps/rejected", r_sum / m),
                ("nll_loss", nll),
                ("log_odds_ratio", ratio.v),
                ("log_odds_chosen", log_odds_all.iter().sum::<f64>() / m),
            ],
        }
    }
}
