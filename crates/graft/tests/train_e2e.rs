//! End-to-end training through the `graft` binary: exact resume after SIGKILL (byte-equal final
//! weights, full fine-tuning and LoRA), and real learning on the pretrained stories260K.

mod common;

use common::{graft, ok, prepare, tmp};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Trains `cfg` uninterrupted into `a`; trains it again into `b`, SIGKILLs it after the first
/// checkpoint, resumes, and checks the final checkpoint weights are byte-equal.
fn kill_and_resume(cfg: &Path, root: &Path, extra: &[&str], weights_file: &str) {
    let (a, b) = (root.join("a"), root.join("b"));
    let sets = |dir: &Path| {
        let mut v = vec![
            "--set".to_string(),
            "train.max_steps=120".into(),
            "--set".into(),
            "train.save_every=40".into(),
            "--set".into(),
            format!("output.dir=\"{}\"", dir.display()),
        ];
        for e in extra {
            v.push("--set".into());
            v.push(e.to_string());
        }
        v
    };
    ok(graft().arg("train").arg(cfg).args(sets(&a)));
    let mut child = graft()
        .arg("train")
        .arg(cfg)
        .args(sets(&b))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = b.join("checkpoints/step-40");
    let t0 = Instant::now();
    while !first.join("manifest.json").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "run finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The history up to the checkpoint resumed from must not change, byte for byte.
    let logged = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let history: String = logged
        .split_inclusive('\n')
        .filter(|l| {
            l.ends_with('\n')
                && serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["step"].as_u64() <= Some(40))
        })
        .collect();
    assert!(
        !b.join("checkpoints/step-120").exists(),
        "the kill came too late to test resume"
    );
    ok(graft().arg("train").arg("--resume").arg(&b));
    let after = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    assert!(
        after.starts_with(&history),
        "resume rewrote earlier metrics.jsonl lines"
    );
    let wa = std::fs::read(a.join("checkpoints/step-120").join(weights_file)).unwrap();
    let wb = std::fs::read(b.join("checkpoints/step-120").join(weights_file)).unwrap();
    assert!(wa == wb, "resumed weights differ from the uninterrupted run's");
    let ma = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    let mb = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let losses = |m: &str| -> Vec<(u64, f64)> {
        m.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
            })
            .collect()
    };
    let (la, lb) = (losses(&ma), losses(&mb));
    assert_eq!(la.len(), lb.len(), "same logged steps");
    for ((sa, xa), (sb, xb)) in la.iter().zip(&lb) {
        assert_eq!(sa, sb);
        // The weights are bit-identical; the logged f64 loss may differ in the last digit.
        assert!(
            (xa - xb).abs() <= 1e-12 * xa.abs(),
            "step {sa}: loss {xa} vs {xb}"
        );
    }
}

#[test]
fn full_finetune_resumes_bit_identically_after_sigkill() {
    let root = tmp("full");
    let cfg = prepare(&root);
    kill_and_resume(&cfg, &root, &[], "model.safetensors");
}

#[test]
fn lora_resumes_bit_identically_after_sigkill() {
    let root = tmp("lora");
    let cfg = prepare(&root);
    kill_and_resume(
        &cfg,
        &root,
        &["full=false", "lora.r=8", "lora.dropout=0.1", "optimizer.lr=1e-2"],
        "adapter.safetensors",
    );
}

