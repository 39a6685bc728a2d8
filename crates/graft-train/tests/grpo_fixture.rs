//! GRPO's loss against TRL 1.16's own `GRPOTrainer._compute_loss` (fixtures from
//! `scripts/gen_grpo_fixture.py`): every `loss_type`, on- and off-policy, with the KL term, clip
//! higher, two-sided clipping (`delta`), sequence-level ratios and gradient accumulation — and
//! RLOO's `RLOOTrainer._compute_loss` (the clipped surrogate on summed sequence log-probs): loss,
//! `∂ loss / ∂ log p` per token and the clip / KL metrics, within 1e-6.

use graft_train::objective::grpo::{ImportanceLevel, LossInputs, LossType, PolicyLoss};
use serde_json::Value;

fn matrix(v: &Value) -> Option<Vec<Vec<f64>>> {
    v.as_array().map(|rows| {
        rows.iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    })
}

fn vector(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(name: &str, what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
        "{name}: {what} {got} vs TRL {want}"
    );
}

/// RLOO's case: TRL gives the old log-probs as sequence sums; graft takes them per token, so
/// the sum goes on each completion's first token (the log-ratio is the same sum).
fn check_rloo(name: &str, c: &Value) {
    let cfg = &c["config"];
    let inp = &c["inputs"];
    let logp = matrix(&inp["per_token_logps"]).unwrap();
    let mask = matrix(&inp["completion_mask"]).unwrap();
    let old: Vec<Vec<f64>> = vector(&inp["old_logps"])
        .iter()
        .zip(&logp)
        .map(|(&s, row)| {
            let mut o = vec![0.0; row.len()];
            o[0] = s;
            o
        })
        .collect();
    let adv = vector(&inp["advantages"]);
    let loss = PolicyLoss {
        loss_type: LossType::Grpo,
        beta: 0.0,
        epsilon_low: cfg["epsilon"].as_f64().unwrap(),
        epsilon_high: cfg["epsilon_high"].as_f64().unwrap(),
        delta: None,
        level: ImportanceLevel::SequenceSum,
        bias_correction_kl: false,
        max_completion_length: 0,
    };
    let out = loss.compute(
        &LossInputs {
            logp: &logp,
            old: Some(&old),
            reference: None,
            advantages: &adv,
            mask: &mask,
        },
        1.0,
    );
    let exp = &c["expected"];
    close(name, "loss", out.loss, exp["loss"].as_f64().unwrap());
    let grad = matrix(&exp["d_per_token_logps"]).unwrap();
    for (i, (g, w)) in out.d_logp.iter().zip(&grad).enumerate() {
        for (t, (&a, &b)) in g.iter().zip(w).enumerate() {
            close(name, &format!("d_logp[{i}][{t}]"), a, b);
        }
    }
    for (k, v) in exp["metrics"].as_object().unwrap() {
        let got = out.metrics.get(k.as_str()).copied().unwrap_or(f64::NAN);
        assert!(
            (got - v.as_f64().unwrap()).abs() <= 1e-6,
            "{name}: {k} {got} vs TRL {v}"
        );
    }
}

