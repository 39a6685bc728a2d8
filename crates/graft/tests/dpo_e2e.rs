//! `method = "dpo"` end to end through the `graft` binary on the quickstart model: preference
//! pairs in TRL's conversational format, LoRA, TRL's metric names in `metrics.jsonl`, held-out
//! reward accuracy rising, a PEFT adapter at the end, and exact resume after SIGKILL.

mod common;

use common::{graft, ok, out_dir, prepare, records, tmp, write_reverse_pairs};
use std::path::Path;
use std::time::{Duration, Instant};

fn dpo_sets(root: &Path) -> Vec<String> {
    let (train, eval) = (root.join("pairs.jsonl"), root.join("pairs-eval.jsonl"));
    write_reverse_pairs(&train, 240, 11, None);
    write_reverse_pairs(&eval, 32, 99, None);
    [
        "method=dpo".to_string(),
        "full=false".into(),
        "lora.r=8".into(),
        "lora.dropout=0.0".into(),
        "optimizer.lr=5e-3".into(),
        "schedule.warmup_steps=0".into(),
        "batch.micro_batch_tokens=640".into(),
        "dpo.beta=0.1".into(),
        format!("data.train=\"{}\"", train.display()),
        format!("data.eval=\"{}\"", eval.display()),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

#[test]
fn dpo_raises_held_out_reward_accuracy_and_writes_trl_metrics() {
    let root = tmp("dpo");
    let cfg = prepare(&root);
    let run = root.join("run");
    let out = ok(graft()
        .arg("train")
        .arg(&cfg)
        .args(dpo_sets(&root))
        .args([
            "--set",
            "train.max_steps=40",
            "--set",
            "train.eval_every=20",
            "--set",
            "train.log_every=5",
        ])
        .args(["--set", "train.save_every=0"])
        .args(out_dir(&run)));
    assert!(out.contains("reference log-probs"), "{out}");
    let recs = records(&run.join("metrics.jsonl"));
    let train = recs
        .iter()
        .find(|r| r.get("rewards/margins").is_some())
        .expect("TRL metric names");
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(train.get(k).is_some(), "{k} missing: {train}");
    }
    let evals: Vec<f64> = recs
        .iter()
        .filter_map(|r| r.get("eval_rewards/accuracies").and_then(|v| v.as_f64()))
        .collect();
    assert!(evals.len() >= 2, "{recs:?}");
    let last = *evals.last().unwrap();
    assert!(
        last >= 0.9,
        "held-out reward accuracy should rise well above 0.5: {evals:?}"
    );
    let margins = recs.last().unwrap()["eval_rewards/margins"].as_f64().unwrap();
    assert!(margins > 0.0);
    assert!(run.join("adapter/adapter_config.json").exists());
    assert!(run.join("reference_logps.bin").exists());
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        report.contains("rewards/margins") && run.join("rewards_margins.svg").exists(),
        "{report}"
    );
    assert!(run.join("rewards_accuracies.svg").exists());
}

#[test]
fn dpo_resumes_bit_identically_after_sigkill() {
    let root = tmp("dpo-resume");
    let cfg = prepare(&root);
    let sets = dpo_sets(&root);
    let common = ["--set", "train.max_steps=24", "--set", "train.save_every=8"];
    let (a, b) = (root.join("a"), root.join("b"));
    ok(graft()
        .arg("train")
        .arg(&cfg)
        .args(&sets)
        .args(common)
        .args(out_dir(&a)));
    let mut child = graft()
        .arg("train")
        .arg(&cfg)
        .args(&sets)
        .args(common)
        .args(out_dir(&b))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = b.join("checkpoints/step-8");
    let t0 = Instant::now();
    while !first.join("manifest.json").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "finished before the kill");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!b.join("checkpoints/step-24").exists(), "the kill came too late");
    ok(graft().arg("train").arg("--resume").arg(&b));
    let wa = std::fs::read(a.join("checkpoints/step-24/adapter.safetensors")).unwrap();
    let wb = std::fs::read(b.join("checkpoints/step-24/adapter.safetensors")).unwrap();
    assert!(
        wa == wb,
        "resumed DPO weights differ from the uninterrupted run's"
    );
}

