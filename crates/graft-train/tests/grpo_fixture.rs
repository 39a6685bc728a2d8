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
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
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
