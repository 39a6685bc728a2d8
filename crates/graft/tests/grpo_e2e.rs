//! GRPO and RLOO end to end through the `graft` binary: GRPO measurably raises a verifiable
//! reward on the pretrained stories260K, a resumed run reproduces the uninterrupted one byte for
//! byte (rollouts included), RLOO's KL penalty runs on the base-without-adapter reference, and
//! bad configs and failing rewards are errors that name the key or the sample.

mod common;

use common::{fails, graft, ok, prepare, records, tmp};

use std::path::{Path, PathBuf};

/// Writes `n` prompt-only rows `{"prompt": …, "answer": …}`.
fn write_prompts(path: &Path, n: usize) {
    let starts = [
        "Once upon a time",
        "One day",
        "Lily and Tom",
        "The little dog",
        "Once there was a girl",
        "A big bird",
        "The sun was",
        "Tim had a ball",
    ];
    let rows: String = (0..n)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"prompt": starts[(i * 5 + 3) % starts.len()], "answer": "cat"})
            )
        })
        .collect();
    std::fs::write(path, rows).unwrap();
}

fn stories() -> Option<PathBuf> {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/models/stories260K/hf");
    if model.exists() {
        Some(model)
    } else {
        eprintln!("skipping: {} not found (needs ../shared/data)", model.display());
        None
    }
}

/// A GRPO config on `model` with a "contains the answer column" reward.
fn config(root: &Path, model: &Path, extra: &str) -> PathBuf {
    let prompts = root.join("prompts.jsonl");
    write_prompts(&prompts, 64);
    let cfg = root.join("grpo.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"method = "grpo"
[model]
path = "{model}"
[data]
train = ["{prompts}"]
max_length = 96
[lora]
r = 8
alpha = 16
dropout = 0.0
[optimizer]
lr = 5e-3
[batch]
micro_batch_rows = 8
grad_accum = 4
[train]
max_steps = 12
log_every = 1
seed = 1
save_every = 0
[grpo]
num_generations = 8
max_completion_length = 32
log_completions_every = 4
{extra}
[[rewards]]
name = "contains"
column = "answer"
case_sensitive = false
[output]
dir = "{out}"
"#,
            model = model.display(),
            prompts = prompts.display(),
            out = root.join("run").display(),
        ),
    )
    .unwrap();
    cfg
}

fn rewards(run: &Path) -> Vec<f64> {
    records(&run.join("metrics.jsonl"))
        .iter()
        .map(|r| r["reward"].as_f64().unwrap())
        .collect()
}

#[test]
fn grpo_raises_a_target_word_reward_on_stories260k() {
    let Some(model) = stories() else { return };
    let root = tmp("grpo-learns");
    let cfg = config(&root, &model, "");
    // 8 of the 64 prompts held out, evaluated at steps 6 and 12.
    ok(graft().arg("train").arg(&cfg).args([
        "--set",
        "data.eval_fraction=0.125",
        "--set",
        "train.eval_every=6",
    ]));
    let run = root.join("run");
    let r = rewards(&run);
    assert_eq!(r.len(), 12);
    let evals: Vec<f64> = records(&run.join("metrics.jsonl"))
        .iter()
        .filter_map(|m| m["eval_reward"].as_f64())
        .collect();
    assert_eq!(evals.len(), 2, "eval_reward at steps 6 and 12");
    assert!(
        evals[1] >= 0.5,
        "held-out prompts get the target word too: {evals:?}"
    );
    let first = (r[0] + r[1]) / 2.0;
    let last = r[8..].iter().sum::<f64>() / 4.0;
    assert!(
        last >= first + 0.3,
        "GRPO did not raise the reward: first steps {first:.3}, last steps {last:.3} ({r:?})"
    );
    let m = &records(&run.join("metrics.jsonl"))[0];
    for key in [
        "reward",
        "reward_std",
        "rewards/contains/mean",
        "rewards/contains/std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "clip_ratio/region_mean",
        "sampling/sampling_logp_difference/mean",
        "entropy",
    ] {
        assert!(m[key].is_number(), "metrics.jsonl lacks {key}: {m}");
    }
    // Sample completions with their rewards, every log_completions_every steps.
    let samples = records(&run.join("completions.jsonl"));
    assert_eq!(samples.len(), 3 * 32, "steps 4, 8 and 12, 32 completions each");
    assert!(samples[0]["rewards"]["contains"].is_number() && samples[0]["completion"].is_string());
    assert!(run.join("adapter/adapter_model.safetensors").exists());
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        report.contains("reward.svg"),
        "report.md plots the reward: {report}"
    );
}

#[test]
fn grpo_resume_reproduces_the_uninterrupted_run() {
    let Some(model) = stories() else { return };
    let root = tmp("grpo-resume");
    let cfg = config(&root, &model, "num_iterations = 2\nbeta = 0.04");
    let sets = |dir: &Path| {
        [
            "--set".to_string(),
            "train.max_steps=6".into(),
            "--set".into(),
            "train.save_every=3".into(),
            "--set".into(),
            format!("output.dir=\"{}\"", dir.display()),
        ]
    };
    let (a, b) = (root.join("a"), root.join("b"));
    ok(graft().arg("train").arg(&cfg).args(sets(&a)));
    // b: the same run resumed from its step-3 checkpoint. With μ = 2, step 4 trains again on the
    // completions sampled for step 3, before step 3's update: the checkpoint must carry them.
    ok(graft().arg("train").arg(&cfg).args(sets(&b)));
    std::fs::remove_dir_all(b.join("checkpoints/step-6")).unwrap();
    std::fs::remove_dir_all(b.join("adapter")).unwrap();
    ok(graft().arg("train").arg("--resume").arg(&b));
    let wa = std::fs::read(a.join("checkpoints/step-6/adapter.safetensors")).unwrap();
    let wb = std::fs::read(b.join("checkpoints/step-6/adapter.safetensors")).unwrap();
    assert!(
        wa == wb,
        "the resumed GRPO run's weights differ from the uninterrupted run's"
    );
    assert_eq!(rewards(&a), rewards(&b));
}

