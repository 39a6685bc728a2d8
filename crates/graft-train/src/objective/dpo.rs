//! Direct Preference Optimization and its variants, as TRL's `DPOTrainer` computes them (every
//! `loss_type` of TRL 1.x, combined with `loss_weights`; the f-divergence is TRL's default
//! reverse KL).
//!
//! Its unit is the preference pair. Chosen and rejected of a pair sit in the same micro-batch
//! (attention isolated per sequence); a sequence's log-prob is the sum over its completion
//! tokens (its trained tokens: the prompt is masked). With `c`, `r` the policy's and `c_ref`,
//! `r_ref` the reference's summed log-probs, TRL's terms are built from the log-ratios
//! `cl = c − c_ref`, `rl = r − r_ref` and `δ = cl − rl`; rewards are `β·cl` and `β·rl`, and
//! `rewards/accuracies` counts `β·cl > β·rl` (strict, as TRL). The batch loss is
//! `Σ_k w_k · mean_pairs(loss_k)`; its derivative w.r.t. each pair's `c` and `r` comes from
//! forward-mode differentiation of exactly those formulas (`ad::Ad`), so every loss type, including
//! the batch-sorting `aot` ones, gets its exact gradient without a hand-derived formula each.

use super::ad::{Ad, mean, sorted};
use super::pairs::{PairLogps, PairLoss, PairLossOutput, PairObjective};
use serde::{Deserialize, Serialize};

/// TRL's DPO loss types (`DPOConfig.loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// `−log σ(β δ)`: the DPO paper's loss.
    Sigmoid,
    /// `relu(1 − β δ)` (SLiC).
    Hinge,
    /// `(δ̄ − 1/(2β))²` with per-token-averaged log-ratios (IPO).
    Ipo,
    /// EXO-pref: KL between the model's pair distribution and `[1 − ε, ε]` (needs `label_smoothing > 0`).
    ExoPair,
    /// NCA: `−log σ(β cl) − ½ log σ(−β cl) − ½ log σ(−β rl)`.
    NcaPair,
    /// Robust DPO: `(−(1−ε) log σ(βδ) + ε log σ(−βδ)) / (1 − 2ε)`.
    Robust,
    /// BCO (pairwise): `−log σ(β cl) − log σ(−β rl)`.
    BcoPair,
    /// SPPO with hard labels: `(cl − 1/(2β))² + (rl + 1/(2β))²`.
    SppoHard,
    /// AOT: policy and reference log-ratio differences each sorted over the batch.
    Aot,
    /// AOT for unpaired data: chosen and rejected log-ratios each sorted over the batch.
    AotUnpaired,
    /// APO-zero: `1 − σ(β cl) + σ(β rl)`.
    ApoZero,
    /// APO-down: `σ(β cl) + 1 − σ(β (cl − rl))`.
    ApoDown,
    /// DiscoPOP: a logistic/exponential blend modulated by `σ(βδ / τ)`.
    Discopop,
    /// NLL of the chosen completions (mean over their tokens).
    Sft,
    /// `−log σ(β δ̄)` with per-token-averaged log-ratios.
    SigmoidNorm,
}

impl DpoLossType {
    /// Every loss type, in TRL's order.
    pub const ALL: [DpoLossType; 15] = [
        DpoLossType::Sigmoid,
        DpoLossType::Hinge,
        DpoLossType::Ipo,
        DpoLossType::ExoPair,
        DpoLossType::NcaPair,
        DpoLossType::Robust,
        DpoLossType::BcoPair,
        DpoLossType::SppoHard,
        DpoLossType::Aot,
        DpoLossType::AotUnpaired,
        DpoLossType::ApoZero,
        DpoLossType::ApoDown,
        DpoLossType::Discopop,
        DpoLossType::Sft,
        DpoLossType::SigmoidNorm,
    ];

