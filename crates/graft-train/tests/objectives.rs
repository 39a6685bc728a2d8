//! The objective seam on a tiny random model: the two-phase forward/backward (log-probs first,
//! `d_logp` after) gives the fused pass's gradients exactly, and the DPO objective's gradients
//! (per-token `d_logp` from TRL's pair loss) match finite differences of its loss.

use graft_kernels::{Cpu, Precision};
use graft_model::config::ModelSpec;
use graft_model::lora::LoraSpec;
use graft_model::model::{Model, WeightStorage};
use graft_model::train::{Batch, TrainMode, TrainOptions};
use graft_train::objective::Objective;
use graft_train::objective::dpo::{Dpo, DpoLossType, DpoParams};
use graft_train::objective::pairs::{PairBatch, PairSlot};

fn tiny_model() -> Model<Cpu> {
    let spec = ModelSpec::from_config_json(&serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 37,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false
    }))
    .unwrap();
    let mut model = Model::random(Cpu, &spec, 7, WeightStorage::F32);
    let lora = LoraSpec {
        r: 4,
        alpha: 8.0,
        rslora: false,
        dropout: 0.0,
        targets: [true; 7],
    };
    model.init_lora(&lora, 3);
    // A non-zero adapter, as after SFT, so the policy differs from the base.
    let mut k = 0u32;
    model.visit_params_mut(TrainMode::Lora, |_, p| {
        for v in p.iter_mut() {
            k = k.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            *v += ((k >> 16) % 200) as f32 / 2000.0 - 0.05;
        }
    });
    model
}

/// Two pairs: sequences `[c0, r0, c1, r1]`, prompt tokens untrained.
fn pair_batch() -> PairBatch {
    let seqs: [(&[u32], usize); 4] = [
        (&[1, 5, 9, 14, 3, 22, 2], 3),
        (&[1, 5, 9, 14, 30, 2], 3),
        (&[1, 8, 6, 11, 27, 19, 4, 2], 2),
        (&[1, 8, 6, 33, 2], 2),
    ];
    let mut b = Batch::default();
    for (k, (ids, prompt)) in seqs.iter().enumerate() {
        for (i, &id) in ids.iter().enumerate() {
            b.input_ids.push(id);
            b.positions.push(i as u32);
            b.seq_ids.push(k as u32);
            let trained = i + 1 < ids.len() && i + 1 >= *prompt;
            b.targets.push(if trained { ids[i + 1] as i32 } else { -100 });
        }
    }
    PairBatch {
        batch: b,
        completion: Vec::new(),
        pairs: vec![
            PairSlot {
                chosen_seq: 0,
                rejected_seq: 1,
                ref_chosen: -13.0,
                ref_rejected: -11.5,
            },
            PairSlot {
                chosen_seq: 2,
                rejected_seq: 3,
                ref_chosen: -18.0,
                ref_rejected: -8.0,
            },
        ],
    }
}

fn exact() -> TrainOptions {
    TrainOptions {
        precision: Precision::Exact,
        ..Default::default()
    }
}

fn flat_grads(grads: &mut graft_model::train::Grads<Cpu>) -> Vec<f32> {
    let mut out = Vec::new();
    grads.for_each_mut(|_, g| out.extend_from_slice(g));
    out
}

#[test]
fn two_phase_backward_equals_the_fused_pass() {
    let model = tiny_model();
    let batch = pair_batch().batch;
    let mut fused = model.new_grads(TrainMode::Lora);
    let a = model.forward_backward(&batch, &mut fused, 1.0, exact());
    let mut split = model.new_grads(TrainMode::Lora);
    let (b, pending) = model.forward_for_backward(&batch, exact());
    model.backward(&batch, pending, &mut split, &vec![-1.0; batch.len()]);
    assert_eq!(a.logprobs, b.logprobs);
    assert_eq!(
        flat_grads(&mut fused),
        flat_grads(&mut split),
        "bit-identical gradients"
    );
}

