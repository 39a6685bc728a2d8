//! The policy-gradient losses of GRPO and RLOO on per-token log-probs, and their advantages —
//! pure functions, checked against TRL's own loss code (`tests/fixtures/grpo_loss`).
//!
//! The trainer side (rollouts, rewards, micro-batches) is [`crate::rl`]; this file only turns
//! log-probs, advantages and masks into a loss, `∂ loss / ∂ log p` per token and TRL's metrics.

use std::collections::BTreeMap;

/// How the per-token losses of a micro-batch are normalised (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossType {
    /// Each completion's token mean, averaged over the micro-batch's completions.
    Grpo,
    /// The token mean over the whole micro-batch.
    Bnpo,
    /// The token sum over `rows × max_completion_length` (Dr. GRPO).
    DrGrpo,
    /// The token sum over the completion tokens of the whole generation batch (DAPO).
    Dapo,
}

impl LossType {
    /// Parses TRL's name.
    pub fn parse(s: &str) -> Option<LossType> {
        Some(match s {
            "grpo" => LossType::Grpo,
            "bnpo" => LossType::Bnpo,
            "dr_grpo" => LossType::DrGrpo,
            "dapo" => LossType::Dapo,
            _ => return None,
        })
    }
}

/// Advantage scaling of GRPO (TRL's `scale_rewards`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleRewards {
    /// By the std of the prompt's group.
    Group,
    /// By the std of the whole generation batch.
    Batch,
    /// Not at all.
    None,
}

/// Where the importance ratio is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportanceLevel {
    /// One ratio per token.
    Token,
    /// One ratio per completion, from its mean token log-ratio (GSPO).
    Sequence,
    /// One ratio per completion, from its summed log-ratio (RLOO's sequence log-probs); with
    /// [`LossType::Grpo`] the loss is the mean over completions of the clipped surrogate. (Both
    /// sequence levels count completions, not tokens, in the clip metrics.)
    SequenceSum,
}

/// The clipped-surrogate loss's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicyLoss {
    /// Normalisation.
    pub loss_type: LossType,
    /// KL coefficient of the in-loss KL term (0: none; RLOO puts its KL in the reward instead).
    pub beta: f64,
    /// Lower clip range.
    pub epsilon_low: f64,
    /// Upper clip range.
    pub epsilon_high: f64,
    /// Upper bound of the unclipped ratio.
    pub delta: Option<f64>,
    /// Ratio per token or per sequence.
    pub level: ImportanceLevel,
    /// Multiply the per-token KL by the importance ratio (TRL's `use_bias_correction_kl`, on by
    /// default there): the KL gradient becomes the unbiased reverse-KL gradient.
    pub bias_correction_kl: bool,
    /// `max_completion_length` (Dr. GRPO's normaliser).
    pub max_completion_length: usize,
}

/// One micro-batch: per completion, its per-token values over its completion tokens.
#[derive(Clone, Copy, Debug)]
pub struct LossInputs<'a> {
    /// Current log-probs `[B][T_i]`.
    pub logp: &'a [Vec<f64>],
    /// Log-probs of the policy that generated (`None`: the current ones, detached — μ = 1).
    pub old: Option<&'a [Vec<f64>]>,
    /// Reference log-probs (needed when `beta > 0`).
    pub reference: Option<&'a [Vec<f64>]>,
    /// One advantage per completion.
    pub advantages: &'a [f64],
    /// 1 for tokens in the loss, 0 for padding / masked completions `[B][T_i]`.
    pub mask: &'a [Vec<f64>],
}

/// What [`PolicyLoss::compute`] returns for a micro-batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LossOutput {
    /// The micro-batch's loss (before any division by gradient accumulation).
    pub loss: f64,
    /// `∂ loss / ∂ logp[b][t]`.
    pub d_logp: Vec<Vec<f64>>,
    /// TRL's metrics over the micro-batch's masked tokens: `kl` (when `beta > 0`),
    /// `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`.
    pub metrics: BTreeMap<&'static str, f64>,
}