    /// TRL's name.
    pub fn name(self) -> &'static str {
        match self {
            DpoLossType::Sigmoid => "sigmoid",
            DpoLossType::Hinge => "hinge",
            DpoLossType::Ipo => "ipo",
            DpoLossType::ExoPair => "exo_pair",
            DpoLossType::NcaPair => "nca_pair",
            DpoLossType::Robust => "robust",
            DpoLossType::BcoPair => "bco_pair",
            DpoLossType::SppoHard => "sppo_hard",
            DpoLossType::Aot => "aot",
            DpoLossType::AotUnpaired => "aot_unpaired",
            DpoLossType::ApoZero => "apo_zero",
            DpoLossType::ApoDown => "apo_down",
            DpoLossType::Discopop => "discopop",
            DpoLossType::Sft => "sft",
            DpoLossType::SigmoidNorm => "sigmoid_norm",
        }
    }

    /// The loss type TRL calls `name`.
    pub fn from_name(name: &str) -> Option<DpoLossType> {
        DpoLossType::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The DPO hyperparameters (TRL's `DPOConfig` names and defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct DpoParams {
    /// `beta` (0.1): the strength of the implicit KL penalty.
    pub beta: f64,
    /// `loss_type` with `loss_weights` (each 1.0 by default): the terms summed.
    pub losses: Vec<(DpoLossType, f64)>,
    /// `label_smoothing` (0.0): ε of `robust`, `exo_pair`, `aot` and `aot_unpaired`.
    pub label_smoothing: f64,
    /// `discopop_tau` (0.05).
    pub discopop_tau: f64,
}

impl Default for DpoParams {
    fn default() -> Self {
        DpoParams {
            beta: 0.1,
            losses: vec![(DpoLossType::Sigmoid, 1.0)],
            label_smoothing: 0.0,
            discopop_tau: 0.05,
        }
    }
}

impl DpoParams {
    /// Checks the combinations TRL refuses; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.beta.is_nan() || self.beta <= 0.0 {
            return Err(format!("dpo.beta: must be positive, got {}", self.beta));
        }
        if self.losses.is_empty() {
            return Err("dpo.loss_type: give at least one loss type".into());
        }
        let has = |t| self.losses.iter().any(|(l, _)| *l == t);
        if has(DpoLossType::ExoPair) && self.label_smoothing <= 0.0 {
            return Err("dpo.label_smoothing: exo_pair needs label_smoothing > 0 (TRL suggests 1e-3)".into());
        }
        if has(DpoLossType::Robust) && !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(format!(
                "dpo.label_smoothing: robust needs 0 <= label_smoothing < 0.5, got {}",
                self.label_smoothing
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(format!(
                "dpo.label_smoothing: must be in [0, 1), got {}",
                self.label_smoothing
            ));
        }
        Ok(())
    }
}

/// The DPO loss of a batch of pairs and its gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct DpoLoss {
    /// The batch loss: `Σ_k w_k · mean_pairs(loss_k)` (what TRL reports for the batch).
    pub loss: f64,
    /// `∂ loss / ∂ chosen` per pair.
    pub d_chosen: Vec<f64>,
    /// `∂ loss / ∂ rejected` per pair.
    pub d_rejected: Vec<f64>,
}