#[test]
fn dpo_gradients_match_finite_differences_for_several_loss_types() {
    let batch = pair_batch();
    for losses in [
        vec![(DpoLossType::Sigmoid, 1.0)],
        vec![(DpoLossType::Ipo, 1.0)],
        vec![(DpoLossType::Sigmoid, 0.8), (DpoLossType::Sft, 0.2)],
    ] {
        let mut dpo = Dpo {
            loss: DpoParams {
                beta: 0.5,
                losses: losses.clone(),
                ..Default::default()
            },
        };
        let mut model = tiny_model();
        let mut grads = model.new_grads(TrainMode::Lora);
        let c = dpo.forward_backward(&model, &batch, &mut grads, exact());
        assert_eq!(c.units, 2.0);
        let g = flat_grads(&mut grads);
        // The largest few gradient entries, checked by central differences of loss_sum.
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&i, &j| g[j].abs().total_cmp(&g[i].abs()));
        for &idx in order.iter().take(6) {
            let at = |model: &mut Model<Cpu>, delta: f32| {
                let mut k = 0;
                model.visit_params_mut(TrainMode::Lora, |_, p| {
                    if idx >= k && idx < k + p.len() {
                        p[idx - k] += delta;
                    }
                    k += p.len();
                });
            };
            let h = 1e-2f32;
            at(&mut model, h);
            let plus = dpo.evaluate(&model, &batch, exact()).loss_sum;
            at(&mut model, -2.0 * h);
            let minus = dpo.evaluate(&model, &batch, exact()).loss_sum;
            at(&mut model, h);
            let num = (plus - minus) / (2.0 * h as f64);
            let rel = (num - g[idx] as f64).abs() / (g[idx] as f64).abs().max(1e-3);
            assert!(rel < 2e-2, "{losses:?} param {idx}: numeric {num} vs {}", g[idx]);
        }
    }
}

/// `tests/fixtures/dpo_trainer/`, made by TRL 1.16's own `DPOTrainer.compute_loss` + backward
/// (`scripts/gen_dpo_trainer_fixture.py`) on a tiny random Llama with a non-zero PEFT adapter,
/// reference = the base model: graft's reference pass (adapter off), policy log-probs, first-step
/// loss, reward metrics and every LoRA gradient agree.
#[test]
fn first_dpo_step_matches_trl_dpo_trainer() {
    let fixture = read_json(&fixture_dir("dpo_trainer").join("cases.json"));
    let model = fixture_model();
    // graft's layout: [chosen_0, rejected_0, chosen_1, …]; completion tokens (EOS included) trained.
    let mut b = Batch::default();
    let mut slots = Vec::new();
    let (ref_c, ref_r) = (
        floats(&fixture["ref_chosen_logps"]),
        floats(&fixture["ref_rejected_logps"]),
    );
    for (k, pair) in fixture["pairs"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&pair["prompt_ids"]);
        push_sequence(&mut b, 2 * k as u32, &prompt, &ids(&pair["chosen_ids"]));
        push_sequence(&mut b, 2 * k as u32 + 1, &prompt, &ids(&pair["rejected_ids"]));
        slots.push(PairSlot {
            chosen_seq: 2 * k as u32,
            rejected_seq: 2 * k as u32 + 1,
            ref_chosen: ref_c[k],
            ref_rejected: ref_r[k],
        });
    }
    // The reference: the same weights with the adapter switched off.
    let refs = model.forward_logprobs_with(
        &b,
        TrainOptions {
            without_adapters: true,
            ..exact()
        },
    );
    let seqs = graft_train::objective::pairs::sequence_logps(&b, &refs.logprobs);
    for (k, s) in slots.iter().enumerate() {
        assert!(
            (seqs[2 * k].0 - s.ref_chosen).abs() < 1e-4,
            "ref chosen {k}: {} vs {}",
            seqs[2 * k].0,
            s.ref_chosen
        );
        assert!(
            (seqs[2 * k + 1].0 - s.ref_rejected).abs() < 1e-4,
            "ref rejected {k}"
        );
    }
    let batch = PairBatch {
        batch: b,
        pairs: slots,
        completion: Vec::new(),
    };
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
        let losses = kinds
            .iter()
            .zip(floats(&case["loss_weights"]))
            .map(|(k, w)| (DpoLossType::from_name(k).unwrap(), w))
            .collect();
        let mut dpo = Dpo {
            loss: DpoParams {
                beta: case["beta"].as_f64().unwrap(),
                losses,
                label_smoothing: case["label_smoothing"].as_f64().unwrap(),
                ..Default::default()
            },
        };
        let mut grads = model.new_grads(TrainMode::Lora);
        let c = dpo.forward_backward(&model, &batch, &mut grads, exact());
        let loss = c.loss_sum / c.units;
        let want = case["loss"].as_f64().unwrap();
        assert!(
            ((loss - want) / want).abs() < 1e-5,
            "{name}: loss {loss} vs TRL {want}"
        );
        for (k, v) in case["metrics"].as_object().unwrap() {
            let got = c.metrics[k.as_str()] / c.units;
            let want = v.as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{name}: {k} {got} vs {want}"
            );
        }
        // The trainer divides by the step's units (pairs); TRL's gradient is of the mean.
        let worst = gradient_error(&mut grads, &case["grads"], c.units);
        eprintln!(
            "{name}: loss {loss:.7} (TRL {want:.7}), LoRA gradients within {worst:.1e} (relative norm)"
        );
        assert!(
            worst < 1e-3,
            "{name}: LoRA gradients differ from TRL's by {worst:.2e} (relative norm)"
        );
    }
}