#[test]
fn reference_free_methods_train_and_log_their_metrics() {
    let root = tmp("cpo-orpo");
    let cfg = prepare(&root);
    for (method, key) in [
        ("cpo", "nll_loss"),
        ("simpo", "rewards/margins"),
        ("orpo", "log_odds_ratio"),
    ] {
        let run = root.join(method);
        ok(graft()
            .arg("train")
            .arg(&cfg)
            .args(dpo_sets(&root))
            .args(["--set", &format!("method={method}")])
            .args([
                "--set",
                "train.max_steps=6",
                "--set",
                "train.log_every=3",
                "--set",
                "train.save_every=0",
            ])
            .args(out_dir(&run)));
        let recs = records(&run.join("metrics.jsonl"));
        assert!(
            recs.iter().any(|r| r.get(key).is_some()),
            "{method}: {key} missing"
        );
        assert!(
            !run.join("reference_logps.bin").exists(),
            "{method} needs no reference"
        );
        assert!(run.join("adapter/adapter_config.json").exists());
    }
}

#[test]
fn kto_learns_from_labelled_completions_and_from_unpaired_pairs() {
    let root = tmp("kto");
    let cfg = prepare(&root);
    // Unpaired: the chosen and rejected completions of the pairs as separate labelled rows.
    let pairs = root.join("pairs.jsonl");
    let _ = dpo_sets(&root);
    let mut kto = String::new();
    for line in std::fs::read_to_string(&pairs).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for (key, label) in [("chosen", true), ("rejected", false)] {
            let row = serde_json::json!({"prompt": v["prompt"], "completion": v[key], "label": label});
            kto.push_str(&row.to_string());
            kto.push('\n');
        }
    }
    let kto_file = root.join("kto.jsonl");
    std::fs::write(&kto_file, kto).unwrap();
    for (name, data) in [("labelled", kto_file.clone()), ("unpaired", pairs.clone())] {
        let run = root.join(name);
        ok(graft()
            .arg("train")
            .arg(&cfg)
            .args(dpo_sets(&root))
            .args([
                "--set",
                "method=kto",
                "--set",
                &format!("data.train=\"{}\"", data.display()),
            ])
            .args([
                "--set",
                "train.max_steps=30",
                "--set",
                "train.eval_every=30",
                "--set",
                "train.log_every=10",
            ])
            .args(["--set", "train.save_every=0"])
            .args(out_dir(&run)));
        let recs = records(&run.join("metrics.jsonl"));
        assert!(recs.iter().any(|r| r.get("kl").is_some()), "{name}: kl missing");
        let last = recs.last().unwrap();
        let (c, r) = (
            last["eval_rewards/chosen"].as_f64().unwrap(),
            last["eval_rewards/rejected"].as_f64().unwrap(),
        );
        assert!(
            c > r,
            "{name}: desirable completions should gain reward over undesirable ones: {c} vs {r}"
        );
        assert!(run.join("adapter/adapter_config.json").exists());
    }
}

#[test]
fn dpo_reference_can_be_another_adapter_or_model() {
    let root = tmp("dpo-refpath");
    let cfg = prepare(&root);
    let sets = dpo_sets(&root);
    let short = ["--set", "train.max_steps=4", "--set", "train.save_every=0"];
    ok(graft()
        .arg("train")
        .arg(&cfg)
        .args(&sets)
        .args(short)
        .args(out_dir(&root.join("first"))));
    let adapter = root.join("first/adapter");
    for (name, reference) in [("adapter", adapter.clone()), ("model", root.join("base-model"))] {
        let out = ok(graft()
            .arg("train")
            .arg(&cfg)
            .args(&sets)
            .args(short)
            .args(["--set", &format!("dpo.reference=\"{}\"", reference.display())])
            .args(out_dir(&root.join(name))));
        assert!(out.contains(&format!("`{}`", reference.display())), "{out}");
    }
    // Against the first run's adapter the policy (a fresh adapter = the base) starts behind:
    // the log-ratios are not zero, unlike with reference = init.
    let first = records(&root.join("adapter/metrics.jsonl"));
    assert!(first[0]["rewards/margins"].as_f64().unwrap().abs() > 1e-6);
    let err = common::fails(
        graft()
            .arg("train")
            .arg(&cfg)
            .args(&sets)
            .args(short)
            .args(["--set", "dpo.reference=\"no/such/model\""])
            .args(out_dir(&root.join("bad"))),
    );
    assert!(err.contains("reference"), "{err}");
}