#[test]
fn policy_loss_matches_trl_on_every_loss_type() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/grpo_loss/cases.json"
    );
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    // `extra_cases` holds TRL's defaults graft follows too (the bias-corrected KL), besides two
    // documented differences left out here: a fully masked RLOO row (TRL adds −A/B to the loss
    // value, same gradient) and delta below 1 + epsilon_high (graft refuses that config).
    let extra = fixture["extra_cases"].as_array().unwrap().iter().filter(|c| {
        let n = c["name"].as_str().unwrap();
        n != "rloo-masked-row" && n != "grpo-delta-below-clip-high"
    });
    let cases: Vec<&Value> = fixture["cases"].as_array().unwrap().iter().chain(extra).collect();
    assert!(cases.len() >= 30);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let cfg = &c["config"];
        if c["trainer"] == "rloo" {
            check_rloo(name, c);
            continue;
        }
        let loss = PolicyLoss {
            loss_type: LossType::parse(cfg["loss_type"].as_str().unwrap()).unwrap(),
            beta: cfg["beta"].as_f64().unwrap(),
            epsilon_low: cfg["epsilon"].as_f64().unwrap(),
            epsilon_high: cfg["epsilon_high"].as_f64().unwrap(),
            delta: cfg["delta"].as_f64(),
            level: match cfg["importance_sampling_level"].as_str().unwrap() {
                "token" => ImportanceLevel::Token,
                _ => ImportanceLevel::Sequence,
            },
            bias_correction_kl: cfg["use_bias_correction_kl"].as_bool().unwrap_or(false),
            max_completion_length: cfg["max_completion_length"].as_u64().unwrap() as usize,
        };
        let inp = &c["inputs"];
        let logp = matrix(&inp["per_token_logps"]).unwrap();
        let old = matrix(&inp["old_per_token_logps"]);
        let reference = matrix(&inp["ref_per_token_logps"]);
        let mask = matrix(&inp["completion_mask"]).unwrap();
        let adv: Vec<f64> = inp["advantages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let out = loss.compute(
            &LossInputs {
                logp: &logp,
                old: old.as_deref(),
                reference: reference.as_deref(),
                advantages: &adv,
                mask: &mask,
            },
            inp["num_items_in_batch"].as_f64().unwrap(),
        );
        let scale = loss.accumulation_scale(c["grad_accum"].as_u64().unwrap() as usize);
        let exp = &c["expected"];
        let want = exp["loss"].as_f64().unwrap();
        let got = out.loss * scale;
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
            "{name}: loss {got} vs TRL {want}"
        );
        let grad = matrix(&exp["d_per_token_logps"]).unwrap();
        for (i, (g, w)) in out.d_logp.iter().zip(&grad).enumerate() {
            for (t, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    (a * scale - b).abs() <= 1e-6 * b.abs().max(1e-3),
                    "{name}: d_logp[{i}][{t}] {} vs TRL {b}",
                    a * scale
                );
            }
        }
        for (k, v) in exp["metrics"].as_object().unwrap() {
            let want = v.as_f64().unwrap();
            let got = out.metrics.get(k.as_str()).copied().unwrap_or(f64::NAN);
            assert!((got - want).abs() <= 1e-6, "{name}: {k} {got} vs TRL {want}");
        }
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

/// Advantages and reward metrics against TRL's `_generate_and_score_completions` (float32 there):
/// GRPO's group / batch / no scaling, truncated completions masked, μ = 2; RLOO's leave-one-out
/// baseline with the KL penalty and with batch normalisation. (Cases with `None` rewards,
/// `normalize_then_sum` or `reward_clip_range` — TRL options graft does not offer — are skipped.)
#[test]
fn advantages_match_trl() {
    use graft_train::objective::grpo::{ScaleRewards, combine_rewards, grpo_advantages, rloo_advantages};
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/grpo_loss/cases.json"
    );
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for c in fixture["advantage_cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let per_func = &c["rewards_per_func"];
        let unsupported = per_func.to_string().contains("null")
            || c["multi_objective_aggregation"]
                .as_str()
                .is_some_and(|m| m != "sum_then_normalize")
            || !c["reward_clip_range"].is_null();
        if unsupported {
            continue;
        }
        let per_func = matrix(per_func).unwrap();
        let weights: Vec<f64> = match c["reward_weights"].as_array() {
            Some(w) => w.iter().map(f).collect(),
            None => vec![1.0; per_func[0].len()],
        };
        let rewards = combine_rewards(&per_func, &weights);
        let group = c["num_generations"].as_u64().unwrap() as usize;
        let a = if c["trainer"] == "grpo" {
            let scale = match c["scale_rewards"].as_str().unwrap() {
                "group" => ScaleRewards::Group,
                "batch" => ScaleRewards::Batch,
                _ => ScaleRewards::None,
            };
            grpo_advantages(&rewards, group, scale)
        } else {
            let kl: Option<Vec<f64>> = c["expected_kl_per_sequence"]
                .as_array()
                .map(|v| v.iter().map(f).collect());
            rloo_advantages(
                &rewards,
                group,
                f(&c["beta"]),
                kl.as_deref(),
                c["normalize_advantages"].as_bool().unwrap(),
            )
        };
        for (i, (got, want)) in a
            .advantages
            .iter()
            .zip(c["expected_advantages"].as_array().unwrap())
            .enumerate()
        {
            assert!(
                (got - f(want)).abs() < 2e-5,
                "{name}: advantage {i}: {got} vs TRL {want}"
            );
        }
        for k in ["reward", "reward_std", "frac_reward_zero_std"] {
            let want = f(&c["expected_metrics"][k]);
            assert!(
                (a.metrics[k] - want).abs() < 2e-5,
                "{name}: {k} {} vs TRL {want}",
                a.metrics[k]
            );
        }
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} advantage cases checked");
}