fn fixture_dir(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The tiny Llama of `tests/fixtures/dpo_trainer` with its non-zero adapter attached.
fn fixture_model() -> Model<Cpu> {
    let dir = fixture_dir("dpo_trainer");
    let loaded = graft_model::weights::load_model(&dir.join("model")).unwrap();
    let mut model = Model::from_weights(Cpu, &loaded.spec, &loaded.weights, WeightStorage::F32).unwrap();
    let adapter = graft_model::peft::load_peft_adapter(&dir.join("adapter"), &loaded.spec).unwrap();
    model.set_adapter(&adapter);
    model
}

/// Appends `prompt + completion` as sequence `seq`, completion tokens trained.
fn push_sequence(b: &mut Batch, seq: u32, prompt: &[u32], completion: &[u32]) {
    let all: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    for (i, &id) in all.iter().enumerate() {
        b.input_ids.push(id);
        b.positions.push(i as u32);
        b.seq_ids.push(seq);
        let trained = i + 1 < all.len() && i + 1 >= prompt.len();
        b.targets.push(if trained { all[i + 1] as i32 } else { -100 });
    }
}

/// Relative norm difference of graft's gradients (divided by `units`) and a fixture's.
fn gradient_error(grads: &mut graft_model::train::Grads<Cpu>, want: &serde_json::Value, units: f64) -> f64 {
    let mut worst = 0.0f64;
    grads.for_each_mut(|id, g| {
        let key = id.peft_name();
        let w = floats(&want[&key]["values"]);
        assert_eq!(w.len(), g.len(), "{key}");
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (x, w) in g.iter().zip(&w) {
            num += (*x as f64 / units - w).powi(2);
            den += w * w;
        }
        worst = worst.max((num / den.max(1e-30)).sqrt());
    });
    worst
}

/// `tests/fixtures/cpo_orpo/`, made by TRL 1.16's own `CPOTrainer.compute_loss`
/// (`scripts/gen_cpo_orpo_fixture.py`) on the DPO fixture's model, adapter and pairs: CPO,
/// SimPO and AlphaPO first-step losses, metrics and LoRA gradients.
#[test]
fn first_cpo_step_matches_trl_cpo_trainer() {
    use graft_train::objective::cpo::{CpoLossType, CpoParams};
    use graft_train::objective::pairs::PairObjective;
    let fixture = read_json(&fixture_dir("cpo_orpo").join("cases.json"));
    let model = fixture_model();
    let mut b = Batch::default();
    let mut slots = Vec::new();
    for (k, pair) in fixture["pairs"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&pair["prompt_ids"]);
        push_sequence(&mut b, 2 * k as u32, &prompt, &ids(&pair["chosen_ids"]));
        push_sequence(&mut b, 2 * k as u32 + 1, &prompt, &ids(&pair["rejected_ids"]));
        slots.push(PairSlot {
            chosen_seq: 2 * k as u32,
            rejected_seq: 2 * k as u32 + 1,
            ref_chosen: 0.0,
            ref_rejected: 0.0,
        });
    }
    let batch = PairBatch {
        batch: b,
        pairs: slots,
        completion: Vec::new(),
    };
    let mut checked = 0;
    for case in fixture["cases"].as_array().unwrap() {
        let p = &case["params"];
        if p["trainer"] != "CPOTrainer" {
            continue;
        }
        let name = case["name"].as_str().unwrap();
        let mut cpo = PairObjective {
            loss: CpoParams {
                beta: p["beta"].as_f64().unwrap(),
                loss_type: CpoLossType::from_name(p["loss_type"].as_str().unwrap()).unwrap(),
                cpo_alpha: p["cpo_alpha"].as_f64().unwrap(),
                simpo_gamma: p["simpo_gamma"].as_f64().unwrap(),
                alpha: p["alpha"].as_f64().unwrap(),
                label_smoothing: p["label_smoothing"].as_f64().unwrap(),
            },
        };
        let mut grads = model.new_grads(TrainMode::Lora);
        let c = cpo.forward_backward(&model, &batch, &mut grads, exact());
        let loss = c.loss_sum / c.units;
        let want = case["loss"].as_f64().unwrap();
        assert!(
            ((loss - want) / want).abs() < 1e-5,
            "{name}: loss {loss} vs TRL {want}"
        );
        for k in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "nll_loss",
        ] {
            let (got, want) = (c.metrics[k] / c.units, case["metrics"][k].as_f64().unwrap());
            assert!(
                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{name}: {k} {got} vs {want}"
            );
        }
        if case["grads"].is_object() {
            let err = gradient_error(&mut grads, &case["grads"], c.units);
            eprintln!("{name}: loss {loss:.7} (TRL {want:.7}), LoRA gradients within {err:.1e}");
            assert!(err < 1e-3, "{name}: gradients differ by {err:.2e}");
        }
        checked += 1;
    }
    assert!(checked >= 5);
}