#[test]
fn rloo_trains_with_its_kl_penalty_on_the_toy_model() {
    let root = tmp("rloo");
    let cfg = toy_config(&root, "\n[[rewards]]\nname = \"length\"\ntarget = 6\n");
    let prompts = root.join("prompts.jsonl");
    write_prompts(&prompts, 16);
    let run = root.join("run");
    ok(graft().arg("train").arg(&cfg).args([
        "--set",
        "method=rloo",
        "--set",
        &format!("data.train=\"{}\"", prompts.display()),
        "--set",
        "batch.micro_batch_rows=4",
        "--set",
        "batch.grad_accum=1",
        "--set",
        "rloo.max_completion_length=8",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.log_every=1",
        "--set",
        &format!("output.dir=\"{}\"", run.display()),
    ]));
    let m = records(&run.join("metrics.jsonl"));
    assert_eq!(m.len(), 3);
    assert!(
        m[0]["kl"].is_number(),
        "RLOO logs the KL of its penalty: {}",
        m[0]
    );
    assert!(m[2]["loss"].as_f64().unwrap().is_finite());
}

/// The quickstart's toy model and config, made an RL config: no eval set, completions counted
/// in rows, and the `[[rewards]]` given.
fn toy_config(root: &Path, rewards: &str) -> PathBuf {
    let cfg = prepare(root);
    let text: String = std::fs::read_to_string(&cfg)
        .unwrap()
        .lines()
        .filter(|l| {
            !l.starts_with("micro_batch_tokens") && !l.starts_with("eval = ") && !l.starts_with("eval_every")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&cfg, text + rewards).unwrap();
    cfg
}

/// Appends `text` to the file at `path`.
fn append(path: &Path, text: &str) {
    let mut t = std::fs::read_to_string(path).unwrap();
    t.push_str(text);
    std::fs::write(path, t).unwrap();
}

#[test]
fn rl_config_and_reward_errors_name_the_key_or_the_sample() {
    let root = tmp("grpo-errors");
    let cfg = toy_config(&root, "");
    let prompts = root.join("prompts.jsonl");
    write_prompts(&prompts, 8);
    let base = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "method=grpo",
            "batch.micro_batch_rows=4",
            "grpo.num_generations=4",
            "grpo.max_completion_length=4",
            "train.max_steps=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(format!("data.train=\"{}\"", prompts.display()));
        v.push(format!("output.dir=\"{}\"", root.join("run").display()));
        v.extend(extra.iter().map(|s| s.to_string()));
        v.into_iter()
            .flat_map(|s| ["--set".to_string(), s])
            .collect::<Vec<_>>()
    };
    // No reward function.
    let e = fails(graft().arg("train").arg(&cfg).args(base(&[])));
    assert!(e.contains("rewards") && e.contains("[[rewards]]"), "{e}");
    // num_generations must divide the completions of a step.
    let with_reward = root.join("with_reward.toml");
    std::fs::copy(&cfg, &with_reward).unwrap();
    append(&with_reward, "\n[[rewards]]\nname = \"math\"\n");
    let e = fails(
        graft()
            .arg("train")
            .arg(&with_reward)
            .args(base(&["grpo.num_generations=3"])),
    );
    assert!(e.contains("grpo.num_generations"), "{e}");
    let e = fails(
        graft()
            .arg("train")
            .arg(&with_reward)
            .args(base(&["grpo.loss_type=\"ppo\""])),
    );
    assert!(e.contains("grpo.loss_type"), "{e}");
    // Fewer prompts than one step samples.
    let e = fails(
        graft()
            .arg("train")
            .arg(&with_reward)
            .args(base(&["batch.micro_batch_rows=64"])),
    );
    assert!(
        e.contains("data.train: 8 prompts") && e.contains("16 prompts"),
        "{e}"
    );
    // The prompt column is missing: the place and the key to set.
    let e = fails(
        graft()
            .arg("train")
            .arg(&with_reward)
            .args(base(&["data.prompt_column=\"question\""])),
    );
    assert!(
        e.contains("prompts.jsonl:1") && e.contains("data.prompt_column"),
        "{e}"
    );
    // `math` reads the `answer` column, which holds "cat": not a number it can compare, but the
    // reward scores it (0); a missing column fails naming the sample and the function.
    let no_answer = root.join("no_answer.jsonl");
    std::fs::write(&no_answer, "{\"prompt\": \"Once\"}\n".repeat(8)).unwrap();
    let e = fails(
        graft()
            .arg("train")
            .arg(&with_reward)
            .args(base(&[&format!("data.train=\"{}\"", no_answer.display())])),
    );
    assert!(
        e.contains("no_answer.jsonl:") && e.contains("math: column `answer` is missing"),
        "{e}"
    );
    assert!(
        e.contains("on_error"),
        "the error says how to score such samples 0: {e}"
    );
}