/// TRL's DPO loss of a batch of pairs, with its gradient w.r.t. the policy log-probs.
pub fn dpo_loss(params: &DpoParams, pairs: &[PairLogps]) -> DpoLoss {
    let p = pairs.len();
    let n = 2 * p;
    let beta = params.beta;
    let eps = params.label_smoothing;
    let c: Vec<Ad> = pairs
        .iter()
        .enumerate()
        .map(|(i, x)| Ad::input(x.chosen, i, n))
        .collect();
    let r: Vec<Ad> = pairs
        .iter()
        .enumerate()
        .map(|(i, x)| Ad::input(x.rejected, p + i, n))
        .collect();
    let cl: Vec<Ad> = c
        .iter()
        .zip(pairs)
        .map(|(c, x)| c.offset(-x.ref_chosen))
        .collect();
    let rl: Vec<Ad> = r
        .iter()
        .zip(pairs)
        .map(|(r, x)| r.offset(-x.ref_rejected))
        .collect();
    let delta: Vec<Ad> = cl.iter().zip(&rl).map(|(a, b)| a.sub(b)).collect();
    let avg_delta = || -> Vec<Ad> {
        (0..p)
            .map(|i| {
                let nc = pairs[i].chosen_tokens.max(1) as f64;
                let nr = pairs[i].rejected_tokens.max(1) as f64;
                cl[i].scale(1.0 / nc).sub(&rl[i].scale(1.0 / nr))
            })
            .collect()
    };
    let smoothed_logistic = |d: &Ad| {
        let bd = d.scale(beta);
        bd.log_sigmoid()
            .scale(-(1.0 - eps))
            .sub(&bd.scale(-1.0).log_sigmoid().scale(eps))
    };
    let mut total = Ad::constant(0.0, n);
    for &(kind, weight) in &params.losses {
        let per_pair: Vec<Ad> = match kind {
            DpoLossType::Sigmoid => delta
                .iter()
                .map(|d| d.scale(beta).log_sigmoid().scale(-1.0))
                .collect(),
            DpoLossType::Hinge => delta.iter().map(|d| d.scale(-beta).offset(1.0).relu()).collect(),
            DpoLossType::Ipo => avg_delta()
                .iter()
                .map(|d| d.offset(-1.0 / (2.0 * beta)).square())
                .collect(),
            DpoLossType::ExoPair => {
                let (log_pw, log_pl) = ((-eps).ln_1p(), eps.ln());
                delta
                    .iter()
                    .map(|d| {
                        let bd = d.scale(beta);
                        let nbd = bd.scale(-1.0);
                        let qw = bd.sigmoid().mul(&bd.log_sigmoid().offset(-log_pw));
                        let ql = nbd.sigmoid().mul(&nbd.log_sigmoid().offset(-log_pl));
                        qw.add(&ql)
                    })
                    .collect()
            }
            DpoLossType::NcaPair => (0..p)
                .map(|i| {
                    let cr = cl[i].scale(beta);
                    let rr = rl[i].scale(beta);
                    cr.log_sigmoid()
                        .scale(-1.0)
                        .sub(&cr.scale(-1.0).log_sigmoid().scale(0.5))
                        .sub(&rr.scale(-1.0).log_sigmoid().scale(0.5))
                })
                .collect(),
            DpoLossType::Robust => delta
                .iter()
                .map(|d| {
                    let bd = d.scale(beta);
                    let clean = bd.log_sigmoid().scale(-(1.0 - eps));
                    let flipped = bd.scale(-1.0).log_sigmoid().scale(-eps);
                    clean.sub(&flipped).scale(1.0 / (1.0 - 2.0 * eps))
                })
                .collect(),
            DpoLossType::BcoPair => (0..p)
                .map(|i| {
                    cl[i]
                        .scale(beta)
                        .log_sigmoid()
                        .scale(-1.0)
                        .sub(&rl[i].scale(-beta).log_sigmoid())
                })
                .collect(),
            DpoLossType::SppoHard => (0..p)
                .map(|i| {
                    cl[i]
                        .offset(-0.5 / beta)
                        .square()
                        .add(&rl[i].offset(0.5 / beta).square())
                })
                .collect(),
            DpoLossType::Aot => {
                let logratios = sorted((0..p).map(|i| c[i].sub(&r[i])).collect());
                let mut refs: Vec<f64> = pairs.iter().map(|x| x.ref_chosen - x.ref_rejected).collect();
                refs.sort_by(f64::total_cmp);
                logratios
                    .iter()
                    .zip(&refs)
                    .map(|(l, rf)| smoothed_logistic(&l.offset(-rf)))
                    .collect()
            }
            DpoLossType::AotUnpaired => {
                let cs = sorted(cl.clone());
                let rs = sorted(rl.clone());
                cs.iter()
                    .zip(&rs)
                    .map(|(a, b)| smoothed_logistic(&a.sub(b)))
                    .collect()
            }
            DpoLossType::ApoZero => (0..p)
                .map(|i| {
                    cl[i]
                        .scale(beta)
                        .sigmoid()
                        .scale(-1.0)
                        .offset(1.0)
                        .add(&rl[i].scale(beta).sigmoid())
                })
                .collect(),
            DpoLossType::ApoDown => (0..p)
                .map(|i| {
                    cl[i]
                        .scale(beta)
                        .sigmoid()
                        .add(&delta[i].scale(beta).sigmoid().scale(-1.0).offset(1.0))
                })
                .collect(),
            DpoLossType::Discopop => delta
                .iter()
                .map(|d| {
                    let logits = d.scale(beta);
                    let m = logits.scale(1.0 / params.discopop_tau).sigmoid();
                    let logistic = logits.log_sigmoid().scale(-1.0);
                    let exp = logits.scale(-1.0).exp();
                    logistic.mul(&m.scale(-1.0).offset(1.0)).add(&exp.mul(&m))
                })
                .collect(),
            DpoLossType::Sft => {
                // Mean NLL over every chosen completion token of the batch, the same for each pair.
                let tokens: usize = pairs.iter().map(|x| x.chosen_tokens).sum();
                let nll = mean(&c, n).scale(-(p as f64) / tokens.max(1) as f64);
                vec![nll; p]
            }
            DpoLossType::SigmoidNorm => avg_delta()
                .iter()
                .map(|d| d.scale(beta).log_sigmoid().scale(-1.0))
                .collect(),
        };
        total = total.add(&mean(&per_pair, n).scale(weight));
    }
    DpoLoss {
        loss: total.v,
        d_chosen: total.g[..p].to_vec(),
        d_rejected: total.g[p..].to_vec(),
    }
}