/// `tests/fixtures/kto_trainer/`, made by TRL 1.16's own `KTOTrainer.compute_loss`
/// (`scripts/gen_kto_fixture.py`): the batch KL estimate from the rotated completions, the loss,
/// metrics and LoRA gradients, reference = the base model.
#[test]
fn first_kto_step_matches_trl_kto_trainer() {
    use graft_train::objective::kto::{Kto, KtoBatch, KtoLossType, KtoParams, KtoSlot};
    let fixture = read_json(&fixture_dir("kto_trainer").join("cases.json"));
    let model = fixture_model();
    let (refs, ref_kl) = (floats(&fixture["ref_logps"]), floats(&fixture["ref_KL_logps"]));
    let examples = fixture["examples"].as_array().unwrap();
    let (mut b, mut kl) = (Batch::default(), Batch::default());
    let mut slots = Vec::new();
    for (k, e) in examples.iter().enumerate() {
        let prompt = ids(&e["prompt_ids"]);
        push_sequence(&mut b, k as u32, &prompt, &ids(&e["completion_ids"]));
        // graft's own rotation: prompt k with the completion of example k − 1.
        let prev = &examples[(k + examples.len() - 1) % examples.len()];
        assert_eq!(
            ids(&prev["completion_ids"]),
            ids(&e["KL_completion_ids"]),
            "TRL's rotation"
        );
        push_sequence(&mut kl, k as u32, &prompt, &ids(&prev["completion_ids"]));
        slots.push(KtoSlot {
            seq: k as u32,
            label: e["label"].as_bool().unwrap(),
            ref_logp: refs[k],
            kl_seq: k as u32,
            ref_kl_logp: ref_kl[k],
        });
    }
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let loss_type = match case["loss_type"].as_str().unwrap() {
            "kto" => KtoLossType::Kto,
            _ => KtoLossType::ApoZeroUnpaired,
        };
        let params = KtoParams {
            beta: case["beta"].as_f64().unwrap(),
            desirable_weight: case["desirable_weight"].as_f64().unwrap(),
            undesirable_weight: case["undesirable_weight"].as_f64().unwrap(),
            loss_type,
        };
        let with_kl = params.uses_kl();
        let batch = KtoBatch {
            batch: b.clone(),
            kl_batch: if with_kl { kl.clone() } else { Batch::default() },
            slots: slots.clone(),
        };
        let mut kto = Kto { params };
        let mut grads = model.new_grads(TrainMode::Lora);
        let c = kto.forward_backward(&model, &batch, &mut grads, exact());
        let loss = c.loss_sum / c.units;
        let want = case["loss"].as_f64().unwrap();
        assert!(
            ((loss - want) / want).abs() < 1e-5,
            "{name}: loss {loss} vs TRL {want}"
        );
        for k in [
            "kl",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            let Some(want) = case["metrics"][k].as_f64() else {
                continue;
            };
            let got = c.metrics.get(k).copied().unwrap_or(0.0) / c.units;
            assert!(
                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{name}: {k} {got} vs {want}"
            );
        }
        let err = gradient_error(&mut grads, &case["grads"], c.units);
        eprintln!("{name}: loss {loss:.7} (TRL {want:.7}), LoRA gradients within {err:.1e}");
        assert!(err < 1e-3, "{name}: gradients differ by {err:.2e}");
    }
}

