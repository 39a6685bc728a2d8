//! `method = "reward"` end to end through the `graft` binary on the quickstart model: a reward
//! model learns a preference and carries it to held-out pairs, saves the layout
//! `AutoModelForSequenceClassification` and PEFT load (score head in `modules_to_save`), and
//! `graft reward` scores rows with the adapter, the merged model and a fully fine-tuned one alike.

mod common;

use common::{fails, graft, ok, out_dir, prepare, records, tmp, write_reverse_pairs};
use std::path::Path;

fn sets(root: &Path, extra: &[&str]) -> Vec<String> {
    let (train, eval) = (root.join("pairs.jsonl"), root.join("pairs-eval.jsonl"));
    write_reverse_pairs(&train, 240, 11, Some(3));
    write_reverse_pairs(&eval, 32, 99, Some(3));
    [
        "method=reward",
        "full=false",
        "lora.r=8",
        "lora.dropout=0.0",
        "optimizer.lr=5e-3",
        "schedule.warmup_steps=0",
        "batch.micro_batch_tokens=640",
        "reward.center_rewards_coefficient=0.01",
        "train.save_every=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(extra.iter().map(|s| s.to_string()))
    .chain([
        format!("data.train=\"{}\"", train.display()),
        format!("data.eval=\"{}\"", eval.display()),
    ])
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

/// The `chosen` / `rejected` scores `graft reward` prints for `data`.
fn scores(args: &[&std::ffi::OsStr]) -> Vec<(f64, f64)> {
    let out = graft().arg("reward").args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["chosen"].as_f64().unwrap(), v["rejected"].as_f64().unwrap())
        })
        .collect()
}

/// The quickstart config's `model.path`.
fn model_path(cfg: &Path) -> String {
    let text = std::fs::read_to_string(cfg).unwrap();
    let line = text.lines().find(|l| l.starts_with("path = ")).unwrap();
    line.trim_start_matches("path = ").trim_matches('"').to_string()
}

/// The tensor names of a safetensors file (from its JSON header).
fn tensor_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}

#[test]
fn lora_reward_model_learns_saves_peft_layout_and_scores() {
    let root = tmp("reward");
    let cfg = prepare(&root);
    let run = root.join("run");
    ok(graft()
        .arg("train")
        .arg(&cfg)
        .args(sets(
            &root,
            &["train.max_steps=40", "train.eval_every=20", "train.log_every=5"],
        ))
        .args(out_dir(&run)));
    let recs = records(&run.join("metrics.jsonl"));
    let train = recs
        .iter()
        .find(|r| r.get("accuracy").is_some())
        .expect("TRL metric names");
    for k in ["margin", "min_reward", "mean_reward", "max_reward"] {
        assert!(train.get(k).is_some(), "{k} missing: {train}");
    }
    let evals: Vec<f64> = recs
        .iter()
        .filter_map(|r| r.get("eval_accuracy").and_then(|v| v.as_f64()))
        .collect();
    assert!(
        *evals.last().unwrap() >= 0.9,
        "held-out accuracy should rise well above 0.5: {evals:?}"
    );
    assert!(run.join("accuracy.svg").exists() && run.join("margin.svg").exists());

    // The PEFT layout of a SEQ_CLS adapter: LoRA factors plus the score head.
    let adapter = run.join("adapter");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert!(
        config["modules_to_save"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "score")
    );
    let names = tensor_names(&adapter.join("adapter_model.safetensors"));
    assert!(
        names.iter().any(|n| n == "base_model.model.score.weight"),
        "{names:?}"
    );

    // `graft reward` with the adapter ranks the held-out pairs as training's eval did.
    let eval = root.join("pairs-eval.jsonl");
    let base = model_path(&cfg);
    let with_adapter = scores(&[
        "--model".as_ref(),
        base.as_ref(),
        "--adapter".as_ref(),
        adapter.as_os_str(),
        "--data".as_ref(),
        eval.as_os_str(),
    ]);
    assert_eq!(with_adapter.len(), 32);
    let correct = with_adapter.iter().filter(|(c, r)| c > r).count();
    assert!(correct >= 29, "{correct}/32 ranked correctly");

    // The merged export is a *ForSequenceClassification checkpoint that scores the same.
    let merged = root.join("merged");
    ok(graft()
        .args(["export", "merge"])
        .arg(&run)
        .arg("--out")
        .arg(&merged));
    let mc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap()).unwrap();
    assert_eq!(mc["architectures"][0], "LlamaForSequenceClassification");
    assert!(mc["pad_token_id"].is_u64() && mc["id2label"].as_object().unwrap().len() == 1);
    let merged_scores = scores(&[
        "--model".as_ref(),
        merged.as_os_str(),
        "--data".as_ref(),
        eval.as_os_str(),
    ]);
    for ((a, b), (c, d)) in with_adapter.iter().zip(&merged_scores) {
        assert!(
            (a - c).abs() < 1e-3 && (b - d).abs() < 1e-3,
            "{a} {b} vs merged {c} {d}"
        );
    }

    // A causal LM alone has no score head, and a reward model is not a start for SFT.
    let e = fails(
        graft()
            .arg("reward")
            .arg("--model")
            .arg(&base)
            .arg("--data")
            .arg(&eval),
    );
    assert!(e.contains("no score head"), "{e}");
    let e = fails(
        graft()
            .arg("train")
            .arg(&cfg)
            .args(["--set", &format!("model.path=\"{}\"", merged.display())])
            .args(out_dir(&root.join("sft-on-rm"))),
    );
    assert!(
        e.contains("is a reward model") && e.contains("method = \"reward\""),
        "{e}"
    );
}