/// TRL's per-batch DPO metrics, summed over pairs (`rewards/*`, `logps/*`).
pub fn dpo_metric_sums(beta: f64, pairs: &[PairLogps]) -> Vec<(&'static str, f64)> {
    let mut sums = [0.0f64; 6];
    for x in pairs {
        let (rc, rr) = (
            beta * (x.chosen - x.ref_chosen),
            beta * (x.rejected - x.ref_rejected),
        );
        sums[0] += rc;
        sums[1] += rr;
        sums[2] += if rc > rr { 1.0 } else { 0.0 };
        sums[3] += rc - rr;
        sums[4] += x.chosen;
        sums[5] += x.rejected;
    }
    [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ]
    .into_iter()
    .zip(sums)
    .collect()
}

impl PairLoss for DpoParams {
    fn pair_loss(&self, pairs: &[PairLogps]) -> PairLossOutput {
        let l = dpo_loss(self, pairs);
        let n = pairs.len().max(1) as f64;
        PairLossOutput {
            loss: l.loss,
            d_chosen: l.d_chosen,
            d_rejected: l.d_rejected,
            d_chosen_all: Vec::new(),
            metrics: dpo_metric_sums(self.beta, pairs)
                .into_iter()
                .map(|(k, v)| (k, v / n))
                .collect(),
        }
    }
}