impl PolicyLoss {
    /// The factor TRL applies to a micro-batch's loss under gradient accumulation over
    /// `micro_batches`: grpo, bnpo and dr_grpo divide by it; DAPO's normaliser already spans the
    /// whole generation batch.
    pub fn accumulation_scale(&self, micro_batches: usize) -> f64 {
        match self.loss_type {
            LossType::Dapo => 1.0,
            _ => 1.0 / micro_batches.max(1) as f64,
        }
    }

    /// The loss of one micro-batch. `num_items_in_batch` is DAPO's normaliser: the completion
    /// tokens (mask sum) of the whole generation batch.
    pub fn compute(&self, x: &LossInputs<'_>, num_items_in_batch: f64) -> LossOutput {
        let b = x.logp.len();
        let mask_sum: f64 = x.mask.iter().flatten().sum();
        // Normaliser: loss = Σ_b Σ_t w_b · m_bt · ℓ_bt.
        let row_weight = |i: usize| -> f64 {
            match self.loss_type {
                LossType::Grpo => {
                    let n: f64 = x.mask[i].iter().sum();
                    1.0 / (n.max(1.0) * b as f64)
                }
                LossType::Bnpo => 1.0 / mask_sum.max(1.0),
                LossType::DrGrpo => 1.0 / (b as f64 * self.max_completion_length as f64),
                LossType::Dapo => 1.0 / num_items_in_batch,
            }
        };
        let mut out = LossOutput {
            d_logp: x.logp.iter().map(|r| vec![0.0; r.len()]).collect(),
            ..Default::default()
        };
        let (mut kl_sum, mut low, mut high, mut region) = (0.0, 0.0, 0.0, 0.0);
        let lo = 1.0 - self.epsilon_low;
        let hi = 1.0 + self.epsilon_high;
        for i in 0..b {
            let (lp, m, a) = (&x.logp[i], &x.mask[i], x.advantages[i]);
            let old = |t: usize| x.old.map_or(lp[t], |o| o[i][t]);
            let w = row_weight(i);
            let n_tok: f64 = m.iter().sum::<f64>().max(1.0);
            // Log importance weight per token (sequence level: one shared value).
            let lr_sum = (0..lp.len()).map(|t| (lp[t] - old(t)) * m[t]).sum::<f64>();
            let seq_lr = match self.level {
                ImportanceLevel::SequenceSum => lr_sum,
                _ => lr_sum / n_tok,
            };
            // ∂ seq_lr / ∂ lp_t = m_t · this.
            let seq_scale = match self.level {
                ImportanceLevel::SequenceSum => 1.0,
                _ => 1.0 / n_tok,
            };
            // For the sequence level, ∂loss/∂(seq log-weight), accumulated over tokens.
            let mut d_seq = 0.0;
            for t in 0..lp.len() {
                let lr = match self.level {
                    ImportanceLevel::Token => lp[t] - old(t),
                    _ => seq_lr,
                };
                let c = lr.exp();
                // Branch 1: min(c, δ) · A; branch 2: clip(c, lo, hi) · A (torch.clamp passes the
                // gradient on its closed range).
                let (c1, dc1) = match self.delta {
                    Some(d) if c > d => (d, 0.0),
                    _ => (c, 1.0),
                };
                let (c2, dc2) = if c < lo {
                    (lo, 0.0)
                } else if c > hi {
                    (hi, 0.0)
                } else {
                    (c, 1.0)
                };
                let (v1, v2) = (c1 * a, c2 * a);
                // −min(v1, v2); torch.min splits the gradient evenly on ties.
                let (v, dv_dc) = if v1 < v2 {
                    (v1, dc1 * a)
                } else if v2 < v1 {
                    (v2, dc2 * a)
                } else {
                    (v1, 0.5 * (dc1 + dc2) * a)
                };
                let mut loss_t = -v;
                let mut d_lr = -dv_dc * c; // ∂ℓ/∂(log-weight)
                let mut d_lp_direct = 0.0;
                if self.beta != 0.0 {
                    let r = x.reference.expect("reference log-probs with beta > 0")[i][t];
                    let kl = (r - lp[t]).exp() - (r - lp[t]) - 1.0;
                    let d_kl = 1.0 - (r - lp[t]).exp();
                    // With the bias correction the term is c · KL: ∂/∂ log p through KL, and
                    // through c (∂c/∂ log-weight = c).
                    let w_kl = if self.bias_correction_kl { c } else { 1.0 };
                    loss_t += self.beta * w_kl * kl;
                    d_lp_direct += self.beta * w_kl * d_kl;
                    if self.bias_correction_kl {
                        d_lr += self.beta * kl * c;
                    }
                    kl_sum += w_kl * kl * m[t];
                }
                out.loss += w * m[t] * loss_t;
                match self.level {
                    ImportanceLevel::Token => {
                        out.d_logp[i][t] += w * m[t] * (d_lr + d_lp_direct);
                    }
                    _ => {
                        out.d_logp[i][t] += w * m[t] * d_lp_direct;
                        d_seq += w * m[t] * d_lr;
                    }
                }
                let is_low = c < lo && a < 0.0;
                let is_high = c > hi && a > 0.0;
                if self.level == ImportanceLevel::Token {
                    low += f64::from(u8::from(is_low)) * m[t];
                    high += f64::from(u8::from(is_high)) * m[t];
                    region += f64::from(u8::from(is_low || is_high)) * m[t];
                }
            }
            if self.level != ImportanceLevel::Token {
                // One ratio per completion: the clip metrics count completions (as TRL).
                let c = seq_lr.exp();
                let (is_low, is_high) = (c < lo && a < 0.0, c > hi && a > 0.0);
                low += f64::from(u8::from(is_low));
                high += f64::from(u8::from(is_high));
                region += f64::from(u8::from(is_low || is_high));
            }
            if self.level != ImportanceLevel::Token {
                for (d, &mt) in out.d_logp[i].iter_mut().zip(m) {
                    *d += d_seq * mt * seq_scale;
                }
            }
        }
        let denom = mask_sum.max(1.0);
        let clip_denom = match self.level {
            ImportanceLevel::Token => denom,
            _ => b.max(1) as f64,
        };
        if self.beta != 0.0 {
            out.metrics.insert("kl", kl_sum / denom);
        }
        out.metrics.insert("clip_ratio/low_mean", low / clip_denom);
        out.metrics.insert("clip_ratio/high_mean", high / clip_denom);
        out.metrics.insert("clip_ratio/region_mean", region / clip_denom);
        out
    }
}

