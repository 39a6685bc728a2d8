//! `graft train` on inputs that used to mislead: data of another method, runs that diverge or
//! collapse, limits beyond the model, a full disk, and what the run says it wrote.

mod common;

use common::{fails, graft, ok, out_dir, prepare, tmp};
use std::path::Path;

fn write_lines(path: &Path, rows: &[serde_json::Value]) {
    let text: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn kto_and_preference_files_given_to_sft_name_the_method_that_fits() {
    let root = tmp("wrong-method");
    let cfg = prepare(&root);
    let kto = root.join("kto.jsonl");
    write_lines(
        &kto,
        &(0..20)
            .map(|i| serde_json::json!({"prompt": "reverse: abc", "completion": "cba", "label": i % 2 == 0}))
            .collect::<Vec<_>>(),
    );
    let err = fails(
        graft()
            .arg("train")
            .arg(&cfg)
            .args(["--set", &format!("data.train=\"{}\"", kto.display())])
            .args(out_dir(&root.join("run-kto"))),
    );
    assert!(err.contains("KTO") && err.contains("label = false"), "{err}");
    assert!(err.contains("kto.jsonl:1"), "names the file and line: {err}");
    let pref = root.join("pref.jsonl");
    write_lines(
        &pref,
        &(0..20)
            .map(|_| serde_json::json!({"prompt": "reverse: abc", "chosen": "cba", "rejected": "abc"}))
            .collect::<Vec<_>>(),
    );
    let err = fails(
        graft()
            .arg("train")
            .arg(&cfg)
            .args(["--set", &format!("data.train=\"{}\"", pref.display())])
            .args(out_dir(&root.join("run-pref"))),
    );
    assert!(
        err.contains("preference data") && err.contains("method = \"dpo\""),
        "{err}"
    );
    assert!(!err.contains("no usable rows"), "{err}");
}

#[test]
fn data_chat_template_trains_a_model_without_one() {
    let root = tmp("template");
    let cfg = prepare(&root);
    // Take the template out of the base model.
    let tc = root.join("base-model/tokenizer_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    let template = v.as_object_mut().unwrap().remove("chat_template").unwrap();
    std::fs::write(&tc, v.to_string()).unwrap();
    let base = ["--set", "train.max_steps=2", "--set", "train.save_every=0"];
    let err = fails(
        graft()
            .arg("train")
            .arg(&cfg)
            .args(base)
            .args(out_dir(&root.join("a"))),
    );
    assert!(err.contains("template"), "{err}");
    // Inline, then from a file.
    let inline = format!("data.chat_template={}", serde_json::to_string(&template).unwrap());
    ok(graft()
        .arg("train")
        .arg(&cfg)
        .args(base)
        .args(["--set", &inline])
        .args(out_dir(&root.join("b"))));
    let file = root.join("chatml.jinja");
    std::fs::write(&file, template.as_str().unwrap()).unwrap();
    ok(graft()
        .arg("train")
        .arg(&cfg)
        .args(base)
        .args(["--set", &format!("data.chat_template=\"{}\"", file.display())])
        .args(out_dir(&root.join("c"))));
    let err = fails(
        graft()
            .arg("train")
            .arg(&cfg)
            .args(base)
            .args(["--set", "data.chat_template=\"no/such/file.jinja\""])
            .args(out_dir(&root.join("d"))),
    );
    assert!(err.contains("data.chat_template"), "{err}");
}

#[test]
fn a_collapsed_run_fails_and_says_why() {
    let root = tmp("collapse");
    let cfg = prepare(&root);
    let out = graft()
        .arg("train")
        .arg(&cfg)
        .args(["--set", "optimizer.lr=1e4", "--set", "batch.max_grad_norm=0"])
        .args(["--set", "schedule.warmup_steps=0", "--set", "train.max_steps=60"])
        .args(["--set", "train.save_every=0"])
        .args(out_dir(&root.join("run")))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a collapsed run must not end as completed: {err}"
    );
    assert!(err.contains("collapsed") || err.contains("non-finite"), "{err}");
    assert!(err.contains("No checkpoint had been saved"), "{err}");
    assert!(!err.contains("NonFinite {"), "no Rust debug text: {err}");
    assert!(!root.join("run/model").exists());
}

#[test]
fn limits_beyond_the_model_and_empty_files_are_explained() {
    let root = tmp("limits");
    let cfg = prepare(&root);
    let err = fails(
        graft()
            .arg("train")
            .arg(&cfg)
            .args([
                "--set",
                "data.max_length=100000",
                "--set",
                "batch.micro_batch_tokens=100000",
            ])
            .args(out_dir(&root.join("a"))),
    );
    assert!(err.contains("data.max_length") && err.contains("256"), "{err}");
    let empty = root.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let err = fails(
        graft()
            .arg("train")
            .arg(&cfg)
            .args(["--set", &format!("data.train=\"{}\"", empty.display())])
            .args(out_dir(&root.join("b"))),
    );
    assert!(err.contains("empty") && !err.contains("--format"), "{err}");
    // Rows longer than max_length are counted in train, not only in inspect.
    let out = ok(graft()
        .arg("train")
        .arg(&cfg)
        .args(["--set", "data.max_length=36", "--set", "train.max_steps=1"])
        .args(["--set", "train.save_every=0"])
        .args(out_dir(&root.join("c"))));
    assert!(out.contains("longer than data.max_length = 36"), "{out}");
    // Rows cut before any trained token: an error, not a panic.
    let err = fails(
        graft()
            .arg("train")
            .arg(&cfg)
            .args(["--set", "data.max_length=12", "--set", "train.max_steps=1"])
            .args(out_dir(&root.join("d"))),
    );
    assert!(
        err.contains("no row has a trained token") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn a_full_disk_leaves_no_temporary_files_and_names_the_write() {
    let root = tmp("disk");
    let cfg = prepare(&root);
    let run = root.join("run");
    // A file-size limit makes every large write fail as a full disk does (EFBIG instead of
    // ENOSPC); SIGXFSZ is ignored so the write returns the error.
    let cmd = format!(
        "trap '' XFSZ; ulimit -f 200; exec '{}' train '{}' --set train.max_steps=4 --set train.save_every=2 \
         --set 'output.dir=\"{}\"'",
        env!("CARGO_BIN_EXE_graft"),
        cfg.display(),
        run.display()
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &cmd])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("checkpoint") && !err.contains("data.train:"),
        "{err}"
    );
    let mut leftovers = Vec::new();
    let mut stack = vec![run.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.contains(".tmp") {
                leftovers.push(e.path());
            }
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn the_run_says_what_it_wrote_and_labels_its_losses() {
    let root = tmp("outputs");
    let cfg = prepare(&root);
    let out = ok(graft()
        .arg("train")
        .arg(&cfg)
        .args([
            "--set",
            "full=false",
            "--set",
            "train.max_steps=3",
            "--set",
            "train.log_every=2",
        ])
        .args(out_dir(&root.join("run"))));
    assert!(
        out.contains("wrote adapter/") && !out.contains("adapter/ or model/"),
        "{out}"
    );
    assert!(out.contains("last-step train loss"), "{out}");
    let report = std::fs::read_to_string(root.join("run/report.md")).unwrap();
    assert!(
        report.contains("mean over the last logged steps") && report.contains("(step 3)"),
        "{report}"
    );
}

#[test]
fn plan_needs_only_config_json() {
    let root = tmp("plan");
    let cfg = prepare(&root);
    let only = root.join("config-only");
    std::fs::create_dir_all(&only).unwrap();
    std::fs::copy(root.join("base-model/config.json"), only.join("config.json")).unwrap();
    let out = ok(graft().arg("train").arg(&cfg).args([
        "--set",
        &format!("model.path=\"{}\"", only.display()),
        "--plan",
    ]));
    assert!(out.to_lowercase().contains("peak"), "{out}");
}

#[test]
fn merged_export_keeps_the_base_config_json() {
    let root = tmp("merge-config");
    let cfg = prepare(&root);
    // Keys and spellings graft does not model itself must survive the export byte for byte.
    let path = root.join("base-model/config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.insert("rms_norm_eps".into(), serde_json::json!(1e-5));
    o.insert("mlp_bias".into(), serde_json::json!(false));
    o.insert("attention_bias".into(), serde_json::json!(false));
    o.insert(
        "custom_field_from_upstream".into(),
        serde_json::json!({"kept": true}),
    );
    let original = serde_json::to_string_pretty(&v).unwrap();
    std::fs::write(&path, &original).unwrap();
    let run = root.join("run");
    ok(graft()
        .arg("train")
        .arg(&cfg)
        .args([
            "--set",
            "full=false",
            "--set",
            "train.max_steps=2",
            "--set",
            "train.save_every=0",
        ])
        .args(out_dir(&run)));
    ok(graft()
        .args(["export", "merge"])
        .arg(&run)
        .arg("--out")
        .arg(root.join("merged")));
    assert_eq!(
        std::fs::read_to_string(root.join("merged/config.json")).unwrap(),
        original
    );
}

#[test]
fn quickstart_keeps_the_previous_run() {
    let root = tmp("quickstart-again");
    let args = [
        "quickstart",
        "--toy",
        "--steps",
        "2",
        "--eval-words",
        "2",
        "--out",
    ];
    ok(graft().args(args).arg(&root));
    let second = ok(graft().args(args).arg(&root));
    assert!(second.contains("previous quickstart run was moved"), "{second}");
    assert!(root.join("run-previous/report.md").exists());
    assert!(root.join("run/report.md").exists());
}

#[test]
fn inference_commands_name_their_own_tokenizer_flag() {
    let root = tmp("tokenizer-flag");
    prepare(&root);
    // A model folder with weights but no tokenizer files.
    let bare = root.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(root.join("base-model").join(f), bare.join(f)).unwrap();
    }
    let err = fails(
        graft()
            .args(["generate", "--model"])
            .arg(&bare)
            .args(["--prompt", "hi"]),
    );
    assert!(
        !err.contains("model.tokenizer"),
        "a CLI command hints at its flag: {err}"
    );
}

/// A quantized GGUF base (stories260K Q8_0) trains a LoRA adapter; full fine-tuning it is refused
/// with a message that names the tensor, its type and what to do instead.
#[test]
fn quantized_bases_train_lora_and_refuse_full_fine_tuning() {
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/models/stories260K/stories260K-Q8_0.gguf");
    if !gguf.is_file() {
        eprintln!("skipping: {} not found", gguf.display());
        return;
    }
    let root = tmp("quantized-base");
    let cfg = prepare(&root);
    let text = root.join("stories.jsonl");
    write_lines(
        &text,
        &(0..16)
            .map(|i| serde_json::json!({"text": format!("Once upon a time there was a cat number {i}.")}))
            .collect::<Vec<_>>(),
    );
    let sets = |full: bool| {
        [
            format!("model.path=\"{}\"", gguf.display()),
            format!("data.train=\"{}\"", text.display()),
            "data.eval=[]".to_string(),
            format!("full={full}"),
            "train.max_steps=2".into(),
            "train.save_every=0".into(),
        ]
        .into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect::<Vec<_>>()
    };
    let err = fails(
        graft()
            .arg("train")
            .arg(&cfg)
            .args(sets(true))
            .args(out_dir(&root.join("full"))),
    );
    assert!(
        err.contains("quantized weights") && err.contains("Q8_0") && err.contains("full = false"),
        "{err}"
    );
    ok(graft()
        .arg("train")
        .arg(&cfg)
        .args(sets(false))
        .args(out_dir(&root.join("lora"))));
    assert!(root.join("lora/adapter/adapter_config.json").exists());
}