/// The DPO objective.
pub type Dpo = PairObjective<DpoParams>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::ad::log_sigmoid;

    use crate::objective::pairs::tests::pairs;

    #[test]
    fn gradients_match_finite_differences_for_every_loss_type() {
        for kind in DpoLossType::ALL {
            let params = DpoParams {
                beta: 0.5,
                losses: vec![(kind, 0.7)],
                label_smoothing: 0.1,
                discopop_tau: 0.05,
            };
            let base = pairs();
            let got = dpo_loss(&params, &base);
            let h = 1e-6;
            for i in 0..base.len() {
                for chosen in [true, false] {
                    let bump = |d: f64| {
                        let mut p = base.clone();
                        if chosen {
                            p[i].chosen += d;
                        } else {
                            p[i].rejected += d;
                        }
                        dpo_loss(&params, &p).loss
                    };
                    let num = (bump(h) - bump(-h)) / (2.0 * h);
                    let ad = if chosen {
                        got.d_chosen[i]
                    } else {
                        got.d_rejected[i]
                    };
                    assert!(
                        (num - ad).abs() < 1e-6 * (1.0 + num.abs()),
                        "{kind:?} pair {i} chosen={chosen}: {num} vs {ad}"
                    );
                }
            }
        }
    }

    #[test]
    fn sigmoid_loss_is_the_dpo_formula() {
        let p = pairs();
        let got = dpo_loss(&DpoParams::default(), &p);
        let want: f64 = p
            .iter()
            .map(|x| -log_sigmoid(0.1 * ((x.chosen - x.ref_chosen) - (x.rejected - x.ref_rejected))))
            .sum::<f64>()
            / 3.0;
        assert!((got.loss - want).abs() < 1e-12);
        // At equal policy and reference the loss is ln 2.
        let eq: Vec<PairLogps> = p
            .iter()
            .map(|x| PairLogps {
                ref_chosen: x.chosen,
                ref_rejected: x.rejected,
                ..*x
            })
            .collect();
        assert!((dpo_loss(&DpoParams::default(), &eq).loss - std::f64::consts::LN_2).abs() < 1e-12);
    }

    /// `tests/fixtures/objectives/dpo_losses.json`, made by TRL's own `DPOTrainer.compute_loss`
    /// (`scripts/gen_dpo_fixture.py`): every loss type's batch loss, its gradient w.r.t. the
    /// policy log-probs, and the reward metrics.
    #[test]
    fn every_loss_type_matches_trl() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/objectives/dpo_losses.json"
        );
        let fixture: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let floats = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let mut seen = std::collections::HashSet::new();
        for case in fixture["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let kinds: Vec<String> = match &case["loss_type"] {
                serde_json::Value::String(s) => vec![s.clone()],
                v => v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_str().unwrap().to_string())
                    .collect(),
            };
            let weights = floats(&case["loss_weights"]);
            let losses: Vec<(DpoLossType, f64)> = kinds
                .iter()
                .zip(&weights)
                .map(|(k, &w)| {
                    (
                        DpoLossType::from_name(k).unwrap_or_else(|| panic!("{name}: {k}")),
                        w,
                    )
                })
                .collect();
            seen.extend(losses.iter().map(|l| l.0));
            let params = DpoParams {
                beta: case["beta"].as_f64().unwrap(),
                losses,
                label_smoothing: case["label_smoothing"].as_f64().unwrap(),
                discopop_tau: case["discopop_tau"].as_f64().unwrap(),
            };
            let inp = &case["inputs"];
            let (c, r) = (
                floats(&inp["policy_chosen_logps"]),
                floats(&inp["policy_rejected_logps"]),
            );
            let (rc, rr) = (
                floats(&inp["reference_chosen_logps"]),
                floats(&inp["reference_rejected_logps"]),
            );
            let (nc, nr) = (floats(&inp["chosen_lengths"]), floats(&inp["rejected_lengths"]));
            let pairs: Vec<PairLogps> = (0..c.len())
                .map(|i| PairLogps {
                    chosen: c[i],
                    rejected: r[i],
                    ref_chosen: rc[i],
                    ref_rejected: rr[i],
                    chosen_tokens: nc[i] as usize,
                    rejected_tokens: nr[i] as usize,
                    chosen_all: c[i],
                    chosen_all_tokens: nc[i] as usize,
                })
                .collect();
            let got = dpo_loss(&params, &pairs);
            let out = &case["outputs"];
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + b.abs());
            assert!(
                close(got.loss, out["loss"].as_f64().unwrap()),
                "{name}: loss {} vs {}",
                got.loss,
                out["loss"]
            );
            for (i, (g, w)) in got
                .d_chosen
                .iter()
                .zip(floats(&out["grad_policy_chosen_logps"]))
                .enumerate()
            {
                assert!(close(*g, w), "{name}: d chosen[{i}] {g} vs {w}");
            }
            for (i, (g, w)) in got
                .d_rejected
                .iter()
                .zip(floats(&out["grad_policy_rejected_logps"]))
                .enumerate()
            {
                assert!(close(*g, w), "{name}: d rejected[{i}] {g} vs {w}");
            }
            let sums: std::collections::BTreeMap<_, _> =
                dpo_metric_sums(params.beta, &pairs).into_iter().collect();
            for (k, v) in out["metrics"].as_object().unwrap() {
                let Some(sum) = sums.get(k.as_str()) else { continue };
                let want = v.as_f64().unwrap();
                // TRL averages in float32 for the accuracies.
                assert!(
                    (sum / pairs.len() as f64 - want).abs() < 1e-6,
                    "{name}: {k} {} vs {want}",
                    sum / pairs.len() as f64
                );
            }
        }
        assert_eq!(
            seen.len(),
            DpoLossType::ALL.len(),
            "the fixture covers every loss type"
        );
    }

    #[test]
    fn accuracies_are_strict() {
        let eq = [PairLogps {
            chosen: -1.0,
            rejected: -1.0,
            ref_chosen: -1.0,
            ref_rejected: -1.0,
            ..Default::default()
        }];
        let m: std::collections::BTreeMap<_, _> = dpo_metric_sums(0.1, &eq).into_iter().collect();
        assert_eq!(m["rewards/accuracies"], 0.0);
    }
}