/// Advantages and reward statistics of a generation batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Advantages {
    /// One per completion.
    pub advantages: Vec<f64>,
    /// The combined reward of each completion (`Σ_f w_f r_f`, before any KL penalty).
    pub rewards: Vec<f64>,
    /// TRL's reward metrics: `reward`, `reward_std`, `frac_reward_zero_std`.
    pub metrics: BTreeMap<&'static str, f64>,
}

/// `Σ_f w_f r_bf`, NaN scores skipped (TRL's `nansum`: a function that returns None for a
/// sample does not count).
pub fn combine_rewards(per_func: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    per_func
        .iter()
        .map(|r| {
            r.iter()
                .zip(weights)
                .map(|(&x, &w)| x * w)
                .filter(|x| !x.is_nan())
                .sum()
        })
        .collect()
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// The unbiased standard deviation (torch's `std`); NaN for fewer than two values.
fn std(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return f64::NAN;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// Mean and unbiased std of the values that are not NaN (TRL's `nanmean` / `nanstd`); NaN for
/// too few values.
pub fn nan_mean_std(x: &[f64]) -> (f64, f64) {
    let v: Vec<f64> = x.iter().copied().filter(|v| !v.is_nan()).collect();
    let m = if v.is_empty() { f64::NAN } else { mean(&v) };
    (m, std(&v))
}

/// GRPO's advantages: each reward minus its group's mean, divided by the group's (or the
/// batch's) std + 1e-4 unless `scale` is [`ScaleRewards::None`]. Completions come grouped:
/// `group` consecutive completions per prompt.
pub fn grpo_advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> Advantages {
    let group = group.max(1);
    let batch_std = std(rewards);
    let mut adv = Vec::with_capacity(rewards.len());
    let mut zero_std = 0usize;
    for g in rewards.chunks(group) {
        let m = mean(g);
        let group_std = std(g);
        let s = match scale {
            ScaleRewards::Batch => batch_std,
            _ => group_std,
        };
        // torch.isclose(std, 0): |std| <= 1e-8.
        if s.abs() <= 1e-8 {
            zero_std += g.len();
        }
        for &r in g {
            let a = r - m;
            adv.push(match scale {
                ScaleRewards::None => a,
                _ => a / (s + 1e-4),
            });
        }
    }
    let n = rewards.len().max(1) as f64;
    let mut metrics = BTreeMap::new();
    metrics.insert("reward", mean(rewards));
    metrics.insert("reward_std", batch_std);
    metrics.insert("frac_reward_zero_std", zero_std as f64 / n);
    Advantages {
        advantages: adv,
        rewards: rewards.to_vec(),
        metrics,
    }
}

/// RLOO's advantages: each reward (less `beta` × its sequence KL to the reference, when given)
/// minus the mean of the other completions of its prompt; normalised over the batch (mean 0,
/// std 1, + 1e-4) when asked.
pub fn rloo_advantages(
    rewards: &[f64],
    group: usize,
    beta: f64,
    sequence_kl: Option<&[f64]>,
    normalize: bool,
) -> Advantages {
    let group = group.max(2);
    let shaped: Vec<f64> = match sequence_kl {
        Some(kl) if beta != 0.0 => rewards.iter().zip(kl).map(|(r, k)| r - beta * k).collect(),
        _ => rewards.to_vec(),
    };
    let mut adv = Vec::with_capacity(rewards.len());
    let mut zero_std = 0usize;
    for g in shaped.chunks(group) {
        let sum: f64 = g.iter().sum();
        let k = g.len() as f64;
        for &r in g {
            adv.push(r - (sum - r) / (k - 1.0).max(1.0));
        }
        // TRL counts zero-std groups of the KL-shaped rewards.
        if std(g).abs() <= 1e-8 {
            zero_std += g.len();
        }
    }
    if normalize {
        let (m, s) = (mean(&adv), std(&adv));
        adv.iter_mut().for_each(|a| *a = (*a - m) / (s + 1e-4));
    }
    let n = rewards.len().max(1) as f64;
    let mut metrics = BTreeMap::new();
    metrics.insert("reward", mean(rewards));
    metrics.insert("reward_std", std(rewards));
    metrics.insert("frac_reward_zero_std", zero_std as f64 / n);
    Advantages {
        advantages: adv,
        rewards: rewards.to_vec(),
        metrics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(loss_type: LossType) -> PolicyLoss {
        PolicyLoss {
            loss_type,
            beta: 0.0,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            delta: None,
            level: ImportanceLevel::Token,
            bias_correction_kl: false,
            max_completion_length: 4,
        }
    }

    #[test]
    fn on_policy_gradient_is_minus_the_advantage_over_the_normaliser() {
        let logp = vec![vec![-1.0, -2.0, -0.5], vec![-0.3, -0.7, 0.0]];
        let mask = vec![vec![1.0, 1.0, 1.0], vec![1.0, 1.0, 0.0]];
        let adv = [0.5, -1.5];
        let x = LossInputs {
            logp: &logp,
            old: None,
            reference: None,
            advantages: &adv,
            mask: &mask,
        };
        // μ = 1: the ratio is 1, the loss is −mean(A) under each normalisation, and the
        // gradient −A · weight.
        let g = loss(LossType::Grpo).compute(&x, 5.0);
        assert!((g.loss - -(0.5 + -1.5) / 2.0).abs() < 1e-12);
        assert!((g.d_logp[0][0] - -0.5 / 6.0).abs() < 1e-12);
        assert!((g.d_logp[1][1] - 1.5 / 4.0).abs() < 1e-12);
        assert_eq!(g.d_logp[1][2], 0.0);
        let d = loss(LossType::Dapo).compute(&x, 10.0);
        assert!((d.loss - -(3.0 * 0.5 + 2.0 * -1.5) / 10.0).abs() < 1e-12);
        let b = loss(LossType::Bnpo).compute(&x, 10.0);
        assert!((b.loss - -(3.0 * 0.5 + 2.0 * -1.5) / 5.0).abs() < 1e-12);
        let r = loss(LossType::DrGrpo).compute(&x, 10.0);
        assert!((r.loss - -(3.0 * 0.5 + 2.0 * -1.5) / 8.0).abs() < 1e-12);
    }

    #[test]
    fn gradients_match_finite_differences_off_policy() {
        let logp = vec![vec![-1.0, -2.0, -0.5], vec![-0.3, -0.7, -0.1]];
        let old = vec![vec![-1.3, -1.7, -0.45], vec![-0.6, -0.2, -0.1]];
        let reference = vec![vec![-1.1, -2.2, -0.4], vec![-0.35, -0.5, -0.2]];
        let mask = vec![vec![1.0, 1.0, 1.0], vec![1.0, 1.0, 0.0]];
        let adv = [0.8, -1.2];
        for level in [
            ImportanceLevel::Token,
            ImportanceLevel::Sequence,
            ImportanceLevel::SequenceSum,
        ] {
            for lt in [LossType::Grpo, LossType::Bnpo, LossType::DrGrpo, LossType::Dapo] {
                let p = PolicyLoss {
                    beta: 0.04,
                    epsilon_high: 0.28,
                    delta: Some(1.5),
                    level,
                    bias_correction_kl: lt == LossType::Dapo || level == ImportanceLevel::Sequence,
                    ..loss(lt)
                };
                let f = |lp: &[Vec<f64>]| {
                    p.compute(
                        &LossInputs {
                            logp: lp,
                            old: Some(&old),
                            reference: Some(&reference),
                            advantages: &adv,
                            mask: &mask,
                        },
                        7.0,
                    )
                };
                let g = f(&logp);
                for i in 0..2 {
                    for t in 0..3 {
                        let e = 1e-6;
                        let mut up = logp.clone();
                        up[i][t] += e;
                        let mut dn = logp.clone();
                        dn[i][t] -= e;
                        let fd = (f(&up).loss - f(&dn).loss) / (2.0 * e);
                        assert!(
                            (fd - g.d_logp[i][t]).abs() < 1e-6,
                            "{lt:?} {level:?} [{i}][{t}]: {fd} vs {}",
                            g.d_logp[i][t]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn advantages_normalise_within_groups_and_leave_one_out() {
        let r = [1.0, 0.0, 1.0, 1.0, 2.0, 2.0];
        let a = grpo_advantages(&r, 3, ScaleRewards::Group);
        let s = (1.0f64 / 3.0).sqrt(); // std of [1, 0, 1]
        assert!((a.advantages[1] - (0.0 - 2.0 / 3.0) / (s + 1e-4)).abs() < 1e-12);
        assert!((a.metrics["frac_reward_zero_std"] - 0.0).abs() < 1e-12);
        let a = grpo_advantages(&r, 2, ScaleRewards::Group);
        assert!((a.metrics["frac_reward_zero_std"] - 2.0 / 3.0).abs() < 1e-12);
        let l = rloo_advantages(&[1.0, 0.0, 3.0], 3, 0.0, None, false);
        assert!((l.advantages[0] - (1.0 - 1.5)).abs() < 1e-12);
        assert!((l.advantages[2] - (3.0 - 0.5)).abs() < 1e-12);
    }
}