/// ORPO from the same fixture (TRL 1.16's own `ORPOTrainer.compute_loss`): its NLL covers the
/// whole chosen sequence, prompt included; the odds ratio uses per-token-averaged completion
/// log-probs.
#[test]
fn first_orpo_step_matches_trl_orpo_trainer() {
    use graft_train::objective::orpo::OrpoParams;
    use graft_train::objective::pairs::PairObjective;
    let fixture = read_json(&fixture_dir("cpo_orpo").join("cases.json"));
    let model = fixture_model();
    let mut b = Batch::default();
    let mut completion = Vec::new();
    let mut slots = Vec::new();
    for (k, pair) in fixture["pairs"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&pair["prompt_ids"]);
        for (j, c) in [ids(&pair["chosen_ids"]), ids(&pair["rejected_ids"])]
            .iter()
            .enumerate()
        {
            let start = b.targets.len();
            push_sequence(&mut b, (2 * k + j) as u32, &prompt, c);
            completion.extend(b.targets[start..].iter().map(|&t| t >= 0));
            if j == 0 {
                // The chosen sequence: a target at every position.
                let all: Vec<u32> = prompt.iter().chain(c).copied().collect();
                for (i, t) in b.targets[start..].iter_mut().enumerate() {
                    if i + 1 < all.len() {
                        *t = all[i + 1] as i32;
                    }
                }
            }
        }
        slots.push(PairSlot {
            chosen_seq: 2 * k as u32,
            rejected_seq: 2 * k as u32 + 1,
            ref_chosen: 0.0,
            ref_rejected: 0.0,
        });
    }
    let batch = PairBatch {
        batch: b,
        pairs: slots,
        completion,
    };
    let mut checked = 0;
    for case in fixture["cases"].as_array().unwrap() {
        if case["params"]["trainer"] != "ORPOTrainer" {
            continue;
        }
        let name = case["name"].as_str().unwrap();
        let mut orpo = PairObjective {
            loss: OrpoParams {
                beta: case["params"]["beta"].as_f64().unwrap(),
            },
        };
        let mut grads = model.new_grads(TrainMode::Lora);
        let c = orpo.forward_backward(&model, &batch, &mut grads, exact());
        let loss = c.loss_sum / c.units;
        let want = case["loss"].as_f64().unwrap();
        assert!(
            ((loss - want) / want).abs() < 1e-5,
            "{name}: loss {loss} vs TRL {want}"
        );
        for k in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "nll_loss",
            "log_odds_ratio",
            "log_odds_chosen",
        ] {
            let (got, want) = (c.metrics[k] / c.units, case["metrics"][k].as_f64().unwrap());
            assert!(
                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{name}: {k} {got} vs {want}"
            );
        }
        if case["grads"].is_object() {
            let err = gradient_error(&mut grads, &case["grads"], c.units);
            eprintln!("{name}: loss {loss:.7} (TRL {want:.7}), LoRA gradients within {err:.1e}");
            assert!(err < 1e-3, "{name}: gradients differ by {err:.2e}");
        }
        checked += 1;
    }
    assert_eq!(checked, 2);
}