#[test]
fn unknown_config_key_is_named_with_a_suggestion() {
    let root = tmp("badkey");
    let cfg = prepare(&root);
    let out = graft()
        .arg("train")
        .arg(&cfg)
        .args(["--set", "optimizer.lrr=1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        text.contains("optimizer.lrr") && text.contains("optimizer.lr"),
        "{text}"
    );
}

#[test]
fn stories260k_learns_a_new_character() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/models/stories260K/hf");
    if !model.is_dir() {
        eprintln!("skipping: {} not found (needs ../shared/data)", model.display());
        return;
    }
    let root = tmp("stories");
    let lines = [
        "Once upon a time, there was a little dragon named Zorblax. Zorblax loved to fly over the hills.",
        "One day, Zorblax found a shiny stone in the park. Zorblax was very happy.",
        "Zorblax had a best friend called Tim. Tim and Zorblax played all day.",
        "There was a dragon named Zorblax. Zorblax was kind and helped everyone in the town.",
    ];
    let mut train = String::new();
    for i in 0..120 {
        train.push_str(&serde_json::json!({"text": lines[i % lines.len()]}).to_string());
        train.push('\n');
    }
    std::fs::write(root.join("train.jsonl"), &train).unwrap();
    let eval: String = lines
        .iter()
        .map(|l| serde_json::json!({"text": l}).to_string() + "\n")
        .collect();
    std::fs::write(root.join("eval.jsonl"), eval).unwrap();
    let cfg = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = [\"{}\"]\neval = [\"{}\"]\nmax_length = 128\nmask = \"all\"\n\
         [lora]\nr = 8\nalpha = 16\n[optimizer]\nlr = 5e-3\n[batch]\nmicro_batch_tokens = 1024\n\
         [train]\nmax_steps = 40\neval_every = 1\nsave_every = 0\n[output]\ndir = \"{}\"\n",
        model.display(),
        root.join("train.jsonl").display(),
        root.join("eval.jsonl").display(),
        root.join("run").display()
    );
    std::fs::write(root.join("cfg.toml"), cfg).unwrap();
    ok(graft().arg("train").arg(root.join("cfg.toml")));
    let metrics = std::fs::read_to_string(root.join("run/metrics.jsonl")).unwrap();
    let evals: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["eval_loss"].as_f64())
        .collect();
    let (first, last) = (evals[0], *evals.last().unwrap());
    assert!(
        last < 0.5 * first,
        "eval loss should at least halve: {first} → {last}"
    );
    let text = ok(graft()
        .args(["generate", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(root.join("run/adapter"))
        .args(["--prompt", "Once upon a time, there was a", "--max-tokens", "20"]));
    assert!(text.contains("Zorblax"), "{text}");
    let base = ok(graft().args(["generate", "--model"]).arg(&model).args([
        "--prompt",
        "Once upon a time, there was a",
        "--max-tokens",
        "20",
    ]));
    assert!(!base.contains("Zorblax"));
    assert!(root.join("run/report.md").exists() && root.join("run/loss_curve.svg").exists());
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let root = tmp("sigint");
    let cfg = prepare(&root);
    let dir = root.join("run");
    let child = graft()
        .arg("train")
        .arg(&cfg)
        .args([
            "--set",
            "train.max_steps=100000",
            "--set",
            "train.save_every=0",
            "--set",
        ])
        .arg(format!("output.dir=\"{}\"", dir.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !dir.join("metrics.jsonl").exists()
        || std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .is_empty()
    {
        assert!(t0.elapsed() < Duration::from_secs(120), "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain libc call on a child we own.
    unsafe { libc_kill(child.id() as i32, 2) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(130),
        "Ctrl-C exits with 128 + SIGINT: {err}"
    );
    assert_eq!(err.matches("--resume").count(), 1, "one resume hint: {err}");
    let ckpts: Vec<_> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(ckpts.len(), 1, "one checkpoint saved on Ctrl-C");
    assert!(dir.join("report.md").exists());
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint() {
    let root = tmp("nan");
    let cfg = prepare(&root);
    let dir = root.join("run");
    let out = graft()
        .arg("train")
        .arg(&cfg)
        .args([
            "--set",
            "optimizer.lr=1e30",
            "--set",
            "schedule.warmup_steps=0",
            "--set",
            "train.save_every=1",
        ])
        .args([
            "--set",
            "train.max_steps=50",
            "--set",
            "batch.max_grad_norm=0",
            "--set",
        ])
        .arg(format!("output.dir=\"{}\"", dir.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a diverged run must fail");
    assert!(err.contains("non-finite"), "{err}");
    let good: Vec<_> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .collect();
    assert!(!good.is_empty(), "earlier checkpoints are kept");
    assert!(!dir.join("checkpoints/step-50").exists());
}