#[test]
fn full_reward_model_writes_a_sequence_classifier_and_resumes() {
    let root = tmp("reward-full");
    let cfg = prepare(&root);
    let run = root.join("run");
    ok(graft()
        .arg("train")
        .arg(&cfg)
        .args(sets(
            &root,
            &[
                "full=true",
                "optimizer.lr=1e-3",
                "train.max_steps=6",
                "train.log_every=3",
            ],
        ))
        .args(out_dir(&run)));
    let model = run.join("model");
    let mc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(mc["architectures"][0], "LlamaForSequenceClassification");
    let names = tensor_names(&model.join("model.safetensors"));
    assert!(names.iter().any(|n| n == "score.weight"));
    assert!(!names.iter().any(|n| n == "lm_head.weight"));
    let eval = root.join("pairs-eval.jsonl");
    assert_eq!(
        scores(&[
            "--model".as_ref(),
            model.as_os_str(),
            "--data".as_ref(),
            eval.as_os_str()
        ])
        .len(),
        32
    );

    // Killed after its first checkpoint and resumed: the same weights as straight through.
    let split = root.join("split");
    let full = [
        "full=true",
        "optimizer.lr=1e-3",
        "train.max_steps=6",
        "train.log_every=3",
        "train.save_every=2",
    ];
    ok(graft()
        .arg("train")
        .arg(&cfg)
        .args(sets(&root, &full))
        .args(out_dir(&root.join("straight"))));
    let mut child = graft()
        .arg("train")
        .arg(&cfg)
        .args(sets(&root, &full))
        .args(out_dir(&split))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = split.join("checkpoints/step-2");
    let t0 = std::time::Instant::now();
    while !first.join("manifest.json").exists() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let _ = child.kill();
    child.wait().unwrap();
    ok(graft().arg("train").arg("--resume").arg(&split));
    let a = std::fs::read(root.join("straight/checkpoints/step-6/model.safetensors")).unwrap();
    let b = std::fs::read(split.join("checkpoints/step-6/model.safetensors")).unwrap();
    assert!(
        a == b,
        "resumed reward model differs from the uninterrupted run's"
    );
}