/// `tests/fixtures/reward_trainer/`, made by TRL 1.16's own `RewardTrainer.compute_loss`
/// (`scripts/gen_reward_fixture.py`): the DPO fixture's model as a sequence classifier with a
/// LoRA adapter whose `modules_to_save` carries the score head; loss, rewards, metrics and the
/// gradients of the LoRA factors and the head, with and without a margin column and centring,
/// with a distinct pad id and with EOS as the pad id.
#[test]
fn first_reward_step_matches_trl_reward_trainer() {
    use graft_train::objective::reward::{Reward, RewardBatch, RewardParams, RewardSlot, score_position};
    let dir = fixture_dir("reward_trainer");
    let fixture = read_json(&dir.join("cases.json"));
    let loaded = graft_model::weights::load_model(&fixture_dir("dpo_trainer").join("model")).unwrap();
    let mut model = Model::from_weights(Cpu, &loaded.spec, &loaded.weights, WeightStorage::F32).unwrap();
    let base_score: Vec<f32> = floats(&fixture["score_weight"])
        .iter()
        .map(|&x| x as f32)
        .collect();
    model.attach_score_head(&base_score);
    let adapter = graft_model::peft::load_peft_adapter(&dir.join("adapter"), &model.spec).unwrap();
    assert!(adapter.config.saves_score() && adapter.score.is_some());
    let pairs = fixture["pairs"].as_array().unwrap();
    let batch_for = |pad: Option<u32>, use_margin: bool| {
        let mut b = Batch::default();
        let mut slots = Vec::new();
        for (k, p) in pairs.iter().enumerate() {
            let mut at = [0usize; 2];
            for (j, key) in ["chosen_ids", "rejected_ids"].iter().enumerate() {
                let seq = ids(&p[key]);
                at[j] = b.input_ids.len() + score_position(&seq, pad);
                push_sequence(&mut b, (2 * k + j) as u32, &seq, &[]);
            }
            b.targets.iter_mut().for_each(|t| *t = -100);
            slots.push(RewardSlot {
                chosen_at: at[0],
                rejected_at: at[1],
                margin: if use_margin {
                    p["margin"].as_f64().unwrap()
                } else {
                    0.0
                },
            });
        }
        RewardBatch {
            batch: b,
            pairs: slots,
        }
    };

    // The base model alone (no adapter): TRL's `base_rewards`.
    let plain = batch_for(Some(0), false);
    let reward = Reward::default();
    let c = reward.evaluate(&model, &plain, exact());
    let positions: Vec<usize> = plain
        .pairs
        .iter()
        .map(|p| p.chosen_at)
        .chain(plain.pairs.iter().map(|p| p.rejected_at))
        .collect();
    let scores = model.forward_scores(&plain.batch, &positions, exact());
    let want: Vec<f64> = floats(&fixture["base_rewards"]["chosen"])
        .into_iter()
        .chain(floats(&fixture["base_rewards"]["rejected"]))
        .collect();
    for (g, w) in scores.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-5, "base reward {g} vs TRL {w}");
    }
    assert_eq!(c.units, 4.0);

    model.set_adapter(&adapter);
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let pad = case["pad_token_id"].as_u64().map(|p| p as u32);
        let batch = batch_for(pad, case["use_margin"].as_bool().unwrap());
        let mut objective = Reward {
            params: RewardParams {
                center_rewards_coefficient: case["center_rewards_coefficient"].as_f64(),
            },
        };
        let mut grads = model.new_grads(TrainMode::Lora);
        let c = objective.forward_backward(&model, &batch, &mut grads, exact());
        let loss = c.loss_sum / c.units;
        let want = case["loss"].as_f64().unwrap();
        assert!(
            ((loss - want) / want).abs() < 1e-5,
            "{name}: loss {loss} vs TRL {want}"
        );
        for k in ["accuracy", "margin", "min_reward", "mean_reward", "max_reward"] {
            let (got, want) = (c.metrics[k] / c.units, case["metrics"][k].as_f64().unwrap());
            assert!(
                (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                "{name}: {k} {got} vs {want}"
            );
        }
        let worst = gradient_error(&mut grads, &case["grads"], c.units);
        assert!(
            worst < 1e-3,
            "{name}: gradients differ from TRL's by {worst:.2e} (relative norm)"
        );
        eprintln!("{name}: loss {loss:.7} vs {want:.7}, worst grad rel err {worst:.2e}");
    }
}
